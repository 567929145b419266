//! The on-disk layout: every key the engine writes to RocksDB is built (and
//! parsed) here, so the format is one page to review and to version.
//!
//! Keys are tuples in `millrace_storage`'s order-preserving encoding. Every
//! key of a shard starts with its prefix `(component, shard)`, so a shard's
//! data is one key range in each column family (scan it to rebuild, delete
//! it to drop, ship it to move the shard). Keys of the worker as a whole
//! start with the empty component name `""`, which no component has.
//!
//! | column family | key | value |
//! | --- | --- | --- |
//! | `state` | prefix, key bytes | the key's state, in a slot (`storage/src/slot.rs`) |
//! | `timers` | prefix, `t`, domain (`e`/`p`), time i64, key, tag | empty (stored timers only; windows' follow from state) |
//! | `outbox` | producer prefix, edge name, consumer shard u32, sequence u64 | the production's envelope (`record.rs`) |
//! | `channels` | producer prefix, `o`, edge name, consumer shard u32 | next sequence number u64 |
//! | `channels` | consumer prefix, `i`, edge name, producer shard u32 | highest applied sequence number u64 |
//! | `meta` | prefix, `w` | the shard's output watermark i64 |
//! | `meta` | prefix, `p` | a source's or sink's committed position (its own bytes) |
//! | `meta` | prefix, `e` | the shard's epoch u64 (rises at every start) |
//! | `meta` | prefix, `s` | with snapshots: the shard's last snapshot, the log sequence it holds everything up to u64, then its file's name |
//! | `meta` | prefix, `l` | with a commit log: the sequence of the shard's last log entry applied here, u64 (not itself logged) |
//! | `meta` | `""`, `peer-epoch`, shard u32 | highest epoch seen for another worker's shard |
//! | `meta` | `""`, `cluster` | worker count u32, this worker's index u32 |
//! | `meta` | `""`, `shards` | `engine.shards` the directory was written with, u32 |
//! | `meta` | `""`, `clearing`, prefix | empty: the shard's keys are being cleared or replaced (a crash left it partial) |
//! | `meta` | `""`, `joined` | empty: its shards were claimed from etcd (`--join`) |
//! | `meta` | `""`, `state-format` | `slots-1` (written by the storage crate) |
//!
//! Integers in values are big-endian.

use crate::record::{EventTime, TimeDomain};
use millrace_storage::{push_escaped, KeyReader, KeyWriter};

/// The key prefix of a component's shard: every key of that shard starts with it.
pub fn shard_prefix(component: &str, shard: u32) -> Vec<u8> {
    KeyWriter::new().str(component).u32(shard).finish()
}

/// Reads the `(component, shard)` a key starts with.
pub(crate) fn parse_shard_prefix(key: &[u8]) -> Option<(String, u32)> {
    let mut r = KeyReader::new(key);
    Some((r.str().ok()?, r.u32().ok()?))
}

/// The state key of `key` in the shard whose keys start with `prefix`.
pub(crate) fn state_key(prefix: &[u8], key: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(prefix.len() + key.len() + 2);
    write_state_key(&mut buf, prefix, key);
    buf
}

/// Writes the state key of `key` into `buf`, replacing what it held:
/// commits reuse one buffer.
pub(crate) fn write_state_key(buf: &mut Vec<u8>, prefix: &[u8], key: &[u8]) {
    buf.clear();
    buf.extend_from_slice(prefix);
    push_escaped(buf, key);
}

/// Reads the key bytes that follow a shard's prefix in a state key.
pub(crate) fn parse_state_key(rest: &[u8]) -> Result<Vec<u8>, millrace_storage::KeyError> {
    KeyReader::new(rest).bytes()
}

/// The prefix of every stored timer of a shard.
pub(crate) fn timers_prefix(prefix: &[u8]) -> Vec<u8> {
    KeyWriter::from_prefix(prefix).tag(b't').finish()
}

