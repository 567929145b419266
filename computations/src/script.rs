//! `script`: a computation written in the topology file, in
//! [Rhai](https://rhai.rs), a small embedded language for Rust hosts.
//!
//! A script defines `fn process(key, value, ts, input)`, called once per
//! record, and may define `fn on_timer(key, tag, time, domain)`, called for
//! each timer that fires, and `fn on_expire(key, state)`, called when a key's
//! state expires (`state_ttl`). From them it reads and changes the current
//! key's state, emits records, sets and deletes timers, and reads the
//! watermark and the clock: the functions below, which the engine applies to
//! the computation's `Context` after each call. A call that fails (a script
//! error, the operation budget spent, an emit into the past) changes nothing:
//! its record goes to `NAME.errors` with the message. State, productions and
//! timers commit with the rest of the turn, exactly once.
//!
//! | function | does |
//! | --- | --- |
//! | `state()` | the current key's state (`()` when none) |
//! | `set_state(v)`, `clear_state()` | replace or clear it (any value: numbers, strings, arrays, maps) |
//! | `emit(key, value)`, `emit(key, value, ts)` | a record on the default output, at the input's event time or a later one |
//! | `emit_to(output, key, value[, ts])` | on a named output declared in `outputs` |
//! | `set_timer(tag, "event" \| "processing", time)`, `delete_timer(tag)` | one timer per key and tag |
//! | `watermark()`, `now()`, `key()` | input low watermark, processing time (microseconds), current key |
//!
//! Values arrive parsed: a record value that is JSON arrives as the
//! language's maps, arrays, numbers and strings; anything else as a string.
//! What a script emits leaves as is when it is a string, as JSON otherwise.
//! State is stored as a version byte and JSON. Scripts cannot read files,
//! use the network or start processes (Rhai has no such functions, and
//! modules are compiled out); `eval` and `this` are disabled.
//!
//! Every call is bounded ([`limits`]): operations, memory, string, array
//! and map sizes, the nesting of values, call depth, and what it emits. A
//! call past a limit fails as any other, with the limit's key and the
//! script's line in its message.

pub(crate) mod limits;
pub(crate) mod memory;
mod source;
mod values;

use bytes::Bytes;
use limits::{check_depth, Limits, MAX_DEPTH_CEILING};
use millrace_config::{Component, ConfigError, HumanDuration};
use millrace_engine::{
    per_shard, Computation, ComputationError, Context, Record, Registry, TimeDomain, Timer,
};
use parking_lot::Mutex;
use rhai::{Dynamic, Engine, EvalAltResult, Scope, AST};
use serde::Deserialize;
pub(crate) use source::{compile_source, locate, Source};
use std::path::PathBuf;
use std::sync::Arc;
#[cfg(test)]
use values::STATE_INT;
use values::{bytes_of, decode_state, encode_state};
pub(crate) use values::{text, value_in};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    /// The script itself (a TOML multi-line string)...
    script: Option<String>,
    /// ...or a file holding it, relative to the topology file.
    script_file: Option<PathBuf>,
    /// Named outputs the script emits to with `emit_to`.
    #[serde(default)]
    outputs: Vec<String>,
    /// Operations one call may run before it is stopped (an error).
    max_operations: Option<u64>,
    /// The other limits of one call (see [`limits`]).
    max_memory_bytes: Option<u64>,
    max_string_bytes: Option<usize>,
    max_array_len: Option<usize>,
    max_map_len: Option<usize>,
    max_depth: Option<usize>,
    max_emits: Option<usize>,
    max_emit_bytes: Option<usize>,
    /// A key whose state is untouched for this long, in event time, has
    /// `on_expire` called (if defined) and its state cleared.
    state_ttl: Option<HumanDuration>,
}

/// The timer tag of the state's expiry (user tags cannot start with NUL).
const TTL_TAG: &[u8] = b"\0ttl";

/// What a compiled script needs, shared by its shards.
struct Spec {
    ast: AST,
    outputs: Vec<String>,
    limits: Limits,
    ttl: Option<i64>,
    has_on_timer: bool,
    has_on_expire: bool,
    /// Where the script is, for error messages: `FILE:LINE` of its first line.
    origin: (PathBuf, usize),
}

