//! Failure paths over real TCP: authentication, lost common base and
//! resync, cut connections and resume, corrupted extents, stale leases,
//! the canary with soft locks switched off, break and resync.

mod common;

use common::*;
use sluice_engine::api::{NsName, Request};
use sluice_engine::device::AlignedBuf;
use sluice_replicator::scrape::value;
use sluice_replicator::{MirrorSpec, ReplError};

fn node_secret(name: &str, secret: Option<&[u8]>) -> Node {
    Node::with_config(config(name, secret))
}

#[test]
fn auth_refused_with_wrong_or_missing_secret() {
    let a = node_secret("A", Some(b"alpha"));
    a.create_volume("v");
    a.snap("v", "s1");
    // Wrong secret.
    let b = node_secret("B", Some(b"beta"));
    match b.repl.mirror_create(spec("v", &a, "v")) {
        Err(ReplError::AuthRefused { detail, .. }) => {
            assert!(detail.contains("secret"), "{detail}")
        }
        other => panic!("wrong secret: {other:?}"),
    }
    // No secret on the puller.
    let c = node_secret("C", None);
    match c.repl.mirror_create(spec("v", &a, "v")) {
        Err(e @ ReplError::AuthRefused { .. }) => assert!(e.to_string().contains("secret"), "{e}"),
        other => panic!("missing secret: {other:?}"),
    }
    // No secret on the source: a puller with one refuses it.
    let d = node_secret("D", None);
    d.create_volume("w");
    d.snap("w", "s1");
    match b.repl.mirror_create(spec("w", &d, "w")) {
        Err(e @ ReplError::AuthRefused { .. }) => assert!(e.to_string().contains("secret"), "{e}"),
        other => panic!("source without secret: {other:?}"),
    }
    assert!(a.repl.lock_list().is_empty(), "a refused peer set locks");
    let m = a.repl.metrics();
    assert_ne!(
        value(&m, "sluice_repl_auth_failures_total", &[]),
        Some(0),
        "{m:?}"
    );
    // The same secret works.
    let e = node_secret("E", Some(b"alpha"));
    assert_eq!(
        e.repl.mirror_create(spec("v", &a, "v")).unwrap().kind,
        "full"
    );
    for n in [a, b, c, d, e] {
        n.shutdown();
    }
}

/// A node with neither a secret nor the insecure mode (the default of
/// `ReplicatorConfig::new`) talks to no peer: a puller in insecure mode is
/// told the source requires a peer secret (not a silent end of stream),
/// and the node itself refuses to connect out in clear text.
#[test]
fn without_a_secret_or_insecure_mode_no_peer_is_accepted_or_connected() {
    let mut cfg = config("A", None);
    cfg.insecure_peers = false;
    let a = Node::with_config(cfg);
    a.create_volume("v");
    a.snap("v", "s1");
    let b = node_secret("B", None); // insecure mode
    for _ in 0..3 {
        match b.repl.mirror_create(spec("v", &a, "v")) {
            Err(e @ ReplError::AuthRefused { .. }) => {
                let text = e.to_string();
                assert!(text.contains("requires a peer secret"), "{text}");
                assert!(text.contains("insecure_peers"), "{text}");
            }
            other => panic!("an insecure puller was not refused: {other:?}"),
        }
    }
    assert!(a.repl.lock_list().is_empty(), "a refused peer set locks");
    let m = a.repl.metrics();
    assert_eq!(
        value(&m, "sluice_repl_peers_refused_total", &[]),
        Some(3),
        "{m:?}"
    );
    // Outgoing: refused before any connection, naming both ways out.
    b.create_volume("w");
    b.snap("w", "s1");
    match a.repl.mirror_create(spec("w", &b, "w")) {
        Err(e @ ReplError::PeersDisabled { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("peer_secret") && text.contains("--insecure-peers"),
                "{text}"
            );
        }
        other => panic!("a node without a secret connected out: {other:?}"),
    }
    let m = b.repl.metrics();
    assert_eq!(
        value(&m, "sluice_repl_peers_refused_total", &[]),
        Some(0),
        "B was contacted: {m:?}"
    );
    for n in [a, b] {
        n.shutdown();
    }
}

