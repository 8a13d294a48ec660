//! Thread-per-core shards on simulated devices (one `SimDevice` per
//! region): volumes on every shard served at once by several caller
//! threads, checked against an in-memory model; the fan-out requests
//! (ListVolumes, Space, Flush); a crash of every region after a flush;
//! clones placed on their origin's shard; and
//! the errors that opening a pool with a bad region gives.
//! Seed printed; replay with `SLUICE_SEED=<n>`.

// Tests may panic: the engine's no-panic lints (engine/Cargo.toml) are for
// production code; clippy.toml covers #[test] functions, this the helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use sluice_engine::api::*;
use sluice_engine::device::sim::{CrashMode, SimDevice, SimHandle};
use sluice_engine::device::AlignedBuf;
use sluice_engine::shard::{Engine, EngineHandle, EngineOptions};
use sluice_engine::sharded::{format_sharded, open_sharded, shard_of};
use sluice_engine::{Error, FormatOptions, Pool};
use std::collections::HashMap;
use std::time::Duration;

mod common;
use common::Rng;

/// Blocks in each region (sparse: costs only what is written).
const REGION_BLOCKS: u64 = 1 << 15;
/// Blocks in each test volume.
const VOL_BLOCKS: u64 = 256;
const OPS_PER_THREAD: usize = 150;

fn block(v: u64) -> AlignedBuf {
    let mut b = AlignedBuf::zeroed(1);
    for (i, c) in b.as_mut_slice().chunks_mut(8).enumerate() {
        c.copy_from_slice(&(v.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i as u64).to_le_bytes());
    }
    b
}

type Img = HashMap<u64, u64>; // lba -> content value

/// What one caller thread did to its volume.
#[derive(Debug, Default, Clone)]
struct Model {
    live: Img,
    /// Oldest first.
    snaps: Vec<(String, Img)>,
}

fn sims(n: usize) -> (Vec<SimDevice>, Vec<SimHandle>) {
    let devs: Vec<SimDevice> = (0..n).map(|_| SimDevice::new(REGION_BLOCKS)).collect();
    let handles = devs.iter().map(|d| d.handle()).collect();
    (devs, handles)
}

/// Volume names such that every shard owns `per_shard` of them.
fn names_on_every_shard(n: usize, per_shard: usize) -> Vec<String> {
    let mut count = vec![0usize; n];
    let mut out = Vec::new();
    for k in 0.. {
        let name = format!("vol{k}");
        let s = shard_of(&name, n);
        if count[s] < per_shard {
            count[s] += 1;
            out.push(name);
        }
        if count.iter().all(|&c| c == per_shard) {
            break;
        }
    }
    out
}

fn read_one(h: &EngineHandle, volume: &str, snapshot: Option<&str>, lba: u64) -> Vec<u8> {
    let r = h.call(Request::Read {
        image: Image {
            ns: NsName::volume(volume),
            snapshot: snapshot.map(str::to_string),
        },
        lba,
        len_blocks: 1,
    });
    match r {
        Ok(Reply::Data(b)) => b.as_slice().to_vec(),
        other => panic!("{volume}@{snapshot:?} lba {lba}: want data, got {other:?}"),
    }
}

fn want(img: &Img, lba: u64) -> Vec<u8> {
    img.get(&lba)
        .map(|&v| block(v).as_slice().to_vec())
        .unwrap_or_else(|| vec![0u8; 4096])
}

