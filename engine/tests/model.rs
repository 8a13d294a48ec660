//! Model-based test: random volumes, qtrees, writes, trims, flushes,
//! snapshot create/delete, read-only flags (volume and qtree; client writes
//! refused, replica writes taken), volume resizes (grow; shrink refused
//! while any image maps a block past the new end), rollbacks (to the
//! newest snapshot, or past newer ones that go with it), clones of
//! snapshots (their origins held while they exist), reads, diffs and
//! reopens, checked against
//! a plain in-memory model and `check_invariants()` after every step.
//! Seed printed; replay with `SLUICE_SEED=<n>`.

// Tests may panic: the engine's no-panic lints (engine/Cargo.toml) are for
// production code; clippy.toml covers #[test] functions, this the helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use sluice_engine::api::*;
use sluice_engine::device::sim::SimDevice;
use sluice_engine::device::AlignedBuf;
use sluice_engine::{Error, FormatOptions, Pool};
use std::collections::HashMap;

mod common;
use common::Rng;

fn block(v: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    for (i, c) in b.chunks_mut(8).enumerate() {
        c.copy_from_slice(&(v.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i as u64).to_le_bytes());
    }
    b
}

type Img = HashMap<u64, u64>; // lba -> content value

struct MVol {
    name: String,
    ns: Vec<(Option<String>, u64)>, // name, size blocks
    live: Vec<Img>,
    snaps: Vec<(String, Vec<Img>)>,
    /// Read-only flag per namespace: index 0 is the volume's (it covers
    /// every namespace), the others the qtrees' own.
    ro: Vec<bool>,
    /// A clone's origin: (volume, snapshot).
    origin: Option<(String, String)>,
}

/// The clones made from snapshot `snap` of volume `vol` (any snapshot when
/// `snap` is None).
fn clones_of(vols: &[MVol], vol: &str, snap: Option<&str>) -> usize {
    vols.iter()
        .filter(|c| {
            c.origin
                .as_ref()
                .is_some_and(|(v, s)| v == vol && snap.is_none_or(|x| x == s))
        })
        .count()
}

impl MVol {
    /// Clients may not write namespace `i`.
    fn read_only(&self, i: usize) -> bool {
        self.ro[0] || self.ro[i]
    }
}

/// The flags the pool reports equal the model's.
fn check_flags(pool: &mut Pool<SimDevice>, vols: &[MVol], seed: u64) {
    let Ok(Reply::Volumes(infos)) = pool.execute(Request::ListVolumes) else {
        panic!("seed {seed}: list volumes failed")
    };
    for v in vols {
        let info = infos.iter().find(|i| i.name == v.name).expect("volume");
        assert_eq!(info.read_only, v.ro[0], "seed {seed}: {} read-only", v.name);
        for (i, (q, _)) in v.ns.iter().enumerate().skip(1) {
            let qi = info
                .qtrees
                .iter()
                .find(|x| Some(&x.name) == q.as_ref())
                .expect("qtree");
            assert_eq!(qi.read_only, v.ro[i], "seed {seed}: {q:?} read-only");
        }
    }
}

fn ns_name(v: &MVol, i: usize) -> NsName {
    NsName {
        volume: v.name.clone(),
        qtree: v.ns[i].0.clone(),
    }
}

fn check_read(pool: &mut Pool<SimDevice>, img: Image, model: &Img, size: u64) {
    let r = pool
        .execute(Request::Read {
            image: img.clone(),
            lba: 0,
            len_blocks: size as u32,
        })
        .unwrap();
    let Reply::Data(buf) = r else {
        panic!("not data")
    };
    for lba in 0..size {
        let want = model
            .get(&lba)
            .map(|&v| block(v))
            .unwrap_or_else(|| vec![0u8; 4096]);
        assert!(
            buf.block(lba as usize) == &want[..],
            "image {img:?} lba {lba}: wrong content (model {:?})",
            model.get(&lba)
        );
    }
}

