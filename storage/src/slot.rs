//! How keyed state is stored: in slots.
//!
//! A slot is the value, zero padding up to a multiple of [`ALIGN`] bytes,
//! and a last byte giving the padding's length. A key whose state was
//! deleted holds a vacant slot ([`VACANT_LEN`] zero bytes, the last one
//! `0xFF`) until a compaction drops it.
//!
//! Why: RocksDB overwrites a value in place in its memtable when the new
//! value is no larger than the one there, but never a deletion. State that is
//! deleted and set again (a window's pane fires and goes, the next one opens)
//! would add two memtable entries each time, which the memtable then sorts,
//! flushes and compacts. Slots of a few sizes make the new value fit the old
//! place, deletions included (P2: +14%).

use crate::StorageError;

/// Slot sizes are multiples of this.
pub const ALIGN: usize = 16;

/// Size of a vacant slot: a value of up to `VACANT_LEN - 1` bytes set after a
/// deletion takes its place.
pub const VACANT_LEN: usize = 64;

const VACANT: u8 = 0xFF;

/// The length of the slot [`encode_into`] writes for `value`.
pub fn encoded_len(value: Option<&[u8]>) -> usize {
    match value {
        None => VACANT_LEN,
        Some(value) => (value.len() + 1).div_ceil(ALIGN) * ALIGN,
    }
}

/// Appends the slot holding `value` (a vacant slot for `None`) to `out`.
pub fn encode_into(value: Option<&[u8]>, out: &mut Vec<u8>) {
    let len = encoded_len(value);
    let Some(value) = value else {
        out.resize(out.len() + len - 1, 0);
        out.push(VACANT);
        return;
    };
    out.extend_from_slice(value);
    out.resize(out.len() + len - 1 - value.len(), 0);
    out.push((len - 1 - value.len()) as u8);
}

/// The value a slot holds (`None`: vacant).
pub fn decode(slot: &[u8]) -> Result<Option<&[u8]>, StorageError> {
    match slot.split_last() {
        Some((&VACANT, _)) => Ok(None),
        Some((&pad, rest)) if (pad as usize) <= rest.len() => {
            Ok(Some(&rest[..rest.len() - pad as usize]))
        }
        _ => Err(StorageError::Corrupt(format!(
            "a state value of {} bytes is not a slot",
            slot.len()
        ))),
    }
}

/// Whether `slot` is vacant (compactions drop those).
pub fn is_vacant(slot: &[u8]) -> bool {
    slot.last() == Some(&VACANT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(value: Option<&[u8]>) -> Vec<u8> {
        let mut slot = Vec::new();
        encode_into(value, &mut slot);
        slot
    }

    proptest! {
        #[test]
        fn every_value_comes_back(value in proptest::collection::vec(any::<u8>(), 0..300)) {
            let slot = encode(Some(&value));
            prop_assert_eq!(slot.len() % ALIGN, 0);
            prop_assert!(slot.len() - value.len() <= ALIGN);
            prop_assert_eq!(decode(&slot).unwrap(), Some(&value[..]));
            prop_assert!(!is_vacant(&slot));
            let mut after = b"key".to_vec();
            encode_into(Some(&value), &mut after);
            prop_assert_eq!(&after[3..], &slot[..]);
            prop_assert_eq!(encoded_len(Some(&value)), slot.len());
        }

        #[test]
        fn garbage_is_an_error_or_a_value_never_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn small_values_fit_where_a_deleted_one_was() {
        let vacant = encode(None);
        assert!(is_vacant(&vacant));
        assert_eq!(vacant.len(), encoded_len(None));
        assert_eq!(decode(&vacant).unwrap(), None);
        assert!(encode(Some(&[7; VACANT_LEN - 1])).len() <= vacant.len());
        assert!(decode(&[]).is_err());
        assert!(decode(&[1, 5]).is_err());
    }
}
