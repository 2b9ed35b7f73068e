//! Image-to-video generation with an SVD-architecture model, as diffusers'
//! `StableVideoDiffusionPipeline` does it: the conditioning image is noise-augmented and
//! encoded by the VAE (latent concatenated to every frame), embedded by the image encoder
//! (cross-attention), and fps, motion bucket and augmentation strength enter as added time
//! ids; the latent video is sampled by [`crate::diffusion::sample`] and decoded by the VAE
//! (in chunks of frames, as diffusers' `decode_chunk_size`).
//!
//! Two folder layouts load:
//! - onestep's: `vae/`, `unet/`, `image_encoder/` (diffusers' component layout) and
//!   `onestep.json` ([`PipelineSettings`]), as the training stages write them;
//! - diffusers' `StableVideoDiffusionPipeline` folders (`model_index.json`, `unet/`, `vae/`,
//!   `image_encoder/` with transformers' `CLIPVisionModelWithProjection`, `feature_extractor/`,
//!   `scheduler/`), such as stabilityai/stable-video-diffusion-img2vid(-xt), with or without the
//!   `fp16` weight variants; the settings are then the pipeline call's defaults (frames = the
//!   UNet's `num_frames`, 576x1024, fps 7, motion bucket 127, noise augmentation 0.02, 25 Euler
//!   steps over the scheduler's Karras sigmas, guidance 1 -> 3).

use crate::diffusion::noise::NormalRng;
use crate::diffusion::{sample, Conditioning, SamplerConfig, SamplerMethod, SvdDenoiser};
use crate::error::{Error, IoContext, Result};
use crate::models::checkpoint::{load_config, load_frozen, weight_files};
use crate::models::clip::{svd_resize_matrix, ClipVisionConfig, ClipVisionModelWithProjection};
use crate::models::dinov2::resample2d;
use crate::models::{
    AutoencoderKLTemporalDecoder, ImageEncoder, UNetConfig, UNetSpatioTemporal, VaeConfig,
};
use crate::train::ce;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const SETTINGS_FILE: &str = "onestep.json";

/// What a trained model was trained for, and the defaults it generates with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSettings {
    /// Frames per generated clip.
    pub frames: usize,
    /// Image height and width in pixels.
    pub height: usize,
    pub width: usize,
    /// Frames per second of the training clips (the fps id is fps - 1, as in SVD).
    pub fps: f64,
    /// Default motion bucket id (SVD: 127).
    pub motion_bucket_id: f64,
    /// Default conditioning-image noise augmentation (SVD: 0.02).
    pub noise_aug_strength: f64,
    /// The sampler the model's previews were made with.
    pub sampler: SamplerConfig,
    /// Present for consistency students: the boundary scalings around the UNet's denoiser.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<crate::diffusion::ConsistencyParam>,
    /// Frames the VAE decodes at once (diffusers' `decode_chunk_size`; none = all frames of a
    /// clip). The temporal decoder mixes frames within a chunk only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_chunk_size: Option<usize>,
}

impl PipelineSettings {
    /// Write `onestep.json` into a pipeline folder (atomically).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::Other(format!("{}: {e}", dir.join(SETTINGS_FILE).display())))?;
        crate::util::atomic_write(&dir.join(SETTINGS_FILE), text.as_bytes())
    }
}

/// The image encoder of a pipeline: onestep's small CNN (trained with a toy teacher) or SVD's
/// CLIP vision tower.
pub enum ImageEmbedder {
    Small(ImageEncoder),
    Clip {
        model: ClipVisionModelWithProjection,
        /// `CLIPImageProcessor`'s normalisation (`feature_extractor/`).
        mean: [f32; 3],
        std: [f32; 3],
    },
}

impl ImageEmbedder {
    /// The pixels CLIP reads for images `[b, 3, H, W]` in [-1, 1], as SVD's pipeline makes them:
    /// antialiased resize to the encoder's size, then to [0, 1] and CLIP-normalised.
    pub fn clip_pixels(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        let ImageEmbedder::Clip { model, mean, std } = self else {
            candle_core::bail!("clip_pixels: not a CLIP image encoder");
        };
        let (_, _, h, w) = images.dims4()?;
        let s = model.config.image_size;
        let x = resample2d(
            &images.to_dtype(DType::F32)?,
            &svd_resize_matrix(h, s),
            &svd_resize_matrix(w, s),
            s,
            s,
        )?;
        let x01 = ((x + 1.0)? * 0.5)?;
        let dev = images.device();
        let mean = Tensor::from_slice(mean, (1, 3, 1, 1), dev)?;
        let std = Tensor::from_slice(std, (1, 3, 1, 1), dev)?;
        x01.broadcast_sub(&mean)?.broadcast_div(&std)
    }

