//! The crash test: a million records through a running count into a file
//! sink, the worker SIGKILLed at random moments and restarted each time. At
//! the end every key holds exactly the counts 1..n, each once.

mod support;

use std::process::Stdio;
use std::time::Duration;
use support::*;

const RECORDS: u64 = 1_000_000;
const KEYS: u64 = 5_000;
const KILLS: usize = 6;

#[test]
fn sigkill_at_random_moments_loses_and_repeats_nothing() {
    let s = Scratch::new();
    let topo = count_pipeline(&s, "shards = 8", (RECORDS, KEYS, 11), "type = \"count\"");
    let out = s.path("out.jsonl");
    let mut rng = Rng::from_env();
    // Roughly 60 bytes per output line.
    let total_bytes = RECORDS * 60;
    let mut kills = 0;
    while kills < KILLS {
        // Killed when this test fails, too.
        let http = format!("127.0.0.1:{}", free_port());
        let mut child = Running(
            millrace()
                .args(["run", topo.to_str().expect("path"), "--http", &http])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn"),
        );
        // Some kills land during start-up and recovery, most mid-stream.
        let start = file_len(&out);
        let target = if rng.below(4) == 0 {
            start
        } else {
            start + 1 + rng.below(total_bytes / (KILLS as u64 + 2))
        };
        let reached = wait_until(Duration::from_secs(120), || {
            file_len(&out) >= target || child.try_wait().ok().flatten().is_some()
        });
        assert!(reached, "no progress towards {target} bytes");
        if child.try_wait().expect("try_wait").is_some() {
            break; // finished before this kill: fewer kills, checked below
        }
        // No consumer ever saw a production past the next one it expected
        // (a lost production would leave it waiting behind a gap forever).
        if target > start {
            let gaps = metric(&http, "millrace_sequence_gaps_total{component=\"counts\"}")
                .expect("a running worker exports millrace_sequence_gaps_total for counts");
            assert_eq!(gaps, 0.0, "sequence gaps at counts");
        }
        kill9(&mut child);
        kills += 1;
    }
    assert_eq!(kills, KILLS, "the run finished before {KILLS} kills");
    let last = run_to_end(&topo, Duration::from_secs(300));
    assert!(
        last.status.success(),
        "{}",
        String::from_utf8_lossy(&last.stderr)
    );

    let pairs = read_jsonl(&out);
    let counts = assert_running_counts(&pairs);
    assert_eq!(pairs.len() as u64, RECORDS, "records in the sink");
    // Per key, the totals an independent model of the generator predicts.
    assert_eq!(counts, generator_key_counts(RECORDS, KEYS, 11));

    // Everything was acknowledged, so every production is gone from the outbox
    // (point deletes and range deletes, across the restarts).
    let inspect = millrace()
        .args(["inspect", s.path("data").to_str().expect("path"), "--json"])
        .output()
        .expect("inspect");
    assert!(inspect.status.success(), "{inspect:?}");
    let data: serde_json::Value = serde_json::from_slice(&inspect.stdout).expect("inspect json");
    let components = data["components"].as_object().expect("components");
    assert!(components.contains_key("counts"), "{data}");
    for (name, c) in components {
        assert_eq!(c["outbox"], 0, "{name} still has productions in its outbox");
    }
}
