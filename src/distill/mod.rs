//! What the distillation stages (`consistency`, `gan`) share: the discrete sigma grid they
//! draw training pairs from, the teacher's ODE solve between the two points of a pair, the
//! EMA target update, batches of latent clips with the teacher's conditioning, and the export
//! of a trained student as a pipeline folder.
//!
//! Consistency distillation (Song et al. 2023, Algorithm 2; AnimateLCM's `train_svd_lcm.py`):
//! per sample, an index `n` uniform in `0..N-m` on an ascending Karras grid of `N` sigmas; the
//! noisy point `x_{n+m} = x0 + t_{n+m} z`; the frozen teacher's `m` guided Euler steps from
//! `t_{n+m}` down to `t_n` ([`teacher_solve`]); the target `f_ema(x^phi_n, t_n)`; the loss
//! `lambda(t_n) d(f(x_{n+m}, t_{n+m}), target)`. Each stage keeps its own training loop, which
//! reads like its algorithm box; this module holds the pieces those loops call.

use crate::diffusion::noise::NormalRng;
use crate::diffusion::sampler::{euler_solve, Guided};
use crate::diffusion::{karras_sigmas, Conditioning, Denoiser, SamplerConfig, SamplerMethod};
use crate::error::{Error, Result};
use crate::models::checkpoint::{load_weights, WEIGHTS_FILE};
use crate::models::{UNetConfig, UNetSpatioTemporal};
use crate::pipeline::{PipelineSettings, VideoPipeline};
use crate::train::lora::Student;
use crate::train::{ce, clip_batch, random_windows};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// The training grid of the distillation stages (the spec's `grid` table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GridConfig {
    /// Points of the discrete Karras grid, N (the paper samples from 100).
    pub points: usize,
    /// Teacher ODE steps between the two points of a pair, m (paper: 5 best, 1 in its
    /// ablation). Latent GAN pretraining has no teacher and ignores it.
    pub solver_steps: usize,
    /// The grid's smallest sigma (EDM's 0.002).
    pub sigma_min: f64,
    /// The grid's largest sigma (SVD's 700).
    pub sigma_max: f64,
    /// Karras schedule exponent (7).
    pub rho: f64,
}

impl Default for GridConfig {
    fn default() -> Self {
        Self {
            points: 100,
            solver_steps: 5,
            sigma_min: 0.002,
            sigma_max: 700.0,
            rho: 7.0,
        }
    }
}

/// A parameter error: the key under the stage's table and what is wrong with it.
pub type KeyError = (String, String);

impl GridConfig {
    /// Checks the grid; `with_solver` when a teacher solves between the pair's points.
    pub fn check(&self, with_solver: bool) -> std::result::Result<(), KeyError> {
        let bad = |k: &str, m: String| Err((format!("grid.{k}"), m));
        if self.points < 2 {
            return bad("points", "needs at least 2 points".into());
        }
        if with_solver && (self.solver_steps == 0 || self.solver_steps >= self.points) {
            return bad(
                "solver_steps",
                format!(
                    "must be in 1..{} (the grid has {} points)",
                    self.points, self.points
                ),
            );
        }
        if !(self.sigma_min > 0.0 && self.sigma_max > self.sigma_min && self.sigma_max.is_finite())
        {
            return bad(
                "sigma_min",
                format!(
                    "need 0 < sigma_min < sigma_max, got {} and {}",
                    self.sigma_min, self.sigma_max
                ),
            );
        }
        if !(self.rho > 0.0) {
            return bad("rho", format!("must be positive, got {}", self.rho));
        }
        Ok(())
    }

    /// Ascending Karras grid `sigma_min .. sigma_max` of `points` points.
    pub fn sigmas(&self) -> Vec<f64> {
        let mut g = karras_sigmas(self.points, self.sigma_min, self.sigma_max, self.rho);
        g.pop();
        g.reverse();
        g
    }
}

/// The keys the grid table replaced (onestep before the `grid` table): an error that names the
/// new key for each, so an old spec fails with a pointer instead of "unknown field".
pub fn moved_grid_keys(params: &toml::Value) -> std::result::Result<(), KeyError> {
    let Some(t) = params.as_table() else {
        return Ok(());
    };
    if let Some(g) = t.get("grid").filter(|g| !g.is_table()) {
        return Err((
            "grid".into(),
            format!("`grid = {g}` is now the table `grid`: write `grid.points = {g}`"),
        ));
    }
    for k in ["solver_steps", "sigma_min", "sigma_max", "rho"] {
        if t.contains_key(k) {
            return Err((
                k.into(),
                format!("moved into the grid table: write `grid.{k}`"),
            ));
        }
    }
    Ok(())
}

