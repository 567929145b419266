//! The physical plan: components become nodes with shards, inputs become
//! edges, and every (producer shard, consumer shard) pair of an edge is a
//! channel with its own sequence numbers.
//!
//! Storage keys are named by component and edge names, never by plan indices,
//! so a restart with the same topology finds its data whatever the order of
//! the file.

use crate::api::{DeliveryId, SourceShard};
use crate::layout::{self, shard_prefix};
use crate::registry::{MakeComputation, Registry, SinkFactory, SourceFactory};
use millrace_config::{Component, ConfigError, KeyExtractor, Role, Topology, MAX_SHARDS};
use std::collections::HashMap;
use std::time::Duration;

/// Index of a node in [`Plan::nodes`].
pub type NodeIdx = usize;
/// Global index of a shard in [`Plan::shards`].
pub type Sid = u32;
/// Global number of a channel (see [`Plan::channel_spec`]).
pub type ChannelIdx = u32;

/// The name of the output that carries records a component could not handle.
pub const ERRORS_PORT: &str = "errors";
/// Its index among a node's ports (0 is the default output).
pub(crate) const ERRORS_PORT_INDEX: usize = 1;

/// How a source's low watermark follows the event times it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceWatermark {
    /// How far behind the newest event time the watermark stays, in microseconds.
    pub out_of_order: i64,
    /// After this long without data the source stops holding the graph back.
    pub idle_after: Option<Duration>,
}

/// What instantiates a node's shards.
#[derive(Clone)]
pub enum Maker {
    /// A source (one shard, or `shards` of them).
    Source(SourceFactory, Box<Component>),
    /// A computation (one instance per shard).
    Computation(MakeComputation),
    /// A sink (one shard).
    Sink(SinkFactory, Box<Component>),
}

/// A component with its shards and wiring.
pub struct Node {
    /// The component's name.
    pub name: String,
    /// Its section.
    pub role: Role,
    /// Its `type`.
    pub kind: String,
    /// Number of shards.
    pub shards: u32,
    /// Sid of its shard 0; its shards are consecutive.
    pub first_sid: Sid,
    /// Output names; index 0 is the default output, 1 is `errors`.
    pub ports: Vec<String>,
    /// Edges leaving each port.
    pub out_edges: Vec<Vec<usize>>,
    /// Edges arriving.
    pub in_edges: Vec<usize>,
    /// Makes its shards' code.
    pub maker: Maker,
    /// Shards whose watermarks bound its shards' input watermark.
    pub upstream: Vec<Sid>,
    /// The shards that consume its outputs.
    pub downstream: Vec<Sid>,
    /// For sources.
    pub watermark: SourceWatermark,
}

/// One input of one consumer.
pub struct Edge {
    /// Producer.
    pub from: NodeIdx,
    /// Producer's output port.
    pub port: usize,
    /// Consumer.
    pub to: NodeIdx,
    /// The consumer's key extractor.
    pub key: KeyExtractor,
    /// Stable name used in storage keys: `producer[.port]->consumer`.
    pub name: String,
    /// The stream read, as the consumer's `inputs` names it (`producer[.port]`).
    pub stream: String,
    /// Channel index of (producer shard 0, consumer shard 0).
    pub channel_base: ChannelIdx,
}

/// One shard of one node.
pub struct ShardSpec {
    /// Its node.
    pub node: NodeIdx,
    /// Its number within the node.
    pub shard: u32,
    /// The worker (index in `[cluster] workers`; 0 without a cluster) the
    /// fixed deal gives it. Where shards move between live workers, the
    /// worker's routing table (`routes.rs`) says who runs it now.
    pub worker: usize,
    /// The executor thread of its worker that runs it.
    pub executor: usize,
    /// Storage key prefix `(component, shard)`.
    pub prefix: Vec<u8>,
}

/// One producer shard -> consumer shard pair of an edge. Every producer
/// shard of an edge may send to every consumer shard, so there are
/// `producers x consumers` of them: each is kept to three numbers, and its
/// storage keys are built when asked for ([`Plan::outbox_prefix`] and the
/// like), so that a plan's memory stays small at the largest shard counts.
#[derive(Debug, Clone, Copy)]
pub struct ChannelSpec {
    /// Its edge.
    pub edge: usize,
    /// Producer shard.
    pub src: Sid,
    /// Consumer shard.
    pub dst: Sid,
}

