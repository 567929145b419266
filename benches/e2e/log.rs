//! The cost of the commit log (`[state] log`): the same pipeline with and
//! without it, in the same run, on a 3-server NATS JetStream cluster started
//! here (replicas 3; `MILLRACE_BENCH_LOG_REPLICAS` servers and replicas); the log's bytes per record; and the latency from a
//! record's ingestion to its count at the sink, through two committing hops
//! (the count and the sink), at half of the logged pipeline's throughput.

use super::nats::Nats;
use super::{quantile, run_topology_opts, Run};
use millrace::engine::commit_log::LogSetup;
use millrace::engine::{Metrics, WorkerOptions};
use std::sync::Arc;

/// generator -> count -> file sink, one shard per CPU; `rate` caps the
/// generator; `log` adds `[state] log`.
fn pipeline(count: u64, rate: Option<u64>, log: Option<&str>, cpus: usize) -> String {
    format!(
        r#"
[service]
data_dir = "{{dir}}/data"
http = "off"
[engine]
shards = {cpus}
threads = {cpus}
{interval}
{state}
[sources.gen]
type = "generator"
count = {count}
keys = 100000
{rate}
[computations.counts]
type = "count"
inputs = ["gen"]
[sinks.out]
type = "file"
inputs = ["counts"]
path = "{{dir}}/out.jsonl"
"#,
        interval = super::commit_interval(),
        state = log.map_or(String::new(), |l| format!(
            "[state]\nlog = \"{l}\"\nlog_replicas = {}",
            replicas()
        )),
        rate = rate.map_or(String::new(), |r| format!("rate = {r}")),
    )
}

/// MILLRACE_BENCH_LOG_REPLICAS: servers started and replicas (default 3).
fn replicas() -> usize {
    super::env_u64("MILLRACE_BENCH_LOG_REPLICAS", 3) as usize
}

pub fn bench(n: u64, cpus: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let nats = Nats::start(dir.path(), replicas());
    let mut deployment = 0;
    // Each logged run on a deployment name of its own: a fresh log.
    let mut logged = |count: u64, rate: Option<u64>, metrics: Arc<Metrics>| -> Run {
        deployment += 1;
        let url = nats.log_url(&format!("bench{deployment}"));
        let mut cfg = millrace::config::CommitLogConfig::parse(&url).expect("log url");
        cfg.replicas = replicas();
        let log = millrace::nats_log::NatsLog::connect(&cfg).expect("connect to the log");
        let opts = WorkerOptions {
            commit_log: Some(LogSetup {
                log: Arc::new(log),
                snapshots: None,
            }),
            ..WorkerOptions::default()
        };
        run_topology_opts(
            &pipeline(count, rate, Some(&url), cpus),
            count,
            metrics,
            opts,
        )
    };
    let plain = |count: u64, rate: Option<u64>, metrics: Arc<Metrics>| -> Run {
        let text = pipeline(count, rate, None, cpus);
        run_topology_opts(&text, count, metrics, WorkerOptions::default())
    };
    // Alternated, twice: the machine's drift shows as the spread.
    let mut best_logged: f64 = 0.0;
    for round in 1..=2 {
        let without = plain(n, None, Arc::new(Metrics::new()));
        let metrics = Arc::new(Metrics::new());
        let cpu = nats.cpu_seconds();
        let with = logged(n, None, Arc::clone(&metrics));
        let servers_cpu = nats.cpu_seconds() - cpu;
        best_logged = best_logged.max(with.records_per_sec);
        println!(
            "log       count -> file, without the log (round {round})    {:>12.0} records/s  ({:.1}s)",
            without.records_per_sec,
            without.elapsed.as_secs_f64()
        );
        println!(
            "log       count -> file, NATS R{} log    (round {round})    {:>12.0} records/s  ({:.1}s)  ratio to without {:.2}  log {:.0} bytes/record  appends {} (p50 {:.2} ms p99 {:.2} ms)  log servers' CPU {:.2} of {cpus} cores",
            replicas(),
            with.records_per_sec,
            with.elapsed.as_secs_f64(),
            with.records_per_sec / without.records_per_sec,
            metrics.log_bytes.get() as f64 / n as f64,
            metrics.log_appends.get(),
            quantile(&metrics.log_append_seconds, 0.5) * 1e3,
            quantile(&metrics.log_append_seconds, 0.99) * 1e3,
            servers_cpu / with.elapsed.as_secs_f64(),
        );
    }
    let seconds = super::env_u64("MILLRACE_BENCH_LATENCY_SECONDS", 10);
    let rate = (best_logged / 2.0) as u64;
    for with_log in [false, true] {
        let metrics = Arc::new(Metrics::new());
        let count = rate * seconds;
        if with_log {
            logged(count, Some(rate), Arc::clone(&metrics));
        } else {
            plain(count, Some(rate), Arc::clone(&metrics));
        }
        let h = metrics.e2e_latency.with_label_values(&["out"]);
        println!(
            "log       latency at {rate} records/s, {:<11} p50 {:.2} ms  p99 {:.2} ms  ({} records, two committing hops)",
            if with_log { format!("NATS R{} log", replicas()) } else { "no log".into() },
            quantile(&h, 0.5) * 1e3,
            quantile(&h, 0.99) * 1e3,
            h.get_sample_count(),
        );
    }
}
