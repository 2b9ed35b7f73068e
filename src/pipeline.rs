//! Image-to-video generation with an SVD-architecture model, as diffusers'
//! `StableVideoDiffusionPipeline` does it: the conditioning image is noise-augmented and
//! encoded by the VAE (latent concatenated to every frame), embedded by the image encoder
//! (cross-attention), and fps, motion bucket and augmentation strength enter as added time
//! ids; the latent video is sampled by [`crate::diffusion::sample`] and decoded by the VAE.
//!
//! A pipeline folder holds `vae/`, `unet/`, `image_encoder/` (diffusers' layout) and
//! `onestep.json` ([`PipelineSettings`]).

use crate::diffusion::noise::NormalRng;
use crate::diffusion::{sample, Conditioning, SamplerConfig, SvdDenoiser};
use crate::error::{Error, IoContext, Result};
use crate::models::{
    load_component, AutoencoderKLTemporalDecoder, ImageEncoder, UNetSpatioTemporal,
};
use crate::train::ce;
use candle_core::{Device, Tensor};
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
}

pub struct VideoPipeline {
    pub settings: PipelineSettings,
    pub vae: AutoencoderKLTemporalDecoder,
    pub unet: UNetSpatioTemporal,
    pub image_encoder: ImageEncoder,
    pub device: Device,
}

/// Per-sample generation options.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub sampler: SamplerConfig,
    pub fps: f64,
    pub motion_bucket_id: f64,
    pub noise_aug_strength: f64,
}

impl VideoPipeline {
    /// Loads a pipeline folder (see the module docs).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let settings_path = dir.join(SETTINGS_FILE);
        if !settings_path.exists() {
            return Err(Error::Data(format!(
                "{}: not a onestep model folder (no {SETTINGS_FILE}; expected vae/, unet/, image_encoder/ and {SETTINGS_FILE}, as a teacher stage writes them)",
                dir.display()
            )));
        }
        let text = std::fs::read_to_string(&settings_path).at(&settings_path)?;
        let settings: PipelineSettings = serde_json::from_str(&text)
            .map_err(|e| Error::Data(format!("{}: {e}", settings_path.display())))?;
        let (_, vae, _) =
            load_component(&dir.join("vae"), device, AutoencoderKLTemporalDecoder::new)?;
        let (_, unet, _) = load_component(&dir.join("unet"), device, UNetSpatioTemporal::new)?;
        let (_, image_encoder, _) =
            load_component(&dir.join("image_encoder"), device, ImageEncoder::new)?;
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
            fps: self.settings.fps,
            motion_bucket_id: self.settings.motion_bucket_id,
            noise_aug_strength: self.settings.noise_aug_strength,
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
        let t = self.settings.frames;
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
        let cond = self
            .conditioning(
                images,
                &aug,
                opts.noise_aug_strength,
                opts.fps,
                opts.motion_bucket_id,
            )
            .map_err(&err)?;
        let den = SvdDenoiser { unet: &self.unet };
        // Re-noising (consistency samplers) continues each sample's own generator.
        let device = self.device.clone();
        let mut fresh = || {
            let parts = rngs
                .iter_mut()
                .map(|r| r.tensor(&latent_shape, &device))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::stack(&parts, 0)
        };
        let (z, nfe) = match &self.settings.consistency {
            Some(c) => {
                let den = c.wrap(&den);
                sample(&den, &cond, &noise, &opts.sampler, &mut fresh, on_step)
            }
            None => sample(&den, &cond, &noise, &opts.sampler, &mut fresh, on_step),
        }
        .map_err(&err)?;
        let video = self.decode(&z).map_err(&err)?;
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
        let image_embeds = self.image_encoder.forward(images)?;
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

    /// Latents (scaled by the VAE's scaling factor) to frames in [-1, 1].
    /// # Shapes
    /// `[b, t, c, h, w]` -> `[b, t, 3, H, W]`
    pub fn decode(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, c, h, w) = z.dims5()?;
        let z = (z.reshape((b * t, c, h, w))? / self.vae.config.scaling_factor)?;
        let x = self.vae.decode(&z, t)?;
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
