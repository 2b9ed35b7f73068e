//! Bootstrap confidence intervals for Fréchet distances (FVD, `motion_fd`) and for differences
//! between two methods scored on the same conditioning frames.
//!
//! Clips are resampled with replacement `resamples` times (seeded, so intervals are
//! reproducible) and the statistic is recomputed on each resample. Generated clip `i` was made
//! from real clip `i`'s first frame, so real and generated sets are resampled *jointly* (the
//! same indices for both: a paired bootstrap), and so are the sets of two methods compared on
//! the same frames.
//!
//! The interval is the bootstrap percentile interval *re-centred on the estimate*:
//! `[d - (q50 - q2.5), d + (q97.5 - q50)]` with `q` the quantiles of the resampled values.
//! Resampling with replacement repeats clips, and a Fréchet distance on fewer distinct clips is
//! biased upwards (the small-N bias of FVD), so the resampled values sit above the estimate;
//! their spread around their median, placed around the estimate, is the interval of an FVD
//! computed from N clips (FVD depends on N, which is why N is stated beside every value). The
//! plain percentile interval would carry the bias, and the basic interval `[2d - q97.5,
//! 2d - q2.5]` would estimate the distance at infinite N instead (measured on 64 + 64 film clips:
//! FVD 712, basic interval [368, 721]). Distances are clipped at 0.

use crate::error::Result;
use crate::metrics::frechet::{frechet_distance, Gaussian};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Resamples by default (200 gives the 2.5 % and 97.5 % quantiles from 5 draws each side;
/// raise it for final tables).
pub const DEFAULT_RESAMPLES: usize = 200;
/// Two-sided confidence level of every interval.
pub const LEVEL: f64 = 0.95;

/// A point estimate with its bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub value: f64,
    pub low: f64,
    pub high: f64,
}

impl Interval {
    /// A value without an interval (`resamples = 0`).
    pub fn point(value: f64) -> Self {
        Interval {
            value,
            low: f64::NAN,
            high: f64::NAN,
        }
    }

    pub fn has_interval(&self) -> bool {
        self.low.is_finite() && self.high.is_finite()
    }

    /// True when the interval lies entirely on one side of zero.
    pub fn excludes_zero(&self) -> bool {
        self.has_interval() && (self.low > 0.0 || self.high < 0.0)
    }

    /// `value [low, high]`, or the value alone.
    pub fn display(&self, decimals: usize) -> String {
        if self.has_interval() {
            format!(
                "{:.d$} [{:.d$}, {:.d$}]",
                self.value,
                self.low,
                self.high,
                d = decimals
            )
        } else {
            format!("{:.d$}", self.value, d = decimals)
        }
    }
}

/// Linear-interpolated quantile of sorted values.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let x = q * (sorted.len() - 1) as f64;
    let (i, f) = (x.floor() as usize, x - x.floor());
    if i + 1 < sorted.len() {
        sorted[i] * (1.0 - f) + sorted[i + 1] * f
    } else {
        sorted[i]
    }
}

