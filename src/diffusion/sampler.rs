//! Samplers over a [`Denoiser`]: Euler (Karras et al. 2022 Algorithm 2 without its second
//! order correction, k-diffusion's `sample_euler`) and Heun (Algorithm 2 with S_churn = 0,
//! k-diffusion's `sample_heun`), over Karras sigmas, with SVD's classifier-free guidance whose
//! scale rises linearly across frames from `min_guidance` to `max_guidance`.
//!
//! For consistency students (whose denoiser maps any noisy point straight to its clean end):
//! `consistency` is 1-step (`steps = 1`) or multistep sampling (Song et al. 2023, Algorithm 1:
//! denoise, re-noise to the next Karras sigma with fresh noise, denoise again), and
//! `time_travel` is OSV's Time-Travel Sampler: one step at 2 evaluations, `f = D(x, sigma_max)`,
//! `eps_hat = (x - f) / sigma_max`, `x' = f + s (eps_0 + eps_hat) / 2` with fresh `eps_0` and
//! `s = travel_sigma`, output `D(x', s)`. Guidance applies to every evaluation (students are
//! normally sampled with `min_guidance = max_guidance = 1`, one evaluation each).

use super::denoiser::{Conditioning, Denoiser};
use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SamplerMethod {
    Euler,
    Heun,
    /// Consistency-model sampling: `steps` evaluations (1 = one step).
    Consistency,
    /// OSV's Time-Travel Sampler (2 evaluations).
    #[serde(rename = "time_travel")]
    TimeTravel,
}

/// A sampler configuration (the spec's `[stages.X.sampler]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplerConfig {
    /// euler or heun.
    pub method: SamplerMethod,
    /// Number of noise levels before sigma = 0 (SVD: 25).
    pub steps: usize,
    /// Smallest nonzero sigma (SVD: 0.002).
    pub sigma_min: f64,
    /// Starting sigma (SVD: 700).
    pub sigma_max: f64,
    /// Karras schedule exponent (7).
    pub rho: f64,
    /// Guidance scale at the first frame (SVD: 1.0).
    pub min_guidance: f64,
    /// Guidance scale at the last frame (SVD: 3.0).
    pub max_guidance: f64,
    /// Time-Travel Sampler: the sigma re-noised to after the first prediction (default 1.0,
    /// our choice: about the scale of the unit-variance latents; the paper gives no value).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub travel_sigma: Option<f64>,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            method: SamplerMethod::Euler,
            steps: 25,
            sigma_min: 0.002,
            sigma_max: 700.0,
            rho: 7.0,
            min_guidance: 1.0,
            max_guidance: 3.0,
            travel_sigma: None,
        }
    }
}

impl SamplerConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.steps == 0 {
            return Err("steps must be at least 1".into());
        }
        if !(self.sigma_min > 0.0 && self.sigma_max > self.sigma_min) {
            return Err(format!(
                "need 0 < sigma_min < sigma_max, got {} and {}",
                self.sigma_min, self.sigma_max
            ));
        }
        if self.rho <= 0.0 {
            return Err("rho must be positive".into());
        }
        if let Some(s) = self.travel_sigma {
            if !(s >= self.sigma_min && s < self.sigma_max) {
                return Err(format!(
                    "travel_sigma must be in [sigma_min, sigma_max), got {s}"
                ));
            }
        }
        Ok(())
    }

    /// Per-frame guidance scales, `linspace(min, max, frames)`.
    pub fn guidance(&self, frames: usize) -> Vec<f64> {
        if frames == 1 {
            return vec![self.min_guidance];
        }
        (0..frames)
            .map(|i| {
                self.min_guidance
                    + (self.max_guidance - self.min_guidance) * i as f64 / (frames - 1) as f64
            })
            .collect()
    }
}

/// Karras et al. (2022) eq. 5: `n` sigmas from sigma_max down to sigma_min, then 0 appended.
pub fn karras_sigmas(n: usize, sigma_min: f64, sigma_max: f64, rho: f64) -> Vec<f64> {
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    let mut s: Vec<f64> = (0..n)
        .map(|i| {
            let ramp = if n == 1 {
                0.0
            } else {
                i as f64 / (n - 1) as f64
            };
            (max_inv + ramp * (min_inv - max_inv)).powf(rho)
        })
        .collect();
    s.push(0.0);
    s
}

