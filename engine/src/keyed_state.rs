//! The state of a shard's keys in memory: changes since the last commit and
//! a cache of committed state in front of RocksDB.

use crate::mapkey::FastMap;
use crate::mapkey::MapKey;
use bytes::Bytes;

/// The state of a shard's keys in memory: what changed since the last commit
/// (the next checkpoint writes it) and the committed state of recently used
/// keys, a cache in front of RocksDB. Only this shard writes its keys, so the
/// cache is never stale. When it outgrows its capacity it keeps only the
/// changes not yet committed, and refills from RocksDB's block cache.
///
/// One map serves both, so a record costs one lookup to read its key's state
/// and one to change it.
#[derive(Default)]
pub(crate) struct KeyedState {
    map: FastMap<MapKey, Slot>,
    /// The keys changed since the last commit, each once.
    changed: Vec<MapKey>,
    capacity: usize,
}

struct Slot {
    value: Option<Bytes>,
    changed: bool,
}

impl KeyedState {
    pub fn new(capacity: usize) -> Self {
        KeyedState {
            capacity,
            ..KeyedState::default()
        }
    }

    /// The state of `key` if it is in memory (`Some(None)`: known absent).
    pub fn get(&self, key: &[u8]) -> Option<&Option<Bytes>> {
        self.map.get(key).map(|s| &s.value)
    }

    /// Remembers the committed state of `key`, just read from RocksDB.
    pub fn fill(&mut self, key: &[u8], value: Option<Bytes>) {
        if self.capacity == 0 {
            return;
        }
        if self.map.len() >= self.capacity {
            self.map.retain(|_, s| s.changed);
        }
        self.map.insert(
            MapKey::new(key),
            Slot {
                value,
                changed: false,
            },
        );
    }

    /// Changes the state of `key` (committed by the next checkpoint).
    pub fn set(&mut self, key: &[u8], value: Option<Bytes>) {
        match self.map.get_mut(key) {
            Some(slot) => {
                slot.value = value;
                if !slot.changed {
                    slot.changed = true;
                    self.changed.push(MapKey::new(key));
                }
            }
            None => {
                let key = MapKey::new(key);
                self.changed.push(key.clone());
                self.map.insert(
                    key,
                    Slot {
                        value,
                        changed: true,
                    },
                );
            }
        }
    }

    /// Hands each change since the last commit to `write`; they are then
    /// committed state.
    pub fn commit(&mut self, mut write: impl FnMut(&[u8], Option<&Bytes>)) {
        for key in self.changed.drain(..) {
            if let Some(slot) = self.map.get_mut(key.as_bytes()) {
                write(key.as_bytes(), slot.value.as_ref());
                slot.changed = false;
            }
        }
        if self.map.len() > self.capacity {
            self.map.clear();
        }
    }

    /// Forgets the changes since the last commit.
    pub fn discard_changes(&mut self) {
        for key in self.changed.drain(..) {
            self.map.remove(key.as_bytes());
        }
    }
}
