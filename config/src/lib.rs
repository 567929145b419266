//! millrace topology files: TOML in, validated [`Topology`] out.
//!
//! A topology names sources, computations and sinks as tables keyed by
//! component name (`[sources.lines]`, `[computations.words]`, `[sinks.out]`)
//! and wires them with `inputs`. This crate reads the file, checks everything
//! that does not depend on the kind of a component (names, wiring, cycles,
//! durations, engine settings) and keeps each component's remaining keys as
//! [`Options`], which the kind's factory parses with its own strict type.
//!
//! Every error names the file, the line and the key ([`ConfigError`]). A typo in
//! a key is always an error: unknown keys are never silently ignored.
//!
//! ```
//! let topo = millrace_config::Topology::parse_str(
//!     "inline.toml",
//!     r#"
//! [sources.lines]
//! type = "generator"
//! count = 10
//!
//! [sinks.out]
//! type = "stdout"
//! inputs = ["lines"]
//! "#,
//! ).unwrap();
//! assert_eq!(topo.sinks()[0].inputs[0].stream.component, "lines");
//! ```

mod duration;
mod error;
mod locate;
mod savepoint_target;
mod topology;

pub use duration::{parse_duration, HumanDuration};
pub use error::ConfigError;
pub use locate::Locator;
pub use savepoint_target::SavepointTarget;
pub use topology::{
    check_secret, ClusterConfig, CommitLogConfig, Component, Durability, EngineConfig, Input,
    KeyExtractor, Options, Role, ServiceConfig, StateConfig, StreamRef, Topology, WorkerConfig,
    MAX_RECORD_BYTES, MAX_SHARDS, MAX_THREADS, MIN_SECRET_LEN,
};
