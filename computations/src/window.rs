//! `window`: the Dataflow model per key: windows (fixed, sliding, session),
//! triggers (at the watermark, early, late, count, composites), allowed
//! lateness and accumulation (discarding, accumulating, retracting).
//!
//! A key's open panes live in its state; each window has an event-time timer
//! at its end (the on-time firing), a garbage-collection timer at its end plus
//! the allowed lateness (a last firing if anything is pending, then the state
//! is dropped), and a processing-time timer while a periodic trigger waits.
//!
//! Each output record is JSON, timestamped at the window's last instant:
//! `{"window":{"start":S,"end":E},"pane":{"index":I,"timing":"early|on_time|late"},"value":V}`;
//! a retraction carries `"retraction":true` and the value it withdraws.
//! Records later than the allowed lateness go, unchanged, to the output
//! `NAME.late` (and are counted in `millrace_late_records_total`).

use crate::aggregate::{parse_aggregate, put_str, Acc, Reader};
use bytes::Bytes;
use millrace_config::{Component, ConfigError, HumanDuration};
use millrace_engine::{Computation, ComputationError, Context, Record, TimeDomain, Timer};
use serde::Deserialize;
use serde_json::{json, Value};

/// How elements are assigned to windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum WindowSpec {
    /// Tumbling windows of `size`.
    Fixed {
        /// Window length.
        size: HumanDuration,
    },
    /// Windows of `size` starting every `every`.
    Sliding {
        /// Window length.
        size: HumanDuration,
        /// Period between window starts.
        every: HumanDuration,
    },
    /// Per-key sessions: activity separated by at least `gap`; overlapping
    /// sessions of a key merge.
    Session {
        /// Inactivity that ends a session.
        gap: HumanDuration,
    },
}

/// A trigger for early or late firings. Early and late triggers repeat.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Trigger {
    /// After N elements since the last firing.
    Count(u64),
    /// A processing-time period after the first element since the last firing.
    Every(HumanDuration),
    /// When any of these would fire.
    Any(Vec<Trigger>),
    /// When all of these would fire.
    All(Vec<Trigger>),
    /// Each in turn, then the last one again.
    Sequence(Vec<Trigger>),
    /// The inner trigger, again after each firing (early and late triggers
    /// always repeat; this spells it out).
    Repeatedly(Box<Trigger>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum LateSpec {
    Text(String),
    Trigger(Trigger),
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TriggerSpec {
    /// Only "watermark": the on-time firing. Always on.
    at: Option<String>,
    early_every: Option<HumanDuration>,
    early_count: Option<u64>,
    early: Option<Trigger>,
    late: Option<LateSpec>,
}

/// What a firing emits, relative to the firings before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accumulation {
    /// Each pane holds only the elements since the last firing.
    #[default]
    Discarding,
    /// Each pane holds every element of the window so far.
    Accumulating,
    /// Accumulating, and each pane first retracts the previous one.
    #[serde(alias = "accumulating_and_retracting")]
    Retracting,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    window: WindowSpec,
    #[serde(default)]
    trigger: TriggerSpec,
    allowed_lateness: Option<HumanDuration>,
    #[serde(default)]
    accumulation: Accumulation,
    aggregate: Option<String>,
    op: Option<String>,
}

/// What the `window` computation does with its panes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// One record per firing with the aggregate.
    Aggregate,
    /// One record per (left, right) pair of a two-input window (a windowed join).
    Join,
}

/// The settings of one `window` component.
#[derive(Debug, Clone)]
pub struct WindowConfig {
    window: WindowSpec,
    early: Option<Trigger>,
    late: Trigger,
    lateness: i64,
    accumulation: Accumulation,
    aggregate: Acc,
    output: Output,
    /// Input stream names in declared order (left, right for a join).
    sides: Vec<String>,
}

/// A duration in microseconds, saturating at `i64::MAX`.
fn micros(d: HumanDuration) -> i64 {
    i64::try_from(d.0.as_micros()).unwrap_or(i64::MAX)
}

/// The most windows one record may belong to (sliding `size` / `every`):
/// beyond it, one record would cost unbounded work and state.
const MAX_WINDOWS_PER_RECORD: i64 = 10_000;

