//! Stage `autoencoder`: trains SVD's temporal VAE ([`AutoencoderKLTemporalDecoder`]) on the
//! clips of the upstream `data` stage, or starts from a diffusers checkpoint (`pretrained`),
//! and writes it in diffusers' layout to `vae/`.
//!
//! Loss: reconstruction (L1 or L2, per pixel) of `frames` consecutive frames decoded together
//! (the decoder is temporal) from posterior samples (or, with `posterior = "mode"`, from the
//! posterior mean: a deterministic autoencoder), plus `kl_weight` x the KL divergence to
//! N(0, I) per latent element (the KL-regularised autoencoder of Rombach et al. 2022; the
//! adversarial and perceptual terms of SD's VAE training are not implemented). After training,
//! `scaling_factor` is set to 1 / std of the training latents, as it was computed for SD.
//! Metrics: `loss`, `recon`, `kl` per step; `psnr_test` (dB, on full test clips) and
//! `colour_offset_test` (mean absolute per-frame, per-channel mean-colour error, [0, 1] units:
//! the global colour shift GroupNorm can cause) every `eval_every` steps and at the end;
//! `scaling_factor`.

use super::{resolve_typed, ParamError, StageContext, StageKind};
use crate::data::ClipSet;
use crate::error::{Error, Result};
use crate::models::{load_component, save_component, AutoencoderKLTemporalDecoder, VaeConfig};
use crate::train::optim::named_vars;
use crate::train::state::TrainState;
use crate::train::{
    ce, clip_batch, clip_frames, device, random_windows, step_rng, AdamW, AdamWConfig,
};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// What the decoder sees during training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Posterior {
    /// A sample of the posterior (the KL-regularised VAE of SD/SVD).
    #[default]
    Sample,
    /// Its mean: a deterministic autoencoder (as DC-AE), the KL term only keeps latents near
    /// N(0, I) in scale. A toy-scale deviation: the posterior noise, not capacity, is what the
    /// small VAE spends its first thousands of steps fighting.
    Mode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recon {
    L1,
    L2,
}

/// Parameters of the `autoencoder` stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AutoencoderParams {
    /// The architecture, as diffusers' `config.json` fields (omitted fields take diffusers'
    /// defaults; the default table is `VaeConfig::tiny()`: widths 32, 64, 64, 4x downsampling).
    pub vae: VaeConfig,
    /// A diffusers VAE folder (`config.json` + `diffusion_pytorch_model.safetensors`) to start
    /// from instead of random weights; its config replaces `vae`. Relative to the working dir.
    pub pretrained: Option<String>,
    /// Optimizer steps (0 with `pretrained` exports the checkpoint as is).
    pub steps: u64,
    /// Clips per step.
    pub batch_clips: usize,
    /// Consecutive frames per clip per step (decoded together by the temporal decoder).
    pub frames: usize,
    pub optimizer: AdamWConfig,
    /// Weight of the KL term (per latent element, relative to the per-pixel reconstruction).
    pub kl_weight: f64,
    /// Reconstruction loss: l1 or l2.
    pub recon: Recon,
    /// Decode a posterior `sample` (default) or its `mode` (mean) during training.
    #[serde(skip_serializing_if = "is_default_posterior")]
    pub posterior: Posterior,
    /// Steps between test-set PSNR evaluations (0 = only at the end).
    pub eval_every: u64,
    /// Test clips used for PSNR.
    pub eval_clips: usize,
    /// Steps between checkpoints (not part of the stage's identity).
    pub checkpoint_every: u64,
}

fn is_default_posterior(p: &Posterior) -> bool {
    *p == Posterior::Sample
}

impl Default for AutoencoderParams {
    fn default() -> Self {
        Self {
            vae: VaeConfig::tiny(),
            pretrained: None,
            steps: 1500,
            batch_clips: 4,
            frames: 4,
            optimizer: AdamWConfig {
                lr: 5e-4,
                warmup: 50,
                ..Default::default()
            },
            kl_weight: 1e-6,
            recon: Recon::L1,
            posterior: Posterior::Sample,
            eval_every: 500,
            eval_clips: 16,
            checkpoint_every: 100,
        }
    }
}

