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
//! [`Outgoing::flush`](crate::outgoing::Outgoing::flush), which takes the
//! [`Committed`] proof that only [`outgoing::commit`] makes. The one
//! exception needs no commit and has its own path,
//! [`send_early`](crate::shard::send_early): a replayable source's
//! productions are not checkpointed at all (after a crash the source replays
//! them from its committed position with the same sequence numbers, and
//! receivers drop what they already applied), so they are sent as soon as
//! they are polled (`shard/replay.rs` holds all of that exception). Tests
//! crash the worker between these steps on purpose (`failpoint.rs`). All
//! RocksDB calls happen on this thread, never on an async runtime.
//!
//! Step 1 is in `inbox.rs`, steps 2-4 in `steps.rs`; this file holds the
//! loop, the commit and the release.

mod inbox;
mod steps;

use crate::commit_log::{ExecutorLog, LogError};
use crate::error::EngineError;
use crate::failpoint::{self, Point};
use crate::mapkey::FastMap;
use crate::message::{Msg, Outlet};
use crate::metrics::NodeMetrics;
use crate::outgoing::{self, Committed, Outgoing};
use crate::plan::{ChannelIdx, Plan, Sid};
use crate::record::now_micros;
use crate::router::Router;
use crate::shard::{Body, ShardRt};
use crate::shared::{Handed, Shared};
use crossbeam_channel::Receiver;
use millrace_storage::{Batch, Store};
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

/// How long an executor waits for a message while a sink that defers has
/// deliveries written and not yet durable: how late it may see them durable.
const AWAIT_DURABLE: Duration = Duration::from_micros(500);

