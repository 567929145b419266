//! millrace engine: keyed computations, shard executors and the exactly-once
//! delivery protocol of MillWheel.
//!
//! - [`Computation`], [`Context`], [`Source`], [`Sink`]: what user code implements.
//! - [`Registry`]: kinds by name; the built-ins live in `millrace-computations`.
//! - [`Plan`]: components -> nodes with shards, inputs -> edges and channels.
//! - [`Worker`]: the running engine; its executors run the commit loop
//!   (`executor/`) that makes every production take effect exactly once.
//!
//! Guarantees: a production is committed (in the producer's outbox) before it
//! is sent; it is re-sent until acknowledged; the consumer applies channel
//! sequence numbers in order and drops anything it has applied, recording the
//! applied number in the same commit as the state it changed. Watermarks only
//! rise. RocksDB is only called from executor threads.

mod api;
pub mod commit_log;
#[cfg(test)]
mod commit_order_tests;
#[cfg(test)]
mod deferred_sink_tests;
mod delivery;
mod error;
mod executor;
mod failpoint;
pub mod health;
mod inspect;
mod keyed_state;
mod keying;
pub mod layout;
mod mapkey;
mod message;
mod metrics;
#[cfg(test)]
mod move_tests;
pub mod net;
mod outgoing;
mod plan;
mod record;
mod registry;
mod router;
pub mod routes;
pub mod savepoint;
mod scope;
mod shard;
mod shared;
mod tap;
#[cfg(test)]
mod test_kinds;
pub mod testing;
mod timers;
mod worker;

pub use api::{
    Computation, ComputationError, Context, DeliveryId, Durable, Emitter, Sink, SinkError,
    SinkStart, Source, SourceError, SourcePoll, SourceShard,
};
pub use delivery::{InChannel, Offer, OutChannel};
pub use error::EngineError;
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
