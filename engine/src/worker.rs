//! One worker process: opens the store, starts the executor threads, and
//! knows when a bounded topology is finished or a drain is complete.

use crate::error::EngineError;
use crate::executor::Executor;
use crate::message::{Msg, Outlet};
use crate::metrics::{Metrics, NodeMetrics};
use crate::net::{Transport, TransportConfig};
use crate::plan::Plan;
use crate::registry::Registry;
use crate::shared::Shared;
use millrace_config::{Durability, Role, Topology};
use millrace_storage::{Cf, Store, StoreOptions};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How the worker runs beyond the topology file.
#[derive(Debug, Clone, Default)]
pub struct WorkerOptions {
    /// Overrides `[service] data_dir` (and a cluster worker's own `data_dir`).
    pub data_dir: Option<std::path::PathBuf>,
    /// Which `[[cluster.workers]]` entry this process is; required with a `[cluster]`.
    pub worker: Option<String>,
    /// Address to listen on for other workers, when it differs from the
    /// worker's `address` (behind a proxy or NAT).
    pub listen: Option<String>,
    /// Shards are not dealt by the plan but claimed one by one from a
    /// coordination service: the worker starts running none, and runs what
    /// [`Worker::adopt_shard`] gives it.
    pub dynamic: bool,
    /// `[state] log`: each commit is appended here, durable off the
    /// machine, before it is committed locally and released; a shard
    /// starts from the end of its log (see `commit_log.rs`).
    /// With `[state] snapshots`, the log is cut below shard snapshots.
    pub commit_log: Option<crate::commit_log::LogSetup>,
    /// In the engine's own tests: where executors record their steps.
    #[cfg(test)]
    pub(crate) recorder: Option<Arc<parking_lot::Mutex<Vec<crate::shared::Step>>>>,
}

/// Where a worker of `topology` keeps its data: `data_dir` if given, else its
/// `[[cluster.workers]]` entry's, else `[service] data_dir` (joined with the
/// worker id in a cluster).
pub fn data_dir_of(
    topology: &Topology,
    worker: Option<&str>,
    data_dir: Option<&std::path::Path>,
) -> std::path::PathBuf {
    if let Some(d) = data_dir {
        return d.to_path_buf();
    }
    match (topology.cluster.as_ref(), worker) {
        (Some(c), Some(id)) => c
            .worker(id)
            .and_then(|w| w.data_dir.clone())
            .unwrap_or_else(|| topology.service.data_dir.join(id)),
        _ => topology.service.data_dir.clone(),
    }
}

/// Per-component figures for `/status` and the operator tools.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ComponentStatus {
    /// Component name.
    pub name: String,
    /// `source`, `computation` or `sink`.
    pub role: &'static str,
    /// Its `type`.
    pub kind: String,
    /// Its inputs, as stream names.
    pub inputs: Vec<String>,
    /// Shards.
    pub shards: u32,
    /// How many of them this worker runs (the figures below are theirs).
    pub local_shards: u32,
    /// Lowest output watermark over its shards (microseconds; null before any).
    pub low_watermark: Option<i64>,
    /// Newest event time it has seen (microseconds; null before any).
    pub max_event_time: Option<i64>,
    /// Unacknowledged productions.
    pub backlog: i64,
    /// Timers pending.
    pub timers: i64,
    /// Records taken in so far.
    pub records_in: u64,
    /// Records produced so far.
    pub records_out: u64,
    /// Records that arrived behind the watermark.
    pub late_records: u64,
    /// Records routed to its `errors` output.
    pub bad_records: u64,
}

/// A running worker.
pub struct Worker {
    plan: Arc<Plan>,
    store: Arc<Store>,
    shared: Arc<Shared>,
    node_metrics: Vec<NodeMetrics>,
    threads: Vec<JoinHandle<Result<(), EngineError>>>,
    /// The executors' inboxes, by executor.
    inboxes: Vec<crossbeam_channel::Sender<Vec<Msg>>>,
    started: Instant,
    recovered: i64,
    recovered_positions: Vec<(String, String)>,
    /// The links to the other workers of a cluster.
    transport: Option<Transport>,
    /// This worker's index in the cluster (0 alone).
    me: usize,
    /// `[state] log`, and where its snapshots go.
    commit_log: Option<crate::commit_log::LogSetup>,
}

