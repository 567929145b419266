//! The one exception to "checkpoint before delivery", all of it in this
//! file: a replayable source (one that can read again from any position it
//! reported, such as the generator or a file) has its productions kept in
//! memory only, never in the outbox. After a crash it reads again from its
//! committed position and numbers what it reads again with the same sequence
//! numbers, so receivers drop what they already applied. Two things follow:
//!
//! - its productions may leave before the turn's commit ([`send_early`],
//!   the one path out of an executor that takes no commit proof), and
//! - its committed position must never run ahead of what its consumers
//!   acknowledged: the position is committed only once every production
//!   before it is acknowledged, together with the sequence numbers that
//!   follow it ([`ReplayLog::checkpoint`]).
//!
//! The router asks [`ShardRt::uses_outbox`](super::ShardRt::uses_outbox)
//! whether a production goes into the outbox; everything else about the
//! exception is here.

use super::ShardRt;
use crate::delivery::OutChannel;
use crate::layout::position_key;
use crate::mapkey::FastMap;
use crate::message::{Msg, Outlet};
use crate::plan::{ChannelIdx, Plan};
use millrace_storage::{Batch, Cf};
use std::collections::VecDeque;

/// A source position and the next sequence number of each output channel
/// right after it.
type ReplayPoint = (Vec<u8>, Vec<(ChannelIdx, u64)>);

/// A replayable source's positions not yet committed, oldest first.
#[derive(Default)]
pub(crate) struct ReplayLog {
    pending: VecDeque<ReplayPoint>,
}

impl ReplayLog {
    /// The source reached `position`; `outs` hold what it produced up to it.
    pub(super) fn note(&mut self, position: Vec<u8>, outs: &FastMap<ChannelIdx, OutChannel>) {
        let seqs = outs.iter().map(|(ch, o)| (*ch, o.next_seq())).collect();
        self.pending.push_back((position, seqs));
    }

    /// Commits the newest position whose productions are all acknowledged,
    /// with the sequence numbers that follow it; what comes after it is
    /// replayed, with the same numbers, after a crash.
    pub(super) fn checkpoint(
        &mut self,
        batch: &mut Batch<'_>,
        plan: &Plan,
        prefix: &[u8],
        outs: &FastMap<ChannelIdx, OutChannel>,
    ) {
        let mut ready = None;
        while let Some((_, seqs)) = self.pending.front() {
            let acked = seqs
                .iter()
                .all(|(ch, next)| outs.get(ch).is_some_and(|o| o.acked() + 1 >= *next));
            if !acked {
                break;
            }
            ready = self.pending.pop_front();
        }
        if let Some((position, seqs)) = ready {
            batch.put(Cf::Meta, &position_key(prefix), &position);
            for (ch, next) in seqs {
                batch.put(Cf::Channels, &plan.next_seq_key(ch), &next.to_be_bytes());
            }
        }
    }
}

/// The one path out of an executor before its turn's commit: the
/// productions of a replayable source (see the module doc). Only deliveries
/// go this way, through their own queues (`scratch`, empty between calls);
/// acknowledgements and watermarks wait for the commit. `observe` sees the
/// queues before they go. Returns whether anything was sent.
pub(crate) fn send_early(
    plan: &Plan,
    at: (&crate::routes::Routes, usize),
    shard: &mut ShardRt,
    scratch: &mut [Vec<Msg>],
    peers: &[Outlet],
    observe: impl FnOnce(&[Vec<Msg>]),
) -> bool {
    debug_assert!(!shard.uses_outbox(), "only a replayable source sends early");
    shard.queue_sends(plan, at, scratch);
    observe(scratch);
    let mut sent = false;
    for (q, peer) in scratch.iter_mut().zip(peers) {
        if !q.is_empty() {
            debug_assert!(q.iter().all(|m| matches!(m, Msg::Deliver { .. })));
            peer.send(std::mem::take(q));
            sent = true;
        }
    }
    sent
}
