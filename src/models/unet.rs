//! `UNetSpatioTemporalConditionModel`, the denoising backbone of Stable Video Diffusion
//! (Blattmann et al. 2023, arXiv 2311.15127), with the module tree, parameter names and
//! `config.json` fields of diffusers' `models/unets/unet_spatio_temporal_condition.py`, at any
//! width and depth. The EDM preconditioning lives in `crate::diffusion::edm`, not here.

use super::layers::{
    downsample2d, timestep_embedding, Conv2d, GroupNorm, TimestepEmbedding, Upsample2D,
};
use super::resnet::SpatioTemporalResBlock;
use super::transformer::TransformerSpatioTemporalModel;
use super::OneOrMany;
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// diffusers' `config.json` of `UNetSpatioTemporalConditionModel`; field names and defaults are
/// diffusers' (the defaults are SVD's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UNetConfig {
    /// Written by diffusers; kept so a config round-trips.
    #[serde(rename = "_class_name")]
    pub class_name: String,
    #[serde(rename = "_diffusers_version", skip_serializing_if = "Option::is_none")]
    pub diffusers_version: Option<String>,
    #[serde(rename = "_name_or_path", skip_serializing_if = "Option::is_none")]
    pub name_or_path: Option<String>,
    /// Latent height/width the model was trained at (informational).
    pub sample_size: Option<usize>,
    /// Noisy latent channels plus conditioning latent channels (4 + 4 in SVD).
    pub in_channels: usize,
    /// Latent channels predicted.
    pub out_channels: usize,
    /// `CrossAttnDownBlockSpatioTemporal` or `DownBlockSpatioTemporal` per level.
    pub down_block_types: Vec<String>,
    /// `UpBlockSpatioTemporal` or `CrossAttnUpBlockSpatioTemporal` per level.
    pub up_block_types: Vec<String>,
    /// Channel width per level; every width must divide into 32 GroupNorm groups.
    pub block_out_channels: Vec<usize>,
    /// Sinusoidal width of each added time id (fps, motion bucket, noise augmentation).
    pub addition_time_embed_dim: usize,
    /// 3 x `addition_time_embed_dim`.
    pub projection_class_embeddings_input_dim: usize,
    /// ResNet blocks per down level (up levels have one more).
    pub layers_per_block: OneOrMany,
    /// Width of the image embedding the cross-attention reads.
    pub cross_attention_dim: OneOrMany,
    /// Transformer blocks per attention layer.
    pub transformer_layers_per_block: OneOrMany,
    /// Attention heads per level.
    pub num_attention_heads: OneOrMany,
    /// Frames the model was trained with (informational).
    pub num_frames: usize,
}

impl Default for UNetConfig {
    fn default() -> Self {
        Self {
            class_name: "UNetSpatioTemporalConditionModel".into(),
            diffusers_version: None,
            name_or_path: None,
            sample_size: None,
            in_channels: 8,
            out_channels: 4,
            down_block_types: vec![
                "CrossAttnDownBlockSpatioTemporal".into(),
                "CrossAttnDownBlockSpatioTemporal".into(),
                "CrossAttnDownBlockSpatioTemporal".into(),
                "DownBlockSpatioTemporal".into(),
            ],
            up_block_types: vec![
                "UpBlockSpatioTemporal".into(),
                "CrossAttnUpBlockSpatioTemporal".into(),
                "CrossAttnUpBlockSpatioTemporal".into(),
                "CrossAttnUpBlockSpatioTemporal".into(),
            ],
            block_out_channels: vec![320, 640, 1280, 1280],
            addition_time_embed_dim: 256,
            projection_class_embeddings_input_dim: 768,
            layers_per_block: OneOrMany::One(2),
            cross_attention_dim: OneOrMany::One(1024),
            transformer_layers_per_block: OneOrMany::One(1),
            num_attention_heads: OneOrMany::Many(vec![5, 10, 20, 20]),
            num_frames: 25,
        }
    }
}

