//! The commit log: each shard's commits, appended off the machine before
//! they are released (`[state] log`), so that a lost machine loses nothing.
//!
//! With a log, a turn's commit is: split the turn's batch into one entry per
//! shard ([`millrace_storage::Batch::log_entries`]), append every entry to
//! its shard's log and wait until all are durable, then commit the batch to
//! RocksDB, then release. The local store is a cache of the log: it is
//! never ahead of it, and a shard whose store was lost is rebuilt by
//! applying its log ([`catch_up`]).
//!
//! Only one incarnation extends a shard's history. Every append names the
//! sequence the shard's log must end at (the one its owner's previous
//! append, or its read, returned), and the log refuses it otherwise
//! ([`LogError::Fenced`]). A shard that starts reads its log to the end and
//! appends a first entry after it ([`fence`]): from then on, an older
//! incarnation's append fails, so everything it ever released precedes the
//! fence and is replayed by the new one.
//!
//! The trait is the seam between the engine and a log server; the binary
//! implements it on NATS JetStream, [`MemoryLog`] in memory for tests.

use crate::error::EngineError;
use crate::layout;
use crate::metrics::Metrics;
use millrace_storage::{Cf, Store};
use std::collections::BTreeMap;
use std::time::Instant;

/// One entry to append: `bytes` to the log of `shard`, which must end at
/// `after` (0: the log is empty). `incarnation` names the writer, so that a
/// retried append is recognised as the same one.
#[derive(Debug, Clone, Copy)]
pub struct Append<'a> {
    /// The shard's name in the log: `component.shard`.
    pub shard: &'a str,
    /// The sequence the shard's log must end at.
    pub after: u64,
    /// The writer: random per shard start.
    pub incarnation: u64,
    /// The entry.
    pub bytes: &'a [u8],
}

/// Why an append or a read failed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The shard's log no longer ends where this writer left it: another
    /// incarnation extended it.
    #[error(
        "the commit log of shard {shard} no longer ends at {expected}: another worker has \
         taken the shard over, and this worker's copy of it is stale"
    )]
    Fenced {
        /// The shard's name in the log.
        shard: String,
        /// Where this writer expected it to end.
        expected: u64,
    },
    /// The log server could not be reached, or failed, for longer than a
    /// commit may wait.
    #[error("commit log: {0}")]
    Unavailable(String),
    /// An entry read back is not one millrace wrote.
    #[error("commit log of shard {shard}, entry {seq}: {why}")]
    Malformed {
        /// The shard's name in the log.
        shard: String,
        /// The entry's sequence.
        seq: u64,
        /// What is wrong with it.
        why: String,
    },
}

/// What [`CommitLog::read`] calls with each entry: its sequence and bytes.
pub type OnEntry<'a> = dyn FnMut(u64, &[u8]) -> Result<(), EngineError> + 'a;

/// A log of entries per shard, with fenced appends.
pub trait CommitLog: Send + Sync + 'static {
    /// Appends every entry (in parallel where the log allows), each after
    /// the end its `after` names; returns once all are durable, with each
    /// one's sequence, in order. An entry whose log ends elsewhere is
    /// refused with [`LogError::Fenced`]; the others may have been appended.
    fn append(&self, entries: &[Append<'_>]) -> Result<Vec<u64>, LogError>;

    /// Calls `f` with each entry of `shard`'s log after sequence `after`, in
    /// order, and returns the sequence its last entry has (0: none). When
    /// that is below `after`, `f` is not called.
    fn read(&self, shard: &str, after: u64, f: &mut OnEntry<'_>) -> Result<u64, EngineError>;

    /// Where the log is, for messages.
    fn describe(&self) -> String;
}

impl std::fmt::Debug for dyn CommitLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CommitLog({})", self.describe())
    }
}

/// The name of a shard in the log.
pub(crate) fn shard_name(component: &str, shard: u32) -> String {
    format!("{component}.{shard}")
}

/// A random number for one start of one shard (no two starts share one).
pub(crate) fn incarnation() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// Most bytes of log entries applied to the store in one commit while
/// catching up.
const CATCH_UP_BATCH_BYTES: usize = 4 << 20;

