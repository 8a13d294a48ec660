//! Issue 10 items 9-12, end to end on real `sluice serve` processes: the
//! reports tell the truth.
//! - An update that had to send the whole volume (its upstream was
//!   re-baselined) is reported and counted as `full`.
//! - A forced delete upstream shows downstream at once: logged, and
//!   `mirror status` says the newest common snapshot is gone and what the
//!   next update costs.
//! - `mirror resync` names the snapshots taken while broken that it would
//!   discard, and refuses without `--force`.
//! - `prune --dry-run` says, once per holder, which relationship would
//!   need a full copy if a kept snapshot were deleted, stale holders marked.

mod common;
use common::*;
use serde_json::Value;

#[test]
fn an_update_that_sends_everything_is_reported_and_counted_as_full() {
    if !have("qemu-io") {
        println!("skipped: qemu-io not found");
        return;
    }
    let mut rng = Rng::from_env("honest_full");
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        Daemon::named(dir.path(), "a", &[]),
        Daemon::named(dir.path(), "b", &[]),
        Daemon::named(dir.path(), "c", &[]),
    );
    a.ok(&["vol", "create", "v", "--size", "16M"]);
    write_random_blocks(&a, "v", 64, &mut rng);
    a.ok(&["snap", "create", "v", "s0"]);
    b.ok(&["mirror", "create", "v", "--from", &a.source("v")]);
    c.ok(&["mirror", "create", "v", "--from", &b.source("v")]);
    // B loses its chain to A (a forced delete there) and is re-baselined;
    // C's base s0 stays on B, locked by C.
    write_random_blocks(&a, "v", 8, &mut rng);
    a.ok(&["snap", "create", "v", "s1"]);
    a.ok(&["snap", "delete", "v", "s0", "--force"]);
    let r = b.json(&["mirror", "resync", "v"]);
    assert_eq!(r["kind"], "full", "{r}");
    assert!(b.snap_names("v").contains(&"s0".to_string()));
    // C's update has a base, but every block of s1 on B is new since it.
    let r = c.json(&["mirror", "update", "v"]);
    println!("C's update after B's re-baseline: {r}");
    assert_eq!(r["base"]["name"], "s0", "{r}");
    assert_eq!(r["kind"], "full", "{r}");
    assert!(
        r["full_reason"]
            .as_str()
            .is_some_and(|t| t.contains("re-baseline")),
        "{r}"
    );
    let m = c.mirror("v");
    assert_eq!(m["full_transfers"], 2, "{m}");
    assert_eq!(m["incremental_transfers"], 0, "{m}");
    // The next one is a true incremental again.
    write_random_blocks(&a, "v", 4, &mut rng);
    a.ok(&["snap", "create", "v", "s2"]);
    assert_eq!(b.json(&["mirror", "update", "v"])["kind"], "incremental");
    let r = c.json(&["mirror", "update", "v"]);
    assert_eq!(r["kind"], "incremental", "{r}");
    assert!(r["full_reason"].is_null(), "{r}");
}

#[test]
fn a_forced_delete_upstream_shows_downstream_with_the_cost_of_the_next_update() {
    if !have("qemu-io") {
        println!("skipped: qemu-io not found");
        return;
    }
    let mut rng = Rng::from_env("honest_forced_delete");
    let dir = tempfile::tempdir().unwrap();
    // Short leases: B renews its set (and hears of forced deletes) often.
    let cfg = dir.path().join("short.toml");
    std::fs::write(&cfg, "lease_ms = 1500\n").unwrap();
    let cfg = cfg.to_str().unwrap();
    let (a, b) = (
        Daemon::named(dir.path(), "a", &[]),
        Daemon::named(dir.path(), "b", &["--config", cfg]),
    );
    a.ok(&["vol", "create", "v", "--size", "16M"]);
    write_random_blocks(&a, "v", 32, &mut rng);
    a.ok(&["snap", "create", "v", "s1"]);
    b.ok(&["mirror", "create", "v", "--from", &a.source("v")]);
    assert!(b.mirror("v")["next_update"]
        .as_str()
        .unwrap()
        .contains("incremental from s1"));
    let o = a.cli(&["snap", "delete", "v", "s1"]);
    assert!(!o.status.success(), "a locked snapshot was deleted");
    a.ok(&["snap", "delete", "v", "s1", "--force"]);
    // B hears of it at its next renewal, without any update.
    wait_until("B's mirror status to show the forced delete", || {
        b.mirror("v")["notice"].is_string()
    });
    let m = b.mirror("v");
    println!("B after the forced delete: {m}");
    let notice = m["notice"].as_str().unwrap();
    assert!(
        notice.contains("force-deleted s1") && notice.contains("newest snapshot in common"),
        "{notice}"
    );
    assert!(m["newest_common_snapshot"].is_null(), "{m}");
    let next = m["next_update"].as_str().unwrap();
    assert!(
        next.contains("a full copy") && next.contains("bytes") && next.contains("mirror resync"),
        "{next}"
    );
    assert!(b.log_text().contains("force-deleted s1"), "not in B's log");
    // Text form too.
    let text = b.ok(&["mirror", "status"]);
    assert!(text.contains("force-deleted s1"), "{text}");
}

