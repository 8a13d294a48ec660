//! The replicator's public value types: configuration, mirror specs, status
//! and lock views (serde, for the control API's `--json`), and the
//! persisted relationship and checkpoint records.
//!
//! Invariants: persisted records are JSON under the pool attributes named
//! in [`keys`]; every field added later must have a serde default so older
//! pools still load.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sluice_lockproto::LeasePolicy;
use uuid::Uuid;

/// Pool-attribute keys the replicator owns.
pub mod keys {
    /// The relationship table of older builds (JSON list of
    /// `Relationship`, rewritten whole): read once, then replaced by
    /// [`RELATIONSHIP_INDEX`] and one [`RELATIONSHIP_PREFIX`] key each.
    pub const RELATIONSHIPS: &str = "repl.v1.relationships";
    /// The relationships' destination keys (JSON list), rewritten only
    /// when one is added or removed.
    pub const RELATIONSHIP_INDEX: &str = "repl.v2.relationships";
    /// Prefix of one relationship's record (JSON `Relationship`) by its
    /// destination key: a change of one writes that one.
    pub const RELATIONSHIP_PREFIX: &str = "repl.v2.rel.";
    /// The lock table (`LockNode::to_bytes`).
    pub const LOCKS: &str = "repl.v1.locks";
    /// Prefix of a relationship's transfer checkpoint (JSON `Checkpoint`).
    pub const CHECKPOINT_PREFIX: &str = "repl.v1.ckpt.";
    /// Retention policies (JSON map: volume -> snapshots to keep).
    pub const RETENTION: &str = "repl.v1.retention";
    /// Export lists (JSON map: volume -> peer node names, `*` = any).
    pub const EXPORTS: &str = "repl.v1.exports";
}

/// Most scheduled transfers one node runs at once (`max_transfers`).
pub const TRANSFERS_MAX: usize = 64;

/// How a node's replicator runs.
#[derive(Debug, Clone)]
pub struct ReplicatorConfig {
    /// This node's name (unique in the cascade; peers see it in `Hello`).
    pub node_name: String,
    /// Shared secret for peer authentication (and the key of the encrypted
    /// session). Without one, peers are refused unless `insecure_peers`.
    pub peer_secret: Option<Vec<u8>>,
    /// Secrets shared with one peer each, by the peer's node name: they
    /// take the place of `peer_secret` for that peer, so a peer proves its
    /// own name (a node that knows only its own pair's secret cannot pass
    /// for another). Without `peer_secret`, a peer not named here is
    /// refused.
    pub peer_secrets: std::collections::BTreeMap<String, Vec<u8>>,
    /// The operator's explicit insecure mode: without a secret, accept any
    /// peer and talk to peers in clear text. Off (the default), a node
    /// without a secret refuses every peer and connects to none.
    pub insecure_peers: bool,
    /// Lease put on the lock sets we send (ms).
    pub lease_ms: u64,
    /// Re-send every upstream its lock set at least this often (ms).
    pub renew_every_ms: u64,
    /// What happens to a downstream's locks whose lease ran out.
    pub lease_policy: LeasePolicy,
    /// Node-wide receive throttle (bytes per second) over all relationships.
    pub node_throttle_bps: Option<u64>,
    /// Demonstration switch: false = soft locks are not propagated (canary).
    pub propagate_locks: bool,
    /// Scheduler tick (lease checks, renewals, `--every` updates).
    pub tick: Duration,
    /// Scheduled transfers running at once (worker threads beside the
    /// scheduler), `1..=`[`TRANSFERS_MAX`].
    pub max_transfers: usize,
    /// Source addresses `--follow` relationships may pull from (one
    /// follower thread each); a `mirror create --follow` past it is
    /// refused.
    pub max_follow_sources: usize,
    /// Connect/read/write timeout on peer sockets.
    pub peer_timeout: Duration,
    /// How often transfers served by this node checkpoint (resume points).
    pub checkpoint: crate::transfer::CheckpointPolicy,
    /// The clock and the network ([`crate::env::RealEnv`] but in a
    /// simulation).
    pub env: std::sync::Arc<dyn crate::env::Env>,
    /// Run the scheduler and its workers on threads of their own. A
    /// simulation sets false and drives every tick itself with
    /// [`crate::Replicator::tick_now`].
    pub background: bool,
    /// Most locks one downstream node may hold here over all its lock
    /// sets (`Bounds::max_locks_per_peer`); a set past it is refused.
    pub max_locks_per_peer: usize,
    /// Peers may pull (and lock snapshots of) only the volumes exported to
    /// them (`vol export`). Off, a volume without an export list is open to
    /// every authenticated peer.
    pub exports_required: bool,
}

