//! DINOv2 (Oquab et al. 2023), the frozen image backbone of the OSV discriminator, in the
//! Hugging Face `transformers.Dinov2Model` layout that published DINOv2 checkpoints use
//! (`facebook/dinov2-small` ... `-giant` on the Hugging Face hub: a folder with `config.json`
//! and `model.safetensors`). Nothing downloads it here: users who have the weights point
//! `discriminator.backbone.path` at that folder.
//!
//! Embeddings: a patch Conv2d (kernel = stride = `patch_size`), the class token, and position
//! embeddings resampled bicubically (PyTorch's `interpolate(mode="bicubic",
//! align_corners=False)`, A = -0.75) from the pretrained grid to the input's patch grid. Then
//! pre-norm transformer layers (LayerNorm -> multi-head self-attention -> layer scale ->
//! residual; LayerNorm -> MLP with exact GELU -> layer scale -> residual) and a final LayerNorm.
//! Verified against `transformers` on a small random model with a non-square input
//! (`tools/fixtures/dinov2_reference.py`, `tests/models.rs`). The SwiGLU MLP of the giant model
//! and register tokens are not supported (a clear error says so).

use super::layers::{Conv2d, LayerNorm, Linear};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use std::path::Path;

/// The fields of a Hugging Face `Dinov2Config` (`config.json`) that define the network; the
/// file's other fields (training and export settings) are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Dinov2Config {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    pub patch_size: usize,
    pub image_size: usize,
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_true")]
    pub qkv_bias: bool,
    #[serde(default)]
    pub use_swiglu_ffn: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_model_type() -> String {
    "dinov2".into()
}
fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_channels() -> usize {
    3
}
fn default_eps() -> f64 {
    1e-6
}
fn default_true() -> bool {
    true
}
fn default_act() -> String {
    "gelu".into()
}

impl Dinov2Config {
    /// Read and check `config.json` of a model folder.
    pub fn load(dir: &Path) -> std::result::Result<Self, String> {
        let path = dir.join("config.json");
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let c: Dinov2Config =
            serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        c.check().map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(c)
    }

    pub fn check(&self) -> std::result::Result<(), String> {
        if self.model_type != "dinov2" {
            return Err(format!(
                "model_type \"{}\": only \"dinov2\" is supported (not the register-token variant)",
                self.model_type
            ));
        }
        if self.use_swiglu_ffn {
            return Err(
                "use_swiglu_ffn = true (DINOv2-giant's SwiGLU MLP) is not supported".into(),
            );
        }
        if self.hidden_act != "gelu" {
            return Err(format!("hidden_act \"{}\": only \"gelu\"", self.hidden_act));
        }
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err("hidden_size must be a multiple of num_attention_heads".into());
        }
        if self.patch_size == 0 || self.image_size < self.patch_size {
            return Err("patch_size must be in 1..=image_size".into());
        }
        Ok(())
    }

    fn mlp_hidden(&self) -> usize {
        (self.hidden_size as f64 * self.mlp_ratio) as usize
    }
}

/// Row-stochastic `[n_out, n_in]` matrix of PyTorch's bicubic resampling along one axis
/// (`align_corners=False`, A = -0.75, border samples repeated).
pub fn bicubic_matrix(n_in: usize, n_out: usize) -> Vec<f32> {
    const A: f64 = -0.75;
    let scale = n_in as f64 / n_out as f64;
    let mut m = vec![0f32; n_out * n_in];
    for o in 0..n_out {
        let src = (o as f64 + 0.5) * scale - 0.5;
        let i0 = src.floor();
        let t = src - i0;
        let w = [
            ((A * (t + 1.0) - 5.0 * A) * (t + 1.0) + 8.0 * A) * (t + 1.0) - 4.0 * A,
            ((A + 2.0) * t - (A + 3.0)) * t * t + 1.0,
            ((A + 2.0) * (1.0 - t) - (A + 3.0)) * (1.0 - t) * (1.0 - t) + 1.0,
            ((A * (2.0 - t) - 5.0 * A) * (2.0 - t) + 8.0 * A) * (2.0 - t) - 4.0 * A,
        ];
        for (k, wk) in w.iter().enumerate() {
            let i = (i0 as i64 + k as i64 - 1).clamp(0, n_in as i64 - 1) as usize;
            m[o * n_in + i] += *wk as f32;
        }
    }
    m
}

/// Row-stochastic `[n_out, n_in]` matrix of bilinear resampling along one axis (PyTorch's
/// `interpolate(mode="bilinear", align_corners=False)` without antialiasing).
pub fn bilinear_matrix(n_in: usize, n_out: usize) -> Vec<f32> {
    let scale = n_in as f64 / n_out as f64;
    let mut m = vec![0f32; n_out * n_in];
    for o in 0..n_out {
        let src = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(n_in - 1);
        let i1 = (i0 + 1).min(n_in - 1);
        let t = src - i0 as f64;
        m[o * n_in + i0] += (1.0 - t) as f32;
        m[o * n_in + i1] += t as f32;
    }
    m
}

