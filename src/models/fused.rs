//! Fused CPU kernels with their backward passes, as candle custom ops: what dominates a training
//! step of the UNet and the VAE once it is written as many small candle operations. The loops
//! themselves live in the `onestep-kernels` crate (`kernels/`), which is always built optimised.
//!
//! - [`group_norm`]: GroupNorm (Wu & He 2018) with its affine part and an optional SiLU, one
//!   pass over each group forward and two backward (diffusers' `GroupNorm` -> `SiLU`, as every
//!   resnet block and every `conv_norm_out` runs them). Candle's composition of the same
//!   computation materialises about ten full-size intermediates (centred input, its square,
//!   the normalised input, the affine output, the sigmoid, ...) and reduces the broadcast
//!   parameters' gradients over leading axes with per-element index arithmetic; this kernel
//!   reads the input twice and writes the output once, in parallel over (sample, group) with
//!   rayon. Statistics are accumulated in f64 (PyTorch's CPU kernel uses a f32 Welford/ pairwise
//!   scheme; the difference is far below the 1e-4 of the golden tests).
//!
//! - [`scaled_softmax_last`]: `softmax(scale x)` over the last axis, one
//!   pass per row forward (max, exp, sum, normalise) and one backward
//!   (`dx = scale y (g - <g, y>)`), where the composition of primitive ops (candle's own CPU
//!   softmax has no backward) writes five intermediates of the score matrix, plus one for the
//!   scale.
//!
//! The kernels' `exp` and `erf` are branch-free polynomials (`onestep_kernels::fastmath`,
//! PyTorch's choice for its vectorised CPU kernels too), and their loops are compiled twice,
//! for AVX2 + FMA where the processor has them and for the baseline elsewhere: libm's scalar
//! `erff` and `expf` had made GEGLU and softmax 13 % of a UNet train step.
//!
//! - [`geglu`]: GEGLU (`hidden * gelu(gate)` of the two halves of the last axis, Shazeer 2020,
//!   diffusers' `GEGLU` with the exact erf GELU) in one pass forward and backward, where the
//!   composition copies both strided halves, the GELU and the product.
//!
//! - [`add_bias`]: a per-channel bias added to `[outer, c, inner]` (convolutions, linear layers)
//!   in one pass, and its gradient as one reduction, where candle broadcasts the bias into a
//!   fresh tensor and reduces its gradient with per-element index arithmetic.
//!
//! - [`conv2d`]: a 2-D convolution (with its bias) as one GEMM per image on its im2col
//!   columns, images in parallel, written straight in `[b, c, h, w]` order onto the bias;
//!   backward: `dW = sum dy cols^T`, `dx = col2im(W^T dy)` and `db = sum dy`, recomputing each
//!   image's columns. The candle composition it replaces transposes the batch to
//!   channels-first, pads by concatenation, stacks the taps into one columns tensor for the
//!   whole batch and transposes back: copies in both passes.
//!
//! - [`depthwise_conv2d`]: a depthwise convolution (one `k x k` filter per channel, with its
//!   bias and zero padding) in one pass over each channel plane, planes in parallel; backward
//!   in one pass per plane too (`dx`, and the filter's and bias's sums reduced over the batch).
//!   The discriminator's EfficientNet-Lite0 backbone runs these in every MBConv block; the
//!   composition it replaces pads by copying and adds `k^2` shifted, broadcast-multiplied
//!   copies of the input, each materialised, in both passes.
//!
//! - [`blend`]: SVD's `AlphaBlender`, `a s + (1 - a) t` with a learned scalar `a`, in one pass
//!   (two scalar broadcasts, a product and a sum in candle), backward in one pass too.
//!
//! - [`attention`]: multi-head `softmax(q k^T scale) v` as one op over the projections' own
//!   `[b, n, heads d]` layout: per sample and head, blocks of query rows through two GEMMs and a
//!   softmax; backward recomputes each block's probabilities (`dv = p^T g`,
//!   `ds = scale p (g v^T - <g_i, o_i>)`, `dq = ds k`, `dk = ds^T q`, the flash-attention
//!   identity that the softmax's row sums equal `<g_i, o_i>`), so neither pass keeps the score
//!   matrix. The composition splits the heads with three copies, keeps the scores and the
//!   probabilities for backward, transposes operands for each batched matmul's gradient and
//!   merges the heads with a fourth copy.
//!
//! LayerNorm over the last axis is the same kernel with one group over `[rows, dim, 1]`
//! (`layers::LayerNorm` calls it so).
//!
//! Used for f32 tensors on the CPU; other devices and dtypes take the unfused composition (the
//! CUDA build keeps candle's kernels and the half-precision autocast of `layers::GroupNorm`).

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};
use onestep_kernels::{
    attention_bwd, attention_fwd, bias_add_fwd, bias_add_grad, blend_bwd, blend_fwd, conv2d_bwd,
    conv2d_fwd, depthwise_bwd, depthwise_fwd, geglu_bwd, geglu_fwd, group_norm_bwd, group_norm_fwd,
    softmax_bwd, softmax_fwd, Attn, Conv, Depthwise, Groups,
};

/// `silu(group_norm(x) * weight + bias)` (or without the SiLU) over `[b, c, ...]` with
/// `groups` groups of `c / groups` channels; `weight`, `bias`: `[c]`.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let c = x.dim(1)?;
    if c % groups != 0 {
        candle_core::bail!("group_norm: {c} channels do not divide into {groups} groups");
    }
    if weight.dims() != [c] || bias.dims() != [c] {
        candle_core::bail!(
            "group_norm: weight {:?} and bias {:?} must be [{c}]",
            weight.dims(),
            bias.dims()
        );
    }
    let op = GroupNormOp { groups, eps, silu };
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
}

/// Whether the fused kernels are on in this process (`ONESTEP_FUSED=0` turns them off), read
/// once.
pub fn enabled() -> bool {
    setting() != "0"
}

/// `ONESTEP_FUSED` as this process started with it (empty when unset), read once.
fn setting() -> &'static str {
    static SETTING: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SETTING.get_or_init(|| std::env::var("ONESTEP_FUSED").unwrap_or_default())
}

/// Whether the fused kernels serve these tensors (f32 on the CPU). `ONESTEP_FUSED=0` turns
/// them off (the unfused composition everywhere), for benchmarks and for bisecting.
pub fn fused_available(x: &Tensor, weight: &Tensor) -> bool {
    enabled() && x.device().is_cpu() && x.dtype() == DType::F32 && weight.dtype() == DType::F32
}

