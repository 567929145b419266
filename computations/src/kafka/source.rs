//! The `kafka` source (see the module documentation of `kafka`).

use super::metrics::metrics;
use super::reset::{self, OnOffsetReset, Reset};
use super::{Brokers, ClientOptions, PropertyValue};
use crate::file_source::EventTimeField;
use millrace_config::{Component, ConfigError, KeyExtractor};
use millrace_engine::{
    health, is_valid_event_time, Emitter, EventTime, Registry, Source, SourceError, SourcePoll,
    SourceShard, MIN_TIME,
};
use parking_lot::Mutex;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaErrorCode;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long one set-up request to the broker may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Retries of the set-up start after this and double up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    brokers: Brokers,
    client_id: Option<String>,
    #[serde(default)]
    properties: BTreeMap<String, PropertyValue>,
    topic: String,
    /// The partitions to read (all by default).
    partitions: Option<Vec<i32>>,
    /// Where a fresh data directory starts (see [`parse_start`]).
    start: Option<toml::Value>,
    /// `kafka` (the record's Kafka timestamp, the default), or an extractor
    /// of the value: `json:/ptr` or `field:N` (with `delimiter`).
    timestamp: Option<String>,
    delimiter: Option<String>,
    /// Unit of an extracted event time: `s`, `ms` (default) or `us`.
    timestamp_unit: Option<String>,
    /// A consumer group to commit offsets to, for lag monitoring only.
    group_id: Option<String>,
    /// What to do when a partition no longer holds the committed position
    /// (see `kafka/reset.rs`): `fail` (the default), `earliest` or `latest`.
    on_offset_reset: Option<String>,
}

/// Where a partition with no committed position starts.
#[derive(Debug, Clone, PartialEq)]
enum Start {
    Earliest,
    Latest,
    /// The first record at or after this time (ms since the epoch).
    Timestamp(i64),
    /// Explicit next offsets; partitions not named start earliest.
    Offsets(BTreeMap<i32, i64>),
}

/// `start`: `"earliest"` (the default), `"latest"`,
/// `{ timestamp_ms = N }` or `{ offsets = { "0" = 42, ... } }`.
fn parse_start(c: &Component, v: Option<toml::Value>) -> Result<Start, ConfigError> {
    let bad = |what: String| {
        c.options.error(
            Some("start"),
            format!(
                "{what}: use \"earliest\", \"latest\", {{ timestamp_ms = N }} \
                 or {{ offsets = {{ \"PARTITION\" = OFFSET, ... }} }}"
            ),
        )
    };
    let Some(v) = v else {
        return Ok(Start::Earliest);
    };
    match v {
        toml::Value::String(s) if s == "earliest" => Ok(Start::Earliest),
        toml::Value::String(s) if s == "latest" => Ok(Start::Latest),
        toml::Value::Table(t) if t.len() == 1 => {
            if let Some(ts) = t.get("timestamp_ms") {
                return ts
                    .as_integer()
                    .filter(|ms| *ms >= 0)
                    .map(Start::Timestamp)
                    .ok_or_else(|| bad(format!("`timestamp_ms = {ts}` is not a time in ms")));
            }
            let Some(toml::Value::Table(o)) = t.get("offsets") else {
                return Err(bad(format!(
                    "`{}` is not a way to start",
                    toml::Value::Table(t.clone())
                )));
            };
            let mut offsets = BTreeMap::new();
            for (p, off) in o {
                match (p.parse::<i32>(), off.as_integer()) {
                    (Ok(p), Some(off)) if p >= 0 && off >= 0 => {
                        offsets.insert(p, off);
                    }
                    _ => return Err(bad(format!("`{p} = {off}` is not PARTITION = OFFSET"))),
                }
            }
            Ok(Start::Offsets(offsets))
        }
        other => Err(bad(format!("`{other}` is not a way to start"))),
    }
}

/// The consumer's context: librdkafka's statistics give the lag and each
/// partition's bounds on the broker; its errors are counted and shown on
/// `/healthz` until a broker is up again.
struct SourceContext {
    component: String,
    topic: String,
    /// Every broker was unreachable: the client is replaced (see
    /// [`KafkaSource::replace_client`]).
    lost: AtomicBool,
    /// Each partition's (log start, high watermark) as the broker's last
    /// fetch responses gave them, from the newest statistics not yet
    /// looked at (see [`KafkaSource::check_bounds`]).
    bounds: Mutex<Option<BTreeMap<i32, (i64, i64)>>>,
}

