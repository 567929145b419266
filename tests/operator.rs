//! Operator tools: `graph`, `inspect`, `tap`, and a real Prometheus scraping
//! a running worker.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;
use support::*;

const T: Duration = Duration::from_secs(60);

fn line_count(p: &std::path::Path) -> usize {
    lines(p).len()
}

/// A watched directory (so the worker keeps running) with `n` lines in one file.
fn watched_topology(s: &Scratch, n: usize) -> std::path::PathBuf {
    let input = s.path("in");
    std::fs::create_dir(&input).expect("mkdir");
    let body: String = (0..n).map(|i| format!("w{}\n", i % 7)).collect();
    std::fs::write(input.join("a.txt"), body).expect("write");
    s.write(
        "t.toml",
        r#"
[service]
data_dir = "{dir}/data"
[engine]
shards = 4
[sources.files]
type = "file"
path = "{dir}/in"
watch = true
[computations.counts]
type = "count"
inputs = [{ from = "files", key = "value" }]
[sinks.out]
type = "file"
inputs = ["counts"]
path = "{dir}/out.jsonl"
"#,
    )
}

#[test]
fn graph_prints_the_topology_as_dot() {
    let s = Scratch::new();
    let topo = watched_topology(&s, 1);
    let out = millrace().arg("graph").arg(&topo).output().expect("graph");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dot = String::from_utf8_lossy(&out.stdout);
    assert!(dot.starts_with("digraph millrace {"), "{dot}");
    assert!(
        dot.contains("\"files\" [shape=invhouse, label=\"files\\nfile\"];"),
        "{dot}"
    );
    assert!(
        dot.contains("\"files\" -> \"counts\" [label=\"key=value\"];"),
        "{dot}"
    );
    assert!(dot.contains("\"counts\" -> \"out\";"), "{dot}");
    assert!(dot.trim_end().ends_with('}'));
}

#[test]
fn inspect_shows_stored_data_and_one_keys_state() {
    let s = Scratch::new();
    let topo = watched_topology(&s, 700);
    let mut child = spawn(&topo, "off");
    assert!(wait_until(T, || line_count(&s.path("out.jsonl")) >= 700));
    let data = s.path("data");
    // Beside the running worker, read-only.
    let out = millrace()
        .arg("inspect")
        .arg(&data)
        .output()
        .expect("inspect");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    let counts = table
        .lines()
        .find(|l| l.starts_with("counts "))
        .unwrap_or_else(|| panic!("{table}"));
    let cols: Vec<&str> = counts.split_whitespace().collect();
    assert_eq!(cols[2], "7", "seven keys with state: {table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("files ") && l.contains("position")),
        "{table}"
    );

    let out = millrace()
        .arg("inspect")
        .arg(&data)
        .args(["--component", "counts", "--key", "w3"])
        .output()
        .expect("inspect --key");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "100",
        "w3 appears 100 times in 700 lines"
    );
    term(&child);
    assert!(wait_exit(&mut child, T).success());
}

