//! The window computation at its edges, driven by the engine's test harness
//! with a fake watermark and a fake processing-time clock: the watermark at
//! `end - 1`, `end` and `end + allowed_lateness`; sessions exactly `gap`
//! apart and one microsecond closer; sliding-window edges; each trigger kind,
//! early and late; and what a restart keeps.

use super::*;
use millrace_config::HumanDuration;
use millrace_engine::testing::{Harness, Output as Out};
use serde_json::Value;
use std::time::Duration;

fn us(n: u64) -> HumanDuration {
    HumanDuration(Duration::from_micros(n))
}

fn fixed(size: u64) -> WindowConfig {
    WindowConfig {
        window: WindowSpec::Fixed { size: us(size) },
        early: None,
        late: Trigger::Count(1),
        lateness: 0,
        accumulation: Accumulation::Discarding,
        aggregate: crate::aggregate::Aggregate::Builtin(Acc::Count(0)),
        output: Output::Aggregate,
        sides: Vec::new(),
    }
}

fn with(window: WindowSpec) -> WindowConfig {
    WindowConfig { window, ..fixed(1) }
}

/// A window computation in a fresh store; the directory lives as long as the harness.
fn harness(cfg: &WindowConfig) -> (Harness, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let h =
        Harness::open(dir.path(), Box::new(Window::new(cfg.clone())), &["late"]).expect("harness");
    (h, dir)
}

/// A pane as `(start, end, timing, value)`, with `-` before the timing of a
/// retraction; records on `late` as `("late", key, ts)`.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Pane(i64, i64, String, i64),
    Late(String, i64),
}

fn seen(outs: Vec<Out>) -> Vec<Seen> {
    outs.into_iter()
        .map(|o| {
            if o.output == "late" {
                return Seen::Late(String::from_utf8_lossy(&o.key).into_owned(), o.timestamp);
            }
            assert_eq!(o.output, "", "unexpected output {o:?}");
            let v: Value = serde_json::from_slice(&o.value).expect("pane JSON");
            let (start, end) = (v["window"]["start"].as_i64(), v["window"]["end"].as_i64());
            let (start, end) = (start.expect("start"), end.expect("end"));
            assert_eq!(
                o.timestamp,
                end - 1,
                "a pane is stamped at its window's last instant"
            );
            let mut timing = v["pane"]["timing"].as_str().expect("timing").to_owned();
            if v["retraction"] == Value::Bool(true) {
                timing.insert(0, '-');
            }
            Seen::Pane(start, end, timing, v["value"].as_i64().expect("count"))
        })
        .collect()
}

fn pane(start: i64, end: i64, timing: &str, n: i64) -> Seen {
    Seen::Pane(start, end, timing.to_owned(), n)
}

#[test]
fn a_window_fires_on_time_when_the_watermark_reaches_its_end_not_before() {
    let (mut h, _d) = harness(&fixed(10));
    h.process("k", "a", 0).unwrap();
    h.process("k", "b", 9).unwrap();
    assert_eq!(
        seen(h.advance_watermark(9).unwrap()),
        vec![],
        "watermark at end - 1"
    );
    assert_eq!(
        seen(h.advance_watermark(10).unwrap()),
        vec![pane(0, 10, "on_time", 2)]
    );
    assert_eq!(
        seen(h.advance_watermark(100).unwrap()),
        vec![],
        "fires once"
    );
    assert_eq!(
        h.state(b"k").unwrap(),
        None,
        "no lateness: state dropped at the end"
    );
    assert_eq!(h.pending_timers(), 0);
}

