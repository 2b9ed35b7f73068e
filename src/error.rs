//! Error types of the library. Every error a user can cause names what went wrong and where
//! (file, line and key for specs; path for files), so the CLI can print it as is.

use std::path::PathBuf;

/// Where a spec value came from: a file and line, or a `--set` override.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    File { path: PathBuf, line: usize },
    Override { arg: String },
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::File { path, line } => write!(f, "{}:{}", path.display(), line),
            Origin::Override { arg } => write!(f, "--set {arg}"),
        }
    }
}

/// A spec that cannot be used: the CLI exits with status 2 and writes nothing to the store.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: key `{key}`: {message}")]
pub struct SpecError {
    pub origin: Origin,
    pub key: String,
    pub message: String,
}

/// A parameter error at a path inside a stage's table (mapped to file and line by the spec).
#[derive(Debug)]
pub struct ParamError {
    pub path: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("run store {path}: {source}")]
    Store {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "stage `{stage}` was interrupted at step {step}; rerun to resume from its last checkpoint"
    )]
    Interrupted { stage: String, step: u64 },
    #[error("stage `{stage}`: non-finite {key} = {value} at step {step}")]
    NonFinite {
        stage: String,
        key: String,
        value: f64,
        step: u64,
    },
    /// A tensor operation failed; candle's error is kept as the source.
    #[error("{context}: {source}")]
    Tensor {
        context: String,
        #[source]
        source: candle_core::Error,
    },
    #[error("{0}")]
    Data(String),
    #[error("{0}")]
    Other(String),
}

/// A data-parallel shard that could not run (`train::shard`).
impl From<crate::train::shard::ShardError> for Error {
    fn from(e: crate::train::shard::ShardError) -> Self {
        Error::Other(e.0)
    }
}

impl Error {
    pub fn candle(context: impl Into<String>, source: candle_core::Error) -> Self {
        Error::Tensor {
            context: context.into(),
            source,
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attach a path to io errors: `fs::read(p).at(p)?`.
pub trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