/// The whole physical plan of one worker.
pub struct Plan {
    /// The topology it was built from.
    pub topology: Topology,
    /// Components.
    pub nodes: Vec<Node>,
    /// Inputs.
    pub edges: Vec<Edge>,
    /// Shards, by sid.
    pub shards: Vec<ShardSpec>,
    /// How many channels there are (numbered `0..channel_count`; see [`Plan::channel_spec`]).
    pub channel_count: ChannelIdx,
    /// Executor threads.
    pub threads: usize,
    /// Workers sharing the shards (1 without a cluster).
    pub workers: usize,
}

/// How much of an executor's time a shard of `node` is taken to need, in
/// units of one computation shard. A source or a sink has one shard that
/// handles every record of its stream, where a computation's records are
/// spread over its shards: on P2's shape (a generator feeding 16 window
/// shards) the source took as much CPU as about two window shards.
fn shard_weight(node: &Node) -> u32 {
    match node.role {
        Role::Source | Role::Sink => 2,
        Role::Computation => 1,
    }
}

/// Spreads each worker's shards over its `threads` executors so that their
/// summed [`shard_weight`]s are even: the heaviest shards first, each to the
/// least loaded executor (the lowest index on a tie), then the rest in sid
/// order. Every worker computes the same plan, so all agree on it.
fn assign_executors(shards: &mut [ShardSpec], nodes: &[Node], workers: usize, threads: usize) {
    let mut load = vec![vec![0u32; threads]; workers];
    let mut order: Vec<usize> = (0..shards.len()).collect();
    // Stable: equal weights keep sid order.
    order.sort_by_key(|&i| std::cmp::Reverse(shard_weight(&nodes[shards[i].node])));
    for i in order {
        let s = &mut shards[i];
        let loads = &mut load[s.worker];
        // `threads` is at least 1 (the topology checks it).
        let executor = (0..loads.len()).min_by_key(|&e| (loads[e], e)).unwrap_or(0);
        loads[executor] += shard_weight(&nodes[s.node]);
        s.executor = executor;
    }
}