#[test]
fn allowed_lateness_ends_exactly_at_end_plus_lateness() {
    let cfg = WindowConfig {
        lateness: 5,
        ..fixed(10)
    };
    let (mut h, _d) = harness(&cfg);
    h.process("k", "a", 3).unwrap();
    assert_eq!(
        seen(h.advance_watermark(10).unwrap()),
        vec![pane(0, 10, "on_time", 1)]
    );
    // Late but within the lateness (watermark end .. end + lateness - 1).
    assert_eq!(
        seen(h.process("k", "b", 9).unwrap()),
        vec![pane(0, 10, "late", 1)]
    );
    assert_eq!(seen(h.advance_watermark(14).unwrap()), vec![]);
    assert_eq!(
        seen(h.process("k", "c", 0).unwrap()),
        vec![pane(0, 10, "late", 1)]
    );
    assert!(
        h.state(b"k").unwrap().is_some(),
        "kept until end + lateness"
    );
    // At end + lateness the window is closed: state gone, records go to `late`.
    assert_eq!(seen(h.advance_watermark(15).unwrap()), vec![]);
    assert_eq!(h.state(b"k").unwrap(), None);
    assert_eq!(
        seen(h.process("k", "d", 9).unwrap()),
        vec![Seen::Late("k".into(), 9)]
    );
}

#[test]
fn a_late_trigger_waits_for_its_count_and_expiry_fires_what_is_pending() {
    let cfg = WindowConfig {
        lateness: 100,
        late: Trigger::Count(2),
        ..fixed(10)
    };
    let (mut h, _d) = harness(&cfg);
    h.process("k", "on time", 5).unwrap();
    assert_eq!(
        seen(h.advance_watermark(10).unwrap()),
        vec![pane(0, 10, "on_time", 1)]
    );
    assert_eq!(seen(h.process("k", "a", 1).unwrap()), vec![]);
    assert_eq!(
        seen(h.process("k", "b", 2).unwrap()),
        vec![pane(0, 10, "late", 2)]
    );
    assert_eq!(seen(h.process("k", "c", 3).unwrap()), vec![]);
    // Expiry (end - 1 + lateness passed) fires the one pending element.
    assert_eq!(seen(h.advance_watermark(109).unwrap()), vec![]);
    assert_eq!(
        seen(h.advance_watermark(110).unwrap()),
        vec![pane(0, 10, "late", 1)]
    );
    assert_eq!(h.state(b"k").unwrap(), None);
}

/// The pane index of each output.
fn indexes(outs: &[Out]) -> Vec<i64> {
    outs.iter()
        .map(|o| {
            let v: Value = serde_json::from_slice(&o.value).expect("pane JSON");
            v["pane"]["index"].as_i64().expect("index")
        })
        .collect()
}

#[test]
fn a_window_first_seen_after_the_watermark_fires_at_once_then_as_the_late_trigger_says() {
    for accumulation in [Accumulation::Discarding, Accumulation::Accumulating] {
        let cfg = WindowConfig {
            lateness: 100,
            late: Trigger::Count(2),
            accumulation,
            ..fixed(10)
        };
        let (mut h, _d) = harness(&cfg);
        h.advance_watermark(10).unwrap();
        // Its end-of-window firing is due the moment it is seen: pane #0,
        // late, with its first element, whatever the late trigger.
        let out = h.process("k", "a", 1).unwrap();
        assert_eq!(indexes(&out), [0], "{accumulation:?}");
        assert_eq!(seen(out), vec![pane(0, 10, "late", 1)], "{accumulation:?}");
        // Then the late trigger counts afresh: two more elements.
        assert_eq!(seen(h.process("k", "b", 2).unwrap()), vec![]);
        let out = h.process("k", "c", 3).unwrap();
        assert_eq!(indexes(&out), [1], "{accumulation:?}");
        let n = if accumulation == Accumulation::Discarding {
            2
        } else {
            3
        };
        assert_eq!(seen(out), vec![pane(0, 10, "late", n)], "{accumulation:?}");
        assert_eq!(seen(h.process("k", "d", 4).unwrap()), vec![]);
        // The expiry fires the one pending element.
        let out = h.advance_watermark(110).unwrap();
        assert_eq!(indexes(&out), [2], "{accumulation:?}");
        let n = if accumulation == Accumulation::Discarding {
            1
        } else {
            4
        };
        assert_eq!(seen(out), vec![pane(0, 10, "late", n)], "{accumulation:?}");
        assert_eq!(h.state(b"k").unwrap(), None);
    }
}

