//! `/` (the status page), `/metrics`, `/healthz`, `/status` and `/tap` over
//! a minimal HTTP/1.1 server.
//!
//! The server starts before recovery, so `/healthz` answers 503 while the
//! worker rebuilds its shards, 200 while it runs, and 503 again while it drains.
//!
//! Hostile clients are bounded: a request head must arrive within
//! [`HEAD_TIMEOUT`] (else 408), at most [`MAX_CONNECTIONS`] are served at
//! once (more get 503 at once), and with a token configured `/status`,
//! `/tap` and `POST /stop` (and `/metrics` if asked) answer 401 without
//! `Authorization: Bearer TOKEN`. Web pages in a browser are kept out by
//! [`guard`]: a foreign `Host` (DNS rebinding) is refused without a token,
//! a control request must be same-origin and carry `X-Millrace`, and a
//! savepoint asked for over HTTP goes only where the operator allowed.

mod guard;

pub use guard::Access;
use guard::{Head, Refusal};
use millrace_engine::{Metrics, Worker};
use parking_lot::Mutex;
use percent_encoding::percent_decode_str;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long a client may take to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; a `/tap` holds one while it streams.
pub const MAX_CONNECTIONS: usize = 256;

const RECOVERING: u8 = 0;
const RUNNING: u8 = 1;
const DRAINING: u8 = 2;

/// What the HTTP endpoints read.
pub struct HttpState {
    pub metrics: Arc<Metrics>,
    auth: Auth,
    connections: Arc<tokio::sync::Semaphore>,
    worker: OnceLock<Weak<Worker>>,
    health: AtomicU8,
    rates: Mutex<Rates>,
    /// Set to stop the worker (as SIGTERM does).
    stop: Arc<AtomicBool>,
    /// Where `POST /stop?savepoint=URL` asked the worker's savepoint to go.
    stop_savepoint: Mutex<Option<String>>,
    /// The names served and the savepoint locations allowed.
    access: Access,
    /// Shard ownership as this worker last read it from etcd (`--join`).
    ownership: OnceLock<crate::ownership::Published>,
}

/// Records in/out per second per component, between the last two samples,
/// and the last [`HISTORY`] samples of records in per second (for the
/// status page's charts; bounded).
#[derive(Default)]
struct Rates {
    last: Option<(Instant, Vec<(u64, u64)>)>,
    per_second: Vec<(f64, f64)>,
    history: std::collections::VecDeque<Vec<f64>>,
}

/// Samples of the rates kept (one a second: five minutes).
const HISTORY: usize = 300;

/// The status page: self-contained (no external requests), it polls
/// `/status` and draws the graph.
const STATUS_PAGE: &str = include_str!("status.html");

/// Who may read what.
#[derive(Default, Clone)]
pub struct Auth {
    /// The bearer token `/status` and `/tap` need, if any.
    pub token: Option<String>,
    /// Whether `/metrics` needs it too.
    pub metrics: bool,
}

impl Auth {
    /// Whether a request with `head` may read `path`.
    fn allows(&self, path: &str, head: &Head) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        // The status page itself (and its icon) is static; the data it
        // reads is guarded.
        if path == "/"
            || path == "/favicon.ico"
            || path == "/healthz"
            || (path == "/metrics" && !self.metrics)
        {
            return true;
        }
        head.values("authorization").any(|value| {
            value
                .strip_prefix("Bearer ")
                .is_some_and(|given| same(given.trim().as_bytes(), token.as_bytes()))
        })
    }
}

/// Compares without stopping at the first difference, so that the time a
/// comparison takes says nothing about the token.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

impl HttpState {
    /// `stop` is the flag that stops the worker (a drain, as on SIGTERM).
    pub fn new(
        metrics: Arc<Metrics>,
        auth: Auth,
        access: Access,
        stop: Arc<AtomicBool>,
    ) -> Arc<Self> {
        Arc::new(HttpState {
            metrics,
            auth,
            connections: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
            worker: OnceLock::new(),
            health: AtomicU8::new(RECOVERING),
            rates: Mutex::new(Rates::default()),
            stop,
            stop_savepoint: Mutex::new(None),
            access,
            ownership: OnceLock::new(),
        })
    }

    /// Where a stop request asked for a savepoint, if one did.
    pub fn take_stop_savepoint(&self) -> Option<String> {
        self.stop_savepoint.lock().take()
    }

    /// The worker has recovered and runs.
    pub fn set_running(&self, worker: &Arc<Worker>) {
        let _ = self.worker.set(Arc::downgrade(worker));
        self.health.store(RUNNING, Ordering::SeqCst);
    }