/// Resample `[.., h, w]` to `[.., ho, wo]` with per-axis matrices (`[ho, h]`, `[wo, w]`): two
/// matrix products, so gradients flow through it (candle's own bilinear upsampling has no
/// backward pass).
pub fn resample2d(x: &Tensor, my: &[f32], mx: &[f32], ho: usize, wo: usize) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (h, w) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    let lead: usize = dims[..dims.len() - 2].iter().product();
    let my = Tensor::from_slice(my, (ho, h), x.device())?.to_dtype(x.dtype())?;
    let mxt = Tensor::from_slice(mx, (wo, w), x.device())?
        .to_dtype(x.dtype())?
        .t()?;
    let x = x.reshape((lead, h, w))?;
    let y = my.broadcast_left(lead)?.matmul(&x.contiguous()?)?; // [lead, ho, w]
    let y = y.matmul(&mxt.broadcast_left(lead)?.contiguous()?)?; // [lead, ho, wo]
    let mut out = dims;
    let n = out.len();
    out[n - 2] = ho;
    out[n - 1] = wo;
    y.reshape(out)
}

struct Layer {
    norm1: LayerNorm,
    query: Linear,
    key: Linear,
    value: Linear,
    out: Linear,
    scale1: Tensor,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    scale2: Tensor,
    heads: usize,
}

impl Layer {
    fn new(vb: VarBuilder, c: &Dinov2Config) -> Result<Self> {
        let d = c.hidden_size;
        let att = vb.pp("attention");
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), d, c.layer_norm_eps)?,
            query: Linear::new(att.pp("attention.query"), d, d, c.qkv_bias)?,
            key: Linear::new(att.pp("attention.key"), d, d, c.qkv_bias)?,
            value: Linear::new(att.pp("attention.value"), d, d, c.qkv_bias)?,
            out: Linear::new(att.pp("output.dense"), d, d, true)?,
            scale1: vb.get(d, "layer_scale1.lambda1")?,
            norm2: LayerNorm::new(vb.pp("norm2"), d, c.layer_norm_eps)?,
            fc1: Linear::new(vb.pp("mlp.fc1"), d, c.mlp_hidden(), true)?,
            fc2: Linear::new(vb.pp("mlp.fc2"), c.mlp_hidden(), d, true)?,
            scale2: vb.get(d, "layer_scale2.lambda1")?,
            heads: c.num_attention_heads,
        })
    }

    fn attention(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let hd = d / self.heads;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, n, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.query.forward(x)?)?;
        let k = split(self.key.forward(x)?)?;
        let v = split(self.value.forward(x)?)?;
        let scores = q.matmul(&k.t()?)?;
        let o =
            super::layers::scaled_softmax_last(&scores, 1.0 / (hd as f64).sqrt())?.matmul(&v)?;
        self.out.forward(&o.transpose(1, 2)?.reshape((b, n, d))?)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.attention(&self.norm1.forward(x)?)?;
        let x = (x + h.broadcast_mul(&self.scale1)?)?;
        let h = self
            .fc2
            .forward(&self.fc1.forward(&self.norm2.forward(&x)?)?.gelu_erf()?)?;
        x + h.broadcast_mul(&self.scale2)?
    }
}

/// The DINOv2 ViT.
pub struct Dinov2 {
    pub config: Dinov2Config,
    patch: Conv2d,
    cls_token: Tensor,
    position: Tensor,
    layers: Vec<Layer>,
    layernorm: LayerNorm,
}

/// ImageNet normalisation DINOv2 was trained with.
pub const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];

impl Dinov2 {
    /// Weights under `vb` with the `Dinov2Model` names (`embeddings.*`, `encoder.layer.N.*`,
    /// `layernorm.*`).
    pub fn new(vb: VarBuilder, c: &Dinov2Config) -> Result<Self> {
        c.check().map_err(candle_core::Error::Msg)?;
        let d = c.hidden_size;
        let e = vb.pp("embeddings");
        let grid = c.image_size / c.patch_size;
        Ok(Self {
            config: c.clone(),
            patch: Conv2d::new(
                e.pp("patch_embeddings.projection"),
                c.num_channels,
                d,
                c.patch_size,
                c.patch_size,
                0,
            )?,
            cls_token: e.get((1, 1, d), "cls_token")?,
            position: e.get((1, 1 + grid * grid, d), "position_embeddings")?,
            layers: (0..c.num_hidden_layers)
                .map(|i| Layer::new(vb.pp(format!("encoder.layer.{i}")), c))
                .collect::<Result<_>>()?,
            layernorm: LayerNorm::new(vb.pp("layernorm"), d, c.layer_norm_eps)?,
        })
    }

