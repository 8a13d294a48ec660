//! Issue 4, test 4: a graceful stop (SIGTERM or SIGINT) exits 0 after a
//! final consistency point, and a restart finds every volume, qtree and
//! snapshot as it was: names, sizes, global ids, creation times.

mod common;
use common::*;
use serde_json::Value;

fn snapshot_keys(d: &Daemon, vol: &str) -> Vec<(String, String, u64)> {
    d.json(&["snap", "list", vol])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["id"].as_str().unwrap().to_string(),
                s["created_unix_ms"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn graceful_stop_and_restart_keep_everything() {
    let dir = tempfile::tempdir().unwrap();
    let pool = init_pool(dir.path(), "pool.img", "1G");
    let d = Daemon::start(&pool);
    d.ok(&["vol", "create", "a", "--size", "128M"]);
    d.ok(&["vol", "create", "b", "--size", "1T"]);
    d.ok(&["qtree", "create", "a", "db", "--size", "16M"]);
    d.ok(&["qtree", "create", "a", "logs", "--size", "8M"]);
    for s in ["s1", "s2", "s3"] {
        d.ok(&["snap", "create", "a", s]);
    }
    d.ok(&["snap", "create", "b", "only"]);
    d.ok(&["snap", "delete", "a", "s2"]);
    let vols_before: Value = d.json(&["vol", "list"]);
    let a_before = snapshot_keys(&d, "a");
    let b_before = snapshot_keys(&d, "b");
    assert_eq!(a_before.len(), 2);

    let status = d.term();
    assert!(status.success(), "SIGTERM exit: {status:?}");

    let d = Daemon::start(&pool);
    assert_eq!(d.json(&["vol", "list"]), vols_before);
    assert_eq!(snapshot_keys(&d, "a"), a_before);
    assert_eq!(snapshot_keys(&d, "b"), b_before);
    // Still a working node: more changes, then SIGINT, then once more.
    d.ok(&["snap", "create", "a", "s4"]);
    d.ok(&["prune", "a", "--keep", "2"]);
    let a_after = snapshot_keys(&d, "a");
    assert_eq!(
        a_after.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(),
        ["s3", "s4"]
    );
    let status = d.int();
    assert!(status.success(), "SIGINT exit: {status:?}");
    let d = Daemon::start(&pool);
    assert_eq!(snapshot_keys(&d, "a"), a_after);
    let log = d.log_text();
    assert!(log.contains("pool opened"), "{log}");
    drop(d);
}
