//! The shard thread: the one thread that owns a `Pool` and serves
//! [`Request`]s to it from crossbeam channels.
//!
//! What it owns: the pool (and through it the device and its ring). Nothing
//! else touches the pool, so the I/O path takes no locks.
//!
//! The loop: block on the request channel (with a timeout so the periodic
//! consistency point runs even when idle), then drain up to
//! [`EngineOptions::batch_max`] more queued requests without blocking and
//! hand them to `Pool::execute_batch` together, so their data I/O reaches
//! the device in one submission: the queue depth the device sees is the
//! number of callers waiting, not one.
//!
//! Invariants kept:
//! - Every request gets exactly one reply, also when the engine shuts down
//!   (those get [`Error::ShutDown`]); requests are executed in the order
//!   they were received.
//! - A consistency point runs every `cp_interval` if anything ran since the
//!   last one, and once more at shutdown; a failed CP is logged and the pool
//!   (which poisons itself on a failed flush) keeps answering reads.
//! - The channel is bounded ([`EngineOptions::queue_max`]): callers block
//!   instead of queueing without limit.
//!
//! Requests in flight: a batch of only plain (non-FUA) writes, or of only
//! reads, is started ([`Executor::start`]): its data goes to the device
//! and the loop goes on to the next batch without waiting, up to
//! [`FLIGHT_BATCHES`] batches; each answer goes out as soon as its own data
//! completes ([`Executor::reap`]): a write's once every earlier write is
//! applied too (start order), a read's at once. So the device keeps its
//! queue while the loop applies metadata and answers, and the callers
//! refill it one request at a time, where it used to drain to empty
//! between batches. Any other
//! request (a FUA write, a trim, a snapshot, a flush, a periodic or final
//! CP) waits until every started request is answered: it sees every
//! started write applied, as before.
//!
//! Several shards ([`Engine::start_sharded`]): a sharded pool (see
//! `sharded.rs`) is N region pools, each a complete pool on its own region
//! of the device with its own device handle (for io_uring: its own ring).
//! Each region pool gets its own thread, `sluice-shard-{i}`, pinned (best
//! effort; [`EngineOptions::pin_threads`]) to core `i % ncpus`, running the
//! same loop on its own channel.
//! The [`EngineHandle`] holds one sender per shard and routes:
//! - requests naming a volume (create, qtree, read-only, read, write, trim,
//!   snapshots, diff) go to shard `format::shard_of(volume, N)` only: a
//!   hash of the name, no lock and no table lookup on the I/O path;
//!   duplicate names meet on that one shard, which refuses them. The one
//!   exception is a clone, which lives on its origin's shard (it shares
//!   the origin snapshot's blocks): the handle keeps a placement table of
//!   such volumes (learned at start from the shards' volume lists), read
//!   only while it is not empty; volume create, clone and delete run one
//!   at a time, so a new name is checked on its hash shard and in the
//!   table at once;
//! - `Flush`, `ListVolumes` and `Space` go to every shard; the last shard
//!   to answer merges the parts (flush: first error by shard index, else
//!   done; volumes: merged and sorted by name; space: summed) and sends the
//!   one reply, so `submit` never blocks on a fan-out either. The merge
//!   state is the only thing shards share, and only for these requests;
//! - pool attributes (`SetAttr`, `GetAttr`) live on shard 0.
//!
//! Volume ids stay unique across shards: a pool reports `local_id * N +
//! shard_index` (pool.rs). `shutdown` stops every shard (each takes its
//! final CP) and returns the first error.
//!
//! An inline engine ([`Engine::start_inline`]) has no thread: a request
//! runs on the submitting thread under one mutex. The cascade simulation
//! uses it, so a scenario's engines cost no thread hand-offs and their
//! order is the callers' order.
//!
//! One shard is exactly the unsharded engine: `start_sharded` with one pool
//! is `start` (thread `sluice-engine`, not pinned), and the handle sends
//! every request to it without hashing or merging.

pub use crate::api::Executor;
use crate::api::{Answer, Reply, Request, SpaceInfo, VolumeInfo};
use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::format::shard_of;
use crate::pool::Pool;
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How the engine thread runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineOptions {
    /// Time between periodic consistency points.
    pub cp_interval: Duration,
    /// Most requests executed in one batch.
    pub batch_max: usize,
    /// Most requests waiting in the channel before callers block.
    pub queue_max: usize,
    /// Pin shard `i` to core `i % ncpus` when there are several shards.
    /// Measured on 2 cores shared with fio and the NBD threads, pinning
    /// cost about 40 % of 4K random-write IOPS (a pinned shard waits for
    /// its one busy core; docs/BENCHMARKS.md); turn it off where the
    /// shards do not have cores to themselves.
    pub pin_threads: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            cp_interval: Duration::from_secs(5),
            batch_max: 128,
            queue_max: 4096,
            pin_threads: true,
        }
    }
}

type Done = Sender<(u64, Result<Reply>)>;

