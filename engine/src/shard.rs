//! One shard's in-memory view: its channels, the state and timers changed
//! since the last commit, and its watermarks. The executor owns it and
//! checkpoints it ([`ShardRt::checkpoint`]) into each commit.

use crate::api::{Computation, Context, Sink, Source};
use crate::delivery::{InChannel, OutChannel};
use crate::keyed_state::KeyedState;
use crate::layout::{position_key, read_u64, watermark_key, write_state_key};
use crate::mapkey::FastMap;
use crate::plan::{ChannelIdx, NodeIdx, Sid};
use crate::record::{Envelope, EventTime, MIN_TIME};
use crate::scope::{Clock, Emit, KeyScope};
use crate::timers::Timers;
use bytes::Bytes;
use millrace_storage::{Batch, Cf, Store};
use std::collections::{btree_map, BTreeMap, BTreeSet, VecDeque};
use std::time::Instant;

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
    /// Outbox key prefixes of the channels this shard produced on, built
    /// once each (the plan builds them on demand; a production needs one).
    pub outbox_prefixes: FastMap<ChannelIdx, Vec<u8>>,
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
    /// time; the executor's recovery fills in what its store holds.
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
        plan: &crate::plan::Plan,
        sync_sinks: bool,
    ) -> Result<(), crate::error::EngineError> {
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
                    &plan.applied_seq_key(ch),
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
                    batch.put(Cf::Channels, &plan.next_seq_key(ch), &next.to_be_bytes());
                }
            }
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
            Body::Source(s) if s.position_dirty && s.replay.is_none() => {
                batch.put(Cf::Meta, &position_key(&self.prefix), &s.source.position());
                s.position_dirty = false;
            }
            Body::Sink { sink, written } if *written => {
                let pos = sink
                    .flush(sync_sinks)
                    .map_err(crate::error::EngineError::Sink)?;
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
