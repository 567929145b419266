//! Stateless computations: `split` (flatMap), `filter`, `map`.

use crate::options;
use bytes::Bytes;
use millrace_config::KeyExtractor;
use millrace_engine::per_shard;
use millrace_engine::{extract_key, Computation, ComputationError, Context, Record};
use regex::bytes::Regex;
use serde::Deserialize;

/// `split`: one record per word of the value. Words are the pieces between
/// matches of `pattern` (default: runs of characters that are not letters,
/// digits or `'`), lower-cased when `lowercase = true`. Each word keeps the
/// line's key and event time.
#[derive(Clone)]
pub struct Split {
    pattern: Regex,
    lowercase: bool,
}

impl Computation for Split {
    fn process_record(&mut self, ctx: &mut Context<'_>, r: Record) -> Result<(), ComputationError> {
        for word in self.pattern.split(&r.value) {
            if word.is_empty() {
                continue;
            }
            let value = if self.lowercase {
                Bytes::from(word.to_ascii_lowercase())
            } else {
                r.value.slice_ref(word)
            };
            ctx.produce(r.key.clone(), value, r.timestamp);
        }
        Ok(())
    }
}

/// `filter`: keeps records whose value matches `regex` (or does not, with `invert`).
#[derive(Clone)]
pub struct Filter {
    regex: Regex,
    invert: bool,
}

impl Computation for Filter {
    fn process_record(&mut self, ctx: &mut Context<'_>, r: Record) -> Result<(), ComputationError> {
        if self.regex.is_match(&r.value) != self.invert {
            ctx.produce(r.key, r.value, r.timestamp);
        }
        Ok(())
    }
}

/// `map`: sets the key and/or the value from the record with extractors
/// (`key`, `value`, `json:/pointer`, `field:N`).
#[derive(Clone)]
pub struct Map {
    key: Option<KeyExtractor>,
    value: Option<KeyExtractor>,
}

impl Computation for Map {
    fn process_record(&mut self, ctx: &mut Context<'_>, r: Record) -> Result<(), ComputationError> {
        let pick = |e: &Option<KeyExtractor>, default: &Bytes| match e {
            None => Ok(default.clone()),
            Some(e) => extract_key(e, &r.key, &r.value).map_err(ComputationError::BadRecord),
        };
        let key = pick(&self.key, &r.key)?;
        let value = pick(&self.value, &r.value)?;
        ctx.produce(key, value, r.timestamp);
        Ok(())
    }
}

fn regex(
    c: &millrace_config::Component,
    key: &str,
    text: &str,
) -> Result<Regex, millrace_config::ConfigError> {
    Regex::new(text).map_err(|e| c.options.error(Some(key), format!("invalid regex: {e}")))
}

pub(crate) fn register(r: &mut millrace_engine::Registry) {
    r.computation("split", |c| {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct O {
            pattern: Option<String>,
            #[serde(default)]
            lowercase: bool,
        }
        let o: O = options(c)?;
        let pattern = regex(
            c,
            "pattern",
            o.pattern.as_deref().unwrap_or(r"[^\p{L}\p{N}']+"),
        )?;
        let lowercase = o.lowercase;
        Ok(per_shard(Split { pattern, lowercase }))
    });
    r.computation("filter", |c| {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct O {
            regex: String,
            #[serde(default)]
            invert: bool,
        }
        let o: O = options(c)?;
        let re = regex(c, "regex", &o.regex)?;
        let invert = o.invert;
        Ok(per_shard(Filter { regex: re, invert }))
    });
    r.computation("map", |c| {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct O {
            key: Option<String>,
            value: Option<String>,
            delimiter: Option<String>,
        }
        let o: O = options(c)?;
        let parse = |field: &str, text: &Option<String>| {
            text.as_deref()
                .map(|t| {
                    KeyExtractor::parse(t, o.delimiter.clone())
                        .map_err(|m| c.options.error(Some(field), m))
                })
                .transpose()
        };
        let (key, value) = (parse("key", &o.key)?, parse("value", &o.value)?);
        if key.is_none() && value.is_none() {
            return Err(c.options.error(
                None,
                "map needs `key` or `value` (an extractor such as \"json:/id\")",
            ));
        }
        Ok(per_shard(Map { key, value }))
    });
    r.computation("flatten", |c| {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct O {}
        let _: O = options(c)?;
        Ok(per_shard(Flatten))
    });
}

/// `flatten`: every record of every input, unchanged, on one stream.
#[derive(Clone)]
pub struct Flatten;

impl Computation for Flatten {
    fn process_record(&mut self, ctx: &mut Context<'_>, r: Record) -> Result<(), ComputationError> {
        ctx.produce(r.key, r.value, r.timestamp);
        Ok(())
    }
}
