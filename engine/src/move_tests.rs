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
    let mut registry = Registry::new();
    registry.source("numbers", |_| {
        Ok(Box::new(Numbers {
            n: RECORDS,
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
            ..WorkerOptions::default()
        },
        Arc::new(Metrics::new()),
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

#[test]
fn shards_moved_back_and_forth_under_load_keep_every_count_exact() {
    let dir = tempfile::tempdir().expect("temp dir");
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
    let text = format!(
        "{cluster}[engine]\nshards = 4\nthreads = 2\n\
         [sources.src]\ntype = \"numbers\"\n\
         [computations.count]\ntype = \"tally\"\ninputs = [\"src\"]\n\
         [sinks.out]\ntype = \"collect\"\ninputs = [\"count\"]\n"
    );
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
    // Each key's counts arrive exactly once each, in order: 1..n.
    let mut by_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (k, n) in out.lock().iter() {
        by_key.entry(k.clone()).or_default().push(*n);
    }
    assert_eq!(by_key.len(), 7);
    let mut total = 0;
    for (k, counts) in &by_key {
        let want: Vec<u64> = (1..=counts.len() as u64).collect();
        assert!(counts == &want, "key {k}: counts are not 1..n");
        total += counts.len() as u64;
    }
    assert_eq!(total, RECORDS);
}
