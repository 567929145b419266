//! A real Kafka-protocol broker for tests: Tansu (a static binary that
//! `make test-servers` fetches into `target/tools/tansu`), started on 127.0.0.1
//! with in-memory storage, and a small client to fill and read topics.
#![allow(dead_code)]

use super::{free_port, wait_until, Running};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where `make test-servers` puts the broker (or `MILLRACE_TANSU`).
pub fn tansu_path() -> PathBuf {
    std::env::var_os("MILLRACE_TANSU").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/tools/tansu"),
        PathBuf::from,
    )
}

/// One record read back from a topic.
#[derive(Debug, Clone)]
pub struct Read {
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    pub value: String,
    pub timestamp: Option<i64>,
    pub id: Option<String>,
}

/// A broker process, killed when dropped.
pub struct Broker {
    pub port: u16,
    process: Running,
}

impl Broker {
    /// Starts a broker on a free port of 127.0.0.1 and waits until it listens.
    pub fn start() -> Broker {
        Broker::start_on(free_port())
    }

    /// Starts a broker on `port`.
    pub fn start_on(port: u16) -> Broker {
        Broker::start_advertising(port, port)
    }

    /// Starts a broker listening on `port` that tells clients to connect to
    /// `advertised` (a proxy in front of it).
    pub fn start_advertising(port: u16, advertised: u16) -> Broker {
        let tansu = tansu_path();
        assert!(
            tansu.exists(),
            "the Kafka-protocol broker is missing at {}: run `make test-servers` (it fetches Tansu)",
            tansu.display()
        );
        let url = format!("tcp://127.0.0.1:{port}");
        let advertised_url = format!("tcp://127.0.0.1:{advertised}");
        let child = Command::new(&tansu)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised_url,
                "--storage-engine",
                "memory://tansu/",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the broker");
        let broker = Broker {
            port,
            process: Running(child),
        };
        assert!(
            wait_until(Duration::from_secs(20), || {
                TcpStream::connect(("127.0.0.1", port)).is_ok()
            }),
            "the broker did not listen on {port} within 20 s"
        );
        broker
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Creates `topic` with `partitions` partitions.
    pub fn create_topic(&self, topic: &str, partitions: u32) {
        let out = Command::new(tansu_path())
            .args([
                "topic",
                "create",
                topic,
                "--broker",
                &format!("tcp://127.0.0.1:{}", self.port),
                "--partitions",
                &partitions.to_string(),
            ])
            .output()
            .expect("run tansu topic create");
        assert!(
            out.status.success(),
            "creating topic {topic}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Produces `(key, value, timestamp ms)` records to `partition`, waiting
    /// for every acknowledgement.
    pub fn produce(&self, topic: &str, partition: i32, records: &[(String, String, i64)]) {
        Client::new(self.port).produce(topic, partition, records)
    }

    /// Every record of `topic` (see [`Client::read_all`]).
    pub fn read_all(&self, topic: &str) -> Vec<Read> {
        Client::new(self.port).read_all(topic)
    }
}

/// A client of the broker on `port` (for other threads of a test).
pub struct Client {
    port: u16,
}

impl Client {
    pub fn new(port: u16) -> Client {
        Client { port }
    }

    fn config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", format!("127.0.0.1:{}", self.port));
        c
    }

    /// An idempotent producer to the broker.
    pub fn producer(&self) -> BaseProducer {
        self.config()
            .set("enable.idempotence", "true")
            .create()
            .expect("test producer")
    }

    /// A transactional producer under `id`, its transactions initialised.
    pub fn transactional_producer(&self, id: &str) -> BaseProducer {
        let p: BaseProducer = self
            .config()
            .set("transactional.id", id)
            .create()
            .expect("test producer");
        p.init_transactions(Duration::from_secs(30))
            .expect("init transactions");
        p
    }

    /// Produces `(key, value, timestamp ms)` records to `partition`, waiting
    /// for every acknowledgement.
    pub fn produce(&self, topic: &str, partition: i32, records: &[(String, String, i64)]) {
        let p = self.producer();
        for r in records {
            queue(&p, topic, partition, r);
        }
        p.flush(Duration::from_secs(30))
            .expect("test producer flush");
    }

    /// Produces the records one request each (flushing after each), so
    /// that each is its own record batch.
    pub fn produce_each(&self, topic: &str, partition: i32, records: &[(String, String, i64)]) {
        let p = self.producer();
        for r in records {
            queue(&p, topic, partition, r);
            p.flush(Duration::from_secs(30))
                .expect("test producer flush");
        }
    }

    /// Every record of `topic`, partition by partition in offset order: read
    /// from the start of each partition until the broker says it is at the
    /// end (a fetch's end-of-partition; the broker's listed offsets are not
    /// relied on).
    pub fn read_all(&self, topic: &str) -> Vec<Read> {
        let c: BaseConsumer = self
            .config()
            .set("group.id", "millrace-tests-reader")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .create()
            .expect("test consumer");
        let md = c
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        let parts: Vec<i32> = md.topics()[0].partitions().iter().map(|p| p.id()).collect();
        let mut tpl = TopicPartitionList::new();
        for &p in &parts {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .expect("tpl");
        }
        let mut pending: std::collections::BTreeSet<i32> = parts.iter().copied().collect();
        c.assign(&tpl).expect("assign");
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !pending.is_empty() {
            assert!(Instant::now() < deadline, "reading {topic} took over 60 s");
            let m = match c.poll(Duration::from_millis(100)) {
                None => continue,
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                    pending.remove(&p);
                    continue;
                }
                Some(m) => m.expect("fetch"),
            };
            let text =
                |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
            out.push(Read {
                partition: m.partition(),
                offset: m.offset(),
                key: text(m.key()),
                value: text(m.payload()),
                timestamp: m.timestamp().to_millis(),
                id: m.headers().and_then(|h| {
                    h.iter()
                        .find(|h| h.key == "millrace-id")
                        .map(|h| text(h.value))
                }),
            });
        }
        out.sort_by_key(|r| (r.partition, r.offset));
        out
    }
}

/// Queues one `(key, value, timestamp ms)` record on `p`.
pub fn queue(p: &BaseProducer, topic: &str, partition: i32, (k, v, ts): &(String, String, i64)) {
    let mut rec = BaseRecord::to(topic)
        .key(k.as_bytes())
        .payload(v.as_bytes())
        .partition(partition)
        .timestamp(*ts);
    loop {
        match p.send(rec) {
            Ok(()) => return,
            Err((_, back)) => {
                p.poll(Duration::from_millis(20));
                rec = back;
            }
        }
    }
}

/// Sends one record on `p` and waits for its acknowledgement.
pub fn send(p: &BaseProducer, topic: &str, partition: i32, record: &(String, String, i64)) {
    queue(p, topic, partition, record);
    p.flush(Duration::from_secs(30))
        .expect("test producer flush");
}