/// One caller thread: random writes (some pipelined), trims, reads,
/// snapshot creates and deletes on its own volume, checked as it goes.
fn drive(h: EngineHandle, volume: String, seed: u64) -> Model {
    let mut rng = Rng::new(seed);
    let mut m = Model::default();
    let mut snap_no = 0;
    for op in 0..OPS_PER_THREAD {
        match rng.below(10) {
            0..=3 => {
                // A burst of pipelined writes through one reply channel.
                let (tx, rx) = crossbeam_channel::unbounded();
                let burst = 1 + rng.below(8);
                for i in 0..burst {
                    let lba = rng.below(VOL_BLOCKS);
                    let v = rng.next();
                    m.live.insert(lba, v);
                    h.submit(
                        Request::Write {
                            ns: NsName::volume(&volume),
                            lba,
                            data: block(v),
                            fua: rng.below(20) == 0,
                            replica: false,
                        },
                        i,
                        tx.clone(),
                    );
                }
                for _ in 0..burst {
                    let (_, r) = rx.recv().expect("reply");
                    assert!(matches!(r, Ok(Reply::Done)), "seed {seed} op {op}: {r:?}");
                }
            }
            4 => {
                let lba = rng.below(VOL_BLOCKS - 4);
                let len = 1 + rng.below(4);
                h.call(Request::Trim {
                    ns: NsName::volume(&volume),
                    lba,
                    len_blocks: len,
                    replica: false,
                })
                .expect("trim");
                for l in lba..lba + len {
                    m.live.remove(&l);
                }
            }
            5 | 6 => {
                let lba = rng.below(VOL_BLOCKS);
                assert_eq!(
                    read_one(&h, &volume, None, lba),
                    want(&m.live, lba),
                    "seed {seed} op {op}: {volume} lba {lba}"
                );
            }
            7 => {
                snap_no += 1;
                let name = format!("s{snap_no}");
                let r = h.call(Request::CreateSnapshot {
                    volume: volume.clone(),
                    name: name.clone(),
                    id: None,
                    created_unix_ms: None,
                });
                assert!(matches!(r, Ok(Reply::Snapshot(_))), "seed {seed}: {r:?}");
                m.snaps.push((name, m.live.clone()));
            }
            8 if !m.snaps.is_empty() => {
                let i = rng.below(m.snaps.len() as u64) as usize;
                let (name, _) = m.snaps.remove(i);
                h.call(Request::DeleteSnapshot {
                    volume: volume.clone(),
                    name,
                })
                .expect("delete snapshot");
            }
            _ if !m.snaps.is_empty() => {
                let i = rng.below(m.snaps.len() as u64) as usize;
                let lba = rng.below(VOL_BLOCKS);
                let (name, img) = &m.snaps[i];
                assert_eq!(
                    read_one(&h, &volume, Some(name), lba),
                    want(img, lba),
                    "seed {seed} op {op}: {volume}@{name} lba {lba}"
                );
            }
            _ => {}
        }
    }
    // Snapshots listed are exactly the model's, oldest first.
    match h.call(Request::ListSnapshots {
        volume: volume.clone(),
    }) {
        Ok(Reply::Snapshots(list)) => {
            let names: Vec<&str> = list.iter().map(|s| s.name.as_str()).collect();
            let model: Vec<&str> = m.snaps.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names, model, "seed {seed}: {volume}");
        }
        other => panic!("list snapshots: {other:?}"),
    }
    m
}

fn check_pool_image(pool: &mut Pool<SimDevice>, volume: &str, m: &Model, seed: u64) {
    let images = std::iter::once((None, &m.live))
        .chain(m.snaps.iter().map(|(n, img)| (Some(n.clone()), img)));
    for (snapshot, img) in images {
        let r = pool.execute(Request::Read {
            image: Image {
                ns: NsName::volume(volume),
                snapshot: snapshot.clone(),
            },
            lba: 0,
            len_blocks: VOL_BLOCKS as u32,
        });
        let Ok(Reply::Data(buf)) = r else {
            panic!("seed {seed}: read {volume}@{snapshot:?}: {r:?}")
        };
        for lba in 0..VOL_BLOCKS {
            assert!(
                buf.block(lba as usize) == &want(img, lba)[..],
                "seed {seed}: after the crash {volume}@{snapshot:?} lba {lba} differs"
            );
        }
    }
}

