//! Building blocks shared by the SVD models, written over candle's primitive tensor ops so that
//! every one of them has a backward pass and runs on any candle device.
//!
//! The names of parameters follow PyTorch (`weight`, `bias`) and the constructors take a
//! `VarBuilder` positioned at the module path, so a checkpoint key is the module path
//! (`down_blocks.0.resnets.0.spatial_res_block.conv1.weight`), as in diffusers.
//!
//! Convolutions are explicit im2col (shifted views stacked along channels) followed by one
//! batched matrix product. candle's native CPU conv2d computes its kernel gradient as a
//! convolution whose kernel is the whole image, which is far slower than the two matrix
//! products this form needs for its backward pass.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

/// PyTorch's default initialisation of a layer's weight and bias (`kaiming_uniform_(a=sqrt(5))`
/// for the weight, uniform(+-1/sqrt(fan_in)) for the bias), so freshly built onestep models start
/// where freshly built diffusers models do.
fn torch_uniform(fan_in: usize) -> Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// A per-channel parameter `p` (`[n]`) repeated to `[lead, n, trail]` through two GEMMs with
/// ones (`ones[lead,1] p[1,n]`, then `[lead n, 1] ones[1,trail]`), bit-identical to a
/// broadcast. Its point is the backward pass: the gradient of `p` becomes two GEMMs, where a
/// broadcast's gradient is a sum over leading axes, which candle's CPU backend computes with
/// a division per element (a tenth of a UNet training step, measured with perf).
pub fn expand_param(p: &Tensor, lead: usize, trail: usize) -> Result<Tensor> {
    let n = p.dim(0)?;
    let (dt, dev) = (p.dtype(), p.device());
    let rows = Tensor::ones((lead, 1), dt, dev)?.matmul(&p.reshape((1, n))?)?;
    if trail == 1 {
        return rows.reshape((lead, n, 1));
    }
    rows.reshape((lead * n, 1))?
        .matmul(&Tensor::ones((1, trail), dt, dev)?)?
        .reshape((lead, n, trail))
}

/// `torch.nn.Linear`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", torch_uniform(in_dim))?;
        let bias = if bias {
            Some(vb.get_with_hints(out_dim, "bias", torch_uniform(in_dim))?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }
}

impl Module for Linear {
    /// # Shapes
    /// `[.., in_dim]` -> `[.., out_dim]`
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let y = x.reshape((rows, in_dim))?.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) if super::fused::fused_available(&y, b) => super::fused::add_bias(&y, b, 1)?,
            Some(b) => (y + expand_param(b, rows, 1)?.squeeze(2)?)?,
            None => y,
        };
        let mut out = dims;
        let last = out.len() - 1;
        out[last] = self.weight.dim(0)?;
        y.reshape(out)
    }
}

/// `torch.nn.Conv2d` (any kernel, stride and padding, no dilation or groups), plus the
/// asymmetric padding that diffusers' VAE downsampler applies by hand.
#[derive(Debug, Clone)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: usize,
    /// top, bottom, left, right
    pub pad: [usize; 4],
}

impl Conv2d {
    pub fn new(
        vb: VarBuilder,
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let fan_in = in_ch * kernel * kernel;
        let mut conv = Self::without_bias(vb.clone(), in_ch, out_ch, kernel, stride, padding)?;
        conv.bias = Some(vb.get_with_hints(out_ch, "bias", torch_uniform(fan_in))?);
        Ok(conv)
    }

    /// A convolution with no bias parameter (`bias=False`).
    pub fn without_bias(
        vb: VarBuilder,
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let weight = vb.get_with_hints(
            (out_ch, in_ch, kernel, kernel),
            "weight",
            torch_uniform(in_ch * kernel * kernel),
        )?;
        Ok(Self {
            weight,
            bias: None,
            stride,
            pad: [padding; 4],
        })
    }

