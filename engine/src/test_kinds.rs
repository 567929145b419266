//! Kinds for the in-crate tests: `nothing` (a source always exhausted, a
//! computation and a sink that do nothing), for tests that need a plan or a
//! shard; `Numbers`, a source of numbered records.

use crate::{
    Computation, ComputationError, Context, Emitter, Plan, Record, Registry, Sink, SinkError,
    Source, SourceError, SourcePoll,
};
use millrace_config::Topology;
use parking_lot::Mutex;
use std::sync::Arc;

#[derive(Clone)]
pub(crate) struct Nothing;

impl Source for Nothing {
    fn open(&mut self, _: Option<&[u8]>) -> Result<(), SourceError> {
        Ok(())
    }
    fn poll(&mut self, _: &mut Emitter<'_>, _: usize) -> Result<SourcePoll, SourceError> {
        Ok(SourcePoll::Exhausted)
    }
    fn position(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Splits into any number of shards (of nothing).
    fn assign(&mut self, _: &crate::api::SourceShard) -> Result<(), String> {
        Ok(())
    }
}

impl Computation for Nothing {
    fn process_record(&mut self, _: &mut Context<'_>, _: Record) -> Result<(), ComputationError> {
        Ok(())
    }
}

impl Sink for Nothing {
    fn open(&mut self, _: Option<&[u8]>) -> Result<(), SinkError> {
        Ok(())
    }
    fn write(&mut self, _: &Record) -> Result<(), SinkError> {
        Ok(())
    }
    fn flush(&mut self, _: bool) -> Result<Vec<u8>, SinkError> {
        Ok(Vec::new())
    }
}

/// The plan of the topology `text`, whose kinds are all `nothing`.
pub(crate) fn plan(text: &str) -> Plan {
    let mut r = Registry::new();
    r.source("nothing", |_| Ok(Box::new(Nothing) as Box<dyn Source>));
    r.computation("nothing", |_| Ok(crate::registry::per_shard(Nothing)));
    r.sink("nothing", |_| Ok(Box::new(Nothing) as Box<dyn Sink>));
    let topology = Topology::parse_str("t.toml", text).expect("topology");
    Plan::build(topology, &r).expect("plan")
}

/// `n` records over 7 keys, replayable from its position or not. Counts
/// what it reads in `read`.
pub(crate) struct Numbers {
    pub n: u64,
    pub next: u64,
    pub read: Arc<Mutex<u64>>,
    pub replayable: bool,
}

impl Source for Numbers {
    fn open(&mut self, position: Option<&[u8]>) -> Result<(), SourceError> {
        self.next = position
            .and_then(|p| p.try_into().ok())
            .map_or(0, u64::from_be_bytes);
        Ok(())
    }
    fn poll(&mut self, out: &mut Emitter<'_>, max: usize) -> Result<SourcePoll, SourceError> {
        for _ in 0..max.min(50) {
            if self.next == self.n {
                return Ok(SourcePoll::Exhausted);
            }
            out.emit(
                format!("k{}", self.next % 7),
                self.next.to_string(),
                self.next as i64,
            );
            self.next += 1;
            *self.read.lock() += 1;
        }
        Ok(SourcePoll::Ready)
    }
    fn position(&self) -> Vec<u8> {
        self.next.to_be_bytes().to_vec()
    }
    fn replayable(&self) -> bool {
        self.replayable
    }
}
