//! The commit log (`[state] log`) on real NATS JetStream servers on
//! 127.0.0.1: the log's own contract (order, parts, the fence, an
//! unreachable server), then workers whose data directory is deleted
//! under load, and a log server lost with its store, with the output
//! checked exactly.

mod support;

use millrace::nats_log::NatsLog;
use millrace_config::CommitLogConfig;
use millrace_engine::commit_log::{Append, CommitLog, LogError};
use std::process::Stdio;
use std::time::{Duration, Instant};
use support::nats::Nats;
use support::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

fn connect(url: &str, timeout: Duration) -> anyhow::Result<NatsLog> {
    let mut cfg = CommitLogConfig::parse(url).expect("url");
    cfg.replicas = 1;
    cfg.timeout = timeout;
    NatsLog::connect(&cfg)
}

fn read_all(log: &NatsLog, shard: &str, after: u64) -> (Vec<(u64, Vec<u8>)>, u64) {
    let mut got = Vec::new();
    let end = log
        .read(shard, after, &mut |seq, bytes| {
            got.push((seq, bytes.to_vec()));
            Ok(())
        })
        .expect("read");
    (got, end)
}

fn append(
    log: &NatsLog,
    shard: &str,
    after: u64,
    incarnation: u64,
    bytes: &[u8],
) -> Result<u64, LogError> {
    log.append(&[Append {
        shard,
        after,
        incarnation,
        bytes,
    }])
    .map(|seqs| seqs[0])
}

/// Every key of `out` holds exactly the counts 1..n, and the totals are
/// those of `records` generated over `keys` keys with `seed`.
fn assert_exact(out: &std::path::Path, (records, keys, seed): (u64, u64, u64)) {
    let pairs = read_jsonl(out);
    let counts = assert_running_counts(&pairs);
    assert_eq!(pairs.len() as u64, records, "records in the sink");
    assert_eq!(counts, generator_key_counts(records, keys, seed));
}

/// Waits (at most 2 minutes) until `out` holds `records` lines, then
/// [`assert_exact`].
fn await_exact(out: &std::path::Path, (records, keys, seed): (u64, u64, u64)) {
    assert!(
        wait_until(Duration::from_secs(120), || lines(out).len() as u64
            >= records),
        "the output reached {} of {records} records",
        lines(out).len()
    );
    assert_exact(out, (records, keys, seed));
}

/// Three places for workers joined through an etcd, with a commit log on a
/// NATS server, and the moving count topology of `(records, keys)` at
/// 8,000 records/s (seed 7), under `name`; with `snapshots`, the log is
/// cut below shard snapshots in an S3 store (SeaweedFS) every 64 KiB.
struct Joined {
    s: Scratch,
    etcd: support::etcd::Etcd,
    _nats: Nats,
    s3: Option<support::s3::S3>,
    net: ClusterNet,
    topology: std::path::PathBuf,
    /// The `[state] log` URL.
    log: String,
}

impl Joined {
    fn new(name: &str, (records, keys): (u64, u64), snapshots: bool) -> Joined {
        let s = Scratch::new();
        let etcd = support::etcd::Etcd::start(&s.path("etcd"), &format!("millrace/{name}"));
        let nats = Nats::start(s.dir.path(), 1);
        let s3 = snapshots
            .then(|| support::s3::S3::start("snapshots", std::array::from_fn(|_| free_port())));
        let net = ClusterNet::new(3);
        let mut state = format!("log = \"{}\"\nlog_replicas = 1", nats.log_url(name));
        if s3.is_some() {
            state.push_str("\nsnapshots = \"s3://snapshots/millrace\"\nsnapshot_log_bytes = 65536");
        }
        let topology = moving_count_topology(&s, &net, (records, keys, 8_000), &state);
        Joined {
            s,
            etcd,
            log: nats.log_url(name),
            _nats: nats,
            s3,
            net,
            topology,
        }
    }

    /// Starts worker `i`, its stderr to `stderr`.
    fn join(&self, i: usize, stderr: Stdio) -> Running {
        let env = self.s3.as_ref().map(|s3| s3.env()).unwrap_or_default();
        Running(
            self.net
                .command(&self.topology, i)
                .args(["--join", &self.etcd.join])
                .envs(env.iter().map(|(k, v)| (k, v)))
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .expect("spawn millrace"),
        )
    }

    /// Shards worker `i` runs now (0 when it does not answer).
    fn owned(&self, i: usize) -> f64 {
        metric(&self.net.http[i], "millrace_shards_owned").unwrap_or(0.0)
    }
}

