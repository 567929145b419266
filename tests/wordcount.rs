//! The example word count gives the exact running counts of its text.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;
use support::*;

/// Words as the `split` built-in defines them (for ASCII text): runs of
/// letters, digits and apostrophes, lower-cased.
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .collect()
}

#[test]
fn wordcount_gives_exact_running_counts() {
    let root = env!("CARGO_MANIFEST_DIR");
    let input = std::fs::read_to_string(format!("{root}/examples/wordcount/input.txt"))
        .expect("bundled text");
    let s = Scratch::new();
    let topo = s.write(
        "wc.toml",
        &format!(
            r#"
[service]
data_dir = "{{dir}}/data"
[engine]
shards = 3
[sources.lines]
type = "file"
path = "{root}/examples/wordcount/input.txt"
[computations.words]
type = "split"
inputs = ["lines"]
lowercase = true
[computations.counts]
type = "count"
inputs = [{{ from = "words", key = "value" }}]
[sinks.out]
type = "file"
inputs = ["counts"]
path = "{{dir}}/counts.jsonl"
"#
        ),
    );
    let out = run_to_end(&topo, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    for w in words(&input) {
        *expected.entry(w).or_insert(0) += 1;
    }
    let pairs = read_jsonl(&s.path("counts.jsonl"));
    let got = assert_running_counts(&pairs);
    assert_eq!(got, expected);
    assert_eq!(pairs.len() as u64, expected.values().sum::<u64>());

    // A second run on the same data dir has nothing left to do and adds nothing.
    let again = run_to_end(&topo, Duration::from_secs(60));
    assert!(again.status.success());
    assert_eq!(read_jsonl(&s.path("counts.jsonl")).len(), pairs.len());
}

#[test]
fn the_bundled_example_topology_validates() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = millrace()
        .args(["validate", &format!("{root}/examples/wordcount.toml")])
        .output()
        .expect("run validate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains("ok: 1 sources, 2 computations, 1 sinks"),
        "{summary}"
    );
}

#[test]
fn every_example_topology_validates() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/") {
        let path = entry.expect("entry").path();
        // A topology beside a Rust example uses that example's own kinds.
        if path.extension().is_some_and(|e| e == "toml") && !path.with_extension("rs").exists() {
            let out = millrace()
                .args(["validate", path.to_str().expect("utf-8")])
                .output()
                .expect("run validate");
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 7, "only {checked} example topologies found");
}
