//! Issue 5, test 6, with real `sluice serve` processes and real TCP: a qtree
//! mirror in a cascade, and fan-out with two downstreams that lag
//! differently.
//!
//! Topology: A's volume v holds qtree q.
//! - B: qtree mirror of A:v/q into B:w/q; C: qtree mirror of B:w/q into
//!   C:x/q (the cascade).
//! - D: volume mirror of A:v (the whole volume, q included): with B, A's
//!   fan-out.
//!
//! A snapshots and prunes to 1 every round; B updates every round, C every
//! 2nd, D every 3rd. Before the last updates A must still hold each
//! downstream's base (D's, C's through B, B's) and nothing else, and its
//! `lock list` must show each holder's lock on its own snapshot. Content is
//! checked through the `VOL/QTREE` and `VOL/QTREE@SNAP` NBD exports (and
//! D's whole volume through `VOL@SNAP`), byte for byte and by digest; every
//! update after the baselines stays incremental.

mod common;
use common::*;
use serde_json::Value;

const ROUNDS: u64 = 5;
const V_MB: u64 = 16;
const Q_MB: u64 = 8;

fn write_round(a: &Daemon, rng: &mut Rng, round: u64) {
    let q: Vec<String> = (0..16)
        .map(|i| {
            format!(
                "write -P {} {} 4k",
                (round * 16 + i) % 250 + 1,
                (rng.next() % (Q_MB * 256)) * 4096
            )
        })
        .collect();
    qemu_io(&a.nbd, "v/q", &q);
    let v: Vec<String> = (0..8)
        .map(|i| {
            format!(
                "write -P {} {} 4k",
                (round * 8 + i) % 250 + 1,
                (rng.next() % (V_MB * 256)) * 4096
            )
        })
        .collect();
    qemu_io(&a.nbd, "v", &v);
}

/// The digest of namespace `ns` ("" = the volume's own space) in `vol@snap`.
fn digest(d: &Daemon, vol: &str, snap: &str, ns: &str) -> String {
    let s = d
        .json(&["snap", "list", vol])
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == snap)
        .cloned()
        .unwrap_or_else(|| panic!("{vol}@{snap} missing"));
    s["digests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p[0] == ns)
        .map(|p| p[1].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("no digest of {ns:?} in {vol}@{snap}: {s}"))
}

fn update(d: &Daemon, dst: &str) -> Value {
    let r = d.json(&["mirror", "update", dst]);
    assert_eq!(r["kind"], "incremental", "update of {dst}: {r}");
    r
}

struct Cmp<'a> {
    scratch: &'a std::path::Path,
}
impl Cmp<'_> {
    fn same(&self, a: (&Daemon, &str), b: (&Daemon, &str)) {
        let x = read_export(&a.0.nbd, a.1, self.scratch);
        let y = read_export(&b.0.nbd, b.1, self.scratch);
        assert_eq!(x.len(), y.len(), "{} vs {}: sizes", a.1, b.1);
        assert!(x == y, "export {} differs from {}", b.1, a.1);
    }
}

