//! `/metrics`, `/healthz` and `/status` over a minimal HTTP/1.1 server.

use millrace_engine::{Metrics, Worker};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What `/healthz` reports.
#[derive(Default)]
pub struct Health(AtomicU8);

const RECOVERING: u8 = 0;
const RUNNING: u8 = 1;
const DRAINING: u8 = 2;

impl Health {
    pub fn set_running(&self) {
        self.0.store(RUNNING, Ordering::SeqCst);
    }
    pub fn set_draining(&self) {
        self.0.store(DRAINING, Ordering::SeqCst);
    }
    fn describe(&self) -> (u16, &'static str) {
        match self.0.load(Ordering::SeqCst) {
            RECOVERING => (503, "recovering\n"),
            RUNNING => (200, "ok\n"),
            _ => (503, "draining\n"),
        }
    }
}

/// Binds `addr` and serves in the background; returns the bound address.
pub async fn serve(
    addr: &str,
    worker: Arc<Worker>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let weak = Arc::downgrade(&worker);
    drop(worker);
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let (weak, metrics, health) = (weak.clone(), Arc::clone(&metrics), Arc::clone(&health));
            tokio::spawn(async move {
                if let Err(e) = handle(stream, weak, metrics, health).await {
                    tracing::debug!(%peer, error = %e, "HTTP request failed");
                }
            });
        }
    });
    Ok(bound)
}

async fn handle(
    mut stream: TcpStream,
    worker: std::sync::Weak<Worker>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 8192];
    let mut n = 0;
    while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
        if n == buf.len() {
            return respond(&mut stream, 431, "text/plain", "request header too large\n").await;
        }
        let read = stream.read(&mut buf[n..]).await?;
        if read == 0 {
            return Ok(());
        }
        n += read;
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        return respond(&mut stream, 405, "text/plain", "only GET is served\n").await;
    }
    let path = path.split('?').next().unwrap_or("");
    match path {
        "/metrics" => {
            if let Some(w) = worker.upgrade() {
                let w2 = Arc::clone(&w);
                let _ = tokio::task::spawn_blocking(move || w2.refresh_gauges()).await;
            }
            let body = metrics.render();
            respond(&mut stream, 200, "text/plain; version=0.0.4", &body).await
        }
        "/healthz" => {
            let (code, body) = health.describe();
            respond(&mut stream, code, "text/plain", body).await
        }
        "/status" => {
            let body = match worker.upgrade() {
                Some(w) => serde_json::json!({
                    "uptime_seconds": w.uptime().as_secs_f64(),
                    "backlog": w.backlog(),
                    "components": w.status(),
                })
                .to_string(),
                None => "{}".to_owned(),
            };
            respond(&mut stream, 200, "application/json", &body).await
        }
        _ => {
            respond(
                &mut stream,
                404,
                "text/plain",
                "not found: try /metrics, /healthz or /status\n",
            )
            .await
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    code: u16,
    ctype: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
