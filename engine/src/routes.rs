//! Which worker runs each shard now, and which executor of this worker runs
//! the shards it owns: the routing table every send, acknowledgement and
//! watermark consults.
//!
//! A fixed cluster starts from the plan's deal (`sid % workers`) and never
//! changes it. When shards move between live workers (their ownership kept
//! in a coordination service), the table changes while the worker runs: a
//! shard whose owner is not known (before its first claim, or while it is
//! moving) has no route, and what would go to it stays in the outbox until a
//! route appears; then every executor sends it again (`Msg::Rerouted`).

use crate::plan::{Plan, Sid};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// No owner known (not yet claimed, or moving).
const NOBODY: u32 = u32::MAX;

/// The routing table of one worker.
pub struct Routes {
    owner: Box<[AtomicU32]>,
    /// The executor that runs the shard, meaningful where this worker owns it.
    executor: Box<[AtomicU32]>,
    /// The owner's epoch of each shard (0 when not known).
    epoch: Box<[AtomicU64]>,
    /// Rises at every change, so that cached destinations can be refreshed.
    version: AtomicU64,
    /// Executor threads per worker.
    threads: usize,
    /// Whether ownership comes from a coordination service (see [`Routes::new`]).
    dynamic: bool,
}

impl Routes {
    /// The plan's deal (`dynamic` false), or no routes at all (`dynamic`:
    /// ownership comes from a coordination service, shard by shard).
    pub(crate) fn new(plan: &Plan, dynamic: bool) -> Routes {
        Routes {
            owner: plan
                .shards
                .iter()
                .map(|s| AtomicU32::new(if dynamic { NOBODY } else { s.worker as u32 }))
                .collect(),
            executor: plan
                .shards
                .iter()
                .map(|s| AtomicU32::new(s.executor as u32))
                .collect(),
            epoch: plan.shards.iter().map(|_| AtomicU64::new(0)).collect(),
            version: AtomicU64::new(0),
            threads: plan.threads,
            dynamic,
        }
    }

    /// Whether shards are claimed from a coordination service, which says
    /// who runs them after a shard is given up here.
    pub fn dynamic(&self) -> bool {
        self.dynamic
    }

    /// The worker that runs `sid` now, if one does.
    pub fn owner(&self, sid: Sid) -> Option<usize> {
        match self.owner.get(sid as usize)?.load(Ordering::Acquire) {
            NOBODY => None,
            w => Some(w as usize),
        }
    }

    /// The epoch of `sid`'s current owner (0 when not known).
    pub fn epoch(&self, sid: Sid) -> u64 {
        self.epoch
            .get(sid as usize)
            .map_or(0, |e| e.load(Ordering::Acquire))
    }

    /// Whether worker `w` runs `sid` now.
    pub fn owned_by(&self, sid: Sid, w: usize) -> bool {
        self.owner(sid) == Some(w)
    }

    /// The executor of this worker that runs `sid` (where it is local).
    pub fn executor(&self, sid: Sid) -> usize {
        self.executor
            .get(sid as usize)
            .map_or(0, |e| e.load(Ordering::Acquire) as usize)
    }

    /// Where worker `me` sends what is for `sid`: its own executor
    /// (`0..threads`), `threads + worker` for another worker, or nowhere
    /// while nobody runs it.
    pub fn destination(&self, me: usize, sid: Sid) -> Option<usize> {
        let w = self.owner(sid)?;
        Some(if w == me {
            self.executor(sid)
        } else {
            self.threads + w
        })
    }

    /// Records that `owner` runs `sid` from `epoch` on (`None`: nobody now),
    /// on `executor` where that is this worker.
    pub fn set(&self, sid: Sid, owner: Option<usize>, executor: usize, epoch: u64) {
        let i = sid as usize;
        if i >= self.owner.len() {
            return;
        }
        self.executor[i].store(executor as u32, Ordering::Release);
        self.epoch[i].store(epoch, Ordering::Release);
        self.owner[i].store(owner.map_or(NOBODY, |w| w as u32), Ordering::Release);
        self.version.fetch_add(1, Ordering::AcqRel);
    }

    /// Rises at every [`Routes::set`].
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The shards worker `w` runs now.
    pub fn shards_of(&self, w: usize) -> Vec<Sid> {
        (0..self.owner.len() as Sid)
            .filter(|&s| self.owned_by(s, w))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(workers: usize) -> Plan {
        let mut text = String::from(
            "[engine]\nshards = 4\nthreads = 2\n[sources.gen]\ntype = \"nothing\"\n\
             [computations.c]\ntype = \"nothing\"\ninputs = [\"gen\"]\n[cluster]\n",
        );
        for w in 0..workers {
            text.push_str(&format!(
                "[[cluster.workers]]\nid = \"w{w}\"\naddress = \"127.0.0.1:{}\"\n",
                7000 + w
            ));
        }
        crate::test_kinds::plan(&text)
    }

    #[test]
    fn the_fixed_deal_routes_by_the_plan_and_a_move_changes_one_shard() {
        let plan = plan(2);
        let r = Routes::new(&plan, false);
        for (sid, s) in plan.shards.iter().enumerate() {
            assert_eq!(r.owner(sid as Sid), Some(s.worker));
        }
        let sid = plan
            .shards
            .iter()
            .position(|s| s.worker == 1)
            .expect("a shard of w1") as Sid;
        assert_eq!(r.destination(0, sid), Some(plan.threads + 1));
        let v = r.version();
        r.set(sid, None, 0, 0);
        assert_eq!(r.destination(0, sid), None, "nobody runs a moving shard");
        r.set(sid, Some(0), 1, 7);
        assert_eq!(r.destination(0, sid), Some(1), "now local, on executor 1");
        assert_eq!(r.destination(1, sid), Some(plan.threads));
        assert_eq!(r.epoch(sid), 7);
        assert_eq!(r.version(), v + 2);
        assert!(r.shards_of(0).contains(&sid));
        assert!(!r.shards_of(1).contains(&sid));
    }

    #[test]
    fn a_dynamic_table_starts_with_no_routes() {
        let plan = plan(2);
        let r = Routes::new(&plan, true);
        assert!((0..plan.shards.len() as Sid).all(|s| r.owner(s).is_none()));
        assert_eq!(r.owner(plan.shards.len() as Sid + 5), None);
    }
}
