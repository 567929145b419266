//! Savepoints between real stores: every column family survives an export
//! and a load; a manifest cannot name a file outside its savepoint; a
//! location holds one savepoint; a load stages beside its data directory
//! and leaves nothing behind when refused.

use super::*;
use crate::layout::{
    cluster_key, outbox_key, outbox_prefix, shards_key, state_key, timer_key, watermark_key,
};
use crate::TimeDomain;
use std::path::PathBuf;
use std::sync::Arc;

/// Two workers, `a` and `b`, over 4 shards of `count` (and `gen`); `b`
/// listening at `b_address`.
fn plan_with(b_address: &str) -> Plan {
    crate::test_kinds::plan(&format!(
        r#"
[engine]
shards = 4
[sources.gen]
type = "nothing"
[computations.count]
type = "nothing"
inputs = ["gen"]
[cluster]
secret = "a-secret-of-16-bytes"
[[cluster.workers]]
id = "a"
address = "127.0.0.1:1"
[[cluster.workers]]
id = "b"
address = "{b_address}"
"#
    ))
}

fn plan() -> Plan {
    plan_with("127.0.0.1:2")
}

/// A stopped worker `me`'s data directory: the layout keys, and in each of
/// its shards a state key, an event-time timer, an outbox entry, a channel
/// sequence number and a watermark, all holding `moment`.
fn worker_data(plan: &Plan, me: usize, dir: &Path, moment: u8) {
    let store = Store::open(dir, &StoreOptions::default()).expect("store");
    let mut b = store.batch();
    b.put(
        Cf::Meta,
        &shards_key(),
        &plan.topology.engine.shards.to_be_bytes(),
    );
    let layout = [
        (plan.workers as u32).to_be_bytes(),
        (me as u32).to_be_bytes(),
    ]
    .concat();
    b.put(Cf::Meta, &cluster_key(), &layout);
    for s in plan.shards.iter().filter(|s| s.worker == me) {
        let p = &s.prefix;
        b.put_state(&state_key(p, b"key"), Some(&[moment, 1]));
        let timer = timer_key(p, TimeDomain::EventTime, 21_000_000, b"key", b"\0ttl");
        b.put(Cf::Timers, &timer, &[moment]);
        b.put(
            Cf::Outbox,
            &outbox_key(&outbox_prefix(p, "gen", 0), 7),
            &[moment, 2],
        );
        b.put(Cf::Channels, &[p.as_slice(), b"seq"].concat(), &[moment, 3]);
        b.put(Cf::Meta, &watermark_key(p), &[moment, 4]);
    }
    store.commit(b).expect("commit");
}

/// Every key and value of shard `prefix`, per column family.
fn contents(dir: &Path, prefix: &[u8]) -> Vec<(Cf, Vec<u8>, Vec<u8>)> {
    let store = Store::open(dir, &StoreOptions::default()).expect("store");
    let mut out = Vec::new();
    store
        .for_each_state(prefix, |k, v| {
            out.push((Cf::State, k.to_vec(), v.to_vec()));
            true
        })
        .expect("state");
    for cf in [Cf::Timers, Cf::Outbox, Cf::Channels, Cf::Meta] {
        store
            .for_each_prefix(cf, prefix, |k, v| {
                out.push((cf, k.to_vec(), v.to_vec()));
                true
            })
            .expect("scan");
    }
    out
}

/// A deployment of workers `a` and `b`, stopped, with its data at `moment`.
struct Deployment {
    dir: tempfile::TempDir,
    plan: Plan,
}

impl Deployment {
    fn new(moment: u8) -> Deployment {
        let d = Deployment {
            dir: tempfile::tempdir().expect("dir"),
            plan: plan(),
        };
        d.at(moment);
        d
    }

    fn data(&self, me: usize) -> PathBuf {
        self.dir.path().join(format!("data-{me}"))
    }

    /// Rewrites both workers' data at `moment`.
    fn at(&self, moment: u8) {
        for me in 0..2 {
            worker_data(&self.plan, me, &self.data(me), moment);
        }
    }

    fn export(&self, me: usize, to: &DirStore) -> Result<ExportReport, SavepointError> {
        export(&self.data(me), &self.plan, me, to)
    }
}