fn space(h: &EngineHandle) -> SpaceInfo {
    match h.call(Request::Space) {
        Ok(Reply::Space(s)) => s,
        other => panic!("space: {other:?}"),
    }
}

fn sharded_engine(n: usize) {
    let seed = sluice_testkit::seed("sharded_engine");
    let (devs, handles) = sims(n);
    let pools = format_sharded(devs, FormatOptions::default()).expect("format");
    let h = Engine::start_sharded(
        pools,
        EngineOptions {
            cp_interval: Duration::from_secs(3600),
            batch_max: 16,
            ..EngineOptions::default()
        },
    )
    .expect("start");
    assert_eq!(h.shard_count(), n);

    let names = names_on_every_shard(n, 2);
    for name in &names {
        let r = h.call(Request::CreateVolume {
            name: name.clone(),
            size_bytes: VOL_BLOCKS * 4096,
        });
        assert!(matches!(r, Ok(Reply::Volume(_))), "create {name}: {r:?}");
    }
    // The one shard that owns a name refuses it twice.
    for name in &names {
        let r = h.call(Request::CreateVolume {
            name: name.clone(),
            size_bytes: VOL_BLOCKS * 4096,
        });
        assert!(
            matches!(r, Err(Error::AlreadyExists { .. })),
            "duplicate {name}: {r:?}"
        );
    }

    let threads: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let (h, name) = (h.clone(), name.clone());
            let s = seed ^ (i as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D);
            std::thread::spawn(move || (name.clone(), drive(h, name, s)))
        })
        .collect();
    let models: Vec<(String, Model)> = threads
        .into_iter()
        .map(|t| t.join().expect("caller thread"))
        .collect();

    // ListVolumes: every volume once, sorted, ids unique and telling the shard.
    let vols = match h.call(Request::ListVolumes) {
        Ok(Reply::Volumes(v)) => v,
        other => panic!("list: {other:?}"),
    };
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(
        vols.iter().map(|v| v.name.clone()).collect::<Vec<_>>(),
        sorted
    );
    let mut ids: Vec<u32> = vols.iter().map(|v| v.id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), vols.len(), "volume ids unique across shards");
    for v in &vols {
        assert_eq!(
            v.id as usize % n,
            shard_of(&v.name, n),
            "id {} of {}",
            v.id,
            v.name
        );
    }

    h.call(Request::Flush).expect("flush");
    let total = space(&h);
    assert_eq!(total.total_blocks, n as u64 * REGION_BLOCKS);
    assert_eq!(total.pending_free_blocks, 0, "the flush CP freed them");

    // Power cut on every region now: only what is durable survives.
    let crashed: Vec<SimDevice> = handles
        .iter()
        .map(|s| s.crash_image(CrashMode::DropAll, seed))
        .collect();
    h.shutdown().expect("shutdown");

    let mut pools = open_sharded(crashed).expect("reopen after the crash");
    // Space of the engine = the sum of its regions'.
    let mut sum = (0, 0, 0);
    for p in &mut pools {
        p.check_invariants().expect("invariants");
        match p.execute(Request::Space) {
            Ok(Reply::Space(s)) => {
                sum.0 += s.total_blocks;
                sum.1 += s.used_blocks;
                sum.2 += s.free_blocks;
            }
            other => panic!("space: {other:?}"),
        }
    }
    assert_eq!(
        sum,
        (total.total_blocks, total.used_blocks, total.free_blocks),
        "seed {seed}"
    );
    for (name, m) in &models {
        let s = shard_of(name, n);
        check_pool_image(&mut pools[s], name, m, seed);
        // The volume is on its own shard only.
        for (i, p) in pools.iter_mut().enumerate().filter(|(i, _)| *i != s) {
            let r = p.execute(Request::ListSnapshots {
                volume: name.clone(),
            });
            assert!(
                matches!(r, Err(Error::NoSuchVolume(_))),
                "{name} on shard {i}: {r:?}"
            );
        }
    }

    // And through a new engine on the reopened regions.
    let h = Engine::start_sharded(pools, EngineOptions::default()).expect("restart");
    for (name, m) in &models {
        for (&lba, &v) in m.live.iter().take(8) {
            assert_eq!(
                read_one(&h, name, None, lba),
                block(v).as_slice(),
                "seed {seed}"
            );
        }
    }
    assert_eq!(space(&h).total_blocks, total.total_blocks);
    h.shutdown().expect("shutdown");
}