impl ReplicatorConfig {
    /// The secret this node shares with `peer`: its own in `peer_secrets`,
    /// else `peer_secret`; `Ok(None)` in insecure mode; `Err` names why a
    /// peer has none.
    pub fn peer_key(&self, peer: &str) -> std::result::Result<Option<Vec<u8>>, String> {
        if let Some(s) = self.peer_secrets.get(peer).or(self.peer_secret.as_ref()) {
            return Ok(Some(s.clone()));
        }
        if self.insecure_peers {
            return Ok(None);
        }
        let known: Vec<&str> = self.peer_secrets.keys().map(String::as_str).collect();
        Err(format!(
            "it has no secret for node {peer:?} (peer_secrets names {}): add one for {peer:?} to peer_secrets on both nodes",
            if known.is_empty() { "no node".to_string() } else { known.join(", ") }
        ))
    }

    /// Defaults: lease 60 s, renew every 20 s, keep stale locks, no throttle,
    /// 4 scheduled transfers at once.
    pub fn new(node_name: impl Into<String>) -> Self {
        ReplicatorConfig {
            node_name: node_name.into(),
            peer_secret: None,
            peer_secrets: Default::default(),
            insecure_peers: false,
            lease_ms: 60_000,
            renew_every_ms: 20_000,
            lease_policy: LeasePolicy::Keep,
            node_throttle_bps: None,
            propagate_locks: true,
            tick: Duration::from_millis(500),
            max_transfers: 4,
            max_follow_sources: 16,
            peer_timeout: Duration::from_secs(30),
            checkpoint: Default::default(),
            env: std::sync::Arc::new(crate::env::RealEnv::default()),
            background: true,
            max_locks_per_peer: sluice_lockproto::Bounds::default().max_locks_per_peer,
            exports_required: false,
        }
    }
}

/// What `mirror create` is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorSpec {
    /// Destination volume on this node (created; read-only for volume mirrors).
    pub dst_volume: String,
    /// Source node's `--listen` address (`host:port`).
    pub source_addr: String,
    /// Source volume.
    pub source_volume: String,
    /// Source qtree: `Some` makes a qtree mirror.
    pub source_qtree: Option<String>,
    /// Destination qtree of a qtree mirror (default: the source qtree's name).
    pub dst_qtree: Option<String>,
    /// Scheduled updates.
    pub every: Option<Duration>,
    /// Update as soon as the source has a snapshot this side has not seen
    /// (`--follow`): a watch on the source, not a schedule.
    pub follow: bool,
    /// Per-relationship throttle (bytes per second).
    pub throttle_bps: Option<u64>,
    /// Retention on the destination volume: keep its newest N snapshots.
    pub keep: Option<usize>,
}

/// Volume or qtree relationship.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MirrorKind {
    /// The whole volume (its own space and every qtree), snapshots included.
    Volume,
    /// One qtree into a qtree of the destination volume.
    Qtree,
}

/// A snapshot named both ways.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapRef {
    /// Local name.
    pub name: String,
    /// Global id.
    pub id: Uuid,
    /// When it was taken where first taken (ms since the epoch).
    pub created_unix_ms: u64,
}

