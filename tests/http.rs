//! The worker's HTTP server against hostile and unauthenticated clients:
//! half-sent requests time out, connections are bounded, and a configured
//! token guards `/status` and `/tap` while `/metrics` stays open.

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
