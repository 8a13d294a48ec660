//! A pool of two shards through the real daemon: `sluice init --shards 2`,
//! `serve` (logs and reports `shards=2`), four volumes spread over both
//! shards, data written through NBD with qemu-io, SIGTERM, restart, data
//! read back. And a small pool made without `--shards` stays at one shard.
//! The qemu-io parts are skipped (with a printed line) when it is missing.

mod common;

use common::*;
use sluice_engine::sharded::shard_of;
use std::path::Path;

/// Two volume names on each of `n` shards.
fn names(n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for shard in 0..n {
        out.extend(
            (0..)
                .map(|k| format!("vol{k}"))
                .filter(|v| shard_of(v, n) == shard)
                .take(2),
        );
    }
    out
}

fn pattern(i: usize) -> u8 {
    0x30 + i as u8
}

fn write_all(d: &Daemon, vols: &[String]) {
    for (i, v) in vols.iter().enumerate() {
        qemu_io(
            &d.nbd,
            v,
            &[
                format!("write -P {} 0 1M", pattern(i)),
                format!("write -P {} 8M 64k", pattern(i) + 1),
            ],
        );
    }
}

fn read_all(d: &Daemon, vols: &[String]) {
    for (i, v) in vols.iter().enumerate() {
        qemu_io(
            &d.nbd,
            v,
            &[
                format!("read -P {} 0 1M", pattern(i)),
                format!("read -P {} 8M 64k", pattern(i) + 1),
                "read -P 0 16M 64k".to_string(),
            ],
        );
    }
}

#[test]
fn two_shards_through_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool.img");
    let out = sluice(&[
        "init",
        pool.to_str().unwrap(),
        "--size",
        "2G",
        "--shards",
        "2",
    ]);
    assert!(out.status.success(), "init: {}", stderr(&out));
    assert!(stdout(&out).contains("shards=2"), "{}", stdout(&out));

    let d = Daemon::start(&pool);
    assert_eq!(d.json(&["status"])["shards"], 2);
    assert!(d.log_text().contains("shards=2"), "{}", d.log_text());
    let vols = names(2);
    for v in &vols {
        d.ok(&["vol", "create", v, "--size", "64M"]);
    }
    let list = d.json(&["vol", "list"]);
    let list = list.as_array().expect("volume list");
    assert_eq!(list.len(), 4);
    let mut listed: Vec<String> = list
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    let mut want = vols.clone();
    want.sort();
    listed.sort();
    assert_eq!(listed, want);
    // The same name again is refused by the shard that owns it.
    let dup = d.cli(&["vol", "create", &vols[3], "--size", "64M"]);
    assert!(!dup.status.success());
    assert!(stderr(&dup).contains("already exists"), "{}", stderr(&dup));
    let space = d.json(&["status"]);
    assert_eq!(space["space"]["total_bytes"], 2u64 << 30);

    written_then_read_after_restart(d, &pool, &vols, 2);
}

#[test]
fn small_pool_without_shards_flag_has_one_shard() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool.img");
    let out = sluice(&["init", pool.to_str().unwrap(), "--size", "256M"]);
    assert!(out.status.success(), "init: {}", stderr(&out));
    assert!(stdout(&out).contains("shards=1"), "{}", stdout(&out));
    let d = Daemon::start(&pool);
    assert_eq!(d.json(&["status"])["shards"], 1);
    let vols = vec!["a".to_string(), "b".to_string()];
    for v in &vols {
        d.ok(&["vol", "create", v, "--size", "32M"]);
    }
    written_then_read_after_restart(d, &pool, &vols, 1);
}

/// Write every volume's pattern through NBD (when qemu-io is there), stop
/// the daemon with SIGTERM, start it again on `pool`: it has `shards`
/// shards and every volume, and each reads back what was written.
fn written_then_read_after_restart(d: Daemon, pool: &Path, vols: &[String], shards: u64) {
    let qemu = have("qemu-io");
    if qemu {
        write_all(&d, vols);
    } else {
        println!("skipped: the qemu-io part (qemu-io not installed)");
    }
    assert!(d.term().success());
    let d = Daemon::start(pool);
    assert_eq!(d.json(&["status"])["shards"], shards);
    assert_eq!(
        d.json(&["vol", "list"]).as_array().unwrap().len(),
        vols.len()
    );
    if qemu {
        read_all(&d, vols);
    }
    assert!(d.term().success());
}

/// `init --volumes-max` sets how many volumes each shard's region holds:
/// the next one is refused with an error that says the limit, and an
/// out-of-range value is refused at init.
#[test]
fn init_volumes_max_is_the_limit_the_node_keeps() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool.img");
    let p = pool.to_str().unwrap();
    let out = sluice(&[
        "init",
        p,
        "--size",
        "256M",
        "--shards",
        "1",
        "--volumes-max",
        "0",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--volumes-max 0"), "{}", stderr(&out));
    let out = sluice(&[
        "init",
        p,
        "--size",
        "256M",
        "--shards",
        "1",
        "--volumes-max",
        "2",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let d = Daemon::start(&pool);
    d.ok(&["vol", "create", "a", "--size", "1M"]);
    d.ok(&["vol", "create", "b", "--size", "1M"]);
    let o = d.cli(&["vol", "create", "c", "--size", "1M"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("already has 2 volumes"),
        "{}",
        stderr(&o)
    );
    d.term();
}
