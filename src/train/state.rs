//! The training state of a stage: named groups of tensors (weights, EMA and target networks,
//! optimizer moments) and the step they belong to, saved as one file.
//!
//! A checkpoint must survive a kill at any instruction: after a restart the stage resumes
//! either from the previous checkpoint or from the new one, never from a mix (newer weights
//! under an older step's record make the resumed run a different run). So the whole state is
//! one safetensors file, `checkpoint.safetensors`, with the step in its header (metadata key
//! `onestep.train_state.1`): it is written
//! to a temporary file in the same folder, fsynced, and moved over the old one by a single
//! `rename`, which POSIX makes atomic; the folder is fsynced last so that the rename itself
//! survives a power cut. Nothing else is written.
//!
//! The random state needs no saving: every step draws from [`super::step_rng`]`(seed, step)`,
//! so the step is the generator's state.
//!
//! Tensor names are `GROUP/NAME` (`student/down_blocks.0...`, `optimizer/m.down_blocks...`).
//! Restoring is strict both ways: a missing tensor, a tensor of another shape, or a tensor
//! that no group claims is an error that names the file.

use crate::error::{Error, IoContext, Result};
use crate::train::optim::{AdamW, Ema};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// File name of a stage's checkpoint inside its cache folder.
pub const STATE_FILE: &str = "checkpoint.safetensors";
const FORMAT: &str = "onestep.train_state.1";

/// Something whose tensors are part of a training state.
pub trait Stateful {
    /// The tensors to save, by name (unique within the part).
    fn state_tensors(&self) -> Vec<(String, Tensor)>;
    /// Take the saved tensors back; `take(name)` removes one from the loaded state.
    fn load_state(&mut self, take: &mut dyn FnMut(&str) -> Result<Tensor>) -> Result<()>;
}

/// Set a variable from a loaded tensor of the same shape (converted to the variable's dtype).
fn set_var(name: &str, var: &Var, t: Tensor) -> Result<()> {
    if t.dims() != var.dims() {
        return Err(Error::Data(format!(
            "training state: `{name}` has shape {:?}, the model's is {:?}",
            t.dims(),
            var.dims()
        )));
    }
    let t = t
        .to_dtype(var.dtype())
        .and_then(|t| t.to_device(var.device()))
        .map_err(|e| Error::candle(format!("training state: `{name}`"), e))?;
    var.set(&t)
        .map_err(|e| Error::candle(format!("training state: `{name}`"), e))
}

/// Variables by name, as a `Vec` or a `HashMap` holds them.
fn var_tensors<'a>(vars: impl Iterator<Item = (&'a String, &'a Var)>) -> Vec<(String, Tensor)> {
    vars.map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect()
}

fn load_vars<'a>(
    vars: impl Iterator<Item = (&'a String, &'a Var)>,
    take: &mut dyn FnMut(&str) -> Result<Tensor>,
) -> Result<()> {
    for (n, v) in vars {
        set_var(n, v, take(n)?)?;
    }
    Ok(())
}

impl Stateful for Vec<(String, Var)> {
    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        var_tensors(self.iter().map(|(n, v)| (n, v)))
    }
    fn load_state(&mut self, take: &mut dyn FnMut(&str) -> Result<Tensor>) -> Result<()> {
        load_vars(self.iter().map(|(n, v)| (n, v)), take)
    }
}

impl Stateful for HashMap<String, Var> {
    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        var_tensors(self.iter())
    }
    fn load_state(&mut self, take: &mut dyn FnMut(&str) -> Result<Tensor>) -> Result<()> {
        load_vars(self.iter(), take)
    }
}

impl Stateful for AdamW {
    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = self.moments();
        // The update count sets AdamW's bias correction; i64 keeps it exact.
        if let Ok(t) = Tensor::new(&[self.step as i64], &Device::Cpu) {
            out.push(("step".into(), t));
        }
        out
    }
    fn load_state(&mut self, take: &mut dyn FnMut(&str) -> Result<Tensor>) -> Result<()> {
        let step = take("step")?
            .to_vec1::<i64>()
            .map_err(|e| Error::candle("training state: optimizer `step`", e))?;
        let step = step.first().copied().unwrap_or(0).max(0) as u64;
        self.set_moments(take, step)
    }
}

