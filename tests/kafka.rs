//! The Kafka source and sink against a real Kafka-protocol broker (Tansu,
//! started here on 127.0.0.1): exactly once across SIGKILLs, per-partition
//! watermarks with idle partitions, undecodable records to `NAME.errors`,
//! an unreachable broker reported on `/healthz` and survived, a broker
//! that comes back empty (`on_offset_reset`), and Kafka timestamps out of range.

#[path = "support/kafka.rs"]
mod kafka_support;
mod support;

use kafka_support::Broker;
use std::collections::BTreeMap;
use std::time::Duration;
use support::*;

/// Partitions of the input topic `words`.
const PARTITIONS: usize = 4;

/// `count` words over 40 keys, spread over the partitions round-robin.
fn words(count: usize, offset: usize) -> Vec<(i32, (String, String, i64))> {
    (0..count)
        .map(|i| {
            let n = i + offset;
            let key = format!("w{}", (n * 7919) % 40);
            let ts = 1_700_000_000_000 + n as i64;
            ((n % PARTITIONS) as i32, (key.clone(), key, ts))
        })
        .collect()
}

fn produce(b: &Broker, topic: &str, recs: &[(i32, (String, String, i64))]) {
    let mut by_partition: BTreeMap<i32, Vec<(String, String, i64)>> = BTreeMap::new();
    for (p, r) in recs {
        by_partition.entry(*p).or_default().push(r.clone());
    }
    for (p, rs) in by_partition {
        b.produce(topic, p, &rs);
    }
}

/// Checks the running counts in `topic`: per key, 1, 2, ..., n once each,
/// in order, every record with its production id; returns n per key.
fn running_counts(b: &Broker, topic: &str) -> BTreeMap<String, u64> {
    let read = b.read_all(topic);
    let mut ids = std::collections::HashMap::new();
    for r in &read {
        let id =
            r.id.clone()
                .unwrap_or_else(|| panic!("no production id on {r:?}"));
        if let Some(first) = ids.insert(id.clone(), r) {
            panic!("production id {id} twice in {topic}: {first:?} and {r:?}");
        }
    }
    let pairs: Vec<(String, String)> = read.into_iter().map(|r| (r.key, r.value)).collect();
    assert_running_counts(&pairs)
}

fn expected(recs: &[(i32, (String, String, i64))]) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for (_, (k, _, _)) in recs {
        *m.entry(k.clone()).or_insert(0) += 1;
    }
    m
}

/// The sink setting that turns on transactions in the count topology.
const TRANSACTIONAL: &str = r#"transactional_id = "millrace-tests-counts""#;

/// The count topology with `service` (and a `[cluster]`) as its head and
/// `sink` (more settings, or nothing) in its Kafka sink.
fn count_topology_on(s: &Scratch, broker: &str, service: &str, sink: &str) -> std::path::PathBuf {
    s.write(
        "kafka.toml",
        &format!(
            r#"
{service}

[engine]
shards = 4

[sources.words]
type = "kafka"
brokers = "{broker}"
topic = "words"
shards = 2
timestamp = "json:/t"
watermark = {{ idle_after = "300ms" }}

[computations.counts]
type = "count"
inputs = [{{ from = "words", key = "json:/w" }}]

[sinks.out]
type = "kafka"
inputs = ["counts"]
brokers = "{broker}"
topic = "counts"
{sink}

[sinks.bad]
type = "file"
inputs = ["words.errors"]
path = "{{dir}}/bad.jsonl"
"#
        ),
    )
}

