//! The sans-IO soft-lock propagation state machine: one [`LockNode`] per node.
//!
//! Owns every rule of DESIGN.md "Soft locks": which locks this node sends to
//! each upstream (claims 30, 31, 35, 56), when (before and after each
//! transfer: claims 10, 20; whenever the set changes; on lease renewal),
//! which local snapshots are protected and by whom, refusing or forcing
//! deletes (claims 60-69), leases and stale reporting, and persistence.
//!
//! One `LockNode` covers all volumes of a node: snapshot ids are global
//! uuids, so lineages never collide; relationships are keyed by peer node
//! name (one relationship per peer pair and direction).
//!
//! Invariants kept:
//! - For every upstream U we lock our next base with U (the newest snapshot
//!   we share) and the anchor (the last snapshot committed from U). U knows
//!   it shares the anchor from the transfer itself, so the pair always
//!   keeps a common snapshot without relying on a set in flight; the next
//!   base alone is not enough under fan-in, where it can move to a snapshot
//!   that arrived from another upstream and that U has not been told about.
//! - A local snapshot named by any effective lock is never removed by
//!   [`Event::DeleteRequested`] without `force`; a forced delete reports every
//!   holder and tells every affected downstream.
//! - Outgoing generations strictly increase, also across restarts (a restart
//!   bumps the epoch in the high 32 bits).
//! - A received set replaces the previous one of its sender only if its
//!   generation is strictly newer: loss, duplication and reordering cannot
//!   leak or drop a lock.
//! - A stale set is always reported (`Action::Stale`); it is only dropped by
//!   the `ReleaseAfter` policy or by an operator, each reported.
//!
//! With `propagate = false` (the canary switch) the node sends empty sets and
//! ignores what it knows about its downstreams; it still protects its own
//! next bases and application locks.

use std::collections::{BTreeMap, BTreeSet};

use uuid::Uuid;

use crate::error::{LockError, Result};
use crate::model::{Bounds, LeasePolicy, LockKind, LockSet, SoftLock};
use crate::wire::{
    PersistDown, PersistNode, PersistNodeV1, PersistNodeV2, PersistSince, PersistUp, WireLock,
    WireLockSet,
};

/// Static configuration of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// This node's name (unique in the cascade).
    pub node_id: String,
    /// Lease we put on the sets we send (ms).
    pub lease_ms: u64,
    /// We re-send every upstream its set at least this often (ms).
    pub renew_every_ms: u64,
    /// What to do with downstream sets whose lease ran out.
    pub policy: LeasePolicy,
    /// Bounds on sets.
    pub bounds: Bounds,
    /// Canary switch: false = do not propagate downstream dependencies.
    pub propagate: bool,
}

impl NodeConfig {
    /// A config with defaults: lease 60 s, renew every 20 s, `Keep` policy.
    pub fn new(node_id: impl Into<String>) -> Self {
        NodeConfig {
            node_id: node_id.into(),
            lease_ms: 60_000,
            renew_every_ms: 20_000,
            policy: LeasePolicy::Keep,
            bounds: Bounds::default(),
            propagate: true,
        }
    }
}

/// Events into the state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// We pull from `upstream`; `relationship` names our destination (path or qtree).
    UpstreamAdded {
        upstream: String,
        relationship: String,
        kind: LockKind,
    },
    /// The relationship with `upstream` is gone.
    UpstreamRemoved { upstream: String },
    /// `downstream` pulls from us.
    DownstreamAdded { downstream: String },
    /// `downstream` no longer pulls from us: its locks go at once.
    DownstreamRemoved { downstream: String },
    /// A local snapshot was taken (it is the newest).
    SnapshotCreated { snapshot: Uuid },
    /// The snapshot list of `upstream` (e.g. from a snapshot-list response).
    UpstreamSnapshots {
        upstream: String,
        snapshots: Vec<Uuid>,
    },
    /// The snapshots we share with `downstream` changed (claim 31).
    DownstreamShared {
        downstream: String,
        shared: Vec<Uuid>,
    },
    /// A lock set arrived from a downstream.
    LockSetReceived { set: LockSet },
    /// An application on this node locks a snapshot (owner-name lock).
    AppLockAdded { snapshot: Uuid, owner: String },
    /// An application released its lock.
    AppLockReleased { snapshot: Uuid, owner: String },
    /// A transfer from `upstream` is about to start (claims 10, 20: send before).
    TransferStarting { upstream: String },
    /// A transfer from `upstream` committed `target` locally (send after).
    TransferFinished { upstream: String, target: Uuid },
    /// `upstream` force-deleted `snapshot` (it told us).
    UpstreamSnapshotGone { upstream: String, snapshot: Uuid },
    /// Time passed: lease checks and renewals.
    Tick,
    /// A node restarted from persisted state: re-send every set.
    Restarted,
    /// Delete a local snapshot (retention, mirror update or operator).
    DeleteRequested { snapshot: Uuid, force: bool },
    /// Operator releases every lock a downstream holds here.
    OperatorRelease { downstream: String },
}

