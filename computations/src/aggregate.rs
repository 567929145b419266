//! Aggregates shared by `window`, `combine`, `top_per_key` and `cogroup`:
//! count, sum, min, max, mean, top-N (of numbers, or of whole elements
//! ranked by a score), collect, groups by input, and the user's own
//! ([`ScriptCombine`]). An [`Aggregate`] says how values go into an
//! accumulator; an [`Acc`] is the accumulator, the data kept in state.

use crate::script_combine::{ScriptAcc, ScriptCombine};
use bytes::Bytes;
use millrace_config::{Component, ConfigError, KeyExtractor};
use millrace_engine::extract_key;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

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
    /// The N elements with the largest scores, in [`rank_order`].
    Ranked {
        /// N.
        n: usize,
        /// `(score, element)`, best first.
        items: Vec<(f64, String)>,
    },
    /// A script aggregate's accumulator.
    Value(ScriptAcc),
}

/// The order of ranked elements: score descending, then the element's text
/// ascending, so that ties are broken the same way every time.
pub(crate) fn rank_order(a: (f64, &str), b: (f64, &str)) -> Ordering {
    b.0.total_cmp(&a.0).then_with(|| a.1.cmp(b.1))
}

/// A kept element as output: JSON as it is, anything else as a string.
pub(crate) fn element_json(e: &str) -> Value {
    serde_json::from_str(e).unwrap_or_else(|_| Value::from(e))
}

/// How values go into an accumulator.
#[derive(Debug, Clone)]
pub enum Aggregate {
    /// A built-in: its accumulator adds, merges and reports by itself.
    Builtin(Acc),
    /// `top:N` with `by`: the N elements with the largest scores (read from
    /// each element with `by`), kept whole (Beam's `Top.largestPerKey`).
    TopBy {
        /// N.
        n: usize,
        /// Where the score is.
        by: KeyExtractor,
    },
    /// The user's own, with the script's initial accumulator.
    Script(Arc<ScriptCombine>, ScriptAcc),
}

/// Where a component's aggregate comes from: the options `aggregate`, `by`,
/// `script`, `script_file` and `max_operations`, as the kind names them.
pub(crate) struct AggregateSpec<'a> {
    /// The option's name (`aggregate` or `op`) and its value.
    pub name: (&'a str, &'a str),
    pub by: Option<&'a String>,
    pub script: Option<&'a String>,
    pub script_file: Option<&'a PathBuf>,
    pub max_operations: Option<u64>,
}

impl Aggregate {
    /// Parses the aggregate of component `c`.
    pub(crate) fn parse(c: &Component, spec: AggregateSpec<'_>) -> Result<Aggregate, ConfigError> {
        let (option, name) = spec.name;
        let err = |key: &str, m: String| c.options.error(Some(key), m);
        let scripted = spec.script.is_some() || spec.script_file.is_some();
        if name == "script" {
            if spec.by.is_some() {
                return Err(err("by", "`by` goes with `top:N`, not a script".into()));
            }
            let f = ScriptCombine::compile(c, spec.script, spec.script_file, spec.max_operations)?;
            let initial = f.create().map_err(|m| {
                err(
                    if spec.script.is_some() {
                        "script"
                    } else {
                        "script_file"
                    },
                    m,
                )
            })?;
            return Ok(Aggregate::Script(Arc::new(f), initial));
        }
        if scripted || spec.max_operations.is_some() {
            let key = if spec.script.is_some() {
                "script"
            } else if spec.script_file.is_some() {
                "script_file"
            } else {
                "max_operations"
            };
            return Err(err(key, format!("`{key}` needs `{option} = \"script\"`")));
        }
        let acc = parse_aggregate(name).map_err(|m| err(option, m))?;
        match (spec.by, acc) {
            (None, acc) => Ok(Aggregate::Builtin(acc)),
            (Some(by), Acc::Top { n, .. }) => Ok(Aggregate::TopBy {
                n,
                by: KeyExtractor::parse(by, None).map_err(|m| err("by", m))?,
            }),
            (Some(_), _) => Err(err(
                "by",
                format!("`by` (a score) goes with `top:N`, not `{name}`"),
            )),
        }
    }

    /// A new, empty accumulator.
    pub fn empty(&self) -> Acc {
        match self {
            Aggregate::Builtin(acc) => acc.empty(),
            Aggregate::TopBy { n, .. } => Acc::Ranked {
                n: *n,
                items: Vec::new(),
            },
            Aggregate::Script(_, initial) => Acc::Value(initial.clone()),
        }
    }

    /// Whether values are kept by the input they came on (cogroup, join).
    pub fn by_input(&self) -> bool {
        matches!(self, Aggregate::Builtin(Acc::Groups(_)))
    }

