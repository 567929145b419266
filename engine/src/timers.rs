//! A shard's timers in memory, in event and processing time, mirrored in
//! RocksDB (through `layout.rs`) unless they follow from state.

use crate::layout;
use crate::mapkey::FastMap;
use crate::mapkey::MapKey;
use crate::record::{EventTime, TimeDomain, MIN_TIME};
use millrace_storage::{Batch, Cf, StorageError, Store};
use std::collections::hash_map::Entry;
use std::collections::BTreeMap;

/// Event- and processing-time timers of one shard, in memory (and mirrored
/// in RocksDB unless they follow from state).
///
/// `by_key` holds the timers that are set. `by_time` holds, per (domain,
/// time), the (key, tag) pairs set for that time, including some that were
/// moved or deleted since: a pair is checked against `by_key` when its time
/// comes, so moving or deleting a timer is one map operation. Many timers
/// share a time (a window's end, for every key), so `by_time` stays small.
#[derive(Default)]
pub(crate) struct Timers {
    by_time: BTreeMap<(TimeDomain, EventTime), DueBucket>,
    by_key: FastMap<(MapKey, MapKey), (TimeDomain, EventTime)>,
    writes: Vec<(Vec<u8>, bool)>,
    /// In memory only: the computation rebuilds them from its state at start.
    volatile: bool,
}

/// The (key, tag) pairs set for one time. Sorted (descending, so the next is
/// last) when the time comes: timers of one time fire in key order, the same
/// order whether they were set live or rebuilt after a restart.
#[derive(Default)]
struct DueBucket {
    pairs: Vec<(MapKey, MapKey)>,
    sorted: bool,
}

impl Timers {
    /// Timers kept in memory only (see `Computation::timers_follow_state`).
    pub fn volatile() -> Timers {
        Timers {
            volatile: true,
            ..Timers::default()
        }
    }

    fn record(
        &mut self,
        prefix: &[u8],
        d: TimeDomain,
        t: EventTime,
        key: &[u8],
        tag: &[u8],
        put: bool,
    ) {
        if !self.volatile {
            self.writes
                .push((layout::timer_key(prefix, d, t, key, tag), put));
        }
    }

    fn schedule(&mut self, d: TimeDomain, t: EventTime, key: MapKey, tag: MapKey) {
        let bucket = self.by_time.entry((d, t)).or_default();
        bucket.pairs.push((key, tag));
        bucket.sorted = false;
    }

    pub fn load(store: &Store, prefix: &[u8]) -> Result<Timers, StorageError> {
        let mut timers = Timers::default();
        let scan = layout::timers_prefix(prefix);
        let mut bad = 0usize;
        store.for_each_prefix(Cf::Timers, &scan, |k, _| {
            let parsed = layout::parse_timer_key(&k[scan.len()..]);
            match parsed {
                Ok((d, t, key, tag)) => {
                    let (key, tag) = (MapKey::new(&key), MapKey::new(&tag));
                    timers.by_key.insert((key.clone(), tag.clone()), (d, t));
                    timers.schedule(d, t, key, tag);
                }
                Err(_) => bad += 1,
            }
            true
        })?;
        if bad > 0 {
            tracing::warn!(bad, "skipped malformed timer keys");
        }
        Ok(timers)
    }

    pub fn set(&mut self, prefix: &[u8], key: &[u8], tag: &[u8], d: TimeDomain, t: EventTime) {
        let id = (MapKey::new(key), MapKey::new(tag));
        match self.by_key.get_mut(&id) {
            Some(at) if *at == (d, t) => return, // already set for that time
            Some(at) => {
                let (old_d, old_t) = std::mem::replace(at, (d, t));
                self.record(prefix, old_d, old_t, key, tag, false);
            }
            None => {
                self.by_key.insert(id.clone(), (d, t));
            }
        }
        self.record(prefix, d, t, key, tag, true);
        self.schedule(d, t, id.0, id.1);
    }

    /// When the timer `tag` of `key` is set to fire, if it is.
    pub fn get(&self, key: &[u8], tag: &[u8]) -> Option<(TimeDomain, EventTime)> {
        self.by_key
            .get(&(MapKey::new(key), MapKey::new(tag)))
            .copied()
    }

    pub fn delete(&mut self, prefix: &[u8], key: &[u8], tag: &[u8]) {
        let id = (MapKey::new(key), MapKey::new(tag));
        if let Some((d, t)) = self.by_key.remove(&id) {
            self.record(prefix, d, t, key, tag, false);
        }
    }

