//! Finds the line of a key in a TOML text, so that errors found after parsing
//! (unknown inputs, cycles, a kind's bad option) still name a line.

use crate::ConfigError;
use std::path::{Path, PathBuf};

/// Maps dotted key paths to lines of the original text.
#[derive(Debug, Clone)]
pub struct Locator {
    file: PathBuf,
    lines: Vec<String>,
}

impl Locator {
    /// Indexes `text`, read from `file`.
    pub fn new(file: &Path, text: &str) -> Self {
        Locator {
            file: file.to_path_buf(),
            lines: text.lines().map(str::to_owned).collect(),
        }
    }

    /// The file the text came from.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// 1-based line of a byte offset.
    pub fn line_of_offset(&self, offset: usize) -> usize {
        let mut seen = 0;
        for (i, line) in self.lines.iter().enumerate() {
            seen += line.len() + 1;
            if offset < seen {
                return i + 1;
            }
        }
        self.lines.len().max(1)
    }

    /// The dotted key assigned on the line holding byte `offset` (with its
    /// table's path), or that line's text when it assigns nothing.
    pub fn key_at(&self, offset: usize) -> String {
        let line = self.line_of_offset(offset).saturating_sub(1);
        let text = self.lines.get(line).map_or("", |l| l.trim());
        let Some((key, _)) = text.split_once('=').filter(|_| !text.starts_with('[')) else {
            return text.to_owned();
        };
        let key = key.trim().trim_matches('"');
        let table = self.lines[..line]
            .iter()
            .rev()
            .map(|l| l.trim())
            .find(|l| l.starts_with('['))
            .map(|h| h.trim_matches(|c| c == '[' || c == ']').replace('"', ""));
        match table {
            Some(t) if !t.is_empty() => format!("{t}.{key}"),
            _ => key.to_owned(),
        }
    }

    /// 1-based line of `table.key` where `table` is a dotted table path such as
    /// `computations.words`. Falls back to the table's header, then to line 1.
    pub fn line_of(&self, table: &str, key: Option<&str>) -> usize {
        self.line_in_entry(table, 0, key)
    }

    /// Like [`Locator::line_of`], in the `n`th (0-based) `[[table]]` of an
    /// array of tables.
    pub fn line_in_entry(&self, table: &str, n: usize, key: Option<&str>) -> usize {
        let header = self.header_line(table, n);
        let Some(key) = key else {
            return header.map_or(1, |h| h + 1);
        };
        if let Some(h) = header {
            for (i, line) in self.lines.iter().enumerate().skip(h + 1) {
                let t = line.trim_start();
                if t.starts_with('[') {
                    break;
                }
                if assigns(t, key) {
                    return i + 1;
                }
            }
            return h + 1;
        }
        1
    }

    fn header_line(&self, table: &str, n: usize) -> Option<usize> {
        let want: Vec<&str> = table.split('.').collect();
        let mut matching = self.lines.iter().enumerate().filter(|(_, line)| {
            let t = line.trim();
            let Some(inner) = t
                .strip_prefix("[[")
                .or_else(|| t.strip_prefix('['))
                .and_then(|r| r.split(']').next())
            else {
                return false;
            };
            let parts: Vec<String> = inner
                .split('.')
                .map(|p| p.trim().trim_matches('"').trim_matches('\'').to_owned())
                .collect();
            parts == want
        });
        matching.nth(n).map(|(i, _)| i)
    }

    /// An error about `key` of the `n`th (0-based) `[[table]]`.
    pub fn error_in_entry(
        &self,
        table: &str,
        n: usize,
        key: &str,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.clone(),
            line: self.line_in_entry(table, n, Some(key)),
            key: format!("{table}[{n}].{key}"),
            message: message.into(),
        }
    }

    /// An [`ConfigError::Invalid`] about `table.key`, located in the text.
    pub fn error(&self, table: &str, key: Option<&str>, message: impl Into<String>) -> ConfigError {
        let full = match key {
            Some(k) => format!("{table}.{k}"),
            None => table.to_owned(),
        };
        ConfigError::Invalid {
            file: self.file.clone(),
            line: self.line_of(table, key),
            key: full,
            message: message.into(),
        }
    }
}

fn assigns(line: &str, key: &str) -> bool {
    let rest = line
        .strip_prefix(key)
        .or_else(|| line.strip_prefix(&format!("\"{key}\"")));
    matches!(rest.map(str::trim_start), Some(r) if r.starts_with('='))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "[engine]\nshards = 4\n\n[computations.words]\ntype = \"split\"\ninputs = [\"x\"]\n[sinks.\"out\"]\ntype = \"stdout\"\n";

    #[test]
    fn finds_keys_inside_their_table() {
        let l = Locator::new(Path::new("t.toml"), TEXT);
        assert_eq!(l.line_of("engine", Some("shards")), 2);
        assert_eq!(l.line_of("computations.words", Some("inputs")), 6);
        assert_eq!(l.line_of("computations.words", None), 4);
        assert_eq!(l.line_of("sinks.out", Some("type")), 8);
    }

    #[test]
    fn falls_back_to_the_header_then_line_one() {
        let l = Locator::new(Path::new("t.toml"), TEXT);
        assert_eq!(l.line_of("computations.words", Some("absent")), 4);
        assert_eq!(l.line_of("nowhere", Some("x")), 1);
        assert_eq!(l.line_of_offset(0), 1);
        assert_eq!(l.line_of_offset(10), 2);
        assert_eq!(l.key_at(10), "engine.shards");
        assert_eq!(
            l.key_at(TEXT.find("inputs").unwrap()),
            "computations.words.inputs"
        );
        assert_eq!(l.key_at(0), "[engine]");
    }
}
