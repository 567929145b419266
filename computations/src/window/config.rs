//! A window component's settings: how elements are assigned to windows,
//! the triggers, lateness, accumulation and aggregate, parsed strictly from
//! its options.

use crate::aggregate::{Acc, Aggregate, AggregateSpec};
use millrace_config::{Component, ConfigError, HumanDuration};
use serde::Deserialize;

/// How elements are assigned to windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum WindowSpec {
    /// Tumbling windows of `size`.
    Fixed {
        /// Window length.
        size: HumanDuration,
    },
    /// Windows of `size` starting every `every`.
    Sliding {
        /// Window length.
        size: HumanDuration,
        /// Period between window starts.
        every: HumanDuration,
    },
    /// Per-key sessions: activity separated by at least `gap`; overlapping
    /// sessions of a key merge.
    Session {
        /// Inactivity that ends a session.
        gap: HumanDuration,
    },
}

/// A trigger for early or late firings. Early and late triggers repeat.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Trigger {
    /// After N elements since the last firing.
    Count(u64),
    /// A processing-time period after the first element since the last firing.
    Every(HumanDuration),
    /// When any of these would fire.
    Any(Vec<Trigger>),
    /// When all of these would fire.
    All(Vec<Trigger>),
    /// Each in turn, then the last one again.
    Sequence(Vec<Trigger>),
    /// The inner trigger, again after each firing (early and late triggers
    /// always repeat; this spells it out).
    Repeatedly(Box<Trigger>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum LateSpec {
    Text(String),
    Trigger(Trigger),
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TriggerSpec {
    /// Only "watermark": the on-time firing. Always on.
    at: Option<String>,
    early_every: Option<HumanDuration>,
    early_count: Option<u64>,
    early: Option<Trigger>,
    late: Option<LateSpec>,
}

/// What a firing emits, relative to the firings before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accumulation {
    /// Each pane holds only the elements since the last firing.
    #[default]
    Discarding,
    /// Each pane holds every element of the window so far.
    Accumulating,
    /// Accumulating, and each pane first retracts the previous one.
    #[serde(alias = "accumulating_and_retracting")]
    Retracting,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    window: WindowSpec,
    #[serde(default)]
    trigger: TriggerSpec,
    allowed_lateness: Option<HumanDuration>,
    #[serde(default)]
    accumulation: Accumulation,
    aggregate: Option<String>,
    op: Option<String>,
    /// With `top:N`: where each element's score is (the elements are kept).
    by: Option<String>,
    /// With `aggregate = "script"`: the user's aggregate.
    script: Option<String>,
    script_file: Option<std::path::PathBuf>,
    max_operations: Option<u64>,
}

/// What the `window` computation does with its panes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// One record per firing with the aggregate.
    Aggregate,
    /// One record per (left, right) pair of a two-input window (a windowed join).
    Join,
}

/// The settings of one `window` component.
#[derive(Debug, Clone)]
pub struct WindowConfig {
    pub(super) window: WindowSpec,
    pub(super) early: Option<Trigger>,
    pub(super) late: Trigger,
    pub(super) lateness: i64,
    pub(super) accumulation: Accumulation,
    pub(super) aggregate: Aggregate,
    pub(super) output: Output,
    /// Input stream names in declared order (left, right for a join).
    pub(super) sides: Vec<String>,
}

/// A duration in microseconds, saturating at `i64::MAX`.
pub(super) fn micros(d: HumanDuration) -> i64 {
    i64::try_from(d.0.as_micros()).unwrap_or(i64::MAX)
}

/// The most windows one record may belong to (sliding `size` / `every`):
/// beyond it, one record would cost unbounded work and state.
pub(super) const MAX_WINDOWS_PER_RECORD: i64 = 10_000;

