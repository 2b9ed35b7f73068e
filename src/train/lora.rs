//! The trainable student of the distillation stages: full fine-tuning of a UNet, or LoRA
//! adapters (Hu et al. 2021) on selected weights plus optionally some fully trained ones
//! (OSV trains LoRA in stage I and LoRA plus selected layers in stage II).
//!
//! With `rank > 0`, every weight whose name contains one of `targets` becomes
//! `W0 + (alpha / rank) B A` with `A: [rank, fan_in]` (normal, std 1/rank) and `B: [fan_out,
//! rank]` (zeros, so training starts at the teacher), `fan_in` being the product of the
//! weight's trailing dimensions (a convolution's `in x k x k`); weights whose names contain one
//! of `train_also` are trained in full; all others stay frozen constants. The UNet is rebuilt
//! from these each step (cheap next to a forward pass), so gradients reach `A`, `B` and the
//! fully trained weights. Export and the EMA target use the merged weights.

use crate::error::{Error, Result};
use crate::models::{UNetConfig, UNetSpatioTemporal};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

/// The spec's `lora` table (rank 0 = full fine-tuning).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    pub rank: usize,
    /// Scale numerator: the update is `(alpha / rank) B A` (0 = alpha equal to rank).
    pub alpha: f64,
    /// Substrings of the weight names that get adapters (diffusers' module paths).
    pub targets: Vec<String>,
    /// Substrings of parameter names trained in full alongside the adapters.
    pub train_also: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 0,
            alpha: 0.0,
            targets: [
                "to_q.weight",
                "to_k.weight",
                "to_v.weight",
                "to_out.0.weight",
            ]
            .map(String::from)
            .to_vec(),
            train_also: vec![],
        }
    }
}

struct Adapter {
    a: Var,
    b: Var,
    scale: f64,
}

struct Parts {
    base: HashMap<String, Tensor>,
    adapters: HashMap<String, Adapter>,
    full: HashMap<String, Var>,
}

/// The weight source of a LoRA student (frozen base, adapters, fully trained weights).
#[derive(Clone)]
pub struct Backend(Arc<Parts>);

impl Parts {
    fn weight(&self, name: &str) -> candle_core::Result<Tensor> {
        if let Some(v) = self.full.get(name) {
            let dt = self.base.get(name).map_or(DType::F32, |t| t.dtype());
            return v.as_tensor().to_dtype(dt);
        }
        let w0 = self
            .base
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("student: no weight `{name}`")))?;
        match self.adapters.get(name) {
            Some(ad) => {
                // Adapters are f32 master weights; the frozen base may be half precision.
                let delta = (ad.b.as_tensor().matmul(ad.a.as_tensor())? * ad.scale)?;
                w0 + delta.reshape(w0.shape())?.to_dtype(w0.dtype())?
            }
            None => Ok(w0.clone()),
        }
    }
}

impl candle_nn::var_builder::SimpleBackend for Backend {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _h: candle_nn::Init,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.0.weight(name)?;
        if t.shape() != &s {
            candle_core::bail!("student: `{name}` is {:?}, {:?} requested", t.shape(), s);
        }
        Ok(t)
    }
    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.weight(name)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.0.base.contains_key(name)
    }
}

fn unet_err(err: candle_core::Error) -> Error {
    Error::Other(format!("student UNet: {err}"))
}

/// A student UNet: full fine-tuning or LoRA.
pub enum Student {
    Full {
        map: VarMap,
        unet: UNetSpatioTemporal,
    },
    Lora {
        parts: Backend,
        cfg: UNetConfig,
        dev: Device,
    },
}

impl Student {
    /// From a UNet folder's weights (`weights` = its safetensors file). A LoRA student's frozen
    /// base is held in `dtype` (half precision needs CUDA: candle's CPU backend has no f16/bf16
    /// backward for conv2d); a fully fine-tuned one trains in f32 whatever `dtype` says.
    pub fn new(
        weights: &std::path::Path,
        cfg: &UNetConfig,
        lora: &LoraConfig,
        seed: u64,
        dev: &Device,
        dtype: crate::device::Precision,
    ) -> Result<Self> {
        if lora.rank == 0 {
            let map = VarMap::new();
            let unet = UNetSpatioTemporal::new(VarBuilder::from_varmap(&map, DType::F32, dev), cfg)
                .map_err(unet_err)?;
            crate::models::checkpoint::load_weights(&map, weights)?;
            return Ok(Student::Full { map, unet });
        }
        dtype.check_trainable(dev, "LoRA student")?;
        let base = candle_core::safetensors::load(weights, dev)
            .map_err(|err| Error::Data(format!("{}: {err}", weights.display())))?
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_dtype(dtype.dtype()).map_err(unet_err)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        Self::lora_from_base(base, cfg, lora, seed, dev)
    }

