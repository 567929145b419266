//! Keyed, stateful computations: `count` and `reduce`. Their state is the
//! current aggregate of the key, as decimal text, in RocksDB.

use crate::aggregate::{element_json, rank_order, Aggregate, AggregateSpec};
use crate::options;
use crate::ttl::with_state_ttl;
use millrace_config::HumanDuration;
use millrace_config::KeyExtractor;
use millrace_engine::per_shard;
use millrace_engine::{extract_key, Computation, ComputationError, Context, Record, Registry};
use serde::Deserialize;

/// `count`: the running count per key (the streaming word count's mapWithState).
/// Emits `(key, new count)` for every record.
#[derive(Clone)]
pub struct Count;

impl Computation for Count {
    fn process_record(&mut self, ctx: &mut Context<'_>, r: Record) -> Result<(), ComputationError> {
        let n = match ctx.state()? {
            None => 0,
            Some(s) => parse_u64(&s).ok_or_else(|| {
                ComputationError::BadRecord(format!(
                    "stored count {:?} is not a number",
                    String::from_utf8_lossy(&s)
                ))
            })?,
        } + 1;
        let text = n.to_string();
        ctx.set_state(text.clone());
        ctx.produce(r.key, text, r.timestamp);
        Ok(())
    }
}

fn parse_u64(b: &[u8]) -> Option<u64> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// The operation of a `reduce`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ReduceOp {
    /// Running sum.
    Sum,
    /// Running minimum.
    Min,
    /// Running maximum.
    Max,
}

/// A number kept exactly when it is an integer.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Num {
    Int(i64),
    Float(f64),
}

impl Num {
    fn parse(b: &[u8]) -> Option<Num> {
        let s = std::str::from_utf8(b).ok()?.trim();
        s.parse::<i64>().map(Num::Int).ok().or_else(|| {
            s.parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .map(Num::Float)
        })
    }

    fn f(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Float(f) => f,
        }
    }

    fn combine(self, other: Num, op: ReduceOp) -> Num {
        match (op, self, other) {
            (ReduceOp::Sum, Num::Int(a), Num::Int(b)) => a
                .checked_add(b)
                .map_or(Num::Float(a as f64 + b as f64), Num::Int),
            (ReduceOp::Sum, a, b) => Num::Float(a.f() + b.f()),
            (ReduceOp::Min, a, b) => {
                if b.f() < a.f() {
                    b
                } else {
                    a
                }
            }
            (ReduceOp::Max, a, b) => {
                if b.f() > a.f() {
                    b
                } else {
                    a
                }
            }
        }
    }

    fn text(self) -> String {
        match self {
            Num::Int(i) => i.to_string(),
            Num::Float(f) => f.to_string(),
        }
    }
}

/// `reduce`: running `sum`, `min` or `max` of numeric values per key; emits
/// `(key, new aggregate)` for every record. A value that is not a number is a
/// bad record (counted, routed to `NAME.errors`).
#[derive(Clone)]
pub struct Reduce {
    op: ReduceOp,
}

impl Computation for Reduce {
    fn process_record(&mut self, ctx: &mut Context<'_>, r: Record) -> Result<(), ComputationError> {
        let v = Num::parse(&r.value).ok_or_else(|| {
            ComputationError::BadRecord(format!(
                "value {:?} is not a number",
                String::from_utf8_lossy(&r.value)
            ))
        })?;
        let next = match ctx.state()?.as_deref().and_then(Num::parse) {
            Some(acc) => acc.combine(v, self.op),
            None => v,
        };
        let text = next.text();
        ctx.set_state(text.clone());
        ctx.produce(r.key, text, r.timestamp);
        Ok(())
    }
}

/// `combine`: a running aggregate per key (count, sum, min, max, mean, top:N,
/// collect, or the user's script); emits the key's new result (JSON) for
/// every record.
#[derive(Clone)]
pub struct Combine {
    aggregate: Aggregate,
    /// Emit only when the result changes (`top_per_key`).
    on_change: bool,
}

