//! What user code implements: [`Computation`], [`Source`], [`Sink`], and the
//! [`Context`] a computation sees.

use crate::record::{EventTime, Record, TimeDomain, Timer};
use crate::scope::KeyScope;
use bytes::Bytes;

/// Why a computation could not handle one record or timer.
#[derive(Debug, thiserror::Error)]
pub enum ComputationError {
    /// The record is malformed for this computation. It is counted, logged and
    /// routed to the component's `errors` output; processing goes on.
    #[error("bad record: {0}")]
    BadRecord(String),
    /// Storage failed. The worker stops and restarts from its last commit.
    #[error(transparent)]
    Storage(#[from] millrace_storage::StorageError),
}

/// Keyed user code, run one record at a time with the state of the record's key.
///
/// One instance exists per shard; records of one key always reach the same
/// instance, one after another. All durable data goes through [`Context`]:
/// fields of `self` are lost on restart.
///
/// ```
/// use millrace_engine::{Computation, ComputationError, Context, Record};
///
/// /// Emits each value once per key, however often it is repeated.
/// struct Distinct;
///
/// impl Computation for Distinct {
///     fn process_record(&mut self, ctx: &mut Context<'_>, r: Record) -> Result<(), ComputationError> {
///         if ctx.state()?.as_deref() != Some(&r.value[..]) {
///             ctx.set_state(r.value.clone());
///             ctx.produce(r.key, r.value, r.timestamp);
///         }
///         Ok(())
///     }
/// }
/// ```
pub trait Computation: Send + 'static {
    /// Handles one record of the current key.
    fn process_record(
        &mut self,
        ctx: &mut Context<'_>,
        record: Record,
    ) -> Result<(), ComputationError>;

    /// Handles a timer of the current key that fired.
    fn process_timer(
        &mut self,
        _ctx: &mut Context<'_>,
        _timer: Timer,
    ) -> Result<(), ComputationError> {
        Ok(())
    }

    /// Whether this computation's timers follow from its state alone. The
    /// engine then keeps them in memory only (two RocksDB writes fewer per
    /// timer: its put and its delete) and, at start, calls
    /// [`Computation::restore_timers`] for every key that has state.
    fn timers_follow_state(&self) -> bool {
        false
    }

    /// Sets again, with [`Context::set_timer`], the timers of the current key,
    /// whose committed state is `state`. Called at start, for each key with
    /// state, when [`Computation::timers_follow_state`] holds.
    fn restore_timers(
        &mut self,
        _ctx: &mut Context<'_>,
        _state: &[u8],
    ) -> Result<(), ComputationError> {
        Ok(())
    }
}

/// The view of a computation onto its shard while it handles one key.
pub struct Context<'a> {
    pub(crate) scope: KeyScope<'a>,
}

impl Context<'_> {
    /// The current key.
    pub fn key(&self) -> &Bytes {
        self.scope.key
    }

    /// The state of the current key, if any.
    pub fn state(&mut self) -> Result<Option<Bytes>, ComputationError> {
        Ok(self.scope.state()?)
    }

    /// Replaces the state of the current key (committed with the batch).
    pub fn set_state(&mut self, value: impl Into<Bytes>) {
        self.scope.set_state(Some(value.into()));
    }

    /// Removes the state of the current key.
    pub fn clear_state(&mut self) {
        self.scope.set_state(None);
    }

    /// Emits a record on the default output. It is checkpointed before it is sent.
    pub fn produce(
        &mut self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
        timestamp: EventTime,
    ) {
        self.scope
            .produce(None, key.into(), value.into(), timestamp);
    }

    /// Emits a record on the named output `output` (read as `COMPONENT.output`).
    pub fn produce_to(
        &mut self,
        output: &str,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
        timestamp: EventTime,
    ) {
        self.scope
            .produce(Some(output), key.into(), value.into(), timestamp);
    }

    /// Sets (or moves) the timer `tag` of the current key.
    pub fn set_timer(&mut self, tag: impl Into<Bytes>, domain: TimeDomain, time: EventTime) {
        self.scope.set_timer(tag.into(), domain, time);
    }

    /// When the timer `tag` of the current key will fire, if it is set.
    pub fn timer(&self, tag: &[u8]) -> Option<(TimeDomain, EventTime)> {
        self.scope.timer(tag)
    }

    /// Deletes the timer `tag` of the current key, if set.
    pub fn delete_timer(&mut self, tag: &[u8]) {
        self.scope.delete_timer(tag);
    }

    /// The input stream of the record being processed, as the topology names
    /// it (`words`, `sessions.late`); empty while a timer is processed.
    pub fn input(&self) -> &str {
        self.scope.input
    }

    /// The shard's input low watermark: no record older than it is expected.
    pub fn low_watermark(&self) -> EventTime {
        self.scope.low_watermark()
    }

    /// Drops the current record by design (it belongs to no window, say):
    /// nothing is produced for it, and it is counted in
    /// `millrace_discarded_records_total`, apart from late and bad records.
    pub fn discard(&mut self) {
        *self.scope.discarded += 1;
    }

    /// Processing time, microseconds since the epoch.
    pub fn now(&self) -> i64 {
        self.scope.clock.now()
    }
}

