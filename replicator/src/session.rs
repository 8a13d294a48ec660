//! The sans-IO sessions of one transfer: [`PullSession`], the destination's
//! side from its request to its commit, and [`ServeSession`], the source's
//! side from a request to its last frame.
//!
//! Both take inputs (a peer's message, an engine's answer) and return the
//! actions to perform, in order; the shells in `replicator::pull` and
//! `replicator::serve` own the socket, the engine and the lock table and do
//! nothing but perform them. Item validation is [`Receiver`]'s, the item walk
//! with checkpoints [`Sender`]'s.
//!
//! Invariants [`PullSession`] keeps (each action list is in this order):
//! - The checkpoint and the resume lock of the target are stored and
//!   flushed before the request is sent: a transfer that fails from then on
//!   leaves a checkpoint to resume from, and its target locked upstream.
//! - Nothing is written before a `TransferStart` that matches the request
//!   and the destination's namespaces exist.
//! - A `CheckpointAck` goes out only after the writes before it drained,
//!   and the checkpoint naming them was stored and flushed.
//! - The target snapshot is taken only after every item arrived, passed
//!   its checks and was flushed. A snapshot whose digest differs from the
//!   source's is dropped again, with the checkpoint and the resume lock:
//!   nothing is committed.
//! - On commit the base lock on the target is taken and the resume lock
//!   released in one change, before the checkpoint is dropped, and both
//!   are flushed before the new lock set goes upstream.
//! - After the session finished or failed, every input is refused.
//!
//! Invariants [`ServeSession`] keeps:
//! - A request is refused (with its wire code) unless its target, and its
//!   base when it names one, are snapshots here.
//! - At most `read_ahead` reads are in flight; frames go out in item order;
//!   a data item is sent only after its read completed.

use std::collections::BTreeSet;

use sluice_engine::api::SnapshotInfo;
use sluice_lockproto::wire::{
    codes, ExtentHeader, SnapInfo, TransferRequest, TransferStart, CHECKSUM_XXH3,
};
use sluice_lockproto::Message;
use uuid::Uuid;

use crate::error::{ReplError, Result};
use crate::transfer::{checksum, wire_lba, Item, ItemKind, Receiver, SendStep, Sender};
use crate::types::{Checkpoint, MirrorKind};

/// What a pull is asked to do (gathered and planned by its shell).
#[derive(Debug, Clone)]
pub struct PullSpec {
    /// The relationship (destination path).
    pub dst: String,
    /// `node:volume[/qtree]` of the source, for errors.
    pub source_path: String,
    /// The upstream node's name, for errors.
    pub upstream: String,
    /// Volume or qtree mirror.
    pub kind: MirrorKind,
    /// The destination qtree of a qtree mirror.
    pub dst_qtree: Option<String>,
    /// The request to send (its `req_id` identifies every reply).
    pub request: TransferRequest,
    /// The target as the source listed it.
    pub target: SnapInfo,
    /// A volume mirror's namespaces and sizes as the source listed them.
    pub ns_sizes: Vec<(Option<String>, u64)>,
}

/// One input of a pull.
#[derive(Debug)]
pub enum PullInput<'a> {
    /// A frame of the transfer from the source, with its payload.
    Received {
        /// The frame.
        msg: &'a Message,
        /// Its payload (extents).
        payload: &'a [u8],
    },
    /// The destination's namespaces exist ([`PullAction::Prepare`]): their
    /// sizes in blocks, in the transfer's namespace order.
    Prepared {
        /// Blocks per namespace.
        ns_blocks: Vec<u64>,
    },
    /// The target snapshot was taken here ([`PullAction::Snapshot`]): its
    /// content digest as this node computes it.
    Snapshotted {
        /// The local digest (`None`: the namespace is not in it).
        digest: Option<[u8; 32]>,
    },
}

