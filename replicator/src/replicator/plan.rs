//! What one pull transfer does, decided without I/O.
//!
//! Owns the destination's decisions before any data moves: the base (the
//! newest snapshot both sides hold), the target (the source's newest, or
//! the target of an interrupted transfer that can resume), whether to
//! resume or start over, whether a partial transfer's data must be undone
//! first (revert to the base, or wipe), and when to refuse. The shell
//! (`pull::transfer_inner`) gathers the inputs from the source and the
//! engine, asks [`plan`], and performs what it says.
//!
//! Invariants kept (asserted by the tests below):
//! - An update never plans a full copy for a relationship that completed a
//!   transfer, unless an unfinished baseline's checkpoint says one is
//!   under way: without a common snapshot it is refused, and only a
//!   resync (or the create) may copy everything.
//! - A transfer resumes only its own interrupted transfer: the same base,
//!   a target the source still has, and never on a resync.
//! - A checkpoint that is not resumed is dropped (with its resume lock),
//!   and the data it left is undone before the new transfer writes.
//! - A create never runs into a destination that already holds a source
//!   snapshot.

use sluice_engine::api::SnapshotInfo;
use sluice_lockproto::wire::SnapInfo;
use uuid::Uuid;

use super::Mode;
use crate::types::{Checkpoint, Relationship, SnapRef, TransferReport};

/// What [`plan`] needs to know.
pub(super) struct Inputs<'a> {
    pub(super) mode: Mode,
    /// The source's snapshots, oldest first.
    pub(super) src: &'a [SnapInfo],
    /// The ids of the destination volume's snapshots.
    pub(super) local: &'a [Uuid],
    /// The interrupted transfer's checkpoint, if any.
    pub(super) ckpt: Option<&'a Checkpoint>,
    /// The relationship has completed a transfer before.
    pub(super) completed_before: bool,
    /// What a resync would discard (snapshots taken here while broken).
    pub(super) resync_discards: &'a [String],
}

/// Why a transfer does not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The source has no snapshot at all.
    NoSourceSnapshot,
    /// A create, but the destination already holds source snapshots.
    HoldsSourceSnapshots,
    /// An update without a common snapshot: only a resync may copy all
    /// (the shell asks the source what that would send, `newest`).
    NoCommonSnapshot { newest: SnapInfo },
    /// A resync that would discard these snapshots without `--force`.
    WouldDiscard(Vec<String>),
}

/// What the destination holds now that must go before the transfer writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Undo {
    /// Nothing: the destination is as its base left it.
    Nothing,
    /// Revert the live image to the base (a resync, or a partial transfer
    /// on top of the base).
    RevertToBase,
    /// Unmap everything (no base: a re-baseline).
    Wipe,
}

/// The transfer to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Plan {
    pub(super) base: Option<SnapInfo>,
    pub(super) target: SnapInfo,
    /// Items already applied (0: from the start).
    pub(super) resume_from: u64,
    /// The checkpoint not resumed: dropped, with the resume lock on its
    /// target.
    pub(super) abandon: Option<Uuid>,
    pub(super) undo: Undo,
    /// The base is the target: nothing to send.
    pub(super) up_to_date: bool,
    /// Why this is a full copy (no base).
    pub(super) full_reason: Option<&'static str>,
}

