//! Checks shared by `uring_file.rs` and `uring_loop.rs`: the same behaviour
//! is required of a regular file and of a loop block device.

#![allow(dead_code)]

use rand::Rng;
use sluice_engine::device::uring::{UringDevice, UringOptions};
use sluice_engine::device::{AlignedBuf, BlockDevice, IoCompletion, IoKind, IoRequest, BLOCK_SIZE};
use std::collections::HashMap;

#[allow(unused_imports)] // `tool` is for uring_loop.rs only
pub use sluice_testkit::{rng, seed, skip, tool};

/// A block whose every byte says which pba and which version it holds.
pub fn pattern(pba: u64, version: u8) -> Vec<u8> {
    let mut v = vec![version; BLOCK_SIZE];
    v[..8].copy_from_slice(&pba.to_le_bytes());
    v
}

/// Submit everything, complete everything; returns completions by tag.
pub fn run_all<D: BlockDevice>(dev: &mut D, reqs: Vec<IoRequest>) -> HashMap<u64, IoCompletion> {
    let n = reqs.len();
    for r in reqs {
        dev.submit(r);
    }
    let mut out = Vec::new();
    while out.len() < n {
        let got = dev.complete(1, &mut out).expect("device failed");
        assert!(got > 0 || dev.in_flight() > 0, "requests vanished");
    }
    assert_eq!(dev.in_flight(), 0);
    let mut by_tag = HashMap::new();
    for c in out {
        assert!(by_tag.insert(c.tag, c).is_none(), "tag completed twice");
    }
    assert_eq!(by_tag.len(), n);
    by_tag
}

pub fn write_req(tag: u64, pba: u64, data: &[u8], fua: bool) -> IoRequest {
    IoRequest {
        tag,
        kind: IoKind::Write { fua },
        pba,
        buf: Some(AlignedBuf::from_slice(data)),
    }
}

pub fn read_req(tag: u64, pba: u64, len_blocks: usize) -> IoRequest {
    IoRequest {
        tag,
        kind: IoKind::Read,
        pba,
        buf: Some(AlignedBuf::zeroed(len_blocks)),
    }
}

pub fn flush_req(tag: u64) -> IoRequest {
    IoRequest {
        tag,
        kind: IoKind::Flush,
        pba: 0,
        buf: None,
    }
}

pub fn read_back<D: BlockDevice>(dev: &mut D, pba: u64, len_blocks: usize) -> Vec<u8> {
    let mut c = run_all(dev, vec![read_req(0, pba, len_blocks)]);
    let c = c.remove(&0).expect("completion");
    c.result.expect("read");
    c.buf.expect("buffer back").as_slice().to_vec()
}

/// Single- and multi-block writes (fixed and caller buffers), FUA, flush,
/// read back, and per-request errors for bad requests.
pub fn basic_io(dev: &mut UringDevice) {
    let last = dev.info().block_count - 1;
    let multi: Vec<u8> = (0..4u64).flat_map(|i| pattern(10 + i, 1)).collect();
    let done = run_all(
        dev,
        vec![
            write_req(1, 0, &pattern(0, 1), false),
            write_req(2, 10, &multi, false),
            write_req(3, last, &pattern(last, 1), true),
        ],
    );
    for c in done.values() {
        assert!(c.result.is_ok(), "{:?}", c.result);
        assert!(c.buf.is_some(), "buffer handed back");
    }
    let done = run_all(dev, vec![flush_req(4)]);
    done[&4].result.as_ref().expect("flush");
    assert_eq!(read_back(dev, 0, 1), pattern(0, 1));
    assert_eq!(read_back(dev, 10, 4), multi);
    assert_eq!(read_back(dev, last, 1), pattern(last, 1));
    assert!(read_back(dev, 5, 1).iter().all(|&b| b == 0));

    // Bad requests fail alone, with the path, op and block in the message.
    let done = run_all(
        dev,
        vec![
            read_req(1, last, 2),
            IoRequest {
                tag: 2,
                kind: IoKind::Write { fua: false },
                pba: 0,
                buf: None,
            },
            read_req(3, u64::MAX, 1),
            read_req(4, 0, 1),
        ],
    );
    let err = done[&1].result.as_ref().expect_err("beyond the end");
    let msg = err.to_string();
    assert!(
        msg.contains(&dev.info().name) && msg.contains("read") && msg.contains(&last.to_string()),
        "{msg}"
    );
    assert!(done[&1].buf.is_some(), "buffer handed back on error");
    assert!(done[&2].result.is_err());
    assert!(done[&3].result.is_err());
    assert!(done[&4].result.is_ok());
}