/// What one transfer did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferReport {
    /// Destination path (`vol` or `vol/qtree`).
    pub dst: String,
    /// `full`, `incremental` or `none` (already up to date).
    pub kind: String,
    /// Base snapshot (incremental).
    pub base: Option<SnapRef>,
    /// Target snapshot.
    pub target: Option<SnapRef>,
    /// Data bytes received in this session.
    pub bytes: u64,
    /// Extent frames received.
    pub extents: u64,
    /// Trim frames received.
    pub trims: u64,
    /// Position the transfer resumed from (0 = from the start).
    pub resumed_from: u64,
    /// Items of the whole transfer.
    pub total_items: u64,
    /// Snapshots deleted here because the source no longer has them.
    pub deleted_snapshots: Vec<String>,
    /// Snapshots kept although the source deleted them (locked here).
    pub kept_locked: Vec<String>,
    /// Why a transfer is `full`: a baseline, no common snapshot, or every
    /// block differing from the base (the source was re-baselined).
    #[serde(default)]
    pub full_reason: Option<String>,
    /// End time (ms since the epoch).
    pub finished_unix_ms: u64,
    /// Duration (ms).
    pub duration_ms: u64,
}

/// What `mirror retarget` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetargetReport {
    /// Destination path.
    pub dst: String,
    /// The former source, `addr/vol[/qtree]`.
    pub old_source: String,
    /// The former source's node id (if it was ever reached).
    pub old_source_node: Option<String>,
    /// The new source, `addr/vol[/qtree]`.
    pub new_source: String,
    /// The new source's node id.
    pub new_source_node: String,
    /// Newest snapshot the destination shares with the new source: the base
    /// of the next update (`None`: the next update is a full copy).
    pub base: Option<SnapRef>,
    /// Bytes a full copy sends (reported when there is no base).
    pub full_copy_bytes: Option<u64>,
    /// Whether the former upstream acknowledged the release of this
    /// relationship's locks (`false`: unreachable; they go stale there
    /// under their lease).
    pub released_old_upstream: bool,
    /// The update run right after the switch (`None` when the relationship
    /// is broken, or when the update failed: see `transfer_error`).
    pub transfer: Option<TransferReport>,
    /// Why the update after the switch failed (the switch stands; the next
    /// `mirror update` or scheduled update tries again).
    pub transfer_error: Option<String>,
}

/// Progress of a running transfer (callbacks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Progress {
    /// Items done (including those skipped by a resume).
    pub done_items: u64,
    /// Items of the whole transfer.
    pub total_items: u64,
    /// Data bytes received in this session.
    pub done_bytes: u64,
    /// Data bytes announced for this session.
    pub total_bytes: u64,
}

/// A persisted relationship (the destination's side drives it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relationship {
    /// Destination path: `vol` (volume mirror) or `vol/qtree`.
    pub dst: String,
    /// Destination volume.
    pub dst_volume: String,
    /// Destination qtree (qtree mirror).
    pub dst_qtree: Option<String>,
    /// Source address.
    pub source_addr: String,
    /// Source volume.
    pub source_volume: String,
    /// Source qtree (qtree mirror).
    pub source_qtree: Option<String>,
    /// The source's node id, learnt at the first connection.
    #[serde(default)]
    pub source_node: Option<String>,
    /// Kind.
    pub kind: MirrorKind,
    /// Broken: destination writable, updates refused until resync.
    #[serde(default)]
    pub broken: bool,
    /// Scheduled updates (ms).
    #[serde(default)]
    pub every_ms: Option<u64>,
    /// Updates follow the source's new snapshots (`--follow`).
    #[serde(default)]
    pub follow: bool,
    /// Throttle (bytes per second).
    #[serde(default)]
    pub throttle_bps: Option<u64>,
    /// The source's snapshot ids at the last contact (oldest first).
    #[serde(default)]
    pub source_snaps: Vec<Uuid>,
    /// Full transfers done.
    #[serde(default)]
    pub full_transfers: u64,
    /// Incremental transfers done.
    #[serde(default)]
    pub incremental_transfers: u64,
    /// Transfers (of either kind) that resumed an interrupted one from its
    /// checkpoint.
    #[serde(default)]
    pub resumed_transfers: u64,
    /// The last successful transfer.
    #[serde(default)]
    pub last_transfer: Option<TransferReport>,
    /// When the last update ended well, also one with nothing to send
    /// (which keeps `last_transfer`): ms since the epoch.
    #[serde(default)]
    pub last_update_unix_ms: Option<u64>,
    /// The last error, cleared by a success.
    #[serde(default)]
    pub last_error: Option<String>,
    /// Newest snapshot both sides hold.
    #[serde(default)]
    pub common: Option<SnapRef>,
    /// When `mirror break` made the destination writable (snapshots taken
    /// here since are the ones a resync would discard).
    #[serde(default)]
    pub broken_unix_ms: Option<u64>,
    /// What the source did to this relationship since its last transfer
    /// (a forced delete of a snapshot it shares with us), for `mirror
    /// status`; cleared by the next successful transfer.
    #[serde(default)]
    pub source_notice: Option<String>,
}

