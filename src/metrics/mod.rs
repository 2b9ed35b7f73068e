//! Video metrics: FVD with the Kinetics-400 I3D ([`i3d`]), the Fréchet distance ([`frechet`]),
//! the restricted unpickler that converts the I3D weights ([`pickle`]), the weights asset
//! ([`assets`]) and reading videos for them ([`videos`]).
//!
//! Preprocessing follows the FVD convention: every frame is resized to 224x224 (bilinear with
//! half-pixel centres and no antialiasing, i.e. `torch.nn.functional.interpolate(mode=
//! "bilinear", align_corners=False)`; non-square frames are stretched, not cropped, as in the
//! original FVD code) and scaled from [0, 255] to [-1, 1]. Clips are 16 frames by convention;
//! the network accepts any length from 9 frames (its logits are averaged over time), and the
//! clip length is recorded beside every FVD value.

pub mod assets;
pub mod bootstrap;
pub mod degrade;
pub mod fidelity;
pub mod frechet;
pub mod i3d;
pub mod i3d_device;
pub mod motion;
pub mod pickle;
pub mod videos;

use crate::error::Result;
use i3d::{Act, InceptionI3d, INPUT_SIZE};

/// FVD's clip length.
pub const FVD_FRAMES: usize = 16;

/// Resize u8 RGB frames `[t, h, w, 3]` to `[t, 224, 224, 3]` in [-1, 1].
pub fn preprocess(frames: &[u8], t: usize, h: usize, w: usize) -> Act {
    let s = INPUT_SIZE;
    let mut out = Act::zeros(t, s, s, 3);
    // Half-pixel centres: src = (dst + 0.5) * in / out - 0.5, clamped to the edge.
    let taps = |n_in: usize| -> Vec<(usize, usize, f32)> {
        (0..s)
            .map(|o| {
                let x = ((o as f32 + 0.5) * n_in as f32 / s as f32 - 0.5).max(0.0);
                let x0 = (x.floor() as usize).min(n_in - 1);
                let x1 = (x0 + 1).min(n_in - 1);
                (x0, x1, x - x0 as f32)
            })
            .collect()
    };
    let (ty, tx) = (taps(h), taps(w));
    for f in 0..t {
        let src = &frames[f * h * w * 3..(f + 1) * h * w * 3];
        let dst = &mut out.data[f * s * s * 3..(f + 1) * s * s * 3];
        for (oy, &(y0, y1, fy)) in ty.iter().enumerate() {
            for (ox, &(x0, x1, fx)) in tx.iter().enumerate() {
                for c in 0..3 {
                    let p = |y: usize, x: usize| src[(y * w + x) * 3 + c] as f32;
                    let top = p(y0, x0) * (1.0 - fx) + p(y0, x1) * fx;
                    let bot = p(y1, x0) * (1.0 - fx) + p(y1, x1) * fx;
                    let v = top * (1.0 - fy) + bot * fy;
                    dst[(oy * s + ox) * 3 + c] = v / 127.5 - 1.0;
                }
            }
        }
    }
    out
}

/// The FVD network where it runs: onestep's own kernels on the CPU, candle operations on any
/// other device (CUDA), with the same weights and the same logits within float rounding.
pub enum I3dRunner {
    Cpu(InceptionI3d),
    Device(i3d_device::DeviceI3d),
}

impl I3dRunner {
    /// The network for a run on `device`.
    pub fn on(net: InceptionI3d, device: &candle_core::Device) -> Result<Self> {
        Ok(if device.is_cpu() {
            I3dRunner::Cpu(net)
        } else {
            I3dRunner::Device(i3d_device::DeviceI3d::new(&net, device)?)
        })
    }

    /// Clips scored per call of [`Self::logits`]: one on the CPU (each clip's operations are
    /// parallel already), a batch on a GPU.
    pub fn batch(&self) -> usize {
        match self {
            I3dRunner::Cpu(_) => 1,
            I3dRunner::Device(_) => 8,
        }
    }

    /// The 400 logits of each clip `[t, 224, 224, 3]` (one `t` for all).
    pub fn logits(&self, clips: &[Act]) -> Result<Vec<Vec<f32>>> {
        match self {
            I3dRunner::Cpu(net) => clips
                .iter()
                .map(|c| Ok(net.forward(c, &[])?.logits))
                .collect(),
            I3dRunner::Device(net) => {
                Ok(net.forward(clips)?.into_iter().map(|o| o.logits).collect())
            }
        }
    }
}

/// I3D logits (400 per clip) of u8 clips `[t, h, w, 3]`.
pub fn clip_logits(
    net: &InceptionI3d,
    frames: &[u8],
    t: usize,
    h: usize,
    w: usize,
) -> Result<Vec<f32>> {
    let x = preprocess(frames, t, h, w);
    Ok(net.forward(&x, &[])?.logits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocess_keeps_224_frames_and_scales() {
        let (t, h, w) = (1, 224, 224);
        let frames: Vec<u8> = (0..t * h * w * 3).map(|i| (i % 256) as u8).collect();
        let x = preprocess(&frames, t, h, w);
        for (a, b) in x.data.iter().zip(&frames) {
            assert!((a - (*b as f32 / 127.5 - 1.0)).abs() < 1e-6);
        }
    }

    #[test]
    fn preprocess_upsamples_bilinearly() {
        // 2x2 -> 224: the corners keep the source values, the centre is their mean.
        let frames = vec![0u8, 0, 0, 255, 255, 255, 0, 0, 0, 255, 255, 255];
        let x = preprocess(&frames, 1, 2, 2);
        let at = |y: usize, xx: usize| x.data[(y * 224 + xx) * 3];
        assert_eq!(at(0, 0), -1.0);
        assert_eq!(at(0, 223), 1.0);
        assert!((at(100, 111) - (-1.0 + 2.0 * (111.5 / 112.0 - 0.5))).abs() < 1e-5);
    }
}
