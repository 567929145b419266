//! Kafka metrics, in the process-wide registry that `/metrics` also renders.

use prometheus::{register_int_counter_vec, register_int_gauge_vec, IntCounterVec, IntGaugeVec};
use std::sync::OnceLock;

pub(super) struct KafkaMetrics {
    /// Records read, by component and partition.
    pub records_in: IntCounterVec,
    /// Bytes (key and value) read, by component and partition.
    pub bytes_in: IntCounterVec,
    /// Records between the broker's end of a partition and what the source read.
    pub lag: IntGaugeVec,
    /// Records produced (acknowledged by the broker), by component and partition.
    pub records_out: IntCounterVec,
    /// Bytes produced, by component and partition.
    pub bytes_out: IntCounterVec,
    /// Re-deliveries a sink found already in its topic at a restart and skipped.
    pub duplicates_skipped: IntCounterVec,
    /// Client errors (connection, produce, decoding), by component and kind.
    pub errors: IntCounterVec,
    /// Set-up retries (metadata, assignment, read-back), by component.
    pub retries: IntCounterVec,
    /// Transactions a transactional sink committed, by component.
    pub transactions: IntCounterVec,
    /// Partitions found not to hold a source's committed position, by
    /// component and what `on_offset_reset` did (fail, earliest, latest).
    pub offset_resets: IntCounterVec,
}

pub(super) fn metrics() -> &'static KafkaMetrics {
    static M: OnceLock<KafkaMetrics> = OnceLock::new();
    M.get_or_init(|| {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            register_int_counter_vec!(name, help, labels).expect("a new metric name")
        };
        KafkaMetrics {
            records_in: counter(
                "millrace_kafka_records_in_total",
                "Records a Kafka source read, by partition.",
                &["component", "partition"],
            ),
            bytes_in: counter(
                "millrace_kafka_bytes_in_total",
                "Key and value bytes a Kafka source read, by partition.",
                &["component", "partition"],
            ),
            lag: register_int_gauge_vec!(
                "millrace_kafka_consumer_lag_records",
                "Records between a partition's end and what the Kafka source read (from librdkafka's statistics).",
                &["component", "partition"]
            )
            .expect("a new metric name"),
            records_out: counter(
                "millrace_kafka_records_out_total",
                "Records a Kafka sink produced and the broker acknowledged, by partition.",
                &["component", "partition"],
            ),
            bytes_out: counter(
                "millrace_kafka_bytes_out_total",
                "Key and value bytes a Kafka sink produced, by partition.",
                &["component", "partition"],
            ),
            duplicates_skipped: counter(
                "millrace_kafka_duplicates_skipped_total",
                "Re-deliveries a Kafka sink found already in its topic at a restart, and skipped.",
                &["component"],
            ),
            errors: counter(
                "millrace_kafka_errors_total",
                "Kafka client errors, by kind (connect, produce, transaction, too_large, consume, decode).",
                &["component", "kind"],
            ),
            retries: counter(
                "millrace_kafka_retries_total",
                "Kafka set-up steps retried after a failure (metadata, assignment, read-back).",
                &["component"],
            ),
            transactions: counter(
                "millrace_kafka_transactions_total",
                "Transactions a transactional Kafka sink committed (one per commit that wrote).",
                &["component"],
            ),
            offset_resets: counter(
                "millrace_kafka_offset_resets_total",
                "Partitions found not to hold a Kafka source's committed position (the broker's offsets went back), by what on_offset_reset did.",
                &["component", "action"],
            ),
        }
    })
}
