//! The real block device: io_uring on a block device (`/dev/loopN`, NVMe) or
//! a regular file.
//!
//! What it owns: the ring, the open file (registered as fixed file 0), an
//! arena of registered 4 KiB staging buffers, and every caller buffer while
//! its request is in flight.
//!
//! How a request travels: `submit` only queues it (no syscall); `complete`
//! turns queued requests into SQEs and hands them to the kernel with one
//! `submit_and_wait`, then reaps the CQ. A one-block read or write uses a
//! free registered staging buffer (`ReadFixed`/`WriteFixed`, one 4 KiB copy,
//! no page pinning per I/O); everything else goes zero-copy from the caller's
//! [`AlignedBuf`] with plain `Read`/`Write`. FUA is `RWF_DSYNC` on the write;
//! `Flush` is `fsync(IORING_FSYNC_DATASYNC)`.
//!
//! Invariants kept:
//! - A buffer the kernel may touch (a caller buffer in flight, the staging
//!   arena) is never freed or moved before its CQE is reaped: in-flight
//!   buffers live in `slab`, and `Drop` waits for every SQE in the ring.
//! - At most `cq_capacity` requests are in the ring, so the CQ never
//!   overflows; the rest wait in `queued`.
//! - Exclusive access: block devices are opened `O_EXCL`, files are
//!   `flock(LOCK_EX|LOCK_NB)`ed; a second opener gets
//!   [`Error::DeviceBusy`]. [`UringDevice::open_another_ring`] gives a
//!   shard its own ring (and registered file and buffers) on the same open
//!   file: the fd and its lock are shared (`Arc`), and the lock is released
//!   when the last ring on it closes.
//! - Per-request errors carry the path, the op and the block address; a
//!   short transfer is an error, never a silent partial success. Before it
//!   is one, a request answered `EAGAIN`, `EINTR` or short is submitted
//!   again, whole, up to [`RETRIES_MAX`] times (regular files may move
//!   fewer bytes than asked; the same range again is idempotent here).
//!
//! Sharp edges: where `O_DIRECT` is refused (EINVAL at open: ramfs, some
//! FUSE file systems) the device falls back to buffered I/O, logs a warning
//! and reports it in [`UringDevice::direct_io`]; then FUA and Flush still
//! give durability (they sync the page cache), only speed differs.

use super::{AlignedBuf, BlockDevice, DeviceInfo, IoCompletion, IoKind, IoRequest, BLOCK_SIZE};
use crate::error::{Error, Result};
use io_uring::{opcode, squeue, types, IoUring};
use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How to open a [`UringDevice`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UringOptions {
    /// Submission queue entries (rounded up to a power of two by the
    /// kernel); the completion queue holds twice as many, which bounds the
    /// requests in the ring at once.
    pub ring_entries: u32,
    /// Try `O_DIRECT` (falling back to buffered I/O where refused);
    /// `false`: buffered I/O from the start.
    pub direct_io: bool,
    /// Registered 4 KiB staging buffers for one-block requests; 0 disables
    /// registered buffers (every request goes zero-copy from its caller's
    /// buffer).
    pub fixed_buffers: u16,
}

impl Default for UringOptions {
    fn default() -> Self {
        UringOptions {
            ring_entries: 256,
            direct_io: true,
            fixed_buffers: 128,
        }
    }
}

/// A request in the ring.
struct InFlight {
    tag: u64,
    kind: IoKind,
    pba: u64,
    buf: Option<AlignedBuf>,
    /// Staging buffer index when the request uses a registered buffer.
    slot: Option<u16>,
    /// Bytes the request must transfer (0 for Flush).
    len_bytes: usize,
    /// Submissions of this request before this one (see [`RETRIES_MAX`]).
    attempt: u8,
}

/// Times a request is submitted again, whole, when the kernel answers it
/// with `EAGAIN` or `EINTR`, or moves fewer bytes than asked (a short
/// transfer: legal for regular files). Reads and writes of the same range
/// are idempotent here (a write's buffer is kept until it completes, and
/// the engine never has two requests in flight on one block), so the
/// whole request goes again; after the last try the error stands.
const RETRIES_MAX: u8 = 4;

/// A completion result a test puts in place of the kernel's
/// ([`UringDevice::fake_next_results`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeResult {
    /// The kernel's result, as it came.
    Real,
    /// Half the bytes (a short transfer; the kernel did move them all, so
    /// a retry is what makes the request whole either way).
    Short,
    /// This errno, negated, as the kernel reports one.
    Errno(i32),
}

