//! The node-level replicator: relationships, pull transfers over TCP, the
//! serving side of peers, soft locks through `LockNode`, retention and the
//! scheduler. The daemon owns one `Arc<Replicator>` per node.
//!
//! Owns: the relationship table and the lock table (both persisted in pool
//! attributes, see [`crate::types::keys`]), receiver checkpoints, the
//! in-flight guards of outgoing transfers, throttles and metrics.
//!
//! Invariants kept:
//! - The state mutex is never held across network I/O; lock-table changes
//!   are persisted before their actions are performed.
//! - A snapshot is deleted (prune, `snap delete`, volume-mirror follow-up)
//!   only after `LockNode` answered `Deleted` or `ForcedDelete`, and never
//!   while an outgoing transfer uses it.
//! - A destination snapshot is created only after every item of a transfer
//!   arrived and passed its checksum, and is removed again at once if its
//!   content digest differs from the source's: a failed transfer commits
//!   nothing.
//! - Lock sets go to an upstream before and after every transfer on the
//!   transfer's own connection, and whenever they change on a short
//!   connection of their own; undeliverable sets are retried every tick.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver as ChanRx, RecvTimeoutError, Sender as ChanTx};
use sluice_engine::api::{Image, NsName, Reply, Request, SnapshotInfo, VolumeInfo};
use sluice_engine::device::{AlignedBuf, BLOCK_SIZE};
use sluice_engine::shard::EngineHandle;
use sluice_lockproto::wire::{
    codes, ExtentHeader, SnapInfo, TransferRequest, TransferStart, WireLockSet, CHECKSUM_XXH3,
};
use sluice_lockproto::{Action, Event, LockKind, LockNode, LockSet, Message, NodeConfig, SoftLock};
use uuid::Uuid;

use crate::conn::Conn;
use crate::error::{ReplError, Result};
use crate::throttle::{pace, Bucket};
use crate::transfer::{
    content_digest, plan, wire_lba, Apply, ItemKind, Receiver, SendStep, Sender, NS_LIST_TAG,
};
use crate::types::*;

/// Reads a source keeps queued ahead of the socket.
const READ_AHEAD: usize = 32;
/// Writes a destination keeps queued before it waits for one.
const WRITE_BEHIND: usize = 32;
/// Bytes a destination keeps queued (the engine reserves space for a whole
/// batch, so a deep queue of large writes could fail a small pool).
const WRITE_BEHIND_BYTES: u64 = 256 << 10;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Default)]
struct Counters {
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    transfers_served: AtomicU64,
    transfer_failures: AtomicU64,
    deletes_refused: AtomicU64,
    forced_deletes: AtomicU64,
    auth_failures: AtomicU64,
}

struct State {
    rels: BTreeMap<String, Relationship>,
    locks: LockNode,
    /// Latest undelivered set per upstream node.
    pending_sets: BTreeMap<String, LockSet>,
    /// Per downstream: snapshots we know it holds as its bases.
    down_shared: BTreeMap<String, BTreeSet<Uuid>>,
    /// Per relationship: when the next scheduled update is due.
    next_due: BTreeMap<String, Instant>,
}

/// One node's replicator. See the module docs.
pub struct Replicator {
    engine: EngineHandle,
    cfg: ReplicatorConfig,
    st: Mutex<State>,
    busy: Mutex<BTreeSet<String>>,
    serving: Mutex<BTreeMap<Uuid, usize>>,
    node_bucket: Bucket,
    rel_buckets: Mutex<BTreeMap<String, Arc<Bucket>>>,
    stop: AtomicBool,
    stop_tx: ChanTx<()>,
    sched: Mutex<Option<JoinHandle<()>>>,
    n: Counters,
}

impl std::fmt::Debug for Replicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Replicator({})", self.cfg.node_name)
    }
}

/// Releases the in-flight guard of an outgoing transfer.
struct ServeGuard<'a> {
    r: &'a Replicator,
    ids: Vec<Uuid>,
}

impl Drop for ServeGuard<'_> {
    fn drop(&mut self) {
        let mut s = lock(&self.r.serving);
        for id in &self.ids {
            if let Some(c) = s.get_mut(id) {
                *c -= 1;
                if *c == 0 {
                    s.remove(id);
                }
            }
        }
    }
}

/// Releases a relationship's busy flag.
struct BusyGuard<'a> {
    r: &'a Replicator,
    key: String,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        lock(&self.r.busy).remove(&self.key);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Create,
    Update,
    Resync,
}

fn snap_ref(s: &SnapshotInfo) -> SnapRef {
    SnapRef {
        name: s.name.clone(),
        id: s.id,
        created_unix_ms: s.created_unix_ms,
    }
}

fn wire_ref(s: &SnapInfo) -> SnapRef {
    SnapRef {
        name: s.name.clone(),
        id: Uuid::from_bytes(s.id),
        created_unix_ms: s.created_ms,
    }
}

impl Replicator {
    /// Load persisted relationships and locks from the engine's attributes
    /// and start the scheduler (lease checks and renewals every tick,
    /// `--every` updates).
    pub fn start(engine: EngineHandle, cfg: ReplicatorConfig) -> Result<Arc<Replicator>> {
        if cfg.node_name.is_empty() || cfg.node_name.len() > crate::conn::NODE_NAME_MAX {
            return Err(ReplError::Invalid(format!(
                "node name {:?} must be 1..={} bytes",
                cfg.node_name,
                crate::conn::NODE_NAME_MAX
            )));
        }
        let ncfg = NodeConfig {
            node_id: cfg.node_name.clone(),
            lease_ms: cfg.lease_ms,
            renew_every_ms: cfg.renew_every_ms,
            policy: cfg.lease_policy,
            bounds: Default::default(),
            propagate: cfg.propagate_locks,
        };
        let rels: BTreeMap<String, Relationship> = match get_attr(&engine, keys::RELATIONSHIPS)? {
            Some(b) => {
                let v: Vec<Relationship> =
                    serde_json::from_slice(&b).map_err(|e| ReplError::Persisted {
                        key: keys::RELATIONSHIPS.into(),
                        detail: e.to_string(),
                    })?;
                v.into_iter().map(|r| (r.dst.clone(), r)).collect()
            }
            None => BTreeMap::new(),
        };
        let (mut locks, restored) = match get_attr(&engine, keys::LOCKS)? {
            Some(b) => (LockNode::from_bytes(ncfg, &b)?, true),
            None => (LockNode::new(ncfg), false),
        };
        if !restored {
            // First start: every existing snapshot is local, oldest first.
            let mut all = Vec::new();
            for v in volumes(&engine)? {
                all.extend(snapshots(&engine, &v.name)?);
            }
            all.sort_by_key(|s| (s.created_unix_ms, s.gen));
            for s in all {
                locks.handle(now_ms(), Event::SnapshotCreated { snapshot: s.id });
            }
        }
        if cfg.peer_secret.is_none() {
            tracing::warn!(
                node = %cfg.node_name,
                "running without a peer secret: any peer can pull snapshots and set locks; start with --peer-secret to require authentication"
            );
        } else {
            tracing::info!(node = %cfg.node_name, "peers must prove the shared peer secret");
        }
        let (stop_tx, stop_rx) = bounded::<()>(1);
        let r = Arc::new(Replicator {
            node_bucket: Bucket::new(cfg.node_throttle_bps),
            engine,
            st: Mutex::new(State {
                rels,
                locks,
                pending_sets: BTreeMap::new(),
                down_shared: BTreeMap::new(),
                next_due: BTreeMap::new(),
            }),
            busy: Mutex::new(BTreeSet::new()),
            serving: Mutex::new(BTreeMap::new()),
            rel_buckets: Mutex::new(BTreeMap::new()),
            stop: AtomicBool::new(false),
            stop_tx,
            sched: Mutex::new(None),
            n: Counters::default(),
            cfg,
        });
        // Re-send every set (a restart bumps the generation epoch).
        let acts = r.lock_events(vec![Event::Restarted])?;
        {
            let mut st = lock(&r.st);
            for a in acts {
                if let Action::SendLockSet { upstream, set } = a {
                    st.pending_sets.insert(upstream, set);
                }
            }
            r.persist_locks(&st)?;
        }
        let weak = Arc::downgrade(&r);
        let tick = r.cfg.tick;
        let h = std::thread::Builder::new()
            .name(format!("sluice-repl-{}", r.cfg.node_name))
            .spawn(move || scheduler(weak, stop_rx, tick))
            .map_err(|e| ReplError::Io {
                peer: "local".into(),
                op: "spawn the scheduler thread",
                source: e,
            })?;
        *lock(&r.sched) = Some(h);
        Ok(r)
    }

    /// This node's name.
    pub fn node_name(&self) -> &str {
        &self.cfg.node_name
    }

    /// Stop the scheduler; running transfers stop at their next item (the
    /// receiver's checkpoint lets the next update resume).
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.stop_tx.try_send(());
        let h = lock(&self.sched).take();
        if let Some(h) = h {
            if h.thread().id() != std::thread::current().id() && h.join().is_err() {
                tracing::error!("replicator scheduler thread panicked");
            }
        }
        let st = lock(&self.st);
        if let Err(e) = self
            .persist_locks(&st)
            .and_then(|()| self.persist_rels(&st))
        {
            tracing::error!(error = %e, "persisting replicator state at shutdown failed");
        }
        let _ = self.engine.call(Request::Flush);
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    // ---------------------------------------------------------------- persistence

    fn persist_rels(&self, st: &State) -> Result<()> {
        let v: Vec<&Relationship> = st.rels.values().collect();
        let b = serde_json::to_vec(&v).map_err(|e| ReplError::Persisted {
            key: keys::RELATIONSHIPS.into(),
            detail: e.to_string(),
        })?;
        set_attr(&self.engine, keys::RELATIONSHIPS, Some(b))
    }

    fn persist_locks(&self, st: &State) -> Result<()> {
        set_attr(&self.engine, keys::LOCKS, Some(st.locks.to_bytes()?))
    }

    fn flush(&self) -> Result<()> {
        self.engine
            .call(Request::Flush)
            .map(|_| ())
            .map_err(|e| ReplError::engine("flush", e))
    }

    fn load_ckpt(&self, key: &str) -> Result<Option<Checkpoint>> {
        let k = format!("{}{key}", keys::CHECKPOINT_PREFIX);
        match get_attr(&self.engine, &k)? {
            None => Ok(None),
            Some(b) => match serde_json::from_slice(&b) {
                Ok(c) => Ok(Some(c)),
                Err(e) => {
                    tracing::warn!(key = %k, error = %e, "unreadable transfer checkpoint dropped");
                    Ok(None)
                }
            },
        }
    }

    fn store_ckpt(&self, key: &str, c: Option<&Checkpoint>) -> Result<()> {
        let k = format!("{}{key}", keys::CHECKPOINT_PREFIX);
        let v = match c {
            Some(c) => Some(serde_json::to_vec(c).map_err(|e| ReplError::Persisted {
                key: k.clone(),
                detail: e.to_string(),
            })?),
            None => None,
        };
        set_attr(&self.engine, &k, v)
    }

