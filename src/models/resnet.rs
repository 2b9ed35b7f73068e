//! The ResNet blocks of SVD (diffusers `models/resnet.py`): `ResnetBlock2D`, the temporal
//! `TemporalResnetBlock` with (3, 1, 1) convolutions, and `SpatioTemporalResBlock`, which runs
//! both and blends them with a learned `AlphaBlender` mix factor (Blattmann et al. 2023,
//! "Stable Video Diffusion", arXiv 2311.15127; "Align your Latents", arXiv 2304.08818).

use super::layers::{scalar_param, Conv2d, GroupNorm, Linear, TemporalConv};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// `ResnetBlock2D` with the default time-embedding mode (added after `conv1`).
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    pub fn new(
        vb: VarBuilder,
        in_ch: usize,
        out_ch: usize,
        temb_ch: Option<usize>,
        groups: usize,
        eps: f64,
    ) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::new(vb.pp("norm1"), groups, in_ch, eps)?,
            conv1: Conv2d::new(vb.pp("conv1"), in_ch, out_ch, 3, 1, 1)?,
            time_emb_proj: match temb_ch {
                Some(t) => Some(Linear::new(vb.pp("time_emb_proj"), t, out_ch, true)?),
                None => None,
            },
            norm2: GroupNorm::new(vb.pp("norm2"), groups, out_ch, eps)?,
            conv2: Conv2d::new(vb.pp("conv2"), out_ch, out_ch, 3, 1, 1)?,
            conv_shortcut: if in_ch != out_ch {
                Some(Conv2d::new(vb.pp("conv_shortcut"), in_ch, out_ch, 1, 1, 0)?)
            } else {
                None
            },
        })
    }

    /// # Shapes
    /// `x`: `[n, c_in, h, w]`, `temb`: `[n, temb_ch]` -> `[n, c_out, h, w]`
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => {
                let t = proj.forward(&t.silu()?)?;
                add_per_channel(&h, &t)?
            }
            _ => h,
        };
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        skip + h
    }
}

/// `TemporalResnetBlock`: the same structure over `[b, c, t, h, w]` with (3, 1, 1) convolutions;
/// its GroupNorms take statistics over time as well as space.
#[derive(Debug, Clone)]
pub struct TemporalResnetBlock {
    norm1: GroupNorm,
    conv1: TemporalConv,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: TemporalConv,
}

impl TemporalResnetBlock {
    pub fn new(
        vb: VarBuilder,
        ch: usize,
        temb_ch: Option<usize>,
        groups: usize,
        eps: f64,
    ) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::new(vb.pp("norm1"), groups, ch, eps)?,
            conv1: TemporalConv::new(vb.pp("conv1"), ch, ch, 3)?,
            time_emb_proj: match temb_ch {
                Some(t) => Some(Linear::new(vb.pp("time_emb_proj"), t, ch, true)?),
                None => None,
            },
            norm2: GroupNorm::new(vb.pp("norm2"), groups, ch, eps)?,
            conv2: TemporalConv::new(vb.pp("conv2"), ch, ch, 3)?,
        })
    }

    /// # Shapes
    /// `x`: `[b, c, t, h, w]`, `temb`: `[b, t, temb_ch]` -> `[b, c, t, h, w]`
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => {
                // [b, t, c] -> [b, c, t, 1, 1]
                let t = proj.forward(&t.silu()?)?.transpose(1, 2)?;
                add_per_channel(&h, &t)?
            }
            _ => h,
        };
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        x + h
    }
}

/// `AlphaBlender`: `alpha * spatial + (1 - alpha) * temporal` with `alpha = sigmoid(mix_factor)`
/// (`learned` and `learned_with_images` with video input agree), or `1 - alpha` when
/// `switch_spatial_to_temporal_mix` (the VAE decoder).
#[derive(Debug, Clone)]
pub struct AlphaBlender {
    mix_factor: Tensor,
    switch: bool,
}

impl AlphaBlender {
    pub fn new(vb: &VarBuilder, alpha: f64, switch: bool) -> Result<Self> {
        Ok(Self {
            mix_factor: scalar_param(vb, "mix_factor", alpha)?,
            switch,
        })
    }

