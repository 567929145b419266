//! Errors that name the file, the line and the key.

use std::path::PathBuf;

/// What is wrong with a topology file. The message says where and what.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read the topology: {source}")]
    Read {
        /// The topology file.
        file: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The file was read but a key is missing, unknown or has a bad value.
    #[error("{file}:{line}: `{key}`: {message}")]
    Invalid {
        /// The topology file.
        file: PathBuf,
        /// 1-based line of the offending key (or of its table).
        line: usize,
        /// Dotted path of the offending key, e.g. `computations.words.inputs`.
        key: String,
        /// What is wrong, and how to fix it where that is not obvious.
        message: String,
    },
}

impl ConfigError {
    /// The dotted key this error is about, if it is about one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Invalid { key, .. } => Some(key),
        }
    }

    /// The 1-based line this error is about, if any.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Invalid { line, .. } => Some(*line),
        }
    }
}
