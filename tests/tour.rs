//! The README's tour (`examples/tour.toml`) runs as the README says: clicks
//! read with their event time, a script keeping each user's count, and
//! one-minute windows, whose panes match a model of the input exactly.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;
use support::*;

#[test]
fn the_tour_counts_each_users_clicks_per_event_time_minute() {
    let s = Scratch::new();
    let root = std::env::current_dir().expect("cwd");
    let text = std::fs::read_to_string(root.join("examples/tour.toml"))
        .expect("examples/tour.toml")
        .replace("target/tour", &s.path("out").display().to_string())
        .replace(
            "examples/scripts",
            &root.join("examples/scripts").display().to_string(),
        );
    let topo = s.write("tour.toml", &text);
    let out = run_to_end(&topo, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The model: clicks per (user, minute) of the input file.
    let input = std::fs::read_to_string("examples/scripts/clicks.txt").expect("input");
    let mut want: BTreeMap<(String, i64), u64> = BTreeMap::new();
    for line in input.lines() {
        let (user, secs) = line.split_once(',').expect("user,second");
        let minute = secs.parse::<i64>().expect("seconds") / 60;
        *want.entry((user.to_owned(), minute)).or_insert(0) += 1;
    }

    let mut got: BTreeMap<(String, i64), u64> = BTreeMap::new();
    for line in lines(&s.path("out/per_minute.txt")) {
        let (user, pane) = line.split_once('\t').expect("key<TAB>value");
        let pane: serde_json::Value = serde_json::from_str(pane).expect("a JSON pane");
        assert_eq!(pane["pane"]["timing"], "on_time", "{line}");
        let start = pane["window"]["start"].as_i64().expect("window start");
        let count = pane["value"].as_u64().expect("a count");
        let before = got.insert((user.to_owned(), start / 60_000_000), count);
        assert_eq!(before, None, "one pane per user and minute: {line}");
    }
    assert_eq!(got, want);
}