/// What a [`Source::poll`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourcePoll {
    /// Records were emitted (or may be soon): poll again at once.
    Ready,
    /// Nothing now; poll again after a short pause.
    Idle,
    /// Bounded and finished: nothing more will ever come.
    Exhausted,
}

/// Why a source failed. Sources are restarted from their committed position.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Reading the input failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being read.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The committed position cannot be understood (a changed topology?).
    #[error("cannot resume from the committed position: {0}")]
    Position(String),
    /// The source cannot start as configured (its shard's part is empty, say).
    #[error("{0}")]
    Setup(String),
}

/// Collects what a source reads in one poll.
pub struct Emitter<'a> {
    pub(crate) out: &'a mut Vec<(Bytes, Bytes, EventTime)>,
    /// Records that could not be decoded, with why: they go to the source's
    /// `errors` output.
    pub(crate) bad: Vec<(Bytes, Bytes, String)>,
}

impl<'a> Emitter<'a> {
    /// An emitter that appends to `out` (the engine makes one per poll; tests may too).
    pub fn new(out: &'a mut Vec<(Bytes, Bytes, EventTime)>) -> Self {
        Emitter {
            out,
            bad: Vec::new(),
        }
    }

    /// Hands over a record the source read but cannot decode (no event
    /// time, say): it goes, as read, to the source's `NAME.errors` output,
    /// is counted in `millrace_bad_records_total` and logged with `why`.
    pub fn emit_bad(&mut self, key: impl Into<Bytes>, value: impl Into<Bytes>, why: String) {
        self.bad.push((key.into(), value.into(), why));
    }

    /// The records handed to [`Emitter::emit_bad`] so far.
    pub fn bad(&self) -> &[(Bytes, Bytes, String)] {
        &self.bad
    }

    /// Emits one record.
    pub fn emit(&mut self, key: impl Into<Bytes>, value: impl Into<Bytes>, timestamp: EventTime) {
        self.out.push((key.into(), value.into(), timestamp));
    }

    /// Records emitted so far in this poll.
    pub fn len(&self) -> usize {
        self.out.len()
    }

    /// Whether nothing was emitted in this poll.
    pub fn is_empty(&self) -> bool {
        self.out.is_empty()
    }
}