impl WindowConfig {
    /// Parses a `window`-like component. `aggregate` (or `op`) names the
    /// aggregate unless `fixed` gives it.
    pub fn parse(c: &Component, fixed: Option<(Acc, Output)>) -> Result<WindowConfig, ConfigError> {
        let o: Options = c.options.parse()?;
        let check = |d: HumanDuration, key: &str| {
            if d.0.is_zero() {
                Err(c
                    .options
                    .error(Some("window"), format!("`{key}` must be longer than zero")))
            } else {
                Ok(())
            }
        };
        match o.window {
            WindowSpec::Fixed { size } => check(size, "size")?,
            WindowSpec::Sliding { size, every } => {
                check(size, "size")?;
                check(every, "every")?;
                let per_record = micros(size) / micros(every).max(1);
                if per_record > MAX_WINDOWS_PER_RECORD {
                    return Err(c.options.error(
                        Some("window"),
                        format!(
                            "`size` / `every` is {per_record}: each record would belong to that many windows (at most {MAX_WINDOWS_PER_RECORD})"
                        ),
                    ));
                }
            }
            WindowSpec::Session { gap } => check(gap, "gap")?,
        }
        if o.trigger.at.as_deref().is_some_and(|a| a != "watermark") {
            return Err(c
                .options
                .error(Some("trigger"), "`at` can only be \"watermark\""));
        }
        let mut early: Vec<Trigger> = Vec::new();
        if let Some(d) = o.trigger.early_every {
            early.push(Trigger::Every(d));
        }
        if let Some(n) = o.trigger.early_count {
            early.push(Trigger::Count(n));
        }
        if let Some(t) = o.trigger.early.clone() {
            early.push(t);
        }
        let early = match early.len() {
            0 => None,
            1 => early.pop(),
            _ => Some(Trigger::Any(early)),
        };
        let late = match o.trigger.late.clone() {
            None => Trigger::Count(1),
            Some(LateSpec::Text(t)) if t == "each" => Trigger::Count(1),
            Some(LateSpec::Text(t)) => Trigger::Every(HumanDuration(
                millrace_config::parse_duration(&t).map_err(|m| {
                    c.options
                        .error(Some("trigger"), format!("late: {m} (or \"each\")"))
                })?,
            )),
            Some(LateSpec::Trigger(t)) => t,
        };
        // Each kind takes its aggregate from one option (or from none); the
        // others are errors, never silently ignored.
        let unknown = |key: &str, hint: &str| {
            Err(c.options.error(
                Some(key),
                format!("`{}` has no option `{key}`{hint}", c.kind),
            ))
        };
        let (aggregate, output) = match fixed {
            Some(f) => {
                if o.aggregate.is_some() {
                    return unknown("aggregate", ": it keeps each input's values");
                }
                if o.op.is_some() {
                    return unknown("op", ": it keeps each input's values");
                }
                f
            }
            None => {
                let name = if c.kind == "reduce_by_key_and_window" {
                    if o.aggregate.is_some() {
                        return unknown("aggregate", "; use `op`");
                    }
                    o.op
                } else {
                    if o.op.is_some() {
                        return unknown("op", "; use `aggregate`");
                    }
                    o.aggregate
                };
                let name = name.unwrap_or_else(|| "count".to_owned());
                (
                    parse_aggregate(&name).map_err(|m| c.options.error(Some("aggregate"), m))?,
                    Output::Aggregate,
                )
            }
        };
        Ok(WindowConfig {
            window: o.window,
            early,
            late,
            lateness: o.allowed_lateness.map_or(0, micros),
            accumulation: o.accumulation,
            aggregate,
            output,
            sides: c.inputs.iter().map(|i| i.stream.to_string()).collect(),
        })
    }

    /// The windows an element at `ts` belongs to, as `[start, end)`. Empty
    /// for a record in a gap between sliding windows (`every` > `size`).
    /// Arithmetic saturates at the ends of time, so no event time overflows.
    fn assign(&self, ts: i64) -> Vec<(i64, i64)> {
        match self.window {
            WindowSpec::Fixed { size } => {
                let size = micros(size);
                let start = ts.div_euclid(size).saturating_mul(size);
                vec![(start, start.saturating_add(size))]
            }
            WindowSpec::Sliding { size, every } => {
                let (size, every) = (micros(size), micros(every));
                let mut start = ts.div_euclid(every).saturating_mul(every);
                let first = ts.saturating_sub(size);
                let mut out = Vec::new();
                while start > first {
                    out.push((start, start.saturating_add(size)));
                    match start.checked_sub(every) {
                        Some(s) => start = s,
                        None => break,
                    }
                }
                out.reverse();
                out
            }
            WindowSpec::Session { gap } => vec![(ts, ts.saturating_add(micros(gap)))],
        }
    }
}