impl Stateful for Ema {
    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.shadow.clone()
    }
    fn load_state(&mut self, take: &mut dyn FnMut(&str) -> Result<Tensor>) -> Result<()> {
        for (n, s) in self.shadow.iter_mut() {
            let t = take(n)?;
            if t.dims() != s.dims() {
                return Err(Error::Data(format!(
                    "training state: EMA `{n}` has shape {:?}, the model's is {:?}",
                    t.dims(),
                    s.dims()
                )));
            }
            *s = t
                .to_dtype(s.dtype())
                .and_then(|t| t.to_device(s.device()))
                .map_err(|e| Error::candle(format!("training state: EMA `{n}`"), e))?;
        }
        Ok(())
    }
}

/// A stage's training state at `step`: the tensors of its named parts.
pub struct TrainState {
    pub step: u64,
    tensors: BTreeMap<String, Tensor>,
    /// Where it was loaded from (named in errors).
    source: String,
}

impl TrainState {
    /// An empty state at `step` (the data stage checkpoints its step alone).
    pub fn new(step: u64) -> Self {
        Self {
            step,
            tensors: BTreeMap::new(),
            source: String::new(),
        }
    }

    /// Add a part's tensors under `group`.
    pub fn with(mut self, group: &str, part: &dyn Stateful) -> Self {
        for (n, t) in part.state_tensors() {
            self.tensors.insert(format!("{group}/{n}"), t);
        }
        self
    }

    /// Restore a part from the tensors saved under `group`.
    pub fn restore(&mut self, group: &str, part: &mut dyn Stateful) -> Result<()> {
        let source = self.source.clone();
        let tensors = &mut self.tensors;
        part.load_state(&mut |n: &str| {
            let key = format!("{group}/{n}");
            tensors.remove(&key).ok_or_else(|| {
                Error::Data(format!(
                    "{source}: the training state lacks `{key}` (saved by another configuration?)"
                ))
            })
        })
    }

    /// After every part is restored: fail if the file held tensors no part claimed.
    pub fn finish(self) -> Result<u64> {
        if let Some(k) = self.tensors.keys().next() {
            return Err(Error::Data(format!(
                "{}: the training state holds `{k}` (and {} more) that this stage does not use",
                self.source,
                self.tensors.len() - 1
            )));
        }
        Ok(self.step)
    }

