//! The limits of one script call, so that no script can take the worker
//! down: its operations, memory, strings, arrays and maps, the nesting of
//! its values, its call depth and its emits. A call past any of them fails
//! like any script error: its record goes to `NAME.errors` with the limit's
//! name and the script's line, and the call changes nothing.
//!
//! | key | bounds | default |
//! | --- | --- | --- |
//! | `max_operations` | operations of one call (Rhai's count) | 1,000,000 |
//! | `max_memory_bytes` | bytes a call holds (allocated and not freed) | 64 MiB |
//! | `max_string_bytes` | one string, and the strings inside one value | 8 MiB |
//! | `max_array_len` | the elements of one array, nested ones included | 1,048,576 |
//! | `max_map_len` | the entries of one map, nested ones included | 1,048,576 |
//! | `max_depth` | arrays and maps nested in one another (at most 100) | 64 |
//! | `max_emits` | records one call emits | 100,000 |
//! | `max_emit_bytes` | bytes (keys and values) one call emits | 32 MiB |
//!
//! Calls nest at most [`MAX_CALL_LEVELS`] deep and expressions at most
//! [`MAX_EXPR_DEPTH`] (inside functions [`MAX_FN_EXPR_DEPTH`]).
//!
//! The limits are checked where a variable is read: the call's operations,
//! memory and call depth so far, and the variable's value, walked for its
//! sizes and nesting (never deeper than `max_depth`). An error raised there
//! keeps the script's line (Rhai replaces the position of its own limit
//! errors by the outermost call's, which names no line). Rhai's own limits
//! stay behind them as a backstop, a little wider, for code that reads no
//! variable (`loop { }`): operations `max_operations` + [`GRACE_OPERATIONS`],
//! memory 1.5 x `max_memory_bytes`, sizes twice the limits, calls
//! [`MAX_CALL_LEVELS`] + 8.
//!
//! So no variable holds a value nested deeper than `max_depth`; one
//! expression nests a value at most [`MAX_EXPR_DEPTH`] more, and what leaves
//! a call (state, emits, accumulators) is checked again whole. `this` is
//! disabled: it is the one place a value can grow without being read
//! through a variable. So Rhai's own recursive walks over values (copies,
//! drops, its size checks) stay shallow, and every stored value reads back
//! as JSON.

use super::memory;
use rhai::{Dynamic, Engine, EvalAltResult};
use std::cell::Cell;

/// Operations a call may run past `max_operations` before Rhai stops it
/// without a line (its reads of variables stop it first, with one).
pub(crate) const GRACE_OPERATIONS: u64 = 1000;

thread_local! {
    /// Operations of the call running on this thread so far.
    static OPERATIONS: Cell<u64> = const { Cell::new(0) };
}

/// Deepest allowed `max_depth`: the state and accumulators are stored as
/// JSON, which reads back at most 128 levels deep (serde_json's limit),
/// and one expression can nest a value further than the variables it reads.
pub(crate) const MAX_DEPTH_CEILING: usize = 100;
/// How deep calls of script functions may nest.
pub(crate) const MAX_CALL_LEVELS: usize = 64;
/// How deep expressions may nest at the script's top level.
pub(crate) const MAX_EXPR_DEPTH: usize = 128;
/// How deep expressions may nest inside functions.
pub(crate) const MAX_FN_EXPR_DEPTH: usize = 64;

/// The limits of one call of a script.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Limits {
    pub operations: u64,
    pub memory_bytes: u64,
    pub string_bytes: usize,
    pub array_len: usize,
    pub map_len: usize,
    pub depth: usize,
    pub emits: usize,
    pub emit_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            operations: 1_000_000,
            memory_bytes: 64 << 20,
            string_bytes: 8 << 20,
            array_len: 1 << 20,
            map_len: 1 << 20,
            depth: 64,
            emits: 100_000,
            emit_bytes: 32 << 20,
        }
    }
}

impl Limits {
    /// The default limits with `max_operations` set.
    pub(crate) fn with_operations(operations: Option<u64>) -> Self {
        let d = Limits::default();
        Limits {
            operations: operations.unwrap_or(d.operations),
            ..d
        }
    }

    /// Sets `engine`'s limits to these, and `this` off.
    pub(crate) fn bound(&self, engine: &mut Engine) {
        sandbox_syntax(engine);
        engine.set_max_call_levels(MAX_CALL_LEVELS + 8);
        engine.set_max_operations(self.operations.saturating_add(GRACE_OPERATIONS));
        engine.set_max_string_size(self.string_bytes.saturating_mul(2));
        engine.set_max_array_size(self.array_len.saturating_mul(2));
        engine.set_max_map_size(self.map_len.saturating_mul(2));
        let backstop = self.memory_bytes.saturating_add(self.memory_bytes / 2);
        let backstop = i64::try_from(backstop).unwrap_or(i64::MAX);
        let limits = self.clone();
        engine.on_progress(move |ops| {
            OPERATIONS.with(|o| o.set(ops));
            (memory::held() > backstop).then(|| Dynamic::from(limits.memory_error()))
        });
        let limits = self.clone();
        // `on_var` is marked volatile by Rhai (its signature may change),
        // not deprecated.
        #[allow(deprecated)]
        engine.on_var(move |name, _, ctx| {
            limits.check_call(ctx.call_level())?;
            if let Some(v) = ctx.scope().get(name) {
                limits.check_value(v, name)?;
            }
            Ok(None)
        });
    }