    /// # Shapes
    /// `[b, c_in, h, w]` -> `[b, c_out, h_out, w_out]`
    ///
    /// One GEMM `W [c_out, c_in k k] x cols [c_in k k, b h_out w_out]`: the weight gradient is
    /// then one GEMM as well, and the bias gradient a sum over the last axis.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // f32 on the CPU: one GEMM per image in its own layout (`super::fused::conv2d`), no
        // transposes or batch-wide column tensor; elsewhere the composition below.
        if super::fused::fused_available(x, &self.weight) {
            let bias = self.bias.as_ref();
            return super::fused::conv2d(x, &self.weight, bias, self.stride, self.pad);
        }
        let (b, cin, h, w) = x.dims4()?;
        let (cout, _, kh, kw) = self.weight.dims4()?;
        let s = self.stride;
        let [pt, pb, pl, pr] = self.pad;
        let ho = (h + pt + pb - kh) / s + 1;
        let wo = (w + pl + pr - kw) / s + 1;
        // Channels first: [c_in, b, h, w].
        let xc = x.transpose(0, 1)?.contiguous()?;
        let cols = if kh == 1 && kw == 1 && s == 1 && self.pad == [0; 4] {
            xc.reshape((cin, b * h * w))?
        } else {
            // Reading s*ho rows from offset ky may run past the padded input by up to s-1 rows
            // that the stride then drops; pad them with zeros so the views stay in bounds.
            let need_h = (kh - 1) + s * ho;
            let need_w = (kw - 1) + s * wo;
            let extra_h = need_h.saturating_sub(h + pt + pb);
            let extra_w = need_w.saturating_sub(w + pl + pr);
            let xp = xc
                .pad_with_zeros(2, pt, pb + extra_h)?
                .pad_with_zeros(3, pl, pr + extra_w)?;
            let wp = w + pl + pr + extra_w;
            let mut taps = Vec::with_capacity(kh * kw);
            for ky in 0..kh {
                let rows = xp.narrow(2, ky, s * ho)?;
                let rows = if s > 1 {
                    rows.reshape((cin, b, ho, s, wp))?
                        .narrow(3, 0, 1)?
                        .squeeze(3)?
                } else {
                    rows
                };
                for kx in 0..kw {
                    let tap = rows.narrow(3, kx, s * wo)?;
                    let tap = if s > 1 {
                        tap.reshape((cin, b, ho, wo, s))?
                            .narrow(4, 0, 1)?
                            .squeeze(4)?
                    } else {
                        tap
                    };
                    taps.push(tap);
                }
            }
            Tensor::stack(&taps, 1)?.reshape((cin * kh * kw, b * ho * wo))?
        };
        let y = self.weight.reshape((cout, cin * kh * kw))?.matmul(&cols)?;
        let y = match &self.bias {
            Some(bias) => y.broadcast_add(&bias.unsqueeze(1)?)?,
            None => y,
        };
        y.reshape((cout, b, ho, wo))?.transpose(0, 1)?.contiguous()
    }
}

/// `torch.nn.Conv3d` with kernel (3, 1, 1) and padding (1, 0, 0): a convolution over time only,
/// as in SVD's temporal ResNet blocks and the VAE decoder's `time_conv_out`.
#[derive(Debug, Clone)]
pub struct TemporalConv {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl TemporalConv {
    pub fn new(vb: VarBuilder, in_ch: usize, out_ch: usize, kernel_t: usize) -> Result<Self> {
        let fan_in = in_ch * kernel_t;
        let weight = vb.get_with_hints(
            (out_ch, in_ch, kernel_t, 1, 1),
            "weight",
            torch_uniform(fan_in),
        )?;
        let bias = vb.get_with_hints(out_ch, "bias", torch_uniform(fan_in))?;
        Ok(Self { weight, bias })
    }

