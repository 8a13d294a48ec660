//! The simulated block device every engine test runs on.
//!
//! [`SimDevice`] keeps two sparse images of the medium:
//! - the *live* image: what a read returns; every completed write lands here
//!   at once;
//! - the *durable* image: what survives a power cut. A FUA write lands here
//!   when it completes; a plain write lands here when a later `Flush` covers
//!   it.
//!
//! Between the two sits the ordered list of *unflushed* writes (one entry per
//! block written). [`SimHandle::crash_image`] builds a new device from the
//! durable image plus none, all, or a random (reordered, possibly torn)
//! subset of those writes.
//!
//! Invariants kept:
//! - Unwritten blocks read as zeroes and cost no memory, so a 1 TiB device is
//!   free until written.
//! - A `Flush` makes durable exactly the writes whose completions were handed
//!   back by `complete` *before the flush was submitted* (the NVMe
//!   volatile-write-cache contract of `device/mod.rs`); writes that are in
//!   flight alongside the flush stay unflushed.
//! - `live == durable + unflushed writes applied in order`, always.
//! - Faults are one-shot; a frozen device (see
//!   [`SimHandle::crash_after_ops`]) fails every request with EIO and changes
//!   neither image.
//!
//! State is shared with cloneable [`SimHandle`]s through `Arc<Mutex<..>>`:
//! this is a test device, so a lock per batch is fine.

use super::{BlockDevice, DeviceInfo, IoCompletion, IoKind, IoRequest, BLOCK_SIZE};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Bytes in one sector: the unit a torn write is cut at.
pub const SECTOR_SIZE: usize = 512;
const SECTORS_PER_BLOCK: usize = BLOCK_SIZE / SECTOR_SIZE;

/// How [`SimHandle::crash_image`] treats writes not yet flushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// Only the durable image survives.
    DropAll,
    /// Every unflushed write reached the medium, in order.
    KeepAll,
    /// A random subset of the unflushed writes reached the medium, possibly
    /// out of order, and some of them torn (only a prefix of their 512-byte
    /// sectors written over the old data).
    Random,
}

/// A one-shot fault: the op of that kind that comes after `after` more
/// successful ops of the same kind fails with EIO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    ReadEio { after: u64 },
    WriteEio { after: u64 },
    FlushEio { after: u64 },
}

/// What the device has done (successful requests only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimCounters {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub blocks_read: u64,
    pub blocks_written: u64,
}

type Block = Box<[u8]>;

#[derive(Debug, Clone)]
struct UnflushedWrite {
    pba: u64,
    data: Block,
    /// Completion sequence number of the write request that carried it.
    seq: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FaultKind {
    Read,
    Write,
    Flush,
}

#[derive(Debug)]
struct SimState {
    block_count: u64,
    live: HashMap<u64, Block>,
    durable: HashMap<u64, Block>,
    unflushed: Vec<UnflushedWrite>,
    /// Write requests executed so far; the next write gets this number.
    write_seq: u64,
    /// Pending one-shot faults: kind and how many more ops succeed first.
    faults: Vec<(FaultKind, u64)>,
    counters: SimCounters,
    /// Write and flush ops that reached the medium (not counting those a
    /// frozen device refused).
    ops_total: u64,
    /// Write/flush ops left before the device freezes; `None`: never.
    ops_until_freeze: Option<u64>,
    frozen: bool,
}

fn zero_block() -> Block {
    vec![0u8; BLOCK_SIZE].into_boxed_slice()
}

fn eio(what: &str) -> std::io::Error {
    std::io::Error::other(format!("sim: {what}: EIO"))
}

impl SimState {
    fn new(block_count: u64) -> Self {
        SimState {
            block_count,
            live: HashMap::new(),
            durable: HashMap::new(),
            unflushed: Vec::new(),
            write_seq: 0,
            faults: Vec::new(),
            counters: SimCounters::default(),
            ops_total: 0,
            ops_until_freeze: None,
            frozen: false,
        }
    }

