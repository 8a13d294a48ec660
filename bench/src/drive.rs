//! Closed-loop load generators: keep `qd` requests in flight for a fixed
//! time, record each request's latency (submit to completion) in an
//! hdrhistogram.
//!
//! Two targets: the bare [`UringDevice`] (what the device layer costs over
//! fio) and the engine through an [`EngineHandle`] (what the product costs),
//! the latter also as several drivers at once, one thread per volume
//! ([`engine_volumes`]: histograms merged, IOPS summed).

use crate::report::Measured;
use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sluice_engine::api::{NsName, Reply, Request};
use sluice_engine::device::uring::UringDevice;
use sluice_engine::device::{AlignedBuf, BlockDevice, BufPool, IoKind, IoRequest, BLOCK_SIZE};
use sluice_engine::shard::EngineHandle;
use std::time::{Duration, Instant};

/// What a case does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    RandWrite,
    RandRead,
    SeqWrite,
}

#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub pattern: Pattern,
    pub bs_blocks: usize,
    pub qd: usize,
    /// Addresses stay in `[0, span_blocks)`.
    pub span_blocks: u64,
    pub runtime: Duration,
    /// Take a snapshot this often (engine only).
    pub snapshot_every: Option<Duration>,
    /// Stop after this many requests (a fill) instead of at `runtime`.
    pub count: Option<u64>,
}

struct Addr {
    rng: SmallRng,
    next_seq: u64,
}

impl Addr {
    fn new(seed: u64) -> Addr {
        Addr {
            rng: SmallRng::seed_from_u64(seed),
            next_seq: 0,
        }
    }
    fn next(&mut self, load: &Load) -> u64 {
        let slots = (load.span_blocks / load.bs_blocks as u64).max(1);
        let slot = match load.pattern {
            Pattern::SeqWrite => {
                let s = self.next_seq % slots;
                self.next_seq += 1;
                s
            }
            _ => self.rng.gen_range(0..slots),
        };
        slot * load.bs_blocks as u64
    }
}

fn hist() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).context("histogram bounds")
}

fn summarize(h: &Histogram<u64>, ops: u64, elapsed: Duration, bs_blocks: usize) -> Measured {
    let secs = elapsed.as_secs_f64().max(1e-9);
    Measured {
        iops: ops as f64 / secs,
        mb_s: ops as f64 * (bs_blocks * BLOCK_SIZE) as f64 / secs / 1e6,
        p50_us: h.value_at_quantile(0.50) as f64 / 1000.0,
        p99_us: h.value_at_quantile(0.99) as f64 / 1000.0,
        p999_us: h.value_at_quantile(0.999) as f64 / 1000.0,
    }
}

/// Drive the bare device.
pub fn device(dev: &mut UringDevice, load: &Load, seed: u64) -> Result<Measured> {
    let mut addr = Addr::new(seed);
    let mut h = hist()?;
    let mut started = vec![Instant::now(); load.qd];
    let kind = match load.pattern {
        Pattern::RandRead => IoKind::Read,
        _ => IoKind::Write { fua: false },
    };
    let begin = Instant::now();
    let initial = load.qd.min(load.count.unwrap_or(u64::MAX) as usize);
    for (tag, t0) in started.iter_mut().enumerate().take(initial) {
        let mut buf = AlignedBuf::zeroed(load.bs_blocks);
        buf.as_mut_slice()[0] = tag as u8;
        *t0 = Instant::now();
        dev.submit(IoRequest {
            tag: tag as u64,
            kind,
            pba: addr.next(load),
            buf: Some(buf),
        });
    }
    let mut ops = 0u64;
    let mut submitted = initial as u64;
    let mut out = Vec::with_capacity(load.qd);
    let deadline = begin + load.runtime;
    while dev.in_flight() > 0 {
        out.clear();
        dev.complete(1, &mut out).context("device failed")?;
        let now = Instant::now();
        for c in out.drain(..) {
            if let Err(e) = c.result {
                bail!("device request failed: {e}");
            }
            let tag = c.tag as usize;
            let Some(t0) = started.get(tag).copied() else {
                bail!("unknown tag {tag}")
            };
            h.record(now.duration_since(t0).as_nanos() as u64).ok();
            ops += 1;
            if more(load, now, deadline, submitted) {
                submitted += 1;
                started[tag] = now;
                dev.submit(IoRequest {
                    tag: c.tag,
                    kind,
                    pba: addr.next(load),
                    buf: c.buf,
                });
            }
        }
    }
    Ok(summarize(&h, ops, begin.elapsed(), load.bs_blocks))
}

fn more(load: &Load, now: Instant, deadline: Instant, submitted: u64) -> bool {
    match load.count {
        Some(n) => submitted < n,
        None => now < deadline,
    }
}

const SNAP_TAG: u64 = u64::MAX;
const DELETE_TAG: u64 = u64::MAX - 1;

/// Drive the engine through its handle: `qd` requests in flight on one
/// completion channel; the engine thread drains them in batches.
pub fn engine(
    handle: &EngineHandle,
    volume: &str,
    load: &Load,
    seed: u64,
) -> Result<(Measured, Vec<u64>)> {
    let run = engine_run(handle, volume, load, seed, None)?;
    Ok((
        summarize(&run.hist, run.ops, run.elapsed, load.bs_blocks),
        run.snap_lat_us,
    ))
}

