//! One test per group of the soft-lock claims (numbered as in
//! docs/REPLICATION.md, "Soft locks"), driving
//! `LockNode` directly.
//!
//! Everything is keyed by relationship: the usual shape here is node B
//! pulling its volume `v1` as relationship `v1` from A's volume `v1`, and
//! serving `v1` to C, which pulls it as its relationship `v1`.
// Tests and benchmarks may panic (the crate denies it elsewhere).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use sluice_lockproto::{
    Action, Bounds, Event, Held, LeasePolicy, LockError, LockKind, LockNode, LockSet, NodeConfig,
    ReleaseReason, SoftLock,
};
use std::collections::{BTreeMap, BTreeSet};

use uuid::Uuid;

fn sid(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

fn node(name: &str) -> LockNode {
    LockNode::new(NodeConfig::new(name))
}

/// The sets in `acts`, as (upstream node, set).
fn sets(acts: &[Action]) -> Vec<(String, LockSet)> {
    acts.iter()
        .filter_map(|a| {
            if let Action::SendLockSet {
                relationship,
                upstream,
                set,
            } = a
            {
                assert_eq!(relationship, &set.relationship, "{a:?}");
                Some((upstream.clone(), set.clone()))
            } else {
                None
            }
        })
        .collect()
}

/// `n` pulls `upstream`'s volume `source` into its volume `volume` as
/// relationship `relationship`.
fn up_rel(n: &mut LockNode, relationship: &str, upstream: &str, source: &str, volume: &str) {
    let _ = n.handle(
        0,
        Event::UpstreamAdded {
            relationship: relationship.into(),
            upstream: upstream.into(),
            source: source.into(),
            volume: volume.into(),
            kind: LockKind::DestinationPath,
        },
    );
}

/// `n` pulls `upstream`'s `v1` into its `v1` (relationship `v1`).
fn up(n: &mut LockNode, upstream: &str) {
    up_rel(n, "v1", upstream, "v1", "v1");
}

/// `downstream` pulls our `v1` as its relationship `v1`.
fn down(n: &mut LockNode, downstream: &str) {
    let _ = n.handle(
        0,
        Event::DownstreamAdded {
            downstream: downstream.into(),
            relationship: "v1".into(),
            volume: "v1".into(),
        },
    );
}

/// A set C sends for its relationship `v1` (our volume `v1`).
fn cset(generation: u64, lease_ms: u64, locks: Vec<SoftLock>) -> LockSet {
    LockSet {
        sender: "C".into(),
        relationship: "v1".into(),
        volume: "v1".into(),
        generation,
        lease_ms,
        locks,
        gone_acks: vec![],
    }
}

/// A lock C holds on `snapshot` (its mirror `v1`).
fn c_lock(snapshot: Uuid, lease_ms: u64) -> SoftLock {
    SoftLock {
        snapshot,
        kind: LockKind::DestinationPath,
        text: "c".into(),
        origin_node: "C".into(),
        hop_path: vec!["C".into()],
        created_ms: 0,
        renewed_ms: 0,
        lease_ms,
        dataset: "C/v1".into(),
    }
}

/// B mirrors A (snapshots 1, 2 on A, B got 1 then 2); C pulls from B.
fn middle() -> LockNode {
    let mut b = node("B");
    up(&mut b, "A");
    down(&mut b, "C");
    let _ = b.handle(
        1,
        Event::UpstreamSnapshots {
            relationship: "v1".into(),
            snapshots: vec![sid(1), sid(2)],
        },
    );
    let _ = b.handle(
        1,
        Event::TransferFinished {
            relationship: "v1".into(),
            target: sid(1),
        },
    );
    let _ = b.handle(
        2,
        Event::TransferFinished {
            relationship: "v1".into(),
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
        dataset: "B/v1".into(),
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
        dataset: "C/c1".into(),
    };
    let v = l.dependency_view();
    assert_eq!(v.resource_id, sid(7));
    assert_eq!(v.locking_dataset_id, "C/c1");
    assert!(v.to_string().contains("resource=") && v.to_string().contains("locking_dataset=C/c1"));
    // The locks a node makes name the dataset that needs the snapshot: its
    // own base names its relationship, a shared base the downstream's.
    let mut b = middle();
    let _ = b.handle(
        3,
        Event::DownstreamShared {
            downstream: "C".into(),
            relationship: "v1".into(),
            shared: vec![sid(1)],
        },
    );
    let own = b
        .holders("v1", sid(2))
        .into_iter()
        .find(|h| h.lock.origin_node == "B")
        .expect("own base");
    assert_eq!(own.lock.text, "B:v1");
    let v = own.lock.dependency_view();
    assert_eq!(
        (v.resource_id, v.locking_dataset_id.as_str()),
        (sid(2), "B/v1")
    );
    let shared = b
        .holders("v1", sid(1))
        .into_iter()
        .find(|h| h.lock.origin_node == "C")
        .expect("shared base");
    assert_eq!(shared.lock.dependency_view().locking_dataset_id, "C/v1");
}

#[test]
fn claims_10_20_set_sent_before_and_after_each_transfer() {
    let mut b = middle();
    let before = sets(&b.handle(
        10,
        Event::TransferStarting {
            relationship: "v1".into(),
        },
    ));
    assert_eq!(before.len(), 1, "one set before the transfer");
    assert_eq!(before[0].0, "A");
    assert_eq!(
        (
            before[0].1.relationship.as_str(),
            before[0].1.volume.as_str()
        ),
        ("v1", "v1")
    );
    let after = sets(&b.handle(
        11,
        Event::TransferFinished {
            relationship: "v1".into(),
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
    assert_eq!(b.next_base("v1"), Some(sid(2)));
    let _ = b.handle(
        3,
        Event::AppLockAdded {
            volume: "v1".into(),
            snapshot: sid(1),
            owner: "db-export".into(),
        },
    );
    let h = b.holders("v1", sid(1));
    assert!(h
        .iter()
        .any(|h| h.lock.kind == LockKind::OwnerName && h.lock.text == "db-export"));
    assert!(
        !b.holders("v1", sid(2)).is_empty(),
        "own next base with A is protected"
    );
}

#[test]
fn claims_30_31_35_56_middle_node_sends_base_shared_and_relayed() {
    let mut b = middle();
    let _ = b.handle(
        3,
        Event::DownstreamShared {
            downstream: "C".into(),
            relationship: "v1".into(),
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
        dataset: "D/d/q1".into(),
    };
    let acts = b.handle(
        4,
        Event::LockSetReceived {
            set: cset(1, 60_000, vec![relayed]),
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
            relationship: "v1".into(),
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

/// The set of `acts` sent to `upstream` (exactly one).
fn set_to(acts: &[Action], upstream: &str) -> LockSet {
    let mut v: Vec<LockSet> = sets(acts)
        .into_iter()
        .filter(|(u, _)| u == upstream)
        .map(|(_, s)| s)
        .collect();
    assert_eq!(v.len(), 1, "one set to {upstream}: {acts:?}");
    v.remove(0)
}

/// Fan-in: B's volume `vol` is written by two relationships (`vol/A1` from
/// A1, `vol/A2` from A2, as two qtree mirrors into one volume would be).
#[test]
fn claims_1_50_52_fan_in_each_upstream_gets_its_snapshots_fan_out_merges() {
    let mut b = node("B");
    up_rel(&mut b, "vol/A1", "A1", "v1", "vol");
    up_rel(&mut b, "vol/A2", "A2", "v2", "vol");
    for d in ["C1", "C2"] {
        let _ = b.handle(
            0,
            Event::DownstreamAdded {
                downstream: d.into(),
                relationship: "vol".into(),
                volume: "vol".into(),
            },
        );
    }
    let _ = b.handle(
        1,
        Event::TransferFinished {
            relationship: "vol/A1".into(),
            target: sid(10),
        },
    );
    let _ = b.handle(
        1,
        Event::TransferFinished {
            relationship: "vol/A2".into(),
            target: sid(20),
        },
    );
    let _ = b.handle(
        2,
        Event::DownstreamShared {
            downstream: "C1".into(),
            relationship: "vol".into(),
            shared: vec![sid(10)],
        },
    );
    let _ = b.handle(
        3,
        Event::DownstreamShared {
            downstream: "C2".into(),
            relationship: "vol".into(),
            shared: vec![sid(20)],
        },
    );
    let acts = b.handle(
        4,
        Event::TransferStarting {
            relationship: "vol/A1".into(),
        },
    );
    let to_a1 = set_to(&acts, "A1");
    assert_eq!(
        (to_a1.relationship.as_str(), to_a1.volume.as_str()),
        ("vol/A1", "v1")
    );
    assert!(
        to_a1.locks.iter().all(|l| l.snapshot == sid(10)),
        "A1 only gets locks on snapshots it holds"
    );
    assert!(to_a1.locks.iter().any(|l| l.origin_node == "C1"));
    let acts = b.handle(
        5,
        Event::TransferStarting {
            relationship: "vol/A2".into(),
        },
    );
    let to_a2 = set_to(&acts, "A2");
    assert_eq!(
        (to_a2.relationship.as_str(), to_a2.volume.as_str()),
        ("vol/A2", "v2")
    );
    assert!(to_a2.locks.iter().all(|l| l.snapshot == sid(20)));
    assert!(to_a2.locks.iter().any(|l| l.origin_node == "C2"));
    // Fan-out merge on B: both downstreams' snapshots are protected.
    assert!(!b.holders("vol", sid(10)).is_empty() && !b.holders("vol", sid(20)).is_empty());
}

/// Issue 3: C pulls from A and from B, and B mirrors A. C got 2 from B,
/// then 1 straight from A, which B also holds: C's next base with B moves to
/// 1, but B only knows it shares 2 with C until C's set arrives. C keeps the
/// anchor with B (2, the last snapshot committed from B) locked meanwhile,
/// so the B -> C chain keeps a common snapshot whatever is in flight. (Both
/// relationships write C's volume `vol`.)
#[test]
fn claims_1_50_52_fan_in_keeps_the_anchor_with_each_upstream() {
    let mut c = node("C");
    up_rel(&mut c, "vol/A", "A", "v1", "vol");
    up_rel(&mut c, "vol/B", "B", "v1", "vol");
    let _ = c.handle(
        1,
        Event::UpstreamSnapshots {
            relationship: "vol/B".into(),
            snapshots: vec![sid(1), sid(2)],
        },
    );
    let _ = c.handle(
        1,
        Event::TransferFinished {
            relationship: "vol/B".into(),
            target: sid(2),
        },
    );
    let _ = c.handle(
        2,
        Event::UpstreamSnapshots {
            relationship: "vol/A".into(),
            snapshots: vec![sid(1)],
        },
    );
    let _ = c.handle(
        2,
        Event::TransferFinished {
            relationship: "vol/A".into(),
            target: sid(1),
        },
    );
    assert_eq!(c.next_base("vol/B"), Some(sid(1)), "newest shared with B");
    assert_eq!(c.anchor("vol/B"), Some(sid(2)), "last committed from B");
    assert_eq!(c.anchor("vol/A"), Some(sid(1)));
    let acts = c.handle(
        3,
        Event::DeleteRequested {
            volume: "vol".into(),
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
            relationship: "vol/B".into(),
        },
    );
    let to_b: BTreeSet<Uuid> = set_to(&acts, "B")
        .locks
        .iter()
        .map(|l| l.snapshot)
        .collect();
    assert_eq!(
        to_b,
        BTreeSet::from([sid(1), sid(2)]),
        "B gets base and anchor"
    );
    // Survives a restart.
    let r = LockNode::from_bytes(
        NodeConfig::new("C"),
        &c.to_bytes().expect("persist"),
        &lists_of(&c),
    )
    .expect("restore");
    assert_eq!(r.anchor("vol/B"), Some(sid(2)));
    // B force-deleted the anchor. C keeps it, locked: it is what C shares
    // with the nodes above B, and the lock on it still goes to B (with the
    // acknowledgement), which relays it to the nodes above that have it.
    let acts = c.handle(
        5,
        Event::UpstreamSnapshotGone {
            relationship: "vol/B".into(),
            snapshot: sid(2),
        },
    );
    assert_eq!(c.anchor("vol/B"), Some(sid(2)));
    let to_b = set_to(&acts, "B");
    assert_eq!(to_b.gone_acks, vec![sid(2)]);
    assert!(to_b.locks.iter().any(|l| l.snapshot == sid(2)), "{to_b:?}");
    let acts = c.handle(
        6,
        Event::DeleteRequested {
            volume: "vol".into(),
            snapshot: sid(2),
            force: false,
        },
    );
    assert!(matches!(&acts[0], Action::DeleteRefused { .. }), "{acts:?}");
    // The next transfer from B sets the anchor again.
    let _ = c.handle(
        7,
        Event::TransferFinished {
            relationship: "vol/B".into(),
            target: sid(3),
        },
    );
    assert_eq!(c.anchor("vol/B"), Some(sid(3)));
    let acts = c.handle(
        8,
        Event::DeleteRequested {
            volume: "vol".into(),
            snapshot: sid(2),
            force: false,
        },
    );
    assert!(
        matches!(&acts[0], Action::Deleted { .. }),
        "a new anchor lets the old one go: {acts:?}"
    );
}

#[test]
fn claims_60_69_locked_delete_refused_with_holders_forced_is_reported() {
    let mut b = middle();
    let _ = b.handle(
        3,
        Event::DownstreamShared {
            downstream: "C".into(),
            relationship: "v1".into(),
            shared: vec![sid(1)],
        },
    );
    let _ = b.handle(
        3,
        Event::AppLockAdded {
            volume: "v1".into(),
            snapshot: sid(1),
            owner: "report-app".into(),
        },
    );
    let acts = b.handle(
        4,
        Event::DeleteRequested {
            volume: "v1".into(),
            snapshot: sid(1),
            force: false,
        },
    );
    let holders = acts
        .iter()
        .find_map(|a| {
            if let Action::DeleteRefused {
                volume, holders, ..
            } = a
            {
                assert_eq!(volume, "v1");
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
    assert!(b.snapshots("v1").contains(&sid(1)));
    let acts = b.handle(
        5,
        Event::DeleteRequested {
            volume: "v1".into(),
            snapshot: sid(1),
            force: true,
        },
    );
    assert!(acts.iter().any(|a| matches!(a, Action::ForcedDelete { volume, snapshot, holders } if volume == "v1" && *snapshot == sid(1) && holders.len() >= 2)));
    assert!(acts.iter().any(|a| matches!(a, Action::TellSnapshotGone { downstream, relationship, snapshot } if downstream == "C" && relationship == "v1" && *snapshot == sid(1))));
    assert_eq!(b.pending_gone("C", "v1"), vec![sid(1)]);
    assert!(!b.snapshots("v1").contains(&sid(1)));
    // The downstream acknowledges in its next set.
    let _ = b.handle(
        6,
        Event::LockSetReceived {
            set: LockSet {
                gone_acks: vec![sid(1)],
                ..cset(9, 60_000, vec![])
            },
        },
    );
    assert!(b.pending_gone("C", "v1").is_empty());
    // Unlocked snapshot deletes plainly.
    let _ = b.handle(
        7,
        Event::SnapshotCreated {
            volume: "v1".into(),
            snapshot: sid(99),
        },
    );
    let acts = b.handle(
        8,
        Event::DeleteRequested {
            volume: "v1".into(),
            snapshot: sid(99),
            force: false,
        },
    );
    assert!(acts.contains(&Action::Deleted {
        volume: "v1".into(),
        snapshot: sid(99)
    }));
}

#[test]
fn sets_replace_whole_and_older_generations_are_ignored() {
    let mut b = middle();
    let l = |s| c_lock(sid(s), 0);
    let set = |g, locks| cset(g, 60_000, locks);
    let _ = b.handle(
        1,
        Event::LockSetReceived {
            set: set(5, vec![l(1)]),
        },
    );
    assert!(!b.holders("v1", sid(1)).is_empty());
    let _ = b.handle(
        2,
        Event::LockSetReceived {
            set: set(4, vec![]),
        },
    );
    assert!(
        !b.holders("v1", sid(1)).is_empty(),
        "older generation ignored"
    );
    let _ = b.handle(
        3,
        Event::LockSetReceived {
            set: set(5, vec![]),
        },
    );
    assert!(
        !b.holders("v1", sid(1)).is_empty(),
        "equal generation ignored"
    );
    let _ = b.handle(
        4,
        Event::LockSetReceived {
            set: set(6, vec![]),
        },
    );
    assert!(
        b.holders("v1", sid(1)).is_empty(),
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
        ..Bounds::default()
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
        dataset: "C/v".into(),
    };
    let e = l.validate(&b).expect_err("text too long");
    assert!(e.to_string().contains("max_text_len"), "{e}");
    let s = LockSet {
        sender: "C".into(),
        relationship: "v".into(),
        volume: "v".into(),
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
    let _ = b.handle(
        0,
        Event::LockSetReceived {
            set: cset(1, 1_000, vec![c_lock(sid(1), 1_000)]),
        },
    );
    let acts = b.handle(1_000, Event::Tick);
    assert!(acts.iter().any(|a| matches!(a, Action::Stale { downstream, relationship, .. } if downstream == "C" && relationship == "v1")));
    assert_eq!(
        b.stale_downstreams(),
        vec![("C".to_string(), "v1".to_string())]
    );
    let _ = b.handle(1_000_000, Event::Tick);
    assert!(
        !b.holders("v1", sid(1)).is_empty(),
        "Keep policy keeps stale locks"
    );
    // Releasing another relationship of C leaves this one alone.
    let acts = b.handle(
        1_000_001,
        Event::OperatorRelease {
            downstream: "C".into(),
            relationship: Some("v2".into()),
        },
    );
    assert!(!acts.iter().any(|a| matches!(a, Action::Released { .. })));
    assert!(!b.holders("v1", sid(1)).is_empty());
    let acts = b.handle(
        1_000_001,
        Event::OperatorRelease {
            downstream: "C".into(),
            relationship: None,
        },
    );
    assert!(acts.contains(&Action::Released {
        downstream: "C".into(),
        relationship: "v1".into(),
        reason: ReleaseReason::Operator
    }));
    assert!(b.holders("v1", sid(1)).is_empty());

    let mut r = LockNode::new(NodeConfig {
        policy: LeasePolicy::ReleaseAfter { grace_ms: 500 },
        ..NodeConfig::new("B")
    });
    down(&mut r, "C");
    let _ = r.handle(
        0,
        Event::SnapshotCreated {
            volume: "v1".into(),
            snapshot: sid(1),
        },
    );
    let _ = r.handle(
        0,
        Event::DownstreamShared {
            downstream: "C".into(),
            relationship: "v1".into(),
            shared: vec![sid(1)],
        },
    );
    assert!(!r.holders("v1", sid(1)).is_empty());
    let acts = r.handle(60_000 + 500, Event::Tick);
    assert!(acts.iter().any(|a| matches!(a, Action::Stale { .. })));
    assert!(acts.contains(&Action::Released {
        downstream: "C".into(),
        relationship: "v1".into(),
        reason: ReleaseReason::LeaseExpired
    }));
    assert!(r.holders("v1", sid(1)).is_empty());
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
    down(&mut r, "C");
    let _ = r.handle(
        0,
        Event::SnapshotCreated {
            volume: "v1".into(),
            snapshot: sid(1),
        },
    );
    let set = |generation| cset(generation, 1_000, vec![c_lock(sid(1), 1_000)]);
    let _ = r.handle(0, Event::LockSetReceived { set: set(5) });
    assert!(!r.holders("v1", sid(1)).is_empty());
    let acts = r.handle(1_500, Event::Tick);
    assert!(acts.contains(&Action::Released {
        downstream: "C".into(),
        relationship: "v1".into(),
        reason: ReleaseReason::LeaseExpired
    }));
    assert!(r.holders("v1", sid(1)).is_empty());
    let _ = r.handle(1_600, Event::LockSetReceived { set: set(4) });
    assert!(
        r.holders("v1", sid(1)).is_empty(),
        "an older set stays ignored"
    );
    let _ = r.handle(1_700, Event::LockSetReceived { set: set(6) });
    assert!(
        !r.holders("v1", sid(1)).is_empty(),
        "a newer set locks again"
    );
}

#[test]
fn lock_table_persists_restores_and_rejects_garbage() {
    let mut b = middle();
    let _ = b.handle(
        3,
        Event::AppLockAdded {
            volume: "v1".into(),
            snapshot: sid(1),
            owner: "x".into(),
        },
    );
    let _ = b.handle(
        3,
        Event::DownstreamShared {
            downstream: "C".into(),
            relationship: "v1".into(),
            shared: vec![sid(2)],
        },
    );
    let g1 = set_to(
        &b.handle(
            4,
            Event::TransferStarting {
                relationship: "v1".into(),
            },
        ),
        "A",
    )
    .generation;
    let bytes = b.to_bytes().expect("persist");
    let mut r = LockNode::from_bytes(NodeConfig::new("B"), &bytes, &lists_of(&b)).expect("restore");
    assert_eq!(r.all_locks(), b.all_locks());
    assert_eq!(r.snapshots("v1"), b.snapshots("v1"));
    let g2 = set_to(&r.handle(5, Event::Restarted), "A").generation;
    assert!(g2 > g1, "generations keep increasing across a restart");
    assert!(
        LockNode::from_bytes(NodeConfig::new("B"), b"garbage!garbage", &BTreeMap::new()).is_err()
    );
    assert!(LockNode::from_bytes(
        NodeConfig::new("B"),
        &bytes[..bytes.len() / 2],
        &BTreeMap::new()
    )
    .is_err());
    assert!(LockNode::from_bytes(NodeConfig::new("other"), &bytes, &BTreeMap::new()).is_err());
    let mut v = bytes.clone();
    v[4] = 99;
    assert!(matches!(
        LockNode::from_bytes(NodeConfig::new("B"), &v, &BTreeMap::new()),
        Err(LockError::PersistedVersion { .. })
    ));
}

/// Everything a node knows, as its accessors show it (to compare a table
/// with its restored copy).
fn observed(n: &LockNode) -> String {
    let mut s = String::new();
    for v in n.volumes() {
        s += &format!("volume {v:?}: {:?}\n", n.snapshots(&v));
        for snap in n.snapshots(&v) {
            s += &format!("  holders {snap}: {:?}\n", n.holders(&v, *snap));
        }
    }
    for r in n.upstream_relationships() {
        s += &format!(
            "up {r:?} from {:?} base {:?} anchor {:?}\n",
            n.upstream_of(&r),
            n.next_base(&r),
            n.anchor(&r)
        );
    }
    for ((d, r), v) in n.downstreams() {
        s += &format!(
            "down {d}:{r} volume {v:?} pending gone {:?}\n",
            n.pending_gone(&d, &r)
        );
    }
    s += &format!(
        "stale {:?}\nall {:?}\n",
        n.stale_downstreams(),
        n.all_locks()
    );
    s
}

/// Format 4 keys everything by relationship and snapshots by volume: a
/// table with several relationships to one upstream, one to another
/// upstream into a qtree, several downstream relationships (one stale, one
/// with a force-deleted snapshot not acknowledged yet), application locks
/// in two volumes and one snapshot id in two volumes comes back the same,
/// and after the restart every relationship gets its own set again.
#[test]
fn lock_table_format_4_round_trips_several_relationships() {
    let mut b = node("B");
    up_rel(&mut b, "v1", "A", "v1", "v1");
    up_rel(&mut b, "v2", "A", "v2", "v2");
    let _ = b.handle(
        0,
        Event::UpstreamAdded {
            relationship: "qv/db".into(),
            upstream: "A2".into(),
            source: "db".into(),
            volume: "qv".into(),
            kind: LockKind::QtreeName,
        },
    );
    for (d, r, v) in [("C", "v1", "v1"), ("C", "c2", "v2"), ("D", "d", "qv")] {
        let _ = b.handle(
            0,
            Event::DownstreamAdded {
                downstream: d.into(),
                relationship: r.into(),
                volume: v.into(),
            },
        );
    }
    for (rel, snaps) in [
        ("v1", vec![sid(11), sid(12)]),
        ("v2", vec![sid(21), sid(22)]),
        ("qv/db", vec![sid(12), sid(31)]),
    ] {
        let _ = b.handle(
            10,
            Event::UpstreamSnapshots {
                relationship: rel.into(),
                snapshots: snaps.clone(),
            },
        );
        for (t, s) in snaps.into_iter().enumerate() {
            let _ = b.handle(
                20 + t as u64,
                Event::TransferFinished {
                    relationship: rel.into(),
                    target: s,
                },
            );
        }
    }
    // sid(12) is in v1 and in qv.
    assert!(b.has_snapshot("v1", sid(12)) && b.has_snapshot("qv", sid(12)));
    let _ = b.handle(
        30,
        Event::DownstreamShared {
            downstream: "C".into(),
            relationship: "v1".into(),
            shared: vec![sid(11), sid(12)],
        },
    );
    let _ = b.handle(
        31,
        Event::LockSetReceived {
            set: cset(3, 60_000, vec![c_lock(sid(11), 60_000)]),
        },
    );
    let _ = b.handle(
        32,
        Event::LockSetReceived {
            set: LockSet {
                relationship: "c2".into(),
                volume: "v2".into(),
                lease_ms: 100,
                ..cset(4, 60_000, vec![c_lock(sid(21), 100)])
            },
        },
    );
    let _ = b.handle(
        33,
        Event::DownstreamShared {
            downstream: "D".into(),
            relationship: "d".into(),
            shared: vec![sid(12)],
        },
    );
    for (v, s, o) in [("v2", sid(22), "app-v2"), ("qv", sid(31), "app-qv")] {
        let _ = b.handle(
            34,
            Event::AppLockAdded {
                volume: v.into(),
                snapshot: s,
                owner: o.into(),
            },
        );
    }
    let _ = b.handle(
        35,
        Event::DeleteRequested {
            volume: "qv".into(),
            snapshot: sid(12),
            force: true,
        },
    );
    let _ = b.handle(200, Event::Tick);
    assert_eq!(b.pending_gone("D", "d"), vec![sid(12)]);
    assert!(
        b.pending_gone("C", "v1").is_empty(),
        "C shares v1@12, not qv@12"
    );
    assert_eq!(
        b.stale_downstreams(),
        vec![("C".to_string(), "c2".to_string())]
    );
    assert!(b.has_snapshot("v1", sid(12)) && !b.has_snapshot("qv", sid(12)));
    let before = observed(&b);
    let bytes = b.to_bytes().expect("persist");
    assert_eq!(
        &bytes[4..6],
        &sluice_lockproto::node::PERSIST_VERSION.to_le_bytes()
    );
    let mut r = LockNode::from_bytes(NodeConfig::new("B"), &bytes, &lists_of(&b)).expect("restore");
    assert_eq!(observed(&r), before);
    // And again: a restored table writes itself back the same.
    let again = LockNode::from_bytes(
        NodeConfig::new("B"),
        &r.to_bytes().expect("persist"),
        &lists_of(&r),
    )
    .expect("restore");
    assert_eq!(observed(&again), before);
    let mut sent: Vec<(String, String, String)> = sets(&r.handle(300, Event::Restarted))
        .into_iter()
        .map(|(u, s)| (u, s.relationship, s.volume))
        .collect();
    sent.sort();
    assert_eq!(
        sent,
        vec![
            ("A".into(), "v1".into(), "v1".into()),
            ("A".into(), "v2".into(), "v2".into()),
            ("A2".into(), "qv/db".into(), "db".into()),
        ],
        "one set per relationship after the restart"
    );
}

/// The bytes of a hex fixture file.
fn hex_fixture(text: &str) -> Vec<u8> {
    let hex = text.trim();
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex fixture"))
        .collect()
}

/// The holders of `volume@s` as (origin, text).
fn holder_names(n: &LockNode, volume: &str, s: Uuid) -> Vec<(String, String)> {
    n.holders(volume, s)
        .iter()
        .map(|h| (h.lock.origin_node.clone(), h.lock.text.clone()))
        .collect()
}

/// The start events of the replicator for an upgraded table of the
/// fixtures' node B: the engine's snapshots of volume `volume`, then its
/// relationship `relationship` pulling A's `v1` (the source an old table did
/// not know).
fn start(n: &mut LockNode, now: u64, relationship: &str, volume: &str) -> Vec<Action> {
    let mut acts = n.handle(
        now,
        Event::VolumeSnapshots {
            volume: volume.into(),
            snapshots: vec![sid(1), sid(2)],
        },
    );
    acts.extend(n.handle(
        now,
        Event::UpstreamAdded {
            relationship: relationship.into(),
            upstream: "A".into(),
            source: "v1".into(),
            volume: volume.into(),
            kind: LockKind::DestinationPath,
        },
    ));
    acts
}

/// A lock table written by format version 1 (before the anchor, by commit
/// 253f134: B mirrors A with snapshots 1 and 2 as relationship text
/// "B:/vol/v1", shares 1 with C, an app lock on 2) still restores: same
/// locks, anchors unknown until the next transfer; it is written back as
/// the current version. The upgrade makes the lock text's path
/// (`vol/v1`, writing volume `vol`) the relationship; its snapshots and
/// application lock wait in volume "" (still protected) until the engine
/// lists volume `vol`.
#[test]
fn lock_table_version_1_still_restores() {
    let bytes = hex_fixture(include_str!("golden/lock_table_v1.hex"));
    assert_eq!(&bytes[4..6], &1u16.to_le_bytes(), "fixture is version 1");
    let mut r =
        LockNode::from_bytes(NodeConfig::new("B"), &bytes, &BTreeMap::new()).expect("restore v1");
    assert_eq!(r.snapshots(""), &[sid(1), sid(2)]);
    assert_eq!(r.upstream_relationships(), vec!["vol/v1".to_string()]);
    assert_eq!(r.upstream_of("vol/v1"), Some("A"));
    assert_eq!(
        holder_names(&r, "", sid(1)),
        vec![("C".into(), "base of mirror to C".into())]
    );
    assert_eq!(
        holder_names(&r, "", sid(2)),
        vec![("B".into(), "backup".into())]
    );
    let _ = r.handle(
        5,
        Event::VolumeSnapshots {
            volume: "vol".into(),
            snapshots: vec![sid(1), sid(2)],
        },
    );
    assert_eq!(r.snapshots("vol"), &[sid(1), sid(2)]);
    assert!(r.snapshots("").is_empty() && r.holders("", sid(2)).is_empty());
    assert_eq!(r.next_base("vol/v1"), Some(sid(2)));
    assert_eq!(r.anchor("vol/v1"), None);
    assert_eq!(
        holder_names(&r, "vol", sid(1)),
        vec![("C".into(), "base of mirror to C".into())]
    );
    let h2 = r.holders("vol", sid(2));
    assert_eq!(h2.len(), 2, "own base and app lock: {h2:?}");
    assert!(h2
        .iter()
        .any(|h| h.lock.text == "backup" && h.lock.dataset == "B/vol"));
    assert!(h2.iter().any(|h| h.lock.text == "B:vol/v1"));
    // The relationship learns its source (and, at the first pull, what the
    // source has); see `upgraded_table_keeps_its_bases_while_the_source_is_learnt`
    // for the protections in between.
    let _ = start(&mut r, 5, "vol/v1", "vol");
    let _ = r.handle(
        5,
        Event::UpstreamSnapshots {
            relationship: "vol/v1".into(),
            snapshots: vec![sid(1), sid(2)],
        },
    );
    assert_eq!(r.next_base("vol/v1"), Some(sid(2)));
    assert_eq!(r.holders("vol", sid(2)).len(), 2, "own base and app lock");
    let _ = r.handle(
        5,
        Event::TransferFinished {
            relationship: "vol/v1".into(),
            target: sid(3),
        },
    );
    assert_eq!(r.anchor("vol/v1"), Some(sid(3)));
    let again = r.to_bytes().expect("persist");
    assert_eq!(
        &again[4..6],
        &sluice_lockproto::node::PERSIST_VERSION.to_le_bytes()
    );
    let back =
        LockNode::from_bytes(NodeConfig::new("B"), &again, &lists_of(&r)).expect("restore v4");
    assert_eq!(back.anchor("vol/v1"), Some(sid(3)));
    assert_eq!(back.snapshots("vol"), &[sid(1), sid(2), sid(3)]);
}

/// The locks of `n` as (text, created, renewed), sorted.
fn dates(n: &LockNode) -> Vec<(String, u64, u64)> {
    let mut v: Vec<(String, u64, u64)> = n
        .all_locks()
        .iter()
        .map(|h| (h.lock.text.clone(), h.lock.created_ms, h.lock.renewed_ms))
        .collect();
    v.sort();
    v
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
    let mut r =
        LockNode::from_bytes(NodeConfig::new("B"), &bytes, &BTreeMap::new()).expect("restore v2");
    assert_eq!(r.snapshots(""), &[sid(1), sid(2)]);
    let _ = start(&mut r, 5000, "vol/v1", "vol");
    assert_eq!(r.snapshots("vol"), &[sid(1), sid(2)]);
    assert_eq!(r.anchor("vol/v1"), Some(sid(2)));
    assert_eq!(
        holder_names(&r, "vol", sid(1)),
        vec![("C".into(), "base of mirror to C".into())]
    );
    assert_eq!(r.holders("vol", sid(2)).len(), 2, "own anchor and app lock");
    let _ = r.handle(5000, Event::Restarted);
    assert_eq!(
        dates(&r),
        vec![
            ("B:vol/v1".into(), 5000, 5000),
            ("backup-app".into(), 1004, 1004),
            ("base of mirror to C".into(), 5000, 5000),
        ],
        "derived locks dated from the restore, app lock keeps its date"
    );
    let _ = r.handle(6000, Event::Tick);
    let again = r.to_bytes().expect("persist");
    assert_eq!(
        &again[4..6],
        &sluice_lockproto::node::PERSIST_VERSION.to_le_bytes()
    );
    let mut back =
        LockNode::from_bytes(NodeConfig::new("B"), &again, &lists_of(&r)).expect("restore v4");
    let _ = back.handle(7000, Event::Restarted);
    let kept: Vec<(String, u64)> = dates(&back).into_iter().map(|(t, c, _)| (t, c)).collect();
    assert_eq!(
        kept,
        vec![
            ("B:vol/v1".into(), 5000),
            ("backup-app".into(), 1004),
            ("base of mirror to C".into(), 5000),
        ],
        "dates survive a restart"
    );
}

/// A lock table written by format version 3 (keyed by peer node, by commit
/// 11e11a8, the last before relationships: B mirrors A as relationship text
/// "B:v1", the replicator's form, with snapshots 1 (t=1001) and 2 (t=1002),
/// shares 1 with C (t=1003), an app lock "backup-app" on 2 (t=1004), and
/// C's set (generation 7, t=1005) locks 1 for C ("C:c1") and relays D's
/// lock "D:d1" (renewed by D at t=950)) still restores: relationship `v1`
/// with its anchor, every lock with its date, C's old per-node set holding
/// 1 in volume `v1`; after the first pull B's set to A carries all of it;
/// written back as the current version.
#[test]
fn lock_table_version_3_still_restores() {
    let bytes = hex_fixture(include_str!("golden/lock_table_v3.hex"));
    assert_eq!(&bytes[4..6], &3u16.to_le_bytes(), "fixture is version 3");
    let mut r =
        LockNode::from_bytes(NodeConfig::new("B"), &bytes, &BTreeMap::new()).expect("restore v3");
    assert_eq!(r.snapshots(""), &[sid(1), sid(2)]);
    assert_eq!(r.upstream_relationships(), vec!["v1".to_string()]);
    assert_eq!(r.upstream_of("v1"), Some("A"));
    assert_eq!(r.downstreams(), vec![(("C".into(), String::new()), None)]);
    let _ = start(&mut r, 5000, "v1", "v1");
    assert_eq!(r.snapshots("v1"), &[sid(1), sid(2)]);
    assert_eq!(r.anchor("v1"), Some(sid(2)));
    let mut h1 = holder_names(&r, "v1", sid(1));
    h1.sort();
    assert_eq!(
        h1,
        vec![
            ("C".into(), "C:c1".into()),
            ("C".into(), "base of mirror to C".into()),
            ("D".into(), "D:d1".into()),
        ]
    );
    assert_eq!(r.holders("v1", sid(2)).len(), 2, "own anchor and app lock");
    assert_eq!(
        dates(&r),
        vec![
            ("B:v1".into(), 1002, 1002),
            ("C:c1".into(), 1005, 1005),
            ("D:d1".into(), 950, 950),
            ("backup-app".into(), 1004, 1004),
            ("base of mirror to C".into(), 1003, 1005),
        ],
        "every lock keeps its date"
    );
    // The first pull: what A has, then the set before the transfer.
    let _ = r.handle(
        5001,
        Event::UpstreamSnapshots {
            relationship: "v1".into(),
            snapshots: vec![sid(1), sid(2)],
        },
    );
    assert_eq!(r.next_base("v1"), Some(sid(2)));
    let to_a = set_to(
        &r.handle(
            5002,
            Event::TransferStarting {
                relationship: "v1".into(),
            },
        ),
        "A",
    );
    assert_eq!(
        (to_a.relationship.as_str(), to_a.volume.as_str()),
        ("v1", "v1")
    );
    let mut carried: Vec<(u128, String, Vec<String>)> = to_a
        .locks
        .iter()
        .map(|l| (l.snapshot.as_u128(), l.text.clone(), l.hop_path.clone()))
        .collect();
    carried.sort();
    let hops = |h: &[&str]| h.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        carried,
        vec![
            (1, "C:c1".into(), hops(&["C", "B"])),
            (1, "D:d1".into(), hops(&["D", "C", "B"])),
            (1, "base of mirror to C".into(), hops(&["B"])),
            (2, "B:v1".into(), hops(&["B"])),
            (2, "backup-app".into(), hops(&["B"])),
        ]
    );
    let again = r.to_bytes().expect("persist");
    assert_eq!(
        &again[4..6],
        &sluice_lockproto::node::PERSIST_VERSION.to_le_bytes()
    );
    let back =
        LockNode::from_bytes(NodeConfig::new("B"), &again, &lists_of(&r)).expect("restore v4");
    assert_eq!(observed(&back), observed(&r));
}

/// Regression (found while porting to per-relationship keys): an upgraded
/// table's relationship learns its source volume from the first
/// `UpstreamAdded` after the restart, and `add_upstream` treats that like a
/// retarget: it forgets what the (same) upstream has. Until the first pull
/// brings `UpstreamSnapshots`, the next base is unknown: a format-1 table
/// (no anchor) leaves B's base with A unprotected (the old test asserted
/// "own base and app lock"), and every upgraded table sends A an empty set,
/// which releases on A every lock B relays (C's and D's here).
#[test]
fn upgraded_table_keeps_its_bases_while_the_source_is_learnt() {
    let v1 = hex_fixture(include_str!("golden/lock_table_v1.hex"));
    let mut r =
        LockNode::from_bytes(NodeConfig::new("B"), &v1, &BTreeMap::new()).expect("restore v1");
    let _ = start(&mut r, 5, "vol/v1", "vol");
    assert_eq!(r.next_base("vol/v1"), Some(sid(2)), "v1 table: next base");
    assert_eq!(
        r.holders("vol", sid(2)).len(),
        2,
        "v1 table: own base and app lock"
    );
    let v3 = hex_fixture(include_str!("golden/lock_table_v3.hex"));
    let mut r =
        LockNode::from_bytes(NodeConfig::new("B"), &v3, &BTreeMap::new()).expect("restore v3");
    let mut acts = start(&mut r, 5000, "v1", "v1");
    acts.extend(r.handle(5000, Event::Restarted));
    for (u, set) in sets(&acts) {
        assert_eq!(u, "A");
        let snaps: BTreeSet<Uuid> = set.locks.iter().map(|l| l.snapshot).collect();
        assert_eq!(
            snaps,
            BTreeSet::from([sid(1), sid(2)]),
            "v3 table: every set to A still names C's base and B's: {set:?}"
        );
    }
}

/// Regression (found while porting to per-relationship keys): an upgraded
/// table keeps each downstream node's old set under relationship "" until
/// that node sends per-relationship sets. The first per-relationship set
/// from the node drops the old set whole, also the locks it held for the
/// node's other relationships, which have not sent their set yet. Here C's
/// old set locks v1@1 (its mirror `v1`, and D's lock relayed through it);
/// C's set for another relationship (`c2`, pulling B's `v2`) arrives first
/// and v1@1 is deletable before C's `v1` set arrives.
#[test]
fn upgraded_downstream_set_stays_until_the_relationship_it_covers_sends() {
    let v3 = hex_fixture(include_str!("golden/lock_table_v3.hex"));
    let mut r =
        LockNode::from_bytes(NodeConfig::new("B"), &v3, &BTreeMap::new()).expect("restore v3");
    let _ = start(&mut r, 5000, "v1", "v1");
    let _ = r.handle(
        5000,
        Event::VolumeSnapshots {
            volume: "v2".into(),
            snapshots: vec![sid(50)],
        },
    );
    for (rel, vol) in [("v1", "v1"), ("c2", "v2")] {
        let _ = r.handle(
            5000,
            Event::DownstreamAdded {
                downstream: "C".into(),
                relationship: rel.into(),
                volume: vol.into(),
            },
        );
    }
    let _ = r.handle(
        5001,
        Event::LockSetReceived {
            set: LockSet {
                relationship: "c2".into(),
                volume: "v2".into(),
                ..cset(1 << 40, 60_000, vec![c_lock(sid(50), 60_000)])
            },
        },
    );
    assert!(!r.holders("v2", sid(50)).is_empty());
    let acts = r.handle(
        5002,
        Event::DeleteRequested {
            volume: "v1".into(),
            snapshot: sid(1),
            force: false,
        },
    );
    assert!(
        matches!(&acts[0], Action::DeleteRefused { holders, .. } if holders.iter().any(|h| h.origin_node == "D")),
        "C's v1 has not sent its set yet: its old set still protects v1@1: {acts:?}"
    );
}

/// Every lock a node lists carries the real moment it started to hold its
/// snapshot: own bases from when they became the base, shared bases from
/// when the snapshot was first shared (renewed with the downstream's set),
/// and a base that moves on gets the new moment.
#[test]
fn derived_locks_are_dated_from_when_they_started_to_hold() {
    let mut b = node("B");
    let _ = b.handle(
        100,
        Event::UpstreamAdded {
            relationship: "v1".into(),
            upstream: "A".into(),
            source: "v1".into(),
            volume: "v1".into(),
            kind: LockKind::DestinationPath,
        },
    );
    let _ = b.handle(
        100,
        Event::DownstreamAdded {
            downstream: "C".into(),
            relationship: "v1".into(),
            volume: "v1".into(),
        },
    );
    let _ = b.handle(
        200,
        Event::TransferFinished {
            relationship: "v1".into(),
            target: sid(1),
        },
    );
    let _ = b.handle(
        300,
        Event::DownstreamShared {
            downstream: "C".into(),
            relationship: "v1".into(),
            shared: vec![sid(1)],
        },
    );
    let _ = b.handle(400, Event::Tick);
    let find = |n: &LockNode, text: &str| {
        n.all_locks()
            .into_iter()
            .map(|h| h.lock)
            .find(|l| l.text == text)
            .unwrap_or_else(|| panic!("no lock {text:?}: {:?}", n.all_locks()))
    };
    let own = find(&b, "B:v1");
    assert_eq!(
        (own.snapshot, own.created_ms, own.renewed_ms),
        (sid(1), 200, 200)
    );
    let shared = find(&b, "base of mirror to C:v1");
    assert_eq!(shared.created_ms, 300);
    assert!(shared.renewed_ms >= 300, "{shared:?}");
    let _ = b.handle(
        500,
        Event::TransferFinished {
            relationship: "v1".into(),
            target: sid(2),
        },
    );
    let own = find(&b, "B:v1");
    assert_eq!((own.snapshot, own.created_ms), (sid(2), 500));
    let s = set_to(
        &b.handle(
            600,
            Event::TransferStarting {
                relationship: "v1".into(),
            },
        ),
        "A",
    );
    let sent = s.locks.iter().find(|l| l.snapshot == sid(2)).unwrap();
    assert_eq!((sent.created_ms, sent.renewed_ms), (500, 600));
}

#[test]
fn propagation_off_sends_empty_sets() {
    let mut b = middle();
    b.set_propagate(false);
    let _ = b.handle(
        3,
        Event::DownstreamShared {
            downstream: "C".into(),
            relationship: "v1".into(),
            shared: vec![sid(1)],
        },
    );
    let s = sets(&b.handle(
        4,
        Event::TransferStarting {
            relationship: "v1".into(),
        },
    ));
    assert!(s[0].1.locks.is_empty());
    assert!(
        !b.holders("v1", sid(2)).is_empty(),
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
            relationship: "v1".into(),
            shared: vec![sid(1)],
        },
    );
    assert!(acts.iter().any(|a| matches!(a, Action::Protected { volume, snapshot, holders } if volume == "v1" && *snapshot == sid(1) && holders.iter().any(|h| h.origin_node == "C"))));
    let acts = b.handle(
        4,
        Event::DownstreamRemoved {
            downstream: "C".into(),
            relationship: "v1".into(),
        },
    );
    assert!(acts.contains(&Action::Released {
        downstream: "C".into(),
        relationship: "v1".into(),
        reason: ReleaseReason::RelationshipRemoved
    }));
    assert!(acts.contains(&Action::Unprotected {
        volume: "v1".into(),
        snapshot: sid(1)
    }));
    assert!(
        b.preview_delete("v1", &[sid(1), sid(2)])
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
            let r = to.handle(now, Event::LockSetReceived { set });
            assert!(
                !r.iter().any(|a| matches!(a, Action::SetRejected { .. })),
                "{r:?}"
            );
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
        let _ = a.handle(
            0,
            Event::SnapshotCreated {
                volume: "v1".into(),
                snapshot: s1,
            },
        );
        down(&mut a, "B");
        down(&mut b, "C");
        up(&mut b, "A");
        up(&mut c, "B");
        let _ = b.handle(
            0,
            Event::UpstreamSnapshots {
                relationship: "v1".into(),
                snapshots: vec![s1],
            },
        );
        let acts = b.handle(
            10,
            Event::TransferFinished {
                relationship: "v1".into(),
                target: s1,
            },
        );
        deliver_to(&mut a, 10, &acts);
        let _ = c.handle(
            20,
            Event::UpstreamSnapshots {
                relationship: "v1".into(),
                snapshots: vec![s1],
            },
        );
        let acts = c.handle(
            20,
            Event::TransferFinished {
                relationship: "v1".into(),
                target: s1,
            },
        );
        let relay = b.handle(
            20,
            Event::DownstreamShared {
                downstream: "C".into(),
                relationship: "v1".into(),
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
        let c_on_a = |a: &LockNode| -> Vec<Held> {
            a.all_locks()
                .into_iter()
                .filter(|h| h.lock.origin_node == "C")
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
            if acts.iter().any(|x| {
                matches!(x, Action::Stale { downstream, relationship, .. } if downstream == "C" && relationship == "v1")
            }) {
                b_stale_at.get_or_insert(t);
            }
            deliver_to(&mut a, t, &acts);
            let acts = a.handle(t, Event::Tick);
            assert!(
                a.stale_downstreams().is_empty(),
                "B renews: its set is fresh on A"
            );
            a_relayed_stale |= acts.iter().any(|x| {
                matches!(x, Action::RelayedStale { downstream, relationship, origin, .. } if downstream == "B" && relationship == "v1" && origin == "C")
            });
            a_released |= acts.iter().any(|x| {
                matches!(x, Action::RelayedReleased { downstream, relationship, origin, .. } if downstream == "B" && relationship == "v1" && origin == "C")
            });
            let on_a = c_on_a(&a);
            // Never renewed after C died, on any node.
            for h in &on_a {
                assert!(
                    h.lock.renewed_ms <= died,
                    "A shows C's lock renewed at {} after C died at {died}: {}",
                    h.lock.renewed_ms,
                    h.lock
                );
            }
            if t < died {
                assert!(!on_a.is_empty());
                assert!(
                    on_a.iter().all(|h| !a.is_stale(h, t)),
                    "t={t}: C alive but its locks look stale on A"
                );
            }
            if b_stale_at.is_some() {
                // B knows: C's locks are stale on B and on A.
                assert!(b
                    .all_locks()
                    .iter()
                    .filter(|h| h.lock.origin_node == "C")
                    .all(|h| b.is_stale(h, t)));
                assert!(
                    on_a.iter().all(|h| a.is_stale(h, t)),
                    "t={t}: B marked C stale, A shows C's locks active"
                );
            }
        }
        assert!(b_stale_at.is_some(), "B marks C stale after its lease");
        assert!(a_relayed_stale, "A reports C's relayed locks stale");
        // B (Keep) still holds and relays them.
        assert!(!b
            .holders("v1", s1)
            .iter()
            .all(|h| h.lock.origin_node != "C"));
        match a_policy {
            LeasePolicy::Keep => {
                assert!(!a_released);
                assert!(!c_on_a(&a).is_empty(), "Keep: C's locks stay on A, stale");
            }
            LeasePolicy::ReleaseAfter { .. } => {
                assert!(a_released, "A releases C's locks by C's renewal time");
                assert!(c_on_a(&a).is_empty(), "released on A: {:?}", c_on_a(&a));
                // B's own base lock still holds s1 on A.
                assert!(a
                    .holders("v1", s1)
                    .iter()
                    .any(|h| h.lock.origin_node == "B"));
            }
        }
    }
}

/// A node's snapshots per volume, as the pool would hand them to a
/// restored table (`LockNode::from_bytes`).
fn lists_of(n: &LockNode) -> BTreeMap<String, Vec<Uuid>> {
    n.volumes()
        .into_iter()
        .map(|v| {
            let s = n.snapshots(&v).to_vec();
            (v, s)
        })
        .collect()
}