impl UNetConfig {
    /// The tiny CPU preset of issue 3's benchmark (1.33 M parameters): two levels (32, 64),
    /// one layer per block, cross-attention width 64, heads (2, 4).
    pub fn tiny() -> Self {
        Self {
            sample_size: Some(16),
            down_block_types: vec![
                "CrossAttnDownBlockSpatioTemporal".into(),
                "DownBlockSpatioTemporal".into(),
            ],
            up_block_types: vec![
                "UpBlockSpatioTemporal".into(),
                "CrossAttnUpBlockSpatioTemporal".into(),
            ],
            block_out_channels: vec![32, 64],
            addition_time_embed_dim: 32,
            projection_class_embeddings_input_dim: 96,
            layers_per_block: OneOrMany::One(1),
            cross_attention_dim: OneOrMany::One(64),
            num_attention_heads: OneOrMany::Many(vec![2, 4]),
            num_frames: 16,
            ..Self::default()
        }
    }

    /// Channels of [`UNetSpatioTemporal::encoder_features`]: every down block's, then the mid
    /// block's.
    pub fn encoder_channels(&self) -> Vec<usize> {
        let mut c = self.block_out_channels.clone();
        c.extend(self.block_out_channels.last().copied());
        c
    }

    /// Checks the shape rules diffusers enforces (and a few it leaves to a crash).
    pub fn validate(&self) -> std::result::Result<(), String> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err("block_out_channels is empty".into());
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(format!(
                "down_block_types ({}), up_block_types ({}) and block_out_channels ({n}) must have the same length",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlockSpatioTemporal" && t != "DownBlockSpatioTemporal" {
                return Err(format!("unknown down block type `{t}`"));
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlockSpatioTemporal" && t != "UpBlockSpatioTemporal" {
                return Err(format!("unknown up block type `{t}`"));
            }
        }
        for (i, c) in self.block_out_channels.iter().enumerate() {
            if c % 32 != 0 {
                return Err(format!(
                    "block_out_channels[{i}] = {c} is not a multiple of 32 (GroupNorm groups)"
                ));
            }
            let heads = self.num_attention_heads.at(i, n)?;
            if heads == 0 || c % heads != 0 {
                return Err(format!(
                    "block_out_channels[{i}] = {c} does not divide into {heads} attention heads"
                ));
            }
        }
        for (name, v) in [
            ("layers_per_block", &self.layers_per_block),
            ("cross_attention_dim", &self.cross_attention_dim),
            (
                "transformer_layers_per_block",
                &self.transformer_layers_per_block,
            ),
            ("num_attention_heads", &self.num_attention_heads),
        ] {
            v.at(n - 1, n).map_err(|e| format!("{name}: {e}"))?;
        }
        if self.projection_class_embeddings_input_dim != 3 * self.addition_time_embed_dim {
            return Err(format!(
                "projection_class_embeddings_input_dim ({}) must be 3 x addition_time_embed_dim ({}): fps, motion bucket and noise augmentation",
                self.projection_class_embeddings_input_dim, self.addition_time_embed_dim
            ));
        }
        Ok(())
    }

    /// The spatio-temporal transformer of level `i` at width `ch`.
    fn transformer(
        &self,
        vb: VarBuilder,
        i: usize,
        ch: usize,
    ) -> Result<TransformerSpatioTemporalModel> {
        let heads = self.level(&self.num_attention_heads, i);
        TransformerSpatioTemporalModel::new(
            vb,
            heads,
            ch / heads,
            ch,
            self.level(&self.transformer_layers_per_block, i),
            self.level(&self.cross_attention_dim, i),
        )
    }

    fn level(&self, v: &OneOrMany, i: usize) -> usize {
        // validate() has checked the lengths.
        v.at(i, self.block_out_channels.len()).unwrap_or(1)
    }
}

#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<SpatioTemporalResBlock>,
    attentions: Vec<TransformerSpatioTemporalModel>,
    downsampler: Option<Conv2d>,
}

#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<SpatioTemporalResBlock>,
    attentions: Vec<TransformerSpatioTemporalModel>,
    upsampler: Option<Upsample2D>,
}

