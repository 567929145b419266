//! The RocksDB instance of one worker and its atomic batches.

use crate::batch::{self, Rep};
use crate::keys::prefix_end;
use crate::slot;
use rocksdb::{
    AsColumnFamilyRef, BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, Direction,
    IteratorMode, Options, WriteBatch, WriteOptions, DB,
};
use std::path::{Path, PathBuf};

/// One stored `(key, value)` pair.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// The column families. Each holds keys that start with `(computation, shard)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cf {
    /// Per-key computation state.
    State,
    /// Timers, by time and by key.
    Timers,
    /// Productions not yet acknowledged by their receiver.
    Outbox,
    /// Per-channel sequence numbers: applied (inputs) and next (outputs).
    Channels,
    /// Epochs, watermarks, source offsets, sink positions.
    Meta,
}

impl Cf {
    /// Every column family, in a fixed order.
    pub const ALL: [Cf; 5] = [Cf::State, Cf::Timers, Cf::Outbox, Cf::Channels, Cf::Meta];

    /// The RocksDB column family name.
    pub fn name(self) -> &'static str {
        match self {
            Cf::State => "state",
            Cf::Timers => "timers",
            Cf::Outbox => "outbox",
            Cf::Channels => "channels",
            Cf::Meta => "meta",
        }
    }

    /// Whether a put overwrites the key's value in place in the memtable
    /// (state, channels, meta). The in-place write keeps the sequence number
    /// of the value it overwrites, so a range delete written between the two
    /// would hide the new value: these column families take no range
    /// deletes, only deletes of single keys ([`Store::clear_prefix`]).
    pub fn updates_in_place(self) -> bool {
        matches!(self, Cf::State | Cf::Channels | Cf::Meta)
    }
}

/// What a successful [`Store::commit`] promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Written to the WAL (the OS has it): survives the process being killed.
    Process,
    /// The WAL is fsynced: survives the machine losing power.
    Machine,
}

/// Lock stripes of a memtable updated in place. Only one thread writes
/// memtables at a time (concurrent memtable writes are off), and reads that
/// reach RocksDB are rare (the engine caches state), so a few stripes do:
/// RocksDB's default, 10,000 (560 KB of locks), missed the CPU cache on
/// nearly every update.
const INPLACE_UPDATE_LOCKS: usize = 64;

/// Values of the column family are overwritten in place in the memtable
/// when the new one is no larger, under a few lock stripes.
fn update_in_place(o: &mut Options) {
    o.set_inplace_update_support(true);
    o.set_inplace_update_locks(INPLACE_UPDATE_LOCKS);
}

/// Tuning of the RocksDB instance.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Commit durability.
    pub durability: Durability,
    /// Block cache size in bytes, shared by all column families.
    pub block_cache_bytes: usize,
    /// Background flush and compaction threads.
    pub background_jobs: i32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            durability: Durability::Process,
            block_cache_bytes: 256 << 20,
            background_jobs: 2,
        }
    }
}