enum Msg {
    Call {
        req: Request,
        tag: u64,
        done: Done,
    },
    /// This shard's part of a fan-out request.
    Part {
        req: Request,
        merge: Arc<Merge>,
        index: usize,
    },
    Shutdown {
        done: Sender<Result<()>>,
    },
}

/// Where one executed request's result goes.
enum ReplyTo {
    Caller(u64, Done),
    Part(Arc<Merge>, usize),
}

impl ReplyTo {
    fn send(self, r: Result<Reply>) {
        match self {
            // A caller that stopped listening is not the engine's problem.
            ReplyTo::Caller(tag, done) => {
                let _ = done.send((tag, r));
            }
            ReplyTo::Part(merge, index) => merge.deliver(index, r),
        }
    }
}

/// The requests that go to every shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FanOut {
    Flush,
    ListVolumes,
    Space,
    CheckInvariants,
}

impl FanOut {
    fn request(self) -> Request {
        match self {
            FanOut::Flush => Request::Flush,
            FanOut::ListVolumes => Request::ListVolumes,
            FanOut::Space => Request::Space,
            FanOut::CheckInvariants => Request::CheckInvariants,
        }
    }

    /// One reply from every shard's part, in shard order.
    fn merge(self, parts: Vec<Result<Reply>>) -> Result<Reply> {
        let mut volumes: Vec<VolumeInfo> = Vec::new();
        let mut space = SpaceInfo {
            total_blocks: 0,
            used_blocks: 0,
            free_blocks: 0,
            pending_free_blocks: 0,
            poisoned_shards: 0,
        };
        for (i, part) in parts.into_iter().enumerate() {
            match (self, part?) {
                (FanOut::Flush | FanOut::CheckInvariants, Reply::Done) => {}
                (FanOut::ListVolumes, Reply::Volumes(v)) => volumes.extend(v),
                (FanOut::Space, Reply::Space(s)) => {
                    space.total_blocks += s.total_blocks;
                    space.used_blocks += s.used_blocks;
                    space.free_blocks += s.free_blocks;
                    space.pending_free_blocks += s.pending_free_blocks;
                    space.poisoned_shards += s.poisoned_shards;
                }
                (_, other) => {
                    return Err(Error::Invalid(format!(
                        "shard {i} answered {other:?} to {self:?}"
                    )))
                }
            }
        }
        Ok(match self {
            FanOut::Flush | FanOut::CheckInvariants => Reply::Done,
            FanOut::ListVolumes => {
                volumes.sort_by(|a, b| a.name.cmp(&b.name));
                Reply::Volumes(volumes)
            }
            FanOut::Space => Reply::Space(space),
        })
    }
}

/// A fan-out request in flight: collects one part per shard; the last part
/// in sends the merged reply. If parts are lost (a shard thread died), the
/// drop of the last reference answers `ShutDown`: one reply per request,
/// always.
struct Merge {
    kind: FanOut,
    tag: u64,
    done: Done,
    parts: Mutex<MergeParts>,
}

struct MergeParts {
    results: Vec<Option<Result<Reply>>>,
    remaining: usize,
    sent: bool,
}

impl Merge {
    fn new(kind: FanOut, tag: u64, done: Done, shards: usize) -> Merge {
        Merge {
            kind,
            tag,
            done,
            parts: Mutex::new(MergeParts {
                results: (0..shards).map(|_| None).collect(),
                remaining: shards,
                sent: false,
            }),
        }
    }

    fn deliver(&self, index: usize, r: Result<Reply>) {
        let complete = {
            let mut p = self.parts.lock().unwrap_or_else(|e| e.into_inner());
            match p.results.get_mut(index) {
                Some(slot @ None) => {
                    *slot = Some(r);
                    p.remaining -= 1;
                }
                _ => {
                    debug_assert!(false, "part {index} delivered twice or out of range");
                    return;
                }
            }
            if p.remaining == 0 && !p.sent {
                p.sent = true;
                Some(std::mem::take(&mut p.results))
            } else {
                None
            }
        };
        if let Some(results) = complete {
            let parts = results
                .into_iter()
                .map(|r| r.unwrap_or(Err(Error::ShutDown)))
                .collect();
            let _ = self.done.send((self.tag, self.kind.merge(parts)));
        }
    }
}

impl Drop for Merge {
    fn drop(&mut self) {
        let p = self.parts.get_mut().unwrap_or_else(|e| e.into_inner());
        if !p.sent {
            p.sent = true;
            let _ = self.done.send((self.tag, Err(Error::ShutDown)));
        }
    }
}

/// Where the handle sends a request.
enum Route {
    One(usize),
    All(FanOut),
}

