//! `AutoencoderKLTemporalDecoder`, the VAE of Stable Video Diffusion: the image KL encoder of
//! Stable Diffusion (Rombach et al. 2022) per frame, and a decoder with spatio-temporal ResNet
//! blocks and a final (3, 1, 1) convolution over time. Module tree, parameter names and
//! `config.json` fields follow diffusers' `autoencoders/autoencoder_kl_temporal_decoder.py`.

use super::layers::{
    downsample2d, Attention, AttentionOpts, Conv2d, GroupNorm, TemporalConv, Upsample2D,
};
use super::resnet::{ResnetBlock2D, SpatioTemporalResBlock};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// diffusers' `config.json` of `AutoencoderKLTemporalDecoder` (defaults are diffusers').
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VaeConfig {
    /// Written by diffusers; kept so a config round-trips.
    #[serde(rename = "_class_name")]
    pub class_name: String,
    #[serde(rename = "_diffusers_version", skip_serializing_if = "Option::is_none")]
    pub diffusers_version: Option<String>,
    #[serde(rename = "_name_or_path", skip_serializing_if = "Option::is_none")]
    pub name_or_path: Option<String>,
    /// Image channels in.
    pub in_channels: usize,
    /// Image channels out.
    pub out_channels: usize,
    /// `DownEncoderBlock2D` per level.
    pub down_block_types: Vec<String>,
    /// Channel width per level (multiples of `norm_num_groups`); the latent is 2^(levels-1) times smaller.
    pub block_out_channels: Vec<usize>,
    /// ResNet blocks per encoder level (decoder levels have one more).
    pub layers_per_block: usize,
    /// Latent channels.
    pub latent_channels: usize,
    /// Image size the model was trained at (informational).
    pub sample_size: usize,
    /// Latents are multiplied by this before diffusion (0.18215 in SVD).
    pub scaling_factor: f64,
    /// diffusers' fp16 hint (unused here: onestep runs the VAE in f32).
    pub force_upcast: bool,
    /// GroupNorm groups of every norm in the encoder and decoder. diffusers fixes 32 for this
    /// model and has no such key; onestep writes it to `config.json` only when it is not 32 (a
    /// toy-scale deviation: with 32 groups on 32-64 channels each group holds 1-2 channels and
    /// normalises away each image's colour). diffusers would ignore the key, so a checkpoint
    /// with another value does not load there.
    #[serde(skip_serializing_if = "is_default_groups")]
    pub norm_num_groups: usize,
}

/// diffusers' (fixed) number of GroupNorm groups.
pub const DIFFUSERS_GROUPS: usize = 32;

fn is_default_groups(g: &usize) -> bool {
    *g == DIFFUSERS_GROUPS
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self {
            class_name: "AutoencoderKLTemporalDecoder".into(),
            diffusers_version: None,
            name_or_path: None,
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            latent_channels: 4,
            sample_size: 32,
            scaling_factor: 0.18215,
            force_upcast: true,
            norm_num_groups: DIFFUSERS_GROUPS,
        }
    }
}

impl VaeConfig {
    /// SVD's VAE (`stabilityai/stable-video-diffusion-img2vid`): 4 levels, 8x downsampling.
    pub fn svd() -> Self {
        Self {
            down_block_types: vec!["DownEncoderBlock2D".into(); 4],
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            sample_size: 768,
            ..Self::default()
        }
    }

    /// A CPU-sized preset: 3 levels (32, 64, 64), 4x downsampling, 4 latent channels.
    pub fn tiny() -> Self {
        Self {
            down_block_types: vec!["DownEncoderBlock2D".into(); 3],
            block_out_channels: vec![32, 64, 64],
            layers_per_block: 1,
            sample_size: 64,
            ..Self::default()
        }
    }