/// The open, exclusively held file or block device, shared by every ring
/// opened on it; unlocks when the last ring is gone.
struct LockedFile {
    file: File,
    path: PathBuf,
    block_device: bool,
    direct_io: bool,
    size_bytes: u64,
}

impl Drop for LockedFile {
    fn drop(&mut self) {
        if !self.block_device {
            // SAFETY: flock on an fd we own; no memory is passed.
            unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
        }
    }
}

/// The io_uring device. See the module comment.
pub struct UringDevice {
    // Field order matters for Drop: the ring (which still references the
    // registered arena) is closed before the arena is freed.
    ring: IoUring,
    info: DeviceInfo,
    path: PathBuf,
    /// Keeps the fd (registered as fixed file 0) and its lock alive.
    file: Arc<LockedFile>,
    direct_io: bool,
    block_device: bool,
    /// Registered staging buffers: `fixed_buffers` blocks, slot i is block i.
    arena: Option<AlignedBuf>,
    free_slots: Vec<u16>,
    /// Submitted by the caller, not yet in the ring.
    /// Requests not in the ring yet, with their attempt number.
    queued: VecDeque<(IoRequest, u8)>,
    /// Tests: the next completions' results, replacing the kernel's (a
    /// short transfer or `-EAGAIN` the kernel would rarely give).
    fake_results: VecDeque<FakeResult>,
    /// Requests submitted again ([`RETRIES_MAX`]).
    retried: u64,
    /// Completions decided without the kernel (malformed requests).
    ready: Vec<IoCompletion>,
    /// In-ring requests, indexed by `user_data`.
    slab: Vec<Option<InFlight>>,
    free_ids: Vec<u32>,
    in_ring: usize,
    cq_capacity: usize,
    /// Reusable CQE scratch (user_data, result).
    cqes: Vec<(u64, i32)>,
}

impl std::fmt::Debug for UringDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringDevice")
            .field("path", &self.path)
            .field("block_count", &self.info.block_count)
            .field("direct_io", &self.direct_io)
            .field("block_device", &self.block_device)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

nix::ioctl_read!(blk_get_size64, 0x12, 114, u64);

fn open_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::DeviceOpen {
        path: path.to_path_buf(),
        op,
        source,
    }
}

fn open_raw(path: &Path, extra_flags: i32) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(extra_flags)
        .open(path)
}

