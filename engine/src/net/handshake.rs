//! Connecting two workers: the acceptor's and the dialer's side of the
//! handshake (secret, topology, epochs), and the session keys it ends with.

use super::frame::{Frame, Greeting, MAC_LEN};
use super::{seal, Net, HANDSHAKE_TIMEOUT, REDIAL};
use bytes::BytesMut;
use hmac::{Hmac, Mac};
use millrace_storage::Cf;
use sha2::Sha256;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

impl Net {
    pub(super) fn mac(&self, label: &str, nonce: u64, g: &Greeting) -> [u8; MAC_LEN] {
        // The key can be of any length: HMAC never rejects it.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        m.update(label.as_bytes());
        m.update(&nonce.to_be_bytes());
        m.update(g.worker.as_bytes());
        m.update(&g.topology.to_be_bytes());
        m.update(&g.incarnation.to_be_bytes());
        for (s, e) in &g.epochs {
            m.update(&s.to_be_bytes());
            m.update(&e.to_be_bytes());
        }
        m.finalize().into_bytes().into()
    }

    pub(super) fn greeting(&self, nonce: u64) -> Greeting {
        Greeting {
            worker: self.peers[self.me].id.clone(),
            topology: self.fingerprint,
            epochs: self.epochs(),
            nonce,
            incarnation: self.incarnation,
            mac: [0; MAC_LEN],
        }
    }

    pub(super) fn refuse_count(&self, reason: &str) {
        self.shared
            .metrics
            .net_refused
            .with_label_values(&[reason])
            .inc();
    }

    /// Checks a greeting from worker `w`: same topology, epochs owned by it
    /// and not below any seen before. Records the epochs on success.
    pub(super) fn check_greeting(
        &self,
        w: usize,
        g: &Greeting,
    ) -> Result<(), (&'static str, String)> {
        if g.topology != self.fingerprint {
            return Err((
                "topology",
                format!(
                    "worker `{}` runs a different topology or cluster list",
                    g.worker
                ),
            ));
        }
        let mut seen = self.seen_epochs.lock();
        for &(sid, epoch) in &g.epochs {
            // Where shards move, this worker may not have heard of a claim
            // yet: a shard it knows no owner of is taken as claimed.
            let routes = &self.shared.routes;
            if sid as usize >= self.plan.shards.len()
                || routes.owner(sid).is_some_and(|owner| owner != w)
            {
                return Err((
                    "worker",
                    format!(
                        "worker `{}` claims shard {sid}, which it does not own",
                        g.worker
                    ),
                ));
            }
            if let Some(&(had, holder)) = seen.get(&sid) {
                if epoch < had {
                    return Err((
                        "epoch",
                        format!(
                            "worker `{}` is stale: shard {sid} at epoch {epoch}, already seen at {had} (a zombie?)",
                            g.worker
                        ),
                    ));
                }
                if epoch == had && holder != 0 && holder != g.incarnation {
                    return Err((
                        "epoch",
                        format!(
                            "worker `{}`: another process already holds shard {sid} at epoch {epoch} (a zombie?)",
                            g.worker
                        ),
                    ));
                }
            }
        }
        let mut changed = Vec::new();
        for &(sid, epoch) in &g.epochs {
            let had = seen.insert(sid, (epoch, g.incarnation));
            if had.map(|(e, _)| e) != Some(epoch) {
                changed.push((sid, epoch));
            }
        }
        drop(seen);
        if !changed.is_empty() {
            let store = Arc::clone(&self.store);
            // RocksDB never runs on the runtime's threads.
            tokio::task::spawn_blocking(move || {
                let mut b = store.batch();
                for (sid, epoch) in changed {
                    b.put(
                        Cf::Meta,
                        &crate::layout::peer_epoch_key(sid),
                        &epoch.to_be_bytes(),
                    );
                }
                if let Err(e) = store.commit(b) {
                    tracing::warn!(error = %e, "could not persist peer epochs");
                }
            });
        }
        Ok(())
    }
}

pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// An authenticated connection and the bytes read past its handshake.
pub(super) struct Conn {
    pub(super) stream: TcpStream,
    pub(super) buf: BytesMut,
    pub(super) keys: seal::SessionKeys,
}

