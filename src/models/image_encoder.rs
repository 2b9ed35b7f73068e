//! The image encoder whose embedding the UNet's cross-attention reads. SVD uses CLIP ViT-H/14's
//! image embedding (1024-d, one token); at CPU scale onestep trains this small convolutional
//! encoder jointly with the teacher instead (its weights live in the `image_encoder/` folder of
//! a checkpoint, the same folder name as in SVD's pipeline). See docs/models.md.

use super::layers::{Conv2d, Linear};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageEncoderConfig {
    /// Always `SmallImageEncoder` (CLIP checkpoints are not loadable yet).
    #[serde(rename = "_class_name")]
    pub class_name: String,
    /// Width of each stride-2 convolution.
    pub channels: Vec<usize>,
    /// Output width; must equal the UNet's `cross_attention_dim`.
    pub embed_dim: usize,
}

impl Default for ImageEncoderConfig {
    fn default() -> Self {
        Self {
            class_name: "SmallImageEncoder".into(),
            channels: vec![32, 64, 64],
            embed_dim: 64,
        }
    }
}

/// Stride-2 3x3 convolutions with SiLU, global average pooling, a linear projection.
#[derive(Debug, Clone)]
pub struct ImageEncoder {
    pub config: ImageEncoderConfig,
    convs: Vec<Conv2d>,
    proj: Linear,
}

impl ImageEncoder {
    pub fn new(vb: VarBuilder, cfg: &ImageEncoderConfig) -> Result<Self> {
        if cfg.channels.is_empty() {
            candle_core::bail!("image encoder: channels is empty");
        }
        let mut convs = Vec::new();
        let mut cin = 3;
        for (i, &c) in cfg.channels.iter().enumerate() {
            convs.push(Conv2d::new(vb.pp("convs").pp(i), cin, c, 3, 2, 1)?);
            cin = c;
        }
        Ok(Self {
            config: cfg.clone(),
            convs,
            proj: Linear::new(vb.pp("proj"), cin, cfg.embed_dim, true)?,
        })
    }

    /// # Shapes
    /// `[b, 3, H, W]` in [-1, 1] -> `[b, 1, embed_dim]`
    pub fn forward(&self, image: &Tensor) -> Result<Tensor> {
        let mut x = image.clone();
        for c in &self.convs {
            x = c.forward(&x)?.silu()?;
        }
        let pooled = x.flatten_from(2)?.mean(2)?;
        self.proj.forward(&pooled)?.unsqueeze(1)
    }
}
