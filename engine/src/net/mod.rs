//! The transport between workers: tokio TCP, one connection per pair of
//! workers (the worker listed later dials the one listed earlier), frames of
//! [`frame`], writes batched.
//!
//! The delivery protocol is the one executors use among themselves: what goes
//! over a connection is `Deliver`, `Ack` and `Watermark` messages with plan
//! channel and shard numbers. The network may lose anything: when a
//! connection comes up, every executor is told ([`Msg::PeerUp`]) and re-sends
//! all unacknowledged productions to that worker, acknowledges again what it
//! applied from it, and re-sends its watermarks; receivers drop duplicates by
//! channel sequence. While a peer is unreachable, messages for it are dropped
//! (they stay in the producers' outboxes) and the link redials with backoff.
//!
//! Handshake: the acceptor sends a `Challenge` (its id, topology fingerprint,
//! shard epochs, a nonce), the dialer answers `Hello` (the same about itself
//! and an HMAC-SHA256 of the acceptor's nonce keyed by the cluster secret),
//! the acceptor checks it and answers `Welcome` (its own HMAC of the dialer's
//! nonce) or `Refused`. Fencing: each side remembers the highest epoch it has
//! seen for every shard of its peers (persisted) and refuses a greeting with
//! a lower one: a stale copy of a worker (a zombie) cannot deliver anything.
//! A greeting at the epoch another process (another incarnation id) holds is
//! refused too. A newer incarnation of a peer replaces an older connection.
//!
//! After the handshake every frame is authenticated ([`seal`]): each write
//! ends with a `Seal` (HMAC-SHA256 under a key of the connection and the
//! direction), and the reader acts on frames only once their seal checks.

pub mod frame;
mod seal;

use crate::message::Msg;
use crate::plan::{Plan, Sid};
use crate::shared::Shared;
use bytes::BytesMut;
use crossbeam_channel::Sender;
use frame::{Frame, Greeting, Status, MAC_LEN};
use hmac::{Hmac, Mac};
use millrace_storage::{Cf, Store};
use parking_lot::Mutex;
use sha2::Sha256;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// How often a connection carries a `Status` frame (and proves it is alive).
const HEARTBEAT: Duration = Duration::from_millis(100);
/// How long a draining worker waits to hear whether its peers drain too.
pub(crate) const STATUS_SETTLE: Duration = Duration::from_millis(300);
/// A connection silent for this long is considered dead.
const SILENCE: Duration = Duration::from_secs(5);
/// Longest a handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Redial backoff: first and longest wait.
const REDIAL: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(1));
/// Bytes encoded before a write is issued.
const WRITE_BATCH: usize = 256 << 10;
/// After every worker is done, how long a worker waits for its peers to say
/// they know it, before it exits anyway.
const LINGER: Duration = Duration::from_secs(5);

/// Where executors put messages for one other worker.
pub(crate) type PeerQueue = mpsc::UnboundedSender<Vec<Msg>>;

/// What the transport needs from the worker that starts it.
pub(crate) struct TransportConfig {
    pub plan: Arc<Plan>,
    pub me: usize,
    pub listen: String,
    pub secret: Vec<u8>,
    /// `(shard, epoch)` of this worker's shards, as started.
    pub epochs: Vec<(u32, u64)>,
    /// Executors' inboxes.
    pub inboxes: Vec<Sender<Vec<Msg>>>,
    pub shared: Arc<Shared>,
    pub store: Arc<Store>,
}

/// The running transport: its runtime and what the worker asks it.
pub(crate) struct Transport {
    runtime: Option<tokio::runtime::Runtime>,
    net: Arc<Net>,
}

struct Peer {
    id: String,
    address: String,
    /// Latest `Status` received.
    status: Mutex<Status>,
    /// Our `finished` status has been written to this peer.
    told_finished: AtomicBool,
    up: AtomicBool,
}

