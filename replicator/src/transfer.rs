//! Sans-IO transfer state machines: what a source sends and what a
//! destination accepts, with no sockets and no engine calls.
//!
//! Owns: the item list of a transfer (the engine's diff extents of every
//! namespace cut into chunks of at most [`CHUNK_BLOCKS`]), positions and
//! checkpoints, the namespace tag carried in the high bits of a wire lba,
//! per-extent checksums (xxh3-64) and the content digest of a snapshot as
//! it travels on the wire.
//!
//! Invariants kept:
//! - A transfer's items are a pure function of (base, target, namespaces):
//!   the same request after a cut yields the same list, so a position (the
//!   count of items applied) means the same thing on both sides and across
//!   restarts. Resume = skip the first `position` items.
//! - The [`Receiver`] accepts items strictly in order, checks every extent's
//!   length, range and checksum before it may be written, accepts a
//!   checkpoint only at its own position and `done` only when every item
//!   arrived. Any violation is an error: nothing is ever written from a bad
//!   extent.

use sluice_engine::api::{DiffExtent, DiffKind};
use sluice_engine::device::BLOCK_SIZE;
use sluice_lockproto::wire::{ExtentHeader, CHECKSUM_XXH3};

use crate::error::{ReplError, Result};

/// Most blocks in one extent frame (1 MiB of payload).
pub const CHUNK_BLOCKS: u64 = 256;
/// Most blocks in one trim frame.
pub const TRIM_CHUNK_BLOCKS: u64 = 1 << 30;
/// The namespace index lives in wire-lba bits 48..64.
pub const NS_SHIFT: u32 = 48;
/// Largest namespace index.
pub const NS_MAX: usize = 1024;
/// When the source marks checkpoints: after this many items or this many
/// payload bytes since the last one, whichever comes first (and always at
/// the end). Each checkpoint costs the destination a consistency point, so
/// they are sparse by default; tests make them dense.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointPolicy {
    /// Items between checkpoints.
    pub every_items: u64,
    /// Payload bytes between checkpoints.
    pub every_bytes: u64,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        CheckpointPolicy {
            every_items: 8192,
            every_bytes: 64 << 20,
        }
    }
}
/// `SnapshotListRequest.qtree` value asking for the namespace list of a
/// volume instead of its snapshots (qtree names cannot contain `@`).
pub const NS_LIST_TAG: &str = "@namespaces";

/// What one item does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemKind {
    /// Blocks that hold data in the target: sent as an extent.
    Data,
    /// Blocks unmapped in the target: sent as a trim.
    Trim,
}

/// One unit of a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Item {
    /// Index into the transfer's namespace list.
    pub ns: u16,
    /// First block.
    pub lba: u64,
    /// Length in blocks (> 0).
    pub len_blocks: u32,
    /// Data or trim.
    pub kind: ItemKind,
}

/// Encode a namespace index and a block address into a wire lba.
pub fn wire_lba(ns: u16, lba: u64) -> u64 {
    (u64::from(ns) << NS_SHIFT) | (lba & ((1u64 << NS_SHIFT) - 1))
}

/// Split a wire lba into (namespace index, block address).
pub fn split_wire_lba(w: u64) -> (u16, u64) {
    ((w >> NS_SHIFT) as u16, w & ((1u64 << NS_SHIFT) - 1))
}

/// Cut the diffs of every namespace (index = position in `diffs`) into items.
pub fn plan(diffs: &[Vec<DiffExtent>]) -> Vec<Item> {
    let mut out = Vec::new();
    for (ns, extents) in diffs.iter().enumerate() {
        let ns = ns as u16;
        for e in extents {
            let (kind, chunk) = match e.kind {
                DiffKind::Data => (ItemKind::Data, CHUNK_BLOCKS),
                DiffKind::Trim => (ItemKind::Trim, TRIM_CHUNK_BLOCKS),
            };
            let mut lba = e.lba;
            let end = e.lba.saturating_add(e.len_blocks);
            while lba < end {
                let len = (end - lba).min(chunk);
                out.push(Item {
                    ns,
                    lba,
                    len_blocks: len as u32,
                    kind,
                });
                lba += len;
            }
        }
    }
    out
}