/// Entries of a shard read back in order, each whole however large (in
/// parts under a small `max_payload`); shards are apart; a writer whose
/// view is stale is refused; a half-written entry is dropped.
#[test]
fn entries_come_back_whole_and_in_order_and_a_stale_writer_is_refused() {
    let s = Scratch::new();
    let nats = Nats::start_with(s.dir.path(), 1, Some(8 * 1024));
    let rt = runtime();
    let url = nats.log_url("contract");
    let a = connect(&url, Duration::from_secs(10)).expect("connect");
    assert_eq!(read_all(&a, "counts.0", 0), (vec![], 0), "an empty log");
    let small = b"one entry".to_vec();
    let large: Vec<u8> = (0..40_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let s1 = append(&a, "counts.0", 0, 1, &small).expect("append");
    let s2 = append(&a, "counts.0", s1, 1, &large).expect("append in parts");
    let other = append(&a, "counts.1", 0, 1, b"another shard").expect("append");
    let s3 = append(&a, "counts.0", s2, 1, &[]).expect("an empty entry");
    let (got, end) = read_all(&a, "counts.0", 0);
    assert_eq!(end, s3);
    assert_eq!(
        got,
        vec![(s1, small.clone()), (s2, large.clone()), (s3, vec![])],
        "each entry whole, in order, under the sequence of its last part"
    );
    assert!(
        s2 > s1 + 10,
        "160 kB in 8 kB messages takes parts: {s1}..{s2}"
    );
    assert_eq!(read_all(&a, "counts.0", s2), (vec![(s3, vec![])], s3));
    assert_eq!(
        read_all(&a, "counts.1", 0),
        (vec![(other, b"another shard".to_vec())], other)
    );

    // Another writer reads to the end and appends: the first one's view is
    // stale now, and its next append is refused, however it retries.
    let b = connect(&url, Duration::from_secs(10)).expect("connect");
    let fence = append(&b, "counts.0", s3, 2, b"fence").expect("the new writer appends");
    for _ in 0..2 {
        match append(&a, "counts.0", s3, 1, b"stale") {
            Err(LogError::Fenced { shard, expected }) => {
                assert_eq!((shard.as_str(), expected), ("counts.0", s3));
            }
            other => panic!("a stale append was not refused: {other:?}"),
        }
    }
    // A writer that died between the parts of an entry: its first part
    // is in the log, its entry is not, and the next writer's entries follow.
    let raw = rt.block_on(async {
        let client = async_nats::connect(nats.client_url(0))
            .await
            .expect("connect");
        let js = async_nats::jetstream::new(client);
        let part = async_nats::jetstream::message::PublishMessage::build()
            .payload(large[..1000].to_vec().into())
            .header("Millrace-Part", "1/2");
        js.send_publish("millrace.contract.counts.0", part)
            .await
            .expect("publish")
            .await
            .expect("ack")
            .sequence
    });
    assert_eq!(
        read_all(&b, "counts.0", fence),
        (vec![], raw),
        "no whole entry after the fence"
    );
    let next = append(&b, "counts.0", raw, 2, b"after").expect("append");
    assert_eq!(
        read_all(&b, "counts.0", fence),
        (vec![(next, b"after".to_vec())], next),
        "the unfinished entry is dropped"
    );
    // A shard whose subject the server would refuse (a control line over
    // 4 KiB) is named at once, not retried for the log's timeout.
    let long = format!("{}.0", "c".repeat(5_000));
    let err = b
        .read(&long, 0, &mut |_, _| Ok(()))
        .err()
        .map(|e| e.to_string());
    assert!(
        err.as_deref().is_some_and(
            |e| e.contains("shorten the component's name") && !e.contains("reading the end")
        ),
        "{err:?}"
    );
}

/// A log server that does not answer: the worker does not start, and says
/// where it tried, within the configured timeout.
#[test]
fn an_unreachable_log_is_an_error_naming_it() {
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}/nowhere");
    let started = Instant::now();
    let err = connect(&url, Duration::from_secs(2))
        .err()
        .expect("no server, no log");
    let text = format!("{err:#}");
    assert!(text.contains(&url), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}

/// A stream made by someone else that would not keep a commit log, or not
/// the way millrace uses it, is refused at start with the setting named;
/// one made the way millrace makes it is taken.
#[test]
fn a_stream_that_would_not_keep_a_commit_log_is_refused() {
    use async_nats::jetstream::stream::{Config, RetentionPolicy, StorageType};
    let s = Scratch::new();
    let nats = Nats::start(s.dir.path(), 1);
    let rt = runtime();
    let js = rt.block_on(async {
        let client = async_nats::connect(nats.client_url(0)).await.expect("nats");
        async_nats::jetstream::new(client)
    });
    let ours = |name: &str| Config {
        name: format!("millrace-{name}"),
        subjects: vec![format!("millrace.{name}.>")],
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    };
    let cases: Vec<(&str, Config, usize, &str)> = vec![
        (
            "memory",
            Config {
                storage: StorageType::Memory,
                ..ours("memory")
            },
            1,
            "file storage",
        ),
        (
            "interest",
            Config {
                retention: RetentionPolicy::Interest,
                ..ours("interest")
            },
            1,
            "limits retention",
        ),
        (
            "nopurge",
            Config {
                deny_purge: true,
                ..ours("nopurge")
            },
            1,
            "denies purges",
        ),
        (
            "elsewhere",
            Config {
                subjects: vec!["elsewhere.>".into()],
                ..ours("elsewhere")
            },
            1,
            "not millrace.elsewhere.>",
        ),
        (
            "forgetful",
            Config {
                duplicate_window: Duration::from_secs(1),
                ..ours("forgetful")
            },
            1,
            "remembers message ids for 1s",
        ),
        (
            "fewer",
            ours("fewer"),
            3,
            "keeps 1 replicas, and log_replicas says 3",
        ),
        (
            "noack",
            Config {
                no_ack: true,
                ..ours("noack")
            },
            1,
            "no_ack",
        ),
        (
            "lazy",
            Config {
                persist_mode: Some(async_nats::jetstream::stream::PersistenceMode::Async),
                ..ours("lazy")
            },
            1,
            "persist_mode async",
        ),
        (
            "moved",
            Config {
                subject_transform: Some(async_nats::jetstream::stream::SubjectTransform {
                    source: "millrace.moved.>".into(),
                    destination: "elsewhere.>".into(),
                }),
                ..ours("moved")
            },
            1,
            "subject transform",
        ),
        (
            "tiny",
            Config {
                max_message_size: 512,
                ..ours("tiny")
            },
            1,
            "takes messages of at most 512 bytes",
        ),
    ];
    for (name, config, replicas, says) in cases {
        rt.block_on(js.create_stream(config))
            .unwrap_or_else(|e| panic!("creating the stream for {name}: {e}"));
        let mut cfg = CommitLogConfig::parse(&nats.log_url(name)).expect("url");
        cfg.replicas = replicas;
        cfg.timeout = Duration::from_secs(5);
        let err = NatsLog::connect(&cfg).err().map(|e| format!("{e:#}"));
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains(says) && e.contains("another log name")),
            "{name}: {err:?}"
        );
    }
    rt.block_on(js.create_stream(ours("fine"))).expect("stream");
    connect(&nats.log_url("fine"), Duration::from_secs(5)).expect("a stream as millrace makes it");
}

