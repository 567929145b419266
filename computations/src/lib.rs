//! millrace built-ins: sources, computations and sinks, registered by name.
//!
//! | section | `type` | what it does |
//! | --- | --- | --- |
//! | sources | `generator` | deterministic keyed records (`count`, `keys`, `rate`, `seed`), replayable |
//! | sources | `file` | lines of a file or of a directory's files (`path`, `watch`), replayable |
//! | sources | `socket` | lines from a TCP server (`address`); **not replayable** |
//! | computations | `split` | flatMap a line into words |
//! | computations | `filter` | keep records whose value matches `regex` |
//! | computations | `map` | re-key, or project a JSON field or a delimited field |
//! | computations | `count` | running count per key |
//! | computations | `reduce` | running `sum`, `min` or `max` per key |
//! | computations | `combine` | running aggregate per key (count, sum, min, max, mean, top:N, collect) |
//! | computations | `top_per_key` | the N largest values per key, emitted when they change |
//! | computations | `count_per_element` | occurrences of each distinct value |
//! | computations | `flatten` | several inputs into one stream |
//! | computations | `window` | fixed, sliding, session windows; triggers; lateness; accumulation |
//! | computations | `reduce_by_key_and_window` | a window's `sum`, `min` or `max` |
//! | computations | `cogroup` | CoGroupByKey of two or more inputs, per window |
//! | computations | `join` | windowed inner join of two inputs |
//! | computations | `script` | the user's own logic, in Rhai, written in the topology: state, timers, named outputs |
//! | sinks | `stdout` | one line per record |
//! | sinks | `file` | one line per record, exactly once across crashes |
//!
//! [`builtins`] returns a registry holding all of them.

mod aggregate;
mod file_source;
mod generator;
mod kafka;
mod keyed;
mod script;
mod script_combine;
mod sinks;
mod socket;
mod stateless;
#[cfg(test)]
mod test_support;
mod ttl;
mod window;

use millrace_config::{Component, ConfigError};
use millrace_engine::Registry;
use serde::de::DeserializeOwned;

pub use aggregate::{parse_aggregate, Acc, Aggregate};
pub use file_source::FileSource;
pub use generator::Generator;
pub use script::memory::MeteredAlloc;
pub use script::Script;
pub use script_combine::ScriptCombine;
pub use sinks::{FileSink, OutputFormat, StdoutSink};
pub use socket::SocketSource;
pub use window::{Accumulation, Trigger, Window, WindowConfig, WindowSpec};

/// A registry with every built-in kind.
pub fn builtins() -> Registry {
    let mut r = Registry::new();
    generator::register(&mut r);
    file_source::register(&mut r);
    socket::register(&mut r);
    stateless::register(&mut r);
    keyed::register(&mut r);
    window::register(&mut r);
    script::register(&mut r);
    sinks::register(&mut r);
    kafka::register(&mut r);
    r
}

/// Parses a component's options into `T` (which should deny unknown fields).
pub(crate) fn options<T: DeserializeOwned>(c: &Component) -> Result<T, ConfigError> {
    c.options.parse()
}
