//! Issue 16, `vol clone VOL@SNAP NEWVOL`, end to end on real `sluice serve`
//! processes, the CLI as an operator types it and real NBD clients
//! (`qemu-img`, `qemu-io`; the demo's client where no tool is needed):
//! - the clone reads as the snapshot, byte for byte, takes writes of its
//!   own, and costs no data blocks when made (the pool's used bytes);
//! - its origin snapshot is held: `snap delete` (even `--force`), `vol
//!   delete` of the origin, `prune` and retention keep it, naming the clone;
//!   `snap list` and `vol list` show the link;
//! - a restart keeps all of it; `vol delete CLONE` ends the clone, and the
//!   snapshot can go then;
//! - a clone of a mirror destination's snapshot (a DR test copy) is
//!   writable, and the mirror's next updates keep the cloned snapshot when
//!   the source drops it, instead of failing, and so does a resync of a
//!   snapshot taken and cloned while the mirror was broken;
//! - bad input gets a clear error that names what was wrong.

mod common;
use common::*;
use sluice::nbd_client::NbdClient;

const MIB: u64 = 1 << 20;

fn refused(d: &Daemon, args: &[&str]) -> String {
    let o = d.cli(args);
    assert!(!o.status.success(), "{args:?} succeeded: {}", stdout(&o));
    stderr(&o)
}

fn used_bytes(d: &Daemon) -> u64 {
    d.json(&["status"])["space"]["used_bytes"].as_u64().unwrap()
}

#[test]
fn a_clone_shares_its_snapshot_holds_it_and_ends_with_its_delete() {
    if !have("qemu-img") || !have("qemu-io") {
        return; // said by `have` (and a failure where tools are required)
    }
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::from_env("vol_clone_e2e");
    let a = Daemon::named(dir.path(), "a", &[]);
    a.ok(&["vol", "create", "v", "--size", "16M"]);
    {
        // 4 MiB of data, so that a copy would show in the pool's usage.
        let mut c = NbdClient::open(&a.nbd, "v").unwrap();
        for i in 0..4u64 {
            c.write_fua(i * MIB, &vec![i as u8 + 1; MIB as usize])
                .unwrap();
        }
    }
    write_random_blocks(&a, "v", 32, &mut rng);
    a.ok(&["snap", "create", "v", "s1"]);
    let before = used_bytes(&a);

    let out = a.ok(&["vol", "clone", "v@s1", "c"]);
    assert!(out.contains("a clone of v@s1"), "{out}");
    assert!(out.contains("vol delete c"), "says how a clone ends: {out}");
    let c = a.vol("c");
    assert_eq!(c["origin"], "v@s1", "{c}");
    assert_eq!(c["size_bytes"], 16 * MIB, "{c}");
    assert_eq!(c["access"], "writable", "{c}");
    let grew = used_bytes(&a) - before;
    assert!(
        grew < MIB,
        "making the clone wrote {grew} bytes: a copy, not a clone"
    );
    let table = a.ok(&["vol", "list"]);
    assert!(
        table.contains("ORIGIN") && table.contains("v@s1"),
        "{table}"
    );

    // The clone reads as the snapshot; then it diverges, alone.
    let snap_bytes = read_export(&a.nbd, "v@s1", dir.path());
    assert!(
        read_export(&a.nbd, "c", dir.path()) == snap_bytes,
        "clone != v@s1"
    );
    NbdClient::open(&a.nbd, "c")
        .unwrap()
        .write_fua(0, &[0xcc; 4096])
        .unwrap();
    qemu_io(&a.nbd, "c", &["write -P 0xdd 8M 64k".into()]);
    let mut r = NbdClient::open(&a.nbd, "c").unwrap();
    assert_eq!(r.read(0, 4096).unwrap(), vec![0xcc; 4096]);
    assert_eq!(r.read(MIB, 4096).unwrap(), vec![2; 4096], "inherited data");
    drop(r);
    assert!(
        read_export(&a.nbd, "v@s1", dir.path()) == snap_bytes,
        "a write to the clone changed its origin"
    );
    assert_eq!(
        NbdClient::open(&a.nbd, "v").unwrap().read(0, 4096).unwrap(),
        vec![1; 4096],
        "a write to the clone changed the origin volume"
    );

    // The origin snapshot is held, and every refusal names the clone.
    for args in [
        &["snap", "delete", "v", "s1"][..],
        &["snap", "delete", "v", "s1", "--force"],
        &["vol", "delete", "v"],
        &["vol", "delete", "v", "--force"],
    ] {
        let e = refused(&a, args);
        assert!(
            e.contains("v@s1") && e.contains("clone") && e.contains('c'),
            "{args:?}: {e}"
        );
    }
    a.ok(&["snap", "create", "v", "s2"]);
    let plan = a.json(&["prune", "v", "--keep", "1"]);
    assert!(plan["skipped"].to_string().contains("clone"), "{plan}");
    assert_eq!(a.snap_names("v"), ["s1", "s2"], "{plan}");
    a.ok(&["vol", "retain", "v", "--keep", "1"]);
    a.ok(&["snap", "create", "v", "s3"]);
    wait_until("retention deleted s2", || a.snap_names("v") == ["s1", "s3"]);
    let listed = a.json(&["snap", "list", "v"]);
    assert_eq!(listed[0]["clones"], serde_json::json!(["c"]), "{listed}");
    let text = a.ok(&["snap", "list", "v"]);
    assert!(text.contains("clones (held while they exist): c"), "{text}");

    // A restart keeps the clone, its data and its hold.
    let data = a.data.clone();
    a.term();
    let a = Daemon::try_start(&data, &["--name", "a"]).unwrap();
    assert_eq!(a.vol("c")["origin"], "v@s1");
    assert_eq!(
        NbdClient::open(&a.nbd, "c").unwrap().read(0, 4096).unwrap(),
        vec![0xcc; 4096]
    );
    assert!(refused(&a, &["snap", "delete", "v", "s1"]).contains("clone"));

    // `vol delete` ends the clone; retention then takes s1 by itself.
    let with_clone = used_bytes(&a);
    a.ok(&["vol", "delete", "c"]);
    wait_until("retention deleted s1 once its clone went", || {
        a.snap_names("v") == ["s3"]
    });
    assert!(
        used_bytes(&a) < with_clone,
        "the clone's own blocks were not freed"
    );

    // Bad input: clear errors that name what was wrong.
    let e = refused(&a, &["vol", "clone", "v", "c2"]);
    assert!(e.contains("VOL@SNAP"), "{e}");
    let e = refused(&a, &["vol", "clone", "v@nope", "c2"]);
    assert!(e.contains("nope"), "{e}");
    let e = refused(&a, &["vol", "clone", "w@s3", "c2"]);
    assert!(e.contains('w'), "{e}");
    let e = refused(&a, &["vol", "clone", "v@s3", "v"]);
    assert!(e.contains("already exists"), "{e}");
    let e = refused(&a, &["vol", "clone", "v@s3", ".."]);
    assert!(e.contains("bad name"), "{e}");
    let e = refused(&a, &["vol", "clone", "--help-me", "v@s3"]);
    assert!(!e.is_empty());
    let help = stdout(&sluice(&["vol", "clone", "--help"]));
    assert!(help.contains("VOL@SNAP"), "{help}");
}