    /// A LoRA student (`lora.rank > 0`) over frozen base weights already in memory, in any
    /// dtype; the adapters and fully trained weights are f32.
    pub fn lora_from_base(
        base: HashMap<String, Tensor>,
        cfg: &UNetConfig,
        lora: &LoraConfig,
        seed: u64,
        dev: &Device,
    ) -> Result<Self> {
        if lora.rank == 0 {
            return Err(Error::Other("lora_from_base needs lora.rank > 0".into()));
        }
        let mut rng = crate::diffusion::noise::NormalRng::new(seed ^ 0x4c6f5241);
        let alpha = if lora.alpha > 0.0 {
            lora.alpha
        } else {
            lora.rank as f64
        };
        let mut names: Vec<&String> = base.keys().collect();
        names.sort();
        let mut adapters = HashMap::new();
        let mut full = HashMap::new();
        for name in names {
            let w = &base[name];
            if lora.train_also.iter().any(|t| name.contains(t.as_str())) {
                let w = w.to_dtype(DType::F32).map_err(unet_err)?;
                full.insert(name.clone(), Var::from_tensor(&w).map_err(unet_err)?);
            } else if w.rank() >= 2 && lora.targets.iter().any(|t| name.contains(t.as_str())) {
                let out = w.dim(0).map_err(unet_err)?;
                let fan_in = w.elem_count() / out;
                let r = lora.rank;
                let a: Vec<f32> = (0..r * fan_in)
                    .map(|_| (rng.normal() / r as f64) as f32)
                    .collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (r, fan_in), dev).map_err(unet_err)?)
                    .map_err(unet_err)?;
                let b = Var::zeros((out, r), DType::F32, dev).map_err(unet_err)?;
                adapters.insert(
                    name.clone(),
                    Adapter {
                        a,
                        b,
                        scale: alpha / r as f64,
                    },
                );
            }
        }
        if adapters.is_empty() {
            return Err(Error::Data(format!(
                "lora.targets {:?} match no weight of the UNet",
                lora.targets
            )));
        }
        Ok(Student::Lora {
            parts: Backend(Arc::new(Parts {
                base,
                adapters,
                full,
            })),
            cfg: cfg.clone(),
            dev: dev.clone(),
        })
    }

    /// The trainable variables, by name (`lora.<weight>.A` / `.B` for adapters).
    pub fn vars(&self) -> Vec<(String, Var)> {
        match self {
            Student::Full { map, .. } => crate::train::optim::named_vars(map),
            Student::Lora { parts, .. } => {
                let mut v: Vec<(String, Var)> = parts
                    .0
                    .adapters
                    .iter()
                    .flat_map(|(n, ad)| {
                        [
                            (format!("lora.{n}.A"), ad.a.clone()),
                            (format!("lora.{n}.B"), ad.b.clone()),
                        ]
                    })
                    .chain(parts.0.full.iter().map(|(n, v)| (n.clone(), v.clone())))
                    .collect();
                v.sort_by(|a, b| a.0.cmp(&b.0));
                v
            }
        }
    }

    /// The UNet with the current weights (built anew for LoRA, so gradients reach the adapters).
    pub fn unet(&self) -> Result<std::borrow::Cow<'_, UNetSpatioTemporal>> {
        match self {
            Student::Full { unet, .. } => Ok(std::borrow::Cow::Borrowed(unet)),
            Student::Lora { parts, cfg, dev } => {
                let vb = VarBuilder::from_backend(Box::new(parts.clone()), DType::F32, dev.clone());
                Ok(std::borrow::Cow::Owned(
                    UNetSpatioTemporal::new(vb, cfg)
                        .map_err(|e| Error::Other(format!("student UNet: {e}")))?,
                ))
            }
        }
    }

    /// Every weight with adapters merged in, detached (export, EMA target).
    pub fn merged(&self) -> Result<HashMap<String, Tensor>> {
        match self {
            Student::Full { map, .. } => Ok(crate::train::optim::named_vars(map)
                .into_iter()
                .map(|(n, v)| (n, v.as_tensor().detach()))
                .collect()),
            Student::Lora { parts, .. } => parts
                .0
                .base
                .keys()
                .map(|n| {
                    Ok((
                        n.clone(),
                        parts
                            .0
                            .weight(n)
                            .map_err(|e| Error::Other(e.to_string()))?
                            .detach(),
                    ))
                })
                .collect(),
        }
    }

    /// Write the merged weights as a diffusers-layout UNet folder.
    pub fn export(&self, dir: &std::path::Path, cfg: &UNetConfig) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        crate::models::checkpoint::save_tensors(
            &dir.join(crate::models::checkpoint::WEIGHTS_FILE),
            &self.merged()?,
        )?;
        let text = serde_json::to_string_pretty(cfg).map_err(|e| Error::Other(e.to_string()))?;
        crate::util::atomic_write(
            &dir.join(crate::models::checkpoint::CONFIG_FILE),
            (text + "\n").as_bytes(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_starts_at_the_base_trains_only_adapters_and_merges() {
        let dev = Device::Cpu;
        let cfg = UNetConfig::tiny();
        let map = VarMap::new();
        let unet =
            UNetSpatioTemporal::new(crate::train::seeded_varbuilder(&map, 3, &dev), &cfg).unwrap();
        drop(unet);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("w.safetensors");
        let base: HashMap<String, Tensor> = crate::train::optim::named_vars(&map)
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        crate::models::checkpoint::save_tensors(&f, &base).unwrap();
        let lora = LoraConfig {
            rank: 2,
            train_also: vec!["conv_out".into()],
            ..Default::default()
        };
        let s = Student::new(&f, &cfg, &lora, 0, &dev, crate::device::Precision::F32).unwrap();
        let vars = s.vars();
        assert!(vars.iter().any(|(n, _)| n.ends_with("to_q.weight.A")));
        assert!(vars.iter().any(|(n, _)| n == "conv_out.weight"));
        let trainable: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
        let total: usize = base.values().map(|t| t.elem_count()).sum();
        assert!(trainable * 10 < total, "{trainable} of {total} trainable");
        // B = 0: the merged weights are the base weights.
        let merged = s.merged().unwrap();
        for (n, w) in &base {
            let d = (w - &merged[n]).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "{n}");
        }
        // Gradients reach the adapters and the fully trained layer, nothing else.
        let unet = s.unet().unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 2, 8, 4, 4), &dev).unwrap();
        let out = unet
            .forward(
                &x,
                &Tensor::new(&[0.5f32], &dev).unwrap(),
                &Tensor::randn(0f32, 1.0, (1, 1, 64), &dev).unwrap(),
                &Tensor::new(&[[7f32, 127.0, 0.02]], &dev).unwrap(),
            )
            .unwrap();
        let grads = out.sqr().unwrap().mean_all().unwrap().backward().unwrap();
        for (n, v) in &vars {
            // A's gradient is zero while B = 0, but it is computed; B's is not zero.
            let g = grads.get(v.as_tensor());
            assert!(g.is_some(), "{n} got no gradient");
        }
        let b = vars
            .iter()
            .find(|(n, _)| n.ends_with("to_q.weight.B"))
            .unwrap();
        let gb = grads
            .get(b.1.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(gb.to_scalar::<f32>().unwrap() > 0.0);
        // A change of B shows up in the merged target weight only.
        b.1.set(&b.1.as_tensor().ones_like().unwrap()).unwrap();
        let merged = s.merged().unwrap();
        let name = b.0.trim_start_matches("lora.").trim_end_matches(".B");
        let d = (&base[name] - &merged[name])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(d.to_scalar::<f32>().unwrap() > 0.0);
        let other = "conv_in.weight";
        let d = (&base[other] - &merged[other])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
    }
}

