//! The one interface every generator is used through: `D(x; sigma, conditioning) -> x0`.
//! The SVD teacher implements it with EDM preconditioning around the UNet; consistency and GAN
//! students implement the same trait, so every sampler and metric runs on all of them.

use super::edm::scaling_tensors;
use candle_core::{DType, Result, Tensor};

/// SVD's conditioning of one batch.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// The (noise-augmented) first-frame latent, unscaled as in SVD: `[b, 1, c, h, w]`.
    pub image_latents: Tensor,
    /// Image embedding for cross-attention: `[b, 1, d]`.
    pub image_embeds: Tensor,
    /// `[b, 3]`: fps - 1, motion bucket id, noise augmentation strength.
    pub added_time_ids: Tensor,
}

impl Conditioning {
    /// Samples `lo..lo + n` of the batch (a data-parallel shard, `train::shard`).
    pub fn narrow(&self, lo: usize, n: usize) -> Result<Self> {
        Ok(Self {
            image_latents: self.image_latents.narrow(0, lo, n)?,
            image_embeds: self.image_embeds.narrow(0, lo, n)?,
            added_time_ids: self.added_time_ids.narrow(0, lo, n)?,
        })
    }

    /// The unconditional branch of classifier-free guidance: zero image latent and embedding
    /// (as in SVD's pipeline), same time ids.
    pub fn unconditional(&self) -> Result<Self> {
        Ok(Self {
            image_latents: self.image_latents.zeros_like()?,
            image_embeds: self.image_embeds.zeros_like()?,
            added_time_ids: self.added_time_ids.clone(),
        })
    }

    /// `[uncond; cond]` stacked along the batch, for one guided pass.
    pub fn with_unconditional(&self) -> Result<Self> {
        let u = self.unconditional()?;
        Ok(Self {
            image_latents: Tensor::cat(&[&u.image_latents, &self.image_latents], 0)?,
            image_embeds: Tensor::cat(&[&u.image_embeds, &self.image_embeds], 0)?,
            added_time_ids: Tensor::cat(&[&u.added_time_ids, &self.added_time_ids], 0)?,
        })
    }

    pub fn batch(&self) -> Result<usize> {
        self.image_latents.dim(0)
    }
}

/// A denoiser: the estimate of the clean latent video at noise level sigma.
pub trait Denoiser: Sync {
    /// # Shapes
    /// `x`: `[b, t, c, h, w]`, `sigma`: `[b]` -> `[b, t, c, h, w]`
    fn denoise(&self, x: &Tensor, sigma: &Tensor, cond: &Conditioning) -> Result<Tensor>;
}

/// The network inside SVD's preconditioning: diffusers' `UNetSpatioTemporalConditionModel`
/// call (implemented by [`crate::models::UNetSpatioTemporal`]). A trait, so that the
/// preconditioning and the samplers do not depend on one concrete network.
pub trait SvdBackbone: Send + Sync {
    /// The dtype the network computes in (its inputs are cast to it).
    fn dtype(&self) -> DType;
    /// # Shapes
    /// - `sample`: `[b, t, in_channels, h, w]`
    /// - `timestep`: `[b]` (SVD passes `c_noise = 0.25 ln sigma`)
    /// - `encoder_hidden_states`: `[b, m, cross_attention_dim]`
    /// - `added_time_ids`: `[b, 3]`
    /// - returns `[b, t, out_channels, h, w]`
    fn forward(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        added_time_ids: &Tensor,
    ) -> Result<Tensor>;
    /// The encoder's feature maps (every down block, then the mid block), for the SF-V-style
    /// discriminator.
    fn encoder_features(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        added_time_ids: &Tensor,
    ) -> Result<Vec<Tensor>>;
}

/// The SVD teacher: EDM v-prediction preconditioning around a spatio-temporal UNet, with the
/// first-frame latent concatenated to every frame's scaled noisy latent.
pub struct SvdDenoiser<'a> {
    pub unet: &'a dyn SvdBackbone,
}

impl SvdDenoiser<'_> {
    /// The UNet's input for `x` at `sigma`: `c_in x` with the first-frame latent concatenated
    /// along channels; returned with the scalings `(c_skip, c_out, c_noise)`.
    fn unet_input(
        x: &Tensor,
        sigma: &Tensor,
        cond: &Conditioning,
    ) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        let (_, t, _, _, _) = x.dims5()?;
        let (c_skip, c_out, c_in, c_noise) = scaling_tensors(sigma)?;
        let (bi, _, ci, hi, wi) = cond.image_latents.dims5()?;
        let image = cond.image_latents.broadcast_as((bi, t, ci, hi, wi))?;
        let model_in = Tensor::cat(&[&x.broadcast_mul(&c_in)?, &image], 2)?;
        Ok((model_in, c_skip, c_out, c_noise))
    }

    /// The UNet encoder's features of `x` at `sigma` (see [`SvdBackbone::encoder_features`]):
    /// the SF-V-style discriminator backbone.
    pub fn encoder_features(
        &self,
        x: &Tensor,
        sigma: &Tensor,
        cond: &Conditioning,
    ) -> Result<Vec<Tensor>> {
        let (model_in, _, _, c_noise) = Self::unet_input(x, sigma, cond)?;
        let dt = self.unet.dtype();
        self.unet.encoder_features(
            &model_in.to_dtype(dt)?,
            &c_noise,
            &cond.image_embeds.to_dtype(dt)?,
            &cond.added_time_ids,
        )
    }
}

impl SvdDenoiser<'_> {
    /// The teacher denoiser around any call of a UNet of dtype `dt` (for example a gradient
    /// checkpointed forward pass): `unet(sample, timestep, encoder_hidden_states, added_time_ids)`.
    pub fn denoise_via(
        x: &Tensor,
        sigma: &Tensor,
        cond: &Conditioning,
        dt: DType,
        unet: &dyn Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        // The sampler's state (x, sigma, scalings) stays in its own dtype (f32); only the
        // network runs in the UNet's (autocast-style half precision on CUDA).
        let (model_in, c_skip, c_out, c_noise) = Self::unet_input(x, sigma, cond)?;
        let out = unet(
            &model_in.to_dtype(dt)?,
            &c_noise,
            &cond.image_embeds.to_dtype(dt)?,
            &cond.added_time_ids,
        )?
        .to_dtype(x.dtype())?;
        x.broadcast_mul(&c_skip)? + out.broadcast_mul(&c_out)?
    }
}

impl Denoiser for SvdDenoiser<'_> {
    fn denoise(&self, x: &Tensor, sigma: &Tensor, cond: &Conditioning) -> Result<Tensor> {
        Self::denoise_via(x, sigma, cond, self.unet.dtype(), &|m, t, e, i| {
            self.unet.forward(m, t, e, i)
        })
    }
}
