//! The I3D of [`super::i3d`] as candle operations, for devices other than the CPU (CUDA): the
//! same weights (BatchNorm folded in), the same TensorFlow "SAME" padding and pools, the same
//! logits within float rounding. The CPU keeps the hand-written kernels of `i3d.rs`, which are
//! faster there; the `fvd` stage picks this path when its run's device is CUDA.
//!
//! Layout: a batch of clips `[b, t, c, h, w]`. A 3-D convolution is the sum over its temporal
//! taps of 2-D convolutions of the (strided) frames; "SAME" padding is uneven, so inputs are
//! padded explicitly before each convolution. Max pools pad by repeating the edge, which never
//! changes a window's maximum (every "SAME" window holds the edge value it repeats), so padded
//! positions never win, as in the reference.

use super::i3d::{same, Act, Inception, InceptionI3d, Unit, INPUT_SIZE, MIN_FRAMES, NUM_CLASSES};
use crate::error::{Error, Result};
use candle_core::{Device, Tensor, D};

fn ce(e: candle_core::Error) -> Error {
    Error::Other(format!("I3D on the device: {e}"))
}

/// Total "SAME" padding of an axis of `n` with kernel `k` and stride `s`.
fn total_pad(n: usize, k: usize, s: usize) -> usize {
    let (out, _) = same(n, k, s);
    ((out - 1) * s + k).saturating_sub(n)
}

struct DeviceUnit {
    /// One `[cout, cin, kh, kw]` kernel per temporal tap.
    taps: Vec<Tensor>,
    /// `[1, cout, 1, 1]`.
    bias: Tensor,
    k: [usize; 3],
    s: [usize; 3],
    relu: bool,
}

impl DeviceUnit {
    fn new(u: &Unit, dev: &Device) -> candle_core::Result<Self> {
        let [kt, kh, kw] = u.k;
        // `w` is `[kt, kh, kw, cin, cout]` (the Flax layout, rows of `cout`).
        let w = Tensor::from_slice(&u.w, (kt, kh, kw, u.cin, u.cout), dev)?
            .permute((0, 4, 3, 1, 2))?
            .contiguous()?;
        let taps = (0..kt)
            .map(|i| w.get(i))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            taps,
            bias: Tensor::from_slice(&u.b, (1, u.cout, 1, 1), dev)?,
            k: u.k,
            s: u.s,
            relu: u.relu,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, c, h, w) = x.dims5()?;
        let [kt, kh, kw] = self.k;
        let [st, sh, sw] = self.s;
        if sh != sw {
            candle_core::bail!("I3D unit: spatial strides {sh} and {sw} differ");
        }
        let (to, pt) = same(t, kt, st);
        let (ho, ph) = same(h, kh, sh);
        let (wo, pw) = same(w, kw, sw);
        let x = x
            .pad_with_zeros(1, pt, total_pad(t, kt, st) - pt)?
            .pad_with_zeros(3, ph, total_pad(h, kh, sh) - ph)?
            .pad_with_zeros(4, pw, total_pad(w, kw, sw) - pw)?;
        let (tp, hp, wp) = (x.dim(1)?, x.dim(3)?, x.dim(4)?);
        let mut acc: Option<Tensor> = None;
        for (dt, tap) in self.taps.iter().enumerate() {
            let frames = if st == 1 {
                x.narrow(1, dt, to)?
            } else {
                let idx: Vec<u32> = (0..to).map(|o| (o * st + dt) as u32).collect();
                debug_assert!((to - 1) * st + dt < tp);
                x.index_select(&Tensor::new(idx, x.device())?, 1)?
            };
            let y = frames
                .reshape((b * to, c, hp, wp))?
                .conv2d(tap, 0, sh, 1, 1)?;
            acc = Some(match acc {
                None => y,
                Some(a) => (a + y)?,
            });
        }
        let y = acc
            .expect("a unit has at least one tap")
            .broadcast_add(&self.bias)?;
        let y = if self.relu { y.relu()? } else { y };
        let cout = y.dim(1)?;
        y.reshape((b, to, cout, ho, wo))
    }
}

/// 3-D max pool with "SAME" padding on `[b, t, c, h, w]`.
fn max_pool_same(x: &Tensor, k: [usize; 3], s: [usize; 3]) -> candle_core::Result<Tensor> {
    let (b, t, c, h, w) = x.dims5()?;
    let (ho, ph) = same(h, k[1], s[1]);
    let (wo, pw) = same(w, k[2], s[2]);
    let y = x
        .pad_with_same(3, ph, total_pad(h, k[1], s[1]) - ph)?
        .pad_with_same(4, pw, total_pad(w, k[2], s[2]) - pw)?;
    let (hp, wp) = (y.dim(3)?, y.dim(4)?);
    let y = y
        .reshape((b * t, c, hp, wp))?
        .max_pool2d_with_stride((k[1], k[2]), (s[1], s[2]))?
        .reshape((b, t, c, ho, wo))?;
    if k[0] == 1 && s[0] == 1 {
        return Ok(y);
    }
    let (to, pt) = same(t, k[0], s[0]);
    let y = y.pad_with_same(1, pt, total_pad(t, k[0], s[0]) - pt)?;
    let mut out: Option<Tensor> = None;
    for dt in 0..k[0] {
        let idx: Vec<u32> = (0..to).map(|o| (o * s[0] + dt) as u32).collect();
        let f = y.index_select(&Tensor::new(idx, y.device())?, 1)?;
        out = Some(match out {
            None => f,
            Some(m) => m.maximum(&f)?,
        });
    }
    Ok(out.expect("a pool has at least one tap"))
}

