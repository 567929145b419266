//! A transactional Kafka sink's transactions, committed off the executor's
//! thread.
//!
//! A transaction stays open for `transaction_interval` after its first
//! record, across as many engine commits as fall in it; then a thread of
//! its own commits it (librdkafka's commit waits for every acknowledgement
//! and the broker's answer) and opens the next. The executor never waits:
//! records written meanwhile are held and sent into the next transaction
//! once it is open, and the writes of a transaction count as durable only
//! once its commit returned. A crash before that aborts it (the next start's
//! `init_transactions`), and its records are delivered again.

use super::sink::SinkContext;
use rdkafka::producer::{BaseProducer, Producer};
use std::sync::mpsc::{self, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A transaction's commit returned.
pub(super) struct Committed;

pub(super) struct Transactions {
    interval: Duration,
    /// The writes the last committed transaction covers (all before it
    /// are durable).
    committed: u64,
    /// The commit under way, and the writes it covers.
    committing: Option<u64>,
    /// When the open transaction took its first record (`None`: none yet).
    opened: Option<Instant>,
    /// Asks the committer to commit the open transaction and open the next.
    requests: Option<mpsc::Sender<()>>,
    done: mpsc::Receiver<Result<(), String>>,
    committer: Option<JoinHandle<()>>,
}

impl Transactions {
    /// Opens the first transaction and starts the committer.
    pub fn start(
        producer: Arc<BaseProducer<SinkContext>>,
        component: &str,
        interval: Duration,
        timeout: Duration,
    ) -> Result<Transactions, String> {
        producer
            .begin_transaction()
            .map_err(|e| format!("beginning a transaction: {e}"))?;
        let (requests, asked) = mpsc::channel::<()>();
        let (tell, done) = mpsc::channel();
        let committer = std::thread::Builder::new()
            .name(format!("kafka-tx-{component}"))
            .spawn(move || {
                for () in asked {
                    let result = producer
                        .commit_transaction(timeout)
                        .map_err(|e| format!("committing the transaction: {e}"))
                        .and_then(|()| {
                            producer
                                .begin_transaction()
                                .map_err(|e| format!("beginning a transaction: {e}"))
                        });
                    let failed = result.is_err();
                    if tell.send(result).is_err() || failed {
                        return;
                    }
                }
            })
            .map_err(|e| format!("starting the transactions' thread: {e}"))?;
        Ok(Transactions {
            interval,
            committed: 0,
            committing: None,
            opened: None,
            requests: Some(requests),
            done,
            committer: Some(committer),
        })
    }

    /// Whether a commit is under way (records are held meanwhile).
    pub fn committing(&self) -> bool {
        self.committing.is_some()
    }

    /// A record was sent into the open transaction.
    pub fn sent(&mut self) {
        self.opened.get_or_insert_with(Instant::now);
    }

    /// The writes the last committed transaction covers.
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// Takes in a commit that ended, and starts the commit of the open
    /// transaction once it is `interval` old. `writes`: the writes so far,
    /// none of them held. Writes that sent nothing into an open transaction
    /// are durable at once.
    pub fn poll(&mut self, writes: u64) -> Result<Option<Committed>, String> {
        let mut ended = None;
        if let Some(upto) = self.committing {
            match self.done.try_recv() {
                Ok(Ok(())) => {
                    self.committed = upto;
                    self.committing = None;
                    ended = Some(Committed);
                }
                Ok(Err(why)) => return Err(why),
                Err(TryRecvError::Empty) => return Ok(None),
                Err(TryRecvError::Disconnected) => {
                    return Err("the transactions' thread ended".into())
                }
            }
        }
        match self.opened {
            None => self.committed = writes,
            Some(at) if at.elapsed() >= self.interval => {
                let asked = self.requests.as_ref().is_some_and(|r| r.send(()).is_ok());
                if !asked {
                    return Err("the transactions' thread ended".into());
                }
                self.committing = Some(writes);
                self.opened = None;
            }
            Some(_) => {}
        }
        Ok(ended)
    }
}

impl Drop for Transactions {
    /// Lets a commit under way end (within the sink's timeout) before the
    /// producer goes: a new start's `init_transactions` would abort it.
    fn drop(&mut self) {
        self.requests = None;
        if let Some(t) = self.committer.take() {
            let _ = t.join();
        }
    }
}
