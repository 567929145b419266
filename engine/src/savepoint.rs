//! Savepoints: the committed data of every shard of a deployment, exported
//! from stopped workers and loaded into new data directories under another
//! worker list (rescaling) or on other machines.
//!
//! Every key the engine writes for a shard starts with the shard's prefix
//! (see `layout.rs`), and what one shard committed is consistent by itself:
//! its state, timers, outbox, positions and the sequence numbers of its
//! channels went into the same commits. Shards keep their number across a
//! savepoint (as Flink's key groups: `engine.shards` cannot change), so a
//! channel's producer and consumer find each other's sequence numbers again
//! wherever they run, and the exactly-once protocol resends and drops
//! duplicates as after any restart. A worker is exported once it stopped;
//! workers may stop and export one after another (one still running cannot
//! change one that stopped), but none may run again after its own export
//! until the savepoint is complete.
//!
//! A savepoint is a directory (or object-store prefix):
//!
//! | path | what |
//! | --- | --- |
//! | `savepoint.json` | its id and the topology and workers it is taken with; written first ([`Marker`]) |
//! | `shards/COMPONENT/SHARD.bin` | one shard's keys and values, every column family |
//! | `parts/WORKER.json` | what one worker exported, with sizes and SHA-256 sums, and the id |
//! | `manifest.json` | the whole savepoint; written last, by the worker whose export completes it |
//!
//! A savepoint without `manifest.json` is incomplete and is refused. A
//! location holds one savepoint: how exports agree on it, and which are
//! refused, is in `identity.rs`. Every file a manifest names is a relative
//! path inside the savepoint ([`check_path`]), checked before any is read.
//! A load is staged beside its data directory (`staging.rs`).

use crate::layout::{parse_state_key, shard_prefix};
use crate::plan::{Plan, ShardSpec};
use millrace_config::Role;
use millrace_storage::{Cf, Store, StoreOptions};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

mod identity;
mod staging;
mod store;
#[cfg(test)]
mod tests;

pub use identity::{check_vacant, read_marker, Marker, MARKER};
pub use store::{check_path, DirStore, SavepointStore};

/// Why a savepoint could not be taken or loaded.
#[derive(Debug, thiserror::Error)]
pub enum SavepointError {
    /// Reading or writing the savepoint's storage failed.
    #[error("savepoint storage: {0}")]
    Io(String),
    /// The data directory cannot be exported or loaded into.
    #[error("{0}")]
    DataDir(String),
    /// The savepoint is incomplete, damaged, or does not fit the topology.
    #[error("{0}")]
    Refused(String),
    /// RocksDB failed.
    #[error(transparent)]
    Storage(#[from] millrace_storage::StorageError),
}

/// One component as the savepoint knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedComponent {
    /// Its name.
    pub name: String,
    /// Its `type`.
    pub kind: String,
    /// `source`, `computation` or `sink`.
    pub role: String,
    /// Its shard count.
    pub shards: u32,
}

/// One shard's file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedShard {
    /// Its component.
    pub component: String,
    /// Its number.
    pub shard: u32,
    /// Path of its file in the savepoint.
    pub file: String,
    /// The file's length.
    pub bytes: u64,
    /// The file's SHA-256, hex.
    pub sha256: String,
    /// Keys in it.
    pub keys: u64,
}

/// What one worker exported (`parts/WORKER.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    /// The id of the savepoint it belongs to (see [`Marker`]).
    #[serde(default)]
    pub savepoint: String,
    /// The worker's id (`local` without a cluster).
    pub worker: String,
    /// Its shards.
    pub shards: Vec<SavedShard>,
}

/// The whole savepoint (`manifest.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The savepoint format (1).
    pub format: u32,
    /// The savepoint's id (see [`Marker`]; empty in a savepoint taken
    /// before savepoints had ids).
    #[serde(default)]
    pub id: String,
    /// The fingerprint of the topology it was taken with (hex).
    pub fingerprint: String,
    /// `engine.shards`: a savepoint loads only into the same count.
    pub engine_shards: u32,
    /// The workers it was taken from.
    pub workers: Vec<String>,
    /// The components, with kind and shard count.
    pub components: Vec<SavedComponent>,
    /// Every shard's file.
    pub shards: Vec<SavedShard>,
}

