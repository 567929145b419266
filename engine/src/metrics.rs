//! Prometheus metrics of one worker: one registry, names `millrace_*`,
//! labelled by component (never by key or shard).

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// Every metric the engine exports.
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// Records taken in by a component (processed, written or read from outside).
    pub records_in: IntCounterVec,
    /// Records a component produced (before fan-out to consumers).
    pub records_out: IntCounterVec,
    /// Re-delivered records a component recognised and dropped.
    pub duplicates: IntCounterVec,
    /// Records a component could not handle (routed to its `errors` output).
    pub bad_records: IntCounterVec,
    /// Records past the next expected sequence number, dropped unacknowledged.
    pub gaps: IntCounterVec,
    /// Productions sent again after a restart or reconnect.
    pub retries: IntCounterVec,
    /// Records behind the low watermark when they arrived.
    pub late_records: IntCounterVec,
    /// Records a computation dropped by design (a sliding window's gaps).
    pub discarded_records: IntCounterVec,
    /// Wall time of one commit.
    pub commit_seconds: Histogram,
    /// Records processed per commit.
    pub commit_records: Histogram,
    /// Source ingestion to sink delivery.
    pub e2e_latency: HistogramVec,
    /// Output low watermark per component, seconds since the epoch.
    pub low_watermark: IntGaugeVec,
    /// Newest event time seen minus the low watermark, per component.
    pub watermark_lag: IntGaugeVec,
    /// Unacknowledged productions per component.
    pub outbox_backlog: IntGaugeVec,
    /// Timers set and not fired, per component.
    pub timers_pending: IntGaugeVec,
    /// RocksDB size.
    pub rocksdb_bytes: IntGauge,
    /// Fatal errors that stopped the worker.
    pub fatal_errors: IntCounter,
    /// Cluster connections: frames that failed to decode or broke the protocol.
    pub net_bad_frames: IntCounterVec,
    /// Cluster connections: deliveries, acknowledgements and watermarks
    /// for a shard the sender or this worker does not run now, dropped.
    pub net_stale_frames: IntCounterVec,
    /// Shards moved to (`in`) or away from (`out`) this worker.
    pub shard_moves: IntCounterVec,
    /// How long a shard moved to this worker ran nowhere.
    pub shard_move_pause_seconds: Histogram,
    /// Shards this worker runs now.
    pub shards_owned: IntGauge,
    /// Writes to the ownership store refused because this worker's view
    /// of who owns or controls what was stale.
    pub ownership_fenced: IntCounter,
    /// Commit log (`[state] log`): entries appended, and their bytes.
    pub log_appends: IntCounter,
    pub log_bytes: IntCounter,
    /// Commit log: how long a turn waited for its appends to be durable.
    pub log_append_seconds: Histogram,
    /// Commit log: appends refused because another incarnation of the
    /// shard extended its log (this worker's copy is stale).
    pub log_fenced: IntCounter,
    /// Shards of dead workers freed by this worker as the controller, to be
    /// taken over from the commit log.
    pub shard_takeovers: IntCounter,
    /// Commit log: snapshots recorded and the log cut below them.
    pub log_snapshots: IntCounter,
    /// Commit log: shards loaded from a snapshot at their start.
    pub log_snapshot_loads: IntCounter,
    /// Commit log: snapshots that failed to be written.
    pub log_snapshot_failures: IntCounter,
    /// Commit log: how long writing a snapshot took.
    pub log_snapshot_seconds: Histogram,
    /// Commit log: entries applied to the store at a shard's start.
    pub log_replayed: IntCounter,
    /// Handshakes refused, by reason (`secret`, `epoch`, `topology`, `worker`, `by-peer`).
    pub net_refused: IntCounterVec,
    /// Connections established, by peer worker.
    pub net_connects: IntCounterVec,
    /// Connections lost, by peer worker.
    pub net_disconnects: IntCounterVec,
    /// Records sent to another worker.
    pub net_records_sent: IntCounterVec,
    /// Bytes written to another worker.
    pub net_bytes_sent: IntCounterVec,
    /// Records received from another worker.
    pub net_records_received: IntCounterVec,
    /// HTTP requests refused, by reason (`busy`, `timeout`, `token`).
    pub http_refused: IntCounterVec,
    /// 1 while the connection to a peer is up.
    pub net_peer_up: IntGaugeVec,
    /// The savepoint this worker started from: seconds to load it, its
    /// bytes and shards loaded here (0 when it started without one).
    pub savepoint_load: IntGaugeVec,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
    // Names are static and unique: registering can only fail on a programming error.
    r.register(Box::new(m.clone()))
        .expect("metric registered once");
    m
}