impl Worker {
    /// Builds the plan, opens the store, recovers every shard and starts the
    /// executors.
    pub fn start(
        topology: Topology,
        registry: &Registry,
        opts: WorkerOptions,
        metrics: Arc<Metrics>,
    ) -> Result<Worker, EngineError> {
        let me = match (&topology.cluster, opts.worker.as_deref()) {
            (None, None) => 0,
            (None, Some(id)) => {
                return Err(EngineError::Layout(format!(
                    "--worker {id} given, but the topology has no [cluster]"
                )))
            }
            (Some(_), None) => {
                return Err(EngineError::Layout(
                    "the topology has a [cluster]: say which worker this is with --worker ID"
                        .into(),
                ))
            }
            (Some(c), Some(id)) => c.index_of(id).ok_or_else(|| {
                EngineError::Layout(format!(
                    "worker `{id}` is not in [cluster] workers ({})",
                    c.workers
                        .iter()
                        .map(|w| w.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?,
        };
        let data_dir = data_dir_of(&topology, opts.worker.as_deref(), opts.data_dir.as_deref());
        let durability = match topology.engine.durability {
            Durability::Process => millrace_storage::Durability::Process,
            Durability::Machine => millrace_storage::Durability::Machine,
        };
        let plan = Arc::new(Plan::build(topology, registry).map_err(EngineError::Config)?);
        if let Some(setup) = &opts.commit_log {
            // Before the directory is touched: a refused start changes nothing.
            crate::commit_log::check_layout(&*setup.log, &plan)?;
        }
        let store = Arc::new(Store::open(
            &data_dir,
            &StoreOptions {
                durability,
                ..StoreOptions::default()
            },
        )?);
        check_layout(&store, &plan, me)?;
        let joined = store.get(Cf::Meta, &crate::layout::joined_key())?.is_some();
        if opts.dynamic && !joined {
            let mut b = store.batch();
            b.put(Cf::Meta, &crate::layout::joined_key(), &[]);
            store.commit(b)?;
        } else if !opts.dynamic && joined {
            // Its shards moved: the plan's deal does not say what it holds.
            return Err(EngineError::Layout(format!(
                "{} belongs to a deployment run with --join (its shards move between \
                 workers): start it with --join again",
                store.path().display()
            )));
        }
        let shared = Arc::new(Shared {
            #[cfg(test)]
            recorder: opts.recorder.clone(),
            ..Shared::new(Arc::clone(&metrics), &plan, opts.dynamic)
        });
        if let (Some(setup), false) = (&opts.commit_log, opts.dynamic) {
            // Before the epochs rise: the log holds the last ones. Fenced
            // first, so that nothing an older writer does changes what is
            // read (the executor fences again when it starts the shard).
            for (sid, spec) in plan
                .shards
                .iter()
                .enumerate()
                .filter(|(_, s)| s.worker == me)
            {
                let name = crate::commit_log::shard_name(&plan, sid as u32);
                let shard = (name.as_str(), &spec.prefix[..]);
                let writer = (crate::commit_log::incarnation(), setup.snapshots.as_ref());
                crate::commit_log::fence(&*setup.log, &store, shard, writer, false, &metrics)?;
            }
        }
        if !opts.dynamic {
            for (sid, epoch) in bump_epochs(&store, &plan, me)? {
                let exec = plan.shards[sid as usize].executor;
                shared.routes.set(sid, Some(me), exec, epoch);
            }
        }
        metrics
            .shards_owned
            .set(shared.routes.shards_of(me).len() as i64);
        let node_metrics: Vec<NodeMetrics> = plan
            .nodes
            .iter()
            .map(|n| NodeMetrics::new(&metrics, &n.name))
            .collect();
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..plan.threads)
            .map(|_| crossbeam_channel::unbounded::<Vec<Msg>>())
            .unzip();
        let mut outlets: Vec<Outlet> = senders.iter().cloned().map(Outlet::Local).collect();
        let transport = match &plan.topology.cluster {
            None => None,
            Some(cluster) => {
                let listen = opts
                    .listen
                    .clone()
                    .unwrap_or_else(|| cluster.workers[me].address.clone());
                let from_env = std::env::var("MILLRACE_CLUSTER_SECRET").ok();
                if let Some(s) = &from_env {
                    millrace_config::check_secret(s).map_err(|m| {
                        EngineError::Network(format!("MILLRACE_CLUSTER_SECRET: {m}"))
                    })?;
                }
                let secret = from_env.or_else(|| cluster.secret.clone());
                if secret.is_none() {
                    tracing::warn!(
                        "the cluster has no secret ([cluster] secret or MILLRACE_CLUSTER_SECRET): \
                         any process that reaches {listen} can join"
                    );
                }
                let (t, remote) = Transport::start(TransportConfig {
                    plan: Arc::clone(&plan),
                    me,
                    listen: listen.clone(),
                    secret: secret.unwrap_or_default().into_bytes(),
                    inboxes: senders.clone(),
                    shared: Arc::clone(&shared),
                    store: Arc::clone(&store),
                })
                .map_err(|e| EngineError::Network(format!("listening on {listen}: {e}")))?;
                for (w, tx) in remote.into_iter().enumerate() {
                    outlets.push(if w == me {
                        Outlet::None
                    } else {
                        Outlet::Remote(tx)
                    });
                }
                Some(t)
            }
        };
        let mut executors = Vec::new();
        for (id, inbox) in receivers.into_iter().enumerate() {
            let mut ex = Executor::new(
                (me, id),
                Arc::clone(&plan),
                Arc::clone(&store),
                Arc::clone(&shared),
                inbox,
                outlets.clone(),
                node_metrics.clone(),
                opts.commit_log.clone(),
            );
            ex.recover()?;
            executors.push(ex);
        }
        let recovered = shared.in_flight.unacked();
        let mut recovered_positions = Vec::new();
        for node in plan
            .nodes
            .iter()
            .filter(|n| n.role != Role::Computation && shared.routes.owned_by(n.first_sid, me))
        {
            let key = crate::layout::position_key(&plan.shards[node.first_sid as usize].prefix);
            if let Some(v) = store.get(Cf::Meta, &key)? {
                recovered_positions.push((node.name.clone(), crate::shard::printable_position(&v)));
            }
        }
        let mut threads = Vec::new();
        for (id, ex) in executors.into_iter().enumerate() {
            let shared = Arc::clone(&shared);
            let handle = std::thread::Builder::new()
                .name(format!("millrace-exec-{id}"))
                .spawn(move || {
                    // A panic (a bug in a computation, or in the engine) stops
                    // the worker with an error instead of leaving it waiting
                    // for an executor that is gone.
                    let result =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ex.run()))
                            .unwrap_or_else(|panic| {
                                let why = panic
                                    .downcast_ref::<&str>()
                                    .map(|s| s.to_string())
                                    .or_else(|| panic.downcast_ref::<String>().cloned())
                                    .unwrap_or_else(|| "unknown panic".into());
                                Err(EngineError::Thread(format!(
                                    "executor {id} panicked: {why}"
                                )))
                            });
                    if let Err(e) = &result {
                        shared.metrics.fatal_errors.inc();
                        *shared.fatal.lock() = Some(e.to_string());
                        shared.halt.store(true, Ordering::SeqCst);
                        shared.notify();
                    }
                    result
                })
                .map_err(|e| EngineError::Thread(e.to_string()))?;
            threads.push(handle);
        }
        Ok(Worker {
            plan,
            store,
            shared,
            node_metrics,
            threads,
            inboxes: senders,
            started: Instant::now(),
            recovered,
            recovered_positions,
            transport,
            me,
            commit_log: opts.commit_log.clone(),
        })
    }

    /// Whether all sources are exhausted and everything they produced has
    /// been delivered and committed by the sinks.
    ///
    /// In a cluster: when every worker's shards have their output watermark at
    /// the end of time, and the other workers know it (see `net`).
    pub fn finished(&self) -> bool {
        match &self.transport {
            Some(t) => t.finished(),
            None => self.shared.in_flight.finished(),
        }
    }

    /// In a cluster: each other worker's id and whether its connection is up.
    pub fn peers(&self) -> Vec<(String, bool)> {
        self.transport
            .as_ref()
            .map_or_else(Vec::new, |t| t.peers_up())
    }

    /// Blocks until [`Worker::finished`], a fatal error, or `timeout`.
    pub fn wait_finished(&self, timeout: Duration) -> Result<bool, EngineError> {
        self.wait_for(timeout, || self.finished())
    }

    /// Stops the sources and waits (up to `timeout`) until everything in
    /// flight has been delivered. Returns whether the drain completed.
    pub fn drain(&self, timeout: Duration) -> Result<bool, EngineError> {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // In a cluster, stay (and keep acknowledging) while a draining peer
        // still waits for this worker; first give peers stopped at the same
        // time a few heartbeats to say so.
        let since = Instant::now();
        self.wait_for(timeout, || {
            self.shared.in_flight.drained()
                && self.transport.as_ref().is_none_or(|t| {
                    since.elapsed() >= crate::net::STATUS_SETTLE && t.peers_drained()
                })
        })
    }

    /// Waits until `done` holds (true), `timeout` passes (false) or an
    /// executor fails (the error). Executors wake it after a commit that
    /// leaves the graph drained; other conditions (a peer's status) are
    /// seen within 100 ms.
    fn wait_for(&self, timeout: Duration, done: impl Fn() -> bool) -> Result<bool, EngineError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.shared.fatal.lock().clone() {
                return Err(EngineError::Fatal(e));
            }
            if done() {
                return Ok(true);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            self.shared
                .wait((deadline - now).min(Duration::from_millis(100)));
        }
    }

    /// Makes the executors commit one last time and stop; returns the first error.
    pub fn shutdown(self) -> Result<(), EngineError> {
        self.shared.halt.store(true, Ordering::SeqCst);
        drop(self.transport);
        let mut first = None;
        for t in self.threads {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first.get_or_insert(e);
                }
                Err(_) => {
                    first.get_or_insert(EngineError::Thread("an executor panicked".into()));
                }
            }
        }
        if let Some(e) = first {
            return Err(e);
        }
        // Everything is committed: the memtables go to table files now, so
        // that the next start (or a savepoint export) replays no WAL. A
        // failed flush loses nothing (the WAL still holds it all).
        let started = std::time::Instant::now();
        match self.store.flush() {
            Ok(()) => tracing::debug!(
                ms = started.elapsed().as_millis() as u64,
                "store flushed at stop"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "the store was not flushed at stop; the next start replays its WAL")
            }
        }
        Ok(())
    }

    /// The error that stopped an executor, if any.
    pub fn fatal_error(&self) -> Option<String> {
        self.shared.fatal.lock().clone()
    }

    /// Updates the aggregate gauges (watermarks, backlog, timers, RocksDB size).
    pub fn refresh_gauges(&self) {
        for (status, m) in self.status().iter().zip(&self.node_metrics) {
            m.outbox_backlog.set(status.backlog);
            m.timers_pending.set(status.timers);
            if let Some(wm) = status.low_watermark {
                m.low_watermark.set(if wm == i64::MAX {
                    i64::MAX / 1_000_000
                } else {
                    wm / 1_000_000
                });
                if let Some(max) = status.max_event_time {
                    m.watermark_lag.set(((max - wm).max(0)) / 1_000_000);
                }
            }
        }
        self.shared
            .metrics
            .rocksdb_bytes
            .set(self.store.size_bytes() as i64);
    }

    /// One entry per component, in topology order.
    pub fn status(&self) -> Vec<ComponentStatus> {
        let s = &*self.shared;
        self.plan
            .nodes
            .iter()
            .zip(&self.node_metrics)
            .map(|(n, m)| {
                // This worker's own shards of the component (all, alone).
                let sids: Vec<usize> = (n.first_sid..n.first_sid + n.shards)
                    .map(|i| i as usize)
                    .filter(|&i| self.shared.routes.owned_by(i as u32, self.me))
                    .collect();
                let wm = sids
                    .iter()
                    .map(|&i| s.shard_wm[i].load(Ordering::Relaxed))
                    .min();
                let max_event = sids
                    .iter()
                    .map(|&i| s.shard_max_event[i].load(Ordering::Relaxed))
                    .max();
                ComponentStatus {
                    name: n.name.clone(),
                    role: match n.role {
                        Role::Source => "source",
                        Role::Computation => "computation",
                        Role::Sink => "sink",
                    },
                    kind: n.kind.clone(),
                    inputs: n
                        .in_edges
                        .iter()
                        .map(|&e| {
                            let edge = &self.plan.edges[e];
                            let from = &self.plan.nodes[edge.from];
                            match edge.port {
                                0 => from.name.clone(),
                                p => format!("{}.{}", from.name, from.ports[p]),
                            }
                        })
                        .collect(),
                    shards: n.shards,
                    low_watermark: wm.filter(|w| *w != i64::MIN),
                    max_event_time: max_event.filter(|w| *w != i64::MIN),
                    backlog: sids
                        .iter()
                        .map(|&i| s.shard_backlog[i].load(Ordering::Relaxed))
                        .sum(),
                    timers: sids
                        .iter()
                        .map(|&i| s.shard_timers[i].load(Ordering::Relaxed))
                        .sum(),
                    local_shards: sids.len() as u32,
                    records_in: m.records_in.get(),
                    records_out: m.records_out.get(),
                    late_records: m.late_records.get(),
                    bad_records: m.bad_records.get(),
                }
            })
            .collect()
    }

    /// Watches the records leaving `component`: one JSON line per record
    /// (`{"key":..,"value":..,"ts":..}`). Copies are dropped when the receiver
    /// falls behind; the graph never waits for a watcher.
    pub fn tap(&self, component: &str) -> Option<crossbeam_channel::Receiver<Vec<u8>>> {
        let node = self.plan.nodes.iter().position(|n| n.name == component)?;
        Some(self.shared.taps.subscribe(node))
    }

    /// The plan this worker runs.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// This worker's index among `[[cluster.workers]]` (0 alone).
    pub fn index(&self) -> usize {
        self.me
    }

    /// How long ago the worker started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Unacknowledged productions found in the outbox at start (re-sent).
    pub fn recovered_backlog(&self) -> i64 {
        self.recovered
    }

    /// The committed positions of sources and sinks found at start.
    pub fn recovered_positions(&self) -> Vec<(String, String)> {
        self.recovered_positions.clone()
    }

    /// Productions committed and not yet acknowledged, now.
    pub fn backlog(&self) -> i64 {
        self.shared.in_flight.unacked()
    }

    // Shards moving between live workers. A move is: the old owner stops
    // the shard at the end of a turn ([`Worker::stop_shard`]: everything it
    // did is committed, what it has not had acknowledged stays in its
    // outbox) and takes its data ([`Worker::shard_data`]); the new owner
    // loads it and starts it ([`Worker::adopt_shard`]); every worker routes
    // to the new owner ([`Worker::route`]) and sends it again what it has not
    // acknowledged; the old owner then deletes its copy
    // ([`Worker::drop_shard_data`]). Nothing was acknowledged that was not
    // committed, so what was on its way to the old owner simply goes again.

    /// The shard number of `component`'s shard `shard`.
    pub fn sid_of(&self, component: &str, shard: u32) -> Option<u32> {
        let node = self.plan.nodes.iter().find(|n| n.name == component)?;
        (shard < node.shards).then_some(node.first_sid + shard)
    }

    /// Where the commit log is (`[state] log`), for operators.
    pub fn log_describe(&self) -> Option<String> {
        self.commit_log.as_ref().map(|setup| setup.log.describe())
    }

    /// With a commit log: per shard this worker runs, its name, the
    /// sequence of its last durable log entry and of its last snapshot (0:
    /// none), as its executor last published them. None without a log.
    pub fn log_positions(&self) -> Option<Vec<(String, u64, u64)>> {
        self.commit_log.is_some().then(|| {
            let s = &self.shared;
            self.shards_owned()
                .into_iter()
                .map(|sid| {
                    let name = crate::commit_log::shard_name(&self.plan, sid);
                    let at = sid as usize;
                    let seq = s.shard_log_seq[at].load(Ordering::Relaxed) as u64;
                    (
                        name,
                        seq,
                        s.shard_snapshot_seq[at].load(Ordering::Relaxed) as u64,
                    )
                })
                .collect()
        })
    }

    /// The shards this worker runs now.
    pub fn shards_owned(&self) -> Vec<u32> {
        self.shared.routes.shards_of(self.me)
    }

    /// Who runs each shard now, as this worker knows it (worker index, epoch).
    pub fn owner_of(&self, sid: u32) -> Option<(usize, u64)> {
        let routes = &self.shared.routes;
        routes.owner(sid).map(|w| (w, routes.epoch(sid)))
    }

    /// Stops running shard `sid` at the end of its executor's current turn
    /// and routes nothing to it until [`Worker::route`] names its next owner.
    pub fn stop_shard(&self, sid: u32) -> Result<(), EngineError> {
        let routes = &self.shared.routes;
        if !routes.owned_by(sid, self.me) {
            return Err(EngineError::Layout(format!(
                "shard {sid} is not run by this worker"
            )));
        }
        self.ask(routes.executor(sid), sid, |done| {
            crate::executor::Control::Stop(sid, done)
        })?;
        routes.set(sid, None, 0, 0);
        self.shared
            .metrics
            .shard_moves
            .with_label_values(&["out"])
            .inc();
        self.shared
            .metrics
            .shards_owned
            .set(routes.shards_of(self.me).len() as i64);
        Ok(())
    }

    /// Every key of shard `sid` (stopped, or never run here), as a shard
    /// file for [`Worker::adopt_shard`], and how many keys.
    pub fn shard_data(&self, sid: u32) -> Result<(Vec<u8>, u64), EngineError> {
        self.check_not_running(sid)?;
        let prefix = &self.plan.shards[sid as usize].prefix;
        crate::savepoint::shard_snapshot(&self.store, prefix)
            .map_err(|e| EngineError::Layout(format!("shard {sid}: {e}")))
    }

    /// Replaces what this worker holds of shard `sid` (not running here) by
    /// `data`, a shard file of [`Worker::shard_data`]; it runs once
    /// [`Worker::adopt_shard`] starts it.
    pub fn load_shard_data(&self, sid: u32, data: &[u8]) -> Result<u64, EngineError> {
        self.check_not_running(sid)?;
        let prefix = &self.plan.shards[sid as usize].prefix;
        crate::savepoint::replace_shard(&self.store, prefix, data)
            .map_err(|e| EngineError::Layout(format!("shard {sid}: {e}")))
    }

    /// Deletes this worker's copy of shard `sid` (moved away).
    pub fn drop_shard_data(&self, sid: u32) -> Result<(), EngineError> {
        self.check_not_running(sid)?;
        let prefix = &self.plan.shards[sid as usize].prefix;
        crate::savepoint::clear_shard(&self.store, prefix)
            .map_err(|e| EngineError::Layout(format!("shard {sid}: {e}")))
    }

    /// Runs shard `sid` from now on at `epoch`: from `data` (a shard file of
    /// [`Worker::shard_data`], which replaces whatever this worker held of
    /// it) or, without, from what its store holds. Tells every executor to
    /// send it again what it has not acknowledged.
    pub fn adopt_shard(
        &self,
        sid: u32,
        data: Option<&[u8]>,
        epoch: u64,
    ) -> Result<(), EngineError> {
        if sid as usize >= self.plan.shards.len() {
            return Err(EngineError::Layout(format!("no shard {sid}")));
        }
        if self.shared.routes.owned_by(sid, self.me) {
            return Ok(());
        }
        let prefix = &self.plan.shards[sid as usize].prefix;
        if let Some(bytes) = data {
            self.load_shard_data(sid, bytes)?;
        }
        if let Some(setup) = &self.commit_log {
            // Fenced and caught up here, however long the log takes: the
            // executor's own fence then finds little to read, and its
            // other shards do not wait for this one.
            let name = crate::commit_log::shard_name(&self.plan, sid);
            let writer = (crate::commit_log::incarnation(), setup.snapshots.as_ref());
            let m = &self.shared.metrics;
            crate::commit_log::fence(&*setup.log, &self.store, (&name, prefix), writer, false, m)?;
        }
        let mut b = self.store.batch();
        b.put(
            Cf::Meta,
            &crate::layout::epoch_key(prefix),
            &epoch.to_be_bytes(),
        );
        self.store.commit(b)?;
        let exec = self.least_loaded_executor();
        // The executor routes it here once it runs it.
        self.ask(exec, sid, |done| {
            crate::executor::Control::Start(sid, epoch, done)
        })?;
        self.rerouted(sid);
        let m = &self.shared.metrics;
        if data.is_some() {
            m.shard_moves.with_label_values(&["in"]).inc();
        }
        m.shards_owned
            .set(self.shared.routes.shards_of(self.me).len() as i64);
        Ok(())
    }

    /// Routes shard `sid` to worker `owner` (another worker's index, or none
    /// while it moves) from `epoch` on; with an owner, every executor sends
    /// it again what it has not acknowledged.
    pub fn route(&self, sid: u32, owner: Option<usize>, epoch: u64) -> Result<(), EngineError> {
        if owner == Some(self.me) || self.shared.routes.owned_by(sid, self.me) {
            return Err(EngineError::Layout(format!(
                "shard {sid} is routed here by adopt_shard and away by stop_shard"
            )));
        }
        if sid as usize >= self.plan.shards.len() || owner.is_some_and(|w| w >= self.plan.workers) {
            return Err(EngineError::Layout(format!(
                "no shard {sid} or no worker {owner:?}"
            )));
        }
        let routes = &self.shared.routes;
        if routes.owner(sid) == owner && routes.epoch(sid) == epoch {
            return Ok(());
        }
        routes.set(sid, owner, 0, epoch);
        if owner.is_some() {
            self.rerouted(sid);
        }
        Ok(())
    }

    /// Asks executor `exec` to start or stop `sid` at the end of its turn,
    /// and waits until it has.
    fn ask(
        &self,
        exec: usize,
        sid: u32,
        what: impl FnOnce(crossbeam_channel::Sender<()>) -> crate::executor::Control,
    ) -> Result<(), EngineError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.inboxes[exec]
            .send(vec![Msg::Shard(what(tx))])
            .map_err(|_| EngineError::Thread("the executor is gone".into()))?;
        // A turn lasts a commit interval, a commit, or an idle wait (20 ms).
        let timeout = Duration::from_secs(30);
        rx.recv_timeout(timeout).map_err(|_| {
            EngineError::Thread(format!(
                "shard {sid}: its executor did not answer within {timeout:?} (busy or gone)"
            ))
        })
    }

    fn rerouted(&self, sid: u32) {
        for inbox in &self.inboxes {
            let _ = inbox.send(vec![Msg::Shard(crate::executor::Control::Rerouted(sid))]);
        }
    }

    fn check_not_running(&self, sid: u32) -> Result<(), EngineError> {
        if sid as usize >= self.plan.shards.len() {
            return Err(EngineError::Layout(format!("no shard {sid}")));
        }
        if self.shared.routes.owned_by(sid, self.me) {
            return Err(EngineError::Layout(format!(
                "shard {sid} is running here: stop it first"
            )));
        }
        Ok(())
    }

    /// The executor with the fewest shards of this worker.
    fn least_loaded_executor(&self) -> usize {
        let routes = &self.shared.routes;
        let mut load = vec![0usize; self.inboxes.len()];
        for sid in routes.shards_of(self.me) {
            if let Some(l) = load.get_mut(routes.executor(sid)) {
                *l += 1;
            }
        }
        (0..load.len()).min_by_key(|&e| (load[e], e)).unwrap_or(0)
    }
}