    /// Adds the value of record `(key, value)`, which came on `input`. On
    /// an error `acc` is unchanged.
    pub fn add(
        &self,
        acc: &mut Acc,
        key: &Bytes,
        value: &Bytes,
        input: &str,
    ) -> Result<(), String> {
        match (self, acc) {
            (Aggregate::TopBy { by, .. }, Acc::Ranked { n, items }) => {
                let score = extract_key(by, key, value).map_err(|e| format!("by: {e}"))?;
                let score = number(&score).map_err(|e| format!("by: {e}"))?;
                let element = String::from_utf8_lossy(value).into_owned();
                let at = items.partition_point(|(s, e)| {
                    rank_order((*s, e), (score, &element)) == Ordering::Less
                });
                items.insert(at, (score, element));
                items.truncate(*n);
                Ok(())
            }
            (Aggregate::Script(f, _), Acc::Value(v)) => f.add(v, value),
            (_, acc) => acc.add(value, input),
        }
    }

    /// Merges `other` into `acc` (sessions that merge). On an error `acc`
    /// is unchanged.
    pub fn merge(&self, acc: &mut Acc, other: Acc) -> Result<(), String> {
        match (self, acc, other) {
            (Aggregate::Script(f, _), Acc::Value(a), Acc::Value(b)) => f.merge(a, b),
            (_, acc, other) => {
                acc.merge(other);
                Ok(())
            }
        }
    }

    /// The result as JSON. A script's `extract` that fails gives `null`
    /// (and is logged).
    pub fn result(&self, acc: &Acc) -> Value {
        match (self, acc) {
            (Aggregate::Script(f, _), Acc::Value(v)) => f.extract(v).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "the aggregate script's extract failed; the pane's value is null");
                Value::Null
            }),
            (_, acc) => acc.result(),
        }
    }

    /// Appends the result as JSON text, as `result().to_string()` would.
    pub fn write_result(&self, acc: &Acc, out: &mut String) {
        match self {
            Aggregate::Script(..) => out.push_str(&self.result(acc).to_string()),
            _ => acc.write_result(out),
        }
    }
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
            Acc::Ranked { n, .. } => Acc::Ranked {
                n: *n,
                items: Vec::new(),
            },
            // Only its script knows what empty is (see `Aggregate::empty`).
            Acc::Value(_) => Acc::Value(ScriptAcc::from(Value::Null)),
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
            Acc::Ranked { .. } => return Err("a ranked top needs its score (`by`)".into()),
            Acc::Value(_) => return Err("a script's accumulator needs its script".into()),
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
            (Acc::Ranked { n, items }, Acc::Ranked { items: other, .. }) => {
                items.extend(other);
                items.sort_by(|a, b| rank_order((a.0, &a.1), (b.0, &b.1)));
                items.truncate(*n);
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
            Acc::Ranked { items, .. } => {
                Value::Array(items.iter().map(|(_, e)| element_json(e)).collect())
            }
            Acc::Value(v) => v.to_value(),
        }
    }
}

/// Reads the binary forms written by [`Acc::encode`] and the window's
/// pane codec; every read checks the length left.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.buf.len() < n {
            return Err(format!(
                "truncated: {n} bytes wanted, {} left",
                self.buf.len()
            ));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let b = self.take(N)?;
        let mut a = [0; N];
        a.copy_from_slice(b);
        Ok(a)
    }

    pub fn u8(&mut self) -> Result<u8, String> {
        Ok(self.array::<1>()?[0])
    }

    pub fn u32(&mut self) -> Result<u32, String> {
        self.array().map(u32::from_le_bytes)
    }

    pub fn u64(&mut self) -> Result<u64, String> {
        self.array().map(u64::from_le_bytes)
    }

    pub fn i64(&mut self) -> Result<i64, String> {
        self.array().map(i64::from_le_bytes)
    }

    pub fn f64(&mut self) -> Result<f64, String> {
        self.array().map(f64::from_le_bytes)
    }

    /// A length (u32) that must not exceed the bytes left (each item takes one at least).
    pub fn len(&mut self) -> Result<usize, String> {
        let n = self.u32()? as usize;
        if n > self.buf.len() {
            return Err(format!(
                "length {n} exceeds the {} bytes left",
                self.buf.len()
            ));
        }
        Ok(n)
    }

    pub fn string(&mut self) -> Result<String, String> {
        let n = self.len()?;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| "text is not UTF-8".to_owned())
    }
}

/// Appends the binary helpers' length-prefixed string.
pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