impl Relationship {
    /// `addr/vol[/qtree]`.
    pub fn source_path(&self) -> String {
        match &self.source_qtree {
            Some(q) => format!("{}/{}/{}", self.source_addr, self.source_volume, q),
            None => format!("{}/{}", self.source_addr, self.source_volume),
        }
    }
}

/// A receiver's durable transfer checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Base of the interrupted transfer.
    pub base: Option<Uuid>,
    /// Target of the interrupted transfer.
    pub target: Uuid,
    /// Items durably applied.
    pub position: u64,
}

/// `mirror status --json`: one relationship.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MirrorStatus {
    /// Destination path.
    pub dst: String,
    /// Source `addr/vol[/qtree]`.
    pub source: String,
    /// Source node id (once known).
    pub source_node: Option<String>,
    /// `volume` or `qtree`.
    pub kind: MirrorKind,
    /// `idle`, `transferring` or `broken`.
    pub state: String,
    /// Newest common snapshot.
    pub newest_common_snapshot: Option<SnapRef>,
    /// What the next update will do: `incremental from NAME`, a baseline,
    /// or a full copy (with an estimate of its size) when no snapshot is
    /// shared with the source any more.
    pub next_update: String,
    /// What the source did since the last transfer (a forced delete of a
    /// shared snapshot), if anything.
    pub notice: Option<String>,
    /// Now minus the creation time of the newest common snapshot (ms).
    pub lag_ms: Option<u64>,
    /// Full transfers done.
    pub full_transfers: u64,
    /// Incremental transfers done.
    pub incremental_transfers: u64,
    /// Transfers that resumed an interrupted one from its checkpoint.
    pub resumed_transfers: u64,
    /// The last successful transfer (kind, base, target, bytes).
    pub last_transfer: Option<TransferReport>,
    /// When the last update ended well, one with nothing to send included
    /// (ms since the epoch).
    pub last_update_unix_ms: Option<u64>,
    /// The last error.
    pub last_error: Option<String>,
    /// A checkpoint of an interrupted transfer, if any.
    pub checkpoint: Option<Checkpoint>,
    /// Scheduled interval (s).
    pub every_secs: Option<u64>,
    /// Updates follow the source's new snapshots (`--follow`).
    pub follow: bool,
    /// Throttle (bytes per second).
    pub throttle_bps: Option<u64>,
}

/// A transfer this node served to a downstream (kept in memory: a restart
/// forgets it until the next one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Served {
    /// When it ended (ms since the epoch).
    pub unix_ms: u64,
    /// The snapshot sent.
    pub snapshot: String,
    /// `full` or `incremental`.
    pub kind: String,
    /// Data bytes sent.
    pub bytes: u64,
}

