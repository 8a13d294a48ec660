//! Issue 16 ("Commands"), end to end on real `sluice serve` processes and
//! the CLI as an operator types it: what `vol list` and `snap list` say is
//! the truth of the moment.
//!
//! - Digests print whole: `snap list` (and `snap create`) show each
//!   namespace's content digest at its full 32 hex digits (128 bits), the
//!   same string `--json` gives, so one can be compared with another node's.
//! - Used bytes are current: a write not yet in a consistency point counts
//!   in full (its data blocks and the map nodes it dirtied, which get their
//!   blocks only at the next CP). The bug: the map nodes counted only after
//!   the CP, so `vol list` right after a write showed less than it would a
//!   few seconds later, with nothing written in between.
//! - A qtree mirror's destination volume (created by the mirror: a
//!   one-block own space holding the mirrored qtree) reports the size it
//!   really holds and that it is read-only, not `4 KiB` and writable; after
//!   `mirror break` it is writable again.

mod common;
use common::*;
use sluice::nbd_client::NbdClient;

const MIB: u64 = 1 << 20;

/// The `vol list` text row of volume `name`, split in cells.
fn row(d: &Daemon, name: &str) -> Vec<String> {
    let text = d.ok(&["vol", "list"]);
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no row {name}:\n{text}"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

#[test]
fn snapshot_digests_print_at_full_length() {
    let dir = tempfile::tempdir().unwrap();
    let a = Daemon::named(dir.path(), "a", &[]);
    a.ok(&["vol", "create", "v", "--size", "8M"]);
    a.ok(&["qtree", "create", "v", "db", "--size", "4M"]);
    NbdClient::open(&a.nbd, "v")
        .unwrap()
        .write_fua(0, &[7u8; 4096])
        .unwrap();
    NbdClient::open(&a.nbd, "v/db")
        .unwrap()
        .write_fua(MIB, &[9u8; 4096])
        .unwrap();
    let created = a.ok(&["snap", "create", "v", "s1"]);
    let snaps = a.json(&["snap", "list", "v"]);
    let digests = snaps[0]["digests"].as_array().unwrap().clone();
    assert_eq!(digests.len(), 2, "{snaps}");
    let text = a.ok(&["snap", "list", "v"]);
    for d in &digests {
        let (ns, hex) = (d[0].as_str().unwrap(), d[1].as_str().unwrap());
        assert_eq!(hex.len(), 32, "a 128-bit digest is 32 hex digits: {hex}");
        assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()), "{hex}");
        let label = if ns.is_empty() {
            "v".to_string()
        } else {
            format!("v/{ns}")
        };
        let line = format!("  digest {label}: {hex}");
        assert!(
            text.lines().any(|l| l == line),
            "snap list lacks {line:?}:\n{text}"
        );
        assert!(
            created.lines().any(|l| l == line),
            "snap create lacks {line:?}:\n{created}"
        );
    }
}

#[test]
fn used_bytes_are_current_before_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let a = Daemon::named(dir.path(), "a", &[]);
    a.ok(&["vol", "create", "v", "--size", "64M"]);
    assert_eq!(a.vol("v")["used_bytes"], 0);
    // Writes without FUA and without a flush: nothing asks for a CP (the
    // timed one comes within seconds; if it came first, the check below
    // still holds).
    let mut c = NbdClient::open(&a.nbd, "v").unwrap();
    let data = vec![0x5Au8; MIB as usize];
    for i in 0..4 {
        c.write(i * 4 * MIB, &data).unwrap();
    }
    let before = a.vol("v")["used_bytes"].as_u64().unwrap();
    assert!(before > 4 * MIB, "4 MiB of data and its map: {before}");
    c.flush().unwrap();
    let after = a.vol("v")["used_bytes"].as_u64().unwrap();
    assert_eq!(
        before, after,
        "used bytes before the CP ({before}) differ from after it ({after})"
    );
    // The text column says the same.
    let cells = row(&a, "v");
    assert_eq!(cells.get(4).map(String::as_str), Some("MiB"), "{cells:?}");
}

#[test]
fn a_qtree_mirror_destination_reports_its_size_and_read_only_state() {
    let dir = tempfile::tempdir().unwrap();
    let a = Daemon::named(dir.path(), "a", &[]);
    let b = Daemon::named(dir.path(), "b", &[]);
    a.ok(&["vol", "create", "vol0", "--size", "16M"]);
    a.ok(&["qtree", "create", "vol0", "db", "--size", "8M"]);
    a.ok(&["snap", "create", "vol0", "s1"]);
    b.ok(&["mirror", "create", "qv", "--from", &a.source("vol0/db")]);

    let v = b.vol("qv");
    assert_eq!(v["total_size_bytes"], 8 * MIB + 4096, "{v}");
    assert_eq!(v["access"], "read-only", "{v}");
    // VOLUME, SIZE (2 cells), USED (2), SNAPSHOTS, KEEP, RO, QTREES...
    let cells = row(&b, "qv");
    assert_eq!(cells[1..3], ["8.0", "MiB"], "qv size: {cells:?}");
    assert_eq!(cells[7], "yes", "qv read-only: {cells:?}");

    // An ordinary volume with a qtree: SIZE is its own space and the qtree.
    let v = a.vol("vol0");
    assert_eq!(v["total_size_bytes"], 24 * MIB, "{v}");
    assert_eq!(v["access"], "writable", "{v}");
    assert_eq!(row(&a, "vol0")[1..3], ["24", "MiB"]);

    b.ok(&["mirror", "break", "qv/db"]);
    assert_eq!(b.vol("qv")["access"], "writable");
    assert_eq!(row(&b, "qv")[7], "no");
}