/// One action of a pull, for its shell to perform in order.
#[derive(Debug)]
pub enum PullAction {
    /// Store the relationship's checkpoint (or drop it).
    StoreCheckpoint(Option<Checkpoint>),
    /// Take (`true`) or release the resume lock on the target, and send
    /// the sets that change.
    ResumeLock(bool),
    /// Flush the pool: what was stored before is durable.
    Flush,
    /// Send a frame to the source.
    Send(Message),
    /// Create (or grow) the destination's namespaces with these sizes, then
    /// answer [`PullInput::Prepared`].
    Prepare {
        /// Namespaces and sizes in bytes, in transfer order.
        ns_sizes: Vec<(Option<String>, u64)>,
    },
    /// Write the payload of the input being handled.
    Write {
        /// Namespace index.
        ns: u16,
        /// First block.
        lba: u64,
    },
    /// Unmap blocks.
    Trim {
        /// Namespace index.
        ns: u16,
        /// First block.
        lba: u64,
        /// Blocks.
        len_blocks: u64,
    },
    /// Wait until every write submitted so far completed.
    Drain,
    /// Tell the operator how far the transfer is.
    Progress,
    /// Take the target snapshot (the source's id, name and time), then
    /// answer [`PullInput::Snapshotted`].
    Snapshot,
    /// Delete the target snapshot just taken (its digest was wrong).
    DropSnapshot,
    /// The transfer committed: the lock table takes the base lock on the
    /// target and drops the resume lock, in one change whose sets the
    /// shell keeps for [`PullAction::SendSets`].
    Commit,
    /// Decide whether an incremental was in truth a full copy.
    Classify,
    /// Send the sets [`PullAction::Commit`] made.
    SendSets,
    /// The pull ended with this error (after the actions before it).
    Fail(ReplError),
    /// The pull is complete.
    Finished,
}

#[derive(Debug)]
enum PullPhase {
    New,
    /// The request is out; waiting for `TransferStart`.
    Requested,
    /// Waiting for the destination's namespaces.
    Preparing,
    Receiving(Receiver),
    /// Every item arrived; waiting for the local snapshot's digest.
    Snapshotting([u8; 32]),
    Ended,
}

/// The destination's side of one transfer.
#[derive(Debug)]
pub struct PullSession {
    spec: PullSpec,
    phase: PullPhase,
    start: Option<TransferStart>,
    /// Data bytes received.
    pub bytes: u64,
    /// Extent frames received.
    pub extents: u64,
    /// Trim frames received.
    pub trims: u64,
}

impl PullSession {
    /// A pull of `spec`; [`Self::begin`] starts it.
    pub fn new(spec: PullSpec) -> Self {
        PullSession {
            spec,
            phase: PullPhase::New,
            start: None,
            bytes: 0,
            extents: 0,
            trims: 0,
        }
    }

    /// The transfer's request.
    pub fn spec(&self) -> &PullSpec {
        &self.spec
    }

    /// The source's `TransferStart`, once it arrived.
    pub fn start(&self) -> Option<&TransferStart> {
        self.start.as_ref()
    }

    /// Items done (including those a resume skipped) and the whole count.
    pub fn items(&self) -> (u64, u64) {
        match &self.phase {
            PullPhase::Receiving(rx) => (rx.position(), rx.total()),
            _ => match &self.start {
                Some(s) => {
                    let total = s.start_position.saturating_add(s.extent_count);
                    let done = if matches!(self.phase, PullPhase::Preparing) {
                        s.start_position
                    } else {
                        total
                    };
                    (done, total)
                }
                None => (self.spec.request.resume_from, 0),
            },
        }
    }

    /// Whether the session ended (finished or failed).
    pub fn ended(&self) -> bool {
        matches!(self.phase, PullPhase::Ended)
    }

    fn checkpoint(&self, position: u64) -> Checkpoint {
        Checkpoint {
            base: self.spec.request.base.map(Uuid::from_bytes),
            target: Uuid::from_bytes(self.spec.target.id),
            position,
        }
    }

    /// Start: checkpoint and resume lock durable, then the request.
    #[must_use]
    pub fn begin(&mut self) -> Vec<PullAction> {
        if !matches!(self.phase, PullPhase::New) {
            return Vec::new();
        }
        self.phase = PullPhase::Requested;
        vec![
            PullAction::StoreCheckpoint(Some(self.checkpoint(self.spec.request.resume_from))),
            PullAction::ResumeLock(true),
            PullAction::Flush,
            PullAction::Send(Message::TransferRequest(self.spec.request.clone())),
        ]
    }

    fn protocol(&self, detail: String) -> ReplError {
        ReplError::Protocol {
            peer: self.spec.upstream.clone(),
            detail,
        }
    }

    /// Apply one input; an error ends the session (nothing more is done).
    #[must_use = "the actions must be performed"]
    pub fn handle(&mut self, input: PullInput<'_>) -> Result<Vec<PullAction>> {
        let r = self.apply(input);
        if r.is_err() {
            self.phase = PullPhase::Ended;
        }
        r
    }

