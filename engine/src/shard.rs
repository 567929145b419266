//! One shard's in-memory view: its channels, the state and timers changed
//! since the last commit, and its watermarks. The executor owns it and
//! checkpoints it ([`ShardRt::checkpoint`]) into each commit.

use crate::api::{Computation, Context, Sink, Source};
use crate::delivery::{InChannel, OutChannel};
use crate::layout::{self, position_key, read_u64, state_key, watermark_key, write_state_key};
use crate::mapkey::MapKey;
use crate::plan::{ChannelIdx, NodeIdx, Sid};
use crate::record::{Envelope, EventTime, TimeDomain, MIN_TIME};
use crate::FastMap;
use bytes::Bytes;
use millrace_storage::{Batch, Cf, StorageError, Store};
use std::collections::hash_map::Entry;
use std::collections::{btree_map, BTreeMap, BTreeSet, VecDeque};
use std::time::Instant;

/// A record a shard produced and has not routed yet.
pub(crate) struct Emit {
    /// Output port index, or `usize::MAX` for an output nobody reads.
    pub port: usize,
    pub key: Bytes,
    pub value: Bytes,
    pub ts: EventTime,
    pub ingest: i64,
}

pub(crate) struct SourceRt {
    pub source: Box<dyn Source>,
    pub exhausted: bool,
    /// Set once `exhausted` has been committed and counted.
    pub retired: bool,
    pub idle_until: Instant,
    pub idle_pause: std::time::Duration,
    pub last_data: Instant,
    pub position_dirty: bool,
    /// For a replayable source: positions not yet committed, oldest first.
    pub replay: Option<VecDeque<ReplayPoint>>,
}

/// A replayable source's position and the next sequence number of each of
/// its channels right after it.
pub(crate) type ReplayPoint = (Vec<u8>, Vec<(ChannelIdx, u64)>);

pub(crate) enum Body {
    Source(SourceRt),
    Compute(Box<dyn Computation>),
    Sink { sink: Box<dyn Sink>, written: bool },
}

/// Event- and processing-time timers of one shard, in memory (and mirrored
/// in RocksDB unless they follow from state).
///
/// `by_key` holds the timers that are set. `by_time` holds, per (domain,
/// time), the (key, tag) pairs set for that time, including some that were
/// moved or deleted since: a pair is checked against `by_key` when its time
/// comes, so moving or deleting a timer is one map operation. Many timers
/// share a time (a window's end, for every key), so `by_time` stays small.
#[derive(Default)]
pub(crate) struct Timers {
    by_time: BTreeMap<(TimeDomain, EventTime), DueBucket>,
    by_key: FastMap<(MapKey, MapKey), (TimeDomain, EventTime)>,
    writes: Vec<(Vec<u8>, bool)>,
    /// In memory only: the computation rebuilds them from its state at start.
    volatile: bool,
}

/// The (key, tag) pairs set for one time. Sorted (descending, so the next is
/// last) when the time comes: timers of one time fire in key order, the same
/// order whether they were set live or rebuilt after a restart.
#[derive(Default)]
struct DueBucket {
    pairs: Vec<(MapKey, MapKey)>,
    sorted: bool,
}

impl Timers {
    /// Timers kept in memory only (see `Computation::timers_follow_state`).
    pub fn volatile() -> Timers {
        Timers {
            volatile: true,
            ..Timers::default()
        }
    }

    fn record(
        &mut self,
        prefix: &[u8],
        d: TimeDomain,
        t: EventTime,
        key: &[u8],
        tag: &[u8],
        put: bool,
    ) {
        if !self.volatile {
            self.writes
                .push((layout::timer_key(prefix, d, t, key, tag), put));
        }
    }

    fn schedule(&mut self, d: TimeDomain, t: EventTime, key: MapKey, tag: MapKey) {
        let bucket = self.by_time.entry((d, t)).or_default();
        bucket.pairs.push((key, tag));
        bucket.sorted = false;
    }