/// A student's UNet run with gradient checkpointing (see [`crate::models::grad_checkpoint`]), as the
/// teacher-parameterised denoiser of the student: built anew each step by
/// [`Student::checkpointed`]; after the loss's backward pass, [`Self::merge_into`] adds the
/// gradients found inside the checkpointed units.
pub struct CheckpointedUNet {
    trainable: Arc<UNetSpatioTemporal>,
    frozen: Arc<UNetSpatioTemporal>,
    ckpt: crate::models::grad_checkpoint::Checkpointing,
}

impl CheckpointedUNet {
    pub fn merge_into(&self, grads: &mut candle_core::backprop::GradStore) -> Result<()> {
        self.ckpt
            .merge_into(grads)
            .map_err(|e| Error::Other(format!("gradient checkpointing: {e}")))
    }
}

impl crate::diffusion::Denoiser for CheckpointedUNet {
    fn denoise(
        &self,
        x: &Tensor,
        sigma: &Tensor,
        cond: &crate::diffusion::Conditioning,
    ) -> candle_core::Result<Tensor> {
        crate::diffusion::SvdDenoiser::denoise_via(
            x,
            sigma,
            cond,
            self.trainable.dtype(),
            &|m, t, e, i| {
                UNetSpatioTemporal::forward_checkpointed(
                    &self.trainable,
                    &self.frozen,
                    &self.ckpt,
                    m,
                    t,
                    e,
                    i,
                )
            },
        )
    }
}