/// JSON values with the event time in `t`.
fn as_json(recs: &[(i32, (String, String, i64))]) -> Vec<(i32, (String, String, i64))> {
    recs.iter()
        .map(|(p, (k, v, ts))| (*p, (k.clone(), format!(r#"{{"w":"{v}","t":{ts}}}"#), *ts)))
        .collect()
}

/// Topics `words` ([`PARTITIONS`]) and `counts` (2) on `broker`, and the
/// count topology over them, its clients going to `address`, with `sink` in
/// its Kafka sink.
fn count_setup(
    broker: &Broker,
    address: &str,
    sink: &str,
) -> (Scratch, String, std::path::PathBuf) {
    count_setup_with(broker, address, sink, |_| String::new())
}

/// [`count_setup`] with a `[state]` table made for the scratch directory.
fn count_setup_with(
    broker: &Broker,
    address: &str,
    sink: &str,
    state: impl FnOnce(&Scratch) -> String,
) -> (Scratch, String, std::path::PathBuf) {
    broker.create_topic("words", PARTITIONS as u32);
    broker.create_topic("counts", 2);
    let s = Scratch::new();
    let http = format!("127.0.0.1:{}", free_port());
    let head = format!(
        "[service]\ndata_dir = \"{{dir}}/data\"\nhttp = \"{http}\"\n{}",
        state(&s)
    );
    let topo = count_topology_on(&s, address, &head, sink);
    (s, http, topo)
}

/// Waits (at most `secs`) until `counts` holds `n` running counts, failing
/// at once if the worker exits; returns the checked counts per key.
fn complete_counts(broker: &Broker, w: &mut Running, n: usize, secs: u64) -> BTreeMap<String, u64> {
    // Reading the whole topic back takes a while once it is large: it is
    // read again at most once a second.
    let mut next_read = std::time::Instant::now();
    let done = wait_until(Duration::from_secs(secs), || {
        if let Ok(Some(status)) = w.try_wait() {
            panic!("the worker exited: {status}");
        }
        if std::time::Instant::now() < next_read {
            return false;
        }
        next_read = std::time::Instant::now() + Duration::from_secs(1);
        running_counts(broker, "counts").values().sum::<u64>() >= n as u64
    });
    let got = running_counts(broker, "counts");
    assert!(
        done,
        "not all counts arrived: {} of {n}",
        got.values().sum::<u64>()
    );
    got
}

#[test]
fn kafka_in_and_out_is_exact_across_sigkills() {
    exact_across_sigkills("", 120_000, 10_000);
}

#[test]
fn kafka_in_and_out_with_transactions_is_exact_across_sigkills() {
    exact_across_sigkills(TRANSACTIONAL, 120_000, 10_000);
}

/// With the commit log (a NATS server started here, snapshots every
/// 1 MiB of a shard's log): every SIGKILL also deletes the worker's data
/// directory, as the loss of its machine would; the positions in Kafka and
/// the sink's production ids come back from the log, and the output is
/// still every running count once.
#[test]
fn kafka_in_and_out_is_exact_across_lost_machines() {
    let logs = Scratch::new();
    let nats = support::nats::Nats::start(logs.dir.path(), 1);
    let state = |s: &Scratch| {
        format!(
            "[state]\nlog = \"{}\"\nlog_replicas = 1\nsnapshots = \"file://{}\"\n\
             snapshot_log_bytes = 1048576\n",
            nats.log_url("kafka-lost"),
            s.path("snapshots").display()
        )
    };
    exact_across_kills("", (60_000, 5_000), Some(&state));
}

/// Kafka -> count -> Kafka on three workers joined through etcd, with a
/// commit log (NATS) and snapshots in S3 (SeaweedFS): each round, under
/// load, a worker is SIGKILLed and its data directory deleted, as the loss
/// of its machine would; the live workers take its shards over from the
/// log and its snapshots, and it comes back on an empty directory. Every
/// running count is in the output topic once, and the takeovers' times
/// are printed. `KAFKA_ROUNDS` (default 3) and `KAFKA_LOG_SERVERS`
/// (default 1; 3 for a replicated log) make the long version:
/// `KAFKA_ROUNDS=10 KAFKA_LOG_SERVERS=3 cargo test --test kafka
/// lost_machines_of_a_joined -- --nocapture`.
#[test]
fn kafka_in_and_out_is_exact_across_lost_machines_of_a_joined_deployment() {
    const T: Duration = Duration::from_secs(90);
    let env = |name: &str, default: usize| -> usize {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (rounds, servers) = (env("KAFKA_ROUNDS", 3), env("KAFKA_LOG_SERVERS", 1));
    let broker = Broker::start();
    broker.create_topic("words", PARTITIONS as u32);
    broker.create_topic("counts", 2);
    let s = Scratch::new();
    let etcd = support::etcd::Etcd::start(&s.path("etcd"), "millrace/kafka-lost");
    let nats = support::nats::Nats::start(s.dir.path(), servers);
    let s3 = support::s3::S3::start("snapshots", std::array::from_fn(|_| free_port()));
    let net = ClusterNet::new(3);
    let head =
        format!(
        "[service]\ndata_dir = \"{{dir}}/data\"\n[state]\nlog = \"{}\"\nlog_replicas = {servers}\n\
         snapshots = \"s3://snapshots/millrace\"\nsnapshot_log_bytes = 262144\n{}",
        nats.log_url("kafka-joined"),
        net.toml("kafka-joined").replacen(
            "[cluster]\n",
            &format!("[cluster]\nhandoff = \"file://{}\"\n", s.path("handoff").display()),
            1
        )
    );
    let topo = count_topology_on(&s, &broker.address(), &head, "");
    let s3_env = s3.env();
    let join = |i: usize| {
        Running(
            net.command(&topo, i)
                .args(["--join", &etcd.join])
                .envs(s3_env.iter().map(|(k, v)| (k, v)))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::inherit())
                .spawn()
                .expect("spawn millrace"),
        )
    };
    let owned = |i: usize| metric(&net.http[i], "millrace_shards_owned").unwrap_or(0.0);
    let out = |i: usize| records_out(&net.http[i]);
    // words (2 shards), counts (4), out (1), bad (1).
    let all = 8.0;
    let mut all_words = words(30_000, 0);
    produce(&broker, "words", &as_json(&all_words));
    let mut workers: Vec<Running> = (0..3).map(join).collect();
    assert!(
        wait_until(T, || (0..3).map(owned).sum::<f64>() == all),
        "the three workers claimed every shard"
    );
    let mut rng = Rng::from_env();
    let mut taken_over = Vec::new();
    for round in 0..rounds {
        // A worker that runs shards, in turn.
        let victim = (0..3)
            .map(|k| (round + k) % 3)
            .find(|&i| owned(i) > 0.0)
            .expect("a worker runs shards");
        assert!(
            wait_until(T, || (0..3).map(out).sum::<f64>() > 0.0),
            "round {round}: the sink writes"
        );
        std::thread::sleep(Duration::from_millis(rng.below(1_000)));
        kill9(&mut workers[victim]);
        std::fs::remove_dir_all(s.path("data").join(&net.ids[victim])).expect("rm -rf");
        let killed = std::time::Instant::now();
        let more = words(5_000, all_words.len());
        produce(&broker, "words", &as_json(&more));
        all_words.extend(more);
        let live: Vec<usize> = (0..3).filter(|&i| i != victim).collect();
        assert!(
            wait_until(T, || live.iter().map(|&i| owned(i)).sum::<f64>() == all),
            "round {round}: the live workers took over every shard of w{victim}"
        );
        taken_over.push(killed.elapsed());
        workers[victim] = join(victim);
        assert!(
            wait_until(T, || owned(victim) >= 1.0),
            "round {round}: w{victim}, back on an empty directory, took a share again"
        );
    }
    let mut sorted = taken_over.clone();
    sorted.sort();
    eprintln!(
        "takeover from SIGKILL to every shard running again, {rounds} rounds: {taken_over:?}; \
         p50 {:?}, slowest {:?}",
        sorted[sorted.len() / 2],
        sorted.last()
    );
    let loaded: f64 = (0..3)
        .map(|i| metric(&net.http[i], "millrace_log_replayed_entries_total").unwrap_or(0.0))
        .sum();
    assert!(loaded > 0.0, "shards were rebuilt from the log");
    let got = complete_counts(&broker, &mut workers[0], all_words.len(), T.as_secs());
    assert_eq!(
        got,
        expected(&all_words),
        "per-word totals after {rounds} lost machines"
    );
    // Stopped at once: a SIGTERM would hand every shard to the others first.
    for w in workers.iter_mut() {
        kill9(w);
    }
}

/// What the sink `out` has produced since its process started.
fn records_out(http: &str) -> f64 {
    metric_sum(http, r#"millrace_kafka_records_out_total{component="out","#)
}

/// `first` records before the first start and `per_kill` more after each
/// SIGKILL (`KAFKA_SCALE=N` multiplies both) through the count topology
/// with `sink` in its Kafka sink: every running count once, nothing else.
fn exact_across_sigkills(sink: &str, first: usize, per_kill: usize) {
    exact_across_kills(sink, (first, per_kill), None);
}

/// [`exact_across_sigkills`]; with `lost` (the `[state]` table of a commit
/// log), each SIGKILL also deletes the data directory.
fn exact_across_kills(
    sink: &str,
    (first, per_kill): (usize, usize),
    lost: Option<&dyn Fn(&Scratch) -> String>,
) {
    let broker = Broker::start();
    let (s, http, topo) = count_setup_with(&broker, &broker.address(), sink, |s| {
        lost.map_or(String::new(), |state| state(s))
    });
    let scale: usize = std::env::var("KAFKA_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let (first, per_kill) = (first * scale, per_kill * scale);
    let first = words(first, 0);
    produce(&broker, "words", &as_json(&first));
    // Two undecodable records (no event time): to `words.errors`.
    broker.produce(
        "words",
        0,
        &[
            ("bad1".into(), "no time here".into(), 1),
            ("bad2".into(), r#"{"t":"soon"}"#.into(), 2),
        ],
    );
    let mut all = first.clone();
    let mut rng = Rng::from_env();
    let mut w = spawn(&topo, &http);
    // Kill it at random moments while it works, adding input in between.
    let kills: usize = std::env::var("KAFKA_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    for kill in 0..kills {
        // Every third kill comes while the worker starts (reading back,
        // replaying); the others once the sink writes, at a random moment.
        if kill % 3 != 0 {
            assert!(
                wait_until(Duration::from_secs(60), || records_out(&http) > 0.0),
                "the restarted worker wrote nothing within 60 s"
            );
        }
        std::thread::sleep(Duration::from_millis(rng.below(1_000)));
        kill9(&mut w);
        if lost.is_some() {
            // Killed right at its start, a worker may not have made it yet.
            match std::fs::remove_dir_all(s.path("data")) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    panic!("delete the data directory: {e}")
                }
                _ => {}
            }
        }
        let more = words(per_kill, all.len());
        produce(&broker, "words", &as_json(&more));
        all.extend(more);
        w = spawn(&topo, &http);
    }
    let want = expected(&all);
    let got = complete_counts(&broker, &mut w, all.len(), 60 + all.len() as u64 / 1_000);
    assert_eq!(got, want, "per-word totals after {kills} SIGKILLs");
    assert_eq!(
        metric(&http, r#"millrace_sequence_gaps_total{component="counts"}"#),
        Some(0.0),
        "no sequence gaps"
    );
    let bad = lines(&s.path("bad.jsonl"));
    assert_eq!(
        bad.len(),
        2,
        "the two undecodable records, once each: {bad:?}"
    );
    assert!(
        metric(
            &http,
            r#"millrace_kafka_records_in_total{component="words",partition="0"}"#
        )
        .is_some_and(|n| n > 0.0),
        "per-partition records-in metric"
    );
    let transactions = metric(
        &http,
        r#"millrace_kafka_transactions_total{component="out"}"#,
    );
    if sink.is_empty() {
        assert_eq!(transactions, None, "no transactions without the setting");
    } else {
        assert!(
            transactions.is_some_and(|n| n > 0.0),
            "the sink commits transactions: {transactions:?}"
        );
    }
    term(&w);
    assert!(wait_exit(&mut w, Duration::from_secs(20)).success());
}

#[test]
fn start_latest_reads_only_what_comes_after_the_first_start() {
    let broker = Broker::start();
    let (_s, http, topo) = count_setup(&broker, &broker.address(), "");
    let text = std::fs::read_to_string(&topo).expect("topology");
    let text = text.replacen(
        "topic = \"words\"\n",
        "topic = \"words\"\nstart = \"latest\"\n",
        1,
    );
    std::fs::write(&topo, text).expect("topology");
    // Already in the topic before the first start: skipped. One record per
    // produce request: this broker (Tansu) lists the end of a partition as
    // its count of record batches, not of records, so "latest" is checked
    // where the two agree (see docs/DESIGN.md).
    let client = kafka_support::Client::new(broker.port);
    for (p, r) in as_json(&words(8, 0)) {
        client.produce_each("words", p, &[r]);
    }
    let mut w = spawn(&topo, &http);
    // Running means recovered: every source shard has resolved where it
    // starts on each of its partitions.
    assert!(
        wait_until(Duration::from_secs(60), || {
            http_get(&http, "/healthz").is_some_and(|(code, _)| code == 200)
        }),
        "the worker came up"
    );
    let new = words(600, 8);
    produce(&broker, "words", &as_json(&new));
    let got = complete_counts(&broker, &mut w, new.len(), 60);
    assert_eq!(
        got,
        expected(&new),
        "only the records produced after the start"
    );
    // A restart resumes from the committed position, not from the new end.
    kill9(&mut w);
    let more = words(400, 608);
    produce(&broker, "words", &as_json(&more));
    let mut w = spawn(&topo, &http);
    let mut all = new.clone();
    all.extend(more);
    let got = complete_counts(&broker, &mut w, all.len(), 60);
    assert_eq!(got, expected(&all), "what came while it was down is read");
}

/// Runs the count topology with `MILLRACE_FAILPOINT=POINT:N` until it dies
/// there; returns its log.
fn crash_at(topo: &std::path::Path, http: &str, point: &str, n: u64) -> String {
    let log_path = topo.with_extension(format!("crash-{point}-{n}.log"));
    let log = std::fs::File::create(&log_path).expect("a log file");
    let mut child = Running(
        millrace()
            .args(["run", topo.to_str().expect("utf-8"), "--http", http])
            .env("MILLRACE_FAILPOINT", format!("{point}:{n}"))
            .env("MILLRACE_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn"),
    );
    let status = wait_exit(&mut child, Duration::from_secs(30));
    assert!(!status.success(), "{point}:{n}: the worker did not crash");
    std::fs::read_to_string(&log_path).expect("the log")
}

/// How many records the Kafka sink's read-back found awaiting their
/// re-delivery, from a worker's log (`None`: no read-back logged).
fn read_back_awaited(log: &str) -> Option<u64> {
    let line = log
        .lines()
        .find(|l| l.contains("kafka sink: read back what the topic holds"))?;
    let at = line.find("awaited")? + "awaited".len();
    let digits: String = line[at..]
        .trim_start_matches(['=', '"', ':'])
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[test]
fn a_crash_between_produce_and_commit_leaves_no_duplicate_in_the_topic() {
    crash_between_produce_and_commit("");
}

#[test]
fn a_crash_between_a_committed_transaction_and_the_commit_leaves_no_duplicate() {
    crash_between_produce_and_commit(TRANSACTIONAL);
}

/// With `sink` in the Kafka sink: crashes after the sink's flush (with
/// transactions, after the transaction's commit) and before the engine's
/// commit; the restart skips what it finds and the counts are exact.
fn crash_between_produce_and_commit(sink: &str) {
    let broker = Broker::start();
    let (_s, http, topo) = count_setup(&broker, &broker.address(), sink);
    let recs = words(2000, 0);
    produce(&broker, "words", &as_json(&recs));
    // Crash after the sink's records reached the broker, before the commit
    // that records them (its first: nothing of the sink is committed), then
    // again in the run that read them back, with more input.
    crash_at(&topo, &http, "sink.flushed", 1);
    let after_first = broker.read_all("counts").len();
    assert!(after_first > 0, "the crashed run had produced to the topic");
    let more = words(500, 2000);
    produce(&broker, "words", &as_json(&more));
    // The first run's records are in the topic and not recorded as
    // written: the second run's read-back finds them, to skip them.
    let second = crash_at(&topo, &http, "sink.flushed", 1);
    assert!(
        read_back_awaited(&second).is_some_and(|n| n > 0),
        "the restart's read-back found the crashed run's records: {}",
        second
            .lines()
            .find(|l| l.contains("read back"))
            .unwrap_or("(no read-back in its log)")
    );
    let recs: Vec<_> = recs.into_iter().chain(more).collect();
    let mut w = spawn(&topo, &http);
    assert_eq!(
        complete_counts(&broker, &mut w, recs.len(), 60),
        expected(&recs)
    );
    term(&w);
    assert!(wait_exit(&mut w, Duration::from_secs(20)).success());
}

#[test]
fn a_transactional_sink_fences_a_writer_left_with_its_id() {
    use rdkafka::producer::Producer;
    let broker = Broker::start();
    let (_s, http, topo) = count_setup(&broker, &broker.address(), TRANSACTIONAL);
    broker.create_topic("elsewhere", 1);
    // A writer with the sink's transactional id, as a killed run's producer
    // is: its transaction open, with a record in it.
    let client = kafka_support::Client::new(broker.port);
    let old = client.transactional_producer("millrace-tests-counts");
    old.begin_transaction().expect("begin");
    kafka_support::send(&old, "elsewhere", 0, &("k".into(), "before".into(), 1));
    let recs = words(2000, 0);
    produce(&broker, "words", &as_json(&recs));
    let mut w = spawn(&topo, &http);
    assert_eq!(
        complete_counts(&broker, &mut w, recs.len(), 60),
        expected(&recs)
    );
    // The sink's start bumped the id's epoch: the old writer's requests and
    // its commit are refused.
    kafka_support::queue(&old, "elsewhere", 0, &("k".into(), "after".into(), 2));
    let _ = old.flush(Duration::from_secs(10));
    let refused = old.commit_transaction(Duration::from_secs(10));
    let e = refused.expect_err("the old writer's commit after the sink started");
    assert_eq!(
        e.rdkafka_error_code(),
        Some(rdkafka::types::RDKafkaErrorCode::ProducerFenced),
        "refused as fenced: {e}"
    );
    term(&w);
    assert!(wait_exit(&mut w, Duration::from_secs(20)).success());
}

#[test]
fn an_unreachable_broker_is_reported_retried_and_caught_up_with() {
    let port = free_port();
    let s = Scratch::new();
    let http = format!("127.0.0.1:{}", free_port());
    let broker_addr = format!("127.0.0.1:{port}");
    let topo = s.write(
        "late_broker.toml",
        &format!(
            r#"
[service]
data_dir = "{{dir}}/data"
http = "{http}"

[sources.words]
type = "kafka"
brokers = "{broker_addr}"
topic = "words"

[computations.counts]
type = "count"
inputs = [{{ from = "words", key = "value" }}]

[sinks.out]
type = "file"
inputs = ["counts"]
path = "{{dir}}/out.jsonl"
"#
        ),
    );
    let mut w = spawn(&topo, &http);
    // No broker: the worker runs, retries, and says so on /healthz.
    assert!(
        wait_until(Duration::from_secs(30), || {
            http_get(&http, "/healthz")
                .is_some_and(|(code, body)| code == 503 && body.contains("kafka source `words`"))
        }),
        "/healthz did not report the unreachable broker: {:?}",
        http_get(&http, "/healthz")
    );
    assert!(
        metric(
            &http,
            r#"millrace_kafka_errors_total{component="words",kind="connect"}"#
        )
        .is_some_and(|n| n > 0.0),
        "connection errors are counted"
    );
    assert!(
        w.try_wait().expect("try_wait").is_none(),
        "the worker kept running"
    );
    // The broker comes up; the source connects and reads everything.
    let broker = Broker::start_on(port);
    broker.create_topic("words", PARTITIONS as u32);
    let recs = words(300, 0);
    produce(&broker, "words", &recs);
    let out = s.path("out.jsonl");
    assert!(
        wait_until(Duration::from_secs(60), || read_jsonl(&out).len()
            >= recs.len()),
        "the source did not catch up once the broker was there: {} of {}",
        read_jsonl(&out).len(),
        recs.len()
    );
    let counts = assert_running_counts(&read_jsonl(&out));
    assert_eq!(counts, expected(&recs));
    assert!(
        wait_until(Duration::from_secs(30), || {
            http_get(&http, "/healthz").is_some_and(|(code, _)| code == 200)
        }),
        "/healthz is ok again"
    );
    term(&w);
    assert!(wait_exit(&mut w, Duration::from_secs(20)).success());
}

/// A fixed 10 s window counting per key over a Kafka topic whose Kafka
/// timestamps are the event times; panes to `out.txt`, late records to
/// `late.txt`, records without a valid event time to `bad.txt`.
fn window_over_kafka(s: &Scratch, broker: &str, idle_after: &str) -> std::path::PathBuf {
    s.write(
        "kw.toml",
        &format!(
            r#"
[service]
data_dir = "{{dir}}/data"
[engine]
shards = 2
[sources.events]
type = "kafka"
brokers = "{broker}"
topic = "events"
watermark = {{ idle_after = "{idle_after}" }}
[computations.w]
type = "window"
inputs = [{{ from = "events", key = "key" }}]
window = {{ kind = "fixed", size = "10s" }}
[sinks.out]
type = "file"
inputs = ["w"]
path = "{{dir}}/out.txt"
format = "text"
[sinks.late]
type = "file"
inputs = ["w.late"]
path = "{{dir}}/late.txt"
format = "text"
[sinks.bad]
type = "file"
inputs = ["events.errors"]
path = "{{dir}}/bad.txt"
format = "text"
"#
        ),
    )
}

/// `(key, "start-end:count")` of the on-time panes written so far.
fn on_time_panes(p: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = lines(p)
        .iter()
        .map(|l| {
            let (key, json) = l.split_once('\t').expect("key<TAB>pane");
            let j: serde_json::Value = serde_json::from_str(json).expect("pane JSON");
            assert_eq!(j["pane"]["timing"], "on_time", "{l}");
            format!(
                "{key} {}-{}:{}",
                j["window"]["start"].as_i64().expect("start") / 1_000_000 - 1000,
                j["window"]["end"].as_i64().expect("end") / 1_000_000 - 1000,
                j["value"]
            )
        })
        .collect();
    v.sort();
    v
}

/// A record of `key` at 1,000 s + `seconds` (a Kafka timestamp of 0 would
/// mean "none", and the producer would use the clock).
fn at(key: &str, seconds: i64) -> (String, String, i64) {
    (key.to_owned(), "x".to_owned(), (1000 + seconds) * 1000)
}

#[test]
fn the_watermark_is_the_minimum_over_partitions_and_idle_ones_stop_holding_it() {
    let broker = Broker::start();
    broker.create_topic("events", 2);
    let s = Scratch::new();
    let topo = window_over_kafka(&s, &broker.address(), "20s");
    let mut w = spawn(&topo, "off");
    // Partition 1 starts at 0 s; partition 0 then runs ahead to 35 s.
    broker.produce("events", 1, &[at("b", 0)]);
    let p0: Vec<_> = (0..36).map(|t| at("a", t)).collect();
    broker.produce("events", 0, &p0);
    // Partition 1 catches up: not late, since it held the watermark back.
    let p1: Vec<_> = (1..36).map(|t| at("b", t)).collect();
    broker.produce("events", 1, &p1);
    let want: Vec<String> = ["a", "b"]
        .iter()
        .flat_map(|k| (0..3).map(move |i| format!("{k} {}-{}:10", i * 10, i * 10 + 10)))
        .collect();
    let out = s.path("out.txt");
    assert!(
        wait_until(Duration::from_secs(30), || on_time_panes(&out).len()
            >= want.len()),
        "panes: {:?}",
        on_time_panes(&out)
    );
    assert_eq!(on_time_panes(&out), want);
    assert_eq!(
        lines(&s.path("late.txt")),
        Vec::<String>::new(),
        "nothing late"
    );
    drop(w.0.kill());
    let _ = w.wait();

    // A partition that never gets data stops holding the watermark after
    // `idle_after`: the other partition's windows fire.
    let broker = Broker::start();
    broker.create_topic("events", 2);
    let s = Scratch::new();
    let topo = window_over_kafka(&s, &broker.address(), "2s");
    let mut w = spawn(&topo, "off");
    // Partition 0 gets a record every 100 ms, so the source as a whole is
    // never idle: only partition 1's own idleness can free the watermark.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let feeder = {
        let (stop, address) = (stop.clone(), broker.port);
        std::thread::spawn(move || {
            // One producer for the whole feed, so that records keep coming
            // every 100 ms however busy the machine is.
            let p = kafka_support::Client::new(address).producer();
            for t in 0..600 {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                kafka_support::send(&p, "events", 0, &at("a", t));
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let out = s.path("out.txt");
    let fired = wait_until(Duration::from_secs(30), || on_time_panes(&out).len() >= 2);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    feeder.join().expect("feeder");
    assert!(
        fired,
        "an idle partition held the watermark: {:?}",
        on_time_panes(&out)
    );
    assert_eq!(on_time_panes(&out)[..2], ["a 0-10:10", "a 10-20:10"]);
    term(&w);
    assert!(wait_exit(&mut w, Duration::from_secs(20)).success());
}

#[test]
fn a_kafka_timestamp_out_of_range_goes_to_errors_and_moves_no_watermark() {
    let broker = Broker::start();
    broker.create_topic("events", 1);
    let s = Scratch::new();
    let topo = window_over_kafka(&s, &broker.address(), "300s");
    let mut w = spawn(&topo, "off");
    broker.produce("events", 0, &[at("a", 0), at("a", 5)]);
    // Microseconds given as milliseconds: past the year 9999.
    let bad = ("a".to_owned(), "bad".to_owned(), 1_700_000_000_000_000);
    broker.produce("events", 0, &[bad]);
    let bad_out = s.path("bad.txt");
    assert!(
        wait_until(Duration::from_secs(30), || lines(&bad_out).len() == 1),
        "the record with a time out of range went to events.errors: {:?}",
        lines(&bad_out)
    );
    // Had it moved the watermark, [0 s, 10 s) would have fired with two
    // records and the one at 6 s would be late.
    broker.produce("events", 0, &[at("a", 6), at("a", 15)]);
    let out = s.path("out.txt");
    assert!(
        wait_until(Duration::from_secs(30), || !on_time_panes(&out).is_empty()),
        "the window [0 s, 10 s) fired"
    );
    assert_eq!(on_time_panes(&out), ["a 0-10:3"]);
    assert_eq!(
        lines(&s.path("late.txt")),
        Vec::<String>::new(),
        "nothing late"
    );
    assert_eq!(lines(&bad_out).len(), 1);
    assert!(w.try_wait().expect("try_wait").is_none(), "the worker runs");
    term(&w);
    assert!(wait_exit(&mut w, Duration::from_secs(20)).success());
}

#[test]
fn cut_connections_to_the_broker_lose_and_repeat_nothing() {
    // Clients reach the broker only through a proxy that cuts connections.
    let (real, front) = (free_port(), free_port());
    let broker = Broker::start_advertising(real, front);
    let proxy =
        support::proxy::Proxy::start(&format!("127.0.0.1:{front}"), &format!("127.0.0.1:{real}"));
    let (_s, http, topo) = count_setup(&broker, &format!("127.0.0.1:{front}"), "");
    let mut all = words(2000, 0);
    produce(&broker, "words", &as_json(&all));
    let mut w = spawn(&topo, &http);
    let mut rng = Rng::from_env();
    let mut cuts = 0;
    for round in 0..6 {
        std::thread::sleep(Duration::from_millis(100 + rng.below(300)));
        cuts += proxy.cut();
        let more = words(300, 2000 + round * 300);
        produce(&broker, "words", &as_json(&more));
        all.extend(more);
    }
    assert!(cuts > 0, "the proxy cut live connections");
    assert_eq!(
        complete_counts(&broker, &mut w, all.len(), 90),
        expected(&all),
        "after {cuts} cuts"
    );
    term(&w);
    assert!(wait_exit(&mut w, Duration::from_secs(20)).success());
}

#[test]
fn kafka_to_kafka_across_a_two_worker_cluster_with_a_sigkill() {
    let broker = Broker::start();
    broker.create_topic("words", PARTITIONS as u32);
    broker.create_topic("counts", 2);
    let s = Scratch::new();
    let net = ClusterNet::new(2);
    let head = format!(
        "[service]\ndata_dir = \"{{dir}}/data\"\n{}",
        net.toml("kafka-cluster")
    );
    let topo = count_topology_on(&s, &broker.address(), &head, "");
    let mut all = words(10_000, 0);
    produce(&broker, "words", &as_json(&all));
    let mut ws: Vec<Running> = (0..2).map(|i| net.spawn(&topo, i, false, &[])).collect();
    // Kill the worker that does not own the sink, mid-stream, and restart it.
    std::thread::sleep(Duration::from_millis(500));
    kill9(&mut ws[1]);
    let more = words(2_000, 10_000);
    produce(&broker, "words", &as_json(&more));
    all.extend(more);
    ws[1] = net.spawn(&topo, 1, false, &[]);
    let (first, rest) = ws.split_at_mut(1);
    let got = complete_counts(&broker, &mut first[0], all.len(), 90);
    assert!(
        rest[0].try_wait().expect("try_wait").is_none(),
        "worker 1 runs"
    );
    assert_eq!(
        got,
        expected(&all),
        "a Kafka-to-Kafka count across two workers"
    );
    for w in ws.iter() {
        term(w);
    }
    for w in ws.iter_mut() {
        assert!(wait_exit(w, Duration::from_secs(30)).success());
    }
}

/// Records `w0`..`w6` (value = key) for partition 0, numbered from `from`.
fn words_on_0(count: usize, from: usize) -> Vec<(String, String, i64)> {
    (from..from + count)
        .map(|n| {
            let w = format!("w{}", n % 7);
            (w.clone(), w, 1_700_000_000_000 + n as i64)
        })
        .collect()
}

/// A count per word of topic `words` (one partition) on `broker` into
/// `out.jsonl`, with `extra` in the Kafka source's table.
fn count_of_one_partition(
    s: &Scratch,
    broker: &str,
    http: &str,
    extra: &str,
) -> std::path::PathBuf {
    s.write(
        "one.toml",
        &format!(
            r#"
[service]
data_dir = "{{dir}}/data"
http = "{http}"

[sources.words]
type = "kafka"
brokers = "{broker}"
topic = "words"
{extra}

[computations.counts]
type = "count"
inputs = [{{ from = "words", key = "value" }}]

[sinks.out]
type = "file"
inputs = ["counts"]
path = "{{dir}}/out.jsonl"
"#
        ),
    )
}

/// Waits (at most 60 s) until `out` holds `n` running counts, failing at
/// once if the worker exits.
fn await_counts(w: &mut Running, out: &std::path::Path, n: usize) {
    assert!(
        wait_until(Duration::from_secs(60), || {
            if let Ok(Some(status)) = w.try_wait() {
                panic!("the worker exited: {status}");
            }
            read_jsonl(out).len() >= n
        }),
        "{} of {n} counts",
        read_jsonl(out).len()
    );
}

fn word_totals(recs: &[(String, String, i64)]) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for (k, _, _) in recs {
        *m.entry(k.clone()).or_insert(0) += 1;
    }
    m
}

#[test]
fn a_broker_that_comes_back_empty_five_times_is_survived_and_read_from_its_start() {
    let port = free_port();
    let mut broker = Broker::start_on(port);
    broker.create_topic("words", 1);
    let s = Scratch::new();
    let http = format!("127.0.0.1:{}", free_port());
    let topo = count_of_one_partition(
        &s,
        &broker.address(),
        &http,
        r#"on_offset_reset = "earliest""#,
    );
    let mut all = words_on_0(100, 0);
    broker.produce("words", 0, &all);
    let mut w = spawn(&topo, &http);
    let out = s.path("out.jsonl");
    await_counts(&mut w, &out, all.len());
    // Each time the broker is killed and comes back empty, with fewer
    // records than were read before, so its offsets are below the
    // committed position whenever the source looks.
    for (round, count) in [50, 30, 20, 10, 5].into_iter().enumerate() {
        drop(broker);
        broker = Broker::start_on(port);
        broker.create_topic("words", 1);
        let more = words_on_0(count, all.len());
        broker.produce("words", 0, &more);
        all.extend(more);
        await_counts(&mut w, &out, all.len());
        assert!(
            wait_until(Duration::from_secs(30), || {
                http_get(&http, "/healthz").is_some_and(|(code, _)| code == 200)
            }),
            "round {round}: /healthz is ok again once the broker is back: {:?}",
            http_get(&http, "/healthz")
        );
    }
    assert_eq!(assert_running_counts(&read_jsonl(&out)), word_totals(&all));
    assert_eq!(
        metric(
            &http,
            r#"millrace_kafka_offset_resets_total{action="earliest",component="words"}"#
        ),
        Some(5.0)
    );
    term(&w);
    assert!(wait_exit(&mut w, Duration::from_secs(20)).success());
}

#[test]
fn offsets_gone_back_stop_the_partition_by_default_and_latest_goes_on_from_the_end() {
    let port = free_port();
    let broker = Broker::start_on(port);
    broker.create_topic("words", 1);
    let s = Scratch::new();
    let http = format!("127.0.0.1:{}", free_port());
    let topo = count_of_one_partition(&s, &broker.address(), &http, "");
    let first = words_on_0(100, 0);
    broker.produce("words", 0, &first);
    let mut w = spawn(&topo, &http);
    let out = s.path("out.jsonl");
    await_counts(&mut w, &out, first.len());
    drop(broker);
    let broker = Broker::start_on(port);
    broker.create_topic("words", 1);
    broker.produce("words", 0, &words_on_0(50, 100));
    // Nothing skipped silently: the partition is reported and not read.
    assert!(
        wait_until(Duration::from_secs(30), || {
            http_get(&http, "/healthz").is_some_and(|(code, body)| {
                code == 503 && body.contains("partition 0 of topic `words`")
            })
        }),
        "/healthz names the partition: {:?}",
        http_get(&http, "/healthz")
    );
    assert_eq!(
        metric(
            &http,
            r#"millrace_kafka_offset_resets_total{action="fail",component="words"}"#
        ),
        Some(1.0)
    );
    assert_eq!(read_jsonl(&out).len(), first.len(), "nothing read past it");
    term(&w);
    assert!(wait_exit(&mut w, Duration::from_secs(20)).success());
    // Restarted with "latest": what the partition holds is skipped, what
    // comes after is read.
    let text = std::fs::read_to_string(&topo).expect("topology");
    let text = text.replacen(
        "topic = \"words\"\n",
        "topic = \"words\"\non_offset_reset = \"latest\"\n",
        1,
    );
    std::fs::write(&topo, text).expect("topology");
    let mut w = spawn(&topo, &http);
    assert!(
        wait_until(Duration::from_secs(30), || metric(
            &http,
            r#"millrace_kafka_offset_resets_total{action="latest",component="words"}"#
        ) == Some(1.0)),
        "the restarted worker went on from the end"
    );
    let after = words_on_0(10, 150);
    broker.produce("words", 0, &after);
    let mut all = first.clone();
    all.extend(after);
    await_counts(&mut w, &out, all.len());
    assert_eq!(assert_running_counts(&read_jsonl(&out)), word_totals(&all));
    term(&w);
    assert!(wait_exit(&mut w, Duration::from_secs(20)).success());
}