#[test]
fn two_shards_model() {
    sharded_engine(2);
}

#[test]
fn three_shards_model() {
    sharded_engine(3);
}

/// Attributes live on shard 0; fan-out replies come once per request also
/// when many are in flight through one channel.
#[test]
fn attrs_and_fan_out_in_flight() {
    let (devs, _) = sims(3);
    let h = Engine::start_sharded(
        format_sharded(devs, FormatOptions::default()).expect("format"),
        EngineOptions::default(),
    )
    .expect("start");
    h.call(Request::SetAttr {
        key: "k".into(),
        value: Some(b"v".to_vec()),
    })
    .expect("set");
    assert!(matches!(
        h.call(Request::GetAttr { key: "k".into() }),
        Ok(Reply::Attr(Some(v))) if v == b"v"
    ));
    let (tx, rx) = crossbeam_channel::unbounded();
    for tag in 0..60u64 {
        let req = match tag % 3 {
            0 => Request::Flush,
            1 => Request::Space,
            _ => Request::ListVolumes,
        };
        h.submit(req, tag, tx.clone());
    }
    let mut seen = [false; 60];
    for _ in 0..60 {
        let (tag, r) = rx.recv().expect("reply");
        assert!(r.is_ok(), "tag {tag}: {r:?}");
        assert!(
            !std::mem::replace(&mut seen[tag as usize], true),
            "tag {tag} twice"
        );
    }
    assert!(rx.try_recv().is_err(), "one reply per request");
    h.shutdown().expect("shutdown");
    // After shutdown a fan-out still gets exactly one reply.
    h.submit(Request::Space, 7, tx);
    assert!(matches!(rx.recv(), Ok((7, Err(Error::ShutDown)))));
    assert!(rx.try_recv().is_err());
}

// --- Opening a pool with a bad region ---

