//! A snapshot that an NBD client is reading is in use: retention and
//! `prune` keep it, `snap delete` (even `--force`) and `vol delete` refuse
//! it naming the readers; once the client disconnects it goes as usual.
//! Before, retention deleted it under the client, whose next read failed
//! with EIO (seen in soak run 5).
//!
//! Real `sluice serve` processes, the CLI, and an NBD client
//! (`sluice::nbd_client`, the demo's) holding the export open.

mod common;
use common::*;
use sluice::nbd_client::NbdClient;

#[test]
fn an_open_snapshot_export_is_kept_until_its_reader_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let a = Daemon::named(dir.path(), "a", &[]);
    a.ok(&["vol", "create", "v", "--size", "4M"]);
    for s in ["s1", "s2", "s3"] {
        a.ok(&["snap", "create", "v", s]);
    }
    let mut reader = NbdClient::open(&a.nbd, "v@s1").expect("open the export v@s1");
    reader.read(0, 4096).expect("read v@s1");
    // The server counts the reader once its handshake is done.
    wait_until("the reader counted", || {
        let o = a.cli(&["snap", "delete", "v", "s1"]);
        !o.status.success() && stderr(&o).contains("NBD client")
    });

    let o = a.cli(&["snap", "delete", "v", "s1", "--force"]);
    assert!(!o.status.success(), "a forced delete went under a reader");
    let e = stderr(&o);
    assert!(
        e.contains("v@s1") && e.contains("1 NBD client(s) reading its export"),
        "{e}"
    );
    let o = a.cli(&["vol", "delete", "v"]);
    assert!(!o.status.success(), "vol delete went under a reader");

    let plan = a.json(&["prune", "v", "--keep", "1"]);
    let skipped = plan["skipped"].to_string();
    assert!(
        skipped.contains("s1") && skipped.contains("NBD client"),
        "{plan}"
    );
    assert_eq!(a.snap_names("v"), ["s1", "s3"], "prune: {plan}");
    a.ok(&["vol", "retain", "v", "--keep", "1"]);
    a.ok(&["snap", "create", "v", "s4"]);
    wait_until("retention deleted s3", || a.snap_names("v") == ["s1", "s4"]);
    // Still readable: retention ran past it.
    reader.read(4096, 4096).expect("read v@s1 after retention");

    drop(reader);
    wait_until("retention deleted s1 once its reader left", || {
        a.snap_names("v") == ["s4"]
    });
}