/// Whether [`attention`] serves the attention blocks: as [`fused_available`], and
/// `ONESTEP_FUSED=noattention` keeps the other kernels but attention unfused (its
/// before/after comparison in one build).
pub fn attention_available(x: &Tensor, weight: &Tensor) -> bool {
    setting() != "noattention" && fused_available(x, weight)
}

#[derive(Debug, Clone, Copy)]
struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

/// A gradient for `arg` only if autograd tracks it: candle's backward pass would otherwise
/// record gradients for constants (frozen weights) too.
fn tracked(arg: &Tensor, grad: Tensor) -> Option<Tensor> {
    arg.track_op().then_some(grad)
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("group_norm: {what} must be f32");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("group_norm: {what} must be contiguous"),
    }
}

impl GroupNormOp {
    /// The kernel's view of input `l`: `[n, c, spatial...]`.
    fn groups(&self, l: &Layout) -> Groups {
        let dims = l.dims();
        Groups {
            groups: self.groups,
            cpg: dims[1] / self.groups,
            spatial: dims[2..].iter().product(),
            eps: self.eps,
            silu: self.silu,
        }
    }
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "group-norm-silu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "input")?;
        let w = f32_slice(s2, l2, "weight")?;
        let b = f32_slice(s3, l3, "bias")?;
        let mut out = vec![0f32; x.len()];
        group_norm_fwd(x, w, b, self.groups(l1), &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = weight.dim(0)?;
        let n = x.elem_count();
        let wb = Tensor::cat(&[weight, bias], 0)?;
        let out = x.apply_op3_no_bwd(&wb, &grad.contiguous()?, &GroupNormBwd(*self))?;
        let dx = out.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = out.narrow(0, n, c)?;
        let db = out.narrow(0, n + c, c)?;
        Ok((tracked(x, dx), tracked(weight, dw), tracked(bias, db)))
    }
}

/// The backward pass: inputs `x`, `[weight; bias]` and the output gradient; output
/// `[dx (flat); d weight; d bias]`.
struct GroupNormBwd(GroupNormOp);

impl CustomOp3 for GroupNormBwd {
    fn name(&self) -> &'static str {
        "group-norm-silu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.0;
        let x = f32_slice(s1, l1, "input")?;
        let wb = f32_slice(s2, l2, "weight and bias")?;
        let go = f32_slice(s3, l3, "output gradient")?;
        let c = l1.dims()[1];
        let (w, b) = wb.split_at(c);
        let n = x.len();
        let mut out = vec![0f32; n + 2 * c];
        let (dx, dwb) = out.split_at_mut(n);
        let (dw, db) = dwb.split_at_mut(c);
        group_norm_bwd(x, w, b, go, op.groups(l1), dx, dw, db);
        Ok((CpuStorage::F32(out), Shape::from(n + 2 * c)))
    }
}

/// `softmax(scale x)` over the last axis of an f32 CPU tensor (see [`fused_available`]), with
/// backward: attention's scores without a pass that scales them first.
pub fn scaled_softmax_last(x: &Tensor, scale: f32) -> Result<Tensor> {
    x.contiguous()?.apply_op1(SoftmaxLast { scale })
}

struct SoftmaxLast {
    scale: f32,
}

impl CustomOp1 for SoftmaxLast {
    fn name(&self) -> &'static str {
        "softmax-last"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "softmax input")?;
        let mut out = vec![0f32; x.len()];
        let dim = l.dims().last().copied().unwrap_or(1);
        softmax_fwd(x, dim, self.scale, &mut out);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = SoftmaxLastBwd { scale: self.scale };
        Ok(Some(res.apply_op2_no_bwd(&grad.contiguous()?, &op)?))
    }
}

/// `dx = scale y (g - <g, y>)` per row, from the softmax output `y` and its gradient `g`.
struct SoftmaxLastBwd {
    scale: f32,
}

impl CustomOp2 for SoftmaxLastBwd {
    fn name(&self) -> &'static str {
        "softmax-last-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = f32_slice(s1, l1, "softmax output")?;
        let g = f32_slice(s2, l2, "softmax gradient")?;
        let mut out = vec![0f32; y.len()];
        let dim = l1.dims().last().copied().unwrap_or(1);
        softmax_bwd(y, g, dim, self.scale, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// GEGLU over the last axis of an f32 CPU tensor `[..., 2n]`: `x[..., :n] * gelu(x[..., n:])`
/// (exact erf GELU) -> `[..., n]`, with backward.
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Geglu)
}

struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "GEGLU input")?;
        let mut dims = l.dims().to_vec();
        let two = dims.pop().unwrap_or(0);
        if two % 2 != 0 {
            candle_core::bail!("GEGLU: last axis {two} is odd");
        }
        let n = two / 2;
        dims.push(n);
        let mut out = vec![0f32; x.len() / 2];
        geglu_fwd(x, n, &mut out);
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &GegluBwd)?))
    }
}

/// `[d hidden, d gate] = [go gelu(g), go h gelu'(g)]` from the input and the output gradient.
struct GegluBwd;

