//! sluice-bench: the benchmark harness.
//!
//! `engine`: fio, the bare io_uring device and the engine, in one run on one
//! device (a loop device on a file by default), for the cases of the design's
//! performance table, plus snapshot-create and diff cost on small and huge
//! thin volumes; with `--shards N`, also N volumes driven at once on an
//! N-shard and on a 1-shard pool, against fio with N jobs. `nbd`: against
//! qemu-nbd. `replicate`: mirrors against btrfs send/receive and raw TCP
//! (see `replicate.rs`). `control`: control-plane costs as snapshot, lock
//! and relationship populations grow (`control.rs`). `soak`: a soak run with fault injection on real
//! nodes (`soak/`, docs/SOAK.md); unlike the benchmarks it passes or fails.
//!
//! Benchmarks report numbers; they never pass or fail on a time.

mod control;
mod drive;
mod enginecase;
mod fio;
mod loopdev;
mod nbd;
mod replicate;
mod report;
mod soak;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "sluice-bench",
    about = "Sluice benchmarks against fio, qemu-nbd and btrfs"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Engine vs fio on the same device (needs root for the loop device).
    Engine(EngineArgs),
    /// NBD: fio's nbd engine against a Sluice export and qemu-nbd (needs root).
    Nbd(nbd::NbdArgs),
    /// Replication: Sluice mirrors vs btrfs send/receive vs raw TCP (needs root).
    Replicate(replicate::ReplicateArgs),
    /// Control plane: snapshot, lock and mirror costs as populations grow.
    Control(control::ControlArgs),
    /// Soak: real nodes, a workload, faults from a seed, checks; non-zero on a violation.
    Soak(soak::SoakArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct EngineArgs {
    /// Benchmark this block device or file instead of a fresh loop device.
    /// Everything on it is overwritten.
    #[arg(long)]
    pub device: Option<PathBuf>,
    /// Size of the fresh loop device's backing file, e.g. 4G, 512M.
    #[arg(long, default_value = "4G", value_parser = parse_size)]
    pub size: u64,
    /// Folder for the backing file (default: the system temp folder).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Seconds per case.
    #[arg(long, default_value_t = 10)]
    pub runtime: u64,
    /// Bytes the random and sequential cases address (the working set).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub span: u64,
    /// Skip fio even when it is installed.
    #[arg(long)]
    pub no_fio: bool,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Seed of the random addresses (default: $SLUICE_SEED, else random; printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// With N > 1, after the other cases: N volumes (one per shard) driven
    /// at once on an N-shard pool (pinned and unpinned), on a 1-shard pool,
    /// and fio with N jobs. 1: only the single-volume cases.
    #[arg(long, default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=sluice_engine::sharded::SHARDS_MAX as i64))]
    pub shards: u32,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        Some('T' | 't') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|e| format!("bad size {s:?}: {e}"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} overflows"))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Engine(args) => enginecase::run(&args),
        Cmd::Nbd(args) => nbd::run(&args),
        Cmd::Replicate(args) => replicate::run(&args),
        Cmd::Control(args) => control::run(&args),
        Cmd::Soak(args) => {
            if !soak::run(&args)? {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}
