//! The one error enum of `sluice-replicator`.
//!
//! Every variant says what an operator can do about it: which relationship,
//! which peer, which snapshot, and the command that fixes it where one does.

use thiserror::Error;

/// Result alias of this crate.
pub type Result<T, E = ReplError> = std::result::Result<T, E>;

/// Errors of relationships, transfers, locks and peer connections.
#[derive(Debug, Error)]
pub enum ReplError {
    /// The engine refused or failed an operation.
    #[error("engine: {context}: {source}")]
    Engine {
        context: String,
        #[source]
        source: sluice_engine::Error,
    },
    /// The engine answered with a reply of the wrong kind (a bug).
    #[error("engine gave an unexpected reply to {request}")]
    EngineReply { request: &'static str },
    /// A socket operation with a peer failed.
    #[error("peer {peer}: {op}: {source}")]
    Io {
        peer: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The peer sent bytes that are not a valid frame, or a frame out of order.
    #[error("peer {peer}: protocol error: {detail}")]
    Protocol { peer: String, detail: String },
    /// Authentication failed (either side refused).
    #[error("peer {peer} refused authentication: {detail}")]
    AuthRefused { peer: String, detail: String },
    /// This node has neither a peer secret nor the insecure mode: it talks
    /// to no peer.
    #[error("node {node} has no peer secret and insecure mode is off, so it neither accepts nor connects to peers: set peer_secret (a file of 16+ random bytes, the same on both nodes; e.g. `head -c 32 /dev/urandom | base64 > /etc/sluice/peer.secret`, then serve --peer-secret FILE), or on a trusted network only insecure_peers = true (serve --insecure-peers) on both")]
    PeersDisabled { node: String },
    /// The peer answered with an error frame.
    #[error("peer {peer} answered with error (code {code}): {text}")]
    Remote {
        peer: String,
        code: u16,
        text: String,
    },
    /// No snapshot in common: only a resync can re-baseline.
    #[error("no common snapshot between {dst} and {source_path}; run `mirror resync {dst}`, which sends {bytes} bytes (a full copy)")]
    NoCommonSnapshot {
        dst: String,
        source_path: String,
        bytes: u64,
    },
    /// The content digest of a received snapshot differs from the source's.
    #[error("transfer {source_path} -> {dst} of snapshot {snapshot}: content digest mismatch ({detail}); nothing was committed; run `mirror update` again, then `mirror resync` if it persists")]
    DigestMismatch {
        dst: String,
        source_path: String,
        snapshot: String,
        detail: String,
    },
    /// An extent failed its checksum.
    #[error("transfer {source_path} -> {dst}: extent at position {position} (lba {lba}) failed its checksum; nothing was committed; the next update resumes from the last checkpoint")]
    ExtentChecksum {
        dst: String,
        source_path: String,
        position: u64,
        lba: u64,
    },
    /// No relationship with that destination.
    #[error("no mirror relationship with destination {0:?}; see `mirror status`")]
    NoSuchRelationship(String),
    /// A relationship with that destination exists already.
    #[error(
        "a mirror relationship with destination {0:?} exists already; `mirror delete` it first"
    )]
    RelationshipExists(String),
    /// The relationship is broken (its destination writable).
    #[error("mirror {0} is broken (destination writable); run `mirror resync {0}` to make it a mirror again")]
    Broken(String),
    /// Another update of the same relationship is running.
    #[error("an update of mirror {0} is already running; wait for it")]
    Busy(String),
    /// A snapshot delete was refused by locks.
    #[error(
        "snapshot {volume}@{snapshot} is locked by: {holders}; release those locks or use --force"
    )]
    Locked {
        volume: String,
        snapshot: String,
        holders: String,
    },
    /// A volume delete was refused: downstreams or locks depend on it.
    #[error("volume {volume} is in use: {detail}; `mirror delete` those relationships downstream or release the locks, or use --force (every downstream then needs a full copy)")]
    VolumeInUse { volume: String, detail: String },
    /// A resize or rollback of a mirror's destination volume: it follows
    /// its source.
    #[error("volume {volume} is the destination of mirror {dst} (from {source_path}): {what} it on its source (the mirror follows at its next update), or `mirror break {dst}`/`mirror delete {dst}` first")]
    MirrorDestination {
        volume: String,
        dst: String,
        source_path: String,
        what: &'static str,
    },
    /// A rollback with `-r` would delete newer snapshots that soft locks
    /// hold.
    #[error("cannot roll back {volume} to {snapshot}: newer snapshots are locked: {detail}; release those locks (or `snap delete --force` them) first")]
    RollbackLocked {
        volume: String,
        snapshot: String,
        detail: String,
    },
    /// A snapshot is in use: by a running transfer, or by NBD clients
    /// reading its export (`by` says which).
    #[error("snapshot {volume}@{snapshot} is in use by {by}; retry when that ends")]
    InUse {
        volume: String,
        snapshot: String,
        by: String,
    },
    /// No such snapshot / volume / lock.
    #[error("not found: {0}")]
    NotFound(String),
    /// A request argument is invalid.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Persisted replicator state cannot be read.
    #[error("persisted replicator state {key:?} is unreadable: {detail}; fix or clear that pool attribute")]
    Persisted { key: String, detail: String },
    /// A lockproto error (lock table, sets).
    #[error("lock table: {0}")]
    Lock(#[from] sluice_lockproto::LockError),
    /// The replicator is shutting down.
    #[error("the replicator is shutting down; the transfer stopped at a checkpoint and resumes on the next update")]
    ShuttingDown,
}

impl ReplError {
    /// Wrap an engine error with what was being done.
    pub fn engine(context: impl Into<String>, source: sluice_engine::Error) -> Self {
        ReplError::Engine {
            context: context.into(),
            source,
        }
    }
}