/// The noise levels at which the multistep consistency sampler (Song et al. 2023, Algorithm 1)
/// evaluates the model: the first `steps` points of [`karras_sigmas`]`(steps + 1)`, from
/// `sigma_max` down to, but not including, `sigma_min`, as LCM's scheduler spaces its
/// timesteps over the schedule without its end. Ending at `sigma_min` itself (the Karras
/// schedule of `steps` points) would spend the last step on re-noising with std
/// `sqrt(sigma_min^2 - sigma_min^2) = 0` and a model evaluation at the boundary, where a
/// consistency model is the identity: 2 steps gave exactly the 1-step sample.
pub fn consistency_sigmas(cfg: &SamplerConfig) -> Vec<f64> {
    let mut s = karras_sigmas(cfg.steps + 1, cfg.sigma_min, cfg.sigma_max, cfg.rho);
    s.truncate(cfg.steps);
    s
}

/// Counts denoiser evaluations (a guided evaluation of a batch counts two).
#[derive(Debug, Default, Clone, Copy)]
pub struct Nfe(pub usize);

/// Classifier-free guidance as a denoiser: `D_w = D_u + w_f (D_c - D_u)` with a per-frame
/// scale `w_f` (SVD's ramp, [`SamplerConfig::guidance`]); the unconditional branch is
/// [`Conditioning::unconditional`]. Both branches run as one batch of `2b`. With every scale
/// equal to 1 it is the inner denoiser itself, one conditional evaluation. The one guidance
/// implementation of the crate: the samplers and the distillation stages' teacher use it.
pub struct Guided<'a> {
    pub inner: &'a dyn Denoiser,
    /// One scale per frame.
    pub guidance: Vec<f64>,
}

impl Guided<'_> {
    /// Whether guidance is off (every scale 1): one evaluation instead of two.
    pub fn is_identity(&self) -> bool {
        self.guidance.iter().all(|&g| (g - 1.0).abs() < 1e-12)
    }

    /// Network evaluations per call, as the papers count NFE.
    pub fn evaluations(&self) -> usize {
        if self.is_identity() {
            1
        } else {
            2
        }
    }
}

impl Denoiser for Guided<'_> {
    fn denoise(&self, x: &Tensor, sigma: &Tensor, cond: &Conditioning) -> Result<Tensor> {
        if self.is_identity() {
            return self.inner.denoise(x, sigma, cond);
        }
        let (b, t, _, _, _) = x.dims5()?;
        if self.guidance.len() != t {
            candle_core::bail!("guidance has {} scales for {t} frames", self.guidance.len());
        }
        let both = cond.with_unconditional()?;
        let xx = Tensor::cat(&[x, x], 0)?;
        let ss = Tensor::cat(&[sigma, sigma], 0)?;
        let d = self.inner.denoise(&xx, &ss, &both)?;
        let du = d.narrow(0, 0, b)?;
        let dc = d.narrow(0, b, b)?;
        let w: Vec<f32> = self.guidance.iter().map(|&g| g as f32).collect();
        let w = Tensor::from_vec(w, (1, t, 1, 1, 1), x.device())?;
        du.broadcast_add(&(dc - &du)?.broadcast_mul(&w)?)
    }
}

/// `den` at one sigma for the whole batch, counting evaluations in `nfe`.
fn denoise_at(
    den: &Guided<'_>,
    x: &Tensor,
    sigma: f64,
    cond: &Conditioning,
    nfe: &mut Nfe,
) -> Result<Tensor> {
    nfe.0 += den.evaluations();
    let s = Tensor::full(sigma as f32, x.dim(0)?, x.device())?;
    den.denoise(x, &s, cond)
}

/// One Euler step of the probability-flow ODE `dx/dsigma = (x - D(x; sigma)) / sigma` from
/// `sigma` to `sigma_next` given the denoised `d` (Karras et al. 2022, Algorithm 1 line 5).
/// The sigmas are scalars or one per sample (`[b]`).
pub fn euler_update(x: &Tensor, d: &Tensor, sigma: &Tensor, sigma_next: &Tensor) -> Result<Tensor> {
    let b = x.dim(0)?;
    let shape = |s: &Tensor| -> Result<Tensor> {
        if s.rank() == 0 {
            Ok(s.clone())
        } else {
            s.reshape((b, 1, 1, 1, 1))
        }
    };
    let (s, sn) = (shape(sigma)?, shape(sigma_next)?);
    let deriv = (x - d)?.broadcast_div(&s)?;
    x + deriv.broadcast_mul(&(sn - &s)?)?
}

