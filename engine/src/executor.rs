//! The commit loop. One executor thread runs a fixed set of shards serially;
//! executors run in parallel. Each turn of the loop:
//!
//! 1. takes the messages waiting in its inbox: deliveries, acknowledgements,
//!    watermarks;
//! 2. drops each delivery whose sequence number its shard already applied (and
//!    acknowledges it again);
//! 3. runs the computations on the rest, one record at a time, and polls the
//!    sources; state, timers and productions collect in memory and in a batch;
//! 4. fires the timers the watermark (or the clock) has passed;
//! 5. commits ONE RocksDB batch: state, timers, productions (the outbox),
//!    applied and next sequence numbers, positions, watermarks;
//! 6. only then acknowledges its inputs and sends its productions.
//!
//! The order commit -> acknowledge -> send is the exactly-once guarantee. It is
//! enforced by types: acknowledgements and sends are released only through
//! [`Executor::release`] and [`flush_outgoing`], which take the
//! [`Committed`] proof that only [`Executor::commit`] makes. The one
//! exception needs no commit and has its own path, [`send_replayable`]: a
//! replayable source's productions are not checkpointed at all (after a crash
//! the source replays them from its committed position with the same
//! sequence numbers, and receivers drop what they already applied), so they
//! are sent as soon as they are polled. Tests crash the worker between these
//! steps on purpose (`failpoint.rs`). All RocksDB calls happen on this
//! thread, never on an async runtime.

use crate::api::{ComputationError, DeliveryId, Emitter, SourcePoll};
use crate::error::EngineError;
use crate::failpoint::{self, Point};
use crate::layout;
use crate::mapkey::FastMap;
use crate::message::{Msg, Outlet};
use crate::metrics::NodeMetrics;
use crate::plan::{ChannelIdx, Plan, Sid, ERRORS_PORT_INDEX};
use crate::record::{is_valid_event_time, now_micros, TimeDomain, Timer, MAX_TIME};
use crate::router::{bad_record, route};
use crate::scope::{Clock, Emit};
use crate::shard::{Body, KeyEnv, ShardRt};
use crate::shared::{Handed, Shared};
use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use millrace_storage::{Batch, Cf, Store};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How far the current turn has got.
struct Turn {
    started: Instant,
    /// How long it may run.
    budget: Duration,
    out_of_time: bool,
    /// Records taken in (deliveries applied, records polled).
    processed: usize,
}

/// Proof that the current batch is durable. Only [`Executor::commit`] makes
/// one, and only [`flush_outgoing`] (through [`Executor::release`]) takes it:
/// acknowledgements, productions of computations and watermarks cannot
/// leave an executor before its turn's commit. (`with_something` says
/// whether the turn committed anything.)
#[must_use = "acknowledgements and productions wait for this proof"]
pub(crate) struct Committed {
    with_something: bool,
}

/// First and longest wait for an acknowledgement before productions are sent
/// again. In-process channels lose nothing, so this only matters after a
/// consumer stalled; it bounds how long any loss would go unnoticed.
const RETRY_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));

/// Acknowledged productions are deleted from the outbox one by one, and with
/// one range delete only from this many on. RocksDB fragments every range
/// tombstone of a memtable when it switches, in the write path: at P3's load,
/// one range per channel and acknowledgement held every commit up for
/// 15-25 ms at each outbox memtable switch (perf: `SwitchMemtable` ->
/// `ConstructFragmentedRangeTombstones`).
const RANGE_DELETE_MIN: u64 = 64;

/// How far apart the watermarks of an idle source are, as it follows the
/// clock: each step is one commit and one message to each consumer.
const IDLE_WATERMARK_STEP: Duration = Duration::from_secs(1);

/// How long an idle executor waits for a message before it looks around again.
const IDLE_WAIT: Duration = Duration::from_millis(20);
/// How long a source that had nothing is left alone: doubling from the first
/// to the last while it stays idle, back to the first when data comes.
pub(crate) const SOURCE_IDLE_PAUSE: (Duration, Duration) =
    (Duration::from_micros(200), Duration::from_millis(20));