    /// Spatial downsampling factor between images and latents.
    pub fn downsample_factor(&self) -> usize {
        1 << (self.block_out_channels.len().saturating_sub(1))
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.block_out_channels.is_empty() {
            return Err("block_out_channels is empty".into());
        }
        if self.down_block_types.len() != self.block_out_channels.len() {
            return Err(format!(
                "down_block_types ({}) and block_out_channels ({}) must have the same length",
                self.down_block_types.len(),
                self.block_out_channels.len()
            ));
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            return Err(format!(
                "unknown down block type `{t}` (only DownEncoderBlock2D)"
            ));
        }
        let g = self.norm_num_groups;
        if g == 0 {
            return Err("norm_num_groups must be at least 1".into());
        }
        for (i, c) in self.block_out_channels.iter().enumerate() {
            if c % g != 0 {
                return Err(format!(
                    "block_out_channels[{i}] = {c} is not a multiple of norm_num_groups = {g}"
                ));
            }
        }
        if self.layers_per_block == 0 {
            return Err("layers_per_block must be at least 1".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct EncoderBlock {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Conv2d>,
}

#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<EncoderBlock>,
    mid_resnets: [ResnetBlock2D; 2],
    mid_attention: Attention,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

fn vae_attention(vb: VarBuilder, ch: usize, groups: usize) -> Result<Attention> {
    Attention::new(
        vb,
        ch,
        1,
        ch,
        AttentionOpts {
            cross_attention_dim: None,
            qkv_bias: true,
            group_norm: Some((groups, 1e-6)),
            residual: true,
        },
    )
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let n = ch.len();
        let mut out_ch = ch[0];
        let mut down_blocks = Vec::new();
        for i in 0..n {
            let in_ch = out_ch;
            out_ch = ch[i];
            let vbi = vb.pp("down_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block)
                .map(|l| {
                    let cin = if l == 0 { in_ch } else { out_ch };
                    ResnetBlock2D::new(vbi.pp("resnets").pp(l), cin, out_ch, None, g, 1e-6)
                })
                .collect::<Result<Vec<_>>>()?;
            let downsampler = if i + 1 < n {
                Some(downsample2d(vbi.pp("downsamplers").pp(0), out_ch, 0)?)
            } else {
                None
            };
            down_blocks.push(EncoderBlock {
                resnets,
                downsampler,
            });
        }
        let last = ch[n - 1];
        let vbm = vb.pp("mid_block");
        Ok(Self {
            conv_in: Conv2d::new(vb.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?,
            down_blocks,
            mid_resnets: [
                ResnetBlock2D::new(vbm.pp("resnets").pp(0), last, last, None, g, 1e-6)?,
                ResnetBlock2D::new(vbm.pp("resnets").pp(1), last, last, None, g, 1e-6)?,
            ],
            mid_attention: vae_attention(vbm.pp("attentions").pp(0), last, g)?,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), g, last, 1e-6)?,
            conv_out: Conv2d::new(vb.pp("conv_out"), last, 2 * cfg.latent_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward(x)?;
        for block in &self.down_blocks {
            for r in &block.resnets {
                x = r.forward(&x, None)?;
            }
            if let Some(d) = &block.downsampler {
                x = d.forward(&x)?;
            }
        }
        x = self.mid_resnets[0].forward(&x, None)?;
        x = self.mid_attention.forward_image(&x)?;
        x = self.mid_resnets[1].forward(&x, None)?;
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&x)?)
    }
}

#[derive(Debug, Clone)]
struct DecoderBlock {
    resnets: Vec<SpatioTemporalResBlock>,
    upsampler: Option<Upsample2D>,
}

#[derive(Debug, Clone)]
struct TemporalDecoder {
    conv_in: Conv2d,
    mid_resnets: Vec<SpatioTemporalResBlock>,
    mid_attention: Attention,
    up_blocks: Vec<DecoderBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    time_conv_out: TemporalConv,
}

impl TemporalDecoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let n = ch.len();
        let last = ch[n - 1];
        let vbm = vb.pp("mid_block");
        let mid_resnets = (0..cfg.layers_per_block)
            .map(|l| SpatioTemporalResBlock::for_decoder(vbm.pp("resnets").pp(l), last, last, g))
            .collect::<Result<Vec<_>>>()?;
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut out_ch = rev[0];
        let mut up_blocks = Vec::new();
        for i in 0..n {
            let prev = out_ch;
            out_ch = rev[i];
            let vbi = vb.pp("up_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|l| {
                    let cin = if l == 0 { prev } else { out_ch };
                    SpatioTemporalResBlock::for_decoder(vbi.pp("resnets").pp(l), cin, out_ch, g)
                })
                .collect::<Result<Vec<_>>>()?;
            let upsampler = if i + 1 < n {
                Some(Upsample2D::new(vbi.pp("upsamplers").pp(0), out_ch)?)
            } else {
                None
            };
            up_blocks.push(DecoderBlock { resnets, upsampler });
        }
        Ok(Self {
            conv_in: Conv2d::new(vb.pp("conv_in"), cfg.latent_channels, last, 3, 1, 1)?,
            mid_resnets,
            mid_attention: vae_attention(vbm.pp("attentions").pp(0), last, g)?,
            up_blocks,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), g, ch[0], 1e-6)?,
            conv_out: Conv2d::new(vb.pp("conv_out"), ch[0], cfg.out_channels, 3, 1, 1)?,
            time_conv_out: TemporalConv::new(
                vb.pp("time_conv_out"),
                cfg.out_channels,
                cfg.out_channels,
                3,
            )?,
        })
    }

    fn forward(&self, z: &Tensor, frames: usize) -> Result<Tensor> {
        let mut x = self.conv_in.forward(z)?;
        x = self.mid_resnets[0].forward(&x, None, frames)?;
        // As in diffusers, the attention only runs between resnets: with one layer per block it
        // exists in the checkpoint but is never applied.
        for r in &self.mid_resnets[1..] {
            x = self.mid_attention.forward_image(&x)?;
            x = r.forward(&x, None, frames)?;
        }
        for block in &self.up_blocks {
            for r in &block.resnets {
                x = r.forward(&x, None, frames)?;
            }
            if let Some(u) = &block.upsampler {
                x = u.forward(&x, None)?;
            }
        }
        let x = self
            .conv_out
            .forward(&self.conv_norm_out.forward_silu(&x)?)?;
        let (bt, c, h, w) = x.dims4()?;
        let b = bt / frames;
        let x = x
            .reshape((b, frames, c, h, w))?
            .permute((0, 2, 1, 3, 4))?
            .contiguous()?;
        let x = self.time_conv_out.forward(&x)?;
        x.permute((0, 2, 1, 3, 4))?.reshape((bt, c, h, w))
    }
}