impl WindowConfig {
    /// Parses a `window`-like component. `aggregate` (or `op`) names the
    /// aggregate unless `fixed` gives it.
    pub fn parse(c: &Component, fixed: Option<(Acc, Output)>) -> Result<WindowConfig, ConfigError> {
        let o: Options = c.options.parse()?;
        let check = |d: HumanDuration, key: &str| {
            if d.0.is_zero() {
                Err(c
                    .options
                    .error(Some("window"), format!("`{key}` must be longer than zero")))
            } else {
                Ok(())
            }
        };
        match o.window {
            WindowSpec::Fixed { size } => check(size, "size")?,
            WindowSpec::Sliding { size, every } => {
                check(size, "size")?;
                check(every, "every")?;
                let per_record = micros(size) / micros(every).max(1);
                if per_record > MAX_WINDOWS_PER_RECORD {
                    return Err(c.options.error(
                        Some("window"),
                        format!(
                            "`size` / `every` is {per_record}: each record would belong to that many windows (at most {MAX_WINDOWS_PER_RECORD})"
                        ),
                    ));
                }
            }
            WindowSpec::Session { gap } => check(gap, "gap")?,
        }
        if o.trigger.at.as_deref().is_some_and(|a| a != "watermark") {
            return Err(c
                .options
                .error(Some("trigger"), "`at` can only be \"watermark\""));
        }
        let mut early: Vec<Trigger> = Vec::new();
        if let Some(d) = o.trigger.early_every {
            early.push(Trigger::Every(d));
        }
        if let Some(n) = o.trigger.early_count {
            early.push(Trigger::Count(n));
        }
        if let Some(t) = o.trigger.early.clone() {
            early.push(t);
        }
        let early = match early.len() {
            0 => None,
            1 => early.pop(),
            _ => Some(Trigger::Any(early)),
        };
        let late = match o.trigger.late.clone() {
            None => Trigger::Count(1),
            Some(LateSpec::Text(t)) if t == "each" => Trigger::Count(1),
            Some(LateSpec::Text(t)) => Trigger::Every(HumanDuration(
                millrace_config::parse_duration(&t).map_err(|m| {
                    c.options
                        .error(Some("trigger"), format!("late: {m} (or \"each\")"))
                })?,
            )),
            Some(LateSpec::Trigger(t)) => t,
        };
        // Each kind takes its aggregate from one option (or from none); the
        // others are errors, never silently ignored.
        let unknown = |key: &str, hint: &str| {
            Err(c.options.error(
                Some(key),
                format!("`{}` has no option `{key}`{hint}", c.kind),
            ))
        };
        let (aggregate, output) = match fixed {
            Some((acc, output)) => {
                for (key, set) in [
                    ("aggregate", o.aggregate.is_some()),
                    ("op", o.op.is_some()),
                    ("by", o.by.is_some()),
                    ("script", o.script.is_some()),
                    ("script_file", o.script_file.is_some()),
                    ("max_operations", o.max_operations.is_some()),
                ] {
                    if set {
                        return unknown(key, ": it keeps each input's values");
                    }
                }
                (Aggregate::Builtin(acc), output)
            }
            None => {
                let (option, name) = if c.kind == "reduce_by_key_and_window" {
                    if o.aggregate.is_some() {
                        return unknown("aggregate", "; use `op`");
                    }
                    ("op", o.op.as_deref())
                } else {
                    if o.op.is_some() {
                        return unknown("op", "; use `aggregate`");
                    }
                    ("aggregate", o.aggregate.as_deref())
                };
                let spec = AggregateSpec {
                    name: (option, name.unwrap_or("count")),
                    by: o.by.as_ref(),
                    script: o.script.as_ref(),
                    script_file: o.script_file.as_ref(),
                    max_operations: o.max_operations,
                };
                (Aggregate::parse(c, spec)?, Output::Aggregate)
            }
        };
        Ok(WindowConfig {
            window: o.window,
            early,
            late,
            lateness: o.allowed_lateness.map_or(0, micros),
            accumulation: o.accumulation,
            aggregate,
            output,
            sides: c.inputs.iter().map(|i| i.stream.to_string()).collect(),
        })
    }

    /// The windows an element at `ts` belongs to, as `[start, end)`. Empty
    /// for a record in a gap between sliding windows (`every` > `size`).
    /// Arithmetic saturates at the ends of time, so no event time overflows.
    pub(super) fn assign(&self, ts: i64) -> Vec<(i64, i64)> {
        match self.window {
            WindowSpec::Fixed { size } => {
                let size = micros(size);
                let start = ts.div_euclid(size).saturating_mul(size);
                vec![(start, start.saturating_add(size))]
            }
            WindowSpec::Sliding { size, every } => {
                let (size, every) = (micros(size), micros(every));
                let mut start = ts.div_euclid(every).saturating_mul(every);
                let first = ts.saturating_sub(size);
                let mut out = Vec::new();
                while start > first {
                    out.push((start, start.saturating_add(size)));
                    match start.checked_sub(every) {
                        Some(s) => start = s,
                        None => break,
                    }
                }
                out.reverse();
                out
            }
            WindowSpec::Session { gap } => vec![(ts, ts.saturating_add(micros(gap)))],
        }
    }
}