impl AutoencoderParams {
    fn check(&self) -> std::result::Result<(), ParamError> {
        let bad = |path: &str, message: String| ParamError {
            path: path.into(),
            message,
        };
        if self.pretrained.is_none() {
            self.vae.validate().map_err(|m| bad("vae", m))?;
        }
        if self.batch_clips == 0 {
            return Err(bad("batch_clips", "must be at least 1".into()));
        }
        if self.frames == 0 {
            return Err(bad("frames", "must be at least 1".into()));
        }
        if self.steps > 0 && self.optimizer.lr <= 0.0 {
            return Err(bad("optimizer.lr", "must be positive".into()));
        }
        Ok(())
    }
}

pub struct AutoencoderStage;

impl StageKind for AutoencoderStage {
    fn name(&self) -> &'static str {
        "autoencoder"
    }
    fn version(&self) -> u32 {
        1
    }
    fn seeded(&self) -> bool {
        true
    }
    fn resolve(&self, params: toml::Value) -> Result<toml::Value, ParamError> {
        let (p, v) = resolve_typed::<AutoencoderParams>(params)?;
        p.check()?;
        Ok(v)
    }
    fn fingerprint(&self, params: &toml::Value) -> Result<Option<String>> {
        let p: AutoencoderParams = params
            .clone()
            .try_into()
            .map_err(|e| Error::Other(format!("autoencoder params: {e}")))?;
        match p.pretrained {
            Some(dir) => {
                let f = Path::new(&dir).join(crate::models::checkpoint::WEIGHTS_FILE);
                Ok(Some(crate::util::sha256_file(&f)?))
            }
            None => Ok(None),
        }
    }
    fn run(&self, ctx: &mut StageContext<'_>) -> Result<()> {
        let p: AutoencoderParams = ctx.params()?;
        train(ctx, &p)
    }
}

