//! Stage `consistency`: consistency distillation of the teacher into a few-step student (the
//! AnimateLCM-style baseline, and the distillation part of OSV).
//!
//! The student is initialised from the teacher's UNet and used through the consistency
//! parameterization `f(x, sigma) = c_skip x + c_out D(x, sigma)` (boundary `f(x, sigma_min) =
//! x`, see [`crate::diffusion::consistency`]). Each step, per sample:
//!
//! 1. an index `n` is drawn uniformly from `0..N-m` on an ascending discrete Karras grid of `N`
//!    sigmas (the `grid` table: `points` N, `solver_steps` m, `sigma_min .. sigma_max`,
//!    exponent `rho`; [`crate::distill::GridConfig`]); `t_n = sigma_n`, `t_{n+m} = sigma_{n+m}`;
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

use super::teacher::{encode_all_cached, write_samples};
use super::{resolve_typed, ParamError, StageContext, StageKind};
use crate::device::Precision;
use crate::diffusion::{ConsistencyParam, Denoiser, SamplerConfig, SvdDenoiser};
use crate::distill::{
    check_loss, ema_update, export_student, moved_grid_keys, student_sampler,
    student_sampler_default, teacher_solve, unet_from, Batch, BatchSource, GridConfig, PairGrid,
    Weighting,
};
use crate::error::{Error, Result};
use crate::models::checkpoint::WEIGHTS_FILE;
use crate::models::UNetConfig;
use crate::pipeline::{LoadOptions, PipelineSettings, VideoPipeline};
use crate::train::lora::{LoraConfig, Student};
use crate::train::losses::{distance, Distance};
use crate::train::optim::named_vars;
use crate::train::state::TrainState;
use crate::train::{ce, device, step_rng, AdamW, AdamWConfig};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

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
    /// The training grid and the teacher's solver steps m between a pair's points.
    pub grid: GridConfig,
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
    /// Dtype of the frozen teacher, of a LoRA student's frozen base weights and of the preview
    /// samples ([`Precision`]); adapters and a fully fine-tuned student train in f32. f32
    /// (default, left out of the identity), bf16 or f16; half precision with LoRA needs CUDA.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub dtype: Precision,
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
            grid: GridConfig::default(),
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
            dtype: Precision::F32,
        }
    }
}

impl ConsistencyParams {
    fn check(&self) -> std::result::Result<(), ParamError> {
        let bad = |(path, message): (String, String)| ParamError { path, message };
        self.grid.check(true).map_err(bad)?;
        check_loss(self.huber_c, self.ema_decay, self.batch_clips).map_err(bad)?;
        self.sampler
            .validate()
            .map_err(|m| bad(("sampler".into(), m)))?;
        Ok(())
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
    fn takes_dtype(&self) -> bool {
        true
    }
    fn resolve(&self, params: toml::Value) -> std::result::Result<toml::Value, ParamError> {
        moved_grid_keys(&params).map_err(|(path, message)| ParamError { path, message })?;
        let (p, v) = resolve_typed::<ConsistencyParams>(params)?;
        p.check()?;
        Ok(v)
    }
    fn references(&self, params: &toml::Value) -> Vec<(&'static str, String)> {
        super::string_params(params, &["teacher"])
    }
    fn run(&self, ctx: &mut StageContext<'_>) -> Result<()> {
        let p: ConsistencyParams = ctx.params()?;
        train(ctx, &p)
    }
}

fn train(ctx: &mut StageContext<'_>, p: &ConsistencyParams) -> Result<()> {
    let dev = device(ctx.device)?;
    let tdir = ctx.model_dir(
        p.teacher.as_deref(),
        "a teacher: put a `teacher` stage before it",
    )?;
    let teacher = VideoPipeline::load_with(&tdir, &dev, &LoadOptions::precision(p.dtype))?;
    if teacher.settings.consistency.is_some() {
        ctx.note("the teacher folder is itself a consistency student; distilling it anyway");
    }
    let data = ctx.data()?;
    let (train_set, test_set) = (&data.train, &data.test);
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
        p.dtype,
    )?;
    if !p.dtype.is_f32() && p.lora.rank == 0 {
        ctx.note(&format!(
            "dtype = \"{}\": the frozen networks compute in it; the fully fine-tuned student \
             trains in f32",
            p.dtype
        ));
    }
    let (target_map, target) = unet_from(&tdir, &unet_cfg, &dev)?;
    let vars = student.vars();
    let target_vars: HashMap<String, Var> = named_vars(&target_map).into_iter().collect();
    let mut opt = AdamW::new(vars.clone(), p.optimizer.clone()).map_err(ce("optimizer"))?;
    let fps = data.fps();

