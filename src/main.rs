//! The `millrace` command: run, validate, graph and inspect topologies.

fn main() -> std::process::ExitCode {
    millrace::cli_main(millrace::builtins())
}
