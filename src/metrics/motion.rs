//! Motion features: what a clip's frame differences look like across time lags and spatial
//! scales, for a Fréchet distance that sees temporal order and speed (`motion_fd`).
//!
//! FVD on I3D logits barely notices frames played shuffled, reversed or at half speed (see
//! `docs/evaluation.md`): the logits summarise *what* is in a clip. These features summarise
//! *how it changes*. For each lag `L` in [`LAGS`] (shorter than the clip) and each spatial
//! scale `1/s` in [`SCALES`] (box-averaged `s x s` blocks), the feature is
//! `ln(eps + mean |Y(t + L) - Y(t)|)` over all frame pairs and pixels, `Y` the Rec. 601 luma in
//! [0, 1] and `eps` = [`EPS`]. Real footage moves smoothly, so the differences grow with the lag;
//! shuffled frames differ about as much at lag 1 as at lag 8, a static clip not at all, half speed
//! halves them. The distance between Gaussians fitted to the real and generated features
//! (`motion_fd`) is scaled in squared log-units: 1 is a factor e in the typical frame
//! difference of one of the 12 lag-scale pairs.

/// Frame lags (only those shorter than the clip are used).
pub const LAGS: [usize; 4] = [1, 2, 4, 8];
/// Spatial downsampling factors.
pub const SCALES: [usize; 3] = [1, 2, 4];
/// Floor inside the logarithm: a difference of 1/1000 of the pixel range (a quarter of one
/// 8-bit level) counts as no motion.
pub const EPS: f64 = 1e-3;

/// The lags used for clips of `frames` frames.
pub fn lags(frames: usize) -> Vec<usize> {
    LAGS.iter().copied().filter(|&l| l < frames).collect()
}

/// Number of motion features of a clip of `frames` frames.
pub fn feature_len(frames: usize) -> usize {
    lags(frames).len() * SCALES.len()
}

/// Luma in [0, 1] of u8 RGB frames `[t, h, w, 3]`, box-downsampled by `s`
/// (`[t, h / s, w / s]`, the remainder rows and columns dropped).
fn luma(clip: &[u8], t: usize, h: usize, w: usize, s: usize) -> (Vec<f64>, usize, usize) {
    let (hs, ws) = (h / s, w / s);
    let mut out = vec![0f64; t * hs * ws];
    let norm = 1.0 / (255.0 * (s * s) as f64);
    for f in 0..t {
        for y in 0..hs * s {
            for x in 0..ws * s {
                let p = &clip[((f * h + y) * w + x) * 3..][..3];
                let v = 0.299 * p[0] as f64 + 0.587 * p[1] as f64 + 0.114 * p[2] as f64;
                out[(f * hs + y / s) * ws + x / s] += v * norm;
            }
        }
    }
    (out, hs, ws)
}

/// Motion features (lag-major, then scale) of one u8 clip `[t, h, w, 3]`.
pub fn motion_features(clip: &[u8], t: usize, h: usize, w: usize) -> Vec<f32> {
    assert_eq!(clip.len(), t * h * w * 3, "motion_features: clip size");
    let lags = lags(t);
    let mut out = vec![0f32; lags.len() * SCALES.len()];
    for (si, &s) in SCALES.iter().enumerate() {
        let (y, hs, ws) = luma(clip, t, h, w, s);
        let fl = hs * ws;
        for (li, &lag) in lags.iter().enumerate() {
            let mut sum = 0f64;
            for f in 0..t - lag {
                let (a, b) = (
                    &y[f * fl..(f + 1) * fl],
                    &y[(f + lag) * fl..(f + lag + 1) * fl],
                );
                sum += a.iter().zip(b).map(|(p, q)| (p - q).abs()).sum::<f64>();
            }
            let mean = sum / ((t - lag) * fl).max(1) as f64;
            out[li * SCALES.len() + si] = (EPS + mean).ln() as f32;
        }
    }
    out
}

/// Mean absolute luma difference between consecutive frames (lag 1, full resolution), the
/// plain "how much does it move" number shown beside `motion_fd`.
pub fn mean_motion(features: &[f32]) -> f64 {
    ((features[0] as f64).exp() - EPS).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clip(t: usize, h: usize, w: usize, f: impl Fn(usize, usize, usize) -> u8) -> Vec<u8> {
        let mut c = Vec::with_capacity(t * h * w * 3);
        for k in 0..t {
            for y in 0..h {
                for x in 0..w {
                    let v = f(k, y, x);
                    c.extend([v, v, v]);
                }
            }
        }
        c
    }

    #[test]
    fn static_clip_sits_at_the_floor_and_a_pan_grows_with_the_lag() {
        let (t, h, w) = (16, 16, 16);
        let still = clip(t, h, w, |_, y, x| (y * 16 + x) as u8);
        let f = motion_features(&still, t, h, w);
        assert_eq!(f.len(), feature_len(t));
        assert_eq!(f.len(), 12);
        for v in &f {
            assert!((*v as f64 - EPS.ln()).abs() < 1e-6);
        }
        assert!(mean_motion(&f).abs() < 1e-9);

        // A horizontal ramp moving one pixel per frame: |dY| = lag * 8 / 255 away from the
        // wrap-around column.
        let pan = clip(t, h, w, |k, _, x| (((x + k) % 16) * 8) as u8);
        let f = motion_features(&pan, t, h, w);
        for s in 0..SCALES.len() {
            for l in 1..lags(t).len() {
                assert!(
                    f[l * 3 + s] > f[(l - 1) * 3 + s],
                    "lag {l} scale {s}: {f:?}"
                );
            }
        }
        // Lag 1, full resolution: 15 of 16 columns move by 8 levels, one wraps by 120.
        let want = (15.0 * 8.0 + 120.0) / 16.0 / 255.0;
        assert!((mean_motion(&f) - want).abs() < 1e-6, "{}", mean_motion(&f));
    }

    #[test]
    fn shuffling_frames_breaks_the_growth_with_lag() {
        let (t, h, w) = (16, 8, 8);
        let pan = clip(t, h, w, |k, y, x| ((x * 4 + y * 2 + k * 3) % 256) as u8);
        let order = [0, 9, 3, 14, 6, 11, 1, 15, 4, 8, 2, 13, 7, 10, 5, 12];
        let fl = h * w * 3;
        let shuffled: Vec<u8> = order
            .iter()
            .flat_map(|&k| pan[k * fl..(k + 1) * fl].to_vec())
            .collect();
        let (a, b) = (
            motion_features(&pan, t, h, w),
            motion_features(&shuffled, t, h, w),
        );
        // Lag 8 vs lag 1 at full resolution: differences grow with the lag for smooth motion
        // (8x here), and no longer do once the frames are shuffled.
        assert!(a[9] - a[0] > 1.5, "{a:?}");
        assert!(b[9] - b[0] < 0.5, "{b:?}");
    }

    #[test]
    fn short_clips_use_only_shorter_lags() {
        assert_eq!(lags(8), vec![1, 2, 4]);
        assert_eq!(feature_len(2), 3);
    }
}
