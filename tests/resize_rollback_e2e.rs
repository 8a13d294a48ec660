//! Issue 16 ("Volumes and snapshots"), end to end on real `sluice serve`
//! processes and the CLI as an operator types it: `vol resize` grows, and
//! shrinks only when nothing live or in a snapshot is mapped past the new
//! end (the error names the image); the size survives a restart; a mirror
//! destination refuses both commands, and after its source grows the next
//! incremental carries the new size and the blocks past the old end.
//! `snap rollback` makes the live image a snapshot's, refuses newer
//! snapshots without `-r`, refuses while an NBD client has the volume open
//! for writing unless `--force`, and with `-r` refuses a locked newer
//! snapshot naming its holder.

mod common;
use common::*;
use sluice::nbd_client::NbdClient;

const MIB: u64 = 1 << 20;

fn pattern(v: u8) -> Vec<u8> {
    vec![v; 4096]
}

fn write_at(d: &Daemon, export: &str, offset: u64, v: u8) {
    let mut c = NbdClient::open(&d.nbd, export).unwrap();
    c.write_fua(offset, &pattern(v)).unwrap();
}

fn read_at(d: &Daemon, export: &str, offset: u64) -> Vec<u8> {
    let mut c = NbdClient::open(&d.nbd, export).unwrap();
    c.read(offset, 4096).unwrap()
}

fn size_of(d: &Daemon, vol: &str) -> u64 {
    d.json(&["vol", "list"])
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == vol)
        .unwrap_or_else(|| panic!("no volume {vol}"))["size_bytes"]
        .as_u64()
        .unwrap()
}

fn refused(d: &Daemon, args: &[&str]) -> String {
    let o = d.cli(args);
    assert!(!o.status.success(), "{args:?} succeeded: {}", stdout(&o));
    stderr(&o)
}

#[test]
fn vol_resize_grows_shrinks_only_when_nothing_is_mapped_past_the_end() {
    if !have("qemu-io") {
        println!("skipped: qemu-io not found (the trim that leaves a block to a snapshot)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = Daemon::named(dir.path(), "a", &[]);
    a.ok(&["vol", "create", "v", "--size", "16M"]);
    write_at(&a, "v", 12 * MIB, 1);
    a.ok(&["snap", "create", "v", "s1"]);
    let out = a.ok(&["vol", "resize", "v", "32M"]);
    assert!(out.contains("resized volume v to"), "{out}");
    assert_eq!(size_of(&a, "v"), 32 * MIB);
    // The grown space is writable at once and reads back.
    write_at(&a, "v", 24 * MIB, 2);
    assert_eq!(read_at(&a, "v", 24 * MIB), pattern(2));
    a.ok(&["snap", "create", "v", "s2"]);
    // Live and s2 map 24M: shrinking to 20M names the live image first.
    let e = refused(&a, &["vol", "resize", "v", "20M"]);
    assert!(
        e.contains("volume v has blocks mapped past 20 MiB (in the live image")
            && e.contains("cannot shrink"),
        "{e}"
    );
    // Trimmed live, still held by snapshot s2: the error names s2.
    qemu_io(&a.nbd, "v", &[format!("discard {} 4k", 24 * MIB)]);
    let e = refused(&a, &["vol", "resize", "v", "20M"]);
    assert!(e.contains("(in snapshot s2"), "{e}");
    a.ok(&["snap", "delete", "v", "s2"]);
    // A client connected before the shrink keeps its 32M export size (NBD
    // fixes it at the handshake); past the new end its writes fail.
    let mut before = NbdClient::open(&a.nbd, "v").unwrap();
    assert_eq!(before.size, 32 * MIB);
    let r = a.json(&["vol", "resize", "v", "20M"]);
    assert_eq!(r["size_bytes"], 20 * MIB, "{r}");
    assert!(
        r["warnings"]
            .to_string()
            .contains("see the new size when they reconnect"),
        "{r}"
    );
    assert!(before.write_fua(24 * MIB, &pattern(3)).is_err());
    assert_eq!(before.read(12 * MIB, 4096).unwrap(), pattern(1));
    drop(before);
    // 12M is mapped (live and s1): no shrink to 8M.
    let e = refused(&a, &["vol", "resize", "v", "8M"]);
    assert!(e.contains("past 8 MiB"), "{e}");
    // Bad input: a clear error each, nothing changes.
    let e = refused(&a, &["vol", "resize", "v", "0"]);
    assert!(e.contains("size"), "{e}");
    let e = refused(&a, &["vol", "resize", "v", "5000"]);
    assert!(e.contains("4096") || e.contains("size"), "{e}");
    let e = refused(&a, &["vol", "resize", "nope", "16M"]);
    assert!(e.contains("nope"), "{e}");
    assert_eq!(size_of(&a, "v"), 20 * MIB);
    // Durable: the size and the data survive a restart.
    let data = a.data.clone();
    assert!(a.term().success());
    let a = Daemon::start(&data);
    assert_eq!(size_of(&a, "v"), 20 * MIB);
    assert_eq!(read_at(&a, "v", 12 * MIB), pattern(1));
    assert_eq!(read_at(&a, "v@s1", 12 * MIB), pattern(1));
    let c = NbdClient::open(&a.nbd, "v").unwrap();
    assert_eq!(c.size, 20 * MIB, "the export has the new size");
}

#[test]
fn mirror_destination_follows_its_source_size_and_refuses_resize_and_rollback() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        Daemon::named(dir.path(), "a", &[]),
        Daemon::named(dir.path(), "b", &[]),
    );
    a.ok(&["vol", "create", "v", "--size", "16M"]);
    write_at(&a, "v", 4 * MIB, 7);
    a.ok(&["snap", "create", "v", "s1"]);
    b.ok(&["mirror", "create", "v", "--from", &a.source("v")]);
    assert_eq!(size_of(&b, "v"), 16 * MIB);
    // The destination refuses both, saying why and what to do.
    let e = refused(&b, &["vol", "resize", "v", "64M"]);
    assert!(
        e.contains("volume v is the destination of mirror v") && e.contains("on its source"),
        "{e}"
    );
    let e = refused(&b, &["snap", "rollback", "v", "s1"]);
    assert!(e.contains("destination of mirror v"), "{e}");
    // The source grows and writes past its old end; the next incremental
    // carries both.
    a.ok(&["vol", "resize", "v", "64M"]);
    write_at(&a, "v", 48 * MIB, 9);
    write_at(&a, "v", 4 * MIB, 8);
    a.ok(&["snap", "create", "v", "s2"]);
    let r = b.json(&["mirror", "update", "v"]);
    assert_eq!(r["kind"], "incremental", "{r}");
    assert_eq!(size_of(&b, "v"), 64 * MIB);
    assert_eq!(read_at(&b, "v@s2", 48 * MIB), pattern(9));
    assert_eq!(read_at(&b, "v", 48 * MIB), pattern(9));
    assert_eq!(read_at(&b, "v", 4 * MIB), pattern(8));
    let mut c = NbdClient::open(&b.nbd, "v").unwrap();
    assert_eq!(c.size, 64 * MIB);
    assert_eq!(c.read(20 * MIB, 4096).unwrap(), vec![0u8; 4096]);
}

