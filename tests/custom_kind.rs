//! A user's own binary registers a kind and runs a topology that uses it.

mod support;

use std::process::Command;
use support::*;

#[test]
fn a_custom_kind_runs_in_a_users_binary() {
    let root = env!("CARGO_MANIFEST_DIR");
    // The same targets `make test` builds first, in the environment it
    // builds them in: ring's build script reruns when a `CARGO_*` variable
    // that cargo sets for a test (CARGO_PKG_NAME, CARGO_MANIFEST_DIR, ...)
    // differs, and with it the TLS stack and everything above it was
    // rebuilt (49 s here, over 90 s in CI). What the caller set for every
    // build (where cargo lives and builds, incremental compilation: CI
    // turns it off, and a build with it on rebuilds the workspace) stays.
    let mut build = Command::new(env!("CARGO"));
    let kept = ["CARGO_HOME", "CARGO_TARGET_DIR", "CARGO_INCREMENTAL"];
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy().into_owned();
        if name.starts_with("CARGO_") && !kept.contains(&name.as_str()) {
            build.env_remove(name);
        }
    }
    let build = build
        .args(["build", "--bins", "--examples"])
        .current_dir(root)
        .status()
        .expect("cargo build --bins --examples");
    assert!(build.success());
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_millrace"))
        .parent()
        .expect("target dir")
        .join("examples/custom_kind");

    let s = Scratch::new();
    let topo = std::fs::read_to_string(format!("{root}/examples/custom_kind.toml"))
        .expect("example topology")
        .replace(
            "target/custom_kind/data",
            &s.path("data").display().to_string(),
        )
        .replace(
            "examples/wordcount/input.txt",
            &format!("{root}/examples/wordcount/input.txt"),
        );
    let file = s.write("custom.toml", &topo);
    let out = Command::new(exe)
        .args(["run", file.to_str().expect("path")])
        .env("MILLRACE_LOG", "warn")
        .output()
        .expect("run the example binary");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let text =
        std::fs::read_to_string(format!("{root}/examples/wordcount/input.txt")).expect("text");
    let mut expected: Vec<String> = Vec::new();
    for w in text
        .split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
    {
        if !expected.contains(&w) {
            expected.push(w);
        }
    }
    let got: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_once('\t').expect("key<TAB>value").1.to_owned())
        .collect();
    assert_eq!(got, expected);
}