/// The key of one stored timer.
pub(crate) fn timer_key(
    prefix: &[u8],
    d: TimeDomain,
    t: EventTime,
    key: &[u8],
    tag: &[u8],
) -> Vec<u8> {
    KeyWriter::from_prefix(prefix)
        .tag(b't')
        .tag(d.tag())
        .i64(t)
        .bytes(key)
        .bytes(tag)
        .finish()
}

/// Parses what follows [`timers_prefix`] in a timer's key.
pub(crate) fn parse_timer_key(
    rest: &[u8],
) -> Result<(TimeDomain, EventTime, Vec<u8>, Vec<u8>), millrace_storage::KeyError> {
    let mut r = KeyReader::new(rest);
    let d = match r.tag()? {
        b'e' => TimeDomain::EventTime,
        _ => TimeDomain::ProcessingTime,
    };
    Ok((d, r.i64()?, r.bytes()?, r.bytes()?))
}

/// The prefix of a channel's outbox entries (the producer shard's prefix,
/// the edge, the consumer shard); each entry appends its sequence number.
pub(crate) fn outbox_prefix(producer: &[u8], edge: &str, consumer_shard: u32) -> Vec<u8> {
    KeyWriter::from_prefix(producer)
        .str(edge)
        .u32(consumer_shard)
        .finish()
}

/// The outbox key of production `seq` of the channel with `prefix`.
pub(crate) fn outbox_key(prefix: &[u8], seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + 8);
    k.extend_from_slice(prefix);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Reads the sequence number that follows a channel's outbox prefix.
pub(crate) fn parse_outbox_seq(rest: &[u8]) -> Result<u64, millrace_storage::KeyError> {
    KeyReader::new(rest).u64()
}

/// The producer's key of a channel's next sequence number.
pub(crate) fn next_seq_key(producer: &[u8], edge: &str, consumer_shard: u32) -> Vec<u8> {
    KeyWriter::from_prefix(producer)
        .tag(b'o')
        .str(edge)
        .u32(consumer_shard)
        .finish()
}

/// The consumer's key of a channel's highest applied sequence number.
pub(crate) fn applied_seq_key(consumer: &[u8], edge: &str, producer_shard: u32) -> Vec<u8> {
    KeyWriter::from_prefix(consumer)
        .tag(b'i')
        .str(edge)
        .u32(producer_shard)
        .finish()
}

/// Meta key of a shard's output watermark.
pub(crate) fn watermark_key(prefix: &[u8]) -> Vec<u8> {
    KeyWriter::from_prefix(prefix).tag(b'w').finish()
}

/// Meta key of a source's or sink's committed position.
pub(crate) fn position_key(prefix: &[u8]) -> Vec<u8> {
    KeyWriter::from_prefix(prefix).tag(b'p').finish()
}

/// Meta key of this worker's epoch for one of its shards.
pub(crate) fn epoch_key(prefix: &[u8]) -> Vec<u8> {
    KeyWriter::from_prefix(prefix).tag(b'e').finish()
}

/// Meta key of the sequence of the shard's last commit log entry applied
/// here.
pub(crate) fn log_seq_key(prefix: &[u8]) -> Vec<u8> {
    KeyWriter::from_prefix(prefix).tag(b'l').finish()
}

/// The meta keys of a shard's place in a commit log: its last entry
/// applied ([`log_seq_key`]), its last snapshot ([`snapshot_key`]) and
/// which log that is ([`log_identity_key`]).
pub(crate) fn log_position_keys(prefix: &[u8]) -> [Vec<u8>; 3] {
    [
        log_seq_key(prefix),
        snapshot_key(prefix),
        log_identity_key(prefix),
    ]
}

/// Meta key of the commit log the shard's entries were applied from (its
/// `CommitLog::identity`).
pub(crate) fn log_identity_key(prefix: &[u8]) -> Vec<u8> {
    KeyWriter::from_prefix(prefix).tag(b'n').finish()
}

/// Meta key of the shard's last snapshot (see `commit_log.rs`).
pub(crate) fn snapshot_key(prefix: &[u8]) -> Vec<u8> {
    KeyWriter::from_prefix(prefix).tag(b's').finish()
}

