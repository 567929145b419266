//! Where a load is staged: `DATA_DIR.loading` (the data directory's name
//! with `.loading` appended), marked as a load's by a file of that name, and
//! renamed into place only once every shard is in. A directory of that
//! name without the mark is someone else's: it is refused, never removed. A
//! load that fails removes what it staged. The load holds an exclusive lock
//! on its mark from start to end, so a second load into the same data
//! directory (a supervisor restarting a worker still loading) is refused
//! instead of removing the first one's staging as an unfinished load: only
//! a mark nobody holds (its load died) is taken for one.

use super::store::io;
use super::SavepointError;
use std::path::{Path, PathBuf};

/// The file that marks a staging directory as a load's.
pub(super) const OURS: &str = "millrace-loading";

/// A load being staged beside its data directory.
#[derive(Debug)]
pub(super) struct Staging {
    dir: PathBuf,
    /// The mark, locked while the load runs.
    _mark: std::fs::File,
}

/// `DATA_DIR.loading`.
pub(super) fn staging_path(data_dir: &Path) -> Result<PathBuf, SavepointError> {
    let name = data_dir.file_name().ok_or_else(|| {
        SavepointError::DataDir(format!(
            "{} does not end in a directory name: a savepoint is loaded into a named data \
             directory",
            data_dir.display()
        ))
    })?;
    let mut staged = name.to_owned();
    staged.push(".loading");
    Ok(data_dir.with_file_name(staged))
}

impl Staging {
    /// Starts staging a load for `data_dir`: removes an unfinished load of
    /// its own, refuses anything else of that name.
    pub(super) fn begin(data_dir: &Path) -> Result<Staging, SavepointError> {
        let dir = staging_path(data_dir)?;
        if dir.exists() || dir.is_symlink() {
            if !dir.join(OURS).is_file() || dir.is_symlink() {
                return Err(SavepointError::DataDir(format!(
                    "{} exists and is not an unfinished savepoint load (it has no {OURS} \
                     file): a load into {} is staged there; move it away",
                    dir.display(),
                    data_dir.display()
                )));
            }
            let mark = std::fs::File::open(dir.join(OURS))
                .map_err(io(format!("opening {}", dir.join(OURS).display())))?;
            match mark.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(SavepointError::DataDir(format!(
                        "another load into {} is running (it holds {}): wait for it to \
                         end, or stop it",
                        data_dir.display(),
                        dir.join(OURS).display()
                    )))
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(SavepointError::Io(format!(
                        "locking {}: {e}",
                        dir.join(OURS).display()
                    )))
                }
            }
            std::fs::remove_dir_all(&dir).map_err(io(format!(
                "removing the unfinished load {}",
                dir.display()
            )))?;
        }
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(io(format!("creating {}", parent.display())))?;
        }
        std::fs::create_dir(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let mark = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.join(OURS))
            .and_then(|f| f.lock().map(|()| f))
            .and_then(|f| f.sync_all().map(|()| f))
            .map_err(io(format!("marking {}", dir.display())))?;
        Ok(Staging { dir, _mark: mark })
    }

    /// The staging directory.
    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Removes what was staged: the load failed.
    pub(super) fn abandon(self) -> Result<(), SavepointError> {
        std::fs::remove_dir_all(&self.dir).map_err(io(format!(
            "removing the refused load {}",
            self.dir.display()
        )))
    }

    /// Moves the staged load to `data_dir` (absent or an empty directory),
    /// then takes its mark away (a mark left by a crash in between is
    /// harmless: RocksDB ignores the file).
    pub(super) fn finish(self, data_dir: &Path) -> Result<(), SavepointError> {
        if data_dir.exists() {
            std::fs::remove_dir(data_dir)
                .map_err(io(format!("replacing {}", data_dir.display())))?;
        }
        std::fs::rename(&self.dir, data_dir).map_err(io(format!(
            "moving the loaded data to {}",
            data_dir.display()
        )))?;
        std::fs::remove_file(data_dir.join(OURS))
            .map_err(io(format!("unmarking {}", data_dir.display())))
    }
}
