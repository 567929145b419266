//! The status page in a real browser: headless Chromium (Debian's
//! `chromium`, installed by `make setup`) is driven over the DevTools
//! protocol while real workers run, and the tests read what the page draws:
//! every component whole at 1600x1000 and 1280x800 with live rates and no
//! negative lag, no console errors, a "stale" mark once its worker stops
//! answering, and in a cluster a stopped worker shown as not answering with
//! the figures it holds shown as missing. Screenshots are kept in
//! `target/test-artefacts/`.

mod support;

use serde_json::{json, Value};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use support::*;

const T: Duration = Duration::from_secs(60);

/// Headless Chromium with one page, driven over the DevTools protocol on a
/// pipe (`--remote-debugging-pipe`: it reads commands on its fd 3 and
/// writes answers and events on its fd 4, each a JSON text ended by NUL).
struct Browser {
    child: Child,
    commands: File,
    messages: mpsc::Receiver<Value>,
    /// The page's session id.
    session: String,
    next_id: u64,
    /// The page's events so far, oldest first.
    events: Vec<Value>,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Self {
        let profile = tempfile::tempdir().expect("profile dir");
        let (their_in, commands) = pipe();
        let (replies, their_out) = pipe();
        let (fd_in, fd_out) = (their_in.as_raw_fd(), their_out.as_raw_fd());
        let mut command = Command::new("chromium");
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-pipe",
                &format!("--user-data-dir={}", profile.path().display()),
                "about:blank",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: between fork and exec only async-signal-safe calls
        // (fcntl, dup2) on descriptors this process holds open. Both are
        // first copied above 10, so that neither is overwritten by the other's
        // dup2; dup2 leaves 3 and 4 open across exec.
        unsafe {
            command.pre_exec(move || {
                let a = libc::fcntl(fd_in, libc::F_DUPFD_CLOEXEC, 10);
                let b = libc::fcntl(fd_out, libc::F_DUPFD_CLOEXEC, 10);
                if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("chromium (make setup installs it)");
        drop((their_in, their_out));
        let (tx, messages) = mpsc::channel();
        std::thread::spawn(move || {
            let mut from = BufReader::new(replies);
            let mut buf = Vec::new();
            while from.read_until(0, &mut buf).is_ok_and(|n| n > 0) {
                if buf.last() == Some(&0) {
                    buf.pop();
                }
                let message = serde_json::from_slice(&buf).expect("DevTools sends JSON");
                if tx.send(message).is_err() {
                    return;
                }
                buf.clear();
            }
        });
        let mut b = Browser {
            child,
            commands,
            messages,
            session: String::new(),
            next_id: 0,
            events: Vec::new(),
            _profile: profile,
        };
        let target = b.send(false, "Target.createTarget", json!({"url": "about:blank"}));
        let attached = b.send(
            false,
            "Target.attachToTarget",
            json!({"targetId": target["targetId"], "flatten": true}),
        );
        b.session = attached["sessionId"]
            .as_str()
            .expect("a session id")
            .to_owned();
        for domain in ["Page", "Runtime", "Log"] {
            b.send(true, &format!("{domain}.enable"), json!({}));
        }
        b
    }

    /// Sends `method` (to the page when `page`, else to the browser) and
    /// returns its result; events that come meanwhile are kept.
    fn send(&mut self, page: bool, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if page {
            message["sessionId"] = self.session.clone().into();
        }
        let mut bytes = message.to_string().into_bytes();
        bytes.push(0);
        self.commands.write_all(&bytes).expect("write to chromium");
        let deadline = Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = self
                .messages
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("chromium did not answer {method}: {e}"));
            if m["id"] == id {
                assert!(m.get("error").is_none(), "{method}: {m}");
                return m["result"].clone();
            }
            if m.get("method").is_some() {
                self.events.push(m);
            }
        }
    }

    /// The value of the JavaScript expression `js` in the page.
    fn eval(&mut self, js: &str) -> Value {
        let r = self.send(
            true,
            "Runtime.evaluate",
            json!({"expression": js, "returnByValue": true}),
        );
        assert!(r.get("exceptionDetails").is_none(), "{js}: {r}");
        r["result"]["value"].clone()
    }

    /// Evaluates `js` every 100 ms until it is neither null nor false;
    /// that value, or None after `timeout`.
    fn wait_for(&mut self, js: &str, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.eval(js);
            if !v.is_null() && v != Value::Bool(false) {
                return Some(v);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn navigate(&mut self, url: &str) {
        self.send(true, "Page.navigate", json!({ "url": url }));
    }

    fn viewport(&mut self, width: u32, height: u32) {
        self.send(
            true,
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        );
    }

    /// Waits until the page has redrawn (its header line changed).
    fn next_redraw(&mut self) {
        let before = self.eval(SUMMARY);
        let changed = format!("{SUMMARY} !== {before}");
        assert!(self.wait_for(&changed, T).is_some(), "no redraw");
    }

    /// Saves what the page shows as `target/test-artefacts/NAME.png`.
    fn screenshot(&mut self, name: &str) {
        let shot = self.send(true, "Page.captureScreenshot", json!({"format": "png"}));
        let dir = std::env::current_dir()
            .expect("cwd")
            .join("target/test-artefacts");
        std::fs::create_dir_all(&dir).expect("artefacts dir");
        let png = base64(shot["data"].as_str().expect("screenshot data"));
        std::fs::write(dir.join(format!("{name}.png")), png).expect("write screenshot");
    }

    /// Errors the page logged (console, uncaught exceptions, failed loads),
    /// except a failed `/favicon.ico`: the server has none (yet).
    fn console_errors(&mut self) -> Vec<String> {
        while let Ok(m) = self.messages.try_recv() {
            self.events.push(m);
        }
        self.events
            .iter()
            .filter_map(|e| {
                let p = &e["params"];
                match e["method"].as_str()? {
                    "Log.entryAdded" if p["entry"]["level"] == "error" => {
                        let url = p["entry"]["url"].as_str().unwrap_or("");
                        (!url.ends_with("/favicon.ico")).then(|| p["entry"].to_string())
                    }
                    "Runtime.exceptionThrown" => Some(p["exceptionDetails"].to_string()),
                    "Runtime.consoleAPICalled" if p["type"] == "error" => Some(p.to_string()),
                    _ => None,
                }
            })
            .collect()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self
            .commands
            .write_all(b"{\"id\":0,\"method\":\"Browser.close\"}\0");
        if !wait_until(Duration::from_secs(10), || {
            self.child.try_wait().ok().flatten().is_some()
        }) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A pipe (read end, write end), both ends closed on exec.
fn pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened, and are owned here alone.
    unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
}

/// Standard base64 (as DevTools sends screenshots) to bytes.
fn base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    for chunk in text.trim_end_matches('=').as_bytes().chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= u32::from(value(c)) << (18 - 6 * i);
        }
        out.extend_from_slice(&acc.to_be_bytes()[1..chunk.len()]);
    }
    out
}

/// The header line (uptime, components, backlog).
const SUMMARY: &str = "JSON.stringify(document.getElementById('summary').textContent)";

/// The text lines of every drawn component, in order (its name first).
const NODES: &str =
    "[...document.querySelectorAll('#svg .node')].map(g => [...g.querySelectorAll('text')].map(t => t.textContent))";

/// The cells of every row of the workers table.
const WORKERS: &str =
    "[...document.querySelectorAll('#peers tr')].map(r => [...r.cells].map(c => c.textContent))";

/// What of the graph the window does not show whole: a component's box
/// that reaches past the graph's visible area or the window, or a line of
/// text that reaches past its box.
const CUT_OFF: &str = r#"(() => {
  const graph = document.getElementById('graph'), g = graph.getBoundingClientRect();
  const right = Math.min(g.left + graph.clientLeft + graph.clientWidth, innerWidth);
  const cut = [];
  for (const node of document.querySelectorAll('#svg .node')) {
    const box = node.querySelector('rect').getBoundingClientRect();
    const name = node.querySelector('text').textContent;
    if (box.left < g.left || box.right > right + 0.5) cut.push(`${name}: box ${box.left}-${box.right}, visible ${g.left}-${right}`);
    for (const t of node.querySelectorAll('text')) {
      if (t.getBoundingClientRect().right > box.right + 0.5) cut.push(`${name}: text "${t.textContent}"`);
    }
  }
  return cut;
})()"#;

