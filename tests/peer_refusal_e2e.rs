//! Issue 13: a node refuses unauthenticated peers by default, and logs each
//! refused source once per minute, not once per attempt.
//!
//! Before, a node without a peer secret accepted any peer in clear text,
//! and every refusal of a node with one was its own warn line, so a peer
//! retrying in a loop (or anyone at the port) wrote the log full. Now:
//! - a node started with neither `--peer-secret` nor `--insecure-peers`
//!   serves its local volumes and says at start that it accepts no peers;
//!   a node that tries to mirror from it gets one clear line saying the
//!   upstream requires a peer secret (not an end of stream), and it does
//!   not connect out either;
//! - 40 refused attempts from one source give one log line, and every one
//!   is counted in `sluice_repl_peers_refused_total`.

mod common;
use common::*;
use std::time::Duration;

fn refused_total(d: &Daemon) -> u64 {
    d.metric("sluice_repl_peers_refused_total")
        .unwrap_or_else(|| panic!("no sluice_repl_peers_refused_total in {}", d.metrics()))
}

/// The CLI failed with one line that contains every `want`.
fn one_line_error(o: &std::process::Output, what: &str, want: &[&str]) {
    assert!(!o.status.success(), "{what} succeeded: {}", stdout(o));
    let e = stderr(o).trim().to_string();
    println!("{what}: {e}");
    assert_eq!(e.lines().count(), 1, "{what}: one-line error: {e}");
    for w in want {
        assert!(e.contains(w), "{what}: error lacks {w:?}: {e}");
    }
}

#[test]
fn a_node_without_a_secret_refuses_peers_clearly_and_logs_each_source_once() {
    let dir = tempfile::tempdir().unwrap();
    let pool = init_pool(dir.path(), "a.img", "64M");
    let a = Daemon::try_start_exact(&pool, &["--name", "a"]).unwrap();
    assert!(
        a.log_text().contains("refuses every peer"),
        "A says at start that it accepts no peers: {}",
        a.log_text()
    );
    a.ok(&["vol", "create", "v", "--size", "4M"]);
    a.ok(&["snap", "create", "v", "s1"]);

    // A node in insecure mode is told what A requires.
    let b = Daemon::named(dir.path(), "b", &["--insecure-peers"]);
    let o = b.cli(&["mirror", "create", "v", "--from", &a.source("v")]);
    one_line_error(
        &o,
        "B (insecure) pulling from A (no secret)",
        &["requires a peer secret", "peer_secret", "insecure_peers"],
    );
    assert!(b.json(&["mirror", "status"]).as_array().unwrap().is_empty());
    // A connects to no peer.
    b.ok(&["vol", "create", "u", "--size", "4M"]);
    b.ok(&["snap", "create", "u", "t1"]);
    let o = a.cli(&["mirror", "create", "u", "--from", &b.source("u")]);
    one_line_error(
        &o,
        "A (no secret) pulling from B",
        &[
            "neither accepts nor connects",
            "--peer-secret",
            "--insecure-peers",
        ],
    );
    assert_eq!(refused_total(&b), 0, "A connected to B");

    // Many attempts from one source: one line, every one counted.
    wait_until("A to count B's refusal", || refused_total(&a) >= 1);
    let before = refused_total(&a);
    let env = sluice_replicator::env::RealEnv::default();
    for i in 0..40 {
        let mut c =
            sluice_replicator::conn::Conn::connect(&env, &a.listen, Duration::from_secs(10))
                .unwrap();
        let e = c.handshake("intruder", None).unwrap_err();
        assert!(
            e.to_string().contains("requires a peer secret"),
            "attempt {i}: {e}"
        );
    }
    wait_until("A to count 40 more refusals", || {
        refused_total(&a) >= before + 40
    });
    assert_eq!(refused_total(&a), before + 40);
    let log = a.log_text();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("peer refused")).collect();
    assert_eq!(
        lines.iter().filter(|l| l.contains("intruder")).count(),
        1,
        "40 refusals of one source within a minute logged as: {lines:#?}"
    );
    assert_eq!(
        lines.iter().filter(|l| l.contains("b (")).count(),
        1,
        "B's refusal has its own line: {lines:#?}"
    );
    assert_eq!(lines.len(), 2, "{lines:#?}");
}
