//! Savepoints through the binary: stop a deployment mid-stream, export it
//! (offline with `millrace savepoint`, or live with `millrace stop
//! --savepoint`), and go on from the savepoint with more workers, then fewer, with exactly
//! the output an uninterrupted run gives (checked against the generator's
//! key function); and every refusal a damaged or unfitting savepoint gets.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use support::s3::S3;
use support::*;

const RECORDS: u64 = 60_000;
const KEYS: u64 = 97;
const SEED: u64 = 5;

/// generator (at `rate` records/s; 0: as fast as it goes) -> running
/// count -> file, on the workers of `cluster` (empty: one worker).
fn topology(s: &Scratch, name: &str, cluster: &str, rate: u64, counts: &str) -> PathBuf {
    let rate = if rate == 0 {
        String::new()
    } else {
        format!("rate = {rate}")
    };
    s.write(
        name,
        &format!(
            r#"
[service]
data_dir = "{{dir}}/{name}.data"
savepoint_targets = ["file://{{dir}}"]
[engine]
shards = 6
[sources.gen]
type = "generator"
count = {RECORDS}
keys = {KEYS}
seed = {SEED}
{rate}
[computations.counts]
inputs = ["gen"]
{counts}
[sinks.out]
type = "file"
inputs = ["counts"]
path = "{{dir}}/out.jsonl"
{cluster}
"#
        ),
    )
}

