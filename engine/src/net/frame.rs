//! The wire format between workers: `length u32 | crc32 u32 | kind u8 | payload`,
//! big-endian, where `length` counts the kind byte and the payload and the
//! CRC-32 covers them. A frame with a bad length, checksum, kind or payload is
//! an error for the connection that carried it (it is closed and counted); the
//! decoder never panics on any input.
//!
//! After the handshake every write ends with a `Seal`: the HMAC-SHA256, under
//! a key of the session and of the direction, of a running count of seals
//! and of every frame since the previous seal. The reader acts on frames only
//! once their seal checks, so a frame injected, altered, dropped or replayed
//! on the way is refused (and counted) with the connection that carried it.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Header bytes before the kind: length and checksum.
pub const HEADER_LEN: usize = 8;
/// The largest `length` accepted (kind + payload).
pub const MAX_FRAME: usize = 16 << 20;

// The largest record a topology may allow crosses in one frame.
const _: () = assert!(millrace_config::MAX_RECORD_BYTES + (1 << 20) <= MAX_FRAME);
/// Length of a handshake MAC (HMAC-SHA256).
pub const MAC_LEN: usize = 32;

/// One message between two workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// First frame, from the accepting worker: who it is, its shard epochs,
    /// and a nonce the dialer must sign.
    Challenge(Greeting),
    /// The dialer's answer: who it is, its epochs, its own nonce, and the MAC
    /// over the acceptor's nonce.
    Hello(Greeting),
    /// The acceptor took the dialer; `mac` signs the dialer's nonce.
    Welcome {
        /// HMAC-SHA256 of the dialer's nonce and the acceptor's greeting.
        mac: [u8; MAC_LEN],
    },
    /// The acceptor refused the dialer (then closes the connection).
    Refused {
        /// Why, for the dialer's log.
        reason: String,
    },
    /// Production `seq` of channel `ch`.
    Deliver {
        /// Plan channel index.
        ch: u32,
        /// Sequence number within the channel.
        seq: u64,
        /// The record (its shape checked when decoded).
        env: crate::record::Envelope,
    },
    /// The consumer of `ch` applied (and committed) everything up to `upto`.
    Ack {
        /// Plan channel index.
        ch: u32,
        /// Highest applied sequence number.
        upto: u64,
    },
    /// Shard `from`'s output watermark rose to `wm` (or it became idle or
    /// active again).
    Watermark {
        /// Plan shard index.
        from: u32,
        /// Microseconds since the epoch.
        wm: i64,
        /// The shard is idle: its consumers leave it out of their minimum.
        idle: bool,
    },
    /// Periodic liveness and completion report.
    Status(Status),
    /// Authenticates the frames since the previous seal (see the module doc).
    Seal {
        /// HMAC-SHA256 of the seal count and those frames' bytes.
        mac: [u8; MAC_LEN],
    },
}

/// What a worker reports about itself every heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Status {
    /// Every shard of the sender has its output watermark at the end of time.
    pub done: bool,
    /// The sender has seen every worker done and will exit.
    pub finished: bool,
    /// The sender is draining (SIGTERM): its sources are stopped.
    pub stopping: bool,
    /// The sender is draining and everything it produced is acknowledged.
    pub drained: bool,
}

impl Status {
    fn flags(self) -> u8 {
        u8::from(self.done)
            | u8::from(self.finished) << 1
            | u8::from(self.stopping) << 2
            | u8::from(self.drained) << 3
    }

    fn from_flags(f: u8) -> Status {
        Status {
            done: f & 1 != 0,
            finished: f & 2 != 0,
            stopping: f & 4 != 0,
            drained: f & 8 != 0,
        }
    }
}

/// What a worker says about itself in a handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// The sender's worker id.
    pub worker: String,
    /// Fingerprint of the sender's plan; both sides must run the same topology.
    pub topology: u64,
    /// `(shard, epoch)` of every shard the sender owns.
    pub epochs: Vec<(u32, u64)>,
    /// Random number the other side signs.
    pub nonce: u64,
    /// Random id of the sender's process, fixed for its life: two processes
    /// claiming the same epochs are told apart by it.
    pub incarnation: u64,
    /// In a `Hello`: HMAC-SHA256 over the acceptor's nonce and this greeting.
    /// All zeros in a `Challenge`.
    pub mac: [u8; MAC_LEN],
}

/// Why bytes could not be decoded as a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length field is zero or above [`MAX_FRAME`].
    #[error("bad frame length {0}")]
    BadLength(u32),
    /// The CRC-32 does not match.
    #[error("frame checksum mismatch (expected {expected:#010x}, got {got:#010x})")]
    BadChecksum {
        /// As computed over the received bytes.
        expected: u32,
        /// As the frame said.
        got: u32,
    },
    /// Unknown kind byte.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// The payload does not have the shape of its kind.
    #[error("malformed {kind} frame: {what}")]
    Malformed {
        /// The frame kind.
        kind: &'static str,
        /// What is wrong.
        what: &'static str,
    },
}

