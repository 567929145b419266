//! `kafka`: a source reading a topic's partitions and a sink writing to a
//! topic, both exactly once, through librdkafka (the `rdkafka` crate).
//!
//! **Source.** The engine, not a consumer group, decides who reads what: the
//! component's `shards` source shards take the topic's partitions round-robin
//! (partition `i` of the sorted list to shard `i % shards`) and `assign()`
//! them. The position committed with each batch of productions is the next
//! offset of every partition, so a restart resumes exactly where committed
//! productions end. Records of several partitions interleave in an order that
//! a second read would not repeat, so the source is not replayable: its
//! productions go through the outbox, committed with the offsets. A shard's
//! watermark is the minimum over its partitions of the newest event time
//! read, leaving out partitions idle for `watermark.idle_after`.
//!
//! **Sink.** Each record carries its production id (`edge/shard/seq`, the
//! same at every re-delivery) in the header `millrace-id`; the producer is
//! idempotent (`acks=all`). The sink defers durability (`Sink::defers`): it
//! produces without waiting, and tells the engine between turns how many of
//! its writes the broker acknowledged, in order (`produced.rs`); only those
//! are committed as applied, with the end offset they reach in each
//! partition as the position. At a restart, the sink reads the topic from
//! that position to its end and skips re-deliveries of the ids it finds
//! there, so a crash between a produce and its commit leaves no duplicate.
//! With `transactional_id`, a transaction spans `transaction_interval` and
//! is committed on a thread of its own (`transactions.rs`); the start's
//! `init_transactions` fences off a killed run's requests still in flight,
//! which could otherwise land after the read-back.
//!
//! Both retry an unreachable broker with backoff (librdkafka reconnects; the
//! source also retries its set-up, and replaces its client after every
//! broker was down), report it on `/healthz`, and count it. A partition
//! that no longer holds the source's committed position is handled as its
//! `on_offset_reset` says (`reset.rs`), never skipped silently.

mod awaited;
mod metrics;
mod produced;
mod reset;
mod sink;
mod source;
mod transactions;

use millrace_config::{Component, ConfigError};
use rdkafka::config::ClientConfig;
use serde::Deserialize;
use std::collections::BTreeMap;

/// The header holding a record's production id.
pub const ID_HEADER: &str = "millrace-id";

