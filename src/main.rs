//! The `millrace` command: run, validate, graph and inspect topologies.

/// mimalloc: the hot path allocates small, short-lived buffers (records,
/// envelopes, batches) from several threads, where it beats glibc's malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    millrace::cli_main(millrace::builtins())
}
