//! The node-level replicator: relationships, pull transfers over TCP, the
//! serving side of peers, soft locks through `LockNode`, retention and the
//! scheduler. The daemon owns one `Arc<Replicator>` per node.
//!
//! Owns: the relationship table and the lock table (both persisted in pool
//! attributes, see [`crate::types::keys`]), receiver checkpoints, the
//! in-flight guards of outgoing transfers, throttles and metrics.
//!
//! Invariants kept:
//! - Every decision reads one state, [`State`], under one mutex: the
//!   tables, which relationships have an operation in hand, which snapshots
//!   outgoing transfers read. The other mutexes guard shell bookkeeping
//!   only (throttle buckets, live peer connections, refusal logs).
//! - The state mutex is never held across network I/O. The state changes
//!   only through [`Replicator::change`] ([`state::commit`]): the lock table
//!   takes its events there and nowhere else, and the tables a change
//!   touched are written before its actions are performed.
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
//!
//! Here: the struct, start/shutdown, and the lock-table
//! plumbing (events in, actions performed, set delivery). The scheduler and
//! its worker threads are in `sched`, the source side in `serve`, the
//! destination side in `pull`, the operator's snapshot/prune/lock calls in
//! `admin`, metrics in `metrics`, the state and its one way of changing in
//! `state`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver as ChanRx, RecvTimeoutError, Sender as ChanTx};
use sluice_engine::api::{
    DiffExtent, DiffKind, DiffStats, Image, NsName, Reply, Request, SnapshotInfo, SnapshotName,
    VolumeInfo,
};
use sluice_engine::device::BLOCK_SIZE;
use sluice_engine::shard::EngineHandle;
use sluice_lockproto::wire::{
    codes, SetAssembler, SnapInfo, TransferRequest, WireLockSet, SNAPSHOT_PAGE_MAX,
};
use sluice_lockproto::{
    next_shared, Action, DownKey, Event, Held, LockKind, LockNode, LockSet, Message, NodeConfig,
    SoftLock,
};
use uuid::Uuid;

use crate::conn::Conn;
use crate::error::{ReplError, Result};
use crate::session::{PullAction, PullInput, PullSession, PullSpec, ServeAction, ServeSession};
use crate::throttle::{pace, Bucket};
use crate::transfer::{content_digest, plan, ItemKind, Sender, NS_LIST_TAG};
use crate::types::*;

mod admin;
mod exports;
mod follow;
mod metrics;
mod plan;
mod pull;
mod retarget;
mod retention;
mod sched;
mod serve;
mod state;

use state::{commit, Parts, State, Txn};

/// Most downstream nodes one node serves.
const DOWNSTREAMS_MAX: usize = 1024;
/// Reads a source keeps queued ahead of the socket.
const READ_AHEAD: usize = 32;
/// Writes a destination keeps queued before it waits for one.
const WRITE_BEHIND: usize = 32;
/// Bytes a destination keeps queued: 16 full-transfer extents of 1 MiB, so
/// the device sees queue depth while the next extents arrive (at 256 KiB
/// each 1 MiB extent was written at queue depth 1, with the socket idle
/// meanwhile). The engine reserves only a queued write's data plus its
/// metadata bound (docs/FORMAT.md, "Space reserve"), so a deep queue needs
/// no more free space than its bytes. Bounds a transfer's buffered memory.
const WRITE_BEHIND_BYTES: u64 = 16 << 20;

#[derive(Default)]
struct Counters {
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    transfers_served: AtomicU64,
    transfer_failures: AtomicU64,
    deletes_refused: AtomicU64,
    forced_deletes: AtomicU64,
    auth_failures: AtomicU64,
    /// Incoming peer connections refused (bad or missing proof, or this
    /// node accepts no peers).
    peers_refused: AtomicU64,
    lock_sets_sent: AtomicU64,
    lock_sets_received: AtomicU64,
    lock_sets_refused: AtomicU64,
}

