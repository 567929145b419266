//! The Kafka source driven through the `Source` calls the engine makes,
//! against a real Kafka-protocol broker (Tansu on 127.0.0.1, as the sink's
//! tests start it): which partitions a shard reads, where it starts and
//! resumes, and what its watermark says.

use super::*;
use crate::kafka::sink::tests::Broker;
use bytes::Bytes;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

/// Writes `(partition, key, Kafka timestamp in ms)` records (the key is
/// the value too) to `topic`, one batch each, and waits until the broker
/// has them. (Tansu answers a partition's end as the last batch's first
/// offset plus one: with several records in a batch, "latest" would
/// point inside it.)
fn produce(broker: &Broker, topic: &str, records: &[(i32, &str, i64)]) {
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", format!("127.0.0.1:{}", broker.port))
        .create()
        .expect("a producer");
    for (partition, key, ms) in records {
        p.send(
            BaseRecord::to(topic)
                .partition(*partition)
                .key(*key)
                .payload(*key)
                .timestamp(*ms),
        )
        .expect("send");
        p.flush(Duration::from_secs(20)).expect("flush");
    }
}

/// The Kafka source of `topic` on `broker` with `extra` (TOML lines), as
/// shard `index` of `count` (partitions idle after `idle_after` leave the
/// watermark), opened at `position`.
fn source(
    broker: &Broker,
    topic: &str,
    extra: &str,
    shard: (u32, u32, Option<Duration>),
    position: Option<&[u8]>,
) -> KafkaSource {
    source_named("k", broker, topic, extra, shard, position)
}

/// [`source`] named `name` (metrics are kept by component name).
fn source_named(
    name: &str,
    broker: &Broker,
    topic: &str,
    extra: &str,
    (index, count, idle_after): (u32, u32, Option<Duration>),
    position: Option<&[u8]>,
) -> KafkaSource {
    let text = format!(
        "[sources.{name}]\ntype = \"kafka\"\nbrokers = \"127.0.0.1:{}\"\ntopic = \"{topic}\"\n{extra}\n\
         [sinks.o]\ntype = \"stdout\"\ninputs = [\"{name}\"]\n",
        broker.port
    );
    let mut s = build(&crate::test_support::component_in(&text, name)).expect("a valid source");
    s.assign(&SourceShard {
        index,
        count,
        idle_after,
    })
    .expect("assign");
    s.open(position).expect("open");
    s
}