/// One driver per volume, each on its own thread with `load` (its own
/// `qd` in flight), all started together. The histograms are merged
/// (percentiles over every request of every driver); IOPS and MB/s are the
/// drivers' own rates summed. Driver `i` uses seed `seed ^ i * φ`
/// (driver 0: `seed`, as [`engine`] would).
pub fn engine_volumes(
    handle: &EngineHandle,
    volumes: &[String],
    load: &Load,
    seed: u64,
) -> Result<Measured> {
    let start = std::sync::Barrier::new(volumes.len());
    let runs: Vec<Result<Run>> = std::thread::scope(|s| {
        let threads: Vec<_> = volumes
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let start = &start;
                let seed = seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                s.spawn(move || engine_run(handle, v, load, seed, Some(start)))
            })
            .collect();
        threads
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a driver thread panicked")))
            })
            .collect()
    });
    let mut hist = hist()?;
    let (mut iops, mut mb_s) = (0.0, 0.0);
    for (run, v) in runs.into_iter().zip(volumes) {
        let run = run.with_context(|| format!("driver of volume {v}"))?;
        hist.add(&run.hist).context("merging histograms")?;
        let m = summarize(&run.hist, run.ops, run.elapsed, load.bs_blocks);
        iops += m.iops;
        mb_s += m.mb_s;
    }
    Ok(Measured {
        iops,
        mb_s,
        ..summarize(&hist, 0, Duration::from_secs(1), load.bs_blocks)
    })
}

/// What one closed-loop driver measured.
struct Run {
    hist: Histogram<u64>,
    ops: u64,
    elapsed: Duration,
    snap_lat_us: Vec<u64>,
}

fn engine_run(
    handle: &EngineHandle,
    volume: &str,
    load: &Load,
    seed: u64,
    start: Option<&std::sync::Barrier>,
) -> Result<Run> {
    // Before anything that can fail, so no driver waits for one that quit.
    if let Some(b) = start {
        b.wait();
    }
    let mut addr = Addr::new(seed);
    let mut h = hist()?;
    let ns = NsName::volume(volume);
    let image = sluice_engine::api::Image {
        ns: ns.clone(),
        snapshot: None,
    };
    let (done_tx, done_rx) = crossbeam_channel::unbounded();
    let mut started = vec![Instant::now(); load.qd];
    // Recycled write buffers, as fio reuses its own: the driver neither
    // allocates nor zeroes 128 KiB per write.
    let bufs = BufPool::new(load.bs_blocks, load.qd * 2);
    let make = |addr: &mut Addr, tag: u64| -> Request {
        let lba = addr.next(load);
        match load.pattern {
            Pattern::RandRead => Request::Read {
                image: image.clone(),
                lba,
                len_blocks: load.bs_blocks as u32,
            },
            _ => {
                let mut data = bufs.take();
                data.as_mut_slice()[..8].copy_from_slice(&tag.to_le_bytes());
                data.as_mut_slice()[8..16].copy_from_slice(&lba.to_le_bytes());
                Request::Write {
                    ns: ns.clone(),
                    lba,
                    data,
                    fua: false,
                    replica: false,
                }
            }
        }
    };
    let begin = Instant::now();
    let deadline = begin + load.runtime;
    let initial = load.qd.min(load.count.unwrap_or(u64::MAX) as usize);
    for (tag, t0) in started.iter_mut().enumerate().take(initial) {
        *t0 = Instant::now();
        handle.submit(make(&mut addr, tag as u64), tag as u64, done_tx.clone());
    }
    let mut in_flight = initial;
    let mut submitted = initial as u64;
    let mut ops = 0u64;
    let mut snap_lat_us = Vec::new();
    let mut snaps_taken = 0u64;
    let mut snap_started: Option<Instant> = None;
    let mut next_snap = load.snapshot_every.map(|d| begin + d);
    while in_flight > 0 {
        let (tag, result) = done_rx.recv().context("engine reply channel closed")?;
        let now = Instant::now();
        in_flight -= 1;
        match tag {
            SNAP_TAG => {
                result.context("snapshot during the run")?;
                if let Some(t0) = snap_started.take() {
                    snap_lat_us.push(now.duration_since(t0).as_micros() as u64);
                }
                // Keep the last two snapshots; delete the older ones.
                if snaps_taken >= 3 {
                    let name = format!("bench-{}", snaps_taken - 3);
                    handle.submit(
                        Request::DeleteSnapshot {
                            volume: volume.to_string(),
                            name,
                        },
                        DELETE_TAG,
                        done_tx.clone(),
                    );
                    in_flight += 1;
                }
                continue;
            }
            DELETE_TAG => {
                result.context("snapshot delete during the run")?;
                continue;
            }
            _ => {}
        }
        match result {
            Ok(Reply::Done | Reply::Data(_)) => {}
            Ok(other) => bail!("unexpected engine reply {other:?}"),
            Err(e) => bail!("engine request failed: {e}"),
        }
        let Some(t0) = started.get(tag as usize).copied() else {
            bail!("unknown tag {tag}")
        };
        h.record(now.duration_since(t0).as_nanos() as u64).ok();
        ops += 1;
        if more(load, now, deadline, submitted) {
            submitted += 1;
            started[tag as usize] = now;
            handle.submit(make(&mut addr, tag), tag, done_tx.clone());
            in_flight += 1;
            if let (Some(at), Some(every)) = (next_snap, load.snapshot_every) {
                if now >= at && snap_started.is_none() {
                    let name = format!("bench-{snaps_taken}");
                    snaps_taken += 1;
                    snap_started = Some(now);
                    let req = Request::CreateSnapshot {
                        volume: volume.to_string(),
                        name,
                        id: None,
                        created_unix_ms: None,
                    };
                    handle.submit(req, SNAP_TAG, done_tx.clone());
                    in_flight += 1;
                    next_snap = Some(at + every);
                }
            }
        }
    }
    Ok(Run {
        hist: h,
        ops,
        elapsed: begin.elapsed(),
        snap_lat_us,
    })
}
