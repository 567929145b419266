//! In-process tests of the commit loop's order of effects: a real worker
//! (two executors, a replayable source, a stateful computation, a sink) whose
//! executors record each turn, each commit and everything they hand out.
//! Nothing but a replayable source's deliveries may leave an executor
//! between the start of a turn and the return of its commit.

use crate::commit_log::{CommitLog, MemoryLog};
use crate::shared::Step;
use crate::test_kinds::Numbers;
use crate::{
    per_shard, Computation, ComputationError, Context, Metrics, Record, Registry, Sink, SinkError,
    Worker, WorkerOptions,
};
use millrace_config::Topology;
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;

/// A running count per key.
#[derive(Clone)]
struct Running;

impl Computation for Running {
    fn process_record(&mut self, ctx: &mut Context<'_>, r: Record) -> Result<(), ComputationError> {
        let n = ctx
            .state()?
            .and_then(|b| std::str::from_utf8(&b).ok()?.parse::<u64>().ok())
            .unwrap_or(0)
            + 1;
        ctx.set_state(n.to_string());
        ctx.produce(r.key, n.to_string(), r.timestamp);
        Ok(())
    }
}

/// Counts the records written, and the flushes asked to sync and not.
struct Collect {
    written: Arc<Mutex<u64>>,
    flushes: Arc<Mutex<(u64, u64)>>,
}

impl Sink for Collect {
    fn open(&mut self, _: Option<&[u8]>) -> Result<(), SinkError> {
        Ok(())
    }
    fn write(&mut self, _: &Record) -> Result<(), SinkError> {
        *self.written.lock() += 1;
        Ok(())
    }
    fn flush(&mut self, sync: bool) -> Result<Vec<u8>, SinkError> {
        let mut f = self.flushes.lock();
        if sync {
            f.0 += 1;
        } else {
            f.1 += 1;
        }
        Ok(Vec::new())
    }
}

/// What one run did.
struct Run {
    steps: Vec<Step>,
    /// Records the source read.
    read: u64,
    /// Records the sink got.
    written: u64,
    /// The sink's flushes asked to sync to the disk, and not.
    flushes: (u64, u64),
    /// The end-to-end latency histogram of the sink: count and sum (s).
    latency: (u64, f64),
}

/// Runs 3,000 records through source -> running -> sink on `dir`, to the
/// end, recording each executor's steps.
fn run_recorded(dir: &std::path::Path) -> Run {
    run_with(dir, "process", true, None)
}

/// [`run_recorded`] with a commit log (and snapshots).
fn run_logged(
    dir: &std::path::Path,
    log: Arc<dyn CommitLog>,
    snapshots: Option<crate::commit_log::Snapshots>,
) -> Run {
    run_logged_with(
        dir,
        "process",
        true,
        None,
        Some(crate::commit_log::LogSetup { log, snapshots }),
    )
}

fn run_with(
    dir: &std::path::Path,
    durability: &str,
    replayable: bool,
    stop_after: Option<u64>,
) -> Run {
    run_logged_with(dir, durability, replayable, stop_after, None)
}