struct Net {
    plan: Arc<Plan>,
    me: usize,
    secret: Vec<u8>,
    fingerprint: u64,
    epochs: Vec<(u32, u64)>,
    /// Highest epoch seen per shard of another worker, and the incarnation
    /// that holds it (0 when only the persisted epoch is known).
    seen_epochs: Mutex<HashMap<u32, (u64, u64)>>,
    /// This process's incarnation id.
    incarnation: u64,
    inboxes: Vec<Sender<Vec<Msg>>>,
    shared: Arc<Shared>,
    store: Arc<Store>,
    local_sids: Vec<Sid>,
    peers: Vec<Peer>,
    /// When every worker was first seen done.
    all_done_since: Mutex<Option<Instant>>,
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

impl Net {
    fn mac(&self, label: &str, nonce: u64, g: &Greeting) -> [u8; MAC_LEN] {
        // The key can be of any length: HMAC never rejects it.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        m.update(label.as_bytes());
        m.update(&nonce.to_be_bytes());
        m.update(g.worker.as_bytes());
        m.update(&g.topology.to_be_bytes());
        m.update(&g.incarnation.to_be_bytes());
        for (s, e) in &g.epochs {
            m.update(&s.to_be_bytes());
            m.update(&e.to_be_bytes());
        }
        m.finalize().into_bytes().into()
    }

    fn greeting(&self, nonce: u64) -> Greeting {
        Greeting {
            worker: self.peers[self.me].id.clone(),
            topology: self.fingerprint,
            epochs: self.epochs.clone(),
            nonce,
            incarnation: self.incarnation,
            mac: [0; MAC_LEN],
        }
    }

    fn refuse_count(&self, reason: &str) {
        self.shared
            .metrics
            .net_refused
            .with_label_values(&[reason])
            .inc();
    }

    /// Checks a greeting from worker `w`: same topology, epochs owned by it
    /// and not below any seen before. Records the epochs on success.
    fn check_greeting(&self, w: usize, g: &Greeting) -> Result<(), (&'static str, String)> {
        if g.topology != self.fingerprint {
            return Err((
                "topology",
                format!(
                    "worker `{}` runs a different topology or cluster list",
                    g.worker
                ),
            ));
        }
        let mut seen = self.seen_epochs.lock();
        for &(sid, epoch) in &g.epochs {
            if self.plan.shards.get(sid as usize).map(|s| s.worker) != Some(w) {
                return Err((
                    "worker",
                    format!(
                        "worker `{}` claims shard {sid}, which it does not own",
                        g.worker
                    ),
                ));
            }
            if let Some(&(had, holder)) = seen.get(&sid) {
                if epoch < had {
                    return Err((
                        "epoch",
                        format!(
                            "worker `{}` is stale: shard {sid} at epoch {epoch}, already seen at {had} (a zombie?)",
                            g.worker
                        ),
                    ));
                }
                if epoch == had && holder != 0 && holder != g.incarnation {
                    return Err((
                        "epoch",
                        format!(
                            "worker `{}`: another process already holds shard {sid} at epoch {epoch} (a zombie?)",
                            g.worker
                        ),
                    ));
                }
            }
        }
        let mut changed = Vec::new();
        for &(sid, epoch) in &g.epochs {
            let had = seen.insert(sid, (epoch, g.incarnation));
            if had.map(|(e, _)| e) != Some(epoch) {
                changed.push((sid, epoch));
            }
        }
        drop(seen);
        if !changed.is_empty() {
            let store = Arc::clone(&self.store);
            // RocksDB never runs on the runtime's threads.
            tokio::task::spawn_blocking(move || {
                let mut b = store.batch();
                for (sid, epoch) in changed {
                    b.put(
                        Cf::Meta,
                        &crate::layout::peer_epoch_key(sid),
                        &epoch.to_be_bytes(),
                    );
                }
                if let Err(e) = store.commit(b) {
                    tracing::warn!(error = %e, "could not persist peer epochs");
                }
            });
        }
        Ok(())
    }

    fn local_done(&self) -> bool {
        self.local_sids.iter().all(|&sid| {
            self.shared.shard_wm[sid as usize].load(Ordering::SeqCst) == crate::record::MAX_TIME
        })
    }

    fn all_done(&self) -> bool {
        self.local_done()
            && self
                .peers
                .iter()
                .enumerate()
                .all(|(w, p)| w == self.me || p.status.lock().done)
    }

