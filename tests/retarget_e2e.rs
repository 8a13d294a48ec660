//! Issue 10 item 7: re-attach past a lost middle node, end to end on real
//! `sluice serve` processes over real TCP.
//!
//! In A -> B -> C -> D, with keep-1 pruning on A and C lagging behind B,
//! only the locks B relayed from C keep C's base on A. B is killed with
//! SIGKILL and never comes back; `mirror retarget` on C points it at A; C
//! goes on incrementally from the newest snapshot it shares with A, D below
//! C notices nothing, and every node reads back as A. Also: a retarget that
//! would need a full copy says so and needs `--allow-full`; a reachable
//! former source releases the locks; a cycle or a kind mismatch is refused
//! and changes nothing.

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;

const VOL_MB: u64 = 16;

/// A -> B -> C mirroring `v` (snapshot s0), baselines done.
fn chain(dir: &Path, rng: &mut Rng) -> (Daemon, Daemon, Daemon) {
    let (a, b, c) = (
        Daemon::named(dir, "a", &[]),
        Daemon::named(dir, "b", &[]),
        Daemon::named(dir, "c", &[]),
    );
    a.ok(&["vol", "create", "v", "--size", &format!("{VOL_MB}M")]);
    write_round(&a, "v", rng, 0);
    a.ok(&["snap", "create", "v", "s0"]);
    b.ok(&["mirror", "create", "v", "--from", &a.source("v")]);
    c.ok(&["mirror", "create", "v", "--from", &b.source("v")]);
    (a, b, c)
}

fn write_round(d: &Daemon, vol: &str, rng: &mut Rng, round: u64) {
    let blocks = VOL_MB * 256;
    let cmds: Vec<String> = (0..16)
        .map(|i| {
            let lba = rng.next() % blocks;
            format!("write -P {} {} 4k", (round * 16 + i) % 250 + 1, lba * 4096)
        })
        .collect();
    qemu_io(&d.nbd, vol, &cmds);
}

fn update(d: &Daemon, dst: &str) -> Value {
    d.json(&["mirror", "update", dst])
}

/// The digests of `vol@snap` on `d`.
fn digests(d: &Daemon, vol: &str, snap: &str) -> Value {
    d.json(&["snap", "list", vol])
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == snap)
        .map(|s| s["digests"].clone())
        .unwrap_or_else(|| panic!("{vol}@{snap} missing"))
}

/// `vol@snap` and the live `vol` of every node in `others` read as `a`'s
/// `vol@snap`.
fn same_as(a: &Daemon, others: &[(&str, &Daemon)], vol: &str, snap: &str, scratch: &Path) {
    let want = read_export(&a.nbd, &format!("{vol}@{snap}"), scratch);
    assert_eq!(want.len() as u64, VOL_MB << 20);
    let d = digests(a, vol, snap);
    for (name, n) in others {
        assert_eq!(digests(n, vol, snap), d, "{name}: digests of {vol}@{snap}");
        assert!(
            read_export(&n.nbd, &format!("{vol}@{snap}"), scratch) == want,
            "{name}: {vol}@{snap} differs from A"
        );
        assert!(
            read_export(&n.nbd, vol, scratch) == want,
            "{name}: live {vol} differs from A at {snap}"
        );
    }
}

