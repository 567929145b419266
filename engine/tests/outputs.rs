//! Producing to an output a kind did not declare is a bad record (counted,
//! sent to `NAME.errors`), never a silent drop; declared outputs route.

use millrace_config::Topology;
use millrace_engine::{
    per_shard, Computation, ComputationError, Context, Emitter, Metrics, Record, Registry, Sink,
    SinkError, Source, SourceError, SourcePoll, Worker, WorkerOptions,
};
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;

struct Three(u64);

impl Source for Three {
    fn open(&mut self, _: Option<&[u8]>) -> Result<(), SourceError> {
        Ok(())
    }
    fn poll(&mut self, out: &mut Emitter<'_>, _: usize) -> Result<SourcePoll, SourceError> {
        if self.0 == 3 {
            return Ok(SourcePoll::Exhausted);
        }
        self.0 += 1;
        out.emit(format!("k{}", self.0), self.0.to_string(), self.0 as i64);
        Ok(SourcePoll::Ready)
    }
    fn position(&self) -> Vec<u8> {
        self.0.to_be_bytes().to_vec()
    }
}

/// Odd values to the declared output `odd`, even ones to `nowhere`.
#[derive(Clone)]
struct Split;

impl Computation for Split {
    fn process_record(&mut self, ctx: &mut Context<'_>, r: Record) -> Result<(), ComputationError> {
        let odd = r.value.last().is_some_and(|b| (b - b'0') % 2 == 1);
        ctx.produce_to(
            if odd { "odd" } else { "nowhere" },
            r.key,
            r.value,
            r.timestamp,
        );
        Ok(())
    }
}

struct Collect(Arc<Mutex<Vec<String>>>);

impl Sink for Collect {
    fn open(&mut self, _: Option<&[u8]>) -> Result<(), SinkError> {
        Ok(())
    }
    fn write(&mut self, r: &Record) -> Result<(), SinkError> {
        self.0
            .lock()
            .push(String::from_utf8_lossy(&r.value).into_owned());
        Ok(())
    }
    fn flush(&mut self, _: bool) -> Result<Vec<u8>, SinkError> {
        Ok(Vec::new())
    }
}

#[test]
fn an_undeclared_output_is_a_bad_record_and_a_declared_one_routes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (odd, errors) = (
        Arc::new(Mutex::new(Vec::new())),
        Arc::new(Mutex::new(Vec::new())),
    );
    let mut registry = Registry::new();
    registry.source("three", |_| Ok(Box::new(Three(0))));
    registry.computation("split", |_| Ok(per_shard(Split)));
    registry.outputs("split", &["odd"]);
    let (o, e) = (Arc::clone(&odd), Arc::clone(&errors));
    registry.sink("odd", move |_| Ok(Box::new(Collect(Arc::clone(&o)))));
    registry.sink("errors", move |_| Ok(Box::new(Collect(Arc::clone(&e)))));
    let topology = Topology::parse_str(
        "outputs.toml",
        &format!(
            r#"
[service]
data_dir = "{}"
[sources.src]
type = "three"
[computations.s]
type = "split"
inputs = ["src"]
[sinks.odd]
type = "odd"
inputs = ["s.odd"]
[sinks.errors]
type = "errors"
inputs = ["s.errors"]
"#,
            dir.path().display()
        ),
    )
    .expect("topology");
    let metrics = Arc::new(Metrics::new());
    let worker = Worker::start(
        topology,
        &registry,
        WorkerOptions::default(),
        Arc::clone(&metrics),
    )
    .expect("start");
    assert!(worker
        .wait_finished(Duration::from_secs(30))
        .expect("no failure"));
    worker.shutdown().expect("shutdown");
    let mut got = odd.lock().clone();
    got.sort();
    assert_eq!(got, ["1", "3"]);
    assert_eq!(
        errors.lock().clone(),
        ["2"],
        "the record produced to `nowhere`"
    );
    assert_eq!(metrics.bad_records.with_label_values(&["s"]).get(), 1);
}