fn savepoint(topo: &Path, to: &str, worker: Option<&str>) -> std::process::Output {
    let mut c = millrace();
    c.args(["savepoint", topo.to_str().expect("utf-8"), "--to", to]);
    if let Some(w) = worker {
        c.args(["--worker", w]);
    }
    c.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("run millrace savepoint")
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Starts every worker of `net` from the savepoint `from`, with `env`.
fn start_from(net: &ClusterNet, topo: &Path, from: &str, env: &[(&str, String)]) -> Vec<Running> {
    (0..net.ids.len())
        .map(|i| {
            let mut c = net.command(topo, i);
            c.args(["--from-savepoint", from])
                .envs(env.iter().map(|(k, v)| (k, v)))
                .stdout(Stdio::null())
                .stderr(Stdio::inherit());
            Running(c.spawn().expect("spawn"))
        })
        .collect()
}

fn stop_mid_stream(out: &Path, workers: &mut [Running], at_least: usize) {
    let reached = wait_until(Duration::from_secs(60), || {
        for w in workers.iter_mut() {
            if let Ok(Some(status)) = w.try_wait() {
                panic!("a worker exited early: {status}");
            }
        }
        lines(out).len() >= at_least
    });
    assert!(reached, "output did not reach {at_least} lines");
    for w in workers.iter() {
        term(w);
    }
    for w in workers.iter_mut() {
        assert!(
            wait_exit(w, Duration::from_secs(30)).success(),
            "drained and exited"
        );
    }
}

#[test]
fn unfitting_or_damaged_savepoints_are_refused() {
    let s = Scratch::new();
    let count = r#"type = "count""#;
    let topo = topology(&s, "t.toml", "", 0, count);
    let mut w = spawn(&topo, "off");
    assert!(wait_exit(&mut w, Duration::from_secs(60)).success());
    let sp = s.path("sp");
    let url = format!("file://{}", sp.display());
    let o = savepoint(&topo, &url, None);
    assert!(o.status.success(), "{}", text(&o));
    // What it holds, as `inspect` shows it.
    let shown = millrace()
        .args(["inspect", &url])
        .output()
        .expect("inspect");
    let shown = text(&shown);
    assert!(shown.contains("engine.shards 6"), "{shown}");
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("counts") && l.contains("computation count")),
        "{shown}"
    );
    let json = millrace()
        .args(["inspect", &url, "--json"])
        .output()
        .expect("inspect");
    let m: serde_json::Value = serde_json::from_slice(&json.stdout).expect("manifest JSON");
    assert_eq!(
        m["shards"].as_array().map(Vec::len),
        Some(6 + 2),
        "6 count shards, gen, out"
    );

    let run = |topo: &Path, data: &str, extra: &[&str]| {
        let mut c = millrace();
        c.args([
            "run",
            topo.to_str().expect("utf-8"),
            "--http",
            "off",
            "--data-dir",
            s.path(data).to_str().expect("utf-8"),
            "--from-savepoint",
            &url,
        ]);
        c.args(extra);
        let o = c
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .expect("run");
        (o.status.success(), text(&o))
    };
    // Into a data directory that holds data.
    let (ok, why) = run(&topo, "t.toml.data", &[]);
    assert!(!ok && why.contains("already holds data"), "{why}");
    // Another shard count.
    let six_to_four = s.write(
        "four.toml",
        &std::fs::read_to_string(&topo)
            .expect("read")
            .replace("shards = 6", "shards = 4"),
    );
    let (ok, why) = run(&six_to_four, "d1", &[]);
    assert!(!ok && why.contains("engine.shards = 6"), "{why}");
    // Another kind under the same name.
    let reduce = topology(&s, "reduce.toml", "", 0, "type = \"reduce\"\nop = \"sum\"");
    let (ok, why) = run(&reduce, "d2", &[]);
    assert!(
        !ok && why.contains("cannot be read by another kind"),
        "{why}"
    );
    // A component the topology no longer has: refused, unless asked.
    let renamed = s.write(
        "renamed.toml",
        &std::fs::read_to_string(&topo)
            .expect("read")
            .replace("[computations.counts]", "[computations.tally]")
            .replace("inputs = [\"counts\"]", "inputs = [\"tally\"]"),
    );
    let (ok, why) = run(&renamed, "d3", &[]);
    assert!(!ok && why.contains("--allow-non-restored-state"), "{why}");
    let (ok, why) = run(&renamed, "d4", &["--allow-non-restored-state"]);
    assert!(ok, "{why}");
    // A damaged shard file.
    let shard = sp.join("shards/counts/0.bin");
    let mut bytes = std::fs::read(&shard).expect("shard file");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&shard, &bytes).expect("write");
    let (ok, why) = run(&topo, "d5", &[]);
    assert!(!ok && why.contains("does not match the manifest"), "{why}");
    assert!(
        !s.path("d5").exists(),
        "a refused load leaves no data directory"
    );
    // No manifest: an incomplete savepoint.
    std::fs::remove_file(sp.join("manifest.json")).expect("rm");
    let (ok, why) = run(&topo, "d6", &[]);
    assert!(!ok && why.contains("not a complete savepoint"), "{why}");
    // Exporting while a worker runs on the data directory.
    let slow = topology(&s, "slow.toml", "", 100, count);
    let http = format!("127.0.0.1:{}", free_port());
    let mut w = spawn(&slow, &http);
    assert!(wait_until(Duration::from_secs(30), || {
        http_get(&http, "/healthz").is_some_and(|(code, _)| code == 200)
    }));
    let o = savepoint(&slow, &format!("file://{}", s.path("sp3").display()), None);
    assert!(
        !o.status.success() && text(&o).contains("still running"),
        "{}",
        text(&o)
    );
    term(&w);
    assert!(wait_exit(&mut w, Duration::from_secs(30)).success());
}

/// SeaweedFS on ports no other test process holds.
fn start_s3(bucket: &str) -> S3 {
    S3::start(bucket, std::array::from_fn(|_| free_port()))
}

/// `millrace savepoint` for every worker of `net` to `to`, with `env`;
/// checks that only the last export completes the savepoint.
fn export_all(net: &ClusterNet, topo: &Path, to: &str, env: &[(&str, String)]) {
    for (i, id) in net.ids.iter().enumerate() {
        let o = millrace()
            .args([
                "savepoint",
                topo.to_str().expect("utf-8"),
                "--to",
                to,
                "--worker",
                id,
            ])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("millrace savepoint");
        assert!(o.status.success(), "{}", text(&o));
        assert_eq!(
            text(&o).contains("savepoint complete"),
            i + 1 == net.ids.len(),
            "worker {id}: {}",
            text(&o)
        );
    }
}

