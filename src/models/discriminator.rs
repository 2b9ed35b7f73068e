//! OSV's spatio-temporal video discriminator over latent videos.
//!
//! Input path (`input`): `"upsampler"`, the paper's decoder-free path, a trainable sub-pixel
//! upsampler (Conv2d to `3 r^2` channels, PixelShuffle with `r = upsample_factor`, 4 in the
//! paper) that turns each frame's latent into an image for the backbone; or `"decoder"`, the
//! frozen VAE decoder (latents / scaling factor, decoded clip by clip with its temporal layers);
//! or `"latent"`, the SF-V-style baseline (Zhang et al. 2024): no images at all, the latents
//! are noised to `backbone.noise_sigma` and fed with the batch's conditioning to the frozen
//! teacher UNet's encoder (backbone `"teacher_unet"`, layers: every down block, then the mid
//! block; see [`crate::models::UNetSpatioTemporal::encoder_features`]). SF-V draws the noise
//! level per step; a fixed level is our simplification.
//!
//! Backbone: an image network applied to every frame, whose intermediate features at
//! `feature_layers` feed heads. `"efficientnet_lite0"`: the frozen ImageNet EfficientNet-Lite0
//! ([`super::efficientnet`]; layers are its 16 blocks; images in [-1, 1] are mapped to its
//! `(x - 127) / 128` input convention), the pretrained backbone obtainable here (the paper uses
//! DINOv2). `"dinov2"`: the paper's backbone, a frozen DINOv2 ViT ([`super::dinov2`]) from a
//! Hugging Face model folder the user brings (`path`); images are resized bilinearly to
//! `image_size` (224 by default, as DINOv2 was trained) and ImageNet-normalised, layers are its
//! transformer layers and their patch tokens are the feature maps. `"conv"`: strided 3x3 convolution stages with SiLU, randomly initialised from the
//! seed, trainable or frozen (`trainable`; the ablation of a non-pretrained backbone). A frozen
//! backbone's weights are constants, not variables: no gradient is computed for them, while
//! gradients still flow through them to the heads and the upsampler.
//!
//! Heads, per feature layer (`heads`): *spatial* heads see features as `(b*t, c, h, w)` and run
//! Conv2d -> ResBlock2d -> Conv2d to one logit per position; *temporal* heads see them as
//! `(b*h*w, c, t)` and run Conv1d -> ResBlock1d -> Conv1d over time (as convolutions over the
//! time axis of `[b, c, t, h, w]`, which is the same computation). Every head returns its logits
//! flattened per sample, `[b, n]`.

