//! Which savepoint an export belongs to.
//!
//! A savepoint's location holds one savepoint. The first export into an
//! empty location creates `savepoint.json` (with create-if-absent: `O_EXCL`
//! for a directory, `If-None-Match: *` on an object store), holding a new
//! random id and what every part must agree on: the topology's
//! fingerprint, `engine.shards` and the worker list. Every later export
//! into the location joins that savepoint only if it was planned with the
//! same topology and worker list, the savepoint is not complete yet, and
//! its own part is not there already (or is there with exactly the shards
//! it would write: a repeated export of an unchanged data directory).
//! Every other export is refused before it writes anything, and so is an
//! export into a location that holds anything but a savepoint being taken.
//!
//! Every part carries the id, and the export that completes the savepoint
//! checks that every part has it before it writes `manifest.json` (with
//! the id as well). Workers need no other agreement: whichever creates the
//! marker first, the others join it, whether they export one after another
//! (`millrace savepoint`, once per worker) or at once (`millrace stop
//! --savepoint`).

use super::{SavepointError, SavepointStore, FORMAT};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The marker's path.
pub const MARKER: &str = "savepoint.json";

/// `savepoint.json`: the savepoint a location holds, from its first export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    /// The savepoint format.
    pub format: u32,
    /// The savepoint's id: 32 hex digits, random.
    pub id: String,
    /// The fingerprint of the topology it is taken with (hex).
    pub fingerprint: String,
    /// `engine.shards`.
    pub engine_shards: u32,
    /// The workers whose parts make it whole.
    pub workers: Vec<String>,
}

impl Marker {
    /// A new savepoint's marker, with a new id.
    pub fn new(fingerprint: String, engine_shards: u32, workers: Vec<String>) -> Marker {
        Marker {
            format: FORMAT,
            id: new_id(),
            fingerprint,
            engine_shards,
            workers,
        }
    }

    /// Whether an export planned as `want` belongs to this savepoint.
    fn fits(&self, want: &Marker) -> bool {
        self.format == want.format
            && self.fingerprint == want.fingerprint
            && self.engine_shards == want.engine_shards
            && self.workers == want.workers
    }
}

/// 128 random-enough bits, hex: the clock, the process, and the random
/// keys the standard library seeds its hash maps with, through SHA-256.
fn new_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut sha = Sha256::new();
    sha.update(nanos.to_le_bytes());
    sha.update(h.finish().to_le_bytes());
    sha.update(std::process::id().to_le_bytes());
    super::hex(&sha.finalize()[..16])
}

/// Reads the marker of `store`, if it has one.
pub fn read_marker(store: &dyn SavepointStore) -> Result<Option<Marker>, SavepointError> {
    let Some(bytes) = store.get(MARKER)? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        SavepointError::Refused(format!(
            "{}/{MARKER} is not readable: {e}",
            store.describe()
        ))
    })
}

/// How worker `me` may export into `store`.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// Write its part of the savepoint with this marker.
    Write(Marker),
    /// Its part is there already: compare, then complete if it is the same.
    Compare(Marker, Vec<u8>),
}

/// Finds or creates the savepoint that worker `me`, planned as `want`,
/// exports into `store`; refuses (before anything is written) a location
/// that holds anything else. See the module's doc for the rule.
pub fn claim(store: &dyn SavepointStore, want: &Marker, me: &str) -> Result<Claim, SavepointError> {
    let at = store.describe();
    if let Some(complete) = complete_id(store)? {
        return Err(SavepointError::Refused(format!(
            "{at} already holds a complete savepoint ({complete}): export to a new location"
        )));
    }
    // Twice at most: a marker created by another worker between this one's
    // look and its own try is joined on the second turn.
    for _ in 0..2 {
        if let Some(marker) = read_marker(store)? {
            return join(store, marker, want, me);
        }
        if let Some(entry) = store.some_entry()? {
            // Created meanwhile by another worker of the same savepoint?
            if let Some(marker) = read_marker(store)? {
                return join(store, marker, want, me);
            }
            return Err(SavepointError::Refused(format!(
                "{at} is not empty (it holds `{entry}`) and holds no savepoint being taken: \
                 export to a new, empty location"
            )));
        }
        let json =
            serde_json::to_vec_pretty(want).map_err(|e| SavepointError::Io(e.to_string()))?;
        if store.create(MARKER, json)? {
            return Ok(Claim::Write(want.clone()));
        }
    }
    Err(SavepointError::Io(format!(
        "{at}/{MARKER} was created and is gone again: is something removing it?"
    )))
}

/// Joins the savepoint `marker` names, if `want` belongs to it.
fn join(
    store: &dyn SavepointStore,
    marker: Marker,
    want: &Marker,
    me: &str,
) -> Result<Claim, SavepointError> {
    if !marker.fits(want) {
        return Err(SavepointError::Refused(format!(
            "{} holds savepoint {} being taken with another topology or worker list \
             (fingerprint {}, engine.shards {}, workers {}; this export: fingerprint {}, \
             engine.shards {}, workers {}): export to a new location",
            store.describe(),
            marker.id,
            marker.fingerprint,
            marker.engine_shards,
            marker.workers.join(", "),
            want.fingerprint,
            want.engine_shards,
            want.workers.join(", ")
        )));
    }
    match store.get(&super::part_path(me))? {
        None => Ok(Claim::Write(marker)),
        Some(part) => Ok(Claim::Compare(marker, part)),
    }
}

/// The id of the complete savepoint `store` holds, if it holds one.
fn complete_id(store: &dyn SavepointStore) -> Result<Option<String>, SavepointError> {
    let Some(bytes) = store.get("manifest.json")? else {
        return Ok(None);
    };
    let id = serde_json::from_slice::<super::Manifest>(&bytes)
        .map(|m| m.id)
        .unwrap_or_default();
    Ok(Some(if id.is_empty() {
        "without an id".to_owned()
    } else {
        id
    }))
}

/// Refuses a location that a new savepoint cannot be taken into by every
/// worker at once (`millrace stop --savepoint`): one holding a complete
/// savepoint, a part of one, or anything but a savepoint marker.
pub fn check_vacant(store: &dyn SavepointStore) -> Result<(), SavepointError> {
    let at = store.describe();
    if let Some(complete) = complete_id(store)? {
        return Err(SavepointError::Refused(format!(
            "{at} already holds a complete savepoint ({complete}): take the savepoint to a \
             new location"
        )));
    }
    match read_marker(store)? {
        Some(marker) => {
            for w in &marker.workers {
                if store.get(&super::part_path(w))?.is_some() {
                    return Err(SavepointError::Refused(format!(
                        "{at} holds savepoint {} with worker {w}'s part already: take the \
                         savepoint to a new location",
                        marker.id
                    )));
                }
            }
            Ok(())
        }
        None => match store.some_entry()? {
            Some(entry) => Err(SavepointError::Refused(format!(
                "{at} is not empty (it holds `{entry}`): take the savepoint to a new, empty \
                 location"
            ))),
            None => Ok(()),
        },
    }
}