fn route(req: &Request, shards: usize, placement: &Placement) -> Route {
    if shards <= 1 {
        return Route::One(0);
    }
    let by = |volume: &str| Route::One(placement.shard(volume, shards));
    match req {
        Request::CreateVolume { name, .. }
        | Request::DeleteVolume { name }
        | Request::ResizeVolume { name, .. } => by(name),
        Request::CloneVolume { origin, .. } => by(origin),
        Request::CreateQtree { volume, .. }
        | Request::CreateSnapshot { volume, .. }
        | Request::DeleteSnapshot { volume, .. }
        | Request::Rollback { volume, .. }
        | Request::ListSnapshots { volume }
        | Request::ListSnapshotNames { volume }
        | Request::NewestSnapshot { volume }
        | Request::SnapshotNamesOf { volume, .. } => by(volume),
        Request::Read { image, .. } => by(&image.ns.volume),
        Request::Write { ns, .. }
        | Request::Trim { ns, .. }
        | Request::Diff { ns, .. }
        | Request::DiffStats { ns, .. }
        | Request::SetReadOnly { ns, .. } => by(&ns.volume),
        Request::Flush => Route::All(FanOut::Flush),
        Request::ListVolumes => Route::All(FanOut::ListVolumes),
        Request::Space => Route::All(FanOut::Space),
        Request::CheckInvariants => Route::All(FanOut::CheckInvariants),
        Request::SetAttr { .. } | Request::GetAttr { .. } => Route::One(0),
    }
}

/// Where the volumes live that do not live on the shard their name hashes
/// to: clones, which live on their origin's shard (they share its blocks).
/// Learned at start from every shard's volume list, then kept by the
/// handle as clones are made and deleted. The requests that take or free a
/// volume name ([`is_naming`]) hold `names` while they run, so a name is
/// checked and taken atomically across shards; every other request reads
/// the table only when it is not empty.
#[derive(Default)]
struct Placement {
    any: AtomicBool,
    placed: RwLock<HashMap<String, usize>>,
    names: Mutex<()>,
}

impl Placement {
    /// The shard that holds volume `name`.
    fn shard(&self, name: &str, shards: usize) -> usize {
        if self.any.load(Ordering::Acquire) {
            if let Some(&i) = self.read().get(name) {
                return i;
            }
        }
        shard_of(name, shards)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, usize>> {
        self.placed.read().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, name: &str, shard: Option<usize>) {
        let mut m = self.placed.write().unwrap_or_else(|p| p.into_inner());
        match shard {
            Some(i) => {
                m.insert(name.to_string(), i);
            }
            None => {
                m.remove(name);
            }
        }
        self.any.store(!m.is_empty(), Ordering::Release);
    }
}

/// Requests that take or free a volume name: on a pool of several shards
/// they run one at a time ([`Placement`]).
fn is_naming(req: &Request) -> bool {
    matches!(
        req,
        Request::CreateVolume { .. } | Request::CloneVolume { .. } | Request::DeleteVolume { .. }
    )
}

/// Run `req` on shard `i` and wait for its reply.
fn call_shard(shards: &[Sender<Msg>], i: usize, req: Request) -> Result<Reply> {
    let (done, rx) = bounded(1);
    let tx = shards.get(i).ok_or(Error::ShutDown)?;
    tx.send(Msg::Call { req, tag: 0, done })
        .map_err(|_| Error::ShutDown)?;
    rx.recv().map_or(Err(Error::ShutDown), |(_, r)| r)
}

/// A naming request on a pool of several shards, run to its end under
/// `placement.names`: a new name must be free on every shard (its own by
/// hash, and the placed clones); a clone goes to its origin's shard and is
/// placed there when that is not its name's shard; a deleted volume is
/// placed no more.
fn run_naming(shards: &[Sender<Msg>], placement: &Placement, req: Request) -> Result<Reply> {
    let n = shards.len();
    let _names = placement.names.lock().unwrap_or_else(|p| p.into_inner());
    let taken = |name: &str| Error::AlreadyExists {
        what: "volume",
        name: name.to_string(),
    };
    match req {
        Request::CreateVolume { ref name, .. } => {
            if placement.read().contains_key(name) {
                return Err(taken(name));
            }
            call_shard(shards, shard_of(name, n), req)
        }
        Request::CloneVolume {
            ref origin,
            ref name,
            ..
        } => {
            if placement.read().contains_key(name) {
                return Err(taken(name));
            }
            let (home, at) = (shard_of(name, n), placement.shard(origin, n));
            if home != at {
                let Reply::Volumes(vols) = call_shard(shards, home, Request::ListVolumes)? else {
                    return Err(Error::Invariant(format!(
                        "shard {home} answered a volume list with something else"
                    )));
                };
                if vols.iter().any(|v| v.name == *name) {
                    return Err(taken(name));
                }
            }
            let name = name.clone();
            let r = call_shard(shards, at, req)?;
            if home != at {
                placement.set(&name, Some(at));
            }
            Ok(r)
        }
        Request::DeleteVolume { ref name } => {
            let name = name.clone();
            let r = call_shard(shards, placement.shard(&name, n), req)?;
            placement.set(&name, None);
            Ok(r)
        }
        other => call_shard(shards, route_one(&other, n, placement), other),
    }
}

/// The one shard a request that names a volume goes to (0 otherwise).
fn route_one(req: &Request, shards: usize, placement: &Placement) -> usize {
    match route(req, shards, placement) {
        Route::One(i) => i,
        Route::All(_) => 0,
    }
}

/// Starts engine threads.
pub struct Engine;

impl Engine {
    /// Spawn the engine thread that owns `pool`; CP every `cp_interval`.
    pub fn start<D: BlockDevice + 'static>(pool: Pool<D>, opts: EngineOptions) -> EngineHandle {
        Self::start_executor(pool, opts)
    }