impl UringDevice {
    /// Create (or grow) a regular file of `size_bytes` at `path` and open it.
    pub fn create(path: &Path, size_bytes: u64, opts: UringOptions) -> Result<UringDevice> {
        if size_bytes == 0 || !size_bytes.is_multiple_of(BLOCK_SIZE as u64) {
            return Err(Error::DeviceSize {
                path: path.to_path_buf(),
                size_bytes,
            });
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(open_err(path, "create"))?;
        let len = file.metadata().map_err(open_err(path, "stat"))?.len();
        if len < size_bytes {
            file.set_len(size_bytes)
                .map_err(open_err(path, "set length"))?;
        }
        drop(file);
        Self::open(path, opts)
    }

    /// Open a block device or a regular file exclusively.
    pub fn open(path: &Path, opts: UringOptions) -> Result<UringDevice> {
        let meta = std::fs::metadata(path).map_err(open_err(path, "stat"))?;
        let block_device = meta.file_type().is_block_device();
        if !block_device && !meta.file_type().is_file() {
            return Err(Error::DeviceOpen {
                path: path.to_path_buf(),
                op: "check type",
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "neither a block device nor a regular file",
                ),
            });
        }
        let excl = if block_device { libc::O_EXCL } else { 0 };
        let busy = |e: std::io::Error, op| {
            if e.raw_os_error() == Some(libc::EBUSY) {
                Error::DeviceBusy {
                    path: path.to_path_buf(),
                }
            } else {
                Error::DeviceOpen {
                    path: path.to_path_buf(),
                    op,
                    source: e,
                }
            }
        };
        let (file, direct_io) = if opts.direct_io {
            match open_raw(path, excl | libc::O_DIRECT) {
                Ok(f) => (f, true),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::warn!(
                        path = %path.display(),
                        "O_DIRECT refused by the file system; falling back to buffered I/O"
                    );
                    (
                        open_raw(path, excl).map_err(|e| busy(e, "open (buffered)"))?,
                        false,
                    )
                }
                Err(e) => return Err(busy(e, "open (O_DIRECT)")),
            }
        } else {
            (
                open_raw(path, excl).map_err(|e| busy(e, "open (buffered)"))?,
                false,
            )
        };
        let fd = file.as_raw_fd();
        if !block_device {
            // SAFETY: flock on an fd we own; no memory is passed.
            let rc = unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    Error::DeviceBusy {
                        path: path.to_path_buf(),
                    }
                } else {
                    Error::DeviceOpen {
                        path: path.to_path_buf(),
                        op: "flock",
                        source: e,
                    }
                });
            }
        }
        let size_bytes = if block_device {
            let mut size = 0u64;
            // SAFETY: BLKGETSIZE64 writes one u64 into `size`, which outlives the call.
            unsafe { blk_get_size64(fd, &mut size) }
                .map_err(|e| open_err(path, "BLKGETSIZE64")(std::io::Error::from(e)))?;
            size
        } else {
            meta.len()
        };
        if size_bytes == 0 || !size_bytes.is_multiple_of(BLOCK_SIZE as u64) {
            return Err(Error::DeviceSize {
                path: path.to_path_buf(),
                size_bytes,
            });
        }

        let shared = Arc::new(LockedFile {
            file,
            path: path.to_path_buf(),
            block_device,
            direct_io,
            size_bytes,
        });
        let dev = Self::with_ring(shared, &opts)?;
        tracing::info!(path = %path.display(), size_bytes, direct_io, block_device, "device opened");
        Ok(dev)
    }

    /// Another ring on the device this one holds: its own io_uring,
    /// registered file and registered buffers, on the same open file (so
    /// the exclusive lock taken by [`UringDevice::open`] covers it; a
    /// second `open` of the same path would be refused as busy). This is
    /// how each shard of a pool gets its own ring.
    pub fn open_another_ring(&self, opts: &UringOptions) -> Result<UringDevice> {
        Self::with_ring(self.file.clone(), opts)
    }

    fn with_ring(shared: Arc<LockedFile>, opts: &UringOptions) -> Result<UringDevice> {
        let path = shared.path.as_path();
        let fd = shared.file.as_raw_fd();
        let (direct_io, block_device, size_bytes) =
            (shared.direct_io, shared.block_device, shared.size_bytes);
        let ring =
            IoUring::new(opts.ring_entries.max(2)).map_err(open_err(path, "io_uring_setup"))?;
        ring.submitter()
            .register_files(&[fd])
            .map_err(open_err(path, "io_uring register_files"))?;
        let cq_capacity = ring.params().cq_entries() as usize;

        let mut arena = None;
        let mut free_slots = Vec::new();
        if opts.fixed_buffers > 0 {
            let mut buf = AlignedBuf::zeroed(opts.fixed_buffers as usize);
            let base = buf.as_mut_ptr();
            let iovecs: Vec<libc::iovec> = (0..opts.fixed_buffers as usize)
                .map(|i| libc::iovec {
                    // SAFETY: i < fixed_buffers, so the offset stays inside the arena.
                    iov_base: unsafe { base.add(i * BLOCK_SIZE) }.cast(),
                    iov_len: BLOCK_SIZE,
                })
                .collect();
            // SAFETY: the arena is a heap allocation that never moves and is
            // freed only after the ring (field order of UringDevice), so the
            // kernel's registered pointers stay valid.
            match unsafe { ring.submitter().register_buffers(&iovecs) } {
                Ok(()) => {
                    arena = Some(buf);
                    free_slots = (0..opts.fixed_buffers).rev().collect();
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e,
                        "cannot register io_uring buffers (RLIMIT_MEMLOCK?); using caller buffers only");
                }
            }
        }
        Ok(UringDevice {
            ring,
            info: DeviceInfo {
                name: path.display().to_string(),
                block_count: size_bytes / BLOCK_SIZE as u64,
            },
            path: path.to_path_buf(),
            file: shared,
            direct_io,
            block_device,
            arena,
            free_slots,
            queued: VecDeque::new(),
            fake_results: VecDeque::new(),
            retried: 0,
            ready: Vec::new(),
            slab: Vec::new(),
            free_ids: Vec::new(),
            in_ring: 0,
            cq_capacity,
            cqes: Vec::new(),
        })
    }

    /// True when I/O bypasses the page cache (`O_DIRECT` accepted).
    pub fn direct_io(&self) -> bool {
        self.direct_io
    }

    /// True when the path is a block device (else a regular file).
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Registered staging buffers in use (0 when registration is off).
    pub fn fixed_buffers(&self) -> usize {
        self.arena.as_ref().map_or(0, |a| a.len_blocks())
    }

    fn op_name(kind: IoKind) -> &'static str {
        match kind {
            IoKind::Read => "read",
            IoKind::Write { fua: false } => "write",
            IoKind::Write { fua: true } => "write (FUA)",
            IoKind::Flush => "flush",
        }
    }

    fn request_error(
        &self,
        kind: IoKind,
        pba: u64,
        kind_io: std::io::ErrorKind,
        what: &str,
    ) -> std::io::Error {
        std::io::Error::new(
            kind_io,
            format!(
                "{}: {} at block {pba}: {what}",
                self.path.display(),
                Self::op_name(kind)
            ),
        )
    }

    /// A malformed request, or `None` if it may go to the kernel.
    fn validate(&self, req: &IoRequest) -> Option<std::io::Error> {
        let len_blocks = match (req.kind, &req.buf) {
            (IoKind::Flush, _) => return None,
            (_, None) => {
                return Some(self.request_error(
                    req.kind,
                    req.pba,
                    std::io::ErrorKind::InvalidInput,
                    "no buffer",
                ))
            }
            (_, Some(b)) => b.len_blocks(),
        };
        let in_range = req
            .pba
            .checked_add(len_blocks as u64)
            .is_some_and(|end| end <= self.info.block_count);
        if !in_range {
            return Some(self.request_error(
                req.kind,
                req.pba,
                std::io::ErrorKind::InvalidInput,
                &format!(
                    "{len_blocks} blocks beyond the device end ({} blocks)",
                    self.info.block_count
                ),
            ));
        }
        if len_blocks * BLOCK_SIZE > u32::MAX as usize {
            return Some(self.request_error(
                req.kind,
                req.pba,
                std::io::ErrorKind::InvalidInput,
                "request too large",
            ));
        }
        None
    }

    /// Requests submitted again after `EAGAIN`, `EINTR` or a short
    /// transfer, since open.
    pub fn retried(&self) -> u64 {
        self.retried
    }

    /// Tests only: the results of the next completions, in the order they
    /// are reaped, instead of the kernel's.
    #[cfg(any(test, feature = "sim"))]
    #[doc(hidden)]
    pub fn fake_next_results(&mut self, results: impl IntoIterator<Item = FakeResult>) {
        self.fake_results.extend(results);
    }

    /// Move queued requests into the SQ while the CQ has room for them.
    fn push_queued(&mut self) -> std::io::Result<()> {
        while self.in_ring < self.cq_capacity {
            let Some((mut req, attempt)) = self.queued.pop_front() else {
                break;
            };
            if self.ring.submission().is_full() {
                // Hand the full SQ to the kernel without waiting.
                if let Err(e) = self.ring.submit() {
                    self.queued.push_front((req, attempt));
                    return Err(e);
                }
            }
            let id = match self.free_ids.pop() {
                Some(id) => id,
                None => {
                    self.slab.push(None);
                    (self.slab.len() - 1) as u32
                }
            };
            let offset = req.pba * BLOCK_SIZE as u64;
            let fd = types::Fixed(0);
            let mut slot = None;
            let len_bytes = req.buf.as_ref().map_or(0, |b| b.len_bytes());
            let single = req.buf.as_ref().is_some_and(|b| b.len_blocks() == 1);
            if single && !matches!(req.kind, IoKind::Flush) {
                slot = self.free_slots.pop();
            }
            let entry: squeue::Entry = match (req.kind, slot, self.arena.as_mut(), req.buf.as_mut())
            {
                (IoKind::Flush, ..) => opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build(),
                (IoKind::Read, Some(s), Some(arena), Some(_)) => {
                    let ptr = arena.block_mut(s as usize).as_mut_ptr();
                    opcode::ReadFixed::new(fd, ptr, BLOCK_SIZE as u32, s)
                        .offset(offset)
                        .build()
                }
                (IoKind::Write { fua }, Some(s), Some(arena), Some(buf)) => {
                    let dst = arena.block_mut(s as usize);
                    dst.copy_from_slice(buf.block(0));
                    let ptr = dst.as_ptr();
                    opcode::WriteFixed::new(fd, ptr, BLOCK_SIZE as u32, s)
                        .offset(offset)
                        .rw_flags(if fua { libc::RWF_DSYNC } else { 0 })
                        .build()
                }
                (IoKind::Read, _, _, Some(buf)) => {
                    opcode::Read::new(fd, buf.as_mut_ptr(), len_bytes as u32)
                        .offset(offset)
                        .build()
                }
                (IoKind::Write { fua }, _, _, Some(buf)) => {
                    opcode::Write::new(fd, buf.as_mut_ptr(), len_bytes as u32)
                        .offset(offset)
                        .rw_flags(if fua { libc::RWF_DSYNC } else { 0 })
                        .build()
                }
                (_, _, _, None) => {
                    // validate() refused these in submit(); keep the device honest anyway.
                    let err = self.request_error(
                        req.kind,
                        req.pba,
                        std::io::ErrorKind::InvalidInput,
                        "no buffer",
                    );
                    self.free_ids.push(id);
                    self.ready.push(IoCompletion {
                        tag: req.tag,
                        kind: req.kind,
                        pba: req.pba,
                        result: Err(err),
                        buf: None,
                    });
                    continue;
                }
            };
            let entry = entry.user_data(id as u64);
            // SAFETY: every pointer in `entry` points into the staging arena
            // or into `req.buf`, which moves into `slab` below (its heap
            // memory does not move) and stays there until the CQE is reaped.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_err() {
                // Cannot happen: we submitted when the SQ was full. Put it back.
                if let Some(s) = slot {
                    self.free_slots.push(s);
                }
                self.free_ids.push(id);
                self.queued.push_front((req, attempt));
                break;
            }
            if let Some(cell) = self.slab.get_mut(id as usize) {
                *cell = Some(InFlight {
                    tag: req.tag,
                    kind: req.kind,
                    pba: req.pba,
                    buf: req.buf,
                    slot,
                    len_bytes,
                    attempt,
                });
            }
            self.in_ring += 1;
        }
        Ok(())
    }

    /// Move every available CQE into `out`.
    fn reap(&mut self, out: &mut Vec<IoCompletion>) {
        self.cqes.clear();
        self.cqes
            .extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for i in 0..self.cqes.len() {
            let Some(&(id, res)) = self.cqes.get(i) else {
                break;
            };
            let Some(f) = self.slab.get_mut(id as usize).and_then(Option::take) else {
                tracing::error!(path = %self.path.display(), id, "completion for an unknown request; ignored");
                continue;
            };
            self.free_ids.push(id as u32);
            self.in_ring -= 1;
            let InFlight {
                tag,
                kind,
                pba,
                mut buf,
                slot,
                len_bytes,
                attempt,
            } = f;
            let res = match self.fake_results.pop_front() {
                Some(FakeResult::Short) if len_bytes > 0 => res.min(len_bytes as i32 / 2),
                Some(FakeResult::Errno(e)) => -e,
                _ => res,
            };
            let again = res == -libc::EAGAIN
                || res == -libc::EINTR
                || (res >= 0 && (res as usize) < len_bytes && !matches!(kind, IoKind::Flush));
            if again && attempt < RETRIES_MAX {
                // Whole, at the front: it keeps its place before what
                // was submitted after it.
                if let Some(s) = slot {
                    self.free_slots.push(s);
                }
                self.retried += 1;
                tracing::debug!(path = %self.path.display(), op = Self::op_name(kind), pba, res, attempt, "I/O submitted again");
                self.queued.push_front((
                    IoRequest {
                        tag,
                        kind,
                        pba,
                        buf,
                    },
                    attempt + 1,
                ));
                continue;
            }
            let result = if res < 0 {
                let os = std::io::Error::from_raw_os_error(-res);
                Err(self.request_error(kind, pba, os.kind(), &os.to_string()))
            } else if res as usize != len_bytes && !matches!(kind, IoKind::Flush) {
                let k = match kind {
                    IoKind::Read => std::io::ErrorKind::UnexpectedEof,
                    _ => std::io::ErrorKind::WriteZero,
                };
                Err(self.request_error(
                    kind,
                    pba,
                    k,
                    &format!("short transfer: {res} of {len_bytes} bytes"),
                ))
            } else {
                Ok(())
            };
            if let Some(s) = slot {
                if let (IoKind::Read, Ok(()), Some(arena), Some(b)) =
                    (kind, &result, self.arena.as_ref(), buf.as_mut())
                {
                    b.block_mut(0).copy_from_slice(arena.block(s as usize));
                }
                self.free_slots.push(s);
            }
            out.push(IoCompletion {
                tag,
                kind,
                pba,
                result,
                buf,
            });
        }
    }

    /// `submit_and_wait`, retrying on EINTR; on EBUSY (CQ backlog) it
    /// returns so the caller reaps first.
    fn enter(&mut self, want: usize) -> std::io::Result<()> {
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => {
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!("{}: io_uring_enter: {e}", self.path.display()),
                    ))
                }
            }
        }
    }
}

