//! Routing a shard's productions: each consumer's key extractor picks the
//! consumer shard and channel, the production gets the channel's next
//! sequence number and goes into the outbox (in the batch being built) or,
//! for a replayable source, into memory only. What cannot be routed (a key
//! that cannot be extracted, an event time out of range, a record over
//! `max_record_bytes`, an undeclared output) goes to the producer's
//! `errors` output, counted and logged.

use crate::keying::{locate_key, shard_of};
use crate::layout;
use crate::metrics::NodeMetrics;
use crate::plan::{Plan, ERRORS_PORT_INDEX};
use crate::record::{is_valid_event_time, Envelope, EARLIEST_EVENT_TIME, LATEST_EVENT_TIME};
use crate::scope::Emit;
use crate::shard::ShardRt;
use crate::shared::Shared;
use millrace_storage::{Batch, Cf};
use std::sync::Arc;

/// `emit` again, on the errors output, at event time `ts`.
fn errors_record(emit: &Emit, ts: i64) -> Emit {
    Emit {
        port: ERRORS_PORT_INDEX,
        ts,
        ..emit.clone()
    }
}

/// Routes what the shard being served emitted: applies each consumer's key
/// extractor, picks the consumer shard and channel, numbers the production
/// and puts it in the outbox (in the batch being built).
pub(crate) struct Router {
    plan: Arc<Plan>,
    shared: Arc<Shared>,
    node_metrics: Arc<[NodeMetrics]>,
    /// What the shard being served emitted, not yet routed.
    pub emits: Vec<Emit>,
    /// Productions numbered since the last [`Router::take_produced`].
    produced: i64,
}

impl Router {
    pub fn new(plan: Arc<Plan>, shared: Arc<Shared>, node_metrics: Arc<[NodeMetrics]>) -> Self {
        Router {
            plan,
            shared,
            node_metrics,
            emits: Vec::new(),
            produced: 0,
        }
    }

    /// How many productions were numbered since the last call.
    pub fn take_produced(&mut self) -> i64 {
        std::mem::take(&mut self.produced)
    }

    /// Routes (and clears) what `shard` emitted.
    pub fn route(&mut self, shard: &mut ShardRt, batch: &mut Batch<'_>) {
        let Router {
            plan,
            shared,
            node_metrics,
            emits,
            produced,
        } = self;
        let plan = &**plan;
        let metrics = &node_metrics[shard.node()];
        let taps = &shared.taps;
        if emits.is_empty() {
            return;
        }
        if taps.is_active(shard.node()) {
            for e in emits.iter() {
                taps.publish(shard.node(), || {
                    let mut line = serde_json::json!({
                        "key": String::from_utf8_lossy(&e.key),
                        "value": String::from_utf8_lossy(&e.value),
                        "ts": e.ts,
                    })
                    .to_string()
                    .into_bytes();
                    line.push(b'\n');
                    line
                });
            }
        }
        let node = &plan.nodes[shard.node()];
        let src_shard = plan.shards[shard.sid() as usize].shard;
        let persist = shard.uses_outbox();
        let max_record = plan.topology.engine.max_record_bytes;
        // What cannot go where it was produced goes to the errors output, once:
        // an errors record that would fail the same way is not sent again.
        let to_errors = |emits: &mut Vec<Emit>, at: usize, why: &str, errors: Emit| {
            metrics.bad_record(&node.name, &emits[at].key, why);
            if emits[at].port != ERRORS_PORT_INDEX {
                emits.push(errors);
            }
        };
        let mut i = 0;
        while i < emits.len() {
            let emit = &emits[i];
            i += 1;
            metrics.records_out.inc();
            if !is_valid_event_time(emit.ts) {
                // Not routed anywhere with that time: it would move watermarks
                // to the end of time. The errors output gets it at the nearest
                // valid time.
                let why = format!("event time {} us is outside years 1 to 9999", emit.ts);
                let ts = emit.ts.clamp(EARLIEST_EVENT_TIME, LATEST_EVENT_TIME);
                let errors = errors_record(emit, ts);
                to_errors(emits, i - 1, &why, errors);
                if emits[i - 1].port != ERRORS_PORT_INDEX {
                    continue;
                }
                emits[i - 1].ts = ts;
            }
            let emit = &emits[i - 1];
            let size = emit.key.len() + emit.value.len();
            if size > max_record {
                // Refused here, once: a record that cannot cross to another
                // worker must not be retried forever. The errors output gets
                // as much of it as the limit allows (so it is not refused again).
                let why = format!(
                    "the record has {size} bytes, more than engine.max_record_bytes ({max_record})"
                );
                let key = emit.key.slice(..emit.key.len().min(max_record));
                let keep = (max_record - key.len()).min(emit.value.len());
                let errors = Emit {
                    key,
                    value: emit.value.slice(..keep),
                    ..errors_record(emit, emit.ts)
                };
                // Cut to the limit, the copy always routes (even from an
                // errors record).
                metrics.bad_record(&node.name, &emit.key, &why);
                emits.push(errors);
                continue;
            }
            let Some(edges) = node.out_edges.get(emit.port) else {
                if emit.port == usize::MAX {
                    // Not a silent drop: the record goes to the errors output.
                    let errors = errors_record(emit, emit.ts);
                    let why = "produced to an output the kind does not declare";
                    to_errors(emits, i - 1, why, errors);
                }
                continue;
            };
            let mut failed: Option<String> = None;
            for &e in edges {
                let edge = &plan.edges[e];
                // The key is only read here (to pick the shard and to encode
                // the envelope), so it is located, not cloned.
                let located = match locate_key(&edge.key, &emit.value) {
                    Ok(k) => k,
                    Err(why) => {
                        failed = Some(format!(
                            "the key extractor of consumer `{}`: {why}",
                            plan.nodes[edge.to].name
                        ));
                        continue;
                    }
                };
                let key = located.bytes(&emit.key, &emit.value);
                let dst_shard = shard_of(key, plan.nodes[edge.to].shards);
                let ch = plan.channel(e, src_shard, dst_shard);
                let env = Envelope::encode(key, &emit.value, emit.ts, emit.ingest);
                if persist {
                    let seq = shard.produce(ch, env.clone());
                    let prefix = shard.outbox_prefix(plan, ch);
                    batch.put(Cf::Outbox, &layout::outbox_key(prefix, seq), &env.0);
                } else {
                    // Kept in memory only (a replayable source).
                    shard.produce(ch, env);
                }
                *produced += 1;
            }
            if let Some(why) = failed {
                let errors = errors_record(emit, emit.ts);
                to_errors(emits, i - 1, &why, errors);
            }
        }
        emits.clear();
    }
}