impl ClientContext for SourceContext {
    fn stats(&self, stats: Statistics) {
        // (librdkafka's own `consumer_lag` counts from the committed
        // offset, which this source does not commit: the lag is worked out
        // from these bounds and the source's own position, in
        // `KafkaSource::check_bounds`.)
        if let Some(topic) = stats.topics.get(&self.topic) {
            let bounds = topic
                .partitions
                .values()
                .filter(|p| p.partition >= 0)
                .map(|p| (p.partition, (p.lo_offset, p.hi_offset)))
                .collect();
            *self.bounds.lock() = Some(bounds);
        }
        // A broker answers again: an earlier "all brokers down" is over.
        if !self.lost.load(Ordering::SeqCst) && stats.brokers.values().any(|b| b.state == "UP") {
            health::clear(&health_name(&self.component));
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.lost.store(true, Ordering::SeqCst);
        }
        metrics()
            .errors
            .with_label_values(&[&self.component, "connect"])
            .inc();
        tracing::warn!(component = %self.component, %error, reason, "kafka source: client error (librdkafka retries)");
        health::report(&health_name(&self.component), format!("{error}: {reason}"));
    }
}

impl ConsumerContext for SourceContext {}

fn health_name(component: &str) -> String {
    format!("kafka source `{component}`")
}

/// What `/healthz` names a partition not read under `on_offset_reset = "fail"` by.
fn stopped_health_name(component: &str, partition: i32) -> String {
    format!("kafka source `{component}` partition {partition}")
}

/// One partition of this shard.
#[derive(Debug)]
struct Part {
    id: i32,
    /// The offset of the next record to read.
    next: i64,
    /// The newest event time read from it.
    newest: EventTime,
    /// When it last gave a record (or was assigned).
    last_data: Instant,
}

/// The Kafka source (one shard of it).
pub struct KafkaSource {
    component: String,
    config: ClientConfig,
    topic: String,
    only: Option<Vec<i32>>,
    start: Start,
    on_reset: OnOffsetReset,
    /// Partitions not read because the broker does not hold their
    /// committed position (`on_offset_reset = "fail"`), and why.
    stopped: BTreeMap<i32, String>,
    event_time: Option<EventTimeField>,
    group: bool,
    shard: SourceShard,
    /// Next offsets from the committed position, by partition.
    resume: BTreeMap<i32, i64>,
    consumer: Option<Arc<BaseConsumer<SourceContext>>>,
    parts: Vec<Part>,
    retry_at: Instant,
    backoff: Duration,
    committed_to_group: Instant,
}

