//! `file`: one record per line of a file, or of every file in a directory.
//!
//! A directory's files are read in name order; with `watch = true` the
//! directory is polled for new files, which must sort after the ones already
//! read (timestamped or numbered names), as with Spark's `textFileStream`.
//! The position `(file name, byte offset)` is committed with the records read
//! before it, so a restart neither repeats nor skips a line. The key of each
//! record is the file's name; its event time is when it was read.

use crate::options;
use millrace_config::{Component, ConfigError, KeyExtractor};
use millrace_engine::{
    extract_key, now_micros, parse_event_time, Emitter, Registry, Source, SourceError, SourcePoll,
};
use serde::Deserialize;
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::PathBuf;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    path: PathBuf,
    #[serde(default)]
    watch: bool,
    /// Where a line's event time is: `field:N` (with `delimiter`) or `json:/ptr`.
    timestamp: Option<String>,
    delimiter: Option<String>,
    /// Unit of the event time: `s`, `ms` (default) or `us`.
    timestamp_unit: Option<String>,
}

/// Reads each line's event time from the line itself.
#[derive(Clone)]
pub struct EventTimeField {
    extractor: KeyExtractor,
    micros_per_unit: i64,
}

impl EventTimeField {
    /// Reads the event time with `extractor`, in units of `micros_per_unit` microseconds.
    pub fn new(extractor: KeyExtractor, micros_per_unit: i64) -> Self {
        EventTimeField {
            extractor,
            micros_per_unit,
        }
    }

    /// The event time in `line`, if it has one.
    pub(crate) fn of(&self, line: &[u8]) -> Option<i64> {
        let v = bytes::Bytes::copy_from_slice(line);
        let field = extract_key(&self.extractor, &v, &v).ok()?;
        parse_event_time(std::str::from_utf8(&field).ok()?, self.micros_per_unit).ok()
    }
}

/// The file/directory source.
pub struct FileSource {
    path: PathBuf,
    watch: bool,
    /// File being read and the offset just after the last line emitted.
    current: Option<(String, u64)>,
    reader: Option<BufReader<File>>,
    line: Vec<u8>,
    event_time: Option<EventTimeField>,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SourceError {
    let what = what.into();
    move |source| SourceError::Io { what, source }
}

impl FileSource {
    /// A source over `path` (a file, or a directory when `watch` or when it is one).
    pub fn new(path: PathBuf, watch: bool) -> Self {
        FileSource {
            path,
            watch,
            current: None,
            reader: None,
            line: Vec::new(),
            event_time: None,
        }
    }

    /// Takes each line's event time from the line instead of the clock.
    pub fn with_event_time(mut self, field: EventTimeField) -> Self {
        self.event_time = Some(field);
        self
    }

    fn is_dir(&self) -> bool {
        self.path.is_dir()
    }

    /// Files of the directory (or the one file), by name.
    fn files(&self) -> Result<Vec<String>, SourceError> {
        if !self.is_dir() {
            let name = self
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            return Ok(vec![name]);
        }
        let mut names = Vec::new();
        for entry in
            std::fs::read_dir(&self.path).map_err(io(format!("listing {}", self.path.display())))?
        {
            let entry = entry.map_err(io(format!("listing {}", self.path.display())))?;
            if entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !name.starts_with('.') {
                    names.push(name);
                }
            }
        }
        names.sort();
        Ok(names)
    }

    fn full(&self, name: &str) -> PathBuf {
        if self.is_dir() {
            self.path.join(name)
        } else {
            self.path.clone()
        }
    }

    fn open_at(&mut self, name: &str, offset: u64) -> Result<(), SourceError> {
        let p = self.full(name);
        let mut f = File::open(&p).map_err(io(format!("opening {}", p.display())))?;
        f.seek(SeekFrom::Start(offset))
            .map_err(io(format!("seeking {}", p.display())))?;
        self.reader = Some(BufReader::with_capacity(256 << 10, f));
        self.current = Some((name.to_owned(), offset));
        Ok(())
    }

