//! Steps 2-4 of a turn, for one shard at a time: deliveries applied (and
//! duplicates dropped), the source polled, timers fired; what each produced
//! is routed into the turn's batch as it comes.

use super::{Executor, Turn, IDLE_WATERMARK_STEP, RANGE_DELETE_MIN};
use crate::api::{ComputationError, Emitter, SourcePoll};
use crate::delivery::Offer;
use crate::error::EngineError;
use crate::failpoint::{self, Point};
use crate::layout;
use crate::plan::{Plan, ERRORS_PORT_INDEX};
use crate::record::{is_valid_event_time, now_micros, TimeDomain, Timer, MAX_TIME};
use crate::scope::{Clock, Emit};
use crate::shard::{send_early, Body, KeyEnv, SOURCE_IDLE_PAUSE};
use crate::shared::Handed;
use bytes::Bytes;
use millrace_storage::{Batch, Cf};
use std::sync::Arc;
use std::time::Instant;

impl Executor {
    /// Routes what shard `i` emitted since the last call.
    pub(super) fn route_emitted(&mut self, i: usize, batch: &mut Batch<'_>) {
        self.router.route(&mut self.shards[i], batch);
    }

    /// Deletes from the outbox what acknowledgements released since the last
    /// turn: one delete each, or one range delete from `RANGE_DELETE_MIN` on.
    pub(super) fn delete_released(&mut self, plan: &Plan, batch: &mut Batch<'_>) {
        for (ch, first, last) in self.released.drain(..) {
            let prefix = plan.outbox_prefix(ch);
            if last - first + 1 < RANGE_DELETE_MIN {
                let mut key = layout::outbox_key(&prefix, first);
                let at = prefix.len();
                for seq in first..=last {
                    key[at..].copy_from_slice(&seq.to_be_bytes());
                    batch.delete(Cf::Outbox, &key);
                }
            } else {
                batch.delete_range(
                    Cf::Outbox,
                    &layout::outbox_key(&prefix, first),
                    &layout::outbox_key(&prefix, last + 1),
                );
            }
        }
    }

    /// Steps 2 and 3 for shard `i`: takes its pending deliveries in order,
    /// drops duplicates (acknowledging them again) and gaps, and runs the
    /// computation (or the sink) on the rest; routes what each produced.
    pub(super) fn apply_deliveries(
        &mut self,
        i: usize,
        plan: &Plan,
        batch: &mut Batch<'_>,
        budget: &mut usize,
        turn: &mut Turn,
    ) -> Result<(), EngineError> {
        let engine = &plan.topology.engine;
        let node_metrics = Arc::clone(&self.node_metrics);
        let node = &plan.nodes[self.shards[i].node()];
        let metrics = &node_metrics[self.shards[i].node()];
        while !turn.out_of_time && *budget > 0 && self.shards[i].backlog() < engine.max_backlog {
            if turn.processed % 64 == 63 && turn.started.elapsed() >= turn.budget {
                turn.out_of_time = true;
                break;
            }
            let Some((ch, seq, env)) = self.shards[i].next_pending() else {
                break;
            };
            let shard = &mut self.shards[i];
            match shard.offer(ch, seq) {
                None => continue,
                Some(Offer::Duplicate) => {
                    metrics.duplicates.inc();
                    let upto = shard.acknowledgeable(ch);
                    if upto > 0 {
                        let a = self.acks.entry(ch).or_insert(0);
                        *a = (*a).max(upto);
                    }
                    continue;
                }
                Some(Offer::Gap) => {
                    metrics.gaps.inc();
                    continue;
                }
                Some(Offer::Apply) => {}
            }
            if !shard.defers() {
                self.acks.insert(ch, seq);
            }
            *budget -= 1;
            turn.processed += 1;
            metrics.records_in.inc();
            let record = env.record();
            if shard.saw_event(record.timestamp) {
                metrics.late_records.inc();
            }
            match &mut shard.body {
                Body::Sink(s) => {
                    let id = plan.delivery_id(ch, seq);
                    s.sink
                        .write_delivered(&record, &id)
                        .map_err(EngineError::Sink)?;
                    s.wrote(ch, seq);
                    let lat = (now_micros() - env.ingest()).max(0) as f64 / 1e6;
                    metrics.e2e_latency.observe(lat);
                }
                Body::Compute(_) => {
                    let key = record.key.clone();
                    let at = KeyEnv {
                        store: &self.store,
                        emits: &mut self.router.emits,
                        ports: &node.ports,
                        ingest: env.ingest(),
                        input: &plan.edges[plan.chan(ch).edge].stream,
                        clock: Clock::System,
                    };
                    match shard.with_key(at, &key, |comp, ctx| comp.process_record(ctx, record)) {
                        Some(Err(ComputationError::BadRecord(why))) => {
                            metrics.bad_record(&node.name, &key, &why);
                            // The record went to the computation; the
                            // envelope still holds it for the errors output.
                            let bad = env.record();
                            self.router.emits.push(Emit {
                                port: ERRORS_PORT_INDEX,
                                key: bad.key,
                                value: bad.value,
                                ts: bad.timestamp,
                                ingest: env.ingest(),
                            });
                        }
                        Some(Err(ComputationError::Storage(e))) => return Err(e.into()),
                        Some(Ok(())) | None => {}
                    }
                }
                Body::Source(_) => {}
            }
            self.route_emitted(i, batch);
        }
        Ok(())
    }