pub(crate) struct Executor {
    id: usize,
    /// This worker's index in the cluster (0 alone).
    me: usize,
    plan: Arc<Plan>,
    store: Arc<Store>,
    shared: Arc<Shared>,
    inbox: Receiver<Vec<Msg>>,
    /// By destination: executors `0..threads` of this worker, then workers.
    peers: Vec<Outlet>,
    shards: Vec<ShardRt>,
    local: FastMap<Sid, usize>,
    /// Per local shard: the destinations its watermark goes to (local
    /// executors, and each other worker once).
    wm_dests: Vec<Vec<usize>>,
    /// For each upstream shard, the local shards (and upstream positions) it bounds.
    wm_subscribers: FastMap<Sid, Vec<(usize, usize)>>,
    node_metrics: Arc<[NodeMetrics]>,
    outgoing: Vec<Vec<Msg>>,
    /// Per destination: a replayable source's deliveries, sent before the
    /// commit (see [`send_replayable`]).
    replay_out: Vec<Vec<Msg>>,
    emits: Vec<Emit>,
    /// Highest sequence to acknowledge per input channel, after the commit.
    acks: BTreeMap<ChannelIdx, u64>,
    /// Outbox ranges `(channel, first, last)` released by acknowledgements,
    /// deleted in the next commit (one range delete per channel and ack).
    released: Vec<(ChannelIdx, u64, u64)>,
    /// Scratch space for the event times of released productions.
    released_ts: Vec<i64>,
    released_count: i64,
    produced_count: i64,
    wm_msgs_seen: i64,
    /// The shard a turn starts with (rotates).
    first_shard: usize,
    /// Scratch: the order shards are served in this turn.
    order: Vec<usize>,
    /// Recent duration of a commit (moving average).
    commit_time: Duration,
}