    fn memory_error(&self) -> String {
        format!(
            "the call holds more than {} bytes of memory (max_memory_bytes)",
            self.memory_bytes
        )
    }

    /// Refuses a call that ran out of operations or memory, or whose
    /// calls nest too deep.
    fn check_call(&self, level: usize) -> Result<(), Box<EvalAltResult>> {
        if OPERATIONS.with(Cell::get) > self.operations {
            return Err(format!(
                "Too many operations: more than {} (max_operations)",
                self.operations
            )
            .into());
        }
        if memory::held() > i64::try_from(self.memory_bytes).unwrap_or(i64::MAX) {
            return Err(self.memory_error().into());
        }
        if level > MAX_CALL_LEVELS {
            return Err(format!(
                "Stack overflow: calls of functions nested more than {MAX_CALL_LEVELS} deep"
            )
            .into());
        }
        Ok(())
    }

    /// Refuses a value `what` too deep or too large.
    pub(crate) fn check_value(&self, v: &Dynamic, what: &str) -> Result<(), Box<EvalAltResult>> {
        let mut size = Size::default();
        if size.add(v, self.depth) {
            return Err(depth_error(self.depth, what).into());
        }
        let over = |n: usize, max: usize, of: &str, key: &str| {
            (n > max).then(|| format!("{what}: {of} more than {max} (max_{key})"))
        };
        let why = over(
            size.string_bytes,
            self.string_bytes,
            "Length of string too large: bytes of strings",
            "string_bytes",
        )
        .or_else(|| {
            over(
                size.array_len,
                self.array_len,
                "Size of array too large: elements",
                "array_len",
            )
        })
        .or_else(|| {
            over(
                size.map_len,
                self.map_len,
                "Size of map too large: entries",
                "map_len",
            )
        });
        match why {
            Some(why) => Err(why.into()),
            None => Ok(()),
        }
    }
}

/// Resets the operations count of the call starting on this thread.
pub(crate) fn start_call() {
    OPERATIONS.with(|o| o.set(0));
}

/// The sizes of a value, nested ones included, as Rhai counts them.
#[derive(Default)]
struct Size {
    string_bytes: usize,
    array_len: usize,
    map_len: usize,
}

impl Size {
    /// Adds the sizes of `v`; true if it holds arrays or maps nested more
    /// than `room` deep (an array or map is one level; the walk never goes
    /// deeper than `room`).
    fn add(&mut self, v: &Dynamic, room: usize) -> bool {
        if let Ok(s) = v.as_immutable_string_ref() {
            self.string_bytes += s.len();
            false
        } else if v.is_array() {
            let Some(a) = v.read_lock::<rhai::Array>() else {
                return false;
            };
            self.array_len += a.len();
            room == 0 || a.iter().any(|x| self.add(x, room - 1))
        } else if v.is_map() {
            let Some(m) = v.read_lock::<rhai::Map>() else {
                return false;
            };
            self.map_len += m.len();
            room == 0 || m.values().any(|x| self.add(x, room - 1))
        } else {
            false
        }
    }
}

/// What every script engine has, limits aside: the nesting of calls and
/// expressions bounded, and no `eval` and no `this`.
pub(crate) fn sandbox_syntax(engine: &mut Engine) {
    engine.set_max_call_levels(MAX_CALL_LEVELS);
    engine.set_max_expr_depths(MAX_EXPR_DEPTH, MAX_FN_EXPR_DEPTH);
    engine.disable_symbol("eval");
    engine.disable_symbol("this");
}

/// Refuses a value `what` nested more than `max` deep.
pub(crate) fn check_depth(v: &Dynamic, max: usize, what: &str) -> Result<(), Box<EvalAltResult>> {
    if Size::default().add(v, max) {
        return Err(depth_error(max, what).into());
    }
    Ok(())
}

