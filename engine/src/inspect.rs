//! What a data directory holds, per component: for `millrace inspect`.

use crate::keying::shard_of;
use crate::layout::{
    parse_shard_prefix, position_key, read_u64, shard_prefix, shards_key, state_key, watermark_key,
};
use crate::shard::printable_position;
use millrace_storage::{Cf, StorageError, Store};
use std::collections::BTreeMap;
use std::path::Path;

/// One component's stored data.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoredComponent {
    /// Shards that hold any data.
    pub shards: Vec<u32>,
    /// Keys with state.
    pub state_keys: u64,
    /// Unacknowledged productions.
    pub outbox: u64,
    /// Timers pending.
    pub timers: u64,
    /// Lowest committed output watermark over its shards (microseconds).
    pub low_watermark: Option<i64>,
    /// Committed source or sink positions by shard (printable form).
    pub positions: BTreeMap<u32, String>,
}

/// A summary of a data directory.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoredData {
    /// Shards per computation it was written with.
    pub shards: Option<u32>,
    /// By component name.
    pub components: BTreeMap<String, StoredComponent>,
}

/// Opens `dir` read-only and summarises it.
pub fn inspect(dir: &Path) -> Result<(Store, StoredData), StorageError> {
    let store = Store::open_read_only(dir)?;
    let shards = store
        .get(Cf::Meta, &shards_key())?
        .and_then(|v| v.as_slice().try_into().ok().map(u32::from_be_bytes));
    let mut components: BTreeMap<String, StoredComponent> = BTreeMap::new();
    for cf in [Cf::State, Cf::Outbox, Cf::Timers, Cf::Meta] {
        store.for_each_prefix(cf, &[], |k, v| {
            let Some((name, shard)) = parse_shard_prefix(k) else {
                return true;
            };
            if name.is_empty() {
                return true;
            }
            let c = components.entry(name.clone()).or_default();
            if !c.shards.contains(&shard) {
                c.shards.push(shard);
            }
            match cf {
                Cf::State => c.state_keys += u64::from(!millrace_storage::slot::is_vacant(v)),
                Cf::Outbox => c.outbox += 1,
                Cf::Timers => c.timers += 1,
                _ => {
                    let prefix = shard_prefix(&name, shard);
                    if k == watermark_key(&prefix).as_slice() {
                        if let Some(w) = read_u64(v).map(|w| w as i64) {
                            c.low_watermark = Some(c.low_watermark.map_or(w, |m| m.min(w)));
                        }
                    } else if k == position_key(&prefix).as_slice() {
                        c.positions.insert(shard, printable_position(v));
                    }
                }
            }
            true
        })?;
    }
    for c in components.values_mut() {
        c.shards.sort_unstable();
    }
    Ok((store, StoredData { shards, components }))
}

/// The stored state of `key` in `component`, looked up in the key's shard.
pub fn state_of(
    store: &Store,
    data: &StoredData,
    component: &str,
    key: &[u8],
) -> Result<Option<Vec<u8>>, StorageError> {
    let shards = data
        .components
        .get(component)
        .map_or(1, |c| c.shards.iter().max().map_or(1, |m| m + 1))
        .max(data.shards.unwrap_or(1));
    let shard = shard_of(key, shards);
    store.get_state(&state_key(&shard_prefix(component, shard), key))
}
