//! The wire protocol: frames, messages, the codec and the auth helpers.
//!
//! Owns the byte layout described in `docs/PROTOCOL.md`. A frame is a fixed
//! 24-byte little-endian header, an rkyv-archived [`Message`] body validated
//! with bytecheck before use, then `payload_len` raw bytes (extent data) that
//! the decoder hands out as a slice borrowed from the read buffer: block data
//! is never copied into a serialized structure.
//!
//! Invariants: declared lengths are checked against [`MAX_BODY_LEN`] and
//! [`MAX_PAYLOAD_LEN`] before anything is allocated; the header's crc32c
//! covers header bytes 0..20 and the body; only `Extent` carries a payload;
//! the header layout (magic, major, minor at fixed offsets) is frozen across
//! major versions so any peer can read a version-mismatch error frame.
//! Also holds the persisted lock-table structs (rkyv) used by `node.rs`.

use hmac::{Hmac, Mac};
use rkyv::{Archive, Deserialize, Serialize};
use sha2::Sha256;
use uuid::Uuid;

use crate::error::{LockError, Result};
use crate::model::{LockKind, LockSet, SoftLock};

/// Frame magic, bytes `S L C E` on the wire.
pub const MAGIC: u32 = u32::from_le_bytes(*b"SLCE");
/// Protocol major version: a different major is refused with an error frame.
pub const VERSION_MAJOR: u16 = 2;
/// Protocol minor version: additive changes only. 1 added the paged
/// snapshot list ([`Message::SnapshotPageRequest`]); a peer of minor 0 is
/// asked with [`Message::SnapshotListRequest`]. 2 added the snapshot watch
/// ([`Message::WatchRequest`]) that `mirror create --follow` waits on; a
/// peer of minor 0 or 1 is polled with updates instead.
pub const VERSION_MINOR: u16 = 2;
/// Most volumes one [`Message::WatchRequest`] names.
pub const WATCH_VOLUMES_MAX: usize = 1024;
/// Longest a source holds a [`Message::WatchRequest`] before it answers
/// that nothing changed (ms).
pub const WATCH_WAIT_MAX_MS: u32 = 30_000;
/// Most snapshots one [`Message::SnapshotPage`] carries (well inside
/// [`MAX_BODY_LEN`]: an entry is at most about 150 bytes).
pub const SNAPSHOT_PAGE_MAX: u32 = 2048;
/// Fixed header size in bytes.
pub const HEADER_LEN: usize = 24;
/// Bound on a frame body (checked before allocating).
pub const MAX_BODY_LEN: u32 = 1 << 20;
/// Bound on a frame's raw payload (checked before allocating).
pub const MAX_PAYLOAD_LEN: u32 = 8 << 20;
/// Nonce length of the Hello challenge.
pub const NONCE_LEN: usize = 32;

/// A lock on the wire (also used in the persisted lock table).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct WireLock {
    /// Snapshot uuid bytes.
    pub snapshot: [u8; 16],
    /// [`LockKind::code`].
    pub kind: u8,
    /// User-visible text.
    pub text: String,
    /// Origin node.
    pub origin_node: String,
    /// Hop path.
    pub hop_path: Vec<String>,
    /// Created (ms).
    pub created_ms: u64,
    /// Renewed (ms).
    pub renewed_ms: u64,
    /// Lease (ms).
    pub lease_ms: u64,
    /// The resource on the origin node that needs the snapshot
    /// (`node/volume[/qtree]`): the lock's second form (claims 32-34).
    pub dataset: String,
}

impl WireLock {
    /// From the model.
    pub fn from_model(l: &SoftLock) -> Self {
        WireLock {
            snapshot: *l.snapshot.as_bytes(),
            kind: l.kind.code(),
            text: l.text.clone(),
            origin_node: l.origin_node.clone(),
            hop_path: l.hop_path.clone(),
            created_ms: l.created_ms,
            renewed_ms: l.renewed_ms,
            lease_ms: l.lease_ms,
            dataset: l.dataset.clone(),
        }
    }
    /// To the model (errors on an unknown kind code).
    pub fn to_model(&self) -> Result<SoftLock> {
        Ok(SoftLock {
            snapshot: Uuid::from_bytes(self.snapshot),
            kind: LockKind::from_code(self.kind)?,
            text: self.text.clone(),
            origin_node: self.origin_node.clone(),
            hop_path: self.hop_path.clone(),
            created_ms: self.created_ms,
            renewed_ms: self.renewed_ms,
            lease_ms: self.lease_ms,
            dataset: self.dataset.clone(),
        })
    }

    /// Bytes this lock takes in a frame body, roughly (strings plus the
    /// fixed fields and rkyv's per-field overhead), for splitting big sets.
    pub fn encoded_len_estimate(&self) -> usize {
        let strings = self.text.len()
            + self.origin_node.len()
            + self.dataset.len()
            + self.hop_path.iter().map(|h| h.len() + 8).sum::<usize>();
        96 + strings
    }
}

