use super::*;

fn parse(text: &str) -> Result<Topology, ConfigError> {
    Topology::parse_str("t.toml", text)
}

fn err(text: &str) -> ConfigError {
    parse(text).expect_err("topology should be rejected")
}

const GOOD: &str = r#"
[service]
data_dir = "/tmp/x"

[engine]
shards = 4
commit_interval = "5ms"

[sources.lines]
type = "file"
path = "in.txt"

[computations.words]
type = "split"
inputs = ["lines"]

[computations.counts]
type = "count"
inputs = [{ from = "words", key = "value" }, { from = "words.errors", key = "field:1", delimiter = ";" }]

[sinks.out]
type = "file"
inputs = ["counts"]
path = "out.jsonl"
"#;

#[test]
fn a_good_topology_parses_with_defaults() {
    let t = parse(GOOD).expect("valid");
    assert_eq!(t.engine.shards, 4);
    assert_eq!(t.engine.commit_interval, Duration::from_millis(5));
    assert_eq!(t.engine.durability, Durability::Process);
    assert_eq!(t.service.http.as_deref(), Some("127.0.0.1:9464"));
    let counts = t.component("counts").expect("counts");
    assert_eq!(counts.inputs[0].key, KeyExtractor::Value);
    assert_eq!(
        counts.inputs[1].key,
        KeyExtractor::Field {
            index: 1,
            delimiter: ";".into()
        }
    );
    assert_eq!(counts.inputs[1].stream.output.as_deref(), Some("errors"));
    assert_eq!(
        t.sinks()[0].options.table()["path"].as_str(),
        Some("out.jsonl")
    );
}

#[test]
fn the_commit_interval_defaults_by_durability_and_a_set_one_wins() {
    let with = |engine: &str| {
        let text = GOOD.replace("commit_interval = \"5ms\"", engine);
        parse(&text).expect("valid").engine.commit_interval
    };
    assert_eq!(with(""), Duration::from_millis(2));
    assert_eq!(with("durability = \"machine\""), Duration::from_millis(8));
    assert_eq!(
        with("durability = \"machine\"\ncommit_interval = \"1ms\""),
        Duration::from_millis(1)
    );
}

#[test]
fn unknown_top_level_key_names_line_and_key() {
    let e = err("[engine]\nshards = 2\nshardz = 3\n[sources.a]\ntype='generator'\n");
    assert_eq!(e.line(), Some(3));
    assert!(e.to_string().contains("shardz"), "{e}");
}

#[test]
fn unknown_input_is_an_error_at_the_inputs_line() {
    let e = err("[sources.a]\ntype='generator'\n[sinks.o]\ntype='stdout'\ninputs=['b']\n");
    assert_eq!(e.line(), Some(5));
    assert_eq!(e.key(), Some("sinks.o.inputs"));
    assert!(e.to_string().contains("unknown input `b`"), "{e}");
}

#[test]
fn cycles_are_errors() {
    let e = err("[sources.s]\ntype='generator'\n[computations.a]\ntype='map'\ninputs=['s','b']\n[computations.b]\ntype='map'\ninputs=['a']\n");
    assert!(e.to_string().contains("cycle"), "{e}");
    assert!(
        e.to_string().contains("a -> b -> a") || e.to_string().contains("b -> a -> b"),
        "{e}"
    );
}

#[test]
fn missing_type_and_inputs_are_errors() {
    let e = err("[sources.s]\npath='x'\n");
    assert!(e.to_string().contains("missing required key `type`"), "{e}");
    let e = err("[sources.s]\ntype='generator'\n[sinks.o]\ntype='stdout'\n");
    assert!(
        e.to_string().contains("missing required key `inputs`"),
        "{e}"
    );
}

#[test]
fn bad_values_are_errors() {
    let e = err("[engine]\ncommit_interval = '5 parsecs'\n[sources.s]\ntype='generator'\n");
    assert_eq!(e.line(), Some(2));
    assert!(e.to_string().contains("unknown unit"), "{e}");
    let e = err("[engine]\nshards = 0\n[sources.s]\ntype='generator'\n");
    assert!(e.to_string().contains("engine.shards"), "{e}");
    let e = err("[engine]\ndurability = 'disk'\n[sources.s]\ntype='generator'\n");
    assert!(e.to_string().contains("disk"), "{e}");
    let e = err("[sources.s]\ntype='generator'\n[sinks.o]\ntype='stdout'\ninputs=[{from='s', key='bogus'}]\n");
    assert!(e.to_string().contains("unknown key extractor"), "{e}");
}

#[test]
fn sinks_are_not_streams_and_inputs_are_not_repeated() {
    let e = err("[sources.s]\ntype='generator'\n[sinks.o]\ntype='stdout'\ninputs=['s']\n[sinks.p]\ntype='stdout'\ninputs=['o']\n");
    assert!(e.to_string().contains("is a sink"), "{e}");
    let e = err("[sources.s]\ntype='generator'\n[sinks.o]\ntype='stdout'\ninputs=['s','s']\n");
    assert!(e.to_string().contains("listed twice"), "{e}");
}

