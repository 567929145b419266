//! `[service] savepoint_targets`: the places a savepoint asked for over HTTP
//! (`POST /stop?savepoint=URL`) may go.
//!
//! A stop request names its savepoint's location, and the worker writes its
//! state there. Whoever can reach the HTTP address must not be able to make
//! it write anywhere else than where the operator said, so a location is
//! accepted only when it lies under one of the configured targets. Both are
//! compared as normalised paths: empty and `.` segments are dropped, and a
//! `..` segment is refused outright (it would leave the target), as is any
//! segment holding `%`, `\` or a control character (which a store might
//! decode or split into something else than what was compared).
//!
//! ```
//! use millrace_config::SavepointTarget;
//! let root = SavepointTarget::parse("s3://backups/millrace").unwrap();
//! let asked = SavepointTarget::parse("s3://backups/millrace//2026-12-07/").unwrap();
//! assert!(root.contains(&asked));
//! assert!(!root.contains(&SavepointTarget::parse("s3://backups/millrace-other").unwrap()));
//! assert!(SavepointTarget::parse("file:///var/lib/millrace/../etc").is_err());
//! ```

use std::fmt;

/// A savepoint location, normalised: `file:///a/b` (or the plain absolute
/// path `/a/b`) or `s3://bucket/a/b`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavepointTarget {
    /// `None` for a directory, the bucket for S3.
    bucket: Option<String>,
    /// The path (under the bucket), without empty or `.` segments.
    segments: Vec<String>,
}

impl SavepointTarget {
    /// Parses and normalises `url`; the error says what is wrong with it.
    pub fn parse(url: &str) -> Result<SavepointTarget, String> {
        let (bucket, path) = if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, path) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!("`{url}`: no bucket (s3://BUCKET/PREFIX)"));
            }
            (Some(bucket.to_owned()), path)
        } else if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(format!(
                    "`{url}`: a file URL needs an absolute path (file:///DIR)"
                ));
            }
            (None, path)
        } else if let Some((scheme, _)) = url.split_once("://") {
            return Err(format!(
                "`{url}`: savepoints go to file:///DIR or s3://BUCKET/PREFIX; `{scheme}://` is not supported"
            ));
        } else if url.starts_with('/') {
            (None, url)
        } else {
            return Err(format!(
                "`{url}`: a relative path; give file:///ABSOLUTE/DIR or s3://BUCKET/PREFIX"
            ));
        };
        let mut segments = Vec::new();
        for segment in path.split('/') {
            match segment {
                "" | "." => {}
                ".." => {
                    return Err(format!(
                        "`{url}`: `..` is not allowed in a savepoint location"
                    ))
                }
                s if s.chars().any(|c| c == '%' || c == '\\' || c.is_control()) => {
                    return Err(format!(
                        "`{url}`: `{}` holds `%`, `\\` or a control character; use plain names",
                        s.escape_default()
                    ))
                }
                s => segments.push(s.to_owned()),
            }
        }
        if let Some(bad) = bucket
            .as_deref()
            .filter(|b| b.chars().any(|c| c == '%' || c == '\\' || c.is_control()))
        {
            return Err(format!(
                "`{url}`: bucket `{}` is not a plain name",
                bad.escape_default()
            ));
        }
        Ok(SavepointTarget { bucket, segments })
    }

    /// Whether `other` is this location or lies under it.
    pub fn contains(&self, other: &SavepointTarget) -> bool {
        self.bucket == other.bucket && other.segments.starts_with(&self.segments)
    }
}