/// A clone lives on its origin's shard whatever shard its name hashes to:
/// reads and writes reach it there, its name is taken on every shard (a
/// create or clone of the same name is refused wherever it would go), a
/// restart finds it again, and once deleted its name is free.
#[test]
fn a_clone_lives_on_its_origins_shard() {
    let n = 3;
    let (devs, handles) = sims(n);
    let pools = format_sharded(devs, FormatOptions::default()).expect("format");
    let h = Engine::start_sharded(pools, EngineOptions::default()).expect("start");
    let origin = "vol0";
    let at = shard_of(origin, n);
    // A clone name for each other shard, and one for the origin's own.
    let names: Vec<String> = (0..n)
        .map(|want| {
            (0..)
                .map(|k| format!("clone{k}"))
                .find(|c| shard_of(c, n) == want)
                .unwrap()
        })
        .collect();
    h.call(Request::CreateVolume {
        name: origin.into(),
        size_bytes: VOL_BLOCKS * 4096,
    })
    .unwrap();
    h.call(Request::Write {
        ns: NsName::volume(origin),
        lba: 7,
        data: block(70),
        fua: false,
        replica: false,
    })
    .unwrap();
    h.call(Request::CreateSnapshot {
        volume: origin.into(),
        name: "s".into(),
        id: None,
        created_unix_ms: None,
    })
    .unwrap();
    for (i, c) in names.iter().enumerate() {
        let r = h.call(Request::CloneVolume {
            origin: origin.into(),
            snapshot: "s".into(),
            name: c.clone(),
        });
        assert!(
            matches!(r, Ok(Reply::Volume(_))),
            "clone {c} (hashes to shard {i}): {r:?}"
        );
        assert_eq!(read_one(&h, c, None, 7), block(70).as_slice(), "{c}");
        h.call(Request::Write {
            ns: NsName::volume(c),
            lba: 8,
            data: block(80 + i as u64),
            fua: false,
            replica: false,
        })
        .unwrap();
        // The name is taken everywhere: as a new volume, and as a clone.
        let r = h.call(Request::CreateVolume {
            name: c.clone(),
            size_bytes: 4096,
        });
        assert!(
            matches!(r, Err(Error::AlreadyExists { .. })),
            "create {c}: {r:?}"
        );
        let r = h.call(Request::CloneVolume {
            origin: origin.into(),
            snapshot: "s".into(),
            name: c.clone(),
        });
        assert!(
            matches!(r, Err(Error::AlreadyExists { .. })),
            "clone {c} again: {r:?}"
        );
    }
    // A clone may not take the name of a volume on another shard.
    let other = (0..)
        .map(|k| format!("plain{k}"))
        .find(|c| shard_of(c, n) != at)
        .unwrap();
    h.call(Request::CreateVolume {
        name: other.clone(),
        size_bytes: 4096,
    })
    .unwrap();
    let r = h.call(Request::CloneVolume {
        origin: origin.into(),
        snapshot: "s".into(),
        name: other.clone(),
    });
    assert!(
        matches!(r, Err(Error::AlreadyExists { .. })),
        "clone onto {other}: {r:?}"
    );
    let Ok(Reply::Volumes(vols)) = h.call(Request::ListVolumes) else {
        panic!("list")
    };
    let listed: Vec<&str> = vols.iter().map(|v| v.name.as_str()).collect();
    for c in &names {
        assert_eq!(
            listed.iter().filter(|&&x| x == c).count(),
            1,
            "{c} in {listed:?}"
        );
    }
    h.call(Request::CheckInvariants).expect("invariants");
    h.call(Request::Flush).unwrap();
    h.shutdown().unwrap();

    // A restart finds every clone on the origin's shard.
    let devs: Vec<SimDevice> = handles
        .iter()
        .map(|s| s.crash_image(CrashMode::DropAll, 0))
        .collect();
    let h = Engine::start_sharded(
        open_sharded(devs).expect("reopen"),
        EngineOptions::default(),
    )
    .expect("restart");
    for (i, c) in names.iter().enumerate() {
        assert_eq!(read_one(&h, c, None, 7), block(70).as_slice(), "{c}");
        assert_eq!(
            read_one(&h, c, None, 8),
            block(80 + i as u64).as_slice(),
            "{c}"
        );
        let r = h.call(Request::CreateVolume {
            name: c.clone(),
            size_bytes: 4096,
        });
        assert!(
            matches!(r, Err(Error::AlreadyExists { .. })),
            "after restart, create {c}: {r:?}"
        );
    }
    let r = h.call(Request::DeleteSnapshot {
        volume: origin.into(),
        name: "s".into(),
    });
    assert!(matches!(r, Err(Error::HasClones { .. })), "{r:?}");
    // Deleted, a clone's name is free again, on its own shard.
    for c in &names {
        h.call(Request::DeleteVolume { name: c.clone() }).unwrap();
        h.call(Request::CreateVolume {
            name: c.clone(),
            size_bytes: VOL_BLOCKS * 4096,
        })
        .unwrap_or_else(|e| panic!("create {c} after its clone went: {e}"));
        assert_eq!(
            read_one(&h, c, None, 7),
            vec![0u8; 4096],
            "{c} is a new volume"
        );
    }
    h.call(Request::DeleteSnapshot {
        volume: origin.into(),
        name: "s".into(),
    })
    .unwrap();
    h.call(Request::CheckInvariants).expect("invariants");
    h.shutdown().unwrap();
}