    /// Step 3 for a source shard: polls it for as many records as its room
    /// allows (backlog and batch), unless it is exhausted or resting after
    /// a poll that found nothing.
    pub(super) fn poll_source(
        &mut self,
        i: usize,
        plan: &Plan,
        budget: usize,
        turn: &mut Turn,
    ) -> Result<(), EngineError> {
        let engine = &plan.topology.engine;
        let shard = &mut self.shards[i];
        let node = &plan.nodes[shard.node()];
        let metrics = &self.node_metrics[shard.node()];
        let room = engine
            .max_backlog
            .saturating_sub(shard.backlog())
            .min(budget);
        let Body::Source(src) = &mut shard.body else {
            return Ok(());
        };
        let now = Instant::now();
        if src.exhausted || turn.out_of_time || room == 0 || now < src.idle_until {
            return Ok(());
        }
        let mut polled = Vec::new();
        let mut emitter = Emitter::new(&mut polled);
        let poll = src
            .source
            .poll(&mut emitter, room)
            .map_err(|e| EngineError::Source(node.name.clone(), e))?;
        let bad = std::mem::take(&mut emitter.bad);
        let ingest = now_micros();
        let emits = &mut self.router.emits;
        for (key, value, why) in bad {
            // Read but not decodable: to the errors output, as read.
            metrics.bad_record(&node.name, &key, &why);
            src.position_dirty = true;
            emits.push(Emit {
                port: ERRORS_PORT_INDEX,
                key,
                value,
                ts: now_micros(),
                ingest,
            });
        }
        if !polled.is_empty() {
            src.position_dirty = true;
            src.last_data = now;
            src.idle_pause = SOURCE_IDLE_PAUSE.0;
            turn.processed += polled.len();
            metrics.records_in.inc_by(polled.len() as u64);
        }
        match poll {
            SourcePoll::Ready => {}
            SourcePoll::Idle => {
                // Pauses double while polls find nothing, and start again
                // from the shortest after any data.
                src.idle_until = now + src.idle_pause;
                src.idle_pause = (src.idle_pause * 2).min(SOURCE_IDLE_PAUSE.1);
            }
            SourcePoll::Exhausted => src.exhausted = true,
        }
        for (key, value, ts) in polled {
            // An event time out of range goes to the errors output when it
            // is routed; it never moves the watermark.
            if is_valid_event_time(ts) {
                shard.saw_event(ts);
            }
            emits.push(Emit {
                port: 0,
                key,
                value,
                ts,
                ingest,
            });
        }
        Ok(())
    }