impl Executor {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        (me, id): (usize, usize),
        plan: Arc<Plan>,
        store: Arc<Store>,
        shared: Arc<Shared>,
        inbox: Receiver<Vec<Msg>>,
        peers: Vec<Outlet>,
        node_metrics: Vec<NodeMetrics>,
    ) -> Self {
        let destinations = plan.threads + plan.workers;
        Executor {
            id,
            me,
            plan,
            store,
            shared,
            inbox,
            peers,
            shards: Vec::new(),
            local: FastMap::default(),
            wm_subscribers: FastMap::default(),
            wm_dests: Vec::new(),
            node_metrics: node_metrics.into(),
            outgoing: (0..destinations).map(|_| Vec::new()).collect(),
            replay_out: (0..destinations).map(|_| Vec::new()).collect(),
            emits: Vec::new(),
            acks: BTreeMap::new(),
            released: Vec::new(),
            released_ts: Vec::new(),
            released_count: 0,
            produced_count: 0,
            wm_msgs_seen: 0,
            first_shard: 0,
            order: Vec::new(),
            commit_time: Duration::ZERO,
        }
    }

    /// Rebuilds this executor's shards from their last commit.
    pub fn recover(&mut self) -> Result<(), EngineError> {
        let plan = Arc::clone(&self.plan);
        let store = &*self.store;
        for (sid, spec) in plan.shards.iter().enumerate() {
            if spec.worker != self.me || spec.executor != self.id {
                continue;
            }
            let sid = sid as Sid;
            let shard = ShardRt::recover(
                &plan,
                sid,
                store,
                &self.node_metrics[spec.node],
                &self.shared.in_flight,
            )?;
            for (pos, u) in plan.upstream(sid).iter().enumerate() {
                self.wm_subscribers
                    .entry(*u)
                    .or_default()
                    .push((self.shards.len(), pos));
            }
            let mut dests: Vec<usize> = plan
                .downstream(sid)
                .iter()
                .map(|&(w, exec)| plan.destination_of(self.me, w, exec))
                .collect();
            dests.sort_unstable();
            dests.dedup();
            self.wm_dests.push(dests);
            self.local.insert(sid, self.shards.len());
            self.shards.push(shard);
        }
        Ok(())
    }

    /// Runs the loop until the worker halts. A returned error stops the worker;
    /// it restarts from the last commit.
    pub fn run(mut self) -> Result<(), EngineError> {
        loop {
            let halting = self.shared.halt.load(Ordering::SeqCst);
            self.receive(if halting {
                Duration::ZERO
            } else {
                self.wait_time()
            })?;
            let store = Arc::clone(&self.store);
            let mut batch = store.batch();
            let processed = self.process(&mut batch, halting)?;
            let committed = self.commit(batch, processed)?;
            self.release(committed);
            if halting {
                return Ok(());
            }
        }
    }

    fn wait_time(&self) -> Duration {
        let now = Instant::now();
        let mut wait = IDLE_WAIT;
        let stopping = self.shared.stopping.load(Ordering::SeqCst);
        let max_backlog = self.plan.topology.engine.max_backlog;
        for s in &self.shards {
            if !s.pending.is_empty() && s.backlog < max_backlog {
                return Duration::ZERO;
            }
            if let Body::Source(src) = &s.body {
                if !src.exhausted && !stopping && s.backlog < max_backlog {
                    wait = wait.min(src.idle_until.saturating_duration_since(now));
                }
                if src.exhausted && !src.retired {
                    return Duration::ZERO;
                }
            }
            if let Some(t) = s.timers.next_processing() {
                let until = (t - now_micros()).max(0) as u64;
                wait = wait.min(Duration::from_micros(until));
            }
        }
        wait
    }

    /// Step 1: take what is in the inbox.
    fn receive(&mut self, wait: Duration) -> Result<(), EngineError> {
        let first = if wait.is_zero() {
            self.inbox.try_recv().ok()
        } else {
            match self.inbox.recv_timeout(wait) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
        };
        let Some(first) = first else { return Ok(()) };
        self.absorb(first);
        let mut budget = 64;
        while budget > 0 {
            match self.inbox.try_recv() {
                Ok(msgs) => self.absorb(msgs),
                Err(_) => break,
            }
            budget -= 1;
        }
        Ok(())
    }

    fn absorb(&mut self, msgs: Vec<Msg>) {
        let plan = &*self.plan;
        for msg in msgs {
            match msg {
                Msg::Deliver { ch, seq, env } => {
                    let dst = plan.chan(ch).dst;
                    if let Some(&i) = self.local.get(&dst) {
                        self.shards[i].pending.push_back((ch, seq, env));
                    }
                }
                Msg::Ack { ch, upto } => {
                    let c = plan.chan(ch);
                    let Some(&i) = self.local.get(&c.src) else {
                        continue;
                    };
                    let shard = &mut self.shards[i];
                    let Some(out) = shard.outs.get_mut(&ch) else {
                        continue;
                    };
                    let (mut first, mut last) = (None, 0);
                    let stamps = &mut self.released_ts;
                    let n = out.ack(upto, |seq, env| {
                        first.get_or_insert(seq);
                        last = seq;
                        stamps.push(env.timestamp());
                    });
                    for ts in stamps.drain(..) {
                        shard.untrack_unacked(ts);
                    }
                    if let Some(first) = first {
                        self.released.push((ch, first, last));
                        self.released_count += n as i64;
                    }
                }
                Msg::PeerUp { worker } => {
                    let on = |sid: Sid| plan.shards[sid as usize].worker == worker;
                    for shard in &mut self.shards {
                        for (&ch, out) in shard.outs.iter_mut() {
                            if on(plan.chan(ch).dst) {
                                out.rewind();
                            }
                        }
                        for (&ch, input) in &shard.inputs {
                            if on(plan.chan(ch).src) {
                                let a = self.acks.entry(ch).or_insert(0);
                                *a = (*a).max(input.applied());
                            }
                        }
                        if plan.downstream(shard.sid).iter().any(|(w, _)| *w == worker) {
                            shard.wm_changed = true;
                        }
                    }
                }
                Msg::Watermark {
                    from,
                    wm,
                    idle,
                    counted,
                } => {
                    if counted {
                        self.wm_msgs_seen += 1;
                    }
                    if let Some(subs) = self.wm_subscribers.get(&from) {
                        for &(i, pos) in subs {
                            self.shards[i].upstream_watermark(pos, wm, idle);
                        }
                    }
                }
            }
        }
    }

    /// Steps 2-4: dedup, process, poll sources, fire timers.
    fn process(&mut self, batch: &mut Batch<'_>, halting: bool) -> Result<usize, EngineError> {
        let plan = Arc::clone(&self.plan);
        #[cfg(test)]
        self.shared.record(crate::shared::Step::Turn(self.id));
        self.delete_released(&plan, batch);
        let engine = &plan.topology.engine;
        let stopping = self.shared.stopping.load(Ordering::SeqCst) || halting;
        // A turn ends once it has run for `commit_interval` (or, when commits
        // are slower than that, as long as a commit takes: an fsync then covers
        // as much work as it waits for). What is left waits for the next turn,
        // so that no record waits long for its checkpoint. The first shard
        // served rotates, so that none starves.
        let mut turn = Turn {
            started: Instant::now(),
            budget: engine.commit_interval.max(self.commit_time),
            out_of_time: false,
            processed: 0,
        };
        let n = self.shards.len();
        self.first_shard = (self.first_shard + 1) % n.max(1);
        // Sources go last: what they read waits only for this turn's commit.
        let mut order = std::mem::take(&mut self.order);
        order.clear();
        order.extend((0..n).map(|k| (self.first_shard + k) % n));
        order.sort_by_key(|&i| matches!(self.shards[i].body, Body::Source(_)));
        for &i in &order {
            let mut budget = engine.batch_size;
            // Event-time timers the watermark has passed fire before the
            // records that came after that watermark, whatever the turns.
            self.fire_due_timers(i, &plan, false, batch)?;
            // Deliveries (not while halting: they stay unacknowledged and come again).
            if !halting {
                self.apply_deliveries(i, &plan, batch, &mut budget, &mut turn)?;
            }
            if !stopping {
                self.poll_source(i, &plan, budget, &mut turn)?;
            }
            // Timers again (records may have set some in the past), and
            // processing-time ones.
            self.fire_due_timers(i, &plan, true, batch)?;
            self.route_polled(i, &plan, batch);
            self.advance_watermark(i, &plan, stopping);
            self.shards[i].checkpoint(
                batch,
                &plan,
                engine.durability == millrace_config::Durability::Machine,
            )?;
        }
        self.order = order;
        Ok(turn.processed)
    }

    /// Routes what shard `i` emitted since the last call (see [`route`]).
    fn route_emitted(&mut self, i: usize, plan: &Plan, batch: &mut Batch<'_>) {
        let shard = &mut self.shards[i];
        route(
            plan,
            shard,
            &mut self.emits,
            batch,
            &self.node_metrics[shard.node],
            &mut self.produced_count,
            &self.shared.taps,
        );
    }

    /// Deletes from the outbox what acknowledgements released since the last
    /// turn: one delete each, or one range delete from `RANGE_DELETE_MIN` on.
    fn delete_released(&mut self, plan: &Plan, batch: &mut Batch<'_>) {
        for (ch, first, last) in self.released.drain(..) {
            let prefix = plan.outbox_prefix(ch);
            if last - first + 1 < RANGE_DELETE_MIN {
                let mut key = layout::outbox_key(&prefix, first);
                let at = prefix.len();
                for seq in first..=last {
                    key[at..].copy_from_slice(&seq.to_be_bytes());
                    batch.delete(Cf::Outbox, &key);
                }
            } else {
                batch.delete_range(
                    Cf::Outbox,
                    &layout::outbox_key(&prefix, first),
                    &layout::outbox_key(&prefix, last + 1),
                );
            }
        }
    }

    /// Steps 2 and 3 for shard `i`: takes its pending deliveries in order,
    /// drops duplicates (acknowledging them again) and gaps, and runs the
    /// computation (or the sink) on the rest; routes what each produced.
    fn apply_deliveries(
        &mut self,
        i: usize,
        plan: &Plan,
        batch: &mut Batch<'_>,
        budget: &mut usize,
        turn: &mut Turn,
    ) -> Result<(), EngineError> {
        let engine = &plan.topology.engine;
        let node_metrics = Arc::clone(&self.node_metrics);
        let node = &plan.nodes[self.shards[i].node];
        let metrics = &node_metrics[self.shards[i].node];
        while !turn.out_of_time && *budget > 0 && self.shards[i].backlog < engine.max_backlog {
            if turn.processed % 64 == 63 && turn.started.elapsed() >= turn.budget {
                turn.out_of_time = true;
                break;
            }
            let Some((ch, seq, env)) = self.shards[i].pending.pop_front() else {
                break;
            };
            let shard = &mut self.shards[i];
            let Some(input) = shard.inputs.get_mut(&ch) else {
                continue;
            };
            match input.offer(seq) {
                crate::delivery::Offer::Duplicate => {
                    metrics.duplicates.inc();
                    let applied = input.applied();
                    let a = self.acks.entry(ch).or_insert(0);
                    *a = (*a).max(applied);
                    continue;
                }
                crate::delivery::Offer::Gap => {
                    metrics.gaps.inc();
                    continue;
                }
                crate::delivery::Offer::Apply => {}
            }
            self.acks.insert(ch, seq);
            shard.applied_dirty.insert(ch);
            *budget -= 1;
            turn.processed += 1;
            metrics.records_in.inc();
            let record = env.record();
            if record.timestamp < shard.input_wm {
                metrics.late_records.inc();
            }
            shard.max_event = shard.max_event.max(record.timestamp);
            match &mut shard.body {
                Body::Sink { sink, written } => {
                    let c = plan.chan(ch);
                    let id = DeliveryId {
                        edge: &plan.edges[c.edge].name,
                        producer_shard: plan.shards[c.src as usize].shard,
                        seq,
                    };
                    sink.write_delivered(&record, &id)
                        .map_err(EngineError::Sink)?;
                    *written = true;
                    let lat = (now_micros() - env.ingest()).max(0) as f64 / 1e6;
                    metrics.e2e_latency.observe(lat);
                }
                Body::Compute(_) => {
                    let key = record.key.clone();
                    let at = KeyEnv {
                        store: &self.store,
                        emits: &mut self.emits,
                        ports: &node.ports,
                        ingest: env.ingest(),
                        input: &plan.edges[plan.chan(ch).edge].stream,
                        clock: Clock::System,
                    };
                    match shard.with_key(at, &key, |comp, ctx| comp.process_record(ctx, record)) {
                        Some(Err(ComputationError::BadRecord(why))) => {
                            bad_record(metrics, &node.name, &key, &why);
                            // The record went to the computation; the
                            // envelope still holds it for the errors output.
                            let bad = env.record();
                            self.emits.push(Emit {
                                port: ERRORS_PORT_INDEX,
                                key: bad.key,
                                value: bad.value,
                                ts: bad.timestamp,
                                ingest: env.ingest(),
                            });
                        }
                        Some(Err(ComputationError::Storage(e))) => return Err(e.into()),
                        Some(Ok(())) | None => {}
                    }
                }
                Body::Source(_) => {}
            }
            self.route_emitted(i, plan, batch);
        }
        Ok(())
    }

    /// Step 3 for a source shard: polls it for as many records as its room
    /// allows (backlog and batch), unless it is exhausted or resting after
    /// a poll that found nothing.
    fn poll_source(
        &mut self,
        i: usize,
        plan: &Plan,
        budget: usize,
        turn: &mut Turn,
    ) -> Result<(), EngineError> {
        let engine = &plan.topology.engine;
        let shard = &mut self.shards[i];
        let node = &plan.nodes[shard.node];
        let metrics = &self.node_metrics[shard.node];
        let Body::Source(src) = &mut shard.body else {
            return Ok(());
        };
        let now = Instant::now();
        let room = engine.max_backlog.saturating_sub(shard.backlog).min(budget);
        if src.exhausted || turn.out_of_time || room == 0 || now < src.idle_until {
            return Ok(());
        }
        let mut polled = Vec::new();
        let mut emitter = Emitter::new(&mut polled);
        let poll = src
            .source
            .poll(&mut emitter, room)
            .map_err(|e| EngineError::Source(node.name.clone(), e))?;
        let bad = std::mem::take(&mut emitter.bad);
        let ingest = now_micros();
        for (key, value, why) in bad {
            // Read but not decodable: to the errors output, as read.
            bad_record(metrics, &node.name, &key, &why);
            src.position_dirty = true;
            self.emits.push(Emit {
                port: ERRORS_PORT_INDEX,
                key,
                value,
                ts: now_micros(),
                ingest,
            });
        }
        if !polled.is_empty() {
            src.position_dirty = true;
            src.last_data = now;
            src.idle_pause = SOURCE_IDLE_PAUSE.0;
            turn.processed += polled.len();
            metrics.records_in.inc_by(polled.len() as u64);
        }
        for (key, value, ts) in polled {
            // An event time out of range goes to the errors output in
            // `route`; it never moves the watermark.
            if is_valid_event_time(ts) {
                shard.max_event = shard.max_event.max(ts);
            }
            self.emits.push(Emit {
                port: 0,
                key,
                value,
                ts,
                ingest,
            });
        }
        match poll {
            SourcePoll::Ready => {}
            SourcePoll::Idle => {
                // Pauses double while polls find nothing, and start again
                // from the shortest after any data.
                src.idle_until = now + src.idle_pause;
                src.idle_pause = (src.idle_pause * 2).min(SOURCE_IDLE_PAUSE.1);
            }
            SourcePoll::Exhausted => src.exhausted = true,
        }
        Ok(())
    }

    /// Routes what shard `i`'s source polled; a replayable source's
    /// productions then leave at once, on their own path.
    fn route_polled(&mut self, i: usize, plan: &Plan, batch: &mut Batch<'_>) {
        let shard = &mut self.shards[i];
        let metrics = &self.node_metrics[shard.node];
        if shard.discarded > 0 {
            metrics
                .discarded_records
                .inc_by(std::mem::take(&mut shard.discarded));
        }
        self.route_emitted(i, plan, batch);
        let shard = &mut self.shards[i];
        shard.note_replay_point();
        if !shard.uses_outbox() {
            // A replayable source's productions are not in the batch: after
            // a crash it replays them with the same sequence numbers, and
            // receivers drop what they already applied. They need not wait
            // for the commit, so they go now, and the other executor works
            // on them while this one commits.
            let handed = Handed {
                produced: std::mem::take(&mut self.produced_count),
                ..Handed::default()
            };
            let (me, replay_out, peers) = (self.me, &mut self.replay_out, &self.peers);
            #[cfg(test)]
            let shared = Arc::clone(&self.shared);
            #[cfg(test)]
            let id = self.id;
            let sent = self.shared.in_flight.hand_out(handed, || {
                send_replayable(plan, me, shard, replay_out, peers, |_q| {
                    #[cfg(test)]
                    shared.record(sent_step(id, true, _q));
                })
            });
            if sent {
                failpoint::hit(Point::SourceSent);
            }
        }
    }

    /// A source shard's own watermark (from its data, or, idle, from the
    /// clock), then every shard's output watermark and idleness.
    fn advance_watermark(&mut self, i: usize, plan: &Plan, stopping: bool) {
        let shard = &mut self.shards[i];
        let node = &plan.nodes[shard.node];
        let source_wm = match &shard.body {
            Body::Source(src) if src.exhausted => Some((MAX_TIME, false)),
            Body::Source(src) => {
                let newest = src.source.watermark().unwrap_or(shard.max_event);
                let from_data = newest.saturating_sub(node.watermark.out_of_order);
                // After `idle_after` without data a source is idle: its
                // consumers leave it out of their minimum (as Flink's
                // `withIdleness`), and its own watermark follows the clock,
                // in whole steps so that it is sent and persisted once a
                // step, not on every turn. Not while draining: then nothing
                // new comes in, and a watermark that kept moving would keep
                // the drain from ever finding the graph quiet.
                let idle = !stopping
                    && node
                        .watermark
                        .idle_after
                        .is_some_and(|d| src.last_data.elapsed() >= d);
                Some(if idle {
                    let clock = now_micros().saturating_sub(node.watermark.out_of_order);
                    let step = IDLE_WATERMARK_STEP.as_micros() as i64;
                    let quiet = shard.backlog == 0;
                    (from_data.max(clock.div_euclid(step) * step), quiet)
                } else {
                    (from_data, false)
                })
            }
            _ => None,
        };
        shard.recompute_output_wm(source_wm);
    }

    /// Step 4: fires the event-time timers of shard `i` that its input
    /// watermark has passed and, with `processing`, the processing-time
    /// timers the clock has passed; then routes what they emitted.
    fn fire_due_timers(
        &mut self,
        i: usize,
        plan: &Plan,
        processing: bool,
        batch: &mut Batch<'_>,
    ) -> Result<(), EngineError> {
        let shard = &mut self.shards[i];
        if !matches!(shard.body, Body::Compute(_)) {
            return Ok(());
        }
        let node = &plan.nodes[shard.node];
        let metrics = &self.node_metrics[shard.node];
        let now = now_micros();
        let domains: &[(TimeDomain, i64)] = if processing {
            &[
                (TimeDomain::EventTime, shard.input_wm),
                (TimeDomain::ProcessingTime, now),
            ]
        } else {
            &[(TimeDomain::EventTime, shard.input_wm)]
        };
        let mut fired = false;
        for &(domain, limit) in domains {
            while let Some((key, tag, time)) = shard.timers.pop_due(&shard.prefix, domain, limit) {
                fired = true;
                let at = KeyEnv {
                    store: &self.store,
                    emits: &mut self.emits,
                    ports: &node.ports,
                    ingest: now,
                    input: "",
                    clock: Clock::System,
                };
                // The computation sees the key and tag as `Bytes`.
                let key = Bytes::copy_from_slice(key.as_bytes());
                let tag = Bytes::copy_from_slice(tag.as_bytes());
                let timer = Timer { tag, domain, time };
                match shard.with_key(at, &key, |comp, ctx| comp.process_timer(ctx, timer)) {
                    Some(Err(ComputationError::BadRecord(why))) => {
                        bad_record(metrics, &node.name, &key, &why)
                    }
                    Some(Err(ComputationError::Storage(e))) => return Err(e.into()),
                    Some(Ok(())) | None => {}
                }
            }
        }
        if fired {
            self.route_emitted(i, plan, batch);
        }
        Ok(())
    }

    /// Step 5: one atomic commit.
    fn commit(&mut self, batch: Batch<'_>, processed: usize) -> Result<Committed, EngineError> {
        let with_something = !batch.is_empty();
        if with_something {
            failpoint::hit(Point::CommitBefore);
            let started = Instant::now();
            self.store.commit(batch)?;
            failpoint::hit(Point::CommitAfter);
            let took = started.elapsed();
            self.commit_time = (self.commit_time * 3 + took) / 4;
            self.shared
                .metrics
                .commit_seconds
                .observe(took.as_secs_f64());
            self.shared.metrics.commit_records.observe(processed as f64);
        }
        #[cfg(test)]
        self.shared.record(crate::shared::Step::Committed(self.id));
        Ok(Committed { with_something })
    }

    /// Step 6: acknowledge inputs, send productions and watermarks.
    fn release(&mut self, proof: Committed) {
        let shared = &*self.shared;
        let plan = &*self.plan;
        let dest = |sid: Sid| plan.destination(self.me, sid);
        for (ch, upto) in std::mem::take(&mut self.acks) {
            let src = plan.chan(ch).src;
            self.outgoing[dest(src)].push(Msg::Ack { ch, upto });
        }
        let mut wm_sent = 0;
        let now = Instant::now();
        for (i, shard) in self.shards.iter_mut().enumerate() {
            let metrics = &self.node_metrics[shard.node];
            for out in shard.outs.values_mut() {
                let retried = out.retry_due(now, RETRY_BACKOFF.0, RETRY_BACKOFF.1);
                if retried > 0 {
                    metrics.retries.inc_by(retried);
                }
            }
            queue_sends(plan, self.me, shard, &mut self.outgoing);
            if std::mem::take(&mut shard.wm_changed) {
                for &to in &self.wm_dests[i] {
                    let counted = to < plan.threads;
                    self.outgoing[to].push(Msg::Watermark {
                        from: shard.sid,
                        wm: shard.output_wm,
                        idle: shard.output_idle,
                        counted,
                    });
                    wm_sent += i64::from(counted);
                }
            }
            shared.shard_backlog[shard.sid as usize].store(shard.backlog as i64, Ordering::Relaxed);
            shared.shard_wm[shard.sid as usize].store(shard.output_wm, Ordering::Relaxed);
            shared.shard_max_event[shard.sid as usize].store(shard.max_event, Ordering::Relaxed);
            shared.shard_timers[shard.sid as usize]
                .store(shard.timers.len() as i64, Ordering::Relaxed);
            if let Body::Source(src) = &mut shard.body {
                if src.exhausted && !src.retired && shard.backlog == 0 {
                    src.retired = true;
                    shared.in_flight.source_done();
                }
            }
        }
        let handed = Handed {
            produced: std::mem::take(&mut self.produced_count),
            watermarks_sent: wm_sent,
            watermarks_taken: std::mem::take(&mut self.wm_msgs_seen),
            released: std::mem::take(&mut self.released_count),
        };
        #[cfg(test)]
        shared.record(sent_step(self.id, false, &self.outgoing));
        let (outgoing, peers) = (&mut self.outgoing, &self.peers);
        shared
            .in_flight
            .hand_out(handed, || flush_outgoing(outgoing, peers, &proof));
        if proof.with_something {
            failpoint::hit(Point::ReleaseAfter);
        }
        // Whoever waits on the worker (`Worker::wait_for`) waits for a
        // drained graph (or a fatal error, notified where it is set), and
        // only executors drain it. Waking it after every commit cost a
        // futex wake and a context switch per turn: P3 at 100k records/s
        // commits ~50k times a second.
        if shared.in_flight.drained() {
            shared.notify();
        }
    }
}