/// Payload bytes of the data items from `start` on.
pub fn data_bytes(items: &[Item], start: usize) -> u64 {
    items
        .iter()
        .skip(start)
        .filter(|i| i.kind == ItemKind::Data)
        .map(|i| u64::from(i.len_blocks) * BLOCK_SIZE as u64)
        .sum()
}

/// Checksum of an extent payload.
pub fn checksum(data: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(data)
}

/// One step the source takes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendStep {
    /// Send this item (read it from the target image first if it is data).
    Item(Item),
    /// Send a checkpoint at this position.
    Checkpoint(u64),
    /// Send `TransferDone`.
    Done,
    /// Nothing more.
    Finished,
}

/// The source's side: walks the item list from a start position, with
/// checkpoints by [`CheckpointPolicy`] and one at the end.
#[derive(Debug)]
pub struct Sender {
    items: Vec<Item>,
    pos: usize,
    since_ckpt: u64,
    since_ckpt_bytes: u64,
    policy: CheckpointPolicy,
    state: u8, // 0 items, 1 final checkpoint sent, 2 done sent
}

impl Sender {
    /// Start at `start` (a receiver's checkpoint); errors if beyond the list.
    pub fn new(
        items: Vec<Item>,
        start: u64,
        policy: CheckpointPolicy,
    ) -> std::result::Result<Self, String> {
        let pos = usize::try_from(start).map_err(|_| format!("resume position {start}"))?;
        if pos > items.len() {
            return Err(format!(
                "resume position {start} is beyond the {} items of this transfer",
                items.len()
            ));
        }
        Ok(Sender {
            items,
            pos,
            since_ckpt: 0,
            since_ckpt_bytes: 0,
            policy,
            state: 0,
        })
    }
    /// Items left to send.
    pub fn remaining(&self) -> u64 {
        (self.items.len() - self.pos) as u64
    }
    /// Payload bytes left to send.
    pub fn remaining_bytes(&self) -> u64 {
        data_bytes(&self.items, self.pos)
    }
    /// The next step.
    pub fn next_step(&mut self) -> SendStep {
        match self.state {
            0 if self.since_ckpt >= self.policy.every_items.max(1)
                || self.since_ckpt_bytes >= self.policy.every_bytes.max(1) =>
            {
                self.since_ckpt = 0;
                self.since_ckpt_bytes = 0;
                SendStep::Checkpoint(self.pos as u64)
            }
            0 => match self.items.get(self.pos) {
                Some(i) => {
                    self.pos += 1;
                    self.since_ckpt += 1;
                    if i.kind == ItemKind::Data {
                        self.since_ckpt_bytes += u64::from(i.len_blocks) * BLOCK_SIZE as u64;
                    }
                    SendStep::Item(*i)
                }
                None => {
                    self.state = 1;
                    SendStep::Checkpoint(self.pos as u64)
                }
            },
            1 => {
                self.state = 2;
                SendStep::Done
            }
            _ => SendStep::Finished,
        }
    }
}

/// What the destination must do with an accepted item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Apply {
    /// Namespace index.
    pub ns: u16,
    /// First block.
    pub lba: u64,
    /// Blocks.
    pub len_blocks: u64,
    /// Write (payload) or trim.
    pub kind: ItemKind,
}

/// The destination's side: validates every frame of one transfer in order.
#[derive(Debug)]
pub struct Receiver {
    ns_blocks: Vec<u64>,
    position: u64,
    total: u64,
    /// Payload bytes accepted.
    pub bytes: u64,
    dst: String,
    source_path: String,
}

impl Receiver {
    /// A receiver for a transfer of `extent_count` items starting at
    /// `start_position`, into namespaces of the given sizes (blocks).
    pub fn new(
        ns_blocks: Vec<u64>,
        start_position: u64,
        extent_count: u64,
        dst: &str,
        source_path: &str,
    ) -> Result<Self> {
        let total =
            start_position
                .checked_add(extent_count)
                .ok_or_else(|| ReplError::Protocol {
                    peer: source_path.to_string(),
                    detail: "extent count overflows".into(),
                })?;
        Ok(Receiver {
            ns_blocks,
            position: start_position,
            total,
            bytes: 0,
            dst: dst.to_string(),
            source_path: source_path.to_string(),
        })
    }

    fn bad(&self, detail: String) -> ReplError {
        ReplError::Protocol {
            peer: self.source_path.clone(),
            detail,
        }
    }

