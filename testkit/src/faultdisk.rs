//! A disk that fails on demand: a FUSE file server speaking the kernel
//! protocol on `/dev/fuse` directly (no libfuse), serving ONE regular file
//! backed by a real file, with injectable faults ([`Fault`]) and a volatile
//! 4 KiB-block write cache that [`FaultControl::power_cut`] can lose.
//! [`LoopDev`] attaches a loop device over it, so an engine sees a real
//! block device that fails.
//!
//! Invariants: the backing file holds exactly what was made durable by an
//! FSYNC, plus whatever the cache wrote back early (cap overflow, or the
//! seeded survivors of a power cut). A faulted op (-EIO) changes nothing:
//! an EIO write does not touch the cache, an EIO fsync leaves the cache as
//! it was. Nothing the kernel sends panics a worker; a short request gets
//! EINVAL, an unknown opcode ENOSYS. Drop never hangs: flush, lazy unmount,
//! abort the connection, join.

use rand::Rng;
use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const BLOCK: u64 = 4096;
const CACHE_CAP_BLOCKS: usize = 64 * 1024 * 1024 / BLOCK as usize;
const MAX_WRITE: u32 = 128 * 1024;
const BUF_LEN: usize = MAX_WRITE as usize + 64 * 1024;
const WORKERS: usize = 4;
const IN_HDR: usize = 40;
const OUT_HDR: usize = 16;

/// The fault the disk answers with now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    Eio {
        reads: bool,
        writes: bool,
        flushes: bool,
    },
    Delay(Duration),
}

/// What the disk has seen (cumulative).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub eio_reads: u64,
    pub eio_writes: u64,
    pub eio_flushes: u64,
    pub delayed: u64,
    pub power_cuts: u64,
    pub lost_blocks: u64,
}

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    eio_reads: AtomicU64,
    eio_writes: AtomicU64,
    eio_flushes: AtomicU64,
    delayed: AtomicU64,
    power_cuts: AtomicU64,
    lost_blocks: AtomicU64,
}

/// The control side of a [`FaultDisk`] (Send + Sync).
pub struct FaultControl {
    fault: Mutex<Fault>,
    counters: Counters,
    /// Block index -> 4 KiB overlay not yet durable.
    cache: Mutex<BTreeMap<u64, Box<[u8]>>>,
    backing: File,
    size_bytes: u64,
}

