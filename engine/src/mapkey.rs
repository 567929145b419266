//! A record key as a shard's in-memory maps hold it, and the hash map they use.

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};

/// Keys up to this long are held in place.
const INLINE: usize = 22;

/// A key held by a shard's maps: up to 22 bytes in place, longer ones on
/// the heap. A record's key arrives as a slice of its envelope; keeping that
/// slice in a map would keep the envelope alive, and every clone, drop and
/// comparison would reach into it (a shared reference count, usually on a
/// line another executor wrote last). A short key copied in place costs
/// nothing to compare but the map's own entry.
#[derive(Clone)]
pub(crate) enum MapKey {
    Inline(u8, [u8; INLINE]),
    Heap(Box<[u8]>),
}

impl MapKey {
    pub fn new(key: &[u8]) -> MapKey {
        if key.len() <= INLINE {
            let mut bytes = [0; INLINE];
            bytes[..key.len()].copy_from_slice(key);
            MapKey::Inline(key.len() as u8, bytes)
        } else {
            MapKey::Heap(key.into())
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            MapKey::Inline(len, bytes) => &bytes[..usize::from(*len)],
            MapKey::Heap(bytes) => bytes,
        }
    }
}

impl Borrow<[u8]> for MapKey {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

// Hash and equality are those of the bytes, as `Borrow` requires.
impl Hash for MapKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl PartialEq for MapKey {
    fn eq(&self, other: &MapKey) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for MapKey {}

impl Ord for MapKey {
    fn cmp(&self, other: &MapKey) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl PartialOrd for MapKey {
    fn partial_cmp(&self, other: &MapKey) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl std::fmt::Debug for MapKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.as_bytes()))
    }
}

/// The hash maps on the per-record path (keyed state, timers, channels,
/// shards). foldhash instead of the standard SipHash, which took ~10% of
/// P2's instructions. Its seed is random per process, so colliding keys
/// cannot be worked out ahead of time (it is not a cryptographic hash).
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

#[cfg(test)]
mod tests {
    use super::FastMap;
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_key_keeps_its_bytes_order_and_finds_itself_by_slice(
            a in proptest::collection::vec(any::<u8>(), 0..40),
            b in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let (ka, kb) = (MapKey::new(&a), MapKey::new(&b));
            prop_assert_eq!(ka.as_bytes(), &a[..]);
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
            prop_assert_eq!(ka == kb, a == b);
            let mut m = FastMap::default();
            m.insert(ka, 1);
            prop_assert_eq!(m.get(&a[..]), Some(&1));
            prop_assert_eq!(m.contains_key(&b[..]), a == b);
        }
    }

    #[test]
    fn short_keys_are_in_place_and_long_ones_on_the_heap() {
        assert!(matches!(MapKey::new(&[7; INLINE]), MapKey::Inline(..)));
        assert!(matches!(MapKey::new(&[7; INLINE + 1]), MapKey::Heap(..)));
        assert_eq!(std::mem::size_of::<MapKey>(), 24);
    }
}
