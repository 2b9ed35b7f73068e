//! The spatio-temporal transformer of SVD (diffusers `TransformerSpatioTemporalModel`,
//! `BasicTransformerBlock`, `TemporalBasicTransformerBlock`): spatial self- and cross-attention
//! within each frame, then temporal self-attention across frames at every pixel with
//! cross-attention to the first frame's context, blended by a learned mix factor.

use super::layers::{
    timestep_embedding, Attention, AttentionOpts, FeedForward, GroupNorm, LayerNorm, Linear,
    TimestepEmbedding,
};
use super::resnet::AlphaBlender;
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

fn cross_attention(
    vb: VarBuilder,
    dim: usize,
    heads: usize,
    head_dim: usize,
    cross: usize,
) -> Result<Attention> {
    let opts = AttentionOpts {
        cross_attention_dim: Some(cross),
        ..Default::default()
    };
    Attention::new(vb, dim, heads, head_dim, opts)
}

/// `BasicTransformerBlock` (layer norms, self-attention, cross-attention, GEGLU feed-forward).
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        head_dim: usize,
        cross: usize,
    ) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::new(
                vb.pp("attn1"),
                dim,
                heads,
                head_dim,
                AttentionOpts::default(),
            )?,
            norm2: LayerNorm::new(vb.pp("norm2"), dim, 1e-5)?,
            attn2: cross_attention(vb.pp("attn2"), dim, heads, head_dim, cross)?,
            norm3: LayerNorm::new(vb.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::new(vb.pp("ff"), dim, dim, 4)?,
        })
    }

    /// # Shapes
    /// `x`: `[n, seq, dim]`, `context`: `[n, m, cross]` -> `[n, seq, dim]`
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = (self.attn1.forward_seq(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self
            .attn2
            .forward_seq(&self.norm2.forward(&x)?, Some(context))?
            + &x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + &x
    }
}

