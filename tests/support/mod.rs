//! Test support: start real `millrace` processes on 127.0.0.1, kill them,
//! wait for conditions (never for fixed times), and check outputs exactly.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub fn millrace() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_millrace"));
    c.env("MILLRACE_LOG", "warn");
    c
}

/// A scratch directory with a topology in it.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Self {
        Scratch {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `text` to `name`, replacing `{dir}` with the scratch directory.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(
            &p,
            text.replace("{dir}", &self.dir.path().display().to_string()),
        )
        .expect("write");
        p
    }
}

/// Polls `cond` every few milliseconds until it holds; false after `timeout`.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}

/// Waits for `child` to exit, killing it (and failing) after `timeout`.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> ExitStatus {
    let mut status = None;
    let exited = wait_until(timeout, || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    });
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
        panic!("millrace did not exit within {timeout:?}");
    }
    status.expect("exited")
}

/// Runs `millrace run FILE` to its end (bounded input) within `timeout`.
pub fn run_to_end(topology: &Path, timeout: Duration) -> Output {
    let mut child = millrace()
        .args([
            "run",
            topology.to_str().expect("utf-8 path"),
            "--http",
            "off",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn millrace");
    let status = wait_exit(&mut child, timeout);
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    child.stdout.take().map(|mut s| s.read_to_end(&mut stdout));
    child.stderr.take().map(|mut s| s.read_to_end(&mut stderr));
    Output {
        status,
        stdout,
        stderr,
    }
}

/// SIGKILL, as a crash.
pub fn kill9(child: &mut Child) {
    // SAFETY: sending a signal to our own child process by pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGKILL);
    }
    let _ = child.wait();
}

/// SIGTERM, as an operator's stop.
pub fn term(child: &Child) {
    // SAFETY: sending a signal to our own child process by pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
}

/// The size of a file, 0 when it does not exist yet.
pub fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| m.len())
}

/// Reads a jsonl sink file into (key, value) pairs, in file order.
pub fn read_jsonl(p: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    text.lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}"));
            (
                v["key"].as_str().expect("key").to_owned(),
                v["value"].as_str().expect("value").to_owned(),
            )
        })
        .collect()
}

/// Checks that, for every key, the values are exactly the running counts
/// 1, 2, ..., n, each once and in order; returns n per key.
pub fn assert_running_counts(pairs: &[(String, String)]) -> BTreeMap<String, u64> {
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        let n: u64 = v
            .parse()
            .unwrap_or_else(|_| panic!("line {}: value {v:?} is not a count", i + 1));
        let prev = last.entry(k.clone()).or_insert(0);
        assert_eq!(
            n,
            *prev + 1,
            "line {}: key {k} has count {n} after {prev} (lost or repeated)",
            i + 1
        );
        *prev = n;
    }
    last
}

/// A small deterministic random stream; the seed is printed so a failure can be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn from_env() -> Self {
        let seed = std::env::var("MILLRACE_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        eprintln!("MILLRACE_TEST_SEED={seed}");
        Rng(seed | 1)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// A plain HTTP GET against a running worker; returns (status, body).
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((code, body))
}

/// A port on 127.0.0.1 that no other test process holds, for a worker to
/// listen on later.
///
/// A port the kernel hands out for `127.0.0.1:0` is an ephemeral one: once
/// released, any outgoing connection (a worker dialling its peers, an HTTP
/// scrape) may take it as its local port before the worker binds it, and
/// another test process may be handed it too. So ports come from below the
/// ephemeral range, which the kernel never picks on its own, and each one is
/// reserved across the test processes with a lock on a file named after it,
/// held until this process exits (the kernel drops the lock with the process).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;
    static HELD: Mutex<Vec<std::fs::File>> = Mutex::new(Vec::new());
    static NEXT: AtomicU32 = AtomicU32::new(0);

    let (low, high) = reservable_ports();
    let span = u32::from(high - low);
    let dir = std::env::temp_dir().join("millrace-test-ports");
    std::fs::create_dir_all(&dir).expect("port lock directory");
    // Spread the processes' starting points so that they rarely probe the
    // same ports.
    let start = std::process::id().wrapping_mul(2_654_435_761);
    for _ in 0..span {
        let offset = start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = low + u16::try_from(offset).expect("offset below the span");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(format!("{port}.lock")))
            .expect("port lock file");
        if !try_lock(&lock) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            HELD.lock().expect("held ports").push(lock);
            return port;
        }
    }
    panic!("no free port in {low}..{high}");
}

