//! The CLIP vision tower with its projection (`transformers.CLIPVisionModelWithProjection`),
//! SVD's image encoder: Stable Video Diffusion conditions its UNet's cross-attention on the
//! 1024-d image embedding of OpenCLIP ViT-H/14 (`image_encoder/` of the stabilityai folders).
//!
//! Names and `config.json` fields are transformers': `vision_model.embeddings.{class_embedding,
//! patch_embedding.weight, position_embedding.weight}`, `vision_model.pre_layrnorm`,
//! `vision_model.encoder.layers.N.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2,
//! mlp.fc1, mlp.fc2}`, `vision_model.post_layernorm`, `visual_projection.weight`. The image
//! embedding is `visual_projection(post_layernorm(h[:, 0]))` after pre-norm layers.
//! Checked against transformers on a small random configuration
//! (`tools/fixtures/svd_pipeline_reference.py`, `tests/models.rs`).

use super::layers::{scaled_dot_product_attention, Conv2d, LayerNorm, Linear};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// The network-defining fields of a transformers `CLIPVisionConfig` (`config.json` of an
/// `image_encoder/` folder; other fields, such as `dropout` or `torch_dtype`, are ignored).
/// Defaults are transformers' (ViT-B/32); SVD's folder sets every field it uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub projection_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    /// `quick_gelu` (OpenAI CLIP) or `gelu` (OpenCLIP ViT-H/14, SVD's).
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            architectures: None,
            model_type: None,
        }
    }
}

impl ClipVisionConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.patch_size == 0 || self.image_size % self.patch_size != 0 {
            return Err(format!(
                "image_size {} is not a multiple of patch_size {}",
                self.image_size, self.patch_size
            ));
        }
        if !matches!(self.hidden_act.as_str(), "gelu" | "quick_gelu") {
            return Err(format!(
                "hidden_act \"{}\": only \"gelu\" and \"quick_gelu\"",
                self.hidden_act
            ));
        }
        Ok(())
    }

    fn positions(&self) -> usize {
        let g = self.image_size / self.patch_size;
        g * g + 1
    }
}

struct ClipLayer {
    layer_norm1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    quick_gelu: bool,
}