/// One node's replicator. See the module docs.
pub struct Replicator {
    engine: EngineHandle,
    cfg: ReplicatorConfig,
    st: Mutex<State>,
    /// Readers of snapshots outside the replicator (NBD exports): set once,
    /// when the node starts.
    users: std::sync::OnceLock<Arc<dyn crate::SnapshotUsers>>,
    node_bucket: Bucket,
    rel_buckets: Mutex<BTreeMap<String, Arc<Bucket>>>,
    stop: AtomicBool,
    stop_tx: ChanTx<()>,
    /// The scheduler, its worker threads and what they have in hand.
    jobs: sched::Jobs,
    /// The threads of `--follow` relationships, one per source.
    followers: follow::Followers,
    /// Each relationship's transfer checkpoint as its attribute holds it
    /// (`None`: none), once read: every write goes through `store_ckpt`,
    /// so `mirror status` reads no attribute per relationship.
    ckpts: Mutex<BTreeMap<String, Option<Checkpoint>>>,
    n: Counters,
    /// Open peer sockets, shut down by `shutdown` so nothing waits on a peer.
    live: Mutex<BTreeMap<u64, Box<dyn crate::env::PeerStream>>>,
    next_live: AtomicU64,
    /// Which refusals of incoming peers are logged (one line per source
    /// and interval).
    refusals: Mutex<crate::refusals::RefusalLog>,
    /// Which failed lock-set deliveries are logged: the first of each
    /// (relationship, upstream), then one line per interval with the count
    /// of the rest (an upstream that is down fails every tick).
    undelivered_log: Mutex<crate::refusals::RefusalLog>,
}

/// A peer connection registered with its replicator (shut down with it).
pub(crate) struct Tracked<'a> {
    conn: Conn,
    r: &'a Replicator,
    id: u64,
}

impl std::ops::Deref for Tracked<'_> {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        &self.conn
    }
}

