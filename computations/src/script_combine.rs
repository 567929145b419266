//! `aggregate = "script"`: the user's own aggregate for `window`,
//! `combine` and the other window kinds, written in the topology file in
//! Rhai, as Beam's `CombineFn`. The script defines four functions:
//!
//! | function | returns |
//! | --- | --- |
//! | `create()` | a new, empty accumulator |
//! | `add(acc, value)` | `acc` with one more value (parsed as a `script` computation's values are) |
//! | `merge(a, b)` | one accumulator holding both (sessions merge with it) |
//! | `extract(acc)` | the result emitted (a string as is, anything else as JSON) |
//!
//! An accumulator is any value the language has that JSON can hold (numbers,
//! strings, arrays, maps); it is stored as JSON in the key's state. The
//! functions compute only: they cannot emit, read state or set timers, and
//! each call has the operation budget `max_operations` and the other
//! limits of a script at their defaults (`script::limits`; an accumulator
//! nested deeper than `max_depth` is refused). A call that fails
//! changes nothing: a failing `add` sends its record to `NAME.errors` with
//! the message; a failing `extract` emits `null` as the pane's value and
//! logs the error.

use crate::script::limits::{self, check_depth, Limits};
use crate::script::{compile_source, locate, memory, sandbox, text, value_in};
use millrace_config::{Component, ConfigError};
use rhai::{Dynamic, Engine, Scope, AST};
use serde_json::Value;
use std::path::PathBuf;

/// A script aggregate's accumulator: the value the script works on, kept
/// as the language's own between records, and its JSON, which is what is
/// stored, made once per change. A record's `add` then costs one parse of
/// the stored JSON and one write of the new one; no tree is converted
/// between the language's values and JSON's on the way.
#[derive(Clone, Debug)]
pub struct ScriptAcc {
    value: Dynamic,
    json: String,
}

impl ScriptAcc {
    /// An accumulator read back from its stored JSON.
    pub fn from_json(json: String) -> Result<ScriptAcc, String> {
        let value = serde_json::from_str::<Dynamic>(&json)
            .map_err(|e| format!("stored accumulator: {e}"))?;
        Ok(ScriptAcc { value, json })
    }

    /// What is stored: its JSON text.
    pub fn json(&self) -> &str {
        &self.json
    }

    /// Its JSON as a value.
    pub fn to_value(&self) -> Value {
        serde_json::from_str(&self.json).unwrap_or(Value::Null)
    }
}

impl From<Value> for ScriptAcc {
    fn from(v: Value) -> ScriptAcc {
        let json = v.to_string();
        let value = rhai::serde::to_dynamic(v).unwrap_or(Dynamic::UNIT);
        ScriptAcc { value, json }
    }
}

impl PartialEq for ScriptAcc {
    fn eq(&self, other: &ScriptAcc) -> bool {
        self.json == other.json
    }
}

impl serde::Serialize for ScriptAcc {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.value.serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for ScriptAcc {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ScriptAcc, D::Error> {
        let value = Dynamic::deserialize(d)?;
        let json = serde_json::to_string(&value).map_err(serde::de::Error::custom)?;
        Ok(ScriptAcc { value, json })
    }
}

/// The type of the first part of `v` that JSON does not hold (JSON holds
/// unit, booleans, numbers, strings, characters, blobs as arrays of
/// numbers, and arrays and maps of them): a function pointer or a
/// timestamp would be written as its name and read back as a string.
fn not_json(v: &Dynamic) -> Option<&'static str> {
    if v.is_unit()
        || v.is_bool()
        || v.is_int()
        || v.is_float()
        || v.is_string()
        || v.is_char()
        || v.is_blob()
    {
        return None;
    }
    if let Some(a) = v.read_lock::<rhai::Array>() {
        return a.iter().find_map(not_json);
    }
    if let Some(m) = v.read_lock::<rhai::Map>() {
        return m.values().find_map(not_json);
    }
    Some(v.type_name())
}

/// The four functions, in the order the table above lists them, with their
/// parameter counts.
const FUNCTIONS: [(&str, usize, &str); 4] = [
    ("create", 0, "()"),
    ("add", 2, "(acc, value)"),
    ("merge", 2, "(a, b)"),
    ("extract", 1, "(acc)"),
];

