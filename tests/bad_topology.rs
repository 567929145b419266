//! Each kind of malformed topology is refused with an error naming the file,
//! the line and the key; nothing panics.

mod support;

use support::*;

const HEAD: &str = "[sources.gen]\ntype = \"generator\"\ncount = 10\n";

/// (what, topology, expected line, text the error must contain)
fn cases() -> Vec<(&'static str, String, usize, &'static str)> {
    vec![
        ("unknown engine key", format!("[engine]\nshards = 2\nshardz = 3\n{HEAD}"), 3, "shardz"),
        ("unknown top-level table", format!("{HEAD}[sinkz.out]\ntype = \"stdout\"\n"), 4, "sinkz"),
        (
            "unknown input",
            format!("{HEAD}[sinks.out]\ntype = \"stdout\"\ninputs = [\"nothing\"]\n"),
            6,
            "unknown input `nothing`",
        ),
        (
            "cycle",
            format!(
                "{HEAD}[computations.a]\ntype = \"count\"\ninputs = [\"gen\", \"b\"]\n[computations.b]\ntype = \"count\"\ninputs = [\"a\"]\n"
            ),
            6,
            "cycle",
        ),
        (
            "cluster worker listed twice",
            format!("[cluster]\n[[cluster.workers]]\nid = \"a\"\naddress = \"127.0.0.1:1\"\n[[cluster.workers]]\nid = \"a\"\naddress = \"127.0.0.1:2\"\n{HEAD}"),
            6,
            "worker id `a` is listed twice",
        ),
        (
            "cluster address without a port",
            format!("[cluster]\n[[cluster.workers]]\nid = \"a\"\naddress = \"localhost\"\n{HEAD}"),
            4,
            "is not host:port",
        ),
        (
            "unknown cluster key",
            format!("[cluster]\nsecrets = \"x\"\n[[cluster.workers]]\nid = \"a\"\naddress = \"127.0.0.1:1\"\n{HEAD}"),
            2,
            "secrets",
        ),
        ("missing type", "[sources.gen]\ncount = 10\n".to_owned(), 1, "missing required key `type`"),
        (
            "missing inputs",
            format!("{HEAD}[sinks.out]\ntype = \"stdout\"\n"),
            4,
            "missing required key `inputs`",
        ),
        (
            "bad duration",
            format!("[engine]\ncommit_interval = \"2 fortnights\"\n{HEAD}"),
            2,
            "commit_interval",
        ),
        ("bad durability", format!("[engine]\ndurability = \"disk\"\n{HEAD}"), 2, "durability"),
        ("zero shards", format!("[engine]\nshards = 0\n{HEAD}"), 2, "engine.shards"),
        (
            "unknown kind",
            format!("{HEAD}[computations.c]\ntype = \"cuont\"\ninputs = [\"gen\"]\n"),
            5,
            "unknown computation type `cuont`",
        ),
        (
            "unknown option of a kind",
            "[sources.gen]\ntype = \"generator\"\ncuont = 10\n".to_owned(),
            3,
            "cuont",
        ),
        (
            "bad option value",
            format!("{HEAD}[computations.f]\ntype = \"filter\"\ninputs = [\"gen\"]\nregex = \"(\"\n"),
            7,
            "invalid regex",
        ),
        (
            "bad key extractor",
            format!("{HEAD}[sinks.out]\ntype = \"stdout\"\ninputs = [{{ from = \"gen\", key = \"jsn:/x\" }}]\n"),
            6,
            "unknown key extractor",
        ),
        ("toml syntax", format!("{HEAD}[sinks.out\n"), 4, "sinks.out"),
        (
            "an empty cluster secret",
            format!("[cluster]\nsecret = \"\"\n[[cluster.workers]]\nid = \"a\"\naddress = \"127.0.0.1:1\"\n{HEAD}"),
            2,
            "needs at least 16",
        ),
        (
            "a short cluster secret",
            format!("[cluster]\nsecret = \"hunter2\"\n[[cluster.workers]]\nid = \"a\"\naddress = \"127.0.0.1:1\"\n{HEAD}"),
            2,
            "has 7 bytes",
        ),
        ("too many threads", format!("[engine]\nthreads = 65535\n{HEAD}"), 2, "must be at most 256"),
        ("too many shards", format!("[engine]\nshards = 65535\n{HEAD}"), 2, "must be at most 1024"),
        (
            "an option a kind ignores (cogroup's aggregate)",
            format!("{HEAD}[computations.g]\ntype = \"cogroup\"\ninputs = [\"gen\", \"gen.errors\"]\nwindow = {{ kind = \"fixed\", size = \"1s\" }}\naggregate = \"sum\"\n"),
            8,
            "`cogroup` has no option `aggregate`",
        ),
        (
            "an option a kind ignores (join's op)",
            format!("{HEAD}[computations.j]\ntype = \"join\"\ninputs = [\"gen\", \"gen.errors\"]\nwindow = {{ kind = \"fixed\", size = \"1s\" }}\nop = \"sum\"\n"),
            8,
            "`join` has no option `op`",
        ),
        (
            "window's aggregate spelled as op",
            format!("{HEAD}[computations.w]\ntype = \"window\"\ninputs = [\"gen\"]\nwindow = {{ kind = \"fixed\", size = \"1s\" }}\nop = \"sum\"\n"),
            8,
            "`window` has no option `op`",
        ),
        (
            "an input naming an output nobody declares",
            format!("{HEAD}[computations.c]\ntype = \"count\"\ninputs = [\"gen\"]\n[sinks.out]\ntype = \"stdout\"\ninputs = [\"c.typo\"]\n"),
            9,
            "`c` has no output `typo`",
        ),
        (
            "a sliding window with too many windows per record",
            format!("{HEAD}[computations.w]\ntype = \"window\"\ninputs = [\"gen\"]\nwindow = {{ kind = \"sliding\", size = \"1d\", every = \"1ms\" }}\n"),
            7,
            "each record would belong to",
        ),
        (
            "input from a sink",
            format!("{HEAD}[sinks.a]\ntype = \"stdout\"\ninputs = [\"gen\"]\n[sinks.b]\ntype = \"stdout\"\ninputs = [\"a\"]\n"),
            9,
            "is a sink",
        ),
    ]
}

