//! `socket`: text lines from a TCP server, as Spark's `socketTextStream`.
//!
//! **Not replayable.** A TCP stream cannot be rewound: lines that arrived but
//! were not yet committed when the worker crashed are lost, and there is no
//! position to resume from. Everything after a line is committed is exactly
//! once as usual. Use the `file` source (or a broker) where input must
//! survive crashes.
//!
//! A reader thread connects (reconnecting with backoff when the server goes
//! away) and hands lines to the engine through a bounded queue, so a slow
//! graph slows the reading.

use crate::options;
use bytes::Bytes;
use crossbeam_channel::{bounded, Receiver, TryRecvError};
use millrace_engine::{now_micros, Emitter, Registry, Source, SourceError, SourcePoll};
use serde::Deserialize;
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::time::Duration;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    address: String,
}

/// The socket source.
pub struct SocketSource {
    address: String,
    lines: Option<Receiver<Bytes>>,
}

impl SocketSource {
    /// A source reading lines from the server at `address` (`host:port`).
    pub fn new(address: String) -> Self {
        SocketSource {
            address,
            lines: None,
        }
    }
}

fn read_loop(address: String, tx: crossbeam_channel::Sender<Bytes>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        match TcpStream::connect(&address) {
            Ok(stream) => {
                backoff = Duration::from_millis(50);
                tracing::info!(%address, "socket source connected");
                let mut reader = BufReader::new(stream);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    match reader.read_until(b'\n', &mut line) {
                        Ok(0) => break,
                        Ok(_) => {
                            while matches!(line.last(), Some(b'\n' | b'\r')) {
                                line.pop();
                            }
                            if tx.send(Bytes::copy_from_slice(&line)).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(%address, error = %e, "socket source read failed");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(%address, error = %e, "socket source cannot connect yet"),
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

impl Source for SocketSource {
    fn open(&mut self, _position: Option<&[u8]>) -> Result<(), SourceError> {
        let (tx, rx) = bounded(8192);
        let address = self.address.clone();
        std::thread::Builder::new()
            .name("millrace-socket".into())
            .spawn(move || read_loop(address, tx))
            .map_err(|source| SourceError::Io {
                what: format!("starting the reader of {}", self.address),
                source,
            })?;
        self.lines = Some(rx);
        Ok(())
    }

    fn poll(&mut self, out: &mut Emitter<'_>, max: usize) -> Result<SourcePoll, SourceError> {
        let Some(rx) = &self.lines else {
            return Ok(SourcePoll::Idle);
        };
        let now = now_micros();
        while out.len() < max {
            match rx.try_recv() {
                Ok(line) => out.emit(Bytes::from(self.address.clone()), line, now),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        Ok(if out.is_empty() {
            SourcePoll::Idle
        } else {
            SourcePoll::Ready
        })
    }

    fn position(&self) -> Vec<u8> {
        Vec::new()
    }
}

pub(crate) fn register(r: &mut Registry) {
    r.source("socket", |c| {
        let o: Options = options(c)?;
        if !o.address.contains(':') {
            return Err(c
                .options
                .error(Some("address"), format!("`{}` is not host:port", o.address)));
        }
        Ok(Box::new(SocketSource::new(o.address)))
    });
}