    /// One op of `kind` is about to run: true if an injected fault fails it.
    fn take_fault(&mut self, kind: FaultKind) -> bool {
        let mut fire = None;
        for (i, (k, after)) in self.faults.iter_mut().enumerate() {
            if *k != kind {
                continue;
            }
            if *after == 0 {
                fire = Some(i);
                break;
            }
            *after -= 1;
        }
        match fire {
            Some(i) => {
                self.faults.remove(i);
                true
            }
            None => false,
        }
    }

    /// One write/flush op is about to reach the medium: false if the device
    /// is (or now becomes) frozen and refuses it.
    fn admit_mutation(&mut self) -> bool {
        if self.frozen {
            return false;
        }
        if let Some(left) = self.ops_until_freeze.as_mut() {
            if *left == 0 {
                self.frozen = true;
                return false;
            }
            *left -= 1;
        }
        self.ops_total += 1;
        true
    }

    fn check_range(&self, pba: u64, len_blocks: usize) -> std::io::Result<()> {
        let end = pba.checked_add(len_blocks as u64);
        match end {
            Some(end) if end <= self.block_count => Ok(()),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "sim: blocks {pba}..+{len_blocks} beyond the device end ({} blocks)",
                    self.block_count
                ),
            )),
        }
    }

    fn execute(
        &mut self,
        req: &mut IoRequest,
        flush_covers_seq: Option<u64>,
    ) -> std::io::Result<()> {
        match req.kind {
            IoKind::Read => {
                let buf = req.buf.as_mut().ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "sim: read without a buffer",
                    )
                })?;
                self.check_range(req.pba, buf.len_blocks())?;
                if self.frozen {
                    return Err(eio("read on a frozen device"));
                }
                if self.take_fault(FaultKind::Read) {
                    return Err(eio("injected read fault"));
                }
                for i in 0..buf.len_blocks() {
                    let dst = buf.block_mut(i);
                    match self.live.get(&(req.pba + i as u64)) {
                        Some(b) => dst.copy_from_slice(b),
                        None => dst.fill(0),
                    }
                }
                self.counters.reads += 1;
                self.counters.blocks_read += buf.len_blocks() as u64;
                Ok(())
            }
            IoKind::Write { fua } => {
                let buf = req.buf.as_ref().ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "sim: write without a buffer",
                    )
                })?;
                self.check_range(req.pba, buf.len_blocks())?;
                if !self.admit_mutation() {
                    return Err(eio("write on a frozen device"));
                }
                if self.take_fault(FaultKind::Write) {
                    return Err(eio("injected write fault"));
                }
                let seq = self.write_seq;
                self.write_seq += 1;
                for i in 0..buf.len_blocks() {
                    let pba = req.pba + i as u64;
                    let data: Block = buf.block(i).into();
                    self.live.insert(pba, data.clone());
                    if fua {
                        // The FUA data is on the medium: older unflushed
                        // versions of this block can no longer surface.
                        self.unflushed.retain(|w| w.pba != pba);
                        self.durable.insert(pba, data);
                    } else {
                        self.unflushed.push(UnflushedWrite { pba, data, seq });
                    }
                }
                self.counters.writes += 1;
                self.counters.blocks_written += buf.len_blocks() as u64;
                Ok(())
            }
            IoKind::Flush => {
                if !self.admit_mutation() {
                    return Err(eio("flush on a frozen device"));
                }
                if self.take_fault(FaultKind::Flush) {
                    return Err(eio("injected flush fault"));
                }
                let covers = flush_covers_seq.unwrap_or(self.write_seq);
                let mut keep = Vec::new();
                for w in std::mem::take(&mut self.unflushed) {
                    if w.seq < covers {
                        self.durable.insert(w.pba, w.data);
                    } else {
                        keep.push(w);
                    }
                }
                self.unflushed = keep;
                self.counters.flushes += 1;
                Ok(())
            }
        }
    }

    fn build_crash_image(&self, mode: CrashMode, seed: u64) -> SimState {
        let mut image = self.durable.clone();
        match mode {
            CrashMode::DropAll => {}
            CrashMode::KeepAll => {
                for w in &self.unflushed {
                    image.insert(w.pba, w.data.clone());
                }
            }
            CrashMode::Random => {
                let mut rng = SmallRng::seed_from_u64(seed);
                // Each unflushed block write: dropped, applied whole, or torn.
                let mut chosen: Vec<(&UnflushedWrite, usize)> = Vec::new();
                for w in &self.unflushed {
                    match rng.gen_range(0..3u8) {
                        0 => {}
                        1 => chosen.push((w, SECTORS_PER_BLOCK)),
                        _ => chosen.push((w, rng.gen_range(1..SECTORS_PER_BLOCK))),
                    }
                }
                if rng.gen_bool(0.5) {
                    chosen.shuffle(&mut rng);
                }
                for (w, sectors) in chosen {
                    let block = image.entry(w.pba).or_insert_with(zero_block);
                    let len = sectors * SECTOR_SIZE;
                    // A torn write: its first `sectors` sectors land.
                    for (dst, src) in block.iter_mut().zip(w.data.iter()).take(len) {
                        *dst = *src;
                    }
                }
            }
        }
        let mut state = SimState::new(self.block_count);
        state.live = image.clone();
        state.durable = image;
        state
    }
}

