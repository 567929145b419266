//! Command-line interface.

use crate::service;
use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use millrace_config::Topology;
use millrace_engine::{Plan, Registry};
use std::path::PathBuf;
use std::process::ExitCode;

/// A MillWheel-style exactly-once stream engine.
#[derive(Parser)]
#[command(name = "millrace", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format: `text` or `json`. The level comes from MILLRACE_LOG (default `info`).
    #[arg(long, global = true, default_value = "text")]
    log_format: String,
}

#[derive(Subcommand)]
enum Command {
    /// Run a topology until SIGTERM/SIGINT, or until its bounded input is done.
    Run {
        /// The topology file.
        file: PathBuf,
        /// Overrides `[service] data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Overrides `[service] http` (`off` disables it).
        #[arg(long)]
        http: Option<String>,
        /// Which `[[cluster.workers]]` entry this process is (required when
        /// the topology has a `[cluster]`).
        #[arg(long)]
        worker: Option<String>,
        /// Listen for other workers here instead of the worker's `address`.
        #[arg(long)]
        listen: Option<String>,
        /// Longest a drain after SIGTERM may take before the worker exits anyway
        /// (what is not delivered stays in the outbox for the next start).
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        drain_timeout: std::time::Duration,
        /// Load this savepoint (`file:///DIR` or a path) into the (new, empty)
        /// data directory first; any worker list may load it.
        #[arg(long)]
        from_savepoint: Option<String>,
        /// With --from-savepoint: drop the state of components the topology
        /// no longer has, instead of refusing to start.
        #[arg(long, requires = "from_savepoint")]
        allow_non_restored_state: bool,
        /// Take shards from, and hand them to, the other live workers of the
        /// deployment whose ownership is kept in etcd under PREFIX
        /// (`etcd://HOST:PORT/PREFIX`); needs `[cluster] handoff`. SIGTERM
        /// then hands this worker's shards away before it exits.
        #[arg(long)]
        join: Option<String>,
    },
    /// Ask a worker of a deployment run with --join to hand its shards to the
    /// others and exit.
    Leave {
        /// Where the deployment's ownership is: `etcd://HOST:PORT/PREFIX`.
        join: String,
        /// Which worker.
        #[arg(long)]
        worker: String,
    },
    /// A deployment run with --join: its members, controller, and each
    /// shard's assigned worker, owner and epoch, and moves under way.
    ClusterStatus {
        /// The topology file (to name the shards).
        file: PathBuf,
        /// Where the deployment's ownership is: `etcd://HOST:PORT/PREFIX`.
        #[arg(long)]
        join: String,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Export a stopped worker's shards to a savepoint (stop every worker of
    /// the deployment first; run this once per worker; the last completes it).
    Savepoint {
        /// The topology file the data was written with.
        file: PathBuf,
        /// Where: `file:///DIR` (or a path).
        #[arg(long)]
        to: String,
        /// Which `[[cluster.workers]]` entry's data to export.
        #[arg(long)]
        worker: Option<String>,
        /// Overrides the worker's data directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Check a topology file without running it.
    Validate {
        /// The topology file.
        file: PathBuf,
    },
    /// Print the topology as Graphviz DOT (`millrace graph t.toml | dot -Tsvg > t.svg`).
    Graph {
        /// The topology file.
        file: PathBuf,
    },
    /// Show what a data directory holds: shards, watermarks, outbox backlog,
    /// state key counts; or one key's state. Works beside a running worker.
    /// Given a savepoint (`file://`, `s3://`, or a directory with a
    /// manifest), shows what it holds.
    Inspect {
        /// The data directory, or a savepoint.
        data_dir: PathBuf,
        /// Only this component (required with --key).
        #[arg(long)]
        component: Option<String>,
        /// Print this key's state.
        #[arg(long)]
        key: Option<String>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop a running deployment (each worker drains as on SIGTERM), and
    /// with --savepoint have each worker export its shards there as it
    /// stops; waits until the savepoint is complete.
    Stop {
        /// A worker's HTTP address; repeat it for every worker of the deployment.
        #[arg(long = "http", required = true)]
        http: Vec<String>,
        /// Where the savepoint goes: `file:///DIR` (or a path) or `s3://BUCKET/PREFIX`.
        #[arg(long)]
        savepoint: Option<String>,
        /// Longest to wait for the savepoint to be complete.
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        wait: std::time::Duration,
    },
    /// Watch the records leaving one component of a running worker, live.
    Tap {
        /// The worker's HTTP address (`[service] http`).
        addr: String,
        /// The component to watch.
        component: String,
        /// Stop after this many records.
        #[arg(long)]
        limit: Option<u64>,
    },
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    millrace_config::parse_duration(s)
}

/// Runs the `millrace` command line with `registry`'s kinds.
pub fn cli_main(registry: Registry) -> ExitCode {
    let cli = Cli::parse();
    service::init_logging(&cli.log_format);
    let result = match cli.command {
        Command::Validate { file } => validate(&file, &registry),
        Command::Graph { file } => {
            crate::operator::graph(&file, &registry).map(|dot| print!("{dot}"))
        }
        Command::Inspect {
            data_dir,
            component,
            key,
            json,
        } => {
            let target = data_dir.to_string_lossy();
            let is_savepoint = target.starts_with("s3://")
                || target.starts_with("file://")
                || data_dir.join("manifest.json").exists();
            if is_savepoint {
                crate::savepoints::describe(&target, json).map(|text| print!("{text}"))
            } else {
                crate::operator::inspect_dir(&data_dir, component.as_deref(), key.as_deref(), json)
                    .map(|text| print!("{text}"))
            }
        }
        Command::Tap {
            addr,
            component,
            limit,
        } => crate::operator::tap(&addr, &component, limit),
        Command::Stop {
            http,
            savepoint,
            wait,
        } => crate::savepoints::stop(&http, savepoint.as_deref(), wait),
        Command::Run {
            file,
            data_dir,
            http,
            worker,
            listen,
            drain_timeout,
            from_savepoint,
            allow_non_restored_state,
            join,
        } => service::run(
            &file,
            &registry,
            service::RunOptions {
                data_dir,
                http,
                worker,
                listen,
                drain_timeout,
                from_savepoint,
                allow_non_restored_state,
                join,
            },
        ),
        Command::Leave { join, worker } => crate::ownership::JoinUrl::parse(&join)
            .and_then(|url| crate::ownership::ask_to_leave(&url, &worker))
            .map(|()| println!("asked worker {worker} to hand its shards away and exit")),
        Command::ClusterStatus { file, join, json } => {
            cluster_status(&file, &registry, &join, json)
        }
        Command::Savepoint {
            file,
            to,
            worker,
            data_dir,
        } => crate::savepoints::export(
            &file,
            &registry,
            &to,
            worker.as_deref(),
            data_dir.as_deref(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn cluster_status(
    file: &std::path::Path,
    registry: &Registry,
    join: &str,
    json: bool,
) -> Result<()> {
    let url = crate::ownership::JoinUrl::parse(join)?;
    let plan =
        Plan::build(Topology::load(file)?, registry).context("checking component options")?;
    let name = |sid: u32| crate::ownership::shard_name(&plan, sid);
    print!("{}", crate::ownership::status(&url, &name, json)?);
    Ok(())
}

fn validate(file: &std::path::Path, registry: &Registry) -> Result<()> {
    let topology = Topology::load(file)?;
    let plan = Plan::build(topology, registry).context("checking component options")?;
    println!("{}", plan.summary());
    Ok(())
}
