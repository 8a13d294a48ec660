//! Crash-point enumeration: a seeded workload is run once to count device
//! write/flush ops, then replayed with the device frozen after op N for
//! every N; each frozen device yields crash images (only durable writes,
//! all completed writes, and random torn/reordered subsets). Every image
//! must mount, hold every acknowledged-durable write (Flush, FUA, snapshot
//! create), read every snapshot as taken, and pass `check_invariants()`.
//! The workload also turns the qtree's read-only flag on and off (writes
//! to it are then the replicator's, `replica: true`); every image shows
//! the flag of the state it matches. Rollbacks (to the newest snapshot, or
//! past newer ones with `destroy_newer`) are part of the workload; a resize
//! and a rollback are also cut at every device op on their own
//! (`crash_inside_resize`, `crash_inside_rollback`): the image after
//! recovery is the one before or the one after, never between. So are a
//! clone's create, write, snapshot and delete (`crash_inside_clone`).
//! Seed printed; replay with `SLUICE_SEED=<n>`.

// Tests may panic: the engine's no-panic lints (engine/Cargo.toml) are for
// production code; clippy.toml covers #[test] functions, this the helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use sluice_engine::api::*;
use sluice_engine::device::sim::{CrashMode, SimDevice, SimHandle};
use sluice_engine::device::AlignedBuf;
use sluice_engine::{FormatOptions, Pool};
use std::collections::BTreeMap;

mod common;
use common::Rng;

const SIZE: u64 = 48;
type Img = BTreeMap<u64, u64>;

#[derive(Clone, Default)]
struct State {
    live: [Img; 2],
    snaps: BTreeMap<String, [Img; 2]>,
    /// Snapshot names, oldest first.
    order: Vec<String>,
    /// The qtree's read-only flag.
    q_ro: bool,
}

fn block(v: u64) -> Vec<u8> {
    v.to_le_bytes().iter().copied().cycle().take(4096).collect()
}

fn ns(i: usize) -> NsName {
    if i == 0 {
        NsName::volume("vol")
    } else {
        NsName::qtree("vol", "q")
    }
}

fn workload(seed: u64) -> Vec<Request> {
    let mut rng = Rng::new(seed);
    let mut reqs = Vec::new();
    let mut v = 1u64;
    let mut snaps: Vec<String> = Vec::new();
    let mut q_ro = false;
    for _ in 0..14 {
        let n = rng.below(2) as usize;
        // A read-only qtree takes only the replicator's writes.
        let replica = n == 1 && q_ro;
        match rng.below(11) {
            0..=4 => {
                let len = 1 + rng.below(3);
                let lba = rng.below(SIZE - len);
                let mut buf = AlignedBuf::zeroed(len as usize);
                for i in 0..len as usize {
                    v += 1;
                    buf.block_mut(i).copy_from_slice(&block(v));
                }
                reqs.push(Request::Write {
                    ns: ns(n),
                    lba,
                    data: buf,
                    fua: rng.below(4) == 0,
                    replica,
                });
            }
            5 => {
                let lba = rng.below(SIZE - 4);
                reqs.push(Request::Trim {
                    ns: ns(n),
                    lba,
                    len_blocks: 4,
                    replica,
                });
            }
            6 => reqs.push(Request::Flush),
            7 | 8 => {
                let name = format!("s{v}");
                v += 1;
                snaps.push(name.clone());
                reqs.push(Request::CreateSnapshot {
                    volume: "vol".into(),
                    name,
                    id: None,
                    created_unix_ms: Some(1),
                });
            }
            9 if !q_ro && !snaps.is_empty() && rng.below(2) == 0 => {
                // Roll back to the newest, or past newer ones (which go).
                let si = rng.below(snaps.len() as u64) as usize;
                let destroy_newer = si + 1 < snaps.len();
                let name = snaps[si].clone();
                snaps.truncate(si + 1);
                reqs.push(Request::Rollback {
                    volume: "vol".into(),
                    snapshot: name,
                    destroy_newer,
                });
            }
            9 => {
                if let Some(s) = snaps.pop() {
                    reqs.push(Request::DeleteSnapshot {
                        volume: "vol".into(),
                        name: s,
                    });
                }
            }
            _ => {
                q_ro = !q_ro;
                reqs.push(Request::SetReadOnly {
                    ns: ns(1),
                    read_only: q_ro,
                });
            }
        }
    }
    reqs
}

