//! Sinks: `stdout` and `file`.
//!
//! The file sink is exactly once across crashes: its position (the file's
//! length after the last flushed record) is committed with the applied
//! sequence numbers, and on restart the file is cut back to that length.
//! Records written after it are delivered again by their producers, so each
//! appears once. `stdout` cannot be cut back: after a crash it may repeat the
//! records of the last uncommitted batch.

use crate::options;
use millrace_engine::{Record, Registry, Sink, SinkError};
use serde::Deserialize;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::PathBuf;

/// How a record becomes a line.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// `{"key": ..., "value": ..., "ts": ...}` (text is UTF-8, invalid bytes replaced).
    #[default]
    Jsonl,
    /// `key<TAB>value`.
    Text,
}

impl OutputFormat {
    /// Appends `r` as one line to `out`.
    pub fn write_line(self, r: &Record, out: &mut Vec<u8>) {
        match self {
            OutputFormat::Jsonl => {
                #[derive(serde::Serialize)]
                struct Line<'a> {
                    key: &'a str,
                    value: &'a str,
                    ts: i64,
                }
                let key = String::from_utf8_lossy(&r.key);
                let value = String::from_utf8_lossy(&r.value);
                // Serialising strings and an integer into a Vec cannot fail.
                let _ = serde_json::to_writer(
                    &mut *out,
                    &Line {
                        key: &key,
                        value: &value,
                        ts: r.timestamp,
                    },
                );
            }
            OutputFormat::Text => {
                out.extend_from_slice(&r.key);
                out.push(b'\t');
                out.extend_from_slice(&r.value);
            }
        }
        out.push(b'\n');
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileOptions {
    path: PathBuf,
    #[serde(default)]
    format: OutputFormat,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StdoutOptions {
    #[serde(default)]
    format: OutputFormat,
}

/// Appends lines to a file; exactly once across crashes.
pub struct FileSink {
    path: PathBuf,
    format: OutputFormat,
    out: Option<BufWriter<File>>,
    len: u64,
    line: Vec<u8>,
}

impl FileSink {
    /// A sink writing `format` lines to `path`.
    pub fn new(path: PathBuf, format: OutputFormat) -> Self {
        FileSink {
            path,
            format,
            out: None,
            len: 0,
            line: Vec::new(),
        }
    }

    fn err(&self, what: &str) -> impl FnOnce(std::io::Error) -> SinkError {
        let what = format!("{what} {}", self.path.display());
        move |source| SinkError { what, source }
    }
}

impl Sink for FileSink {
    fn open(&mut self, position: Option<&[u8]>) -> Result<(), SinkError> {
        let committed = match position {
            None => 0,
            Some(p) => u64::from_be_bytes(p.try_into().map_err(|_| SinkError {
                what: format!("committed position of {}", self.path.display()),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not 8 bytes"),
            })?),
        };
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(self.err("creating the directory of"))?;
        }
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.path)
            .map_err(self.err("opening"))?;
        let on_disk = f
            .metadata()
            .map_err(self.err("reading the length of"))?
            .len();
        if on_disk < committed {
            return Err(SinkError {
                what: format!(
                    "{} is {on_disk} bytes but {committed} were committed to it",
                    self.path.display()
                ),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the output file was truncated or replaced outside millrace",
                ),
            });
        }
        if on_disk > committed {
            tracing::info!(path = %self.path.display(), on_disk, committed, "cutting uncommitted output");
            f.set_len(committed).map_err(self.err("truncating"))?;
        }
        f.seek(SeekFrom::Start(committed))
            .map_err(self.err("seeking"))?;
        self.len = committed;
        self.out = Some(BufWriter::with_capacity(1 << 20, f));
        Ok(())
    }

    fn write(&mut self, r: &Record) -> Result<(), SinkError> {
        self.line.clear();
        self.format.write_line(r, &mut self.line);
        let line = std::mem::take(&mut self.line);
        let result = match self.out.as_mut() {
            Some(out) => out.write_all(&line).map_err(self.err("writing")),
            None => Err(SinkError {
                what: format!("writing {}", self.path.display()),
                source: std::io::Error::other("the sink was not opened"),
            }),
        };
        self.len += line.len() as u64;
        self.line = line;
        result
    }

    fn flush(&mut self, sync: bool) -> Result<Vec<u8>, SinkError> {
        if let Some(out) = self.out.as_mut() {
            let flushed = out.flush();
            flushed.map_err(self.err("flushing"))?;
            if sync {
                if let Some(out) = self.out.as_ref() {
                    out.get_ref().sync_data().map_err(self.err("syncing"))?;
                }
            }
        }
        Ok(self.len.to_be_bytes().to_vec())
    }
}