    pub fn load(store: &Store, prefix: &[u8]) -> Result<Timers, StorageError> {
        let mut timers = Timers::default();
        let scan = layout::timers_prefix(prefix);
        let mut bad = 0usize;
        store.for_each_prefix(Cf::Timers, &scan, |k, _| {
            let parsed = layout::parse_timer_key(&k[scan.len()..]);
            match parsed {
                Ok((d, t, key, tag)) => {
                    let (key, tag) = (MapKey::new(&key), MapKey::new(&tag));
                    timers.by_key.insert((key.clone(), tag.clone()), (d, t));
                    timers.schedule(d, t, key, tag);
                }
                Err(_) => bad += 1,
            }
            true
        })?;
        if bad > 0 {
            tracing::warn!(bad, "skipped malformed timer keys");
        }
        Ok(timers)
    }

    pub fn set(&mut self, prefix: &[u8], key: &[u8], tag: &[u8], d: TimeDomain, t: EventTime) {
        let id = (MapKey::new(key), MapKey::new(tag));
        match self.by_key.get_mut(&id) {
            Some(at) if *at == (d, t) => return, // already set for that time
            Some(at) => {
                let (old_d, old_t) = std::mem::replace(at, (d, t));
                self.record(prefix, old_d, old_t, key, tag, false);
            }
            None => {
                self.by_key.insert(id.clone(), (d, t));
            }
        }
        self.record(prefix, d, t, key, tag, true);
        self.schedule(d, t, id.0, id.1);
    }

    pub fn delete(&mut self, prefix: &[u8], key: &[u8], tag: &[u8]) {
        let id = (MapKey::new(key), MapKey::new(tag));
        if let Some((d, t)) = self.by_key.remove(&id) {
            self.record(prefix, d, t, key, tag, false);
        }
    }

    /// Removes and returns the earliest timer of `d` whose time is before `limit`.
    pub fn pop_due(
        &mut self,
        prefix: &[u8],
        d: TimeDomain,
        limit: EventTime,
    ) -> Option<(MapKey, MapKey, EventTime)> {
        loop {
            let mut entry = self.by_time.range_mut((d, MIN_TIME)..).next()?;
            let ((domain, t), bucket) = (*entry.0, &mut entry.1);
            if domain != d || t >= limit {
                return None;
            }
            if !bucket.sorted {
                bucket.pairs.sort_unstable_by(|a, b| b.cmp(a));
                bucket.pairs.dedup();
                bucket.sorted = true;
            }
            let Some((key, tag)) = bucket.pairs.pop() else {
                self.by_time.remove(&(d, t));
                continue;
            };
            // Skip pairs whose timer was moved or deleted since.
            if let Entry::Occupied(set) = self.by_key.entry((key, tag)) {
                if *set.get() == (d, t) {
                    let ((key, tag), _) = set.remove_entry();
                    self.record(prefix, d, t, key.as_bytes(), tag.as_bytes(), false);
                    return Some((key, tag, t));
                }
            }
        }
    }

    /// The earliest processing time a timer may be due (perhaps one moved since).
    pub fn next_processing(&self) -> Option<EventTime> {
        self.by_time
            .range((TimeDomain::ProcessingTime, MIN_TIME)..)
            .next()
            .map(|((_, t), _)| *t)
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    fn flush(&mut self, batch: &mut Batch<'_>) {
        for (k, put) in self.writes.drain(..) {
            if put {
                batch.put(Cf::Timers, &k, &[]);
            } else {
                batch.delete(Cf::Timers, &k);
            }
        }
    }
}

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
    fn get(&self, key: &[u8]) -> Option<&Option<Bytes>> {
        self.map.get(key).map(|s| &s.value)
    }

