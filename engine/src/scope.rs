//! What a computation's `Context` stands on: the current key's scope in its
//! shard (state, timers, productions, watermark).

use crate::keyed_state::KeyedState;
use crate::layout::state_key;
use crate::record::{EventTime, TimeDomain};
use crate::timers::Timers;
use bytes::Bytes;
use millrace_storage::{StorageError, Store};

/// A record a shard produced and has not routed yet.
#[derive(Clone)]
pub(crate) struct Emit {
    /// Output port index, or `usize::MAX` for an output nobody reads.
    pub port: usize,
    pub key: Bytes,
    pub value: Bytes,
    pub ts: EventTime,
    pub ingest: i64,
}

/// The key-scoped part of a shard handed to a computation through `Context`.
pub(crate) struct KeyScope<'a> {
    pub key: &'a Bytes,
    pub store: &'a Store,
    pub prefix: &'a [u8],
    pub state: &'a mut KeyedState,
    pub timers: &'a mut Timers,
    pub emits: &'a mut Vec<Emit>,
    pub ports: &'a [String],
    pub input_wm: EventTime,
    pub ingest: i64,
    /// The input stream of the current record ("" for timers).
    pub input: &'a str,
    /// Records the computation dropped by design since the last count.
    pub discarded: &'a mut u64,
    pub clock: Clock,
}

/// Where a context's processing time comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Clock {
    /// The system clock (a running worker).
    System,
    /// A time the caller sets (the test harness).
    Fixed(i64),
}

impl Clock {
    /// Processing time, microseconds since the epoch.
    pub fn now(self) -> i64 {
        match self {
            Clock::System => crate::record::now_micros(),
            Clock::Fixed(t) => t,
        }
    }
}

impl KeyScope<'_> {
    pub fn state(&mut self) -> Result<Option<Bytes>, StorageError> {
        if let Some(v) = self.state.get(self.key) {
            return Ok(v.clone());
        }
        let v = self
            .store
            .get_state(&state_key(self.prefix, self.key))?
            .map(Bytes::from);
        self.state.fill(self.key, v.clone());
        Ok(v)
    }

    pub fn set_state(&mut self, v: Option<Bytes>) {
        self.state.set(self.key, v);
    }

    pub fn produce(&mut self, output: Option<&str>, key: Bytes, value: Bytes, ts: EventTime) {
        let port = match output {
            None => 0,
            Some(name) => self
                .ports
                .iter()
                .position(|p| p == name)
                .unwrap_or(usize::MAX),
        };
        self.emits.push(Emit {
            port,
            key,
            value,
            ts,
            ingest: self.ingest,
        });
    }

    pub fn set_timer(&mut self, tag: Bytes, d: TimeDomain, t: EventTime) {
        self.timers.set(self.prefix, self.key, &tag, d, t);
    }

    pub fn timer(&self, tag: &[u8]) -> Option<(TimeDomain, EventTime)> {
        self.timers.get(self.key, tag)
    }

    pub fn delete_timer(&mut self, tag: &[u8]) {
        self.timers.delete(self.prefix, self.key, tag);
    }

    pub fn low_watermark(&self) -> EventTime {
        self.input_wm
    }
}