/// `TemporalBasicTransformerBlock`: the same over time at each spatial position, with an input
/// feed-forward (`ff_in`) and residuals (its inner width equals its width in SVD).
#[derive(Debug, Clone)]
pub struct TemporalBasicTransformerBlock {
    norm_in: LayerNorm,
    ff_in: FeedForward,
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl TemporalBasicTransformerBlock {
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        head_dim: usize,
        cross: usize,
    ) -> Result<Self> {
        Ok(Self {
            norm_in: LayerNorm::new(vb.pp("norm_in"), dim, 1e-5)?,
            ff_in: FeedForward::new(vb.pp("ff_in"), dim, dim, 4)?,
            norm1: LayerNorm::new(vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::new(
                vb.pp("attn1"),
                dim,
                heads,
                head_dim,
                AttentionOpts::default(),
            )?,
            norm2: LayerNorm::new(vb.pp("norm2"), dim, 1e-5)?,
            attn2: cross_attention(vb.pp("attn2"), dim, heads, head_dim, cross)?,
            norm3: LayerNorm::new(vb.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::new(vb.pp("ff"), dim, dim, 4)?,
        })
    }

    /// # Shapes
    /// `x`: `[b*t, seq, dim]`, `context`: `[b*seq, m, cross]` -> `[b*t, seq, dim]`
    pub fn forward(&self, x: &Tensor, frames: usize, context: &Tensor) -> Result<Tensor> {
        let (bt, seq, c) = x.dims3()?;
        let b = bt / frames;
        let x = x
            .reshape((b, frames, seq, c))?
            .transpose(1, 2)?
            .reshape((b * seq, frames, c))?;
        let x = (self.ff_in.forward(&self.norm_in.forward(&x)?)? + &x)?;
        let x = (self.attn1.forward_seq(&self.norm1.forward(&x)?, None)? + &x)?;
        let x = (self
            .attn2
            .forward_seq(&self.norm2.forward(&x)?, Some(context))?
            + &x)?;
        let x = (self.ff.forward(&self.norm3.forward(&x)?)? + &x)?;
        x.reshape((b, seq, frames, c))?
            .transpose(1, 2)?
            .reshape((bt, seq, c))
    }
}

/// `TransformerSpatioTemporalModel`.
#[derive(Debug, Clone)]
pub struct TransformerSpatioTemporalModel {
    norm: GroupNorm,
    proj_in: Linear,
    transformer_blocks: Vec<BasicTransformerBlock>,
    temporal_transformer_blocks: Vec<TemporalBasicTransformerBlock>,
    time_pos_embed: TimestepEmbedding,
    time_mixer: AlphaBlender,
    proj_out: Linear,
    in_channels: usize,
}

impl TransformerSpatioTemporalModel {
    pub fn new(
        vb: VarBuilder,
        heads: usize,
        head_dim: usize,
        in_channels: usize,
        layers: usize,
        cross: usize,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let transformer_blocks = (0..layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    vb.pp("transformer_blocks").pp(i),
                    inner,
                    heads,
                    head_dim,
                    cross,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let temporal_transformer_blocks = (0..layers)
            .map(|i| {
                TemporalBasicTransformerBlock::new(
                    vb.pp("temporal_transformer_blocks").pp(i),
                    inner,
                    heads,
                    head_dim,
                    cross,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::new(vb.pp("norm"), 32, in_channels, 1e-6)?,
            proj_in: Linear::new(vb.pp("proj_in"), in_channels, inner, true)?,
            transformer_blocks,
            temporal_transformer_blocks,
            time_pos_embed: TimestepEmbedding::new(
                vb.pp("time_pos_embed"),
                in_channels,
                in_channels * 4,
                in_channels,
            )?,
            time_mixer: AlphaBlender::new(&vb.pp("time_mixer"), 0.5, false)?,
            proj_out: Linear::new(vb.pp("proj_out"), inner, in_channels, true)?,
            in_channels,
        })
    }

    /// # Shapes
    /// `x`: `[b*t, c, h, w]`, `context`: `[b*t, m, cross]` -> `[b*t, c, h, w]`
    pub fn forward(&self, x: &Tensor, context: &Tensor, frames: usize) -> Result<Tensor> {
        let (bt, c, h, w) = x.dims4()?;
        let b = bt / frames;
        let (_, m, cd) = context.dims3()?;
        // The temporal blocks attend to the first frame's context at every pixel.
        let time_context = context
            .reshape((b, frames, m, cd))?
            .narrow(1, 0, 1)?
            .broadcast_as((b, h * w, m, cd))?
            .reshape((b * h * w, m, cd))?;
        let residual = x;
        let hs = self.norm.forward(x)?;
        let hs = hs.permute((0, 2, 3, 1))?.reshape((bt, h * w, c))?;
        let mut hs = self.proj_in.forward(&hs)?;
        let frame_idx: Vec<f32> = (0..b).flat_map(|_| (0..frames).map(|f| f as f32)).collect();
        let frame_idx = Tensor::from_vec(frame_idx, bt, x.device())?.to_dtype(x.dtype())?;
        let emb = self
            .time_pos_embed
            .forward(&timestep_embedding(&frame_idx, self.in_channels)?)?
            .unsqueeze(1)?;
        let ones_seq = Tensor::ones((bt, h * w, 1), hs.dtype(), hs.device())?;
        for (block, temporal) in self
            .transformer_blocks
            .iter()
            .zip(&self.temporal_transformer_blocks)
        {
            hs = block.forward(&hs, context)?;
            // emb [b*t, 1, c] repeated over positions by a batched GEMM with ones (see
            // `expand_param` for why not a broadcast).
            let mix = (&hs + ones_seq.matmul(&emb)?)?;
            let mix = temporal.forward(&mix, frames, &time_context)?;
            hs = self.time_mixer.forward(&hs, &mix)?;
        }
        let hs = self.proj_out.forward(&hs)?;
        let hs = hs.reshape((bt, h, w, c))?.permute((0, 3, 1, 2))?;
        hs + residual
    }
}
