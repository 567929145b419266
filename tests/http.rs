//! The worker's HTTP server against hostile and unauthenticated clients:
//! half-sent requests time out, connections are bounded, and a configured
//! token guards `/status`, `/tap` and `POST /stop` while `/metrics` stays
//! open.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use support::*;

const T: Duration = Duration::from_secs(60);

/// A generator that runs until stopped, with an HTTP server on `http`.
fn running(s: &Scratch, service: &str) -> std::path::PathBuf {
    s.write(
        "t.toml",
        &format!(
            r#"
[service]
data_dir = "{{dir}}/data"
{service}
[sources.gen]
type = "generator"
rate = 100
[sinks.out]
type = "file"
inputs = ["gen"]
path = "{{dir}}/out.jsonl"
"#
        ),
    )
}

/// GET `path` with extra header lines; returns the status code.
fn get_with(addr: &str, path: &str, headers: &str) -> Option<u16> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}\r\n").ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

#[test]
fn half_sent_requests_time_out_and_connections_are_bounded() {
    let s = Scratch::new();
    let http = format!("127.0.0.1:{}", free_port());
    let mut child = spawn(&running(&s, ""), &http);
    assert!(wait_until(T, || http_get(&http, "/healthz")
        .is_some_and(|(c, _)| c == 200)));
    // 300 clients that never finish their request head.
    let mut slow: Vec<TcpStream> = (0..300)
        .map(|_| {
            let mut c = TcpStream::connect(&http).expect("connect");
            c.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {http}\r\n").as_bytes())
                .expect("half a request");
            c.set_read_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
            c
        })
        .collect();
    // Every one of them gets an answer and is closed: 503 at once for those
    // past the connection limit, 408 for the rest after the head timeout.
    let started = Instant::now();
    let mut codes = std::collections::BTreeMap::new();
    for c in &mut slow {
        let mut answer = String::new();
        c.read_to_string(&mut answer).expect("the server closes it");
        let code: u16 = answer
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        *codes.entry(code).or_insert(0) += 1;
    }
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(codes.get(&503), Some(&44), "{codes:?}");
    assert_eq!(codes.get(&408), Some(&256), "{codes:?}");
    // The server is free again.
    assert_eq!(http_get(&http, "/healthz").map(|(c, _)| c), Some(200));
    assert_eq!(
        metric(&http, "millrace_http_refused_total{reason=\"timeout\"}"),
        Some(256.0)
    );
    term(&child);
    assert!(wait_exit(&mut child, T).success());
}

#[test]
fn a_token_guards_status_and_tap_but_not_metrics() {
    let s = Scratch::new();
    let http = format!("127.0.0.1:{}", free_port());
    let mut child = spawn(&running(&s, "http_token = \"tap-and-status\""), &http);
    assert!(wait_until(T, || http_get(&http, "/healthz")
        .is_some_and(|(c, _)| c == 200)));
    let good = "Authorization: Bearer tap-and-status\r\n";
    let bad = "Authorization: Bearer tap-and-statuz\r\n";
    assert_eq!(get_with(&http, "/status", ""), Some(401));
    assert_eq!(get_with(&http, "/status", bad), Some(401));
    assert_eq!(get_with(&http, "/status", good), Some(200));
    assert_eq!(get_with(&http, "/tap?component=gen", ""), Some(401));
    assert_eq!(get_with(&http, "/tap?component=gen", good), Some(200));
    assert_eq!(get_with(&http, "/metrics", ""), Some(200));
    // The icon a browser asks for with the page is no error, token or not.
    let (status, _) = exchange(
        &http,
        &[&format!(
            "GET /favicon.ico HTTP/1.1\r\nHost: {http}\r\n\r\n"
        )],
    )
    .expect("an answer");
    assert_eq!(status, "HTTP/1.1 204 No Content");
    assert_eq!(
        metric(&http, "millrace_http_refused_total{reason=\"token\"}"),
        Some(3.0)
    );
    term(&child);
    assert!(wait_exit(&mut child, T).success());
}

