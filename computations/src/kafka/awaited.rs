//! The records a Kafka sink's read-back found written whose deliveries are
//! still to come, and the position a commit may record while they are.
//!
//! A restart re-delivers what the shard had not applied, on each input in
//! order, but the inputs interleave freely: the sink can commit records of one
//! input before another input re-delivers a record found by the read-back.
//! If the committed position then moved past that record, the next restart's
//! read-back would start after it and write it a second time. So a commit's
//! position, in each partition, never passes the first record still awaited.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

/// Written records awaiting their re-delivery, by production id.
#[derive(Debug, Default)]
pub(super) struct Awaited {
    /// Where each one is: (partition, offset).
    by_id: HashMap<Vec<u8>, (i32, i64)>,
    /// The places that hold the position back, in order: those above, and
    /// those of re-deliveries taken whose write is not yet durable.
    at: BTreeSet<(i32, i64)>,
    /// Re-deliveries taken (skipped), in write order: the write that took
    /// each, and its place, held in `at` until that write is durable (a
    /// crash before then delivers it again, and the read-back must find
    /// it again).
    taken: VecDeque<(u64, (i32, i64))>,
}

impl Awaited {
    /// Records that the delivery `id` is written at `offset` of `partition`
    /// (a second copy of an id keeps the first place).
    pub fn insert(&mut self, id: &[u8], partition: i32, offset: i64) {
        if let std::collections::hash_map::Entry::Vacant(e) = self.by_id.entry(id.to_vec()) {
            e.insert((partition, offset));
            self.at.insert((partition, offset));
        }
    }

    /// Whether `id` was awaited; it no longer is, but its place holds the
    /// position back until write number `write` is durable
    /// ([`Awaited::release`]).
    pub fn take(&mut self, id: &[u8], write: u64) -> bool {
        match self.by_id.remove(id) {
            Some(place) => {
                self.taken.push_back((write, place));
                true
            }
            None => false,
        }
    }

    /// Writes up to `durable` are durable: the places their skips held
    /// stop holding the position back.
    pub fn release(&mut self, durable: u64) {
        while let Some(&(write, place)) = self.taken.front() {
            if write > durable {
                break;
            }
            self.taken.pop_front();
            self.at.remove(&place);
        }
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The position to commit: `ends` (the end offset of what is written,
    /// by partition), held back in each partition to the first record still
    /// awaited there.
    pub fn position(&self, ends: &BTreeMap<i32, i64>) -> BTreeMap<i32, i64> {
        let mut position = ends.clone();
        let mut last = None;
        // The first place of each partition, in one pass over the places.
        for &(partition, offset) in &self.at {
            if last == Some(partition) {
                continue;
            }
            last = Some(partition);
            let end = position.entry(partition).or_insert(offset);
            *end = (*end).min(offset);
        }
        position
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ends(pairs: &[(i32, i64)]) -> BTreeMap<i32, i64> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn the_position_stops_at_the_first_record_still_awaited() {
        let mut a = Awaited::default();
        a.insert(b"e/0/7", 0, 40);
        a.insert(b"e/0/9", 0, 12);
        a.insert(b"e/1/3", 2, 5);
        assert_eq!(a.len(), 3);
        // Partition 0 ends at 100 but 12 is awaited; partition 1 has none;
        // partition 2 was never written by a commit: it starts at 5.
        assert_eq!(
            a.position(&ends(&[(0, 100), (1, 30)])),
            ends(&[(0, 12), (1, 30), (2, 5)])
        );
        assert!(a.take(b"e/0/9", 1));
        assert!(!a.take(b"e/0/9", 2), "taken once");
        a.release(1);
        assert_eq!(
            a.position(&ends(&[(0, 100), (1, 30)])),
            ends(&[(0, 40), (1, 30), (2, 5)])
        );
        assert!(a.take(b"e/0/7", 3) && a.take(b"e/1/3", 4));
        assert!(a.is_empty());
        a.release(4);
        assert_eq!(
            a.position(&ends(&[(0, 100), (1, 30)])),
            ends(&[(0, 100), (1, 30)])
        );
    }

    #[test]
    fn an_awaited_record_before_the_end_never_moves_it_forward() {
        let mut a = Awaited::default();
        a.insert(b"e/0/1", 0, 90);
        assert_eq!(a.position(&ends(&[(0, 50)])), ends(&[(0, 50)]));
    }

    #[test]
    fn a_second_copy_of_an_id_keeps_the_first_place() {
        let mut a = Awaited::default();
        a.insert(b"e/0/1", 0, 3);
        a.insert(b"e/0/1", 0, 8);
        assert_eq!(a.len(), 1);
        assert_eq!(a.position(&ends(&[(0, 20)])), ends(&[(0, 3)]));
        assert!(a.take(b"e/0/1", 1));
        a.release(1);
        assert_eq!(a.position(&ends(&[(0, 20)])), ends(&[(0, 20)]));
    }

    #[test]
    fn a_re_delivery_skipped_holds_the_position_back_until_its_write_is_durable() {
        let mut a = Awaited::default();
        a.insert(b"e/0/5", 0, 105);
        // Write 4 skips it; writes 2 and 3 before it are not durable yet.
        assert!(a.take(b"e/0/5", 4));
        assert!(a.is_empty(), "nothing left to come");
        a.release(2);
        assert_eq!(
            a.position(&ends(&[(0, 112)])),
            ends(&[(0, 105)]),
            "a crash now delivers e/0/5 again: the read-back must find it"
        );
        a.release(4);
        assert_eq!(a.position(&ends(&[(0, 112)])), ends(&[(0, 112)]));
    }
}
