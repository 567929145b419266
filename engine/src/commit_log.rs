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
//! ([`LogError::Fenced`]). A shard that starts first appends an entry
//! after its log's end, then reads the log ([`fence`]): from then on, an
//! older incarnation's append fails, so everything it ever released
//! precedes the fence and is replayed by the new one.
//!
//! The trait is the seam between the engine and a log server; the binary
//! implements it on NATS JetStream, [`MemoryLog`] in memory for tests.

use crate::error::EngineError;
use crate::layout;
use crate::metrics::Metrics;
use millrace_storage::{Cf, Store};
use std::collections::BTreeMap;
use std::sync::Arc;
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
         taken the shard over (or someone else changed the log), and this worker's copy of it \
         is stale"
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

    /// Removes the entries of `shard`'s log up to sequence `through`.
    fn purge(&self, shard: &str, through: u64) -> Result<(), EngineError>;

    /// Where the log is, for messages.
    fn describe(&self) -> String;

    /// Names this log apart from any other of the same name: the same for
    /// as long as it keeps its entries, another once it was made again (its
    /// servers' storage lost) or on other servers. A store that applied
    /// entries of one log refuses another.
    fn identity(&self) -> String;
}

/// Where shards' snapshots go, and how often: with them, a shard's log is
/// cut below its last snapshot.
#[derive(Clone)]
pub struct Snapshots {
    /// The store the files go to (`[state] snapshots`).
    pub store: std::sync::Arc<dyn crate::savepoint::SavepointStore>,
    /// A shard is snapshotted once this many bytes went to its log since
    /// its last snapshot.
    pub every_bytes: u64,
    /// The folder of the deployment's snapshots: the log's name and its
    /// identity (`NAME-CREATED`), so that deployments may share a store,
    /// even two of one name on different log servers, without one
    /// removing the other's files.
    pub deployment: String,
    /// Until then no call goes to the store: one failed, after holding its
    /// executor for a while (shared by every executor of the worker, so
    /// that a store that does not answer costs each one try, not one per
    /// shard).
    resting: std::sync::Arc<parking_lot::Mutex<Instant>>,
}

impl Snapshots {
    /// Snapshots to `store` once a shard's log grew by `every_bytes`, under
    /// the folder `deployment`.
    pub fn new(
        store: std::sync::Arc<dyn crate::savepoint::SavepointStore>,
        every_bytes: u64,
        deployment: String,
    ) -> Snapshots {
        Snapshots {
            store,
            every_bytes,
            deployment,
            resting: std::sync::Arc::new(parking_lot::Mutex::new(Instant::now())),
        }
    }

    /// Whether the store is left alone for now.
    fn resting(&self) -> bool {
        Instant::now() < *self.resting.lock()
    }

    /// After a call that failed having taken `took`: the store is left
    /// alone for ten times as long, and at least [`SNAPSHOT_RETRY`] (one
    /// that does not answer then costs a tenth of the executors' time).
    fn rest(&self, took: std::time::Duration) {
        let until = Instant::now() + SNAPSHOT_RETRY.max(took * 10);
        let mut r = self.resting.lock();
        *r = (*r).max(until);
    }

    /// The folder of shard `name`'s snapshots.
    fn folder(&self, name: &str) -> String {
        format!("{}/{}", self.deployment, escaped_name(name))
    }

    /// Removes every file in shard `name`'s folder but its recorded
    /// snapshot `keep`: what a crash between writing a snapshot and
    /// recording it, or between recording the next and removing the one
    /// before, left behind, and what a fenced-off writer wrote. Only after
    /// [`fence`], so that no other writer can still record a snapshot. A
    /// file a fenced-off writer is still writing is left for the next
    /// start; a failure is logged and loses nothing.
    fn remove_unrecorded(&self, name: &str, keep: Option<&Snapshot>) -> usize {
        if self.resting() {
            return 0;
        }
        let folder = self.folder(name);
        let started = Instant::now();
        let names = match self.store.list(&folder) {
            Ok(names) => names,
            Err(e) => {
                self.rest(started.elapsed());
                tracing::warn!(shard = name, store = %self.store.describe(), error = %e, "the shard's snapshot folder could not be listed; files it no longer needs may stay");
                return 0;
            }
        };
        let mut removed = 0;
        for file in names.iter().map(|n| format!("{folder}/{n}")) {
            if keep.is_some_and(|k| k.file == file) {
                continue;
            }
            match self.store.delete(&file) {
                Ok(()) => removed += 1,
                Err(e) => {
                    tracing::warn!(shard = name, file = %file, error = %e, "a snapshot file the shard no longer needs was not removed")
                }
            }
        }
        if removed > 0 {
            tracing::info!(
                shard = name,
                removed,
                "removed snapshot files no log entry records"
            );
        }
        removed
    }
}

impl std::fmt::Debug for Snapshots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Snapshots({}, {}, every {} bytes)",
            self.store.describe(),
            self.deployment,
            self.every_bytes
        )
    }
}

/// A worker's commit log (`[state] log`) and where its snapshots go.
#[derive(Clone, Debug)]
pub struct LogSetup {
    /// Each commit is appended here before it is committed locally.
    pub log: std::sync::Arc<dyn CommitLog>,
    /// With `[state] snapshots`: the log is cut below shard snapshots.
    pub snapshots: Option<Snapshots>,
}

/// A shard's snapshot: the log sequence it holds everything up to, and its
/// file. Recorded in the shard's own meta key, so that the entry that
/// records it is in the log before the log is cut below it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Snapshot {
    seq: u64,
    file: String,
}

impl Snapshot {
    fn encode(&self) -> Vec<u8> {
        let mut v = self.seq.to_be_bytes().to_vec();
        v.extend_from_slice(self.file.as_bytes());
        v
    }

    fn decode(v: &[u8]) -> Option<Snapshot> {
        let (seq, file) = v.split_at_checked(8)?;
        let file = std::str::from_utf8(file).ok()?;
        crate::savepoint::check_path(file).ok()?;
        Some(Snapshot {
            seq: layout::read_u64(seq)?,
            file: file.to_owned(),
        })
    }
}

impl std::fmt::Debug for dyn CommitLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CommitLog({})", self.describe())
    }
}

/// The name of shard `sid` of `plan` in the log: `component.shard`.
pub(crate) fn shard_name(plan: &crate::plan::Plan, sid: u32) -> String {
    let spec = &plan.shards[sid as usize];
    format!("{}.{}", plan.nodes[spec.node].name, spec.shard)
}

