//! `state_ttl` for the built-in stateful kinds (`count`, `reduce`,
//! `combine`, `top_per_key`, `count_per_element`): a key whose state is
//! untouched for that long, in event time, loses it, as with Spark's
//! `StateSpec.timeout` or Flink's state TTL. Scripts have their own, with an
//! `on_expire` call (`script.rs`).
//!
//! A key's state expires at its newest record's event time plus the TTL:
//! each record moves the key's expiry timer there, never earlier (an
//! out-of-order record does not shorten it). Expiry is a function of event
//! time only: a record at or after the expiry finds the state expired before
//! it is applied (as Flink's TTL checks on read), whether or not the
//! watermark has fired the timer yet; the timer only drops the state of keys
//! that see no more records. A record that is not late comes at or after the
//! watermark, so the timer fires before it only when the record would find
//! the state expired anyway: the same input expires the same keys, whatever
//! the batching, the speed of processing or the moment of a restart.

use millrace_config::HumanDuration;
use millrace_engine::{
    Computation, ComputationError, Context, MakeComputation, Record, TimeDomain, Timer,
};
use std::sync::Arc;

/// The timer tag of a key's expiry (no built-in uses another timer).
const TTL_TAG: &[u8] = b"\0ttl";

/// A built-in computation whose keys' state expires.
pub struct Expiring {
    inner: Box<dyn Computation>,
    ttl: i64,
}

impl Computation for Expiring {
    fn process_record(&mut self, ctx: &mut Context<'_>, r: Record) -> Result<(), ComputationError> {
        if ctx
            .timer(TTL_TAG)
            .is_some_and(|(_, expiry)| r.timestamp >= expiry)
        {
            // Expired at this record's event time: gone before it is applied.
            ctx.clear_state();
            ctx.delete_timer(TTL_TAG);
        }
        let at = r.timestamp.saturating_add(self.ttl);
        self.inner.process_record(ctx, r)?;
        if ctx.state()?.is_none() {
            ctx.delete_timer(TTL_TAG);
        } else if ctx.timer(TTL_TAG).is_none_or(|(_, t)| t < at) {
            ctx.set_timer(TTL_TAG, TimeDomain::EventTime, at);
        }
        Ok(())
    }

    fn process_timer(&mut self, ctx: &mut Context<'_>, t: Timer) -> Result<(), ComputationError> {
        if t.tag.as_ref() == TTL_TAG {
            ctx.clear_state();
            Ok(())
        } else {
            self.inner.process_timer(ctx, t)
        }
    }
}

/// `make`, with its keys' state expiring after `ttl` of event time if given.
pub(crate) fn with_state_ttl(make: MakeComputation, ttl: Option<HumanDuration>) -> MakeComputation {
    match ttl {
        None => make,
        Some(d) => {
            let ttl = i64::try_from(d.0.as_micros()).unwrap_or(i64::MAX);
            Arc::new(move || Box::new(Expiring { inner: make(), ttl }) as Box<dyn Computation>)
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::test_support::{computation, values};
    use millrace_engine::testing::Harness;

    /// A `count` with `state_ttl = "10us"`, as a topology builds it.
    fn count_with_ttl() -> Box<dyn millrace_engine::Computation> {
        computation("count", "state_ttl = \"10us\"").expect("options")
    }

    #[test]
    fn a_key_untouched_for_the_ttl_in_event_time_starts_again() {
        let dir = tempfile::tempdir().expect("dir");
        let mut h = Harness::open(dir.path(), count_with_ttl(), &[]).expect("harness");
        assert_eq!(values(h.process("k", "x", 100).unwrap()), ["1"]);
        // Touched at 105: expiry moves to 115. Out of order at 101: stays.
        assert_eq!(values(h.process("k", "x", 105).unwrap()), ["2"]);
        assert_eq!(values(h.process("k", "x", 101).unwrap()), ["3"]);
        h.advance_watermark(115).unwrap();
        assert!(
            h.state(b"k").unwrap().is_some(),
            "kept until the watermark passes 115"
        );
        // Survives a restart: the expiry timer is stored.
        let mut h = h.restart(count_with_ttl()).expect("restart");
        h.advance_watermark(116).unwrap();
        assert_eq!(h.state(b"k").unwrap(), None, "expired");
        assert_eq!(h.pending_timers(), 0);
        assert_eq!(
            values(h.process("k", "x", 130).unwrap()),
            ["1"],
            "counts afresh"
        );
    }

    #[test]
    fn a_record_a_ttl_after_the_keys_newest_finds_it_expired_before_the_watermark_does() {
        let dir = tempfile::tempdir().expect("dir");
        let mut h = Harness::open(dir.path(), count_with_ttl(), &[]).expect("harness");
        assert_eq!(values(h.process("a", "x", 1).unwrap()), ["1"]);
        assert_eq!(values(h.process("c", "x", 50).unwrap()), ["1"]);
        // The watermark has not passed `a`'s expiry (11) yet, but this record
        // comes later than it: the state expired first, as it would have
        // had the watermark fired the timer before the record came.
        assert_eq!(values(h.process("a", "x", 100).unwrap()), ["1"]);
        // A record exactly a TTL after the newest one: expired too.
        assert_eq!(values(h.process("a", "x", 110).unwrap()), ["1"]);
        // One microsecond closer: kept.
        assert_eq!(values(h.process("a", "x", 119).unwrap()), ["2"]);
        // Out of order, before the expiry: kept, and the expiry stays at
        // the newest record's (119 + 10).
        assert_eq!(values(h.process("a", "x", 112).unwrap()), ["3"]);
        assert_eq!(values(h.process("a", "x", 128).unwrap()), ["4"]);
        assert_eq!(values(h.process("a", "x", 138).unwrap()), ["1"]);
        // One expiry timer per key with state; `a`'s old ones are gone.
        assert_eq!(h.pending_timers(), 2);
        h.advance_watermark(149).unwrap();
        assert_eq!(h.pending_timers(), 0);
        assert_eq!(h.state(b"a").unwrap(), None);
        assert_eq!(h.state(b"c").unwrap(), None);
    }

    #[test]
    fn expiry_on_read_and_by_the_watermark_give_the_same_counts() {
        // The same records with the watermark moved after each (so every
        // expiry timer fires before the next record), and never moved.
        let input = [
            ("a", 0),
            ("b", 3),
            ("a", 9),
            ("a", 19),
            ("b", 16),
            ("a", 29),
            ("b", 25),
            ("a", 33),
        ];
        let counts = |watermark_after_each: bool| {
            let dir = tempfile::tempdir().expect("dir");
            let mut h = Harness::open(dir.path(), count_with_ttl(), &[]).expect("harness");
            let mut newest = 0;
            let mut got = Vec::new();
            for (k, t) in input {
                got.extend(values(h.process(k, "x", t).unwrap()));
                newest = newest.max(t);
                if watermark_after_each {
                    // As far as the records' disorder (4) allows.
                    h.advance_watermark(newest - 4).unwrap();
                }
            }
            got
        };
        let want = ["1", "1", "2", "1", "1", "1", "2", "2"];
        assert_eq!(counts(false), want);
        assert_eq!(counts(true), want);
    }
}
