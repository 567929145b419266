//! Several workers over TCP: exact output across processes, the handshake's
//! secret and epochs (a zombie is fenced), bad frames, backpressure across
//! the network, and the chaos test (SIGKILLs and cut connections).

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};
use support::*;

const T: Duration = Duration::from_secs(60);

/// generator -> count (6 shards) -> file sink, on the workers of `net`.
/// Shards are dealt in file order: gen is shard 0, the counts 1..=6, the
/// sink 7, each on worker `shard % workers`.
fn topology(
    s: &Scratch,
    net: &ClusterNet,
    (records, keys, rate): (u64, u64, Option<u64>),
    engine: &str,
) -> PathBuf {
    let rate = rate.map(|r| format!("rate = {r}")).unwrap_or_default();
    s.write(
        "cluster.toml",
        &format!(
            r#"
[service]
data_dir = "{{dir}}/data"
[engine]
shards = 6
threads = 1
{engine}
{cluster}
[sources.gen]
type = "generator"
count = {records}
keys = {keys}
seed = 5
{rate}
[computations.counts]
type = "count"
inputs = ["gen"]
[sinks.out]
type = "file"
inputs = ["counts"]
path = "{{dir}}/out.jsonl"
"#,
            cluster = net.toml("test-secret"),
        ),
    )
}

/// Waits for every worker to exit by itself and checks they all succeeded.
fn wait_all_exit(workers: &mut [Running], timeout: Duration) {
    for (i, w) in workers.iter_mut().enumerate() {
        let status = wait_exit(w, timeout);
        assert!(status.success(), "worker {i} exited with {status}");
    }
}

fn check_output(s: &Scratch, records: u64, keys: u64) {
    let pairs = read_jsonl(&s.path("out.jsonl"));
    let counts = assert_running_counts(&pairs);
    assert_eq!(pairs.len() as u64, records, "records in the sink");
    assert_eq!(counts.len() as u64, keys, "keys in the sink");
}

#[test]
fn three_workers_count_exactly_and_exit_when_done() {
    let s = Scratch::new();
    let net = ClusterNet::new(3);
    let topo = topology(&s, &net, (30_000, 300, None), "");
    let mut workers: Vec<Running> = (0..3).map(|i| net.spawn(&topo, i, false, &[])).collect();
    wait_all_exit(&mut workers, Duration::from_secs(120));
    check_output(&s, 30_000, 300);
}

#[test]
fn sigterm_drains_every_worker_and_a_restart_completes_exactly() {
    let s = Scratch::new();
    let net = ClusterNet::new(2);
    let topo = topology(&s, &net, (6_000, 50, Some(2_000)), "");
    let out = s.path("out.jsonl");
    let mut workers: Vec<Running> = (0..2).map(|i| net.spawn(&topo, i, false, &[])).collect();
    assert!(wait_until(Duration::from_secs(60), || file_len(&out) > 2_000));
    for w in &workers {
        term(w);
    }
    wait_all_exit(&mut workers, Duration::from_secs(60));
    let drained = read_jsonl(&out);
    assert_running_counts(&drained);
    assert!(
        (drained.len() as u64) < 6_000,
        "the run ended before the drain"
    );
    let mut workers: Vec<Running> = (0..2).map(|i| net.spawn(&topo, i, false, &[])).collect();
    wait_all_exit(&mut workers, Duration::from_secs(120));
    check_output(&s, 6_000, 50);
}

#[test]
fn a_worker_without_the_secret_is_refused_and_counted() {
    let s = Scratch::new();
    let net = ClusterNet::new(2);
    let topo = topology(&s, &net, (5_000, 50, None), "");
    let mut w0 = net.spawn(&topo, 0, false, &[]);
    let mut w1 = net.spawn(
        &topo,
        1,
        false,
        &[("MILLRACE_CLUSTER_SECRET", "a-wrong-secret-0123456789")],
    );
    let refused = wait_until(Duration::from_secs(60), || {
        metric(
            &net.http[0],
            "millrace_net_refused_total{reason=\"secret\"}",
        )
        .unwrap_or(0.0)
            >= 1.0
    });
    assert!(refused, "w0 never counted a refused handshake");
    let told = wait_until(Duration::from_secs(60), || {
        metric(
            &net.http[1],
            "millrace_net_refused_total{reason=\"by-peer\"}",
        )
        .unwrap_or(0.0)
            >= 1.0
    });
    assert!(told, "w1 was not told it was refused");
    assert_ne!(
        metric(&net.http[0], "millrace_net_peer_up{peer=\"w1\"}"),
        Some(1.0),
        "the peer without the secret must not be connected"
    );
    assert!(
        w0.try_wait().expect("try_wait").is_none(),
        "w0 finished without w1"
    );
    kill9(&mut w1);
    let mut workers = vec![w0, net.spawn(&topo, 1, false, &[])];
    wait_all_exit(&mut workers, Duration::from_secs(120));
    check_output(&s, 5_000, 50);
    drop(w1);
}

