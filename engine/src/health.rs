//! Problems of the connectors to outside systems (a Kafka broker that cannot
//! be reached, a topic that does not exist), which `/healthz` reports while
//! the worker retries. A connector sets its problem when it finds one and
//! clears it once it works again; the worker keeps running in between.

use parking_lot::Mutex;
use std::collections::BTreeMap;

static PROBLEMS: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());

/// Reports that `what` (say, "kafka source `events`") is not working, and why.
pub fn report(what: &str, why: impl Into<String>) {
    PROBLEMS.lock().insert(what.to_owned(), why.into());
}

/// Says that `what` works again.
pub fn clear(what: &str) {
    PROBLEMS.lock().remove(what);
}

/// The problems now, as `(what, why)`, in name order.
pub fn problems() -> Vec<(String, String)> {
    PROBLEMS
        .lock()
        .iter()
        .map(|(a, b)| (a.clone(), b.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_problem_is_reported_until_cleared() {
        super::report("kafka source `t`", "broker 127.0.0.1:1 unreachable");
        assert!(super::problems()
            .iter()
            .any(|(w, why)| w == "kafka source `t`" && why.contains("unreachable")));
        super::clear("kafka source `t`");
        assert!(!super::problems()
            .iter()
            .any(|(w, _)| w == "kafka source `t`"));
    }
}
