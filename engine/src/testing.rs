//! A test harness for one computation shard, without a worker: the test
//! hands it records, moves its input watermark and its processing-time
//! clock, and reads what the computation emitted. State, timers and
//! watermarks go through the engine's own shard runtime (the watermark as
//! one upstream shard's, checkpointed and restored as a worker does), and
//! each step is committed to a real RocksDB store, so [`Harness::restart`]
//! shows what survives a crash. It plays the part of Flink's
//! `KeyedOneInputStreamOperatorTestHarness`.
//!
//! ```
//! use millrace_engine::testing::Harness;
//! use millrace_engine::{Computation, ComputationError, Context, Record, TimeDomain, Timer};
//!
//! /// Emits each key's record count when the watermark passes its first record.
//! struct CountUntil;
//!
//! impl Computation for CountUntil {
//!     fn process_record(&mut self, ctx: &mut Context<'_>, r: Record) -> Result<(), ComputationError> {
//!         let n = ctx.state()?.map_or(0, |b| b[0]) + 1;
//!         ctx.set_state(vec![n]);
//!         if n == 1 {
//!             ctx.set_timer("done", TimeDomain::EventTime, r.timestamp);
//!         }
//!         Ok(())
//!     }
//!     fn process_timer(&mut self, ctx: &mut Context<'_>, t: Timer) -> Result<(), ComputationError> {
//!         let n = ctx.state()?.map_or(0, |b| b[0]);
//!         ctx.produce(ctx.key().clone(), n.to_string(), t.time);
//!         Ok(())
//!     }
//! }
//!
//! let dir = tempfile::tempdir().unwrap();
//! let mut h = Harness::open(dir.path(), Box::new(CountUntil), &[]).unwrap();
//! assert!(h.process("a", "x", 10).unwrap().is_empty());
//! h.process("a", "y", 12).unwrap();
//! assert!(h.advance_watermark(10).unwrap().is_empty(), "fires once the watermark is past 10");
//! let out = h.advance_watermark(11).unwrap();
//! assert_eq!((out[0].key.as_ref(), out[0].value.as_ref()), (&b"a"[..], &b"2"[..]));
//! ```

use crate::api::{Computation, ComputationError};
use crate::error::EngineError;
use crate::keyed_state::KeyedState;
use crate::layout::shard_prefix;
use crate::metrics::{Metrics, NodeMetrics};
use crate::plan::ERRORS_PORT;
use crate::record::{EventTime, Record, TimeDomain, Timer};
use crate::scope::{Clock, Emit};
use crate::shard::{restore_timers, Body, KeyEnv, ShardRt};
use crate::timers::Timers;
use bytes::Bytes;
use millrace_storage::{Store, StoreOptions};
use std::path::Path;

/// The component name the harness stores its shard under.
const COMPONENT: &str = "harness";

/// One record a computation emitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// The output it went to: `""` for the default one, else its name
    /// (`"?"` for a name the computation did not declare).
    pub output: String,
    /// Its key.
    pub key: Bytes,
    /// Its value.
    pub value: Bytes,
    /// Its event time.
    pub timestamp: EventTime,
}

/// One computation shard driven by a test. See the module documentation.
pub struct Harness {
    store: Store,
    shard: ShardRt,
    ports: Vec<String>,
    metrics: NodeMetrics,
    now: i64,
    emits: Vec<Emit>,
}

impl Harness {
    /// Opens (or reopens) the shard stored in `dir`, running `computation`,
    /// which may produce to `outputs` besides its default output.
    pub fn open(
        dir: &Path,
        computation: Box<dyn Computation>,
        outputs: &[&str],
    ) -> Result<Harness, EngineError> {
        let store = Store::open(dir, &StoreOptions::default())?;
        let prefix = shard_prefix(COMPONENT, 0);
        let follows_state = computation.timers_follow_state();
        let timers = if follows_state {
            Timers::volatile()
        } else {
            Timers::load(&store, &prefix)?
        };
        let body = Body::Compute(computation);
        let mut shard = ShardRt::new(0, 0, prefix.clone(), body, KeyedState::new(1024), timers);
        // The test plays the one upstream shard. The harness hands every
        // emit to the test at once (nothing stays unacknowledged), so the
        // shard's output watermark is its input watermark: the one it
        // committed is what its upstream would tell it again.
        shard.restore_watermarks(&store, &[&prefix])?;
        let mut ports = vec![String::new(), ERRORS_PORT.to_owned()];
        ports.extend(outputs.iter().map(|o| o.to_string()));
        let metrics = NodeMetrics::new(&Metrics::new(), COMPONENT);
        let mut h = Harness {
            store,
            shard,
            ports,
            metrics,
            now: 0,
            emits: Vec::new(),
        };
        if follows_state {
            restore_timers(&h.store, &mut h.shard, &h.metrics, COMPONENT, &h.ports)?;
        }
        Ok(h)
    }