/// Checks shared by both stages' loss settings.
pub fn check_loss(
    huber_c: f64,
    ema_decay: f64,
    batch_clips: usize,
) -> std::result::Result<(), KeyError> {
    if !(huber_c > 0.0) {
        return Err(("huber_c".into(), format!("must be positive, got {huber_c}")));
    }
    if !(0.0..1.0).contains(&ema_decay) {
        return Err((
            "ema_decay".into(),
            format!("must be in [0, 1), got {ema_decay}"),
        ));
    }
    if batch_clips == 0 {
        return Err(("batch_clips".into(), "must be at least 1".into()));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Weighting {
    /// iCT: `1 / (t_{n+m} - t_n)`, normalised to mean 1 over the grid.
    Ict,
    Uniform,
}

/// The ascending sigma grid with the pair spacing `m` that both distillation stages draw from:
/// per sample an index `n` in `0..len - m`, the pair `(grid[n], grid[n + m])`.
pub struct PairGrid {
    pub sigmas: Vec<f64>,
    pub m: usize,
    /// Mean of `1 / (grid[n + m] - grid[n])`, iCT's weighting normaliser (1 when `m = 0`).
    mean_inv_gap: f64,
}

impl PairGrid {
    pub fn new(sigmas: Vec<f64>, m: usize) -> Self {
        let top = sigmas.len() - m;
        let mean_inv_gap = if m == 0 {
            1.0
        } else {
            (0..top)
                .map(|n| 1.0 / (sigmas[n + m] - sigmas[n]))
                .sum::<f64>()
                / top as f64
        };
        Self {
            sigmas,
            m,
            mean_inv_gap,
        }
    }

    /// One index per sample, uniform over `0..len - m`.
    pub fn draw(&self, rng: &mut NormalRng, b: usize) -> Vec<usize> {
        let top = self.sigmas.len() - self.m;
        (0..b)
            .map(|_| ((rng.uniform() * top as f64) as usize).min(top - 1))
            .collect()
    }

    /// `grid[n + k]` per sample, `[b]`.
    pub fn at(&self, ns: &[usize], k: usize, dev: &Device) -> candle_core::Result<Tensor> {
        let v: Vec<f32> = ns.iter().map(|&n| self.sigmas[n + k] as f32).collect();
        Tensor::from_vec(v, ns.len(), dev)
    }

    /// `lambda(t_n)` per sample, `[b]`.
    pub fn lambda(
        &self,
        ns: &[usize],
        weighting: Weighting,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let m = self.m;
        let v: Vec<f32> = ns
            .iter()
            .map(|&n| match weighting {
                Weighting::Ict => {
                    (1.0 / (self.sigmas[n + m] - self.sigmas[n]) / self.mean_inv_gap) as f32
                }
                Weighting::Uniform => 1.0,
            })
            .collect();
        Tensor::from_vec(v, ns.len(), dev)
    }
}

/// The teacher's `m` guided Euler steps of the probability-flow ODE from `grid[n + m]` down to
/// `grid[n]` (one `n` per sample), without gradient: the sampler's Euler step
/// ([`euler_solve`]) over the guidance wrapper ([`Guided`]).
pub fn teacher_solve(
    teacher: &dyn Denoiser,
    x_hi: &Tensor,
    ns: &[usize],
    grid: &PairGrid,
    cond: &Conditioning,
    guidance: &[f64],
) -> candle_core::Result<Tensor> {
    let guided = Guided {
        inner: teacher,
        guidance: guidance.to_vec(),
    };
    let dev = x_hi.device();
    let schedule = (0..=grid.m)
        .rev()
        .map(|k| grid.at(ns, k, dev))
        .collect::<candle_core::Result<Vec<_>>>()?;
    euler_solve(&guided, x_hi, &schedule, cond)
}

/// One training batch: clean latent windows `[b, t, c, h, w]` and the teacher's conditioning of
/// their first frames (the model's noise augmentation, fps and motion bucket).
pub struct Batch {
    pub x0: Tensor,
    pub cond: Conditioning,
}

/// Where a batch comes from: the clip set, its latents, the window length and the fps.
pub struct BatchSource<'a> {
    pub set: &'a crate::data::ClipSet,
    /// Each clip's latents `[t, c, h, w]` (posterior means x scaling factor).
    pub latents: &'a [Tensor],
    pub frames: usize,
    pub fps: f64,
}

impl BatchSource<'_> {
    /// `b` random windows and the conditioning `pipe` gives their first frames.
    pub fn draw(
        &self,
        rng: &mut NormalRng,
        pipe: &VideoPipeline,
        b: usize,
        dev: &Device,
    ) -> candle_core::Result<Batch> {
        let (set, frames) = (self.set, self.frames);
        let (idx, starts) = random_windows(rng, set.len(), set.frames, frames, b);
        let x0 = Tensor::stack(
            &idx.iter()
                .zip(&starts)
                .map(|(&i, &st)| self.latents[i].narrow(0, st, frames))
                .collect::<candle_core::Result<Vec<_>>>()?,
            0,
        )?;
        let (h, w) = (set.height, set.width);
        let first = clip_batch(set, &idx, &starts, 1, dev)?.reshape((b, 3, h, w))?;
        let aug = rng.tensor(&[b, 3, h, w], dev)?;
        let s = &pipe.settings;
        let cond = pipe.conditioning(
            &first,
            &aug,
            s.noise_aug_strength,
            self.fps,
            s.motion_bucket_id,
        )?;
        Ok(Batch { x0, cond })
    }
}

