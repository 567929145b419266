//! Authentication of every frame after the handshake (see [`super::frame`]):
//! each direction of a connection has its own key, derived from the cluster
//! secret, both handshake nonces and the sender's worker id, so a key is
//! good for one connection and one direction only. The sender ends each
//! write with a `Seal` frame: the HMAC-SHA256 of a running count of seals
//! and of the frames' bytes since the previous one. The reader takes frames
//! in only once their seal checks: a frame injected into or altered on the
//! way, a segment replayed or dropped, makes the next seal fail.

use super::frame::{Frame, MAC_LEN};
use bytes::BytesMut;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

fn keyed(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length.
    <HmacSha256 as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"))
}

/// The keys of one connection, as one side sees it.
pub(crate) struct SessionKeys {
    /// Seals what this side writes.
    pub send: [u8; MAC_LEN],
    /// Checks what this side reads.
    pub recv: [u8; MAC_LEN],
}

impl SessionKeys {
    /// Derives both directions' keys of a connection whose handshake used
    /// these nonces (the acceptor's challenge, the dialer's hello).
    pub fn derive(secret: &[u8], me: &str, peer: &str, challenge: u64, hello: u64) -> Self {
        let key = |from: &str| -> [u8; MAC_LEN] {
            let mut m = keyed(secret);
            m.update(b"millrace frame seal v1\0");
            m.update(from.as_bytes());
            m.update(&[0]);
            m.update(&challenge.to_be_bytes());
            m.update(&hello.to_be_bytes());
            m.finalize().into_bytes().into()
        };
        SessionKeys {
            send: key(me),
            recv: key(peer),
        }
    }
}

/// Seals what one side writes.
pub(crate) struct Sealer {
    key: HmacSha256,
    count: u64,
}

impl Sealer {
    pub fn new(key: &[u8; MAC_LEN]) -> Self {
        Sealer {
            key: keyed(key),
            count: 0,
        }
    }

    /// Appends the seal of everything in `wire` (the frames of one write).
    pub fn seal(&mut self, wire: &mut BytesMut) {
        let mut m = self.key.clone();
        m.update(&self.count.to_be_bytes());
        m.update(wire);
        self.count += 1;
        Frame::Seal {
            mac: m.finalize().into_bytes().into(),
        }
        .encode(wire);
    }
}

/// Checks what one side reads.
pub(crate) struct Opener {
    key: HmacSha256,
    running: HmacSha256,
    count: u64,
}

impl Opener {
    pub fn new(key: &[u8; MAC_LEN]) -> Self {
        let key = keyed(key);
        let mut running = key.clone();
        running.update(&0u64.to_be_bytes());
        Opener {
            key,
            running,
            count: 0,
        }
    }

    /// Takes in one frame's bytes (header included), not yet trusted.
    pub fn absorb(&mut self, raw: &[u8]) {
        self.running.update(raw);
    }

    /// Whether `mac` seals the frames absorbed since the last seal; then
    /// starts the next segment.
    pub fn check(&mut self, mac: &[u8; MAC_LEN]) -> bool {
        self.count += 1;
        let mut next = self.key.clone();
        next.update(&self.count.to_be_bytes());
        let done = std::mem::replace(&mut self.running, next);
        done.verify_slice(mac).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `frames` as one sealed write.
    fn sealed(sealer: &mut Sealer, frames: &[Frame]) -> BytesMut {
        let mut wire = BytesMut::new();
        for f in frames {
            f.encode(&mut wire);
        }
        sealer.seal(&mut wire);
        wire
    }

    /// Reads sealed writes; returns the frames of each segment whose seal
    /// checked, and stops at the first that does not.
    fn open(opener: &mut Opener, mut wire: BytesMut) -> Result<Vec<Frame>, Vec<Frame>> {
        let (mut taken, mut pending) = (Vec::new(), Vec::new());
        while let Some(raw) = Frame::take_raw(&mut wire).unwrap() {
            match Frame::parse_raw(raw.clone()).unwrap() {
                Frame::Seal { mac } => {
                    if !opener.check(&mac) {
                        return Err(taken);
                    }
                    taken.append(&mut pending);
                }
                f => {
                    opener.absorb(&raw);
                    pending.push(f);
                }
            }
        }
        Ok(taken)
    }

    fn keys() -> (SessionKeys, SessionKeys) {
        (
            SessionKeys::derive(b"secret-secret-secret", "w1", "w0", 7, 9),
            SessionKeys::derive(b"secret-secret-secret", "w0", "w1", 7, 9),
        )
    }

    #[test]
    fn sealed_writes_open_and_forged_or_replayed_ones_do_not() {
        let (dialer, acceptor) = (keys().0, keys().1);
        assert_eq!(dialer.send, acceptor.recv);
        assert_ne!(dialer.send, dialer.recv, "each direction has its own key");
        let ack = |upto| Frame::Ack { ch: 3, upto };
        let mut sealer = Sealer::new(&dialer.send);
        let first = sealed(&mut sealer, &[ack(1), ack(2)]);
        let second = sealed(&mut sealer, &[ack(3)]);

        let mut both = first.clone();
        both.extend_from_slice(&second);
        assert_eq!(
            open(&mut Opener::new(&acceptor.recv), both),
            Ok(vec![ack(1), ack(2), ack(3)])
        );

        // A frame injected with a valid length and checksum.
        let mut forged = BytesMut::new();
        ack(99).encode(&mut forged);
        forged.extend_from_slice(&first);
        assert_eq!(open(&mut Opener::new(&acceptor.recv), forged), Err(vec![]));

        // A segment replayed, or one dropped.
        let mut replayed = first.clone();
        replayed.extend_from_slice(&first);
        assert_eq!(
            open(&mut Opener::new(&acceptor.recv), replayed),
            Err(vec![ack(1), ack(2)])
        );
        assert_eq!(open(&mut Opener::new(&acceptor.recv), second), Err(vec![]));

        // The other direction's key, or another connection's.
        let other = SessionKeys::derive(b"secret-secret-secret", "w0", "w1", 7, 10);
        assert_eq!(
            open(&mut Opener::new(&other.recv), first.clone()),
            Err(vec![])
        );
        assert_eq!(open(&mut Opener::new(&dialer.recv), first), Err(vec![]));
    }
}
