//! `sluice-bench engine`: the cases, in order, on one device.
//!
//! Order matters because every tool overwrites the device: fio first, then
//! the bare UringDevice, then a freshly formatted pool for the engine. Reads
//! run only after the working set was written (a loop device over a sparse
//! file would otherwise answer holes without touching the disk).
//!
//! With `--shards N` (N > 1), after those: the multi-volume cases, N volumes
//! named so that they land one per shard, each with its own driver thread at
//! QD32 over `span / N`: fio with N jobs (one offset range each), then the
//! engine on a freshly formatted 1-shard pool, on an N-shard pool with
//! pinned shard threads and on one with unpinned threads (each pool formatted
//! with `sharded::format_uring`, so only the shard count and pinning differ).

use crate::drive::{self, Load, Pattern};
use crate::fio::{self, FioJob};
use crate::loopdev::BenchDevice;
use crate::report::{Measured, Report, Row, SnapRow};
use crate::EngineArgs;
use anyhow::{bail, Context, Result};
use sluice_engine::api::{NsName, Reply, Request};
use sluice_engine::device::uring::{UringDevice, UringOptions};
use sluice_engine::device::BLOCK_SIZE;
use sluice_engine::pool::{FormatOptions, Pool};
use sluice_engine::shard::{Engine, EngineHandle, EngineOptions};
use sluice_engine::sharded::{self, shard_of};
use std::path::Path;
use std::time::{Duration, Instant};

struct Case {
    name: &'static str,
    pattern: Pattern,
    bs_blocks: usize,
    qd: usize,
    snapshot_every: Option<Duration>,
}

const RANDWRITE: Case = Case {
    name: "4K randwrite QD32",
    pattern: Pattern::RandWrite,
    bs_blocks: 1,
    qd: 32,
    snapshot_every: None,
};
const RANDREAD: Case = Case {
    name: "4K randread QD32",
    pattern: Pattern::RandRead,
    bs_blocks: 1,
    qd: 32,
    snapshot_every: None,
};
const SEQWRITE: Case = Case {
    name: "128K seqwrite QD16",
    pattern: Pattern::SeqWrite,
    bs_blocks: 32,
    qd: 16,
    snapshot_every: None,
};
const SNAPWRITE: Case = Case {
    name: "4K randwrite QD32 + snapshot/s",
    pattern: Pattern::RandWrite,
    bs_blocks: 1,
    qd: 32,
    snapshot_every: Some(Duration::from_secs(1)),
};

fn load(case: &Case, args: &EngineArgs) -> Load {
    Load {
        pattern: case.pattern,
        bs_blocks: case.bs_blocks,
        qd: case.qd,
        span_blocks: args.span / BLOCK_SIZE as u64,
        runtime: Duration::from_secs(args.runtime),
        snapshot_every: case.snapshot_every,
        count: None,
    }
}

fn fill_load(args: &EngineArgs) -> Load {
    Load {
        count: Some(args.span / (128 << 10)),
        ..load(&SEQWRITE, args)
    }
}

fn row(case: &Case, tool: &str, m: Measured) -> Row {
    Row {
        case: case.name.to_string(),
        tool: tool.to_string(),
        m,
        ratio_to_fio: None,
    }
}

fn progress(args: &EngineArgs, what: &str) {
    if !args.json {
        eprintln!("... {what}");
    }
}