/// Meta key prefix of the highest epochs seen for other workers' shards.
pub(crate) fn peer_epochs_prefix() -> Vec<u8> {
    KeyWriter::new().str("").str("peer-epoch").finish()
}

/// Meta key of the highest epoch seen for another worker's shard `sid`.
pub(crate) fn peer_epoch_key(sid: u32) -> Vec<u8> {
    KeyWriter::new().str("").str("peer-epoch").u32(sid).finish()
}

/// Reads the shard number that follows [`peer_epochs_prefix`].
pub(crate) fn parse_peer_epoch_sid(rest: &[u8]) -> Result<u32, millrace_storage::KeyError> {
    KeyReader::new(rest).u32()
}

/// Meta key of the cluster layout: worker count and this worker's index.
pub(crate) fn cluster_key() -> Vec<u8> {
    KeyWriter::new().str("").str("cluster").finish()
}

/// Meta key present when the directory's worker ran with shards claimed
/// from a coordination service (they move, so the plan's deal does not say
/// which shards it holds).
pub(crate) fn joined_key() -> Vec<u8> {
    KeyWriter::new().str("").str("joined").finish()
}

/// Meta key present while the keys of the shard with `prefix` are cleared
/// or replaced: a store that still has it after a crash holds a part of
/// the shard only.
pub(crate) fn clearing_key(prefix: &[u8]) -> Vec<u8> {
    KeyWriter::new()
        .str("")
        .str("clearing")
        .bytes(prefix)
        .finish()
}

/// Meta key of the shard count the directory was written with.
pub(crate) fn shards_key() -> Vec<u8> {
    KeyWriter::new().str("").str("shards").finish()
}

/// Meta key of the shard counts per component the directory was written
/// with ([`crate::plan::Plan::shard_layout`]).
pub(crate) fn shard_layout_key() -> Vec<u8> {
    KeyWriter::new().str("").str("shard-layout").finish()
}

/// Reads a big-endian u64 or i64 stored by a checkpoint.
pub(crate) fn read_u64(v: &[u8]) -> Option<u64> {
    v.try_into().ok().map(u64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shard_key_starts_with_its_prefix_and_parses_back() {
        let p = shard_prefix("counts", 3);
        assert_eq!(parse_shard_prefix(&p), Some(("counts".to_owned(), 3)));
        for k in [
            state_key(&p, b"a\0b"),
            timer_key(&p, TimeDomain::EventTime, -5, b"k", b"tag"),
            outbox_key(&outbox_prefix(&p, "counts->out", 1), 9),
            next_seq_key(&p, "counts->out", 1),
            applied_seq_key(&p, "gen->counts", 0),
            watermark_key(&p),
            position_key(&p),
            epoch_key(&p),
        ] {
            assert!(k.starts_with(&p));
            assert_eq!(parse_shard_prefix(&k), Some(("counts".to_owned(), 3)));
        }
        assert_eq!(
            parse_state_key(&state_key(&p, b"a\0b")[p.len()..]),
            Ok(b"a\0b".to_vec())
        );
        let tp = timers_prefix(&p);
        let t = timer_key(&p, TimeDomain::ProcessingTime, 42, b"k", b"tag");
        assert_eq!(
            parse_timer_key(&t[tp.len()..]).unwrap(),
            (
                TimeDomain::ProcessingTime,
                42,
                b"k".to_vec(),
                b"tag".to_vec()
            )
        );
        let op = outbox_prefix(&p, "e", 2);
        assert_eq!(parse_outbox_seq(&outbox_key(&op, 77)[op.len()..]), Ok(77));
        let pe = peer_epochs_prefix();
        assert_eq!(
            parse_peer_epoch_sid(&peer_epoch_key(12)[pe.len()..]),
            Ok(12)
        );
        // Worker-wide keys belong to no component.
        for k in [cluster_key(), shards_key(), peer_epoch_key(1)] {
            assert_eq!(parse_shard_prefix(&k).map(|(c, _)| c), Some(String::new()));
        }
    }
}
