//! An etcd server (Debian's `etcd-server`, installed by `make setup`) on
//! 127.0.0.1 with its own data directory; killed when dropped.

use std::io::{Read, Write};
use std::net::TcpStream;
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

impl Etcd {
    /// Puts `key` = `value` through etcd's JSON gateway (as another client
    /// of the deployment's etcd would); returns the new revision.
    pub fn put(&self, key: &str, value: &str) -> u64 {
        let body = format!(
            r#"{{"key":"{}","value":"{}"}}"#,
            base64(key.as_bytes()),
            base64(value.as_bytes())
        );
        let mut s = TcpStream::connect(&self.client).expect("connect to etcd");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        write!(
            s,
            "POST /v3/kv/put HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.client,
            body.len()
        )
        .expect("write to etcd");
        let mut answer = String::new();
        s.read_to_string(&mut answer).expect("read from etcd");
        let json = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let v: serde_json::Value = serde_json::from_str(json.trim())
            .unwrap_or_else(|e| panic!("etcd answered {answer:?}: {e}"));
        v["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("no revision in {answer:?}"))
    }
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
