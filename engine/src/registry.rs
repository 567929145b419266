//! Kinds of components by name: the built-ins and a user's own.
//!
//! A factory parses a component's options (strictly, so typos are errors) and
//! returns what the engine instantiates. Factories do no I/O: `millrace
//! validate` calls them to check a file without touching inputs or outputs.

use crate::api::{Computation, Sink, Source};
use millrace_config::{Component, ConfigError};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Makes one computation instance per shard.
pub type MakeComputation = Arc<dyn Fn() -> Box<dyn Computation> + Send + Sync>;

/// The usual [`MakeComputation`]: every shard gets its own clone of
/// `prototype` (a computation built from its component's options).
pub fn per_shard<C: Computation + Clone + Sync>(prototype: C) -> MakeComputation {
    Arc::new(move || Box::new(prototype.clone()))
}
/// Builds a source from its component table.
pub type SourceFactory =
    Arc<dyn Fn(&Component) -> Result<Box<dyn Source>, ConfigError> + Send + Sync>;
/// Builds a computation maker from its component table.
pub type ComputationFactory =
    Arc<dyn Fn(&Component) -> Result<MakeComputation, ConfigError> + Send + Sync>;
/// Builds a sink from its component table.
pub type SinkFactory = Arc<dyn Fn(&Component) -> Result<Box<dyn Sink>, ConfigError> + Send + Sync>;

/// The kinds a topology may use, by `type` name.
///
/// ```
/// use millrace_engine::{per_shard, Computation, ComputationError, Context, Record, Registry};
///
/// #[derive(Clone)]
/// struct Upper;
/// impl Computation for Upper {
///     fn process_record(&mut self, ctx: &mut Context<'_>, r: Record) -> Result<(), ComputationError> {
///         ctx.produce(r.key, r.value.to_ascii_uppercase(), r.timestamp);
///         Ok(())
///     }
/// }
///
/// let mut registry = Registry::new();
/// registry.computation("upper", |_component| Ok(per_shard(Upper)));
/// assert!(registry.has_computation("upper"));
/// ```
#[derive(Default, Clone)]
pub struct Registry {
    sources: BTreeMap<String, SourceFactory>,
    computations: BTreeMap<String, ComputationFactory>,
    sinks: BTreeMap<String, SinkFactory>,
    /// Named outputs a computation kind produces to, besides its default
    /// output and `errors`.
    outputs: BTreeMap<String, OutputsOf>,
}

/// The named outputs of a component of some kind, from its options.
type OutputsOf = Arc<dyn Fn(&Component) -> Vec<String> + Send + Sync>;

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers (or replaces) a source kind.
    pub fn source(
        &mut self,
        kind: &str,
        f: impl Fn(&Component) -> Result<Box<dyn Source>, ConfigError> + Send + Sync + 'static,
    ) -> &mut Self {
        self.sources.insert(kind.to_owned(), Arc::new(f));
        self
    }

    /// Registers (or replaces) a computation kind.
    pub fn computation(
        &mut self,
        kind: &str,
        f: impl Fn(&Component) -> Result<MakeComputation, ConfigError> + Send + Sync + 'static,
    ) -> &mut Self {
        self.computations.insert(kind.to_owned(), Arc::new(f));
        self
    }

    /// Registers (or replaces) a sink kind.
    pub fn sink(
        &mut self,
        kind: &str,
        f: impl Fn(&Component) -> Result<Box<dyn Sink>, ConfigError> + Send + Sync + 'static,
    ) -> &mut Self {
        self.sinks.insert(kind.to_owned(), Arc::new(f));
        self
    }

    /// Declares the named outputs a computation kind produces to with
    /// `Context::produce_to` (besides its default output and `errors`,
    /// which every component has). Only declared outputs may be read as
    /// `NAME.output`; producing to an undeclared one is a bad record.
    pub fn outputs(&mut self, kind: &str, names: &[&str]) -> &mut Self {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        self.outputs
            .insert(kind.to_owned(), Arc::new(move |_| names.clone()));
        self
    }

    /// Declares that a kind's named outputs depend on each component's
    /// options (a script's `outputs = [...]`).
    pub fn outputs_from(
        &mut self,
        kind: &str,
        f: impl Fn(&Component) -> Vec<String> + Send + Sync + 'static,
    ) -> &mut Self {
        self.outputs.insert(kind.to_owned(), Arc::new(f));
        self
    }

    /// The named outputs a component declares through its kind.
    pub(crate) fn declared_outputs(&self, c: &Component) -> Vec<String> {
        self.outputs.get(&c.kind).map_or_else(Vec::new, |f| f(c))
    }

    /// Whether a computation kind is registered.
    pub fn has_computation(&self, kind: &str) -> bool {
        self.computations.contains_key(kind)
    }

    pub(crate) fn source_factory(&self, kind: &str) -> Option<&SourceFactory> {
        self.sources.get(kind)
    }

    /// The factory of the computation kind `kind`, if registered.
    pub fn computation_factory(&self, kind: &str) -> Option<&ComputationFactory> {
        self.computations.get(kind)
    }

    pub(crate) fn sink_factory(&self, kind: &str) -> Option<&SinkFactory> {
        self.sinks.get(kind)
    }

    /// Names of the registered kinds of a role's section, for error messages.
    pub(crate) fn kinds(&self, section: &str) -> Vec<&str> {
        let keys: Vec<&String> = match section {
            "sources" => self.sources.keys().collect(),
            "computations" => self.computations.keys().collect(),
            _ => self.sinks.keys().collect(),
        };
        keys.into_iter().map(String::as_str).collect()
    }
}
