//! Where a script comes from (inline in the topology or a file beside
//! it) and where its errors are: `FILE:LINE` inside the topology file.

use super::limits;
use millrace_config::{Component, ConfigError};
use rhai::{Engine, EvalAltResult, Position, AST};
use std::path::PathBuf;

/// A compiled script and where its text came from: `FILE:LINE` of its
/// first line, and the option that holds it (for error messages).
pub(crate) struct Source {
    pub ast: AST,
    pub origin: (PathBuf, usize),
    pub key: &'static str,
}

/// Reads the script of component `c` from `script` (inline) or
/// `script_file` (beside the topology file) and compiles it, or says where
/// it is wrong.
pub(crate) fn compile_source(
    c: &Component,
    script: Option<&String>,
    script_file: Option<&PathBuf>,
) -> Result<Source, ConfigError> {
    let (source, origin, key) = match (script, script_file) {
        (Some(s), None) => {
            // A multi-line string starts on the line after `script = """`.
            let first = c.options.line_of("script") + usize::from(!s.is_empty());
            (s.clone(), (c.options.file().to_path_buf(), first), "script")
        }
        (None, Some(f)) => {
            let path = c
                .options
                .file()
                .parent()
                .map_or_else(|| f.clone(), |d| d.join(f));
            let text = std::fs::read_to_string(&path).map_err(|e| {
                c.options.error(
                    Some("script_file"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            (text, (path, 1), "script_file")
        }
        _ => {
            return Err(c.options.error(
                None,
                "a script needs `script` (the code) or `script_file` (a file of it), not both",
            ))
        }
    };
    let mut compiler = Engine::new();
    limits::sandbox_syntax(&mut compiler);
    let ast = compiler.compile(&source).map_err(|e| {
        let line = e.position().line().map_or(origin.1, |l| origin.1 + l - 1);
        ConfigError::Invalid {
            file: origin.0.clone(),
            line,
            key: c.options.path_of(key),
            message: format!("{}", e.err_type()),
        }
    })?;
    Ok(Source { ast, origin, key })
}

/// Error `e` of a script from `origin`, for its message: `FILE:LINE:` of
/// where it happened, what happened, and in which function.
pub(crate) fn locate(origin: &(PathBuf, usize), e: &EvalAltResult) -> String {
    let (file, first) = origin;
    // Calls of script functions wrap the error that stopped them; the
    // innermost says what and (most closely) where.
    let (mut at, mut function, mut inner) = (e.position(), None, e);
    while let EvalAltResult::ErrorInFunctionCall(name, _, err, pos) = inner {
        if !pos.is_none() {
            at = *pos;
        }
        function = Some(name.as_str());
        inner = err;
    }
    if !inner.position().is_none() {
        at = inner.position();
    }
    let mut what = match inner {
        EvalAltResult::ErrorTerminated(why, _) | EvalAltResult::ErrorRuntime(why, _) => {
            why.to_string()
        }
        other => strip_position(other.to_string(), other.position()),
    };
    if let Some(f) = function.filter(|f| !["process", "on_timer", "on_expire"].contains(f)) {
        what.push_str(&format!(" (in fn {f})"));
    }
    match at.line() {
        Some(l) => format!("{}:{}: {what}", file.display(), first + l - 1),
        None => format!("{}: {what}", file.display()),
    }
}

/// Rhai's message of an error without the `(line L, position P)` it ends
/// with (the caller names the line in the topology file instead).
fn strip_position(text: String, at: Position) -> String {
    let suffix = format!(" ({at})");
    match text.strip_suffix(&suffix) {
        Some(t) if !at.is_none() => t.to_owned(),
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::script::limits::Limits;
    use crate::script::sandbox;
    use rhai::{Dynamic, Scope};

    #[test]
    fn a_limit_error_names_the_line_inside_a_function_it_happened_in() {
        let origin = (PathBuf::from("t.toml"), 10);
        let engine = sandbox(&Limits::with_operations(Some(1000)));
        let ast = engine
            .compile("fn spin() {\n  let n = 0; loop { n += 1; }\n}\nfn process() { spin() }")
            .expect("compiles");
        let e = engine
            .call_fn::<Dynamic>(&mut Scope::new(), &ast, "process", ())
            .unwrap_err();
        assert_eq!(
            locate(&origin, &e),
            "t.toml:11: Too many operations: more than 1000 (max_operations) (in fn spin)"
        );
    }
}