/// Bootstrap interval around `value` (see the module notes) from `resamples` draws of the statistic on
/// resampled data (`draw` does the resampling with the given generator). `nonnegative` clips the
/// interval at 0 (for distances).
pub fn interval(
    value: f64,
    resamples: usize,
    seed: u64,
    nonnegative: bool,
    mut draw: impl FnMut(&mut ChaCha8Rng) -> Result<f64>,
) -> Result<Interval> {
    if resamples == 0 {
        return Ok(Interval::point(value));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let draws = (0..resamples)
        .map(|_| draw(&mut rng))
        .collect::<Result<Vec<f64>>>()?;
    Ok(from_draws(value, draws, nonnegative))
}

/// The interval around `value` from the statistic's values on the resamples (a point value
/// without any).
fn from_draws(value: f64, mut draws: Vec<f64>, nonnegative: bool) -> Interval {
    if draws.is_empty() {
        return Interval::point(value);
    }
    draws.sort_by(|a, b| a.total_cmp(b));
    let a = 1.0 - LEVEL;
    let (qlo, med, qhi) = (
        quantile(&draws, a / 2.0),
        quantile(&draws, 0.5),
        quantile(&draws, 1.0 - a / 2.0),
    );
    let (mut low, mut high) = (value - (med - qlo), value + (qhi - med));
    if nonnegative {
        low = low.max(0.0);
        high = high.max(0.0);
    }
    Interval { value, low, high }
}

/// `n` indices drawn from `0..n` with replacement.
fn resample(rng: &mut ChaCha8Rng, n: usize) -> Vec<usize> {
    (0..n).map(|_| rng.random_range(0..n)).collect()
}

/// Bootstrap interval of `stat` over index resamples of `0..n` (`stat` gets the indices;
/// the point estimate uses all of them in order).
pub fn bootstrap(
    n: usize,
    resamples: usize,
    seed: u64,
    nonnegative: bool,
    mut stat: impl FnMut(&[usize]) -> Result<f64>,
) -> Result<Interval> {
    let all: Vec<usize> = (0..n).collect();
    let value = stat(&all)?;
    let resamples = if n < 2 { 0 } else { resamples };
    interval(value, resamples, seed, nonnegative, |rng| {
        stat(&resample(rng, n))
    })
}

fn pick(rows: &[Vec<f32>], idx: &[usize]) -> Vec<Vec<f32>> {
    idx.iter().map(|&i| rows[i].clone()).collect()
}

fn distance(a: &[Vec<f32>], b: &[Vec<f32>], idx_a: &[usize], idx_b: &[usize]) -> Result<f64> {
    let ga = Gaussian::fit(&pick(a, idx_a), "first feature set")?;
    let gb = Gaussian::fit(&pick(b, idx_b), "second feature set")?;
    frechet_distance(&ga, &gb)
}

/// The Fréchet distance of a set to paired real rows, on all rows and on each index resample
/// that [`bootstrap`] draws for this seed. Every set scored against the same real rows with the
/// same seed sees the same resamples, so one set's draws serve its distance and every paired
/// difference it takes part in ([`PairedDraws::minus`]), each distance computed once.
#[derive(Debug, Clone, PartialEq)]
pub struct PairedDraws {
    pub value: f64,
    pub draws: Vec<f64>,
}

pub fn paired_draws(
    real: &[Vec<f32>],
    fake: &[Vec<f32>],
    resamples: usize,
    seed: u64,
) -> Result<PairedDraws> {
    assert_eq!(real.len(), fake.len(), "paired sets differ in length");
    let n = real.len();
    let all: Vec<usize> = (0..n).collect();
    let value = distance(real, fake, &all, &all)?;
    let resamples = if n < 2 { 0 } else { resamples };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let draws = (0..resamples)
        .map(|_| {
            let idx = resample(&mut rng, n);
            distance(real, fake, &idx, &idx)
        })
        .collect::<Result<Vec<f64>>>()?;
    Ok(PairedDraws { value, draws })
}

impl PairedDraws {
    /// The distance with its interval (clipped at 0).
    pub fn distance(&self) -> Interval {
        from_draws(self.value, self.draws.clone(), true)
    }

    /// `self - other` (both against the same real rows, same resamples) with its paired
    /// interval: negative means `self` is closer to the real rows.
    pub fn minus(&self, other: &PairedDraws) -> Interval {
        assert_eq!(self.draws.len(), other.draws.len(), "different resamples");
        let d = self
            .draws
            .iter()
            .zip(&other.draws)
            .map(|(a, b)| a - b)
            .collect();
        from_draws(self.value - other.value, d, false)
    }
}

/// Fréchet distance of paired feature sets (row `i` of `real` and of `fake` belong together)
/// with its interval.
pub fn paired_distance(
    real: &[Vec<f32>],
    fake: &[Vec<f32>],
    resamples: usize,
    seed: u64,
) -> Result<Interval> {
    Ok(paired_draws(real, fake, resamples, seed)?.distance())
}

/// Fréchet distance of two independent sets (the real-vs-real floor: two disjoint halves), each
/// resampled on its own.
pub fn unpaired_distance(
    a: &[Vec<f32>],
    b: &[Vec<f32>],
    resamples: usize,
    seed: u64,
) -> Result<Interval> {
    let (na, nb) = (a.len(), b.len());
    let (all_a, all_b): (Vec<usize>, Vec<usize>) = ((0..na).collect(), (0..nb).collect());
    let value = distance(a, b, &all_a, &all_b)?;
    let resamples = if na.min(nb) < 2 { 0 } else { resamples };
    interval(value, resamples, seed, true, |rng| {
        let (ia, ib) = (resample(rng, na), resample(rng, nb));
        distance(a, b, &ia, &ib)
    })
}

/// `d(real, a) - d(real, b)` for two methods generated from the same conditioning frames (row
/// `i` of all three sets belongs together), with its paired interval: negative means `a` is
/// closer to the real clips; an interval containing 0 means the two are not distinguishable
/// at this N.
pub fn paired_difference(
    real: &[Vec<f32>],
    a: &[Vec<f32>],
    b: &[Vec<f32>],
    resamples: usize,
    seed: u64,
) -> Result<Interval> {
    assert!(
        real.len() == a.len() && a.len() == b.len(),
        "paired sets differ in length"
    );
    let da = paired_draws(real, a, resamples, seed)?;
    Ok(da.minus(&paired_draws(real, b, resamples, seed)?))
}

/// `d(reference[ir], x[i]) - d(reference[ir], y[i])`.
fn difference(
    reference: &[Vec<f32>],
    x: &[Vec<f32>],
    y: &[Vec<f32>],
    ir: &[usize],
    i: &[usize],
) -> Result<f64> {
    let r = Gaussian::fit(&pick(reference, ir), "reference clips")?;
    let gx = Gaussian::fit(&pick(x, i), "first set")?;
    let gy = Gaussian::fit(&pick(y, i), "second set")?;
    Ok(frechet_distance(&r, &gx)? - frechet_distance(&r, &gy)?)
}

/// `d(reference, x) - d(reference, y)` where row `i` of `x` and of `y` belong together (a clip
/// and its degraded copy, or two methods' generations from the same frame) and `reference` is an
/// independent set: `reference` is resampled on its own, `x` and `y` jointly.
pub fn unpaired_difference(
    reference: &[Vec<f32>],
    x: &[Vec<f32>],
    y: &[Vec<f32>],
    resamples: usize,
    seed: u64,
) -> Result<Interval> {
    assert_eq!(x.len(), y.len(), "paired sets differ in length");
    let (nr, n) = (reference.len(), x.len());
    let stat = |ir: &[usize], i: &[usize]| difference(reference, x, y, ir, i);
    let value = stat(&(0..nr).collect::<Vec<_>>(), &(0..n).collect::<Vec<_>>())?;
    let resamples = if nr.min(n) < 2 { 0 } else { resamples };
    interval(value, resamples, seed, false, |rng| {
        stat(&resample(rng, nr), &resample(rng, n))
    })
}

/// Mean of per-clip values with its interval.
pub fn mean(values: &[f64], resamples: usize, seed: u64) -> Result<Interval> {
    bootstrap(values.len(), resamples, seed, false, |idx| {
        Ok(idx.iter().map(|&i| values[i]).sum::<f64>() / idx.len().max(1) as f64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaussian_rows(n: usize, dim: usize, shift: f32, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                (0..dim)
                    .map(|_| {
                        // Sum of uniforms: close enough to normal for these checks.
                        let u: f32 = (0..6).map(|_| rng.random::<f32>()).sum::<f32>() - 3.0;
                        u * 1.4 + shift
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn interval_brackets_the_value_and_is_reproducible() {
        let a = gaussian_rows(200, 4, 0.0, 1);
        let b = gaussian_rows(200, 4, 0.5, 2);
        let i = paired_distance(&a, &b, 100, 7).unwrap();
        assert!(i.low <= i.value && i.value <= i.high, "{i:?}");
        assert!(
            i.low > 0.0,
            "a shift of 0.5 in 4 dims is clearly nonzero: {i:?}"
        );
        assert_eq!(i, paired_distance(&a, &b, 100, 7).unwrap());
        assert!(!Interval::point(1.0).has_interval());
    }

    #[test]
    fn mean_interval_covers_the_true_mean_and_shrinks_with_n() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let small: Vec<f64> = (0..50).map(|_| rng.random::<f64>()).collect();
        let large: Vec<f64> = (0..2000).map(|_| rng.random::<f64>()).collect();
        let (s, l) = (mean(&small, 200, 1).unwrap(), mean(&large, 200, 1).unwrap());
        assert!(l.low < 0.5 && 0.5 < l.high, "{l:?}");
        assert!(l.high - l.low < (s.high - s.low) / 3.0, "{s:?} {l:?}");
    }

    #[test]
    fn shared_draws_give_the_direct_bootstrap_exactly() {
        let r = gaussian_rows(40, 3, 0.0, 1);
        let a = gaussian_rows(40, 3, 0.5, 2);
        let b = gaussian_rows(40, 3, 1.0, 3);
        // The per-statistic bootstrap, as the stages computed it before draws were shared.
        let direct = bootstrap(40, 30, 7, false, |idx| difference(&r, &a, &b, idx, idx)).unwrap();
        let (da, db) = (
            paired_draws(&r, &a, 30, 7).unwrap(),
            paired_draws(&r, &b, 30, 7).unwrap(),
        );
        let shared = da.minus(&db);
        assert_eq!(
            (shared.value, shared.low, shared.high),
            (direct.value, direct.low, direct.high)
        );
        let d = bootstrap(40, 30, 7, true, |idx| distance(&r, &a, idx, idx)).unwrap();
        let s = da.distance();
        assert_eq!((s.value, s.low, s.high), (d.value, d.low, d.high));
    }

    #[test]
    fn difference_of_identical_methods_is_zero_and_indistinguishable() {
        let r = gaussian_rows(100, 3, 0.0, 1);
        let a = gaussian_rows(100, 3, 0.2, 2);
        let d = paired_difference(&r, &a, &a, 50, 1).unwrap();
        assert_eq!((d.value, d.low, d.high), (0.0, 0.0, 0.0));
        assert!(!d.excludes_zero());
        let far = gaussian_rows(100, 3, 3.0, 3);
        let d = paired_difference(&r, &a, &far, 100, 1).unwrap();
        assert!(
            d.high < 0.0,
            "the near method must be distinguishable: {d:?}"
        );
        assert!(d.excludes_zero());
    }
}
