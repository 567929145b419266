//! `window`: the Dataflow model per key: windows (fixed, sliding, session),
//! triggers (at the watermark, early, late, count, composites), allowed
//! lateness and accumulation (discarding, accumulating, retracting).
//!
//! A key's open panes live in its state; each window has an event-time timer
//! at its end (the on-time firing), a garbage-collection timer at its end plus
//! the allowed lateness (a last firing if anything is pending, then the state
//! is dropped), and a processing-time timer while a periodic trigger waits.
//! A window first seen after the watermark passed its end fires with its
//! first element (the end-of-window firing it owes, as a late pane); the late
//! trigger governs its firings after that.
//!
//! Each output record is JSON, timestamped at the window's last instant:
//! `{"window":{"start":S,"end":E},"pane":{"index":I,"timing":"early|on_time|late"},"value":V}`;
//! a retraction carries `"retraction":true` and the value it withdraws.
//! Records later than the allowed lateness go, unchanged, to the output
//! `NAME.late` (and are counted in `millrace_late_records_total`).

mod config;
#[cfg(test)]
mod edge_tests;
mod pane;

pub use config::{Accumulation, Output, Trigger, WindowConfig, WindowSpec};
use pane::{
    deadline, decode_panes, encode_panes, pane_output, parse_tag, ready, tag, Pane, Timing,
};

use crate::aggregate::Acc;
use millrace_engine::{Computation, ComputationError, Context, Record, TimeDomain, Timer};
use serde_json::json;

/// The `window` computation (and `reduce_by_key_and_window`, `cogroup`, `join`).
#[derive(Clone)]
pub struct Window {
    cfg: WindowConfig,
}

impl Window {
    /// A window computation with these settings.
    pub fn new(cfg: WindowConfig) -> Self {
        Window { cfg }
    }

    fn load(ctx: &mut Context<'_>) -> Result<Vec<Pane>, ComputationError> {
        match ctx.state()? {
            None => Ok(Vec::new()),
            Some(b) => decode_panes(&b).map_err(|e| {
                ComputationError::BadRecord(format!("stored window state is not readable: {e}"))
            }),
        }
    }

    fn save(ctx: &mut Context<'_>, panes: &[Pane]) {
        if panes.is_empty() {
            ctx.clear_state();
        } else {
            ctx.set_state(encode_panes(panes));
        }
    }

    fn new_pane(&self, start: i64, end: i64) -> Pane {
        Pane {
            start,
            end,
            acc: self.cfg.aggregate.empty(),
            index: 0,
            on_time_done: false,
            since_fire: 0,
            first_at: None,
            step: 0,
            last: None,
        }
    }

    /// Whether windows of a key merge when they overlap (sessions).
    fn merges(&self) -> bool {
        matches!(self.cfg.window, WindowSpec::Session { .. })
    }

