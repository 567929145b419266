//! Which worker owns which shard, kept in etcd, so that shards move between
//! live workers (`millrace run --join etcd://HOST:PORT/PREFIX`).
//!
//! Keys under the prefix (shard numbers zero-padded, so that they sort):
//!
//! | key | value | written by |
//! | --- | --- | --- |
//! | `members/ID` | the worker's address | each worker, under its lease (liveness only) |
//! | `controller` | a worker id | whoever creates it first, under its lease |
//! | `assign/SID` | a worker id | the controller, in transactions guarded by its `controller` key |
//! | `owner/SID` | a worker id | the worker that claims the shard; its revision is the shard's **epoch** |
//! | `handoff/SID` | where a moving shard's data is, and its size and SHA-256 | the old owner, in the transaction that deletes its `owner/SID` |
//! | `leaving/ID` | empty | `millrace leave`, or the worker on SIGTERM |
//!
//! The fence is on the write path, never on a lease (Jepsen found etcd's
//! locks unsafe as fences): a claim succeeds only if the shard is assigned
//! to the claimer and owned by nobody; a release only if `owner/SID` still
//! holds the releaser at its epoch (`mod_revision`); an assignment only if
//! the `controller` key is still the one this controller created. A refused
//! write is counted (`millrace_ownership_fenced_total`) and nothing of it
//! happens. `owner/SID` has no lease: without a commit log, a worker that
//! dies keeps its shards until it comes back; leases say only who is alive
//! and who controls. With a commit log (`[state] log`), the controller
//! frees a dead worker's shards (deleting `owner/SID` only if that worker's
//! member key is still gone and the owner is still the one it saw) and
//! assigns them to live workers, which claim them and rebuild them from the
//! log; the log's fence refuses the dead worker's appends should it wake.
//!
//! A move: the controller assigns the shard elsewhere; its owner stops it
//! at the end of a turn, writes its data to the handoff store
//! (`[cluster] handoff`, `file://` or `s3://`) and releases it; the new
//! owner loads the data, claims the shard (deleting the handoff record),
//! starts it; every worker routes to it; the old owner deletes its copy.

use anyhow::{anyhow, bail, Context as _, Result};
use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use millrace_engine::savepoint::SavepointStore;
use millrace_engine::{Metrics, Worker};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a worker looks at the ownership keys.
const POLL: Duration = Duration::from_millis(100);
/// The TTL of a worker's lease: how long a silent worker counts as alive.
pub const LEASE_TTL_SECONDS: i64 = 5;
/// At most this many shards move at once.
const MAX_MOVES: usize = 4;

/// Where a deployment's ownership lives: `etcd://HOST:PORT/PREFIX`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinUrl {
    /// `HOST:PORT` of an etcd member.
    pub endpoint: String,
    /// Key prefix of this deployment, `/PREFIX` (no trailing `/`).
    pub prefix: String,
}

impl JoinUrl {
    /// Parses `etcd://HOST:PORT/PREFIX`.
    pub fn parse(url: &str) -> Result<JoinUrl> {
        let rest = url
            .strip_prefix("etcd://")
            .ok_or_else(|| anyhow!("`{url}`: expected etcd://HOST:PORT/PREFIX"))?;
        let (endpoint, prefix) = rest
            .split_once('/')
            .ok_or_else(|| anyhow!("`{url}`: no /PREFIX after etcd://HOST:PORT"))?;
        let prefix = prefix.trim_end_matches('/');
        if endpoint.is_empty() || !endpoint.contains(':') {
            bail!("`{url}`: expected HOST:PORT after etcd://");
        }
        if prefix.is_empty()
            || prefix
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == "..")
            || prefix.chars().any(char::is_control)
        {
            bail!(
                "`{url}`: the PREFIX must be /-separated names, without empty, `.` or `..` parts"
            );
        }
        Ok(JoinUrl {
            endpoint: endpoint.to_owned(),
            prefix: format!("/{prefix}"),
        })
    }
}

/// The key names under a deployment's prefix.
#[derive(Debug, Clone)]
struct Keys(String);

impl Keys {
    fn all(&self) -> String {
        format!("{}/", self.0)
    }
    fn member(&self, id: &str) -> String {
        format!("{}/members/{id}", self.0)
    }
    fn controller(&self) -> String {
        format!("{}/controller", self.0)
    }
    fn assign(&self, sid: u32) -> String {
        format!("{}/assign/{sid:06}", self.0)
    }
    fn owner(&self, sid: u32) -> String {
        format!("{}/owner/{sid:06}", self.0)
    }
    fn handoff(&self, sid: u32) -> String {
        format!("{}/handoff/{sid:06}", self.0)
    }
    fn leaving(&self, id: &str) -> String {
        format!("{}/leaving/{id}", self.0)
    }
}

