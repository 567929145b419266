//! The messages between executors (and, over the transport, between
//! workers), and where an executor sends them.

use crate::plan::{ChannelIdx, Sid};
use crate::record::Envelope;
use crossbeam_channel::Sender;

/// A message between executors (and, in a cluster, between workers).
pub(crate) enum Msg {
    /// Production `seq` of channel `ch`.
    Deliver {
        ch: ChannelIdx,
        seq: u64,
        env: Envelope,
    },
    /// The consumer of `ch` applied everything up to `upto`.
    Ack { ch: ChannelIdx, upto: u64 },
    /// Shard `from`'s output watermark rose to `wm`, or it became idle
    /// (left out of its consumers' minimum) or active again. `counted` when
    /// it was sent by an executor of this worker (and counted as in flight).
    Watermark {
        from: Sid,
        wm: i64,
        idle: bool,
        counted: bool,
    },
    /// A connection to worker `worker` was (re)established: what was sent to
    /// it may be lost, so send it all again.
    PeerUp { worker: usize },
    /// Start, stop or re-route one shard (never sent to another worker).
    Shard(crate::executor::Control),
}

/// Where an executor's messages go: another executor of this worker, or the
/// transport's queue for another worker.
#[derive(Clone)]
pub(crate) enum Outlet {
    Local(Sender<Vec<Msg>>),
    Remote(tokio::sync::mpsc::UnboundedSender<Vec<Msg>>),
    /// This worker's own slot among the remote ones: never used.
    None,
}

impl Outlet {
    pub fn send(&self, msgs: Vec<Msg>) {
        // A closed queue means the worker is shutting down (or the transport
        // is gone); what was not delivered stays in the outbox.
        match self {
            Outlet::Local(tx) => {
                let _ = tx.send(msgs);
            }
            Outlet::Remote(tx) => {
                let _ = tx.send(msgs);
            }
            Outlet::None => {}
        }
    }
}