    /// Same, for anything that executes requests like a pool.
    pub fn start_executor<X: Executor>(exec: X, opts: EngineOptions) -> EngineHandle {
        Self::spawn_all(vec![exec], opts)
    }

    /// An engine without a thread, for deterministic simulations: every
    /// request runs on the caller's thread, under one mutex, when it is
    /// submitted. No periodic consistency point (the pool's own rules and
    /// `Flush` take them), one at `shutdown` and when the last handle goes.
    pub fn start_inline<X: Executor>(exec: X) -> EngineHandle {
        EngineHandle {
            backend: Backend::Inline(Arc::new(Inline {
                state: Mutex::new(InlineState {
                    exec: Some(Box::new(exec)),
                    dirty: false,
                }),
            })),
        }
    }

    /// One shard thread per region pool of a sharded pool (pools in shard
    /// order, as `sharded::open_sharded` returns them). Each thread is named
    /// `sluice-shard-{i}` and pinned to core `i % ncpus` when
    /// [`EngineOptions::pin_threads`] (best effort: a failure is logged).
    /// One pool: exactly [`Engine::start`].
    pub fn start_sharded<D: BlockDevice + 'static>(
        pools: Vec<Pool<D>>,
        opts: EngineOptions,
    ) -> Result<EngineHandle> {
        let n = pools.len();
        if n == 0 {
            return Err(Error::Invalid("no shards to start".into()));
        }
        for (i, p) in pools.iter().enumerate() {
            if p.shard() != (i as u32, n as u32) {
                let (index, count) = p.shard();
                return Err(Error::RegionMismatch {
                    index: i as u32,
                    reason: format!(
                        "given as shard {i} of {n}, but it is region {index} of {count}"
                    ),
                });
            }
        }
        let handle = Self::spawn_all(pools, opts);
        if let Backend::Threads {
            shards, placement, ..
        } = &handle.backend
        {
            // Clones live on their origin's shard, wherever their names hash.
            for i in 0..n {
                let Reply::Volumes(vols) = call_shard(shards, i, Request::ListVolumes)? else {
                    return Err(Error::Invariant(format!(
                        "shard {i} answered a volume list with something else"
                    )));
                };
                for v in vols.iter().filter(|v| shard_of(&v.name, n) != i) {
                    placement.set(&v.name, Some(i));
                }
            }
        }
        Ok(handle)
    }

    fn spawn_all<X: Executor>(execs: Vec<X>, opts: EngineOptions) -> EngineHandle {
        let n = execs.len();
        let cpus = std::thread::available_parallelism().map_or(1, |c| c.get());
        let mut senders = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for (i, exec) in execs.into_iter().enumerate() {
            let (tx, rx) = bounded(opts.queue_max.max(1));
            senders.push(tx);
            let opts = opts.clone();
            let name = if n == 1 {
                "sluice-engine".to_string()
            } else {
                format!("sluice-shard-{i}")
            };
            let thread = std::thread::Builder::new().name(name).spawn(move || {
                if n > 1 && opts.pin_threads {
                    pin_to_core(i, i % cpus);
                }
                run(exec, rx, opts)
            });
            match thread {
                Ok(t) => threads.push(t),
                Err(e) => {
                    // The receiver was moved into the failed spawn and
                    // dropped: every call routed to this shard answers
                    // ShutDown.
                    tracing::error!(shard = i, error = %e, "cannot spawn the engine thread");
                }
            }
        }
        EngineHandle {
            backend: Backend::Threads {
                shards: senders.into(),
                threads: Arc::new(Mutex::new(threads)),
                placement: Arc::new(Placement::default()),
            },
        }
    }
}

/// Pin the calling thread to `core`; a failure is logged, never fatal.
fn pin_to_core(shard: usize, core: usize) {
    use nix::sched::{sched_setaffinity, CpuSet};
    let mut set = CpuSet::new();
    let pinned = set
        .set(core)
        .and_then(|()| sched_setaffinity(nix::unistd::Pid::from_raw(0), &set));
    match pinned {
        Ok(()) => tracing::debug!(shard, core, "shard thread pinned"),
        Err(e) => {
            tracing::warn!(shard, core, error = %e, "cannot pin the shard thread; it runs unpinned")
        }
    }
}