/// The in-memory device. See the module comment.
pub struct SimDevice {
    info: DeviceInfo,
    state: Arc<Mutex<SimState>>,
    /// Submitted requests not yet executed, with the write sequence number
    /// a flush covers (writes completed before the flush was submitted).
    queued: Vec<(IoRequest, Option<u64>)>,
    /// Set: execute and complete in a random order, and sometimes only part
    /// of the queue per `complete` call.
    shuffle: Option<SmallRng>,
}

impl std::fmt::Debug for SimDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SimDevice({} blocks, {} queued)",
            self.info.block_count,
            self.queued.len()
        )
    }
}

fn lock(state: &Mutex<SimState>) -> MutexGuard<'_, SimState> {
    // A panic while the lock was held can only come from a test that is
    // already failing; its state is still consistent enough to inspect.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl SimDevice {
    /// A zeroed device of `block_count` blocks; costs nothing until written.
    pub fn new(block_count: u64) -> SimDevice {
        Self::from_state(SimState::new(block_count))
    }

    fn from_state(state: SimState) -> SimDevice {
        SimDevice {
            info: DeviceInfo {
                name: "sim".to_string(),
                block_count: state.block_count,
            },
            state: Arc::new(Mutex::new(state)),
            queued: Vec::new(),
            shuffle: None,
        }
    }

    /// Complete requests in a random order drawn from `seed` (and sometimes
    /// only part of the queue per `complete` call); `None`: submission order,
    /// everything at once.
    pub fn set_completion_shuffle(&mut self, seed: Option<u64>) {
        self.shuffle = seed.map(SmallRng::seed_from_u64);
    }

    /// Builder form of [`SimDevice::set_completion_shuffle`].
    pub fn with_completion_shuffle(mut self, seed: u64) -> SimDevice {
        self.set_completion_shuffle(Some(seed));
        self
    }

    /// A handle to inspect and disturb this device from a test.
    pub fn handle(&self) -> SimHandle {
        SimHandle {
            state: Arc::clone(&self.state),
        }
    }
}

impl BlockDevice for SimDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn submit(&mut self, req: IoRequest) {
        let covers = match req.kind {
            IoKind::Flush => Some(lock(&self.state).write_seq),
            _ => None,
        };
        self.queued.push((req, covers));
    }

    fn complete(
        &mut self,
        min_complete: usize,
        out: &mut Vec<IoCompletion>,
    ) -> std::io::Result<usize> {
        if self.queued.is_empty() {
            return Ok(0);
        }
        let take = match self.shuffle.as_mut() {
            None => self.queued.len(),
            Some(rng) => {
                self.queued.shuffle(rng);
                let low = min_complete.max(1).min(self.queued.len());
                rng.gen_range(low..=self.queued.len())
            }
        };
        let batch: Vec<_> = self.queued.drain(..take).collect();
        let mut state = lock(&self.state);
        for (mut req, covers) in batch {
            let result = state.execute(&mut req, covers);
            out.push(IoCompletion {
                tag: req.tag,
                kind: req.kind,
                pba: req.pba,
                result,
                buf: req.buf,
            });
        }
        Ok(take)
    }

    fn in_flight(&self) -> usize {
        self.queued.len()
    }
}