/// Why a downstream's locks were released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseReason {
    /// Lease + grace ran out under `ReleaseAfter`.
    LeaseExpired,
    /// An operator released it.
    Operator,
    /// The relationship was removed.
    RelationshipRemoved,
}

/// Actions out of the state machine; the replicator performs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this whole set to `upstream`.
    SendLockSet { upstream: String, set: LockSet },
    /// Snapshot `snapshot` is now protected by these holders (changed).
    Protected {
        snapshot: Uuid,
        holders: Vec<SoftLock>,
    },
    /// Snapshot `snapshot` is no longer protected.
    Unprotected { snapshot: Uuid },
    /// A downstream's set went stale (not renewed within its lease).
    Stale {
        downstream: String,
        renewed_ms: u64,
        lease_ms: u64,
    },
    /// Locks relayed through `downstream` from `origin` (further down) are
    /// past their origin's lease: `origin` has not renewed them (or the
    /// relay reported them stale). Reported once per going stale; they are
    /// kept under `Keep` and shown stale by [`LockNode::is_stale`].
    RelayedStale {
        downstream: String,
        origin: String,
        renewed_ms: u64,
        lease_ms: u64,
    },
    /// Under `ReleaseAfter`, locks relayed through `downstream` from
    /// `origin` were dropped: their origin's renewal time plus lease and
    /// grace ran out. `unprotected` lists the snapshots that set no longer
    /// names at all.
    RelayedReleased {
        downstream: String,
        origin: String,
        dropped: usize,
        unprotected: Vec<Uuid>,
    },
    /// A downstream's locks were dropped here.
    Released {
        downstream: String,
        reason: ReleaseReason,
    },
    /// A received set was rejected (unknown sender or out of bounds).
    SetRejected { sender: String, error: LockError },
    /// An outgoing set exceeded the bound; the oldest locks were left out.
    SetTruncated { upstream: String, dropped: usize },
    /// The delete was done: the caller deletes the snapshot now.
    Deleted { snapshot: Uuid },
    /// The delete was refused; every holder is named.
    DeleteRefused {
        snapshot: Uuid,
        holders: Vec<SoftLock>,
    },
    /// A forced delete of a locked snapshot (log it); the caller deletes it.
    ForcedDelete {
        snapshot: Uuid,
        holders: Vec<SoftLock>,
    },
    /// Tell `downstream` that `snapshot` is gone here.
    TellSnapshotGone { downstream: String, snapshot: Uuid },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Up {
    relationship: String,
    kind: LockKind,
    has: BTreeSet<Uuid>,
    /// The last snapshot committed from this upstream (see [`LockNode::anchor`]).
    anchor: Option<Uuid>,
    last_sent: Option<Vec<SoftLock>>,
    last_sent_ms: u64,
    gone_acks: BTreeSet<Uuid>,
    /// Since when our own base lock with this upstream holds each snapshot.
    since: BTreeMap<Uuid, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Down {
    shared: BTreeSet<Uuid>,
    received: Option<LockSet>,
    received_ms: u64,
    generation: u64,
    stale: bool,
    lapsed: bool,
    forced_gone: BTreeSet<Uuid>,
    /// Origins (further down) whose relayed locks in `received` are past
    /// their lease, as last reported (not persisted: re-reported after a
    /// restart).
    stale_origins: BTreeSet<String>,
    /// Since when we have shared each snapshot of `shared` with this downstream.
    since: BTreeMap<Uuid, u64>,
}

/// When a lock's own lease ends (`renewed_ms + lease_ms`), `set_lease_ms`
/// standing in for a lease of 0. `None` when the lock carries no renewal
/// time (then only its set's lease applies).
fn lock_expiry(l: &SoftLock, set_lease_ms: u64) -> Option<u64> {
    if l.renewed_ms == 0 {
        return None;
    }
    let lease = if l.lease_ms == 0 {
        set_lease_ms
    } else {
        l.lease_ms
    };
    Some(l.renewed_ms.saturating_add(lease))
}

/// One node's lock table and rules. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockNode {
    cfg: NodeConfig,
    epoch: u32,
    counter: u32,
    local: Vec<Uuid>,
    ups: BTreeMap<String, Up>,
    downs: BTreeMap<String, Down>,
    app: BTreeSet<SoftLock>,
    protected: BTreeMap<Uuid, Vec<SoftLock>>,
}

const PERSIST_MAGIC: &[u8; 4] = b"SLKT";
/// Version of the persisted lock-table format written. 2 added each
/// upstream's anchor; 3 added since when each derived lock holds its
/// snapshot. Versions 1 and 2 are still read (anchors unknown until the next
/// transfer from each upstream; derived locks dated from the restore); any
/// other version is refused.
pub const PERSIST_VERSION: u16 = 3;