    // ---------------------------------------------------------------- locks plumbing

    /// Feed events to the lock table, persist it, return the actions.
    fn lock_events(&self, evs: Vec<Event>) -> Result<Vec<Action>> {
        let mut st = lock(&self.st);
        let mut out = Vec::new();
        for ev in evs {
            out.extend(st.locks.handle(now_ms(), ev));
        }
        self.persist_locks(&st)?;
        Ok(out)
    }

    /// Perform actions that need no caller decision: deliver sets (on `conn`
    /// when it goes to that upstream), log the rest.
    fn perform(&self, acts: Vec<Action>, mut conn: Option<&mut Conn>) {
        for a in acts {
            match a {
                Action::SendLockSet { upstream, set } => {
                    if let Some(c) = conn.as_deref_mut() {
                        if c.peer_node == upstream {
                            let msg = Message::LockSet(WireLockSet::from_model(&set));
                            if let Err(e) = c.send(&msg, &[]) {
                                tracing::warn!(%upstream, error = %e, "lock set not sent; retried next tick");
                                lock(&self.st).pending_sets.insert(upstream, set);
                            }
                            continue;
                        }
                    }
                    self.deliver(&upstream, set);
                }
                Action::Stale {
                    downstream,
                    renewed_ms,
                    lease_ms,
                } => {
                    tracing::warn!(%downstream, renewed_ms, lease_ms, "downstream lock set is stale (not renewed within its lease); its locks are kept until released")
                }
                Action::Released { downstream, reason } => {
                    tracing::info!(%downstream, ?reason, "downstream locks released")
                }
                Action::SetRejected { sender, error } => {
                    tracing::warn!(%sender, %error, "lock set rejected")
                }
                Action::SetTruncated { upstream, dropped } => {
                    tracing::warn!(%upstream, dropped, "lock set exceeded its bound; oldest locks left out")
                }
                Action::ForcedDelete { snapshot, holders } => {
                    self.n.forced_deletes.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%snapshot, holders = %holders_text(&holders), "forced delete of a locked snapshot")
                }
                Action::TellSnapshotGone {
                    downstream,
                    snapshot,
                } => {
                    tracing::info!(%downstream, %snapshot, "downstream will be told the snapshot is gone")
                }
                Action::DeleteRefused { .. }
                | Action::Deleted { .. }
                | Action::Protected { .. }
                | Action::Unprotected { .. } => {}
            }
        }
    }

    /// Deliver one set to an upstream on a connection of its own.
    fn deliver(&self, upstream: &str, set: LockSet) {
        match self.deliver_now(upstream, &set) {
            Ok(gone) => {
                let mut st = lock(&self.st);
                if st
                    .pending_sets
                    .get(upstream)
                    .is_some_and(|p| p.generation <= set.generation)
                {
                    st.pending_sets.remove(upstream);
                }
                drop(st);
                self.apply_gone(upstream, gone, None);
            }
            Err(e) => {
                tracing::warn!(%upstream, error = %e, "lock set not delivered; retried next tick");
                let mut st = lock(&self.st);
                let newer = st
                    .pending_sets
                    .get(upstream)
                    .is_some_and(|p| p.generation > set.generation);
                if !newer {
                    st.pending_sets.insert(upstream.to_string(), set);
                }
            }
        }
    }

    fn upstream_addr(&self, upstream: &str) -> Option<String> {
        let st = lock(&self.st);
        st.rels
            .values()
            .find(|r| r.source_node.as_deref() == Some(upstream))
            .map(|r| r.source_addr.clone())
    }

    fn deliver_now(&self, upstream: &str, set: &LockSet) -> Result<Vec<Uuid>> {
        let addr = self
            .upstream_addr(upstream)
            .ok_or_else(|| ReplError::NotFound(format!("address of upstream node {upstream}")))?;
        self.deliver_to(&addr, upstream, set)
    }

    fn deliver_to(&self, addr: &str, upstream: &str, set: &LockSet) -> Result<Vec<Uuid>> {
        let mut c = self.connect(addr)?;
        if c.peer_node != upstream {
            return Err(ReplError::Invalid(format!(
                "{addr} is node {}, not the upstream {upstream}",
                c.peer_node
            )));
        }
        c.send(&Message::LockSet(WireLockSet::from_model(set)), &[])?;
        let gone = self.barrier(&mut c)?;
        Ok(gone)
    }

    /// Ping and wait for the Pong: the peer has processed everything sent
    /// before. Returns the snapshots it said are gone.
    fn barrier(&self, c: &mut Conn) -> Result<Vec<Uuid>> {
        let nonce = rand::random::<u64>();
        c.send(&Message::Ping { nonce }, &[])?;
        let mut gone = Vec::new();
        loop {
            match c.recv()? {
                Some(Message::Pong { nonce: n }) if n == nonce => return Ok(gone),
                Some(Message::SnapshotGone { snapshot, .. }) => {
                    gone.push(Uuid::from_bytes(snapshot))
                }
                Some(Message::Error { code, text, .. }) => {
                    return Err(ReplError::Remote {
                        peer: c.who(),
                        code,
                        text,
                    })
                }
                Some(_) => {}
                None => {
                    return Err(ReplError::Protocol {
                        peer: c.who(),
                        detail: "connection closed before Pong".into(),
                    })
                }
            }
        }
    }

    fn apply_gone(&self, upstream: &str, gone: Vec<Uuid>, conn: Option<&mut Conn>) {
        if gone.is_empty() {
            return;
        }
        let evs = gone
            .into_iter()
            .map(|s| Event::UpstreamSnapshotGone {
                upstream: upstream.to_string(),
                snapshot: s,
            })
            .collect();
        match self.lock_events(evs) {
            Ok(a) => self.perform(a, conn),
            Err(e) => tracing::error!(error = %e, "lock table update failed"),
        }
    }

    fn connect(&self, addr: &str) -> Result<Conn> {
        let mut c = Conn::connect(addr, self.cfg.peer_timeout)?;
        if let Err(e) = c.handshake(&self.cfg.node_name, self.cfg.peer_secret.as_deref()) {
            if matches!(e, ReplError::AuthRefused { .. }) {
                self.n.auth_failures.fetch_add(1, Ordering::Relaxed);
            }
            return Err(e);
        }
        Ok(c)
    }

    // ---------------------------------------------------------------- serving peers

    /// Serve one peer connection (its first bytes are the lockproto MAGIC).
    /// Returns when the peer closes, on a protocol error or on shutdown.
    pub fn handle_peer(self: &Arc<Self>, stream: std::net::TcpStream) {
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        if let Err(e) = self.serve(stream) {
            if matches!(e, ReplError::AuthRefused { .. }) {
                self.n.auth_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, error = %e, "peer refused");
            } else {
                tracing::info!(%peer, error = %e, "peer connection ended with an error");
            }
        }
    }

    fn serve(&self, stream: std::net::TcpStream) -> Result<()> {
        let mut c = Conn::new(stream, self.cfg.peer_timeout)?;
        let peer = c.handshake(&self.cfg.node_name, self.cfg.peer_secret.as_deref())?;
        loop {
            if self.stopping() {
                c.send_error(0, codes::INTERNAL, "node is shutting down");
                return Ok(());
            }
            let Some(msg) = c.recv()? else {
                return Ok(());
            };
            match msg {
                Message::LockSet(w) => self.on_lock_set(&mut c, &peer, &w)?,
                Message::Ping { nonce } => c.send(&Message::Pong { nonce }, &[])?,
                Message::Pong { .. } | Message::CheckpointAck { .. } => {}
                Message::SnapshotListRequest {
                    req_id,
                    volume,
                    qtree,
                } => match self.list_for_peer(&volume, qtree.as_deref()) {
                    Ok(snapshots) => c.send(&Message::SnapshotList { req_id, snapshots }, &[])?,
                    Err(e) => c.send_error(req_id, codes::NOT_FOUND, &e.to_string()),
                },
                Message::TransferRequest(r) => {
                    self.lock_events(vec![Event::DownstreamAdded {
                        downstream: peer.clone(),
                    }])?;
                    self.serve_transfer(&mut c, &peer, &r)?;
                }
                Message::Error { code, text, .. } => {
                    tracing::info!(%peer, code, %text, "peer sent an error");
                    return Ok(());
                }
                other => {
                    let text = format!(
                        "unexpected message type {} from a downstream",
                        other.type_code()
                    );
                    c.send_error(0, codes::BAD_FRAME, &text);
                    return Err(ReplError::Protocol {
                        peer: c.who(),
                        detail: text,
                    });
                }
            }
        }
    }

    fn on_lock_set(&self, c: &mut Conn, peer: &str, w: &WireLockSet) -> Result<()> {
        if w.sender != peer {
            let text = format!(
                "lock set names sender {:?} but the connection authenticated as {peer:?}",
                w.sender
            );
            c.send_error(0, codes::BAD_FRAME, &text);
            return Err(ReplError::Protocol {
                peer: c.who(),
                detail: text,
            });
        }
        let set = w.to_model()?;
        let acts = {
            let mut st = lock(&self.st);
            let now = now_ms();
            let mut acts = Vec::new();
            if set.locks.is_empty() && set.gone_acks.is_empty() {
                // The downstream holds nothing here any more (its mirrors
                // were deleted): it stops being a downstream.
                st.down_shared.remove(peer);
                acts.extend(st.locks.handle(
                    now,
                    Event::DownstreamRemoved {
                        downstream: peer.to_string(),
                    },
                ));
            } else {
                acts.extend(st.locks.handle(
                    now,
                    Event::DownstreamAdded {
                        downstream: peer.to_string(),
                    },
                ));
                let local: BTreeSet<Uuid> = st.locks.snapshots().iter().copied().collect();
                let shared: BTreeSet<Uuid> = set
                    .locks
                    .iter()
                    .filter(|l| l.origin_node == peer && local.contains(&l.snapshot))
                    .map(|l| l.snapshot)
                    .collect();
                st.down_shared.insert(peer.to_string(), shared.clone());
                acts.extend(st.locks.handle(now, Event::LockSetReceived { set }));
                acts.extend(st.locks.handle(
                    now,
                    Event::DownstreamShared {
                        downstream: peer.to_string(),
                        shared: shared.into_iter().collect(),
                    },
                ));
            }
            self.persist_locks(&st)?;
            acts
        };
        self.perform(acts, None);
        let gone = lock(&self.st).locks.pending_gone(peer);
        for g in gone {
            c.send(
                &Message::SnapshotGone {
                    snapshot: *g.as_bytes(),
                    holders_text: format!(
                        "snapshot {g} was force-deleted on {}",
                        self.cfg.node_name
                    ),
                },
                &[],
            )?;
        }
        Ok(())
    }

    fn list_for_peer(&self, volume: &str, qtree: Option<&str>) -> Result<Vec<SnapInfo>> {
        if qtree == Some(NS_LIST_TAG) {
            let v = volume_info(&self.engine, volume)?;
            let mut out = vec![SnapInfo {
                id: [0; 16],
                name: String::new(),
                created_ms: v.size_bytes,
                content_digest: [0; 32],
            }];
            let mut qs = v.qtrees.clone();
            qs.sort_by(|a, b| a.name.cmp(&b.name));
            for q in qs {
                out.push(SnapInfo {
                    id: [0; 16],
                    name: q.name,
                    created_ms: q.size_bytes,
                    content_digest: [0; 32],
                });
            }
            return Ok(out);
        }
        if let Some(q) = qtree {
            let v = volume_info(&self.engine, volume)?;
            if !v.qtrees.iter().any(|x| x.name == q) {
                return Err(ReplError::NotFound(format!("qtree {volume}/{q}")));
            }
        }
        Ok(snapshots(&self.engine, volume)?
            .iter()
            .filter_map(|s| {
                content_digest(&s.digests, qtree).map(|d| SnapInfo {
                    id: *s.id.as_bytes(),
                    name: s.name.clone(),
                    created_ms: s.created_unix_ms,
                    content_digest: d,
                })
            })
            .collect())
    }

    /// Namespaces of a volume in transfer order: own space, then qtrees by name.
    fn transfer_namespaces(&self, volume: &str, qtree: Option<&str>) -> Result<Vec<NsName>> {
        if let Some(q) = qtree {
            return Ok(vec![NsName::qtree(volume, q)]);
        }
        let v = volume_info(&self.engine, volume)?;
        let mut names: Vec<String> = v.qtrees.iter().map(|q| q.name.clone()).collect();
        names.sort();
        let mut out = vec![NsName::volume(volume)];
        out.extend(names.iter().map(|q| NsName::qtree(volume, q)));
        Ok(out)
    }

    fn serve_transfer(&self, c: &mut Conn, peer: &str, r: &TransferRequest) -> Result<()> {
        let req_id = r.req_id;
        let fail = |c: &mut Conn, code: u16, e: ReplError| -> Result<()> {
            c.send_error(req_id, code, &e.to_string());
            Ok(())
        };
        let snaps = match snapshots(&self.engine, &r.volume) {
            Ok(s) => s,
            Err(e) => return fail(c, codes::NOT_FOUND, e),
        };
        let target_id = Uuid::from_bytes(r.target);
        let Some(target) = snaps.iter().find(|s| s.id == target_id).cloned() else {
            return fail(
                c,
                codes::NOT_FOUND,
                ReplError::NotFound(format!(
                    "snapshot {target_id} on {}:{} (deleted meanwhile?)",
                    self.cfg.node_name, r.volume
                )),
            );
        };
        let base = match r.base {
            None => None,
            Some(b) => {
                let b = Uuid::from_bytes(b);
                match snaps.iter().find(|s| s.id == b) {
                    Some(s) => Some(s.clone()),
                    None => {
                        return fail(
                            c,
                            codes::NO_COMMON_BASE,
                            ReplError::NotFound(format!(
                                "base snapshot {b} no longer exists on {}:{}",
                                self.cfg.node_name, r.volume
                            )),
                        )
                    }
                }
            }
        };
        let _guard = {
            let mut s = lock(&self.serving);
            let mut ids = vec![target.id];
            ids.extend(base.as_ref().map(|b| b.id));
            for id in &ids {
                *s.entry(*id).or_insert(0) += 1;
            }
            ServeGuard { r: self, ids }
        };
        let Some(digest) = content_digest(&target.digests, r.qtree.as_deref()) else {
            return fail(
                c,
                codes::NOT_FOUND,
                ReplError::NotFound(format!("qtree {:?} in snapshot {}", r.qtree, target.name)),
            );
        };
        let nss = match self.transfer_namespaces(&r.volume, r.qtree.as_deref()) {
            Ok(n) => n,
            Err(e) => return fail(c, codes::NOT_FOUND, e),
        };
        let mut diffs = Vec::with_capacity(nss.len());
        let mut ns_bytes = 0;
        for (i, ns) in nss.iter().enumerate() {
            let present = match &ns.qtree {
                None => true,
                Some(q) => target.digests.iter().any(|(n, _)| n.as_deref() == Some(q)),
            };
            if !present {
                diffs.push(Vec::new());
                continue;
            }
            match self.engine.call(Request::Diff {
                ns: ns.clone(),
                base: base.as_ref().map(|b| b.name.clone()),
                target: target.name.clone(),
            }) {
                Ok(Reply::Diff(d)) => diffs.push(d),
                Ok(_) => {
                    return fail(
                        c,
                        codes::INTERNAL,
                        ReplError::EngineReply { request: "Diff" },
                    )
                }
                Err(e) => {
                    return fail(
                        c,
                        codes::INTERNAL,
                        ReplError::engine(format!("diff of {ns}"), e),
                    )
                }
            }
            if i == 0 {
                ns_bytes = ns_size_bytes(&self.engine, ns)?;
            }
        }
        let items = plan(&diffs);
        let mut sender = match Sender::new(items, r.resume_from) {
            Ok(s) => s,
            Err(e) => return fail(c, codes::INTERNAL, ReplError::Invalid(e)),
        };
        c.send(
            &Message::TransferStart(TransferStart {
                req_id,
                target: SnapInfo {
                    id: *target.id.as_bytes(),
                    name: target.name.clone(),
                    created_ms: target.created_unix_ms,
                    content_digest: digest,
                },
                base: r.base,
                extent_count: sender.remaining(),
                byte_count: sender.remaining_bytes(),
                volume_bytes: ns_bytes,
                start_position: r.resume_from,
            }),
            &[],
        )?;
        tracing::info!(%peer, volume = %r.volume, target = %target.name, base = ?base.as_ref().map(|b| &b.name), resume_from = r.resume_from, "serving transfer");
        let mut steps = Vec::new();
        loop {
            match sender.next_step() {
                SendStep::Finished => break,
                st => steps.push(st),
            }
        }
        // Reads run ahead of the socket: up to READ_AHEAD in the engine's
        // queue at once, so the device sees queue depth, not one request.
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let mut submitted = 0usize;
        let mut ready: BTreeMap<u64, sluice_engine::Result<Reply>> = BTreeMap::new();
        for (i, step) in steps.iter().enumerate() {
            if self.stopping() {
                c.send_error(
                    req_id,
                    codes::INTERNAL,
                    "source node is shutting down; resume later",
                );
                return Ok(());
            }
            while submitted < steps.len() && submitted < i + READ_AHEAD {
                if let SendStep::Item(it) = steps[submitted] {
                    if it.kind == ItemKind::Data {
                        let ns = nss.get(usize::from(it.ns)).cloned().ok_or_else(|| {
                            ReplError::Invalid(format!("namespace index {} out of range", it.ns))
                        })?;
                        self.engine.submit(
                            Request::Read {
                                image: Image {
                                    ns,
                                    snapshot: Some(target.name.clone()),
                                },
                                lba: it.lba,
                                len_blocks: it.len_blocks,
                            },
                            submitted as u64,
                            done_tx.clone(),
                        );
                    }
                }
                submitted += 1;
            }
            match *step {
                SendStep::Item(it) => match it.kind {
                    ItemKind::Data => {
                        let got = loop {
                            if let Some(r) = ready.remove(&(i as u64)) {
                                break r;
                            }
                            match done_rx.recv() {
                                Ok((tag, r)) => {
                                    ready.insert(tag, r);
                                }
                                Err(_) => break Err(sluice_engine::Error::ShutDown),
                            }
                        };
                        let data = match got {
                            Ok(Reply::Data(d)) => d,
                            Ok(_) => {
                                return fail(
                                    c,
                                    codes::INTERNAL,
                                    ReplError::EngineReply { request: "Read" },
                                )
                            }
                            Err(e) => {
                                return fail(
                                    c,
                                    codes::INTERNAL,
                                    ReplError::engine(
                                        format!("read {}@{} lba {}", r.volume, target.name, it.lba),
                                        e,
                                    ),
                                )
                            }
                        };
                        let payload = data.as_slice();
                        c.send(
                            &Message::Extent(ExtentHeader {
                                req_id,
                                lba: wire_lba(it.ns, it.lba),
                                len: it.len_blocks,
                                checksum_kind: CHECKSUM_XXH3,
                                checksum: crate::transfer::checksum(payload),
                            }),
                            payload,
                        )?;
                        self.n
                            .bytes_sent
                            .fetch_add(payload.len() as u64, Ordering::Relaxed);
                    }
                    ItemKind::Trim => c.send(
                        &Message::Trim {
                            req_id,
                            lba: wire_lba(it.ns, it.lba),
                            len: it.len_blocks,
                        },
                        &[],
                    )?,
                },
                SendStep::Checkpoint(position) => {
                    c.send(&Message::Checkpoint { req_id, position }, &[])?
                }
                SendStep::Done => c.send(
                    &Message::TransferDone {
                        req_id,
                        content_digest: digest,
                    },
                    &[],
                )?,
                SendStep::Finished => {}
            }
        }
        self.n.transfers_served.fetch_add(1, Ordering::Relaxed);
        // Protect the target for this downstream until its after-set arrives.
        let acts = {
            let mut st = lock(&self.st);
            let e = st.down_shared.entry(peer.to_string()).or_default();
            e.insert(target.id);
            let shared: Vec<Uuid> = e.iter().copied().collect();
            let a = st.locks.handle(
                now_ms(),
                Event::DownstreamShared {
                    downstream: peer.to_string(),
                    shared,
                },
            );
            self.persist_locks(&st)?;
            a
        };
        self.perform(acts, None);
        Ok(())
    }

    // ---------------------------------------------------------------- mirrors (destination side)

    fn rel(&self, dst: &str) -> Result<Relationship> {
        let st = lock(&self.st);
        st.rels
            .get(dst)
            .or_else(|| {
                // A destination volume names its relationship when only one
                // relationship writes into it (e.g. one qtree mirror).
                let mut it = st.rels.values().filter(|r| r.dst_volume == dst);
                match (it.next(), it.next()) {
                    (Some(r), None) => Some(r),
                    _ => None,
                }
            })
            .cloned()
            .ok_or_else(|| {
                ReplError::NotFound(format!("mirror relationship {dst:?}; see `mirror status`"))
            })
    }

    fn update_rel(&self, key: &str, f: impl FnOnce(&mut Relationship)) -> Result<()> {
        let mut st = lock(&self.st);
        if let Some(r) = st.rels.get_mut(key) {
            f(r);
        }
        self.persist_rels(&st)
    }

    fn bucket(&self, key: &str, rate: Option<u64>) -> Arc<Bucket> {
        let mut m = lock(&self.rel_buckets);
        let b = m
            .entry(key.to_string())
            .or_insert_with(|| Arc::new(Bucket::new(rate)))
            .clone();
        b.set_rate(rate);
        b
    }

    /// Make the destination (volume read-only, or qtree) and do the baseline.
    pub fn mirror_create(&self, spec: MirrorSpec) -> Result<TransferReport> {
        let kind = if spec.source_qtree.is_some() {
            MirrorKind::Qtree
        } else {
            MirrorKind::Volume
        };
        let dst_qtree = match kind {
            MirrorKind::Qtree => spec.dst_qtree.clone().or_else(|| spec.source_qtree.clone()),
            MirrorKind::Volume => {
                if spec.dst_qtree.is_some() {
                    return Err(ReplError::Invalid(
                        "a destination qtree needs a source qtree (qtree mirror)".into(),
                    ));
                }
                None
            }
        };
        let key = match &dst_qtree {
            Some(q) => format!("{}/{q}", spec.dst_volume),
            None => spec.dst_volume.clone(),
        };
        let exists = volumes(&self.engine)?
            .into_iter()
            .find(|v| v.name == spec.dst_volume);
        match (&kind, &exists) {
            (MirrorKind::Volume, Some(_)) => {
                return Err(ReplError::Invalid(format!(
                    "volume {} exists already; a volume mirror creates its destination",
                    spec.dst_volume
                )))
            }
            (MirrorKind::Qtree, Some(v))
                if v.qtrees.iter().any(|q| Some(&q.name) == dst_qtree.as_ref()) =>
            {
                return Err(ReplError::Invalid(format!(
                    "qtree {key} exists already; a qtree mirror creates its destination"
                )))
            }
            _ => {}
        }
        {
            let mut st = lock(&self.st);
            if st.rels.contains_key(&key) {
                return Err(ReplError::RelationshipExists(key));
            }
            st.rels.insert(
                key.clone(),
                Relationship {
                    dst: key.clone(),
                    dst_volume: spec.dst_volume.clone(),
                    dst_qtree,
                    source_addr: spec.source_addr.clone(),
                    source_volume: spec.source_volume.clone(),
                    source_qtree: spec.source_qtree.clone(),
                    source_node: None,
                    kind,
                    broken: false,
                    every_ms: spec.every.map(|d| d.as_millis() as u64),
                    throttle_bps: spec.throttle_bps,
                    source_snaps: Vec::new(),
                    full_transfers: 0,
                    incremental_transfers: 0,
                    last_transfer: None,
                    last_error: None,
                    common: None,
                },
            );
            self.persist_rels(&st)?;
        }
        match self.transfer(&key, Mode::Create, &|_| {}) {
            Ok(r) => Ok(r),
            Err(e) => {
                // A baseline that never started leaves no relationship; one
                // cut midway keeps it (and its checkpoint) so update resumes.
                let started = self.load_ckpt(&key)?.is_some();
                if !started {
                    let mut st = lock(&self.st);
                    st.rels.remove(&key);
                    self.persist_rels(&st)?;
                }
                Err(e)
            }
        }
    }

    /// One transfer now (incremental from the newest common snapshot).
    pub fn mirror_update(
        &self,
        dst_volume: &str,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<TransferReport> {
        let key = self.rel(dst_volume)?.dst;
        self.transfer(&key, Mode::Update, progress)
    }

    /// Re-establish a broken or chainless mirror: from the newest common
    /// snapshot (reverting local changes), or a full re-baseline.
    pub fn mirror_resync(
        &self,
        dst: &str,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<TransferReport> {
        let key = self.rel(dst)?.dst;
        self.transfer(&key, Mode::Resync, progress)
    }

    /// Make the destination writable and stop updates until a resync.
    pub fn mirror_break(&self, dst: &str) -> Result<()> {
        let r = self.rel(dst)?;
        let _busy = self.busy_guard(&r.dst)?;
        if r.kind == MirrorKind::Volume {
            self.engine
                .call(Request::SetReadOnly {
                    volume: r.dst_volume.clone(),
                    read_only: false,
                })
                .map_err(|e| ReplError::engine(format!("make {} writable", r.dst_volume), e))?;
        }
        self.update_rel(&r.dst, |x| x.broken = true)?;
        tracing::info!(dst = %r.dst, "mirror broken: destination writable");
        Ok(())
    }

    /// End the relationship and release its locks upstream. The destination
    /// volume stays, writable.
    pub fn mirror_delete(&self, dst: &str) -> Result<()> {
        let r = self.rel(dst)?;
        let _busy = self.busy_guard(&r.dst)?;
        let acts = {
            let mut st = lock(&self.st);
            st.rels.remove(&r.dst);
            self.persist_rels(&st)?;
            let mut acts = Vec::new();
            if let Some(up) = &r.source_node {
                let rest: Vec<Uuid> = st
                    .rels
                    .values()
                    .filter(|x| x.source_node.as_deref() == Some(up))
                    .flat_map(|x| x.source_snaps.iter().copied())
                    .collect();
                let last = rest.is_empty();
                acts.extend(st.locks.handle(
                    now_ms(),
                    Event::UpstreamSnapshots {
                        upstream: up.clone(),
                        snapshots: rest,
                    },
                ));
                if last {
                    // The set just produced (empty) is the final one.
                    let force = st.locks.handle(
                        now_ms(),
                        Event::TransferStarting {
                            upstream: up.clone(),
                        },
                    );
                    acts.extend(force);
                }
                self.persist_locks(&st)?;
                (acts, last, up.clone())
            } else {
                (acts, false, String::new())
            }
        };
        let (acts, last, up) = acts;
        // Deliver synchronously: the upstream releases before we return.
        let mut final_set = None;
        let mut rest = Vec::new();
        for a in acts {
            match a {
                Action::SendLockSet { upstream, set } if upstream == up => final_set = Some(set),
                other => rest.push(other),
            }
        }
        self.perform(rest, None);
        if let Some(set) = final_set {
            if let Err(e) = self.deliver_to(&r.source_addr, &up, &set) {
                tracing::warn!(upstream = %up, error = %e, "final lock set not delivered; the upstream releases our locks when their lease ends");
            }
        }
        if last {
            let acts = self.lock_events(vec![Event::UpstreamRemoved {
                upstream: up.clone(),
            }])?;
            self.perform(acts, None);
            lock(&self.st).pending_sets.remove(&up);
        }
        self.store_ckpt(&r.dst, None)?;
        if r.kind == MirrorKind::Volume {
            if let Err(e) = self.engine.call(Request::SetReadOnly {
                volume: r.dst_volume.clone(),
                read_only: false,
            }) {
                tracing::warn!(volume = %r.dst_volume, error = %e, "could not make the former destination writable");
            }
        }
        self.flush()?;
        tracing::info!(dst = %r.dst, "mirror relationship deleted; its locks were released upstream");
        Ok(())
    }

    /// Every relationship's status.
    pub fn mirror_status(&self) -> Vec<MirrorStatus> {
        let rels: Vec<Relationship> = lock(&self.st).rels.values().cloned().collect();
        let busy = lock(&self.busy).clone();
        let now = now_ms();
        rels.into_iter()
            .map(|r| MirrorStatus {
                source: r.source_path(),
                source_node: r.source_node.clone(),
                kind: r.kind,
                state: if r.broken {
                    "broken".into()
                } else if busy.contains(&r.dst) {
                    "transferring".into()
                } else {
                    "idle".into()
                },
                lag_ms: r
                    .common
                    .as_ref()
                    .map(|c| now.saturating_sub(c.created_unix_ms)),
                newest_common_snapshot: r.common.clone(),
                full_transfers: r.full_transfers,
                incremental_transfers: r.incremental_transfers,
                last_transfer: r.last_transfer.clone(),
                last_error: r.last_error.clone(),
                checkpoint: self.load_ckpt(&r.dst).ok().flatten(),
                every_secs: r.every_ms.map(|m| m / 1000),
                throttle_bps: r.throttle_bps,
                dst: r.dst,
            })
            .collect()
    }

    fn busy_guard(&self, key: &str) -> Result<BusyGuard<'_>> {
        let mut b = lock(&self.busy);
        if !b.insert(key.to_string()) {
            return Err(ReplError::Busy(key.to_string()));
        }
        Ok(BusyGuard {
            r: self,
            key: key.to_string(),
        })
    }

    fn transfer(
        &self,
        key: &str,
        mode: Mode,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<TransferReport> {
        let rel = self.rel(key)?;
        if rel.broken && mode == Mode::Update {
            return Err(ReplError::Broken(key.to_string()));
        }
        let _busy = self.busy_guard(key)?;
        let started = Instant::now();
        let r = self.transfer_inner(&rel, mode, progress, started);
        match &r {
            Ok(rep) => {
                tracing::info!(dst = %key, kind = %rep.kind, bytes = rep.bytes, "mirror transfer done");
            }
            Err(e) => {
                self.n.transfer_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(dst = %key, error = %e, "mirror transfer failed");
                let msg = e.to_string();
                let _ = self.update_rel(key, |x| x.last_error = Some(msg));
            }
        }
        r
    }

    fn recv_reply(&self, c: &mut Conn, upstream: &str) -> Result<Message> {
        loop {
            match c.recv()? {
                Some(Message::SnapshotGone { snapshot, .. }) => {
                    self.apply_gone(upstream, vec![Uuid::from_bytes(snapshot)], Some(c))
                }
                Some(Message::Ping { nonce }) => c.send(&Message::Pong { nonce }, &[])?,
                Some(Message::Error { code, text, .. }) => {
                    return Err(ReplError::Remote {
                        peer: c.who(),
                        code,
                        text,
                    })
                }
                Some(m) => return Ok(m),
                None => {
                    return Err(ReplError::Io {
                        peer: c.who(),
                        op: "receive",
                        source: std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "the source closed the connection; the next update resumes from the last checkpoint",
                        ),
                    })
                }
            }
        }
    }

    fn request_list(
        &self,
        c: &mut Conn,
        up: &str,
        volume: &str,
        qtree: Option<&str>,
    ) -> Result<Vec<SnapInfo>> {
        let req_id = rand::random::<u64>();
        c.send(
            &Message::SnapshotListRequest {
                req_id,
                volume: volume.to_string(),
                qtree: qtree.map(str::to_string),
            },
            &[],
        )?;
        match self.recv_reply(c, up)? {
            Message::SnapshotList {
                req_id: r,
                snapshots,
            } if r == req_id => {
                if snapshots.len() > 4096 {
                    return Err(ReplError::Protocol {
                        peer: c.who(),
                        detail: format!("snapshot list of {} entries", snapshots.len()),
                    });
                }
                Ok(snapshots)
            }
            other => Err(ReplError::Protocol {
                peer: c.who(),
                detail: format!(
                    "expected SnapshotList, got message type {}",
                    other.type_code()
                ),
            }),
        }
    }

    /// Ask the source what a baseline would send (for the no-common-base error).
    fn probe_full_bytes(&self, rel: &Relationship, target: &SnapInfo) -> u64 {
        let r = (|| -> Result<u64> {
            let mut c = self.connect(&rel.source_addr)?;
            let up = c.peer_node.clone();
            c.send(
                &Message::TransferRequest(TransferRequest {
                    req_id: 1,
                    volume: rel.source_volume.clone(),
                    qtree: rel.source_qtree.clone(),
                    base: None,
                    target: target.id,
                    resume_from: 0,
                }),
                &[],
            )?;
            match self.recv_reply(&mut c, &up)? {
                Message::TransferStart(s) => {
                    c.close();
                    Ok(s.byte_count)
                }
                _ => Ok(0),
            }
        })();
        r.unwrap_or(0)
    }

    fn ensure_upstream(&self, rel: &Relationship, peer: &str) -> Result<()> {
        if let Some(n) = &rel.source_node {
            if n != peer {
                return Err(ReplError::Invalid(format!(
                    "{} is now node {peer:?}, but mirror {} pulls from node {n:?}; fix the address or recreate the mirror",
                    rel.source_addr, rel.dst
                )));
            }
        }
        let mut st = lock(&self.st);
        if let Some(r) = st.rels.get_mut(&rel.dst) {
            r.source_node = Some(peer.to_string());
        }
        let kind = match rel.kind {
            MirrorKind::Volume => LockKind::DestinationPath,
            MirrorKind::Qtree => LockKind::QtreeName,
        };
        let relationship = format!("{}:{}", self.cfg.node_name, rel.dst);
        st.locks.handle(
            now_ms(),
            Event::UpstreamAdded {
                upstream: peer.to_string(),
                relationship,
                kind,
            },
        );
        self.persist_rels(&st)?;
        self.persist_locks(&st)
    }

    /// Create the destination namespaces (volume + qtrees, or the qtree).
    fn ensure_dst(&self, rel: &Relationship, ns_sizes: &[(Option<String>, u64)]) -> Result<()> {
        let vols = volumes(&self.engine)?;
        let existing = vols.iter().find(|v| v.name == rel.dst_volume);
        let ctx = |what: String| move |e| ReplError::engine(what, e);
        match rel.kind {
            MirrorKind::Volume => {
                let own = ns_sizes
                    .iter()
                    .find(|(n, _)| n.is_none())
                    .map(|x| x.1)
                    .ok_or_else(|| ReplError::Invalid("source volume size unknown".into()))?;
                if existing.is_none() {
                    self.engine
                        .call(Request::CreateVolume {
                            name: rel.dst_volume.clone(),
                            size_bytes: own,
                        })
                        .map_err(ctx(format!("create volume {}", rel.dst_volume)))?;
                    self.engine
                        .call(Request::SetReadOnly {
                            volume: rel.dst_volume.clone(),
                            read_only: true,
                        })
                        .map_err(ctx(format!("make {} read-only", rel.dst_volume)))?;
                }
                let have: BTreeSet<String> = existing
                    .map(|v| v.qtrees.iter().map(|q| q.name.clone()).collect())
                    .unwrap_or_default();
                for (n, size) in ns_sizes {
                    if let Some(q) = n {
                        if !have.contains(q) {
                            self.engine
                                .call(Request::CreateQtree {
                                    volume: rel.dst_volume.clone(),
                                    name: q.clone(),
                                    size_bytes: *size,
                                })
                                .map_err(ctx(format!("create qtree {}/{q}", rel.dst_volume)))?;
                        }
                    }
                }
            }
            MirrorKind::Qtree => {
                let q = rel.dst_qtree.clone().ok_or_else(|| {
                    ReplError::Invalid("qtree mirror without a destination qtree".into())
                })?;
                let size = ns_sizes.first().map(|x| x.1).unwrap_or(0);
                if existing.is_none() {
                    // A fresh volume for the qtree; its own space stays tiny.
                    self.engine
                        .call(Request::CreateVolume {
                            name: rel.dst_volume.clone(),
                            size_bytes: BLOCK_SIZE as u64,
                        })
                        .map_err(ctx(format!("create volume {}", rel.dst_volume)))?;
                }
                if !existing.is_some_and(|v| v.qtrees.iter().any(|x| x.name == q)) {
                    self.engine
                        .call(Request::CreateQtree {
                            volume: rel.dst_volume.clone(),
                            name: q.clone(),
                            size_bytes: size,
                        })
                        .map_err(ctx(format!("create qtree {}/{q}", rel.dst_volume)))?;
                }
            }
        }
        Ok(())
    }

    fn dst_ns(&self, rel: &Relationship, ns_sizes: &[(Option<String>, u64)]) -> Vec<NsName> {
        match rel.kind {
            MirrorKind::Volume => ns_sizes
                .iter()
                .map(|(n, _)| match n {
                    None => NsName::volume(&rel.dst_volume),
                    Some(q) => NsName::qtree(&rel.dst_volume, q),
                })
                .collect(),
            MirrorKind::Qtree => vec![NsName {
                volume: rel.dst_volume.clone(),
                qtree: rel.dst_qtree.clone(),
            }],
        }
    }

    /// Revert the destination's live image to snapshot `base` (resync after
    /// a break): apply the diff from a temporary snapshot of now back to base.
    fn revert_to(&self, rel: &Relationship, nss: &[NsName], base: &SnapshotInfo) -> Result<()> {
        let tmp = format!("resync-{}", &Uuid::new_v4().simple().to_string()[..12]);
        let e = |c: String| move |x| ReplError::engine(c, x);
        self.engine
            .call(Request::CreateSnapshot {
                volume: rel.dst_volume.clone(),
                name: tmp.clone(),
                id: None,
                created_unix_ms: None,
            })
            .map_err(e(format!("snapshot {}@{tmp}", rel.dst_volume)))?;
        let r = (|| -> Result<()> {
            for ns in nss {
                let d = match self.engine.call(Request::Diff {
                    ns: ns.clone(),
                    base: Some(tmp.clone()),
                    target: base.name.clone(),
                }) {
                    Ok(Reply::Diff(d)) => d,
                    Ok(_) => return Err(ReplError::EngineReply { request: "Diff" }),
                    Err(x) => {
                        return Err(ReplError::engine(
                            format!("diff {ns} {tmp}..{}", base.name),
                            x,
                        ))
                    }
                };
                for it in plan(&[d]) {
                    match it.kind {
                        ItemKind::Data => {
                            let data = match self.engine.call(Request::Read {
                                image: Image {
                                    ns: ns.clone(),
                                    snapshot: Some(base.name.clone()),
                                },
                                lba: it.lba,
                                len_blocks: it.len_blocks,
                            }) {
                                Ok(Reply::Data(d)) => d,
                                Ok(_) => return Err(ReplError::EngineReply { request: "Read" }),
                                Err(x) => {
                                    return Err(ReplError::engine(
                                        format!("read {ns}@{}", base.name),
                                        x,
                                    ))
                                }
                            };
                            self.engine
                                .call(Request::Write {
                                    ns: ns.clone(),
                                    lba: it.lba,
                                    data,
                                    fua: false,
                                    replica: true,
                                })
                                .map_err(e(format!("revert {ns} lba {}", it.lba)))?;
                        }
                        ItemKind::Trim => {
                            self.engine
                                .call(Request::Trim {
                                    ns: ns.clone(),
                                    lba: it.lba,
                                    len_blocks: u64::from(it.len_blocks),
                                    replica: true,
                                })
                                .map_err(e(format!("revert {ns} lba {}", it.lba)))?;
                        }
                    }
                }
            }
            Ok(())
        })();
        let d = self.engine.call(Request::DeleteSnapshot {
            volume: rel.dst_volume.clone(),
            name: tmp.clone(),
        });
        r?;
        d.map_err(e(format!("delete {}@{tmp}", rel.dst_volume)))?;
        Ok(())
    }

    /// Unmap every block of the destination (full re-baseline).
    fn wipe(&self, nss: &[NsName]) -> Result<()> {
        for ns in nss {
            let blocks = ns_size_bytes(&self.engine, ns)? / BLOCK_SIZE as u64;
            self.engine
                .call(Request::Trim {
                    ns: ns.clone(),
                    lba: 0,
                    len_blocks: blocks,
                    replica: true,
                })
                .map_err(|e| ReplError::engine(format!("wipe {ns}"), e))?;
        }
        Ok(())
    }

    fn send_sets(&self, c: &mut Conn, acts: Vec<Action>) -> Result<()> {
        self.perform(acts, Some(c));
        Ok(())
    }

    fn transfer_inner(
        &self,
        rel: &Relationship,
        mode: Mode,
        progress: &(dyn Fn(Progress) + Sync),
        started: Instant,
    ) -> Result<TransferReport> {
        let key = rel.dst.clone();
        let mut c = self.connect(&rel.source_addr)?;
        let up = c.peer_node.clone();
        self.ensure_upstream(rel, &up)?;
        // Claims 10/20: our lock set before the transfer.
        let acts = self.lock_events(vec![Event::TransferStarting {
            upstream: up.clone(),
        }])?;
        self.send_sets(&mut c, acts)?;
        let src =
            self.request_list(&mut c, &up, &rel.source_volume, rel.source_qtree.as_deref())?;
        let src_ids: Vec<Uuid> = src.iter().map(|s| Uuid::from_bytes(s.id)).collect();
        {
            let mut st = lock(&self.st);
            if let Some(r) = st.rels.get_mut(&key) {
                r.source_snaps = src_ids.clone();
            }
            let union: Vec<Uuid> = st
                .rels
                .values()
                .filter(|r| r.source_node.as_deref() == Some(up.as_str()))
                .flat_map(|r| r.source_snaps.iter().copied())
                .collect();
            let a = st.locks.handle(
                now_ms(),
                Event::UpstreamSnapshots {
                    upstream: up.clone(),
                    snapshots: union,
                },
            );
            self.persist_rels(&st)?;
            self.persist_locks(&st)?;
            drop(st);
            self.send_sets(&mut c, a)?;
        }
        let Some(newest) = src.last().cloned() else {
            return Err(ReplError::NotFound(format!(
                "any snapshot of {} (take one there with `snap create`)",
                rel.source_path()
            )));
        };
        let ns_sizes: Vec<(Option<String>, u64)> = match rel.kind {
            MirrorKind::Volume => self
                .request_list(&mut c, &up, &rel.source_volume, Some(NS_LIST_TAG))?
                .into_iter()
                .map(|s| {
                    (
                        if s.name.is_empty() {
                            None
                        } else {
                            Some(s.name)
                        },
                        s.created_ms,
                    )
                })
                .collect(),
            MirrorKind::Qtree => Vec::new(), // size from TransferStart
        };
        if ns_sizes.len() > crate::transfer::NS_MAX {
            return Err(ReplError::Protocol {
                peer: c.who(),
                detail: format!("{} namespaces", ns_sizes.len()),
            });
        }
        let dst_exists = volumes(&self.engine)?
            .iter()
            .any(|v| v.name == rel.dst_volume);
        let local = if dst_exists {
            snapshots(&self.engine, &rel.dst_volume)?
        } else {
            Vec::new()
        };
        let base_info = src
            .iter()
            .rev()
            .find(|s| local.iter().any(|l| l.id.as_bytes() == &s.id))
            .cloned();
        let mut base = base_info.clone();
        match mode {
            Mode::Create => {
                if base.is_some() {
                    return Err(ReplError::Invalid(format!(
                        "destination {key} already holds source snapshots"
                    )));
                }
            }
            Mode::Update => {
                if base.is_none() {
                    let has_ckpt_baseline = self
                        .load_ckpt(&key)?
                        .is_some_and(|ck| ck.base.is_none() && src_ids.contains(&ck.target));
                    if !has_ckpt_baseline {
                        drop(c);
                        let bytes = self.probe_full_bytes(rel, &newest);
                        return Err(ReplError::NoCommonSnapshot {
                            dst: key.clone(),
                            source_path: rel.source_path(),
                            bytes,
                        });
                    }
                }
            }
            Mode::Resync => {}
        }
        // Resume an interrupted transfer of the same base if its target is
        // still there; otherwise start over to the newest snapshot.
        let ckpt = self.load_ckpt(&key)?;
        let (target, resume_from) = match &ckpt {
            Some(ck)
                if mode != Mode::Resync
                    && ck.base == base.as_ref().map(|b| Uuid::from_bytes(b.id))
                    && src_ids.contains(&ck.target) =>
            {
                let t = src
                    .iter()
                    .find(|s| Uuid::from_bytes(s.id) == ck.target)
                    .cloned()
                    .unwrap_or_else(|| newest.clone());
                (t, ck.position)
            }
            _ => (newest.clone(), 0),
        };
        let abandoned = match &ckpt {
            Some(ck) if resume_from == 0 => {
                // The interrupted target is gone (or a resync was asked):
                // drop its checkpoint and its resume lock; the partial data
                // it left is undone below before the new transfer.
                self.store_ckpt(&key, None)?;
                self.resume_lock(&key, ck.target, false, Some(&mut c))?;
                true
            }
            _ => false,
        };
        let mut report = TransferReport {
            dst: key.clone(),
            kind: "none".into(),
            base: base.as_ref().map(wire_ref),
            target: Some(wire_ref(&target)),
            bytes: 0,
            extents: 0,
            trims: 0,
            resumed_from: resume_from,
            total_items: 0,
            deleted_snapshots: Vec::new(),
            kept_locked: Vec::new(),
            finished_unix_ms: 0,
            duration_ms: 0,
        };
        let up_to_date = base.as_ref().is_some_and(|b| b.id == target.id);
        if (mode == Mode::Resync || abandoned) && !up_to_date {
            if rel.kind == MirrorKind::Volume && dst_exists {
                let _ = self.engine.call(Request::SetReadOnly {
                    volume: rel.dst_volume.clone(),
                    read_only: true,
                });
            }
            if dst_exists {
                let nss = if rel.kind == MirrorKind::Volume {
                    self.dst_ns(rel, &ns_sizes)
                        .into_iter()
                        .filter(|n| ns_size_bytes(&self.engine, n).is_ok())
                        .collect()
                } else {
                    self.dst_ns(rel, &ns_sizes)
                };
                match &base {
                    Some(b) => {
                        let bi = local
                            .iter()
                            .find(|l| l.id.as_bytes() == &b.id)
                            .cloned()
                            .ok_or_else(|| {
                                ReplError::NotFound(format!("base {} locally", b.name))
                            })?;
                        self.revert_to(rel, &nss, &bi)?;
                    }
                    None => {
                        tracing::info!(dst = %key, "resync without a common snapshot: full re-baseline");
                        self.wipe(&nss)?;
                    }
                }
            }
        }
        if !up_to_date {
            let (r, b) = self.pull(
                &mut c,
                rel,
                &up,
                base.take(),
                &target,
                resume_from,
                &ns_sizes,
                progress,
                &mut report,
            )?;
            report = r;
            base = b;
        }
        let _ = base;
        // Volume mirrors drop the snapshots their source no longer has,
        // except those locked here (own downstreams, applications).
        if rel.kind == MirrorKind::Volume {
            let now_local = snapshots(&self.engine, &rel.dst_volume)?;
            for s in now_local {
                if src_ids.contains(&s.id) || self.in_transfer(s.id) {
                    continue;
                }
                let acts = self.lock_events(vec![Event::DeleteRequested {
                    snapshot: s.id,
                    force: false,
                }])?;
                let deleted = acts.iter().any(|a| matches!(a, Action::Deleted { .. }));
                if deleted {
                    self.engine
                        .call(Request::DeleteSnapshot {
                            volume: rel.dst_volume.clone(),
                            name: s.name.clone(),
                        })
                        .map_err(|e| {
                            ReplError::engine(format!("delete {}@{}", rel.dst_volume, s.name), e)
                        })?;
                    report.deleted_snapshots.push(s.name.clone());
                } else {
                    report.kept_locked.push(s.name.clone());
                }
                self.send_sets(&mut c, acts)?;
            }
        }
        // Claims 10/20: our lock set after the transfer (sent by
        // TransferFinished in pull); make sure the source processed it.
        let gone = self.barrier(&mut c)?;
        self.apply_gone(&up, gone, Some(&mut c));
        let common = {
            let local = snapshots(&self.engine, &rel.dst_volume)?;
            src.iter()
                .rev()
                .find(|s| local.iter().any(|l| l.id.as_bytes() == &s.id))
                .map(wire_ref)
        };
        report.finished_unix_ms = now_ms();
        report.duration_ms = started.elapsed().as_millis() as u64;
        let rep = report.clone();
        self.update_rel(&key, |r| {
            match rep.kind.as_str() {
                "full" => r.full_transfers += 1,
                "incremental" => r.incremental_transfers += 1,
                _ => {}
            }
            if rep.kind != "none" || r.last_transfer.is_none() {
                r.last_transfer = Some(rep.clone());
            }
            r.last_error = None;
            r.common = common;
            if mode == Mode::Resync {
                r.broken = false;
            }
        })?;
        self.flush()?;
        Ok(report)
    }

    fn resume_owner(&self, key: &str) -> String {
        format!("transfer to {}:{key} in progress", self.cfg.node_name)
    }

    /// Lock (or release) the target of an interrupted-able transfer.
    fn resume_lock(&self, key: &str, target: Uuid, on: bool, c: Option<&mut Conn>) -> Result<()> {
        let owner = self.resume_owner(key);
        let ev = if on {
            Event::AppLockAdded {
                snapshot: target,
                owner,
            }
        } else {
            Event::AppLockReleased {
                snapshot: target,
                owner,
            }
        };
        let acts = self.lock_events(vec![ev])?;
        self.perform(acts, c);
        Ok(())
    }

    fn in_transfer(&self, id: Uuid) -> bool {
        lock(&self.serving).contains_key(&id)
    }

    #[allow(clippy::too_many_arguments)]
    fn pull(
        &self,
        c: &mut Conn,
        rel: &Relationship,
        up: &str,
        base: Option<SnapInfo>,
        target: &SnapInfo,
        resume_from: u64,
        ns_sizes: &[(Option<String>, u64)],
        progress: &(dyn Fn(Progress) + Sync),
        report: &mut TransferReport,
    ) -> Result<(TransferReport, Option<SnapInfo>)> {
        let key = rel.dst.clone();
        let req_id = rand::random::<u64>();
        let base_id = base.as_ref().map(|b| b.id);
        // Keep the target alive upstream until it is committed here, so a
        // cut transfer can resume on the next update.
        self.resume_lock(&key, Uuid::from_bytes(target.id), true, Some(c))?;
        c.send(
            &Message::TransferRequest(TransferRequest {
                req_id,
                volume: rel.source_volume.clone(),
                qtree: rel.source_qtree.clone(),
                base: base_id,
                target: target.id,
                resume_from,
            }),
            &[],
        )?;
        let start = match self.recv_reply(c, up)? {
            Message::TransferStart(s) if s.req_id == req_id => s,
            other => {
                return Err(ReplError::Protocol {
                    peer: c.who(),
                    detail: format!(
                        "expected TransferStart, got message type {}",
                        other.type_code()
                    ),
                })
            }
        };
        if start.target.id != target.id
            || start.start_position != resume_from
            || start.base != base_id
        {
            return Err(ReplError::Protocol {
                peer: c.who(),
                detail: "TransferStart does not match the request".into(),
            });
        }
        let ns_sizes: Vec<(Option<String>, u64)> = match rel.kind {
            MirrorKind::Volume => ns_sizes.to_vec(),
            MirrorKind::Qtree => vec![(rel.dst_qtree.clone(), start.volume_bytes)],
        };
        self.ensure_dst(rel, &ns_sizes)?;
        let nss = self.dst_ns(rel, &ns_sizes);
        let mut ns_blocks = Vec::with_capacity(nss.len());
        for ns in &nss {
            ns_blocks.push(ns_size_bytes(&self.engine, ns)? / BLOCK_SIZE as u64);
        }
        let mut rx = Receiver::new(
            ns_blocks,
            resume_from,
            start.extent_count,
            &key,
            &rel.source_path(),
        )?;
        let ckpt = Checkpoint {
            base: base_id.map(Uuid::from_bytes),
            target: Uuid::from_bytes(target.id),
            position: resume_from,
        };
        self.store_ckpt(&key, Some(&ckpt))?;
        self.flush()?;
        let rel_bucket = self.bucket(&key, rel.throttle_bps);
        report.kind = if base.is_some() {
            "incremental"
        } else {
            "full"
        }
        .into();
        report.total_items = rx.total();
        let mut prog = Progress {
            done_items: resume_from,
            total_items: rx.total(),
            done_bytes: 0,
            total_bytes: start.byte_count,
        };
        progress(prog);
        let mut wb = WriteBehind::new(&self.engine);
        let digest = loop {
            if self.stopping() {
                return Err(ReplError::ShuttingDown);
            }
            match self.recv_reply(c, up)? {
                Message::Extent(h) => {
                    let a: Apply = rx.on_extent(&h, c.payload())?;
                    let ns = nss
                        .get(usize::from(a.ns))
                        .cloned()
                        .ok_or_else(|| ReplError::Invalid("namespace".into()))?;
                    let n = c.payload().len() as u64;
                    wb.submit(
                        Request::Write {
                            ns: ns.clone(),
                            lba: a.lba,
                            data: AlignedBuf::from_slice(c.payload()),
                            fua: false,
                            replica: true,
                        },
                        || format!("write {ns} lba {}", a.lba),
                    )?;
                    self.n.bytes_received.fetch_add(n, Ordering::Relaxed);
                    report.bytes += n;
                    report.extents += 1;
                    pace(&[&rel_bucket, &self.node_bucket], n);
                }
                Message::Trim { lba, len, .. } => {
                    let a = rx.on_trim(lba, len)?;
                    let ns = nss
                        .get(usize::from(a.ns))
                        .cloned()
                        .ok_or_else(|| ReplError::Invalid("namespace".into()))?;
                    wb.submit(
                        Request::Trim {
                            ns: ns.clone(),
                            lba: a.lba,
                            len_blocks: a.len_blocks,
                            replica: true,
                        },
                        || format!("trim {ns} lba {}", a.lba),
                    )?;
                    report.trims += 1;
                }
                Message::Checkpoint { position, .. } => {
                    rx.on_checkpoint(position)?;
                    wb.drain()?;
                    // Data first, then the checkpoint naming it: one CP
                    // makes both durable together.
                    self.store_ckpt(
                        &key,
                        Some(&Checkpoint {
                            position,
                            ..ckpt.clone()
                        }),
                    )?;
                    self.flush()?;
                    c.send(&Message::CheckpointAck { req_id, position }, &[])?;
                }
                Message::TransferDone {
                    content_digest: d, ..
                } => {
                    rx.on_done()?;
                    wb.drain()?;
                    break d;
                }
                other => {
                    return Err(ReplError::Protocol {
                        peer: c.who(),
                        detail: format!(
                            "unexpected message type {} in a transfer",
                            other.type_code()
                        ),
                    })
                }
            }
            prog.done_items = rx.position();
            prog.done_bytes = report.bytes;
            progress(prog);
        };
        // Commit: flush, snapshot under the source's global id, verify.
        self.flush()?;
        let local = snapshots(&self.engine, &rel.dst_volume)?;
        let mut name = target.name.clone();
        if local.iter().any(|s| s.name == name) {
            name = format!(
                "{}.{}",
                target.name,
                &Uuid::from_bytes(target.id).simple().to_string()[..8]
            );
        }
        let info = match self.engine.call(Request::CreateSnapshot {
            volume: rel.dst_volume.clone(),
            name: name.clone(),
            id: Some(Uuid::from_bytes(target.id)),
            created_unix_ms: Some(target.created_ms),
        }) {
            Ok(Reply::Snapshot(s)) => s,
            Ok(_) => {
                return Err(ReplError::EngineReply {
                    request: "CreateSnapshot",
                })
            }
            Err(e) => {
                return Err(ReplError::engine(
                    format!("snapshot {}@{name}", rel.dst_volume),
                    e,
                ))
            }
        };
        let ours = content_digest(&info.digests, rel.dst_qtree.as_deref());
        if ours != Some(digest) || digest != target.content_digest {
            let _ = self.engine.call(Request::DeleteSnapshot {
                volume: rel.dst_volume.clone(),
                name: name.clone(),
            });
            self.store_ckpt(&key, None)?;
            self.flush()?;
            self.resume_lock(&key, Uuid::from_bytes(target.id), false, Some(c))?;
            return Err(ReplError::DigestMismatch {
                dst: key,
                source_path: rel.source_path(),
                snapshot: target.name.clone(),
                detail: format!(
                    "source {} says {}, received data gives {}",
                    up,
                    hex(&digest),
                    ours.map(|d| hex(&d)).unwrap_or_else(|| "none".into())
                ),
            });
        }
        self.store_ckpt(&key, None)?;
        self.flush()?;
        let owner = self.resume_owner(&key);
        let acts = self.lock_events(vec![
            Event::AppLockReleased {
                snapshot: info.id,
                owner,
            },
            Event::TransferFinished {
                upstream: up.to_string(),
                target: info.id,
            },
        ])?;
        self.send_sets(c, acts)?;
        report.target = Some(snap_ref(&info));
        Ok((report.clone(), Some(target.clone())))
    }

    // ---------------------------------------------------------------- snapshots, retention, locks

    /// Take a snapshot and tell the lock table.
    pub fn snap_create(&self, volume: &str, name: &str) -> Result<SnapshotInfo> {
        let info = match self.engine.call(Request::CreateSnapshot {
            volume: volume.to_string(),
            name: name.to_string(),
            id: None,
            created_unix_ms: None,
        }) {
            Ok(Reply::Snapshot(s)) => s,
            Ok(_) => {
                return Err(ReplError::EngineReply {
                    request: "CreateSnapshot",
                })
            }
            Err(e) => return Err(ReplError::engine(format!("snapshot {volume}@{name}"), e)),
        };
        let acts = self.lock_events(vec![Event::SnapshotCreated { snapshot: info.id }])?;
        self.perform(acts, None);
        Ok(info)
    }

    fn find_snap(&self, volume: &str, name: &str) -> Result<SnapshotInfo> {
        snapshots(&self.engine, volume)?
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| ReplError::NotFound(format!("snapshot {volume}@{name}")))
    }

    /// Delete a snapshot; refused (naming every holder) if locked, unless
    /// `force` (logged; affected downstreams are told).
    pub fn snap_delete(&self, volume: &str, name: &str, force: bool) -> Result<()> {
        let s = self.find_snap(volume, name)?;
        if self.in_transfer(s.id) {
            return Err(ReplError::InTransfer {
                volume: volume.into(),
                snapshot: name.into(),
            });
        }
        let acts = self.lock_events(vec![Event::DeleteRequested {
            snapshot: s.id,
            force,
        }])?;
        if let Some(Action::DeleteRefused { holders, .. }) = acts
            .iter()
            .find(|a| matches!(a, Action::DeleteRefused { .. }))
        {
            self.n.deletes_refused.fetch_add(1, Ordering::Relaxed);
            return Err(ReplError::Locked {
                volume: volume.into(),
                snapshot: name.into(),
                holders: holders_text(holders),
            });
        }
        self.engine
            .call(Request::DeleteSnapshot {
                volume: volume.into(),
                name: name.into(),
            })
            .map_err(|e| ReplError::engine(format!("delete {volume}@{name}"), e))?;
        self.perform(acts, None);
        Ok(())
    }

    /// Keep the newest `keep` snapshots of `volume`; delete older ones
    /// unless locked or in a transfer (each skip says why).
    pub fn prune(&self, volume: &str, keep: usize, dry_run: bool) -> Result<PrunePlan> {
        let mut snaps = snapshots(&self.engine, volume)?;
        snaps.sort_by_key(|s| (s.created_unix_ms, s.gen));
        let cut = snaps.len().saturating_sub(keep);
        let (old, recent) = snaps.split_at(cut);
        let mut plan = PrunePlan {
            volume: volume.into(),
            keep,
            dry_run,
            deleted: Vec::new(),
            kept_recent: recent.iter().map(|s| s.name.clone()).collect(),
            skipped: Vec::new(),
        };
        let names = self.snapshot_names()?;
        for s in old {
            if self.in_transfer(s.id) {
                plan.skipped.push(PruneSkip {
                    snapshot: s.name.clone(),
                    reason: "in use by a running transfer".into(),
                    holders: Vec::new(),
                });
                continue;
            }
            let holders = lock(&self.st).locks.holders(s.id);
            if !holders.is_empty() {
                let views: Vec<LockView> = holders.iter().map(|h| self.view(h, &names)).collect();
                plan.skipped.push(PruneSkip {
                    snapshot: s.name.clone(),
                    reason: format!("locked by {}", holders_text(&holders)),
                    holders: views,
                });
                continue;
            }
            if dry_run {
                plan.deleted.push(s.name.clone());
                continue;
            }
            match self.snap_delete(volume, &s.name, false) {
                Ok(()) => plan.deleted.push(s.name.clone()),
                Err(e) => plan.skipped.push(PruneSkip {
                    snapshot: s.name.clone(),
                    reason: e.to_string(),
                    holders: Vec::new(),
                }),
            }
        }
        Ok(plan)
    }

    /// An application on this node depends on `volume@snap`: lock it here
    /// and on every node upstream.
    pub fn lock_add(
        &self,
        volume: &str,
        snap: &str,
        owner: &str,
        text: Option<&str>,
    ) -> Result<LockView> {
        if owner.is_empty() || owner.contains(": ") {
            return Err(ReplError::Invalid(format!(
                "owner {owner:?} must be non-empty without \": \""
            )));
        }
        let s = self.find_snap(volume, snap)?;
        let full = match text {
            Some(t) if !t.is_empty() => format!("{owner}: {t}"),
            _ => owner.to_string(),
        };
        let bounds = sluice_lockproto::Bounds::default();
        if full.len() > bounds.max_text_len {
            return Err(ReplError::Invalid(format!(
                "lock text is {} bytes; at most {}",
                full.len(),
                bounds.max_text_len
            )));
        }
        let acts = self.lock_events(vec![Event::AppLockAdded {
            snapshot: s.id,
            owner: full.clone(),
        }])?;
        self.perform(acts, None);
        let names = self.snapshot_names()?;
        let l = lock(&self.st)
            .locks
            .all_locks()
            .into_iter()
            .find(|l| l.snapshot == s.id && l.text == full && l.kind == LockKind::OwnerName)
            .ok_or_else(|| ReplError::NotFound("the lock just added".into()))?;
        Ok(self.view(&l, &names))
    }

    /// Every lock effective on this node.
    pub fn lock_list(&self) -> Vec<LockView> {
        let names = self.snapshot_names().unwrap_or_default();
        let locks = lock(&self.st).locks.all_locks();
        locks.iter().map(|l| self.view(l, &names)).collect()
    }

    /// Release an application lock on `volume@snap` (holder = its owner),
    /// or, holder = a downstream node (or a node behind it), every lock that
    /// downstream's set holds here (an operator release; it is restored by
    /// the downstream's next set if it is still alive).
    pub fn lock_release(&self, volume: &str, snap: &str, holder: &str) -> Result<()> {
        let s = self.find_snap(volume, snap)?;
        let locks = lock(&self.st).locks.all_locks();
        let me = &self.cfg.node_name;
        let app = locks.iter().find(|l| {
            l.snapshot == s.id
                && l.kind == LockKind::OwnerName
                && &l.origin_node == me
                && (l.text == holder || l.text.starts_with(&format!("{holder}: ")))
        });
        // A downstream's locks: released as a whole (the set of that
        // downstream node, through which the holder's locks reach us).
        let down = locks
            .iter()
            .filter(|l| l.snapshot == s.id && &l.origin_node != me)
            .find(|l| l.origin_node == holder || l.hop_path.iter().any(|h| h == holder))
            .map(|l| match l.hop_path.last() {
                Some(h) if h != me => h.clone(),
                _ => l.origin_node.clone(),
            });
        let ev = match (app, down) {
            (Some(l), _) => Event::AppLockReleased {
                snapshot: s.id,
                owner: l.text.clone(),
            },
            (None, Some(downstream)) => Event::OperatorRelease { downstream },
            (None, None) => {
                return Err(ReplError::NotFound(format!(
                    "lock on {volume}@{snap} held by {holder:?}; see `lock list`"
                )))
            }
        };
        let acts = self.lock_events(vec![ev])?;
        self.perform(acts, None);
        Ok(())
    }

    /// Each snapshot of `volume` with the locks that hold it.
    pub fn snapshot_locks(&self, volume: &str) -> Result<Vec<(SnapshotInfo, Vec<LockView>)>> {
        let snaps = snapshots(&self.engine, volume)?;
        let names = self.snapshot_names()?;
        let st = lock(&self.st);
        Ok(snaps
            .into_iter()
            .map(|s| {
                let v = st
                    .locks
                    .holders(s.id)
                    .iter()
                    .map(|l| self.view_with(l, &names, &st))
                    .collect();
                (s, v)
            })
            .collect())
    }

    fn snapshot_names(&self) -> Result<BTreeMap<Uuid, (String, String)>> {
        let mut m = BTreeMap::new();
        for v in volumes(&self.engine)? {
            for s in snapshots(&self.engine, &v.name)? {
                m.insert(s.id, (v.name.clone(), s.name));
            }
        }
        Ok(m)
    }

    fn view(&self, l: &SoftLock, names: &BTreeMap<Uuid, (String, String)>) -> LockView {
        let st = lock(&self.st);
        self.view_with(l, names, &st)
    }

    fn view_with(
        &self,
        l: &SoftLock,
        names: &BTreeMap<Uuid, (String, String)>,
        st: &State,
    ) -> LockView {
        let me = &self.cfg.node_name;
        let stale_set = st.locks.stale_downstreams();
        let via = l.hop_path.last().cloned().unwrap_or_default();
        let from_down = &l.origin_node != me;
        let stale = from_down && (stale_set.contains(&via) || stale_set.contains(&l.origin_node));
        let holder = if !from_down && l.kind == LockKind::OwnerName {
            l.text.split(": ").next().unwrap_or(&l.text).to_string()
        } else if from_down {
            if via == *me {
                l.origin_node.clone()
            } else {
                via
            }
        } else {
            me.clone()
        };
        let dv = l.dependency_view();
        LockView {
            volume: names.get(&l.snapshot).map(|x| x.0.clone()),
            snapshot: names.get(&l.snapshot).map(|x| x.1.clone()),
            snapshot_id: l.snapshot,
            kind: l.kind.to_string(),
            text: l.text.clone(),
            origin_node: l.origin_node.clone(),
            hop_path: l.hop_path.clone(),
            state: if stale { "stale" } else { "active" }.into(),
            created_unix_ms: l.created_ms,
            renewed_unix_ms: l.renewed_ms,
            lease_ms: l.lease_ms,
            holder,
            resource_id: dv.resource_id,
            locking_dataset_id: dv.locking_dataset_id,
        }
    }

    // ---------------------------------------------------------------- metrics

    /// Prometheus text: `sluice_repl_*`.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let st = self.mirror_status();
        let locks = self.lock_list();
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut w = |name: &str, help: &str, kind: &str, lines: Vec<(String, u64)>| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, v) in lines {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        w(
            "sluice_repl_bytes_sent_total",
            "Extent payload bytes sent to downstreams.",
            "counter",
            vec![(String::new(), c(&self.n.bytes_sent))],
        );
        w(
            "sluice_repl_bytes_received_total",
            "Extent payload bytes received from upstreams.",
            "counter",
            vec![(String::new(), c(&self.n.bytes_received))],
        );
        w(
            "sluice_repl_transfers_served_total",
            "Transfers served to downstreams.",
            "counter",
            vec![(String::new(), c(&self.n.transfers_served))],
        );
        w(
            "sluice_repl_transfer_failures_total",
            "Pulls that failed.",
            "counter",
            vec![(String::new(), c(&self.n.transfer_failures))],
        );
        w(
            "sluice_repl_deletes_refused_total",
            "Snapshot deletes refused by soft locks.",
            "counter",
            vec![(String::new(), c(&self.n.deletes_refused))],
        );
        w(
            "sluice_repl_forced_deletes_total",
            "Forced deletes of locked snapshots.",
            "counter",
            vec![(String::new(), c(&self.n.forced_deletes))],
        );
        w(
            "sluice_repl_auth_failures_total",
            "Peer connections refused by authentication.",
            "counter",
            vec![(String::new(), c(&self.n.auth_failures))],
        );
        let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
        let mut transfers = Vec::new();
        let mut lag = Vec::new();
        let mut broken = Vec::new();
        for s in &st {
            let d = esc(&s.dst);
            transfers.push((format!("{{dst=\"{d}\",kind=\"full\"}}"), s.full_transfers));
            transfers.push((
                format!("{{dst=\"{d}\",kind=\"incremental\"}}"),
                s.incremental_transfers,
            ));
            if let Some(l) = s.lag_ms {
                lag.push((format!("{{dst=\"{d}\"}}"), l / 1000));
            }
            broken.push((format!("{{dst=\"{d}\"}}"), u64::from(s.state == "broken")));
        }
        w(
            "sluice_repl_transfers_total",
            "Completed transfers per relationship and kind.",
            "counter",
            transfers,
        );
        w(
            "sluice_repl_lag_seconds",
            "Age of the newest common snapshot.",
            "gauge",
            lag,
        );
        w(
            "sluice_repl_broken",
            "1 if the relationship is broken.",
            "gauge",
            broken,
        );
        let active = locks.iter().filter(|l| l.state == "active").count() as u64;
        let stale = locks.len() as u64 - active;
        w(
            "sluice_repl_locks",
            "Soft locks effective on this node.",
            "gauge",
            vec![
                ("{state=\"active\"}".into(), active),
                ("{state=\"stale\"}".into(), stale),
            ],
        );
        let sd = lock(&self.st).locks.stale_downstreams().len() as u64;
        w(
            "sluice_repl_stale_downstreams",
            "Downstreams whose lock set lease ran out.",
            "gauge",
            vec![(String::new(), sd)],
        );
        let pending = lock(&self.st).pending_sets.len() as u64;
        w(
            "sluice_repl_undelivered_lock_sets",
            "Upstreams whose latest lock set is not delivered yet.",
            "gauge",
            vec![(String::new(), pending)],
        );
    }

    // ---------------------------------------------------------------- scheduler

    fn tick(&self) {
        match self.lock_events(vec![Event::Tick]) {
            Ok(a) => self.perform(a, None),
            Err(e) => tracing::error!(error = %e, "lock tick failed"),
        }
        let pending: Vec<(String, LockSet)> = lock(&self.st)
            .pending_sets
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (u, s) in pending {
            if self.stopping() {
                return;
            }
            self.deliver(&u, s);
        }
        let now = Instant::now();
        let due: Vec<String> = {
            let mut st = lock(&self.st);
            let sched: Vec<(String, u64)> = st
                .rels
                .values()
                .filter(|r| !r.broken)
                .filter_map(|r| r.every_ms.map(|e| (r.dst.clone(), e)))
                .collect();
            let mut due = Vec::new();
            for (k, every) in sched {
                let next = *st
                    .next_due
                    .entry(k.clone())
                    .or_insert_with(|| now + Duration::from_millis(every));
                if next <= now {
                    st.next_due
                        .insert(k.clone(), now + Duration::from_millis(every));
                    due.push(k);
                }
            }
            due
        };
        for k in due {
            if self.stopping() {
                return;
            }
            if let Err(e) = self.transfer(&k, Mode::Update, &|_| {}) {
                tracing::warn!(dst = %k, error = %e, "scheduled update failed");
            }
        }
    }
}