impl KafkaSource {
    /// Creates the consumer, finds this shard's partitions and assigns them
    /// at their next offsets: where this client's predecessor got to, the
    /// committed position, or where `start` says.
    fn connect(&mut self) -> Result<(), String> {
        let consumer: BaseConsumer<SourceContext> = self
            .config
            .create_with_context(SourceContext {
                component: self.component.clone(),
                topic: self.topic.clone(),
                lost: AtomicBool::new(false),
                bounds: Mutex::new(None),
            })
            .map_err(|e| format!("creating the consumer: {e}"))?;
        let md = consumer
            .fetch_metadata(Some(&self.topic), REQUEST_TIMEOUT)
            .map_err(|e| format!("reading metadata of topic `{}`: {e}", self.topic))?;
        let topic = md
            .topics()
            .iter()
            .find(|t| t.name() == self.topic)
            .ok_or_else(|| format!("topic `{}` not in the broker's metadata", self.topic))?;
        if let Some(e) = topic.error() {
            return Err(format!("topic `{}`: {:?}", self.topic, e));
        }
        let mut all: Vec<i32> = topic.partitions().iter().map(|p| p.id()).collect();
        all.sort_unstable();
        if all.is_empty() {
            return Err(format!("topic `{}` has no partitions (yet)", self.topic));
        }
        if let Some(only) = &self.only {
            if let Some(missing) = only.iter().find(|p| !all.contains(p)) {
                return Err(format!(
                    "partition {missing} of topic `{}` does not exist (it has {})",
                    self.topic,
                    all.len()
                ));
            }
            all.retain(|p| only.contains(p));
        }
        let mine: Vec<i32> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| *i as u32 % self.shard.count == self.shard.index)
            .map(|(_, p)| *p)
            .collect();
        let mut parts = Vec::new();
        for &p in &mine {
            // A replaced client's partitions go on where they were, with
            // the event time they had reached.
            let part = match self.parts.iter().find(|old| old.id == p) {
                Some(old) => Part { ..*old },
                None => Part {
                    id: p,
                    next: match self.resume.get(&p) {
                        Some(&o) => o,
                        None => self.start_offset(&consumer, p)?,
                    },
                    newest: MIN_TIME,
                    last_data: Instant::now(),
                },
            };
            parts.push(part);
        }
        // Errors of the client's start (brokers down before it reached one)
        // are over: "lost" is about a broker lost after this point.
        while consumer.poll(Duration::ZERO).is_some() {}
        consumer.context().lost.store(false, Ordering::SeqCst);
        let old = std::mem::replace(&mut self.parts, parts);
        if let Err(e) = self.assign_partitions(&consumer) {
            self.parts = old;
            return Err(e);
        }
        tracing::info!(
            component = %self.component,
            shard = self.shard.index,
            partitions = ?self.parts.iter().map(|p| (p.id, p.next)).collect::<Vec<_>>(),
            stopped = ?self.stopped.keys().collect::<Vec<_>>(),
            "kafka source: reading (partition, next offset)"
        );
        self.consumer = Some(Arc::new(consumer));
        Ok(())
    }

    /// Assigns the partitions being read at their next offsets (those
    /// stopped are left out). Records fetched under an earlier assignment
    /// and not yet taken are fetched again.
    fn assign_partitions(&self, consumer: &BaseConsumer<SourceContext>) -> Result<(), String> {
        let mut tpl = TopicPartitionList::new();
        for p in self
            .parts
            .iter()
            .filter(|p| !self.stopped.contains_key(&p.id))
        {
            tpl.add_partition_offset(&self.topic, p.id, Offset::Offset(p.next))
                .map_err(|e| format!("assigning partition {}: {e}", p.id))?;
        }
        consumer
            .assign(&tpl)
            .map_err(|e| format!("assigning partitions of topic `{}`: {e}", self.topic))
    }

    /// Moves the partitions being read to their next offsets and stops
    /// fetching those stopped since, without assigning anything again: a
    /// new assignment of partitions whose fetchers are still stopping can
    /// abort the process in librdkafka 2.12 (`rd_kafka_assignment_partition_stopped:
    /// Assertion rktp->rktp_started failed`, seen in this crate's tests).
    /// A seek also restarts a partition librdkafka stopped after "offset
    /// out of range", and drops what it had fetched from the old offset.
    fn reposition(&self, consumer: &BaseConsumer<SourceContext>) -> Result<(), String> {
        let (mut read, mut stop) = (TopicPartitionList::new(), TopicPartitionList::new());
        for p in &self.parts {
            let list = if self.stopped.contains_key(&p.id) {
                &mut stop
            } else {
                &mut read
            };
            list.add_partition_offset(&self.topic, p.id, Offset::Offset(p.next))
                .map_err(|e| format!("partition {}: {e}", p.id))?;
        }
        let assigned = consumer
            .assignment()
            .map_err(|e| format!("reading the assignment of topic `{}`: {e}", self.topic))?;
        let stop_now: Vec<i32> = stop
            .elements()
            .iter()
            .map(|e| e.partition())
            .filter(|p| assigned.find_partition(&self.topic, *p).is_some())
            .collect();
        if !stop_now.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for p in stop_now {
                tpl.add_partition(&self.topic, p);
            }
            consumer
                .incremental_unassign(&tpl)
                .map_err(|e| format!("stopping partitions of topic `{}`: {e}", self.topic))?;
        }
        if read.count() > 0 {
            let sought = consumer
                .seek_partitions(read, REQUEST_TIMEOUT)
                .map_err(|e| format!("seeking in topic `{}`: {e}", self.topic))?;
            if let Some(e) = sought.elements().iter().find_map(|e| e.error().err()) {
                return Err(format!("seeking in topic `{}`: {e}", self.topic));
            }
        }
        Ok(())
    }

    /// Replaces a client whose brokers were all unreachable by a new one,
    /// made once a broker answers: a client that lived through the outage
    /// keeps what it knew of the cluster before it (leaders, topic ids),
    /// and librdkafka 2.12 crashes on a fetch response about a topic id the
    /// restarted broker no longer knows (see docs/DESIGN.md, "Kafka").
    /// The partitions keep their next offsets and event times.
    fn replace_client(&mut self) {
        tracing::warn!(
            component = %self.component,
            "kafka source: every broker was unreachable; reconnecting with a new client"
        );
        metrics()
            .retries
            .with_label_values(&[&self.component])
            .inc();
        self.consumer = None;
        self.retry_at = Instant::now();
        self.backoff = FIRST_BACKOFF;
    }

    /// Looks at the broker's bounds of each partition read (from the
    /// client's statistics; `bounds`): one whose end is below the next
    /// offset no longer holds the committed position. Whether the
    /// partitions were sought again (records polled before are then
    /// fetched again).
    fn check_bounds(
        &mut self,
        consumer: &BaseConsumer<SourceContext>,
        bounds: &BTreeMap<i32, (i64, i64)>,
    ) -> bool {
        for p in &self.parts {
            if let Some(&(_, high)) = bounds.get(&p.id).filter(|(_, high)| *high >= 0) {
                metrics()
                    .lag
                    .with_label_values(&[&self.component, &p.id.to_string()])
                    .set((high - p.next).max(0));
            }
        }
        let behind: Vec<(i32, (i64, i64))> = self
            .parts
            .iter()
            .filter(|p| !self.stopped.contains_key(&p.id))
            .filter_map(|p| {
                let &(low, high) = bounds.get(&p.id)?;
                // A negative end: no fetch response yet.
                (high >= 0 && high < p.next).then(|| (p.id, (low.clamp(0, high), high)))
            })
            .collect();
        self.apply_resets(consumer, &behind)
    }

    /// After librdkafka's "offset out of range" (a Kafka broker's answer to
    /// a fetch below the log start or past the end; librdkafka then stops
    /// fetching the partition): asks the broker for each partition's
    /// bounds and resets those whose next offset is outside.
    fn check_listed_bounds(&mut self, consumer: &BaseConsumer<SourceContext>) {
        let mut outside = Vec::new();
        for p in self
            .parts
            .iter()
            .filter(|p| !self.stopped.contains_key(&p.id))
        {
            match consumer.fetch_watermarks(&self.topic, p.id, REQUEST_TIMEOUT) {
                Ok((low, high)) if p.next < low || p.next > high => {
                    outside.push((p.id, (low, high)))
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(
                    component = %self.component,
                    partition = p.id,
                    %e,
                    "kafka source: reading a partition's offsets after \"offset out of range\" failed; fetching again"
                ),
            }
        }
        // Sought again either way: librdkafka fetches the partitions it
        // stopped again (and says so again if they still are out of range).
        if !self.apply_resets(consumer, &outside) {
            if let Err(e) = self.reposition(consumer) {
                tracing::warn!(component = %self.component, "kafka source: {e}");
            }
        }
    }

    /// Applies `on_offset_reset` to partitions that do not hold their next
    /// offset (with the bounds they hold); counts, logs and reports each.
    /// Whether the partitions were sought again.
    fn apply_resets(
        &mut self,
        consumer: &BaseConsumer<SourceContext>,
        resets: &[(i32, (i64, i64))],
    ) -> bool {
        if resets.is_empty() {
            return false;
        }
        for &(id, bounds) in resets {
            let Some(part) = self.parts.iter_mut().find(|p| p.id == id) else {
                continue;
            };
            metrics()
                .offset_resets
                .with_label_values(&[&self.component, self.on_reset.label()])
                .inc();
            match reset::decide(self.on_reset, &self.topic, id, part.next, bounds) {
                Reset::Stop(why) => {
                    tracing::error!(component = %self.component, "kafka source: {why}");
                    health::report(&stopped_health_name(&self.component, id), why.clone());
                    self.stopped.insert(id, why);
                }
                Reset::Resume { at, why } => {
                    tracing::warn!(component = %self.component, "kafka source: {why}");
                    part.next = at;
                }
            }
        }
        if let Err(e) = self.reposition(consumer) {
            tracing::warn!(component = %self.component, "kafka source: {e}");
        }
        true
    }

    /// The concrete offset a partition without a committed position starts at.
    fn start_offset(&self, consumer: &BaseConsumer<SourceContext>, p: i32) -> Result<i64, String> {
        let bounds = || {
            consumer
                .fetch_watermarks(&self.topic, p, REQUEST_TIMEOUT)
                .map_err(|e| format!("reading the offsets of partition {p}: {e}"))
        };
        match &self.start {
            Start::Earliest => Ok(bounds()?.0),
            Start::Latest => Ok(bounds()?.1),
            Start::Offsets(offsets) => match offsets.get(&p) {
                Some(&o) => Ok(o),
                None => Ok(bounds()?.0),
            },
            Start::Timestamp(timestamp_ms) => {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(&self.topic, p, Offset::Offset(*timestamp_ms))
                    .map_err(|e| e.to_string())?;
                let found = consumer
                    .offsets_for_times(tpl, REQUEST_TIMEOUT)
                    .map_err(|e| {
                        format!("finding offsets for a timestamp in partition {p}: {e}")
                    })?;
                match found.find_partition(&self.topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => Ok(o),
                    // No record at or after the time: start at the end.
                    _ => Ok(bounds()?.1),
                }
            }
        }
    }

    /// Commits the offsets read to the consumer group, for lag monitoring
    /// only (millrace's own position is what it resumes from).
    fn commit_to_group(&mut self) {
        let (Some(consumer), true) = (&self.consumer, self.group) else {
            return;
        };
        if self.committed_to_group.elapsed() < Duration::from_secs(5) {
            return;
        }
        self.committed_to_group = Instant::now();
        let mut tpl = TopicPartitionList::new();
        for p in &self.parts {
            let _ = tpl.add_partition_offset(&self.topic, p.id, Offset::Offset(p.next));
        }
        if let Err(e) = consumer.commit(&tpl, rdkafka::consumer::CommitMode::Async) {
            tracing::debug!(component = %self.component, %e, "kafka source: group offset commit failed");
        }
    }
}

