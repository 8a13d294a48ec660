//! The fault disk through a real loop device: round trip, EIO on writes,
//! a power cut that loses unsynced blocks (seeded).
use sluice_testkit::faultdisk::{Fault, FaultDisk, LoopDev};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;

#[test]
fn faultdisk_loop_roundtrip_eio_power_cut() {
    let dir = std::env::temp_dir().join(format!("faultdisk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let backing = dir.join("backing");
    std::fs::write(&backing, vec![0u8; 4 << 20]).unwrap();
    let disk = match FaultDisk::mount(&backing, &dir.join("disk")) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return sluice_testkit::skip::<()>("not root").unwrap_or(())
        }
        Err(e) => panic!("mount: {e}"),
    };
    let ctl = disk.control();
    let lo = LoopDev::attach(disk.path()).unwrap();
    eprintln!("loop {} direct_io={}", lo.path().display(), lo.direct_io());
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(lo.path())
        .unwrap();
    let mut buf = vec![0u8; 8192 + 4096];
    let off = buf.as_ptr() as usize % 4096;
    let a = &mut buf[(4096 - off) % 4096..][..8192];
    a.fill(0xab);
    f.write_all(a).unwrap();
    f.sync_all().unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    a.fill(0);
    f.read_exact(a).unwrap();
    assert!(a.iter().all(|&b| b == 0xab));
    assert_eq!(ctl.power_cut(1), 0);
    ctl.set(Fault::Eio {
        reads: false,
        writes: true,
        flushes: false,
    });
    f.seek(SeekFrom::Start(0)).unwrap();
    assert!(f.write_all(a).is_err());
    assert!(ctl.counts().eio_writes > 0);
    ctl.set(Fault::None);
    drop(f);
    drop(lo);
    drop(disk);
    let _ = std::fs::remove_dir_all(&dir);
}
