//! `state_ttl` through the real binary: a key's state expires a TTL of event
//! time after its newest record, and the expiries are a function of the
//! input alone. The built-in `count` and a script count with the same TTL
//! run side by side on the same stream, whether it arrives in one file or in
//! several read moments apart (so that the watermark's expiry timers fire
//! between them, or not), and both must match a reference computed here.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::*;

const T: Duration = Duration::from_secs(60);

/// The TTL of both counts, in milliseconds (the input's unit).
const TTL_MS: i64 = 20_000;

/// The source's `out_of_order`, in milliseconds: the generated streams stay
/// closer to in order than this, so no record is late.
const OUT_OF_ORDER_MS: i64 = 5_000;

/// A watched directory of `MS WORD` lines -> `map` keyed by the word ->
/// the built-in `count` (`builtin.txt`) and a script count (`script.txt`),
/// both with `state_ttl = "20s"`.
fn topology(s: &Scratch, engine: &str) -> PathBuf {
    std::fs::create_dir_all(s.path("in")).expect("mkdir");
    s.write(
        "ttl.toml",
        &format!(
            r#"
[service]
data_dir = "{{dir}}/data"
[engine]
shards = 2
{engine}
[sources.events]
type = "file"
path = "{{dir}}/in"
watch = true
timestamp = "field:0"
delimiter = " "
timestamp_unit = "ms"
watermark = {{ out_of_order = "{OUT_OF_ORDER_MS}ms" }}
[computations.keyed]
type = "map"
inputs = ["events"]
key = "field:1"
value = "field:1"
delimiter = " "
[computations.builtin]
type = "count"
inputs = ["keyed"]
state_ttl = "{TTL_MS}ms"
[computations.scripted]
type = "script"
inputs = ["keyed"]
state_ttl = "{TTL_MS}ms"
script = """
fn process(key, value, ts, input) {{
    let n = (state() ?? 0) + 1;
    set_state(n);
    emit(key, n);
}}
"""
[sinks.b]
type = "file"
inputs = ["builtin"]
path = "{{dir}}/builtin.txt"
format = "text"
[sinks.s]
type = "file"
inputs = ["scripted"]
path = "{{dir}}/script.txt"
format = "text"
"#
        ),
    )
}

/// What a count with the TTL gives for `records` (ms, word), in order: a
/// key's count starts again when a record comes `TTL_MS` or more after the
/// newest record of the key before it.
fn reference(records: &[(i64, String)]) -> Vec<String> {
    let mut keys: BTreeMap<&str, (i64, u64)> = BTreeMap::new();
    records
        .iter()
        .map(|(ts, w)| {
            let (newest, n) = keys.entry(w).or_insert((*ts, 0));
            if *ts >= *newest + TTL_MS {
                *n = 0;
            }
            *n += 1;
            *newest = (*newest).max(*ts);
            format!("{w}\t{n}")
        })
        .collect()
}

/// The lines of `p` per key, in order (sinks of different shards interleave).
fn per_key(lines: &[String]) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for l in lines {
        let k = l.split('\t').next().unwrap_or_default().to_owned();
        m.entry(k).or_default().push(l.clone());
    }
    m
}

/// The timers the built-in count holds, from `/metrics`.
fn builtin_timers(http: &str) -> Option<f64> {
    metric(http, "millrace_timers_pending{component=\"builtin\"}")
}

/// Runs `records` through the topology, added as one file per chunk; the
/// next chunk is added once both counts have answered every record so far
/// and `between(http)` holds. Returns what both counts gave.
fn run(
    engine: &str,
    chunks: &[&[(i64, String)]],
    between: impl Fn(&str) -> bool,
) -> (Vec<String>, Vec<String>) {
    let s = Scratch::new();
    let topo = topology(&s, engine);
    let http = format!("127.0.0.1:{}", free_port());
    let mut child = spawn(&topo, &http);
    let (b, sc) = (s.path("builtin.txt"), s.path("script.txt"));
    let answered = |p: &Path| lines(p).len();
    let mut sent = 0;
    for (i, chunk) in chunks.iter().enumerate() {
        if i > 0 {
            assert!(
                wait_until(T, || between(&http)),
                "chunk {i}: the condition before it never held"
            );
        }
        let body: String = chunk.iter().map(|(t, w)| format!("{t} {w}\n")).collect();
        add(&s.path("in"), &format!("{i:03}.txt"), &body);
        sent += chunk.len();
        assert!(
            wait_until(T, || answered(&b) >= sent && answered(&sc) >= sent),
            "chunk {i}: {sent} records sent, builtin answered {}, script {}",
            answered(&b),
            answered(&sc)
        );
    }
    term(&child);
    assert!(wait_exit(&mut child, T).success());
    (lines(&b), lines(&sc))
}

