//! Stage `consistency`: consistency distillation of the teacher into a few-step student (the
//! AnimateLCM-style baseline, and the distillation part of OSV).
//!
//! The student is initialised from the teacher's UNet and used through the consistency
//! parameterization `f(x, sigma) = c_skip x + c_out D(x, sigma)` (boundary `f(x, sigma_min) =
//! x`, see [`crate::diffusion::consistency`]). Each step, per sample:
//!
//! 1. an index `n` is drawn uniformly from `0..N-m` on an ascending discrete Karras grid of `N`
//!    sigmas (`sigma_min .. sigma_max`, exponent `rho`); `t_n = sigma_n`, `t_{n+m} =
//!    sigma_{n+m}`;
//! 2. `x_{n+m} = x0 + t_{n+m} z` from a clean latent clip `x0` and fresh noise `z`;
//! 3. the frozen teacher solves the probability-flow ODE from `t_{n+m}` down to `t_n` with `m`
//!    Euler steps on the grid, with classifier-free guidance rising across frames from
//!    `min_guidance` to `max_guidance` (the unconditional branch zeroes the image latent and the
//!    image embedding, as SVD's pipeline does): `x^phi_n`;
//! 4. the target is the EMA student (decay `ema_decay`) at the solved point, `f_ema(x^phi_n,
//!    t_n)`, without gradient; the prediction is `f(x_{n+m}, t_{n+m})`;
//! 5. loss `lambda(t_n) d(pred, target)`: `d` is the pseudo-Huber distance
//!    `sqrt((x - y)^2 + c^2) - c` averaged over elements (as AnimateLCM's and LCM's training code
//!    do; `c = 0.001` in the paper) or the mean squared error; `lambda` is iCT's
//!    `1 / (t_{n+m} - t_n)` (Song & Dhariwal 2023), normalised by its mean over the grid so the
//!    learning rate keeps its meaning, or uniform.
//!
//! The conditioning is the teacher's: the clip's first frame with the model's noise
//! augmentation, its image embedding from the teacher's (frozen) image encoder, the model's fps
//! and motion bucket. The exported folder is a pipeline folder like the teacher's, with the
//! student's UNet and `consistency` scalings in `onestep.json`, sampled by default with the
//! 1-step consistency sampler. Metrics: `loss`, `grad_norm`, `sigma` (mean `t_{n+m}`) per
//! step; the preview metrics of the teacher stage at the end.

use super::teacher::{data_fps, encode_all, write_samples};
use super::{resolve_typed, ParamError, StageContext, StageKind};
use crate::diffusion::sampler::guided_denoise_sigmas;
use crate::diffusion::{
    karras_sigmas, ConsistencyParam, Denoiser, SamplerConfig, SamplerMethod, SvdDenoiser,
};
use crate::error::{Error, Result};
use crate::models::checkpoint::{load_weights, WEIGHTS_FILE};
use crate::models::{UNetConfig, UNetSpatioTemporal};
use crate::pipeline::{PipelineSettings, VideoPipeline, SETTINGS_FILE};
use crate::train::lora::{LoraConfig, Student};
use crate::train::losses::{distance, Distance};
use crate::train::optim::named_vars;
use crate::train::state::TrainState;
use crate::train::{ce, clip_batch, device, random_windows, step_rng, AdamW, AdamWConfig};
use candle_core::{DType, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Weighting {
    /// iCT: `1 / (t_{n+m} - t_n)`, normalised to mean 1 over the grid.
    Ict,
    Uniform,
}

/// Parameters of the `consistency` stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsistencyParams {
    /// Upstream stage whose model folder is the teacher (default: the nearest one).
    pub teacher: Option<String>,
    pub steps: u64,
    pub batch_clips: usize,
    /// Frames per training clip (0 = the model's frame count).
    pub frames: usize,
    pub optimizer: AdamWConfig,
    /// Decay of the EMA target network (AnimateLCM: 0.95).
    pub ema_decay: f64,
    /// Points of the discrete Karras grid (the paper samples from 100).
    pub grid: usize,
    /// Teacher ODE steps between the two points, m (paper: 5 best, 1 in its ablation).
    pub solver_steps: usize,
    pub sigma_min: f64,
    pub sigma_max: f64,
    pub rho: f64,
    /// Teacher guidance at the first and last frame.
    pub min_guidance: f64,
    pub max_guidance: f64,
    pub distance: Distance,
    /// Pseudo-Huber c.
    pub huber_c: f64,
    pub weighting: Weighting,
    /// The student's boundary scalings.
    pub boundary: ConsistencyParam,
    /// Full fine-tuning (rank 0) or LoRA adapters.
    pub lora: LoraConfig,
    /// Recompute each UNet unit in the backward pass instead of keeping its intermediates
    /// (`crate::models::grad_checkpoint`): the same gradients in less memory, for a second forward
    /// pass. Left out of the resolved params when false, so existing stages keep their identity.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gradient_checkpointing: bool,
    /// Default sampler of the exported student (and of its previews). Keys left out take the
    /// student defaults (1-step consistency, no guidance), not the teacher's.
    #[serde(deserialize_with = "student_sampler")]
    pub sampler: SamplerConfig,
    pub sample_clips: usize,
    pub checkpoint_every: u64,
}

