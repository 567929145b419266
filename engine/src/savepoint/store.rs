//! Where savepoints are kept ([`SavepointStore`]), the local directory store
//! ([`DirStore`]), and the rule every path in a savepoint follows
//! ([`check_path`]): relative, `/`-separated, without `.` or `..`, so that
//! a manifest can never name a file outside its savepoint.

use super::SavepointError;
use std::path::{Path, PathBuf};

/// Where savepoints are kept: a local directory, or an object store.
///
/// Every `path` is relative to the savepoint's location and passes
/// [`check_path`]; an implementation refuses any other before touching
/// anything.
pub trait SavepointStore: Send + Sync {
    /// Writes `path`, replacing it.
    fn put(&self, path: &str, bytes: Vec<u8>) -> Result<(), SavepointError>;
    /// Writes `path` only if it does not exist yet, atomically (`O_EXCL`,
    /// an object store's `If-None-Match: *`); `false` if it existed, and
    /// then it is left as it was.
    fn create(&self, path: &str, bytes: Vec<u8>) -> Result<bool, SavepointError>;
    /// Reads `path`; `None` if it does not exist.
    fn get(&self, path: &str) -> Result<Option<Vec<u8>>, SavepointError>;
    /// Removes `path`; nothing if it does not exist.
    fn delete(&self, path: &str) -> Result<(), SavepointError>;
    /// One entry the location holds (a file, a directory or an object, at
    /// its top level), or `None` if it holds nothing. Writes still under
    /// way (a [`DirStore`]'s temporary files) do not count.
    fn some_entry(&self) -> Result<Option<String>, SavepointError>;
    /// The names of the files directly in folder `dir` (a path as
    /// [`check_path`] takes it), including what a write cut short left
    /// there; empty if there is no such folder.
    fn list(&self, dir: &str) -> Result<Vec<String>, SavepointError>;
    /// Where it is, for messages.
    fn describe(&self) -> String;
}

/// Checks that `path` names a file inside a savepoint: not empty, relative,
/// `/`-separated parts that are neither empty, `.` nor `..`, without `\`
/// or control characters. A manifest naming any other file is refused
/// before anything is read.
pub fn check_path(path: &str) -> Result<(), String> {
    let why = if path.is_empty() {
        "it is empty"
    } else if path.starts_with('/') {
        "it is absolute"
    } else if path.contains('\\') || path.chars().any(char::is_control) {
        "it holds `\\` or a control character"
    } else if path
        .split('/')
        .any(|p| p.is_empty() || p == "." || p == "..")
    {
        "it has an empty, `.` or `..` part"
    } else {
        return Ok(());
    };
    Err(format!(
        "`{}` is not a path inside the savepoint ({why}): file names in a savepoint are \
         relative, without `.` or `..`",
        path.escape_debug()
    ))
}

/// A savepoint in a local directory (`file:///...` or a plain path).
pub struct DirStore {
    root: PathBuf,
}

/// The ending of a [`DirStore`]'s files while they are written.
const PARTIAL: &str = ".millrace-partial";

impl DirStore {
    /// A savepoint directory at `root` (created on the first write).
    pub fn new(root: impl Into<PathBuf>) -> DirStore {
        DirStore { root: root.into() }
    }

    /// `path` under the root, once [`check_path`] accepts it.
    fn file(&self, path: &str) -> Result<PathBuf, SavepointError> {
        check_path(path).map_err(SavepointError::Refused)?;
        Ok(self.root.join(path))
    }

    /// Writes `bytes` whole under a temporary name beside `p` and syncs
    /// them; returns that name.
    fn write_partial(&self, p: &Path, bytes: &[u8]) -> Result<PathBuf, SavepointError> {
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        }
        let mut name = p.as_os_str().to_owned();
        // Unique to this process and call: two writers never share it.
        static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        name.push(format!(".{}-{call}", std::process::id()));
        name.push(PARTIAL);
        let tmp = PathBuf::from(name);
        // Created, never opened as found: a link planted at this name (in a
        // savepoint directory others can write) is removed, not written
        // through (O_EXCL does not follow it).
        let create = || {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
        };
        let mut file = match create() {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                std::fs::remove_file(&tmp).and_then(|()| create())
            }
            opened => opened,
        }
        .map_err(io(format!("creating {}", tmp.display())))?;
        std::io::Write::write_all(&mut file, bytes)
            .and_then(|()| file.sync_all())
            .map_err(io(format!("writing {}", tmp.display())))?;
        Ok(tmp)
    }
}