    /// Images `[b, 3, H, W]` in [-1, 1] to the embedding the UNet's cross-attention reads,
    /// `[b, 1, d]` in f32.
    pub fn embed(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            ImageEmbedder::Small(e) => e.forward(images),
            ImageEmbedder::Clip { model, .. } => model
                .forward(&self.clip_pixels(images)?)?
                .to_dtype(DType::F32)?
                .unsqueeze(1),
        }
    }
}

/// How a model folder is loaded.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Dtype of the UNet and the CLIP image encoder (f32 if none). Half precision runs
    /// autocast-style: norms, softmax and the sampler's state stay in f32. The VAE always runs in
    /// f32 (as SVD's pipeline upcasts it, `force_upcast`).
    pub dtype: Option<DType>,
    /// diffusers weight variant to read (`fp16` for `*.fp16.safetensors`); by default the plain
    /// files, or the `fp16` ones where a folder has only those.
    pub variant: Option<String>,
}

impl LoadOptions {
    /// A stage's `dtype` ([`crate::device::Precision`]), with the folder's default weight files.
    pub fn precision(p: crate::device::Precision) -> Self {
        Self {
            dtype: Some(p.dtype()),
            variant: None,
        }
    }
}

pub struct VideoPipeline {
    pub settings: PipelineSettings,
    pub vae: AutoencoderKLTemporalDecoder,
    pub unet: UNetSpatioTemporal,
    pub image_encoder: ImageEmbedder,
    pub device: Device,
}

/// Per-sample generation options.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub sampler: SamplerConfig,
    /// Frames per clip.
    pub frames: usize,
    pub fps: f64,
    pub motion_bucket_id: f64,
    pub noise_aug_strength: f64,
    /// Frames decoded at once (none = a whole clip).
    pub decode_chunk_size: Option<usize>,
}

/// diffusers' `model_index.json`.
#[derive(Debug, Deserialize)]
struct ModelIndex {
    #[serde(rename = "_class_name")]
    class_name: String,
}

/// The fields of `EulerDiscreteScheduler`'s `scheduler_config.json` that SVD sampling depends on.
#[derive(Debug, Deserialize)]
struct EulerSchedulerConfig {
    #[serde(rename = "_class_name")]
    class_name: String,
    #[serde(default)]
    prediction_type: Option<String>,
    #[serde(default)]
    use_karras_sigmas: Option<bool>,
    #[serde(default)]
    timestep_type: Option<String>,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
}

/// `CLIPImageProcessor`'s `preprocessor_config.json` (normalisation only: SVD's pipeline resizes
/// itself).
#[derive(Debug, Deserialize)]
struct ClipProcessorConfig {
    image_mean: Option<Vec<f64>>,
    image_std: Option<Vec<f64>>,
}

fn three(v: Option<Vec<f64>>, default: [f64; 3], what: &str) -> Result<[f32; 3]> {
    let v = v.unwrap_or(default.to_vec());
    if v.len() != 3 {
        return Err(Error::Data(format!(
            "{what}: expected 3 values, found {}",
            v.len()
        )));
    }
    Ok([v[0] as f32, v[1] as f32, v[2] as f32])
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).at(path)?;
    serde_json::from_str(&text).map_err(|e| Error::Data(format!("{}: {e}", path.display())))
}