/// Brings the store's copy of the shard with `prefix` (named `name` in the
/// log) up to the end of its log: applies every entry after the last one
/// it applied, recording each one's sequence with it. Returns where the
/// log ends. A log that ends before what the store applied was lost or is
/// another one: that is refused, nothing changed.
pub(crate) fn catch_up(
    log: &dyn CommitLog,
    store: &Store,
    name: &str,
    prefix: &[u8],
    metrics: &Metrics,
) -> Result<u64, EngineError> {
    let seq_key = layout::log_seq_key(prefix);
    let applied = store
        .get(Cf::Meta, &seq_key)?
        .as_deref()
        .and_then(layout::read_u64)
        .unwrap_or(0);
    let mut batch = store.batch();
    let mut bytes = 0usize;
    let mut replayed = 0u64;
    let end = log.read(name, applied, &mut |seq, entry| {
        batch.apply_log_entry(entry).map_err(|e| {
            EngineError::Corrupt(format!("commit log of shard {name}, entry {seq}: {e}"))
        })?;
        batch.put(Cf::Meta, &seq_key, &seq.to_be_bytes());
        bytes += entry.len();
        replayed += 1;
        if bytes >= CATCH_UP_BATCH_BYTES {
            store.commit(std::mem::replace(&mut batch, store.batch()))?;
            bytes = 0;
        }
        Ok(())
    })?;
    store.commit(batch)?;
    metrics.log_replayed.inc_by(replayed);
    if end < applied {
        return Err(EngineError::Layout(format!(
            "shard {name}: {} has applied commit log entry {applied}, but the log at {} \
             ends at {end}: the log lost entries, or is not this deployment's. Nothing was \
             changed; start on the log the directory was written with, or from an empty \
             data directory",
            store.path().display(),
            log.describe()
        )));
    }
    Ok(end.max(applied))
}

/// How many times a start re-reads a log that another writer extended
/// between its read and its fence.
const FENCE_ATTEMPTS: usize = 5;