/// Writes lines to standard output. At least once across crashes.
pub struct StdoutSink {
    format: OutputFormat,
    buf: Vec<u8>,
    /// Standard output, or what a test reads instead.
    out: Box<dyn Write + Send>,
}

impl StdoutSink {
    /// A sink writing `format` lines to stdout.
    pub fn new(format: OutputFormat) -> Self {
        Self::to(format, Box::new(std::io::stdout()))
    }

    fn to(format: OutputFormat, out: Box<dyn Write + Send>) -> Self {
        StdoutSink {
            format,
            buf: Vec::new(),
            out,
        }
    }
}

impl Sink for StdoutSink {
    fn open(&mut self, _position: Option<&[u8]>) -> Result<(), SinkError> {
        Ok(())
    }

    fn write(&mut self, r: &Record) -> Result<(), SinkError> {
        self.format.write_line(r, &mut self.buf);
        Ok(())
    }

    fn flush(&mut self, _sync: bool) -> Result<Vec<u8>, SinkError> {
        let out = &mut self.out;
        out.write_all(&self.buf)
            .and_then(|_| out.flush())
            .map_err(|source| SinkError {
                what: "writing to stdout".into(),
                source,
            })?;
        self.buf.clear();
        Ok(Vec::new())
    }
}

pub(crate) fn register(r: &mut Registry) {
    r.sink("file", |c| {
        let o: FileOptions = options(c)?;
        Ok(Box::new(FileSink::new(o.path, o.format)))
    });
    r.sink("stdout", |c| {
        let o: StdoutOptions = options(c)?;
        Ok(Box::new(StdoutSink::new(o.format)))
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn rec(k: &str, v: &str) -> Record {
        Record {
            key: Bytes::copy_from_slice(k.as_bytes()),
            value: Bytes::copy_from_slice(v.as_bytes()),
            timestamp: 5,
        }
    }

    /// What a test sink wrote, shared with the test.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_stdout_sink_writes_its_lines_at_each_flush_and_keeps_no_position() {
        let seen = Captured::default();
        let mut s = StdoutSink::to(OutputFormat::Text, Box::new(seen.clone()));
        s.open(None).unwrap();
        s.write(&rec("a", "1")).unwrap();
        s.write(&rec("b", "2")).unwrap();
        assert!(
            seen.0.lock().unwrap().is_empty(),
            "nothing before the flush"
        );
        assert_eq!(s.flush(false).unwrap(), Vec::<u8>::new(), "no position");
        s.write(&rec("c", "3")).unwrap();
        s.flush(false).unwrap();
        assert_eq!(
            String::from_utf8(seen.0.lock().unwrap().clone()).unwrap(),
            "a\t1\nb\t2\nc\t3\n",
            "each line once"
        );
    }

    #[test]
    fn reopening_cuts_back_to_the_committed_position() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out/o.jsonl");
        let mut s = FileSink::new(path.clone(), OutputFormat::Jsonl);
        s.open(None).unwrap();
        s.write(&rec("a", "1")).unwrap();
        let pos = s.flush(false).unwrap();
        s.write(&rec("b", "\"2\"")).unwrap();
        s.flush(false).unwrap();
        drop(s);
        let mut s = FileSink::new(path.clone(), OutputFormat::Jsonl);
        s.open(Some(&pos)).unwrap();
        s.write(&rec("c", "3")).unwrap();
        s.flush(true).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "{\"key\":\"a\",\"value\":\"1\",\"ts\":5}\n{\"key\":\"c\",\"value\":\"3\",\"ts\":5}\n"
        );
    }

    #[test]
    fn a_file_shorter_than_committed_is_an_error_not_a_silent_loss() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.txt");
        std::fs::write(&path, "x\n").unwrap();
        let mut s = FileSink::new(path, OutputFormat::Text);
        let e = s.open(Some(&100u64.to_be_bytes())).unwrap_err();
        assert!(e.to_string().contains("100 were committed"), "{e}");
    }
}