    /// Moves to the first file after the current one; false if there is none.
    fn advance(&mut self) -> Result<bool, SourceError> {
        let after = self.current.as_ref().map(|(n, _)| n.clone());
        let next = self
            .files()?
            .into_iter()
            .find(|n| after.as_ref().is_none_or(|a| n > a));
        match next {
            Some(n) => {
                self.open_at(&n, 0)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

impl Source for FileSource {
    fn open(&mut self, position: Option<&[u8]>) -> Result<(), SourceError> {
        if !self.path.exists() && !self.watch {
            return Err(SourceError::Io {
                what: format!("opening {}", self.path.display()),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such file or directory",
                ),
            });
        }
        if let Some(p) = position {
            let text =
                std::str::from_utf8(p).map_err(|_| SourceError::Position("not UTF-8".into()))?;
            let (offset, name) = text
                .split_once(' ')
                .ok_or_else(|| SourceError::Position(format!("`{text}` is not `OFFSET NAME`")))?;
            let offset: u64 = offset
                .parse()
                .map_err(|_| SourceError::Position(format!("bad offset in `{text}`")))?;
            self.open_at(name, offset)?;
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut Emitter<'_>, max: usize) -> Result<SourcePoll, SourceError> {
        if self.reader.is_none() && !self.path.exists() {
            return Ok(SourcePoll::Idle);
        }
        if self.reader.is_none() && !self.advance()? {
            return Ok(if self.watch {
                SourcePoll::Idle
            } else {
                SourcePoll::Exhausted
            });
        }
        let now = now_micros();
        while out.len() < max {
            let (Some(reader), Some((name, offset))) =
                (self.reader.as_mut(), self.current.as_mut())
            else {
                break;
            };
            self.line.clear();
            let n = reader
                .read_until(b'\n', &mut self.line)
                .map_err(io(format!("reading {name}")))?;
            let complete = self.line.last() == Some(&b'\n');
            if n > 0 && (complete || !self.watch) {
                *offset += n as u64;
                let mut end = self.line.len();
                while end > 0 && matches!(self.line[end - 1], b'\n' | b'\r') {
                    end -= 1;
                }
                let line = &self.line[..end];
                let ts = match &self.event_time {
                    None => now,
                    Some(f) => f.of(line).unwrap_or_else(|| {
                        tracing::warn!(file = %name, line = %String::from_utf8_lossy(line), "no event time in line; using the time it was read");
                        now
                    }),
                };
                out.emit(name.clone(), line.to_vec(), ts);
                continue;
            }
            // End of this file (or a line still being written).
            let (name, offset) = (name.clone(), *offset);
            if n > 0 {
                // Re-read the partial line later, from its start.
                self.open_at(&name, offset)?;
            }
            if !self.is_dir() {
                return Ok(if self.watch {
                    SourcePoll::Idle
                } else {
                    SourcePoll::Exhausted
                });
            }
            if !self.advance()? {
                // Stay on the last file: it may still grow.
                self.open_at(&name, offset)?;
                return Ok(if self.watch {
                    SourcePoll::Idle
                } else {
                    SourcePoll::Exhausted
                });
            }
        }
        Ok(SourcePoll::Ready)
    }

    fn position(&self) -> Vec<u8> {
        match &self.current {
            Some((name, offset)) => format!("{offset} {name}").into_bytes(),
            None => Vec::new(),
        }
    }

    fn replayable(&self) -> bool {
        true
    }
}

/// Microseconds per unit of `timestamp_unit` (`s`, `ms` by default, `us`).
pub(crate) fn micros_per_unit(c: &Component, unit: Option<&str>) -> Result<i64, ConfigError> {
    match unit.unwrap_or("ms") {
        "s" => Ok(1_000_000),
        "ms" => Ok(1_000),
        "us" => Ok(1),
        other => Err(c.options.error(
            Some("timestamp_unit"),
            format!("unknown unit `{other}` (use s, ms or us)"),
        )),
    }
}

pub(crate) fn register(r: &mut Registry) {
    r.source("file", |c| {
        let o: Options = options(c)?;
        let mut source = FileSource::new(o.path, o.watch);
        if let Some(t) = &o.timestamp {
            let extractor = KeyExtractor::parse(t, o.delimiter.clone())
                .map_err(|m| c.options.error(Some("timestamp"), m))?;
            let micros_per_unit = micros_per_unit(c, o.timestamp_unit.as_deref())?;
            source = source.with_event_time(EventTimeField::new(extractor, micros_per_unit));
        } else if o.delimiter.is_some() || o.timestamp_unit.is_some() {
            return Err(c.options.error(
                Some("timestamp"),
                "`delimiter` and `timestamp_unit` need `timestamp`",
            ));
        }
        Ok(Box::new(source))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(s: &mut FileSource, max: usize) -> (Vec<String>, SourcePoll) {
        let mut out = Vec::new();
        let p = s.poll(&mut Emitter::new(&mut out), max).unwrap();
        (
            out.into_iter()
                .map(|(_, v, _)| String::from_utf8(v.to_vec()).unwrap())
                .collect(),
            p,
        )
    }

    #[test]
    fn reads_a_directory_in_order_and_resumes_from_a_position() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), "one\ntwo\r\nthree").unwrap();
        std::fs::write(dir.path().join("b.txt"), "four\n").unwrap();
        let mut s = FileSource::new(dir.path().to_path_buf(), false);
        s.open(None).unwrap();
        let (lines, p) = drain(&mut s, 2);
        assert_eq!(lines, ["one", "two"]);
        assert_eq!(p, SourcePoll::Ready);
        let pos = s.position();
        let mut t = FileSource::new(dir.path().to_path_buf(), false);
        t.open(Some(&pos)).unwrap();
        let (lines, p) = drain(&mut t, 100);
        assert_eq!(lines, ["three", "four"]);
        assert_eq!(p, SourcePoll::Exhausted);
    }

    #[test]
    fn watching_waits_for_complete_lines_and_new_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("1.txt"), "a\npart").unwrap();
        let mut s = FileSource::new(dir.path().to_path_buf(), true);
        s.open(None).unwrap();
        let (lines, p) = drain(&mut s, 100);
        assert_eq!((lines, p), (vec!["a".to_owned()], SourcePoll::Idle));
        std::fs::write(dir.path().join("1.txt"), "a\npartial\n").unwrap();
        std::fs::write(dir.path().join("2.txt"), "b\n").unwrap();
        let (lines, _) = drain(&mut s, 100);
        assert_eq!(lines, ["partial", "b"]);
    }

    #[test]
    fn a_missing_file_is_a_clear_error() {
        let mut s = FileSource::new("/nonexistent/millrace".into(), false);
        let e = s.open(None).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/millrace"), "{e}");
    }
}
