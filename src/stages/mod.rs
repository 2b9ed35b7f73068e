//! Stage kinds and the interface the runner hands a stage while it runs.
//!
//! A stage kind resolves its parameters (defaults filled in, unknown keys rejected), may add a
//! fingerprint of external content its output depends on, and runs inside a [`StageContext`]:
//! a cache folder of its own, its upstream stages' folders, a metric/artifact log, atomic
//! checkpoints and an interrupt flag. Stages know nothing of the store or the CLI.

pub mod autoencoder;
pub mod consistency;
pub mod data;
pub mod fvd;
pub mod gan;
pub mod teacher;

use crate::data::ClipSet;
use crate::device::Device;
use crate::error::{Error, IoContext, Result};
use crate::pipeline::SETTINGS_FILE;
use crate::train::state::{TrainState, STATE_FILE};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::{Path, PathBuf};

pub use crate::error::ParamError;

pub trait StageKind: Sync {
    fn name(&self) -> &'static str;
    /// Bumped whenever the stage's code changes what it produces: part of its identity.
    fn version(&self) -> u32;
    /// Whether the run's seed is part of the stage's identity (training stages) or not
    /// (data preparation, which has its own `seed` parameter where it needs one).
    fn seeded(&self) -> bool;
    /// Check the parameters and return them with every default filled in.
    fn resolve(&self, params: toml::Value) -> Result<toml::Value, ParamError>;
    /// Content outside the parameters that the output depends on (a folder's files, say).
    fn fingerprint(&self, _params: &toml::Value) -> Result<Option<String>> {
        Ok(None)
    }
    /// The parameters (of the resolved params) that name another stage of the spec, with the
    /// names: each must be a stage this one runs after, which the spec checks before anything
    /// runs.
    fn references(&self, _params: &toml::Value) -> Vec<(&'static str, String)> {
        Vec::new()
    }
    /// Whether the kind has a `dtype` parameter ([`crate::device::Precision`]).
    fn takes_dtype(&self) -> bool {
        false
    }
    fn run(&self, ctx: &mut StageContext<'_>) -> Result<()>;
}

static KINDS: &[&dyn StageKind] = &[
    &data::DataStage,
    &autoencoder::AutoencoderStage,
    &teacher::TeacherStage,
    &consistency::ConsistencyStage,
    &gan::GanStage,
    &fvd::FvdStage,
];

pub fn kind(name: &str) -> Option<&'static dyn StageKind> {
    KINDS.iter().copied().find(|k| k.name() == name)
}

pub fn kind_names() -> Vec<&'static str> {
    KINDS.iter().map(|k| k.name()).collect()
}

/// The registry of stage kinds, as the spec layer sees it: `spec::load(path, sets, &Registry)`.
pub struct Registry;

impl crate::spec::StageKinds for Registry {
    fn names(&self) -> Vec<&'static str> {
        kind_names()
    }
    fn resolve(&self, kind: &str, params: toml::Value) -> Option<Result<toml::Value, ParamError>> {
        self::kind(kind).map(|k| k.resolve(params))
    }
    fn references(&self, kind: &str, params: &toml::Value) -> Vec<(&'static str, String)> {
        self::kind(kind).map_or_else(Vec::new, |k| k.references(params))
    }
    fn takes_dtype(&self, kind: &str) -> bool {
        self::kind(kind).is_some_and(|k| k.takes_dtype())
    }
}