/// A snapshot store that takes connections and never answers holds the
/// worker up for one try of at most `log_timeout`, whatever the number of
/// shards and executors: after it the store is left alone for a while, and
/// the run finishes exactly (the client's own bound is three minutes a
/// call, and every shard's start used to make one).
#[test]
fn a_snapshot_store_that_never_answers_costs_a_bounded_wait() {
    let hole = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    let endpoint = format!("http://{}", hole.local_addr().expect("address"));
    std::thread::spawn(move || {
        // Held open, never read or answered.
        let held: Vec<_> = hole.incoming().collect();
        drop(held);
    });
    let s = Scratch::new();
    let nats = Nats::start(s.dir.path(), 1);
    let records = 20_000;
    let topo = count_pipeline(
        &s,
        &format!(
            "shards = 4\nthreads = 4\n[state]\nlog = \"{}\"\nlog_replicas = 1\nlog_timeout = \"2s\"\n\
             snapshots = \"s3://hole/snapshots\"\nsnapshot_log_bytes = 4096",
            nats.log_url("hole")
        ),
        (records, 200, 8),
        "type = \"count\"",
    );
    let said = s.path("worker.log");
    let started = Instant::now();
    let mut worker = Running(
        millrace()
            .args(["run", topo.to_str().expect("path"), "--http", "off"])
            .envs([
                ("AWS_ENDPOINT_URL", endpoint.as_str()),
                ("AWS_ACCESS_KEY_ID", "millrace"),
                ("AWS_SECRET_ACCESS_KEY", "millrace"),
                ("AWS_REGION", "us-east-1"),
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&said).expect("log file"))
            .spawn()
            .expect("spawn"),
    );
    let status = wait_exit(&mut worker, Duration::from_secs(150));
    let took = started.elapsed();
    let said = std::fs::read_to_string(&said).unwrap_or_default();
    assert!(status.success(), "{said}");
    assert_exact(&s.path("out.jsonl"), (records, 200, 8));
    // One try for the whole worker: after it, the store is left alone (by
    // every executor) for ten times as long, and the run ends first.
    assert_eq!(
        said.matches("snapshot folder could not be listed").count(),
        1,
        "{said}"
    );
    assert!(!said.contains("a snapshot failed"), "{said}");
    // Bounded by `wait_exit` above (each unanswered call used to hold its
    // executor three minutes, and every shard's start made one).
    eprintln!("finished in {took:?} with the snapshot store answering nothing");
}