    /// Current position (items accepted).
    pub fn position(&self) -> u64 {
        self.position
    }
    /// Items of the whole transfer.
    pub fn total(&self) -> u64 {
        self.total
    }

    fn range(&self, wire: u64, len: u64) -> Result<(u16, u64)> {
        let (ns, lba) = split_wire_lba(wire);
        let size = *self
            .ns_blocks
            .get(usize::from(ns))
            .ok_or_else(|| self.bad(format!("namespace index {ns} unknown")))?;
        if len == 0 || lba.checked_add(len).is_none_or(|e| e > size) {
            return Err(self.bad(format!(
                "blocks {lba}..+{len} of namespace {ns} are beyond its {size} blocks"
            )));
        }
        if self.position >= self.total {
            return Err(self.bad(format!("more items than the {} announced", self.total)));
        }
        Ok((ns, lba))
    }

    /// Validate an extent and its payload; on success the caller writes it.
    pub fn on_extent(&mut self, h: &ExtentHeader, payload: &[u8]) -> Result<Apply> {
        let len = u64::from(h.len);
        if len > CHUNK_BLOCKS {
            return Err(self.bad(format!("extent of {len} blocks exceeds {CHUNK_BLOCKS}")));
        }
        let (ns, lba) = self.range(h.lba, len)?;
        if payload.len() as u64 != len * BLOCK_SIZE as u64 {
            return Err(self.bad(format!(
                "extent of {len} blocks carries {} payload bytes",
                payload.len()
            )));
        }
        if h.checksum_kind != CHECKSUM_XXH3 || checksum(payload) != h.checksum {
            return Err(ReplError::ExtentChecksum {
                dst: self.dst.clone(),
                source_path: self.source_path.clone(),
                position: self.position,
                lba,
            });
        }
        self.position += 1;
        self.bytes += payload.len() as u64;
        Ok(Apply {
            ns,
            lba,
            len_blocks: len,
            kind: ItemKind::Data,
        })
    }

    /// Validate a trim.
    pub fn on_trim(&mut self, wire: u64, len: u32) -> Result<Apply> {
        let (ns, lba) = self.range(wire, u64::from(len))?;
        self.position += 1;
        Ok(Apply {
            ns,
            lba,
            len_blocks: u64::from(len),
            kind: ItemKind::Trim,
        })
    }

    /// A checkpoint must name exactly our position.
    pub fn on_checkpoint(&self, position: u64) -> Result<()> {
        if position != self.position {
            return Err(self.bad(format!(
                "checkpoint at {position}, but {} items arrived",
                self.position
            )));
        }
        Ok(())
    }

    /// `TransferDone` is accepted only after every item.
    pub fn on_done(&self) -> Result<()> {
        if self.position != self.total {
            return Err(self.bad(format!(
                "transfer done after {} of {} items",
                self.position, self.total
            )));
        }
        Ok(())
    }
}

