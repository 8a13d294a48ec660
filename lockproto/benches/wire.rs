//! Criterion benchmarks: encode / validate+decode a 1,000-lock set and an
//! extent header (the extent payload is borrowed, see tests/wire.rs).
// Tests and benchmarks may panic (the crate denies it elsewhere).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use sluice_lockproto::wire::{
    decode, encode, encode_into, ExtentHeader, Message, WireLock, WireLockSet, CHECKSUM_XXH3,
};

fn lockset() -> Message {
    let locks = (0..1000u32)
        .map(|i| WireLock {
            snapshot: [(i % 251) as u8; 16],
            kind: 2,
            text: format!("/vol/dst{i}"),
            origin_node: format!("node{}", i % 7),
            hop_path: vec!["c".into(), "b".into()],
            created_ms: u64::from(i),
            renewed_ms: u64::from(i),
            lease_ms: 60_000,
            dataset: format!("node{}/dst{i}", i % 7),
        })
        .collect();
    Message::LockSet(WireLockSet {
        sender: "b".into(),
        relationship: "dst".into(),
        volume: "src".into(),
        part: 0,
        parts: 1,
        generation: 7,
        lease_ms: 60_000,
        locks,
        gone_acks: vec![],
    })
}

fn bench(c: &mut Criterion) {
    let set = lockset();
    let frame = encode(&set, &[]).expect("encode");
    c.bench_function("lockset_1000_encode", |b| {
        let mut out = Vec::new();
        b.iter(|| encode_into(black_box(&set), 0, &mut out).expect("encode"))
    });
    c.bench_function("lockset_1000_validate_decode", |b| {
        b.iter(|| decode(black_box(&frame)).expect("decode"))
    });
    let ext = Message::Extent(ExtentHeader {
        req_id: 1,
        lba: 4096,
        len: 256,
        checksum_kind: CHECKSUM_XXH3,
        checksum: 0x1234,
    });
    let data = vec![0u8; 1 << 20];
    c.bench_function("extent_header_encode", |b| {
        let mut out = Vec::with_capacity(128);
        b.iter(|| encode_into(black_box(&ext), 1 << 20, &mut out).expect("encode"))
    });
    let mut buf = Vec::new();
    encode_into(&ext, 1 << 20, &mut buf).expect("encode");
    buf.extend_from_slice(&data);
    c.bench_function("extent_1MiB_validate_decode_borrowed", |b| {
        b.iter(|| {
            decode(black_box(&buf))
                .expect("decode")
                .map(|d| d.payload.len())
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