    /// # Shapes
    /// `[b, c_in, t, h, w]` -> `[b, c_out, t, h, w]`
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, cin, t, h, w) = x.dims5()?;
        let (cout, _, kt, _, _) = self.weight.dims5()?;
        let x = x.reshape((b, cin, t, h * w))?;
        let cols = if kt == 1 {
            x.reshape((b, cin, t * h * w))?
        } else {
            let p = kt / 2;
            let xp = x.pad_with_zeros(2, p, kt - 1 - p)?;
            let taps = (0..kt)
                .map(|k| xp.narrow(2, k, t))
                .collect::<Result<Vec<_>>>()?;
            Tensor::stack(&taps, 2)?.reshape((b, cin * kt, t * h * w))?
        };
        let w2 = self.weight.reshape((cout, cin * kt))?;
        let y = w2.broadcast_left(b)?.matmul(&cols)?;
        let y = if super::fused::fused_available(&y, &self.bias) {
            super::fused::add_bias(&y, &self.bias, 1)?
        } else {
            (y + expand_param(&self.bias, b, t * h * w)?)?
        };
        y.reshape((b, cout, t, h, w))
    }
}

/// `torch.nn.GroupNorm` over `[b, c, ...]`: statistics per sample and group over every
/// remaining axis (for a 5-D video tensor this includes time, as in diffusers' temporal blocks).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub groups: usize,
    pub eps: f64,
}

impl GroupNorm {
    pub fn new(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if channels % groups != 0 {
            candle_core::bail!(
                "{}: {channels} channels do not divide into {groups} groups",
                vb.prefix()
            );
        }
        let weight = vb.get_with_hints(channels, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(channels, "bias", Init::Const(0.0))?;
        Ok(Self {
            weight,
            bias,
            groups,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, false)
    }

    /// `silu(group_norm(x))`, the pair every resnet block and output head runs.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, true)
    }

    fn forward_act(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        // f32 on the CPU: one fused kernel with its backward (`super::fused`); elsewhere the
        // composition below (candle's CUDA kernels, half-precision autocast).
        if super::fused::fused_available(x, &self.weight) {
            return super::fused::group_norm(
                x,
                &self.weight,
                &self.bias,
                self.groups,
                self.eps,
                silu,
            );
        }
        let y = self.composed(x)?;
        if silu {
            y.silu()
        } else {
            Ok(y)
        }
    }

    /// Statistics in f32 whatever the input's dtype (as PyTorch's autocast runs `group_norm`),
    /// the affine part in the weights' dtype.
    fn composed(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let xg = x.reshape((b, self.groups, ()))?.to_dtype(DType::F32)?;
        let mean = xg.mean_keepdim(2)?;
        let xc = xg.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(2)?;
        let xn = xc
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .reshape(dims.clone())?
            .to_dtype(self.weight.dtype())?;
        let mut pshape = vec![1usize; dims.len()];
        pshape[1] = c;
        xn.broadcast_mul(&self.weight.reshape(pshape.clone())?)?
            .broadcast_add(&self.bias.reshape(pshape)?)
    }
}

/// `torch.nn.LayerNorm` over the last axis, with affine parameters.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let dim = dims[dims.len() - 1];
        let rows = x.elem_count() / dim;
        // f32 on the CPU: LayerNorm is GroupNorm with one group over `[rows, dim, 1]`, so the
        // fused kernel serves it (`super::fused`).
        if super::fused::fused_available(x, &self.weight) {
            return super::fused::group_norm(
                &x.reshape((rows, dim, 1))?,
                &self.weight,
                &self.bias,
                1,
                self.eps,
                false,
            )?
            .reshape(dims);
        }
        // Statistics in f32 (autocast's `layer_norm`), the affine part in the weights' dtype.
        let x = x.reshape((rows, dim))?.to_dtype(DType::F32)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .to_dtype(self.weight.dtype())?;
        let w = expand_param(&self.weight, rows, 1)?.squeeze(2)?;
        let b = expand_param(&self.bias, rows, 1)?.squeeze(2)?;
        ((xn * w)? + b)?.reshape(dims)
    }
}

