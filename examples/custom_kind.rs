//! A program that adds its own computation kind to millrace and runs a
//! topology that uses it:
//!
//! ```sh
//! cargo run --example custom_kind -- run examples/custom_kind.toml
//! ```
//!
//! `first_seen` emits a value the first time its key sees it and drops every
//! repetition: a per-key "distinct" whose memory is the key's RocksDB state, so
//! it stays exact across crashes and restarts.

use millrace::{per_shard, Computation, ComputationError, Context, Record};
use std::collections::BTreeSet;

/// The allocator `millrace` itself uses, so that scripts in the topology
/// are held to their `max_memory_bytes` here too.
#[global_allocator]
static GLOBAL: millrace::MeteredAlloc<mimalloc::MiMalloc> =
    millrace::MeteredAlloc(mimalloc::MiMalloc);

/// Emits each value once per key.
#[derive(Clone)]
struct FirstSeen {
    /// Values longer than this are refused as bad records.
    max_len: usize,
}

impl Computation for FirstSeen {
    fn process_record(&mut self, ctx: &mut Context<'_>, r: Record) -> Result<(), ComputationError> {
        if r.value.len() > self.max_len || r.value.contains(&b'\n') {
            return Err(ComputationError::BadRecord(format!(
                "value of {} bytes is longer than {} or has a newline",
                r.value.len(),
                self.max_len
            )));
        }
        let state = ctx.state()?.unwrap_or_default();
        let mut seen: BTreeSet<&[u8]> = state
            .split(|b| *b == b'\n')
            .filter(|v| !v.is_empty())
            .collect();
        if seen.insert(&r.value) {
            let joined = seen.into_iter().collect::<Vec<_>>().join(&b'\n');
            ctx.set_state(joined);
            ctx.produce(r.key, r.value, r.timestamp);
        }
        Ok(())
    }
}

fn main() -> std::process::ExitCode {
    let mut registry = millrace::builtins();
    registry.computation("first_seen", |component| {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Options {
            #[serde(default = "default_max_len")]
            max_len: usize,
        }
        fn default_max_len() -> usize {
            256
        }
        let o: Options = component.options.parse()?;
        Ok(per_shard(FirstSeen { max_len: o.max_len }))
    });
    millrace::cli_main(registry)
}
