//! One window's pane for the current key: its binary form in the key's
//! state, its triggers' readiness, its timer tags and its output record.

use super::config::{micros, Trigger};
use crate::aggregate::{put_str, Acc, Reader};
use bytes::Bytes;
use serde_json::Value;

/// One window's pane state for the current key.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Pane {
    pub(super) start: i64,
    pub(super) end: i64,
    /// Elements since the last firing (discarding) or all (accumulating).
    pub(super) acc: Acc,
    /// Index of the next pane emitted.
    pub(super) index: u64,
    pub(super) on_time_done: bool,
    pub(super) since_fire: u64,
    /// Processing time of the first element since the last firing.
    pub(super) first_at: Option<i64>,
    /// Step of a `sequence` trigger.
    pub(super) step: usize,
    /// What the last firing emitted (for retractions).
    pub(super) last: Option<Value>,
}

/// First byte of the binary form of a key's panes: its version.
pub(super) const PANES_BINARY: u8 = 1;

/// A key's panes as `1 | count u32 | pane*`, little-endian; each pane is
/// `start i64 | end i64 | index u64 | flags u8 | since_fire u64 | [first_at
/// i64] | step u32 | aggregate | [last: len u32 + JSON]`, where flags say
/// whether the window fired on time (1), and whether `first_at` (2) and
/// `last` (4) follow.
pub(super) fn encode_panes(panes: &[Pane]) -> Vec<u8> {
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

pub(super) fn decode_panes(b: &[u8]) -> Result<Vec<Pane>, String> {
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

pub(super) fn ready(t: &Trigger, p: &Pane, now: i64) -> bool {
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
pub(super) fn deadline(t: &Trigger, p: &Pane) -> Option<i64> {
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
pub(super) enum Timing {
    Early,
    OnTime,
    Late,
}

impl Timing {
    pub(super) fn name(self) -> &'static str {
        match self {
            Timing::Early => "early",
            Timing::OnTime => "on_time",
            Timing::Late => "late",
        }
    }
}

/// A pane's timer tag: `kind u8 | start i64 BE | end i64 BE`, where kind
/// is `e` (on time), `g` (expiry) or `p` (periodic).
pub(super) fn tag(kind: u8, p: &Pane) -> Bytes {
    let mut t = Vec::with_capacity(17);
    t.push(kind);
    t.extend_from_slice(&p.start.to_be_bytes());
    t.extend_from_slice(&p.end.to_be_bytes());
    Bytes::from(t)
}

pub(super) fn parse_tag(t: &[u8]) -> Option<(u8, i64, i64)> {
    let (kind, rest) = t.split_first()?;
    let (start, end) = rest.split_at_checked(8)?;
    Some((
        *kind,
        i64::from_be_bytes(start.try_into().ok()?),
        i64::from_be_bytes(end.try_into().ok()?),
    ))
}

/// A pane's output, as serde_json writes `json!({"window": .., "pane": ..,
/// "value": ..})` (keys in order), straight into one string: no `Value`s and
/// no formatting machinery, since a pane fires for every key.
pub(super) fn pane_output(
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
