//! `millrace savepoint` and `millrace run --from-savepoint`: where a
//! savepoint URL points, and the two commands around the engine's
//! `savepoint` module.

use anyhow::{bail, Context as _, Result};
use millrace_config::Topology;
use millrace_engine::savepoint::{self, DirStore, SavepointError, SavepointStore};
use millrace_engine::{Metrics, Plan, Registry};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use std::path::Path;
use std::time::{Duration, Instant};

/// The store a savepoint URL names: `file:///abs/dir` (or a plain path), or
/// `s3://bucket/prefix` (endpoint and credentials from the usual `AWS_*`
/// variables: `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`).
pub fn open(url: &str) -> Result<Box<dyn SavepointStore>> {
    open_within(url, None)
}

/// [`open`], with every call to an object store given up on after `within`
/// (its retries included), where a call must not hold its caller for the
/// client's default three minutes: a commit log's snapshots, written and
/// listed from an executor.
pub fn open_bounded(url: &str, within: std::time::Duration) -> Result<Box<dyn SavepointStore>> {
    open_within(url, Some(within))
}

fn open_within(url: &str, within: Option<std::time::Duration>) -> Result<Box<dyn SavepointStore>> {
    if let Some(rest) = url.strip_prefix("s3://") {
        return Ok(Box::new(S3Store::new(url, rest, within)?));
    }
    if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            bail!("`{url}`: a file URL needs an absolute path (file:///dir)");
        }
        return Ok(Box::new(DirStore::new(path)));
    }
    if let Some((scheme, _)) = url.split_once("://") {
        bail!("`{url}`: savepoints go to file:///DIR (or a path) or s3://BUCKET/PREFIX; `{scheme}://` is not supported");
    }
    Ok(Box::new(DirStore::new(url)))
}

/// This process's worker index in `topology` (0 without a cluster).
pub fn worker_index(topology: &Topology, worker: Option<&str>) -> Result<usize> {
    match (&topology.cluster, worker) {
        (None, None) => Ok(0),
        (None, Some(id)) => bail!("--worker {id} given, but the topology has no [cluster]"),
        (Some(_), None) => bail!("the topology has a [cluster]: say which worker with --worker ID"),
        (Some(c), Some(id)) => c
            .index_of(id)
            .with_context(|| format!("worker `{id}` is not in [cluster] workers")),
    }
}

/// `millrace savepoint FILE --to URL`: exports a stopped worker's shards.
pub fn export(
    file: &Path,
    registry: &Registry,
    to: &str,
    worker: Option<&str>,
    data_dir: Option<&Path>,
) -> Result<()> {
    let topology = Topology::load(file)?;
    let dir = millrace_engine::data_dir_of(&topology, worker, data_dir);
    let (r, seconds) = export_dir(topology, registry, to, worker, &dir)?;
    println!(
        "exported {} shards ({} keys, {} bytes) of {} to {to} (savepoint {}) in {seconds:.3} s",
        r.shards,
        r.keys,
        r.bytes,
        dir.display(),
        r.savepoint,
    );
    if r.complete {
        println!("savepoint complete: manifest.json written");
    } else {
        println!(
            "savepoint not complete yet: waiting for worker(s) {} to export",
            r.missing.join(", ")
        );
    }
    Ok(())
}

/// Exports the shards worker `worker` keeps in `dir` (the worker stopped)
/// to the savepoint at `to`; returns what it wrote and how long it took.
pub fn export_dir(
    topology: Topology,
    registry: &Registry,
    to: &str,
    worker: Option<&str>,
    dir: &Path,
) -> Result<(savepoint::ExportReport, f64)> {
    let me = worker_index(&topology, worker)?;
    let plan = Plan::build(topology, registry).context("checking component options")?;
    let store = open(to)?;
    let started = std::time::Instant::now();
    let r = savepoint::export(dir, &plan, me, &*store)
        .with_context(|| format!("exporting {} to {to}", dir.display()))?;
    Ok((r, started.elapsed().as_secs_f64()))
}

