//! The catalog log (format 5, docs/FORMAT.md "Catalog"): a snapshot
//! create or delete writes metadata in proportion to the change, however
//! many snapshots exist; every state survives a reopen, across the log's
//! compactions; and a crash at any device operation of a run that
//! compacts the log leaves the state before or after the request it hit.

// Tests may panic: the engine's no-panic lints (engine/Cargo.toml) are for
// production code; clippy.toml covers #[test] functions, this the helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use sluice_engine::api::*;
use sluice_engine::device::sim::{CrashMode, SimDevice, SimHandle};
use sluice_engine::device::AlignedBuf;
use sluice_engine::{FormatOptions, Pool};
use std::collections::BTreeMap;

mod common;

fn snap_req(volume: &str, name: &str) -> Request {
    Request::CreateSnapshot {
        volume: volume.into(),
        name: name.into(),
        // The same id in every run, so runs compare.
        id: Some(uuid::Uuid::from_u128(
            xxhash_rust::xxh3::xxh3_128(format!("{volume}@{name}").as_bytes()) | 1,
        )),
        created_unix_ms: Some(7),
    }
}

fn del_req(volume: &str, name: &str) -> Request {
    Request::DeleteSnapshot {
        volume: volume.into(),
        name: name.into(),
    }
}

fn write_req(volume: &str, lba: u64, v: u8) -> Request {
    let mut b = AlignedBuf::zeroed(1);
    b.as_mut_slice().fill(v);
    Request::Write {
        ns: NsName::volume(volume),
        lba,
        data: b,
        fua: false,
        replica: false,
    }
}

fn vol_req(name: &str) -> Request {
    Request::CreateVolume {
        name: name.into(),
        size_bytes: 64 * 4096,
    }
}

/// What a reopen must give back: every volume with its qtrees, flags,
/// counts and digests, every snapshot with its id, generation, counts and
/// digests, and every attribute.
#[derive(Debug, PartialEq)]
struct Seen {
    vols: Vec<String>,
    snaps: BTreeMap<String, Vec<String>>,
    attrs: BTreeMap<String, Option<Vec<u8>>>,
}

fn seen(p: &mut Pool<SimDevice>, attr_keys: &[String]) -> Seen {
    let Ok(Reply::Volumes(vols)) = p.execute(Request::ListVolumes) else {
        panic!("list volumes")
    };
    let mut snaps = BTreeMap::new();
    for v in &vols {
        let Ok(Reply::Snapshots(list)) = p.execute(Request::ListSnapshots {
            volume: v.name.clone(),
        }) else {
            panic!("list snapshots of {}", v.name)
        };
        snaps.insert(
            v.name.clone(),
            list.iter().map(|s| format!("{s:?}")).collect(),
        );
    }
    let mut attrs = BTreeMap::new();
    for k in attr_keys {
        let Ok(Reply::Attr(a)) = p.execute(Request::GetAttr { key: k.clone() }) else {
            panic!("get attr {k}")
        };
        attrs.insert(k.clone(), a);
    }
    Seen {
        vols: vols.iter().map(|v| format!("{v:?}")).collect(),
        snaps,
        attrs,
    }
}

fn metadata_written(p: &Pool<SimDevice>) -> u64 {
    p.stats().metadata_blocks_written
}

#[test]
fn a_snapshot_create_or_delete_writes_in_proportion_to_the_change() {
    let mut p = Pool::format(SimDevice::new(16384), FormatOptions::default()).unwrap();
    p.execute(vol_req("big")).unwrap();
    p.execute(vol_req("small")).unwrap();
    p.execute(write_req("big", 1, 1)).unwrap();
    // Per create: the mean over a window, with few and with many
    // snapshots on the pool (compactions included in both windows).
    let window = |p: &mut Pool<SimDevice>, from: usize, n: usize| {
        let before = metadata_written(p);
        for i in from..from + n {
            p.execute(snap_req("big", &format!("s{i}"))).unwrap();
        }
        (metadata_written(p) - before) as f64 / n as f64
    };
    let few = window(&mut p, 0, 200);
    window(&mut p, 200, 2600);
    let many = window(&mut p, 2800, 200);
    println!("metadata blocks per create: {few:.2} with 200 snapshots, {many:.2} with 3000");
    assert!(many <= 3.0, "{many} blocks per create with 3000 snapshots");
    assert!(many <= few * 2.0 + 0.5, "{few} -> {many} blocks per create");
    // A snapshot of another volume, and deletes, cost the same.
    let before = metadata_written(&p);
    for i in 0..100 {
        p.execute(snap_req("small", &format!("t{i}"))).unwrap();
    }
    let small = (metadata_written(&p) - before) as f64 / 100.0;
    assert!(small <= 3.0, "{small} blocks per create of a small volume");
    let before = metadata_written(&p);
    for i in (0..3000).step_by(10) {
        p.execute(del_req("big", &format!("s{i}"))).unwrap();
    }
    let del = (metadata_written(&p) - before) as f64 / 300.0;
    println!("metadata blocks per delete: {del:.2}");
    assert!(del <= 3.0, "{del} blocks per delete with 3000 snapshots");
    p.check_invariants().unwrap();
    let want = seen(&mut p, &[]);
    let mut p = Pool::open(p.into_device()).unwrap();
    p.check_invariants().unwrap();
    assert_eq!(seen(&mut p, &[]), want);
    assert_eq!(want.snaps["big"].len(), 2700);
}