/// Hands what is queued for each destination to it: only once the turn's
/// commit returned, which the proof stands for.
fn flush_outgoing(outgoing: &mut [Vec<Msg>], peers: &[Outlet], _committed: &Committed) {
    for (q, peer) in outgoing.iter_mut().zip(peers) {
        if !q.is_empty() {
            peer.send(std::mem::take(q));
        }
    }
}

/// The one path out of an executor before its turn's commit: the
/// productions of a replayable source, which are not checkpointed at all
/// (after a crash the source replays them from its committed position with
/// the same sequence numbers, and receivers drop what they already applied).
/// Only deliveries go this way, through their own queues (`scratch`, empty
/// between calls); acknowledgements and watermarks wait for the commit.
/// Returns whether anything was sent.
fn send_replayable(
    plan: &Plan,
    me: usize,
    shard: &mut ShardRt,
    scratch: &mut [Vec<Msg>],
    peers: &[Outlet],
    observe: impl FnOnce(&[Vec<Msg>]),
) -> bool {
    debug_assert!(!shard.uses_outbox(), "only a replayable source sends early");
    queue_sends(plan, me, shard, scratch);
    observe(scratch);
    let mut sent = false;
    for (q, peer) in scratch.iter_mut().zip(peers) {
        if !q.is_empty() {
            debug_assert!(q.iter().all(|m| matches!(m, Msg::Deliver { .. })));
            peer.send(std::mem::take(q));
            sent = true;
        }
    }
    sent
}

/// Queues the productions of `shard` that may be sent now (within each
/// channel's window) for their destinations.
fn queue_sends(plan: &Plan, me: usize, shard: &mut ShardRt, outgoing: &mut [Vec<Msg>]) {
    let engine = &plan.topology.engine;
    for (&ch, out) in shard.outs.iter_mut() {
        if out.has_unsent() {
            let q = &mut outgoing[plan.destination(me, plan.chan(ch).dst)];
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

/// What executor `exec` is about to hand out, for the commit-order tests.
#[cfg(test)]
fn sent_step(exec: usize, early: bool, queues: &[Vec<Msg>]) -> crate::shared::Step {
    let count = |f: fn(&Msg) -> bool| queues.iter().flatten().filter(|m| f(m)).count();
    crate::shared::Step::Sent {
        exec,
        early,
        acks: count(|m| matches!(m, Msg::Ack { .. })),
        deliveries: count(|m| matches!(m, Msg::Deliver { .. })),
        watermarks: count(|m| matches!(m, Msg::Watermark { .. })),
    }
}