#[cfg(test)]
mod tests {
    //! `Router::route` on a small plan: `a` produces to `b` (keyed by
    //! `json:/k`) and its errors output goes to `e`.

    use super::Router;
    use crate::keyed_state::KeyedState;
    use crate::metrics::{Metrics, NodeMetrics};
    use crate::plan::{Plan, ERRORS_PORT_INDEX};
    use crate::record::{EARLIEST_EVENT_TIME, LATEST_EVENT_TIME};
    use crate::scope::Emit;
    use crate::shard::{Body, ShardRt};
    use crate::shared::Shared;
    use crate::test_kinds::Nothing;
    use crate::timers::Timers;
    use bytes::Bytes;
    use millrace_storage::{Store, StoreOptions};
    use std::sync::Arc;

    /// The limit on key and value bytes in the plan.
    const MAX: usize = 64;

    fn plan() -> Plan {
        crate::test_kinds::plan(&format!(
            r#"
[engine]
shards = 1
max_record_bytes = {MAX}
[sources.src]
type = "nothing"
[computations.a]
type = "nothing"
inputs = ["src"]
[computations.b]
type = "nothing"
inputs = [{{ from = "a", key = "json:/k" }}]
[computations.e]
type = "nothing"
inputs = ["a.errors"]
"#
        ))
    }

    fn emit(port: usize, key: &str, value: &str, ts: i64) -> Emit {
        Emit {
            port,
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Bytes::copy_from_slice(value.as_bytes()),
            ts,
            ingest: 7,
        }
    }

    /// Records as (key, value, ts).
    type Got = Vec<(String, String, i64)>;

    /// Routes `emits` from `a`'s shard; returns what went to `b` and to `e`
    /// as (key, value, ts), and how many productions were numbered.
    fn route(emits: Vec<Emit>) -> (Got, Got, i64) {
        let plan = Arc::new(plan());
        let node = |name: &str| {
            plan.nodes
                .iter()
                .position(|n| n.name == name)
                .expect("node")
        };
        let (a, b, e) = (node("a"), node("b"), node("e"));
        let metrics = Arc::new(Metrics::new());
        let shared = Arc::new(Shared::new(Arc::clone(&metrics), &plan, false));
        let node_metrics: Arc<[NodeMetrics]> = plan
            .nodes
            .iter()
            .map(|n| NodeMetrics::new(&metrics, &n.name))
            .collect();
        let mut router = Router::new(Arc::clone(&plan), shared, node_metrics);
        let sid = plan.nodes[a].first_sid;
        let mut shard = ShardRt::new(
            sid,
            a,
            b"a/0/".to_vec(),
            Body::Compute(Box::new(Nothing)),
            KeyedState::new(8),
            Timers::volatile(),
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path(), &StoreOptions::default()).expect("store");
        let mut batch = store.batch();
        router.emits = emits;
        router.route(&mut shard, &mut batch);
        assert!(router.emits.is_empty(), "everything routed");
        let edge = |to: usize| {
            plan.edges
                .iter()
                .position(|x| x.from == a && x.to == to)
                .expect("edge")
        };
        let mut out = |to: usize| {
            let mut got = Vec::new();
            let ch = plan.channel(edge(to), 0, 0);
            shard.ack(ch, u64::MAX, |_, env| {
                let r = env.record();
                assert_eq!(env.ingest(), 7, "the ingestion time travels along");
                got.push((
                    String::from_utf8_lossy(&r.key).into_owned(),
                    String::from_utf8_lossy(&r.value).into_owned(),
                    r.timestamp,
                ));
            });
            got
        };
        let (to_b, to_e) = (out(b), out(e));
        (to_b, to_e, router.take_produced())
    }

