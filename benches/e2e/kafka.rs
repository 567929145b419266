//! Kafka in, running count, Kafka out, exactly once, against the same run's
//! raw rate of the client on the same broker and records: throughput on one
//! and two workers, without and with transactions, then the end-to-end
//! latency at half of the one-worker rate.

use super::{cluster_section, cpu_steadiness, env_u64};
use millrace::config::Topology;
use millrace::engine::{Metrics, Worker, WorkerOptions};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// A Tansu broker on a free port with in-memory storage, killed when dropped.
struct Broker {
    tansu: std::path::PathBuf,
    url: String,
    addr: String,
    child: std::process::Child,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Broker {
    fn start() -> Broker {
        let tansu = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/tools/tansu");
        assert!(
            tansu.exists(),
            "run `make test-servers` first (it fetches the broker)"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = std::process::Command::new(&tansu)
            .args(["broker", "--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the broker");
        let up = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                up.elapsed() < Duration::from_secs(20),
                "broker did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Broker {
            tansu,
            url,
            addr: format!("127.0.0.1:{port}"),
            child,
        }
    }

    fn topic(&self, topic: &str, partitions: u32) {
        let ok = std::process::Command::new(&self.tansu)
            .args(["topic", "create", topic, "--broker", &self.url])
            .args(["--partitions", &partitions.to_string()])
            .status()
            .expect("create topic");
        assert!(ok.success(), "creating {topic}");
    }

    fn producer(&self) -> BaseProducer {
        ClientConfig::new()
            .set("bootstrap.servers", &self.addr)
            .set("enable.idempotence", "true")
            .set("linger.ms", "1")
            .create()
            .expect("producer")
    }

    /// A consumer of every partition of `topic` from its start, seeing only
    /// committed transactions.
    fn reader(&self, topic: &str, partitions: i32) -> BaseConsumer {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.addr)
            .set("group.id", format!("bench-{topic}"))
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", "10")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .expect("tpl");
        }
        c.assign(&tpl).expect("assign");
        c
    }
}

/// Sends one record, serving delivery reports while the queue is full.
fn send(p: &BaseProducer, topic: &str, key: &str, value: &str) {
    let mut rec = BaseRecord::to(topic).key(key).payload(value);
    loop {
        match p.send(rec) {
            Ok(()) => return,
            Err((_, back)) => {
                p.poll(Duration::from_millis(5));
                rec = back;
            }
        }
    }
}

/// `n` records over 100,000 words into `topic`.
fn produce(broker: &Broker, topic: &str, n: u64) {
    let p = broker.producer();
    for i in 0..n {
        let key = format!("k{}", i % 100_000);
        send(&p, topic, &key, &format!("{{\"w\":\"{key}\"}}"));
    }
    p.flush(Duration::from_secs(120)).expect("flush");
}

/// Reads `topic` until it has seen `n` records; how long that took from `from`.
fn read_until(c: &BaseConsumer, n: u64, from: Instant) -> Duration {
    let mut read = 0u64;
    while read < n {
        if let Some(Ok(_)) = c.poll(Duration::from_millis(100)) {
            read += 1;
        }
        assert!(
            from.elapsed() < Duration::from_secs(1800),
            "read {read} of {n} records in 30 minutes"
        );
    }
    from.elapsed()
}

/// The count pipeline from `input` to `out` on `workers` workers (in this
/// process, over TCP on 127.0.0.1, as separate processes would).
fn start(
    broker: &Broker,
    input: &str,
    out: &str,
    sink: &str,
    workers: usize,
    dir: &std::path::Path,
) -> Vec<Worker> {
    let cluster = if workers > 1 {
        cluster_section(workers)
    } else {
        String::new()
    };
    let addr = &broker.addr;
    let text = format!(
        r#"{cluster}
[service]
data_dir = "{dir}/data"
http = "off"
[engine]
shards = 8
[sources.in]
type = "kafka"
brokers = "{addr}"
topic = "{input}"
shards = 2
[computations.counts]
type = "count"
inputs = [{{ from = "in", key = "json:/w" }}]
[sinks.out]
type = "kafka"
inputs = ["counts"]
brokers = "{addr}"
topic = "{out}"
{sink}
"#,
        dir = dir.display()
    );
    (0..workers)
        .map(|w| {
            let topology = Topology::parse_str("kafka-bench.toml", &text).expect("topology");
            Worker::start(
                topology,
                &millrace::builtins(),
                WorkerOptions {
                    worker: (workers > 1).then(|| format!("w{w}")),
                    ..WorkerOptions::default()
                },
                Arc::new(Metrics::new()),
            )
            .expect("start worker")
        })
        .collect()
}

/// Seconds of CPU time the host took from this machine (steal), and of
/// all CPU time, so far (from /proc/stat; zeros where it cannot be read).
fn cpu_steal() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    (
        fields.get(7).copied().unwrap_or(0.0),
        fields.iter().take(8).sum(),
    )
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

