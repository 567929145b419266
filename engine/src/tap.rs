//! Live taps: copies of the records leaving a component, for an operator to
//! watch (as Vector's `tap`). A tap never slows the graph: copies go through a
//! bounded queue and are dropped (and counted) when the watcher is slow.

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Records queued per watcher before copies are dropped.
const TAP_QUEUE: usize = 4096;

pub(crate) struct Taps {
    active: Vec<AtomicBool>,
    watchers: Mutex<Vec<(usize, Sender<Vec<u8>>)>>,
    pub dropped: AtomicU64,
}

impl Taps {
    pub fn new(nodes: usize) -> Self {
        Taps {
            active: (0..nodes).map(|_| AtomicBool::new(false)).collect(),
            watchers: Mutex::new(Vec::new()),
            dropped: AtomicU64::new(0),
        }
    }

    /// Whether anyone watches `node` (one relaxed load: cheap on the hot path).
    pub fn is_active(&self, node: usize) -> bool {
        self.active[node].load(Ordering::Relaxed)
    }

    pub fn subscribe(&self, node: usize) -> Receiver<Vec<u8>> {
        let (tx, rx) = bounded(TAP_QUEUE);
        self.watchers.lock().push((node, tx));
        self.active[node].store(true, Ordering::Relaxed);
        rx
    }

    /// Hands a copy of one JSON line to every watcher of `node`.
    pub fn publish(&self, node: usize, line: impl Fn() -> Vec<u8>) {
        let mut watchers = self.watchers.lock();
        let mut line_once = None;
        watchers.retain(|(n, tx)| {
            if *n != node {
                return true;
            }
            let l = line_once.get_or_insert_with(&line).clone();
            match tx.try_send(l) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Err(TrySendError::Disconnected(_)) => false,
            }
        });
        if !watchers.iter().any(|(n, _)| *n == node) {
            self.active[node].store(false, Ordering::Relaxed);
        }
    }
}