#[test]
fn three_workers_to_s3_to_two_to_a_directory_to_four_exactly_once() {
    let s3 = start_s3("savepoints");
    let env = s3.env();
    let s = Scratch::new();
    let out = s.path("out.jsonl");
    let count = r#"type = "count""#;

    // 3 workers from scratch, stopped a quarter of the way; saved to S3.
    let net3 = ClusterNet::new(3);
    let three = topology(&s, "three.toml", &net3.toml("savepoints"), 20_000, count);
    let mut ws: Vec<Running> = (0..3)
        .map(|i| {
            Running(
                net3.command(&three, i)
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("spawn"),
            )
        })
        .collect();
    stop_mid_stream(&out, &mut ws, 15_000);
    let at_first = lines(&out).len();
    assert!(at_first < RECORDS as usize, "stopped mid-stream");
    let in_s3 = "s3://savepoints/deployments/counts-1";
    export_all(&net3, &three, in_s3, &env);

    // 2 workers from S3, stopped again; saved to a directory.
    let net2 = ClusterNet::new(2);
    let two = topology(&s, "two.toml", &net2.toml("savepoints"), 20_000, count);
    let mut ws = start_from(&net2, &two, in_s3, &env);
    stop_mid_stream(&out, &mut ws, at_first + 15_000);
    assert!(
        lines(&out).len() < RECORDS as usize,
        "stopped mid-stream again"
    );
    let in_dir = format!("file://{}", s.path("sp-dir").display());

    // An export killed after its first shard file leaves no savepoint: no
    // part, no manifest, and a load from it is refused.
    let killed = millrace()
        .args([
            "savepoint",
            two.to_str().expect("utf-8"),
            "--to",
            &in_dir,
            "--worker",
            "w0",
        ])
        .env("MILLRACE_FAILPOINT", "savepoint.shard:1")
        .output()
        .expect("millrace savepoint");
    assert!(
        !killed.status.success(),
        "the export was to die: {}",
        text(&killed)
    );
    assert!(s.path("sp-dir/shards").exists() && !s.path("sp-dir/parts/w0.json").exists());
    let net4 = ClusterNet::new(4);
    let four = topology(&s, "four.toml", &net4.toml("savepoints"), 0, count);
    let refused = net4
        .command(&four, 0)
        .args(["--from-savepoint", &in_dir])
        .output()
        .expect("run");
    assert!(
        !refused.status.success() && text(&refused).contains("not a complete savepoint"),
        "{}",
        text(&refused)
    );
    // The deployment still runs from its own data directories, as before.
    let mut ws: Vec<Running> = (0..2)
        .map(|i| {
            Running(
                net2.command(&two, i)
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("spawn"),
            )
        })
        .collect();
    // Stopped live this time, while records flow: `millrace stop` asks
    // each worker over HTTP to drain and export itself as it stops, and
    // waits for the savepoint to be complete.
    let before = lines(&out).len();
    assert!(
        wait_until(Duration::from_secs(60), || lines(&out).len()
            >= before + 5_000),
        "the deployment runs again"
    );
    let mut stop = millrace();
    stop.arg("stop");
    for addr in &net2.http {
        stop.args(["--http", addr]);
    }
    let stopped = stop
        .args(["--savepoint", &in_dir, "--wait", "60s"])
        .output()
        .expect("millrace stop");
    assert!(stopped.status.success(), "{}", text(&stopped));
    assert!(
        text(&stopped).contains("savepoint complete") && text(&stopped).contains("engine.shards 6"),
        "{}",
        text(&stopped)
    );
    for w in ws.iter_mut() {
        assert!(
            wait_exit(w, Duration::from_secs(30)).success(),
            "exported and exited"
        );
    }
    assert!(
        lines(&out).len() < RECORDS as usize,
        "stopped mid-stream a third time"
    );

    // 4 workers from the directory, to the end of the stream.
    let mut ws = start_from(&net4, &four, &in_dir, &[]);
    for w in ws.iter_mut() {
        assert!(wait_exit(w, Duration::from_secs(90)).success());
    }
    assert_eq!(
        assert_running_counts(&read_jsonl(&out)),
        generator_key_counts(RECORDS, KEYS, SEED),
        "every record counted once across 3, 2 and 4 workers and two savepoints"
    );
}