/// What one call of the script did, applied to the context afterwards.
#[derive(Default)]
struct Call {
    key: rhai::ImmutableString,
    state: Dynamic,
    state_changed: bool,
    emits: Vec<Emitted>,
    /// Bytes of the keys and values in `emits`.
    emitted_bytes: usize,
    timers: Vec<TimerOp>,
    watermark: i64,
    now: i64,
    /// Emitted records may not be older than this (the input's event time).
    min_ts: i64,
}

struct Emitted {
    output: Option<String>,
    key: Bytes,
    value: Bytes,
    ts: i64,
}

enum TimerOp {
    Set(String, TimeDomain, i64),
    Delete(String),
}

type Shared = Arc<Mutex<Call>>;

/// One shard's script: its own engine (whose functions reach this shard's
/// call state) over the shared compiled script.
pub struct Script {
    spec: Arc<Spec>,
    engine: Engine,
    call: Shared,
    scope: Scope<'static>,
    /// The name of the input the last record came on (shared, not copied,
    /// while it stays the same).
    input: rhai::ImmutableString,
}

impl Clone for Script {
    /// A fresh engine for another shard.
    fn clone(&self) -> Self {
        Script::new(Arc::clone(&self.spec))
    }
}

type RhaiResult<T> = Result<T, Box<EvalAltResult>>;

fn fail<T>(msg: impl Into<String>) -> RhaiResult<T> {
    Err(msg.into().into())
}

/// An engine without host functions, bounded and sandboxed: for scripts
/// that only compute (a user's aggregate).
pub(crate) fn sandbox(limits: &Limits) -> Engine {
    engine(None, Vec::new(), limits)
}

/// An engine with the host functions, bounded and sandboxed.
fn engine(call: Option<Shared>, outputs: Vec<String>, limits: &Limits) -> Engine {
    let mut e = Engine::new();
    limits.bound(&mut e);
    e.on_print(|s| tracing::info!(target: "millrace::script", "{s}"));
    e.on_debug(|s, _, pos| tracing::debug!(target: "millrace::script", %pos, "{s}"));
    let Some(call) = call else { return e };
    let c = Arc::clone(&call);
    e.register_fn("state", move || c.lock().state.clone());
    let c = Arc::clone(&call);
    let depth = limits.depth;
    e.register_fn("set_state", move |v: Dynamic| -> RhaiResult<()> {
        // Refused here, the state stays readable: JSON reads back only so
        // deep.
        check_depth(&v, depth, "set_state")?;
        let mut g = c.lock();
        g.state = v;
        g.state_changed = true;
        Ok(())
    });
    let c = Arc::clone(&call);
    e.register_fn("clear_state", move || {
        let mut g = c.lock();
        g.state = Dynamic::UNIT;
        g.state_changed = true;
    });
    let c = Arc::clone(&call);
    e.register_fn("key", move || c.lock().key.clone());
    let c = Arc::clone(&call);
    e.register_fn("watermark", move || c.lock().watermark);
    let c = Arc::clone(&call);
    e.register_fn("now", move || c.lock().now);
    let (max_emits, max_emit_bytes) = (limits.emits, limits.emit_bytes);
    let emit = {
        let call = Arc::clone(&call);
        Arc::new(
            move |output: Option<String>,
                  k: Dynamic,
                  v: Dynamic,
                  ts: Option<i64>|
                  -> RhaiResult<()> {
                let mut g = call.lock();
                let ts = ts.unwrap_or(g.min_ts);
                if ts < g.min_ts {
                    return fail(format!(
                        "emit at event time {ts}, before the input's ({})",
                        g.min_ts
                    ));
                }
                if let Some(o) = &output {
                    if !outputs.contains(o) {
                        return fail(format!(
                            "emit_to(\"{o}\", ..): no such output; declare it in `outputs`"
                        ));
                    }
                }
                if g.emits.len() >= max_emits {
                    return fail(format!(
                        "emit: the call emitted more than {max_emits} records (max_emits)"
                    ));
                }
                check_depth(&k, depth, "emit")?;
                check_depth(&v, depth, "emit")?;
                let (key, value) = (bytes_of(&k)?, bytes_of(&v)?);
                g.emitted_bytes = g.emitted_bytes.saturating_add(key.len() + value.len());
                if g.emitted_bytes > max_emit_bytes {
                    return fail(format!(
                        "emit: the call emitted more than {max_emit_bytes} bytes (max_emit_bytes)"
                    ));
                }
                g.emits.push(Emitted {
                    output,
                    key,
                    value,
                    ts,
                });
                Ok(())
            },
        )
    };
    let f = Arc::clone(&emit);
    e.register_fn("emit", move |k: Dynamic, v: Dynamic| f(None, k, v, None));
    let f = Arc::clone(&emit);
    e.register_fn("emit", move |k: Dynamic, v: Dynamic, ts: i64| {
        f(None, k, v, Some(ts))
    });
    let f = Arc::clone(&emit);
    e.register_fn("emit_to", move |o: &str, k: Dynamic, v: Dynamic| {
        f(Some(o.to_owned()), k, v, None)
    });
    let f = Arc::clone(&emit);
    e.register_fn(
        "emit_to",
        move |o: &str, k: Dynamic, v: Dynamic, ts: i64| f(Some(o.to_owned()), k, v, Some(ts)),
    );
    let c = Arc::clone(&call);
    e.register_fn(
        "set_timer",
        move |tag: &str, domain: &str, time: i64| -> RhaiResult<()> {
            let d = match domain {
                "event" => TimeDomain::EventTime,
                "processing" => TimeDomain::ProcessingTime,
                other => {
                    return fail(format!(
                        "set_timer: domain \"{other}\" is neither \"event\" nor \"processing\""
                    ))
                }
            };
            if tag.starts_with('\0') {
                return fail("set_timer: tags starting with NUL are the engine's");
            }
            c.lock().timers.push(TimerOp::Set(tag.to_owned(), d, time));
            Ok(())
        },
    );
    let c = Arc::clone(&call);
    e.register_fn("delete_timer", move |tag: &str| {
        c.lock().timers.push(TimerOp::Delete(tag.to_owned()));
    });
    e
}

