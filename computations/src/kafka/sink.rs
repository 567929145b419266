//! The `kafka` sink (see the module documentation of `kafka`).

// A sink's position is the end offset of what its last commit covers in
// each partition, in the source's format.
use super::awaited::Awaited;
use super::metrics::metrics;
use super::produced::Produced;
use super::source::{format_position, parse_position};
use super::transactions::{Committed, Transactions};
use super::{Brokers, ClientOptions, PropertyValue, ID_HEADER};
use crate::sinks::OutputFormat;
use millrace_config::{Component, ConfigError, HumanDuration};
use millrace_engine::{health, DeliveryId, Durable, Record, Registry, Sink, SinkError, SinkStart};
use parking_lot::Mutex;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    brokers: Brokers,
    client_id: Option<String>,
    #[serde(default)]
    properties: BTreeMap<String, PropertyValue>,
    topic: String,
    /// `raw` (the record's value, the default) or `jsonl` (`{"key","value","ts"}`).
    #[serde(default = "raw")]
    format: Format,
    /// How long a record may wait for the broker's acknowledgement (and
    /// the read-back at a restart for the broker) before the worker stops
    /// (and is restarted).
    timeout: Option<HumanDuration>,
    /// Turns on transactions under this `transactional.id`, which must stay
    /// the same across restarts and moves and belong to no other writer.
    transactional_id: Option<String>,
    /// How long a transaction stays open for more records before it is
    /// committed (off the executor's thread). Default 25ms.
    transaction_interval: Option<HumanDuration>,
}

fn raw() -> Format {
    Format::Raw
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Format {
    Raw,
    Jsonl,
}

/// Delivery reports, taken in by whichever thread serves the producer's
/// events (the executor's, or the transactions' committer in a flush).
pub(super) struct SinkContext {
    component: String,
    produced: Mutex<Produced>,
}

impl ClientContext for SinkContext {
    fn error(&self, error: KafkaError, reason: &str) {
        metrics()
            .errors
            .with_label_values(&[&self.component, "connect"])
            .inc();
        tracing::warn!(component = %self.component, %error, reason, "kafka sink: client error (librdkafka retries)");
        health::report(&health_name(&self.component), format!("{error}: {reason}"));
    }
}

impl ProducerContext for SinkContext {
    /// The number of the write that sent the message.
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, write: usize) {
        let m = metrics();
        match result {
            Ok(msg) => {
                let p = msg.partition();
                self.produced
                    .lock()
                    .acknowledged(write as u64, p, msg.offset());
                let label = p.to_string();
                m.records_out
                    .with_label_values(&[&self.component, &label])
                    .inc();
                let bytes = msg.key().map_or(0, <[u8]>::len) + msg.payload().map_or(0, <[u8]>::len);
                m.bytes_out
                    .with_label_values(&[&self.component, &label])
                    .inc_by(bytes as u64);
            }
            Err((e, _)) => {
                m.errors
                    .with_label_values(&[&self.component, "produce"])
                    .inc();
                self.produced.lock().failed(e.to_string());
            }
        }
    }
}

/// The sink as errors and `/healthz` name it.
fn health_name(component: &str) -> String {
    format!("kafka sink `{component}`")
}