    /// Removes and returns the earliest timer of `d` whose time is before `limit`.
    pub fn pop_due(
        &mut self,
        prefix: &[u8],
        d: TimeDomain,
        limit: EventTime,
    ) -> Option<(MapKey, MapKey, EventTime)> {
        loop {
            let mut entry = self.by_time.range_mut((d, MIN_TIME)..).next()?;
            let ((domain, t), bucket) = (*entry.0, &mut entry.1);
            if domain != d || t >= limit {
                return None;
            }
            if !bucket.sorted {
                bucket.pairs.sort_unstable_by(|a, b| b.cmp(a));
                bucket.pairs.dedup();
                bucket.sorted = true;
            }
            let Some((key, tag)) = bucket.pairs.pop() else {
                self.by_time.remove(&(d, t));
                continue;
            };
            // Skip pairs whose timer was moved or deleted since.
            if let Entry::Occupied(set) = self.by_key.entry((key, tag)) {
                if *set.get() == (d, t) {
                    let ((key, tag), _) = set.remove_entry();
                    self.record(prefix, d, t, key.as_bytes(), tag.as_bytes(), false);
                    return Some((key, tag, t));
                }
            }
        }
    }

    /// The earliest processing time a timer may be due (perhaps one moved since).
    pub fn next_processing(&self) -> Option<EventTime> {
        self.by_time
            .range((TimeDomain::ProcessingTime, MIN_TIME)..)
            .next()
            .map(|((_, t), _)| *t)
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn flush(&mut self, batch: &mut Batch<'_>) {
        for (k, put) in self.writes.drain(..) {
            if put {
                batch.put(Cf::Timers, &k, &[]);
            } else {
                batch.delete(Cf::Timers, &k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(t: &mut Timers, d: TimeDomain, limit: EventTime) -> Vec<(String, String, EventTime)> {
        std::iter::from_fn(|| t.pop_due(b"p", d, limit))
            .map(|(k, tag, at)| {
                let s = |x: MapKey| String::from_utf8_lossy(x.as_bytes()).into_owned();
                (s(k), s(tag), at)
            })
            .collect()
    }

    #[test]
    fn timers_of_one_time_fire_in_bytewise_key_order() {
        let mut t = Timers::default();
        let keys = [
            "0123456789abcdefZ",
            "0123456789abcdef",
            "0123456789abcdefA",
            // Longer than a map key holds in place.
            "0123456789abcdef0123456789",
            "0123456789abcdef01234567",
            "1",
            "0",
            "",
        ];
        for k in keys {
            t.set(b"p", k.as_bytes(), b"x", TimeDomain::EventTime, 7);
        }
        let mut want: Vec<&str> = keys.to_vec();
        want.sort();
        let got: Vec<String> = drain(&mut t, TimeDomain::EventTime, 8)
            .into_iter()
            .map(|(k, _, _)| k)
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn timers_fire_once_in_time_then_key_order_after_moves_and_deletes() {
        use TimeDomain::{EventTime as E, ProcessingTime as P};
        let mut t = Timers::default();
        t.set(b"p", b"b", b"x", E, 10);
        t.set(b"p", b"a", b"x", E, 10);
        t.set(b"p", b"c", b"x", E, 5);
        // Moved away and back: still one timer.
        t.set(b"p", b"d", b"x", E, 10);
        t.set(b"p", b"d", b"x", E, 30);
        t.set(b"p", b"d", b"x", E, 10);
        // Moved later, then deleted.
        t.set(b"p", b"e", b"x", E, 10);
        t.set(b"p", b"e", b"x", E, 20);
        t.set(b"p", b"f", b"y", E, 10);
        t.delete(b"p", b"f", b"y");
        t.set(b"p", b"a", b"p", P, 1);
        assert_eq!(t.len(), 6);
        assert_eq!(drain(&mut t, E, 5), []);
        let got = drain(&mut t, E, 11);
        let want = [
            ("c", "x", 5),
            ("a", "x", 10),
            ("b", "x", 10),
            ("d", "x", 10),
        ];
        let want: Vec<_> = want
            .iter()
            .map(|(k, g, at)| (k.to_string(), g.to_string(), *at))
            .collect();
        assert_eq!(got, want);
        // A timer set again for a time already passed fires at once.
        t.set(b"p", b"a", b"x", E, 10);
        assert_eq!(drain(&mut t, E, 11), [("a".into(), "x".into(), 10)]);
        assert_eq!(drain(&mut t, E, 100), [("e".into(), "x".into(), 20)]);
        assert_eq!(t.next_processing(), Some(1));
        assert_eq!(drain(&mut t, P, 2), [("a".into(), "p".into(), 1)]);
        assert_eq!((t.len(), t.next_processing()), (0, None));
    }

    #[test]
    fn persisted_timers_write_each_set_move_and_fire_but_volatile_ones_do_not() {
        let mut t = Timers::default();
        t.set(b"p", b"k", b"x", TimeDomain::EventTime, 1);
        t.set(b"p", b"k", b"x", TimeDomain::EventTime, 1);
        t.set(b"p", b"k", b"x", TimeDomain::EventTime, 2);
        t.pop_due(b"p", TimeDomain::EventTime, 3);
        let kinds: Vec<bool> = t.writes.iter().map(|w| w.1).collect();
        assert_eq!(kinds, [true, false, true, false]);
        let mut v = Timers::volatile();
        v.set(b"p", b"k", b"x", TimeDomain::EventTime, 1);
        v.pop_due(b"p", TimeDomain::EventTime, 3);
        assert!(v.writes.is_empty());
    }
}