/// Softmax over the last axis: on the CPU in f32 the fused kernel with its backward
/// (`super::fused`; candle's own CPU softmax has none), elsewhere primitive ops computed in f32
/// and returned in the input's dtype.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    scaled_softmax_last(x, 1.0)
}

/// `softmax(scale x)` over the last axis, as [`softmax_last`] (the fused kernel scales inside
/// its pass over the rows).
pub fn scaled_softmax_last(x: &Tensor, scale: f64) -> Result<Tensor> {
    if super::fused::fused_available(x, x) {
        return super::fused::scaled_softmax_last(x, scale as f32);
    }
    if !x.device().is_cpu() && !x.track_op() && device_softmax_enabled() {
        return softmax_last_untracked(x, scale);
    }
    softmax_last_primitive(x, scale)
}

/// `softmax(scale x)` from primitive ops in f32 (differentiable on every device).
fn softmax_last_primitive(x: &Tensor, scale: f64) -> Result<Tensor> {
    let dt = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let x = if scale == 1.0 { x } else { (x * scale)? };
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.to_dtype(dt)
}

/// `softmax(scale x)` as candle-nn's one-kernel softmax (one pass over the rows, accumulating in
/// f32 for half precision) where no gradient is needed: on CUDA the primitive path runs eight
/// kernels over the full score block in f32 (the cast, scale, max, subtract, exp, sum, divide,
/// cast back), and attention's softmax dominated the full-size SVD forward pass
/// (`results/cuda-h200/README.md`). The kernel has no backward pass, so training keeps the
/// primitive path. `ONESTEP_DEVICE_SOFTMAX=0` turns it off.
fn softmax_last_untracked(x: &Tensor, scale: f64) -> Result<Tensor> {
    let x = if scale == 1.0 {
        x.contiguous()?
    } else {
        (x * scale)?
    };
    candle_nn::ops::softmax_last_dim(&x)
}

fn device_softmax_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("ONESTEP_DEVICE_SOFTMAX").map_or(true, |v| v != "0"))
}

/// The most bytes (at f32) one block of attention scores may take before
/// [`Attention::forward_seq`] splits the queries into chunks: full-size SVD has 9,216 tokens per
/// frame, whose score matrix for 25 frames and 5 heads would be 42 GB. `ONESTEP_ATTN_CHUNK_MB`
/// overrides it (in MiB).
fn attention_chunk_bytes() -> usize {
    static BYTES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BYTES.get_or_init(|| {
        std::env::var("ONESTEP_ATTN_CHUNK_MB")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&v| v > 0)
            .unwrap_or(1024)
            << 20
    })
}

/// `softmax(q k^T scale) v` over `[b, heads, n, d]`, in chunks of query rows when the score
/// matrix would exceed [`attention_chunk_bytes`] (same result: each query row's softmax only
/// reads its own row). Under autograd every chunk's scores are still kept for the backward
/// pass; chunking saves memory in inference.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (b, h, n, _) = q.dims4()?;
    let m = k.dim(2)?;
    let per_row = b * h * m * 4;
    let rows = (attention_chunk_bytes() / per_row.max(1)).max(1);
    let kt = k.t()?;
    // Off the CPU and without a gradient, the scale goes on the queries (n x d) rather than the
    // scores (n x m), as PyTorch's attention does, so the softmax is one kernel.
    let (q, scale) = if !q.device().is_cpu() && !q.track_op() && device_softmax_enabled() {
        ((q * scale)?, 1.0)
    } else {
        (q.clone(), scale)
    };
    let q = &q;
    let block =
        |q: &Tensor| -> Result<Tensor> { scaled_softmax_last(&q.matmul(&kt)?, scale)?.matmul(v) };
    if rows >= n {
        return block(q);
    }
    let mut outs = Vec::with_capacity(n.div_ceil(rows));
    let mut start = 0;
    while start < n {
        let len = rows.min(n - start);
        outs.push(block(&q.narrow(2, start, len)?.contiguous()?)?);
        start += len;
    }
    Tensor::cat(&outs, 2)
}

