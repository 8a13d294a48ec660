//! Issue 5, test 4, with real `sluice serve` processes and real TCP: data
//! damaged on the wire is detected and nothing is committed.
//!
//! The destination mirrors through the fault-injecting proxy, which
//! (1) flips one byte inside a seeded extent's payload (after the frame
//! header and body, where the frame crc does not reach): the extent
//! checksum must catch it, the error must name the position and lba; and
//! (2) flips a byte and re-encodes the frame with a matching extent
//! checksum (a lying source): only the snapshot's end-to-end content digest
//! can catch it. Either way the update fails with a one-line error saying
//! what and where, the destination's snapshot list and committed content
//! are unchanged, and the next update through a clean path succeeds (from
//! the last checkpoint where there is one) and matches the source.
//!
//! The proxy must read and rewrite frames, so both nodes run in the
//! explicit insecure mode (`--insecure-peers`, clear text); with a peer
//! secret any altered byte fails the encrypted record's authentication
//! before a frame is even decoded (`replicator/src/secure.rs`).

mod common;

use common::*;
use sluice_testkit::proxy::{Fault, Fired, Proxy};

const VOL_MB: u64 = 32;
const SLOTS: u64 = 128;
const SLOT_BYTES: u64 = 256 << 10;
const EXTENT_BYTES: u64 = 128 << 10;
const CKPT_ITEMS: u64 = 32;

fn round(a: &Daemon, rng: &mut Rng, snap: &str) {
    let base = rng.next() % 250;
    let mut cmds: Vec<String> = (0..SLOTS)
        .map(|i| {
            format!(
                "aio_write -P {} {} {}",
                (base + i) % 250 + 1,
                i * SLOT_BYTES,
                EXTENT_BYTES
            )
        })
        .collect();
    cmds.push("aio_flush".into());
    qemu_io(&a.nbd, "v", &cmds);
    a.ok(&["snap", "create", "v", snap]);
}

/// (name, id, digests) of every snapshot of v.
fn snap_ids(d: &Daemon) -> Vec<(String, String, String)> {
    d.json(&["snap", "list", "v"])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or_default().to_string(),
                s["id"].as_str().unwrap_or_default().to_string(),
                s["digests"].to_string(),
            )
        })
        .collect()
}

fn rel_status(b: &Daemon) -> serde_json::Value {
    b.json(&["mirror", "status"])
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["dst"] == "v")
        .cloned()
        .expect("relationship v")
}

fn failed_one_line(o: &std::process::Output, what: &str) -> String {
    assert!(
        !o.status.success(),
        "{what} should have failed: {}",
        stdout(o)
    );
    let e = stderr(o);
    assert_eq!(e.trim().lines().count(), 1, "{what}: one-line error: {e}");
    e.trim().to_string()
}

fn same_bytes(a: &Daemon, b: &Daemon, export: &str, scratch: &std::path::Path) {
    let want = read_export(&a.nbd, export, scratch);
    let got = read_export(&b.nbd, export, scratch);
    assert!(want == got, "B's {export} differs from A's");
}

