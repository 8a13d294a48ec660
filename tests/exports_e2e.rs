//! Issue 13: what a peer may do is what the operator allows it. `vol
//! export VOL --to NODES` limits who may pull a volume and lock its
//! snapshots; a node with `exports_required` serves only exported volumes.
//! Every refusal names the volume, the peer and the command that allows it.

mod common;
use common::*;

fn fails_with(o: std::process::Output, what: &[&str]) {
    assert!(!o.status.success(), "it ran: {}", stdout(&o));
    let e = stderr(&o);
    for w in what {
        assert!(e.contains(w), "{w:?} not in: {e}");
    }
}

#[test]
fn only_the_peers_a_volume_is_exported_to_pull_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pool_a = init_pool(d, "a.img", "256M");
    let a = Daemon::try_start(&pool_a, &["--name", "a"]).unwrap();
    let b = Daemon::named(d, "b", &[]);
    let c = Daemon::named(d, "c", &[]);
    for v in ["v", "w"] {
        a.ok(&["vol", "create", v, "--size", "4M"]);
        a.ok(&["snap", "create", v, "s1"]);
    }
    let r = a.json(&["vol", "export", "v", "--to", "b"]);
    assert_eq!(r["peers"], serde_json::json!(["b"]), "{r}");
    // b may pull v; c may not, and hears how to be allowed.
    assert_eq!(
        b.json(&["mirror", "create", "v", "--from", &a.source("v")])["kind"],
        "full"
    );
    fails_with(
        c.cli(&["mirror", "create", "v", "--from", &a.source("v")]),
        &[
            "volume v on a is not exported to node c",
            "sluice vol export v --to c",
        ],
    );
    // Nothing of the refused create stays on c.
    assert!(c.json(&["mirror", "status"]).as_array().unwrap().is_empty());
    // A volume without a list is open (the default).
    assert_eq!(
        c.json(&["mirror", "create", "w", "--from", &a.source("w")])["kind"],
        "full"
    );
    let e = a.json(&["vol", "exports"]);
    assert_eq!(e["exports"]["v"], serde_json::json!(["b"]), "{e}");
    assert_eq!(e["exports_required"], false);
    // Taken from b: its next update is refused, naming the command.
    a.ok(&["snap", "create", "v", "s2"]);
    a.ok(&["vol", "export", "v", "--to", "c"]);
    fails_with(
        b.cli(&["mirror", "update", "v"]),
        &["not exported to node b"],
    );
    // `*`: any authenticated peer.
    a.ok(&["vol", "export", "v", "--to", "*"]);
    let r = b.json(&["mirror", "update", "v"]);
    assert_eq!(r["kind"], "incremental", "{r}");
    // --off: the default again.
    a.ok(&["vol", "export", "v", "--off"]);
    assert!(a.json(&["vol", "exports"])["exports"]
        .as_object()
        .unwrap()
        .is_empty());
    // Bad input names what was wrong.
    fails_with(
        a.cli(&["vol", "export", "nosuch", "--to", "b"]),
        &["nosuch"],
    );
    fails_with(
        a.cli(&["vol", "export", "v", "--to", "b c"]),
        &["\"b c\" is not a node name"],
    );
    // A list survives a restart.
    a.ok(&["vol", "export", "w", "--to", "b,c"]);
    assert_eq!(a.term().code(), Some(0));
    let a = Daemon::try_start(&pool_a, &["--name", "a"]).unwrap();
    let e = a.json(&["vol", "exports"]);
    assert_eq!(e["exports"]["w"], serde_json::json!(["b", "c"]), "{e}");
    a.ok(&["vol", "export", "w", "--off"]);
    // Deleting a volume ends its list.
    a.ok(&["vol", "create", "x", "--size", "4M"]);
    a.ok(&["vol", "export", "x", "--to", "c"]);
    a.ok(&["vol", "delete", "x"]);
    assert!(a.json(&["vol", "exports"])["exports"]
        .as_object()
        .unwrap()
        .is_empty());
}

#[test]
fn a_node_with_exports_required_serves_only_exported_volumes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = d.join("a.toml");
    std::fs::write(&cfg, "exports_required = true\n").unwrap();
    let a = Daemon::named(d, "a", &["--config", cfg.to_str().unwrap()]);
    let b = Daemon::named(d, "b", &[]);
    a.ok(&["vol", "create", "v", "--size", "4M"]);
    a.ok(&["snap", "create", "v", "s1"]);
    assert_eq!(a.json(&["vol", "exports"])["exports_required"], true);
    fails_with(
        b.cli(&["mirror", "create", "v", "--from", &a.source("v")]),
        &["not exported to node b", "sluice vol export v --to b"],
    );
    a.ok(&["vol", "export", "v", "--to", "b"]);
    assert_eq!(
        b.json(&["mirror", "create", "v", "--from", &a.source("v")])["kind"],
        "full"
    );
}