const MAGIC: &[u8; 8] = b"MRSHARD1";
const FORMAT: u32 = 1;
/// The column family tags in a shard file.
const CF_TAGS: [(Cf, u8); 5] = [
    (Cf::State, b's'),
    (Cf::Timers, b't'),
    (Cf::Outbox, b'o'),
    (Cf::Channels, b'c'),
    (Cf::Meta, b'm'),
];

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Source => "source",
        Role::Computation => "computation",
        Role::Sink => "sink",
    }
}

fn worker_ids(plan: &Plan) -> Vec<String> {
    match &plan.topology.cluster {
        Some(c) => c.workers.iter().map(|w| w.id.clone()).collect(),
        None => vec!["local".to_owned()],
    }
}

/// Where worker `id`'s part goes.
fn part_path(id: &str) -> String {
    format!("parts/{id}.json")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn push_entry(out: &mut Vec<u8>, tag: u8, key: &[u8], value: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(value);
}

/// Every key of the shard with `prefix`, as a shard file; and how many.
/// Without `log_position`, the shard's place in a commit log (the last
/// entry applied, its last snapshot) is left out: a savepoint belongs to
/// no log; a move or a snapshot carries it.
fn shard_file(
    store: &Store,
    prefix: &[u8],
    log_position: bool,
) -> Result<(Vec<u8>, u64), SavepointError> {
    let log_keys = crate::layout::log_position_keys(prefix);
    let mut out = MAGIC.to_vec();
    let mut keys = 0u64;
    // State through its decoder (deleted keys are not copied); the rest raw.
    store.for_each_state(prefix, |k, v| {
        push_entry(&mut out, b's', k, v);
        keys += 1;
        true
    })?;
    for (cf, tag) in CF_TAGS.into_iter().skip(1) {
        store.for_each_prefix(cf, prefix, |k, v| {
            if log_position || cf != Cf::Meta || !log_keys.iter().any(|l| l == k) {
                push_entry(&mut out, tag, k, v);
                keys += 1;
            }
            true
        })?;
    }
    Ok((out, keys))
}

/// What a shard file holds, checked entry by entry.
/// One key of a shard file: its column family, key and value.
type Entry = (Cf, Vec<u8>, Vec<u8>);

fn parse_shard_file(bytes: &[u8], prefix: &[u8]) -> Result<Vec<Entry>, String> {
    let rest = bytes
        .strip_prefix(&MAGIC[..])
        .ok_or("it does not start as a shard file")?;
    let mut at = 0;
    let mut out = Vec::new();
    let take = |at: &mut usize, n: usize| -> Result<&[u8], String> {
        let s = rest
            .get(*at..*at + n)
            .ok_or_else(|| format!("cut short at byte {}", *at + MAGIC.len()))?;
        *at += n;
        Ok(s)
    };
    while at < rest.len() {
        let tag = take(&mut at, 1)?[0];
        let cf = CF_TAGS
            .iter()
            .find(|(_, t)| *t == tag)
            .map(|(cf, _)| *cf)
            .ok_or_else(|| format!("unknown column family tag {tag}"))?;
        let len = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let klen = len(take(&mut at, 4)?);
        let key = take(&mut at, klen)?.to_vec();
        let vlen = len(take(&mut at, 4)?);
        let value = take(&mut at, vlen)?.to_vec();
        if !key.starts_with(prefix) {
            return Err("it holds a key of another shard".to_owned());
        }
        out.push((cf, key, value));
    }
    Ok(out)
}

/// What an export did.
#[derive(Debug)]
pub struct ExportReport {
    /// The savepoint's id.
    pub savepoint: String,
    /// Shards exported.
    pub shards: usize,
    /// Bytes of their files.
    pub bytes: u64,
    /// Keys exported.
    pub keys: u64,
    /// Whether this export completed the savepoint (wrote the manifest).
    pub complete: bool,
    /// Workers whose parts are still missing.
    pub missing: Vec<String>,
}

/// Exports the shards worker `me` owns under `plan` (the topology its data
/// was written with) from its stopped data directory `data_dir` to `to`;
/// writes the manifest if that completes the savepoint.
pub fn export(
    data_dir: &Path,
    plan: &Plan,
    me: usize,
    to: &dyn SavepointStore,
) -> Result<ExportReport, SavepointError> {
    let holds_data = std::fs::read_dir(data_dir)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    if !holds_data {
        return Err(SavepointError::DataDir(format!(
            "{} holds no data: nothing to export",
            data_dir.display()
        )));
    }
    // Opened for writing, so that a worker still running on it (holding
    // RocksDB's lock) is found: every worker must be stopped first.
    let store = Store::open(data_dir, &StoreOptions::default()).map_err(|e| {
        SavepointError::DataDir(format!(
            "cannot open {} ({e}); is a worker still running on it? Stop every worker \
             (SIGTERM) before exporting any",
            data_dir.display()
        ))
    })?;
    let read_u32 =
        |v: Option<Vec<u8>>| v.and_then(|b| b.as_slice().try_into().ok().map(u32::from_be_bytes));
    let had = read_u32(store.get(Cf::Meta, &crate::layout::shards_key())?);
    if had != Some(plan.topology.engine.shards) {
        return Err(SavepointError::DataDir(format!(
            "{} was written with engine.shards = {had:?}, the topology says {}: export with \
             the topology the data was written with",
            data_dir.display(),
            plan.topology.engine.shards
        )));
    }
    if store.get(Cf::Meta, &crate::layout::joined_key())?.is_some() {
        return Err(SavepointError::DataDir(format!(
            "{} belongs to a deployment run with --join: its shards move between workers, \
             and savepoints of such a deployment are not supported yet",
            data_dir.display()
        )));
    }
    let layout = store.get(Cf::Meta, &crate::layout::cluster_key())?;
    let want = [
        (plan.workers as u32).to_be_bytes(),
        (me as u32).to_be_bytes(),
    ]
    .concat();
    if layout.as_deref() != Some(&want[..]) {
        return Err(SavepointError::DataDir(format!(
            "{} does not hold worker {me} of {}'s shards: export with the topology and \
             --worker the data was written with",
            data_dir.display(),
            plan.workers
        )));
    }
    let ids = worker_ids(plan);
    let fingerprint = format!("{:016x}", plan.fingerprint());
    let want = Marker::new(fingerprint, plan.topology.engine.shards, ids.clone());
    let (marker, existing) = match identity::claim(to, &want, &ids[me])? {
        identity::Claim::Write(m) => (m, None),
        identity::Claim::Compare(m, part) => (m, Some(part)),
    };
    let mut part = Part {
        savepoint: marker.id.clone(),
        worker: ids[me].clone(),
        shards: Vec::new(),
    };
    // Its part is there already: the same shards again (the data directory
    // did not change since) complete nothing new but are accepted; other
    // shards would mix two moments, and are refused before anything is
    // written.
    let write = existing.is_none();
    let specs: Vec<&ShardSpec> = plan.shards.iter().filter(|s| s.worker == me).collect();
    part.shards = export_shards(&store, plan, &specs, write.then_some(to))?;
    let keys = part.shards.iter().map(|s| s.keys).sum();
    let json = serde_json::to_vec_pretty(&part).map_err(|e| SavepointError::Io(e.to_string()))?;
    match existing {
        None => to.put(&part_path(&part.worker), json)?,
        Some(there) if serde_json::from_slice::<Part>(&there).ok().as_ref() == Some(&part) => {}
        Some(_) => {
            return Err(SavepointError::Refused(format!(
                "{} already holds worker {}'s part of savepoint {}, with other data than {}                  holds now: a worker exports once per savepoint (and must not run between its                  export and the savepoint's completion); export to a new location",
                to.describe(),
                part.worker,
                marker.id,
                data_dir.display()
            )))
        }
    }
    let shards = part.shards.len();
    let bytes = part.shards.iter().map(|s| s.bytes).sum();
    let missing = complete(to, plan, &marker)?;
    Ok(ExportReport {
        savepoint: marker.id,
        shards,
        bytes,
        keys,
        complete: missing.is_empty(),
        missing,
    })
}

/// How many shard files are read and encoded at once, and how many are
/// uploaded at once: reading a shard (RocksDB, encoding, SHA-256) and
/// uploading another overlap, and an object store takes several uploads at
/// once at a higher rate than one.
const EXPORT_READERS: usize = 2;
const EXPORT_UPLOADS: usize = 4;

/// Reads and encodes the shards `specs` and, with `to`, writes each one's
/// file there; returns what the part lists of each, in `specs`' order. The
/// first error stops the rest (a savepoint is complete only with every
/// part, and a part is written only after all its shard files).
fn export_shards(
    store: &Store,
    plan: &Plan,
    specs: &[&ShardSpec],
    to: Option<&dyn SavepointStore>,
) -> Result<Vec<SavedShard>, SavepointError> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let saved = parking_lot::Mutex::new(vec![None; specs.len()]);
    let first_error = parking_lot::Mutex::new(None);
    let fail = |e: SavepointError| {
        failed.store(true, Ordering::SeqCst);
        first_error.lock().get_or_insert(e);
    };
    let (files, uploads) = crossbeam_channel::bounded::<(String, Vec<u8>)>(EXPORT_UPLOADS);
    let (next, failed, saved_at, fail) = (&next, &failed, &saved, &fail);
    std::thread::scope(|scope| {
        for _ in 0..EXPORT_READERS.min(specs.len()) {
            let files = files.clone();
            scope.spawn(move || {
                while !failed.load(Ordering::SeqCst) {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(spec) = specs.get(i) else { break };
                    let node = &plan.nodes[spec.node];
                    let (bytes, keys) = match shard_file(store, &spec.prefix, false) {
                        Ok(file) => file,
                        Err(e) => return fail(e),
                    };
                    let file = format!("shards/{}/{}.bin", node.name, spec.shard);
                    saved_at.lock()[i] = Some(SavedShard {
                        component: node.name.clone(),
                        shard: spec.shard,
                        file: file.clone(),
                        bytes: bytes.len() as u64,
                        sha256: hex(&Sha256::digest(&bytes)),
                        keys,
                    });
                    if to.is_some() && files.send((file, bytes)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(files);
        if let Some(to) = to {
            for _ in 0..EXPORT_UPLOADS {
                let uploads = uploads.clone();
                scope.spawn(move || {
                    for (file, bytes) in uploads {
                        if failed.load(Ordering::SeqCst) {
                            break;
                        }
                        if let Err(e) = to.put(&file, bytes) {
                            return fail(e);
                        }
                        crate::failpoint::hit(crate::failpoint::Point::SavepointShard);
                    }
                });
            }
        }
        drop(uploads);
    });
    if let Some(e) = first_error.into_inner() {
        return Err(e);
    }
    saved
        .into_inner()
        .into_iter()
        .map(|s| s.ok_or_else(|| SavepointError::Io("a shard was not exported".into())))
        .collect()
}

/// Writes the manifest of the savepoint `marker` names if every part is
/// in `to`, after checking that each belongs to it; returns the workers
/// whose parts are still missing.
fn complete(
    to: &dyn SavepointStore,
    plan: &Plan,
    marker: &Marker,
) -> Result<Vec<String>, SavepointError> {
    let mut parts = Vec::new();
    let mut missing = Vec::new();
    for id in &marker.workers {
        let path = part_path(id);
        let Some(b) = to.get(&path)? else {
            missing.push(id.clone());
            continue;
        };
        let part = serde_json::from_slice::<Part>(&b)
            .map_err(|e| SavepointError::Refused(format!("{path} is not readable: {e}")))?;
        if part.savepoint != marker.id || &part.worker != id {
            return Err(SavepointError::Refused(format!(
                "{}/{path} is worker {}'s part of savepoint `{}`, not worker {id}'s of savepoint                  {}: the location mixes two savepoints; take the savepoint to a new location",
                to.describe(),
                part.worker,
                part.savepoint,
                marker.id
            )));
        }
        parts.push(part);
    }
    if !missing.is_empty() {
        return Ok(missing);
    }
    let manifest = Manifest {
        format: FORMAT,
        id: marker.id.clone(),
        fingerprint: marker.fingerprint.clone(),
        engine_shards: marker.engine_shards,
        workers: marker.workers.clone(),
        components: plan
            .nodes
            .iter()
            .map(|n| SavedComponent {
                name: n.name.clone(),
                kind: n.kind.clone(),
                role: role_name(n.role).to_owned(),
                shards: n.shards,
            })
            .collect(),
        shards: parts.into_iter().flat_map(|p| p.shards).collect(),
    };
    let json =
        serde_json::to_vec_pretty(&manifest).map_err(|e| SavepointError::Io(e.to_string()))?;
    // Two workers finishing at once may both complete it, with the same
    // manifest: the second finds the first's.
    if !to.create("manifest.json", json)? {
        let there = to.get("manifest.json")?.unwrap_or_default();
        let same = serde_json::from_slice::<Manifest>(&there).is_ok_and(|m| m.id == marker.id);
        if !same {
            return Err(SavepointError::Refused(format!(
                "{}/manifest.json appeared while savepoint {} was completed, and is another                  savepoint's",
                to.describe(),
                marker.id
            )));
        }
    }
    Ok(Vec::new())
}

/// What a load did.
#[derive(Debug)]
pub struct ImportReport {
    /// Shards loaded.
    pub shards: usize,
    /// Bytes of their files.
    pub bytes: u64,
    /// Keys loaded.
    pub keys: u64,
    /// Components of the topology the savepoint did not have (they start empty).
    pub new_components: Vec<String>,
    /// Components of the savepoint the topology does not have (dropped, as allowed).
    pub dropped_components: Vec<String>,
}

/// Reads and checks a savepoint's manifest against `plan`.
pub fn check(
    from: &dyn SavepointStore,
    plan: &Plan,
    allow_non_restored_state: bool,
) -> Result<(Manifest, Vec<String>, Vec<String>), SavepointError> {
    let Some(bytes) = from.get("manifest.json")? else {
        return Err(SavepointError::Refused(format!(
            "{} has no manifest.json: it is not a complete savepoint (an export was cut \
             short, or some worker has not exported yet)",
            from.describe()
        )));
    };
    let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
        SavepointError::Refused(format!(
            "{}/manifest.json is not readable: {e}",
            from.describe()
        ))
    })?;
    if m.format != FORMAT {
        return Err(SavepointError::Refused(format!(
            "the savepoint has format {}; this millrace reads format {FORMAT}",
            m.format
        )));
    }
    if m.engine_shards != plan.topology.engine.shards {
        return Err(SavepointError::Refused(format!(
            "the savepoint was taken with engine.shards = {}; this topology says {}. Shards \
             are fixed across savepoints (keys are spread by the shard count): use {}",
            m.engine_shards, plan.topology.engine.shards, m.engine_shards
        )));
    }
    let mut dropped = Vec::new();
    for c in &m.components {
        match plan.nodes.iter().find(|n| n.name == c.name) {
            None => dropped.push(c.name.clone()),
            Some(n) if n.kind != c.kind || role_name(n.role) != c.role => {
                return Err(SavepointError::Refused(format!(
                    "component `{}` was a {} of type `{}` in the savepoint and is a {} of type \
                     `{}` now: its state cannot be read by another kind (rename it to start \
                     it empty)",
                    c.name,
                    c.role,
                    c.kind,
                    role_name(n.role),
                    n.kind
                )))
            }
            Some(n) if n.shards != c.shards => {
                return Err(SavepointError::Refused(format!(
                    "component `{}` had {} shards in the savepoint and has {} now",
                    c.name, c.shards, n.shards
                )))
            }
            Some(_) => {}
        }
    }
    if !dropped.is_empty() && !allow_non_restored_state {
        return Err(SavepointError::Refused(format!(
            "the savepoint holds state of components the topology no longer has ({}); \
             start with --allow-non-restored-state to drop it",
            dropped.join(", ")
        )));
    }
    // Every file is checked before any is read: a manifest cannot make a
    // load read (or report the size and checksum of) a file elsewhere.
    for s in &m.shards {
        check_path(&s.file).map_err(|why| {
            SavepointError::Refused(format!(
                "the manifest's entry for component `{}` shard {} is refused: {why}",
                s.component, s.shard
            ))
        })?;
    }
    let new: Vec<String> = plan
        .nodes
        .iter()
        .filter(|n| !m.components.iter().any(|c| c.name == n.name))
        .map(|n| n.name.clone())
        .collect();
    Ok((m, new, dropped))
}

/// Loads, into the new data directory `data_dir`, the shards worker `me`
/// owns under `plan`, from the savepoint `from`. The directory must not hold
/// anything; it appears only once every shard is loaded.
pub fn import(
    data_dir: &Path,
    plan: &Plan,
    me: usize,
    from: &dyn SavepointStore,
    allow_non_restored_state: bool,
) -> Result<ImportReport, SavepointError> {
    if std::fs::read_dir(data_dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(SavepointError::DataDir(format!(
            "{} already holds data: a savepoint is loaded only into an empty data directory \
             (start without --from-savepoint to go on from what it holds)",
            data_dir.display()
        )));
    }
    let (m, new_components, dropped_components) = check(from, plan, allow_non_restored_state)?;
    // Loaded beside the data directory and renamed into place at the end,
    // so that a load cut short never looks like a data directory.
    let staging = staging::Staging::begin(data_dir)?;
    let loaded = load_shards(staging.dir(), plan, me, from, &m);
    let (shards, keys, loaded_bytes) = match loaded {
        Ok(done) => done,
        Err(e) => {
            if let Err(cleanup) = staging.abandon() {
                tracing::warn!(error = %cleanup, "the refused load's staging directory stays");
            }
            return Err(e);
        }
    };
    staging.finish(data_dir)?;
    Ok(ImportReport {
        shards,
        bytes: loaded_bytes,
        keys,
        new_components,
        dropped_components,
    })
}

/// Loads the shards worker `me` owns under `plan` from `from`, as `m`
/// lists them, into a new store in `dir`; returns shards, keys and bytes.
fn load_shards(
    dir: &Path,
    plan: &Plan,
    me: usize,
    from: &dyn SavepointStore,
    m: &Manifest,
) -> Result<(usize, u64, u64), SavepointError> {
    let by_shard: BTreeMap<(&str, u32), &SavedShard> = m
        .shards
        .iter()
        .map(|s| ((s.component.as_str(), s.shard), s))
        .collect();
    let store = Store::open(dir, &StoreOptions::default())?;
    let (mut shards, mut keys, mut loaded_bytes) = (0, 0u64, 0u64);
    let saved_components: BTreeSet<&str> = m.components.iter().map(|c| c.name.as_str()).collect();
    for spec in plan.shards.iter().filter(|s| s.worker == me) {
        let node = &plan.nodes[spec.node];
        if !saved_components.contains(node.name.as_str()) {
            continue; // a new component: starts empty
        }
        let Some(saved) = by_shard.get(&(node.name.as_str(), spec.shard)) else {
            return Err(SavepointError::Refused(format!(
                "the manifest lists component `{}` but not its shard {}",
                node.name, spec.shard
            )));
        };
        let bytes = from.get(&saved.file)?.ok_or_else(|| {
            SavepointError::Refused(format!("{} is missing from the savepoint", saved.file))
        })?;
        let sum = hex(&Sha256::digest(&bytes));
        if bytes.len() as u64 != saved.bytes || sum != saved.sha256 {
            return Err(SavepointError::Refused(format!(
                "{} does not match the manifest ({} bytes, SHA-256 {sum}; the manifest says \
                 {} bytes, {}): the savepoint is damaged",
                saved.file,
                bytes.len(),
                saved.bytes,
                saved.sha256
            )));
        }
        let prefix = shard_prefix(&node.name, spec.shard);
        let entries = parse_shard_file(&bytes, &prefix)
            .map_err(|why| SavepointError::Refused(format!("{} is damaged: {why}", saved.file)))?;
        ingest_shard(&store, &prefix, &entries, &saved.file)?;
        shards += 1;
        keys += entries.len() as u64;
        loaded_bytes += saved.bytes;
    }
    Ok((shards, keys, loaded_bytes))
}

/// Every key of the shard with `prefix` in a live `store`, as a shard file
/// (what a shard move carries from its old owner to its new one), and how
/// many keys. The shard must not be running.
pub(crate) fn shard_snapshot(
    store: &Store,
    prefix: &[u8],
) -> Result<(Vec<u8>, u64), SavepointError> {
    shard_file(store, prefix, true)
}

/// Replaces every key of the shard with `prefix` in `store` by those of the
/// shard file `bytes` (checked entry by entry first); returns how many keys.
/// The shard must not be running.
pub(crate) fn replace_shard(
    store: &Store,
    prefix: &[u8],
    bytes: &[u8],
) -> Result<u64, SavepointError> {
    let entries = parse_shard_file(bytes, prefix)
        .map_err(|why| SavepointError::Refused(format!("the shard's data is damaged: {why}")))?;
    // Checked before anything of the shard is cleared.
    sorted_by_cf(prefix, &entries)
        .map_err(|why| SavepointError::Refused(format!("the shard's data is damaged: {why}")))?;
    // Marked until the new keys are in: a crash in between leaves a
    // shard that says it is partial, not one that passes for whole.
    clear_marked(store, prefix)?;
    ingest_shard(store, prefix, &entries, "the shard's data")?;
    unmark(store, prefix)?;
    Ok(entries.len() as u64)
}

/// A shard file's entries (of the shard with `prefix`) by column family,
/// each in key order, its state keys checked like any state key; an error
/// names a key that is not one, or one that comes twice.
#[allow(clippy::type_complexity)]
fn sorted_by_cf<'e>(
    prefix: &[u8],
    entries: &'e [Entry],
) -> Result<Vec<(Cf, Vec<(&'e [u8], &'e [u8])>)>, String> {
    let mut out = Vec::new();
    for (cf, _) in CF_TAGS {
        let mut of_cf: Vec<(&[u8], &[u8])> = entries
            .iter()
            .filter(|(c, _, _)| *c == cf)
            .map(|(_, k, v)| (k.as_slice(), v.as_slice()))
            .collect();
        // A shard file lists each column family in key order already.
        of_cf.sort_unstable_by(|a, b| a.0.cmp(b.0));
        if let Some(w) = of_cf.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(format!(
                "it holds a {} key twice ({})",
                cf.name(),
                hex(w[0].0)
            ));
        }
        if cf == Cf::State {
            for (k, _) in &of_cf {
                parse_state_key(&k[prefix.len()..]).map_err(|e| format!("bad state key: {e}"))?;
            }
        }
        out.push((cf, of_cf));
    }
    Ok(out)
}

/// Adds a shard's entries (parsed from its file `what`) to `store`, which
/// holds nothing of that shard, as one ingested table per column family:
/// no WAL write or memtable insert per key.
fn ingest_shard(
    store: &Store,
    prefix: &[u8],
    entries: &[Entry],
    what: &str,
) -> Result<(), SavepointError> {
    let by_cf = sorted_by_cf(prefix, entries)
        .map_err(|why| SavepointError::Refused(format!("{what} is damaged: {why}")))?;
    for (cf, of_cf) in by_cf {
        store.ingest(cf, of_cf)?;
    }
    Ok(())
}

/// Deletes every key of the shard with `prefix` from `store`.
pub(crate) fn clear_shard(store: &Store, prefix: &[u8]) -> Result<(), SavepointError> {
    clear_marked(store, prefix)?;
    unmark(store, prefix)
}

/// Whether a clear or a replace of the shard with `prefix` was cut short
/// (by a crash): then the store holds a part of it only.
pub(crate) fn partly_cleared(store: &Store, prefix: &[u8]) -> Result<bool, SavepointError> {
    Ok(store
        .get(Cf::Meta, &crate::layout::clearing_key(prefix))?
        .is_some())
}

/// Marks the shard as being cleared, in the same commit as it forgets its
/// place in a commit log (so that a partial copy is never taken for one at
/// that place), then deletes every key of it.
fn clear_marked(store: &Store, prefix: &[u8]) -> Result<(), SavepointError> {
    let mut b = store.batch();
    b.put(Cf::Meta, &crate::layout::clearing_key(prefix), &[]);
    for key in crate::layout::log_position_keys(prefix) {
        b.delete(Cf::Meta, &key);
    }
    store.commit(b)?;
    for (cf, _) in CF_TAGS {
        store.clear_prefix(cf, prefix)?;
    }
    Ok(())
}

fn unmark(store: &Store, prefix: &[u8]) -> Result<(), SavepointError> {
    let mut b = store.batch();
    b.delete(Cf::Meta, &crate::layout::clearing_key(prefix));
    store.commit(b)?;
    Ok(())
}
