//! An etcd server (Debian's `etcd-server`, installed by `make setup`) on
//! 127.0.0.1 with its own data directory; killed when dropped.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Etcd {
    /// `etcd://127.0.0.1:PORT/PREFIX` for `millrace run --join`.
    pub join: String,
    /// `127.0.0.1:PORT`.
    pub client: String,
    process: Child,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

impl Etcd {
    /// Starts etcd with its data in `dir` and waits until it is healthy;
    /// `prefix` names the deployment in [`Etcd::join`].
    pub fn start(dir: &Path, prefix: &str) -> Etcd {
        let etcd = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or_else(|| {
                panic!("etcd is missing: run `make setup` (it installs Debian's etcd-server)")
            });
        let (client, peer) = (super::free_port(), super::free_port());
        let child = Command::new(etcd)
            .args([
                "--name",
                "test",
                "--data-dir",
                dir.to_str().expect("utf-8 path"),
                "--listen-client-urls",
                &format!("http://127.0.0.1:{client}"),
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client}"),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-cluster",
                &format!("test=http://127.0.0.1:{peer}"),
                "--logger",
                "zap",
                "--log-level",
                "error",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start etcd");
        let e = Etcd {
            join: format!("etcd://127.0.0.1:{client}/{prefix}"),
            client: format!("127.0.0.1:{client}"),
            process: child,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !super::http_get(&e.client, "/health")
            .is_some_and(|(code, body)| code == 200 && body.contains("true"))
        {
            assert!(
                Instant::now() < deadline,
                "etcd did not become healthy on {} within 30 s",
                e.client
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        e
    }
}