    pub fn forward(&self, spatial: &Tensor, temporal: &Tensor) -> Result<Tensor> {
        let mut alpha = candle_nn::ops::sigmoid(&self.mix_factor)?;
        if self.switch {
            alpha = (1.0 - alpha)?;
        }
        if super::fused::fused_available(spatial, &alpha) {
            return super::fused::blend(spatial, temporal, &alpha);
        }
        let one_minus = (1.0 - &alpha)?;
        spatial
            .broadcast_mul(&alpha)?
            .add(&temporal.broadcast_mul(&one_minus)?)
    }
}

/// `SpatioTemporalResBlock`: a spatial ResNet block on every frame, a temporal one across
/// frames, blended by `time_mixer`.
#[derive(Debug, Clone)]
pub struct SpatioTemporalResBlock {
    spatial_res_block: ResnetBlock2D,
    temporal_res_block: TemporalResnetBlock,
    time_mixer: AlphaBlender,
}

impl SpatioTemporalResBlock {
    /// UNet form: `merge_factor` 0.5, `learned_with_images`, temporal eps = spatial eps.
    pub fn new(
        vb: VarBuilder,
        in_ch: usize,
        out_ch: usize,
        temb_ch: Option<usize>,
        eps: f64,
    ) -> Result<Self> {
        Self::with_mix(vb, in_ch, out_ch, temb_ch, 32, eps, eps, 0.5, false)
    }

    /// VAE decoder form: `merge_factor` 0.0, `learned`, switched mix, temporal eps 1e-5,
    /// `groups` GroupNorm groups (32 in diffusers).
    pub fn for_decoder(vb: VarBuilder, in_ch: usize, out_ch: usize, groups: usize) -> Result<Self> {
        Self::with_mix(vb, in_ch, out_ch, None, groups, 1e-6, 1e-5, 0.0, true)
    }

    #[allow(clippy::too_many_arguments)]
    fn with_mix(
        vb: VarBuilder,
        in_ch: usize,
        out_ch: usize,
        temb_ch: Option<usize>,
        groups: usize,
        eps: f64,
        temporal_eps: f64,
        merge_factor: f64,
        switch: bool,
    ) -> Result<Self> {
        Ok(Self {
            spatial_res_block: ResnetBlock2D::new(
                vb.pp("spatial_res_block"),
                in_ch,
                out_ch,
                temb_ch,
                groups,
                eps,
            )?,
            temporal_res_block: TemporalResnetBlock::new(
                vb.pp("temporal_res_block"),
                out_ch,
                temb_ch,
                groups,
                temporal_eps,
            )?,
            time_mixer: AlphaBlender::new(&vb.pp("time_mixer"), merge_factor, switch)?,
        })
    }

    /// # Shapes
    /// `x`: `[b*t, c_in, h, w]`, `temb`: `[b*t, temb_ch]` -> `[b*t, c_out, h, w]`
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>, frames: usize) -> Result<Tensor> {
        let h = self.spatial_res_block.forward(x, temb)?;
        let (bt, c, hh, ww) = h.dims4()?;
        let b = bt / frames;
        let spatial = h
            .reshape((b, frames, c, hh, ww))?
            .permute((0, 2, 1, 3, 4))?;
        let temb = match temb {
            Some(t) => Some(t.reshape((b, frames, ()))?),
            None => None,
        };
        let temporal = self
            .temporal_res_block
            .forward(&spatial.contiguous()?, temb.as_ref())?;
        let mixed = self.time_mixer.forward(&spatial, &temporal)?;
        mixed.permute((0, 2, 1, 3, 4))?.reshape((bt, c, hh, ww))
    }
}

/// `h + e` with `e` (`[n, c]` or `[b, c, t]`) broadcast over `h`'s remaining (spatial) axes:
/// on the CPU in f32 one pass of the fused bias kernel over `h` viewed as `[1, rows, pixels]`.
fn add_per_channel(h: &Tensor, e: &Tensor) -> Result<Tensor> {
    if super::fused::fused_available(h, e) {
        let rows = e.elem_count();
        let h2 = h.reshape((1, rows, h.elem_count() / rows))?;
        return super::fused::add_bias(&h2, &e.contiguous()?.flatten_all()?, 1)?.reshape(h.shape());
    }
    let mut shape = e.dims().to_vec();
    shape.resize(h.rank(), 1);
    h.broadcast_add(&e.reshape(shape)?)
}