#[test]
fn bad_frames_close_the_connection_are_counted_and_harm_nothing() {
    use std::io::{Read, Write};
    let s = Scratch::new();
    let net = ClusterNet::new(2);
    let topo = topology(&s, &net, (2_000, 20, None), "");
    let w0 = net.spawn(&topo, 0, false, &[]);
    assert!(wait_until(Duration::from_secs(60), || {
        std::net::TcpStream::connect(&net.addresses[0]).is_ok()
    }));
    for garbage in [
        &b"\xff\xff\xff\xff\x00\x00\x00\x00\x02"[..], // length far too large
        &b"\x00\x00\x00\x05\xde\xad\xbe\xef\x02abcd"[..], // checksum wrong
    ] {
        let mut c = std::net::TcpStream::connect(&net.addresses[0]).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        c.write_all(garbage).expect("write");
        // The worker answers with its challenge, then closes the connection.
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
        assert!(!rest.is_empty(), "no challenge before the close");
    }
    assert!(wait_until(Duration::from_secs(10), || {
        metric(&net.http[0], "millrace_net_bad_frames_total{peer=\"?\"}").unwrap_or(0.0) >= 2.0
    }));
    assert_eq!(
        http_get(&net.http[0], "/healthz").map(|r| r.0),
        Some(200),
        "the worker is still healthy"
    );
    let mut workers = vec![w0, net.spawn(&topo, 1, false, &[])];
    wait_all_exit(&mut workers, Duration::from_secs(120));
    check_output(&s, 2_000, 20);
}

