//! One peer's link: connect (dial or wait to be dialled), run the
//! connection (sealed writes out, checked frames in), start over when it
//! breaks.

use super::frame::{Frame, Status};
use super::handshake::{dial, Conn};
use super::{seal, Net, HANDSHAKE_TIMEOUT, HEARTBEAT, REDIAL, SILENCE, WRITE_BATCH};
use crate::message::Msg;
use crate::plan::Sid;
use bytes::BytesMut;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;

/// One peer's link: connects (dialing or waiting for the peer to dial),
/// runs the connection, and starts over when it breaks.
pub(super) async fn link(
    net: Arc<Net>,
    w: usize,
    mut out: mpsc::UnboundedReceiver<Vec<Msg>>,
    mut accepted: mpsc::UnboundedReceiver<Conn>,
) {
    let dialer = net.me > w;
    let peer_id = net.peers[w].id.clone();
    let mut backoff = REDIAL.0;
    let mut next: Option<Conn> = None;
    loop {
        // Connect; meanwhile what the executors send this peer is dropped
        // (it stays in their outboxes and is re-sent once connected).
        let conn = match next.take() {
            Some(c) => c,
            None if dialer => loop {
                let attempt = tokio::time::timeout(HANDSHAKE_TIMEOUT, dial(&net, w));
                tokio::pin!(attempt);
                let result = loop {
                    tokio::select! {
                        r = &mut attempt => break r,
                        m = out.recv() => if m.is_none() { return },
                    }
                };
                match result {
                    Ok(Ok(c)) => break c,
                    Ok(Err(e)) => tracing::debug!(peer = %peer_id, error = %e, "dial failed"),
                    Err(_) => tracing::debug!(peer = %peer_id, "dial timed out"),
                }
                let pause = tokio::time::sleep(backoff);
                tokio::pin!(pause);
                loop {
                    tokio::select! {
                        _ = &mut pause => break,
                        m = out.recv() => if m.is_none() { return },
                    }
                }
                backoff = (backoff * 2).min(REDIAL.1);
            },
            None => loop {
                tokio::select! {
                    c = accepted.recv() => match c {
                        Some(c) => break c,
                        None => return,
                    },
                    m = out.recv() => if m.is_none() { return },
                }
            },
        };
        backoff = REDIAL.0;
        while out.try_recv().is_ok() {}
        let metrics = &net.shared.metrics;
        metrics.net_connects.with_label_values(&[&peer_id]).inc();
        metrics.net_peer_up.with_label_values(&[&peer_id]).set(1);
        net.peers[w].up.store(true, Ordering::SeqCst);
        tracing::info!(peer = %peer_id, "connected");
        for inbox in &net.inboxes {
            let _ = inbox.send(vec![Msg::PeerUp { worker: w }]);
        }
        let Conn { stream, buf, keys } = conn;
        let (reader, writer) = stream.into_split();
        let (end, why) = run(&net, w, reader, writer, buf, keys, &mut out, &mut accepted).await;
        net.peers[w].up.store(false, Ordering::SeqCst);
        metrics.net_peer_up.with_label_values(&[&peer_id]).set(0);
        metrics.net_disconnects.with_label_values(&[&peer_id]).inc();
        match end {
            End::Replaced(c) => {
                tracing::info!(peer = %peer_id, "connection replaced by a newer one");
                next = Some(c);
            }
            End::Closed => tracing::info!(peer = %peer_id, reason = %why, "disconnected"),
            End::Shutdown => return,
        }
    }
}

enum End {
    Closed,
    Replaced(Conn),
    Shutdown,
}

#[allow(clippy::too_many_arguments)]
async fn run(
    net: &Arc<Net>,
    w: usize,
    reader: OwnedReadHalf,
    mut writer: OwnedWriteHalf,
    buf: BytesMut,
    keys: seal::SessionKeys,
    out: &mut mpsc::UnboundedReceiver<Vec<Msg>>,
    accepted: &mut mpsc::UnboundedReceiver<Conn>,
) -> (End, String) {
    let peer_id = net.peers[w].id.clone();
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<String>();
    let opener = seal::Opener::new(&keys.recv);
    let mut sealer = seal::Sealer::new(&keys.send);
    let read_task = tokio::spawn(read_loop(Arc::clone(net), w, reader, buf, opener, done_tx));
    let records_sent = net
        .shared
        .metrics
        .net_records_sent
        .with_label_values(&[&peer_id]);
    let bytes_sent = net
        .shared
        .metrics
        .net_bytes_sent
        .with_label_values(&[&peer_id]);
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    let mut wire = BytesMut::with_capacity(WRITE_BATCH);
    let outcome = loop {
        tokio::select! {
            m = out.recv() => {
                let Some(msgs) = m else { break (End::Shutdown, "shutting down".to_owned()) };
                let mut records = encode(&msgs, &mut wire);
                while wire.len() < WRITE_BATCH {
                    match out.try_recv() {
                        Ok(more) => records += encode(&more, &mut wire),
                        Err(_) => break,
                    }
                }
                records_sent.inc_by(records);
            }
            _ = heartbeat.tick() => {
                let done = net.local_done();
                let finished = net.all_done();
                let stopping = net.shared.stopping.load(Ordering::SeqCst);
                let drained = stopping && net.shared.in_flight.drained();
                Frame::Status(Status { done, finished, stopping, drained }).encode(&mut wire);
                if finished {
                    // Written below. Should the write fail, the peer learns it
                    // on the next connection, or stops waiting after LINGER.
                    net.peers[w].told_finished.store(true, Ordering::SeqCst);
                }
            }
            why = &mut done_rx => break (End::Closed, why.unwrap_or_else(|_| "reader stopped".into())),
            c = accepted.recv() => match c {
                Some(c) => break (End::Replaced(c), "replaced".into()),
                None => break (End::Shutdown, "shutting down".into()),
            },
        }
        if !wire.is_empty() {
            sealer.seal(&mut wire);
            bytes_sent.inc_by(wire.len() as u64);
            if let Err(e) = writer.write_all(&wire).await {
                break (End::Closed, format!("write: {e}"));
            }
            wire.clear();
        }
    };
    read_task.abort();
    outcome
}

