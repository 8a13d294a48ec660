//! Issue 10, item 4, with real `sluice serve` processes: a qtree mirror's
//! destination is read-only to clients until `mirror break`, like a volume
//! mirror's.
//!
//! The bug: a volume mirror made its destination volume read-only, but a
//! qtree mirror created its qtree inside an ordinary writable volume and
//! nothing stopped an NBD client writing to the `VOL/QTREE` export. The
//! write went through, and the next `mirror update` applied the source's
//! changes on top of it and failed its content-digest check. Now the
//! destination qtree carries its own read-only flag (in the catalog, so it
//! survives a restart): the export is announced read-only, writes get
//! EPERM, `mirror break` and `mirror delete` make it writable, `mirror
//! resync` read-only again.
//!
//! Node A: volume vol0 with qtree db. Node B: `mirror create qv --from
//! A/vol0/db` (destination qv/db). Content is compared through the NBD
//! exports, byte for byte.

mod nbd_common;

use nbd_common::harness::*;
use nbd_common::{Client, CMD_TRIM, CMD_WRITE, EPERM, FLAG_READ_ONLY};
use std::path::Path;
use std::process::Command;

const DST: &str = "qv/db";

/// `qemu-io` writing `pattern` at `offset` of `export`, opened read-write
/// as a client that does not know better would: Ok(output) if it worked.
fn client_write(d: &Daemon, export: &str, pattern: u8, offset: u64) -> Result<String, String> {
    let o = Command::new("qemu-io")
        .args(["-f", "raw", &format!("nbd://{}/{export}", d.nbd)])
        .args(["-c", &format!("write -P {pattern} {offset} 4k")])
        .output()
        .expect("run qemu-io");
    let text = format!("{}{}", stdout(&o), stderr(&o));
    if o.status.success() && !text.contains("failed") && !text.to_lowercase().contains("error") {
        Ok(text)
    } else {
        Err(text)
    }
}

/// The export's transmission flags and what a raw write and a raw trim
/// (a client that ignores the read-only flag) get back.
fn raw_probe(d: &Daemon, export: &str) -> (u16, u32, u32) {
    let addr = d.nbd.parse().expect("NBD address");
    let mut c = Client::connect(addr, export).unwrap_or_else(|e| panic!("open {export}: {e}"));
    let ro = c.flags & FLAG_READ_ONLY;
    let (w, t) = if ro != 0 {
        let (w, _) = c.call(CMD_WRITE, 0, 0, 4096, &[0xEE; 4096]);
        let (t, _) = c.call(CMD_TRIM, 0, 0, 4096, &[]);
        (w, t)
    } else {
        (0, 0)
    };
    c.disconnect();
    (ro, w, t)
}

/// The destination qtree's `read_only` in `vol list --json`.
fn listed_read_only(d: &Daemon) -> bool {
    let vols = d.json(&["vol", "list"]);
    let q = vols
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "qv")
        .and_then(|v| {
            v["qtrees"]
                .as_array()
                .unwrap()
                .iter()
                .find(|q| q["name"] == "db")
                .cloned()
        })
        .unwrap_or_else(|| panic!("qv/db not in vol list: {vols}"));
    q["read_only"]
        .as_bool()
        .unwrap_or_else(|| panic!("qv/db has no read_only in vol list: {q}"))
}

fn assert_read_only(d: &Daemon, when: &str) {
    if let Ok(out) = client_write(d, DST, 0xEE, 0) {
        panic!("{when}: export {DST} accepted a client write: {out}");
    }
    let (ro, w, t) = raw_probe(d, DST);
    assert_ne!(ro, 0, "{when}: export {DST} is not announced read-only");
    assert_eq!((w, t), (EPERM, EPERM), "{when}: raw write, trim on {DST}");
    assert!(listed_read_only(d), "{when}: vol list shows {DST} writable");
    let text = d.ok(&["vol", "list"]);
    assert!(
        text.contains("db (8 MiB, read-only)"),
        "{when}: vol list text: {text}"
    );
}