/// `target <- decay target + (1 - decay) student`, by name.
pub fn ema_update(
    target: &HashMap<String, Var>,
    student: &HashMap<String, Tensor>,
    decay: f64,
) -> candle_core::Result<()> {
    for (n, t) in target {
        let s = student
            .get(n)
            .ok_or_else(|| candle_core::Error::Msg(format!("EMA: student lacks `{n}`")))?;
        let upd = ((t.as_tensor() * decay)? + (s * (1.0 - decay))?)?;
        t.set(&upd.detach())?;
    }
    Ok(())
}

/// A UNet with its own variables, initialised from a model folder's weights (the EMA target).
pub fn unet_from(
    dir: &Path,
    cfg: &UNetConfig,
    dev: &Device,
) -> Result<(VarMap, UNetSpatioTemporal)> {
    let vm = VarMap::new();
    let unet = UNetSpatioTemporal::new(VarBuilder::from_varmap(&vm, DType::F32, dev), cfg)
        .map_err(ce("student UNet"))?;
    load_weights(&vm, &dir.join("unet").join(WEIGHTS_FILE))?;
    Ok((vm, unet))
}

/// The student samplers' defaults: 1-step consistency sampling without guidance.
pub fn student_sampler_default() -> SamplerConfig {
    SamplerConfig {
        method: SamplerMethod::Consistency,
        steps: 1,
        min_guidance: 1.0,
        max_guidance: 1.0,
        ..Default::default()
    }
}

/// Deserialize a (possibly partial) sampler table over [`student_sampler_default`], so that
/// `sampler.method = "time_travel"` alone does not inherit the teacher's 25 steps and CFG.
pub fn student_sampler<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<SamplerConfig, D::Error> {
    use serde::de::Error as _;
    let given = toml::Value::deserialize(d)?;
    let mut base = toml::Value::try_from(student_sampler_default()).map_err(D::Error::custom)?;
    match (&mut base, given) {
        (toml::Value::Table(b), toml::Value::Table(g)) => {
            for (k, v) in g {
                b.insert(k, v);
            }
        }
        (_, other) => {
            return Err(D::Error::custom(format!(
                "sampler must be a table, got {other}"
            )))
        }
    }
    base.try_into().map_err(D::Error::custom)
}

/// Export a trained student as a pipeline folder `out`: its (merged) UNet, the frozen VAE and
/// image encoder of the folder it started from, and `settings` (`onestep.json`).
pub fn export_student(
    out: &Path,
    student: &Student,
    unet_cfg: &UNetConfig,
    from: &Path,
    settings: &PipelineSettings,
) -> Result<()> {
    student.export(&out.join("unet"), unet_cfg)?;
    crate::models::checkpoint::copy_frozen_components(from, out)?;
    settings.save(out)
}