    /// Shows, in `/status`, the ownership a joined worker reads from etcd.
    pub fn set_ownership(&self, seen: crate::ownership::Published) {
        let _ = self.ownership.set(seen);
    }

    pub fn set_draining(&self) {
        self.health.store(DRAINING, Ordering::SeqCst);
    }

    fn worker(&self) -> Option<Arc<Worker>> {
        self.worker.get().and_then(Weak::upgrade)
    }

    /// Samples the record counters; call about once a second.
    pub fn sample_rates(&self, worker: &Worker) {
        let now = Instant::now();
        let counts: Vec<(u64, u64)> = worker
            .status()
            .iter()
            .map(|c| (c.records_in, c.records_out))
            .collect();
        let mut g = self.rates.lock();
        if let Some((then, before)) = &g.last {
            let dt = now.duration_since(*then).as_secs_f64().max(1e-3);
            g.per_second = counts
                .iter()
                .zip(before)
                .map(|(a, b)| {
                    (
                        a.0.saturating_sub(b.0) as f64 / dt,
                        a.1.saturating_sub(b.1) as f64 / dt,
                    )
                })
                .collect();
            let sample = g.per_second.iter().map(|r| r.0).collect();
            if g.history.len() == HISTORY {
                g.history.pop_front();
            }
            g.history.push_back(sample);
        }
        g.last = Some((now, counts));
    }
}

/// Binds `addr` and serves in the background; returns the bound address.
pub async fn serve(addr: &str, state: Arc<HttpState>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let state = Arc::clone(&state);
            tokio::spawn(async move {
                let Ok(_permit) = Arc::clone(&state.connections).try_acquire_owned() else {
                    let mut stream = stream;
                    let _ =
                        refuse(&mut stream, &state, "busy", 503, "too many connections\n").await;
                    return;
                };
                if let Err(e) = handle(stream, state).await {
                    tracing::debug!(%peer, error = %e, "HTTP request failed");
                }
            });
        }
    });
    Ok(bound)
}

/// Reads a request head (up to the blank line) into `buf`; `None` when the
/// client closed first.
async fn read_head(stream: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
    let mut n = 0;
    while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
        if n == buf.len() {
            return Ok(Some(n));
        }
        let read = stream.read(&mut buf[n..]).await?;
        if read == 0 {
            return Ok(None);
        }
        n += read;
    }
    Ok(Some(n))
}

/// `POST /stop[?savepoint=URL]`: the worker drains as on SIGTERM, stops
/// and, with a savepoint URL, exports its shards there before it exits.
/// Answers at once (202); `millrace stop` then waits for the savepoint.
/// Refused cross-site, and to a savepoint outside `[service]
/// savepoint_targets` ([`guard`]).
async fn stop(
    stream: &mut TcpStream,
    state: &HttpState,
    head: &Head<'_>,
    query: &str,
) -> std::io::Result<()> {
    if let Err(r) = guard::check_control(head) {
        return refuse_with(stream, state, r).await;
    }
    let savepoint = match savepoint_asked(state, query).await {
        Ok(savepoint) => savepoint,
        Err(r) => return refuse_with(stream, state, r).await,
    };
    let accepted = {
        let mut asked = state.stop_savepoint.lock();
        let first = !state.stop.swap(true, Ordering::SeqCst);
        if first {
            *asked = savepoint.clone();
        }
        first
    };
    if !accepted {
        return respond(stream, 409, "text/plain", "already stopping\n").await;
    }
    tracing::info!(
        savepoint = savepoint.as_deref().unwrap_or("-"),
        "stop requested over HTTP"
    );
    let body = serde_json::json!({"stopping": true, "savepoint": savepoint}).to_string();
    respond(stream, 202, "application/json", &body).await
}

/// The normalised location `savepoint=URL` in `query` asks for, checked
/// against `[service] savepoint_targets` and opened once to see that it is
/// usable (an S3 client needs its endpoint and credentials); `None`
/// without one.
async fn savepoint_asked(state: &HttpState, query: &str) -> Result<Option<String>, Refusal> {
    let Some(raw) = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("savepoint="))
    else {
        return Ok(None);
    };
    let bad = |message: String| Refusal {
        code: 400,
        reason: "savepoint-target",
        message,
    };
    let url = percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| bad("savepoint: not UTF-8\n".to_owned()))?;
    let url = state.access.savepoint(&url)?.to_string();
    // Opening a store may build a client with its own runtime, which must
    // neither be made nor dropped on this one: on a blocking thread.
    let opened = {
        let url = url.clone();
        tokio::task::spawn_blocking(move || crate::savepoints::open(&url).map(drop)).await
    };
    match opened {
        Ok(Ok(())) => Ok(Some(url)),
        Ok(Err(e)) => Err(bad(format!("{e:#}\n"))),
        Err(e) => Err(Refusal {
            code: 500,
            reason: "savepoint-target",
            message: format!("checking the savepoint location failed: {e}\n"),
        }),
    }
}