impl LockNode {
    /// A fresh node with no relationships.
    pub fn new(cfg: NodeConfig) -> Self {
        LockNode {
            cfg,
            epoch: 0,
            counter: 0,
            local: Vec::new(),
            ups: BTreeMap::new(),
            downs: BTreeMap::new(),
            app: BTreeSet::new(),
            protected: BTreeMap::new(),
        }
    }

    /// This node's config.
    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    /// Switch propagation (canary) on or off.
    pub fn set_propagate(&mut self, on: bool) {
        self.cfg.propagate = on;
    }

    /// Local snapshots, oldest first.
    pub fn snapshots(&self) -> &[Uuid] {
        &self.local
    }

    /// Every lock that protects local snapshot `snapshot` (empty: deletable).
    pub fn holders(&self, snapshot: Uuid) -> Vec<SoftLock> {
        self.effective()
            .into_iter()
            .filter(|l| l.snapshot == snapshot && self.local.contains(&l.snapshot))
            .collect()
    }

    /// Every lock effective on this node (own bases, downstream, app), for status.
    pub fn all_locks(&self) -> Vec<SoftLock> {
        self.effective()
    }

    /// Whether `upstream` is an upstream of this node (we send it sets).
    pub fn has_upstream(&self, upstream: &str) -> bool {
        self.ups.contains_key(upstream)
    }

