//! Event-time timers: fired in timestamp order once the input watermark
//! passes them, each exactly once, and persisted per key: timers set before
//! a restart fire after it.

use bytes::Bytes;
use millrace_config::Topology;
use millrace_engine::{
    per_shard, Computation, ComputationError, Context, Emitter, Metrics, Record, Registry, Sink,
    SinkError, Source, SourceError, SourcePoll, TimeDomain, Timer, Worker, WorkerOptions,
};
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;

/// Emits `n` records: key `k{i % 3}`, timestamp `1000 * (n - i)` (newest
/// first); then, if `ends`, is exhausted, else waits for more forever.
struct Countdown {
    n: u64,
    next: u64,
    ends: bool,
}

impl Source for Countdown {
    fn open(&mut self, position: Option<&[u8]>) -> Result<(), SourceError> {
        self.next = position.map_or(0, |p| u64::from_be_bytes(p.try_into().unwrap_or([0; 8])));
        Ok(())
    }
    fn poll(&mut self, out: &mut Emitter<'_>, max: usize) -> Result<SourcePoll, SourceError> {
        for _ in 0..max {
            if self.next >= self.n {
                return Ok(if self.ends {
                    SourcePoll::Exhausted
                } else {
                    SourcePoll::Idle
                });
            }
            let i = self.next;
            out.emit(
                format!("k{}", i % 3),
                i.to_string(),
                1000 * (self.n - i) as i64,
            );
            self.next += 1;
        }
        Ok(SourcePoll::Ready)
    }
    fn position(&self) -> Vec<u8> {
        self.next.to_be_bytes().to_vec()
    }
}

/// Sets one event-time timer per record at its timestamp; when it fires,
/// emits the timer's time. A second timer with the same tag moves it.
#[derive(Clone)]
struct AtWatermark;

impl Computation for AtWatermark {
    fn process_record(&mut self, ctx: &mut Context<'_>, r: Record) -> Result<(), ComputationError> {
        ctx.set_timer(r.value.clone(), TimeDomain::EventTime, r.timestamp);
        if r.value == "4" {
            // Deleted before it can fire.
            ctx.delete_timer(b"4");
        }
        Ok(())
    }
    fn process_timer(&mut self, ctx: &mut Context<'_>, t: Timer) -> Result<(), ComputationError> {
        assert!(
            ctx.low_watermark() > t.time,
            "fired before the watermark passed it"
        );
        let key = ctx.key().clone();
        ctx.produce(key, Bytes::from(t.time.to_string()), t.time);
        Ok(())
    }
}

struct Collect(Arc<Mutex<Vec<(String, i64)>>>);

impl Sink for Collect {
    fn open(&mut self, _: Option<&[u8]>) -> Result<(), SinkError> {
        Ok(())
    }
    fn write(&mut self, r: &Record) -> Result<(), SinkError> {
        self.0
            .lock()
            .push((String::from_utf8_lossy(&r.key).into_owned(), r.timestamp));
        Ok(())
    }
    fn flush(&mut self, _: bool) -> Result<Vec<u8>, SinkError> {
        Ok(Vec::new())
    }
}

#[test]
fn event_time_timers_fire_once_in_order_when_the_watermark_passes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let got = Arc::new(Mutex::new(Vec::new()));
    let mut registry = Registry::new();
    registry.source("countdown", |_| {
        Ok(Box::new(Countdown {
            n: 30,
            next: 0,
            ends: true,
        }))
    });
    registry.computation("at_watermark", |_| Ok(per_shard(AtWatermark)));
    let sink_out = Arc::clone(&got);
    registry.sink("collect", move |_| {
        Ok(Box::new(Collect(Arc::clone(&sink_out))))
    });
    let topology = Topology::parse_str(
        "timers.toml",
        &format!(
            r#"
[service]
data_dir = "{}"
[engine]
shards = 2
[sources.src]
type = "countdown"
[computations.timers]
type = "at_watermark"
inputs = ["src"]
[sinks.out]
type = "collect"
inputs = ["timers"]
"#,
            dir.path().display()
        ),
    )
    .expect("topology");
    let worker = Worker::start(
        topology,
        &registry,
        WorkerOptions::default(),
        Arc::new(Metrics::new()),
    )
    .expect("start");
    assert!(worker
        .wait_finished(Duration::from_secs(30))
        .expect("no failure"));
    worker.shutdown().expect("shutdown");

    let got = got.lock().clone();
    assert_eq!(got.len(), 29, "30 timers set, one deleted: {got:?}");
    for key in ["k0", "k1", "k2"] {
        let times: Vec<i64> = got
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, t)| *t)
            .collect();
        let mut sorted = times.clone();
        sorted.sort();
        assert_eq!(times, sorted, "timers of {key} fire in timestamp order");
    }
    assert!(
        !got.iter().any(|(_, t)| *t == 1000 * (30 - 4)),
        "the deleted timer never fires"
    );
}

#[test]
fn timers_set_before_a_restart_fire_after_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let got = Arc::new(Mutex::new(Vec::new()));
    let registry = |ends: bool| {
        let mut registry = Registry::new();
        registry.source("countdown", move |_| {
            Ok(Box::new(Countdown {
                n: 30,
                next: 0,
                ends,
            }))
        });
        registry.computation("at_watermark", |_| Ok(per_shard(AtWatermark)));
        let sink_out = Arc::clone(&got);
        registry.sink("collect", move |_| {
            Ok(Box::new(Collect(Arc::clone(&sink_out))))
        });
        registry
    };
    // The source's watermark stays an hour behind its data: no timer is due.
    let topology = || {
        Topology::parse_str(
            "timers.toml",
            &format!(
                r#"
[service]
data_dir = "{}"
[engine]
shards = 2
[sources.src]
type = "countdown"
watermark = {{ out_of_order = "1h" }}
[computations.timers]
type = "at_watermark"
inputs = ["src"]
[sinks.out]
type = "collect"
inputs = ["timers"]
"#,
                dir.path().display()
            ),
        )
        .expect("topology")
    };
    let start = |ends: bool| {
        Worker::start(
            topology(),
            &registry(ends),
            WorkerOptions::default(),
            Arc::new(Metrics::new()),
        )
        .expect("start")
    };
    let pending = |w: &Worker| {
        w.status()
            .iter()
            .find(|c| c.name == "timers")
            .map_or(0, |c| c.timers)
    };
    let worker = start(false);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while pending(&worker) < 29 {
        assert!(std::time::Instant::now() < deadline, "timers were not set");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(worker.drain(Duration::from_secs(30)).expect("drain"));
    worker.shutdown().expect("shutdown");
    assert!(got.lock().is_empty(), "nothing was due before the restart");

    // The source now ends: its watermark passes every timer, which must
    // come back from storage to fire.
    let worker = start(true);
    assert!(worker
        .wait_finished(Duration::from_secs(30))
        .expect("no failure"));
    worker.shutdown().expect("shutdown");
    let got = got.lock().clone();
    assert_eq!(
        got.len(),
        29,
        "29 timers were set before the restart: {got:?}"
    );
}
