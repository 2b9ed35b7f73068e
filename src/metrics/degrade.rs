//! Degraded copies of real clip sets: the sanity checks an evaluation metric must pass
//! (`docs/evaluation.md`). Each keeps the clip count, frame count and size, so a degraded set
//! can stand in for a model's generations from the same conditioning frames.

use crate::data::ClipSet;
use crate::metrics::fidelity::{filter, gaussian_taps};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// What is done to every clip.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Degradation {
    /// Frames in a random order (a different permutation per clip, seeded).
    Shuffle { seed: u64 },
    /// Frames in reverse order.
    Reverse,
    /// Half speed: frame `k` of the output is frame `k / 2` of the input.
    HalfSpeed,
    /// The first frame repeated: the trivial image-to-video baseline.
    Static,
    /// Gaussian blur of every frame (`sigma` in pixels, "reflect" borders).
    Blur { sigma: f64 },
    /// Independent Gaussian noise on every pixel (`std` in [0, 1] pixel units, seeded).
    Noise { std: f64, seed: u64 },
}

impl Degradation {
    pub fn label(&self) -> String {
        match self {
            Degradation::Shuffle { .. } => "shuffled".into(),
            Degradation::Reverse => "reversed".into(),
            Degradation::HalfSpeed => "half speed".into(),
            Degradation::Static => "static".into(),
            Degradation::Blur { sigma } => format!("blurred (sigma {sigma} px)"),
            Degradation::Noise { std, .. } => format!("noisy (std {std})"),
        }
    }
}

fn reorder(clip: &[u8], order: &[usize], fl: usize) -> Vec<u8> {
    order
        .iter()
        .flat_map(|&k| clip[k * fl..(k + 1) * fl].iter().copied())
        .collect()
}

/// Gaussian blur of one u8 RGB frame (`scipy.ndimage.gaussian_filter` per channel, taps to
/// 4 sigma, "reflect" borders), rounded back to u8.
fn blur_frame(frame: &[u8], h: usize, w: usize, sigma: f64) -> Vec<u8> {
    let taps = gaussian_taps(sigma, 4.0);
    let mut out = vec![0u8; h * w * 3];
    for c in 0..3 {
        let plane: Vec<f64> = (0..h * w).map(|i| frame[i * 3 + c] as f64).collect();
        for (i, v) in filter(&plane, h, w, &taps).into_iter().enumerate() {
            out[i * 3 + c] = v.round().clamp(0.0, 255.0) as u8;
        }
    }
    out
}

/// The degraded copy of `set`.
pub fn degrade(set: &ClipSet, d: Degradation) -> ClipSet {
    let (t, h, w) = (set.frames, set.height, set.width);
    let fl = h * w * 3;
    let mut out = ClipSet::new(t, h, w);
    let seed = match d {
        Degradation::Shuffle { seed } | Degradation::Noise { seed, .. } => seed,
        _ => 0,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for i in 0..set.len() {
        let clip = set.clip(i);
        let new: Vec<u8> = match d {
            Degradation::Shuffle { .. } => {
                let mut order: Vec<usize> = (0..t).collect();
                order.shuffle(&mut rng);
                reorder(clip, &order, fl)
            }
            Degradation::Reverse => reorder(clip, &(0..t).rev().collect::<Vec<_>>(), fl),
            Degradation::HalfSpeed => reorder(clip, &(0..t).map(|k| k / 2).collect::<Vec<_>>(), fl),
            Degradation::Static => reorder(clip, &vec![0; t], fl),
            Degradation::Blur { sigma } => (0..t)
                .flat_map(|k| blur_frame(&clip[k * fl..(k + 1) * fl], h, w, sigma))
                .collect(),
            Degradation::Noise { std, .. } => clip
                .iter()
                .map(|&v| {
                    // Box-Muller normal deviate.
                    let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
                    let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                    (v as f64 + z * std * 255.0).round().clamp(0.0, 255.0) as u8
                })
                .collect(),
        };
        out.push(&new, set.source[i], set.start[i]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> ClipSet {
        let (t, h, w) = (4, 3, 2);
        let mut s = ClipSet::new(t, h, w);
        let clip: Vec<u8> = (0..t * h * w * 3)
            .map(|i| (i / (h * w * 3) * 10) as u8)
            .collect();
        s.push(&clip, 0, 0);
        s
    }

    #[test]
    fn frame_orders() {
        let s = set();
        let fl = 18;
        let first = |c: &ClipSet| -> Vec<u8> { (0..4).map(|k| c.clip(0)[k * fl]).collect() };
        assert_eq!(first(&s), vec![0, 10, 20, 30]);
        assert_eq!(
            first(&degrade(&s, Degradation::Reverse)),
            vec![30, 20, 10, 0]
        );
        assert_eq!(
            first(&degrade(&s, Degradation::HalfSpeed)),
            vec![0, 0, 10, 10]
        );
        assert_eq!(first(&degrade(&s, Degradation::Static)), vec![0, 0, 0, 0]);
        let mut sh = first(&degrade(&s, Degradation::Shuffle { seed: 1 }));
        sh.sort();
        assert_eq!(sh, vec![0, 10, 20, 30]);
    }

    #[test]
    fn blur_keeps_flat_frames_and_noise_has_its_std() {
        let s = set();
        assert_eq!(degrade(&s, Degradation::Blur { sigma: 1.5 }), s);
        let mut flat = ClipSet::new(1, 64, 64);
        flat.push(&vec![128u8; 64 * 64 * 3], 0, 0);
        let n = degrade(&flat, Degradation::Noise { std: 0.1, seed: 3 });
        let var = n
            .data
            .iter()
            .map(|&v| (v as f64 - 128.0).powi(2))
            .sum::<f64>()
            / n.data.len() as f64;
        assert!(
            (var.sqrt() / 255.0 - 0.1).abs() < 0.005,
            "{}",
            var.sqrt() / 255.0
        );
    }
}