    /// Merges every session of this key that overlaps `pane` into it, then
    /// adds the record's value with `add`. In retracting mode each absorbed
    /// pane that fired is retracted with its own window and value, so a
    /// consumer that applies retractions ends with the merged pane alone.
    /// The merged pane is on time only while the watermark has not passed
    /// its end. The accumulators merge (and the value is added) before
    /// anything is emitted: if one of those fails, nothing was. Returns
    /// whether it absorbed any session.
    fn merge_overlapping(
        &self,
        ctx: &mut Context<'_>,
        panes: &mut Vec<Pane>,
        pane: &mut Pane,
        wm: i64,
        add: impl FnOnce(&mut Acc) -> Result<(), String>,
    ) -> Result<bool, ComputationError> {
        let mut absorbed = Vec::new();
        let mut i = 0;
        while i < panes.len() {
            if panes[i].start < pane.end && pane.start < panes[i].end {
                let old = panes.remove(i);
                pane.start = pane.start.min(old.start);
                pane.end = pane.end.max(old.end);
                absorbed.push(old);
                i = 0;
            } else {
                i += 1;
            }
        }
        for old in &mut absorbed {
            let acc = std::mem::replace(&mut old.acc, self.cfg.aggregate.empty());
            self.cfg
                .aggregate
                .merge(&mut pane.acc, acc)
                .map_err(ComputationError::BadRecord)?;
        }
        add(&mut pane.acc).map_err(ComputationError::BadRecord)?;
        let merged = !absorbed.is_empty();
        for mut old in absorbed {
            Self::clear_timers(ctx, &old);
            if let Some(last) = old.last.take() {
                let timing = if wm >= old.end {
                    Timing::Late
                } else {
                    Timing::Early
                };
                let r = pane_output(&old, timing, true, |out| out.push_str(&last.to_string()));
                ctx.produce(ctx.key().clone(), r, old.end - 1);
            }
            pane.index = pane.index.max(old.index);
            pane.since_fire += old.since_fire;
            pane.first_at = match (pane.first_at, old.first_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        let late = wm >= pane.end;
        if late != pane.on_time_done {
            pane.on_time_done = late;
            pane.step = 0;
        }
        Ok(merged)
    }

    /// Sets the event-time timer a pane waits for: its on-time firing at the
    /// window's end, or, once that is past, its expiry at the end plus the
    /// allowed lateness.
    fn arm(&self, ctx: &mut Context<'_>, p: &Pane) {
        if !p.on_time_done {
            ctx.set_timer(tag(b'e', p), TimeDomain::EventTime, p.end - 1);
        } else if self.cfg.lateness > 0 {
            ctx.set_timer(
                tag(b'g', p),
                TimeDomain::EventTime,
                (p.end - 1).saturating_add(self.cfg.lateness),
            );
        }
    }

    fn clear_timers(ctx: &mut Context<'_>, p: &Pane) {
        for k in [b'e', b'g', b'p'] {
            ctx.delete_timer(&tag(k, p));
        }
    }

    /// Emits pane `p` with `timing` and resets what the accumulation mode resets.
    fn fire(&self, ctx: &mut Context<'_>, p: &mut Pane, timing: Timing) {
        let key = ctx.key().clone();
        let ts = p.end - 1;
        match self.cfg.output {
            Output::Join => {
                let window = json!({"start": p.start, "end": p.end});
                let pane = json!({"index": p.index, "timing": timing.name()});
                if let Acc::Groups(g) = &p.acc {
                    let side = |i: usize| self.cfg.sides.get(i).and_then(|s| g.get(s));
                    if let (Some(left), Some(right)) = (side(0), side(1)) {
                        for l in left {
                            for r in right {
                                let v =
                                    json!({"window": window, "pane": pane, "left": l, "right": r});
                                ctx.produce(key.clone(), v.to_string(), ts);
                            }
                        }
                    }
                }
            }
            Output::Aggregate => {
                if self.cfg.accumulation == Accumulation::Retracting {
                    let value = self.cfg.aggregate.result(&p.acc);
                    if let Some(old) = p.last.replace(value) {
                        let r = pane_output(p, timing, true, |out| out.push_str(&old.to_string()));
                        ctx.produce(key.clone(), r, ts);
                    }
                }
                let agg = &self.cfg.aggregate;
                let v = pane_output(p, timing, false, |out| agg.write_result(&p.acc, out));
                ctx.produce(key, v, ts);
            }
        }
        if self.cfg.accumulation == Accumulation::Discarding {
            p.acc = self.cfg.aggregate.empty();
        }
        p.index += 1;
        p.since_fire = 0;
        p.first_at = None;
        p.step += 1;
    }

    /// Fires `p` if its early or late trigger is ready; otherwise arms a
    /// processing-time timer for when it may be.
    fn maybe_fire(&self, ctx: &mut Context<'_>, p: &mut Pane) {
        let (trigger, timing) = if p.on_time_done {
            (Some(&self.cfg.late), Timing::Late)
        } else {
            (self.cfg.early.as_ref(), Timing::Early)
        };
        let Some(trigger) = trigger else { return };
        let now = ctx.now();
        if p.since_fire > 0 && ready(trigger, p, now) {
            self.fire(ctx, p, timing);
            ctx.delete_timer(&tag(b'p', p));
        } else if let Some(at) = deadline(trigger, p) {
            ctx.set_timer(tag(b'p', p), TimeDomain::ProcessingTime, at);
        }
    }
}

impl Computation for Window {
    fn process_record(&mut self, ctx: &mut Context<'_>, r: Record) -> Result<(), ComputationError> {
        let wm = ctx.low_watermark();
        let now = ctx.now();
        let windows = self.cfg.assign(r.timestamp);
        if windows.is_empty() {
            // In a gap between sliding windows: not late, just in no window.
            ctx.discard();
            return Ok(());
        }
        // Only groups (cogroup, join) need the input's name.
        let input = if self.cfg.aggregate.by_input() {
            ctx.input().to_owned()
        } else {
            String::new()
        };
        let agg = &self.cfg.aggregate;
        let mut panes = Self::load(ctx)?;
        let mut accepted = false;
        for (start, end) in windows {
            if wm >= end.saturating_add(self.cfg.lateness) {
                continue; // this window is closed
            }
            accepted = true;
            let (mut pane, mut new) =
                match panes.iter().position(|p| p.start == start && p.end == end) {
                    Some(i) if !self.merges() => (panes.remove(i), false),
                    _ => {
                        // A pane opened after the watermark passed its
                        // window's end is late from its first firing on.
                        let mut p = self.new_pane(start, end);
                        p.on_time_done = wm >= end;
                        (p, true)
                    }
                };
            let add = |acc: &mut Acc| agg.add(acc, &r.key, &r.value, &input);
            if self.merges() {
                new &= !self.merge_overlapping(ctx, &mut panes, &mut pane, wm, add)?;
            } else {
                add(&mut pane.acc).map_err(ComputationError::BadRecord)?;
            }
            pane.since_fire += 1;
            pane.first_at.get_or_insert(now);
            self.arm(ctx, &pane);
            if new && pane.on_time_done {
                // A window first seen after the watermark passed its end
                // owes its end-of-window firing: it fires now, as a late
                // pane, whatever the late trigger (Beam's watermark trigger
                // does the same); the late trigger starts afresh after it.
                self.fire(ctx, &mut pane, Timing::Late);
                pane.step = 0;
            } else {
                self.maybe_fire(ctx, &mut pane);
            }
            let at = panes.partition_point(|p| (p.start, p.end) < (pane.start, pane.end));
            panes.insert(at, pane);
        }
        if !accepted {
            ctx.produce_to("late", r.key, r.value, r.timestamp);
        }
        Self::save(ctx, &panes);
        Ok(())
    }

    fn process_timer(
        &mut self,
        ctx: &mut Context<'_>,
        timer: Timer,
    ) -> Result<(), ComputationError> {
        let Some((kind, start, end)) = parse_tag(&timer.tag) else {
            return Ok(());
        };
        let mut panes = Self::load(ctx)?;
        let Some(i) = panes.iter().position(|p| p.start == start && p.end == end) else {
            return Ok(());
        };
        let mut p = panes.remove(i);
        let mut keep = true;
        match kind {
            b'e' => {
                if p.since_fire > 0 {
                    self.fire(ctx, &mut p, Timing::OnTime);
                }
                p.on_time_done = true;
                // The late trigger starts afresh: its first step is used
                // for the first late firing, as in Beam.
                p.step = 0;
                // Before the window's end only the early trigger sets a
                // processing-time timer: without one there is none to delete
                // (a map lookup and two allocations saved per pane).
                if self.cfg.early.is_some() {
                    ctx.delete_timer(&tag(b'p', &p));
                }
                if self.cfg.lateness == 0 {
                    keep = false;
                } else {
                    self.arm(ctx, &p);
                }
            }
            b'g' => {
                if p.since_fire > 0 {
                    self.fire(ctx, &mut p, Timing::Late);
                }
                Self::clear_timers(ctx, &p);
                keep = false;
            }
            _ => self.maybe_fire(ctx, &mut p),
        }
        if keep {
            panes.insert(i, p);
        }
        Self::save(ctx, &panes);
        Ok(())
    }

    fn timers_follow_state(&self) -> bool {
        true
    }

    /// Each pane's timers follow from the pane: the on-time timer until the
    /// window fired on time, then the expiry timer (with allowed lateness),
    /// and the processing-time timer of a pending early or late trigger.
    fn restore_timers(
        &mut self,
        ctx: &mut Context<'_>,
        state: &[u8],
    ) -> Result<(), ComputationError> {
        let panes = decode_panes(state).map_err(|e| {
            ComputationError::BadRecord(format!("stored window state is not readable: {e}"))
        })?;
        for p in &panes {
            self.arm(ctx, p);
            let trigger = if p.on_time_done {
                Some(&self.cfg.late)
            } else {
                self.cfg.early.as_ref()
            };
            if let Some(at) = trigger.and_then(|t| deadline(t, p)) {
                ctx.set_timer(tag(b'p', p), TimeDomain::ProcessingTime, at);
            }
        }
        Ok(())
    }
}

pub(crate) fn register(r: &mut millrace_engine::Registry) {
    use std::collections::BTreeMap;
    fn make(cfg: WindowConfig) -> millrace_engine::MakeComputation {
        millrace_engine::per_shard(Window::new(cfg))
    }
    for kind in ["window", "reduce_by_key_and_window", "cogroup", "join"] {
        r.outputs(kind, &["late"]);
    }
    r.computation("window", |c| Ok(make(WindowConfig::parse(c, None)?)));
    r.computation("reduce_by_key_and_window", |c| {
        let op = c.options.table().get("op").and_then(|v| v.as_str());
        if !matches!(op, Some("sum" | "min" | "max")) {
            return Err(c.options.error(
                Some("op"),
                "reduce_by_key_and_window needs op = \"sum\", \"min\" or \"max\"",
            ));
        }
        Ok(make(WindowConfig::parse(c, None)?))
    });
    r.computation("cogroup", |c| {
        if c.inputs.len() < 2 {
            return Err(c
                .options
                .error(Some("inputs"), "cogroup needs two or more inputs"));
        }
        Ok(make(WindowConfig::parse(
            c,
            Some((Acc::Groups(BTreeMap::new()), Output::Aggregate)),
        )?))
    });
    r.computation("join", |c| {
        if c.inputs.len() != 2 {
            return Err(c.options.error(
                Some("inputs"),
                "join needs exactly two inputs (left, right)",
            ));
        }
        Ok(make(WindowConfig::parse(
            c,
            Some((Acc::Groups(BTreeMap::new()), Output::Join)),
        )?))
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use millrace_config::HumanDuration;
    use std::time::Duration;

    /// Validates `[computations.w]` of `kind` over `inputs` (of the three
    /// generators `a`, `b`, `c`), with `extra` options.
    fn validate(kind: &str, inputs: &str, extra: &str) -> Result<(), String> {
        crate::test_support::validate(&format!(
            r#"
[sources.a]
type = "generator"
[sources.b]
type = "generator"
[sources.c]
type = "generator"
[computations.w]
type = "{kind}"
inputs = {inputs}
window = {{ kind = "fixed", size = "1s" }}
{extra}
"#
        ))
    }

    #[test]
    fn window_kinds_check_their_inputs_and_op() {
        let one = r#"["a"]"#;
        let two = r#"["a", "b"]"#;
        let three = r#"["a", "b", "c"]"#;
        assert_eq!(validate("cogroup", two, ""), Ok(()));
        assert_eq!(validate("cogroup", three, ""), Ok(()));
        let e = validate("cogroup", one, "").unwrap_err();
        assert!(e.contains("two or more inputs"), "{e}");
        assert_eq!(validate("join", two, ""), Ok(()));
        for inputs in [one, three] {
            let e = validate("join", inputs, "").unwrap_err();
            assert!(e.contains("exactly two inputs"), "{e}");
        }
        for op in ["sum", "min", "max"] {
            let extra = format!("op = \"{op}\"");
            assert_eq!(validate("reduce_by_key_and_window", one, &extra), Ok(()));
        }
        for extra in ["", r#"op = "mean""#] {
            let e = validate("reduce_by_key_and_window", one, extra).unwrap_err();
            assert!(e.contains("needs op"), "{e}");
        }
    }

    fn cfg(window: WindowSpec) -> WindowConfig {
        WindowConfig {
            window,
            early: None,
            late: Trigger::Count(1),
            lateness: 0,
            accumulation: Accumulation::Discarding,
            aggregate: crate::aggregate::Aggregate::Builtin(Acc::Count(0)),
            output: Output::Aggregate,
            sides: Vec::new(),
        }
    }

    fn d(s: u64) -> HumanDuration {
        HumanDuration(Duration::from_micros(s))
    }

    #[test]
    fn pane_output_is_what_serde_json_writes() {
        let w = Window::new(cfg(WindowSpec::Fixed { size: d(10) }));
        let mut p = w.new_pane(-20, 1_700_000_000_000_000);
        p.index = 12;
        for (timing, retraction) in [(Timing::Early, false), (Timing::Late, true)] {
            let mut expected = json!({
                "window": {"start": p.start, "end": p.end},
                "pane": {"index": p.index, "timing": timing.name()},
                "value": 42,
            });
            if retraction {
                expected["retraction"] = json!(true);
            }
            let out = pane_output(&p, timing, retraction, |o| o.push_str("42"));
            assert_eq!(out, expected.to_string());
        }
    }

    #[test]
    fn windows_are_assigned_by_kind() {
        assert_eq!(
            cfg(WindowSpec::Fixed { size: d(10) }).assign(25),
            vec![(20, 30)]
        );
        assert_eq!(
            cfg(WindowSpec::Fixed { size: d(10) }).assign(-1),
            vec![(-10, 0)]
        );
        assert_eq!(
            cfg(WindowSpec::Sliding {
                size: d(10),
                every: d(5)
            })
            .assign(12),
            vec![(5, 15), (10, 20)]
        );
        assert_eq!(
            cfg(WindowSpec::Session { gap: d(3) }).assign(7),
            vec![(7, 10)]
        );
    }

    #[test]
    fn triggers_compose() {
        let mut p = Window::new(cfg(WindowSpec::Fixed { size: d(10) })).new_pane(0, 10);
        p.since_fire = 2;
        p.first_at = Some(100);
        let every = Trigger::Every(d(50));
        assert!(ready(&Trigger::Count(2), &p, 0));
        assert!(!ready(&every, &p, 149));
        assert!(ready(&every, &p, 150));
        assert!(ready(
            &Trigger::Any(vec![Trigger::Count(5), every.clone()]),
            &p,
            150
        ));
        assert!(!ready(
            &Trigger::All(vec![Trigger::Count(5), every.clone()]),
            &p,
            150
        ));
        let seq = Trigger::Sequence(vec![Trigger::Count(1), Trigger::Count(3)]);
        assert!(ready(&seq, &p, 0));
        p.step = 1;
        assert!(!ready(&seq, &p, 0));
        assert_eq!(
            deadline(&Trigger::Any(vec![Trigger::Count(5), every]), &p),
            Some(150)
        );
        let p = Window::new(cfg(WindowSpec::Fixed { size: d(10) })).new_pane(-5, 10);
        assert_eq!(parse_tag(&tag(b'g', &p)), Some((b'g', -5, 10)));
        assert_eq!(parse_tag(&tag(b'g', &p)[..16]), None);
    }

    #[test]
    fn panes_survive_their_binary_form() {
        let w = Window::new(cfg(WindowSpec::Fixed { size: d(10) }));
        let mut a = w.new_pane(0, 10);
        a.acc = Acc::Count(3);
        let mut b = w.new_pane(10, 20);
        b.acc = Acc::Collect(vec!["x".into()]);
        b.on_time_done = true;
        b.first_at = Some(-4);
        b.since_fire = 2;
        b.index = 5;
        b.step = 1;
        b.last = Some(json!({"k": [1, "two"]}));
        let panes = vec![a, b];
        let bytes = encode_panes(&panes);
        assert_eq!(decode_panes(&bytes).unwrap(), panes);
        for cut in 0..bytes.len() {
            assert!(decode_panes(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }
}