/// The string values of `keys` in a resolved parameter table, as [`StageKind::references`].
pub fn string_params(params: &toml::Value, keys: &[&'static str]) -> Vec<(&'static str, String)> {
    keys.iter()
        .filter_map(|&k| Some((k, params.get(k)?.as_str()?.to_string())))
        .collect()
}

/// Deserialize a stage's parameters into its config struct, reporting the failing path.
pub fn resolve_typed<T: DeserializeOwned + Serialize>(
    params: toml::Value,
) -> Result<(T, toml::Value), ParamError> {
    let typed: T = serde_path_to_error::deserialize(params).map_err(|e| ParamError {
        path: e
            .path()
            .iter()
            .filter_map(|s| match s {
                serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("."),
        message: e.inner().to_string(),
    })?;
    let value = toml::Value::try_from(&typed).map_err(|e| ParamError {
        path: String::new(),
        message: e.to_string(),
    })?;
    Ok((typed, value))
}

/// What the runner provides to record a stage's progress; implemented over the run store.
pub trait StageLog {
    fn metric(&mut self, key: &str, step: u64, value: f64) -> Result<()>;
    fn artifact(&mut self, path: &Path, kind: &str) -> Result<()>;
    fn flush(&mut self) -> Result<()>;
    fn progress(&mut self, step: u64, total: u64, message: &str);
    fn note(&mut self, message: &str);
    fn interrupted(&self) -> bool;
}

/// A finished upstream stage.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    pub kind: String,
    pub hash: String,
    pub dir: PathBuf,
}

pub struct StageContext<'a> {
    pub name: String,
    pub kind: String,
    pub hash: String,
    pub seed: u64,
    pub device: Device,
    pub params: toml::Value,
    /// This stage's cache folder, `results/cache/<hash>/`.
    pub dir: PathBuf,
    /// Where downloaded assets (registry packages, decoded sources, ffmpeg) live.
    pub assets: PathBuf,
    pub upstream: Vec<Upstream>,
    pub log: &'a mut dyn StageLog,
}

/// The checkpoint of earlier onestep versions (a JSON step record beside `train_state/`).
const LEGACY_CHECKPOINT: &str = "checkpoint.json";

impl StageContext<'_> {
    pub fn params<T: DeserializeOwned>(&self) -> Result<T> {
        self.params
            .clone()
            .try_into()
            .map_err(|e| Error::Other(format!("stage `{}`: parameters: {e}", self.name)))
    }

    /// Log a metric; a NaN or infinite value fails the stage with its key and step.
    pub fn metric(&mut self, key: &str, step: u64, value: f64) -> Result<()> {
        if !value.is_finite() {
            return Err(Error::NonFinite {
                stage: self.name.clone(),
                key: key.into(),
                value,
                step,
            });
        }
        self.log.metric(key, step, value)
    }

    /// Register a file of the stage folder as an artifact (hashed into the store).
    pub fn artifact(&mut self, file: &str, kind: &str) -> Result<()> {
        let p = self.dir.join(file);
        self.log.artifact(&p, kind)
    }

    pub fn progress(&mut self, step: u64, total: u64, message: &str) {
        self.log.progress(step, total, message);
    }

    pub fn note(&mut self, message: &str) {
        self.log.note(message);
    }

    /// Stop at a step boundary if the user asked to (Ctrl-C): the last checkpoint stands.
    ///
    /// `ONESTEP_INTERRUPT_AT=STAGE:N` in the environment acts as a Ctrl-C at step N of the
    /// stage named STAGE (used by the tests of resumption).
    pub fn check_interrupt(&self, step: u64) -> Result<()> {
        let simulated = std::env::var("ONESTEP_INTERRUPT_AT")
            .is_ok_and(|v| v == format!("{}:{step}", self.name));
        if self.log.interrupted() || simulated {
            return Err(Error::Interrupted {
                stage: self.name.clone(),
                step,
            });
        }
        Ok(())
    }

    /// Save the training state as the stage's checkpoint. Metrics logged so far are flushed
    /// first, so a resumed stage never lacks the metrics of steps before its checkpoint; the
    /// state itself replaces the previous checkpoint in one atomic rename
    /// ([`TrainState::save`]), so a kill at any point leaves one whole checkpoint or the other.
    pub fn checkpoint(&mut self, state: &TrainState) -> Result<()> {
        self.log.flush()?;
        let (stage, step) = (self.name.clone(), state.step);
        crate::util::failpoint("checkpoint.flushed", &stage, step);
        state.save(&self.dir.join(STATE_FILE), &|point| {
            crate::util::failpoint(point, &stage, step)
        })
    }

    /// The last checkpoint, if the stage was interrupted before, its tensors on `dev`: the
    /// stage restores its parts from it ([`TrainState::restore`]) and checks that nothing is
    /// left ([`TrainState::finish`]). A corrupt checkpoint is an error.
    pub fn resume(&self, dev: &candle_core::Device) -> Result<Option<TrainState>> {
        let legacy = self.dir.join(LEGACY_CHECKPOINT);
        if legacy.exists() {
            return Err(Error::Data(format!(
                "{}: a checkpoint written by an older onestep, which this one cannot resume; \
                 delete {} to restart the stage",
                legacy.display(),
                self.dir.display()
            )));
        }
        let p = self.dir.join(STATE_FILE);
        if !p.exists() {
            return Ok(None);
        }
        TrainState::load(&p, dev).map(Some)
    }

    /// The step of the last checkpoint, if any, without loading it.
    pub fn checkpointed_step(&self) -> Result<Option<u64>> {
        let p = self.dir.join(STATE_FILE);
        if !p.exists() {
            return Ok(None);
        }
        TrainState::step_of(&p).map(Some)
    }

    /// Remove the checkpoint once the stage's outputs are complete (for stages whose
    /// checkpoint is only a resume point, not an output).
    pub fn drop_checkpoint(&self) -> Result<()> {
        let p = self.dir.join(STATE_FILE);
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&p, e)),
            _ => Ok(()),
        }
    }

    pub fn upstream_of_kind(&self, kind: &str) -> Option<&Upstream> {
        self.upstream.iter().rev().find(|u| u.kind == kind)
    }

    /// The output of the nearest upstream `data` stage: both clip sets and its manifest.
    pub fn data(&self) -> Result<DataOutput> {
        let up = self.upstream_of_kind("data").ok_or_else(|| {
            Error::Other(format!(
                "stage `{}` needs a `data` stage before it (add one, or set `after`)",
                self.name
            ))
        })?;
        DataOutput::load(&up.dir)
    }

    /// The model folder of a named upstream stage, or of the nearest one that wrote one;
    /// `needs` completes "stage X needs ..." in the error.
    pub fn model_dir(&self, name: Option<&str>, needs: &str) -> Result<PathBuf> {
        let is_model = |u: &&Upstream| u.dir.join(SETTINGS_FILE).is_file();
        let found = match name {
            Some(n) => self.upstream.iter().find(|u| u.name == n),
            None => self.upstream.iter().rev().find(is_model),
        };
        match found {
            Some(u) if is_model(&u) => Ok(u.dir.clone()),
            Some(u) => Err(Error::Other(format!(
                "stage `{}`: stage `{}` ({}) wrote no model folder",
                self.name, u.name, u.kind
            ))),
            None => Err(Error::Other(format!(
                "stage `{}` needs {needs}{}",
                self.name,
                name.map(|n| format!(" (no stage `{n}` upstream)"))
                    .unwrap_or_default()
            ))),
        }
    }

    /// The teacher's model folder: the named upstream stage, or the nearest `teacher` stage.
    pub fn teacher_dir(&self, name: Option<&str>) -> Result<PathBuf> {
        match name {
            Some(_) => self.model_dir(name, "a teacher"),
            None => self
                .upstream_of_kind("teacher")
                .map(|u| u.dir.clone())
                .ok_or_else(|| {
                    Error::Other(format!(
                        "stage `{}` needs a `teacher` stage before it",
                        self.name
                    ))
                }),
        }
    }
}