    /// Sends `msgs` to the executors, grouped per executor.
    fn dispatch(&self, batches: &mut [Vec<Msg>]) {
        for (exec, q) in batches.iter_mut().enumerate() {
            if !q.is_empty() {
                let _ = self.inboxes[exec].send(std::mem::take(q));
            }
        }
    }
}

impl Transport {
    /// Binds the listener and starts one link per peer.
    pub fn start(cfg: TransportConfig) -> Result<(Transport, Vec<PeerQueue>), std::io::Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("millrace-net")
            .enable_all()
            .build()?;
        let cluster = cfg
            .plan
            .topology
            .cluster
            .clone()
            .ok_or_else(|| std::io::Error::other("no [cluster] in the topology"))?;
        let mut seen = HashMap::new();
        let scan = crate::layout::peer_epochs_prefix();
        cfg.store
            .for_each_prefix(Cf::Meta, &scan, |k, v| {
                if let (Ok(sid), Ok(e)) = (
                    crate::layout::parse_peer_epoch_sid(&k[scan.len()..]),
                    <[u8; 8]>::try_from(v).map(u64::from_be_bytes),
                ) {
                    seen.insert(sid, (e, 0));
                }
                true
            })
            .map_err(std::io::Error::other)?;
        let local_sids = cfg
            .plan
            .shards
            .iter()
            .enumerate()
            .filter(|(_, s)| s.worker == cfg.me)
            .map(|(i, _)| i as Sid)
            .collect();
        let net = Arc::new(Net {
            fingerprint: cfg.plan.fingerprint(),
            plan: cfg.plan,
            me: cfg.me,
            secret: cfg.secret,
            epochs: cfg.epochs,
            seen_epochs: Mutex::new(seen),
            incarnation: random_u64() | 1,
            inboxes: cfg.inboxes,
            shared: cfg.shared,
            store: cfg.store,
            local_sids,
            peers: cluster
                .workers
                .iter()
                .map(|w| Peer {
                    id: w.id.clone(),
                    address: w.address.clone(),
                    status: Mutex::new(Status::default()),
                    told_finished: AtomicBool::new(false),
                    up: AtomicBool::new(false),
                })
                .collect(),
            all_done_since: Mutex::new(None),
        });
        let listener = runtime.block_on(TcpListener::bind(&cfg.listen))?;
        let mut outlets = Vec::new();
        let mut accepted = Vec::new();
        for w in 0..net.peers.len() {
            let (tx, rx) = mpsc::unbounded_channel::<Vec<Msg>>();
            outlets.push(tx);
            let (atx, arx) = mpsc::unbounded_channel::<Conn>();
            accepted.push(atx);
            if w != net.me {
                runtime.spawn(link(Arc::clone(&net), w, rx, arx));
            }
        }
        runtime.spawn(accept_loop(Arc::clone(&net), listener, accepted));
        Ok((
            Transport {
                runtime: Some(runtime),
                net,
            },
            outlets,
        ))
    }

    /// Whether every worker of the cluster is done and the others know it (or
    /// have not said so for [`LINGER`] after this worker saw everyone done).
    pub fn finished(&self) -> bool {
        let net = &*self.net;
        if !net.all_done() {
            return false;
        }
        let since = *net.all_done_since.lock().get_or_insert_with(Instant::now);
        let told = net.peers.iter().enumerate().all(|(w, p)| {
            w == net.me || (p.status.lock().finished && p.told_finished.load(Ordering::SeqCst))
        });
        told || since.elapsed() >= LINGER
    }

    /// Whether no peer still needs this worker to drain: each one is either
    /// not draining itself (it will re-send after this worker restarts),
    /// not connected, or drained.
    pub fn peers_drained(&self) -> bool {
        let net = &*self.net;
        net.peers.iter().enumerate().all(|(w, p)| {
            let st = *p.status.lock();
            w == net.me || !st.stopping || st.drained || !p.up.load(Ordering::SeqCst)
        })
    }