impl Source for KafkaSource {
    fn assign(&mut self, shard: &SourceShard) -> Result<(), String> {
        self.shard = shard.clone();
        Ok(())
    }

    fn open(&mut self, position: Option<&[u8]>) -> Result<(), SourceError> {
        if let Some(p) = position {
            self.resume = parse_position(p).map_err(SourceError::Position)?;
        }
        // A broker that is down is not fatal: `poll` retries with backoff.
        if let Err(why) = self.connect() {
            self.fail(why);
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut Emitter<'_>, max: usize) -> Result<SourcePoll, SourceError> {
        if self
            .consumer
            .as_ref()
            .is_some_and(|c| c.context().lost.load(Ordering::SeqCst))
        {
            self.replace_client();
        }
        if self.consumer.is_none() {
            if Instant::now() < self.retry_at {
                return Ok(SourcePoll::Idle);
            }
            metrics()
                .retries
                .with_label_values(&[&self.component])
                .inc();
            if let Err(why) = self.connect() {
                self.fail(why);
                return Ok(SourcePoll::Idle);
            }
            self.backoff = FIRST_BACKOFF;
            health::clear(&health_name(&self.component));
        }
        let Some(consumer) = self.consumer.clone() else {
            return Ok(SourcePoll::Idle);
        };
        let m = metrics();
        let mut got = 0;
        let mut out_of_range = false;
        while got < max {
            let polled = consumer.poll(Duration::ZERO);
            // Statistics that call served tell the partitions' bounds as of
            // the records polled before this one.
            let bounds = consumer.context().bounds.lock().take();
            if bounds.is_some_and(|b| self.check_bounds(&consumer, &b)) {
                continue; // sought again: what was polled comes again
            }
            let msg = match polled {
                None => break,
                Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset))) => {
                    out_of_range = true;
                    continue;
                }
                Some(Err(e)) => {
                    m.errors
                        .with_label_values(&[&self.component, "consume"])
                        .inc();
                    tracing::warn!(component = %self.component, %e, "kafka source: fetch error (retried)");
                    break;
                }
                Some(Ok(msg)) => msg,
            };
            let fetched = Fetched {
                partition: msg.partition(),
                offset: msg.offset(),
                key: msg.key().unwrap_or_default().to_vec(),
                value: msg.payload().unwrap_or_default().to_vec(),
                kafka_ms: msg.timestamp().to_millis(),
            };
            if self.take(fetched, out) {
                got += 1;
            }
        }
        if out_of_range {
            self.check_listed_bounds(&consumer);
        }
        if got > 0 {
            health::clear(&health_name(&self.component));
        }
        self.commit_to_group();
        Ok(if got > 0 {
            SourcePoll::Ready
        } else {
            SourcePoll::Idle
        })
    }

    fn position(&self) -> Vec<u8> {
        // Partitions assigned now, and those of the committed position not
        // (yet) assigned, so that a failed connect loses nothing.
        let mut next = self.resume.clone();
        for p in &self.parts {
            next.insert(p.id, p.next);
        }
        format_position(&next).into_bytes()
    }

    fn watermark(&self) -> Option<EventTime> {
        let idle_after = self.shard.idle_after;
        self.parts
            .iter()
            .filter(|p| idle_after.is_none_or(|d| p.last_data.elapsed() < d))
            .map(|p| p.newest)
            .min()
    }
}