pub fn bench(n: u64) {
    let broker = Broker::start();
    for (topic, partitions) in [("raw", 4), ("in", 4), ("lat_in", 4), ("raw_lat", 4)] {
        broker.topic(topic, partitions);
    }
    // MILLRACE_BENCH_KAFKA_TX_INTERVAL: the sink's `transaction_interval`.
    let interval = std::env::var("MILLRACE_BENCH_KAFKA_TX_INTERVAL")
        .map(|d| format!("transaction_interval = \"{d}\""))
        .unwrap_or_default();
    let tx = |id: &str| format!("transactional_id = \"{id}\"\n{interval}");
    let runs: [(&str, String, usize); 4] = [
        ("1 worker,  exactly-once ", String::new(), 1),
        ("1 worker,  transactional", tx("bench1"), 1),
        ("2 workers, exactly-once ", String::new(), 2),
        ("2 workers, transactional", tx("bench2"), 2),
    ];
    for i in 0..runs.len() {
        broker.topic(&format!("out{i}"), 2);
    }
    broker.topic("lat_out", 2);

    // The client alone: produce the records, then consume them.
    let started = Instant::now();
    produce(&broker, "raw", n);
    let c = broker.reader("raw", 4);
    read_until(&c, n, started);
    let raw_secs = started.elapsed().as_secs_f64();
    let raw = n as f64 / raw_secs;
    println!(
        "kafka     raw client: produce then consume              {raw:>12.0} records/s  ({raw_secs:.1}s)"
    );

    // The same records through the pipeline, each run from a fresh data
    // directory reading the same input topic; timed to the last count
    // seen by a read_committed consumer of the output.
    produce(&broker, "in", n);
    let mut one_worker = 0.0;
    for (i, (what, sink, workers)) in runs.iter().enumerate() {
        let out = format!("out{i}");
        let reader = broker.reader(&out, 2);
        let dir = tempfile::tempdir().expect("temp dir");
        let started = Instant::now();
        let running = start(&broker, "in", &out, sink, *workers, dir.path());
        let secs = read_until(&reader, n, started).as_secs_f64();
        for w in running {
            w.shutdown().expect("shutdown");
        }
        let rate = n as f64 / secs;
        if i == 0 {
            one_worker = rate;
        }
        println!(
            "kafka     kafka -> count -> kafka, {what}  {rate:>12.0} records/s  ({secs:.1}s)  ratio to raw client {:.2}",
            rate / raw
        );
    }

    // Latency at half of the one-worker rate: each input record's Kafka
    // timestamp is its produce time, which the count's output keeps. The
    // baseline: the client alone, the same rate into a topic read back.
    let rate = std::env::var("MILLRACE_BENCH_KAFKA_RATE")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or((one_worker / 2.0).max(100.0));
    let seconds = env_u64("MILLRACE_BENCH_LATENCY_SECONDS", 10);
    let (p50, p99, _) = latency(&broker, "raw_lat", "raw_lat", rate, seconds);
    println!(
        "kafka     latency at {rate:.0} records/s, the client alone: produce to read_committed consumer: p50 {p50} ms  p99 {p99} ms"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let running = start(&broker, "lat_in", "lat_out", "", 1, dir.path());
    let (p50, p99, steal) = latency(&broker, "lat_in", "lat_out", rate, seconds);
    for w in running {
        w.shutdown().expect("shutdown");
    }
    let steadiness = cpu_steadiness(2, 3);
    println!(
        "kafka     latency at {rate:.0} records/s, produce to its count at a read_committed consumer: p50 {p50} ms  p99 {p99} ms  (CPU steal {:.1}% during the run; steadiness after it: {:.0}% of 100 ms windows under 80%)",
        steal * 100.0,
        steadiness.slow_share * 100.0
    );
}

/// Produces to `input` at `rate` for `seconds` and reads `output` from its
/// start: the p50 and p99 of the time from each record's produce to its
/// arrival (ms, by the Kafka timestamp the output kept), and the share of
/// CPU time the host took meanwhile.
fn latency(broker: &Broker, input: &str, output: &str, rate: f64, seconds: u64) -> (i64, i64, f64) {
    let reader = broker.reader(output, if input == output { 4 } else { 2 });
    // The path is up once a first record went through.
    let p = broker.producer();
    send(&p, input, "warm", "{\"w\":\"warm\"}");
    p.flush(Duration::from_secs(30)).expect("flush");
    read_until(&reader, 1, Instant::now());
    let total = (rate * seconds as f64) as u64;
    let steal_before = cpu_steal();
    let topic = input.to_owned();
    let producer = std::thread::spawn(move || {
        let started = Instant::now();
        for i in 0..total {
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let key = format!("k{}", i % 100_000);
            send(&p, &topic, &key, &format!("{{\"w\":\"{key}\"}}"));
            p.poll(Duration::ZERO);
        }
        p.flush(Duration::from_secs(60)).expect("flush");
    });
    let mut latencies = Vec::with_capacity(total as usize);
    let deadline = Instant::now() + Duration::from_secs(seconds * 3 + 60);
    while (latencies.len() as u64) < total && Instant::now() < deadline {
        if let Some(Ok(m)) = reader.poll(Duration::from_millis(100)) {
            if let Some(ts) = m.timestamp().to_millis() {
                latencies.push((now_ms() - ts).max(0));
            }
        }
    }
    producer.join().expect("producer");
    let steal_after = cpu_steal();
    let steal = (steal_after.0 - steal_before.0) / (steal_after.1 - steal_before.1).max(1.0);
    assert!(!latencies.is_empty(), "no record came through");
    latencies.sort_unstable();
    let q = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    (q(0.5), q(0.99), steal)
}
