//! Fault injection: EIO on reads, writes and flushes at each point of a
//! small workload (writes, trims, snapshots, a resize, a clone written and
//! deleted, and a rollback; clear errors; failed writes/CPs poison writes, reads keep
//! working, reopen recovers), and bit flips in every kind of block (clear
//! errors naming the block, never wrong data returned as good).

// Tests may panic: the engine's no-panic lints (engine/Cargo.toml) are for
// production code; clippy.toml covers #[test] functions, this the helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use sluice_engine::api::*;
use sluice_engine::device::sim::{Fault, SimDevice, SimHandle};
use sluice_engine::device::AlignedBuf;
use sluice_engine::{Error, FormatOptions, Pool};

const SIZE: u64 = 400;

fn block(v: u64) -> Vec<u8> {
    v.to_le_bytes().iter().copied().cycle().take(4096).collect()
}

fn write(pool: &mut Pool<SimDevice>, lba: u64, v: u64) -> sluice_engine::Result<Reply> {
    pool.execute(Request::Write {
        ns: NsName::volume("vol"),
        lba,
        data: AlignedBuf::from_slice(&block(v)),
        fua: false,
        replica: false,
    })
}

fn read(
    pool: &mut Pool<SimDevice>,
    lba: u64,
    snap: Option<&str>,
) -> sluice_engine::Result<Vec<u8>> {
    match pool.execute(Request::Read {
        image: Image {
            ns: NsName::volume("vol"),
            snapshot: snap.map(|s| s.to_string()),
        },
        lba,
        len_blocks: 1,
    })? {
        Reply::Data(b) => Ok(b.as_slice().to_vec()),
        _ => panic!("not data"),
    }
}

/// A pool with a volume, 200 durable blocks (value = lba + 1000) and a
/// snapshot `base`.
fn setup() -> (Pool<SimDevice>, SimHandle) {
    let dev = SimDevice::new(4096);
    let h = dev.handle();
    let mut pool = Pool::format(dev, FormatOptions::default()).unwrap();
    pool.execute(Request::CreateVolume {
        name: "vol".into(),
        size_bytes: SIZE * 4096,
    })
    .unwrap();
    for l in 0..200 {
        write(&mut pool, l, l + 1000).unwrap();
    }
    pool.execute(Request::CreateSnapshot {
        volume: "vol".into(),
        name: "base".into(),
        id: None,
        created_unix_ms: None,
    })
    .unwrap();
    (pool, h)
}

/// A small workload; returns the first error.
fn workload(pool: &mut Pool<SimDevice>) -> sluice_engine::Result<()> {
    for l in 0..20 {
        write(pool, l * 7 % SIZE, l + 5000)?;
    }
    pool.execute(Request::Trim {
        ns: NsName::volume("vol"),
        lba: 150,
        len_blocks: 10,
        replica: false,
    })?;
    pool.execute(Request::Flush)?;
    pool.execute(Request::CreateSnapshot {
        volume: "vol".into(),
        name: "s2".into(),
        id: None,
        created_unix_ms: None,
    })?;
    for l in 0..10 {
        read(pool, l, Some("base"))?;
    }
    // A grow and a shrink back (its map walk reads), then a rollback past
    // s2 (its delete walk reads, one CP writes).
    for blocks in [SIZE + 100, SIZE] {
        pool.execute(Request::ResizeVolume {
            name: "vol".into(),
            size_bytes: blocks * 4096,
            replica: false,
        })?;
    }
    write(pool, 3, 6000)?;
    // A clone of base, written, snapshotted and deleted (its delete walk
    // reads the origin's plane too).
    pool.execute(Request::CloneVolume {
        origin: "vol".into(),
        snapshot: "base".into(),
        name: "c".into(),
    })?;
    pool.execute(Request::Write {
        ns: NsName::volume("c"),
        lba: 5,
        data: AlignedBuf::from_slice(&block(7000)),
        fua: false,
        replica: false,
    })?;
    pool.execute(Request::CreateSnapshot {
        volume: "c".into(),
        name: "c1".into(),
        id: None,
        created_unix_ms: None,
    })?;
    pool.execute(Request::DeleteVolume { name: "c".into() })?;
    pool.execute(Request::Rollback {
        volume: "vol".into(),
        snapshot: "base".into(),
        destroy_newer: true,
    })?;
    pool.execute(Request::DeleteSnapshot {
        volume: "vol".into(),
        name: "base".into(),
    })?;
    pool.execute(Request::Flush)?;
    Ok(())
}