/// Raises the epoch of every shard this worker owns, durably, before it
/// talks to anyone: a copy of an older incarnation (a zombie) is behind.
fn bump_epochs(store: &Store, plan: &Plan, me: usize) -> Result<Vec<(u32, u64)>, EngineError> {
    let mut epochs = Vec::new();
    let mut b = store.batch();
    for (sid, spec) in plan
        .shards
        .iter()
        .enumerate()
        .filter(|(_, s)| s.worker == me)
    {
        let key = crate::layout::epoch_key(&spec.prefix);
        let e = store
            .get(Cf::Meta, &key)?
            .as_deref()
            .and_then(crate::layout::read_u64)
            .unwrap_or(0)
            + 1;
        b.put(Cf::Meta, &key, &e.to_be_bytes());
        epochs.push((sid as u32, e));
    }
    store.commit(b)?;
    Ok(epochs)
}

/// The shard count decides where every key's state lives; refuse to start on
/// data laid out for another count.
fn check_layout(store: &Store, plan: &Plan, me: usize) -> Result<(), EngineError> {
    // Which shards live here follows from the worker count and index.
    let key = crate::layout::cluster_key();
    let want = [
        (plan.workers as u32).to_be_bytes(),
        (me as u32).to_be_bytes(),
    ]
    .concat();
    match store.get(Cf::Meta, &key)? {
        Some(had) if had != want => {
            let n = |b: &[u8]| b.try_into().map(u32::from_be_bytes).unwrap_or(0);
            return Err(EngineError::Layout(format!(
                "{} holds the shards of worker {} of {}; this is worker {me} of {}. \
                 Start each worker on its own data_dir, with the same [cluster] list",
                store.path().display(),
                n(&had[4..]),
                n(&had[..4.min(had.len())]),
                plan.workers
            )));
        }
        Some(_) => {}
        None => {
            let mut b = store.batch();
            b.put(Cf::Meta, &key, &want);
            store.commit(b)?;
        }
    }
    let key = crate::layout::shards_key();
    let want = plan.topology.engine.shards;
    match store.get(Cf::Meta, &key)? {
        Some(v) => {
            let had = v.as_slice().try_into().map(u32::from_be_bytes).unwrap_or(0);
            if had != want {
                return Err(EngineError::Layout(format!(
                    "{} was written with engine.shards = {had}; this topology says {want}. \
                     Use the same shard count, or a new data_dir",
                    store.path().display()
                )));
            }
        }
        None => {
            let mut b = store.batch();
            b.put(Cf::Meta, &key, &want.to_be_bytes());
            store.commit(b)?;
        }
    }
    // Each component's own count too (a source's `shards`): a shard of
    // another count would find none of its keys, and read again what was
    // read. Components may come and go.
    let key = crate::layout::shard_layout_key();
    let had = store
        .get(Cf::Meta, &key)?
        .map(|v| String::from_utf8_lossy(&v).into_owned());
    let had: Vec<&str> = had.iter().map(String::as_str).collect();
    match plan.shard_layout_against(&had) {
        Ok(None) => {}
        Ok(Some(record)) => {
            let mut b = store.batch();
            b.put(Cf::Meta, &key, record.as_bytes());
            store.commit(b)?;
        }
        Err(differs) => {
            return Err(EngineError::Layout(format!(
                "{} was written with other shard counts ({}). Use the same shard counts, or \
                 a new data_dir",
                store.path().display(),
                differs.join("; ")
            )))
        }
    }
    Ok(())
}