/// A lock set on the wire: one relationship's whole set, or one part of it
/// (a set too big for one frame travels as `parts` frames of the same
/// generation, `part` 0..parts; see [`SetAssembler`]).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct WireLockSet {
    /// Sender node.
    pub sender: String,
    /// The sender's relationship this set belongs to (its destination path).
    pub relationship: String,
    /// The receiver's volume whose snapshots the set locks.
    pub volume: String,
    /// Generation.
    pub generation: u64,
    /// Lease (ms).
    pub lease_ms: u64,
    /// Locks.
    pub locks: Vec<WireLock>,
    /// Force-deleted snapshots the sender acknowledges.
    pub gone_acks: Vec<[u8; 16]>,
    /// Index of this frame's part, 0-based.
    pub part: u32,
    /// Number of parts of the set (at least 1).
    pub parts: u32,
}

/// Body bytes one lock-set part aims to stay under (half the frame bound, so
/// the estimate's slack never makes a part exceed [`MAX_BODY_LEN`]).
pub const SET_PART_BYTES: usize = (MAX_BODY_LEN as usize) / 2;

/// Most parts one set may be split into (a bound the receiver enforces
/// before it buffers anything).
pub const SET_PARTS_MAX: u32 = 4096;

impl WireLockSet {
    /// From the model, as one part.
    pub fn from_model(s: &LockSet) -> Self {
        WireLockSet {
            sender: s.sender.clone(),
            relationship: s.relationship.clone(),
            volume: s.volume.clone(),
            generation: s.generation,
            lease_ms: s.lease_ms,
            locks: s.locks.iter().map(WireLock::from_model).collect(),
            gone_acks: s.gone_acks.iter().map(|u| *u.as_bytes()).collect(),
            part: 0,
            parts: 1,
        }
    }

    /// The frames that carry `s`: one when it fits in [`SET_PART_BYTES`],
    /// else several parts of the same generation, every lock in exactly one
    /// part (gone acks ride in the first). Never drops a lock.
    pub fn split(s: &LockSet) -> Vec<WireLockSet> {
        let whole = WireLockSet::from_model(s);
        let mut chunks: Vec<Vec<WireLock>> = vec![Vec::new()];
        let mut bytes = 256 + 16 * whole.gone_acks.len();
        for l in whole.locks.iter() {
            let n = l.encoded_len_estimate();
            let cur_len = chunks.last().map_or(0, Vec::len);
            if cur_len > 0 && bytes + n > SET_PART_BYTES {
                chunks.push(Vec::new());
                bytes = 256;
            }
            bytes += n;
            if let Some(c) = chunks.last_mut() {
                c.push(l.clone());
            }
        }
        let parts = chunks.len() as u32;
        chunks
            .into_iter()
            .enumerate()
            .map(|(i, locks)| WireLockSet {
                locks,
                gone_acks: if i == 0 {
                    whole.gone_acks.clone()
                } else {
                    Vec::new()
                },
                part: i as u32,
                parts,
                ..whole.clone()
            })
            .collect()
    }

    /// To the model (not yet validated against bounds: call
    /// `LockSet::validate`). Only a whole set (`parts == 1`) converts;
    /// parts go through a [`SetAssembler`] first.
    pub fn to_model(&self) -> Result<LockSet> {
        if self.parts != 1 || self.part != 0 {
            return Err(LockError::BadField {
                field: "set.part",
                detail: format!(
                    "part {} of {} given where a whole set was expected",
                    self.part, self.parts
                ),
            });
        }
        Ok(LockSet {
            sender: self.sender.clone(),
            relationship: self.relationship.clone(),
            volume: self.volume.clone(),
            generation: self.generation,
            lease_ms: self.lease_ms,
            locks: self
                .locks
                .iter()
                .map(WireLock::to_model)
                .collect::<Result<_>>()?,
            gone_acks: self
                .gone_acks
                .iter()
                .map(|b| Uuid::from_bytes(*b))
                .collect(),
        })
    }
}

/// Reassembles a set sent in parts ([`WireLockSet::split`]), one set at a
/// time per connection: parts must arrive in order, all of one sender,
/// relationship and generation; the locks buffered are bounded by
/// `max_locks` before anything is kept.
#[derive(Debug, Default)]
pub struct SetAssembler {
    pending: Option<WireLockSet>,
}

