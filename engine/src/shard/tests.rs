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

/// A restart through the engine's own paths: `src -> a -> b`, one shard
/// each; shard `a` routes what its computation emitted (outbox entries in
/// the batch, as the commit loop does), checkpoints and commits, and is
/// then rebuilt from the store alone, as after a crash.
mod restart {
    use crate::message::Msg;
    use crate::metrics::{Metrics, NodeMetrics};
    use crate::plan::{NodeIdx, Plan, Sid};
    use crate::record::MIN_TIME;
    use crate::router::Router;
    use crate::scope::Emit;
    use crate::shard::ShardRt;
    use crate::shared::{InFlight, Shared};
    use bytes::Bytes;
    use millrace_storage::{Store, StoreOptions};
    use std::sync::Arc;

    struct Rig {
        plan: Arc<Plan>,
        store: Store,
        metrics: Arc<Metrics>,
        _dir: tempfile::TempDir,
    }

    impl Rig {
        fn new() -> Rig {
            let plan = Arc::new(crate::test_kinds::plan(
                r#"
[engine]
shards = 1
threads = 1
[sources.src]
type = "nothing"
[computations.a]
type = "nothing"
inputs = ["src"]
[computations.b]
type = "nothing"
inputs = ["a"]
"#,
            ));
            let dir = tempfile::tempdir().expect("temp dir");
            let store = Store::open(dir.path(), &StoreOptions::default()).expect("store");
            Rig {
                plan,
                store,
                metrics: Arc::new(Metrics::new()),
                _dir: dir,
            }
        }

        fn node(&self, name: &str) -> NodeIdx {
            self.plan
                .nodes
                .iter()
                .position(|n| n.name == name)
                .expect("node")
        }

        fn sid(&self, name: &str) -> Sid {
            self.plan.nodes[self.node(name)].first_sid
        }

        /// Shard `name` as the executor builds it at start; with what it
        /// counted as in flight.
        fn recover(&self, name: &str) -> (ShardRt, InFlight) {
            let metrics = NodeMetrics::new(&self.metrics, name);
            let in_flight = InFlight::default();
            let shard = ShardRt::recover(
                &self.plan,
                self.sid(name),
                &self.store,
                &metrics,
                &in_flight,
            )
            .expect("recover");
            (shard, in_flight)
        }

        /// Routes `emits` from `shard` (into the outbox), checkpoints it and commits.
        fn route_and_commit(&self, shard: &mut ShardRt, emits: Vec<Emit>) {
            let node_metrics: Arc<[NodeMetrics]> = self
                .plan
                .nodes
                .iter()
                .map(|n| NodeMetrics::new(&self.metrics, &n.name))
                .collect();
            let shared = Arc::new(Shared::new(Arc::clone(&self.metrics), &self.plan, false));
            let mut router = Router::new(Arc::clone(&self.plan), shared, node_metrics);
            let mut batch = self.store.batch();
            router.emits = emits;
            router.route(shard, &mut batch);
            shard
                .checkpoint(&mut batch, &self.plan, false, &mut Default::default())
                .expect("checkpoint");
            self.store.commit(batch).expect("commit");
        }
    }

    fn emit(key: &str, ts: i64) -> Emit {
        Emit {
            port: 0,
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Bytes::from_static(b"v"),
            ts,
            ingest: 0,
        }
    }

    /// What `shard` sends now, as (seq, key, ts).
    fn sends(rig: &Rig, shard: &mut ShardRt) -> Vec<(u64, String, i64)> {
        let mut queues: Vec<Vec<Msg>> = (0..=rig.plan.threads).map(|_| Vec::new()).collect();
        let routes = crate::routes::Routes::new(&rig.plan, false);
        shard.queue_sends(&rig.plan, (&routes, 0), &mut queues);
        queues
            .into_iter()
            .flatten()
            .filter_map(|m| match m {
                Msg::Deliver { seq, env, .. } => {
                    let r = env.record();
                    Some((
                        seq,
                        String::from_utf8_lossy(&r.key).into_owned(),
                        r.timestamp,
                    ))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_restart_sends_again_every_committed_production_not_acknowledged() {
        let rig = Rig::new();
        let (mut a, _) = rig.recover("a");
        rig.route_and_commit(&mut a, vec![emit("x", 30), emit("y", 10), emit("z", 20)]);
        let before = sends(&rig, &mut a);
        assert_eq!(before.len(), 3);
        // A crash: nothing acknowledged, nothing in memory kept.
        drop(a);
        let (mut a, in_flight) = rig.recover("a");
        assert_eq!(a.backlog(), 3, "the outbox is restored");
        assert_eq!(in_flight.unacked(), 3, "and counted as in flight");
        assert_eq!(
            sends(&rig, &mut a),
            before,
            "the same productions go out again"
        );
        // The watermark waits for the oldest of them, as before the crash.
        a.upstream_watermark(0, 1000, false);
        a.recompute_output_wm(None);
        assert_eq!(a.output_wm().0, 10);
        // New productions are numbered after them.
        rig.route_and_commit(&mut a, vec![emit("w", 40)]);
        assert_eq!(sends(&rig, &mut a), [(4, "w".to_owned(), 40)]);
    }

    #[test]
    fn a_restart_keeps_the_watermarks_the_shards_committed() {
        let rig = Rig::new();
        let (mut a, _) = rig.recover("a");
        let (b, _) = rig.recover("b");
        assert_eq!((a.output_wm().0, b.input_wm()), (MIN_TIME, MIN_TIME));
        a.upstream_watermark(0, 500, false);
        a.recompute_output_wm(None);
        rig.route_and_commit(&mut a, Vec::new());
        assert_eq!(a.take_wm_change(), Some((500, false)));
        drop((a, b));
        let (a, _) = rig.recover("a");
        let (b, _) = rig.recover("b");
        assert_eq!(a.output_wm(), (500, false), "a's own watermark");
        assert_eq!(b.input_wm(), 500, "b's input watermark, from a's");
    }
}
