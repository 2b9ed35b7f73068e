//! Stage `gan`: adversarial training of a one-step student against OSV's spatio-temporal
//! discriminator ([`crate::models::discriminator`]), in the paper's two modes.
//!
//! - `mode = "lgp"`, latent GAN pretraining (the paper's stage I): `x_tn = x0 + t_n z` for a
//!   random grid sigma `t_n`; the discriminator's "real" is the clean latent clip `x0`, its
//!   "fake" the student's `f(x_tn, t_n)`; generator loss `adv_weight * G(D(fake)) + d(x0,
//!   fake)`.
//! - `mode = "acd"`, adversarial consistency distillation (stage II): as in the `consistency`
//!   stage, the frozen teacher solves `m` guided Euler steps from `t_{n+m}` to `t_n`; "real" is
//!   the EMA target's `f_ema(x^phi_n, t_n)`, "fake" the student's `f(x_{n+m}, t_{n+m})`;
//!   generator loss `adv_weight * G(D(fake)) + lambda(t_n) d(real, fake)`.
//!
//! `G`/`D` are the hinge losses of the paper (`ReLU(1 - D(fake))`; `ReLU(1 - D(real)) + ReLU(1 +
//! D(fake))`) or the non-saturating ones (`gan_loss`); `d` and `lambda` as in `consistency`.
//! Each step first updates the discriminator on detached samples, then the generator through
//! the updated discriminator. The generator starts from an upstream model folder (a
//! `consistency` student, or the teacher itself), so stages compose in any order: LGP then
//! ACD (the paper's final recipe), consistency then ACD (its first version), etc. The
//! exported folder is a consistency-student pipeline folder. Metrics per step: `loss_g`,
//! `loss_d`, `loss_adv`, `loss_distill`, `d_real`, `d_fake` (mean logits), `d_accuracy` (the
//! training batch's clips on the right side of 0, before the discriminator's update),
//! `grad_norm_g`, `grad_norm_d`, `step_seconds`; every `eval_every` steps, the held-out check
//! `d_heldout_accuracy` / `d_heldout_margin` (see [`separation`]) on pairs built from test clips
//! exactly as training pairs are, the same pairs each time, so a rise is the discriminator
//! learning, not the batch changing; the preview metrics at the end.

use super::teacher::{encode_all, encode_all_cached, write_samples};
use super::{resolve_typed, ParamError, StageContext, StageKind};
use crate::device::Precision;
use crate::diffusion::noise::NormalRng;
use crate::diffusion::{ConsistencyParam, Denoiser, SamplerConfig, SvdDenoiser};
use crate::distill::{
    check_loss, ema_update, export_student, moved_grid_keys, student_sampler,
    student_sampler_default, teacher_solve, unet_from, unit_weights, Batch, BatchSource,
    GridConfig, PairGrid, Weighting,
};
use crate::error::{Error, Result};
use crate::models::checkpoint::WEIGHTS_FILE;
use crate::models::discriminator::{Backbone, BackboneKind, ConvBackbone, DiscInput};
use crate::models::{Discriminator, DiscriminatorConfig, UNetConfig};
use crate::pipeline::{LoadOptions, PipelineSettings, VideoPipeline};
use crate::train::lora::{LoraConfig, Student};
use crate::train::losses::{approx_r1, d_loss, distance, g_loss, mean_logit, Distance, GanLoss};
use crate::train::optim::named_vars;
use crate::train::state::TrainState;
use crate::train::{ce, device, seeded_varbuilder, step_rng, AdamW, AdamWConfig};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GanMode {
    Lgp,
    Acd,
}