/// A compiled aggregate script, shared by every shard of its component.
pub struct ScriptCombine {
    engine: Engine,
    ast: AST,
    origin: (PathBuf, usize),
    /// How deep an accumulator may nest (`max_depth`).
    depth: usize,
}

impl std::fmt::Debug for ScriptCombine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ScriptCombine({}:{})",
            self.origin.0.display(),
            self.origin.1
        )
    }
}

impl ScriptCombine {
    /// Compiles the aggregate of component `c`, or says what is wrong.
    pub fn compile(
        c: &Component,
        script: Option<&String>,
        script_file: Option<&PathBuf>,
        max_operations: Option<u64>,
    ) -> Result<ScriptCombine, ConfigError> {
        let src = compile_source(c, script, script_file)?;
        for (name, want, what) in FUNCTIONS {
            match src.ast.iter_functions().find(|f| f.name == name) {
                Some(f) if f.params.len() == want => {}
                Some(f) => {
                    return Err(c.options.error(
                        Some(src.key),
                        format!(
                            "`fn {name}` takes {want} parameters {what}, not {}",
                            f.params.len()
                        ),
                    ))
                }
                None => {
                    return Err(c.options.error(
                        Some(src.key),
                        format!(
                            "an aggregate script defines `fn create()`, `fn add(acc, value)`, \
                             `fn merge(a, b)` and `fn extract(acc)`; `fn {name}{what}` is missing"
                        ),
                    ))
                }
            }
        }
        let limits = Limits::with_operations(max_operations);
        Ok(ScriptCombine {
            engine: sandbox(&limits),
            depth: limits.depth,
            ast: src.ast,
            origin: src.origin,
        })
    }

    fn call(&self, name: &str, args: impl rhai::FuncArgs) -> Result<Dynamic, String> {
        memory::start_call();
        limits::start_call();
        self.engine
            .call_fn::<Dynamic>(&mut Scope::new(), &self.ast, name, args)
            .map_err(|e| format!("{name}: {}", locate(&self.origin, &e)))
    }

    /// `v`, a function's result, as an accumulator, or why it cannot be one.
    fn stored(&self, name: &str, v: Dynamic) -> Result<ScriptAcc, String> {
        check_depth(&v, self.depth, "the accumulator").map_err(|e| format!("{name}: {e}"))?;
        if let Some(what) = not_json(&v) {
            return Err(format!(
                "{name}: the accumulator cannot be stored as JSON: it holds a {what}"
            ));
        }
        let json = serde_json::to_string(&v)
            .map_err(|e| format!("{name}: the accumulator cannot be stored as JSON: {e}"))?;
        Ok(ScriptAcc { value: v, json })
    }

    /// Runs `f` on the accumulator itself (not a copy) and replaces it with
    /// the result; on an error it is read back from its JSON, as it was.
    fn update(
        &self,
        acc: &mut ScriptAcc,
        f: impl FnOnce(Dynamic) -> Result<Dynamic, String>,
        name: &str,
    ) -> Result<(), String> {
        let v = std::mem::take(&mut acc.value);
        match f(v).and_then(|v| self.stored(name, v)) {
            Ok(new) => {
                *acc = new;
                Ok(())
            }
            Err(e) => {
                acc.value = serde_json::from_str(&acc.json).unwrap_or_default();
                Err(e)
            }
        }
    }

    /// `create()`.
    pub fn create(&self) -> Result<ScriptAcc, String> {
        let v = self.call("create", ())?;
        self.stored("create", v)
    }

    /// `add(acc, value)`. On an error `acc` is unchanged.
    pub fn add(&self, acc: &mut ScriptAcc, value: &[u8]) -> Result<(), String> {
        self.update(acc, |v| self.call("add", (v, value_in(value))), "add")
    }

    /// `merge(a, b)` into `a`. On an error `a` is unchanged.
    pub fn merge(&self, a: &mut ScriptAcc, b: ScriptAcc) -> Result<(), String> {
        self.update(a, |v| self.call("merge", (v, b.value)), "merge")
    }

