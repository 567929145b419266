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
