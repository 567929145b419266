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
            epochs: self.epochs.clone(),
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
            if self.plan.shards.get(sid as usize).map(|s| s.worker) != Some(w) {
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

pub(super) fn random_u64() -> u64 {
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
