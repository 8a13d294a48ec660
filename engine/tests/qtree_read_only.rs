//! The read-only flag of a qtree (issue 10, item 4).
//!
//! Story: a qtree mirror's destination is a qtree inside an ordinary
//! writable volume, and only volumes had a read-only flag, so NBD clients
//! could write to the destination; the next mirror update then failed its
//! digest check. A qtree now has its own flag (`SetReadOnly` on a qtree
//! namespace), stored in the catalog (format 3): client writes and trims to
//! the qtree are refused with an error naming it, the replicator's writes
//! (`replica: true`) go through, the rest of the volume stays writable, and
//! the flag survives a reopen and a crash at any point. Pools of format 1
//! and 2 (no flags) open with every qtree writable.

// Tests may panic: the engine's no-panic lints (engine/Cargo.toml) are for
// production code; clippy.toml covers #[test] functions, this the helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use sluice_engine::api::*;
use sluice_engine::device::sim::{CrashMode, SimDevice};
use sluice_engine::device::AlignedBuf;
use sluice_engine::format::FORMAT_VERSION;
use sluice_engine::{Error, FormatOptions, Pool};

mod common;

const SIZE: u64 = 64;

fn block(v: u8) -> AlignedBuf {
    let mut b = AlignedBuf::zeroed(1);
    b.as_mut_slice().fill(v);
    b
}

fn q() -> NsName {
    NsName::qtree("vol", "q")
}

fn write(ns: NsName, lba: u64, v: u8, replica: bool) -> Request {
    Request::Write {
        ns,
        lba,
        data: block(v),
        fua: false,
        replica,
    }
}

fn trim(ns: NsName, lba: u64, replica: bool) -> Request {
    Request::Trim {
        ns,
        lba,
        len_blocks: 1,
        replica,
    }
}

fn set_ro(ns: NsName, read_only: bool) -> Request {
    Request::SetReadOnly { ns, read_only }
}

fn read(pool: &mut Pool<SimDevice>, ns: NsName, lba: u64) -> u8 {
    match pool.execute(Request::Read {
        image: Image { ns, snapshot: None },
        lba,
        len_blocks: 1,
    }) {
        Ok(Reply::Data(b)) => {
            let v = b.as_slice()[0];
            assert!(b.as_slice().iter().all(|&x| x == v), "torn block");
            v
        }
        other => panic!("read: {other:?}"),
    }
}

/// (volume read-only, read-only of each qtree by name).
fn flags(pool: &mut Pool<SimDevice>) -> (bool, Vec<(String, bool)>) {
    match pool.execute(Request::ListVolumes) {
        Ok(Reply::Volumes(v)) => (
            v[0].read_only,
            v[0].qtrees
                .iter()
                .map(|q| (q.name.clone(), q.read_only))
                .collect(),
        ),
        other => panic!("list: {other:?}"),
    }
}

/// Volume `vol` with qtrees `q` and `r`, one block written in each
/// namespace.
fn pool_on(dev: SimDevice) -> Pool<SimDevice> {
    let mut pool = Pool::format(dev, FormatOptions::default()).expect("format");
    pool.execute(Request::CreateVolume {
        name: "vol".into(),
        size_bytes: SIZE * 4096,
    })
    .expect("volume");
    for name in ["q", "r"] {
        pool.execute(Request::CreateQtree {
            volume: "vol".into(),
            name: name.into(),
            size_bytes: SIZE * 4096,
        })
        .expect("qtree");
    }
    for (i, ns) in [NsName::volume("vol"), q(), NsName::qtree("vol", "r")]
        .into_iter()
        .enumerate()
    {
        pool.execute(write(ns, 0, i as u8 + 1, false))
            .expect("write");
    }
    pool.execute(Request::Flush).expect("flush");
    pool
}

fn refused_as_qtree(r: sluice_engine::Result<Reply>) {
    match r {
        Err(e @ Error::ReadOnly { what: "qtree", .. }) => {
            assert_eq!(
                e.to_string(),
                "qtree vol/q is read-only (a mirror destination)"
            );
        }
        other => panic!("expected the qtree's read-only refusal, got {other:?}"),
    }
}