    /// Peer ids whose connection is up, for `/status`.
    pub fn peers_up(&self) -> Vec<(String, bool)> {
        self.net
            .peers
            .iter()
            .enumerate()
            .filter(|(w, _)| *w != self.net.me)
            .map(|(_, p)| (p.id.clone(), p.up.load(Ordering::SeqCst)))
            .collect()
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        // Wait for the tasks to be dropped: they hold the store, which must
        // close (and stop RocksDB's threads) before the process exits.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

/// An authenticated connection and the bytes read past its handshake.
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    keys: seal::SessionKeys,
}

async fn read_frame(stream: &mut TcpStream, buf: &mut BytesMut) -> std::io::Result<Frame> {
    loop {
        match Frame::decode(buf) {
            Ok(Some(f)) => return Ok(f),
            Ok(None) => {}
            Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

async fn write_frame(stream: &mut TcpStream, f: &Frame) -> std::io::Result<()> {
    let mut b = BytesMut::new();
    f.encode(&mut b);
    stream.write_all(&b).await
}

async fn accept_loop(
    net: Arc<Net>,
    listener: TcpListener,
    accepted: Vec<mpsc::UnboundedSender<Conn>>,
) {
    let accepted = Arc::new(accepted);
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a cluster connection failed");
                tokio::time::sleep(REDIAL.0).await;
                continue;
            }
        };
        let net = Arc::clone(&net);
        let accepted = Arc::clone(&accepted);
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept_handshake(&net, stream)).await {
                Ok(Ok((w, conn))) => {
                    let _ = accepted[w].send(conn);
                }
                Ok(Err(e)) => tracing::debug!(%addr, error = %e, "cluster handshake failed"),
                Err(_) => tracing::debug!(%addr, "cluster handshake timed out"),
            }
        });
    }
}

/// The acceptor's side of the handshake; refusals are logged and counted.
async fn accept_handshake(net: &Net, mut stream: TcpStream) -> std::io::Result<(usize, Conn)> {
    stream.set_nodelay(true)?;
    let nonce = random_u64();
    write_frame(&mut stream, &Frame::Challenge(net.greeting(nonce))).await?;
    let mut buf = BytesMut::with_capacity(4096);
    let hello = match read_frame(&mut stream, &mut buf).await {
        Ok(Frame::Hello(g)) => g,
        Ok(other) => {
            net.shared
                .metrics
                .net_bad_frames
                .with_label_values(&["?"])
                .inc();
            return Err(std::io::Error::other(format!(
                "expected a hello, got {other:?}"
            )));
        }
        Err(e) => {
            if e.kind() == std::io::ErrorKind::InvalidData {
                net.shared
                    .metrics
                    .net_bad_frames
                    .with_label_values(&["?"])
                    .inc();
            }
            return Err(e);
        }
    };
    let verdict = (|| {
        let w = net
            .peers
            .iter()
            .position(|p| p.id == hello.worker)
            .filter(|&w| w > net.me)
            .ok_or((
                "worker",
                format!("`{}` is not a worker that dials this one", hello.worker),
            ))?;
        let mac = net.mac("hello", nonce, &hello);
        if !constant_time_eq(&mac, &hello.mac) {
            return Err((
                "secret",
                format!("worker `{}` does not know the cluster secret", hello.worker),
            ));
        }
        net.check_greeting(w, &hello)?;
        Ok(w)
    })();
    match verdict {
        Ok(w) => {
            let welcome = Frame::Welcome {
                mac: net.mac("welcome", hello.nonce, &net.greeting(0)),
            };
            write_frame(&mut stream, &welcome).await?;
            let keys = seal::SessionKeys::derive(
                &net.secret,
                &net.peers[net.me].id,
                &hello.worker,
                nonce,
                hello.nonce,
            );
            Ok((w, Conn { stream, buf, keys }))
        }
        Err((reason, message)) => {
            net.refuse_count(reason);
            tracing::warn!(peer = %stream.peer_addr().map_or_else(|_| "?".into(), |a| a.to_string()), reason, "refused a cluster connection: {message}");
            let _ = write_frame(
                &mut stream,
                &Frame::Refused {
                    reason: message.clone(),
                },
            )
            .await;
            Err(std::io::Error::other(message))
        }
    }
}