    /// Downstreams whose set is stale now.
    pub fn stale_downstreams(&self) -> Vec<String> {
        self.downs
            .iter()
            .filter(|(_, d)| d.stale)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Snapshots force-deleted here that `downstream` has not acknowledged yet.
    pub fn pending_gone(&self, downstream: &str) -> Vec<Uuid> {
        self.downs
            .get(downstream)
            .map(|d| d.forced_gone.iter().copied().collect())
            .unwrap_or_default()
    }

    /// The newest snapshot we share with `upstream`: our next incremental base.
    pub fn next_base(&self, upstream: &str) -> Option<Uuid> {
        let up = self.ups.get(upstream)?;
        self.local
            .iter()
            .rev()
            .find(|s| up.has.contains(s))
            .copied()
    }

    /// The anchor with `upstream`: the last snapshot committed from it by a
    /// transfer ([`Event::TransferFinished`]), cleared only by the next
    /// transfer or by [`Event::UpstreamSnapshotGone`].
    ///
    /// Both sides know the anchor without any lock set in flight: the
    /// upstream learns it shares it with us from the transfer itself
    /// ([`Event::DownstreamShared`]), and we keep it locked here as long as
    /// it is the anchor. So the pair always keeps one common snapshot, even
    /// when our newest common snapshot with `upstream` ([`LockNode::next_base`])
    /// came from another upstream (fan-in) and the set naming it has not
    /// reached `upstream` yet.
    pub fn anchor(&self, upstream: &str) -> Option<Uuid> {
        self.ups.get(upstream)?.anchor
    }

    /// Preview a prune: which of `candidates` would be refused and by whom.
    pub fn preview_delete(&self, candidates: &[Uuid]) -> Vec<(Uuid, Vec<SoftLock>)> {
        candidates
            .iter()
            .map(|s| (*s, self.holders(*s)))
            .filter(|(_, h)| !h.is_empty())
            .collect()
    }

    fn lock(
        &self,
        snapshot: Uuid,
        kind: LockKind,
        text: String,
        origin: String,
        now_ms: u64,
    ) -> SoftLock {
        SoftLock {
            snapshot,
            kind,
            text,
            origin_node: origin,
            hop_path: vec![self.cfg.node_id.clone()],
            created_ms: now_ms,
            renewed_ms: now_ms,
            lease_ms: self.cfg.lease_ms,
        }
    }

    /// Locks from downstream knowledge (shared snapshots and relayed sets).
    ///
    /// Each keeps the renewal time of where it lives, never ours: a lock
    /// for a snapshot shared with downstream D is renewed when D last
    /// renewed its set here (on our clock) under D's lease, and a relayed
    /// lock keeps its origin's renewal time and lease. While D's set is
    /// stale here, its locks' leases are cut to end no later than D's set
    /// lease did, so whoever we relay them to sees them stale too (issue
    /// 3/5: stale is always visible, never silent, at every hop).
    fn downstream_locks(&self) -> Vec<SoftLock> {
        let mut out = Vec::new();
        if !self.cfg.propagate {
            return out;
        }
        for (name, d) in &self.downs {
            if d.lapsed {
                continue;
            }
            let set_lease = d
                .received
                .as_ref()
                .map_or(self.cfg.lease_ms, |s| s.lease_ms);
            let deadline = d.received_ms.saturating_add(set_lease);
            let mark = |l: &mut SoftLock| {
                if l.renewed_ms == 0 {
                    l.renewed_ms = d.received_ms;
                }
                if l.lease_ms == 0 {
                    l.lease_ms = set_lease;
                }
                if d.stale {
                    let left = deadline.saturating_sub(l.renewed_ms).max(1);
                    l.lease_ms = l.lease_ms.min(left);
                }
            };
            for s in &d.shared {
                let mut l = self.lock(
                    *s,
                    LockKind::DestinationPath,
                    format!("base of mirror to {name}"),
                    name.clone(),
                    d.since.get(s).copied().unwrap_or(d.received_ms),
                );
                l.renewed_ms = d.received_ms.max(l.created_ms);
                l.lease_ms = set_lease;
                mark(&mut l);
                out.push(l);
            }
            if let Some(set) = &d.received {
                out.extend(set.locks.iter().cloned().map(|mut l| {
                    mark(&mut l);
                    l
                }));
            }
        }
        out
    }

    /// Whether lock `l` (as returned by [`LockNode::all_locks`] or
    /// [`LockNode::holders`]) is stale at `now_ms`: it lives on another node
    /// and either the downstream it came through has a stale set here, or
    /// its own lease (its origin's renewal time plus lease, as relayed) ran
    /// out. Our own and application locks are never stale.
    pub fn is_stale(&self, l: &SoftLock, now_ms: u64) -> bool {
        let me = &self.cfg.node_id;
        if &l.origin_node == me {
            return false;
        }
        let via = match l.hop_path.last() {
            Some(h) if h != me => h,
            _ => &l.origin_node,
        };
        if self.downs.get(via).is_some_and(|d| d.stale) {
            return true;
        }
        lock_expiry(l, self.cfg.lease_ms).is_some_and(|e| now_ms >= e)
    }

    /// Our own locks for the relationship with `upstream`: the next base
    /// (newest snapshot we share) and the anchor (last snapshot committed
    /// from it), when each is still a local snapshot. Usually the same one.
    ///
    /// Each is created (and, being ours, renewed here) when it started to
    /// hold its snapshot ([`LockNode::stamp`]); the copy sent upstream is
    /// renewed at each send.
    fn own_locks_for(&self, upstream: &str) -> Vec<SoftLock> {
        let Some(up) = self.ups.get(upstream) else {
            return Vec::new();
        };
        self.own_snapshots(upstream)
            .into_iter()
            .map(|s| {
                self.lock(
                    s,
                    up.kind,
                    up.relationship.clone(),
                    self.cfg.node_id.clone(),
                    up.since.get(&s).copied().unwrap_or(0),
                )
            })
            .collect()
    }

    /// The snapshots our own locks for `upstream` hold: the next base and
    /// the anchor.
    fn own_snapshots(&self, upstream: &str) -> Vec<Uuid> {
        let Some(up) = self.ups.get(upstream) else {
            return Vec::new();
        };
        let mut snaps: Vec<Uuid> = self.next_base(upstream).into_iter().collect();
        if let Some(a) = up.anchor {
            if self.local.contains(&a) && !snaps.contains(&a) {
                snaps.push(a);
            }
        }
        snaps
    }

    /// Date the derived locks: each own base lock and each shared-base lock
    /// remembers when it started to hold its snapshot (`now_ms` for the
    /// ones new since the last stamp) and forgets the ones that ended.
    fn stamp(&mut self, now_ms: u64) {
        let own: Vec<(String, Vec<Uuid>)> = self
            .ups
            .keys()
            .map(|u| (u.clone(), self.own_snapshots(u)))
            .collect();
        for (u, snaps) in own {
            if let Some(up) = self.ups.get_mut(&u) {
                up.since.retain(|s, _| snaps.contains(s));
                for s in snaps {
                    up.since.entry(s).or_insert(now_ms);
                }
            }
        }
        for d in self.downs.values_mut() {
            let shared = &d.shared;
            d.since.retain(|s, _| shared.contains(s));
            for s in &d.shared {
                d.since.entry(*s).or_insert(now_ms);
            }
        }
    }

    fn own_base_locks(&self) -> Vec<SoftLock> {
        self.ups
            .keys()
            .flat_map(|u| self.own_locks_for(u))
            .collect()
    }

    fn effective(&self) -> Vec<SoftLock> {
        let mut v = self.own_base_locks();
        v.extend(self.downstream_locks());
        v.extend(self.app.iter().cloned());
        v.sort();
        v.dedup_by(|a, b| a.key() == b.key());
        v
    }

    fn outgoing(&self, upstream: &str) -> (Vec<SoftLock>, usize) {
        let Some(up) = self.ups.get(upstream) else {
            return (Vec::new(), 0);
        };
        if !self.cfg.propagate {
            return (Vec::new(), 0);
        }
        let me = &self.cfg.node_id;
        let mut v: Vec<SoftLock> = self.own_locks_for(upstream);
        for mut l in self.downstream_locks() {
            if l.hop_path.last() != Some(me) {
                l.hop_path.push(me.clone());
            }
            v.push(l);
        }
        v.extend(self.app.iter().cloned());
        v.retain(|l| up.has.contains(&l.snapshot) && l.hop_path.len() <= self.cfg.bounds.max_hops);
        v.sort();
        v.dedup_by(|a, b| a.key() == b.key());
        let max = self.cfg.bounds.max_locks_per_set;
        let dropped = v.len().saturating_sub(max);
        v.truncate(max);
        (v, dropped)
    }

    fn send(&mut self, upstream: &str, now_ms: u64, force: bool, out: &mut Vec<Action>) {
        self.stamp(now_ms);
        let (locks, dropped) = self.outgoing(upstream);
        let next_gen = self.next_generation();
        let lease_ms = self.cfg.lease_ms;
        let sender = self.cfg.node_id.clone();
        let Some(up) = self.ups.get_mut(upstream) else {
            return;
        };
        if !force && up.last_sent.as_ref() == Some(&locks) {
            return;
        }
        up.last_sent = Some(locks.clone());
        up.last_sent_ms = now_ms;
        self.counter = self.counter.wrapping_add(1);
        // We renew only what lives here (our bases, application locks);
        // relayed and shared locks keep the renewal time of where they live.
        let mut locks = locks;
        for l in &mut locks {
            if l.origin_node == sender {
                l.renewed_ms = now_ms;
            }
            if l.created_ms == 0 {
                l.created_ms = l.renewed_ms;
            }
        }
        let gone_acks = up.gone_acks.iter().copied().collect();
        if dropped > 0 {
            out.push(Action::SetTruncated {
                upstream: upstream.to_string(),
                dropped,
            });
        }
        out.push(Action::SendLockSet {
            upstream: upstream.to_string(),
            set: LockSet {
                sender,
                generation: next_gen,
                lease_ms,
                locks,
                gone_acks,
            },
        });
    }

    fn next_generation(&self) -> u64 {
        (u64::from(self.epoch) << 32) | u64::from(self.counter.wrapping_add(1))
    }

    fn send_changed(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        let names: Vec<String> = self.ups.keys().cloned().collect();
        for u in names {
            self.send(&u, now_ms, false, out);
        }
    }

    fn refresh_protection(&mut self, out: &mut Vec<Action>) {
        let mut now: BTreeMap<Uuid, Vec<SoftLock>> = BTreeMap::new();
        for l in self.effective() {
            if self.local.contains(&l.snapshot) {
                now.entry(l.snapshot).or_default().push(l);
            }
        }
        for (s, h) in &now {
            if self.protected.get(s) != Some(h) {
                out.push(Action::Protected {
                    snapshot: *s,
                    holders: h.clone(),
                });
            }
        }
        for s in self.protected.keys() {
            if !now.contains_key(s) {
                out.push(Action::Unprotected { snapshot: *s });
            }
        }
        self.protected = now;
    }

    /// Feed one event at time `now_ms`; returns the actions to perform, in order.
    pub fn handle(&mut self, now_ms: u64, ev: Event) -> Vec<Action> {
        let mut out = Vec::new();
        match ev {
            Event::UpstreamAdded {
                upstream,
                relationship,
                kind,
            } => {
                self.ups.entry(upstream).or_insert(Up {
                    relationship,
                    kind,
                    has: BTreeSet::new(),
                    anchor: None,
                    last_sent: None,
                    last_sent_ms: now_ms,
                    gone_acks: BTreeSet::new(),
                    since: BTreeMap::new(),
                });
            }
            Event::UpstreamRemoved { upstream } => {
                self.ups.remove(&upstream);
            }
            Event::DownstreamAdded { downstream } => {
                self.downs.entry(downstream).or_insert_with(|| Down {
                    received_ms: now_ms,
                    ..Down::default()
                });
            }
            Event::DownstreamRemoved { downstream } => {
                if self.downs.remove(&downstream).is_some() {
                    out.push(Action::Released {
                        downstream,
                        reason: ReleaseReason::RelationshipRemoved,
                    });
                }
            }
            Event::SnapshotCreated { snapshot } => {
                if !self.local.contains(&snapshot) {
                    self.local.push(snapshot);
                }
            }
            Event::UpstreamSnapshots {
                upstream,
                snapshots,
            } => {
                if let Some(up) = self.ups.get_mut(&upstream) {
                    up.has = snapshots.into_iter().collect();
                }
            }
            Event::DownstreamShared { downstream, shared } => {
                if let Some(d) = self.downs.get_mut(&downstream) {
                    d.shared = shared.into_iter().collect();
                }
            }
            Event::LockSetReceived { set } => self.receive(now_ms, set, &mut out),
            Event::AppLockAdded { snapshot, owner } => {
                let l = self.lock(
                    snapshot,
                    LockKind::OwnerName,
                    owner,
                    self.cfg.node_id.clone(),
                    now_ms,
                );
                if !self.app.iter().any(|a| a.key() == l.key()) {
                    self.app.insert(l);
                }
            }
            Event::AppLockReleased { snapshot, owner } => {
                self.app
                    .retain(|a| !(a.snapshot == snapshot && a.text == owner));
            }
            Event::TransferStarting { upstream } => self.send(&upstream, now_ms, true, &mut out),
            Event::TransferFinished { upstream, target } => {
                if let Some(up) = self.ups.get_mut(&upstream) {
                    up.has.insert(target);
                    up.anchor = Some(target);
                    if !self.local.contains(&target) {
                        self.local.push(target);
                    }
                }
                self.send(&upstream, now_ms, true, &mut out);
            }
            Event::UpstreamSnapshotGone { upstream, snapshot } => {
                if let Some(up) = self.ups.get_mut(&upstream) {
                    up.has.remove(&snapshot);
                    if up.anchor == Some(snapshot) {
                        up.anchor = None;
                    }
                    up.gone_acks.insert(snapshot);
                    self.send(&upstream, now_ms, true, &mut out);
                }
            }
            Event::Tick => self.tick(now_ms, &mut out),
            Event::Restarted => {
                let names: Vec<String> = self.ups.keys().cloned().collect();
                for u in names {
                    self.send(&u, now_ms, true, &mut out);
                }
            }
            Event::DeleteRequested { snapshot, force } => self.delete(snapshot, force, &mut out),
            Event::OperatorRelease { downstream } => {
                if let Some(d) = self.downs.get_mut(&downstream) {
                    d.received = None;
                    d.lapsed = true;
                    d.stale = false;
                    out.push(Action::Released {
                        downstream,
                        reason: ReleaseReason::Operator,
                    });
                }
            }
        }
        self.stamp(now_ms);
        self.send_changed(now_ms, &mut out);
        self.refresh_protection(&mut out);
        out
    }

    fn receive(&mut self, now_ms: u64, set: LockSet, out: &mut Vec<Action>) {
        if let Err(error) = set.validate(&self.cfg.bounds) {
            out.push(Action::SetRejected {
                sender: set.sender,
                error,
            });
            return;
        }
        let Some(d) = self.downs.get_mut(&set.sender) else {
            let error = LockError::BadField {
                field: "set.sender",
                detail: format!(
                    "{:?} is not a downstream of {:?}",
                    set.sender, self.cfg.node_id
                ),
            };
            out.push(Action::SetRejected {
                sender: set.sender,
                error,
            });
            return;
        };
        if set.generation <= d.generation {
            return; // older or duplicate: ignored by design
        }
        d.generation = set.generation;
        for g in &set.gone_acks {
            d.forced_gone.remove(g);
        }
        d.received_ms = now_ms;
        d.stale = false;
        d.lapsed = false;
        d.received = Some(set);
    }

    fn tick(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        for (name, d) in self.downs.iter_mut() {
            if d.lapsed {
                continue;
            }
            // A downstream that never sent a set is held to our own lease
            // from the moment it was added, so a dead one cannot pin forever.
            let lease_ms = d
                .received
                .as_ref()
                .map_or(self.cfg.lease_ms, |s| s.lease_ms);
            let deadline = d.received_ms.saturating_add(lease_ms);
            if now_ms >= deadline && !d.stale {
                d.stale = true;
                out.push(Action::Stale {
                    downstream: name.clone(),
                    renewed_ms: d.received_ms,
                    lease_ms,
                });
            }
            if let LeasePolicy::ReleaseAfter { grace_ms } = self.cfg.policy {
                if now_ms >= deadline.saturating_add(grace_ms) {
                    d.received = None;
                    d.lapsed = true;
                    d.stale = false;
                    out.push(Action::Released {
                        downstream: name.clone(),
                        reason: ReleaseReason::LeaseExpired,
                    });
                }
            }
        }
        self.tick_relayed(now_ms, out);
        let due: Vec<String> = self
            .ups
            .iter()
            .filter(|(_, u)| now_ms.saturating_sub(u.last_sent_ms) >= self.cfg.renew_every_ms)
            .map(|(n, _)| n.clone())
            .collect();
        for u in due {
            self.send(&u, now_ms, true, out);
        }
    }

    /// Leases of relayed locks, by their origin's renewal time: a lock that
    /// lives further down (origin other than the downstream that sent it)
    /// turns stale here when its own lease ran out, even while the relaying
    /// downstream keeps renewing its set (reported once, `RelayedStale`);
    /// under `ReleaseAfter` it is dropped `grace_ms` later
    /// (`RelayedReleased`), exactly as its origin's set would have been by
    /// its direct upstream.
    fn tick_relayed(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        let grace = match self.cfg.policy {
            LeasePolicy::Keep => None,
            LeasePolicy::ReleaseAfter { grace_ms } => Some(grace_ms),
        };
        for (name, d) in self.downs.iter_mut() {
            if d.lapsed {
                continue;
            }
            let Some(set) = d.received.as_mut() else {
                d.stale_origins.clear();
                continue;
            };
            let set_lease = set.lease_ms;
            let relayed = |l: &SoftLock| &l.origin_node != name;
            if let Some(grace_ms) = grace {
                let mut dropped: BTreeMap<String, (usize, BTreeSet<Uuid>)> = BTreeMap::new();
                set.locks.retain(|l| {
                    let gone = relayed(l)
                        && lock_expiry(l, set_lease)
                            .is_some_and(|e| now_ms >= e.saturating_add(grace_ms));
                    if gone {
                        let e = dropped.entry(l.origin_node.clone()).or_default();
                        e.0 += 1;
                        e.1.insert(l.snapshot);
                    }
                    !gone
                });
                for (origin, (n, snaps)) in dropped {
                    let unprotected = snaps
                        .into_iter()
                        .filter(|s| !set.locks.iter().any(|l| l.snapshot == *s))
                        .collect();
                    out.push(Action::RelayedReleased {
                        downstream: name.clone(),
                        origin,
                        dropped: n,
                        unprotected,
                    });
                }
            }
            let mut now_stale: BTreeMap<String, (u64, u64)> = BTreeMap::new();
            for l in set.locks.iter().filter(|l| relayed(l)) {
                if lock_expiry(l, set_lease).is_some_and(|e| now_ms >= e) {
                    now_stale
                        .entry(l.origin_node.clone())
                        .or_insert((l.renewed_ms, l.lease_ms));
                }
            }
            for (origin, (renewed_ms, lease_ms)) in &now_stale {
                if !d.stale_origins.contains(origin) {
                    out.push(Action::RelayedStale {
                        downstream: name.clone(),
                        origin: origin.clone(),
                        renewed_ms: *renewed_ms,
                        lease_ms: *lease_ms,
                    });
                }
            }
            d.stale_origins = now_stale.into_keys().collect();
        }
    }

    fn delete(&mut self, snapshot: Uuid, force: bool, out: &mut Vec<Action>) {
        let holders = self.holders(snapshot);
        if !holders.is_empty() && !force {
            out.push(Action::DeleteRefused { snapshot, holders });
            return;
        }
        self.local.retain(|s| *s != snapshot);
        if holders.is_empty() {
            out.push(Action::Deleted { snapshot });
            return;
        }
        let me = self.cfg.node_id.clone();
        let affected: BTreeSet<String> = holders
            .iter()
            .map(|h| h.origin_node.clone())
            .chain(holders.iter().flat_map(|h| h.hop_path.iter().cloned()))
            .filter(|n| *n != me)
            .collect();
        out.push(Action::ForcedDelete { snapshot, holders });
        for (name, d) in self.downs.iter_mut() {
            if affected.contains(name) || d.shared.contains(&snapshot) {
                d.shared.remove(&snapshot);
                d.forced_gone.insert(snapshot);
                out.push(Action::TellSnapshotGone {
                    downstream: name.clone(),
                    snapshot,
                });
            }
        }
    }

    /// Lock error for a refused delete (for callers that want a `Result`).
    pub fn delete_error(snapshot: Uuid, holders: &[SoftLock]) -> LockError {
        LockError::Locked {
            snapshot,
            holders: holders
                .iter()
                .map(|h| h.to_string())
                .collect::<Vec<_>>()
                .join("; "),
        }
    }

    /// Serialize the lock table (versioned) for persistence across restarts.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let p = PersistNode {
            node_id: self.cfg.node_id.clone(),
            epoch: self.epoch,
            counter: self.counter,
            local: self.local.iter().map(|u| *u.as_bytes()).collect(),
            ups: self
                .ups
                .iter()
                .map(|(n, u)| PersistUp {
                    name: n.clone(),
                    relationship: u.relationship.clone(),
                    kind: u.kind.code(),
                    has: u.has.iter().map(|s| *s.as_bytes()).collect(),
                    anchor: u.anchor.map(|s| *s.as_bytes()),
                    gone_acks: u.gone_acks.iter().map(|s| *s.as_bytes()).collect(),
                })
                .collect(),
            downs: self
                .downs
                .iter()
                .map(|(n, d)| PersistDown {
                    name: n.clone(),
                    shared: d.shared.iter().map(|s| *s.as_bytes()).collect(),
                    received: d.received.as_ref().map(WireLockSet::from_model),
                    received_ms: d.received_ms,
                    generation: d.generation,
                    stale: d.stale,
                    lapsed: d.lapsed,
                    forced_gone: d.forced_gone.iter().map(|s| *s.as_bytes()).collect(),
                })
                .collect(),
            app: self.app.iter().map(WireLock::from_model).collect(),
            since: self.persist_since(),
        };
        let body = rkyv::to_bytes::<rkyv::rancor::Error>(&p).map_err(|e| LockError::Encode {
            what: "lock table",
            detail: e.to_string(),
        })?;
        let mut out = Vec::with_capacity(8 + body.len());
        out.extend_from_slice(PERSIST_MAGIC);
        out.extend_from_slice(&PERSIST_VERSION.to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&body);
        Ok(out)
    }

    fn persist_since(&self) -> Vec<PersistSince> {
        let ups = self.ups.iter().flat_map(|(n, u)| {
            u.since.iter().map(move |(s, ms)| PersistSince {
                peer: n.clone(),
                upstream: true,
                snapshot: *s.as_bytes(),
                ms: *ms,
            })
        });
        let downs = self.downs.iter().flat_map(|(n, d)| {
            d.since.iter().map(move |(s, ms)| PersistSince {
                peer: n.clone(),
                upstream: false,
                snapshot: *s.as_bytes(),
                ms: *ms,
            })
        });
        ups.chain(downs).collect()
    }

    /// Restore a lock table written by [`LockNode::to_bytes`]. The epoch is
    /// bumped so generations sent after the restart exceed all earlier ones;
    /// feed [`Event::Restarted`] next to re-send every set.
    pub fn from_bytes(cfg: NodeConfig, bytes: &[u8]) -> Result<Self> {
        let head = bytes.get(..8).ok_or(LockError::Truncated {
            need: 8,
            have: bytes.len(),
        })?;
        if &head[..4] != PERSIST_MAGIC {
            return Err(LockError::BadPersisted("missing SLKT magic".into()));
        }
        let ver = u16::from_le_bytes([head[4], head[5]]);
        let mut al = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len() - 8);
        al.extend_from_slice(&bytes[8..]);
        let p: PersistNode = match ver {
            PERSIST_VERSION => rkyv::from_bytes::<PersistNode, rkyv::rancor::Error>(&al)
                .map_err(|e| LockError::BadPersisted(e.to_string()))?,
            2 => rkyv::from_bytes::<PersistNodeV2, rkyv::rancor::Error>(&al)
                .map_err(|e| LockError::BadPersisted(format!("version 2 table: {e}")))?
                .into(),
            1 => PersistNodeV2::from(
                rkyv::from_bytes::<PersistNodeV1, rkyv::rancor::Error>(&al)
                    .map_err(|e| LockError::BadPersisted(format!("version 1 table: {e}")))?,
            )
            .into(),
            found => {
                return Err(LockError::PersistedVersion {
                    found,
                    supported: PERSIST_VERSION,
                })
            }
        };
        if p.node_id != cfg.node_id {
            return Err(LockError::BadPersisted(format!(
                "table belongs to node {:?}, not {:?}",
                p.node_id, cfg.node_id
            )));
        }
        let mut n = LockNode::new(cfg);
        n.epoch = p
            .epoch
            .checked_add(1)
            .ok_or_else(|| LockError::BadPersisted("epoch exhausted".into()))?;
        n.counter = 0;
        n.local = p.local.iter().map(|b| Uuid::from_bytes(*b)).collect();
        for u in p.ups {
            let kind = LockKind::from_code(u.kind)?;
            n.ups.insert(
                u.name,
                Up {
                    relationship: u.relationship,
                    kind,
                    has: u.has.iter().map(|b| Uuid::from_bytes(*b)).collect(),
                    anchor: u.anchor.map(Uuid::from_bytes),
                    last_sent: None,
                    last_sent_ms: 0,
                    gone_acks: u.gone_acks.iter().map(|b| Uuid::from_bytes(*b)).collect(),
                    since: BTreeMap::new(),
                },
            );
        }
        for d in p.downs {
            let received = match d.received {
                Some(s) => Some(s.to_model()?),
                None => None,
            };
            n.downs.insert(
                d.name,
                Down {
                    shared: d.shared.iter().map(|b| Uuid::from_bytes(*b)).collect(),
                    received,
                    received_ms: d.received_ms,
                    generation: d.generation,
                    stale: d.stale,
                    lapsed: d.lapsed,
                    forced_gone: d.forced_gone.iter().map(|b| Uuid::from_bytes(*b)).collect(),
                    stale_origins: BTreeSet::new(),
                    since: BTreeMap::new(),
                },
            );
        }
        for t in p.since {
            let snapshot = Uuid::from_bytes(t.snapshot);
            let since = if t.upstream {
                n.ups.get_mut(&t.peer).map(|u| &mut u.since)
            } else {
                n.downs.get_mut(&t.peer).map(|d| &mut d.since)
            };
            if let Some(since) = since {
                since.insert(snapshot, t.ms);
            }
        }
        for l in p.app {
            n.app.insert(l.to_model()?);
        }
        let mut sink = Vec::new();
        n.refresh_protection(&mut sink);
        Ok(n)
    }
}

/// Convenience: turn a `DeleteRefused` into an error naming every holder.
pub fn refused_to_error(a: &Action) -> Option<LockError> {
    match a {
        Action::DeleteRefused { snapshot, holders } => {
            Some(LockNode::delete_error(*snapshot, holders))
        }
        _ => None,
    }
}
