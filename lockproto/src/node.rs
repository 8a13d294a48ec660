//! The sans-IO soft-lock propagation state machine: one [`LockNode`] per node.
//!
//! Owns every soft-lock rule (docs/REPLICATION.md, "Soft locks"): which locks this node sends to
//! each upstream (claims 30, 31, 35, 56), when (before and after each
//! transfer: claims 10, 20; whenever the set changes; on lease renewal),
//! which local snapshots are protected and by whom, refusing or forcing
//! deletes (claims 60-69), leases and stale reporting, and persistence.
//!
//! One `LockNode` covers all volumes of a node. Everything is keyed by
//! **relationship**, never by peer node alone: a node may pull several
//! volumes (and qtrees) from one upstream and serve several to one
//! downstream, and each relationship keeps its own base, anchor, set and
//! lease.
//! - An upstream relationship is named by our destination path (`vol0`,
//!   `qv/db`); it knows the upstream node, the upstream's source volume and
//!   our local volume.
//! - A downstream relationship is named by (downstream node, its
//!   destination path); it knows which of our volumes it pulls.
//! - Local snapshots are kept per volume: one global snapshot id may exist
//!   in two local volumes (a volume mirror and a qtree mirror of the same
//!   source), and a lock holds the snapshot in exactly one of them.
//!
//! Invariants kept:
//! - For every upstream relationship R we lock our next base with R (the
//!   newest snapshot of R's local volume that R's source has) and the anchor
//!   (the last snapshot committed through R). The upstream knows it shares
//!   the anchor from the transfer itself, so the pair always keeps a common
//!   snapshot without relying on a set in flight.
//! - A lock on a snapshot this node has travels up even when the upstream
//!   force-deleted that snapshot: the nodes above it keep it, so a
//!   re-attach past that upstream stays incremental.
//! - A local snapshot named by any effective lock on its volume is never
//!   removed by [`Event::DeleteRequested`] without `force`; a forced delete
//!   reports every holder and tells every affected downstream relationship.
//! - Outgoing generations strictly increase across all sets of this node,
//!   also across restarts (a restart bumps the epoch in the high 32 bits).
//! - A received set replaces the previous one of its (sender, relationship)
//!   only if its generation is strictly newer: loss, duplication and
//!   reordering cannot leak or drop a lock.
//! - Outgoing sets are never cut: every lock is sent (a set too big for one
//!   frame travels in parts, see `wire::WireLockSet::split`).
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
    PersistApp, PersistDown, PersistNode, PersistNodeV1, PersistNodeV2, PersistNodeV3,
    PersistSince, PersistUp, WireLock, WireLockSet,
};

/// A downstream relationship: (downstream node, its destination path).
pub type DownKey = (String, String);

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
    /// We pull `source` from node `upstream` into local `volume`, as
    /// relationship `relationship` (our destination path). Also updates an
    /// existing relationship: a new upstream node (retarget) gets a fresh
    /// set and the former upstream a final empty one.
    UpstreamAdded {
        relationship: String,
        upstream: String,
        source: String,
        volume: String,
        kind: LockKind,
    },
    /// The relationship is gone: its upstream gets a final empty set (it
    /// releases everything the relationship held there), then nothing more.
    UpstreamRemoved { relationship: String },
    /// `downstream` pulls our `volume` as its relationship `relationship`.
    DownstreamAdded {
        downstream: String,
        relationship: String,
        volume: String,
    },
    /// That downstream relationship ended: its locks go at once.
    DownstreamRemoved {
        downstream: String,
        relationship: String,
    },
    /// A snapshot of local `volume` was taken (it is the newest).
    SnapshotCreated { volume: String, snapshot: Uuid },
    /// The snapshots of local `volume` are exactly these, oldest first
    /// (reconciliation with the engine at start).
    VolumeSnapshots {
        volume: String,
        snapshots: Vec<Uuid>,
    },
    /// Local `volume` was deleted (with every snapshot and application lock).
    VolumeRemoved { volume: String },
    /// The snapshot list of a relationship's source.
    UpstreamSnapshots {
        relationship: String,
        snapshots: Vec<Uuid>,
    },
    /// The snapshots we share with a downstream relationship (claim 31).
    DownstreamShared {
        downstream: String,
        relationship: String,
        shared: Vec<Uuid>,
    },
    /// A lock set arrived from a downstream (an older or duplicate one
    /// changes nothing; see [`LockNode::generation_of`]).
    LockSetReceived { set: LockSet },
    /// An application on this node locks `volume@snapshot` (owner-name lock).
    AppLockAdded {
        volume: String,
        snapshot: Uuid,
        owner: String,
    },
    /// An application released its lock.
    AppLockReleased {
        volume: String,
        snapshot: Uuid,
        owner: String,
    },
    /// A transfer of `relationship` is about to start (claims 10, 20: send before).
    TransferStarting { relationship: String },
    /// A transfer of `relationship` committed `target` locally (send after).
    TransferFinished { relationship: String, target: Uuid },
    /// The upstream of `relationship` force-deleted `snapshot` (it told us).
    UpstreamSnapshotGone {
        relationship: String,
        snapshot: Uuid,
    },
    /// Time passed: lease checks and renewals.
    Tick,
    /// A node restarted from persisted state: re-send every set.
    Restarted,
    /// Delete `volume@snapshot` (retention, mirror update or operator).
    DeleteRequested {
        volume: String,
        snapshot: Uuid,
        force: bool,
    },
    /// Operator releases every lock a downstream holds here (all its
    /// relationships, or one).
    OperatorRelease {
        downstream: String,
        relationship: Option<String>,
    },
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
    /// Send this whole set of `relationship` to node `upstream`.
    SendLockSet {
        relationship: String,
        upstream: String,
        set: LockSet,
    },
    /// `volume@snapshot` is now protected by these holders (changed).
    Protected {
        volume: String,
        snapshot: Uuid,
        holders: Vec<SoftLock>,
    },
    /// `volume@snapshot` is no longer protected.
    Unprotected { volume: String, snapshot: Uuid },
    /// A downstream relationship's set went stale (not renewed within its lease).
    Stale {
        downstream: String,
        relationship: String,
        renewed_ms: u64,
        lease_ms: u64,
    },
    /// Locks relayed through a downstream relationship from `origin`
    /// (further down) are past their origin's lease. Reported once per going
    /// stale; kept under `Keep` and shown stale by [`LockNode::is_stale`].
    RelayedStale {
        downstream: String,
        relationship: String,
        origin: String,
        renewed_ms: u64,
        lease_ms: u64,
    },
    /// Under `ReleaseAfter`, locks relayed through a downstream relationship
    /// from `origin` were dropped: their origin's renewal time plus lease and
    /// grace ran out. `unprotected` lists the snapshots that set no longer
    /// names at all.
    RelayedReleased {
        downstream: String,
        relationship: String,
        origin: String,
        dropped: usize,
        unprotected: Vec<Uuid>,
    },
    /// A downstream relationship's locks were dropped here.
    Released {
        downstream: String,
        relationship: String,
        reason: ReleaseReason,
    },
    /// A received set was rejected (unknown sender or out of bounds).
    SetRejected { sender: String, error: LockError },
    /// An outgoing set holds more locks than the upstream accepts
    /// (`Bounds::max_locks_per_set`): it is sent whole anyway and will be
    /// refused there, which keeps the upstream's previous set. Loud, never
    /// a silent cut.
    SetOverBound {
        relationship: String,
        count: usize,
        max: usize,
    },
    /// The delete was done: the caller deletes the snapshot now.
    Deleted { volume: String, snapshot: Uuid },
    /// The delete was refused; every holder is named.
    DeleteRefused {
        volume: String,
        snapshot: Uuid,
        holders: Vec<SoftLock>,
    },
    /// A forced delete of a locked snapshot (log it); the caller deletes it.
    ForcedDelete {
        volume: String,
        snapshot: Uuid,
        holders: Vec<SoftLock>,
    },
    /// Tell a downstream relationship that `snapshot` is gone here.
    TellSnapshotGone {
        downstream: String,
        relationship: String,
        snapshot: Uuid,
    },
}

