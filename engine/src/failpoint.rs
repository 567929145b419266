//! Crash points for tests: with `MILLRACE_FAILPOINT=POINT:N` in its
//! environment, a worker aborts the process (as SIGKILL would: no drain, no
//! commit, no flush) the N-th time any executor reaches `POINT`, after
//! letting the other executors run on for 100 ms. Tests use
//! it to crash at exactly the moments where the order of effects matters,
//! instead of hoping a random SIGKILL lands there.
//!
//! The points of one turn of the commit loop, in order:
//!
//! | point | where |
//! | --- | --- |
//! | `source.sent` | a replayable source's productions were handed to their consumers, before its turn's commit |
//! | `sink.flushed` | a sink wrote and flushed what it was given (a sink that defers: found writes durable), before the commit that records them |
//! | `commit.before` | the turn's batch is built, before it is committed |
//! | `log.appended` | with a commit log: the turn's entries are durable in the log, before the batch is committed locally |
//! | `commit.after` | the batch is committed, before acknowledgements and sends go out |
//! | `release.after` | acknowledgements, productions and watermarks were handed over |
//! | `savepoint.shard` | `millrace savepoint` wrote one shard's file (before the worker's part and the manifest) |
//!
//! Only turns that commit something count. Without the variable each point
//! costs one atomic load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// A place in the commit loop where a test may crash the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Point {
    SourceSent,
    SinkFlushed,
    CommitBefore,
    LogAppended,
    CommitAfter,
    ReleaseAfter,
    SavepointShard,
}

impl Point {
    const ALL: [Point; 7] = [
        Point::SourceSent,
        Point::SinkFlushed,
        Point::CommitBefore,
        Point::LogAppended,
        Point::CommitAfter,
        Point::ReleaseAfter,
        Point::SavepointShard,
    ];

    fn name(self) -> &'static str {
        match self {
            Point::SourceSent => "source.sent",
            Point::SinkFlushed => "sink.flushed",
            Point::CommitBefore => "commit.before",
            Point::LogAppended => "log.appended",
            Point::CommitAfter => "commit.after",
            Point::ReleaseAfter => "release.after",
            Point::SavepointShard => "savepoint.shard",
        }
    }
}

/// How long the other executors run on between the failpoint and the abort.
const CRASH_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

/// The armed point and the hit that crashes, from the environment.
fn armed() -> Option<(Point, u64)> {
    static ARMED: OnceLock<Option<(Point, u64)>> = OnceLock::new();
    *ARMED.get_or_init(|| {
        let spec = std::env::var("MILLRACE_FAILPOINT").ok()?;
        let parsed = spec.split_once(':').and_then(|(name, n)| {
            let point = Point::ALL.into_iter().find(|p| p.name() == name)?;
            Some((point, n.parse::<u64>().ok().filter(|n| *n > 0)?))
        });
        if parsed.is_none() {
            tracing::error!(
                spec,
                "MILLRACE_FAILPOINT is not POINT:N with N >= 1 and POINT one of \
                 source.sent, sink.flushed, commit.before, commit.after, release.after, savepoint.shard; ignored"
            );
        }
        parsed
    })
}

/// Counts a pass through `point`; aborts the process on the armed hit.
#[inline]
pub(crate) fn hit(point: Point) {
    static HITS: AtomicU64 = AtomicU64::new(0);
    let Some((armed, n)) = armed() else { return };
    if armed == point && HITS.fetch_add(1, Ordering::SeqCst) + 1 == n {
        eprintln!("millrace: failpoint {}:{n} reached; aborting", point.name());
        // The other executors go on for a moment, as they would while this
        // one waited for a slow disk: whatever this thread handed out too
        // early is then acted on (acknowledged inputs committed away,
        // deliveries written) before the crash, so that a wrong order of
        // effects shows in the output instead of dying with the process.
        std::thread::sleep(CRASH_DELAY);
        std::process::abort();
    }
}