/// A cheap, cloneable way to talk to the engine's shard threads (or to
/// an inline engine: [`Engine::start_inline`]).
#[derive(Clone)]
pub struct EngineHandle {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Threads {
        /// One sender per shard, in shard order.
        shards: Arc<[Sender<Msg>]>,
        threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
        placement: Arc<Placement>,
    },
    Inline(Arc<Inline>),
}

/// An engine without a thread: each request runs on the caller's thread,
/// under this mutex, in the order the callers take it.
struct Inline {
    state: Mutex<InlineState>,
}

struct InlineState {
    /// `None` once shut down.
    exec: Option<Box<dyn Executor>>,
    /// Something ran since the last consistency point.
    dirty: bool,
}

impl Inline {
    fn run(&self, req: Request) -> Result<Reply> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(exec) = st.exec.as_mut() else {
            return Err(Error::ShutDown);
        };
        let r = exec
            .execute_batch(vec![req])
            .into_iter()
            .next()
            .unwrap_or(Err(Error::ShutDown));
        st.dirty = true;
        r
    }

    fn shutdown(&self) -> Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match st.exec.take() {
            Some(mut exec) => {
                let r = exec.checkpoint();
                if let Err(e) = &r {
                    tracing::error!(error = %e, "final consistency point failed");
                }
                r
            }
            None => Ok(()),
        }
    }
}

impl Drop for Inline {
    /// The last handle gone: make what ran durable, as a shard thread does
    /// when its channel closes.
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        if let (Some(exec), true) = (st.exec.as_mut(), st.dirty) {
            if let Err(e) = exec.checkpoint() {
                tracing::error!(error = %e, "final consistency point failed");
            }
        }
    }
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.backend {
            Backend::Threads { shards, .. } => {
                let queued: usize = shards.iter().map(|s| s.len()).sum();
                write!(f, "EngineHandle({} shards, {queued} queued)", shards.len())
            }
            Backend::Inline(_) => write!(f, "EngineHandle(inline)"),
        }
    }
}

impl EngineHandle {
    /// Run one request and wait for its reply.
    pub fn call(&self, req: Request) -> Result<Reply> {
        let (done, rx) = bounded(1);
        self.submit(req, 0, done);
        match rx.recv() {
            Ok((_, r)) => r,
            Err(_) => Err(Error::ShutDown),
        }
    }

    /// Queue one request; its reply arrives on `done` with `tag`, exactly
    /// once (also for requests that go to every shard). Many requests in
    /// flight through one `done` channel are how a caller gets queue depth.
    ///
    /// On an inline engine the request runs before `submit` returns, and
    /// its reply is sent then: `done` must have room for every reply the
    /// caller has not yet received (an unbounded channel, or one as deep as
    /// the caller's queue).
    pub fn submit(&self, req: Request, tag: u64, done: Sender<(u64, Result<Reply>)>) {
        let (shards, placement) = match &self.backend {
            Backend::Threads {
                shards, placement, ..
            } => (shards, placement),
            Backend::Inline(inline) => {
                let _ = done.send((tag, inline.run(req)));
                return;
            }
        };
        if shards.len() > 1 && is_naming(&req) {
            // Control-plane requests, rare: run to their end here.
            let _ = done.send((tag, run_naming(shards, placement, req)));
            return;
        }
        match route(&req, shards.len(), placement) {
            Route::One(i) => {
                let sent = match shards.get(i) {
                    Some(tx) => tx
                        .send(Msg::Call { req, tag, done })
                        .map_err(|e| e.into_inner()),
                    None => Err(Msg::Call { req, tag, done }),
                };
                if let Err(Msg::Call { tag, done, .. }) = sent {
                    let _ = done.send((tag, Err(Error::ShutDown)));
                }
            }
            Route::All(kind) => {
                let merge = Arc::new(Merge::new(kind, tag, done, shards.len()));
                for (index, tx) in shards.iter().enumerate() {
                    let part = Msg::Part {
                        req: kind.request(),
                        merge: merge.clone(),
                        index,
                    };
                    if let Err(e) = tx.send(part) {
                        drop(e.into_inner());
                        merge.deliver(index, Err(Error::ShutDown));
                    }
                }
            }
        }
    }

    /// How many shards serve this engine.
    pub fn shard_count(&self) -> usize {
        match &self.backend {
            Backend::Threads { shards, .. } => shards.len(),
            Backend::Inline(_) => 1,
        }
    }

