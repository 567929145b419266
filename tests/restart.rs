//! What a restart restores, checked by assertion as soon as it matters (not
//! by a run that stalls until a deadline): productions committed to the
//! outbox but not yet handed over when the worker died go out again, and
//! the restarted worker counts them as its recovered backlog.

mod support;

use std::process::Stdio;
use std::time::Duration;
use support::*;

const T: Duration = Duration::from_secs(60);
const RECORDS: u64 = 20_000;
const KEYS: u64 = 50;
const SEED: u64 = 11;

/// Unacknowledged productions committed in `data`, per component, as
/// `millrace inspect --json` reports them.
fn outbox(data: &std::path::Path) -> std::collections::BTreeMap<String, u64> {
    let out = millrace()
        .args(["inspect", data.to_str().expect("utf-8"), "--json"])
        .output()
        .expect("inspect");
    assert!(out.status.success(), "inspect: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect JSON");
    v["components"]
        .as_object()
        .expect("components")
        .iter()
        .map(|(name, c)| (name.clone(), c["outbox"].as_u64().unwrap_or(0)))
        .collect()
}

#[test]
fn productions_committed_but_not_handed_over_before_a_crash_go_out_after_it() {
    let s = Scratch::new();
    let topo = count_pipeline(
        &s,
        "shards = 2\nthreads = 2\nbatch_size = 256",
        (RECORDS, KEYS, SEED),
        "type = \"count\"",
    );
    let data = s.path("data");
    // Crash just after a commit, before its releases, until one crash
    // leaves productions of `counts` in the outbox (not every turn that
    // commits has some).
    let (mut left, mut total) = (0, 0);
    for n in [3, 5, 8, 12, 17, 23] {
        let mut child = millrace()
            .args(["run", topo.to_str().expect("utf-8"), "--http", "off"])
            .env("MILLRACE_FAILPOINT", format!("commit.after:{n}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        if wait_exit(&mut child, T).success() {
            break; // the stream ended first
        }
        let stored = outbox(&data);
        left = stored.get("counts").copied().unwrap_or(0);
        total = stored.values().sum();
        if left > 0 {
            break;
        }
    }
    assert!(left > 0, "no crash left productions in the outbox");

    // The restart finds them, counts them as its recovered backlog, and
    // sends them: a production not sent again shows as a sequence gap at
    // its consumer at once.
    let log = s.path("restart.log");
    let http = format!("127.0.0.1:{}", free_port());
    let mut child = millrace()
        .args(["run", topo.to_str().expect("utf-8"), "--http", &http])
        .args(["--log-format", "json"])
        .env("MILLRACE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn");
    let mut status = None;
    let mut gaps = 0.0;
    assert!(
        wait_until(T, || {
            status = child.try_wait().expect("try_wait");
            gaps = metric_sum(&http, "millrace_sequence_gaps_total");
            status.is_some() || gaps > 0.0
        }),
        "the restarted run neither ended nor reported a gap"
    );
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let text = std::fs::read_to_string(&log).expect("log");
    let running = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "millrace running")
        .unwrap_or_else(|| panic!("no start line in the log: {text}"));
    assert_eq!(
        running["fields"]["recovered_backlog"].as_u64(),
        Some(total),
        "{total} productions were in the outbox; the restart says {running}"
    );
    assert_eq!(
        gaps, 0.0,
        "sequence gaps: a production of the outbox was not sent again"
    );
    let status = status.expect("ended");
    assert!(status.success(), "the restarted run failed: {status}");
    let counts = assert_running_counts(&read_jsonl(&s.path("out.jsonl")));
    assert_eq!(counts, generator_key_counts(RECORDS, KEYS, SEED));
    assert_eq!(outbox(&data).values().sum::<u64>(), 0, "all acknowledged");
}