fn refused(r: Result<impl std::fmt::Debug, SavepointError>) -> String {
    match r {
        Err(SavepointError::Refused(why)) => why,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn every_column_family_of_every_shard_survives_an_export_and_a_load() {
    let d = Deployment::new(1);
    let sp = DirStore::new(d.dir.path().join("sp"));
    assert!(!d.export(0, &sp).expect("a").complete);
    let r = d.export(1, &sp).expect("b");
    assert!(r.complete && r.missing.is_empty(), "{r:?}");
    // Loaded by one worker of a one-worker topology: every shard moves.
    let one = crate::test_kinds::plan(
        "[engine]\nshards = 4\n[sources.gen]\ntype = \"nothing\"\n\
         [computations.count]\ntype = \"nothing\"\ninputs = [\"gen\"]\n",
    );
    let loaded = d.dir.path().join("loaded");
    let r = import(&loaded, &one, 0, &sp, false).expect("load");
    assert_eq!(r.shards, one.shards.len());
    for s in &d.plan.shards {
        let before = contents(&d.data(s.worker), &s.prefix);
        for cf in [Cf::State, Cf::Timers, Cf::Outbox, Cf::Channels, Cf::Meta] {
            assert!(before.iter().any(|e| e.0 == cf), "{cf:?} written");
        }
        assert_eq!(contents(&loaded, &s.prefix), before, "shard {:?}", s.prefix);
    }
}

#[test]
fn paths_inside_a_savepoint_are_relative_without_dot_parts() {
    for ok in [
        "manifest.json",
        "shards/count/0.bin",
        "parts/w-1_x.json",
        "a..b/c.d",
    ] {
        assert_eq!(check_path(ok), Ok(()), "{ok}");
    }
    for bad in [
        "",
        "/etc/hostname",
        "../x",
        "shards/../../x",
        "shards//x",
        "./shards/x",
        "shards/.",
        "shards/x/",
        "..\\x",
        "a\0b",
        "a\nb",
    ] {
        let why = check_path(bad).expect_err(bad);
        assert!(why.contains("not a path inside the savepoint"), "{why}");
    }
}

/// `d` exported whole to `sp`, and the manifest rewritten to name `file`
/// for its first shard.
fn manifest_naming(d: &Deployment, sp: &DirStore, file: &str) -> SavedShard {
    d.export(0, sp).expect("a");
    d.export(1, sp).expect("b");
    let mut m: Manifest =
        serde_json::from_slice(&sp.get("manifest.json").expect("get").expect("manifest"))
            .expect("manifest");
    let first = m.shards[0].clone();
    m.shards[0].file = file.to_owned();
    sp.put("manifest.json", serde_json::to_vec(&m).expect("json"))
        .expect("put");
    first
}

#[test]
fn a_manifest_naming_a_file_outside_the_savepoint_is_refused_before_anything_is_read() {
    let d = Deployment::new(1);
    // A file outside, with the very size and checksum the manifest names.
    let root = d.dir.path().join("sp");
    let sp = DirStore::new(&root);
    let first = manifest_naming(&d, &sp, "placeholder");
    let outside = d.dir.path().join("outside.bin");
    std::fs::copy(root.join(&first.file), &outside).expect("copy");
    for (i, name) in [
        "../outside.bin".to_owned(),
        "shards/../../outside.bin".to_owned(),
        outside.display().to_string(),
    ]
    .iter()
    .enumerate()
    {
        let mut m: Manifest =
            serde_json::from_slice(&sp.get("manifest.json").expect("get").expect("manifest"))
                .expect("manifest");
        m.shards[0].file = name.clone();
        sp.put("manifest.json", serde_json::to_vec(&m).expect("json"))
            .expect("put");
        let data = d.dir.path().join(format!("loaded-{i}"));
        let why = refused(import(&data, &d.plan, 0, &sp, false));
        assert!(
            why.contains("not a path inside the savepoint") && why.contains("component `"),
            "{name}: {why}"
        );
        assert!(!data.exists(), "{name}: nothing staged");
        assert!(!staging::staging_path(&data).expect("staging").exists());
        // The store refuses the name by itself too.
        assert!(
            matches!(sp.get(name), Err(SavepointError::Refused(_))),
            "{name}"
        );
    }
}

#[test]
fn a_link_out_of_the_savepoint_is_not_followed() {
    let d = Deployment::new(1);
    let root = d.dir.path().join("sp");
    let sp = DirStore::new(&root);
    d.export(0, &sp).expect("a");
    d.export(1, &sp).expect("b");
    // One of worker 0's shard files, moved out and linked back in.
    let mine = d
        .plan
        .shards
        .iter()
        .find(|s| s.worker == 0)
        .expect("a shard");
    let file = root.join(format!(
        "shards/{}/{}.bin",
        d.plan.nodes[mine.node].name, mine.shard
    ));
    let outside = d.dir.path().join("outside.bin");
    std::fs::rename(&file, &outside).expect("move out");
    std::os::unix::fs::symlink(&outside, &file).expect("link");
    let data = d.dir.path().join("loaded");
    let why = refused(import(&data, &d.plan, 0, &sp, false));
    assert!(why.contains("leads out of the savepoint"), "{why}");
    assert!(!why.contains("SHA-256"), "{why}");
    assert!(!data.exists() && !staging::staging_path(&data).expect("path").exists());
}

#[test]
fn an_export_into_a_complete_savepoint_is_refused_and_changes_nothing() {
    let d = Deployment::new(1);
    let root = d.dir.path().join("sp");
    let sp = DirStore::new(&root);
    d.export(0, &sp).expect("a");
    assert!(d.export(1, &sp).expect("b").complete);
    let manifest = std::fs::read(root.join("manifest.json")).expect("manifest");
    let shard = std::fs::read(root.join("shards/count/0.bin")).expect("shard");
    // Later, worker a alone again, after it ran on.
    d.at(2);
    let why = refused(d.export(0, &sp));
    assert!(why.contains("already holds a complete savepoint"), "{why}");
    assert_eq!(
        std::fs::read(root.join("manifest.json")).expect("m"),
        manifest
    );
    assert_eq!(
        std::fs::read(root.join("shards/count/0.bin")).expect("s"),
        shard
    );
    assert!(matches!(check_vacant(&sp), Err(SavepointError::Refused(_))));
}

#[test]
fn a_worker_whose_data_changed_since_its_part_is_refused_an_unchanged_one_joins() {
    let d = Deployment::new(1);
    let root = d.dir.path().join("sp");
    let sp = DirStore::new(&root);
    let first = d.export(0, &sp).expect("a");
    assert!(!first.complete);
    let part = std::fs::read(root.join("parts/a.json")).expect("part");
    // The same data again: accepted, nothing new.
    let again = d.export(0, &sp).expect("a again");
    assert_eq!(
        (again.savepoint.as_str(), again.complete),
        (first.savepoint.as_str(), false)
    );
    assert_eq!(
        std::fs::read(root.join("parts/a.json")).expect("part"),
        part
    );
    // Worker a ran on (as it must not) and exports again: refused, and
    // none of its files is touched.
    worker_data(&d.plan, 0, &d.data(0), 2);
    let shard_files: Vec<_> = serde_json::from_slice::<Part>(&part)
        .expect("part")
        .shards
        .into_iter()
        .map(|s| {
            (
                root.join(&s.file),
                std::fs::read(root.join(&s.file)).expect("shard"),
            )
        })
        .collect();
    let why = refused(d.export(0, &sp));
    assert!(why.contains("with other data"), "{why}");
    assert_eq!(
        std::fs::read(root.join("parts/a.json")).expect("part"),
        part
    );
    for (path, bytes) in shard_files {
        assert_eq!(
            std::fs::read(&path).expect("shard"),
            bytes,
            "{}",
            path.display()
        );
    }
    // Worker b completes it with worker a's first part.
    let done = d.export(1, &sp).expect("b");
    assert!(
        done.complete && done.savepoint == first.savepoint,
        "{done:?}"
    );
    let m: Manifest =
        serde_json::from_slice(&std::fs::read(root.join("manifest.json")).expect("m"))
            .expect("manifest");
    assert_eq!(m.id, first.savepoint);
}

#[test]
fn a_worker_of_another_topology_cannot_join_a_savepoint_being_taken() {
    let d = Deployment::new(1);
    let sp = DirStore::new(d.dir.path().join("sp"));
    d.export(0, &sp).expect("a");
    let other = plan_with("127.0.0.1:3");
    worker_data(&other, 1, &d.data(1), 1);
    let why = refused(export(&d.data(1), &other, 1, &sp));
    assert!(why.contains("another topology or worker list"), "{why}");
    assert_eq!(sp.get(&part_path("b")).expect("get"), None);
}

#[test]
fn a_location_holding_anything_but_a_savepoint_being_taken_is_refused() {
    let d = Deployment::new(1);
    let root = d.dir.path().join("sp");
    std::fs::create_dir_all(&root).expect("dir");
    std::fs::write(root.join("notes.txt"), "mine").expect("write");
    let sp = DirStore::new(&root);
    let why = refused(d.export(0, &sp));
    assert!(why.contains("is not empty (it holds `notes.txt`)"), "{why}");
    assert_eq!(sp.get(MARKER).expect("get"), None, "nothing written");
    assert!(!root.join("shards").exists());
    assert!(matches!(check_vacant(&sp), Err(SavepointError::Refused(_))));
}

#[test]
fn parts_of_two_savepoints_are_never_completed_into_one() {
    let d = Deployment::new(1);
    let (root, other) = (d.dir.path().join("sp"), d.dir.path().join("other"));
    let (sp, sp2) = (DirStore::new(&root), DirStore::new(&other));
    let ours = d.export(0, &sp).expect("a");
    let theirs = d.export(1, &sp2).expect("b elsewhere");
    assert_ne!(ours.savepoint, theirs.savepoint, "two savepoints, two ids");
    // b's part of the other savepoint copied in by hand.
    std::fs::create_dir_all(root.join("parts")).expect("dir");
    std::fs::copy(other.join("parts/b.json"), root.join("parts/b.json")).expect("copy");
    let why = refused(d.export(0, &sp));
    assert!(why.contains("mixes two savepoints"), "{why}");
    assert_eq!(sp.get("manifest.json").expect("get"), None);
}

#[test]
fn workers_exporting_at_once_agree_on_one_savepoint() {
    for round in 0..8 {
        let d = Arc::new(Deployment::new(1));
        let root = d.dir.path().join(format!("sp-{round}"));
        let runs: Vec<_> = (0..2)
            .map(|me| {
                let (d, root) = (Arc::clone(&d), root.clone());
                std::thread::spawn(move || d.export(me, &DirStore::new(root)))
            })
            .collect();
        let reports: Vec<ExportReport> = runs
            .into_iter()
            .map(|r| r.join().expect("thread").expect("export"))
            .collect();
        assert_eq!(reports[0].savepoint, reports[1].savepoint, "round {round}");
        assert!(reports.iter().any(|r| r.complete), "round {round}");
        let sp = DirStore::new(&root);
        let m: Manifest =
            serde_json::from_slice(&sp.get("manifest.json").expect("get").expect("manifest"))
                .expect("manifest");
        assert_eq!(m.id, reports[0].savepoint);
        assert_eq!(m.shards.len(), d.plan.shards.len());
    }
}

#[test]
fn a_stop_may_take_a_savepoint_only_where_no_part_is() {
    let d = Deployment::new(1);
    let root = d.dir.path().join("sp");
    let sp = DirStore::new(&root);
    check_vacant(&sp).expect("absent");
    std::fs::create_dir_all(&root).expect("dir");
    check_vacant(&sp).expect("empty");
    // A savepoint whose first export was cut short before its part.
    let want = Marker::new("f".into(), 4, vec!["a".into(), "b".into()]);
    assert!(sp
        .create(MARKER, serde_json::to_vec(&want).expect("json"))
        .expect("create"));
    assert!(!sp.create(MARKER, b"{}".to_vec()).expect("create again"));
    assert_eq!(read_marker(&sp).expect("read"), Some(want));
    check_vacant(&sp).expect("no part yet");
    std::fs::remove_file(root.join(MARKER)).expect("rm");
    d.export(0, &sp).expect("a");
    let why = refused(check_vacant(&sp));
    assert!(why.contains("worker a's part"), "{why}");
}

#[test]
fn a_load_stages_under_the_data_directory_name_with_loading_appended() {
    let d = Deployment::new(1);
    let sp = DirStore::new(d.dir.path().join("sp"));
    d.export(0, &sp).expect("a");
    d.export(1, &sp).expect("b");
    // `dd.v1`'s staging is `dd.v1.loading`; `dd.loading` is another's.
    let unrelated = d.dir.path().join("dd.loading");
    std::fs::create_dir_all(&unrelated).expect("dir");
    std::fs::write(unrelated.join("precious"), "keep").expect("write");
    let data = d.dir.path().join("dd.v1");
    import(&data, &d.plan, 0, &sp, false).expect("load");
    assert_eq!(
        std::fs::read(unrelated.join("precious")).expect("kept"),
        b"keep"
    );
    assert!(!d.dir.path().join("dd.v1.loading").exists());
    assert!(data.join("CURRENT").exists() && !data.join(staging::OURS).exists());
}

#[test]
fn a_staging_directory_that_is_not_a_loads_is_refused_and_kept() {
    let d = Deployment::new(1);
    let sp = DirStore::new(d.dir.path().join("sp"));
    d.export(0, &sp).expect("a");
    d.export(1, &sp).expect("b");
    let data = d.dir.path().join("dd");
    let theirs = d.dir.path().join("dd.loading");
    std::fs::create_dir_all(&theirs).expect("dir");
    std::fs::write(theirs.join("precious"), "keep").expect("write");
    match import(&data, &d.plan, 0, &sp, false) {
        Err(SavepointError::DataDir(why)) => {
            assert!(why.contains("is not an unfinished savepoint load"), "{why}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(
        std::fs::read(theirs.join("precious")).expect("kept"),
        b"keep"
    );
    assert!(!data.exists());
    // An unfinished load of its own is replaced.
    std::fs::remove_file(theirs.join("precious")).expect("rm");
    std::fs::write(theirs.join(staging::OURS), "").expect("mark");
    std::fs::write(theirs.join("000001.log"), "half a load").expect("write");
    import(&data, &d.plan, 0, &sp, false).expect("load");
    assert!(!theirs.exists() && data.join("CURRENT").exists());
}

#[test]
fn a_refused_load_leaves_neither_data_nor_staging_directory() {
    let d = Deployment::new(1);
    let root = d.dir.path().join("sp");
    let sp = DirStore::new(&root);
    d.export(0, &sp).expect("a");
    d.export(1, &sp).expect("b");
    // The last shard worker 0 loads is damaged: the others are in by then.
    let last = d
        .plan
        .shards
        .iter()
        .rev()
        .find(|s| s.worker == 0)
        .expect("a shard");
    let file = root.join(format!(
        "shards/{}/{}.bin",
        d.plan.nodes[last.node].name, last.shard
    ));
    let mut bytes = std::fs::read(&file).expect("shard");
    *bytes.last_mut().expect("bytes") ^= 1;
    std::fs::write(&file, bytes).expect("write");
    let data = d.dir.path().join("dd");
    let why = refused(import(&data, &d.plan, 0, &sp, false));
    assert!(why.contains("does not match the manifest"), "{why}");
    assert!(!data.exists(), "no data directory");
    assert!(
        !d.dir.path().join("dd.loading").exists(),
        "no staging directory"
    );
}

#[test]
fn a_second_load_into_a_data_directory_being_loaded_is_refused_and_the_first_kept() {
    let t = tempfile::tempdir().expect("tmp");
    let data = t.path().join("dd");
    let first = staging::Staging::begin(&data).expect("the first load stages");
    std::fs::write(first.dir().join("000001.sst"), "loading").expect("staged file");
    let why = match staging::Staging::begin(&data) {
        Err(e @ SavepointError::DataDir(_)) => e.to_string(),
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert!(why.contains("another load"), "{why}");
    assert!(
        first.dir().join("000001.sst").exists(),
        "the running load's staging is kept"
    );
    // Once the first is gone (its process died), its staging is an
    // unfinished load, removed by the next.
    let dir = first.dir().to_owned();
    drop(first);
    let second = staging::Staging::begin(&data).expect("the next load stages");
    assert_eq!(second.dir(), dir);
    assert!(!dir.join("000001.sst").exists());
}

#[test]
fn only_regular_files_inside_the_savepoint_are_read() {
    let t = tempfile::tempdir().expect("tmp");
    let sp = DirStore::new(t.path());
    let status = std::process::Command::new("mkfifo")
        .arg(t.path().join("pipe.bin"))
        .status()
        .expect("mkfifo");
    assert!(status.success());
    let why = refused(sp.get("pipe.bin"));
    assert!(why.contains("not a regular file"), "{why}");
    sp.put("plain.bin", b"bytes".to_vec()).expect("put");
    assert_eq!(sp.get("plain.bin").expect("get"), Some(b"bytes".to_vec()));
}

#[test]
fn a_link_planted_at_a_temporary_name_is_never_written_through() {
    let t = tempfile::tempdir().expect("tmp");
    let victim = t.path().join("victim");
    std::fs::write(&victim, "precious").expect("victim");
    let root = t.path().join("sp");
    std::fs::create_dir_all(root.join("parts")).expect("mkdir");
    // Links at every temporary name this process could use first.
    let pid = std::process::id();
    for call in 0..1000 {
        for name in ["savepoint.json", "parts/a.json"] {
            let link = root.join(format!("{name}.{pid}-{call}.millrace-partial"));
            std::os::unix::fs::symlink(&victim, link).expect("plant");
        }
    }
    let sp = DirStore::new(&root);
    assert!(sp.create("savepoint.json", b"{}".to_vec()).expect("create"));
    sp.put("parts/a.json", b"part".to_vec()).expect("put");
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "precious"
    );
    assert_eq!(
        std::fs::read(root.join("savepoint.json")).expect("read"),
        b"{}"
    );
    assert!(!root.join("savepoint.json").is_symlink());
    assert_eq!(
        std::fs::read(root.join("parts/a.json")).expect("read"),
        b"part"
    );
}

#[test]
fn a_load_into_a_data_directory_whose_parents_do_not_exist_yet_creates_them() {
    let t = tempfile::tempdir().expect("tmp");
    let data = t.path().join("not/there/yet/dd");
    let staging = staging::Staging::begin(&data).expect("stages");
    assert!(staging.dir().is_dir());
    assert_eq!(staging.dir(), t.path().join("not/there/yet/dd.loading"));
}

/// The manifest in `sp`.
fn manifest_of(sp: &DirStore) -> Manifest {
    serde_json::from_slice(&sp.get("manifest.json").expect("get").expect("manifest"))
        .expect("manifest")
}

/// Writes `m` as the manifest of `sp`.
fn put_manifest(sp: &DirStore, m: &Manifest) {
    sp.put("manifest.json", serde_json::to_vec(m).expect("json"))
        .expect("put");
}

#[test]
fn the_manifest_and_the_reports_count_every_component_shard_key_and_byte() {
    let d = Deployment::new(1);
    let root = d.dir.path().join("sp");
    let sp = DirStore::new(&root);
    let a = d.export(0, &sp).expect("a");
    let b = d.export(1, &sp).expect("b");
    // Each shard holds five keys, one in each column family.
    let owned = |me: usize| d.plan.shards.iter().filter(|s| s.worker == me).count();
    assert_eq!((a.shards, a.keys), (owned(0), 5 * owned(0) as u64), "{a:?}");
    assert_eq!((b.shards, b.keys), (owned(1), 5 * owned(1) as u64), "{b:?}");
    let m = manifest_of(&sp);
    let mut components: Vec<_> = m
        .components
        .iter()
        .map(|c| (c.name.as_str(), c.kind.as_str(), c.role.as_str(), c.shards))
        .collect();
    components.sort_unstable();
    assert_eq!(
        components,
        [
            ("count", "nothing", "computation", 4),
            ("gen", "nothing", "source", 1)
        ]
    );
    assert_eq!(m.shards.len(), d.plan.shards.len());
    for s in &m.shards {
        let file = std::fs::read(root.join(&s.file)).expect("shard file");
        assert_eq!((s.keys, s.bytes), (5, file.len() as u64), "{s:?}");
    }
    let total: u64 = m.shards.iter().map(|s| s.bytes).sum();
    assert_eq!(a.bytes + b.bytes, total);
    let r = import(&d.dir.path().join("loaded"), &d.plan, 0, &sp, false).expect("load");
    assert_eq!(
        (r.shards, r.keys, r.bytes),
        (owned(0), 5 * owned(0) as u64, a.bytes)
    );
    assert!(r.new_components.is_empty() && r.dropped_components.is_empty());
}

#[test]
fn a_component_whose_kind_role_or_shard_count_changed_is_refused() {
    let d = Deployment::new(1);
    let sp = DirStore::new(d.dir.path().join("sp"));
    d.export(0, &sp).expect("a");
    d.export(1, &sp).expect("b");
    let saved = manifest_of(&sp);
    let check_with = |change: &dyn Fn(&mut SavedComponent)| {
        let mut m = saved.clone();
        change(
            m.components
                .iter_mut()
                .find(|c| c.name == "count")
                .expect("count"),
        );
        put_manifest(&sp, &m);
        check(&sp, &d.plan, true)
    };
    let why = refused(check_with(&|c| c.kind = "window".into()));
    assert!(why.contains("was a computation of type `window`"), "{why}");
    let why = refused(check_with(&|c| c.role = "sink".into()));
    assert!(why.contains("was a sink of type `nothing`"), "{why}");
    let why = refused(check_with(&|c| c.shards = 8));
    assert!(
        why.contains("had 8 shards in the savepoint and has 4 now"),
        "{why}"
    );
    let (_, new, dropped) = check_with(&|_| {}).expect("unchanged");
    assert!(new.is_empty() && dropped.is_empty());
}

#[test]
fn a_component_gone_is_dropped_only_when_allowed_and_a_new_one_starts_empty() {
    let d = Deployment::new(1);
    let sp = DirStore::new(d.dir.path().join("sp"));
    d.export(0, &sp).expect("a");
    d.export(1, &sp).expect("b");
    // The savepoint was taken when `count` was called `old`.
    let mut m = manifest_of(&sp);
    for c in m.components.iter_mut().filter(|c| c.name == "count") {
        c.name = "old".into();
    }
    for s in m.shards.iter_mut().filter(|s| s.component == "count") {
        s.component = "old".into();
    }
    put_manifest(&sp, &m);
    let why = refused(check(&sp, &d.plan, false));
    assert!(why.contains("no longer has (old)"), "{why}");
    let data = d.dir.path().join("loaded");
    assert!(!data.exists(), "nothing loaded");
    let r = import(&data, &d.plan, 0, &sp, true).expect("load");
    assert_eq!(r.new_components, ["count"]);
    assert_eq!(r.dropped_components, ["old"]);
    for s in d.plan.shards.iter().filter(|s| s.worker == 0) {
        let loaded = contents(&data, &s.prefix);
        if d.plan.nodes[s.node].name == "count" {
            assert_eq!(loaded, [], "a new component starts empty");
        } else {
            assert_eq!(loaded, contents(&d.data(0), &s.prefix));
        }
    }
}

#[test]
fn completing_a_complete_savepoint_again_agrees_and_another_ones_manifest_is_refused() {
    let d = Deployment::new(1);
    let root = d.dir.path().join("sp");
    let sp = DirStore::new(&root);
    d.export(0, &sp).expect("a");
    d.export(1, &sp).expect("b");
    let marker = read_marker(&sp).expect("read").expect("marker");
    // As when two workers complete it at once: the second finds the
    // first's manifest, of the same savepoint.
    assert_eq!(
        complete(&sp, &d.plan, &marker).expect("again"),
        [] as [String; 0]
    );
    let mut other = manifest_of(&sp);
    other.id = "another".into();
    put_manifest(&sp, &other);
    let why = refused(complete(&sp, &d.plan, &marker));
    assert!(
        why.contains(&format!(
            "file://{}/manifest.json appeared while savepoint {}",
            root.display(),
            marker.id
        )),
        "{why}"
    );
    assert_eq!(manifest_of(&sp), other, "left as it was");
}

#[test]
fn a_shard_file_cut_short_names_the_byte_it_ends_at() {
    let prefix = shard_prefix("count", 0);
    let mut bytes = MAGIC.to_vec();
    push_entry(
        &mut bytes,
        b's',
        &[prefix.as_slice(), b"k"].concat(),
        b"value",
    );
    let whole = parse_shard_file(&bytes, &prefix).expect("whole");
    assert_eq!(whole.len(), 1);
    // The value is the last 5 bytes; 2 of them remain.
    let why = parse_shard_file(&bytes[..bytes.len() - 3], &prefix).expect_err("cut");
    assert_eq!(why, format!("cut short at byte {}", bytes.len() - 5));
}

#[test]
fn a_location_that_cannot_be_read_is_an_error_not_an_empty_one() {
    let t = tempfile::tempdir().expect("tmp");
    // A file where the savepoint's directory should be.
    let file = t.path().join("file");
    std::fs::write(&file, "x").expect("write");
    let sp = DirStore::new(&file);
    assert!(matches!(sp.some_entry(), Err(SavepointError::Io(_))));
    assert!(matches!(check_vacant(&sp), Err(SavepointError::Io(_))));
    assert!(matches!(
        sp.get("manifest.json"),
        Err(SavepointError::Io(_))
    ));
    // A link to itself.
    let root = t.path().join("sp");
    std::fs::create_dir_all(&root).expect("dir");
    std::os::unix::fs::symlink(root.join("loop"), root.join("loop")).expect("link");
    let sp = DirStore::new(&root);
    assert!(matches!(sp.get("loop"), Err(SavepointError::Io(_))));
    assert_eq!(sp.get("absent").expect("get"), None);
}

#[test]
fn a_shard_replaced_by_a_shard_file_holds_exactly_that_files_keys() {
    // A worker that ran a shard at moment 1 (and an extra key that moment 2
    // no longer has) takes it back as another worker left it at moment 2,
    // in the same open store: the state, channel and meta column families
    // update values in place in the memtable, which a range delete before
    // them would hide.
    let plan = plan();
    let (old, new) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    worker_data(&plan, 0, new.path(), 2);
    let spec = plan.shards.iter().find(|s| s.worker == 0).expect("a shard");
    let p = &spec.prefix;
    let file = {
        let store = Store::open(new.path(), &StoreOptions::default()).expect("store");
        shard_snapshot(&store, p).expect("snapshot").0
    };
    let want = contents(new.path(), p);
    worker_data(&plan, 0, old.path(), 1);
    let store = Store::open(old.path(), &StoreOptions::default()).expect("store");
    let mut b = store.batch();
    b.put(
        Cf::Outbox,
        &outbox_key(&outbox_prefix(p, "gen", 0), 9),
        &[1, 9],
    );
    b.put_state(&state_key(p, b"key"), Some(&[1, 1]));
    b.put(Cf::Channels, &[p.as_slice(), b"seq"].concat(), &[1, 3]);
    b.put(Cf::Meta, &watermark_key(p), &[1, 4]);
    store.commit(b).expect("commit");
    replace_shard(&store, p, &file).expect("replace");
    let read = |store: &Store| {
        let mut out = Vec::new();
        store
            .for_each_state(p, |k, v| {
                out.push((Cf::State, k.to_vec(), v.to_vec()));
                true
            })
            .expect("state");
        for cf in [Cf::Timers, Cf::Outbox, Cf::Channels, Cf::Meta] {
            store
                .for_each_prefix(cf, p, |k, v| {
                    out.push((cf, k.to_vec(), v.to_vec()));
                    true
                })
                .expect("scan");
        }
        out
    };
    assert_eq!(read(&store), want);
    assert_eq!(
        store
            .get(Cf::Channels, &[p.as_slice(), b"seq"].concat())
            .expect("get"),
        Some(vec![2, 3])
    );
    // And dropping it leaves nothing of it.
    clear_shard(&store, p).expect("clear");
    assert!(read(&store).is_empty());
}

#[test]
fn a_shard_file_holding_a_key_twice_is_refused_before_the_shard_is_cleared() {
    let plan = plan();
    let dir = tempfile::tempdir().expect("dir");
    worker_data(&plan, 0, dir.path(), 1);
    let spec = plan.shards.iter().find(|s| s.worker == 0).expect("a shard");
    let p = &spec.prefix;
    let store = Store::open(dir.path(), &StoreOptions::default()).expect("store");
    let before = shard_snapshot(&store, p).expect("snapshot").0;
    let key = [p.as_slice(), b"twice"].concat();
    let mut bytes = MAGIC.to_vec();
    push_entry(&mut bytes, b'm', &key, b"1");
    push_entry(&mut bytes, b'm', &key, b"2");
    let why = match replace_shard(&store, p, &bytes) {
        Err(SavepointError::Refused(why)) => why,
        other => panic!("not refused: {other:?}"),
    };
    assert!(why.contains("holds a meta key twice"), "{why}");
    assert_eq!(shard_snapshot(&store, p).expect("snapshot").0, before);
    // Out of order is fine: each column family is sorted before it is ingested.
    let mut bytes = MAGIC.to_vec();
    push_entry(&mut bytes, b'm', &[p.as_slice(), b"b"].concat(), b"2");
    push_entry(&mut bytes, b'm', &[p.as_slice(), b"a"].concat(), b"1");
    assert_eq!(replace_shard(&store, p, &bytes).expect("replace"), 2);
    assert_eq!(
        store.scan_prefix(Cf::Meta, p).expect("scan"),
        vec![
            ([p.as_slice(), b"a"].concat(), b"1".to_vec()),
            ([p.as_slice(), b"b"].concat(), b"2".to_vec())
        ]
    );
}

#[test]
fn a_delete_removes_only_a_name_inside_the_location() {
    let t = tempfile::tempdir().expect("tmp");
    let outside = t.path().join("outside");
    std::fs::write(&outside, "keep").expect("write");
    let root = t.path().join("sp");
    let sp = DirStore::new(&root);
    sp.put("handoff/1.shard", b"x".to_vec()).expect("put");
    sp.delete("handoff/1.shard").expect("delete");
    assert_eq!(sp.get("handoff/1.shard").expect("get"), None);
    // Absent: nothing to do.
    sp.delete("handoff/1.shard").expect("delete again");
    // A name leading out is refused; a link is removed, not what it names.
    assert!(matches!(
        sp.delete("../outside"),
        Err(SavepointError::Refused(_))
    ));
    std::os::unix::fs::symlink(&outside, root.join("link")).expect("link");
    sp.delete("link").expect("delete the link");
    assert!(!root.join("link").exists());
    assert_eq!(std::fs::read_to_string(&outside).expect("read"), "keep");
    std::os::unix::fs::symlink(t.path(), root.join("up")).expect("link");
    assert!(matches!(
        sp.delete("up/outside"),
        Err(SavepointError::Refused(_))
    ));
    assert_eq!(std::fs::read_to_string(&outside).expect("read"), "keep");
}