impl Computation for Combine {
    fn process_record(&mut self, ctx: &mut Context<'_>, r: Record) -> Result<(), ComputationError> {
        let mut acc = match ctx.state()? {
            None => self.aggregate.empty(),
            Some(b) => serde_json::from_slice(&b).map_err(|e| {
                ComputationError::BadRecord(format!("stored aggregate is not readable: {e}"))
            })?,
        };
        let before = self.on_change.then(|| self.aggregate.result(&acc));
        self.aggregate
            .add(&mut acc, &r.key, &r.value, ctx.input())
            .map_err(ComputationError::BadRecord)?;
        let after = self.aggregate.result(&acc);
        ctx.set_state(serde_json::to_vec(&acc).unwrap_or_default());
        if before.is_none_or(|b| b != after) {
            ctx.produce(r.key, after.to_string(), r.timestamp);
        }
        Ok(())
    }
}

/// `top_per_key` with `by`: the N elements with the largest scores per key
/// (Beam's `Top.largestPerKey`), keeping the elements themselves. The score
/// is read from each element with `by` (`json:/count`, `field:N`); with
/// `id`, an element replaces the one with the same identity (a running
/// count updating its tag). Order: score descending, then the element's
/// text ascending, so ties are broken the same way every time. Emits the
/// elements (a JSON array; JSON elements as they are, others as strings)
/// whenever they change.
#[derive(Clone)]
pub struct TopBy {
    n: usize,
    by: KeyExtractor,
    id: Option<KeyExtractor>,
}

impl Computation for TopBy {
    fn process_record(&mut self, ctx: &mut Context<'_>, r: Record) -> Result<(), ComputationError> {
        let bad = |what: String| ComputationError::BadRecord(what);
        let score_text =
            extract_key(&self.by, &r.key, &r.value).map_err(|e| bad(format!("by: {e}")))?;
        let score: f64 = std::str::from_utf8(&score_text)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .filter(|f: &f64| f.is_finite())
            .ok_or_else(|| {
                bad(format!(
                    "by: `{}` is not a number",
                    String::from_utf8_lossy(&score_text)
                ))
            })?;
        let element = String::from_utf8_lossy(&r.value).into_owned();
        let id = match &self.id {
            Some(x) => Some(
                extract_key(x, &r.key, &r.value)
                    .map_err(|e| bad(format!("id: {e}")))?
                    .to_vec(),
            ),
            None => None,
        };
        // State: [[score, element, id or null], ...], best first.
        let mut top: Vec<(f64, String, Option<Vec<u8>>)> = match ctx.state()? {
            None => Vec::new(),
            Some(b) => serde_json::from_slice(&b)
                .map_err(|e| bad(format!("stored top elements are not readable: {e}")))?,
        };
        let before: Vec<String> = top.iter().map(|(_, e, _)| e.clone()).collect();
        if id.is_some() {
            top.retain(|(_, _, i)| *i != id);
        }
        top.push((score, element, id));
        top.sort_by(|a, b| rank_order((a.0, &a.1), (b.0, &b.1)));
        top.truncate(self.n);
        let after: Vec<String> = top.iter().map(|(_, e, _)| e.clone()).collect();
        ctx.set_state(serde_json::to_vec(&top).map_err(|e| bad(e.to_string()))?);
        if after != before {
            let out: Vec<serde_json::Value> = after.iter().map(|e| element_json(e)).collect();
            ctx.produce(r.key, serde_json::Value::from(out).to_string(), r.timestamp);
        }
        Ok(())
    }
}

/// `count_per_element`: how often each distinct value has been seen (Beam's
/// Count.perElement), per key; emits `(value, count)` for every record. Key
/// the input by `value` to count over the whole stream.
#[derive(Clone)]
pub struct CountPerElement;