impl Default for ConsistencyParams {
    fn default() -> Self {
        Self {
            teacher: None,
            steps: 1000,
            batch_clips: 4,
            frames: 0,
            optimizer: AdamWConfig {
                lr: 1e-4,
                warmup: 50,
                ..Default::default()
            },
            ema_decay: 0.95,
            grid: 100,
            solver_steps: 5,
            sigma_min: 0.002,
            sigma_max: 700.0,
            rho: 7.0,
            min_guidance: 1.0,
            max_guidance: 3.0,
            distance: Distance::Huber,
            huber_c: 0.001,
            weighting: Weighting::Ict,
            boundary: ConsistencyParam::default(),
            lora: LoraConfig::default(),
            gradient_checkpointing: false,
            sampler: student_sampler_default(),
            sample_clips: 4,
            checkpoint_every: 100,
        }
    }
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

impl ConsistencyParams {
    fn check(&self) -> std::result::Result<(), ParamError> {
        let bad = |path: &str, message: String| ParamError {
            path: path.into(),
            message,
        };
        if self.grid < 2 {
            return Err(bad("grid", "needs at least 2 points".into()));
        }
        if self.solver_steps == 0 || self.solver_steps >= self.grid {
            return Err(bad(
                "solver_steps",
                format!(
                    "must be in 1..{} (the grid has {} points)",
                    self.grid, self.grid
                ),
            ));
        }
        if !(self.sigma_min > 0.0 && self.sigma_max > self.sigma_min) {
            return Err(bad("sigma_min", "need 0 < sigma_min < sigma_max".into()));
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return Err(bad("ema_decay", "must be in [0, 1)".into()));
        }
        if self.batch_clips == 0 {
            return Err(bad("batch_clips", "must be at least 1".into()));
        }
        if self.huber_c <= 0.0 {
            return Err(bad("huber_c", "must be positive".into()));
        }
        self.sampler.validate().map_err(|m| bad("sampler", m))?;
        Ok(())
    }

    /// Ascending Karras grid `sigma_min .. sigma_max` of `grid` points.
    pub fn sigma_grid(&self) -> Vec<f64> {
        let mut g = karras_sigmas(self.grid, self.sigma_min, self.sigma_max, self.rho);
        g.pop();
        g.reverse();
        g
    }
}

pub struct ConsistencyStage;

impl StageKind for ConsistencyStage {
    fn name(&self) -> &'static str {
        "consistency"
    }
    fn version(&self) -> u32 {
        1
    }
    fn seeded(&self) -> bool {
        true
    }
    fn resolve(&self, params: toml::Value) -> std::result::Result<toml::Value, ParamError> {
        let (p, v) = resolve_typed::<ConsistencyParams>(params)?;
        p.check()?;
        Ok(v)
    }
    fn run(&self, ctx: &mut StageContext<'_>) -> Result<()> {
        let p: ConsistencyParams = ctx.params()?;
        train(ctx, &p)
    }
}