/// The backbone. `forward` takes the model input exactly as diffusers' does.
#[derive(Debug, Clone)]
pub struct UNetSpatioTemporal {
    pub config: UNetConfig,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    add_embedding: TimestepEmbedding,
    down_blocks: Vec<DownBlock>,
    mid_resnets: Vec<SpatioTemporalResBlock>,
    mid_attentions: Vec<TransformerSpatioTemporalModel>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNetSpatioTemporal {
    pub fn new(vb: VarBuilder, cfg: &UNetConfig) -> Result<Self> {
        cfg.validate()
            .map_err(|e| candle_core::Error::Msg(format!("UNet config: {e}")))?;
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let temb = ch[0] * 4;
        let conv_in = Conv2d::new(vb.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?;
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), ch[0], temb, temb)?;
        let add_embedding = TimestepEmbedding::new(
            vb.pp("add_embedding"),
            cfg.projection_class_embeddings_input_dim,
            temb,
            temb,
        )?;

        let mut down_blocks = Vec::with_capacity(n);
        let mut out_ch = ch[0];
        for i in 0..n {
            let in_ch = out_ch;
            out_ch = ch[i];
            let vbi = vb.pp("down_blocks").pp(i);
            let cross = cfg.down_block_types[i] == "CrossAttnDownBlockSpatioTemporal";
            let eps = if cross { 1e-6 } else { 1e-5 };
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for l in 0..cfg.level(&cfg.layers_per_block, i) {
                let cin = if l == 0 { in_ch } else { out_ch };
                resnets.push(SpatioTemporalResBlock::new(
                    vbi.pp("resnets").pp(l),
                    cin,
                    out_ch,
                    Some(temb),
                    eps,
                )?);
                if cross {
                    attentions.push(cfg.transformer(vbi.pp("attentions").pp(l), i, out_ch)?);
                }
            }
            let downsampler = if i + 1 < n {
                Some(downsample2d(vbi.pp("downsamplers").pp(0), out_ch, 1)?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                attentions,
                downsampler,
            });
        }

        let last = ch[n - 1];
        let vbm = vb.pp("mid_block");
        let mid_resnets = vec![
            SpatioTemporalResBlock::new(vbm.pp("resnets").pp(0), last, last, Some(temb), 1e-5)?,
            SpatioTemporalResBlock::new(vbm.pp("resnets").pp(1), last, last, Some(temb), 1e-5)?,
        ];
        let mid_attentions = vec![cfg.transformer(vbm.pp("attentions").pp(0), n - 1, last)?];

        let mut up_blocks = Vec::with_capacity(n);
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut out_ch = rev[0];
        for i in 0..n {
            let prev = out_ch;
            out_ch = rev[i];
            let in_ch = rev[(i + 1).min(n - 1)];
            let li = n - 1 - i;
            let vbi = vb.pp("up_blocks").pp(i);
            let cross = cfg.up_block_types[i] == "CrossAttnUpBlockSpatioTemporal";
            let layers = cfg.level(&cfg.layers_per_block, li) + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for l in 0..layers {
                let skip = if l == layers - 1 { in_ch } else { out_ch };
                let cin = if l == 0 { prev } else { out_ch };
                resnets.push(SpatioTemporalResBlock::new(
                    vbi.pp("resnets").pp(l),
                    cin + skip,
                    out_ch,
                    Some(temb),
                    1e-6,
                )?);
                if cross {
                    attentions.push(cfg.transformer(vbi.pp("attentions").pp(l), li, out_ch)?);
                }
            }
            let upsampler = if i + 1 < n {
                Some(Upsample2D::new(vbi.pp("upsamplers").pp(0), out_ch)?)
            } else {
                None
            };
            up_blocks.push(UpBlock {
                resnets,
                attentions,
                upsampler,
            });
        }

        Ok(Self {
            config: cfg.clone(),
            conv_in,
            time_embedding,
            add_embedding,
            down_blocks,
            mid_resnets,
            mid_attentions,
            up_blocks,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), 32, ch[0], 1e-5)?,
            conv_out: Conv2d::new(vb.pp("conv_out"), ch[0], cfg.out_channels, 3, 1, 1)?,
        })
    }

    /// The encoder half (embeddings, down blocks, mid block) shared by [`Self::forward`] and
    /// [`Self::encoder_features`].
    fn encode(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        added_time_ids: &Tensor,
        run: &mut RunUnit<'_>,
    ) -> Result<Encoded> {
        let (b, t, c, h, w) = sample.dims5()?;
        let ch0 = self.config.block_out_channels[0];
        // The sinusoids are computed in f32 from the f32 timesteps and cast to the model's dtype
        // afterwards, as diffusers does (`t_emb.to(dtype=sample.dtype)`).
        let dt = sample.dtype();
        let emb = self
            .time_embedding
            .forward(&timestep_embedding(&timestep.to_dtype(DType::F32)?, ch0)?.to_dtype(dt)?)?;
        let ids = added_time_ids.to_dtype(DType::F32)?.flatten_all()?;
        let time_embeds = timestep_embedding(&ids, self.config.addition_time_embed_dim)?
            .to_dtype(dt)?
            .reshape((b, ()))?;
        let emb = (emb + self.add_embedding.forward(&time_embeds)?)?;
        // repeat_interleave over frames: [b, d] -> [b*t, d]
        let repeat = |x: &Tensor| -> Result<Tensor> {
            let mut dims = x.dims().to_vec();
            let mut target = vec![dims[0], t];
            target.extend_from_slice(&dims[1..]);
            dims[0] *= t;
            x.unsqueeze(1)?.broadcast_as(target)?.reshape(dims)
        };
        let emb = repeat(&emb)?;
        let context = repeat(encoder_hidden_states)?;

        let mut x = self.conv_in.forward(&sample.reshape((b * t, c, h, w))?)?;
        let mut skips = vec![x.clone()];
        let mut blocks = Vec::with_capacity(self.down_blocks.len() + 1);
        for (i, block) in self.down_blocks.iter().enumerate() {
            for l in 0..block.resnets.len() {
                x = run(Unit::Down(i, l), &x, &emb, &context)?;
                skips.push(x.clone());
            }
            if let Some(down) = &block.downsampler {
                x = down.forward(&x)?;
                skips.push(x.clone());
            }
            blocks.push(x.clone());
        }
        for k in 0..self.mid_resnets.len() {
            x = run(Unit::Mid(k), &x, &emb, &context)?;
        }
        blocks.push(x.clone());
        Ok(Encoded {
            x,
            skips,
            emb,
            context,
            blocks,
        })
    }

    /// The encoder's features, the backbone of an SF-V-style discriminator: the output of every
    /// down block (after its downsampler) and of the mid block, each `[b t, c, h', w']`, with
    /// channels [`UNetConfig::encoder_channels`]. Arguments as [`Self::forward`].
    pub fn encoder_features(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        added_time_ids: &Tensor,
    ) -> Result<Vec<Tensor>> {
        let t = sample.dim(1)?;
        let mut run = |u: Unit, x: &Tensor, e: &Tensor, c: &Tensor| self.unit(u, x, e, c, t);
        Ok(self
            .encode(
                sample,
                timestep,
                encoder_hidden_states,
                added_time_ids,
                &mut run,
            )?
            .blocks)
    }

    /// The dtype the weights are held in (f32 on the CPU; f16 or bf16 on CUDA when asked).
    pub fn dtype(&self) -> DType {
        self.conv_in.weight.dtype()
    }

    /// The model call of diffusers' `UNetSpatioTemporalConditionModel.forward`.
    /// # Shapes
    /// - `sample`: `[b, t, in_channels, h, w]`
    /// - `timestep`: `[b]` (SVD passes `c_noise = 0.25 ln sigma`)
    /// - `encoder_hidden_states`: `[b, m, cross_attention_dim]` (the image embedding, m = 1)
    /// - `added_time_ids`: `[b, 3]` (fps - 1, motion bucket id, noise augmentation strength)
    /// - returns `[b, t, out_channels, h, w]`
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        added_time_ids: &Tensor,
    ) -> Result<Tensor> {
        let t = sample.dim(1)?;
        let mut run = |u: Unit, x: &Tensor, e: &Tensor, c: &Tensor| self.unit(u, x, e, c, t);
        self.forward_with(
            sample,
            timestep,
            encoder_hidden_states,
            added_time_ids,
            &mut run,
        )
    }

    /// [`Self::forward`] with gradient checkpointing of every resnet + attention unit (see
    /// [`crate::models::grad_checkpoint`]): `trainable` holds the weights gradients reach (LoRA
    /// adapters merged in, say), `frozen` the same values as plain tensors. Same output; the
    /// backward pass recomputes each unit, and the gradients of `ckpt`'s variables found inside
    /// the units are added by [`crate::models::grad_checkpoint::Checkpointing::merge_into`].
    pub fn forward_checkpointed(
        trainable: &std::sync::Arc<Self>,
        frozen: &std::sync::Arc<Self>,
        ckpt: &crate::models::grad_checkpoint::Checkpointing,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        added_time_ids: &Tensor,
    ) -> Result<Tensor> {
        let t = sample.dim(1)?;
        let mut run = |u: Unit, x: &Tensor, e: &Tensor, c: &Tensor| {
            let (tr, fr) = (trainable.clone(), frozen.clone());
            let unit: std::sync::Arc<crate::models::grad_checkpoint::UnitFn> =
                std::sync::Arc::new(move |x: &Tensor, e: &Tensor, c: &Tensor, grad: bool| {
                    if grad {
                        tr.unit(u, x, e, c, t)
                    } else {
                        fr.unit(u, x, e, c, t)
                    }
                });
            ckpt.apply(unit, x, e, c)
        };
        trainable.forward_with(
            sample,
            timestep,
            encoder_hidden_states,
            added_time_ids,
            &mut run,
        )
    }

    /// One resnet (+ attention) unit of the UNet: the part that gradient checkpointing recomputes.
    fn unit(
        &self,
        u: Unit,
        x: &Tensor,
        emb: &Tensor,
        context: &Tensor,
        frames: usize,
    ) -> Result<Tensor> {
        let (resnet, attn) = match u {
            Unit::Down(i, l) => (
                &self.down_blocks[i].resnets[l],
                self.down_blocks[i].attentions.get(l),
            ),
            Unit::Up(i, l) => (
                &self.up_blocks[i].resnets[l],
                self.up_blocks[i].attentions.get(l),
            ),
            Unit::Mid(0) => (&self.mid_resnets[0], None),
            Unit::Mid(k) => {
                // The mid block: resnet 0, then (attention k-1, resnet k).
                let x = self.mid_attentions[k - 1].forward(x, context, frames)?;
                return self.mid_resnets[k].forward(&x, Some(emb), frames);
            }
        };
        let x = resnet.forward(x, Some(emb), frames)?;
        match attn {
            Some(a) => a.forward(&x, context, frames),
            None => Ok(x),
        }
    }

    fn forward_with(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        added_time_ids: &Tensor,
        run: &mut RunUnit<'_>,
    ) -> Result<Tensor> {
        let (b, t, ..) = sample.dims5()?;
        let Encoded {
            mut x,
            mut skips,
            emb,
            context,
            ..
        } = self.encode(sample, timestep, encoder_hidden_states, added_time_ids, run)?;
        for (i, block) in self.up_blocks.iter().enumerate() {
            for l in 0..block.resnets.len() {
                let skip = skips
                    .pop()
                    .ok_or_else(|| candle_core::Error::Msg("UNet skip stack underflow".into()))?;
                x = Tensor::cat(&[&x, &skip], 1)?;
                x = run(Unit::Up(i, l), &x, &emb, &context)?;
            }
            if let Some(up) = &block.upsampler {
                // Upsample to the size of the skip it will meet (odd sizes round down going in).
                let size = skips
                    .last()
                    .map(|s| (s.dim(2).unwrap_or(0), s.dim(3).unwrap_or(0)));
                x = up.forward(&x, size)?;
            }
        }
        let x = self
            .conv_out
            .forward(&self.conv_norm_out.forward_silu(&x)?)?;
        let (_, co, ho, wo) = x.dims4()?;
        x.reshape((b, t, co, ho, wo))
    }
}