#[test]
fn a_late_session_seen_alone_fires_at_once_and_one_that_merges_waits_for_its_trigger() {
    let cfg = WindowConfig {
        window: WindowSpec::Session { gap: us(10) },
        lateness: 100,
        late: Trigger::Count(2),
        ..fixed(1)
    };
    let (mut h, _d) = harness(&cfg);
    h.advance_watermark(50).unwrap();
    assert_eq!(
        seen(h.process("k", "a", 0).unwrap()),
        vec![pane(0, 10, "late", 1)]
    );
    // Merged into the session that already fired: the late trigger counts.
    assert_eq!(seen(h.process("k", "b", 5).unwrap()), vec![]);
    assert_eq!(
        seen(h.process("k", "c", 8).unwrap()),
        vec![pane(0, 18, "late", 2)]
    );
}

#[test]
fn sessions_exactly_a_gap_apart_stay_apart_and_one_microsecond_closer_merge() {
    let gap = WindowSpec::Session { gap: us(10) };
    let (mut h, _d) = harness(&with(gap));
    h.process("k", "a", 0).unwrap();
    h.process("k", "b", 10).unwrap();
    assert_eq!(
        seen(h.advance_watermark(100).unwrap()),
        vec![pane(0, 10, "on_time", 1), pane(10, 20, "on_time", 1)]
    );
    let (mut h, _d) = harness(&with(gap));
    h.process("k", "a", 0).unwrap();
    h.process("k", "b", 9).unwrap();
    assert_eq!(seen(h.advance_watermark(18).unwrap()), vec![]);
    assert_eq!(
        seen(h.advance_watermark(19).unwrap()),
        vec![pane(0, 19, "on_time", 2)]
    );
}

#[test]
fn a_record_that_bridges_two_sessions_merges_all_three() {
    let (mut h, _d) = harness(&with(WindowSpec::Session { gap: us(10) }));
    h.process("k", "a", 0).unwrap();
    h.process("k", "b", 15).unwrap();
    h.process("k", "c", 8).unwrap();
    assert_eq!(
        seen(h.advance_watermark(1000).unwrap()),
        vec![pane(0, 25, "on_time", 3)]
    );
}

#[test]
fn sliding_windows_take_a_record_at_their_edges_and_gaps_discard() {
    let sliding = |size, every| {
        with(WindowSpec::Sliding {
            size: us(size),
            every: us(every),
        })
    };
    let (mut h, _d) = harness(&sliding(10, 5));
    h.process("k", "a", 4).unwrap(); // [-5, 5) and [0, 10)
    h.process("k", "b", 5).unwrap(); // [0, 10) and [5, 15)
    assert_eq!(
        seen(h.advance_watermark(10).unwrap()),
        vec![pane(-5, 5, "on_time", 1), pane(0, 10, "on_time", 2)]
    );
    assert_eq!(
        seen(h.advance_watermark(15).unwrap()),
        vec![pane(5, 15, "on_time", 1)]
    );
    // Windows of 5 every 10: [0, 5), [10, 15); 5..9 are in none.
    let (mut h, _d) = harness(&sliding(5, 10));
    assert_eq!(seen(h.process("k", "a", 4).unwrap()), vec![]);
    assert_eq!(seen(h.process("k", "b", 5).unwrap()), vec![]);
    assert_eq!(seen(h.process("k", "c", 9).unwrap()), vec![]);
    assert_eq!(h.discarded(), 2, "records in a gap are discarded, not late");
    assert_eq!(
        seen(h.advance_watermark(20).unwrap()),
        vec![pane(0, 5, "on_time", 1)]
    );
}

#[test]
fn early_count_trigger_and_accumulation_modes() {
    let run = |accumulation| {
        let cfg = WindowConfig {
            early: Some(Trigger::Count(2)),
            accumulation,
            ..fixed(10)
        };
        let (mut h, _d) = harness(&cfg);
        let mut all = Vec::new();
        for (i, t) in [1, 2, 3].into_iter().enumerate() {
            all.extend(seen(h.process("k", format!("{i}"), t).unwrap()));
        }
        all.extend(seen(h.advance_watermark(10).unwrap()));
        all
    };
    assert_eq!(
        run(Accumulation::Discarding),
        vec![pane(0, 10, "early", 2), pane(0, 10, "on_time", 1)]
    );
    assert_eq!(
        run(Accumulation::Accumulating),
        vec![pane(0, 10, "early", 2), pane(0, 10, "on_time", 3)]
    );
    assert_eq!(
        run(Accumulation::Retracting),
        vec![
            pane(0, 10, "early", 2),
            pane(0, 10, "-on_time", 2),
            pane(0, 10, "on_time", 3)
        ]
    );
}