impl ClipLayer {
    fn new(vb: VarBuilder, c: &ClipVisionConfig) -> Result<Self> {
        let d = c.hidden_size;
        let a = vb.pp("self_attn");
        Ok(Self {
            layer_norm1: LayerNorm::new(vb.pp("layer_norm1"), d, c.layer_norm_eps)?,
            q: Linear::new(a.pp("q_proj"), d, d, true)?,
            k: Linear::new(a.pp("k_proj"), d, d, true)?,
            v: Linear::new(a.pp("v_proj"), d, d, true)?,
            out: Linear::new(a.pp("out_proj"), d, d, true)?,
            layer_norm2: LayerNorm::new(vb.pp("layer_norm2"), d, c.layer_norm_eps)?,
            fc1: Linear::new(vb.pp("mlp.fc1"), d, c.intermediate_size, true)?,
            fc2: Linear::new(vb.pp("mlp.fc2"), c.intermediate_size, d, true)?,
            heads: c.num_attention_heads,
            quick_gelu: c.hidden_act == "quick_gelu",
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let hd = d / self.heads;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, n, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let h = self.layer_norm1.forward(x)?;
        let q = split(self.q.forward(&h)?)?;
        let k = split(self.k.forward(&h)?)?;
        let v = split(self.v.forward(&h)?)?;
        let o = scaled_dot_product_attention(&q, &k, &v, 1.0 / (hd as f64).sqrt())?;
        let x = (x + self.out.forward(&o.transpose(1, 2)?.reshape((b, n, d))?)?)?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        let h = if self.quick_gelu {
            (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?
        } else {
            h.gelu_erf()?
        };
        x + self.fc2.forward(&h)?
    }
}

/// `CLIPVisionModelWithProjection`.
pub struct ClipVisionModelWithProjection {
    pub config: ClipVisionConfig,
    patch: Conv2d,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<ClipLayer>,
    post_layernorm: LayerNorm,
    visual_projection: Linear,
}

/// CLIP's image normalisation (`CLIPImageProcessor`'s `image_mean` / `image_std`).
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

impl ClipVisionModelWithProjection {
    pub fn new(vb: VarBuilder, c: &ClipVisionConfig) -> Result<Self> {
        c.validate().map_err(candle_core::Error::Msg)?;
        let d = c.hidden_size;
        let vm = vb.pp("vision_model");
        let e = vm.pp("embeddings");
        let patch = Conv2d::without_bias(
            e.pp("patch_embedding"),
            c.num_channels,
            d,
            c.patch_size,
            c.patch_size,
            0,
        )?;
        Ok(Self {
            config: c.clone(),
            patch,
            class_embedding: e.get(d, "class_embedding")?,
            position_embedding: e.get((c.positions(), d), "position_embedding.weight")?,
            pre_layrnorm: LayerNorm::new(vm.pp("pre_layrnorm"), d, c.layer_norm_eps)?,
            layers: (0..c.num_hidden_layers)
                .map(|i| ClipLayer::new(vm.pp(format!("encoder.layers.{i}")), c))
                .collect::<Result<_>>()?,
            post_layernorm: LayerNorm::new(vm.pp("post_layernorm"), d, c.layer_norm_eps)?,
            visual_projection: Linear::new(vb.pp("visual_projection"), d, c.projection_dim, false)?,
        })
    }

    /// The dtype the weights are held in.
    pub fn dtype(&self) -> candle_core::DType {
        self.class_embedding.dtype()
    }

    /// Pixel values `[n, 3, image_size, image_size]`, already CLIP-normalised, to the image
    /// embeddings `[n, projection_dim]` (transformers' `image_embeds`).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (n, _, h, w) = pixel_values.dims4()?;
        let s = self.config.image_size;
        if (h, w) != (s, s) {
            candle_core::bail!("CLIP image encoder: input is {h}x{w}, the model takes {s}x{s}");
        }
        let d = self.config.hidden_size;
        let tokens = self
            .patch
            .forward(&pixel_values.to_dtype(self.dtype())?)?
            .flatten_from(2)?
            .transpose(1, 2)?; // [n, g*g, d]
        let cls = self
            .class_embedding
            .reshape((1, 1, d))?
            .broadcast_as((n, 1, d))?;
        let x = Tensor::cat(&[&cls, &tokens], 1)?
            .broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        let mut x = self.pre_layrnorm.forward(&x)?;
        for l in &self.layers {
            x = l.forward(&x)?;
        }
        let pooled = self
            .post_layernorm
            .forward(&x.narrow(1, 0, 1)?.squeeze(1)?)?;
        self.visual_projection.forward(&pooled)
    }
}

/// Row-stochastic `[n_out, n_in]` matrix of the resize diffusers' `StableVideoDiffusionPipeline`
/// applies before CLIP (`_resize_with_antialiasing`, after kornia) along one axis: a Gaussian blur
/// with `sigma = max((n_in / n_out - 1) / 2, 0.001)` over `max(4 sigma, 3)` taps (made odd) with
/// reflect padding, then bicubic interpolation with `align_corners=True` (A = -0.75, borders
/// clamped). Computed in f64.
pub fn svd_resize_matrix(n_in: usize, n_out: usize) -> Vec<f32> {
    let factor = n_in as f64 / n_out as f64;
    let sigma = ((factor - 1.0) / 2.0).max(0.001);
    // int(max(2.0 * 2 * sigma, 3)), then odd.
    let mut ks = (4.0 * sigma).max(3.0) as usize;
    if ks % 2 == 0 {
        ks += 1;
    }
    // torch.float32 sigma, as kornia's helpers compute it in the input's dtype.
    let sigma32 = sigma as f32 as f64;
    let mut g: Vec<f64> = (0..ks)
        .map(|i| {
            let x = i as f64 - (ks / 2) as f64;
            (-(x * x) / (2.0 * sigma32 * sigma32)).exp()
        })
        .collect();
    let sum: f64 = g.iter().sum();
    g.iter_mut().for_each(|v| *v /= sum);
    let front = (ks - 1) / 2;
    // Reflect padding (no edge repeat), as torch's `pad(mode="reflect")`.
    let reflect = |i: i64| -> usize {
        let n = n_in as i64;
        if n == 1 {
            return 0;
        }
        let period = 2 * (n - 1);
        let mut j = i.rem_euclid(period);
        if j >= n {
            j = period - j;
        }
        j as usize
    };
    let mut blur = vec![0f64; n_in * n_in];
    for o in 0..n_in {
        for (k, gk) in g.iter().enumerate() {
            let i = reflect(o as i64 - front as i64 + k as i64);
            blur[o * n_in + i] += gk;
        }
    }
    // Bicubic, align_corners=True.
    const A: f64 = -0.75;
    let cubic = |t: f64| -> [f64; 4] {
        [
            ((A * (t + 1.0) - 5.0 * A) * (t + 1.0) + 8.0 * A) * (t + 1.0) - 4.0 * A,
            ((A + 2.0) * t - (A + 3.0)) * t * t + 1.0,
            ((A + 2.0) * (1.0 - t) - (A + 3.0)) * (1.0 - t) * (1.0 - t) + 1.0,
            ((A * (2.0 - t) - 5.0 * A) * (2.0 - t) + 8.0 * A) * (2.0 - t) - 4.0 * A,
        ]
    };
    let scale = if n_out > 1 {
        (n_in as f64 - 1.0) / (n_out as f64 - 1.0)
    } else {
        0.0
    };
    let mut m = vec![0f64; n_out * n_in];
    for o in 0..n_out {
        let src = o as f64 * scale;
        let i0 = src.floor();
        let w = cubic(src - i0);
        for (k, wk) in w.iter().enumerate() {
            let i = (i0 as i64 + k as i64 - 1).clamp(0, n_in as i64 - 1) as usize;
            for j in 0..n_in {
                m[o * n_in + j] += wk * blur[i * n_in + j];
            }
        }
    }
    m.into_iter().map(|v| v as f32).collect()
}