    /// Run a final consistency point on every shard and stop their
    /// threads; the result is the first shard's error, if any. Later calls
    /// get [`Error::ShutDown`]. Calling it again returns `Ok(())`.
    pub fn shutdown(&self) -> Result<()> {
        let (shards, threads) = match &self.backend {
            Backend::Threads {
                shards, threads, ..
            } => (shards, threads),
            Backend::Inline(inline) => return inline.shutdown(),
        };
        let waits: Vec<_> = shards
            .iter()
            .map(|tx| {
                let (done, rx) = bounded(1);
                tx.send(Msg::Shutdown { done }).ok().map(|()| rx)
            })
            .collect();
        let mut result = Ok(());
        for (i, rx) in waits.into_iter().enumerate() {
            let r = rx.map_or(Ok(()), |rx| rx.recv().unwrap_or(Ok(())));
            if let Err(e) = r {
                tracing::error!(shard = i, error = %e, "shard shutdown failed");
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        let threads = std::mem::take(&mut *threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            if t.join().is_err() {
                tracing::error!("an engine thread panicked");
            }
        }
        result
    }
}

/// Most started requests waiting for their data at once, per shard, in
/// batches of [`EngineOptions::batch_max`]: the next batch goes to the
/// device while earlier ones complete.
const FLIGHT_BATCHES: usize = 4;

/// The callers of started requests whose answers have not come yet, by
/// sequence number: `first` is the number of the front one, and the next
/// request started gets `next`. An answered slot is `None` until every
/// earlier one is answered too (reads answer out of order).
#[derive(Default)]
struct Waiting {
    slots: VecDeque<Option<ReplyTo>>,
    first: u64,
    next: u64,
}

impl Waiting {
    fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    fn len(&self) -> usize {
        self.slots.len()
    }

    /// Wait for the answers of requests about to be started; returns the
    /// sequence number of the first.
    fn push(&mut self, callers: impl IntoIterator<Item = ReplyTo>) -> u64 {
        let first = self.next;
        for to in callers {
            self.slots.push_back(Some(to));
            self.next += 1;
        }
        first
    }

    /// Send each answer to its caller.
    fn answer(&mut self, answers: Vec<Answer>) {
        for (seq, r) in answers {
            let slot = seq
                .checked_sub(self.first)
                .and_then(|i| usize::try_from(i).ok())
                .and_then(|i| self.slots.get_mut(i))
                .and_then(Option::take);
            match slot {
                Some(to) => to.send(r),
                None => tracing::error!(seq, "an answer for a request nobody waits for"),
            }
        }
        while matches!(self.slots.front(), Some(None)) {
            self.slots.pop_front();
            self.first += 1;
        }
    }

    /// Nothing will answer them any more: say so rather than hang.
    fn fail_all(&mut self) {
        for to in self.slots.drain(..).flatten() {
            to.send(Err(Error::Invariant(
                "a started request was lost without an answer".into(),
            )));
        }
        self.first = self.next;
    }
}

/// Reap every started request, answering each.
fn drain_started<X: Executor>(exec: &mut X, waiting: &mut Waiting) {
    while !waiting.is_empty() {
        if exec.in_flight() == 0 {
            waiting.fail_all();
            return;
        }
        let r = exec.reap(true);
        waiting.answer(r);
    }
}

fn run<X: Executor>(mut exec: X, rx: Receiver<Msg>, opts: EngineOptions) {
    let batch_max = opts.batch_max.max(1);
    let mut next_cp = Instant::now() + opts.cp_interval;
    let mut dirty = false;
    let mut reqs: Vec<Request> = Vec::with_capacity(batch_max);
    let mut replies: Vec<ReplyTo> = Vec::with_capacity(batch_max);
    // Callers of started requests whose answers have not come yet.
    let mut waiting = Waiting::default();
    loop {
        // With writes in flight, look for more work without blocking: the
        // device's completions are what the loop waits for then.
        let first = if waiting.is_empty() {
            let wait = next_cp.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    // Every handle is gone: make what ran durable and stop.
                    if dirty {
                        if let Err(e) = exec.checkpoint() {
                            tracing::error!(error = %e, "final consistency point failed");
                        }
                    }
                    return;
                }
            }
        } else {
            match rx.try_recv() {
                Ok(m) => Some(m),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => {
                    drain_started(&mut exec, &mut waiting);
                    if let Err(e) = exec.checkpoint() {
                        tracing::error!(error = %e, "final consistency point failed");
                    }
                    return;
                }
            }
        };
        let mut shutdown = None;
        if let Some(m) = first {
            let mut next = Some(m);
            while let Some(m) = next.take() {
                match m {
                    Msg::Call { req, tag, done } => {
                        reqs.push(req);
                        replies.push(ReplyTo::Caller(tag, done));
                    }
                    Msg::Part { req, merge, index } => {
                        reqs.push(req);
                        replies.push(ReplyTo::Part(merge, index));
                    }
                    Msg::Shutdown { done } => {
                        shutdown = Some(done);
                        break;
                    }
                }
                if reqs.len() >= batch_max {
                    break;
                }
                match rx.try_recv() {
                    Ok(m) => next = Some(m),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => {}
                }
            }
        }
        let got_work = !reqs.is_empty();
        if got_work {
            dirty = true;
            let startable = reqs
                .iter()
                .all(|r| matches!(r, Request::Write { fua: false, .. }))
                || reqs.iter().all(|r| matches!(r, Request::Read { .. }));
            if startable {
                // Room for them among the writes in flight first.
                while waiting.len() + reqs.len() > FLIGHT_BATCHES * batch_max
                    && exec.in_flight() > 0
                {
                    let r = exec.reap(true);
                    waiting.answer(r);
                }
                let first = waiting.push(replies.drain(..));
                let r = exec.start(first, std::mem::take(&mut reqs));
                waiting.answer(r);
            } else {
                // Anything else sees every started request answered.
                drain_started(&mut exec, &mut waiting);
                let n = reqs.len();
                let results = exec.execute_batch(std::mem::take(&mut reqs));
                debug_assert_eq!(results.len(), n, "one result per request");
                let mut results = results.into_iter();
                for to in replies.drain(..) {
                    to.send(results.next().unwrap_or(Err(Error::ShutDown)));
                }
            }
        }
        if !waiting.is_empty() {
            // Block on the device only when no new request came this turn.
            let r = exec.reap(!got_work && shutdown.is_none());
            waiting.answer(r);
        }
        if let Some(done) = shutdown {
            drain_started(&mut exec, &mut waiting);
            let r = exec.checkpoint();
            if let Err(e) = &r {
                tracing::error!(error = %e, "final consistency point failed");
            }
            drop(exec);
            // Refuse whatever is still queued, then close the channel.
            drop_queue(&rx);
            let _ = done.send(r);
            return;
        }
        if Instant::now() >= next_cp {
            if dirty {
                drain_started(&mut exec, &mut waiting);
                if let Err(e) = exec.checkpoint() {
                    tracing::error!(error = %e, "periodic consistency point failed");
                }
                dirty = false;
            }
            next_cp = Instant::now() + opts.cp_interval;
        }
    }
}