    let latents = encode_all_cached(
        ctx,
        &teacher.vae,
        &tdir.join("vae"),
        &p.dtype.to_string(),
        train_set,
        &dev,
    )?;
    let source = BatchSource {
        set: train_set,
        latents: &latents,
        frames,
        fps,
    };

    let (mut vars, mut target_vars) = (vars, target_vars);
    let mut start = 0;
    if let Some(mut state) = ctx.resume(&dev)? {
        state.restore("student", &mut vars)?;
        state.restore("target", &mut target_vars)?;
        state.restore("optimizer", &mut opt)?;
        start = state.finish()?;
        ctx.note(&format!("resuming from step {start}"));
    }

    let grid = PairGrid::new(p.grid.sigmas(), p.grid.solver_steps);
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

    let shards = crate::train::shard::Shards::new(p.batch_clips).map_err(ce("shards"))?;
    for step in start..p.steps {
        ctx.check_interrupt(step)?;
        let t0 = std::time::Instant::now();
        let e = ce("consistency step");
        let mut rng = step_rng(ctx.seed, step);
        let b = p.batch_clips;
        let Batch { x0, cond } = source.draw(&mut rng, &teacher, b, &dev).map_err(&e)?;
        let ns = grid.draw(&mut rng, b);
        let s_hi = grid.at(&ns, m, &dev).map_err(&e)?;
        let z = rng.tensor(x0.dims(), &dev).map_err(&e)?;
        // Every sample's loss is its own: the batch is split into shards run side by side
        // (`train::shard`), each with its own backward pass, the gradients summed.
        let parts = shards.map(b, |r| -> Result<([f64; 1], GradStore)> {
            let (lo, n) = (r.start, r.len());
            let share = n as f64 / b as f64;
            let narrow = |t: &Tensor| t.narrow(0, lo, n);
            let (x0, z, s_hi) = (narrow(&x0), narrow(&z), narrow(&s_hi));
            let (x0, z, s_hi) = (x0.map_err(&e)?, z.map_err(&e)?, s_hi.map_err(&e)?);
            let cond = cond.narrow(lo, n).map_err(&e)?;
            let ns = &ns[r];
            let bcast = |t: &Tensor| t.reshape((n, 1, 1, 1, 1));
            let x_hi =
                (&x0 + z.broadcast_mul(&bcast(&s_hi).map_err(&e)?).map_err(&e)?).map_err(&e)?;
            // Teacher: m Euler steps down the grid, guided, no gradient.
            let x = teacher_solve(&teacher_den, &x_hi, ns, &grid, &cond, &guidance).map_err(&e)?;
            let s_lo = grid.at(ns, 0, &dev).map_err(&e)?;
            let target_x = target_den.denoise(&x, &s_lo, &cond).map_err(&e)?.detach();
            let student_inner = student.for_step(p.gradient_checkpointing)?;
            let pred = p
                .boundary
                .wrap(&student_inner)
                .denoise(&x_hi, &s_hi, &cond)
                .map_err(&e)?;
            let per_sample = distance(&pred, &target_x, p.distance, p.huber_c).map_err(&e)?;
            let lambda = grid.lambda(ns, p.weighting, &dev).map_err(&e)?;
            let loss = (per_sample * lambda)
                .and_then(|v| v.mean_all())
                .and_then(|v| v * share)
                .map_err(&e)?;
            let mut grads = loss.backward().map_err(&e)?;
            student_inner.merge_into(&mut grads)?;
            Ok(([loss.to_scalar::<f32>().map_err(&e)? as f64], grads))
        })?;
        let ([lv], grads) = crate::train::shard::sum(parts).map_err(&e)?;
        let lr = p.optimizer.lr_at(step, p.steps);
        let gnorm = opt.step(&grads, lr).map_err(&e)?;
        // EMA target of the (merged) student weights.
        ema_update(&target_vars, &student.merged()?, p.ema_decay).map_err(&e)?;
        let mean_sigma = ns.iter().map(|&n| grid.sigmas[n + m]).sum::<f64>() / b as f64;
        ctx.metric("loss", step + 1, lv)?;
        ctx.metric("grad_norm", step + 1, gnorm)?;
        ctx.metric("step_seconds", step + 1, t0.elapsed().as_secs_f64())?;
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
    let settings = PipelineSettings {
        frames,
        sampler: p.sampler.clone(),
        consistency: Some(p.boundary.clone()),
        ..teacher.settings.clone()
    };
    export_student(&ctx.dir, &student, &unet_cfg, &tdir, &settings)?;
    drop(teacher);
    write_samples(ctx, p.sample_clips, p.steps, test_set, p.dtype)
}