impl Script {
    fn new(spec: Arc<Spec>) -> Self {
        let call: Shared = Arc::default();
        let engine = engine(Some(Arc::clone(&call)), spec.outputs.clone(), &spec.limits);
        Script {
            spec,
            engine,
            call,
            scope: Scope::new(),
            input: rhai::ImmutableString::new(),
        }
    }

    /// Where an error in the script is, for its message.
    fn locate(&self, e: &EvalAltResult) -> String {
        locate(&self.spec.origin, e)
    }

    /// The current key's state and when it was last touched.
    fn load(ctx: &mut Context<'_>) -> Result<(Dynamic, Option<i64>), ComputationError> {
        match ctx.state()? {
            None => Ok((Dynamic::UNIT, None)),
            Some(b) => decode_state(&b).map_err(ComputationError::BadRecord),
        }
    }

    /// Runs `f` of the script over `state` for `key`; applies what it did
    /// to `ctx` only if it succeeded (the state stored as touched at
    /// `touched`).
    fn run(
        &mut self,
        ctx: &mut Context<'_>,
        key: &rhai::ImmutableString,
        (state, touched): (Dynamic, Option<i64>),
        min_ts: i64,
        f: &str,
        args: impl rhai::FuncArgs,
    ) -> Result<(), ComputationError> {
        {
            let mut g = self.call.lock();
            *g = Call {
                key: key.clone(),
                state,
                watermark: ctx.low_watermark(),
                now: ctx.now(),
                min_ts,
                ..Call::default()
            };
        }
        memory::start_call();
        limits::start_call();
        let result = self
            .engine
            .call_fn::<Dynamic>(&mut self.scope, &self.spec.ast, f, args);
        self.scope.clear();
        let call = std::mem::take(&mut *self.call.lock());
        if let Err(e) = result {
            return Err(ComputationError::BadRecord(self.locate(&e)));
        }
        self.apply(ctx, call, touched)
    }

