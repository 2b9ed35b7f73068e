//! Diffusion: EDM preconditioning in SVD's v-prediction form and its training loss
//! ([`edm`]), the one interface every generator is used through ([`denoiser`]), and the
//! samplers over it ([`sampler`]).

pub mod consistency;
pub mod denoiser;
pub mod edm;
pub mod noise;
pub mod sampler;

pub use consistency::{ConsistencyDenoiser, ConsistencyParam};
pub use denoiser::{Conditioning, Denoiser, SvdBackbone, SvdDenoiser};
pub use edm::{EdmLoss, Scalings};
pub use sampler::{karras_sigmas, sample, SamplerConfig, SamplerMethod};