#[test]
fn snap_rollback_needs_r_for_newer_snapshots_force_for_nbd_writers_and_obeys_locks() {
    let dir = tempfile::tempdir().unwrap();
    let a = Daemon::named(dir.path(), "a", &[]);
    a.ok(&["vol", "create", "v", "--size", "16M"]);
    write_at(&a, "v", 0, 1);
    a.ok(&["snap", "create", "v", "s1"]);
    write_at(&a, "v", 0, 2);
    write_at(&a, "v", MIB, 2);
    a.ok(&["snap", "create", "v", "s2"]);
    write_at(&a, "v", 0, 3);
    // Newer snapshots: refused without -r, naming them.
    let e = refused(&a, &["snap", "rollback", "v", "s1"]);
    assert!(
        e.contains("volume v has snapshots newer than s1: s2") && e.contains("-r"),
        "{e}"
    );
    assert_eq!(read_at(&a, "v", 0), pattern(3));
    // To the newest: no -r needed.
    let out = a.ok(&["snap", "rollback", "v", "s2"]);
    assert!(out.contains("rolled back v to v@s2"), "{out}");
    assert_eq!(read_at(&a, "v", 0), pattern(2));
    // An NBD client with v open for writing: refused unless --force.
    let mut held = NbdClient::open(&a.nbd, "v").unwrap();
    write_at(&a, "v", 0, 4);
    let e = refused(&a, &["snap", "rollback", "v", "s2"]);
    assert!(
        e.contains("volume v is open for writing by") && e.contains("--force"),
        "{e}"
    );
    // A read-only snapshot export does not count.
    let _reader = NbdClient::open(&a.nbd, "v@s1").unwrap();
    // A soft lock on a newer snapshot: -r refuses, naming the holder, and
    // nothing changes (also with --force: that is about NBD clients only).
    a.ok(&["lock", "add", "v", "s2", "--owner", "backup-app"]);
    let e = refused(&a, &["snap", "rollback", "v", "s1", "-r", "--force"]);
    assert!(
        e.contains("cannot roll back v to s1")
            && e.contains("v@s2 locked by")
            && e.contains("backup-app"),
        "{e}"
    );
    assert_eq!(a.snap_names("v"), ["s1", "s2"]);
    assert_eq!(held.read(0, 4096).unwrap(), pattern(4));
    a.ok(&["lock", "release", "v", "s2", "--holder", "backup-app"]);
    // Forced past the open client, -r deletes s2.
    let r = a.json(&["snap", "rollback", "v", "s1", "-r", "--force"]);
    assert_eq!(r["deleted_snapshots"], serde_json::json!(["s2"]), "{r}");
    // Only the held one: a client's close waits for the server to count it
    // out.
    assert_eq!(r["nbd_writers"], 1, "{r}");
    assert_eq!(held.read(0, 4096).unwrap(), pattern(1));
    assert_eq!(held.read(MIB, 4096).unwrap(), vec![0u8; 4096]);
    drop(held);
    assert_eq!(a.snap_names("v"), ["s1"]);
    // Errors name what is missing.
    let e = refused(&a, &["snap", "rollback", "v", "nope"]);
    assert!(e.contains("v@nope"), "{e}");
    let e = refused(&a, &["snap", "rollback", "w", "s1"]);
    assert!(e.contains("w"), "{e}");
    // Durable, and the live image writable again after it.
    let data = a.data.clone();
    assert!(a.term().success());
    let a = Daemon::start(&data);
    assert_eq!(read_at(&a, "v", 0), pattern(1));
    assert_eq!(a.snap_names("v"), ["s1"]);
    write_at(&a, "v", 0, 5);
    assert_eq!(read_at(&a, "v", 0), pattern(5));
    assert_eq!(read_at(&a, "v@s1", 0), pattern(1));
}