    /// Applies a call's effects. With `state_ttl` a state the call left as
    /// it was is stored again, with its new touch time.
    fn apply(
        &self,
        ctx: &mut Context<'_>,
        call: Call,
        touched: Option<i64>,
    ) -> Result<(), ComputationError> {
        let store = call.state_changed || (touched.is_some() && !call.state.is_unit());
        match store.then_some(call.state) {
            Some(s) if s.is_unit() => {
                ctx.clear_state();
                if self.spec.ttl.is_some() {
                    ctx.delete_timer(TTL_TAG);
                }
            }
            Some(s) => {
                let bytes = encode_state(&s, touched).map_err(ComputationError::BadRecord)?;
                ctx.set_state(bytes);
                if let (Some(ttl), Some(t)) = (self.spec.ttl, touched) {
                    // The state expires `ttl` of event time after its last touch.
                    ctx.set_timer(TTL_TAG, TimeDomain::EventTime, t.saturating_add(ttl));
                }
            }
            None => {}
        }
        for e in call.emits {
            match &e.output {
                None => ctx.produce(e.key, e.value, e.ts),
                Some(o) => ctx.produce_to(o, e.key, e.value, e.ts),
            }
        }
        for t in call.timers {
            match t {
                TimerOp::Set(tag, d, time) => ctx.set_timer(tag.into_bytes(), d, time),
                TimerOp::Delete(tag) => ctx.delete_timer(tag.as_bytes()),
            }
        }
        Ok(())
    }

    /// The key's state expired at event time `at`: `on_expire` sees it (its
    /// emits are at `at` or later), then it is gone.
    fn expire(
        &mut self,
        ctx: &mut Context<'_>,
        key: &rhai::ImmutableString,
        state: Dynamic,
        at: i64,
    ) -> Result<(), ComputationError> {
        if self.spec.has_on_expire {
            let args = (key.clone(), state.clone());
            self.run(ctx, key, (state, None), at, "on_expire", args)?;
        }
        ctx.clear_state();
        ctx.delete_timer(TTL_TAG);
        Ok(())
    }
}

impl Computation for Script {
    fn process_record(&mut self, ctx: &mut Context<'_>, r: Record) -> Result<(), ComputationError> {
        let key: rhai::ImmutableString = String::from_utf8_lossy(&r.key).into_owned().into();
        let value = value_in(&r.value);
        if *self.input != *ctx.input() {
            self.input = ctx.input().into();
        }
        let input = self.input.clone();
        let (mut state, mut touched) = Self::load(ctx)?;
        if let (Some(ttl), Some(t)) = (self.spec.ttl, touched) {
            // Untouched for `ttl` of event time before this record: the old
            // state expired first, whether or not the watermark has fired
            // its timer yet (so the output does not depend on batching).
            let expiry = t.saturating_add(ttl);
            if r.timestamp >= expiry && !state.is_unit() {
                self.expire(ctx, &key, state, expiry)?;
                (state, touched) = (Dynamic::UNIT, None);
            }
        }
        let touched = self
            .spec
            .ttl
            .map(|_| touched.map_or(r.timestamp, |t| t.max(r.timestamp)));
        let args = (key.clone(), value, r.timestamp, input);
        self.run(ctx, &key, (state, touched), r.timestamp, "process", args)
    }

    fn process_timer(&mut self, ctx: &mut Context<'_>, t: Timer) -> Result<(), ComputationError> {
        let key: rhai::ImmutableString = String::from_utf8_lossy(ctx.key()).into_owned().into();
        if &t.tag[..] == TTL_TAG {
            let (state, _) = Self::load(ctx)?;
            if !state.is_unit() {
                self.expire(ctx, &key, state, t.time)?;
            }
            return Ok(());
        }
        if !self.spec.has_on_timer {
            return Ok(());
        }
        let tag = String::from_utf8_lossy(&t.tag).into_owned();
        let domain = match t.domain {
            TimeDomain::EventTime => "event",
            TimeDomain::ProcessingTime => "processing",
        };
        // Emits from an event-time timer are at its time or later.
        let min_ts = match t.domain {
            TimeDomain::EventTime => t.time,
            TimeDomain::ProcessingTime => ctx.low_watermark(),
        };
        let state = Self::load(ctx)?;
        let args = (key.clone(), tag, t.time, domain.to_owned());
        self.run(ctx, &key, state, min_ts, "on_timer", args)
    }
}

