//! The Kafka sink driven directly through the `Sink` calls the engine
//! makes, against a real Kafka-protocol broker (Tansu, started here on
//! 127.0.0.1; `make test-servers` fetches it, `MILLRACE_TANSU` overrides
//! where it is): restarts are new sinks opened at a chosen position, so
//! the order of re-deliveries is the test's, not a scheduler's.

use super::*;
use millrace_engine::Sink;
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};

/// A Tansu broker with in-memory storage, killed when dropped (the Kafka
/// source's tests start one too).
pub(in crate::kafka) struct Broker {
    pub(in crate::kafka) port: u16,
    child: Child,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tansu() -> std::path::PathBuf {
    std::env::var_os("MILLRACE_TANSU").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/tansu"),
        std::path::PathBuf::from,
    )
}

impl Broker {
    /// Starts a broker on a free port with the topic `topic` (one partition).
    fn start(topic: &str) -> Broker {
        Broker::start_with(topic, 1)
    }

    /// Starts a broker on a free port with the topic `topic` of `partitions`.
    pub(in crate::kafka) fn start_with(topic: &str, partitions: u32) -> Broker {
        let tansu = tansu();
        assert!(
            tansu.exists(),
            "the Kafka-protocol broker is missing at {}: run `make test-servers` \
             (or set MILLRACE_TANSU)",
            tansu.display()
        );
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(&tansu)
            .args(["broker", "--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the broker");
        let broker = Broker { port, child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the broker did not listen within 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = Command::new(&tansu)
            .args([
                "topic",
                "create",
                topic,
                "--broker",
                &url,
                "--partitions",
                &partitions.to_string(),
            ])
            .output()
            .expect("run tansu topic create");
        assert!(
            out.status.success(),
            "creating {topic}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        broker
    }

    /// The production ids in `topic`, with their offsets, in offset order.
    fn ids(&self, topic: &str) -> Vec<(i64, String)> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", format!("127.0.0.1:{}", self.port))
            .set("group.id", "millrace-sink-tests")
            .set("enable.partition.eof", "true")
            .create()
            .expect("a consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Beginning)
            .expect("tpl");
        c.assign(&tpl).expect("assign");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut ids = Vec::new();
        loop {
            assert!(Instant::now() < deadline, "reading {topic} took over 30 s");
            match c.poll(Duration::from_millis(100)) {
                None => {}
                Some(Err(KafkaError::PartitionEOF(_))) => return ids,
                Some(Err(e)) => panic!("reading {topic}: {e}"),
                Some(Ok(m)) => {
                    let id = m
                        .headers()
                        .and_then(|h| h.iter().find(|h| h.key == ID_HEADER))
                        .and_then(|h| h.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .unwrap_or_default();
                    ids.push((m.offset(), id));
                }
            }
        }
    }
}

/// A Kafka sink writing to `topic` on `broker`, started as `start` says
/// and opened at `position`.
fn sink(broker: &Broker, topic: &str, start: SinkStart, position: Option<&[u8]>) -> KafkaSink {
    sink_with(broker, topic, start, position, "")
}

/// [`sink`] with more options (`extra`, TOML lines).
fn sink_with(
    broker: &Broker,
    topic: &str,
    start: SinkStart,
    position: Option<&[u8]>,
    extra: &str,
) -> KafkaSink {
    let text = format!(
        "[sources.g]\ntype = \"generator\"\n\
         [sinks.k]\ntype = \"kafka\"\ninputs = [\"g\"]\nbrokers = \"127.0.0.1:{}\"\n\
         topic = \"{topic}\"\ntimeout = \"20s\"\n{extra}",
        broker.port
    );
    let c = crate::test_support::component_in(&text, "k");
    let mut s = build(&c).expect("a valid sink");
    s.starting(&start);
    s.open(position).expect("open");
    s
}

/// Delivers the production `edge/0/seq` to the sink.
fn deliver(s: &mut KafkaSink, edge: &str, seq: u64) {
    let record = Record {
        key: bytes::Bytes::from(format!("{edge}{seq}")),
        value: bytes::Bytes::from_static(b"v"),
        timestamp: 1_700_000_000_000_000,
    };
    let id = DeliveryId {
        edge,
        producer_shard: 0,
        seq,
    };
    s.write_delivered(&record, &id).expect("write");
}

/// Partition 0's offset in a committed position.
fn offset_in(position: &[u8]) -> i64 {
    parse_position(position).expect("a position")[&0]
}

#[test]
fn a_commit_never_passes_a_record_found_at_the_restart_and_not_yet_delivered_again() {
    let broker = Broker::start("out");
    // A first run commits x/0/1, then writes x/0/2 and y/0/1 and dies
    // before the engine's commit records them.
    let mut first = sink(&broker, "out", SinkStart::new(1), None);
    deliver(&mut first, "x", 1);
    let committed = first.flush(true).expect("flush");
    assert_eq!(offset_in(&committed), 1);
    deliver(&mut first, "x", 2);
    deliver(&mut first, "y", 1);
    first.flush(true).expect("flush");
    drop(first);
    let x2 = 1; // the offset of x/0/2

    // The restart re-delivers x from 2 and y from 1. The read-back finds
    // both; y comes first, and with a new record the sink commits.
    let start = SinkStart::new(2).applied("x", 0, 1).applied("y", 0, 0);
    let mut second = sink(&broker, "out", start, Some(&committed));
    deliver(&mut second, "y", 1);
    deliver(&mut second, "y", 2);
    let position = second.flush(true).expect("flush");
    assert!(
        offset_in(&position) <= x2,
        "the commit's position {} passed x/0/2 at offset {x2}, found by the read-back \
         and not yet delivered again",
        String::from_utf8_lossy(&position)
    );
    drop(second);

    // A second restart before x/0/2 came again: its read-back from that
    // position finds x/0/2, so its re-delivery is skipped.
    let start = SinkStart::new(3).applied("x", 0, 1).applied("y", 0, 2);
    let mut third = sink(&broker, "out", start, Some(&position));
    deliver(&mut third, "x", 2);
    third.flush(true).expect("flush");
    drop(third);

    let ids: Vec<String> = broker.ids("out").into_iter().map(|(_, id)| id).collect();
    assert_eq!(
        ids,
        ["x/0/1", "x/0/2", "y/0/1", "y/0/2"],
        "each production once"
    );
}

/// Calls `durable` until `done` says yes (at most 20 s); returns the last.
fn durable_until(s: &mut KafkaSink, what: &str, done: impl Fn(&KafkaSink, u64) -> bool) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let writes = s.durable().expect("durable").writes;
        if done(s, writes) {
            return writes;
        }
        assert!(Instant::now() < deadline, "{what} within 20 s");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_transactions_records_are_durable_only_once_it_committed_and_later_ones_wait_for_the_next() {
    let broker = Broker::start("tx");
    let mut s = sink_with(
        &broker,
        "tx",
        SinkStart::new(1),
        None,
        "transactional_id = \"sink-tests\"\ntransaction_interval = \"200ms\"\n",
    );
    deliver(&mut s, "x", 1);
    deliver(&mut s, "x", 2);
    // The transaction is open: nothing is durable, whatever the broker
    // acknowledged.
    assert_eq!(s.durable().expect("durable").writes, 0);
    // Its interval passed: its commit runs on the committer, and a record
    // written meanwhile is held for the next transaction.
    durable_until(&mut s, "the commit to start", |s, _| {
        s.transactions
            .as_ref()
            .is_some_and(Transactions::committing)
    });
    deliver(&mut s, "x", 3);
    assert_eq!(s.held.len(), 1, "written during the commit: held");
    // The commit returned: its two records are durable, the held one went
    // into the next transaction and is not, until that one commits too.
    let writes = durable_until(&mut s, "the commit to return", |_, w| w > 0);
    assert_eq!(writes, 2);
    assert!(s.held.is_empty(), "sent once the next transaction opened");
    durable_until(&mut s, "the next commit", |_, w| w == 3);
    drop(s);
    let ids: Vec<String> = broker.ids("tx").into_iter().map(|(_, id)| id).collect();
    assert_eq!(
        ids,
        ["x/0/1", "x/0/2", "x/0/3"],
        "each record once, in order"
    );
}

#[test]
fn a_skip_after_a_record_held_during_a_commit_waits_for_that_record_to_commit() {
    let broker = Broker::start("txskip");
    let tx = "transactional_id = \"sink-tests-skip\"\ntransaction_interval = \"200ms\"\n";
    // A first run wrote x/0/1 and died before the engine recorded it.
    let mut first = sink_with(&broker, "txskip", SinkStart::new(1), None, tx);
    deliver(&mut first, "x", 1);
    first.flush(true).expect("flush");
    drop(first);
    // The restart finds x/0/1; it will come again.
    let start = SinkStart::new(2).applied("x", 0, 0).applied("y", 0, 0);
    let mut s = sink_with(&broker, "txskip", start, None, tx);
    deliver(&mut s, "y", 1); // write 1, into the first transaction
    durable_until(&mut s, "the commit to start", |s, _| {
        s.transactions
            .as_ref()
            .is_some_and(Transactions::committing)
    });
    deliver(&mut s, "y", 2); // write 2: held
    deliver(&mut s, "x", 1); // write 3: a skip, after the held one
    let writes = durable_until(&mut s, "the commit to return", |_, w| w > 0);
    assert_eq!(writes, 1, "only the committed transaction's write");
    // y/0/2 went into the next transaction; the broker acknowledges it
    // long before that one commits. Neither it nor the skip after it is
    // durable until then.
    s.producer()
        .expect("open")
        .flush(Duration::from_secs(10))
        .expect("acknowledged");
    assert_eq!(s.durable().expect("durable").writes, 1);
    durable_until(&mut s, "the next commit", |_, w| w == 3);
    drop(s);
    let ids: Vec<String> = broker.ids("txskip").into_iter().map(|(_, id)| id).collect();
    assert_eq!(ids, ["x/0/1", "y/0/1", "y/0/2"], "each record once");
}

#[test]
fn a_transaction_stays_open_for_its_interval() {
    let broker = Broker::start("open");
    let mut s = sink_with(
        &broker,
        "open",
        SinkStart::new(1),
        None,
        "transactional_id = \"sink-tests-open\"\ntransaction_interval = \"30s\"\n",
    );
    deliver(&mut s, "x", 1);
    // Within its 30 s the open transaction is neither committed nor
    // committing, however often the engine asks what is durable, and a
    // record written meanwhile goes straight into it.
    for _ in 0..3 {
        assert_eq!(s.durable().expect("durable").writes, 0);
        assert!(!s
            .transactions
            .as_ref()
            .is_some_and(Transactions::committing));
    }
    deliver(&mut s, "x", 2);
    assert!(s.held.is_empty(), "no commit under way: nothing held");
    assert_eq!(s.durable().expect("durable").writes, 0);
}

#[test]
fn a_restart_before_the_first_commit_reads_back_what_the_first_run_wrote() {
    let broker = Broker::start("early");
    // The first run writes x/0/1 and dies before any commit.
    let mut first = sink(&broker, "early", SinkStart::new(1), None);
    deliver(&mut first, "x", 1);
    first.flush(true).expect("flush");
    drop(first);
    // The restart has no position, but it is not the first start: it
    // reads the topic back and skips x/0/1 when it comes again.
    let mut second = sink(&broker, "early", SinkStart::new(2).applied("x", 0, 0), None);
    deliver(&mut second, "x", 1);
    deliver(&mut second, "x", 2);
    second.flush(true).expect("flush");
    drop(second);
    let ids: Vec<String> = broker.ids("early").into_iter().map(|(_, id)| id).collect();
    assert_eq!(ids, ["x/0/1", "x/0/2"], "each production once");
}

#[test]
fn the_read_back_takes_the_connection_and_security_settings_and_no_other() {
    // No broker is contacted: building the sink only checks its options.
    let text = "[sources.g]\ntype = \"generator\"\n\
         [sinks.k]\ntype = \"kafka\"\ninputs = [\"g\"]\nbrokers = \"127.0.0.1:9\"\n\
         topic = \"t\"\n\
         properties = { \"security.protocol\" = \"plaintext\", \
         \"sasl.username\" = \"u\", \"linger.ms\" = 7 }\n";
    let c = crate::test_support::component_in(text, "k");
    let s = build(&c).expect("a valid sink");
    // (No `ssl.` setting: this build of librdkafka has no TLS.)
    for key in ["security.protocol", "sasl.username"] {
        assert_eq!(
            s.reader_config.get(key),
            s.producer_config.get(key),
            "{key}"
        );
        assert!(s.reader_config.get(key).is_some(), "{key}");
    }
    assert_eq!(s.producer_config.get("linger.ms"), Some("7"));
    assert_eq!(s.reader_config.get("linger.ms"), None);
}
