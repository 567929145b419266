//! The topology: raw TOML -> checked components and wiring.

use crate::{duration::HumanDuration, ConfigError, Locator, SavepointTarget};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// `[service]`: where the worker keeps its data and serves HTTP.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    /// RocksDB and sink bookkeeping live here. Default `./data`.
    pub data_dir: PathBuf,
    /// Address of `/metrics`, `/healthz`, `/status`. Default `127.0.0.1:9464`;
    /// `"off"` disables the server.
    pub http: Option<String>,
    /// Bearer token that `/status`, `/tap` and `POST /stop` require
    /// (`Authorization: Bearer TOKEN`); the environment variable
    /// `MILLRACE_HTTP_TOKEN` overrides it. None: open to whoever reaches the
    /// address under one of this machine's own names.
    pub http_token: Option<String>,
    /// Whether `/metrics` needs the token too. Default false, so that
    /// Prometheus scrapes without credentials.
    pub http_token_for_metrics: bool,
    /// Where `POST /stop?savepoint=URL` may put a savepoint: `URL` must lie
    /// under one of these. Empty (the default): a stop over HTTP cannot
    /// take a savepoint.
    pub savepoint_targets: Vec<SavepointTarget>,
}

/// How hard a commit tries to survive failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// The WAL is written before a commit returns: survives `kill -9`.
    Process,
    /// The WAL is fsynced (commits grouped): survives a power loss too.
    Machine,
}

/// `[engine]`: shards, batching and durability.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Shards per computation (`hash(key) % shards`). Default 16.
    pub shards: u32,
    /// Longest a processed record waits for its checkpoint. Default `2ms`,
    /// `8ms` with `durability = "machine"`.
    pub commit_interval: Duration,
    /// Default `process`.
    pub durability: Durability,
    /// Executor threads. Default: the number of CPUs.
    pub threads: usize,
    /// Most records processed in one commit. Default 4096.
    pub batch_size: usize,
    /// Most unacknowledged records on one channel (producer shard -> consumer
    /// shard). Together with `max_backlog` this bounds memory. Default 1024.
    pub channel_window: usize,
    /// A shard whose unacknowledged productions exceed this stops taking new
    /// input until its consumers catch up (backpressure). Default 16384.
    pub max_backlog: usize,
    /// Keys whose committed state is cached in memory, per computation, in
    /// front of RocksDB; 0 disables the cache. Default 1,000,000.
    pub state_cache_keys: usize,
    /// Most bytes of unacknowledged records sent on one channel; with
    /// `channel_window` it bounds what a channel has in flight. Default 1 MiB.
    pub channel_window_bytes: usize,
    /// Largest record (key and value) a component may produce; a larger one
    /// is a bad record, refused where it is produced. The same in one worker
    /// and in a cluster, so a topology behaves the same in both. Default
    /// 8 MiB, at most [`MAX_RECORD_BYTES`].
    pub max_record_bytes: usize,
}

/// `[state]`: where state lives beyond this machine.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StateConfig {
    /// `log = "nats://HOST:PORT[,HOST:PORT...]/NAME"`: each shard's commits
    /// are appended to a replicated log (NATS JetStream, stream
    /// `millrace-NAME`) before they are released, so that a lost machine
    /// loses nothing. None (the default): state lives in the data directory only.
    pub log: Option<CommitLogConfig>,
}

/// The commit log of `[state] log`.
#[derive(Debug, Clone, PartialEq)]
pub struct CommitLogConfig {
    /// The NATS servers, `host:port` each.
    pub servers: Vec<String>,
    /// The deployment's name in the log: letters, digits, `-` and `_`.
    pub name: String,
    /// `log_replicas`: copies of each entry the log keeps (JetStream
    /// replicas, 1 to 5). Default 3: one lost log server loses nothing.
    pub replicas: usize,
    /// `log_timeout`: how long a commit waits for an unreachable log before
    /// the worker stops (it restarts from the log). Default `30s`, at most
    /// `60s` (under the log's 2-minute duplicate window).
    pub timeout: Duration,
    /// `snapshots`: where each shard's snapshots go (`file:///DIR` or
    /// `s3://BUCKET/PREFIX`, reachable by every worker), so that its log
    /// is cut below the last one. None: the log keeps everything.
    pub snapshots: Option<String>,
    /// `snapshot_log_bytes`: a shard is snapshotted once this many bytes
    /// were appended to its log since its last snapshot. Default 64 MiB.
    pub snapshot_log_bytes: u64,
}