/// Compiles the component's script, or says where it is wrong.
fn compile(c: &Component, o: &Options) -> Result<Spec, ConfigError> {
    let Source { ast, origin, key } = compile_source(c, o.script.as_ref(), o.script_file.as_ref())?;
    let params = |name: &str| {
        ast.iter_functions()
            .find(|f| f.name == name)
            .map(|f| f.params.len())
    };
    match params("process") {
        Some(4) => {}
        Some(n) => {
            return Err(c.options.error(
                Some(key),
                format!("`fn process` takes 4 parameters (key, value, ts, input), not {n}"),
            ))
        }
        None => {
            return Err(c.options.error(
                Some(key),
                "the script defines no `fn process(key, value, ts, input)`",
            ))
        }
    }
    for (name, want, what) in [
        ("on_timer", 4, "(key, tag, time, domain)"),
        ("on_expire", 2, "(key, state)"),
    ] {
        if let Some(n) = params(name) {
            if n != want {
                return Err(c.options.error(
                    Some(key),
                    format!("`fn {name}` takes {want} parameters {what}, not {n}"),
                ));
            }
        }
    }
    if params("on_expire").is_some() && o.state_ttl.is_none() {
        return Err(c.options.error(
            Some(key),
            "`fn on_expire` is called only with `state_ttl` set",
        ));
    }
    Ok(Spec {
        has_on_timer: params("on_timer").is_some(),
        has_on_expire: params("on_expire").is_some(),
        ast,
        outputs: o.outputs.clone(),
        limits: limits_of(c, o)?,
        ttl: o
            .state_ttl
            .map(|d| i64::try_from(d.0.as_micros()).unwrap_or(i64::MAX)),
        origin,
    })
}

/// The limits the options set, or which one is wrong.
fn limits_of(c: &Component, o: &Options) -> Result<Limits, ConfigError> {
    let d = Limits::default();
    let positive = |key: &str, v: Option<u64>| match v {
        Some(0) => Err(c.options.error(Some(key), "must be at least 1")),
        _ => Ok(()),
    };
    let wide = |v: Option<usize>| v.map(|v| v as u64);
    positive("max_operations", o.max_operations)?;
    positive("max_memory_bytes", o.max_memory_bytes)?;
    positive("max_string_bytes", wide(o.max_string_bytes))?;
    positive("max_array_len", wide(o.max_array_len))?;
    positive("max_map_len", wide(o.max_map_len))?;
    positive("max_depth", wide(o.max_depth))?;
    positive("max_emits", wide(o.max_emits))?;
    positive("max_emit_bytes", wide(o.max_emit_bytes))?;
    if o.max_depth.is_some_and(|d| d > MAX_DEPTH_CEILING) {
        return Err(c.options.error(
            Some("max_depth"),
            format!("at most {MAX_DEPTH_CEILING}: stored values must read back as JSON"),
        ));
    }
    Ok(Limits {
        operations: o.max_operations.unwrap_or(d.operations),
        memory_bytes: o.max_memory_bytes.unwrap_or(d.memory_bytes),
        string_bytes: o.max_string_bytes.unwrap_or(d.string_bytes),
        array_len: o.max_array_len.unwrap_or(d.array_len),
        map_len: o.max_map_len.unwrap_or(d.map_len),
        depth: o.max_depth.unwrap_or(d.depth),
        emits: o.max_emits.unwrap_or(d.emits),
        emit_bytes: o.max_emit_bytes.unwrap_or(d.emit_bytes),
    })
}