fn drop_queue(rx: &Receiver<Msg>) {
    while let Ok(m) = rx.try_recv() {
        match m {
            Msg::Call { tag, done, .. } => {
                let _ = done.send((tag, Err(Error::ShutDown)));
            }
            Msg::Part { merge, index, .. } => merge.deliver(index, Err(Error::ShutDown)),
            Msg::Shutdown { done } => {
                let _ = done.send(Ok(()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Image, NsName};
    use crate::device::sim::{CrashMode, SimDevice, SimHandle};
    use crate::device::AlignedBuf;
    use crate::pool::FormatOptions;

    const BLOCKS: u64 = 1 << 16;

    /// A fresh pool with a 64 MiB volume `v`.
    fn pool_with_v() -> (Pool<SimDevice>, SimHandle) {
        let dev = SimDevice::new(BLOCKS);
        let sim = dev.handle();
        let mut pool = Pool::format(dev, FormatOptions::default()).expect("format");
        pool.execute(Request::CreateVolume {
            name: "v".to_string(),
            size_bytes: 64 << 20,
        })
        .expect("volume");
        (pool, sim)
    }

    fn started(opts: EngineOptions) -> (EngineHandle, SimHandle) {
        let (pool, sim) = pool_with_v();
        (Engine::start(pool, opts), sim)
    }

    fn block(lba: u64, version: u8) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(1);
        b.as_mut_slice().fill(version);
        b.as_mut_slice()[..8].copy_from_slice(&lba.to_le_bytes());
        b
    }

    fn write(lba: u64, version: u8) -> Request {
        Request::Write {
            ns: NsName::volume("v"),
            lba,
            data: block(lba, version),
            fua: false,
            replica: false,
        }
    }

    fn read(lba: u64) -> Request {
        Request::Read {
            image: Image {
                ns: NsName::volume("v"),
                snapshot: None,
            },
            lba,
            len_blocks: 1,
        }
    }

    fn data(r: Result<Reply>) -> Vec<u8> {
        match r {
            Ok(Reply::Data(b)) => b.as_slice().to_vec(),
            other => panic!("want data, got {other:?}"),
        }
    }

    #[test]
    fn call_round_trip() {
        let (h, _) = started(EngineOptions::default());
        assert!(matches!(h.call(write(3, 7)), Ok(Reply::Done)));
        assert_eq!(data(h.call(read(3))), block(3, 7).as_slice());
        assert!(data(h.call(read(4))).iter().all(|&b| b == 0));
        h.shutdown().expect("shutdown");
    }

    #[test]
    fn many_callers_many_in_flight() {
        let s = sluice_testkit::seed("many_callers_many_in_flight");
        let (h, sim) = started(EngineOptions {
            batch_max: 16,
            ..EngineOptions::default()
        });
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let h = h.clone();
                std::thread::spawn(move || {
                    use rand::Rng;
                    let mut rng = sluice_testkit::rng(s ^ t);
                    let (tx, rx) = crossbeam_channel::unbounded();
                    // Each thread owns lbas t, t+4, t+8, ...: 64 writes in flight.
                    let lbas: Vec<u64> = (0..64).map(|i| t + 4 * i).collect();
                    let version = rng.gen_range(1..=255u8);
                    for (i, &lba) in lbas.iter().enumerate() {
                        h.submit(write(lba, version), i as u64, tx.clone());
                    }
                    let mut seen = vec![false; lbas.len()];
                    for _ in 0..lbas.len() {
                        let (tag, r) = rx.recv().expect("reply");
                        assert!(matches!(r, Ok(Reply::Done)), "seed {s}: {r:?}");
                        assert!(
                            !std::mem::replace(&mut seen[tag as usize], true),
                            "tag twice"
                        );
                    }
                    for (i, &lba) in lbas.iter().enumerate() {
                        h.submit(read(lba), i as u64, tx.clone());
                    }
                    for _ in 0..lbas.len() {
                        let (tag, r) = rx.recv().expect("reply");
                        let lba = lbas[tag as usize];
                        assert_eq!(
                            data(r),
                            block(lba, version).as_slice(),
                            "seed {s}: lba {lba}"
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("caller thread");
        }
        h.shutdown().expect("shutdown");
        assert!(sim.counters().blocks_written >= 256);
    }

    #[test]
    fn shutdown_makes_writes_durable_and_refuses_later_calls() {
        let (h, sim) = started(EngineOptions {
            cp_interval: Duration::from_secs(3600),
            ..EngineOptions::default()
        });
        for lba in 0..32 {
            h.call(write(lba, 9)).expect("write");
        }
        h.shutdown().expect("shutdown");
        assert!(matches!(h.call(read(0)), Err(Error::ShutDown)));
        let (tx, rx) = crossbeam_channel::unbounded();
        h.submit(read(0), 42, tx);
        assert!(matches!(rx.recv(), Ok((42, Err(Error::ShutDown)))));
        h.shutdown().expect("second shutdown is a no-op");
        // The final CP made every write durable: a crash now loses nothing.
        let dev = sim.crash_image(CrashMode::DropAll, 0);
        let mut pool = Pool::open(dev).expect("reopen after the crash");
        for lba in 0..32 {
            assert_eq!(
                data(pool.execute(read(lba))),
                block(lba, 9).as_slice(),
                "lba {lba}"
            );
        }
    }

    #[test]
    fn an_inline_engine_answers_in_order_on_the_callers_thread_and_shuts_down_durably() {
        let (pool, sim) = pool_with_v();
        let h = Engine::start_inline(pool);
        assert_eq!(h.shard_count(), 1);
        // Queued replies are there when submit returns, in submit order.
        let (tx, rx) = crossbeam_channel::unbounded();
        for lba in 0..8 {
            h.submit(write(lba, 3), lba, tx.clone());
        }
        h.submit(read(5), 99, tx.clone());
        let got: Vec<u64> = rx
            .try_iter()
            .map(|(tag, r)| {
                assert!(r.is_ok(), "tag {tag}: {r:?}");
                tag
            })
            .collect();
        assert_eq!(got, vec![0, 1, 2, 3, 4, 5, 6, 7, 99]);
        assert!(matches!(h.call(Request::CheckInvariants), Ok(Reply::Done)));
        h.shutdown().expect("shutdown");
        assert!(matches!(h.call(read(0)), Err(Error::ShutDown)));
        h.shutdown().expect("second shutdown is a no-op");
        let dev = sim.crash_image(CrashMode::DropAll, 0);
        let mut pool = Pool::open(dev).expect("reopen after the crash");
        assert_eq!(data(pool.execute(read(7))), block(7, 3).as_slice());
    }

    #[test]
    fn periodic_checkpoint_runs_when_idle() {
        let (h, sim) = started(EngineOptions {
            cp_interval: Duration::from_millis(20),
            ..EngineOptions::default()
        });
        h.call(write(1, 1)).expect("write");
        let flushes_before = sim.counters().flushes;
        // Poll (no timing assertion): the CP must come without any request.
        // A CP flushes twice (its blocks, then its superblock): between the
        // two the device is flushed but the write not yet durable, so the
        // wait is for a crash image that holds it.
        let mut waited = 0;
        loop {
            if sim.counters().flushes != flushes_before && sim.unflushed_writes() == 0 {
                let dev = sim.crash_image(CrashMode::DropAll, 0);
                let mut pool = Pool::open(dev).expect("reopen");
                if data(pool.execute(read(1))) == block(1, 1).as_slice() {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
            waited += 1;
            assert!(waited < 6000, "no periodic consistency point in a minute");
        }
        h.shutdown().expect("shutdown");
    }

    #[test]
    fn dropping_every_handle_stops_the_thread() {
        let (h, _) = started(EngineOptions::default());
        h.call(write(0, 1)).expect("write");
        let Backend::Threads { threads, .. } = &h.backend else {
            panic!("a threaded engine")
        };
        let thread = threads.lock().expect("lock").pop().expect("thread");
        drop(h);
        thread
            .join()
            .expect("engine thread exits when its channel closes");
    }
}
