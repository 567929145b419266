//! A fault-injecting TCP proxy: it forwards connections from `listen` to
//! `target` and, on demand, cuts every live connection, delays what it
//! forwards, splits writes into small random pieces, or injects bytes
//! between two cluster frames (it follows the frames' length fields).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct Inner {
    target: String,
    live: Mutex<Vec<TcpStream>>,
    delay_micros: AtomicU64,
    split: AtomicBool,
    stop: AtomicBool,
    /// Bytes to insert once, between two frames, after the handshake.
    inject: Mutex<Option<Vec<u8>>>,
    /// How many injections were made.
    injected: AtomicU64,
}

/// A running proxy; it stops (and closes its connections) when dropped.
pub struct Proxy {
    /// The address it listens on.
    pub listen: String,
    inner: Arc<Inner>,
}

impl Proxy {
    /// Listens on `listen` and forwards to `target`.
    pub fn start(listen: &str, target: &str) -> Proxy {
        let listener = TcpListener::bind(listen).expect("proxy bind");
        let inner = Arc::new(Inner {
            target: target.to_owned(),
            live: Mutex::new(Vec::new()),
            delay_micros: AtomicU64::new(0),
            split: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            inject: Mutex::new(None),
            injected: AtomicU64::new(0),
        });
        let i = Arc::clone(&inner);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if i.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(&i.target) else {
                    continue; // the worker is down: the dialer sees a closed connection
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut live = i.live.lock().expect("lock");
                    live.retain(|s| s.peer_addr().is_ok());
                    for s in [&client, &server] {
                        if let Ok(c) = s.try_clone() {
                            live.push(c);
                        }
                    }
                }
                for (from, to) in [(&client, &server), (&server, &client)] {
                    let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
                        continue;
                    };
                    let i = Arc::clone(&i);
                    std::thread::spawn(move || pump(&i, from, to));
                }
            }
        });
        Proxy {
            listen: listen.to_owned(),
            inner,
        }
    }

    /// How many connections it forwards now.
    pub fn live(&self) -> usize {
        let live = self.inner.live.lock().expect("lock");
        live.iter().filter(|s| s.peer_addr().is_ok()).count() / 2
    }

    /// Cuts every live connection; returns how many it cut.
    pub fn cut(&self) -> usize {
        let mut live = self.inner.live.lock().expect("lock");
        let n = live.iter().filter(|s| s.peer_addr().is_ok()).count() / 2;
        for s in live.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        n
    }

    /// Delays every forwarded piece by `d`.
    pub fn set_delay(&self, d: Duration) {
        self.inner
            .delay_micros
            .store(d.as_micros() as u64, Ordering::SeqCst);
    }

    /// Inserts `bytes` once into a live connection (either direction),
    /// between two frames and after the handshake's.
    pub fn inject(&self, bytes: Vec<u8>) {
        *self.inner.inject.lock().expect("lock") = Some(bytes);
    }

    /// How many injections were made so far.
    pub fn injected(&self) -> u64 {
        self.inner.injected.load(Ordering::SeqCst)
    }

    /// Forwards in pieces of 1 to 7 bytes when on.
    pub fn set_split(&self, on: bool) {
        self.inner.split.store(on, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        self.cut();
        // Wake the accept loop so that it sees `stop`.
        let _ = TcpStream::connect(&self.listen);
    }
}

/// Where frames start in one direction of a connection.
#[derive(Default)]
struct Framing {
    header: Vec<u8>,
    /// Bytes left of the current frame's body.
    body_left: usize,
    frames: u64,
}

impl Framing {
    /// Follows `data`; returns the offsets in it where a frame starts, once
    /// at least `after` frames have passed.
    fn boundaries(&mut self, data: &[u8], after: u64) -> Vec<usize> {
        let mut at = Vec::new();
        let mut k = 0;
        while k < data.len() {
            if self.body_left == 0 && self.header.is_empty() && self.frames >= after {
                at.push(k);
            }
            if self.body_left > 0 {
                let t = self.body_left.min(data.len() - k);
                self.body_left -= t;
                k += t;
                if self.body_left == 0 {
                    self.frames += 1;
                }
                continue;
            }
            let t = (8 - self.header.len()).min(data.len() - k);
            self.header.extend_from_slice(&data[k..k + t]);
            k += t;
            if self.header.len() == 8 {
                let len = u32::from_be_bytes([
                    self.header[0],
                    self.header[1],
                    self.header[2],
                    self.header[3],
                ]);
                self.body_left = len as usize;
                self.header.clear();
            }
        }
        at
    }
}

fn pump(i: &Inner, mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 << 10];
    let mut framing = Framing::default();
    let mut r: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(from.local_addr().map_or(0, |a| a.port()));
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let delay = i.delay_micros.load(Ordering::SeqCst);
        if delay > 0 {
            std::thread::sleep(Duration::from_micros(delay));
        }
        let mut data = &buf[..n];
        // The handshake is at most two frames each way.
        let boundaries = framing.boundaries(data, 2);
        if let Some(&at) = boundaries.first() {
            let forged = i.inject.lock().expect("lock").take();
            if let Some(forged) = forged {
                let ok = to.write_all(&data[..at]).is_ok() && to.write_all(&forged).is_ok();
                i.injected.fetch_add(1, Ordering::SeqCst);
                if !ok {
                    break;
                }
                data = &data[at..];
            }
        }
        let ok = if i.split.load(Ordering::SeqCst) {
            let mut ok = true;
            while !data.is_empty() && ok {
                r ^= r << 13;
                r ^= r >> 7;
                r ^= r << 17;
                let k = (1 + r % 7).min(data.len() as u64) as usize;
                ok = to.write_all(&data[..k]).and_then(|()| to.flush()).is_ok();
                data = &data[k..];
            }
            ok
        } else {
            to.write_all(data).is_ok()
        };
        if !ok {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