#[test]
fn eio_at_every_point() {
    let mut cases = 0;
    for kind in 0..3 {
        for after in 0..110u64 {
            let (pool, h) = setup();
            // Fresh cache so metadata reads reach the device too.
            let dev = pool.into_device();
            let mut pool = Pool::open(dev).unwrap();
            h.inject(match kind {
                0 => Fault::ReadEio { after },
                1 => Fault::WriteEio { after },
                _ => Fault::FlushEio { after },
            });
            let r = workload(&mut pool);
            cases += 1;
            if let Err(e) = &r {
                assert!(
                    matches!(e, Error::Io { .. } | Error::Poisoned { .. }),
                    "kind {kind} after {after}: unexpected error {e}"
                );
                if kind > 0 {
                    // A failed write or flush poisons writes; reads still work.
                    assert!(
                        pool.poisoned().is_some(),
                        "kind {kind} after {after}: not poisoned by {e}"
                    );
                    assert!(matches!(
                        write(&mut pool, 0, 1),
                        Err(Error::Poisoned { .. })
                    ));
                    h.clear_faults();
                    let got = read(&mut pool, 300, None).unwrap();
                    assert!(got.iter().all(|&b| b == 0));
                }
            }
            h.clear_faults();
            let dev = pool.into_device();
            let mut pool = Pool::open(dev)
                .unwrap_or_else(|e| panic!("kind {kind} after {after}: reopen failed: {e}"));
            pool.check_invariants()
                .unwrap_or_else(|e| panic!("kind {kind} after {after}: {e}"));
            // Durable snapshot content is intact when it still exists.
            if let Ok(b) = read(&mut pool, 42, Some("base")) {
                assert_eq!(b, block(1042));
            }
            // Writes work again after reopen.
            write(&mut pool, 399, 9).unwrap();
            pool.execute(Request::Flush).unwrap();
            pool.check_invariants().unwrap();
        }
    }
    println!("fault cases: {cases}");
}

/// Metadata blocks of `kind` on the device (current and stale ones).
fn blocks_of_kind(h: &SimHandle, kind: u16) -> Vec<u64> {
    (2..4096u64)
        .filter(|&p| {
            let b = h.read_live(p);
            b[0..4] == 0x534C_4D44u32.to_le_bytes() && u16::from_le_bytes([b[4], b[5]]) == kind
        })
        .collect()
}

fn reopened(pool: Pool<SimDevice>) -> sluice_engine::Result<Pool<SimDevice>> {
    Pool::open(pool.into_device())
}

#[test]
fn bit_flip_in_map_node_is_named() {
    let (pool, h) = setup();
    let maps = blocks_of_kind(&h, 1);
    assert!(!maps.is_empty());
    for &p in &maps {
        h.flip_bit(p, 8 * 100 + 3);
    }
    let mut pool = reopened(pool).unwrap();
    match read(&mut pool, 5, None) {
        Err(Error::CorruptMetadata { pba, kind, .. }) => {
            assert!(maps.contains(&pba));
            assert_eq!(kind, "map node");
        }
        other => panic!("expected CorruptMetadata, got {other:?}"),
    }
}

#[test]
fn bit_flip_in_plane_blocks_and_catalog_fail_mount_clearly() {
    for kind in [2u16, 3, 5] {
        let (pool, h) = setup();
        let blocks = blocks_of_kind(&h, kind);
        assert!(!blocks.is_empty(), "no blocks of kind {kind}");
        for &p in &blocks {
            h.flip_bit(p, 8 * 40 + 1);
        }
        match reopened(pool) {
            Err(Error::CorruptMetadata { pba, .. }) => {
                assert!(blocks.contains(&pba), "kind {kind}: wrong pba {pba}")
            }
            Err(e) => panic!("kind {kind}: unexpected error {e}"),
            Ok(_) => panic!("kind {kind}: corrupt metadata mounted"),
        }
    }
}

#[test]
fn bit_flip_in_superblocks() {
    let (pool, h) = setup();
    h.flip_bit(0, 100);
    h.flip_bit(1, 100);
    assert!(matches!(
        reopened(pool),
        Err(Error::CorruptSuperblock { .. })
    ));
    let dev = SimDevice::new(4096);
    assert!(matches!(Pool::open(dev), Err(Error::NotAPool)));
}