/// What an executor is asked to do with one shard, at the end of a turn.
pub(crate) enum Control {
    /// Run it from its last commit in the store, routed here at the epoch
    /// (set here, between turns, so that no turn's fence can come between
    /// the start and the route); say so on the channel.
    Start(Sid, u64, crossbeam_channel::Sender<()>),
    /// Stop running it; say so on the channel.
    Stop(Sid, crossbeam_channel::Sender<()>),
    /// It has a new owner: send to it again.
    Rerouted(Sid),
}

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
    /// executors, and each other worker once), as the routes were at
    /// `wm_dests_version`.
    wm_dests: Vec<Vec<usize>>,
    wm_dests_version: u64,
    /// Shards to start, stop or send to again, at the end of the turn.
    control: Vec<Control>,
    /// For each upstream shard, the local shards (and upstream positions) it bounds.
    wm_subscribers: FastMap<Sid, Vec<(usize, usize)>>,
    node_metrics: Arc<[NodeMetrics]>,
    router: Router,
    /// What waits for the turn's commit.
    outgoing: Outgoing,
    /// Per destination: a replayable source's deliveries, sent before the
    /// commit (see [`send_early`](crate::shard::send_early)).
    replay_out: Vec<Vec<Msg>>,
    /// Highest sequence to acknowledge per input channel, after the commit.
    acks: BTreeMap<ChannelIdx, u64>,
    /// Outbox ranges `(channel, first, last)` released by acknowledgements,
    /// deleted in the next commit (one range delete per channel and ack).
    released: Vec<(ChannelIdx, u64, u64)>,

    released_count: i64,
    wm_msgs_seen: i64,
    /// The shard a turn starts with (rotates).
    first_shard: usize,
    /// Scratch: the order shards are served in this turn.
    order: Vec<usize>,
    /// Recent duration of a commit (moving average).
    commit_time: Duration,
    /// With `[state] log`: where each commit is appended before it is
    /// committed locally.
    log: Option<ExecutorLog>,
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
        log: Option<crate::commit_log::LogSetup>,
    ) -> Self {
        let destinations = plan.threads + plan.workers;
        let node_metrics: Arc<[NodeMetrics]> = node_metrics.into();
        let router = Router::new(
            Arc::clone(&plan),
            Arc::clone(&shared),
            Arc::clone(&node_metrics),
        );
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
            wm_dests_version: 0,
            control: Vec::new(),
            node_metrics,
            router,
            outgoing: Outgoing::new(destinations),
            replay_out: (0..destinations).map(|_| Vec::new()).collect(),
            acks: BTreeMap::new(),
            released: Vec::new(),

            released_count: 0,
            wm_msgs_seen: 0,
            first_shard: 0,
            order: Vec::new(),
            commit_time: Duration::ZERO,
            log: log.map(ExecutorLog::new),
        }
    }

    /// Rebuilds the shards the routes give this executor from their last
    /// commit.
    pub fn recover(&mut self) -> Result<(), EngineError> {
        let routes = &self.shared.routes;
        let mine: Vec<Sid> = routes
            .shards_of(self.me)
            .into_iter()
            .filter(|&sid| routes.executor(sid) == self.id)
            .collect();
        for sid in mine {
            self.start_shard(sid)?;
        }
        Ok(())
    }

    /// Starts running `sid` from its last commit in the store.
    fn start_shard(&mut self, sid: Sid) -> Result<(), EngineError> {
        if self.local.contains_key(&sid) {
            return Ok(());
        }
        let plan = Arc::clone(&self.plan);
        let spec = &plan.shards[sid as usize];
        if let Some(log) = &mut self.log {
            // Fence the log and catch up with it first: what the shard
            // recovers from is then everything it ever released.
            let named = (
                sid,
                crate::commit_log::shard_name(&plan, sid),
                &spec.prefix[..],
            );
            log.start(&self.store, named, &self.shared.metrics)?;
        }
        let shard = ShardRt::recover(
            &plan,
            sid,
            &self.store,
            &self.node_metrics[spec.node],
            &self.shared.in_flight,
        )?;
        self.local.insert(sid, self.shards.len());
        self.shards.push(shard);
        self.index_shards();
        Ok(())
    }

    /// Stops running `sid` (at the end of a turn: everything it did is
    /// committed and released). What it has not had acknowledged stays in
    /// its outbox in the store, for whoever runs it next.
    fn stop_shard(&mut self, sid: Sid) {
        let Some(i) = self.local.remove(&sid) else {
            return;
        };
        let shard = self.shards.swap_remove(i);
        if let Some(log) = &mut self.log {
            log.stop(shard.prefix());
        }
        let in_flight = &self.shared.in_flight;
        in_flight.restored(-(shard.backlog() as i64));
        if let Body::Source(src) = &shard.body {
            if !src.retired {
                in_flight.source_done();
            }
        }
        let s = &*self.shared;
        let at = sid as usize;
        s.shard_backlog[at].store(0, Ordering::Relaxed);
        s.shard_wm[at].store(i64::MIN, Ordering::Relaxed);
        s.shard_max_event[at].store(i64::MIN, Ordering::Relaxed);
        s.shard_timers[at].store(0, Ordering::Relaxed);
        self.index_shards();
    }

    /// The log refused this turn's append: another worker has taken (at
    /// least) one of this executor's shards over, by a newer claim, while
    /// this one was stalled past its lease. The turn is dropped unreleased,
    /// as a crash would drop it, and so is every shard of this executor,
    /// each as it was at its last commit here: whatever in the dropped
    /// append did land is in the log, and whoever runs the shard next reads
    /// it there. The worker's ownership starts again the shards that etcd
    /// still gives to this worker (from the log), and routes the others to
    /// their owners; the worker goes on, and takes a share again.
    ///
    /// Without a coordination service nobody would say which of them are
    /// still this worker's, so there a fence stops the worker.
    fn fenced_off(&mut self, e: &LogError) {
        let dropped: Vec<Sid> = self.shards.iter().map(ShardRt::sid).collect();
        tracing::warn!(
            error = %e,
            shards = ?dropped,
            "fenced off by the commit log: this turn is dropped unreleased, and so are this \
             executor's shards; those this worker still owns start again from the log"
        );
        // What the turn took in is counted out as a release would have;
        // what it produced was never handed out, and each shard's count
        // below is its backlog with those.
        let handed = Handed {
            produced: self.router.take_produced(),
            watermarks_sent: 0,
            watermarks_taken: std::mem::take(&mut self.wm_msgs_seen),
            released: std::mem::take(&mut self.released_count),
        };
        self.shared.in_flight.hand_out(handed, || ());
        self.acks.clear();
        self.released.clear();
        self.outgoing = Outgoing::new(self.plan.threads + self.plan.workers);
        self.replay_out.iter_mut().for_each(Vec::clear);
        if let Some(log) = &mut self.log {
            for shard in &self.shards {
                log.abandon(shard.prefix());
            }
        }
        let shared = Arc::clone(&self.shared);
        let routes = &shared.routes;
        for sid in dropped {
            self.stop_shard(sid);
            routes.set(sid, None, 0, 0);
        }
        let metrics = &shared.metrics;
        metrics
            .shards_owned
            .set(routes.shards_of(self.me).len() as i64);
        // A drain waiting on this worker sees the counts change.
        self.shared.notify();
    }

    /// Rebuilds what is kept by position among the local shards: the
    /// index by sid, who subscribes to which upstream watermark, and where
    /// each shard's watermark goes.
    fn index_shards(&mut self) {
        let plan = &*self.plan;
        self.local.clear();
        self.wm_subscribers.clear();
        for (i, shard) in self.shards.iter().enumerate() {
            let sid = shard.sid();
            self.local.insert(sid, i);
            for (pos, u) in plan.upstream(sid).iter().enumerate() {
                self.wm_subscribers.entry(*u).or_default().push((i, pos));
            }
        }
        self.refresh_wm_dests();
    }

    /// Where each local shard's watermark goes, as the routes say now.
    fn refresh_wm_dests(&mut self) {
        let (plan, routes) = (&*self.plan, &self.shared.routes);
        self.wm_dests_version = routes.version();
        self.wm_dests = self
            .shards
            .iter()
            .map(|shard| {
                let mut dests: Vec<usize> = plan
                    .downstream(shard.sid())
                    .iter()
                    .filter_map(|&d| routes.destination(self.me, d))
                    .collect();
                dests.sort_unstable();
                dests.dedup();
                dests
            })
            .collect();
    }

    /// Starts, stops and re-sends what the turn's messages asked for.
    fn control(&mut self) -> Result<(), EngineError> {
        for c in std::mem::take(&mut self.control) {
            match c {
                Control::Start(sid, epoch, done) => {
                    self.start_shard(sid)?;
                    // Routed here only once it runs: nothing sent to it is
                    // dropped.
                    self.shared.routes.set(sid, Some(self.me), self.id, epoch);
                    let _ = done.send(());
                }
                Control::Stop(sid, done) => {
                    self.stop_shard(sid);
                    let _ = done.send(());
                }
                Control::Rerouted(sid) => self.rerouted(sid),
            }
        }
        if self.wm_dests_version != self.shared.routes.version() {
            self.refresh_wm_dests();
        }
        Ok(())
    }

    /// Shard `sid` has a new owner (or an owner again): send it everything
    /// it has not acknowledged, acknowledge again what came from it, and
    /// send it the watermarks it depends on.
    fn rerouted(&mut self, sid: Sid) {
        let plan = &*self.plan;
        for shard in &mut self.shards {
            shard.rewind(|ch| plan.chan(ch).dst == sid);
            for (ch, upto) in shard.acknowledgeable_by_input() {
                if plan.chan(ch).src == sid {
                    let a = self.acks.entry(ch).or_insert(0);
                    *a = (*a).max(upto);
                }
            }
            if plan.downstream(shard.sid()).contains(&sid) {
                shard.resend_watermark();
            }
        }
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
            let committed = match self.commit(batch, processed) {
                Ok(committed) => committed,
                Err(EngineError::Log(e @ LogError::Fenced { .. }))
                    if self.shared.routes.dynamic() =>
                {
                    self.fenced_off(&e);
                    self.control()?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            self.release(committed);
            if let Some(log) = &mut self.log {
                log.cut_recorded(&self.shared.metrics);
                for (sid, last, snapshot) in log.positions() {
                    let at = sid as usize;
                    let shared = &self.shared;
                    shared.shard_log_seq[at].store(last as i64, Ordering::Relaxed);
                    shared.shard_snapshot_seq[at].store(snapshot as i64, Ordering::Relaxed);
                }
                // Not while draining: a stop should not wait on the store.
                if !halting && !self.shared.stopping.load(Ordering::SeqCst) {
                    log.snapshot_due(&self.store, &self.shared.metrics);
                }
            }
            if halting {
                if let Some(log) = &mut self.log {
                    log.stop_all();
                }
                return Ok(());
            }
            self.control()?;
        }
    }

    fn wait_time(&self) -> Duration {
        let now = Instant::now();
        let mut wait = IDLE_WAIT;
        let stopping = self.shared.stopping.load(Ordering::SeqCst);
        let max_backlog = self.plan.topology.engine.max_backlog;
        for s in &self.shards {
            if s.has_pending() && s.backlog() < max_backlog {
                return Duration::ZERO;
            }
            if let Body::Source(src) = &s.body {
                if !src.exhausted && !stopping && s.backlog() < max_backlog {
                    wait = wait.min(src.idle_until.saturating_duration_since(now));
                }
                if src.exhausted && !src.retired {
                    return Duration::ZERO;
                }
            }
            if let Body::Sink(sink) = &s.body {
                if sink.awaiting() {
                    // Acknowledgements come between turns: look again soon.
                    wait = wait.min(AWAIT_DURABLE);
                }
            }
            if let Some(t) = s.timers().next_processing() {
                let until = (t - now_micros()).max(0) as u64;
                wait = wait.min(Duration::from_micros(until));
            }
        }
        wait
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
                &mut self.acks,
            )?;
        }
        self.order = order;
        Ok(turn.processed)
    }

    /// Step 5: one atomic commit.
    fn commit(&mut self, mut batch: Batch<'_>, processed: usize) -> Result<Committed, EngineError> {
        if !batch.is_empty() {
            failpoint::hit(Point::CommitBefore);
        }
        let started = Instant::now();
        if let Some(log) = &mut self.log {
            // Durable off the machine first: the local store is never
            // ahead of the log (see `commit_log.rs`).
            if !batch.is_empty() {
                log.append(&mut batch, &self.shared.metrics)?;
                #[cfg(test)]
                self.shared
                    .record(crate::shared::Step::LogAppended(self.id));
                failpoint::hit(Point::LogAppended);
            }
        }
        let committed = outgoing::commit(&self.store, batch)?;
        if committed.with_something {
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
        Ok(committed)
    }

    /// Step 6: acknowledge inputs, send productions and watermarks.
    fn release(&mut self, proof: Committed) {
        let shared = &*self.shared;
        let plan = &*self.plan;
        let routes = &shared.routes;
        for (ch, upto) in std::mem::take(&mut self.acks) {
            // A producer nobody runs now (moving) is acknowledged again
            // once it has a route (`Executor::rerouted`).
            if let Some(to) = routes.destination(self.me, plan.chan(ch).src) {
                self.outgoing.push(to, Msg::Ack { ch, upto });
            }
        }
        let mut wm_sent = 0;
        let now = Instant::now();
        for (i, shard) in self.shards.iter_mut().enumerate() {
            let metrics = &self.node_metrics[shard.node()];
            let retried = shard.retry_due(now, RETRY_BACKOFF.0, RETRY_BACKOFF.1);
            if retried > 0 {
                metrics.retries.inc_by(retried);
            }
            self.outgoing.queue_sends(plan, (routes, self.me), shard);
            if let Some((wm, idle)) = shard.take_wm_change() {
                for &to in &self.wm_dests[i] {
                    let counted = to < plan.threads;
                    let from = shard.sid();
                    self.outgoing.push(
                        to,
                        Msg::Watermark {
                            from,
                            wm,
                            idle,
                            counted,
                        },
                    );
                    wm_sent += i64::from(counted);
                }
            }
            let sid = shard.sid() as usize;
            shared.shard_backlog[sid].store(shard.backlog() as i64, Ordering::Relaxed);
            shared.shard_wm[sid].store(shard.output_wm().0, Ordering::Relaxed);
            shared.shard_max_event[sid].store(shard.max_event(), Ordering::Relaxed);
            shared.shard_timers[sid].store(shard.timers().len() as i64, Ordering::Relaxed);
            let drained = shard.backlog() == 0;
            if let Body::Source(src) = &mut shard.body {
                if src.exhausted && !src.retired && drained {
                    src.retired = true;
                    shared.in_flight.source_done();
                }
            }
        }
        let handed = Handed {
            produced: self.router.take_produced(),
            watermarks_sent: wm_sent,
            watermarks_taken: std::mem::take(&mut self.wm_msgs_seen),
            released: std::mem::take(&mut self.released_count),
        };
        #[cfg(test)]
        shared.record(outgoing::sent_step(self.id, false, self.outgoing.queued()));
        let (outgoing, peers) = (&mut self.outgoing, &self.peers);
        shared
            .in_flight
            .hand_out(handed, || outgoing.flush(peers, &proof));
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