#[test]
fn tap_streams_the_records_leaving_a_component() {
    let s = Scratch::new();
    let topo = watched_topology(&s, 10);
    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = spawn(&topo, &addr);
    assert!(wait_until(T, || line_count(&s.path("out.jsonl")) >= 10));
    let tap = millrace()
        .args(["tap", &addr, "counts", "--limit", "3"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("tap");
    // Records written after the tap is attached show up in it.
    assert!(wait_until(T, || {
        http_get(&addr, "/metrics")
            .is_some_and(|(_, m)| m.contains("millrace_records_in_total{component=\"files\"} 10"))
    }));
    let mut n = 10;
    let output = {
        let mut tap = tap;
        let done = wait_until(T, || {
            std::fs::write(s.path("in").join(format!("b{n:05}.txt")), "w1\n").expect("write");
            n += 1;
            tap.try_wait().expect("try_wait").is_some()
        });
        assert!(done, "tap printed 3 records");
        tap.wait_with_output().expect("tap output")
    };
    let text = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 3);
    assert!(lines.iter().all(|l| l["key"] == "w1"), "{text}");
    let (code, _) = http_get(&addr, "/tap?component=nope").expect("tap nope");
    assert_eq!(code, 404);
    term(&child);
    assert!(wait_exit(&mut child, T).success());
}

#[test]
fn tap_sends_the_token_a_worker_asks_for() {
    let s = Scratch::new();
    let topo = watched_topology(&s, 10);
    let text = std::fs::read_to_string(&topo).expect("topology");
    std::fs::write(
        &topo,
        text.replace("[service]\n", "[service]\nhttp_token = \"tap-token\"\n"),
    )
    .expect("write");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = spawn(&topo, &addr);
    assert!(wait_until(T, || line_count(&s.path("out.jsonl")) >= 10));

    let refused = millrace()
        .args(["tap", &addr, "counts", "--limit", "1"])
        .env_remove("MILLRACE_HTTP_TOKEN")
        .output()
        .expect("tap without the token");
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("401"), "{err}");

    let tap = millrace()
        .args(["tap", &addr, "counts", "--limit", "1"])
        .env("MILLRACE_HTTP_TOKEN", "tap-token")
        .stdout(Stdio::piped())
        .spawn()
        .expect("tap");
    let mut tap = tap;
    let mut n = 0;
    let done = wait_until(T, || {
        std::fs::write(s.path("in").join(format!("b{n:05}.txt")), "w1\n").expect("write");
        n += 1;
        tap.try_wait().expect("try_wait").is_some()
    });
    assert!(done, "tap printed a record");
    let output = tap.wait_with_output().expect("tap output");
    assert!(output.status.success());
    let line: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&output.stdout).trim()).expect("a JSON line");
    assert_eq!(line["key"], "w1");
    term(&child);
    assert!(wait_exit(&mut child, T).success());
}

#[test]
fn a_real_prometheus_scrapes_what_was_processed() {
    const N: usize = 1234;
    let prometheus = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("the prometheus server is not installed: `make setup` (or apt-get install prometheus) installs it");
    let s = Scratch::new();
    let topo = watched_topology(&s, N);
    let addr = format!("127.0.0.1:{}", free_port());
    let mut worker = spawn(&topo, &addr);
    assert!(wait_until(T, || line_count(&s.path("out.jsonl")) >= N));

    let prom_addr = format!("127.0.0.1:{}", free_port());
    let config = s.write(
        "prometheus.yml",
        &format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: millrace\n    static_configs:\n      - targets: ['{addr}']\n"
        ),
    );
    let mut prom = Command::new(prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", s.path("tsdb").display()))
        .arg(format!("--web.listen-address={prom_addr}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus");

    let query = |q: &str| -> Option<String> {
        let (code, body) = http_get(&prom_addr, &format!("/api/v1/query?query={q}"))?;
        if code != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["data"]["result"][0]["value"][1]
            .as_str()
            .map(str::to_owned)
    };
    let records_in = |c: &str| format!("millrace_records_in_total%7Bcomponent%3D%22{c}%22%7D");
    let scraped = wait_until(T, || query(&records_in("files")).as_deref() == Some("1234"));
    let sink_in = query(&records_in("out"));
    let up = query("up%7Bjob%3D%22millrace%22%7D");
    let commits = query("millrace_commit_duration_seconds_count");
    let (_, exported) = http_get(&addr, "/metrics").expect("metrics");
    let _ = prom.kill();
    let _ = prom.wait();
    term(&worker);
    assert!(wait_exit(&mut worker, T).success());

    assert!(scraped, "Prometheus saw {N} records in at the source");
    assert_eq!(sink_in.as_deref(), Some("1234"), "and {N} at the sink");
    assert_eq!(up.as_deref(), Some("1"));
    assert!(commits
        .and_then(|c| c.parse::<u64>().ok())
        .is_some_and(|c| c > 0));

    // Every series the Grafana dashboard plots is one the worker exports.
    let root = env!("CARGO_MANIFEST_DIR");
    let dashboard = std::fs::read_to_string(format!("{root}/deploy/grafana-dashboard.json"))
        .expect("dashboard");
    let mut names: Vec<&str> = dashboard
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("millrace_") || w.starts_with("process_"))
        .collect();
    names.sort_unstable();
    names.dedup();
    assert!(names.len() >= 10, "{names:?}");
    for name in names {
        assert!(
            exported.contains(&format!("\n{name}")),
            "the dashboard plots {name}, which /metrics lacks"
        );
    }
}