impl Plan {
    /// Builds the plan, calling each kind's factory to check its options.
    pub fn build(topology: Topology, registry: &Registry) -> Result<Plan, ConfigError> {
        let threads = topology.engine.threads;
        let workers = topology.cluster.as_ref().map_or(1, |c| c.workers.len());
        let mut nodes: Vec<Node> = Vec::new();
        let mut index: HashMap<String, NodeIdx> = HashMap::new();
        let mut next_sid: Sid = 0;
        for c in topology.components() {
            let mut c = c.clone();
            let mut watermark = SourceWatermark {
                out_of_order: 0,
                idle_after: None,
            };
            let (maker, shards) = match c.role {
                Role::Source => {
                    if let Some(v) = c.options.take("watermark") {
                        watermark = source_watermark(&c, v)?;
                    }
                    let shards = match c.options.take("shards") {
                        None => 1,
                        Some(v) => source_shards(&c, v)?,
                    };
                    let f = registry
                        .source_factory(&c.kind)
                        .ok_or_else(|| kind_error(&topology, &c, registry))?;
                    f(&c)?
                        .assign(&SourceShard {
                            index: 0,
                            count: shards,
                            idle_after: watermark.idle_after,
                        })
                        .map_err(|why| c.options.error(Some("shards"), why))?;
                    (Maker::Source(f.clone(), Box::new(c.clone())), shards)
                }
                Role::Computation => {
                    let f = registry
                        .computation_factory(&c.kind)
                        .ok_or_else(|| kind_error(&topology, &c, registry))?;
                    (Maker::Computation(f(&c)?), topology.engine.shards)
                }
                Role::Sink => {
                    let f = registry
                        .sink_factory(&c.kind)
                        .ok_or_else(|| kind_error(&topology, &c, registry))?;
                    f(&c)?;
                    (Maker::Sink(f.clone(), Box::new(c.clone())), 1)
                }
            };
            index.insert(c.name.clone(), nodes.len());
            let mut ports = vec![String::new(), ERRORS_PORT.to_owned()];
            if c.role == Role::Computation {
                ports.extend(registry.declared_outputs(&c));
            }
            nodes.push(Node {
                name: c.name.clone(),
                role: c.role,
                kind: c.kind.clone(),
                shards,
                first_sid: next_sid,
                out_edges: vec![Vec::new(); ports.len()],
                ports,
                in_edges: Vec::new(),
                maker,
                watermark,
                upstream: Vec::new(),
                downstream: Vec::new(),
            });
            next_sid += shards;
        }

        let mut edges = Vec::new();
        let mut next_channel: ChannelIdx = 0;
        for c in topology.components() {
            let to = index[&c.name];
            for input in &c.inputs {
                let from = index[&input.stream.component];
                let port_name = input.stream.output.clone().unwrap_or_default();
                let Some(port) = nodes[from].ports.iter().position(|p| *p == port_name) else {
                    let producer = &nodes[from];
                    let named: Vec<String> = producer.ports[1..]
                        .iter()
                        .map(|p| format!("`{}.{p}`", producer.name))
                        .collect();
                    return Err(topology.error(
                        c,
                        Some("inputs"),
                        format!(
                            "`{}` has no output `{port_name}`: a `{}` has `{}` and {}",
                            producer.name,
                            producer.kind,
                            producer.name,
                            named.join(", ")
                        ),
                    ));
                };
                let e = edges.len();
                nodes[from].out_edges[port].push(e);
                nodes[to].in_edges.push(e);
                edges.push(Edge {
                    from,
                    port,
                    to,
                    key: input.key.clone(),
                    name: format!("{}->{}", input.stream, c.name),
                    stream: input.stream.to_string(),
                    channel_base: next_channel,
                });
                next_channel += nodes[from].shards * nodes[to].shards;
            }
        }

        let mut shards = Vec::new();
        for (n, node) in nodes.iter().enumerate() {
            for s in 0..node.shards {
                let sid = node.first_sid + s;
                shards.push(ShardSpec {
                    node: n,
                    shard: s,
                    // Shards are dealt round-robin to workers; each
                    // worker's are then spread over its executors below.
                    worker: sid as usize % workers,
                    executor: 0,
                    prefix: shard_prefix(&node.name, s),
                });
            }
        }
        assign_executors(&mut shards, &nodes, workers, threads);
        // What feeds each node and where its consumers run: the same for
        // every shard of a node, so kept once per node (the plan's size is
        // linear in components and shards; channels are numbered, not stored).
        for edge in &edges {
            let (src, dst) = (&nodes[edge.from], &nodes[edge.to]);
            let producers: Vec<Sid> = (src.first_sid..src.first_sid + src.shards).collect();
            let consumers: Vec<Sid> = (dst.first_sid..dst.first_sid + dst.shards).collect();
            nodes[edge.to].upstream.extend(producers);
            nodes[edge.from].downstream.extend(consumers);
        }
        for node in &mut nodes {
            node.upstream.sort_unstable();
            node.upstream.dedup();
            node.downstream.sort_unstable();
            node.downstream.dedup();
        }
        Ok(Plan {
            topology,
            nodes,
            edges,
            shards,
            channel_count: next_channel,
            threads,
            workers,
        })
    }

    /// The shard counts keys are laid out by, as a record to keep beside
    /// the data (a data directory, a commit log): `engine.shards N`, then
    /// a line `COMPONENT SHARDS` per component. A key belongs to the shard
    /// its hash gives under these counts: read into other counts, a shard
    /// would hold a part of another's keys (or none of its own).
    pub fn shard_layout(&self) -> String {
        let mut record = format!("engine.shards {}\n", self.topology.engine.shards);
        for node in &self.nodes {
            record.push_str(&format!("{} {}\n", node.name, node.shards));
        }
        record
    }

    /// Compares this plan's [`Plan::shard_layout`] with the records `had`
    /// kept so far: the counts that differ, as `NAME: N there, M here`
    /// (components may come and go; a count may not change), and, when
    /// there are none, the record to keep from now on (`had`'s names and
    /// this plan's, `None` when that is what `had` says already).
    pub fn shard_layout_against(&self, had: &[&str]) -> Result<Option<String>, Vec<String>> {
        let read = |record: &str| -> Vec<(String, String)> {
            record
                .lines()
                .filter_map(|l| l.rsplit_once(' '))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        };
        let mut kept: std::collections::BTreeMap<String, String> =
            had.iter().flat_map(|r| read(r)).collect();
        let mut differs = Vec::new();
        let mut new = false;
        for (name, count) in read(&self.shard_layout()) {
            match kept.get(&name) {
                Some(was) if *was != count => {
                    differs.push(format!("{name}: {was} there, {count} here"))
                }
                Some(_) => {}
                None => {
                    new = true;
                    kept.insert(name, count);
                }
            }
        }
        if !differs.is_empty() {
            return Err(differs);
        }
        Ok(new.then(|| kept.iter().map(|(k, v)| format!("{k} {v}\n")).collect()))
    }