fn error(what: impl Into<String>, e: impl std::fmt::Display) -> SinkError {
    SinkError {
        what: what.into(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// The Kafka sink (its one shard).
pub struct KafkaSink {
    component: String,
    topic: String,
    producer_config: ClientConfig,
    reader_config: ClientConfig,
    format: Format,
    timeout: Duration,
    /// With `transactional_id`: how long a transaction stays open.
    transaction_interval: Option<Duration>,
    /// The shard's epoch and what it applied of each input.
    start: SinkStart,
    producer: Option<Arc<BaseProducer<SinkContext>>>,
    /// The open transaction and the commit under way (transactional only).
    transactions: Option<Transactions>,
    /// The committed position read at the start: where the read-back starts.
    committed: BTreeMap<i32, i64>,
    /// End offsets of what is durable, by partition.
    ends: BTreeMap<i32, i64>,
    /// Records the read-back found whose deliveries are still to come.
    awaited: Awaited,
    /// Writes since `open` (each write call counts one).
    writes: u64,
    /// How many of them were durable at the last `durable()`.
    durable: u64,
    /// Records written while a transaction commits, sent after it.
    held: Vec<Held>,
    value: Vec<u8>,
    id: String,
}

/// A record written while the transaction before its own was committing.
struct Held {
    write: u64,
    key: bytes::Bytes,
    value: Vec<u8>,
    timestamp: i64,
    id: Option<String>,
}

impl KafkaSink {
    /// Reads the topic from the committed position (from the start of the
    /// partitions it does not cover) to its end, and keeps the ids there
    /// that will be delivered again.
    fn read_back(&mut self) -> Result<(), String> {
        let reader: BaseConsumer = self
            .reader_config
            .create()
            .map_err(|e| format!("creating the read-back consumer: {e}"))?;
        let md = reader
            .fetch_metadata(Some(&self.topic), self.timeout)
            .map_err(|e| format!("reading metadata of topic `{}`: {e}", self.topic))?;
        let Some(topic) = md.topics().iter().find(|t| t.name() == self.topic) else {
            return Err(format!(
                "topic `{}` not in the broker's metadata",
                self.topic
            ));
        };
        if let Some(e) = topic.error() {
            return Err(format!("topic `{}`: {e:?}", self.topic));
        }
        // Each partition is read to its end as the fetches report it (an
        // end-of-partition event), not to an end listed beforehand.
        let mut tpl = TopicPartitionList::new();
        let mut pending = std::collections::BTreeSet::new();
        for p in topic.partitions().iter().map(|p| p.id()) {
            let from = match self.committed.get(&p) {
                Some(&o) => Offset::Offset(o),
                None => Offset::Beginning,
            };
            tpl.add_partition_offset(&self.topic, p, from)
                .map_err(|e| e.to_string())?;
            pending.insert(p);
        }
        reader
            .assign(&tpl)
            .map_err(|e| format!("assigning the read-back: {e}"))?;
        let deadline = Instant::now() + self.timeout;
        let (mut read, mut applied) = (0u64, 0u64);
        while !pending.is_empty() {
            if Instant::now() > deadline {
                return Err(format!(
                    "reading back what the topic holds past the committed position took over {:?} \
                     ({read} records read, partitions {pending:?} unfinished)",
                    self.timeout,
                ));
            }
            match reader.poll(Duration::from_millis(100)) {
                None => {}
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    pending.remove(&p);
                }
                Some(Err(e)) => return Err(format!("reading back: {e}")),
                Some(Ok(msg)) => {
                    read += 1;
                    let Some(id) = msg
                        .headers()
                        .and_then(|h| h.iter().find(|h| h.key == ID_HEADER))
                        .and_then(|h| h.value)
                    else {
                        continue;
                    };
                    // An id the shard applied before is committed (the read
                    // can start before it: a commit's position waits for the
                    // records still awaited), and an id of none of its inputs
                    // is another writer's: neither is delivered again.
                    let redelivered = std::str::from_utf8(id)
                        .ok()
                        .and_then(DeliveryId::parse)
                        .is_some_and(|id| self.start.redelivers(&id));
                    if redelivered {
                        self.awaited.insert(id, msg.partition(), msg.offset());
                    } else {
                        applied += 1;
                    }
                }
            }
        }
        tracing::info!(
            component = %self.component,
            read,
            awaited = self.awaited.len(),
            applied,
            from = %format_position(&self.committed),
            "kafka sink: read back what the topic holds past the committed position"
        );
        Ok(())
    }

    /// Runs a set-up step until it succeeds, with backoff, for at most the
    /// sink's timeout; reports and counts each failure.
    fn retrying(
        &mut self,
        what: &str,
        mut step: impl FnMut(&mut Self) -> Result<(), String>,
    ) -> Result<(), SinkError> {
        let mut backoff = Duration::from_millis(500);
        let deadline = Instant::now() + self.timeout;
        loop {
            match step(self) {
                Ok(()) => break,
                Err(why) if Instant::now() + backoff < deadline => {
                    metrics()
                        .retries
                        .with_label_values(&[&self.component])
                        .inc();
                    health::report(&health_name(&self.component), why.clone());
                    tracing::warn!(component = %self.component, retry_in = ?backoff, "kafka sink: {why}; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
                Err(why) => {
                    health::report(&health_name(&self.component), why.clone());
                    return Err(error(what, why));
                }
            }
        }
        health::clear(&health_name(&self.component));
        Ok(())
    }

    fn producer(&self) -> Result<&BaseProducer<SinkContext>, SinkError> {
        self.producer
            .as_deref()
            .ok_or_else(|| error(health_name(&self.component), "not open"))
    }

    /// Takes in the acknowledgements that came (and a transaction's commit
    /// that ended), starts the commit of a transaction open long enough,
    /// and says how many writes are durable.
    fn settle(&mut self) -> Result<u64, SinkError> {
        let producer = Arc::clone(
            self.producer
                .as_ref()
                .ok_or_else(|| error(health_name(&self.component), "not open"))?,
        );
        producer.poll(Duration::ZERO);
        let mut cap = u64::MAX;
        if let Some(t) = &mut self.transactions {
            // Writes before the first one held (a skip made during a commit
            // after a held record is not held, but follows it).
            let unheld = self.held.first().map_or(self.writes, |h| h.write - 1);
            match t.poll(unheld) {
                Ok(Some(Committed)) => {
                    metrics()
                        .transactions
                        .with_label_values(&[&self.component])
                        .inc();
                    // The next transaction is open: what waited goes into it.
                    for h in std::mem::take(&mut self.held) {
                        send(
                            &producer,
                            &self.topic,
                            &self.component,
                            h.write,
                            &h.key,
                            &h.value,
                            h.timestamp,
                            h.id.as_deref(),
                        )?;
                        t.sent();
                    }
                }
                Ok(None) => {}
                Err(why) => {
                    metrics()
                        .errors
                        .with_label_values(&[&self.component, "transaction"])
                        .inc();
                    let what = health_name(&self.component);
                    health::report(&what, why.clone());
                    return Err(error(what, why));
                }
            }
            cap = t.committed();
        }
        let ctx = producer.context();
        let durable = ctx
            .produced
            .lock()
            .settle(self.writes, cap, &mut self.ends)
            .map_err(|why| {
                let what = health_name(&self.component);
                health::report(&what, why.clone());
                error(what, format!("a record was not acknowledged: {why}"))
            })?;
        Ok(durable)
    }
}

impl Sink for KafkaSink {
    fn starting(&mut self, start: &SinkStart) {
        self.start = start.clone();
    }

    fn open(&mut self, position: Option<&[u8]>) -> Result<(), SinkError> {
        let what = health_name(&self.component);
        self.committed = match position {
            Some(p) => parse_position(p).map_err(|e| error(&what, e))?,
            None => BTreeMap::new(),
        };
        self.ends = self.committed.clone();
        self.awaited = Awaited::default();
        self.writes = 0;
        self.durable = 0;
        self.held.clear();
        self.transactions = None;
        let producer: BaseProducer<SinkContext> = self
            .producer_config
            .create_with_context(SinkContext {
                component: self.component.clone(),
                produced: Mutex::new(Produced::default()),
            })
            .map_err(|e| error(&what, format!("creating the producer: {e}")))?;
        self.producer = Some(Arc::new(producer));
        if self.transaction_interval.is_some() {
            // Bumps the producer epoch of the transactional id: the broker
            // aborts what a killed process left open and refuses its requests
            // still in flight, so none can land after the read-back.
            self.retrying(&what, |sink| {
                sink.producer()
                    .map_err(|e| e.to_string())?
                    .init_transactions(sink.timeout)
                    .map_err(|e| format!("initialising transactions: {e}"))
            })?;
        }
        // Nothing can have been written before the first commit of a first
        // start; after any other start, what the topic holds past the
        // committed position may be re-delivered, so it is read back.
        if position.is_some() || self.start.epoch > 1 {
            self.retrying(&what, Self::read_back)?;
        }
        if let Some(interval) = self.transaction_interval {
            let producer = Arc::clone(
                self.producer
                    .as_ref()
                    .ok_or_else(|| error(&what, "not open"))?,
            );
            self.transactions = Some(
                Transactions::start(producer, &self.component, interval, self.timeout)
                    .map_err(|e| error(&what, e))?,
            );
        }
        Ok(())
    }

    fn write(&mut self, record: &Record) -> Result<(), SinkError> {
        self.writes += 1;
        self.produce(record, false)
    }

    fn write_delivered(&mut self, record: &Record, id: &DeliveryId<'_>) -> Result<(), SinkError> {
        use std::fmt::Write as _;
        self.writes += 1;
        self.id.clear();
        let _ = write!(self.id, "{id}");
        if !self.awaited.is_empty() && self.awaited.take(self.id.as_bytes(), self.writes) {
            metrics()
                .duplicates_skipped
                .with_label_values(&[&self.component])
                .inc();
            return Ok(());
        }
        self.produce(record, true)
    }

    fn defers(&self) -> bool {
        true
    }

    fn durable(&mut self) -> Result<Durable, SinkError> {
        let writes = self.settle()?;
        if writes > self.durable {
            // The broker acknowledges again: whatever was reported is over.
            self.durable = writes;
            health::clear(&health_name(&self.component));
        }
        self.awaited.release(writes);
        Ok(Durable {
            writes,
            position: format_position(&self.awaited.position(&self.ends)).into_bytes(),
        })
    }

    /// Waits (up to the sink's timeout) until every write so far is
    /// durable. The engine does not call it (the sink defers); it is here
    /// for whoever drives the sink directly.
    fn flush(&mut self, _sync: bool) -> Result<Vec<u8>, SinkError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let now = self.durable()?;
            if now.writes == self.writes {
                return Ok(now.position);
            }
            if Instant::now() > deadline {
                return Err(error(
                    health_name(&self.component),
                    format!(
                        "waiting for the broker's acknowledgements took over {:?}",
                        self.timeout
                    ),
                ));
            }
            self.producer()?.poll(Duration::from_millis(5));
        }
    }
}

impl KafkaSink {
    /// Writes `record` (with the id in `self.id` if `with_id`) as write
    /// number `self.writes`: sends it, or holds it while a transaction
    /// commits.
    fn produce(&mut self, record: &Record, with_id: bool) -> Result<(), SinkError> {
        self.value.clear();
        let value: &[u8] = match self.format {
            Format::Raw => &record.value,
            Format::Jsonl => {
                OutputFormat::Jsonl.write_line(record, &mut self.value);
                self.value.pop(); // the line's newline
                &self.value
            }
        };
        let id = with_id.then_some(self.id.as_str());
        if self
            .transactions
            .as_ref()
            .is_some_and(Transactions::committing)
        {
            self.held.push(Held {
                write: self.writes,
                key: record.key.clone(),
                value: value.to_vec(),
                timestamp: record.timestamp,
                id: id.map(str::to_owned),
            });
            return Ok(());
        }
        let producer = self.producer()?;
        send(
            producer,
            &self.topic,
            &self.component,
            self.writes,
            &record.key,
            value,
            record.timestamp,
            id,
        )?;
        if let Some(t) = &mut self.transactions {
            t.sent();
        }
        Ok(())
    }
}

/// Sends one record as write number `write`, serving delivery reports
/// while librdkafka's queue is full.
#[allow(clippy::too_many_arguments)]
fn send(
    producer: &BaseProducer<SinkContext>,
    topic: &str,
    component: &str,
    write: u64,
    key: &[u8],
    value: &[u8],
    timestamp: i64,
    id: Option<&str>,
) -> Result<(), SinkError> {
    let mut rec = BaseRecord::with_opaque_to(topic, write as usize)
        .key(key)
        .payload(value);
    if timestamp >= 0 {
        rec = rec.timestamp(timestamp / 1000);
    }
    if let Some(id) = id {
        rec = rec.headers(OwnedHeaders::new_with_capacity(1).insert(Header {
            key: ID_HEADER,
            value: Some(id.as_bytes()),
        }));
    }
    let produced = &producer.context().produced;
    loop {
        produced.lock().sending(write);
        match producer.send(rec) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                produced.lock().not_sent();
                // The local queue is full: serve delivery reports, retry.
                producer.poll(Duration::from_millis(50));
                rec = back;
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), _)) => {
                produced.lock().not_sent();
                // It can never be written: say so and go on, rather than
                // stop the worker at this record at every restart.
                metrics()
                    .errors
                    .with_label_values(&[component, "too_large"])
                    .inc();
                tracing::error!(
                    component = %component,
                    key = %String::from_utf8_lossy(key),
                    bytes = value.len(),
                    "kafka sink: record larger than the producer's message.max.bytes; not written"
                );
                return Ok(());
            }
            Err((e, _)) => {
                produced.lock().not_sent();
                metrics()
                    .errors
                    .with_label_values(&[component, "produce"])
                    .inc();
                return Err(error(health_name(component), format!("producing: {e}")));
            }
        }
    }
}

