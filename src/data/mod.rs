//! Video clip data: the clip-set file format, procedural synthetic video, real footage from
//! package registries, and decoding with ffmpeg.

pub mod clips;
pub mod registry;
pub mod synthetic;
pub mod video;

pub use clips::{ClipSet, ClipStats};