/// Decide one transfer: see the module docs.
pub(super) fn plan(i: &Inputs<'_>) -> Result<Plan, Refusal> {
    let Some(newest) = i.src.last() else {
        return Err(Refusal::NoSourceSnapshot);
    };
    let held = |s: &&SnapInfo| i.local.iter().any(|l| l.as_bytes() == &s.id);
    let base = i.src.iter().rev().find(held).cloned();
    let base_id = base.as_ref().map(|b| Uuid::from_bytes(b.id));
    let on_source = |id: Uuid| i.src.iter().any(|s| Uuid::from_bytes(s.id) == id);
    // An update of a baseline that never finished and left no usable
    // checkpoint starts the baseline again on a wiped destination.
    let mut restart_baseline = false;
    match i.mode {
        Mode::Create if base.is_some() => return Err(Refusal::HoldsSourceSnapshots),
        Mode::Create => {}
        Mode::Update if base.is_none() => {
            // An unfinished baseline goes on (resumed from its checkpoint,
            // or started again when its target is gone): a relationship
            // that never completed a transfer has no chain to lose.
            let ckpt_baseline = i
                .ckpt
                .is_some_and(|ck| ck.base.is_none() && on_source(ck.target));
            let never_completed = !i.completed_before && i.local.is_empty();
            if !ckpt_baseline && !never_completed {
                return Err(Refusal::NoCommonSnapshot {
                    newest: newest.clone(),
                });
            }
            restart_baseline = !ckpt_baseline;
        }
        Mode::Update => {}
        Mode::Resync { force } => {
            if !i.resync_discards.is_empty() && !force {
                return Err(Refusal::WouldDiscard(i.resync_discards.to_vec()));
            }
        }
    }
    // Resume an interrupted transfer of the same base if its target is
    // still there; otherwise start over to the newest snapshot.
    let resumed = i.ckpt.filter(|ck| {
        !matches!(i.mode, Mode::Resync { .. }) && ck.base == base_id && on_source(ck.target)
    });
    let (target, resume_from) = match resumed {
        Some(ck) => (
            i.src
                .iter()
                .find(|s| Uuid::from_bytes(s.id) == ck.target)
                .unwrap_or(newest)
                .clone(),
            ck.position,
        ),
        None => (newest.clone(), 0),
    };
    // A checkpoint at position 0 is not resumed either: what its transfer
    // wrote before its first resume point is undone, then it starts over.
    let abandon = i.ckpt.filter(|_| resume_from == 0).map(|ck| ck.target);
    let undo = if matches!(i.mode, Mode::Resync { .. }) || abandon.is_some() || restart_baseline {
        if base.is_some() {
            Undo::RevertToBase
        } else {
            Undo::Wipe
        }
    } else {
        Undo::Nothing
    };
    let full_reason = base.is_none().then_some(match i.mode {
        // A create, or an update that finishes an unfinished baseline.
        Mode::Create | Mode::Update if !i.completed_before => "baseline",
        _ => "no snapshot in common with the source",
    });
    Ok(Plan {
        up_to_date: base.as_ref().is_some_and(|b| b.id == target.id),
        base,
        target,
        resume_from,
        abandon,
        undo,
        full_reason,
    })
}

/// What a completed transfer (`rep`, run in `mode`) records in its
/// relationship: the counters, the last transfer (an update that sent
/// nothing keeps the one before, unless there is none), the snapshot now
/// shared with the source, no error, and a resync ends the break.
pub(super) fn record_completion(
    r: &mut Relationship,
    rep: &TransferReport,
    mode: Mode,
    common: Option<SnapRef>,
) {
    let sent = rep.kind != "none";
    match rep.kind.as_str() {
        "full" => r.full_transfers += 1,
        "incremental" => r.incremental_transfers += 1,
        _ => {}
    }
    if sent && rep.resumed_from > 0 {
        r.resumed_transfers += 1;
    }
    if sent || r.last_transfer.is_none() {
        r.last_transfer = Some(rep.clone());
    }
    r.last_update_unix_ms = Some(rep.finished_unix_ms);
    r.last_error = None;
    r.source_notice = None;
    r.common = common;
    if matches!(mode, Mode::Resync { .. }) {
        r.broken = false;
        r.broken_unix_ms = None;
    }
}