#[test]
fn an_early_processing_time_trigger_fires_when_the_clock_passes_its_period() {
    let cfg = WindowConfig {
        early: Some(Trigger::Every(us(50))),
        ..fixed(1_000)
    };
    let (mut h, _d) = harness(&cfg);
    h.advance_clock(100).unwrap();
    h.process("k", "a", 1).unwrap();
    h.advance_clock(120).unwrap();
    h.process("k", "b", 2).unwrap();
    assert_eq!(
        seen(h.advance_clock(150).unwrap()),
        vec![],
        "due at 150, fires after"
    );
    assert_eq!(
        seen(h.advance_clock(151).unwrap()),
        vec![pane(0, 1000, "early", 2)]
    );
    // Nothing new: the period does not fire an empty pane.
    assert_eq!(seen(h.advance_clock(1_000).unwrap()), vec![]);
    h.process("k", "c", 3).unwrap();
    assert_eq!(
        seen(h.advance_clock(1_051).unwrap()),
        vec![pane(0, 1000, "early", 1)]
    );
    // No early firing after the window's end: the on-time pane takes the rest.
    h.process("k", "d", 4).unwrap();
    assert_eq!(
        seen(h.advance_watermark(1_000).unwrap()),
        vec![pane(0, 1000, "on_time", 1)]
    );
    assert_eq!(seen(h.advance_clock(5_000).unwrap()), vec![]);
}

#[test]
fn composite_triggers_any_all_and_sequence() {
    let run = |early: Trigger, clock_after: i64| {
        let cfg = WindowConfig {
            early: Some(early),
            ..fixed(1_000)
        };
        let (mut h, _d) = harness(&cfg);
        let mut all = Vec::new();
        for t in 1..=3 {
            all.extend(seen(h.process("k", "x", t).unwrap()));
        }
        all.extend(seen(h.advance_clock(clock_after).unwrap()));
        all
    };
    let every = Trigger::Every(us(50));
    // Any: the count of 2 comes first.
    assert_eq!(
        run(Trigger::Any(vec![Trigger::Count(2), every.clone()]), 0),
        vec![pane(0, 1000, "early", 2)]
    );
    // All: the count is met, but only the period's end fires (3 elements).
    assert_eq!(
        run(Trigger::All(vec![Trigger::Count(2), every.clone()]), 0),
        vec![]
    );
    assert_eq!(
        run(Trigger::All(vec![Trigger::Count(2), every]), 51),
        vec![pane(0, 1000, "early", 3)]
    );
    // Sequence: one element, then two at a time.
    assert_eq!(
        run(
            Trigger::Sequence(vec![Trigger::Count(1), Trigger::Count(2)]),
            0
        ),
        vec![pane(0, 1000, "early", 1), pane(0, 1000, "early", 2)]
    );
}

#[test]
fn a_restart_keeps_panes_their_timers_and_the_watermark() {
    let cfg = WindowConfig {
        lateness: 5,
        ..fixed(10)
    };
    let (mut h, _d) = harness(&cfg);
    h.process("k", "a", 1).unwrap();
    h.process("k", "b", 12).unwrap();
    assert_eq!(
        seen(h.advance_watermark(10).unwrap()),
        vec![pane(0, 10, "on_time", 1)]
    );
    let mut h = h.restart(Box::new(Window::new(cfg.clone()))).unwrap();
    assert_eq!(h.watermark(), 10, "the watermark survives the restart");
    // The pane [10, 20) was restored with its on-time timer; [0, 10) with its expiry.
    assert_eq!(h.pending_timers(), 2);
    assert_eq!(
        seen(h.process("k", "c", 2).unwrap()),
        vec![pane(0, 10, "late", 1)]
    );
    assert_eq!(seen(h.advance_watermark(15).unwrap()), vec![]);
    // Older than the watermark reached before the restart plus lateness: late.
    assert_eq!(
        seen(h.process("k", "d", 4).unwrap()),
        vec![Seen::Late("k".into(), 4)]
    );
    assert_eq!(
        seen(h.advance_watermark(20).unwrap()),
        vec![pane(10, 20, "on_time", 1)]
    );
}