fn formatted(n: usize) -> (Vec<SimDevice>, Vec<SimHandle>) {
    let (devs, handles) = sims(n);
    let pools = format_sharded(devs, FormatOptions::default()).expect("format");
    (pools.into_iter().map(Pool::into_device).collect(), handles)
}

fn open_err(devs: Vec<SimDevice>) -> Error {
    match open_sharded(devs) {
        Ok(_) => panic!("opened a pool with a bad region"),
        Err(e) => e,
    }
}

#[test]
fn region_count_mismatch_names_the_region() {
    let (mut devs, _) = formatted(3);
    devs.pop();
    let e = open_err(devs);
    assert!(matches!(e, Error::RegionMismatch { index: 2, .. }), "{e:?}");
    assert!(e.to_string().contains("region 2"), "{e}");
    assert!(e.to_string().contains("missing"), "{e}");

    let (mut devs, _) = formatted(2);
    devs.push(SimDevice::new(REGION_BLOCKS));
    let e = open_err(devs);
    assert!(matches!(e, Error::RegionMismatch { index: 2, .. }), "{e:?}");

    // A region given in the wrong place.
    let (mut devs, _) = formatted(2);
    devs.swap(0, 1);
    let e = open_err(devs);
    assert!(matches!(e, Error::RegionMismatch { index: 0, .. }), "{e:?}");
}

#[test]
fn missing_or_corrupt_region_superblock_names_the_region() {
    // Never formatted: no superblock at all.
    let (mut devs, _) = formatted(3);
    devs[1] = SimDevice::new(REGION_BLOCKS);
    let e = open_err(devs);
    match &e {
        Error::Region {
            index: 1,
            count: 3,
            source,
        } => assert!(matches!(**source, Error::NotAPool), "{source:?}"),
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().contains("region 1 of 3"), "{e}");

    // Both superblock slots of region 2 corrupt.
    let (devs, handles) = formatted(3);
    handles[2].flip_bit(0, 200 * 8);
    handles[2].flip_bit(1, 200 * 8);
    let e = open_err(devs);
    match &e {
        Error::Region {
            index: 2, source, ..
        } => assert!(
            matches!(**source, Error::CorruptSuperblock { .. }),
            "{source:?}"
        ),
        other => panic!("{other:?}"),
    }

    // Region 0 corrupt: nothing tells the layout; still an error, no panic.
    let (devs, handles) = formatted(2);
    handles[0].flip_bit(0, 300 * 8);
    handles[0].flip_bit(1, 300 * 8);
    let e = open_err(devs);
    assert!(matches!(e, Error::Region { index: 0, .. }), "{e:?}");
}

#[test]
fn region_of_another_pool_names_the_region() {
    let (mut a, _) = formatted(2);
    let (mut b, _) = formatted(2);
    a[1] = b.remove(1);
    let e = open_err(a);
    assert!(matches!(e, Error::RegionMismatch { index: 1, .. }), "{e:?}");
    assert!(e.to_string().contains("belongs to pool"), "{e}");

    // A region of a 3-shard pool among those of a 2-shard pool.
    let (mut a, _) = formatted(2);
    let (mut c, _) = formatted(3);
    a[1] = c.remove(1);
    let e = open_err(a);
    assert!(matches!(e, Error::RegionMismatch { index: 1, .. }), "{e:?}");
}

#[test]
fn a_region_alone_is_not_a_pool() {
    let (mut devs, _) = formatted(2);
    let e = Pool::open(devs.remove(0)).err().expect("refused");
    assert!(e.to_string().contains("2 shards"), "{e}");
    // Pools given to the engine out of order are refused, not misrouted.
    let (devs, _) = formatted(2);
    let mut pools = open_sharded(devs).expect("open");
    pools.swap(0, 1);
    assert!(matches!(
        Engine::start_sharded(pools, EngineOptions::default()),
        Err(Error::RegionMismatch { index: 0, .. })
    ));
}