impl CustomOp2 for GegluBwd {
    fn name(&self) -> &'static str {
        "geglu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "GEGLU input")?;
        let go = f32_slice(s2, l2, "GEGLU gradient")?;
        let n = l1.dims().last().copied().unwrap_or(0) / 2;
        let mut out = vec![0f32; x.len()];
        geglu_bwd(x, go, n, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `y + bias` with `bias: [c]` broadcast over `y: [outer, c, inner]` (given as `y`'s shape and
/// the axis of `c`), f32 on the CPU, with backward.
pub fn add_bias(y: &Tensor, bias: &Tensor, axis: usize) -> Result<Tensor> {
    let dims = y.dims();
    let c = dims[axis];
    if bias.dims() != [c] {
        candle_core::bail!("add_bias: bias {:?} for {c} channels", bias.dims());
    }
    let inner: usize = dims[axis + 1..].iter().product();
    y.contiguous()?
        .apply_op2(&bias.contiguous()?, AddBias { c, inner })
}

#[derive(Debug, Clone, Copy)]
struct AddBias {
    c: usize,
    inner: usize,
}

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "add-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = f32_slice(s1, l1, "input")?;
        let b = f32_slice(s2, l2, "bias")?;
        let mut out = vec![0f32; y.len()];
        bias_add_fwd(y, b, self.c, self.inner, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        y: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let db = if bias.track_op() {
            Some(grad.contiguous()?.apply_op1_no_bwd(&BiasGrad(*self))?)
        } else {
            None
        };
        Ok((tracked(y, grad.clone()), db))
    }
}

struct BiasGrad(AddBias);

impl CustomOp1 for BiasGrad {
    fn name(&self) -> &'static str {
        "add-bias-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(s, l, "gradient")?;
        let mut db = vec![0f32; self.0.c];
        bias_add_grad(g, self.0.c, self.0.inner, &mut db);
        Ok((CpuStorage::F32(db), Shape::from(self.0.c)))
    }
}

/// `conv2d(x, weight) [+ bias]`: `x [b, cin, h, w]`, `weight [cout, cin, kh, kw]`, `bias
/// [cout]`, stride `stride`, padding `[top, bottom, left, right]` -> `[b, cout, ho, wo]`; f32 on
/// the CPU, with backward for every input. The bias is written before each image's GEMM adds
/// onto it, and its gradient is summed while the backward pass reads `dy` for its GEMMs: no
/// pass over the output of its own.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: [usize; 4],
) -> Result<Tensor> {
    let (_, cin, h, w) = x.dims4()?;
    let (cout, wcin, kh, kw) = weight.dims4()?;
    if wcin != cin {
        candle_core::bail!("conv2d: input has {cin} channels, weight {wcin}");
    }
    let [pt, pb, pl, pr] = pad;
    if h + pt + pb < kh || w + pl + pr < kw || stride == 0 {
        candle_core::bail!("conv2d: kernel {kh}x{kw} larger than the padded input {h}x{w}");
    }
    let bias = match bias {
        Some(b) if b.dims() != [cout] => {
            candle_core::bail!("conv2d: bias {:?} for {cout} output channels", b.dims())
        }
        Some(b) => b.contiguous()?,
        // No bias: an empty tensor (no gradient is asked of it).
        None => Tensor::zeros(0, DType::F32, x.device())?,
    };
    let g = Conv {
        cin,
        h,
        w,
        cout,
        kh,
        kw,
        stride,
        pad_top: pt,
        pad_left: pl,
        ho: (h + pt + pb - kh) / stride + 1,
        wo: (w + pl + pr - kw) / stride + 1,
    };
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias, Conv2dOp(g))
}

/// Inputs `x`, `weight`, `bias` (`[cout]`, or empty for none).
#[derive(Debug, Clone, Copy)]
struct Conv2dOp(Conv);

impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "conv2d-im2col"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "conv input")?;
        let w = f32_slice(s2, l2, "conv weight")?;
        let bias = f32_slice(s3, l3, "conv bias")?;
        let g = self.0;
        let b = l1.dims()[0];
        let mut y = vec![0f32; b * g.cout * g.ho * g.wo];
        conv2d_fwd(x, w, bias, g, &mut y);
        Ok((CpuStorage::F32(y), Shape::from((b, g.cout, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = Conv2dBwd {
            g: self.0,
            bias: bias.elem_count() > 0,
        };
        let out = x.apply_op3_no_bwd(weight, &grad.contiguous()?, &op)?;
        split_grads(&out, x, weight, bias)
    }
}

/// The gradients of a convolution's `x`, `weight` and `bias` (empty: none) from its backward
/// op's flat output `[dx; d weight; d bias (if any)]`, each only where autograd tracks it.
type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);
fn split_grads(out: &Tensor, x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Grads3> {
    let (n, nw, nb) = (x.elem_count(), weight.elem_count(), bias.elem_count());
    let dx = out.narrow(0, 0, n)?.reshape(x.shape())?;
    let dw = out.narrow(0, n, nw)?.reshape(weight.shape())?;
    let db = if nb > 0 {
        tracked(bias, out.narrow(0, n + nw, nb)?)
    } else {
        None
    };
    Ok((tracked(x, dx), tracked(weight, dw), db))
}

/// Inputs `x`, `weight`, `dy`; output `[dx (flat); d weight (flat); d bias (if any)]`.
struct Conv2dBwd {
    g: Conv,
    bias: bool,
}

impl CustomOp3 for Conv2dBwd {
    fn name(&self) -> &'static str {
        "conv2d-im2col-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "conv input")?;
        let w = f32_slice(s2, l2, "conv weight")?;
        let dy = f32_slice(s3, l3, "conv output gradient")?;
        let (n, nw) = (x.len(), w.len());
        let nb = if self.bias { self.g.cout } else { 0 };
        let mut out = vec![0f32; n + nw + nb];
        let (dx, rest) = out.split_at_mut(n);
        let (dw, db) = rest.split_at_mut(nw);
        conv2d_bwd(x, w, dy, self.g, dx, dw, db);
        Ok((CpuStorage::F32(out), Shape::from(n + nw + nb)))
    }
}

/// Depthwise 2-D convolution of `x` `[b, c, h, w]` with `weight` `[c, 1, k, k]`, an optional
/// `bias` `[c]`, `stride` and zero padding `[top, bottom, left, right]`, f32 on the CPU, with
/// backward for all three.
pub fn depthwise_conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: [usize; 4],
) -> Result<Tensor> {
    let (_, c, h, w) = x.dims4()?;
    let (wc, one, k, k2) = weight.dims4()?;
    if wc != c || one != 1 || k != k2 {
        candle_core::bail!(
            "depthwise_conv2d: weight {:?} for {c} channels (expected [{c}, 1, k, k])",
            weight.dims()
        );
    }
    let [pt, pb, pl, pr] = pad;
    if h + pt + pb < k || w + pl + pr < k || stride == 0 {
        candle_core::bail!("depthwise_conv2d: kernel {k}x{k} larger than the padded input {h}x{w}");
    }
    let bias = match bias {
        Some(b) if b.dims() != [c] => {
            candle_core::bail!("depthwise_conv2d: bias {:?} for {c} channels", b.dims())
        }
        Some(b) => b.contiguous()?,
        None => Tensor::zeros(0, DType::F32, x.device())?,
    };
    let g = Depthwise {
        c,
        h,
        w,
        k,
        stride,
        pad_top: pt,
        pad_left: pl,
        ho: (h + pt + pb - k) / stride + 1,
        wo: (w + pl + pr - k) / stride + 1,
    };
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias, DepthwiseOp(g))
}

/// Inputs `x`, `weight`, `bias` (`[c]`, or empty for none).
#[derive(Debug, Clone, Copy)]
struct DepthwiseOp(Depthwise);