impl SetAssembler {
    /// Feed one frame's set. Returns the whole set once its last part
    /// arrived; `Ok(None)` while parts are missing; an error names what was
    /// out of order or too big (the partial set is dropped).
    pub fn push(&mut self, w: WireLockSet, max_locks: usize) -> Result<Option<LockSet>> {
        let bad = |detail: String| LockError::BadField {
            field: "set.part",
            detail,
        };
        if w.parts == 0 || w.parts > SET_PARTS_MAX || w.part >= w.parts {
            self.pending = None;
            return Err(bad(format!("part {} of {}", w.part, w.parts)));
        }
        let mut acc = match self.pending.take() {
            None if w.part == 0 => {
                if w.parts == 1 {
                    return w.to_model().map(Some);
                }
                self.pending = Some(w);
                return Ok(None);
            }
            None => {
                return Err(bad(format!(
                    "part {} of {} without part 0",
                    w.part, w.parts
                )))
            }
            Some(acc) => acc,
        };
        let expected = acc.part + 1;
        if w.part != expected
            || w.parts != acc.parts
            || w.generation != acc.generation
            || w.sender != acc.sender
            || w.relationship != acc.relationship
            || w.volume != acc.volume
        {
            return Err(bad(format!(
                "part {} of {} (generation {}) after part {} of {} (generation {})",
                w.part, w.parts, w.generation, acc.part, acc.parts, acc.generation
            )));
        }
        if acc.locks.len() + w.locks.len() > max_locks {
            return Err(LockError::TooManyLocks {
                sender: w.sender,
                count: acc.locks.len() + w.locks.len(),
                max: max_locks,
            });
        }
        acc.locks.extend(w.locks);
        acc.part = w.part;
        if acc.part + 1 == acc.parts {
            acc.part = 0;
            acc.parts = 1;
            return acc.to_model().map(Some);
        }
        self.pending = Some(acc);
        Ok(None)
    }
}

/// Persisted upstream relationship (lock table format 4): one per
/// relationship this node pulls.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PersistUp {
    /// Our relationship (destination path).
    pub relationship: String,
    /// Upstream node.
    pub upstream: String,
    /// The upstream's volume we pull from.
    pub source: String,
    /// Our local volume the relationship writes.
    pub volume: String,
    /// Lock kind code.
    pub kind: u8,
    /// Snapshots the upstream holds (of `source`).
    pub has: Vec<[u8; 16]>,
    /// Last snapshot committed from the upstream.
    pub anchor: Option<[u8; 16]>,
    /// Gone acks to send.
    pub gone_acks: Vec<[u8; 16]>,
}

/// Persisted downstream relationship (lock table format 4): one per
/// (downstream node, its relationship).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PersistDown {
    /// Downstream node.
    pub node: String,
    /// Its relationship (its destination path); empty for a set upgraded
    /// from a format-3 table.
    pub relationship: String,
    /// Our volume it pulls from; `None` for a set upgraded from a format-3
    /// table (then its locks hold the snapshot in whichever volume has it).
    pub volume: Option<String>,
    /// Shared snapshots.
    pub shared: Vec<[u8; 16]>,
    /// Last accepted set.
    pub received: Option<WireLockSet>,
    /// When accepted (ms).
    pub received_ms: u64,
    /// Highest generation accepted.
    pub generation: u64,
    /// Stale flag.
    pub stale: bool,
    /// Released by lease or operator until the next set.
    pub lapsed: bool,
    /// Force-deleted snapshots not yet acknowledged.
    pub forced_gone: Vec<[u8; 16]>,
}

/// The snapshots of one local volume, oldest first.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PersistLocal {
    /// Volume name.
    pub volume: String,
    /// Snapshot ids, oldest first.
    pub snapshots: Vec<[u8; 16]>,
}

/// An application lock and the local volume whose snapshot it holds.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PersistApp {
    /// Volume name.
    pub volume: String,
    /// The lock.
    pub lock: WireLock,
}

/// When a derived lock (own base of a relationship, or base shared with a
/// downstream relationship) first held its snapshot.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PersistSince {
    /// The upstream relationship, or the downstream node.
    pub peer: String,
    /// The downstream's relationship (empty for an upstream relationship).
    pub relationship: String,
    /// True: our own base lock of relationship `peer`; false: the base we
    /// share with downstream (`peer`, `relationship`).
    pub upstream: bool,
    /// Snapshot id.
    pub snapshot: [u8; 16],
    /// Unix ms.
    pub ms: u64,
}

/// Persisted lock table of one node (format 4: relationships keyed by
/// relationship, snapshots by volume).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PersistNode {
    /// Node id.
    pub node_id: String,
    /// Restart epoch.
    pub epoch: u32,
    /// Generation counter within the epoch.
    pub counter: u32,
    /// Local snapshots per volume.
    pub local: Vec<PersistLocal>,
    /// Upstream relationships.
    pub ups: Vec<PersistUp>,
    /// Downstream relationships.
    pub downs: Vec<PersistDown>,
    /// Application locks.
    pub app: Vec<PersistApp>,
    /// Dates of derived locks.
    pub since: Vec<PersistSince>,
}

