//! Feeds arbitrary bytes to the cluster frame decoder, as a peer (or anyone
//! who reaches the port) could. It must return frames or errors, never panic,
//! and every frame it returns must encode back to the bytes it came from.
//! The input is tried twice: as it is (mostly caught by the length and
//! checksum), and wrapped in a valid header so that the kind and payload
//! parsers see it.
//!
//! The decoder's two source files are compiled here as they are, rather than
//! through the engine crate: the fuzz build then compiles a handful of crates
//! (the configuration crate for a limit, bytes, crc32fast) instead of the
//! engine's hundred (RocksDB's bindings, tokio, prometheus): 44 s instead of
//! 2 min 23 s on 2 cores. `crate::record` in `frame.rs` resolves to the
//! module below.
#![no_main]
#![allow(dead_code)]

#[path = "../../engine/src/record.rs"]
mod record;

#[path = "../../engine/src/net/frame.rs"]
mod frame;

use bytes::BytesMut;
use frame::Frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    decode_all(data);
    if !data.is_empty() {
        let mut framed = Vec::with_capacity(data.len() + 8);
        framed.extend_from_slice(&(data.len() as u32).to_be_bytes());
        framed.extend_from_slice(&crc32fast::hash(data).to_be_bytes());
        framed.extend_from_slice(data);
        decode_all(&framed);
    }
});

fn decode_all(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    let mut consumed = 0;
    loop {
        let before = buf.len();
        match Frame::decode(&mut buf) {
            Ok(Some(frame)) => {
                let mut again = BytesMut::new();
                frame.encode(&mut again);
                let used = before - buf.len();
                assert_eq!(&again[..], &data[consumed..consumed + used], "re-encoding differs");
                consumed += used;
            }
            Ok(None) | Err(_) => break,
        }
    }
}