#[test]
fn a_read_only_qtree_refuses_client_writes_and_takes_replica_writes() {
    let mut pool = pool_on(SimDevice::new(2048));
    pool.execute(set_ro(q(), true)).expect("set read-only");
    assert_eq!(
        flags(&mut pool),
        (false, vec![("q".into(), true), ("r".into(), false)])
    );
    refused_as_qtree(pool.execute(write(q(), 1, 9, false)));
    refused_as_qtree(pool.execute(trim(q(), 0, false)));
    // A batch of writes takes the same check one by one: the write to q
    // fails, the one to r goes through.
    let res = pool.execute_batch(vec![
        write(q(), 2, 9, false),
        write(NsName::qtree("vol", "r"), 2, 9, false),
    ]);
    assert!(matches!(res[0], Err(Error::ReadOnly { .. })), "{res:?}");
    assert!(res[1].is_ok(), "{res:?}");
    assert_eq!(read(&mut pool, q(), 0), 2, "refused writes changed nothing");
    assert_eq!(read(&mut pool, q(), 2), 0);
    // The volume's own space and the other qtree stay writable.
    pool.execute(write(NsName::volume("vol"), 1, 7, false))
        .expect("the volume's own space is writable");
    pool.execute(trim(NsName::qtree("vol", "r"), 0, false))
        .expect("another qtree is writable");
    // The replicator writes and trims it.
    pool.execute(write(q(), 3, 5, true)).expect("replica write");
    pool.execute(trim(q(), 0, true)).expect("replica trim");
    assert_eq!((read(&mut pool, q(), 3), read(&mut pool, q(), 0)), (5, 0));
    // A read-only volume refuses in all its qtrees, naming the volume.
    pool.execute(set_ro(NsName::volume("vol"), true))
        .expect("volume read-only");
    assert!(matches!(
        pool.execute(write(NsName::qtree("vol", "r"), 4, 1, false)),
        Err(Error::ReadOnly { what: "volume", ref name }) if name == "vol"
    ));
    pool.execute(set_ro(NsName::volume("vol"), false))
        .expect("volume writable");
    // Writable again.
    pool.execute(set_ro(q(), false)).expect("set writable");
    pool.execute(write(q(), 1, 9, false))
        .expect("writable again");
    assert_eq!(read(&mut pool, q(), 1), 9);
    assert!(matches!(
        pool.execute(set_ro(NsName::qtree("vol", "nope"), true)),
        Err(Error::NoSuchQtree { .. })
    ));
    pool.check_invariants().expect("invariants");
}

/// Crash at every device op of the `SetReadOnly` requests, in every crash
/// mode: each image mounts with the flag as before or after the request
/// (after, once the request returned), and a reopen after a clean run has
/// the last one.
#[test]
fn the_flag_survives_reopen_and_a_crash_at_every_point() {
    let reqs = || {
        vec![
            set_ro(q(), true),
            write(q(), 5, 3, true),
            set_ro(q(), false),
            write(q(), 6, 4, false),
            set_ro(q(), true),
        ]
    };
    // The flag after each request.
    let after = [true, true, false, false, true];
    let dev = SimDevice::new(2048);
    let h = dev.handle();
    let mut pool = pool_on(dev);
    let ops0 = h.ops_total();
    for r in reqs() {
        pool.execute(r).expect("clean run");
    }
    let total = h.ops_total() - ops0;
    let mut pool = Pool::open(pool.into_device()).expect("reopen");
    assert!(flags(&mut pool).1[0].1, "the flag after a reopen");
    refused_as_qtree(pool.execute(write(q(), 1, 1, false)));
    assert_eq!((read(&mut pool, q(), 5), read(&mut pool, q(), 6)), (3, 4));

    for n in 0..=total {
        let dev = SimDevice::new(2048);
        let h = dev.handle();
        let mut pool = pool_on(dev);
        h.crash_after_ops(n);
        // The flag the image may show: from the last acknowledged request
        // (SetReadOnly is durable when it returns) to the one that failed.
        let mut done = 0;
        for r in reqs() {
            if pool.execute(r).is_err() {
                break;
            }
            done += 1;
        }
        let lo = if done == 0 { false } else { after[done - 1] };
        let hi = after.get(done).copied().unwrap_or(lo);
        for (mode, seed) in [
            (CrashMode::DropAll, 0),
            (CrashMode::KeepAll, 0),
            (CrashMode::Random, n),
            (CrashMode::Random, n + 1000),
        ] {
            let mut p = Pool::open(h.crash_image(mode, seed))
                .unwrap_or_else(|e| panic!("op {n} {mode:?}: mount: {e}"));
            p.check_invariants()
                .unwrap_or_else(|e| panic!("op {n} {mode:?}: {e}"));
            let ro = flags(&mut p).1[0].1;
            assert!(
                ro == lo || ro == hi,
                "op {n} {mode:?}: after {done} requests the flag is {ro}"
            );
            let r = p.execute(write(q(), 7, 1, false));
            assert_eq!(
                r.is_err(),
                ro,
                "op {n} {mode:?}: a client write when the flag is {ro}: {r:?}"
            );
        }
    }
}

/// A pool written by a format-2 build has no namespace flags: it opens
/// with every qtree writable; its next CP writes the current format, which
/// keeps the flag from then on.
#[test]
fn a_format_2_pool_opens_with_writable_qtrees() {
    let dev = SimDevice::new(2048);
    let sim = dev.handle();
    let pool = pool_on(dev);
    let mut dev = pool.into_device();
    common::downgrade(&mut dev, &sim, 2);
    let mut pool = Pool::open(dev).expect("a format-2 pool opens");
    assert_eq!(
        flags(&mut pool),
        (false, vec![("q".into(), false), ("r".into(), false)])
    );
    assert_eq!(
        (
            read(&mut pool, q(), 0),
            read(&mut pool, NsName::qtree("vol", "r"), 0)
        ),
        (2, 3)
    );
    pool.execute(write(q(), 1, 8, false)).expect("writable");
    pool.execute(set_ro(q(), true)).expect("set read-only");
    let slot = pool.generation() % 2;
    assert_eq!(sim.read_durable(slot)[8..12], FORMAT_VERSION.to_le_bytes());
    let mut pool = Pool::open(pool.into_device()).expect("reopen");
    assert!(flags(&mut pool).1[0].1, "the current format keeps the flag");
    assert_eq!(read(&mut pool, q(), 1), 8);
    pool.check_invariants().expect("invariants");
}