const CHALLENGE: u8 = 1;
const HELLO: u8 = 2;
const WELCOME: u8 = 3;
const REFUSED: u8 = 4;
const DELIVER: u8 = 5;
const ACK: u8 = 6;
const WATERMARK: u8 = 7;
const STATUS: u8 = 8;
const SEAL: u8 = 9;

impl Frame {
    fn kind(&self) -> u8 {
        match self {
            Frame::Challenge(_) => CHALLENGE,
            Frame::Hello(_) => HELLO,
            Frame::Welcome { .. } => WELCOME,
            Frame::Refused { .. } => REFUSED,
            Frame::Deliver { .. } => DELIVER,
            Frame::Ack { .. } => ACK,
            Frame::Watermark { .. } => WATERMARK,
            Frame::Status(_) => STATUS,
            Frame::Seal { .. } => SEAL,
        }
    }

    /// Appends this frame to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_u32(0);
        out.put_u32(0);
        out.put_u8(self.kind());
        match self {
            Frame::Challenge(g) | Frame::Hello(g) => {
                put_str(out, &g.worker);
                out.put_u64(g.topology);
                out.put_u32(g.epochs.len() as u32);
                for (shard, epoch) in &g.epochs {
                    out.put_u32(*shard);
                    out.put_u64(*epoch);
                }
                out.put_u64(g.nonce);
                out.put_u64(g.incarnation);
                out.put_slice(&g.mac);
            }
            Frame::Welcome { mac } => out.put_slice(mac),
            Frame::Refused { reason } => put_str(out, reason),
            Frame::Deliver { ch, seq, env } => {
                out.put_u32(*ch);
                out.put_u64(*seq);
                out.put_slice(&env.0);
            }
            Frame::Ack { ch, upto } => {
                out.put_u32(*ch);
                out.put_u64(*upto);
            }
            Frame::Watermark { from, wm, idle } => {
                out.put_u32(*from);
                out.put_i64(*wm);
                out.put_u8(u8::from(*idle));
            }
            Frame::Status(st) => out.put_u8(st.flags()),
            Frame::Seal { mac } => out.put_slice(mac),
        }
        let body = &out[start + HEADER_LEN..];
        let len = body.len() as u32;
        let crc = crc32fast::hash(body);
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
        out[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
    }

    /// Takes one whole frame off the front of `buf`: `Ok(None)` until enough
    /// bytes have arrived; an error for bytes that can never be a frame (the
    /// connection must then be dropped: the stream has lost its framing).
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match Frame::take_raw(buf)? {
            Some(raw) => Frame::parse_raw(raw).map(Some),
            None => Ok(None),
        }
    }

    /// Takes one whole frame's bytes (header included, checksum checked) off
    /// the front of `buf`, for a reader that authenticates them before it
    /// parses them with [`Frame::parse_raw`].
    pub fn take_raw(buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        if len == 0 || len as usize > MAX_FRAME {
            return Err(FrameError::BadLength(len));
        }
        let total = HEADER_LEN + len as usize;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        let got = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
        let expected = crc32fast::hash(&buf[HEADER_LEN..total]);
        if got != expected {
            return Err(FrameError::BadChecksum { expected, got });
        }
        Ok(Some(buf.split_to(total).freeze()))
    }

    /// Parses the bytes [`Frame::take_raw`] returned.
    pub fn parse_raw(mut raw: Bytes) -> Result<Frame, FrameError> {
        raw.advance(HEADER_LEN);
        let kind = raw.get_u8();
        parse(kind, raw)
    }
}

fn put_str(out: &mut BytesMut, s: &str) {
    out.put_u32(s.len() as u32);
    out.put_slice(s.as_bytes());
}

/// A cursor over a payload that reports a short payload as an error.
struct Payload {
    b: Bytes,
    kind: &'static str,
}