/// Settings every Kafka client takes (each kind's options hold these three).
#[derive(Debug, Clone)]
struct ClientOptions {
    /// `host:port` of one or more brokers.
    brokers: Brokers,
    /// Sent to the broker (default `millrace-COMPONENT`).
    client_id: Option<String>,
    /// Any librdkafka setting, passed through (security, timeouts, ...).
    properties: BTreeMap<String, PropertyValue>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Brokers {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum PropertyValue {
    Text(String),
    Int(i64),
    Bool(bool),
    Float(f64),
}

impl PropertyValue {
    fn text(&self) -> String {
        match self {
            PropertyValue::Text(s) => s.clone(),
            PropertyValue::Int(i) => i.to_string(),
            PropertyValue::Bool(b) => b.to_string(),
            PropertyValue::Float(f) => f.to_string(),
        }
    }
}

impl ClientOptions {
    /// The librdkafka configuration: millrace's settings, then the user's
    /// `properties` (which win, except those millrace's guarantees rest on).
    fn config(
        &self,
        c: &Component,
        ours: &[(&str, &str)],
        fixed: &[(&str, &str)],
    ) -> Result<ClientConfig, ConfigError> {
        let brokers = match &self.brokers {
            Brokers::One(b) => b.clone(),
            Brokers::Many(v) => v.join(","),
        };
        if brokers.trim().is_empty() {
            return Err(c.options.error(Some("brokers"), "no broker given"));
        }
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", brokers);
        cfg.set(
            "client.id",
            self.client_id
                .clone()
                .unwrap_or_else(|| format!("millrace-{}", c.name)),
        );
        for (k, v) in ours {
            cfg.set(*k, *v);
        }
        for (k, v) in &self.properties {
            if let Some((_, must)) = fixed.iter().find(|(f, _)| f == k) {
                if v.text() != *must {
                    return Err(c.options.error(
                        Some("properties"),
                        format!("`{k}` must stay `{must}`: millrace's exactly-once guarantee rests on it"),
                    ));
                }
            }
            cfg.set(k, v.text());
        }
        for (k, v) in fixed {
            cfg.set(*k, *v);
        }
        // librdkafka checks every name and value here (an unknown setting,
        // or TLS, which this build does not have), without connecting.
        cfg.create_native_config()
            .map_err(|e| c.options.error(Some("properties"), e.to_string()))?;
        Ok(cfg)
    }
}

/// Registers the `kafka` source and sink.
pub(crate) fn register(r: &mut millrace_engine::Registry) {
    source::register(r);
    sink::register(r);
}

#[cfg(test)]
mod tests {
    fn validate(extra: &str) -> Result<(), String> {
        crate::test_support::validate(&format!(
            r#"
[sources.k]
type = "kafka"
brokers = "127.0.0.1:9"
topic = "t"
{extra}
[sinks.out]
type = "stdout"
inputs = ["k"]
"#
        ))
    }

    fn validate_sink(extra: &str) -> Result<(), String> {
        crate::test_support::validate(&format!(
            r#"
[sources.gen]
type = "generator"
[sinks.k]
type = "kafka"
inputs = ["gen"]
brokers = "127.0.0.1:9"
topic = "t"
{extra}
"#
        ))
    }

    #[test]
    fn transactions_are_the_sinks_option_not_a_property() {
        assert_eq!(validate_sink(r#"transactional_id = "app-out""#), Ok(()));
        let e = validate_sink(r#"properties = { "transactional.id" = "x" }"#).unwrap_err();
        assert!(e.contains("`transactional_id`"), "{e}");
        let e = validate_sink(r#"transactional_id = " ""#).unwrap_err();
        assert!(e.contains("empty transactional id"), "{e}");
        let e = validate_sink(r#"properties = { "enable.idempotence" = false }"#).unwrap_err();
        assert!(e.contains("must stay `true`"), "{e}");
        assert_eq!(
            validate_sink("transactional_id = \"a\"\ntransaction_interval = \"50ms\""),
            Ok(())
        );
        let e = validate_sink(r#"transaction_interval = "50ms""#).unwrap_err();
        assert!(
            e.contains("transaction_interval") && e.contains("only with `transactional_id`"),
            "{e}"
        );
        let e =
            validate_sink("transactional_id = \"a\"\ntransaction_interval = \"0s\"").unwrap_err();
        assert!(e.contains("longer than 0"), "{e}");
        // An interval the broker's transaction timeout would cut short.
        let e =
            validate_sink("transactional_id = \"a\"\ntransaction_interval = \"31s\"").unwrap_err();
        assert!(
            e.contains("transaction_interval")
                && e.contains("transaction.timeout.ms")
                && e.contains("60000 ms"),
            "{e}"
        );
        assert_eq!(
            validate_sink("transactional_id = \"a\"\ntransaction_interval = \"30s\""),
            Ok(())
        );
        let e = validate_sink(
            "transactional_id = \"a\"\ntransaction_interval = \"3s\"\n\
             properties = { \"transaction.timeout.ms\" = 5000 }",
        )
        .unwrap_err();
        assert!(e.contains("5000 ms"), "{e}");
    }

    #[test]
    fn settings_are_checked_at_validate() {
        assert_eq!(validate(""), Ok(()));
        let e = validate(r#"properties = { "no.such.setting" = 1 }"#).unwrap_err();
        assert!(e.contains("no.such.setting"), "{e}");
        let e = validate(r#"properties = { "security.protocol" = "ssl" }"#).unwrap_err();
        assert!(e.contains("security.protocol"), "{e}");
        let e = validate(r#"properties = { "enable.auto.commit" = true }"#).unwrap_err();
        assert!(e.contains("must stay `false`"), "{e}");
        let e = validate(r#"start = "yesterday""#).unwrap_err();
        assert!(e.contains("start"), "{e}");
        assert_eq!(validate(r#"on_offset_reset = "latest""#), Ok(()));
        let e = validate("\non_offset_reset = \"skip\"").unwrap_err();
        assert!(
            e.contains("t.toml:7") && e.contains("on_offset_reset") && e.contains("`skip`"),
            "{e}"
        );
        let e = validate("shards = 0").unwrap_err();
        assert!(e.contains("shards"), "{e}");
        assert_eq!(validate("shards = 4"), Ok(()));
    }
}