/// Euler steps of `den` from `sigmas[0]` through `sigmas[1..]`, one schedule per sample
/// (`sigmas[k]` is `[b]`), without gradient: the teacher's ODE solve of consistency
/// distillation (`m` steps down the training grid).
pub fn euler_solve(
    den: &dyn Denoiser,
    x: &Tensor,
    sigmas: &[Tensor],
    cond: &Conditioning,
) -> Result<Tensor> {
    let mut x = x.detach();
    for w in sigmas.windows(2) {
        let d = den.denoise(&x, &w[0], cond)?.detach();
        x = euler_update(&x, &d, &w[0], &w[1])?.detach();
    }
    Ok(x)
}

/// Samples from noise `noise` (standard normal, `[b, t, c, h, w]`): starts at
/// `x = noise * sigma_max` and integrates the probability-flow ODE down the Karras schedule
/// (Euler, Heun), or runs a consistency sampler. `fresh_noise` draws new standard normal noise
/// shaped like `noise` (the consistency samplers re-noise; the ODE samplers never call it).
/// Returns the sample and the number of denoiser evaluations.
pub fn sample(
    den: &dyn Denoiser,
    cond: &Conditioning,
    noise: &Tensor,
    cfg: &SamplerConfig,
    fresh_noise: &mut dyn FnMut() -> Result<Tensor>,
    mut on_step: impl FnMut(usize, usize),
) -> Result<(Tensor, usize)> {
    cfg.validate().map_err(candle_core::Error::Msg)?;
    let (_, t, _, _, _) = noise.dims5()?;
    let sigmas = karras_sigmas(cfg.steps, cfg.sigma_min, cfg.sigma_max, cfg.rho);
    let den = Guided {
        inner: den,
        guidance: cfg.guidance(t),
    };
    let mut nfe = Nfe::default();
    let mut x = (noise * sigmas[0])?;
    match cfg.method {
        SamplerMethod::Consistency => {
            // The first `steps` points of the Karras schedule of `steps + 1`: sigma_max down
            // to, but not including, sigma_min ([`consistency_sigmas`]).
            let sigmas = consistency_sigmas(cfg);
            let mut x0 = x.clone();
            for i in 0..cfg.steps {
                x0 = denoise_at(&den, &x, sigmas[i], cond, &mut nfe)?.detach();
                if i + 1 < cfg.steps {
                    let s = (sigmas[i + 1].powi(2) - cfg.sigma_min.powi(2))
                        .max(0.0)
                        .sqrt();
                    x = (&x0 + (fresh_noise()? * s)?)?;
                }
                on_step(i + 1, cfg.steps);
            }
            return Ok((x0, nfe.0));
        }
        SamplerMethod::TimeTravel => {
            let s0 = cfg.sigma_max;
            let s1 = cfg.travel_sigma.unwrap_or(1.0);
            let f = denoise_at(&den, &x, s0, cond, &mut nfe)?.detach();
            on_step(1, 2);
            let eps_hat = ((&x - &f)? / s0)?;
            let x1 = (&f + ((fresh_noise()? + eps_hat)? * (s1 / 2.0))?)?;
            let out = denoise_at(&den, &x1, s1, cond, &mut nfe)?.detach();
            on_step(2, 2);
            return Ok((out, nfe.0));
        }
        SamplerMethod::Euler | SamplerMethod::Heun => {}
    }
    for i in 0..cfg.steps {
        let (s, s_next) = (sigmas[i], sigmas[i + 1]);
        let d = denoise_at(&den, &x, s, cond, &mut nfe)?;
        let (st, snt) = (
            Tensor::new(s as f32, x.device())?,
            Tensor::new(s_next as f32, x.device())?,
        );
        let x_euler = euler_update(&x, &d, &st, &snt)?;
        x = match cfg.method {
            SamplerMethod::Heun if s_next > 0.0 => {
                // Heun's correction: the mean of the slopes at both ends.
                let d2 = denoise_at(&den, &x_euler, s_next, cond, &mut nfe)?;
                let deriv = ((&x - d)? / s)?;
                let deriv2 = ((&x_euler - d2)? / s_next)?;
                (&x + ((deriv + deriv2)? * ((s_next - s) / 2.0))?)?
            }
            _ => x_euler,
        }
        // The denoiser's parameters may be trainable variables: drop the graph of this step.
        .detach();
        on_step(i + 1, cfg.steps);
    }
    Ok((x, nfe.0))
}