/// One record as fetched from the broker.
struct Fetched {
    partition: i32,
    offset: i64,
    key: Vec<u8>,
    value: Vec<u8>,
    /// The record's Kafka timestamp (ms since the epoch), if it has one.
    kafka_ms: Option<i64>,
}

impl KafkaSource {
    /// Takes one fetched record: emits it with its event time (or, with
    /// none, to `NAME.errors`), and moves its partition's next offset and
    /// newest event time. Whether it was taken (not one read before).
    fn take(&mut self, f: Fetched, out: &mut Emitter<'_>) -> bool {
        let m = metrics();
        let Some(part) = self.parts.iter_mut().find(|p| p.id == f.partition) else {
            return false;
        };
        if f.offset < part.next {
            return false; // already read (and committed) before
        }
        part.next = f.offset + 1;
        part.last_data = Instant::now();
        let label = part.id.to_string();
        m.records_in
            .with_label_values(&[&self.component, &label])
            .inc();
        m.bytes_in
            .with_label_values(&[&self.component, &label])
            .inc_by((f.key.len() + f.value.len()) as u64);
        let ts = match &self.event_time {
            None => f.kafka_ms.map(|ms| ms.saturating_mul(1000)),
            Some(field) => field.of(&f.value),
        };
        match ts {
            // Only a time a record may carry moves the partition's newest:
            // one out of range would move the watermark to the end of time.
            Some(ts) if is_valid_event_time(ts) => {
                part.newest = part.newest.max(ts);
                out.emit(f.key, f.value, ts);
            }
            _ => {
                m.errors
                    .with_label_values(&[&self.component, "decode"])
                    .inc();
                let why = match (&self.event_time, f.kafka_ms, ts) {
                    (None, None, _) => "the Kafka record has no timestamp".to_owned(),
                    (None, Some(ms), _) => {
                        format!("its Kafka timestamp {ms} ms is outside years 1 to 9999")
                    }
                    (Some(_), _, None) => {
                        "no event time in the value where `timestamp` says".to_owned()
                    }
                    (Some(_), _, Some(us)) => {
                        format!("its event time {us} us is outside years 1 to 9999")
                    }
                };
                out.emit_bad(
                    f.key,
                    f.value,
                    format!("partition {} offset {}: {why}", part.id, f.offset),
                );
            }
        }
        true
    }