/// Stale copies of a worker (started from an old copy of its data directory)
/// are refused by every peer, and the output stays exact: one at the live
/// worker's epoch (another process holds it) and one below it.
#[test]
fn a_zombie_worker_is_fenced_by_epochs() {
    let s = Scratch::new();
    let net = ClusterNet::new(3);
    let (records, keys) = (20_000, 200);
    let topo = topology(&s, &net, (records, keys, Some(4_000)), "");
    let out = s.path("out.jsonl");
    let w0 = net.spawn(&topo, 0, false, &[]);
    let w1 = net.spawn(&topo, 1, false, &[]);
    let mut w2 = net.spawn(&topo, 2, false, &[]);
    // w2 owns count shards 2 and 5 and produces to the sink on w1.
    assert!(wait_until(Duration::from_secs(60), || file_len(&out) > 10_000));
    kill9(&mut w2);
    // The copy's shards are at epoch 1: a zombie started from it is at 2.
    let pristine = s.path("pristine");
    copy_dir(&s.path("data/w2"), &pristine);
    let peers_see_w2 =
        || (0..2).all(|i| metric(&net.http[i], "millrace_net_peer_up{peer=\"w2\"}") == Some(1.0));
    let refused = |n: f64| {
        (0..2).all(|i| {
            metric(&net.http[i], "millrace_net_refused_total{reason=\"epoch\"}").unwrap_or(0.0) >= n
        })
    };
    for (round, live_epoch) in [(1.0, 2), (2.0, 3)] {
        if live_epoch == 3 {
            kill9(&mut w2);
        }
        w2 = net.spawn(&topo, 2, false, &[]);
        assert!(
            wait_until(Duration::from_secs(60), peers_see_w2),
            "w2 did not reconnect"
        );
        let dir = s.path(&format!("zombie{round}"));
        copy_dir(&pristine, &dir);
        let zombie_http = format!("127.0.0.1:{}", free_port());
        let mut zombie = Running(
            millrace()
                .args([
                    "run",
                    topo.to_str().expect("path"),
                    "--worker",
                    "w2",
                    "--data-dir",
                    dir.to_str().expect("path"),
                    "--listen",
                    &format!("127.0.0.1:{}", free_port()),
                    "--http",
                    &zombie_http,
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::inherit())
                .spawn()
                .expect("spawn zombie"),
        );
        assert!(
            wait_until(Duration::from_secs(60), || refused(round)),
            "w0 and w1 did not both refuse the zombie at epoch 2 (live w2 at {live_epoch})"
        );
        assert_eq!(
            metric(&zombie_http, "millrace_net_records_sent_total{peer=\"w1\"}").unwrap_or(0.0),
            0.0,
            "the zombie sent records"
        );
        assert!(peers_see_w2(), "the zombie displaced the live w2");
        kill9(&mut zombie);
    }
    let mut workers = vec![w0, w1, w2];
    wait_all_exit(&mut workers, Duration::from_secs(120));
    check_output(&s, records, keys);
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let target = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).expect("copy");
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn signal(child: &Running, sig: i32) {
    // SAFETY: sending a signal to our own child process by pid.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

/// With the consumer's worker stopped (SIGSTOP), the producer fills its
/// bounded windows and backlog, then stops reading its source; its memory and
/// the bytes it sends stay flat. After SIGCONT everything completes exactly.
#[test]
fn a_stalled_worker_slows_its_producers_and_memory_stays_bounded() {
    let s = Scratch::new();
    let net = ClusterNet::new(2);
    let (records, keys) = (200_000, 1_000);
    let (max_backlog, window_bytes) = (5_000, 16_384);
    let topo = topology(
        &s,
        &net,
        (records, keys, Some(40_000)),
        &format!("max_backlog = {max_backlog}\nchannel_window = 256\nchannel_window_bytes = {window_bytes}"),
    );
    let out = s.path("out.jsonl");
    let w0 = net.spawn(&topo, 0, false, &[]);
    let w1 = net.spawn(&topo, 1, false, &[]);
    assert!(wait_until(Duration::from_secs(60), || file_len(&out) > 1_000));
    signal(&w1, libc::SIGSTOP);
    let series =
        |name: &str| metric(&net.http[0], name).unwrap_or_else(|| panic!("no series {name} on w0"));
    let gen_in = || series("millrace_records_in_total{component=\"gen\"}");
    let gen_backlog = || series("millrace_outbox_backlog_records{component=\"gen\"}");
    let retries = || series("millrace_retries_total{component=\"gen\"}");
    let retried_before = retries();
    // The generator's backlog reaches the bound, then it stops reading.
    let full = wait_until(Duration::from_secs(60), || {
        gen_backlog() >= max_backlog as f64 && {
            let a = gen_in();
            let before = Instant::now();
            wait_until(Duration::from_millis(300), || {
                before.elapsed() >= Duration::from_millis(250)
            });
            gen_in() == a
        }
    });
    assert!(full, "the source never stopped for the stalled consumer");
    let (taken, rss, sent) = (
        gen_in(),
        rss_kib(w0.id()),
        series("millrace_net_bytes_sent_total{peer=\"w1\"}"),
    );
    assert!(
        taken < records as f64,
        "the source was read to the end: {taken}"
    );
    // Observe the stalled state for a while: nothing is read, memory and the
    // bytes written to the stopped worker stay flat (heartbeats aside).
    let since = Instant::now();
    wait_until(Duration::from_secs(2), || {
        since.elapsed() >= Duration::from_millis(1500)
    });
    assert_eq!(
        gen_in(),
        taken,
        "the source kept reading while its consumer was stopped"
    );
    let rss_after = rss_kib(w0.id());
    assert!(
        rss_after < rss + 16 * 1024,
        "producer memory grew from {rss} KiB to {rss_after} KiB while stalled"
    );
    // What may still go out: unacknowledged windows re-sent once or twice
    // (the retry backoff starts at 1 s and doubles) on the 6 channels to w1
    // (gen -> 3 count shards, 3 count shards -> sink), and heartbeats.
    let sent_after = series("millrace_net_bytes_sent_total{peer=\"w1\"}");
    assert!(
        retries() > retried_before,
        "the generator re-sent what the stopped worker did not acknowledge"
    );
    let bound = 2.0 * 6.0 * (window_bytes as f64 + 1024.0) + 4096.0;
    assert!(
        sent_after - sent <= bound,
        "{} bytes sent to a stopped worker (bound {bound})",
        sent_after - sent
    );
    signal(&w1, libc::SIGCONT);
    let mut workers = vec![w0, w1];
    wait_all_exit(&mut workers, Duration::from_secs(180));
    check_output(&s, records, keys);
}

/// Kills random workers and cuts connections through the proxies while the
/// cluster counts; at the end every key holds exactly 1..n, each once.
fn chaos(kills: usize, cuts: usize, records: u64, rate: u64) {
    let s = Scratch::new();
    let net = ClusterNet::new(3);
    let keys = 500;
    let topo = topology(&s, &net, (records, keys, Some(rate)), "");
    let out = s.path("out.jsonl");
    let proxies = net.proxies();
    let mut rng = Rng::from_env();
    let mut workers: Vec<Running> = (0..3).map(|i| net.spawn(&topo, i, true, &[])).collect();
    let (mut killed, mut cut) = (0, 0);
    // Each fault waits for some progress of the output first: faults are
    // spread over the run, and the run cannot end before they are done. A
    // cut that found no connection (its workers were reconnecting) was no
    // fault: the next one waits for a connection, not for more output.
    let step = records * 45 / (2 * (kills + cuts) as u64 + 2);
    let deadline = Instant::now() + Duration::from_secs(60 + (kills + cuts) as u64 * 3);
    let mut need_progress = true;
    while killed < kills || cut < cuts {
        assert!(
            Instant::now() < deadline,
            "chaos did not finish: {killed} kills, {cut} cuts"
        );
        if need_progress {
            let at = file_len(&out) + 1 + rng.below(step);
            let progressed = wait_until(Duration::from_secs(60), || file_len(&out) >= at);
            assert!(
                progressed,
                "no progress after {killed} kills and {cut} cuts: the output has {} bytes, {at} awaited",
                file_len(&out)
            );
        }
        for (i, w) in workers.iter_mut().enumerate() {
            let exited = w.try_wait().expect("try_wait");
            assert!(
                exited.is_none(),
                "worker {i} exited during chaos ({exited:?}) after {killed} kills and {cut} cuts; the output has {} bytes",
                file_len(&out)
            );
        }
        need_progress = true;
        let roll = rng.below(4);
        match roll {
            0 | 1 if killed < kills => {
                let i = rng.below(3) as usize;
                kill9(&mut workers[i]);
                workers[i] = net.spawn(&topo, i, true, &[]);
                killed += 1;
            }
            _ if cut < cuts => {
                // A proxy in front of a worker that nobody dials (the last
                // listed dials the others) never has a connection to cut.
                let live: Vec<&proxy::Proxy> = proxies.iter().filter(|p| p.live() > 0).collect();
                if live.is_empty() {
                    need_progress = false;
                    wait_until(Duration::from_secs(5), || {
                        proxies.iter().any(|p| p.live() > 0)
                    });
                    continue;
                }
                let p = live[rng.below(live.len() as u64) as usize];
                if roll == 2 {
                    // Vary how the proxy forwards from here on.
                    p.set_split(rng.below(2) == 0);
                    p.set_delay(Duration::from_micros(rng.below(2_000)));
                }
                if p.cut() > 0 {
                    cut += 1;
                } else {
                    need_progress = false;
                }
            }
            _ => {}
        }
    }
    eprintln!("chaos: {killed} SIGKILLs, {cut} connection cuts");
    for p in &proxies {
        p.set_delay(Duration::ZERO);
        p.set_split(false);
    }
    wait_all_exit(&mut workers, Duration::from_secs(180));
    check_output(&s, records, keys);
}

#[test]
fn chaos_kills_and_cuts_lose_and_repeat_nothing() {
    chaos(20, 20, 40_000, 8_000);
}

/// The long version: `cargo test --test cluster -- --ignored`.
#[test]
#[ignore = "long: about 100 kills and 100 cuts"]
fn chaos_long() {
    chaos(100, 100, 200_000, 10_000);
}

#[test]
fn a_record_too_large_to_cross_is_refused_once_at_its_producer() {
    let s = Scratch::new();
    let net = ClusterNet::new(2);
    // A line past the cluster's 16 MiB frame limit between two small ones.
    let big = "x".repeat(20 << 20);
    s.write("in.txt", &format!("small1\n{big}\nsmall2\n"));
    let topo = s.write(
        "big.toml",
        &format!(
            r#"
[service]
data_dir = "{{dir}}/data"
[engine]
shards = 2
threads = 1
{cluster}
[sources.lines]
type = "file"
path = "{{dir}}/in.txt"
[computations.kept]
type = "filter"
inputs = ["lines"]
regex = "."
[sinks.out]
type = "file"
inputs = ["kept"]
path = "{{dir}}/out.txt"
format = "text"
[sinks.bad]
type = "file"
inputs = ["lines.errors"]
path = "{{dir}}/bad.txt"
format = "text"
"#,
            cluster = net.toml("test-secret"),
        ),
    );
    let mut workers: Vec<Running> = (0..2).map(|i| net.spawn(&topo, i, false, &[])).collect();
    // Before the limit, the link re-sent the frame forever and never finished.
    wait_all_exit(&mut workers, Duration::from_secs(120));
    assert_eq!(
        lines(&s.path("out.txt")),
        ["in.txt\tsmall1", "in.txt\tsmall2"]
    );
    // The errors output has the refused record, cut to engine.max_record_bytes.
    let bad = lines(&s.path("bad.txt"));
    assert_eq!(bad.len(), 1);
    // Key and value together are 8 MiB; the sink puts a tab between them.
    assert_eq!(bad[0].len(), (8 << 20) + 1);
    assert!(bad[0].starts_with("in.txt\txxx"));
}

#[test]
fn a_forged_frame_injected_into_a_live_connection_is_refused_and_counted() {
    let s = Scratch::new();
    let net = ClusterNet::new(2);
    let (records, keys) = (12_000, 100);
    let topo = topology(&s, &net, (records, keys, Some(4_000)), "");
    let proxies = net.proxies();
    let mut workers: Vec<Running> = (0..2).map(|i| net.spawn(&topo, i, true, &[])).collect();
    let connected = || {
        metric(&net.http[0], "millrace_net_peer_up{peer=\"w1\"}") == Some(1.0)
            && metric(&net.http[1], "millrace_net_peer_up{peer=\"w0\"}") == Some(1.0)
    };
    assert!(wait_until(Duration::from_secs(60), connected));
    // A well-formed frame (right length and checksum) nobody sent: a status
    // saying the sender is done and finished, which, if believed, would let
    // the peer stop before the end.
    let mut forged = Vec::new();
    let payload = [8u8, 0b11];
    forged.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    forged.extend_from_slice(&crc32fast::hash(&payload).to_be_bytes());
    forged.extend_from_slice(&payload);
    proxies[0].inject(forged);
    assert!(wait_until(Duration::from_secs(30), || proxies[0]
        .injected()
        == 1));
    let refused = || {
        metric(&net.http[0], "millrace_net_bad_frames_total{peer=\"w1\"}").unwrap_or(0.0)
            + metric(&net.http[1], "millrace_net_bad_frames_total{peer=\"w0\"}").unwrap_or(0.0)
    };
    assert!(
        wait_until(Duration::from_secs(30), || refused() >= 1.0),
        "the forged frame was not refused"
    );
    wait_all_exit(&mut workers, Duration::from_secs(120));
    check_output(&s, records, keys);
}

#[test]
fn the_status_page_sums_each_component_over_the_workers() {
    let s = Scratch::new();
    let net = ClusterNet::new(2);
    let topo = topology(&s, &net, (1_000_000, 100, Some(2_000)), "");
    let mut workers: Vec<Running> = (0..2).map(|i| net.spawn(&topo, i, false, &[])).collect();
    let status = |i: usize, q: &str| -> Option<serde_json::Value> {
        let (code, body) = http_get(&net.http[i], &format!("/status{q}"))?;
        (code == 200)
            .then(|| serde_json::from_str(&body).ok())
            .flatten()
    };
    let counts = |v: &serde_json::Value| -> serde_json::Value {
        v["components"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == "counts").cloned())
            .unwrap_or_default()
    };
    assert!(wait_until(Duration::from_secs(60), || {
        (0..2).all(|i| status(i, "").is_some_and(|v| counts(&v)["records_in"].as_u64() > Some(0)))
    }));
    // Worker 0's cluster view: both workers, and the counts component's
    // six shards summed over them (three on each).
    let view = status(0, "?cluster=1").expect("cluster view");
    let listed: Vec<(String, bool)> = view["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| {
            (
                w["worker"].as_str().unwrap_or("?").to_owned(),
                w["reachable"] == true,
            )
        })
        .collect();
    assert_eq!(listed, [("w0".to_owned(), true), ("w1".to_owned(), true)]);
    assert_eq!(counts(&status(0, "").expect("own"))["local_shards"], 3);
    assert_eq!(counts(&view)["local_shards"], 6);
    let (own, all) = (
        counts(&status(0, "").expect("own"))["records_in"]
            .as_u64()
            .expect("n"),
        counts(&view)["records_in"].as_u64().expect("n"),
    );
    assert!(
        all > own,
        "the sum over workers ({all}) is more than one worker's ({own})"
    );
    // A worker that is down is listed as unreachable, its figures left out.
    kill9(&mut workers[1]);
    assert!(wait_until(Duration::from_secs(30), || {
        status(0, "?cluster=1").is_some_and(|v| {
            v["workers"][1]["reachable"] == false && counts(&v)["local_shards"] == 3
        })
    }));
}

