//! The commit log of `[state] log` on NATS JetStream.
//!
//! One stream per deployment, `millrace-NAME`, replicated `log_replicas`
//! times; one subject per shard, `millrace.NAME.COMPONENT.SHARD`. An append
//! carries `Nats-Expected-Last-Subject-Sequence`, the sequence the shard's
//! last entry had when its writer last looked: the server refuses it when
//! another writer appended since (JetStream error 10071), which is the
//! fence of `millrace_engine::commit_log`. It also carries `Nats-Msg-Id`,
//! the shard, the writer's incarnation and that sequence, so that an append retried
//! after a lost acknowledgement is recognised by the server as the same one
//! (within the stream's duplicate window) instead of appended twice.
//!
//! An entry larger than the server's `max_payload` is appended as parts,
//! one after another, each fenced like an entry; a reader takes an entry
//! only once its last part is read, and drops the parts of one whose writer
//! died before the last.
//!
//! The engine calls in from its executor threads; each call blocks on the
//! log's own tokio runtime (one thread), which lives as long as the log:
//! the service's I/O runtime stops before the executors' last commit.

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer, context::PublishErrorKind, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use millrace_config::CommitLogConfig;
use millrace_engine::commit_log::{escaped_name, Append, CommitLog, LogError, OnEntry};
use millrace_engine::EngineError;
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;

/// The header of an entry's part: `K/N`.
const PART: &str = "Millrace-Part";

/// Room left for headers under the server's `max_payload`.
const HEADER_ROOM: usize = 1024;

/// How long the server remembers an append's id (the stream's duplicate
/// window): a retry within it is recognised.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// The longest subject the log uses (a shard's); the server refuses a
/// control line over 4 KiB, and an append's carries the subject twice.
const MAX_SUBJECT: usize = 1024;

/// How long one attempt (a publish and its acknowledgement, a request)
/// may take before it is made again, within the log's timeout: a server
/// that restarts under an append loses it, and only a new attempt, over
/// the reconnected client, gets an answer.
fn attempt_timeout(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(2))
}

/// A commit log on a JetStream stream.
pub struct NatsLog {
    runtime: Runtime,
    js: jetstream::Context,
    stream: stream::Stream,
    /// Subjects are `{subject_prefix}.{shard}`.
    subject_prefix: String,
    describe: String,
    timeout: Duration,
    /// Largest part of an entry.
    max_part: usize,
    /// When the stream was created (Unix nanoseconds, hex).
    created: String,
    /// What `/healthz` calls it while commits wait on it.
    health: String,
}