pub(super) async fn read_frame(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
) -> std::io::Result<Frame> {
    loop {
        match Frame::decode(buf) {
            Ok(Some(f)) => return Ok(f),
            Ok(None) => {}
            Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

pub(super) async fn write_frame(stream: &mut TcpStream, f: &Frame) -> std::io::Result<()> {
    let mut b = BytesMut::new();
    f.encode(&mut b);
    stream.write_all(&b).await
}

pub(super) async fn accept_loop(
    net: Arc<Net>,
    listener: TcpListener,
    accepted: Vec<mpsc::UnboundedSender<Conn>>,
) {
    let accepted = Arc::new(accepted);
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a cluster connection failed");
                tokio::time::sleep(REDIAL.0).await;
                continue;
            }
        };
        let net = Arc::clone(&net);
        let accepted = Arc::clone(&accepted);
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept_handshake(&net, stream)).await {
                Ok(Ok((w, conn))) => {
                    let _ = accepted[w].send(conn);
                }
                Ok(Err(e)) => tracing::debug!(%addr, error = %e, "cluster handshake failed"),
                Err(_) => tracing::debug!(%addr, "cluster handshake timed out"),
            }
        });
    }
}

/// The acceptor's side of the handshake; refusals are logged and counted.
pub(super) async fn accept_handshake(
    net: &Net,
    mut stream: TcpStream,
) -> std::io::Result<(usize, Conn)> {
    stream.set_nodelay(true)?;
    let nonce = random_u64();
    write_frame(&mut stream, &Frame::Challenge(net.greeting(nonce))).await?;
    let mut buf = BytesMut::with_capacity(4096);
    let hello = match read_frame(&mut stream, &mut buf).await {
        Ok(Frame::Hello(g)) => g,
        Ok(other) => {
            net.shared
                .metrics
                .net_bad_frames
                .with_label_values(&["?"])
                .inc();
            return Err(std::io::Error::other(format!(
                "expected a hello, got {other:?}"
            )));
        }
        Err(e) => {
            if e.kind() == std::io::ErrorKind::InvalidData {
                net.shared
                    .metrics
                    .net_bad_frames
                    .with_label_values(&["?"])
                    .inc();
            }
            return Err(e);
        }
    };
    let verdict = (|| {
        let w = net
            .peers
            .iter()
            .position(|p| p.id == hello.worker)
            .filter(|&w| w > net.me)
            .ok_or((
                "worker",
                format!("`{}` is not a worker that dials this one", hello.worker),
            ))?;
        let mac = net.mac("hello", nonce, &hello);
        if !constant_time_eq(&mac, &hello.mac) {
            return Err((
                "secret",
                format!("worker `{}` does not know the cluster secret", hello.worker),
            ));
        }
        net.check_greeting(w, &hello)?;
        Ok(w)
    })();
    match verdict {
        Ok(w) => {
            let welcome = Frame::Welcome {
                mac: net.mac("welcome", hello.nonce, &net.greeting(0)),
            };
            write_frame(&mut stream, &welcome).await?;
            let keys = seal::SessionKeys::derive(
                &net.secret,
                &net.peers[net.me].id,
                &hello.worker,
                nonce,
                hello.nonce,
            );
            Ok((w, Conn { stream, buf, keys }))
        }
        Err((reason, message)) => {
            net.refuse_count(reason);
            tracing::warn!(peer = %stream.peer_addr().map_or_else(|_| "?".into(), |a| a.to_string()), reason, "refused a cluster connection: {message}");
            let _ = write_frame(
                &mut stream,
                &Frame::Refused {
                    reason: message.clone(),
                },
            )
            .await;
            Err(std::io::Error::other(message))
        }
    }
}

/// The dialer's side of the handshake.
pub(super) async fn dial(net: &Net, w: usize) -> std::io::Result<Conn> {
    let peer = &net.peers[w];
    let mut stream = TcpStream::connect(&peer.address).await?;
    stream.set_nodelay(true)?;
    let mut buf = BytesMut::with_capacity(4096);
    let challenge = match read_frame(&mut stream, &mut buf).await? {
        Frame::Challenge(g) => g,
        other => {
            return Err(std::io::Error::other(format!(
                "expected a challenge, got {other:?}"
            )))
        }
    };
    if challenge.worker != peer.id {
        net.refuse_count("worker");
        return Err(std::io::Error::other(format!(
            "{} answered as `{}`, not `{}`",
            peer.address, challenge.worker, peer.id
        )));
    }
    if let Err((reason, message)) = net.check_greeting(w, &challenge) {
        net.refuse_count(reason);
        tracing::warn!(peer = %peer.id, reason, "refused a cluster connection: {message}");
        return Err(std::io::Error::other(message));
    }
    let mut hello = net.greeting(random_u64());
    hello.mac = net.mac("hello", challenge.nonce, &hello);
    write_frame(&mut stream, &Frame::Hello(hello.clone())).await?;
    match read_frame(&mut stream, &mut buf).await? {
        Frame::Welcome { mac } => {
            let want = net.mac("welcome", hello.nonce, &challenge);
            if !constant_time_eq(&mac, &want) {
                net.refuse_count("secret");
                return Err(std::io::Error::other(format!(
                    "worker `{}` does not know the cluster secret",
                    peer.id
                )));
            }
            let keys = seal::SessionKeys::derive(
                &net.secret,
                &net.peers[net.me].id,
                &peer.id,
                challenge.nonce,
                hello.nonce,
            );
            Ok(Conn { stream, buf, keys })
        }
        Frame::Refused { reason } => {
            net.refuse_count("by-peer");
            Err(std::io::Error::other(format!(
                "refused by `{}`: {reason}",
                peer.id
            )))
        }
        other => Err(std::io::Error::other(format!(
            "expected a welcome, got {other:?}"
        ))),
    }
}

pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    //! The handshake's checks on a two-worker plan, in-process: no socket.

    use super::{accept_loop, constant_time_eq, dial, random_u64, Conn, Net};
    use crate::metrics::Metrics;
    use crate::net::frame::Frame;
    use crate::net::frame::{Greeting, MAC_LEN};
    use crate::net::seal::{Opener, Sealer};
    use crate::net::TransportConfig;
    use crate::shared::Shared;
    use bytes::BytesMut;
    use millrace_storage::{Cf, Store, StoreOptions};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Worker `me` of two (`a`, `b`) on `dir`, with `secret`.
    fn net(dir: &std::path::Path, me: usize, secret: &str) -> Net {
        net_at(dir, me, secret, 1)
    }

    /// Worker `me` of two on `dir`, with `secret`, where worker `a` listens
    /// on 127.0.0.1:`port`, its own shards at epoch 1.
    fn net_at(dir: &std::path::Path, me: usize, secret: &str, port: u16) -> Net {
        let plan = Arc::new(crate::test_kinds::plan(&format!(
            r#"
[engine]
shards = 4
[sources.gen]
type = "nothing"
[computations.count]
type = "nothing"
inputs = ["gen"]
[cluster]
secret = "a-secret-of-16-bytes"
[[cluster.workers]]
id = "a"
address = "127.0.0.1:{port}"
[[cluster.workers]]
id = "b"
address = "127.0.0.1:2"
"#,
        )));
        let store = Arc::new(Store::open(dir, &StoreOptions::default()).expect("store"));
        let shared = Arc::new(Shared::new(Arc::new(Metrics::new()), &plan, false));
        for (sid, s) in plan.shards.iter().enumerate() {
            if s.worker == me {
                shared.routes.set(sid as u32, Some(me), s.executor, 1);
            }
        }
        Net::new(TransportConfig {
            plan,
            me,
            listen: String::new(),
            secret: secret.as_bytes().to_vec(),
            inboxes: Vec::new(),
            shared,
            store,
        })
        .expect("net")
    }

    /// A shard worker `w` owns.
    fn owned_by(n: &Net, w: usize) -> u32 {
        n.plan
            .shards
            .iter()
            .position(|s| s.worker == w)
            .expect("a shard of that worker") as u32
    }

    fn greeting(n: &Net, epochs: &[(u32, u64)], incarnation: u64) -> Greeting {
        Greeting {
            worker: "b".into(),
            topology: n.fingerprint,
            epochs: epochs.to_vec(),
            nonce: 1,
            incarnation,
            mac: [0; MAC_LEN],
        }
    }

    /// Handshakes `n` refused (or was refused in) for `why`.
    fn refusals(n: &Net, why: &str) -> u64 {
        n.shared.metrics.net_refused.with_label_values(&[why]).get()
    }

    fn refused(n: &Net, g: &Greeting) -> Option<&'static str> {
        n.check_greeting(1, g).err().map(|(why, _)| why)
    }

    /// Waits (at most 10 s) until `sid`'s epoch is persisted as `epoch`.
    fn persisted(n: &Net, sid: u32, epoch: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let got = n
                .store
                .get(Cf::Meta, &crate::layout::peer_epoch_key(sid))
                .expect("read");
            if got == Some(epoch.to_be_bytes().to_vec()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    #[test]
    fn a_greeting_is_checked_for_topology_ownership_and_epochs() {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let _in_rt = rt.enter();
        let dir = tempfile::tempdir().expect("temp dir");
        let n = net(dir.path(), 0, "a-secret-of-16-bytes");
        let (theirs, mine) = (owned_by(&n, 1), owned_by(&n, 0));
        assert_eq!(refused(&n, &greeting(&n, &[(theirs, 5)], 11)), None);
        assert!(persisted(&n, theirs, 5), "a new epoch is persisted");
        let mut other = greeting(&n, &[(theirs, 5)], 11);
        other.topology ^= 1;
        assert_eq!(refused(&n, &other), Some("topology"));
        assert_eq!(
            refused(&n, &greeting(&n, &[(theirs, 6), (mine, 1)], 12)),
            Some("worker"),
            "a shard it does not own"
        );
        assert_eq!(
            refused(&n, &greeting(&n, &[(999, 1)], 12)),
            Some("worker"),
            "a shard that does not exist"
        );
        assert_eq!(
            refused(&n, &greeting(&n, &[(theirs, 4)], 12)),
            Some("epoch"),
            "below the epoch seen"
        );
        assert_eq!(
            refused(&n, &greeting(&n, &[(theirs, 5)], 12)),
            Some("epoch"),
            "the epoch seen, held by another process"
        );
        assert_eq!(
            refused(&n, &greeting(&n, &[(theirs, 5)], 11)),
            None,
            "the same process again (a reconnect)"
        );
        // The refused greeting at epoch 6 recorded nothing: 6 is new here.
        assert_eq!(refused(&n, &greeting(&n, &[(theirs, 6)], 13)), None);
        assert!(persisted(&n, theirs, 6));
        drop(n);
        // A restart knows the persisted epoch, but not which process held it.
        let n = net(dir.path(), 0, "a-secret-of-16-bytes");
        assert_eq!(
            refused(&n, &greeting(&n, &[(theirs, 5)], 13)),
            Some("epoch"),
            "below the persisted epoch"
        );
        assert_eq!(refused(&n, &greeting(&n, &[(theirs, 6)], 14)), None);
    }

    #[test]
    fn the_mac_covers_the_secret_the_label_the_nonce_and_every_field() {
        let dir = tempfile::tempdir().expect("temp dir");
        let n = net(dir.path(), 0, "a-secret-of-16-bytes");
        let g = greeting(&n, &[(1, 2), (3, 4)], 5);
        let mac = n.mac("hello", 9, &g);
        assert_eq!(mac, n.mac("hello", 9, &g), "the same input, the same mac");
        assert_ne!(mac, [0; MAC_LEN]);
        let changed: Vec<Greeting> = vec![
            Greeting {
                worker: "c".into(),
                ..g.clone()
            },
            Greeting {
                topology: g.topology ^ 1,
                ..g.clone()
            },
            Greeting {
                incarnation: 6,
                ..g.clone()
            },
            Greeting {
                epochs: vec![(1, 2), (3, 5)],
                ..g.clone()
            },
            Greeting {
                epochs: vec![(1, 2)],
                ..g.clone()
            },
        ];
        for c in &changed {
            assert_ne!(n.mac("hello", 9, c), mac, "{c:?}");
        }
        assert_ne!(n.mac("welcome", 9, &g), mac, "the label");
        assert_ne!(n.mac("hello", 10, &g), mac, "the nonce");
        let dir2 = tempfile::tempdir().expect("temp dir");
        let other = net(dir2.path(), 0, "another-secret-of-16");
        assert_ne!(other.mac("hello", 9, &g), mac, "the secret");
    }

    #[test]
    fn refusals_are_counted_by_reason_and_nonces_differ() {
        let dir = tempfile::tempdir().expect("temp dir");
        let n = net(dir.path(), 0, "a-secret-of-16-bytes");
        n.refuse_count("epoch");
        n.refuse_count("epoch");
        assert_eq!((refusals(&n, "epoch"), refusals(&n, "topology")), (2, 0));
        assert_ne!(random_u64(), random_u64());
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(&[7, 9, 255], &[7, 9, 255]));
        assert!(!constant_time_eq(&[7, 9], &[7, 9, 0]), "lengths differ");
        assert!(!constant_time_eq(&[1, 2, 3], &[0, 2, 3]), "the first byte");
        assert!(!constant_time_eq(&[1, 2, 3], &[1, 2, 4]), "the last byte");
        // Two bytes differing in the same bit must not cancel out.
        assert!(!constant_time_eq(&[1, 1], &[0, 0]));
        assert!(!constant_time_eq(&[1], &[2]));
    }

    /// A listener on 127.0.0.1 (its port) and worker `a` accepting on it,
    /// with `secret`; the connections `a` accepts, per dialing worker.
    fn acceptor(
        rt: &tokio::runtime::Runtime,
        dir: &std::path::Path,
        secret: &str,
    ) -> (u16, Arc<Net>, tokio::sync::mpsc::UnboundedReceiver<Conn>) {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let a = Arc::new(net_at(dir, 0, secret, port));
        let (tx0, _rx0) = tokio::sync::mpsc::unbounded_channel();
        let (tx1, rx1) = tokio::sync::mpsc::unbounded_channel();
        rt.spawn(accept_loop(Arc::clone(&a), listener, vec![tx0, tx1]));
        (port, a, rx1)
    }

    #[test]
    fn two_workers_shake_hands_and_seal_for_each_other() {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let dirs = [
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        ];
        let (port, a, mut accepted) = acceptor(&rt, dirs[0].path(), "a-secret-of-16-bytes");
        let b = net_at(dirs[1].path(), 1, "a-secret-of-16-bytes", port);
        let mut at_b = rt.block_on(dial(&b, 0)).expect("b's dial is welcomed");
        let mut at_a = rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(10), accepted.recv()).await
            })
            .expect("in time")
            .expect("a took the connection");
        assert_eq!(at_b.keys.send, at_a.keys.recv);
        assert_eq!(at_a.keys.send, at_b.keys.recv);
        // A sealed frame from b opens at a, over the connection itself.
        let mut wire = BytesMut::new();
        Frame::Ack { ch: 3, upto: 9 }.encode(&mut wire);
        Sealer::new(&at_b.keys.send).seal(&mut wire);
        let got = rt.block_on(async {
            at_b.stream.write_all(&wire).await.expect("write");
            let mut opener = Opener::new(&at_a.keys.recv);
            let mut frames = Vec::new();
            while frames.len() < 2 {
                match Frame::take_raw(&mut at_a.buf).expect("frame") {
                    Some(raw) => {
                        let f = Frame::parse_raw(raw.clone()).expect("parse");
                        if let Frame::Seal { mac } = f {
                            assert!(opener.check(&mac), "the seal opens");
                        } else {
                            opener.absorb(&raw);
                        }
                        frames.push(f);
                    }
                    None => {
                        at_a.stream.read_buf(&mut at_a.buf).await.expect("read");
                    }
                }
            }
            frames
        });
        assert_eq!(got[0], Frame::Ack { ch: 3, upto: 9 });
        // Each learned the other's epochs.
        let theirs = owned_by(&a, 1);
        assert_eq!(a.seen_epochs.lock().get(&theirs).map(|e| e.0), Some(1));
        assert_eq!((refusals(&a, "secret"), refusals(&b, "secret")), (0, 0));
    }

    #[test]
    fn a_dialer_without_the_secret_or_not_below_the_acceptor_is_refused_and_counted() {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let dirs = [
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        ];
        let (port, a, _accepted) = acceptor(&rt, dirs[0].path(), "a-secret-of-16-bytes");
        let wrong = net_at(dirs[1].path(), 1, "not-the-secret-at-all", port);
        let e = rt.block_on(dial(&wrong, 0)).err().expect("refused");
        assert!(e.to_string().contains("refused by `a`"), "{e}");
        assert_eq!(refusals(&a, "secret"), 1);
        assert_eq!(refusals(&wrong, "by-peer"), 1);
        // Worker a dialing itself: only higher-numbered workers dial a.
        let itself = net_at(dirs[2].path(), 0, "a-secret-of-16-bytes", port);
        let e = rt.block_on(dial(&itself, 0)).err().expect("refused");
        assert!(e.to_string().contains("refused by `a`"), "{e}");
        assert_eq!(refusals(&a, "worker"), 1);
    }

    #[test]
    fn a_bad_frame_instead_of_a_hello_is_counted() {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let dir = tempfile::tempdir().expect("dir");
        let (port, a, _accepted) = acceptor(&rt, dir.path(), "a-secret-of-16-bytes");
        rt.block_on(async {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect");
            let mut buf = BytesMut::new();
            let challenge = super::read_frame(&mut s, &mut buf)
                .await
                .expect("challenge");
            assert!(matches!(challenge, Frame::Challenge(_)), "{challenge:?}");
            // A zero length field: not a frame.
            s.write_all(&[0u8; 12]).await.expect("write");
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
        });
        let bad = || {
            a.shared
                .metrics
                .net_bad_frames
                .with_label_values(&["?"])
                .get()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while bad() == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(bad(), 1);
    }
}