const RECORDS: u64 = 300_000;
const KEYS: u64 = 2_000;
const ROUNDS: usize = 10;

/// A worker's machine is lost again and again: SIGKILL under load and its
/// data directory deleted, then a new worker on an empty one. Once, a log
/// server is lost with its store while the worker runs. Every key ends
/// with exactly the counts 1..n.
#[test]
fn a_worker_that_loses_its_data_directory_loses_nothing() {
    let s = Scratch::new();
    let mut nats = Nats::start(s.dir.path(), 3);
    let topo = count_pipeline(
        &s,
        &format!(
            "shards = 4\n[state]\nlog = \"{}\"\nlog_replicas = 3",
            nats.log_url("lost")
        ),
        (RECORDS, KEYS, 5),
        "type = \"count\"",
    );
    // Paced, so that every round stops the worker mid-run: unpaced, it
    // produced thousands of records between reaching a round's target and
    // its kill, and ran out of records before the last round.
    pace_generator(&topo, 30_000);
    let (out, data) = (s.path("out.jsonl"), s.path("data"));
    let mut rng = Rng::from_env();
    let mut replayed = 0.0;
    for round in 0..ROUNDS {
        let http = format!("127.0.0.1:{}", free_port());
        let mut child = Running(
            millrace()
                .args(["run", topo.to_str().expect("path"), "--http", &http])
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn"),
        );
        let start = lines(&out).len() as u64;
        let target = start + 2_000 + rng.below(RECORDS / (ROUNDS as u64 * 2));
        if round == 1 {
            // A log server's machine is lost while the worker runs.
            let progressed = wait_until(Duration::from_secs(60), || {
                lines(&out).len() as u64 > start + 500
            });
            assert!(progressed, "round {round}: no progress");
            nats.lose(2);
        }
        let reached = wait_until(Duration::from_secs(120), || {
            lines(&out).len() as u64 >= target || child.try_wait().ok().flatten().is_some()
        });
        assert!(
            reached,
            "round {round}: no progress towards {target} records"
        );
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "round {round}: the worker stopped or finished early"
        );
        if round > 0 {
            // It started on an empty directory: everything came from the log.
            replayed += metric(&http, "millrace_log_replayed_entries_total").expect("metric");
        }
        kill9(&mut child);
        if round == 1 {
            nats.restart(2);
        }
        std::fs::remove_dir_all(&data).expect("delete the data directory");
    }
    assert!(replayed > 0.0, "no worker rebuilt anything from the log");
    let last = run_to_end(&topo, Duration::from_secs(300));
    assert!(
        last.status.success(),
        "{}",
        String::from_utf8_lossy(&last.stderr)
    );
    assert_exact(&out, (RECORDS, KEYS, 5));
}