    /// A fingerprint of what workers must agree on: components, shards,
    /// edges and the worker list. Two workers with different fingerprints
    /// refuse each other.
    pub fn fingerprint(&self) -> u64 {
        let mut text = String::new();
        for n in &self.nodes {
            text.push_str(&format!(
                "{}:{}:{}:{};",
                n.name, n.kind, n.shards, n.first_sid
            ));
        }
        for e in &self.edges {
            text.push_str(&format!("{}@{};", e.name, e.channel_base));
        }
        if let Some(c) = &self.topology.cluster {
            for w in &c.workers {
                text.push_str(&format!("{}={};", w.id, w.address));
            }
        }
        crate::keying::fnv1a(text.as_bytes())
    }

    /// The channel from producer shard `src_shard` to consumer shard `dst_shard` of `edge`.
    pub fn channel(&self, edge: usize, src_shard: u32, dst_shard: u32) -> ChannelIdx {
        let e = &self.edges[edge];
        e.channel_base + src_shard * self.nodes[e.to].shards + dst_shard
    }

    /// Channel `ch`: its edge, producer and consumer shard, worked out from
    /// its number (channels of an edge are numbered producer-major from the
    /// edge's `channel_base`); `None` past the last channel.
    pub fn channel_spec(&self, ch: ChannelIdx) -> Option<ChannelSpec> {
        if ch >= self.channel_count {
            return None;
        }
        let e = self
            .edges
            .partition_point(|e| e.channel_base <= ch)
            .checked_sub(1)?;
        let edge = &self.edges[e];
        let (src, dst) = (&self.nodes[edge.from], &self.nodes[edge.to]);
        let at = ch - edge.channel_base;
        if at >= src.shards * dst.shards {
            return None;
        }
        Some(ChannelSpec {
            edge: e,
            src: src.first_sid + at / dst.shards,
            dst: dst.first_sid + at % dst.shards,
        })
    }

    /// The id of delivery `seq` on channel `ch` (which the plan made): its
    /// edge's name and its producer's shard number within its component.
    pub fn delivery_id(&self, ch: ChannelIdx, seq: u64) -> DeliveryId<'_> {
        let c = self.chan(ch);
        DeliveryId {
            edge: &self.edges[c.edge].name,
            producer_shard: self.shards[c.src as usize].shard,
            seq,
        }
    }

    /// Channel `ch`, which the caller knows exists (an index the plan made).
    pub fn chan(&self, ch: ChannelIdx) -> ChannelSpec {
        self.channel_spec(ch).unwrap_or_else(|| {
            panic!(
                "channel {ch} is past the plan's {} channels",
                self.channel_count
            )
        })
    }

    /// The channels arriving at shard `sid`, in edge and producer order.
    pub fn in_channels(&self, sid: Sid) -> Vec<ChannelIdx> {
        let spec = &self.shards[sid as usize];
        let node = &self.nodes[spec.node];
        node.in_edges
            .iter()
            .flat_map(|&e| {
                let producers = self.nodes[self.edges[e].from].shards;
                (0..producers).map(move |s| self.channel(e, s, spec.shard))
            })
            .collect()
    }

    /// Shards whose watermarks bound shard `sid`'s input watermark.
    pub fn upstream(&self, sid: Sid) -> &[Sid] {
        &self.nodes[self.shards[sid as usize].node].upstream
    }

    /// The shards that consume shard `sid`'s outputs.
    pub fn downstream(&self, sid: Sid) -> &[Sid] {
        &self.nodes[self.shards[sid as usize].node].downstream
    }

    /// The outbox key prefix of channel `ch`'s productions.
    pub fn outbox_prefix(&self, ch: ChannelIdx) -> Vec<u8> {
        let c = self.chan(ch);
        layout::outbox_prefix(
            &self.shards[c.src as usize].prefix,
            &self.edges[c.edge].name,
            self.shards[c.dst as usize].shard,
        )
    }

    /// The channels-CF key of channel `ch`'s producer's next sequence number.
    pub fn next_seq_key(&self, ch: ChannelIdx) -> Vec<u8> {
        let c = self.chan(ch);
        layout::next_seq_key(
            &self.shards[c.src as usize].prefix,
            &self.edges[c.edge].name,
            self.shards[c.dst as usize].shard,
        )
    }

    /// The channels-CF key of channel `ch`'s consumer's applied sequence number.
    pub fn applied_seq_key(&self, ch: ChannelIdx) -> Vec<u8> {
        let c = self.chan(ch);
        layout::applied_seq_key(
            &self.shards[c.dst as usize].prefix,
            &self.edges[c.edge].name,
            self.shards[c.src as usize].shard,
        )
    }

    /// A one-line summary, as `millrace validate` prints it.
    pub fn summary(&self) -> String {
        let count = |r: Role| self.nodes.iter().filter(|n| n.role == r).count();
        format!(
            "{}: ok: {} sources, {} computations, {} sinks, {} edges, {} shards per computation",
            self.topology.file().display(),
            count(Role::Source),
            count(Role::Computation),
            count(Role::Sink),
            self.edges.len(),
            self.topology.engine.shards
        )
    }
}

