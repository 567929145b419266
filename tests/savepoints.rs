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
        !s.path("d5").exists() && !s.path("d5.loading").exists(),
        "a refused load leaves no data directory, and no staging directory"
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

/// A small pipeline run to its end on one worker, and exported whole to
/// `sp`: its topology, the savepoint's directory and URL.
fn finished_savepoint(s: &Scratch) -> (PathBuf, PathBuf, String) {
    let topo = topology(s, "t.toml", "", 0, r#"type = "count""#);
    let small = std::fs::read_to_string(&topo)
        .expect("read")
        .replace(&format!("count = {RECORDS}"), "count = 3000");
    std::fs::write(&topo, small).expect("write");
    let mut w = spawn(&topo, "off");
    assert!(wait_exit(&mut w, Duration::from_secs(60)).success());
    let sp = s.path("sp");
    let url = format!("file://{}", sp.display());
    let o = savepoint(&topo, &url, None);
    assert!(
        o.status.success() && text(&o).contains("savepoint complete"),
        "{}",
        text(&o)
    );
    (topo, sp, url)
}

/// `millrace run TOPO --data-dir DATA --from-savepoint URL EXTRA..` to its
/// end: whether it succeeded, and what it printed.
fn run_from(s: &Scratch, topo: &Path, url: &str, data: &str, extra: &[&str]) -> (bool, String) {
    let o = millrace()
        .args([
            "run",
            topo.to_str().expect("utf-8"),
            "--http",
            "off",
            "--data-dir",
            s.path(data).to_str().expect("utf-8"),
            "--from-savepoint",
            url,
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("run");
    (o.status.success(), text(&o))
}

#[test]
fn a_savepoint_is_never_taken_into_a_place_that_holds_anything() {
    let s = Scratch::new();
    let (topo, sp, url) = finished_savepoint(&s);
    // A second savepoint into the same place is refused: it would mix its
    // shards with the first's.
    let manifest = std::fs::read(sp.join("manifest.json")).expect("manifest");
    let o = savepoint(&topo, &url, None);
    assert!(
        !o.status.success() && text(&o).contains("already holds a complete savepoint"),
        "{}",
        text(&o)
    );
    assert_eq!(
        std::fs::read(sp.join("manifest.json")).expect("m"),
        manifest
    );
    // So is one into a directory that holds anything else.
    let notes = s.path("notes");
    std::fs::create_dir_all(&notes).expect("mkdir");
    std::fs::write(notes.join("todo.txt"), "mine\n").expect("write");
    let o = savepoint(&topo, &format!("file://{}", notes.display()), None);
    assert!(
        !o.status.success() && text(&o).contains("is not empty (it holds `todo.txt`)"),
        "{}",
        text(&o)
    );
    assert!(!notes.join("shards").exists() && !notes.join("manifest.json").exists());
}

#[test]
fn a_load_stages_beside_its_data_directory_and_never_removes_anothers() {
    let s = Scratch::new();
    let (topo, _, url) = finished_savepoint(&s);
    let run = |topo: &Path, data: &str, extra: &[&str]| run_from(&s, topo, &url, data, extra);
    // A load is staged in DATA_DIR.loading: `dd.loading` is not `dd.v1`'s.
    std::fs::create_dir_all(s.path("dd.loading")).expect("mkdir");
    std::fs::write(s.path("dd.loading/precious"), "keep").expect("write");
    let (ok, why) = run(&topo, "dd.v1", &[]);
    assert!(ok, "{why}");
    assert_eq!(
        std::fs::read_to_string(s.path("dd.loading/precious"))
            .ok()
            .as_deref(),
        Some("keep"),
        "an unrelated directory is left alone"
    );
    assert!(!s.path("dd.v1.loading").exists());
    // A directory of the staging name that is not a load's is refused, kept.
    std::fs::create_dir_all(s.path("d7.loading")).expect("mkdir");
    std::fs::write(s.path("d7.loading/precious"), "keep").expect("write");
    let (ok, why) = run(&topo, "d7", &[]);
    assert!(
        !ok && why.contains("is not an unfinished savepoint load"),
        "{why}"
    );
    assert!(s.path("d7.loading/precious").exists() && !s.path("d7").exists());
}

#[test]
fn a_manifest_naming_a_file_outside_the_savepoint_is_refused_before_reading_it() {
    let s = Scratch::new();
    let (topo, sp, url) = finished_savepoint(&s);
    let manifest = std::fs::read(sp.join("manifest.json")).expect("manifest");
    let run = |topo: &Path, data: &str, extra: &[&str]| run_from(&s, topo, &url, data, extra);
    // A manifest naming a file outside the savepoint is refused before
    // anything is read: a copy of a real shard file (its very size and
    // checksum), and someone else's file, whose size and checksum must not
    // be told.
    std::fs::copy(sp.join("shards/counts/0.bin"), s.path("outside.bin")).expect("copy");
    std::fs::write(s.path("secret.txt"), "not yours\n").expect("write");
    let secret = s.path("secret.txt").display().to_string();
    for (name, data) in [("../outside.bin", "d8"), (secret.as_str(), "d9")] {
        let mut m: serde_json::Value = serde_json::from_slice(&manifest).expect("manifest");
        for shard in m["shards"].as_array_mut().expect("shards") {
            if shard["component"] == "counts" && shard["shard"] == 0 {
                shard["file"] = name.into();
            }
        }
        std::fs::write(sp.join("manifest.json"), m.to_string()).expect("write");
        let (ok, why) = run(&topo, data, &[]);
        assert!(
            !ok && why.contains("not a path inside the savepoint"),
            "{name}: {why}"
        );
        assert!(!why.contains("SHA-256"), "{name}: {why}");
        assert!(!s.path(data).exists() && !s.path(&format!("{data}.loading")).exists());
    }
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

/// `millrace stop --http ... --savepoint URL --wait 60s` for every worker of `net`.
fn stop_with_savepoint(net: &ClusterNet, url: &str) -> std::process::Output {
    let mut stop = millrace();
    stop.arg("stop");
    for addr in &net.http {
        stop.args(["--http", addr]);
    }
    stop.args(["--savepoint", url, "--wait", "60s"])
        .output()
        .expect("millrace stop")
}

#[test]
fn a_deployment_never_adds_its_parts_to_an_earlier_savepoint() {
    let s = Scratch::new();
    let out = s.path("out.jsonl");
    let net = ClusterNet::new(2);
    let topo = topology(
        &s,
        "two.toml",
        &net.toml("savepoints"),
        2_000,
        r#"type = "count""#,
    );
    let start = || -> Vec<Running> {
        (0..2)
            .map(|i| {
                Running(
                    net.command(&topo, i)
                        .stdout(Stdio::null())
                        .spawn()
                        .expect("spawn"),
                )
            })
            .collect()
    };
    let flowing = |ws: &mut [Running], at_least: usize| {
        assert!(
            wait_until(Duration::from_secs(60), || lines(&out).len() >= at_least),
            "output did not reach {at_least} lines"
        );
        for w in ws.iter_mut() {
            assert!(w.try_wait().expect("wait").is_none(), "a worker exited");
        }
    };
    // Both workers stopped with a savepoint, live.
    let mut ws = start();
    flowing(&mut ws, 1_000);
    let url = format!("file://{}", s.path("sp").display());
    let o = stop_with_savepoint(&net, &url);
    assert!(
        o.status.success() && text(&o).contains("savepoint complete"),
        "{}",
        text(&o)
    );
    for w in ws.iter_mut() {
        assert!(wait_exit(w, Duration::from_secs(30)).success());
    }
    let manifest = std::fs::read(s.path("sp/manifest.json")).expect("manifest");
    // Worker w0 alone exported into it again: refused.
    let o = savepoint(&topo, &url, Some("w0"));
    assert!(
        !o.status.success() && text(&o).contains("already holds a complete savepoint"),
        "{}",
        text(&o)
    );
    // The deployment runs on; a stop with a savepoint to the same place is
    // refused before any worker is asked to stop.
    let mut ws = start();
    let before = lines(&out).len();
    flowing(&mut ws, before + 500);
    let o = stop_with_savepoint(&net, &url);
    assert!(
        !o.status.success() && text(&o).contains("already holds a complete savepoint"),
        "{}",
        text(&o)
    );
    flowing(&mut ws, lines(&out).len() + 200);
    assert_eq!(
        std::fs::read(s.path("sp/manifest.json")).expect("m"),
        manifest
    );
    // To a new place it is taken, whole.
    let o = stop_with_savepoint(&net, &format!("file://{}", s.path("sp2").display()));
    assert!(
        o.status.success() && text(&o).contains("savepoint complete"),
        "{}",
        text(&o)
    );
    for w in ws.iter_mut() {
        assert!(wait_exit(w, Duration::from_secs(30)).success());
    }
}

#[test]
fn savepoints_in_s3_refuse_other_contents_and_names_outside_the_prefix() {
    let s3 = start_s3("savepoints");
    let env = s3.env();
    let s = Scratch::new();
    let topo = topology(&s, "t.toml", "", 0, r#"type = "count""#);
    let small = std::fs::read_to_string(&topo)
        .expect("read")
        .replace(&format!("count = {RECORDS}"), "count = 3000");
    std::fs::write(&topo, small).expect("write");
    let mut w = spawn(&topo, "off");
    assert!(wait_exit(&mut w, Duration::from_secs(60)).success());
    let export = |to: &str| {
        let o = millrace()
            .args(["savepoint", topo.to_str().expect("utf-8"), "--to", to])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("millrace savepoint");
        (o.status.success(), text(&o))
    };
    let (ok, why) = export("s3://savepoints/sp1");
    assert!(ok && why.contains("savepoint complete"), "{why}");
    let manifest = s3.get("savepoints", "sp1/manifest.json").expect("manifest");
    // Into the same prefix again: refused, nothing changed.
    let (ok, why) = export("s3://savepoints/sp1");
    assert!(
        !ok && why.contains("already holds a complete savepoint"),
        "{why}"
    );
    assert_eq!(
        s3.get("savepoints", "sp1/manifest.json"),
        Some(manifest.clone())
    );
    // Into a prefix holding something else: refused, nothing written.
    s3.put("savepoints", "other/notes.txt", b"mine".to_vec());
    let (ok, why) = export("s3://savepoints/other");
    assert!(!ok && why.contains("is not empty"), "{why}");
    assert_eq!(s3.get("savepoints", "other/savepoint.json"), None);
    // A manifest naming objects outside its prefix: refused before any is read.
    for name in ["../other/notes.txt", "/sp1/shards/counts/0.bin"] {
        let mut m: serde_json::Value = serde_json::from_slice(&manifest).expect("manifest");
        for shard in m["shards"].as_array_mut().expect("shards") {
            if shard["component"] == "counts" && shard["shard"] == 0 {
                shard["file"] = name.into();
            }
        }
        s3.put(
            "savepoints",
            "sp1/manifest.json",
            m.to_string().into_bytes(),
        );
        let o = millrace()
            .args(["run", topo.to_str().expect("utf-8"), "--http", "off"])
            .args(["--data-dir", s.path("loaded").to_str().expect("utf-8")])
            .args(["--from-savepoint", "s3://savepoints/sp1"])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("run");
        assert!(
            !o.status.success() && text(&o).contains("not a path inside the savepoint"),
            "{name}: {}",
            text(&o)
        );
        assert!(!s.path("loaded").exists() && !s.path("loaded.loading").exists());
    }
}

/// A watched directory of `SECONDS KEY` lines -> key -> `count` whose keys
/// expire after 20 s of event time untouched -> `out.txt`.
fn expiring_counts(s: &Scratch) -> PathBuf {
    std::fs::create_dir_all(s.path("in")).expect("mkdir");
    s.write(
        "ttl.toml",
        r#"
[service]
data_dir = "{dir}/data"
[engine]
shards = 2
[sources.events]
type = "file"
path = "{dir}/in"
watch = true
timestamp = "field:0"
delimiter = " "
timestamp_unit = "s"
watermark = { out_of_order = "0s", idle_after = "1h" }
[computations.keyed]
type = "map"
inputs = ["events"]
key = "field:1"
value = "field:1"
delimiter = " "
[computations.counts]
type = "count"
inputs = ["keyed"]
state_ttl = "20s"
[sinks.out]
type = "file"
inputs = ["counts"]
path = "{dir}/out.txt"
format = "text"
"#,
    )
}

#[test]
fn timers_travel_with_the_savepoint() {
    let s = Scratch::new();
    let topo = expiring_counts(&s);
    let out = s.path("out.txt");
    let timers = r#"millrace_timers_pending{component="counts"}"#;
    let healthy = |http: &str| {
        wait_until(Duration::from_secs(60), || {
            http_get(http, "/healthz").is_some_and(|(code, _)| code == 200)
        })
    };
    // Key `a` at 1 s: counted, its expiry timer set for 21 s.
    let http = format!("127.0.0.1:{}", free_port());
    let mut w = spawn(&topo, &http);
    assert!(healthy(&http));
    add(&s.path("in"), "1.txt", "1 a\n");
    assert!(wait_until(Duration::from_secs(60), || !lines(&out).is_empty()));
    assert_eq!(metric(&http, timers), Some(1.0), "a's expiry timer is set");
    term(&w);
    assert!(wait_exit(&mut w, Duration::from_secs(30)).success());
    let url = format!("file://{}", s.path("sp").display());
    let o = savepoint(&topo, &url, None);
    assert!(o.status.success(), "{}", text(&o));

    // Loaded elsewhere...
    let http = format!("127.0.0.1:{}", free_port());
    let mut w = Running(
        millrace()
            .args(["run", topo.to_str().expect("utf-8"), "--http", &http])
            .args(["--data-dir", s.path("loaded").to_str().expect("utf-8")])
            .args(["--from-savepoint", &url])
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn"),
    );
    assert!(healthy(&http));
    // ...and its timer fires once the watermark passes 21 s: `a` starts
    // again at 1. (A shard's gauge of pending timers is refreshed when it
    // runs, so the output is what shows it.)
    add(&s.path("in"), "2.txt", "50 c\n");
    let watermark = r#"millrace_low_watermark_seconds{component="counts"}"#;
    assert!(
        wait_until(Duration::from_secs(60), || metric(&http, watermark)
            .is_some_and(|w| w >= 30.0)),
        "the watermark passed a's expiry"
    );
    add(&s.path("in"), "3.txt", "100 a\n");
    assert!(wait_until(Duration::from_secs(60), || lines(&out).len() >= 3));
    term(&w);
    assert!(wait_exit(&mut w, Duration::from_secs(30)).success());
    assert_eq!(lines(&out), ["a\t1", "c\t1", "a\t1"], "a's state expired");
}
