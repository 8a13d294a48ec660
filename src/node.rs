//! A running node's state and the meaning of every control op.
//!
//! [`Node`] holds the engine handle and what the daemon was started with;
//! [`Node::execute`] runs one [`ControlRequest`] against the engine and
//! returns the JSON result the CLI prints (`--json`) or renders as text.
//! The views here (`VolumeView`, `SnapshotView`, `StatusView`, `DiffView`)
//! and the replicator's (`PrunePlan`, `MirrorStatus`, `LockView`,
//! `TransferReport`) are the documented result shapes (docs/CONTROL.md).
//!
//! Every snapshot create, delete and prune goes through the replicator, so
//! the soft locks it keeps are enforced whoever asks: there is no path from
//! the control API to a snapshot delete that skips them.

use crate::control::ControlRequest;
use crate::error::{NodeError, Result};
use crate::nbd::NbdMetrics;
use crate::units::{fmt_bytes, fmt_unix_ms};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sluice_engine::api::{DiffKind, NsName, Reply, Request, SnapshotInfo, VolumeInfo};
use sluice_engine::device::BLOCK_SIZE;
use sluice_engine::shard::EngineHandle;
use sluice_replicator::{MirrorSpec, Replicator};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

const BS: u64 = BLOCK_SIZE as u64;

/// What the daemon was started with.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub name: String,
    pub data: String,
    pub listen: String,
    pub nbd: Option<String>,
}

