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
    load_weights_files(varmap, &[file.to_path_buf()])
}

/// [`load_weights`] from several files (the shards of a checkpoint).
pub fn load_weights_files(varmap: &VarMap, files: &[PathBuf]) -> Result<()> {
    let mut tensors = HashMap::new();
    for f in files {
        tensors.extend(
            candle_core::safetensors::load(f, &Device::Cpu).map_err(|e| {
                Error::Data(format!(
                    "{}: not a readable safetensors file: {e}",
                    f.display()
                ))
            })?,
        );
    }
    let file = files
        .first()
        .ok_or_else(|| Error::Other("load_weights_files: no file".into()))?;
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
    let text = serde_json::to_string_pretty(cfg).map_err(|e| Error::Other(e.to_string()))?;
    crate::util::atomic_write(&dir.join(CONFIG_FILE), (text + "\n").as_bytes())
}

/// Writes tensors (moved to the CPU) as safetensors atomically.
pub fn save_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let cpu: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?)))
        .collect::<candle_core::Result<_>>()
        .map_err(|e| Error::Other(e.to_string()))?;
    let tmp = crate::util::temp_path(path);
    candle_core::safetensors::save(&cpu, &tmp)
        .map_err(|e| Error::Other(format!("{}: {e}", tmp.display())))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .at(&tmp)?;
    std::fs::rename(&tmp, path).at(path)?;
    Ok(())
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

/// The weight files of a component folder written by diffusers or transformers: `<stem>` is
/// `diffusion_pytorch_model` (diffusers) or `model` (transformers). With `variant` (`fp16`) the
/// variant's files (`<stem>.fp16.safetensors`, or the shards of
/// `<stem>.safetensors.index.fp16.json`) are required; without, the plain files are used, or the
/// `fp16` variant's when the folder has only those (as the stabilityai folders may).
pub fn weight_files(dir: &Path, stem: &str, variant: Option<&str>) -> Result<Vec<PathBuf>> {
    let find = |v: Option<&str>| -> Result<Option<Vec<PathBuf>>> {
        let (single, index) = match v {
            Some(v) => (
                format!("{stem}.{v}.safetensors"),
                format!("{stem}.safetensors.index.{v}.json"),
            ),
            None => (
                format!("{stem}.safetensors"),
                format!("{stem}.safetensors.index.json"),
            ),
        };
        if dir.join(&single).is_file() {
            return Ok(Some(vec![dir.join(single)]));
        }
        let index = dir.join(index);
        if index.is_file() {
            let text = std::fs::read_to_string(&index).at(&index)?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::Data(format!("{}: {e}", index.display())))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    Error::Data(format!("{}: no `weight_map` object", index.display()))
                })?;
            let shards: BTreeSet<String> = map
                .values()
                .filter_map(|s| s.as_str().map(String::from))
                .collect();
            return Ok(Some(shards.into_iter().map(|s| dir.join(s)).collect()));
        }
        Ok(None)
    };
    if let Some(files) = find(variant)? {
        return Ok(files);
    }
    if variant.is_none() {
        if let Some(files) = find(Some("fp16"))? {
            return Ok(files);
        }
    }
    let present: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(".safetensors"))
                .collect()
        })
        .unwrap_or_default();
    Err(Error::Data(format!(
        "{}: no {stem}{}.safetensors weights (safetensors files there: {:?})",
        dir.display(),
        variant.map(|v| format!(".{v}")).unwrap_or_default(),
        present
    )))
}

/// Frozen weights read from safetensors files (memory-mapped) for a [`candle_nn::VarBuilder`],
/// converted to one dtype on one device, with a record of which were used: loading is strict
/// (see [`load_frozen`]).
struct StrictTensors {
    files: candle_core::safetensors::MmapedSafetensors,
    names: BTreeSet<String>,
    used: std::sync::Mutex<BTreeSet<String>>,
    label: String,
}

#[derive(Clone)]
struct StrictBackend(std::sync::Arc<StrictTensors>);

