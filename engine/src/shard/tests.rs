//! The shard runtime's invariants, in-process: duplicates and gaps on an
//! input, and the backlog and output watermark against what is
//! acknowledged.

use super::{Body, ShardRt};
use crate::delivery::{InChannel, Offer};
use crate::keyed_state::KeyedState;
use crate::record::{Envelope, MIN_TIME};
use crate::test_kinds::Nothing;
use crate::timers::Timers;

/// A computation shard with input channel 7 (nothing applied yet) and
/// one upstream shard.
fn shard() -> ShardRt {
    let body = Body::Compute(Box::new(Nothing));
    let mut s = ShardRt::new(
        0,
        0,
        b"c/0/".to_vec(),
        body,
        KeyedState::new(8),
        Timers::volatile(),
    );
    s.inputs.insert(7, InChannel::new(0));
    s.upstream_wm = vec![MIN_TIME];
    s.upstream_idle = vec![false];
    s
}

fn env(ts: i64) -> Envelope {
    Envelope::encode(b"k", b"v", ts, 0)
}

#[test]
fn duplicates_and_gaps_are_told_apart_and_only_applied_ones_are_checkpointed() {
    let mut s = shard();
    assert_eq!(s.offer(7, 1), Some(Offer::Apply));
    assert_eq!(s.offer(7, 2), Some(Offer::Apply));
    assert_eq!(s.offer(7, 2), Some(Offer::Duplicate), "again: dropped");
    assert_eq!(s.offer(7, 1), Some(Offer::Duplicate), "older: dropped");
    assert_eq!(s.offer(7, 4), Some(Offer::Gap), "3 is missing");
    assert_eq!(s.applied(7), 2, "a gap applies nothing");
    assert_eq!(s.offer(9, 1), None, "not an input of this shard");
    assert_eq!(s.applied_dirty.iter().copied().collect::<Vec<_>>(), [7]);
    assert_eq!(s.offer(7, 3), Some(Offer::Apply));
    assert_eq!(s.applied(7), 3);
}

#[test]
fn the_output_watermark_waits_for_the_oldest_unacknowledged_production() {
    let mut s = shard();
    s.upstream_watermark(0, 100, false);
    assert_eq!(s.input_wm(), 100);
    // Two productions on channel 3, at 10 and 20, then one at 30 on channel 4.
    assert_eq!(s.produce(3, env(10)), 1);
    assert_eq!(s.produce(3, env(20)), 2);
    assert_eq!(s.produce(4, env(30)), 1);
    assert_eq!(s.backlog(), 3);
    s.recompute_output_wm(None);
    assert_eq!(
        s.output_wm(),
        (10, false),
        "held at the oldest unacknowledged"
    );
    assert_eq!(s.take_wm_change(), Some((10, false)));
    assert_eq!(s.take_wm_change(), None, "told once");
    let mut released = Vec::new();
    assert_eq!(s.ack(3, 1, |seq, e| released.push((seq, e.timestamp()))), 1);
    assert_eq!(released, [(1, 10)]);
    assert_eq!(s.backlog(), 2);
    s.recompute_output_wm(None);
    assert_eq!(s.output_wm().0, 20);
    assert_eq!(
        s.ack(3, 1, |_, _| {}),
        0,
        "a stale acknowledgement releases nothing"
    );
    assert_eq!(s.ack(5, 9, |_, _| {}), 0, "not an output of this shard");
    assert_eq!(s.ack(3, 2, |_, _| {}) + s.ack(4, 1, |_, _| {}), 2);
    assert_eq!(s.backlog(), 0);
    s.recompute_output_wm(None);
    assert_eq!(s.output_wm().0, 100, "nothing unacknowledged: the input's");
    // It never moves back.
    s.upstream_watermark(0, 50, false);
    s.recompute_output_wm(None);
    assert_eq!(s.output_wm().0, 100);
}

#[test]
fn an_idle_input_with_nothing_waiting_makes_the_shard_idle() {
    let mut s = shard();
    s.upstream_watermark(0, 40, true);
    s.recompute_output_wm(None);
    assert_eq!(s.output_wm(), (40, true));
    s.produce(3, env(45));
    s.recompute_output_wm(None);
    assert_eq!(s.output_wm(), (40, false), "a production waits: not idle");
}