/// The diagonal Gaussian posterior of the encoder (`DiagonalGaussianDistribution`).
#[derive(Debug, Clone)]
pub struct Posterior {
    pub mean: Tensor,
    /// Clamped to [-30, 20] as in diffusers.
    pub logvar: Tensor,
}

impl Posterior {
    pub fn mode(&self) -> &Tensor {
        &self.mean
    }

    /// `mean + std * eps` with the caller's standard normal `eps`.
    pub fn sample_with(&self, eps: &Tensor) -> Result<Tensor> {
        self.mean
            .add(&(self.logvar.affine(0.5, 0.0)?.exp()? * eps)?)
    }

    /// KL divergence to N(0, I), summed over channels and pixels, per sample: `[n]`.
    pub fn kl(&self) -> Result<Tensor> {
        let var = self.logvar.exp()?;
        let kl = ((self.mean.sqr()? + var)? - 1.0)?.sub(&self.logvar)?;
        kl.flatten_from(1)?.sum(1)? * 0.5
    }
}

/// The SVD autoencoder.
#[derive(Debug, Clone)]
pub struct AutoencoderKLTemporalDecoder {
    pub config: VaeConfig,
    encoder: Encoder,
    quant_conv: Conv2d,
    decoder: TemporalDecoder,
}

impl AutoencoderKLTemporalDecoder {
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        cfg.validate()
            .map_err(|e| candle_core::Error::Msg(format!("VAE config: {e}")))?;
        let l2 = 2 * cfg.latent_channels;
        Ok(Self {
            config: cfg.clone(),
            encoder: Encoder::new(vb.pp("encoder"), cfg)?,
            quant_conv: Conv2d::new(vb.pp("quant_conv"), l2, l2, 1, 1, 0)?,
            decoder: TemporalDecoder::new(vb.pp("decoder"), cfg)?,
        })
    }

    /// # Shapes
    /// `[n, 3, H, W]` in [-1, 1] -> posterior over `[n, latent, H/f, W/f]`
    pub fn encode(&self, x: &Tensor) -> Result<Posterior> {
        let moments = self.quant_conv.forward(&self.encoder.forward(x)?)?;
        let l = self.config.latent_channels;
        Ok(Posterior {
            mean: moments.narrow(1, 0, l)?,
            logvar: moments.narrow(1, l, l)?.clamp(-30f32, 20f32)?,
        })
    }

    /// Decodes frames of `frames`-long clips (the decoder mixes information across them).
    /// # Shapes
    /// `[b*frames, latent, h, w]` -> `[b*frames, 3, h*f, w*f]`
    pub fn decode(&self, z: &Tensor, frames: usize) -> Result<Tensor> {
        self.decoder.forward(z, frames)
    }
}
