//! Issue 5, peer authentication, with real `sluice serve` processes and
//! real TCP: nodes started with the same `--peer-secret FILE` mirror and
//! lock; a node with a different secret, or with none, is refused with a
//! clear error on both sides (the destination CLI's one-line error, the
//! source's log), leaves no relationship behind and sets no lock upstream.
//!
//! The secret proves itself by challenge and response: the test records
//! every byte between an authenticated pair (through the proxy) and checks
//! that the secret never crosses the wire.

mod common;

use common::*;
use sluice_testkit::proxy::Proxy;
use std::path::Path;
use std::time::{Duration, Instant};

fn secret_file(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

fn origins(d: &Daemon) -> Vec<String> {
    d.json(&["lock", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["origin_node"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn no_relationships(d: &Daemon) -> bool {
    d.json(&["mirror", "status"]).as_array().unwrap().is_empty()
}

/// The CLI failed with one line that contains every `want`.
fn refused(o: &std::process::Output, what: &str, want: &[&str]) -> String {
    assert!(!o.status.success(), "{what} succeeded: {}", stdout(o));
    let e = stderr(o).trim().to_string();
    assert_eq!(e.lines().count(), 1, "{what}: one-line error: {e}");
    for w in want {
        assert!(e.contains(w), "{what}: error lacks {w:?}: {e}");
    }
    e
}

/// A log line that says a peer was refused, containing every `want`.
fn wait_log(d: &Daemon, who: &str, want: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = d.log_text();
        if log
            .lines()
            .any(|l| l.contains("peer refused") && want.iter().all(|w| l.contains(w)))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{who}'s log has no 'peer refused' line with {want:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn peers_prove_the_shared_secret_or_are_refused_on_both_sides() {
    let mut rng = Rng::from_env("peer_auth");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let secret = format!("{:016x}{:016x}", rng.next(), rng.next());
    let other = format!("{:016x}{:016x}", rng.next(), rng.next());
    // The same secret with and without a trailing newline.
    let sa = secret_file(p, "a.secret", &format!("{secret}\n"));
    let sb = secret_file(p, "b.secret", &secret);
    let sc = secret_file(p, "c.secret", &other);
    let start = |n: &str, extra: &[&str]| {
        let pool = init_pool(p, &format!("{n}.img"), "64M");
        let mut args = vec!["--name", n];
        args.extend_from_slice(extra);
        Daemon::try_start(&pool, &args).unwrap()
    };
    let a = start("a", &["--peer-secret", &sa]);
    let b = start("b", &["--peer-secret", &sb]);
    let c = start("c", &["--peer-secret", &sc]);
    // D runs without a secret in the explicit insecure mode.
    let d = start("d", &["--insecure-peers"]);
    assert!(
        a.log_text()
            .contains("peers must prove the shared peer secret"),
        "A's log at start: {}",
        a.log_text()
    );
    assert!(
        d.log_text().contains("INSECURE peers"),
        "a node in insecure mode says so at start: {}",
        d.log_text()
    );
    a.ok(&["vol", "create", "v", "--size", "4M"]);
    a.ok(&["snap", "create", "v", "s1"]);

    // Same secret: B mirrors through a recording proxy; the secret never
    // crosses the wire; B's lock reaches A.
    let proxy = Proxy::start(&a.listen);
    proxy.record(true);
    let r = b.json(&[
        "mirror",
        "create",
        "v",
        "--from",
        &format!("{}/v", proxy.addr()),
    ]);
    assert_eq!(r["kind"], "full", "{r}");
    b.ok(&[
        "lock", "add", "v", "s1", "--owner", "backup", "--text", "keep",
    ]);
    proxy.record(false);
    let wire = proxy.recorded();
    assert!(wire.len() > 1000, "recorded {} bytes", wire.len());
    assert!(
        !wire.windows(secret.len()).any(|w| w == secret.as_bytes()),
        "the secret crossed the wire"
    );
    let a_locks = a.json(&["lock", "list"]);
    assert!(
        a_locks
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["origin_node"] == "b" && l["text"] == "backup: keep"),
        "B's application lock on A: {a_locks:#}"
    );

    // A different secret: refused on both sides, nothing left behind.
    let from_a = format!("{}/v", a.listen);
    let o = c.cli(&["mirror", "create", "v", "--from", &from_a]);
    let e = refused(
        &o,
        "C (other secret)",
        &["refused authentication", "secrets differ"],
    );
    println!("C: {e}");
    wait_log(&a, "A", &["peer c ", "secrets differ"]);
    assert!(no_relationships(&c), "C kept a relationship");
    assert!(c.json(&["vol", "list"]).as_array().unwrap().is_empty());

    // No secret at all: refused on both sides.
    let o = d.cli(&["mirror", "create", "v", "--from", &from_a]);
    let e = refused(
        &o,
        "D (no secret)",
        &["refused authentication", "requires a shared peer secret"],
    );
    println!("D: {e}");
    wait_log(&a, "A", &["peer d ", "without a peer secret"]);
    assert!(no_relationships(&d), "D kept a relationship");

    // Neither could set a lock on A.
    let o = origins(&a);
    assert!(
        !o.iter().any(|n| n == "c" || n == "d"),
        "A holds locks of refused peers: {o:?}"
    );
    assert!(o.iter().any(|n| n == "b"));
    let fails = a
        .metric("sluice_repl_auth_failures_total")
        .expect("auth failure metric");
    assert!(fails >= 2, "A counted {fails} refused peers");

    // A destination with a secret refuses a source without one.
    d.ok(&["vol", "create", "u", "--size", "4M"]);
    d.ok(&["snap", "create", "u", "t1"]);
    let e_node = start("e", &["--peer-secret", &sa]);
    let o = e_node.cli(&[
        "mirror",
        "create",
        "u",
        "--from",
        &format!("{}/u", d.listen),
    ]);
    let e = refused(
        &o,
        "E (secret) pulling from D (none)",
        &["runs without a peer secret", "--peer-secret"],
    );
    println!("E: {e}");
    wait_log(&d, "D", &["peer e ", "requires a shared peer secret"]);
    assert!(no_relationships(&e_node));
    assert!(origins(&d).is_empty(), "D holds locks: {:?}", origins(&d));

    // A secret too short to be one is refused at start, saying why.
    let weak = secret_file(p, "weak.secret", "short\n");
    let pool = init_pool(p, "w.img", "64M");
    let err = Daemon::try_start(&pool, &["--name", "w", "--peer-secret", &weak])
        .err()
        .expect("a 5-byte secret was accepted");
    assert!(err.contains("at least 16"), "{err}");

    // The authenticated pair still works after all this.
    a.ok(&["snap", "create", "v", "s2"]);
    let r = b.json(&["mirror", "update", "v"]);
    assert_eq!(r["kind"], "incremental", "{r}");
}

/// A refused (or otherwise failed) `mirror create` must not leave the
/// upstream behind in the destination's lock table: nothing may keep
/// trying to renew lock sets to a node this node has no relationship with.
#[test]
fn a_refused_mirror_create_leaves_no_upstream_behind() {
    let mut rng = Rng::from_env("refused_leaves_nothing");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let secret = format!("{:016x}{:016x}", rng.next(), rng.next());
    let sa = secret_file(p, "a.secret", &secret);
    // D renews its sets every 500 ms (a third of its lease).
    let cfg = p.join("d.toml");
    std::fs::write(&cfg, "lease_ms = 1500\n").unwrap();
    let start = |n: &str, extra: &[&str]| {
        let pool = init_pool(p, &format!("{n}.img"), "64M");
        let mut args = vec!["--name", n];
        args.extend_from_slice(extra);
        Daemon::try_start(&pool, &args).unwrap()
    };
    let a = start("a", &["--peer-secret", &sa]);
    let d = start(
        "d",
        &["--config", cfg.to_str().unwrap(), "--insecure-peers"],
    );
    let f = start("f", &["--insecure-peers"]);
    a.ok(&["vol", "create", "v", "--size", "4M"]);
    a.ok(&["snap", "create", "v", "s1"]);
    f.ok(&["vol", "create", "u", "--size", "4M"]);
    f.ok(&["snap", "create", "u", "t1"]);
    // A working relationship D <- F, whose renewals show D's ticks running.
    d.ok(&[
        "mirror",
        "create",
        "u",
        "--from",
        &format!("{}/u", f.listen),
    ]);
    let o = d.cli(&[
        "mirror",
        "create",
        "v",
        "--from",
        &format!("{}/v", a.listen),
    ]);
    refused(&o, "D (no secret)", &["requires a shared peer secret"]);
    assert!(no_relationships_but(&d, "u"));
    // Wait for three renewals of D's set on F.
    let renewed = || -> Option<u64> {
        f.json(&["lock", "list"])
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["origin_node"] == "d" && l["text"] == "d:u")
            .and_then(|l| l["renewed_unix_ms"].as_u64())
    };
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < 4 {
        if let Some(r) = renewed() {
            seen.insert(r);
        }
        assert!(Instant::now() < deadline, "D never renewed its set on F");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        d.metric("sluice_repl_undelivered_lock_sets"),
        Some(0),
        "D keeps undeliverable lock sets for the refused upstream; log:\n{}",
        d.log_text()
    );
    assert!(
        !d.log_text().contains("address of upstream node a"),
        "D keeps renewing to A, with which it has no relationship"
    );
}

fn no_relationships_but(d: &Daemon, dst: &str) -> bool {
    d.json(&["mirror", "status"])
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["dst"] == dst)
}