impl BlockDevice for UringDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn submit(&mut self, req: IoRequest) {
        match self.validate(&req) {
            None => self.queued.push_back((req, 0)),
            Some(err) => self.ready.push(IoCompletion {
                tag: req.tag,
                kind: req.kind,
                pba: req.pba,
                result: Err(err),
                buf: req.buf,
            }),
        }
    }

    fn complete(
        &mut self,
        min_complete: usize,
        out: &mut Vec<IoCompletion>,
    ) -> std::io::Result<usize> {
        let start = out.len();
        out.append(&mut self.ready);
        loop {
            self.push_queued()?;
            let have = out.len() - start;
            let want = min_complete.saturating_sub(have).min(self.in_ring);
            self.enter(want)?;
            self.reap(out);
            out.append(&mut self.ready);
            let have = out.len() - start;
            let nothing_left = self.in_ring == 0 && self.queued.is_empty();
            if have >= min_complete || nothing_left {
                let room = self.in_ring < self.cq_capacity;
                if self.queued.is_empty() || !room {
                    break;
                }
            }
        }
        Ok(out.len() - start)
    }

    fn in_flight(&self) -> usize {
        self.queued.len() + self.ready.len() + self.in_ring
    }
}

impl Drop for UringDevice {
    fn drop(&mut self) {
        // The kernel may still write into buffers held in `slab`: wait for
        // every SQE before those buffers (and the arena) are freed.
        let mut sink = Vec::new();
        while self.in_ring > 0 {
            if self.enter(self.in_ring).is_err() {
                tracing::error!(path = %self.path.display(), in_ring = self.in_ring,
                    "cannot drain the ring at close; leaking its buffers");
                for f in self.slab.iter_mut().filter_map(Option::take) {
                    std::mem::forget(f.buf);
                }
                if let Some(a) = self.arena.take() {
                    std::mem::forget(a);
                }
                return;
            }
            self.reap(&mut sink);
            sink.clear();
        }
        // The ring holds its own reference to the registered file and is
        // torn down asynchronously by the kernel: release the registration
        // now; the lock goes with the last ring on the file (LockedFile's
        // drop), so a reopen right after that succeeds.
        let _ = self.ring.submitter().unregister_files();
    }
}
