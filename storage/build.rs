//! Links the libraries that a static RocksDB needs.
//!
//! With `ROCKSDB_LIB_DIR` and `ROCKSDB_STATIC` set (the Makefile sets both),
//! `librocksdb-sys` links Debian's `librocksdb.a` instead of the shared
//! library. The archive does not say what it needs, so the compression
//! libraries Debian built it with are named here (lz4 and zstd come from the
//! `rocksdb` crate's own features). rustc puts the shared libraries that
//! crates ask for after every crate's code on the linker's command line, so
//! they resolve what the archive (inside `librocksdb-sys`) leaves undefined.
//!
//! Why static: RocksDB's thread-locals, reached through a shared library's
//! dynamic TLS (`__tls_get_addr` on every access), cost ~21% more
//! instructions in the raw RocksDB baseline of the benchmark and ~1.7% in P1.

fn main() {
    println!("cargo:rerun-if-env-changed=ROCKSDB_STATIC");
    println!("cargo:rerun-if-env-changed=ROCKSDB_LIB_DIR");
    let static_system_rocksdb = std::env::var_os("ROCKSDB_STATIC").is_some()
        && std::env::var_os("ROCKSDB_LIB_DIR").is_some();
    if static_system_rocksdb {
        for lib in ["snappy", "z", "bz2"] {
            println!("cargo:rustc-link-lib=dylib={lib}");
        }
    }
}