impl Acc {
    /// Appends the binary form: a tag byte, then the values, little-endian.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        fn opt(out: &mut Vec<u8>, v: Option<f64>) {
            out.push(u8::from(v.is_some()));
            out.extend_from_slice(&v.unwrap_or(0.0).to_le_bytes());
        }
        match self {
            Acc::Count(c) => {
                out.push(0);
                out.extend_from_slice(&c.to_le_bytes());
            }
            Acc::Sum(s) => {
                out.push(1);
                out.extend_from_slice(&s.to_le_bytes());
            }
            Acc::Min(m) => {
                out.push(2);
                opt(out, *m);
            }
            Acc::Max(m) => {
                out.push(3);
                opt(out, *m);
            }
            Acc::Mean { sum, n } => {
                out.push(4);
                out.extend_from_slice(&sum.to_le_bytes());
                out.extend_from_slice(&n.to_le_bytes());
            }
            Acc::Top { n, items } => {
                out.push(5);
                out.extend_from_slice(&(*n as u32).to_le_bytes());
                out.extend_from_slice(&(items.len() as u32).to_le_bytes());
                for f in items {
                    out.extend_from_slice(&f.to_le_bytes());
                }
            }
            Acc::Collect(v) => {
                out.push(6);
                out.extend_from_slice(&(v.len() as u32).to_le_bytes());
                v.iter().for_each(|s| put_str(out, s));
            }
            Acc::Groups(g) => {
                out.push(7);
                out.extend_from_slice(&(g.len() as u32).to_le_bytes());
                for (k, v) in g {
                    put_str(out, k);
                    out.extend_from_slice(&(v.len() as u32).to_le_bytes());
                    v.iter().for_each(|s| put_str(out, s));
                }
            }
            Acc::Ranked { n, items } => {
                out.push(8);
                out.extend_from_slice(&(*n as u32).to_le_bytes());
                out.extend_from_slice(&(items.len() as u32).to_le_bytes());
                for (score, e) in items {
                    out.extend_from_slice(&score.to_le_bytes());
                    put_str(out, e);
                }
            }
            Acc::Value(v) => {
                out.push(9);
                put_str(out, v.json());
            }
        }
    }

    /// Reads what [`Acc::encode`] wrote.
    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Acc, String> {
        fn opt(r: &mut Reader<'_>) -> Result<Option<f64>, String> {
            let some = r.u8()? != 0;
            let v = r.f64()?;
            Ok(some.then_some(v))
        }
        fn strings(r: &mut Reader<'_>) -> Result<Vec<String>, String> {
            (0..r.len()?).map(|_| r.string()).collect()
        }
        Ok(match r.u8()? {
            0 => Acc::Count(r.u64()?),
            1 => Acc::Sum(r.f64()?),
            2 => Acc::Min(opt(r)?),
            3 => Acc::Max(opt(r)?),
            4 => Acc::Mean {
                sum: r.f64()?,
                n: r.u64()?,
            },
            5 => {
                let n = r.u32()? as usize;
                let items = (0..r.len()?).map(|_| r.f64()).collect::<Result<_, _>>()?;
                Acc::Top { n, items }
            }
            6 => Acc::Collect(strings(r)?),
            7 => {
                let mut g = BTreeMap::new();
                for _ in 0..r.len()? {
                    let k = r.string()?;
                    g.insert(k, strings(r)?);
                }
                Acc::Groups(g)
            }
            8 => {
                let n = r.u32()? as usize;
                let items = (0..r.len()?)
                    .map(|_| Ok((r.f64()?, r.string()?)))
                    .collect::<Result<_, String>>()?;
                Acc::Ranked { n, items }
            }
            9 => Acc::Value(ScriptAcc::from_json(r.string()?)?),
            t => return Err(format!("unknown aggregate tag {t}")),
        })
    }

    /// Appends the result as JSON text, as `result().to_string()` would.
    pub fn write_result(&self, out: &mut String) {
        match self {
            // The common case without building a `Value`.
            Acc::Count(c) => out.push_str(itoa::Buffer::new().format(*c)),
            other => out.push_str(&other.result().to_string()),
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

    #[test]
    fn every_aggregate_survives_its_binary_form() {
        let mut groups = BTreeMap::new();
        groups.insert("left".to_owned(), vec!["a".to_owned(), "é".to_owned()]);
        groups.insert("right".to_owned(), Vec::new());
        for acc in [
            Acc::Count(7),
            Acc::Sum(-2.5),
            Acc::Min(None),
            Acc::Max(Some(3.0)),
            Acc::Mean { sum: 3.0, n: 2 },
            Acc::Top {
                n: 3,
                items: vec![9.0, 5.5],
            },
            Acc::Collect(vec!["x".to_owned(), String::new()]),
            Acc::Groups(groups),
            Acc::Ranked {
                n: 2,
                items: vec![
                    (12.0, r##"{"tag":"#a"}"##.to_owned()),
                    (1.5, "b".to_owned()),
                ],
            },
            Acc::Value(ScriptAcc::from(
                serde_json::json!({"sum": 3, "seen": ["x"]}),
            )),
        ] {
            let mut b = Vec::new();
            acc.encode(&mut b);
            let mut r = Reader::new(&b);
            assert_eq!(Acc::decode(&mut r).unwrap(), acc);
            assert!(r.is_empty());
            let mut text = String::new();
            acc.write_result(&mut text);
            assert_eq!(text, acc.result().to_string());
            // Every truncation is an error, never a panic.
            for cut in 0..b.len() {
                assert!(
                    Acc::decode(&mut Reader::new(&b[..cut])).is_err(),
                    "{acc:?} cut at {cut}"
                );
            }
        }
    }
}
