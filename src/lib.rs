//! millrace: a MillWheel-style exactly-once stream engine.
//!
//! This crate is the `millrace` command and the library a user builds their
//! own binary on: register more kinds on [`builtins`] and hand the registry to
//! [`cli_main`], which then understands exactly the commands of `millrace`.
//!
//! ```no_run
//! fn main() -> std::process::ExitCode {
//!     let registry = millrace::builtins();
//!     // registry.computation("my_kind", ...);
//!     millrace::cli_main(registry)
//! }
//! ```

mod cli;
mod http;
pub mod nats_log;
mod operator;
mod ownership;
mod savepoints;
mod service;

pub use cli::cli_main;
pub use millrace_computations::builtins;
/// The allocator wrapper that lets a script call's `max_memory_bytes` be
/// enforced: install it as the binary's global allocator, as `millrace`
/// does (without it, scripts are bounded by their other limits only).
pub use millrace_computations::MeteredAlloc;
pub use millrace_config as config;
pub use millrace_engine as engine;
pub use millrace_engine::{per_shard, Computation, ComputationError, Context, Record, Registry};
/// Opens the savepoint store a URL names (`file://`, a path, or `s3://`).
pub use savepoints::open as open_savepoint_store;