/// Many requests in flight at once (more than the ring holds), random
/// pbas, every completion matched to its own request and data.
pub fn many_in_flight(dev: &mut UringDevice, seed: u64) {
    let mut rng = rng(seed);
    let blocks = dev.info().block_count.min(1 << 16);
    let n = 1500u64;
    let mut pbas: Vec<u64> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    while pbas.len() < n as usize {
        let p = rng.gen_range(0..blocks);
        if seen.insert(p) {
            pbas.push(p);
        }
    }
    let version = rng.gen_range(1..=255u8);
    let reqs = pbas
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            if i % 5 == 0 {
                // Two-block writes go zero-copy from the caller's buffer.
                let mut d = pattern(p, version);
                d.extend(pattern(p + 1, version));
                write_req(i as u64, p.min(blocks - 2), &d, false)
            } else {
                write_req(i as u64, p, &pattern(p, version), i % 7 == 0)
            }
        })
        .collect();
    let done = run_all(dev, reqs);
    assert!(done.values().all(|c| c.result.is_ok()), "seed {seed}");

    // Read them back in one batch, checking each against its own pba.
    let mut expect: HashMap<u64, Vec<u8>> = HashMap::new();
    for (i, &p) in pbas.iter().enumerate() {
        if i % 5 != 0 {
            expect.insert(p, pattern(p, version));
        }
    }
    // Two-block writes may overlap single ones; re-write the singles last
    // so the expectation is unambiguous.
    let rewrite: Vec<IoRequest> = expect
        .iter()
        .enumerate()
        .map(|(i, (&p, d))| write_req(i as u64, p, d, false))
        .collect();
    let done = run_all(dev, rewrite);
    assert!(done.values().all(|c| c.result.is_ok()), "seed {seed}");
    let keys: Vec<u64> = expect.keys().copied().collect();
    let reqs = keys.iter().map(|&p| read_req(p, p, 1)).collect();
    let done = run_all(dev, reqs);
    for (&p, c) in &done {
        c.result.as_ref().expect("read");
        assert_eq!(c.pba, p);
        assert_eq!(
            c.buf.as_ref().expect("buf").as_slice(),
            &expect[&p][..],
            "seed {seed}: block {p}"
        );
    }
}

/// Completions may come back in any order; count how often they did.
pub fn out_of_order(dev: &mut UringDevice, seed: u64) -> usize {
    let mut rng = rng(seed ^ 0x5eed);
    let blocks = dev.info().block_count.min(1 << 16);
    let mut reordered = 0;
    for round in 0..20 {
        let reqs: Vec<IoRequest> = (0..64u64)
            .map(|t| {
                let p = rng.gen_range(0..blocks - 8);
                match t % 3 {
                    0 => read_req(t, p, 8),
                    1 => read_req(t, p, 1),
                    _ => write_req(t, p, &pattern(p, round as u8), false),
                }
            })
            .collect();
        for r in reqs {
            dev.submit(r);
        }
        let mut out = Vec::new();
        while out.len() < 64 {
            dev.complete(1, &mut out).expect("device");
        }
        assert!(out.iter().all(|c| c.result.is_ok()));
        let tags: Vec<u64> = out.iter().map(|c| c.tag).collect();
        if tags.windows(2).any(|w| w[0] > w[1]) {
            reordered += 1;
        }
        let mut sorted = tags.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..64).collect::<Vec<_>>());
    }
    eprintln!("completion order differed from submission order in {reordered} of 20 rounds");
    reordered
}

/// Data survives close and reopen once flushed.
pub fn survives_reopen(path: &std::path::Path, opts: UringOptions) {
    {
        let mut dev = UringDevice::open(path, opts.clone()).expect("open");
        let done = run_all(&mut dev, vec![write_req(1, 3, &pattern(3, 9), false)]);
        done[&1].result.as_ref().expect("write");
        run_all(&mut dev, vec![flush_req(2)])[&2]
            .result
            .as_ref()
            .expect("flush");
    }
    let mut dev = UringDevice::open(path, opts).expect("reopen");
    assert_eq!(read_back(&mut dev, 3, 1), pattern(3, 9));
}