/// A volume mirror's follow-up deletes after a transfer: the destination's
/// snapshots the source no longer has (`src`: the source's ids). What is
/// in use or locked here is the shell's and the lock table's to keep.
pub(super) fn dropped_by_source<'a>(
    local: &'a [SnapshotInfo],
    src: &'a [Uuid],
) -> impl Iterator<Item = &'a SnapshotInfo> {
    local.iter().filter(move |s| !src.contains(&s.id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(n: u8) -> SnapInfo {
        SnapInfo {
            id: [n; 16],
            name: format!("s{n}"),
            created_ms: u64::from(n),
            content_digest: [n; 32],
        }
    }

    fn id(n: u8) -> Uuid {
        Uuid::from_bytes([n; 16])
    }

    fn inputs<'a>(mode: Mode, src: &'a [SnapInfo], local: &'a [Uuid]) -> Inputs<'a> {
        Inputs {
            mode,
            src,
            local,
            ckpt: None,
            completed_before: !local.is_empty(),
            resync_discards: &[],
        }
    }

    #[test]
    fn an_update_goes_from_the_newest_common_snapshot_to_the_newest() {
        let src = [snap(1), snap(2), snap(3)];
        let local = [id(1), id(2)];
        let p = plan(&inputs(Mode::Update, &src, &local)).unwrap();
        assert_eq!(p.base, Some(snap(2)));
        assert_eq!(p.target, snap(3));
        assert_eq!((p.resume_from, p.abandon, p.undo), (0, None, Undo::Nothing));
        assert!(!p.up_to_date && p.full_reason.is_none());
        let p = plan(&inputs(Mode::Update, &src, &[id(3)])).unwrap();
        assert!(p.up_to_date, "nothing newer to send");
    }

    #[test]
    fn an_update_without_a_common_snapshot_is_refused_once_a_transfer_completed() {
        let src = [snap(4)];
        let local = [id(1)];
        assert_eq!(
            plan(&inputs(Mode::Update, &src, &local)),
            Err(Refusal::NoCommonSnapshot { newest: snap(4) })
        );
        // Completed before, the snapshots since deleted here: still refused.
        let mut i = inputs(Mode::Update, &src, &[]);
        i.completed_before = true;
        assert!(matches!(plan(&i), Err(Refusal::NoCommonSnapshot { .. })));
        // Only a resync copies everything.
        let p = plan(&inputs(Mode::Resync { force: false }, &src, &local)).unwrap();
        assert_eq!(p.base, None);
        assert_eq!(p.undo, Undo::Wipe);
        assert_eq!(p.full_reason, Some("no snapshot in common with the source"));
    }

    #[test]
    fn an_unfinished_baseline_resumes_or_starts_again() {
        let src = [snap(1), snap(2)];
        let ck = Checkpoint {
            base: None,
            target: id(1),
            position: 7,
        };
        let mut i = inputs(Mode::Update, &src, &[]);
        i.ckpt = Some(&ck);
        let p = plan(&i).unwrap();
        assert_eq!((p.target.clone(), p.resume_from), (snap(1), 7));
        assert_eq!((p.abandon, p.undo), (None, Undo::Nothing));
        assert_eq!(p.full_reason, Some("baseline"));
        // Its target is gone at the source: start the baseline again, on a
        // wiped destination.
        let gone = Checkpoint {
            target: id(9),
            ..ck.clone()
        };
        i.ckpt = Some(&gone);
        let p = plan(&i).unwrap();
        assert_eq!((p.target.clone(), p.resume_from), (snap(2), 0));
        assert_eq!((p.abandon, p.undo), (Some(id(9)), Undo::Wipe));
        // No checkpoint at all, never completed: start again, wiped.
        i.ckpt = None;
        let p = plan(&i).unwrap();
        assert_eq!((p.abandon, p.undo), (None, Undo::Wipe));
    }

    #[test]
    fn only_the_interrupted_transfer_itself_resumes() {
        let src = [snap(1), snap(2), snap(3)];
        let local = [id(1)];
        let ck = Checkpoint {
            base: Some(id(1)),
            target: id(2),
            position: 5,
        };
        let mut i = inputs(Mode::Update, &src, &local);
        i.ckpt = Some(&ck);
        let p = plan(&i).unwrap();
        assert_eq!((p.target.clone(), p.resume_from), (snap(2), 5));
        // Another base: start over to the newest, undoing the partial data.
        let other = Checkpoint {
            base: Some(id(8)),
            ..ck.clone()
        };
        i.ckpt = Some(&other);
        let p = plan(&i).unwrap();
        assert_eq!((p.target.clone(), p.resume_from), (snap(3), 0));
        assert_eq!((p.abandon, p.undo), (Some(id(2)), Undo::RevertToBase));
        // Position 0: nothing durable to resume from; undone, started over.
        let zero = Checkpoint {
            position: 0,
            ..ck.clone()
        };
        i.ckpt = Some(&zero);
        let p = plan(&i).unwrap();
        assert_eq!((p.abandon, p.undo), (Some(id(2)), Undo::RevertToBase));
        // A resync never resumes.
        i.ckpt = Some(&ck);
        i.mode = Mode::Resync { force: false };
        let p = plan(&i).unwrap();
        assert_eq!((p.target.clone(), p.resume_from), (snap(3), 0));
        assert_eq!(p.abandon, Some(id(2)));
    }

    #[test]
    fn refusals() {
        assert_eq!(
            plan(&inputs(Mode::Update, &[], &[])),
            Err(Refusal::NoSourceSnapshot)
        );
        let src = [snap(1)];
        assert_eq!(
            plan(&inputs(Mode::Create, &src, &[id(1)])),
            Err(Refusal::HoldsSourceSnapshots)
        );
        let d = ["x".to_string()];
        let local = [id(1)];
        let mut i = inputs(Mode::Resync { force: false }, &src, &local);
        i.resync_discards = &d;
        assert_eq!(plan(&i), Err(Refusal::WouldDiscard(vec!["x".into()])));
        i.mode = Mode::Resync { force: true };
        let p = plan(&i).unwrap();
        assert_eq!(p.undo, Undo::RevertToBase, "a resync reverts to the base");
    }

    /// Every input combination over a small universe: the module's
    /// invariants hold for each.
    #[test]
    fn invariants_hold_for_every_small_input() {
        let all = [snap(1), snap(2), snap(3)];
        let modes = [
            Mode::Create,
            Mode::Update,
            Mode::Resync { force: false },
            Mode::Resync { force: true },
        ];
        let mut cases = 0;
        for mode in modes {
            for src_mask in 0u8..8 {
                let src: Vec<SnapInfo> = (0..3)
                    .filter(|b| src_mask & (1 << b) != 0)
                    .map(|b| all[b].clone())
                    .collect();
                for local_mask in 0u8..8 {
                    let local: Vec<Uuid> = (0..3)
                        .filter(|b| local_mask & (1 << b) != 0)
                        .map(|b| id(b as u8 + 1))
                        .collect();
                    let ckpts: Vec<Option<Checkpoint>> = std::iter::once(None)
                        .chain((0..4u8).flat_map(|base| {
                            (1..5u8).flat_map(move |t| {
                                [0, 3].map(|position| {
                                    Some(Checkpoint {
                                        base: (base > 0).then(|| id(base)),
                                        target: id(t),
                                        position,
                                    })
                                })
                            })
                        }))
                        .collect();
                    for ck in &ckpts {
                        for completed_before in [false, true] {
                            let i = Inputs {
                                mode,
                                src: &src,
                                local: &local,
                                ckpt: ck.as_ref(),
                                completed_before,
                                resync_discards: &[],
                            };
                            cases += 1;
                            check(&i, plan(&i));
                        }
                    }
                }
            }
        }
        assert!(cases > 1000, "{cases} cases");
    }

    fn check(i: &Inputs<'_>, r: Result<Plan, Refusal>) {
        let ctx = format!(
            "mode {:?} src {:?} local {:?} ckpt {:?} completed {}",
            i.mode,
            i.src.iter().map(|s| s.id[0]).collect::<Vec<_>>(),
            i.local,
            i.ckpt,
            i.completed_before
        );
        let Ok(p) = r else {
            return;
        };
        // The target is on the source, the base is held on both sides.
        assert!(i.src.contains(&p.target), "{ctx}");
        if let Some(b) = &p.base {
            assert!(i.src.contains(b), "{ctx}");
            assert!(i.local.contains(&Uuid::from_bytes(b.id)), "{ctx}");
        }
        // Invariant 1: an update of a relationship that completed a
        // transfer copies everything only to finish a baseline under way.
        if i.mode == Mode::Update && p.base.is_none() && i.completed_before {
            let ck = i.ckpt.expect(&ctx);
            assert!(ck.base.is_none(), "{ctx}");
        }
        if i.mode == Mode::Create {
            assert!(p.base.is_none(), "{ctx}");
        }
        // Resumes only its own transfer.
        if p.resume_from > 0 {
            let ck = i.ckpt.expect(&ctx);
            assert!(!matches!(i.mode, Mode::Resync { .. }), "{ctx}");
            assert_eq!(
                ck.base,
                p.base.as_ref().map(|b| Uuid::from_bytes(b.id)),
                "{ctx}"
            );
            assert_eq!(Uuid::from_bytes(p.target.id), ck.target, "{ctx}");
            assert_eq!(p.undo, Undo::Nothing, "{ctx}");
        } else if let Some(ck) = i.ckpt {
            // A checkpoint not resumed is dropped and its data undone.
            assert_eq!(p.abandon, Some(ck.target), "{ctx}");
            assert_ne!(p.undo, Undo::Nothing, "{ctx}");
        }
        if matches!(i.mode, Mode::Resync { .. }) {
            assert_ne!(p.undo, Undo::Nothing, "{ctx}");
        }
        assert_eq!(
            p.undo == Undo::Wipe,
            p.base.is_none() && p.undo != Undo::Nothing,
            "{ctx}"
        );
    }

    #[test]
    fn follow_up_deletes_are_the_snapshots_the_source_no_longer_has() {
        let info = |n: u8| SnapshotInfo {
            name: format!("s{n}"),
            id: id(n),
            gen: u64::from(n),
            created_unix_ms: 0,
            digests: vec![],
            referenced_blocks: 0,
            unique_blocks: 0,
            clones: vec![],
        };
        let local = [info(1), info(2), info(3)];
        let src = [id(2), id(4)];
        let gone: Vec<&str> = dropped_by_source(&local, &src)
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(gone, ["s1", "s3"]);
        let src = [id(1), id(2), id(3)];
        assert_eq!(dropped_by_source(&local, &src).count(), 0);
    }

    #[test]
    fn a_completed_transfer_is_recorded_and_an_empty_update_keeps_the_last_transfer() {
        let mut r: Relationship = serde_json::from_value(serde_json::json!({
            "dst": "m", "dst_volume": "m", "dst_qtree": null, "source_addr": "a",
            "source_volume": "v", "source_qtree": null, "kind": "volume",
            "broken": true, "broken_unix_ms": 5, "last_error": "timed out",
            "source_notice": "forced delete",
        }))
        .unwrap();
        let rep = |kind: &str, resumed_from: u64| TransferReport {
            finished_unix_ms: 1_000 + resumed_from,
            dst: "m".into(),
            kind: kind.into(),
            base: None,
            target: None,
            bytes: 0,
            extents: 0,
            trims: 0,
            resumed_from,
            total_items: 0,
            deleted_snapshots: vec![],
            kept_locked: vec![],
            full_reason: None,
            duration_ms: 0,
        };
        let common = |n: u8| {
            Some(SnapRef {
                name: format!("s{n}"),
                id: id(n),
                created_unix_ms: 0,
            })
        };
        // An update does not end a break; only a resync does.
        record_completion(&mut r, &rep("full", 3), Mode::Update, common(1));
        assert!(r.broken && r.broken_unix_ms.is_some());
        assert_eq!((r.full_transfers, r.resumed_transfers), (1, 1));
        assert_eq!(
            (r.last_error.as_deref(), r.source_notice.as_deref()),
            (None, None)
        );
        record_completion(
            &mut r,
            &rep("incremental", 0),
            Mode::Resync { force: false },
            common(2),
        );
        assert!(!r.broken && r.broken_unix_ms.is_none());
        assert_eq!((r.incremental_transfers, r.resumed_transfers), (1, 1));
        // Nothing sent: the counters and the last transfer stay, the
        // common snapshot follows the source.
        record_completion(&mut r, &rep("none", 7), Mode::Update, common(3));
        assert_eq!(
            (
                r.full_transfers,
                r.incremental_transfers,
                r.resumed_transfers
            ),
            (1, 1, 1)
        );
        assert_eq!(
            r.last_transfer.as_ref().map(|t| t.kind.as_str()),
            Some("incremental")
        );
        assert_eq!(r.common, common(3));
        // ...but the time of the last update is the empty one's.
        assert_eq!(r.last_update_unix_ms, Some(1_007));
    }
}