#[test]
fn the_status_page_and_the_figures_it_draws() {
    let s = Scratch::new();
    let http = format!("127.0.0.1:{}", free_port());
    let mut child = spawn(&running(&s, "http_token = \"page-token\""), &http);
    assert!(wait_until(T, || http_get(&http, "/healthz")
        .is_some_and(|(c, _)| c == 200)));
    // The page is static and self-contained: no token, no other host.
    let (code, page) = http_get(&http, "/").expect("the page");
    assert_eq!(code, 200);
    assert!(
        page.starts_with("<!doctype html>"),
        "{}",
        &page[..40.min(page.len())]
    );
    assert!(page.contains("fetch(\"/status?cluster=1\""));
    for external in [
        "<script src",
        "<link",
        "@import",
        "fetch(\"http",
        "url(http",
    ] {
        assert!(
            !page.contains(external),
            "the page loads nothing from elsewhere: {external}"
        );
    }
    // What it draws: per component rates, backlog, watermark, late and bad
    // records, and a bounded history of the rate (one sample a second).
    let status = |headers: &str| -> Option<serde_json::Value> {
        let mut c = TcpStream::connect(&http).ok()?;
        write!(c, "GET /status HTTP/1.1\r\nHost: {http}\r\n{headers}\r\n").ok()?;
        let mut body = String::new();
        c.read_to_string(&mut body).ok()?;
        serde_json::from_str(body.split_once("\r\n\r\n")?.1).ok()
    };
    let auth = "Authorization: Bearer page-token\r\n";
    assert!(status("").is_none(), "/status needs the token");
    assert!(wait_until(T, || {
        status(auth).is_some_and(|v| {
            v["components"][0]["history"]
                .as_array()
                .is_some_and(|h| h.len() >= 2)
        })
    }));
    let v = status(auth).expect("status");
    let gen = &v["components"][0];
    assert_eq!(gen["name"], "gen");
    for field in [
        "records_in_per_second",
        "backlog",
        "low_watermark",
        "late_records",
        "bad_records",
    ] {
        assert!(!gen[field].is_null(), "{field} in {gen}");
    }
    assert!(gen["history"].as_array().expect("history").len() <= 300);
    term(&child);
    assert!(wait_exit(&mut child, T).success());
}

/// `method path` with extra header lines; returns the status and the body.
fn request(addr: &str, method: &str, path: &str, headers: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{headers}\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    let code = answer.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, answer.split_once("\r\n\r\n")?.1.to_owned()))
}

#[test]
fn stop_over_http_needs_the_token_and_a_usable_savepoint_url_and_drains() {
    let s = Scratch::new();
    let http = format!("127.0.0.1:{}", free_port());
    let service = "http_token = \"stop-it\"\nsavepoint_targets = [\"file://{dir}/sps\"]";
    let mut child = spawn(&running(&s, service), &http);
    assert!(wait_until(T, || http_get(&http, "/healthz")
        .is_some_and(|(c, _)| c == 200)));
    let token = "Authorization: Bearer stop-it\r\nX-Millrace: 1\r\n";
    assert_eq!(request(&http, "POST", "/stop", "").map(|r| r.0), Some(401));
    assert_eq!(
        request(&http, "GET", "/stop", token).map(|r| r.0),
        Some(405)
    );
    assert_eq!(
        request(&http, "PUT", "/status", token).map(|r| r.0),
        Some(405)
    );
    let (code, body) = request(
        &http,
        "POST",
        "/stop?savepoint=ftp%3A%2F%2Fhost%2Fsp",
        token,
    )
    .expect("answer");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("`ftp://` is not supported"), "{body}");
    // Refused requests stop nothing.
    assert_eq!(http_get(&http, "/healthz").map(|(c, _)| c), Some(200));
    assert!(child.try_wait().expect("try_wait").is_none());
    let stop = millrace()
        .args(["stop", "--http", &http])
        .env("MILLRACE_HTTP_TOKEN", "stop-it")
        .output()
        .expect("millrace stop");
    assert!(
        stop.status.success(),
        "{}",
        String::from_utf8_lossy(&stop.stderr)
    );
    assert!(wait_exit(&mut child, T).success(), "drained and exited");
    // What it wrote is whole: every line one record.
    let out = lines(&s.path("out.jsonl"));
    assert!(!out.is_empty());
    assert!(out
        .iter()
        .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
}

