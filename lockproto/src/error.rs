//! The one error enum of `sluice-lockproto`.
//!
//! Every variant names the bound or field that was violated so an operator
//! (or the replicator's log line) can tell what to change.

use thiserror::Error;

/// Errors of the lock model, the persisted lock table and the wire codec.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LockError {
    /// A lock set holds more locks than `Bounds::max_locks_per_set`.
    #[error("lock set from {sender:?} has {count} locks, bound max_locks_per_set is {max}")]
    TooManyLocks {
        sender: String,
        count: usize,
        max: usize,
    },
    /// A downstream node's sets together would hold more locks than
    /// `Bounds::max_locks_per_peer`.
    #[error("node {sender:?} would hold {count} locks here over all its lock sets, bound max_locks_per_peer is {max}; release locks or delete mirrors on {sender}")]
    TooManyPeerLocks {
        sender: String,
        count: usize,
        max: usize,
    },
    /// A lock text or node name is longer than `Bounds::max_text_len` bytes.
    #[error("lock field {field} is {len} bytes, bound max_text_len is {max}")]
    TextTooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    /// A lock's hop path is longer than `Bounds::max_hops`.
    #[error("lock hop path has {len} hops, bound max_hops is {max}")]
    TooManyHops { len: usize, max: usize },
    /// A snapshot delete was refused because locks name it.
    #[error("snapshot {snapshot} is locked by: {holders}; use a forced delete to override")]
    Locked {
        snapshot: uuid::Uuid,
        holders: String,
    },
    /// Persisted lock-table bytes are not usable.
    #[error("persisted lock table is invalid: {0}")]
    BadPersisted(String),
    /// Persisted lock table written by an unknown format version.
    #[error("persisted lock table has format version {found}, this build reads {supported}")]
    PersistedVersion { found: u16, supported: u16 },
    /// A frame is shorter than its header or its declared lengths.
    #[error("frame truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    /// The frame does not start with the Sluice magic.
    #[error("bad frame magic {found:#010x}, expected {expected:#010x} (not a sluice peer?)")]
    BadMagic { found: u32, expected: u32 },
    /// Peer speaks a protocol major version this build does not.
    #[error("peer protocol version {major}.{minor}, this build speaks {our_major}.x")]
    UnsupportedVersion {
        major: u16,
        minor: u16,
        our_major: u16,
    },
    /// Unknown message type code.
    #[error("unknown message type {0}")]
    UnknownMessageType(u16),
    /// A declared length exceeds its bound (checked before any allocation).
    #[error("frame {what} length {len} exceeds bound {max}")]
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    /// Header/body checksum mismatch.
    #[error("frame checksum mismatch: header says {expected:#010x}, computed {computed:#010x}")]
    Checksum { expected: u32, computed: u32 },
    /// The body failed bytecheck validation or deserialization.
    #[error("frame body of type {msg_type} is invalid: {detail}")]
    BadBody { msg_type: u16, detail: String },
    /// A payload was attached to a message type that carries none, or missing.
    #[error("message type {msg_type} payload length {len} not allowed")]
    BadPayload { msg_type: u16, len: u32 },
    /// A field value inside a valid body is out of its domain.
    #[error("invalid field {field}: {detail}")]
    BadField { field: &'static str, detail: String },
    /// Encoding failed (rkyv serializer error).
    #[error("encoding a {what} failed: {detail}")]
    Encode { what: &'static str, detail: String },
    /// Authentication failed: the peer's HMAC response does not match.
    #[error("peer {peer:?} failed authentication (wrong shared secret?)")]
    AuthFailed { peer: String },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, LockError>;