/// Workers joined through etcd, with a commit log cut below snapshots in
/// S3: a worker killed with its data directory is taken over. The
/// controller frees its shards once its lease expired, the live workers
/// claim them and rebuild them from their snapshots and the log, and the
/// dead worker comes back on an empty directory and takes a share again.
/// Twice, each time under load; every key's counts stay exactly 1..n.
#[test]
fn a_dead_workers_shards_are_taken_over_from_the_log() {
    const T: Duration = Duration::from_secs(60);
    let (records, keys) = (200_000, 50);
    let d = Joined::new("takeover", (records, keys), true);
    let (s, net) = (&d.s, &d.net);
    let join = |i: usize| d.join(i, Stdio::inherit());
    let owned = |i: usize| d.owned(i);
    // The generator, 8 count shards, the sink.
    let all = 10.0;
    // What a worker that died between writing a snapshot and recording it
    // leaves in S3: removed when the shard starts, as is any file in the
    // shard's folder that no log entry records. Snapshots go under the log
    // stream's name and creation: a deployment of the same name on another
    // log server (here: an older stream of that name) keeps its files.
    let created = connect(&d.log, Duration::from_secs(10))
        .expect("the log")
        .created()
        .to_owned();
    let s3 = d.s3.as_ref().expect("snapshots in S3");
    let orphan = |shard: &str| {
        format!("millrace/takeover-{created}/{shard}/00000000000000000001-00000000000000ff.shard")
    };
    let other = "millrace/takeover-0/counts.0/00000000000000000001-00000000000000ff.shard";
    for key in (0..8)
        .map(|i| orphan(&format!("counts.{i}")))
        .chain([other.to_owned()])
    {
        s3.put("snapshots", &key, b"not a shard".to_vec());
    }
    let mut workers: Vec<Running> = (0..3).map(join).collect();
    assert!(
        wait_until(T, || (0..3).map(owned).sum::<f64>() == all),
        "the three workers claimed every shard"
    );
    for i in 0..8 {
        let key = orphan(&format!("counts.{i}"));
        assert_eq!(
            s3.get("snapshots", &key),
            None,
            "{key} was removed at the shard's start"
        );
    }
    assert!(
        s3.get("snapshots", other).is_some(),
        "another deployment's file stays"
    );
    let out = s.path("out.jsonl");
    let mut taken_over = Vec::new();
    let (mut replayed, mut loaded) = (0.0, 0.0);
    for victim in [2, 1] {
        let before = lines(&out).len();
        assert!(
            wait_until(T, || lines(&out).len() > before + 5_000),
            "progress before killing w{victim}"
        );
        assert!(owned(victim) > 0.0, "w{victim} runs shards when it dies");
        kill9(&mut workers[victim]);
        std::fs::remove_dir_all(s.path("data").join(&net.ids[victim])).expect("rm -rf");
        let killed = Instant::now();
        let live: Vec<usize> = (0..3).filter(|&i| i != victim).collect();
        assert!(
            wait_until(T, || live.iter().map(|&i| owned(i)).sum::<f64>() == all),
            "the live workers took over every shard of w{victim}"
        );
        taken_over.push(killed.elapsed());
        let sum = |series: &str| {
            live.iter()
                .map(|&i| metric(&net.http[i], series).unwrap_or(0.0))
                .sum::<f64>()
        };
        replayed += sum("millrace_log_replayed_entries_total");
        loaded += sum("millrace_log_snapshot_loads_total");
        workers[victim] = join(victim);
        assert!(
            wait_until(T, || owned(victim) >= 1.0),
            "w{victim}, back on an empty directory, took a share again"
        );
    }
    eprintln!("takeover, from SIGKILL to every shard running again: {taken_over:?}");
    assert!(
        loaded > 0.0,
        "the taken-over shards were loaded from their snapshots in S3"
    );
    assert!(
        replayed > 0.0,
        "the taken-over shards were rebuilt from the log"
    );
    await_exact(&out, (records, keys, 7));
}

/// A worker stopped (SIGSTOP) past its lease is taken over like a dead
/// one; woken (SIGCONT), its next append to the log is refused: it drops
/// that turn unreleased and the shards it ran, says so, counts it, and goes
/// on without a restart: it joins again and takes a share like any worker.
/// Every key's counts stay exactly 1..n.
#[test]
fn a_worker_woken_after_its_takeover_is_fenced_off_by_the_log() {
    const T: Duration = Duration::from_secs(60);
    let (records, keys) = (150_000, 50);
    let d = Joined::new("zombie", (records, keys), false);
    let s = &d.s;
    let join = |i: usize, stderr: Stdio| d.join(i, stderr);
    let owned = |i: usize| d.owned(i);
    let all = 10.0;
    let zombie_log = s.path("zombie.log");
    // The zombie is w2, with count shards only: a file sink woken with it
    // would append to the one output file before its commit is refused
    // (the file sink is machine-local; see the README).
    let mut workers = vec![join(0, Stdio::inherit()), join(1, Stdio::inherit())];
    assert!(
        wait_until(T, || owned(0) + owned(1) == all),
        "two workers claimed every shard"
    );
    let mut zombie = join(
        2,
        Stdio::from(std::fs::File::create(&zombie_log).expect("log file")),
    );
    assert!(
        wait_until(T, || owned(2) >= 2.0),
        "w2 took a share of the counts"
    );
    let out = s.path("out.jsonl");
    let before = lines(&out).len();
    assert!(
        wait_until(T, || lines(&out).len() > before + 3_000),
        "progress"
    );
    let pid = zombie.id() as i32;
    // SAFETY: signals to a child this test started and still holds.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    assert!(
        wait_until(T, || owned(0) + owned(1) == all),
        "w0 and w1 took over the shards of the stopped w2"
    );
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let zombie_http = &d.net.http[2];
    assert!(
        wait_until(T, || {
            metric(zombie_http, "millrace_log_fenced_total").unwrap_or(0.0) >= 1.0
        }),
        "the woken worker's append was refused and counted"
    );
    assert!(
        wait_until(T, || owned(2) >= 1.0
            && owned(0) + owned(1) + owned(2) == all),
        "w2, joined again, took a share, and every shard runs once"
    );
    assert!(
        zombie.try_wait().expect("try_wait").is_none(),
        "the woken worker went on"
    );
    let said = std::fs::read_to_string(&zombie_log).unwrap_or_default();
    assert!(
        said.contains("another worker has taken the shard over")
            && said.contains("fenced off by the commit log"),
        "the woken worker said what happened: {said}"
    );
    await_exact(&out, (records, keys, 7));
    assert!(
        zombie.try_wait().expect("try_wait").is_none(),
        "the woken worker ran to the end"
    );
    workers.push(zombie);
}