#[test]
fn bit_flip_in_data_block_is_a_checksum_error() {
    let (mut pool, h) = setup();
    // Find lba 7's block: the only block holding its pattern.
    let want = block(1007);
    let pba = (2..4096u64).find(|&p| h.read_live(p) == want).unwrap();
    h.flip_bit(pba, 12345);
    match read(&mut pool, 7, None) {
        Err(Error::DataChecksum { lba, pba: p, .. }) => {
            assert_eq!(lba, 7);
            assert_eq!(p, pba);
        }
        other => panic!("expected DataChecksum, got {other:?}"),
    }
    assert_eq!(read(&mut pool, 8, None).unwrap(), block(1008));
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let (mut pool, _h) = setup();
    let bad = [
        Request::CreateVolume {
            name: "".into(),
            size_bytes: 4096,
        },
        Request::CreateVolume {
            name: "a/b".into(),
            size_bytes: 4096,
        },
        Request::CreateVolume {
            name: "a@b".into(),
            size_bytes: 4096,
        },
        Request::CreateVolume {
            name: "x".repeat(65),
            size_bytes: 4096,
        },
        Request::CreateVolume {
            name: "ok".into(),
            size_bytes: 0,
        },
        Request::CreateVolume {
            name: "ok".into(),
            size_bytes: 4095,
        },
        Request::CreateVolume {
            name: "vol".into(),
            size_bytes: 4096,
        },
        Request::CreateQtree {
            volume: "nope".into(),
            name: "q".into(),
            size_bytes: 4096,
        },
        Request::Read {
            image: Image {
                ns: NsName::volume("vol"),
                snapshot: None,
            },
            lba: SIZE,
            len_blocks: 1,
        },
        Request::Read {
            image: Image {
                ns: NsName::volume("vol"),
                snapshot: Some("zz".into()),
            },
            lba: 0,
            len_blocks: 1,
        },
        Request::Trim {
            ns: NsName::qtree("vol", "nq"),
            lba: 0,
            len_blocks: 1,
            replica: false,
        },
        Request::DeleteSnapshot {
            volume: "vol".into(),
            name: "zz".into(),
        },
        Request::ResizeVolume {
            name: "vol".into(),
            size_bytes: 0,
            replica: false,
        },
        Request::ResizeVolume {
            name: "vol".into(),
            size_bytes: 4097,
            replica: false,
        },
        Request::ResizeVolume {
            name: "nope".into(),
            size_bytes: 4096,
            replica: false,
        },
        // Blocks 0..200 are mapped: no shrink to 100.
        Request::ResizeVolume {
            name: "vol".into(),
            size_bytes: 100 * 4096,
            replica: false,
        },
        Request::ResizeVolume {
            name: "vol".into(),
            size_bytes: u64::MAX - 4095,
            replica: false,
        },
        Request::Rollback {
            volume: "vol".into(),
            snapshot: "zz".into(),
            destroy_newer: true,
        },
        Request::Rollback {
            volume: "nope".into(),
            snapshot: "base".into(),
            destroy_newer: false,
        },
        Request::CreateSnapshot {
            volume: "vol".into(),
            name: "base".into(),
            id: None,
            created_unix_ms: None,
        },
        Request::CloneVolume {
            origin: "vol".into(),
            snapshot: "zz".into(),
            name: "c".into(),
        },
        Request::CloneVolume {
            origin: "nope".into(),
            snapshot: "base".into(),
            name: "c".into(),
        },
        Request::CloneVolume {
            origin: "vol".into(),
            snapshot: "base".into(),
            name: "vol".into(),
        },
        Request::CloneVolume {
            origin: "vol".into(),
            snapshot: "base".into(),
            name: "-c".into(),
        },
    ];
    for r in bad {
        let d = format!("{r:?}");
        assert!(pool.execute(r).is_err(), "accepted {d}");
    }
    pool.check_invariants().unwrap();
    assert_eq!(read(&mut pool, 3, None).unwrap(), block(1003));
    assert!(matches!(
        Pool::format(SimDevice::new(10), FormatOptions::default()),
        Err(Error::DeviceTooSmall { .. })
    ));
}

#[test]
fn pool_full_is_no_space_and_consistent() {
    let dev = SimDevice::new(600);
    let mut pool = Pool::format(dev, FormatOptions::default()).unwrap();
    pool.execute(Request::CreateVolume {
        name: "vol".into(),
        size_bytes: 2000 * 4096,
    })
    .unwrap();
    let mut written = 0;
    let mut hit = false;
    for l in 0..2000u64 {
        match write(&mut pool, l, l + 1) {
            Ok(_) => written += 1,
            Err(Error::NoSpace { .. }) => {
                hit = true;
                break;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(hit && written > 100);
    pool.check_invariants().unwrap();
    pool.execute(Request::Flush).unwrap();
    let mut pool = reopened(pool).unwrap();
    pool.check_invariants().unwrap();
    for l in 0..written {
        assert_eq!(read(&mut pool, l, None).unwrap(), block(l + 1));
    }
    // Trimming frees space again.
    pool.execute(Request::Trim {
        ns: NsName::volume("vol"),
        lba: 0,
        len_blocks: 100,
        replica: false,
    })
    .unwrap();
    pool.execute(Request::Flush).unwrap();
    write(&mut pool, 0, 77).unwrap();
    pool.check_invariants().unwrap();
}

#[test]
fn read_only_volume_refuses_client_writes() {
    let (mut pool, _h) = setup();
    pool.execute(Request::SetReadOnly {
        ns: NsName::volume("vol"),
        read_only: true,
    })
    .unwrap();
    assert!(matches!(
        write(&mut pool, 1, 1),
        Err(Error::ReadOnly { .. })
    ));
    pool.execute(Request::Write {
        ns: NsName::volume("vol"),
        lba: 1,
        data: AlignedBuf::from_slice(&block(3)),
        fua: false,
        replica: true,
    })
    .unwrap();
    assert_eq!(read(&mut pool, 1, None).unwrap(), block(3));
}