/// A second opener is refused with DeviceBusy while the first holds it.
pub fn exclusive(path: &std::path::Path, opts: UringOptions) {
    let first = UringDevice::open(path, opts.clone()).expect("first open");
    match UringDevice::open(path, opts.clone()) {
        Err(sluice_engine::Error::DeviceBusy { path: p }) => assert_eq!(p, path),
        other => panic!("second open must be refused with DeviceBusy, got {other:?}"),
    }
    drop(first);
    UringDevice::open(path, opts).expect("open after the first closed");
}

/// A pool of two shards on the whole of `path`, each shard with its own
/// ring on the one locked file: format, write on volumes of both shards,
/// shut down, reopen (the shard count comes from the device), read back.
pub fn two_shard_round_trip(path: &std::path::Path, seed: u64) {
    use sluice_engine::api::{Image, NsName, Reply, Request};
    use sluice_engine::shard::{Engine, EngineOptions};
    use sluice_engine::sharded::{format_uring, open_uring, read_layout, shard_of};
    let opts = UringOptions::default();
    let mut rng = rng(seed);
    // Two volumes on each shard.
    let mut names: Vec<String> = Vec::new();
    for shard in 0..2 {
        names.extend(
            (0..)
                .map(|k| format!("v{k}"))
                .filter(|n| shard_of(n, 2) == shard)
                .take(2),
        );
    }
    let dev = UringDevice::open(path, opts.clone()).expect("open");
    let blocks = dev.info().block_count;
    let pools = format_uring(dev, 2, sluice_engine::FormatOptions::default(), &opts)
        .expect("format 2 shards");
    assert_eq!(pools[1].device().info().block_count, blocks / 2);
    // The shards' rings share the lock: a second opener is still refused.
    assert!(matches!(
        UringDevice::open(path, opts.clone()),
        Err(sluice_engine::Error::DeviceBusy { .. })
    ));
    let h = Engine::start_sharded(pools, EngineOptions::default()).expect("start");
    let mut written: Vec<(String, u64, u8)> = Vec::new();
    let (tx, rx) = crossbeam_channel::unbounded();
    for name in &names {
        h.call(Request::CreateVolume {
            name: name.clone(),
            size_bytes: 16 << 20,
        })
        .expect("create");
        for _ in 0..32 {
            let lba = rng.gen_range(0..4096u64);
            let version = rng.gen_range(1..=255u8);
            written.retain(|(n, l, _)| !(n == name && *l == lba));
            written.push((name.clone(), lba, version));
            let mut data = AlignedBuf::zeroed(1);
            data.as_mut_slice().copy_from_slice(&pattern(lba, version));
            h.submit(
                Request::Write {
                    ns: NsName::volume(name),
                    lba,
                    data,
                    fua: false,
                    replica: false,
                },
                lba,
                tx.clone(),
            );
        }
    }
    for _ in 0..names.len() * 32 {
        let (_, r) = rx.recv().expect("reply");
        assert!(matches!(r, Ok(Reply::Done)), "write: {r:?}");
    }
    h.shutdown().expect("shutdown: final CP on both shards");
    drop(h);

    let dev = UringDevice::open(path, opts.clone()).expect("reopen: the lock was released");
    let (layout, dev) = read_layout(dev).expect("layout");
    assert_eq!(layout.shard_count, 2);
    drop(dev);
    let dev = UringDevice::open(path, opts.clone()).expect("reopen");
    let pools = open_uring(dev, &opts).expect("open 2 shards");
    assert_eq!(pools.len(), 2);
    let h = Engine::start_sharded(pools, EngineOptions::default()).expect("restart");
    match h.call(Request::ListVolumes) {
        Ok(Reply::Volumes(v)) => {
            let mut want = names.clone();
            want.sort();
            assert_eq!(v.iter().map(|v| v.name.clone()).collect::<Vec<_>>(), want);
        }
        other => panic!("list: {other:?}"),
    }
    for (name, lba, version) in &written {
        let r = h.call(Request::Read {
            image: Image {
                ns: NsName::volume(name),
                snapshot: None,
            },
            lba: *lba,
            len_blocks: 1,
        });
        match r {
            Ok(Reply::Data(b)) => assert_eq!(
                b.as_slice(),
                &pattern(*lba, *version)[..],
                "seed {seed}: {name} lba {lba}"
            ),
            other => panic!("read {name} lba {lba}: {other:?}"),
        }
    }
    h.shutdown().expect("shutdown");
}