/// The nodes as `Vec` of lines.
fn nodes(b: &mut Browser) -> Vec<Vec<String>> {
    serde_json::from_value(b.eval(NODES)).expect("lists of lines")
}

/// The lines of the node named `name`.
fn node<'a>(nodes: &'a [Vec<String>], name: &str) -> &'a [String] {
    nodes
        .iter()
        .find(|n| n.first().is_some_and(|first| first == name))
        .unwrap_or_else(|| panic!("{name} drawn: {nodes:?}"))
}

/// The line of `node` that starts with `prefix`.
fn line<'a>(node: &'a [String], prefix: &str) -> &'a str {
    node.iter()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("a line `{prefix}...` in {node:?}"))
}

/// One component of a worker's `/status`.
fn component(http: &str, query: &str, name: &str) -> Option<Value> {
    let (code, body) = http_get(http, &format!("/status{query}"))?;
    let v: Value = serde_json::from_str(&body).ok().filter(|_| code == 200)?;
    v["components"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)
        .cloned()
}

#[test]
fn the_page_shows_every_component_whole_with_live_rates_no_negative_lag_and_no_console_errors() {
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
    // Rates need two samples a second apart in the worker; and the sink,
    // behind the window, has taken results stamped with times its
    // watermark has passed: newest event time minus watermark is negative.
    let gen_rate = |c: Value| c["records_in_per_second"].as_f64() > Some(0.0);
    assert!(
        wait_until(T, || component(&http, "", "gen").is_some_and(gen_rate)),
        "gen has a rate in /status"
    );
    let watermark_past_newest = |c: Value| {
        let (newest, wm) = (c["max_event_time"].as_i64(), c["low_watermark"].as_i64());
        newest.is_some() && wm.is_some() && newest < wm
    };
    assert!(
        wait_until(T, || component(&http, "", "out")
            .is_some_and(watermark_past_newest)),
        "the sink's watermark passes its newest event time"
    );

    let mut b = Browser::start();
    b.viewport(1600, 1000);
    b.navigate(&format!("http://{http}/"));
    let drawn = "document.querySelectorAll('#svg .node').length === 4";
    assert!(b.wait_for(drawn, T).is_some(), "4 components drawn");
    // At both sizes, after a redraw at that size, all four columns whole.
    for (width, height) in [(1600, 1000), (1280, 800)] {
        b.viewport(width, height);
        b.next_redraw();
        b.screenshot(&format!("status-page-{width}x{height}"));
        let cut = b.eval(CUT_OFF);
        assert_eq!(cut, json!([]), "at {width}x{height}, not shown whole");
    }

    let nodes = nodes(&mut b);
    for name in ["gen", "evens", "per_second", "out"] {
        node(&nodes, name);
    }
    // The source's line "in N/s   out N/s" shows a non-zero rate.
    let rates = line(node(&nodes, "gen"), "in ");
    let rate_in = rates
        .trim_start_matches("in ")
        .split('/')
        .next()
        .expect("a rate");
    assert!(rate_in != "0" && rate_in != "—", "gen's rate: {rates}");
    // "lag N s": never below zero, the sink behind the window included.
    for n in &nodes {
        let lag = line(n, "lag ");
        assert!(!lag.starts_with("lag -"), "{}: {lag}", n[0]);
    }
    assert_eq!(b.console_errors(), Vec::<String>::new(), "console errors");
    drop(b);
    term(&child);
    assert!(wait_exit(&mut child, T).success());
}

