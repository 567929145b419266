//! The delivery state machine of one channel (producer shard -> consumer shard).
//!
//! The producer numbers its productions 1, 2, 3, ... ([`OutChannel::push`]),
//! keeps each until it is acknowledged, sends at most `window` beyond the last
//! acknowledgement, and after a reconnect or restart sends everything
//! unacknowledged again ([`OutChannel::rewind`]). The consumer applies only the
//! next expected number ([`InChannel::offer`]): anything at or below what it
//! applied is a duplicate (acknowledged, dropped), anything past the next one
//! is a gap (not acknowledged; the producer will re-send). With the applied
//! number committed atomically with the state it changed, each production
//! takes effect exactly once.

use crate::record::Envelope;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Producer side of a channel.
#[derive(Debug, Default)]
pub struct OutChannel {
    next_seq: u64,
    unacked: VecDeque<(u64, Envelope)>,
    sent_upto: u64,
    acked: u64,
    /// Bytes of the productions sent and not yet acknowledged.
    in_flight_bytes: usize,
    dirty: bool,
    /// Since when sent productions have waited without an acknowledgement,
    /// and how long to wait before sending them again.
    stall: Option<(Instant, Duration)>,
}

impl OutChannel {
    /// A channel whose next production gets `next_seq` (1 on a fresh channel).
    pub fn new(next_seq: u64) -> Self {
        assert!(next_seq >= 1, "sequence numbers start at 1");
        OutChannel {
            next_seq,
            acked: next_seq - 1,
            sent_upto: next_seq - 1,
            ..Default::default()
        }
    }

    /// Restores an unacknowledged production read back from the outbox at start.
    /// Call in sequence order, before any `push`.
    pub fn restore(&mut self, seq: u64, env: Envelope) {
        assert!(
            seq < self.next_seq,
            "outbox entry {seq} at or past next sequence {}",
            self.next_seq
        );
        if self.unacked.is_empty() {
            self.acked = seq - 1;
            self.sent_upto = seq - 1;
        }
        debug_assert!(self.unacked.back().is_none_or(|(s, _)| *s < seq));
        self.unacked.push_back((seq, env));
    }

    /// Numbers a new production and keeps it until acknowledged.
    pub fn push(&mut self, env: Envelope) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.dirty = true;
        self.unacked.push_back((seq, env));
        seq
    }

    /// Takes an acknowledgement of everything up to `upto`; returns the
    /// productions it released, oldest first. Stale acks release nothing.
    ///
    /// An ack above what was sent, even above what was numbered, is not an
    /// error: after a crash a replayable source numbers its productions again
    /// from its committed position, which may be behind what its consumers
    /// already applied, so their acks release replayed productions before
    /// they are sent (their consumers hold them). Frames cannot be forged
    /// (every one is sealed), so an ack comes from the consumer itself.
    pub fn ack(&mut self, upto: u64, mut released: impl FnMut(u64, &Envelope)) -> usize {
        let mut n = 0;
        while let Some((seq, _)) = self.unacked.front() {
            if *seq > upto {
                break;
            }
            if let Some((seq, env)) = self.unacked.pop_front() {
                if seq <= self.sent_upto {
                    self.in_flight_bytes = self.in_flight_bytes.saturating_sub(env.len());
                }
                released(seq, &env);
                n += 1;
            }
        }
        if upto > self.acked {
            self.acked = upto.min(self.next_seq - 1);
            self.sent_upto = self.sent_upto.max(self.acked);
            self.stall = None;
        }
        n
    }

    /// Re-sends with backoff: when sent productions have waited `backoff`
    /// (starting at `first`, doubling up to `max`) without any acknowledgement,
    /// rewinds so they go out again and returns how many. Progress resets it.
    pub fn retry_due(&mut self, now: Instant, first: Duration, max: Duration) -> u64 {
        let in_flight = self.sent_upto - self.acked;
        if in_flight == 0 {
            self.stall = None;
            return 0;
        }
        match self.stall {
            None => {
                self.stall = Some((now, first));
                0
            }
            Some((since, backoff)) if now.duration_since(since) >= backoff => {
                self.rewind();
                self.stall = Some((now, (backoff * 2).min(max)));
                in_flight
            }
            Some(_) => 0,
        }
    }

    /// Hands out the productions that may be sent now: unsent ones within
    /// `window` records of the oldest unacknowledged, while fewer than
    /// `max_bytes` are in flight (one record always may go).
    pub fn sendable(
        &mut self,
        window: usize,
        max_bytes: usize,
        mut send: impl FnMut(u64, &Envelope),
    ) {
        let limit = self.acked + window as u64;
        let first = self.unacked.front().map_or(self.next_seq, |(s, _)| *s);
        let skip = (self.sent_upto + 1).saturating_sub(first) as usize;
        for (seq, env) in self.unacked.iter().skip(skip) {
            if *seq > limit || (self.in_flight_bytes >= max_bytes && self.sent_upto > self.acked) {
                break;
            }
            send(*seq, env);
            self.sent_upto = *seq;
            self.in_flight_bytes += env.len();
        }
    }

    /// Forgets what was sent, so everything unacknowledged is sent again.
    pub fn rewind(&mut self) {
        self.sent_upto = self.acked;
        self.in_flight_bytes = 0;
    }

    /// Bytes sent and not yet acknowledged.
    pub fn in_flight_bytes(&self) -> usize {
        self.in_flight_bytes
    }

    /// The highest sequence number acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Sequence number of the next production.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Whether `next_seq` changed since the last [`OutChannel::take_dirty`].
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// Productions not yet acknowledged.
    pub fn backlog(&self) -> usize {
        self.unacked.len()
    }

    /// Whether some productions have not been sent since the last rewind.
    pub fn has_unsent(&self) -> bool {
        self.unacked
            .back()
            .is_some_and(|(s, _)| *s > self.sent_upto)
    }
}