/// The loss weights of a batch when there is no teacher pair (LGP): all ones.
pub fn unit_weights(b: usize, dev: &Device) -> Result<Tensor> {
    Tensor::ones(b, DType::F32, dev).map_err(|e| Error::candle("loss weights", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_ascends_from_sigma_min_to_sigma_max() {
        let g = GridConfig::default().sigmas();
        assert_eq!(g.len(), 100);
        assert!((g[0] - 0.002).abs() < 1e-12 && (g[99] - 700.0).abs() < 1e-9);
        assert!(g.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn grid_checks_name_the_key() {
        let ok = GridConfig::default();
        assert!(ok.check(true).is_ok());
        let cases = [
            (
                GridConfig {
                    points: 1,
                    ..ok.clone()
                },
                true,
                "grid.points",
            ),
            (
                GridConfig {
                    solver_steps: 0,
                    ..ok.clone()
                },
                true,
                "grid.solver_steps",
            ),
            (
                GridConfig {
                    solver_steps: 100,
                    ..ok.clone()
                },
                true,
                "grid.solver_steps",
            ),
            (
                GridConfig {
                    sigma_min: 0.0,
                    ..ok.clone()
                },
                false,
                "grid.sigma_min",
            ),
            (
                GridConfig {
                    sigma_max: 0.001,
                    ..ok.clone()
                },
                false,
                "grid.sigma_min",
            ),
            (
                GridConfig {
                    rho: -1.0,
                    ..ok.clone()
                },
                false,
                "grid.rho",
            ),
        ];
        for (g, solver, key) in cases {
            assert_eq!(g.check(solver).unwrap_err().0, key, "{g:?}");
        }
        // LGP has no teacher solve: any m passes.
        assert!(GridConfig {
            solver_steps: 0,
            ..ok
        }
        .check(false)
        .is_ok());
        assert_eq!(check_loss(-1.0, 0.9, 1).unwrap_err().0, "huber_c");
        assert_eq!(check_loss(0.001, 1.0, 1).unwrap_err().0, "ema_decay");
        assert_eq!(check_loss(0.001, 0.9, 0).unwrap_err().0, "batch_clips");
    }

    #[test]
    fn old_grid_keys_name_their_new_place() {
        let v: toml::Value = toml::from_str("grid = 10").unwrap();
        let e = moved_grid_keys(&v).unwrap_err();
        assert!(e.0 == "grid" && e.1.contains("grid.points = 10"), "{e:?}");
        let v: toml::Value = toml::from_str("sigma_min = 0.01").unwrap();
        assert!(moved_grid_keys(&v)
            .unwrap_err()
            .1
            .contains("grid.sigma_min"));
        let v: toml::Value = toml::from_str("grid.points = 10\nsampler.sigma_min = 1.0").unwrap();
        assert!(moved_grid_keys(&v).is_ok());
    }

    #[test]
    fn pair_weights_have_mean_one_and_fall_with_the_gap() {
        let grid = PairGrid::new(GridConfig::default().sigmas(), 5);
        let ns: Vec<usize> = (0..95).collect();
        let l = grid
            .lambda(&ns, Weighting::Ict, &Device::Cpu)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mean = l.iter().map(|&x| x as f64).sum::<f64>() / l.len() as f64;
        assert!((mean - 1.0).abs() < 1e-5, "{mean}");
        assert!(l.windows(2).all(|w| w[0] > w[1]), "gaps grow with sigma");
        let mut rng = NormalRng::new(3);
        assert!(grid.draw(&mut rng, 1000).iter().all(|&n| n < 95));
    }

    /// A denoiser with a closed form: `D(x, sigma) = x / (1 + sigma^2)` (the posterior mean
    /// of a unit Gaussian), and on the unconditional branch (zero image latent) `D = 0`.
    struct Gaussian;
    impl Denoiser for Gaussian {
        fn denoise(
            &self,
            x: &Tensor,
            sigma: &Tensor,
            cond: &Conditioning,
        ) -> candle_core::Result<Tensor> {
            let b = x.dim(0)?;
            let s2 = (sigma.sqr()? + 1.0)?.reshape((b, 1, 1, 1, 1))?;
            let on = cond
                .image_latents
                .abs()?
                .flatten_from(1)?
                .max(1)?
                .reshape((b, 1, 1, 1, 1))?;
            x.broadcast_div(&s2)?.broadcast_mul(&on)
        }
    }

    #[test]
    fn teacher_solve_is_the_euler_step_with_guidance() {
        let dev = Device::Cpu;
        let grid = PairGrid::new(vec![0.5, 1.0, 2.0, 4.0], 2);
        let x = Tensor::new(&[1f32, -2.0, 3.0, 0.5], &dev)
            .unwrap()
            .reshape((2, 2, 1, 1, 1))
            .unwrap();
        let cond = Conditioning {
            image_latents: Tensor::ones((2, 1, 1, 1, 1), DType::F32, &dev).unwrap(),
            image_embeds: Tensor::zeros((2, 1, 1), DType::F32, &dev).unwrap(),
            added_time_ids: Tensor::zeros((2, 3), DType::F32, &dev).unwrap(),
        };
        // Guidance w per frame: D_w = D_u + w (D_c - D_u) = w x / (1 + s^2).
        let guidance = [1.0, 3.0];
        let ns = [0usize, 1];
        let got = teacher_solve(&Gaussian, &x, &ns, &grid, &cond, &guidance)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let xs = [[1.0, -2.0], [3.0, 0.5]];
        for (i, &n) in ns.iter().enumerate() {
            for (f, &w) in guidance.iter().enumerate() {
                let mut v = xs[i][f] as f64;
                for k in (0..2).rev() {
                    let (s, sn) = (grid.sigmas[n + k + 1], grid.sigmas[n + k]);
                    let d = w * v / (1.0 + s * s);
                    v += (v - d) / s * (sn - s);
                }
                let g = got[i * 2 + f] as f64;
                assert!(
                    (g - v).abs() < 1e-5 * v.abs().max(1.0),
                    "sample {i} frame {f}: {g} vs {v}"
                );
            }
        }
    }
}