/// Polls until `n` records came (at most 30 s), then 300 ms more to see
/// that no more come; returns each record's key and event time.
fn read(s: &mut KafkaSource, n: usize) -> Vec<(String, EventTime)> {
    let mut emitted: Vec<(Bytes, Bytes, EventTime)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut settled: Option<Instant> = None;
    loop {
        let mut out = Emitter::new(&mut emitted);
        s.poll(&mut out, 100).expect("poll");
        assert!(out.bad().is_empty(), "bad records: {:?}", out.bad());
        if emitted.len() >= n {
            let since = *settled.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_millis(300) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} records within 30 s",
            emitted.len()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    emitted
        .into_iter()
        .map(|(k, _, ts)| (String::from_utf8_lossy(&k).into_owned(), ts))
        .collect()
}

fn keys(records: &[(String, EventTime)]) -> Vec<&str> {
    records.iter().map(|(k, _)| k.as_str()).collect()
}

#[test]
fn a_shard_reads_its_own_partitions_from_the_earliest_record_in_offset_order() {
    let broker = Broker::start_with("four", 4);
    let mut records = Vec::new();
    let names: Vec<String> = (0..4)
        .flat_map(|p| (0..3).map(move |i| format!("p{p}-{i}")))
        .collect();
    for (n, name) in names.iter().enumerate() {
        let (p, i) = (n as i32 / 3, n as i64 % 3);
        records.push((p, name.as_str(), 1_000 + i * 10 + p as i64));
    }
    produce(&broker, "four", &records);
    // Shard 1 of 2: the second and fourth partitions.
    let mut s = source(&broker, "four", "", (1, 2, None), None);
    let got = read(&mut s, 6);
    let of = |p: &str| -> Vec<(String, EventTime)> {
        got.iter()
            .filter(|(k, _)| k.starts_with(p))
            .cloned()
            .collect()
    };
    let (p1, p3) = (of("p1-"), of("p3-"));
    assert_eq!(keys(&p1), ["p1-0", "p1-1", "p1-2"], "{got:?}");
    assert_eq!(keys(&p3), ["p3-0", "p3-1", "p3-2"], "{got:?}");
    assert_eq!(got.len(), 6, "{got:?}");
    // Event time: the Kafka timestamp, in microseconds.
    assert_eq!(p1[2].1, 1_021_000);
    assert_eq!(p3[0].1, 1_003_000);
    assert_eq!(s.position(), b"v1 1:3,3:3");
    // The lower of the two partitions' newest times.
    assert_eq!(s.watermark(), Some(1_021_000));
}

#[test]
fn a_source_resumes_at_its_position_and_start_decides_only_without_one() {
    let broker = Broker::start_with("one", 1);
    let names = ["r0", "r1", "r2", "r3", "r4"];
    let records: Vec<(i32, &str, i64)> = names
        .iter()
        .enumerate()
        .map(|(i, k)| (0, *k, 1_000 + i as i64))
        .collect();
    produce(&broker, "one", &records);
    let one = |extra: &str, position: Option<&[u8]>| {
        source(&broker, "one", extra, (0, 1, None), position)
    };
    // A position wins over `start`.
    let mut s = one("start = \"latest\"", Some(b"v1 0:2"));
    assert_eq!(keys(&read(&mut s, 3)), ["r2", "r3", "r4"]);
    assert_eq!(s.position(), b"v1 0:5");
    // Without one: the end, so only what comes next.
    let mut latest = one("start = \"latest\"", None);
    assert_eq!(read(&mut latest, 0), []);
    assert_eq!(latest.position(), b"v1 0:5");
    produce(&broker, "one", &[(0, "r5", 1_005)]);
    assert_eq!(keys(&read(&mut latest, 1)), ["r5"]);
    // An offset named; the start.
    let mut at = one("start = { offsets = { \"0\" = 4 } }", None);
    assert_eq!(keys(&read(&mut at, 2)), ["r4", "r5"]);
    // (`start = { timestamp_ms = N }` is not tested here: Tansu answers a
    // lookup by time with the partition's start whatever the time.)
    let mut earliest = one("", None);
    assert_eq!(read(&mut earliest, 6).len(), 6);
}

#[test]
fn only_the_partitions_named_are_read_and_a_missing_one_is_retried_not_read() {
    let broker = Broker::start_with("three", 3);
    produce(
        &broker,
        "three",
        &[
            (0, "a", 1_000),
            (1, "b", 1_000),
            (2, "c", 1_000),
            (2, "d", 1_001),
        ],
    );
    let mut s = source(&broker, "three", "partitions = [2]", (0, 1, None), None);
    assert_eq!(keys(&read(&mut s, 2)), ["c", "d"]);
    assert_eq!(s.position(), b"v1 2:2");
    // A partition the topic does not have: nothing is read, the client is
    // dropped and retried later, and the position keeps what it had.
    let mut missing = source(
        &broker,
        "three",
        "partitions = [1, 7]",
        (0, 1, None),
        Some(b"v1 1:0"),
    );
    assert!(missing.consumer.is_none());
    assert!(missing.retry_at > Instant::now());
    assert_eq!(read(&mut missing, 0), []);
    assert_eq!(missing.position(), b"v1 1:0");
}

#[test]
fn an_idle_partition_stops_holding_the_watermark_back() {
    let broker = Broker::start_with("two", 2);
    produce(&broker, "two", &[(0, "a", 5_000)]);
    let idle = Duration::from_millis(800);
    let mut s = source(&broker, "two", "", (0, 1, Some(idle)), None);
    let assigned = Instant::now();
    assert_eq!(keys(&read(&mut s, 1)), ["a"]);
    // Partition 1 gave nothing yet, but was assigned just now: it holds
    // the watermark at the beginning of time until it counts as idle.
    if assigned.elapsed() < idle {
        assert_eq!(s.watermark(), Some(MIN_TIME));
    }
    // Later, partition 0 gives a record and partition 1 still nothing: the
    // watermark is partition 0's alone.
    std::thread::sleep(idle);
    produce(&broker, "two", &[(0, "b", 6_000)]);
    assert_eq!(keys(&read(&mut s, 1)), ["b"]);
    assert_eq!(s.watermark(), Some(6_000_000));
}

/// Sets partition `id`'s next offset as a committed position past what the
/// broker holds would (a broker that came back empty).
fn set_next(s: &mut KafkaSource, id: i32, next: i64) {
    s.parts
        .iter_mut()
        .find(|p| p.id == id)
        .expect("the partition")
        .next = next;
}

#[test]
fn a_partition_that_lost_the_position_is_stopped_or_reset_as_on_offset_reset_says() {
    let broker = Broker::start_with("reset", 2);
    let records: Vec<(i32, String, i64)> = (0..3)
        .flat_map(|i| {
            [
                (0, format!("a{i}"), 1_000 + i),
                (1, format!("b{i}"), 1_000 + i),
            ]
        })
        .collect();
    let records: Vec<(i32, &str, i64)> = records
        .iter()
        .map(|(p, k, t)| (*p, k.as_str(), *t))
        .collect();
    produce(&broker, "reset", &records);
    let open = |on: &str| {
        let mut s = source(
            &broker,
            "reset",
            &format!("on_offset_reset = \"{on}\""),
            (0, 1, None),
            None,
        );
        assert_eq!(read(&mut s, 6).len(), 6);
        s
    };
    // The statistics' bounds: partition 1's end (3) is below its next
    // offset (9); partition 0 holds its position; a partition with no
    // fetch answer yet (a negative end) says nothing.
    let bounds = BTreeMap::from([(0, (0, 3)), (1, (-1, 3)), (5, (0, -1))]);
    for (on, next_of_1) in [("earliest", 0), ("latest", 3)] {
        let mut s = open(on);
        set_next(&mut s, 1, 9);
        let consumer = s.consumer.clone().expect("connected");
        assert!(s.check_bounds(&consumer, &bounds), "{on}");
        assert_eq!(s.parts[1].next, next_of_1, "{on}");
        assert_eq!(s.parts[0].next, 3, "{on}: partition 0 untouched");
        assert!(s.stopped.is_empty(), "{on}");
        // Nothing behind: nothing done.
        assert!(!s.check_bounds(&consumer, &BTreeMap::from([(0, (0, 3)), (1, (0, 3))])));
    }
    // `fail`: the partition is left out and not read again.
    let mut s = open("fail");
    set_next(&mut s, 1, 9);
    let consumer = s.consumer.clone().expect("connected");
    assert!(s.check_bounds(&consumer, &bounds));
    assert!(s.stopped.contains_key(&1), "{:?}", s.stopped);
    assert_eq!(s.parts[1].next, 9, "its position is kept");
    let assigned = consumer.assignment().expect("assignment");
    assert!(assigned.find_partition("reset", 0).is_some());
    assert!(
        assigned.find_partition("reset", 1).is_none(),
        "a stopped partition is no longer fetched"
    );
    // `/healthz` names the partition and why.
    let reported = millrace_engine::health::problems();
    assert!(
        reported
            .iter()
            .any(|(what, why)| what == "kafka source `k` partition 1"
                && why.contains("does not hold the committed position")),
        "{reported:?}"
    );
    produce(&broker, "reset", &[(0, "a3", 1_003), (1, "b3", 1_003)]);
    assert_eq!(keys(&read(&mut s, 1)), ["a3"]);
    assert_eq!(s.position(), b"v1 0:4,1:9");
    // A stopped partition is not looked at again.
    assert!(!s.check_bounds(&consumer, &BTreeMap::from([(0, (0, 4)), (1, (0, 4))])));
}

#[test]
fn after_offset_out_of_range_the_partitions_bounds_are_asked_for() {
    let broker = Broker::start_with("listed", 2);
    produce(&broker, "listed", &[(0, "a", 1_000), (1, "b", 1_000)]);
    let mut s = source(
        &broker,
        "listed",
        "on_offset_reset = \"earliest\"",
        (0, 1, None),
        None,
    );
    assert_eq!(read(&mut s, 2).len(), 2);
    // Partition 1 past the broker's end; partition 0 inside its bounds.
    set_next(&mut s, 1, 7);
    let consumer = s.consumer.clone().expect("connected");
    s.check_listed_bounds(&consumer);
    assert_eq!(s.parts[1].next, 0);
    assert_eq!(s.parts[0].next, 1);
    // Read again from its start, partition 0 from where it was.
    assert_eq!(keys(&read(&mut s, 1)), ["b"]);
    assert_eq!(s.position(), b"v1 0:1,1:1");
    // Below the start counts too.
    set_next(&mut s, 0, -5);
    s.check_listed_bounds(&consumer);
    assert_eq!(s.parts[0].next, 0);
    // Inside the bounds: nothing changes.
    set_next(&mut s, 0, 1);
    s.check_listed_bounds(&consumer);
    assert_eq!((s.parts[0].next, s.parts[1].next), (1, 1));
}

#[test]
fn the_clients_statistics_give_each_partitions_bounds_and_lag() {
    let broker = Broker::start_with("stats", 2);
    produce(
        &broker,
        "stats",
        &[(0, "a", 1_000), (0, "b", 1_001), (1, "c", 1_000)],
    );
    let mut s = source_named(
        "lagged",
        &broker,
        "stats",
        "",
        (0, 1, None),
        Some(b"v1 0:1,1:0"),
    );
    // From the positions on, in no order across the two partitions.
    let records = read(&mut s, 2);
    let mut got = keys(&records);
    got.sort_unstable();
    assert_eq!(got, ["b", "c"]);
    // librdkafka's statistics come every second; the source takes the
    // bounds they give between polled records, so they are read here as
    // the poll loop would find them.
    let consumer = s.consumer.clone().expect("connected");
    let deadline = Instant::now() + Duration::from_secs(10);
    let bounds = loop {
        let _ = consumer.poll(Duration::from_millis(100));
        if let Some(b) = consumer.context().bounds.lock().take() {
            if b.get(&0).is_some_and(|(_, high)| *high >= 0)
                && b.get(&1).is_some_and(|(_, high)| *high >= 0)
            {
                break b;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no statistics with both partitions' bounds in 10 s"
        );
    };
    assert_eq!(bounds, BTreeMap::from([(0, (0, 2)), (1, (0, 1))]));
    // The lag, from those bounds and the source's own position.
    assert!(!s.check_bounds(&consumer, &bounds));
    set_next(&mut s, 0, 1);
    assert!(!s.check_bounds(&consumer, &bounds));
    // Lag per partition read (0: everything read), and nothing for
    // librdkafka's internal partition -1.
    let lag = |p: &str| {
        let families = prometheus::gather();
        families
            .iter()
            .find(|f| f.get_name() == "millrace_kafka_consumer_lag_records")
            .and_then(|f| {
                f.get_metric().iter().find(|m| {
                    m.get_label()
                        .iter()
                        .any(|l| l.get_name() == "component" && l.get_value() == "lagged")
                        && m.get_label()
                            .iter()
                            .any(|l| l.get_name() == "partition" && l.get_value() == p)
                })
            })
            .map(|m| m.get_gauge().get_value())
    };
    assert_eq!(lag("0"), Some(1.0));
    assert_eq!(lag("1"), Some(0.0));
    assert_eq!(lag("-1"), None);
}

#[test]
fn a_lost_broker_is_reported_and_the_client_replaced_and_a_broker_up_clears_it() {
    let broker = Broker::start_with("lost", 1);
    produce(&broker, "lost", &[(0, "a", 1_000)]);
    let mut s = source_named("lostsrc", &broker, "lost", "", (0, 1, None), None);
    assert_eq!(keys(&read(&mut s, 1)), ["a"]);
    let health = || {
        millrace_engine::health::problems()
            .into_iter()
            .find(|(what, _)| what == "kafka source `lostsrc`")
    };
    // The statistics of a client whose broker is up clear a report.
    millrace_engine::health::report("kafka source `lostsrc`", "an earlier problem");
    let deadline = Instant::now() + Duration::from_secs(10);
    while health().is_some() {
        assert!(Instant::now() < deadline, "still reported: {:?}", health());
        let mut emitted = Vec::new();
        s.poll(&mut Emitter::new(&mut emitted), 100).expect("poll");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Every broker gone: reported, and the client is let go (a new one is
    // made once a broker answers); the position stays.
    drop(broker);
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.consumer.is_some() {
        assert!(Instant::now() < deadline, "the client was kept for 30 s");
        let mut emitted = Vec::new();
        s.poll(&mut Emitter::new(&mut emitted), 100).expect("poll");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        health().is_some(),
        "{:?}",
        millrace_engine::health::problems()
    );
    assert_eq!(s.position(), b"v1 0:1");
}

#[test]
fn a_replaced_client_goes_on_where_its_partitions_were() {
    let broker = Broker::start_with("again", 1);
    produce(&broker, "again", &[(0, "a", 1_000), (0, "b", 2_000)]);
    // Opened at offset 0 with `start = "latest"`: a new client would begin
    // at the position or the end, unless the partitions' own state is kept.
    let mut s = source(
        &broker,
        "again",
        "start = \"latest\"",
        (0, 1, None),
        Some(b"v1 0:0"),
    );
    assert_eq!(keys(&read(&mut s, 2)), ["a", "b"]);
    assert_eq!(s.watermark(), Some(2_000_000));
    s.replace_client();
    produce(&broker, "again", &[(0, "c", 1_500)]);
    assert_eq!(keys(&read(&mut s, 1)), ["c"]);
    assert!(s.consumer.is_some());
    // The newest event time read before the new client is kept.
    assert_eq!(s.watermark(), Some(2_000_000));
    assert_eq!(s.position(), b"v1 0:3");
}

#[test]
fn a_poll_says_ready_with_records_idle_without_and_takes_at_most_max() {
    let broker = Broker::start_with("ready", 1);
    let mut s = source(&broker, "ready", "", (0, 1, None), None);
    let mut emitted = Vec::new();
    for _ in 0..20 {
        let polled = s.poll(&mut Emitter::new(&mut emitted), 100).expect("poll");
        assert!(matches!(polled, SourcePoll::Idle), "nothing to read yet");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(emitted.is_empty());
    produce(
        &broker,
        "ready",
        &[(0, "a", 1_000), (0, "b", 1_001), (0, "c", 1_002)],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while emitted.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "{} of 3 records in 30 s",
            emitted.len()
        );
        let before = emitted.len();
        let polled = s.poll(&mut Emitter::new(&mut emitted), 2).expect("poll");
        let got = emitted.len() - before;
        assert!(
            got <= 2,
            "a poll took {got} records, more than it was asked for"
        );
        assert_eq!(
            matches!(polled, SourcePoll::Ready),
            got > 0,
            "{got} records"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
