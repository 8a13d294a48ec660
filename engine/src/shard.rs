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
//! What several shards (one per core, each with its own ring) need, the next
//! step: the pool's volumes split across shards, each shard owning its
//! volumes' maps and bit planes and a share of the free space (an allocation
//! group per shard, so allocation needs no cross-shard lock); a router in the
//! handle that sends a request to the shard owning its volume (requests on
//! different volumes never meet); cross-volume operations (`Space`,
//! `ListVolumes`, pool attributes) fanned out and merged; and a pool-wide CP
//! as a two-phase step: every shard writes and flushes its metadata, then one
//! shard writes the superblock that names every shard's roots. Nothing in
//! this file assumes a single shard beyond `Engine::start` taking one pool.

use crate::api::{Reply, Request};
use crate::error::{Error, Result};
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
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
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            cp_interval: Duration::from_secs(5),
            batch_max: 128,
            queue_max: 4096,
        }
    }
}

/// What the engine thread needs from the pool it owns. `Pool` implements
/// it (once the pool lands); the trait only keeps the thread loop independent of the device type.
pub trait Executor: Send + 'static {
    fn execute_batch(&mut self, reqs: Vec<Request>) -> Vec<Result<Reply>>;
    fn checkpoint(&mut self) -> Result<()>;
}

type Done = Sender<(u64, Result<Reply>)>;

enum Msg {
    Call { req: Request, tag: u64, done: Done },
    Shutdown { done: Sender<Result<()>> },
}

/// Starts engine threads.
pub struct Engine;

impl Engine {
    /// Same, for anything that executes requests like a pool.
    pub fn start_executor<X: Executor>(exec: X, opts: EngineOptions) -> EngineHandle {
        let (tx, rx) = bounded(opts.queue_max.max(1));
        let thread = std::thread::Builder::new()
            .name("sluice-engine".to_string())
            .spawn(move || run(exec, rx, opts));
        let thread = match thread {
            Ok(t) => Some(t),
            Err(e) => {
                // The receiver was moved into the failed spawn and dropped:
                // every call on this handle answers ShutDown.
                tracing::error!(error = %e, "cannot spawn the engine thread");
                None
            }
        };
        EngineHandle {
            tx,
            thread: Arc::new(Mutex::new(thread)),
        }
    }
}

/// A cheap, cloneable way to talk to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: Sender<Msg>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EngineHandle({} queued)", self.tx.len())
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

    /// Queue one request; its reply arrives on `done` with `tag`. Many
    /// requests in flight through one `done` channel are how a caller gets
    /// queue depth.
    pub fn submit(&self, req: Request, tag: u64, done: Sender<(u64, Result<Reply>)>) {
        if let Err(e) = self.tx.send(Msg::Call { req, tag, done }) {
            if let Msg::Call { tag, done, .. } = e.into_inner() {
                let _ = done.send((tag, Err(Error::ShutDown)));
            }
        }
    }

    /// Run a final consistency point and stop the thread; later calls get
    /// [`Error::ShutDown`]. Calling it again returns `Ok(())`.
    pub fn shutdown(&self) -> Result<()> {
        let (done, rx) = bounded(1);
        let result = match self.tx.send(Msg::Shutdown { done }) {
            Ok(()) => rx.recv().unwrap_or(Ok(())),
            Err(_) => Ok(()),
        };
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread {
            if t.join().is_err() {
                tracing::error!("the engine thread panicked");
            }
        }
        result
    }
}

fn run<X: Executor>(mut exec: X, rx: Receiver<Msg>, opts: EngineOptions) {
    let batch_max = opts.batch_max.max(1);
    let mut next_cp = Instant::now() + opts.cp_interval;
    let mut dirty = false;
    let mut reqs: Vec<Request> = Vec::with_capacity(batch_max);
    let mut replies: Vec<(u64, Done)> = Vec::with_capacity(batch_max);
    loop {
        let wait = next_cp.saturating_duration_since(Instant::now());
        let first = match rx.recv_timeout(wait) {
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
        };
        let mut shutdown = None;
        if let Some(m) = first {
            let mut next = Some(m);
            while let Some(m) = next.take() {
                match m {
                    Msg::Call { req, tag, done } => {
                        reqs.push(req);
                        replies.push((tag, done));
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
        if !reqs.is_empty() {
            dirty = true;
            let n = reqs.len();
            let results = exec.execute_batch(std::mem::take(&mut reqs));
            debug_assert_eq!(results.len(), n, "one result per request");
            let mut results = results.into_iter();
            for (tag, done) in replies.drain(..) {
                let r = results.next().unwrap_or(Err(Error::ShutDown));
                // A caller that stopped listening is not the engine's problem.
                let _ = done.send((tag, r));
            }
        }
        if let Some(done) = shutdown {
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
            Msg::Shutdown { done } => {
                let _ = done.send(Ok(()));
            }
        }
    }
}
