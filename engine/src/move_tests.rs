//! Shards move between two live workers of one cluster (in this process,
//! over TCP on 127.0.0.1) while records flow: stopped at the end of a turn
//! on one, their data carried to the other, started there, routed to by
//! both. Every key's running count still arrives exactly as 1..n.

use crate::test_kinds::Numbers;
use crate::{
    Computation, ComputationError, Context, Metrics, Record, Registry, Sink, SinkError, Worker,
    WorkerOptions,
};
use millrace_config::Topology;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

const RECORDS: u64 = 60_000;

/// A running count per key, as big-endian u64 state.
#[derive(Clone)]
struct Tally;

impl Computation for Tally {
    fn process_record(&mut self, ctx: &mut Context<'_>, r: Record) -> Result<(), ComputationError> {
        let n = ctx
            .state()?
            .and_then(|b| <[u8; 8]>::try_from(&b[..]).ok())
            .map_or(0, u64::from_be_bytes)
            + 1;
        ctx.set_state(n.to_be_bytes().to_vec());
        ctx.produce(r.key, n.to_string(), r.timestamp);
        Ok(())
    }
}

/// Keeps what it is given, in order.
struct Collect(Arc<Mutex<Vec<(String, u64)>>>);

impl Sink for Collect {
    fn open(&mut self, _: Option<&[u8]>) -> Result<(), SinkError> {
        Ok(())
    }
    fn write(&mut self, r: &Record) -> Result<(), SinkError> {
        let key = String::from_utf8_lossy(&r.key).into_owned();
        let n = std::str::from_utf8(&r.value)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        self.0.lock().push((key, n));
        Ok(())
    }
    fn flush(&mut self, _: bool) -> Result<Vec<u8>, SinkError> {
        Ok(Vec::new())
    }
}

fn start(
    dir: &std::path::Path,
    text: &str,
    w: usize,
    out: &Arc<Mutex<Vec<(String, u64)>>>,
) -> Worker {
    start_with(
        dir,
        text,
        w,
        out,
        (WorkerOptions::default(), Arc::default(), RECORDS),
    )
}

fn start_with(
    dir: &std::path::Path,
    text: &str,
    w: usize,
    out: &Arc<Mutex<Vec<(String, u64)>>>,
    (opts, metrics, records): (WorkerOptions, Arc<Metrics>, u64),
) -> Worker {
    let mut registry = Registry::new();
    registry.source("numbers", move |_| {
        Ok(Box::new(Numbers {
            n: records,
            next: 0,
            read: Arc::default(),
            replayable: false,
        }))
    });
    registry.computation("tally", |_| Ok(crate::registry::per_shard(Tally)));
    let out = Arc::clone(out);
    registry.sink("collect", move |_| Ok(Box::new(Collect(Arc::clone(&out)))));
    let topology = Topology::parse_str("moves.toml", text).expect("topology");
    Worker::start(
        topology,
        &registry,
        WorkerOptions {
            worker: Some(format!("w{w}")),
            data_dir: Some(dir.join(format!("w{w}"))),
            ..opts
        },
        metrics,
    )
    .expect("start worker")
}

/// Moves `sid` from `workers[from]` to `workers[to]` at `epoch`.
fn move_shard(workers: &[Worker], sid: u32, from: usize, to: usize, epoch: u64) {
    workers[from].stop_shard(sid).expect("stop");
    let (data, _keys) = workers[from].shard_data(sid).expect("shard data");
    for (w, worker) in workers.iter().enumerate() {
        if w != from && w != to {
            worker.route(sid, None, 0).expect("unroute");
        }
    }
    workers[to]
        .adopt_shard(sid, Some(&data), epoch)
        .expect("adopt");
    for (w, worker) in workers.iter().enumerate() {
        if w != to {
            worker.route(sid, Some(to), epoch).expect("route");
        }
    }
    workers[from].drop_shard_data(sid).expect("drop");
}

/// Two workers over TCP on 127.0.0.1 running a source, a four-shard
/// tally and a sink.
fn two_workers_topology() -> String {
    let mut cluster = String::from("[cluster]\nsecret = \"moves-secret-0123456789\"\n");
    for w in 0..2 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        cluster.push_str(&format!(
            "[[cluster.workers]]\nid = \"w{w}\"\naddress = \"127.0.0.1:{port}\"\n"
        ));
    }
    format!(
        "{cluster}[engine]\nshards = 4\nthreads = 2\n\
         [sources.src]\ntype = \"numbers\"\n\
         [computations.count]\ntype = \"tally\"\ninputs = [\"src\"]\n\
         [sinks.out]\ntype = \"collect\"\ninputs = [\"count\"]\n"
    )
}

/// Each key's counts arrived exactly once each, in order (1..n), and all
/// `records` of them.
fn assert_exact(out: &[(String, u64)], records: u64) {
    let mut by_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (k, n) in out {
        by_key.entry(k.clone()).or_default().push(*n);
    }
    assert_eq!(by_key.len(), 7);
    let mut total = 0;
    for (k, counts) in &by_key {
        let want: Vec<u64> = (1..=counts.len() as u64).collect();
        assert!(counts == &want, "key {k}: counts are not 1..n");
        total += counts.len() as u64;
    }
    assert_eq!(total, records);
}