pub fn run(args: &EngineArgs) -> Result<()> {
    let seed = args
        .seed
        .or_else(|| {
            std::env::var("SLUICE_SEED")
                .ok()
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("SLUICE_SEED={seed}");
    let dev = match &args.device {
        Some(p) => BenchDevice::given(p)?,
        None => BenchDevice::temporary(args.size, args.dir.as_deref())?,
    };
    let mut report = Report {
        device: dev.description.clone(),
        runtime_s: args.runtime,
        rows: Vec::new(),
        snapshots: Vec::new(),
        notes: Vec::new(),
    };
    if args.span > args.size / 2 {
        bail!("--span ({}) must be at most half of --size ({}): the engine needs room to copy on write", args.span, args.size);
    }

    // 1. fio.
    if args.no_fio {
        report.notes.push("fio skipped (--no-fio)".to_string());
    } else if !fio::available() {
        report
            .notes
            .push("fio not found: install it with `apt-get install -y fio`".to_string());
    } else {
        for case in [&SEQWRITE, &RANDWRITE] {
            progress(args, &format!("fio {}", case.name));
            let m = fio::run(&dev.path, &fio_job(case, args, true))?;
            report.rows.push(row(case, "fio", m));
        }
        progress(args, "fio fill");
        fio::run(
            &dev.path,
            &FioJob {
                rw: "write",
                ..fio_job(&SEQWRITE, args, false)
            },
        )?;
        progress(args, &format!("fio {}", RANDREAD.name));
        let m = fio::run(&dev.path, &fio_job(&RANDREAD, args, true))?;
        report.rows.push(row(&RANDREAD, "fio", m));
    }

    // 2. The bare device.
    {
        let mut udev = UringDevice::open(&dev.path, UringOptions::default())
            .with_context(|| format!("cannot open {}", dev.path.display()))?;
        if !udev.direct_io() {
            report
                .notes
                .push("the device refused O_DIRECT: buffered I/O numbers".to_string());
        }
        for case in [&SEQWRITE, &RANDWRITE] {
            progress(args, &format!("device {}", case.name));
            let m = drive::device(&mut udev, &load(case, args), seed)?;
            report.rows.push(row(case, "device", m));
        }
        progress(args, "device fill");
        drive::device(&mut udev, &fill_load(args), seed)?;
        progress(args, &format!("device {}", RANDREAD.name));
        let m = drive::device(&mut udev, &load(&RANDREAD, args), seed)?;
        report.rows.push(row(&RANDREAD, "device", m));
    }

    // 3. The engine on a fresh pool.
    {
        let udev = UringDevice::open(&dev.path, UringOptions::default())
            .with_context(|| format!("cannot open {}", dev.path.display()))?;
        let mut pool =
            Pool::format(udev, FormatOptions::default()).context("cannot format the bench pool")?;
        pool.execute(Request::CreateVolume {
            name: "bench".to_string(),
            size_bytes: args.span,
        })
        .context("cannot create the bench volume")?;
        let handle = Engine::start(pool, EngineOptions::default());
        let result = engine_cases(&handle, args, seed, &mut report);
        let shut = handle.shutdown();
        result?;
        shut.context("engine shutdown")?;
    }

    // 4. Several volumes at once, on N shards and on one.
    if args.shards > 1 {
        shard_cases(&dev.path, args, seed, &mut report)?;
    }

    report.fill_ratios();
    if args.shards > 1 {
        shard_notes(args.shards, &mut report);
    }
    for r in report.rows.iter().filter(|r| r.tool == "engine") {
        if let Some(x) = r.ratio_to_fio {
            let target = if r.case.contains("snapshot") {
                0.85
            } else {
                0.9
            };
            if x < target {
                report.notes.push(format!(
                    "{}: engine at {x:.2} x fio, below the {target} target by {:.0} %",
                    r.case,
                    (target - x) / target * 100.0
                ));
            }
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        report.print_table();
    }
    Ok(())
}

fn fio_job<'a>(case: &Case, args: &EngineArgs, time_based: bool) -> FioJob<'a> {
    FioJob {
        rw: match case.pattern {
            Pattern::RandWrite => "randwrite",
            Pattern::RandRead => "randread",
            Pattern::SeqWrite => "write",
        },
        bs_bytes: case.bs_blocks * BLOCK_SIZE,
        iodepth: case.qd,
        size_bytes: args.span,
        runtime_s: args.runtime,
        time_based,
    }
}

fn engine_cases(
    handle: &EngineHandle,
    args: &EngineArgs,
    seed: u64,
    report: &mut Report,
) -> Result<()> {
    for case in [&SEQWRITE, &RANDWRITE] {
        progress(args, &format!("engine {}", case.name));
        let (m, _) = drive::engine(handle, "bench", &load(case, args), seed)?;
        report.rows.push(row(case, "engine", m));
    }
    progress(args, "engine fill");
    drive::engine(handle, "bench", &fill_load(args), seed)?;
    handle
        .call(Request::Flush)
        .context("flush after the fill")?;
    progress(args, &format!("engine {}", RANDREAD.name));
    let (m, _) = drive::engine(handle, "bench", &load(&RANDREAD, args), seed)?;
    report.rows.push(row(&RANDREAD, "engine", m));
    progress(args, &format!("engine {}", SNAPWRITE.name));
    let (m, snaps) = drive::engine(handle, "bench", &load(&SNAPWRITE, args), seed)?;
    report.rows.push(row(&SNAPWRITE, "engine", m));
    if !snaps.is_empty() {
        let mut s = snaps.clone();
        s.sort_unstable();
        report.notes.push(format!(
            "snapshots taken during the write load: {}, create latency p50 {} us, max {} us",
            s.len(),
            s[s.len() / 2],
            s[s.len() - 1]
        ));
    }

    // Snapshot create and diff: a small and a huge thin volume.
    for (label, size_bytes) in [("1 GiB", 1u64 << 30), ("1 TiB", 1u64 << 40)] {
        progress(args, &format!("snapshot and diff on a {label} volume"));
        report
            .snapshots
            .push(snapshot_case(handle, label, size_bytes, seed)?);
    }
    Ok(())
}

fn call(handle: &EngineHandle, req: Request) -> Result<Reply> {
    handle.call(req).map_err(anyhow::Error::from)
}

fn snapshot_case(
    handle: &EngineHandle,
    label: &str,
    size_bytes: u64,
    seed: u64,
) -> Result<SnapRow> {
    const CHANGED_BLOCKS: u64 = 1000;
    const ROUNDS: usize = 5;
    let volume = format!("snap-{}", label.replace(' ', ""));
    call(
        handle,
        Request::CreateVolume {
            name: volume.clone(),
            size_bytes,
        },
    )
    .with_context(|| format!("cannot create the {label} thin volume"))?;
    let span_blocks = size_bytes / BLOCK_SIZE as u64;
    let churn = |round: u64| -> Result<()> {
        let load = Load {
            pattern: Pattern::RandWrite,
            bs_blocks: 1,
            qd: 32,
            span_blocks,
            runtime: Duration::from_secs(3600),
            snapshot_every: None,
            count: Some(CHANGED_BLOCKS),
        };
        drive::engine(handle, &volume, &load, seed ^ round).map(|_| ())
    };
    let mut create_us = Vec::new();
    let mut diff_us = 0.0;
    let mut extents = 0;
    for round in 0..ROUNDS {
        churn(round as u64)?;
        let name = format!("s{round}");
        let t0 = Instant::now();
        call(
            handle,
            Request::CreateSnapshot {
                volume: volume.clone(),
                name,
                id: None,
                created_unix_ms: None,
            },
        )?;
        create_us.push(t0.elapsed().as_secs_f64() * 1e6);
        if round >= 1 {
            let t0 = Instant::now();
            let reply = call(
                handle,
                Request::Diff {
                    ns: NsName::volume(&volume),
                    base: Some(format!("s{}", round - 1)),
                    target: format!("s{round}"),
                },
            )?;
            diff_us = t0.elapsed().as_secs_f64() * 1e6;
            if let Reply::Diff(x) = reply {
                extents = x.len();
            }
        }
    }
    create_us.sort_by(f64::total_cmp);
    Ok(SnapRow {
        volume_size: label.to_string(),
        snapshot_create_us_p50: create_us[create_us.len() / 2],
        snapshot_create_us_max: create_us[create_us.len() - 1],
        changed_blocks: CHANGED_BLOCKS,
        diff_us,
        diff_extents: extents,
    })
}

/// One volume name per shard of an `n`-shard pool: for shard `i`, the first
/// `bench-{k}` (k = 0, 1, ...) that `shard_of` puts there.
fn shard_volumes(n: usize) -> Result<Vec<String>> {
    let mut names: Vec<Option<String>> = vec![None; n];
    for k in 0..1_000_000u32 {
        let name = format!("bench-{k}");
        let slot = &mut names[shard_of(&name, n)];
        if slot.is_none() {
            *slot = Some(name);
            if names.iter().all(Option::is_some) {
                return Ok(names.into_iter().flatten().collect());
            }
        }
    }
    bail!("no volume names found for every one of {n} shards")
}

fn multi_name(case: &Case, n: usize) -> String {
    format!("{} x {n} volumes", case.name)
}

/// `case` for one of the drivers: its volume is `per_volume` bytes.
fn multi_load(case: &Case, args: &EngineArgs, per_volume: u64) -> Load {
    Load {
        span_blocks: per_volume / BLOCK_SIZE as u64,
        ..load(case, args)
    }
}

/// `engine x1shard`, `engine xNshard` (pinned shard threads, the default)
/// or `engine xNshard unpinned`.
fn tool_name(shards: u32, pinned: bool) -> String {
    if shards == 1 || pinned {
        format!("engine x{shards}shard")
    } else {
        format!("engine x{shards}shard unpinned")
    }
}

/// The multi-volume cases (`--shards N`, N > 1): fio with N jobs, then the
/// engine on a 1-shard pool, an N-shard pool pinned and one unpinned.
fn shard_cases(dev: &Path, args: &EngineArgs, seed: u64, report: &mut Report) -> Result<()> {
    let n = args.shards as usize;
    // Whole 128 KiB fill requests per volume.
    let per_volume = args.span / n as u64 / (128 << 10) * (128 << 10);
    if per_volume == 0 {
        bail!(
            "--span ({}) split over {n} volumes leaves less than 128 KiB each",
            args.span
        );
    }
    let volumes = shard_volumes(n)?;
    let (wname, rname) = (multi_name(&RANDWRITE, n), multi_name(&RANDREAD, n));
    let placed: Vec<String> = volumes
        .iter()
        .enumerate()
        .map(|(i, v)| format!("{v} on shard {i}"))
        .collect();
    let with_fio = !args.no_fio && fio::available();
    report.notes.push(format!(
        "x {n} volumes: {} of {n} ({} MiB each), one driver thread each at QD32, latency over all drivers, IOPS summed{}",
        placed.join(", "),
        per_volume >> 20,
        if with_fio {
            format!("; fio: --numjobs={n}, --offset_increment={per_volume}, --group_reporting")
        } else {
            String::new()
        }
    ));

    if with_fio {
        progress(args, &format!("fio {wname}"));
        let job = FioJob {
            size_bytes: per_volume,
            ..fio_job(&RANDWRITE, args, true)
        };
        let m = fio::run_jobs(dev, &job, n)?;
        report.rows.push(named_row(&wname, "fio", m));
        progress(args, &format!("fio fill x {n} jobs"));
        let fill = FioJob {
            rw: "write",
            size_bytes: per_volume,
            ..fio_job(&SEQWRITE, args, false)
        };
        fio::run_jobs(dev, &fill, n)?;
        progress(args, &format!("fio {rname}"));
        let job = FioJob {
            size_bytes: per_volume,
            ..fio_job(&RANDREAD, args, true)
        };
        let m = fio::run_jobs(dev, &job, n)?;
        report.rows.push(named_row(&rname, "fio", m));
    }

    for (shards, pinned) in [(1, true), (args.shards, true), (args.shards, false)] {
        let tool = tool_name(shards, pinned);
        let (w, r) = multi_engine(dev, &tool, shards, pinned, &volumes, per_volume, args, seed)
            .with_context(|| format!("{tool}: multi-volume cases"))?;
        report.rows.push(named_row(&wname, &tool, w));
        report.rows.push(named_row(&rname, &tool, r));
    }
    Ok(())
}

fn named_row(case: &str, tool: &str, m: Measured) -> Row {
    Row {
        case: case.to_string(),
        tool: tool.to_string(),
        m,
        ratio_to_fio: None,
    }
}

/// A fresh `shards`-shard pool on `dev` with `volumes`, driven at once:
/// random write, a fill, random read.
#[allow(clippy::too_many_arguments)]
fn multi_engine(
    dev: &Path,
    tool: &str,
    shards: u32,
    pinned: bool,
    volumes: &[String],
    per_volume: u64,
    args: &EngineArgs,
    seed: u64,
) -> Result<(Measured, Measured)> {
    let ring = UringOptions::default();
    let udev = UringDevice::open(dev, ring.clone())
        .with_context(|| format!("cannot open {}", dev.display()))?;
    let pools = sharded::format_uring(udev, shards, FormatOptions::default(), &ring)
        .with_context(|| format!("cannot format the bench pool as {shards} shards"))?;
    let opts = EngineOptions {
        pin_threads: pinned,
        ..EngineOptions::default()
    };
    let handle = Engine::start_sharded(pools, opts).context("cannot start the shards")?;
    let result = multi_engine_cases(&handle, tool, volumes, per_volume, args, seed);
    let shut = handle.shutdown();
    let measured = result?;
    shut.context("engine shutdown")?;
    Ok(measured)
}

fn multi_engine_cases(
    handle: &EngineHandle,
    tool: &str,
    volumes: &[String],
    per_volume: u64,
    args: &EngineArgs,
    seed: u64,
) -> Result<(Measured, Measured)> {
    let n = volumes.len();
    for v in volumes {
        call(
            handle,
            Request::CreateVolume {
                name: v.clone(),
                size_bytes: per_volume,
            },
        )
        .with_context(|| format!("cannot create the bench volume {v}"))?;
    }
    progress(args, &format!("{tool} {}", multi_name(&RANDWRITE, n)));
    let w = drive::engine_volumes(
        handle,
        volumes,
        &multi_load(&RANDWRITE, args, per_volume),
        seed,
    )?;
    progress(args, &format!("{tool} fill x {n} volumes"));
    let fill = Load {
        count: Some(per_volume / (128 << 10)),
        ..multi_load(&SEQWRITE, args, per_volume)
    };
    drive::engine_volumes(handle, volumes, &fill, seed)?;
    handle
        .call(Request::Flush)
        .context("flush after the fill")?;
    progress(args, &format!("{tool} {}", multi_name(&RANDREAD, n)));
    let r = drive::engine_volumes(
        handle,
        volumes,
        &multi_load(&RANDREAD, args, per_volume),
        seed,
    )?;
    Ok((w, r))
}

/// The N-shard / 1-shard IOPS ratio of each multi-volume case.
fn shard_notes(n: u32, report: &mut Report) {
    let iops = |case: &str, tool: &str| {
        report
            .rows
            .iter()
            .find(|r| r.case == case && r.tool == tool)
            .map(|r| r.m.iops)
    };
    let one = tool_name(1, true);
    let mut notes = Vec::new();
    for case in [&RANDWRITE, &RANDREAD] {
        let name = multi_name(case, n as usize);
        let Some(base) = iops(&name, &one).filter(|&i| i > 0.0) else {
            continue;
        };
        let ratios: Vec<String> = [(true, "pinned"), (false, "unpinned")]
            .iter()
            .filter_map(|&(pinned, label)| {
                iops(&name, &tool_name(n, pinned)).map(|i| format!("{:.2} {label}", i / base))
            })
            .collect();
        notes.push(format!(
            "{name}: {n}-shard / 1-shard IOPS {}",
            ratios.join(", ")
        ));
    }
    report.notes.extend(notes);
}