impl CommitLogConfig {
    /// Reads `nats://HOST:PORT[,HOST:PORT...]/NAME`; the error says what is wrong.
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("nats://")
            .ok_or_else(|| format!("`{url}` is not a nats:// URL (nats://HOST:PORT/NAME)"))?;
        let (hosts, name) = rest
            .split_once('/')
            .ok_or_else(|| format!("`{url}` names no deployment (nats://HOST:PORT/NAME)"))?;
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
        {
            return Err(format!(
                "`{name}` in `{url}`: the name must be 1 to 64 letters, digits, `-` or `_`"
            ));
        }
        let servers: Vec<String> = hosts.split(',').map(str::to_owned).collect();
        for s in &servers {
            if s.contains('@') {
                return Err(format!(
                    "`{url}` carries credentials: the commit log does not authenticate (keep \
                     its servers reachable by the deployment only), and a password in the \
                     topology would be printed in every message naming the log"
                ));
            }
            check_host_port(s).map_err(|why| format!("`{s}` in `{url}` {why}"))?;
        }
        Ok(CommitLogConfig {
            servers,
            name: name.to_owned(),
            replicas: 3,
            timeout: Duration::from_secs(30),
            snapshots: None,
            snapshot_log_bytes: 64 << 20,
        })
    }
}

/// Checks `HOST:PORT`: a host name or IPv4 address (letters, digits, `-`
/// and `.`) or an IPv6 address in brackets, and a port of 1 to 65535 in
/// digits.
fn check_host_port(s: &str) -> Result<(), &'static str> {
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err("is not HOST:PORT");
    };
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => host_name_or_ipv4(host),
    };
    if !host_ok {
        return Err(
            "is not HOST:PORT (a host name or IPv4 address, or an IPv6 address in brackets)",
        );
    }
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err("is not HOST:PORT (the port is 1 to 65535)");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err("is not HOST:PORT (the port is 1 to 65535)"),
    }
}