struct DeviceInception {
    b0: DeviceUnit,
    b1a: DeviceUnit,
    b1b: DeviceUnit,
    b2a: DeviceUnit,
    b2b: DeviceUnit,
    b3: DeviceUnit,
}

impl DeviceInception {
    fn new(m: &Inception, dev: &Device) -> candle_core::Result<Self> {
        Ok(Self {
            b0: DeviceUnit::new(&m.b0, dev)?,
            b1a: DeviceUnit::new(&m.b1a, dev)?,
            b1b: DeviceUnit::new(&m.b1b, dev)?,
            b2a: DeviceUnit::new(&m.b2a, dev)?,
            b2b: DeviceUnit::new(&m.b2b, dev)?,
            b3: DeviceUnit::new(&m.b3, dev)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y0 = self.b0.forward(x)?;
        let y1 = self.b1b.forward(&self.b1a.forward(x)?)?;
        let y2 = self.b2b.forward(&self.b2a.forward(x)?)?;
        let y3 = self.b3.forward(&max_pool_same(x, [3, 3, 3], [1, 1, 1])?)?;
        Tensor::cat(&[&y0, &y1, &y2, &y3], 2)
    }
}

/// [`InceptionI3d`] on a candle device.
pub struct DeviceI3d {
    conv1a: DeviceUnit,
    conv2b: DeviceUnit,
    conv2c: DeviceUnit,
    mixed: Vec<(String, DeviceInception)>,
    logits: DeviceUnit,
    device: Device,
}

/// What [`DeviceI3d::forward`] returns per clip, as [`super::i3d::I3dOutput`] without endpoints.
#[derive(Debug, Clone)]
pub struct DeviceOutput {
    pub logits: Vec<f32>,
    pub pool: Vec<f32>,
}

impl DeviceI3d {
    /// The network's weights copied to `device`.
    pub fn new(net: &InceptionI3d, device: &Device) -> Result<Self> {
        let u = |u: &Unit| DeviceUnit::new(u, device).map_err(ce);
        Ok(Self {
            conv1a: u(&net.conv1a)?,
            conv2b: u(&net.conv2b)?,
            conv2c: u(&net.conv2c)?,
            mixed: net
                .mixed
                .iter()
                .map(|(n, m)| Ok((n.clone(), DeviceInception::new(m, device).map_err(ce)?)))
                .collect::<Result<_>>()?,
            logits: u(&net.logits)?,
            device: device.clone(),
        })
    }

    /// Clips `[t, 224, 224, 3]` (values in [-1, 1], all of the same length) through the
    /// network at once.
    pub fn forward(&self, clips: &[Act]) -> Result<Vec<DeviceOutput>> {
        let Some(first) = clips.first() else {
            return Ok(Vec::new());
        };
        let t = first.t;
        for c in clips {
            if c.c != 3 || c.h != INPUT_SIZE || c.w != INPUT_SIZE || c.t != t {
                return Err(Error::Data(format!(
                    "I3D input must be [t, 224, 224, 3] with one t for the batch; got {:?}",
                    c.dims()
                )));
            }
        }
        if t < MIN_FRAMES {
            return Err(Error::Data(format!(
                "I3D needs at least {MIN_FRAMES} frames (16 by the FVD convention); got {t}"
            )));
        }
        self.run(clips).map_err(ce)
    }

    fn run(&self, clips: &[Act]) -> candle_core::Result<Vec<DeviceOutput>> {
        let (b, t, s) = (clips.len(), clips[0].t, INPUT_SIZE);
        let data: Vec<f32> = clips.iter().flat_map(|c| c.data.iter().copied()).collect();
        // Channels-last clips to `[b, t, 3, h, w]`.
        let x = Tensor::from_vec(data, (b, t, s, s, 3), &self.device)?
            .permute((0, 1, 4, 2, 3))?
            .contiguous()?;
        let x = self.conv1a.forward(&x)?;
        let x = max_pool_same(&x, [1, 3, 3], [1, 2, 2])?;
        let x = self.conv2b.forward(&x)?;
        let x = self.conv2c.forward(&x)?;
        let mut x = max_pool_same(&x, [1, 3, 3], [1, 2, 2])?;
        for (name, m) in &self.mixed {
            if name == "Mixed_4b" {
                x = max_pool_same(&x, [3, 3, 3], [2, 2, 2])?;
            } else if name == "Mixed_5b" {
                x = max_pool_same(&x, [2, 2, 2], [2, 2, 2])?;
            }
            x = m.forward(&x)?;
        }
        // Average pool (2, 7, 7), stride 1, "VALID".
        let (b, t, c, h, w) = x.dims5()?;
        let (ho, wo) = (h + 1 - 7, w + 1 - 7);
        let sp = x
            .reshape((b * t, c, h, w))?
            .avg_pool2d_with_stride((7, 7), (1, 1))?
            .reshape((b, t, c, ho, wo))?;
        let pooled = ((sp.narrow(1, 0, t - 1)? + sp.narrow(1, 1, t - 1)?)? * 0.5)?;
        let pool = pooled
            .permute((0, 2, 1, 3, 4))?
            .flatten_from(2)?
            .mean(D::Minus1)?;
        let logits = self.logits.forward(&pooled)?;
        let logits = logits
            .permute((0, 2, 1, 3, 4))?
            .flatten_from(2)?
            .mean(D::Minus1)?;
        debug_assert_eq!(logits.dim(1)?, NUM_CLASSES);
        let logits = logits.to_device(&Device::Cpu)?.to_vec2::<f32>()?;
        let pool = pool.to_device(&Device::Cpu)?.to_vec2::<f32>()?;
        Ok(logits
            .into_iter()
            .zip(pool)
            .map(|(logits, pool)| DeviceOutput { logits, pool })
            .collect())
    }
}
