//! The soft-lock model: records, their two views, lock sets and bounds.
//!
//! Owns: [`SoftLock`] (seed claims 3-9: snapshot id, type, user-visible
//! text; plus provenance and lease), its second form [`DependencyView`]
//! (claims 32-34, 41), [`LockSet`] (a relationship's WHOLE set with a
//! generation), [`Bounds`] and [`LeasePolicy`].
//!
//! Invariants: a set that passed [`LockSet::validate`] holds at most
//! `max_locks_per_set` locks, every text/name at most `max_text_len` bytes
//! and every hop path at most `max_hops` entries. Sets are never merged as
//! deltas: a receiver replaces the previous set of that relationship when the
//! generation is strictly newer.

use std::fmt;

use uuid::Uuid;

use crate::error::{LockError, Result};

/// What kind of dependency a lock records (seed claims 4, 14, 24).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LockKind {
    /// The dependent application names itself (owner name).
    OwnerName,
    /// A mirror destination path depends on the snapshot as its base.
    DestinationPath,
    /// A qtree mirror (named by its qtree) depends on the snapshot.
    QtreeName,
}

impl LockKind {
    /// Stable wire code.
    pub fn code(self) -> u8 {
        match self {
            LockKind::OwnerName => 1,
            LockKind::DestinationPath => 2,
            LockKind::QtreeName => 3,
        }
    }
    /// Inverse of [`LockKind::code`].
    pub fn from_code(c: u8) -> Result<Self> {
        match c {
            1 => Ok(LockKind::OwnerName),
            2 => Ok(LockKind::DestinationPath),
            3 => Ok(LockKind::QtreeName),
            other => Err(LockError::BadField {
                field: "lock.kind",
                detail: format!("unknown code {other}"),
            }),
        }
    }
}

impl fmt::Display for LockKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LockKind::OwnerName => "owner",
            LockKind::DestinationPath => "destination-path",
            LockKind::QtreeName => "qtree",
        })
    }
}

/// One soft lock: a named, persistent hold on one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SoftLock {
    /// Global snapshot id (same on every node).
    pub snapshot: Uuid,
    /// Type of the dependency.
    pub kind: LockKind,
    /// User-visible string naming the dependent application / path / qtree.
    pub text: String,
    /// Node where the dependency lives.
    pub origin_node: String,
    /// Nodes the lock travelled through, origin side first.
    pub hop_path: Vec<String>,
    /// When the lock was first created (ms, origin's clock).
    pub created_ms: u64,
    /// When the lock was last renewed (ms).
    pub renewed_ms: u64,
    /// Lease length (ms); 0 means the sender's set lease applies.
    pub lease_ms: u64,
    /// The resource on the origin node that needs the snapshot:
    /// `node/volume` or `node/volume/qtree` (a mirror's destination, or the
    /// volume an application lock was taken on). The second form's
    /// locking-dataset id (claims 32-34).
    pub dataset: String,
}

/// The second form of a lock (claims 32-34, 41): the resource protected and
/// the dataset downstream that needs it. Same lock, another view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DependencyView {
    /// The snapshot protected.
    pub resource_id: Uuid,
    /// `node/volume[/qtree]`: the downstream resource that needs it.
    pub locking_dataset_id: String,
}

impl SoftLock {
    /// The second-form view of this lock.
    pub fn dependency_view(&self) -> DependencyView {
        DependencyView {
            resource_id: self.snapshot,
            locking_dataset_id: self.dataset.clone(),
        }
    }
    /// Identity of a lock for dedup: (snapshot, kind, origin, dataset, text).
    pub fn key(&self) -> (Uuid, LockKind, &str, &str, &str) {
        (
            self.snapshot,
            self.kind,
            self.origin_node.as_str(),
            self.dataset.as_str(),
            self.text.as_str(),
        )
    }
    /// Check this lock against `b`.
    pub fn validate(&self, b: &Bounds) -> Result<()> {
        check_text("lock.text", &self.text, b)?;
        check_text("lock.origin_node", &self.origin_node, b)?;
        check_text("lock.dataset", &self.dataset, b)?;
        if self.hop_path.len() > b.max_hops {
            return Err(LockError::TooManyHops {
                len: self.hop_path.len(),
                max: b.max_hops,
            });
        }
        for h in &self.hop_path {
            check_text("lock.hop_path", h, b)?;
        }
        Ok(())
    }
}