fn scheduler(r: Weak<Replicator>, stop: ChanRx<()>, tick: Duration) {
    loop {
        match stop.recv_timeout(tick) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {}
        }
        let Some(r) = r.upgrade() else { return };
        if r.stopping() {
            return;
        }
        r.tick();
    }
}

/// Destination writes queued in the engine without waiting for each one:
/// at most [`WRITE_BEHIND`] outstanding; `drain` before anything that must
/// see them (a checkpoint, the commit). The engine runs requests in order.
struct WriteBehind<'a> {
    engine: &'a EngineHandle,
    tx: ChanTx<(u64, sluice_engine::Result<Reply>)>,
    rx: ChanRx<(u64, sluice_engine::Result<Reply>)>,
    what: BTreeMap<u64, (String, u64)>,
    queued_bytes: u64,
    next_tag: u64,
}

impl<'a> WriteBehind<'a> {
    fn new(engine: &'a EngineHandle) -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        WriteBehind {
            engine,
            tx,
            rx,
            what: BTreeMap::new(),
            queued_bytes: 0,
            next_tag: 0,
        }
    }

    fn submit(&mut self, req: Request, what: impl FnOnce() -> String) -> Result<()> {
        let tag = self.next_tag;
        self.next_tag += 1;
        let bytes = match &req {
            Request::Write { data, .. } => data.len_bytes() as u64,
            _ => 0,
        };
        self.what.insert(tag, (what(), bytes));
        self.queued_bytes += bytes;
        self.engine.submit(req, tag, self.tx.clone());
        while self.what.len() >= WRITE_BEHIND || self.queued_bytes > WRITE_BEHIND_BYTES {
            self.wait_one()?;
        }
        Ok(())
    }

    fn wait_one(&mut self) -> Result<()> {
        let (tag, r) = self
            .rx
            .recv()
            .map_err(|_| ReplError::engine("queued write", sluice_engine::Error::ShutDown))?;
        let (what, bytes) = self.what.remove(&tag).unwrap_or_default();
        self.queued_bytes = self.queued_bytes.saturating_sub(bytes);
        r.map(|_| ()).map_err(|e| ReplError::engine(what, e))
    }

    fn drain(&mut self) -> Result<()> {
        while !self.what.is_empty() {
            self.wait_one()?;
        }
        Ok(())
    }
}

