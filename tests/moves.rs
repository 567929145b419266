//! Shards move between live workers whose ownership is kept in etcd
//! (`millrace run --join`): a worker joins under load and takes its share,
//! then leaves and hands it back; moves are cut short by SIGKILLs of the
//! old and of the new owner. Every key's counts stay exactly 1..n.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use support::etcd::Etcd;
use support::*;

const T: Duration = Duration::from_secs(60);
/// Shards: the generator is 0, the counts 1..=8, the sink 9.
const SHARDS: f64 = 10.0;

/// [`moving_count_topology`] without a commit log.
fn topology(s: &Scratch, net: &ClusterNet, load: (u64, u64, u64)) -> PathBuf {
    moving_count_topology(s, net, load, "")
}

/// Worker `i` of `net`, joined to the deployment in `etcd`.
fn join(net: &ClusterNet, topology: &Path, i: usize, etcd: &Etcd) -> Running {
    Running(
        net.command(topology, i)
            .args(["--join", &etcd.join])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn millrace"),
    )
}

/// Shards worker `http` runs now (0 when it does not answer).
fn owned(http: &str) -> f64 {
    metric(http, "millrace_shards_owned").unwrap_or(0.0)
}

/// The counts file's pairs once it holds `records` lines.
fn wait_output(s: &Scratch, records: u64) -> Vec<(String, String)> {
    let out = s.path("out.jsonl");
    assert!(
        wait_until(T, || lines(&out).len() as u64 >= records),
        "the output reached {} of {records} records within {T:?}",
        lines(&out).len()
    );
    read_jsonl(&out)
}