    /// Write the state as one file that replaces `path` in a single atomic rename.
    /// `failpoint(name)` is called between the writes (see [`crate::util::failpoint`]).
    pub fn save(&self, path: &Path, failpoint: &dyn Fn(&str)) -> Result<()> {
        let mut raw: Vec<(String, DType, Vec<usize>, Vec<u8>)> = Vec::new();
        for (k, t) in &self.tensors {
            let (dtype, bytes) =
                tensor_bytes(t).map_err(|e| Error::candle(format!("saving `{k}`"), e))?;
            raw.push((k.clone(), dtype, t.dims().to_vec(), bytes));
        }
        let views = raw
            .iter()
            .map(|(k, dtype, shape, bytes)| {
                let dt = match dtype {
                    DType::I64 => safetensors::Dtype::I64,
                    _ => safetensors::Dtype::F32,
                };
                safetensors::tensor::TensorView::new(dt, shape.clone(), bytes)
                    .map(|v| (k.clone(), v))
                    .map_err(|e| Error::Other(format!("saving `{k}`: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        // One key: safetensors keeps metadata in a HashMap, whose order (and so the file's
        // bytes) would change from process to process with two.
        let meta: HashMap<String, String> = [(FORMAT.to_string(), self.step.to_string())].into();
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).at(dir)?;
        let tmp = crate::util::temp_path(path);
        safetensors::serialize_to_file(views, &Some(meta), &tmp)
            .map_err(|e| Error::Other(format!("{}: {e}", tmp.display())))?;
        failpoint("checkpoint.written");
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .at(&tmp)?;
        failpoint("checkpoint.synced");
        std::fs::rename(&tmp, path).at(path)?;
        failpoint("checkpoint.renamed");
        // Make the rename durable; a folder that cannot be opened (some file systems) is
        // no reason to fail a checkpoint the kernel already holds.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Load a state saved by [`TrainState::save`], its tensors on `dev`.
    pub fn load(path: &Path, dev: &Device) -> Result<Self> {
        let step = Self::step_of(path)?;
        let tensors = candle_core::safetensors::load(path, dev).map_err(|e| {
            Error::Data(format!(
                "{}: corrupt checkpoint ({e}); delete it to restart the stage",
                path.display()
            ))
        })?;
        Ok(Self {
            step,
            tensors: tensors.into_iter().collect(),
            source: path.display().to_string(),
        })
    }

    /// The step recorded in a state file's header, read without loading its tensors.
    pub fn step_of(path: &Path) -> Result<u64> {
        let corrupt = |why: String| {
            Error::Data(format!(
                "{}: corrupt checkpoint ({why}); delete it to restart the stage",
                path.display()
            ))
        };
        use std::io::Read;
        let mut f = std::fs::File::open(path).at(path)?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len)
            .map_err(|e| corrupt(format!("header: {e}")))?;
        let len = u64::from_le_bytes(len);
        if len > 100_000_000 {
            return Err(corrupt(format!("header of {len} bytes")));
        }
        let mut header = vec![0u8; len as usize];
        f.read_exact(&mut header)
            .map_err(|e| corrupt(format!("header: {e}")))?;
        let v: serde_json::Value =
            serde_json::from_slice(&header).map_err(|e| corrupt(format!("header: {e}")))?;
        v["__metadata__"][FORMAT]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| corrupt(format!("no `{FORMAT}` step in the header")))
    }
}

/// A tensor's little-endian bytes: i64 as is, every float as f32 (exact for f16 and bf16).
fn tensor_bytes(t: &Tensor) -> candle_core::Result<(DType, Vec<u8>)> {
    let flat = t.flatten_all()?.to_device(&Device::Cpu)?;
    Ok(match t.dtype() {
        DType::I64 => (
            DType::I64,
            flat.to_vec1::<i64>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        _ => (
            DType::F32,
            flat.to_dtype(DType::F32)?
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(seed: f32) -> Vec<(String, Var)> {
        vec![
            (
                "a".into(),
                Var::from_tensor(&Tensor::new(&[seed, 2.0, 3.0], &Device::Cpu).unwrap()).unwrap(),
            ),
            (
                "b.c".into(),
                Var::from_tensor(
                    &Tensor::new(&[[seed; 2]; 2], &Device::Cpu)
                        .unwrap()
                        .to_dtype(DType::BF16)
                        .unwrap(),
                )
                .unwrap(),
            ),
        ]
    }

    #[test]
    fn states_roundtrip_strictly() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(STATE_FILE);
        let v = vars(1.5);
        let mut opt = AdamW::new(v.clone(), Default::default()).unwrap();
        opt.step = 7;
        TrainState::new(12)
            .with("model", &v)
            .with("optimizer", &opt)
            .save(&p, &|_| {})
            .unwrap();
        assert_eq!(TrainState::step_of(&p).unwrap(), 12);
        assert!(!d.path().read_dir().unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains("tmp")));

        let mut w = vars(-4.0);
        let mut opt2 = AdamW::new(w.clone(), Default::default()).unwrap();
        let mut s = TrainState::load(&p, &Device::Cpu).unwrap();
        s.restore("model", &mut w).unwrap();
        s.restore("optimizer", &mut opt2).unwrap();
        assert_eq!(s.finish().unwrap(), 12);
        assert_eq!(opt2.step, 7);
        assert_eq!(
            w[0].1.as_tensor().to_vec1::<f32>().unwrap(),
            [1.5, 2.0, 3.0]
        );
        assert_eq!(w[1].1.dtype(), DType::BF16);

        // A part left unrestored, or a part the file lacks, is an error naming the file.
        let mut s = TrainState::load(&p, &Device::Cpu).unwrap();
        s.restore("model", &mut w).unwrap();
        let e = s.finish().unwrap_err().to_string();
        assert!(e.contains("optimizer/") && e.contains(STATE_FILE), "{e}");
        let mut s = TrainState::load(&p, &Device::Cpu).unwrap();
        let e = s.restore("ema", &mut w).unwrap_err().to_string();
        assert!(e.contains("lacks `ema/a`"), "{e}");

        // A torn or foreign file is reported as a corrupt checkpoint.
        std::fs::write(&p, b"\x10\0\0\0\0\0\0\0{}").unwrap();
        let e = TrainState::step_of(&p).unwrap_err().to_string();
        assert!(e.contains("corrupt checkpoint"), "{e}");
    }
}
