//! Crash-point enumeration: a seeded workload is run once to count device
//! write/flush ops, then replayed with the device frozen after op N for
//! every N; each frozen device yields crash images (only durable writes,
//! all completed writes, and random torn/reordered subsets). Every image
//! must mount, hold every acknowledged-durable write (Flush, FUA, snapshot
//! create), read every snapshot as taken, and pass `check_invariants()`.
//! The workload also turns the qtree's read-only flag on and off (writes
//! to it are then the replicator's, `replica: true`); every image shows
//! the flag of the state it matches.
//! Seed printed; replay with `SLUICE_SEED=<n>`.

use sluice_engine::api::*;
use sluice_engine::device::sim::{CrashMode, SimDevice};
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
    let mut rng = Rng(seed | 1);
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

fn clone_req(r: &Request) -> Request {
    match r {
        Request::Write {
            ns,
            lba,
            data,
            fua,
            replica,
        } => Request::Write {
            ns: ns.clone(),
            lba: *lba,
            data: data.clone(),
            fua: *fua,
            replica: *replica,
        },
        Request::Trim {
            ns,
            lba,
            len_blocks,
            replica,
        } => Request::Trim {
            ns: ns.clone(),
            lba: *lba,
            len_blocks: *len_blocks,
            replica: *replica,
        },
        Request::Flush => Request::Flush,
        Request::CreateSnapshot {
            volume,
            name,
            id,
            created_unix_ms,
        } => Request::CreateSnapshot {
            volume: volume.clone(),
            name: name.clone(),
            id: *id,
            created_unix_ms: *created_unix_ms,
        },
        Request::DeleteSnapshot { volume, name } => Request::DeleteSnapshot {
            volume: volume.clone(),
            name: name.clone(),
        },
        Request::SetReadOnly { ns, read_only } => Request::SetReadOnly {
            ns: ns.clone(),
            read_only: *read_only,
        },
        _ => unreachable!(),
    }
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
            true
        }
        Request::DeleteSnapshot { name, .. } => {
            st.snaps.remove(name);
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

fn read_img(pool: &mut Pool<SimDevice>, i: usize, snap: Option<String>) -> Img {
    let r = pool
        .execute(Request::Read {
            image: Image {
                ns: ns(i),
                snapshot: snap,
            },
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
    let base = common::seed();
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
            pool.execute(clone_req(r)).unwrap();
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
                match pool.execute(clone_req(r)) {
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
    let mut rng = Rng(seed | 1);
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
    let seed = common::seed();
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
        for (mode, s) in [
            (CrashMode::DropAll, 0),
            (CrashMode::KeepAll, 0),
            (CrashMode::Random, seed ^ n),
            (CrashMode::Random, seed ^ (n << 16)),
        ] {
            images += 1;
            let mut p = Pool::open(h.crash_image(mode, s))
                .unwrap_or_else(|e| panic!("seed {seed} op {n} {mode:?}: mount failed: {e}"));
            p.check_invariants()
                .unwrap_or_else(|e| panic!("seed {seed} op {n} {mode:?}: {e}"));
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