    fn apply(&mut self, input: PullInput<'_>) -> Result<Vec<PullAction>> {
        let phase = std::mem::replace(&mut self.phase, PullPhase::Ended);
        match (phase, input) {
            (PullPhase::Requested, PullInput::Received { msg, .. }) => self.on_start(msg),
            (PullPhase::Preparing, PullInput::Prepared { ns_blocks }) => {
                let start = self
                    .start
                    .as_ref()
                    .ok_or_else(|| self.protocol("no TransferStart".into()))?;
                let rx = Receiver::new(
                    ns_blocks,
                    start.start_position,
                    start.extent_count,
                    &self.spec.dst,
                    &self.spec.source_path,
                )?;
                self.phase = PullPhase::Receiving(rx);
                Ok(vec![PullAction::Progress])
            }
            (PullPhase::Receiving(rx), PullInput::Received { msg, payload }) => {
                self.on_item(rx, msg, payload)
            }
            (PullPhase::Snapshotting(expected), PullInput::Snapshotted { digest }) => {
                Ok(self.on_snapshot(expected, digest))
            }
            (PullPhase::Ended, _) => Err(self.protocol("input after the transfer ended".into())),
            (phase, PullInput::Received { msg, .. }) => Err(self.protocol(format!(
                "unexpected message type {} while {}",
                msg.type_code(),
                phase_name(&phase)
            ))),
            (phase, input) => Err(ReplError::Invalid(format!(
                "pull of {}: {input:?} while {}",
                self.spec.dst,
                phase_name(&phase)
            ))),
        }
    }

    fn on_start(&mut self, msg: &Message) -> Result<Vec<PullAction>> {
        let req = &self.spec.request;
        let start = match msg {
            Message::TransferStart(s) if s.req_id == req.req_id => s,
            other => {
                return Err(self.protocol(format!(
                    "expected TransferStart, got message type {}",
                    other.type_code()
                )))
            }
        };
        if start.target.id != self.spec.target.id
            || start.start_position != req.resume_from
            || start.base != req.base
        {
            return Err(self.protocol("TransferStart does not match the request".into()));
        }
        let ns_sizes = match self.spec.kind {
            MirrorKind::Volume => self.spec.ns_sizes.clone(),
            MirrorKind::Qtree => vec![(self.spec.dst_qtree.clone(), start.volume_bytes)],
        };
        self.start = Some(start.clone());
        self.phase = PullPhase::Preparing;
        Ok(vec![PullAction::Prepare { ns_sizes }])
    }

    fn on_item(
        &mut self,
        mut rx: Receiver,
        msg: &Message,
        payload: &[u8],
    ) -> Result<Vec<PullAction>> {
        let req_id = self.spec.request.req_id;
        let acts = match msg {
            Message::Extent(h) if h.req_id == req_id => {
                let a = rx.on_extent(h, payload)?;
                self.bytes += payload.len() as u64;
                self.extents += 1;
                vec![
                    PullAction::Write {
                        ns: a.ns,
                        lba: a.lba,
                    },
                    PullAction::Progress,
                ]
            }
            Message::Trim {
                req_id: r,
                lba,
                len,
            } if *r == req_id => {
                let a = rx.on_trim(*lba, *len)?;
                self.trims += 1;
                vec![
                    PullAction::Trim {
                        ns: a.ns,
                        lba: a.lba,
                        len_blocks: a.len_blocks,
                    },
                    PullAction::Progress,
                ]
            }
            Message::Checkpoint {
                req_id: r,
                position,
            } if *r == req_id => {
                rx.on_checkpoint(*position)?;
                // Data first, then the checkpoint naming it: one flush
                // makes both durable together, before the source hears.
                vec![
                    PullAction::Drain,
                    PullAction::StoreCheckpoint(Some(self.checkpoint(*position))),
                    PullAction::Flush,
                    PullAction::Send(Message::CheckpointAck {
                        req_id,
                        position: *position,
                    }),
                ]
            }
            Message::TransferDone {
                req_id: r,
                content_digest,
            } if *r == req_id => {
                rx.on_done()?;
                self.phase = PullPhase::Snapshotting(*content_digest);
                return Ok(vec![
                    PullAction::Drain,
                    PullAction::Flush,
                    PullAction::Snapshot,
                ]);
            }
            other => {
                return Err(self.protocol(format!(
                    "unexpected message type {} in a transfer",
                    other.type_code()
                )))
            }
        };
        self.phase = PullPhase::Receiving(rx);
        Ok(acts)
    }

