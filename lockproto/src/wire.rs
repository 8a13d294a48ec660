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
pub const VERSION_MAJOR: u16 = 1;
/// Protocol minor version: additive changes only.
pub const VERSION_MINOR: u16 = 0;
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
        })
    }
}

/// A lock set on the wire.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct WireLockSet {
    /// Sender node.
    pub sender: String,
    /// Generation.
    pub generation: u64,
    /// Lease (ms).
    pub lease_ms: u64,
    /// Locks.
    pub locks: Vec<WireLock>,
    /// Force-deleted snapshots the sender acknowledges.
    pub gone_acks: Vec<[u8; 16]>,
}

impl WireLockSet {
    /// From the model.
    pub fn from_model(s: &LockSet) -> Self {
        WireLockSet {
            sender: s.sender.clone(),
            generation: s.generation,
            lease_ms: s.lease_ms,
            locks: s.locks.iter().map(WireLock::from_model).collect(),
            gone_acks: s.gone_acks.iter().map(|u| *u.as_bytes()).collect(),
        }
    }
    /// To the model (not yet validated against bounds: call `LockSet::validate`).
    pub fn to_model(&self) -> Result<LockSet> {
        Ok(LockSet {
            sender: self.sender.clone(),
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

/// Persisted upstream relationship (lock table).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PersistUp {
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

/// Persisted downstream relationship (lock table).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PersistDown {
    /// Downstream node.
    pub name: String,
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

/// Persisted lock table of one node.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PersistNode {
    /// Node id.
    pub node_id: String,
    /// Restart epoch.
    pub epoch: u32,
    /// Generation counter within the epoch.
    pub counter: u32,
    /// Local snapshots, oldest first.
    pub local: Vec<[u8; 16]>,
    /// Upstreams.
    pub ups: Vec<PersistUp>,
    /// Downstreams.
    pub downs: Vec<PersistDown>,
    /// Application locks.
    pub app: Vec<WireLock>,
    /// Since when each of our own base locks (per upstream) and each
    /// shared-base lock (per downstream) has held its snapshot (format
    /// version 3).
    pub since: Vec<PersistSince>,
}

/// When a derived lock (own base with an upstream, or base shared with a
/// downstream) first held its snapshot.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PersistSince {
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
    pub ups: Vec<PersistUp>,
    /// Downstreams.
    pub downs: Vec<PersistDown>,
    /// Application locks.
    pub app: Vec<WireLock>,
}

impl From<PersistNodeV2> for PersistNode {
    fn from(v: PersistNodeV2) -> Self {
        PersistNode {
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
    pub downs: Vec<PersistDown>,
    /// Application locks.
    pub app: Vec<WireLock>,
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
                .map(|u| PersistUp {
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
        }
    }
}

/// Highest message type code known to this build.
pub const MAX_TYPE_CODE: u16 = 15;

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

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parse and bound-check a header from the first [`HEADER_LEN`] bytes of
/// `buf`. Checks magic, major version, type code, flags and both lengths
/// (before the caller allocates anything for body or payload).
pub fn parse_header(buf: &[u8]) -> Result<Header> {
    let h = buf.get(..HEADER_LEN).ok_or(LockError::Truncated {
        need: HEADER_LEN,
        have: buf.len(),
    })?;
    let magic = le32(h, 0);
    if magic != MAGIC {
        return Err(LockError::BadMagic {
            found: magic,
            expected: MAGIC,
        });
    }
    let hd = Header {
        major: le16(h, 4),
        minor: le16(h, 6),
        msg_type: le16(h, 8),
        flags: le16(h, 10),
        body_len: le32(h, 12),
        payload_len: le32(h, 16),
        crc: le32(h, 20),
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
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[..20]), &body);
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
    let body_end = HEADER_LEN + header.body_len as usize;
    let body = &buf[HEADER_LEN..body_end];
    let computed = crc32c::crc32c_append(crc32c::crc32c(&buf[..20]), body);
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
    Ok(Some(Decoded {
        header,
        msg,
        payload: &buf[body_end..need],
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
