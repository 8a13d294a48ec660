//! The engine's public vocabulary: the names, infos and requests that the
//! daemon, the NBD server and the replicator use. The single-threaded
//! [`crate::pool::Pool`] implements these operations; the shard layer
//! ([`crate::shard`]) carries [`Request`]s to it over channels and returns
//! [`Reply`]s.
//!
//! Units: `lba`/`pba` are 4 KiB block addresses, `*_blocks` counts blocks,
//! `*_bytes` counts bytes, `*_unix_ms` is milliseconds since the Unix epoch.

use crate::device::AlignedBuf;
use crate::error::Result;
use uuid::Uuid;

/// Longest volume, qtree or snapshot name, in bytes.
pub const NAME_LEN_MAX: usize = 64;

/// A block namespace: a volume's own space (`qtree: None`) or one of its
/// qtrees.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NsName {
    pub volume: String,
    pub qtree: Option<String>,
}

impl NsName {
    pub fn volume(volume: &str) -> Self {
        NsName {
            volume: volume.to_string(),
            qtree: None,
        }
    }
    pub fn qtree(volume: &str, qtree: &str) -> Self {
        NsName {
            volume: volume.to_string(),
            qtree: Some(qtree.to_string()),
        }
    }
}

impl std::fmt::Display for NsName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.qtree {
            None => write!(f, "{}", self.volume),
            Some(q) => write!(f, "{}/{}", self.volume, q),
        }
    }
}

/// Which image of a namespace: the live one, or a snapshot by local name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Image {
    pub ns: NsName,
    pub snapshot: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QtreeInfo {
    pub name: String,
    pub size_bytes: u64,
    /// The qtree's own read-only flag (a qtree mirror's destination): client
    /// writes and trims to it are refused; replica writes go through. A
    /// read-only volume refuses them in all its qtrees whatever this says.
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    pub name: String,
    pub id: u32,
    pub size_bytes: u64,
    pub qtrees: Vec<QtreeInfo>,
    /// Read-only volumes (mirror destinations) refuse client writes; the
    /// replicator writes them through [`Request::Write`] with `replica: true`.
    pub read_only: bool,
    /// Blocks held by the live image (data and its map), current: map
    /// nodes dirtied since the last CP count as the block each will take.
    pub used_blocks: u64,
    pub snapshot_count: usize,
    /// A clone's origin: the snapshot it was made from.
    pub origin: Option<CloneOrigin>,
}

/// The snapshot a clone was made from ([`Request::CloneVolume`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneOrigin {
    pub volume: String,
    pub snapshot: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub name: String,
    /// Global id: the same on every node the snapshot is mirrored to.
    pub id: Uuid,
    /// Consistency-point generation at which it was taken (local).
    pub gen: u64,
    pub created_unix_ms: u64,
    /// Content digest per namespace, `None` = the volume's own space.
    /// Computed incrementally; equal content gives equal digests.
    pub digests: Vec<(Option<String>, u128)>,
    /// Blocks this snapshot's image holds.
    pub referenced_blocks: u64,
    /// Blocks that deleting this snapshot alone would free.
    pub unique_blocks: u64,
    /// The volumes cloned from this snapshot, by name: while there are
    /// any, the snapshot cannot be deleted.
    pub clones: Vec<String>,
}

/// A snapshot's identity without its block counts
/// ([`Request::ListSnapshotNames`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotName {
    pub name: String,
    /// Global id, as in [`SnapshotInfo::id`].
    pub id: Uuid,
    /// Consistency-point generation at which it was taken (local).
    pub gen: u64,
    pub created_unix_ms: u64,
    /// Content digest per namespace, as in [`SnapshotInfo::digests`].
    pub digests: Vec<(Option<String>, u128)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpaceInfo {
    pub total_blocks: u64,
    pub used_blocks: u64,
    pub free_blocks: u64,
    /// Released blocks waiting for the next durable consistency point.
    pub pending_free_blocks: u64,
    /// Shards whose pool refuses writes after a failed device write or
    /// flush (poisoned until the node restarts; reads still work).
    pub poisoned_shards: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiffKind {
    /// The blocks hold data in the target: send them.
    Data,
    /// The blocks are unmapped in the target (trimmed): send a trim.
    Trim,
}

/// One changed run of blocks between two images of a namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiffExtent {
    pub lba: u64,
    pub len_blocks: u64,
    pub kind: DiffKind,
}

