//! Issue 10, item 6, with real `sluice serve` processes and real TCP: a
//! long scheduled transfer does not stall the scheduler.
//!
//! The story: scheduled transfers used to run inline on the scheduler
//! thread, one at a time. While one long transfer ran, no lock set was
//! renewed, so an upstream with `lease_policy = "release"` marked the
//! downstream's locks stale and then released them in the middle of the
//! transfer; every other relationship of that node waited too.
//!
//! Here A (upstream, `lease_policy = "release"`, short grace) serves two
//! volumes to B (lease 2 s, so it renews about every second). B pulls both
//! with `--every 1s`; the big one is throttled so that its scheduled
//! incremental (16 MiB at 1 MiB/s) lasts many of B's leases. While it runs:
//! - B's locks on A stay active (never stale, never released), and A sees
//!   them renewed again and again;
//! - the small relationship keeps being updated (its transfer count grows).
//!
//! Afterwards B's locks are still active, A's log never reported them
//! stale or released, and B stops cleanly on SIGTERM.
//!
//! Every wait polls with a deadline; no wall-clock duration is asserted.

mod common;
use common::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

const B_LEASE_MS: u64 = 2000;
/// MiB written to the big volume between its two snapshots.
const BIG_MIB: u64 = 16;

fn config(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

/// `mirror status` of the relationship into `dst` on `d`.
fn status(d: &Daemon, dst: &str) -> Value {
    d.json(&["mirror", "status"])
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["dst"] == dst)
        .cloned()
        .unwrap_or_else(|| panic!("no relationship into {dst}"))
}