/// Brings records in. The engine commits [`Source::position`] in the same
/// batch as the records polled before it, so a replayable source neither
/// loses nor repeats input across a restart.
pub trait Source: Send + 'static {
    /// Resumes from a committed position (`None` on a first start).
    fn open(&mut self, position: Option<&[u8]>) -> Result<(), SourceError>;

    /// Emits up to `max` records.
    fn poll(&mut self, out: &mut Emitter<'_>, max: usize) -> Result<SourcePoll, SourceError>;

    /// The position just after the last record emitted.
    fn position(&self) -> Vec<u8>;

    /// Whether reopening at a position emits exactly the records that followed
    /// it the first time, in the same order (a file, a generator). The engine
    /// then keeps this source's productions in memory only and commits the
    /// position once everything before it is acknowledged, replaying the rest
    /// after a crash; otherwise (a socket) each production goes through the
    /// outbox.
    fn replayable(&self) -> bool {
        false
    }

    /// Tells the source which shard of its component it is, before
    /// [`Source::open`] (and once at `validate`, as shard 0). A source whose
    /// input can be split (a Kafka topic's partitions) takes its part;
    /// others refuse more than one shard, as this default does.
    fn assign(&mut self, shard: &SourceShard) -> Result<(), String> {
        if shard.count > 1 {
            return Err("this source kind cannot be split into shards".to_owned());
        }
        Ok(())
    }

    /// The source's own watermark, when it knows better than the newest
    /// event time it emitted: a Kafka source's is the minimum over its
    /// partitions, leaving out those idle for `idle_after`. The engine then
    /// subtracts `out_of_order` from it; `None` uses the newest event time.
    fn watermark(&self) -> Option<EventTime> {
        None
    }
}

/// Which shard of its component a source shard is, and its watermark settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceShard {
    /// This shard's number, from 0.
    pub index: u32,
    /// The component's shard count (`shards` in its table; 1 by default).
    pub count: u32,
    /// The component's `watermark.idle_after`.
    pub idle_after: Option<std::time::Duration>,
}

/// Why a sink failed. The worker stops; after a restart the sink resumes from
/// its committed position and the records since are delivered again.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct SinkError {
    /// What was being written.
    pub what: String,
    /// The I/O error.
    pub source: std::io::Error,
}

/// Takes records out. Writes between two commits must be undoable: on restart
/// the engine calls [`Sink::open`] with the position of the last commit, and
/// the sink discards anything written after it (a file sink truncates).
pub trait Sink: Send + 'static {
    /// Restores the position of the last commit (`None` on a first start).
    fn open(&mut self, position: Option<&[u8]>) -> Result<(), SinkError>;

    /// Writes one record.
    fn write(&mut self, record: &Record) -> Result<(), SinkError>;

    /// Makes every write so far durable (`sync`: to the disk, not only the OS)
    /// and returns the position to commit with them.
    fn flush(&mut self, sync: bool) -> Result<Vec<u8>, SinkError>;

    /// Called before [`Sink::open`] with what the shard knows at its start.
    /// A sink that cannot cut back what it wrote (Kafka) learns from it
    /// whether anything can have been written before its first commit, and
    /// which of the ids it finds written will be delivered again.
    fn starting(&mut self, _start: &SinkStart) {}

    /// Writes one record with its production id, which is the same every
    /// time the record is delivered again. A sink that cannot cut back what
    /// it wrote stores the id with the record, and skips at restart what it
    /// finds already written. By default, [`Sink::write`].
    fn write_delivered(&mut self, record: &Record, _id: &DeliveryId<'_>) -> Result<(), SinkError> {
        self.write(record)
    }

    /// Whether this sink's writes become durable only when the far side
    /// acknowledges them, some time after the write returned (Kafka). The
    /// engine then never waits for them: between turns it asks
    /// [`Sink::durable`] how far the acknowledgements have come, and only
    /// then commits a delivery as applied and acknowledges it upstream. A
    /// crash delivers again what was not durable; the sink skips at its
    /// restart what it finds written after all (see [`Sink::starting`]).
    /// [`Sink::flush`] is then not called by the engine. By default `false`.
    fn defers(&self) -> bool {
        false
    }

    /// For a sink that [`defers`](Sink::defers): takes in the
    /// acknowledgements that came, without waiting for more, and says how
    /// many of the writes are durable and the position to commit with
    /// them. An error stops the worker, as a failed flush does.
    fn durable(&mut self) -> Result<Durable, SinkError> {
        Err(SinkError {
            what: "a sink".into(),
            source: std::io::Error::other("durable() called on a sink that does not defer"),
        })
    }
}

