//! `sluice demo` (engine stage): runs the engine on a file-backed pool in a
//! temporary folder and shows what it does -- volumes, a qtree, writes,
//! copy-on-write snapshots, pruning, space accounting and incremental
//! diffs. The cascade demo (several nodes, soft locks) grows from this once
//! the node and the replicator land.
//!
//! Everything runs through the real stack: `UringDevice` (io_uring, O_DIRECT
//! where the folder's filesystem allows it), the shard thread, the pool.

use anyhow::{bail, Context, Result};
use sluice_engine::api::{DiffKind, NsName, Reply, Request, SnapshotInfo};
use sluice_engine::device::uring::{UringDevice, UringOptions};
use sluice_engine::device::{AlignedBuf, BLOCK_SIZE};
use sluice_engine::shard::{Engine, EngineHandle, EngineOptions};
use sluice_engine::{FormatOptions, Pool};

const POOL_BYTES: u64 = 512 << 20;
const VOL_BYTES: u64 = 256 << 20;
const QTREE_BYTES: u64 = 64 << 20;
const ROUNDS: u64 = 6;
const KEEP: usize = 2;

pub fn run() -> Result<()> {
    let dir = tempfile::tempdir().context("creating a temporary folder")?;
    let path = dir.path().join("pool.img");
    let dev = UringDevice::create(&path, POOL_BYTES, UringOptions::default())
        .with_context(|| format!("creating pool file {}", path.display()))?;
    println!(
        "pool: {} ({} MiB, io_uring, O_DIRECT {})",
        path.display(),
        POOL_BYTES >> 20,
        if dev.direct_io() {
            "on"
        } else {
            "refused here: buffered"
        }
    );
    let pool = Pool::format(dev, FormatOptions::default()).context("formatting the pool")?;
    let engine = Engine::start_executor(pool, EngineOptions::default());
    let result = scenario(&engine);
    engine.shutdown().context("shutting the engine down")?;
    result
}

fn scenario(e: &EngineHandle) -> Result<()> {
    e.call(Request::CreateVolume {
        name: "vol0".into(),
        size_bytes: VOL_BYTES,
    })?;
    e.call(Request::CreateQtree {
        volume: "vol0".into(),
        name: "db".into(),
        size_bytes: QTREE_BYTES,
    })?;
    println!(
        "volume vol0 ({} MiB) with qtree vol0/db ({} MiB)\n",
        VOL_BYTES >> 20,
        QTREE_BYTES >> 20
    );

    let vol = NsName::volume("vol0");
    let vol_blocks = VOL_BYTES / BLOCK_SIZE as u64;
    let mut rng_state = 0x5eed_u64;
    let mut next = move || {
        // xorshift: a fixed, printable workload.
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state
    };

    println!("round  wrote   snapshot  diff vs previous (blocks)  pruned");
    let mut prev: Option<String> = None;
    for round in 1..=ROUNDS {
        // A first full-ish write, then ~1 % random changes per round.
        let writes = if round == 1 { 4096 } else { vol_blocks / 100 };
        for _ in 0..writes {
            let lba = next() % vol_blocks;
            let mut buf = AlignedBuf::zeroed(1);
            buf.as_mut_slice()[..8].copy_from_slice(&(lba ^ round).to_le_bytes());
            e.call(Request::Write {
                ns: vol.clone(),
                lba,
                data: buf,
                fua: false,
                replica: false,
            })?;
        }
        let db = AlignedBuf::from_slice(format!("db record of round {round}").as_bytes());
        e.call(Request::Write {
            ns: NsName::qtree("vol0", "db"),
            lba: round,
            data: db,
            fua: false,
            replica: false,
        })?;
        if round == 4 {
            e.call(Request::Trim {
                ns: vol.clone(),
                lba: 0,
                len_blocks: 512,
                replica: false,
            })?;
        }
        let name = format!("s{round}");
        e.call(Request::CreateSnapshot {
            volume: "vol0".into(),
            name: name.clone(),
            id: None,
            created_unix_ms: None,
        })?;
        let (data, trims) = match e.call(Request::Diff {
            ns: vol.clone(),
            base: prev.clone(),
            target: name.clone(),
        })? {
            Reply::Diff(extents) => extents.iter().fold((0, 0), |(d, t), x| match x.kind {
                DiffKind::Data => (d + x.len_blocks, t),
                DiffKind::Trim => (d, t + x.len_blocks),
            }),
            other => bail!("unexpected reply to Diff: {other:?}"),
        };
        let pruned = prune(e, KEEP)?;
        println!(
            "{round:>5}  {writes:>5}   {name:<8}  {data:>6} data + {trims:>4} trim{}  {}",
            if prev.is_none() { " (baseline)" } else { "" },
            if pruned.is_empty() {
                "-".to_string()
            } else {
                pruned.join(",")
            }
        );
        prev = Some(name);
    }

    println!("\nsnapshots kept (prune --keep {KEEP}):");
    println!(
        "name  id                                    gen  referenced MiB  unique MiB  digest(vol0)"
    );
    for s in snapshots(e)? {
        let digest = s
            .digests
            .iter()
            .find(|(q, _)| q.is_none())
            .map(|(_, d)| *d)
            .unwrap_or(0);
        println!(
            "{:<4}  {}  {:>4}  {:>14.1}  {:>10.1}  {:032x}",
            s.name,
            s.id,
            s.gen,
            mib(s.referenced_blocks),
            mib(s.unique_blocks),
            digest
        );
    }
    let reply = e.call(Request::Read {
        image: sluice_engine::api::Image {
            ns: NsName::qtree("vol0", "db"),
            snapshot: Some(format!("s{}", ROUNDS - 1)),
        },
        lba: ROUNDS - 1,
        len_blocks: 1,
    })?;
    if let Reply::Data(buf) = reply {
        let text: String = buf
            .as_slice()
            .iter()
            .take_while(|&&b| b != 0)
            .map(|&b| b as char)
            .collect();
        println!(
            "\nread vol0/db@s{} block {}: {text:?}",
            ROUNDS - 1,
            ROUNDS - 1
        );
    }
    if let Reply::Space(sp) = e.call(Request::Space)? {
        println!(
            "space: {:.1} MiB used, {:.1} MiB free of {:.1} MiB",
            mib(sp.used_blocks),
            mib(sp.free_blocks),
            mib(sp.total_blocks)
        );
    }
    Ok(())
}

fn snapshots(e: &EngineHandle) -> Result<Vec<SnapshotInfo>> {
    match e.call(Request::ListSnapshots {
        volume: "vol0".into(),
    })? {
        Reply::Snapshots(s) => Ok(s),
        other => bail!("unexpected reply to ListSnapshots: {other:?}"),
    }
}

/// Delete the oldest snapshots beyond `keep`; returns their names.
fn prune(e: &EngineHandle, keep: usize) -> Result<Vec<String>> {
    let snaps = snapshots(e)?;
    let excess = snaps.len().saturating_sub(keep);
    let mut gone = Vec::new();
    for s in snaps.into_iter().take(excess) {
        e.call(Request::DeleteSnapshot {
            volume: "vol0".into(),
            name: s.name.clone(),
        })?;
        gone.push(s.name);
    }
    Ok(gone)
}

fn mib(blocks: u64) -> f64 {
    (blocks * BLOCK_SIZE as u64) as f64 / (1u64 << 20) as f64
}