/// Where a moving shard's data waits for its new owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handoff {
    /// The worker that released it.
    pub from: String,
    /// Its epoch there.
    pub epoch: i64,
    /// The file in the handoff store.
    pub file: String,
    /// Its size and SHA-256.
    pub bytes: u64,
    pub sha256: String,
    /// When it stopped at the old owner (ms since the Unix epoch).
    pub stopped_ms: i64,
}

/// What the ownership keys say, at one revision.
#[derive(Debug, Default, Clone)]
pub struct View {
    /// Live workers (their lease holds).
    pub members: BTreeSet<String>,
    /// Workers asked to hand their shards away.
    pub leaving: BTreeSet<String>,
    /// The controller and the `create_revision` of its key.
    pub controller: Option<(String, i64)>,
    pub assign: BTreeMap<u32, String>,
    /// Owner and epoch.
    pub owner: BTreeMap<u32, (String, i64)>,
    /// A moving shard's data, and the record's `mod_revision`.
    pub handoff: BTreeMap<u32, (Handoff, i64)>,
}

impl View {
    fn parse(prefix: &str, kvs: &[etcd_client::KeyValue]) -> View {
        let mut v = View::default();
        for kv in kvs {
            let (Ok(key), Ok(value)) = (kv.key_str(), kv.value_str()) else {
                continue;
            };
            let Some(rest) = key.strip_prefix(prefix).and_then(|r| r.strip_prefix('/')) else {
                continue;
            };
            let sid = |s: &str| s.parse::<u32>().ok();
            match rest.split_once('/') {
                None if rest == "controller" => {
                    v.controller = Some((value.to_owned(), kv.create_revision()))
                }
                Some(("members", id)) => {
                    v.members.insert(id.to_owned());
                }
                Some(("leaving", id)) => {
                    v.leaving.insert(id.to_owned());
                }
                Some(("assign", s)) => {
                    if let Some(s) = sid(s) {
                        v.assign.insert(s, value.to_owned());
                    }
                }
                Some(("owner", s)) => {
                    if let Some(s) = sid(s) {
                        v.owner.insert(s, (value.to_owned(), kv.mod_revision()));
                    }
                }
                Some(("handoff", s)) => {
                    if let (Some(s), Ok(h)) = (sid(s), serde_json::from_str::<Handoff>(value)) {
                        v.handoff.insert(s, (h, kv.mod_revision()));
                    }
                }
                _ => {}
            }
        }
        v
    }

