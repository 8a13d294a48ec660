//! UringDevice on regular files: a file on the work disk (O_DIRECT), a file
//! on tmpfs, and one on ramfs where O_DIRECT is refused (the fallback).

// Tests may panic: the engine's no-panic lints (engine/Cargo.toml) are for
// production code; clippy.toml covers #[test] functions, this the helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod uring_checks;

use sluice_engine::device::uring::{FakeResult, UringDevice, UringOptions};
use sluice_engine::device::BlockDevice;
use uring_checks::*;

const SIZE_BYTES: u64 = 512 << 20;

fn opts_all() -> Vec<UringOptions> {
    vec![
        UringOptions::default(),
        UringOptions {
            fixed_buffers: 0,
            ..UringOptions::default()
        },
        UringOptions {
            ring_entries: 8,
            fixed_buffers: 4,
            ..UringOptions::default()
        },
        UringOptions {
            direct_io: false,
            ..UringOptions::default()
        },
    ]
}

#[test]
fn file_io_all_option_sets() {
    let s = seed("file_io_all_option_sets");
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, opts) in opts_all().into_iter().enumerate() {
        eprintln!("options: {opts:?}");
        // A fresh file per option set: basic_io expects never-written blocks
        // to read as zeroes.
        let path = dir.path().join(format!("dev{i}.img"));
        let mut dev = UringDevice::create(&path, SIZE_BYTES, opts.clone()).expect("create");
        assert_eq!(dev.info().block_count, SIZE_BYTES / 4096);
        assert_eq!(
            dev.direct_io(),
            opts.direct_io,
            "the work disk accepts O_DIRECT"
        );
        assert!(!dev.is_block_device());
        basic_io(&mut dev);
        many_in_flight(&mut dev, s);
        out_of_order(&mut dev, s);
    }
}

#[test]
fn file_survives_reopen_and_is_exclusive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dev.img");
    drop(UringDevice::create(&path, 1 << 20, UringOptions::default()).expect("create"));
    survives_reopen(&path, UringOptions::default());
    exclusive(&path, UringOptions::default());
}

#[test]
fn bad_sizes_and_paths_are_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("odd.img");
    std::fs::write(&path, vec![0u8; 5000]).expect("write");
    match UringDevice::open(&path, UringOptions::default()) {
        Err(sluice_engine::Error::DeviceSize {
            size_bytes: 5000, ..
        }) => {}
        other => panic!("want DeviceSize, got {other:?}"),
    }
    match UringDevice::create(&dir.path().join("x"), 100, UringOptions::default()) {
        Err(sluice_engine::Error::DeviceSize { .. }) => {}
        other => panic!("want DeviceSize, got {other:?}"),
    }
    let missing = dir.path().join("missing");
    let err = UringDevice::open(&missing, UringOptions::default()).expect_err("missing");
    assert!(err.to_string().contains("missing"), "{err}");
    let err = UringDevice::open(dir.path(), UringOptions::default()).expect_err("a directory");
    assert!(err.to_string().contains("neither a block device"), "{err}");
}

#[test]
fn tmpfs_file() {
    let s = seed("tmpfs_file");
    let dir = match tempfile::tempdir_in("/dev/shm") {
        Ok(d) => d,
        Err(e) => {
            skip::<()>(&format!("no /dev/shm ({e})"));
            return;
        }
    };
    let path = dir.path().join("dev.img");
    let mut dev =
        UringDevice::create(&path, 64 << 20, UringOptions::default()).expect("create on tmpfs");
    // Newer kernels accept O_DIRECT on tmpfs; older ones refuse it and the
    // device falls back. Either way it must work.
    eprintln!("tmpfs direct_io = {}", dev.direct_io());
    basic_io(&mut dev);
    many_in_flight(&mut dev, s);
}

/// ramfs refuses O_DIRECT with EINVAL on every kernel: the fallback path.
#[test]
fn ramfs_falls_back_to_buffered_io() {
    let s = seed("ramfs_falls_back_to_buffered_io");
    // SAFETY: geteuid takes no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        skip::<()>("not root (mounting ramfs needs root)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mnt = dir.path();
    let ok = std::process::Command::new("mount")
        .args([
            "-t",
            "ramfs",
            "sluice-test",
            mnt.to_str().expect("utf-8 path"),
        ])
        .status()
        .map(|st| st.success())
        .unwrap_or(false);
    if !ok {
        skip::<()>("cannot mount ramfs here");
        return;
    }
    struct Unmount<'a>(&'a std::path::Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _guard = Unmount(mnt);
    let path = mnt.join("dev.img");
    let mut dev =
        UringDevice::create(&path, 16 << 20, UringOptions::default()).expect("create on ramfs");
    assert!(
        !dev.direct_io(),
        "ramfs refuses O_DIRECT, so the device must have fallen back"
    );
    basic_io(&mut dev);
    many_in_flight(&mut dev, s);
    drop(dev);
    survives_reopen(&path, UringOptions::default());
    exclusive(&path, UringOptions::default());
}

#[test]
fn two_shards_on_a_file() {
    let s = seed("two_shards_on_a_file");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pool.img");
    drop(UringDevice::create(&path, 64 << 20, UringOptions::default()).expect("create"));
    two_shard_round_trip(&path, s);
}

/// A short transfer, `EAGAIN` or `EINTR` from the kernel is tried again,
/// whole (faked results stand in for the kernel's; the kernel did move the
/// bytes, the retry makes the request whole either way); past the retries
/// the error stands, naming the op and the block.
#[test]
fn short_and_interrupted_transfers_are_submitted_again() {
    use sluice_engine::device::{IoKind, IoRequest};
    let dir = tempfile::tempdir().expect("tempdir");
    for opts in [
        UringOptions::default(),
        UringOptions {
            fixed_buffers: 0,
            ..UringOptions::default()
        },
    ] {
        let path = dir.path().join(format!("retry{}.img", opts.fixed_buffers));
        let mut dev = UringDevice::create(&path, 64 << 20, opts).expect("create");
        let one = pattern(7, 1);
        let mut four = Vec::new();
        for i in 0..4 {
            four.extend(pattern(20 + i, 2));
        }
        dev.fake_next_results([
            FakeResult::Short,
            FakeResult::Errno(libc::EAGAIN),
            FakeResult::Errno(libc::EINTR),
            FakeResult::Short,
        ]);
        let done = run_all(
            &mut dev,
            vec![write_req(1, 7, &one, false), write_req(2, 20, &four, false)],
        );
        for (tag, c) in &done {
            assert!(c.result.is_ok(), "write {tag}: {:?}", c.result);
        }
        assert_eq!(dev.retried(), 4);
        dev.fake_next_results([FakeResult::Short, FakeResult::Short]);
        assert_eq!(read_back(&mut dev, 7, 1), one);
        assert_eq!(read_back(&mut dev, 20, 4), four);
        assert_eq!(dev.retried(), 6);
        // A request that stays short fails after its retries, clearly.
        dev.fake_next_results([FakeResult::Short; 5]);
        let mut c = run_all(
            &mut dev,
            vec![IoRequest {
                tag: 9,
                kind: IoKind::Read,
                pba: 20,
                buf: Some(sluice_engine::device::AlignedBuf::zeroed(4)),
            }],
        );
        let e = c
            .remove(&9)
            .expect("completion")
            .result
            .expect_err("short 5 times");
        assert!(
            e.to_string().contains("short transfer") && e.to_string().contains("block 20"),
            "{e}"
        );
        assert_eq!(dev.retried(), 10);
    }
}
