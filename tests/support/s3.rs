//! SeaweedFS (`make test-servers` puts it in `target/tools/weed`) serving
//! S3 on 127.0.0.1 with one bucket and one user; killed when dropped. Used
//! by the savepoint tests (through `support`) and by the savepoint
//! benchmark (`#[path]`), so it needs nothing else from `support`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const S3_KEY: &str = "millrace-test-key";
pub const S3_SECRET: &str = "millrace-test-secret";

pub struct S3 {
    pub endpoint: String,
    process: Child,
    _dir: tempfile::TempDir,
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

impl S3 {
    /// Starts SeaweedFS with `bucket`, its services on `ports` (S3, master,
    /// filer, volume, admin), and waits until the bucket answers.
    pub fn start(bucket: &str, ports: [u16; 5]) -> S3 {
        let weed = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/tools/weed");
        assert!(
            weed.exists(),
            "the S3-compatible store is missing at {}: run `make test-servers` (it fetches SeaweedFS)",
            weed.display()
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let [s3, master, filer, volume, admin] = ports;
        let child = Command::new(&weed)
            .args([
                "mini",
                &format!("-dir={}", dir.path().display()),
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                &format!("-s3.port={s3}"),
                &format!("-master.port={master}"),
                &format!("-filer.port={filer}"),
                &format!("-volume.port={volume}"),
                &format!("-admin.port={admin}"),
                "-webdav=false",
                "-admin.ui=false",
                // Its Iceberg and Lance catalogs listen on fixed ports
                // (8181, 9101): a second instance at once would die.
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
            ])
            .env("AWS_ACCESS_KEY_ID", S3_KEY)
            .env("AWS_SECRET_ACCESS_KEY", S3_SECRET)
            .env("S3_BUCKET", bucket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start SeaweedFS");
        let s = S3 {
            endpoint: format!("http://127.0.0.1:{s3}"),
            process: child,
            _dir: dir,
        };
        // Ready once the bucket answers a listing.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !bucket_answers(s3, bucket) {
            assert!(
                Instant::now() < deadline,
                "SeaweedFS did not serve S3 on {s3} within 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // The unsigned probe may be refused (403) before the bucket is made:
        // ready only once a signed listing of the bucket succeeds.
        while !s.bucket_lists(bucket) {
            assert!(
                Instant::now() < deadline,
                "SeaweedFS did not create the bucket {bucket} within 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    /// The variables that point a client at it.
    pub fn env(&self) -> [(&'static str, String); 3] {
        [
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", S3_KEY.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET.to_owned()),
        ]
    }
}

fn bucket_answers(port: u16, bucket: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if write!(
        s,
        "GET /{bucket} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    matches!(buf.split_whitespace().nth(1), Some("200" | "403"))
}

impl S3 {
    /// Writes `key` of `bucket` directly (to alter what a test stored).
    #[allow(dead_code)]
    pub fn put(&self, bucket: &str, key: &str, bytes: Vec<u8>) {
        use object_store::ObjectStoreExt;
        let (store, rt) = self.client(bucket);
        rt.block_on(store.put(&key.into(), bytes.into()))
            .unwrap_or_else(|e| panic!("writing s3://{bucket}/{key}: {e}"));
    }

    /// Reads `key` of `bucket` directly; `None` if it does not exist.
    #[allow(dead_code)]
    pub fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        use object_store::ObjectStoreExt;
        let (store, rt) = self.client(bucket);
        rt.block_on(async {
            match store.get(&key.into()).await {
                Ok(r) => Some(r.bytes().await.expect("object body").to_vec()),
                Err(object_store::Error::NotFound { .. }) => None,
                Err(e) => panic!("reading s3://{bucket}/{key}: {e}"),
            }
        })
    }

    /// Whether a signed listing of `bucket` succeeds (it exists and the
    /// test user may read it).
    fn bucket_lists(&self, bucket: &str) -> bool {
        use object_store::ObjectStore;
        let (store, rt) = self.client(bucket);
        rt.block_on(store.list_with_delimiter(None)).is_ok()
    }

    /// A client of `bucket` with the test user, and a runtime to drive it.
    fn client(&self, bucket: &str) -> (object_store::aws::AmazonS3, tokio::runtime::Runtime) {
        // As the binary does: reqwest has rustls without a crypto provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let store = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_bucket_name(bucket)
            .with_region("us-east-1")
            .with_access_key_id(S3_KEY)
            .with_secret_access_key(S3_SECRET)
            .build()
            .expect("S3 client");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        (store, rt)
    }
}
