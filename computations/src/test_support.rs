//! Building one computation from a topology snippet, for unit tests run
//! with [`millrace_engine::testing::Harness`].

use millrace_config::{Component, ConfigError, Topology};
use millrace_engine::Computation;

/// The computation `c` declared by `options` (the lines of its table after
/// `type` and `inputs`), as a topology builds it for one shard.
pub(crate) fn computation(kind: &str, options: &str) -> Result<Box<dyn Computation>, ConfigError> {
    let text = format!(
        "[sources.s]\ntype = \"generator\"\ncount = 1\n\
         [computations.c]\ntype = \"{kind}\"\ninputs = [\"s\"]\n{options}\n\
         [sinks.o]\ntype = \"stdout\"\ninputs = [\"c\"]\n"
    );
    let c = component_of(&Topology::parse_str("t.toml", &text)?, "c");
    let make = crate::builtins()
        .computation_factory(kind)
        .expect("a built-in kind")(&c)?;
    Ok(make())
}

/// The values of what a harness call emitted, as text.
pub(crate) fn values(outs: Vec<millrace_engine::testing::Output>) -> Vec<String> {
    outs.iter()
        .map(|o| String::from_utf8_lossy(&o.value).into_owned())
        .collect()
}

/// Validates the topology `text` with the built-in kinds, as `millrace
/// validate` does; the error as text.
pub(crate) fn validate(text: &str) -> Result<(), String> {
    let t = Topology::parse_str("t.toml", text).map_err(|e| e.to_string())?;
    millrace_engine::Plan::build(t, &crate::builtins())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The component `name` of the topology `t`.
pub(crate) fn component_of(t: &Topology, name: &str) -> Component {
    t.components()
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("the topology declares {name}"))
        .clone()
}

/// The component `name` of the topology `text` (which must parse).
pub(crate) fn component_in(text: &str, name: &str) -> Component {
    component_of(
        &Topology::parse_str("t.toml", text).expect("topology"),
        name,
    )
}