impl std::ops::DerefMut for Tracked<'_> {
    fn deref_mut(&mut self) -> &mut Conn {
        &mut self.conn
    }
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        lock(&self.r.live).remove(&self.id);
    }
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
        let mut st = lock(&self.r.st);
        for id in &self.ids {
            if let Some(c) = st.serving.get_mut(id) {
                *c -= 1;
                if *c == 0 {
                    st.serving.remove(id);
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
        lock(&self.r.st).busy.remove(&self.key);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Create,
    Update,
    /// `force`: discard the snapshots taken here while broken.
    Resync {
        force: bool,
    },
}

fn snap_ref(s: &SnapshotInfo) -> SnapRef {
    SnapRef {
        name: s.name.clone(),
        id: s.id,
        created_unix_ms: s.created_unix_ms,
    }
}

/// The newest snapshot of a source's list (oldest first) that `local`
/// holds too: the base of the next transfer.
fn newest_common<'a>(src: &'a [SnapInfo], local: &[SnapshotInfo]) -> Option<&'a SnapInfo> {
    src.iter()
        .rev()
        .find(|s| local.iter().any(|l| l.id.as_bytes() == &s.id))
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
            bounds: sluice_lockproto::Bounds {
                max_locks_per_peer: cfg.max_locks_per_peer,
                ..Default::default()
            },
            propagate: cfg.propagate_locks,
        };
        // Written back in the current form at this start (`touch_tables`).
        let rels = load_relationships(&engine)?;
        let retention = retention::load_retention(&engine)?;
        // The lock table's snapshots are the pool's, per volume, oldest
        // first, handed to it at every start (the table does not persist
        // them): so those taken while the table was not written (a crash
        // between a transfer's commit and its bookkeeping) stay protected
        // as bases too. Names and ids only: no block-count walk.
        let pool_vols = volumes(&engine)?;
        let mut lists = BTreeMap::new();
        for v in &pool_vols {
            let mut snaps = snapshot_names_of(&engine, &v.name)?;
            snaps.sort_by_key(|s| (s.created_unix_ms, s.gen));
            lists.insert(v.name.clone(), snaps.iter().map(|s| s.id).collect());
        }
        let mut reconcile = Vec::new();
        let locks = match get_attr(&engine, keys::LOCKS)? {
            Some(b) => LockNode::from_bytes(ncfg, &b, &lists)?,
            None => {
                reconcile.extend(
                    lists
                        .into_iter()
                        .map(|(volume, snapshots)| Event::VolumeSnapshots { volume, snapshots }),
                );
                LockNode::new(ncfg)
            }
        };
        // Every relationship is (re-)registered with its source and
        // volume; upstream relationships the table has but the relationship
        // table does not are dropped.
        for v in locks.volumes() {
            if !v.is_empty() && !pool_vols.iter().any(|p| p.name == v) {
                reconcile.push(Event::VolumeRemoved { volume: v });
            }
        }
        // A downstream set on a volume that is gone (a `vol delete` whose
        // engine delete reached the disk before the crash, its lock-table
        // update not) goes too: nothing here can be held for it any more,
        // and its next set is refused (no such volume), so it would stay
        // for ever.
        for ((downstream, relationship), v) in locks.downstreams() {
            if v.is_some_and(|v| !pool_vols.iter().any(|p| p.name == v)) {
                tracing::info!(%downstream, %relationship, "downstream set on a volume that no longer exists dropped");
                reconcile.push(Event::DownstreamRemoved {
                    downstream,
                    relationship,
                });
            }
        }
        for r in rels.values() {
            if let Some(up) = &r.source_node {
                reconcile.push(upstream_event(r, up));
            }
        }
        for rel in locks.upstream_relationships() {
            if rels.get(&rel).is_none_or(|r| r.source_node.is_none()) {
                reconcile.push(Event::UpstreamRemoved { relationship: rel });
            }
        }
        // A resume lock lives exactly as long as its transfer's checkpoint;
        // one without (left by an older build, or a table written before a
        // crash) goes, or it would hold its snapshot upstream for ever.
        for h in locks.all_locks() {
            if h.via.is_some() || h.lock.kind != LockKind::OwnerName {
                continue;
            }
            let Some(key) = pull::resume_key(&cfg.node_name, &h.lock.text) else {
                continue;
            };
            let ckpt = format!("{}{key}", keys::CHECKPOINT_PREFIX);
            if !rels.contains_key(key) || get_attr(&engine, &ckpt)?.is_none() {
                tracing::info!(dst = %key, snapshot = %h.lock.snapshot, "resume lock without a checkpoint released");
                reconcile.push(Event::AppLockReleased {
                    volume: h.volume.clone(),
                    snapshot: h.lock.snapshot,
                    owner: h.lock.text.clone(),
                });
            }
        }
        // Every set is re-sent (a restart bumps the generation epoch).
        reconcile.push(Event::Restarted);
        let exports = exports::load_exports(&engine)?;
        let mut state = State::new(rels, locks, retention, exports);
        let ((), acts) = commit(&engine, &mut state, cfg.env.wall_ms(), |t| {
            t.lock_all(reconcile);
            t.touch_tables();
            Ok(())
        })?;
        // The bumped epoch is durable before any set that carries it goes
        // out. Else a second crash would restore the epoch before this
        // start and bump it to this one again: the sets sent after that
        // restart would repeat generations an upstream has seen already,
        // and it would take them for stale and drop them (found by the
        // cascade simulation: seed 119687289, a lock add acknowledged as
        // delivered that its upstream did not hold).
        engine
            .call(Request::Flush)
            .map_err(|e| ReplError::engine("make the restarted lock table durable", e))?;
        for a in acts {
            if let Action::SendLockSet {
                relationship,
                upstream,
                set,
            } = a
            {
                state.pending_sets.insert((relationship, upstream), set);
            }
        }
        match (
            cfg.peer_secret
                .as_ref()
                .or(cfg.peer_secrets.values().next()),
            cfg.insecure_peers,
        ) {
            (Some(_), _) if cfg.peer_secret.is_none() => {
                let names: Vec<&str> = cfg.peer_secrets.keys().map(String::as_str).collect();
                tracing::info!(node = %cfg.node_name, peers = %names.join(","), "peers must prove the secret this node shares with each of them (peer_secrets; any other is refused); peer traffic is encrypted")
            }
            (Some(_), _) => {
                tracing::info!(node = %cfg.node_name, "peers must prove the shared peer secret; peer traffic is encrypted")
            }
            (None, true) => tracing::warn!(
                node = %cfg.node_name,
                "INSECURE peers (insecure_peers): any peer can pull snapshots and set locks, and peer traffic is clear text; set peer_secret to require authentication and encryption"
            ),
            (None, false) => tracing::warn!(
                node = %cfg.node_name,
                "no peer secret: this node refuses every peer and replicates with none (local volumes and NBD work); set peer_secret (serve --peer-secret FILE, the same file on both nodes) to replicate, or insecure_peers = true (serve --insecure-peers) on a trusted network"
            ),
        }
        let (stop_tx, stop_rx) = bounded::<()>(1);
        let r = Arc::new(Replicator {
            node_bucket: Bucket::new(cfg.node_throttle_bps),
            engine,
            st: Mutex::new(state),
            users: std::sync::OnceLock::new(),
            rel_buckets: Mutex::new(BTreeMap::new()),
            stop: AtomicBool::new(false),
            stop_tx,
            jobs: sched::Jobs::default(),
            followers: follow::Followers::default(),
            ckpts: Mutex::new(BTreeMap::new()),
            n: Counters::default(),
            live: Mutex::new(BTreeMap::new()),
            next_live: AtomicU64::new(0),
            refusals: Mutex::new(crate::refusals::RefusalLog::new(
                crate::refusals::INTERVAL_MS_DEFAULT,
            )),
            undelivered_log: Mutex::new(crate::refusals::RefusalLog::new(
                crate::refusals::INTERVAL_MS_DEFAULT,
            )),
            cfg,
        });
        if r.cfg.background {
            sched::start_threads(&r, stop_rx)?;
        }
        Ok(r)
    }

    /// Wall-clock ms from the environment (leases, timestamps).
    fn now_ms(&self) -> u64 {
        self.cfg.env.wall_ms()
    }

    /// This node's name.
    pub fn node_name(&self) -> &str {
        &self.cfg.node_name
    }

    /// Stop the scheduler and its workers; running transfers stop at their
    /// next item (the receiver's checkpoint lets the next update resume).
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.stop_tx.try_send(());
        // Cut every peer connection: transfers stop at once (the receiver's
        // checkpoint lets the next update resume).
        for s in lock(&self.live).values() {
            s.shutdown_both();
        }
        self.join_threads();
        let saved = self.change(|t| {
            t.touch_tables();
            Ok(())
        });
        if let Err(e) = saved {
            tracing::error!(error = %e, "persisting replicator state at shutdown failed");
        }
        let _ = self.engine.call(Request::Flush);
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    // ---------------------------------------------------------------- persistence

    /// One change of the state ([`state::commit`]): the tables it touched
    /// are written before the lock table's actions are returned.
    #[must_use = "the lock table's actions must be performed"]
    fn change<R>(&self, f: impl FnOnce(&mut Txn<'_>) -> Result<R>) -> Result<(R, Vec<Action>)> {
        let now = self.now_ms();
        commit(&self.engine, &mut lock(&self.st), now, f)
    }

    fn flush(&self) -> Result<()> {
        self.engine
            .call(Request::Flush)
            .map(|_| ())
            .map_err(|e| ReplError::engine("flush", e))
    }

    /// The checkpoint of relationship `key`: from [`Replicator::ckpts`],
    /// else read from its attribute (and kept there). The cache's lock is
    /// held across the read, so a store cannot slip in between.
    fn load_ckpt(&self, key: &str) -> Result<Option<Checkpoint>> {
        let mut cache = lock(&self.ckpts);
        if let Some(c) = cache.get(key) {
            return Ok(c.clone());
        }
        let k = format!("{}{key}", keys::CHECKPOINT_PREFIX);
        let c = match get_attr(&self.engine, &k)? {
            None => None,
            Some(b) => match serde_json::from_slice(&b) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(key = %k, error = %e, "unreadable transfer checkpoint dropped");
                    None
                }
            },
        };
        cache.insert(key.to_string(), c.clone());
        Ok(c)
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
        // Forgotten first: a write that fails leaves the next load to read
        // what the pool has. Gone (`None`) is not kept: a deleted
        // relationship leaves no entry.
        let mut cache = lock(&self.ckpts);
        cache.remove(key);
        set_attr(&self.engine, &k, v)?;
        if let Some(c) = c {
            cache.insert(key.to_string(), Some(c.clone()));
        }
        Ok(())
    }

    // ---------------------------------------------------------------- locks plumbing

    /// Feed events to the lock table, persist it, return the actions.
    #[must_use = "the lock table's actions must be performed"]
    fn lock_events(&self, evs: Vec<Event>) -> Result<Vec<Action>> {
        self.change(|t| {
            t.lock_all(evs);
            Ok(())
        })
        .map(|((), acts)| acts)
    }

    /// Perform actions that need no caller decision: deliver sets (on `conn`
    /// when it goes to that upstream), log the rest. Returns the upstream
    /// nodes a set could not be delivered to (kept for the next tick).
    fn perform(&self, acts: Vec<Action>, mut conn: Option<&mut Conn>) -> Vec<String> {
        let mut undelivered = Vec::new();
        for a in acts {
            match a {
                Action::SendLockSet {
                    relationship,
                    upstream,
                    set,
                } => {
                    if let Some(c) = conn.as_deref_mut() {
                        if c.peer_node == upstream {
                            let sent = send_set(c, &set, &self.n);
                            let mut st = lock(&self.st);
                            let key = (relationship, upstream);
                            // An undelivered older set is never sent after
                            // this one: this one waits in its place (sent
                            // again at the next tick unless delivered by
                            // then, harmless if the upstream has it).
                            let older = st.pending_sets.contains_key(&key);
                            if let Err(e) = sent {
                                drop(st);
                                self.log_undelivered(&key.0, &key.1, &e);
                                let mut st = lock(&self.st);
                                undelivered.push(key.1.clone());
                                sched::queue_set(&mut st.pending_sets, key, set);
                            } else if older {
                                sched::queue_set(&mut st.pending_sets, key, set);
                            }
                            continue;
                        }
                    }
                    if !self.deliver(&relationship, &upstream, set) {
                        undelivered.push(upstream);
                    }
                }
                Action::Stale {
                    downstream,
                    relationship,
                    renewed_ms,
                    lease_ms,
                } => {
                    tracing::warn!(%downstream, %relationship, renewed_ms, lease_ms, "downstream lock set is stale (not renewed within its lease); its locks are kept until released")
                }
                Action::RelayedStale {
                    downstream,
                    relationship,
                    origin,
                    renewed_ms,
                    lease_ms,
                } => {
                    tracing::warn!(%downstream, %relationship, %origin, renewed_ms, lease_ms, "locks relayed from a node further down are stale (their origin has not renewed them within its lease); kept until released")
                }
                Action::RelayedReleased {
                    downstream,
                    relationship,
                    origin,
                    dropped,
                    ..
                } => {
                    tracing::info!(%downstream, %relationship, %origin, dropped, "relayed locks released: their origin's lease and grace ran out")
                }
                Action::Released {
                    downstream,
                    relationship,
                    reason,
                } => {
                    tracing::info!(%downstream, %relationship, ?reason, "downstream locks released")
                }
                Action::SetRejected { sender, error } => {
                    tracing::warn!(%sender, %error, "lock set rejected")
                }
                Action::SetOverBound {
                    relationship,
                    count,
                    max,
                } => {
                    tracing::error!(%relationship, count, max, "lock set holds more locks than an upstream accepts; the upstream keeps its previous set until locks are released")
                }
                Action::ForcedDelete {
                    volume,
                    snapshot,
                    holders,
                } => {
                    self.n.forced_deletes.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%volume, %snapshot, holders = %holders_text(&holders), "forced delete of a locked snapshot")
                }
                Action::TellSnapshotGone {
                    downstream,
                    relationship,
                    snapshot,
                } => {
                    tracing::info!(%downstream, %relationship, %snapshot, "downstream will be told the snapshot is gone")
                }
                Action::DeleteRefused { .. }
                | Action::Deleted { .. }
                | Action::Protected { .. }
                | Action::Unprotected { .. } => {}
            }
        }
        undelivered.sort();
        undelivered.dedup();
        undelivered
    }

    /// Log a failed delivery of `relationship`'s set to `upstream`: the
    /// first at once, then at most one line per interval, counting the
    /// failures in between (every one is retried at the next tick).
    fn log_undelivered(&self, relationship: &str, upstream: &str, e: &ReplError) {
        let now = self.cfg.env.mono_ms();
        let line = lock(&self.undelivered_log).note(&format!("{upstream}/{relationship}"), now);
        if let Some(l) = line {
            let every_s = crate::refusals::INTERVAL_MS_DEFAULT / 1000;
            tracing::warn!(%upstream, %relationship, error = %e, failed_since_last_line = l.suppressed, "lock set not delivered; retried every tick (logged once per {every_s} s while it fails)");
        }
    }

    /// Deliver one set of `relationship` to node `upstream` on a
    /// connection of its own; an undeliverable one is kept for the next
    /// tick (the latest per relationship and upstream), unless the
    /// relationship no longer pulls from that upstream. Returns whether it
    /// was delivered.
    fn deliver(&self, relationship: &str, upstream: &str, set: LockSet) -> bool {
        let key = (relationship.to_string(), upstream.to_string());
        match self.deliver_now(relationship, upstream, &set) {
            Ok(gone) => {
                let mut st = lock(&self.st);
                if st
                    .pending_sets
                    .get(&key)
                    .is_some_and(|p| p.generation <= set.generation)
                {
                    st.pending_sets.remove(&key);
                }
                drop(st);
                self.apply_gone(relationship, gone, None);
                true
            }
            Err(e) => {
                self.log_undelivered(relationship, upstream, &e);
                let mut st = lock(&self.st);
                let newer = st
                    .pending_sets
                    .get(&key)
                    .is_some_and(|p| p.generation > set.generation);
                if !newer && st.locks().upstream_of(relationship) == Some(upstream) {
                    st.pending_sets.insert(key, set);
                }
                false
            }
        }
    }

    /// Deliver every undelivered set whose (relationship, upstream) `which`
    /// picks, one after the other (none once stopping); returns the
    /// upstreams whose set still waits.
    fn deliver_pending(&self, which: impl Fn(&State, &str, &str) -> bool) -> Vec<String> {
        let sets: Vec<((String, String), LockSet)> = {
            let st = lock(&self.st);
            st.pending_sets
                .iter()
                .filter(|((rel, up), _)| which(&st, rel, up))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        let mut waiting = Vec::new();
        for ((rel, up), set) in sets {
            if self.stopping() || !self.deliver(&rel, &up, set) {
                waiting.push(up);
            }
        }
        waiting
    }

    /// The address of node `upstream`: the source address of
    /// `relationship` when it pulls from that node, else of any
    /// relationship that does.
    fn upstream_addr(&self, relationship: &str, upstream: &str) -> Option<String> {
        let st = lock(&self.st);
        let from = |r: &&Relationship| r.source_node.as_deref() == Some(upstream);
        st.rels()
            .get(relationship)
            .filter(from)
            .or_else(|| st.rels().values().find(from))
            .map(|r| r.source_addr.clone())
    }

    fn deliver_now(&self, relationship: &str, upstream: &str, set: &LockSet) -> Result<Vec<Uuid>> {
        let addr = self
            .upstream_addr(relationship, upstream)
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
        send_set(&mut c, set, &self.n)?;
        let gone = self.barrier(&mut c)?;
        Ok(gone)
    }

    /// Ping and wait for the Pong: the peer has processed everything sent
    /// before. Returns the snapshots it said are gone.
    fn barrier(&self, c: &mut Conn) -> Result<Vec<Uuid>> {
        let nonce = self.cfg.env.random_u64();
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

    fn apply_gone(&self, relationship: &str, gone: Vec<Uuid>, conn: Option<&mut Conn>) {
        if gone.is_empty() {
            return;
        }
        if let Err(e) = self.note_source_gone(relationship, &gone) {
            tracing::error!(%relationship, error = %e, "recording a forced delete upstream failed");
        }
        let evs = gone
            .into_iter()
            .map(|s| Event::UpstreamSnapshotGone {
                relationship: relationship.to_string(),
                snapshot: s,
            })
            .collect();
        match self.lock_events(evs) {
            Ok(a) => {
                self.perform(a, conn);
            }
            Err(e) => tracing::error!(error = %e, "lock table update failed"),
        }
    }

    /// The source of `relationship` force-deleted `gone`: its view of the
    /// source (snapshots, newest common one) follows at once, and the
    /// operator reads in the log and in `mirror status` what it costs.
    fn note_source_gone(&self, relationship: &str, gone: &[Uuid]) -> Result<()> {
        let Some(dst_volume) = lock(&self.st)
            .rels()
            .get(relationship)
            .map(|r| r.dst_volume.clone())
        else {
            return Ok(());
        };
        let local = snapshots(&self.engine, &dst_volume)?;
        self.update_rel(relationship, |r| {
        r.source_snaps.retain(|s| !gone.contains(s));
        let lost_common = r.common.as_ref().is_some_and(|c| gone.contains(&c.id));
        r.common = r
            .source_snaps
            .iter()
            .rev()
            .find_map(|id| local.iter().find(|l| l.id == *id))
            .map(snap_ref);
        let names: Vec<String> = gone
            .iter()
            .map(|id| {
                local
                    .iter()
                    .find(|l| l.id == *id)
                    .map(|l| l.name.clone())
                    .unwrap_or_else(|| id.to_string())
            })
            .collect();
        let next = match &r.common {
            Some(c) => format!("the next update goes on from {}", c.name),
            None => format!(
                "no snapshot in common is left: the next update is a full copy (`mirror resync {}`)",
                r.dst
            ),
        };
        let text = format!(
            "{} force-deleted {}{}; {next}",
            r.source_node.as_deref().unwrap_or(&r.source_addr),
            names.join(", "),
            if lost_common {
                " (the newest snapshot in common)"
            } else {
                ""
            }
        );
        tracing::warn!(dst = %r.dst, source = %r.source_path(), "{text}");
        r.source_notice = Some(text);
        })
    }

    /// Register a connection so `shutdown` can cut it.
    fn track(&self, conn: Conn) -> Result<Tracked<'_>> {
        if self.stopping() {
            return Err(ReplError::ShuttingDown);
        }
        let id = self.next_live.fetch_add(1, Ordering::Relaxed);
        if let Some(s) = conn.socket() {
            lock(&self.live).insert(id, s);
        }
        Ok(Tracked { conn, r: self, id })
    }

    /// Peers are refused, and none is connected to, on a node with neither
    /// a secret nor the insecure mode.
    fn peers_allowed(&self) -> Result<()> {
        if self.cfg.peer_secret.is_none()
            && self.cfg.peer_secrets.is_empty()
            && !self.cfg.insecure_peers
        {
            return Err(ReplError::PeersDisabled {
                node: self.cfg.node_name.clone(),
            });
        }
        Ok(())
    }

    fn connect(&self, addr: &str) -> Result<Tracked<'_>> {
        self.peers_allowed()?;
        let mut c = self.track(Conn::connect(&*self.cfg.env, addr, self.cfg.peer_timeout)?)?;
        if let Err(e) = c.handshake_with(&self.cfg.node_name, &|p| self.cfg.peer_key(p)) {
            if matches!(e, ReplError::AuthRefused { .. }) {
                self.n.auth_failures.fetch_add(1, Ordering::Relaxed);
            }
            return Err(e);
        }
        Ok(c)
    }
}