/// A resnet (+ attention) unit of the UNet, by position.
#[derive(Debug, Clone, Copy)]
enum Unit {
    Down(usize, usize),
    Mid(usize),
    Up(usize, usize),
}

/// Runs one unit on `(x, emb, context)`: directly, or checkpointed.
type RunUnit<'a> = dyn FnMut(Unit, &Tensor, &Tensor, &Tensor) -> Result<Tensor> + 'a;

/// What the encoder half leaves for the decoder half.
struct Encoded {
    x: Tensor,
    skips: Vec<Tensor>,
    emb: Tensor,
    context: Tensor,
    /// The output of every down block and of the mid block.
    blocks: Vec<Tensor>,
}

impl crate::diffusion::SvdBackbone for UNetSpatioTemporal {
    fn dtype(&self) -> DType {
        UNetSpatioTemporal::dtype(self)
    }
    fn forward(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        added_time_ids: &Tensor,
    ) -> Result<Tensor> {
        UNetSpatioTemporal::forward(
            self,
            sample,
            timestep,
            encoder_hidden_states,
            added_time_ids,
        )
    }
    fn encoder_features(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        added_time_ids: &Tensor,
    ) -> Result<Vec<Tensor>> {
        UNetSpatioTemporal::encoder_features(
            self,
            sample,
            timestep,
            encoder_hidden_states,
            added_time_ids,
        )
    }
}
