//! First-frame fidelity of image-to-video generations: PSNR and SSIM of a generated frame
//! against the conditioning image, on u8 RGB frames `[h, w, 3]`.
//!
//! SSIM is Wang et al. 2004 as `skimage.metrics.structural_similarity(a, b, channel_axis=-1,
//! data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)` computes it:
//! an 11-tap Gaussian window (sigma 1.5, truncated at 3.5 sigma) with `scipy.ndimage`'s
//! "reflect" borders, K1 = 0.01, K2 = 0.03, the mean over the map cropped by the window radius,
//! averaged over the three channels (fixture: `tools/fixtures/ssim_reference.py`).

/// PSNR in dB with pixels scaled to [0, 1]; identical frames give 120 dB (MSE floored at
/// 1e-12), so that means over clips stay finite.
pub fn psnr(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len(), "psnr: frame sizes differ");
    let mse = a
        .iter()
        .zip(b)
        .map(|(x, y)| ((*x as f64 - *y as f64) / 255.0).powi(2))
        .sum::<f64>()
        / a.len().max(1) as f64;
    -10.0 * mse.max(1e-12).log10()
}

const SIGMA: f64 = 1.5;
const TRUNCATE: f64 = 3.5;
const K1: f64 = 0.01;
const K2: f64 = 0.03;

/// Normalised taps of `scipy.ndimage.gaussian_filter` (radius `int(truncate sigma + 0.5)`).
pub fn gaussian_taps(sigma: f64, truncate: f64) -> Vec<f64> {
    let r = (truncate * sigma + 0.5) as i64;
    let w: Vec<f64> = (-r..=r)
        .map(|x| (-0.5 * (x * x) as f64 / (sigma * sigma)).exp())
        .collect();
    let s: f64 = w.iter().sum();
    w.into_iter().map(|v| v / s).collect()
}

/// `scipy.ndimage` "reflect" (half-sample symmetric) index into `0..n`.
fn reflect(mut i: i64, n: i64) -> usize {
    let period = 2 * n;
    i = i.rem_euclid(period);
    if i >= n {
        i = period - 1 - i;
    }
    i as usize
}

/// Separable filter of an `h x w` plane with symmetric `taps` and "reflect" borders.
pub fn filter(x: &[f64], h: usize, w: usize, taps: &[f64]) -> Vec<f64> {
    let r = (taps.len() / 2) as i64;
    let mut tmp = vec![0f64; h * w];
    for y in 0..h {
        for xx in 0..w {
            tmp[y * w + xx] = taps
                .iter()
                .enumerate()
                .map(|(k, t)| t * x[y * w + reflect(xx as i64 + k as i64 - r, w as i64)])
                .sum();
        }
    }
    let mut out = vec![0f64; h * w];
    for y in 0..h {
        for xx in 0..w {
            out[y * w + xx] = taps
                .iter()
                .enumerate()
                .map(|(k, t)| t * tmp[reflect(y as i64 + k as i64 - r, h as i64) * w + xx])
                .sum();
        }
    }
    out
}

/// Mean SSIM of two u8 RGB frames `[h, w, 3]` (both sides at least 11 pixels).
pub fn ssim(a: &[u8], b: &[u8], h: usize, w: usize) -> f64 {
    assert_eq!(a.len(), h * w * 3, "ssim: first frame size");
    assert_eq!(b.len(), h * w * 3, "ssim: second frame size");
    let taps = gaussian_taps(SIGMA, TRUNCATE);
    let pad = taps.len() / 2;
    assert!(
        h > 2 * pad && w > 2 * pad,
        "ssim needs frames larger than {}x{}",
        2 * pad,
        2 * pad
    );
    let (c1, c2) = ((K1 * 255.0).powi(2), (K2 * 255.0).powi(2));
    let mut total = 0.0;
    for c in 0..3 {
        let x: Vec<f64> = (0..h * w).map(|i| a[i * 3 + c] as f64).collect();
        let y: Vec<f64> = (0..h * w).map(|i| b[i * 3 + c] as f64).collect();
        let prod =
            |p: &[f64], q: &[f64]| -> Vec<f64> { p.iter().zip(q).map(|(u, v)| u * v).collect() };
        let ux = filter(&x, h, w, &taps);
        let uy = filter(&y, h, w, &taps);
        let uxx = filter(&prod(&x, &x), h, w, &taps);
        let uyy = filter(&prod(&y, &y), h, w, &taps);
        let uxy = filter(&prod(&x, &y), h, w, &taps);
        let mut sum = 0.0;
        for yy in pad..h - pad {
            for xx in pad..w - pad {
                let i = yy * w + xx;
                let (vx, vy, vxy) = (
                    uxx[i] - ux[i] * ux[i],
                    uyy[i] - uy[i] * uy[i],
                    uxy[i] - ux[i] * uy[i],
                );
                let num = (2.0 * ux[i] * uy[i] + c1) * (2.0 * vxy + c2);
                let den = (ux[i] * ux[i] + uy[i] * uy[i] + c1) * (vx + vy + c2);
                sum += num / den;
            }
        }
        total += sum / ((h - 2 * pad) * (w - 2 * pad)) as f64;
    }
    total / 3.0
}