#[test]
fn no_common_snapshot_fails_until_resync() {
    let (a, b) = (Node::start("A"), Node::start("B"));
    let mut r = rng(seed("no_common_snapshot_fails_until_resync"));
    a.create_volume("v");
    a.churn(&NsName::volume("v"), VOL_BLOCKS, 100, &mut r);
    a.snap("v", "s1");
    b.repl.mirror_create(spec("v", &a, "v")).unwrap();
    a.churn(&NsName::volume("v"), VOL_BLOCKS, 30, &mut r);
    a.snap("v", "s2");
    // An administrator force-deletes B's base on A.
    match a.repl.snap_delete("v", "s1", false) {
        Err(ReplError::Locked { holders, .. }) => assert!(holders.contains("B"), "{holders}"),
        other => panic!("{other:?}"),
    }
    a.repl.snap_delete("v", "s1", true).unwrap();
    match b.repl.mirror_update("v", &noprog) {
        Err(e @ ReplError::NoCommonSnapshot { bytes, .. }) => {
            assert!(bytes > 0, "{e}");
            assert!(e.to_string().contains("mirror resync"), "{e}");
        }
        other => panic!("expected no common snapshot: {other:?}"),
    }
    let st = b.repl.mirror_status();
    assert!(st[0]
        .last_error
        .as_deref()
        .unwrap_or("")
        .contains("no common snapshot"));
    let rep = b.repl.mirror_resync("v", true, &noprog).unwrap();
    assert_eq!(rep.kind, "full");
    let x = a.read_all(&NsName::volume("v"), Some("s2"), VOL_BLOCKS);
    let y = b.read_all(&NsName::volume("v"), Some("s2"), VOL_BLOCKS);
    assert!(x == y);
    assert_eq!(b.snap_names("v"), vec!["s2"], "s1 went with its source");
    for n in [a, b] {
        n.shutdown();
    }
}

/// A connection cut in the middle of a baseline: the next update resumes
/// from the receiver's checkpoint and sends less than a full transfer.
#[test]
fn resume_after_dropped_connection() {
    let (a, b) = (Node::start("A"), Node::start("B"));
    let mut r = rng(seed("resume_after_dropped_connection"));
    a.create_volume("v");
    a.churn(&NsName::volume("v"), VOL_BLOCKS, 1500, &mut r);
    a.snap("v", "s1");
    let p = Proxy::start(&a.addr);
    let s = MirrorSpec {
        source_addr: p.addr().to_string(),
        ..spec("v", &a, "v")
    };
    // Learn the full size with a clean run elsewhere.
    let c = Node::start("C");
    let full = c.repl.mirror_create(spec("v", &a, "v")).unwrap();
    assert!(full.bytes > 1 << 20);
    let cut = r.gen_range(full.bytes / 3..full.bytes * 2 / 3);
    p.arm_next(Fault::CutAfter(cut));
    let err = b
        .repl
        .mirror_create(s)
        .expect_err("the cut must fail the baseline");
    assert!(!err.to_string().is_empty());
    assert!(b.snap_names("v").is_empty(), "nothing committed");
    let st = b.repl.mirror_status();
    let ck = st[0]
        .checkpoint
        .clone()
        .expect("a checkpoint survives the cut");
    assert!(ck.position > 0);
    let rep = b.repl.mirror_update("v", &noprog).unwrap();
    assert_eq!(rep.kind, "full");
    assert_eq!(rep.resumed_from, ck.position);
    let st = &b.repl.mirror_status()[0];
    assert_eq!(
        (st.full_transfers, st.resumed_transfers),
        (1, 1),
        "the resumed baseline is counted once as full and once as resumed"
    );
    assert!(
        rep.bytes < full.bytes,
        "resumed {} >= full {}",
        rep.bytes,
        full.bytes
    );
    let x = a.read_all(&NsName::volume("v"), Some("s1"), VOL_BLOCKS);
    let y = b.read_all(&NsName::volume("v"), Some("s1"), VOL_BLOCKS);
    assert!(x == y);
    for n in [a, b, c] {
        n.shutdown();
    }
}

