//! Stage `teacher`: trains the SVD-architecture image-to-video model (spatio-temporal UNet and
//! image encoder) with EDM on latents of the upstream `autoencoder`'s VAE, and writes a
//! pipeline folder (`vae/`, `unet/`, `image_encoder/`, `onestep.json`) that `onestep generate`
//! and the distillation stages load. See docs/models.md.
//!
//! Training follows SVD (Blattmann et al. 2023, arXiv 2311.15127, and its generative-models
//! config): ln(sigma) ~ N(P_mean, P_std^2), EDM loss weighting, v-prediction preconditioning;
//! the conditioning frame is noise-augmented with strength ~ LogNormal(-3, 0.5) before VAE
//! encoding; image latent and embedding are dropped together with probability `p_uncond` so
//! classifier-free guidance works; fps and a motion bucket (from frame differences) enter as
//! added time ids. The exported weights are the EMA of the trained ones.
//! Metrics: `loss` per step (EDM-weighted MSE), `grad_norm`; at the end `sample_nfe`,
//! `sample_motion` / `real_motion` (mean absolute frame difference of generated / real test
//! clips, pixels in [0, 1]) and `sample_first_frame_psnr` (how well the generated first frame
//! keeps the conditioning image); with `eval_every`, `heldout_loss` and `train_fixed_loss` (the
//! same fixed denoising loss on test and on training clips, EMA weights).

use super::{resolve_typed, ParamError, StageContext, StageKind};
use crate::data::ClipSet;
use crate::device::Precision;
use crate::diffusion::noise::NormalRng;
use crate::diffusion::{Conditioning, Denoiser, EdmLoss, SamplerConfig, SvdDenoiser};
use crate::error::{Error, IoContext, Result};
use crate::models::checkpoint::{load_weights, load_weights_files, weight_files};
use crate::models::{
    load_component, save_component, AutoencoderKLTemporalDecoder, ImageEncoder, ImageEncoderConfig,
    UNetConfig, UNetSpatioTemporal,
};
use crate::pipeline::{
    is_clip_folder, GenerateOptions, LoadOptions, PipelineSettings, VideoPipeline,
};
use crate::train::optim::{named_vars, Ema};
use crate::train::state::TrainState;
use crate::train::{
    ce, clip_batch, clip_frames, device, random_windows, step_rng, AdamW, AdamWConfig,
};
use candle_core::Tensor;
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// How the motion bucket id of a training clip is chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MotionBucket {
    /// The same id for every clip.
    Fixed(f64),
    /// `"frame_difference"`: round(motion_scale x mean |frame_t+1 - frame_t|), pixels in
    /// [0, 1], clamped to [0, 255] (SVD derives its buckets from optical flow instead).
    Rule(String),
}

/// Parameters of the `teacher` stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TeacherParams {
    /// The UNet, as diffusers' `config.json` fields (default `UNetConfig::tiny()`, 1.33 M
    /// parameters). `in_channels` must be twice and `out_channels` equal to the VAE's latent
    /// channels.
    pub unet: UNetConfig,
    /// The small trainable image encoder (`embed_dim` = the UNet's `cross_attention_dim`).
    pub image_encoder: ImageEncoderConfig,
    /// A folder with `unet/` (and optionally `image_encoder/`) in diffusers' layout to start
    /// from; its configs replace `unet` / `image_encoder`.
    pub pretrained: Option<String>,
    pub steps: u64,
    /// Clips per step.
    pub batch_clips: usize,
    /// Frames per training clip (0 = all frames of the data stage's clips).
    pub frames: usize,
    pub optimizer: AdamWConfig,
    /// EDM noise-level distribution.
    pub edm: EdmLoss,
    /// EMA decay of the exported weights (with EDM's warm-up; 0 = export the raw weights).
    pub ema_decay: f64,
    /// Probability of dropping the image conditioning (latent and embedding) in training.
    pub p_uncond: f64,
    /// ln of the conditioning noise augmentation ~ N(mean, std^2) in training (SVD: -3, 0.5).
    pub noise_aug_mean: f64,
    pub noise_aug_std: f64,
    /// Augmentation strength used when sampling (SVD's default 0.02).
    pub noise_aug_strength: f64,
    /// `"frame_difference"` or a fixed id.
    pub motion_bucket: MotionBucket,
    /// Multiplier of the frame-difference rule.
    pub motion_scale: f64,
    /// Sampler of the preview samples (and the default of `onestep generate`).
    pub sampler: SamplerConfig,
    /// Test clips sampled at the end (first frame as conditioning).
    pub sample_clips: usize,
    /// Steps between checkpoints (not part of the stage's identity).
    pub checkpoint_every: u64,
    /// Steps between evaluations of the fixed denoising loss (0 = none, left out of the
    /// identity): `heldout_loss` on the first `eval_clips` test clips and `train_fixed_loss` on
    /// as many training clips, both with the EMA weights, fixed noise and four fixed noise
    /// levels, so the two curves differ only by the clips; their gap tells overfitting from
    /// underfitting. Also at step 0 of a fresh run (a pretrained teacher with `steps = 0`
    /// gets exactly that one evaluation).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub eval_every: u64,
    /// Clips of each set in that evaluation (left out of the identity at its default, 32).
    #[serde(
        default = "default_eval_clips",
        skip_serializing_if = "is_default_eval_clips"
    )]
    pub eval_clips: usize,
    /// Dtype the preview samples are generated in ([`Precision`]; the UNet trains in f32):
    /// f32 (default, left out of the identity), bf16 or f16.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub dtype: Precision,
}

