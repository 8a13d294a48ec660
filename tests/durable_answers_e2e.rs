//! What a node answered as done is durable: every control request that
//! changes state, answered `ok`, survives a SIGKILL right after the answer
//! (real `sluice serve` processes, the CLI as an operator types it).
//!
//! The node flushes after every state-changing request before it answers
//! (`ControlRequest::changes_state`, `Node::execute`), so this holds for
//! each request below whether or not its own code path flushes.

mod common;
use common::*;

/// SIGKILL `d` and start it again on the same pool.
fn restart(d: Daemon, name: &str) -> Daemon {
    let pool = d.data.clone();
    d.kill();
    Daemon::try_start(&pool, &["--name", name]).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn every_answered_change_survives_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let a = Daemon::named(p, "a", &[]);

    a.ok(&["vol", "create", "v", "--size", "4M"]);
    let a = restart(a, "a");
    assert_eq!(a.vol("v")["size_bytes"], 4 << 20, "vol create was lost");

    a.ok(&["vol", "resize", "v", "8M"]);
    let a = restart(a, "a");
    assert_eq!(a.vol("v")["size_bytes"], 8 << 20, "vol resize was lost");

    a.ok(&["qtree", "create", "v", "q", "--size", "1M"]);
    let a = restart(a, "a");
    let q = a.vol("v")["qtrees"].to_string();
    assert!(q.contains("\"q\""), "qtree create was lost: {q}");

    for s in ["s1", "s2", "s3", "s4"] {
        a.ok(&["snap", "create", "v", s]);
    }
    let a = restart(a, "a");
    assert_eq!(
        a.snap_names("v"),
        ["s1", "s2", "s3", "s4"],
        "snap create lost"
    );

    a.ok(&["snap", "delete", "v", "s2"]);
    let a = restart(a, "a");
    assert_eq!(
        a.snap_names("v"),
        ["s1", "s3", "s4"],
        "snap delete was lost"
    );

    a.ok(&["snap", "rollback", "v", "s3", "-r"]);
    let a = restart(a, "a");
    assert_eq!(a.snap_names("v"), ["s1", "s3"], "rollback -r was lost");

    a.ok(&["vol", "retain", "v", "--keep", "5"]);
    let a = restart(a, "a");
    assert_eq!(a.vol("v")["keep"], 5, "vol retain was lost");

    a.ok(&["vol", "export", "v", "--to", "b"]);
    let a = restart(a, "a");
    let ex = a.json(&["vol", "exports"]).to_string();
    assert!(ex.contains("\"b\""), "vol export was lost: {ex}");

    let b = Daemon::named(p, "b", &[]);
    b.ok(&["mirror", "create", "v", "--from", &a.source("v")]);
    let b = restart(b, "b");
    assert_eq!(b.mirror("v")["state"], "idle", "mirror create was lost");
    assert!(
        b.snap_names("v").contains(&"s3".to_string()),
        "the baseline was lost"
    );

    a.ok(&["snap", "create", "v", "s5"]);
    b.ok(&["mirror", "update", "v"]);
    let b = restart(b, "b");
    assert!(
        b.snap_names("v").contains(&"s5".to_string()),
        "mirror update was lost"
    );

    a.ok(&["prune", "v", "--keep", "1"]);
    let a = restart(a, "a");
    let left = a.snap_names("v");
    assert!(
        !left.contains(&"s1".to_string()),
        "prune was lost: {left:?}"
    );

    b.ok(&["mirror", "delete", "v"]);
    let b = restart(b, "b");
    let rels = b.json(&["mirror", "status"]);
    assert_eq!(
        rels.as_array().map(Vec::len),
        Some(0),
        "mirror delete lost: {rels}"
    );

    b.ok(&["vol", "delete", "v"]);
    let b = restart(b, "b");
    let vols = b.json(&["vol", "list"]).to_string();
    assert!(!vols.contains("\"v\""), "vol delete was lost: {vols}");
    drop(a);
}
