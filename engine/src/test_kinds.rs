//! Kinds that do nothing, for the in-crate tests that need a plan or a
//! shard: `nothing` is a source (always exhausted), a computation and a sink.

use crate::{
    Computation, ComputationError, Context, Emitter, Plan, Record, Registry, Sink, SinkError,
    Source, SourceError, SourcePoll,
};
use millrace_config::Topology;

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
