//! Records, timers, and the envelope a record travels in.

use bytes::{BufMut, Bytes, BytesMut};

/// Event time: microseconds since the Unix epoch.
pub type EventTime = i64;

/// The earliest event time: "nothing is known yet".
pub const MIN_TIME: EventTime = i64::MIN;
/// The latest event time: "no more data will ever come".
pub const MAX_TIME: EventTime = i64::MAX;

/// One record: a key, a value and an event timestamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The key the consumer extracted (its state is the state of this key).
    pub key: Bytes,
    /// The payload.
    pub value: Bytes,
    /// Event time, microseconds since the Unix epoch.
    pub timestamp: EventTime,
}

/// Which clock a timer follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TimeDomain {
    /// Fires when the shard's input low watermark passes the timer's time.
    EventTime,
    /// Fires when the wall clock passes the timer's time.
    ProcessingTime,
}

impl TimeDomain {
    pub(crate) fn tag(self) -> u8 {
        match self {
            TimeDomain::EventTime => b'e',
            TimeDomain::ProcessingTime => b'p',
        }
    }
}

/// A timer that fired, handed to `Computation::process_timer` with its key current.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timer {
    /// The tag given to `set_timer`; one timer per (key, tag).
    pub tag: Bytes,
    /// Its clock.
    pub domain: TimeDomain,
    /// When it was set to fire.
    pub time: EventTime,
}

/// The wire and outbox form of a record: `ts i64 | ingest i64 | key_len u32 | key | value`,
/// little-endian. `ingest` is when the record's ancestor entered the graph, for
/// end-to-end latency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope(pub Bytes);

/// A malformed envelope (from a corrupt outbox entry or frame).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed record envelope: {0}")]
pub struct EnvelopeError(&'static str);

const HEADER: usize = 8 + 8 + 4;

impl Envelope {
    /// Encodes a record.
    pub fn encode(key: &[u8], value: &[u8], ts: EventTime, ingest: i64) -> Envelope {
        let mut b = BytesMut::with_capacity(HEADER + key.len() + value.len());
        b.put_i64_le(ts);
        b.put_i64_le(ingest);
        b.put_u32_le(key.len() as u32);
        b.put_slice(key);
        b.put_slice(value);
        Envelope(b.freeze())
    }

    /// Checks the shape of bytes read from storage or the network.
    pub fn from_bytes(bytes: Bytes) -> Result<Envelope, EnvelopeError> {
        if bytes.len() < HEADER {
            return Err(EnvelopeError("shorter than its header"));
        }
        let key_len = u32::from_le_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]) as usize;
        if bytes.len() - HEADER < key_len {
            return Err(EnvelopeError("key length past the end"));
        }
        Ok(Envelope(bytes))
    }

    /// Event time.
    pub fn timestamp(&self) -> EventTime {
        i64::from_le_bytes(self.0[0..8].try_into().unwrap_or([0; 8]))
    }

    /// Ingestion time (microseconds since the epoch).
    pub fn ingest(&self) -> i64 {
        i64::from_le_bytes(self.0[8..16].try_into().unwrap_or([0; 8]))
    }

    fn key_len(&self) -> usize {
        u32::from_le_bytes(self.0[16..20].try_into().unwrap_or([0; 4])) as usize
    }

    /// The record, sharing the envelope's memory.
    pub fn record(&self) -> Record {
        let k = self.key_len();
        Record {
            key: self.0.slice(HEADER..HEADER + k),
            value: self.0.slice(HEADER + k..),
            timestamp: self.timestamp(),
        }
    }

    /// Encoded size in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never true: an envelope always has a header.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Microseconds since the Unix epoch, now.
pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn envelope_round_trips(key in proptest::collection::vec(any::<u8>(), 0..40),
                                value in proptest::collection::vec(any::<u8>(), 0..40),
                                ts in any::<i64>(), ingest in any::<i64>()) {
            let e = Envelope::encode(&key, &value, ts, ingest);
            let e = Envelope::from_bytes(e.0).unwrap();
            let r = e.record();
            prop_assert_eq!(&r.key[..], &key[..]);
            prop_assert_eq!(&r.value[..], &value[..]);
            prop_assert_eq!(r.timestamp, ts);
            prop_assert_eq!(e.ingest(), ingest);
        }

        #[test]
        fn arbitrary_bytes_are_checked_not_trusted(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(e) = Envelope::from_bytes(Bytes::from(b)) {
                let _ = e.record();
            }
        }
    }
}