#[test]
fn options_parse_strictly_and_locate_unknown_keys() {
    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct FileOpts {
        path: String,
    }
    let t = parse("[sources.s]\ntype='file'\npath='a'\npaht='b'\n").expect("wiring is fine");
    let e = t.sources()[0]
        .options
        .parse::<FileOpts>()
        .expect_err("typo");
    assert_eq!(e.line(), Some(4));
    assert!(e.to_string().contains("paht"), "{e}");
}

#[test]
fn a_commit_log_is_parsed_and_every_mistake_in_it_is_named() {
    assert_eq!(parse(GOOD).expect("parses").state, StateConfig::default());
    let with = |state: &str| format!("[state]\n{state}\n{GOOD}");
    let t = parse(&with(
        r#"log = "nats://127.0.0.1:4222,127.0.0.1:4223/orders-eu"
log_replicas = 1
log_timeout = "5s"
snapshots = "file:///var/millrace/snapshots"
snapshot_log_bytes = 1048576"#,
    ))
    .expect("parses");
    assert_eq!(
        t.state.log,
        Some(CommitLogConfig {
            servers: vec!["127.0.0.1:4222".into(), "127.0.0.1:4223".into()],
            name: "orders-eu".into(),
            replicas: 1,
            timeout: Duration::from_secs(5),
            snapshots: Some("file:///var/millrace/snapshots".into()),
            snapshot_log_bytes: 1 << 20,
        })
    );
    for ok in [
        "nats://[::1]:4222/x",
        "nats://log-1.example.com:4222,10.0.0.7:4223/x",
        "nats://nats-0.nats.svc.cluster.local:4222,3com.example:4222/x",
    ] {
        parse(&with(&format!("log = \"{ok}\""))).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    let defaults = parse(&with(r#"log = "nats://h:4222/x""#)).expect("parses");
    let log = defaults.state.log.expect("a log");
    assert_eq!((log.replicas, log.timeout), (3, Duration::from_secs(30)));
    assert_eq!((log.snapshots, log.snapshot_log_bytes), (None, 64 << 20));
    for (state, says) in [
        (r#"log = "kafka://h:9092/x""#, "not a nats:// URL"),
        (r#"log = "nats://h:4222""#, "names no deployment"),
        (r#"log = "nats://h:4222/a.b""#, "the name must be"),
        (r#"log = "nats://h:4222/""#, "the name must be"),
        (r#"log = "nats://h/x""#, "is not HOST:PORT"),
        (r#"log = "nats://h:0/x""#, "is not HOST:PORT"),
        (r#"log = "nats://h:4222,/x""#, "is not HOST:PORT"),
        (
            "log = \"nats://h:4222/x\"\nlog_replicas = 0",
            "must be 1 to 5",
        ),
        (
            "log = \"nats://h:4222/x\"\nlog_replicas = 7",
            "must be 1 to 5",
        ),
        (
            "log = \"nats://h:4222/x\"\nlog_timeout = \"0s\"",
            "must be 1s to 60s",
        ),
        (
            "log = \"nats://h:4222/x\"\nlog_timeout = \"1ms\"",
            "must be 1s to 60s",
        ),
        (
            "log = \"nats://h:4222/x\"\nlog_timeout = \"61s\"",
            "must be 1s to 60s",
        ),
        (r#"log = "nats://h h:1/x""#, "is not HOST:PORT"),
        (r#"log = "nats:// h:1/x""#, "is not HOST:PORT"),
        (r#"log = "nats://::1:4222/x""#, "is not HOST:PORT"),
        (r#"log = "nats://-h:4222/x""#, "is not HOST:PORT"),
        (r#"log = "nats://h-.example:4222/x""#, "is not HOST:PORT"),
        (r#"log = "nats://a..b:4222/x""#, "is not HOST:PORT"),
        (r#"log = "nats://10.0.0.999:4222/x""#, "is not HOST:PORT"),
        (r#"log = "nats://10.0.1:4222/x""#, "is not HOST:PORT"),
        (r#"log = "nats://h:+1/x""#, "the port is 1 to 65535"),
        (r#"log = "nats://h:65536/x""#, "the port is 1 to 65535"),
        (r#"log = "nats://@:1/x""#, "credentials"),
        (
            r#"log = "nats://alice:s3cret@h:4222/x""#,
            "does not authenticate",
        ),
        (
            "log = \"nats://h:4222/x\"\nsnapshot_log_bytes = 1048576",
            "no snapshots are set",
        ),
        ("log_replicas = 3", "need a log"),
        ("snapshots = \"file:///x\"", "need a log"),
        (
            "log = \"nats://h:4222/x\"\nsnapshots = \"ftp://x\"",
            "snapshots",
        ),
        (
            "log = \"nats://h:4222/x\"\nsnapshots = \"file:///x\"\nsnapshot_log_bytes = 10",
            "at least 4096",
        ),
        ("logs = \"nats://h:4222/x\"", "unknown field"),
    ] {
        let e = err(&with(state)).to_string();
        assert!(e.contains(says) && e.contains("state"), "{state}: {e}");
    }
}
