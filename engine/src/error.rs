//! Why the engine stopped: the errors a worker returns, each saying what to do.

use crate::api::{SinkError, SourceError};

/// Why the engine stopped.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The topology is invalid.
    #[error(transparent)]
    Config(millrace_config::ConfigError),
    /// RocksDB failed; restart the worker (it resumes from its last commit).
    #[error(transparent)]
    Storage(#[from] millrace_storage::StorageError),
    /// A source failed; restart the worker (it resumes from the committed position).
    #[error("source `{0}`: {1}")]
    Source(String, SourceError),
    /// A sink failed; restart the worker (it resumes from the committed position).
    #[error("sink: {0}")]
    Sink(SinkError),
    /// Stored data is not what this version wrote.
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// The data directory belongs to a different layout.
    #[error("{0}")]
    Layout(String),
    /// A thread could not be started or panicked.
    #[error("executor thread: {0}")]
    Thread(String),
    /// The cluster transport could not start.
    #[error("cluster: {0}")]
    Network(String),
    /// The commit log refused or failed an append or a read.
    #[error(transparent)]
    Log(#[from] crate::commit_log::LogError),
    /// An executor stopped with this error (the binary says the worker
    /// stopped).
    #[error("{0}")]
    Fatal(String),
}
