//! Where a run computes: the spec's `device` and the candle device it opens. A base module, so
//! that specs, stages and training code can all name a device without importing each other.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// Device a run executes on; CUDA requires a build with the `cuda` feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    #[default]
    Cpu,
    Cuda,
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        })
    }
}

/// The candle device for a spec's `device`, or an error that says why CUDA cannot be used.
pub fn candle_device(d: Device) -> Result<candle_core::Device> {
    match d {
        Device::Cpu => Ok(candle_core::Device::Cpu),
        Device::Cuda => cuda_device(),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device() -> Result<candle_core::Device> {
    candle_core::Device::new_cuda(0).map_err(|e| {
        Error::Other(format!(
            "device `cuda`: this build has CUDA support but no GPU could be opened ({e}); use `cpu`"
        ))
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda_device() -> Result<candle_core::Device> {
    Err(Error::Other(
        "device `cuda`: this build of onestep has no CUDA backend; rebuild with `cargo build --release --features cuda` (needs nvcc) or use `cpu`".into(),
    ))
}

/// Whether `device = "cuda"` can work in this build (checked before a run starts).
pub fn cuda_compiled() -> bool {
    cfg!(feature = "cuda")
}

/// The dtype a stage's frozen networks compute in: its `dtype` key (the spec's top-level
/// `dtype` and `run --dtype` set it on every stage that has one). Half precision is
/// autocast-style (norms, softmax, timestep sinusoids and the sampler's state stay in f32; the
/// VAE always runs in f32). It covers the model an `fvd` stage evaluates, the teacher of the
/// distillation stages, the frozen base weights of a LoRA student (its adapters stay f32 master
/// weights) and every stage's preview samples. A fully fine-tuned student, the EMA target and
/// the discriminator train in f32. `f32` is the default and stays out of a stage's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    F16,
}

impl Precision {
    pub fn is_f32(&self) -> bool {
        *self == Precision::F32
    }
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Precision::F32 => candle_core::DType::F32,
            Precision::Bf16 => candle_core::DType::BF16,
            Precision::F16 => candle_core::DType::F16,
        }
    }
    /// An error where a half-precision *trained* network would need backward passes that
    /// candle's CPU backend lacks (conv2d and upsampling have none in f16/bf16): `what` names
    /// the stage and the network.
    pub fn check_trainable(self, device: &candle_core::Device, what: &str) -> Result<()> {
        if !self.is_f32() && device.is_cpu() {
            return Err(Error::Other(format!(
                "{what}: dtype = \"{self}\" trains a half-precision network, and candle's CPU \
                 backend has no f16/bf16 backward pass for conv2d or upsampling; use \
                 dtype = \"f32\" on the CPU (half precision is for `device = \"cuda\"`), or \
                 lora.rank = 0 (a fully fine-tuned student trains in f32 whatever dtype says)"
            )));
        }
        Ok(())
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        })
    }
}