/// A host name (labels of 1 to 63 letters, digits and `-`, neither first
/// nor last, at most 253 bytes in all) or, when every label is digits, an
/// IPv4 address: `-h` or `10.0.0.999` is neither.
fn host_name_or_ipv4(host: &str) -> bool {
    let labels: Vec<&str> = host.split('.').collect();
    if labels
        .iter()
        .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
    {
        return host.parse::<std::net::Ipv4Addr>().is_ok();
    }
    host.len() <= 253
        && labels.iter().all(|l| {
            (1..=63).contains(&l.len())
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// `[cluster]`: the workers that share the shards, each a `millrace` process.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// The workers, in file order; shard `g` (numbered across components in
    /// file order) runs on worker `g % workers.len()`.
    pub workers: Vec<WorkerConfig>,
    /// Shared secret every worker proves in the handshake; the environment
    /// variable `MILLRACE_CLUSTER_SECRET` overrides it.
    pub secret: Option<String>,
    /// Where a shard moving between live workers waits for its new owner
    /// (`file:///DIR` or `s3://BUCKET/PREFIX`, reachable by every worker);
    /// needed with `millrace run --join`.
    pub handoff: Option<String>,
}

/// One `[[cluster.workers]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerConfig {
    /// Unique id, given to `millrace run --worker ID`.
    pub id: String,
    /// `host:port` the other workers connect to.
    pub address: String,
    /// Its HTTP address (default: `[service] http`).
    pub http: Option<String>,
    /// Its data directory (default: `[service] data_dir`/`id`).
    pub data_dir: Option<PathBuf>,
}

impl ClusterConfig {
    /// Index of worker `id`.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.workers.iter().position(|w| w.id == id)
    }

    /// Worker `id`'s entry.
    pub fn worker(&self, id: &str) -> Option<&WorkerConfig> {
        self.index_of(id).map(|i| &self.workers[i])
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopology {
    #[serde(default)]
    service: RawService,
    #[serde(default)]
    engine: RawEngine,
    cluster: Option<RawCluster>,
    #[serde(default)]
    state: RawState,
    #[serde(default)]
    sources: BTreeMap<String, toml::Table>,
    #[serde(default)]
    computations: BTreeMap<String, toml::Table>,
    #[serde(default)]
    sinks: BTreeMap<String, toml::Table>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawService {
    data_dir: Option<PathBuf>,
    http: Option<String>,
    http_token: Option<String>,
    http_token_for_metrics: Option<bool>,
    savepoint_targets: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawEngine {
    shards: Option<u32>,
    commit_interval: Option<HumanDuration>,
    durability: Option<Durability>,
    threads: Option<usize>,
    batch_size: Option<usize>,
    channel_window: Option<usize>,
    max_backlog: Option<usize>,
    state_cache_keys: Option<usize>,
    channel_window_bytes: Option<usize>,
    max_record_bytes: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawState {
    log: Option<String>,
    log_replicas: Option<usize>,
    log_timeout: Option<HumanDuration>,
    snapshots: Option<String>,
    snapshot_log_bytes: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    workers: Vec<RawWorker>,
    secret: Option<String>,
    handoff: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorker {
    id: String,
    address: String,
    http: Option<String>,
    data_dir: Option<PathBuf>,
}

/// Which section a component is declared in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// `[sources.NAME]`: brings records in.
    Source,
    /// `[computations.NAME]`: keyed processing.
    Computation,
    /// `[sinks.NAME]`: takes records out.
    Sink,
}

impl Role {
    /// The TOML section name.
    pub fn section(self) -> &'static str {
        match self {
            Role::Source => "sources",
            Role::Computation => "computations",
            Role::Sink => "sinks",
        }
    }
}

/// A stream: a component's default output (`words`) or a named one (`sessions.late`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamRef {
    /// The producing component.
    pub component: String,
    /// The named output, or `None` for the default one.
    pub output: Option<String>,
}

impl fmt::Display for StreamRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.output {
            Some(o) => write!(f, "{}.{}", self.component, o),
            None => f.write_str(&self.component),
        }
    }
}

/// How a consumer keys the records of one input stream (MillWheel's key extractor).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyExtractor {
    /// The record's own key (the default).
    Key,
    /// The whole value.
    Value,
    /// A JSON pointer into the value, e.g. `json:/user/id`.
    Json(String),
    /// The N-th (0-based) field of the value split by `delimiter`.
    Field {
        /// 0-based field index.
        index: usize,
        /// Field separator; default `,`.
        delimiter: String,
    },
}

/// One input of a computation or sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    /// The stream read.
    pub stream: StreamRef,
    /// How the consumer keys it.
    pub key: KeyExtractor,
}

/// A component's kind-specific keys, parsed by its kind's factory.
#[derive(Debug, Clone)]
pub struct Options {
    table: toml::Table,
    at: String,
    locator: Arc<Locator>,
}

impl Options {
    /// Builds options from a table, for tests and programmatic topologies.
    pub fn from_table(at: &str, table: toml::Table) -> Self {
        Options {
            table,
            at: at.to_owned(),
            locator: Arc::new(Locator::new(Path::new("<inline>"), "")),
        }
    }

    /// Parses the options into the kind's own type. Use
    /// `#[serde(deny_unknown_fields)]` on it so that typos are errors.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        T::deserialize(toml::Value::Table(self.table.clone())).map_err(|e| {
            let message = e.message().to_owned();
            let key = backticked(&message)
                .filter(|k| self.table.contains_key(*k) || message.contains("unknown field"));
            self.error(key, message.clone())
        })
    }

    /// The topology file these options were read from.
    pub fn file(&self) -> &Path {
        self.locator.file()
    }

    /// 1-based line of one of these options in the topology file.
    pub fn line_of(&self, key: &str) -> usize {
        self.locator.line_of(&self.at, Some(key))
    }

    /// The dotted path of one of these options, e.g. `computations.tags.script`.
    pub fn path_of(&self, key: &str) -> String {
        format!("{}.{key}", self.at)
    }

    /// An error about one of these options (or the component, with `None`).
    pub fn error(&self, key: Option<&str>, message: impl Into<String>) -> ConfigError {
        self.locator.error(&self.at, key, message)
    }

    /// Removes and returns one key (for keys every kind of a role shares,
    /// such as a source's `watermark`), leaving the rest for the kind.
    pub fn take(&mut self, key: &str) -> Option<toml::Value> {
        self.table.remove(key)
    }

    /// The raw table.
    pub fn table(&self) -> &toml::Table {
        &self.table
    }
}

