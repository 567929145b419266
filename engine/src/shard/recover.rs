//! Rebuilding a shard's runtime from its last commit: the one constructor
//! the executor calls for each of its shards at start ([`ShardRt::recover`]).
//! Everything it reads was written by the same commits, so the shard starts
//! consistent: its source or sink reopened at the committed position, its
//! inputs' applied sequence numbers, its watermarks, its state cache and
//! timers, and its outbox, whose productions go out again.

use super::{Body, KeyEnv, ReplayLog, ShardRt, SinkRt, SourceRt, SOURCE_IDLE_PAUSE};
use crate::api::{ComputationError, SinkStart, SourceError, SourceShard};
use crate::delivery::{InChannel, OutChannel};
use crate::error::EngineError;
use crate::keyed_state::KeyedState;
use crate::layout::{self, position_key, read_u64, watermark_key};
use crate::mapkey::FastMap;
use crate::metrics::NodeMetrics;
use crate::plan::{Maker, Plan, Sid};
use crate::record::{now_micros, Envelope, EventTime, MIN_TIME};
use crate::scope::Clock;
use crate::shared::InFlight;
use crate::timers::Timers;
use bytes::Bytes;
use millrace_storage::{Cf, Store};
use std::time::Instant;

impl ShardRt {
    /// Rebuilds shard `sid` from what `store` committed for it, opening its
    /// source or sink at the committed position.
    pub(crate) fn recover(
        plan: &Plan,
        sid: Sid,
        store: &Store,
        metrics: &NodeMetrics,
        in_flight: &InFlight,
    ) -> Result<ShardRt, EngineError> {
        let spec = &plan.shards[sid as usize];
        let node = &plan.nodes[spec.node];
        let position = store.get(Cf::Meta, &position_key(&spec.prefix))?;
        let mut applied = Vec::new();
        for ch in plan.in_channels(sid) {
            let seq = store
                .get(Cf::Channels, &plan.applied_seq_key(ch))?
                .as_deref()
                .and_then(read_u64)
                .unwrap_or(0);
            applied.push((ch, seq));
        }
        let mut replayable = false;
        let body = match &node.maker {
            Maker::Source(f, c) => {
                let mut source = f(c).map_err(EngineError::Config)?;
                let part = SourceShard {
                    index: spec.shard,
                    count: node.shards,
                    idle_after: node.watermark.idle_after,
                };
                source.assign(&part).map_err(|why| {
                    EngineError::Source(node.name.clone(), SourceError::Setup(why))
                })?;
                source
                    .open(position.as_deref())
                    .map_err(|e| EngineError::Source(node.name.clone(), e))?;
                in_flight.source_started();
                replayable = source.replayable();
                Body::Source(SourceRt {
                    source,
                    exhausted: false,
                    retired: false,
                    idle_until: Instant::now(),
                    idle_pause: SOURCE_IDLE_PAUSE.0,
                    last_data: Instant::now(),
                    position_dirty: false,
                })
            }
            Maker::Computation(make) => Body::Compute(make()),
            Maker::Sink(f, c) => {
                let mut sink = f(c).map_err(EngineError::Config)?;
                // Raised (durably) by the worker before its executors start.
                let epoch = store
                    .get(Cf::Meta, &layout::epoch_key(&spec.prefix))?
                    .as_deref()
                    .and_then(read_u64)
                    .unwrap_or(1);
                let start = applied
                    .iter()
                    .fold(SinkStart::new(epoch), |start, &(ch, seq)| {
                        let id = plan.delivery_id(ch, seq);
                        start.applied(id.edge, id.producer_shard, id.seq)
                    });
                sink.starting(&start);
                sink.open(position.as_deref()).map_err(EngineError::Sink)?;
                Body::Sink(SinkRt::new(sink, &applied))
            }
        };
        let inputs: FastMap<_, _> = applied
            .into_iter()
            .map(|(ch, seq)| (ch, InChannel::new(seq)))
            .collect();
        let follows_state = matches!(&body, Body::Compute(c) if c.timers_follow_state());
        let state =
            KeyedState::new(plan.topology.engine.state_cache_keys / node.shards.max(1) as usize);
        let timers = if follows_state {
            Timers::volatile()
        } else {
            Timers::load(store, &spec.prefix)?
        };
        let mut shard = ShardRt::new(sid, spec.node, spec.prefix.clone(), body, state, timers);
        shard.inputs = inputs;
        shard.replay = replayable.then(ReplayLog::default);
        let upstream: Vec<&[u8]> = plan
            .upstream(sid)
            .iter()
            .map(|u| plan.shards[*u as usize].prefix.as_slice())
            .collect();
        shard.restore_watermarks(store, &upstream)?;
        if follows_state {
            restore_timers(store, &mut shard, metrics, &node.name, &node.ports)?;
        }
        let mut restored = 0u64;
        for &e in node.out_edges.iter().flatten() {
            let dst_shards = plan.nodes[plan.edges[e].to].shards;
            for d in 0..dst_shards {
                let ch = plan.channel(e, spec.shard, d);
                let next = store
                    .get(Cf::Channels, &plan.next_seq_key(ch))?
                    .as_deref()
                    .and_then(read_u64)
                    .unwrap_or(1);
                let mut out = OutChannel::new(next);
                let mut bad = None;
                let prefix = plan.outbox_prefix(ch);
                store.for_each_prefix(Cf::Outbox, &prefix, |k, v| {
                    let seq = layout::parse_outbox_seq(&k[prefix.len()..]);
                    match (seq, Envelope::from_bytes(Bytes::copy_from_slice(v))) {
                        (Ok(seq), Ok(env)) if seq < next => {
                            shard.track_unacked(env.timestamp());
                            out.restore(seq, env);
                            restored += 1;
                            true
                        }
                        _ => {
                            bad = Some(k.to_vec());
                            false
                        }
                    }
                })?;
                if let Some(k) = bad {
                    return Err(EngineError::Corrupt(format!(
                        "outbox entry {k:?} of {} is malformed",
                        node.name
                    )));
                }
                shard.outs.insert(ch, out);
            }
        }
        if restored > 0 {
            metrics.retries.inc_by(restored);
            in_flight.restored(restored as i64);
        }
        Ok(shard)
    }