/// Parameters of the `gan` stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GanParams {
    pub mode: GanMode,
    /// Upstream stage whose model folder the generator starts from (default: the nearest).
    pub generator: Option<String>,
    /// ACD: upstream stage whose model is the teacher (default: the nearest `teacher` stage).
    pub teacher: Option<String>,
    pub steps: u64,
    pub batch_clips: usize,
    /// Frames per training clip (0 = the model's frame count).
    pub frames: usize,
    pub optimizer_g: AdamWConfig,
    pub optimizer_d: AdamWConfig,
    /// Weight of the adversarial term in the generator loss (paper: 0.1).
    pub adv_weight: f64,
    pub gan_loss: GanLoss,
    /// Discriminator updates per generator update (each further one on a fresh pair). Left out
    /// of the resolved params at 1, so existing stages keep their identity.
    #[serde(skip_serializing_if = "is_one")]
    pub d_steps: usize,
    /// Weight of the approximated R1 penalty on real samples (0 = off): `r1_weight *
    /// mean((D(real) - D(real + r1_sigma eps))^2)`, a finite-difference stand-in for
    /// `||grad D(real)||^2` that needs no second-order gradients (as in Lin et al. 2025, APT).
    pub r1_weight: f64,
    pub r1_sigma: f64,
    pub distance: Distance,
    pub huber_c: f64,
    /// ACD's lambda(t_n) (LGP's distance term is unweighted).
    pub weighting: Weighting,
    /// ACD: decay of the EMA target.
    pub ema_decay: f64,
    /// The training grid; ACD's teacher solves `grid.solver_steps` steps between a pair's
    /// points, LGP draws single points from it.
    pub grid: GridConfig,
    /// ACD: teacher guidance at the first and last frame.
    pub min_guidance: f64,
    pub max_guidance: f64,
    pub discriminator: DiscriminatorConfig,
    /// Boundary scalings when the generator folder is a teacher (a student keeps its own).
    pub boundary: ConsistencyParam,
    /// Full fine-tuning (rank 0) or LoRA adapters (plus `train_also` layers).
    pub lora: LoraConfig,
    /// Recompute each UNet unit in the backward pass instead of keeping its intermediates
    /// (`crate::models::grad_checkpoint`): the same gradients in less memory, for a second forward
    /// pass. Left out of the resolved params when false, so existing stages keep their identity.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gradient_checkpointing: bool,
    /// As in `consistency`: missing keys take the student defaults.
    #[serde(deserialize_with = "student_sampler")]
    pub sampler: SamplerConfig,
    pub sample_clips: usize,
    /// Steps between held-out discriminator checks (`d_heldout_accuracy`, `d_heldout_margin`
    /// on the same pairs of `eval_clips` test clips each time; also before the first step and
    /// after the last). 0 = none.
    pub eval_every: u64,
    pub eval_clips: usize,
    pub checkpoint_every: u64,
    /// As in `consistency`: dtype of the frozen teacher and generator pipeline (image encoder),
    /// of a LoRA student's frozen base and of the previews; the discriminator trains in f32.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub dtype: Precision,
}

impl Default for GanParams {
    fn default() -> Self {
        let c = super::consistency::ConsistencyParams::default();
        Self {
            mode: GanMode::Acd,
            generator: None,
            teacher: None,
            steps: 500,
            batch_clips: 4,
            frames: 0,
            optimizer_g: AdamWConfig {
                lr: 5e-5,
                warmup: 50,
                ..Default::default()
            },
            optimizer_d: AdamWConfig {
                lr: 2e-4,
                warmup: 50,
                beta1: 0.0,
                beta2: 0.99,
                ..Default::default()
            },
            adv_weight: 0.1,
            gan_loss: GanLoss::Hinge,
            d_steps: 1,
            r1_weight: 0.0,
            r1_sigma: 0.01,
            distance: c.distance,
            huber_c: c.huber_c,
            weighting: c.weighting,
            ema_decay: c.ema_decay,
            grid: c.grid,
            min_guidance: c.min_guidance,
            max_guidance: c.max_guidance,
            discriminator: DiscriminatorConfig::default(),
            boundary: ConsistencyParam::default(),
            lora: LoraConfig::default(),
            gradient_checkpointing: false,
            sampler: student_sampler_default(),
            sample_clips: 4,
            eval_every: 50,
            eval_clips: 16,
            checkpoint_every: 100,
            dtype: Precision::F32,
        }
    }
}

impl GanParams {
    fn check(&self) -> std::result::Result<(), ParamError> {
        let bad = |(path, message): (String, String)| ParamError { path, message };
        self.grid.check(self.mode == GanMode::Acd).map_err(bad)?;
        check_loss(self.huber_c, self.ema_decay, self.batch_clips).map_err(bad)?;
        if !(self.r1_weight >= 0.0) {
            return Err(bad(("r1_weight".into(), "must be >= 0".into())));
        }
        if !(self.r1_sigma > 0.0) {
            return Err(bad(("r1_sigma".into(), "must be positive".into())));
        }
        if self.d_steps == 0 {
            return Err(bad(("d_steps".into(), "must be at least 1".into())));
        }
        if !(self.adv_weight >= 0.0) {
            return Err(bad(("adv_weight".into(), "must be >= 0".into())));
        }
        self.discriminator
            .validate()
            .map_err(|m| bad(("discriminator".into(), m)))?;
        self.sampler
            .validate()
            .map_err(|m| bad(("sampler".into(), m)))?;
        Ok(())
    }
}