/// One random step of the reopen test.
fn random_step(p: &mut Pool<SimDevice>, rng: &mut common::Rng, keys: &[String], step: u64) -> bool {
    let vol = format!("v{}", rng.below(4));
    let r = match rng.below(10) {
        0..=2 => snap_req(&vol, &format!("s{step}")),
        3 | 4 => {
            let Ok(Reply::Snapshots(list)) = p.execute(Request::ListSnapshots {
                volume: vol.clone(),
            }) else {
                return false;
            };
            let Some(s) = list.get(rng.below(list.len() as u64) as usize) else {
                return false;
            };
            del_req(&vol, &s.name)
        }
        5 => write_req(&vol, rng.below(64), rng.below(256) as u8),
        6 => Request::SetAttr {
            key: keys[rng.below(keys.len() as u64) as usize].clone(),
            value: (rng.below(3) > 0).then(|| vec![step as u8; rng.below(9000) as usize]),
        },
        7 => {
            if rng.below(4) == 0 {
                Request::DeleteVolume { name: vol }
            } else {
                vol_req(&vol)
            }
        }
        8 => Request::CreateQtree {
            volume: vol,
            name: format!("q{}", rng.below(3)),
            size_bytes: 16 * 4096,
        },
        _ => Request::Flush,
    };
    // Refusals (a name taken, a volume missing) are part of the walk.
    p.execute(r).is_ok()
}

#[test]
fn every_state_survives_a_reopen_across_compactions() {
    let seed = sluice_testkit::seed("every_state_survives_a_reopen_across_compactions");
    let mut rng = common::Rng::new(seed);
    let keys: Vec<String> = (0..5).map(|i| format!("attr{i}")).collect();
    let mut p = Pool::format(SimDevice::new(8192), FormatOptions::default()).unwrap();
    let (mut done, mut reopens) = (0, 0);
    for step in 0..1500u64 {
        done += u32::from(random_step(&mut p, &mut rng, &keys, step));
        if rng.below(25) == 0 {
            reopens += 1;
            p.execute(Request::Flush).unwrap();
            p.check_invariants()
                .unwrap_or_else(|e| panic!("seed {seed} step {step}: {e}"));
            let want = seen(&mut p, &keys);
            p = Pool::open(p.into_device())
                .unwrap_or_else(|e| panic!("seed {seed} step {step}: reopen: {e}"));
            p.check_invariants()
                .unwrap_or_else(|e| panic!("seed {seed} step {step}: after reopen: {e}"));
            assert_eq!(seen(&mut p, &keys), want, "seed {seed} step {step}");
        }
    }
    let stats = p.stats();
    println!("{done} of 1500 requests done, {reopens} reopens, {stats:?}");
    assert!(done > 700 && reopens > 30, "the walk did too little");
}

/// The requests of the crash test: snapshots of `vol` enough to compact the
/// log twice, deletes of every other one, a volume and an attribute.
fn crash_requests() -> Vec<Request> {
    let mut reqs = vec![write_req("vol", 3, 9)];
    for i in 0..150 {
        reqs.push(snap_req("vol", &format!("s{i}")));
        if i % 40 == 7 {
            reqs.push(Request::SetAttr {
                key: "a".into(),
                value: Some(vec![i as u8; 5000]),
            });
            reqs.push(vol_req(&format!("w{i}")));
        }
    }
    for i in (0..150).step_by(2) {
        reqs.push(del_req("vol", &format!("s{i}")));
    }
    reqs
}

fn crash_setup() -> (Pool<SimDevice>, SimHandle) {
    let dev = SimDevice::new(2048);
    let h = dev.handle();
    let mut p = Pool::format(dev, FormatOptions::default()).unwrap();
    p.execute(vol_req("vol")).unwrap();
    (p, h)
}

#[test]
fn a_crash_at_any_device_operation_of_a_compacting_run_loses_nothing_acknowledged() {
    let seed = sluice_testkit::seed("catalog_log_crash");
    let reqs = crash_requests();
    let keys = vec!["a".to_string()];
    // The state after each request, from an uncrashed run.
    let (mut p, h) = crash_setup();
    let ops0 = h.ops_total();
    let mut states = vec![seen(&mut p, &keys)];
    for r in &reqs {
        p.execute(common::clone_req(r)).unwrap();
        // A SetAttr is durable at the next CP: the state is compared there.
        states.push(seen(&mut p, &keys));
    }
    let total = h.ops_total() - ops0;
    let mut images = 0;
    for n in (0..=total).step_by(3) {
        let (mut p, h) = crash_setup();
        h.crash_after_ops(n);
        let mut done = 0usize;
        for r in &reqs {
            if p.execute(common::clone_req(r)).is_err() {
                break;
            }
            done += 1;
        }
        for (mode, s) in [
            (CrashMode::DropAll, 0),
            (CrashMode::KeepAll, 0),
            (CrashMode::Random, seed ^ n),
        ] {
            images += 1;
            let mut p = Pool::open(h.crash_image(mode, s))
                .unwrap_or_else(|e| panic!("seed {seed} op {n} {mode:?}: mount failed: {e}"));
            p.check_invariants()
                .unwrap_or_else(|e| panic!("seed {seed} op {n} {mode:?}: {e}"));
            let got = seen(&mut p, &keys);
            // An attribute set by request k becomes durable with a later
            // CP: allow the states from the last one whose CP made it.
            let lo = done.saturating_sub(2);
            let hi = (done + 1).min(reqs.len());
            assert!(
                (lo..=hi).any(|k| {
                    let mut want = states[k].snaps == got.snaps && states[k].vols == got.vols;
                    want &= (k.saturating_sub(2)..=k).any(|j| states[j].attrs == got.attrs);
                    want
                }),
                "seed {seed} op {n} {mode:?}: the state matches none after requests {lo}..={hi}"
            );
        }
    }
    println!("catalog log: {total} device ops, {images} crash images checked");
}