#[test]
fn lost_middle_node_retarget_goes_on_incrementally() {
    if !have("qemu-io") || !have("qemu-img") {
        println!("skipped: qemu-io/qemu-img not found");
        return;
    }
    let mut rng = Rng::from_env("lost_middle_node_retarget");
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c, d) = (
        Daemon::named(dir.path(), "a", &[]),
        Daemon::named(dir.path(), "b", &[]),
        Daemon::named(dir.path(), "c", &[]),
        Daemon::named(dir.path(), "d", &[]),
    );
    // Two volumes between every pair: the retarget of one leaves the other
    // as it was.
    let vols = ["v", "w"];
    for v in vols {
        a.ok(&["vol", "create", v, "--size", &format!("{VOL_MB}M")]);
        write_round(&a, v, &mut rng, 0);
        a.ok(&["snap", "create", v, "s0"]);
        b.ok(&["mirror", "create", v, "--from", &a.source(v)]);
        c.ok(&["mirror", "create", v, "--from", &b.source(v)]);
        d.ok(&["mirror", "create", v, "--from", &c.source(v)]);
    }
    // B follows every round, C and D only at round 2: after round 3 C's
    // newest snapshot is s2, which A keeps only for the locks B relays.
    for round in 1..=3u64 {
        for v in vols {
            write_round(&a, v, &mut rng, round);
            a.ok(&["snap", "create", v, &format!("s{round}")]);
            a.ok(&["prune", v, "--keep", "1"]);
            assert_eq!(update(&b, v)["kind"], "incremental", "b {v} round {round}");
            if round == 2 {
                assert_eq!(update(&c, v)["kind"], "incremental");
                assert_eq!(update(&d, v)["kind"], "incremental");
            }
        }
    }
    // B is lost for good.
    b.kill();
    for v in vols {
        write_round(&a, v, &mut rng, 4);
        a.ok(&["snap", "create", v, "s4"]);
        a.ok(&["prune", v, "--keep", "1"]);
        let snaps: Vec<String> = a
            .json(&["snap", "list", v])
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect();
        assert!(
            snaps.contains(&"s2".to_string()),
            "A pruned C's base {v}@s2 although B relayed C's lock: {snaps:?}"
        );
        let o = c.cli(&["mirror", "update", v]);
        assert!(!o.status.success(), "update from the dead B succeeded");
    }
    // Re-attach C to A: from s2, incrementally; B's locks are left to its
    // lease (it cannot be reached).
    for v in vols {
        let r = c.json(&["mirror", "retarget", v, "--from", &a.source(v)]);
        println!("retarget {v}: {r}");
        assert_eq!(r["new_source_node"], "a", "{r}");
        assert_eq!(r["old_source_node"], "b", "{r}");
        assert_eq!(r["base"]["name"], "s2", "{r}");
        assert!(r["full_copy_bytes"].is_null(), "{r}");
        assert_eq!(r["released_old_upstream"], false, "{r}");
        assert!(r["transfer_error"].is_null(), "{r}");
        assert_eq!(r["transfer"]["kind"], "incremental", "{r}");
        assert_eq!(r["transfer"]["target"]["name"], "s4", "{r}");
        let m = c.mirror(v);
        assert_eq!(m["source"], a.source(v), "{m}");
        assert_eq!(m["source_node"], "a", "{m}");
        assert_eq!(m["newest_common_snapshot"]["name"], "s4", "{m}");
        // C's own lock now lives on A, beside B's stale relayed ones.
        let on_a = a.json(&["lock", "list"]);
        assert!(
            on_a.as_array()
                .unwrap()
                .iter()
                .any(|l| l["volume"] == v && l["snapshot"] == "s4" && l["holder"] == "c"),
            "A holds no lock of C on {v}@s4: {on_a}"
        );
    }
    // D below C notices nothing; the chain A -> C -> D goes on with keep-1
    // pruning at the top, B's stale locks released by the operator.
    for v in vols {
        assert_eq!(update(&d, v)["kind"], "incremental");
        a.ok(&["lock", "release", v, "s2", "--holder", "b"]);
    }
    for round in 5..=6u64 {
        for v in vols {
            write_round(&a, v, &mut rng, round);
            a.ok(&["snap", "create", v, &format!("s{round}")]);
            a.ok(&["prune", v, "--keep", "1"]);
            assert_eq!(update(&c, v)["kind"], "incremental", "c {v} round {round}");
            if round == 6 {
                assert_eq!(update(&d, v)["kind"], "incremental", "d {v}");
            }
        }
    }
    // Baselines only: one full transfer per relationship.
    for (name, n) in [("c", &c), ("d", &d)] {
        for v in vols {
            let m = n.mirror(v);
            assert_eq!(m["full_transfers"], 1, "{name}:{v}: {m}");
        }
    }
    for v in vols {
        same_as(&a, &[("c", &c), ("d", &d)], v, "s6", dir.path());
    }
}

