//! Windows, triggers, lateness and accumulation, through the real binary.

mod support;

use serde_json::Value;
use std::time::Duration;
use support::*;

const T: Duration = Duration::from_secs(60);

/// The JSON values of a text sink (`key<TAB>json`).
fn panes(p: &std::path::Path) -> Vec<(String, Value)> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let (k, v) = l.split_once('\t').expect("key<TAB>value");
            (
                k.to_owned(),
                serde_json::from_str(v).unwrap_or_else(|e| panic!("{v}: {e}")),
            )
        })
        .collect()
}

/// Panes [7], then [3, 4] (late), then [8] (late, at expiry) of window [0s, 10s) of key `a`.
fn run_three_panes(accumulation: &str) -> Vec<Value> {
    let s = Scratch::new();
    let topo = window_topology(
        &s,
        "",
        r#"{ kind = "fixed", size = "10s" }"#,
        &format!(
            "aggregate = \"sum\"\nallowed_lateness = \"30s\"\naccumulation = \"{accumulation}\"\ntrigger = {{ late = {{ count = 2 }} }}"
        ),
        r#"{ out_of_order = "0s" }"#,
    );
    let (inp, out) = (s.path("in"), s.path("out.txt"));
    let mut child = spawn(&topo, "off");
    let for_a = |n: usize| {
        let out = out.clone();
        move || panes(&out).iter().filter(|(k, _)| k == "a").count() >= n
    };
    // 7 at 1s; then the watermark passes 10s (an event of key b at 25s): on time.
    add(&inp, "1.csv", "a,1,7\nb,25,0\n");
    assert!(wait_until(T, for_a(1)), "on-time pane");
    // A crash after each firing: the pane's expiry timer and the late
    // trigger must come back from the committed state.
    kill9(&mut child);
    let mut child = spawn(&topo, "off");
    // 3 and 4 arrive late, within the allowed lateness: a late pane after two.
    add(&inp, "2.csv", "a,2,3\na,3,4\n");
    let want = if accumulation == "retracting" { 3 } else { 2 };
    assert!(wait_until(T, for_a(want)), "late pane of two");
    kill9(&mut child);
    let mut child = spawn(&topo, "off");
    // 8, then the watermark passes 10s + 30s: the window expires with a last pane.
    add(&inp, "3.csv", "a,4,8\nb,100,0\n");
    let want = if accumulation == "retracting" { 5 } else { 3 };
    assert!(wait_until(T, for_a(want)), "final pane");
    // Too late now: goes to w.late.
    add(&inp, "4.csv", "a,5,1\n");
    assert!(wait_until(T, || std::fs::read_to_string(
        s.path("late.txt")
    )
    .unwrap_or_default()
        == "a\t1\n"));
    term(&child);
    assert!(wait_exit(&mut child, T).success());
    panes(&s.path("out.txt"))
        .into_iter()
        .filter(|(k, _)| k == "a")
        .map(|(_, v)| v)
        .collect()
}

fn summary(panes: &[Value]) -> Vec<String> {
    panes
        .iter()
        .map(|p| {
            assert_eq!(p["window"]["start"], 0);
            assert_eq!(p["window"]["end"], 10_000_000);
            let r = if p["retraction"] == true {
                "retract "
            } else {
                ""
            };
            format!(
                "{r}{} {} #{}",
                p["value"],
                p["pane"]["timing"].as_str().unwrap_or("?"),
                p["pane"]["index"]
            )
        })
        .collect()
}

#[test]
fn discarding_panes_hold_only_their_own_elements() {
    assert_eq!(
        summary(&run_three_panes("discarding")),
        ["7 on_time #0", "7 late #1", "8 late #2"]
    );
}

#[test]
fn accumulating_panes_hold_everything_so_far() {
    assert_eq!(
        summary(&run_three_panes("accumulating")),
        ["7 on_time #0", "14 late #1", "22 late #2"]
    );
}

#[test]
fn retracting_panes_withdraw_the_previous_one() {
    assert_eq!(
        summary(&run_three_panes("retracting")),
        [
            "7 on_time #0",
            "retract 7 late #1",
            "14 late #1",
            "retract 14 late #2",
            "22 late #2"
        ]
    );
}

#[test]
fn an_early_pane_fires_at_its_count_and_the_rest_on_time() {
    let s = Scratch::new();
    let topo = window_topology(
        &s,
        "",
        r#"{ kind = "fixed", size = "10s" }"#,
        "aggregate = \"sum\"\ntrigger = { early_count = 2 }",
        r#"{ out_of_order = "0s" }"#,
    );
    let (inp, out) = (s.path("in"), s.path("out.txt"));
    let for_a = |n: usize| {
        let out = out.clone();
        move || panes(&out).iter().filter(|(k, _)| k == "a").count() >= n
    };
    let mut child = spawn(&topo, "off");
    // Two elements of window [0s, 10s): the early trigger fires; a third
    // waits for the on-time pane.
    add(&inp, "1.csv", "a,1,3\na,2,4\na,3,5\n");
    assert!(wait_until(T, for_a(1)), "early pane");
    // A stop (which commits all three) and a start: no record of `a` comes
    // again, so only the on-time timer rebuilt from the pane's state can
    // fire it.
    term(&child);
    assert!(wait_exit(&mut child, T).success());
    let mut child = spawn(&topo, "off");
    // The watermark passes 10s: on time, with the element since the early pane.
    add(&inp, "2.csv", "b,25,0\n");
    assert!(wait_until(T, for_a(2)), "on-time pane");
    term(&child);
    assert!(wait_exit(&mut child, T).success());
    let got: Vec<Value> = panes(&out)
        .into_iter()
        .filter(|(k, _)| k == "a")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(summary(&got), ["7 early #0", "5 on_time #1"]);
}

