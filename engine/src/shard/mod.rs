//! One shard's in-memory view: its channels, the state and timers changed
//! since the last commit, and its watermarks. The executor owns it and
//! checkpoints it ([`ShardRt::checkpoint`]) into each commit.

use crate::api::{Computation, Context, Source};
use crate::delivery::{InChannel, Offer, OutChannel};
use crate::keyed_state::KeyedState;
use crate::layout::{position_key, read_u64, watermark_key, write_state_key};
use crate::mapkey::{FastMap, MapKey};
use crate::message::Msg;
use crate::plan::{ChannelIdx, NodeIdx, Plan, Sid};
use crate::record::{Envelope, EventTime, MIN_TIME};
use crate::routes::Routes;
use crate::scope::{Clock, Emit, KeyScope};
use crate::timers::Timers;
use bytes::Bytes;
use millrace_storage::{Batch, Cf, Store};
use std::collections::{btree_map, BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

mod recover;
mod replay;
mod sink;
#[cfg(test)]
mod tests;

pub(crate) use recover::restore_timers;
pub(crate) use replay::{send_early, ReplayLog};
pub(crate) use sink::SinkRt;

/// How long a source that had nothing is left alone: doubling from the first
/// to the last while it stays idle, back to the first when data comes. The
/// last is the latency a record arriving at an idle source can wait before
/// it is read (a Kafka source's records come in fetches some milliseconds
/// apart); an empty poll costs microseconds.
pub(crate) const SOURCE_IDLE_PAUSE: (Duration, Duration) =
    (Duration::from_micros(200), Duration::from_millis(4));

/// A source's runtime: the source and how its polling goes.
pub(crate) struct SourceRt {
    pub source: Box<dyn Source>,
    pub exhausted: bool,
    /// Set once `exhausted` has been committed and counted.
    pub retired: bool,
    pub idle_until: Instant,
    pub idle_pause: std::time::Duration,
    pub last_data: Instant,
    /// It read something since its position was last checkpointed.
    pub position_dirty: bool,
}

pub(crate) enum Body {
    Source(SourceRt),
    Compute(Box<dyn Computation>),
    Sink(SinkRt),
}

/// Everything the executor keeps for one shard. Its fields are private: the
/// methods keep them consistent with each other (the backlog with the event
/// times of the unacknowledged productions, the output watermark with both,
/// each applied sequence number with the flag that checkpoints it).
pub(crate) struct ShardRt {
    sid: Sid,
    node: NodeIdx,
    prefix: Vec<u8>,
    /// What the shard runs; the executor drives it.
    pub body: Body,
    inputs: FastMap<ChannelIdx, InChannel>,
    applied_dirty: BTreeSet<ChannelIdx>,
    outs: FastMap<ChannelIdx, OutChannel>,
    /// For a replayable source only: its productions bypass the outbox.
    replay: Option<ReplayLog>,
    pending: VecDeque<(ChannelIdx, u64, Envelope)>,
    state: KeyedState,
    timers: Timers,
    upstream_wm: Vec<EventTime>,
    /// Per upstream shard: it said it is idle (left out of the minimum).
    upstream_idle: Vec<bool>,
    input_wm: EventTime,
    output_wm: EventTime,
    /// This shard told (or will tell) its consumers it is idle.
    output_idle: bool,
    wm_changed: bool,
    /// Multiset of the event times of unacknowledged productions.
    unacked_ts: BTreeMap<EventTime, u32>,
    /// How many productions are unacknowledged (the size of `unacked_ts`).
    backlog: usize,
    max_event: EventTime,
    /// Records the computation dropped by design (`Context::discard`), not
    /// yet counted in the metrics.
    discarded: u64,
    /// Outbox key prefixes of the channels this shard produced on, built
    /// once each (the plan builds them on demand; a production needs one).
    outbox_prefixes: FastMap<ChannelIdx, Vec<u8>>,
}

/// What a computation's context needs beyond the shard itself.
pub(crate) struct KeyEnv<'a> {
    pub store: &'a Store,
    pub emits: &'a mut Vec<Emit>,
    pub ports: &'a [String],
    pub ingest: i64,
    pub input: &'a str,
    pub clock: Clock,
}