/// What the consumer does with an offered production.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// The next expected one: process it.
    Apply,
    /// Already applied: acknowledge again and drop.
    Duplicate,
    /// Past the next expected one: drop without acknowledging.
    Gap,
}

/// Consumer side of a channel: the highest sequence number applied.
#[derive(Debug, Default, Clone, Copy)]
pub struct InChannel {
    applied: u64,
}

impl InChannel {
    /// A channel that has applied everything up to `applied`.
    pub fn new(applied: u64) -> Self {
        InChannel { applied }
    }

    /// Decides what to do with production `seq`; on `Apply` it counts as applied.
    pub fn offer(&mut self, seq: u64) -> Offer {
        if seq <= self.applied {
            Offer::Duplicate
        } else if seq == self.applied + 1 {
            self.applied = seq;
            Offer::Apply
        } else {
            Offer::Gap
        }
    }

    /// The highest sequence number applied.
    pub fn applied(&self) -> u64 {
        self.applied
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn env(i: u64) -> Envelope {
        Envelope::encode(b"k", &i.to_le_bytes(), i as i64, 0)
    }

    fn sent(out: &mut OutChannel) -> Vec<u64> {
        let mut seqs = Vec::new();
        out.sendable(100, usize::MAX, |seq, _| seqs.push(seq));
        seqs
    }

    #[test]
    fn restored_productions_are_unacknowledged_and_unsent() {
        let mut out = OutChannel::new(10);
        out.restore(5, env(5));
        out.restore(6, env(6));
        assert_eq!(
            out.acked(),
            4,
            "everything before the oldest restored is acknowledged"
        );
        assert_eq!(sent(&mut out), [5, 6], "restored productions go out again");
        // Nothing was in flight before the sends: no retry is due yet.
        let now = Instant::now();
        let (first, max) = (Duration::from_secs(1), Duration::from_secs(8));
        assert_eq!(out.retry_due(now, first, max), 0);
        assert_eq!(out.retry_due(now + first, first, max), 2);
    }

    #[test]
    fn numbering_backlog_and_unsent_follow_pushes_sends_acks_and_rewinds() {
        let mut out = OutChannel::new(3);
        assert!(!out.take_dirty(), "nothing numbered yet");
        assert!(!out.has_unsent());
        assert_eq!((out.push(env(3)), out.push(env(4))), (3, 4));
        assert_eq!(out.next_seq(), 5);
        assert!(out.take_dirty(), "the next number changed");
        assert!(!out.take_dirty(), "told once");
        assert_eq!(out.backlog(), 2);
        assert!(out.has_unsent());
        assert_eq!(sent(&mut out), [3, 4]);
        assert!(!out.has_unsent(), "everything went out");
        assert_eq!(out.backlog(), 2, "sent is not acknowledged");
        out.ack(3, |_, _| {});
        assert_eq!(out.backlog(), 1);
        out.rewind();
        assert!(out.has_unsent(), "a rewind sends the unacknowledged again");
        assert!(!out.take_dirty(), "acks and rewinds number nothing");
    }

    #[test]
    fn an_ack_past_what_was_numbered_acknowledges_only_what_was() {
        let mut out = OutChannel::new(1);
        out.push(env(1));
        out.push(env(2));
        assert_eq!(sent(&mut out), [1, 2]);
        assert_eq!(out.ack(10, |_, _| {}), 2);
        assert_eq!(out.acked(), 2);
        assert_eq!(out.push(env(3)), 3);
        assert_eq!(sent(&mut out), [3]);
    }

    #[test]
    fn one_record_may_always_go_whatever_the_byte_limit() {
        let mut out = OutChannel::new(1);
        out.push(env(1));
        out.push(env(2));
        let mut seqs = Vec::new();
        out.sendable(100, 0, |seq, _| seqs.push(seq));
        assert_eq!(seqs, [1], "the first goes; the limit holds the second");
        out.sendable(100, 0, |seq, _| seqs.push(seq));
        assert_eq!(seqs, [1], "nothing more while one is in flight");
    }

    #[test]
    fn a_repeated_ack_does_not_reset_the_retry_backoff() {
        let mut out = OutChannel::new(1);
        for i in 1..=3 {
            out.push(env(i));
        }
        assert_eq!(sent(&mut out), [1, 2, 3]);
        out.ack(1, |_, _| {});
        let now = Instant::now();
        let (first, max) = (Duration::from_secs(1), Duration::from_secs(8));
        assert_eq!(out.retry_due(now, first, max), 0, "the wait starts");
        // The same acknowledgement again is no progress.
        out.ack(1, |_, _| {});
        assert_eq!(
            out.retry_due(now + first, first, max),
            2,
            "2 and 3 are sent again"
        );
    }

    #[derive(Debug, Clone)]
    enum Step {
        Produce(u8),
        Send {
            lose_every: u8,
        },
        Deliver {
            reorder: bool,
        },
        Ack {
            lose: bool,
        },
        Rewind,
        /// The consumer crashes and restarts from its committed applied seq.
        ConsumerRestart,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (1u8..5).prop_map(Step::Produce),
            (0u8..4).prop_map(|l| Step::Send { lose_every: l }),
            any::<bool>().prop_map(|r| Step::Deliver { reorder: r }),
            any::<bool>().prop_map(|l| Step::Ack { lose: l }),
            Just(Step::Rewind),
            Just(Step::ConsumerRestart),
        ]
    }