async fn handle(mut stream: TcpStream, state: Arc<HttpState>) -> std::io::Result<()> {
    let mut buf = vec![0u8; 8192];
    let n = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream, &mut buf)).await {
        Err(_) => {
            return refuse(
                &mut stream,
                &state,
                "timeout",
                408,
                "request head took too long\n",
            )
            .await;
        }
        Ok(r) => match r? {
            None => return Ok(()),
            Some(n) if n == buf.len() => {
                return respond(&mut stream, 431, "text/plain", "request header too large\n").await
            }
            Some(n) => n,
        },
    };
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    let head = Head::parse(&text);
    // Without a token, only this machine's own names are served (DNS
    // rebinding); with one, the token guards the data.
    if state.auth.token.is_none() {
        let local = stream.local_addr()?.ip();
        if let Err(r) = state.access.check_host(&head, local) {
            return refuse_with(&mut stream, &state, r).await;
        }
    }
    let (method, target) = (head.method, head.target);
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if method != "GET" && !(method == "POST" && path == "/stop") {
        let why = "only GET is served (and POST /stop)\n";
        return respond(&mut stream, 405, "text/plain", why).await;
    }
    if !state.auth.allows(path, &head) {
        let why = "this endpoint needs `Authorization: Bearer TOKEN` ([service] http_token)\n";
        return refuse(&mut stream, &state, "token", 401, why).await;
    }
    match path {
        "/stop" if method == "POST" => stop(&mut stream, &state, &head, query).await,
        "/stop" => {
            respond(
                &mut stream,
                405,
                "text/plain",
                "POST /stop stops the worker\n",
            )
            .await
        }
        "/metrics" => {
            if let Some(w) = state.worker() {
                let _ = tokio::task::spawn_blocking(move || w.refresh_gauges()).await;
            }
            let body = state.metrics.render();
            respond(&mut stream, 200, "text/plain; version=0.0.4", &body).await
        }
        "/" => respond(&mut stream, 200, "text/html; charset=utf-8", STATUS_PAGE).await,
        // Browsers ask for it with every page; no icon, and no error either.
        "/favicon.ico" => respond(&mut stream, 204, "text/plain", "").await,
        "/healthz" => {
            let problems = millrace_engine::health::problems();
            let (code, body) = match state.health.load(Ordering::SeqCst) {
                RECOVERING => (503, "recovering\n".to_owned()),
                RUNNING if problems.is_empty() => (200, "ok\n".to_owned()),
                // Running, but a connector cannot reach what it needs (and
                // retries): not healthy, and saying why.
                RUNNING => (
                    503,
                    problems
                        .iter()
                        .map(|(what, why)| format!("degraded: {what}: {why}\n"))
                        .collect(),
                ),
                _ => (503, "draining\n".to_owned()),
            };
            respond(&mut stream, code, "text/plain", &body).await
        }
        "/status" => {
            let Some(w) = state.worker() else {
                return respond(
                    &mut stream,
                    503,
                    "application/json",
                    "{\"state\":\"recovering\"}",
                )
                .await;
            };
            let (rates, history) = {
                let g = state.rates.lock();
                (g.per_second.clone(), g.history.clone())
            };
            let components: Vec<serde_json::Value> = w
                .status()
                .into_iter()
                .enumerate()
                .map(|(i, c)| {
                    let mut v = serde_json::to_value(&c).unwrap_or_default();
                    let (rin, rout) = rates.get(i).copied().unwrap_or_default();
                    v["records_in_per_second"] = rin.into();
                    v["records_out_per_second"] = rout.into();
                    // Records in per second, oldest first, one a second.
                    v["history"] = history
                        .iter()
                        .map(|s| s.get(i).copied().unwrap_or(0.0))
                        .collect::<Vec<f64>>()
                        .into();
                    v
                })
                .collect();
            let mut body = serde_json::json!({
                "uptime_seconds": w.uptime().as_secs_f64(),
                "backlog": w.backlog(),
                "components": components,
                "peers": w
                    .peers()
                    .into_iter()
                    .map(|(id, up)| serde_json::json!({ "worker": id, "connected": up }))
                    .collect::<Vec<_>>(),
            });
            if let Some(positions) = w.log_positions() {
                let shards: Vec<serde_json::Value> = positions
                    .into_iter()
                    .map(|(shard, seq, snapshot)| {
                        serde_json::json!({ "shard": shard, "seq": seq, "snapshot_seq": snapshot })
                    })
                    .collect();
                let log = w.log_describe().unwrap_or_default();
                // What /healthz says of it: commits waiting on it now.
                let name = millrace_engine::commit_log::health_name(&log);
                let waiting = millrace_engine::health::problems()
                    .into_iter()
                    .find(|(what, _)| *what == name)
                    .map(|(_, why)| why);
                body["commit_log"] =
                    serde_json::json!({ "log": log, "waiting": waiting, "shards": shards });
            }
            if let Some(mut seen) = state.ownership.get().and_then(|o| o.lock().clone()) {
                let now = crate::ownership::now_ms();
                let read = seen["read_ms"].as_i64().unwrap_or(now);
                seen["read_ms_ago"] = (now - read).max(0).into();
                body["ownership"] = seen;
            }
            if query.split('&').any(|kv| kv == "cluster=1") {
                cluster_view(&w, &state.auth, &mut body).await;
            }
            let body = body.to_string();
            respond(&mut stream, 200, "application/json", &body).await
        }
        "/tap" => {
            let component = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("component="))
                .unwrap_or("");
            let component = percent_decode_str(component).decode_utf8_lossy();
            let Some(rx) = state.worker().and_then(|w| w.tap(&component)) else {
                return respond(
                    &mut stream,
                    404,
                    "text/plain",
                    &format!("no component `{component}`\n"),
                )
                .await;
            };
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n\r\n")
                .await?;
            loop {
                match rx.try_recv() {
                    Ok(line) => stream.write_all(&line).await?,
                    Err(crossbeam_channel::TryRecvError::Empty) => {
                        stream.flush().await?;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(crossbeam_channel::TryRecvError::Disconnected) => return Ok(()),
                }
            }
        }
        _ => {
            respond(
                &mut stream,
                404,
                "text/plain",
                "not found: try /, /metrics, /healthz, /status or /tap?component=NAME\n",
            )
            .await
        }
    }
}

