//! millrace engine: keyed computations, shard executors and the exactly-once
//! delivery protocol of MillWheel.
//!
//! - [`Computation`], [`Context`], [`Source`], [`Sink`]: what user code implements.
//! - [`Registry`]: kinds by name; the built-ins live in `millrace-computations`.
//! - [`Plan`]: components -> nodes with shards, inputs -> edges and channels.
//! - [`Worker`]: the running engine; its executors run the commit loop
//!   (`executor.rs`) that makes every production take effect exactly once.
//!
//! Guarantees: a production is committed (in the producer's outbox) before it
//! is sent; it is re-sent until acknowledged; the consumer applies channel
//! sequence numbers in order and drops anything it has applied, recording the
//! applied number in the same commit as the state it changed. Watermarks only
//! rise. RocksDB is only called from executor threads.

mod api;
mod delivery;
mod executor;
mod failpoint;
mod inspect;
mod keying;
pub mod layout;
mod mapkey;
mod metrics;
pub mod net;
mod plan;
mod record;
mod registry;
mod shard;
mod tap;
mod worker;

pub use api::{
    Computation, ComputationError, Context, Emitter, Sink, SinkError, Source, SourceError,
    SourcePoll,
};
pub use delivery::{InChannel, Offer, OutChannel};
pub use inspect::{inspect, state_of, StoredComponent, StoredData};
pub use keying::{extract_key, shard_of};
pub use layout::shard_prefix;
pub use metrics::Metrics;
pub use plan::{Plan, ERRORS_PORT};
pub use record::{
    is_valid_event_time, now_micros, parse_event_time, Envelope, EventTime, Record, TimeDomain,
    Timer, EARLIEST_EVENT_TIME, LATEST_EVENT_TIME, MAX_TIME, MIN_TIME,
};
pub use registry::{
    per_shard, ComputationFactory, MakeComputation, Registry, SinkFactory, SourceFactory,
};
pub use worker::{data_dir_of, ComponentStatus, Worker, WorkerOptions};

/// The hash maps on the per-record path (keyed state, timers, channels,
/// shards). foldhash instead of the standard SipHash, which took ~10% of
/// P2's instructions. Its seed is random per process, so colliding keys
/// cannot be worked out ahead of time (it is not a cryptographic hash).
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

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
    /// An executor stopped with this error.
    #[error("worker stopped: {0}")]
    Fatal(String),
}