/// A lock as lock-table formats 1-3 stored it (before `dataset`). Read to
/// upgrade old tables, never written.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct WireLockV1 {
    /// Snapshot uuid bytes.
    pub snapshot: [u8; 16],
    /// [`LockKind::code`].
    pub kind: u8,
    /// User-visible text.
    pub text: String,
    /// Origin node.
    pub origin_node: String,
    /// Hop path.
    pub hop_path: Vec<String>,
    /// Created (ms).
    pub created_ms: u64,
    /// Renewed (ms).
    pub renewed_ms: u64,
    /// Lease (ms).
    pub lease_ms: u64,
}

impl WireLockV1 {
    /// To the model; the dataset of an old lock is its origin and text
    /// (`origin:text`), as version-1 nodes showed it.
    pub fn to_model(&self) -> Result<SoftLock> {
        Ok(SoftLock {
            snapshot: Uuid::from_bytes(self.snapshot),
            kind: LockKind::from_code(self.kind)?,
            text: self.text.clone(),
            origin_node: self.origin_node.clone(),
            hop_path: self.hop_path.clone(),
            created_ms: self.created_ms,
            renewed_ms: self.renewed_ms,
            lease_ms: self.lease_ms,
            dataset: format!("{}:{}", self.origin_node, self.text),
        })
    }
}

/// A lock set as lock-table formats 1-3 stored it (one per downstream
/// node). Read to upgrade old tables, never written.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct WireLockSetV1 {
    /// Sender node.
    pub sender: String,
    /// Generation.
    pub generation: u64,
    /// Lease (ms).
    pub lease_ms: u64,
    /// Locks.
    pub locks: Vec<WireLockV1>,
    /// Force-deleted snapshots the sender acknowledges.
    pub gone_acks: Vec<[u8; 16]>,
}

/// Persisted upstream of lock-table formats 2 and 3 (keyed by node).
/// Read to upgrade old tables, never written.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PersistUpV2 {
    /// Upstream node.
    pub name: String,
    /// Our relationship name.
    pub relationship: String,
    /// Lock kind code.
    pub kind: u8,
    /// Snapshots the upstream holds.
    pub has: Vec<[u8; 16]>,
    /// Last snapshot committed from the upstream (format version 2).
    pub anchor: Option<[u8; 16]>,
    /// Gone acks to send.
    pub gone_acks: Vec<[u8; 16]>,
}

/// Persisted downstream of lock-table formats 1-3 (keyed by node).
/// Read to upgrade old tables, never written.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PersistDownV1 {
    /// Downstream node.
    pub name: String,
    /// Shared snapshots.
    pub shared: Vec<[u8; 16]>,
    /// Last accepted set.
    pub received: Option<WireLockSetV1>,
    /// When accepted (ms).
    pub received_ms: u64,
    /// Highest generation accepted.
    pub generation: u64,
    /// Stale flag.
    pub stale: bool,
    /// Released by lease or operator until the next set.
    pub lapsed: bool,
    /// Force-deleted snapshots not yet acknowledged.
    pub forced_gone: Vec<[u8; 16]>,
}

/// Persisted lock table as format version 3 wrote it (relationships keyed
/// by peer node). Read to upgrade old tables, never written.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PersistNodeV3 {
    /// Node id.
    pub node_id: String,
    /// Restart epoch.
    pub epoch: u32,
    /// Generation counter within the epoch.
    pub counter: u32,
    /// Local snapshots, oldest first.
    pub local: Vec<[u8; 16]>,
    /// Upstreams.
    pub ups: Vec<PersistUpV2>,
    /// Downstreams.
    pub downs: Vec<PersistDownV1>,
    /// Application locks.
    pub app: Vec<WireLockV1>,
    /// Since when each of our own base locks (per upstream) and each
    /// shared-base lock (per downstream) has held its snapshot (format
    /// version 3).
    pub since: Vec<PersistSinceV3>,
}

/// When a derived lock (own base with an upstream, or base shared with a
/// downstream) first held its snapshot.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PersistSinceV3 {
    /// The upstream or downstream node the lock belongs to.
    pub peer: String,
    /// True: our own base lock with upstream `peer`; false: the base we
    /// share with downstream `peer`.
    pub upstream: bool,
    /// Snapshot id.
    pub snapshot: [u8; 16],
    /// Unix ms.
    pub ms: u64,
}

/// Persisted lock table as format version 2 wrote it (before lock times
/// of derived locks). Read to upgrade old tables, never written.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PersistNodeV2 {
    /// Node id.
    pub node_id: String,
    /// Restart epoch.
    pub epoch: u32,
    /// Generation counter within the epoch.
    pub counter: u32,
    /// Local snapshots, oldest first.
    pub local: Vec<[u8; 16]>,
    /// Upstreams.
    pub ups: Vec<PersistUpV2>,
    /// Downstreams.
    pub downs: Vec<PersistDownV1>,
    /// Application locks.
    pub app: Vec<WireLockV1>,
}

impl From<PersistNodeV2> for PersistNodeV3 {
    fn from(v: PersistNodeV2) -> Self {
        PersistNodeV3 {
            node_id: v.node_id,
            epoch: v.epoch,
            counter: v.counter,
            local: v.local,
            ups: v.ups,
            downs: v.downs,
            app: v.app,
            since: Vec::new(),
        }
    }
}