impl Default for TeacherParams {
    fn default() -> Self {
        Self {
            unet: UNetConfig::tiny(),
            image_encoder: ImageEncoderConfig::default(),
            pretrained: None,
            steps: 3000,
            batch_clips: 4,
            frames: 0,
            optimizer: AdamWConfig {
                lr: 3e-4,
                warmup: 100,
                ..Default::default()
            },
            edm: EdmLoss::default(),
            ema_decay: 0.999,
            p_uncond: 0.1,
            noise_aug_mean: -3.0,
            noise_aug_std: 0.5,
            noise_aug_strength: 0.02,
            motion_bucket: MotionBucket::Rule("frame_difference".into()),
            motion_scale: 1000.0,
            sampler: SamplerConfig::default(),
            sample_clips: 4,
            checkpoint_every: 200,
            eval_every: 0,
            eval_clips: default_eval_clips(),
            dtype: Precision::F32,
        }
    }
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn default_eval_clips() -> usize {
    32
}

fn is_default_eval_clips(v: &usize) -> bool {
    *v == default_eval_clips()
}

impl TeacherParams {
    fn check(&self) -> std::result::Result<(), ParamError> {
        let bad = |path: &str, message: String| ParamError {
            path: path.into(),
            message,
        };
        if self.pretrained.is_none() {
            self.unet.validate().map_err(|m| bad("unet", m))?;
            let n = self.unet.block_out_channels.len();
            for i in 0..n {
                let c = self
                    .unet
                    .cross_attention_dim
                    .at(i, n)
                    .map_err(|m| bad("unet.cross_attention_dim", m))?;
                if c != self.image_encoder.embed_dim {
                    return Err(bad(
                        "image_encoder.embed_dim",
                        format!(
                            "is {} but the UNet's cross_attention_dim is {c}",
                            self.image_encoder.embed_dim
                        ),
                    ));
                }
            }
        }
        if let MotionBucket::Rule(r) = &self.motion_bucket {
            if r != "frame_difference" {
                return Err(bad(
                    "motion_bucket",
                    format!("`{r}`: expected \"frame_difference\" or a number"),
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.p_uncond) {
            return Err(bad("p_uncond", "must be in [0, 1]".into()));
        }
        if self.batch_clips == 0 {
            return Err(bad("batch_clips", "must be at least 1".into()));
        }
        if self.eval_every > 0 && self.eval_clips == 0 {
            return Err(bad(
                "eval_clips",
                "must be at least 1 when eval_every is set".into(),
            ));
        }
        self.sampler.validate().map_err(|m| bad("sampler", m))?;
        Ok(())
    }
}

pub struct TeacherStage;

impl StageKind for TeacherStage {
    fn name(&self) -> &'static str {
        "teacher"
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
    fn resolve(&self, params: toml::Value) -> Result<toml::Value, ParamError> {
        let (p, v) = resolve_typed::<TeacherParams>(params)?;
        p.check()?;
        Ok(v)
    }
    fn fingerprint(&self, params: &toml::Value) -> Result<Option<String>> {
        let p: TeacherParams = params
            .clone()
            .try_into()
            .map_err(|e| Error::Other(format!("teacher params: {e}")))?;
        match p.pretrained {
            Some(dir) => {
                // The UNet's weights (one file: its sha256, as before SVD folders loaded; several
                // shards: the sha256 of their sha256s), then a CLIP image encoder's likewise.
                let d = Path::new(&dir);
                let files = weight_files(&d.join("unet"), "diffusion_pytorch_model", None)?;
                let mut print = files_digest(&files)?;
                let enc = d.join("image_encoder");
                if is_clip_folder(&enc) {
                    print = format!(
                        "{print}+clip:{}",
                        files_digest(&weight_files(&enc, "model", None)?)?
                    );
                }
                Ok(Some(print))
            }
            None => Ok(None),
        }
    }
    fn run(&self, ctx: &mut StageContext<'_>) -> Result<()> {
        let p: TeacherParams = ctx.params()?;
        train(ctx, &p)
    }
}

fn files_digest(files: &[std::path::PathBuf]) -> Result<String> {
    if let [one] = files {
        return crate::util::sha256_file(one);
    }
    let mut all = String::new();
    for f in files {
        all.push_str(&crate::util::sha256_file(f)?);
    }
    use sha2::Digest;
    Ok(hex::encode(sha2::Sha256::digest(all.as_bytes())))
}

/// The teacher's image encoder: onestep's small one, trained with the UNet, or SVD's CLIP
/// (frozen, as in SVD), from a pretrained folder.
enum TeacherEncoder {
    Trained(ImageEncoder),
    Clip(crate::pipeline::ImageEmbedder),
}

/// The motion bucket id of each clip of a set.
fn motion_buckets(set: &ClipSet, p: &TeacherParams) -> Vec<f64> {
    (0..set.len())
        .map(|i| match &p.motion_bucket {
            MotionBucket::Fixed(v) => *v,
            MotionBucket::Rule(_) => (p.motion_scale * clip_motion(set.clip(i), set.frames))
                .round()
                .clamp(0.0, 255.0),
        })
        .collect()
}

/// Mean absolute difference between consecutive frames, pixels in [0, 1].
pub fn clip_motion(clip: &[u8], frames: usize) -> f64 {
    if frames < 2 {
        return 0.0;
    }
    let n = clip.len() / frames;
    let mut s = 0u64;
    for f in 1..frames {
        let (a, b) = (&clip[(f - 1) * n..f * n], &clip[f * n..(f + 1) * n]);
        s += a
            .iter()
            .zip(b)
            .map(|(x, y)| x.abs_diff(*y) as u64)
            .sum::<u64>();
    }
    s as f64 / ((frames - 1) * n) as f64 / 255.0
}

/// The clips of one denoising batch: windows `starts[j]..` of clips `idx[j]` of `set`, with the
/// set's latents and motion buckets.
struct Batch<'a> {
    set: &'a ClipSet,
    latents: &'a [Tensor],
    buckets: &'a [f64],
    idx: &'a [usize],
    starts: &'a [usize],
}

impl<'a> Batch<'a> {
    /// Samples `r` of the batch (a shard of [`crate::train::shard::Shards`]).
    fn part(&self, r: std::ops::Range<usize>) -> Self {
        Batch {
            set: self.set,
            latents: self.latents,
            buckets: self.buckets,
            idx: &self.idx[r.clone()],
            starts: &self.starts[r],
        }
    }
}

/// The random draws of one denoising batch: conditioning augmentation strengths and noise,
/// which conditionings are kept, noise levels and the latents' noise.
struct Draws {
    aug: Vec<f64>,
    eps_img: Tensor,
    keep: Vec<f32>,
    sigma: Vec<f32>,
    noise: Tensor,
}

impl Draws {
    /// Samples `r` of the batch's draws.
    fn part(&self, r: std::ops::Range<usize>) -> candle_core::Result<Self> {
        let (lo, n) = (r.start, r.len());
        Ok(Self {
            aug: self.aug[r.clone()].to_vec(),
            eps_img: self.eps_img.narrow(0, lo, n)?,
            keep: self.keep[r.clone()].to_vec(),
            sigma: self.sigma[r].to_vec(),
            noise: self.noise.narrow(0, lo, n)?,
        })
    }

    /// A training step's, in the order its generator has always been drawn from (so resumed
    /// and earlier runs draw the same).
    fn training(
        rng: &mut NormalRng,
        p: &TeacherParams,
        img: [usize; 4],
        lat: &[usize],
        dev: &candle_core::Device,
    ) -> candle_core::Result<Self> {
        let b = img[0];
        let aug = (0..b)
            .map(|_| (p.noise_aug_mean + p.noise_aug_std * rng.normal()).exp())
            .collect();
        let eps_img = rng.tensor(&img, dev)?;
        let keep = (0..b)
            .map(|_| if rng.uniform() < p.p_uncond { 0.0 } else { 1.0 })
            .collect();
        let sigma = (0..b)
            .map(|_| p.edm.sigma_from_normal(rng.normal()) as f32)
            .collect();
        let noise = rng.tensor(lat, dev)?;
        Ok(Self {
            aug,
            eps_img,
            keep,
            sigma,
            noise,
        })
    }

    /// The fixed evaluation's: the median augmentation strength, every conditioning kept, one
    /// noise level `sigma` for the whole batch.
    fn fixed(
        rng: &mut NormalRng,
        p: &TeacherParams,
        img: [usize; 4],
        lat: &[usize],
        sigma: f64,
        dev: &candle_core::Device,
    ) -> candle_core::Result<Self> {
        let b = img[0];
        Ok(Self {
            aug: vec![p.noise_aug_mean.exp(); b],
            eps_img: rng.tensor(&img, dev)?,
            keep: vec![1.0; b],
            sigma: vec![sigma as f32; b],
            noise: rng.tensor(lat, dev)?,
        })
    }
}

/// `[b, frames, c, h, w]`: a batch of `b` windows of `frames` latent frames.
fn latent_dims(latents: &[Tensor], b: usize, frames: usize) -> Vec<usize> {
    let mut d = vec![b, frames];
    d.extend_from_slice(&latents[0].dims()[1..]);
    d
}

/// SVD's training objective on one batch: the window's first frame, noise-augmented and
/// VAE-encoded (frozen), and the trained image embedding condition the denoiser (both dropped
/// where `keep` is 0); the EDM-weighted MSE of the denoised latents.
#[allow(clippy::too_many_arguments)]
fn batch_loss(
    den: &SvdDenoiser<'_>,
    vae: &AutoencoderKLTemporalDecoder,
    encoder: &TeacherEncoder,
    edm: &EdmLoss,
    batch: &Batch<'_>,
    (frames, fps): (usize, f64),
    d: &Draws,
    dev: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    let b = batch.idx.len();
    let (h, w) = (batch.set.height, batch.set.width);
    let windows = batch
        .idx
        .iter()
        .zip(batch.starts)
        .map(|(&i, &s)| batch.latents[i].narrow(0, s, frames))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let x0 = Tensor::stack(&windows, 0)?;
    let first = clip_batch(batch.set, batch.idx, batch.starts, 1, dev)?.reshape((b, 3, h, w))?;
    let aug: Vec<f32> = d.aug.iter().map(|&a| a as f32).collect();
    let aug_t = Tensor::from_vec(aug, (b, 1, 1, 1), dev)?;
    let noisy = (&first + d.eps_img.broadcast_mul(&aug_t)?)?;
    let image_latents = vae.encode(&noisy)?.mean.detach().unsqueeze(1)?;
    let embeds = match encoder {
        TeacherEncoder::Trained(enc) => enc.forward(&first),
        TeacherEncoder::Clip(clip) => clip.embed(&first).map(|t| t.detach()),
    }?;
    let keep = Tensor::from_vec(d.keep.clone(), (b, 1, 1, 1, 1), dev)?;
    let image_latents = image_latents.broadcast_mul(&keep)?;
    let embeds = embeds.broadcast_mul(&keep.reshape((b, 1, 1))?)?;
    let ids: Vec<f32> = (0..b)
        .flat_map(|j| {
            let bucket = batch.buckets[batch.idx[j]];
            [(fps - 1.0) as f32, bucket as f32, d.aug[j] as f32]
        })
        .collect();
    let cond = Conditioning {
        image_latents,
        image_embeds: embeds,
        added_time_ids: Tensor::from_vec(ids, (b, 3), dev)?,
    };
    let sigma = Tensor::from_vec(d.sigma.clone(), b, dev)?;
    let x = (&x0 + d.noise.broadcast_mul(&sigma.reshape((b, 1, 1, 1, 1))?)?)?;
    let denoised = den.denoise(&x, &sigma, &cond)?;
    edm.loss(&denoised, &x0, &sigma)
}

/// Normal quantiles at 1/8, 3/8, 5/8 and 7/8: the fixed evaluation's four noise levels
/// `exp(P_mean + P_std z)` stand for the four quarters of the training distribution.
const FIXED_Z: [f64; 4] = [-1.150_349, -0.318_639, 0.318_639, 1.150_349];

/// The fixed denoising loss of every clip of `latents` (windows from frame 0), averaged over
/// the clips and the four noise levels of [`FIXED_Z`], the noise drawn from `seed` alone.
#[allow(clippy::too_many_arguments)]
fn fixed_loss(
    den: &SvdDenoiser<'_>,
    vae: &AutoencoderKLTemporalDecoder,
    encoder: &TeacherEncoder,
    p: &TeacherParams,
    (set, latents, buckets): (&ClipSet, &[Tensor], &[f64]),
    (frames, fps): (usize, f64),
    seed: u64,
    dev: &candle_core::Device,
) -> candle_core::Result<f64> {
    let mut rng = NormalRng::new(seed);
    let (mut total, mut count) = (0.0, 0usize);
    let n = latents.len();
    for first in (0..n).step_by(p.batch_clips) {
        let idx: Vec<usize> = (first..(first + p.batch_clips).min(n)).collect();
        let starts = vec![0; idx.len()];
        let b = idx.len();
        let batch = Batch {
            set,
            latents,
            buckets,
            idx: &idx,
            starts: &starts,
        };
        let img = [b, 3, set.height, set.width];
        for z in FIXED_Z {
            let sigma = p.edm.sigma_from_normal(z);
            let draws = Draws::fixed(
                &mut rng,
                p,
                img,
                &latent_dims(latents, b, frames),
                sigma,
                dev,
            )?;
            let loss = batch_loss(
                den,
                vae,
                encoder,
                &p.edm,
                &batch,
                (frames, fps),
                &draws,
                dev,
            )?;
            total += loss.to_scalar::<f32>()? as f64 * b as f64;
            count += b;
        }
    }
    Ok(total / count.max(1) as f64)
}

/// Every variable that has an EMA shadow takes its value.
fn set_ema_weights(vars: &[(String, candle_core::Var)], ema: &Ema) -> candle_core::Result<()> {
    for (n, v) in vars {
        if let Some((_, s)) = ema.shadow.iter().find(|(m, _)| m == n) {
            v.set(s)?;
        }
    }
    Ok(())
}

/// `f` computed with the EMA weights in place of the trained ones (when `use_ema`), which are
/// put back afterwards, also when `f` fails.
fn with_ema_weights<R>(
    vars: &[(String, candle_core::Var)],
    ema: &Ema,
    use_ema: bool,
    f: impl FnOnce() -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    if !use_ema {
        return f();
    }
    let saved = vars
        .iter()
        .map(|(_, v)| v.as_tensor().copy())
        .collect::<candle_core::Result<Vec<_>>>()?;
    set_ema_weights(vars, ema)?;
    let out = f();
    for ((_, v), s) in vars.iter().zip(&saved) {
        v.set(s)?;
    }
    out
}

fn build_vars<M>(
    dev: &candle_core::Device,
    seed: u64,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<M>,
) -> Result<(VarMap, M)> {
    let vm = VarMap::new();
    let m =
        build(crate::train::seeded_varbuilder(&vm, seed, dev)).map_err(ce("building the model"))?;
    Ok((vm, m))
}

fn train(ctx: &mut StageContext<'_>, p: &TeacherParams) -> Result<()> {
    let dev = device(ctx.device)?;
    let up = ctx
        .upstream_of_kind("autoencoder")
        .ok_or_else(|| {
            Error::Other(format!(
                "stage `{}` needs an `autoencoder` stage before it",
                ctx.name
            ))
        })?
        .clone();
    let vae_dir = up.dir.join("vae");
    let (vae_cfg, vae, _) = load_component(&vae_dir, &dev, AutoencoderKLTemporalDecoder::new)?;
    let data = ctx.data()?;
    let (train_set, test_set) = (&data.train, &data.test);
    if train_set.is_empty() || test_set.is_empty() {
        return Err(Error::Data(
            "the teacher needs non-empty train and test clip sets".into(),
        ));
    }
    let frames = if p.frames == 0 {
        train_set.frames
    } else {
        p.frames.min(train_set.frames)
    };
    let fps = data.fps();

    // Model configs: from `pretrained` or the spec, checked against the VAE.
    let clip_dir = p
        .pretrained
        .as_ref()
        .map(|d| Path::new(d).join("image_encoder"))
        .filter(|d| is_clip_folder(d));
    let (unet_cfg, enc_cfg) = match &p.pretrained {
        Some(dir) => {
            let d = Path::new(dir);
            let u: UNetConfig = crate::models::checkpoint::load_config(&d.join("unet"))?;
            let e = if d.join("image_encoder").exists() && clip_dir.is_none() {
                crate::models::checkpoint::load_config(&d.join("image_encoder"))?
            } else {
                p.image_encoder.clone()
            };
            (u, e)
        }
        None => (p.unet.clone(), p.image_encoder.clone()),
    };
    let lc = vae_cfg.latent_channels;
    if unet_cfg.in_channels != 2 * lc || unet_cfg.out_channels != lc {
        return Err(Error::Data(format!(
            "the UNet has in/out channels {}/{} but the VAE's latents have {lc} channels: set unet.in_channels = {} and unet.out_channels = {lc}",
            unet_cfg.in_channels,
            unet_cfg.out_channels,
            2 * lc
        )));
    }
    let (unet_map, unet) = build_vars(&dev, ctx.seed, |vb| UNetSpatioTemporal::new(vb, &unet_cfg))?;
    let (enc_map, encoder) = match &clip_dir {
        Some(cd) => {
            let pdir = Path::new(p.pretrained.as_deref().unwrap_or_default());
            let fe = pdir
                .join("feature_extractor")
                .join("preprocessor_config.json");
            let clip =
                crate::pipeline::load_clip(cd, Some(&fe), candle_core::DType::F32, &dev, None)?;
            (VarMap::new(), TeacherEncoder::Clip(clip))
        }
        None => {
            let (m, e) = build_vars(&dev, ctx.seed.wrapping_add(1), |vb| {
                ImageEncoder::new(vb, &enc_cfg)
            })?;
            (m, TeacherEncoder::Trained(e))
        }
    };
    if let Some(dir) = &p.pretrained {
        let d = Path::new(dir);
        load_weights_files(
            &unet_map,
            &weight_files(&d.join("unet"), "diffusion_pytorch_model", None)?,
        )?;
        let ef = d
            .join("image_encoder")
            .join(crate::models::checkpoint::WEIGHTS_FILE);
        if ef.exists() && clip_dir.is_none() {
            load_weights(&enc_map, &ef)?;
        }
    }
    let mut vars = named_vars(&unet_map);
    vars.extend(
        named_vars(&enc_map)
            .into_iter()
            .map(|(n, v)| (format!("image_encoder.{n}"), v)),
    );
    let mut opt = AdamW::new(vars.clone(), p.optimizer.clone()).map_err(ce("optimizer"))?;
    let mut ema = Ema::new(&vars, p.ema_decay).map_err(ce("EMA"))?;

    // The VAE is frozen: encode every training clip once (posterior mode x scaling factor).
    let latents = encode_all_cached(ctx, &vae, &vae_dir, "f32", &train_set, &dev)?;
    let buckets = motion_buckets(&train_set, p);

    let mut vars = vars;
    let mut start = 0;
    if let Some(mut state) = ctx.resume(&dev)? {
        state.restore("model", &mut vars)?;
        state.restore("ema", &mut ema)?;
        state.restore("optimizer", &mut opt)?;
        start = state.finish()?;
        ctx.note(&format!("resuming from step {start}"));
    }

    let den = SvdDenoiser { unet: &unet };
    let (h, w) = (train_set.height, train_set.width);
    // The fixed held-out and training losses (`eval_every`), with the EMA weights.
    let eval_n = p.eval_clips.min(test_set.len()).min(train_set.len());
    let test_latents = if p.eval_every > 0 {
        encode_clips(&vae, test_set, eval_n, &dev)?
    } else {
        Vec::new()
    };
    let test_buckets = if p.eval_every > 0 {
        motion_buckets(test_set, p)
    } else {
        Vec::new()
    };
    let evaluate = |ctx: &mut StageContext<'_>,
                    step: u64,
                    vars: &[(String, candle_core::Var)],
                    ema: &Ema|
     -> Result<()> {
        let e = ce("fixed denoising loss");
        let sets = [
            (
                "heldout_loss",
                (test_set, &test_latents[..], &test_buckets[..]),
            ),
            (
                "train_fixed_loss",
                (train_set, &latents[..eval_n], &buckets[..]),
            ),
        ];
        // One swap to the EMA weights for both sets, and the same noise for both: the curves
        // differ by their clips alone.
        let values = with_ema_weights(vars, ema, p.ema_decay > 0.0, || {
            sets.map(|(_, set)| {
                let seed = ctx.seed ^ 0xF1_5ED;
                fixed_loss(&den, &vae, &encoder, p, set, (frames, fps), seed, &dev)
            })
            .into_iter()
            .collect::<candle_core::Result<Vec<f64>>>()
        })
        .map_err(&e)?;
        for ((key, _), v) in sets.iter().zip(values) {
            ctx.metric(key, step, v)?;
        }
        Ok(())
    };
    if p.eval_every > 0 && start == 0 {
        evaluate(ctx, 0, &vars, &ema)?;
    }
    let shards = crate::train::shard::Shards::new(p.batch_clips).map_err(ce("shards"))?;
    for step in start..p.steps {
        ctx.check_interrupt(step)?;
        let t0 = std::time::Instant::now();
        let e = ce("teacher step");
        let mut rng = step_rng(ctx.seed, step);
        let b = p.batch_clips;
        let (idx, starts) = random_windows(&mut rng, train_set.len(), train_set.frames, frames, b);
        let lat_dims = latent_dims(&latents, b, frames);
        let draws = Draws::training(&mut rng, p, [b, 3, h, w], &lat_dims, &dev).map_err(&e)?;
        let batch = Batch {
            set: train_set,
            latents: &latents,
            buckets: &buckets,
            idx: &idx,
            starts: &starts,
        };
        // The batch's loss and gradients, its shards side by side (`train::shard`).
        let (lv, grads) = shards
            .backward(b, |r| {
                let draws = draws.part(r.clone())?;
                let batch = batch.part(r);
                batch_loss(
                    &den,
                    &vae,
                    &encoder,
                    &p.edm,
                    &batch,
                    (frames, fps),
                    &draws,
                    &dev,
                )
            })
            .map_err(&e)?;
        let lr = p.optimizer.lr_at(step, p.steps);
        let gnorm = opt.step(&grads, lr).map_err(&e)?;
        ema.update(&vars, step).map_err(&e)?;
        ctx.metric("loss", step + 1, lv)?;
        ctx.metric("grad_norm", step + 1, gnorm)?;
        ctx.metric("step_seconds", step + 1, t0.elapsed().as_secs_f64())?;
        ctx.progress(step + 1, p.steps, &format!("loss {lv:.4}"));
        let done = step + 1 == p.steps;
        if p.eval_every > 0 && ((step + 1) % p.eval_every == 0 || done) {
            evaluate(ctx, step + 1, &vars, &ema)?;
        }
        if (p.checkpoint_every > 0 && (step + 1) % p.checkpoint_every == 0) || done {
            let state = TrainState::new(step + 1)
                .with("model", &vars)
                .with("ema", &ema)
                .with("optimizer", &opt);
            ctx.checkpoint(&state)?;
        }
    }

    // Export the EMA weights as a pipeline folder.
    let use_ema = p.ema_decay > 0.0 && p.steps > 0;
    if use_ema {
        set_ema_weights(&vars, &ema).map_err(ce("EMA export"))?;
    }
    save_component(&ctx.dir.join("unet"), &unet_cfg, &unet_map)?;
    match &clip_dir {
        // SVD's frozen CLIP encoder and its image processor settings, copied as they are.
        Some(cd) => {
            crate::models::checkpoint::copy_component(cd, &ctx.dir.join("image_encoder"))?;
            let root = Path::new(p.pretrained.as_deref().unwrap_or_default());
            crate::models::checkpoint::copy_feature_extractor(root, &ctx.dir)?;
        }
        None => save_component(&ctx.dir.join("image_encoder"), &enc_cfg, &enc_map)?,
    }
    save_component(
        &ctx.dir.join("vae"),
        &vae_cfg,
        &crate::models::checkpoint::varmap_of(&vae_dir, &dev, AutoencoderKLTemporalDecoder::new)?,
    )?;
    let mut sorted = buckets.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let settings = PipelineSettings {
        frames,
        height: h,
        width: w,
        fps,
        motion_bucket_id: sorted[sorted.len() / 2],
        noise_aug_strength: p.noise_aug_strength,
        sampler: p.sampler.clone(),
        consistency: None,
        decode_chunk_size: None,
    };
    settings.save(&ctx.dir)?;
    drop(unet);
    drop(encoder);
    write_samples(ctx, p.sample_clips, p.steps, &test_set, p.dtype)
}

/// Posterior means x scaling factor of every clip: `[t, c, h, w]` each.
pub(crate) fn encode_all(
    vae: &AutoencoderKLTemporalDecoder,
    set: &ClipSet,
    dev: &candle_core::Device,
) -> Result<Vec<Tensor>> {
    encode_clips(vae, set, set.len(), dev)
}

/// [`encode_all`] of a training set, shared between stages through the assets cache
/// (`<assets>/latents/<key>.safetensors`): the teacher, consistency and GAN stages of an
/// experiment encode the same clips with the same frozen VAE, and every variant of a sweep
/// encodes them again (about 100 s for 4096 toy clips on 2 cores). The key hashes every file
/// of `vae_dir` (config and weights, any variant), `tag` (the precision the VAE computes in),
/// the device kind and every clip's pixels, so a cached file is the exact output of this
/// computation; a missing or unreadable one is computed again (sharded over the clips,
/// [`crate::train::shard`]) and written atomically.
pub(crate) fn encode_all_cached(
    ctx: &mut StageContext<'_>,
    vae: &AutoencoderKLTemporalDecoder,
    vae_dir: &Path,
    tag: &str,
    set: &ClipSet,
    dev: &candle_core::Device,
) -> Result<Vec<Tensor>> {
    use sha2::{Digest, Sha256};
    let n = set.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    let mut h = Sha256::new();
    h.update(b"onestep vae latents: posterior mean x scaling factor; v1\n");
    h.update(format!("{tag} {:?}\n", dev.location()).as_bytes());
    let mut files: Vec<_> = std::fs::read_dir(vae_dir)
        .at(vae_dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    for f in &files {
        let bytes = std::fs::read(f).at(f)?;
        h.update(
            f.file_name()
                .map(|s| s.as_encoded_bytes())
                .unwrap_or_default(),
        );
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    h.update(format!("{n} {} {} {}\n", set.frames, set.height, set.width).as_bytes());
    h.update(&set.data);
    let key = hex::encode(h.finalize());
    let path = ctx
        .assets
        .join("latents")
        .join(format!("{}.safetensors", &key[..32]));
    let e = ce("encoding clips");
    if let Ok(mut m) = candle_core::safetensors::load(&path, dev) {
        if let Some(all) = m.remove("latents").filter(|t| t.dims().first() == Some(&n)) {
            ctx.note(&format!(
                "latents of the {n} training clips from the cache ({})",
                path.display()
            ));
            return (0..n).map(|i| all.get(i).map_err(&e)).collect();
        }
    }
    ctx.note(&format!("encoding {n} training clips with the VAE"));
    let shards = crate::train::shard::Shards::new(n).map_err(&e)?;
    let parts = shards.map(n, |r| -> Result<Vec<Tensor>> {
        r.map(|i| encode_clip(vae, set, i, dev)).collect()
    })?;
    let latents: Vec<Tensor> = parts.into_iter().flatten().collect();
    let all = Tensor::stack(&latents, 0).map_err(&e)?;
    let dir = path.parent().expect("latents cache folder");
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let saved = std::fs::create_dir_all(dir)
        .at(dir)
        .and_then(|_| {
            candle_core::safetensors::save(
                &std::collections::HashMap::from([("latents", all)]),
                &tmp,
            )
            .map_err(|e| Error::Data(format!("{}: {e}", tmp.display())))
        })
        .and_then(|_| std::fs::rename(&tmp, &path).at(&path));
    if let Err(err) = saved {
        // The cache only saves time: say so and go on with the latents in memory.
        let _ = std::fs::remove_file(&tmp);
        ctx.note(&format!("latents not cached: {err}"));
    }
    Ok(latents)
}

/// [`encode_all`] of the first `n` clips.
fn encode_clips(
    vae: &AutoencoderKLTemporalDecoder,
    set: &ClipSet,
    n: usize,
    dev: &candle_core::Device,
) -> Result<Vec<Tensor>> {
    (0..n.min(set.len()))
        .map(|i| encode_clip(vae, set, i, dev))
        .collect()
}

/// Clip `i`'s posterior mean x scaling factor, `[t, c, h, w]`.
fn encode_clip(
    vae: &AutoencoderKLTemporalDecoder,
    set: &ClipSet,
    i: usize,
    dev: &candle_core::Device,
) -> Result<Tensor> {
    let e = ce("encoding clips");
    let x = clip_frames(set, i, dev).map_err(&e)?;
    let z = vae.encode(&x).map_err(&e)?.mean;
    // Detached: a kept latent must not keep the encoder's graph alive.
    (z * vae.config.scaling_factor)
        .map(|z| z.detach())
        .map_err(&e)
}

/// Preview samples from the pipeline exported to the stage folder, with its own sampler:
/// `samples.png` (each real test clip above the clip generated from its first frame) and
/// `samples.gif` (real | generated, side by side); metrics at step `step`.
pub(crate) fn write_samples(
    ctx: &mut StageContext<'_>,
    sample_clips: usize,
    step: u64,
    test: &ClipSet,
    dtype: Precision,
) -> Result<()> {
    let n = sample_clips.min(test.len());
    if n == 0 {
        return Ok(());
    }
    let dev = device(ctx.device)?;
    let pipe = VideoPipeline::load_with(&ctx.dir, &dev, &LoadOptions::precision(dtype))?;
    let t = pipe.settings.frames;
    let e = ce("samples");
    let first = clip_batch(test, &(0..n).collect::<Vec<_>>(), &vec![0; n], 1, &dev)
        .and_then(|x| x.squeeze(1))
        .map_err(&e)?;
    let seeds: Vec<u64> = (0..n as u64).map(|i| ctx.seed * 1000 + i).collect();
    let mut opts: GenerateOptions = pipe.default_options();
    opts.motion_bucket_id = pipe.settings.motion_bucket_id;
    let total = pipe.settings.sampler.steps as u64;
    let name = ctx.name.clone();
    let (video, nfe) = {
        let log = &mut *ctx.log;
        pipe.generate(&first, &seeds, &opts, |s, _| {
            log.progress(s as u64, total, &format!("{name}: sampling"))
        })?
    };
    // A guided step evaluates the whole batch twice: NFE per sample = NFE of the batch.
    ctx.metric("sample_nfe", step, nfe as f64)?;
    let mut strip = ClipSet::new(t, test.height, test.width);
    let mut gen = ClipSet::new(t, test.height, test.width);
    let mut side = ClipSet::new(t, test.height, test.width * 2);
    let (mut motion_gen, mut motion_real, mut psnr) = (0.0, 0.0, 0.0);
    for i in 0..n {
        let v = video.get(i).map_err(&e)?;
        let frames = crate::train::to_u8_frames(&v).map_err(&e)?;
        let real = &test.clip(i)[..t * test.height * test.width * 3];
        strip.push(real, 0, 0);
        strip.push(&frames, 0, 0);
        gen.push(&frames, 0, 0);
        side.push(
            &side_by_side(real, &frames, t, test.height, test.width),
            0,
            0,
        );
        motion_gen += clip_motion(&frames, t);
        motion_real += clip_motion(real, t);
        let fl = test.height * test.width * 3;
        let mse = real[..fl]
            .iter()
            .zip(&frames[..fl])
            .map(|(a, b)| ((*a as f64 - *b as f64) / 255.0).powi(2))
            .sum::<f64>()
            / fl as f64;
        psnr += -10.0 * mse.max(1e-12).log10();
    }
    ctx.metric("sample_motion", step, motion_gen / n as f64)?;
    ctx.metric("real_motion", step, motion_real / n as f64)?;
    ctx.metric("sample_first_frame_psnr", step, psnr / n as f64)?;
    let png = ctx.dir.join("samples.png");
    strip
        .filmstrip(strip.len())
        .save(&png)
        .map_err(|err| Error::Other(format!("{}: {err}", png.display())))?;
    ctx.artifact("samples.png", "filmstrip")?;
    side.write_gif(&ctx.dir.join("samples.gif"), n, pipe.settings.fps)?;
    ctx.artifact("samples.gif", "animation")?;
    gen.save(&ctx.dir.join("samples.safetensors"))?;
    Ok(())
}

fn side_by_side(a: &[u8], b: &[u8], t: usize, h: usize, w: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(a.len() * 2);
    for f in 0..t {
        for y in 0..h {
            let o = ((f * h + y) * w) * 3;
            out.extend_from_slice(&a[o..o + w * 3]);
            out.extend_from_slice(&b[o..o + w * 3]);
        }
    }
    out
}
