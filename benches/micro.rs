//! Criterion micro-benchmarks of the hot paths: key encoding, the record
//! envelope, shard hashing and one commit.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use millrace::engine::{shard_of, Envelope};
use millrace_storage::{KeyWriter, Store, StoreOptions};

fn key_encoding(c: &mut Criterion) {
    c.bench_function("state key (component, shard, key)", |b| {
        b.iter(|| {
            KeyWriter::new()
                .str(black_box("counts"))
                .u32(black_box(7))
                .bytes(black_box(b"user-1234567"))
                .finish()
        })
    });
    c.bench_function("shard_of 12-byte key", |b| {
        b.iter(|| shard_of(black_box(b"user-1234567"), 64))
    });
}

fn envelope(c: &mut Criterion) {
    c.bench_function("envelope encode+decode", |b| {
        b.iter(|| {
            let e = Envelope::encode(black_box(b"user-1234567"), black_box(b"42"), 1, 2);
            black_box(e.record())
        })
    });
}

fn commit(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path(), &StoreOptions::default()).expect("store");
    let mut i = 0u64;
    c.bench_function("commit of 1000 state puts", |b| {
        b.iter(|| {
            let mut batch = store.batch();
            for _ in 0..1000 {
                i += 1;
                let k = KeyWriter::new()
                    .str("counts")
                    .u32(1)
                    .u64(i % 100_000)
                    .finish();
                batch.put_state(&k, Some(&i.to_le_bytes()));
            }
            store.commit(batch).expect("commit");
        })
    });
}

criterion_group!(benches, key_encoding, envelope, commit);
criterion_main!(benches);
