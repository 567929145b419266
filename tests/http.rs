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
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n").ok()?;
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
            c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
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
        write!(c, "GET /status HTTP/1.1\r\nHost: x\r\n{headers}\r\n").ok()?;
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
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n"
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
    let mut child = spawn(&running(&s, "http_token = \"stop-it\""), &http);
    assert!(wait_until(T, || http_get(&http, "/healthz")
        .is_some_and(|(c, _)| c == 200)));
    let token = "Authorization: Bearer stop-it\r\n";
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