/// `diffusers.models.attention_processor.Attention` with the default processor: multi-head
/// scaled dot-product attention, optional cross-attention context, optional GroupNorm on the
/// input and residual connection (the form the VAE's mid blocks use).
#[derive(Debug, Clone)]
pub struct Attention {
    pub group_norm: Option<GroupNorm>,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    pub heads: usize,
    pub dim_head: usize,
    pub residual: bool,
}

/// Options of [`Attention::new`] that differ between its users.
#[derive(Debug, Clone, Copy, Default)]
pub struct AttentionOpts {
    pub cross_attention_dim: Option<usize>,
    pub qkv_bias: bool,
    /// GroupNorm groups and eps applied to the input (VAE mid block), or none.
    pub group_norm: Option<(usize, f64)>,
    pub residual: bool,
}

impl Attention {
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        heads: usize,
        dim_head: usize,
        opts: AttentionOpts,
    ) -> Result<Self> {
        let inner = heads * dim_head;
        let kv_dim = opts.cross_attention_dim.unwrap_or(query_dim);
        let group_norm = match opts.group_norm {
            Some((g, eps)) => Some(GroupNorm::new(vb.pp("group_norm"), g, query_dim, eps)?),
            None => None,
        };
        Ok(Self {
            group_norm,
            to_q: Linear::new(vb.pp("to_q"), query_dim, inner, opts.qkv_bias)?,
            to_k: Linear::new(vb.pp("to_k"), kv_dim, inner, opts.qkv_bias)?,
            to_v: Linear::new(vb.pp("to_v"), kv_dim, inner, opts.qkv_bias)?,
            to_out: Linear::new(vb.pp("to_out").pp("0"), inner, query_dim, true)?,
            heads,
            dim_head,
            residual: opts.residual,
        })
    }

    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        x.reshape((b, n, self.heads, self.dim_head))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// # Shapes
    /// `x`: `[b, n, query_dim]`, `context`: `[b, m, cross_dim]` -> `[b, n, query_dim]`
    pub fn forward_seq(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let ctx = context.unwrap_or(x);
        let scale = 1.0 / (self.dim_head as f64).sqrt();
        let q = self.to_q.forward(x)?;
        if super::fused::attention_available(&q, &self.to_q.weight) {
            // One op for all heads, reading them in place (no head split copies, no score
            // matrix kept for the backward pass).
            let (k, v) = (self.to_k.forward(ctx)?, self.to_v.forward(ctx)?);
            let out = super::fused::attention(&q, &k, &v, self.heads, scale as f32)?;
            return self.to_out.forward(&out);
        }
        let q = self.split_heads(&q)?;
        let k = self.split_heads(&self.to_k.forward(ctx)?)?;
        let v = self.split_heads(&self.to_v.forward(ctx)?)?;
        let out = scaled_dot_product_attention(&q, &k, &v, scale)?;
        let out = out
            .transpose(1, 2)?
            .reshape((b, n, self.heads * self.dim_head))?;
        self.to_out.forward(&out)
    }

    /// Spatial self-attention over an image feature map, with the input GroupNorm and the
    /// residual connection when configured.
    /// # Shapes
    /// `[b, c, h, w]` -> `[b, c, h, w]`
    pub fn forward_image(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let xn = match &self.group_norm {
            Some(gn) => gn.forward(x)?,
            None => x.clone(),
        };
        let seq = xn.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let out = self.forward_seq(&seq, None)?;
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        if self.residual {
            out + x
        } else {
            Ok(out)
        }
    }
}

/// `diffusers.models.attention.FeedForward` with the GEGLU activation (the only one SVD uses):
/// `net.0.proj` to twice the inner width, `hidden * gelu(gate)`, then `net.2`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    pub proj: Linear,
    pub out: Linear,
}