pub(crate) fn register(r: &mut Registry) {
    r.outputs_from("script", |c| {
        c.options
            .table()
            .get("outputs")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    });
    r.computation("script", |c| {
        let o: Options = crate::options(c)?;
        for name in &o.outputs {
            if name.is_empty() || name == "errors" {
                return Err(c.options.error(
                    Some("outputs"),
                    format!("`{name}` cannot be a named output"),
                ));
            }
        }
        let spec = compile(c, &o)?;
        Ok(per_shard(Script::new(Arc::new(spec))))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_support::{computation, values};
    use millrace_engine::testing::Harness;

    /// A running count per key that fails, after changing everything it
    /// can, on the value `boom`.
    const COUNT_THEN_FAIL: &str = r#"
script = """
fn process(key, value, ts, input) {
    let n = (state() ?? 0) + 1;
    set_state(n);
    emit(key, n);
    emit_to("side", key, n);
    set_timer("t", "event", ts + 100);
    if value == "boom" { throw "boom"; }
}
fn on_timer(key, tag, time, domain) { emit_to("side", key, "timer"); }
"""
outputs = ["side"]
"#;

    fn bad_record(r: Result<Vec<millrace_engine::testing::Output>, ComputationError>) -> String {
        match r {
            Err(ComputationError::BadRecord(why)) => why,
            other => panic!("expected a bad record, got {other:?}"),
        }
    }

    #[test]
    fn a_failing_call_keeps_none_of_the_state_emits_and_timers_it_set() {
        let dir = tempfile::tempdir().expect("dir");
        let c = computation("script", COUNT_THEN_FAIL).expect("options");
        let mut h = Harness::open(dir.path(), c, &["side"]).expect("harness");
        assert_eq!(values(h.process("k", "a", 0).unwrap()), ["1", "1"]);
        let why = bad_record(h.process("k", "boom", 1));
        assert!(why.contains("boom"), "{why}");
        assert_eq!(h.pending_timers(), 1, "only the first call's timer");
        // The failed call's set_state(2) is gone: the count goes on from 1.
        assert_eq!(values(h.process("k", "a", 2).unwrap()), ["2", "2"]);
        // One timer (tag "t"), moved by the last good call to 102.
        assert!(h.advance_watermark(101).unwrap().is_empty());
        assert_eq!(values(h.advance_watermark(103).unwrap()), ["timer"]);
    }

    /// A value nested 161 deep built without a variable holding it (each
    /// level a function's return value): only set_state sees it whole.
    const DEEP_STATE: &str = r#"
script = """
fn nest(n) { if n == 0 { [] } else { [[[[[[[[nest(n - 1)]]]]]]]] } }
fn process(key, value, ts, input) {
    if value == "deep" { set_state(nest(20)); }
    let n = state() ?? 0;
    if type_of(n) == "i64" { set_state(n + 1); }
    emit(key, state());
}
"""
"#;

    #[test]
    fn a_state_too_deep_to_read_back_is_refused_at_set_state() {
        let dir = tempfile::tempdir().expect("dir");
        let c = computation("script", DEEP_STATE).expect("options");
        let mut h = Harness::open(dir.path(), c, &[]).expect("harness");
        assert_eq!(values(h.process("k", "n", 0).unwrap()), ["1"]);
        let why = bad_record(h.process("k", "deep", 1));
        assert!(why.contains("nested"), "{why}");
        assert!(why.contains("t.toml:"), "names where: {why}");
        // The state is still 1, readable, and the key goes on.
        assert_eq!(values(h.process("k", "n", 2).unwrap()), ["2"]);
        assert_eq!(h.state(b"k").unwrap().map(|s| s[0]), Some(STATE_INT));
    }

    /// Each call reads its limit from the value: `emits N`, `bytes N`,
    /// `memory N` (KiB), `depth N`.
    const GREEDY: &str = r#"
max_emits = 10
max_emit_bytes = 1000
max_memory_bytes = 1048576
max_depth = 5
script = """
fn process(key, value, ts, input) {
    let what = value.split(" ");
    let n = parse_int(what[1]);
    set_state(n);
    if what[0] == "emits" { for i in 0..n { emit(key, i); } }
    if what[0] == "bytes" { let s = ""; s.pad(n, "x"); emit(key, s); emit(key, s); }
    if what[0] == "memory" { let s = ""; s.pad(1024, "x"); let m = []; for i in 0..n { m.push(s + i); } }
    if what[0] == "depth" { let a = []; for i in 0..n { a = [a]; } }
}
"""
"#;

    #[test]
    fn each_limit_stops_a_call_one_step_past_it_and_changes_nothing() {
        let dir = tempfile::tempdir().expect("dir");
        let c = computation("script", GREEDY).expect("options");
        let mut h = Harness::open(dir.path(), c, &[]).expect("harness");
        for (ok, over, why) in [
            ("emits 10", "emits 11", "more than 10 records (max_emits)"),
            (
                "bytes 499",
                "bytes 500",
                "more than 1000 bytes (max_emit_bytes)",
            ),
            (
                "memory 500",
                "memory 1100",
                "more than 1048576 bytes of memory (max_memory_bytes)",
            ),
            ("depth 5", "depth 7", "nested more than 5 deep (max_depth)"),
        ] {
            h.process("k", ok, 0)
                .unwrap_or_else(|e| panic!("{ok}: {e}"));
            let before = h.state(b"k").unwrap();
            let err = bad_record(h.process("k", over, 0));
            assert!(err.contains(why), "{over}: {err}");
            // The snippet's lines follow the six of the topology before it.
            let kind = over.split(' ').next().expect("kind");
            let at = GREEDY
                .lines()
                .position(|l| l.contains(&format!("what[0] == \"{kind}\"")))
                .expect("its line");
            assert!(
                err.starts_with(&format!("t.toml:{}: ", at + 7)),
                "{over}: {err}"
            );
            assert_eq!(h.state(b"k").unwrap(), before, "{over}");
        }
    }

    #[test]
    fn limits_are_checked_when_the_topology_is_loaded() {
        let err = |options: &str| match computation("script", options) {
            Ok(_) => panic!("accepted: {options}"),
            Err(e) => e.to_string(),
        };
        let script = "script = \"fn process(k, v, t, i) { }\"";
        for key in [
            "max_operations",
            "max_memory_bytes",
            "max_emits",
            "max_depth",
        ] {
            let e = err(&format!("{key} = 0\n{script}"));
            assert!(e.contains(key) && e.contains("at least 1"), "{e}");
        }
        let e = err(&format!("max_depth = 101\n{script}"));
        assert!(e.contains("at most 100"), "{e}");
        let e = err("script = \"fn process(k, v, t, i) { this }\"");
        assert!(e.contains("t.toml:"), "{e}");
    }

    /// Emits what the call sees, and emits at other times and outputs.
    const SEES: &str = r#"
outputs = ["side"]
script = """
fn process(key, value, ts, input) {
    if value == "sees" { emit(key(), `${input} ${watermark()} ${now()}`); }
    if value == "later" { emit(key, "l", ts + 5); emit_to("side", key, "s", ts); }
    if value == "early" { emit(key, "e", ts - 1); }
    if value == "nowhere" { emit_to("nope", key, "x"); }
    if value == "timer" { set_timer("t", "event", ts + 10); }
    if value == "undefined" { nope(); }
}
"""
"#;

    #[test]
    fn a_call_sees_its_key_input_watermark_and_clock_and_emits_at_or_after_its_time() {
        let dir = tempfile::tempdir().expect("dir");
        let c = computation("script", SEES).expect("options");
        let mut h = Harness::open(dir.path(), c, &["side"]).expect("harness");
        assert!(h.advance_watermark(50).unwrap().is_empty());
        assert!(h.advance_clock(7).unwrap().is_empty());
        let out = h.process("k", "sees", 60).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(
            (&out[0].key[..], &out[0].value[..]),
            (&b"k"[..], &b"input 50 7"[..])
        );
        assert_eq!(out[0].timestamp, 60, "at the input's event time");
        let out: Vec<_> = h
            .process("k", "later", 60)
            .unwrap()
            .into_iter()
            .map(|o| {
                (
                    o.output,
                    String::from_utf8_lossy(&o.value).into_owned(),
                    o.timestamp,
                )
            })
            .collect();
        assert_eq!(
            out,
            [
                (String::new(), "l".to_owned(), 65),
                ("side".to_owned(), "s".to_owned(), 60)
            ]
        );
        let why = bad_record(h.process("k", "early", 60));
        assert!(
            why.contains("emit at event time 59, before the input's (60)"),
            "{why}"
        );
        let why = bad_record(h.process("k", "nowhere", 60));
        assert!(
            why.contains("emit_to(\"nope\", ..): no such output"),
            "{why}"
        );
        // Rhai's own errors keep their text, without its position: the
        // line is in the topology file's terms.
        let why = bad_record(h.process("k", "undefined", 60));
        let at = SEES
            .lines()
            .position(|l| l.contains("nope()"))
            .expect("line");
        assert!(
            why.starts_with(&format!("t.toml:{}: Function not found: nope", at + 7)),
            "{why}"
        );
        assert!(!why.contains("(line "), "{why}");
        // A timer of a script without `on_timer` fires and calls nothing.
        assert!(h.process("k", "timer", 60).unwrap().is_empty());
        assert_eq!(h.pending_timers(), 1);
        assert!(h.advance_watermark(100).unwrap().is_empty());
        assert_eq!(h.pending_timers(), 0);
    }

    /// Sets its state to the value, `read` emits it, `clear` clears it.
    const EXPIRING: &str = r#"
state_ttl = "1s"
script = """
fn process(key, value, ts, input) {
    if value == "read" { emit(key, state() ?? "none"); }
    else if value == "clear" { clear_state(); }
    else { set_state(value); }
}
fn on_expire(key, state) { emit(key, `expired ${state}`); }
"""
"#;

    #[test]
    fn a_state_expires_a_ttl_after_its_last_touch_reading_it_touches_it() {
        const S: i64 = 1_000_000;
        let dir = tempfile::tempdir().expect("dir");
        let c = computation("script", EXPIRING).expect("options");
        let mut h = Harness::open(dir.path(), c, &[]).expect("harness");
        assert!(h.process("k", "a", 0).unwrap().is_empty());
        // Read half a TTL later: touched then, it expires at 1.5 s.
        assert_eq!(values(h.process("k", "read", S / 2).unwrap()), ["a"]);
        assert!(h.advance_watermark(S + S / 5).unwrap().is_empty());
        assert!(h.state(b"k").unwrap().is_some());
        let out = h.advance_watermark(2 * S).unwrap();
        assert_eq!(values(out.clone()), ["expired a"]);
        assert_eq!(out[0].timestamp, S + S / 2);
        assert_eq!(h.state(b"k").unwrap(), None);
        assert_eq!(h.pending_timers(), 0);
        assert_eq!(values(h.process("k", "read", 2 * S).unwrap()), ["none"]);
        // A record a TTL after the last touch finds the state expired, even
        // before the watermark fires its timer.
        assert!(h.process("j", "b", 3 * S).unwrap().is_empty());
        assert_eq!(
            values(h.process("j", "read", 4 * S).unwrap()),
            ["expired b", "none"]
        );
        // A state cleared is gone, with its expiry.
        assert!(h.process("i", "c", 5 * S).unwrap().is_empty());
        assert_eq!(h.pending_timers(), 1);
        assert!(h.process("i", "clear", 5 * S).unwrap().is_empty());
        assert_eq!(h.state(b"i").unwrap(), None);
        assert_eq!(h.pending_timers(), 0);
    }

    #[test]
    fn outputs_and_depth_are_checked_when_the_topology_is_loaded() {
        let script = "script = \"fn process(k, v, t, i) { }\"";
        for name in ["errors", ""] {
            let e = match computation("script", &format!("outputs = [\"{name}\"]\n{script}")) {
                Ok(_) => panic!("accepted the output `{name}`"),
                Err(e) => e.to_string(),
            };
            assert!(
                e.contains(&format!("`{name}` cannot be a named output")),
                "{e}"
            );
        }
        computation("script", &format!("max_depth = 100\n{script}")).expect("the ceiling");
        let e = match computation(
            "script",
            "script = \"\"\"\nfn process(k, v, t, i) {\n\n  let = 1;\n}\n\"\"\"",
        ) {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        };
        // `script = """` is the snippet's sixth line: the error is on the tenth.
        assert!(e.contains("t.toml:10"), "{e}");
    }

    #[test]
    fn a_script_file_names_its_own_lines_in_errors() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("count.rhai");
        std::fs::write(
            &file,
            "fn process(key, value, ts, input) {\n    if value == \"boom\" { throw \"boom\"; }\n}\n",
        )
        .expect("write");
        let c = computation(
            "script",
            &format!("script_file = {:?}", file.display().to_string()),
        )
        .expect("options");
        let mut h = Harness::open(&dir.path().join("db"), c, &[]).expect("harness");
        assert!(h.process("k", "a", 0).unwrap().is_empty());
        let why = bad_record(h.process("k", "boom", 0));
        assert_eq!(why, format!("{}:2: boom", file.display()));
        std::fs::write(
            &file,
            "fn process(key, value, ts, input) {\n\n    let = 1;\n}\n",
        )
        .expect("write");
        let e = match computation(
            "script",
            &format!("script_file = {:?}", file.display().to_string()),
        ) {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(&format!("{}:3", file.display())), "{e}");
    }
}