/// The student's denoiser for one training step: its UNet as it is, or run with gradient
/// checkpointing (see [`Student::for_step`]).
pub enum StepUNet<'a> {
    Plain(std::borrow::Cow<'a, UNetSpatioTemporal>),
    Checkpointed(CheckpointedUNet),
}

impl StepUNet<'_> {
    /// Adds the gradients found inside checkpointed units to the loss's `grads` (nothing to add
    /// without checkpointing).
    pub fn merge_into(&self, grads: &mut candle_core::backprop::GradStore) -> Result<()> {
        match self {
            StepUNet::Plain(_) => Ok(()),
            StepUNet::Checkpointed(c) => c.merge_into(grads),
        }
    }
}

impl crate::diffusion::Denoiser for StepUNet<'_> {
    fn denoise(
        &self,
        x: &Tensor,
        sigma: &Tensor,
        cond: &crate::diffusion::Conditioning,
    ) -> candle_core::Result<Tensor> {
        match self {
            StepUNet::Plain(unet) => {
                crate::diffusion::SvdDenoiser { unet: &**unet }.denoise(x, sigma, cond)
            }
            StepUNet::Checkpointed(c) => c.denoise(x, sigma, cond),
        }
    }
}

impl Student {
    /// The student's teacher-parameterised denoiser for one training step, with gradient
    /// checkpointing or without; after the loss's backward pass, call
    /// [`StepUNet::merge_into`] on its gradients.
    pub fn for_step(&self, checkpointing: bool) -> Result<StepUNet<'_>> {
        Ok(match checkpointing {
            true => StepUNet::Checkpointed(self.checkpointed()?),
            false => StepUNet::Plain(self.unet()?),
        })
    }

    /// The student's UNet with gradient checkpointing: the same function and gradients as
    /// [`Self::unet`] with [`crate::diffusion::SvdDenoiser`], holding one UNet unit's
    /// intermediates at a time instead of all of them, for a second forward pass per unit.
    pub fn checkpointed(&self) -> Result<CheckpointedUNet> {
        let trainable = Arc::new(self.unet()?.into_owned());
        let frozen = UNetSpatioTemporal::new(
            VarBuilder::from_tensors(self.merged()?, trainable.dtype(), &self.device()),
            &trainable.config,
        )
        .map_err(unet_err)?;
        let vars = self.vars().into_iter().map(|(_, v)| v).collect();
        Ok(CheckpointedUNet {
            trainable,
            frozen: Arc::new(frozen),
            ckpt: crate::models::grad_checkpoint::Checkpointing::new(vars).map_err(unet_err)?,
        })
    }

    fn device(&self) -> Device {
        match self {
            Student::Full { map, .. } => crate::train::optim::named_vars(map)
                .first()
                .map(|(_, v)| v.device().clone())
                .unwrap_or(Device::Cpu),
            Student::Lora { dev, .. } => dev.clone(),
        }
    }
}