/// A storage failure. RocksDB errors are not retried here: the engine stops
/// the shard loop and the worker restarts from its last commit.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// RocksDB refused an operation.
    #[error("RocksDB at {path}: {op}: {message}")]
    Rocks {
        /// Data directory.
        path: PathBuf,
        /// What was attempted.
        op: &'static str,
        /// RocksDB's message.
        message: String,
    },
    /// What is stored cannot be what millrace wrote.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The data directory was written in another format.
    #[error(
        "{path} was written by another millrace version ({what}); nothing was changed. \
         Run the version that wrote it, or see \"Recovering a data directory\" in docs/production.md"
    )]
    Format {
        /// Data directory.
        path: PathBuf,
        /// What differs.
        what: String,
    },
    /// The data directory holds a database that cannot be read whole. It is
    /// never taken for a new one: that would drop its state and cut sinks.
    #[error(
        "{path} is damaged: {what}. millrace refused to start on it and did not change it; \
         see \"Recovering a data directory\" in docs/production.md"
    )]
    Damaged {
        /// Data directory.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    CreateDir {
        /// Data directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// One worker's RocksDB. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct Store {
    db: DB,
    path: PathBuf,
    write: WriteOptions,
    /// RocksDB's id of each column family, in [`Cf::ALL`]'s order: what a
    /// batch's records name them by.
    cf_ids: [u32; Cf::ALL.len()],
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path, opts: &StoreOptions) -> Result<Self, StorageError> {
        std::fs::create_dir_all(dir).map_err(|source| StorageError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        // A creation that a crash cut short committed nothing (the marker
        // goes once the first commit is durable): start it again.
        let marker = dir.join(CREATING);
        if marker.exists() {
            clear_interrupted_creation(dir)?;
        }
        // Before RocksDB opens it (and, finding less than was there, deletes
        // the files it no longer knows): an existing database must list
        // every column family, and a directory with database files must
        // have one.
        let existing = check_existing(dir)?;
        if !existing {
            write_marker(&marker).map_err(|source| StorageError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let cache =
            Cache::new_lru_cache(opts.block_cache_bytes).map_err(|e| StorageError::Rocks {
                path: dir.to_path_buf(),
                op: "create block cache",
                message: e.into_string(),
            })?;
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        // RocksDB's own info log (`LOG` in the data directory) at `Fatal`
        // only. On a full disk its error path writes to that log on the same
        // disk, and the RocksDB that Debian ships (built with assertions)
        // then aborts the process in `WritableFileWriter` instead of
        // returning the error (12 runs of 13 here); with nothing written to
        // it, the commit fails with "No space left on device" and the worker
        // stops with that error. millrace's own log says what happened.
        db_opts.set_log_level(rocksdb::LogLevel::Fatal);
        db_opts.set_max_log_file_size(1 << 20);
        db_opts.set_keep_log_file_num(2);
        db_opts.set_max_background_jobs(opts.background_jobs);
        db_opts.set_bytes_per_sync(1 << 20);
        // Required by the outbox's vector memtable; each batch is written by
        // one executor thread anyway.
        db_opts.set_allow_concurrent_memtable_write(false);
        // Two executors commit concurrently: one's WAL write overlaps the
        // other's memtable insert (P3 with fsync: p99 ~30 -> ~20 ms).
        db_opts.set_enable_pipelined_write(true);
        // Memtables updated in place (state, channels, meta) hardly grow, so
        // nothing would flush them and the WAL would pile up (and be replayed
        // at restart) to RocksDB's default limit, 2 GiB here. Reaching the
        // limit forces a flush, after which the WAL files it freed are
        // deleted at once. Without fsyncs (`process`) a large limit is
        // cheapest: forced flushes are rare (P3 p99 ~8 ms over 30 s; 22 ms
        // with 128 MiB). With an fsync per commit (`machine`), synced commits
        // stalled for about a second a few times a minute with 1 GiB, most
        // likely while the ~1 GiB of WAL a forced flush frees was deleted at
        // once (P3 over 30 s at 205k records/s: p99 13-93 ms, mostly 75-93;
        // with 128 MiB, 15-37 ms).
        db_opts.set_max_total_wal_size(match opts.durability {
            Durability::Process => 1 << 30,
            Durability::Machine => 128 << 20,
        });
        // Flushes and compactions run at low CPU and I/O priority: on a
        // loaded machine the executors come first and the background work
        // takes the idle time (P3 on 2 cores, with 32 MiB outbox memtables:
        // `machine` p99 ~17 -> ~12 ms, `process` p99 ~9 -> ~7 ms; P1 and P2
        // throughput unchanged).
        let mut env = rocksdb::Env::new().map_err(|e| StorageError::Rocks {
            path: dir.to_path_buf(),
            op: "create environment",
            message: e.into_string(),
        })?;
        env.lower_thread_pool_cpu_priority();
        env.lower_thread_pool_io_priority();
        env.lower_high_priority_thread_pool_cpu_priority();
        env.lower_high_priority_thread_pool_io_priority();
        db_opts.set_env(&env);
        let cfs = Cf::ALL.iter().map(|&cf| {
            ColumnFamilyDescriptor::new(cf.name(), cf_options(cf, &cache, opts.block_cache_bytes))
        });
        let db = DB::open_cf_descriptors(&db_opts, dir, cfs).map_err(|e| StorageError::Rocks {
            path: dir.to_path_buf(),
            op: "open",
            message: e.into_string(),
        })?;
        // Table files a crash left half built for an ingestion (the open
        // database's lock says no one else is building them).
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(INGESTING) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let mut write = WriteOptions::default();
        write.set_sync(opts.durability == Durability::Machine);
        let cf_ids = cf_ids(&db);
        let store = Store {
            db,
            path: dir.to_path_buf(),
            write,
            cf_ids,
        };
        if !store.check_format()? {
            if existing {
                // The format is the first thing a new store commits: a
                // database without it lost what it had.
                return Err(StorageError::Damaged {
                    path: dir.to_path_buf(),
                    what: "RocksDB opened it as an empty database (its MANIFEST or \
                           CURRENT file lost the tables that hold millrace's state)"
                        .to_owned(),
                });
            }
            let mut b = store.batch();
            b.put(Cf::Meta, &format_key(), STATE_FORMAT);
            let mut synced = WriteOptions::default();
            synced.set_sync(true);
            store.commit_with(b, &synced)?;
            std::fs::remove_file(&marker)
                .and_then(|()| sync_dir(dir))
                .map_err(|source| StorageError::CreateDir {
                    path: dir.to_path_buf(),
                    source,
                })?;
        }
        Ok(store)
    }

    /// Whether the data dir says it stores state in this version's format;
    /// an error if it says another, or holds state from before formats were
    /// recorded.
    fn check_format(&self) -> Result<bool, StorageError> {
        let what = match self.get(Cf::Meta, &format_key())? {
            Some(v) if v == STATE_FORMAT => return Ok(true),
            Some(v) => format!(
                "state format {:?}; this version reads {:?}",
                String::from_utf8_lossy(&v),
                String::from_utf8_lossy(STATE_FORMAT)
            ),
            None => {
                let mut any = false;
                self.for_each_prefix(Cf::State, &[], |_, _| {
                    any = true;
                    false
                })?;
                if !any {
                    return Ok(false);
                }
                "state stored without slots".to_owned()
            }
        };
        Err(StorageError::Format {
            path: self.path.clone(),
            what,
        })
    }

    /// Opens an existing store read-only, beside a running worker (for
    /// operator tools). Sees what was committed up to the moment it opens.
    pub fn open_read_only(dir: &Path) -> Result<Self, StorageError> {
        let opts = Options::default();
        let names = Cf::ALL.iter().map(|cf| cf.name());
        let db = DB::open_cf_for_read_only(&opts, dir, names, false).map_err(|e| {
            StorageError::Rocks {
                path: dir.to_path_buf(),
                op: "open read-only",
                message: e.into_string(),
            }
        })?;
        let cf_ids = cf_ids(&db);
        let store = Store {
            db,
            path: dir.to_path_buf(),
            write: WriteOptions::default(),
            cf_ids,
        };
        store.check_format()?;
        Ok(store)
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn cf(&self, cf: Cf) -> &ColumnFamily {
        cf_handle(&self.db, cf)
    }

    fn cf_id(&self, cf: Cf) -> u32 {
        // `Cf::ALL` lists the variants in declaration order (a test checks).
        self.cf_ids[cf as usize]
    }

    fn err(&self, op: &'static str, e: rocksdb::Error) -> StorageError {
        StorageError::Rocks {
            path: self.path.clone(),
            op,
            message: e.into_string(),
        }
    }

    /// Adds `entries` to `cf` as one table file, built beside the database
    /// and ingested whole: for bulk loads (a savepoint's shard, a moved
    /// shard), where puts would cost a WAL write and a memtable insert per
    /// key. Keys must come in strictly ascending order, and must not exist in
    /// `cf` yet (the ingested values win over what is there); values of
    /// [`Cf::State`] are put into slots as [`Batch::put_state`] does. Durable
    /// when it returns. Returns how many keys were added.
    pub fn ingest<'e>(
        &self,
        cf: Cf,
        entries: impl IntoIterator<Item = (&'e [u8], &'e [u8])>,
    ) -> Result<u64, StorageError> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let file = self
            .path
            .join(format!("{INGESTING}{}-{n}", std::process::id()));
        let cache = Cache::new_lru_cache(1 << 20).map_err(|e| self.err("create block cache", e))?;
        let opts = cf_options(cf, &cache, 1 << 20);
        let written = (|| {
            let mut writer = rocksdb::SstFileWriter::create(&opts);
            writer.open(&file)?;
            let (mut count, mut slotted) = (0u64, Vec::new());
            for (k, v) in entries {
                if cf == Cf::State {
                    slotted.clear();
                    slot::encode_into(Some(v), &mut slotted);
                    writer.put(k, &slotted)?;
                } else {
                    writer.put(k, v)?;
                }
                count += 1;
            }
            if count > 0 {
                writer.finish()?;
            }
            Ok::<_, rocksdb::Error>(count)
        })();
        let result = match written {
            Ok(0) => Ok(0),
            Ok(count) => {
                let mut ingest = rocksdb::IngestExternalFileOptions::default();
                ingest.set_move_files(true);
                self.db
                    .ingest_external_file_cf_opts(self.cf(cf), &ingest, vec![&file])
                    .map(|()| count)
                    .map_err(|e| self.err("ingest a table file", e))
            }
            Err(e) => Err(self.err("write a table file to ingest", e)),
        };
        // Moved into the database when ingested; gone either way.
        let _ = std::fs::remove_file(&file);
        result
    }

    /// Reads the keyed state stored at `key` (see [`crate::slot`]).
    pub fn get_state(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let Some(stored) = self
            .db
            .get_pinned_cf(self.cf(Cf::State), key)
            .map_err(|e| self.err("get", e))?
        else {
            return Ok(None);
        };
        Ok(slot::decode(&stored)?.map(<[u8]>::to_vec))
    }

    /// Calls `f` on every key with state under `prefix`, with its value, in
    /// key order, until it returns `false`.
    pub fn for_each_state(
        &self,
        prefix: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StorageError> {
        let mut bad = None;
        self.for_each_prefix(Cf::State, prefix, |k, stored| match slot::decode(stored) {
            Ok(Some(v)) => f(k, v),
            Ok(None) => true,
            Err(e) => {
                bad = Some(e);
                false
            }
        })?;
        bad.map_or(Ok(()), Err)
    }

    /// Reads one key.
    pub fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.db
            .get_pinned_cf(self.cf(cf), key)
            .map(|v| v.map(|s| s.to_vec()))
            .map_err(|e| self.err("get", e))
    }

    /// Every `(key, value)` whose key starts with `prefix`, in key order.
    pub fn scan_prefix(&self, cf: Cf, prefix: &[u8]) -> Result<Vec<KeyValue>, StorageError> {
        let mut out = Vec::new();
        self.for_each_prefix(cf, prefix, |k, v| {
            out.push((k.to_vec(), v.to_vec()));
            true
        })?;
        Ok(out)
    }

    /// Calls `f` on every `(key, value)` under `prefix`, in key order, until it
    /// returns `false`.
    pub fn for_each_prefix(
        &self,
        cf: Cf,
        prefix: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StorageError> {
        // Scans are in key order whatever the column family's memtable.
        let mut read = rocksdb::ReadOptions::default();
        read.set_total_order_seek(true);
        let iter = self.db.iterator_cf_opt(
            self.cf(cf),
            read,
            IteratorMode::From(prefix, Direction::Forward),
        );
        for item in iter {
            let (k, v) = item.map_err(|e| self.err("scan", e))?;
            if !k.starts_with(prefix) || !f(&k, &v) {
                break;
            }
        }
        Ok(())
    }

    /// Removes every key under `prefix` in `cf`, in commits of its own;
    /// returns how many single deletes it took. A column family that updates
    /// in place gets one delete per key (a range delete would hide the keys
    /// written after it; see [`Cf::updates_in_place`]), the others one range
    /// delete.
    pub fn clear_prefix(&self, cf: Cf, prefix: &[u8]) -> Result<u64, StorageError> {
        if !cf.updates_in_place() {
            let mut b = self.batch();
            b.delete_prefix(cf, prefix);
            self.commit(b)?;
            return Ok(0);
        }
        let mut keys = Vec::new();
        self.for_each_prefix(cf, prefix, |k, _| {
            keys.push(k.to_vec());
            true
        })?;
        for chunk in keys.chunks(10_000) {
            let mut b = self.batch();
            for k in chunk {
                b.delete(cf, k);
            }
            self.commit(b)?;
        }
        Ok(keys.len() as u64)
    }

    /// A new, empty batch for this store.
    pub fn batch(&self) -> Batch<'_> {
        Batch {
            store: self,
            rep: Rep::new(),
        }
    }

    /// Writes `batch` atomically: all of it or none of it survives a crash.
    pub fn commit(&self, batch: Batch<'_>) -> Result<(), StorageError> {
        self.commit_with(batch, &self.write)
    }

    fn commit_with(&self, mut batch: Batch<'_>, write: &WriteOptions) -> Result<(), StorageError> {
        if batch.is_empty() {
            return Ok(());
        }
        let data = batch.rep.finish().map_err(|_| self.oversize("commit"))?;
        self.db
            .write_opt(WriteBatch::from_data(data), write)
            .map_err(|e| self.err("commit", e))
    }

    fn oversize(&self, op: &'static str) -> StorageError {
        StorageError::Rocks {
            path: self.path.clone(),
            op,
            message: "a key or value is 4 GiB or longer".into(),
        }
    }

    /// Writes every column family's memtable to table files, so that the
    /// next open replays no WAL (up to 1 GiB of it, key by key).
    pub fn flush(&self) -> Result<(), StorageError> {
        for cf in Cf::ALL {
            self.db
                .flush_cf(self.cf(cf))
                .map_err(|e| self.err("flush", e))?;
        }
        Ok(())
    }

    /// Estimated bytes on disk (SST files plus memtables).
    pub fn size_bytes(&self) -> u64 {
        Cf::ALL
            .iter()
            .map(|cf| {
                let sst = self
                    .db
                    .property_int_value_cf(self.cf(*cf), "rocksdb.total-sst-files-size")
                    .ok()
                    .flatten()
                    .unwrap_or(0);
                let mem = self
                    .db
                    .property_int_value_cf(self.cf(*cf), "rocksdb.cur-size-all-mem-tables")
                    .ok()
                    .flatten()
                    .unwrap_or(0);
                sst + mem
            })
            .sum()
    }
}

/// Whether `dir` holds a database already (an error if it holds one that
/// cannot be whole). Reads only RocksDB's MANIFEST, through `CURRENT`.
fn check_existing(dir: &Path) -> Result<bool, StorageError> {
    let damaged = |what: String| StorageError::Damaged {
        path: dir.to_path_buf(),
        what,
    };
    if !dir.join("CURRENT").exists() {
        let entries = std::fs::read_dir(dir).map_err(|source| StorageError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let rocks_files: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| holds_data(n))
            .collect();
        if let Some(first) = rocks_files.first() {
            return Err(damaged(format!(
                "it holds database files ({first} and {} more) but no CURRENT file",
                rocks_files.len() - 1
            )));
        }
        return Ok(false);
    }
    let listed = DB::list_cf(&Options::default(), dir)
        .map_err(|e| damaged(format!("its MANIFEST cannot be read ({})", e.into_string())))?;
    let missing: Vec<&str> = Cf::ALL
        .iter()
        .map(|cf| cf.name())
        .filter(|n| !listed.iter().any(|l| l == n))
        .collect();
    if !missing.is_empty() {
        return Err(damaged(format!(
            "its MANIFEST lists no column family {} (it lists {})",
            missing.join(", "),
            listed.join(", ")
        )));
    }
    Ok(true)
}

/// Whether the RocksDB file `name` holds data: a table, a write-ahead log
/// or a MANIFEST.
fn holds_data(name: &str) -> bool {
    name.ends_with(".sst") || name.ends_with(".log") || name.starts_with("MANIFEST-")
}

/// The file present in a data directory from the moment its database starts
/// to be created until the first commit (the format) is durable.
const CREATING: &str = "millrace-creating";

/// Writes the creation marker durably (its directory entry included).
fn write_marker(marker: &Path) -> std::io::Result<()> {
    std::fs::File::create(marker)?.sync_all()?;
    marker.parent().map_or(Ok(()), sync_dir)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Removes what a cut-short creation left: RocksDB's files, which hold no
/// commit of millrace's, and the marker last.
fn clear_interrupted_creation(dir: &Path) -> Result<(), StorageError> {
    let io = |source| StorageError::CreateDir {
        path: dir.to_path_buf(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // Not `LOCK`: RocksDB takes it again, and a process holding it
        // keeps its lock.
        let rocks = holds_data(&name)
            || ["CURRENT", "IDENTITY"].contains(&name.as_str())
            || name.starts_with("LOG")
            || name.starts_with("OPTIONS-")
            || name.ends_with(".dbtmp");
        if rocks {
            std::fs::remove_file(entry.path()).map_err(io)?;
        }
    }
    std::fs::remove_file(dir.join(CREATING)).map_err(io)?;
    sync_dir(dir).map_err(io)
}

/// The format of keyed state values, recorded in the data dir.
const STATE_FORMAT: &[u8] = b"slots-1";

fn format_key() -> Vec<u8> {
    crate::KeyWriter::new().str("").str("state-format").finish()
}

fn cf_handle(db: &DB, cf: Cf) -> &ColumnFamily {
    // Every column family is created (or required) at open; a missing one is a bug.
    db.cf_handle(cf.name())
        .expect("column family created at open")
}

/// RocksDB's id of each column family of `db`, in [`Cf::ALL`]'s order.
fn cf_ids(db: &DB) -> [u32; Cf::ALL.len()] {
    Cf::ALL.map(|cf| {
        // SAFETY: the handle belongs to `db`, which outlives this call;
        // reading its id has no other effect.
        unsafe { librocksdb_sys::rocksdb_column_family_handle_get_id(cf_handle(db, cf).inner()) }
    })
}

/// The RocksDB options of column family `cf`, its blocks cached in `cache`
/// (of `block_cache_bytes`): those it is opened with, and those the tables
/// built for it to ingest are written with.
fn cf_options(cf: Cf, cache: &Cache, block_cache_bytes: usize) -> Options {
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(cache);
    table.set_bloom_filter(10.0, false);
    table.set_cache_index_and_filter_blocks(true);
    let mut o = Options::default();
    o.set_block_based_table_factory(&table);
    o.set_compression_type(rocksdb::DBCompressionType::Lz4);
    o.set_write_buffer_size(64 << 20);
    match cf {
        Cf::State => {
            o.optimize_for_point_lookup(block_cache_bytes as u64 >> 20);
            // State is read and written by whole key: a hash of tiny
            // skip lists (one per key) instead of one big skip list.
            // Scans (operator tools only) use total-order seeks.
            o.set_prefix_extractor(rocksdb::SliceTransform::create(
                "millrace.whole-key",
                whole_key,
                None,
            ));
            o.set_memtable_factory(rocksdb::MemtableFactory::HashSkipList {
                bucket_count: 1 << 20,
                height: 4,
                branching_factor: 4,
            });
            // A key's state is overwritten again and again: update it
            // in place in the memtable (when the new value is no
            // larger) instead of inserting one more version.
            update_in_place(&mut o);
            // Deleted state is a vacant slot until compacted away.
            o.set_compaction_filter("millrace.vacant-slots", |_, _, v: &[u8]| {
                if slot::is_vacant(v) {
                    rocksdb::compaction_filter::Decision::Remove
                } else {
                    rocksdb::compaction_filter::Decision::Keep
                }
            });
        }
        // The outbox is appended to, range-deleted, and only scanned at
        // start: a vector memtable inserts without skiplist searches.
        // So are timers: set, deleted when they fire, and scanned only
        // at start (the engine keeps them in memory).
        Cf::Outbox => {
            o.set_memtable_factory(rocksdb::MemtableFactory::Vector);
            // Entries live for milliseconds. Every memtable switch
            // starts a new WAL file and syncs the old one, which
            // stalls synced commits for 4-8 ms (8 MiB: a switch every
            // ~140 ms at P3's load); a large memtable's flush sorts
            // long (64 MiB: `process` p99 ~12 ms). 32 MiB, flushed at
            // low priority (above), keeps both tails short.
            o.set_write_buffer_size(32 << 20);
        }
        Cf::Timers => o.set_memtable_factory(rocksdb::MemtableFactory::Vector),
        // Sequence numbers, watermarks and positions: the same few
        // keys rewritten at every commit, with values of one size.
        // In place, the memtable stays tiny and cheap to flush.
        Cf::Channels | Cf::Meta => update_in_place(&mut o),
    }
    o
}

/// The name a table file being built for [`Store::ingest`] starts with;
/// one a crash left behind is removed when the store opens.
const INGESTING: &str = "ingesting-";

/// The operations of the commit log entry `entry`.
fn entry_ops(entry: &[u8]) -> Result<Vec<batch::Op<'_>>, StorageError> {
    batch::ops(entry).map_err(|e| StorageError::Corrupt(format!("a commit log entry: {}", e.0)))
}

/// The state column family's prefix extractor: the whole key.
fn whole_key(key: &[u8]) -> &[u8] {
    key
}

/// Puts and deletes that [`Store::commit`] applies atomically.
pub struct Batch<'s> {
    store: &'s Store,
    rep: Rep,
}

impl Batch<'_> {
    /// Sets `key` to `value`.
    pub fn put(&mut self, cf: Cf, key: &[u8], value: &[u8]) {
        self.rep.put(self.store.cf_id(cf), key, value);
    }

    /// Sets the keyed state at `key` (`None`: deletes it), in a slot.
    pub fn put_state(&mut self, key: &[u8], value: Option<&[u8]>) {
        self.rep.put_with(
            self.store.cf_id(Cf::State),
            key,
            slot::encoded_len(value),
            |out| slot::encode_into(value, out),
        );
    }

    /// Removes `key`.
    pub fn delete(&mut self, cf: Cf, key: &[u8]) {
        self.rep.delete(self.store.cf_id(cf), key);
    }

    /// Removes every key in `[from, to)`. Only for the column families that
    /// do not update in place (timers, outbox; see [`Cf::updates_in_place`]).
    pub fn delete_range(&mut self, cf: Cf, from: &[u8], to: &[u8]) {
        debug_assert!(!cf.updates_in_place(), "a range delete in {}", cf.name());
        self.rep.delete_range(self.store.cf_id(cf), from, to);
    }

    /// Removes every key under `prefix`. Only for the column families that
    /// do not update in place; [`Store::clear_prefix`] clears any.
    pub fn delete_prefix(&mut self, cf: Cf, prefix: &[u8]) {
        match prefix_end(prefix) {
            Some(end) => self.delete_range(cf, prefix, &end),
            None => self.delete_range(cf, prefix, &[0xFFu8; 64]),
        }
    }

    /// The batch's operations split into log entries, one per group:
    /// `group` names the group of a key (an operation on a range: of its
    /// start), `None` keeps it out of every entry. An entry is portable
    /// between stores: it names column families by their place in
    /// [`Cf::ALL`], not by this store's ids. [`Batch::apply_log_entry`]
    /// reads it back.
    pub fn log_entries<G: Ord>(
        &mut self,
        mut group: impl FnMut(&[u8]) -> Option<G>,
    ) -> Result<std::collections::BTreeMap<G, Vec<u8>>, StorageError> {
        let store = self.store;
        let bytes = self
            .rep
            .finish()
            .map_err(|_| store.oversize("log entries"))?;
        let ops = batch::ops(bytes)
            .map_err(|e| StorageError::Corrupt(format!("a batch being committed: {}", e.0)))?;
        let mut reps: std::collections::BTreeMap<G, Rep> = std::collections::BTreeMap::new();
        for op in &ops {
            let (id, key) = op.cf_and_key();
            let Some(g) = group(key) else { continue };
            let logical = store.cf_ids.iter().position(|&i| i == id).ok_or_else(|| {
                StorageError::Corrupt(format!("a batch names column family id {id}"))
            })?;
            reps.entry(g)
                .or_insert_with(Rep::new)
                .push(logical as u32, op);
        }
        reps.into_iter()
            .map(|(g, mut rep)| {
                let bytes = rep.finish().map_err(|_| store.oversize("log entries"))?;
                Ok((g, bytes.to_vec()))
            })
            .collect()
    }

    /// The value the last put to `key` in `cf` of the log entry `entry`
    /// sets, if it puts one (a delete of it after the put: `None`).
    pub fn log_entry_value<'e>(
        entry: &'e [u8],
        cf: Cf,
        key: &[u8],
    ) -> Result<Option<&'e [u8]>, StorageError> {
        let ops = entry_ops(entry)?;
        // `Cf::ALL` lists the column families in declaration order.
        let logical = cf as u32;
        let mut value = None;
        for op in &ops {
            match *op {
                batch::Op::Put(c, k, v) if c == logical && k == key => value = Some(v),
                batch::Op::Delete(c, k) if c == logical && k == key => value = None,
                _ => {}
            }
        }
        Ok(value)
    }

    /// Adds the operations of `entry`, a log entry of
    /// [`Batch::log_entries`] for the shard whose keys start with `prefix`,
    /// to this batch; how many. Bytes that are not one, or that write a key
    /// outside the shard, are refused whole, with nothing added.
    pub fn apply_log_entry(&mut self, entry: &[u8], prefix: &[u8]) -> Result<usize, StorageError> {
        let ops = entry_ops(entry)?;
        let end = prefix_end(prefix);
        for op in &ops {
            let (logical, key) = op.cf_and_key();
            if Cf::ALL.get(logical as usize).is_none() {
                return Err(StorageError::Corrupt(format!(
                    "a commit log entry names column family {logical}; there are {}",
                    Cf::ALL.len()
                )));
            }
            let range_end_outside = match *op {
                batch::Op::DeleteRange(_, _, to) => {
                    !to.starts_with(prefix) && end.as_deref().is_some_and(|e| to > e)
                }
                _ => false,
            };
            if !key.starts_with(prefix) || range_end_outside {
                return Err(StorageError::Corrupt(
                    "a commit log entry writes a key outside its shard".into(),
                ));
            }
        }
        for op in &ops {
            let (logical, _) = op.cf_and_key();
            self.rep.push(self.store.cf_ids[logical as usize], op);
        }
        Ok(ops.len())
    }

    /// Number of operations collected.
    pub fn len(&self) -> usize {
        self.rep.len()
    }

    /// Whether nothing was collected.
    pub fn is_empty(&self) -> bool {
        self.rep.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KeyWriter;

    #[test]
    fn column_families_are_listed_in_declaration_order() {
        for (i, cf) in Cf::ALL.iter().enumerate() {
            assert_eq!(*cf as usize, i, "{cf:?}");
        }
    }

    /// Batches name column families by RocksDB's ids: what one commits
    /// lands in the column family it names, in every one of them.
    #[test]
    fn a_commit_writes_each_column_family() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let mut batch = store.batch();
        for cf in Cf::ALL {
            batch.put(cf, b"k", cf.name().as_bytes());
        }
        batch.put_state(b"s", Some(b"state"));
        store.commit(batch).unwrap();
        for cf in Cf::ALL {
            if cf != Cf::State {
                assert_eq!(
                    store.get(cf, b"k").unwrap().as_deref(),
                    Some(cf.name().as_bytes())
                );
            }
        }
        assert_eq!(
            store.get_state(b"s").unwrap().as_deref(),
            Some(&b"state"[..])
        );
        let mut batch = store.batch();
        batch.delete(Cf::Meta, b"k");
        batch.delete_range(Cf::Timers, b"a", b"z");
        batch.put_state(b"s", None);
        assert_eq!(batch.len(), 3);
        store.commit(batch).unwrap();
        assert_eq!(store.get(Cf::Meta, b"k").unwrap(), None);
        assert_eq!(store.get(Cf::Timers, b"k").unwrap(), None);
        assert_eq!(
            store.get(Cf::Outbox, b"k").unwrap().as_deref(),
            Some(&b"outbox"[..])
        );
        assert_eq!(store.get_state(b"s").unwrap(), None);
        // A read-only store beside it finds the same ids.
        let reader = Store::open_read_only(dir.path()).unwrap();
        assert_eq!(reader.cf_ids, store.cf_ids);
    }

    #[test]
    fn deleted_state_reads_as_absent_and_compactions_drop_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let (k1, k2) = (b"state-k1".as_slice(), b"state-k2".as_slice());
        let mut batch = store.batch();
        batch.put_state(k1, Some(b"one"));
        batch.put_state(k2, Some(b""));
        store.commit(batch).unwrap();
        assert_eq!(store.get_state(k1).unwrap().as_deref(), Some(&b"one"[..]));
        assert_eq!(store.get_state(k2).unwrap().as_deref(), Some(&b""[..]));
        let mut batch = store.batch();
        batch.put_state(k1, None);
        store.commit(batch).unwrap();
        assert_eq!(store.get_state(k1).unwrap(), None);
        let mut seen = Vec::new();
        store
            .for_each_state(b"state-", |k, v| {
                seen.push((k.to_vec(), v.to_vec()));
                true
            })
            .unwrap();
        assert_eq!(seen, [(k2.to_vec(), Vec::new())]);
        // Still stored, as a vacant slot, until a compaction drops it.
        assert!(store.get(Cf::State, k1).unwrap().is_some());
        store.db.flush_cf(store.cf(Cf::State)).unwrap();
        store
            .db
            .compact_range_cf(store.cf(Cf::State), None::<&[u8]>, None::<&[u8]>);
        assert_eq!(store.get(Cf::State, k1).unwrap(), None);
        assert!(store.get(Cf::State, k2).unwrap().is_some());
    }

    #[test]
    fn a_data_dir_with_state_in_another_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
            // As an earlier version left it: raw values, no format recorded.
            let mut batch = store.batch();
            batch.delete(Cf::Meta, &format_key());
            batch.put(Cf::State, b"k", b"1");
            store.commit(batch).unwrap();
        }
        let err = Store::open(dir.path(), &StoreOptions::default()).unwrap_err();
        assert!(matches!(err, StorageError::Format { .. }), "{err}");
        assert!(err.to_string().contains("nothing was changed"), "{err}");
        assert!(Store::open_read_only(dir.path()).is_err());
        // An empty data dir is simply a new one, and opens again.
        let fresh = tempfile::tempdir().unwrap();
        drop(Store::open(fresh.path(), &StoreOptions::default()).unwrap());
        assert!(Store::open(fresh.path(), &StoreOptions::default()).is_ok());
    }

    #[test]
    fn a_damaged_data_dir_is_never_taken_for_a_new_one() {
        let open = |d: &Path| Store::open(d, &StoreOptions::default());
        let written = || {
            let dir = tempfile::tempdir().unwrap();
            let store = open(dir.path()).unwrap();
            let mut batch = store.batch();
            batch.put(Cf::Meta, b"position", b"42");
            store.commit(batch).unwrap();
            drop(store);
            dir
        };
        let files = |d: &Path| -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        // The MANIFEST cut short: refused before RocksDB touches anything.
        let dir = written();
        let current = std::fs::read_to_string(dir.path().join("CURRENT")).unwrap();
        let manifest = dir.path().join(current.trim());
        let text = std::fs::read(&manifest).unwrap();
        for cut in [60, 200] {
            std::fs::write(&manifest, &text[..cut]).unwrap();
            let before = files(dir.path());
            let err = open(dir.path()).unwrap_err();
            assert!(
                matches!(err, StorageError::Damaged { .. }),
                "cut at {cut}: {err}"
            );
            assert!(err.to_string().contains("MANIFEST"), "{err}");
            assert_eq!(files(dir.path()), before, "nothing changed");
        }
        // CURRENT gone, the database files still there.
        let dir = written();
        std::fs::remove_file(dir.path().join("CURRENT")).unwrap();
        let err = open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("no CURRENT file"), "{err}");
        // A database that opens but lost millrace's format record.
        let dir = written();
        {
            let store = open(dir.path()).unwrap();
            let mut batch = store.batch();
            batch.delete(Cf::Meta, &format_key());
            store.commit(batch).unwrap();
        }
        let err = open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("empty database"), "{err}");
    }

    #[test]
    fn a_creation_cut_short_by_a_crash_is_started_again() {
        let open = |d: &Path| Store::open(d, &StoreOptions::default());
        // A finished creation leaves no marker.
        let dir = tempfile::tempdir().unwrap();
        drop(open(dir.path()).unwrap());
        assert!(!dir.path().join(CREATING).exists());
        // Killed after RocksDB made its files, before the format was
        // committed: the database is empty and the marker is still there.
        // (The format record is deleted to make one; the marker says no
        // commit of millrace's can be in it, so what is there goes.)
        let cut_short = |damage: &dyn Fn(&Path)| {
            let dir = tempfile::tempdir().unwrap();
            {
                let store = open(dir.path()).unwrap();
                let mut batch = store.batch();
                batch.delete(Cf::Meta, &format_key());
                batch.put(Cf::Meta, b"position", b"42");
                store.commit(batch).unwrap();
            }
            damage(dir.path());
            std::fs::write(dir.path().join(CREATING), b"").unwrap();
            dir
        };
        for (what, damage) in [
            ("empty database", &(|_: &Path| {}) as &dyn Fn(&Path)),
            ("no CURRENT", &|d: &Path| {
                std::fs::remove_file(d.join("CURRENT")).unwrap();
            }),
        ] {
            let dir = cut_short(damage);
            let store = open(dir.path()).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(store.get(Cf::Meta, b"position").unwrap(), None, "{what}");
            let mut batch = store.batch();
            batch.put(Cf::Meta, b"position", b"7");
            store.commit(batch).unwrap();
            drop(store);
            assert!(!dir.path().join(CREATING).exists(), "{what}");
            let store = open(dir.path()).unwrap();
            assert_eq!(
                store.get(Cf::Meta, b"position").unwrap().as_deref(),
                Some(&b"7"[..]),
                "{what}"
            );
        }
    }

    #[test]
    fn a_commit_is_atomic_and_scans_stay_in_their_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let a = KeyWriter::new().str("count").u32(1).finish();
        let b = KeyWriter::new().str("count").u32(2).finish();
        let mut batch = store.batch();
        batch.put(
            Cf::State,
            &KeyWriter::from_prefix(&a).str("k1").finish(),
            b"1",
        );
        batch.put(
            Cf::State,
            &KeyWriter::from_prefix(&a).str("k2").finish(),
            b"2",
        );
        batch.put(
            Cf::State,
            &KeyWriter::from_prefix(&b).str("k1").finish(),
            b"3",
        );
        batch.put(Cf::Meta, b"m", b"x");
        assert_eq!(batch.len(), 4);
        store.commit(batch).unwrap();
        let rows = store.scan_prefix(Cf::State, &a).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].1, b"2");
        assert_eq!(store.get(Cf::Meta, b"m").unwrap(), Some(b"x".to_vec()));
        assert_eq!(store.get(Cf::State, b"m").unwrap(), None);

        store.clear_prefix(Cf::State, &a).unwrap();
        assert!(store.scan_prefix(Cf::State, &a).unwrap().is_empty());
        assert_eq!(store.scan_prefix(Cf::State, &b).unwrap().len(), 1);
    }

    #[test]
    fn data_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
            let mut batch = store.batch();
            batch.put(Cf::Outbox, b"k", b"v");
            store.commit(batch).unwrap();
        }
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        assert_eq!(store.get(Cf::Outbox, b"k").unwrap(), Some(b"v".to_vec()));
        assert!(store.size_bytes() > 0);
    }

    /// Ingested tables land in the column family named, state in slots;
    /// later commits (in place, as the engine writes) and deletes win over
    /// them; they survive a reopen; keys out of order are refused with
    /// nothing added; no file is left beside the database.
    #[test]
    fn ingested_tables_read_like_committed_keys_and_later_writes_win() {
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<Vec<u8>> = (0..1000u32)
            .map(|i| format!("k{i:05}").into_bytes())
            .collect();
        {
            let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
            for cf in Cf::ALL {
                let n = store
                    .ingest(
                        cf,
                        keys.iter().map(|k| (k.as_slice(), cf.name().as_bytes())),
                    )
                    .unwrap();
                assert_eq!(n, 1000, "{cf:?}");
            }
            assert_eq!(store.ingest(Cf::Meta, std::iter::empty()).unwrap(), 0);
            assert_eq!(
                store.get_state(b"k00007").unwrap().as_deref(),
                Some(&b"state"[..])
            );
            assert_eq!(
                store.get(Cf::Outbox, b"k00999").unwrap().as_deref(),
                Some(&b"outbox"[..])
            );
            let mut b = store.batch();
            b.put_state(b"k00007", Some(b"s2"));
            b.put(Cf::Channels, b"k00001", b"c2");
            b.delete(Cf::Timers, b"k00002");
            store.commit(b).unwrap();
            let unsorted = [(b"b".as_slice(), b"1".as_slice()), (b"a", b"2")];
            let refused = store.ingest(Cf::Meta, unsorted).unwrap_err();
            assert!(refused.to_string().contains("table file"), "{refused}");
            assert_eq!(store.get(Cf::Meta, b"b").unwrap(), None);
        }
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        assert_eq!(
            store.get_state(b"k00007").unwrap().as_deref(),
            Some(&b"s2"[..])
        );
        assert_eq!(
            store.get_state(b"k00008").unwrap().as_deref(),
            Some(&b"state"[..])
        );
        assert_eq!(
            store.get(Cf::Channels, b"k00001").unwrap().as_deref(),
            Some(&b"c2"[..])
        );
        assert_eq!(store.get(Cf::Timers, b"k00002").unwrap(), None);
        assert_eq!(store.scan_prefix(Cf::Meta, b"k").unwrap().len(), 1000);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(INGESTING))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    /// After a flush the WAL holds nothing: the next open replays nothing,
    /// and finds every key.
    #[test]
    fn a_flushed_store_leaves_no_wal_to_replay() {
        let dir = tempfile::tempdir().unwrap();
        let wal_bytes = |dir: &Path| -> u64 {
            std::fs::read_dir(dir)
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
                .map(|e| e.metadata().unwrap().len())
                .sum()
        };
        {
            let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
            let mut b = store.batch();
            for i in 0..1000u32 {
                b.put_state(&i.to_be_bytes(), Some(b"state"));
                b.put(Cf::Outbox, &i.to_be_bytes(), b"outbox");
            }
            store.commit(b).unwrap();
            assert!(wal_bytes(dir.path()) > 10_000);
            store.flush().unwrap();
            assert_eq!(wal_bytes(dir.path()), 0);
        }
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        assert_eq!(
            store.get_state(&999u32.to_be_bytes()).unwrap().as_deref(),
            Some(&b"state"[..])
        );
        assert_eq!(store.scan_prefix(Cf::Outbox, &[]).unwrap().len(), 1000);
    }

    /// A batch splits into one entry per group, leaving out what no group
    /// takes; each entry applied to another store writes the same keys.
    #[test]
    fn log_entries_split_by_group_and_apply_elsewhere() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let from = Store::open(a.path(), &StoreOptions::default()).unwrap();
        let to = Store::open(b.path(), &StoreOptions::default()).unwrap();
        let mut seed = to.batch();
        seed.put(Cf::Outbox, b"x-gone", b"old");
        seed.put(Cf::Meta, b"x-deleted", b"old");
        to.commit(seed).unwrap();
        let mut batch = from.batch();
        batch.put_state(b"x-state", Some(b"1"));
        batch.put(Cf::Meta, b"y-meta", b"2");
        batch.put(Cf::Timers, b"z-not-logged", b"");
        batch.delete(Cf::Meta, b"x-deleted");
        batch.delete_range(Cf::Outbox, b"x-a", b"x-z");
        let group = |k: &[u8]| match k.first() {
            Some(b'x') => Some('x'),
            Some(b'y') => Some('y'),
            _ => None,
        };
        let entries = batch.log_entries(group).unwrap();
        assert_eq!(entries.keys().copied().collect::<Vec<_>>(), vec!['x', 'y']);
        let mut apply = to.batch();
        assert_eq!(apply.apply_log_entry(&entries[&'x'], b"x").unwrap(), 3);
        assert_eq!(apply.apply_log_entry(&entries[&'y'], b"y").unwrap(), 1);
        // An entry that writes outside the shard it is applied for.
        let mut outside = to.batch();
        let err = outside.apply_log_entry(&entries[&'x'], b"y").unwrap_err();
        assert!(err.to_string().contains("outside its shard"), "{err}");
        assert!(outside.is_empty());
        to.commit(apply).unwrap();
        assert_eq!(
            to.get(Cf::Meta, b"y-meta").unwrap().as_deref(),
            Some(&b"2"[..])
        );
        assert_eq!(to.get(Cf::Meta, b"x-deleted").unwrap(), None);
        assert_eq!(to.get(Cf::Outbox, b"x-gone").unwrap(), None);
        assert_eq!(to.get(Cf::Timers, b"z-not-logged").unwrap(), None);
        let mut state = Vec::new();
        to.for_each_state(b"x", |k, v| {
            state.push((k.to_vec(), v.to_vec()));
            true
        })
        .unwrap();
        assert_eq!(state, vec![(b"x-state".to_vec(), b"1".to_vec())]);
        // The original batch still commits whole.
        from.commit(batch).unwrap();
        assert_eq!(
            from.get(Cf::Timers, b"z-not-logged").unwrap().as_deref(),
            Some(&b""[..])
        );
        // A value can be found in an entry without applying it.
        assert_eq!(
            Batch::log_entry_value(&entries[&'y'], Cf::Meta, b"y-meta").unwrap(),
            Some(&b"2"[..])
        );
        assert_eq!(
            Batch::log_entry_value(&entries[&'y'], Cf::State, b"y-meta").unwrap(),
            None
        );
        assert_eq!(
            Batch::log_entry_value(&entries[&'x'], Cf::Meta, b"x-deleted").unwrap(),
            None
        );
        assert!(Batch::log_entry_value(b"junk", Cf::Meta, b"k").is_err());
        // Bytes that are not an entry, or name no column family, add nothing.
        let mut bad = to.batch();
        assert!(bad.apply_log_entry(b"not an entry", b"").is_err());
        let mut rep = Rep::new();
        rep.put(0, b"k", b"v");
        rep.put(9, b"k", b"v");
        let err = bad.apply_log_entry(rep.finish().unwrap(), b"").unwrap_err();
        assert!(err.to_string().contains("column family 9"), "{err}");
        assert!(bad.is_empty());
    }
}