impl Metrics {
    /// Notes the savepoint this worker started from.
    pub fn savepoint_loaded(&self, seconds: f64, bytes: u64, shards: usize) {
        let set = |what: &str, v: i64| self.savepoint_load.with_label_values(&[what]).set(v);
        set("milliseconds", (seconds * 1e3).round() as i64);
        set("bytes", i64::try_from(bytes).unwrap_or(i64::MAX));
        set("shards", shards as i64);
    }

    /// Creates and registers every metric.
    pub fn new() -> Self {
        let r = Registry::new();
        let counter = |name: &str, help: &str| {
            reg(
                &r,
                IntCounterVec::new(Opts::new(name, help), &["component"]).expect("valid metric"),
            )
        };
        let gauge = |name: &str, help: &str| {
            reg(
                &r,
                IntGaugeVec::new(Opts::new(name, help), &["component"]).expect("valid metric"),
            )
        };
        let peer_counter = |name: &str, help: &str, label: &str| {
            reg(
                &r,
                IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric"),
            )
        };
        // 50 us to ~13 s in steps of a factor sqrt(2): fine enough to read a p99.
        let latency_buckets =
            prometheus::exponential_buckets(0.000_05, std::f64::consts::SQRT_2, 36)
                .expect("buckets");
        let m = Metrics {
            registry: r.clone(),
            records_in: counter(
                "millrace_records_in_total",
                "Records taken in by a component.",
            ),
            records_out: counter(
                "millrace_records_out_total",
                "Records produced by a component.",
            ),
            duplicates: counter(
                "millrace_duplicates_dropped_total",
                "Re-delivered records recognised by sequence number and dropped.",
            ),
            bad_records: counter(
                "millrace_bad_records_total",
                "Records a component could not handle, routed to its errors output.",
            ),
            gaps: counter(
                "millrace_sequence_gaps_total",
                "Records past the next expected sequence number, dropped unacknowledged.",
            ),
            retries: counter(
                "millrace_retries_total",
                "Productions sent again after a restart or reconnect.",
            ),
            late_records: counter(
                "millrace_late_records_total",
                "Records behind the input low watermark on arrival.",
            ),
            discarded_records: counter(
                "millrace_discarded_records_total",
                "Records a computation dropped by design, such as those in the gaps of a sliding window.",
            ),
            commit_seconds: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "millrace_commit_duration_seconds",
                        "Duration of one commit.",
                    )
                    .buckets(latency_buckets.clone()),
                )
                .expect("valid metric"),
            ),
            commit_records: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "millrace_commit_batch_records",
                        "Records processed per commit.",
                    )
                    .buckets(prometheus::exponential_buckets(1.0, 4.0, 9).expect("buckets")),
                )
                .expect("valid metric"),
            ),
            e2e_latency: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "millrace_end_to_end_latency_seconds",
                        "From source ingestion to sink delivery.",
                    )
                    .buckets(latency_buckets.clone()),
                    &["component"],
                )
                .expect("valid metric"),
            ),
            low_watermark: gauge(
                "millrace_low_watermark_seconds",
                "Output low watermark, seconds since the Unix epoch.",
            ),
            watermark_lag: gauge(
                "millrace_watermark_lag_seconds",
                "Newest event time seen minus the output low watermark.",
            ),
            outbox_backlog: gauge(
                "millrace_outbox_backlog_records",
                "Productions not yet acknowledged by their consumers.",
            ),
            timers_pending: gauge("millrace_timers_pending", "Timers set and not yet fired."),
            rocksdb_bytes: reg(
                &r,
                IntGauge::new(
                    "millrace_rocksdb_size_bytes",
                    "RocksDB SST files and memtables.",
                )
                .expect("valid metric"),
            ),
            fatal_errors: reg(
                &r,
                IntCounter::new(
                    "millrace_fatal_errors_total",
                    "Errors that stopped the worker.",
                )
                .expect("valid metric"),
            ),
            net_bad_frames: peer_counter(
                "millrace_net_bad_frames_total",
                "Frames from another worker with a bad length, checksum or content; each closes its connection.",
                "peer",
            ),
            net_stale_frames: peer_counter(
                "millrace_net_stale_frames_total",
                "Deliveries, acknowledgements and watermarks from another worker for a shard that \
                 it or this worker does not run now (a shard move raced them, or a stale owner \
                 sent them): dropped, the connection stays; the sender sends again to the new owner.",
                "peer",
            ),
            shard_moves: peer_counter(
                "millrace_shard_moves_total",
                "Shards moved to this worker (direction=in) or away from it (direction=out).",
                "direction",
            ),
            shard_move_pause_seconds: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "millrace_shard_move_pause_seconds",
                        "How long a shard moved to this worker ran nowhere: from its stop at the \
                         old owner to its start here.",
                    )
                    .buckets(latency_buckets.clone()),
                )
                .expect("valid metric"),
            ),
            ownership_fenced: reg(
                &r,
                IntCounter::new(
                    "millrace_ownership_fenced_total",
                    "Writes to etcd refused because this worker's view of who owns a shard or \
                     controls the assignment was stale (a claim, a release, an assignment).",
                )
                .expect("valid metric"),
            ),
            log_appends: reg(
                &r,
                IntCounter::new(
                    "millrace_log_appends_total",
                    "Entries appended to the commit log ([state] log): one per shard and commit.",
                )
                .expect("valid metric"),
            ),
            log_bytes: reg(
                &r,
                IntCounter::new(
                    "millrace_log_bytes_total",
                    "Bytes of the entries appended to the commit log.",
                )
                .expect("valid metric"),
            ),
            log_append_seconds: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "millrace_log_append_seconds",
                        "How long a commit waited for its commit log appends to be durable.",
                    )
                    .buckets(latency_buckets.clone()),
                )
                .expect("valid metric"),
            ),
            log_fenced: reg(
                &r,
                IntCounter::new(
                    "millrace_log_fenced_total",
                    "Commit log appends refused because another incarnation of the shard had                      extended its log: this worker's copy was stale and it stopped running it.",
                )
                .expect("valid metric"),
            ),
            log_snapshots: reg(
                &r,
                IntCounter::new(
                    "millrace_log_snapshots_total",
                    "Shard snapshots written to [state] snapshots and recorded in the commit log, \
                     which is then cut below them.",
                )
                .expect("valid metric"),
            ),
            log_snapshot_loads: reg(
                &r,
                IntCounter::new(
                    "millrace_log_snapshot_loads_total",
                    "Shards loaded from their last snapshot when they started (their store was \
                     behind it: lost, or taken over), before the rest of the commit log.",
                )
                .expect("valid metric"),
            ),
            log_snapshot_failures: reg(
                &r,
                IntCounter::new(
                    "millrace_log_snapshot_failures_total",
                    "Shard snapshots that could not be written (retried; the log keeps growing \
                     until one succeeds).",
                )
                .expect("valid metric"),
            ),
            log_snapshot_seconds: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "millrace_log_snapshot_seconds",
                        "How long exporting and writing one shard snapshot took (the executor \
                         waits for it).",
                    )
                    .buckets(latency_buckets.clone()),
                )
                .expect("valid metric"),
            ),
            shard_takeovers: reg(
                &r,
                IntCounter::new(
                    "millrace_shard_takeovers_total",
                    "Shards of a dead worker (its etcd lease expired) that this worker, as the \
                     controller, gave to live workers to rebuild from the commit log.",
                )
                .expect("valid metric"),
            ),
            log_replayed: reg(
                &r,
                IntCounter::new(
                    "millrace_log_replayed_entries_total",
                    "Commit log entries applied to the store when a shard started.",
                )
                .expect("valid metric"),
            ),
            shards_owned: reg(
                &r,
                IntGauge::new("millrace_shards_owned", "Shards this worker runs now.")
                    .expect("valid metric"),
            ),
            net_refused: peer_counter(
                "millrace_net_refused_total",
                "Cluster handshakes refused, by reason.",
                "reason",
            ),
            http_refused: peer_counter(
                "millrace_http_refused_total",
                "HTTP requests refused, by reason: busy (too many connections), timeout (slow request head), token, host (a foreign Host), cross-site, plain-request (a control request without X-Millrace), savepoint-target.",
                "reason",
            ),
            net_connects: peer_counter(
                "millrace_net_connects_total",
                "Connections to another worker established.",
                "peer",
            ),
            net_disconnects: peer_counter(
                "millrace_net_disconnects_total",
                "Connections to another worker lost.",
                "peer",
            ),
            net_records_sent: peer_counter(
                "millrace_net_records_sent_total",
                "Records sent to another worker (re-sends included).",
                "peer",
            ),
            net_bytes_sent: peer_counter(
                "millrace_net_bytes_sent_total",
                "Bytes written to another worker.",
                "peer",
            ),
            net_records_received: peer_counter(
                "millrace_net_records_received_total",
                "Records received from another worker (duplicates included).",
                "peer",
            ),
            net_peer_up: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "millrace_net_peer_up",
                        "1 while the connection to a peer worker is up.",
                    ),
                    &["peer"],
                )
                .expect("valid metric"),
            ),
            savepoint_load: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "millrace_savepoint_loaded",
                        "The savepoint this worker started from: `what` is milliseconds (load time), bytes, or shards.",
                    ),
                    &["what"],
                )
                .expect("valid metric"),
            ),
        };
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            let _ = m.registry.register(Box::new(pc));
        }
        m
    }

    /// The registry rendered in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let enc = prometheus::TextEncoder::new();
        // The worker's own metrics, then those connectors register in the
        // process-wide default registry (Kafka's, by partition).
        let mut families = self.registry.gather();
        families.extend(
            prometheus::default_registry()
                .gather()
                .into_iter()
                .filter(|f| f.get_name().starts_with("millrace_")),
        );
        let _ = prometheus::Encoder::encode(&enc, &families, &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// One component's metric handles, resolved once (not per record).
#[derive(Clone)]
pub(crate) struct NodeMetrics {
    pub records_in: IntCounter,
    pub records_out: IntCounter,
    pub duplicates: IntCounter,
    pub bad_records: IntCounter,
    pub gaps: IntCounter,
    pub retries: IntCounter,
    pub late_records: IntCounter,
    pub discarded_records: IntCounter,
    pub e2e_latency: Histogram,
    pub low_watermark: prometheus::IntGauge,
    pub watermark_lag: prometheus::IntGauge,
    pub outbox_backlog: prometheus::IntGauge,
    pub timers_pending: prometheus::IntGauge,
}

impl NodeMetrics {
    /// Counts and logs a bad record, naming the errors output it goes to.
    pub fn bad_record(&self, component: &str, key: &[u8], why: &str) {
        self.bad_records.inc();
        tracing::warn!(
            component,
            key = %String::from_utf8_lossy(key),
            error = why,
            output = %format_args!("{component}.errors"),
            "bad record routed to the errors output of the component that had it"
        );
    }

    pub fn new(m: &Metrics, component: &str) -> Self {
        let l = &[component];
        NodeMetrics {
            records_in: m.records_in.with_label_values(l),
            records_out: m.records_out.with_label_values(l),
            duplicates: m.duplicates.with_label_values(l),
            bad_records: m.bad_records.with_label_values(l),
            gaps: m.gaps.with_label_values(l),
            retries: m.retries.with_label_values(l),
            late_records: m.late_records.with_label_values(l),
            discarded_records: m.discarded_records.with_label_values(l),
            e2e_latency: m.e2e_latency.with_label_values(l),
            low_watermark: m.low_watermark.with_label_values(l),
            watermark_lag: m.watermark_lag.with_label_values(l),
            outbox_backlog: m.outbox_backlog.with_label_values(l),
            timers_pending: m.timers_pending.with_label_values(l),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Metrics;

    #[test]
    fn a_loaded_savepoint_is_exported_with_its_time_bytes_and_shards() {
        let m = Metrics::new();
        m.savepoint_loaded(1.2345, 4096, 7);
        let text = m.render();
        for line in [
            r#"millrace_savepoint_loaded{what="milliseconds"} 1235"#,
            r#"millrace_savepoint_loaded{what="bytes"} 4096"#,
            r#"millrace_savepoint_loaded{what="shards"} 7"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
        }
    }
}