fn train(ctx: &mut StageContext<'_>, p: &AutoencoderParams) -> Result<()> {
    let dev = device(ctx.device)?;
    let data = ctx.data()?;
    let (train_set, test_set) = (&data.train, &data.test);
    if train_set.is_empty() {
        return Err(Error::Data("the training clip set is empty".into()));
    }
    let frames = p.frames.min(train_set.frames);
    let varmap = VarMap::new();
    let (cfg, vae) = match &p.pretrained {
        Some(dir) => {
            let (cfg, vae, vm) =
                load_component(Path::new(dir), &dev, AutoencoderKLTemporalDecoder::new)?;
            // Copy the loaded variables into our map so they train and save like fresh ones.
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
            let fresh = AutoencoderKLTemporalDecoder::new(vb, &cfg).map_err(ce("VAE"))?;
            let src = named_vars(&vm);
            for (name, var) in named_vars(&varmap) {
                if let Some((_, s)) = src.iter().find(|(n, _)| *n == name) {
                    var.set(s.as_tensor()).map_err(ce("VAE"))?;
                }
            }
            drop(vae);
            (cfg, fresh)
        }
        None => {
            let vb = crate::train::seeded_varbuilder(&varmap, ctx.seed, &dev);
            let vae = AutoencoderKLTemporalDecoder::new(vb, &p.vae).map_err(ce("VAE"))?;
            (p.vae.clone(), vae)
        }
    };
    let f = cfg.downsample_factor();
    if train_set.height % f != 0 || train_set.width % f != 0 {
        return Err(Error::Data(format!(
            "clips are {}x{} but the VAE downsamples by {f}: sizes must be multiples of {f}",
            train_set.width, train_set.height
        )));
    }
    let vars = named_vars(&varmap);
    let mut opt = AdamW::new(vars.clone(), p.optimizer.clone()).map_err(ce("optimizer"))?;
    let mut vars = vars;
    let mut start = 0;
    if let Some(mut state) = ctx.resume(&dev)? {
        state.restore("vae", &mut vars)?;
        state.restore("optimizer", &mut opt)?;
        start = state.finish()?;
        ctx.note(&format!("resuming from step {start}"));
    }

    let shards = crate::train::shard::Shards::new(p.batch_clips).map_err(ce("shards"))?;
    for step in start..p.steps {
        ctx.check_interrupt(step)?;
        let t0 = std::time::Instant::now();
        let mut rng = step_rng(ctx.seed, step);
        let (idx, starts) = random_windows(
            &mut rng,
            train_set.len(),
            train_set.frames,
            frames,
            p.batch_clips,
        );
        let e = ce("autoencoder step");
        let x = clip_batch(&train_set, &idx, &starts, frames, &dev).map_err(&e)?;
        let (b, t, c, h, w) = x.dims5().map_err(&e)?;
        // The posterior sample's noise for the whole batch, drawn as before from the latent
        // shape, so that the clips can be split into shards run side by side
        // (`train::shard`): every clip's loss is its own.
        let f = vae.config.downsample_factor();
        let lat = [b * t, vae.config.latent_channels, h / f, w / f];
        let eps = match p.posterior {
            Posterior::Sample => Some(rng.tensor(&lat, &dev).map_err(&e)?),
            Posterior::Mode => None,
        };
        let latent_elems: usize = lat[1..].iter().product();
        let parts = shards.map(b, |r| -> Result<([f64; 3], GradStore)> {
            let (lo, n) = (r.start, r.len());
            let share = n as f64 / b as f64;
            let x = x
                .narrow(0, lo, n)
                .and_then(|x| x.reshape((n * t, c, h, w)))
                .map_err(&e)?;
            let post = vae.encode(&x).map_err(&e)?;
            let z = match &eps {
                Some(eps) => {
                    let eps = eps.narrow(0, lo * t, n * t).map_err(&e)?;
                    post.sample_with(&eps).map_err(&e)?
                }
                None => post.mode().clone(),
            };
            let xr = vae.decode(&z, t).map_err(&e)?;
            let diff = (xr - &x).map_err(&e)?;
            let recon = match p.recon {
                Recon::L1 => diff.abs(),
                Recon::L2 => diff.sqr(),
            }
            .and_then(|d| d.mean_all())
            .and_then(|d| d * share)
            .map_err(&e)?;
            let kl = (post.kl().map_err(&e)?.mean_all().map_err(&e)?
                / (latent_elems as f64 / share))
                .map_err(&e)?;
            let loss = (&recon + (&kl * p.kl_weight).map_err(&e)?).map_err(&e)?;
            let grads = loss.backward().map_err(&e)?;
            let scalar = |t: &Tensor| t.to_scalar::<f32>().map(|v| v as f64).map_err(&e);
            Ok(([scalar(&loss)?, scalar(&recon)?, scalar(&kl)?], grads))
        })?;
        let ([lv, recon, kl], grads) = crate::train::shard::sum(parts).map_err(&e)?;
        let lr = p.optimizer.lr_at(step, p.steps);
        let gnorm = opt.step(&grads, lr).map_err(&e)?;
        ctx.metric("loss", step + 1, lv)?;
        ctx.metric("recon", step + 1, recon)?;
        ctx.metric("kl", step + 1, kl)?;
        ctx.metric("grad_norm", step + 1, gnorm)?;
        ctx.metric("step_seconds", step + 1, t0.elapsed().as_secs_f64())?;
        ctx.progress(step + 1, p.steps, &format!("loss {lv:.4}"));
        let done = step + 1 == p.steps;
        if p.eval_every > 0 && (step + 1) % p.eval_every == 0 && !done {
            let (psnr, colour) = test_psnr(&vae, &test_set, p.eval_clips, &dev)?;
            ctx.metric("psnr_test", step + 1, psnr)?;
            ctx.metric("colour_offset_test", step + 1, colour)?;
        }
        if (p.checkpoint_every > 0 && (step + 1) % p.checkpoint_every == 0) || done {
            let state = TrainState::new(step + 1)
                .with("vae", &vars)
                .with("optimizer", &opt);
            ctx.checkpoint(&state)?;
        }
    }

    // Scaling factor: 1 / std of training latents (posterior means), as computed for SD.
    let mut cfg = cfg;
    if p.steps > 0 || p.pretrained.is_none() {
        let std = latent_std(&vae, &train_set, 32, &dev)?;
        cfg.scaling_factor = 1.0 / std.max(1e-6);
    }
    ctx.metric("scaling_factor", p.steps, cfg.scaling_factor)?;
    let (psnr, colour) = test_psnr(&vae, &test_set, p.eval_clips, &dev)?;
    ctx.metric("psnr_test", p.steps, psnr)?;
    ctx.metric("colour_offset_test", p.steps, colour)?;
    save_component(&ctx.dir.join("vae"), &cfg, &varmap)?;
    write_recon_preview(ctx, &vae, &test_set, &dev)?;
    ctx.note(&format!(
        "test PSNR {psnr:.2} dB, scaling factor {:.4}",
        cfg.scaling_factor
    ));
    Ok(())
}