pub struct GanStage;

impl StageKind for GanStage {
    fn name(&self) -> &'static str {
        "gan"
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
        let (p, v) = resolve_typed::<GanParams>(params)?;
        p.check()?;
        Ok(v)
    }
    fn references(&self, params: &toml::Value) -> Vec<(&'static str, String)> {
        super::string_params(params, &["generator", "teacher"])
    }
    fn run(&self, ctx: &mut StageContext<'_>) -> Result<()> {
        let p: GanParams = ctx.params()?;
        train(ctx, &p)
    }
}

/// The discriminator with its trainable variables in `map`; a frozen backbone is built from
/// constants (drawn from the seed, or the pretrained EfficientNet-Lite0 from `assets`).
fn build_discriminator(
    cfg: &DiscriminatorConfig,
    latent_channels: usize,
    seed: u64,
    assets: &std::path::Path,
    teacher: &std::path::Path,
    dev: &candle_core::Device,
) -> Result<(VarMap, Discriminator)> {
    let map = VarMap::new();
    let vb = seeded_varbuilder(&map, seed, dev);
    let backbone = match cfg.backbone.kind {
        BackboneKind::TeacherUnet => {
            let ucfg: UNetConfig = crate::models::checkpoint::load_config(&teacher.join("unet"))?;
            let (m, _) = unet_from(teacher, &ucfg, dev)?;
            let unet = crate::models::UNetSpatioTemporal::new(
                VarBuilder::from_tensors(constants(&m)?, DType::F32, dev),
                &ucfg,
            )
            .map_err(ce("discriminator backbone (teacher UNet)"))?;
            Backbone::TeacherUnet(Box::new(unet), cfg.backbone.noise_sigma)
        }
        BackboneKind::Dinov2 => Backbone::Dinov2(
            Box::new(crate::models::dinov2::Dinov2::load(
                std::path::Path::new(&cfg.backbone.path),
                dev,
            )?),
            cfg.backbone.image_size,
        ),
        BackboneKind::EfficientNetLite0 => {
            Backbone::EfficientNet(Box::new(crate::assets::efficientnet_lite0(assets, dev)?))
        }
        BackboneKind::Conv if cfg.backbone.trainable => Backbone::Conv(
            ConvBackbone::new(vb.pp("backbone"), &cfg.backbone.channels)
                .map_err(ce("discriminator backbone"))?,
        ),
        BackboneKind::Conv => {
            let bb = VarMap::new();
            ConvBackbone::new(
                seeded_varbuilder(&bb, seed.wrapping_add(17), dev).pp("backbone"),
                &cfg.backbone.channels,
            )
            .map_err(ce("discriminator backbone"))?;
            let frozen = VarBuilder::from_tensors(constants(&bb)?, DType::F32, dev);
            Backbone::Conv(
                ConvBackbone::new(frozen.pp("backbone"), &cfg.backbone.channels)
                    .map_err(ce("discriminator backbone"))?,
            )
        }
    };
    let d = Discriminator::new(vb, backbone, cfg, latent_channels).map_err(ce("discriminator"))?;
    Ok((map, d))
}

/// The weights of `map` as constants (a frozen copy: no gradient is computed for them).
fn constants(map: &VarMap) -> Result<HashMap<String, Tensor>> {
    Ok(map
        .data()
        .lock()
        .map_err(|_| Error::Other("discriminator backbone: poisoned lock".into()))?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect())
}

fn is_one(v: &usize) -> bool {
    *v == 1
}

/// What one adversarial step compares.
struct Pair<'a> {
    real: Tensor,
    fake: Tensor,
    lambda: Tensor,
    cond: crate::diffusion::Conditioning,
    d_noise: Option<Tensor>,
    g_inner: crate::train::lora::StepUNet<'a>,
}

/// The random draws of one training pair (see `draw_pair` in [`run`]'s step).
struct PairDraws {
    x0: Tensor,
    cond: crate::diffusion::Conditioning,
    ns: Vec<usize>,
    z: Tensor,
    d_noise: Option<Tensor>,
}