/// Encodes messages for the wire; returns how many were records.
fn encode(msgs: &[Msg], wire: &mut BytesMut) -> u64 {
    let mut records = 0;
    for m in msgs {
        let f = match m {
            Msg::Deliver { ch, seq, env } => {
                records += 1;
                Frame::Deliver {
                    ch: *ch,
                    seq: *seq,
                    env: env.clone(),
                }
            }
            Msg::Ack { ch, upto } => Frame::Ack {
                ch: *ch,
                upto: *upto,
            },
            Msg::Watermark { from, wm, idle, .. } => Frame::Watermark {
                from: *from,
                wm: *wm,
                idle: *idle,
            },
            Msg::PeerUp { .. } | Msg::Shard(_) => continue,
        };
        f.encode(wire);
    }
    records
}

/// Reads frames and hands them to the executors until the connection fails,
/// goes silent, or breaks the protocol (counted as a bad frame).
async fn read_loop(
    net: Arc<Net>,
    w: usize,
    mut reader: OwnedReadHalf,
    mut buf: BytesMut,
    mut opener: seal::Opener,
    done: tokio::sync::oneshot::Sender<String>,
) {
    let peer_id = net.peers[w].id.clone();
    let metrics = &net.shared.metrics;
    let received = metrics.net_records_received.with_label_values(&[&peer_id]);
    let plan = &*net.plan;
    let mut batches: Vec<Vec<Msg>> = (0..net.inboxes.len()).map(|_| Vec::new()).collect();
    let routes = &net.shared.routes;
    let on = |sid: Sid, worker: usize| routes.owned_by(sid, worker);
    // A frame for a shard that it or we do not run now: a move raced it
    // (or a stale owner sent it). Dropped and counted; the connection stays.
    let stale = metrics.net_stale_frames.with_label_values(&[&peer_id]);
    // What the frames since the last seal say; acted on once it checks.
    let mut status = None;
    let why = 'conn: loop {
        loop {
            let bad = |what: String| {
                metrics.net_bad_frames.with_label_values(&[&peer_id]).inc();
                what
            };
            let frame = match Frame::take_raw(&mut buf).and_then(|raw| match raw {
                Some(raw) => {
                    let f = Frame::parse_raw(raw.clone())?;
                    if !matches!(f, Frame::Seal { .. }) {
                        opener.absorb(&raw);
                    }
                    Ok(Some(f))
                }
                None => Ok(None),
            }) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => break 'conn bad(format!("bad frame: {e}")),
            };
            match frame {
                Frame::Seal { mac } => {
                    if !opener.check(&mac) {
                        break 'conn bad(
                            "frames whose seal does not check (forged, altered, replayed or \
                             sealed with another key) refused"
                                .to_owned(),
                        );
                    }
                    net.dispatch(&mut batches);
                    if let Some(st) = status.take() {
                        *net.peers[w].status.lock() = st;
                    }
                }
                Frame::Deliver { ch, seq, env } => {
                    let Some(c) = plan.channel_spec(ch) else {
                        break 'conn bad(format!("delivery on unknown channel {ch}"));
                    };
                    if !on(c.dst, net.me) || !on(c.src, w) {
                        stale.inc();
                        continue;
                    }
                    received.inc();
                    batches[routes.executor(c.dst)].push(Msg::Deliver { ch, seq, env });
                }
                Frame::Ack { ch, upto } => {
                    let Some(c) = plan.channel_spec(ch) else {
                        break 'conn bad(format!("ack on unknown channel {ch}"));
                    };
                    if !on(c.src, net.me) || !on(c.dst, w) {
                        stale.inc();
                        continue;
                    }
                    batches[routes.executor(c.src)].push(Msg::Ack { ch, upto });
                }
                Frame::Watermark { from, wm, idle } => {
                    if plan.shards.get(from as usize).is_none() {
                        break 'conn bad(format!("watermark of unknown shard {from}"));
                    }
                    if !on(from, w) {
                        stale.inc();
                        continue;
                    }
                    let mut told = Vec::new();
                    for &d in plan.downstream(from) {
                        let exec = routes.executor(d);
                        if on(d, net.me) && !told.contains(&exec) {
                            told.push(exec);
                            batches[exec].push(Msg::Watermark {
                                from,
                                wm,
                                idle,
                                counted: false,
                            });
                        }
                    }
                }
                Frame::Status(st) => status = Some(st),
                other => break 'conn bad(format!("unexpected {other:?} after the handshake")),
            }
        }
        buf.reserve(64 << 10);
        match tokio::time::timeout(SILENCE, reader.read_buf(&mut buf)).await {
            Ok(Ok(0)) => break "closed by peer".to_owned(),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => break format!("read: {e}"),
            Err(_) => break format!("silent for {SILENCE:?}"),
        }
    };
    // What came after the last good seal is not trusted: dropped (the
    // sender re-sends everything unacknowledged on the next connection).
    let _ = done.send(why);
}