/// Adds the other workers' figures to this worker's `/status` (`body`):
/// `workers` (each with whether its HTTP answered and whether this worker
/// is connected to it) and, per component, its figures summed over the
/// workers that answered (the lowest watermark). Other workers are asked
/// at the `http` address their `[[cluster.workers]]` entry gives.
async fn cluster_view(w: &Worker, auth: &Auth, body: &mut serde_json::Value) {
    let Some(cluster) = &w.plan().topology.cluster else {
        return;
    };
    let connected: std::collections::HashMap<String, bool> = w.peers().into_iter().collect();
    let me = w.index();
    let asks = cluster.workers.iter().enumerate().map(|(i, c)| {
        let addr = c.http.clone();
        let token = auth.token.clone();
        async move {
            if i == me {
                return None;
            }
            let addr = addr?;
            tokio::time::timeout(PEER_STATUS_TIMEOUT, peer_status(&addr, token.as_deref()))
                .await
                .ok()
                .flatten()
        }
    });
    // All asked at once; answers in the workers' order.
    let pending: Vec<_> = asks.map(tokio::spawn).collect();
    let mut answers = Vec::with_capacity(pending.len());
    for p in pending {
        answers.push(p.await.ok().flatten());
    }
    let mut workers = Vec::new();
    for (i, (c, answer)) in cluster.workers.iter().zip(&answers).enumerate() {
        workers.push(serde_json::json!({
            "worker": c.id,
            "http": c.http,
            "this": i == me,
            "reachable": i == me || answer.is_some(),
            "connected": i == me || connected.get(&c.id).copied().unwrap_or(false),
        }));
    }
    if let Some(components) = body["components"].as_array_mut() {
        for peer in answers.iter().flatten() {
            let Some(theirs) = peer["components"].as_array() else {
                continue;
            };
            for (mine, their) in components.iter_mut().zip(theirs) {
                if mine["name"] != their["name"] {
                    continue;
                }
                for field in [
                    "records_in_per_second",
                    "records_out_per_second",
                    "backlog",
                    "timers",
                    "records_in",
                    "records_out",
                    "late_records",
                    "bad_records",
                    "local_shards",
                ] {
                    let sum =
                        mine[field].as_f64().unwrap_or(0.0) + their[field].as_f64().unwrap_or(0.0);
                    mine[field] = if mine[field].is_f64() || their[field].is_f64() {
                        sum.into()
                    } else {
                        (sum as i64).into()
                    };
                }
                let low = [&mine["low_watermark"], &their["low_watermark"]]
                    .into_iter()
                    .filter_map(serde_json::Value::as_i64)
                    .min();
                let high = [&mine["max_event_time"], &their["max_event_time"]]
                    .into_iter()
                    .filter_map(serde_json::Value::as_i64)
                    .max();
                mine["low_watermark"] = low.into();
                mine["max_event_time"] = high.into();
                if let (Some(a), Some(b)) =
                    (mine["history"].as_array(), their["history"].as_array())
                {
                    let n = a.len().min(b.len());
                    let summed: Vec<f64> = a[a.len() - n..]
                        .iter()
                        .zip(&b[b.len() - n..])
                        .map(|(x, y)| x.as_f64().unwrap_or(0.0) + y.as_f64().unwrap_or(0.0))
                        .collect();
                    mine["history"] = summed.into();
                }
            }
        }
    }
    body["workers"] = workers.into();
}