    fn on_snapshot(&mut self, received: [u8; 32], ours: Option<[u8; 32]>) -> Vec<PullAction> {
        self.phase = PullPhase::Ended;
        if ours != Some(received) || received != self.spec.target.content_digest {
            let err = ReplError::DigestMismatch {
                dst: self.spec.dst.clone(),
                source_path: self.spec.source_path.clone(),
                snapshot: self.spec.target.name.clone(),
                detail: format!(
                    "source {} says {}, received data gives {}",
                    self.spec.upstream,
                    hex(&received),
                    ours.map(|d| hex(&d)).unwrap_or_else(|| "none".into())
                ),
            };
            return vec![
                PullAction::DropSnapshot,
                PullAction::StoreCheckpoint(None),
                PullAction::Flush,
                PullAction::ResumeLock(false),
                PullAction::Fail(err),
            ];
        }
        let mut v = vec![
            PullAction::Commit,
            PullAction::StoreCheckpoint(None),
            PullAction::Flush,
        ];
        if self.spec.request.base.is_some() && self.spec.request.resume_from == 0 {
            v.push(PullAction::Classify);
        }
        v.extend([PullAction::SendSets, PullAction::Finished]);
        v
    }
}

fn phase_name(p: &PullPhase) -> &'static str {
    match p {
        PullPhase::New => "not started",
        PullPhase::Requested => "waiting for TransferStart",
        PullPhase::Preparing => "preparing the destination",
        PullPhase::Receiving(_) => "receiving items",
        PullPhase::Snapshotting(_) => "taking the target snapshot",
        PullPhase::Ended => "ended",
    }
}

/// Lowercase hex of a digest.
pub fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why a source refuses a transfer request: the wire code and the error.
#[derive(Debug)]
pub struct Refused {
    /// `codes::*`.
    pub code: u16,
    /// What was wrong.
    pub error: ReplError,
}

/// The target and base a request names, if this node has them.
pub fn admit_request<'a>(
    node: &str,
    req: &TransferRequest,
    snaps: &'a [SnapshotInfo],
) -> std::result::Result<(&'a SnapshotInfo, Option<&'a SnapshotInfo>), Refused> {
    let target_id = Uuid::from_bytes(req.target);
    let Some(target) = snaps.iter().find(|s| s.id == target_id) else {
        return Err(Refused {
            code: codes::NOT_FOUND,
            error: ReplError::NotFound(format!(
                "snapshot {target_id} on {node}:{} (deleted meanwhile?)",
                req.volume
            )),
        });
    };
    let base = match req.base.map(Uuid::from_bytes) {
        None => None,
        Some(b) => match snaps.iter().find(|s| s.id == b) {
            Some(s) => Some(s),
            None => {
                return Err(Refused {
                    code: codes::NO_COMMON_BASE,
                    error: ReplError::NotFound(format!(
                        "base snapshot {b} no longer exists on {node}:{}",
                        req.volume
                    )),
                })
            }
        },
    };
    Ok((target, base))
}

/// One action of a serving session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServeAction {
    /// Submit a read of this data item under `tag`; answer
    /// [`ServeSession::read_done`] when it completes.
    Read {
        /// The completion's tag.
        tag: u64,
        /// The item.
        item: Item,
    },
    /// Wait for a read to complete (the next frame needs it).
    AwaitRead,
    /// Send the extent of this item, whose payload is the completed read
    /// of `tag` (its header: [`ServeSession::extent_header`]).
    SendExtent {
        /// The read whose data is the payload.
        tag: u64,
        /// The item.
        item: Item,
    },
    /// Send this frame (trims, checkpoints, the end).
    Send(Message),
    /// Every frame went out.
    Finished,
}

/// The source's side of one transfer: the frames in order, with reads
/// running ahead of the socket.
#[derive(Debug)]
pub struct ServeSession {
    req_id: u64,
    digest: [u8; 32],
    steps: Vec<SendStep>,
    read_ahead: usize,
    /// Steps whose read was submitted (or which need none).
    submitted: usize,
    /// Steps sent.
    sent: usize,
    /// Tags of reads completed and not yet sent.
    ready: BTreeSet<u64>,
    /// Data bytes sent.
    pub bytes: u64,
}

impl ServeSession {
    /// Serve the items of `sender` for request `req_id`, ending with a
    /// `TransferDone` carrying `digest`.
    pub fn new(mut sender: Sender, req_id: u64, digest: [u8; 32], read_ahead: usize) -> Self {
        let mut steps = Vec::new();
        loop {
            match sender.next_step() {
                SendStep::Finished => break,
                st => steps.push(st),
            }
        }
        ServeSession {
            req_id,
            digest,
            steps,
            read_ahead: read_ahead.max(1),
            submitted: 0,
            sent: 0,
            ready: BTreeSet::new(),
            bytes: 0,
        }
    }