/// The error of a peer that closed `c` where `op` expected a frame.
fn closed(c: &Conn, op: &'static str, why: &str) -> ReplError {
    ReplError::Io {
        peer: c.who(),
        op,
        source: std::io::Error::new(std::io::ErrorKind::UnexpectedEof, why.to_string()),
    }
}

/// Send a whole lock set on `c`, in as many frames as it needs.
fn send_set(c: &mut Conn, set: &LockSet, n: &Counters) -> Result<()> {
    for part in WireLockSet::split(set) {
        c.send(&Message::LockSet(part), &[])?;
    }
    n.lock_sets_sent.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// The lock-table event that registers relationship `r` pulling from node
/// `upstream`.
fn upstream_event(r: &Relationship, upstream: &str) -> Event {
    Event::UpstreamAdded {
        relationship: r.dst.clone(),
        upstream: upstream.to_string(),
        source: r.source_volume.clone(),
        volume: r.dst_volume.clone(),
        kind: match r.kind {
            MirrorKind::Volume => LockKind::DestinationPath,
            MirrorKind::Qtree => LockKind::QtreeName,
        },
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

/// The relationship table: one record per relationship, named by the
/// index ([`keys::RELATIONSHIP_INDEX`]); or, from an older build, the one
/// table ([`keys::RELATIONSHIPS`]).
fn load_relationships(e: &EngineHandle) -> Result<BTreeMap<String, Relationship>> {
    fn parse<T: serde::de::DeserializeOwned>(key: &str, b: &[u8]) -> Result<T> {
        serde_json::from_slice(b).map_err(|x| ReplError::Persisted {
            key: key.into(),
            detail: x.to_string(),
        })
    }
    if let Some(b) = get_attr(e, keys::RELATIONSHIP_INDEX)? {
        let index: Vec<String> = parse(keys::RELATIONSHIP_INDEX, &b)?;
        let mut rels = BTreeMap::new();
        for dst in index {
            let k = format!("{}{dst}", keys::RELATIONSHIP_PREFIX);
            // A removal clears the record before the index: a crash in
            // between leaves the name in the index alone, and the
            // relationship is gone (the next index written drops it).
            let Some(b) = get_attr(e, &k)? else {
                tracing::info!(%dst, "relationship in the index without a record: it was removed");
                continue;
            };
            let r: Relationship = parse(&k, &b)?;
            rels.insert(dst, r);
        }
        return Ok(rels);
    }
    match get_attr(e, keys::RELATIONSHIPS)? {
        Some(b) => {
            let v: Vec<Relationship> = parse(keys::RELATIONSHIPS, &b)?;
            Ok(v.into_iter().map(|r| (r.dst.clone(), r)).collect())
        }
        None => Ok(BTreeMap::new()),
    }
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

/// The snapshots of `volume` without block counts: no tree walk, for
/// name and id lookups.
fn snapshot_names_of(e: &EngineHandle, volume: &str) -> Result<Vec<SnapshotName>> {
    match e.call(Request::ListSnapshotNames {
        volume: volume.into(),
    }) {
        Ok(Reply::SnapshotNames(v)) => Ok(v),
        Ok(_) => Err(ReplError::EngineReply {
            request: "ListSnapshotNames",
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