fn build(c: &Component) -> Result<KafkaSink, ConfigError> {
    let o: Options = c.options.parse()?;
    if o.topic.is_empty() {
        return Err(c.options.error(Some("topic"), "no topic given"));
    }
    let client = ClientOptions {
        brokers: o.brokers,
        client_id: o.client_id,
        properties: o.properties,
    };
    if client.properties.contains_key("transactional.id") {
        return Err(c.options.error(
            Some("properties"),
            "set `transactional_id` on the sink instead of `transactional.id`: \
             the sink then opens and commits the transactions",
        ));
    }
    let transactional_id = match o.transactional_id {
        Some(id) if id.trim().is_empty() => {
            return Err(c
                .options
                .error(Some("transactional_id"), "an empty transactional id"))
        }
        id => id,
    };
    let timeout = o.timeout.map_or(Duration::from_secs(30), |d| d.0);
    let transaction_interval = match (&transactional_id, o.transaction_interval) {
        (None, Some(_)) => {
            return Err(c.options.error(
                Some("transaction_interval"),
                "set only with `transactional_id`",
            ))
        }
        (Some(_), Some(d)) if d.0.is_zero() => {
            return Err(c
                .options
                .error(Some("transaction_interval"), "must be longer than 0"))
        }
        (Some(_), d) => Some(d.map_or(Duration::from_millis(25), |d| d.0)),
        (None, None) => None,
    };
    // The broker aborts a transaction open longer than its timeout: one
    // open for the whole interval must leave room for its commit.
    if let Some(interval) = transaction_interval {
        let timeout_ms = client
            .properties
            .get("transaction.timeout.ms")
            .and_then(|v| v.text().parse::<u64>().ok())
            .unwrap_or(60_000);
        if interval.as_millis() > u128::from(timeout_ms / 2) {
            return Err(c.options.error(
                Some("transaction_interval"),
                format!(
                    "{} ms is more than half of the transaction timeout \
                     (properties.\"transaction.timeout.ms\" = {timeout_ms} ms): the broker \
                     would abort transactions before they are committed; shorten the \
                     interval or raise the timeout",
                    interval.as_millis()
                ),
            ));
        }
    }
    // A record not acknowledged within the sink's timeout fails its
    // delivery, and the worker stops and restarts from its last commit.
    let message_timeout = timeout.as_millis().max(1).to_string();
    let mut producer_config = client.config(
        c,
        // Java's partitioner, so that keys land where other clients put them.
        &[
            ("partitioner", "murmur2_random"),
            ("linger.ms", "1"),
            ("message.timeout.ms", &message_timeout),
        ],
        &[("enable.idempotence", "true"), ("acks", "all")],
    )?;
    if let Some(id) = &transactional_id {
        producer_config.set("transactional.id", id);
    }
    let mut reader = client.clone();
    reader.properties.clear();
    for (k, v) in &client.properties {
        // Connection and security settings apply to the reader too.
        if k.starts_with("security.") || k.starts_with("ssl.") || k.starts_with("sasl.") {
            reader.properties.insert(k.clone(), v.clone());
        }
    }
    let reader_config = reader.config(
        c,
        &[("group.id", &format!("millrace-{}-read-back", c.name))],
        &[
            ("enable.auto.commit", "false"),
            ("enable.partition.eof", "true"),
            // Without transactions: everything written. With them: what
            // committed transactions hold, since an aborted one's records
            // are not in the output and must be written again.
            (
                "isolation.level",
                if transactional_id.is_some() {
                    "read_committed"
                } else {
                    "read_uncommitted"
                },
            ),
        ],
    )?;
    Ok(KafkaSink {
        component: c.name.clone(),
        topic: o.topic,
        producer_config,
        reader_config,
        format: o.format,
        timeout,
        transaction_interval,
        start: SinkStart::new(1),
        producer: None,
        transactions: None,
        committed: BTreeMap::new(),
        ends: BTreeMap::new(),
        awaited: Awaited::default(),
        writes: 0,
        durable: 0,
        held: Vec::new(),
        value: Vec::new(),
        id: String::new(),
    })
}

pub(super) fn register(r: &mut Registry) {
    r.sink("kafka", |c| Ok(Box::new(build(c)?)));
}

#[cfg(test)]
#[path = "sink_tests.rs"]
pub(super) mod tests;
