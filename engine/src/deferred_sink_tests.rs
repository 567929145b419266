//! A sink that defers durability (as the Kafka sink does) is never waited
//! for, and what it has not yet said is durable is neither committed as
//! applied nor acknowledged: a stop delivers exactly that again.

use crate::test_kinds::Numbers;
use crate::{Durable, Metrics, Record, Registry, Sink, SinkError, Worker, WorkerOptions};
use millrace_config::Topology;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const RECORDS: u64 = 1000;

/// What the test sees of the gated sink, and how far it lets it be durable.
#[derive(Default)]
struct Gate {
    /// The delivery ids' sequence numbers, as written.
    written: Mutex<Vec<u64>>,
    /// How many writes the sink may call durable.
    released: AtomicU64,
    /// The most it has called durable.
    reported: AtomicU64,
}

/// A sink whose writes become durable only as far as its gate says.
struct Gated {
    gate: Arc<Gate>,
    writes: u64,
}

impl Sink for Gated {
    fn open(&mut self, _: Option<&[u8]>) -> Result<(), SinkError> {
        Ok(())
    }
    fn write(&mut self, _: &Record) -> Result<(), SinkError> {
        unreachable!("the engine delivers with ids")
    }
    fn write_delivered(&mut self, _: &Record, id: &crate::DeliveryId<'_>) -> Result<(), SinkError> {
        self.writes += 1;
        self.gate.written.lock().push(id.seq);
        Ok(())
    }
    fn flush(&mut self, _: bool) -> Result<Vec<u8>, SinkError> {
        unreachable!("the engine never flushes a sink that defers")
    }
    fn defers(&self) -> bool {
        true
    }
    fn durable(&mut self) -> Result<Durable, SinkError> {
        let writes = self.writes.min(self.gate.released.load(Ordering::SeqCst));
        self.gate.reported.fetch_max(writes, Ordering::SeqCst);
        Ok(Durable {
            writes,
            position: writes.to_be_bytes().to_vec(),
        })
    }
}

fn start(dir: &std::path::Path, gate: &Arc<Gate>) -> Worker {
    start_with(dir, gate, &Arc::new(Metrics::new()))
}

/// [`start`], counting in `metrics`.
fn start_with(dir: &std::path::Path, gate: &Arc<Gate>, metrics: &Arc<Metrics>) -> Worker {
    let mut registry = Registry::new();
    registry.source("numbers", |_| {
        Ok(Box::new(Numbers {
            n: RECORDS,
            next: 0,
            read: Arc::default(),
            replayable: false,
        }))
    });
    let g = Arc::clone(gate);
    registry.sink("gated", move |_| {
        Ok(Box::new(Gated {
            gate: Arc::clone(&g),
            writes: 0,
        }))
    });
    let topology = Topology::parse_str(
        "deferred.toml",
        &format!(
            "[service]\ndata_dir = \"{}\"\n[engine]\nthreads = 2\n\
             [sources.src]\ntype = \"numbers\"\n\
             [sinks.out]\ntype = \"gated\"\ninputs = [\"src\"]\n",
            dir.display()
        ),
    )
    .expect("topology");
    Worker::start(
        topology,
        &registry,
        WorkerOptions::default(),
        Arc::clone(metrics),
    )
    .expect("start")
}

/// Runs the worker again on `dir` with every write durable at once, to
/// the source's end; returns the sequence numbers the sink was given.
fn run_to_the_end(dir: &std::path::Path, gate: &Arc<Gate>) -> Vec<u64> {
    gate.written.lock().clear();
    gate.released.store(u64::MAX, Ordering::SeqCst);
    let worker = start(dir, gate);
    assert!(
        worker
            .wait_finished(Duration::from_secs(15))
            .expect("no failure"),
        "the run did not finish within 15 s"
    );
    worker.shutdown().expect("shutdown");
    let written = gate.written.lock().clone();
    written
}

/// Waits up to 15 s for `done`.
fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !done() {
        assert!(Instant::now() < deadline, "{what} within 15 s");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn what_a_sink_has_not_called_durable_is_delivered_again_and_nothing_else() {
    let dir = tempfile::tempdir().expect("temp dir");
    let gate = Arc::new(Gate::default());
    let worker = start(dir.path(), &gate);
    // Every record is written without any being durable: the engine did
    // not wait for the sink.
    until("the sink was given every record", || {
        gate.written.lock().len() as u64 == RECORDS
    });
    assert_eq!(gate.reported.load(Ordering::SeqCst), 0);
    assert!(
        !worker
            .wait_finished(Duration::from_millis(50))
            .expect("no failure"),
        "the run finished with nothing durable"
    );
    // 400 become durable; the turn that finds them commits them.
    gate.released.store(400, Ordering::SeqCst);
    until("the sink reported 400 durable", || {
        gate.reported.load(Ordering::SeqCst) == 400
    });
    worker.shutdown().expect("shutdown");
    let first: Vec<u64> = std::mem::take(&mut *gate.written.lock());
    assert_eq!(first, (1..=RECORDS).collect::<Vec<_>>());

    // The next run is given exactly the 600 that were not durable, and
    // finishes once they are.
    assert_eq!(
        run_to_the_end(dir.path(), &gate),
        (401..=RECORDS).collect::<Vec<_>>()
    );
}

#[test]
fn a_delivery_sent_again_before_it_is_durable_is_not_acknowledged() {
    let dir = tempfile::tempdir().expect("temp dir");
    let gate = Arc::new(Gate::default());
    let metrics = Arc::new(Metrics::new());
    let worker = start_with(dir.path(), &gate, &metrics);
    // Nothing is durable, so nothing is acknowledged: the source sends its
    // records again (after its retry backoff), and the sink drops them as
    // duplicates without acknowledging any.
    let duplicates = metrics.duplicates.with_label_values(&["out"]);
    until("a record sent again", || duplicates.get() > 0);
    worker.shutdown().expect("shutdown");

    // So the next run is given every record again.
    assert_eq!(
        run_to_the_end(dir.path(), &gate),
        (1..=RECORDS).collect::<Vec<_>>()
    );
}