/// How much of a [deferring](Sink::defers) sink's output is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Durable {
    /// How many writes, counted from [`Sink::open`], are durable: every
    /// call of [`Sink::write`] and [`Sink::write_delivered`] counts as one,
    /// whatever it wrote, and a write is durable only with all before it.
    pub writes: u64,
    /// The position to commit with them (what [`Sink::open`] gets back).
    pub position: Vec<u8>,
}

/// What identifies one delivery to a sink across restarts: the input it came
/// on (the edge `producer[.output]->consumer`), the producer's shard and the
/// channel's sequence number. Displayed as `edge/shard/seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryId<'a> {
    /// The edge's name.
    pub edge: &'a str,
    /// The producer's shard.
    pub producer_shard: u32,
    /// The production's sequence number on its channel.
    pub seq: u64,
}

impl std::fmt::Display for DeliveryId<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.edge, self.producer_shard, self.seq)
    }
}

impl<'a> DeliveryId<'a> {
    /// Reads the displayed form `edge/shard/seq` back (`None` if it is not one).
    pub fn parse(text: &'a str) -> Option<DeliveryId<'a>> {
        let mut parts = text.rsplitn(3, '/');
        let seq = parts.next()?.parse().ok()?;
        let producer_shard = parts.next()?.parse().ok()?;
        let edge = parts.next().filter(|e| !e.is_empty())?;
        Some(DeliveryId {
            edge,
            producer_shard,
            seq,
        })
    }
}

/// What a sink shard knows at its start, before [`Sink::open`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkStart {
    /// 1 on the first start of the shard's data directory, higher at every
    /// later start: after a first start nothing can have been written.
    pub epoch: u64,
    /// What the shard has applied of each input channel, by edge and
    /// producer shard: everything above it is delivered again.
    applied: std::collections::HashMap<String, std::collections::HashMap<u32, u64>>,
}

impl SinkStart {
    /// A start at `epoch` with nothing applied on any input yet.
    pub fn new(epoch: u64) -> SinkStart {
        SinkStart {
            epoch,
            applied: Default::default(),
        }
    }

    /// Records that the input `edge` from `producer_shard` is applied up to
    /// sequence number `seq` (0: nothing yet).
    pub fn applied(mut self, edge: &str, producer_shard: u32, seq: u64) -> SinkStart {
        self.applied
            .entry(edge.to_owned())
            .or_default()
            .insert(producer_shard, seq);
        self
    }

    /// Whether the delivery `id` will be made (again) after this start: it
    /// comes on one of the shard's inputs, above what the shard applied there.
    /// A written record whose id says yes is a re-delivery to skip; one whose
    /// id says no is never delivered again.
    pub fn redelivers(&self, id: &DeliveryId<'_>) -> bool {
        self.applied
            .get(id.edge)
            .and_then(|shards| shards.get(&id.producer_shard))
            .is_some_and(|&applied| id.seq > applied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivery_id_reads_back_from_its_displayed_form() {
        let id = DeliveryId {
            edge: "words.errors->a/b",
            producer_shard: 3,
            seq: 1229,
        };
        let text = id.to_string();
        assert_eq!(DeliveryId::parse(&text), Some(id));
        for bad in ["", "7", "e/1", "/1/2", "e/x/2", "e/1/-2", "e/1/2 "] {
            assert_eq!(DeliveryId::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn only_what_is_above_an_inputs_applied_number_is_delivered_again() {
        let start = SinkStart::new(3)
            .applied("counts->out", 0, 10)
            .applied("counts->out", 1, 0);
        let id = |edge, producer_shard, seq| DeliveryId {
            edge,
            producer_shard,
            seq,
        };
        assert!(!start.redelivers(&id("counts->out", 0, 10)));
        assert!(start.redelivers(&id("counts->out", 0, 11)));
        assert!(start.redelivers(&id("counts->out", 1, 1)));
        // Not one of this shard's inputs: never delivered here.
        assert!(!start.redelivers(&id("counts->out", 2, 50)));
        assert!(!start.redelivers(&id("other->out", 0, 50)));
    }
}
