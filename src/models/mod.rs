//! The networks of onestep: SVD's temporal VAE and spatio-temporal UNet (diffusers' module
//! trees and parameter names), the small image encoder that stands in for CLIP at CPU scale,
//! and checkpoints in diffusers' folder layout.

pub mod checkpoint;
pub mod clip;
pub mod dinov2;
pub mod discriminator;
pub mod efficientnet;
pub mod fused;
pub mod grad_checkpoint;
pub mod image_encoder;
pub mod layers;
pub mod resnet;
pub mod transformer;
pub mod unet;
pub mod vae;

pub use checkpoint::{load_component, save_component};
pub use discriminator::{Discriminator, DiscriminatorConfig};
pub use image_encoder::{ImageEncoder, ImageEncoderConfig};
pub use unet::{UNetConfig, UNetSpatioTemporal};
pub use vae::{AutoencoderKLTemporalDecoder, VaeConfig};

use serde::{Deserialize, Serialize};

/// A diffusers config value that is either one number for every level or one per level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(usize),
    Many(Vec<usize>),
}

impl OneOrMany {
    /// The value at level `i` of `n` levels.
    pub fn at(&self, i: usize, n: usize) -> Result<usize, String> {
        match self {
            OneOrMany::One(v) => Ok(*v),
            OneOrMany::Many(v) if v.len() == n => Ok(v[i]),
            OneOrMany::Many(v) => Err(format!("has {} values for {n} levels", v.len())),
        }
    }
}