/// A follow update cut midway is retried by the follower on its own, from
/// its checkpoint: the failed transfer already saw the new snapshot in the
/// source's list, so no watch would report it again.
#[test]
fn a_cut_follow_update_is_retried_without_a_new_snapshot() {
    let (a, b) = (Node::start("A"), Node::start("B"));
    let mut r = rng(seed("a_cut_follow_update_is_retried"));
    a.create_volume("v");
    a.churn(&NsName::volume("v"), VOL_BLOCKS, 50, &mut r);
    a.snap("v", "s1");
    let p = Proxy::start(&a.addr);
    b.repl
        .mirror_create(MirrorSpec {
            source_addr: p.addr().to_string(),
            follow: true,
            ..spec("v", &a, "v")
        })
        .unwrap();
    // The watch carries a few hundred bytes; the transfer of s2 is ~5 MB,
    // with a checkpoint every MiB.
    p.arm(Fault::CutAfter(3 << 20));
    a.churn(&NsName::volume("v"), VOL_BLOCKS, 1500, &mut r);
    a.snap("v", "s2");
    wait_for("the follower retries the cut update to the end", || {
        b.repl.mirror_status()[0].incremental_transfers == 1
    });
    assert!(b.snap_names("v").contains(&"s2".to_string()));
    let st = &b.repl.mirror_status()[0];
    assert!(
        st.resumed_transfers >= 1,
        "the retry resumed the cut transfer: {st:?}"
    );
    let x = a.read_all(&NsName::volume("v"), Some("s2"), VOL_BLOCKS);
    let y = b.read_all(&NsName::volume("v"), Some("s2"), VOL_BLOCKS);
    assert!(x == y);
    for n in [a, b] {
        n.shutdown();
    }
}

use rand::Rng;

/// One flipped bit on the wire: the transfer fails, nothing is committed;
/// a clean retry completes with identical content.
#[test]
fn corrupted_extent_commits_nothing() {
    let (a, b) = (Node::start("A"), Node::start("B"));
    let mut r = rng(seed("corrupted_extent_commits_nothing"));
    a.create_volume("v");
    a.churn(&NsName::volume("v"), VOL_BLOCKS, 600, &mut r);
    a.snap("v", "s1");
    let p = Proxy::start(&a.addr);
    let s = MirrorSpec {
        source_addr: p.addr().to_string(),
        ..spec("v", &a, "v")
    };
    p.arm_next(Fault::FlipAt(r.gen_range(200_000..1_000_000)));
    let err = b
        .repl
        .mirror_create(s)
        .expect_err("corruption must fail the transfer");
    assert!(
        matches!(
            err,
            ReplError::ExtentChecksum { .. } | ReplError::Protocol { .. }
        ),
        "{err}"
    );
    assert!(b.snap_names("v").is_empty(), "nothing committed");
    let rep = b.repl.mirror_update("v", &noprog).unwrap();
    assert_eq!(rep.kind, "full");
    let x = a.read_all(&NsName::volume("v"), Some("s1"), VOL_BLOCKS);
    let y = b.read_all(&NsName::volume("v"), Some("s1"), VOL_BLOCKS);
    assert!(x == y);
    for n in [a, b] {
        n.shutdown();
    }
}