    /// Shards assigned elsewhere than where they are owned: moves under way.
    pub fn moving(&self) -> Vec<u32> {
        let mut out: Vec<u32> = self
            .owner
            .iter()
            .filter(|(sid, (w, _))| self.assign.get(sid) != Some(w))
            .map(|(sid, _)| *sid)
            .collect();
        out.extend(self.handoff.keys().filter(|s| !self.owner.contains_key(s)));
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// What the controller changes in `view`: every shard assigned to a live
/// worker that is not leaving (without `takeover`, a dead worker keeps its
/// shards until it comes back; with it, they go to live ones); the shards
/// of `movable` (computations) spread evenly, at most [`MAX_MOVES`] moving
/// at a time. `workers` in cluster order.
pub fn assignments(
    view: &View,
    workers: &[String],
    shards: u32,
    movable: impl Fn(u32) -> bool,
    takeover: bool,
) -> BTreeMap<u32, String> {
    let live: Vec<&String> = workers
        .iter()
        .filter(|w| view.members.contains(*w) && !view.leaving.contains(*w))
        .collect();
    let mut changes = BTreeMap::new();
    if live.is_empty() {
        return changes;
    }
    let mut assign = view.assign.clone();
    let load = |assign: &BTreeMap<u32, String>, w: &str, only_movable: bool| {
        assign
            .iter()
            .filter(|(s, a)| a.as_str() == w && (!only_movable || movable(**s)))
            .count()
    };
    let mut moving = view.moving().len();
    // Unassigned shards, and those of leaving workers, to the least loaded.
    for sid in 0..shards {
        let gone = match assign.get(&sid) {
            None => true,
            Some(a) => {
                view.leaving.contains(a)
                    || !workers.contains(a)
                    || (takeover && !view.members.contains(a))
            }
        };
        if gone {
            let to = live
                .iter()
                .min_by_key(|w| load(&assign, w, false))
                .map(|w| (*w).clone())
                .unwrap_or_default();
            assign.insert(sid, to.clone());
            changes.insert(sid, to);
        }
    }
    // Spread the movable shards: from the most to the least loaded live
    // worker, one settled shard (owned where it is assigned) at a time.
    while moving < MAX_MOVES {
        let by_load = |a: &BTreeMap<u32, String>| {
            let mut l: Vec<(usize, &String)> =
                live.iter().map(|w| (load(a, w, true), *w)).collect();
            l.sort();
            l
        };
        let l = by_load(&assign);
        let (Some(&(low, to)), Some(&(high, from))) = (l.first(), l.last()) else {
            break;
        };
        if high <= low + 1 {
            break;
        }
        let settled = assign.iter().find(|(s, a)| {
            *a == from
                && movable(**s)
                && view.owner.get(s).map(|(o, _)| o) == Some(from)
                && !changes.contains_key(s)
        });
        let Some((&sid, _)) = settled else { break };
        let to = to.clone();
        assign.insert(sid, to.clone());
        changes.insert(sid, to);
        moving += 1;
    }
    changes
}

/// A worker's side of the ownership protocol.
pub struct Ownership {
    client: Client,
    runtime: tokio::runtime::Handle,
    keys: Keys,
    me: String,
    /// `[[cluster.workers]]` ids, in order: a worker's index is its place here.
    workers: Vec<String>,
    worker: Arc<Worker>,
    handoff: Box<dyn SavepointStore>,
    metrics: Arc<Metrics>,
    lease: i64,
    /// With a commit log: a dead worker's shards go to live ones.
    takeover: bool,
    /// Asked to hand every shard away.
    pub leave: Arc<AtomicBool>,
    /// Owns nothing any more after a leave.
    pub left: Arc<AtomicBool>,
    /// The last view read, as [`describe`] gives it, with `read_ms` (when it
    /// was read, ms since the Unix epoch): what `/status` shows.
    pub seen: Published,
}

/// The ownership a worker last read from etcd, for `/status`.
pub type Published = Arc<parking_lot::Mutex<Option<serde_json::Value>>>;

/// A shard's name, `COMPONENT/SHARD`, from its id in `plan`.
pub fn shard_name(plan: &millrace_engine::Plan, sid: u32) -> String {
    plan.shards.get(sid as usize).map_or_else(
        || "?".to_owned(),
        |s| format!("{}/{}", plan.nodes[s.node].name, s.shard),
    )
}

/// Milliseconds since the Unix epoch, by this machine's clock.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Ownership {
    /// Connects to etcd on `runtime`, joins the deployment under a lease
    /// (kept alive on `runtime`) and says this worker is not leaving.
    pub fn join(
        url: &JoinUrl,
        runtime: tokio::runtime::Handle,
        me: &str,
        workers: Vec<String>,
        worker: Arc<Worker>,
        handoff: Box<dyn SavepointStore>,
        metrics: Arc<Metrics>,
    ) -> Result<Ownership> {
        let endpoint = url.endpoint.clone();
        let client = runtime
            .block_on(async move {
                tokio::time::timeout(
                    Duration::from_secs(10),
                    Client::connect([endpoint.as_str()], None),
                )
                .await
            })
            .map_err(|_| anyhow!("etcd at {} did not answer within 10 s", url.endpoint))?
            .with_context(|| format!("connecting to etcd at {}", url.endpoint))?;
        let keys = Keys(url.prefix.clone());
        let mut o = Ownership {
            client,
            runtime,
            keys,
            me: me.to_owned(),
            workers,
            worker,
            handoff,
            metrics,
            lease: 0,
            takeover: false,
            leave: Arc::new(AtomicBool::new(false)),
            left: Arc::new(AtomicBool::new(false)),
            seen: Published::default(),
        };
        o.register()?;
        let leaving = o.keys.leaving(me);
        let mut c = o.client.clone();
        o.runtime
            .block_on(async move { c.delete(leaving, None).await })
            .context("clearing this worker's leaving mark in etcd")?;
        Ok(o)
    }

    /// With a commit log: as the controller, gives the shards of dead
    /// workers to live ones (see the module's notes).
    pub fn taking_over_dead_workers(mut self, yes: bool) -> Self {
        self.takeover = yes;
        self
    }

    /// A new lease, and this worker's member key under it; keeps the lease
    /// alive on the runtime until it is lost (then [`Ownership::step`]
    /// registers again).
    fn register(&mut self) -> Result<()> {
        let mut c = self.client.clone();
        let (member, me) = (self.keys.member(&self.me), self.me.clone());
        let lease = self
            .runtime
            .block_on(async move {
                let lease = c.lease_grant(LEASE_TTL_SECONDS, None).await?.id();
                c.put(member, me, Some(PutOptions::new().with_lease(lease)))
                    .await?;
                Ok::<_, etcd_client::Error>(lease)
            })
            .context("joining the deployment in etcd")?;
        self.lease = lease;
        let mut c = self.client.clone();
        self.runtime.spawn(async move {
            let Ok((mut keeper, mut answers)) = c.lease_keep_alive(lease).await else {
                return;
            };
            loop {
                if keeper.keep_alive().await.is_err() {
                    return;
                }
                match answers.message().await {
                    Ok(Some(a)) if a.ttl() > 0 => {}
                    _ => return, // expired or gone: registered again by `step`
                }
                tokio::time::sleep(Duration::from_millis(LEASE_TTL_SECONDS as u64 * 1000 / 3))
                    .await;
            }
        });
        Ok(())
    }

    fn block_on<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        self.runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(5), f).await })
            .map_err(|_| anyhow!("etcd did not answer within 5 s"))?
            .map_err(anyhow::Error::from)
    }

    /// Reads every ownership key.
    pub fn view(&self) -> Result<View> {
        let mut c = self.client.clone();
        let all = self.keys.all();
        let r =
            self.block_on(async move { c.get(all, Some(GetOptions::new().with_prefix())).await })?;
        Ok(View::parse(&self.keys.0, r.kvs()))
    }

    fn index(&self, id: &str) -> Option<usize> {
        self.workers.iter().position(|w| w == id)
    }

    /// Runs the protocol until the worker halts or, after a leave, owns
    /// nothing; errors of one round are logged and the next round retries.
    pub fn run(mut self, halt: Arc<AtomicBool>) {
        let mut last_error = String::new();
        while !halt.load(Ordering::SeqCst) {
            match self.step() {
                Ok(true) => {
                    self.left.store(true, Ordering::SeqCst);
                    return;
                }
                Ok(false) => last_error.clear(),
                Err(e) => {
                    let e = format!("{e:#}");
                    if e != last_error {
                        tracing::warn!(error = %e, "shard ownership (etcd): retrying");
                        last_error = e;
                    }
                }
            }
            std::thread::sleep(POLL);
        }
    }

    /// One round: stay registered, control if this worker controls, hand
    /// away what is assigned elsewhere, claim what is assigned here, route
    /// the rest. Returns whether a leave is complete.
    pub fn step(&mut self) -> Result<bool> {
        let leaving = self.leave.load(Ordering::SeqCst);
        if leaving {
            let mut c = self.client.clone();
            let key = self.keys.leaving(&self.me);
            self.block_on(async move { c.put(key, "", None).await })?;
        }
        let view = self.view()?;
        if view.leaving.contains(&self.me) {
            self.leave.store(true, Ordering::SeqCst);
        }
        if !view.members.contains(&self.me) {
            tracing::warn!("this worker's etcd lease was lost; joining again");
            self.register()?;
            // The view was read while this worker was no member: the
            // controller may have freed its shards since. The next round
            // reads them again before anything is claimed or adopted.
            return Ok(false);
        }
        self.control(&view)?;
        self.stop_superseded(&view)?;
        for (&sid, (owner, epoch)) in &view.owner {
            let running = self.worker.shards_owned().contains(&sid);
            if owner == &self.me && view.assign.get(&sid) != Some(&self.me) {
                // Fenced by the epoch it runs at (or, not running, the
                // one etcd holds for it here).
                let at = match self.worker.owner_of(sid) {
                    Some((_, e)) if running => e as i64,
                    _ => *epoch,
                };
                self.release(sid, at, view.assign.get(&sid))?;
            } else if owner == &self.me && !running {
                // Ours since before a restart: its data is here.
                self.worker.adopt_shard(sid, None, *epoch as u64)?;
            }
        }
        for (&sid, assigned) in &view.assign {
            if assigned == &self.me && !view.owner.contains_key(&sid) && !leaving {
                self.claim(sid, view.handoff.get(&sid))?;
            }
        }
        let view = self.view()?;
        self.publish(&view);
        self.stop_superseded(&view)?;
        for sid in 0..self.worker.plan().shards.len() as u32 {
            match view.owner.get(&sid) {
                Some((w, _)) if w == &self.me => {}
                Some((w, epoch)) => {
                    let Some(i) = self.index(w) else { continue };
                    if self.worker.owner_of(sid) != Some((i, *epoch as u64)) {
                        self.worker.route(sid, Some(i), *epoch as u64)?;
                    }
                }
                None => {
                    if self.worker.owner_of(sid).is_some()
                        && !self.worker.shards_owned().contains(&sid)
                    {
                        self.worker.route(sid, None, 0)?;
                    }
                }
            }
        }
        let owns_nothing = !view.owner.values().any(|(w, _)| w == &self.me);
        if leaving && owns_nothing {
            self.resign(&view)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Keeps `view` for `/status`.
    fn publish(&self, view: &View) {
        let plan = self.worker.plan();
        let now = now_ms();
        let mut described = describe(view, &|sid| shard_name(plan, sid), now);
        described["read_ms"] = now.into();
        *self.seen.lock() = Some(described);
    }

    /// Stops every shard this worker runs that etcd does not hold as its
    /// at the epoch it runs at: another claim superseded it (this worker is
    /// a stale owner). It is started again only from a claim of its own.
    fn stop_superseded(&mut self, view: &View) -> Result<()> {
        for sid in self.worker.shards_owned() {
            let epoch = self.worker.owner_of(sid).map_or(0, |(_, e)| e as i64);
            if view.owner.get(&sid) != Some(&(self.me.clone(), epoch)) {
                self.stop_if_running(sid)?;
                self.fenced(
                    "running a shard etcd holds for another claim: stopped",
                    Some(sid),
                );
            }
        }
        Ok(())
    }

    /// Stops shard `sid` if this worker runs it. An executor fenced off
    /// by the commit log drops its shards by itself, and may do so
    /// between the look and the stop: then there is nothing to stop.
    fn stop_if_running(&self, sid: u32) -> Result<()> {
        if !self.worker.shards_owned().contains(&sid) {
            return Ok(());
        }
        match self.worker.stop_shard(sid) {
            Err(_) if !self.worker.shards_owned().contains(&sid) => Ok(()),
            r => Ok(r?),
        }
    }

    fn fenced(&self, what: &str, sid: Option<u32>) {
        self.metrics.ownership_fenced.inc();
        tracing::warn!(
            shard = sid.map_or_else(|| "-".to_owned(), |s| s.to_string()),
            "refused by etcd: {what} (this worker's view was stale)"
        );
    }

    /// Becomes the controller if there is none; as the controller, writes
    /// the assignments [`assignments`] asks for.
    fn control(&mut self, view: &View) -> Result<()> {
        let key = self.keys.controller();
        let rev = match &view.controller {
            Some((id, rev)) if id == &self.me => *rev,
            Some(_) => return Ok(()),
            None => {
                let (mut c, me, lease, k) = (
                    self.client.clone(),
                    self.me.clone(),
                    self.lease,
                    key.clone(),
                );
                let r = self.block_on(async move {
                    c.txn(
                        Txn::new()
                            .when([Compare::version(k.clone(), CompareOp::Equal, 0)])
                            .and_then([TxnOp::put(
                                k,
                                me,
                                Some(PutOptions::new().with_lease(lease)),
                            )]),
                    )
                    .await
                })?;
                if r.succeeded() {
                    tracing::info!("this worker controls the shard assignment");
                }
                return Ok(()); // assignments from the next round's view
            }
        };
        let plan = self.worker.plan();
        let movable = |sid: u32| {
            plan.shards
                .get(sid as usize)
                .is_some_and(|s| plan.nodes[s.node].role == millrace_config::Role::Computation)
        };
        let changes = assignments(
            view,
            &self.workers,
            plan.shards.len() as u32,
            movable,
            self.takeover,
        );
        if self.takeover {
            self.free_dead_owners(view, &key, rev)?;
        }
        if changes.is_empty() {
            return Ok(());
        }
        let ops: Vec<TxnOp> = changes
            .iter()
            .map(|(sid, w)| TxnOp::put(self.keys.assign(*sid), w.as_str(), None))
            .collect();
        let mut c = self.client.clone();
        let r = self.block_on(async move {
            c.txn(
                Txn::new()
                    .when([Compare::create_revision(key, CompareOp::Equal, rev)])
                    .and_then(ops),
            )
            .await
        })?;
        if r.succeeded() {
            tracing::info!(shards = changes.len(), "shards assigned");
        } else {
            self.fenced(
                "an assignment by a controller that no longer controls",
                None,
            );
        }
        Ok(())
    }

    /// With a commit log: frees each shard whose owner is dead (its lease
    /// expired), so that the worker it is now assigned to claims it and
    /// rebuilds it from the log. Each in a transaction that holds only if
    /// this worker still controls, the owner is still the one seen (at its
    /// epoch), and it is still not a member; a dead owner that wakes up
    /// finds its next append to the log refused.
    fn free_dead_owners(&mut self, view: &View, controller: &str, rev: i64) -> Result<()> {
        let dead: Vec<(u32, String, i64)> = view
            .owner
            .iter()
            .filter(|(_, (w, _))| !view.members.contains(w) && w != &self.me)
            .map(|(&sid, (w, epoch))| (sid, w.clone(), *epoch))
            .collect();
        for (sid, was, epoch) in dead {
            let (owner, member) = (self.keys.owner(sid), self.keys.member(&was));
            let when = [
                Compare::create_revision(controller, CompareOp::Equal, rev),
                Compare::mod_revision(owner.clone(), CompareOp::Equal, epoch),
                Compare::version(member, CompareOp::Equal, 0),
            ];
            let mut c = self.client.clone();
            let r = self.block_on(async move {
                c.txn(Txn::new().when(when).and_then([TxnOp::delete(owner, None)]))
                    .await
            })?;
            if r.succeeded() {
                self.metrics.shard_takeovers.inc();
                tracing::warn!(shard = sid, owner = %was, epoch, "the owner of a shard is gone (its lease expired): the shard is taken over from the commit log");
            } else {
                self.fenced("freeing the shard of a worker that is gone", Some(sid));
            }
        }
        Ok(())
    }

    /// Hands shard `sid` (owned here at `epoch`) to whoever it is assigned to.
    fn release(&mut self, sid: u32, epoch: i64, to: Option<&String>) -> Result<()> {
        let started = Instant::now();
        self.stop_if_running(sid)?;
        let stopped_ms = now_ms();
        let phase = Instant::now();
        let (data, keys) = self.worker.shard_data(sid)?;
        let export_ms = phase.elapsed().as_millis() as u64;
        let file = format!("handoff/{sid:06}-{epoch}.shard");
        let h = Handoff {
            from: self.me.clone(),
            epoch,
            file: file.clone(),
            bytes: data.len() as u64,
            sha256: hex(&Sha256::digest(&data)),
            stopped_ms,
        };
        let phase = Instant::now();
        self.handoff
            .put(&file, data)
            .with_context(|| format!("writing shard {sid} to {}", self.handoff.describe()))?;
        let write_ms = phase.elapsed().as_millis() as u64;
        let owner = self.keys.owner(sid);
        let record = serde_json::to_string(&h)?;
        let (mut c, me, hk) = (self.client.clone(), self.me.clone(), self.keys.handoff(sid));
        let r = self.block_on(async move {
            c.txn(
                Txn::new()
                    .when([
                        Compare::value(owner.clone(), CompareOp::Equal, me),
                        Compare::mod_revision(owner.clone(), CompareOp::Equal, epoch),
                    ])
                    .and_then([TxnOp::delete(owner, None), TxnOp::put(hk, record, None)]),
            )
            .await
        })?;
        if !r.succeeded() {
            self.fenced("a release of a shard this worker no longer owns", Some(sid));
            return Ok(());
        }
        self.worker.drop_shard_data(sid)?;
        tracing::info!(
            shard = sid,
            to = to.map_or("-", |s| s.as_str()),
            keys,
            export_ms,
            write_ms,
            ms = started.elapsed().as_millis() as u64,
            "shard handed away"
        );
        Ok(())
    }

    /// Claims shard `sid` (assigned here, owned by nobody), loading the
    /// data its old owner handed off first, and starts it.
    fn claim(&mut self, sid: u32, handoff: Option<&(Handoff, i64)>) -> Result<()> {
        let (mut read_ms, mut load_ms) = (0, 0);
        if let Some((h, _)) = handoff {
            let phase = Instant::now();
            let data = self
                .handoff
                .get(&h.file)
                .with_context(|| format!("reading shard {sid} from {}", self.handoff.describe()))?
                .ok_or_else(|| anyhow!("{} is missing from {}", h.file, self.handoff.describe()))?;
            let sum = hex(&Sha256::digest(&data));
            if data.len() as u64 != h.bytes || sum != h.sha256 {
                bail!(
                    "{} in {} is not what its handoff record says ({} bytes, SHA-256 {sum}; \
                     the record: {} bytes, {})",
                    h.file,
                    self.handoff.describe(),
                    data.len(),
                    h.bytes,
                    h.sha256
                );
            }
            read_ms = phase.elapsed().as_millis() as u64;
            let phase = Instant::now();
            self.worker.load_shard_data(sid, &data)?;
            load_ms = phase.elapsed().as_millis() as u64;
        }
        let (owner, assign, hk) = (
            self.keys.owner(sid),
            self.keys.assign(sid),
            self.keys.handoff(sid),
        );
        let mut when = vec![
            Compare::version(owner.clone(), CompareOp::Equal, 0),
            Compare::value(assign, CompareOp::Equal, self.me.clone()),
        ];
        let mut ops = vec![TxnOp::put(owner, self.me.clone(), None)];
        match handoff {
            Some((_, rev)) => {
                when.push(Compare::mod_revision(hk.clone(), CompareOp::Equal, *rev));
                ops.push(TxnOp::delete(hk, None));
            }
            None => when.push(Compare::version(hk, CompareOp::Equal, 0)),
        }
        let mut c = self.client.clone();
        let r = self.block_on(async move { c.txn(Txn::new().when(when).and_then(ops)).await })?;
        if !r.succeeded() {
            self.fenced("a claim of a shard not free for this worker", Some(sid));
            return Ok(());
        }
        let epoch = r
            .header()
            .map(|h| h.revision())
            .ok_or_else(|| anyhow!("etcd answered a claim without a revision"))?;
        let phase = Instant::now();
        self.worker.adopt_shard(sid, None, epoch as u64)?;
        let start_ms = phase.elapsed().as_millis() as u64;
        if let Some((h, _)) = handoff {
            // Its data is in this worker's store now (loaded before the
            // claim, durably): the handed-off copy is not needed again. A
            // crash just before this leaves the file behind, nothing else.
            if let Err(e) = self.handoff.delete(&h.file) {
                tracing::warn!(shard = sid, file = %h.file, error = %e, "the handed-off copy of a claimed shard was not removed");
            }
            let pause = (now_ms() - h.stopped_ms).max(0) as f64 / 1000.0;
            self.metrics.shard_move_pause_seconds.observe(pause);
            self.metrics.shard_moves.with_label_values(&["in"]).inc();
            tracing::info!(
                shard = sid,
                from = %h.from,
                epoch,
                pause_ms = (pause * 1000.0) as u64,
                read_ms,
                load_ms,
                start_ms,
                "shard moved here"
            );
        } else {
            tracing::info!(shard = sid, epoch, "shard claimed");
        }
        Ok(())
    }

    /// After a leave: gives up the controller key and the lease.
    fn resign(&mut self, view: &View) -> Result<()> {
        let mut c = self.client.clone();
        let lease = self.lease;
        let controls = matches!(&view.controller, Some((id, _)) if id == &self.me);
        let key = self.keys.controller();
        self.block_on(async move {
            if controls {
                c.delete(key, None).await?;
            }
            c.lease_revoke(lease).await.map(|_| ())
        })
    }
}

/// `millrace leave`: asks worker `id` to hand its shards away and exit.
pub fn ask_to_leave(url: &JoinUrl, id: &str) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime")?;
    let key = Keys(url.prefix.clone()).leaving(id);
    runtime.block_on(async {
        let mut c = Client::connect([url.endpoint.as_str()], None)
            .await
            .with_context(|| format!("connecting to etcd at {}", url.endpoint))?;
        c.put(key, "", None).await.context("writing the leave")?;
        Ok(())
    })
}

