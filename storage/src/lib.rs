//! millrace storage: one RocksDB per worker, behind a small API.
//!
//! - [`Cf`] names the column families of the design: `state`, `timers`,
//!   `outbox`, `channels`, `meta`.
//! - [`KeyWriter`] / [`KeyReader`] build order-preserving keys. Every engine key
//!   starts with `(computation, shard)`, so one shard's data is one key range.
//! - A [`Batch`] collects puts and deletes across column families; [`Store::commit`]
//!   writes it as ONE atomic RocksDB `WriteBatch`. That is a checkpoint.
//!
//! Calls block: the engine calls them from its own executor threads, never
//! from an async runtime's worker threads. The `rocksdb` crate does not leak
//! out of this crate, so moving to a newer RocksDB is a change here only.

mod batch;
mod keys;
pub mod slot;
mod store;

pub use keys::{prefix_end, push_escaped, KeyError, KeyReader, KeyWriter};
pub use store::{Batch, Cf, Durability, KeyValue, StorageError, Store, StoreOptions};