/// The model folder of the teacher: the named upstream stage, or the nearest one with a model.
pub(crate) fn teacher_dir(ctx: &StageContext<'_>, name: Option<&str>) -> Result<PathBuf> {
    model_dir(ctx, name, "a teacher: put a `teacher` stage before it")
}

/// The model folder of a named upstream stage, or of the nearest one that wrote one; `needs`
/// completes "stage X needs ..." in the error.
pub(crate) fn model_dir(
    ctx: &StageContext<'_>,
    name: Option<&str>,
    needs: &str,
) -> Result<PathBuf> {
    let found = match name {
        Some(n) => ctx.upstream.iter().find(|u| u.name == n),
        None => ctx
            .upstream
            .iter()
            .rev()
            .find(|u| u.dir.join(SETTINGS_FILE).is_file()),
    };
    match found {
        Some(u) if u.dir.join(SETTINGS_FILE).is_file() => Ok(u.dir.clone()),
        Some(u) => Err(Error::Other(format!(
            "stage `{}`: stage `{}` ({}) wrote no model folder to distil",
            ctx.name, u.name, u.kind
        ))),
        None => Err(Error::Other(format!(
            "stage `{}` needs {needs}{}",
            ctx.name,
            name.map(|n| format!(" (no stage `{n}` upstream)"))
                .unwrap_or_default()
        ))),
    }
}

/// The ascending sigma grid with the pair spacing `m` that both distillation stages draw from:
/// per sample an index `n` in `0..len - m`, the pair `(grid[n], grid[n + m])`.
pub(crate) struct PairGrid {
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
    pub fn draw(&self, rng: &mut crate::diffusion::noise::NormalRng, b: usize) -> Vec<usize> {
        let top = self.sigmas.len() - self.m;
        (0..b)
            .map(|_| ((rng.uniform() * top as f64) as usize).min(top - 1))
            .collect()
    }

    /// `grid[n + k]` per sample, `[b]`.
    pub fn at(
        &self,
        ns: &[usize],
        k: usize,
        dev: &candle_core::Device,
    ) -> candle_core::Result<Tensor> {
        let v: Vec<f32> = ns.iter().map(|&n| self.sigmas[n + k] as f32).collect();
        Tensor::from_vec(v, ns.len(), dev)
    }