fn backticked(message: &str) -> Option<&str> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(&message[start..start + len])
}

/// One source, computation or sink.
#[derive(Debug, Clone)]
pub struct Component {
    /// Its name, unique across all sections.
    pub name: String,
    /// Its section.
    pub role: Role,
    /// Its `type`, looked up in the engine's registry.
    pub kind: String,
    /// What it reads (empty for sources).
    pub inputs: Vec<Input>,
    /// Everything else in its table.
    pub options: Options,
}

/// A checked topology.
#[derive(Debug, Clone)]
pub struct Topology {
    /// `[service]`.
    pub service: ServiceConfig,
    /// `[engine]`.
    pub engine: EngineConfig,
    /// `[cluster]`, when the topology runs on several workers.
    pub cluster: Option<ClusterConfig>,
    /// `[state]`.
    pub state: StateConfig,
    components: Vec<Component>,
    locator: Arc<Locator>,
}

impl Topology {
    /// Reads and checks a topology file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        Self::parse_str(path, &text)
    }

    /// Checks a topology given as text; `file` is used in error messages.
    pub fn parse_str(file: impl AsRef<Path>, text: &str) -> Result<Self, ConfigError> {
        let locator = Arc::new(Locator::new(file.as_ref(), text));
        let raw: RawTopology = toml::from_str(text).map_err(|e| {
            let line = e.span().map_or(1, |s| locator.line_of_offset(s.start));
            let key = e
                .span()
                .map(|s| locator.key_at(s.start))
                .unwrap_or_else(|| "<toml>".to_owned());
            ConfigError::Invalid {
                file: locator.file().to_path_buf(),
                line,
                key,
                message: e.message().to_owned(),
            }
        })?;
        let engine = engine_config(raw.engine, &locator)?;
        let cluster = raw
            .cluster
            .map(|c| cluster_config(c, &locator))
            .transpose()?;
        let state = state_config(raw.state, &locator)?;
        let service = ServiceConfig {
            data_dir: raw
                .service
                .data_dir
                .unwrap_or_else(|| PathBuf::from("./data")),
            http: match raw.service.http.as_deref() {
                None => Some("127.0.0.1:9464".to_owned()),
                Some("off") => None,
                Some(addr) => Some(addr.to_owned()),
            },
            http_token: match raw.service.http_token {
                Some(t) if t.is_empty() => {
                    return Err(locator.error("service", Some("http_token"), "is empty"))
                }
                t => t,
            },
            http_token_for_metrics: raw.service.http_token_for_metrics.unwrap_or(false),
            savepoint_targets: raw
                .service
                .savepoint_targets
                .unwrap_or_default()
                .iter()
                .map(|url| SavepointTarget::parse(url))
                .collect::<Result<_, _>>()
                .map_err(|why| locator.error("service", Some("savepoint_targets"), why))?,
        };
        let mut components = Vec::new();
        for (role, tables) in [
            (Role::Source, raw.sources),
            (Role::Computation, raw.computations),
            (Role::Sink, raw.sinks),
        ] {
            for (name, table) in tables {
                components.push(component(role, name, table, &locator)?);
            }
        }
        let topo = Topology {
            service,
            engine,
            cluster,
            state,
            components,
            locator,
        };
        topo.check_wiring()?;
        Ok(topo)
    }

    /// All components: sources, then computations, then sinks, each by name.
    pub fn components(&self) -> &[Component] {
        &self.components
    }

    /// The sources.
    pub fn sources(&self) -> Vec<&Component> {
        self.of(Role::Source)
    }

    /// The computations.
    pub fn computations(&self) -> Vec<&Component> {
        self.of(Role::Computation)
    }

    /// The sinks.
    pub fn sinks(&self) -> Vec<&Component> {
        self.of(Role::Sink)
    }

    fn of(&self, role: Role) -> Vec<&Component> {
        self.components.iter().filter(|c| c.role == role).collect()
    }

    /// The component called `name`.
    pub fn component(&self, name: &str) -> Option<&Component> {
        self.components.iter().find(|c| c.name == name)
    }

    /// An error located at `section.name.key`.
    pub fn error(
        &self,
        c: &Component,
        key: Option<&str>,
        message: impl Into<String>,
    ) -> ConfigError {
        self.locator
            .error(&format!("{}.{}", c.role.section(), c.name), key, message)
    }

    /// The file this topology was read from.
    pub fn file(&self) -> &Path {
        self.locator.file()
    }

    fn check_wiring(&self) -> Result<(), ConfigError> {
        if self.sources().is_empty() {
            return Err(self.locator.error(
                "sources",
                None,
                "the topology has no sources: add a [sources.NAME] table",
            ));
        }
        let by_name: BTreeMap<&str, &Component> = self
            .components
            .iter()
            .map(|c| (c.name.as_str(), c))
            .collect();
        for c in &self.components {
            let mut seen = BTreeSet::new();
            for input in &c.inputs {
                let Some(producer) = by_name.get(input.stream.component.as_str()) else {
                    return Err(self.error(
                        c,
                        Some("inputs"),
                        format!(
                            "unknown input `{}`: no source or computation has that name",
                            input.stream
                        ),
                    ));
                };
                if producer.role == Role::Sink {
                    return Err(self.error(
                        c,
                        Some("inputs"),
                        format!(
                            "input `{}` is a sink; sinks produce no stream",
                            input.stream
                        ),
                    ));
                }
                if !seen.insert(&input.stream) {
                    return Err(self.error(
                        c,
                        Some("inputs"),
                        format!("input `{}` is listed twice", input.stream),
                    ));
                }
            }
        }
        self.check_acyclic(&by_name)
    }

    fn check_acyclic(&self, by_name: &BTreeMap<&str, &Component>) -> Result<(), ConfigError> {
        // 0 = unvisited, 1 = on the current path, 2 = done.
        let mut mark: BTreeMap<&str, u8> = BTreeMap::new();
        fn visit<'a>(
            name: &'a str,
            by_name: &BTreeMap<&str, &'a Component>,
            mark: &mut BTreeMap<&'a str, u8>,
            path: &mut Vec<&'a str>,
        ) -> Option<Vec<&'a str>> {
            match mark.get(name) {
                Some(2) => return None,
                Some(1) => {
                    let from = path.iter().position(|n| *n == name).unwrap_or(0);
                    let mut cycle = path[from..].to_vec();
                    cycle.push(name);
                    return Some(cycle);
                }
                _ => {}
            }
            mark.insert(name, 1);
            path.push(name);
            if let Some(c) = by_name.get(name) {
                for input in &c.inputs {
                    if let Some(cycle) = visit(&input.stream.component, by_name, mark, path) {
                        return Some(cycle);
                    }
                }
            }
            path.pop();
            mark.insert(name, 2);
            None
        }
        for c in &self.components {
            let mut path = Vec::new();
            if let Some(cycle) = visit(&c.name, by_name, &mut mark, &mut path) {
                let first = by_name[cycle[0]];
                return Err(self.error(
                    first,
                    Some("inputs"),
                    format!(
                        "the graph has a cycle: {}",
                        cycle.iter().rev().cloned().collect::<Vec<_>>().join(" -> ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// How long a turn may run before it commits, unless configured. A turn ends
/// as soon as there is no more work, so this matters only while a backlog is
/// worked off: then a longer turn puts more records behind each commit. With
/// `machine` every commit waits for an fsync, and 8 ms lets a backlog drain
/// faster (P3 on 2 cores, ~10 runs each at 270k-320k records/s: p99 median
/// ~16 ms against ~20 ms with 2 ms, though the ranges overlap, 10-29 ms
/// against 10-36 ms; p50 unchanged).
fn default_commit_interval(durability: Durability) -> Duration {
    match durability {
        Durability::Process => Duration::from_millis(2),
        Durability::Machine => Duration::from_millis(8),
    }
}

/// The most shards a computation may have. The plan holds one channel per
/// pair of producer and consumer shards, so its size grows with the square
/// of the shard count: 1,024 shards is a million channels per edge.
pub const MAX_SHARDS: u32 = 1024;

/// The largest `max_record_bytes`: a record must fit in one cluster frame
/// (16 MiB) with room for its header.
pub const MAX_RECORD_BYTES: usize = 15 << 20;

/// The most executor threads a worker may run (each has its own stack and
/// queues; more than the cores only adds switching).
pub const MAX_THREADS: usize = 256;

fn engine_config(raw: RawEngine, locator: &Locator) -> Result<EngineConfig, ConfigError> {
    // At least 1 and at most `max`, or `default` when not given.
    let within = |v: Option<usize>, key: &str, default: usize, max: usize| match v {
        Some(0) => Err(locator.error("engine", Some(key), "must be at least 1")),
        Some(n) if n > max => {
            Err(locator.error("engine", Some(key), format!("must be at most {max}")))
        }
        Some(n) => Ok(n),
        None => Ok(default),
    };
    let positive =
        |v: Option<usize>, key: &str, default: usize| within(v, key, default, usize::MAX);
    let shards = within(
        raw.shards.map(|n| n as usize),
        "shards",
        16,
        MAX_SHARDS as usize,
    )? as u32;
    let threads_default = std::thread::available_parallelism().map_or(2, |n| n.get());
    let durability = raw.durability.unwrap_or(Durability::Process);
    Ok(EngineConfig {
        shards,
        commit_interval: raw
            .commit_interval
            .map_or(default_commit_interval(durability), |d| d.0),
        durability,
        threads: within(raw.threads, "threads", threads_default, MAX_THREADS)?,
        batch_size: positive(raw.batch_size, "batch_size", 4096)?,
        channel_window: positive(raw.channel_window, "channel_window", 1024)?,
        max_backlog: positive(raw.max_backlog, "max_backlog", 16_384)?,
        state_cache_keys: raw.state_cache_keys.unwrap_or(1_000_000),
        channel_window_bytes: positive(raw.channel_window_bytes, "channel_window_bytes", 1 << 20)?,
        max_record_bytes: within(
            raw.max_record_bytes,
            "max_record_bytes",
            8 << 20,
            MAX_RECORD_BYTES,
        )?,
    })
}

/// The fewest bytes a cluster secret may have.
pub const MIN_SECRET_LEN: usize = 16;

/// Checks a cluster secret (from the file or `MILLRACE_CLUSTER_SECRET`): an
/// empty or short secret is refused, never taken for a secret.
pub fn check_secret(secret: &str) -> Result<(), String> {
    if secret.len() < MIN_SECRET_LEN {
        return Err(format!(
            "the cluster secret has {} bytes; it needs at least {MIN_SECRET_LEN} \
             (e.g. `openssl rand -hex 16`)",
            secret.len()
        ));
    }
    Ok(())
}

fn cluster_config(raw: RawCluster, locator: &Locator) -> Result<ClusterConfig, ConfigError> {
    if raw.workers.is_empty() {
        return Err(locator.error("cluster", Some("workers"), "must list at least one worker"));
    }
    let mut seen = BTreeSet::new();
    let mut addresses = BTreeSet::new();
    let mut workers = Vec::new();
    for (n, w) in raw.workers.into_iter().enumerate() {
        if w.id.is_empty()
            || !w
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
        {
            return Err(locator.error_in_entry(
                "cluster.workers",
                n,
                "id",
                format!(
                    "worker id `{}` must be non-empty letters, digits, `-` or `_`",
                    w.id
                ),
            ));
        }
        if !seen.insert(w.id.clone()) {
            return Err(locator.error_in_entry(
                "cluster.workers",
                n,
                "id",
                format!("worker id `{}` is listed twice", w.id),
            ));
        }
        if w.address
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .is_none()
        {
            return Err(locator.error_in_entry(
                "cluster.workers",
                n,
                "address",
                format!("`{}` of worker `{}` is not host:port", w.address, w.id),
            ));
        }
        if !addresses.insert(w.address.clone()) {
            return Err(locator.error_in_entry(
                "cluster.workers",
                n,
                "address",
                format!("address `{}` is given to two workers", w.address),
            ));
        }
        workers.push(WorkerConfig {
            id: w.id,
            address: w.address,
            http: w.http,
            data_dir: w.data_dir,
        });
    }
    if let Some(secret) = &raw.secret {
        check_secret(secret).map_err(|m| locator.error("cluster", Some("secret"), m))?;
    }
    if let Some(h) = &raw.handoff {
        crate::SavepointTarget::parse(h)
            .map_err(|m| locator.error("cluster", Some("handoff"), m))?;
    }
    Ok(ClusterConfig {
        workers,
        secret: raw.secret,
        handoff: raw.handoff,
    })
}

fn state_config(raw: RawState, locator: &Locator) -> Result<StateConfig, ConfigError> {
    let Some(url) = raw.log else {
        if raw.log_replicas.is_some()
            || raw.log_timeout.is_some()
            || raw.snapshots.is_some()
            || raw.snapshot_log_bytes.is_some()
        {
            return Err(locator.error(
                "state",
                Some("log"),
                "log_replicas, log_timeout, snapshots and snapshot_log_bytes need a log \
                 (log = \"nats://HOST:PORT/NAME\")",
            ));
        }
        return Ok(StateConfig::default());
    };
    let mut log =
        CommitLogConfig::parse(&url).map_err(|why| locator.error("state", Some("log"), why))?;
    if let Some(r) = raw.log_replicas {
        if !(1..=5).contains(&r) {
            return Err(locator.error("state", Some("log_replicas"), "must be 1 to 5"));
        }
        log.replicas = r;
    }
    if let Some(t) = raw.log_timeout {
        // Below the log's duplicate window (2 minutes): an append retried
        // within it is recognised as the one that may have landed.
        // At least a second: an append is re-sent within it when a log
        // server restarts, which a shorter wait could never see through.
        if t.0 < Duration::from_secs(1) || t.0 > Duration::from_secs(60) {
            return Err(locator.error("state", Some("log_timeout"), "must be 1s to 60s"));
        }
        log.timeout = t.0;
    }
    if let Some(url) = raw.snapshots {
        crate::SavepointTarget::parse(&url)
            .map_err(|m| locator.error("state", Some("snapshots"), m))?;
        log.snapshots = Some(url);
    }
    if let Some(b) = raw.snapshot_log_bytes {
        if log.snapshots.is_none() {
            return Err(locator.error(
                "state",
                Some("snapshot_log_bytes"),
                "says how often shards are snapshotted, but no snapshots are set: add \
                 snapshots = \"s3://BUCKET/PREFIX\" (or file:///DIR), or remove it",
            ));
        }
        if b < 4096 {
            return Err(locator.error(
                "state",
                Some("snapshot_log_bytes"),
                "must be at least 4096",
            ));
        }
        log.snapshot_log_bytes = b;
    }
    Ok(StateConfig { log: Some(log) })
}

fn component(
    role: Role,
    name: String,
    mut table: toml::Table,
    locator: &Arc<Locator>,
) -> Result<Component, ConfigError> {
    let at = format!("{}.{}", role.section(), name);
    if name.is_empty() || name.contains(['.', ' ', '"', '\'']) {
        return Err(locator.error(
            &at,
            None,
            format!(
                "component name `{name}` must be non-empty and contain no dots, spaces or quotes"
            ),
        ));
    }
    let kind = match table.remove("type") {
        Some(toml::Value::String(s)) => s,
        Some(other) => {
            return Err(locator.error(
                &at,
                Some("type"),
                format!("must be a string, not {}", other.type_str()),
            ))
        }
        None => return Err(locator.error(&at, None, "missing required key `type`")),
    };
    let inputs = match (role, table.remove("inputs")) {
        (Role::Source, Some(_)) => {
            return Err(locator.error(&at, Some("inputs"), "sources take no inputs"))
        }
        (Role::Source, None) => Vec::new(),
        (_, None) => return Err(locator.error(&at, None, "missing required key `inputs`")),
        (_, Some(toml::Value::Array(items))) if items.is_empty() => {
            return Err(locator.error(&at, Some("inputs"), "must name at least one input"))
        }
        (_, Some(toml::Value::Array(items))) => items
            .into_iter()
            .map(|v| input(v).map_err(|m| locator.error(&at, Some("inputs"), m)))
            .collect::<Result<_, _>>()?,
        (_, Some(other)) => {
            return Err(locator.error(
                &at,
                Some("inputs"),
                format!(
                    "must be a list of names or of {{ from, key }} tables, not {}",
                    other.type_str()
                ),
            ))
        }
    };
    Ok(Component {
        name,
        role,
        kind,
        inputs,
        options: Options {
            table,
            at,
            locator: Arc::clone(locator),
        },
    })
}

fn stream_ref(text: &str) -> Result<StreamRef, String> {
    let mut parts = text.splitn(2, '.');
    let component = parts.next().unwrap_or_default().to_owned();
    let output = parts.next().map(str::to_owned);
    if component.is_empty() || output.as_deref() == Some("") {
        return Err(format!(
            "`{text}` is not a stream name (NAME or NAME.OUTPUT)"
        ));
    }
    Ok(StreamRef { component, output })
}

fn input(value: toml::Value) -> Result<Input, String> {
    match value {
        toml::Value::String(s) => Ok(Input {
            stream: stream_ref(&s)?,
            key: KeyExtractor::Key,
        }),
        toml::Value::Table(mut t) => {
            let from = match t.remove("from") {
                Some(toml::Value::String(s)) => stream_ref(&s)?,
                _ => return Err("an input table needs `from = \"NAME\"`".to_owned()),
            };
            let key = match t.remove("key") {
                None => "key".to_owned(),
                Some(toml::Value::String(s)) => s,
                Some(_) => return Err("`key` must be a string".to_owned()),
            };
            let delimiter = match t.remove("delimiter") {
                None => None,
                Some(toml::Value::String(s)) if !s.is_empty() => Some(s),
                Some(_) => return Err("`delimiter` must be a non-empty string".to_owned()),
            };
            if let Some(unknown) = t.keys().next() {
                return Err(format!(
                    "unknown key `{unknown}` in input `{from}` (expected from, key, delimiter)"
                ));
            }
            let key = key_extractor(&key, delimiter)?;
            Ok(Input { stream: from, key })
        }
        other => Err(format!(
            "an input must be a name or a table, not {}",
            other.type_str()
        )),
    }
}

impl KeyExtractor {
    /// Parses `key`, `value`, `json:/pointer` or `field:N` (with an optional delimiter).
    pub fn parse(text: &str, delimiter: Option<String>) -> Result<KeyExtractor, String> {
        key_extractor(text, delimiter)
    }
}

fn key_extractor(text: &str, delimiter: Option<String>) -> Result<KeyExtractor, String> {
    let extractor = if text == "key" {
        KeyExtractor::Key
    } else if text == "value" {
        KeyExtractor::Value
    } else if let Some(ptr) = text.strip_prefix("json:") {
        if !(ptr.is_empty() || ptr.starts_with('/')) {
            return Err(format!(
                "`{text}`: a JSON pointer starts with `/`, e.g. json:/user/id"
            ));
        }
        KeyExtractor::Json(ptr.to_owned())
    } else if let Some(n) = text.strip_prefix("field:") {
        let index = n
            .parse()
            .map_err(|_| format!("`{text}`: field:N needs a whole number N (0-based)"))?;
        return Ok(KeyExtractor::Field {
            index,
            delimiter: delimiter.unwrap_or_else(|| ",".to_owned()),
        });
    } else {
        return Err(format!(
            "unknown key extractor `{text}` (use key, value, json:/pointer or field:N)"
        ));
    };
    if delimiter.is_some() {
        return Err("`delimiter` only applies to key = \"field:N\"".to_owned());
    }
    Ok(extractor)
}

#[cfg(test)]
mod tests;
