//! UringDevice on a real block device: a loop device (`losetup
//! --direct-io=on`) over a file on the work disk. Needs root and losetup;
//! otherwise it prints why it skipped and passes.

// Tests may panic: the engine's no-panic lints (engine/Cargo.toml) are for
// production code; clippy.toml covers #[test] functions, this the helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod uring_checks;

use sluice_engine::device::uring::{UringDevice, UringOptions};
use sluice_engine::device::BlockDevice;
use std::path::{Path, PathBuf};
use std::process::Command;
use uring_checks::*;

/// A loop device detached when dropped, even when the test panics.
struct LoopDev {
    dev: PathBuf,
}

impl LoopDev {
    fn attach(file: &Path) -> Result<LoopDev, String> {
        let out = Command::new("losetup")
            .args(["--direct-io=on", "-f", "--show"])
            .arg(file)
            .output()
            .map_err(|e| format!("cannot run losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok(LoopDev {
            dev: PathBuf::from(dev),
        })
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let ok = Command::new("losetup")
            .arg("-d")
            .arg(&self.dev)
            .status()
            .map(|s| s.success());
        if !matches!(ok, Ok(true)) {
            eprintln!("warning: could not detach {}", self.dev.display());
        }
    }
}

fn setup(size_bytes: u64) -> Option<(tempfile::TempDir, LoopDev)> {
    // SAFETY: geteuid takes no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return skip("not root");
    }
    tool("losetup")?;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("backing.img");
    let f = std::fs::File::create(&file).expect("backing file");
    f.set_len(size_bytes).expect("set_len");
    drop(f);
    match LoopDev::attach(&file) {
        Ok(l) => Some((dir, l)),
        Err(e) => skip(&e.to_string()),
    }
}

#[test]
fn loop_device_io() {
    let s = seed("loop_device_io");
    for opts in [
        UringOptions::default(),
        UringOptions {
            fixed_buffers: 0,
            ..UringOptions::default()
        },
    ] {
        // A fresh device per pass: `basic_io` checks that a block never
        // written reads as zeroes, and the random passes write anywhere.
        let Some((_dir, lo)) = setup(256 << 20) else {
            return;
        };
        let mut dev = UringDevice::open(&lo.dev, opts.clone()).expect("open loop device");
        assert!(dev.is_block_device());
        assert!(dev.direct_io());
        assert_eq!(
            dev.info().block_count,
            (256 << 20) / 4096,
            "size from BLKGETSIZE64"
        );
        basic_io(&mut dev);
        many_in_flight(&mut dev, s);
        out_of_order(&mut dev, s);
        drop(dev);
        survives_reopen(&lo.dev, opts);
    }
}

#[test]
fn loop_device_is_exclusive() {
    let Some((_dir, lo)) = setup(16 << 20) else {
        return;
    };
    exclusive(&lo.dev, UringOptions::default());
}

#[test]
fn loop_device_two_shards() {
    let s = seed("loop_device_two_shards");
    let Some((_dir, lo)) = setup(64 << 20) else {
        return;
    };
    two_shard_round_trip(&lo.dev, s);
}