    proptest! {
        /// Over a network that loses, reorders and duplicates, with the
        /// consumer restarting, each production is applied exactly once, in order.
        #[test]
        fn each_production_is_applied_exactly_once(steps in proptest::collection::vec(step(), 1..200), window in 1usize..8) {
            let mut out = OutChannel::new(1);
            let mut inn = InChannel::new(0);
            let mut committed_applied = 0u64;
            let mut wire: Vec<(u64, Envelope)> = Vec::new();
            let mut acks: Vec<u64> = Vec::new();
            let mut applied: Vec<u64> = Vec::new();
            let mut produced = 0u64;
            let mut run = |s: &Step, out: &mut OutChannel, inn: &mut InChannel, committed: &mut u64, applied: &mut Vec<u64>, produced: &mut u64| match s {
                Step::Produce(n) => for _ in 0..*n { *produced += 1; out.push(env(*produced)); },
                Step::Send { lose_every } => {
                    let mut i = 0u8;
                    out.sendable(window, usize::MAX, |seq, e| {
                        i = i.wrapping_add(1);
                        if *lose_every == 0 || !i.is_multiple_of(lose_every + 1) { wire.push((seq, e.clone())); }
                    });
                }
                Step::Deliver { reorder } => {
                    if *reorder { wire.reverse(); }
                    for (seq, e) in wire.drain(..) {
                        match inn.offer(seq) {
                            Offer::Apply => {
                                let v = u64::from_le_bytes(e.record().value[..].try_into().unwrap());
                                applied.push(v);
                            }
                            Offer::Duplicate | Offer::Gap => {}
                        }
                    }
                    // commit, then ack
                    *committed = inn.applied();
                    acks.push(inn.applied());
                }
                Step::Ack { lose } => {
                    for a in acks.drain(..) { if !lose { out.ack(a, |_, _| {}); } }
                }
                Step::Rewind => out.rewind(),
                Step::ConsumerRestart => {
                    // What was applied since the last commit is lost with the crash.
                    applied.truncate(*committed as usize);
                    *inn = InChannel::new(*committed);
                    wire.clear();
                }
            };
            for s in &steps {
                run(s, &mut out, &mut inn, &mut committed_applied, &mut applied, &mut produced);
            }
            // Drain: the network heals; retry until everything is acknowledged.
            for _ in 0..(produced as usize + 2) * 2 {
                run(&Step::Rewind, &mut out, &mut inn, &mut committed_applied, &mut applied, &mut produced);
                run(&Step::Send { lose_every: 0 }, &mut out, &mut inn, &mut committed_applied, &mut applied, &mut produced);
                run(&Step::Deliver { reorder: false }, &mut out, &mut inn, &mut committed_applied, &mut applied, &mut produced);
                run(&Step::Ack { lose: false }, &mut out, &mut inn, &mut committed_applied, &mut applied, &mut produced);
            }
            prop_assert_eq!(applied, (1..=produced).collect::<Vec<_>>());
            prop_assert_eq!(out.backlog(), 0);
        }
    }

