//! Diff and snapshot cost do not grow with volume size: the metadata blocks
//! visited for k changed blocks, and the blocks written by a snapshot
//! create, are the same on a 1 GiB and a 1 TiB thin volume (sim devices of
//! matching size).

// Tests may panic: the engine's no-panic lints (engine/Cargo.toml) are for
// production code; clippy.toml covers #[test] functions, this the helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use sluice_engine::api::*;
use sluice_engine::device::sim::SimDevice;
use sluice_engine::device::AlignedBuf;
use sluice_engine::{FormatOptions, Pool};

struct Cost {
    diff_visited: u64,
    extents: Vec<DiffExtent>,
    snap_visited: u64,
    snap_written: u64,
}

fn measure(size_bytes: u64, k: u64) -> Cost {
    let blocks = size_bytes / 4096 + 4096;
    let mut pool = Pool::format(SimDevice::new(blocks), FormatOptions::default()).unwrap();
    pool.execute(Request::CreateVolume {
        name: "v".into(),
        size_bytes,
    })
    .unwrap();
    let ns = NsName::volume("v");
    // The same base content on both: 500 blocks spread over the first GiB.
    for i in 0..500u64 {
        let lba = i * 517;
        pool.execute(Request::Write {
            ns: ns.clone(),
            lba,
            data: AlignedBuf::zeroed(1),
            fua: false,
            replica: false,
        })
        .unwrap();
    }
    pool.execute(Request::CreateSnapshot {
        volume: "v".into(),
        name: "a".into(),
        id: None,
        created_unix_ms: Some(1),
    })
    .unwrap();
    for i in 0..k {
        let mut b = AlignedBuf::zeroed(1);
        b.block_mut(0)[0] = 1 + i as u8;
        pool.execute(Request::Write {
            ns: ns.clone(),
            lba: 1000 + i * 3001,
            data: b,
            fua: false,
            replica: false,
        })
        .unwrap();
    }
    let before = pool.stats();
    pool.execute(Request::CreateSnapshot {
        volume: "v".into(),
        name: "b".into(),
        id: None,
        created_unix_ms: Some(2),
    })
    .unwrap();
    let mid = pool.stats();
    let Reply::Diff(extents) = pool
        .execute(Request::Diff {
            ns,
            base: Some("a".into()),
            target: "b".into(),
        })
        .unwrap()
    else {
        panic!("not a diff")
    };
    let after = pool.stats();
    Cost {
        diff_visited: after.metadata_blocks_visited - mid.metadata_blocks_visited,
        extents,
        snap_visited: mid.metadata_blocks_visited - before.metadata_blocks_visited,
        snap_written: mid.metadata_blocks_written - before.metadata_blocks_written,
    }
}

#[test]
fn diff_and_snapshot_cost_do_not_grow_with_size() {
    for k in [1u64, 10, 50] {
        let small = measure(1 << 30, k);
        let big = measure(1 << 40, k);
        println!(
            "k={k}: diff visited {} (1 GiB) vs {} (1 TiB); snapshot visited {}/{} written {}/{}",
            small.diff_visited,
            big.diff_visited,
            small.snap_visited,
            big.snap_visited,
            small.snap_written,
            big.snap_written
        );
        assert_eq!(small.extents, big.extents);
        assert_eq!(small.extents.len() as u64, k);
        assert!(
            big.diff_visited <= small.diff_visited,
            "diff cost grew with size"
        );
        assert!(
            big.snap_visited <= small.snap_visited,
            "snapshot visits grew with size"
        );
        assert!(
            big.snap_written <= small.snap_written,
            "snapshot writes grew with size"
        );
    }
}