/// The window shards of a restarted worker learn the watermark of their
/// upstream shards on other workers again when the link comes back (their
/// own data directory holds only the watermarks of local shards): a record
/// behind the watermark reached before the crash is late after it.
#[test]
fn a_restarted_worker_gets_its_remote_inputs_watermarks_again() {
    let s = Scratch::new();
    let net = ClusterNet::new(2);
    let extra = format!("aggregate = \"count\"\n{}", net.toml("test-secret"));
    let topo = window_topology(
        &s,
        "threads = 1",
        "{ kind = \"fixed\", size = \"10s\" }",
        &extra,
        "{ out_of_order = \"0s\" }",
    );
    let (out, late) = (s.path("out.txt"), s.path("late.txt"));
    let mut workers: Vec<Running> = (0..2).map(|i| net.spawn(&topo, i, false, &[])).collect();
    // The watermark reaches 40 s everywhere; window [0, 10) fires for `a`.
    add(&s.path("in"), "1.csv", "a,1,x\nz,40,q\n");
    assert!(wait_until(T, || lines(&out)
        .iter()
        .any(|l| l.starts_with("a\t"))));
    // Kill the worker without the source, and start it again.
    let local_shards = |i: usize, component: &str| -> Option<u64> {
        let (_, body) = http_get(&net.http[i], "/status")?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["components"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == component)?["local_shards"]
            .as_u64()
    };
    let source = (0..2)
        .find(|&i| local_shards(i, "events") == Some(1))
        .expect("one worker runs the source");
    let other = 1 - source;
    kill9(&mut workers[other]);
    workers[other] = net.spawn(&topo, other, false, &[]);
    let up = |i: usize, peer: usize| {
        metric(
            &net.http[i],
            &format!("millrace_net_peer_up{{peer=\"{}\"}}", net.ids[peer]),
        ) == Some(1.0)
    };
    assert!(
        wait_until(T, || up(other, source) && up(source, other)),
        "reconnected"
    );
    // Records at 5 s for twenty keys: every window shard gets some, and all
    // are behind the 40 s reached before the crash.
    let body: String = (0..20).map(|k| format!("b{k},5,y\n")).collect();
    add(&s.path("in"), "2.csv", &body);
    assert!(
        wait_until(T, || lines(&late).len() >= 20),
        "late: {:?}, out: {:?}",
        lines(&late),
        lines(&out)
    );
    assert_eq!(lines(&late).len(), 20);
    assert!(
        lines(&out).iter().all(|l| !l.starts_with('b')),
        "no pane for a late record: {:?}",
        lines(&out)
    );
    for w in &workers {
        term(w);
    }
    wait_all_exit(&mut workers, T);
}