#[test]
fn out_of_order_sessions_merge() {
    let s = Scratch::new();
    let topo = window_topology(
        &s,
        "",
        r#"{ kind = "session", gap = "5s" }"#,
        "aggregate = \"collect\"",
        r#"{ out_of_order = "60s" }"#,
    );
    let mut child = spawn(&topo, "off");
    // Sessions [1,6) and [10,15) of key a, bridged by [5.5,10.5) arriving last: [1,15).
    add(
        &s.path("in"),
        "1.csv",
        "a,1,x\na,10,y\nb,3,z\na,5.5,w\nc,200,end\n",
    );
    let out = s.path("out.txt");
    assert!(wait_until(T, || panes(&out).len() >= 2));
    term(&child);
    assert!(wait_exit(&mut child, T).success());
    let mut got: Vec<String> = panes(&out)
        .iter()
        .map(|(k, v)| {
            format!(
                "{k} [{},{}) {}",
                v["window"]["start"], v["window"]["end"], v["value"]
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            "a [1000000,15000000) [\"x\",\"y\",\"w\"]",
            "b [3000000,8000000) [\"z\"]"
        ]
    );
}

#[test]
fn a_window_fed_by_an_idle_source_still_fires() {
    let s = Scratch::new();
    let topo = window_topology(
        &s,
        "",
        r#"{ kind = "fixed", size = "10s" }"#,
        "aggregate = \"count\"",
        r#"{ out_of_order = "1h", idle_after = "300ms" }"#,
    );
    let mut child = Running(
        millrace()
            .args(["run", topo.to_str().expect("utf-8 path"), "--http", "off"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn millrace"),
    );
    // The watermark stays an hour behind the data; only idleness releases it.
    add(&s.path("in"), "1.csv", "a,1,x\na,2,y\nb,12,z\n");
    let out = s.path("out.txt");
    assert!(
        wait_until(T, || panes(&out).len() >= 2),
        "both windows fired once the source went idle"
    );
    term(&child);
    assert!(wait_exit(&mut child, T).success());
    // The idle watermark stops following the clock while draining, so the
    // drain finds the graph quiet instead of running out its timeout.
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut log)
        .expect("read stderr");
    assert!(!log.contains("drain timed out"), "{log}");
    let mut got: Vec<String> = panes(&out)
        .iter()
        .map(|(k, v)| format!("{k} {} {}", v["window"]["start"], v["value"]))
        .collect();
    got.sort();
    assert_eq!(got, ["a 0 2", "b 10000000 1"]);
}

#[test]
fn windowed_results_are_exact_with_and_without_sigkills() {
    let topology = |s: &Scratch| {
        s.write(
            "gen.toml",
            r#"
[service]
data_dir = "{dir}/data"
[engine]
shards = 4
[sources.gen]
type = "generator"
count = 300000
keys = 50
seed = 3
event_step = "100us"
[computations.per_second]
type = "window"
inputs = ["gen"]
window = { kind = "fixed", size = "1s" }
aggregate = "count"
[sinks.out]
type = "file"
inputs = ["per_second"]
path = "{dir}/out.txt"
format = "text"
"#,
        )
    };
    let sorted = |p: &std::path::Path| {
        let mut l: Vec<String> = std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        l.sort();
        l
    };
    // The expected panes, from a model of the generator: record i has event
    // time BASE + i * 100us, so one-second window w holds records
    // w * 10_000 .. (w + 1) * 10_000; 30 windows for each of 50 keys.
    const BASE: i64 = 1_700_000_000_000_000;
    let mut per_window: std::collections::BTreeMap<(String, i64), u64> = Default::default();
    for (i, key) in generator_keys(300_000, 50, 3).enumerate() {
        *per_window.entry((key, i as i64 / 10_000)).or_insert(0) += 1;
    }
    let mut want: Vec<String> = per_window
        .iter()
        .map(|((key, w), n)| {
            let start = BASE + w * 1_000_000;
            format!(
                "{key}\t{{\"pane\":{{\"index\":0,\"timing\":\"on_time\"}},\"value\":{n},\"window\":{{\"end\":{},\"start\":{start}}}}}",
                start + 1_000_000
            )
        })
        .collect();
    want.sort();
    assert_eq!(want.len(), 30 * 50);

    let calm = Scratch::new();
    let out = run_to_end(&topology(&calm), Duration::from_secs(120));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sorted(&calm.path("out.txt")), want);

    let rough = Scratch::new();
    let topo = topology(&rough);
    let mut rng = Rng::from_env();
    for _ in 0..5 {
        let mut child = spawn(&topo, "off");
        let before = file_len(&rough.path("out.txt"));
        let target = before + rng.below(12_000);
        wait_until(T, || {
            file_len(&rough.path("out.txt")) > target || child.try_wait().ok().flatten().is_some()
        });
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        kill9(&mut child);
    }
    let out = run_to_end(&topo, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sorted(&rough.path("out.txt")), want);
}