/// A test's view of a [`SimDevice`]: crash images, faults, bit flips,
/// counters. Cloneable and `Send`; shares the device's state.
#[derive(Clone)]
pub struct SimHandle {
    state: Arc<Mutex<SimState>>,
}

impl std::fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SimHandle")
    }
}

impl SimHandle {
    /// A new device whose live and durable images are what the medium would
    /// hold after a power cut now (see [`CrashMode`]). `seed` drives
    /// [`CrashMode::Random`].
    pub fn crash_image(&self, mode: CrashMode, seed: u64) -> SimDevice {
        let state = lock(&self.state).build_crash_image(mode, seed);
        SimDevice::from_state(state)
    }

    /// Arm a one-shot fault.
    pub fn inject(&self, fault: Fault) {
        let entry = match fault {
            Fault::ReadEio { after } => (FaultKind::Read, after),
            Fault::WriteEio { after } => (FaultKind::Write, after),
            Fault::FlushEio { after } => (FaultKind::Flush, after),
        };
        lock(&self.state).faults.push(entry);
    }

    /// Disarm every pending fault and the freeze countdown (a device already
    /// frozen stays frozen).
    pub fn clear_faults(&self) {
        let mut s = lock(&self.state);
        s.faults.clear();
        s.ops_until_freeze = None;
    }

    /// Flip bit `bit_index` (0..32768) of block `pba` in both images (and in
    /// its unflushed versions): silent corruption on the medium. Out-of-range
    /// arguments are ignored.
    pub fn flip_bit(&self, pba: u64, bit_index: usize) {
        let mut s = lock(&self.state);
        if pba >= s.block_count || bit_index >= BLOCK_SIZE * 8 {
            return;
        }
        let (byte, mask) = (bit_index / 8, 1u8 << (bit_index % 8));
        // `byte < BLOCK_SIZE` (checked above) and every block is BLOCK_SIZE
        // bytes, so each `get_mut` finds its byte.
        let flip = |block: &mut [u8]| {
            if let Some(b) = block.get_mut(byte) {
                *b ^= mask;
            }
        };
        flip(s.live.entry(pba).or_insert_with(zero_block));
        flip(s.durable.entry(pba).or_insert_with(zero_block));
        for w in s.unflushed.iter_mut().filter(|w| w.pba == pba) {
            flip(&mut w.data);
        }
    }

    pub fn counters(&self) -> SimCounters {
        lock(&self.state).counters
    }

    /// Block writes completed and not yet durable.
    pub fn unflushed_writes(&self) -> usize {
        lock(&self.state).unflushed.len()
    }

    /// Write and flush ops that reached the device so far (a crash test
    /// counts them in a first run, then freezes at each of them).
    pub fn ops_total(&self) -> u64 {
        lock(&self.state).ops_total
    }

    /// After `n` more write/flush ops, the device freezes: every later
    /// request fails with EIO and neither image changes.
    pub fn crash_after_ops(&self, n: u64) {
        lock(&self.state).ops_until_freeze = Some(n);
    }

    /// True once the freeze set by [`SimHandle::crash_after_ops`] happened.
    pub fn is_frozen(&self) -> bool {
        lock(&self.state).frozen
    }

    /// The durable content of block `pba` (zeroes if never made durable).
    pub fn read_durable(&self, pba: u64) -> Vec<u8> {
        lock(&self.state)
            .durable
            .get(&pba)
            .map_or_else(|| vec![0u8; BLOCK_SIZE], |b| b.to_vec())
    }

    /// The live content of block `pba` (what a read returns now).
    pub fn read_live(&self, pba: u64) -> Vec<u8> {
        lock(&self.state)
            .live
            .get(&pba)
            .map_or_else(|| vec![0u8; BLOCK_SIZE], |b| b.to_vec())
    }
}

