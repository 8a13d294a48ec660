//! Per-peer secrets give each peer its own identity: a node proves the
//! secret of the pair it claims to be, so a node that knows only its own
//! pair's secret cannot pass for another (and so cannot replace or release
//! that node's locks), and a node with per-peer secrets only refuses a
//! peer it has no secret for, naming why.

mod common;

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use sluice_lockproto::Message;
use sluice_replicator::conn::Conn;
use sluice_replicator::ReplError;

const K_AB: &[u8] = b"secret shared by A and B only";
const K_AC: &[u8] = b"secret shared by A and C only";

fn node(name: &str, secrets: &[(&str, &[u8])]) -> Node {
    let mut cfg = config(name, None);
    cfg.insecure_peers = false;
    cfg.peer_secrets = secrets
        .iter()
        .map(|(n, k)| (n.to_string(), k.to_vec()))
        .collect::<BTreeMap<_, _>>();
    Node::with_config(cfg)
}

/// A raw peer named `claim` that knows `key`, against `to`.
fn raw(to: &Node, claim: &str, key: &[u8]) -> sluice_replicator::Result<Conn> {
    let s = TcpStream::connect(&to.addr).unwrap();
    let mut c = Conn::new(Box::new(s), Duration::from_secs(5))?;
    let k = key.to_vec();
    c.handshake_with(claim, &|_| Ok(Some(k.clone())))?;
    Ok(c)
}

#[test]
fn a_peer_proves_its_own_name() {
    let a = node("A", &[("B", K_AB), ("C", K_AC)]);
    let b = node("B", &[("A", K_AB)]);
    let c = node("C", &[("A", K_AC)]);
    a.create_volume("v");
    a.snap("v", "s1");
    // Each pair replicates with its own secret.
    assert_eq!(
        b.repl.mirror_create(spec("v", &a, "v")).unwrap().kind,
        "full"
    );
    assert_eq!(
        c.repl.mirror_create(spec("v", &a, "v")).unwrap().kind,
        "full"
    );
    let c_locks = || {
        a.repl
            .lock_list()
            .into_iter()
            .filter(|l| l.origin_node == "C")
            .count()
    };
    let held = c_locks();
    assert!(held > 0, "C's base lock is held on A");
    // B's secret does not pass for C: A checks the claim against the
    // secret it shares with C.
    match raw(&a, "C", K_AB) {
        Err(ReplError::AuthRefused { .. }) => {}
        other => panic!("B's secret passed for C: {:?}", other.map(|_| ())),
    }
    // So B cannot send the empty set that would end C's locks.
    assert_eq!(c_locks(), held);
    // B with its own secret is B.
    let mut ok = raw(&a, "B", K_AB).unwrap();
    ok.send(&Message::Ping { nonce: 1 }, &[]).unwrap();
    assert!(matches!(ok.recv(), Ok(Some(Message::Pong { nonce: 1 }))));
    // A node A has no secret for is refused, and told why.
    match raw(&a, "D", K_AB) {
        Err(ReplError::AuthRefused { detail, .. }) => {
            assert!(
                detail.contains("no secret for node \"D\"") && detail.contains("peer_secrets"),
                "{detail}"
            );
        }
        other => panic!("D was let in: {:?}", other.map(|_| ())),
    }
    // And the real C still updates incrementally.
    a.snap("v", "s2");
    let rep = c.repl.mirror_update("v", &noprog).unwrap();
    assert_eq!(rep.kind, "incremental");
    for n in [a, b, c] {
        n.shutdown();
    }
}