#[test]
fn a_page_left_open_on_a_stopped_worker_is_marked_stale() {
    let s = Scratch::new();
    let http = format!("127.0.0.1:{}", free_port());
    let topo = s.write(
        "stale.toml",
        r#"
[service]
data_dir = "{dir}/data"
[sources.gen]
type = "generator"
rate = 500
keys = 10
[sinks.out]
type = "file"
inputs = ["gen"]
path = "{dir}/out.txt"
format = "text"
"#,
    );
    let mut child = spawn(&topo, &http);
    assert!(wait_until(T, || http_get(&http, "/healthz")
        .is_some_and(|(c, _)| c == 200)));
    let mut b = Browser::start();
    b.navigate(&format!("http://{http}/"));
    let drawn = "document.querySelectorAll('#svg .node').length === 2";
    assert!(b.wait_for(drawn, T).is_some(), "2 components drawn");
    let header = "document.querySelector('header').innerText";
    let stale = format!("(t => /stale/.test(t) && t)({header})");
    let fresh = format!("!/stale/.test({header})");
    assert!(
        b.eval(&fresh).as_bool().expect("a boolean"),
        "fresh at first"
    );

    // A stopped worker accepts the connection and never answers.
    // SAFETY: a signal to our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGSTOP);
    }
    let marked = b.wait_for(&stale, T);
    b.screenshot("status-page-stale");
    // The mark says when the last good update came: "last update HH:MM:SS".
    let text = marked.as_ref().and_then(Value::as_str).unwrap_or("");
    let at = text.split_once("last update ").map_or("", |(_, t)| t);
    let clock = at.as_bytes().get(..8).unwrap_or(b"");
    let is_clock = clock.len() == 8
        && clock.iter().enumerate().all(|(i, c)| {
            if i % 3 == 2 {
                *c == b':'
            } else {
                c.is_ascii_digit()
            }
        });
    // SAFETY: as above.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGCONT);
    }
    assert!(
        marked.is_some(),
        "a page on a stopped worker marked stale: {}",
        b.eval(header)
    );
    assert!(is_clock, "the time of the last good update in: {text}");
    assert!(b.wait_for(drawn, T).is_some(), "the last figures kept");
    assert!(b.wait_for(&fresh, T).is_some(), "fresh again after SIGCONT");

    // A worker that has exited refuses the connection.
    term(&child);
    assert!(wait_exit(&mut child, T).success());
    assert!(b.wait_for(&stale, T).is_some(), "stale after the exit");
}

