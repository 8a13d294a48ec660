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
use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::pool::Pool;
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

/// What the engine thread needs from the pool it owns. [`Pool`] implements
/// it (in pool.rs); the trait only keeps the thread loop independent of the device type.
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
    /// Spawn the engine thread that owns `pool`; CP every `cp_interval`.
    pub fn start<D: BlockDevice + 'static>(pool: Pool<D>, opts: EngineOptions) -> EngineHandle {
        Self::start_executor(pool, opts)
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Image, NsName};
    use crate::device::sim::{CrashMode, SimDevice, SimHandle};
    use crate::device::AlignedBuf;
    use crate::pool::FormatOptions;

    const BLOCKS: u64 = 1 << 16;

    fn seed() -> u64 {
        let s = std::env::var("SLUICE_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(rand::random::<u64>);
        eprintln!("SLUICE_SEED={s}");
        s
    }

    fn started(opts: EngineOptions) -> (EngineHandle, SimHandle) {
        let dev = SimDevice::new(BLOCKS);
        let sim = dev.handle();
        let mut pool = Pool::format(dev, FormatOptions::default()).expect("format");
        pool.execute(Request::CreateVolume {
            name: "v".to_string(),
            size_bytes: 64 << 20,
        })
        .expect("volume");
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
        let s = seed();
        let (h, sim) = started(EngineOptions {
            batch_max: 16,
            ..EngineOptions::default()
        });
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let h = h.clone();
                std::thread::spawn(move || {
                    use rand::{Rng, SeedableRng};
                    let mut rng = rand::rngs::SmallRng::seed_from_u64(s ^ t);
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
    fn periodic_checkpoint_runs_when_idle() {
        let (h, sim) = started(EngineOptions {
            cp_interval: Duration::from_millis(20),
            ..EngineOptions::default()
        });
        h.call(write(1, 1)).expect("write");
        let flushes_before = sim.counters().flushes;
        // Poll (no timing assertion): the CP must come without any request.
        let mut waited = 0;
        while sim.counters().flushes == flushes_before || sim.unflushed_writes() > 0 {
            std::thread::sleep(Duration::from_millis(10));
            waited += 1;
            assert!(waited < 6000, "no periodic consistency point in a minute");
        }
        let dev = sim.crash_image(CrashMode::DropAll, 0);
        let mut pool = Pool::open(dev).expect("reopen");
        assert_eq!(data(pool.execute(read(1))), block(1, 1).as_slice());
        h.shutdown().expect("shutdown");
    }

    #[test]
    fn dropping_every_handle_stops_the_thread() {
        let (h, _) = started(EngineOptions::default());
        h.call(write(0, 1)).expect("write");
        let thread = h.thread.lock().expect("lock").take().expect("thread");
        drop(h);
        thread
            .join()
            .expect("engine thread exits when its channel closes");
    }
}