    /// Routes what shard `i`'s source polled; a replayable source's
    /// productions then leave at once, on their own path.
    pub(super) fn route_polled(&mut self, i: usize, plan: &Plan, batch: &mut Batch<'_>) {
        let shard = &mut self.shards[i];
        let discarded = shard.take_discarded();
        if discarded > 0 {
            self.node_metrics[shard.node()]
                .discarded_records
                .inc_by(discarded);
        }
        self.route_emitted(i, batch);
        let shard = &mut self.shards[i];
        shard.note_replay_point();
        if !shard.uses_outbox() {
            // Not in the batch, so they need not wait for the commit: they
            // go now, and the other executor works on them while this one
            // commits (see `shard/replay.rs`).
            let handed = Handed {
                produced: self.router.take_produced(),
                ..Handed::default()
            };
            let (me, replay_out, peers) = (self.me, &mut self.replay_out, &self.peers);
            let routes = &self.shared.routes;
            #[cfg(test)]
            let shared = Arc::clone(&self.shared);
            #[cfg(test)]
            let id = self.id;
            let sent = self.shared.in_flight.hand_out(handed, || {
                send_early(plan, (routes, me), shard, replay_out, peers, |_q| {
                    #[cfg(test)]
                    shared.record(crate::outgoing::sent_step(id, true, _q));
                })
            });
            if sent {
                failpoint::hit(Point::SourceSent);
            }
        }
    }

    /// A source shard's own watermark (from its data, or, idle, from the
    /// clock), then every shard's output watermark and idleness.
    pub(super) fn advance_watermark(&mut self, i: usize, plan: &Plan, stopping: bool) {
        let shard = &mut self.shards[i];
        let node = &plan.nodes[shard.node()];
        let source_wm = match &shard.body {
            Body::Source(src) if src.exhausted => Some((MAX_TIME, false)),
            Body::Source(src) => {
                let newest = src.source.watermark().unwrap_or(shard.max_event());
                let from_data = newest.saturating_sub(node.watermark.out_of_order);
                // After `idle_after` without data a source is idle: its
                // consumers leave it out of their minimum (as Flink's
                // `withIdleness`), and its own watermark follows the clock,
                // in whole steps so that it is sent and persisted once a
                // step, not on every turn. Not while draining: then nothing
                // new comes in, and a watermark that kept moving would keep
                // the drain from ever finding the graph quiet.
                let idle = !stopping
                    && node
                        .watermark
                        .idle_after
                        .is_some_and(|d| src.last_data.elapsed() >= d);
                Some(if idle {
                    let clock = now_micros().saturating_sub(node.watermark.out_of_order);
                    let step = IDLE_WATERMARK_STEP.as_micros() as i64;
                    let quiet = shard.backlog() == 0;
                    (from_data.max(clock.div_euclid(step) * step), quiet)
                } else {
                    (from_data, false)
                })
            }
            _ => None,
        };
        shard.recompute_output_wm(source_wm);
    }

    /// Step 4: fires the event-time timers of shard `i` that its input
    /// watermark has passed and, with `processing`, the processing-time
    /// timers the clock has passed; then routes what they emitted.
    pub(super) fn fire_due_timers(
        &mut self,
        i: usize,
        plan: &Plan,
        processing: bool,
        batch: &mut Batch<'_>,
    ) -> Result<(), EngineError> {
        let shard = &mut self.shards[i];
        if !matches!(shard.body, Body::Compute(_)) {
            return Ok(());
        }
        let node = &plan.nodes[shard.node()];
        let metrics = &self.node_metrics[shard.node()];
        let now = now_micros();
        let domains: &[(TimeDomain, i64)] = if processing {
            &[
                (TimeDomain::EventTime, shard.input_wm()),
                (TimeDomain::ProcessingTime, now),
            ]
        } else {
            &[(TimeDomain::EventTime, shard.input_wm())]
        };
        let mut fired = false;
        for &(domain, limit) in domains {
            while let Some((key, tag, time)) = shard.pop_due_timer(domain, limit) {
                fired = true;
                let at = KeyEnv {
                    store: &self.store,
                    emits: &mut self.router.emits,
                    ports: &node.ports,
                    ingest: now,
                    input: "",
                    clock: Clock::System,
                };
                // The computation sees the key and tag as `Bytes`.
                let key = Bytes::copy_from_slice(key.as_bytes());
                let tag = Bytes::copy_from_slice(tag.as_bytes());
                let timer = Timer { tag, domain, time };
                match shard.with_key(at, &key, |comp, ctx| comp.process_timer(ctx, timer)) {
                    Some(Err(ComputationError::BadRecord(why))) => {
                        metrics.bad_record(&node.name, &key, &why)
                    }
                    Some(Err(ComputationError::Storage(e))) => return Err(e.into()),
                    Some(Ok(())) | None => {}
                }
            }
        }
        if fired {
            self.route_emitted(i, batch);
        }
        Ok(())
    }
}
