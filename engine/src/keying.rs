//! Key extractors and the key -> shard mapping.

use bytes::Bytes;
use millrace_config::KeyExtractor;

/// The shard of `key` among `shards`. Stable across versions and machines:
/// state on disk is laid out by it (FNV-1a 64, then a multiply-shift range
/// reduction).
pub fn shard_of(key: &[u8], shards: u32) -> u32 {
    let mut h = fnv1a(key);
    // Final avalanche so that short keys spread over all shards.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    ((u128::from(h) * u128::from(shards)) >> 64) as u32
}

/// FNV-1a 64 of `bytes`.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Where a key extractor found a record's key.
pub(crate) enum Extracted<'v> {
    /// The record's key.
    Key,
    /// The whole value.
    Value,
    /// A part of the value.
    Within(&'v [u8]),
    /// Built from the value (a JSON field, decoded or printed).
    Built(Bytes),
}

impl Extracted<'_> {
    /// The key's bytes, given the record it was extracted from.
    pub(crate) fn bytes<'a>(&'a self, key: &'a [u8], value: &'a [u8]) -> &'a [u8] {
        match self {
            Extracted::Key => key,
            Extracted::Value => value,
            Extracted::Within(b) => b,
            Extracted::Built(b) => b,
        }
    }
}

/// Applies a consumer's key extractor to a record's value, copying nothing
/// unless the key has to be built. Errors say what is missing.
pub(crate) fn locate_key<'v>(
    extractor: &KeyExtractor,
    value: &'v [u8],
) -> Result<Extracted<'v>, String> {
    match extractor {
        KeyExtractor::Key => Ok(Extracted::Key),
        KeyExtractor::Value => Ok(Extracted::Value),
        KeyExtractor::Json(pointer) => {
            let doc: serde_json::Value = serde_json::from_slice(value)
                .map_err(|e| format!("key json:{pointer}: the value is not JSON: {e}"))?;
            match doc.pointer(pointer) {
                None => Err(format!("key json:{pointer}: no such field in the value")),
                Some(serde_json::Value::String(s)) => Ok(Extracted::Built(Bytes::from(s.clone()))),
                Some(other) => Ok(Extracted::Built(Bytes::from(other.to_string()))),
            }
        }
        KeyExtractor::Field { index, delimiter } => {
            let text = std::str::from_utf8(value)
                .map_err(|_| format!("key field:{index}: the value is not UTF-8 text"))?;
            let field = text.split(delimiter.as_str()).nth(*index).ok_or_else(|| {
                format!(
                    "key field:{index}: the value has fewer than {} fields",
                    index + 1
                )
            })?;
            Ok(Extracted::Within(field.as_bytes()))
        }
    }
}

/// Applies a consumer's key extractor to a record, sharing the record's
/// memory where it can. Errors say what is missing.
pub fn extract_key(extractor: &KeyExtractor, key: &Bytes, value: &Bytes) -> Result<Bytes, String> {
    Ok(match locate_key(extractor, value)? {
        Extracted::Key => key.clone(),
        Extracted::Value => value.clone(),
        Extracted::Within(part) => value.slice_ref(part),
        Extracted::Built(b) => b,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_in_range_and_spread() {
        let mut hits = [0u32; 8];
        for i in 0..8000 {
            let s = shard_of(format!("key{i}").as_bytes(), 8);
            hits[s as usize] += 1;
        }
        for h in hits {
            assert!((800..1200).contains(&h), "uneven spread: {hits:?}");
        }
        assert_eq!(shard_of(b"x", 1), 0);
    }

    #[test]
    fn extractors_pick_the_right_bytes() {
        let k = Bytes::from_static(b"k");
        let v = Bytes::from_static(br#"{"user":{"id":42,"name":"ann"}}"#);
        assert_eq!(extract_key(&KeyExtractor::Key, &k, &v).unwrap(), "k");
        assert_eq!(
            extract_key(&KeyExtractor::Json("/user/id".into()), &k, &v).unwrap(),
            "42"
        );
        assert_eq!(
            extract_key(&KeyExtractor::Json("/user/name".into()), &k, &v).unwrap(),
            "ann"
        );
        assert!(extract_key(&KeyExtractor::Json("/nope".into()), &k, &v).is_err());
        let csv = Bytes::from_static(b"a;b;c");
        let f = KeyExtractor::Field {
            index: 2,
            delimiter: ";".into(),
        };
        assert_eq!(extract_key(&f, &k, &csv).unwrap(), "c");
        let f = KeyExtractor::Field {
            index: 3,
            delimiter: ";".into(),
        };
        assert!(extract_key(&f, &k, &csv)
            .unwrap_err()
            .contains("fewer than 4"));
    }
}