    /// `lambda(t_n)` per sample, `[b]`.
    pub fn lambda(
        &self,
        ns: &[usize],
        weighting: Weighting,
        dev: &candle_core::Device,
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

/// `m` guided Euler steps of the teacher's probability-flow ODE from `grid[n + m]` down to
/// `grid[n]` (one `n` per sample), without gradient.
pub(crate) fn teacher_solve(
    teacher: &dyn Denoiser,
    x_hi: &Tensor,
    ns: &[usize],
    grid: &PairGrid,
    cond: &crate::diffusion::Conditioning,
    guidance: &[f64],
) -> candle_core::Result<Tensor> {
    let b = ns.len();
    let dev = x_hi.device();
    let mut x = x_hi.detach();
    for k in (0..grid.m).rev() {
        let (sk, sn) = (grid.at(ns, k + 1, dev)?, grid.at(ns, k, dev)?);
        let d = guided_denoise_sigmas(teacher, &x, &sk, cond, guidance)?.detach();
        let (sk, sn) = (sk.reshape((b, 1, 1, 1, 1))?, sn.reshape((b, 1, 1, 1, 1))?);
        let deriv = (&x - d)?.broadcast_div(&sk)?;
        x = (&x + deriv.broadcast_mul(&(sn - &sk)?)?)?.detach();
    }
    Ok(x)
}

/// One training batch: clean latent windows `[b, t, c, h, w]` and the teacher's conditioning of
/// their first frames (the model's noise augmentation, fps and motion bucket).
pub(crate) struct Batch {
    pub x0: Tensor,
    pub cond: crate::diffusion::Conditioning,
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn make_batch(
    rng: &mut crate::diffusion::noise::NormalRng,
    teacher: &VideoPipeline,
    set: &crate::data::ClipSet,
    latents: &[Tensor],
    frames: usize,
    b: usize,
    fps: f64,
    dev: &candle_core::Device,
) -> candle_core::Result<Batch> {
    let (idx, starts) = random_windows(rng, set.len(), set.frames, frames, b);
    let x0 = Tensor::stack(
        &idx.iter()
            .zip(&starts)
            .map(|(&i, &st)| latents[i].narrow(0, st, frames))
            .collect::<candle_core::Result<Vec<_>>>()?,
        0,
    )?;
    let (h, w) = (set.height, set.width);
    let first = clip_batch(set, &idx, &starts, 1, dev)?.reshape((b, 3, h, w))?;
    let aug = rng.tensor(&[b, 3, h, w], dev)?;
    let s = &teacher.settings;
    let cond = teacher.conditioning(&first, &aug, s.noise_aug_strength, fps, s.motion_bucket_id)?;
    Ok(Batch { x0, cond })
}

/// `target <- decay target + (1 - decay) student`, by name.
pub(crate) fn ema_update(
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

/// A UNet with its own variables, initialised from the teacher folder's weights.
pub(crate) fn unet_from(
    dir: &Path,
    cfg: &UNetConfig,
    dev: &candle_core::Device,
) -> Result<(VarMap, UNetSpatioTemporal)> {
    let vm = VarMap::new();
    let unet = UNetSpatioTemporal::new(VarBuilder::from_varmap(&vm, DType::F32, dev), cfg)
        .map_err(ce("student UNet"))?;
    load_weights(&vm, &dir.join("unet").join(WEIGHTS_FILE))?;
    Ok((vm, unet))
}

fn train(ctx: &mut StageContext<'_>, p: &ConsistencyParams) -> Result<()> {
    let dev = device(ctx.device)?;
    let tdir = teacher_dir(ctx, p.teacher.as_deref())?;
    let teacher = VideoPipeline::load(&tdir, &dev)?;
    if teacher.settings.consistency.is_some() {
        ctx.note("the teacher folder is itself a consistency student; distilling it anyway");
    }
    let (train_set, test_set) = super::autoencoder::upstream_clips(ctx)?;
    if train_set.is_empty() {
        return Err(Error::Data("the training clip set is empty".into()));
    }
    let frames = if p.frames == 0 {
        teacher.settings.frames.min(train_set.frames)
    } else {
        p.frames.min(train_set.frames)
    };
    let unet_cfg: UNetConfig = crate::models::checkpoint::load_config(&tdir.join("unet"))?;
    let student = Student::new(
        &tdir.join("unet").join(WEIGHTS_FILE),
        &unet_cfg,
        &p.lora,
        ctx.seed,
        &dev,
    )?;
    let (target_map, target) = unet_from(&tdir, &unet_cfg, &dev)?;
    let vars = student.vars();
    let target_vars: HashMap<String, Var> = named_vars(&target_map).into_iter().collect();
    let mut opt = AdamW::new(vars.clone(), p.optimizer.clone()).map_err(ce("optimizer"))?;
    let fps = data_fps(ctx).unwrap_or(teacher.settings.fps);

    ctx.note(&format!(
        "encoding {} training clips with the teacher's VAE",
        train_set.len()
    ));
    let latents = encode_all(&teacher.vae, &train_set, &dev)?;

    let (mut vars, mut target_vars) = (vars, target_vars);
    let mut start = 0;
    if let Some(mut state) = ctx.resume(&dev)? {
        state.restore("student", &mut vars)?;
        state.restore("target", &mut target_vars)?;
        state.restore("optimizer", &mut opt)?;
        start = state.finish()?;
        ctx.note(&format!("resuming from step {start}"));
    }

    let grid = PairGrid::new(p.sigma_grid(), p.solver_steps);
    let m = grid.m;
    let guidance = SamplerConfig {
        min_guidance: p.min_guidance,
        max_guidance: p.max_guidance,
        ..Default::default()
    }
    .guidance(frames);
    let teacher_den = SvdDenoiser {
        unet: &teacher.unet,
    };
    let target_inner = SvdDenoiser { unet: &target };
    let target_den = p.boundary.wrap(&target_inner);

    for step in start..p.steps {
        ctx.check_interrupt(step)?;
        let e = ce("consistency step");
        let mut rng = step_rng(ctx.seed, step);
        let b = p.batch_clips;
        let Batch { x0, cond } = make_batch(
            &mut rng, &teacher, &train_set, &latents, frames, b, fps, &dev,
        )
        .map_err(&e)?;
        let ns = grid.draw(&mut rng, b);
        let bcast = |t: &Tensor| t.reshape((b, 1, 1, 1, 1));
        let s_hi = grid.at(&ns, m, &dev).map_err(&e)?;
        let z = rng.tensor(x0.dims(), &dev).map_err(&e)?;
        let x_hi = (&x0 + z.broadcast_mul(&bcast(&s_hi).map_err(&e)?).map_err(&e)?).map_err(&e)?;
        // Teacher: m Euler steps down the grid, guided, no gradient.
        let x = teacher_solve(&teacher_den, &x_hi, &ns, &grid, &cond, &guidance).map_err(&e)?;
        let s_lo = grid.at(&ns, 0, &dev).map_err(&e)?;
        let target_x = target_den.denoise(&x, &s_lo, &cond).map_err(&e)?.detach();
        let student_inner = student.for_step(p.gradient_checkpointing)?;
        let pred = p
            .boundary
            .wrap(&student_inner)
            .denoise(&x_hi, &s_hi, &cond)
            .map_err(&e)?;
        let per_sample = distance(&pred, &target_x, p.distance, p.huber_c).map_err(&e)?;
        let lambda = grid.lambda(&ns, p.weighting, &dev).map_err(&e)?;
        let loss = (per_sample * lambda)
            .and_then(|v| v.mean_all())
            .map_err(&e)?;
        let mut grads = loss.backward().map_err(&e)?;
        student_inner.merge_into(&mut grads)?;
        let lr = crate::train::warmup_lr(p.optimizer.lr, step, p.optimizer.warmup);
        let gnorm = opt.step(&grads, lr).map_err(&e)?;
        // EMA target of the (merged) student weights.
        ema_update(&target_vars, &student.merged()?, p.ema_decay).map_err(&e)?;
        let lv = loss.to_scalar::<f32>().map_err(&e)? as f64;
        let mean_sigma = ns.iter().map(|&n| grid.sigmas[n + m]).sum::<f64>() / b as f64;
        ctx.metric("loss", step + 1, lv)?;
        ctx.metric("grad_norm", step + 1, gnorm)?;
        ctx.metric("sigma", step + 1, mean_sigma)?;
        ctx.progress(step + 1, p.steps, &format!("loss {lv:.5}"));
        let done = step + 1 == p.steps;
        if (p.checkpoint_every > 0 && (step + 1) % p.checkpoint_every == 0) || done {
            let state = TrainState::new(step + 1)
                .with("student", &vars)
                .with("target", &target_vars)
                .with("optimizer", &opt);
            ctx.checkpoint(&state)?;
        }
    }

    // Export: the teacher's VAE and image encoder, the student's UNet, consistency settings.
    student.export(&ctx.dir.join("unet"), &unet_cfg)?;
    crate::models::checkpoint::copy_frozen_components(&tdir, &ctx.dir)?;
    let settings = PipelineSettings {
        frames,
        sampler: p.sampler.clone(),
        consistency: Some(p.boundary.clone()),
        ..teacher.settings.clone()
    };
    let text = serde_json::to_string_pretty(&settings).map_err(|e| Error::Other(e.to_string()))?;
    crate::util::atomic_write(&ctx.dir.join(SETTINGS_FILE), text.as_bytes())?;
    drop(teacher);
    write_samples(ctx, p.sample_clips, p.steps, &test_set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_ascends_from_sigma_min_to_sigma_max() {
        let p = ConsistencyParams::default();
        let g = p.sigma_grid();
        assert_eq!(g.len(), 100);
        assert!((g[0] - 0.002).abs() < 1e-12 && (g[99] - 700.0).abs() < 1e-9);
        assert!(g.windows(2).all(|w| w[0] < w[1]));
    }
}