/// Runs one case; returns how many clones it made.
fn run_case(seed: u64, steps: usize) -> usize {
    let mut rng = Rng::new(seed);
    let dev = SimDevice::new(4096);
    let mut pool = Pool::format(dev, FormatOptions { volumes_max: 4 }).unwrap();
    let mut vols: Vec<MVol> = Vec::new();
    let mut counter = 1u64;
    let mut vol_seq = 0u64;
    let mut clones = 0;
    for _step in 0..steps {
        let op = rng.below(110);
        if vols.is_empty() || (op < 3 && vols.len() < 3) {
            let name = format!("v{vol_seq}");
            vol_seq += 1;
            let size = 1 + rng.below(400);
            pool.execute(Request::CreateVolume {
                name: name.clone(),
                size_bytes: size * 4096,
            })
            .unwrap();
            vols.push(MVol {
                name,
                ns: vec![(None, size)],
                live: vec![Img::new()],
                snaps: vec![],
                ro: vec![false],
                origin: None,
            });
            continue;
        }
        let vi = rng.below(vols.len() as u64) as usize;
        // A clone of one of this volume's snapshots: shares its blocks,
        // starts as its image, then diverges (checked by the reads and
        // invariants after every step).
        if (104..=107).contains(&op) && !vols[vi].snaps.is_empty() {
            let v = &vols[vi];
            let si = rng.below(v.snaps.len() as u64) as usize;
            let (sname, imgs) = v.snaps[si].clone();
            let name = format!("v{vol_seq}");
            vol_seq += 1;
            let r = pool.execute(Request::CloneVolume {
                origin: v.name.clone(),
                snapshot: sname.clone(),
                name: name.clone(),
            });
            if vols.len() >= 4 {
                assert!(
                    matches!(r, Err(Error::TooManyVolumes { .. })),
                    "seed {seed}: a clone past the volume limit: {r:?}"
                );
            } else {
                let Ok(Reply::Volume(info)) = r else {
                    panic!("seed {seed}: clone of {}@{sname}: {r:?}", v.name)
                };
                assert_eq!(
                    info.origin.map(|o| (o.volume, o.snapshot)),
                    Some((v.name.clone(), sname.clone())),
                    "seed {seed}"
                );
                let n = imgs.len();
                clones += 1;
                vols.push(MVol {
                    name,
                    ns: v.ns[..n].to_vec(),
                    live: imgs,
                    snaps: vec![],
                    ro: vec![false; n],
                    origin: Some((v.name.clone(), sname)),
                });
            }
            pool.check_invariants()
                .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            continue;
        }
        let clones_of_vol = clones_of(&vols, &vols[vi].name, None);
        let snap_clones: Vec<usize> = vols[vi]
            .snaps
            .iter()
            .map(|(s, _)| clones_of(&vols, &vols[vi].name, Some(s)))
            .collect();
        let v = &mut vols[vi];
        let ni = rng.below(v.ns.len() as u64) as usize;
        let size = v.ns[ni].1;
        match op {
            0..=4 if v.ns.len() < 3 => {
                let q = format!("q{}", v.ns.len());
                let size = 1 + rng.below(300);
                pool.execute(Request::CreateQtree {
                    volume: v.name.clone(),
                    name: q.clone(),
                    size_bytes: size * 4096,
                })
                .unwrap();
                v.ns.push((Some(q), size));
                v.live.push(Img::new());
                v.ro.push(false);
            }
            5..=49 => {
                // One write, or a batch of up to 4 (some possibly to other
                // namespaces or out of range), executed as one batch.
                let k = if rng.below(3) == 0 {
                    1 + rng.below(4)
                } else {
                    1
                };
                let mut reqs = Vec::new();
                let mut expect_ok = Vec::new();
                // Expected bytes of the reads mixed into the batch: the model
                // as it stands after the requests before them.
                let mut expect_data: Vec<Option<Vec<u8>>> = Vec::new();
                for _ in 0..k {
                    let ni = rng.below(v.ns.len() as u64) as usize;
                    let size = v.ns[ni].1;
                    let len = 1 + rng.below(4.min(size));
                    if k > 1 && rng.below(3) == 0 {
                        let lba = rng.below(size - len + 1);
                        let want: Vec<u8> = (lba..lba + len)
                            .flat_map(|l| {
                                v.live[ni]
                                    .get(&l)
                                    .map(|&c| block(c))
                                    .unwrap_or_else(|| vec![0u8; 4096])
                            })
                            .collect();
                        reqs.push(Request::Read {
                            image: Image {
                                ns: ns_name(v, ni),
                                snapshot: None,
                            },
                            lba,
                            len_blocks: len as u32,
                        });
                        expect_ok.push(true);
                        expect_data.push(Some(want));
                        continue;
                    }
                    expect_data.push(None);
                    let bad = k > 1 && rng.below(8) == 0;
                    let lba = if bad { size } else { rng.below(size - len + 1) };
                    // A read-only namespace takes the replicator's writes
                    // and refuses a client's.
                    let replica = v.read_only(ni) && rng.below(2) == 0;
                    let refused = v.read_only(ni) && !replica;
                    let mut buf = AlignedBuf::zeroed(len as usize);
                    for i in 0..len {
                        counter += 1;
                        buf.block_mut(i as usize).copy_from_slice(&block(counter));
                        if !bad && !refused {
                            v.live[ni].insert(lba + i, counter);
                        }
                    }
                    let fua = rng.below(10) == 0;
                    reqs.push(Request::Write {
                        ns: ns_name(v, ni),
                        lba,
                        data: buf,
                        fua,
                        replica,
                    });
                    expect_ok.push(!bad && !refused);
                }
                let res = if k == 1 {
                    vec![pool.execute(reqs.pop().unwrap())]
                } else {
                    pool.execute_batch(reqs)
                };
                for ((r, ok), want) in res.iter().zip(expect_ok).zip(expect_data) {
                    assert_eq!(r.is_ok(), ok, "seed {seed}: batch result {r:?}");
                    if let (Ok(Reply::Data(buf)), Some(want)) = (r, want) {
                        assert!(
                            buf.as_slice() == &want[..],
                            "seed {seed}: a read in a batch returned wrong content"
                        );
                    }
                }
            }
            50..=59 => {
                let len = 1 + rng.below(size.min(40));
                let lba = rng.below(size - len + 1);
                let replica = v.read_only(ni) && rng.below(2) == 0;
                let r = pool.execute(Request::Trim {
                    ns: ns_name(v, ni),
                    lba,
                    len_blocks: len,
                    replica,
                });
                if v.read_only(ni) && !replica {
                    assert!(
                        matches!(r, Err(Error::ReadOnly { .. })),
                        "seed {seed}: client trim of a read-only namespace: {r:?}"
                    );
                } else {
                    r.unwrap();
                    for l in lba..lba + len {
                        v.live[ni].remove(&l);
                    }
                }
            }
            60..=62 => {
                pool.execute(Request::Flush).unwrap();
            }
            63..=64 => {
                let read_only = !v.ro[ni];
                pool.execute(Request::SetReadOnly {
                    ns: ns_name(v, ni),
                    read_only,
                })
                .unwrap();
                v.ro[ni] = read_only;
            }
            65..=71 => {
                counter += 1;
                let name = format!("s{counter}");
                pool.execute(Request::CreateSnapshot {
                    volume: v.name.clone(),
                    name: name.clone(),
                    id: None,
                    created_unix_ms: None,
                })
                .unwrap();
                v.snaps.push((name, v.live.clone()));
            }
            72..=76 if !v.snaps.is_empty() => {
                let si = rng.below(v.snaps.len() as u64) as usize;
                let r = pool.execute(Request::DeleteSnapshot {
                    volume: v.name.clone(),
                    name: v.snaps[si].0.clone(),
                });
                if snap_clones[si] > 0 {
                    assert!(
                        matches!(r, Err(Error::HasClones { .. })),
                        "seed {seed}: delete of a cloned snapshot: {r:?}"
                    );
                } else {
                    r.unwrap();
                    v.snaps.remove(si);
                }
            }
            77..=84 => {
                let snap = if !v.snaps.is_empty() && rng.below(2) == 0 {
                    Some(rng.below(v.snaps.len() as u64) as usize)
                } else {
                    None
                };
                let (model, sname) = match snap {
                    Some(si) if si < v.snaps.len() && ni < v.snaps[si].1.len() => {
                        (&v.snaps[si].1[ni], Some(v.snaps[si].0.clone()))
                    }
                    _ => (&v.live[ni], None),
                };
                let model = model.clone();
                check_read(
                    &mut pool,
                    Image {
                        ns: ns_name(v, ni),
                        snapshot: sname,
                    },
                    &model,
                    size,
                );
            }
            85..=92 if !v.snaps.is_empty() => {
                let ti = rng.below(v.snaps.len() as u64) as usize;
                let bi = if rng.below(3) == 0 {
                    None
                } else {
                    Some(rng.below(ti as u64 + 1) as usize)
                };
                if ni >= v.snaps[ti].1.len() {
                    continue;
                }
                let target = v.snaps[ti].1[ni].clone();
                let mut copy = match bi {
                    Some(b) if ni < v.snaps[b].1.len() => v.snaps[b].1[ni].clone(),
                    Some(_) => continue,
                    None => Img::new(),
                };
                let r = pool
                    .execute(Request::Diff {
                        ns: ns_name(v, ni),
                        base: bi.map(|b| v.snaps[b].0.clone()),
                        target: v.snaps[ti].0.clone(),
                    })
                    .unwrap();
                let Reply::Diff(ext) = r else {
                    panic!("not diff")
                };
                for e in ext {
                    for l in e.lba..e.lba + e.len_blocks {
                        match e.kind {
                            DiffKind::Data => {
                                copy.insert(
                                    l,
                                    *target
                                        .get(&l)
                                        .expect("diff says data where target has none"),
                                );
                            }
                            DiffKind::Trim => {
                                copy.remove(&l);
                            }
                        }
                    }
                }
                assert_eq!(copy, target, "diff applied to base != target");
            }
            96 => {
                // The volume goes with everything it held; the others stay
                // as they were (checked by the reads and invariants after).
                let name = v.name.clone();
                let r = pool.execute(Request::DeleteVolume { name: name.clone() });
                if clones_of_vol > 0 {
                    assert!(
                        matches!(r, Err(Error::HasClones { .. })),
                        "seed {seed}: delete of a volume with clones: {r:?}"
                    );
                    pool.check_invariants()
                        .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
                    continue;
                }
                r.unwrap();
                vols.remove(vi);
                let e = pool.execute(Request::ListSnapshots { volume: name });
                assert!(
                    matches!(e, Err(Error::NoSuchVolume(_))),
                    "seed {seed}: deleted volume still listed: {e:?}"
                );
            }
            93..=95 => {
                pool.execute(Request::Flush).unwrap();
                let dev = pool.into_device();
                pool = Pool::open(dev).unwrap();
                check_flags(&mut pool, &vols, seed);
            }
            97..=100 => {
                let old = v.ns[0].1;
                let new = 1 + rng.below(500);
                let replica = v.ro[0] && rng.below(2) == 0;
                let mapped_past = |img: &Img| img.keys().any(|&l| l >= new);
                let r = pool.execute(Request::ResizeVolume {
                    name: v.name.clone(),
                    size_bytes: new * 4096,
                    replica,
                });
                if v.ro[0] && !replica {
                    assert!(
                        matches!(r, Err(Error::ReadOnly { .. })),
                        "seed {seed}: client resize of a read-only volume: {r:?}"
                    );
                } else if new < old
                    && (mapped_past(&v.live[0]) || v.snaps.iter().any(|(_, s)| mapped_past(&s[0])))
                {
                    assert!(
                        matches!(r, Err(Error::MappedPastEnd { .. })),
                        "seed {seed}: shrink of {} from {old} to {new} blocks over mapped blocks: {r:?}",
                        v.name
                    );
                } else {
                    let Ok(Reply::Volume(info)) = r else {
                        panic!(
                            "seed {seed}: resize of {} from {old} to {new} blocks: {r:?}",
                            v.name
                        )
                    };
                    assert_eq!(info.size_bytes, new * 4096, "seed {seed}");
                    v.ns[0].1 = new;
                }
            }
            101..=103 if !v.snaps.is_empty() => {
                let si = rng.below(v.snaps.len() as u64) as usize;
                let destroy_newer = rng.below(2) == 0;
                let r = pool.execute(Request::Rollback {
                    volume: v.name.clone(),
                    snapshot: v.snaps[si].0.clone(),
                    destroy_newer,
                });
                if v.ro.iter().any(|&x| x) {
                    assert!(
                        matches!(r, Err(Error::ReadOnly { .. })),
                        "seed {seed}: rollback of a read-only volume or qtree: {r:?}"
                    );
                } else if destroy_newer && snap_clones[si + 1..].iter().any(|&c| c > 0) {
                    assert!(
                        matches!(r, Err(Error::HasClones { .. })),
                        "seed {seed}: rollback past a cloned snapshot: {r:?}"
                    );
                } else if si + 1 < v.snaps.len() && !destroy_newer {
                    assert!(
                        matches!(r, Err(Error::NewerSnapshots { .. })),
                        "seed {seed}: rollback past newer snapshots without -r: {r:?}"
                    );
                } else {
                    assert!(r.is_ok(), "seed {seed}: rollback: {r:?}");
                    v.snaps.truncate(si + 1);
                    let imgs = v.snaps[si].1.clone();
                    for (i, live) in v.live.iter_mut().enumerate() {
                        *live = imgs.get(i).cloned().unwrap_or_default();
                    }
                }
            }
            _ => {
                // bad input: out of range must fail and change nothing
                let e = pool.execute(Request::Trim {
                    ns: ns_name(v, ni),
                    lba: size,
                    len_blocks: 1,
                    replica: true,
                });
                assert!(matches!(e, Err(Error::OutOfRange { .. })));
            }
        }
        pool.check_invariants()
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    }
    pool.execute(Request::Flush).unwrap();
    let dev = pool.into_device();
    let mut pool = Pool::open(dev).unwrap();
    pool.check_invariants().unwrap();
    check_flags(&mut pool, &vols, seed);
    for v in &vols {
        for ni in 0..v.ns.len() {
            check_read(
                &mut pool,
                Image {
                    ns: ns_name(v, ni),
                    snapshot: None,
                },
                &v.live[ni],
                v.ns[ni].1,
            );
            for (sn, imgs) in &v.snaps {
                if ni < imgs.len() {
                    check_read(
                        &mut pool,
                        Image {
                            ns: ns_name(v, ni),
                            snapshot: Some(sn.clone()),
                        },
                        &imgs[ni],
                        v.ns[ni].1,
                    );
                }
            }
        }
    }
    clones
}

#[test]
fn model_random_workloads() {
    let s = sluice_testkit::seed("model_random_workloads");
    let cases: u64 = std::env::var("SLUICE_MODEL_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    let mut clones = 0;
    for c in 0..cases {
        clones += run_case(s.wrapping_add(c.wrapping_mul(0x9E37_79B9)), 60);
    }
    println!("model: {cases} cases, {clones} clones");
    assert!(cases == 0 || clones > 0, "the workload made no clone");
}