    /// Sets the watermarks from what `store` committed: the output
    /// watermark of each upstream shard (`upstream` holds their key
    /// prefixes, in the plan's order) and this shard's own, written by
    /// [`ShardRt::checkpoint_watermark`]; the input watermark follows from
    /// the upstream ones. None of them is idle until it says so again.
    pub(crate) fn restore_watermarks(
        &mut self,
        store: &Store,
        upstream: &[&[u8]],
    ) -> Result<(), EngineError> {
        let committed = |prefix: &[u8]| -> Result<EventTime, EngineError> {
            Ok(store
                .get(Cf::Meta, &watermark_key(prefix))?
                .as_deref()
                .and_then(read_u64)
                .map_or(MIN_TIME, |v| v as i64))
        };
        self.upstream_wm = upstream
            .iter()
            .map(|p| committed(p))
            .collect::<Result<_, _>>()?;
        self.upstream_idle = vec![false; upstream.len()];
        self.output_wm = committed(&self.prefix)?;
        self.recompute_input_wm();
        Ok(())
    }
}

/// Rebuilds the in-memory timers of a shard whose computation derives them
/// from its state: one `restore_timers` call per key with committed state.
pub(crate) fn restore_timers(
    store: &Store,
    shard: &mut ShardRt,
    metrics: &NodeMetrics,
    component: &str,
    ports: &[String],
) -> Result<(), EngineError> {
    let prefix = shard.prefix.clone();
    let (mut malformed, mut failed) = (0usize, None);
    let mut emits = Vec::new();
    store.for_each_state(&prefix, |k, state| {
        let Ok(key) = layout::parse_state_key(&k[prefix.len()..]) else {
            malformed += 1;
            return true;
        };
        let key = Bytes::from(key);
        let at = KeyEnv {
            store,
            emits: &mut emits,
            ports,
            ingest: now_micros(),
            input: "",
            clock: Clock::System,
        };
        match shard.with_key(at, &key, |comp, ctx| comp.restore_timers(ctx, state)) {
            Some(Err(ComputationError::BadRecord(why))) => {
                metrics.bad_record(component, &key, &why)
            }
            Some(Err(ComputationError::Storage(e))) => failed = Some(e),
            Some(Ok(())) | None => {}
        }
        // Restoring sets timers only; anything else is not kept.
        emits.clear();
        shard.state.discard_changes();
        failed.is_none()
    })?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    if malformed > 0 {
        tracing::warn!(component, malformed, "skipped malformed state keys");
    }
    Ok(())
}
