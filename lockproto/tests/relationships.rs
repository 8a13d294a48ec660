//! Per-relationship soft locks: a node pulls several volumes from one
//! upstream, one snapshot id lives in two local volumes, sets name the
//! volume they lock, big sets travel whole (in parts), relationships move
//! to another upstream or end. Each test tells the bug it guards.
// Tests and benchmarks may panic (the crate denies it elsewhere).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeSet;

use rkyv::rancor;
use sluice_lockproto::node::PERSIST_VERSION;
use sluice_lockproto::wire::{
    PersistApp, PersistLocal, PersistNode, PersistUp, SetAssembler, WireLock, WireLockSet,
    MAX_BODY_LEN, SET_PARTS_MAX,
};
use sluice_lockproto::{
    decode, encode, next_shared, Action, Bounds, Event, Held, LockError, LockKind, LockNode,
    LockSet, Message, NodeConfig, SoftLock,
};
use uuid::Uuid;

fn sid(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

fn node(name: &str) -> LockNode {
    LockNode::new(NodeConfig::new(name))
}

/// The sets in `acts`, as (upstream node, set); checks the action's
/// relationship is the set's.
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

/// `n` pulls `upstream`'s volume `source` into its `volume` as `relationship`.
fn pull(
    n: &mut LockNode,
    relationship: &str,
    upstream: &str,
    source: &str,
    volume: &str,
) -> Vec<Action> {
    n.handle(
        0,
        Event::UpstreamAdded {
            relationship: relationship.into(),
            upstream: upstream.into(),
            source: source.into(),
            volume: volume.into(),
            kind: LockKind::DestinationPath,
        },
    )
}

/// `downstream` pulls our `volume` as its `relationship`.
fn serve(n: &mut LockNode, downstream: &str, relationship: &str, volume: &str) {
    let _ = n.handle(
        0,
        Event::DownstreamAdded {
            downstream: downstream.into(),
            relationship: relationship.into(),
            volume: volume.into(),
        },
    );
}

fn volume(n: &mut LockNode, volume: &str, snapshots: &[Uuid]) {
    let _ = n.handle(
        0,
        Event::VolumeSnapshots {
            volume: volume.into(),
            snapshots: snapshots.to_vec(),
        },
    );
}

/// Deliver every set of `acts` addressed to `to`; none may be rejected.
fn deliver(to: &mut LockNode, now: u64, acts: &[Action]) -> Vec<Action> {
    let me = to.config().node_id.clone();
    let mut out = Vec::new();
    for (u, set) in sets(acts) {
        if u == me {
            let r = to.handle(now, Event::LockSetReceived { set });
            assert!(
                !r.iter().any(|a| matches!(a, Action::SetRejected { .. })),
                "{r:?}"
            );
            out.extend(r);
        }
    }
    out
}

fn delete(n: &mut LockNode, volume: &str, snapshot: Uuid, force: bool) -> Vec<Action> {
    n.handle(
        100,
        Event::DeleteRequested {
            volume: volume.into(),
            snapshot,
            force,
        },
    )
}

fn refused(acts: &[Action]) -> Option<Vec<SoftLock>> {
    acts.iter().find_map(|a| match a {
        Action::DeleteRefused { holders, .. } => Some(holders.clone()),
        _ => None,
    })
}

fn deleted(acts: &[Action], volume: &str, snapshot: Uuid) -> bool {
    acts.contains(&Action::Deleted {
        volume: volume.into(),
        snapshot,
    })
}

/// The bug (production): node B pulled volumes v1, v2 and v3 from node A.
/// The lock table keyed upstreams by node, so the three relationships were
/// one entry with one next base: the newest snapshot of B's (one) list that
/// A had, the base of whichever relationship transferred last. B's one set
/// to A locked only that base, A's retention deleted the bases of the other
/// two, and their next transfers had no common snapshot (full copies). Each
/// relationship must lock its own base in its own set, and A keep them all.
#[test]
fn several_relationships_with_one_upstream_each_lock_their_own_base() {
    let mut a = node("A");
    let mut b = node("B");
    let vols = [("v1", 11, 12), ("v2", 21, 22), ("v3", 31, 32)];
    let mut to_a = Vec::new();
    for (v, old, base) in vols {
        volume(&mut a, v, &[sid(old), sid(base)]);
        serve(&mut a, "B", v, v);
        to_a.extend(pull(&mut b, v, "A", v, v));
        to_a.extend(b.handle(
            1,
            Event::UpstreamSnapshots {
                relationship: v.into(),
                snapshots: vec![sid(old), sid(base)],
            },
        ));
        for (t, s) in [(2, old), (3, base)] {
            to_a.extend(b.handle(
                t,
                Event::TransferFinished {
                    relationship: v.into(),
                    target: sid(s),
                },
            ));
        }
    }
    // The newest set of each relationship, as A ends up with it.
    let sent = sets(&to_a);
    for (v, _, base) in vols {
        assert_eq!(b.next_base(v), Some(sid(base)));
        let last = sent
            .iter()
            .filter(|(_, s)| s.relationship == v)
            .max_by_key(|(_, s)| s.generation)
            .unwrap_or_else(|| panic!("no set for {v}"));
        assert_eq!(last.0, "A");
        assert_eq!(last.1.volume, v, "the set locks A's {v}");
        let own: Vec<&SoftLock> = last
            .1
            .locks
            .iter()
            .filter(|l| l.origin_node == "B")
            .collect();
        assert_eq!(own.len(), 1, "{v}: {own:?}");
        assert_eq!(
            (
                own[0].snapshot,
                own[0].text.as_str(),
                own[0].dataset.as_str()
            ),
            (
                sid(base),
                format!("B:{v}").as_str(),
                format!("B/{v}").as_str()
            )
        );
        // Nothing of another relationship rides in this one's set.
        assert!(last.1.locks.iter().all(|l| l.snapshot == sid(base)));
    }
    deliver(&mut a, 4, &to_a);
    for (v, old, base) in vols {
        let h = refused(&delete(&mut a, v, sid(base), false))
            .unwrap_or_else(|| panic!("A deleted {v}'s base"));
        assert!(
            h.iter()
                .any(|l| l.origin_node == "B" && l.text == format!("B:{v}")),
            "{v}: {h:?}"
        );
        assert!(
            deleted(&delete(&mut a, v, sid(old), false), v, sid(old)),
            "{v}: the older snapshot is nobody's base"
        );
    }
}

/// The bug (seed 1006958 of the cascade simulation): the source set what it
/// shares with a downstream relationship from every set that arrived, even
/// one the table ignored as older than the last. A set delivered late moved
/// the "base of mirror" lock back to an old snapshot: that one stayed
/// pinned, the current base lost that protection. The source tells a taken
/// set by its generation; what it then shares is what the set names, plus a
/// target served since that the set cannot name yet.
#[test]
fn an_older_set_delivered_late_is_not_taken() {
    let mut a = node("A");
    let mut b = node("B");
    let (s1, s2, s3, s4) = (sid(1), sid(2), sid(3), sid(4));
    volume(&mut a, "v1", &[s1, s2, s3, s4]);
    serve(&mut a, "B", "v1", "v1");
    let _ = pull(&mut b, "v1", "A", "v1", "v1");
    let _ = b.handle(
        1,
        Event::UpstreamSnapshots {
            relationship: "v1".into(),
            snapshots: vec![s1, s2, s3, s4],
        },
    );
    let mut finish = |t: u64, s: Uuid| {
        let acts = b.handle(
            t,
            Event::TransferFinished {
                relationship: "v1".into(),
                target: s,
            },
        );
        let last = sets(&acts).into_iter().max_by_key(|(_, s)| s.generation);
        last.expect("a transfer sends a set").1
    };
    let old = finish(2, s2);
    let new = finish(3, s3);
    let key = ("B".to_string(), "v1".to_string());
    let _ = a.handle(4, Event::LockSetReceived { set: new.clone() });
    assert_eq!(a.generation_of(&key), new.generation);
    let late = a.handle(5, Event::LockSetReceived { set: old });
    assert!(late.is_empty(), "{late:?}");
    assert_eq!(
        a.generation_of(&key),
        new.generation,
        "the late set was taken"
    );
    let named = |set: &LockSet| -> BTreeSet<Uuid> {
        set.locks
            .iter()
            .filter(|l| l.origin_node == "B")
            .map(|l| l.snapshot)
            .collect()
    };
    assert_eq!(named(&new), BTreeSet::from([s3]));
    let local = [s1, s2, s3, s4];
    // Shared before: s2 (the last set's) and s4 (served since). The set
    // naming s3 ends s2's share, keeps s4's.
    let before = BTreeSet::from([s2, s4]);
    assert_eq!(
        next_shared(&local, &before, &named(&new)),
        BTreeSet::from([s3, s4])
    );
    // One naming s4 ends the rest; one naming nothing of ours ends all.
    assert_eq!(
        next_shared(&local, &BTreeSet::from([s3, s4]), &BTreeSet::from([s4])),
        BTreeSet::from([s4])
    );
    assert_eq!(
        next_shared(&local, &before, &BTreeSet::from([sid(9)])),
        BTreeSet::new()
    );
}

/// The bug: snapshots were kept in one list per node, so a lock on a
/// snapshot id held it in every volume. A volume mirror and a qtree mirror
/// of the same source give B the same snapshot id in two volumes (`vol0`
/// and `qv`); C's mirror of `vol0` pinned `qv@S` too (retention of `qv`
/// never freed it), and a forced delete of `vol0@S` told the qtree's
/// downstream its base was gone. A lock holds the snapshot in exactly the
/// volume it was taken on.
#[test]
fn one_snapshot_id_in_two_local_volumes_is_locked_per_volume() {
    let s = sid(7);
    let mut b = node("B");
    volume(&mut b, "vol0", &[s]);
    volume(&mut b, "qv", &[s]);
    serve(&mut b, "C", "c0", "vol0");
    let acts = b.handle(
        1,
        Event::LockSetReceived {
            set: LockSet {
                sender: "C".into(),
                relationship: "c0".into(),
                volume: "vol0".into(),
                generation: 1,
                lease_ms: 60_000,
                locks: vec![SoftLock {
                    snapshot: s,
                    kind: LockKind::DestinationPath,
                    text: "C:c0".into(),
                    origin_node: "C".into(),
                    hop_path: vec!["C".into()],
                    created_ms: 1,
                    renewed_ms: 1,
                    lease_ms: 60_000,
                    dataset: "C/c0".into(),
                }],
                gone_acks: vec![],
            },
        },
    );
    assert!(acts.iter().any(|a| matches!(a, Action::Protected { volume, snapshot, .. } if volume == "vol0" && *snapshot == s)));
    assert!(!acts
        .iter()
        .any(|a| matches!(a, Action::Protected { volume, .. } if volume == "qv")));
    let h = b.holders("vol0", s);
    assert_eq!(h.len(), 1, "{h:?}");
    assert_eq!(h[0].volume, "vol0");
    assert_eq!(h[0].via, Some(("C".to_string(), "c0".to_string())));
    assert!(b.holders("qv", s).is_empty(), "qv@S is not C's");
    assert!(b.all_locks().iter().all(|h| h.volume == "vol0"));
    assert!(b.preview_delete("qv", &[s]).is_empty());
    assert_eq!(b.preview_delete("vol0", &[s]).len(), 1);
    assert!(deleted(&delete(&mut b, "qv", s, false), "qv", s));
    assert!(b.has_snapshot("vol0", s) && !b.has_snapshot("qv", s));
    assert!(refused(&delete(&mut b, "vol0", s, false)).is_some());
    // The qtree mirror's downstream D shares qv@S (taken again).
    let _ = b.handle(
        2,
        Event::SnapshotCreated {
            volume: "qv".into(),
            snapshot: s,
        },
    );
    serve(&mut b, "D", "dq", "qv");
    let _ = b.handle(
        3,
        Event::DownstreamShared {
            downstream: "D".into(),
            relationship: "dq".into(),
            shared: vec![s],
        },
    );
    let hq = b.holders("qv", s);
    assert_eq!(hq.len(), 1, "{hq:?}");
    assert_eq!(
        (hq[0].volume.as_str(), hq[0].lock.origin_node.as_str()),
        ("qv", "D")
    );
    assert_eq!(b.holders("vol0", s).len(), 1, "vol0@S: still C's only");
    // Forcing vol0@S out tells C, not D; qv@S stays D's.
    let acts = delete(&mut b, "vol0", s, true);
    assert!(acts.iter().any(|a| matches!(a, Action::ForcedDelete { volume, holders, .. } if volume == "vol0" && holders.iter().all(|h| h.origin_node == "C"))));
    let told: Vec<(String, String)> = acts
        .iter()
        .filter_map(|a| match a {
            Action::TellSnapshotGone {
                downstream,
                relationship,
                ..
            } => Some((downstream.clone(), relationship.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(told, vec![("C".to_string(), "c0".to_string())]);
    assert!(b.pending_gone("D", "dq").is_empty());
    assert!(b.has_snapshot("qv", s) && !b.has_snapshot("vol0", s));
    assert_eq!(b.holders("qv", s).len(), 1);
}

/// The bug: a set named only snapshot ids and its sender node, so a
/// downstream's set pinned those ids in any of our volumes, also in volumes
/// it does not pull (a confused or stale peer could pin them all). A set is
/// accepted only from a registered downstream relationship, for the volume
/// it pulls; a rejected set does not use up its generation.
#[test]
fn a_set_for_a_volume_the_downstream_does_not_pull_is_rejected() {
    let mut b = node("B");
    volume(&mut b, "vol0", &[sid(1)]);
    volume(&mut b, "vol1", &[sid(2)]);
    serve(&mut b, "C", "c0", "vol0");
    let set = |relationship: &str, volume: &str, snapshot: Uuid| LockSet {
        sender: "C".into(),
        relationship: relationship.into(),
        volume: volume.into(),
        generation: 5,
        lease_ms: 60_000,
        locks: vec![SoftLock {
            snapshot,
            kind: LockKind::DestinationPath,
            text: "C:c0".into(),
            origin_node: "C".into(),
            hop_path: vec!["C".into()],
            created_ms: 1,
            renewed_ms: 1,
            lease_ms: 60_000,
            dataset: "C/c0".into(),
        }],
        gone_acks: vec![],
    };
    let rejected = |acts: &[Action], f: &str| {
        acts.iter().any(|a| {
            matches!(a, Action::SetRejected { sender, error: LockError::BadField { field, .. } } if sender == "C" && *field == f)
        })
    };
    let acts = b.handle(
        1,
        Event::LockSetReceived {
            set: set("c0", "vol1", sid(2)),
        },
    );
    assert!(rejected(&acts, "set.volume"), "{acts:?}");
    assert!(b.holders("vol1", sid(2)).is_empty());
    let acts = b.handle(
        2,
        Event::LockSetReceived {
            set: set("c9", "vol0", sid(1)),
        },
    );
    assert!(rejected(&acts, "set.relationship"), "{acts:?}");
    assert!(b.all_locks().is_empty(), "{:?}", b.all_locks());
    assert!(deleted(
        &delete(&mut b, "vol1", sid(2), false),
        "vol1",
        sid(2)
    ));
    // The right set, same generation: accepted.
    let acts = b.handle(
        3,
        Event::LockSetReceived {
            set: set("c0", "vol0", sid(1)),
        },
    );
    assert!(!acts.iter().any(|a| matches!(a, Action::SetRejected { .. })));
    assert_eq!(b.holders("vol0", sid(1)).len(), 1);
}

/// Frames of `set`, each encoded and decoded, reassembled as a receiver
/// with bound `max` does. Checks every frame is within the body bound.
fn over_the_wire(set: &LockSet, max: usize) -> (usize, LockSet) {
    let parts = WireLockSet::split(set);
    let mut asm = SetAssembler::default();
    let mut whole = None;
    let mut largest = 0;
    for (i, p) in parts.iter().enumerate() {
        assert_eq!((p.part, p.parts), (i as u32, parts.len() as u32));
        let frame = encode(&Message::LockSet(p.clone()), &[]).expect("encode part");
        largest = largest.max(frame.len());
        assert!(
            frame.len() < MAX_BODY_LEN as usize,
            "part {i}: frame of {} bytes",
            frame.len()
        );
        let Message::LockSet(w) = decode(&frame).expect("decode").expect("whole").msg else {
            panic!("not a lock set");
        };
        let got = asm.push(w, max).expect("part accepted");
        assert_eq!(got.is_some(), i + 1 == parts.len(), "part {i}");
        whole = whole.or(got);
    }
    eprintln!(
        "{} -> receiver: {} locks in {} parts, largest frame {largest} bytes (bound {MAX_BODY_LEN})",
        set.sender,
        set.locks.len(),
        parts.len()
    );
    (parts.len(), whole.expect("reassembled"))
}

/// C's lock table as it would be after its applications took `n_locks`
/// locks on the 50 snapshots of its volume `v1` (pulled from B). Built as
/// the persisted table: 20,000 `AppLockAdded` events cost O(n) each.
fn c_with_app_locks(snaps: &[Uuid], n_locks: usize) -> LockNode {
    let ids: Vec<[u8; 16]> = snaps.iter().map(|s| *s.as_bytes()).collect();
    let p = PersistNode {
        node_id: "C".into(),
        epoch: 0,
        counter: 0,
        local: vec![PersistLocal {
            volume: "v1".into(),
            snapshots: ids.clone(),
        }],
        ups: vec![PersistUp {
            relationship: "v1".into(),
            upstream: "B".into(),
            source: "v1".into(),
            volume: "v1".into(),
            kind: LockKind::DestinationPath.code(),
            has: ids.clone(),
            anchor: ids.last().copied(),
            gone_acks: vec![],
        }],
        downs: vec![],
        app: (0..n_locks)
            .map(|i| PersistApp {
                volume: "v1".into(),
                lock: WireLock {
                    snapshot: ids[i % ids.len()],
                    kind: LockKind::OwnerName.code(),
                    text: format!("app-{i:05}"),
                    origin_node: "C".into(),
                    hop_path: vec!["C".into()],
                    created_ms: 1,
                    renewed_ms: 1,
                    lease_ms: 60_000,
                    dataset: "C/v1".into(),
                },
            })
            .collect(),
        since: vec![],
    };
    let body = rkyv::to_bytes::<rancor::Error>(&p).expect("serialize table");
    let mut bytes = b"SLKT".to_vec();
    bytes.extend_from_slice(&PERSIST_VERSION.to_le_bytes());
    bytes.extend_from_slice(&[0, 0]);
    bytes.extend_from_slice(&body);
    // A table of format 4 as older builds wrote it: its snapshots in it.
    LockNode::from_bytes(NodeConfig::new("C"), &bytes, &Default::default()).expect("C's table")
}

/// The bug: an outgoing set over `max_locks_per_set` (then 8,192) was cut
/// to the bound (`SetTruncated`): the locks past it, in snapshot-id order,
/// never reached the upstream, so with many application locks downstream
/// (one per backup job) A could prune snapshots C still needed. Sets are
/// never cut now: the bound is 65,536, a set too big for one frame travels
/// in parts and is reassembled whole, and A protects every lock.
#[test]
fn twenty_thousand_locks_travel_whole() {
    const N: usize = 20_000;
    assert_eq!(Bounds::default().max_locks_per_set, 65_536);
    let snaps: Vec<Uuid> = (1..=50).map(sid).collect();
    let mut a = node("A");
    volume(&mut a, "v1", &snaps);
    serve(&mut a, "B", "v1", "v1");
    let mut b = node("B");
    volume(&mut b, "v1", &snaps);
    let _ = pull(&mut b, "v1", "A", "v1", "v1");
    let _ = b.handle(
        1,
        Event::UpstreamSnapshots {
            relationship: "v1".into(),
            snapshots: snaps.clone(),
        },
    );
    serve(&mut b, "C", "v1", "v1");
    let mut c = c_with_app_locks(&snaps, N);
    assert_eq!(c.all_locks().len(), N + 1, "app locks and C's base");
    let max = NodeConfig::new("X").bounds.max_locks_per_set;

    // C -> B, in parts.
    let acts = c.handle(10, Event::Restarted);
    assert!(!acts
        .iter()
        .any(|a| matches!(a, Action::SetOverBound { .. })));
    let from_c = sets(&acts);
    assert_eq!(from_c.len(), 1);
    let (parts, got) = over_the_wire(&from_c[0].1, max);
    assert!(parts > 1, "{parts} parts");
    assert_eq!(got, from_c[0].1, "B reassembles C's set");
    let app: BTreeSet<(Uuid, String)> = got
        .locks
        .iter()
        .filter(|l| l.kind == LockKind::OwnerName)
        .map(|l| (l.snapshot, l.text.clone()))
        .collect();
    assert_eq!(app.len(), N, "C's set carries every application lock");

    // B -> A, in parts.
    let acts = b.handle(11, Event::LockSetReceived { set: got });
    assert!(!acts
        .iter()
        .any(|a| matches!(a, Action::SetRejected { .. } | Action::SetOverBound { .. })));
    let to_a = sets(&acts);
    assert_eq!(to_a.len(), 1);
    assert_eq!(to_a[0].0, "A");
    let relayed: BTreeSet<(Uuid, String)> = to_a[0]
        .1
        .locks
        .iter()
        .filter(|l| l.origin_node == "C" && l.kind == LockKind::OwnerName)
        .map(|l| {
            assert_eq!(l.hop_path, ["C", "B"]);
            (l.snapshot, l.text.clone())
        })
        .collect();
    assert_eq!(relayed, app, "every lock of C is in B's set to A (no cut)");
    let (parts, got) = over_the_wire(&to_a[0].1, max);
    assert!(parts > 1, "{parts} parts");
    assert_eq!(got, to_a[0].1, "A reassembles B's set");
    let _ = deliver(
        &mut a,
        12,
        &[Action::SendLockSet {
            relationship: "v1".into(),
            upstream: "A".into(),
            set: got,
        }],
    );
    for (i, s) in snaps.iter().enumerate() {
        let h = refused(&delete(&mut a, "v1", *s, false))
            .unwrap_or_else(|| panic!("A deleted locked snapshot {s}"));
        let names: BTreeSet<&str> = h
            .iter()
            .filter(|l| l.origin_node == "C" && l.kind == LockKind::OwnerName)
            .map(|l| l.text.as_str())
            .collect();
        assert_eq!(names.len(), N / snaps.len(), "{s}: every holder named");
        assert!(names.contains(format!("app-{i:05}").as_str()));
    }
}

/// The reassembly of parts is bounded and strict: out of order, a bad
/// part count, parts of another set and a total over the lock bound are
/// errors (the partial set is dropped, the next set starts afresh), never
/// a panic.
#[test]
fn set_assembler_refuses_bad_parts() {
    let lock = |i: u32| SoftLock {
        snapshot: sid(1),
        kind: LockKind::OwnerName,
        text: format!("{i:0>200}"),
        origin_node: "C".into(),
        hop_path: vec!["C".into()],
        created_ms: 1,
        renewed_ms: 1,
        lease_ms: 60_000,
        dataset: "C/v1".into(),
    };
    let set = LockSet {
        sender: "C".into(),
        relationship: "v1".into(),
        volume: "v1".into(),
        generation: 9,
        lease_ms: 60_000,
        locks: (0..6_000).map(lock).collect(),
        gone_acks: vec![sid(5)],
    };
    let parts = WireLockSet::split(&set);
    assert!(parts.len() >= 3, "{} parts", parts.len());
    let max = 65_536;
    let whole = |asm: &mut SetAssembler| {
        let mut got = None;
        for p in &parts {
            got = asm.push(p.clone(), max).expect("in order");
        }
        got.expect("whole")
    };
    let mut asm = SetAssembler::default();
    assert_eq!(whole(&mut asm), set);
    // Out of order: part 2 after part 0; then part 1 has no part 0.
    assert_eq!(asm.push(parts[0].clone(), max), Ok(None));
    assert!(asm.push(parts[2].clone(), max).is_err());
    assert!(asm.push(parts[1].clone(), max).is_err());
    assert_eq!(whole(&mut asm), set, "the next set starts afresh");
    // Part counts.
    for (part, n) in [(0, 0), (0, SET_PARTS_MAX + 1), (3, 3), (u32::MAX, 2)] {
        let mut p = parts[0].clone();
        (p.part, p.parts) = (part, n);
        assert!(
            matches!(
                asm.push(p, max),
                Err(LockError::BadField {
                    field: "set.part",
                    ..
                })
            ),
            "part {part} of {n}"
        );
    }
    // A part of another generation or sender in the middle of a set.
    for bad in [
        WireLockSet {
            generation: 10,
            ..parts[1].clone()
        },
        WireLockSet {
            sender: "D".into(),
            ..parts[1].clone()
        },
        WireLockSet {
            volume: "v2".into(),
            ..parts[1].clone()
        },
    ] {
        assert_eq!(asm.push(parts[0].clone(), max), Ok(None));
        assert!(asm.push(bad, max).is_err());
    }
    // Over the lock bound: refused before the set is whole.
    let mut res = Ok(None);
    for p in &parts {
        res = asm.push(p.clone(), set.locks.len() - 1);
        if res.is_err() {
            break;
        }
    }
    assert!(
        matches!(res, Err(LockError::TooManyLocks { count, max, .. }) if count > max),
        "{res:?}"
    );
    // A whole (one-part) set over the receiver's bound is refused by the
    // receiving node.
    let one = WireLockSet::split(&LockSet {
        locks: (0..4).map(lock).collect(),
        ..set.clone()
    });
    assert_eq!(one.len(), 1);
    let got = asm
        .push(one[0].clone(), 3)
        .expect("one part")
        .expect("whole");
    let mut b = LockNode::new(NodeConfig {
        bounds: Bounds {
            max_locks_per_set: 3,
            ..Bounds::default()
        },
        ..NodeConfig::new("B")
    });
    serve(&mut b, "C", "v1", "v1");
    let acts = b.handle(1, Event::LockSetReceived { set: got });
    assert!(acts.iter().any(|a| matches!(
        a,
        Action::SetRejected {
            error: LockError::TooManyLocks { .. },
            ..
        }
    )));
    // Random parts: errors or sets, never a panic.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let small = WireLockSet::from_model(&LockSet {
        locks: (0..3).map(lock).collect(),
        ..set.clone()
    });
    for _ in 0..20_000 {
        let mut p = small.clone();
        p.part = (next() % 5) as u32;
        p.parts = (next() % 5) as u32;
        p.generation = next() % 3 + 8;
        p.locks.truncate((next() % 4) as usize);
        let _ = asm.push(p, (next() % 8) as usize);
    }
}

/// The bug: sets over the bound were cut silently. Now a set is always
/// sent whole; over the upstream's bound it is reported (`SetOverBound`),
/// loudly, and the upstream will refuse it (keeping its previous set).
#[test]
fn an_outgoing_set_over_the_bound_is_sent_whole_and_reported() {
    let mut b = LockNode::new(NodeConfig {
        bounds: Bounds {
            max_locks_per_set: 3,
            ..Bounds::default()
        },
        ..NodeConfig::new("B")
    });
    let snaps = [sid(1), sid(2), sid(3)];
    volume(&mut b, "v1", &snaps);
    let _ = pull(&mut b, "v1", "A", "v1", "v1");
    let _ = b.handle(
        1,
        Event::UpstreamSnapshots {
            relationship: "v1".into(),
            snapshots: snaps.to_vec(),
        },
    );
    let mut acts = Vec::new();
    for (i, s) in snaps.iter().enumerate() {
        acts = b.handle(
            2,
            Event::AppLockAdded {
                volume: "v1".into(),
                snapshot: *s,
                owner: format!("app{i}"),
            },
        );
    }
    assert!(b.app_lock_room("v1").is_err(), "a fifth lock exceeds 3");
    assert!(acts.contains(&Action::SetOverBound {
        relationship: "v1".into(),
        count: 4,
        max: 3
    }));
    let s = sets(&acts);
    assert_eq!(s.len(), 1);
    assert_eq!(
        s[0].1.locks.len(),
        4,
        "sent whole: own base and 3 app locks"
    );
}

/// The bug: moving a mirror to another upstream (C pulled `v1` from B, now
/// from A, B's source) only dropped the old upstream here: B kept C's set,
/// pinning C's former base until the lease ran out (under `Keep`, for ever,
/// reported stale). Retargeting now sends B a final empty set for the
/// relationship, and A its set, carrying C's base as soon as A says it has
/// it; C keeps its anchor locked until A's first transfer.
#[test]
fn retarget_moves_the_relationship_to_the_new_upstream() {
    let mut b = node("B");
    volume(&mut b, "v1", &[sid(1), sid(2)]);
    serve(&mut b, "C", "v1", "v1");
    let mut c = node("C");
    let mut to_b = pull(&mut c, "v1", "B", "v1", "v1");
    to_b.extend(c.handle(
        1,
        Event::UpstreamSnapshots {
            relationship: "v1".into(),
            snapshots: vec![sid(1), sid(2)],
        },
    ));
    for t in [1, 2] {
        to_b.extend(c.handle(
            t as u64,
            Event::TransferFinished {
                relationship: "v1".into(),
                target: sid(t),
            },
        ));
    }
    let last = sets(&to_b).last().expect("sets to B").1.generation;
    deliver(&mut b, 3, &to_b);
    assert!(refused(&delete(&mut b, "v1", sid(2), false)).is_some());

    let acts = c.handle(
        4,
        Event::UpstreamAdded {
            relationship: "v1".into(),
            upstream: "A".into(),
            source: "v1".into(),
            volume: "v1".into(),
            kind: LockKind::DestinationPath,
        },
    );
    assert_eq!(c.upstream_of("v1"), Some("A"));
    let s = sets(&acts);
    let fin: Vec<&LockSet> = s.iter().filter(|(u, _)| u == "B").map(|(_, s)| s).collect();
    assert_eq!(fin.len(), 1, "one final set to B: {acts:?}");
    assert_eq!(
        (fin[0].relationship.as_str(), fin[0].volume.as_str()),
        ("v1", "v1")
    );
    assert!(fin[0].locks.is_empty() && fin[0].generation > last);
    // A has told us nothing yet, and hears of C's anchor at once: the
    // snapshot C would re-attach from is held on A from the first set, if
    // A has it (a lock on a snapshot A lacks holds nothing there).
    assert!(
        s.iter()
            .filter(|(u, _)| u == "A")
            .all(|(_, s)| s.locks.iter().all(|l| l.snapshot == sid(2))),
        "{acts:?}"
    );
    let mut last_to_a = s
        .iter()
        .filter(|(u, _)| u == "A")
        .map(|(_, s)| (*s).clone())
        .next_back();
    assert!(!c.holders("v1", sid(2)).is_empty(), "the anchor stays");
    deliver(&mut b, 5, &acts);
    assert!(
        deleted(&delete(&mut b, "v1", sid(2), false), "v1", sid(2)),
        "B released C's base"
    );

    // A has 2 (and 3): C's base with A is 2.
    let acts = c.handle(
        6,
        Event::UpstreamSnapshots {
            relationship: "v1".into(),
            snapshots: vec![sid(2), sid(3)],
        },
    );
    let s = sets(&acts);
    assert!(s.iter().all(|(u, _)| u == "A"), "{acts:?}");
    if let Some((_, set)) = s.last() {
        last_to_a = Some((*set).clone());
    }
    assert!(last_to_a
        .expect("a set to A")
        .locks
        .iter()
        .any(|l| l.snapshot == sid(2) && l.origin_node == "C" && l.text == "C:v1"));
    let acts = c.handle(
        7,
        Event::TransferStarting {
            relationship: "v1".into(),
        },
    );
    assert!(sets(&acts).iter().all(|(u, _)| u == "A"));
    let acts = c.handle(
        8,
        Event::TransferFinished {
            relationship: "v1".into(),
            target: sid(3),
        },
    );
    let s = sets(&acts);
    assert!(s.iter().all(|(u, _)| u == "A"));
    assert!(s[0].1.locks.iter().any(|l| l.snapshot == sid(3)));
    assert_eq!(c.anchor("v1"), Some(sid(3)));
}

/// The bug: removing a mirror dropped the relationship here but told the
/// upstream nothing, so the upstream held the mirror's base (and everything
/// relayed through it) until the set's lease ran out, and under `Keep`
/// until an operator released it. It now gets a final empty set, then
/// nothing more.
#[test]
fn upstream_removed_sends_a_final_empty_set() {
    let mut a = node("A");
    volume(&mut a, "v1", &[sid(1), sid(2)]);
    serve(&mut a, "B", "v1", "v1");
    let mut b = node("B");
    let mut to_a = pull(&mut b, "v1", "A", "v1", "v1");
    to_a.extend(b.handle(
        1,
        Event::UpstreamSnapshots {
            relationship: "v1".into(),
            snapshots: vec![sid(1), sid(2)],
        },
    ));
    to_a.extend(b.handle(
        2,
        Event::TransferFinished {
            relationship: "v1".into(),
            target: sid(2),
        },
    ));
    let last = sets(&to_a).last().expect("sets").1.generation;
    deliver(&mut a, 3, &to_a);
    assert!(refused(&delete(&mut a, "v1", sid(2), false)).is_some());
    let acts = b.handle(
        4,
        Event::UpstreamRemoved {
            relationship: "v1".into(),
        },
    );
    let s = sets(&acts);
    assert_eq!(s.len(), 1, "{acts:?}");
    assert_eq!(s[0].0, "A");
    assert_eq!(
        (s[0].1.relationship.as_str(), s[0].1.volume.as_str()),
        ("v1", "v1")
    );
    assert!(s[0].1.locks.is_empty() && s[0].1.generation > last);
    assert!(!b.has_upstream("v1") && b.upstream_of("v1").is_none());
    assert!(b.holders("v1", sid(2)).is_empty(), "no own base any more");
    deliver(&mut a, 5, &acts);
    assert!(deleted(&delete(&mut a, "v1", sid(2), false), "v1", sid(2)));
    // Then nothing more, also on renewal.
    let acts = b.handle(1_000_000, Event::Tick);
    assert!(sets(&acts).is_empty(), "{acts:?}");
}

/// One downstream node's sets together stay within `max_locks_per_peer`:
/// a set that would pass it is refused whole (the node's previous set for
/// that relationship holds), other nodes are not affected, and a smaller
/// set is taken again.
#[test]
fn a_peer_cannot_hold_more_locks_than_its_bound() {
    let mut cfg = NodeConfig::new("A");
    cfg.bounds.max_locks_per_peer = 3;
    let mut a = LockNode::new(cfg);
    let snaps: Vec<Uuid> = (1..=4).map(sid).collect();
    volume(&mut a, "v", &snaps);
    let set = |sender: &str, rel: &str, generation: u64, n: usize| LockSet {
        sender: sender.into(),
        relationship: rel.into(),
        volume: "v".into(),
        generation,
        lease_ms: 60_000,
        locks: snaps
            .iter()
            .take(n)
            .map(|s| SoftLock {
                snapshot: *s,
                kind: LockKind::DestinationPath,
                text: format!("{sender}:{rel}"),
                origin_node: sender.into(),
                hop_path: vec![sender.into()],
                created_ms: 0,
                renewed_ms: 0,
                lease_ms: 60_000,
                dataset: format!("{sender}/{rel}"),
            })
            .collect(),
        gone_acks: Vec::new(),
    };
    for (who, rel) in [("B", "r1"), ("B", "r2"), ("C", "r1")] {
        serve(&mut a, who, rel, "v");
    }
    let rejected = |acts: &[Action]| {
        acts.iter().any(|x| {
            matches!(x, Action::SetRejected { error: LockError::TooManyPeerLocks { count, max: 3, .. }, .. } if *count == 4)
        })
    };
    let r = a.handle(
        1,
        Event::LockSetReceived {
            set: set("B", "r1", 1, 2),
        },
    );
    assert!(!rejected(&r), "{r:?}");
    // B's second relationship would take B to 4 locks here.
    let r = a.handle(
        2,
        Event::LockSetReceived {
            set: set("B", "r2", 1, 2),
        },
    );
    assert!(rejected(&r), "{r:?}");
    let key2 = ("B".to_string(), "r2".to_string());
    assert_eq!(a.generation_of(&key2), 0, "the refused set was taken");
    // C has a bound of its own.
    let r = a.handle(
        3,
        Event::LockSetReceived {
            set: set("C", "r1", 1, 3),
        },
    );
    assert!(!rejected(&r), "{r:?}");
    // A smaller set fits; and B's r1 may grow only into what is left.
    let r = a.handle(
        4,
        Event::LockSetReceived {
            set: set("B", "r2", 2, 1),
        },
    );
    assert!(!rejected(&r), "{r:?}");
    assert_eq!(a.generation_of(&key2), 2);
    let r = a.handle(
        5,
        Event::LockSetReceived {
            set: set("B", "r1", 2, 3),
        },
    );
    assert!(rejected(&r), "{r:?}");
    let held: Vec<Held> = a
        .all_locks()
        .into_iter()
        .filter(|h| h.lock.origin_node == "B")
        .collect();
    assert_eq!(held.len(), 3, "B keeps its last taken sets: {held:?}");
}