/// Whether an `image_encoder/` folder holds transformers' CLIP vision model (else onestep's
/// small encoder).
pub fn is_clip_folder(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else {
        return false;
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    v.get("model_type").and_then(|m| m.as_str()) == Some("clip_vision_model")
        || v.get("architectures")
            .and_then(|a| a.as_array())
            .is_some_and(|a| {
                a.iter()
                    .any(|x| x.as_str() == Some("CLIPVisionModelWithProjection"))
            })
}

/// The `vae/` (f32) and `unet/` (in `dtype`) components of a pipeline folder, as frozen
/// weights: plain tensors, not variables, so inference records no autograd graph.
fn load_vae_unet(
    dir: &Path,
    dtype: DType,
    device: &Device,
    variant: Option<&str>,
) -> Result<(AutoencoderKLTemporalDecoder, UNetSpatioTemporal, UNetConfig)> {
    let vdir = dir.join("vae");
    let vcfg: VaeConfig = load_config(&vdir)?;
    let vae = load_frozen(
        &weight_files(&vdir, "diffusion_pytorch_model", variant)?,
        DType::F32,
        device,
        |vb| AutoencoderKLTemporalDecoder::new(vb, &vcfg),
    )?;
    let udir = dir.join("unet");
    let ucfg: UNetConfig = load_config(&udir)?;
    ucfg.validate()
        .map_err(|e| Error::Data(format!("{}: {e}", udir.join("config.json").display())))?;
    let unet = load_frozen(
        &weight_files(&udir, "diffusion_pytorch_model", variant)?,
        dtype,
        device,
        |vb| UNetSpatioTemporal::new(vb, &ucfg),
    )?;
    Ok((vae, unet, ucfg))
}

/// A transformers `CLIPVisionModelWithProjection` folder (`image_encoder/`) with the
/// normalisation of `processor` (`feature_extractor/preprocessor_config.json`; CLIP's own when
/// absent), frozen, in `dtype`.
pub fn load_clip(
    dir: &Path,
    processor: Option<&Path>,
    dtype: DType,
    device: &Device,
    variant: Option<&str>,
) -> Result<ImageEmbedder> {
    let cfg: ClipVisionConfig = load_config(dir)?;
    cfg.validate()
        .map_err(|e| Error::Data(format!("{}: {e}", dir.join("config.json").display())))?;
    let files = weight_files(dir, "model", variant)?;
    let model = load_frozen(&files, dtype, device, |vb| {
        ClipVisionModelWithProjection::new(vb, &cfg)
    })?;
    let (mean, std) = match processor {
        Some(p) if p.is_file() => {
            let c: ClipProcessorConfig = read_json(p)?;
            (
                three(c.image_mean, crate::models::clip::CLIP_MEAN, "image_mean")?,
                three(c.image_std, crate::models::clip::CLIP_STD, "image_std")?,
            )
        }
        _ => (
            crate::models::clip::CLIP_MEAN.map(|v| v as f32),
            crate::models::clip::CLIP_STD.map(|v| v as f32),
        ),
    };
    Ok(ImageEmbedder::Clip { model, mean, std })
}

impl VideoPipeline {
    /// Loads a pipeline folder (see the module docs) in f32.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::load_with(dir, device, &LoadOptions::default())
    }

    /// Loads a pipeline folder of either layout (see the module docs).
    pub fn load_with(dir: &Path, device: &Device, opts: &LoadOptions) -> Result<Self> {
        let dtype = opts.dtype.unwrap_or(DType::F32);
        let settings_path = dir.join(SETTINGS_FILE);
        if !settings_path.exists() {
            if dir.join("model_index.json").exists() {
                return Self::load_diffusers(dir, device, opts);
            }
            return Err(Error::Data(format!(
                "{}: not a model folder: neither {SETTINGS_FILE} (onestep's layout: vae/, unet/, image_encoder/ and {SETTINGS_FILE}, as a teacher stage writes them) nor model_index.json (a diffusers StableVideoDiffusionPipeline folder)",
                dir.display()
            )));
        }
        let text = std::fs::read_to_string(&settings_path).at(&settings_path)?;
        let settings: PipelineSettings = serde_json::from_str(&text)
            .map_err(|e| Error::Data(format!("{}: {e}", settings_path.display())))?;
        let (vae, unet, _) = load_vae_unet(dir, dtype, device, None)?;
        let enc_dir = dir.join("image_encoder");
        let image_encoder = if is_clip_folder(&enc_dir) {
            load_clip(
                &enc_dir,
                Some(
                    &dir.join("feature_extractor")
                        .join("preprocessor_config.json"),
                ),
                dtype,
                device,
                opts.variant.as_deref(),
            )?
        } else {
            let ecfg: crate::models::ImageEncoderConfig = load_config(&enc_dir)?;
            ImageEmbedder::Small(load_frozen(
                &weight_files(&enc_dir, "diffusion_pytorch_model", None)?,
                DType::F32,
                device,
                |vb| ImageEncoder::new(vb, &ecfg),
            )?)
        };
        Ok(Self {
            settings,
            vae,
            unet,
            image_encoder,
            device: device.clone(),
        })
    }

    /// A diffusers `StableVideoDiffusionPipeline` folder.
    fn load_diffusers(dir: &Path, device: &Device, opts: &LoadOptions) -> Result<Self> {
        let dtype = opts.dtype.unwrap_or(DType::F32);
        let variant = opts.variant.as_deref();
        let index_path = dir.join("model_index.json");
        let index: ModelIndex = read_json(&index_path)?;
        if index.class_name != "StableVideoDiffusionPipeline" {
            return Err(Error::Data(format!(
                "{}: a `{}` folder; onestep loads StableVideoDiffusionPipeline folders",
                index_path.display(),
                index.class_name
            )));
        }
        for c in ["unet", "vae", "image_encoder", "scheduler"] {
            if !dir.join(c).is_dir() {
                return Err(Error::Data(format!(
                    "{}: missing the `{c}/` folder of a StableVideoDiffusionPipeline",
                    dir.display()
                )));
            }
        }
        let (vae, unet, ucfg) = load_vae_unet(dir, dtype, device, variant)?;
        let edir = dir.join("image_encoder");
        if !is_clip_folder(&edir) {
            return Err(Error::Data(format!(
                "{}: not a transformers CLIPVisionModelWithProjection config",
                edir.join("config.json").display()
            )));
        }
        let image_encoder = load_clip(
            &edir,
            Some(
                &dir.join("feature_extractor")
                    .join("preprocessor_config.json"),
            ),
            dtype,
            device,
            variant,
        )?;
        let spath = dir.join("scheduler").join("scheduler_config.json");
        let sc: EulerSchedulerConfig = read_json(&spath)?;
        let bad = |what: String| {
            Err(Error::Data(format!(
                "{}: {what}; onestep samples SVD's EDM v-prediction over Karras sigmas (EulerDiscreteScheduler, v_prediction, use_karras_sigmas, continuous timesteps)",
                spath.display()
            )))
        };
        if sc.class_name != "EulerDiscreteScheduler" {
            return bad(format!("scheduler `{}`", sc.class_name));
        }
        if sc.prediction_type.as_deref().unwrap_or("epsilon") != "v_prediction" {
            return bad(format!("prediction_type {:?}", sc.prediction_type));
        }
        if !sc.use_karras_sigmas.unwrap_or(false) {
            return bad("use_karras_sigmas is not true".into());
        }
        if sc.timestep_type.as_deref().unwrap_or("discrete") != "continuous" {
            return bad(format!("timestep_type {:?}", sc.timestep_type));
        }
        let defaults = SamplerConfig::default();
        let sampler = SamplerConfig {
            method: SamplerMethod::Euler,
            steps: 25,
            sigma_min: sc.sigma_min.unwrap_or(defaults.sigma_min),
            sigma_max: sc.sigma_max.unwrap_or(defaults.sigma_max),
            min_guidance: 1.0,
            max_guidance: 3.0,
            ..defaults
        };
        let settings = PipelineSettings {
            frames: ucfg.num_frames,
            height: 576,
            width: 1024,
            fps: 7.0,
            motion_bucket_id: 127.0,
            noise_aug_strength: 0.02,
            sampler,
            consistency: None,
            decode_chunk_size: None,
        };
        Ok(Self {
            settings,
            vae,
            unet,
            image_encoder,
            device: device.clone(),
        })
    }

    pub fn default_options(&self) -> GenerateOptions {
        GenerateOptions {
            sampler: self.settings.sampler.clone(),
            frames: self.settings.frames,
            fps: self.settings.fps,
            motion_bucket_id: self.settings.motion_bucket_id,
            noise_aug_strength: self.settings.noise_aug_strength,
            decode_chunk_size: self.settings.decode_chunk_size,
        }
    }

    /// Generates one clip per conditioning image, sample `i` drawn from `seeds[i]` alone.
    /// # Shapes
    /// `images`: `[b, 3, H, W]` in [-1, 1] -> `[b, frames, 3, H, W]` in [-1, 1]
    pub fn generate(
        &self,
        images: &Tensor,
        seeds: &[u64],
        opts: &GenerateOptions,
        on_step: impl FnMut(usize, usize),
    ) -> Result<(Tensor, usize)> {
        self.generate_inner(images, seeds, opts, on_step)
    }

    fn generate_inner(
        &self,
        images: &Tensor,
        seeds: &[u64],
        opts: &GenerateOptions,
        on_step: impl FnMut(usize, usize),
    ) -> Result<(Tensor, usize)> {
        let err = ce("generate");
        let (b, _, h, w) = images.dims4().map_err(&err)?;
        if b != seeds.len() {
            return Err(Error::Other(format!(
                "{b} images but {} seeds",
                seeds.len()
            )));
        }
        let f = self.vae.config.downsample_factor();
        if h % f != 0 || w % f != 0 {
            return Err(Error::Data(format!(
                "image size {w}x{h} is not a multiple of the VAE's downsampling factor {f}"
            )));
        }
        let t = opts.frames;
        let lc = self.vae.config.latent_channels;
        let latent_shape = [t, lc, h / f, w / f];
        // One generator per sample: its initial noise, then its augmentation noise.
        let mut noises = Vec::with_capacity(b);
        let mut augs = Vec::with_capacity(b);
        let mut rngs = Vec::with_capacity(b);
        for &s in seeds {
            let mut rng = NormalRng::new(s);
            noises.push(rng.tensor(&latent_shape, &self.device).map_err(&err)?);
            augs.push(rng.tensor(&[3, h, w], &self.device).map_err(&err)?);
            rngs.push(rng);
        }
        let noise = Tensor::stack(&noises, 0).map_err(&err)?;
        let aug = Tensor::stack(&augs, 0).map_err(&err)?;
        // Re-noising (consistency samplers) continues each sample's own generator.
        let device = self.device.clone();
        let mut fresh = || {
            let parts = rngs
                .iter_mut()
                .map(|r| r.tensor(&latent_shape, &device))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::stack(&parts, 0)
        };
        self.generate_from_noise(images, &noise, &aug, opts, &mut fresh, on_step)
    }

    /// [`Self::generate`] from given noise: `noise` `[b, frames, c, h, w]` (standard normal; the
    /// sampler scales it to its first sigma) and `aug_noise` `[b, 3, H, W]` for the conditioning
    /// image; `fresh_noise` draws the re-noising of consistency samplers.
    pub fn generate_from_noise(
        &self,
        images: &Tensor,
        noise: &Tensor,
        aug_noise: &Tensor,
        opts: &GenerateOptions,
        fresh_noise: &mut dyn FnMut() -> candle_core::Result<Tensor>,
        on_step: impl FnMut(usize, usize),
    ) -> Result<(Tensor, usize)> {
        let err = ce("generate");
        let cond = self
            .conditioning(
                images,
                aug_noise,
                opts.noise_aug_strength,
                opts.fps,
                opts.motion_bucket_id,
            )
            .map_err(&err)?;
        let den = SvdDenoiser { unet: &self.unet };
        let (z, nfe) = match &self.settings.consistency {
            Some(c) => {
                let den = c.wrap(&den);
                sample(&den, &cond, noise, &opts.sampler, fresh_noise, on_step)
            }
            None => sample(&den, &cond, noise, &opts.sampler, fresh_noise, on_step),
        }
        .map_err(&err)?;
        let video = self
            .decode_chunked(&z, opts.decode_chunk_size)
            .map_err(&err)?;
        Ok((video, nfe))
    }

    /// SVD's conditioning of a batch of first frames. `aug_noise` is standard normal noise
    /// shaped like `images`.
    pub fn conditioning(
        &self,
        images: &Tensor,
        aug_noise: &Tensor,
        noise_aug_strength: f64,
        fps: f64,
        motion_bucket_id: f64,
    ) -> candle_core::Result<Conditioning> {
        let b = images.dim(0)?;
        let noisy = (images + (aug_noise * noise_aug_strength)?)?;
        let image_latents = self.vae.encode(&noisy)?.mode().unsqueeze(1)?;
        let image_embeds = self.image_encoder.embed(images)?;
        let ids: Vec<f32> = (0..b)
            .flat_map(|_| {
                [
                    (fps - 1.0) as f32,
                    motion_bucket_id as f32,
                    noise_aug_strength as f32,
                ]
            })
            .collect();
        Ok(Conditioning {
            image_latents,
            image_embeds,
            added_time_ids: Tensor::from_vec(ids, (b, 3), &self.device)?,
        })
    }

    /// Clips through the autoencoder alone: every frame encoded to its posterior mean, then
    /// decoded as [`Self::generate`] decodes latents. What no latent model of this pipeline can
    /// do better than (the evaluation's ceiling row).
    /// # Shapes
    /// `[b, t, 3, H, W]` in [-1, 1] -> `[b, t, 3, H, W]`
    pub fn reconstruct(&self, clips: &Tensor, chunk: Option<usize>) -> candle_core::Result<Tensor> {
        let (b, t, c, h, w) = clips.dims5()?;
        let x = clips.reshape((b * t, c, h, w))?.to_dtype(DType::F32)?;
        let z = (self.vae.encode(&x)?.mode() * self.vae.config.scaling_factor)?;
        let (_, zc, zh, zw) = z.dims4()?;
        self.decode_chunked(&z.reshape((b, t, zc, zh, zw))?, chunk)
    }

    /// Latents (scaled by the VAE's scaling factor) to frames in [-1, 1], all frames of a clip
    /// at once.
    /// # Shapes
    /// `[b, t, c, h, w]` -> `[b, t, 3, H, W]`
    pub fn decode(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        self.decode_chunked(z, None)
    }

    /// [`Self::decode`] in chunks of `chunk` frames over the flattened `b t` frames, each chunk
    /// decoded as one clip, as diffusers' `decode_latents(latents, num_frames, decode_chunk_size)`.
    pub fn decode_chunked(&self, z: &Tensor, chunk: Option<usize>) -> candle_core::Result<Tensor> {
        let (b, t, c, h, w) = z.dims5()?;
        let z = (z.reshape((b * t, c, h, w))? / self.vae.config.scaling_factor)?;
        let x = match chunk {
            Some(k) if k > 0 && k < b * t => {
                let mut parts = Vec::new();
                let mut i = 0;
                while i < b * t {
                    let n = k.min(b * t - i);
                    parts.push(self.vae.decode(&z.narrow(0, i, n)?, n)?);
                    i += n;
                }
                Tensor::cat(&parts, 0)?
            }
            _ => self.vae.decode(&z, t)?,
        };
        let (_, ch, hh, ww) = x.dims4()?;
        x.reshape((b, t, ch, hh, ww))
    }
}

