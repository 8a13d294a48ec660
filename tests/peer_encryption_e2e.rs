//! Issue 13: replication traffic is private. Before, a volume's data
//! crossed the network in clear text even between nodes that proved a
//! shared secret. Now, with a peer secret, everything after the proof runs
//! in a Noise session; a recording proxy between two nodes captures the
//! bytes of a full copy, and the volume's known pattern is not in them.
//! The same transfer without a secret (the explicit `--insecure-peers`)
//! shows the pattern (so the grep can find it when it is there).

mod common;
use common::*;
use sluice_testkit::proxy::Proxy;
use std::path::Path;

const PATTERN: &[u8] = b"SLUICE-KNOWN-PATTERN-7f3a9c";

fn fill(d: &Daemon) {
    let mut block = Vec::new();
    while block.len() < 1 << 20 {
        block.extend_from_slice(PATTERN);
    }
    block.truncate(1 << 20);
    let mut c = sluice::nbd_client::NbdClient::open(&d.nbd, "v").unwrap();
    c.write(0, &block).unwrap();
    c.flush().unwrap();
}

/// Capture a full copy of `v` from A to B through a recording proxy.
fn capture(dir: &Path, extra: &[&str]) -> Vec<u8> {
    let a = Daemon::named(dir, "a", extra);
    let b = Daemon::named(dir, "b", extra);
    a.ok(&["vol", "create", "v", "--size", "4M"]);
    fill(&a);
    a.ok(&["snap", "create", "v", "s1"]);
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
    proxy.record(false);
    // The copy is whole on B.
    let mut c = sluice::nbd_client::NbdClient::open(&b.nbd, "v@s1").unwrap();
    let got = c.read(0, PATTERN.len() as u32).unwrap();
    assert_eq!(got, PATTERN, "B's copy");
    proxy.recorded()
}

fn holds_pattern(wire: &[u8]) -> bool {
    wire.windows(PATTERN.len()).any(|w| w == PATTERN)
}

#[test]
fn a_transfer_between_nodes_with_a_secret_is_not_readable_on_the_wire() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "a long enough shared peer secret\n").unwrap();
    let wire = capture(dir.path(), &["--peer-secret", secret.to_str().unwrap()]);
    assert!(wire.len() > 1 << 20, "recorded only {} bytes", wire.len());
    assert!(
        !holds_pattern(&wire),
        "the volume's pattern crossed the wire in clear"
    );

    let clear_dir = tempfile::tempdir().unwrap();
    let clear = capture(clear_dir.path(), &["--insecure-peers"]);
    assert!(
        holds_pattern(&clear),
        "the clear-text capture misses the pattern: the grep is broken"
    );
}