/// A shard's name (`component.shard`) with every byte but letters,
/// digits, `-`, `_` and `.` written `%XX`: as a log server's subject
/// (which may hold no `*`, `>` or white space) and as a file name (no `/`,
/// `\\` or control character). A component's name never holds a `.`, and
/// `%` itself is written out, so no two names meet.
pub fn escaped_name(shard: &str) -> String {
    let mut out = String::with_capacity(shard.len());
    for b in shard.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A random number for one start of one shard (no two starts share one).
pub(crate) fn incarnation() -> u64 {
    crate::net::random_u64()
}

/// Most bytes of log entries applied to the store in one commit while
/// catching up.
const CATCH_UP_BATCH_BYTES: usize = 4 << 20;

/// Brings the store's copy of the shard with `prefix` (named `name` in the
/// log) up to the end of its log: applies every entry after the last one
/// it applied, recording each one's sequence with it. When the entries
/// after it record a snapshot newer than what the store has, the snapshot
/// is loaded first (from `snapshots`). Returns where the log ends. A log
/// that ends before what the store applied was lost or is another one:
/// that is refused, nothing changed.
///
/// Only after [`fence`]: a writer that was not fenced out could still
/// record a snapshot and cut the log below it while this reads.
pub(crate) fn catch_up(
    log: &dyn CommitLog,
    store: &Store,
    (name, prefix): (&str, &[u8]),
    snapshots: Option<&Snapshots>,
    metrics: &Metrics,
) -> Result<u64, EngineError> {
    let seq_key = layout::log_seq_key(prefix);
    let mut applied = applied_of(store, prefix)?;
    // The log may have been cut below a snapshot newer than what the store
    // applied: then the entries between are gone, and the snapshot stands
    // for them. (Stream sequences are shared by every shard, so a gap in
    // them says nothing; the snapshot's record, an entry, does.) Loading a
    // snapshot of a log that was not cut yet is as right as replaying.
    if let Some(snap) = latest_snapshot(log, name, prefix, applied)? {
        load_snapshot(store, (name, prefix), &snap, snapshots)?;
        metrics.log_snapshot_loads.inc();
        applied = applied_of(store, prefix)?;
        if applied != snap.seq {
            return Err(EngineError::Corrupt(format!(
                "shard {name}: snapshot {} holds log entries up to {applied}, its record \
                 says {}",
                snap.file, snap.seq
            )));
        }
    }
    let mut batch = store.batch();
    let mut bytes = 0usize;
    let mut replayed = 0u64;
    let end = log.read(name, applied, &mut |seq, entry| {
        batch.apply_log_entry(entry, prefix).map_err(|e| {
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
        return Err(log_behind(log, store, name, (applied, end)));
    }
    Ok(end.max(applied))
}

/// The name `/healthz` gives the commit log described as `describe` while
/// commits wait on it.
pub fn health_name(describe: &str) -> String {
    format!("commit log {describe}")
}

/// The error of a store that applied more of shard `name`'s log than the
/// log holds.
fn log_behind(
    log: &dyn CommitLog,
    store: &Store,
    name: &str,
    (applied, end): (u64, u64),
) -> EngineError {
    EngineError::Layout(format!(
        "shard {name}: {} has applied commit log entry {applied}, but the log at {} ends at \
         {end}: the log lost entries (its servers' storage was wiped?), or is not this \
         deployment's. Nothing was changed; start on the log the directory was written with, \
         or from an empty data directory",
        store.path().display(),
        log.describe()
    ))
}

/// The log's name for the deployment's shard layout (no `.`: no shard's).
const LAYOUT: &str = "layout";

/// Makes sure the log is read only in the shard layout it was written with
/// ([`crate::plan::Plan::shard_layout`]): the first start on a log records
/// the plan's; a later one must have the same count for every component
/// the records name, and records the components they do not. Checked
/// before anything else of the start: a refused one changes nothing.
pub(crate) fn check_layout(
    log: &dyn CommitLog,
    plan: &crate::plan::Plan,
) -> Result<(), EngineError> {
    for _ in 0..FENCE_ATTEMPTS {
        let mut had: Vec<String> = Vec::new();
        let end = log.read(LAYOUT, 0, &mut |_, entry| {
            had.push(String::from_utf8_lossy(entry).into_owned());
            Ok(())
        })?;
        let had: Vec<&str> = had.iter().map(String::as_str).collect();
        let record = match plan.shard_layout_against(&had) {
            Ok(None) => return Ok(()),
            Ok(Some(record)) => record,
            Err(differs) => {
                return Err(EngineError::Layout(format!(
                    "the commit log at {} was written with other shard counts ({}): its \
                     entries are per shard and cannot be read into another layout. Nothing \
                     was changed; keep the shard counts, or take a savepoint and load it into \
                     a deployment with a log name of its own",
                    log.describe(),
                    differs.join("; ")
                )))
            }
        };
        let next = Append {
            shard: LAYOUT,
            after: end,
            incarnation: incarnation(),
            bytes: record.as_bytes(),
        };
        match log.append(&[next]) {
            Ok(_) => return Ok(()),
            // Another worker recorded one first: read again.
            Err(LogError::Fenced { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(EngineError::Fatal(format!(
        "the commit log at {}: the shard layout record kept changing while this worker read it",
        log.describe()
    )))
}

/// The newest snapshot the entries of `name`'s log after `applied` record,
/// if it holds more than `applied`.
fn latest_snapshot(
    log: &dyn CommitLog,
    name: &str,
    prefix: &[u8],
    applied: u64,
) -> Result<Option<Snapshot>, EngineError> {
    let key = layout::snapshot_key(prefix);
    let mut latest: Option<Snapshot> = None;
    log.read(name, applied, &mut |seq, entry| {
        let bad = |why: String| {
            EngineError::from(LogError::Malformed {
                shard: name.to_owned(),
                seq,
                why,
            })
        };
        let value = millrace_storage::Batch::log_entry_value(entry, Cf::Meta, &key)
            .map_err(|e| bad(e.to_string()))?;
        if let Some(v) = value {
            let snap = Snapshot::decode(v)
                .ok_or_else(|| bad("a snapshot record that is not one".into()))?;
            if latest.as_ref().is_none_or(|l| snap.seq > l.seq) {
                latest = Some(snap);
            }
        }
        Ok(())
    })?;
    Ok(latest.filter(|s| s.seq > applied))
}

/// Replaces the store's copy of the shard by snapshot `snap`.
fn load_snapshot(
    store: &Store,
    (name, prefix): (&str, &[u8]),
    snap: &Snapshot,
    snapshots: Option<&Snapshots>,
) -> Result<(), EngineError> {
    let Some(snapshots) = snapshots else {
        return Err(EngineError::Layout(format!(
            "shard {name}: its commit log was cut below snapshot {} (log entry {}), and \
             [state] snapshots is not set: set it to where the snapshots are",
            snap.file, snap.seq
        )));
    };
    let missing = || {
        EngineError::Layout(format!(
            "shard {name}: snapshot {} is missing from {}; its commit log was cut below it",
            snap.file,
            snapshots.store.describe()
        ))
    };
    let bytes = snapshots
        .store
        .get(&snap.file)
        .map_err(|e| {
            EngineError::Layout(format!("shard {name}: reading snapshot {}: {e}", snap.file))
        })?
        .ok_or_else(missing)?;
    crate::savepoint::replace_shard(store, prefix, &bytes)
        .map_err(|e| EngineError::Layout(format!("shard {name}: snapshot {}: {e}", snap.file)))?;
    tracing::info!(shard = name, snapshot = %snap.file, seq = snap.seq, "shard loaded from its snapshot");
    Ok(())
}

/// How many times a start re-reads a log that another writer extended
/// between its read and its fence. That writer may be a stale owner still
/// committing (cut off from etcd, not from the log) as fast as the log
/// answers it: each lost race is followed by a pause of a random length
/// ([`fence_pause`]), so that the start's read and append fall between two
/// of its appends.
const FENCE_ATTEMPTS: u32 = 40;

/// A pause of 0 to `attempt` milliseconds (at most 20), random.
fn fence_pause(attempt: u32) -> std::time::Duration {
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let most = u64::from(attempt.min(20)) * 1_000;
    std::time::Duration::from_micros(random % (most + 1))
}

/// The sequence of the last log entry the store applied for the shard with
/// `prefix` (0: none).
fn applied_of(store: &Store, prefix: &[u8]) -> Result<u64, EngineError> {
    match store.get(Cf::Meta, &layout::log_seq_key(prefix))? {
        None => Ok(0),
        Some(v) => layout::read_u64(&v).ok_or_else(|| {
            EngineError::Corrupt(format!(
                "{}: the last commit log entry applied is {} bytes, not 8",
                store.path().display(),
                v.len()
            ))
        }),
    }
}

/// Whether the store holds anything of the shard with `prefix` beyond its
/// epoch and its place in a log.
fn holds_data(store: &Store, prefix: &[u8]) -> Result<bool, EngineError> {
    let (epoch, position) = (layout::epoch_key(prefix), layout::log_position_keys(prefix));
    let mut found = false;
    for cf in Cf::ALL {
        store.for_each_prefix(cf, prefix, |k, _| {
            found = cf != Cf::Meta || (k != epoch.as_slice() && !position.iter().any(|o| o == k));
            !found
        })?;
        if found {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Makes this start of the shard with `prefix` the only writer of its log,
/// then brings the store up to its end, and returns the sequence the
/// shard's next append must follow.
///
/// 1. It appends an entry after the log's end (read again whenever another
///    writer got there first). From then on an older writer's append is
///    refused, so it can neither release nor record a snapshot nor cut the
///    log: what [`catch_up`] then reads stays there. When the store holds
///    data of the shard and has applied no entry of the log (a directory
///    from before the log, a savepoint loaded into it), that first entry
///    is a copy of all of it; on a log that already has a history for the
///    shard that is refused, nothing changed (two histories would mix).
/// 2. It catches up with the log (its own first entry included).
/// 3. With `epoch`, it appends the shard's epoch: the higher of the
///    store's (raised or set by a claim for this start) and the log's.
pub(crate) fn fence(
    log: &dyn CommitLog,
    store: &Store,
    (name, prefix): (&str, &[u8]),
    (incarnation, snapshots): (u64, Option<&Snapshots>),
    epoch: bool,
    metrics: &Metrics,
) -> Result<u64, EngineError> {
    let epoch_key = layout::epoch_key(prefix);
    let seq_key = layout::log_seq_key(prefix);
    let epoch_of = |store: &Store| -> Result<u64, EngineError> {
        Ok(store
            .get(Cf::Meta, &epoch_key)?
            .as_deref()
            .and_then(layout::read_u64)
            .unwrap_or(0))
    };
    let started_at = epoch_of(store)?;
    if crate::savepoint::partly_cleared(store, prefix)
        .map_err(|e| EngineError::Layout(format!("shard {name}: {e}")))?
    {
        // A clear or a load was cut short: what is left is a part of the
        // shard. The log has all of it.
        tracing::warn!(
            shard = name,
            "a clear or a load of this shard was cut short; it is rebuilt from the commit log"
        );
        crate::savepoint::clear_shard(store, prefix)
            .map_err(|e| EngineError::Layout(format!("shard {name}: {e}")))?;
    }
    let append_one = |after: u64, bytes: &[u8]| -> Result<Option<u64>, EngineError> {
        let one = Append {
            shard: name,
            after,
            incarnation,
            bytes,
        };
        match log.append(&[one]) {
            Ok(seqs) => {
                metrics.log_appends.inc();
                metrics.log_bytes.inc_by(bytes.len() as u64);
                seqs.first().copied().map(Some).ok_or_else(|| {
                    EngineError::Fatal(format!("commit log: no sequence for shard {name}"))
                })
            }
            Err(LogError::Fenced { .. }) => {
                tracing::info!(
                    shard = name,
                    "another writer extended the log; reading it again"
                );
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    };
    let identity_key = layout::log_identity_key(prefix);
    let identity = log.identity();
    for attempt in 0..FENCE_ATTEMPTS {
        if attempt > 0 {
            std::thread::sleep(fence_pause(attempt));
        }
        // Where the log ends now (a part of an unfinished entry included).
        let end = log.read(name, u64::MAX, &mut |_, _| Ok(()))?;
        let applied = applied_of(store, prefix)?;
        // Both checked before anything is appended: a start refused here
        // changes nothing, however often it is tried.
        if end < applied {
            return Err(log_behind(log, store, name, (applied, end)));
        }
        let applied_from = store.get(Cf::Meta, &identity_key)?;
        if let Some(had) = applied_from.filter(|had| applied > 0 && had != identity.as_bytes()) {
            return Err(EngineError::Layout(format!(
                "shard {name}: {} applied the entries of another commit log than the one at {} \
                 (made again since, its servers' storage lost, or another deployment's of the \
                 same name: it was {}, it is {identity}). Nothing was changed; start on the log \
                 the directory was written with, or from an empty data directory",
                store.path().display(),
                log.describe(),
                String::from_utf8_lossy(&had)
            )));
        }
        let copy = applied == 0 && holds_data(store, prefix)?;
        let first = if copy {
            let mut whole = 0u64;
            log.read(name, 0, &mut |_, _| {
                whole += 1;
                Ok(())
            })?;
            if whole > 0 {
                return Err(EngineError::Layout(format!(
                    "shard {name}: {} holds data the commit log has never seen (a savepoint \
                     loaded into it, or a directory written without [state] log), and the log \
                     at {} already has {whole} entries for the shard. Nothing was changed; load \
                     the savepoint into a deployment with a log name of its own \
                     ([state] log = \"nats://HOST:PORT/NEW-NAME\")",
                    store.path().display(),
                    log.describe()
                )));
            }
            shard_copy(store, prefix)?
        } else {
            empty_entry()
        };
        let Some(fenced) = append_one(end, &first)? else {
            continue;
        };
        // From here on the store applies this log's entries.
        let mut b = store.batch();
        b.put(Cf::Meta, &identity_key, identity.as_bytes());
        if copy {
            // The log had no whole entry before the copy: the store holds
            // everything up to it already.
            b.put(Cf::Meta, &seq_key, &fenced.to_be_bytes());
        }
        store.commit(b)?;
        let caught_up = catch_up(log, store, (name, prefix), snapshots, metrics)?;
        if caught_up < fenced {
            return Err(EngineError::Fatal(format!(
                "shard {name}: the commit log ends at {caught_up}, before this start's own \
                 entry {fenced}"
            )));
        }
        if !epoch {
            return Ok(caught_up);
        }
        // No epoch (0) is never written: readers take a missing one for 1.
        let epoch = started_at.max(epoch_of(store)?);
        let mut batch = store.batch();
        if epoch > 0 {
            batch.put(Cf::Meta, &epoch_key, &epoch.to_be_bytes());
        }
        let mut entries = batch.log_entries(|_| Some(()))?;
        let bytes = entries.remove(&()).unwrap_or_else(empty_entry);
        let Some(seq) = append_one(caught_up, &bytes)? else {
            continue;
        };
        let mut b = store.batch();
        b.put(Cf::Meta, &seq_key, &seq.to_be_bytes());
        if epoch > 0 {
            b.put(Cf::Meta, &epoch_key, &epoch.to_be_bytes());
        }
        store.commit(b)?;
        return Ok(seq);
    }
    Err(EngineError::Fatal(format!(
        "shard {name}: the commit log kept being extended by another writer while this \
         worker started the shard ({FENCE_ATTEMPTS} attempts)"
    )))
}

/// Every key the store holds of the shard with `prefix` but its place in
/// a log, as one entry.
fn shard_copy(store: &Store, prefix: &[u8]) -> Result<Vec<u8>, EngineError> {
    let position = layout::log_position_keys(prefix);
    let mut batch = store.batch();
    for cf in Cf::ALL {
        store.for_each_prefix(cf, prefix, |k, v| {
            if !(cf == Cf::Meta && position.iter().any(|p| p == k)) {
                batch.put(cf, k, v);
            }
            true
        })?;
    }
    let mut entries = batch.log_entries(|_| Some(()))?;
    Ok(entries.remove(&()).unwrap_or_else(empty_entry))
}

/// An entry with no operations.
fn empty_entry() -> Vec<u8> {
    // The 12-byte header (sequence, count) of a batch with no records.
    vec![0; 12]
}

/// What an executor appends for its shards.
pub(crate) struct ExecutorLog {
    pub log: std::sync::Arc<dyn CommitLog>,
    snapshots: Option<Snapshots>,
    /// Per local shard prefix.
    shards: BTreeMap<Vec<u8>, LocalShard>,
    /// The distinct lengths of the local prefixes.
    prefix_lens: Vec<usize>,
}

struct LocalShard {
    sid: u32,
    /// Its name in the log.
    name: String,
    /// The sequence its next append follows.
    last: u64,
    /// This start's.
    incarnation: u64,
    /// Bytes appended since its last snapshot.
    since_snapshot: u64,
    /// Its last snapshot recorded in the log.
    snapshot: Option<Snapshot>,
    /// A snapshot written and not yet recorded: the next append records it.
    unrecorded: Option<Snapshot>,
    /// A snapshot being written to the store, off the executor.
    uploading: Option<Upload>,
    /// A snapshot recorded (its entry durable): the log is cut below it
    /// after the turn's release.
    to_cut: Option<Snapshot>,
}

/// A snapshot on its way to the store, written by a thread of its own so
/// that the executor never waits on the store: the executor looks between
/// turns whether it arrived ([`ExecutorLog::snapshot_due`]).
struct Upload {
    snap: Snapshot,
    started: Instant,
    /// What [`LocalShard::since_snapshot`] was when it was taken.
    since: u64,
    done: crossbeam_channel::Receiver<Result<(), String>>,
}

/// How long the snapshot store is left alone after a call failed, at
/// least ([`Snapshots::rest`]).
const SNAPSHOT_RETRY: std::time::Duration = std::time::Duration::from_secs(10);

impl ExecutorLog {
    pub fn new(LogSetup { log, snapshots }: LogSetup) -> Self {
        ExecutorLog {
            log,
            snapshots,
            shards: BTreeMap::new(),
            prefix_lens: Vec::new(),
        }
    }

    /// Starts appending for shard `sid` (named `name` in the log, its keys
    /// under `prefix`): fences its log.
    pub fn start(
        &mut self,
        store: &Store,
        (sid, name, prefix): (u32, String, &[u8]),
        metrics: &Metrics,
    ) -> Result<(), EngineError> {
        let incarnation = incarnation();
        let snapshots = self.snapshots.as_ref();
        let last = fence(
            &*self.log,
            store,
            (&name, prefix),
            (incarnation, snapshots),
            true,
            metrics,
        )?;
        let snapshot = store
            .get(Cf::Meta, &layout::snapshot_key(prefix))?
            .as_deref()
            .and_then(Snapshot::decode);
        if let Some(snapshots) = snapshots {
            snapshots.remove_unrecorded(&name, snapshot.as_ref());
        }
        self.shards.insert(
            prefix.to_vec(),
            LocalShard {
                sid,
                name,
                last,
                incarnation,
                since_snapshot: 0,
                snapshot,
                unrecorded: None,
                uploading: None,
                to_cut: None,
            },
        );
        self.index();
        Ok(())
    }

    /// Forgets the shard with `prefix` after an append of its turn was
    /// refused: a snapshot written since its last append went into that
    /// append, whose entries for other shards (and, for all this writer
    /// knows, for this one) may have landed, so its file stays; whoever
    /// starts the shard next removes it if no entry names it.
    pub fn abandon(&mut self, prefix: &[u8]) {
        if let Some(s) = self.shards.remove(prefix) {
            // Still being written, it was in no append: it goes.
            self.drop_upload(&s, false);
        }
        self.index();
    }

    /// Gives up shard `s`'s snapshot upload, if one runs: no append can
    /// have recorded it, so its file is removed, now if it is written
    /// (after waiting for it with `wait`), or by its thread once written.
    fn drop_upload(&self, s: &LocalShard, wait: bool) {
        let (Some(up), Some(snapshots)) = (&s.uploading, &self.snapshots) else {
            return;
        };
        let written = if wait {
            up.done.recv().ok()
        } else {
            up.done.try_recv().ok()
        };
        if let Some(Ok(())) = written {
            if let Err(e) = snapshots.store.delete(&up.snap.file) {
                tracing::warn!(shard = %s.name, file = %up.snap.file, error = %e, "a snapshot never recorded was not removed");
            }
        }
    }

    /// Stops appending for the shard with `prefix` (at the end of a turn,
    /// everything it did appended). A snapshot written since its last
    /// append was never part of an append, so no entry can name it: its
    /// file is removed. One still being written is left to its thread:
    /// whoever starts the shard next removes it, as what a crash leaves.
    pub fn stop(&mut self, prefix: &[u8]) {
        self.stop_shard(prefix, false);
    }

    fn stop_shard(&mut self, prefix: &[u8], wait: bool) {
        if let Some(s) = self.shards.remove(prefix) {
            self.drop_upload(&s, wait);
            if let (Some(snap), Some(snapshots)) = (&s.unrecorded, &self.snapshots) {
                if let Err(e) = snapshots.store.delete(&snap.file) {
                    tracing::warn!(shard = %s.name, file = %snap.file, error = %e, "a snapshot never recorded was not removed");
                }
            }
        }
        self.index();
    }

    /// Stops appending for every shard (the executor halts): each snapshot
    /// written and not yet recorded is removed, as [`ExecutorLog::stop`]
    /// does for one, after waiting for the one being written (a store call
    /// ends within `log_timeout`), so that a halt leaves no file behind
    /// does for one.
    pub fn stop_all(&mut self) {
        let prefixes: Vec<Vec<u8>> = self.shards.keys().cloned().collect();
        for prefix in prefixes {
            self.stop_shard(&prefix, true);
        }
    }

    fn index(&mut self) {
        self.prefix_lens = self.shards.keys().map(Vec::len).collect();
        self.prefix_lens.sort_unstable();
        self.prefix_lens.dedup();
    }

    /// The prefix of the local shard a stored key belongs to.
    fn shard_of(&self, key: &[u8]) -> Option<&[u8]> {
        self.prefix_lens
            .iter()
            .filter_map(|&n| key.get(..n))
            .find_map(|p| self.shards.get_key_value(p).map(|(k, _)| k.as_slice()))
    }

    /// Appends `batch`'s writes to the logs of the shards they belong to
    /// and waits until all are durable; then records each shard's new end
    /// in `batch` (as its last entry applied). Writes of no local shard
    /// (the worker's own keys) stay local. A snapshot written since the
    /// last append is recorded in its shard's entry; once that entry is
    /// durable, the shard's log is cut below the snapshot.
    pub fn append(
        &mut self,
        batch: &mut millrace_storage::Batch<'_>,
        metrics: &Metrics,
    ) -> Result<(), EngineError> {
        for (prefix, s) in &self.shards {
            if let Some(snap) = &s.unrecorded {
                batch.put(Cf::Meta, &layout::snapshot_key(prefix), &snap.encode());
            }
        }
        // Grouped by the local shard's own prefix (borrowed: no allocation
        // per operation), then owned once per shard.
        let entries: Vec<(Vec<u8>, Vec<u8>)> = batch
            .log_entries(|key| self.shard_of(key))?
            .into_iter()
            .map(|(prefix, bytes)| (prefix.to_vec(), bytes))
            .collect();
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
        for ((prefix, bytes), seq) in entries.iter().zip(seqs) {
            batch.put(Cf::Meta, &layout::log_seq_key(prefix), &seq.to_be_bytes());
            let Some(s) = self.shards.get_mut(prefix) else {
                continue;
            };
            s.last = seq;
            s.since_snapshot += bytes.len() as u64;
            s.to_cut = s.unrecorded.take();
        }
        Ok(())
    }

    /// Per local shard: its sid, the sequence of its last durable entry, and
    /// that of its last recorded snapshot (0: none).
    pub fn positions(&self) -> impl Iterator<Item = (u32, u64, u64)> + '_ {
        self.shards
            .values()
            .map(|s| (s.sid, s.last, s.snapshot.as_ref().map_or(0, |x| x.seq)))
    }

    /// After a turn's release: for each shard whose snapshot's record is
    /// durable, cuts its log below the snapshot and removes the snapshot
    /// before it. A failure loses nothing (the log only keeps more, and is
    /// cut at the next snapshot); it is logged.
    pub fn cut_recorded(&mut self, metrics: &Metrics) {
        for s in self.shards.values_mut() {
            let Some(snap) = s.to_cut.take() else {
                continue;
            };
            if let Err(e) = self.log.purge(&s.name, snap.seq) {
                tracing::warn!(shard = %s.name, error = %e, "the commit log was not cut below the shard's snapshot; it is cut at the next one");
            } else {
                metrics.log_snapshots.inc();
            }
            let before = s.snapshot.replace(snap);
            if let (Some(old), Some(snapshots)) = (before, &self.snapshots) {
                if let Err(e) = snapshots.store.delete(&old.file) {
                    tracing::warn!(shard = %s.name, file = %old.file, error = %e, "an old snapshot was not removed");
                }
            }
        }
    }

    /// After a commit: takes a snapshot of each shard whose log grew by
    /// `every_bytes` since its last one (read from the store here, on the
    /// executor, at the turn's end) and hands it to a thread that writes
    /// it to the snapshot store; once written (seen here after a later
    /// turn), the next append records it. The executor never waits on the
    /// store. A failed write is retried later; it loses nothing.
    pub fn snapshot_due(&mut self, store: &Store, metrics: &Metrics) {
        let Some(snapshots) = &self.snapshots else {
            return;
        };
        let health = || format!("snapshot store {}", snapshots.store.describe());
        let failed = |s: &LocalShard, started: Instant, e: &str| {
            crate::health::report(&health(), format!("a snapshot of shard {}: {e}", s.name));
            metrics.log_snapshot_failures.inc();
            snapshots.rest(started.elapsed());
            tracing::warn!(shard = %s.name, store = %snapshots.store.describe(), error = %e, "a snapshot failed; the log keeps growing until one succeeds");
        };
        let mut uploading = false;
        for (prefix, s) in &mut self.shards {
            if let Some(up) = &s.uploading {
                let written = match up.done.try_recv() {
                    Err(crossbeam_channel::TryRecvError::Empty) => {
                        uploading = true;
                        continue;
                    }
                    Ok(r) => r,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => {
                        Err("the thread writing it stopped".to_owned())
                    }
                };
                let Some(up) = s.uploading.take() else {
                    continue;
                };
                match written {
                    Ok(()) => {
                        crate::health::clear(&health());
                        metrics
                            .log_snapshot_seconds
                            .observe(up.started.elapsed().as_secs_f64());
                        s.since_snapshot = s.since_snapshot.saturating_sub(up.since);
                        s.unrecorded = Some(up.snap);
                    }
                    Err(e) => failed(s, up.started, &e),
                }
                continue;
            }
            if s.unrecorded.is_some() || s.since_snapshot < snapshots.every_bytes {
                continue;
            }
            // One upload at a time per executor, as when the executor
            // wrote them itself: a shard copy in memory each, and one
            // call at a time to a store that may be failing.
            if uploading || snapshots.resting() {
                continue;
            }
            let started = Instant::now();
            let snap = Snapshot {
                seq: s.last,
                file: format!(
                    "{}/{:020}-{:016x}.shard",
                    snapshots.folder(&s.name),
                    s.last,
                    s.incarnation
                ),
            };
            let bytes = match crate::savepoint::shard_snapshot(store, prefix) {
                Ok((bytes, _)) => bytes,
                Err(e) => {
                    failed(s, started, &e.to_string());
                    continue;
                }
            };
            let (tx, done) = crossbeam_channel::bounded(1);
            let (to, file) = (Arc::clone(&snapshots.store), snap.file.clone());
            let spawned = std::thread::Builder::new()
                .name("millrace-snapshot".into())
                .spawn(move || {
                    let written = to.put(&file, bytes).map_err(|e| e.to_string());
                    if let Err(unseen) = tx.send(written) {
                        // The shard stopped meanwhile: nothing records it.
                        if unseen.0.is_ok() {
                            let _ = to.delete(&file);
                        }
                    }
                });
            match spawned {
                Ok(_) => {
                    uploading = true;
                    s.uploading = Some(Upload {
                        snap,
                        started,
                        since: s.since_snapshot,
                        done,
                    })
                }
                Err(e) => failed(s, started, &format!("no thread to write it: {e}")),
            }
        }
    }

    /// Whether a snapshot is being written for any shard.
    #[cfg(test)]
    fn uploading(&self) -> bool {
        self.shards.values().any(|s| s.uploading.is_some())
    }
}

/// An entry in a [`MemoryLog`]: sequence and bytes.
type Entry = (u64, Vec<u8>);

/// A commit log in memory, with the fencing of a real one: for tests, and
/// to try the engine's commit order without a log server.
pub struct MemoryLog {
    /// Per shard: its entries, by sequence.
    logs: parking_lot::Mutex<BTreeMap<String, Vec<Entry>>>,
    /// Per shard: how many entries were cut.
    cut: parking_lot::Mutex<BTreeMap<String, usize>>,
    next: std::sync::atomic::AtomicU64,
    /// Its identity: one per log made.
    made: u64,
}

impl Default for MemoryLog {
    fn default() -> MemoryLog {
        static MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        MemoryLog {
            logs: Default::default(),
            cut: Default::default(),
            next: Default::default(),
            made: MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }
}

impl MemoryLog {
    /// How many entries the log of `shard` holds.
    pub fn len_of(&self, shard: &str) -> usize {
        self.logs.lock().get(shard).map_or(0, Vec::len)
    }

    /// How many entries of `shard`'s log were cut.
    pub fn cut_of(&self, shard: &str) -> usize {
        self.cut.lock().get(shard).copied().unwrap_or(0)
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
        Ok(out)
    }

    fn read(&self, shard: &str, after: u64, f: &mut OnEntry<'_>) -> Result<u64, EngineError> {
        // What is delivered and the end returned are read at one moment.
        let (entries, end): (Vec<Entry>, u64) = {
            let logs = self.logs.lock();
            let log = logs.get(shard).map(Vec::as_slice).unwrap_or_default();
            (
                log.iter().filter(|(s, _)| *s > after).cloned().collect(),
                log.last().map_or(0, |(s, _)| *s),
            )
        };
        for (seq, bytes) in &entries {
            f(*seq, bytes)?;
        }
        Ok(end)
    }

    fn purge(&self, shard: &str, through: u64) -> Result<(), EngineError> {
        if let Some(l) = self.logs.lock().get_mut(shard) {
            let before = l.len();
            l.retain(|(s, _)| *s > through);
            *self.cut.lock().entry(shard.to_owned()).or_insert(0) += before - l.len();
        }
        Ok(())
    }

    fn describe(&self) -> String {
        "memory".into()
    }

    fn identity(&self) -> String {
        format!("memory-{}", self.made)
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

    /// Snapshots every 4 KiB into `dir`, an empty log, and metrics.
    fn snapshotted(dir: &std::path::Path) -> (Snapshots, Arc<MemoryLog>, Metrics) {
        let store = Arc::new(crate::savepoint::DirStore::new(dir));
        let snapshots = Snapshots::new(store, 4096, "test".into());
        (snapshots, Arc::new(MemoryLog::default()), Metrics::new())
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

    #[test]
    fn shard_names_are_escaped_for_subjects_and_files() {
        assert_eq!(escaped_name("counts.3"), "counts.3");
        assert_eq!(escaped_name("a_b-c.0"), "a_b-c.0");
        // Wildcards, white space, separators and `%` itself are written
        // out, so no two names meet.
        assert_eq!(escaped_name("a*>\t/\\.1"), "a%2A%3E%09%2F%5C.1");
        assert_ne!(escaped_name("a%2A.1"), escaped_name("a*.1"));
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
        let seq = fence(&log, &a, ("counts.1", &p), (1, None), true, &m).expect("fence");
        assert_eq!(seq_of(&a), Some(seq));
        // The copy, then the epoch.
        assert_eq!(log.len_of("counts.1"), 2);
        let (_b, b) = store();
        assert_eq!(
            catch_up(&log, &b, ("counts.1", &p), None, &m).expect("catch up"),
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
        // b replayed the copy and the epoch; a replayed nothing of its own.
        assert_eq!(m.log_replayed.get(), 2);
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
        let mut old = ExecutorLog::new(LogSetup {
            log: Arc::clone(&log),
            snapshots: None,
        });
        old.start(&a, (1, "counts.1".into(), &p), &m)
            .expect("start");
        let mut batch = a.batch();
        batch.put_state(&layout::state_key(&p, b"k"), Some(b"1"));
        old.append(&mut batch, &m).expect("append");
        a.commit(batch).expect("commit");
        // Another worker takes the shard over: it replays, then fences.
        let mut new = ExecutorLog::new(LogSetup {
            log: Arc::clone(&log),
            snapshots: None,
        });
        new.start(&b, (1, "counts.1".into(), &p), &m)
            .expect("start");
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
        let err = catch_up(&empty, &a, ("counts.1", &p), None, &m).unwrap_err();
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
        let err = catch_up(&bad, &b, ("counts.1", &p), None, &m).unwrap_err();
        assert!(
            err.to_string()
                .contains("commit log of shard counts.1, entry 1"),
            "{err}"
        );
        assert_eq!(seq_of(&b), None);
    }

    /// A store that applied one log's entries is refused by another of the
    /// same name (the first made again, say, and written past the store
    /// by someone else since), before anything is appended; on its own log
    /// it starts, and the identity travels with a rebuild elsewhere.
    #[test]
    fn a_store_is_refused_by_another_log_than_the_one_it_applied() {
        let (_a, a) = store();
        let p = prefix();
        let m = Metrics::new();
        let first = MemoryLog::default();
        let seq = fence(&first, &a, ("counts.1", &p), (1, None), true, &m).expect("fence");
        // Another log whose shard ends past what the store applied.
        let second = MemoryLog::default();
        for _ in 0..seq + 3 {
            let padding = Append {
                shard: "counts.1",
                after: second
                    .read("counts.1", u64::MAX, &mut |_, _| Ok(()))
                    .expect("end"),
                incarnation: 9,
                bytes: &empty_entry(),
            };
            second.append(&[padding]).expect("append");
        }
        let before = second.len_of("counts.1");
        let err = fence(&second, &a, ("counts.1", &p), (2, None), true, &m).unwrap_err();
        assert!(err.to_string().contains("another commit log"), "{err}");
        assert_eq!(second.len_of("counts.1"), before, "nothing appended");
        assert_eq!(seq_of(&a), Some(seq), "nothing changed");
        // Its own log takes it; a store rebuilt from it elsewhere carries
        // the same identity.
        fence(&first, &a, ("counts.1", &p), (3, None), true, &m).expect("its own log");
        let (_b, b) = store();
        fence(&first, &b, ("counts.1", &p), (4, None), true, &m).expect("rebuilt");
        let identity = |s: &Store| s.get(Cf::Meta, &layout::log_identity_key(&p)).expect("get");
        assert_eq!(identity(&b), Some(first.identity().into_bytes()));
        assert_eq!(identity(&a), identity(&b));
    }

    /// Data the log never saw (a savepoint loaded into the directory) on
    /// top of a log that has a history for the shard: refused, and neither
    /// the store nor the log changed.
    #[test]
    fn data_the_log_never_saw_is_refused_on_a_log_with_a_history() {
        let (_a, a) = store();
        let p = prefix();
        let log = MemoryLog::default();
        let m = Metrics::new();
        let history = Append {
            shard: "counts.1",
            after: 0,
            incarnation: 9,
            bytes: &empty_entry(),
        };
        log.append(&[history]).expect("append");
        let mut b = a.batch();
        b.put_state(&layout::state_key(&p, b"k"), Some(b"from a savepoint"));
        a.commit(b).expect("commit");
        let err = fence(&log, &a, ("counts.1", &p), (1, None), true, &m).unwrap_err();
        assert!(
            err.to_string()
                .contains("holds data the commit log has never seen"),
            "{err}"
        );
        assert_eq!(log.len_of("counts.1"), 1);
        assert_eq!(seq_of(&a), None);
        assert_eq!(
            a.get_state(&layout::state_key(&p, b"k"))
                .expect("get")
                .as_deref(),
            Some(&b"from a savepoint"[..])
        );
    }

    /// Takes the snapshots due and waits (at most 10 s) until they are
    /// written, as turns going on would see them.
    fn snapshot(ex: &mut ExecutorLog, store: &Store, m: &Metrics) {
        ex.snapshot_due(store, m);
        let started = Instant::now();
        while ex.uploading() {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "written"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
            ex.snapshot_due(store, m);
        }
    }

    /// A snapshot store that takes long to answer holds up no turn:
    /// appends go on while a snapshot is written, and the first append
    /// after it was written records it.
    #[test]
    fn a_slow_snapshot_store_holds_up_no_turn() {
        use crate::savepoint::{DirStore, SavepointError, SavepointStore};
        struct Gated {
            inner: DirStore,
            gate: crossbeam_channel::Receiver<()>,
            deleted: Arc<parking_lot::Mutex<Vec<String>>>,
        }
        impl SavepointStore for Gated {
            fn put(&self, path: &str, bytes: Vec<u8>) -> Result<(), SavepointError> {
                let _ = self.gate.recv();
                self.inner.put(path, bytes)
            }
            fn create(&self, path: &str, bytes: Vec<u8>) -> Result<bool, SavepointError> {
                self.inner.create(path, bytes)
            }
            fn get(&self, path: &str) -> Result<Option<Vec<u8>>, SavepointError> {
                self.inner.get(path)
            }
            fn delete(&self, path: &str) -> Result<(), SavepointError> {
                self.deleted.lock().push(path.to_owned());
                self.inner.delete(path)
            }
            fn some_entry(&self) -> Result<Option<String>, SavepointError> {
                self.inner.some_entry()
            }
            fn list(&self, dir: &str) -> Result<Vec<String>, SavepointError> {
                self.inner.list(dir)
            }
            fn describe(&self) -> String {
                "a gated store".into()
            }
        }
        let (_a, a) = store();
        let p = prefix();
        let files = tempfile::tempdir().expect("temp dir");
        let (open, gate) = crossbeam_channel::unbounded();
        let deleted = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let gated = Gated {
            inner: DirStore::new(files.path()),
            gate,
            deleted: Arc::clone(&deleted),
        };
        let log = Arc::new(MemoryLog::default());
        let m = Metrics::new();
        let mut ex = ExecutorLog::new(LogSetup {
            log: Arc::clone(&log) as Arc<dyn CommitLog>,
            snapshots: Some(Snapshots::new(Arc::new(gated), 4096, "test".into())),
        });
        let commit = |ex: &mut ExecutorLog, value: &[u8]| {
            let mut batch = a.batch();
            batch.put_state(&layout::state_key(&p, b"k"), Some(value));
            ex.append(&mut batch, &m).expect("append");
            a.commit(batch).expect("commit");
        };
        ex.start(&a, (1, "counts.1".into(), &p), &m).expect("start");
        commit(&mut ex, &[7u8; 5000]);
        ex.snapshot_due(&a, &m);
        assert!(ex.uploading(), "the snapshot is being written");
        for turn in 0..3u8 {
            commit(&mut ex, &[turn]);
            ex.snapshot_due(&a, &m);
        }
        assert!(ex.uploading());
        assert_eq!(
            m.log_snapshots.get(),
            0,
            "nothing recorded before it is written"
        );
        open.send(()).expect("open the gate");
        snapshot(&mut ex, &a, &m);
        commit(&mut ex, b"records it");
        ex.cut_recorded(&m);
        assert_eq!(m.log_snapshots.get(), 1);
        // A shard stopped while its next snapshot is being written: that
        // file is removed once written, and the recorded one stays.
        commit(&mut ex, &[9u8; 5000]);
        ex.snapshot_due(&a, &m);
        assert!(ex.uploading());
        ex.stop(&p);
        let before = deleted.lock().len();
        open.send(()).expect("open the gate");
        let started = Instant::now();
        while deleted.lock().len() == before {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "the stopped shard's snapshot was removed once written"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let listed = DirStore::new(files.path()).list("test/counts.1");
        assert_eq!(listed.expect("list").len(), 1, "the recorded one stays");
    }

    /// A snapshot is recorded by the shard's next append and the log cut
    /// below it after the release; one written and never recorded (the
    /// shard stopped first) is removed with the shard.
    #[test]
    fn a_snapshot_is_recorded_then_cut_below_and_one_never_recorded_is_removed() {
        let (_a, a) = store();
        let p = prefix();
        let files = tempfile::tempdir().expect("temp dir");
        let (snapshots, log, m) = snapshotted(files.path());
        let mut ex = ExecutorLog::new(LogSetup {
            log: Arc::clone(&log) as Arc<dyn CommitLog>,
            snapshots: Some(snapshots),
        });
        let commit = |ex: &mut ExecutorLog, value: &[u8]| {
            let mut batch = a.batch();
            batch.put_state(&layout::state_key(&p, b"k"), Some(value));
            ex.append(&mut batch, &m).expect("append");
            a.commit(batch).expect("commit");
        };
        let files_of = || -> Vec<String> {
            std::fs::read_dir(files.path().join("test/counts.1"))
                .map(|d| {
                    d.map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
                        .collect()
                })
                .unwrap_or_default()
        };
        ex.start(&a, (1, "counts.1".into(), &p), &m).expect("start");
        commit(&mut ex, &[7u8; 5000]);
        snapshot(&mut ex, &a, &m);
        assert_eq!(files_of().len(), 1, "a snapshot after 5,000 bytes of log");
        let before = log.len_of("counts.1");
        // The next append records it; after the release the log is cut.
        commit(&mut ex, b"small");
        ex.cut_recorded(&m);
        assert_eq!(m.log_snapshots.get(), 1);
        assert!(
            log.len_of("counts.1") < before + 1,
            "the log was cut below the snapshot"
        );
        // Another snapshot, written and never recorded: removed at stop;
        // the recorded one stays.
        commit(&mut ex, &[8u8; 5000]);
        snapshot(&mut ex, &a, &m);
        assert_eq!(files_of().len(), 2);
        ex.stop(&p);
        assert_eq!(files_of().len(), 1, "the unrecorded snapshot was removed");
    }

    /// What a crash left in a shard's snapshot folder (a snapshot written
    /// and never recorded, a fenced-off writer's file) is removed when the
    /// shard starts again; the recorded snapshot, other shards' and other
    /// deployments' files stay, and the shard still rebuilds from it.
    #[test]
    fn a_start_removes_the_snapshot_files_no_entry_records() {
        let (_a, a) = store();
        let p = prefix();
        let files = tempfile::tempdir().expect("temp dir");
        let (snapshots, log, m) = snapshotted(files.path());
        let setup = LogSetup {
            log: Arc::clone(&log) as Arc<dyn CommitLog>,
            snapshots: Some(snapshots.clone()),
        };
        let commit = |ex: &mut ExecutorLog, value: &[u8]| {
            let mut batch = a.batch();
            batch.put_state(&layout::state_key(&p, b"k"), Some(value));
            ex.append(&mut batch, &m).expect("append");
            a.commit(batch).expect("commit");
        };
        let mut ex = ExecutorLog::new(setup.clone());
        ex.start(&a, (1, "counts.1".into(), &p), &m).expect("start");
        commit(&mut ex, &[7u8; 5000]);
        snapshot(&mut ex, &a, &m);
        commit(&mut ex, b"recorded");
        ex.cut_recorded(&m);
        // A second snapshot, written, and the worker dies before an append
        // records it.
        commit(&mut ex, &[8u8; 5000]);
        snapshot(&mut ex, &a, &m);
        drop(ex);
        let put = |path: &str| {
            snapshots
                .store
                .put(path, b"x".to_vec())
                .expect("planted file");
        };
        put("test/counts.1/00000000000000000099-00000000000000ff.shard");
        put("test/counts.2/00000000000000000001-0000000000000001.shard");
        put("other/counts.1/00000000000000000001-0000000000000001.shard");
        let listed = |dir: &str| snapshots.store.list(dir).expect("listed").len();
        assert_eq!(listed("test/counts.1"), 3);

        let mut again = ExecutorLog::new(setup.clone());
        again
            .start(&a, (1, "counts.1".into(), &p), &m)
            .expect("start again");
        assert_eq!(
            listed("test/counts.1"),
            1,
            "only the recorded snapshot stays"
        );
        assert_eq!(listed("test/counts.2"), 1, "another shard's file stays");
        assert_eq!(
            listed("other/counts.1"),
            1,
            "another deployment's file stays"
        );
        let kept = a
            .get(Cf::Meta, &layout::snapshot_key(&p))
            .expect("read")
            .as_deref()
            .and_then(Snapshot::decode)
            .expect("a recorded snapshot");
        assert_eq!(
            snapshots.store.list("test/counts.1").expect("listed"),
            [kept.file.rsplit('/').next().expect("a file name")]
        );
        // An empty store elsewhere rebuilds from that snapshot and the log.
        let (_b, b) = store();
        let loads = m.log_snapshot_loads.get();
        let mut elsewhere = ExecutorLog::new(setup);
        elsewhere
            .start(&b, (1, "counts.1".into(), &p), &m)
            .expect("start elsewhere");
        assert_eq!(m.log_snapshot_loads.get(), loads + 1);
        let value = |s: &Store| {
            s.get(Cf::State, &layout::state_key(&p, b"k"))
                .expect("read")
        };
        assert!(
            value(&b).is_some() && value(&b) == value(&a),
            "the rebuilt shard holds the last value"
        );
    }

    /// A clear or a load of the shard cut short by a crash leaves a marked,
    /// partial copy: the next start rebuilds the shard from the log instead
    /// of taking the part for data the log never saw.
    #[test]
    fn a_partly_cleared_shard_is_rebuilt_from_the_log() {
        let (_a, a) = store();
        let (_b, b) = store();
        let p = prefix();
        let log = MemoryLog::default();
        let m = Metrics::new();
        let mut batch = a.batch();
        batch.put_state(&layout::state_key(&p, b"k"), Some(b"1"));
        let entry = batch
            .log_entries(|_| Some(()))
            .expect("entries")
            .remove(&())
            .expect("one");
        let history = Append {
            shard: "counts.1",
            after: 0,
            incarnation: 9,
            bytes: &entry,
        };
        log.append(&[history]).expect("append");
        let mut partial = b.batch();
        partial.put(Cf::Meta, &layout::clearing_key(&p), &[]);
        partial.put_state(&layout::state_key(&p, b"left-over"), Some(b"stale"));
        b.commit(partial).expect("commit");
        fence(&log, &b, ("counts.1", &p), (1, None), true, &m).expect("rebuilt, not refused");
        assert_eq!(
            b.get_state(&layout::state_key(&p, b"k"))
                .expect("get")
                .as_deref(),
            Some(&b"1"[..])
        );
        assert_eq!(
            b.get_state(&layout::state_key(&p, b"left-over"))
                .expect("get"),
            None
        );
        assert!(!crate::savepoint::partly_cleared(&b, &p).expect("read"));
    }
}