/// How a conditioning image whose size differs from the model's is made to fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fit {
    /// Centre-crop to the model's aspect ratio, then resize (the default).
    Crop,
    /// Resize without keeping the aspect ratio.
    Stretch,
    /// Refuse images whose size differs.
    Reject,
}

/// Reads an image file (PNG, JPEG or GIF; first frame) and prepares it as the model's
/// conditioning frame: `[3, height, width]` in [-1, 1].
pub fn load_image(path: &Path, height: usize, width: usize, fit: Fit) -> Result<Tensor> {
    let img = image::ImageReader::open(path)
        .at(path)?
        .with_guessed_format()
        .at(path)?
        .decode()
        .map_err(|e| Error::Data(format!("{}: not a readable image: {e}", path.display())))?
        .to_rgb8();
    let (w0, h0) = (img.width() as usize, img.height() as usize);
    if w0 == 0 || h0 == 0 {
        return Err(Error::Data(format!(
            "{}: the image is empty",
            path.display()
        )));
    }
    let filter = image::imageops::FilterType::Triangle;
    let img = if (w0, h0) == (width, height) {
        img
    } else {
        match fit {
            Fit::Reject => {
                return Err(Error::Data(format!(
                    "{}: the image is {w0}x{h0} but the model generates {width}x{height}; resize it, or use --fit crop or --fit stretch",
                    path.display()
                )))
            }
            Fit::Stretch => image::imageops::resize(&img, width as u32, height as u32, filter),
            Fit::Crop => {
                // Largest centred region with the target aspect ratio.
                let (cw, ch) = if w0 * height > h0 * width {
                    (h0 * width / height, h0)
                } else {
                    (w0, w0 * height / width)
                };
                let (cw, ch) = (cw.max(1), ch.max(1));
                let x = (w0 - cw) / 2;
                let y = (h0 - ch) / 2;
                let crop = image::imageops::crop_imm(&img, x as u32, y as u32, cw as u32, ch as u32).to_image();
                image::imageops::resize(&crop, width as u32, height as u32, filter)
            }
        }
    };
    let data: Vec<f32> = img
        .into_raw()
        .into_iter()
        .map(|v| v as f32 / 127.5 - 1.0)
        .collect();
    Tensor::from_vec(data, (height, width, 3), &Device::Cpu)
        .and_then(|t| t.permute((2, 0, 1)))
        .and_then(|t| t.contiguous())
        .map_err(ce("image"))
}
