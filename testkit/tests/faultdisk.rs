//! The fault disk through a real loop device: round trip, EIO on writes,
//! reads and flushes, latency, and a power cut that loses exactly the
//! unsynced blocks it says it lost (seeded, replayable).
use sluice_testkit::faultdisk::{Fault, FaultControl, FaultDisk, LoopDev};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

const BLOCKS: usize = 64;

/// A fault disk over a 4 MiB backing file, a loop device over it, and the
/// device opened with O_DIRECT; `None` (test skipped) when not root.
struct Rig {
    dir: PathBuf,
    ctl: Arc<FaultControl>,
    f: Option<File>,
    lo: Option<LoopDev>,
    disk: Option<FaultDisk>,
}

impl Rig {
    fn new(name: &str) -> Option<Rig> {
        let dir = std::env::temp_dir().join(format!("faultdisk-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let backing = dir.join("backing");
        std::fs::write(&backing, vec![0u8; 4 << 20]).unwrap();
        let disk = match FaultDisk::mount(&backing, &dir.join("disk")) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                let _ = std::fs::remove_dir_all(&dir);
                return sluice_testkit::skip("not root");
            }
            Err(e) => panic!("mount: {e}"),
        };
        let ctl = disk.control();
        let lo = LoopDev::attach(disk.path()).unwrap();
        eprintln!("loop {} direct_io={}", lo.path().display(), lo.direct_io());
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(lo.path())
            .unwrap();
        Some(Rig {
            dir,
            ctl,
            f: Some(f),
            lo: Some(lo),
            disk: Some(disk),
        })
    }

    fn file(&mut self) -> &mut File {
        self.f.as_mut().expect("open")
    }

    /// Write `fill` over block `i` of the device (no sync).
    fn write_block(&mut self, i: usize, fill: u8) -> std::io::Result<()> {
        let mut b = Aligned::new();
        b.get().fill(fill);
        let f = self.file();
        f.seek(SeekFrom::Start(i as u64 * 4096))?;
        f.write_all(b.get())
    }

    /// The first byte of block `i`, checked to fill the whole block.
    fn read_block(&mut self, i: usize) -> std::io::Result<u8> {
        let mut b = Aligned::new();
        let f = self.file();
        f.seek(SeekFrom::Start(i as u64 * 4096))?;
        f.read_exact(b.get())?;
        let first = b.get()[0];
        assert!(
            b.get().iter().all(|&x| x == first),
            "block {i} is torn inside 4 KiB"
        );
        Ok(first)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.ctl.set(Fault::None);
        drop(self.f.take());
        drop(self.lo.take());
        drop(self.disk.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One 4 KiB buffer aligned for O_DIRECT.
struct Aligned(Vec<u8>);

impl Aligned {
    fn new() -> Aligned {
        Aligned(vec![0u8; 8192])
    }
    fn get(&mut self) -> &mut [u8] {
        let off = self.0.as_ptr() as usize % 4096;
        &mut self.0[(4096 - off) % 4096..][..4096]
    }
}

#[test]
fn faultdisk_loop_roundtrip_and_eio_on_writes() {
    let Some(mut r) = Rig::new("roundtrip") else {
        return;
    };
    for i in 0..2 {
        r.write_block(i, 0xab).unwrap();
    }
    r.file().sync_all().unwrap();
    assert_eq!(r.read_block(0).unwrap(), 0xab);
    assert_eq!(r.read_block(1).unwrap(), 0xab);
    assert_eq!(r.ctl.power_cut(1), 0, "nothing unsynced to lose");
    r.ctl.set(Fault::Eio {
        reads: false,
        writes: true,
        flushes: false,
    });
    assert!(r.write_block(0, 0xcd).is_err());
    assert!(r.ctl.counts().eio_writes > 0);
    r.ctl.set(Fault::None);
    assert_eq!(
        r.read_block(0).unwrap(),
        0xab,
        "a failed write changed nothing"
    );
}

/// Which of `BLOCKS` unsynced blocks a power cut with `seed` loses: `true`
/// for a block that reads as before (lost), checked against the count the
/// disk reports.
fn cut_once(r: &mut Rig, seed: u64, old: u8, new: u8) -> Vec<bool> {
    for i in 0..BLOCKS {
        r.write_block(i, new).unwrap();
    }
    let lost = r.ctl.power_cut(seed);
    let mut out = Vec::new();
    for i in 0..BLOCKS {
        let b = r.read_block(i).unwrap();
        assert!(b == old || b == new, "block {i} reads {b:#x}");
        out.push(b == old);
    }
    let seen = out.iter().filter(|&&x| x).count() as u64;
    assert_eq!(
        seen, lost,
        "power cut (seed {seed}) said {lost} lost, {seen} read old"
    );
    out
}

#[test]
fn a_power_cut_loses_only_unsynced_blocks_and_replays_by_seed() {
    let Some(mut r) = Rig::new("powercut") else {
        return;
    };
    let seed = 20261203;
    eprintln!("seed {seed}");
    for i in 0..BLOCKS {
        r.write_block(i, 0x11).unwrap();
    }
    r.file().sync_all().unwrap();
    let first = cut_once(&mut r, seed, 0x11, 0x22);
    let lost = first.iter().filter(|&&x| x).count();
    // 64 blocks, each lost with probability 1/2: neither none nor all.
    assert!(lost > 0 && lost < BLOCKS, "{lost} of {BLOCKS} lost");
    // What survived is on the backing file now: make every block equal
    // again, then the same seed loses the same blocks.
    for i in 0..BLOCKS {
        r.write_block(i, 0x11).unwrap();
    }
    r.file().sync_all().unwrap();
    let again = cut_once(&mut r, seed, 0x11, 0x22);
    assert_eq!(first, again, "seed {seed} replays the same losses");
    assert_eq!(r.ctl.counts().power_cuts, 2);
    assert_eq!(r.ctl.counts().lost_blocks, 2 * lost as u64);
}

#[test]
fn an_eio_flush_keeps_the_cache_and_a_later_flush_makes_it_durable() {
    let Some(mut r) = Rig::new("eioflush") else {
        return;
    };
    for i in 0..BLOCKS {
        r.write_block(i, 0x33).unwrap();
    }
    r.ctl.set(Fault::Eio {
        reads: false,
        writes: false,
        flushes: true,
    });
    assert!(r.file().sync_all().is_err(), "the flush must fail");
    assert!(r.ctl.counts().eio_flushes > 0);
    r.ctl.set(Fault::None);
    r.file().sync_all().unwrap();
    assert_eq!(r.ctl.power_cut(5), 0, "the second flush made it durable");
    for i in 0..BLOCKS {
        assert_eq!(r.read_block(i).unwrap(), 0x33);
    }
}

#[test]
fn eio_on_reads_and_latency_are_injected_and_counted() {
    let Some(mut r) = Rig::new("reads") else {
        return;
    };
    r.write_block(3, 0x44).unwrap();
    r.file().sync_all().unwrap();
    r.ctl.set(Fault::Eio {
        reads: true,
        writes: false,
        flushes: false,
    });
    assert!(r.read_block(3).is_err(), "the read must fail");
    assert!(r.ctl.counts().eio_reads > 0);
    r.ctl.set(Fault::Delay(Duration::from_millis(20)));
    let before = r.ctl.counts().delayed;
    assert_eq!(r.read_block(3).unwrap(), 0x44, "a late read still reads");
    r.write_block(4, 0x55).unwrap();
    assert!(r.ctl.counts().delayed > before);
    r.ctl.set(Fault::None);
    assert_eq!(r.read_block(4).unwrap(), 0x55);
}