/// A downstream that goes silent: its locks turn stale after the lease
/// (kept under the default policy) and an operator can release them.
#[test]
fn silent_downstream_goes_stale_and_can_be_released() {
    let a = Node::start("A");
    let mut cb = config("B", None);
    cb.lease_ms = 1500;
    cb.renew_every_ms = 100;
    let b = Node::with_config(cb);
    a.create_volume("v");
    a.snap("v", "s1");
    b.repl.mirror_create(spec("v", &a, "v")).unwrap();
    let from_b = |a: &Node| {
        a.repl
            .lock_list()
            .into_iter()
            .filter(|l| l.origin_node == "B")
            .collect::<Vec<_>>()
    };
    assert!(!from_b(&a).is_empty());
    assert!(
        from_b(&a).iter().all(|l| l.state == "active"),
        "{:?}",
        from_b(&a)
    );
    // B renews its set while alive (lease renewal by the scheduler).
    let first = from_b(&a).iter().map(|l| l.renewed_unix_ms).max().unwrap();
    wait_for("B renews its locks on A", || {
        from_b(&a).iter().any(|l| l.renewed_unix_ms > first)
    });
    b.shutdown();
    wait_for("B's locks turn stale on A", || {
        let l = from_b(&a);
        !l.is_empty() && l.iter().all(|l| l.state == "stale")
    });
    assert!(
        a.repl.snap_delete("v", "s1", false).is_err(),
        "stale locks still hold"
    );
    a.repl.lock_release("v", "s1", "B").unwrap();
    assert!(from_b(&a).is_empty());
    a.repl.snap_delete("v", "s1", false).unwrap();
    a.shutdown();
}

/// The canary: with soft-lock propagation switched off, A's keep-1 pruning
/// deletes C's base and C's next update finds no common snapshot.
#[test]
fn chain_breaks_without_soft_locks() {
    let off = |n: &str| {
        let mut c = config(n, None);
        c.propagate_locks = false;
        Node::with_config(c)
    };
    let (a, b, c) = (off("A"), off("B"), off("C"));
    a.create_volume("v");
    a.snap("v", "s1");
    b.repl.mirror_create(spec("v", &a, "v")).unwrap();
    c.repl.mirror_create(spec("v", &b, "v")).unwrap();
    let mut broke = 0;
    for round in 2..=3 {
        a.snap("v", &format!("s{round}"));
        a.repl.prune("v", 1, false).unwrap();
        for (n, who) in [(&b, "B"), (&c, "C")] {
            match n.repl.mirror_update("v", &noprog) {
                Err(ReplError::NoCommonSnapshot { .. }) => broke += 1,
                Err(e) => panic!("{who}: unexpected error {e}"),
                Ok(_) => {}
            }
            n.repl.prune("v", 1, false).unwrap();
        }
    }
    assert!(broke > 0, "the canary did not break");
    for n in [a, b, c] {
        n.shutdown();
    }
}

/// Break makes the destination writable; resync reverts local writes to
/// the newest common snapshot and continues incrementally.
#[test]
fn break_then_resync_reverts_local_changes() {
    let (a, b) = (Node::start("A"), Node::start("B"));
    let mut r = rng(seed("break_then_resync_reverts_local_changes"));
    a.create_volume("v");
    a.churn(&NsName::volume("v"), VOL_BLOCKS, 100, &mut r);
    a.snap("v", "s1");
    b.repl.mirror_create(spec("v", &a, "v")).unwrap();
    b.repl.mirror_break("v").unwrap();
    assert!(matches!(
        b.repl.mirror_update("v", &noprog),
        Err(ReplError::Broken(_))
    ));
    b.churn(&NsName::volume("v"), VOL_BLOCKS, 300, &mut r);
    a.churn(&NsName::volume("v"), VOL_BLOCKS, 30, &mut r);
    a.snap("v", "s2");
    let rep = b.repl.mirror_resync("v", true, &noprog).unwrap();
    assert_eq!(rep.kind, "incremental");
    let x = a.read_all(&NsName::volume("v"), Some("s2"), VOL_BLOCKS);
    let y = b.read_all(&NsName::volume("v"), Some("s2"), VOL_BLOCKS);
    assert!(x == y);
    let d = |n: &Node| {
        n.snaps("v")
            .into_iter()
            .find(|s| s.name == "s2")
            .unwrap()
            .digests
    };
    assert_eq!(d(&a), d(&b));
    assert_eq!(b.repl.mirror_status()[0].state, "idle");
    for n in [a, b] {
        n.shutdown();
    }
}

