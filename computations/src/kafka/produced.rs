//! What a Kafka sink has sent and the broker acknowledged: how many of its
//! writes are durable, and the end offsets those reach in each partition.
//!
//! The sink never waits for the broker. Each message carries the number of
//! the write that sent it; acknowledgements come back in any order across
//! partitions, and a write is durable once it and every write before it are
//! acknowledged. The position committed with them covers only those, so a
//! restart's read-back (which starts at the position) still sees every
//! message of a write that will be delivered again.

use std::collections::{BTreeMap, VecDeque};

#[derive(Debug, Default)]
pub(super) struct Produced {
    /// Messages sent and not yet settled, in the order sent: the write that
    /// sent each and, once the broker acknowledged it, where it landed.
    inflight: VecDeque<(u64, Option<(i32, i64)>)>,
    /// The first failed delivery not yet reported.
    failed: Option<String>,
}

impl Produced {
    /// Notes that write `write` is sending a message (before the send, so
    /// that an acknowledgement served on another thread finds it).
    pub fn sending(&mut self, write: u64) {
        debug_assert!(self.inflight.back().is_none_or(|&(w, _)| w < write));
        self.inflight.push_back((write, None));
    }

    /// The send of the last message noted by [`Produced::sending`] was
    /// refused: nothing is coming for it.
    pub fn not_sent(&mut self) {
        self.inflight.pop_back();
    }

    /// The broker acknowledged the message of write `write` at `offset` of
    /// `partition`.
    pub fn acknowledged(&mut self, write: u64, partition: i32, offset: i64) {
        if let Ok(i) = self.inflight.binary_search_by_key(&write, |&(w, _)| w) {
            self.inflight[i].1 = Some((partition, offset));
        }
    }

    /// A message could not be delivered.
    pub fn failed(&mut self, why: String) {
        self.failed.get_or_insert(why);
    }

    /// How many of the first `writes` writes are durable, counting none past
    /// `cap`; moves the end offsets of the messages they sent into `ends`.
    /// An error names a failed delivery: what follows it cannot be durable.
    pub fn settle(
        &mut self,
        writes: u64,
        cap: u64,
        ends: &mut BTreeMap<i32, i64>,
    ) -> Result<u64, String> {
        if let Some(why) = self.failed.take() {
            return Err(why);
        }
        while let Some(&(write, Some((partition, offset)))) = self.inflight.front() {
            if write > cap {
                break;
            }
            self.inflight.pop_front();
            let end = ends.entry(partition).or_insert(0);
            *end = (*end).max(offset + 1);
        }
        let durable = match self.inflight.front() {
            Some(&(write, _)) => write - 1,
            None => writes,
        };
        Ok(durable.min(cap))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ends(v: &[(i32, i64)]) -> BTreeMap<i32, i64> {
        v.iter().copied().collect()
    }

    #[test]
    fn a_write_is_durable_only_with_every_write_before_it() {
        let mut p = Produced::default();
        let mut e = BTreeMap::new();
        for w in 1..=3 {
            p.sending(w);
        }
        // The third is acknowledged first (another partition): nothing is
        // durable, and its offset is not in the ends yet.
        p.acknowledged(3, 1, 40);
        assert_eq!(p.settle(3, u64::MAX, &mut e), Ok(0));
        assert!(e.is_empty());
        p.acknowledged(1, 0, 7);
        assert_eq!(p.settle(3, u64::MAX, &mut e), Ok(1));
        assert_eq!(e, ends(&[(0, 8)]));
        p.acknowledged(2, 0, 8);
        assert_eq!(p.settle(3, u64::MAX, &mut e), Ok(3));
        assert_eq!(e, ends(&[(0, 9), (1, 41)]));
        assert!(p.inflight.is_empty());
    }

    #[test]
    fn writes_that_sent_nothing_are_durable_with_those_before_them() {
        let mut p = Produced::default();
        let mut e = BTreeMap::new();
        // Writes 1 and 3 were skipped (already written); 2 and 4 sent.
        p.sending(2);
        p.sending(4);
        assert_eq!(p.settle(4, u64::MAX, &mut e), Ok(1));
        p.acknowledged(2, 0, 0);
        assert_eq!(p.settle(5, u64::MAX, &mut e), Ok(3));
        p.acknowledged(4, 0, 1);
        assert_eq!(p.settle(5, u64::MAX, &mut e), Ok(5));
        assert_eq!(e, ends(&[(0, 2)]));
    }

    #[test]
    fn nothing_past_the_cap_is_durable_or_in_the_ends() {
        let mut p = Produced::default();
        let mut e = BTreeMap::new();
        p.sending(1);
        p.sending(2);
        p.acknowledged(1, 0, 0);
        p.acknowledged(2, 0, 1);
        assert_eq!(p.settle(2, 1, &mut e), Ok(1));
        assert_eq!(e, ends(&[(0, 1)]));
        assert_eq!(p.settle(2, 2, &mut e), Ok(2));
        assert_eq!(e, ends(&[(0, 2)]));
    }

    #[test]
    fn a_refused_send_awaits_nothing_and_a_failure_is_reported_once() {
        let mut p = Produced::default();
        let mut e = BTreeMap::new();
        p.sending(1);
        p.not_sent();
        assert_eq!(p.settle(1, u64::MAX, &mut e), Ok(1));
        p.sending(2);
        p.failed("broker said no".into());
        p.failed("and again".into());
        assert_eq!(
            p.settle(2, u64::MAX, &mut e),
            Err("broker said no".to_string())
        );
        assert_eq!(p.settle(2, u64::MAX, &mut e), Ok(1));
    }
}