    /// The `TransferStart` answering the request.
    pub fn start_frame(
        req: &TransferRequest,
        sender: &Sender,
        target: SnapInfo,
        volume_bytes: u64,
    ) -> Message {
        Message::TransferStart(TransferStart {
            req_id: req.req_id,
            target,
            base: req.base,
            extent_count: sender.remaining(),
            byte_count: sender.remaining_bytes(),
            volume_bytes,
            start_position: req.resume_from,
        })
    }

    /// A read of `tag` completed.
    pub fn read_done(&mut self, tag: u64) {
        if (tag as usize) < self.submitted && tag as usize >= self.sent {
            self.ready.insert(tag);
        }
    }

    /// The header of an extent whose payload is `payload`.
    pub fn extent_header(&self, item: &Item, payload: &[u8]) -> ExtentHeader {
        ExtentHeader {
            req_id: self.req_id,
            lba: wire_lba(item.ns, item.lba),
            len: item.len_blocks,
            checksum_kind: CHECKSUM_XXH3,
            checksum: checksum(payload),
        }
    }

    /// The next action.
    #[must_use]
    pub fn next_action(&mut self) -> ServeAction {
        while self.submitted < self.steps.len() && self.submitted < self.sent + self.read_ahead {
            let tag = self.submitted as u64;
            self.submitted += 1;
            if let Some(SendStep::Item(it)) = self.steps.get(tag as usize) {
                if it.kind == ItemKind::Data {
                    return ServeAction::Read { tag, item: *it };
                }
            }
        }
        let tag = self.sent as u64;
        let Some(step) = self.steps.get(self.sent).copied() else {
            return ServeAction::Finished;
        };
        let req_id = self.req_id;
        self.sent += 1;
        match step {
            SendStep::Item(item) if item.kind == ItemKind::Data => {
                if !self.ready.remove(&tag) {
                    self.sent -= 1;
                    return ServeAction::AwaitRead;
                }
                self.bytes += u64::from(item.len_blocks) * sluice_engine::device::BLOCK_SIZE as u64;
                ServeAction::SendExtent { tag, item }
            }
            SendStep::Item(it) => ServeAction::Send(Message::Trim {
                req_id,
                lba: wire_lba(it.ns, it.lba),
                len: it.len_blocks,
            }),
            SendStep::Checkpoint(position) => {
                ServeAction::Send(Message::Checkpoint { req_id, position })
            }
            SendStep::Done | SendStep::Finished => ServeAction::Send(Message::TransferDone {
                req_id,
                content_digest: self.digest,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transfer::{plan, CheckpointPolicy};
    use sluice_engine::api::{DiffExtent, DiffKind};
    use sluice_engine::device::BLOCK_SIZE;

    fn spec(base: bool, resume_from: u64) -> PullSpec {
        PullSpec {
            dst: "b".into(),
            source_path: "A:a".into(),
            upstream: "A".into(),
            kind: MirrorKind::Volume,
            dst_qtree: None,
            request: TransferRequest {
                req_id: 7,
                relationship: "b".into(),
                volume: "a".into(),
                qtree: None,
                base: base.then_some([1; 16]),
                target: [2; 16],
                resume_from,
            },
            target: SnapInfo {
                id: [2; 16],
                name: "s2".into(),
                created_ms: 5,
                content_digest: [9; 32],
            },
            ns_sizes: vec![(None, 16 * BLOCK_SIZE as u64)],
        }
    }

    fn start(s: &PullSpec, items: u64) -> Message {
        Message::TransferStart(TransferStart {
            req_id: 7,
            target: s.target.clone(),
            base: s.request.base,
            extent_count: items,
            byte_count: items * BLOCK_SIZE as u64,
            volume_bytes: 16 * BLOCK_SIZE as u64,
            start_position: s.request.resume_from,
        })
    }

    fn extent(lba: u64, payload: &[u8]) -> Message {
        Message::Extent(ExtentHeader {
            req_id: 7,
            lba,
            len: 1,
            checksum_kind: CHECKSUM_XXH3,
            checksum: checksum(payload),
        })
    }

    fn names(acts: &[PullAction]) -> Vec<&'static str> {
        acts.iter()
            .map(|a| match a {
                PullAction::StoreCheckpoint(Some(_)) => "ckpt",
                PullAction::StoreCheckpoint(None) => "drop-ckpt",
                PullAction::ResumeLock(true) => "resume-lock",
                PullAction::ResumeLock(false) => "resume-unlock",
                PullAction::Flush => "flush",
                PullAction::Send(_) => "send",
                PullAction::Prepare { .. } => "prepare",
                PullAction::Write { .. } => "write",
                PullAction::Trim { .. } => "trim",
                PullAction::Drain => "drain",
                PullAction::Progress => "progress",
                PullAction::Snapshot => "snapshot",
                PullAction::DropSnapshot => "drop-snapshot",
                PullAction::Commit => "commit",
                PullAction::Classify => "classify",
                PullAction::SendSets => "send-sets",
                PullAction::Fail(_) => "fail",
                PullAction::Finished => "finished",
            })
            .collect()
    }

    /// Drives a session to its receiving phase.
    fn receiving(s: PullSpec, items: u64) -> PullSession {
        let st = start(&s, items);
        let mut p = PullSession::new(s);
        assert_eq!(
            names(&p.begin()),
            ["ckpt", "resume-lock", "flush", "send"],
            "checkpoint and resume lock are durable before the request"
        );
        let a = p
            .handle(PullInput::Received {
                msg: &st,
                payload: &[],
            })
            .unwrap();
        assert_eq!(names(&a), ["prepare"]);
        let a = p
            .handle(PullInput::Prepared {
                ns_blocks: vec![16],
            })
            .unwrap();
        assert_eq!(names(&a), ["progress"]);
        p
    }

    #[test]
    fn a_pull_commits_in_order() {
        let mut p = receiving(spec(true, 0), 2);
        let data = vec![3u8; BLOCK_SIZE];
        let a = p
            .handle(PullInput::Received {
                msg: &extent(4, &data),
                payload: &data,
            })
            .unwrap();
        assert_eq!(names(&a), ["write", "progress"]);
        let a = p
            .handle(PullInput::Received {
                msg: &Message::Checkpoint {
                    req_id: 7,
                    position: 1,
                },
                payload: &[],
            })
            .unwrap();
        assert_eq!(
            names(&a),
            ["drain", "ckpt", "flush", "send"],
            "an ack only after its data and checkpoint are durable"
        );
        assert!(matches!(&a[1], PullAction::StoreCheckpoint(Some(c)) if c.position == 1));
        let a = p
            .handle(PullInput::Received {
                msg: &Message::Trim {
                    req_id: 7,
                    lba: 8,
                    len: 2,
                },
                payload: &[],
            })
            .unwrap();
        assert_eq!(names(&a), ["trim", "progress"]);
        let a = p
            .handle(PullInput::Received {
                msg: &Message::TransferDone {
                    req_id: 7,
                    content_digest: [9; 32],
                },
                payload: &[],
            })
            .unwrap();
        assert_eq!(names(&a), ["drain", "flush", "snapshot"]);
        let a = p
            .handle(PullInput::Snapshotted {
                digest: Some([9; 32]),
            })
            .unwrap();
        assert_eq!(
            names(&a),
            [
                "commit",
                "drop-ckpt",
                "flush",
                "classify",
                "send-sets",
                "finished"
            ]
        );
        assert!(p.ended());
        assert_eq!((p.bytes, p.extents, p.trims), (BLOCK_SIZE as u64, 1, 1));
        assert!(p.handle(PullInput::Snapshotted { digest: None }).is_err());
    }

    #[test]
    fn a_wrong_digest_commits_nothing() {
        for (ours, theirs) in [
            (Some([8; 32]), [9; 32]),
            (None, [9; 32]),
            (Some([8; 32]), [8; 32]),
        ] {
            let mut p = receiving(spec(false, 0), 0);
            let a = p
                .handle(PullInput::Received {
                    msg: &Message::TransferDone {
                        req_id: 7,
                        content_digest: theirs,
                    },
                    payload: &[],
                })
                .unwrap();
            assert_eq!(names(&a), ["drain", "flush", "snapshot"]);
            let a = p.handle(PullInput::Snapshotted { digest: ours }).unwrap();
            assert_eq!(
                names(&a),
                [
                    "drop-snapshot",
                    "drop-ckpt",
                    "flush",
                    "resume-unlock",
                    "fail"
                ],
                "ours {ours:?}, theirs {theirs:?}"
            );
            assert!(matches!(
                a.last(),
                Some(PullAction::Fail(ReplError::DigestMismatch { .. }))
            ));
        }
    }

    #[test]
    fn a_resumed_or_full_pull_is_not_classified() {
        for s in [spec(true, 3), spec(false, 0)] {
            let resume = s.request.resume_from;
            let mut p = receiving(s, 0);
            let _ = p
                .handle(PullInput::Received {
                    msg: &Message::TransferDone {
                        req_id: 7,
                        content_digest: [9; 32],
                    },
                    payload: &[],
                })
                .unwrap();
            let a = p
                .handle(PullInput::Snapshotted {
                    digest: Some([9; 32]),
                })
                .unwrap();
            assert!(!names(&a).contains(&"classify"), "resume {resume}");
            assert_eq!(p.items(), (resume, resume));
        }
    }

    #[test]
    fn a_start_that_does_not_match_writes_nothing() {
        let s = spec(true, 0);
        let mut bad = Vec::new();
        for f in 0..4 {
            let Message::TransferStart(mut t) = start(&s, 1) else {
                unreachable!()
            };
            match f {
                0 => t.req_id = 8,
                1 => t.target.id = [3; 16],
                2 => t.start_position = 1,
                _ => t.base = None,
            }
            bad.push(Message::TransferStart(t));
        }
        bad.push(Message::Ping { nonce: 1 });
        for m in bad {
            let mut p = PullSession::new(s.clone());
            let _ = p.begin();
            let e = p.handle(PullInput::Received {
                msg: &m,
                payload: &[],
            });
            assert!(matches!(e, Err(ReplError::Protocol { .. })), "{m:?}: {e:?}");
            assert!(p.ended());
        }
    }

    #[test]
    fn frames_out_of_place_end_the_session() {
        let data = vec![1u8; BLOCK_SIZE];
        let cases: Vec<(Message, Vec<u8>)> = vec![
            // Other request.
            (
                Message::Checkpoint {
                    req_id: 8,
                    position: 0,
                },
                Vec::new(),
            ),
            // Checkpoint at the wrong position.
            (
                Message::Checkpoint {
                    req_id: 7,
                    position: 1,
                },
                Vec::new(),
            ),
            // Done before the announced items.
            (
                Message::TransferDone {
                    req_id: 7,
                    content_digest: [9; 32],
                },
                Vec::new(),
            ),
            // Beyond the namespace.
            (extent(16, &data), data.clone()),
            // Bad checksum.
            (
                Message::Extent(ExtentHeader {
                    req_id: 7,
                    lba: 0,
                    len: 1,
                    checksum_kind: CHECKSUM_XXH3,
                    checksum: 0,
                }),
                data.clone(),
            ),
            (Message::Ping { nonce: 3 }, Vec::new()),
        ];
        for (m, payload) in cases {
            let mut p = receiving(spec(true, 0), 1);
            let e = p.handle(PullInput::Received {
                msg: &m,
                payload: &payload,
            });
            assert!(e.is_err(), "{m:?} was taken");
            assert!(p.ended());
            assert!(p
                .handle(PullInput::Received {
                    msg: &extent(0, &data),
                    payload: &data,
                })
                .is_err());
        }
    }

    /// Random frames: never a panic, never an ack before its data and
    /// checkpoint are durable, never a snapshot before a flush.
    #[test]
    fn random_frames_keep_the_orderings() {
        use rand::Rng;
        let mut r = sluice_testkit::rng(sluice_testkit::seed("random_frames_keep_the_orderings"));
        let mut rnd = move |n: u64| r.gen_range(0..n.max(1));
        let data = vec![5u8; BLOCK_SIZE];
        for _ in 0..500 {
            let mut p = receiving(spec(rnd(2) == 0, 0), rnd(6));
            let mut pos = 0;
            let mut log = Vec::new();
            for _ in 0..10 {
                let m = match rnd(5) {
                    0 => extent(rnd(20), &data),
                    1 => Message::Trim {
                        req_id: 7,
                        lba: rnd(20),
                        len: 1 + rnd(2) as u32,
                    },
                    2 => Message::Checkpoint {
                        req_id: 7,
                        position: pos + rnd(2),
                    },
                    3 => Message::TransferDone {
                        req_id: 7,
                        content_digest: [9; 32],
                    },
                    _ => Message::Pong { nonce: 0 },
                };
                match p.handle(PullInput::Received {
                    msg: &m,
                    payload: &data,
                }) {
                    Ok(a) => {
                        if matches!(m, Message::Extent(_) | Message::Trim { .. }) {
                            pos += 1;
                        }
                        log.extend(names(&a));
                    }
                    Err(_) => break,
                }
                if log.last() == Some(&"snapshot") {
                    let a = p
                        .handle(PullInput::Snapshotted {
                            digest: Some([9; 32]),
                        })
                        .unwrap();
                    log.extend(names(&a));
                    break;
                }
            }
            for (i, a) in log.iter().enumerate() {
                let before = log.get(..i).unwrap_or_default();
                if *a == "send" {
                    let w = before.iter().rposition(|b| *b == "write" || *b == "trim");
                    let f = before.iter().rposition(|b| *b == "flush");
                    let d = before.iter().rposition(|b| *b == "drain");
                    assert!(
                        w.is_none() || (d > w && f > d),
                        "ack before durable: {log:?}"
                    );
                }
                if *a == "snapshot" {
                    assert_eq!(before.last(), Some(&"flush"), "{log:?}");
                }
                if *a == "send-sets" {
                    let c = before.iter().rposition(|b| *b == "commit");
                    let f = before.iter().rposition(|b| *b == "flush");
                    assert!(c.is_some() && f > c, "sets before durable: {log:?}");
                }
            }
        }
    }

    fn sender(n: u64) -> Sender {
        let d: Vec<DiffExtent> = (0..n)
            .map(|i| DiffExtent {
                lba: i * 2,
                len_blocks: 1,
                kind: if i % 3 == 2 {
                    DiffKind::Trim
                } else {
                    DiffKind::Data
                },
            })
            .collect();
        Sender::new(
            plan(&[d]),
            0,
            CheckpointPolicy {
                every_items: 4,
                every_bytes: u64::MAX,
            },
        )
        .unwrap()
    }

    #[test]
    fn serving_keeps_reads_ahead_and_frames_in_order() {
        for ahead in [1, 2, 5, 64] {
            let mut s = ServeSession::new(sender(11), 7, [4; 32], ahead);
            let mut inflight: Vec<u64> = Vec::new();
            let mut sent = Vec::new();
            let mut n = 0;
            loop {
                n += 1;
                assert!(n < 1000, "no progress");
                match s.next_action() {
                    ServeAction::Read { tag, .. } => {
                        inflight.push(tag);
                        assert!(inflight.len() <= ahead, "{ahead}: {inflight:?}");
                    }
                    ServeAction::AwaitRead => {
                        assert!(!inflight.is_empty(), "waits for nothing");
                        // Complete the newest first: order must not matter.
                        let t = inflight.pop().unwrap();
                        s.read_done(t);
                    }
                    ServeAction::SendExtent { tag, item } => {
                        assert!(!inflight.contains(&tag), "sent before its read");
                        let payload = vec![1u8; item.len_blocks as usize * BLOCK_SIZE];
                        sent.push(Message::Extent(s.extent_header(&item, &payload)));
                    }
                    ServeAction::Send(msg) => sent.push(msg),
                    ServeAction::Finished => break,
                }
            }
            assert!(matches!(
                sent.last(),
                Some(Message::TransferDone { content_digest, .. }) if *content_digest == [4; 32]
            ));
            let extents = sent
                .iter()
                .filter(|m| matches!(m, Message::Extent(_)))
                .count();
            assert_eq!(extents, 8, "{ahead}");
            assert_eq!(s.bytes, 8 * BLOCK_SIZE as u64);
            let lbas: Vec<u64> = sent
                .iter()
                .filter_map(|m| match m {
                    Message::Extent(h) => Some(h.lba),
                    Message::Trim { lba, .. } => Some(*lba),
                    _ => None,
                })
                .collect();
            let mut sorted = lbas.clone();
            sorted.sort();
            assert_eq!(lbas, sorted, "frames in item order");
            assert!(sent.iter().any(|m| matches!(m, Message::Checkpoint { .. })));
        }
    }

    #[test]
    fn a_request_names_snapshots_this_node_has() {
        let snap = |i: u8| SnapshotInfo {
            name: format!("s{i}"),
            id: Uuid::from_bytes([i; 16]),
            gen: u64::from(i),
            created_unix_ms: 0,
            digests: Vec::new(),
            referenced_blocks: 0,
            unique_blocks: 0,
            clones: Vec::new(),
        };
        let snaps = vec![snap(1), snap(2)];
        let mut r = spec(true, 0).request;
        let (t, b) = admit_request("A", &r, &snaps).unwrap();
        assert_eq!(
            (t.name.as_str(), b.map(|b| b.name.as_str())),
            ("s2", Some("s1"))
        );
        r.base = Some([3; 16]);
        assert_eq!(
            admit_request("A", &r, &snaps).unwrap_err().code,
            codes::NO_COMMON_BASE
        );
        r.target = [3; 16];
        assert_eq!(
            admit_request("A", &r, &snaps).unwrap_err().code,
            codes::NOT_FOUND
        );
    }
}
