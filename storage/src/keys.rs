//! Order-preserving key encoding (a tuple layer, as FoundationDB's).
//!
//! Integers are big-endian (signed ones with the sign bit flipped), byte
//! strings are escaped (`0x00` -> `0x00 0xFF`) and terminated by `0x00 0x01`,
//! so that comparing two encoded keys byte by byte compares their tuples
//! element by element, and no encoded element is a prefix of another.

/// A key that cannot be decoded: the bytes do not match the expected shape.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed storage key at byte {offset}: {what}")]
pub struct KeyError {
    /// Where decoding stopped.
    pub offset: usize,
    /// What was expected.
    pub what: &'static str,
}

/// Appends tuple elements to a key buffer.
///
/// ```
/// use millrace_storage::{KeyReader, KeyWriter};
/// let key = KeyWriter::new().str("count").u32(7).bytes(b"a\0b").finish();
/// let mut r = KeyReader::new(&key);
/// assert_eq!(r.str().unwrap(), "count");
/// assert_eq!(r.u32().unwrap(), 7);
/// assert_eq!(r.bytes().unwrap(), b"a\0b");
/// ```
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KeyWriter {
    buf: Vec<u8>,
}

impl KeyWriter {
    /// An empty key.
    pub fn new() -> Self {
        Self::default()
    }

    /// Continues an existing prefix.
    pub fn from_prefix(prefix: &[u8]) -> Self {
        KeyWriter {
            buf: prefix.to_vec(),
        }
    }

    /// A big-endian u32.
    pub fn u32(mut self, v: u32) -> Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// A big-endian u64.
    pub fn u64(mut self, v: u64) -> Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// A signed i64, ordered as numbers are.
    pub fn i64(mut self, v: i64) -> Self {
        self.buf
            .extend_from_slice(&((v as u64) ^ (1 << 63)).to_be_bytes());
        self
    }

    /// One tag byte (for sub-spaces of a shard's range).
    pub fn tag(mut self, t: u8) -> Self {
        self.buf.push(t);
        self
    }

    /// An escaped, terminated byte string.
    pub fn bytes(mut self, b: &[u8]) -> Self {
        push_escaped(&mut self.buf, b);
        self
    }

    /// An escaped, terminated UTF-8 string.
    pub fn str(self, s: &str) -> Self {
        self.bytes(s.as_bytes())
    }

    /// The encoded key.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Appends `b` escaped and terminated to `buf` (the hot-path form of
/// [`KeyWriter::bytes`], reusing a buffer).
pub fn push_escaped(buf: &mut Vec<u8>, b: &[u8]) {
    buf.reserve(b.len() + 2);
    // Copies the runs between zero bytes whole; keys rarely hold any.
    let mut rest = b;
    while let Some(i) = rest.iter().position(|&byte| byte == 0) {
        buf.extend_from_slice(&rest[..=i]);
        buf.push(0xFF);
        rest = &rest[i + 1..];
    }
    buf.extend_from_slice(rest);
    buf.extend_from_slice(&[0x00, 0x01]);
}

/// Reads tuple elements back, in the order they were written.
#[derive(Debug)]
pub struct KeyReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> KeyReader<'a> {
    /// Starts at the beginning of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        KeyReader { buf, pos: 0 }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], KeyError> {
        let end = self.pos + n;
        let slice = self.buf.get(self.pos..end).ok_or(KeyError {
            offset: self.pos,
            what,
        })?;
        self.pos = end;
        Ok(slice)
    }

    /// A big-endian u32.
    pub fn u32(&mut self) -> Result<u32, KeyError> {
        let b = self.take(4, "a u32")?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A big-endian u64.
    pub fn u64(&mut self) -> Result<u64, KeyError> {
        let b = self.take(8, "a u64")?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A signed i64.
    pub fn i64(&mut self) -> Result<i64, KeyError> {
        Ok((self.u64()? ^ (1 << 63)) as i64)
    }

    /// One tag byte.
    pub fn tag(&mut self) -> Result<u8, KeyError> {
        Ok(self.take(1, "a tag byte")?[0])
    }

    /// An escaped byte string.
    pub fn bytes(&mut self) -> Result<Vec<u8>, KeyError> {
        let mut out = Vec::new();
        loop {
            let b = self.take(1, "a terminated byte string")?[0];
            if b != 0 {
                out.push(b);
                continue;
            }
            match self.take(1, "an escape or terminator after 0x00")?[0] {
                0xFF => out.push(0),
                0x01 => return Ok(out),
                _ => {
                    return Err(KeyError {
                        offset: self.pos - 1,
                        what: "0xFF or 0x01 after 0x00",
                    })
                }
            }
        }
    }

    /// An escaped UTF-8 string.
    pub fn str(&mut self) -> Result<String, KeyError> {
        let at = self.pos;
        String::from_utf8(self.bytes()?).map_err(|_| KeyError {
            offset: at,
            what: "UTF-8 text",
        })
    }

    /// The bytes not read yet.
    pub fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }
}