impl FaultControl {
    pub fn set(&self, f: Fault) {
        *self.fault.lock().unwrap_or_else(|e| e.into_inner()) = f;
    }
    pub fn fault(&self) -> Fault {
        *self.fault.lock().unwrap_or_else(|e| e.into_inner())
    }
    pub fn counts(&self) -> FaultCounts {
        let c = &self.counters;
        FaultCounts {
            reads: c.reads.load(Relaxed),
            writes: c.writes.load(Relaxed),
            flushes: c.flushes.load(Relaxed),
            eio_reads: c.eio_reads.load(Relaxed),
            eio_writes: c.eio_writes.load(Relaxed),
            eio_flushes: c.eio_flushes.load(Relaxed),
            delayed: c.delayed.load(Relaxed),
            power_cuts: c.power_cuts.load(Relaxed),
            lost_blocks: c.lost_blocks.load(Relaxed),
        }
    }
    /// Power loss: every cached (not fsynced) block is dropped, except a
    /// seeded random half (on average) written back, as a device cache may
    /// have. Returns how many blocks were lost.
    pub fn power_cut(&self, seed: u64) -> u64 {
        let mut rng = crate::rng(seed);
        let mut cache = self.lock_cache();
        let mut lost = 0u64;
        for (blk, data) in std::mem::take(&mut *cache) {
            if rng.gen_bool(0.5) {
                let _ = self.backing.write_all_at(&data, blk * BLOCK);
            } else {
                lost += 1;
            }
        }
        let _ = self.backing.sync_data();
        self.counters.power_cuts.fetch_add(1, Relaxed);
        self.counters.lost_blocks.fetch_add(lost, Relaxed);
        lost
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Box<[u8]>>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Write the cache back and make it durable.
    fn writeback(&self, cache: &mut BTreeMap<u64, Box<[u8]>>) -> io::Result<()> {
        for (blk, data) in cache.iter() {
            self.backing.write_all_at(data, blk * BLOCK)?;
        }
        self.backing.sync_data()?;
        cache.clear();
        Ok(())
    }

    fn read(&self, off: u64, len: usize) -> io::Result<Vec<u8>> {
        let end = (off + len as u64).min(self.size_bytes);
        if off >= end {
            return Ok(Vec::new());
        }
        let mut out = vec![0u8; (end - off) as usize];
        let cache = self.lock_cache();
        self.backing.read_exact_at(&mut out, off)?;
        let (first, last) = (off / BLOCK, (end - 1) / BLOCK);
        for (blk, data) in cache.range(first..=last) {
            let bs = blk * BLOCK;
            let (s, e) = (bs.max(off), (bs + BLOCK).min(end));
            out[(s - off) as usize..(e - off) as usize]
                .copy_from_slice(&data[(s - bs) as usize..(e - bs) as usize]);
        }
        Ok(out)
    }

    // The miss path reads the block with `?`, which an entry closure cannot.
    #[allow(clippy::map_entry)]
    fn write(&self, off: u64, src: &[u8]) -> io::Result<usize> {
        let end = (off + src.len() as u64).min(self.size_bytes);
        if off >= end {
            return Ok(0);
        }
        let mut cache = self.lock_cache();
        let mut pos = off;
        while pos < end {
            let blk = pos / BLOCK;
            let bs = blk * BLOCK;
            let e = (bs + BLOCK).min(end);
            if !cache.contains_key(&blk) {
                let mut b = vec![0u8; BLOCK as usize].into_boxed_slice();
                let have = (self.size_bytes - bs).min(BLOCK) as usize;
                self.backing.read_exact_at(&mut b[..have], bs)?;
                cache.insert(blk, b);
            }
            if let Some(b) = cache.get_mut(&blk) {
                b[(pos - bs) as usize..(e - bs) as usize]
                    .copy_from_slice(&src[(pos - off) as usize..(e - off) as usize]);
            }
            pos = e;
        }
        if cache.len() > CACHE_CAP_BLOCKS {
            // An early write-back is what a device cache may do anyway.
            for (blk, data) in std::mem::take(&mut *cache) {
                self.backing.write_all_at(&data, blk * BLOCK)?;
            }
        }
        Ok((end - off) as usize)
    }
}

/// A mounted fault disk (see the module doc).
pub struct FaultDisk {
    path: PathBuf,
    control: Arc<FaultControl>,
    dev: File,
    conn: u64,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl FaultDisk {
    /// Serve `backing` at `mountpoint` (a regular file, created if missing).
    /// PermissionDenied when not root.
    pub fn mount(backing: &Path, mountpoint: &Path) -> io::Result<FaultDisk> {
        if unsafe { libc::geteuid() } != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "FaultDisk needs root (mount(2) of fuse)",
            ));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(backing)?;
        let size_bytes = file.metadata()?.len();
        if !mountpoint.exists() {
            File::create(mountpoint)?;
        }
        let fd = unsafe { libc::open(c"/dev/fuse".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let dev = unsafe { File::from_raw_fd(fd) };
        let opts = format!("fd={fd},rootmode=100600,user_id=0,group_id=0,allow_other");
        let target = cstr(mountpoint)?;
        let data = std::ffi::CString::new(opts).map_err(io::Error::other)?;
        let rc = unsafe {
            libc::mount(
                c"faultdisk".as_ptr(),
                target.as_ptr(),
                c"fuse".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                data.as_ptr() as *const libc::c_void,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let control = Arc::new(FaultControl {
            fault: Mutex::new(Fault::None),
            counters: Counters::default(),
            cache: Mutex::new(BTreeMap::new()),
            backing: file,
            size_bytes,
        });
        let mut workers = Vec::new();
        for _ in 0..WORKERS {
            let dev = dev.try_clone()?;
            let ctl = control.clone();
            workers.push(std::thread::spawn(move || serve(&dev, &ctl)));
        }
        // The connection number is the minor of the mount's st_dev; stat
        // answers GETATTR, which the workers now serve.
        let conn = std::fs::metadata(mountpoint)
            .map(|m| m.dev() & 0xff | ((m.dev() >> 12) & !0xff))
            .unwrap_or(0);
        Ok(FaultDisk {
            path: mountpoint.to_path_buf(),
            control,
            dev,
            conn,
            workers,
        })
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn control(&self) -> Arc<FaultControl> {
        self.control.clone()
    }
}

impl Drop for FaultDisk {
    fn drop(&mut self) {
        {
            let mut cache = self.control.lock_cache();
            let _ = self.control.writeback(&mut cache);
        }
        if let Ok(t) = cstr(&self.path) {
            unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::write(
            format!("/sys/fs/fuse/connections/{}/abort", self.conn),
            b"1",
        );
        let _ = self.dev.as_raw_fd();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn cstr(p: &Path) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other)
}

fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

fn reply(dev: &File, unique: u64, err: i32, body: &[u8]) {
    let mut out = Vec::with_capacity(OUT_HDR + body.len());
    let len = if err == 0 {
        OUT_HDR + body.len()
    } else {
        OUT_HDR
    };
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&(-err).to_le_bytes());
    out.extend_from_slice(&unique.to_le_bytes());
    if err == 0 {
        out.extend_from_slice(body);
    }
    let _ = unsafe { libc::write(dev.as_raw_fd(), out.as_ptr() as *const _, out.len()) };
}

fn attr(ctl: &FaultControl) -> Vec<u8> {
    // fuse_attr_out: attr_valid u64, nsec u32, dummy u32, fuse_attr (88).
    let mut b = Vec::with_capacity(104);
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&[0; 8]);
    b.extend_from_slice(&1u64.to_le_bytes()); // ino
    b.extend_from_slice(&ctl.size_bytes.to_le_bytes());
    b.extend_from_slice(&ctl.size_bytes.div_ceil(512).to_le_bytes());
    b.extend_from_slice(&[0; 24]); // a/m/ctime
    b.extend_from_slice(&[0; 12]); // nsecs
    b.extend_from_slice(&(libc::S_IFREG | 0o600).to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes()); // nlink
    b.extend_from_slice(&[0; 12]); // uid gid rdev
    b.extend_from_slice(&(BLOCK as u32).to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b
}

fn serve(dev: &File, ctl: &FaultControl) {
    let mut buf = vec![0u8; BUF_LEN];
    loop {
        let n = unsafe { libc::read(dev.as_raw_fd(), buf.as_mut_ptr() as *mut _, buf.len()) };
        if n < 0 {
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::ENOENT) => continue,
                _ => return, // ENODEV: unmounted or aborted
            }
        }
        let req = &buf[..n as usize];
        let (Some(len), Some(op), Some(unique)) = (u32_at(req, 0), u32_at(req, 4), u64_at(req, 8))
        else {
            continue;
        };
        if len as usize != req.len() || req.len() < IN_HDR {
            reply(dev, unique, libc::EINVAL, &[]);
            continue;
        }
        handle(dev, ctl, op, unique, &req[IN_HDR..]);
    }
}

fn delay(ctl: &FaultControl) -> Fault {
    let f = ctl.fault();
    if let Fault::Delay(d) = f {
        ctl.counters.delayed.fetch_add(1, Relaxed);
        std::thread::sleep(d);
    }
    f
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn handle(dev: &File, ctl: &FaultControl, op: u32, unique: u64, body: &[u8]) {
    match op {
        26 => {
            // INIT: answer 7.31 with max_write and max_pages.
            let (Some(major), Some(flags)) = (u32_at(body, 0), u32_at(body, 12)) else {
                return reply(dev, unique, libc::EINVAL, &[]);
            };
            if major < 7 {
                return reply(dev, unique, libc::EPROTO, &[]);
            }
            let want = (1u32 << 0) | (1 << 5) | (1 << 22); // ASYNC_READ, BIG_WRITES, MAX_PAGES
            let mut b = Vec::with_capacity(64);
            b.extend_from_slice(&7u32.to_le_bytes());
            b.extend_from_slice(&31u32.to_le_bytes());
            b.extend_from_slice(&MAX_WRITE.to_le_bytes()); // max_readahead
            b.extend_from_slice(&(flags & want).to_le_bytes());
            b.extend_from_slice(&16u16.to_le_bytes()); // max_background
            b.extend_from_slice(&12u16.to_le_bytes()); // congestion_threshold
            b.extend_from_slice(&MAX_WRITE.to_le_bytes());
            b.extend_from_slice(&1u32.to_le_bytes()); // time_gran
            b.extend_from_slice(&((MAX_WRITE / 4096) as u16).to_le_bytes());
            b.extend_from_slice(&[0; 2 + 32]);
            reply(dev, unique, 0, &b)
        }
        3 | 4 => reply(dev, unique, 0, &attr(ctl)), // GETATTR, SETATTR (ignored)
        14 => {
            // OPEN: direct io so the page cache hides nothing.
            let mut b = vec![0u8; 16];
            b[8..12].copy_from_slice(&1u32.to_le_bytes());
            reply(dev, unique, 0, &b)
        }
        15 => {
            let (Some(off), Some(size)) = (u64_at(body, 8), u32_at(body, 16)) else {
                return reply(dev, unique, libc::EINVAL, &[]);
            };
            ctl.counters.reads.fetch_add(1, Relaxed);
            if let Fault::Eio { reads: true, .. } = delay(ctl) {
                ctl.counters.eio_reads.fetch_add(1, Relaxed);
                return reply(dev, unique, libc::EIO, &[]);
            }
            match ctl.read(off, (size as usize).min(BUF_LEN)) {
                Ok(d) => reply(dev, unique, 0, &d),
                Err(e) => reply(dev, unique, errno(&e), &[]),
            }
        }
        16 => {
            let (Some(off), Some(size)) = (u64_at(body, 8), u32_at(body, 16)) else {
                return reply(dev, unique, libc::EINVAL, &[]);
            };
            let Some(data) = body.get(40..40 + size as usize) else {
                return reply(dev, unique, libc::EINVAL, &[]);
            };
            ctl.counters.writes.fetch_add(1, Relaxed);
            if let Fault::Eio { writes: true, .. } = delay(ctl) {
                ctl.counters.eio_writes.fetch_add(1, Relaxed);
                return reply(dev, unique, libc::EIO, &[]);
            }
            match ctl.write(off, data) {
                Ok(n) => {
                    let mut b = vec![0u8; 8];
                    b[..4].copy_from_slice(&(n as u32).to_le_bytes());
                    reply(dev, unique, 0, &b)
                }
                Err(e) => reply(dev, unique, errno(&e), &[]),
            }
        }
        20 => {
            ctl.counters.flushes.fetch_add(1, Relaxed);
            if let Fault::Eio { flushes: true, .. } = delay(ctl) {
                ctl.counters.eio_flushes.fetch_add(1, Relaxed);
                return reply(dev, unique, libc::EIO, &[]);
            }
            let mut cache = ctl.lock_cache();
            match ctl.writeback(&mut cache) {
                Ok(()) => reply(dev, unique, 0, &[]),
                Err(e) => reply(dev, unique, errno(&e), &[]),
            }
        }
        17 => {
            let mut b = vec![0u8; 80];
            b[0..8].copy_from_slice(&(ctl.size_bytes / BLOCK).to_le_bytes());
            b[40..44].copy_from_slice(&(BLOCK as u32).to_le_bytes());
            b[44..48].copy_from_slice(&255u32.to_le_bytes());
            b[48..52].copy_from_slice(&(BLOCK as u32).to_le_bytes());
            reply(dev, unique, 0, &b)
        }
        18 | 25 | 38 => reply(dev, unique, 0, &[]), // RELEASE, FLUSH, DESTROY
        2 | 36 | 42 => {}                           // FORGET, INTERRUPT, BATCH_FORGET: no reply
        _ => reply(dev, unique, libc::ENOSYS, &[]),
    }
}

/// A loop device over a file; detached on drop.
pub struct LoopDev {
    path: PathBuf,
    direct_io: bool,
}

impl LoopDev {
    /// `losetup --direct-io=on -f --show`, else buffered.
    pub fn attach(path: &Path) -> io::Result<LoopDev> {
        for direct_io in [true, false] {
            let mut c = std::process::Command::new("losetup");
            if direct_io {
                c.arg("--direct-io=on");
            }
            let out = c.arg("-f").arg("--show").arg(path).output()?;
            if out.status.success() {
                let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
                // losetup may attach yet fall back to buffered silently.
                let name = dev.trim_start_matches("/dev/");
                let dio = std::fs::read_to_string(format!("/sys/block/{name}/loop/dio"))
                    .map(|s| s.trim() == "1")
                    .unwrap_or(direct_io);
                return Ok(LoopDev {
                    path: PathBuf::from(dev),
                    direct_io: dio,
                });
            }
            if !direct_io {
                return Err(io::Error::other(
                    String::from_utf8_lossy(&out.stderr).to_string(),
                ));
            }
        }
        Err(io::Error::other("losetup failed"))
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn direct_io(&self) -> bool {
        self.direct_io
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.path)
            .status();
    }
}