    /// A model folder: `config.json` and `model.safetensors` (tensor names with or without the
    /// `dinov2.` prefix of the classification checkpoints), loaded as constants (frozen).
    pub fn load(dir: &Path, dev: &Device) -> crate::Result<Self> {
        let c = Dinov2Config::load(dir).map_err(crate::Error::Data)?;
        let file = dir.join("model.safetensors");
        let mut ts = candle_core::safetensors::load(&file, dev)
            .map_err(|e| crate::Error::Data(format!("{}: {e}", file.display())))?;
        if ts.keys().any(|k| k.starts_with("dinov2.")) {
            ts = ts
                .into_iter()
                .filter_map(|(k, v)| k.strip_prefix("dinov2.").map(|s| (s.to_string(), v)))
                .collect();
        }
        let ts = ts
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
            .collect::<Result<_>>()
            .map_err(|e| crate::Error::Data(format!("{}: {e}", file.display())))?;
        let vb = VarBuilder::from_tensors(ts, DType::F32, dev);
        Self::new(vb, &c).map_err(|e| {
            crate::Error::Data(format!(
                "{}: not a DINOv2 checkpoint matching its config.json: {e}",
                file.display()
            ))
        })
    }

    /// Position embeddings for a `gh x gw` patch grid, `[1, 1 + gh gw, d]`.
    fn positions(&self, gh: usize, gw: usize) -> Result<Tensor> {
        let d = self.config.hidden_size;
        let s = self.config.image_size / self.config.patch_size;
        let cls = self.position.narrow(1, 0, 1)?;
        let grid = self
            .position
            .narrow(1, 1, s * s)?
            .reshape((s, s, d))?
            .permute((2, 0, 1))?
            .contiguous()?;
        let grid = resample2d(
            &grid,
            &bicubic_matrix(s, gh),
            &bicubic_matrix(s, gw),
            gh,
            gw,
        )?;
        let grid = grid.permute((1, 2, 0))?.reshape((1, gh * gw, d))?;
        Tensor::cat(&[cls, grid], 1)
    }

    /// Pixel values `[n, 3, h, w]` (already normalised) to the hidden states (the embeddings,
    /// then every layer's output) and the final layer-normed output, each `[n, 1 + gh gw, d]`.
    pub fn forward(&self, x: &Tensor) -> Result<(Vec<Tensor>, Tensor)> {
        let (n, _, h, w) = x.dims4()?;
        let p = self.config.patch_size;
        let (gh, gw) = (h / p, w / p);
        let d = self.config.hidden_size;
        let tokens = self
            .patch
            .forward(x)?
            .reshape((n, d, gh * gw))?
            .transpose(1, 2)?;
        let cls = self.cls_token.broadcast_as((n, 1, d))?;
        let mut hs = Tensor::cat(&[&cls, &tokens], 1)?.broadcast_add(&self.positions(gh, gw)?)?;
        let mut states = vec![hs.clone()];
        for l in &self.layers {
            hs = l.forward(&hs)?;
            states.push(hs.clone());
        }
        let last = self.layernorm.forward(&hs)?;
        Ok((states, last))
    }

    /// Images `[n, 3, h, w]` in [-1, 1] (resized by the caller to a multiple of the patch size)
    /// to the patch tokens of every layer as feature maps `[n, d, h / p, w / p]`.
    pub fn features(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let (n, c, h, w) = x.dims4()?;
        let dev = x.device();
        let mean: Vec<f32> = IMAGENET_MEAN.iter().map(|v| *v as f32).collect();
        let std: Vec<f32> = IMAGENET_STD.iter().map(|v| *v as f32).collect();
        let mean = Tensor::from_slice(&mean[..c.min(3)], (1, c, 1, 1), dev)?;
        let std = Tensor::from_slice(&std[..c.min(3)], (1, c, 1, 1), dev)?;
        let x01 = ((x + 1.0)? * 0.5)?;
        let xn = x01.broadcast_sub(&mean)?.broadcast_div(&std)?;
        let (states, _) = self.forward(&xn)?;
        let p = self.config.patch_size;
        let (gh, gw) = (h / p, w / p);
        let d = self.config.hidden_size;
        states[1..]
            .iter()
            .map(|s| {
                s.narrow(1, 1, gh * gw)?
                    .transpose(1, 2)?
                    .reshape((n, d, gh, gw))
            })
            .collect()
    }
}

/// Bilinear resize of images `[n, c, h, w]` to `size x size` (differentiable).
pub fn resize_square(x: &Tensor, size: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if (h, w) == (size, size) {
        return Ok(x.clone());
    }
    resample2d(
        x,
        &bilinear_matrix(h, size),
        &bilinear_matrix(w, size),
        size,
        size,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resampling_matrices_are_identity_at_the_same_size_and_rows_sum_to_one() {
        for n in [1, 4, 7] {
            let b = bicubic_matrix(n, n);
            let l = bilinear_matrix(n, n);
            for i in 0..n {
                for j in 0..n {
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((b[i * n + j] - want).abs() < 1e-6);
                    assert!((l[i * n + j] - want).abs() < 1e-6);
                }
            }
        }
        let m = bicubic_matrix(4, 7);
        for o in 0..7 {
            let s: f32 = m[o * 4..(o + 1) * 4].iter().sum();
            assert!((s - 1.0).abs() < 1e-6);
        }
    }
}