/// Waits up to 60 s for `cond`.
fn await_that(what: &str, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < Duration::from_secs(60), "{what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Enough that the run outlasts a takeover's fence, which a writer
/// appending as fast as an in-memory log answers can hold up for a while.
const FENCED_RECORDS: u64 = 600_000;

/// A worker whose shard was taken over behind its back (it stalled past
/// its lease, and another claimed the shard and fenced its commit log) has
/// its next append refused: it drops that turn and its executor's shards,
/// and goes on, without stopping. Given back what it still owns (as its
/// ownership does), it runs on, and every count stays exact.
#[test]
fn a_worker_fenced_off_a_shard_drops_it_and_goes_on() {
    let dir = tempfile::tempdir().expect("temp dir");
    let text = two_workers_topology();
    let out = Arc::new(Mutex::new(Vec::new()));
    let log: Arc<dyn crate::commit_log::CommitLog> =
        Arc::new(crate::commit_log::MemoryLog::default());
    let opts = WorkerOptions {
        dynamic: true,
        commit_log: Some(crate::commit_log::LogSetup {
            log: Arc::clone(&log),
            snapshots: None,
        }),
        ..WorkerOptions::default()
    };
    let fenced_metrics = Arc::new(Metrics::new());
    let workers = [
        start_with(
            dir.path(),
            &text,
            0,
            &out,
            (opts.clone(), Arc::clone(&fenced_metrics), FENCED_RECORDS),
        ),
        start_with(
            dir.path(),
            &text,
            1,
            &out,
            (opts, Arc::default(), FENCED_RECORDS),
        ),
    ];
    let shards = workers[0].plan().shards.len() as u32;
    for sid in 0..shards {
        workers[0].adopt_shard(sid, None, 1).expect("adopt");
        workers[1].route(sid, Some(0), 1).expect("route");
    }
    let taken = workers[0].sid_of("count", 1).expect("a count shard");
    // Early enough that the shard has records to commit after the claim.
    await_that("records flow", || out.lock().len() > 100);
    // Worker 1 claims it (a newer epoch) while worker 0 still runs it.
    workers[1].adopt_shard(taken, None, 2).expect("take over");
    await_that("worker 0 is fenced off", || {
        !workers[0].shards_owned().contains(&taken)
    });
    assert!(workers[0].fatal_error().is_none(), "worker 0 goes on");
    // What its ownership then does: routes the shard to its new owner and
    // starts again, from the log, what is still its own.
    workers[0].route(taken, Some(1), 2).expect("route");
    for sid in (0..shards).filter(|&s| s != taken) {
        if !workers[0].shards_owned().contains(&sid) {
            workers[0].adopt_shard(sid, None, 1).expect("adopt again");
        }
    }
    for w in &workers {
        assert!(
            w.wait_finished(Duration::from_secs(60))
                .expect("no failure"),
            "the run finished within 60 s"
        );
    }
    // What is counted in flight came back to nothing: the dropped turn
    // and shards were counted out as they were dropped, and in again as
    // they started.
    for w in &workers {
        await_that("nothing left in flight", || w.backlog() == 0);
    }
    let fenced = fenced_metrics.log_fenced.get();
    for w in workers {
        w.shutdown().expect("shutdown");
    }
    assert!(fenced >= 1, "the refused append is counted");
    assert_exact(&out.lock(), FENCED_RECORDS);
}

#[test]
fn shards_moved_back_and_forth_under_load_keep_every_count_exact() {
    let dir = tempfile::tempdir().expect("temp dir");
    let text = two_workers_topology();
    let out = Arc::new(Mutex::new(Vec::new()));
    let workers = [
        start(dir.path(), &text, 0, &out),
        start(dir.path(), &text, 1, &out),
    ];
    let count: Vec<u32> = (0..4)
        .map(|s| workers[0].sid_of("count", s).expect("a count shard"))
        .collect();
    // Every count shard goes to the other worker and back, twice, while
    // the source reads (each move waits for a few records to go through).
    let mut epoch = 100;
    let started = Instant::now();
    for round in 0..2 {
        for &sid in &count {
            let (from, _) = workers[0].owner_of(sid).expect("routed");
            let before = out.lock().len();
            while out.lock().len() < before + 500 && (out.lock().len() as u64) < RECORDS {
                assert!(started.elapsed() < Duration::from_secs(60), "records flow");
                std::thread::sleep(Duration::from_millis(1));
            }
            epoch += 1;
            move_shard(&workers, sid, from, 1 - from, epoch);
            assert_eq!(
                workers[0].owner_of(sid),
                Some((1 - from, epoch)),
                "round {round}"
            );
            assert_eq!(workers[1].owner_of(sid), Some((1 - from, epoch)));
        }
    }
    for w in &workers {
        assert!(
            w.wait_finished(Duration::from_secs(60))
                .expect("no failure"),
            "the run finished within 60 s"
        );
    }
    for w in workers {
        w.shutdown().expect("shutdown");
    }
    assert_exact(&out.lock(), RECORDS);
}