/// Apply a request to the model; true if its acknowledgement means durable.
fn apply(st: &mut State, r: &Request) -> bool {
    match r {
        Request::Write {
            ns, lba, data, fua, ..
        } => {
            let i = ns.qtree.is_some() as usize;
            for b in 0..data.len_blocks() {
                let v = u64::from_le_bytes(data.block(b)[..8].try_into().unwrap());
                st.live[i].insert(lba + b as u64, v);
            }
            *fua
        }
        Request::Trim {
            ns,
            lba,
            len_blocks,
            ..
        } => {
            let i = ns.qtree.is_some() as usize;
            for l in *lba..lba + len_blocks {
                st.live[i].remove(&l);
            }
            false
        }
        Request::Flush => true,
        Request::CreateSnapshot { name, .. } => {
            st.snaps.insert(name.clone(), st.live.clone());
            st.order.push(name.clone());
            true
        }
        Request::DeleteSnapshot { name, .. } => {
            st.snaps.remove(name);
            st.order.retain(|n| n != name);
            true
        }
        Request::Rollback { snapshot, .. } => {
            // (Also called on an empty state, only to ask about durability.)
            if let Some(at) = st.order.iter().position(|n| n == snapshot) {
                for n in st.order.split_off(at + 1) {
                    st.snaps.remove(&n);
                }
                st.live = st.snaps[snapshot].clone();
            }
            true
        }
        Request::SetReadOnly { read_only, .. } => {
            st.q_ro = *read_only;
            true
        }
        _ => false,
    }
}

fn setup() -> (Pool<SimDevice>, sluice_engine::device::sim::SimHandle) {
    let dev = SimDevice::new(1024);
    let h = dev.handle();
    let mut pool = Pool::format(dev, FormatOptions::default()).unwrap();
    pool.execute(Request::CreateVolume {
        name: "vol".into(),
        size_bytes: SIZE * 4096,
    })
    .unwrap();
    pool.execute(Request::CreateQtree {
        volume: "vol".into(),
        name: "q".into(),
        size_bytes: SIZE * 4096,
    })
    .unwrap();
    (pool, h)
}

/// The four crash images of a device frozen after op `n` (only durable
/// writes, all completed writes, two random torn/reordered subsets), each
/// mounted and past `check_invariants`.
fn crash_images(h: &SimHandle, seed: u64, n: u64) -> Vec<(CrashMode, Pool<SimDevice>)> {
    [
        (CrashMode::DropAll, 0),
        (CrashMode::KeepAll, 0),
        (CrashMode::Random, seed ^ n),
        (CrashMode::Random, seed ^ (n << 16)),
    ]
    .into_iter()
    .map(|(mode, s)| {
        let mut p = Pool::open(h.crash_image(mode, s))
            .unwrap_or_else(|e| panic!("seed {seed} op {n} {mode:?}: mount failed: {e}"));
        p.check_invariants()
            .unwrap_or_else(|e| panic!("seed {seed} op {n} {mode:?}: {e}"));
        (mode, p)
    })
    .collect()
}

fn read_img(pool: &mut Pool<SimDevice>, i: usize, snap: Option<String>) -> Img {
    read_ns(pool, ns(i), snap)
}