fn assert_writable(d: &Daemon, when: &str, pattern: u8) {
    client_write(d, DST, pattern, 0)
        .unwrap_or_else(|e| panic!("{when}: write to {DST} refused: {e}"));
    assert_eq!(raw_probe(d, DST).0, 0, "{when}: {DST} announced read-only");
    assert!(
        !listed_read_only(d),
        "{when}: vol list shows {DST} read-only"
    );
}

fn same(a: &Daemon, src: &str, b: &Daemon, scratch: &Path, when: &str) {
    let x = read_export(&a.nbd, src, scratch);
    let y = read_export(&b.nbd, DST, scratch);
    assert!(x == y, "{when}: B's {DST} differs from A's {src}");
}

fn transfer(d: &Daemon, verb: &str) -> serde_json::Value {
    let r = d.json(&["mirror", verb, DST]);
    assert!(r["kind"].is_string(), "mirror {verb}: {r}");
    r
}

#[test]
fn a_qtree_mirror_destination_is_read_only_until_break() {
    assert!(
        have("qemu-io") && have("qemu-img"),
        "this test needs qemu-io and qemu-img (apt-get install qemu-utils)"
    );
    let dir = tempfile::tempdir().unwrap();
    let scratch = dir.path();
    let pool_a = init_pool(scratch, "a.img", "128M");
    let pool_b = init_pool(scratch, "b.img", "128M");
    let a = Daemon::try_start(&pool_a, &["--name", "a"]).unwrap();
    let mut b = Daemon::try_start(&pool_b, &["--name", "b"]).unwrap();
    a.ok(&["vol", "create", "vol0", "--size", "16M"]);
    a.ok(&["qtree", "create", "vol0", "db", "--size", "8M"]);
    qemu_io(
        &a.nbd,
        "vol0/db",
        &["write -P 17 0 64k".into(), "write -P 18 1M 4k".into()],
    );
    a.ok(&["snap", "create", "vol0", "s1"]);

    let r = b.json(&[
        "mirror",
        "create",
        "qv",
        "--from",
        &format!("{}/vol0/db", a.listen),
    ]);
    assert_eq!(r["kind"], "full", "baseline: {r}");
    assert_read_only(&b, "after mirror create");
    same(&a, "vol0/db@s1", &b, scratch, "after the baseline");

    // The refused writes changed nothing: the next update is incremental
    // and passes its digest check.
    qemu_io(&a.nbd, "vol0/db", &["write -P 33 2M 8k".into()]);
    a.ok(&["snap", "create", "vol0", "s2"]);
    let r = transfer(&b, "update");
    assert_eq!(r["kind"], "incremental", "update after refused writes: {r}");
    assert_eq!(r["base"]["name"], "s1", "{r}");
    same(&a, "vol0/db@s2", &b, scratch, "after the update");

    b.ok(&["mirror", "break", DST]);
    assert_writable(&b, "after mirror break", 0x44);

    // Resync with nothing new at the source: read-only again, and the
    // local write is undone (back to s2, the newest common snapshot).
    transfer(&b, "resync");
    assert_read_only(&b, "after mirror resync");
    same(&a, "vol0/db@s2", &b, scratch, "after the resync");
    qemu_io(&a.nbd, "vol0/db", &["write -P 55 3M 4k".into()]);
    a.ok(&["snap", "create", "vol0", "s3"]);
    let r = transfer(&b, "update");
    assert_eq!(r["kind"], "incremental", "update after the resync: {r}");
    same(
        &a,
        "vol0/db@s3",
        &b,
        scratch,
        "after the update past the resync",
    );

    // The flag is in B's catalog: it survives a crash of B.
    b.kill();
    b = Daemon::try_start(&pool_b, &["--name", "b"]).unwrap();
    assert_read_only(&b, "after a restart of B");
    qemu_io(&a.nbd, "vol0/db", &["write -P 66 4M 4k".into()]);
    a.ok(&["snap", "create", "vol0", "s4"]);
    let r = transfer(&b, "update");
    assert_eq!(r["kind"], "incremental", "update after the restart: {r}");
    same(&a, "vol0/db@s4", &b, scratch, "after the restart");

    // Deleting the relationship leaves the qtree, writable.
    b.ok(&["mirror", "delete", DST]);
    assert_writable(&b, "after mirror delete", 0x77);
}