/// High-frequency energy of a clip (u8 RGB `[t, h, w, 3]`, pixels scaled to [0, 1]): the mean
/// squared response of the 5-point Laplacian `4 x(y, x) - x(y-1, x) - x(y+1, x) - x(y, x-1) -
/// x(y, x+1)` over every frame, channel and interior pixel (no border rows or columns). Blur
/// lowers it, noise and sharp edges raise it; a report sets a method's value against the real
/// clips' (issue 14: does the adversarial term make frames sharper?).
pub fn laplacian_energy(clip: &[u8], frames: usize, h: usize, w: usize) -> f64 {
    assert_eq!(
        clip.len(),
        frames * h * w * 3,
        "laplacian_energy: clip size"
    );
    if h < 3 || w < 3 {
        return 0.0;
    }
    let px = |f: usize, y: usize, x: usize, c: usize| clip[((f * h + y) * w + x) * 3 + c] as f64;
    let mut sum = 0.0;
    for f in 0..frames {
        for y in 1..h - 1 {
            for x in 1..w - 1 {
                for c in 0..3 {
                    let l = 4.0 * px(f, y, x, c)
                        - px(f, y - 1, x, c)
                        - px(f, y + 1, x, c)
                        - px(f, y, x - 1, c)
                        - px(f, y, x + 1, c);
                    sum += (l / 255.0).powi(2);
                }
            }
        }
    }
    sum / (frames * (h - 2) * (w - 2) * 3).max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn laplacian_energy_of_flat_ramp_and_checkerboard() {
        let (t, h, w) = (2, 5, 6);
        // Flat and linear ramps have no second derivative.
        let flat = vec![77u8; t * h * w * 3];
        assert_eq!(laplacian_energy(&flat, t, h, w), 0.0);
        let mut ramp = vec![0u8; t * h * w * 3];
        for f in 0..t {
            for y in 0..h {
                for x in 0..w {
                    for c in 0..3 {
                        ramp[((f * h + y) * w + x) * 3 + c] = (10 * x + 20 * y) as u8;
                    }
                }
            }
        }
        assert_eq!(laplacian_energy(&ramp, t, h, w), 0.0);
        // A 0/255 checkerboard: every interior response is +-4 * 255, energy 16.
        let mut board = vec![0u8; t * h * w * 3];
        for f in 0..t {
            for y in 0..h {
                for x in 0..w {
                    let v = if (x + y) % 2 == 0 { 255 } else { 0 };
                    for c in 0..3 {
                        board[((f * h + y) * w + x) * 3 + c] = v;
                    }
                }
            }
        }
        assert!((laplacian_energy(&board, t, h, w) - 16.0).abs() < 1e-12);
        // Blurring the board (averaging with a shifted copy) lowers it.
        let blurred: Vec<u8> = board
            .iter()
            .enumerate()
            .map(|(i, v)| ((*v as u16 + board[(i + 3) % board.len()] as u16) / 2) as u8)
            .collect();
        assert!(laplacian_energy(&blurred, t, h, w) < 16.0);
    }

    #[test]
    fn identical_frames_score_the_ceiling() {
        let a: Vec<u8> = (0..16 * 16 * 3).map(|i| (i * 7 % 256) as u8).collect();
        assert!((ssim(&a, &a, 16, 16) - 1.0).abs() < 1e-12);
        assert_eq!(psnr(&a, &a), 120.0);
        let b: Vec<u8> = a.iter().map(|v| v.saturating_add(10)).collect();
        assert!(ssim(&a, &b, 16, 16) < 1.0);
        assert!(psnr(&a, &b) < 40.0);
    }

    #[test]
    fn reflect_matches_scipy_half_sample_symmetry() {
        // scipy "reflect": d c b a | a b c d | d c b a
        let n = 4;
        let got: Vec<usize> = (-5..9).map(|i| reflect(i, n)).collect();
        assert_eq!(got, vec![3, 3, 2, 1, 0, 0, 1, 2, 3, 3, 2, 1, 0, 0]);
    }
}