impl NatsLog {
    /// Connects to the servers of `cfg` and makes sure the deployment's
    /// stream exists.
    pub fn connect(cfg: &CommitLogConfig) -> anyhow::Result<NatsLog> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("millrace-log")
            .enable_all()
            .build()
            .context("starting the commit log's runtime")?;
        let describe = format!("nats://{}/{}", cfg.servers.join(","), cfg.name);
        let stream_name = format!("millrace-{}", cfg.name);
        let subject_prefix = format!("millrace.{}", cfg.name);
        let (js, stream, max_payload) = runtime
            .block_on(async {
                let servers: Vec<async_nats::ServerAddr> = cfg
                    .servers
                    .iter()
                    .map(|s| format!("nats://{s}").parse())
                    .collect::<Result<_, _>>()?;
                let client = async_nats::ConnectOptions::new()
                    .connection_timeout(cfg.timeout.min(Duration::from_secs(10)))
                    .retry_on_initial_connect()
                    .connect(servers)
                    .await?;
                // Retrying the first connection returns at once; wait for
                // it, and for the server's INFO: the state says connected
                // a moment before the client keeps what INFO said, and
                // until then `max_payload` reads 0.
                let deadline = Instant::now() + cfg.timeout;
                while client.connection_state() != async_nats::connection::State::Connected
                    || client.server_info().max_payload == 0
                {
                    if Instant::now() > deadline {
                        anyhow::bail!("no server answered within {:?}", cfg.timeout);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let max_payload = client.server_info().max_payload;
                let mut js = jetstream::new(client);
                js.set_timeout(attempt_timeout(cfg.timeout));
                let config = stream::Config {
                    name: stream_name.clone(),
                    subjects: vec![format!("{subject_prefix}.>")],
                    num_replicas: cfg.replicas,
                    storage: stream::StorageType::File,
                    allow_direct: true,
                    duplicate_window: DUPLICATE_WINDOW,
                    ..Default::default()
                };
                // Servers started beside the workers may still be forming
                // their cluster: attempts that time out or find JetStream
                // not ready yet are made again until the log's timeout; an
                // answer (a refusal) is final.
                let stream = loop {
                    match js.get_or_create_stream(config.clone()).await {
                        Ok(stream) => break stream,
                        Err(e) => {
                            use async_nats::jetstream::context::CreateStreamErrorKind as K;
                            let transient = match e.kind() {
                                K::TimedOut | K::JetStreamUnavailable | K::Response => true,
                                K::JetStream(j) => {
                                    j.to_string().contains("temporarily unavailable")
                                }
                                _ => false,
                            };
                            if !transient || Instant::now() > deadline {
                                anyhow::bail!("creating or opening stream {stream_name}: {e}");
                            }
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                };
                anyhow::Ok((js, stream, max_payload))
            })
            .with_context(|| format!("connecting to the commit log {describe}"))?;
        let info = stream.cached_info();
        check_stream(
            &info.config,
            cfg,
            (&stream_name, &subject_prefix, &describe),
        )?;
        let config = &info.config;
        if config.max_bytes > 0
            || config.max_messages > 0
            || config.max_messages_per_subject > 0
            || !config.max_age.is_zero()
        {
            anyhow::bail!(
                "the commit log's stream {stream_name} at {describe} drops entries by its own \
                 limits (max_bytes {}, max_msgs {}, max_msgs_per_subject {}, max_age {:?}): a \
                 commit log must keep every entry until millrace cuts it below a snapshot. \
                 Remove the limits or use another log name",
                config.max_bytes,
                config.max_messages,
                config.max_messages_per_subject,
                config.max_age
            );
        }
        // A stream may refuse messages below the server's payload limit.
        let limit = match usize::try_from(config.max_message_size) {
            Ok(m) if m > 0 => max_payload.min(m),
            _ => max_payload,
        };
        if limit < 2 * HEADER_ROOM {
            anyhow::bail!(
                "the commit log's stream {stream_name} at {describe} takes messages of at most \
                 {limit} bytes: too small for an entry's parts (at least {} bytes). Fix the \
                 stream, or use another log name",
                2 * HEADER_ROOM
            );
        }
        let created = format!("{:x}", info.created.unix_timestamp_nanos());
        let health = millrace_engine::commit_log::health_name(&describe);
        Ok(NatsLog {
            runtime,
            js,
            stream,
            subject_prefix,
            describe,
            timeout: cfg.timeout,
            max_part: limit - HEADER_ROOM,
            created,
            health,
        })
    }

    /// Names this stream apart from any other of the same name (on another
    /// cluster, or created again after its servers were wiped): when it was
    /// created. Its snapshots are kept under it.
    pub fn created(&self) -> &str {
        &self.created
    }

    fn subject(&self, shard: &str) -> Result<String, LogError> {
        let subject = format!("{}.{}", self.subject_prefix, escaped_name(shard));
        if subject.len() > MAX_SUBJECT {
            return Err(LogError::Unavailable(format!(
                "{}: shard {shard} would be the subject of {} bytes, more than the {MAX_SUBJECT} \
                 the log takes: shorten the component's name",
                self.describe,
                subject.len()
            )));
        }
        Ok(subject)
    }

    /// Appends one entry, in parts when it is large; returns its (last
    /// part's) sequence.
    async fn append_one(&self, a: &Append<'_>) -> Result<u64, LogError> {
        let subject = self.subject(a.shard)?;
        let packed = pack(a.bytes);
        let parts: Vec<&[u8]> = if packed.is_empty() {
            vec![&packed]
        } else {
            packed.chunks(self.max_part).collect()
        };
        let n = parts.len();
        let mut after = a.after;
        for (k, part) in parts.into_iter().enumerate() {
            let id = format!("{}-{:016x}-{after}", a.shard, a.incarnation);
            let mut msg = jetstream::message::PublishMessage::build()
                .payload(Bytes::copy_from_slice(part))
                .expected_last_subject_sequence(after)
                .message_id(id.as_str());
            if n > 1 {
                msg = msg.header(PART, format!("{}/{n}", k + 1).as_str());
            }
            after = self.publish(&subject, (a, &id), msg).await?;
        }
        Ok(after)
    }

    /// Publishes `msg` (its message id `id`), again and again while the log
    /// cannot be reached, for at most the configured timeout. Refused for
    /// the expected sequence: fenced, unless the subject's last message is
    /// this one (an earlier attempt landed, and the server, restarted,
    /// no longer knew its id); too large: not retried.
    async fn publish(
        &self,
        subject: &str,
        (a, id): (&Append<'_>, &str),
        msg: jetstream::message::PublishMessage,
    ) -> Result<u64, LogError> {
        self.retrying("appending", a.shard, || async {
            let attempt = async {
                self.js
                    .send_publish(subject.to_owned(), msg.clone())
                    .await?
                    .await
            };
            match attempt.await {
                Ok(ack) => Ok(ack.sequence),
                Err(e) => Err(match e.kind() {
                    PublishErrorKind::WrongLastSequence => {
                        match self.stream.get_last_raw_message_by_subject(subject).await {
                            Ok(last)
                                if last.headers.get("Nats-Msg-Id").map(|v| v.as_str())
                                    == Some(id) =>
                            {
                                return Ok(last.sequence)
                            }
                            // Another writer's, or none at all.
                            Ok(_) => Failed::Final(LogError::Fenced {
                                shard: a.shard.to_owned(),
                                expected: a.after,
                            }),
                            Err(e)
                                if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound =>
                            {
                                Failed::Final(LogError::Fenced {
                                    shard: a.shard.to_owned(),
                                    expected: a.after,
                                })
                            }
                            // Not known: asked again with the next attempt.
                            Err(e) => Failed::Again(format!("reading the log's end: {e}")),
                        }
                    }
                    PublishErrorKind::MaxPayloadExceeded => {
                        Failed::Final(LogError::Unavailable(format!("{}: {e}", self.describe)))
                    }
                    _ => Failed::Again(e.to_string()),
                }),
            }
        })
        .await
    }

    /// Runs `op` again and again while it fails (a server restarting, a
    /// stream without a leader yet), for at most the log's timeout.
    async fn retrying<T, Fut>(
        &self,
        what: &str,
        shard: &str,
        mut op: impl FnMut() -> Fut,
    ) -> Result<T, LogError>
    where
        Fut: std::future::Future<Output = Result<T, Failed>>,
    {
        let deadline = Instant::now() + self.timeout;
        let attempt = attempt_timeout(self.timeout);
        let mut pause = Duration::from_millis(20);
        let mut failed = false;
        loop {
            let why = match tokio::time::timeout(attempt, op()).await {
                Ok(Ok(v)) => {
                    if failed {
                        millrace_engine::health::clear(&self.health);
                    }
                    return Ok(v);
                }
                Ok(Err(Failed::Final(e))) => return Err(e),
                Ok(Err(Failed::Again(e))) => e,
                Err(_) => format!("no answer within {attempt:?}"),
            };
            // `/healthz` says so while the commits wait.
            failed = true;
            millrace_engine::health::report(
                &self.health,
                format!("{what} of shard {shard}: {why}"),
            );
            if Instant::now() >= deadline {
                return Err(LogError::Unavailable(format!(
                    "{}: {what} of shard {shard}, for {:?}: {why}",
                    self.describe, self.timeout
                )));
            }
            tracing::warn!(log = %self.describe, shard, error = %why, "commit log: {what} failed; retrying");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    async fn read_async(
        &self,
        shard: &str,
        after: u64,
        f: &mut OnEntry<'_>,
    ) -> Result<u64, EngineError> {
        let subject = self.subject(shard)?;
        let unavailable = |what: &str, e: &dyn std::fmt::Display| {
            LogError::Unavailable(format!("{}: {what} of shard {shard}: {e}", self.describe))
        };
        let last = self
            .retrying("reading the end", shard, || async {
                match self.stream.get_last_raw_message_by_subject(&subject).await {
                    Ok(m) => Ok(m.sequence),
                    Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(0),
                    Err(e) => Err(Failed::Again(e.to_string())),
                }
            })
            .await?;
        if last <= after {
            return Ok(last);
        }
        let mut messages = self
            .retrying("reading", shard, || async {
                let consumer = self
                    .stream
                    .create_consumer(consumer::pull::OrderedConfig {
                        filter_subject: subject.clone(),
                        deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                            start_sequence: after + 1,
                        },
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(consumer.messages().await.map_err(|e| e.to_string())?)
            })
            .await?;
        // The parts read so far of an entry written in parts.
        let mut partial: Option<(usize, usize, Vec<u8>)> = None;
        loop {
            let next = tokio::time::timeout(self.timeout, messages.next())
                .await
                .map_err(|_| {
                    unavailable("reading", &format!("no entry within {:?}", self.timeout))
                })?;
            let msg = match next {
                Some(Ok(m)) => m,
                Some(Err(e)) => return Err(unavailable("reading", &e).into()),
                None => return Err(unavailable("reading", &"the read ended early").into()),
            };
            let seq = msg
                .info()
                .map_err(|e| unavailable("reading", &e))?
                .stream_sequence;
            let part = msg
                .headers
                .as_ref()
                .and_then(|h| h.get(PART))
                .map(|v| parse_part(v.as_str()).ok_or_else(|| v.as_str().to_owned()));
            match part {
                None => {
                    // An entry in one piece; the parts of one begun before
                    // it were never finished.
                    partial = None;
                    f(seq, &unpack(shard, seq, &msg.payload)?)?;
                }
                Some(Err(bad)) => {
                    return Err(LogError::Malformed {
                        shard: shard.to_owned(),
                        seq,
                        why: format!("part header `{bad}`"),
                    }
                    .into())
                }
                Some(Ok((k, n))) => {
                    // A first part starts an entry (dropping the parts of
                    // one never finished); any other must follow the part
                    // before it, of the same entry.
                    let mut buf = match (k, partial.take()) {
                        (1, _) => Vec::new(),
                        (k, Some((have, of, buf))) if k == have + 1 && n == of => buf,
                        _ => {
                            return Err(LogError::Malformed {
                                shard: shard.to_owned(),
                                seq,
                                why: format!("part {k}/{n} follows no part {}/{n}", k - 1),
                            }
                            .into())
                        }
                    };
                    buf.extend_from_slice(&msg.payload);
                    if k == n {
                        f(seq, &unpack(shard, seq, &buf)?)?;
                    } else {
                        partial = Some((k, n, buf));
                    }
                }
            }
            if seq >= last {
                return Ok(last);
            }
        }
    }
}

/// Refuses a stream (created by someone else, or by an older millrace)
/// that would not keep what a commit log must, or not the way it is used:
/// the message says which setting and what it must be.
fn check_stream(
    config: &stream::Config,
    cfg: &CommitLogConfig,
    (stream_name, subject_prefix, describe): (&str, &str, &str),
) -> anyhow::Result<()> {
    let ours = format!("{subject_prefix}.>");
    let covered = config
        .subjects
        .iter()
        .any(|s| s == &ours || s == "millrace.>" || s == ">");
    let wrong = if config.storage != stream::StorageType::File {
        format!(
            "keeps its messages in {:?} storage, which a server restart loses; a commit log \
             needs file storage",
            config.storage
        )
    } else if config.retention != stream::RetentionPolicy::Limits {
        format!(
            "has {:?} retention, which drops entries once read; a commit log needs limits \
             retention",
            config.retention
        )
    } else if config.no_ack {
        "does not acknowledge appends (no_ack); a commit waits for the log's \
         acknowledgement"
            .to_owned()
    } else if config.persist_mode == Some(stream::PersistenceMode::Async) {
        "acknowledges appends before it stores them (persist_mode async); a commit log's \
         acknowledgement must mean stored"
            .to_owned()
    } else if config.subject_transform.is_some() || config.mirror.is_some() {
        "moves what is appended to other subjects (a subject transform, or a mirror); each \
         shard's entries must stay on its own subject"
            .to_owned()
    } else if config.sealed || config.deny_purge {
        "is sealed or denies purges; a commit log is appended to, and cut below its \
         snapshots"
            .to_owned()
    } else if !covered {
        format!(
            "takes subjects {:?}, not {ours}, where the shards' entries go",
            config.subjects
        )
    } else if config.duplicate_window < cfg.timeout {
        format!(
            "remembers message ids for {:?}, less than log_timeout ({:?}): an append retried \
             within log_timeout must be recognised",
            config.duplicate_window, cfg.timeout
        )
    } else if config.num_replicas != cfg.replicas {
        format!(
            "keeps {} replicas, and log_replicas says {}: set log_replicas = {}, or change \
             the stream's replicas first",
            config.num_replicas, cfg.replicas, config.num_replicas
        )
    } else {
        return Ok(());
    };
    anyhow::bail!(
        "the commit log's stream {stream_name} at {describe} {wrong}. Fix the stream, or use \
         another log name"
    )
}

/// The first bytes of a zstd frame. No entry millrace writes unpacked
/// starts so (a batch starts with its sequence, 0; a layout record with
/// text).
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Entries up to this size are compressed (and no compressed entry may
/// unpack to more); larger ones (a first copy of a large shard) go as
/// they are.
const PACK_UP_TO: usize = 64 << 20;

/// An entry as it goes to the log: compressed (zstd, level 1) when that
/// makes it smaller. The log servers replicate and store every byte, and
/// on a machine they share with the workers their CPU is what bounds a
/// logged pipeline (docs/PERFORMANCE.md, "The commit log").
fn pack(entry: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if entry.len() < 64 || entry.len() > PACK_UP_TO {
        return entry.into();
    }
    match zstd::bulk::compress(entry, 1) {
        Ok(packed) if packed.len() < entry.len() => packed.into(),
        _ => entry.into(),
    }
}

/// An entry as it was appended: unpacked if it was packed. A frame that
/// does not say its size, says more than [`PACK_UP_TO`], or does not
/// decode is not an entry millrace wrote.
fn unpack<'a>(
    shard: &str,
    seq: u64,
    read: &'a [u8],
) -> Result<std::borrow::Cow<'a, [u8]>, LogError> {
    if !read.starts_with(&ZSTD_MAGIC) {
        return Ok(read.into());
    }
    let malformed = |why: String| LogError::Malformed {
        shard: shard.to_owned(),
        seq,
        why,
    };
    let size = match zstd::zstd_safe::get_frame_content_size(read) {
        Ok(Some(n)) if n <= PACK_UP_TO as u64 => n as usize,
        other => {
            return Err(malformed(format!(
                "a compressed entry of unknown or excessive size ({other:?})"
            )))
        }
    };
    zstd::bulk::decompress(read, size)
        .map(Into::into)
        .map_err(|e| malformed(format!("a compressed entry that does not decode: {e}")))
}

/// How an attempt at the log failed.
enum Failed {
    /// Worth another attempt (the server unreachable, restarting, without
    /// a leader).
    Again(String),
    /// An answer: attempting again changes nothing.
    Final(LogError),
}

impl From<String> for Failed {
    fn from(why: String) -> Failed {
        Failed::Again(why)
    }
}

/// Reads `K/N` with `1 <= K <= N`.
fn parse_part(v: &str) -> Option<(usize, usize)> {
    let (k, n) = v.split_once('/')?;
    let (k, n) = (k.parse().ok()?, n.parse().ok()?);
    (1..=n).contains(&k).then_some((k, n))
}

impl CommitLog for NatsLog {
    fn append(&self, entries: &[Append<'_>]) -> Result<Vec<u64>, LogError> {
        self.runtime.block_on(futures_util::future::try_join_all(
            entries.iter().map(|a| self.append_one(a)),
        ))
    }

    fn read(&self, shard: &str, after: u64, f: &mut OnEntry<'_>) -> Result<u64, EngineError> {
        self.runtime.block_on(self.read_async(shard, after, f))
    }

    fn purge(&self, shard: &str, through: u64) -> Result<(), EngineError> {
        let subject = self.subject(shard)?;
        self.runtime
            .block_on(self.retrying("cutting the log", shard, || async {
                self.stream
                    .purge()
                    .filter(subject.as_str())
                    .sequence(through + 1)
                    .await
                    .map(|_| ())
                    .map_err(|e| Failed::Again(e.to_string()))
            }))?;
        Ok(())
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn identity(&self) -> String {
        self.created.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::parse_part;

    #[test]
    fn entries_are_packed_when_that_helps_and_unpacked_as_they_were() {
        use super::{pack, unpack, ZSTD_MAGIC};
        // A batch-like entry: repetitive keys.
        let mut entry = vec![0u8; 12];
        for i in 0..500u32 {
            entry.extend_from_slice(format!("counts.1/state/key-{}=", i % 50).as_bytes());
            entry.extend_from_slice(&i.to_be_bytes());
        }
        let packed = pack(&entry);
        assert!(packed.starts_with(&ZSTD_MAGIC) && packed.len() * 3 < entry.len());
        assert_eq!(unpack("s.0", 1, &packed).expect("unpacks"), &entry[..]);
        // Small or incompressible: as it is, and read back as it is.
        for raw in [vec![0u8; 12], b"engine.shards 4\n".to_vec()] {
            assert_eq!(pack(&raw), &raw[..]);
            assert_eq!(unpack("s.0", 1, &raw).expect("as is"), &raw[..]);
        }
        // Not millrace's: a frame that lies about its size, or garbage
        // after the magic, is malformed, not a panic or a huge allocation.
        let mut bomb = zstd::bulk::compress(&vec![0u8; 1 << 20], 1).expect("compress");
        assert!(unpack("s.0", 1, &bomb).is_ok());
        bomb[4..].iter_mut().for_each(|b| *b = 0xff);
        assert!(unpack("s.0", 2, &bomb).is_err());
        let mut garbage = ZSTD_MAGIC.to_vec();
        garbage.extend_from_slice(b"not a frame");
        assert!(unpack("s.0", 3, &garbage).is_err());
    }

    #[test]
    fn part_headers_are_k_of_n() {
        assert_eq!(parse_part("1/3"), Some((1, 3)));
        assert_eq!(parse_part("3/3"), Some((3, 3)));
        for bad in ["0/3", "4/3", "1/0", "a/b", "1", "", "1/3/4", "-1/3"] {
            assert_eq!(parse_part(bad), None, "{bad}");
        }
    }
}