impl ShardRt {
    /// A shard with no channels yet and every watermark at the start of
    /// time; [`ShardRt::recover`] fills in what its store holds.
    pub fn new(
        sid: Sid,
        node: NodeIdx,
        prefix: Vec<u8>,
        body: Body,
        state: KeyedState,
        timers: Timers,
    ) -> ShardRt {
        ShardRt {
            sid,
            node,
            prefix,
            body,
            inputs: FastMap::default(),
            applied_dirty: BTreeSet::new(),
            outs: FastMap::default(),
            replay: None,
            pending: VecDeque::new(),
            state,
            timers,
            upstream_wm: Vec::new(),
            upstream_idle: Vec::new(),
            input_wm: MIN_TIME,
            output_wm: MIN_TIME,
            output_idle: false,
            wm_changed: false,
            unacked_ts: BTreeMap::new(),
            backlog: 0,
            max_event: MIN_TIME,
            discarded: 0,
            outbox_prefixes: FastMap::default(),
        }
    }

    pub fn sid(&self) -> Sid {
        self.sid
    }

    /// The plan's node this shard is a shard of.
    pub fn node(&self) -> NodeIdx {
        self.node
    }

    /// The key prefix of everything this shard stores.
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    pub fn timers(&self) -> &Timers {
        &self.timers
    }

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
                clock: env.clock,
            },
        };
        Some(f(comp.as_mut(), &mut ctx))
    }

    /// The next timer of `domain` due before `limit`, taken out of the
    /// timers (its deletion goes into the next checkpoint).
    pub fn pop_due_timer(
        &mut self,
        domain: crate::record::TimeDomain,
        limit: EventTime,
    ) -> Option<(MapKey, MapKey, EventTime)> {
        self.timers.pop_due(&self.prefix, domain, limit)
    }

    /// Records dropped by design and not yet counted.
    pub fn discarded(&self) -> u64 {
        self.discarded
    }

    /// Records dropped by design since the last call.
    pub fn take_discarded(&mut self) -> u64 {
        std::mem::take(&mut self.discarded)
    }

    // Inputs.

    /// Queues a delivery received on `ch` for the next turn.
    pub fn receive(&mut self, ch: ChannelIdx, seq: u64, env: Envelope) {
        self.pending.push_back((ch, seq, env));
    }

    /// The oldest delivery not yet taken.
    pub fn next_pending(&mut self) -> Option<(ChannelIdx, u64, Envelope)> {
        self.pending.pop_front()
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Offers delivery `seq` on input `ch` (see [`InChannel::offer`]); an
    /// applied one is checkpointed with the turn. `None` for a channel this
    /// shard does not consume.
    pub fn offer(&mut self, ch: ChannelIdx, seq: u64) -> Option<Offer> {
        let offer = self.inputs.get_mut(&ch)?.offer(seq);
        if offer == Offer::Apply {
            self.applied_dirty.insert(ch);
        }
        Some(offer)
    }

    /// The highest sequence number applied on input `ch` (0: none).
    pub fn applied(&self, ch: ChannelIdx) -> u64 {
        self.inputs.get(&ch).map_or(0, InChannel::applied)
    }

    /// What may be acknowledged on input `ch`: what is applied there,
    /// except at a sink that defers, where it is what is durable.
    pub fn acknowledgeable(&self, ch: ChannelIdx) -> u64 {
        let applied = self.applied(ch);
        match &self.body {
            Body::Sink(s) => s.acknowledgeable(ch, applied),
            _ => applied,
        }
    }

    /// Whether this is a sink that defers durability (its deliveries are
    /// acknowledged at the checkpoint that finds them durable).
    pub fn defers(&self) -> bool {
        matches!(&self.body, Body::Sink(s) if s.defers())
    }

    /// The input channels and what each may acknowledge
    /// ([`ShardRt::acknowledgeable`]).
    pub fn acknowledgeable_by_input(&self) -> impl Iterator<Item = (ChannelIdx, u64)> + '_ {
        self.inputs.keys().map(|&ch| (ch, self.acknowledgeable(ch)))
    }

    /// Notes the event time of a record taken in; returns whether it is
    /// behind the input watermark (late).
    pub fn saw_event(&mut self, ts: EventTime) -> bool {
        self.max_event = self.max_event.max(ts);
        ts < self.input_wm
    }

    /// The newest event time taken in.
    pub fn max_event(&self) -> EventTime {
        self.max_event
    }

    // Outputs.

    /// Whether productions go to the outbox (all but replayable sources).
    pub fn uses_outbox(&self) -> bool {
        self.replay.is_none()
    }

    /// Productions sent and not acknowledged yet.
    pub fn backlog(&self) -> usize {
        self.backlog
    }

    /// Numbers production `env` on `ch`; returns its sequence number.
    pub fn produce(&mut self, ch: ChannelIdx, env: Envelope) -> u64 {
        self.track_unacked(env.timestamp());
        self.outs
            .entry(ch)
            .or_insert_with(|| OutChannel::new(1))
            .push(env)
    }

    /// The outbox key prefix of output channel `ch`, built once.
    pub fn outbox_prefix(&mut self, plan: &Plan, ch: ChannelIdx) -> &[u8] {
        self.outbox_prefixes
            .entry(ch)
            .or_insert_with(|| plan.outbox_prefix(ch))
    }

    /// Takes an acknowledgement of `ch` up to `upto`; calls `released` with
    /// each production it releases. Returns how many.
    pub fn ack(
        &mut self,
        ch: ChannelIdx,
        upto: u64,
        mut released: impl FnMut(u64, &Envelope),
    ) -> usize {
        let Some(out) = self.outs.get_mut(&ch) else {
            return 0;
        };
        let (unacked_ts, backlog) = (&mut self.unacked_ts, &mut self.backlog);
        out.ack(upto, |seq, env| {
            untrack(unacked_ts, backlog, env.timestamp());
            released(seq, env);
        })
    }

    /// Everything unacknowledged on the output channels `to` selects goes
    /// out again (their consumer restarted or reconnected).
    pub fn rewind(&mut self, mut to: impl FnMut(ChannelIdx) -> bool) {
        for (&ch, out) in self.outs.iter_mut() {
            if to(ch) {
                out.rewind();
            }
        }
    }

    /// Re-sends with backoff what waited too long for an acknowledgement;
    /// returns how many productions.
    pub fn retry_due(&mut self, now: Instant, first: Duration, max: Duration) -> u64 {
        self.outs
            .values_mut()
            .map(|out| out.retry_due(now, first, max))
            .sum()
    }

    /// Queues the productions that may be sent now (within each channel's
    /// window) in `queues`, by destination as worker `me`'s `routes` give
    /// it, marking them sent. What is for a shard nobody runs now (moving)
    /// stays unsent until it has a route again.
    pub fn queue_sends(
        &mut self,
        plan: &Plan,
        (routes, me): (&Routes, usize),
        queues: &mut [Vec<Msg>],
    ) {
        let engine = &plan.topology.engine;
        for (&ch, out) in self.outs.iter_mut() {
            if out.has_unsent() {
                let Some(to) = routes.destination(me, plan.chan(ch).dst) else {
                    continue;
                };
                let q = &mut queues[to];
                out.sendable(
                    engine.channel_window,
                    engine.channel_window_bytes,
                    |seq, env| {
                        q.push(Msg::Deliver {
                            ch,
                            seq,
                            env: env.clone(),
                        })
                    },
                );
            }
        }
    }

    fn track_unacked(&mut self, ts: EventTime) {
        *self.unacked_ts.entry(ts).or_insert(0) += 1;
        self.backlog += 1;
    }

    // Watermarks.

    /// The input low watermark.
    pub fn input_wm(&self) -> EventTime {
        self.input_wm
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
    fn recompute_input_wm(&mut self) {
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

    /// The output watermark and idleness.
    pub fn output_wm(&self) -> (EventTime, bool) {
        (self.output_wm, self.output_idle)
    }

    /// The consumers must be told the output watermark again (one of them
    /// restarted or reconnected).
    pub fn resend_watermark(&mut self) {
        self.wm_changed = true;
    }

    /// The output watermark and idleness if they changed since the last
    /// call (persisted by the checkpoint before; see [`ShardRt::checkpoint`]).
    pub fn take_wm_change(&mut self) -> Option<(EventTime, bool)> {
        std::mem::take(&mut self.wm_changed).then_some((self.output_wm, self.output_idle))
    }

    // Checkpoint.

    /// After a replayable source's poll has been routed: remember its
    /// position and the sequence numbers that follow it (see [`ReplayLog`]).
    pub fn note_replay_point(&mut self) {
        if let (Some(log), Body::Source(src)) = (&mut self.replay, &mut self.body) {
            if std::mem::take(&mut src.position_dirty) {
                log.note(src.source.position(), &self.outs);
            }
        }
    }

    /// Writes the state and timers changed since the last commit into `batch`.
    pub fn checkpoint_state(&mut self, batch: &mut Batch<'_>) {
        let (prefix, mut key) = (&self.prefix, Vec::new());
        self.state.commit(|k, v| {
            write_state_key(&mut key, prefix, k);
            batch.put_state(&key, v.map(|v| &v[..]));
        });
        self.timers.flush(batch);
    }

    /// Writes everything this shard changed since the last commit into
    /// `batch`. A sink that defers adds to `acks` what became durable.
    pub fn checkpoint(
        &mut self,
        batch: &mut Batch<'_>,
        plan: &Plan,
        sync_sinks: bool,
        acks: &mut BTreeMap<ChannelIdx, u64>,
    ) -> Result<(), crate::error::EngineError> {
        self.checkpoint_state(batch);
        let applied_dirty = std::mem::take(&mut self.applied_dirty);
        if !self.defers() {
            for ch in applied_dirty {
                if let Some(i) = self.inputs.get(&ch) {
                    batch.put(
                        Cf::Channels,
                        &plan.applied_seq_key(ch),
                        &i.applied().to_be_bytes(),
                    );
                }
            }
        }
        if let Some(log) = &mut self.replay {
            log.checkpoint(batch, plan, &self.prefix, &self.outs);
        } else {
            for (ch, out) in self.outs.iter_mut() {
                if out.take_dirty() {
                    batch.put(
                        Cf::Channels,
                        &plan.next_seq_key(*ch),
                        &out.next_seq().to_be_bytes(),
                    );
                }
            }
        }
        match &mut self.body {
            Body::Source(s) if s.position_dirty && self.replay.is_none() => {
                batch.put(Cf::Meta, &position_key(&self.prefix), &s.source.position());
                s.position_dirty = false;
            }
            Body::Sink(s) if s.defers() => {
                let durable = s.take_durable().map_err(crate::error::EngineError::Sink)?;
                if let Some(now) = durable {
                    crate::failpoint::hit(crate::failpoint::Point::SinkFlushed);
                    for (ch, seq) in now.applied {
                        batch.put(Cf::Channels, &plan.applied_seq_key(ch), &seq.to_be_bytes());
                        acks.insert(ch, seq);
                    }
                    batch.put(Cf::Meta, &position_key(&self.prefix), &now.position);
                }
            }
            Body::Sink(s) if s.written => {
                let pos = s
                    .sink
                    .flush(sync_sinks)
                    .map_err(crate::error::EngineError::Sink)?;
                crate::failpoint::hit(crate::failpoint::Point::SinkFlushed);
                batch.put(Cf::Meta, &position_key(&self.prefix), &pos);
                s.written = false;
            }
            _ => {}
        }
        self.checkpoint_watermark(batch);
        Ok(())
    }

    /// Writes the output watermark into `batch` if it changed since it was
    /// last taken ([`ShardRt::take_wm_change`]): consumers are told a
    /// watermark only after it is committed, and [`ShardRt::restore_watermarks`]
    /// reads it back at start.
    pub fn checkpoint_watermark(&self, batch: &mut Batch<'_>) {
        if self.wm_changed {
            batch.put(
                Cf::Meta,
                &watermark_key(&self.prefix),
                &self.output_wm.to_be_bytes(),
            );
        }
    }
}

/// Takes one production of event time `ts` out of the unacknowledged ones.
fn untrack(unacked_ts: &mut BTreeMap<EventTime, u32>, backlog: &mut usize, ts: EventTime) {
    // One search of the tree, not two.
    if let btree_map::Entry::Occupied(mut n) = unacked_ts.entry(ts) {
        *n.get_mut() -= 1;
        if *n.get() == 0 {
            n.remove();
        }
    }
    *backlog -= 1;
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