/// A client write to `ns` on `n` (not the replicator's): Err if refused.
fn client_write(n: &Node, ns: &NsName) -> Result<(), sluice_engine::Error> {
    n.engine
        .call(Request::Write {
            ns: ns.clone(),
            lba: 0,
            data: AlignedBuf::from_slice(&[0xAB; 4096]),
            fua: false,
            replica: false,
        })
        .map(|_| ())
}

/// Story: `mirror resync` after a break skipped its whole first step when
/// the source had no snapshot newer than the common one (nothing to
/// transfer): the destination stayed writable and kept its local writes,
/// yet counted as a mirror again, so the next update applied the source's
/// changes on top of them and failed its digest check. Now a resync always
/// makes the destination read-only and reverts it to the common snapshot.
#[test]
fn a_resync_with_nothing_new_at_the_source_reverts_and_is_read_only() {
    let (a, b) = (Node::start("A"), Node::start("B"));
    let mut r = rng(seed(
        "a_resync_with_nothing_new_at_the_source_reverts_and_is_read_only",
    ));
    let v = NsName::volume("v");
    a.create_volume("v");
    a.churn(&v, VOL_BLOCKS, 100, &mut r);
    a.snap("v", "s1");
    b.repl.mirror_create(spec("v", &a, "v")).unwrap();
    assert!(matches!(
        client_write(&b, &v),
        Err(sluice_engine::Error::ReadOnly { .. })
    ));
    b.repl.mirror_break("v").unwrap();
    b.churn(&v, VOL_BLOCKS, 100, &mut r);
    let rep = b.repl.mirror_resync("v", true, &noprog).unwrap();
    assert_eq!(rep.kind, "none", "nothing new at the source: {rep:?}");
    assert!(
        a.read_all(&v, Some("s1"), VOL_BLOCKS) == b.read_all(&v, None, VOL_BLOCKS),
        "the local writes were not reverted"
    );
    assert!(matches!(
        client_write(&b, &v),
        Err(sluice_engine::Error::ReadOnly { .. })
    ));
    a.churn(&v, VOL_BLOCKS, 30, &mut r);
    a.snap("v", "s2");
    let rep = b.repl.mirror_update("v", &noprog).unwrap();
    assert_eq!(rep.kind, "incremental");
    assert!(a.read_all(&v, Some("s2"), VOL_BLOCKS) == b.read_all(&v, Some("s2"), VOL_BLOCKS));
    for n in [a, b] {
        n.shutdown();
    }
}

/// A qtree mirror's destination qtree is read-only from its baseline on;
/// break and delete make it writable, resync read-only again. One left
/// writable (by a build before qtrees had the flag) becomes read-only at
/// its next update.
#[test]
fn a_qtree_mirror_destination_is_read_only_until_break_or_delete() {
    let (a, b) = (Node::start("A"), Node::start("B"));
    let mut r = rng(seed(
        "a_qtree_mirror_destination_is_read_only_until_break_or_delete",
    ));
    a.create_volume("v");
    a.create_qtree("v", "q", VOL_BYTES);
    let (src, dst) = (NsName::qtree("v", "q"), NsName::qtree("w", "q"));
    a.churn(&src, VOL_BLOCKS, 50, &mut r);
    a.snap("v", "s1");
    let qspec = MirrorSpec {
        source_qtree: Some("q".into()),
        ..spec("w", &a, "v")
    };
    assert_eq!(b.repl.mirror_create(qspec).unwrap().kind, "full");
    let refused = |e: Result<(), sluice_engine::Error>| {
        matches!(e, Err(sluice_engine::Error::ReadOnly { what: "qtree", .. }))
    };
    assert!(refused(client_write(&b, &dst)), "after create");
    // The rest of the volume is not the mirror's: it stays writable.
    client_write(&b, &NsName::volume("w")).expect("the volume's own space");
    // As an older build left it: writable. The next update fixes that.
    b.engine
        .call(Request::SetReadOnly {
            ns: dst.clone(),
            read_only: false,
        })
        .unwrap();
    a.churn(&src, VOL_BLOCKS, 20, &mut r);
    a.snap("v", "s2");
    assert_eq!(
        b.repl.mirror_update("w/q", &noprog).unwrap().kind,
        "incremental"
    );
    assert!(refused(client_write(&b, &dst)), "after an update");
    b.repl.mirror_break("w/q").unwrap();
    client_write(&b, &dst).expect("writable after break");
    b.repl.mirror_resync("w/q", false, &noprog).unwrap();
    assert!(refused(client_write(&b, &dst)), "after resync");
    assert!(a.read_all(&src, Some("s2"), VOL_BLOCKS) == b.read_all(&dst, None, VOL_BLOCKS));
    b.repl.mirror_delete("w/q").unwrap();
    client_write(&b, &dst).expect("writable after delete");
    for n in [a, b] {
        n.shutdown();
    }
}