/// The content digest of a snapshot as carried on the wire: for a qtree,
/// its namespace digest; for a volume, the volume's own digest and a hash of
/// every qtree's (name, digest). `None` if the qtree is not in the list.
pub fn content_digest(digests: &[(Option<String>, u128)], qtree: Option<&str>) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    match qtree {
        Some(q) => {
            let d = digests.iter().find(|(n, _)| n.as_deref() == Some(q))?.1;
            out[..16].copy_from_slice(&d.to_le_bytes());
        }
        None => {
            let own = digests.iter().find(|(n, _)| n.is_none()).map_or(0, |x| x.1);
            out[..16].copy_from_slice(&own.to_le_bytes());
            let mut qs: Vec<(&str, u128)> = digests
                .iter()
                .filter(|(_, d)| *d != 0) // an empty qtree is the same as none
                .filter_map(|(n, d)| n.as_deref().map(|n| (n, *d)))
                .collect();
            qs.sort();
            let mut buf = Vec::new();
            for (n, d) in qs {
                buf.extend_from_slice(&(n.len() as u32).to_le_bytes());
                buf.extend_from_slice(n.as_bytes());
                buf.extend_from_slice(&d.to_le_bytes());
            }
            out[16..].copy_from_slice(&xxhash_rust::xxh3::xxh3_128(&buf).to_le_bytes());
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(lba: u64, len: u64, kind: DiffKind) -> DiffExtent {
        DiffExtent {
            lba,
            len_blocks: len,
            kind,
        }
    }

    #[test]
    fn plan_chunks_and_tags_namespaces() {
        let items = plan(&[
            vec![ext(0, 600, DiffKind::Data), ext(1000, 5, DiffKind::Trim)],
            vec![ext(7, 1, DiffKind::Data)],
        ]);
        assert_eq!(items.len(), 5);
        assert_eq!(items[0].len_blocks, 256);
        assert_eq!(items[2].len_blocks, 88);
        assert_eq!(items[3].kind, ItemKind::Trim);
        assert_eq!(items[4].ns, 1);
        assert_eq!(split_wire_lba(wire_lba(3, 12345)), (3, 12345));
        assert_eq!(data_bytes(&items, 0), 601 * 4096);
    }

    #[test]
    fn sender_checkpoints_and_resumes() {
        let items = plan(&[vec![ext(0, 256 * 70, DiffKind::Data)]]);
        let dense = CheckpointPolicy {
            every_items: 32,
            every_bytes: u64::MAX,
        };
        let mut s = Sender::new(items.clone(), 0, dense).unwrap();
        let mut ckpts = Vec::new();
        let mut n = 0;
        loop {
            match s.next_step() {
                SendStep::Item(_) => n += 1,
                SendStep::Checkpoint(p) => ckpts.push(p),
                SendStep::Done => {}
                SendStep::Finished => break,
            }
        }
        assert_eq!(n, 70);
        assert_eq!(ckpts, vec![32, 64, 70]);
        let s = Sender::new(items.clone(), 64, dense).unwrap();
        assert_eq!(s.remaining(), 6);
        assert!(Sender::new(items.clone(), 71, dense).is_err());
        // By bytes: 70 MiB of 1 MiB items with a 16 MiB byte bound.
        let by_bytes = CheckpointPolicy {
            every_items: 1000,
            every_bytes: 16 << 20,
        };
        let mut s = Sender::new(items, 0, by_bytes).unwrap();
        let mut ckpts = Vec::new();
        loop {
            match s.next_step() {
                SendStep::Checkpoint(p) => ckpts.push(p),
                SendStep::Finished => break,
                _ => {}
            }
        }
        assert_eq!(ckpts, vec![16, 32, 48, 64, 70]);
    }

    #[test]
    fn receiver_refuses_bad_frames() {
        let mut r = Receiver::new(vec![100], 0, 2, "b", "a:v").unwrap();
        let data = vec![7u8; 4096];
        let mut h = ExtentHeader {
            req_id: 1,
            lba: wire_lba(0, 99),
            len: 1,
            checksum_kind: CHECKSUM_XXH3,
            checksum: checksum(&data),
        };
        // corrupted payload
        let mut bad = data.clone();
        bad[10] ^= 1;
        assert!(matches!(
            r.on_extent(&h, &bad),
            Err(ReplError::ExtentChecksum { .. })
        ));
        // out of range, unknown namespace, wrong payload length
        h.lba = wire_lba(0, 100);
        assert!(r.on_extent(&h, &data).is_err());
        h.lba = wire_lba(1, 0);
        assert!(r.on_extent(&h, &data).is_err());
        h.lba = wire_lba(0, 0);
        assert!(r.on_extent(&h, &data[..100]).is_err());
        assert!(r.on_checkpoint(1).is_err());
        assert!(r.on_done().is_err());
        let a = r.on_extent(&h, &data).unwrap();
        assert_eq!((a.ns, a.lba, a.len_blocks), (0, 0, 1));
        r.on_checkpoint(1).unwrap();
        r.on_trim(wire_lba(0, 50), 50).unwrap();
        r.on_done().unwrap();
        assert!(r.on_trim(wire_lba(0, 0), 1).is_err(), "more than announced");
    }

    #[test]
    fn digests_of_volume_and_qtree() {
        let d = vec![(None, 5u128), (Some("q".to_string()), 9u128)];
        let v = content_digest(&d, None).unwrap();
        let q = content_digest(&d, Some("q")).unwrap();
        assert_ne!(v, q);
        assert_eq!(&q[..16], &9u128.to_le_bytes());
        assert!(content_digest(&d, Some("x")).is_none());
        let d2 = vec![(None, 5u128), (Some("q".to_string()), 10u128)];
        assert_ne!(content_digest(&d2, None).unwrap(), v);
    }
}