/// Mean PSNR (dB, pixels in [0, 1]) of reconstructions (posterior mode) of the first `n` test
/// clips, each decoded as a whole clip, and their colour offset: the mean absolute difference
/// between each frame's per-channel mean and its reconstruction's, in [0, 1] pixel units (the
/// part of the error that is a global colour shift).
pub fn test_psnr(
    vae: &AutoencoderKLTemporalDecoder,
    test: &ClipSet,
    n: usize,
    dev: &candle_core::Device,
) -> Result<(f64, f64)> {
    let n = n.min(test.len());
    if n == 0 {
        return Ok((f64::NAN, f64::NAN));
    }
    let e = ce("test PSNR");
    let mut total = 0.0;
    let mut colour = 0.0;
    for i in 0..n {
        let x = clip_frames(test, i, dev).map_err(&e)?;
        let t = x.dim(0).map_err(&e)?;
        let xr = vae
            .encode(&x)
            .and_then(|p| vae.decode(p.mode(), t))
            .map_err(&e)?;
        let xr = xr.clamp(-1f32, 1f32).map_err(&e)?;
        // Per-frame, per-channel means ((t, 3) of (t, 3, h, w)); half for [0, 1] units.
        colour += ((xr.mean((2, 3)).map_err(&e)? - x.mean((2, 3)).map_err(&e)?).map_err(&e)? * 0.5)
            .and_then(|d| d.abs())
            .and_then(|d| d.mean_all())
            .and_then(|d| d.to_scalar::<f32>())
            .map_err(&e)? as f64;
        // Pixel error in [0, 1] units: half the error in [-1, 1] units.
        let mse = ((xr - &x).map_err(&e)? * 0.5)
            .and_then(|d| d.sqr())
            .and_then(|d| d.mean_all())
            .and_then(|d| d.to_scalar::<f32>())
            .map_err(&e)? as f64;
        total += -10.0 * mse.max(1e-12).log10();
    }
    Ok((total / n as f64, colour / n as f64))
}

fn latent_std(
    vae: &AutoencoderKLTemporalDecoder,
    set: &ClipSet,
    n: usize,
    dev: &candle_core::Device,
) -> Result<f64> {
    let e = ce("latent statistics");
    let n = n.min(set.len());
    let (mut s, mut s2, mut cnt) = (0f64, 0f64, 0f64);
    for i in 0..n {
        let x = clip_frames(set, i, dev).map_err(&e)?;
        let z = vae.encode(&x).map_err(&e)?.mean;
        let v: Vec<f32> = z.flatten_all().and_then(|z| z.to_vec1()).map_err(&e)?;
        for a in v {
            s += a as f64;
            s2 += (a as f64) * (a as f64);
            cnt += 1.0;
        }
    }
    let mean = s / cnt.max(1.0);
    Ok((s2 / cnt.max(1.0) - mean * mean).max(0.0).sqrt())
}

/// `recon.png`: test clips (rows 1, 3, ..) above their reconstructions (rows 2, 4, ..).
fn write_recon_preview(
    ctx: &mut StageContext<'_>,
    vae: &AutoencoderKLTemporalDecoder,
    test: &ClipSet,
    dev: &candle_core::Device,
) -> Result<()> {
    let e = ce("reconstruction preview");
    let mut strip = ClipSet::new(test.frames, test.height, test.width);
    for i in 0..test.len().min(4) {
        let x = clip_frames(test, i, dev).map_err(&e)?;
        let t = x.dim(0).map_err(&e)?;
        let xr = vae
            .encode(&x)
            .and_then(|p| vae.decode(p.mode(), t))
            .map_err(&e)?;
        strip.push(test.clip(i), 0, 0);
        strip.push(&crate::train::to_u8_frames(&xr).map_err(&e)?, 0, 0);
    }
    let path = ctx.dir.join("recon.png");
    strip
        .filmstrip(strip.len())
        .save(&path)
        .map_err(|err| Error::Other(format!("{}: {err}", path.display())))?;
    ctx.artifact("recon.png", "filmstrip")
}
