//! onestep: a research framework for one-step image-to-video generation (a reproduction of
//! OSV, Mao et al., arXiv 2409.11367, with its baselines and ablations).
//!
//! Data flows spec -> plan -> stages -> store -> report: [`spec`] loads and validates
//! experiment files, [`plan`] turns them into runs of content-addressed stages, [`runner`]
//! executes them against the [`store`] and the stage cache (or [`cluster`] hands the graph's
//! nodes to worker processes or Slurm), and [`export`] reads the store back.

pub mod alloc;
pub mod assets;
pub mod cluster;
pub mod data;
pub mod device;
pub mod diffusion;
pub mod distill;
pub mod error;
pub mod export;
pub mod metrics;
pub mod models;
pub mod pipeline;
pub mod plan;
pub mod progress;
pub mod report;
pub mod runner;
// The folder is not `spec/`: many tools (RSpec's convention) take a folder of that name for
// tests and leave it out of the code they read.
#[path = "specification/mod.rs"]
pub mod spec;
pub mod stages;
pub mod store;
pub mod train;
pub mod util;

pub use error::{Error, Result};