/// One effective lock on this node: the lock, the local volume whose
/// snapshot it holds, and the downstream relationship it came through
/// (`None` for our own and application locks).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Held {
    /// The local volume the lock protects a snapshot of.
    pub volume: String,
    /// The lock.
    pub lock: SoftLock,
    /// The downstream relationship it came through.
    pub via: Option<DownKey>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Up {
    upstream: String,
    source: String,
    volume: String,
    kind: LockKind,
    has: BTreeSet<Uuid>,
    /// The last snapshot committed through this relationship (see [`LockNode::anchor`]).
    anchor: Option<Uuid>,
    last_sent: Option<Vec<SoftLock>>,
    last_sent_ms: u64,
    gone_acks: BTreeSet<Uuid>,
    /// Since when our own base lock of this relationship holds each snapshot.
    since: BTreeMap<Uuid, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Down {
    /// Our volume it pulls; `None` only for a set upgraded from a format-3
    /// table (its locks then hold the snapshot in any volume that has it).
    volume: Option<String>,
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
    /// Since when we have shared each snapshot of `shared` with it.
    since: BTreeMap<Uuid, u64>,
}

/// What a source shares with a downstream relationship once it took a new
/// set from it: the snapshots of ours (`local`, oldest first) the set's own
/// locks name (`named`), and what it shared `before` that is newer than all
/// of those: a target it served that a set made before that transfer
/// committed cannot name yet (the downstream names it, or something newer,
/// once it has it). A set that names nothing of ours ends every share.
pub fn next_shared(
    local: &[Uuid],
    before: &BTreeSet<Uuid>,
    named: &BTreeSet<Uuid>,
) -> BTreeSet<Uuid> {
    let at = |s: &Uuid| local.iter().position(|x| x == s);
    let named: BTreeSet<Uuid> = named.iter().filter(|s| at(s).is_some()).copied().collect();
    let Some(newest) = named.iter().filter_map(at).max() else {
        return BTreeSet::new();
    };
    let newer = before.iter().filter(|s| at(s).is_some_and(|i| i > newest));
    named.iter().chain(newer).copied().collect()
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

/// The dataset id of a relationship end: `node/path`.
fn dataset(node: &str, path: &str) -> String {
    if path.is_empty() {
        node.to_string()
    } else {
        format!("{node}/{path}")
    }
}

/// The local volume a destination path writes (`vol` of `vol/qtree`).
fn path_volume(path: &str) -> &str {
    path.split('/').next().unwrap_or(path)
}

/// One node's lock table and rules. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockNode {
    cfg: NodeConfig,
    epoch: u32,
    counter: u32,
    /// Per volume, its snapshots oldest first. The volume "" holds the
    /// snapshots of a table upgraded from format 3 until the engine says
    /// which volume each belongs to ([`Event::VolumeSnapshots`]).
    local: BTreeMap<String, SnapList>,
    ups: BTreeMap<String, Up>,
    downs: BTreeMap<DownKey, Down>,
    /// Application locks per volume ("" as for `local`).
    app: BTreeMap<String, BTreeSet<SoftLock>>,
    /// Holders of each protected (volume, snapshot), as of the last event.
    protected: BTreeMap<(String, Uuid), Vec<Held>>,
}

/// What [`LockNode::outgoing_with`] needs beyond the relationship.
#[derive(Default)]
struct OutgoingContext {
    /// Downstream locks, by the local volume they hold.
    downstream: BTreeMap<String, Vec<Held>>,
    /// Upstream relationships per local volume.
    upstreams: BTreeMap<String, usize>,
}

/// A volume's snapshots, oldest first, with a hash index: membership is
/// O(1), so rebuilding the protection map costs O(locks), not O(locks x
/// snapshots).
#[derive(Debug, Clone, Default)]
struct SnapList {
    order: Vec<Uuid>,
    set: std::collections::HashSet<Uuid>,
}

impl PartialEq for SnapList {
    fn eq(&self, other: &SnapList) -> bool {
        self.order == other.order
    }
}

impl Eq for SnapList {}

impl SnapList {
    fn of(ids: Vec<Uuid>) -> SnapList {
        let set = ids.iter().copied().collect();
        SnapList { order: ids, set }
    }
    fn contains(&self, s: &Uuid) -> bool {
        self.set.contains(s)
    }
    /// Add `s` as the newest, unless it is there already.
    fn push(&mut self, s: Uuid) {
        if self.set.insert(s) {
            self.order.push(s);
        }
    }
    fn retain(&mut self, mut keep: impl FnMut(&Uuid) -> bool) {
        let set = &mut self.set;
        self.order.retain(|s| {
            let k = keep(s);
            if !k {
                set.remove(s);
            }
            k
        });
    }
    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

const PERSIST_MAGIC: &[u8; 4] = b"SLKT";
/// Version of the persisted lock-table format written. 2 added each
/// upstream's anchor; 3 added since when each derived lock holds its
/// snapshot; 4 keys everything by relationship and snapshots by volume.
/// Versions 1-3 are still read (upgraded: see [`LockNode::from_bytes`]);
/// any other version is refused.
pub const PERSIST_VERSION: u16 = 4;

impl LockNode {
    /// A fresh node with no relationships.
    pub fn new(cfg: NodeConfig) -> Self {
        LockNode {
            cfg,
            epoch: 0,
            counter: 0,
            local: BTreeMap::new(),
            ups: BTreeMap::new(),
            downs: BTreeMap::new(),
            app: BTreeMap::new(),
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

    /// Snapshots of local `volume`, oldest first.
    pub fn snapshots(&self, volume: &str) -> &[Uuid] {
        self.local.get(volume).map_or(&[], |l| l.order.as_slice())
    }

    /// Whether local `volume` holds `snapshot`.
    pub fn has_snapshot(&self, volume: &str, snapshot: Uuid) -> bool {
        self.local
            .get(volume)
            .is_some_and(|l| l.contains(&snapshot))
    }

    /// Every lock that protects `volume@snapshot` (empty: deletable).
    pub fn holders(&self, volume: &str, snapshot: Uuid) -> Vec<Held> {
        self.protected
            .get(&(volume.to_string(), snapshot))
            .cloned()
            .unwrap_or_default()
    }

    /// Every lock effective on this node (own bases, downstream, app), for status.
    pub fn all_locks(&self) -> Vec<Held> {
        self.effective()
    }

    /// Whether `relationship` is an upstream relationship of this node.
    pub fn has_upstream(&self, relationship: &str) -> bool {
        self.ups.contains_key(relationship)
    }

    /// Every upstream relationship's name.
    pub fn upstream_relationships(&self) -> Vec<String> {
        self.ups.keys().cloned().collect()
    }

    /// Every local volume the table knows snapshots of.
    pub fn volumes(&self) -> Vec<String> {
        self.local.keys().cloned().collect()
    }

    /// The upstream node of `relationship`.
    pub fn upstream_of(&self, relationship: &str) -> Option<&str> {
        self.ups.get(relationship).map(|u| u.upstream.as_str())
    }

    /// Downstream relationships whose set is stale now.
    pub fn stale_downstreams(&self) -> Vec<DownKey> {
        self.downs
            .iter()
            .filter(|(_, d)| d.stale)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The snapshots we share with downstream relationship `key`.
    pub fn shared_with(&self, key: &DownKey) -> BTreeSet<Uuid> {
        self.downs
            .get(key)
            .map(|d| d.shared.clone())
            .unwrap_or_default()
    }

    /// The generation of the last set the table took from downstream
    /// relationship `key` (0: none yet): a set it was just handed was
    /// taken iff this is now that set's generation.
    pub fn generation_of(&self, key: &DownKey) -> u64 {
        self.downs.get(key).map_or(0, |d| d.generation)
    }

    /// Every downstream relationship: (node, relationship, our volume).
    pub fn downstreams(&self) -> Vec<(DownKey, Option<String>)> {
        self.downs
            .iter()
            .map(|(k, d)| (k.clone(), d.volume.clone()))
            .collect()
    }

    /// Snapshots force-deleted here that a downstream relationship has not
    /// acknowledged yet.
    pub fn pending_gone(&self, downstream: &str, relationship: &str) -> Vec<Uuid> {
        self.downs
            .get(&(downstream.to_string(), relationship.to_string()))
            .map(|d| d.forced_gone.iter().copied().collect())
            .unwrap_or_default()
    }

    /// The newest snapshot of `relationship`'s local volume that its source
    /// has: our next incremental base.
    pub fn next_base(&self, relationship: &str) -> Option<Uuid> {
        let up = self.ups.get(relationship)?;
        self.snapshots(&up.volume)
            .iter()
            .rev()
            .find(|s| up.has.contains(s))
            .copied()
    }

    /// The anchor of `relationship`: the last snapshot committed through it
    /// by a transfer ([`Event::TransferFinished`]), replaced only by the
    /// next transfer; a forced delete of it upstream
    /// ([`Event::UpstreamSnapshotGone`]) does not clear it.
    ///
    /// Both sides know the anchor without any lock set in flight: the
    /// upstream learns it shares it with us from the transfer itself
    /// ([`Event::DownstreamShared`]), and we keep it locked here as long as
    /// it is the anchor. So the pair always keeps one common snapshot, even
    /// when the next base came from another upstream (fan-in) and the set
    /// naming it has not reached this one yet.
    pub fn anchor(&self, relationship: &str) -> Option<Uuid> {
        self.ups.get(relationship)?.anchor
    }

    /// Preview a prune of `volume`: which of `candidates` would be refused
    /// and by whom.
    pub fn preview_delete(&self, volume: &str, candidates: &[Uuid]) -> Vec<(Uuid, Vec<Held>)> {
        candidates
            .iter()
            .map(|s| (*s, self.holders(volume, *s)))
            .filter(|(_, h)| !h.is_empty())
            .collect()
    }

    /// How many locks the set of each upstream relationship of `volume`
    /// would carry with one more application lock, the largest first
    /// checked against the bound: `Err` names the relationship that would
    /// exceed `Bounds::max_locks_per_set`.
    pub fn app_lock_room(&self, volume: &str) -> Result<()> {
        let max = self.cfg.bounds.max_locks_per_set;
        for (rel, up) in &self.ups {
            if up.volume != volume {
                continue;
            }
            let n = self.outgoing(rel).len() + 1;
            if n > max {
                return Err(LockError::TooManyLocks {
                    sender: format!("{} (relationship {rel})", self.cfg.node_id),
                    count: n,
                    max,
                });
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn lock(
        &self,
        snapshot: Uuid,
        kind: LockKind,
        text: String,
        origin: String,
        dataset: String,
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
            dataset,
        }
    }

    /// The local volumes in which a downstream relationship's lock on
    /// `snapshot` holds it: its volume, or (upgraded format-3 sets) every
    /// volume that has the snapshot.
    fn down_volumes(&self, d: &Down, snapshot: Uuid) -> Vec<String> {
        match &d.volume {
            Some(v) => vec![v.clone()],
            None => self
                .local
                .iter()
                .filter(|(_, s)| s.contains(&snapshot))
                .map(|(v, _)| v.clone())
                .collect(),
        }
    }

    /// Locks from downstream knowledge (shared snapshots and relayed sets).
    ///
    /// Each keeps the renewal time of where it lives, never ours: a lock
    /// for a snapshot shared with downstream D is renewed when D last
    /// renewed its set here (on our clock) under D's lease, and a relayed
    /// lock keeps its origin's renewal time and lease. While D's set is
    /// stale here, its locks' leases are cut to end no later than D's set
    /// lease did, so whoever we relay them to sees them stale too (stale is
    /// always visible, never silent, at every hop).
    fn downstream_locks(&self) -> Vec<Held> {
        let mut out = Vec::new();
        if !self.cfg.propagate {
            return out;
        }
        for (key, d) in &self.downs {
            if d.lapsed {
                continue;
            }
            let (name, rel) = key;
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
            let text = if rel.is_empty() {
                format!("base of mirror to {name}")
            } else {
                format!("base of mirror to {name}:{rel}")
            };
            for s in &d.shared {
                let mut l = self.lock(
                    *s,
                    LockKind::DestinationPath,
                    text.clone(),
                    name.clone(),
                    dataset(name, rel),
                    d.since.get(s).copied().unwrap_or(d.received_ms),
                );
                l.renewed_ms = d.received_ms.max(l.created_ms);
                l.lease_ms = set_lease;
                mark(&mut l);
                for volume in self.down_volumes(d, *s) {
                    out.push(Held {
                        volume,
                        lock: l.clone(),
                        via: Some(key.clone()),
                    });
                }
            }
            if let Some(set) = &d.received {
                for l in &set.locks {
                    let mut l = l.clone();
                    mark(&mut l);
                    for volume in self.down_volumes(d, l.snapshot) {
                        out.push(Held {
                            volume,
                            lock: l.clone(),
                            via: Some(key.clone()),
                        });
                    }
                }
            }
        }
        out
    }

    /// Whether `h` (as returned by [`LockNode::all_locks`] or
    /// [`LockNode::holders`]) is stale at `now_ms`: it lives on another node
    /// and either the downstream relationship it came through has a stale
    /// set here, or its own lease (its origin's renewal time plus lease, as
    /// relayed) ran out. Our own and application locks are never stale (a
    /// copy of one that came back in a downstream's set is that set's).
    pub fn is_stale(&self, h: &Held, now_ms: u64) -> bool {
        // Our own locks never are; a copy of one that came back through a
        // downstream's set (a cycle of volumes: this node feeds the
        // downstream that feeds another of its volumes) lives as that set
        // does.
        if h.lock.origin_node == self.cfg.node_id && h.via.is_none() {
            return false;
        }
        if h.via
            .as_ref()
            .and_then(|k| self.downs.get(k))
            .is_some_and(|d| d.stale)
        {
            return true;
        }
        lock_expiry(&h.lock, self.cfg.lease_ms).is_some_and(|e| now_ms >= e)
    }

    /// Our own locks for `relationship`: the next base and the anchor, when
    /// each is still a local snapshot. Usually the same one.
    ///
    /// Each is created (and, being ours, renewed here) when it started to
    /// hold its snapshot ([`LockNode::stamp`]); the copy sent upstream is
    /// renewed at each send.
    fn own_locks_for(&self, relationship: &str) -> Vec<SoftLock> {
        let Some(up) = self.ups.get(relationship) else {
            return Vec::new();
        };
        let me = &self.cfg.node_id;
        self.own_snapshots(relationship)
            .into_iter()
            .map(|s| {
                self.lock(
                    s,
                    up.kind,
                    format!("{me}:{relationship}"),
                    me.clone(),
                    dataset(me, relationship),
                    up.since.get(&s).copied().unwrap_or(0),
                )
            })
            .collect()
    }

    /// The snapshots our own locks for `relationship` hold: the next base
    /// and the anchor.
    fn own_snapshots(&self, relationship: &str) -> Vec<Uuid> {
        let Some(up) = self.ups.get(relationship) else {
            return Vec::new();
        };
        let mut snaps: Vec<Uuid> = self.next_base(relationship).into_iter().collect();
        if let Some(a) = up.anchor {
            if self.has_snapshot(&up.volume, a) && !snaps.contains(&a) {
                snaps.push(a);
            }
        }
        snaps
    }

    /// Date the derived locks: each own base lock and each shared-base lock
    /// remembers when it started to hold its snapshot (`now_ms` for the
    /// ones new since the last stamp) and forgets the ones that ended.
    fn stamp(&mut self, now_ms: u64) {
        let rels: Vec<String> = self.ups.keys().cloned().collect();
        for u in &rels {
            self.stamp_up(u, now_ms);
        }
        self.stamp_downs(now_ms);
    }

    /// [`LockNode::stamp`] of one upstream relationship's own locks.
    fn stamp_up(&mut self, relationship: &str, now_ms: u64) {
        let snaps = self.own_snapshots(relationship);
        if let Some(up) = self.ups.get_mut(relationship) {
            up.since.retain(|s, _| snaps.contains(s));
            for s in snaps {
                up.since.entry(s).or_insert(now_ms);
            }
        }
    }

    /// [`LockNode::stamp`] of the shared-base locks of every downstream.
    fn stamp_downs(&mut self, now_ms: u64) {
        for d in self.downs.values_mut() {
            let shared = &d.shared;
            d.since.retain(|s, _| shared.contains(s));
            for s in &d.shared {
                d.since.entry(*s).or_insert(now_ms);
            }
        }
    }

    fn own_base_locks(&self) -> Vec<Held> {
        self.ups
            .iter()
            .flat_map(|(rel, up)| {
                self.own_locks_for(rel).into_iter().map(|lock| Held {
                    volume: up.volume.clone(),
                    lock,
                    via: None,
                })
            })
            .collect()
    }

    fn app_locks(&self) -> impl Iterator<Item = Held> + '_ {
        self.app.iter().flat_map(|(volume, locks)| {
            locks.iter().map(move |l| Held {
                volume: volume.clone(),
                lock: l.clone(),
                via: None,
            })
        })
    }

    fn effective(&self) -> Vec<Held> {
        let mut v = self.own_base_locks();
        v.extend(self.downstream_locks());
        v.extend(self.app_locks());
        v.sort();
        v.dedup_by(|a, b| a.volume == b.volume && a.lock.key() == b.lock.key());
        v
    }

    /// The set for `relationship`: our own locks, every downstream lock and
    /// application lock on its local volume. Where the volume has this one
    /// upstream, every such lock goes, whatever the source still has: a
    /// snapshot the source deleted (before anything here locked it) may
    /// live on further up, where it is what a re-attach past that source
    /// would start from, so the source relays the lock on. In a fan-in
    /// (several upstreams write the volume) each upstream gets the locks on
    /// the snapshots it has, or force-deleted while this volume still has
    /// them: snapshots that came from another upstream never go to it.
    fn outgoing(&self, relationship: &str) -> Vec<SoftLock> {
        self.outgoing_with(relationship, &self.outgoing_context())
    }

    /// What every outgoing set is built from beside its own relationship:
    /// the downstream locks by volume and how many upstreams each volume
    /// has.
    fn outgoing_context(&self) -> OutgoingContext {
        let mut ctx = OutgoingContext::default();
        for h in self.downstream_locks() {
            ctx.downstream.entry(h.volume.clone()).or_default().push(h);
        }
        for u in self.ups.values() {
            *ctx.upstreams.entry(u.volume.clone()).or_default() += 1;
        }
        ctx
    }

    /// [`LockNode::outgoing`] from a context of the current state.
    fn outgoing_with(&self, relationship: &str, ctx: &OutgoingContext) -> Vec<SoftLock> {
        let Some(up) = self.ups.get(relationship) else {
            return Vec::new();
        };
        if !self.cfg.propagate {
            return Vec::new();
        }
        let me = &self.cfg.node_id;
        let mut v: Vec<SoftLock> = self.own_locks_for(relationship);
        for h in ctx.downstream.get(&up.volume).into_iter().flatten() {
            let mut l = h.lock.clone();
            if l.hop_path.last() != Some(me) {
                l.hop_path.push(me.clone());
            }
            v.push(l);
        }
        if let Some(app) = self.app.get(&up.volume) {
            v.extend(app.iter().cloned());
        }
        let only_upstream = ctx.upstreams.get(&up.volume).copied().unwrap_or(0) == 1;
        v.retain(|l| {
            let lost_above =
                up.gone_acks.contains(&l.snapshot) && self.has_snapshot(&up.volume, l.snapshot);
            (only_upstream || up.has.contains(&l.snapshot) || lost_above)
                && l.hop_path.len() <= self.cfg.bounds.max_hops
        });
        v.sort();
        v.dedup_by(|a, b| a.key() == b.key());
        v
    }

    fn send(&mut self, relationship: &str, now_ms: u64, force: bool, out: &mut Vec<Action>) {
        // What the set carries is dated: its own locks and those from
        // downstream (the other upstreams' own locks are not in it).
        self.stamp_up(relationship, now_ms);
        self.stamp_downs(now_ms);
        let ctx = self.outgoing_context();
        self.send_with(relationship, now_ms, force, out, &ctx);
    }

    /// [`LockNode::send`] with the relationship stamped and the context
    /// of its set computed (once for many sets: `send_changed`).
    fn send_with(
        &mut self,
        relationship: &str,
        now_ms: u64,
        force: bool,
        out: &mut Vec<Action>,
        ctx: &OutgoingContext,
    ) {
        let locks = self.outgoing_with(relationship, ctx);
        let next_gen = self.next_generation();
        let lease_ms = self.cfg.lease_ms;
        let sender = self.cfg.node_id.clone();
        let max = self.cfg.bounds.max_locks_per_set;
        let Some(up) = self.ups.get_mut(relationship) else {
            return;
        };
        // An upgraded relationship whose source volume is not known yet
        // sends nothing until it is (its upstream keeps the set it has).
        if up.source.is_empty() {
            return;
        }
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
        if locks.len() > max {
            out.push(Action::SetOverBound {
                relationship: relationship.to_string(),
                count: locks.len(),
                max,
            });
        }
        let gone_acks = up.gone_acks.iter().copied().collect();
        out.push(Action::SendLockSet {
            relationship: relationship.to_string(),
            upstream: up.upstream.clone(),
            set: LockSet {
                sender,
                relationship: relationship.to_string(),
                volume: up.source.clone(),
                generation: next_gen,
                lease_ms,
                locks,
                gone_acks,
            },
        });
    }

    /// A final empty set for `relationship` to a former upstream (it
    /// releases everything this relationship held there).
    fn final_set(&mut self, relationship: &str, upstream: &str, source: &str) -> Action {
        self.counter = self.counter.wrapping_add(1);
        Action::SendLockSet {
            relationship: relationship.to_string(),
            upstream: upstream.to_string(),
            set: LockSet {
                sender: self.cfg.node_id.clone(),
                relationship: relationship.to_string(),
                volume: source.to_string(),
                generation: (u64::from(self.epoch) << 32) | u64::from(self.counter),
                lease_ms: self.cfg.lease_ms,
                locks: Vec::new(),
                gone_acks: Vec::new(),
            },
        }
    }

    fn next_generation(&self) -> u64 {
        (u64::from(self.epoch) << 32) | u64::from(self.counter.wrapping_add(1))
    }

    fn send_changed(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        // Stamped and the context computed once for every set: O(ups +
        // downstream locks), not that for each upstream.
        self.stamp(now_ms);
        let ctx = self.outgoing_context();
        let names: Vec<String> = self.ups.keys().cloned().collect();
        for u in names {
            self.send_with(&u, now_ms, false, out, &ctx);
        }
    }

    fn refresh_protection(&mut self, out: &mut Vec<Action>) {
        let mut now: BTreeMap<(String, Uuid), Vec<Held>> = BTreeMap::new();
        for h in self.effective() {
            if self.has_snapshot(&h.volume, h.lock.snapshot) {
                now.entry((h.volume.clone(), h.lock.snapshot))
                    .or_default()
                    .push(h);
            }
        }
        for ((v, s), h) in &now {
            if self.protected.get(&(v.clone(), *s)) != Some(h) {
                out.push(Action::Protected {
                    volume: v.clone(),
                    snapshot: *s,
                    holders: h.iter().map(|x| x.lock.clone()).collect(),
                });
            }
        }
        for (v, s) in self.protected.keys() {
            if !now.contains_key(&(v.clone(), *s)) {
                out.push(Action::Unprotected {
                    volume: v.clone(),
                    snapshot: *s,
                });
            }
        }
        self.protected = now;
    }

    /// Feed one event at time `now_ms`; returns the actions to perform, in
    /// order. Every action matters (a dropped `SendLockSet` is a lock the
    /// upstream never learns of).
    #[must_use = "the actions must be performed: a dropped SendLockSet never reaches the upstream"]
    pub fn handle(&mut self, now_ms: u64, ev: Event) -> Vec<Action> {
        let mut out = Vec::new();
        match ev {
            Event::UpstreamAdded {
                relationship,
                upstream,
                source,
                volume,
                kind,
            } => self.add_upstream(
                relationship,
                upstream,
                source,
                volume,
                kind,
                now_ms,
                &mut out,
            ),
            Event::UpstreamRemoved { relationship } => {
                if let Some(up) = self.ups.remove(&relationship) {
                    if !up.source.is_empty() && self.cfg.propagate {
                        let a = self.final_set(&relationship, &up.upstream, &up.source);
                        out.push(a);
                    }
                }
            }
            Event::DownstreamAdded {
                downstream,
                relationship,
                volume,
            } => {
                let d = self
                    .downs
                    .entry((downstream, relationship))
                    .or_insert_with(|| Down {
                        received_ms: now_ms,
                        ..Down::default()
                    });
                d.volume = Some(volume);
            }
            Event::DownstreamRemoved {
                downstream,
                relationship,
            } => {
                if self
                    .downs
                    .remove(&(downstream.clone(), relationship.clone()))
                    .is_some()
                {
                    out.push(Action::Released {
                        downstream,
                        relationship,
                        reason: ReleaseReason::RelationshipRemoved,
                    });
                }
            }
            Event::SnapshotCreated { volume, snapshot } => {
                self.local.entry(volume).or_default().push(snapshot);
            }
            Event::VolumeSnapshots { volume, snapshots } => {
                self.set_snapshots(&volume, snapshots);
            }
            Event::VolumeRemoved { volume } => {
                self.local.remove(&volume);
                self.app.remove(&volume);
            }
            Event::UpstreamSnapshots {
                relationship,
                snapshots,
            } => {
                if let Some(up) = self.ups.get_mut(&relationship) {
                    up.has = snapshots.into_iter().collect();
                }
            }
            Event::DownstreamShared {
                downstream,
                relationship,
                shared,
            } => {
                if let Some(d) = self.downs.get_mut(&(downstream, relationship)) {
                    d.shared = shared.into_iter().collect();
                }
            }
            Event::LockSetReceived { set } => self.receive(now_ms, set, &mut out),
            Event::AppLockAdded {
                volume,
                snapshot,
                owner,
            } => {
                let me = self.cfg.node_id.clone();
                let l = self.lock(
                    snapshot,
                    LockKind::OwnerName,
                    owner,
                    me.clone(),
                    dataset(&me, &volume),
                    now_ms,
                );
                let set = self.app.entry(volume).or_default();
                if !set.iter().any(|a| a.key() == l.key()) {
                    set.insert(l);
                }
            }
            Event::AppLockReleased {
                volume,
                snapshot,
                owner,
            } => {
                if let Some(set) = self.app.get_mut(&volume) {
                    set.retain(|a| !(a.snapshot == snapshot && a.text == owner));
                    if set.is_empty() {
                        self.app.remove(&volume);
                    }
                }
            }
            Event::TransferStarting { relationship } => {
                self.send(&relationship, now_ms, true, &mut out)
            }
            Event::TransferFinished {
                relationship,
                target,
            } => {
                if let Some(up) = self.ups.get_mut(&relationship) {
                    up.has.insert(target);
                    up.anchor = Some(target);
                    self.local
                        .entry(up.volume.clone())
                        .or_default()
                        .push(target);
                }
                self.send(&relationship, now_ms, true, &mut out);
            }
            Event::UpstreamSnapshotGone {
                relationship,
                snapshot,
            } => {
                if let Some(up) = self.ups.get_mut(&relationship) {
                    // The anchor stays: the pair no longer shares it, but
                    // it is still what we hold in common with every node
                    // above the upstream, so its lock keeps travelling past
                    // it (a re-attach there stays incremental).
                    up.has.remove(&snapshot);
                    up.gone_acks.insert(snapshot);
                    self.send(&relationship, now_ms, true, &mut out);
                }
            }
            Event::Tick => self.tick(now_ms, &mut out),
            Event::Restarted => {
                let names: Vec<String> = self.ups.keys().cloned().collect();
                for u in names {
                    self.send(&u, now_ms, true, &mut out);
                }
            }
            Event::DeleteRequested {
                volume,
                snapshot,
                force,
            } => self.delete(&volume, snapshot, force, &mut out),
            Event::OperatorRelease {
                downstream,
                relationship,
            } => {
                for ((node, rel), d) in self.downs.iter_mut() {
                    if *node != downstream || relationship.as_ref().is_some_and(|r| r != rel) {
                        continue;
                    }
                    d.received = None;
                    d.lapsed = true;
                    d.stale = false;
                    out.push(Action::Released {
                        downstream: node.clone(),
                        relationship: rel.clone(),
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

    #[allow(clippy::too_many_arguments)]
    fn add_upstream(
        &mut self,
        relationship: String,
        upstream: String,
        source: String,
        volume: String,
        kind: LockKind,
        now_ms: u64,
        out: &mut Vec<Action>,
    ) {
        let prev = self.ups.get(&relationship).map(|u| {
            (
                u.upstream.clone(),
                u.source.clone(),
                u.volume.clone(),
                u.anchor,
                u.since.clone(),
            )
        });
        if let Some((old_up, old_src, old_vol, anchor, since)) = prev {
            if old_up == upstream && (old_src == source || old_src.is_empty()) {
                // The same relationship (or an upgraded one learning its
                // source): everything it knows stays.
                if let Some(up) = self.ups.get_mut(&relationship) {
                    up.source = source;
                    up.volume = volume;
                    up.kind = kind;
                }
                let _ = old_vol;
                return;
            }
            // Retarget (or an upgraded table learning its source): the former
            // upstream releases what this relationship held there; the new
            // one starts from what it tells us it has.
            if old_up != upstream || old_src != source {
                if !old_src.is_empty() {
                    let a = self.final_set(&relationship, &old_up, &old_src);
                    out.push(a);
                }
                self.ups.insert(
                    relationship,
                    Up {
                        upstream,
                        source,
                        volume,
                        kind,
                        has: BTreeSet::new(),
                        // The anchor stays locked here until the new
                        // upstream's first transfer replaces it.
                        anchor,
                        last_sent: None,
                        last_sent_ms: now_ms,
                        gone_acks: BTreeSet::new(),
                        since,
                    },
                );
                return;
            }
        }
        let e = self.ups.entry(relationship).or_insert(Up {
            upstream: upstream.clone(),
            source: source.clone(),
            volume: volume.clone(),
            kind,
            has: BTreeSet::new(),
            anchor: None,
            last_sent: None,
            last_sent_ms: now_ms,
            gone_acks: BTreeSet::new(),
            since: BTreeMap::new(),
        });
        e.volume = volume;
        e.kind = kind;
    }

    /// Move the snapshots and application locks of an upgraded table
    /// (volume "") that belong to `volume`.
    /// Local `volume`'s snapshots are exactly `snapshots`, oldest first.
    fn set_snapshots(&mut self, volume: &str, snapshots: Vec<Uuid>) {
        self.adopt_upgraded(volume, &snapshots);
        let list = SnapList::of(snapshots);
        // An acknowledgement of a forced delete upstream matters while we
        // hold that snapshot; if the upstream missed it, it tells us again.
        for up in self.ups.values_mut().filter(|u| u.volume == volume) {
            up.gone_acks.retain(|g| list.contains(g));
        }
        self.local.insert(volume.to_string(), list);
    }

    fn adopt_upgraded(&mut self, volume: &str, snapshots: &[Uuid]) {
        if let Some(v) = self.local.get_mut("") {
            v.retain(|s| !snapshots.contains(s));
            if v.is_empty() {
                self.local.remove("");
            }
        }
        let Some(old) = self.app.get_mut("") else {
            return;
        };
        let (mine, rest): (BTreeSet<SoftLock>, BTreeSet<SoftLock>) = std::mem::take(old)
            .into_iter()
            .partition(|l| snapshots.contains(&l.snapshot));
        *old = rest;
        if old.is_empty() {
            self.app.remove("");
        }
        if !mine.is_empty() {
            let me = self.cfg.node_id.clone();
            self.app
                .entry(volume.to_string())
                .or_default()
                .extend(mine.into_iter().map(|mut l| {
                    l.dataset = dataset(&me, volume);
                    l
                }));
        }
    }

    fn receive(&mut self, now_ms: u64, set: LockSet, out: &mut Vec<Action>) {
        if let Err(error) = set.validate(&self.cfg.bounds) {
            out.push(Action::SetRejected {
                sender: set.sender,
                error,
            });
            return;
        }
        let key = (set.sender.clone(), set.relationship.clone());
        let me = self.cfg.node_id.clone();
        let Some(d) = self.downs.get_mut(&key) else {
            let error = LockError::BadField {
                field: "set.relationship",
                detail: format!(
                    "{}:{} is not a downstream relationship of {me:?}",
                    set.sender, set.relationship
                ),
            };
            out.push(Action::SetRejected {
                sender: set.sender,
                error,
            });
            return;
        };
        if d.volume.as_deref() != Some(set.volume.as_str()) {
            let error = LockError::BadField {
                field: "set.volume",
                detail: format!(
                    "{}:{} pulls volume {:?} here, not {:?}",
                    set.sender,
                    set.relationship,
                    d.volume.as_deref().unwrap_or(""),
                    set.volume
                ),
            };
            out.push(Action::SetRejected {
                sender: set.sender,
                error,
            });
            return;
        }
        if set.generation <= d.generation {
            return; // older or duplicate: ignored by design
        }
        // One node's sets together stay within the per-peer bound: a set
        // that would pass it is refused whole (its previous set holds).
        let others: usize = self
            .downs
            .iter()
            .filter(|(k, _)| k.0 == key.0 && **k != key)
            .filter_map(|(_, o)| o.received.as_ref())
            .map(|r| r.locks.len())
            .sum();
        let count = others.saturating_add(set.locks.len());
        let max = self.cfg.bounds.max_locks_per_peer;
        if count > max {
            out.push(Action::SetRejected {
                sender: set.sender,
                error: LockError::TooManyPeerLocks {
                    sender: key.0,
                    count,
                    max,
                },
            });
            return;
        }
        let Some(d) = self.downs.get_mut(&key) else {
            return;
        };
        d.generation = set.generation;
        for g in &set.gone_acks {
            d.forced_gone.remove(g);
        }
        d.received_ms = now_ms;
        d.stale = false;
        d.lapsed = false;
        let volume = set.volume.clone();
        d.received = Some(set);
        if !key.1.is_empty() {
            self.supersede_upgraded(&key.0, &volume);
        }
    }

    /// A per-relationship set of `node` for our `volume` supersedes what
    /// the upgraded (per-node) set of that node held on `volume`'s
    /// snapshots; what it held elsewhere stays until those relationships
    /// send theirs. An emptied upgraded set is dropped.
    fn supersede_upgraded(&mut self, node: &str, volume: &str) {
        let key = (node.to_string(), String::new());
        let snaps: BTreeSet<Uuid> = self.snapshots(volume).iter().copied().collect();
        let Some(old) = self.downs.get_mut(&key) else {
            return;
        };
        old.shared.retain(|s| !snaps.contains(s));
        if let Some(set) = old.received.as_mut() {
            set.locks.retain(|l| !snaps.contains(&l.snapshot));
        }
        let empty =
            old.shared.is_empty() && old.received.as_ref().is_none_or(|s| s.locks.is_empty());
        if empty {
            self.downs.remove(&key);
        }
    }

    fn tick(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        for ((name, rel), d) in self.downs.iter_mut() {
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
                    relationship: rel.clone(),
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
                        relationship: rel.clone(),
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
        for ((name, rel), d) in self.downs.iter_mut() {
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
                        relationship: rel.clone(),
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
                        relationship: rel.clone(),
                        origin: origin.clone(),
                        renewed_ms: *renewed_ms,
                        lease_ms: *lease_ms,
                    });
                }
            }
            d.stale_origins = now_stale.into_keys().collect();
        }
    }

    fn delete(&mut self, volume: &str, snapshot: Uuid, force: bool, out: &mut Vec<Action>) {
        let holders: Vec<Held> = self
            .effective()
            .into_iter()
            .filter(|h| h.volume == volume && h.lock.snapshot == snapshot)
            .collect();
        let locks: Vec<SoftLock> = holders.iter().map(|h| h.lock.clone()).collect();
        if !holders.is_empty() && !force {
            out.push(Action::DeleteRefused {
                volume: volume.to_string(),
                snapshot,
                holders: locks,
            });
            return;
        }
        if let Some(v) = self.local.get_mut(volume) {
            v.retain(|s| *s != snapshot);
        }
        if holders.is_empty() {
            out.push(Action::Deleted {
                volume: volume.to_string(),
                snapshot,
            });
            return;
        }
        let affected: BTreeSet<DownKey> = holders.iter().filter_map(|h| h.via.clone()).collect();
        out.push(Action::ForcedDelete {
            volume: volume.to_string(),
            snapshot,
            holders: locks,
        });
        for (key, d) in self.downs.iter_mut() {
            let here = d.volume.as_deref().is_none_or(|v| v == volume);
            if here && (affected.contains(key) || d.shared.contains(&snapshot)) {
                d.shared.remove(&snapshot);
                d.forced_gone.insert(snapshot);
                out.push(Action::TellSnapshotGone {
                    downstream: key.0.clone(),
                    relationship: key.1.clone(),
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
        let ids = |s: &BTreeSet<Uuid>| s.iter().map(|u| *u.as_bytes()).collect::<Vec<_>>();
        let p = PersistNode {
            node_id: self.cfg.node_id.clone(),
            epoch: self.epoch,
            counter: self.counter,
            // The engine's catalog is the truth of which snapshots exist:
            // the replicator hands every volume's list back at start
            // (`Event::VolumeSnapshots`), so the table does not carry it
            // and a snapshot create or delete does not rewrite it.
            local: Vec::new(),
            ups: self
                .ups
                .iter()
                .map(|(rel, u)| PersistUp {
                    relationship: rel.clone(),
                    upstream: u.upstream.clone(),
                    source: u.source.clone(),
                    volume: u.volume.clone(),
                    kind: u.kind.code(),
                    has: ids(&u.has),
                    anchor: u.anchor.map(|s| *s.as_bytes()),
                    gone_acks: ids(&u.gone_acks),
                })
                .collect(),
            downs: self
                .downs
                .iter()
                .map(|((node, rel), d)| PersistDown {
                    node: node.clone(),
                    relationship: rel.clone(),
                    volume: d.volume.clone(),
                    shared: ids(&d.shared),
                    received: d.received.as_ref().map(WireLockSet::from_model),
                    received_ms: d.received_ms,
                    generation: d.generation,
                    stale: d.stale,
                    lapsed: d.lapsed,
                    forced_gone: ids(&d.forced_gone),
                })
                .collect(),
            app: self
                .app_locks()
                .map(|h| PersistApp {
                    volume: h.volume,
                    lock: WireLock::from_model(&h.lock),
                })
                .collect(),
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
                relationship: String::new(),
                upstream: true,
                snapshot: *s.as_bytes(),
                ms: *ms,
            })
        });
        let downs = self.downs.iter().flat_map(|((n, rel), d)| {
            d.since.iter().map(move |(s, ms)| PersistSince {
                peer: n.clone(),
                relationship: rel.clone(),
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
    ///
    /// Tables of formats 1-3 (keyed by peer node) are upgraded: each
    /// upstream becomes the relationship its lock text named (`NODE:PATH`)
    /// with its source volume unknown until the next [`Event::UpstreamAdded`]
    /// (the replicator re-adds every relationship at start); each downstream
    /// node's set holds its snapshots in whichever volume has them until that
    /// node sends per-relationship sets; snapshots and application locks wait
    /// in volume "" for [`Event::VolumeSnapshots`].
    ///
    /// `snapshots` are the pool's snapshots, per volume, oldest first: the
    /// table does not carry them (format 4 tables of older builds did;
    /// a volume `snapshots` names replaces what such a table says, as
    /// [`Event::VolumeSnapshots`] would). They are in place before the
    /// protection map is built, so a restored table protects every base
    /// from its first answer on.
    pub fn from_bytes(
        cfg: NodeConfig,
        bytes: &[u8],
        snapshots: &BTreeMap<String, Vec<Uuid>>,
    ) -> Result<Self> {
        let mut n = Self::decode(cfg, bytes)?;
        for (volume, list) in snapshots {
            n.set_snapshots(volume, list.clone());
        }
        let mut sink = Vec::new();
        n.refresh_protection(&mut sink);
        Ok(n)
    }

    fn decode(cfg: NodeConfig, bytes: &[u8]) -> Result<Self> {
        let (head, rest) = bytes.split_first_chunk::<8>().ok_or(LockError::Truncated {
            need: 8,
            have: bytes.len(),
        })?;
        let [m0, m1, m2, m3, v0, v1, _, _] = *head;
        if &[m0, m1, m2, m3] != PERSIST_MAGIC {
            return Err(LockError::BadPersisted("missing SLKT magic".into()));
        }
        let ver = u16::from_le_bytes([v0, v1]);
        let mut al = rkyv::util::AlignedVec::<16>::with_capacity(rest.len());
        al.extend_from_slice(rest);
        let old = |v: u16, e: rkyv::rancor::Error| {
            LockError::BadPersisted(format!("version {v} table: {e}"))
        };
        let p: PersistNodeV3 = match ver {
            PERSIST_VERSION => {
                let p = rkyv::from_bytes::<PersistNode, rkyv::rancor::Error>(&al)
                    .map_err(|e| LockError::BadPersisted(e.to_string()))?;
                return Self::restore(cfg, p);
            }
            3 => rkyv::from_bytes::<PersistNodeV3, rkyv::rancor::Error>(&al)
                .map_err(|e| old(3, e))?,
            2 => rkyv::from_bytes::<PersistNodeV2, rkyv::rancor::Error>(&al)
                .map_err(|e| old(2, e))?
                .into(),
            1 => PersistNodeV2::from(
                rkyv::from_bytes::<PersistNodeV1, rkyv::rancor::Error>(&al)
                    .map_err(|e| old(1, e))?,
            )
            .into(),
            found => {
                return Err(LockError::PersistedVersion {
                    found,
                    supported: PERSIST_VERSION,
                })
            }
        };
        Self::restore_v3(cfg, p)
    }

    fn check_owner(cfg: &NodeConfig, node_id: &str, epoch: u32) -> Result<LockNode> {
        if node_id != cfg.node_id {
            return Err(LockError::BadPersisted(format!(
                "table belongs to node {node_id:?}, not {:?}",
                cfg.node_id
            )));
        }
        let mut n = LockNode::new(cfg.clone());
        n.epoch = epoch
            .checked_add(1)
            .ok_or_else(|| LockError::BadPersisted("epoch exhausted".into()))?;
        Ok(n)
    }

    fn restore(cfg: NodeConfig, p: PersistNode) -> Result<Self> {
        let mut n = Self::check_owner(&cfg, &p.node_id, p.epoch)?;
        let ids = |v: &[[u8; 16]]| v.iter().map(|b| Uuid::from_bytes(*b)).collect::<Vec<_>>();
        for l in p.local {
            n.local.insert(l.volume, SnapList::of(ids(&l.snapshots)));
        }
        for u in p.ups {
            n.ups.insert(
                u.relationship,
                Up {
                    upstream: u.upstream,
                    source: u.source,
                    volume: u.volume,
                    kind: LockKind::from_code(u.kind)?,
                    has: ids(&u.has).into_iter().collect(),
                    anchor: u.anchor.map(Uuid::from_bytes),
                    last_sent: None,
                    last_sent_ms: 0,
                    gone_acks: ids(&u.gone_acks).into_iter().collect(),
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
                (d.node, d.relationship),
                Down {
                    volume: d.volume,
                    shared: ids(&d.shared).into_iter().collect(),
                    received,
                    received_ms: d.received_ms,
                    generation: d.generation,
                    stale: d.stale,
                    lapsed: d.lapsed,
                    forced_gone: ids(&d.forced_gone).into_iter().collect(),
                    stale_origins: BTreeSet::new(),
                    since: BTreeMap::new(),
                },
            );
        }
        for a in p.app {
            n.app
                .entry(a.volume)
                .or_default()
                .insert(a.lock.to_model()?);
        }
        for t in p.since {
            let snapshot = Uuid::from_bytes(t.snapshot);
            let since = if t.upstream {
                n.ups.get_mut(&t.peer).map(|u| &mut u.since)
            } else {
                n.downs
                    .get_mut(&(t.peer, t.relationship))
                    .map(|d| &mut d.since)
            };
            if let Some(since) = since {
                since.insert(snapshot, t.ms);
            }
        }
        Ok(n)
    }

    /// Upgrade a table of formats 1-3 (see [`LockNode::from_bytes`]).
    fn restore_v3(cfg: NodeConfig, p: PersistNodeV3) -> Result<Self> {
        let mut n = Self::check_owner(&cfg, &p.node_id, p.epoch)?;
        let ids = |v: &[[u8; 16]]| v.iter().map(|b| Uuid::from_bytes(*b)).collect::<Vec<_>>();
        n.local.insert(String::new(), SnapList::of(ids(&p.local)));
        let mut rel_of_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for u in p.ups {
            // The old lock text was `NODE:PATH`.
            let rel = u
                .relationship
                .split_once(':')
                .map_or(u.relationship.as_str(), |(_, r)| r)
                .trim_start_matches('/')
                .to_string();
            rel_of_node
                .entry(u.name.clone())
                .or_default()
                .push(rel.clone());
            n.ups.insert(
                rel.clone(),
                Up {
                    upstream: u.name,
                    source: String::new(),
                    volume: path_volume(&rel).to_string(),
                    kind: LockKind::from_code(u.kind)?,
                    has: ids(&u.has).into_iter().collect(),
                    anchor: u.anchor.map(Uuid::from_bytes),
                    last_sent: None,
                    last_sent_ms: 0,
                    gone_acks: ids(&u.gone_acks).into_iter().collect(),
                    since: BTreeMap::new(),
                },
            );
        }
        for d in p.downs {
            let received = match d.received {
                Some(s) => Some(LockSet {
                    sender: s.sender,
                    relationship: String::new(),
                    volume: String::new(),
                    generation: s.generation,
                    lease_ms: s.lease_ms,
                    locks: s
                        .locks
                        .iter()
                        .map(|l| l.to_model())
                        .collect::<Result<_>>()?,
                    gone_acks: ids(&s.gone_acks),
                }),
                None => None,
            };
            n.downs.insert(
                (d.name, String::new()),
                Down {
                    volume: None,
                    shared: ids(&d.shared).into_iter().collect(),
                    received,
                    received_ms: d.received_ms,
                    generation: d.generation,
                    stale: d.stale,
                    lapsed: d.lapsed,
                    forced_gone: ids(&d.forced_gone).into_iter().collect(),
                    stale_origins: BTreeSet::new(),
                    since: BTreeMap::new(),
                },
            );
        }
        for l in p.app {
            n.app
                .entry(String::new())
                .or_default()
                .insert(l.to_model()?);
        }
        for t in p.since {
            let snapshot = Uuid::from_bytes(t.snapshot);
            if t.upstream {
                for rel in rel_of_node.get(&t.peer).into_iter().flatten() {
                    if let Some(u) = n.ups.get_mut(rel) {
                        u.since.insert(snapshot, t.ms);
                    }
                }
            } else if let Some(d) = n.downs.get_mut(&(t.peer, String::new())) {
                d.since.insert(snapshot, t.ms);
            }
        }
        Ok(n)
    }
}

/// Convenience: turn a `DeleteRefused` into an error naming every holder.
pub fn refused_to_error(a: &Action) -> Option<LockError> {
    match a {
        Action::DeleteRefused {
            snapshot, holders, ..
        } => Some(LockNode::delete_error(*snapshot, holders)),
        _ => None,
    }
}