/// Makes this start of the shard with `prefix` the only writer of its log:
/// catches up, then appends an entry after the end it read (re-reading
/// when another writer got there first). The entry holds the shard's epoch
/// and, when the log was empty, every key the store holds of the shard (a
/// data directory or a savepoint from before the log). Returns the
/// sequence the shard's next append must follow.
pub(crate) fn fence(
    log: &dyn CommitLog,
    store: &Store,
    (name, prefix): (&str, &[u8]),
    incarnation: u64,
    metrics: &Metrics,
) -> Result<u64, EngineError> {
    let epoch_key = layout::epoch_key(prefix);
    let seq_key = layout::log_seq_key(prefix);
    for _ in 0..FENCE_ATTEMPTS {
        let end = catch_up(log, store, name, prefix, metrics)?;
        let mut batch = store.batch();
        if end == 0 {
            for cf in Cf::ALL {
                store.for_each_prefix(cf, prefix, |k, v| {
                    if !(cf == Cf::Meta && k == seq_key.as_slice()) {
                        batch.put(cf, k, v);
                    }
                    true
                })?;
            }
        } else if let Some(epoch) = store.get(Cf::Meta, &epoch_key)? {
            batch.put(Cf::Meta, &epoch_key, &epoch);
        }
        let mut entries = batch.log_entries(|_| Some(()))?;
        let bytes = entries.remove(&()).unwrap_or_else(empty_entry);
        let append = Append {
            shard: name,
            after: end,
            incarnation,
            bytes: &bytes,
        };
        match log.append(&[append]) {
            Ok(seqs) => {
                let seq = seqs.first().copied().ok_or_else(|| {
                    EngineError::Fatal(format!("commit log: no sequence for shard {name}"))
                })?;
                metrics.log_appends.inc();
                metrics.log_bytes.inc_by(bytes.len() as u64);
                let mut b = store.batch();
                b.put(Cf::Meta, &seq_key, &seq.to_be_bytes());
                store.commit(b)?;
                return Ok(seq);
            }
            Err(LogError::Fenced { .. }) => {
                tracing::info!(
                    shard = name,
                    "another writer extended the log; reading it again"
                );
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(EngineError::Fatal(format!(
        "shard {name}: the commit log kept being extended by another writer while this \
         worker started the shard ({FENCE_ATTEMPTS} attempts)"
    )))
}

/// An entry with no operations.
fn empty_entry() -> Vec<u8> {
    // The 12-byte header (sequence, count) of a batch with no records.
    vec![0; 12]
}

/// What an executor appends for its shards.
pub(crate) struct ExecutorLog {
    pub log: std::sync::Arc<dyn CommitLog>,
    /// Per local shard prefix: its name in the log, the sequence its next
    /// append follows, and this start's incarnation.
    shards: BTreeMap<Vec<u8>, LocalShard>,
    /// The distinct lengths of the local prefixes.
    prefix_lens: Vec<usize>,
}

struct LocalShard {
    name: String,
    last: u64,
    incarnation: u64,
}

impl ExecutorLog {
    pub fn new(log: std::sync::Arc<dyn CommitLog>) -> Self {
        ExecutorLog {
            log,
            shards: BTreeMap::new(),
            prefix_lens: Vec::new(),
        }
    }

    /// Starts appending for the shard with `prefix`: fences its log.
    pub fn start(
        &mut self,
        store: &Store,
        (component, shard, prefix): (&str, u32, &[u8]),
        metrics: &Metrics,
    ) -> Result<(), EngineError> {
        let name = shard_name(component, shard);
        let incarnation = incarnation();
        let last = fence(&*self.log, store, (&name, prefix), incarnation, metrics)?;
        self.shards.insert(
            prefix.to_vec(),
            LocalShard {
                name,
                last,
                incarnation,
            },
        );
        self.index();
        Ok(())
    }

    /// Stops appending for the shard with `prefix`.
    pub fn stop(&mut self, prefix: &[u8]) {
        self.shards.remove(prefix);
        self.index();
    }

    fn index(&mut self) {
        self.prefix_lens = self.shards.keys().map(Vec::len).collect();
        self.prefix_lens.sort_unstable();
        self.prefix_lens.dedup();
    }

    /// The local shard prefix a stored key starts with.
    fn shard_of<'k>(&self, key: &'k [u8]) -> Option<&'k [u8]> {
        self.prefix_lens
            .iter()
            .filter_map(|&n| key.get(..n))
            .find(|p| self.shards.contains_key(*p))
    }

    /// Appends `batch`'s writes to the logs of the shards they belong to
    /// and waits until all are durable; then records each shard's new end
    /// in `batch` (as its last entry applied). Writes of no local shard
    /// (the worker's own keys) stay local.
    pub fn append(
        &mut self,
        batch: &mut millrace_storage::Batch<'_>,
        metrics: &Metrics,
    ) -> Result<(), EngineError> {
        let entries = batch.log_entries(|key| self.shard_of(key).map(<[u8]>::to_vec))?;
        if entries.is_empty() {
            return Ok(());
        }
        let appends: Vec<Append<'_>> = entries
            .iter()
            .filter_map(|(prefix, bytes)| {
                let s = self.shards.get(prefix)?;
                Some(Append {
                    shard: &s.name,
                    after: s.last,
                    incarnation: s.incarnation,
                    bytes,
                })
            })
            .collect();
        let started = Instant::now();
        let seqs = match self.log.append(&appends) {
            Ok(seqs) => seqs,
            Err(e @ LogError::Fenced { .. }) => {
                metrics.log_fenced.inc();
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        metrics
            .log_append_seconds
            .observe(started.elapsed().as_secs_f64());
        metrics.log_appends.inc_by(appends.len() as u64);
        metrics
            .log_bytes
            .inc_by(appends.iter().map(|a| a.bytes.len() as u64).sum());
        for ((prefix, _), seq) in entries.iter().zip(seqs) {
            if let Some(s) = self.shards.get_mut(prefix) {
                s.last = seq;
            }
            batch.put(Cf::Meta, &layout::log_seq_key(prefix), &seq.to_be_bytes());
        }
        Ok(())
    }
}

/// An entry in a [`MemoryLog`]: sequence and bytes.
type Entry = (u64, Vec<u8>);

/// A commit log in memory, with the fencing of a real one: for tests, and
/// to try the engine's commit order without a log server. `on_append` runs
/// before an append returns (a test records it, or fails it).
#[derive(Default)]
pub struct MemoryLog {
    /// Per shard: its entries, by sequence.
    logs: parking_lot::Mutex<BTreeMap<String, Vec<Entry>>>,
    next: std::sync::atomic::AtomicU64,
    #[allow(clippy::type_complexity)]
    on_append: Option<Box<dyn Fn(&[Append<'_>]) + Send + Sync>>,
}

impl MemoryLog {
    /// A log that calls `f` with every append before it returns.
    pub fn with_hook(f: impl Fn(&[Append<'_>]) + Send + Sync + 'static) -> Self {
        MemoryLog {
            on_append: Some(Box::new(f)),
            ..MemoryLog::default()
        }
    }

    /// How many entries the log of `shard` holds.
    pub fn len_of(&self, shard: &str) -> usize {
        self.logs.lock().get(shard).map_or(0, Vec::len)
    }
}

impl CommitLog for MemoryLog {
    fn append(&self, entries: &[Append<'_>]) -> Result<Vec<u64>, LogError> {
        let mut logs = self.logs.lock();
        let mut out = Vec::with_capacity(entries.len());
        for a in entries {
            let log = logs.entry(a.shard.to_owned()).or_default();
            let end = log.last().map_or(0, |(s, _)| *s);
            if end != a.after {
                return Err(LogError::Fenced {
                    shard: a.shard.to_owned(),
                    expected: a.after,
                });
            }
            let seq = self.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            log.push((seq, a.bytes.to_vec()));
            out.push(seq);
        }
        drop(logs);
        if let Some(f) = &self.on_append {
            f(entries);
        }
        Ok(out)
    }

    fn read(&self, shard: &str, after: u64, f: &mut OnEntry<'_>) -> Result<u64, EngineError> {
        let entries: Vec<Entry> = self
            .logs
            .lock()
            .get(shard)
            .map(|l| l.iter().filter(|(s, _)| *s > after).cloned().collect())
            .unwrap_or_default();
        for (seq, bytes) in &entries {
            f(*seq, bytes)?;
        }
        let end = self
            .logs
            .lock()
            .get(shard)
            .and_then(|l| l.last().map(|(s, _)| *s))
            .unwrap_or(0);
        Ok(end)
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path(), &Default::default()).expect("store");
        (dir, store)
    }

    fn prefix() -> Vec<u8> {
        layout::shard_prefix("counts", 1)
    }

    fn seq_of(store: &Store) -> Option<u64> {
        store
            .get(Cf::Meta, &layout::log_seq_key(&prefix()))
            .expect("get")
            .as_deref()
            .and_then(layout::read_u64)
    }

    /// A shard written before the log starts it with a copy of itself; a
    /// store rebuilt from the log alone has the same keys.
    #[test]
    fn the_first_fence_carries_what_the_store_holds_and_rebuilds_it_elsewhere() {
        let (_a, a) = store();
        let p = prefix();
        let mut b = a.batch();
        b.put_state(&layout::state_key(&p, b"k"), Some(b"5"));
        b.put(Cf::Meta, &layout::epoch_key(&p), &7u64.to_be_bytes());
        b.put(
            Cf::Meta,
            &layout::epoch_key(&layout::shard_prefix("other", 1)),
            &[1],
        );
        a.commit(b).expect("commit");
        let log = MemoryLog::default();
        let m = Metrics::new();
        let seq = fence(&log, &a, ("counts.1", &p), 1, &m).expect("fence");
        assert_eq!(seq_of(&a), Some(seq));
        assert_eq!(log.len_of("counts.1"), 1);
        let (_b, b) = store();
        assert_eq!(
            catch_up(&log, &b, "counts.1", &p, &m).expect("catch up"),
            seq
        );
        assert_eq!(
            b.get_state(&layout::state_key(&p, b"k"))
                .expect("get")
                .as_deref(),
            Some(&b"5"[..])
        );
        assert_eq!(
            b.get(Cf::Meta, &layout::epoch_key(&p)).expect("get"),
            Some(7u64.to_be_bytes().to_vec())
        );
        // Only the shard's own keys travel.
        assert_eq!(
            b.get(
                Cf::Meta,
                &layout::epoch_key(&layout::shard_prefix("other", 1))
            )
            .expect("get"),
            None
        );
        assert_eq!(m.log_replayed.get(), 1);
    }

    /// A second start fences the first out: the first's next append is
    /// refused and counted, and what it would have committed is not.
    #[test]
    fn a_stale_incarnations_append_is_refused_and_counted() {
        let (_a, a) = store();
        let (_b, b) = store();
        let p = prefix();
        let log: Arc<dyn CommitLog> = Arc::new(MemoryLog::default());
        let m = Metrics::new();
        let mut old = ExecutorLog::new(Arc::clone(&log));
        old.start(&a, ("counts", 1, &p), &m).expect("start");
        let mut batch = a.batch();
        batch.put_state(&layout::state_key(&p, b"k"), Some(b"1"));
        old.append(&mut batch, &m).expect("append");
        a.commit(batch).expect("commit");
        // Another worker takes the shard over: it replays, then fences.
        let mut new = ExecutorLog::new(Arc::clone(&log));
        new.start(&b, ("counts", 1, &p), &m).expect("start");
        assert_eq!(
            b.get_state(&layout::state_key(&p, b"k"))
                .expect("get")
                .as_deref(),
            Some(&b"1"[..])
        );
        let mut batch = a.batch();
        batch.put_state(&layout::state_key(&p, b"k"), Some(b"2"));
        let err = old.append(&mut batch, &m).unwrap_err();
        assert!(
            err.to_string()
                .contains("another worker has taken the shard over"),
            "{err}"
        );
        assert_eq!(m.log_fenced.get(), 1);
        // The new owner goes on.
        let mut batch = b.batch();
        batch.put_state(&layout::state_key(&p, b"k"), Some(b"2"));
        new.append(&mut batch, &m).expect("the new owner appends");
        // Writes of the worker's own keys are not logged.
        let mut batch = b.batch();
        batch.put(Cf::Meta, &layout::joined_key(), &[]);
        let before = m.log_appends.get();
        new.append(&mut batch, &m).expect("nothing to append");
        assert_eq!(m.log_appends.get(), before);
    }

    /// A log that ends before what the store applied is not this store's:
    /// refused, nothing changed. An entry that is not one is refused,
    /// naming the shard and the entry.
    #[test]
    fn a_log_behind_the_store_or_a_bad_entry_is_refused() {
        let (_a, a) = store();
        let p = prefix();
        let m = Metrics::new();
        let mut b = a.batch();
        b.put(Cf::Meta, &layout::log_seq_key(&p), &9u64.to_be_bytes());
        a.commit(b).expect("commit");
        let empty = MemoryLog::default();
        let err = catch_up(&empty, &a, "counts.1", &p, &m).unwrap_err();
        assert!(
            err.to_string().contains("has applied commit log entry 9"),
            "{err}"
        );
        assert_eq!(seq_of(&a), Some(9));
        let (_b, b) = store();
        let bad = MemoryLog::default();
        let garbage = Append {
            shard: "counts.1",
            after: 0,
            incarnation: 1,
            bytes: b"not an entry",
        };
        bad.append(&[garbage]).expect("append");
        let err = catch_up(&bad, &b, "counts.1", &p, &m).unwrap_err();
        assert!(
            err.to_string()
                .contains("commit log of shard counts.1, entry 1"),
            "{err}"
        );
        assert_eq!(seq_of(&b), None);
    }
}