#[test]
fn a_clone_of_a_mirror_destination_is_writable_and_the_mirror_keeps_its_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let a = Daemon::named(dir.path(), "a", &[]);
    let b = Daemon::named(dir.path(), "b", &[]);
    a.ok(&["vol", "create", "v", "--size", "8M"]);
    NbdClient::open(&a.nbd, "v")
        .unwrap()
        .write_fua(0, &[1; 4096])
        .unwrap();
    a.ok(&["snap", "create", "v", "s1"]);
    b.ok(&["mirror", "create", "v", "--from", &a.source("v")]);
    // A DR test copy on B, of the destination's snapshot.
    b.ok(&["vol", "clone", "v@s1", "drtest"]);
    NbdClient::open(&b.nbd, "drtest")
        .unwrap()
        .write_fua(4096, &[9; 4096])
        .unwrap();
    let o = b.cli(&["vol", "delete", "v"]);
    assert!(!o.status.success(), "deleted a volume with a clone");

    // The source moves on and drops s1; B's updates keep it for the clone.
    for (i, s) in ["s2", "s3"].iter().enumerate() {
        NbdClient::open(&a.nbd, "v")
            .unwrap()
            .write_fua(0, &[i as u8 + 2; 4096])
            .unwrap();
        a.ok(&["snap", "create", "v", s]);
        let r = b.json(&["mirror", "update", "v"]);
        assert_eq!(r["kind"], "incremental", "{r}");
    }
    a.ok(&["snap", "delete", "v", "s1"]);
    a.ok(&["snap", "delete", "v", "s2"]);
    NbdClient::open(&a.nbd, "v")
        .unwrap()
        .write_fua(0, &[7; 4096])
        .unwrap();
    a.ok(&["snap", "create", "v", "s4"]);
    let r = b.json(&["mirror", "update", "v"]);
    assert_eq!(r["kind"], "incremental", "{r}");
    let names = b.snap_names("v");
    assert!(
        names.contains(&"s1".to_string()),
        "the cloned snapshot went: {names:?}"
    );
    assert!(!names.contains(&"s2".to_string()), "B kept s2: {names:?}");
    let m = b.mirror("v");
    assert_eq!(m["full_transfers"], 1, "{m}");
    assert_eq!(
        NbdClient::open(&b.nbd, "v").unwrap().read(0, 4096).unwrap(),
        vec![7; 4096]
    );
    let mut r = NbdClient::open(&b.nbd, "drtest").unwrap();
    assert_eq!(r.read(0, 4096).unwrap(), vec![1; 4096]);
    assert_eq!(r.read(4096, 4096).unwrap(), vec![9; 4096]);
    drop(r);
    // Ended, the clone lets the mirror drop s1 at its next update.
    b.ok(&["vol", "delete", "drtest"]);
    a.ok(&["snap", "create", "v", "s5"]);
    b.ok(&["mirror", "update", "v"]);
    assert!(!b.snap_names("v").contains(&"s1".to_string()));

    // A snapshot taken on the broken destination and cloned there is kept
    // by a resync (not counted as discarded), and the clone stays whole.
    b.ok(&["mirror", "break", "v"]);
    NbdClient::open(&b.nbd, "v")
        .unwrap()
        .write_fua(0, &[8; 4096])
        .unwrap();
    b.ok(&["snap", "create", "v", "local1"]);
    b.ok(&["vol", "clone", "v@local1", "x"]);
    let r = b.json(&["mirror", "resync", "v"]);
    assert!(r["kind"] != "full", "{r}");
    assert!(b.snap_names("v").contains(&"local1".to_string()), "{r}");
    assert_eq!(
        NbdClient::open(&b.nbd, "v").unwrap().read(0, 4096).unwrap(),
        vec![7; 4096],
        "resynced to the source"
    );
    assert_eq!(
        NbdClient::open(&b.nbd, "x").unwrap().read(0, 4096).unwrap(),
        vec![8; 4096]
    );
}
