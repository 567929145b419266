//! `millrace run`: the worker as a long-running service.

use crate::http::{self, HttpState};
use anyhow::{Context as _, Result};
use millrace_config::Topology;
use millrace_engine::{Metrics, Registry, Worker, WorkerOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Sets up `tracing`: level from `MILLRACE_LOG` (default `info`), text or JSON.
pub fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MILLRACE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a terminal: a log file or journald gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = if format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// `millrace run`'s options beyond the topology file.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Overrides the data directory.
    pub data_dir: Option<PathBuf>,
    /// Overrides the HTTP address (`off` disables it).
    pub http: Option<String>,
    /// The cluster worker this process is.
    pub worker: Option<String>,
    /// Where to listen for other workers.
    pub listen: Option<String>,
    /// Longest a drain may take.
    pub drain_timeout: Duration,
    /// A savepoint to load into the new data directory first.
    pub from_savepoint: Option<String>,
    /// Drop the savepoint's state of components the topology no longer has.
    pub allow_non_restored_state: bool,
    /// Shard ownership in etcd (`etcd://HOST:PORT/PREFIX`): shards move
    /// between live workers.
    pub join: Option<String>,
}

/// Runs `file` until a signal, a fatal error, or the end of bounded input.
pub fn run(file: &Path, registry: &Registry, opts: RunOptions) -> Result<()> {
    let RunOptions {
        data_dir,
        http: http_addr,
        worker: worker_id,
        listen,
        drain_timeout,
        from_savepoint,
        allow_non_restored_state,
        join,
    } = opts;
    let topology = Topology::load(file)?;
    let join = match &join {
        None => None,
        Some(url) => {
            let url = crate::ownership::JoinUrl::parse(url)?;
            let Some(cluster) = &topology.cluster else {
                anyhow::bail!("--join needs a [cluster] with the workers that may join");
            };
            if worker_id.is_none() {
                anyhow::bail!("--join needs --worker ID");
            }
            let Some(handoff) = &cluster.handoff else {
                anyhow::bail!(
                    "--join needs a place every worker reaches for shards in transit: \
                     [cluster] handoff = \"s3://BUCKET/PREFIX\" or \"file:///DIR\""
                );
            };
            if from_savepoint.is_some() {
                anyhow::bail!("--join and --from-savepoint cannot be combined yet");
            }
            Some((url, handoff.clone()))
        }
    };
    let worker_http = topology.cluster.as_ref().and_then(|c| {
        let id = worker_id.as_deref()?;
        c.worker(id)?.http.clone()
    });
    let http_addr = match http_addr.as_deref().or(worker_http.as_deref()) {
        Some("off") => None,
        Some(a) => Some(a.to_owned()),
        None => topology.service.http.clone(),
    };
    let data_dir =
        millrace_engine::data_dir_of(&topology, worker_id.as_deref(), data_dir.as_deref());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("millrace-io")
        .enable_all()
        .build()
        .context("starting the I/O runtime")?;
    let metrics = Arc::new(Metrics::new());
    let auth = http::Auth {
        token: std::env::var("MILLRACE_HTTP_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .or_else(|| topology.service.http_token.clone()),
        metrics: topology.service.http_token_for_metrics,
    };
    let open_to_all = auth.token.is_none();
    let access = http::Access::new(
        http_addr.as_deref(),
        topology.service.savepoint_targets.clone(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let state = HttpState::new(Arc::clone(&metrics), auth, access, Arc::clone(&stop));

    // Signals: the first SIGTERM/SIGINT starts a drain.
    {
        let stop = Arc::clone(&stop);
        runtime.spawn(async move {
            wait_for_signal().await;
            stop.store(true, Ordering::SeqCst);
        });
    }

    // HTTP first, so that /healthz says 503 while the worker recovers.
    let bound = match &http_addr {
        Some(addr) => Some(
            runtime
                .block_on(http::serve(addr, Arc::clone(&state)))
                .with_context(|| format!("serving HTTP on {addr}"))?,
        ),
        None => None,
    };
    if let Some(addr) = bound.filter(|a| open_to_all && !a.ip().is_loopback()) {
        tracing::warn!(
            "HTTP on {addr} is reachable from other machines and has no token \
             ([service] http_token or MILLRACE_HTTP_TOKEN): whoever reaches it can read \
             /status and /tap and stop the worker"
        );
    }

    if let Some(from) = &from_savepoint {
        crate::savepoints::load(
            &topology,
            registry,
            from,
            worker_id.as_deref(),
            &data_dir,
            allow_non_restored_state,
            &metrics,
        )?;
    }
    let commit_log = match &topology.state.log {
        None => None,
        Some(cfg) => {
            // Component options first: a topology refused for them should
            // not have made the log's stream.
            millrace_engine::Plan::build(topology.clone(), registry)
                .context("checking component options")?;
            let log = crate::nats_log::NatsLog::connect(cfg)?;
            let snapshots = match &cfg.snapshots {
                None => None,
                Some(url) => Some(millrace_engine::commit_log::Snapshots::new(
                    Arc::from(
                        crate::savepoints::open_bounded(url, cfg.timeout)
                            .with_context(|| format!("opening the snapshot store {url}"))?,
                    ),
                    cfg.snapshot_log_bytes,
                    // Apart from any other stream of the same name (on
                    // another cluster, or this one wiped and made again):
                    // each start removes what its folders hold unrecorded.
                    format!("{}-{}", cfg.name, log.created()),
                )),
            };
            tracing::info!(
                log = %millrace_engine::commit_log::CommitLog::describe(&log),
                replicas = cfg.replicas,
                snapshots = cfg.snapshots.as_deref().unwrap_or("none: the log keeps everything"),
                "commits go to the commit log first"
            );
            Some(millrace_engine::commit_log::LogSetup {
                log: Arc::new(log),
                snapshots,
            })
        }
    };
    let worker = Worker::start(
        topology.clone(),
        registry,
        WorkerOptions {
            data_dir: Some(data_dir.clone()),
            worker: worker_id.clone(),
            listen,
            dynamic: join.is_some(),
            commit_log,
        },
        Arc::clone(&metrics),
    )
    .with_context(|| format!("starting the worker on {}", data_dir.display()))?;
    let worker = Arc::new(worker);
    state.set_running(&worker);
    let halt_ownership = Arc::new(AtomicBool::new(false));
    let ownership = match &join {
        None => None,
        Some((url, handoff)) => {
            let topology_cluster = topology.cluster.as_ref();
            let ids: Vec<String> = topology_cluster
                .map(|c| c.workers.iter().map(|w| w.id.clone()).collect())
                .unwrap_or_default();
            let store = crate::savepoints::open(handoff)
                .with_context(|| format!("opening the handoff store {handoff}"))?;
            let o = crate::ownership::Ownership::join(
                url,
                runtime.handle().clone(),
                worker_id.as_deref().unwrap_or_default(),
                ids,
                Arc::clone(&worker),
                store,
                Arc::clone(&metrics),
            )?
            .taking_over_dead_workers(topology.state.log.is_some());
            state.set_ownership(Arc::clone(&o.seen));
            let (leave, left) = (Arc::clone(&o.leave), Arc::clone(&o.left));
            let halt = Arc::clone(&halt_ownership);
            let thread = std::thread::Builder::new()
                .name("millrace-ownership".into())
                .spawn(move || o.run(halt))
                .context("starting the ownership thread")?;
            tracing::info!(etcd = %url.endpoint, prefix = %url.prefix, "joined the deployment");
            Some((leave, left, thread))
        }
    };
    let positions: Vec<String> = worker
        .recovered_positions()
        .into_iter()
        .map(|(name, pos)| format!("{name}@{pos}"))
        .collect();
    tracing::info!(
        topology = %file.display(),
        data_dir = %data_dir.display(),
        http = %bound.map_or_else(|| "off".to_owned(), |a| a.to_string()),
        recovered_backlog = worker.recovered_backlog(),
        recovered_positions = %if positions.is_empty() { "none (fresh start)".to_owned() } else { positions.join(", ") },
        components = worker.plan().nodes.len(),
        cluster_worker = worker_id.as_deref().unwrap_or("-"),
        "millrace running"
    );

    let mut last_sample = std::time::Instant::now();
    let mut leaving_since = None;
    let outcome = loop {
        if let Some((leave, left, _)) = &ownership {
            // Joined: a stop hands every shard away first (or `millrace
            // leave` asked for it).
            if left.load(Ordering::SeqCst) {
                tracing::info!("every shard handed to the other workers: leaving");
                break Ok(());
            }
            if stop.load(Ordering::SeqCst) && leaving_since.is_none() {
                state.set_draining();
                tracing::info!("handing this worker's shards to the others");
                leave.store(true, Ordering::SeqCst);
                leaving_since = Some(std::time::Instant::now());
            }
            if leaving_since.is_some_and(|t| t.elapsed() >= drain_timeout) {
                tracing::warn!(
                    "the shards were not all handed away within --drain-timeout; \
                     those left stay assigned to this worker until it comes back"
                );
                break Ok(());
            }
        } else if stop.load(Ordering::SeqCst) {
            state.set_draining();
            tracing::info!("stopping sources and draining");
            match worker.drain(drain_timeout) {
                Ok(true) => tracing::info!("drained"),
                Ok(false) => tracing::warn!(
                    backlog = worker.backlog(),
                    "drain timed out; the rest stays in the outbox for the next start"
                ),
                Err(e) => break Err(e),
            }
            break Ok(());
        }
        if last_sample.elapsed() >= Duration::from_secs(1) {
            state.sample_rates(&worker);
            last_sample = std::time::Instant::now();
        }
        match worker.wait_finished(Duration::from_millis(100)) {
            Ok(true) => {
                tracing::info!("all input processed and delivered");
                break Ok(());
            }
            Ok(false) => {}
            Err(e) => break Err(e),
        }
    };
    state.set_draining();
    halt_ownership.store(true, Ordering::SeqCst);
    if let Some((_, _, thread)) = ownership {
        let _ = thread.join();
    }
    // The HTTP server's tasks stop with the runtime; a request that was
    // being answered may still hold the worker for a moment (a /metrics
    // scrape refreshes gauges on a blocking thread): wait for it to let go.
    runtime.shutdown_timeout(Duration::from_secs(1));
    let mut worker = worker;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let worker = loop {
        match Arc::try_unwrap(worker) {
            Ok(w) => break w,
            Err(still_held) if std::time::Instant::now() < deadline => {
                worker = still_held;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => anyhow::bail!("the HTTP server still holds the worker after 5 s"),
        }
    };
    let shutdown = worker.shutdown();
    outcome.context("the worker stopped")?;
    shutdown.context("the last commit failed")?;
    if let Some(to) = state.take_stop_savepoint() {
        // Stopped and closed: its shards are copied as they were committed.
        let (r, seconds) = crate::savepoints::export_dir(
            topology,
            registry,
            &to,
            worker_id.as_deref(),
            &data_dir,
        )?;
        tracing::info!(
            savepoint = %to,
            shards = r.shards,
            keys = r.keys,
            bytes = r.bytes,
            seconds,
            complete = r.complete,
            waiting_for = %r.missing.join(", "),
            "savepoint taken"
        );
    }
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