/// The dialer's side of the handshake.
async fn dial(net: &Net, w: usize) -> std::io::Result<Conn> {
    let peer = &net.peers[w];
    let mut stream = TcpStream::connect(&peer.address).await?;
    stream.set_nodelay(true)?;
    let mut buf = BytesMut::with_capacity(4096);
    let challenge = match read_frame(&mut stream, &mut buf).await? {
        Frame::Challenge(g) => g,
        other => {
            return Err(std::io::Error::other(format!(
                "expected a challenge, got {other:?}"
            )))
        }
    };
    if challenge.worker != peer.id {
        net.refuse_count("worker");
        return Err(std::io::Error::other(format!(
            "{} answered as `{}`, not `{}`",
            peer.address, challenge.worker, peer.id
        )));
    }
    if let Err((reason, message)) = net.check_greeting(w, &challenge) {
        net.refuse_count(reason);
        tracing::warn!(peer = %peer.id, reason, "refused a cluster connection: {message}");
        return Err(std::io::Error::other(message));
    }
    let mut hello = net.greeting(random_u64());
    hello.mac = net.mac("hello", challenge.nonce, &hello);
    write_frame(&mut stream, &Frame::Hello(hello.clone())).await?;
    match read_frame(&mut stream, &mut buf).await? {
        Frame::Welcome { mac } => {
            let want = net.mac("welcome", hello.nonce, &challenge);
            if !constant_time_eq(&mac, &want) {
                net.refuse_count("secret");
                return Err(std::io::Error::other(format!(
                    "worker `{}` does not know the cluster secret",
                    peer.id
                )));
            }
            let keys = seal::SessionKeys::derive(
                &net.secret,
                &net.peers[net.me].id,
                &peer.id,
                challenge.nonce,
                hello.nonce,
            );
            Ok(Conn { stream, buf, keys })
        }
        Frame::Refused { reason } => {
            net.refuse_count("by-peer");
            Err(std::io::Error::other(format!(
                "refused by `{}`: {reason}",
                peer.id
            )))
        }
        other => Err(std::io::Error::other(format!(
            "expected a welcome, got {other:?}"
        ))),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// One peer's link: connects (dialing or waiting for the peer to dial),
/// runs the connection, and starts over when it breaks.
async fn link(
    net: Arc<Net>,
    w: usize,
    mut out: mpsc::UnboundedReceiver<Vec<Msg>>,
    mut accepted: mpsc::UnboundedReceiver<Conn>,
) {
    let dialer = net.me > w;
    let peer_id = net.peers[w].id.clone();
    let mut backoff = REDIAL.0;
    let mut next: Option<Conn> = None;
    loop {
        // Connect; meanwhile what the executors send this peer is dropped
        // (it stays in their outboxes and is re-sent once connected).
        let conn = match next.take() {
            Some(c) => c,
            None if dialer => loop {
                let attempt = tokio::time::timeout(HANDSHAKE_TIMEOUT, dial(&net, w));
                tokio::pin!(attempt);
                let result = loop {
                    tokio::select! {
                        r = &mut attempt => break r,
                        m = out.recv() => if m.is_none() { return },
                    }
                };
                match result {
                    Ok(Ok(c)) => break c,
                    Ok(Err(e)) => tracing::debug!(peer = %peer_id, error = %e, "dial failed"),
                    Err(_) => tracing::debug!(peer = %peer_id, "dial timed out"),
                }
                let pause = tokio::time::sleep(backoff);
                tokio::pin!(pause);
                loop {
                    tokio::select! {
                        _ = &mut pause => break,
                        m = out.recv() => if m.is_none() { return },
                    }
                }
                backoff = (backoff * 2).min(REDIAL.1);
            },
            None => loop {
                tokio::select! {
                    c = accepted.recv() => match c {
                        Some(c) => break c,
                        None => return,
                    },
                    m = out.recv() => if m.is_none() { return },
                }
            },
        };
        backoff = REDIAL.0;
        while out.try_recv().is_ok() {}
        let metrics = &net.shared.metrics;
        metrics.net_connects.with_label_values(&[&peer_id]).inc();
        metrics.net_peer_up.with_label_values(&[&peer_id]).set(1);
        net.peers[w].up.store(true, Ordering::SeqCst);
        tracing::info!(peer = %peer_id, "connected");
        for inbox in &net.inboxes {
            let _ = inbox.send(vec![Msg::PeerUp { worker: w }]);
        }
        let Conn { stream, buf, keys } = conn;
        let (reader, writer) = stream.into_split();
        let (end, why) = run(&net, w, reader, writer, buf, keys, &mut out, &mut accepted).await;
        net.peers[w].up.store(false, Ordering::SeqCst);
        metrics.net_peer_up.with_label_values(&[&peer_id]).set(0);
        metrics.net_disconnects.with_label_values(&[&peer_id]).inc();
        match end {
            End::Replaced(c) => {
                tracing::info!(peer = %peer_id, "connection replaced by a newer one");
                next = Some(c);
            }
            End::Closed => tracing::info!(peer = %peer_id, reason = %why, "disconnected"),
            End::Shutdown => return,
        }
    }
}

enum End {
    Closed,
    Replaced(Conn),
    Shutdown,
}

#[allow(clippy::too_many_arguments)]
async fn run(
    net: &Arc<Net>,
    w: usize,
    reader: OwnedReadHalf,
    mut writer: OwnedWriteHalf,
    buf: BytesMut,
    keys: seal::SessionKeys,
    out: &mut mpsc::UnboundedReceiver<Vec<Msg>>,
    accepted: &mut mpsc::UnboundedReceiver<Conn>,
) -> (End, String) {
    let peer_id = net.peers[w].id.clone();
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<String>();
    let opener = seal::Opener::new(&keys.recv);
    let mut sealer = seal::Sealer::new(&keys.send);
    let read_task = tokio::spawn(read_loop(Arc::clone(net), w, reader, buf, opener, done_tx));
    let records_sent = net
        .shared
        .metrics
        .net_records_sent
        .with_label_values(&[&peer_id]);
    let bytes_sent = net
        .shared
        .metrics
        .net_bytes_sent
        .with_label_values(&[&peer_id]);
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    let mut wire = BytesMut::with_capacity(WRITE_BATCH);
    let outcome = loop {
        tokio::select! {
            m = out.recv() => {
                let Some(msgs) = m else { break (End::Shutdown, "shutting down".to_owned()) };
                let mut records = encode(&msgs, &mut wire);
                while wire.len() < WRITE_BATCH {
                    match out.try_recv() {
                        Ok(more) => records += encode(&more, &mut wire),
                        Err(_) => break,
                    }
                }
                records_sent.inc_by(records);
            }
            _ = heartbeat.tick() => {
                let done = net.local_done();
                let finished = net.all_done();
                let stopping = net.shared.stopping.load(Ordering::SeqCst);
                let drained = stopping && net.shared.drained();
                Frame::Status(Status { done, finished, stopping, drained }).encode(&mut wire);
                if finished {
                    // Written below. Should the write fail, the peer learns it
                    // on the next connection, or stops waiting after LINGER.
                    net.peers[w].told_finished.store(true, Ordering::SeqCst);
                }
            }
            why = &mut done_rx => break (End::Closed, why.unwrap_or_else(|_| "reader stopped".into())),
            c = accepted.recv() => match c {
                Some(c) => break (End::Replaced(c), "replaced".into()),
                None => break (End::Shutdown, "shutting down".into()),
            },
        }
        if !wire.is_empty() {
            sealer.seal(&mut wire);
            bytes_sent.inc_by(wire.len() as u64);
            if let Err(e) = writer.write_all(&wire).await {
                break (End::Closed, format!("write: {e}"));
            }
            wire.clear();
        }
    };
    read_task.abort();
    outcome
}

/// Encodes messages for the wire; returns how many were records.
fn encode(msgs: &[Msg], wire: &mut BytesMut) -> u64 {
    let mut records = 0;
    for m in msgs {
        let f = match m {
            Msg::Deliver { ch, seq, env } => {
                records += 1;
                Frame::Deliver {
                    ch: *ch,
                    seq: *seq,
                    env: env.clone(),
                }
            }
            Msg::Ack { ch, upto } => Frame::Ack {
                ch: *ch,
                upto: *upto,
            },
            Msg::Watermark { from, wm, idle, .. } => Frame::Watermark {
                from: *from,
                wm: *wm,
                idle: *idle,
            },
            Msg::PeerUp { .. } => continue,
        };
        f.encode(wire);
    }
    records
}

/// Reads frames and hands them to the executors until the connection fails,
/// goes silent, or breaks the protocol (counted as a bad frame).
async fn read_loop(
    net: Arc<Net>,
    w: usize,
    mut reader: OwnedReadHalf,
    mut buf: BytesMut,
    mut opener: seal::Opener,
    done: tokio::sync::oneshot::Sender<String>,
) {
    let peer_id = net.peers[w].id.clone();
    let metrics = &net.shared.metrics;
    let received = metrics.net_records_received.with_label_values(&[&peer_id]);
    let plan = &*net.plan;
    let mut batches: Vec<Vec<Msg>> = (0..net.inboxes.len()).map(|_| Vec::new()).collect();
    let on = |sid: Sid, worker: usize| {
        plan.shards
            .get(sid as usize)
            .is_some_and(|s| s.worker == worker)
    };
    // What the frames since the last seal say; acted on once it checks.
    let mut status = None;
    let why = 'conn: loop {
        loop {
            let bad = |what: String| {
                metrics.net_bad_frames.with_label_values(&[&peer_id]).inc();
                what
            };
            let frame = match Frame::take_raw(&mut buf).and_then(|raw| match raw {
                Some(raw) => {
                    let f = Frame::parse_raw(raw.clone())?;
                    if !matches!(f, Frame::Seal { .. }) {
                        opener.absorb(&raw);
                    }
                    Ok(Some(f))
                }
                None => Ok(None),
            }) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => break 'conn bad(format!("bad frame: {e}")),
            };
            match frame {
                Frame::Seal { mac } => {
                    if !opener.check(&mac) {
                        break 'conn bad(
                            "frames whose seal does not check (forged, altered, replayed or \
                             sealed with another key) refused"
                                .to_owned(),
                        );
                    }
                    net.dispatch(&mut batches);
                    if let Some(st) = status.take() {
                        *net.peers[w].status.lock() = st;
                    }
                }
                Frame::Deliver { ch, seq, env } => {
                    let Some(c) = plan.channels.get(ch as usize) else {
                        break 'conn bad(format!("delivery on unknown channel {ch}"));
                    };
                    if !on(c.dst, net.me) || !on(c.src, w) {
                        break 'conn bad(format!(
                            "delivery on channel {ch}, which is not between us"
                        ));
                    }
                    received.inc();
                    batches[plan.shards[c.dst as usize].executor].push(Msg::Deliver {
                        ch,
                        seq,
                        env,
                    });
                }
                Frame::Ack { ch, upto } => {
                    let Some(c) = plan.channels.get(ch as usize) else {
                        break 'conn bad(format!("ack on unknown channel {ch}"));
                    };
                    if !on(c.src, net.me) || !on(c.dst, w) {
                        break 'conn bad(format!("ack on channel {ch}, which is not between us"));
                    }
                    batches[plan.shards[c.src as usize].executor].push(Msg::Ack { ch, upto });
                }
                Frame::Watermark { from, wm, idle } => {
                    if !on(from, w) {
                        break 'conn bad(format!(
                            "watermark of shard {from}, which it does not own"
                        ));
                    }
                    let mut told = Vec::new();
                    for &(worker, exec) in &plan.shards[from as usize].downstream {
                        if worker == net.me && !told.contains(&exec) {
                            told.push(exec);
                            batches[exec].push(Msg::Watermark {
                                from,
                                wm,
                                idle,
                                counted: false,
                            });
                        }
                    }
                }
                Frame::Status(st) => status = Some(st),
                other => break 'conn bad(format!("unexpected {other:?} after the handshake")),
            }
        }
        buf.reserve(64 << 10);
        match tokio::time::timeout(SILENCE, reader.read_buf(&mut buf)).await {
            Ok(Ok(0)) => break "closed by peer".to_owned(),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => break format!("read: {e}"),
            Err(_) => break format!("silent for {SILENCE:?}"),
        }
    };
    // What came after the last good seal is not trusted: dropped (the
    // sender re-sends everything unacknowledged on the next connection).
    let _ = done.send(why);
}