/// One shard's discriminator step: its weighted loss and diagnostics, its gradients and its
/// pair, kept for the generator step.
struct DShard<'a> {
    loss: f64,
    r1: Option<f64>,
    d_real: f64,
    d_fake: f64,
    real_scores: Vec<f64>,
    fake_scores: Vec<f64>,
    grads: GradStore,
    pair: Pair<'a>,
}

/// Seed offset of the held-out discriminator check's draws.
const HELDOUT_SEED: u64 = 0x4845_4c44;

/// Each clip's score: its logits averaged within each head (`[b, ...]`), then over heads.
fn clip_scores(heads: &[Tensor]) -> candle_core::Result<Vec<f64>> {
    let mut total: Option<Tensor> = None;
    for h in heads {
        let v = h.flatten_from(1)?.mean(1)?;
        total = Some(match total {
            None => v,
            Some(t) => (t + v)?,
        });
    }
    let t = total.ok_or_else(|| candle_core::Error::Msg("no discriminator heads".into()))?;
    Ok((t / heads.len() as f64)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?)
}

/// (accuracy, margin) of a discriminator on real and fake scores: the fraction of clips on the
/// right side of 0 (real > 0, fake < 0; 0.5 is chance) and mean(real) - mean(fake).
pub fn separation(real: &[f64], fake: &[f64]) -> (f64, f64) {
    let n = (real.len() + fake.len()).max(1) as f64;
    let right =
        real.iter().filter(|&&v| v > 0.0).count() + fake.iter().filter(|&&v| v < 0.0).count();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    (right as f64 / n, mean(real) - mean(fake))
}