fn records(text: &[(i64, &str)]) -> Vec<(i64, String)> {
    text.iter().map(|(t, w)| (*t, (*w).to_owned())).collect()
}

/// Checks both counts against the reference, key by key.
fn check(records: &[(i64, String)], (builtin, script): (Vec<String>, Vec<String>)) {
    let want = per_key(&reference(records));
    assert_eq!(per_key(&builtin), want, "the built-in count");
    assert_eq!(per_key(&script), want, "the script count");
}

#[test]
fn a_key_idle_for_the_ttl_starts_again_when_its_records_come_in_one_file() {
    let input = records(&[(1000, "a"), (50_000, "c"), (100_000, "a")]);
    assert_eq!(reference(&input), ["a\t1", "c\t1", "a\t1"]);
    for engine in ["batch_size = 1", ""] {
        check(&input, run(engine, &[&input], |_| true));
    }
}

#[test]
fn a_key_idle_for_the_ttl_starts_again_when_its_expiry_timer_fired_first() {
    let input = records(&[(1000, "a"), (50_000, "c"), (100_000, "a")]);
    // Before the second file, the watermark (50 s) has fired `a`'s expiry
    // timer (21 s): only `c`'s is left.
    let got = run("", &[&input[..2], &input[2..]], |http| {
        builtin_timers(http) == Some(1.0)
    });
    check(&input, got);
}

/// A stream of `n` records over three words, mostly in order with steps of
/// whole seconds (so that records exactly a TTL after a key's newest come
/// up), some gaps longer than the TTL, and some records up to 4 s behind
/// the newest (never late: `out_of_order` is 5 s).
fn random_stream(rng: &mut Rng, n: usize) -> Vec<(i64, String)> {
    let mut newest = 0i64;
    (0..n)
        .map(|_| {
            let step = match rng.below(10) {
                0..=5 => rng.below(6) as i64,
                6..=8 => 10 + rng.below(15) as i64,
                _ => 20,
            };
            newest += step * 1000;
            let behind = if rng.below(5) == 0 {
                rng.below(5) as i64 * 1000
            } else {
                0
            };
            let word = ["a", "b", "c"][rng.below(3) as usize];
            ((newest - behind).max(0), word.to_owned())
        })
        .collect()
}

#[test]
fn expiries_depend_on_event_time_only_not_on_how_the_input_arrives() {
    let mut rng = Rng::from_env();
    for round in 0..3 {
        let input = random_stream(&mut rng, 60);
        let counts = reference(&input);
        let ones = counts.iter().filter(|l| l.ends_with("\t1")).count();
        // Three first records; the rest of the ones are expiries.
        assert!(
            ones > 3 + 2 && ones + 10 < input.len(),
            "round {round}: the stream exercises expiry and continued counts: {counts:?}"
        );
        // Cut into one to four files at random places.
        let mut cuts: Vec<usize> = (0..rng.below(4))
            .map(|_| 1 + rng.below(input.len() as u64 - 1) as usize)
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut chunks = Vec::new();
        let mut from = 0;
        for c in cuts.into_iter().chain([input.len()]) {
            chunks.push(&input[from..c]);
            from = c;
        }
        let engine = if round == 0 { "batch_size = 1" } else { "" };
        eprintln!("round {round}: {} files, `{engine}`", chunks.len());
        check(&input, run(engine, &chunks, |_| true));
    }
}