/// How long the status page's cluster view waits for another worker.
const PEER_STATUS_TIMEOUT: Duration = Duration::from_secs(1);

/// Another worker's own `/status`, or `None` if it does not answer well.
async fn peer_status(addr: &str, token: Option<&str>) -> Option<serde_json::Value> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    s.write_all(
        format!("GET /status HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}\r\n")
            .as_bytes(),
    )
    .await
    .ok()?;
    let mut buf = Vec::new();
    s.take(16 << 20).read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8(buf).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    serde_json::from_str(body).ok()
}

/// Answers with `r` and counts it under its reason.
async fn refuse_with(stream: &mut TcpStream, state: &HttpState, r: Refusal) -> std::io::Result<()> {
    refuse(stream, state, r.reason, r.code, &r.message).await
}

/// Answers `code` with `body` and counts the refusal under `reason`.
async fn refuse(
    stream: &mut TcpStream,
    state: &HttpState,
    reason: &str,
    code: u16,
    body: &str,
) -> std::io::Result<()> {
    state
        .metrics
        .http_refused
        .with_label_values(&[reason])
        .inc();
    respond(stream, code, "text/plain", body).await
}

/// The status codes the server sends, each with its reason phrase
/// (RFC 9110).
const REASON_PHRASES: &[(u16, &str)] = &[
    (200, "OK"),
    (202, "Accepted"),
    (204, "No Content"),
    (400, "Bad Request"),
    (401, "Unauthorized"),
    (403, "Forbidden"),
    (404, "Not Found"),
    (405, "Method Not Allowed"),
    (408, "Request Timeout"),
    (409, "Conflict"),
    (421, "Misdirected Request"),
    (431, "Request Header Fields Too Large"),
    (500, "Internal Server Error"),
    (503, "Service Unavailable"),
];

fn reason_phrase(code: u16) -> &'static str {
    REASON_PHRASES
        .iter()
        .find(|(c, _)| *c == code)
        .map_or("", |(_, phrase)| phrase)
}

async fn respond(
    stream: &mut TcpStream,
    code: u16,
    ctype: &str,
    body: &str,
) -> std::io::Result<()> {
    debug_assert!(
        !reason_phrase(code).is_empty(),
        "no reason phrase for {code}"
    );
    let reason = reason_phrase(code);
    // A 204 has neither a body nor its length.
    let head = if code == 204 {
        format!("HTTP/1.1 {code} {reason}\r\nConnection: close\r\n\r\n")
    } else {
        format!(
            "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
    };
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_sent_has_its_own_reason_phrase() {
        for (code, phrase) in [
            (200, "OK"),
            (202, "Accepted"),
            (204, "No Content"),
            (400, "Bad Request"),
            (401, "Unauthorized"),
            (403, "Forbidden"),
            (404, "Not Found"),
            (405, "Method Not Allowed"),
            (408, "Request Timeout"),
            (409, "Conflict"),
            (421, "Misdirected Request"),
            (431, "Request Header Fields Too Large"),
            (500, "Internal Server Error"),
            (503, "Service Unavailable"),
        ] {
            assert_eq!(reason_phrase(code), phrase, "{code}");
        }
        let phrases: std::collections::BTreeSet<&str> =
            REASON_PHRASES.iter().map(|(_, p)| *p).collect();
        assert_eq!(
            phrases.len(),
            REASON_PHRASES.len(),
            "two codes share a phrase"
        );
    }
}
