//! Scripted computations (`type = "script"`) through the real binary: the
//! lecture's pipelines as topology files only, exactly once across SIGKILLs,
//! and errors that name their line and never stop a shard. Expected outputs
//! come from small models of each pipeline written here.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;
use support::*;

const T: Duration = Duration::from_secs(60);

/// Runs `examples/NAME.toml` to its end with its paths moved into `s`.
fn run_example(s: &Scratch, name: &str) {
    let root = std::env::current_dir().expect("cwd");
    let text = std::fs::read_to_string(root.join(format!("examples/{name}.toml")))
        .expect("example")
        .replace(
            &format!("target/{name}"),
            &s.path("out").display().to_string(),
        )
        .replace(
            "examples/scripts",
            &root.join("examples/scripts").display().to_string(),
        );
    let topo = s.write(&format!("{name}.toml"), &text);
    let out = run_to_end(&topo, T);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!log.contains("bad record"), "{log}");
}

fn pairs(p: &std::path::Path) -> Vec<(String, String)> {
    lines(p)
        .into_iter()
        .map(|l| {
            let (k, v) = l.split_once('\t').expect("key<TAB>value");
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

fn input(name: &str) -> String {
    std::fs::read_to_string(format!("examples/scripts/{name}")).expect("input")
}

#[test]
fn hashtag_autocompletion_gives_the_top_three_tags_per_prefix() {
    let s = Scratch::new();
    run_example(&s, "hashtags");
    let want = top3_model();
    let emitted = pairs(&s.path("out/top3.txt"));
    let mut last: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (prefix, list) in emitted {
        let list: Vec<String> = serde_json::from_str(&list).expect("a JSON list");
        assert!(!list.is_empty() && list.len() <= 3, "{prefix}: {list:?}");
        last.insert(prefix, list);
    }
    assert_eq!(last, want);
}

/// The model of hashtag autocompletion: count each tag, then for every
/// prefix the three most frequent tags, ties in tag order.
fn top3_model() -> BTreeMap<String, Vec<String>> {
    let mut counts: BTreeMap<String, i64> = BTreeMap::new();
    for line in input("tweets.txt").lines() {
        for w in line.split(' ').skip(1) {
            if w.starts_with('#') && w.len() > 1 {
                *counts.entry(w.to_lowercase()).or_insert(0) += 1;
            }
        }
    }
    let mut want: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for tag in counts.keys() {
        for n in 2..=tag.len() {
            let mut top: Vec<&String> =
                counts.keys().filter(|t| t.starts_with(&tag[..n])).collect();
            top.sort_by(|a, b| counts[*b].cmp(&counts[*a]).then(a.cmp(b)));
            top.truncate(3);
            want.insert(tag[..n].to_owned(), top.into_iter().cloned().collect());
        }
    }
    want
}

#[test]
fn top_per_key_keeps_its_elements_ranked_by_a_score() {
    // The same pipeline with the built-in top instead of the third script.
    let s = Scratch::new();
    let root = std::env::current_dir().expect("cwd");
    let example = std::fs::read_to_string(root.join("examples/hashtags.toml")).expect("example");
    let cut = example.find("[computations.top3]").expect("top3");
    let sink = example.find("[sinks.out]").expect("sink");
    let text = format!(
        "{}[computations.top3]\ntype = \"top_per_key\"\ninputs = [\"prefixes\"]\nn = 3\nby = \"json:/count\"\nid = \"json:/tag\"\n\n{}",
        &example[..cut],
        &example[sink..]
    )
    .replace("target/hashtags", &s.path("out").display().to_string())
    .replace(
        "examples/scripts",
        &root.join("examples/scripts").display().to_string(),
    );
    let out = run_to_end(&s.write("top.toml", &text), T);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut last: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (prefix, list) in pairs(&s.path("out/top3.txt")) {
        let list: Vec<serde_json::Value> = serde_json::from_str(&list).expect("JSON list");
        assert!(list.len() <= 3);
        // Elements are kept whole: {"tag": .., "count": ..}.
        let tags = list
            .iter()
            .map(|e| {
                e["tag"]
                    .as_str()
                    .expect("an element with its tag")
                    .to_owned()
            })
            .collect();
        last.insert(prefix, tags);
    }
    assert_eq!(last, top3_model());
}

#[test]
fn the_stateful_word_count_keeps_running_counts_and_emits_finals_on_timeout() {
    let s = Scratch::new();
    run_example(&s, "stateful_wordcount");
    // The model of mapWithState with a 30 s timeout in event time.
    let ttl = 30;
    let mut last_seen: BTreeMap<String, (i64, u64)> = BTreeMap::new();
    let (mut running, mut finals) = (Vec::new(), Vec::new());
    for line in input("words.txt").lines() {
        let mut f = line.split(' ');
        let ts: i64 = f.next().expect("ts").parse().expect("number");
        for w in f {
            let n = match last_seen.get(w) {
                Some(&(t, n)) if ts < t + ttl => n + 1,
                Some(&(_, n)) => {
                    finals.push(format!("{w}\t{n}"));
                    1
                }
                None => 1,
            };
            last_seen.insert(w.to_owned(), (ts, n));
            running.push(format!("{w}\t{n}"));
        }
    }
    finals.extend(last_seen.iter().map(|(w, (_, n))| format!("{w}\t{n}")));
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    // Per word the running counts come in order.
    let got = lines(&s.path("out/running.txt"));
    for w in last_seen.keys() {
        let of = |v: &[String]| -> Vec<String> {
            v.iter()
                .filter(|l| l.starts_with(&format!("{w}\t")))
                .cloned()
                .collect()
        };
        assert_eq!(of(&got), of(&running), "running counts of {w}");
    }
    assert_eq!(sorted(got), sorted(running));
    assert_eq!(sorted(lines(&s.path("out/final.txt"))), sorted(finals));
}

#[test]
fn sessions_closed_by_event_time_timers() {
    let s = Scratch::new();
    run_example(&s, "sessions");
    // The model: per user, clicks more than 30 s apart start a new session.
    let mut per_user: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for line in input("clicks.txt").lines() {
        let (user, ts) = line.split_once(',').expect("user,ts");
        per_user
            .entry(user.to_owned())
            .or_default()
            .push(ts.parse().expect("number"));
    }
    let mut want = Vec::new();
    for (user, clicks) in per_user {
        let mut session: Vec<i64> = Vec::new();
        for t in clicks.into_iter().chain([i64::MAX]) {
            if let (Some(&first), Some(&last)) = (session.first(), session.last()) {
                if t > last + 30 {
                    want.push(format!(
                        "{user}\t{{\"clicks\":{},\"end\":{last},\"start\":{first}}}",
                        session.len()
                    ));
                    session.clear();
                }
            }
            session.push(t);
        }
    }
    want.sort();
    let mut got = lines(&s.path("out/sessions.txt"));
    got.sort();
    assert_eq!(got, want);
}

#[test]
fn a_scripted_count_is_exact_across_sigkills() {
    let s = Scratch::new();
    let (records, keys, seed) = (200_000, 300, 9);
    let topo = count_pipeline(
        &s,
        "shards = 4",
        (records, keys, seed),
        r#"type = "script"
script = """
fn process(key, value, ts, input) {
    let n = (state() ?? 0) + 1;
    set_state(n);
    emit(key, n);
}
""""#,
    );
    let out = s.path("out.jsonl");
    let mut rng = Rng::from_env();
    for _ in 0..3 {
        let mut child = spawn(&topo, "off");
        let target = file_len(&out) + 1 + rng.below(records * 50 / 5);
        assert!(wait_until(T, || file_len(&out) >= target
            || child.try_wait().ok().flatten().is_some()));
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "ended before the kill"
        );
        kill9(&mut child);
    }
    let last = run_to_end(&topo, Duration::from_secs(120));
    assert!(
        last.status.success(),
        "{}",
        String::from_utf8_lossy(&last.stderr)
    );
    let counts = assert_running_counts(&read_jsonl(&out));
    assert_eq!(counts, generator_key_counts(records, keys, seed));
}

fn validate(s: &Scratch, toml: &str) -> String {
    let file = s.write("bad.toml", toml);
    let out = millrace()
        .arg("validate")
        .arg(&file)
        .output()
        .expect("validate");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    String::from_utf8_lossy(&out.stderr).replace(&file.display().to_string(), "FILE")
}

#[test]
fn a_script_that_does_not_compile_names_its_line_in_the_topology() {
    let s = Scratch::new();
    let head = "[sources.gen]\ntype = \"generator\"\ncount = 10\n[computations.c]\ntype = \"script\"\ninputs = [\"gen\"]\n";
    // Line 7 is `script = """`; the script's third line is line 10.
    let err = validate(
        &s,
        &format!("{head}script = \"\"\"\nfn process(key, value, ts, input) {{\n    let x = 1;\n    emit(key, x +);\n}}\n\"\"\"\n"),
    );
    assert!(err.contains("FILE:10: `computations.c.script`"), "{err}");
    let err = validate(
        &s,
        &format!("{head}script = \"\"\"\nfn proc(k) {{ }}\n\"\"\"\n"),
    );
    assert!(
        err.contains("no `fn process(key, value, ts, input)`"),
        "{err}"
    );
    let err = validate(
        &s,
        &format!("{head}outputs = [\"errors\"]\nscript = \"fn process(k, v, t, i) {{ }}\"\n"),
    );
    assert!(err.contains("cannot be a named output"), "{err}");
}

#[test]
fn script_errors_go_to_the_errors_output_and_the_shard_goes_on() {
    let s = Scratch::new();
    std::fs::write(
        s.path("in.txt"),
        "ok 1\nboom 2\nloop 3\nundeclared 4\npast 5\nok 6\n",
    )
    .expect("write");
    let topo = s.write(
        "e.toml",
        r#"
[service]
data_dir = "{dir}/data"
[sources.lines]
type = "file"
path = "{dir}/in.txt"
[computations.s]
type = "script"
inputs = [{ from = "lines", key = "value" }]
max_operations = 10000
script = """
fn process(key, value, ts, input) {
    let word = value.split(" ")[0];
    if word == "boom" { let m = #{}; m.x.y = 1; }
    if word == "loop" { loop { } }
    if word == "undeclared" { emit_to("nowhere", key, 1); }
    if word == "past" { emit(key, 1, ts - 1); }
    emit(key, value);
}
"""
[sinks.out]
type = "file"
inputs = ["s"]
path = "{dir}/out.txt"
format = "text"
[sinks.errors]
type = "file"
inputs = ["s.errors"]
path = "{dir}/errors.txt"
format = "text"
"#,
    );
    let out = run_to_end(&topo, T);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    // Keyed by value, the lines are spread over shards: compare as sets.
    let sorted = |p: &str| {
        let mut v = lines(&s.path(p));
        v.sort();
        v
    };
    assert_eq!(sorted("out.txt"), ["ok 1\tok 1", "ok 6\tok 6"]);
    assert_eq!(
        sorted("errors.txt"),
        [
            "boom 2\tboom 2",
            "loop 3\tloop 3",
            "past 5\tpast 5",
            "undeclared 4\tundeclared 4"
        ]
    );
    for why in [
        "Too many operations",
        "no such output",
        "before the input's",
    ] {
        assert!(log.contains(why), "{why}: {log}");
    }
    assert!(
        log.contains("e.toml:"),
        "errors name the topology file: {log}"
    );
}

#[test]
fn hashtag_autocompletion_in_sliding_windows() {
    let s = Scratch::new();
    run_example(&s, "hashtags_windowed");
    // The model: windows of 4 s every 2 s (start a multiple of 2 with
    // start <= t < start + 4); per window the tag counts; per prefix and
    // window the three most frequent tags, ties in tag order.
    let mut per_window: BTreeMap<i64, BTreeMap<String, i64>> = BTreeMap::new();
    for line in input("tweets.txt").lines() {
        let mut words = line.split(' ');
        let t: i64 = words.next().expect("ts").parse().expect("number");
        for w in words.filter(|w| w.starts_with('#') && w.len() > 1) {
            for start in [t.div_euclid(2) * 2 - 2, t.div_euclid(2) * 2] {
                *per_window
                    .entry(start)
                    .or_default()
                    .entry(w.to_lowercase())
                    .or_insert(0) += 1;
            }
        }
    }
    let mut want: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (start, counts) in &per_window {
        for tag in counts.keys() {
            for n in 2..=tag.len() {
                let mut top: Vec<&String> =
                    counts.keys().filter(|t| t.starts_with(&tag[..n])).collect();
                top.sort_by(|a, b| counts[*b].cmp(&counts[*a]).then(a.cmp(b)));
                top.truncate(3);
                want.insert(
                    format!("{}@{start}", &tag[..n]),
                    top.into_iter().cloned().collect(),
                );
            }
        }
    }
    let mut last: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (key, list) in pairs(&s.path("out/top3.txt")) {
        let list: Vec<serde_json::Value> = serde_json::from_str(&list).expect("JSON list");
        let tags = list
            .iter()
            .map(|e| e["tag"].as_str().expect("tag").to_owned())
            .collect();
        last.insert(key, tags);
    }
    assert_eq!(last, want);
}

/// Runs `millrace run FILE` to its end within `timeout`, reading the
/// worker's peak resident memory (`VmHWM`, KiB) from /proc while it runs;
/// returns whether it succeeded, its log and that peak.
fn run_to_end_measured(
    s: &Scratch,
    topology: &std::path::Path,
    timeout: Duration,
) -> (bool, String, u64) {
    let log = s.path("worker.log");
    let mut child = millrace()
        .args([
            "run",
            topology.to_str().expect("utf-8 path"),
            "--http",
            "off",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn millrace");
    let status = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    let mut exit = None;
    let ended = wait_until(timeout, || {
        if let Some(kib) = std::fs::read_to_string(&status).ok().and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        }) {
            peak = peak.max(kib);
        }
        exit = child.try_wait().expect("try_wait");
        exit.is_some()
    });
    if !ended {
        kill9(&mut child);
        panic!("millrace did not end within {timeout:?}");
    }
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    // Without its colours: `key=x`, not `key\x1b[0m\x1b[2m=\x1b[0mx`.
    let mut plain = String::with_capacity(log.len());
    let mut rest = log.as_str();
    while let Some(at) = rest.find('\x1b') {
        plain.push_str(&rest[..at]);
        rest = rest[at..].find('m').map_or("", |end| &rest[at + end + 1..]);
    }
    plain.push_str(rest);
    let log = plain;
    (exit.is_some_and(|e| e.success()), log, peak)
}

/// Scripts that try to exhaust the worker, one per input line (keyed by
/// the line): each call fails with a limit error naming the script's line,
/// its record goes to `s.errors`, and the worker goes on and ends.
#[test]
fn hostile_scripts_hit_a_limit_with_their_line_and_the_worker_survives() {
    let s = Scratch::new();
    let hostile = [
        // (the line's first word, what the script does, the error it gets)
        (
            "map",
            r#"let s = "x"; s.pad(65536, "y"); let m = #{}; let i = 0; loop { m["k" + i] = s + i; i += 1; }"#,
            "max_string_bytes",
        ),
        (
            "memory",
            r#"let s = "x"; s.pad(8000000, "y"); hog(0, s);"#,
            "max_memory_bytes",
        ),
        (
            "emit",
            r#"let s = "x"; s.pad(1048576, "y"); loop { emit(key, s); }"#,
            "max_emit_bytes",
        ),
        ("emits", "loop { emit(key, 1); }", "max_emits"),
        (
            "deep",
            "let a = []; for i in 0..200000 { a = [a]; }",
            "nested",
        ),
        (
            "string",
            r#"let s = "x"; loop { s += s; }"#,
            "Length of string too large",
        ),
        ("calls", "down(0);", "Stack overflow"),
        ("ops", "let n = 0; loop { n += 1; }", "Too many operations"),
    ];
    let mut script = String::from("fn down(n) { down(n + 1) }\nfn hog(n, s) { let t = s + n; hog(n + 1, t) }\nfn process(key, value, ts, input) {\n    let word = value.split(\" \")[0];\n");
    for (word, body, _) in &hostile {
        script.push_str(&format!("    if word == \"{word}\" {{ {body} }}\n"));
    }
    script.push_str("    emit(key, value);\n}\n");
    let input: String = hostile
        .iter()
        .map(|(w, ..)| format!("{w} 1\n"))
        .chain(["ok 2\n".to_owned()])
        .collect();
    std::fs::write(s.path("in.txt"), input).expect("write");
    let toml = format!(
        r#"[service]
data_dir = "{{dir}}/data"
[sources.lines]
type = "file"
path = "{{dir}}/in.txt"
[computations.s]
type = "script"
inputs = [{{ from = "lines", key = "value" }}]
script = """
{script}"""
[sinks.out]
type = "file"
inputs = ["s"]
path = "{{dir}}/out.txt"
format = "text"
[sinks.errors]
type = "file"
inputs = ["s.errors"]
path = "{{dir}}/errors.txt"
format = "text"
"#
    );
    let topo = s.write("e.toml", &toml);
    let (ok, log, peak_kib) = run_to_end_measured(&s, &topo, Duration::from_secs(120));
    assert!(ok, "{log}");
    eprintln!("peak resident memory of the worker: {peak_kib} KiB");
    let sorted = |p: &str| {
        let mut v = lines(&s.path(p));
        v.sort();
        v
    };
    assert_eq!(sorted("out.txt"), ["ok 2\tok 2"]);
    let mut want: Vec<String> = hostile
        .iter()
        .map(|(w, ..)| format!("{w} 1\t{w} 1"))
        .collect();
    want.sort();
    assert_eq!(sorted("errors.txt"), want);
    // Each failure is logged with the computation, the key, and the line
    // of the topology file its script line is on.
    for (word, _, why) in &hostile {
        // The line the limit was hit on (the recursions' in their function).
        let line = match *word {
            "calls" => "fn down(n)".to_owned(),
            "memory" => "fn hog(n, s)".to_owned(),
            _ => format!("if word == \"{word}\""),
        };
        let at = toml
            .lines()
            .position(|l| l.contains(&line))
            .expect("the line")
            + 1;
        let logged = log.lines().find(|l| l.contains(&format!("key={word} 1")));
        let logged = logged.unwrap_or_else(|| panic!("{word}: no log line in {log}"));
        assert!(logged.contains("component=\"s\""), "{logged}");
        assert!(
            logged.contains(&format!("e.toml:{at}:")),
            "{word} at line {at}: {logged}"
        );
        assert!(logged.contains(why), "{word}: {why}: {logged}");
    }
    // Every call's memory is bounded (64 MiB by default, 2.5 times that at
    // most while a call runs): the worker's peak stays far below what the
    // map and emit loops reach without a bound (gigabytes).
    assert!(peak_kib < 512 * 1024, "peak {peak_kib} KiB");
}