fn read_ns(pool: &mut Pool<SimDevice>, ns: NsName, snap: Option<String>) -> Img {
    let r = pool
        .execute(Request::Read {
            image: Image { ns, snapshot: snap },
            lba: 0,
            len_blocks: SIZE as u32,
        })
        .unwrap_or_else(|e| panic!("read after crash failed: {e}"));
    let Reply::Data(buf) = r else { panic!() };
    let mut m = Img::new();
    for l in 0..SIZE as usize {
        let b = buf.block(l);
        if b.iter().all(|&x| x == 0) {
            continue;
        }
        let v = u64::from_le_bytes(b[..8].try_into().unwrap());
        assert!(b == &block(v)[..], "garbage returned as good at lba {l}");
        m.insert(l as u64, v);
    }
    m
}

#[test]
fn crash_every_op_boundary() {
    let base = sluice_testkit::seed("crash_every_op_boundary");
    let mut images = 0u64;
    let mut w = 0u64;
    while images < 10_000 {
        let seed = base.wrapping_add(w.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        w += 1;
        let reqs = workload(seed);
        // States at each request boundary.
        let mut states = vec![State::default()];
        let mut st = State::default();
        for r in &reqs {
            apply(&mut st, r);
            states.push(st.clone());
        }
        let (mut pool, h) = setup();
        let ops0 = h.ops_total();
        for r in &reqs {
            pool.execute(common::clone_req(r)).unwrap();
        }
        let total = h.ops_total() - ops0;
        for n in 0..=total {
            let (mut pool, h) = setup();
            h.crash_after_ops(n);
            let mut durable_idx = 0usize; // states[durable_idx..] are allowed
            let mut done = 0usize;
            for (i, r) in reqs.iter().enumerate() {
                let mut tmp = State::default();
                let durable = apply(&mut tmp, r);
                match pool.execute(common::clone_req(r)) {
                    Ok(_) => {
                        done = i + 1;
                        if durable {
                            durable_idx = i + 1;
                        }
                    }
                    Err(_) => break,
                }
            }
            let modes: Vec<(CrashMode, u64)> = std::iter::once((CrashMode::DropAll, 0))
                .chain(std::iter::once((CrashMode::KeepAll, 0)))
                .chain((0..6).map(|k| (CrashMode::Random, seed ^ (n << 8) ^ k)))
                .collect();
            for (mode, s) in modes {
                let img = h.crash_image(mode, s);
                images += 1;
                let mut p = Pool::open(img)
                    .unwrap_or_else(|e| panic!("seed {seed} op {n} {mode:?}: mount failed: {e}"));
                p.check_invariants()
                    .unwrap_or_else(|e| panic!("seed {seed} op {n} {mode:?}: {e}"));
                let got = [read_img(&mut p, 0, None), read_img(&mut p, 1, None)];
                // A crash mid-request may expose that request's CP.
                let hi = (done + 1).min(reqs.len());
                let Ok(Reply::Snapshots(list)) = p.execute(Request::ListSnapshots {
                    volume: "vol".into(),
                }) else {
                    panic!("seed {seed} op {n}: list snapshots failed")
                };
                let mut names: Vec<String> = list.into_iter().map(|s| s.name).collect();
                names.sort();
                let Ok(Reply::Volumes(vols)) = p.execute(Request::ListVolumes) else {
                    panic!("seed {seed} op {n}: list volumes failed")
                };
                let q_ro = vols[0].qtrees[0].read_only;
                let ok = (durable_idx..=hi).find(|&k| {
                    states[k].live == got
                        && states[k].snaps.keys().cloned().collect::<Vec<_>>() == names
                        && states[k].q_ro == q_ro
                });
                let k = ok.unwrap_or_else(|| {
                    panic!("seed {seed} op {n} {mode:?}: live image, snapshot list and qtree read-only flag ({q_ro}) match no state in {durable_idx}..={hi}")
                });
                for (name, imgs) in &states[k].snaps {
                    let s0 = read_img(&mut p, 0, Some(name.clone()));
                    let s1 = read_img(&mut p, 1, Some(name.clone()));
                    assert!(
                        s0 == imgs[0] && s1 == imgs[1],
                        "seed {seed} op {n}: snapshot {name} changed"
                    );
                }
            }
        }
    }
    println!("crash images checked: {images}");
}

/// `n` one-block writes of values `first..` at random lbas of `ns`.
fn fill(pool: &mut Pool<SimDevice>, rng: &mut Rng, ns: NsName, first: u64, n: u64) {
    for v in first..first + n {
        let mut buf = AlignedBuf::zeroed(1);
        buf.block_mut(0).copy_from_slice(&block(v));
        let lba = rng.below(SIZE);
        pool.execute(Request::Write {
            ns: ns.clone(),
            lba,
            data: buf,
            fua: false,
            replica: false,
        })
        .unwrap();
    }
}

/// The steps before the volume delete: `vol` written, `w` created,
/// written, snapshotted, written again, all flushed.
fn before_volume_delete(pool: &mut Pool<SimDevice>, seed: u64) {
    let mut rng = Rng::new(seed);
    fill(pool, &mut rng, ns(0), 100, 12);
    pool.execute(Request::CreateVolume {
        name: "w".into(),
        size_bytes: SIZE * 4096,
    })
    .unwrap();
    fill(pool, &mut rng, NsName::volume("w"), 200, 20);
    pool.execute(Request::CreateSnapshot {
        volume: "w".into(),
        name: "ws".into(),
        id: None,
        created_unix_ms: Some(1),
    })
    .unwrap();
    fill(pool, &mut rng, NsName::volume("w"), 300, 10);
    pool.execute(Request::Flush).unwrap();
}

fn read_w(p: &mut Pool<SimDevice>, snap: Option<&str>) -> Vec<u8> {
    match p.execute(Request::Read {
        image: Image {
            ns: NsName::volume("w"),
            snapshot: snap.map(str::to_string),
        },
        lba: 0,
        len_blocks: SIZE as u32,
    }) {
        Ok(Reply::Data(b)) => b.as_slice().to_vec(),
        other => panic!("read w: {other:?}"),
    }
}

/// A volume delete cut at every device op: each image mounts, passes its
/// invariants, keeps the other volume whole, and holds the deleted volume
/// either whole (the delete's CP did not land) or not at all.
#[test]
fn crash_inside_volume_delete() {
    let seed = sluice_testkit::seed("crash_inside_volume_delete");
    let (mut pool, h) = setup();
    before_volume_delete(&mut pool, seed);
    let want_vol = read_img(&mut pool, 0, None);
    let want_w = (read_w(&mut pool, None), read_w(&mut pool, Some("ws")));
    let ops0 = h.ops_total();
    pool.execute(Request::DeleteVolume { name: "w".into() })
        .unwrap();
    let total = h.ops_total() - ops0;
    drop(pool);
    let mut images = 0;
    for n in 0..=total {
        let (mut pool, h) = setup();
        before_volume_delete(&mut pool, seed);
        h.crash_after_ops(n);
        let _ = pool.execute(Request::DeleteVolume { name: "w".into() });
        for (mode, mut p) in crash_images(&h, seed, n) {
            images += 1;
            assert_eq!(
                read_img(&mut p, 0, None),
                want_vol,
                "seed {seed} op {n}: vol changed"
            );
            let Ok(Reply::Volumes(vols)) = p.execute(Request::ListVolumes) else {
                panic!("seed {seed} op {n}: list volumes failed")
            };
            if vols.iter().any(|v| v.name == "w") {
                let got = (read_w(&mut p, None), read_w(&mut p, Some("ws")));
                assert!(got == want_w, "seed {seed} op {n} {mode:?}: w half deleted");
            }
        }
    }
    assert!(total > 0);
    println!("volume delete: {total} device ops, {images} crash images checked");
}

fn vol_size_blocks(p: &mut Pool<SimDevice>) -> u64 {
    let Ok(Reply::Volumes(vols)) = p.execute(Request::ListVolumes) else {
        panic!("list volumes failed")
    };
    vols.iter().find(|v| v.name == "vol").unwrap().size_bytes / 4096
}

fn read_vol_n(p: &mut Pool<SimDevice>, snap: Option<&str>, n: u64) -> Vec<u8> {
    match p.execute(Request::Read {
        image: Image {
            ns: ns(0),
            snapshot: snap.map(str::to_string),
        },
        lba: 0,
        len_blocks: n as u32,
    }) {
        Ok(Reply::Data(b)) => b.as_slice().to_vec(),
        other => panic!("read vol: {other:?}"),
    }
}

/// Blocks 0..24 of `vol` written, snapshot `r` taken, more writes there
/// (nothing at or past lba 24), not flushed: a shrink to 24 blocks is
/// allowed and takes its own CP first.
fn before_resize(pool: &mut Pool<SimDevice>, seed: u64) {
    let mut rng = Rng::new(seed);
    for v in 0..16u64 {
        let mut buf = AlignedBuf::zeroed(1);
        buf.block_mut(0).copy_from_slice(&block(500 + v));
        pool.execute(Request::Write {
            ns: ns(0),
            lba: rng.below(24),
            data: buf,
            fua: false,
            replica: false,
        })
        .unwrap();
        if v == 8 {
            pool.execute(Request::CreateSnapshot {
                volume: "vol".into(),
                name: "r".into(),
                id: None,
                created_unix_ms: Some(1),
            })
            .unwrap();
        }
    }
}

/// A shrink (48 -> 24 blocks) then a grow (24 -> 96) cut at every device
/// op: every image mounts, passes its invariants, has one of the three
/// sizes in order (never one before an acknowledged resize), and the same
/// data in the first 24 blocks of the live image and of snapshot `r`.
#[test]
fn crash_inside_resize() {
    let seed = sluice_testkit::seed("crash_inside_resize");
    let sizes = [24u64, 96];
    let resize = |p: &mut Pool<SimDevice>, blocks: u64| {
        p.execute(Request::ResizeVolume {
            name: "vol".into(),
            size_bytes: blocks * 4096,
            replica: false,
        })
    };
    let (mut pool, h) = setup();
    before_resize(&mut pool, seed);
    let want = (
        read_vol_n(&mut pool, None, 24),
        read_vol_n(&mut pool, Some("r"), 24),
    );
    let ops0 = h.ops_total();
    for b in sizes {
        resize(&mut pool, b).unwrap();
    }
    let total = h.ops_total() - ops0;
    drop(pool);
    let mut images = 0;
    for n in 0..=total {
        let (mut pool, h) = setup();
        before_resize(&mut pool, seed);
        h.crash_after_ops(n);
        // Sizes allowed after the crash: from the last acknowledged one on.
        let mut allowed = vec![SIZE, sizes[0], sizes[1]];
        for b in sizes {
            match resize(&mut pool, b) {
                Ok(_) => {
                    let at = allowed.iter().position(|&x| x == b).unwrap();
                    allowed.drain(..at);
                }
                Err(_) => break,
            }
        }
        for (mode, mut p) in crash_images(&h, seed, n) {
            images += 1;
            let size = vol_size_blocks(&mut p);
            assert!(
                allowed.contains(&size),
                "seed {seed} op {n} {mode:?}: size {size} blocks, expected one of {allowed:?}"
            );
            // The writes before were not flushed: an image from before the
            // shrink's first CP may lack some; one at a new size has all.
            if size != SIZE {
                let got = (
                    read_vol_n(&mut p, None, 24),
                    read_vol_n(&mut p, Some("r"), 24),
                );
                assert!(
                    got == want,
                    "seed {seed} op {n} {mode:?}: data changed by a resize"
                );
            }
        }
    }
    assert!(total > 0);
    println!("resize: {total} device ops, {images} crash images checked");
}

/// Snapshots `a` and `b` with different contents, the live image changed
/// again and not flushed (the rollback's first CP writes it).
fn before_rollback(pool: &mut Pool<SimDevice>, seed: u64) {
    let mut rng = Rng::new(seed);
    fill(pool, &mut rng, ns(0), 100, 10);
    fill(pool, &mut rng, ns(1), 150, 4);
    pool.execute(Request::CreateSnapshot {
        volume: "vol".into(),
        name: "a".into(),
        id: None,
        created_unix_ms: Some(1),
    })
    .unwrap();
    fill(pool, &mut rng, ns(0), 200, 10);
    pool.execute(Request::CreateSnapshot {
        volume: "vol".into(),
        name: "b".into(),
        id: None,
        created_unix_ms: Some(2),
    })
    .unwrap();
    fill(pool, &mut rng, ns(0), 300, 10);
    fill(pool, &mut rng, ns(1), 350, 4);
}

/// A rollback to `a` past `b` (deleted with it) cut at every device op:
/// every image mounts, passes its invariants and is either the state
/// before (live changed, snapshots a and b) or after (live = a, only a),
/// never a mix, with every remaining snapshot unchanged.
#[test]
fn crash_inside_rollback() {
    let seed = sluice_testkit::seed("crash_inside_rollback");
    let rollback = |p: &mut Pool<SimDevice>| {
        p.execute(Request::Rollback {
            volume: "vol".into(),
            snapshot: "a".into(),
            destroy_newer: true,
        })
    };
    let read_all = |p: &mut Pool<SimDevice>, snap: Option<&str>| {
        let s = snap.map(str::to_string);
        [read_img(p, 0, s.clone()), read_img(p, 1, s)]
    };
    let (mut pool, h) = setup();
    before_rollback(&mut pool, seed);
    let live_before = read_all(&mut pool, None);
    let a = read_all(&mut pool, Some("a"));
    let b = read_all(&mut pool, Some("b"));
    assert!(live_before != a && b != a);
    let ops0 = h.ops_total();
    rollback(&mut pool).unwrap();
    assert!(read_all(&mut pool, None) == a);
    let total = h.ops_total() - ops0;
    drop(pool);
    let mut images = 0;
    for n in 0..=total {
        let (mut pool, h) = setup();
        before_rollback(&mut pool, seed);
        h.crash_after_ops(n);
        let acked = rollback(&mut pool).is_ok();
        for (mode, mut p) in crash_images(&h, seed, n) {
            images += 1;
            let Ok(Reply::Snapshots(list)) = p.execute(Request::ListSnapshots {
                volume: "vol".into(),
            }) else {
                panic!("seed {seed} op {n}: list snapshots failed")
            };
            let names: Vec<String> = list.into_iter().map(|s| s.name).collect();
            let live = read_all(&mut p, None);
            assert!(
                read_all(&mut p, Some("a")) == a,
                "seed {seed} op {n}: a changed"
            );
            if names == ["a", "b"] {
                assert!(
                    !acked,
                    "seed {seed} op {n} {mode:?}: an acknowledged rollback was lost"
                );
                // The live writes after b were durable only from the
                // rollback's first CP on.
                assert!(
                    live == live_before || live == b,
                    "seed {seed} op {n} {mode:?}: live half rolled back"
                );
                assert!(
                    read_all(&mut p, Some("b")) == b,
                    "seed {seed} op {n}: b changed"
                );
            } else {
                assert_eq!(names, ["a"], "seed {seed} op {n} {mode:?}: snapshots");
                assert!(
                    live == a,
                    "seed {seed} op {n} {mode:?}: b gone but live is not a's"
                );
            }
        }
    }
    assert!(total > 0);
    println!("rollback: {total} device ops, {images} crash images checked");
}

/// A clone of `a` made, written (FUA), snapshotted and deleted, cut at
/// every device op: every image mounts and passes its invariants (the
/// free map exact: nothing the clone shared with `a` freed, nothing it
/// wrote leaked), `a` and `b` read as taken, and the clone is in one of
/// its states in order from the last acknowledged one: absent, `a`'s
/// image, `a`'s image with the write, absent again. While the clone
/// exists `a` cannot be deleted; once it is gone, `a` can.
#[test]
fn crash_inside_clone() {
    let seed = sluice_testkit::seed("crash_inside_clone");
    let steps = || {
        let mut buf = AlignedBuf::zeroed(2);
        buf.block_mut(0).copy_from_slice(&block(900));
        buf.block_mut(1).copy_from_slice(&block(901));
        vec![
            Request::CloneVolume {
                origin: "vol".into(),
                snapshot: "a".into(),
                name: "c".into(),
            },
            Request::Write {
                ns: NsName::volume("c"),
                lba: 3,
                data: buf,
                fua: true,
                replica: false,
            },
            Request::CreateSnapshot {
                volume: "c".into(),
                name: "c1".into(),
                id: None,
                created_unix_ms: Some(3),
            },
            Request::DeleteVolume { name: "c".into() },
        ]
    };
    let (mut pool, h) = setup();
    before_rollback(&mut pool, seed);
    let a = read_img(&mut pool, 0, Some("a".into()));
    let b = read_img(&mut pool, 0, Some("b".into()));
    let mut written = a.clone();
    written.insert(3, 900);
    written.insert(4, 901);
    // The clone's image after each step (None: no clone).
    let states = [
        None,
        Some(a.clone()),
        Some(written.clone()),
        Some(written),
        None,
    ];
    let ops0 = h.ops_total();
    for r in steps() {
        pool.execute(r).unwrap();
    }
    let total = h.ops_total() - ops0;
    drop(pool);
    let mut images = 0;
    for n in 0..=total {
        let (mut pool, h) = setup();
        before_rollback(&mut pool, seed);
        h.crash_after_ops(n);
        let mut acked = 0;
        for r in steps() {
            if pool.execute(r).is_err() {
                break;
            }
            acked += 1;
        }
        // Every step is durable when acknowledged: the clone may show the
        // state of the last acknowledged step or of the one cut short.
        let allowed = &states[acked..(acked + 2).min(states.len())];
        for (mode, mut p) in crash_images(&h, seed, n) {
            images += 1;
            assert!(
                read_img(&mut p, 0, Some("a".into())) == a,
                "seed {seed} op {n}: a changed"
            );
            assert!(
                read_img(&mut p, 0, Some("b".into())) == b,
                "seed {seed} op {n}: b changed"
            );
            let Ok(Reply::Volumes(vols)) = p.execute(Request::ListVolumes) else {
                panic!("seed {seed} op {n}: list volumes failed")
            };
            let clone = vols
                .iter()
                .any(|v| v.name == "c")
                .then(|| read_ns(&mut p, NsName::volume("c"), None));
            assert!(
                allowed.contains(&clone),
                "seed {seed} op {n} {mode:?}: after {acked} acknowledged steps the clone is {clone:?}"
            );
            let del = p.execute(Request::DeleteSnapshot {
                volume: "vol".into(),
                name: "a".into(),
            });
            if clone.is_some() {
                assert!(
                    matches!(del, Err(sluice_engine::Error::HasClones { .. })),
                    "seed {seed} op {n} {mode:?}: the clone's origin deleted: {del:?}"
                );
            } else {
                assert!(del.is_ok(), "seed {seed} op {n} {mode:?}: {del:?}");
            }
            p.check_invariants()
                .unwrap_or_else(|e| panic!("seed {seed} op {n} {mode:?}: after: {e}"));
        }
    }
    assert!(total > 0);
    println!("clone: {total} device ops, {images} crash images checked");
}