/// Persisted upstream relationship as lock-table format version 1 wrote it
/// (before the anchor). Read to upgrade old tables, never written.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PersistUpV1 {
    /// Upstream node.
    pub name: String,
    /// Our relationship name.
    pub relationship: String,
    /// Lock kind code.
    pub kind: u8,
    /// Snapshots the upstream holds.
    pub has: Vec<[u8; 16]>,
    /// Gone acks to send.
    pub gone_acks: Vec<[u8; 16]>,
}

/// Persisted lock table as format version 1 wrote it. Read to upgrade old
/// tables (every anchor unknown until the next transfer), never written.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PersistNodeV1 {
    /// Node id.
    pub node_id: String,
    /// Restart epoch.
    pub epoch: u32,
    /// Generation counter within the epoch.
    pub counter: u32,
    /// Local snapshots, oldest first.
    pub local: Vec<[u8; 16]>,
    /// Upstreams.
    pub ups: Vec<PersistUpV1>,
    /// Downstreams.
    pub downs: Vec<PersistDownV1>,
    /// Application locks.
    pub app: Vec<WireLockV1>,
}

impl From<PersistNodeV1> for PersistNodeV2 {
    fn from(v: PersistNodeV1) -> Self {
        PersistNodeV2 {
            node_id: v.node_id,
            epoch: v.epoch,
            counter: v.counter,
            local: v.local,
            ups: v
                .ups
                .into_iter()
                .map(|u| PersistUpV2 {
                    name: u.name,
                    relationship: u.relationship,
                    kind: u.kind,
                    has: u.has,
                    anchor: None,
                    gone_acks: u.gone_acks,
                })
                .collect(),
            downs: v.downs,
            app: v.app,
        }
    }
}

/// Hello: first message each way. See `docs/PROTOCOL.md` for the handshake.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Sender node id.
    pub node_id: String,
    /// Sender's major version.
    pub major: u16,
    /// Sender's minor version.
    pub minor: u16,
    /// Fresh random challenge for the peer.
    pub nonce: [u8; NONCE_LEN],
    /// HMAC-SHA256(secret, peer nonce || peer id || our id) when answering.
    pub auth: Option<[u8; 32]>,
}

/// Snapshot description (lists and transfer start).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SnapInfo {
    /// Global id.
    pub id: [u8; 16],
    /// Name.
    pub name: String,
    /// Created (ms since epoch).
    pub created_ms: u64,
    /// Content digest computed where first taken.
    pub content_digest: [u8; 32],
}

/// Pull request from a destination.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TransferRequest {
    /// Request id echoed in replies.
    pub req_id: u64,
    /// The requester's relationship (its destination path): the source
    /// records what it served under it.
    pub relationship: String,
    /// Source volume.
    pub volume: String,
    /// Source qtree (qtree mirror) or none (volume mirror).
    pub qtree: Option<String>,
    /// Base snapshot (incremental) or none (baseline).
    pub base: Option<[u8; 16]>,
    /// Target snapshot.
    pub target: [u8; 16],
    /// Resume from this checkpoint position (0 = from start).
    pub resume_from: u64,
}

/// What the source will send.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TransferStart {
    /// Request id.
    pub req_id: u64,
    /// Target snapshot.
    pub target: SnapInfo,
    /// Base, if incremental.
    pub base: Option<[u8; 16]>,
    /// Extents to come.
    pub extent_count: u64,
    /// Bytes of extent payload to come.
    pub byte_count: u64,
    /// Volume size in bytes.
    pub volume_bytes: u64,
    /// Position the transfer starts at (resume).
    pub start_position: u64,
}

/// Checksum algorithm code of an extent.
pub const CHECKSUM_CRC32C: u8 = 1;
/// Checksum algorithm code of an extent.
pub const CHECKSUM_XXH3: u8 = 2;

/// An extent header; its data follows as the frame's raw payload.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtentHeader {
    /// Request id.
    pub req_id: u64,
    /// Logical block address (bytes / block size decided by the volume).
    pub lba: u64,
    /// Length in blocks.
    pub len: u32,
    /// [`CHECKSUM_CRC32C`] or [`CHECKSUM_XXH3`].
    pub checksum_kind: u8,
    /// Checksum of the payload.
    pub checksum: u64,
}

/// Error codes.
pub mod codes {
    /// Peer's major version unsupported.
    pub const VERSION: u16 = 1;
    /// Authentication failed.
    pub const AUTH: u16 = 2;
    /// Frame could not be decoded.
    pub const BAD_FRAME: u16 = 3;
    /// No common base snapshot.
    pub const NO_COMMON_BASE: u16 = 4;
    /// Unknown volume/qtree/snapshot.
    pub const NOT_FOUND: u16 = 5;
    /// Snapshot locked.
    pub const LOCKED: u16 = 6;
    /// Refused by a bound or a policy of the receiver (e.g. a lock set
    /// past `max_locks_per_peer`).
    pub const REFUSED: u16 = 7;
    /// Anything else.
    pub const INTERNAL: u16 = 100;
}

