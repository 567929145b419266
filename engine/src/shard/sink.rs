//! A sink shard's runtime: the sink, and for a sink that
//! [defers](crate::Sink::defers) durability, which deliveries are written
//! but not yet durable.
//!
//! A deferring sink is never waited for. Its deliveries are applied at once
//! (the in-memory dedup moves on, so a retry within the run is dropped), but
//! each is committed as applied and acknowledged upstream only once the sink
//! says that its write is durable. Until then the producer keeps it in its
//! outbox: a crash delivers it again, and the sink skips at its restart what
//! it finds already written.

use crate::api::{Sink, SinkError};
use crate::plan::ChannelIdx;
use std::collections::{BTreeMap, VecDeque};

pub(crate) struct SinkRt {
    pub sink: Box<dyn Sink>,
    /// A sink that flushes at commits wrote something since the last one.
    pub written: bool,
    /// `Some` for a sink that defers.
    deferred: Option<Deferred>,
}

/// What a deferring sink has written and what of it is durable.
struct Deferred {
    /// The sink's writes so far (its count: one per write call).
    writes: u64,
    /// Deliveries written and not yet durable, in order: the sink's write
    /// count after each, its input channel and sequence number.
    pending: VecDeque<(u64, ChannelIdx, u64)>,
    /// Per input channel: the highest sequence number durable, which is
    /// what is committed as applied and acknowledged.
    durable: BTreeMap<ChannelIdx, u64>,
}

/// What a checkpoint of a deferring sink commits: the inputs whose durable
/// sequence number moved, and the sink's position with them.
pub(crate) struct DurableNow {
    pub applied: Vec<(ChannelIdx, u64)>,
    pub position: Vec<u8>,
}

impl SinkRt {
    /// `applied`: what the last commit holds as applied on each input.
    pub fn new(sink: Box<dyn Sink>, applied: &[(ChannelIdx, u64)]) -> SinkRt {
        let deferred = sink.defers().then(|| Deferred {
            writes: 0,
            pending: VecDeque::new(),
            durable: applied.iter().copied().collect(),
        });
        SinkRt {
            sink,
            written: false,
            deferred,
        }
    }

    /// Whether deliveries wait for the sink's acknowledgement.
    pub fn defers(&self) -> bool {
        self.deferred.is_some()
    }

    /// Whether deliveries are written and not yet durable.
    pub fn awaiting(&self) -> bool {
        self.deferred
            .as_ref()
            .is_some_and(|d| !d.pending.is_empty())
    }

    /// Notes that delivery `seq` on `ch` was just written.
    pub fn wrote(&mut self, ch: ChannelIdx, seq: u64) {
        match &mut self.deferred {
            Some(d) => {
                d.writes += 1;
                d.pending.push_back((d.writes, ch, seq));
            }
            None => self.written = true,
        }
    }

    /// What may be acknowledged (again) on `ch`, given that `applied` is
    /// applied there: everything applied, unless the sink defers.
    pub fn acknowledgeable(&self, ch: ChannelIdx, applied: u64) -> u64 {
        match &self.deferred {
            Some(d) => d.durable.get(&ch).copied().unwrap_or(0),
            None => applied,
        }
    }

    /// For a deferring sink with deliveries pending: asks it what is
    /// durable, and moves the deliveries that covers from pending to
    /// durable. `None` if nothing moved or the sink flushes at commits.
    pub fn take_durable(&mut self) -> Result<Option<DurableNow>, SinkError> {
        let Some(d) = self.deferred.as_mut().filter(|d| !d.pending.is_empty()) else {
            return Ok(None);
        };
        let now = self.sink.durable()?;
        let mut moved = BTreeMap::new();
        while let Some(&(w, ch, seq)) = d.pending.front() {
            if w > now.writes {
                break;
            }
            d.pending.pop_front();
            moved.insert(ch, seq);
        }
        if moved.is_empty() {
            return Ok(None);
        }
        d.durable.extend(moved.iter().map(|(&ch, &seq)| (ch, seq)));
        Ok(Some(DurableNow {
            applied: moved.into_iter().collect(),
            position: now.position,
        }))
    }
}