#[test]
fn damaged_extents_are_detected_and_nothing_is_committed() {
    if !have("qemu-io") || !have("qemu-img") {
        println!("skipped: qemu-io/qemu-img not found");
        return;
    }
    let mut rng = Rng::from_env("damaged_extents");
    let dir = tempfile::tempdir().unwrap();
    let scratch = dir.path();
    // Transfers served by A checkpoint every CKPT_ITEMS items.
    let cfg = scratch.join("a.toml");
    std::fs::write(&cfg, format!("checkpoint_items = {CKPT_ITEMS}\n")).unwrap();
    let a = Daemon::try_start(
        &init_pool(scratch, "a.img", "256M"),
        &[
            "--name",
            "a",
            "--config",
            cfg.to_str().unwrap(),
            "--insecure-peers",
        ],
    )
    .unwrap();
    let b = Daemon::try_start(
        &init_pool(scratch, "b.img", "256M"),
        &["--name", "b", "--insecure-peers"],
    )
    .unwrap();
    let proxy = Proxy::start(&a.listen);
    a.ok(&["vol", "create", "v", "--size", &format!("{VOL_MB}M")]);
    round(&a, &mut rng, "s0");
    let from = format!("{}/v", proxy.addr());
    let r: serde_json::Value =
        serde_json::from_str(&b.ok(&["mirror", "create", "v", "--from", &from, "--json"])).unwrap();
    assert_eq!(r["total_items"].as_u64(), Some(SLOTS), "{r}");

    // (1) A flipped payload byte: the extent checksum catches it.
    round(&a, &mut rng, "s1");
    let before = snap_ids(&b);
    let s0_bytes = read_export(&b.nbd, "v@s0", scratch);
    let nth = rng.next() % SLOTS;
    proxy.arm(Fault::CorruptExtent {
        nth,
        offset: rng.next(),
    });
    let o = b.cli(&["mirror", "update", "v", "--json"]);
    let e = failed_one_line(&o, "update with a corrupted extent");
    println!("corrupted extent {nth}: {e}");
    assert!(
        matches!(proxy.fired().last(), Some(Fired::Corrupted { .. })),
        "the corruption did not fire: {:?}",
        proxy.fired()
    );
    // What and where: the checksum, the item position and the block address
    // (slot i is item i at block i * 64).
    for want in [
        "failed its checksum".to_string(),
        format!("position {nth} "),
        format!("lba {})", nth * SLOT_BYTES / 4096),
        "nothing was committed".to_string(),
        "-> v".to_string(),
    ] {
        assert!(e.contains(&want), "error lacks {want:?}: {e}");
    }
    assert_eq!(snap_ids(&b), before, "B's snapshots changed");
    assert!(
        read_export(&b.nbd, "v@s0", scratch) == s0_bytes,
        "B's committed s0 changed"
    );
    let st = rel_status(&b);
    assert_eq!(st["newest_common_snapshot"]["name"], "s0", "{st}");
    assert!(
        st["last_error"]
            .as_str()
            .is_some_and(|t| t.contains("checksum")),
        "{st}"
    );
    let resume_at = nth / CKPT_ITEMS * CKPT_ITEMS;
    assert_eq!(
        st["checkpoint"]["position"].as_u64(),
        Some(resume_at),
        "{st}"
    );
    // A clean path: resumes from the last good checkpoint and matches.
    let r = b.json(&["mirror", "update", "v"]);
    assert_eq!(r["kind"], "incremental", "{r}");
    assert_eq!(r["resumed_from"].as_u64(), Some(resume_at), "{r}");
    assert_eq!(r["target"]["name"], "s1");
    same_bytes(&a, &b, "v@s1", scratch);
    same_bytes(&a, &b, "v@s0", scratch);

    // (2) A flipped byte under a valid extent checksum: the content digest
    // of the snapshot catches it at commit.
    round(&a, &mut rng, "s2");
    let before = snap_ids(&b);
    let s1_bytes = read_export(&b.nbd, "v@s1", scratch);
    let nth = rng.next() % SLOTS;
    proxy.arm(Fault::ForgeExtent {
        nth,
        offset: rng.next(),
    });
    let o = b.cli(&["mirror", "update", "v", "--json"]);
    let e = failed_one_line(&o, "update with a forged extent");
    println!("forged extent {nth}: {e}");
    assert!(
        matches!(proxy.fired().last(), Some(Fired::Forged { .. })),
        "the forgery did not fire: {:?}",
        proxy.fired()
    );
    for want in [
        "content digest mismatch",
        "snapshot s2",
        "nothing was committed",
        "-> v",
    ] {
        assert!(e.contains(want), "error lacks {want:?}: {e}");
    }
    assert_eq!(snap_ids(&b), before, "B's snapshots changed");
    assert!(
        read_export(&b.nbd, "v@s1", scratch) == s1_bytes,
        "B's committed s1 changed"
    );
    let st = rel_status(&b);
    assert_eq!(st["newest_common_snapshot"]["name"], "s1", "{st}");
    assert!(st["last_error"].is_string(), "{st}");
    // A clean path: the whole s1 -> s2 again, repairing the live image.
    let r = b.json(&["mirror", "update", "v"]);
    assert_eq!(r["kind"], "incremental", "{r}");
    assert_eq!(r["target"]["name"], "s2");
    same_bytes(&a, &b, "v@s2", scratch);
    same_bytes(&a, &b, "v", scratch);
    let digest = |d: &Daemon| {
        snap_ids(d)
            .into_iter()
            .find(|s| s.0 == "s2")
            .map(|s| s.2)
            .expect("s2")
    };
    assert_eq!(digest(&a), digest(&b));
    let st = rel_status(&b);
    assert!(st["last_error"].is_null(), "{st}");
    assert_eq!(st["full_transfers"].as_u64(), Some(1), "{st}");
    assert_eq!(st["incremental_transfers"].as_u64(), Some(2), "{st}");
}