pub(super) fn io(what: String) -> impl FnOnce(std::io::Error) -> SavepointError {
    move |e| SavepointError::Io(format!("{what}: {e}"))
}

impl SavepointStore for DirStore {
    fn put(&self, path: &str, bytes: Vec<u8>) -> Result<(), SavepointError> {
        let p = self.file(path)?;
        // Written whole under another name, then renamed: a reader never
        // sees half a file.
        let tmp = self.write_partial(&p, &bytes)?;
        std::fs::rename(&tmp, &p).map_err(io(format!("renaming to {}", p.display())))?;
        // The rename itself survives a power loss only once the directory
        // that holds it is synced (a commit log is cut below a snapshot
        // written here).
        if let Some(dir) = p.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io(format!("syncing {}", dir.display())))?;
        }
        Ok(())
    }

    fn create(&self, path: &str, bytes: Vec<u8>) -> Result<bool, SavepointError> {
        let p = self.file(path)?;
        // Written whole under a name of this process, then linked to its
        // name, which fails if the name exists: whoever links first wins,
        // and nobody sees half a file.
        let tmp = self.write_partial(&p, &bytes)?;
        let linked = std::fs::hard_link(&tmp, &p);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(SavepointError::Io(format!("creating {}: {e}", p.display()))),
        }
    }

    fn get(&self, path: &str) -> Result<Option<Vec<u8>>, SavepointError> {
        let p = self.file(path)?;
        // A name inside the savepoint may still be a link out of it. What is
        // read is the path checked, with every link resolved, so a link
        // swapped in after the check is not followed.
        let (real, root) = match (p.canonicalize(), self.root.canonicalize()) {
            (Ok(real), Ok(root)) => (real, root),
            (Err(e), _) | (_, Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(None)
            }
            (Err(e), _) | (_, Err(e)) => {
                return Err(SavepointError::Io(format!("reading {}: {e}", p.display())))
            }
        };
        if !real.starts_with(&root) {
            return Err(SavepointError::Refused(format!(
                "{} leads out of the savepoint {} (a symbolic link): refused",
                p.display(),
                self.root.display()
            )));
        }
        // Only a regular file: a FIFO would hang the load.
        if std::fs::metadata(&real).is_ok_and(|m| !m.is_file()) {
            return Err(SavepointError::Refused(format!(
                "{} is not a regular file: refused",
                p.display()
            )));
        }
        match std::fs::read(&real) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(SavepointError::Io(format!("reading {}: {e}", p.display()))),
        }
    }

    fn delete(&self, path: &str) -> Result<(), SavepointError> {
        let p = self.file(path)?;
        // Removes the name only: a link at the name is not followed, and a
        // directory on the way that is a link out of the location is refused.
        let parent = p.parent().unwrap_or(&self.root);
        match (parent.canonicalize(), self.root.canonicalize()) {
            (Ok(real), Ok(root)) if !real.starts_with(&root) => {
                return Err(SavepointError::Refused(format!(
                    "{} leads out of {} (a symbolic link): refused",
                    p.display(),
                    self.root.display()
                )))
            }
            (Err(e), _) | (_, Err(e)) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            (Err(e), _) | (_, Err(e)) => {
                return Err(SavepointError::Io(format!("removing {}: {e}", p.display())))
            }
            _ => {}
        }
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(SavepointError::Io(format!("removing {}: {e}", p.display()))),
        }
    }

    fn some_entry(&self) -> Result<Option<String>, SavepointError> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(SavepointError::Io(format!(
                    "listing {}: {e}",
                    self.root.display()
                )))
            }
        };
        for entry in entries {
            let entry = entry.map_err(io(format!("listing {}", self.root.display())))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.ends_with(PARTIAL) {
                return Ok(Some(name));
            }
        }
        Ok(None)
    }

    fn list(&self, dir: &str) -> Result<Vec<String>, SavepointError> {
        let d = self.file(dir)?;
        let entries = match std::fs::read_dir(&d) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(SavepointError::Io(format!("listing {}: {e}", d.display()))),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io(format!("listing {}", d.display())))?;
            // Files only (not followed if links): a folder is not a file
            // that could be removed.
            if entry.file_type().is_ok_and(|t| !t.is_dir()) {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(names)
    }

    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }
}