#[test]
fn resync_names_the_snapshots_it_would_discard_and_needs_force() {
    if !have("qemu-io") {
        println!("skipped: qemu-io not found");
        return;
    }
    let mut rng = Rng::from_env("honest_resync");
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        Daemon::named(dir.path(), "a", &[]),
        Daemon::named(dir.path(), "b", &[]),
    );
    a.ok(&["vol", "create", "v", "--size", "16M"]);
    write_random_blocks(&a, "v", 16, &mut rng);
    a.ok(&["snap", "create", "v", "s1"]);
    b.ok(&["mirror", "create", "v", "--from", &a.source("v")]);
    b.ok(&["mirror", "break", "v"]);
    write_random_blocks(&b, "v", 4, &mut rng);
    b.ok(&["snap", "create", "v", "local1"]);
    b.ok(&["snap", "create", "v", "local2"]);
    let o = b.cli(&["mirror", "resync", "v"]);
    assert!(
        !o.status.success(),
        "resync discarded local snapshots silently"
    );
    let e = stderr(&o);
    assert!(
        e.contains("local1") && e.contains("local2") && e.contains("--force"),
        "{e}"
    );
    assert_eq!(b.snap_names("v"), ["s1", "local1", "local2"]);
    assert_eq!(b.mirror("v")["state"], "broken");
    // A lock on one keeps it (and the resync says nothing of it).
    b.ok(&["lock", "add", "v", "local2", "--owner", "app"]);
    let r = b.json(&["mirror", "resync", "v", "--force"]);
    assert_eq!(r["deleted_snapshots"], serde_json::json!(["local1"]), "{r}");
    assert_eq!(b.snap_names("v"), ["s1", "local2"]);
    assert_eq!(b.mirror("v")["state"], "idle");
}

#[test]
fn prune_dry_run_says_which_relationship_would_need_a_full_copy() {
    if !have("qemu-io") {
        println!("skipped: qemu-io not found");
        return;
    }
    let mut rng = Rng::from_env("honest_prune");
    let dir = tempfile::tempdir().unwrap();
    // D's short lease lets its locks go stale soon once it is gone.
    let cfg = dir.path().join("short.toml");
    std::fs::write(&cfg, "lease_ms = 1500\n").unwrap();
    let (a, b, c, d) = (
        Daemon::named(dir.path(), "a", &[]),
        Daemon::named(dir.path(), "b", &[]),
        Daemon::named(dir.path(), "c", &[]),
        Daemon::named(dir.path(), "d", &["--config", cfg.to_str().unwrap()]),
    );
    a.ok(&["vol", "create", "v", "--size", "16M"]);
    write_random_blocks(&a, "v", 16, &mut rng);
    a.ok(&["snap", "create", "v", "s0"]);
    b.ok(&["mirror", "create", "v", "--from", &a.source("v")]);
    d.ok(&["mirror", "create", "v", "--from", &a.source("v")]);
    c.ok(&["mirror", "create", "v", "--from", &b.source("v")]);
    write_random_blocks(&a, "v", 4, &mut rng);
    a.ok(&["snap", "create", "v", "s1"]);
    b.ok(&["mirror", "update", "v"]);
    write_random_blocks(&a, "v", 4, &mut rng);
    a.ok(&["snap", "create", "v", "s2"]);
    let plan = a.json(&["prune", "v", "--keep", "1", "--dry-run"]);
    println!("plan: {plan}");
    let effects_in = |plan: &Value, snap: &str| -> Vec<String> {
        plan["skipped"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["snapshot"] == snap)
            .unwrap_or_else(|| panic!("{snap} not kept: {plan}"))["effects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap().to_string())
            .collect()
    };
    let effects = |snap: &str| effects_in(&plan, snap);
    let s0 = effects("s0");
    assert!(
        s0.contains(&"deleting s0 would force a full copy of d/v".to_string()),
        "{s0:?}"
    );
    assert!(
        s0.contains(
            &"deleting s0 would force a full copy of c/v should it re-attach here past b"
                .to_string()
        ),
        "{s0:?}"
    );
    // B holds s0 too (C's lock on it comes through B) but locks it for C
    // only: s0 is not B's own dependency.
    assert!(!s0.iter().any(|e| e.contains("b/v")), "{s0:?}");
    // Each holder once.
    let mut sorted = s0.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), s0.len(), "a holder printed twice: {s0:?}");
    let s1 = effects("s1");
    // B has s0 as well: without s1 it goes on from s0.
    assert_eq!(
        s1,
        ["b/v also holds s0: deleting s1 would cost it no full copy"],
        "{s1:?}"
    );
    // Text form.
    let text = a.ok(&["prune", "v", "--keep", "1", "--dry-run"]);
    assert!(text.contains("would force a full copy of d/v"), "{text}");
    // Nothing was deleted by the dry run.
    assert_eq!(a.snap_names("v"), ["s0", "s1", "s2"]);
    // D dies and its lease runs out: its holder is marked stale.
    d.kill();
    // Each of its locks' leases ends on its own (they were renewed at
    // slightly different times): wait for all of them.
    wait_until("D's locks on A to go stale", || {
        let ls = a.json(&["lock", "list"]);
        let d: Vec<&Value> = ls
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["origin_node"] == "d")
            .collect();
        !d.is_empty() && d.iter().all(|l| l["state"] == "stale")
    });
    let plan = a.json(&["prune", "v", "--keep", "1", "--dry-run"]);
    let s0 = effects_in(&plan, "s0");
    assert!(
        s0.contains(
            &"deleting s0 would force a full copy of d/v [stale: not renewed within its lease]"
                .to_string()
        ),
        "{s0:?}"
    );
}