/// With snapshots, the log stays small however much goes through it: each
/// shard's log is cut below its last snapshot. A worker whose data
/// directory is then lost rebuilds from the snapshots and the rest of the
/// log, and delivers nothing again.
#[test]
fn with_snapshots_the_log_stays_bounded_and_rebuilds_a_lost_worker() {
    let s = Scratch::new();
    let nats = Nats::start(s.dir.path(), 1);
    let state = format!(
        "log = \"{}\"\nlog_replicas = 1\nsnapshots = \"file://{}\"\nsnapshot_log_bytes = 65536",
        nats.log_url("bounded"),
        s.path("snapshots").display()
    );
    let records = 300_000;
    let topo = count_pipeline(
        &s,
        &format!("shards = 4\n[state]\n{state}"),
        (records, 5_000, 3),
        "type = \"count\"",
    );
    let out = s.path("out.jsonl");
    let http = format!("127.0.0.1:{}", free_port());
    let mut worker = spawn(&topo, &http);
    // The worker exits once everything is delivered: its figures are the
    // last ones read before.
    let (mut appended, mut taken) = (0.0, 0.0);
    let mut status = serde_json::Value::Null;
    let done = wait_until(Duration::from_secs(300), || {
        if let Some(b) = metric(&http, "millrace_log_bytes_total") {
            appended = b;
            taken = metric(&http, "millrace_log_snapshots_total").unwrap_or(taken);
            if let Some((200, body)) = http_get(&http, "/status") {
                status = serde_json::from_str(&body).unwrap_or(status.clone());
            }
        }
        lines(&out).len() as u64 >= records
    });
    assert!(
        done,
        "the output reached {} of {records} records",
        lines(&out).len()
    );
    let _ = wait_exit(&mut worker, Duration::from_secs(60));
    let pairs = read_jsonl(&out);
    assert_eq!(
        assert_running_counts(&pairs),
        generator_key_counts(records, 5_000, 3)
    );
    let (messages, bytes, _) = nats.stream_state("millrace-bounded");
    // Six shards (the generator, 4 counts, the sink), each cut below a
    // snapshot taken every 64 KiB of its log.
    eprintln!("log: {appended} bytes appended, {bytes} bytes in {messages} entries kept, {taken} snapshots");
    // `/status` showed each shard's place in the log and its last snapshot.
    let shards = status["commit_log"]["shards"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let names: Vec<&str> = shards.iter().filter_map(|s| s["shard"].as_str()).collect();
    assert_eq!(
        names,
        ["gen.0", "counts.0", "counts.1", "counts.2", "counts.3", "out.0"],
        "{status}"
    );
    assert!(
        shards.iter().all(|s| s["seq"].as_u64() > Some(0)),
        "{status}"
    );
    assert!(
        shards.iter().any(|s| s["snapshot_seq"].as_u64() > Some(0)),
        "{status}"
    );
    assert_eq!(
        status["commit_log"]["log"].as_str(),
        Some(nats.log_url("bounded").as_str()),
        "{status}"
    );
    assert!(status["commit_log"]["waiting"].is_null(), "{status}");
    assert!(taken >= 4.0, "{taken} snapshots");
    assert!(
        bytes < 2 << 20 && (bytes as f64) < appended / 5.0,
        "the log holds {bytes} bytes in {messages} entries, of {appended} appended"
    );
    // Under the stream's name and creation.
    let folder = std::fs::read_dir(s.path("snapshots"))
        .expect("snapshots")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find(|n| n.starts_with("bounded-"))
        .expect("a folder bounded-CREATED");
    let snapshots: Vec<_> = std::fs::read_dir(s.path("snapshots").join(folder).join("counts.0"))
        .expect("counts.0 has snapshots")
        .collect();
    assert_eq!(
        snapshots.len(),
        1,
        "only the last snapshot of a shard is kept"
    );
    // The machine is lost: the worker starts again on an empty directory.
    std::fs::remove_dir_all(s.path("data")).expect("rm -rf");
    let again = run_to_end(&topo, Duration::from_secs(120));
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(
        read_jsonl(&out),
        pairs,
        "rebuilt from the snapshots: nothing delivered again"
    );
}

/// A log that comes back empty (its server's store lost) is not taken for
/// this deployment's: the worker refuses to start, says why, and changes
/// nothing; the output stays as it was.
#[test]
fn a_log_that_comes_back_empty_is_refused() {
    let s = Scratch::new();
    let mut nats = Nats::start(s.dir.path(), 1);
    let topo = count_pipeline(
        &s,
        &format!(
            "shards = 2\n[state]\nlog = \"{}\"\nlog_replicas = 1",
            nats.log_url("empty")
        ),
        (20_000, 100, 9),
        "type = \"count\"",
    );
    let first = run_to_end(&topo, Duration::from_secs(120));
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let out = s.path("out.jsonl");
    let before = std::fs::read(&out).expect("output");
    nats.lose(0);
    nats.restart(0);
    // However often it is tried (a service manager restarts it): a refused
    // start appends nothing, so the log never grows back past what the
    // directory applied.
    for _ in 0..3 {
        let again = run_to_end(&topo, Duration::from_secs(60));
        let said = String::from_utf8_lossy(&again.stderr);
        assert!(!again.status.success(), "started on an empty log: {said}");
        assert!(
            said.contains("the log lost entries") && said.contains("or is not this deployment's"),
            "{said}"
        );
        assert_eq!(
            std::fs::read(&out).expect("output"),
            before,
            "the output changed"
        );
        let (messages, _, _) = nats.stream_state("millrace-empty");
        assert_eq!(
            messages, 1,
            "nothing but the deployment's shard layout was appended"
        );
    }
}

/// A log holds one shard layout: a worker whose topology has another
/// `engine.shards` than the one the log was written with is refused before
/// it reads anything (read into another layout, each shard would take a
/// part of another's keys), and appends nothing.
#[test]
fn a_log_is_read_only_with_the_shard_layout_it_was_written_with() {
    let s = Scratch::new();
    let nats = Nats::start(s.dir.path(), 1);
    let engine = |shards: u32| {
        format!(
            "shards = {shards}\n[state]\nlog = \"{}\"\nlog_replicas = 1",
            nats.log_url("layout")
        )
    };
    let topo = count_pipeline(&s, &engine(2), (5_000, 100, 5), "type = \"count\"");
    let first = run_to_end(&topo, Duration::from_secs(120));
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert_exact(&s.path("out.jsonl"), (5_000, 100, 5));
    let (before, _, _) = nats.stream_state("millrace-layout");
    // Another directory (a lost machine's replacement), another layout.
    let other = Scratch::new();
    let four = count_pipeline(&other, &engine(4), (5_000, 100, 5), "type = \"count\"");
    let refused = run_to_end(&four, Duration::from_secs(60));
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "started in another layout: {said}"
    );
    assert!(
        said.contains("other shard counts") && said.contains("engine.shards: 2 there, 4 here"),
        "{said}"
    );
    assert_eq!(
        nats.stream_state("millrace-layout").0,
        before,
        "the refused start appended nothing"
    );
}