impl Computation for CountPerElement {
    fn process_record(&mut self, ctx: &mut Context<'_>, r: Record) -> Result<(), ComputationError> {
        let mut counts: std::collections::BTreeMap<String, u64> = match ctx.state()? {
            None => Default::default(),
            Some(b) => serde_json::from_slice(&b).map_err(|e| {
                ComputationError::BadRecord(format!("stored counts are not readable: {e}"))
            })?,
        };
        let element = String::from_utf8_lossy(&r.value).into_owned();
        let n = counts.entry(element.clone()).or_insert(0);
        *n += 1;
        let text = n.to_string();
        ctx.set_state(serde_json::to_vec(&counts).unwrap_or_default());
        ctx.produce(element, text, r.timestamp);
        Ok(())
    }
}

pub(crate) fn register(r: &mut Registry) {
    r.computation("combine", |c| {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct O {
            aggregate: String,
            by: Option<String>,
            script: Option<String>,
            script_file: Option<std::path::PathBuf>,
            max_operations: Option<u64>,
            state_ttl: Option<HumanDuration>,
        }
        let o: O = options(c)?;
        let aggregate = Aggregate::parse(
            c,
            AggregateSpec {
                name: ("aggregate", &o.aggregate),
                by: o.by.as_ref(),
                script: o.script.as_ref(),
                script_file: o.script_file.as_ref(),
                max_operations: o.max_operations,
            },
        )?;
        Ok(with_state_ttl(
            per_shard(Combine {
                aggregate,
                on_change: false,
            }),
            o.state_ttl,
        ))
    });
    r.computation("top_per_key", |c| {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct O {
            n: usize,
            by: Option<String>,
            id: Option<String>,
            state_ttl: Option<HumanDuration>,
        }
        let o: O = options(c)?;
        if o.n == 0 {
            return Err(c.options.error(Some("n"), "must be at least 1"));
        }
        let extractor = |key: &str, text: &str| {
            KeyExtractor::parse(text, None).map_err(|m| c.options.error(Some(key), m))
        };
        match (&o.by, &o.id) {
            (Some(by), id) => {
                return Ok(with_state_ttl(
                    per_shard(TopBy {
                        n: o.n,
                        by: extractor("by", by)?,
                        id: id.as_deref().map(|i| extractor("id", i)).transpose()?,
                    }),
                    o.state_ttl,
                ))
            }
            (None, Some(_)) => {
                return Err(c.options.error(Some("id"), "`id` needs `by` (the score)"))
            }
            (None, None) => {}
        }
        let aggregate = Aggregate::Builtin(crate::aggregate::Acc::Top {
            n: o.n,
            items: Vec::new(),
        });
        Ok(with_state_ttl(
            per_shard(Combine {
                aggregate,
                on_change: true,
            }),
            o.state_ttl,
        ))
    });
    r.computation("count_per_element", |c| {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct O {
            state_ttl: Option<HumanDuration>,
        }
        let o: O = options(c)?;
        Ok(with_state_ttl(per_shard(CountPerElement), o.state_ttl))
    });
    r.computation("count", |c| {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct O {
            state_ttl: Option<HumanDuration>,
        }
        let o: O = options(c)?;
        Ok(with_state_ttl(per_shard(Count), o.state_ttl))
    });
    r.computation("reduce", |c| {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct O {
            op: ReduceOp,
            state_ttl: Option<HumanDuration>,
        }
        let o: O = options(c)?;
        let op = o.op;
        Ok(with_state_ttl(per_shard(Reduce { op }), o.state_ttl))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_combine_exactly_when_they_can() {
        let (a, b) = (Num::parse(b"2").unwrap(), Num::parse(b" 3 ").unwrap());
        assert_eq!(a.combine(b, ReduceOp::Sum), Num::Int(5));
        assert_eq!(
            a.combine(Num::parse(b"0.5").unwrap(), ReduceOp::Sum),
            Num::Float(2.5)
        );
        assert_eq!(a.combine(b, ReduceOp::Min), Num::Int(2));
        assert_eq!(a.combine(b, ReduceOp::Max), Num::Int(3));
        assert_eq!(Num::parse(b"x"), None);
        assert_eq!(Num::parse(b"inf"), None);
        assert_eq!(
            Num::Int(i64::MAX)
                .combine(Num::Int(1), ReduceOp::Sum)
                .text(),
            (i64::MAX as f64 + 1.0).to_string()
        );
    }
}