impl CustomOp3 for DepthwiseOp {
    fn name(&self) -> &'static str {
        "depthwise-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "depthwise input")?;
        let w = f32_slice(s2, l2, "depthwise weight")?;
        let bias = f32_slice(s3, l3, "depthwise bias")?;
        let g = self.0;
        let b = l1.dims()[0];
        let mut y = vec![0f32; b * g.c * g.ho * g.wo];
        depthwise_fwd(x, w, bias, g, &mut y);
        Ok((CpuStorage::F32(y), Shape::from((b, g.c, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = DepthwiseBwd(self.0, bias.elem_count() > 0);
        let out = x.apply_op3_no_bwd(weight, &grad.contiguous()?, &op)?;
        split_grads(&out, x, weight, bias)
    }
}

/// Inputs `x`, `weight`, `dy`; output `[dx (flat); d weight (flat); d bias (if any)]`.
struct DepthwiseBwd(Depthwise, bool);

impl CustomOp3 for DepthwiseBwd {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "depthwise input")?;
        let w = f32_slice(s2, l2, "depthwise weight")?;
        let dy = f32_slice(s3, l3, "depthwise output gradient")?;
        let (n, nw) = (x.len(), w.len());
        let nb = if self.1 { self.0.c } else { 0 };
        let mut out = vec![0f32; n + nw + nb];
        let (dx, rest) = out.split_at_mut(n);
        let (dw, db) = rest.split_at_mut(nw);
        depthwise_bwd(x, w, dy, self.0, dx, dw, db);
        Ok((CpuStorage::F32(out), Shape::from(n + nw + nb)))
    }
}

/// `alpha * spatial + (1 - alpha) * temporal` with `alpha` a one-element tensor, f32 on the
/// CPU, with backward for all three.
pub fn blend(spatial: &Tensor, temporal: &Tensor, alpha: &Tensor) -> Result<Tensor> {
    if spatial.dims() != temporal.dims() || alpha.elem_count() != 1 {
        candle_core::bail!(
            "blend: {:?} and {:?} with alpha {:?}",
            spatial.dims(),
            temporal.dims(),
            alpha.dims()
        );
    }
    spatial
        .contiguous()?
        .apply_op3(&temporal.contiguous()?, &alpha.flatten_all()?, Blend)
}

struct Blend;

fn scalar_of(s: &CpuStorage, l: &Layout) -> Result<f32> {
    Ok(f32_slice(s, l, "blend factor")?[0])
}

impl CustomOp3 for Blend {
    fn name(&self) -> &'static str {
        "alpha-blend"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (s, t) = (
            f32_slice(s1, l1, "spatial")?,
            f32_slice(s2, l2, "temporal")?,
        );
        let mut out = vec![0f32; s.len()];
        blend_fwd(s, t, scalar_of(s3, l3)?, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        spatial: &Tensor,
        temporal: &Tensor,
        alpha: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = spatial.elem_count();
        let out = spatial.apply_op3_no_bwd(
            temporal,
            &Tensor::cat(&[&grad.contiguous()?.flatten_all()?, alpha], 0)?,
            &BlendBwd,
        )?;
        let ds = out.narrow(0, 0, n)?.reshape(spatial.shape())?;
        let dt = out.narrow(0, n, n)?.reshape(temporal.shape())?;
        let da = out.narrow(0, 2 * n, 1)?.reshape(alpha.shape())?;
        Ok((
            tracked(spatial, ds),
            tracked(temporal, dt),
            tracked(alpha, da),
        ))
    }
}

/// Inputs `spatial`, `temporal`, `[grad (flat); alpha]`; output `[ds; dt; da]`.
struct BlendBwd;

impl CustomOp3 for BlendBwd {
    fn name(&self) -> &'static str {
        "alpha-blend-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (s, t) = (
            f32_slice(s1, l1, "spatial")?,
            f32_slice(s2, l2, "temporal")?,
        );
        let ga = f32_slice(s3, l3, "gradient and alpha")?;
        let n = s.len();
        let (g, a) = (&ga[..n], ga[n]);
        let mut out = vec![0f32; 2 * n + 1];
        let (ds, rest) = out.split_at_mut(n);
        let (dt, da) = rest.split_at_mut(n);
        da[0] = blend_bwd(s, t, g, a, ds, dt);
        Ok((CpuStorage::F32(out), Shape::from(2 * n + 1)))
    }
}

/// Multi-head `softmax(q k^T scale) v` over `q`: `[b, n, heads d]`, `k`, `v`: `[b, m, heads d]`
/// (f32 on the CPU, see [`fused_available`]) -> `[b, n, heads d]`, with backward.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f32) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    q.apply_op3(&k, &v, AttentionOp { heads, scale })
}

#[derive(Debug, Clone, Copy)]
struct AttentionOp {
    heads: usize,
    scale: f32,
}

impl AttentionOp {
    fn geometry(&self, q: &[usize], k: &[usize], v: &[usize]) -> Result<Attn> {
        let fits = q.len() == 3
            && k.len() == 3
            && v == k
            && q[0] == k[0]
            && q[2] == k[2]
            && self.heads > 0
            && q[2] % self.heads == 0;
        if !fits {
            candle_core::bail!(
                "attention: queries {q:?} ([b, n, heads d]), keys {k:?} and values {v:?} \
                 ([b, m, heads d]) do not fit {} heads",
                self.heads
            );
        }
        Ok(Attn {
            batch: q[0],
            heads: self.heads,
            n: q[1],
            m: k[1],
            d: q[2] / self.heads,
            scale: self.scale,
        })
    }
}