fn check_text(field: &'static str, s: &str, b: &Bounds) -> Result<()> {
    if s.len() > b.max_text_len {
        return Err(LockError::TextTooLong {
            field,
            len: s.len(),
            max: b.max_text_len,
        });
    }
    Ok(())
}

impl fmt::Display for SoftLock {
    /// First form: `snapshot kind "text" (origin via a>b, lease)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {:?} origin={} dataset={} via={} lease_ms={}",
            self.snapshot,
            self.kind,
            self.text,
            self.origin_node,
            self.dataset,
            self.hop_path.join(">"),
            self.lease_ms
        )
    }
}

impl fmt::Display for DependencyView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "resource={} locking_dataset={}",
            self.resource_id, self.locking_dataset_id
        )
    }
}

/// Bounds on lock sets (everything has a limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Max locks in one set.
    pub max_locks_per_set: usize,
    /// Max bytes of a lock text or node name.
    pub max_text_len: usize,
    /// Max hops of a lock's path (cascade depth).
    pub max_hops: usize,
    /// Max locks one downstream node holds here, over all its sets: a
    /// set that would take it past this is refused whole.
    pub max_locks_per_peer: usize,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            max_locks_per_set: 65_536,
            max_text_len: 256,
            max_hops: 32,
            max_locks_per_peer: 262_144,
        }
    }
}

/// What happens to a set whose lease ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeasePolicy {
    /// Report stale, keep the locks until an operator releases them.
    Keep,
    /// Report stale, then drop the set `grace_ms` after the lease ran out.
    ReleaseAfter {
        /// Grace period after the lease ran out.
        grace_ms: u64,
    },
}

/// A relationship's whole lock set, as sent by a downstream to an upstream.
/// Each relationship has its own set: a downstream that pulls several
/// volumes (or qtrees) from one upstream sends one set per relationship.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockSet {
    /// Node that sent the set (the downstream).
    pub sender: String,
    /// The sender's relationship (its destination path, e.g. `vol0` or
    /// `qv/db`): with `sender`, names the downstream relationship.
    pub relationship: String,
    /// The receiver's volume whose snapshots the set locks (the
    /// relationship's source volume).
    pub volume: String,
    /// Strictly increasing per sender; older-or-equal sets are ignored.
    pub generation: u64,
    /// Lease of the whole set (ms): not renewed within it, it turns stale.
    pub lease_ms: u64,
    /// The locks, sorted and deduplicated.
    pub locks: Vec<SoftLock>,
    /// Snapshots the sender learnt were force-deleted upstream (acknowledged).
    pub gone_acks: Vec<Uuid>,
}

impl LockSet {
    /// Check the set against `b`; errors name the bound.
    pub fn validate(&self, b: &Bounds) -> Result<()> {
        check_text("set.sender", &self.sender, b)?;
        check_text("set.relationship", &self.relationship, b)?;
        check_text("set.volume", &self.volume, b)?;
        if self.locks.len() > b.max_locks_per_set {
            return Err(LockError::TooManyLocks {
                sender: self.sender.clone(),
                count: self.locks.len(),
                max: b.max_locks_per_set,
            });
        }
        if self.gone_acks.len() > b.max_locks_per_set {
            return Err(LockError::TooManyLocks {
                sender: self.sender.clone(),
                count: self.gone_acks.len(),
                max: b.max_locks_per_set,
            });
        }
        self.locks.iter().try_for_each(|l| l.validate(b))
    }
}
