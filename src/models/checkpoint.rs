//! Model checkpoints in diffusers' folder layout: `<dir>/<component>/config.json` and
//! `<dir>/<component>/diffusion_pytorch_model.safetensors`, parameter names being module paths.
//! A folder of a diffusers pipeline (for example SVD's `vae/` and `unet/`) loads as is.
//!
//! Loading is strict: a missing, unexpected or wrongly shaped tensor is an error that names the
//! tensor and the file, so a renamed parameter can never load silently as random weights.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde::{de::DeserializeOwned, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

pub const WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";
pub const CONFIG_FILE: &str = "config.json";

/// Reads `<dir>/config.json` into a component config.
pub fn load_config<C: DeserializeOwned>(dir: &Path) -> Result<C> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).at(&path)?;
    let de = &mut serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de)
        .map_err(|e| Error::Data(format!("{}: `{}`: {}", path.display(), e.path(), e.inner())))
}

/// Copies the weights in `file` into the variables of `varmap`, requiring the same names and
/// shapes on both sides.
pub fn load_weights(varmap: &VarMap, file: &Path) -> Result<()> {
    let tensors = candle_core::safetensors::load(file, &Device::Cpu).map_err(|e| {
        Error::Data(format!(
            "{}: not a readable safetensors file: {e}",
            file.display()
        ))
    })?;
    let vars = varmap
        .data()
        .lock()
        .map_err(|_| Error::Other("variable map poisoned".into()))?;
    let want: BTreeSet<&String> = vars.keys().collect();
    let have: BTreeSet<&String> = tensors.keys().collect();
    let missing: Vec<_> = want.difference(&have).take(5).collect();
    let unexpected: Vec<_> = have.difference(&want).take(5).collect();
    if !missing.is_empty() || !unexpected.is_empty() {
        return Err(Error::Data(format!(
            "{}: weights do not match the model config: {} missing (e.g. {:?}), {} unexpected (e.g. {:?})",
            file.display(),
            want.difference(&have).count(),
            missing,
            have.difference(&want).count(),
            unexpected
        )));
    }
    for (name, var) in vars.iter() {
        let t = &tensors[name];
        if t.dims() != var.dims() {
            return Err(Error::Data(format!(
                "{}: tensor `{name}` has shape {:?}, the model config needs {:?}",
                file.display(),
                t.dims(),
                var.dims()
            )));
        }
        let t = t
            .to_dtype(var.dtype())
            .and_then(|t| t.to_device(var.device()))
            .map_err(|e| Error::Data(format!("{}: tensor `{name}`: {e}", file.display())))?;
        var.set(&t)
            .map_err(|e| Error::Data(format!("{}: tensor `{name}`: {e}", file.display())))?;
    }
    Ok(())
}

/// Builds a component from `<dir>`: its config, a model built by `build` over a fresh variable
/// map on `device`, and the checkpoint's weights copied in.
pub fn load_component<C, M>(
    dir: &Path,
    device: &Device,
    build: impl FnOnce(candle_nn::VarBuilder, &C) -> candle_core::Result<M>,
) -> Result<(C, M, VarMap)>
where
    C: DeserializeOwned,
{
    let cfg: C = load_config(dir)?;
    let varmap = VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = build(vb, &cfg).map_err(|e| Error::Data(format!("{}: {e}", dir.display())))?;
    let file = dir.join(WEIGHTS_FILE);
    if !file.exists() {
        return Err(Error::Data(format!(
            "{}: missing weights file",
            file.display()
        )));
    }
    load_weights(&varmap, &file)?;
    Ok((cfg, model, varmap))
}

/// Writes a component in diffusers' layout, atomically (temporary files, then renames).
pub fn save_component<C: Serialize>(dir: &Path, cfg: &C, varmap: &VarMap) -> Result<()> {
    std::fs::create_dir_all(dir).at(dir)?;
    let vars = varmap
        .data()
        .lock()
        .map_err(|_| Error::Other("variable map poisoned".into()))?;
    let tensors: HashMap<String, Tensor> = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    drop(vars);
    save_tensors(&dir.join(WEIGHTS_FILE), &tensors)?;
    let cfg_path = dir.join(CONFIG_FILE);
    let tmp = tmp_path(&cfg_path);
    let text = serde_json::to_string_pretty(cfg).map_err(|e| Error::Other(e.to_string()))?;
    std::fs::write(&tmp, text + "\n").at(&tmp)?;
    std::fs::rename(&tmp, &cfg_path).at(&cfg_path)?;
    Ok(())
}

/// Writes tensors (moved to the CPU) as safetensors atomically.
pub fn save_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let cpu: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?)))
        .collect::<candle_core::Result<_>>()
        .map_err(|e| Error::Other(e.to_string()))?;
    let tmp = tmp_path(path);
    candle_core::safetensors::save(&cpu, &tmp)
        .map_err(|e| Error::Other(format!("{}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).at(path)?;
    Ok(())
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// The variables of a component folder, loaded (for re-exporting a component unchanged).
pub fn varmap_of<C, M>(
    dir: &Path,
    device: &Device,
    build: impl FnOnce(candle_nn::VarBuilder, &C) -> candle_core::Result<M>,
) -> Result<VarMap>
where
    C: DeserializeOwned,
{
    Ok(load_component(dir, device, build)?.2)
}