/// The destination restarts in the middle of a throttled baseline: the
/// next update resumes from the persisted checkpoint.
#[test]
fn destination_restart_mid_transfer_resumes() {
    let a = Node::start("A");
    let mut b = Node::start("B");
    let mut r = rng(seed("destination_restart_mid_transfer_resumes"));
    a.create_volume("v");
    a.churn(&NsName::volume("v"), VOL_BLOCKS, 1500, &mut r);
    a.snap("v", "s1");
    let s = MirrorSpec {
        throttle_bps: Some(3 << 20),
        ..spec("v", &a, "v")
    };
    let repl = b.repl.clone();
    let h = std::thread::spawn(move || repl.mirror_create(s));
    wait_for("a durable checkpoint on B", || {
        b.repl
            .mirror_status()
            .first()
            .and_then(|s| s.checkpoint.clone())
            .is_some_and(|c| c.position > 0)
    });
    b.restart();
    assert!(
        h.join().unwrap().is_err(),
        "the restart must stop the transfer"
    );
    // The source keeps the interrupted target for B (resume lock).
    assert!(a
        .repl
        .lock_list()
        .iter()
        .any(|l| l.origin_node == "B" && l.text.contains("in progress")));
    let rep = b.repl.mirror_update("v", &noprog).unwrap();
    assert_eq!(rep.kind, "full");
    assert!(rep.resumed_from > 0, "{rep:?}");
    let x = a.read_all(&NsName::volume("v"), Some("s1"), VOL_BLOCKS);
    let y = b.read_all(&NsName::volume("v"), Some("s1"), VOL_BLOCKS);
    assert!(x == y);
    assert!(!a
        .repl
        .lock_list()
        .iter()
        .any(|l| l.text.contains("in progress")));
    for n in [a, b] {
        n.shutdown();
    }
}

/// The source restarts (as after a kill) at a random point of a throttled
/// incremental transfer: the next update resumes and the data matches.
#[test]
fn source_restart_mid_transfer_resumes() {
    let mut a = Node::start("A");
    let b = Node::start("B");
    let mut r = rng(seed("source_restart_mid_transfer_resumes"));
    a.create_volume("v");
    a.churn(&NsName::volume("v"), VOL_BLOCKS, 100, &mut r);
    a.snap("v", "s1");
    let s = MirrorSpec {
        throttle_bps: Some(3 << 20),
        ..spec("v", &a, "v")
    };
    b.repl.mirror_create(s).unwrap();
    // 1024 separate one-block extents: 32 checkpoints.
    a.sparse(&NsName::volume("v"), VOL_BLOCKS, 2, &mut r);
    a.snap("v", "s2");
    let want: u64 = r.gen_range(1..24);
    let repl = b.repl.clone();
    let h = std::thread::spawn(move || repl.mirror_update("v", &noprog));
    wait_for("a durable checkpoint on B", || {
        b.repl
            .mirror_status()
            .first()
            .and_then(|s| s.checkpoint.clone())
            .is_some_and(|c| c.position >= want * 32)
    });
    a.restart();
    assert!(
        h.join().unwrap().is_err(),
        "the source restart must cut the transfer"
    );
    let rep = b.repl.mirror_update("v", &noprog).unwrap();
    assert_eq!(rep.kind, "incremental");
    assert!(rep.resumed_from >= want * 32, "{rep:?}");
    let x = a.read_all(&NsName::volume("v"), Some("s2"), VOL_BLOCKS);
    let y = b.read_all(&NsName::volume("v"), Some("s2"), VOL_BLOCKS);
    assert!(x == y);
    for n in [a, b] {
        n.shutdown();
    }
}