/// `millrace stop --http ADDR... [--savepoint URL]`: asks every worker to
/// stop (and to export its shards to `URL` once stopped), then waits for
/// the savepoint's manifest, which the last worker to export writes.
pub fn stop(addrs: &[String], savepoint: Option<&str>, wait: Duration) -> Result<()> {
    let store = savepoint.map(open).transpose()?;
    // Every worker would stop and then find its export refused: refused
    // here, before any is asked to stop.
    if let (Some(store), Some(url)) = (&store, savepoint) {
        savepoint::check_vacant(&**store)
            .with_context(|| format!("taking a savepoint to {url}"))?;
    }
    let target = match savepoint {
        Some(url) => format!(
            "/stop?savepoint={}",
            utf8_percent_encode(url, NON_ALPHANUMERIC)
        ),
        None => "/stop".to_owned(),
    };
    for addr in addrs {
        let (code, body) = http_request(addr, "POST", &target)
            .with_context(|| format!("asking the worker at {addr} to stop"))?;
        if code != 202 {
            bail!(
                "the worker at {addr} refused to stop: {code} {}",
                body.trim()
            );
        }
        println!("{addr}: stopping");
    }
    let (Some(store), Some(url)) = (store, savepoint) else {
        return Ok(());
    };
    let deadline = Instant::now() + wait;
    while store.get("manifest.json")?.is_none() {
        if Instant::now() >= deadline {
            bail!(
                "the savepoint at {url} is not complete after {} s: see each worker's log \
                 (a worker that failed to export logs why; its data directory is as it stopped)",
                wait.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("savepoint complete");
    print!("{}", describe(url, false)?);
    Ok(())
}

/// The `Authorization` header line for `MILLRACE_HTTP_TOKEN`, empty when it
/// is not set: what every operator command sends to a worker.
pub(crate) fn bearer_header() -> String {
    std::env::var("MILLRACE_HTTP_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default()
}

/// One HTTP/1.1 request without a body; returns the status and the body.
/// Sends `MILLRACE_HTTP_TOKEN` as a bearer token when it is set, and the
/// `X-Millrace` header a control request needs.
fn http_request(addr: &str, method: &str, target: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let auth = bearer_header();
    write!(
        stream,
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\n{auth}X-Millrace: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not an HTTP response: {:?}", response.lines().next()))?;
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((code, body))
}

/// Loads a savepoint into a new data directory before the worker starts.
pub fn load(
    topology: &Topology,
    registry: &Registry,
    from: &str,
    worker: Option<&str>,
    data_dir: &Path,
    allow_non_restored_state: bool,
    metrics: &Metrics,
) -> Result<()> {
    let me = worker_index(topology, worker)?;
    let plan = Plan::build(topology.clone(), registry).context("checking component options")?;
    let store = open(from)?;
    let started = std::time::Instant::now();
    let r = savepoint::import(data_dir, &plan, me, &*store, allow_non_restored_state)
        .with_context(|| format!("loading savepoint {from} into {}", data_dir.display()))?;
    let seconds = started.elapsed().as_secs_f64();
    metrics.savepoint_loaded(seconds, r.bytes, r.shards);
    tracing::info!(
        savepoint = from,
        data_dir = %data_dir.display(),
        shards = r.shards,
        keys = r.keys,
        bytes = r.bytes,
        seconds,
        new_components = ?r.new_components,
        dropped_components = ?r.dropped_components,
        "savepoint loaded"
    );
    Ok(())
}

/// Makes ring the process's TLS crypto provider unless one is set already.
/// The S3 client's reqwest is built with rustls but no provider of its own
/// (see the workspace's Cargo.toml: aws-lc-rs, the default, is a slow build),
/// and would panic on building a client without one.
fn install_tls_provider() {
    // An error means a provider is installed already: that one is used.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A savepoint in an S3-compatible object store, through `object_store`.
/// Calls are made from a small runtime of its own (savepoints are taken and
/// loaded outside the worker's loop), from several threads at once: an
/// export uploads several shard files together.
struct S3Store {
    url: String,
    store: AmazonS3,
    prefix: String,
    runtime: tokio::runtime::Runtime,
}

impl S3Store {
    fn new(url: &str, rest: &str, within: Option<std::time::Duration>) -> Result<S3Store> {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            bail!("`{url}`: no bucket (s3://BUCKET/PREFIX)");
        }
        install_tls_provider();
        let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
        let endpoint = std::env::var("AWS_ENDPOINT_URL")
            .or_else(|_| std::env::var("AWS_ENDPOINT"))
            .ok();
        if let Some(e) = &endpoint {
            b = b.with_endpoint(e).with_allow_http(e.starts_with("http://"));
        }
        if std::env::var_os("AWS_REGION").is_none()
            && std::env::var_os("AWS_DEFAULT_REGION").is_none()
        {
            b = b.with_region("us-east-1");
        }
        if let Some(within) = within {
            // A request, and the retries after it, end by `within`.
            b = b
                .with_config(
                    object_store::aws::AmazonS3ConfigKey::Client(
                        object_store::ClientConfigKey::Timeout,
                    ),
                    format!("{}ms", within.as_millis()),
                )
                .with_retry(object_store::RetryConfig {
                    max_retries: 3,
                    retry_timeout: within,
                    ..Default::default()
                });
        }
        let store = b
            .build()
            .with_context(|| format!("`{url}`: setting up the S3 client"))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("millrace-s3")
            .enable_all()
            .build()
            .context("starting the S3 client's runtime")?;
        Ok(S3Store {
            url: url.to_owned(),
            store,
            prefix: prefix.trim_matches('/').to_owned(),
            runtime,
        })
    }

    /// The object of `path`, once [`savepoint::check_path`] accepts it.
    fn key(&self, path: &str) -> Result<ObjectPath, SavepointError> {
        savepoint::check_path(path).map_err(SavepointError::Refused)?;
        Ok(if self.prefix.is_empty() {
            ObjectPath::from(path)
        } else {
            ObjectPath::from(format!("{}/{path}", self.prefix))
        })
    }

    fn err(&self, what: &str, path: &str, e: object_store::Error) -> SavepointError {
        SavepointError::Io(format!("{what} {}/{path}: {e}", self.url))
    }
}

impl SavepointStore for S3Store {
    fn put(&self, path: &str, bytes: Vec<u8>) -> Result<(), SavepointError> {
        let key = self.key(path)?;
        self.runtime
            .block_on(self.store.put(&key, bytes.into()))
            .map(|_| ())
            .map_err(|e| self.err("writing", path, e))
    }

    fn create(&self, path: &str, bytes: Vec<u8>) -> Result<bool, SavepointError> {
        let key = self.key(path)?;
        let opts = PutOptions::from(PutMode::Create);
        match self
            .runtime
            .block_on(self.store.put_opts(&key, bytes.into(), opts))
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.err("creating", path, e)),
        }
    }

    fn get(&self, path: &str) -> Result<Option<Vec<u8>>, SavepointError> {
        let key = self.key(path)?;
        self.runtime.block_on(async {
            match self.store.get(&key).await {
                Ok(r) => r
                    .bytes()
                    .await
                    .map(|b| Some(b.to_vec()))
                    .map_err(|e| self.err("reading", path, e)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(self.err("reading", path, e)),
            }
        })
    }

    fn delete(&self, path: &str) -> Result<(), SavepointError> {
        let key = self.key(path)?;
        match self.runtime.block_on(self.store.delete(&key)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("removing", path, e)),
        }
    }

    fn some_entry(&self) -> Result<Option<String>, SavepointError> {
        let prefix = (!self.prefix.is_empty()).then(|| ObjectPath::from(self.prefix.as_str()));
        let listed = self
            .runtime
            .block_on(self.store.list_with_delimiter(prefix.as_ref()))
            .map_err(|e| SavepointError::Io(format!("listing {}: {e}", self.url)))?;
        let name = |p: &ObjectPath| p.filename().unwrap_or_default().to_owned();
        Ok(listed
            .common_prefixes
            .first()
            .map(name)
            .or_else(|| listed.objects.first().map(|o| name(&o.location))))
    }

    fn list(&self, dir: &str) -> Result<Vec<String>, SavepointError> {
        let prefix = self.key(dir)?;
        let listed = self
            .runtime
            .block_on(self.store.list_with_delimiter(Some(&prefix)))
            .map_err(|e| self.err("listing", dir, e))?;
        Ok(listed
            .objects
            .iter()
            .filter_map(|o| o.location.filename().map(str::to_owned))
            .collect())
    }

    fn describe(&self) -> String {
        self.url.clone()
    }
}

/// `millrace inspect URL` of a savepoint: its manifest, summarised (or as JSON).
pub fn describe(url: &str, json: bool) -> Result<String> {
    let store = open(url)?;
    let bytes = store
        .get("manifest.json")?
        .with_context(|| format!("{url} has no manifest.json: not a (complete) savepoint"))?;
    let m: savepoint::Manifest = serde_json::from_slice(&bytes)
        .with_context(|| format!("{url}/manifest.json is not readable"))?;
    if json {
        return Ok(serde_json::to_string_pretty(&m)? + "\n");
    }
    let total: u64 = m.shards.iter().map(|s| s.bytes).sum();
    let keys: u64 = m.shards.iter().map(|s| s.keys).sum();
    let mut out = format!(
        "{url}: savepoint {}, format {}, topology {}, engine.shards {}, taken from {} worker(s) ({})\n\
         {} shard files, {keys} keys, {total} bytes\n{:<20} {:<28} {:>6} {:>10} {:>12}\n",
        if m.id.is_empty() { "without an id" } else { &m.id },
        m.format,
        m.fingerprint,
        m.engine_shards,
        m.workers.len(),
        m.workers.join(", "),
        m.shards.len(),
        "component",
        "type",
        "shards",
        "keys",
        "bytes"
    );
    for c in &m.components {
        let mine = m.shards.iter().filter(|s| s.component == c.name);
        let (k, b) = mine.fold((0, 0), |(k, b), s| (k + s.keys, b + s.bytes));
        out.push_str(&format!(
            "{:<20} {:<28} {:>6} {k:>10} {b:>12}\n",
            c.name,
            format!("{} {}", c.role, c.kind),
            c.shards
        ));
    }
    Ok(out)
}
