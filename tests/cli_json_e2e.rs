//! Every command takes `--json` and then prints one JSON document on
//! stdout (what a script or a monitoring system parses), with real
//! `sluice serve` processes: a volume, a qtree, snapshots, retention, a
//! mirror A -> B broken, resynced and deleted, locks added and released,
//! deletes, `init` and `token create`. Each document is parsed and the
//! field that says what happened is checked. And a reader that goes away
//! (`sluice vol list | head`) ends a command quietly, without a panic.

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
    assert!(v.get("warnings").is_none(), "{v}");
    // A thin volume larger than the pool: created, with a warning.
    let v = a.json(&["vol", "create", "big", "--size", "1G"]);
    let w = v["warnings"][0].as_str().unwrap_or_default();
    assert!(w.contains("larger than the pool"), "{v}");
    let o = a.cli(&["vol", "create", "big2", "--size", "1G"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("warning: volume big2 (1 GiB) is larger than the pool"),
        "{}",
        stderr(&o)
    );
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

/// `sluice vol list | head -0`: the reader is gone before the first line;
/// the command ends at once, status 0, nothing on stderr.
#[test]
fn a_closed_pipe_on_stdout_ends_a_command_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let a = Daemon::named(dir.path(), "A", &[]);
    for i in 0..3 {
        a.ok(&["vol", "create", &format!("v{i}"), "--size", "1M"]);
    }
    for args in [
        vec!["vol", "list"],
        vec!["vol", "list", "--json"],
        vec!["status"],
    ] {
        let mut all = vec!["--node", a.control.as_str()];
        all.extend_from_slice(&args);
        let mut child = std::process::Command::new(BIN)
            .args(&all)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take()); // the reader goes away
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!err.contains("panicked"), "sluice {args:?}: {err}");
        assert!(o.status.success(), "sluice {args:?}: {:?} {err}", o.status);
        assert!(err.is_empty(), "sluice {args:?} printed on stderr: {err}");
    }
}

/// A long name widens its column: every row's next column starts where the
/// header's does.
#[test]
fn tables_fit_long_names() {
    let dir = tempfile::tempdir().unwrap();
    let a = Daemon::named(dir.path(), "A", &[]);
    let long = "a-volume-name-of-fifty-seven-characters-for-the-accounts";
    a.ok(&["vol", "create", "v", "--size", "1M"]);
    a.ok(&["vol", "create", long, "--size", "8M"]);
    let text = a.ok(&["vol", "list"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    // SIZE is right-aligned: its column ends at the same place on each line.
    let end = lines[0].find("SIZE").unwrap() + "SIZE".len();
    for l in &lines[1..] {
        let cell = &l[..end];
        assert!(cell.ends_with("MiB"), "size column misaligned:\n{text}");
        assert_eq!(l.as_bytes()[end], b' ', "size column misaligned:\n{text}");
    }
    assert!(lines[2].starts_with(long), "{text}");
}

/// `status` says whether the node is healthy, and exits non-zero when it
/// is not (for monitoring): here, a mirror whose last transfer failed.
#[test]
fn status_says_whether_the_node_is_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let a = Daemon::named(dir.path(), "A", &[]);
    let b = Daemon::named(dir.path(), "B", &[]);
    a.ok(&["vol", "create", "v", "--size", "4M"]);
    a.ok(&["snap", "create", "v", "s1"]);
    b.ok(&["mirror", "create", "v", "--from", &a.source("v")]);
    let text = b.ok(&["status"]);
    assert!(text.contains("health      ok"), "{text}");
    assert_eq!(b.json(&["status"])["healthy"], true);

    a.kill();
    assert!(!b.cli(&["mirror", "update", "v"]).status.success());
    let o = b.cli(&["status"]);
    assert!(!o.status.success(), "status of an unhealthy node exited 0");
    let out = stdout(&o);
    assert!(out.contains("health      1 problem(s)"), "{out}");
    assert!(out.contains("mirror v: its last transfer failed"), "{out}");
    assert!(stderr(&o).contains("not healthy"), "{}", stderr(&o));
    let o = b.cli(&["status", "--json"]);
    assert!(!o.status.success());
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["healthy"], false, "{v}");
    assert_eq!(v["problems"].as_array().unwrap().len(), 1, "{v}");
}

/// `mirror destinations` on a source lists each downstream that pulls from
/// it, with its locks there and the last transfer served to it.
#[test]
fn mirror_destinations_lists_each_downstream() {
    let dir = tempfile::tempdir().unwrap();
    let a = Daemon::named(dir.path(), "A", &[]);
    let b = Daemon::named(dir.path(), "B", &[]);
    let c = Daemon::named(dir.path(), "C", &[]);
    a.ok(&["vol", "create", "v", "--size", "4M"]);
    a.ok(&["vol", "create", "w", "--size", "4M"]);
    a.ok(&["snap", "create", "v", "s1"]);
    a.ok(&["snap", "create", "w", "t1"]);
    b.ok(&["mirror", "create", "v", "--from", &a.source("v")]);
    b.ok(&["mirror", "create", "w", "--from", &a.source("w")]);
    c.ok(&["mirror", "create", "v", "--from", &a.source("v")]);
    a.ok(&["snap", "create", "v", "s2"]);
    b.ok(&["mirror", "update", "v"]);
    let d = a.json(&["mirror", "destinations"]);
    let list = d.as_array().unwrap();
    assert_eq!(list.len(), 3, "{d}");
    let find = |node: &str, rel: &str| {
        list.iter()
            .find(|x| x["node"] == node && x["relationship"] == rel)
            .unwrap_or_else(|| panic!("{node}:{rel} missing: {d}"))
    };
    let bv = find("B", "v");
    assert_eq!(bv["volume"], "v");
    assert_eq!(bv["stale"], false);
    assert!(bv["locks"].as_u64().unwrap() >= 1, "{bv}");
    assert_eq!(bv["locked_snapshots"], serde_json::json!(["s2"]), "{bv}");
    assert_eq!(bv["last_served"]["kind"], "incremental", "{bv}");
    assert_eq!(bv["last_served"]["snapshot"], "s2", "{bv}");
    let cv = find("C", "v");
    assert_eq!(cv["locked_snapshots"], serde_json::json!(["s1"]), "{cv}");
    assert_eq!(cv["last_served"]["kind"], "full", "{cv}");
    assert_eq!(find("B", "w")["volume"], "w");
    let text = a.ok(&["mirror", "destinations"]);
    assert!(
        text.contains("B:v") && text.contains("C:v") && text.contains("B:w"),
        "{text}"
    );
}