impl Payload {
    fn need(&self, n: usize) -> Result<(), FrameError> {
        if self.b.remaining() < n {
            Err(self.bad("shorter than its fields"))
        } else {
            Ok(())
        }
    }
    fn bad(&self, what: &'static str) -> FrameError {
        FrameError::Malformed {
            kind: self.kind,
            what,
        }
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        self.need(1)?;
        Ok(self.b.get_u8())
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        self.need(4)?;
        Ok(self.b.get_u32())
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        self.need(8)?;
        Ok(self.b.get_u64())
    }
    fn i64(&mut self) -> Result<i64, FrameError> {
        self.need(8)?;
        Ok(self.b.get_i64())
    }
    fn mac(&mut self) -> Result<[u8; MAC_LEN], FrameError> {
        self.need(MAC_LEN)?;
        let mut m = [0; MAC_LEN];
        self.b.copy_to_slice(&mut m);
        Ok(m)
    }
    fn string(&mut self) -> Result<String, FrameError> {
        let n = self.u32()? as usize;
        self.need(n)?;
        String::from_utf8(self.b.split_to(n).to_vec()).map_err(|_| self.bad("text is not UTF-8"))
    }
    fn end<T>(self, v: T) -> Result<T, FrameError> {
        if self.b.has_remaining() {
            Err(self.bad("bytes past its fields"))
        } else {
            Ok(v)
        }
    }
}