/// Convenience for tests: run one request to completion on any device.
pub fn run_one<D: BlockDevice + ?Sized>(
    dev: &mut D,
    req: IoRequest,
) -> std::io::Result<IoCompletion> {
    let tag = req.tag;
    dev.submit(req);
    let mut out = Vec::new();
    let mut found = None;
    let mut others = Vec::new();
    while found.is_none() {
        out.clear();
        dev.complete(1, &mut out)?;
        for c in out.drain(..) {
            if c.tag == tag && found.is_none() {
                found = Some(c);
            } else {
                others.push(c);
            }
        }
        if found.is_none() && dev.in_flight() == 0 {
            return Err(std::io::Error::other("request vanished"));
        }
    }
    if !others.is_empty() {
        return Err(std::io::Error::other(format!(
            "run_one: {} other completions were pending",
            others.len()
        )));
    }
    found.ok_or_else(|| std::io::Error::other("request vanished"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::AlignedBuf;

    fn block_of(byte: u8) -> AlignedBuf {
        AlignedBuf::from_slice(&[byte; BLOCK_SIZE])
    }

    fn write(dev: &mut SimDevice, pba: u64, byte: u8, fua: bool) -> std::io::Result<()> {
        let req = IoRequest {
            tag: pba,
            kind: IoKind::Write { fua },
            pba,
            buf: Some(block_of(byte)),
        };
        run_one(dev, req)?.result
    }

    fn flush(dev: &mut SimDevice) -> std::io::Result<()> {
        run_one(
            dev,
            IoRequest {
                tag: 9999,
                kind: IoKind::Flush,
                pba: 0,
                buf: None,
            },
        )?
        .result
    }

    fn read(dev: &mut SimDevice, pba: u64, len_blocks: usize) -> std::io::Result<Vec<u8>> {
        let req = IoRequest {
            tag: 7,
            kind: IoKind::Read,
            pba,
            buf: Some(AlignedBuf::zeroed(len_blocks)),
        };
        let c = run_one(dev, req)?;
        c.result?;
        Ok(c.buf.map(|b| b.as_slice().to_vec()).unwrap_or_default())
    }

    #[test]
    fn sparse_huge_device_reads_zeroes_and_round_trips() {
        let mut dev = SimDevice::new(1 << 28);
        assert_eq!(dev.info().block_count, 1 << 28);
        assert!(read(&mut dev, (1 << 28) - 1, 1)
            .unwrap()
            .iter()
            .all(|&b| b == 0));
        write(&mut dev, (1 << 28) - 1, 0xab, false).unwrap();
        assert!(read(&mut dev, (1 << 28) - 1, 1)
            .unwrap()
            .iter()
            .all(|&b| b == 0xab));
        // Multi-block write and read.
        let mut buf = AlignedBuf::zeroed(3);
        for i in 0..3 {
            buf.block_mut(i).fill(i as u8 + 1);
        }
        let req = IoRequest {
            tag: 1,
            kind: IoKind::Write { fua: false },
            pba: 10,
            buf: Some(buf),
        };
        run_one(&mut dev, req).unwrap().result.unwrap();
        let data = read(&mut dev, 9, 5).unwrap();
        let expect: Vec<u8> = [0u8, 1, 2, 3, 0]
            .iter()
            .flat_map(|&b| [b; BLOCK_SIZE])
            .collect();
        assert_eq!(data, expect);
        let c = dev.handle().counters();
        assert_eq!(
            c,
            SimCounters {
                reads: 3,
                writes: 2,
                flushes: 0,
                blocks_read: 7,
                blocks_written: 4
            }
        );
    }

    #[test]
    fn out_of_range_and_missing_buffers_fail_per_request() {
        let mut dev = SimDevice::new(8);
        let err = read(&mut dev, 7, 2).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
        let err = write(&mut dev, 8, 1, false).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
        let req = IoRequest {
            tag: 1,
            kind: IoKind::Read,
            pba: u64::MAX,
            buf: Some(AlignedBuf::zeroed(1)),
        };
        assert!(run_one(&mut dev, req).unwrap().result.is_err());
        let req = IoRequest {
            tag: 1,
            kind: IoKind::Write { fua: false },
            pba: 0,
            buf: None,
        };
        assert!(run_one(&mut dev, req).unwrap().result.is_err());
        assert_eq!(dev.handle().counters(), SimCounters::default());
    }

    #[test]
    fn flush_and_fua_make_writes_durable() {
        let mut dev = SimDevice::new(16);
        let h = dev.handle();
        write(&mut dev, 1, 1, false).unwrap();
        write(&mut dev, 2, 2, false).unwrap();
        assert_eq!(h.unflushed_writes(), 2);
        assert_eq!(h.read_durable(1), vec![0; BLOCK_SIZE]);
        assert_eq!(h.read_live(1), vec![1; BLOCK_SIZE]);
        flush(&mut dev).unwrap();
        assert_eq!(h.unflushed_writes(), 0);
        assert_eq!(h.read_durable(1), vec![1; BLOCK_SIZE]);
        assert_eq!(h.read_durable(2), vec![2; BLOCK_SIZE]);
        write(&mut dev, 3, 3, true).unwrap();
        assert_eq!(h.unflushed_writes(), 0);
        assert_eq!(h.read_durable(3), vec![3; BLOCK_SIZE]);
        // FUA over an unflushed write of the same block supersedes it.
        write(&mut dev, 4, 4, false).unwrap();
        write(&mut dev, 4, 5, true).unwrap();
        assert_eq!(h.unflushed_writes(), 0);
        let crashed = h.crash_image(CrashMode::KeepAll, 0);
        assert_eq!(crashed.handle().read_durable(4), vec![5; BLOCK_SIZE]);
        assert_eq!(h.counters().flushes, 1);
        assert_eq!(h.ops_total(), 6);
    }

    #[test]
    fn flush_covers_only_writes_completed_before_its_submission() {
        let mut dev = SimDevice::new(16);
        let h = dev.handle();
        write(&mut dev, 1, 1, false).unwrap();
        // A write in flight together with the flush is not covered by it.
        dev.submit(IoRequest {
            tag: 1,
            kind: IoKind::Flush,
            pba: 0,
            buf: None,
        });
        dev.submit(IoRequest {
            tag: 2,
            kind: IoKind::Write { fua: false },
            pba: 2,
            buf: Some(block_of(2)),
        });
        let mut out = Vec::new();
        assert_eq!(dev.complete(2, &mut out).unwrap(), 2);
        assert!(out.iter().all(|c| c.result.is_ok()));
        assert_eq!(h.read_durable(1), vec![1; BLOCK_SIZE]);
        assert_eq!(h.read_durable(2), vec![0; BLOCK_SIZE]);
        assert_eq!(h.unflushed_writes(), 1);
        // Even when the write executes before the flush in the same batch.
        write(&mut dev, 5, 5, false).unwrap();
        dev.submit(IoRequest {
            tag: 3,
            kind: IoKind::Write { fua: false },
            pba: 3,
            buf: Some(block_of(3)),
        });
        dev.submit(IoRequest {
            tag: 4,
            kind: IoKind::Flush,
            pba: 0,
            buf: None,
        });
        out.clear();
        dev.complete(2, &mut out).unwrap();
        assert_eq!(h.read_durable(5), vec![5; BLOCK_SIZE]);
        assert_eq!(h.read_durable(3), vec![0; BLOCK_SIZE]);
    }

    #[test]
    fn crash_modes() {
        let s = sluice_testkit::seed("crash_modes");
        let mut dev = SimDevice::new(64);
        let h = dev.handle();
        write(&mut dev, 0, 0xaa, false).unwrap();
        flush(&mut dev).unwrap();
        for pba in 1..33 {
            write(&mut dev, pba, pba as u8, false).unwrap();
        }
        write(&mut dev, 0, 0xbb, false).unwrap();
        let dropped = h.crash_image(CrashMode::DropAll, s).handle();
        assert_eq!(dropped.read_durable(0), vec![0xaa; BLOCK_SIZE]);
        assert_eq!(dropped.read_live(5), vec![0; BLOCK_SIZE]);
        assert_eq!(dropped.unflushed_writes(), 0);
        let kept = h.crash_image(CrashMode::KeepAll, s).handle();
        assert_eq!(kept.read_live(0), vec![0xbb; BLOCK_SIZE]);
        for pba in 1..33u64 {
            assert_eq!(kept.read_durable(pba), vec![pba as u8; BLOCK_SIZE]);
        }
        // Random: every block is old, new, or a sector-aligned prefix of new
        // over old; with 33 writes a seed almost surely shows several kinds.
        let mut torn_seen = 0;
        for round in 0..20u64 {
            let r = h
                .crash_image(CrashMode::Random, s.wrapping_add(round))
                .handle();
            for pba in 1..33u64 {
                let b = r.read_durable(pba);
                let new_sectors = b
                    .chunks(SECTOR_SIZE)
                    .take_while(|c| c.iter().all(|&x| x == pba as u8))
                    .count();
                assert!(
                    b[new_sectors * SECTOR_SIZE..].iter().all(|&x| x == 0),
                    "seed {s} round {round}: block {pba} is neither old, new nor torn"
                );
                if new_sectors > 0 && new_sectors < SECTORS_PER_BLOCK {
                    torn_seen += 1;
                }
            }
            let b0 = r.read_durable(0);
            assert!(b0
                .chunks(SECTOR_SIZE)
                .all(|c| c == [0xaa; SECTOR_SIZE] || c == [0xbb; SECTOR_SIZE]));
        }
        assert!(torn_seen > 0, "seed {s}: 640 random writes and none torn");
        // The same seed gives the same image.
        let a = h.crash_image(CrashMode::Random, s).handle();
        let b = h.crash_image(CrashMode::Random, s).handle();
        for pba in 0..33 {
            assert_eq!(a.read_durable(pba), b.read_durable(pba));
        }
        // The crash image is a working device of the same size.
        let mut crashed = h.crash_image(CrashMode::DropAll, s);
        assert_eq!(crashed.info().block_count, 64);
        write(&mut crashed, 63, 9, false).unwrap();
        assert_eq!(read(&mut crashed, 63, 1).unwrap(), vec![9; BLOCK_SIZE]);
        // ... and independent of the original.
        assert_eq!(h.read_live(63), vec![0; BLOCK_SIZE]);
    }

    #[test]
    fn faults_are_one_shot_and_counted_per_kind() {
        let mut dev = SimDevice::new(16);
        let h = dev.handle();
        h.inject(Fault::WriteEio { after: 2 });
        h.inject(Fault::ReadEio { after: 0 });
        h.inject(Fault::FlushEio { after: 1 });
        assert!(read(&mut dev, 0, 1).is_err());
        assert!(read(&mut dev, 0, 1).is_ok());
        write(&mut dev, 1, 1, false).unwrap();
        write(&mut dev, 2, 2, false).unwrap();
        let err = write(&mut dev, 3, 3, false).unwrap_err();
        assert!(err.to_string().contains("EIO"), "{err}");
        assert_eq!(
            h.read_live(3),
            vec![0; BLOCK_SIZE],
            "a failed write changes nothing"
        );
        write(&mut dev, 3, 3, false).unwrap();
        flush(&mut dev).unwrap();
        assert!(flush(&mut dev).is_err());
        flush(&mut dev).unwrap();
        h.inject(Fault::WriteEio { after: 0 });
        h.clear_faults();
        write(&mut dev, 4, 4, false).unwrap();
        let c = h.counters();
        assert_eq!((c.reads, c.writes, c.flushes), (1, 4, 2));
    }

    #[test]
    fn crash_after_ops_freezes_the_device() {
        let mut dev = SimDevice::new(16);
        let h = dev.handle();
        write(&mut dev, 0, 1, false).unwrap();
        h.crash_after_ops(2);
        write(&mut dev, 1, 1, false).unwrap();
        flush(&mut dev).unwrap();
        assert!(!h.is_frozen());
        assert!(write(&mut dev, 2, 2, false).is_err());
        assert!(h.is_frozen());
        assert!(flush(&mut dev).is_err());
        assert!(read(&mut dev, 0, 1).is_err());
        assert_eq!(h.ops_total(), 3);
        assert_eq!(h.read_live(2), vec![0; BLOCK_SIZE]);
        let image = h.crash_image(CrashMode::DropAll, 0);
        assert_eq!(image.handle().read_durable(1), vec![1; BLOCK_SIZE]);
        assert!(!image.handle().is_frozen());
    }

    #[test]
    fn crash_enumeration_pattern() {
        // The redb-style pattern the engine's crash tests use: count ops in
        // a first run, then freeze at each op and check the crash image.
        fn workload(dev: &mut SimDevice) {
            for pba in 0..4u64 {
                let _ = write(dev, pba, pba as u8 + 1, false);
                let _ = flush(dev);
            }
        }
        let mut dev = SimDevice::new(8);
        workload(&mut dev);
        let total = dev.handle().ops_total();
        assert_eq!(total, 8);
        for n in 0..=total {
            let mut dev = SimDevice::new(8);
            let h = dev.handle();
            h.crash_after_ops(n);
            workload(&mut dev);
            let img = h.crash_image(CrashMode::DropAll, 0).handle();
            // Op 2k is write k, op 2k+1 the flush that makes it durable.
            for pba in 0..4u64 {
                let durable = n >= 2 * pba + 2;
                let expect = if durable { pba as u8 + 1 } else { 0 };
                assert_eq!(
                    img.read_durable(pba),
                    vec![expect; BLOCK_SIZE],
                    "n={n} pba={pba}"
                );
            }
        }
    }

    #[test]
    fn flip_bit_changes_both_images() {
        let mut dev = SimDevice::new(4);
        let h = dev.handle();
        write(&mut dev, 1, 0, false).unwrap();
        flush(&mut dev).unwrap();
        h.flip_bit(1, 9);
        h.flip_bit(2, 0);
        h.flip_bit(99, 0);
        h.flip_bit(1, BLOCK_SIZE * 8);
        let live = read(&mut dev, 1, 1).unwrap();
        assert_eq!(live[1], 2);
        assert_eq!(h.read_durable(1)[1], 2);
        assert_eq!(read(&mut dev, 2, 1).unwrap()[0], 1);
        assert_eq!(h.read_durable(2)[0], 1);
    }

    #[test]
    fn shuffled_completion_returns_every_request_once_with_its_buffer() {
        let s =
            sluice_testkit::seed("shuffled_completion_returns_every_request_once_with_its_buffer");
        let mut dev = SimDevice::new(1024).with_completion_shuffle(s);
        for tag in 0..100u64 {
            let kind = if tag % 2 == 0 {
                IoKind::Write { fua: false }
            } else {
                IoKind::Read
            };
            dev.submit(IoRequest {
                tag,
                kind,
                pba: tag,
                buf: Some(block_of(tag as u8)),
            });
        }
        assert_eq!(dev.in_flight(), 100);
        let mut out = Vec::new();
        let mut calls = 0;
        while dev.in_flight() > 0 {
            let n = dev.complete(1, &mut out).unwrap();
            assert!(n >= 1);
            calls += 1;
        }
        assert_eq!(out.len(), 100);
        let mut tags: Vec<u64> = out.iter().map(|c| c.tag).collect();
        let in_order = tags.windows(2).all(|w| w[0] < w[1]);
        tags.sort_unstable();
        assert_eq!(tags, (0..100).collect::<Vec<_>>());
        assert!(!in_order || calls > 1, "seed {s}: shuffle did nothing");
        for c in &out {
            assert!(c.result.is_ok());
            assert_eq!(c.pba, c.tag);
            assert!(c.buf.is_some());
        }
        assert_eq!(dev.complete(0, &mut out).unwrap(), 0);
    }

    #[test]
    fn handle_is_send_and_clone() {
        fn assert_send<T: Send + Clone>() {}
        assert_send::<SimHandle>();
        fn assert_dev<T: BlockDevice>() {}
        assert_dev::<SimDevice>();
    }
}
