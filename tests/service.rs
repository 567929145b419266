//! The worker as a service: unbounded sources, SIGTERM drains, restarts on
//! the same data dir, bad records, backpressure, and the HTTP endpoints.

mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpListener;
use std::time::Duration;
use support::*;

const T: Duration = Duration::from_secs(60);

#[test]
fn socket_source_then_sigterm_drains_and_exits_zero() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        for i in 0..500 {
            writeln!(
                conn,
                "red green {}",
                if i % 2 == 0 { "blue" } else { "red" }
            )
            .expect("write");
        }
        conn.flush().expect("flush");
        // Keep the connection open until the worker is stopped.
        let mut buf = [0u8; 1];
        let _ = std::io::Read::read(&mut conn, &mut buf);
    });
    let s = Scratch::new();
    let topo = s.write(
        "sock.toml",
        &format!(
            r#"
[service]
data_dir = "{{dir}}/data"
[sources.sock]
type = "socket"
address = "{addr}"
[computations.words]
type = "split"
inputs = ["sock"]
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
    let mut child = spawn(&topo, "off");
    let out = s.path("out.jsonl");
    assert!(
        wait_until(T, || lines(&out).len() >= 1500),
        "all 1500 words counted"
    );
    term(&child);
    let status = wait_exit(&mut child, T);
    assert!(status.success(), "SIGTERM exits 0, got {status:?}");
    let counts = assert_running_counts(&read_jsonl(&out));
    assert_eq!(counts.get("red"), Some(&750));
    assert_eq!(counts.get("green"), Some(&500));
    assert_eq!(counts.get("blue"), Some(&250));
    drop(server);
}

#[test]
fn watched_directory_picks_up_new_files_across_kills() {
    let s = Scratch::new();
    let input = s.path("in");
    std::fs::create_dir(&input).expect("mkdir");
    let add = |name: &str, from: usize, to: usize| {
        let body: String = (from..to).map(|i| format!("line {i}\n")).collect();
        let tmp = input.join(format!(".{name}"));
        std::fs::write(&tmp, body).expect("write");
        std::fs::rename(&tmp, input.join(name)).expect("rename");
    };
    add("001.txt", 0, 1000);
    let topo = s.write(
        "watch.toml",
        r#"
[service]
data_dir = "{dir}/data"
[sources.files]
type = "file"
path = "{dir}/in"
watch = true
[sinks.out]
type = "file"
inputs = ["files"]
path = "{dir}/out.txt"
format = "text"
"#,
    );
    let out = s.path("out.txt");
    let mut child = spawn(&topo, "off");
    assert!(wait_until(T, || lines(&out).len() >= 1000));
    add("002.txt", 1000, 3000);
    assert!(wait_until(T, || lines(&out).len() >= 1500));
    kill9(&mut child);
    let mut child = spawn(&topo, "off");
    add("003.txt", 3000, 4000);
    assert!(wait_until(T, || lines(&out).len() >= 4000));
    term(&child);
    assert!(wait_exit(&mut child, T).success());

    let got: Vec<String> = lines(&out)
        .into_iter()
        .map(|l| l.split_once('\t').expect("key<TAB>value").1.to_owned())
        .collect();
    let want: Vec<String> = (0..4000).map(|i| format!("line {i}")).collect();
    assert_eq!(got, want, "each line once, in file order");
}

#[test]
fn bad_records_are_counted_and_routed_to_the_errors_output() {
    let s = Scratch::new();
    let input = s.path("in");
    std::fs::create_dir(&input).expect("mkdir");
    std::fs::write(input.join("a.txt"), "1\nnot a number\n2\n40\n").expect("write");
    let port = free_port();
    let topo = s.write(
        "bad.toml",
        r#"
[service]
data_dir = "{dir}/data"
[sources.nums]
type = "file"
path = "{dir}/in"
watch = true
[computations.total]
type = "reduce"
inputs = ["nums"]
op = "sum"
[sinks.out]
type = "file"
inputs = ["total"]
path = "{dir}/out.txt"
format = "text"
[sinks.rejected]
type = "file"
inputs = ["total.errors"]
path = "{dir}/rejected.txt"
format = "text"
"#,
    );
    let addr = format!("127.0.0.1:{port}");
    let mut child = spawn(&topo, &addr);
    let out = s.path("out.txt");
    assert!(wait_until(T, || lines(&out).len() >= 3
        && !lines(&s.path("rejected.txt")).is_empty()));
    let values: Vec<String> = lines(&out)
        .iter()
        .map(|l| l.split('\t').nth(1).unwrap_or("").to_owned())
        .collect();
    assert_eq!(values, ["1", "3", "43"]);
    assert_eq!(lines(&s.path("rejected.txt")), ["a.txt\tnot a number"]);

    let (code, health) = http_get(&addr, "/healthz").expect("healthz");
    assert_eq!((code, health.trim()), (200, "ok"));
    let (code, metrics) = http_get(&addr, "/metrics").expect("metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("millrace_bad_records_total{component=\"total\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("millrace_records_in_total{component=\"nums\"} 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains("millrace_records_in_total{component=\"out\"} 3"),
        "{metrics}"
    );
    let (code, status) = http_get(&addr, "/status").expect("status");
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&status).expect("status is JSON");
    let names: Vec<&str> = status["components"]
        .as_array()
        .expect("components")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, ["nums", "total", "out", "rejected"]);
    term(&child);
    assert!(wait_exit(&mut child, T).success());
}

#[test]
fn a_source_faster_than_its_consumers_is_held_to_max_backlog() {
    const MAX_BACKLOG: i64 = 200;
    let s = Scratch::new();
    let port = free_port();
    let topo = s.write(
        "bp.toml",
        &format!(
            r#"
[service]
data_dir = "{{dir}}/data"
[engine]
shards = 4
max_backlog = {MAX_BACKLOG}
channel_window = 16
batch_size = 64
[sources.gen]
type = "generator"
keys = 100
[computations.counts]
type = "count"
inputs = ["gen"]
[sinks.out]
type = "file"
inputs = ["counts"]
path = "{{dir}}/out.jsonl"
"#
        ),
    );
    let addr = format!("127.0.0.1:{port}");
    let mut child = spawn(&topo, &addr);
    let mut samples = 0;
    let mut last_in = 0;
    let ok = wait_until(T, || {
        let Some((200, body)) = http_get(&addr, "/status") else {
            return false;
        };
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        let comps = v["components"].as_array().expect("components").clone();
        let get = |name: &str, field: &str| {
            comps
                .iter()
                .find(|c| c["name"] == name)
                .and_then(|c| c[field].as_i64())
                .unwrap_or_else(|| panic!("/status has no {field} for {name}"))
        };
        // max_backlog bounds each shard: gen has one, counts four.
        for (c, shards) in [("gen", 1), ("counts", 4)] {
            let backlog = get(c, "backlog");
            assert!(
                backlog <= shards * MAX_BACKLOG,
                "{c} backlog {backlog} > {shards} x {MAX_BACKLOG}"
            );
        }
        // Everything between source and sink is some shard's backlog.
        let in_flight = get("gen", "records_in") - get("out", "records_in");
        assert!(
            in_flight <= 5 * MAX_BACKLOG,
            "{in_flight} records between source and sink"
        );
        if get("gen", "records_in") > last_in {
            last_in = get("gen", "records_in");
            samples += 1;
        }
        samples >= 20
    });
    assert!(ok, "the source kept making progress while bounded");
    term(&child);
    assert!(wait_exit(&mut child, T).success());
}

#[test]
fn a_damaged_data_dir_is_refused_and_the_output_kept() {
    let s = Scratch::new();
    std::fs::write(s.path("in.txt"), "a\nb\na\n").expect("write");
    let topo = s.write(
        "t.toml",
        r#"
[service]
data_dir = "{dir}/data"
[sources.lines]
type = "file"
path = "{dir}/in.txt"
[computations.counts]
type = "count"
inputs = [{ from = "lines", key = "value" }]
[sinks.out]
type = "file"
inputs = ["counts"]
path = "{dir}/out.jsonl"
"#,
    );
    let out = run_to_end(&topo, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let written = std::fs::read(s.path("out.jsonl")).expect("output");
    assert_eq!(written.iter().filter(|b| **b == b'\n').count(), 3);
    // The MANIFEST cut to its first 60 bytes: RocksDB alone would open an
    // empty database, and the sink would cut its file to what that says.
    let data = s.path("data");
    let current = std::fs::read_to_string(data.join("CURRENT")).expect("CURRENT");
    let manifest = data.join(current.trim());
    let text = std::fs::read(&manifest).expect("MANIFEST");
    std::fs::write(&manifest, &text[..60]).expect("cut");
    let out = run_to_end(&topo, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is damaged"), "{stderr}");
    assert!(stderr.contains("Recovering a data directory"), "{stderr}");
    assert_eq!(std::fs::read(s.path("out.jsonl")).expect("output"), written);
}

/// generator (`count` records over 500 keys) -> count -> file sink.
fn counting(s: &Scratch, count: u64) -> std::path::PathBuf {
    count_pipeline(s, "shards = 4", (count, 500, 4), "type = \"count\"")
}

/// Productions left in each component's outbox, from `millrace inspect`.
fn outboxes(s: &Scratch) -> BTreeMap<String, u64> {
    let out = millrace()
        .args(["inspect", s.path("data").to_str().expect("utf-8"), "--json"])
        .output()
        .expect("inspect");
    assert!(out.status.success(), "{out:?}");
    let data: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect json");
    data["components"]
        .as_object()
        .expect("components")
        .iter()
        .map(|(name, c)| (name.clone(), c["outbox"].as_u64().expect("outbox count")))
        .collect()
}

/// Starts the pipeline and sends SIGTERM once a tenth of the output is
/// written, mid-stream; returns the exit status.
fn sigterm_mid_stream(s: &Scratch, topo: &std::path::Path, drain_timeout: &str) -> bool {
    let mut child = Running(
        millrace()
            .args(["run", topo.to_str().expect("utf-8"), "--http", "off"])
            .args(["--drain-timeout", drain_timeout])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("spawn"),
    );
    let out = s.path("out.jsonl");
    assert!(wait_until(T, || file_len(&out) > 1_000_000 / 10 * 30));
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "ended before the signal"
    );
    term(&child);
    wait_exit(&mut child, T).success()
}

#[test]
fn sigterm_mid_stream_drains_every_outbox_and_a_restart_is_exact() {
    let s = Scratch::new();
    let topo = counting(&s, 1_000_000);
    assert!(sigterm_mid_stream(&s, &topo, "30s"));
    let partial = read_jsonl(&s.path("out.jsonl")).len();
    assert!(partial < 1_000_000, "the signal came after the end");
    assert!(outboxes(&s).values().all(|n| *n == 0), "{:?}", outboxes(&s));
    let out = run_to_end(&topo, T);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let counts = assert_running_counts(&read_jsonl(&s.path("out.jsonl")));
    assert_eq!(counts, generator_key_counts(1_000_000, 500, 4));
}

#[test]
fn a_drain_cut_short_leaves_the_outbox_to_the_next_start() {
    let s = Scratch::new();
    let topo = counting(&s, 1_000_000);
    // No time to drain: what is in flight stays in the outbox.
    assert!(sigterm_mid_stream(&s, &topo, "0s"));
    let left: u64 = outboxes(&s).values().sum();
    assert!(left > 0, "nothing was left in flight");
    let out = run_to_end(&topo, T);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let counts = assert_running_counts(&read_jsonl(&s.path("out.jsonl")));
    assert_eq!(counts, generator_key_counts(1_000_000, 500, 4));
}

/// A small filesystem of its own, unmounted when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(at: std::path::PathBuf, size: &str) -> SmallDisk {
        std::fs::create_dir_all(&at).expect("mkdir");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&at)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "this test mounts a small tmpfs and needs root (CI runs as root): {status}"
        );
        SmallDisk(at)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_stops_the_worker_with_a_clear_error_not_an_abort() {
    let s = Scratch::new();
    let disk = SmallDisk::mount(s.path("disk"), "12m");
    let topo = s.write(
        "full.toml",
        &format!(
            r#"
[service]
data_dir = "{disk}/data"
[sources.gen]
type = "generator"
keys = 1000000
[computations.counts]
type = "count"
inputs = ["gen"]
[sinks.out]
type = "file"
inputs = ["counts"]
path = "{disk}/out.jsonl"
"#,
            disk = disk.0.display()
        ),
    );
    for _ in 0..3 {
        let _ = std::fs::remove_dir_all(disk.0.join("data"));
        let _ = std::fs::remove_file(disk.0.join("out.jsonl"));
        let out = run_to_end(&topo, T);
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Exit code 1 with the error, not SIGABRT (no code).
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("No space left on device"), "{stderr}");
    }
    drop(disk);
}