/// Every protocol message.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Handshake.
    Hello(Hello),
    /// A whole lock set for the relationship.
    LockSet(WireLockSet),
    /// Ask for the snapshot list of a volume (base selection).
    SnapshotListRequest {
        req_id: u64,
        volume: String,
        qtree: Option<String>,
    },
    /// Snapshot list, oldest first.
    SnapshotList {
        req_id: u64,
        snapshots: Vec<SnapInfo>,
    },
    /// Pull request.
    TransferRequest(TransferRequest),
    /// Transfer begins.
    TransferStart(TransferStart),
    /// Extent header (payload follows raw).
    Extent(ExtentHeader),
    /// Trim a range.
    Trim { req_id: u64, lba: u64, len: u32 },
    /// Source marks a checkpoint position.
    Checkpoint { req_id: u64, position: u64 },
    /// Receiver durably reached a position.
    CheckpointAck { req_id: u64, position: u64 },
    /// Transfer complete; receiver verifies the digest.
    TransferDone {
        req_id: u64,
        content_digest: [u8; 32],
    },
    /// Upstream force-deleted a snapshot the receiver depended on.
    SnapshotGone {
        snapshot: [u8; 16],
        holders_text: String,
    },
    /// Error with a code from [`codes`].
    Error {
        req_id: u64,
        code: u16,
        text: String,
    },
    /// Keepalive.
    Ping { nonce: u64 },
    /// Keepalive answer.
    Pong { nonce: u64 },
    /// Ask for entries `start ..` of the snapshot list of a volume, oldest
    /// first (minor 1 on): the list of a volume with more snapshots than
    /// one frame holds.
    SnapshotPageRequest {
        req_id: u64,
        volume: String,
        qtree: Option<String>,
        start: u32,
    },
    /// Entries `start .. start + snapshots.len()` of a list of `total`
    /// (at most [`SNAPSHOT_PAGE_MAX`]); `list_hash` is the xxh3-64 of the
    /// whole list's ids, so pages of a list that changed in between are
    /// not mixed.
    SnapshotPage {
        req_id: u64,
        start: u32,
        total: u32,
        list_hash: u64,
        snapshots: Vec<SnapInfo>,
    },
    /// Answer when the newest snapshot of any of `volumes` is no longer
    /// the one named, or after `wait_ms` (at most [`WATCH_WAIT_MAX_MS`])
    /// with nothing changed (minor 2 on).
    WatchRequest {
        req_id: u64,
        wait_ms: u32,
        volumes: Vec<WatchEntry>,
    },
    /// The indexes into the request's `volumes` whose newest snapshot
    /// changed (or that can no longer be served: the update names why);
    /// empty when the wait ran out.
    WatchReply { req_id: u64, changed: Vec<u32> },
}

/// One volume of a [`Message::WatchRequest`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct WatchEntry {
    /// The source volume.
    pub volume: String,
    /// The source qtree of a qtree mirror: the newest snapshot that holds it.
    pub qtree: Option<String>,
    /// Its newest snapshot as the downstream last saw it (zeros: none).
    pub newest: [u8; 16],
}

impl Message {
    /// Header message-type code of this message.
    pub fn type_code(&self) -> u16 {
        match self {
            Message::Hello(_) => 1,
            Message::LockSet(_) => 2,
            Message::SnapshotListRequest { .. } => 3,
            Message::SnapshotList { .. } => 4,
            Message::TransferRequest(_) => 5,
            Message::TransferStart(_) => 6,
            Message::Extent(_) => 7,
            Message::Trim { .. } => 8,
            Message::Checkpoint { .. } => 9,
            Message::CheckpointAck { .. } => 10,
            Message::TransferDone { .. } => 11,
            Message::SnapshotGone { .. } => 12,
            Message::Error { .. } => 13,
            Message::Ping { .. } => 14,
            Message::Pong { .. } => 15,
            Message::SnapshotPageRequest { .. } => 16,
            Message::SnapshotPage { .. } => 17,
            Message::WatchRequest { .. } => 18,
            Message::WatchReply { .. } => 19,
        }
    }
}

/// Highest message type code known to this build.
pub const MAX_TYPE_CODE: u16 = 19;

/// The `list_hash` of a [`Message::SnapshotPage`]: xxh3-64 of the ids of
/// the whole list, in order.
pub fn snapshot_list_hash(snapshots: &[SnapInfo]) -> u64 {
    let ids: Vec<u8> = snapshots.iter().flat_map(|s| s.id).collect();
    xxhash_rust::xxh3::xxh3_64(&ids)
}