/// `millrace cluster-status`'s table.
fn cluster_status(topology: &Path, etcd: &Etcd) -> String {
    let out = millrace()
        .args([
            "cluster-status",
            topology.to_str().expect("utf-8"),
            "--join",
            &etcd.join,
        ])
        .output()
        .expect("cluster-status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An etcd keeping ownership under `prefix`, places for `workers` workers,
/// and the topology of `(records, keys, rate)`, in a new scratch directory.
fn deployment(
    prefix: &str,
    workers: usize,
    load: (u64, u64, u64),
) -> (Scratch, Etcd, ClusterNet, PathBuf) {
    let s = Scratch::new();
    let etcd = Etcd::start(&s.path("etcd"), prefix);
    let net = ClusterNet::new(workers);
    let topology = topology(&s, &net, load);
    (s, etcd, net, topology)
}

/// Whether the first `n` workers own every shard between them.
fn claimed(net: &ClusterNet, n: usize) -> bool {
    net.http[..n].iter().map(|h| owned(h)).sum::<f64>() == SHARDS
}

#[test]
fn a_worker_that_joins_under_load_takes_its_share_and_hands_it_back_when_it_leaves() {
    let (records, keys) = (120_000, 40);
    let (s, etcd, net, topology) = deployment("millrace/moves", 4, (records, keys, 12_000));
    let mut workers: Vec<Running> = (0..3).map(|i| join(&net, &topology, i, &etcd)).collect();
    assert!(
        wait_until(T, || claimed(&net, 3)),
        "the three workers claimed every shard"
    );
    // A fourth worker joins under load and takes about a quarter of the
    // count shards.
    workers.push(join(&net, &topology, 3, &etcd));
    assert!(
        wait_until(T, || owned(&net.http[3]) >= 2.0),
        "the joining worker took its share"
    );
    // A claim starts the shard, then counts the move: awaited, not read
    // once.
    let moved_in = || metric(&net.http[3], "millrace_shard_moves_total{direction=\"in\"}");
    assert!(
        wait_until(T, || moved_in().is_some_and(|n| n >= 2.0)),
        "moves counted: {:?}",
        moved_in()
    );
    assert!(
        lines(&s.path("out.jsonl")).len() < records as usize,
        "the moves happened under load"
    );
    // Another worker's `/status` shows the new owner of the shards it
    // took, each with its epoch.
    assert!(
        wait_until(T, || {
            let Some((200, body)) = http_get(&net.http[0], "/status") else {
                return false;
            };
            let Ok(status) = serde_json::from_str::<serde_json::Value>(&body) else {
                return false;
            };
            let shards = status["ownership"]["shards"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let on_w3: Vec<_> = shards.iter().filter(|s| s["owner"] == "w3").collect();
            status["ownership"]["members"]
                .as_array()
                .is_some_and(|m| m.len() == 4)
                && status["ownership"]["read_ms_ago"]
                    .as_i64()
                    .is_some_and(|ms| (0..5_000).contains(&ms))
                && on_w3.len() as f64 == owned(&net.http[3])
                && on_w3.iter().all(|s| {
                    s["epoch"].as_i64().is_some_and(|e| e > 0)
                        && s["name"].as_str().is_some_and(|n| n.starts_with("counts/"))
                })
        }),
        "w0's /status shows w3 owning what it took"
    );
    // Then it leaves: its shards go back to the others and it exits 0.
    let leave = millrace()
        .args(["leave", &etcd.join, "--worker", "w3"])
        .output()
        .expect("millrace leave");
    assert!(
        leave.status.success(),
        "{}",
        String::from_utf8_lossy(&leave.stderr)
    );
    let status = wait_exit(&mut workers[3], T);
    assert!(status.success(), "the leaving worker exited with {status}");
    assert!(
        wait_until(T, || claimed(&net, 3)),
        "the other workers own every shard again"
    );
    let pairs = wait_output(&s, records);
    let last = assert_running_counts(&pairs);
    assert_eq!(last, generator_key_counts(records, keys, 7));
    assert_eq!(pairs.len() as u64, records);
    // Every handed-off copy was removed once its shard was claimed.
    let handed_off = || {
        std::fs::read_dir(s.path("handoff/handoff"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert!(
        wait_until(T, || handed_off().is_empty()),
        "handoff files left: {:?}",
        handed_off()
    );
    // The status command names owners and epochs.
    let text = cluster_status(&topology, &etcd);
    assert!(text.contains("counts/0"), "{text}");
    assert!(
        !text.contains("w3\t"),
        "the leaver still owns a shard:\n{text}"
    );
}

#[test]
fn moves_cut_short_by_sigkills_of_the_old_and_the_new_owner_lose_and_repeat_nothing() {
    let (records, keys) = (150_000, 40);
    let (s, etcd, net, topology) = deployment("millrace/kills", 3, (records, keys, 15_000));
    let mut workers: Vec<Running> = (0..2).map(|i| join(&net, &topology, i, &etcd)).collect();
    assert!(
        wait_until(T, || claimed(&net, 2)),
        "two workers claimed every shard"
    );
    // w2 joins; as soon as its first shard has moved in, it is killed (the
    // new owner, mid-way through its share), then restarted.
    workers.push(join(&net, &topology, 2, &etcd));
    assert!(
        wait_until(T, || owned(&net.http[2]) >= 1.0),
        "the joining worker took a shard"
    );
    kill9(&mut workers[2]);
    workers[2] = join(&net, &topology, 2, &etcd);
    // While the rest of w2's share is still moving to it, an old owner is
    // killed too, then restarted.
    kill9(&mut workers[1]);
    workers[1] = join(&net, &topology, 1, &etcd);
    let started = Instant::now();
    let pairs = wait_output(&s, records);
    let last = assert_running_counts(&pairs);
    assert_eq!(last, generator_key_counts(records, keys, 7));
    assert_eq!(pairs.len() as u64, records, "in {:?}", started.elapsed());
    // Every declared worker runs: the bounded input ends, and each exits 0.
    for (i, w) in workers.iter_mut().enumerate() {
        let status = wait_exit(w, T);
        assert!(status.success(), "worker {i} exited with {status}");
    }
    let text = cluster_status(&topology, &etcd);
    assert!(
        text.lines().any(|l| l.split('\t').nth(3) == Some("w2")),
        "the restarted joiner owns its share:\n{text}"
    );
}

#[test]
fn an_owner_whose_claim_was_superseded_stops_its_stale_copy_and_goes_on_under_the_new_claim() {
    let (records, keys) = (60_000, 40);
    let (s, etcd, net, topology) = deployment("millrace/fence", 2, (records, keys, 6_000));
    let mut workers: Vec<Running> = (0..2).map(|i| join(&net, &topology, i, &etcd)).collect();
    assert!(
        wait_until(T, || claimed(&net, net.http.len())),
        "the two workers claimed every shard"
    );
    // Another claim of a count shard w1 runs, written behind its back (as
    // a second incarnation of w1 would): the running copy is stale now.
    let on_w1 = || {
        let status: serde_json::Value =
            serde_json::from_str(&cluster_status_json(&topology, &etcd)).expect("status json");
        status["shards"].as_array().and_then(|shards| {
            shards
                .iter()
                .find(|s| {
                    s["owner"] == "w1"
                        && s["assigned"] == "w1"
                        && s["name"].as_str().is_some_and(|n| n.starts_with("counts/"))
                })
                .and_then(|s| s["shard"].as_u64())
        })
    };
    assert!(wait_until(T, || on_w1().is_some()), "w1 runs a count shard");
    let shard = on_w1().expect("a count shard on w1");
    let fenced = || metric(&net.http[1], "millrace_ownership_fenced_total").unwrap_or(0.0);
    assert_eq!(fenced(), 0.0);
    etcd.put(&format!("/millrace/fence/owner/{shard:06}"), "w1");
    // w1 stops its stale copy, counts it, and runs the shard again only
    // under the new claim, from its committed state.
    assert!(
        wait_until(T, || fenced() >= 1.0),
        "the stale copy was stopped and counted"
    );
    let pairs = wait_output(&s, records);
    let last = assert_running_counts(&pairs);
    assert_eq!(last, generator_key_counts(records, keys, 7));
    for (i, w) in workers.iter_mut().enumerate() {
        let status = wait_exit(w, T);
        assert!(status.success(), "worker {i} exited with {status}");
    }
}

/// `millrace cluster-status --json`.
fn cluster_status_json(topology: &Path, etcd: &Etcd) -> String {
    let out = millrace()
        .args([
            "cluster-status",
            topology.to_str().expect("utf-8"),
            "--join",
            &etcd.join,
            "--json",
        ])
        .output()
        .expect("cluster-status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Sends `sig` to a worker.
fn signal(child: &Running, sig: i32) {
    // SAFETY: sending a signal to our own child process by pid.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

#[test]
fn a_controller_stopped_past_its_lease_mid_rebalance_is_replaced_and_nothing_is_lost() {
    let (records, keys) = (100_000, 40);
    let (s, etcd, net, topology) = deployment("millrace/sigstop", 4, (records, keys, 8_000));
    // w0 alone first: it controls, and claims every shard.
    let mut workers = vec![join(&net, &topology, 0, &etcd)];
    assert!(
        wait_until(T, || owned(&net.http[0]) == SHARDS),
        "w0 claimed every shard"
    );
    let controller = |want: &str| {
        cluster_status(&topology, &etcd)
            .lines()
            .any(|l| l == format!("controller: {want}"))
    };
    assert!(controller("w0"));
    workers.push(join(&net, &topology, 1, &etcd));
    workers.push(join(&net, &topology, 2, &etcd));
    // As soon as the rebalance has begun (a shard left w0), w0 is stopped
    // past its lease: its moves stall, another worker takes control.
    assert!(
        wait_until(T, || owned(&net.http[1]) + owned(&net.http[2]) >= 1.0),
        "the rebalance began"
    );
    signal(&workers[0], libc::SIGSTOP);
    assert!(
        wait_until(T, || controller("w1") || controller("w2")),
        "another worker took control:\n{}",
        cluster_status(&topology, &etcd)
    );
    signal(&workers[0], libc::SIGCONT);
    // w0 carries on as a plain worker; the rebalance completes and every
    // worker runs its share of the count shards.
    assert!(
        wait_until(T, || net.http[..3].iter().all(|h| owned(h) >= 2.0)),
        "the rebalance completed:\n{}",
        cluster_status(&topology, &etcd)
    );
    assert!(!controller("w0"), "w0 took control back");
    let pairs = wait_output(&s, records);
    let last = assert_running_counts(&pairs);
    assert_eq!(last, generator_key_counts(records, keys, 7));
    assert_eq!(pairs.len() as u64, records);
}

#[test]
fn moves_go_on_exactly_while_every_etcd_connection_is_cut_again_and_again() {
    let s = Scratch::new();
    let etcd = Etcd::start(&s.path("etcd"), "millrace/cuts");
    // The workers reach etcd only through a proxy that cuts every
    // connection every second.
    let proxy = proxy::Proxy::start(&format!("127.0.0.1:{}", free_port()), &etcd.client);
    let through = etcd.join.replace(&etcd.client, &proxy.listen);
    let via_proxy = |i: usize, net: &ClusterNet, topology: &Path| {
        Running(
            net.command(topology, i)
                .args(["--join", &through])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn millrace"),
        )
    };
    let net = ClusterNet::new(4);
    let (records, keys) = (120_000, 40);
    let topology = topology(&s, &net, (records, keys, 10_000));
    let mut workers: Vec<Running> = (0..3).map(|i| via_proxy(i, &net, &topology)).collect();
    assert!(
        wait_until(T, || claimed(&net, 3)),
        "the three workers claimed every shard"
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cutter = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut cuts = 0;
            // Bounded: at most 90 rounds (90 s).
            for _ in 0..90 {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                std::thread::sleep(Duration::from_secs(1));
                cuts += proxy.cut();
            }
            cuts
        })
    };
    workers.push(via_proxy(3, &net, &topology));
    assert!(
        wait_until(T, || owned(&net.http[3]) >= 2.0),
        "the joining worker took its share through the cuts"
    );
    let leave = millrace()
        .args(["leave", &etcd.join, "--worker", "w3"])
        .output()
        .expect("millrace leave");
    assert!(leave.status.success());
    let status = wait_exit(&mut workers[3], T);
    assert!(status.success(), "the leaving worker exited with {status}");
    let pairs = wait_output(&s, records);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let cuts = cutter.join().expect("cutter");
    assert!(cuts >= 3, "only {cuts} etcd connections were cut");
    let last = assert_running_counts(&pairs);
    assert_eq!(last, generator_key_counts(records, keys, 7));
    assert_eq!(pairs.len() as u64, records);
}