#[test]
fn qtree_cascade_and_fan_out_keep_every_base() {
    if !have("qemu-io") || !have("qemu-img") {
        println!("skipped: qemu-io/qemu-img not found");
        return;
    }
    let mut rng = Rng::from_env("qtree_fanout");
    let dir = tempfile::tempdir().unwrap();
    let cmp = Cmp {
        scratch: dir.path(),
    };
    let nodes: Vec<Daemon> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| {
            let pool = init_pool(dir.path(), &format!("{n}.img"), "256M");
            Daemon::try_start(&pool, &["--name", n]).unwrap()
        })
        .collect();
    let (a, b, c, d) = (&nodes[0], &nodes[1], &nodes[2], &nodes[3]);
    a.ok(&["vol", "create", "v", "--size", &format!("{V_MB}M")]);
    a.ok(&["qtree", "create", "v", "q", "--size", &format!("{Q_MB}M")]);
    write_round(a, &mut rng, 1);
    a.ok(&["snap", "create", "v", "s1"]);
    let create = |n: &Daemon, dst: &str, from: String| {
        let r = n.json(&["mirror", "create", dst, "--from", &from]);
        assert_eq!(r["kind"], "full", "{r}");
    };
    create(b, "w", format!("{}/v/q", a.listen));
    create(c, "x", format!("{}/w/q", b.listen));
    create(d, "v", format!("{}/v", a.listen));
    let kinds: Vec<(String, String)> = [b, c, d]
        .iter()
        .flat_map(|n| n.json(&["mirror", "status"]).as_array().unwrap().clone())
        .map(|s| {
            (
                s["dst"].as_str().unwrap().to_string(),
                s["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [("w/q", "qtree"), ("x/q", "qtree"), ("v", "volume")]
            .map(|(x, y)| (x.to_string(), y.to_string()))
    );
    cmp.same((a, "v/q@s1"), (b, "w/q@s1"));
    cmp.same((a, "v/q@s1"), (c, "x/q@s1"));
    cmp.same((a, "v@s1"), (d, "v@s1"));
    cmp.same((a, "v/q@s1"), (d, "v/q@s1"));

    for round in 2..=ROUNDS {
        write_round(a, &mut rng, round);
        let s = format!("s{round}");
        a.ok(&["snap", "create", "v", &s]);
        let plan = a.json(&["prune", "v", "--keep", "1"]);
        println!("round {round}: A pruned {}", plan["deleted"]);
        update(b, "w");
        if round % 2 == 0 {
            update(c, "x");
        }
        if round % 3 == 0 {
            update(d, "v");
        }
    }
    // Now B is at s5, C at s4 (through B), D at s3. A keeps exactly the
    // three bases (the newest is also B's).
    assert_eq!(a.snap_names("v"), ["s3", "s4", "s5"], "A's snapshots");
    let locks = a.json(&["lock", "list"]);
    let holds = |origin: &str, snap: &str, kind: &str, hops: &[&str]| {
        locks.as_array().unwrap().iter().any(|l| {
            l["origin_node"] == origin
                && l["snapshot"] == snap
                && l["kind"] == kind
                && l["hop_path"] == serde_json::json!(hops)
        })
    };
    assert!(
        holds("b", "s5", "qtree", &["b"]),
        "A: B's lock on s5: {locks:#}"
    );
    assert!(
        holds("d", "s3", "destination-path", &["d"]),
        "A: D's lock on s3: {locks:#}"
    );
    assert!(
        holds("c", "s4", "qtree", &["c", "b"]),
        "A: C's lock on s4 through B: {locks:#}"
    );
    // Each downstream's snapshot reads back as A's, by qtree export.
    cmp.same((a, "v/q@s4"), (b, "w/q@s4"));
    cmp.same((a, "v/q@s4"), (c, "x/q@s4"));
    cmp.same((a, "v@s3"), (d, "v@s3"));
    cmp.same((a, "v/q@s3"), (d, "v/q@s3"));
    cmp.same((a, "v/q@s5"), (b, "w/q"));
    cmp.same((a, "v/q@s4"), (c, "x/q"));

    // The laggards catch up incrementally; everything equals A at s5.
    assert_eq!(update(c, "x")["base"]["name"], "s4");
    assert_eq!(update(d, "v")["base"]["name"], "s3");
    for (n, e) in [(b, "w/q"), (c, "x/q"), (d, "v/q")] {
        cmp.same((a, "v/q@s5"), (n, &format!("{e}@s5")));
        cmp.same((a, "v/q@s5"), (n, e));
    }
    cmp.same((a, "v@s5"), (d, "v@s5"));
    let want_q = digest(a, "v", "s5", "q");
    assert_eq!(digest(b, "w", "s5", "q"), want_q, "B's q digest");
    assert_eq!(digest(c, "x", "s5", "q"), want_q, "C's q digest");
    assert_eq!(digest(d, "v", "s5", "q"), want_q, "D's q digest");
    assert_eq!(digest(d, "v", "s5", ""), digest(a, "v", "s5", ""));
    // After the catch-up A's prune frees what nobody needs any more.
    a.json(&["prune", "v", "--keep", "1"]);
    assert_eq!(a.snap_names("v"), ["s5"], "A after the catch-up");
    for (n, dst) in [(b, "w/q"), (c, "x/q"), (d, "v")] {
        let st = n.json(&["mirror", "status"]);
        let r = st
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["dst"] == dst)
            .unwrap();
        assert_eq!(r["full_transfers"].as_u64(), Some(1), "{dst}: {r}");
        assert!(r["last_error"].is_null(), "{dst}: {r}");
        assert_eq!(r["newest_common_snapshot"]["name"], "s5", "{dst}: {r}");
    }
}