    #[test]
    fn window_limits_what_is_in_flight() {
        let mut out = OutChannel::new(1);
        for i in 0..10 {
            out.push(env(i));
        }
        let mut sent = Vec::new();
        out.sendable(3, usize::MAX, |s, _| sent.push(s));
        assert_eq!(sent, vec![1, 2, 3]);
        out.sendable(3, usize::MAX, |s, _| sent.push(s));
        assert_eq!(sent, vec![1, 2, 3], "nothing more until acked");
        assert_eq!(out.ack(2, |_, _| {}), 2);
        out.sendable(3, usize::MAX, |s, _| sent.push(s));
        assert_eq!(sent, vec![1, 2, 3, 4, 5]);
        assert_eq!(out.ack(1, |_, _| {}), 0, "stale ack releases nothing");
        out.rewind();
        let mut again = Vec::new();
        out.sendable(3, usize::MAX, |s, _| again.push(s));
        assert_eq!(again, vec![3, 4, 5]);
    }

    #[test]
    fn bytes_in_flight_are_bounded() {
        let mut out = OutChannel::new(1);
        for i in 0..10 {
            out.push(env(i));
        }
        let size = env(0).len();
        let mut sent = Vec::new();
        out.sendable(100, 3 * size, |s, _| sent.push(s));
        assert_eq!(sent, vec![1, 2, 3], "stops at the byte bound");
        assert_eq!(out.in_flight_bytes(), 3 * size);
        out.ack(2, |_, _| {});
        assert_eq!(out.in_flight_bytes(), size);
        out.sendable(100, 3 * size, |s, _| sent.push(s));
        assert_eq!(sent, vec![1, 2, 3, 4, 5]);
        out.ack(5, |_, _| {});
        let mut big = OutChannel::new(1);
        big.push(env(1));
        big.push(env(2));
        let mut one = Vec::new();
        big.sendable(100, 1, |s, _| one.push(s));
        assert_eq!(one, vec![1], "one record always goes, even above the bound");
        big.rewind();
        assert_eq!(big.in_flight_bytes(), 0);
    }

    #[test]
    fn unacknowledged_sends_are_retried_with_backoff() {
        let (first, max) = (Duration::from_millis(100), Duration::from_millis(300));
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut out = OutChannel::new(1);
        assert_eq!(out.retry_due(at(0), first, max), 0, "nothing in flight");
        out.push(env(1));
        out.push(env(2));
        out.sendable(10, usize::MAX, |_, _| {});
        assert_eq!(out.retry_due(at(0), first, max), 0, "the wait starts");
        assert_eq!(out.retry_due(at(99), first, max), 0);
        assert_eq!(out.retry_due(at(100), first, max), 2, "both re-sent");
        assert!(out.has_unsent());
        out.sendable(10, usize::MAX, |_, _| {});
        assert_eq!(
            out.retry_due(at(299), first, max),
            0,
            "backoff doubled to 200ms"
        );
        assert_eq!(out.retry_due(at(300), first, max), 2);
        out.sendable(10, usize::MAX, |_, _| {});
        assert_eq!(out.retry_due(at(599), first, max), 0, "capped at 300ms");
        assert_eq!(out.retry_due(at(600), first, max), 2);
        out.sendable(10, usize::MAX, |_, _| {});
        out.ack(1, |_, _| {});
        assert_eq!(
            out.retry_due(at(601), first, max),
            0,
            "progress resets the wait"
        );
        assert_eq!(out.retry_due(at(700), first, max), 0);
        assert_eq!(
            out.retry_due(at(701), first, max),
            1,
            "only the unacknowledged one"
        );
    }

    #[test]
    fn restored_outbox_is_resent_from_its_oldest_entry() {
        let mut out = OutChannel::new(8);
        out.restore(5, env(5));
        out.restore(6, env(6));
        out.restore(7, env(7));
        let mut sent = Vec::new();
        out.sendable(10, usize::MAX, |s, _| sent.push(s));
        assert_eq!(sent, vec![5, 6, 7]);
        assert_eq!(out.push(env(8)), 8);
    }
}