/// An exclusive `flock` on `file` without waiting; false when another
/// process holds it.
fn try_lock(file: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the duration of the call (borrowed
    // from `file`), and flock takes no pointers.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// The ports below the kernel's ephemeral range (`ip_local_port_range`),
/// from 10000 up.
fn reservable_ports() -> (u16, u16) {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    assert!(
        ephemeral_low > 11_000,
        "the ephemeral port range starts at {ephemeral_low}; tests need 1000 ports below it from 10000"
    );
    (10_000, ephemeral_low)
}

/// A worker process that is killed when the test lets go of it, so that a
/// failing test leaves no process behind.
pub struct Running(pub Child);

impl std::ops::Deref for Running {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts `millrace run FILE --http HTTP` in the background (stderr shown).
pub fn spawn(topology: &Path, http: &str) -> Running {
    Running(
        millrace()
            .args([
                "run",
                topology.to_str().expect("utf-8 path"),
                "--http",
                http,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn millrace"),
    )
}

/// Paces the generator of a `count_pipeline` topology to `per_second`
/// records, for tests that must stop a worker before its source runs out
/// (an unpaced one outruns a test that reads the output to decide when).
pub fn pace_generator(topology: &Path, per_second: u64) {
    let text = std::fs::read_to_string(topology).expect("read the topology");
    let paced = text.replacen(
        "type = \"generator\"\n",
        &format!("type = \"generator\"\nrate = {per_second}\n"),
        1,
    );
    assert_ne!(
        paced,
        text,
        "no generator to pace in {}",
        topology.display()
    );
    std::fs::write(topology, paced).expect("write the topology");
}

/// The lines of a file (none when it does not exist yet).
pub fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

pub mod etcd;
pub mod nats;
pub mod proxy;
pub mod s3;

/// One value of a Prometheus series from a worker's `/metrics`, e.g.
/// `millrace_net_refused_total{reason="secret"}`; None when absent.
pub fn metric(http: &str, series: &str) -> Option<f64> {
    let (_, body) = http_get(http, "/metrics")?;
    body.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The sum of every series on a worker's `/metrics` whose name and labels
/// start with `prefix` (e.g. all partitions of one component); 0 when none
/// or when the worker does not answer.
pub fn metric_sum(http: &str, prefix: &str) -> f64 {
    let Some((_, body)) = http_get(http, "/metrics") else {
        return 0.0;
    };
    body.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A cluster of workers on 127.0.0.1 for tests: ids `w0`, `w1`, ...; each
/// worker's address, real listen address (behind a proxy when asked) and
/// HTTP address.
pub struct ClusterNet {
    pub ids: Vec<String>,
    pub addresses: Vec<String>,
    pub listen: Vec<String>,
    pub http: Vec<String>,
}

impl ClusterNet {
    pub fn new(n: usize) -> Self {
        let addr = || format!("127.0.0.1:{}", free_port());
        ClusterNet {
            ids: (0..n).map(|i| format!("w{i}")).collect(),
            addresses: (0..n).map(|_| addr()).collect(),
            listen: (0..n).map(|_| addr()).collect(),
            http: (0..n).map(|_| addr()).collect(),
        }
    }

    /// The `[cluster]` table.
    pub fn toml(&self, secret: &str) -> String {
        let mut t = format!("[cluster]\nsecret = \"{secret}-0123456789\"\n");
        for ((id, a), h) in self.ids.iter().zip(&self.addresses).zip(&self.http) {
            t.push_str(&format!(
                "[[cluster.workers]]\nid = \"{id}\"\naddress = \"{a}\"\nhttp = \"{h}\"\n"
            ));
        }
        t
    }

    /// Proxies from every worker's address to its listen address.
    pub fn proxies(&self) -> Vec<proxy::Proxy> {
        self.addresses
            .iter()
            .zip(&self.listen)
            .map(|(a, l)| proxy::Proxy::start(a, l))
            .collect()
    }

    /// `millrace run TOPOLOGY --worker ID --http HTTP` for worker `i`.
    pub fn command(&self, topology: &Path, i: usize) -> Command {
        let mut c = millrace();
        c.args([
            "run",
            topology.to_str().expect("utf-8 path"),
            "--worker",
            &self.ids[i],
            "--http",
            &self.http[i],
        ]);
        c
    }

    /// Starts worker `i`. With `behind_proxy` it listens on its listen
    /// address (the proxy owns its address); `env` is added to its environment.
    pub fn spawn(
        &self,
        topology: &Path,
        i: usize,
        behind_proxy: bool,
        env: &[(&str, &str)],
    ) -> Running {
        let mut c = self.command(topology, i);
        if behind_proxy {
            c.args(["--listen", &self.listen[i]]);
        }
        for (k, v) in env {
            c.env(k, v);
        }
        Running(
            c.stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn millrace"),
        )
    }
}

/// generator (`records` over `keys` keys at `rate` a second) -> count (8
/// shards) -> file sink `{dir}/out.jsonl`, on the workers of `net`, handing
/// moving shards over in `{dir}/handoff`; `state` is the `[state]` table's
/// body (empty: none).
pub fn moving_count_topology(
    s: &Scratch,
    net: &ClusterNet,
    (records, keys, rate): (u64, u64, u64),
    state: &str,
) -> PathBuf {
    s.write(
        "moves.toml",
        &format!(
            r#"
[service]
data_dir = "{dir}/data"
[engine]
shards = 8
threads = 2
[state]
{state}
{cluster}[sources.gen]
type = "generator"
count = {records}
keys = {keys}
seed = 7
rate = {rate}
[computations.counts]
type = "count"
inputs = ["gen"]
[sinks.out]
type = "file"
inputs = ["counts"]
path = "{dir}/out.jsonl"
"#,
            dir = s.path("").display(),
            cluster = net.toml("moves-secret").replacen(
                "[cluster]\n",
                &format!(
                    "[cluster]\nhandoff = \"file://{}/handoff\"\n",
                    s.path("").display()
                ),
                1
            ),
        ),
    )
}

/// The key of each record `generator` emits for `count` records over `keys`
/// keys with `seed`, computed here from its documented key function
/// (`k<N>`, `N = mix(seed ^ mix(i)) % keys`, splitmix64's finaliser),
/// independently of the binary under test.
pub fn generator_keys(count: u64, keys: u64, seed: u64) -> impl Iterator<Item = String> {
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    (0..count).map(move |i| format!("k{}", mix(seed ^ mix(i)) % keys))
}

/// The number of records per key that `generator` emits (see
/// [`generator_keys`]).
pub fn generator_key_counts(count: u64, keys: u64, seed: u64) -> BTreeMap<String, u64> {
    let mut want = BTreeMap::new();
    for key in generator_keys(count, keys, seed) {
        *want.entry(key).or_insert(0) += 1;
    }
    want
}

/// Adds one input file to a watched directory atomically (hidden name, then
/// rename).
pub fn add(dir: &Path, name: &str, body: &str) {
    let tmp = dir.join(format!(".{name}"));
    std::fs::write(&tmp, body).expect("write");
    std::fs::rename(&tmp, dir.join(name)).expect("rename");
}

/// A watched `file` source of `key,seconds,value` lines -> `map` (key and
/// value) -> `window` `w` -> file sinks `out.txt` (panes) and `late.txt`
/// (`w.late`), with `engine` and the window's options added.
pub fn window_topology(
    s: &Scratch,
    engine: &str,
    window: &str,
    extra: &str,
    watermark: &str,
) -> PathBuf {
    std::fs::create_dir_all(s.path("in")).expect("mkdir");
    s.write(
        "w.toml",
        &format!(
            r#"
[service]
data_dir = "{{dir}}/data"
[engine]
shards = 2
{engine}
[sources.events]
type = "file"
path = "{{dir}}/in"
watch = true
timestamp = "field:1"
delimiter = ","
timestamp_unit = "s"
watermark = {watermark}
[computations.keyed]
type = "map"
inputs = ["events"]
key = "field:0"
value = "field:2"
delimiter = ","
[computations.w]
type = "window"
inputs = ["keyed"]
window = {window}
{extra}
[sinks.out]
type = "file"
inputs = ["w"]
path = "{{dir}}/out.txt"
format = "text"
[sinks.late]
type = "file"
inputs = ["w.late"]
path = "{{dir}}/late.txt"
format = "text"
"#
        ),
    )
}

/// `generator` (`records` over `keys` keys with `seed`) -> `counts` ->
/// file sink `out.jsonl`: the pipeline the crash tests check against
/// [`generator_key_counts`]. `engine` goes into `[engine]`; `counts` is the
/// counting component's body (`type = "count"` for the built-in).
/// The generator of the topology at `path` (a [`count_pipeline`]) paced at
/// `rate` records/s.
#[allow(dead_code)]
pub fn with_rate(path: &Path, rate: u64) -> PathBuf {
    let text = std::fs::read_to_string(path).expect("topology");
    let paced = text.replacen(
        "[computations.counts]",
        &format!("rate = {rate}\n[computations.counts]"),
        1,
    );
    assert_ne!(
        paced,
        text,
        "{} has no [computations.counts]",
        path.display()
    );
    std::fs::write(path, paced).expect("topology");
    path.to_path_buf()
}

pub fn count_pipeline(
    s: &Scratch,
    engine: &str,
    (records, keys, seed): (u64, u64, u64),
    counts: &str,
) -> PathBuf {
    s.write(
        "count.toml",
        &format!(
            r#"
[service]
data_dir = "{{dir}}/data"
[engine]
{engine}
[sources.gen]
type = "generator"
count = {records}
keys = {keys}
seed = {seed}
[computations.counts]
inputs = ["gen"]
{counts}
[sinks.out]
type = "file"
inputs = ["counts"]
path = "{{dir}}/out.jsonl"
"#
        ),
    )
}
