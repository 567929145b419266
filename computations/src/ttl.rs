//! `state_ttl` for the built-in stateful kinds (`count`, `reduce`,
//! `combine`, `top_per_key`, `count_per_element`): a key whose state is
//! untouched for that long, in event time, loses it, as with Spark's
//! `StateSpec.timeout` or Flink's state TTL. Scripts have their own, with an
//! `on_expire` call (`script.rs`).
//!
//! Each record of a key moves the key's expiry timer to its event time plus
//! the TTL, never earlier (an out-of-order record does not shorten it); the
//! timer fires when the watermark passes it, and the state is cleared. Event
//! time makes expiry deterministic: the same input expires the same keys,
//! whatever the speed of processing or the moment of a restart.

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
}