/// A source whose data does not match the digest it announces (a liar on
/// the wire, valid frames and checksums): the snapshot is not committed.
#[test]
fn digest_mismatch_commits_nothing() {
    use sluice_lockproto::wire::{ExtentHeader, SnapInfo, TransferStart, CHECKSUM_XXH3};
    use sluice_lockproto::Message;
    use sluice_replicator::conn::Conn;
    let b = Node::start("B");
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let id = *uuid::Uuid::new_v4().as_bytes();
    let snap = SnapInfo {
        id,
        name: "s1".into(),
        created_ms: 1,
        content_digest: [7; 32],
    };
    let h = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut c = Conn::new(Box::new(s), std::time::Duration::from_secs(10)).unwrap();
        c.handshake("LIAR", None).unwrap();
        while let Ok(Some(m)) = c.recv() {
            match m {
                Message::SnapshotPageRequest { req_id, qtree, .. } => {
                    let snapshots = if qtree.as_deref() == Some("@namespaces") {
                        vec![SnapInfo {
                            id: [0; 16],
                            name: String::new(),
                            created_ms: 1 << 20,
                            content_digest: [0; 32],
                        }]
                    } else {
                        vec![snap.clone()]
                    };
                    let page = Message::SnapshotPage {
                        req_id,
                        start: 0,
                        total: 1,
                        list_hash: sluice_lockproto::wire::snapshot_list_hash(&snapshots),
                        snapshots,
                    };
                    c.send(&page, &[]).unwrap();
                }
                Message::TransferRequest(t) => {
                    let data = vec![0xab; 4096];
                    let msgs = [
                        Message::TransferStart(TransferStart {
                            req_id: t.req_id,
                            target: snap.clone(),
                            base: None,
                            extent_count: 1,
                            byte_count: 4096,
                            volume_bytes: 1 << 20,
                            start_position: 0,
                        }),
                        Message::Extent(ExtentHeader {
                            req_id: t.req_id,
                            lba: 0,
                            len: 1,
                            checksum_kind: CHECKSUM_XXH3,
                            checksum: sluice_replicator::transfer::checksum(&data),
                        }),
                        Message::Checkpoint {
                            req_id: t.req_id,
                            position: 1,
                        },
                        Message::TransferDone {
                            req_id: t.req_id,
                            content_digest: [7; 32],
                        },
                    ];
                    for m in msgs {
                        let p: &[u8] = if matches!(m, Message::Extent(_)) {
                            &data
                        } else {
                            &[]
                        };
                        if c.send(&m, p).is_err() {
                            return;
                        }
                    }
                }
                Message::Ping { nonce } => c.send(&Message::Pong { nonce }, &[]).unwrap(),
                _ => {}
            }
        }
    });
    let s = sluice_replicator::MirrorSpec {
        dst_volume: "v".into(),
        source_addr: addr,
        source_volume: "v".into(),
        source_qtree: None,
        dst_qtree: None,
        every: None,
        follow: false,
        throttle_bps: None,
        keep: None,
    };
    match b.repl.mirror_create(s) {
        Err(e @ ReplError::DigestMismatch { .. }) => {
            assert!(e.to_string().contains("nothing was committed"), "{e}")
        }
        other => panic!("expected a digest mismatch: {other:?}"),
    }
    assert!(b.snap_names("v").is_empty(), "a snapshot was committed");
    h.join().unwrap();
    b.shutdown();
}