/// `mirror destinations`: one downstream relationship that pulls from this
/// node (ONTAP's `snapmirror list-destinations`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Destination {
    /// The downstream node.
    pub node: String,
    /// Its relationship (its destination path).
    pub relationship: String,
    /// Our volume it pulls.
    pub volume: Option<String>,
    /// Its set here is stale (not renewed within its lease).
    pub stale: bool,
    /// Snapshots of `volume` its locks hold here (its own and those it
    /// relays), oldest first.
    pub locked_snapshots: Vec<String>,
    /// Locks it holds here.
    pub locks: usize,
    /// The last transfer served to it since this node started.
    pub last_served: Option<Served>,
    /// Time since the newest snapshot it holds here was taken (ms), if it
    /// holds one.
    pub lag_ms: Option<u64>,
}

/// `lock add --json`: the lock, and whether it reached the upstreams.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LockAdded {
    #[serde(flatten)]
    pub lock: LockView,
    /// Every upstream node took the new lock set before the call returned
    /// (each relays it on before it answers). `false`: the nodes in
    /// `undelivered_upstreams` could not be reached; the set is retried
    /// every tick, and until it arrives they (and the nodes above them)
    /// do not know of the lock and may delete the snapshot.
    pub delivered: bool,
    pub undelivered_upstreams: Vec<String>,
}

/// `lock list --json`: one lock, both forms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LockView {
    /// Local volume holding the snapshot (if it is here).
    pub volume: Option<String>,
    /// Local snapshot name (if it is here).
    pub snapshot: Option<String>,
    /// Global snapshot id.
    pub snapshot_id: Uuid,
    /// `owner`, `destination-path` or `qtree`.
    pub kind: String,
    /// User-visible string (application / path / qtree).
    pub text: String,
    /// Node where the dependency lives.
    pub origin_node: String,
    /// Nodes the lock travelled through, origin side first.
    pub hop_path: Vec<String>,
    /// `active` or `stale`.
    pub state: String,
    /// Created (ms since the epoch).
    pub created_unix_ms: u64,
    /// Renewed (ms since the epoch).
    pub renewed_unix_ms: u64,
    /// Lease (ms).
    pub lease_ms: u64,
    /// What `lock release --holder` takes to end it (application owner, or
    /// the downstream node it came through).
    pub holder: String,
    /// Second form: the resource protected.
    pub resource_id: Uuid,
    /// Second form: the downstream dataset that needs it.
    pub locking_dataset_id: String,
}

/// What `vol delete` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolDeleteReport {
    /// The volume.
    pub volume: String,
    /// Its snapshots, deleted with it.
    pub deleted_snapshots: Vec<String>,
    /// With `--force`: the locks it overrode, one line each (the holders
    /// are told their snapshots are gone).
    pub forced_locks: Vec<String>,
    /// With `--force`: downstream relationships that pulled it (they need
    /// a new source, or a new baseline).
    pub ended_downstreams: Vec<String>,
}

/// What `snap rollback` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackReport {
    /// The volume.
    pub volume: String,
    /// The snapshot its live image now is.
    pub snapshot: String,
    /// With `-r`: the newer snapshots deleted with the rollback, oldest
    /// first.
    pub deleted_snapshots: Vec<String>,
}

/// Why prune kept a snapshot it would otherwise delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PruneSkip {
    /// Snapshot name.
    pub snapshot: String,
    /// Human reason.
    pub reason: String,
    /// The locks holding it.
    pub holders: Vec<LockView>,
    /// What deleting it would cost, once per holder: which relationship
    /// would need a full copy (`deleting s3 would force a full copy of
    /// d/vol0`), or why none would; stale holders marked.
    pub effects: Vec<String>,
}

/// What prune did (or would do with `dry_run`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PrunePlan {
    /// Volume.
    pub volume: String,
    /// Snapshots kept by count.
    pub keep: usize,
    /// Preview only.
    pub dry_run: bool,
    /// Deleted (or would be).
    pub deleted: Vec<String>,
    /// Kept because newest.
    pub kept_recent: Vec<String>,
    /// Kept because locked or in a transfer.
    pub skipped: Vec<PruneSkip>,
}