/// What a diff between two images holds, counted (metadata only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiffStats {
    /// Blocks the target holds at an lba where the base holds another
    /// block (or none).
    pub data_blocks: u64,
    /// Of those, blocks whose content equals the base's block at the same
    /// lba (rewritten with the same bytes: a re-sent, not a changed, block).
    pub unchanged_blocks: u64,
    /// Blocks the base holds and the target does not.
    pub trim_blocks: u64,
}

/// Every operation the engine offers, as a message.
#[derive(Debug)]
pub enum Request {
    CreateVolume {
        name: String,
        size_bytes: u64,
    },
    /// A writable volume `name` that shares every block with snapshot
    /// `snapshot` of volume `origin` (copy-on-write, metadata only: O(1)
    /// in the volume's size). Its namespaces are the snapshot's images, at
    /// the origin's current sizes, all writable. While the clone exists the
    /// snapshot cannot be deleted, nor the origin volume, nor rolled back
    /// past it ([`crate::Error::HasClones`]); a clone ends with its own
    /// `DeleteVolume`, which frees only the blocks the clone holds alone.
    /// On a pool of several shards the clone lives on its origin's shard.
    CloneVolume {
        origin: String,
        snapshot: String,
        name: String,
    },
    CreateQtree {
        volume: String,
        name: String,
        size_bytes: u64,
    },
    ListVolumes,
    /// Make a namespace read-only to clients, or writable again: the
    /// volume (`ns.qtree: None`, every namespace in it) or one qtree.
    /// Persisted at once (a consistency point).
    SetReadOnly {
        ns: NsName,
        read_only: bool,
    },
    /// Read `len_blocks` from an image (live or snapshot).
    Read {
        image: Image,
        lba: u64,
        len_blocks: u32,
    },
    /// Write whole blocks; `fua`: durable when acknowledged; `replica`: the
    /// replicator writing a read-only mirror destination.
    Write {
        ns: NsName,
        lba: u64,
        data: AlignedBuf,
        fua: bool,
        replica: bool,
    },
    /// Unmap blocks; they read as zeroes afterwards.
    Trim {
        ns: NsName,
        lba: u64,
        len_blocks: u64,
        replica: bool,
    },
    /// Make every acknowledged write durable (a consistency point).
    Flush,
    /// Take a snapshot of every namespace of the volume at a new consistency
    /// point. `id`/`created_unix_ms`: given by a mirror, else fresh.
    CreateSnapshot {
        volume: String,
        name: String,
        id: Option<Uuid>,
        created_unix_ms: Option<u64>,
    },
    DeleteSnapshot {
        volume: String,
        name: String,
    },
    /// Change the size of a volume's own space (not its qtrees'). Growing
    /// always works; shrinking only when no block of the live image and
    /// none of any snapshot is mapped at or past the new end
    /// (`Error::MappedPastEnd` names which image maps one). Refused on a
    /// read-only volume unless `replica` (the replicator making a mirror's
    /// destination follow its source). Persisted at once (a consistency
    /// point); replies with the volume.
    ResizeVolume {
        name: String,
        size_bytes: u64,
        replica: bool,
    },
    /// Every live namespace of `volume` becomes its image in `snapshot`
    /// (metadata only: the live maps and plane become the snapshot's, no
    /// data is copied); a qtree the snapshot lacks becomes empty. Refused on
    /// a read-only volume or qtree. Snapshots newer than `snapshot` are
    /// refused (`Error::NewerSnapshots`) unless `destroy_newer`, which
    /// deletes them in the same consistency point (the caller checked their
    /// locks). The size stays what it is now. Replies with the volume.
    Rollback {
        volume: String,
        snapshot: String,
        destroy_newer: bool,
    },
    /// Delete a volume with every qtree and snapshot; its blocks are free
    /// after the consistency point that removes it.
    DeleteVolume {
        name: String,
    },
    ListSnapshots {
        volume: String,
    },
    /// The snapshots of `volume` without their block counts: names, ids
    /// and times only, O(its snapshots) and no tree walk (the replicator's
    /// name lookups for lock and mirror listings).
    ListSnapshotNames {
        volume: String,
    },
    /// The newest snapshot of `volume` (the last of its listing), or none:
    /// O(1), for a source that watches for new snapshots.
    NewestSnapshot {
        volume: String,
    },
    /// Names, ids and times of the snapshots of `volume` whose global ids
    /// are `ids` (those it has, in the order asked): O(ids), whatever the
    /// volume holds (the replicator's names for `lock list`).
    SnapshotNamesOf {
        volume: String,
        ids: Vec<Uuid>,
    },
    /// Changed extents of `ns` from `base` (None: from nothing) to `target`
    /// (a snapshot name).
    Diff {
        ns: NsName,
        base: Option<String>,
        target: String,
    },
    /// The same walk as `Diff`, counted, with the blocks whose content did
    /// not change (equal content hashes) told apart.
    DiffStats {
        ns: NsName,
        base: Option<String>,
        target: String,
    },
    Space,
    /// Store a small named blob in the pool; durable at the next CP.
    SetAttr {
        key: String,
        value: Option<Vec<u8>>,
    },
    GetAttr {
        key: String,
    },
    /// The expensive consistency check of every pool (`Pool::check_invariants`):
    /// planes, maps, free map and counts agree exactly. `Done`, or
    /// `Error::Invalid` naming the first violation.
    CheckInvariants,
}

