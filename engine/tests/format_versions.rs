//! Pools written by older builds: a format-3 pool (from before clones)
//! opens with no clone, and its next consistency point writes the current
//! format, after which clones work and survive a reopen; a format-4 pool
//! (the catalog one blob) opens whole and its next consistency point writes
//! the catalog log. (Formats 1 and 2
//! are covered where their fields are: `shards.rs`, `qtree_read_only.rs`.)

// Tests may panic: the engine's no-panic lints (engine/Cargo.toml) are for
// production code; clippy.toml covers #[test] functions, this the helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use sluice_engine::api::*;
use sluice_engine::device::sim::SimDevice;
use sluice_engine::device::AlignedBuf;
use sluice_engine::format::FORMAT_VERSION;
use sluice_engine::{FormatOptions, Pool};

mod common;

fn read(pool: &mut Pool<SimDevice>, volume: &str, lba: u64) -> u8 {
    match pool.execute(Request::Read {
        image: Image {
            ns: NsName::volume(volume),
            snapshot: None,
        },
        lba,
        len_blocks: 1,
    }) {
        Ok(Reply::Data(b)) => b.as_slice()[0],
        other => panic!("read {volume} lba {lba}: {other:?}"),
    }
}

/// A new pool on `dev` with volume "vol" whose block `lba` holds `v`.
fn vol_with(dev: SimDevice, lba: u64, v: u8) -> Pool<SimDevice> {
    let mut pool = Pool::format(dev, FormatOptions::default()).unwrap();
    pool.execute(Request::CreateVolume {
        name: "vol".into(),
        size_bytes: 64 * 4096,
    })
    .unwrap();
    let mut b = AlignedBuf::zeroed(1);
    b.as_mut_slice().fill(v);
    pool.execute(Request::Write {
        ns: NsName::volume("vol"),
        lba,
        data: b,
        fua: false,
        replica: false,
    })
    .unwrap();
    pool
}

#[test]
fn a_format_3_pool_opens_and_takes_clones_after_its_next_checkpoint() {
    let dev = SimDevice::new(2048);
    let sim = dev.handle();
    let mut pool = vol_with(dev, 2, 5);
    pool.execute(Request::CreateSnapshot {
        volume: "vol".into(),
        name: "s".into(),
        id: None,
        created_unix_ms: None,
    })
    .unwrap();
    let mut dev = pool.into_device();
    common::downgrade(&mut dev, &sim, 3);
    let mut pool = Pool::open(dev).expect("a format-3 pool opens");
    pool.check_invariants().unwrap();
    let Ok(Reply::Volumes(vols)) = pool.execute(Request::ListVolumes) else {
        panic!("list")
    };
    assert!(vols.iter().all(|v| v.origin.is_none()));
    assert_eq!(read(&mut pool, "vol", 2), 5);
    pool.execute(Request::CloneVolume {
        origin: "vol".into(),
        snapshot: "s".into(),
        name: "c".into(),
    })
    .expect("clone");
    let slot = pool.generation() % 2;
    assert_eq!(sim.read_durable(slot)[8..12], FORMAT_VERSION.to_le_bytes());
    let mut pool = Pool::open(pool.into_device()).expect("reopen");
    pool.check_invariants().unwrap();
    assert_eq!(read(&mut pool, "c", 2), 5);
    let Ok(Reply::Volumes(vols)) = pool.execute(Request::ListVolumes) else {
        panic!("list")
    };
    let c = vols.iter().find(|v| v.name == "c").expect("the clone");
    assert_eq!(
        c.origin,
        Some(CloneOrigin {
            volume: "vol".into(),
            snapshot: "s".into()
        })
    );
}

/// A format-4 pool (one catalog blob rewritten whole at each CP) opens with
/// its volumes, snapshots and attributes; its next consistency point writes
/// the catalog as a format-5 log, which reopens the same; and the older
/// chain's block is free again.
#[test]
fn a_format_4_pool_opens_and_its_next_checkpoint_writes_the_catalog_log() {
    let dev = SimDevice::new(2048);
    let sim = dev.handle();
    let mut pool = vol_with(dev, 5, 9);
    for s in ["a", "b"] {
        pool.execute(Request::CreateSnapshot {
            volume: "vol".into(),
            name: s.into(),
            id: None,
            created_unix_ms: None,
        })
        .unwrap();
    }
    pool.execute(Request::SetAttr {
        key: "k".into(),
        value: Some(vec![3; 100]),
    })
    .unwrap();
    pool.execute(Request::Flush).unwrap();
    let names = |p: &mut Pool<SimDevice>| match p.execute(Request::ListSnapshots {
        volume: "vol".into(),
    }) {
        Ok(Reply::Snapshots(s)) => s.into_iter().map(|s| (s.name, s.id)).collect::<Vec<_>>(),
        other => panic!("list: {other:?}"),
    };
    let before = names(&mut pool);
    let mut dev = pool.into_device();
    common::downgrade(&mut dev, &sim, 4);
    let mut pool = Pool::open(dev).expect("a format-4 pool opens");
    pool.check_invariants().unwrap();
    assert_eq!(names(&mut pool), before);
    assert_eq!(read(&mut pool, "vol", 5), 9);
    assert!(matches!(
        pool.execute(Request::GetAttr { key: "k".into() }),
        Ok(Reply::Attr(Some(v))) if v == vec![3; 100]
    ));
    pool.execute(Request::DeleteSnapshot {
        volume: "vol".into(),
        name: "a".into(),
    })
    .unwrap();
    let slot = pool.generation() % 2;
    assert_eq!(sim.read_durable(slot)[8..12], FORMAT_VERSION.to_le_bytes());
    pool.check_invariants().unwrap();
    let mut pool = Pool::open(pool.into_device()).expect("reopen as format 5");
    pool.check_invariants().unwrap();
    assert_eq!(names(&mut pool), before[1..].to_vec());
    assert_eq!(read(&mut pool, "vol", 5), 9);
}