/// `millrace cluster status`: what etcd says of the deployment at `url`.
pub fn status(url: &JoinUrl, names: &dyn Fn(u32) -> String, json: bool) -> Result<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime")?;
    let keys = Keys(url.prefix.clone());
    let view = runtime.block_on(async {
        let mut c = Client::connect([url.endpoint.as_str()], None)
            .await
            .with_context(|| format!("connecting to etcd at {}", url.endpoint))?;
        let r = c
            .get(keys.all(), Some(GetOptions::new().with_prefix()))
            .await
            .context("reading the ownership keys")?;
        Ok::<_, anyhow::Error>(View::parse(&keys.0, r.kvs()))
    })?;
    if json {
        return Ok(describe(&view, names, now_ms()).to_string());
    }
    let mut out = format!(
        "members: {}\ncontroller: {}\n",
        view.members.iter().cloned().collect::<Vec<_>>().join(", "),
        view.controller.as_ref().map_or("none", |(w, _)| w.as_str())
    );
    if !view.leaving.is_empty() {
        out.push_str(&format!(
            "leaving: {}\n",
            view.leaving.iter().cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    out.push_str("shard\tname\tassigned\towner\tepoch\n");
    let moving: BTreeSet<u32> = view.moving().into_iter().collect();
    for s in shard_ids(&view) {
        let (owner, epoch) = view
            .owner
            .get(&s)
            .map_or(("-".to_owned(), "-".to_owned()), |(w, e)| {
                (w.clone(), e.to_string())
            });
        let moving = match (moving.contains(&s), view.handoff.get(&s)) {
            (true, Some((h, _))) => format!("\tmoving (handed off by {})", h.from),
            (true, None) => "\tmoving".to_owned(),
            (false, _) => String::new(),
        };
        out.push_str(&format!(
            "{s}\t{}\t{}\t{owner}\t{epoch}{moving}\n",
            names(s),
            view.assign.get(&s).map_or("-", |w| w.as_str()),
        ));
    }
    Ok(out)
}

/// Every shard the ownership keys name, in order.
fn shard_ids(view: &View) -> BTreeSet<u32> {
    view.assign
        .keys()
        .chain(view.owner.keys())
        .chain(view.handoff.keys())
        .copied()
        .collect()
}

/// `view` as `millrace cluster-status --json` and `/status` show it: the
/// members, the controller, and every shard's assignment, owner, epoch and
/// move under way (with, once its old owner released it, who handed it off
/// and how long ago it stopped there). `now_ms` dates the moves.
pub fn describe(view: &View, names: &dyn Fn(u32) -> String, now_ms: i64) -> serde_json::Value {
    let moving: BTreeSet<u32> = view.moving().into_iter().collect();
    let shards: Vec<serde_json::Value> = shard_ids(view)
        .iter()
        .map(|s| {
            let handoff = view.handoff.get(s).map(|(h, _)| {
                serde_json::json!({
                    "from": h.from,
                    "bytes": h.bytes,
                    "stopped_ms_ago": (now_ms - h.stopped_ms).max(0),
                })
            });
            serde_json::json!({
                "shard": s,
                "name": names(*s),
                "assigned": view.assign.get(s),
                "owner": view.owner.get(s).map(|(w, _)| w),
                "epoch": view.owner.get(s).map(|(_, e)| e),
                "moving": moving.contains(s),
                "handoff": handoff,
            })
        })
        .collect();
    serde_json::json!({
        "members": view.members,
        "leaving": view.leaving,
        "controller": view.controller.as_ref().map(|(w, _)| w),
        "shards": shards,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(members: &[&str], assign: &[(u32, &str)], owner: &[(u32, &str)]) -> View {
        View {
            members: members.iter().map(|s| s.to_string()).collect(),
            assign: assign.iter().map(|(s, w)| (*s, w.to_string())).collect(),
            owner: owner
                .iter()
                .map(|(s, w)| (*s, (w.to_string(), 1)))
                .collect(),
            ..View::default()
        }
    }

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("w{i}")).collect()
    }

    #[test]
    fn join_urls_name_an_endpoint_and_a_prefix() {
        let u = JoinUrl::parse("etcd://127.0.0.1:2379/millrace/job").expect("valid");
        assert_eq!(u.endpoint, "127.0.0.1:2379");
        assert_eq!(u.prefix, "/millrace/job");
        for bad in [
            "http://127.0.0.1:2379/x",
            "etcd://127.0.0.1:2379",
            "etcd://127.0.0.1:2379/",
            "etcd://127.0.0.1:2379/a/../b",
            "etcd://127.0.0.1:2379/a//b",
            "etcd:///x",
        ] {
            assert!(JoinUrl::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn a_first_assignment_spreads_every_shard_over_the_live_workers() {
        let v = view(&["w0", "w1", "w2"], &[], &[]);
        let a = assignments(&v, &ids(3), 9, |_| true, false);
        assert_eq!(a.len(), 9);
        for w in ids(3) {
            assert_eq!(a.values().filter(|x| **x == w).count(), 3, "{w}");
        }
    }

    #[test]
    fn a_joining_worker_takes_its_share_a_few_settled_shards_at_a_time() {
        let assign: Vec<(u32, &str)> = (0..12)
            .map(|s| (s, ["w0", "w1", "w2"][s as usize % 3]))
            .collect();
        let v = view(&["w0", "w1", "w2", "w3"], &assign, &assign);
        let a = assignments(&v, &ids(4), 12, |_| true, false);
        assert_eq!(a.len(), 3, "{a:?}");
        assert!(a.values().all(|w| w == "w3"));
        // Unsettled shards (owned elsewhere than assigned) count against the
        // moves in flight and are not moved again.
        let mut v2 = v.clone();
        for (s, w) in &a {
            v2.assign.insert(*s, w.clone());
        }
        let again = assignments(&v2, &ids(4), 12, |_| true, false);
        assert!(again.len() <= MAX_MOVES - 3, "{again:?}");
        assert!(again.keys().all(|s| !a.contains_key(s)));
    }

    #[test]
    fn a_dead_worker_keeps_its_shards_without_a_log_and_a_leaving_one_gives_them_all() {
        let assign: Vec<(u32, &str)> = (0..6).map(|s| (s, ["w0", "w1"][s as usize % 2])).collect();
        // w1 is not a member (its lease expired): nothing of it moves.
        let v = view(&["w0"], &assign, &assign);
        assert!(assignments(&v, &ids(2), 6, |_| true, false).is_empty());
        // With a commit log, they go to the live ones, sources and sinks too.
        let a = assignments(&v, &ids(2), 6, |_| false, true);
        assert_eq!(a.keys().copied().collect::<Vec<_>>(), vec![1, 3, 5]);
        assert!(a.values().all(|w| w == "w0"));
        // w1 leaves: all of its shards, sources and sinks too, go to w0.
        let mut v = view(&["w0", "w1"], &assign, &assign);
        v.leaving.insert("w1".into());
        let a = assignments(&v, &ids(2), 6, |_| false, false);
        assert_eq!(a.keys().copied().collect::<Vec<_>>(), vec![1, 3, 5]);
        assert!(a.values().all(|w| w == "w0"));
    }

    #[test]
    fn sources_and_sinks_are_not_moved_to_balance() {
        let assign: Vec<(u32, &str)> = (0..4).map(|s| (s, "w0")).collect();
        let v = view(&["w0", "w1"], &assign, &assign);
        assert!(assignments(&v, &ids(2), 4, |_| false, false).is_empty());
        assert_eq!(assignments(&v, &ids(2), 4, |_| true, false).len(), 2);
    }
}