    /// `extract(acc)`, as JSON: a string result is a JSON string.
    pub fn extract(&self, acc: &ScriptAcc) -> Result<Value, String> {
        let v = self.call("extract", (acc.value.clone(),))?;
        if v.is_string() {
            return text(&v).map(Value::from);
        }
        check_depth(&v, self.depth, "the result").map_err(|e| format!("extract: {e}"))?;
        if let Some(what) = not_json(&v) {
            return Err(format!(
                "extract: the result cannot be written as JSON: it holds a {what}"
            ));
        }
        serde_json::to_value(&v)
            .map_err(|e| format!("extract: the result cannot be written as JSON: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use crate::test_support::{computation, values};
    use millrace_engine::testing::Harness;
    use millrace_engine::{Computation, ComputationError};
    use serde_json::{json, Value};

    /// A mean kept as sum and count, which refuses what is not an integer.
    const MEAN: &str = r#"
aggregate = "script"
script = """
fn create() { #{ sum: 0, n: 0 } }
fn add(acc, value) {
    if type_of(value) != "i64" { throw "not a number: " + value; }
    acc.sum += value;
    acc.n += 1;
    acc
}
fn merge(a, b) { #{ sum: a.sum + b.sum, n: a.n + b.n } }
fn extract(acc) { #{ sum: acc.sum, n: acc.n } }
"""
"#;

    fn sessions_of_mean() -> Box<dyn Computation> {
        computation(
            "window",
            &format!("window = {{ kind = \"session\", gap = \"15us\" }}\n{MEAN}"),
        )
        .expect("options")
    }

    fn json_values(outs: Vec<millrace_engine::testing::Output>) -> Vec<Value> {
        values(outs)
            .iter()
            .map(|v| serde_json::from_str(v).expect("JSON"))
            .collect()
    }

    #[test]
    fn a_script_aggregate_merges_sessions_and_survives_a_restart() {
        let dir = tempfile::tempdir().expect("dir");
        let mut h = Harness::open(dir.path(), sessions_of_mean(), &[]).expect("harness");
        assert!(h.process("k", "4", 0).unwrap().is_empty());
        assert!(h.process("k", "6", 20).unwrap().is_empty());
        // The accumulators are stored as JSON and come back after a crash.
        let mut h = h.restart(sessions_of_mean()).expect("restart");
        // [10, 25) bridges [0, 15) and [20, 35): one session, merged by the
        // script's `merge`.
        assert!(h.process("k", "5", 10).unwrap().is_empty());
        let out = json_values(h.advance_watermark(35).unwrap());
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0]["window"], json!({"start": 0, "end": 35}));
        assert_eq!(out[0]["value"], json!({"sum": 15, "n": 3}));
    }

    #[test]
    fn a_failing_add_sends_its_record_to_errors_and_changes_nothing() {
        let dir = tempfile::tempdir().expect("dir");
        let make = || computation("combine", MEAN).expect("options");
        let mut h = Harness::open(dir.path(), make(), &[]).expect("harness");
        assert_eq!(
            json_values(h.process("k", "2", 0).unwrap()),
            [json!({"sum": 2, "n": 1})]
        );
        match h.process("k", "two", 1) {
            Err(ComputationError::BadRecord(why)) => {
                assert!(why.contains("not a number: two"), "{why}");
                assert!(why.contains("t.toml:"), "names where: {why}");
            }
            other => panic!("expected a bad record, got {other:?}"),
        }
        assert_eq!(
            json_values(h.process("k", "3", 2).unwrap()),
            [json!({"sum": 5, "n": 2})],
            "the refused value left the accumulator as it was"
        );
    }

    /// What JSON cannot hold (a function pointer) is refused as an
    /// accumulator, naming it, and the one before stays; so does one that
    /// a failing call left half changed.
    #[test]
    fn an_accumulator_json_cannot_hold_is_refused_and_the_last_one_stays() {
        let dir = tempfile::tempdir().expect("dir");
        let make = || {
            computation(
                "combine",
                r#"
aggregate = "script"
script = """
fn create() { #{ sum: 0 } }
fn add(acc, value) {
    acc.sum += value;
    if value == 7 { acc.f = Fn("create"); }
    if value == 8 { throw "no eights"; }
    if value == 9 { acc.b = blob(2, 1); acc.sum -= 9; }
    acc
}
fn merge(a, b) { #{ sum: a.sum + b.sum } }
fn extract(acc) { acc.sum }
"""
"#,
            )
            .expect("options")
        };
        let mut h = Harness::open(dir.path(), make(), &[]).expect("harness");
        assert_eq!(json_values(h.process("k", "2", 0).unwrap()), [json!(2)]);
        for (bad, why) in [
            ("7", "cannot be stored as JSON: it holds a Fn"),
            ("8", "no eights"),
        ] {
            match h.process("k", bad, 1) {
                Err(ComputationError::BadRecord(m)) => assert!(m.contains(why), "{m}"),
                other => panic!("expected a bad record, got {other:?}"),
            }
        }
        assert_eq!(json_values(h.process("k", "3", 2).unwrap()), [json!(5)]);
        // A blob is kept, as an array of numbers.
        assert_eq!(json_values(h.process("k", "9", 2).unwrap()), [json!(5)]);
        // And after a restart, from what was stored.
        let mut h = h.restart(make()).expect("restart");
        assert_eq!(json_values(h.process("k", "1", 3).unwrap()), [json!(6)]);
    }

    #[test]
    fn a_windows_top_ranks_whole_elements_by_a_score_with_ties_by_text() {
        let dir = tempfile::tempdir().expect("dir");
        let make = || {
            computation(
                "window",
                "window = { kind = \"session\", gap = \"10us\" }\n\
                 aggregate = \"top:2\"\nby = \"json:/count\"",
            )
            .expect("options")
        };
        let mut h = Harness::open(dir.path(), make(), &[]).expect("harness");
        for (value, ts) in [
            (r##"{"tag":"#b","count":5}"##, 0),
            (r##"{"tag":"#c","count":1}"##, 30),
            (r##"{"tag":"#a","count":5}"##, 15),
        ] {
            h.process("#", value, ts).unwrap();
        }
        // A bad score is refused, not ranked.
        assert!(matches!(
            h.process("#", r##"{"tag":"#z"}"##, 16),
            Err(ComputationError::BadRecord(_))
        ));
        // Sessions [0,10), [15,25) and [30,40) stay apart until [8,18)
        // joins the first two and [24,34) all three: their tops merge.
        h.process("#", r##"{"tag":"#d","count":2}"##, 8).unwrap();
        h.process("#", r##"{"tag":"#e","count":0}"##, 24).unwrap();
        let out = json_values(h.advance_watermark(40).unwrap());
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0]["window"], json!({"start": 0, "end": 40}));
        assert_eq!(
            out[0]["value"],
            json!([{"tag": "#a", "count": 5}, {"tag": "#b", "count": 5}]),
            "score first, then the element's text"
        );
    }

    #[test]
    fn an_aggregate_script_is_checked_when_the_topology_is_loaded() {
        let err = |kind: &str, options: &str| match computation(kind, options) {
            Ok(_) => panic!("accepted: {options}"),
            Err(e) => e.to_string(),
        };
        let missing = err(
            "window",
            "window = { kind = \"fixed\", size = \"1s\" }\naggregate = \"script\"\n\
             script = \"fn create() { 0 }\\nfn add(a, v) { a + v }\\nfn merge(a, b) { a + b }\"",
        );
        assert!(
            missing.contains("`fn extract(acc)` is missing"),
            "{missing}"
        );
        let arity = err(
            "combine",
            "aggregate = \"script\"\nscript = \"fn create() { 0 }\\nfn add(a) { a }\\n\
             fn merge(a, b) { a + b }\\nfn extract(a) { a }\"",
        );
        assert!(arity.contains("`fn add` takes 2 parameters"), "{arity}");
        let create = err(
            "combine",
            "aggregate = \"script\"\nscript = \"fn create() { throw \\\"no\\\" }\\n\
             fn add(a, v) { a }\\nfn merge(a, b) { a }\\nfn extract(a) { a }\"",
        );
        assert!(create.contains("create"), "{create}");
        let stray = err(
            "combine",
            "aggregate = \"sum\"\nscript = \"fn create() { 0 }\"",
        );
        assert!(stray.contains("needs `aggregate = \"script\"`"), "{stray}");
        let by = err("combine", "aggregate = \"count\"\nby = \"json:/n\"");
        assert!(by.contains("goes with `top:N`"), "{by}");
    }
}
