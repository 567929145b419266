//! `millrace stop --savepoint s3://...` against a running worker: the worker
//! drains, exports its shards to the S3-compatible store (SeaweedFS, started
//! here) and exits; a fresh data directory loaded from that savepoint goes on
//! to the end of the stream with exactly the output of an uninterrupted run.

mod support;

use std::process::Stdio;
use std::time::Duration;
use support::s3::S3;
use support::*;

const RECORDS: u64 = 20_000;
const KEYS: u64 = 53;
const SEED: u64 = 11;
const T: Duration = Duration::from_secs(90);

#[test]
fn a_live_stop_with_a_savepoint_to_s3_then_a_fresh_start_from_it_is_exact() {
    let s3 = S3::start("savepoints", std::array::from_fn(|_| free_port()));
    let env = s3.env();
    let s = Scratch::new();
    let http = format!("127.0.0.1:{}", free_port());
    let topology = |rate: &str| {
        s.write(
            "t.toml",
            &format!(
                r#"
[service]
data_dir = "{{dir}}/data"
http = "{http}"
savepoint_targets = ["s3://savepoints"]
[engine]
shards = 4
[sources.gen]
type = "generator"
count = {RECORDS}
keys = {KEYS}
seed = {SEED}
{rate}
[computations.counts]
type = "count"
inputs = ["gen"]
[sinks.out]
type = "file"
inputs = ["counts"]
path = "{{dir}}/out.jsonl"
"#
            ),
        )
    };
    let out = s.path("out.jsonl");

    // One worker, slowed down so that the stop comes mid-stream; its HTTP
    // address is the one in the topology.
    let slow = topology("rate = 4000");
    let mut worker = Running(
        millrace()
            .args(["run", slow.to_str().expect("utf-8")])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn"),
    );
    assert!(
        wait_until(T, || lines(&out).len() >= 2_000),
        "the worker writes"
    );
    let stopped = millrace()
        .args([
            "stop",
            "--http",
            &http,
            "--savepoint",
            "s3://savepoints/sp1",
            "--wait",
            "60s",
        ])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("millrace stop");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&stopped.stdout),
        String::from_utf8_lossy(&stopped.stderr)
    );
    assert!(stopped.status.success(), "{said}");
    assert!(
        said.contains("savepoint complete") && said.contains("engine.shards 4"),
        "{said}"
    );
    assert!(
        wait_exit(&mut worker, T).success(),
        "drained, exported, exited"
    );
    let at_stop = lines(&out).len();
    assert!(at_stop < RECORDS as usize, "stopped mid-stream");

    // A fresh data directory from the savepoint, to the end of the stream.
    let fast = topology("");
    let mut worker = Running(
        millrace()
            .args([
                "run",
                fast.to_str().expect("utf-8"),
                "--data-dir",
                s.path("fresh").to_str().expect("utf-8"),
                "--from-savepoint",
                "s3://savepoints/sp1",
            ])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn"),
    );
    assert!(wait_exit(&mut worker, T).success(), "ran to the end");
    assert_eq!(
        assert_running_counts(&read_jsonl(&out)),
        generator_key_counts(RECORDS, KEYS, SEED),
        "every record counted once across the live stop to S3"
    );
}
