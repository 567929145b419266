//! What a Kafka source does when a partition no longer holds its committed
//! position: the broker answers a fetch there with "offset out of range"
//! (a broker that lost its data and came back empty, a topic deleted and
//! recreated, records removed by retention before they were read).
//!
//! librdkafka is told never to choose for itself (`auto.offset.reset =
//! error`): it stops fetching the partition and says so, and the source
//! applies the component's `on_offset_reset`, as Flink's
//! `OffsetResetStrategy` and Kafka Streams' `auto.offset.reset` make the
//! choice explicit. Nothing is skipped without a log line and a metric.

use millrace_config::{Component, ConfigError};

/// The `on_offset_reset` setting of a Kafka source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OnOffsetReset {
    /// Stop reading the partition, report it on `/healthz` and in the log
    /// (the default): the operator decides.
    Fail,
    /// Read the partition again from the first offset it holds.
    Earliest,
    /// Go on from the partition's end: what it holds now is skipped.
    Latest,
}

impl OnOffsetReset {
    /// `fail` (the default), `earliest` or `latest`.
    pub(super) fn parse(c: &Component, v: Option<&str>) -> Result<Self, ConfigError> {
        match v {
            None | Some("fail") => Ok(OnOffsetReset::Fail),
            Some("earliest") => Ok(OnOffsetReset::Earliest),
            Some("latest") => Ok(OnOffsetReset::Latest),
            Some(other) => Err(c.options.error(
                Some("on_offset_reset"),
                format!("`{other}` is not a choice: use \"fail\", \"earliest\" or \"latest\""),
            )),
        }
    }

    /// The metric label of what was done.
    pub(super) fn label(self) -> &'static str {
        match self {
            OnOffsetReset::Fail => "fail",
            OnOffsetReset::Earliest => "earliest",
            OnOffsetReset::Latest => "latest",
        }
    }
}

/// What to do with a partition whose next offset `next` the broker does
/// not hold: it holds `low..high`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Reset {
    /// Stop reading it; why, for `/healthz` and the log.
    Stop(String),
    /// Read on from `at`; what that means, for the log.
    Resume { at: i64, why: String },
}

/// The decision for partition `partition` of `topic` (see [`Reset`]).
pub(super) fn decide(
    on: OnOffsetReset,
    topic: &str,
    partition: i32,
    next: i64,
    (low, high): (i64, i64),
) -> Reset {
    let found = format!(
        "partition {partition} of topic `{topic}` does not hold the committed position \
         (next offset {next}; it holds offsets {low} to {high})"
    );
    match on {
        OnOffsetReset::Fail => Reset::Stop(format!(
            "{found}: not read (on_offset_reset = \"fail\"); restart with \
             on_offset_reset = \"earliest\" or \"latest\" to read it from its start or end"
        )),
        OnOffsetReset::Earliest => Reset::Resume {
            at: low,
            why: format!("{found}: reading it from its first offset, {low}"),
        },
        OnOffsetReset::Latest => Reset::Resume {
            at: high,
            why: format!(
                "{found}: reading on from its end, {high}; the {} records it holds are skipped",
                (high - low).max(0)
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_choice_is_counted_under_the_name_the_setting_spells() {
        // `millrace_kafka_offset_resets_total{action}`: the README's names.
        let labels = [
            OnOffsetReset::Fail,
            OnOffsetReset::Earliest,
            OnOffsetReset::Latest,
        ]
        .map(OnOffsetReset::label);
        assert_eq!(labels, ["fail", "earliest", "latest"]);
    }

    #[test]
    fn fail_stops_and_says_how_to_go_on() {
        let Reset::Stop(why) = decide(OnOffsetReset::Fail, "words", 3, 100, (0, 50)) else {
            panic!("fail stops");
        };
        for part in [
            "partition 3 of topic `words`",
            "next offset 100",
            "offsets 0 to 50",
            "on_offset_reset",
        ] {
            assert!(why.contains(part), "{part}: {why}");
        }
    }

    #[test]
    fn earliest_and_latest_resume_at_the_partitions_bounds() {
        let at = |on| match decide(on, "t", 0, 100, (7, 50)) {
            Reset::Resume { at, why } => {
                assert!(why.contains("partition 0 of topic `t`"), "{why}");
                at
            }
            Reset::Stop(why) => panic!("{why}"),
        };
        assert_eq!(at(OnOffsetReset::Earliest), 7);
        assert_eq!(at(OnOffsetReset::Latest), 50);
    }
}