/// What a `data` stage leaves, read once: the clip sets and the typed manifest.
pub struct DataOutput {
    pub train: ClipSet,
    pub test: ClipSet,
    pub manifest: data::Manifest,
}

impl DataOutput {
    pub fn load(dir: &Path) -> Result<Self> {
        let p = dir.join(data::MANIFEST_FILE);
        let text = std::fs::read_to_string(&p).at(&p)?;
        let manifest = serde_json::from_str(&text)
            .map_err(|e| Error::Data(format!("{}: {e}", p.display())))?;
        Ok(Self {
            train: ClipSet::load(&dir.join("train.safetensors"))?,
            test: ClipSet::load(&dir.join("test.safetensors"))?,
            manifest,
        })
    }

    /// Frames per second the clips were decoded (or rendered) at.
    pub fn fps(&self) -> f64 {
        self.manifest.params.fps
    }
}

/// Step of the checkpoint in a stage folder, if any (for the runner's bookkeeping).
pub fn checkpoint_step(dir: &Path) -> Option<u64> {
    TrainState::step_of(&dir.join(STATE_FILE)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NullLog;
    impl StageLog for NullLog {
        fn metric(&mut self, _: &str, _: u64, _: f64) -> Result<()> {
            Ok(())
        }
        fn artifact(&mut self, _: &Path, _: &str) -> Result<()> {
            Ok(())
        }
        fn flush(&mut self) -> Result<()> {
            Ok(())
        }
        fn progress(&mut self, _: u64, _: u64, _: &str) {}
        fn note(&mut self, _: &str) {}
        fn interrupted(&self) -> bool {
            false
        }
    }

    #[test]
    fn non_finite_metrics_fail_the_stage_and_checkpoints_roundtrip() {
        let d = tempfile::tempdir().unwrap();
        let mut log = NullLog;
        let mut ctx = StageContext {
            name: "t".into(),
            kind: "data".into(),
            hash: "h".into(),
            seed: 0,
            device: Device::Cpu,
            params: toml::Value::Table(Default::default()),
            dir: d.path().to_path_buf(),
            assets: d.path().to_path_buf(),
            upstream: vec![],
            log: &mut log,
        };
        let e = ctx.metric("loss", 12, f64::NAN).unwrap_err().to_string();
        assert!(
            e.contains("non-finite loss") && e.contains("step 12"),
            "{e}"
        );
        assert!(ctx.metric("loss", 12, f64::INFINITY).is_err());
        assert!(ctx.resume(&candle_core::Device::Cpu).unwrap().is_none());
        ctx.checkpoint(&TrainState::new(5)).unwrap();
        let st = ctx.resume(&candle_core::Device::Cpu).unwrap().unwrap();
        assert_eq!(st.finish().unwrap(), 5);
        assert_eq!(checkpoint_step(d.path()), Some(5));
        std::fs::write(d.path().join(STATE_FILE), b"{").unwrap();
        assert!(ctx
            .resume(&candle_core::Device::Cpu)
            .err()
            .unwrap()
            .to_string()
            .contains("corrupt checkpoint"));
        std::fs::write(d.path().join(LEGACY_CHECKPOINT), b"{}").unwrap();
        assert!(ctx
            .resume(&candle_core::Device::Cpu)
            .err()
            .unwrap()
            .to_string()
            .contains("older onestep"));
    }
}
