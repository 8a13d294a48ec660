//! Issue 5: scheduled updates and pruning by count on each node, with real
//! `sluice serve` processes and real TCP, in a cascade A -> B -> C.
//!
//! - A keeps 3 snapshots (from its `--config` file, set before the volume
//!   exists), B keeps 1 (`mirror create --keep 1`) and pulls every second
//!   (`--every 1s`); C pulls by hand and lags several rounds.
//! - Nobody runs `prune`: each node deletes beyond its count on its own,
//!   except what soft locks hold, so C's updates stay incremental and A and
//!   B never hold more than their count plus the snapshots a lock names.
//! - An application lock keeps a snapshot past the count; once released,
//!   retention deletes it by itself.
//! - `vol retain` shows in `vol list`, ends with `--off`, and refuses a
//!   missing volume or a count of 0 with a one-line error.
//!
//! Every wait polls with a deadline; no wall-clock duration is asserted.

mod common;
use common::*;
use serde_json::Value;

/// (name, locked) of each snapshot of `v`, oldest first.
fn snaps(d: &Daemon) -> Vec<(String, bool)> {
    d.json(&["snap", "list", "v"])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                !s["locks"].as_array().unwrap().is_empty(),
            )
        })
        .collect()
}

fn names(d: &Daemon) -> Vec<String> {
    snaps(d).into_iter().map(|(n, _)| n).collect()
}

/// Beyond the newest `keep`, every snapshot still there is locked (once
/// retention had its pass: the caller waits for that).
fn only_locked_beyond(d: &Daemon, keep: usize) -> bool {
    let s = snaps(d);
    let old = s.len().saturating_sub(keep);
    s[..old].iter().all(|(_, locked)| *locked)
}

fn mirror(d: &Daemon) -> Value {
    d.json(&["mirror", "status"])[0].clone()
}

fn keep_of(d: &Daemon) -> Value {
    d.json(&["vol", "list"])
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "v")
        .map(|v| v["keep"].clone())
        .unwrap_or(Value::Null)
}

#[test]
fn every_node_prunes_by_count_without_breaking_a_chain() {
    let mut rng = Rng::from_env("retention");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let a_cfg = p.join("a.toml");
    std::fs::write(&a_cfg, "retention = { v = 3 }\n").unwrap();
    let a = Daemon::try_start(
        &init_pool(p, "a.img", "128M"),
        &["--name", "a", "--config", a_cfg.to_str().unwrap()],
    )
    .unwrap();
    let b = Daemon::try_start(&init_pool(p, "b.img", "128M"), &["--name", "b"]).unwrap();
    let c = Daemon::try_start(&init_pool(p, "c.img", "128M"), &["--name", "c"]).unwrap();
    a.ok(&["vol", "create", "v", "--size", "8M"]);
    assert_eq!(keep_of(&a), 3, "A's policy from its config file");
    a.ok(&["snap", "create", "v", "s1"]);
    b.ok(&[
        "mirror",
        "create",
        "v",
        "--from",
        &format!("{}/v", a.listen),
        "--every",
        "1s",
        "--keep",
        "1",
    ]);
    assert_eq!(keep_of(&b), 1, "B's policy from mirror create --keep");
    c.ok(&[
        "mirror",
        "create",
        "v",
        "--from",
        &format!("{}/v", b.listen),
    ]);

    for round in 2..=9 {
        write_random_blocks(&a, "v", 4, &mut rng);
        let snap = format!("s{round}");
        a.ok(&["snap", "create", "v", &snap]);
        // B's schedule brings it over; nobody asks.
        wait_until(&format!("B's scheduled update to {snap}"), || {
            mirror(&b)["newest_common_snapshot"]["name"] == snap.as_str()
        });
        if round % 3 == 1 {
            let r = c.json(&["mirror", "update", "v"]);
            assert_eq!(r["kind"], "incremental", "round {round}: {r}");
        }
        wait_until(&format!("round {round}: A back within 3 + locked"), || {
            only_locked_beyond(&a, 3)
        });
        wait_until(&format!("round {round}: B back within 1 + locked"), || {
            only_locked_beyond(&b, 1)
        });
    }
    // The lagging C's base survived on A and B only through locks, and
    // both pruned everything else beyond their counts by themselves.
    assert!(!names(&a).contains(&"s1".to_string()), "A: {:?}", snaps(&a));
    assert!(
        snaps(&b).len() <= 2,
        "B keeps 1 + C's base: {:?}",
        snaps(&b)
    );
    let r = c.json(&["mirror", "update", "v"]);
    assert_eq!(r["kind"], "incremental", "{r}");
    for (d, name) in [(&b, "B"), (&c, "C")] {
        let m = mirror(d);
        assert_eq!(m["full_transfers"], 1, "{name}: only the baseline: {m}");
    }
    for (d, name) in [(&a, "A"), (&b, "B")] {
        assert!(
            d.log_text().contains("retention deleted snapshot"),
            "{name}'s log does not record its retention deletes"
        );
    }

    // An application lock holds a snapshot past A's count; released, it goes.
    let a_names = names(&a);
    let oldest = a_names[0].clone();
    a.ok(&["lock", "add", "v", &oldest, "--owner", "app"]);
    for round in 10..=13 {
        a.ok(&["snap", "create", "v", &format!("s{round}")]);
    }
    wait_until("A's retention pass after 4 new snapshots", || {
        only_locked_beyond(&a, 3) && names(&a).len() <= 3 + 2
    });
    assert!(
        names(&a).contains(&oldest),
        "A deleted {oldest} under an application lock: {:?}",
        snaps(&a)
    );
    a.ok(&["lock", "release", "v", &oldest, "--holder", "app"]);
    wait_until(
        &format!("retention to delete {oldest} once released"),
        || !names(&a).contains(&oldest),
    );

    // The policy survives a restart and ends with --off.
    let a_pool = a.data.clone();
    assert!(a.term().success());
    let a = Daemon::try_start(&a_pool, &["--name", "a"]).unwrap();
    assert_eq!(keep_of(&a), 3, "A's policy kept in the pool");
    a.ok(&["vol", "retain", "v", "--off"]);
    assert_eq!(keep_of(&a), Value::Null);
    for round in 14..=18 {
        a.ok(&["snap", "create", "v", &format!("s{round}")]);
    }
    let n = names(&a).len();
    assert!(n >= 5, "without a policy A keeps what it has: {n}");

    // Bad input: one line naming the problem, non-zero exit.
    for (args, want) in [
        (vec!["vol", "retain", "nosuch", "--keep", "2"], "nosuch"),
        (vec!["vol", "retain", "v", "--keep", "0"], "at least 1"),
        (vec!["vol", "retain", "v"], "--keep"),
    ] {
        let o = a.cli(&args);
        assert!(!o.status.success(), "{args:?} succeeded");
        let e = stderr(&o);
        assert!(e.contains(want), "{args:?}: {e}");
    }
}
