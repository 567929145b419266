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
mod handshake;
mod link;
mod seal;

use crate::message::Msg;
use crate::plan::{Plan, Sid};
use crate::shared::Shared;
use crossbeam_channel::Sender;
use frame::Status;
pub(crate) use handshake::random_u64;
use handshake::{accept_loop, Conn};
use millrace_storage::{Cf, Store};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
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
    /// Highest epoch seen per shard of another worker, and the incarnation
    /// that holds it (0 when only the persisted epoch is known).
    seen_epochs: Mutex<HashMap<u32, (u64, u64)>>,
    /// This process's incarnation id.
    incarnation: u64,
    inboxes: Vec<Sender<Vec<Msg>>>,
    shared: Arc<Shared>,
    store: Arc<Store>,
    peers: Vec<Peer>,
    /// When every worker was first seen done.
    all_done_since: Mutex<Option<Instant>>,
}

impl Net {
    /// The transport's state for `cfg`, with the epochs of other workers'
    /// shards persisted by earlier runs; binds and dials nothing.
    fn new(cfg: TransportConfig) -> Result<Net, std::io::Error> {
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
        Ok(Net {
            fingerprint: cfg.plan.fingerprint(),
            plan: cfg.plan,
            me: cfg.me,
            secret: cfg.secret,
            seen_epochs: Mutex::new(seen),
            incarnation: random_u64() | 1,
            inboxes: cfg.inboxes,
            shared: cfg.shared,
            store: cfg.store,
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
        })
    }

    fn local_done(&self) -> bool {
        let routes = &self.shared.routes;
        // A shard nobody runs now (moving) is nobody's done.
        (0..self.plan.shards.len() as Sid).all(|sid| routes.owner(sid).is_some())
            && routes.shards_of(self.me).iter().all(|&sid| {
                self.shared.shard_wm[sid as usize].load(Ordering::SeqCst) == crate::record::MAX_TIME
            })
    }

    /// The epochs of the shards this worker runs now, for its greeting.
    fn epochs(&self) -> Vec<(u32, u64)> {
        let routes = &self.shared.routes;
        routes
            .shards_of(self.me)
            .into_iter()
            .map(|sid| (sid, routes.epoch(sid)))
            .collect()
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
        let listen = cfg.listen.clone();
        let net = Arc::new(Net::new(cfg)?);
        let listener = runtime.block_on(TcpListener::bind(&listen))?;
        let mut outlets = Vec::new();
        let mut accepted = Vec::new();
        for w in 0..net.peers.len() {
            let (tx, rx) = mpsc::unbounded_channel::<Vec<Msg>>();
            outlets.push(tx);
            let (atx, arx) = mpsc::unbounded_channel::<Conn>();
            accepted.push(atx);
            if w != net.me {
                runtime.spawn(link::link(Arc::clone(&net), w, rx, arx));
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
