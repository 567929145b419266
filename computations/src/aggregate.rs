//! Aggregates shared by `window`, `combine`, `top_per_key` and `cogroup`:
//! count, sum, min, max, mean, top-N, collect, and groups by input.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// An aggregate's running value. Serialised into the key's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Acc {
    /// Number of elements.
    Count(u64),
    /// Sum of numeric values.
    Sum(f64),
    /// Smallest numeric value.
    Min(Option<f64>),
    /// Largest numeric value.
    Max(Option<f64>),
    /// Mean of numeric values.
    Mean {
        /// Sum so far.
        sum: f64,
        /// Count so far.
        n: u64,
    },
    /// The N largest numeric values, largest first.
    Top {
        /// N.
        n: usize,
        /// The values kept.
        items: Vec<f64>,
    },
    /// Every value, in arrival order.
    Collect(Vec<String>),
    /// Values grouped by the input stream they came from (CoGroupByKey).
    Groups(BTreeMap<String, Vec<String>>),
}

/// Parses an aggregate name: `count`, `sum`, `min`, `max`, `mean`, `top:N`, `collect`.
pub fn parse_aggregate(name: &str) -> Result<Acc, String> {
    Ok(match name {
        "count" => Acc::Count(0),
        "sum" => Acc::Sum(0.0),
        "min" => Acc::Min(None),
        "max" => Acc::Max(None),
        "mean" => Acc::Mean { sum: 0.0, n: 0 },
        "collect" => Acc::Collect(Vec::new()),
        other => match other.strip_prefix("top:").map(str::parse::<usize>) {
            Some(Ok(n)) if n > 0 => Acc::Top {
                n,
                items: Vec::new(),
            },
            _ => {
                return Err(format!(
                    "unknown aggregate `{other}` (use count, sum, min, max, mean, top:N or collect)"
                ))
            }
        },
    })
}

fn number(v: &[u8]) -> Result<f64, String> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|f| f.is_finite())
        .ok_or_else(|| format!("value {:?} is not a number", String::from_utf8_lossy(v)))
}

/// A number as JSON: integral values print as integers.
pub fn json_number(f: f64) -> Value {
    if f.fract() == 0.0 && f.abs() < 9e15 {
        Value::from(f as i64)
    } else {
        Value::from(f)
    }
}

impl Acc {
    /// The same aggregate, empty.
    pub fn empty(&self) -> Acc {
        match self {
            Acc::Count(_) => Acc::Count(0),
            Acc::Sum(_) => Acc::Sum(0.0),
            Acc::Min(_) => Acc::Min(None),
            Acc::Max(_) => Acc::Max(None),
            Acc::Mean { .. } => Acc::Mean { sum: 0.0, n: 0 },
            Acc::Top { n, .. } => Acc::Top {
                n: *n,
                items: Vec::new(),
            },
            Acc::Collect(_) => Acc::Collect(Vec::new()),
            Acc::Groups(_) => Acc::Groups(BTreeMap::new()),
        }
    }

    /// Adds one value (read from `input` for groups). A non-number for a
    /// numeric aggregate is an error naming the value.
    pub fn add(&mut self, value: &[u8], input: &str) -> Result<(), String> {
        match self {
            Acc::Count(c) => *c += 1,
            Acc::Sum(s) => *s += number(value)?,
            Acc::Min(m) => {
                let v = number(value)?;
                *m = Some(m.map_or(v, |m| m.min(v)));
            }
            Acc::Max(m) => {
                let v = number(value)?;
                *m = Some(m.map_or(v, |m| m.max(v)));
            }
            Acc::Mean { sum, n } => {
                *sum += number(value)?;
                *n += 1;
            }
            Acc::Top { n, items } => {
                let v = number(value)?;
                let at = items.iter().position(|x| v > *x).unwrap_or(items.len());
                items.insert(at, v);
                items.truncate(*n);
            }
            Acc::Collect(v) => v.push(String::from_utf8_lossy(value).into_owned()),
            Acc::Groups(g) => g
                .entry(input.to_owned())
                .or_default()
                .push(String::from_utf8_lossy(value).into_owned()),
        }
        Ok(())
    }

    /// Merges another accumulator of the same aggregate into this one.
    pub fn merge(&mut self, other: Acc) {
        match (self, other) {
            (Acc::Count(a), Acc::Count(b)) => *a += b,
            (Acc::Sum(a), Acc::Sum(b)) => *a += b,
            (Acc::Min(a), Acc::Min(b)) => *a = [*a, b].into_iter().flatten().reduce(f64::min),
            (Acc::Max(a), Acc::Max(b)) => *a = [*a, b].into_iter().flatten().reduce(f64::max),
            (Acc::Mean { sum, n }, Acc::Mean { sum: s2, n: n2 }) => {
                *sum += s2;
                *n += n2;
            }
            (Acc::Top { n, items }, Acc::Top { items: other, .. }) => {
                items.extend(other);
                items.sort_by(|a, b| b.total_cmp(a));
                items.truncate(*n);
            }
            (Acc::Collect(a), Acc::Collect(b)) => a.extend(b),
            (Acc::Groups(a), Acc::Groups(b)) => {
                for (k, v) in b {
                    a.entry(k).or_default().extend(v);
                }
            }
            _ => debug_assert!(false, "merging different aggregates"),
        }
    }

    /// The aggregate's result as JSON.
    pub fn result(&self) -> Value {
        match self {
            Acc::Count(c) => Value::from(*c),
            Acc::Sum(s) => json_number(*s),
            Acc::Min(m) | Acc::Max(m) => m.map_or(Value::Null, json_number),
            Acc::Mean { sum, n } => {
                if *n == 0 {
                    Value::Null
                } else {
                    json_number(sum / *n as f64)
                }
            }
            Acc::Top { items, .. } => Value::Array(items.iter().map(|f| json_number(*f)).collect()),
            Acc::Collect(v) => Value::from(v.clone()),
            Acc::Groups(g) => serde_json::to_value(g).unwrap_or(Value::Null),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_aggregate_adds_merges_and_reports() {
        for (name, values, want) in [
            ("count", vec!["a", "b"], "2"),
            ("sum", vec!["7", "3", "4"], "14"),
            ("min", vec!["7", "3", "4"], "3"),
            ("max", vec!["7", "3", "4"], "7"),
            ("mean", vec!["1", "2"], "1.5"),
            ("top:2", vec!["1", "9", "5"], "[9,5]"),
            ("collect", vec!["x", "y"], "[\"x\",\"y\"]"),
        ] {
            let mut acc = parse_aggregate(name).unwrap();
            let (first, rest) = values.split_at(1);
            let mut other = acc.empty();
            acc.add(first[0].as_bytes(), "").unwrap();
            for v in rest {
                other.add(v.as_bytes(), "").unwrap();
            }
            acc.merge(other);
            assert_eq!(acc.result().to_string(), want, "{name}");
        }
        assert!(parse_aggregate("top:0").is_err());
        assert!(parse_aggregate("median").is_err());
        assert!(Acc::Sum(0.0)
            .add(b"x", "")
            .unwrap_err()
            .contains("not a number"));
        let mut g = Acc::Groups(BTreeMap::new());
        g.add(b"1", "a").unwrap();
        g.add(b"2", "b").unwrap();
        assert_eq!(g.result().to_string(), r#"{"a":["1"],"b":["2"]}"#);
    }
}