#[test]
fn retarget_without_a_common_snapshot_needs_allow_full_and_releases_the_old_source() {
    if !have("qemu-io") || !have("qemu-img") {
        println!("skipped: qemu-io/qemu-img not found");
        return;
    }
    let mut rng = Rng::from_env("retarget_allow_full");
    let dir = tempfile::tempdir().unwrap();
    let (b, c, e) = (
        Daemon::named(dir.path(), "b", &[]),
        Daemon::named(dir.path(), "c", &[]),
        Daemon::named(dir.path(), "e", &[]),
    );
    for (n, snap) in [(&b, "t0"), (&e, "e0")] {
        n.ok(&["vol", "create", "v", "--size", &format!("{VOL_MB}M")]);
        write_round(n, "v", &mut rng, 0);
        n.ok(&["snap", "create", "v", snap]);
    }
    c.ok(&["mirror", "create", "v", "--from", &b.source("v")]);
    let held_on_b = |who: &str| {
        b.json(&["lock", "list"])
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["holder"] == who)
            .count()
    };
    assert!(
        held_on_b("c") > 0,
        "C holds no lock on B after its baseline"
    );
    // E's v shares nothing with C's: refused, saying the cost; nothing moved.
    let o = c.cli(&["mirror", "retarget", "v", "--from", &e.source("v")]);
    assert!(!o.status.success(), "a full-copy retarget went ahead");
    let err = stderr(&o);
    assert!(
        err.contains("full copy") && err.contains("--allow-full") && err.contains("bytes"),
        "{err}"
    );
    assert_eq!(c.mirror("v")["source"], b.source("v"));
    assert!(
        held_on_b("c") > 0,
        "a refused retarget released C's locks on B"
    );
    // Refused: a volume mirror to a qtree, this node itself.
    let o = c.cli(&["mirror", "retarget", "v", "--from", &e.source("v/q")]);
    assert!(stderr(&o).contains("volume mirror"), "{}", stderr(&o));
    let o = c.cli(&["mirror", "retarget", "v", "--from", &c.source("v")]);
    assert!(stderr(&o).contains("this node"), "{}", stderr(&o));
    assert_eq!(c.mirror("v")["source"], b.source("v"));
    // Accepted: a full copy; B, reachable, releases what C held there.
    let r = c.json(&[
        "mirror",
        "retarget",
        "v",
        "--from",
        &e.source("v"),
        "--allow-full",
    ]);
    println!("retarget: {r}");
    assert!(r["base"].is_null(), "{r}");
    assert!(r["full_copy_bytes"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["released_old_upstream"], true, "{r}");
    assert_eq!(r["transfer"]["kind"], "full", "{r}");
    assert_eq!(
        held_on_b("c"),
        0,
        "B still holds C's locks after the retarget"
    );
    assert_eq!(
        r["transfer"]["deleted_snapshots"],
        serde_json::json!(["t0"]),
        "{r}"
    );
    same_as(&e, &[("c", &c)], "v", "e0", dir.path());
    write_round(&e, "v", &mut rng, 1);
    e.ok(&["snap", "create", "v", "e1"]);
    assert_eq!(update(&c, "v")["kind"], "incremental");
    same_as(&e, &[("c", &c)], "v", "e1", dir.path());
}

#[test]
fn retarget_to_a_downstream_is_refused_as_a_cycle() {
    if !have("qemu-io") {
        println!("skipped: qemu-io not found");
        return;
    }
    let mut rng = Rng::from_env("retarget_cycle");
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = chain(dir.path(), &mut rng);
    let o = b.cli(&["mirror", "retarget", "v", "--from", &c.source("v")]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("cycle"), "{}", stderr(&o));
    assert_eq!(b.mirror("v")["source"], a.source("v"));
    assert_eq!(update(&b, "v")["kind"], "none");
}

#[test]
fn a_retarget_survives_a_crash_of_the_retargeted_node() {
    if !have("qemu-io") {
        println!("skipped: qemu-io not found");
        return;
    }
    let mut rng = Rng::from_env("retarget_restart");
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = chain(dir.path(), &mut rng);
    b.kill();
    let r = c.json(&["mirror", "retarget", "v", "--from", &a.source("v")]);
    assert_eq!(r["transfer"]["kind"], "none", "{r}");
    // SIGKILL right after: the switch was durable when the command returned.
    let pool = c.data.clone();
    c.kill();
    let c = Daemon::try_start(&pool, &["--name", "c"]).unwrap();
    let m = c.mirror("v");
    assert_eq!(m["source"], a.source("v"), "{m}");
    assert_eq!(m["source_node"], "a", "{m}");
    write_round(&a, "v", &mut rng, 1);
    a.ok(&["snap", "create", "v", "s1"]);
    a.ok(&["prune", "v", "--keep", "1"]);
    assert_eq!(update(&c, "v")["kind"], "incremental");
    same_as(&a, &[("c", &c)], "v", "s1", dir.path());
}