/// One window's pane state for the current key.
#[derive(Debug, Clone, PartialEq)]
struct Pane {
    start: i64,
    end: i64,
    /// Elements since the last firing (discarding) or all (accumulating).
    acc: Acc,
    /// Index of the next pane emitted.
    index: u64,
    on_time_done: bool,
    since_fire: u64,
    /// Processing time of the first element since the last firing.
    first_at: Option<i64>,
    /// Step of a `sequence` trigger.
    step: usize,
    /// What the last firing emitted (for retractions).
    last: Option<Value>,
}

/// First byte of the binary form of a key's panes: its version.
const PANES_BINARY: u8 = 1;

/// A key's panes as `1 | count u32 | pane*`, little-endian; each pane is
/// `start i64 | end i64 | index u64 | flags u8 | since_fire u64 | [first_at
/// i64] | step u32 | aggregate | [last: len u32 + JSON]`, where flags say
/// whether the window fired on time (1), and whether `first_at` (2) and
/// `last` (4) follow.
fn encode_panes(panes: &[Pane]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + panes.len() * 64);
    out.push(PANES_BINARY);
    out.extend_from_slice(&(panes.len() as u32).to_le_bytes());
    for p in panes {
        out.extend_from_slice(&p.start.to_le_bytes());
        out.extend_from_slice(&p.end.to_le_bytes());
        out.extend_from_slice(&p.index.to_le_bytes());
        let last = p.last.as_ref().map(Value::to_string);
        out.push(
            u8::from(p.on_time_done)
                | (u8::from(p.first_at.is_some()) << 1)
                | (u8::from(last.is_some()) << 2),
        );
        out.extend_from_slice(&p.since_fire.to_le_bytes());
        if let Some(f) = p.first_at {
            out.extend_from_slice(&f.to_le_bytes());
        }
        out.extend_from_slice(&(p.step as u32).to_le_bytes());
        p.acc.encode(&mut out);
        if let Some(last) = last {
            put_str(&mut out, &last);
        }
    }
    out
}

fn decode_panes(b: &[u8]) -> Result<Vec<Pane>, String> {
    let mut r = Reader::new(b);
    if r.u8()? != PANES_BINARY {
        return Err("unknown format".into());
    }
    let n = r.len()?;
    let mut panes = Vec::with_capacity(n);
    for _ in 0..n {
        let (start, end, index) = (r.i64()?, r.i64()?, r.u64()?);
        let flags = r.u8()?;
        let since_fire = r.u64()?;
        let first_at = if flags & 2 != 0 { Some(r.i64()?) } else { None };
        let step = r.u32()? as usize;
        let acc = Acc::decode(&mut r)?;
        let last = if flags & 4 != 0 {
            Some(serde_json::from_str(&r.string()?).map_err(|e| e.to_string())?)
        } else {
            None
        };
        panes.push(Pane {
            start,
            end,
            acc,
            index,
            on_time_done: flags & 1 != 0,
            since_fire,
            first_at,
            step,
            last,
        });
    }
    if !r.is_empty() {
        return Err("trailing bytes".into());
    }
    Ok(panes)
}

fn ready(t: &Trigger, p: &Pane, now: i64) -> bool {
    match t {
        Trigger::Count(n) => p.since_fire >= *n,
        Trigger::Every(d) => p.first_at.is_some_and(|f| now - f >= micros(*d)),
        Trigger::Any(v) => v.iter().any(|t| ready(t, p, now)),
        Trigger::All(v) => !v.is_empty() && v.iter().all(|t| ready(t, p, now)),
        Trigger::Sequence(v) => v
            .get(p.step.min(v.len().saturating_sub(1)))
            .is_some_and(|t| ready(t, p, now)),
        Trigger::Repeatedly(t) => ready(t, p, now),
    }
}