    /// Drops the computation and everything in memory, as a crash would, and
    /// reopens the shard from what was committed, running `computation`.
    pub fn restart(self, computation: Box<dyn Computation>) -> Result<Harness, EngineError> {
        let outputs: Vec<String> = self.ports[2..].to_vec();
        let dir = self.store.path().to_path_buf();
        let now = self.now;
        drop(self);
        let outputs: Vec<&str> = outputs.iter().map(String::as_str).collect();
        let mut h = Harness::open(&dir, computation, &outputs)?;
        h.now = now;
        Ok(h)
    }

    /// Hands the computation one record of `key`, and commits.
    pub fn process(
        &mut self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
        timestamp: EventTime,
    ) -> Result<Vec<Output>, ComputationError> {
        let record = Record {
            key: key.into(),
            value: value.into(),
            timestamp,
        };
        let key = record.key.clone();
        self.with_key(&key, "input", |comp, ctx| comp.process_record(ctx, record))?;
        self.commit()
    }

    /// Moves the input low watermark to `wm` (it never moves back), fires
    /// the event-time timers it passed (those before `wm`), and commits.
    pub fn advance_watermark(&mut self, wm: EventTime) -> Result<Vec<Output>, ComputationError> {
        self.shard.upstream_watermark(0, wm, false);
        self.fire(TimeDomain::EventTime, self.shard.input_wm())?;
        self.commit()
    }

    /// Sets the processing-time clock to `now` (microseconds), fires the
    /// processing-time timers before it, and commits.
    pub fn advance_clock(&mut self, now: i64) -> Result<Vec<Output>, ComputationError> {
        self.now = self.now.max(now);
        self.fire(TimeDomain::ProcessingTime, self.now)?;
        self.commit()
    }

    /// The committed state of `key`.
    pub fn state(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        Ok(self
            .store
            .get_state(&crate::layout::state_key(self.shard.prefix(), key))?)
    }

    /// Timers set and not yet fired.
    pub fn pending_timers(&self) -> usize {
        self.shard.timers().len()
    }

    /// Records the computation discarded by design so far.
    pub fn discarded(&self) -> u64 {
        self.shard.discarded()
    }

    /// The input low watermark.
    pub fn watermark(&self) -> EventTime {
        self.shard.input_wm()
    }

    fn fire(&mut self, domain: TimeDomain, limit: EventTime) -> Result<(), ComputationError> {
        while let Some((key, tag, time)) = self.shard.pop_due_timer(domain, limit) {
            let key = Bytes::copy_from_slice(key.as_bytes());
            let tag = Bytes::copy_from_slice(tag.as_bytes());
            let timer = Timer { tag, domain, time };
            self.with_key(&key, "", |comp, ctx| comp.process_timer(ctx, timer))?;
        }
        Ok(())
    }

    fn with_key(
        &mut self,
        key: &Bytes,
        input: &str,
        f: impl FnOnce(&mut dyn Computation, &mut crate::Context<'_>) -> Result<(), ComputationError>,
    ) -> Result<(), ComputationError> {
        let env = KeyEnv {
            store: &self.store,
            emits: &mut self.emits,
            ports: &self.ports,
            ingest: self.now,
            input,
            clock: Clock::Fixed(self.now),
        };
        self.shard.with_key(env, key, f).unwrap_or(Ok(()))
    }

    /// Commits state, timers and the watermark, as a worker's turn does;
    /// returns what was emitted.
    fn commit(&mut self) -> Result<Vec<Output>, ComputationError> {
        let mut batch = self.store.batch();
        self.shard.recompute_output_wm(None);
        self.shard.checkpoint_state(&mut batch);
        self.shard.checkpoint_watermark(&mut batch);
        self.store.commit(batch)?;
        // Committed: a worker would tell its consumers now.
        self.shard.take_wm_change();
        let ports = &self.ports;
        Ok(self
            .emits
            .drain(..)
            .map(|e| Output {
                output: ports.get(e.port).cloned().unwrap_or_else(|| "?".to_owned()),
                key: e.key,
                value: e.value,
                timestamp: e.ts,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::Harness;
    use crate::test_kinds::Nothing;

    #[test]
    fn the_watermark_comes_back_after_a_restart_from_the_shards_own_commit() {
        let dir = tempfile::tempdir().expect("dir");
        let mut h = Harness::open(dir.path(), Box::new(Nothing), &[]).expect("harness");
        h.advance_watermark(50).expect("advance");
        let mut h = h.restart(Box::new(Nothing)).expect("restart");
        assert_eq!(h.watermark(), 50);
        h.advance_watermark(20).expect("advance");
        assert_eq!(h.watermark(), 50, "it never moves back");
        let h = h.restart(Box::new(Nothing)).expect("restart");
        assert_eq!(h.watermark(), 50);
    }
}