/// The message of a value nested too deep.
pub(crate) fn depth_error(max: usize, what: &str) -> String {
    format!("{what}: arrays and maps nested more than {max} deep (max_depth)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(n: usize) -> Dynamic {
        let mut v = Dynamic::from(1_i64);
        for i in 0..n {
            v = if i % 2 == 0 {
                Dynamic::from_array(vec![Dynamic::from(0_i64), v])
            } else {
                let mut m = rhai::Map::new();
                m.insert("a".into(), Dynamic::UNIT);
                m.insert("b".into(), v);
                Dynamic::from_map(m)
            };
        }
        v
    }

    #[test]
    fn a_value_is_refused_one_level_past_the_limit() {
        for n in [0, 1, 2, 7] {
            assert!(check_depth(&nested(n), n, "v").is_ok(), "{n}");
            if n > 0 {
                assert!(check_depth(&nested(n), n - 1, "v").is_err(), "{n}");
            }
        }
        let err = check_depth(&nested(3), 2, "acc").unwrap_err().to_string();
        assert!(
            err.contains("acc: arrays and maps nested more than 2 deep (max_depth)"),
            "{err}"
        );
    }

    #[test]
    fn the_defaults_fit_what_json_reads_back() {
        let d = Limits::default();
        assert!(d.depth <= MAX_DEPTH_CEILING && MAX_DEPTH_CEILING < 128);
        assert_eq!(Limits::with_operations(Some(5)).operations, 5);
        assert_eq!(Limits::with_operations(None), d);
    }

    #[test]
    fn a_value_is_refused_one_past_its_string_array_and_map_limits() {
        let s = |t: &str| Dynamic::from(t.to_owned());
        // 4 bytes of strings, 3 elements, 2 entries.
        let array = Dynamic::from_array(vec![s("ab"), s("cd"), Dynamic::UNIT]);
        let mut map = rhai::Map::new();
        map.insert("a".into(), array);
        map.insert("b".into(), Dynamic::UNIT);
        let v = Dynamic::from_map(map);
        let at = Limits {
            string_bytes: 4,
            array_len: 3,
            map_len: 2,
            ..Limits::default()
        };
        at.check_value(&v, "v").expect("at every limit");
        for (limits, why) in [
            (
                Limits {
                    string_bytes: 3,
                    ..at.clone()
                },
                "v: Length of string too large: bytes of strings more than 3 (max_string_bytes)",
            ),
            (
                Limits {
                    array_len: 2,
                    ..at.clone()
                },
                "v: Size of array too large: elements more than 2 (max_array_len)",
            ),
            (
                Limits {
                    map_len: 1,
                    ..at.clone()
                },
                "v: Size of map too large: entries more than 1 (max_map_len)",
            ),
        ] {
            let err = limits.check_value(&v, "v").unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        }
    }

    #[test]
    fn rhais_own_limits_stand_a_little_behind_ours() {
        let limits = Limits {
            operations: 1000,
            string_bytes: 10,
            array_len: 20,
            map_len: 30,
            ..Limits::default()
        };
        let mut e = Engine::new();
        limits.bound(&mut e);
        assert_eq!(e.max_operations(), 1000 + GRACE_OPERATIONS);
        assert_eq!(
            (e.max_string_size(), e.max_array_size(), e.max_map_size()),
            (20, 40, 60)
        );
        assert_eq!(e.max_call_levels(), MAX_CALL_LEVELS + 8);
    }

    /// A call that reads no variable is stopped by Rhai's checks only: by
    /// its memory past 1.5 times `max_memory_bytes`, else by its
    /// operations.
    #[test]
    fn a_call_reading_no_variable_is_stopped_past_one_and_a_half_times_its_memory() {
        let limits = Limits {
            operations: 1000,
            memory_bytes: 1 << 20,
            ..Limits::default()
        };
        let engine = crate::script::sandbox(&limits);
        let ast = engine.compile("fn spin() { loop { } }").expect("compiles");
        for (held, stopped_by) in [
            (1_200_000, "Too many operations"),
            (
                2_000_000,
                "more than 1048576 bytes of memory (max_memory_bytes)",
            ),
        ] {
            memory::start_call();
            start_call();
            let kept = std::hint::black_box(vec![1u8; held]);
            let err = engine
                .call_fn::<Dynamic>(&mut rhai::Scope::new(), &ast, "spin", ())
                .unwrap_err();
            drop(kept);
            // The memory check stops the call with its message as the token.
            let err = match *err {
                EvalAltResult::ErrorTerminated(why, _) => why.to_string(),
                other => other.to_string(),
            };
            assert!(err.contains(stopped_by), "{held}: {err}");
        }
    }

    /// `process` calling a chain of `n` functions, each the next, the last
    /// reading a variable.
    fn chain(n: usize) -> String {
        let mut s = String::from("fn process() { f1() }\n");
        for i in 1..n {
            s += &format!("fn f{i}() {{ f{}() }}\n", i + 1);
        }
        s + format!("fn f{n}() {{ let x = 1; x }}\n").as_str()
    }

    #[test]
    fn calls_nested_one_level_past_the_limit_are_refused_where_a_variable_is_read() {
        let engine = crate::script::sandbox(&Limits::default());
        let run = |n: usize| {
            let ast = engine.compile(chain(n)).expect("compiles");
            engine.call_fn::<Dynamic>(&mut rhai::Scope::new(), &ast, "process", ())
        };
        let deepest = (1..MAX_CALL_LEVELS + 8)
            .take_while(|&n| run(n).is_ok())
            .last()
            .expect("a chain runs");
        // `process` runs at level 0: its 64th function at level 64.
        assert_eq!(deepest, MAX_CALL_LEVELS);
        let err = run(deepest + 1).unwrap_err().to_string();
        assert!(
            err.contains("calls of functions nested more than 64 deep"),
            "{err}"
        );
    }
}