/// Sends a request in `pieces`, each its own TCP segment (a short pause
/// between them makes the server read the head in several reads); returns
/// the status line and the body.
fn exchange(addr: &str, pieces: &[&str]) -> Option<(String, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_nodelay(true).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    for (i, piece) in pieces.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(30));
        }
        s.write_all(piece.as_bytes()).ok()?;
        s.flush().ok()?;
    }
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.to_owned(), body.to_owned()))
}

/// The status code of a status line.
fn code(status_line: &str) -> u16 {
    status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// `POST target` to `addr` with `Host: addr` and `headers`.
fn post(addr: &str, target: &str, headers: &str) -> (String, String) {
    exchange(
        addr,
        &[&format!(
            "POST {target} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n{headers}\r\n"
        )],
    )
    .expect("an HTTP answer")
}

fn encode(url: &str) -> String {
    url.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[test]
fn cross_site_requests_cannot_stop_the_worker() {
    let s = Scratch::new();
    let port = free_port();
    let http = format!("127.0.0.1:{port}");
    let mut child = spawn(&running(&s, ""), &http);
    assert!(wait_until(T, || http_get(&http, "/healthz")
        .is_some_and(|(c, _)| c == 200)));
    let evil = s.path("evil");
    let to_evil = format!(
        "/stop?savepoint={}",
        encode(&format!("file://{}", evil.display()))
    );
    // What a web page on another site makes a browser send: a form-like POST
    // (text/plain needs no preflight), with the browser's own Origin and
    // Sec-Fetch-Site; and variants of it.
    let cross_site = [
        "Origin: http://evil.example\r\nSec-Fetch-Site: cross-site\r\nContent-Type: text/plain\r\n",
        "Origin: http://evil.example\r\nX-Millrace: 1\r\n",
        "origin: null\r\nx-millrace: 1\r\n",
        "Sec-Fetch-Site: same-site\r\nX-Millrace: 1\r\n",
        "SEC-FETCH-SITE: Cross-Site\r\nX-Millrace: 1\r\n",
        &format!("Origin: http://127.0.0.1:{}\r\nX-Millrace: 1\r\n", port + 1),
        &format!("Origin: http://{http}.evil.example\r\nX-Millrace: 1\r\n"),
        &format!("Origin: http://{http}\r\nOrigin: http://evil.example\r\nX-Millrace: 1\r\n"),
        &format!("Origin: http://{http}\r\nSec-Fetch-Site: cross-site\r\nX-Millrace: 1\r\n"),
    ];
    for headers in cross_site {
        let (status, body) = post(&http, &to_evil, headers);
        assert_eq!(code(&status), 403, "{headers:?}: {status} {body}");
        assert!(body.contains("cross-site"), "{headers:?}: {body}");
    }
    // Split across segments, in the middle of the Origin header.
    let (status, body) = exchange(
        &http,
        &[
            &format!("POST /stop HTTP/1.1\r\nHost: {http}\r\nX-Millrace: 1\r\nOri"),
            "gin: http://evil.exa",
            "mple\r\nContent-Length: 0\r\n\r\n",
        ],
    )
    .expect("an answer");
    assert_eq!(code(&status), 403, "{status} {body}");
    // A simple request (no custom header), as an HTML form or a page's
    // `fetch` without preflight sends it, and a browser that sends neither
    // Origin nor Sec-Fetch-Site.
    for headers in ["", "Content-Type: application/x-www-form-urlencoded\r\n"] {
        let (status, body) = post(&http, "/stop", headers);
        assert_eq!(code(&status), 403, "{status} {body}");
        assert!(body.contains("X-Millrace"), "{body}");
    }
    // Nothing stopped and nothing written.
    assert_eq!(http_get(&http, "/healthz").map(|(c, _)| c), Some(200));
    assert!(child.try_wait().expect("try_wait").is_none());
    assert!(
        !evil.exists(),
        "a refused stop wrote into {}",
        evil.display()
    );
    assert_eq!(
        metric(&http, "millrace_http_refused_total{reason=\"cross-site\"}"),
        Some(10.0)
    );
    assert_eq!(
        metric(
            &http,
            "millrace_http_refused_total{reason=\"plain-request\"}"
        ),
        Some(2.0)
    );
    // A savepoint over HTTP needs configured targets, even same-origin.
    let (status, body) = post(&http, &to_evil, "X-Millrace: 1\r\n");
    assert_eq!(code(&status), 403, "{status} {body}");
    assert!(body.contains("[service] savepoint_targets"), "{body}");
    assert!(!evil.exists());
    assert_eq!(
        metric(
            &http,
            "millrace_http_refused_total{reason=\"savepoint-target\"}"
        ),
        Some(1.0)
    );
    // What the status page itself (same origin) would send is accepted.
    let (status, body) = post(
        &http,
        "/stop",
        &format!("Origin: http://{http}\r\nSec-Fetch-Site: same-origin\r\nX-Millrace: 1\r\n"),
    );
    assert_eq!(status, "HTTP/1.1 202 Accepted", "{body}");
    assert!(wait_exit(&mut child, T).success(), "drained and exited");
}

#[test]
fn a_savepoint_over_http_goes_only_under_a_configured_target() {
    let s = Scratch::new();
    let http = format!("127.0.0.1:{}", free_port());
    let service = r#"savepoint_targets = ["file://{dir}/sps", "s3://backups/millrace"]"#;
    let mut child = spawn(&running(&s, service), &http);
    assert!(wait_until(T, || http_get(&http, "/healthz")
        .is_some_and(|(c, _)| c == 200)));
    let dir = s.dir.path().display().to_string();
    let stop_to = |url: &str| {
        post(
            &http,
            &format!("/stop?savepoint={}", encode(url)),
            "X-Millrace: 1\r\n",
        )
    };
    for outside in [
        format!("file://{dir}/sps/../evil"),
        format!("file://{dir}/sps/sp/../../evil"),
        format!("file://{dir}/spsx"),
        format!("file://{dir}/sps/%2e%2e/evil"),
        format!("{dir}/evil"),
        format!("file://{dir}"),
        "sps/relative".to_owned(),
        "s3://backups/millrace-other/x".to_owned(),
        "s3://other/millrace/x".to_owned(),
        "s3://backups/millrace/../x".to_owned(),
        "ftp://host/sps".to_owned(),
    ] {
        let (status, body) = stop_to(&outside);
        assert!(
            status == "HTTP/1.1 403 Forbidden" || status == "HTTP/1.1 400 Bad Request",
            "{outside}: {status} {body}"
        );
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "{outside} stopped it"
        );
    }
    // A query that is not UTF-8 once decoded.
    let (status, _) = post(&http, "/stop?savepoint=%FF", "X-Millrace: 1\r\n");
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
    assert_eq!(
        metric(
            &http,
            "millrace_http_refused_total{reason=\"savepoint-target\"}"
        ),
        Some(12.0)
    );
    for p in ["evil", "spsx", "sps"] {
        assert!(!s.path(p).exists(), "{p} was written");
    }
    // Under a target (normalised): accepted, drained, written there.
    let (status, body) = stop_to(&format!("file://{dir}/sps/./sp1/"));
    assert_eq!(status, "HTTP/1.1 202 Accepted", "{body}");
    assert!(wait_exit(&mut child, T).success(), "exported and exited");
    assert!(s.path("sps/sp1/manifest.json").exists());
}

#[test]
fn foreign_hosts_are_refused_unless_a_token_is_set() {
    let s = Scratch::new();
    let port = free_port();
    let http = format!("127.0.0.1:{port}");
    let mut child = spawn(&running(&s, ""), &http);
    assert!(wait_until(T, || http_get(&http, "/healthz")
        .is_some_and(|(c, _)| c == 200)));
    let get = |host_lines: &str, path: &str| {
        exchange(
            &http,
            &[&format!(
                "GET {path} HTTP/1.1\r\n{host_lines}Connection: close\r\n\r\n"
            )],
        )
        .map(|(status, _)| code(&status))
    };
    // DNS rebinding: a page on evil.example whose name now points here.
    let mut refused = 0.0;
    for path in ["/status", "/tap?component=gen", "/metrics", "/", "/healthz"] {
        assert_eq!(
            get(&format!("Host: evil.example:{port}\r\n"), path),
            Some(421),
            "{path}"
        );
        refused += 1.0;
    }
    for host in [
        format!("host: evil.example:{port}\r\n"),
        "HOST: evil.example\r\n".to_owned(),
        format!("Host: 127.0.0.1.evil.example:{port}\r\n"),
        format!("Host: localhost.evil.example:{port}\r\n"),
        format!("Host: evil.localhost:{port}\r\n"),
        format!("Host: 127.0.0.1@evil.example:{port}\r\n"),
        format!("Host: [::1]evil.example:{port}\r\n"),
        "Host: 127.0.0.1:99999\r\n".to_owned(),
        "Host: 127.0.0.1:\r\n".to_owned(),
        "Host: ::1\r\n".to_owned(),
        "Host:\r\n".to_owned(),
        String::new(),
        format!("Host: {http}\r\nHost: evil.example:{port}\r\n"),
        format!("Host: evil.example:{port}\r\nHost: {http}\r\n"),
    ] {
        let code = get(&host, "/status");
        assert!(matches!(code, Some(400 | 421)), "{host:?}: {code:?}");
        refused += 1.0;
    }
    // Split across segments in the middle of the Host header.
    let (status, _) = exchange(
        &http,
        &[
            "GET /status HTTP/1.1\r\nHo",
            "st: evil.exam",
            &format!("ple:{port}\r\n\r\n"),
        ],
    )
    .expect("an answer");
    assert_eq!(code(&status), 421, "{status}");
    refused += 1.0;
    // This machine's own names, with any port (an SSH tunnel's too).
    for host in [
        format!("Host: {http}\r\n"),
        format!("Host: localhost:{port}\r\n"),
        "host: LOCALHOST\r\n".to_owned(),
        "Host: localhost:8080\r\n".to_owned(),
        format!("Host: 127.0.0.2:{port}\r\n"),
        format!("Host: [::1]:{port}\r\n"),
        "Host: [::1]\r\n".to_owned(),
        format!("Host: [::ffff:127.0.0.1]:{port}\r\n"),
    ] {
        assert_eq!(get(&host, "/status"), Some(200), "{host:?}");
    }
    assert_eq!(
        metric(&http, "millrace_http_refused_total{reason=\"host\"}"),
        Some(refused)
    );
    term(&child);
    assert!(wait_exit(&mut child, T).success());

    // With a token, the token guards the data and any Host is served.
    let s = Scratch::new();
    let http = format!("127.0.0.1:{}", free_port());
    let mut child = spawn(&running(&s, "http_token = \"any-host\""), &http);
    assert!(wait_until(T, || http_get(&http, "/healthz")
        .is_some_and(|(c, _)| c == 200)));
    let (status, _) = exchange(
        &http,
        &["GET /status HTTP/1.1\r\nHost: status.example.com\r\nAuthorization: Bearer any-host\r\n\r\n"],
    )
    .expect("an answer");
    assert_eq!(status, "HTTP/1.1 200 OK");
    term(&child);
    assert!(wait_exit(&mut child, T).success());
}

#[test]
fn an_address_other_machines_reach_without_a_token_is_warned_about() {
    let started = |service: &str, bind: &str, probe: &str| -> String {
        let s = Scratch::new();
        let log = std::fs::File::create(s.path("stderr")).expect("log file");
        let mut child = Running(
            millrace()
                .args([
                    "run",
                    running(&s, service).to_str().expect("utf-8"),
                    "--http",
                    bind,
                ])
                .stdout(std::process::Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn"),
        );
        assert!(wait_until(T, || http_get(probe, "/healthz")
            .is_some_and(|(c, _)| c == 200)));
        term(&child);
        assert!(wait_exit(&mut child, T).success());
        std::fs::read_to_string(s.path("stderr")).expect("stderr")
    };
    let port = free_port();
    let open = started("", &format!("0.0.0.0:{port}"), &format!("127.0.0.1:{port}"));
    assert!(
        open.contains("WARN") && open.contains("http_token") && open.contains("0.0.0.0"),
        "{open}"
    );
    let port = free_port();
    let guarded = started(
        "http_token = \"guarded\"",
        &format!("0.0.0.0:{port}"),
        &format!("127.0.0.1:{port}"),
    );
    assert!(!guarded.contains("http_token"), "{guarded}");
    let port = free_port();
    let local = started(
        "",
        &format!("127.0.0.1:{port}"),
        &format!("127.0.0.1:{port}"),
    );
    assert!(!local.contains("http_token"), "{local}");
}
