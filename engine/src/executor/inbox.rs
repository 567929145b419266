//! Step 1 of a turn: taking what waits in the executor's inbox
//! (deliveries, acknowledgements, peers coming back, watermarks) into the
//! shards it is for.

use super::Executor;
use crate::error::EngineError;
use crate::message::Msg;
use crate::plan::Sid;
use crossbeam_channel::RecvTimeoutError;
use std::time::Duration;

impl Executor {
    /// Step 1: take what is in the inbox.
    pub(super) fn receive(&mut self, wait: Duration) -> Result<(), EngineError> {
        let first = if wait.is_zero() {
            self.inbox.try_recv().ok()
        } else {
            match self.inbox.recv_timeout(wait) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
        };
        let Some(first) = first else { return Ok(()) };
        self.absorb(first);
        let mut budget = 64;
        while budget > 0 {
            match self.inbox.try_recv() {
                Ok(msgs) => self.absorb(msgs),
                Err(_) => break,
            }
            budget -= 1;
        }
        Ok(())
    }

    fn absorb(&mut self, msgs: Vec<Msg>) {
        let plan = &*self.plan;
        for msg in msgs {
            match msg {
                Msg::Deliver { ch, seq, env } => {
                    let dst = plan.chan(ch).dst;
                    if let Some(&i) = self.local.get(&dst) {
                        self.shards[i].receive(ch, seq, env);
                    }
                }
                Msg::Ack { ch, upto } => {
                    let c = plan.chan(ch);
                    let Some(&i) = self.local.get(&c.src) else {
                        continue;
                    };
                    let (mut first, mut last) = (None, 0);
                    let n = self.shards[i].ack(ch, upto, |seq, _| {
                        first.get_or_insert(seq);
                        last = seq;
                    });
                    if let Some(first) = first {
                        self.released.push((ch, first, last));
                        self.released_count += n as i64;
                    }
                }
                Msg::Shard(c) => self.control.push(c),
                Msg::PeerUp { worker } => {
                    let routes = &self.shared.routes;
                    let on = |sid: Sid| routes.owned_by(sid, worker);
                    for shard in &mut self.shards {
                        shard.rewind(|ch| on(plan.chan(ch).dst));
                        // At a sink that defers: what is durable, not all
                        // it applied.
                        for (ch, upto) in shard.acknowledgeable_by_input() {
                            if on(plan.chan(ch).src) {
                                let a = self.acks.entry(ch).or_insert(0);
                                *a = (*a).max(upto);
                            }
                        }
                        if plan.downstream(shard.sid()).iter().any(|&d| on(d)) {
                            shard.resend_watermark();
                        }
                    }
                }
                Msg::Watermark {
                    from,
                    wm,
                    idle,
                    counted,
                } => {
                    if counted {
                        self.wm_msgs_seen += 1;
                    }
                    if let Some(subs) = self.wm_subscribers.get(&from) {
                        for &(i, pos) in subs {
                            self.shards[i].upstream_watermark(pos, wm, idle);
                        }
                    }
                }
            }
        }
    }
}