/// Pools formatted before sharding have version-1 superblocks (no shard
/// fields): they open unchanged as shard 0 of 1, through `Pool::open` and
/// through the sharded path the daemon uses, and their next CP (the first
/// after a change) writes the current version.
#[test]
fn version_1_pool_opens_as_one_shard() {
    use sluice_engine::format::FORMAT_VERSION;
    use sluice_engine::sharded::read_layout;

    let dev = SimDevice::new(REGION_BLOCKS);
    let sim = dev.handle();
    let mut pool = Pool::format(dev, FormatOptions::default()).expect("format");
    pool.execute(Request::CreateVolume {
        name: "old".into(),
        size_bytes: VOL_BLOCKS * 4096,
    })
    .expect("volume");
    pool.execute(Request::Write {
        ns: NsName::volume("old"),
        lba: 3,
        data: block(77),
        fua: true,
        replica: false,
    })
    .expect("write");
    let mut dev = pool.into_device();
    // As version 1 wrote it: version 1, nothing after volumes_max (bytes
    // 68..), and a catalog without namespace flags.
    common::downgrade(&mut dev, &sim, 1);
    let mut pool = Pool::open(dev).expect("a version-1 pool opens");
    assert_eq!(pool.shard(), (0, 1));
    let read = |p: &mut Pool<SimDevice>| match p.execute(Request::Read {
        image: Image {
            ns: NsName::volume("old"),
            snapshot: None,
        },
        lba: 3,
        len_blocks: 1,
    }) {
        Ok(Reply::Data(b)) => b.as_slice().to_vec(),
        other => panic!("read: {other:?}"),
    };
    assert_eq!(read(&mut pool), block(77).as_slice());
    let dev = pool.into_device();

    let (layout, dev) = read_layout(dev).expect("layout of a version-1 pool");
    assert_eq!(
        (layout.shard_count, layout.region_blocks),
        (1, REGION_BLOCKS)
    );
    let mut pools = open_sharded(vec![dev]).expect("sharded open of a version-1 pool");
    let mut pool = pools.pop().expect("one shard");
    match pool.execute(Request::ListVolumes) {
        Ok(Reply::Volumes(v)) => assert_eq!(v[0].id, 1, "ids unchanged with one shard"),
        other => panic!("list: {other:?}"),
    }
    // A CP runs only when something changed: write, then CP.
    pool.execute(Request::Write {
        ns: NsName::volume("old"),
        lba: 4,
        data: block(78),
        fua: false,
        replica: false,
    })
    .expect("write");
    pool.checkpoint().expect("cp");
    let slot = pool.generation() % 2;
    assert_eq!(sim.read_durable(slot)[8..12], FORMAT_VERSION.to_le_bytes());
    assert_eq!(read(&mut pool), block(77).as_slice());
}

/// Story: formatting N regions over a device that held an older pool, a
/// crash (here: a failed write) in the middle must not leave the older
/// pool's superblock in place, because the regions formatted so far have
/// already overwritten its blocks. Format unmakes region 0 first.
#[test]
fn a_failed_format_leaves_no_pool_behind() {
    use sluice_engine::device::sim::Fault;
    let old = SimDevice::new(REGION_BLOCKS);
    let old_sim = old.handle();
    drop(Pool::format(old, FormatOptions::default()).expect("older pool"));
    let old = old_sim.crash_image(CrashMode::KeepAll, 0);
    let old_sim = old.handle();
    Pool::open(old_sim.crash_image(CrashMode::KeepAll, 0)).expect("the older pool is there");

    let second = SimDevice::new(REGION_BLOCKS);
    second.handle().inject(Fault::WriteEio { after: 0 });
    let e = format_sharded(vec![old, second], FormatOptions::default())
        .err()
        .expect("the format fails");
    assert!(matches!(e, Error::Region { index: 1, .. }), "{e:?}");
    let left = old_sim.crash_image(CrashMode::DropAll, 0);
    assert!(
        matches!(Pool::open(left), Err(Error::NotAPool)),
        "the older pool's superblock must be gone"
    );
}