/// The only log server restarts at once: the worker goes on. It is then
/// down for longer than `log_timeout`: the worker
/// retries, then stops with an error naming the log; nothing it did
/// without the log was released. Started again once the server is back,
/// it finishes with exactly the counts 1..n.
#[test]
fn a_log_down_past_its_timeout_stops_the_worker_and_a_restart_finishes_exactly() {
    let s = Scratch::new();
    let mut nats = Nats::start(s.dir.path(), 1);
    let (records, keys) = (60_000, 500);
    let topo = with_rate(
        &count_pipeline(
            &s,
            &format!(
                "shards = 2\n[state]\nlog = \"{}\"\nlog_replicas = 1\nlog_timeout = \"4s\"",
                nats.log_url("down")
            ),
            (records, keys, 4),
            "type = \"count\"",
        ),
        20_000,
    );
    let out = s.path("out.jsonl");
    let log_file = s.path("worker.log");
    let http = format!("127.0.0.1:{}", free_port());
    let mut worker = Running(
        millrace()
            .args(["run", topo.to_str().expect("path"), "--http", &http])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_file).expect("log file"))
            .spawn()
            .expect("spawn"),
    );
    assert!(
        wait_until(Duration::from_secs(60), || lines(&out).len() > 5_000),
        "progress before the log goes down"
    );
    // A server that restarts at once costs the appends under way a new
    // attempt over the reconnected client, not the worker.
    nats.kill(0);
    nats.restart(0);
    let back = lines(&out).len();
    assert!(
        wait_until(Duration::from_secs(30), || lines(&out).len() > back + 5_000),
        "progress after the log server restarted: {}",
        std::fs::read_to_string(&log_file).unwrap_or_default()
    );
    assert!(
        worker.try_wait().expect("try_wait").is_none(),
        "the worker stopped over a restart of its log server: {}",
        std::fs::read_to_string(&log_file).unwrap_or_default()
    );
    let health = || http_get(&http, "/healthz");
    assert!(
        wait_until(Duration::from_secs(30), || health()
            .is_some_and(|(code, _)| code == 200)),
        "healthy again once the log answers: {:?}",
        health()
    );
    nats.kill(0);
    let stopped = Instant::now();
    // While the commits wait for the log, `/healthz` says so.
    let mut seen = None;
    wait_until(Duration::from_secs(30), || {
        seen = health().filter(|(code, body)| *code == 503 && body.contains("commit log"));
        seen.is_some() || worker.try_wait().ok().flatten().is_some()
    });
    assert!(seen.is_some(), "/healthz did not report the log down");
    let status = wait_exit(&mut worker, Duration::from_secs(60));
    let said = std::fs::read_to_string(&log_file).unwrap_or_default();
    assert!(
        !status.success(),
        "the worker went on without its log: {said}"
    );
    assert!(said.contains("commit log"), "{said}");
    eprintln!("stopped {:?} after the log went down", stopped.elapsed());
    nats.restart(0);
    let last = run_to_end(&topo, Duration::from_secs(120));
    assert!(
        last.status.success(),
        "{}",
        String::from_utf8_lossy(&last.stderr)
    );
    assert_exact(&out, (records, keys, 4));
}

