//! Issue 13: each peer its own identity. With `peer_secrets` a node
//! shares one secret with each peer, so a peer proves its own name: a
//! node that holds B's secret is refused when it claims to be C (it could
//! otherwise replace or release C's locks), and a node with no secret for
//! a peer refuses it, naming what to configure. Names proven, a node with
//! `peer_secrets` serves a peer only the volumes exported to it (the
//! default `exports_required` there), so B cannot pull or lock what only C
//! mirrors.

mod common;
use common::*;
use std::path::{Path, PathBuf};

fn secret(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(format!("{name}.secret"));
    let o = sluice(&["secret", "create", "--out", p.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    p
}

/// A node `name` whose config shares `secrets` (peer, file) with its peers.
fn node(dir: &Path, name: &str, secrets: &[(&str, &Path)]) -> Daemon {
    let table: Vec<String> = secrets
        .iter()
        .map(|(n, p)| format!("{n} = {:?}", p.to_str().unwrap()))
        .collect();
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(&cfg, format!("peer_secrets = {{ {} }}\n", table.join(", "))).unwrap();
    Daemon::named(dir, name, &["--config", cfg.to_str().unwrap()])
}

#[test]
fn peers_with_their_own_secrets_prove_their_own_names() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ab, ac) = (secret(d, "ab"), secret(d, "ac"));
    let a = node(d, "a", &[("b", &ab), ("c", &ac)]);
    let b = node(d, "b", &[("a", &ab)]);
    let c = node(d, "c", &[("a", &ac)]);
    a.ok(&["vol", "create", "v", "--size", "4M"]);
    a.ok(&["vol", "create", "w", "--size", "4M"]);
    a.ok(&["snap", "create", "v", "s1"]);
    a.ok(&["snap", "create", "w", "s1"]);
    assert_eq!(a.json(&["vol", "exports"])["exports_required"], true);
    // Nothing exported yet: refused, told the command.
    let o = b.cli(&["mirror", "create", "v", "--from", &a.source("v")]);
    assert!(!o.status.success(), "b pulled a volume not exported to it");
    let e = stderr(&o);
    assert!(
        e.contains("not exported to node b") && e.contains("sluice vol export v --to b"),
        "{e}"
    );
    a.ok(&["vol", "export", "v", "--to", "b,c"]);
    a.ok(&["vol", "export", "w", "--to", "c"]);
    // w is c's alone: b is refused it.
    let o = b.cli(&["mirror", "create", "w", "--from", &a.source("w")]);
    assert!(!o.status.success(), "b pulled w, exported to c only");
    assert!(
        stderr(&o).contains("not exported to node b"),
        "{}",
        stderr(&o)
    );
    let r = c.json(&["mirror", "create", "w", "--from", &a.source("w")]);
    assert_eq!(r["kind"], "full", "{r}");
    for n in [&b, &c] {
        let r = n.json(&["mirror", "create", "v", "--from", &a.source("v")]);
        assert_eq!(r["kind"], "full", "{r}");
    }
    // A node holding B's secret that calls itself c is not c.
    let elsewhere = d.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let impostor = node(&elsewhere, "c", &[("a", &ab)]);
    let o = impostor.cli(&["mirror", "create", "v", "--from", &a.source("v")]);
    assert!(!o.status.success(), "the impostor pulled");
    let e = stderr(&o);
    assert!(e.contains("refused") && e.contains("secret"), "{e}");
    // A node a has no secret for is refused, and told what to set.
    let stranger = node(d, "e", &[("a", &ab)]);
    let o = stranger.cli(&["mirror", "create", "v", "--from", &a.source("v")]);
    assert!(!o.status.success(), "the stranger pulled");
    let e = stderr(&o);
    assert!(
        e.contains("no secret for node \"e\"") && e.contains("peer_secrets"),
        "{e}"
    );
    // The real c goes on incrementally.
    a.ok(&["snap", "create", "v", "s2"]);
    let r = c.json(&["mirror", "update", "v"]);
    assert_eq!(r["kind"], "incremental", "{r}");
}

#[test]
fn peer_secrets_and_insecure_peers_are_refused_together() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ab = secret(d, "ab");
    let cfg = d.join("x.toml");
    std::fs::write(
        &cfg,
        format!(
            "peer_secrets = {{ b = {:?} }}\ninsecure_peers = true\n",
            ab.to_str().unwrap()
        ),
    )
    .unwrap();
    let pool = init_pool(d, "x.img", "256M");
    let e = Daemon::try_start_exact(&pool, &["--config", cfg.to_str().unwrap()])
        .err()
        .expect("a node started with both peer_secrets and insecure_peers");
    assert!(e.contains("peer_secrets and insecure_peers"), "{e}");
}
