//! EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
//! Models", arXiv 2206.00364) in the v-prediction form Stable Video Diffusion uses
//! (sigma_data = 1): `D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)` with
//! c_skip = 1/(sigma^2+1), c_out = -sigma/sqrt(sigma^2+1), c_in = 1/sqrt(sigma^2+1),
//! c_noise = 0.25 ln(sigma). Training draws ln(sigma) ~ N(P_mean, P_std^2) and weights the
//! squared error by lambda(sigma) = (sigma^2+1)/sigma^2 (EDM Table 1 with sigma_data = 1).

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

/// The four preconditioning coefficients at one noise level.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scalings {
    pub c_skip: f64,
    pub c_out: f64,
    pub c_in: f64,
    pub c_noise: f64,
}

impl Scalings {
    /// SVD's v-prediction scalings (sigma_data = 1).
    pub fn svd(sigma: f64) -> Self {
        let s2 = sigma * sigma + 1.0;
        Self {
            c_skip: 1.0 / s2,
            c_out: -sigma / s2.sqrt(),
            c_in: 1.0 / s2.sqrt(),
            c_noise: 0.25 * sigma.ln(),
        }
    }
}

/// Per-sample scalings as tensors broadcastable against `[b, t, c, h, w]`.
pub fn scaling_tensors(sigma: &Tensor) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let s2 = (sigma.sqr()? + 1.0)?;
    let c_skip = s2.recip()?;
    let c_out = (sigma.neg()? / s2.sqrt()?)?;
    let c_in = s2.sqrt()?.recip()?;
    let c_noise = (sigma.log()? * 0.25)?;
    let b = sigma.dim(0)?;
    let r = |t: Tensor| t.reshape((b, 1, 1, 1, 1));
    Ok((r(c_skip)?, r(c_out)?, r(c_in)?, c_noise))
}

/// The EDM training objective: noise-level distribution and loss weighting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EdmLoss {
    /// Mean of ln(sigma) during training (SVD's video training config uses 0.7).
    pub p_mean: f64,
    /// Standard deviation of ln(sigma) (SVD: 1.6).
    pub p_std: f64,
}

impl Default for EdmLoss {
    fn default() -> Self {
        Self {
            p_mean: 0.7,
            p_std: 1.6,
        }
    }
}

impl EdmLoss {
    /// sigma = exp(P_mean + P_std n) for standard normal draws `n`.
    pub fn sigma_from_normal(&self, n: f64) -> f64 {
        (self.p_mean + self.p_std * n).exp()
    }

    /// lambda(sigma) = (sigma^2 + 1) / sigma^2.
    pub fn weight(sigma: f64) -> f64 {
        (sigma * sigma + 1.0) / (sigma * sigma)
    }

    /// Mean over the batch of lambda(sigma) * mean squared error per sample.
    /// # Shapes
    /// `denoised`, `target`: `[b, ...]`; `sigma`: `[b]` -> scalar
    pub fn loss(&self, denoised: &Tensor, target: &Tensor, sigma: &Tensor) -> Result<Tensor> {
        let err = (denoised - target)?.sqr()?.flatten_from(1)?.mean(1)?;
        let s2 = sigma.sqr()?;
        let w = ((&s2 + 1.0)? / s2)?;
        (err * w)?.mean_all()
    }
}