/// The f32 values of a contiguous CPU tensor's storage (see `Tensor::storage_and_layout`), for a
/// backward pass that reads more tensors than a custom op takes.
fn storage_f32<'a>(s: &'a candle_core::Storage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match s {
        candle_core::Storage::Cpu(c) => f32_slice(c, l, what),
        _ => candle_core::bail!("attention: {what} must be on the CPU"),
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = self.geometry(l1.dims(), l2.dims(), l3.dims())?;
        let q = f32_slice(s1, l1, "queries")?;
        let k = f32_slice(s2, l2, "keys")?;
        let v = f32_slice(s3, l3, "values")?;
        let mut out = vec![0f32; q.len()];
        attention_fwd(q, k, v, a, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let a = self.geometry(q.dims(), k.dims(), v.dims())?;
        let (o, go) = (res.contiguous()?, grad.contiguous()?);
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; q.elem_count()],
            vec![0f32; k.elem_count()],
            vec![0f32; v.elem_count()],
        );
        let tensors = [q, k, v, &o, &go];
        let guards = tensors.map(|t| t.storage_and_layout());
        let names = ["queries", "keys", "values", "output", "output gradient"];
        let mut xs = Vec::with_capacity(5);
        for ((s, l), what) in guards.iter().zip(names) {
            xs.push(storage_f32(s, l, what)?);
        }
        attention_bwd(
            xs[0], xs[1], xs[2], xs[3], xs[4], a, &mut dq, &mut dk, &mut dv,
        );
        drop(xs);
        drop(guards);
        let dev = q.device();
        Ok((
            tracked(q, Tensor::from_vec(dq, q.shape(), dev)?),
            tracked(k, Tensor::from_vec(dk, k.shape(), dev)?),
            tracked(v, Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// The unfused composition (what `layers::GroupNorm::forward` + `silu` compute).
    fn reference(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (n, c) = (dims[0], dims[1]);
        let xg = x.reshape((n, groups, ()))?;
        let mean = xg.mean_keepdim(2)?;
        let xc = xg.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(2)?;
        let xn = xc
            .broadcast_div(&(var + eps)?.sqrt()?)?
            .reshape(dims.clone())?;
        let mut ps = vec![1usize; dims.len()];
        ps[1] = c;
        let y = xn
            .broadcast_mul(&w.reshape(ps.clone())?)?
            .broadcast_add(&b.reshape(ps)?)?;
        if silu {
            y.silu()
        } else {
            Ok(y)
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// `sum(y * probe)` in f64: the scalar a finite-difference check differentiates.
    fn probe_sum(y: Tensor, probe: &Tensor) -> f64 {
        (y * probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    fn var(t: candle_core::Result<Tensor>) -> Var {
        Var::from_tensor(&t.unwrap()).unwrap()
    }

    /// `y` and the gradients of `sum(y * probe)` with respect to `vars`.
    fn value_and_grads(y: Tensor, probe: &Tensor, vars: &[&Var]) -> (Tensor, Vec<Tensor>) {
        let g = (&y * probe).unwrap().sum_all().unwrap().backward().unwrap();
        let grads = vars
            .iter()
            .map(|v| g.get(v.as_tensor()).expect("a gradient").clone())
            .collect();
        (y, grads)
    }

    /// The fused op and the composition give the same value (within `tol`) and the same
    /// gradients for every variable (within `gtol`), under the same random probe.
    fn assert_same(
        fused: impl Fn() -> Tensor,
        plain: impl Fn() -> Tensor,
        vars: &[&Var],
        (tol, gtol): (f32, f32),
        what: &str,
    ) {
        let y = fused();
        let probe = Tensor::randn(0f32, 1.0, y.dims(), y.device()).unwrap();
        let (y1, g1) = value_and_grads(y, &probe, vars);
        let (y0, g0) = value_and_grads(plain(), &probe, vars);
        assert_eq!(y1.dims(), y0.dims(), "{what}: shapes");
        let d = max_diff(&y1, &y0);
        assert!(d < tol, "{what}: forward differs by {d}");
        for (i, (a, b)) in g1.iter().zip(&g0).enumerate() {
            let d = max_diff(a, b);
            assert!(d < gtol, "{what}: gradient {i} differs by {d}");
        }
    }

    #[test]
    fn fused_group_norm_matches_the_composition_forward_and_backward() {
        let dev = Device::Cpu;
        // Odd sizes: 3 channels per group, 5x7 spatial; a 5-d video layout; one channel per group.
        for (shape, groups) in [
            (vec![2, 6, 5, 7], 2),
            (vec![3, 4, 2, 3, 5], 4),
            (vec![1, 64, 4, 4], 32),
            (vec![2, 3, 1], 1),
        ] {
            for silu in [false, true] {
                let c = shape[1];
                let x = var(Tensor::randn(0f32, 2.0, shape.clone(), &dev).and_then(|t| t + 0.7));
                let w = var(Tensor::randn(1f32, 0.5, c, &dev));
                let b = var(Tensor::randn(0f32, 0.5, c, &dev));
                assert_same(
                    || group_norm(&x, &w, &b, groups, 1e-5, silu).unwrap(),
                    || reference(&x, &w, &b, groups, 1e-5, silu).unwrap(),
                    &[&x, &w, &b],
                    (1e-5, 1e-4),
                    &format!("{shape:?} groups {groups} silu {silu}"),
                );
            }
        }
    }

    #[test]
    fn layer_norm_as_one_group_matches_the_composition() {
        let dev = Device::Cpu;
        let (rows, dim) = (37, 24);
        let x = var(Tensor::randn(0.3f32, 1.5, (rows, dim), &dev));
        let w = var(Tensor::randn(1f32, 0.5, dim, &dev));
        let b = var(Tensor::randn(0f32, 0.5, dim, &dev));
        let plain = || {
            let mean = x.mean_keepdim(1).unwrap();
            let xc = x.broadcast_sub(&mean).unwrap();
            let var = xc.sqr().unwrap().mean_keepdim(1).unwrap();
            let xn = xc
                .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
                .unwrap();
            xn.broadcast_mul(&w).unwrap().broadcast_add(&b).unwrap()
        };
        let fused = || {
            group_norm(&x.reshape((rows, dim, 1)).unwrap(), &w, &b, 1, 1e-5, false)
                .unwrap()
                .reshape((rows, dim))
                .unwrap()
        };
        assert_same(fused, plain, &[&x, &w, &b], (1e-5, 1e-4), "layer norm");
    }

    #[test]
    fn fused_softmax_matches_the_composition() {
        let dev = Device::Cpu;
        // Rows longer than the kernels' 16 lanes and shorter; a negative scale (the row's
        // maximum is then of the smallest input).
        for (shape, scale) in [
            (vec![3usize, 5, 7], 1.0),
            (vec![2, 1], 1.0),
            (vec![4, 33], 0.125),
            (vec![3, 2, 19], -0.7),
        ] {
            let x = var(Tensor::randn(0f32, 3.0, shape.clone(), &dev));
            let plain = || {
                let xs = (x.as_tensor() * scale as f64).unwrap();
                let e = xs
                    .broadcast_sub(&xs.max_keepdim(D::Minus1).unwrap())
                    .unwrap()
                    .exp()
                    .unwrap();
                e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap()
            };
            let what = format!("softmax {shape:?} scale {scale}");
            assert_same(
                || scaled_softmax_last(&x, scale).unwrap(),
                plain,
                &[&x],
                (1e-6, 1e-5),
                &what,
            );
        }
    }

    /// The kernels' polynomial `exp` and `erf` against Rust's `exp` (libm) and candle's `erf`
    /// over a dense sweep, and at the edges: underflow to 0, overflow to infinity, NaN kept.
    #[test]
    fn fast_exp_and_erf_are_accurate() {
        use onestep_kernels::fastmath::{erf, exp};
        let mut worst_exp = 0f64;
        let mut worst_erf = 0f64;
        for i in 0..=2_000_000 {
            let x = -86.0 + (88.7 + 86.0) * i as f32 / 2_000_000.0;
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            worst_exp = worst_exp.max((got - want).abs() / want);
            let x = -6.0 + 12.0 * i as f32 / 2_000_000.0;
            let want = candle_core::cpu::erf::erf_f64(x as f64);
            worst_erf = worst_erf.max((erf(x) as f64 - want).abs());
        }
        // f32's epsilon is 1.19e-7: exp within 3 ulp; erf within 7e-7 absolute (A&S 7.1.26 is
        // 1.5e-7 in exact arithmetic, about 6e-7 in f32, as PyTorch's vectorised erf).
        assert!(worst_exp < 3.6e-7, "exp: relative error {worst_exp}");
        assert!(worst_erf < 7e-7, "erf: absolute error {worst_erf}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert!(erf(f32::NAN).is_nan());
        assert_eq!(erf(10.0), 1.0);
        assert_eq!(erf(-10.0), -1.0);
    }

    #[test]
    fn fused_geglu_matches_the_composition() {
        let dev = Device::Cpu;
        for shape in [vec![3usize, 5, 14], vec![2, 2], vec![7, 66]] {
            let x = var(Tensor::randn(0f32, 2.0, shape.clone(), &dev));
            let half = shape.last().unwrap() / 2;
            let plain = || {
                let h = x.narrow(D::Minus1, 0, half).unwrap();
                let g = x.narrow(D::Minus1, half, half).unwrap();
                (h * g.gelu_erf().unwrap()).unwrap()
            };
            let what = format!("geglu {shape:?}");
            assert_same(|| geglu(&x).unwrap(), plain, &[&x], (1e-5, 1e-4), &what);
        }
    }

    #[test]
    fn fused_bias_add_matches_broadcasting() {
        let dev = Device::Cpu;
        for (shape, axis) in [
            (vec![5usize, 7], 1),
            (vec![6, 33], 0),
            (vec![3, 4, 10], 1),
            (vec![2, 3, 1], 1),
        ] {
            let c = shape[axis];
            let y = var(Tensor::randn(0f32, 1.0, shape.clone(), &dev));
            let b = var(Tensor::randn(0f32, 1.0, c, &dev));
            let mut bshape = vec![1usize; shape.len()];
            bshape[axis] = c;
            assert_same(
                || add_bias(&y, &b, axis).unwrap(),
                || {
                    y.broadcast_add(&b.reshape(bshape.clone()).unwrap())
                        .unwrap()
                },
                &[&y, &b],
                (1e-6, 1e-4),
                &format!("bias {shape:?} axis {axis}"),
            );
        }
    }

    #[test]
    fn fused_blend_matches_the_composition() {
        let dev = Device::Cpu;
        let shape = (3usize, 5, 7, 11);
        let sp = var(Tensor::randn(0f32, 1.0, shape, &dev));
        let te = var(Tensor::randn(0f32, 1.0, shape, &dev));
        let mix = var(Tensor::new(&[0.3f32], &dev));
        let alpha = || candle_nn::ops::sigmoid(&mix).unwrap();
        let plain = || {
            let a = alpha();
            let one_minus = (1.0 - &a).unwrap();
            (sp.broadcast_mul(&a).unwrap() + te.broadcast_mul(&one_minus).unwrap()).unwrap()
        };
        // The mix factor's gradient sums over every element: a looser tolerance.
        assert_same(
            || blend(&sp, &te, &alpha()).unwrap(),
            plain,
            &[&sp, &te, &mix],
            (1e-6, 1e-3),
            "blend",
        );
    }

    #[test]
    fn fused_conv2d_matches_candle_conv2d() {
        let dev = Device::Cpu;
        // (b, cin, h, w, cout, k, stride, pad [t, b, l, r]): 3x3 same, strided with the VAE's
        // asymmetric padding, 1x1, odd sizes, a kernel wider than the unpadded image.
        let cases = [
            (2, 3, 5, 7, 4, 3, 1, [1, 1, 1, 1]),
            (2, 4, 8, 6, 3, 3, 2, [0, 1, 0, 1]),
            (3, 5, 4, 4, 6, 1, 1, [0, 0, 0, 0]),
            (1, 2, 7, 5, 2, 3, 2, [1, 1, 1, 1]),
            (1, 1, 2, 2, 1, 3, 1, [1, 1, 1, 1]),
            // Strided, one column: some taps see no column of the image at all.
            (2, 2, 3, 1, 2, 3, 2, [1, 1, 1, 1]),
            (1, 3, 9, 11, 2, 3, 3, [1, 0, 2, 0]),
        ];
        for (b, cin, h, w, cout, k, s, pad) in cases {
            let x = var(Tensor::randn(0f32, 1.0, (b, cin, h, w), &dev));
            let wt = var(Tensor::randn(0f32, 0.5, (cout, cin, k, k), &dev));
            let bias = var(Tensor::randn(0f32, 1.0, cout, &dev));
            // candle's own conv2d on an explicitly padded input.
            let plain = || {
                x.pad_with_zeros(2, pad[0], pad[1])
                    .and_then(|t| t.pad_with_zeros(3, pad[2], pad[3]))
                    .and_then(|t| t.conv2d(&wt, 0, s, 1, 1))
                    .unwrap()
            };
            let what = format!("conv {b} {cin} {h} {w} {cout} {k} {s} {pad:?}");
            assert_same(
                || conv2d(&x, &wt, None, s, pad).unwrap(),
                plain,
                &[&x, &wt],
                (1e-4, 1e-4),
                &what,
            );
            // With the bias inside the op: its gradient too.
            let plain_bias = || {
                plain()
                    .broadcast_add(&bias.reshape((1, cout, 1, 1)).unwrap())
                    .unwrap()
            };
            assert_same(
                || conv2d(&x, &wt, Some(&bias), s, pad).unwrap(),
                plain_bias,
                &[&x, &wt, &bias],
                (1e-4, 1e-4),
                &format!("{what} with bias"),
            );
        }
    }

    /// The depthwise convolution as candle's composition: zero padding, then the sum over taps
    /// of the shifted (strided) input times the channel's tap, plus the bias.
    fn depthwise_reference(
        x: &Tensor,
        wt: &Tensor,
        bias: &Tensor,
        s: usize,
        pad: [usize; 4],
    ) -> candle_core::Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        let k = wt.dim(2)?;
        let xp = x
            .pad_with_zeros(2, pad[0], pad[1])?
            .pad_with_zeros(3, pad[2], pad[3])?;
        let (ho, wo) = (
            (h + pad[0] + pad[1] - k) / s + 1,
            (w + pad[2] + pad[3] - k) / s + 1,
        );
        let mut acc = bias.reshape((1, c, 1, 1))?;
        for ty in 0..k {
            for tx in 0..k {
                let rows: Vec<u32> = (0..ho).map(|o| (o * s + ty) as u32).collect();
                let cols: Vec<u32> = (0..wo).map(|o| (o * s + tx) as u32).collect();
                let tap = xp
                    .index_select(&Tensor::new(rows.as_slice(), x.device())?, 2)?
                    .index_select(&Tensor::new(cols.as_slice(), x.device())?, 3)?;
                let wk = wt
                    .narrow(2, ty, 1)?
                    .narrow(3, tx, 1)?
                    .reshape((1, c, 1, 1))?;
                acc = acc.broadcast_add(&tap.broadcast_mul(&wk)?)?;
            }
        }
        Ok(acc)
    }

    #[test]
    fn fused_depthwise_conv2d_matches_the_composition_and_finite_differences() {
        let dev = Device::Cpu;
        // (b, c, h, w, k, stride, pad [t, b, l, r]): EfficientNet's 3x3 and 5x5 with TF "SAME"
        // padding (asymmetric when strided), odd sizes, a kernel wider than the unpadded image,
        // taps that see no column at all.
        let cases = [
            (2, 3, 5, 7, 3, 1, [1, 1, 1, 1]),
            (2, 4, 8, 6, 3, 2, [0, 1, 0, 1]),
            (3, 5, 9, 9, 5, 2, [1, 2, 1, 2]),
            (1, 2, 7, 5, 5, 1, [2, 2, 2, 2]),
            (1, 1, 2, 2, 3, 1, [1, 1, 1, 1]),
            (2, 2, 3, 1, 3, 2, [1, 1, 1, 1]),
            (1, 3, 9, 11, 3, 3, [1, 0, 2, 0]),
        ];
        for (b, c, h, w, k, s, pad) in cases {
            let x = var(Tensor::randn(0f32, 1.0, (b, c, h, w), &dev));
            let wt = var(Tensor::randn(0f32, 0.5, (c, 1, k, k), &dev));
            let bias = var(Tensor::randn(0f32, 1.0, c, &dev));
            assert_same(
                || depthwise_conv2d(&x, &wt, Some(&bias), s, pad).unwrap(),
                || depthwise_reference(&x, &wt, &bias, s, pad).unwrap(),
                &[&x, &wt, &bias],
                (1e-5, 1e-4),
                &format!("depthwise {b} {c} {h} {w} {k} {s} {pad:?}"),
            );
        }
        // Without a bias: the same as a zero bias.
        let x = var(Tensor::randn(0f32, 1.0, (2, 3, 6, 5), &dev));
        let wt = var(Tensor::randn(0f32, 0.5, (3, 1, 3, 3), &dev));
        let zero = Tensor::zeros(3, DType::F32, &dev).unwrap();
        assert_same(
            || depthwise_conv2d(&x, &wt, None, 2, [0, 1, 1, 1]).unwrap(),
            || depthwise_reference(&x, &wt, &zero, 2, [0, 1, 1, 1]).unwrap(),
            &[&x, &wt],
            (1e-5, 1e-4),
            "depthwise without bias",
        );
        // Central differences of sum(y * probe) in every input, filter and bias element.
        let (b, c, h, w, k, s, pad) =
            (1usize, 2usize, 4usize, 5usize, 3usize, 2usize, [1, 1, 1, 1]);
        let x0: Vec<f32> = (0..b * c * h * w)
            .map(|i| (i * 37 % 23) as f32 / 7.0 - 1.5)
            .collect();
        let w0: Vec<f32> = (0..c * k * k)
            .map(|i| (i * 11 % 9) as f32 / 5.0 - 0.8)
            .collect();
        let b0 = [0.3f32, -0.2];
        let f = |x: &[f32], wv: &[f32], bv: &[f32]| -> Tensor {
            depthwise_conv2d(
                &Tensor::from_slice(x, (b, c, h, w), &dev).unwrap(),
                &Tensor::from_slice(wv, (c, 1, k, k), &dev).unwrap(),
                Some(&Tensor::from_slice(bv, c, &dev).unwrap()),
                s,
                pad,
            )
            .unwrap()
        };
        let y = f(&x0, &w0, &b0);
        let probe = Tensor::randn(0f32, 1.0, y.dims(), &dev).unwrap();
        let (xv, wv, bv) = (
            var(Tensor::from_slice(&x0, (b, c, h, w), &dev)),
            var(Tensor::from_slice(&w0, (c, 1, k, k), &dev)),
            var(Tensor::from_slice(&b0, c, &dev)),
        );
        let (_, grads) = value_and_grads(
            depthwise_conv2d(&xv, &wv, Some(&bv), s, pad).unwrap(),
            &probe,
            &[&xv, &wv, &bv],
        );
        let eps = 1e-2f32;
        let sets: [Vec<f32>; 3] = [x0.clone(), w0.clone(), b0.to_vec()];
        for (which, base) in sets.iter().enumerate() {
            let g: Vec<f32> = grads[which].flatten_all().unwrap().to_vec1().unwrap();
            for i in 0..base.len() {
                let eval = |d: f32| {
                    let mut v = sets.clone();
                    v[which][i] += d;
                    probe_sum(f(&v[0], &v[1], &v[2]), &probe)
                };
                let num = (eval(eps) - eval(-eps)) / (2.0 * eps as f64);
                assert!(
                    (num - g[i] as f64).abs() < 2e-3 * (1.0 + num.abs()),
                    "argument {which} element {i}: finite difference {num} vs {}",
                    g[i]
                );
            }
        }
    }

    #[test]
    fn fused_group_norm_gradients_match_finite_differences() {
        let dev = Device::Cpu;
        let shape = [2usize, 4, 3, 3];
        let x0: Vec<f32> = (0..72).map(|i| (i * 37 % 23) as f32 / 7.0 - 1.5).collect();
        let w0 = [0.9f32, 1.3, -0.4, 1.1];
        let b0 = [0.1f32, -0.2, 0.3, 0.05];
        let probe: Vec<f32> = (0..72).map(|i| (i * 11 % 13) as f32 / 6.0 - 1.0).collect();
        let loss = |x: &[f32], w: &[f32], b: &[f32]| -> f64 {
            let x = Tensor::from_slice(x, &shape, &dev).unwrap();
            let w = Tensor::from_slice(w, 4, &dev).unwrap();
            let b = Tensor::from_slice(b, 4, &dev).unwrap();
            let p = Tensor::from_slice(&probe, &shape, &dev).unwrap();
            probe_sum(group_norm(&x, &w, &b, 2, 1e-5, true).unwrap(), &p)
        };
        let x = Var::from_slice(&x0, &shape, &dev).unwrap();
        let w = Var::from_slice(&w0, 4, &dev).unwrap();
        let b = Var::from_slice(&b0, 4, &dev).unwrap();
        let p = Tensor::from_slice(&probe, &shape, &dev).unwrap();
        let y = group_norm(&x, &w, &b, 2, 1e-5, true).unwrap();
        let g = (y * p).unwrap().sum_all().unwrap().backward().unwrap();
        let grad = |v: &Var| {
            g.get(v.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (gx, gw, gb) = (grad(&x), grad(&w), grad(&b));
        let h = 1e-2f32;
        let check = |analytic: f32, plus: f64, minus: f64, what: &str| {
            let numeric = (plus - minus) / (2.0 * h as f64);
            assert!(
                (analytic as f64 - numeric).abs() < 2e-2 * numeric.abs().max(1.0),
                "{what}: analytic {analytic} vs numeric {numeric}"
            );
        };
        for i in [0usize, 5, 17, 40, 71] {
            let (mut xp, mut xm) = (x0.clone(), x0.clone());
            xp[i] += h;
            xm[i] -= h;
            check(
                gx[i],
                loss(&xp, &w0, &b0),
                loss(&xm, &w0, &b0),
                &format!("dx[{i}]"),
            );
        }
        for k in 0..4 {
            let (mut wp, mut wm) = (w0, w0);
            wp[k] += h;
            wm[k] -= h;
            check(
                gw[k],
                loss(&x0, &wp, &b0),
                loss(&x0, &wm, &b0),
                &format!("dw[{k}]"),
            );
            let (mut bp, mut bm) = (b0, b0);
            bp[k] += h;
            bm[k] -= h;
            check(
                gb[k],
                loss(&x0, &w0, &bp),
                loss(&x0, &w0, &bm),
                &format!("db[{k}]"),
            );
        }
    }

    /// Multi-head attention as the unfused composition computes it: heads split into
    /// `[b, heads, len, d]`, scores, a softmax of primitive ops, values, heads merged back.
    fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Tensor {
        let (b, n, hd) = q.dims3().unwrap();
        let m = k.dim(1).unwrap();
        let d = hd / heads;
        let split = |x: &Tensor, len: usize| {
            x.reshape((b, len, heads, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (q, k, v) = (split(q, n), split(k, m), split(v, m));
        let s = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        let e = s
            .broadcast_sub(&s.max_keepdim(D::Minus1).unwrap())
            .unwrap()
            .exp()
            .unwrap();
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        p.matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, n, hd))
            .unwrap()
    }

    #[test]
    fn fused_attention_matches_the_composition() {
        let dev = Device::Cpu;
        // (b, heads, n, m, d): odd sizes; cross-attention to one token (SVD's image embedding);
        // the toy UNet's 16-wide heads; and scores past one block of query rows (2 blocks).
        for (b, heads, n, m, d) in [
            (2, 2, 7, 5, 3),
            (3, 1, 4, 1, 8),
            (1, 3, 37, 37, 5),
            (2, 4, 64, 64, 16),
            (1, 2, 300, 260, 4),
        ] {
            let hd = heads * d;
            let q = var(Tensor::randn(0f32, 1.0, (b, n, hd), &dev));
            let k = var(Tensor::randn(0f32, 1.0, (b, m, hd), &dev));
            let v = var(Tensor::randn(0f32, 1.0, (b, m, hd), &dev));
            let scale = 1.0 / (d as f64).sqrt();
            assert_same(
                || attention(&q, &k, &v, heads, scale as f32).unwrap(),
                || attention_reference(&q, &k, &v, heads, scale),
                &[&q, &k, &v],
                (1e-5, 1e-4),
                &format!("b {b} heads {heads} n {n} m {m} d {d}"),
            );
        }
        // Shapes that do not fit the heads are an error, not a wrong answer.
        let q = Tensor::zeros((1, 3, 6), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 4, 6), DType::F32, &dev).unwrap();
        assert!(attention(&q, &k, &k, 4, 1.0).is_err());
        assert!(attention(&q, &q.narrow(2, 0, 4).unwrap(), &k, 2, 1.0).is_err());
    }

    #[test]
    fn fused_attention_gradients_match_finite_differences() {
        let dev = Device::Cpu;
        let (b, heads, n, m, d) = (2usize, 2usize, 3usize, 4usize, 2usize);
        let hd = heads * d;
        let vals = |len: usize, seed: usize| -> Vec<f32> {
            (0..len)
                .map(|i| ((i * 37 + seed * 11) % 23) as f32 / 9.0 - 1.2)
                .collect()
        };
        let inputs = [
            vals(b * n * hd, 1),
            vals(b * m * hd, 2),
            vals(b * m * hd, 3),
        ];
        let shapes = [(b, n, hd), (b, m, hd), (b, m, hd)];
        let probe = Tensor::from_vec(vals(b * n * hd, 4), (b, n, hd), &dev).unwrap();
        let loss = |xs: &[Vec<f32>; 3]| -> f64 {
            let t: Vec<Tensor> = xs
                .iter()
                .zip(shapes)
                .map(|(x, s)| Tensor::from_slice(x, s, &dev).unwrap())
                .collect();
            probe_sum(attention(&t[0], &t[1], &t[2], heads, 0.7).unwrap(), &probe)
        };
        let vars: Vec<Var> = inputs
            .iter()
            .zip(shapes)
            .map(|(x, s)| Var::from_slice(x, s, &dev).unwrap())
            .collect();
        let y = attention(&vars[0], &vars[1], &vars[2], heads, 0.7).unwrap();
        let g = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let h = 1e-2f32;
        for (which, name) in ["dq", "dk", "dv"].iter().enumerate() {
            let analytic = g
                .get(vars[which].as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for i in (0..inputs[which].len()).step_by(5) {
                let (mut plus, mut minus) = (inputs.clone(), inputs.clone());
                plus[which][i] += h;
                minus[which][i] -= h;
                let numeric = (loss(&plus) - loss(&minus)) / (2.0 * h as f64);
                assert!(
                    (analytic[i] as f64 - numeric).abs() < 1e-2 * numeric.abs().max(1.0),
                    "{name}[{i}]: analytic {} vs numeric {numeric}",
                    analytic[i]
                );
            }
        }
    }
}
