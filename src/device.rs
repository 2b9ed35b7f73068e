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
