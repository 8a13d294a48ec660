//! The engine's one error enum. Every variant carries what an operator needs
//! to act: which device, which block, which volume or snapshot.

use thiserror::Error;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Error)]
pub enum Error {
    #[error("I/O error on {device}: {op} at block {pba}: {source}")]
    Io {
        device: String,
        op: &'static str,
        pba: u64,
        #[source]
        source: std::io::Error,
    },
    // --- Devices and the shard thread (device/uring.rs, shard.rs) ---
    #[error("device {path} is busy: another process (a second sluice daemon?) holds it exclusively; stop it or pick another device")]
    DeviceBusy { path: std::path::PathBuf },
    #[error("cannot open device {path}: {op}: {source}")]
    DeviceOpen {
        path: std::path::PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("device {path}: size {size_bytes} bytes is not a positive multiple of 4096")]
    DeviceSize {
        path: std::path::PathBuf,
        size_bytes: u64,
    },
    #[error("the engine thread has shut down; restart the engine to serve requests")]
    ShutDown,
    // --- end devices block ---
    // --- Pool, format and volumes (pool.rs, format.rs) ---
    #[error("device has no sluice pool (no superblock magic in block 0 or 1); format it first")]
    NotAPool,
    #[error("superblock slot {slot} is corrupt: {reason}; no valid superblock remains")]
    CorruptSuperblock { slot: u64, reason: String },
    #[error("pool format version {found} is newer than this build supports ({supported}); upgrade sluice")]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("corrupt metadata: {kind} at block {pba}: {reason}")]
    CorruptMetadata {
        pba: u64,
        kind: &'static str,
        reason: String,
    },
    #[error("data checksum mismatch in volume {vol} at lba {lba} (block {pba}); restore this block from a replica or snapshot")]
    DataChecksum { vol: String, lba: u64, pba: u64 },
    #[error("pool refuses writes after an I/O failure: {reason}; reopen the pool to recover")]
    Poisoned { reason: String },
    /// `what` is "volume" or "qtree"; `name` is `VOL` or `VOL/QTREE`.
    #[error("{what} {name} is read-only (a mirror destination)")]
    ReadOnly { what: &'static str, name: String },
    #[error("{ns}: blocks {lba}..+{len} are beyond the size of {size} blocks")]
    OutOfRange {
        ns: String,
        lba: u64,
        len: u64,
        size: u64,
    },
    #[error("no volume named {0}")]
    NoSuchVolume(String),
    #[error("volume {volume} has no qtree named {qtree}")]
    NoSuchQtree { volume: String, qtree: String },
    #[error("volume {volume} has no snapshot named {snapshot}")]
    NoSuchSnapshot { volume: String, snapshot: String },
    #[error("{what} {name} already exists")]
    AlreadyExists { what: &'static str, name: String },
    #[error("bad name {name:?}: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("bad size for {what}: {size}: {reason}")]
    BadSize {
        what: String,
        size: u64,
        reason: &'static str,
    },
    /// `size` is the new size, printed for people (`64 MiB`); `image` is
    /// `the live image` or `snapshot NAME`.
    #[error("volume {volume} has blocks mapped past {size} (in {image}, first at lba {lba}): cannot shrink; trim them, or delete the snapshot, first")]
    MappedPastEnd {
        volume: String,
        size: String,
        image: String,
        lba: u64,
    },
    #[error("volume {volume} has snapshots newer than {snapshot}: {newer}; roll back with -r to delete them")]
    NewerSnapshots {
        volume: String,
        snapshot: String,
        newer: String,
    },
    /// `clones`: the volumes cloned from the snapshot, comma separated.
    #[error("snapshot {volume}@{snapshot} has clones: {clones}; delete them first (sluice vol delete CLONE)")]
    HasClones {
        volume: String,
        snapshot: String,
        clones: String,
    },
    #[error("pool is full: {needed} blocks needed, {free} free; delete snapshots or volumes")]
    NoSpace { needed: u64, free: u64 },
    #[error("volume {volume} already has {limit} snapshots; delete some first")]
    TooManySnapshots { volume: String, limit: usize },
    #[error("pool region already has {limit} volumes (set at format time: sluice init --volumes-max); delete one first")]
    TooManyVolumes { limit: u32 },
    #[error("pool region {index} of {count}: {source}")]
    Region {
        index: u32,
        count: u32,
        #[source]
        source: Box<Error>,
    },
    #[error("pool region {index} does not belong with the others: {reason}; was the device partly reformatted?")]
    RegionMismatch { index: u32, reason: String },
    #[error("device has {blocks} blocks; a pool needs at least {min}")]
    DeviceTooSmall { blocks: u64, min: u64 },
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A rule the engine keeps was about to break (a bug, not bad input):
    /// the request fails instead of corrupting the pool.
    #[error("internal invariant broken: {0}; the pool was left as it was, please report this")]
    Invariant(String),
}