/// The smallest key greater than every key starting with `prefix`, for range
/// scans and range deletes; `None` when no such key exists (all `0xFF`).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
    enum El {
        U(u64),
        I(i64),
        B(Vec<u8>),
    }

    fn el() -> impl Strategy<Value = El> {
        prop_oneof![
            any::<u64>().prop_map(El::U),
            any::<i64>().prop_map(El::I),
            proptest::collection::vec(
                prop_oneof![Just(0u8), Just(1u8), Just(0xFFu8), any::<u8>()],
                0..8
            )
            .prop_map(El::B),
        ]
    }

    /// Tuples of the same shape (the engine never compares keys of different
    /// shapes at the same position).
    fn encode(shape: &[u8], t: &[El]) -> Vec<u8> {
        let mut w = KeyWriter::new();
        for (s, e) in shape.iter().zip(t) {
            w = match (s, e) {
                (0, El::U(v)) => w.u64(*v),
                (1, El::I(v)) => w.i64(*v),
                (_, El::B(v)) => w.bytes(v),
                _ => unreachable!(),
            };
        }
        w.finish()
    }

    fn tuple_of(shape: Vec<u8>) -> impl Strategy<Value = Vec<El>> {
        shape
            .into_iter()
            .map(|s| match s {
                0 => any::<u64>().prop_map(El::U).boxed(),
                1 => any::<i64>().prop_map(El::I).boxed(),
                _ => el().prop_filter("bytes", |e| matches!(e, El::B(_))).boxed(),
            })
            .collect::<Vec<_>>()
    }

    proptest! {
        #[test]
        fn encoding_preserves_tuple_order(
            (shape, a, b) in proptest::collection::vec(0u8..3, 1..4).prop_flat_map(|shape| {
                (Just(shape.clone()), tuple_of(shape.clone()), tuple_of(shape))
            })
        ) {
            let (ka, kb) = (encode(&shape, &a), encode(&shape, &b));
            prop_assert_eq!(a.cmp(&b), ka.cmp(&kb));
        }

        #[test]
        fn bytes_round_trip(v in proptest::collection::vec(any::<u8>(), 0..64), n in any::<i64>()) {
            let key = KeyWriter::new().bytes(&v).i64(n).finish();
            let mut r = KeyReader::new(&key);
            prop_assert_eq!(r.bytes().unwrap(), v);
            prop_assert_eq!(r.i64().unwrap(), n);
            prop_assert!(r.rest().is_empty());
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_reader(v in proptest::collection::vec(any::<u8>(), 0..32)) {
            let mut r = KeyReader::new(&v);
            let _ = r.str();
            let _ = r.u64();
        }
    }

    #[test]
    fn prefix_end_bounds_the_prefix() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xFF]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xFF, 0xFF]), None);
    }
}
