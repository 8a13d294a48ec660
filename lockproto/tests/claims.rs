//! One test per claim group of the seed (see MISSION.md), driving
//! `LockNode` directly.

use sluice_lockproto::{
    Action, Bounds, Event, LeasePolicy, LockError, LockKind, LockNode, LockSet, NodeConfig,
    ReleaseReason, SoftLock,
};
use std::collections::BTreeSet;

use uuid::Uuid;

fn sid(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

fn node(name: &str) -> LockNode {
    LockNode::new(NodeConfig::new(name))
}

fn sets(acts: &[Action]) -> Vec<(String, LockSet)> {
    acts.iter()
        .filter_map(|a| {
            if let Action::SendLockSet { upstream, set } = a {
                Some((upstream.clone(), set.clone()))
            } else {
                None
            }
        })
        .collect()
}

fn up(n: &mut LockNode, upstream: &str) {
    n.handle(
        0,
        Event::UpstreamAdded {
            upstream: upstream.into(),
            relationship: format!("{}:/vol/v1", n.config().node_id),
            kind: LockKind::DestinationPath,
        },
    );
}

/// B mirrors A (snapshots 1, 2 on A, B got 1 then 2).
fn middle() -> LockNode {
    let mut b = node("B");
    up(&mut b, "A");
    b.handle(
        0,
        Event::DownstreamAdded {
            downstream: "C".into(),
        },
    );
    b.handle(
        1,
        Event::UpstreamSnapshots {
            upstream: "A".into(),
            snapshots: vec![sid(1), sid(2)],
        },
    );
    b.handle(
        1,
        Event::TransferFinished {
            upstream: "A".into(),
            target: sid(1),
        },
    );
    b.handle(
        2,
        Event::TransferFinished {
            upstream: "A".into(),
            target: sid(2),
        },
    );
    b
}

#[test]
fn claims_3_9_13_19_23_29_63_record_has_id_type_text_and_prints() {
    let l = SoftLock {
        snapshot: sid(7),
        kind: LockKind::OwnerName,
        text: "backup-app".into(),
        origin_node: "B".into(),
        hop_path: vec!["B".into()],
        created_ms: 1,
        renewed_ms: 2,
        lease_ms: 3,
    };
    let s = l.to_string();
    assert!(
        s.contains("owner") && s.contains("backup-app") && s.contains(&sid(7).to_string()),
        "{s}"
    );
    for k in [
        LockKind::OwnerName,
        LockKind::DestinationPath,
        LockKind::QtreeName,
    ] {
        assert_eq!(LockKind::from_code(k.code()), Ok(k));
    }
    assert!(LockKind::from_code(9).is_err());
}

#[test]
fn claims_32_34_41_second_form_is_the_same_lock() {
    let l = SoftLock {
        snapshot: sid(7),
        kind: LockKind::DestinationPath,
        text: "/vol/c1".into(),
        origin_node: "C".into(),
        hop_path: vec!["B".into()],
        created_ms: 0,
        renewed_ms: 0,
        lease_ms: 0,
    };
    let v = l.dependency_view();
    assert_eq!(v.resource_id, sid(7));
    assert_eq!(v.locking_dataset_id, "C:/vol/c1");
    assert!(
        v.to_string().contains("resource=") && v.to_string().contains("locking_dataset=C:/vol/c1")
    );
}

#[test]
fn claims_10_20_set_sent_before_and_after_each_transfer() {
    let mut b = middle();
    let before = sets(&b.handle(
        10,
        Event::TransferStarting {
            upstream: "A".into(),
        },
    ));
    assert_eq!(before.len(), 1, "one set before the transfer");
    assert_eq!(before[0].0, "A");
    let after = sets(&b.handle(
        11,
        Event::TransferFinished {
            upstream: "A".into(),
            target: sid(3),
        },
    ));
    assert!(!after.is_empty(), "a set after the transfer");
    assert!(after[0].1.generation > before[0].1.generation);
    // After: the new base (3) is named, as destination path.
    let l = &after[0].1.locks;
    assert!(l.iter().any(|l| l.snapshot == sid(3)
        && l.kind == LockKind::DestinationPath
        && l.origin_node == "B"));
}

#[test]
fn claims_1_11_53_node_identifies_its_own_dependencies() {
    let mut b = middle();
    assert_eq!(b.next_base("A"), Some(sid(2)));
    b.handle(
        3,
        Event::AppLockAdded {
            snapshot: sid(1),
            owner: "db-export".into(),
        },
    );
    let h = b.holders(sid(1));
    assert!(h
        .iter()
        .any(|l| l.kind == LockKind::OwnerName && l.text == "db-export"));
    assert!(
        !b.holders(sid(2)).is_empty(),
        "own next base with A is protected"
    );
}

#[test]
fn claims_30_31_35_56_middle_node_sends_base_shared_and_relayed() {
    let mut b = middle();
    b.handle(
        3,
        Event::DownstreamShared {
            downstream: "C".into(),
            shared: vec![sid(1)],
        },
    );
    let relayed = SoftLock {
        snapshot: sid(1),
        kind: LockKind::QtreeName,
        text: "/vol/d/q1".into(),
        origin_node: "D".into(),
        hop_path: vec!["D".into(), "C".into()],
        created_ms: 1,
        renewed_ms: 1,
        lease_ms: 1000,
    };
    let acts = b.handle(
        4,
        Event::LockSetReceived {
            set: LockSet {
                sender: "C".into(),
                generation: 1,
                lease_ms: 60_000,
                locks: vec![relayed],
                gone_acks: vec![],
            },
        },
    );
    let sent = sets(&acts);
    assert_eq!(
        sent.len(),
        1,
        "a change downstream triggers a new set upstream"
    );
    let locks = &sent[0].1.locks;
    assert!(
        locks
            .iter()
            .any(|l| l.snapshot == sid(2) && l.origin_node == "B"),
        "B's own base with A"
    );
    assert!(
        locks
            .iter()
            .any(|l| l.snapshot == sid(1) && l.origin_node == "C"),
        "snapshot shared with C"
    );
    assert!(
        locks
            .iter()
            .any(|l| l.origin_node == "D" && l.hop_path == ["D", "C", "B"]),
        "relayed lock, hop path extended"
    );
    // Claim 31: a new snapshot seen on C -> recompute and send.
    let acts = b.handle(
        5,
        Event::DownstreamShared {
            downstream: "C".into(),
            shared: vec![sid(1), sid(2)],
        },
    );
    let sent = sets(&acts);
    assert_eq!(sent.len(), 1);
    assert!(sent[0]
        .1
        .locks
        .iter()
        .any(|l| l.snapshot == sid(2) && l.origin_node == "C"));
}

#[test]
fn claims_1_50_52_fan_in_each_upstream_gets_its_snapshots_fan_out_merges() {
    let mut b = node("B");
    up(&mut b, "A1");
    up(&mut b, "A2");
    for d in ["C1", "C2"] {
        b.handle(
            0,
            Event::DownstreamAdded {
                downstream: d.into(),
            },
        );
    }
    b.handle(
        1,
        Event::TransferFinished {
            upstream: "A1".into(),
            target: sid(10),
        },
    );
    b.handle(
        1,
        Event::TransferFinished {
            upstream: "A2".into(),
            target: sid(20),
        },
    );
    b.handle(
        2,
        Event::DownstreamShared {
            downstream: "C1".into(),
            shared: vec![sid(10)],
        },
    );
    let acts = b.handle(
        3,
        Event::DownstreamShared {
            downstream: "C2".into(),
            shared: vec![sid(20)],
        },
    );
    let _ = acts;
    let acts = b.handle(
        4,
        Event::TransferStarting {
            upstream: "A1".into(),
        },
    );
    let to_a1 = &sets(&acts)[0].1;
    assert!(
        to_a1.locks.iter().all(|l| l.snapshot == sid(10)),
        "A1 only gets locks on snapshots it holds"
    );
    assert!(to_a1.locks.iter().any(|l| l.origin_node == "C1"));
    let acts = b.handle(
        5,
        Event::TransferStarting {
            upstream: "A2".into(),
        },
    );
    let to_a2 = &sets(&acts)[0].1;
    assert!(to_a2.locks.iter().all(|l| l.snapshot == sid(20)));
    assert!(to_a2.locks.iter().any(|l| l.origin_node == "C2"));
    // Fan-out merge on B: both downstreams' snapshots are protected.
    assert!(!b.holders(sid(10)).is_empty() && !b.holders(sid(20)).is_empty());
}

/// Issue 3: C pulls from A and from B, and B mirrors A. C got 2 from B,
/// then 1 straight from A, which B also holds: C's next base with B moves to
/// 1, but B only knows it shares 2 with C until C's set arrives. C keeps the
/// anchor with B (2, the last snapshot committed from B) locked meanwhile,
/// so the B -> C chain keeps a common snapshot whatever is in flight.
#[test]
fn claims_1_50_52_fan_in_keeps_the_anchor_with_each_upstream() {
    let mut c = node("C");
    up(&mut c, "A");
    up(&mut c, "B");
    c.handle(
        1,
        Event::UpstreamSnapshots {
            upstream: "B".into(),
            snapshots: vec![sid(1), sid(2)],
        },
    );
    c.handle(
        1,
        Event::TransferFinished {
            upstream: "B".into(),
            target: sid(2),
        },
    );
    c.handle(
        2,
        Event::UpstreamSnapshots {
            upstream: "A".into(),
            snapshots: vec![sid(1)],
        },
    );
    c.handle(
        2,
        Event::TransferFinished {
            upstream: "A".into(),
            target: sid(1),
        },
    );
    assert_eq!(c.next_base("B"), Some(sid(1)), "newest shared with B");
    assert_eq!(c.anchor("B"), Some(sid(2)), "last committed from B");
    assert_eq!(c.anchor("A"), Some(sid(1)));
    let acts = c.handle(
        3,
        Event::DeleteRequested {
            snapshot: sid(2),
            force: false,
        },
    );
    assert!(
        matches!(&acts[0], Action::DeleteRefused { holders, .. } if holders[0].origin_node == "C"),
        "the anchor with B stays: {acts:?}"
    );
    let acts = c.handle(
        4,
        Event::TransferStarting {
            upstream: "B".into(),
        },
    );
    let to_b: BTreeSet<Uuid> = sets(&acts)[0].1.locks.iter().map(|l| l.snapshot).collect();
    assert_eq!(
        to_b,
        BTreeSet::from([sid(1), sid(2)]),
        "B gets base and anchor"
    );
    // Survives a restart.
    let r = LockNode::from_bytes(NodeConfig::new("C"), &c.to_bytes().expect("persist"))
        .expect("restore");
    assert_eq!(r.anchor("B"), Some(sid(2)));
    // B force-deleted the anchor: it stops pinning C's copy.
    c.handle(
        5,
        Event::UpstreamSnapshotGone {
            upstream: "B".into(),
            snapshot: sid(2),
        },
    );
    assert_eq!(c.anchor("B"), None);
    let acts = c.handle(
        6,
        Event::DeleteRequested {
            snapshot: sid(2),
            force: false,
        },
    );
    assert!(matches!(&acts[0], Action::Deleted { .. }), "{acts:?}");
    // The next transfer from B sets the anchor again.
    c.handle(
        7,
        Event::TransferFinished {
            upstream: "B".into(),
            target: sid(3),
        },
    );
    assert_eq!(c.anchor("B"), Some(sid(3)));
}

#[test]
fn claims_60_69_locked_delete_refused_with_holders_forced_is_reported() {
    let mut b = middle();
    b.handle(
        3,
        Event::DownstreamShared {
            downstream: "C".into(),
            shared: vec![sid(1)],
        },
    );
    b.handle(
        3,
        Event::AppLockAdded {
            snapshot: sid(1),
            owner: "report-app".into(),
        },
    );
    let acts = b.handle(
        4,
        Event::DeleteRequested {
            snapshot: sid(1),
            force: false,
        },
    );
    let holders = acts
        .iter()
        .find_map(|a| {
            if let Action::DeleteRefused { holders, .. } = a {
                Some(holders.clone())
            } else {
                None
            }
        })
        .expect("refused");
    assert!(
        holders.iter().any(|h| h.origin_node == "C")
            && holders.iter().any(|h| h.text == "report-app"),
        "every holder named"
    );
    let err = sluice_lockproto::node::refused_to_error(
        acts.iter()
            .find(|a| matches!(a, Action::DeleteRefused { .. }))
            .expect("refused"),
    )
    .expect("error");
    assert!(matches!(&err, LockError::Locked { holders, .. } if holders.contains("report-app")));
    assert!(b.snapshots().contains(&sid(1)));
    let acts = b.handle(
        5,
        Event::DeleteRequested {
            snapshot: sid(1),
            force: true,
        },
    );
    assert!(acts.iter().any(|a| matches!(a, Action::ForcedDelete { snapshot, holders } if *snapshot == sid(1) && holders.len() >= 2)));
    assert!(acts.iter().any(|a| matches!(a, Action::TellSnapshotGone { downstream, snapshot } if downstream == "C" && *snapshot == sid(1))));
    assert_eq!(b.pending_gone("C"), vec![sid(1)]);
    assert!(!b.snapshots().contains(&sid(1)));
    // The downstream acknowledges in its next set.
    b.handle(
        6,
        Event::LockSetReceived {
            set: LockSet {
                sender: "C".into(),
                generation: 9,
                lease_ms: 60_000,
                locks: vec![],
                gone_acks: vec![sid(1)],
            },
        },
    );
    assert!(b.pending_gone("C").is_empty());
    // Unlocked snapshot deletes plainly.
    b.handle(7, Event::SnapshotCreated { snapshot: sid(99) });
    let acts = b.handle(
        8,
        Event::DeleteRequested {
            snapshot: sid(99),
            force: false,
        },
    );
    assert!(acts.contains(&Action::Deleted { snapshot: sid(99) }));
}

#[test]
fn sets_replace_whole_and_older_generations_are_ignored() {
    let mut b = middle();
    let l = |s| SoftLock {
        snapshot: sid(s),
        kind: LockKind::DestinationPath,
        text: "c".into(),
        origin_node: "C".into(),
        hop_path: vec!["C".into()],
        created_ms: 0,
        renewed_ms: 0,
        lease_ms: 0,
    };
    let set = |g, locks| LockSet {
        sender: "C".into(),
        generation: g,
        lease_ms: 60_000,
        locks,
        gone_acks: vec![],
    };
    b.handle(
        1,
        Event::LockSetReceived {
            set: set(5, vec![l(1)]),
        },
    );
    assert!(!b.holders(sid(1)).is_empty());
    b.handle(
        2,
        Event::LockSetReceived {
            set: set(4, vec![]),
        },
    );
    assert!(!b.holders(sid(1)).is_empty(), "older generation ignored");
    b.handle(
        3,
        Event::LockSetReceived {
            set: set(5, vec![]),
        },
    );
    assert!(!b.holders(sid(1)).is_empty(), "equal generation ignored");
    b.handle(
        4,
        Event::LockSetReceived {
            set: set(6, vec![]),
        },
    );
    assert!(
        b.holders(sid(1)).is_empty(),
        "newer set replaces the whole set"
    );
    let acts = b.handle(
        5,
        Event::LockSetReceived {
            set: LockSet {
                sender: "Z".into(),
                ..set(7, vec![])
            },
        },
    );
    assert!(
        acts.iter().any(|a| matches!(a, Action::SetRejected { .. })),
        "unknown sender rejected"
    );
}

#[test]
fn bounds_errors_name_the_bound() {
    let b = Bounds {
        max_locks_per_set: 1,
        max_text_len: 4,
        max_hops: 1,
    };
    let l = SoftLock {
        snapshot: sid(1),
        kind: LockKind::OwnerName,
        text: "toolong".into(),
        origin_node: "C".into(),
        hop_path: vec![],
        created_ms: 0,
        renewed_ms: 0,
        lease_ms: 0,
    };
    let e = l.validate(&b).expect_err("text too long");
    assert!(e.to_string().contains("max_text_len"), "{e}");
    let s = LockSet {
        sender: "C".into(),
        generation: 1,
        lease_ms: 1,
        locks: vec![l.clone(), l],
        gone_acks: vec![],
    };
    let e = s.validate(&b).expect_err("too many");
    assert!(e.to_string().contains("max_locks_per_set"), "{e}");
}

#[test]
fn leases_stale_is_visible_keep_policy_keeps_operator_releases() {
    let mut b = middle();
    b.handle(
        0,
        Event::LockSetReceived {
            set: LockSet {
                sender: "C".into(),
                generation: 1,
                lease_ms: 1_000,
                locks: vec![SoftLock {
                    snapshot: sid(1),
                    kind: LockKind::DestinationPath,
                    text: "c".into(),
                    origin_node: "C".into(),
                    hop_path: vec!["C".into()],
                    created_ms: 0,
                    renewed_ms: 0,
                    lease_ms: 1_000,
                }],
                gone_acks: vec![],
            },
        },
    );
    let acts = b.handle(1_000, Event::Tick);
    assert!(acts
        .iter()
        .any(|a| matches!(a, Action::Stale { downstream, .. } if downstream == "C")));
    assert_eq!(b.stale_downstreams(), vec!["C".to_string()]);
    b.handle(1_000_000, Event::Tick);
    assert!(
        !b.holders(sid(1)).is_empty(),
        "Keep policy keeps stale locks"
    );
    let acts = b.handle(
        1_000_001,
        Event::OperatorRelease {
            downstream: "C".into(),
        },
    );
    assert!(acts.contains(&Action::Released {
        downstream: "C".into(),
        reason: ReleaseReason::Operator
    }));
    assert!(b.holders(sid(1)).is_empty());

    let mut r = LockNode::new(NodeConfig {
        policy: LeasePolicy::ReleaseAfter { grace_ms: 500 },
        ..NodeConfig::new("B")
    });
    r.handle(
        0,
        Event::DownstreamAdded {
            downstream: "C".into(),
        },
    );
    r.handle(0, Event::SnapshotCreated { snapshot: sid(1) });
    r.handle(
        0,
        Event::DownstreamShared {
            downstream: "C".into(),
            shared: vec![sid(1)],
        },
    );
    assert!(!r.holders(sid(1)).is_empty());
    let acts = r.handle(60_000 + 500, Event::Tick);
    assert!(acts.iter().any(|a| matches!(a, Action::Stale { .. })));
    assert!(acts.contains(&Action::Released {
        downstream: "C".into(),
        reason: ReleaseReason::LeaseExpired
    }));
    assert!(r.holders(sid(1)).is_empty());
}

/// Found by a long DAG run (sub-seed 7924096030789231548): a set delayed
/// past the lease + grace of a newer one must not bring the released locks
/// back; only a set newer than every one accepted before does.
#[test]
fn released_set_is_not_revived_by_a_late_older_set() {
    let mut r = LockNode::new(NodeConfig {
        policy: LeasePolicy::ReleaseAfter { grace_ms: 500 },
        ..NodeConfig::new("B")
    });
    r.handle(
        0,
        Event::DownstreamAdded {
            downstream: "C".into(),
        },
    );
    r.handle(0, Event::SnapshotCreated { snapshot: sid(1) });
    let set = |generation| LockSet {
        sender: "C".into(),
        generation,
        lease_ms: 1_000,
        locks: vec![SoftLock {
            snapshot: sid(1),
            kind: LockKind::DestinationPath,
            text: "c".into(),
            origin_node: "C".into(),
            hop_path: vec!["C".into()],
            created_ms: 0,
            renewed_ms: 0,
            lease_ms: 1_000,
        }],
        gone_acks: vec![],
    };
    r.handle(0, Event::LockSetReceived { set: set(5) });
    assert!(!r.holders(sid(1)).is_empty());
    let acts = r.handle(1_500, Event::Tick);
    assert!(acts.contains(&Action::Released {
        downstream: "C".into(),
        reason: ReleaseReason::LeaseExpired
    }));
    assert!(r.holders(sid(1)).is_empty());
    r.handle(1_600, Event::LockSetReceived { set: set(4) });
    assert!(r.holders(sid(1)).is_empty(), "an older set stays ignored");
    r.handle(1_700, Event::LockSetReceived { set: set(6) });
    assert!(!r.holders(sid(1)).is_empty(), "a newer set locks again");
}

#[test]
fn lock_table_persists_restores_and_rejects_garbage() {
    let mut b = middle();
    b.handle(
        3,
        Event::AppLockAdded {
            snapshot: sid(1),
            owner: "x".into(),
        },
    );
    b.handle(
        3,
        Event::DownstreamShared {
            downstream: "C".into(),
            shared: vec![sid(2)],
        },
    );
    let g1 = sets(&b.handle(
        4,
        Event::TransferStarting {
            upstream: "A".into(),
        },
    ))[0]
        .1
        .generation;
    let bytes = b.to_bytes().expect("persist");
    let mut r = LockNode::from_bytes(NodeConfig::new("B"), &bytes).expect("restore");
    assert_eq!(r.all_locks(), b.all_locks());
    assert_eq!(r.snapshots(), b.snapshots());
    let g2 = sets(&r.handle(5, Event::Restarted))[0].1.generation;
    assert!(g2 > g1, "generations keep increasing across a restart");
    assert!(LockNode::from_bytes(NodeConfig::new("B"), b"garbage!garbage").is_err());
    assert!(LockNode::from_bytes(NodeConfig::new("B"), &bytes[..bytes.len() / 2]).is_err());
    assert!(LockNode::from_bytes(NodeConfig::new("other"), &bytes).is_err());
    let mut v = bytes.clone();
    v[4] = 99;
    assert!(matches!(
        LockNode::from_bytes(NodeConfig::new("B"), &v),
        Err(LockError::PersistedVersion { .. })
    ));
}

/// The bytes of a hex fixture file.
fn hex_fixture(text: &str) -> Vec<u8> {
    let hex = text.trim();
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex fixture"))
        .collect()
}

/// A lock table written by format version 1 (before the anchor, by commit
/// 253f134: B mirrors A with snapshots 1 and 2, shares 1 with C, an app
/// lock on 2) still restores: same locks, anchors unknown until the next
/// transfer; it is written back as the current version.
#[test]
fn lock_table_version_1_still_restores() {
    let bytes = hex_fixture(include_str!("golden/lock_table_v1.hex"));
    assert_eq!(&bytes[4..6], &1u16.to_le_bytes(), "fixture is version 1");
    let mut r = LockNode::from_bytes(NodeConfig::new("B"), &bytes).expect("restore v1");
    assert_eq!(r.snapshots(), &[sid(1), sid(2)]);
    assert_eq!(r.next_base("A"), Some(sid(2)));
    assert_eq!(r.anchor("A"), None);
    let holders = |n: &LockNode, s| {
        n.holders(s)
            .iter()
            .map(|h| (h.origin_node.clone(), h.text.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        holders(&r, sid(1)),
        vec![("C".into(), "base of mirror to C".into())]
    );
    assert_eq!(holders(&r, sid(2)).len(), 2, "own base and app lock");
    r.handle(
        5,
        Event::TransferFinished {
            upstream: "A".into(),
            target: sid(3),
        },
    );
    assert_eq!(r.anchor("A"), Some(sid(3)));
    let again = r.to_bytes().expect("persist");
    assert_eq!(
        &again[4..6],
        &sluice_lockproto::node::PERSIST_VERSION.to_le_bytes()
    );
    let back = LockNode::from_bytes(NodeConfig::new("B"), &again).expect("restore v2");
    assert_eq!(back.anchor("A"), Some(sid(3)));
}

/// A lock table written by format version 2 (before the dates of derived
/// locks, by commit 88db4ae: B mirrors A with snapshots 1 (t=1001) and 2
/// (t=1002), shares 1 with C (t=1003), an app lock on 2 (t=1004)) still
/// restores: same locks and anchor; derived locks are dated from the first
/// event after the restore and keep that date; written back as the current
/// version with the dates.
#[test]
fn lock_table_version_2_still_restores() {
    let bytes = hex_fixture(include_str!("golden/lock_table_v2.hex"));
    assert_eq!(&bytes[4..6], &2u16.to_le_bytes(), "fixture is version 2");
    let mut r = LockNode::from_bytes(NodeConfig::new("B"), &bytes).expect("restore v2");
    assert_eq!(r.snapshots(), &[sid(1), sid(2)]);
    assert_eq!(r.anchor("A"), Some(sid(2)));
    r.handle(5000, Event::Restarted);
    let dates = |n: &LockNode| {
        let mut v: Vec<(String, u64, u64)> = n
            .all_locks()
            .iter()
            .map(|l| (l.text.clone(), l.created_ms, l.renewed_ms))
            .collect();
        v.sort();
        v
    };
    let got = dates(&r);
    assert_eq!(
        got,
        vec![
            ("B:/vol/v1".into(), 5000, 5000),
            ("backup-app".into(), 1004, 1004),
            ("base of mirror to C".into(), 5000, 5000),
        ],
        "derived locks dated from the restore, app lock keeps its date"
    );
    r.handle(6000, Event::Tick);
    let again = r.to_bytes().expect("persist");
    assert_eq!(
        &again[4..6],
        &sluice_lockproto::node::PERSIST_VERSION.to_le_bytes()
    );
    let mut back = LockNode::from_bytes(NodeConfig::new("B"), &again).expect("restore v3");
    back.handle(7000, Event::Restarted);
    let kept: Vec<(String, u64)> = dates(&back).into_iter().map(|(t, c, _)| (t, c)).collect();
    assert_eq!(
        kept,
        vec![
            ("B:/vol/v1".into(), 5000),
            ("backup-app".into(), 1004),
            ("base of mirror to C".into(), 5000),
        ],
        "dates survive a restart"
    );
}

/// Every lock a node lists carries the real moment it started to hold its
/// snapshot: own bases from when they became the base, shared bases from
/// when the snapshot was first shared (renewed with the downstream's set),
/// and a base that moves on gets the new moment.
#[test]
fn derived_locks_are_dated_from_when_they_started_to_hold() {
    let mut b = node("B");
    b.handle(
        100,
        Event::UpstreamAdded {
            upstream: "A".into(),
            relationship: "B:/vol/v1".into(),
            kind: LockKind::DestinationPath,
        },
    );
    b.handle(
        100,
        Event::DownstreamAdded {
            downstream: "C".into(),
        },
    );
    b.handle(
        200,
        Event::TransferFinished {
            upstream: "A".into(),
            target: sid(1),
        },
    );
    b.handle(
        300,
        Event::DownstreamShared {
            downstream: "C".into(),
            shared: vec![sid(1)],
        },
    );
    b.handle(400, Event::Tick);
    let find = |n: &LockNode, text: &str| {
        n.all_locks()
            .into_iter()
            .find(|l| l.text == text)
            .unwrap_or_else(|| panic!("no lock {text:?}: {:?}", n.all_locks()))
    };
    let own = find(&b, "B:/vol/v1");
    assert_eq!(
        (own.snapshot, own.created_ms, own.renewed_ms),
        (sid(1), 200, 200)
    );
    let shared = find(&b, "base of mirror to C");
    assert_eq!(shared.created_ms, 300);
    assert!(shared.renewed_ms >= 300, "{shared:?}");
    b.handle(
        500,
        Event::TransferFinished {
            upstream: "A".into(),
            target: sid(2),
        },
    );
    let own = find(&b, "B:/vol/v1");
    assert_eq!((own.snapshot, own.created_ms), (sid(2), 500));
    let s = sets(&b.handle(
        600,
        Event::TransferStarting {
            upstream: "A".into(),
        },
    ));
    let sent = s[0].1.locks.iter().find(|l| l.snapshot == sid(2)).unwrap();
    assert_eq!((sent.created_ms, sent.renewed_ms), (500, 600));
}

#[test]
fn propagation_off_sends_empty_sets() {
    let mut b = middle();
    b.set_propagate(false);
    b.handle(
        3,
        Event::DownstreamShared {
            downstream: "C".into(),
            shared: vec![sid(1)],
        },
    );
    let s = sets(&b.handle(
        4,
        Event::TransferStarting {
            upstream: "A".into(),
        },
    ));
    assert!(s[0].1.locks.is_empty());
    assert!(
        !b.holders(sid(2)).is_empty(),
        "own base still protected locally"
    );
}

#[test]
fn protection_changes_are_reported_and_removed_downstream_releases() {
    let mut b = middle();
    let acts = b.handle(
        3,
        Event::DownstreamShared {
            downstream: "C".into(),
            shared: vec![sid(1)],
        },
    );
    assert!(acts.iter().any(|a| matches!(a, Action::Protected { snapshot, holders } if *snapshot == sid(1) && holders.iter().any(|h| h.origin_node == "C"))));
    let acts = b.handle(
        4,
        Event::DownstreamRemoved {
            downstream: "C".into(),
        },
    );
    assert!(acts.contains(&Action::Released {
        downstream: "C".into(),
        reason: ReleaseReason::RelationshipRemoved
    }));
    assert!(acts.contains(&Action::Unprotected { snapshot: sid(1) }));
    assert!(
        b.preview_delete(&[sid(1), sid(2)])
            .iter()
            .all(|(s, _)| *s == sid(2)),
        "preview: only B's own base is held"
    );
}

/// Delivers every set in `acts` addressed to `to.config().node_id`.
fn deliver_to(to: &mut LockNode, now: u64, acts: &[Action]) -> usize {
    let me = to.config().node_id.clone();
    let mut n = 0;
    for (u, set) in sets(acts) {
        if u == me {
            to.handle(now, Event::LockSetReceived { set });
            n += 1;
        }
    }
    n
}

/// Issue 3/5 "stale is always visible, never silent", two hops up: in
/// A -> B -> C, once C goes silent B marks C's set stale after its lease,
/// and A, which sees C's locks only through B's sets, must see them stale
/// too, with C's own renewal time, while B itself keeps renewing. A's
/// release policy applies to them by C's renewal time: under `Keep` they
/// stay (stale), under `ReleaseAfter` they go after C's lease + grace even
/// though B keeps relaying them (B keeps them under its own `Keep`).
#[test]
fn relayed_locks_carry_their_origins_renewal_and_staleness_every_hop() {
    const LEASE: u64 = 3_000;
    let cfg = |n: &str, policy| NodeConfig {
        lease_ms: LEASE,
        renew_every_ms: 1_000,
        policy,
        ..NodeConfig::new(n)
    };
    for a_policy in [
        LeasePolicy::Keep,
        LeasePolicy::ReleaseAfter { grace_ms: 2_000 },
    ] {
        let mut a = LockNode::new(cfg("A", a_policy));
        let mut b = LockNode::new(cfg("B", LeasePolicy::Keep));
        let mut c = LockNode::new(cfg("C", LeasePolicy::Keep));
        let s1 = sid(1);
        // A has s1; B pulls it from A; C pulls it from B.
        a.handle(0, Event::SnapshotCreated { snapshot: s1 });
        a.handle(
            0,
            Event::DownstreamAdded {
                downstream: "B".into(),
            },
        );
        b.handle(
            0,
            Event::DownstreamAdded {
                downstream: "C".into(),
            },
        );
        up(&mut b, "A");
        up(&mut c, "B");
        b.handle(
            0,
            Event::UpstreamSnapshots {
                upstream: "A".into(),
                snapshots: vec![s1],
            },
        );
        let acts = b.handle(
            10,
            Event::TransferFinished {
                upstream: "A".into(),
                target: s1,
            },
        );
        deliver_to(&mut a, 10, &acts);
        c.handle(
            20,
            Event::UpstreamSnapshots {
                upstream: "B".into(),
                snapshots: vec![s1],
            },
        );
        let acts = c.handle(
            20,
            Event::TransferFinished {
                upstream: "B".into(),
                target: s1,
            },
        );
        let relay = b.handle(
            20,
            Event::DownstreamShared {
                downstream: "C".into(),
                shared: vec![s1],
            },
        );
        deliver_to(&mut a, 20, &relay);
        let relay = {
            let mut r = Vec::new();
            for (_, set) in sets(&acts) {
                r.extend(b.handle(20, Event::LockSetReceived { set }));
            }
            r
        };
        deliver_to(&mut a, 20, &relay);
        // Everyone ticks every 500 ms; C renews until it dies at t=5000.
        let died = 5_000;
        let mut t = 20;
        let c_on_a = |a: &LockNode| -> Vec<SoftLock> {
            a.all_locks()
                .into_iter()
                .filter(|l| l.origin_node == "C")
                .collect()
        };
        let mut b_stale_at = None;
        let mut a_relayed_stale = false;
        let mut a_released = false;
        while t < 20_000 {
            t += 500;
            if t <= died {
                let acts = c.handle(t, Event::Tick);
                for (_, set) in sets(&acts) {
                    let r = b.handle(t, Event::LockSetReceived { set });
                    deliver_to(&mut a, t, &r);
                }
            }
            let acts = b.handle(t, Event::Tick);
            if acts
                .iter()
                .any(|x| matches!(x, Action::Stale { downstream, .. } if downstream == "C"))
            {
                b_stale_at.get_or_insert(t);
            }
            deliver_to(&mut a, t, &acts);
            let acts = a.handle(t, Event::Tick);
            assert!(
                a.stale_downstreams().is_empty(),
                "B renews: its set is fresh on A"
            );
            a_relayed_stale |= acts.iter().any(|x| {
                matches!(x, Action::RelayedStale { downstream, origin, .. } if downstream == "B" && origin == "C")
            });
            a_released |= acts.iter().any(|x| {
                matches!(x, Action::RelayedReleased { downstream, origin, .. } if downstream == "B" && origin == "C")
            });
            let on_a = c_on_a(&a);
            // Never renewed after C died, on any node.
            for l in &on_a {
                assert!(
                    l.renewed_ms <= died,
                    "A shows C's lock renewed at {} after C died at {died}: {l}",
                    l.renewed_ms
                );
            }
            if t < died {
                assert!(!on_a.is_empty());
                assert!(
                    on_a.iter().all(|l| !a.is_stale(l, t)),
                    "t={t}: C alive but its locks look stale on A"
                );
            }
            if b_stale_at.is_some() {
                // B knows: C's locks are stale on B and on A.
                assert!(b
                    .all_locks()
                    .iter()
                    .filter(|l| l.origin_node == "C")
                    .all(|l| b.is_stale(l, t)));
                assert!(
                    on_a.iter().all(|l| a.is_stale(l, t)),
                    "t={t}: B marked C stale, A shows C's locks active"
                );
            }
        }
        assert!(b_stale_at.is_some(), "B marks C stale after its lease");
        assert!(a_relayed_stale, "A reports C's relayed locks stale");
        // B (Keep) still holds and relays them.
        assert!(!b.holders(s1).iter().all(|l| l.origin_node != "C"));
        match a_policy {
            LeasePolicy::Keep => {
                assert!(!a_released);
                assert!(!c_on_a(&a).is_empty(), "Keep: C's locks stay on A, stale");
            }
            LeasePolicy::ReleaseAfter { .. } => {
                assert!(a_released, "A releases C's locks by C's renewal time");
                assert!(c_on_a(&a).is_empty(), "released on A: {:?}", c_on_a(&a));
                // B's own base lock still holds s1 on A.
                assert!(a.holders(s1).iter().any(|l| l.origin_node == "B"));
            }
        }
    }
}