/// The log stays flat over a long run with snapshots on: records flow at a
/// steady rate for `MILLRACE_SOAK_SECS` (default 600), and every 30 s the
/// bytes the log keeps are read from the log server. Past the first
/// snapshots, they never exceed what six shards' logs hold between two
/// snapshots, however much was appended; at the end every key's counts are
/// exactly 1..n. Long: run with `cargo test --test commit_log
/// the_log_stays_flat -- --ignored --nocapture` (docs/PERFORMANCE.md has
/// its figures).
#[test]
#[ignore = "runs for ten minutes"]
fn the_log_stays_flat_over_a_long_run_with_snapshots() {
    let secs: u64 = std::env::var("MILLRACE_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let (rate, keys, seed) = (10_000, 5_000, 11);
    let records = rate * secs;
    let every: u64 = 256 << 10;
    let s = Scratch::new();
    let nats = Nats::start(s.dir.path(), 1);
    let topo = with_rate(
        &count_pipeline(
            &s,
            &format!(
                "shards = 4\n[state]\nlog = \"{}\"\nlog_replicas = 1\nsnapshots = \"file://{}\"\n\
                 snapshot_log_bytes = {every}",
                nats.log_url("soak"),
                s.path("snapshots").display()
            ),
            (records, keys, seed),
            "type = \"count\"",
        ),
        rate,
    );
    let out = s.path("out.jsonl");
    let http = format!("127.0.0.1:{}", free_port());
    let mut worker = spawn(&topo, &http);
    let started = Instant::now();
    // (seconds, bytes appended so far, bytes and entries the log keeps)
    let mut samples: Vec<(u64, f64, u64, u64)> = Vec::new();
    let mut next = Duration::from_secs(30);
    // The worker exits once everything is delivered (reading the growing
    // output to find out would cost more than the run).
    let mut exited = None;
    let done = wait_until(Duration::from_secs(secs + 300), || {
        if started.elapsed() >= next {
            next += Duration::from_secs(30);
            if let Some(appended) = metric(&http, "millrace_log_bytes_total") {
                let (messages, bytes, _) = nats.stream_state("millrace-soak");
                let at = started.elapsed().as_secs();
                eprintln!("{at:>5} s: {appended:>12} bytes appended, {bytes:>9} bytes in {messages:>5} entries kept");
                samples.push((at, appended, bytes, messages));
            }
        }
        exited = worker.try_wait().expect("try_wait");
        exited.is_some()
    });
    if !done {
        let _ = worker.kill();
    }
    assert!(
        done && exited.is_some_and(|e| e.success()),
        "the worker did not finish within {} s: {exited:?}",
        secs + 300
    );
    assert_exact(&out, (records, keys, seed));
    // Between two snapshots a shard's log holds up to `every` bytes, and
    // one turn's entry more; six shards (the generator, 4 counts, the
    // sink), with room for headers and a cut that lags a turn.
    let bound = 6 * (every + (256 << 10)) * 2;
    let settled: Vec<_> = samples.iter().filter(|s| s.0 >= 60.min(secs / 2)).collect();
    assert!(
        settled.len() as u64 >= (secs.saturating_sub(60) / 30).saturating_sub(2),
        "samples every 30 s: {samples:?}"
    );
    let last = settled.last().expect("a sample after the first minute");
    assert!(
        last.1 > 10.0 * bound as f64,
        "the run appended far more than the log may keep: {samples:?}"
    );
    for (at, appended, bytes, messages) in &settled {
        assert!(
            *bytes <= bound,
            "at {at} s the log kept {bytes} bytes in {messages} entries (of {appended} appended), more than {bound}"
        );
    }
}