/// A parsed, bound-checked header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Major version.
    pub major: u16,
    /// Minor version.
    pub minor: u16,
    /// Message type code.
    pub msg_type: u16,
    /// Flags (none defined in 1.0; must be 0).
    pub flags: u16,
    /// Body length.
    pub body_len: u32,
    /// Raw payload length.
    pub payload_len: u32,
    /// crc32c of header[0..20] and body.
    pub crc: u32,
}

impl Header {
    /// Total frame length.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.body_len as usize + self.payload_len as usize
    }
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}
fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

/// Parse and bound-check a header from the first [`HEADER_LEN`] bytes of
/// `buf`. Checks magic, major version, type code, flags and both lengths
/// (before the caller allocates anything for body or payload).
pub fn parse_header(buf: &[u8]) -> Result<Header> {
    let truncated = || LockError::Truncated {
        need: HEADER_LEN,
        have: buf.len(),
    };
    let h = buf.get(..HEADER_LEN).ok_or_else(truncated)?;
    let f16 = |at| le16(h, at).ok_or_else(truncated);
    let f32 = |at| le32(h, at).ok_or_else(truncated);
    let magic = f32(0)?;
    if magic != MAGIC {
        return Err(LockError::BadMagic {
            found: magic,
            expected: MAGIC,
        });
    }
    let hd = Header {
        major: f16(4)?,
        minor: f16(6)?,
        msg_type: f16(8)?,
        flags: f16(10)?,
        body_len: f32(12)?,
        payload_len: f32(16)?,
        crc: f32(20)?,
    };
    if hd.major != VERSION_MAJOR {
        return Err(LockError::UnsupportedVersion {
            major: hd.major,
            minor: hd.minor,
            our_major: VERSION_MAJOR,
        });
    }
    if hd.body_len > MAX_BODY_LEN {
        return Err(LockError::TooLong {
            what: "body",
            len: hd.body_len.into(),
            max: MAX_BODY_LEN.into(),
        });
    }
    if hd.payload_len > MAX_PAYLOAD_LEN {
        return Err(LockError::TooLong {
            what: "payload",
            len: hd.payload_len.into(),
            max: MAX_PAYLOAD_LEN.into(),
        });
    }
    if hd.msg_type == 0 || hd.msg_type > MAX_TYPE_CODE {
        return Err(LockError::UnknownMessageType(hd.msg_type));
    }
    if hd.flags != 0 {
        return Err(LockError::BadField {
            field: "header.flags",
            detail: format!("{:#06x} set, none defined", hd.flags),
        });
    }
    if hd.payload_len != 0 && hd.msg_type != 7 {
        return Err(LockError::BadPayload {
            msg_type: hd.msg_type,
            len: hd.payload_len,
        });
    }
    Ok(hd)
}

/// Encode `msg`'s header and body into `out` (cleared first), declaring
/// `payload_len` raw bytes that the caller sends right after (e.g. with
/// `writev` of `out` and its own data buffer). Only `Extent` may have a payload.
pub fn encode_into(msg: &Message, payload_len: u32, out: &mut Vec<u8>) -> Result<()> {
    let t = msg.type_code();
    if payload_len != 0 && t != 7 {
        return Err(LockError::BadPayload {
            msg_type: t,
            len: payload_len,
        });
    }
    if payload_len > MAX_PAYLOAD_LEN {
        return Err(LockError::TooLong {
            what: "payload",
            len: payload_len.into(),
            max: MAX_PAYLOAD_LEN.into(),
        });
    }
    let body = rkyv::to_bytes::<rkyv::rancor::Error>(msg).map_err(|e| LockError::Encode {
        what: "message",
        detail: e.to_string(),
    })?;
    let body_len = u32::try_from(body.len())
        .ok()
        .filter(|l| *l <= MAX_BODY_LEN)
        .ok_or(LockError::TooLong {
            what: "body",
            len: body.len() as u64,
            max: MAX_BODY_LEN.into(),
        })?;
    out.clear();
    out.reserve(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&VERSION_MAJOR.to_le_bytes());
    out.extend_from_slice(&VERSION_MINOR.to_le_bytes());
    out.extend_from_slice(&t.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&body_len.to_le_bytes());
    out.extend_from_slice(&payload_len.to_le_bytes());
    // `out` holds exactly the 20 header bytes the crc covers.
    debug_assert_eq!(out.len(), 20);
    let crc = crc32c::crc32c_append(crc32c::crc32c(out), &body);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&body);
    Ok(())
}

/// Encode a whole frame (header, body and payload) into a new buffer.
pub fn encode(msg: &Message, payload: &[u8]) -> Result<Vec<u8>> {
    let len = u32::try_from(payload.len()).map_err(|_| LockError::TooLong {
        what: "payload",
        len: payload.len() as u64,
        max: MAX_PAYLOAD_LEN.into(),
    })?;
    let mut out = Vec::new();
    encode_into(msg, len, &mut out)?;
    out.extend_from_slice(payload);
    Ok(out)
}