/// [`run_recorded`] with `durability` in `[engine]`, a source `replayable`
/// or not, stopped (SIGTERM's path: drain, then a last commit) once the
/// sink has `stop_after` records, or run to the end.
fn run_logged_with(
    dir: &std::path::Path,
    durability: &str,
    replayable: bool,
    stop_after: Option<u64>,
    commit_log: Option<crate::commit_log::LogSetup>,
) -> Run {
    let written = Arc::new(Mutex::new(0));
    let flushes = Arc::new(Mutex::new((0, 0)));
    let read = Arc::new(Mutex::new(0));
    let mut registry = Registry::new();
    let r = Arc::clone(&read);
    registry.source("numbers", move |_| {
        Ok(Box::new(Numbers {
            n: 3000,
            next: 0,
            read: Arc::clone(&r),
            replayable,
        }))
    });
    registry.computation("running", |_| Ok(per_shard(Running)));
    let (w, f) = (Arc::clone(&written), Arc::clone(&flushes));
    registry.sink("collect", move |_| {
        Ok(Box::new(Collect {
            written: Arc::clone(&w),
            flushes: Arc::clone(&f),
        }))
    });
    // Stopped mid-stream, a small backlog bound keeps the source within a
    // few hundred records of what the sink has, so the stop comes before
    // the source's end whatever the scheduling.
    let max_backlog = if stop_after.is_some() { 256 } else { 16_384 };
    let topology = Topology::parse_str(
        "order.toml",
        &format!(
            r#"
[service]
data_dir = "{}"
[engine]
shards = 3
threads = 2
batch_size = 64
durability = "{durability}"
max_backlog = {max_backlog}
[sources.src]
type = "numbers"
[computations.counts]
type = "running"
inputs = ["src"]
[sinks.out]
type = "collect"
inputs = ["counts"]
"#,
            dir.display()
        ),
    )
    .expect("topology");
    let log = Arc::new(Mutex::new(Vec::new()));
    let opts = WorkerOptions {
        recorder: Some(Arc::clone(&log)),
        commit_log,
        ..WorkerOptions::default()
    };
    let metrics = Arc::new(Metrics::new());
    let worker = Worker::start(topology, &registry, opts, Arc::clone(&metrics)).expect("start");
    if let Some(k) = stop_after {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while *written.lock() < k {
            assert!(
                std::time::Instant::now() < deadline,
                "the sink did not get {k} records within 15 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    } else {
        // It takes well under a second; a run still going after 15 s is stuck.
        assert!(
            worker
                .wait_finished(Duration::from_secs(15))
                .expect("no failure"),
            "the worker did not finish 3,000 records within 15 s"
        );
    }
    worker.shutdown().expect("shutdown");
    let steps = log.lock().clone();
    let (read, written, flushes) = (*read.lock(), *written.lock(), *flushes.lock());
    Run {
        steps,
        read,
        written,
        flushes,
        latency: {
            let h = metrics.e2e_latency.with_label_values(&["out"]);
            (h.get_sample_count(), h.get_sample_sum())
        },
    }
}

#[test]
fn nothing_leaves_an_executor_before_its_turns_commit_returns() {
    let dir = tempfile::tempdir().expect("temp dir");
    let Run {
        steps,
        read,
        written,
        ..
    } = run_recorded(dir.path());
    assert_eq!(
        (read, written),
        (3000, 3000),
        "every record read and delivered once"
    );
    // Every production was acknowledged, so none is left in the outbox.
    {
        let store = millrace_storage::Store::open(dir.path(), &Default::default()).expect("store");
        let mut left = 0;
        store
            .for_each_prefix(millrace_storage::Cf::Outbox, &[], |_, _| {
                left += 1;
                true
            })
            .expect("scan");
        assert_eq!(left, 0, "productions left in the outbox after the run");
    }
    // Everything was committed, the replayable source's position too (only
    // once all it produced was acknowledged): started again on the same
    // data, the worker finds the source at its end and nothing to deliver.
    let again = run_recorded(dir.path());
    assert_eq!(
        (again.read, again.written),
        (0, 0),
        "a second run on committed data reads and delivers nothing"
    );
    // Per executor: whether the current turn's commit has returned.
    let mut committed = [true, true];
    let (mut late, mut early) = (0, 0);
    for (i, step) in steps.iter().enumerate() {
        match *step {
            Step::Turn(e) => committed[e] = false,
            Step::Committed(e) => committed[e] = true,
            Step::LogAppended(_) => {}
            Step::Sent {
                exec,
                early: true,
                acks,
                deliveries,
                watermarks,
            } => {
                // The early path carries a replayable source's deliveries only.
                assert_eq!((acks, watermarks), (0, 0), "step {i}: {step:?}");
                early += deliveries;
                let _ = exec;
            }
            Step::Sent {
                exec,
                acks,
                deliveries,
                watermarks,
                ..
            } => {
                assert!(
                    committed[exec],
                    "step {i}: executor {exec} handed out {acks} acks, {deliveries} deliveries \
                     and {watermarks} watermarks before its turn's commit returned"
                );
                late += acks + deliveries;
            }
        }
    }
    // Both paths were exercised.
    assert!(early > 0 && late > 0, "early {early}, after commits {late}");
}

#[test]
fn a_sink_syncs_exactly_under_machine_durability_and_each_delivery_records_its_latency() {
    for (durability, synced) in [("process", false), ("machine", true)] {
        let dir = tempfile::tempdir().expect("temp dir");
        let run = run_with(dir.path(), durability, true, None);
        assert_eq!(run.written, 3000, "{durability}");
        // One latency per delivery to the sink, each from the record's
        // ingestion: well under a minute on average, and not all zero.
        let (n, sum) = run.latency;
        assert_eq!(n, 3000, "{durability}: one latency per delivery");
        assert!(
            sum > 0.0 && sum / (n as f64) < 60.0,
            "{durability}: mean end-to-end latency {} s",
            sum / n as f64
        );
        let (with_sync, without) = run.flushes;
        assert!(
            with_sync + without > 0,
            "{durability}: the sink was flushed"
        );
        if synced {
            assert_eq!(without, 0, "machine: every flush syncs");
        } else {
            assert_eq!(with_sync, 0, "process: no flush syncs");
        }
    }
}

#[test]
fn a_source_that_is_not_replayable_resumes_from_its_committed_position() {
    let dir = tempfile::tempdir().expect("temp dir");
    let first = run_with(dir.path(), "process", false, Some(1000));
    assert!(first.read < 3000, "stopped before the end: {}", first.read);
    let rest = run_with(dir.path(), "process", false, None);
    assert_eq!(
        (first.read + rest.read, first.written + rest.written),
        (3000, 3000),
        "each record read once and delivered once across the stop"
    );
}

/// With a commit log, a turn's commit waits for its appends, so nothing is
/// released before the log has it; and the log alone rebuilds the worker:
/// started on an empty data directory, it finds every shard where the
/// first run left it (the source at its end, the counts whole).
#[test]
fn with_a_commit_log_nothing_is_released_before_the_log_has_it_and_the_log_rebuilds_the_worker() {
    let log = Arc::new(MemoryLog::default());
    let dir = tempfile::tempdir().expect("temp dir");
    let run = run_logged(dir.path(), Arc::clone(&log) as Arc<dyn CommitLog>, None);
    assert_eq!((run.read, run.written), (3000, 3000));
    // Per executor and turn: appended to the log, committed, released. In
    // this run nothing is sent twice (in-process channels lose nothing), so
    // every acknowledgement and delivery released belongs to the turn's
    // own commit, whose appends must have returned before.
    let mut state = [(false, false); 2];
    let mut released = 0;
    for (i, step) in run.steps.iter().enumerate() {
        match *step {
            Step::Turn(e) => state[e] = (false, false),
            Step::LogAppended(e) => {
                assert!(
                    !state[e].1,
                    "step {i}: executor {e} appended after its commit"
                );
                state[e].0 = true;
            }
            Step::Committed(e) => state[e].1 = true,
            Step::Sent {
                exec,
                early: false,
                acks,
                deliveries,
                ..
            } if acks + deliveries > 0 => {
                assert!(
                    state[exec] == (true, true),
                    "step {i}: executor {exec} released {acks} acks and {deliveries} \
                     deliveries in a turn whose log append had not returned"
                );
                released += acks + deliveries;
            }
            Step::Sent { .. } => {}
        }
    }
    assert!(released > 0, "nothing was released");
    // The source, each of the 3 count shards and the sink have a log: a
    // fence, then their commits.
    for name in ["src.0", "counts.0", "counts.1", "counts.2", "out.0"] {
        assert!(
            log.len_of(name) >= 2,
            "{name}: {} entries",
            log.len_of(name)
        );
    }
    // The machine is lost: a new, empty data directory and the same log.
    let lost = tempfile::tempdir().expect("temp dir");
    let again = run_logged(lost.path(), Arc::clone(&log) as Arc<dyn CommitLog>, None);
    assert_eq!(
        (again.read, again.written),
        (0, 0),
        "rebuilt from the log, the worker reads and delivers nothing again"
    );
    let (before, after) = (state_of(dir.path()), state_of(lost.path()));
    // The source's keys are k0..k6, each counted to the end.
    assert_eq!(before.len(), 7, "one count per key: {before:?}");
    assert_eq!(before, after, "the state rebuilt from the log is the state");
}

/// Every key with state in the data directory `d`, with its value.
fn state_of(d: &std::path::Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let store = millrace_storage::Store::open(d, &Default::default()).expect("store");
    let mut all = Vec::new();
    store
        .for_each_state(&[], |k, v| {
            all.push((k.to_vec(), v.to_vec()));
            true
        })
        .expect("scan");
    all
}

/// With snapshots, each shard's log is cut below its last snapshot, only
/// the last snapshot file of each shard is kept, and a worker on an empty
/// data directory rebuilds from the snapshots and what follows them.
#[test]
fn with_snapshots_the_log_is_cut_and_still_rebuilds_the_worker() {
    let log = Arc::new(MemoryLog::default());
    let files = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(crate::savepoint::DirStore::new(files.path()));
    let snapshots = crate::commit_log::Snapshots::new(store, 4096, "test".into());
    let dir = tempfile::tempdir().expect("temp dir");
    let run = run_logged(
        dir.path(),
        Arc::clone(&log) as Arc<dyn CommitLog>,
        Some(snapshots.clone()),
    );
    assert_eq!((run.read, run.written), (3000, 3000));
    let appended: usize = run
        .steps
        .iter()
        .filter(|s| matches!(s, Step::LogAppended(_)))
        .count();
    // Each count shard got about a third of 3,000 records, ~100 bytes of
    // entry each: snapshots (written off the executor, so how many in a
    // run this short depends on timing), each cutting the log below it.
    for name in ["counts.0", "counts.1", "counts.2"] {
        let dir = files.path().join("test").join(name);
        let kept: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{name} has no snapshot: {e}"))
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(
            kept.len(),
            1,
            "{name}: only the last snapshot is kept: {kept:?}"
        );
        let left = log.len_of(name);
        assert!(left > 0, "{name}: the log holds what follows its snapshot");
        assert!(
            log.cut_of(name) > 0,
            "{name}: the log was cut below its snapshot ({left} entries left of ~{appended} appends)"
        );
    }
    // The machine is lost: an empty data directory, the cut log, the snapshots.
    let lost = tempfile::tempdir().expect("temp dir");
    let again = run_logged(
        lost.path(),
        Arc::clone(&log) as Arc<dyn CommitLog>,
        Some(snapshots),
    );
    assert_eq!(
        (again.read, again.written),
        (0, 0),
        "rebuilt, nothing read or delivered again"
    );
    assert_eq!(state_of(dir.path()), state_of(lost.path()));
    // Without the snapshots, the cut log cannot rebuild it, and says why.
    let without = tempfile::tempdir().expect("temp dir");
    let store = millrace_storage::Store::open(without.path(), &Default::default()).expect("store");
    let p = crate::layout::shard_prefix("counts", 0);
    let err = crate::commit_log::catch_up(&*log, &store, ("counts.0", &p), None, &Metrics::new())
        .unwrap_err();
    assert!(
        err.to_string().contains("[state] snapshots is not set"),
        "{err}"
    );
}