#[test]
fn a_stopped_cluster_peer_is_shown_as_not_answering_with_its_figures_missing() {
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
    // Shards are dealt round-robin: gen's one to w0, counts' two to w1
    // and w0, the sink's one to w1. From w0 alone: all of gen, 1 of 2
    // shards of counts, none of out.
    let local = |name| {
        let c = component(&net.http[0], "", name).expect("w0's /status");
        (c["local_shards"].as_u64(), c["shards"].as_u64())
    };
    assert_eq!(local("gen"), (Some(1), Some(1)));
    assert_eq!(local("counts"), (Some(1), Some(2)));
    assert_eq!(local("out"), (Some(0), Some(1)));
    // SAFETY: a signal to our own child.
    unsafe {
        libc::kill(workers[1].id() as i32, libc::SIGSTOP);
    }
    let mut b = Browser::start();
    b.viewport(1500, 560);
    b.navigate(&format!("http://{}/", net.http[0]));
    let w1_down = "[...document.querySelectorAll('#peers tr')].some(r => r.cells[0].textContent === 'w1' && r.querySelector('.down'))";
    let shown = b.wait_for(w1_down, T);
    b.screenshot("status-page-peer-stopped");
    let rows = b.eval(WORKERS);
    let nodes = nodes(&mut b);
    let errors = b.console_errors();
    drop(b);
    // SAFETY: as above.
    unsafe {
        libc::kill(workers[1].id() as i32, libc::SIGCONT);
    }
    assert!(shown.is_some(), "w1 shown as down: {rows}");
    // One status per worker, never "unreachable" beside "connected".
    assert_eq!(
        rows,
        json!([["w0 (this one)", "up"], ["w1", "not answering"]])
    );
    // The shards figure counts the shards whose figures are shown.
    assert!(line(node(&nodes, "gen"), "generator ·").ends_with(" · 1 shard"));
    let counts = node(&nodes, "counts");
    assert!(
        line(counts, "count ·").ends_with(" · 1 of 2 shards"),
        "{counts:?}"
    );
    assert!(counts.iter().any(|l| l == "1 of 2 workers not answering"));
    // The sink's only shard is on w1: no figures, and they read as missing.
    let out = node(&nodes, "out");
    assert!(line(out, "file ·").ends_with(" · 0 of 1 shards"), "{out:?}");
    assert_eq!(line(out, "in "), "in —/s   out —/s", "{out:?}");
    assert_eq!(line(out, "backlog "), "backlog —   timers —");
    assert!(out.iter().any(|l| l == "1 of 2 workers not answering"));
    assert_eq!(errors, Vec::<String>::new(), "console errors");
    for w in &workers {
        term(w);
    }
    for w in workers.iter_mut() {
        assert!(wait_exit(w, T).success());
    }
}
