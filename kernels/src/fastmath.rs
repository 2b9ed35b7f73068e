//! `exp` and `erf` for f32 as branch-free polynomials, so that loops over them vectorise (a
//! call into libm's scalar `expf`/`erff` per element does not). The same approach as PyTorch's
//! `Vectorized<float>` (`exp`: Cephes' `expf` polynomial; `erf`: Abramowitz & Stegun 7.1.26).
//!
//! Accuracy, checked over the ranges that matter in `src/models/fused.rs`'s tests against
//! Rust's `f32::exp` and candle's `erf`: `exp` within 3 ulp on `[-86, 88.7]` (below -86 it
//! returns 0 instead of a value under 5e-38, above 88.72 it returns +inf, NaN stays NaN);
//! `erf` within 7e-7 absolute (the formula is 1.5e-7 in exact arithmetic; f32 rounding
//! near 1 - poly e^(-x^2) adds the rest).

/// `e^x` (see the module's accuracy note).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // Below LO the result would be under 4.5e-38 (near f32's smallest normal); above HI it
    // overflows. `clamp` keeps NaN and comparisons with it are false: NaN flows through.
    const LO: f32 = -86.0;
    const HI: f32 = 88.72;
    let xc = x.clamp(LO, HI);
    // n = round(x / ln 2) by adding 1.5 * 2^23 (round to nearest, no libm call); the integer
    // sits in the low mantissa bits of `t`.
    const SHIFTER: f32 = 12_582_912.0;
    let t = xc * std::f32::consts::LOG2_E + SHIFTER;
    let n = t - SHIFTER;
    // r = x - n ln 2 in two parts (the first exact in f32), |r| <= ln 2 / 2.
    let r = xc - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = (((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
        * r
        + 1.666_666_5e-1)
        * r
        + 0.5)
        * r
        * r
        + r
        + 1.0;
    // 2^n as 2^(n - 1) * 2, so that n = 128 (x near HI) still has a finite exponent field.
    let n_int = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let half_scale = f32::from_bits((n_int.wrapping_add(126) << 23) as u32);
    let y = p * half_scale * 2.0;
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        y
    }
}

/// `erf(x)` and `e^(-x^2)` (which `erf`'s formula needs and the Gaussian density reuses).
#[inline(always)]
pub fn erf_with_gauss(x: f32) -> (f32, f32) {
    const P: f32 = 0.327_591_1;
    const A1: f32 = 0.254_829_6;
    const A2: f32 = -0.284_496_74;
    const A3: f32 = 1.421_413_7;
    const A4: f32 = -1.453_152;
    const A5: f32 = 1.061_405_4;
    let ax = x.abs();
    let t = 1.0 / (1.0 + P * ax);
    let gauss = exp(-x * x);
    let poly = ((((A5 * t + A4) * t + A3) * t + A2) * t + A1) * t;
    let y = 1.0 - poly * gauss;
    (if x < 0.0 { -y } else { y }, gauss)
}

/// `erf(x)`, within 7e-7 absolute.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    erf_with_gauss(x).0
}

/// `(gelu(g), gelu'(g))` of the exact GELU `g Phi(g)`: `Phi(g) = (1 + erf(g / sqrt 2)) / 2`,
/// `gelu'(g) = Phi(g) + g phi(g)` with the density `phi(g) = e^(-g^2 / 2) / sqrt(2 pi)`, whose
/// exponential is the one `erf` computed.
#[inline(always)]
pub fn gelu_and_slope(g: f32) -> (f32, f32) {
    let (e, gauss) = erf_with_gauss(g * std::f32::consts::FRAC_1_SQRT_2);
    let cdf = 0.5 * (1.0 + e);
    let pdf = gauss * 0.398_942_3; // 1 / sqrt(2 pi)
    (g * cdf, cdf + g * pdf)
}