pub struct Node {
    pub engine: EngineHandle,
    /// Mirrors, soft locks and every snapshot operation that locks guard.
    pub repl: Arc<Replicator>,
    pub info: NodeInfo,
    /// The NBD server's counters (zero when the node serves no NBD).
    pub nbd_metrics: Arc<NbdMetrics>,
    started: Instant,
    pub control_requests: AtomicU64,
    pub control_errors: AtomicU64,
    /// Destructive operations by (op, succeeded): the audit's counters.
    pub destructive: std::sync::Mutex<std::collections::BTreeMap<(&'static str, bool), u64>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QtreeView {
    pub name: String,
    pub size_bytes: u64,
    /// The qtree's own flag: a qtree mirror's destination, until `mirror
    /// break` (a read-only volume, `VolumeView::read_only`, covers its
    /// qtrees whatever this says).
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeView {
    pub name: String,
    pub id: u32,
    /// The volume's own space (what `vol resize` sets).
    pub size_bytes: u64,
    /// Everything the volume holds: its own space plus its qtrees (what
    /// `vol list` prints as SIZE; for a qtree mirror's destination volume,
    /// about the size of the mirrored qtree).
    #[serde(default)]
    pub total_size_bytes: u64,
    /// Blocks the live image holds (every namespace), current: not as of
    /// the last consistency point.
    pub used_bytes: u64,
    /// The volume's own flag: a volume mirror's destination (covers every
    /// qtree in it).
    pub read_only: bool,
    /// What a client may write: `read-only` (the volume is, or it is a
    /// qtree mirror's destination volume -- a one-block own space and only
    /// read-only qtrees), `partly read-only` (some qtrees are: qtree mirror
    /// destinations), `writable`. `vol list` prints it as RO yes / partly / no.
    #[serde(default)]
    pub access: String,
    pub snapshots: usize,
    /// A clone's origin, `VOL@SNAP`: the snapshot it shares blocks with,
    /// held while the clone exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    pub qtrees: Vec<QtreeView>,
    /// Retention by count: the node keeps this many newest snapshots
    /// (beyond them only what soft locks hold); absent: no policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<usize>,
    /// What the operator should know about the request that returned this
    /// view (e.g. a thin volume larger than the pool); the CLI prints each
    /// on stderr.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// [`VolumeView::access`] of `v`. A qtree mirror gives the destination
/// volume it creates a one-block own space that nothing uses: a volume
/// holding only that and read-only qtrees reads as read-only.
fn access(v: &VolumeInfo) -> &'static str {
    let ro_qtrees = v.qtrees.iter().filter(|q| q.read_only).count();
    let placeholder = v.size_bytes <= BS;
    if v.read_only || (ro_qtrees > 0 && ro_qtrees == v.qtrees.len() && placeholder) {
        "read-only"
    } else if ro_qtrees > 0 {
        "partly read-only"
    } else {
        "writable"
    }
}

impl From<&VolumeInfo> for VolumeView {
    fn from(v: &VolumeInfo) -> Self {
        VolumeView {
            name: v.name.clone(),
            id: v.id,
            size_bytes: v.size_bytes,
            total_size_bytes: v.size_bytes + v.qtrees.iter().map(|q| q.size_bytes).sum::<u64>(),
            used_bytes: v.used_blocks * BS,
            read_only: v.read_only,
            access: access(v).into(),
            snapshots: v.snapshot_count,
            origin: v
                .origin
                .as_ref()
                .map(|o| format!("{}@{}", o.volume, o.snapshot)),
            qtrees: v
                .qtrees
                .iter()
                .map(|q| QtreeView {
                    name: q.name.clone(),
                    size_bytes: q.size_bytes,
                    read_only: q.read_only,
                })
                .collect(),
            keep: None,
            warnings: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotView {
    pub name: String,
    /// Global id, the same on every node the snapshot is mirrored to.
    pub id: String,
    pub created: String,
    pub created_unix_ms: u64,
    /// Bytes this snapshot's image holds.
    pub referenced_bytes: u64,
    /// Bytes that deleting this snapshot alone would free.
    pub unique_bytes: u64,
    /// Content digest per namespace ("" = the volume's own space), hex.
    pub digests: Vec<(String, String)>,
    /// Soft locks naming this snapshot (filled by the replicator).
    pub locks: Vec<Value>,
    /// Volumes cloned from this snapshot: it cannot be deleted while any
    /// exists.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clones: Vec<String>,
}

impl From<&SnapshotInfo> for SnapshotView {
    fn from(s: &SnapshotInfo) -> Self {
        SnapshotView {
            name: s.name.clone(),
            id: s.id.to_string(),
            created: fmt_unix_ms(s.created_unix_ms),
            created_unix_ms: s.created_unix_ms,
            referenced_bytes: s.referenced_blocks * BS,
            unique_bytes: s.unique_blocks * BS,
            digests: s
                .digests
                .iter()
                .map(|(q, d)| (q.clone().unwrap_or_default(), format!("{d:032x}")))
                .collect(),
            locks: Vec::new(),
            clones: s.clones.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpaceView {
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
    pub pending_free_bytes: u64,
    /// Engine shards that refuse writes after a device error (until the
    /// node restarts); 0 on a healthy pool.
    #[serde(default)]
    pub poisoned_shards: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusView {
    pub node: String,
    pub version: String,
    pub data: String,
    pub listen: String,
    pub nbd: Option<String>,
    pub uptime_s: u64,
    /// Engine shards (threads, each owning a region of the pool).
    #[serde(default)]
    pub shards: usize,
    pub space: SpaceView,
    pub volumes: usize,
    pub snapshots: usize,
    /// No problem below (`sluice status` exits non-zero when false).
    #[serde(default = "yes")]
    pub healthy: bool,
    /// What needs the operator: mirrors whose last transfer failed or that
    /// lag past twice their schedule, stale locks, space low, a pool that
    /// refuses writes after a device error.
    #[serde(default)]
    pub problems: Vec<String>,
}

fn yes() -> bool {
    true
}

/// Free space below this share of the pool is a problem (percent).
pub const SPACE_LOW_PERCENT: u64 = 10;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiffView {
    pub volume: String,
    pub qtree: Option<String>,
    pub base: Option<String>,
    pub target: String,
    pub extents: usize,
    pub data_bytes: u64,
    pub trim_bytes: u64,
}

fn to_value<T: Serialize>(v: &T) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| NodeError::Invalid(format!("cannot encode result: {e}")))
}

fn unexpected(what: &str) -> NodeError {
    NodeError::Invalid(format!("engine gave an unexpected reply to {what}"))
}

impl Node {
    pub fn new(engine: EngineHandle, repl: Arc<Replicator>, info: NodeInfo) -> Node {
        let nbd_metrics = Arc::new(NbdMetrics::new());
        repl.set_snapshot_users(nbd_metrics.clone());
        Node {
            engine,
            repl,
            info,
            nbd_metrics,
            started: Instant::now(),
            control_requests: AtomicU64::new(0),
            control_errors: AtomicU64::new(0),
            destructive: Default::default(),
        }
    }

    /// Run one control request; long ones report on `progress`.
    pub fn execute(&self, req: ControlRequest, progress: &(dyn Fn(Value) + Sync)) -> Result<Value> {
        self.control_requests.fetch_add(1, Ordering::Relaxed);
        let (changes, op) = (req.changes_state(), req.op());
        let mut r = self.execute_inner(req, progress);
        // What is answered as done is durable (docs/REPLICATION.md, "What
        // is persisted where"): one flush here, whatever the op's own path
        // flushed (a flush with nothing new to write costs nothing). A
        // request that failed part way may have changed something too.
        if changes {
            if let Err(e) = self.engine.call(Request::Flush) {
                if r.is_ok() {
                    r = Err(NodeError::NotDurable { op, source: e });
                }
            }
        }
        if r.is_err() {
            self.control_errors.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Audit a destructive request: who asked (the control client's
    /// address), what exactly, and how it ended; counted per op.
    pub fn audit(&self, req: &ControlRequest, who: &str, result: &Result<Value>) {
        let what = serde_json::to_string(req).unwrap_or_default();
        match result {
            Ok(_) => {
                tracing::warn!(target: "audit", op = req.op(), client = %who, request = %what, "destructive operation done")
            }
            Err(e) => {
                tracing::warn!(target: "audit", op = req.op(), client = %who, request = %what, error = %e, "destructive operation refused or failed")
            }
        }
        let mut d = self.destructive.lock().unwrap_or_else(|p| p.into_inner());
        *d.entry((req.op(), result.is_ok())).or_default() += 1;
    }

    /// Count a request that could not even be parsed.
    pub fn note_bad_request(&self) {
        self.control_requests.fetch_add(1, Ordering::Relaxed);
        self.control_errors.fetch_add(1, Ordering::Relaxed);
    }

    fn execute_inner(
        &self,
        req: ControlRequest,
        progress: &(dyn Fn(Value) + Sync),
    ) -> Result<Value> {
        let on_progress = |p: sluice_replicator::Progress| {
            progress(serde_json::to_value(p).unwrap_or(Value::Null));
        };
        match req {
            ControlRequest::VolCreate { name, size_bytes } => {
                self.engine.call(Request::CreateVolume {
                    name: name.clone(),
                    size_bytes,
                })?;
                let mut v = self.volume(&name)?;
                let pool = self.space()?.total_bytes;
                if size_bytes > pool {
                    v.warnings.push(format!(
                        "volume {name} ({}) is larger than the pool ({}): it is thin, and writes to it fail with ENOSPC once the pool is full",
                        fmt_bytes(size_bytes),
                        fmt_bytes(pool)
                    ));
                }
                to_value(&v)
            }
            ControlRequest::VolList => to_value(&self.views(&self.volumes()?)),
            ControlRequest::VolClone {
                origin,
                snapshot,
                name,
            } => {
                self.engine.call(Request::CloneVolume {
                    origin: origin.clone(),
                    snapshot: snapshot.clone(),
                    name: name.clone(),
                })?;
                to_value(&self.volume(&name)?)
            }
            ControlRequest::VolResize { name, size_bytes } => {
                self.repl.vol_resize(&name, size_bytes)?;
                let mut v = self.volume(&name)?;
                let pool = self.space()?.total_bytes;
                if size_bytes > pool {
                    v.warnings.push(format!(
                        "volume {name} ({}) is larger than the pool ({}): it is thin, and writes to it fail with ENOSPC once the pool is full",
                        fmt_bytes(size_bytes),
                        fmt_bytes(pool)
                    ));
                }
                let writers = self.nbd_metrics.writers_of(&name);
                if writers > 0 {
                    // NBD fixes an export's size at the handshake.
                    v.warnings.push(format!(
                        "{writers} NBD client(s) have {name} open: they see the new size when they reconnect"
                    ));
                }
                to_value(&v)
            }
            ControlRequest::VolDelete { name, force } => {
                to_value(&self.repl.vol_delete(&name, force)?)
            }
            ControlRequest::VolExport { volume, peers } => {
                self.repl.set_export(&volume, peers)?;
                let peers = self.repl.exports().get(&volume).cloned();
                Ok(serde_json::json!({ "volume": volume, "peers": peers }))
            }
            ControlRequest::VolExports => Ok(serde_json::json!({
                "exports": self.repl.exports(),
                "exports_required": self.repl.exports_required(),
            })),
            ControlRequest::VolRetain { volume, keep } => {
                self.repl.set_retention(&volume, keep)?;
                to_value(&self.volume(&volume)?)
            }
            ControlRequest::QtreeCreate {
                volume,
                name,
                size_bytes,
            } => {
                self.engine.call(Request::CreateQtree {
                    volume: volume.clone(),
                    name,
                    size_bytes,
                })?;
                to_value(&self.volume(&volume)?)
            }
            ControlRequest::SnapCreate { volume, name } => {
                to_value(&SnapshotView::from(&self.repl.snap_create(&volume, &name)?))
            }
            ControlRequest::SnapList { volume } => {
                let mut views = Vec::new();
                let mut snaps = self.repl.snapshot_locks(&volume)?;
                snaps.sort_by_key(|(s, _)| (s.gen, s.created_unix_ms));
                for (s, locks) in snaps {
                    let mut v = SnapshotView::from(&s);
                    v.locks = locks.iter().map(to_value).collect::<Result<_>>()?;
                    views.push(v);
                }
                to_value(&views)
            }
            ControlRequest::SnapDelete {
                volume,
                name,
                force,
            } => {
                self.repl.snap_delete(&volume, &name, force)?;
                Ok(serde_json::json!({ "volume": volume, "deleted": name, "forced": force }))
            }
            ControlRequest::SnapRollback {
                volume,
                name,
                destroy_newer,
                force,
            } => {
                let writers = self.nbd_metrics.writers_of(&volume);
                if writers > 0 && !force {
                    return Err(NodeError::OpenForWriting { volume, writers });
                }
                let report = self.repl.snap_rollback(&volume, &name, destroy_newer)?;
                let mut v = to_value(&report)?;
                v["nbd_writers"] = serde_json::json!(writers);
                Ok(v)
            }
            ControlRequest::Prune {
                volume,
                keep,
                dry_run,
            } => to_value(
                &self
                    .repl
                    .prune_with_progress(&volume, keep, dry_run, &on_progress)?,
            ),
            ControlRequest::Diff {
                volume,
                qtree,
                base,
                target,
            } => {
                let ns = NsName {
                    volume: volume.clone(),
                    qtree: qtree.clone(),
                };
                let extents = match self.engine.call(Request::Diff {
                    ns,
                    base: base.clone(),
                    target: target.clone(),
                })? {
                    Reply::Diff(d) => d,
                    _ => return Err(unexpected("diff")),
                };
                let sum = |k: DiffKind| -> u64 {
                    extents
                        .iter()
                        .filter(|e| e.kind == k)
                        .map(|e| e.len_blocks * BS)
                        .sum()
                };
                to_value(&DiffView {
                    volume,
                    qtree,
                    base,
                    target,
                    extents: extents.len(),
                    data_bytes: sum(DiffKind::Data),
                    trim_bytes: sum(DiffKind::Trim),
                })
            }
            ControlRequest::Status => to_value(&self.status()?),
            ControlRequest::MirrorCreate {
                dst_volume,
                source,
                dst_qtree,
                every_secs,
                follow,
                throttle_bps,
                keep,
            } => {
                let (source_addr, source_volume, source_qtree) = parse_source(&source)?;
                let spec = MirrorSpec {
                    dst_volume,
                    source_addr,
                    source_volume,
                    source_qtree,
                    dst_qtree,
                    every: every_secs.map(std::time::Duration::from_secs),
                    follow,
                    throttle_bps,
                    keep,
                };
                to_value(&self.repl.mirror_create_with_progress(spec, &on_progress)?)
            }
            ControlRequest::MirrorUpdate { dst } => {
                to_value(&self.repl.mirror_update(&dst, &on_progress)?)
            }
            ControlRequest::MirrorStatus => to_value(&self.repl.mirror_status()),
            ControlRequest::MirrorDestinations => to_value(&self.repl.mirror_destinations()?),
            ControlRequest::MirrorBreak { dst } => {
                self.repl.mirror_break(&dst)?;
                Ok(serde_json::json!({ "dst": dst, "state": "broken" }))
            }
            ControlRequest::MirrorResync { dst, force } => {
                to_value(&self.repl.mirror_resync(&dst, force, &on_progress)?)
            }
            ControlRequest::MirrorDelete { dst } => {
                let released = self.repl.mirror_delete(&dst)?;
                Ok(
                    serde_json::json!({ "dst": dst, "deleted": true, "released_upstream": released }),
                )
            }
            ControlRequest::MirrorRetarget {
                dst,
                source,
                allow_full,
            } => {
                let (addr, volume, qtree) = parse_source(&source)?;
                to_value(&self.repl.mirror_retarget(
                    &dst,
                    &addr,
                    &volume,
                    qtree.as_deref(),
                    allow_full,
                    &on_progress,
                )?)
            }
            ControlRequest::LockList => to_value(&self.repl.lock_list()),
            ControlRequest::LockAdd {
                volume,
                snapshot,
                owner,
                text,
            } => to_value(
                &self
                    .repl
                    .lock_add(&volume, &snapshot, &owner, text.as_deref())?,
            ),
            ControlRequest::LockRelease {
                volume,
                snapshot,
                holder,
            } => {
                self.repl.lock_release(&volume, &snapshot, &holder)?;
                Ok(
                    serde_json::json!({ "volume": volume, "snapshot": snapshot, "released": holder }),
                )
            }
        }
    }

    pub fn volumes(&self) -> Result<Vec<VolumeInfo>> {
        match self.engine.call(Request::ListVolumes)? {
            Reply::Volumes(v) => Ok(v),
            _ => Err(unexpected("volume list")),
        }
    }

    fn volume(&self, name: &str) -> Result<VolumeView> {
        let vols: Vec<VolumeInfo> = self
            .volumes()?
            .into_iter()
            .filter(|v| v.name == name)
            .collect();
        self.views(&vols)
            .pop()
            .ok_or_else(|| sluice_engine::error::Error::NoSuchVolume(name.to_string()).into())
    }

    /// Volumes as the control API shows them, each with its retention
    /// policy (the policies read once).
    fn views(&self, vols: &[VolumeInfo]) -> Vec<VolumeView> {
        let keep = self.repl.retention();
        vols.iter()
            .map(|v| VolumeView {
                keep: keep.get(&v.name).copied(),
                ..VolumeView::from(v)
            })
            .collect()
    }

    /// Snapshots of a volume, oldest first.
    pub fn snapshots(&self, volume: &str) -> Result<Vec<SnapshotInfo>> {
        match self.engine.call(Request::ListSnapshots {
            volume: volume.to_string(),
        })? {
            Reply::Snapshots(mut s) => {
                s.sort_by_key(|s| (s.gen, s.created_unix_ms));
                Ok(s)
            }
            _ => Err(unexpected("snapshot list")),
        }
    }

    pub fn space(&self) -> Result<SpaceView> {
        match self.engine.call(Request::Space)? {
            Reply::Space(s) => Ok(SpaceView {
                total_bytes: s.total_blocks * BS,
                used_bytes: s.used_blocks * BS,
                free_bytes: s.free_blocks * BS,
                pending_free_bytes: s.pending_free_blocks * BS,
                poisoned_shards: s.poisoned_shards,
            }),
            _ => Err(unexpected("space")),
        }
    }

    pub fn status(&self) -> Result<StatusView> {
        let vols = self.volumes()?;
        let space = self.space()?;
        let problems = self.problems(&space);
        Ok(StatusView {
            node: self.info.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            data: self.info.data.clone(),
            listen: self.info.listen.clone(),
            nbd: self.info.nbd.clone(),
            uptime_s: self.started.elapsed().as_secs(),
            shards: self.engine.shard_count(),
            space,
            volumes: vols.len(),
            snapshots: vols.iter().map(|v| v.snapshot_count).sum(),
            healthy: problems.is_empty(),
            problems,
        })
    }

    /// What `status` reports as needing the operator.
    fn problems(&self, space: &SpaceView) -> Vec<String> {
        let mut out = Vec::new();
        if space.poisoned_shards > 0 {
            out.push(format!(
                "the pool refuses writes after a device error ({} of {} shard(s); the log says which: \"pool poisoned\"); reads still work; fix the device, then restart the node",
                space.poisoned_shards,
                self.engine.shard_count()
            ));
        }
        for m in self.repl.mirror_status() {
            if let Some(e) = &m.last_error {
                out.push(format!("mirror {}: its last transfer failed: {e}", m.dst));
            }
            if let (Some(every), Some(lag)) = (m.every_secs, m.lag_ms) {
                if m.state != "broken" && lag / 1000 > 2 * every {
                    out.push(format!(
                        "mirror {}: {} s behind its source, past twice its schedule (every {every} s)",
                        m.dst,
                        lag / 1000
                    ));
                }
            }
        }
        let stale: Vec<String> = self
            .repl
            .stale_locks()
            .into_iter()
            .map(|(origin, text)| format!("{origin} ({text})"))
            .collect();
        if !stale.is_empty() {
            let mut who = stale.clone();
            who.sort();
            who.dedup();
            out.push(format!(
                "{} stale lock(s), not renewed within their lease: {}; `lock list` shows them, `lock release` ends them",
                stale.len(),
                who.join(", ")
            ));
        }
        let free = space.free_bytes + space.pending_free_bytes;
        if space.total_bytes > 0 && free * 100 < space.total_bytes * SPACE_LOW_PERCENT {
            out.push(format!(
                "space low: {} free of {} (below {SPACE_LOW_PERCENT} %)",
                fmt_bytes(free),
                fmt_bytes(space.total_bytes)
            ));
        }
        out
    }
}

/// `ADDR/VOL[/QTREE]` (ADDR is `host:port`, as given to the source's
/// `--listen`) into its parts.
pub fn parse_source(source: &str) -> Result<(String, String, Option<String>)> {
    let bad = |why: &str| {
        NodeError::Invalid(format!(
            "bad mirror source {source:?}: {why}; expected ADDR/VOL or ADDR/VOL/QTREE, e.g. 127.0.0.1:7000/vol0"
        ))
    };
    let (addr, rest) = source.split_once('/').ok_or_else(|| bad("no volume"))?;
    if addr.is_empty() || !addr.contains(':') {
        return Err(bad("the address needs host:port"));
    }
    let mut parts = rest.split('/');
    let vol = parts
        .next()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| bad("empty volume"))?;
    let qtree = match parts.next() {
        None => None,
        Some("") => return Err(bad("empty qtree")),
        Some(q) => Some(q.to_string()),
    };
    if parts.next().is_some() {
        return Err(bad("too many parts"));
    }
    Ok((addr.to_string(), vol.to_string(), qtree))
}
