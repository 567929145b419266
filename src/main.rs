//! The `millrace` command: run, validate, graph and inspect topologies.

/// mimalloc: the hot path allocates small, short-lived buffers (records,
/// envelopes, batches) from several threads, where it beats glibc's malloc.
/// Metered: each thread counts what it holds, so a script call that holds
/// more than its `max_memory_bytes` is stopped.
#[global_allocator]
static GLOBAL: millrace_computations::MeteredAlloc<mimalloc::MiMalloc> =
    millrace_computations::MeteredAlloc(mimalloc::MiMalloc);

fn main() -> std::process::ExitCode {
    millrace::cli_main(millrace::builtins())
}