use super::layers::{Conv2d, TemporalConv};
use super::AutoencoderKLTemporalDecoder;
use crate::diffusion::{Conditioning, SvdDenoiser};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiscInput {
    Upsampler,
    Decoder,
    Latent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadKinds {
    Spatial,
    Temporal,
    Both,
}

/// The discriminator's feature network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackboneKind {
    /// Strided convolution stages, randomly initialised (frozen or trained).
    Conv,
    /// The pretrained ImageNet EfficientNet-Lite0, frozen.
    #[serde(rename = "efficientnet_lite0")]
    EfficientNetLite0,
    /// A pretrained DINOv2 ViT from `path`, frozen (the paper's backbone).
    Dinov2,
    /// The frozen teacher UNet's encoder on noised latents (SF-V).
    TeacherUnet,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackboneConfig {
    pub kind: BackboneKind,
    /// `dinov2`: the model folder (`config.json` + `model.safetensors`, Hugging Face layout).
    /// (Keys added after the first release are left out of the resolved spec while at their
    /// defaults, so existing stages keep their identity and cache.)
    #[serde(skip_serializing_if = "String::is_empty")]
    pub path: String,
    /// `dinov2`: images are resized to `image_size x image_size` (a multiple of the patch size).
    #[serde(skip_serializing_if = "is_default_image_size")]
    pub image_size: usize,
    /// `teacher_unet`: the noise level (EDM sigma) real and generated latents are noised to
    /// before the UNet encoder sees them.
    #[serde(skip_serializing_if = "is_default_noise_sigma")]
    pub noise_sigma: f64,
    /// `conv`: output channels of each stage (each halves the resolution).
    pub channels: Vec<usize>,
    /// Train the backbone with the heads (true) or keep it frozen (false).
    pub trainable: bool,
}

fn is_default_image_size(v: &usize) -> bool {
    *v == 224
}

fn is_default_noise_sigma(v: &f64) -> bool {
    *v == 1.0
}

impl Default for BackboneConfig {
    fn default() -> Self {
        Self {
            kind: BackboneKind::Conv,
            path: String::new(),
            image_size: 224,
            noise_sigma: 1.0,
            channels: vec![32, 64, 96],
            trainable: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscriminatorConfig {
    pub input: DiscInput,
    /// PixelShuffle factor r of the upsampler.
    pub upsample_factor: usize,
    pub backbone: BackboneConfig,
    /// Backbone stages (0-based) whose outputs feed heads.
    pub feature_layers: Vec<usize>,
    pub heads: HeadKinds,
    /// Channels inside the heads.
    pub head_channels: usize,
}

impl Default for DiscriminatorConfig {
    fn default() -> Self {
        Self {
            input: DiscInput::Upsampler,
            upsample_factor: 4,
            backbone: BackboneConfig::default(),
            feature_layers: vec![1, 2],
            heads: HeadKinds::Both,
            head_channels: 64,
        }
    }
}

impl DiscriminatorConfig {
    /// Channels of each backbone layer (`dinov2` reads them from the model's `config.json`;
    /// `teacher_unet`'s depend on the teacher and are known only when it is loaded: `None`).
    pub fn layer_channels(&self) -> std::result::Result<Option<Vec<usize>>, String> {
        Ok(Some(match self.backbone.kind {
            BackboneKind::TeacherUnet => return Ok(None),
            BackboneKind::EfficientNetLite0 => super::efficientnet::block_channels(),
            BackboneKind::Dinov2 => {
                let c = self.dinov2_config()?;
                vec![c.hidden_size; c.num_hidden_layers]
            }
            BackboneKind::Conv => self.backbone.channels.clone(),
        }))
    }

    fn dinov2_config(&self) -> std::result::Result<super::dinov2::Dinov2Config, String> {
        if self.backbone.path.trim().is_empty() {
            return Err(
                "backbone.kind = \"dinov2\" needs backbone.path, a DINOv2 model folder \
                 (config.json + model.safetensors in the Hugging Face layout)"
                    .into(),
            );
        }
        super::dinov2::Dinov2Config::load(std::path::Path::new(&self.backbone.path))
            .map_err(|e| format!("backbone.path: {e}"))
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        match self.backbone.kind {
            BackboneKind::Conv => {
                if self.backbone.channels.is_empty() {
                    return Err("backbone.channels is empty".into());
                }
            }
            BackboneKind::EfficientNetLite0 => {
                if self.backbone.trainable {
                    return Err(
                        "backbone.trainable = true: the pretrained EfficientNet-Lite0 is frozen"
                            .into(),
                    );
                }
            }
            BackboneKind::Dinov2 => {
                if self.backbone.trainable {
                    return Err("backbone.trainable = true: the pretrained DINOv2 is frozen".into());
                }
                let c = self.dinov2_config()?;
                let s = self.backbone.image_size;
                if s < c.patch_size || s % c.patch_size != 0 {
                    return Err(format!(
                        "backbone.image_size = {s}: must be a positive multiple of the patch size {}",
                        c.patch_size
                    ));
                }
            }
            BackboneKind::TeacherUnet => {
                if self.backbone.trainable {
                    return Err(
                        "backbone.trainable = true: the teacher's UNet encoder is frozen".into(),
                    );
                }
                if self.input != DiscInput::Latent {
                    return Err(
                        "backbone.kind = \"teacher_unet\" sees latents: set input = \"latent\""
                            .into(),
                    );
                }
                if !(self.backbone.noise_sigma >= 0.0 && self.backbone.noise_sigma.is_finite()) {
                    return Err("backbone.noise_sigma must be a finite sigma >= 0".into());
                }
            }
        }
        if self.feature_layers.is_empty() {
            return Err("feature_layers is empty: no head would see anything".into());
        }
        if self.input == DiscInput::Latent && self.backbone.kind != BackboneKind::TeacherUnet {
            return Err("input = \"latent\" needs backbone.kind = \"teacher_unet\"".into());
        }
        if let Some(chans) = self.layer_channels()? {
            check_layers(&self.feature_layers, chans.len())?;
        }
        if self.upsample_factor == 0 {
            return Err("upsample_factor must be at least 1".into());
        }
        Ok(())
    }
}

fn check_layers(layers: &[usize], n: usize) -> std::result::Result<(), String> {
    match layers.iter().find(|&&l| l >= n) {
        Some(l) => Err(format!(
            "feature_layers holds {l} but the backbone has {n} layers"
        )),
        None => Ok(()),
    }
}

/// `torch.nn.PixelShuffle(r)`: `[n, c r^2, h, w]` -> `[n, c, h r, w r]`.
pub fn pixel_shuffle(x: &Tensor, r: usize) -> Result<Tensor> {
    let (n, crr, h, w) = x.dims4()?;
    let c = crr / (r * r);
    x.reshape((n, c, r, r, h, w))?
        .permute((0, 1, 4, 2, 5, 3))?
        .reshape((n, c, h * r, w * r))
}

/// Strided convolution stages with SiLU.
#[derive(Debug, Clone)]
pub struct ConvBackbone {
    stages: Vec<(Conv2d, Conv2d)>,
}

impl ConvBackbone {
    pub fn new(vb: VarBuilder, channels: &[usize]) -> Result<Self> {
        let mut cin = 3;
        let mut stages = Vec::new();
        for (i, &c) in channels.iter().enumerate() {
            let v = vb.pp(format!("stages.{i}"));
            stages.push((
                Conv2d::new(v.pp("conv1"), cin, c, 3, 2, 1)?,
                Conv2d::new(v.pp("conv2"), c, c, 3, 1, 1)?,
            ));
            cin = c;
        }
        Ok(Self { stages })
    }

    /// Features after each stage.
    pub fn features(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let mut out = Vec::with_capacity(self.stages.len());
        let mut h = x.clone();
        for (a, b) in &self.stages {
            h = b.forward(&a.forward(&h)?.silu()?)?.silu()?;
            out.push(h.clone());
        }
        Ok(out)
    }
}

#[derive(Debug, Clone)]
struct SpatialHead {
    conv_in: Conv2d,
    res1: Conv2d,
    res2: Conv2d,
    conv_out: Conv2d,
}

impl SpatialHead {
    fn new(vb: VarBuilder, cin: usize, ch: usize) -> Result<Self> {
        Ok(Self {
            conv_in: Conv2d::new(vb.pp("conv_in"), cin, ch, 3, 1, 1)?,
            res1: Conv2d::new(vb.pp("res.conv1"), ch, ch, 3, 1, 1)?,
            res2: Conv2d::new(vb.pp("res.conv2"), ch, ch, 3, 1, 1)?,
            conv_out: Conv2d::new(vb.pp("conv_out"), ch, 1, 1, 1, 0)?,
        })
    }

    /// `[b t, c, h, w]` -> `[b, t h w]`
    fn forward(&self, f: &Tensor, b: usize) -> Result<Tensor> {
        let h = self.conv_in.forward(f)?.silu()?;
        let r = self.res2.forward(&self.res1.forward(&h)?.silu()?)?;
        let h = (h + r)?.silu()?;
        self.conv_out.forward(&h)?.reshape((b, ()))
    }
}

#[derive(Debug, Clone)]
struct TemporalHead {
    conv_in: TemporalConv,
    res1: TemporalConv,
    res2: TemporalConv,
    conv_out: TemporalConv,
}

impl TemporalHead {
    fn new(vb: VarBuilder, cin: usize, ch: usize) -> Result<Self> {
        Ok(Self {
            conv_in: TemporalConv::new(vb.pp("conv_in"), cin, ch, 3)?,
            res1: TemporalConv::new(vb.pp("res.conv1"), ch, ch, 3)?,
            res2: TemporalConv::new(vb.pp("res.conv2"), ch, ch, 3)?,
            conv_out: TemporalConv::new(vb.pp("conv_out"), ch, 1, 1)?,
        })
    }

    /// `[b t, c, h, w]` -> `[b, t h w]`
    fn forward(&self, f: &Tensor, b: usize) -> Result<Tensor> {
        let (bt, c, hh, ww) = f.dims4()?;
        let t = bt / b;
        let x = f.reshape((b, t, c, hh, ww))?.permute((0, 2, 1, 3, 4))?;
        let h = self.conv_in.forward(&x)?.silu()?;
        let r = self.res2.forward(&self.res1.forward(&h)?.silu()?)?;
        let h = (h + r)?.silu()?;
        self.conv_out.forward(&h)?.reshape((b, ()))
    }
}

/// A backbone: per-frame images `[n, 3, H, W]` in [-1, 1] to features of every layer.
pub enum Backbone {
    Conv(ConvBackbone),
    EfficientNet(Box<super::efficientnet::EfficientNetLite0>),
    /// DINOv2 and the square size images are resized to.
    Dinov2(Box<super::dinov2::Dinov2>, usize),
    /// The frozen teacher UNet's encoder on noised latents (SF-V) and the noise level.
    TeacherUnet(Box<super::UNetSpatioTemporal>, f64),
}

impl Backbone {
    /// Features of every layer up to `upto` (exclusive) at least: the EfficientNet stops after
    /// that block (layers beyond it feed no head).
    pub fn features(&self, x: &Tensor, upto: usize) -> Result<Vec<Tensor>> {
        match self {
            Backbone::Conv(c) => c.features(x),
            // [-1, 1] -> (255 (x + 1) / 2 - 127) / 128
            Backbone::EfficientNet(e) => {
                e.blocks_upto(&((x * (127.5 / 128.0))? + 0.5 / 128.0)?, upto)
            }
            Backbone::Dinov2(d, size) => d.features(&super::dinov2::resize_square(x, *size)?),
            Backbone::TeacherUnet(..) => Err(candle_core::Error::Msg(
                "the teacher_unet backbone sees latents with their conditioning, not images".into(),
            )),
        }
    }
}

/// The discriminator.
pub struct Discriminator {
    pub config: DiscriminatorConfig,
    upsampler: Option<Conv2d>,
    backbone: Backbone,
    heads: Vec<(usize, Option<SpatialHead>, Option<TemporalHead>)>,
}

impl Discriminator {
    /// `vb` holds the trainable parts (upsampler and heads); `backbone` is built by the caller
    /// (from `vb` when it trains, from constants when it is frozen).
    pub fn new(
        vb: VarBuilder,
        backbone: Backbone,
        cfg: &DiscriminatorConfig,
        latent_channels: usize,
    ) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::Msg)?;
        let r = cfg.upsample_factor;
        let upsampler = match cfg.input {
            DiscInput::Upsampler => Some(Conv2d::new(
                vb.pp("upsampler.conv"),
                latent_channels,
                3 * r * r,
                3,
                1,
                1,
            )?),
            DiscInput::Decoder | DiscInput::Latent => None,
        };
        let chans = match (
            &backbone,
            cfg.layer_channels().map_err(candle_core::Error::Msg)?,
        ) {
            (Backbone::TeacherUnet(u, _), _) => u.config.encoder_channels(),
            (_, Some(c)) => c,
            (_, None) => {
                return Err(candle_core::Error::Msg(
                    "backbone.kind = \"teacher_unet\" needs the teacher's UNet as its backbone"
                        .into(),
                ))
            }
        };
        check_layers(&cfg.feature_layers, chans.len()).map_err(candle_core::Error::Msg)?;
        let mut heads = Vec::new();
        for &l in &cfg.feature_layers {
            let c = chans[l];
            let v = vb.pp(format!("heads.{l}"));
            let s = matches!(cfg.heads, HeadKinds::Spatial | HeadKinds::Both)
                .then(|| SpatialHead::new(v.pp("spatial"), c, cfg.head_channels))
                .transpose()?;
            let t = matches!(cfg.heads, HeadKinds::Temporal | HeadKinds::Both)
                .then(|| TemporalHead::new(v.pp("temporal"), c, cfg.head_channels))
                .transpose()?;
            heads.push((l, s, t));
        }
        Ok(Self {
            config: cfg.clone(),
            upsampler,
            backbone,
            heads,
        })
    }

    /// Latents `[b, t, c, h, w]` to backbone images `[b t, 3, H, W]` in roughly [-1, 1].
    /// `vae` is used (and required) only on the decoder path.
    pub fn images(&self, z: &Tensor, vae: Option<&AutoencoderKLTemporalDecoder>) -> Result<Tensor> {
        let (b, t, c, h, w) = z.dims5()?;
        let flat = z.reshape((b * t, c, h, w))?;
        match &self.upsampler {
            Some(up) => pixel_shuffle(&up.forward(&flat)?, self.config.upsample_factor),
            None => {
                let vae = vae.ok_or_else(|| {
                    candle_core::Error::Msg("the decoder input path needs the VAE".into())
                })?;
                vae.decode(&(flat / vae.config.scaling_factor)?, t)
            }
        }
    }

    /// Logits of every head, each `[b, n]`.
    pub fn forward(
        &self,
        z: &Tensor,
        vae: Option<&AutoencoderKLTemporalDecoder>,
    ) -> Result<Vec<Tensor>> {
        self.forward_cond(z, vae, None)
    }

    /// [`Self::forward`] with the batch's conditioning and a unit-variance noise sample shaped
    /// like `z`, which the `"latent"` input (the teacher UNet backbone) needs: the latents are
    /// noised to `z + noise_sigma * noise` and encoded with the conditioning.
    pub fn forward_cond(
        &self,
        z: &Tensor,
        vae: Option<&AutoencoderKLTemporalDecoder>,
        cond: Option<(&Conditioning, &Tensor)>,
    ) -> Result<Vec<Tensor>> {
        let b = z.dim(0)?;
        let feats = match &self.backbone {
            Backbone::TeacherUnet(unet, sigma) => {
                let (cond, noise) = cond.ok_or_else(|| {
                    candle_core::Error::Msg(
                        "the teacher_unet backbone needs the batch's conditioning".into(),
                    )
                })?;
                let x = (z + (noise * *sigma)?)?;
                let s = Tensor::full(sigma.max(1e-3) as f32, b, z.device())?;
                SvdDenoiser { unet: &**unet }.encoder_features(&x, &s, cond)?
            }
            _ => {
                let upto = self.heads.iter().map(|(l, ..)| l + 1).max().unwrap_or(1);
                self.backbone.features(&self.images(z, vae)?, upto)?
            }
        };
        let mut out = Vec::new();
        for (l, s, t) in &self.heads {
            if let Some(s) = s {
                out.push(s.forward(&feats[*l], b)?);
            }
            if let Some(t) = t {
                out.push(t.forward(&feats[*l], b)?);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn decoder_path_needs_the_vae_and_upsampler_path_does_not() {
        let dev = Device::Cpu;
        for input in [DiscInput::Decoder, DiscInput::Upsampler] {
            let cfg = DiscriminatorConfig {
                input,
                backbone: BackboneConfig {
                    channels: vec![8],
                    trainable: true,
                    ..Default::default()
                },
                feature_layers: vec![0],
                head_channels: 8,
                ..Default::default()
            };
            let map = VarMap::new();
            let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
            let bb = Backbone::Conv(ConvBackbone::new(vb.pp("backbone"), &[8]).unwrap());
            let d = Discriminator::new(vb, bb, &cfg, 4).unwrap();
            let z = Tensor::zeros((1, 2, 4, 4, 4), DType::F32, &dev).unwrap();
            let r = d.forward(&z, None);
            match input {
                DiscInput::Decoder => assert!(r.unwrap_err().to_string().contains("needs the VAE")),
                DiscInput::Upsampler => assert!(r.is_ok()),
                DiscInput::Latent => unreachable!("not in this test"),
            }
            let has_upsampler = map
                .data()
                .lock()
                .unwrap()
                .keys()
                .any(|k| k.starts_with("upsampler"));
            assert_eq!(has_upsampler, input == DiscInput::Upsampler);
        }
    }

    #[test]
    fn pixel_shuffle_matches_torch_layout() {
        // torch: out[0, c, h*r + i, w*r + j] = in[0, c*r*r + i*r + j, h, w]
        let r = 2;
        let x = Tensor::arange(0f32, 2.0 * 4.0 * 6.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 8, 2, 3))
            .unwrap();
        let y = pixel_shuffle(&x, r).unwrap();
        assert_eq!(y.dims(), &[1, 2, 4, 6]);
        let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let yv = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for c in 0..2 {
            for h in 0..2 {
                for w in 0..3 {
                    for i in 0..r {
                        for j in 0..r {
                            let src = ((c * 4 + i * 2 + j) * 2 + h) * 3 + w;
                            let dst = (c * 4 + h * r + i) * 6 + w * r + j;
                            assert_eq!(yv[dst], xv[src]);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn frozen_backbone_gets_no_gradient_and_heads_do() {
        let dev = Device::Cpu;
        let cfg = DiscriminatorConfig {
            backbone: BackboneConfig {
                channels: vec![8, 8],
                ..Default::default()
            },
            feature_layers: vec![0, 1],
            head_channels: 8,
            ..Default::default()
        };
        // Frozen: backbone weights from a separate map, turned into constants.
        let bb_map = VarMap::new();
        ConvBackbone::new(
            VarBuilder::from_varmap(&bb_map, DType::F32, &dev).pp("backbone"),
            &cfg.backbone.channels,
        )
        .unwrap();
        let consts: std::collections::HashMap<String, Tensor> = bb_map
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect();
        let frozen = VarBuilder::from_tensors(consts.clone(), DType::F32, &dev);
        let backbone = Backbone::Conv(
            ConvBackbone::new(frozen.pp("backbone"), &cfg.backbone.channels).unwrap(),
        );
        let map = VarMap::new();
        let d = Discriminator::new(
            VarBuilder::from_varmap(&map, DType::F32, &dev),
            backbone,
            &cfg,
            4,
        )
        .unwrap();
        let z = Tensor::randn(0f32, 1.0, (2, 3, 4, 4, 4), &dev).unwrap();
        // The upsampler path runs without any VAE: it cannot call the decoder.
        let logits = d.forward(&z, None).unwrap();
        assert_eq!(d.images(&z, None).unwrap().dims(), &[6, 3, 16, 16]);
        assert_eq!(logits.len(), 4, "2 layers x (spatial, temporal)");
        let loss = logits
            .iter()
            .map(|l| l.mean_all().unwrap())
            .reduce(|a, b| (a + b).unwrap())
            .unwrap();
        let grads = loss.backward().unwrap();
        let vars = map.data().lock().unwrap();
        for (name, v) in vars.iter() {
            let g = grads.get(v.as_tensor());
            assert!(g.is_some(), "{name} has no gradient");
        }
        assert!(vars.keys().any(|k| k.starts_with("upsampler.")));
        assert!(vars.keys().all(|k| !k.starts_with("backbone.")));
        for (name, t) in &consts {
            assert!(grads.get(t).is_none(), "frozen {name} got a gradient");
        }
    }
}
