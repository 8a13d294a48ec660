//! Issue 12: a real `sluice serve` on a loop device over the fault disk
//! (`sluice_testkit::faultdisk`), with real qemu-io clients through NBD.
//! A disk that fails writes and flushes poisons the pool: the client's
//! write or flush fails, `status` and the metrics say so and exit
//! non-zero, reads still serve what was flushed, and a restart once the
//! disk is healthy writes again. A power cut (the disk fails everything,
//! the process dies, unsynced blocks are lost, seeded) keeps every flushed
//! write. Root only (FUSE and loop devices); skipped otherwise.

mod common;
use common::*;
use sluice_testkit::faultdisk::{Fault, FaultDisk, LoopDev};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

fn qemu(nbd: &str, cmds: &[&str]) -> (bool, String) {
    qemu_with(nbd, &[], cmds)
}

fn qemu_with(nbd: &str, opts: &[&str], cmds: &[&str]) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", &format!("nbd://{nbd}/v")]).args(opts);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let o = c.output().expect("run qemu-io");
    let text = format!("{}{}", stdout(&o), stderr(&o));
    (
        o.status.success() && !text.contains("failed") && !text.contains("error"),
        text,
    )
}

fn must(nbd: &str, cmds: &[&str]) {
    let (ok, text) = qemu(nbd, cmds);
    assert!(ok, "qemu-io {cmds:?}: {text}");
}

/// A node on `data`, its control socket beside it: the default for a
/// device is /run/sluice, where other tests look for the only socket.
fn start(data: &std::path::Path) -> Daemon {
    let sock = data.with_extension("sock");
    Daemon::try_start(data, &["--control-socket", sock.to_str().unwrap()])
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_failing_disk_poisons_the_pool_visibly_and_a_power_cut_keeps_flushed_writes() {
    if !have("qemu-io") {
        return;
    }
    if unsafe { libc::geteuid() } != 0 {
        sluice_testkit::skip::<()>("not root (FUSE and loop devices)");
        return;
    }
    let seed = sluice_testkit::seed("disk_faults_e2e");
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("pool.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(512 << 20)
        .unwrap();
    let disk = FaultDisk::mount(&backing, &dir.path().join("pool.disk")).expect("fault disk");
    let ctl = disk.control();
    let lo = LoopDev::attach(disk.path()).expect("loop device");
    // The daemon's files (socket, log) go beside its data path: a link in
    // the test's folder, not in /dev (and the socket not in /run/sluice).
    let data = dir.path().join("pool.dev");
    std::os::unix::fs::symlink(lo.path(), &data).unwrap();
    let out = sluice(&["init", data.to_str().unwrap()]);
    assert!(out.status.success(), "init: {}", stderr(&out));

    let d = start(&data);
    d.ok(&["vol", "create", "v", "--size", "64M"]);
    must(&d.nbd, &["write -P 90 0 1M", "flush"]);

    // Writes and flushes fail at the disk: the client hears of it.
    ctl.set(Fault::Eio {
        reads: false,
        writes: true,
        flushes: true,
    });
    let (ok, text) = qemu(&d.nbd, &["write -P 107 1M 1M", "flush"]);
    assert!(!ok, "a write and flush on a failing disk succeeded: {text}");
    wait_until("the pool to report the device error", || {
        d.metric("sluice_pool_poisoned_shards") == Some(1)
    });
    let st = d.cli(&["status"]);
    assert!(!st.status.success(), "status of a poisoned pool exits 0");
    assert!(
        stdout(&st).contains("device error") || stderr(&st).contains("device error"),
        "status does not name the device error: {}{}",
        stdout(&st),
        stderr(&st)
    );
    // Reads still serve what was flushed.
    must(&d.nbd, &["read -P 90 0 1M"]);
    let (ok, text) = qemu(&d.nbd, &["write -P 108 4M 64k", "flush"]);
    assert!(!ok, "a poisoned pool took a write: {text}");

    // The disk is healthy again: a restart writes again, flushed data kept.
    ctl.set(Fault::None);
    d.kill();
    let d = start(&data);
    let st = d.cli(&["status"]);
    assert!(
        st.status.success(),
        "status after the restart: {}{}",
        stdout(&st),
        stderr(&st)
    );
    assert_eq!(d.metric("sluice_pool_poisoned_shards"), Some(0));
    must(&d.nbd, &["read -P 90 0 1M"]);

    // A power cut: one write flushed, one not; the disk fails everything,
    // the process dies, the cache loses a seeded part of what is unsynced.
    must(&d.nbd, &["write -P 119 2M 1M", "flush"]);
    // An unflushed write from a client still connected at the cut (`-t
    // unsafe`: qemu sends no flush of its own).
    let mut held = Command::new("qemu-io")
        .args(["-f", "raw", "-t", "unsafe", &format!("nbd://{}/v", d.nbd)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run qemu-io");
    let mut to = held.stdin.take().unwrap();
    let mut from = BufReader::new(held.stdout.take().unwrap());
    writeln!(to, "write -P 136 3M 1M").unwrap();
    let mut line = String::new();
    while !line.contains("wrote") {
        line.clear();
        assert!(from.read_line(&mut line).unwrap() > 0, "qemu-io ended");
    }
    ctl.set(Fault::Eio {
        reads: true,
        writes: true,
        flushes: true,
    });
    let lost = ctl.power_cut(seed);
    d.kill();
    let _ = held.kill();
    let _ = held.wait();
    ctl.set(Fault::None);
    eprintln!("power cut (seed {seed}): {lost} unsynced block(s) lost");
    assert!(lost > 0, "the cut found nothing unsynced to lose");
    let d = start(&data);
    must(&d.nbd, &["read -P 90 0 1M", "read -P 119 2M 1M"]);
    let check = d.cli(&["status"]);
    assert!(
        check.status.success(),
        "status after the power cut: {}",
        stdout(&check)
    );
    // And it takes writes again.
    must(
        &d.nbd,
        &["write -P 140 8M 1M", "flush", "read -P 140 8M 1M"],
    );
    d.kill();
    drop(lo);
    drop(disk);
}
