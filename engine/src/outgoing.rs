//! What leaves an executor, and when. Acknowledgements, productions and
//! watermarks are queued per destination during a turn and handed out by
//! [`Outgoing::flush`], which takes the [`Committed`] proof that only
//! [`commit`] makes: nothing queued here can leave before the turn's commit
//! returned. The one exception, a replayable source's productions, has its
//! own named path ([`crate::shard::send_early`]).

use crate::message::{Msg, Outlet};
use crate::plan::Plan;
use crate::shard::ShardRt;
use millrace_storage::{Batch, StorageError, Store};

/// Proof that the current batch is durable. Only [`commit`] makes one, and
/// only [`Outgoing::flush`] takes it. (`with_something` says whether the
/// turn committed anything.)
#[must_use = "acknowledgements and productions wait for this proof"]
pub(crate) struct Committed {
    pub with_something: bool,
    _private: (),
}

/// Commits `batch` (nothing to write when it is empty) and returns the proof.
pub(crate) fn commit(store: &Store, batch: Batch<'_>) -> Result<Committed, StorageError> {
    let with_something = !batch.is_empty();
    if with_something {
        store.commit(batch)?;
    }
    Ok(Committed {
        with_something,
        _private: (),
    })
}

/// Per destination (the executors of this worker, then the other workers):
/// what waits for the turn's commit.
pub(crate) struct Outgoing {
    queues: Vec<Vec<Msg>>,
}

impl Outgoing {
    pub fn new(destinations: usize) -> Self {
        Outgoing {
            queues: (0..destinations).map(|_| Vec::new()).collect(),
        }
    }

    /// Queues `msg` for destination `to`.
    pub fn push(&mut self, to: usize, msg: Msg) {
        self.queues[to].push(msg);
    }

    /// Queues the productions of `shard` that may be sent now.
    pub fn queue_sends(
        &mut self,
        plan: &Plan,
        at: (&crate::routes::Routes, usize),
        shard: &mut ShardRt,
    ) {
        shard.queue_sends(plan, at, &mut self.queues);
    }

    /// What is queued, by destination.
    #[cfg(test)]
    pub fn queued(&self) -> &[Vec<Msg>] {
        &self.queues
    }

    /// Hands what is queued for each destination to it: only once the
    /// turn's commit returned, which the proof stands for.
    pub fn flush(&mut self, peers: &[Outlet], _committed: &Committed) {
        for (q, peer) in self.queues.iter_mut().zip(peers) {
            if !q.is_empty() {
                peer.send(std::mem::take(q));
            }
        }
    }
}

/// What executor `exec` is about to hand out, for the commit-order tests.
#[cfg(test)]
pub(crate) fn sent_step(exec: usize, early: bool, queues: &[Vec<Msg>]) -> crate::shared::Step {
    let count = |f: fn(&Msg) -> bool| queues.iter().flatten().filter(|m| f(m)).count();
    crate::shared::Step::Sent {
        exec,
        early,
        acks: count(|m| matches!(m, Msg::Ack { .. })),
        deliveries: count(|m| matches!(m, Msg::Deliver { .. })),
        watermarks: count(|m| matches!(m, Msg::Watermark { .. })),
    }
}
