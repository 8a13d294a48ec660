//! The space reserve: a pool fills with writes of any size to within a
//! stated margin, and stays consistent when full.
//!
//! The story: a write of n blocks used to reserve about 30 x n free blocks
//! (a whole map path and plane path per block), so on an empty 256 MiB pool
//! a 32 MiB write failed with `NoSpace`, and a batch of queued 1 MiB writes
//! (the replicator's write-behind) reserved 30 x the whole batch. The
//! reserve is now what a CP can need for the write: its data, the map nodes
//! on its lbas' paths and at most a whole live plane (docs/FORMAT.md,
//! "Space reserve").
//!
//! The margin these tests hold the engine to: data written reaches at least
//! the free blocks after the volume is created, minus one write, minus 1 %
//! of the pool (the map leaves that point at the data, 1/168 of it, plus the
//! trim headroom and the CP reserve), minus 16 blocks for each further
//! write queued in the same batch.

// Tests may panic: the engine's no-panic lints (engine/Cargo.toml) are for
// production code; clippy.toml covers #[test] functions, this the helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use sluice_engine::api::*;
use sluice_engine::device::sim::SimDevice;
use sluice_engine::device::AlignedBuf;
use sluice_engine::{Error, FormatOptions, Pool};

/// 256 MiB of 4 KiB blocks.
const POOL_BLOCKS: u64 = 65536;

fn vol() -> NsName {
    NsName::volume("vol")
}

/// A block whose bytes name its lba (so a read back checks placement).
fn fill(lba: u64, n: u64) -> AlignedBuf {
    let mut v = Vec::with_capacity((n * 4096) as usize);
    for l in lba..lba + n {
        v.extend(l.to_le_bytes().iter().copied().cycle().take(4096));
    }
    AlignedBuf::from_slice(&v)
}

fn space(pool: &mut Pool<SimDevice>) -> SpaceInfo {
    match pool.execute(Request::Space) {
        Ok(Reply::Space(s)) => s,
        other => panic!("Space answered {other:?}"),
    }
}

fn read(pool: &mut Pool<SimDevice>, lba: u64) -> Vec<u8> {
    match pool.execute(Request::Read {
        image: Image {
            ns: vol(),
            snapshot: None,
        },
        lba,
        len_blocks: 1,
    }) {
        Ok(Reply::Data(b)) => b.as_slice().to_vec(),
        other => panic!("read of lba {lba} answered {other:?}"),
    }
}

fn write_req(lba: u64, n: u64) -> Request {
    Request::Write {
        ns: vol(),
        lba,
        data: fill(lba, n),
        fua: false,
        replica: false,
    }
}

/// Fill a fresh pool with writes of `chunk` blocks, `batch` of them per
/// `execute_batch`, until `NoSpace`; check the margin, then that the full
/// pool still takes a CP, reopens with its data, and takes writes again
/// after a trim.
fn fill_to_margin(chunk: u64, batch: usize) {
    let dev = SimDevice::new(POOL_BLOCKS);
    let mut pool = Pool::format(dev, FormatOptions::default()).expect("format");
    pool.execute(Request::CreateVolume {
        name: "vol".into(),
        size_bytes: POOL_BLOCKS * 4096,
    })
    .expect("create volume");
    let free_start = space(&mut pool).free_blocks;
    let mut lba = 0u64;
    let mut full = false;
    while !full && lba + chunk <= POOL_BLOCKS {
        let reqs: Vec<Request> = (0..batch as u64)
            .map(|i| lba + i * chunk)
            .take_while(|&l| l + chunk <= POOL_BLOCKS)
            .map(|l| write_req(l, chunk))
            .collect();
        for r in pool.execute_batch(reqs) {
            match r {
                Ok(_) if !full => lba += chunk,
                Ok(_) => panic!("a write after NoSpace in the same batch succeeded"),
                Err(Error::NoSpace { .. }) => full = true,
                Err(e) => panic!("write at lba {lba} of {chunk} blocks: {e}"),
            }
        }
    }
    assert!(full, "a volume as large as the pool never filled it");
    // Each write queued in the same batch reserves its own metadata bound
    // (its map path, at most a whole plane: 16 blocks here) until applied.
    let margin = POOL_BLOCKS / 100 + 16 * (batch as u64 - 1);
    let floor = free_start - chunk - margin;
    eprintln!(
        "chunk {chunk} blocks x batch {batch}: wrote {lba} of {free_start} free blocks \
         (short by {}, floor {floor})",
        free_start - lba
    );
    assert!(
        lba >= floor,
        "wrote {lba} blocks in {chunk}-block writes, below the floor {floor} \
         ({free_start} free - one write - {margin} margin)"
    );
    pool.check_invariants().expect("invariants when full");
    // The full pool can still take a CP (the reserve is for it).
    pool.execute(Request::Flush).expect("flush of a full pool");
    let mut pool = Pool::open(pool.into_device()).expect("reopen a full pool");
    pool.check_invariants().expect("invariants after reopen");
    for l in [0, lba / 2, lba - 1] {
        assert_eq!(read(&mut pool, l), fill(l, 1).as_slice(), "lba {l}");
    }
    // Trimming frees space again, after the CP that makes it free.
    pool.execute(Request::Trim {
        ns: vol(),
        lba: 0,
        len_blocks: chunk.max(256),
        replica: false,
    })
    .expect("trim of a full pool");
    pool.execute(Request::Flush).expect("flush after trim");
    pool.execute(write_req(0, chunk)).expect("write after trim");
    pool.check_invariants().expect("invariants after rewrite");
    assert_eq!(read(&mut pool, chunk - 1), fill(chunk - 1, 1).as_slice());
}

#[test]
fn fills_with_4k_writes() {
    fill_to_margin(1, 1);
}

#[test]
fn fills_with_1m_writes() {
    fill_to_margin(256, 1);
}

#[test]
fn fills_with_32m_writes() {
    fill_to_margin(8192, 1);
}

#[test]
fn fills_with_batches_of_queued_1m_writes() {
    // The replicator's write-behind shape: many 1 MiB writes in one batch.
    fill_to_margin(256, 32);
}

#[test]
fn a_32m_write_fits_an_empty_256m_pool() {
    let mut pool =
        Pool::format(SimDevice::new(POOL_BLOCKS), FormatOptions::default()).expect("format");
    pool.execute(Request::CreateVolume {
        name: "vol".into(),
        size_bytes: POOL_BLOCKS * 4096,
    })
    .expect("create volume");
    pool.execute(write_req(0, 8192)).expect("32 MiB write");
    pool.check_invariants().expect("invariants");
}
