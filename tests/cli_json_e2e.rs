//! Every command takes `--json` and then prints one JSON document on
//! stdout (what a script or a monitoring system parses), with real
//! `sluice serve` processes: a volume, a qtree, snapshots, retention, a
//! mirror A -> B broken, resynced and deleted, locks added and released,
//! deletes, `init` and `token create`. Each document is parsed and the
//! field that says what happened is checked.

mod common;
use common::*;
use serde_json::Value;

/// `sluice ARGS --json` (no node), parsed.
fn local_json(args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let o = sluice(&a);
    assert!(o.status.success(), "sluice {a:?}: {}", stderr(&o));
    serde_json::from_str(&stdout(&o)).unwrap_or_else(|e| panic!("sluice {a:?}: {e}"))
}

#[test]
fn every_command_prints_json_with_dash_dash_json() {
    let dir = tempfile::tempdir().unwrap();

    let img = dir.path().join("x.img");
    let v = local_json(&["init", img.to_str().unwrap(), "--size", "64M"]);
    assert_eq!(v["size_bytes"], 64 << 20, "{v}");
    assert!(v["shards"].as_u64().unwrap() >= 1, "{v}");
    assert_eq!(v["path"], img.to_str().unwrap(), "{v}");

    let tok = dir.path().join("ops.token");
    let v = local_json(&["token", "create", "ops", "--out", tok.to_str().unwrap()]);
    assert_eq!(v["token"], "ops", "{v}");
    assert!(tok.exists());

    let a = Daemon::named(dir.path(), "A", &[]);
    let b = Daemon::named(dir.path(), "B", &[]);

    let v = a.json(&["vol", "create", "v", "--size", "8M"]);
    assert_eq!(v["name"], "v", "{v}");
    let v = a.json(&["qtree", "create", "v", "q", "--size", "1M"]);
    assert!(
        v["qtrees"]
            .as_array()
            .unwrap()
            .iter()
            .any(|q| q["name"] == "q"),
        "{v}"
    );
    let v = a.json(&["vol", "retain", "v", "--keep", "5"]);
    assert_eq!(v["keep"], 5, "{v}");
    let v = a.json(&["vol", "retain", "v", "--off"]);
    assert!(v["keep"].is_null(), "{v}");
    a.json(&["snap", "create", "v", "s1"]);
    a.json(&["snap", "create", "v", "s2"]);
    let v = a.json(&["snap", "delete", "v", "s1"]);
    assert_eq!(v["deleted"], "s1", "{v}");

    let from = a.source("v");
    b.json(&["mirror", "create", "v", "--from", &from]);
    let v = b.json(&["lock", "add", "v", "s2", "--owner", "app"]);
    assert_eq!(v["delivered"], true, "{v}");
    let v = b.json(&["lock", "release", "v", "s2", "--holder", "app"]);
    assert_eq!(v["released"], "app", "{v}");
    let v = b.json(&["mirror", "break", "v"]);
    assert_eq!(v["state"], "broken", "{v}");
    b.json(&["mirror", "resync", "v"]);
    let v = b.json(&["mirror", "delete", "v"]);
    assert_eq!(v["deleted"], true, "{v}");
    assert_eq!(v["released_upstream"], true, "{v}");
    let v = b.json(&["vol", "delete", "v"]);
    assert_eq!(v["volume"], "v", "{v}");
}
