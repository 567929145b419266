//! `millrace savepoint` and `millrace run --from-savepoint`: where a
//! savepoint URL points, and the two commands around the engine's
//! `savepoint` module.

use anyhow::{bail, Context as _, Result};
use millrace_config::Topology;
use millrace_engine::savepoint::{self, DirStore, SavepointStore};
use millrace_engine::{Plan, Registry};
use std::path::Path;

/// The store a savepoint URL names: `file:///abs/dir` (or a plain path).
pub fn open(url: &str) -> Result<Box<dyn SavepointStore>> {
    if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            bail!("`{url}`: a file URL needs an absolute path (file:///dir)");
        }
        return Ok(Box::new(DirStore::new(path)));
    }
    if let Some((scheme, _)) = url.split_once("://") {
        bail!("`{url}`: savepoints go to file:///DIR (or a path); `{scheme}://` is not supported");
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
    let me = worker_index(&topology, worker)?;
    let dir = millrace_engine::data_dir_of(&topology, worker, data_dir);
    let plan = Plan::build(topology, registry).context("checking component options")?;
    let store = open(to)?;
    let r = savepoint::export(&dir, &plan, me, &*store)
        .with_context(|| format!("exporting {} to {to}", dir.display()))?;
    println!(
        "exported {} shards ({} keys) of {} to {}",
        r.shards,
        r.keys,
        dir.display(),
        store.describe()
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

/// Loads a savepoint into a new data directory before the worker starts.
pub fn load(
    topology: &Topology,
    registry: &Registry,
    from: &str,
    worker: Option<&str>,
    data_dir: &Path,
    allow_non_restored_state: bool,
) -> Result<()> {
    let me = worker_index(topology, worker)?;
    let plan = Plan::build(topology.clone(), registry).context("checking component options")?;
    let store = open(from)?;
    let r = savepoint::import(data_dir, &plan, me, &*store, allow_non_restored_state)
        .with_context(|| format!("loading savepoint {from} into {}", data_dir.display()))?;
    tracing::info!(
        savepoint = from,
        data_dir = %data_dir.display(),
        shards = r.shards,
        keys = r.keys,
        new_components = ?r.new_components,
        dropped_components = ?r.dropped_components,
        "savepoint loaded"
    );
    Ok(())
}
