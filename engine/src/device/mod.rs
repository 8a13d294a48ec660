//! The one I/O seam of the engine: a block device that takes batches of
//! requests and hands back completions.
//!
//! Three faces implement it: [`uring::UringDevice`] (io_uring, O_DIRECT, the
//! real thing), [`sim::SimDevice`] (an in-memory device with a live and a
//! durable image and fault injection, used by every engine test), and
//! whatever wraps around them ([`region::Region`]: a range of a device, the
//! part of a sharded pool one shard owns).
//!
//! Invariants every implementation keeps:
//! - Addresses are physical block addresses (`pba`) of [`BLOCK_SIZE`] bytes;
//!   a request never crosses `block_count()`.
//! - A buffer handed over in an [`IoRequest`] belongs to the device until
//!   its [`IoCompletion`] returns it; the device never frees or reuses it.
//! - Requests in flight together may complete in any order and are not
//!   ordered against each other on the medium. A `Flush` makes durable every
//!   write that *completed before the flush was submitted*; the engine waits
//!   for the writes it wants covered before it submits the flush (the NVMe
//!   volatile-write-cache contract).
//! - A write with `fua` is durable when it completes.

pub mod buf;
pub mod region;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub mod uring;

pub use buf::{AlignedBuf, BufPool, BufPools};
pub use region::Region;

/// Bytes in one block: the unit of every address and every buffer.
pub const BLOCK_SIZE: usize = 4096;

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    /// Read `buf.len_blocks()` blocks starting at `pba` into `buf`.
    Read,
    /// Write `buf` at `pba`; with `fua` it is durable when it completes.
    Write { fua: bool },
    /// Make every write completed before this submission durable.
    Flush,
}

/// One request. `tag` is the caller's: it comes back in the completion.
#[derive(Debug)]
pub struct IoRequest {
    pub tag: u64,
    pub kind: IoKind,
    pub pba: u64,
    /// The data (write) or the destination (read); `None` for `Flush`.
    pub buf: Option<AlignedBuf>,
}

/// One completion: the request's tag, its outcome, its buffer handed back.
#[derive(Debug)]
pub struct IoCompletion {
    pub tag: u64,
    pub kind: IoKind,
    pub pba: u64,
    pub result: std::io::Result<()>,
    pub buf: Option<AlignedBuf>,
}

/// What a device is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// A name for errors and logs: a path, or `sim`.
    pub name: String,
    pub block_count: u64,
}

/// The seam. Submission queues a request; `complete` pushes every queued
/// request to the device in one batch and collects completions.
pub trait BlockDevice: Send {
    fn info(&self) -> &DeviceInfo;

    /// Queue one request. It may not reach the device until the next
    /// `complete` call (that is the batching).
    fn submit(&mut self, req: IoRequest);

    /// Push queued requests, then wait until at least `min_complete`
    /// completions are available (0: do not wait) and append every
    /// available completion to `out`. Returns how many were appended.
    /// An `Err` means the device itself failed (not one request).
    fn complete(
        &mut self,
        min_complete: usize,
        out: &mut Vec<IoCompletion>,
    ) -> std::io::Result<usize>;

    /// Requests submitted and not yet returned by `complete`.
    fn in_flight(&self) -> usize;
}

impl<D: BlockDevice + ?Sized> BlockDevice for Box<D> {
    fn info(&self) -> &DeviceInfo {
        (**self).info()
    }
    fn submit(&mut self, req: IoRequest) {
        (**self).submit(req)
    }
    fn complete(
        &mut self,
        min_complete: usize,
        out: &mut Vec<IoCompletion>,
    ) -> std::io::Result<usize> {
        (**self).complete(min_complete, out)
    }
    fn in_flight(&self) -> usize {
        (**self).in_flight()
    }
}