/// The earliest processing time at which `t` may become ready.
fn deadline(t: &Trigger, p: &Pane) -> Option<i64> {
    match t {
        Trigger::Count(_) => None,
        Trigger::Every(d) => p.first_at.map(|f| f + micros(*d)),
        Trigger::Any(v) | Trigger::All(v) => v.iter().filter_map(|t| deadline(t, p)).min(),
        Trigger::Sequence(v) => v
            .get(p.step.min(v.len().saturating_sub(1)))
            .and_then(|t| deadline(t, p)),
        Trigger::Repeatedly(t) => deadline(t, p),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Timing {
    Early,
    OnTime,
    Late,
}

impl Timing {
    fn name(self) -> &'static str {
        match self {
            Timing::Early => "early",
            Timing::OnTime => "on_time",
            Timing::Late => "late",
        }
    }
}

/// A pane's timer tag: `kind u8 | start i64 BE | end i64 BE`, where kind
/// is `e` (on time), `g` (expiry) or `p` (periodic).
fn tag(kind: u8, p: &Pane) -> Bytes {
    let mut t = Vec::with_capacity(17);
    t.push(kind);
    t.extend_from_slice(&p.start.to_be_bytes());
    t.extend_from_slice(&p.end.to_be_bytes());
    Bytes::from(t)
}

fn parse_tag(t: &[u8]) -> Option<(u8, i64, i64)> {
    let (kind, rest) = t.split_first()?;
    let (start, end) = rest.split_at_checked(8)?;
    Some((
        *kind,
        i64::from_be_bytes(start.try_into().ok()?),
        i64::from_be_bytes(end.try_into().ok()?),
    ))
}

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

    /// Merges every session of this key that overlaps `pane` into it. In
    /// retracting mode each absorbed pane that fired is retracted with its
    /// own window and value, so a consumer that applies retractions ends with
    /// the merged pane alone. The merged pane is on time only while the
    /// watermark has not passed its end.
    fn merge_overlapping(
        &self,
        ctx: &mut Context<'_>,
        panes: &mut Vec<Pane>,
        pane: &mut Pane,
        wm: i64,
    ) {
        let mut i = 0;
        while i < panes.len() {
            if panes[i].start < pane.end && pane.start < panes[i].end {
                let mut old = panes.remove(i);
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
                pane.start = pane.start.min(old.start);
                pane.end = pane.end.max(old.end);
                pane.acc.merge(old.acc);
                pane.index = pane.index.max(old.index);
                pane.since_fire += old.since_fire;
                pane.first_at = match (pane.first_at, old.first_at) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                i = 0;
            } else {
                i += 1;
            }
        }
        let late = wm >= pane.end;
        if late != pane.on_time_done {
            pane.on_time_done = late;
            pane.step = 0;
        }
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
                    let value = p.acc.result();
                    if let Some(old) = p.last.replace(value) {
                        let r = pane_output(p, timing, true, |out| out.push_str(&old.to_string()));
                        ctx.produce(key.clone(), r, ts);
                    }
                }
                let v = pane_output(p, timing, false, |out| p.acc.write_result(out));
                ctx.produce(key, v, ts);
            }
        }
        if self.cfg.accumulation == Accumulation::Discarding {
            p.acc = p.acc.empty();
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
        let input = match self.cfg.aggregate {
            Acc::Groups(_) => ctx.input().to_owned(),
            _ => String::new(),
        };
        let mut panes = Self::load(ctx)?;
        let mut accepted = false;
        for (start, end) in windows {
            if wm >= end.saturating_add(self.cfg.lateness) {
                continue; // this window is closed
            }
            accepted = true;
            let mut pane = match panes.iter().position(|p| p.start == start && p.end == end) {
                Some(i) if !self.merges() => panes.remove(i),
                _ => {
                    // A pane opened after the watermark passed its window's
                    // end is late from its first firing on.
                    let mut p = self.new_pane(start, end);
                    p.on_time_done = wm >= end;
                    p
                }
            };
            if self.merges() {
                self.merge_overlapping(ctx, &mut panes, &mut pane, wm);
            }
            pane.acc
                .add(&r.value, &input)
                .map_err(ComputationError::BadRecord)?;
            pane.since_fire += 1;
            pane.first_at.get_or_insert(now);
            self.arm(ctx, &pane);
            self.maybe_fire(ctx, &mut pane);
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

/// A pane's output, as serde_json writes `json!({"window": .., "pane": ..,
/// "value": ..})` (keys in order), straight into one string: no `Value`s and
/// no formatting machinery, since a pane fires for every key.
fn pane_output(
    p: &Pane,
    timing: Timing,
    retraction: bool,
    value: impl FnOnce(&mut String),
) -> String {
    let mut n = itoa::Buffer::new();
    let mut out = String::with_capacity(112);
    out.push_str(r#"{"pane":{"index":"#);
    out.push_str(n.format(p.index));
    out.push_str(r#","timing":""#);
    out.push_str(timing.name());
    out.push_str(r#""},"#);
    if retraction {
        out.push_str(r#""retraction":true,"#);
    }
    out.push_str(r#""value":"#);
    value(&mut out);
    out.push_str(r#","window":{"end":"#);
    out.push_str(n.format(p.end));
    out.push_str(r#","start":"#);
    out.push_str(n.format(p.start));
    out.push_str("}}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cfg(window: WindowSpec) -> WindowConfig {
        WindowConfig {
            window,
            early: None,
            late: Trigger::Count(1),
            lateness: 0,
            accumulation: Accumulation::Discarding,
            aggregate: Acc::Count(0),
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