impl fmt::Display for SavepointTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.bucket {
            Some(b) => write!(f, "s3://{b}")?,
            None => write!(f, "file://")?,
        }
        for s in &self.segments {
            write!(f, "/{s}")?;
        }
        if self.bucket.is_none() && self.segments.is_empty() {
            write!(f, "/")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(url: &str) -> SavepointTarget {
        SavepointTarget::parse(url).expect(url)
    }

    #[test]
    fn a_location_under_a_target_is_contained_segment_by_segment() {
        let dir = t("file:///var/lib/millrace/savepoints");
        assert!(dir.contains(&t("file:///var/lib/millrace/savepoints")));
        assert!(dir.contains(&t("file:///var/lib/millrace/savepoints/sp1")));
        assert!(dir.contains(&t("/var/lib/millrace/savepoints/./sp1/")));
        assert!(dir.contains(&t("file:////var//lib/millrace/savepoints//sp1")));
        assert!(!dir.contains(&t("file:///var/lib/millrace/savepoints-x/sp1")));
        assert!(!dir.contains(&t("file:///var/lib/millrace")));
        assert!(!dir.contains(&t("file:///tmp/sp1")));
        assert!(!dir.contains(&t("s3://var/lib/millrace/savepoints/sp1")));
        let s3 = t("s3://backups/clicks");
        assert!(s3.contains(&t("s3://backups/clicks/2026-12-07")));
        assert!(!s3.contains(&t("s3://backups/clicksx")));
        assert!(!s3.contains(&t("s3://other/clicks/a")));
        assert!(!s3.contains(&t("file:///backups/clicks/a")));
        assert!(t("s3://backups").contains(&t("s3://backups/any/where")));
        assert!(t("file:///").contains(&t("/anything")));
    }

    #[test]
    fn dot_dot_escapes_and_odd_names_are_refused() {
        for bad in [
            "file:///var/lib/millrace/savepoints/../../etc",
            "/var/lib/millrace/savepoints/..",
            "s3://backups/clicks/../other",
            "s3://backups/clicks/%2e%2e/other",
            "file:///var/a\\..\\b",
            "file:///var/a\nb",
            "s3:///prefix",
            "s3://%2e/prefix",
            "file://relative/dir",
            "relative/dir",
            "ftp://host/dir",
            "",
        ] {
            assert!(SavepointTarget::parse(bad).is_err(), "{bad:?} was accepted");
        }
        let why = SavepointTarget::parse("s3://b/x/../y").unwrap_err();
        assert!(why.contains("`..` is not allowed"), "{why}");
    }

    #[test]
    fn a_target_prints_normalised() {
        assert_eq!(t("/a//b/./c/").to_string(), "file:///a/b/c");
        assert_eq!(t("s3://bucket").to_string(), "s3://bucket");
        assert_eq!(t("s3://bucket/p/").to_string(), "s3://bucket/p");
        assert_eq!(t("file:///").to_string(), "file:///");
    }

    #[test]
    fn savepoint_targets_in_service_are_checked_where_they_are_written() {
        let text = |targets: &str| {
            format!(
                "[service]\nhttp = \"127.0.0.1:9464\"\n{targets}\n\n[sources.g]\ntype = \"generator\"\n\n[sinks.o]\ntype = \"stdout\"\ninputs = [\"g\"]\n"
            )
        };
        let good = crate::Topology::parse_str(
            "t.toml",
            &text(r#"savepoint_targets = ["s3://backups/clicks", "file:///var/lib/millrace/sp"]"#),
        )
        .expect("valid");
        assert_eq!(
            good.service.savepoint_targets,
            vec![t("s3://backups/clicks"), t("file:///var/lib/millrace/sp")]
        );
        let none = crate::Topology::parse_str("t.toml", &text("")).expect("valid");
        assert!(none.service.savepoint_targets.is_empty());
        let bad = crate::Topology::parse_str(
            "t.toml",
            &text(r#"savepoint_targets = ["s3://backups/clicks", "file:///var/../etc"]"#),
        )
        .expect_err("a `..` target");
        assert_eq!(bad.line(), Some(3), "{bad}");
        assert_eq!(bad.key(), Some("service.savepoint_targets"), "{bad}");
        assert!(bad.to_string().starts_with("t.toml:3: "), "{bad}");
        assert!(bad.to_string().contains("`..` is not allowed"), "{bad}");
        let typo = crate::Topology::parse_str("t.toml", &text(r#"savepoint_target = ["s3://b"]"#))
            .expect_err("unknown key");
        assert!(typo.to_string().contains("savepoint_target"), "{typo}");
    }
}