    /// Remembers the committed state of `key`, just read from RocksDB.
    fn fill(&mut self, key: &[u8], value: Option<Bytes>) {
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
    fn set(&mut self, key: &[u8], value: Option<Bytes>) {
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
    fn commit(&mut self, mut write: impl FnMut(&[u8], Option<&Bytes>)) {
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

    pub fn delete_timer(&mut self, tag: &[u8]) {
        self.timers.delete(self.prefix, self.key, tag);
    }

    pub fn low_watermark(&self) -> EventTime {
        self.input_wm
    }
}

/// Everything the executor keeps for one shard.
pub(crate) struct ShardRt {
    pub sid: Sid,
    pub node: NodeIdx,
    pub prefix: Vec<u8>,
    pub body: Body,
    pub inputs: FastMap<ChannelIdx, InChannel>,
    pub applied_dirty: BTreeSet<ChannelIdx>,
    pub outs: FastMap<ChannelIdx, OutChannel>,
    pub pending: VecDeque<(ChannelIdx, u64, Envelope)>,
    pub state: KeyedState,
    pub timers: Timers,
    pub upstream_wm: Vec<EventTime>,
    /// Per upstream shard: it said it is idle (left out of the minimum).
    pub upstream_idle: Vec<bool>,
    pub input_wm: EventTime,
    pub output_wm: EventTime,
    /// This shard told (or will tell) its consumers it is idle.
    pub output_idle: bool,
    pub wm_changed: bool,
    /// Multiset of the event times of unacknowledged productions.
    pub unacked_ts: BTreeMap<EventTime, u32>,
    pub backlog: usize,
    pub max_event: EventTime,
    /// Records the computation dropped by design (`Context::discard`), not
    /// yet counted in the metrics.
    pub discarded: u64,
}

/// What a computation's context needs beyond the shard itself.
pub(crate) struct KeyEnv<'a> {
    pub store: &'a Store,
    pub emits: &'a mut Vec<Emit>,
    pub ports: &'a [String],
    pub ingest: i64,
    pub input: &'a str,
}

impl ShardRt {
    /// Runs `f` with this shard's computation and a context scoped to `key`;
    /// `None` if the shard is not a computation.
    pub fn with_key<R>(
        &mut self,
        env: KeyEnv<'_>,
        key: &Bytes,
        f: impl FnOnce(&mut dyn Computation, &mut Context<'_>) -> R,
    ) -> Option<R> {
        let Body::Compute(comp) = &mut self.body else {
            return None;
        };
        let mut ctx = Context {
            scope: KeyScope {
                key,
                store: env.store,
                prefix: &self.prefix,
                state: &mut self.state,
                timers: &mut self.timers,
                emits: env.emits,
                ports: env.ports,
                input_wm: self.input_wm,
                ingest: env.ingest,
                input: env.input,
                discarded: &mut self.discarded,
            },
        };
        Some(f(comp.as_mut(), &mut ctx))
    }

    /// Whether productions go to the outbox (all but replayable sources).
    pub fn uses_outbox(&self) -> bool {
        !matches!(
            &self.body,
            Body::Source(SourceRt {
                replay: Some(_),
                ..
            })
        )
    }

    /// After a replayable source's poll has been routed: remember its position
    /// and the sequence numbers that follow it.
    pub fn note_replay_point(&mut self) {
        if let Body::Source(src) = &mut self.body {
            if let Some(pending) = &mut src.replay {
                if std::mem::take(&mut src.position_dirty) {
                    let seqs = self
                        .outs
                        .iter()
                        .map(|(ch, o)| (*ch, o.next_seq()))
                        .collect();
                    pending.push_back((src.source.position(), seqs));
                }
            }
        }
    }

    pub fn track_unacked(&mut self, ts: EventTime) {
        *self.unacked_ts.entry(ts).or_insert(0) += 1;
        self.backlog += 1;
    }

    pub fn untrack_unacked(&mut self, ts: EventTime) {
        // One search of the tree, not two.
        if let btree_map::Entry::Occupied(mut n) = self.unacked_ts.entry(ts) {
            *n.get_mut() -= 1;
            if *n.get() == 0 {
                n.remove();
            }
        }
        self.backlog -= 1;
    }

    /// Upstream shard `pos` reported watermark `wm` and whether it is idle.
    pub fn upstream_watermark(&mut self, pos: usize, wm: EventTime, idle: bool) {
        self.upstream_wm[pos] = self.upstream_wm[pos].max(wm);
        self.upstream_idle[pos] = idle;
        self.recompute_input_wm();
    }

    /// The input watermark: the minimum over the upstream shards that are
    /// not idle or, when all are idle, the maximum over all of them (as
    /// Flink's watermark valve). It never moves back: records that arrive
    /// behind it once an idle input wakes up are late.
    pub fn recompute_input_wm(&mut self) {
        let active = self
            .upstream_wm
            .iter()
            .zip(&self.upstream_idle)
            .filter(|(_, idle)| !**idle)
            .map(|(wm, _)| *wm)
            .min();
        let wm = active
            .or_else(|| self.upstream_wm.iter().copied().max())
            .unwrap_or(MIN_TIME);
        self.input_wm = self.input_wm.max(wm);
    }

    /// Whether every upstream shard is idle and nothing of this shard is
    /// waiting or unacknowledged: then its consumers need not wait for it.
    fn inputs_idle(&self) -> bool {
        !self.upstream_idle.is_empty()
            && self.upstream_idle.iter().all(|i| *i)
            && self.pending.is_empty()
            && self.backlog == 0
    }

    /// Recomputes the output watermark (never letting it move back) and
    /// whether this shard is idle. A source passes its own watermark and
    /// idleness; other shards derive both from their inputs.
    pub fn recompute_output_wm(&mut self, source_wm: Option<(EventTime, bool)>) {
        let (base, idle) = source_wm.unwrap_or((self.input_wm, self.inputs_idle()));
        if idle != self.output_idle {
            self.output_idle = idle;
            self.wm_changed = true;
        }
        let oldest = self
            .unacked_ts
            .keys()
            .next()
            .copied()
            .unwrap_or(EventTime::MAX);
        let wm = base.min(oldest);
        if wm > self.output_wm {
            self.output_wm = wm;
            self.wm_changed = true;
        }
    }

    /// Writes everything this shard changed since the last commit into `batch`.
    pub fn checkpoint(
        &mut self,
        batch: &mut Batch<'_>,
        channels: &[crate::plan::ChannelSpec],
        sync_sinks: bool,
    ) -> Result<(), crate::EngineError> {
        let (prefix, mut key) = (&self.prefix, Vec::new());
        self.state.commit(|k, v| {
            write_state_key(&mut key, prefix, k);
            batch.put_state(&key, v.map(|v| &v[..]));
        });
        self.timers.flush(batch);
        for ch in std::mem::take(&mut self.applied_dirty) {
            if let Some(i) = self.inputs.get(&ch) {
                batch.put(
                    Cf::Channels,
                    &channels[ch as usize].applied_key,
                    &i.applied().to_be_bytes(),
                );
            }
        }
        if let Body::Source(SourceRt {
            replay: Some(pending),
            ..
        }) = &mut self.body
        {
            // Commit the newest position whose productions are all acknowledged,
            // with the sequence numbers that follow it; what comes after it is
            // replayed, with the same numbers, after a crash.
            let mut ready = None;
            while let Some((_, seqs)) = pending.front() {
                let acked = seqs
                    .iter()
                    .all(|(ch, next)| self.outs.get(ch).is_some_and(|o| o.acked() + 1 >= *next));
                if !acked {
                    break;
                }
                ready = pending.pop_front();
            }
            if let Some((position, seqs)) = ready {
                batch.put(Cf::Meta, &position_key(&self.prefix), &position);
                for (ch, next) in seqs {
                    batch.put(
                        Cf::Channels,
                        &channels[ch as usize].next_key,
                        &next.to_be_bytes(),
                    );
                }
            }
        } else {
            for (ch, out) in self.outs.iter_mut() {
                if out.take_dirty() {
                    batch.put(
                        Cf::Channels,
                        &channels[*ch as usize].next_key,
                        &out.next_seq().to_be_bytes(),
                    );
                }
            }
        }
        match &mut self.body {
            Body::Source(s) if s.position_dirty && s.replay.is_none() => {
                batch.put(Cf::Meta, &position_key(&self.prefix), &s.source.position());
                s.position_dirty = false;
            }
            Body::Sink { sink, written } if *written => {
                let pos = sink.flush(sync_sinks).map_err(crate::EngineError::Sink)?;
                crate::failpoint::hit(crate::failpoint::Point::SinkFlushed);
                batch.put(Cf::Meta, &position_key(&self.prefix), &pos);
                *written = false;
            }
            _ => {}
        }
        if self.wm_changed {
            batch.put(
                Cf::Meta,
                &watermark_key(&self.prefix),
                &self.output_wm.to_be_bytes(),
            );
        }
        Ok(())
    }
}

/// A committed source or sink position in printable form (text positions as
/// they are, 8-byte counters as numbers).
pub(crate) fn printable_position(v: &[u8]) -> String {
    if v.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        String::from_utf8_lossy(v).into_owned()
    } else {
        read_u64(v).map_or_else(|| format!("{v:?}"), |n| n.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(t: &mut Timers, d: TimeDomain, limit: EventTime) -> Vec<(String, String, EventTime)> {
        std::iter::from_fn(|| t.pop_due(b"p", d, limit))
            .map(|(k, tag, at)| {
                let s = |x: MapKey| String::from_utf8_lossy(x.as_bytes()).into_owned();
                (s(k), s(tag), at)
            })
            .collect()
    }

    #[test]
    fn timers_of_one_time_fire_in_bytewise_key_order() {
        let mut t = Timers::default();
        let keys = [
            "0123456789abcdefZ",
            "0123456789abcdef",
            "0123456789abcdefA",
            // Longer than a map key holds in place.
            "0123456789abcdef0123456789",
            "0123456789abcdef01234567",
            "1",
            "0",
            "",
        ];
        for k in keys {
            t.set(b"p", k.as_bytes(), b"x", TimeDomain::EventTime, 7);
        }
        let mut want: Vec<&str> = keys.to_vec();
        want.sort();
        let got: Vec<String> = drain(&mut t, TimeDomain::EventTime, 8)
            .into_iter()
            .map(|(k, _, _)| k)
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn timers_fire_once_in_time_then_key_order_after_moves_and_deletes() {
        use TimeDomain::{EventTime as E, ProcessingTime as P};
        let mut t = Timers::default();
        t.set(b"p", b"b", b"x", E, 10);
        t.set(b"p", b"a", b"x", E, 10);
        t.set(b"p", b"c", b"x", E, 5);
        // Moved away and back: still one timer.
        t.set(b"p", b"d", b"x", E, 10);
        t.set(b"p", b"d", b"x", E, 30);
        t.set(b"p", b"d", b"x", E, 10);
        // Moved later, then deleted.
        t.set(b"p", b"e", b"x", E, 10);
        t.set(b"p", b"e", b"x", E, 20);
        t.set(b"p", b"f", b"y", E, 10);
        t.delete(b"p", b"f", b"y");
        t.set(b"p", b"a", b"p", P, 1);
        assert_eq!(t.len(), 6);
        assert_eq!(drain(&mut t, E, 5), []);
        let got = drain(&mut t, E, 11);
        let want = [
            ("c", "x", 5),
            ("a", "x", 10),
            ("b", "x", 10),
            ("d", "x", 10),
        ];
        let want: Vec<_> = want
            .iter()
            .map(|(k, g, at)| (k.to_string(), g.to_string(), *at))
            .collect();
        assert_eq!(got, want);
        // A timer set again for a time already passed fires at once.
        t.set(b"p", b"a", b"x", E, 10);
        assert_eq!(drain(&mut t, E, 11), [("a".into(), "x".into(), 10)]);
        assert_eq!(drain(&mut t, E, 100), [("e".into(), "x".into(), 20)]);
        assert_eq!(t.next_processing(), Some(1));
        assert_eq!(drain(&mut t, P, 2), [("a".into(), "p".into(), 1)]);
        assert_eq!((t.len(), t.next_processing()), (0, None));
    }

    #[test]
    fn persisted_timers_write_each_set_move_and_fire_but_volatile_ones_do_not() {
        let mut t = Timers::default();
        t.set(b"p", b"k", b"x", TimeDomain::EventTime, 1);
        t.set(b"p", b"k", b"x", TimeDomain::EventTime, 1);
        t.set(b"p", b"k", b"x", TimeDomain::EventTime, 2);
        t.pop_due(b"p", TimeDomain::EventTime, 3);
        let kinds: Vec<bool> = t.writes.iter().map(|w| w.1).collect();
        assert_eq!(kinds, [true, false, true, false]);
        let mut v = Timers::volatile();
        v.set(b"p", b"k", b"x", TimeDomain::EventTime, 1);
        v.pop_due(b"p", TimeDomain::EventTime, 3);
        assert!(v.writes.is_empty());
    }
}