#[derive(Debug)]
pub enum Reply {
    Done,
    Volume(VolumeInfo),
    Volumes(Vec<VolumeInfo>),
    Data(AlignedBuf),
    Snapshot(SnapshotInfo),
    Snapshots(Vec<SnapshotInfo>),
    SnapshotNames(Vec<SnapshotName>),
    Diff(Vec<DiffExtent>),
    DiffStats(DiffStats),
    Space(SpaceInfo),
    Attr(Option<Vec<u8>>),
}

/// What an engine thread needs from the pool it owns: `Pool` implements it
/// (pool.rs), the shard layer (shard.rs) runs any implementation, so the
/// thread loop depends on neither the pool nor its device type.
/// The answer of a started request ([`Executor::start`]): its sequence
/// number and its result.
pub type Answer = (u64, Result<Reply>);

pub trait Executor: Send + 'static {
    fn execute_batch(&mut self, reqs: Vec<Request>) -> Vec<Result<Reply>>;
    fn checkpoint(&mut self) -> Result<()>;
    /// Start a batch of plain (non-FUA) writes, or of reads, without
    /// waiting for their data. The requests have sequence numbers `first
    /// ..` (the caller counts the requests it starts); each is answered
    /// exactly once, by number, from this call or from [`Executor::reap`]:
    /// writes in start order, reads as they complete. The default runs them
    /// at once. While any is in flight ([`Executor::in_flight`]) the caller
    /// runs nothing else.
    fn start(&mut self, first: u64, reqs: Vec<Request>) -> Vec<Answer> {
        (first..).zip(self.execute_batch(reqs)).collect()
    }
    /// Answers of started requests that are done (`wait`: block until one
    /// is, when any is in flight).
    fn reap(&mut self, _wait: bool) -> Vec<Answer> {
        Vec::new()
    }
    fn in_flight(&self) -> usize {
        0
    }
}