#[test]
fn sessions_a_gap_apart_stay_apart_in_either_order() {
    let (mut h, _d) = harness(&with(WindowSpec::Session { gap: us(10) }));
    h.process("k", "later", 10).unwrap();
    h.process("k", "earlier", 0).unwrap();
    assert_eq!(
        seen(h.advance_watermark(100).unwrap()),
        vec![pane(0, 10, "on_time", 1), pane(10, 20, "on_time", 1)]
    );
}

#[test]
fn a_merge_retracts_each_fired_session_with_its_own_window_and_timing() {
    let cfg = WindowConfig {
        window: WindowSpec::Session { gap: us(10) },
        early: Some(Trigger::Count(1)),
        accumulation: Accumulation::Retracting,
        lateness: 100,
        ..fixed(1)
    };
    let (mut h, _d) = harness(&cfg);
    assert_eq!(
        seen(h.process("k", "a", 0).unwrap()),
        vec![pane(0, 10, "early", 1)]
    );
    // The watermark passes the first session's end; nothing new since its
    // early firing, so no on-time pane.
    assert_eq!(seen(h.advance_watermark(10).unwrap()), vec![]);
    assert_eq!(
        seen(h.process("k", "b", 12).unwrap()),
        vec![pane(12, 22, "early", 1)]
    );
    // A record bridging both: each fired session is retracted with its own
    // window (stamped at its last instant) and timing (late for the one the
    // watermark passed), then the merged session fires with all three.
    assert_eq!(
        seen(h.process("k", "c", 8).unwrap()),
        vec![
            pane(0, 10, "-late", 1),
            pane(12, 22, "-early", 1),
            pane(0, 22, "early", 3)
        ]
    );
}

#[test]
fn panes_of_a_window_are_numbered_in_firing_order() {
    let cfg = WindowConfig {
        early: Some(Trigger::Count(1)),
        ..fixed(10)
    };
    let (mut h, _d) = harness(&cfg);
    let mut outs = h.process("k", "a", 1).unwrap();
    outs.extend(h.process("k", "b", 2).unwrap());
    h.process("k", "c", 3).unwrap();
    outs.extend(h.advance_watermark(10).unwrap());
    let index = |o: &Out| {
        let v: Value = serde_json::from_slice(&o.value).expect("pane JSON");
        v["pane"]["index"].as_i64().expect("index")
    };
    // The third record's early pane fired too; the on-time pane is empty.
    assert_eq!(outs.iter().map(index).collect::<Vec<_>>(), vec![0, 1]);
}

#[test]
fn a_merged_session_keeps_the_unfired_elements_of_what_it_absorbed() {
    let cfg = WindowConfig {
        window: WindowSpec::Session { gap: us(10) },
        early: Some(Trigger::Count(3)),
        ..fixed(1)
    };
    let (mut h, _d) = harness(&cfg);
    assert_eq!(seen(h.process("k", "a", 0).unwrap()), vec![]);
    assert_eq!(seen(h.process("k", "b", 12).unwrap()), vec![]);
    // Merged: 1 + 1 + the bridging record reach the early count of 3.
    assert_eq!(
        seen(h.process("k", "c", 8).unwrap()),
        vec![pane(0, 22, "early", 3)]
    );
    // The absorbed sessions' timers are gone: only the merged one's is left.
    assert_eq!(h.pending_timers(), 1);
}

#[test]
fn a_late_session_merged_into_a_later_one_is_on_time_again() {
    let cfg = WindowConfig {
        window: WindowSpec::Session { gap: us(10) },
        lateness: 100,
        ..fixed(1)
    };
    let (mut h, _d) = harness(&cfg);
    h.process("k", "a", 20).unwrap();
    h.advance_watermark(25).unwrap();
    // [12, 22) alone would be late; merged with [20, 30) it is not.
    assert_eq!(seen(h.process("k", "b", 12).unwrap()), vec![]);
    assert_eq!(
        seen(h.advance_watermark(30).unwrap()),
        vec![pane(12, 30, "on_time", 2)]
    );
}
