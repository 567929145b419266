//! Records, timers, and the envelope a record travels in.

use bytes::{BufMut, Bytes, BytesMut};

/// Event time: microseconds since the Unix epoch.
pub type EventTime = i64;

/// The earliest event time: "nothing is known yet".
pub const MIN_TIME: EventTime = i64::MIN;
/// The latest event time: "no more data will ever come".
pub const MAX_TIME: EventTime = i64::MAX;

/// The earliest event time a record may carry: 0001-01-01T00:00:00Z.
pub const EARLIEST_EVENT_TIME: EventTime = -62_135_596_800_000_000;
/// The latest event time a record may carry: 9999-12-31T23:59:59.999999Z.
/// Far from `MAX_TIME`, which means "no more data will ever come".
pub const LATEST_EVENT_TIME: EventTime = 253_402_300_799_999_999;

/// Whether `t` is an event time a record may carry (years 1 to 9999). A
/// record outside is a bad record: its time would move a watermark to the
/// end of time or overflow window arithmetic.
pub fn is_valid_event_time(t: EventTime) -> bool {
    (EARLIEST_EVENT_TIME..=LATEST_EVENT_TIME).contains(&t)
}

/// Parses a decimal number of time units (`"4.35"`, `"-12"`, `"1.7e3"`)
/// into microseconds, exactly: no detour through floating point, so
/// `4.35` s is 4,350,000 us. A fraction of a microsecond rounds down. A value
/// too large for an event time saturates (and is then refused by
/// [`is_valid_event_time`]).
///
/// ```
/// use millrace_engine::parse_event_time;
/// assert_eq!(parse_event_time("4.35", 1_000_000), Ok(4_350_000));
/// assert_eq!(parse_event_time("1.5e3", 1_000), Ok(1_500_000));
/// assert_eq!(parse_event_time("-0.0015", 1_000), Ok(-2));
/// assert!(parse_event_time("12abc", 1_000).is_err());
/// ```
pub fn parse_event_time(text: &str, micros_per_unit: i64) -> Result<EventTime, String> {
    let t = text.trim();
    let bad = || format!("`{t}` is not a number");
    let (negative, rest) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (mantissa, exp) = match rest.find(['e', 'E']) {
        Some(i) => (&rest[..i], rest[i + 1..].parse::<i32>().map_err(|_| bad())?),
        None => (rest, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int.is_empty() && frac.is_empty()
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    // Digits past what an i128 holds add nothing a microsecond can show.
    let mut digits: i128 = 0;
    let mut scale = exp;
    for (i, b) in int.bytes().chain(frac.bytes()).enumerate() {
        let fraction = i >= int.len();
        if digits < 10i128.pow(29) {
            digits = digits * 10 + i128::from(b - b'0');
            if fraction {
                scale = scale.saturating_sub(1);
            }
        } else if !fraction {
            // Too many digits to keep: keep the magnitude, drop the precision.
            scale = scale.saturating_add(1);
        }
    }
    let mut v = digits.saturating_mul(i128::from(micros_per_unit));
    if negative {
        v = -v;
    }
    if v != 0 {
        if scale > 0 {
            for _ in 0..scale.min(40) {
                v = v.saturating_mul(10);
            }
        } else if scale < 0 {
            let div = 10i128
                .checked_pow(scale.unsigned_abs())
                .unwrap_or(i128::MAX);
            v = v.div_euclid(div);
        }
    }
    Ok(v.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64)
}

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