    fn rec(k: &str, v: &str, ts: i64) -> (String, String, i64) {
        (k.to_owned(), v.to_owned(), ts)
    }

    #[test]
    fn a_record_goes_to_its_consumer_under_the_extracted_key() {
        let (b, e, n) = route(vec![emit(0, "x", r#"{"k":"y"}"#, 5)]);
        assert_eq!(b, [rec("y", r#"{"k":"y"}"#, 5)]);
        assert!(e.is_empty());
        assert_eq!(n, 1);
    }

    #[test]
    fn a_key_that_cannot_be_extracted_sends_the_record_to_errors_as_it_was() {
        let (b, e, n) = route(vec![emit(0, "x", "not json", 5)]);
        assert!(b.is_empty());
        assert_eq!(e, [rec("x", "not json", 5)]);
        assert_eq!(n, 1, "only the errors record");
    }

    #[test]
    fn an_event_time_out_of_range_goes_to_errors_at_the_nearest_valid_time() {
        let (b, e, _) = route(vec![
            emit(0, "late", r#"{"k":"y"}"#, LATEST_EVENT_TIME + 1),
            emit(0, "early", r#"{"k":"y"}"#, EARLIEST_EVENT_TIME - 1),
        ]);
        assert!(b.is_empty(), "not routed with that time: {b:?}");
        assert_eq!(
            e,
            [
                rec("late", r#"{"k":"y"}"#, LATEST_EVENT_TIME),
                rec("early", r#"{"k":"y"}"#, EARLIEST_EVENT_TIME),
            ]
        );
        // An errors record out of range is routed once, at the nearest time.
        let (_, e, n) = route(vec![emit(
            ERRORS_PORT_INDEX,
            "bad",
            "v",
            LATEST_EVENT_TIME + 9,
        )]);
        assert_eq!(e, [rec("bad", "v", LATEST_EVENT_TIME)]);
        assert_eq!(n, 1);
    }

    #[test]
    fn a_record_over_the_limit_goes_to_errors_cut_to_the_limit() {
        // Exactly at the limit: routed.
        let value = format!(r#"{{"k":"y","p":"{}"}}"#, "v".repeat(MAX - 1 - 16));
        assert_eq!(1 + value.len(), MAX);
        let (b, e, _) = route(vec![emit(0, "x", &value, 5)]);
        assert_eq!((b.len(), e.len()), (1, 0), "a record of {MAX} bytes passes");
        // One byte over: cut to the limit, key first.
        let value = format!(r#"{{"k":"y","p":"{}"}}"#, "v".repeat(MAX - 16));
        let (b, e, _) = route(vec![emit(0, "x", &value, 5)]);
        assert!(b.is_empty());
        assert_eq!(e, [rec("x", &value[..MAX - 1], 5)]);
        // A key over the limit on its own: cut, with no value.
        let key = "k".repeat(MAX + 3);
        let (_, e, _) = route(vec![emit(0, &key, "v", 5)]);
        assert_eq!(e, [rec(&key[..MAX], "", 5)]);
    }

    #[test]
    fn a_record_for_an_undeclared_output_goes_to_errors() {
        let (b, e, n) = route(vec![emit(usize::MAX, "x", r#"{"k":"y"}"#, 5)]);
        assert!(b.is_empty());
        assert_eq!(e, [rec("x", r#"{"k":"y"}"#, 5)]);
        assert_eq!(n, 1);
    }

    #[test]
    fn several_records_are_routed_in_order_each_to_its_place() {
        let (b, e, n) = route(vec![
            emit(0, "x", r#"{"k":"1"}"#, 1),
            emit(0, "x", "bad", 2),
            emit(0, "x", r#"{"k":"3"}"#, 3),
        ]);
        assert_eq!(
            b,
            [rec("1", r#"{"k":"1"}"#, 1), rec("3", r#"{"k":"3"}"#, 3)]
        );
        assert_eq!(e, [rec("x", "bad", 2)]);
        assert_eq!(n, 3);
    }
}
