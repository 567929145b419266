//! Crashes at the exact points of a turn where the order of effects is the
//! exactly-once guarantee (`MILLRACE_FAILPOINT`, see the engine's
//! `failpoint.rs`): before and after the commit, after the releases, between
//! a sink's write and its commit, and after a replayable source's early
//! sends. After each crash a clean run must give exactly the counts an
//! independent model of the generator predicts.

mod support;

use std::process::Stdio;
use std::time::Duration;
use support::*;

const RECORDS: u64 = 100_000;
const KEYS: u64 = 300;
const SEED: u64 = 7;

fn topology(s: &Scratch, durability: &str) -> std::path::PathBuf {
    count_pipeline(
        s,
        &format!("shards = 4\nthreads = 2\nbatch_size = 512\ndurability = \"{durability}\""),
        (RECORDS, KEYS, SEED),
        "type = \"count\"",
    )
}

/// Runs with `point:n` armed: the worker must die at that point, unless
/// the stream ended first (returns false then).
fn crash_at(topo: &std::path::Path, point: &str, n: u64) -> bool {
    let mut child = millrace()
        .args(["run", topo.to_str().expect("utf-8"), "--http", "off"])
        .env("MILLRACE_FAILPOINT", format!("{point}:{n}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let status = wait_exit(&mut child, Duration::from_secs(30));
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut log)
        .expect("stderr");
    if status.success() {
        return false;
    }
    assert!(
        log.contains(&format!("failpoint {point}:{n} reached")),
        "{point}:{n}: died otherwise: {log}"
    );
    true
}

fn check_exact(s: &Scratch, topo: &std::path::Path) {
    // A clean run takes well under a second. A production lost by a crash
    // shows as a sequence gap its consumer waits behind forever: fail on the
    // first one instead of waiting for a run that cannot end.
    let http = format!("127.0.0.1:{}", free_port());
    let mut child = spawn(topo, &http);
    let gaps = "millrace_sequence_gaps_total{component=\"counts\"}";
    let mut status = None;
    let ended = wait_until(Duration::from_secs(30), || {
        status = child.try_wait().expect("try_wait");
        status.is_some() || metric(&http, gaps).is_some_and(|g| g > 0.0)
    });
    assert!(
        ended,
        "the clean run neither ended nor reported a gap in 30 s"
    );
    let status = status.unwrap_or_else(|| {
        panic!("sequence gaps after the crashes: a production was lost (acknowledged before it was committed?)")
    });
    assert!(status.success(), "the clean run failed: {status}");
    let pairs = read_jsonl(&s.path("out.jsonl"));
    let counts = assert_running_counts(&pairs);
    assert_eq!(counts, generator_key_counts(RECORDS, KEYS, SEED));
}

/// Crashes at each of `hits` in turn (each run resumes from the last
/// commit) while the stream lasts, at least `min` times; then checks.
fn crash_at_each_hit(point: &str, hits: &[u64], min: usize) {
    let s = Scratch::new();
    let topo = topology(&s, "process");
    let crashes = hits
        .iter()
        .take_while(|&&n| crash_at(&topo, point, n))
        .count();
    assert!(
        crashes >= min,
        "only {crashes} crashes at {point} before the end"
    );
    check_exact(&s, &topo);
}

#[test]
fn a_crash_just_before_a_commit_loses_and_repeats_nothing() {
    // Not every turn has acknowledgements to give; ten crashes make sure
    // some land in turns that have.
    crash_at_each_hit("commit.before", &[2, 4, 6, 9, 13, 18, 24, 31, 40, 50], 6);
}

#[test]
fn a_crash_just_after_a_commit_before_its_releases_loses_and_repeats_nothing() {
    crash_at_each_hit("commit.after", &[3, 7, 12, 20, 30, 45], 4);
}

#[test]
fn a_crash_after_the_releases_loses_and_repeats_nothing() {
    crash_at_each_hit("release.after", &[3, 10, 25], 3);
}

#[test]
fn a_crash_between_a_sinks_write_and_its_commit_repeats_nothing() {
    crash_at_each_hit("sink.flushed", &[2, 5, 9], 3);
}

#[test]
fn a_crash_after_a_replayable_sources_early_send_loses_nothing() {
    crash_at_each_hit("source.sent", &[2, 6, 15], 3);
}

#[test]
fn crashes_with_fsync_per_commit_lose_and_repeat_nothing() {
    let s = Scratch::new();
    let topo = topology(&s, "machine");
    for (point, n) in [
        ("commit.after", 4),
        ("sink.flushed", 3),
        ("commit.before", 7),
    ] {
        assert!(crash_at(&topo, point, n), "{point}:{n} was never reached");
    }
    check_exact(&s, &topo);
}