    /// A failed (re)connection: retried after a backoff. The partitions
    /// keep their next offsets (the position) and event times.
    fn fail(&mut self, why: String) {
        self.consumer = None;
        metrics()
            .errors
            .with_label_values(&[&self.component, "connect"])
            .inc();
        tracing::warn!(
            component = %self.component,
            retry_in = ?self.backoff,
            "kafka source: {why}; retrying"
        );
        health::report(&health_name(&self.component), why);
        self.retry_at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }
}

/// `v1 P:OFFSET,P:OFFSET`: an offset for each partition (the next to read,
/// for the source; the end of what the last commit covers, for the sink).
pub(super) fn format_position(next: &BTreeMap<i32, i64>) -> String {
    let parts: Vec<String> = next.iter().map(|(p, o)| format!("{p}:{o}")).collect();
    format!("v1 {}", parts.join(","))
}

pub(super) fn parse_position(p: &[u8]) -> Result<BTreeMap<i32, i64>, String> {
    let text = std::str::from_utf8(p).map_err(|_| "not UTF-8".to_owned())?;
    let rest = text
        .strip_prefix("v1 ")
        .ok_or_else(|| format!("`{text}` is not a Kafka source position"))?;
    let mut next = BTreeMap::new();
    for item in rest.split(',').filter(|s| !s.is_empty()) {
        let (p, o) = item
            .split_once(':')
            .ok_or_else(|| format!("`{item}` is not PARTITION:OFFSET"))?;
        let p: i32 = p
            .parse()
            .map_err(|_| format!("bad partition in `{item}`"))?;
        let o: i64 = o.parse().map_err(|_| format!("bad offset in `{item}`"))?;
        next.insert(p, o);
    }
    Ok(next)
}

fn build(c: &Component) -> Result<KafkaSource, ConfigError> {
    let o: Options = c.options.parse()?;
    let client = ClientOptions {
        brokers: o.brokers,
        client_id: o.client_id,
        properties: o.properties,
    };
    let group_id = o
        .group_id
        .clone()
        .unwrap_or_else(|| format!("millrace-{}", c.name));
    let config = client.config(
        c,
        &[
            ("group.id", &group_id),
            ("statistics.interval.ms", "1000"),
            ("isolation.level", "read_committed"),
            // A fetch the broker holds open while it has nothing new is
            // answered after at most this: the latency a broker that does
            // not answer early (Tansu) adds to every record, and the rate
            // of empty fetches from an idle partition.
            ("fetch.wait.max.ms", "10"),
        ],
        &[
            // millrace's own position decides where to read, not the group's.
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("enable.partition.eof", "false"),
            // librdkafka never moves a partition elsewhere by itself when
            // its offset is out of range: `on_offset_reset` decides.
            ("auto.offset.reset", "error"),
        ],
    )?;
    if o.topic.is_empty() {
        return Err(c.options.error(Some("topic"), "no topic given"));
    }
    let event_time = match o.timestamp.as_deref() {
        None | Some("kafka") => {
            if o.delimiter.is_some() || o.timestamp_unit.is_some() {
                return Err(c.options.error(
                    Some("timestamp"),
                    "`delimiter` and `timestamp_unit` need a `timestamp` extractor",
                ));
            }
            None
        }
        Some(t) => {
            let extractor = KeyExtractor::parse(t, o.delimiter.clone())
                .map_err(|m| c.options.error(Some("timestamp"), m))?;
            Some(EventTimeField::new(
                extractor,
                crate::file_source::micros_per_unit(c, o.timestamp_unit.as_deref())?,
            ))
        }
    };
    let start = parse_start(c, o.start)?;
    let on_reset = OnOffsetReset::parse(c, o.on_offset_reset.as_deref())?;
    Ok(KafkaSource {
        component: c.name.clone(),
        config,
        topic: o.topic,
        only: o.partitions,
        start,
        on_reset,
        stopped: BTreeMap::new(),
        event_time,
        group: o.group_id.is_some(),
        shard: SourceShard {
            index: 0,
            count: 1,
            idle_after: None,
        },
        resume: BTreeMap::new(),
        consumer: None,
        parts: Vec::new(),
        retry_at: Instant::now(),
        backoff: FIRST_BACKOFF,
        committed_to_group: Instant::now(),
    })
}