/// Decode the header and body at the start of `buf`, the payload (if the
/// header announces one) being elsewhere: a receiver that reads the payload
/// straight into its own buffer. The body is checked (crc, bytecheck)
/// before use; `buf` must hold at least header and body.
pub fn decode_head(buf: &[u8]) -> Result<(Header, Message)> {
    let header = parse_header(buf)?;
    let body_end = HEADER_LEN + header.body_len as usize;
    let truncated = || LockError::Truncated {
        need: body_end,
        have: buf.len(),
    };
    let body = buf.get(HEADER_LEN..body_end).ok_or_else(truncated)?;
    let covered = buf.get(..20).ok_or_else(truncated)?;
    let computed = crc32c::crc32c_append(crc32c::crc32c(covered), body);
    if computed != header.crc {
        return Err(LockError::Checksum {
            expected: header.crc,
            computed,
        });
    }
    let mut al = rkyv::util::AlignedVec::<16>::with_capacity(body.len());
    al.extend_from_slice(body);
    let msg =
        rkyv::from_bytes::<Message, rkyv::rancor::Error>(&al).map_err(|e| LockError::BadBody {
            msg_type: header.msg_type,
            detail: e.to_string(),
        })?;
    if msg.type_code() != header.msg_type {
        return Err(LockError::BadBody {
            msg_type: header.msg_type,
            detail: format!("body is type {}", msg.type_code()),
        });
    }
    Ok((header, msg))
}

/// A decoded frame: the message and its raw payload borrowed from the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded<'a> {
    /// The header.
    pub header: Header,
    /// The validated, deserialized body.
    pub msg: Message,
    /// Raw payload (extent data), borrowed: never copied.
    pub payload: &'a [u8],
    /// Bytes of `buf` this frame used.
    pub consumed: usize,
}

/// Decode one frame from the start of `buf`. Returns `Ok(None)` if `buf`
/// does not yet hold the whole frame (read more; [`parse_header`] tells how
/// much). The body is checked (crc, bytecheck) before use.
pub fn decode(buf: &[u8]) -> Result<Option<Decoded<'_>>> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let header = parse_header(buf)?;
    let need = header.frame_len();
    if buf.len() < need {
        return Ok(None);
    }
    let (header, msg) = decode_head(buf)?;
    let body_end = HEADER_LEN + header.body_len as usize;
    let payload = buf.get(body_end..need).ok_or(LockError::Truncated {
        need,
        have: buf.len(),
    })?;
    Ok(Some(Decoded {
        header,
        msg,
        payload,
        consumed: need,
    }))
}

/// The error frame to send when [`parse_header`] refused a peer's version
/// (or anything else): a clear answer instead of a hang.
pub fn error_frame(req_id: u64, err: &LockError) -> Result<Vec<u8>> {
    let code = match err {
        LockError::UnsupportedVersion { .. } => codes::VERSION,
        LockError::AuthFailed { .. } => codes::AUTH,
        LockError::Locked { .. } => codes::LOCKED,
        _ => codes::BAD_FRAME,
    };
    encode(
        &Message::Error {
            req_id,
            code,
            text: err.to_string(),
        },
        &[],
    )
}

/// HMAC-SHA256(secret, peer_nonce || len || challenger_id || len ||
/// responder_id) (lengths u32 LE): the `auth` a responder puts in its Hello.
/// The secret never crosses the wire.
pub fn auth_response(
    secret: &[u8],
    peer_nonce: &[u8; NONCE_LEN],
    challenger_id: &str,
    responder_id: &str,
) -> Result<[u8; 32]> {
    Ok(auth_mac(secret, peer_nonce, challenger_id, responder_id)?
        .finalize()
        .into_bytes()
        .into())
}

fn auth_mac(
    secret: &[u8],
    nonce: &[u8; NONCE_LEN],
    challenger_id: &str,
    responder_id: &str,
) -> Result<Hmac<Sha256>> {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(secret).map_err(|e| LockError::BadField {
            field: "auth.secret",
            detail: e.to_string(),
        })?;
    mac.update(nonce);
    for id in [challenger_id, responder_id] {
        let len = u32::try_from(id.len()).map_err(|_| LockError::BadField {
            field: "hello.node_id",
            detail: "longer than 4 GiB".into(),
        })?;
        mac.update(&len.to_le_bytes());
        mac.update(id.as_bytes());
    }
    Ok(mac)
}

/// Check a peer's `auth` against the nonce we sent (constant time).
pub fn verify_auth(
    secret: &[u8],
    our_nonce: &[u8; NONCE_LEN],
    our_id: &str,
    peer_id: &str,
    auth: &[u8; 32],
) -> Result<()> {
    auth_mac(secret, our_nonce, our_id, peer_id)?
        .verify_slice(auth)
        .map_err(|_| LockError::AuthFailed {
            peer: peer_id.to_string(),
        })
}