impl FeedForward {
    pub fn new(vb: VarBuilder, dim: usize, dim_out: usize, mult: usize) -> Result<Self> {
        let inner = dim * mult;
        Ok(Self {
            proj: Linear::new(vb.pp("net").pp("0").pp("proj"), dim, inner * 2, true)?,
            out: Linear::new(vb.pp("net").pp("2"), inner, dim_out, true)?,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.proj.forward(x)?;
        if super::fused::fused_available(&h, &self.out.weight) {
            return self.out.forward(&super::fused::geglu(&h)?);
        }
        let half = h.dim(D::Minus1)? / 2;
        let hidden = h.narrow(D::Minus1, 0, half)?;
        let gate = h.narrow(D::Minus1, half, half)?;
        self.out.forward(&(hidden * gate.gelu_erf()?)?)
    }
}

/// Sinusoidal embedding of `diffusers.models.embeddings.Timesteps` with `flip_sin_to_cos=True`
/// and `downscale_freq_shift=0`: `[cos(t f_i), sin(t f_i)]`, `f_i = exp(-ln(10000) i / half)`.
/// # Shapes
/// `[n]` -> `[n, dim]`
pub fn timestep_embedding(t: &Tensor, dim: usize) -> Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(10000f64.ln()) * i as f64 / half as f64).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    let emb = Tensor::cat(&[args.cos()?, args.sin()?], 1)?;
    let emb = if dim % 2 == 1 {
        emb.pad_with_zeros(1, 0, 1)?
    } else {
        emb
    };
    emb.to_dtype(t.dtype())
}

/// `diffusers.models.embeddings.TimestepEmbedding`: `linear_1`, SiLU, `linear_2`.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(vb: VarBuilder, in_dim: usize, hidden: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::new(vb.pp("linear_1"), in_dim, hidden, true)?,
            linear_2: Linear::new(vb.pp("linear_2"), hidden, out_dim, true)?,
        })
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}

/// `diffusers.models.downsampling.Downsample2D` with a convolution: stride 2, padding 1, or
/// padding 0 with the explicit (0, 1, 0, 1) pad of the VAE encoder.
pub fn downsample2d(vb: VarBuilder, channels: usize, padding: usize) -> Result<Conv2d> {
    let mut conv = Conv2d::new(vb.pp("conv"), channels, channels, 3, 2, padding)?;
    if padding == 0 {
        conv.pad = [0, 1, 0, 1];
    }
    Ok(conv)
}

/// `diffusers.models.upsampling.Upsample2D` with a convolution: nearest x2, then 3x3 conv.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    pub conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(vb.pp("conv"), channels, channels, 3, 1, 1)?,
        })
    }

    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&x.upsample_nearest2d(th, tw)?)
    }
}

/// A learned or fixed scalar initialised to `value` (the `mix_factor` of `AlphaBlender`).
pub fn scalar_param(vb: &VarBuilder, name: &str, value: f64) -> Result<Tensor> {
    vb.get_with_hints(1, name, Init::Const(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The one-kernel softmax that CUDA inference takes equals the differentiable primitive
    /// path (candle-nn's kernel has a CPU implementation too, so both run here); the CUDA side
    /// is compared with the CPU by the GPU check's parity section.
    #[test]
    fn untracked_softmax_matches_the_primitive_path() {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 3f32, (2, 3, 7, 37), &dev).unwrap())
            .contiguous()
            .unwrap();
        for scale in [1.0, 0.125, -0.7] {
            let a = softmax_last_untracked(&x, scale).unwrap();
            let b = softmax_last_primitive(&x, scale).unwrap();
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-6, "scale {scale}");
        }
        // A transposed (non-contiguous) block, as attention's scores are not.
        let xt = x.transpose(2, 3).unwrap();
        let a = softmax_last_untracked(&xt, 1.0).unwrap();
        let b = softmax_last_primitive(&xt, 1.0).unwrap();
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-6);
    }
}
