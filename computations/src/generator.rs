//! `generator`: deterministic records for tests and benchmarks.
//!
//! Record `i` (0-based) has key `k<N>` with `N = mix(seed, i) % keys`, value
//! `i` in decimal (or the key, with `value = "key"`), and event time `2023-11-14T22:13:20Z + i * event_step`. The
//! position is `i`, so a restart replays nothing and skips nothing.

use crate::options;
use millrace_config::HumanDuration;
use millrace_engine::{Emitter, Registry, Source, SourceError, SourcePoll};
use serde::Deserialize;
use std::time::Instant;

/// Event time of record 0, microseconds since the epoch.
pub const BASE_TIME: i64 = 1_700_000_000_000_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    count: Option<u64>,
    #[serde(default = "default_keys")]
    keys: u64,
    rate: Option<u64>,
    #[serde(default)]
    seed: u64,
    event_step: Option<HumanDuration>,
    /// What each value holds: `index` (the record number, default) or `key`.
    #[serde(default)]
    value: ValueKind,
}

#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum ValueKind {
    #[default]
    Index,
    Key,
}

fn default_keys() -> u64 {
    1000
}

/// The generator source.
pub struct Generator {
    count: Option<u64>,
    keys: u64,
    rate: Option<u64>,
    seed: u64,
    step: i64,
    next: u64,
    started: Option<(Instant, u64)>,
    value: ValueKind,
}

/// A 64-bit mix (splitmix64's finaliser).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Generator {
    /// The key of record `i`.
    pub fn key_of(&self, i: u64) -> String {
        let mut key = String::with_capacity(21);
        key.push('k');
        key.push_str(itoa::Buffer::new().format(mix(self.seed ^ mix(i)) % self.keys));
        key
    }
}

impl Source for Generator {
    fn open(&mut self, position: Option<&[u8]>) -> Result<(), SourceError> {
        self.next = match position {
            None => 0,
            Some(p) => u64::from_be_bytes(p.try_into().map_err(|_| {
                SourceError::Position(format!("generator position has {} bytes, not 8", p.len()))
            })?),
        };
        Ok(())
    }

    fn poll(&mut self, out: &mut Emitter<'_>, max: usize) -> Result<SourcePoll, SourceError> {
        let mut n = max as u64;
        if let Some(count) = self.count {
            n = n.min(count.saturating_sub(self.next));
        }
        if let Some(rate) = self.rate {
            let (t0, first) = *self.started.get_or_insert((Instant::now(), self.next));
            let due = first + (t0.elapsed().as_secs_f64() * rate as f64) as u64;
            n = n.min(due.saturating_sub(self.next));
        }
        for _ in 0..n {
            let i = self.next;
            // Saturates: a time out of range is then refused by the engine.
            let ts = BASE_TIME.saturating_add((i as i64).saturating_mul(self.step));
            let key = self.key_of(i);
            let value = match self.value {
                ValueKind::Index => itoa::Buffer::new().format(i).to_owned(),
                ValueKind::Key => key.clone(),
            };
            out.emit(key, value, ts);
            self.next += 1;
        }
        Ok(match self.count {
            Some(c) if self.next >= c => SourcePoll::Exhausted,
            _ if n == 0 => SourcePoll::Idle,
            _ => SourcePoll::Ready,
        })
    }

    fn position(&self) -> Vec<u8> {
        self.next.to_be_bytes().to_vec()
    }

    fn replayable(&self) -> bool {
        true
    }
}

pub(crate) fn register(r: &mut Registry) {
    r.source("generator", |c| {
        let o: Options = options(c)?;
        if o.keys == 0 {
            return Err(c.options.error(Some("keys"), "must be at least 1"));
        }
        if o.rate == Some(0) {
            return Err(c
                .options
                .error(Some("rate"), "must be at least 1 record per second"));
        }
        Ok(Box::new(Generator {
            count: o.count,
            keys: o.keys,
            rate: o.rate,
            seed: o.seed,
            step: o
                .event_step
                .map_or(1000, |d| i64::try_from(d.0.as_micros()).unwrap_or(i64::MAX)),
            next: 0,
            started: None,
            value: o.value,
        }))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gen(count: u64) -> Generator {
        Generator {
            count: Some(count),
            keys: 10,
            rate: None,
            seed: 7,
            step: 1000,
            next: 0,
            started: None,
            value: ValueKind::Index,
        }
    }

    fn poll_all(
        g: &mut Generator,
        max: usize,
    ) -> (Vec<(bytes::Bytes, bytes::Bytes, i64)>, SourcePoll) {
        let mut out = Vec::new();
        let p = g
            .poll(&mut millrace_engine::Emitter::new(&mut out), max)
            .unwrap();
        (out, p)
    }

    #[test]
    fn replays_from_a_position_exactly() {
        let mut a = gen(10);
        a.open(None).unwrap();
        let (first, p) = poll_all(&mut a, 4);
        assert_eq!(p, SourcePoll::Ready);
        let pos = a.position();
        let (rest_a, p) = poll_all(&mut a, 100);
        assert_eq!(p, SourcePoll::Exhausted);
        let mut b = gen(10);
        b.open(Some(&pos)).unwrap();
        let (rest_b, _) = poll_all(&mut b, 100);
        assert_eq!(rest_a, rest_b);
        assert_eq!(first.len() + rest_a.len(), 10);
        assert_eq!(rest_a[0].1, "4");
        assert!(b.open(Some(b"bad")).is_err());
    }
}
