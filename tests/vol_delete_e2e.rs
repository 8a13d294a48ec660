//! Issue 10 item 8, end to end on real `sluice serve` processes: `vol
//! delete` refuses while a downstream pulls the volume or a lock holds one
//! of its snapshots (naming each), refuses on a mirror destination, frees
//! the space when it goes ahead, and survives a restart; `--force` goes
//! ahead and says what it overrode. `mirror delete` with its upstream down
//! says the locks there were not released.

mod common;
use common::*;

fn vol_names(d: &Daemon) -> Vec<String> {
    d.json(&["vol", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect()
}

/// `GET /metrics` on the node's listen address.
fn used(d: &Daemon) -> u64 {
    d.json(&["status"])["space"]["used_bytes"].as_u64().unwrap()
}

#[test]
fn vol_delete_refuses_while_depended_on_and_frees_the_space() {
    if !have("qemu-io") {
        println!("skipped: qemu-io not found");
        return;
    }
    let mut rng = Rng::from_env("vol_delete");
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        Daemon::named(dir.path(), "a", &[]),
        Daemon::named(dir.path(), "b", &[]),
    );
    for v in ["v", "w", "keep"] {
        a.ok(&["vol", "create", v, "--size", "16M"]);
    }
    write_random_blocks(&a, "v", 64, &mut rng);
    a.ok(&["snap", "create", "v", "s1"]);
    b.ok(&[
        "mirror",
        "create",
        "v",
        "--from",
        &format!("{}/v", a.listen),
    ]);
    // A mirror source with a live downstream: refused, naming it.
    let o = a.cli(&["vol", "delete", "v"]);
    assert!(!o.status.success(), "a pulled volume was deleted");
    let e = stderr(&o);
    assert!(e.contains("b:v pulls it") && e.contains("--force"), "{e}");
    assert!(e.contains("v@s1 locked by"), "{e}");
    assert!(vol_names(&a).contains(&"v".to_string()));
    // A mirror destination: `mirror delete` first.
    let o = b.cli(&["vol", "delete", "v"]);
    assert!(stderr(&o).contains("mirror delete v"), "{}", stderr(&o));
    // An application lock: refused, naming its owner; released, it goes.
    let without_w = used(&a);
    write_random_blocks(&a, "w", 512, &mut rng);
    a.ok(&["snap", "create", "w", "t1"]);
    write_random_blocks(&a, "w", 256, &mut rng);
    a.ok(&["lock", "add", "w", "t1", "--owner", "backup-app"]);
    let o = a.cli(&["vol", "delete", "w"]);
    assert!(stderr(&o).contains("backup-app"), "{}", stderr(&o));
    a.ok(&["lock", "release", "w", "t1", "--holder", "backup-app"]);
    let before = used(&a);
    let r = a.json(&["vol", "delete", "w"]);
    assert_eq!(r["deleted_snapshots"], serde_json::json!(["t1"]), "{r}");
    let after = used(&a);
    // All of w's data and metadata are free again. The catalog is a log
    // that grows by about a block per consistency point until it is
    // compacted (at twice its image plus 64 blocks: docs/FORMAT.md), so
    // it may hold up to ~70 blocks more than it did before w was written.
    assert!(
        before - after >= 512 * 4096 && after <= without_w + 72 * 4096,
        "vol delete freed {} bytes: {without_w} used before w was written, {before} before its delete, {after} after",
        before - after,
    );
    assert!(!vol_names(&a).contains(&"w".to_string()));
    // Audited: who asked (the socket peer's uid and pid) and what, in the
    // log and the metrics; refusals too.
    wait_until("the audit line of vol delete w", || {
        a.log_text().lines().any(|l| {
            l.contains("destructive operation done")
                && l.contains("op=\"vol_delete\"")
                && l.contains("client=uid=")
                && l.contains("\"name\":\"w\"")
        })
    });
    let m = a.metrics();
    assert!(
        m.contains("sluice_destructive_ops_total{op=\"vol_delete\",result=\"ok\"} 1")
            && m.contains("sluice_destructive_ops_total{op=\"vol_delete\",result=\"error\"} 2"),
        "{m}"
    );
    // Forced: goes, and says what it overrode; the downstream's update
    // fails with an error that names the missing volume.
    let r = a.json(&["vol", "delete", "v", "--force"]);
    assert!(
        r["forced_locks"].as_array().is_some_and(|l| !l.is_empty()),
        "{r}"
    );
    assert_eq!(r["ended_downstreams"][0], "b:v pulls it", "{r}");
    assert!(a.json(&["lock", "list"]).as_array().unwrap().is_empty());
    let o = b.cli(&["mirror", "update", "v"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains('v'), "{}", stderr(&o));
    // Durable across a restart; the name can be used again.
    let pool = a.data.clone();
    a.term();
    let a = Daemon::try_start(&pool, &["--name", "a"]).unwrap();
    assert_eq!(vol_names(&a), vec!["keep".to_string()]);
    a.ok(&["vol", "create", "w", "--size", "16M"]);
}

#[test]
fn mirror_delete_with_the_upstream_down_says_its_locks_were_not_released() {
    if !have("qemu-io") {
        println!("skipped: qemu-io not found");
        return;
    }
    let mut rng = Rng::from_env("mirror_delete_upstream_down");
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        Daemon::named(dir.path(), "a", &[]),
        Daemon::named(dir.path(), "b", &[]),
    );
    a.ok(&["vol", "create", "v", "--size", "16M"]);
    write_random_blocks(&a, "v", 16, &mut rng);
    a.ok(&["snap", "create", "v", "s1"]);
    b.ok(&[
        "mirror",
        "create",
        "v",
        "--from",
        &format!("{}/v", a.listen),
    ]);
    a.kill();
    let out = b.ok(&["mirror", "delete", "v"]);
    assert!(
        out.contains("could not be reached") && out.contains("not released"),
        "{out}"
    );
    let r = b.json(&["mirror", "status"]);
    assert!(r.as_array().unwrap().is_empty(), "{r}");
    // The former destination is an ordinary writable volume now.
    write_random_blocks(&b, "v", 4, &mut rng);
}
