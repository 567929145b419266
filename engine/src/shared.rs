//! What the executors of one worker share with it (and with its transport):
//! the metrics, the per-shard figures `/status` reads, taps, the stop flags,
//! and the accounting of what is still on its way ([`InFlight`]), which
//! decides when a graph is drained.

use crate::metrics::Metrics;
use crate::plan::Plan;
use crate::routes::Routes;
use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// One thing an executor did, in order, for the in-process tests of the
/// commit order (recorded only in test builds, and only when asked).
#[cfg(test)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// Executor `.0` started a turn.
    Turn(usize),
    /// Executor `.0`'s commit of the turn returned.
    Committed(usize),
    /// Executor `.0`'s appends to the commit log returned.
    LogAppended(usize),
    /// Executor `exec` handed messages out.
    Sent {
        exec: usize,
        /// Through the replayable source's early path (before the commit).
        early: bool,
        acks: usize,
        deliveries: usize,
        watermarks: usize,
    },
}

/// What is still on its way through one worker's graph: productions not yet
/// acknowledged, watermark messages between its executors not yet taken in,
/// and sources not yet exhausted. The graph is drained when the first two
/// are zero, and finished when the sources are done too.
///
/// The rule that keeps [`InFlight::drained`] honest: what a turn hands out is
/// added *before* it is handed out, and what the turn took in is subtracted
/// only *after*, so that no reader sees zero while something is on its way.
/// [`InFlight::hand_out`] is the one place that does both, in that order.
#[derive(Default)]
pub(crate) struct InFlight {
    unacked: AtomicI64,
    watermarks: AtomicI64,
    sources: AtomicUsize,
}

/// What one hand-out adds and takes away.
#[derive(Default, Clone, Copy, Debug)]
pub(crate) struct Handed {
    /// Productions handed to consumers (or to the outbox) in this turn.
    pub produced: i64,
    /// Watermark messages sent to this worker's own executors.
    pub watermarks_sent: i64,
    /// Watermark messages from this worker's executors taken in this turn.
    pub watermarks_taken: i64,
    /// Productions acknowledged (released from the outbox) in this turn.
    pub released: i64,
}

impl InFlight {
    /// Counts `handed` around `send`: increments, then the send, then the
    /// decrements.
    pub fn hand_out<R>(&self, handed: Handed, send: impl FnOnce() -> R) -> R {
        self.unacked.fetch_add(handed.produced, Ordering::SeqCst);
        self.watermarks
            .fetch_add(handed.watermarks_sent, Ordering::SeqCst);
        let r = send();
        self.watermarks
            .fetch_sub(handed.watermarks_taken, Ordering::SeqCst);
        self.unacked.fetch_sub(handed.released, Ordering::SeqCst);
        r
    }

    /// Productions found in the outbox at start (they are sent again).
    pub fn restored(&self, n: i64) {
        self.unacked.fetch_add(n, Ordering::SeqCst);
    }

    /// A source started reading.
    pub fn source_started(&self) {
        self.sources.fetch_add(1, Ordering::SeqCst);
    }

    /// A source is exhausted and everything it produced is acknowledged.
    pub fn source_done(&self) {
        self.sources.fetch_sub(1, Ordering::SeqCst);
    }

    /// Everything produced has been applied and committed downstream.
    pub fn drained(&self) -> bool {
        self.unacked.load(Ordering::SeqCst) == 0 && self.watermarks.load(Ordering::SeqCst) == 0
    }

    /// Drained, and no source has anything more to read.
    pub fn finished(&self) -> bool {
        self.sources.load(Ordering::SeqCst) == 0 && self.drained()
    }

    /// Productions not yet acknowledged.
    pub fn unacked(&self) -> i64 {
        self.unacked.load(Ordering::SeqCst)
    }
}

/// State the executors share with the worker.
pub(crate) struct Shared {
    pub metrics: Arc<Metrics>,
    /// What is still on its way through the graph.
    pub in_flight: InFlight,
    /// Which worker runs each shard now.
    pub routes: Routes,
    /// Sources stop polling (SIGTERM).
    pub stopping: AtomicBool,
    /// Executors make a last commit and exit.
    pub halt: AtomicBool,
    pub fatal: Mutex<Option<String>>,
    pub shard_backlog: Vec<AtomicI64>,
    pub shard_wm: Vec<AtomicI64>,
    pub shard_max_event: Vec<AtomicI64>,
    pub shard_timers: Vec<AtomicI64>,
    /// With a commit log: the sequence of each local shard's last durable
    /// entry, and of its last snapshot (0: none).
    pub shard_log_seq: Vec<AtomicI64>,
    pub shard_snapshot_seq: Vec<AtomicI64>,
    pub taps: crate::tap::Taps,
    pub(crate) lock: Mutex<()>,
    pub(crate) changed: Condvar,
    /// Where executors record what they do, when a test asks.
    #[cfg(test)]
    pub(crate) recorder: Option<Arc<Mutex<Vec<Step>>>>,
}

impl Shared {
    /// Nothing in flight, nothing stopping, every shard's figures at their
    /// start, for the shards and components of `plan`; routes as
    /// [`Routes::new`] makes them.
    pub fn new(metrics: Arc<Metrics>, plan: &Plan, dynamic: bool) -> Shared {
        let (shards, nodes) = (plan.shards.len(), plan.nodes.len());
        let atomics = |v: i64| (0..shards).map(|_| AtomicI64::new(v)).collect::<Vec<_>>();
        Shared {
            metrics,
            in_flight: InFlight::default(),
            routes: Routes::new(plan, dynamic),
            stopping: AtomicBool::new(false),
            halt: AtomicBool::new(false),
            fatal: Mutex::new(None),
            shard_backlog: atomics(0),
            shard_wm: atomics(i64::MIN),
            shard_max_event: atomics(i64::MIN),
            shard_timers: atomics(0),
            shard_log_seq: atomics(0),
            shard_snapshot_seq: atomics(0),
            taps: crate::tap::Taps::new(nodes),
            lock: Mutex::new(()),
            changed: Condvar::new(),
            #[cfg(test)]
            recorder: None,
        }
    }

    pub fn notify(&self) {
        let _g = self.lock.lock();
        self.changed.notify_all();
    }

    pub(crate) fn wait(&self, timeout: Duration) {
        let mut g = self.lock.lock();
        self.changed.wait_for(&mut g, timeout);
    }

    /// Records a step, when a test asked for them.
    #[cfg(test)]
    pub(crate) fn record(&self, step: Step) {
        if let Some(r) = &self.recorder {
            r.lock().push(step);
        }
    }
}