fn common_name(m: &Value) -> String {
    m["newest_common_snapshot"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The locks B holds on `a`.
fn b_locks(a: &Daemon) -> Vec<Value> {
    a.json(&["lock", "list"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["origin_node"] == "b")
        .cloned()
        .collect()
}

/// When B last renewed its set, as A's copy of B's locks says.
fn newest_renewal(ls: &[Value]) -> u64 {
    ls.iter()
        .filter_map(|l| l["renewed_unix_ms"].as_u64())
        .max()
        .unwrap_or(0)
}

/// B's locks on A are there and every one of them is active.
fn assert_b_locks_active(a: &Daemon, when: &str) -> Vec<Value> {
    let ls = b_locks(a);
    assert!(
        !ls.is_empty(),
        "{when}: A holds no lock of B's any more\nA's log:\n{}",
        a.log_text()
    );
    for l in &ls {
        assert_eq!(
            l["state"],
            "active",
            "{when}: B's lock on A is not active: {l}\nA's log:\n{}",
            a.log_text()
        );
    }
    ls
}

/// A's log from byte `from` on never reports B's locks stale or released.
fn assert_log_never_lost_b(a: &Daemon, from: usize) {
    let log = a.log_text();
    let since = log.get(from..).unwrap_or_default();
    for bad in ["downstream locks released", "downstream lock set is stale"] {
        assert!(
            !since.lines().any(|l| l.contains(bad)),
            "A's log says {bad:?} for its only downstream B:\n{since}"
        );
    }
}

#[test]
fn a_lease_shorter_than_a_throttled_scheduled_transfer_survives_it() {
    if !have("qemu-io") {
        println!("skipped: qemu-io not found");
        return;
    }
    let _rng = Rng::from_env("scheduler");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let a_cfg = config(
        p,
        "a.toml",
        "lease_policy = \"release\"\nlease_grace_ms = 1000\n",
    );
    let b_cfg = config(p, "b.toml", &format!("lease_ms = {B_LEASE_MS}\n"));
    let a = Daemon::try_start(
        &init_pool(p, "a.img", "128M"),
        &["--name", "a", "--config", &a_cfg],
    )
    .unwrap();
    let b = Daemon::try_start(
        &init_pool(p, "b.img", "128M"),
        &["--name", "b", "--config", &b_cfg],
    )
    .unwrap();
    a.ok(&["vol", "create", "big", "--size", "32M"]);
    a.ok(&["snap", "create", "big", "s1"]);
    a.ok(&["vol", "create", "small", "--size", "4M"]);
    a.ok(&["snap", "create", "small", "t0"]);
    // Both baselines are nearly empty, so `mirror create` returns quickly.
    b.ok(&[
        "mirror",
        "create",
        "big",
        "--from",
        &format!("{}/big", a.listen),
        "--every",
        "1s",
        "--throttle",
        "1M",
    ]);
    b.ok(&[
        "mirror",
        "create",
        "small",
        "--from",
        &format!("{}/small", a.listen),
        "--every",
        "1s",
    ]);
    assert_b_locks_active(&a, "after the baselines");
    // (B's very first set, before its first baseline, is empty: A logs that
    // as a release of nothing. Only what A logs from here on counts.)
    let log_from = a.log_text().len();

    // The long one: BIG_MIB MiB at 1 MiB/s, brought over by B's schedule.
    let cmds: Vec<String> = (0..BIG_MIB)
        .map(|i| format!("write -P {} {} 1M", i + 1, i << 20))
        .collect();
    qemu_io(&a.nbd, "big", &cmds);
    a.ok(&["snap", "create", "big", "s2"]);
    wait_until("B's scheduled transfer of the big volume to start", || {
        status(&b, "big")["state"] == "transferring"
    });

    let small_start = status(&b, "small")["incremental_transfers"]
        .as_u64()
        .unwrap();
    let mut small_during = 0;
    let mut renewals = BTreeSet::new();
    let mut next_t = 1;
    let deadline = Instant::now() + WAIT_DEADLINE;
    loop {
        // Read the small relationship and the locks first, the big one
        // last: while the big one is not done, what was read before
        // happened during its transfer.
        let small = status(&b, "small");
        if common_name(&small) == format!("t{}", next_t - 1) {
            a.ok(&["snap", "create", "small", &format!("t{next_t}")]);
            next_t += 1;
        }
        let small_n = small["incremental_transfers"].as_u64().unwrap();
        let ls = assert_b_locks_active(&a, "during the big transfer");
        let big = status(&b, "big");
        if common_name(&big) == "s2" {
            break;
        }
        small_during = small_n - small_start;
        renewals.insert(newest_renewal(&ls));
        assert!(
            Instant::now() < deadline,
            "timed out waiting for the big transfer: {big}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "during the big transfer: {} renewals of B's set seen on A, {small_during} small updates",
        renewals.len()
    );
    assert!(
        renewals.len() >= 3,
        "A saw B's set renewed only {} times while the big transfer ran",
        renewals.len()
    );
    assert!(
        small_during >= 2,
        "the small relationship was updated {small_during} times while the big one transferred"
    );
    let big = status(&b, "big");
    let last = &big["last_transfer"];
    assert_eq!(last["kind"], "incremental", "{big}");
    assert!(
        last["bytes"].as_u64().unwrap() >= BIG_MIB << 20,
        "the scheduled transfer was not the long one: {big}"
    );
    assert_eq!(big["full_transfers"], 1, "no restart from zero: {big}");
    assert!(big["last_error"].is_null(), "{big}");

    // After it: B's locks are still held (renewed past the end), and A
    // never reported losing them.
    let mark = newest_renewal(&assert_b_locks_active(&a, "after the big transfer"));
    wait_until("B to renew its set on A after the transfer", || {
        newest_renewal(&b_locks(&a)) > mark
    });
    assert_b_locks_active(&a, "after a renewal past the transfer");
    assert_log_never_lost_b(&a, log_from);
    assert!(b.term().success(), "B did not stop cleanly");
}

/// `mirror create --follow` on real processes, two volumes on every hop of
/// A -> B -> C, A pruned to its newest snapshot: each snapshot taken on A
/// reaches C by itself, every update after the baselines is incremental.
/// Then B is lost for good; C, re-attached to A with `mirror retarget`,
/// follows A from there.
#[test]
fn follow_passes_snapshots_down_a_process_cascade_and_past_a_lost_node() {
    let dir = tempfile::tempdir().unwrap();
    let a = Daemon::named(dir.path(), "a", &[]);
    let mut b = Daemon::named(dir.path(), "b", &[]);
    let c = Daemon::named(dir.path(), "c", &[]);
    let vols = ["v", "w"];
    for v in vols {
        a.ok(&["vol", "create", v, "--size", "8M"]);
        a.ok(&["snap", "create", v, "s0"]);
        b.ok(&["mirror", "create", v, "--from", &a.source(v), "--follow"]);
        c.ok(&["mirror", "create", v, "--from", &b.source(v), "--follow"]);
    }
    let table = c.ok(&["mirror", "status"]);
    assert!(table.contains("follow"), "{table}");
    assert_eq!(c.mirror("v")["follow"], true);
    let arrives = |n: &Daemon, v: &str, s: &str| {
        wait_until(&format!("{s} of {v} to reach {}", n.listen), || {
            n.mirror(v)["newest_common_snapshot"]["name"] == s
        })
    };
    for round in 1..=3u64 {
        for v in vols {
            let s = format!("s{round}");
            a.ok(&["snap", "create", v, &s]);
            a.ok(&["prune", v, "--keep", "1"]);
            arrives(&c, v, &s);
        }
    }
    for (n, v) in [(&b, "v"), (&b, "w"), (&c, "v"), (&c, "w")] {
        let m = n.mirror(v);
        assert_eq!(m["full_transfers"], 1, "{}: {m}", n.listen);
    }
    // B is lost; C re-attaches to A and follows it from there.
    assert!(b.alive());
    b.kill();
    for v in vols {
        // C's follower may be trying the dead B right now: a retarget
        // meanwhile is refused as busy, and taken once that try failed.
        let mut r = serde_json::Value::Null;
        wait_until(&format!("the retarget of {v} to be taken"), || {
            let o = c.cli(&["mirror", "retarget", v, "--from", &a.source(v), "--json"]);
            if o.status.success() {
                r = serde_json::from_slice(&o.stdout).unwrap();
                return true;
            }
            let err = stderr(&o);
            assert!(err.contains("already running"), "{err}");
            false
        });
        assert_eq!(r["new_source_node"], "a", "{r}");
        assert!(r["full_copy_bytes"].is_null(), "{r}");
    }
    for v in vols {
        a.ok(&["snap", "create", v, "s4"]);
        a.ok(&["prune", v, "--keep", "1"]);
        arrives(&c, v, "s4");
        let m = c.mirror(v);
        assert_eq!(m["full_transfers"], 1, "{m}");
        assert_eq!(m["source_node"], "a", "{m}");
    }
}