fn kind_error(topology: &Topology, c: &Component, registry: &Registry) -> ConfigError {
    let section = c.role.section();
    topology.error(
        c,
        Some("type"),
        format!(
            "unknown {} type `{}` (known: {})",
            &section[..section.len() - 1],
            c.kind,
            registry.kinds(section).join(", ")
        ),
    )
}

/// A source's `shards`: how many shards read its input, 1 to [`MAX_SHARDS`].
fn source_shards(c: &Component, v: toml::Value) -> Result<u32, ConfigError> {
    match v.as_integer() {
        Some(n) if (1..=i64::from(MAX_SHARDS)).contains(&n) => Ok(n as u32),
        _ => Err(c.options.error(
            Some("shards"),
            format!("`shards` must be a whole number from 1 to {MAX_SHARDS}"),
        )),
    }
}

fn source_watermark(c: &Component, v: toml::Value) -> Result<SourceWatermark, ConfigError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Raw {
        out_of_order: Option<millrace_config::HumanDuration>,
        idle_after: Option<millrace_config::HumanDuration>,
    }
    let raw: Raw = serde::Deserialize::deserialize(v)
        .map_err(|e: toml::de::Error| c.options.error(Some("watermark"), e.message().to_owned()))?;
    Ok(SourceWatermark {
        out_of_order: raw.out_of_order.map_or(0, |d| d.0.as_micros() as i64),
        idle_after: raw.idle_after.map(|d| d.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_kinds::plan;

    /// Per worker and executor, the components of its shards.
    fn layout(p: &Plan) -> Vec<Vec<Vec<&str>>> {
        let mut out = vec![vec![Vec::new(); p.threads]; p.workers];
        for s in &p.shards {
            out[s.worker][s.executor].push(p.nodes[s.node].name.as_str());
        }
        out
    }

    /// A source `gen` feeding a computation `count` of `shards` shards on 2
    /// executors, after `cluster` (TOML, may be empty).
    fn gen_to_count(cluster: &str, shards: u32) -> Plan {
        plan(&format!(
            r#"{cluster}
[engine]
shards = {shards}
threads = 2
[sources.gen]
type = "nothing"
[computations.count]
type = "nothing"
inputs = ["gen"]
"#
        ))
    }

    /// The shard counts a directory or a log keeps: the same plan agrees,
    /// a component may come (and is then kept) or go, and no count may
    /// change, be it `engine.shards` or a source's own.
    #[test]
    fn shard_layouts_take_new_components_and_refuse_other_counts() {
        let with = |engine: u32, gen: u32, more: bool| {
            plan(&format!(
                "[engine]\nshards = {engine}\n[sources.gen]\ntype = \"nothing\"\nshards = {gen}\n{}\
                 [computations.count]\ntype = \"nothing\"\ninputs = [\"gen\"]\n",
                if more { "[sources.more]\ntype = \"nothing\"\nshards = 3\n" } else { "" }
            ))
        };
        let first = with(4, 2, false).shard_layout();
        assert_eq!(first, "engine.shards 4\ngen 2\ncount 4\n");
        assert_eq!(with(4, 2, false).shard_layout_against(&[&first]), Ok(None));
        assert_eq!(
            with(4, 4, false).shard_layout_against(&[&first]),
            Err(vec!["gen: 2 there, 4 here".to_owned()])
        );
        assert_eq!(
            with(8, 2, false).shard_layout_against(&[&first]),
            Err(vec![
                "engine.shards: 4 there, 8 here".to_owned(),
                "count: 4 there, 8 here".to_owned()
            ])
        );
        let grown = with(4, 2, true)
            .shard_layout_against(&[&first])
            .expect("a new component")
            .expect("a record with it");
        assert!(
            grown.contains("more 3\n") && grown.contains("gen 2\n"),
            "{grown}"
        );
        // Gone, and back with another count: refused all the same.
        assert_eq!(
            with(4, 2, false).shard_layout_against(&[&first, &grown]),
            Ok(None)
        );
        let other = plan(
            "[engine]\nshards = 4\n[sources.more]\ntype = \"nothing\"\nshards = 5\n\
             [computations.count]\ntype = \"nothing\"\ninputs = [\"more\"]\n",
        );
        assert_eq!(
            other.shard_layout_against(&[&first, &grown]),
            Err(vec!["more: 3 there, 5 here".to_owned()])
        );
    }

    #[test]
    fn a_source_weighs_two_computation_shards() {
        let p = gen_to_count("", 16);
        let l = layout(&p);
        let count = |e: usize| l[0][e].iter().filter(|n| **n == "count").count();
        assert_eq!(l[0][0][0], "gen");
        assert_eq!((count(0), count(1)), (7, 9));
    }

    #[test]
    fn sources_and_sinks_go_to_different_executors_first() {
        let p = plan(
            r#"
[engine]
shards = 2
threads = 2
[sources.gen]
type = "nothing"
[computations.split]
type = "nothing"
inputs = ["gen"]
[computations.count]
type = "nothing"
inputs = ["split"]
[sinks.out]
type = "nothing"
inputs = ["count"]
"#,
        );
        assert_eq!(
            layout(&p)[0],
            vec![vec!["gen", "count", "split"], vec!["count", "split", "out"]]
        );
    }

    #[test]
    fn each_worker_spreads_its_own_shards() {
        let p = gen_to_count(
            r#"
[cluster]
secret = "a-secret-of-16-bytes"
[[cluster.workers]]
id = "a"
address = "127.0.0.1:1"
[[cluster.workers]]
id = "b"
address = "127.0.0.1:2"
"#,
            8,
        );
        // Worker a: the source and 4 count shards; worker b: 4 count shards.
        assert_eq!(
            layout(&p),
            vec![
                vec![vec!["gen", "count"], vec!["count", "count", "count"]],
                vec![vec!["count", "count"], vec!["count", "count"]],
            ]
        );
    }

    #[test]
    fn channels_are_numbered_not_stored_and_their_keys_are_built_on_demand() {
        // A plan has producers x consumers channels per edge (a million at
        // 1,024 shards): none is stored, each is worked out from its number.
        let p = plan(
            r#"
[engine]
shards = 3
[sources.gen]
type = "nothing"
[computations.a]
type = "nothing"
inputs = ["gen"]
[computations.b]
type = "nothing"
inputs = ["a", "gen"]
"#,
        );
        assert_eq!(p.channel_count, 3 + 9 + 3);
        let mut seen = std::collections::BTreeSet::new();
        for (e, edge) in p.edges.iter().enumerate() {
            let (from, to) = (&p.nodes[edge.from], &p.nodes[edge.to]);
            for s in 0..from.shards {
                for d in 0..to.shards {
                    let ch = p.channel(e, s, d);
                    let c = p.channel_spec(ch).expect("a channel");
                    assert_eq!(
                        (c.edge, c.src, c.dst),
                        (e, from.first_sid + s, to.first_sid + d)
                    );
                    assert!(p.in_channels(c.dst).contains(&ch));
                    seen.insert(ch);
                }
            }
        }
        assert_eq!(
            seen.len(),
            p.channel_count as usize,
            "every number is one channel"
        );
        assert!(p.channel_spec(p.channel_count).is_none());
        // b's shards hear from a's 3 shards and gen's 1.
        let b0 = p.nodes[2].first_sid;
        assert_eq!(p.in_channels(b0).len(), 4);
        assert_eq!(p.upstream(b0), &[0, 1, 2, 3]);
        let ch = p.channel(0, 0, 2);
        let (src, dst) = (&p.shards[0].prefix, &p.shards[3].prefix);
        assert_eq!(p.outbox_prefix(ch), layout::outbox_prefix(src, "gen->a", 2));
        assert_eq!(p.next_seq_key(ch), layout::next_seq_key(src, "gen->a", 2));
        assert_eq!(
            p.applied_seq_key(ch),
            layout::applied_seq_key(dst, "gen->a", 0)
        );
    }
}
