//! The status page in a real browser: headless Chromium (Debian's
//! `chromium`, installed by `make setup`) loads `/` from a running worker,
//! runs its script for some seconds of page time, and the test reads the
//! drawn page: every component's name, non-zero rates, and, with the worker
//! holding the sink stopped (SIGSTOP), that worker shown as unreachable. Screenshots are kept in
//! `target/test-artefacts/`.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;
use support::*;

const T: Duration = Duration::from_secs(60);

/// Runs headless Chromium on `url` for `ms` of page time; returns the DOM
/// after that, and saves a screenshot as `name`.png.
fn browse(url: &str, ms: u32, name: &str) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let artefacts = std::env::current_dir()
        .expect("cwd")
        .join("target/test-artefacts");
    std::fs::create_dir_all(&artefacts).expect("artefacts dir");
    let run = |extra: &[String]| {
        let mut child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1500,700",
                &format!("--user-data-dir={}", profile.path().display()),
                &format!("--virtual-time-budget={ms}"),
            ])
            .args(extra)
            .arg(url)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium (make setup installs it)");
        let mut out = String::new();
        std::io::Read::read_to_string(&mut child.stdout.take().expect("stdout"), &mut out)
            .expect("read the DOM");
        assert!(wait_exit(&mut child, T).success(), "chromium failed");
        out
    };
    run(&[format!(
        "--screenshot={}",
        artefacts.join(format!("{name}.png")).display()
    )]);
    run(&["--dump-dom".to_owned()])
}

/// The text of every `<text>` of the drawn graph, per node, in order.
fn node_texts(dom: &str) -> Vec<Vec<String>> {
    dom.split("<g class=\"node")
        .skip(1)
        .map(|node| {
            node.split("<text")
                .skip(1)
                .filter_map(|t| Some(t.split_once('>')?.1.split_once("</text>")?.0.to_owned()))
                .collect()
        })
        .collect()
}

#[test]
fn the_page_draws_every_component_with_live_rates() {
    let s = Scratch::new();
    let http = format!("127.0.0.1:{}", free_port());
    let topo = s.write(
        "page.toml",
        r#"
[service]
data_dir = "{dir}/data"
[engine]
shards = 2
[sources.gen]
type = "generator"
rate = 3000
keys = 50
event_step = "1ms"
[computations.evens]
type = "filter"
inputs = ["gen"]
regex = "[02468]$"
[computations.per_second]
type = "window"
inputs = ["evens"]
window = { kind = "fixed", size = "1s" }
aggregate = "count"
[sinks.out]
type = "file"
inputs = ["per_second"]
path = "{dir}/out.txt"
format = "text"
"#,
    );
    let mut child = spawn(&topo, &http);
    assert!(wait_until(T, || http_get(&http, "/healthz")
        .is_some_and(|(c, _)| c == 200)));
    // Rates need two samples a second apart in the worker.
    assert!(wait_until(T, || {
        http_get(&http, "/status").is_some_and(|(_, body)| {
            serde_json::from_str::<serde_json::Value>(&body)
                .is_ok_and(|v| v["components"][0]["records_in_per_second"].as_f64() > Some(0.0))
        })
    }));
    let dom = browse(&format!("http://{http}/"), 5000, "status-page");
    let nodes = node_texts(&dom);
    let names: Vec<&str> = nodes
        .iter()
        .filter_map(|n| n.first().map(String::as_str))
        .collect();
    for name in ["gen", "evens", "per_second", "out"] {
        assert!(names.contains(&name), "{name} drawn: {names:?}");
    }
    // The source's line "in N/s   out N/s" shows a non-zero rate.
    let gen = &nodes[names.iter().position(|n| *n == "gen").expect("gen")];
    let rates = gen
        .iter()
        .find(|l| l.starts_with("in "))
        .expect("a rates line");
    let rate_in = rates
        .trim_start_matches("in ")
        .split('/')
        .next()
        .expect("a rate");
    assert!(rate_in != "0" && rate_in != "-", "gen's rate: {rates}");
    term(&child);
    assert!(wait_exit(&mut child, T).success());
}

#[test]
fn a_stopped_cluster_peer_is_shown_as_unreachable() {
    let s = Scratch::new();
    let net = ClusterNet::new(2);
    let topo = s.write(
        "c.toml",
        &format!(
            r#"
[service]
data_dir = "{{dir}}/data"
[engine]
shards = 2
threads = 1
{cluster}
[sources.gen]
type = "generator"
rate = 2000
keys = 50
[computations.counts]
type = "count"
inputs = ["gen"]
[sinks.out]
type = "file"
inputs = ["counts"]
path = "{{dir}}/out.jsonl"
"#,
            cluster = net.toml("page-secret")
        ),
    );
    let mut workers: Vec<Running> = (0..2).map(|i| net.spawn(&topo, i, false, &[])).collect();
    assert!(wait_until(T, || (0..2).all(|i| http_get(
        &net.http[i],
        "/healthz"
    )
    .is_some_and(|(c, _)| c == 200))));
    // The sink lives on worker 1 (shards are dealt round-robin): stop it.
    // SAFETY: a signal to our own child.
    unsafe {
        libc::kill(workers[1].id() as i32, libc::SIGSTOP);
    }
    // Long enough for several samples (the producers held back behind the
    // stopped sink are usually marked "backlog growing" too, but only while
    // their backlog still rises, which a loaded machine does not promise).
    let dom = browse(
        &format!("http://{}/", net.http[0]),
        9000,
        "status-page-peer-stopped",
    );
    let row = dom
        .split("<tr>")
        .find(|r| r.contains("<td>w1"))
        .expect("a row for w1");
    assert!(row.contains("unreachable"), "w1 shown as: {row}");
    unsafe {
        libc::kill(workers[1].id() as i32, libc::SIGCONT);
    }
    for w in &workers {
        term(w);
    }
    for w in workers.iter_mut() {
        assert!(wait_exit(w, T).success());
    }
}