// -------------------------------------------------------------------- engine helpers

fn get_attr(e: &EngineHandle, key: &str) -> Result<Option<Vec<u8>>> {
    match e.call(Request::GetAttr { key: key.into() }) {
        Ok(Reply::Attr(v)) => Ok(v),
        Ok(_) => Err(ReplError::EngineReply { request: "GetAttr" }),
        Err(x) => Err(ReplError::engine(format!("read attribute {key}"), x)),
    }
}

fn set_attr(e: &EngineHandle, key: &str, value: Option<Vec<u8>>) -> Result<()> {
    e.call(Request::SetAttr {
        key: key.into(),
        value,
    })
    .map(|_| ())
    .map_err(|x| ReplError::engine(format!("write attribute {key}"), x))
}

fn volumes(e: &EngineHandle) -> Result<Vec<VolumeInfo>> {
    match e.call(Request::ListVolumes) {
        Ok(Reply::Volumes(v)) => Ok(v),
        Ok(_) => Err(ReplError::EngineReply {
            request: "ListVolumes",
        }),
        Err(x) => Err(ReplError::engine("list volumes", x)),
    }
}

fn volume_info(e: &EngineHandle, volume: &str) -> Result<VolumeInfo> {
    volumes(e)?
        .into_iter()
        .find(|v| v.name == volume)
        .ok_or_else(|| ReplError::NotFound(format!("volume {volume}")))
}

fn snapshots(e: &EngineHandle, volume: &str) -> Result<Vec<SnapshotInfo>> {
    match e.call(Request::ListSnapshots {
        volume: volume.into(),
    }) {
        Ok(Reply::Snapshots(v)) => Ok(v),
        Ok(_) => Err(ReplError::EngineReply {
            request: "ListSnapshots",
        }),
        Err(x) => Err(ReplError::engine(format!("list snapshots of {volume}"), x)),
    }
}

fn ns_size_bytes(e: &EngineHandle, ns: &NsName) -> Result<u64> {
    let v = volume_info(e, &ns.volume)?;
    match &ns.qtree {
        None => Ok(v.size_bytes),
        Some(q) => v
            .qtrees
            .iter()
            .find(|x| &x.name == q)
            .map(|x| x.size_bytes)
            .ok_or_else(|| ReplError::NotFound(format!("qtree {ns}"))),
    }
}

fn holders_text(h: &[SoftLock]) -> String {
    h.iter()
        .map(|l| {
            format!(
                "{} {:?} from {} via {}",
                l.kind,
                l.text,
                l.origin_node,
                l.hop_path.join(">")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