pub(super) fn register(r: &mut Registry) {
    r.source("kafka", |c| Ok(Box::new(build(c)?)));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The source `k` of a topology with `extra` in its table (no broker
    /// is contacted), reading partition 0 from offset 0.
    fn source(extra: &str) -> KafkaSource {
        reading_partition_0(build(&component(extra)).expect("a valid source"))
    }

    fn reading_partition_0(mut s: KafkaSource) -> KafkaSource {
        s.parts.push(Part {
            id: 0,
            next: 0,
            newest: MIN_TIME,
            last_data: Instant::now(),
        });
        s
    }

    fn fetched(offset: i64, kafka_ms: Option<i64>, value: &str) -> Fetched {
        Fetched {
            partition: 0,
            offset,
            key: b"k".to_vec(),
            value: value.as_bytes().to_vec(),
            kafka_ms,
        }
    }

    #[test]
    fn a_kafka_timestamp_out_of_range_goes_to_errors_and_never_moves_the_watermark() {
        let mut s = source("");
        let mut emitted = Vec::new();
        let mut out = Emitter::new(&mut emitted);
        assert!(s.take(fetched(0, Some(1_700_000_000_000), "a"), &mut out));
        // Microseconds given as milliseconds: past the year 9999.
        assert!(s.take(fetched(1, Some(1_700_000_000_000_000), "b"), &mut out));
        assert!(s.take(fetched(2, Some(1_700_000_000_001), "c"), &mut out));
        assert_eq!(s.watermark(), Some(1_700_000_000_001_000));
        let bad = out.bad().to_vec();
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert_eq!(&bad[0].1[..], b"b");
        assert!(
            bad[0].2.contains("partition 0 offset 1") && bad[0].2.contains("1700000000000000"),
            "{}",
            bad[0].2
        );
        let times: Vec<EventTime> = emitted.iter().map(|(_, _, ts)| *ts).collect();
        assert_eq!(times, [1_700_000_000_000_000, 1_700_000_000_001_000]);
        assert_eq!(s.position(), b"v1 0:3", "the bad record is read past");
    }

    #[test]
    fn an_extracted_event_time_out_of_range_never_moves_the_watermark() {
        let mut s = source("timestamp = \"json:/t\"\ntimestamp_unit = \"s\"");
        let mut emitted = Vec::new();
        let mut out = Emitter::new(&mut emitted);
        assert!(s.take(fetched(0, None, r#"{"t":1000}"#), &mut out));
        assert!(s.take(fetched(1, None, r#"{"t":1e15}"#), &mut out));
        assert!(s.take(fetched(2, None, r#"{"t":-1e15}"#), &mut out));
        assert_eq!(s.watermark(), Some(1_000_000_000));
        assert_eq!(out.bad().len(), 2, "{:?}", out.bad());
        assert_eq!(emitted.len(), 1);
    }

    /// The component `k` of a topology with `extra` in its table.
    fn component(extra: &str) -> Component {
        crate::test_support::component_in(
            &format!(
                "[sources.k]\ntype = \"kafka\"\nbrokers = \"127.0.0.1:9\"\ntopic = \"t\"\n{extra}\n\
                 [sinks.o]\ntype = \"stdout\"\ninputs = [\"k\"]\n"
            ),
            "k",
        )
    }

    #[test]
    fn each_way_to_start_is_read_and_anything_else_refused_by_name() {
        let start = |extra: &str| build(&component(extra)).map(|s| s.start.clone()).ok();
        assert_eq!(start(""), Some(Start::Earliest));
        assert_eq!(start("start = \"earliest\""), Some(Start::Earliest));
        assert_eq!(start("start = \"latest\""), Some(Start::Latest));
        assert_eq!(
            start("start = { timestamp_ms = 0 }"),
            Some(Start::Timestamp(0))
        );
        assert_eq!(
            start("start = { timestamp_ms = 1700000000000 }"),
            Some(Start::Timestamp(1_700_000_000_000))
        );
        assert_eq!(
            start("start = { offsets = { \"0\" = 0, \"3\" = 42 } }"),
            Some(Start::Offsets(BTreeMap::from([(0, 0), (3, 42)])))
        );
        for (bad, says) in [
            ("start = \"newest\"", "`\"newest\"` is not a way to start"),
            ("start = 5", "`5` is not a way to start"),
            (
                "start = { timestamp_ms = -1 }",
                "`timestamp_ms = -1` is not a time in ms",
            ),
            ("start = { timestamp_ms = \"x\" }", "is not a time in ms"),
            (
                "start = { offsets = { \"0\" = -1 } }",
                "`0 = -1` is not PARTITION = OFFSET",
            ),
            (
                "start = { offsets = { \"-1\" = 0 } }",
                "`-1 = 0` is not PARTITION = OFFSET",
            ),
            (
                "start = { offsets = { \"x\" = 0 } }",
                "is not PARTITION = OFFSET",
            ),
            ("start = { offsets = 3 }", "is not a way to start"),
            ("start = { latest = 1 }", "is not a way to start"),
            (
                "start = { timestamp_ms = 1, offsets = {} }",
                "is not a way to start",
            ),
        ] {
            let e = match build(&component(bad)) {
                Err(e) => e.to_string(),
                Ok(s) => panic!("{bad} was taken as {:?}", s.start),
            };
            assert!(e.contains(says) && e.contains("start"), "{bad}: {e}");
        }
    }

    #[test]
    fn options_that_need_another_are_refused_and_a_group_id_turns_on_commits() {
        let err = |extra: &str| match build(&component(extra)) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{extra} was taken"),
        };
        assert!(err("delimiter = \",\"").contains("need a `timestamp` extractor"));
        assert!(err("timestamp = \"kafka\"\ntimestamp_unit = \"s\"")
            .contains("need a `timestamp` extractor"));
        let s = build(&component("")).expect("valid");
        assert!(!s.group);
        assert_eq!(s.config.get("group.id"), Some("millrace-k"));
        assert_eq!(s.config.get("isolation.level"), Some("read_committed"));
        assert_eq!(s.config.get("auto.offset.reset"), Some("error"));
        let s = build(&component("group_id = \"lag\"")).expect("valid");
        assert!(s.group);
        assert_eq!(s.config.get("group.id"), Some("lag"));
    }

    #[test]
    fn a_record_below_the_next_offset_is_not_taken_again_and_bytes_are_counted() {
        let mut c = component("");
        c.name = "bytes_counted".into();
        let mut s = reading_partition_0(build(&c).expect("valid"));
        let mut emitted = Vec::new();
        let mut out = Emitter::new(&mut emitted);
        assert!(s.take(fetched(0, Some(1_000), "abc"), &mut out));
        assert!(
            !s.take(fetched(0, Some(1_000), "abc"), &mut out),
            "read before"
        );
        assert!(
            s.take(fetched(5, Some(1_000), "de"), &mut out),
            "past a gap"
        );
        assert!(
            !s.take(fetched(3, Some(1_000), "x"), &mut out),
            "below the next offset"
        );
        assert_eq!(s.position(), b"v1 0:6");
        assert_eq!(emitted.len(), 2);
        // Key ("k") and value bytes of the two records taken.
        let m = metrics();
        assert_eq!(
            m.bytes_in.with_label_values(&["bytes_counted", "0"]).get(),
            4 + 3
        );
        assert_eq!(
            m.records_in
                .with_label_values(&["bytes_counted", "0"])
                .get(),
            2
        );
    }

    #[test]
    fn positions_round_trip_and_bad_ones_are_refused() {
        let next = BTreeMap::from([(0, 17), (3, 0), (12, 9_000_000_000)]);
        let text = format_position(&next);
        assert_eq!(text, "v1 0:17,3:0,12:9000000000");
        assert_eq!(parse_position(text.as_bytes()), Ok(next));
        assert_eq!(parse_position(b"v1 "), Ok(BTreeMap::new()));
        for bad in [&b"0:17"[..], b"v1 0-17", b"v1 x:1", b"v1 0:y", b"\xff"] {
            assert!(parse_position(bad).is_err(), "{bad:?}");
        }
    }
}

#[cfg(test)]
#[path = "source_tests.rs"]
mod broker_tests;