fn parse(kind: u8, body: Bytes) -> Result<Frame, FrameError> {
    let name = match kind {
        CHALLENGE => "challenge",
        HELLO => "hello",
        WELCOME => "welcome",
        REFUSED => "refused",
        DELIVER => "deliver",
        ACK => "ack",
        WATERMARK => "watermark",
        STATUS => "status",
        SEAL => "seal",
        other => return Err(FrameError::UnknownKind(other)),
    };
    let mut p = Payload {
        b: body,
        kind: name,
    };
    match kind {
        CHALLENGE | HELLO => {
            let worker = p.string()?;
            let topology = p.u64()?;
            let n = p.u32()? as usize;
            // Each entry is 12 bytes: refuse a count the payload cannot hold
            // before allocating for it.
            p.need(n.saturating_mul(12))?;
            let mut epochs = Vec::with_capacity(n);
            for _ in 0..n {
                epochs.push((p.u32()?, p.u64()?));
            }
            let g = Greeting {
                worker,
                topology,
                epochs,
                nonce: p.u64()?,
                incarnation: p.u64()?,
                mac: p.mac()?,
            };
            p.end(if kind == CHALLENGE {
                Frame::Challenge(g)
            } else {
                Frame::Hello(g)
            })
        }
        WELCOME => {
            let mac = p.mac()?;
            p.end(Frame::Welcome { mac })
        }
        REFUSED => {
            let reason = p.string()?;
            p.end(Frame::Refused { reason })
        }
        DELIVER => {
            let ch = p.u32()?;
            let seq = p.u64()?;
            let env = crate::record::Envelope::from_bytes(std::mem::take(&mut p.b))
                .map_err(|_| p.bad("record envelope"))?;
            Ok(Frame::Deliver { ch, seq, env })
        }
        ACK => {
            let (ch, upto) = (p.u32()?, p.u64()?);
            p.end(Frame::Ack { ch, upto })
        }
        SEAL => {
            let mac = p.mac()?;
            p.end(Frame::Seal { mac })
        }
        WATERMARK => {
            let (from, wm) = (p.u32()?, p.i64()?);
            let idle = match p.u8()? {
                0 => false,
                1 => true,
                _ => return Err(p.bad("idle flag")),
            };
            p.end(Frame::Watermark { from, wm, idle })
        }
        _ => {
            let flags = p.u8()?;
            if flags > 15 {
                return Err(p.bad("unknown flags"));
            }
            p.end(Frame::Status(Status::from_flags(flags)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn greeting() -> impl Strategy<Value = Greeting> {
        (
            "[a-z0-9-]{0,12}",
            any::<u64>(),
            proptest::collection::vec((any::<u32>(), any::<u64>()), 0..6),
            any::<(u64, u64)>(),
            any::<[u8; MAC_LEN]>(),
        )
            .prop_map(
                |(worker, topology, epochs, (nonce, incarnation), mac)| Greeting {
                    worker,
                    topology,
                    epochs,
                    nonce,
                    incarnation,
                    mac,
                },
            )
    }

    fn frame() -> impl Strategy<Value = Frame> {
        let env = (
            proptest::collection::vec(any::<u8>(), 0..24),
            proptest::collection::vec(any::<u8>(), 0..64),
            any::<i64>(),
            any::<i64>(),
        )
            .prop_map(|(k, v, ts, ing)| crate::record::Envelope::encode(&k, &v, ts, ing));
        prop_oneof![
            greeting().prop_map(Frame::Challenge),
            greeting().prop_map(Frame::Hello),
            any::<[u8; MAC_LEN]>().prop_map(|mac| Frame::Welcome { mac }),
            ".{0,40}".prop_map(|reason| Frame::Refused { reason }),
            (any::<u32>(), any::<u64>(), env).prop_map(|(ch, seq, env)| Frame::Deliver {
                ch,
                seq,
                env
            }),
            (any::<u32>(), any::<u64>()).prop_map(|(ch, upto)| Frame::Ack { ch, upto }),
            (any::<u32>(), any::<i64>(), any::<bool>())
                .prop_map(|(from, wm, idle)| Frame::Watermark { from, wm, idle }),
            // Built from its fields, so the round trip checks both directions.
            any::<[bool; 4]>().prop_map(|[done, finished, stopping, drained]| {
                Frame::Status(Status {
                    done,
                    finished,
                    stopping,
                    drained,
                })
            }),
            any::<[u8; MAC_LEN]>().prop_map(|mac| Frame::Seal { mac }),
        ]
    }

    proptest! {
        /// decode(encode(x)) == x, for a stream of frames cut at any point.
        #[test]
        fn frames_round_trip(frames in proptest::collection::vec(frame(), 1..8), cut in any::<prop::sample::Index>()) {
            let mut wire = BytesMut::new();
            for f in &frames {
                f.encode(&mut wire);
            }
            let wire = wire.freeze();
            let cut = cut.index(wire.len() + 1);
            let mut buf = BytesMut::from(&wire[..cut]);
            let mut got = Vec::new();
            while let Some(f) = Frame::decode(&mut buf).unwrap() {
                got.push(f);
            }
            buf.extend_from_slice(&wire[cut..]);
            while let Some(f) = Frame::decode(&mut buf).unwrap() {
                got.push(f);
            }
            prop_assert_eq!(got, frames);
            prop_assert!(buf.is_empty());
        }

        /// Arbitrary bytes give frames or errors, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = Frame::decode(&mut buf) {}
        }

        /// Arbitrary bodies behind a valid length and checksum (what an
        /// attacker who frames correctly sends, and what raw arbitrary bytes
        /// almost never reach): each decodes to a frame that encodes back to
        /// the same bytes, or is an error; never a panic.
        #[test]
        fn framed_arbitrary_bodies_decode_exactly_or_fail(
            kind in 0u8..12,
            body in proptest::collection::vec(any::<u8>(), 0..96),
        ) {
            let mut payload = vec![kind];
            payload.extend_from_slice(&body);
            let mut wire = BytesMut::new();
            wire.put_u32(payload.len() as u32);
            wire.put_u32(crc32fast::hash(&payload));
            wire.extend_from_slice(&payload);
            let sent = wire.clone();
            if let Ok(Some(f)) = Frame::decode(&mut wire) {
                let mut again = BytesMut::new();
                f.encode(&mut again);
                prop_assert_eq!(&again[..], &sent[..], "{:?} is not what was sent", f);
                prop_assert!(wire.is_empty());
            }
        }

        /// Any flipped bit in a frame is caught (by the length or the checksum).
        #[test]
        fn a_flipped_bit_is_caught(f in frame(), bit in any::<prop::sample::Index>()) {
            let mut wire = BytesMut::new();
            f.encode(&mut wire);
            let bit = bit.index(wire.len() * 8);
            wire[bit / 8] ^= 1 << (bit % 8);
            let mut buf = wire.clone();
            match Frame::decode(&mut buf) {
                Err(_) | Ok(None) => {}
                Ok(Some(g)) => prop_assert!(false, "corrupt frame decoded as {:?}", g),
            }
        }
    }

    #[test]
    fn a_frame_of_the_largest_length_is_awaited_and_room_is_made_for_it() {
        let mut header = BytesMut::new();
        header.put_u32(MAX_FRAME as u32);
        header.put_u32(0);
        header.put_u8(1);
        assert_eq!(Frame::take_raw(&mut header), Ok(None), "not whole yet");
        assert!(
            header.capacity() >= HEADER_LEN + MAX_FRAME,
            "the buffer is made to hold the whole frame at once: {}",
            header.capacity()
        );
        let mut over = BytesMut::new();
        over.put_u32(MAX_FRAME as u32 + 1);
        over.put_u32(0);
        assert_eq!(
            Frame::take_raw(&mut over),
            Err(FrameError::BadLength(MAX_FRAME as u32 + 1))
        );
    }

    #[test]
    fn bad_length_and_checksum_are_errors() {
        let mut buf = BytesMut::from(&[0u8, 0, 0, 0, 0, 0, 0, 0, 1][..]);
        assert_eq!(Frame::decode(&mut buf), Err(FrameError::BadLength(0)));
        let mut buf = BytesMut::from(&[0xffu8, 0, 0, 0, 0, 0, 0, 0][..]);
        assert!(matches!(
            Frame::decode(&mut buf),
            Err(FrameError::BadLength(_))
        ));
        let mut wire = BytesMut::new();
        Frame::Ack { ch: 1, upto: 2 }.encode(&mut wire);
        wire[5] ^= 1;
        assert!(matches!(
            Frame::decode(&mut wire),
            Err(FrameError::BadChecksum { .. })
        ));
    }
}