#[test]
fn every_malformed_topology_gets_its_error() {
    let s = Scratch::new();
    for (what, text, line, needle) in cases() {
        let file = s.write("bad.toml", &text);
        let out = millrace()
            .arg("validate")
            .arg(&file)
            .output()
            .expect("run validate");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{what}: exit status; stderr: {stderr}"
        );
        let at = format!("{}:{line}:", file.display());
        assert!(stderr.contains(&at), "{what}: expected `{at}` in: {stderr}");
        assert!(
            stderr.contains(needle),
            "{what}: expected `{needle}` in: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    }
}

#[test]
fn run_refuses_a_malformed_topology_and_a_missing_file() {
    let s = Scratch::new();
    let file = s.write(
        "bad.toml",
        &format!("{HEAD}[sinks.out]\ntype = \"stdout\"\ninputs = [\"x\"]\n"),
    );
    let out = millrace().arg("run").arg(&file).output().expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown input `x`"));

    let out = millrace()
        .args(["validate", "/nonexistent/topology.toml"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent/topology.toml: cannot read")
    );
}

#[test]
fn a_valid_topology_prints_a_one_line_summary() {
    let s = Scratch::new();
    let file = s.write(
        "ok.toml",
        &format!("{HEAD}[sinks.out]\ntype = \"stdout\"\ninputs = [\"gen\"]\n"),
    );
    let out = millrace().arg("validate").arg(&file).output().expect("run");
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.contains("ok: 1 sources, 0 computations, 1 sinks"),
        "{stdout}"
    );
}

#[test]
fn changing_the_shard_count_of_existing_data_is_refused() {
    let s = Scratch::new();
    let topo = |shards: u32| {
        s.write(
            "t.toml",
            &format!(
                "[service]\ndata_dir = \"{{dir}}/data\"\n[engine]\nshards = {shards}\n{HEAD}[computations.c]\ntype = \"count\"\ninputs = [\"gen\"]\n"
            ),
        )
    };
    let out = run_to_end(&topo(2), std::time::Duration::from_secs(30));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run_to_end(&topo(3), std::time::Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("engine.shards = 2"));
}

#[test]
fn an_empty_secret_in_the_environment_is_refused() {
    let s = Scratch::new();
    let file = s.write(
        "c.toml",
        &format!(
            "[service]\ndata_dir = \"{{dir}}/data\"\n[cluster]\n[[cluster.workers]]\nid = \"a\"\naddress = \"127.0.0.1:{}\"\n{HEAD}[sinks.out]\ntype = \"stdout\"\ninputs = [\"gen\"]\n",
            free_port()
        ),
    );
    for secret in ["", "short"] {
        let out = millrace()
            .args([
                "run",
                file.to_str().expect("utf-8"),
                "--worker",
                "a",
                "--http",
                "off",
            ])
            .env("MILLRACE_CLUSTER_SECRET", secret)
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("MILLRACE_CLUSTER_SECRET") && stderr.contains("needs at least 16"),
            "{stderr}"
        );
    }
}