impl candle_nn::var_builder::SimpleBackend for StrictBackend {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!(
                "{}: tensor `{name}` has shape {:?}, the model config needs {:?}",
                self.0.label,
                t.dims(),
                s.dims()
            );
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if !self.0.names.contains(name) {
            candle_core::bail!("{}: missing tensor `{name}`", self.0.label);
        }
        self.0.used.lock().unwrap().insert(name.to_string());
        self.0.files.load(name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.names.contains(name)
    }
}

/// Builds a frozen (inference) component from safetensors `files` in `dtype` on `device`:
/// every tensor the model asks for must be there with its shape, and every tensor of the files
/// must be used, so that a renamed parameter never loads as nothing. Files are memory-mapped,
/// so a multi-gigabyte checkpoint is not copied before conversion.
pub fn load_frozen<M>(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
    build: impl FnOnce(candle_nn::VarBuilder) -> candle_core::Result<M>,
) -> Result<M> {
    let label = files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    // SAFETY: the files are only read; a file changed while mapped is the user's error, as
    // for every memory-mapped checkpoint loader (candle's own included).
    let mm = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }
        .map_err(|e| Error::Data(format!("{label}: not a readable safetensors file: {e}")))?;
    let names: BTreeSet<String> = mm.tensors().into_iter().map(|(n, _)| n).collect();
    let strict = std::sync::Arc::new(StrictTensors {
        files: mm,
        names,
        used: std::sync::Mutex::new(BTreeSet::new()),
        label: label.clone(),
    });
    let vb = candle_nn::VarBuilder::from_backend(
        Box::new(StrictBackend(strict.clone())),
        dtype,
        device.clone(),
    );
    let model = build(vb).map_err(|e| Error::Data(format!("{label}: {e}")))?;
    let used = strict.used.lock().unwrap();
    let unused: Vec<&String> = strict.names.difference(&used).collect();
    if !unused.is_empty() {
        return Err(Error::Data(format!(
            "{label}: {} tensors the model config does not use (e.g. {:?}): the config and the weights do not match",
            unused.len(),
            unused.iter().take(5).collect::<Vec<_>>()
        )));
    }
    Ok(model)
}

/// Copy a component folder (config + weights) as it is.
pub fn copy_component(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).at(to)?;
    // Every file of the component: its config and weights, whatever their names (diffusers'
    // `diffusion_pytorch_model.safetensors`, transformers' `model.safetensors`, variants).
    let mut copied = 0;
    for entry in std::fs::read_dir(from).at(from)? {
        let entry = entry.at(from)?;
        let name = entry.file_name();
        if !entry.path().is_file() || crate::util::is_temp_name(&name.to_string_lossy()) {
            continue;
        }
        let (a, b) = (entry.path(), to.join(&name));
        std::fs::copy(&a, &b).map_err(|e| Error::io(&a, e))?;
        copied += 1;
    }
    if !from.join(CONFIG_FILE).is_file() || copied < 2 {
        return Err(Error::Data(format!(
            "{}: not a model component (config.json and weights expected)",
            from.display()
        )));
    }
    Ok(())
}

/// The components a student's folder takes over from its teacher's unchanged.
pub fn copy_frozen_components(from: &Path, to: &Path) -> Result<()> {
    for c in ["vae", "image_encoder"] {
        copy_component(&from.join(c), &to.join(c))?;
    }
    copy_feature_extractor(from, to)
}

/// `feature_extractor/preprocessor_config.json` (CLIP's image normalisation, where the model is
/// SVD's), if `from` has one.
pub fn copy_feature_extractor(from: &Path, to: &Path) -> Result<()> {
    let f = from
        .join("feature_extractor")
        .join("preprocessor_config.json");
    if f.is_file() {
        let dir = to.join("feature_extractor");
        std::fs::create_dir_all(&dir).at(&dir)?;
        std::fs::copy(&f, dir.join("preprocessor_config.json")).map_err(|e| Error::io(&f, e))?;
    }
    Ok(())
}