fn train(ctx: &mut StageContext<'_>, p: &GanParams) -> Result<()> {
    let dev = device(ctx.device)?;
    let gdir = ctx.model_dir(
        p.generator.as_deref(),
        "a model to start the generator from (a `teacher` or `consistency` stage before it)",
    )?;
    let load = LoadOptions::precision(p.dtype);
    let gen_pipe = VideoPipeline::load_with(&gdir, &dev, &load)?;
    let boundary = gen_pipe
        .settings
        .consistency
        .clone()
        .unwrap_or_else(|| p.boundary.clone());
    let teacher = match p.mode {
        GanMode::Acd => Some(VideoPipeline::load_with(
            &ctx.teacher_dir(p.teacher.as_deref())?,
            &dev,
            &load,
        )?),
        GanMode::Lgp => None,
    };
    let data = ctx.data()?;
    let (train_set, test_set) = (&data.train, &data.test);
    if train_set.is_empty() {
        return Err(Error::Data("the training clip set is empty".into()));
    }
    let frames = if p.frames == 0 {
        gen_pipe.settings.frames.min(train_set.frames)
    } else {
        p.frames.min(train_set.frames)
    };
    let unet_cfg: UNetConfig = crate::models::checkpoint::load_config(&gdir.join("unet"))?;
    let student = Student::new(
        &gdir.join("unet").join(WEIGHTS_FILE),
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
    let (t_map, t_unet) = unet_from(&gdir, &unet_cfg, &dev)?;
    let g_vars = student.vars();
    let t_vars: HashMap<String, Var> = named_vars(&t_map).into_iter().collect();
    let lc = gen_pipe.vae.config.latent_channels;
    // The SF-V backbone is the teacher's UNet: the `teacher` stage's (given, or the nearest
    // upstream one), else the generator's starting weights.
    let backbone_dir = match (&p.teacher, ctx.upstream_of_kind("teacher")) {
        (None, None) => gdir.clone(),
        _ => ctx.teacher_dir(p.teacher.as_deref())?,
    };
    let (d_map, disc) = build_discriminator(
        &p.discriminator,
        lc,
        ctx.seed,
        &ctx.assets,
        &backbone_dir,
        &dev,
    )?;
    let d_vars = named_vars(&d_map);
    let mut opt_g = AdamW::new(g_vars.clone(), p.optimizer_g.clone()).map_err(ce("optimizer"))?;
    let mut opt_d = AdamW::new(d_vars.clone(), p.optimizer_d.clone()).map_err(ce("optimizer"))?;
    let fps = data.fps();
    let latents = encode_all_cached(
        ctx,
        &gen_pipe.vae,
        &gdir.join("vae"),
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

    let (mut g_vars, mut t_vars, mut d_vars) = (g_vars, t_vars, d_vars);
    let mut start = 0;
    if let Some(mut state) = ctx.resume(&dev)? {
        state.restore("generator", &mut g_vars)?;
        state.restore("target", &mut t_vars)?;
        state.restore("discriminator", &mut d_vars)?;
        state.restore("optimizer_g", &mut opt_g)?;
        state.restore("optimizer_d", &mut opt_d)?;
        start = state.finish()?;
        ctx.note(&format!("resuming from step {start}"));
    }

    let m = if p.mode == GanMode::Acd {
        p.grid.solver_steps
    } else {
        0
    };
    let grid = PairGrid::new(p.grid.sigmas(), m);
    let guidance = SamplerConfig {
        min_guidance: p.min_guidance,
        max_guidance: p.max_guidance,
        ..Default::default()
    }
    .guidance(frames);
    let t_inner = SvdDenoiser { unet: &t_unet };
    let t_den = boundary.wrap(&t_inner);
    let teacher_den = teacher.as_ref().map(|t| SvdDenoiser { unet: &t.unet });
    let vae = (p.discriminator.input == DiscInput::Decoder).then_some(&gen_pipe.vae);

    // One training pair's random draws, in the order they have always been drawn: `b` clips
    // of `source` with their conditioning, grid indices, latent noise and (SF-V's latent
    // input) the discriminator's noise.
    let draw_pair = |rng: &mut NormalRng, source: &BatchSource, b: usize| -> Result<PairDraws> {
        let e = ce("gan step");
        let Batch { x0, cond } = source.draw(rng, &gen_pipe, b, &dev).map_err(&e)?;
        let ns = grid.draw(rng, b);
        let z = rng.tensor(x0.dims(), &dev).map_err(&e)?;
        let d_noise = match p.discriminator.input {
            DiscInput::Latent => Some(rng.tensor(x0.dims(), &dev).map_err(&e)?),
            _ => None,
        };
        Ok(PairDraws {
            x0,
            cond,
            ns,
            z,
            d_noise,
        })
    };
    // The pair of clips `r` of the draws: the discriminator's "real" and the student's "fake",
    // with the distance weights, the conditioning and the latent input's noise. A shard's
    // share of a step (`train::shard`): every clip's pair is its own.
    let pair_part = |d: &PairDraws, r: std::ops::Range<usize>, checkpointing: bool| {
        let e = ce("gan step");
        let (lo, b) = (r.start, r.len());
        let narrow = |t: &Tensor| t.narrow(0, lo, b).map_err(&e);
        let (x0, z) = (narrow(&d.x0)?, narrow(&d.z)?);
        let cond = d.cond.narrow(lo, b).map_err(&e)?;
        let ns = &d.ns[r];
        let d_noise = d.d_noise.as_ref().map(narrow).transpose()?;
        let s_hi = grid.at(ns, m, &dev).map_err(&e)?;
        let x_hi = (&x0
            + z.broadcast_mul(&s_hi.reshape((b, 1, 1, 1, 1)).map_err(&e)?)
                .map_err(&e)?)
        .map_err(&e)?;
        let (real, lambda) = match &teacher_den {
            Some(tden) => {
                let x_lo = teacher_solve(tden, &x_hi, ns, &grid, &cond, &guidance).map_err(&e)?;
                let real = t_den
                    .denoise(&x_lo, &grid.at(ns, 0, &dev).map_err(&e)?, &cond)
                    .map_err(&e)?
                    .detach();
                (real, grid.lambda(ns, p.weighting, &dev).map_err(&e)?)
            }
            None => (x0.clone(), unit_weights(b, &dev)?),
        };
        let g_inner = student.for_step(checkpointing)?;
        let fake = boundary
            .wrap(&g_inner)
            .denoise(&x_hi, &s_hi, &cond)
            .map_err(&e)?;
        Ok::<_, Error>(Pair {
            real,
            fake,
            lambda,
            cond,
            d_noise,
            g_inner,
        })
    };
    // The discriminator's loss on one pair, plus the approximated R1 term when it is on:
    // (loss, real logits, fake logits, R1).
    type Objective = (Tensor, Vec<Tensor>, Vec<Tensor>, Option<Tensor>);
    let d_objective = |real: &Tensor,
                       fake: &Tensor,
                       dc: Option<(&crate::diffusion::Conditioning, &Tensor)>,
                       r1_eps: Option<&Tensor>|
     -> Result<Objective> {
        let e = ce("gan discriminator step");
        let lr_real = disc.forward_cond(real, vae, dc).map_err(&e)?;
        let lr_fake = disc.forward_cond(fake, vae, dc).map_err(&e)?;
        let loss = d_loss(&lr_real, &lr_fake, p.gan_loss).map_err(&e)?;
        let Some(eps) = r1_eps.filter(|_| p.r1_weight > 0.0) else {
            return Ok((loss, lr_real, lr_fake, None));
        };
        let perturbed = (real + (eps * p.r1_sigma).map_err(&e)?).map_err(&e)?;
        let lp = disc.forward_cond(&perturbed, vae, dc).map_err(&e)?;
        let r1 = approx_r1(&lr_real, &lp).map_err(&e)?;
        let loss = (loss + (&r1 * p.r1_weight).map_err(&e)?).map_err(&e)?;
        Ok((loss, lr_real, lr_fake, Some(r1)))
    };
    // Held-out check of the discriminator: the same pairs of held-out test clips (same
    // windows, sigmas and noise at every evaluation), never trained on.
    let heldout_set = {
        let mut s = crate::data::ClipSet::new(test_set.frames, test_set.height, test_set.width);
        for i in 0..p.eval_clips.min(test_set.len()) {
            s.push(test_set.clip(i), 0, 0);
        }
        s
    };
    let heldout_latents = if heldout_set.is_empty() {
        Vec::new()
    } else {
        encode_all(&gen_pipe.vae, &heldout_set, &dev)?
    };
    let heldout = BatchSource {
        set: &heldout_set,
        latents: &heldout_latents,
        frames: frames.min(heldout_set.frames),
        fps,
    };
    let evaluate_d = |ctx: &mut StageContext<'_>, step: u64| -> Result<()> {
        if heldout_set.is_empty() {
            return Ok(());
        }
        let e = ce("gan held-out discriminator check");
        let mut rng = step_rng(ctx.seed ^ HELDOUT_SEED, 0);
        let (mut real_scores, mut fake_scores) = (Vec::new(), Vec::new());
        let mut left = heldout_set.len();
        while left > 0 {
            let b = left.min(p.batch_clips);
            let draws = draw_pair(&mut rng, &heldout, b)?;
            let pair = pair_part(&draws, 0..b, false)?;
            let dc = pair.d_noise.as_ref().map(|n| (&pair.cond, n));
            let fake = pair.fake.detach();
            real_scores.extend(
                clip_scores(&disc.forward_cond(&pair.real, vae, dc).map_err(&e)?).map_err(&e)?,
            );
            fake_scores
                .extend(clip_scores(&disc.forward_cond(&fake, vae, dc).map_err(&e)?).map_err(&e)?);
            left -= b;
        }
        let (acc, margin) = separation(&real_scores, &fake_scores);
        ctx.metric("d_heldout_accuracy", step, acc)?;
        ctx.metric("d_heldout_margin", step, margin)?;
        Ok(())
    };
    if start == 0 && p.eval_every > 0 {
        evaluate_d(ctx, 0)?;
    }

    // One shard's discriminator pass on clips `r` of a pair's draws (R1's noise `eps` for the
    // whole batch): its pair, its objective with the loss weighted by the shard's share of the
    // `b` clips, and that loss's gradients.
    let d_shard = |d: &PairDraws,
                   eps: Option<&Tensor>,
                   r: std::ops::Range<usize>,
                   b: usize,
                   checkpointing: bool|
     -> Result<(Pair<'_>, Objective, GradStore)> {
        let e = ce("gan discriminator step");
        let share = r.len() as f64 / b as f64;
        let eps = eps.map(|t| t.narrow(0, r.start, r.len())).transpose();
        let eps = eps.map_err(&e)?;
        let pair = pair_part(d, r, checkpointing)?;
        let dc = pair.d_noise.as_ref().map(|n| (&pair.cond, n));
        let (loss, lr_real, lr_fake, r1) =
            d_objective(&pair.real, &pair.fake.detach(), dc, eps.as_ref())?;
        let loss = (loss * share).map_err(&e)?;
        let grads = loss.backward().map_err(&e)?;
        Ok((pair, (loss, lr_real, lr_fake, r1), grads))
    };
    let shards = crate::train::shard::Shards::new(p.batch_clips).map_err(ce("shards"))?;
    for step in start..p.steps {
        ctx.check_interrupt(step)?;
        let t0 = std::time::Instant::now();
        let e = ce("gan step");
        let mut rng = step_rng(ctx.seed, step);
        let b = p.batch_clips;
        // The R1 term's perturbation of the real clips: drawn after the pair, as always.
        let r1_eps = |rng: &mut NormalRng, d: &PairDraws| {
            (p.r1_weight > 0.0)
                .then(|| rng.tensor(d.x0.dims(), &dev).map_err(&e))
                .transpose()
        };
        let draws = draw_pair(&mut rng, &source, b)?;
        let eps = r1_eps(&mut rng, &draws)?;
        // Every clip's pair and losses are its own: the batch runs as shards side by side
        // (`train::shard`), each with its own backward passes, the gradients summed.
        // Discriminator step on detached samples; each shard keeps its pair for the generator.
        let d_parts = shards.map(b, |r| -> Result<DShard<'_>> {
            let share = r.len() as f64 / b as f64;
            let (pair, (loss, lr_real, lr_fake, r1), grads) =
                d_shard(&draws, eps.as_ref(), r, b, p.gradient_checkpointing)?;
            let scalar = |t: &Tensor| t.to_scalar::<f32>().map(|v| v as f64).map_err(&e);
            Ok(DShard {
                loss: scalar(&loss)?,
                r1: r1.map(|r| scalar(&r).map(|v| v * share)).transpose()?,
                d_real: mean_logit(&lr_real).map_err(&e)? * share,
                d_fake: mean_logit(&lr_fake).map_err(&e)? * share,
                real_scores: clip_scores(&lr_real).map_err(&e)?,
                fake_scores: clip_scores(&lr_fake).map_err(&e)?,
                grads,
                pair,
            })
        })?;
        let sum_of = |f: &dyn Fn(&DShard<'_>) -> f64| d_parts.iter().map(f).sum::<f64>();
        let (loss_d, d_real, d_fake) = (
            sum_of(&|d| d.loss),
            sum_of(&|d| d.d_real),
            sum_of(&|d| d.d_fake),
        );
        if d_parts[0].r1.is_some() {
            ctx.metric("r1", step + 1, sum_of(&|d| d.r1.unwrap_or(0.0)))?;
        }
        let real_scores: Vec<f64> = d_parts.iter().flat_map(|d| d.real_scores.clone()).collect();
        let fake_scores: Vec<f64> = d_parts.iter().flat_map(|d| d.fake_scores.clone()).collect();
        let mut pairs = Vec::with_capacity(d_parts.len());
        let mut d_grads = Vec::with_capacity(d_parts.len());
        for d in d_parts {
            d_grads.push(([d.loss], d.grads));
            pairs.push(d.pair);
        }
        let (_, grads_d) = crate::train::shard::sum(d_grads).map_err(&e)?;
        let lr = p.optimizer_d.lr_at(step, p.steps);
        let gnorm_d = opt_d.step(&grads_d, lr).map_err(&e)?;
        // Further discriminator updates on fresh pairs (`d_steps` > 1), drawn after this
        // step's pair so that `d_steps = 1` draws exactly what it always did.
        for _ in 1..p.d_steps {
            let extra = draw_pair(&mut rng, &source, b)?;
            let eps = r1_eps(&mut rng, &extra)?;
            let parts = shards.map(b, |r| -> Result<([f64; 1], GradStore)> {
                let (_, (l, ..), g) = d_shard(&extra, eps.as_ref(), r, b, false)?;
                Ok(([l.to_scalar::<f32>().map_err(&e)? as f64], g))
            })?;
            let (_, g) = crate::train::shard::sum(parts).map_err(&e)?;
            opt_d.step(&g, lr).map_err(&e)?;
        }

        // Generator step through the updated discriminator, each shard on its own pair.
        let g_parts = shards.run(pairs, |_, pair| -> Result<([f64; 3], GradStore)> {
            let b_shard = pair.fake.dim(0).map_err(&e)?;
            let share = b_shard as f64 / b as f64;
            let dc = pair.d_noise.as_ref().map(|n| (&pair.cond, n));
            let lf = disc.forward_cond(&pair.fake, vae, dc).map_err(&e)?;
            let adv = (g_loss(&lf, p.gan_loss).map_err(&e)? * share).map_err(&e)?;
            let dist = (distance(&pair.fake, &pair.real, p.distance, p.huber_c).map_err(&e)?
                * &pair.lambda)
                .and_then(|v| v.mean_all())
                .and_then(|v| v * share)
                .map_err(&e)?;
            let loss_g = ((&adv * p.adv_weight).map_err(&e)? + &dist).map_err(&e)?;
            let mut grads = loss_g.backward().map_err(&e)?;
            pair.g_inner.merge_into(&mut grads)?;
            let scalar = |t: &Tensor| t.to_scalar::<f32>().map(|v| v as f64).map_err(&e);
            Ok(([scalar(&loss_g)?, scalar(&adv)?, scalar(&dist)?], grads))
        })?;
        let ([lg, adv, dist], grads_g) = crate::train::shard::sum(g_parts).map_err(&e)?;
        let lr = p.optimizer_g.lr_at(step, p.steps);
        let gnorm_g = opt_g.step(&grads_g, lr).map_err(&e)?;
        if p.mode == GanMode::Acd {
            ema_update(&t_vars, &student.merged()?, p.ema_decay).map_err(&e)?;
        }
        ctx.metric("loss_g", step + 1, lg)?;
        ctx.metric("loss_d", step + 1, loss_d)?;
        ctx.metric("loss_adv", step + 1, adv)?;
        ctx.metric("loss_distill", step + 1, dist)?;
        ctx.metric("d_real", step + 1, d_real)?;
        ctx.metric("d_fake", step + 1, d_fake)?;
        let (acc, _) = separation(&real_scores, &fake_scores);
        ctx.metric("d_accuracy", step + 1, acc)?;
        ctx.metric("grad_norm_g", step + 1, gnorm_g)?;
        ctx.metric("grad_norm_d", step + 1, gnorm_d)?;
        ctx.metric("step_seconds", step + 1, t0.elapsed().as_secs_f64())?;
        ctx.progress(step + 1, p.steps, &format!("loss_g {lg:.4}"));
        let done = step + 1 == p.steps;
        if done || (p.eval_every > 0 && (step + 1) % p.eval_every == 0) {
            evaluate_d(ctx, step + 1)?;
        }
        if (p.checkpoint_every > 0 && (step + 1) % p.checkpoint_every == 0) || done {
            let state = TrainState::new(step + 1)
                .with("generator", &g_vars)
                .with("target", &t_vars)
                .with("discriminator", &d_vars)
                .with("optimizer_g", &opt_g)
                .with("optimizer_d", &opt_d);
            ctx.checkpoint(&state)?;
        }
    }

    let settings = PipelineSettings {
        frames,
        sampler: p.sampler.clone(),
        consistency: Some(boundary),
        ..gen_pipe.settings.clone()
    };
    export_student(&ctx.dir, &student, &unet_cfg, &gdir, &settings)?;
    drop(gen_pipe);
    drop(teacher);
    write_samples(ctx, p.sample_clips, p.steps, test_set, p.dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separation_counts_clips_on_the_right_side_of_zero() {
        // Chance: every score 0 is on neither side.
        assert_eq!(separation(&[0.0, 0.0], &[0.0, 0.0]), (0.0, 0.0));
        // 2 of 3 real above 0, 1 of 2 fake below 0.
        let (acc, margin) = separation(&[1.0, 2.0, -0.5], &[-1.0, 3.0]);
        assert!((acc - 3.0 / 5.0).abs() < 1e-12);
        assert!((margin - (2.5 / 3.0 - 1.0)).abs() < 1e-12);
        // A perfect discriminator.
        assert_eq!(separation(&[0.1], &[-0.1]).0, 1.0);
    }

    #[test]
    fn clip_scores_average_within_then_across_heads() {
        let dev = candle_core::Device::Cpu;
        let a = Tensor::new(&[[1f32, 3.0], [0.0, 0.0]], &dev).unwrap();
        let b = Tensor::new(&[[4f32], [-2.0]], &dev).unwrap();
        let s = clip_scores(&[a, b]).unwrap();
        assert_eq!(s, vec![3.0, -1.0]);
    }
}
