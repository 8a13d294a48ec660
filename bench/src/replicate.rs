//! `sluice-bench replicate`: Sluice mirroring against `btrfs send | btrfs
//! receive` and against the raw TCP limit on loopback, in one run.
//!
//! 1. Sluice: three real `sluice serve` processes (A, B, C), each on its own
//!    loop device (`losetup --direct-io=on` over a file in a temp folder). A
//!    volume of `--size` on A is filled through NBD with seeded random bytes
//!    (4 MiB sequential writes) and snapshotted (`s0`); `mirror create` on B
//!    from A and on C from B are the baselines. Then `--change-pct` of the
//!    volume is rewritten with seeded 4 KiB writes at seeded distinct
//!    offsets, `s1` is taken, and `mirror update` runs on B, then on C.
//!    Then 200 `mirror update`s of B with nothing new on A, each timed
//!    from the control call (a new connection, as the CLI makes one) to
//!    its answer: p50/p99/p99.9/max from hdrhistogram (issue 14's target
//!    is 5 ms, control call included).
//! 2. btrfs: three filesystems on loop devices of the same size; a subvolume
//!    with one file holding the same bytes, a read-only snapshot, `btrfs send
//!    | btrfs receive` into the second filesystem and from there into the
//!    third; the same change (pwrite at the same offsets), a second
//!    snapshot, `btrfs send -p` the incrementals along the same chain. The
//!    stream is relayed through this process (1 MiB buffers) to count its
//!    bytes. Every clock stops after `btrfs filesystem sync` of the receiver.
//! 3. TCP: `--size` bytes through one 127.0.0.1 socket, a thread writing and
//!    a thread reading, 1 MiB buffers.
//! 4. The relay: four more nodes A -> B -> C -> D, each hop made with
//!    `mirror create --follow` on an empty volume; `--relay-size` bytes
//!    written on A, a snapshot taken, and D's `mirror status` polled (every
//!    10 ms) until D holds it. Reported: the A -> B transfer's own duration
//!    (one hop), the time from the snapshot's creation to D's commit, their
//!    ratio (issue 14's target: 1.3) and each hop's commit time.
//!
//! `--secure` says how the Sluice nodes' peer sessions run: `on` (default:
//! a shared peer secret, so authenticated and Noise-encrypted), `off`
//! (`--insecure-peers`, clear text) or `both`: step 1 runs twice on fresh
//! devices, encrypted then in clear, and the report gives both throughputs
//! of every case and their ratio (the cost of encryption, same run).
//!
//! Before every timed transfer the page cache is written back and dropped
//! (`sync; echo 3 > /proc/sys/vm/drop_caches`), so both tools read their
//! source from the device.
//!
//! Invariants: everything this run creates (processes, mounts, loop devices,
//! temp files) is owned by a guard whose `Drop` undoes it, on success and on
//! error alike; processes get SIGTERM first. Memory stays at a few MiB of
//! buffers whatever `--size` is. Numbers only: nothing passes or fails on a
//! time.

use crate::loopdev::BenchDevice;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;
use sluice::control::{Client, ControlRequest};
use sluice::nbd_client::NbdClient;
use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BLOCK: u64 = 4096;
/// Unit of the seeded fill: the bytes of unit `i` depend on (seed, i) only.
const UNIT: usize = 1 << 20;
/// Bytes per NBD write while filling, and per buffer of the btrfs fill.
const FILL_WRITE: usize = 4 << 20;
const VOLUME: &str = "vol";
/// Changed blocks read back from the last hop of each tool to check them.
const VERIFY_SAMPLES: usize = 64;

#[derive(clap::Args, Debug, Clone)]
pub struct ReplicateArgs {
    /// Volume (and btrfs file) size, e.g. 4G, 512M; a multiple of 4 MiB.
    #[arg(long, default_value = "4G", value_parser = crate::parse_size)]
    pub size: u64,
    /// Percentage of the volume rewritten (random 4 KiB blocks) before the
    /// incremental transfers.
    #[arg(long, default_value_t = 1.0)]
    pub change_pct: f64,
    /// Folder for the temp folder holding the backing files (default: the
    /// system temp folder).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// The `sluice` binary (default: `sluice` next to this benchmark's
    /// binary, i.e. `target/release/sluice`).
    #[arg(long)]
    pub sluice_bin: Option<PathBuf>,
    /// Seed of the data and the changed offsets (default: $SLUICE_SEED,
    /// else random; printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Peer sessions: `on` (shared secret, encrypted), `off` (clear text)
    /// or `both` (the Sluice phase once each way, with the ratio).
    #[arg(long, value_enum, default_value = "on")]
    pub secure: Secure,
    /// Bytes written on A for the relay case (A -> B -> C -> D, every hop
    /// with `--follow`): how long a new snapshot takes to reach D against
    /// one hop. 0 skips the case. A multiple of 4 MiB.
    #[arg(long, default_value = "1G", value_parser = crate::parse_size)]
    pub relay_size: u64,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// How the Sluice nodes' peer sessions run.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secure {
    On,
    Off,
    Both,
}

/// One case encrypted against the same case in clear text.
#[derive(Debug, Clone, Serialize)]
struct SecureRow {
    case: &'static str,
    encrypted_mb_s: f64,
    clear_mb_s: f64,
    /// Encrypted throughput / clear throughput (1: encryption costs nothing).
    ratio: f64,
}

/// One timed transfer.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Timed {
    bytes: u64,
    secs: f64,
}

impl Timed {
    fn mb_s(&self) -> f64 {
        if self.secs > 0.0 {
            self.bytes as f64 / self.secs / 1e6
        } else {
            0.0
        }
    }
}

#[derive(Debug, Clone, Serialize)]
struct CaseRow {
    case: String,
    sluice: Timed,
    sluice_mb_s: f64,
    btrfs: Timed,
    btrfs_mb_s: f64,
    /// Sluice seconds / btrfs seconds (below 1: Sluice faster).
    ratio_time: f64,
    tcp_mb_s: f64,
}

/// `mirror update` with nothing to send (B from A, after the incremental),
/// each timed from the control call to its answer: milliseconds.
#[derive(Debug, Clone, Serialize)]
struct EmptyUpdateRow {
    case: String,
    updates: u64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    /// The issue 14 target: at most this, control call included.
    target_ms: f64,
}

/// A new snapshot on A passed down A -> B -> C -> D by `--follow` on every
/// hop: when each hop committed it, against the time of the first hop.
#[derive(Debug, Clone, Serialize)]
struct RelayRow {
    case: String,
    /// Bytes of the snapshot's change (written on A before it).
    changed_bytes: u64,
    /// The A -> B transfer's own duration (its report's `duration_ms`).
    one_hop_s: f64,
    /// From the snapshot's creation on A to D's commit of it.
    to_end_s: f64,
    /// `to_end_s / one_hop_s` (the issue 14 target: at most 1.3).
    ratio: f64,
    target: f64,
    /// Each hop's commit, seconds after the snapshot was taken on A.
    committed_after_s: Vec<(String, f64)>,
}

/// Empty updates timed per Sluice run.
const EMPTY_UPDATES: usize = 200;

#[derive(Debug, Clone, Serialize)]
struct ReplicateReport {
    size_bytes: u64,
    change_pct: f64,
    changed_blocks: usize,
    seed: u64,
    tcp: Timed,
    rows: Vec<CaseRow>,
    /// With `--secure both`: encrypted against clear, per case.
    secure: Vec<SecureRow>,
    /// One per Sluice run.
    empty_updates: Vec<EmptyUpdateRow>,
    /// The relay case (absent with `--relay-size 0`).
    relay: Vec<RelayRow>,
    notes: Vec<String>,
}

fn progress(args: &ReplicateArgs, what: &str) {
    if !args.json {
        eprintln!("... {what}");
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid takes no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// splitmix64: seeds the per-unit generators.
fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fill `buf` (a multiple of 8 bytes) with xorshift64 output seeded by `key`.
fn fill_random(key: u64, buf: &mut [u8]) {
    let mut s = splitmix(key) | 1;
    for w in buf.chunks_exact_mut(8) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        w.copy_from_slice(&s.to_le_bytes());
    }
}

/// The bytes at `offset..offset+buf.len()` of the seeded image (`offset` and
/// the length multiples of [`UNIT`]).
fn image_bytes(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, unit) in buf.chunks_mut(UNIT).enumerate() {
        let idx = offset / UNIT as u64 + i as u64;
        fill_random(seed ^ idx.wrapping_mul(0x2545_f491_4f6c_dd1d), unit);
    }
}

/// The new content of the changed block at `offset`.
fn changed_block(seed: u64, offset: u64, buf: &mut [u8]) {
    fill_random(seed ^ 0x6a09_e667_f3bc_c908 ^ offset, buf);
}

/// `count` distinct block offsets below `size`, in seeded random order.
fn changed_offsets(seed: u64, size: u64, count: usize) -> Vec<u64> {
    let blocks = size / BLOCK;
    let mut seen = HashSet::with_capacity(count);
    let mut out = Vec::with_capacity(count);
    let mut s = splitmix(seed ^ 0xbb67_ae85_84ca_a73b);
    while out.len() < count {
        s = splitmix(s);
        let b = s % blocks;
        if seen.insert(b) {
            out.push(b * BLOCK);
        }
    }
    out
}

/// Write dirty pages back and drop the page cache, so the next transfer
/// reads its source from the device.
fn drop_caches() {
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
    if let Err(e) = std::fs::write("/proc/sys/vm/drop_caches", "3") {
        eprintln!("warning: cannot drop the page cache: {e}");
    }
}

fn run_cmd(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Pool / filesystem device size for a `size` volume: room for the copies
/// on write of the change, the metadata and btrfs's own overhead.
fn device_bytes(size: u64) -> u64 {
    (size + size / 4 + (512 << 20)) / (1 << 20) * (1 << 20)
}

pub fn run(args: &ReplicateArgs) -> Result<()> {
    if !is_root() {
        bail!("replicate needs root (loop devices, mkfs.btrfs, mount)");
    }
    if args.size == 0 || !args.size.is_multiple_of(FILL_WRITE as u64) {
        bail!(
            "--size ({}) must be a positive multiple of 4 MiB",
            args.size
        );
    }
    if !args.relay_size.is_multiple_of(FILL_WRITE as u64) {
        bail!(
            "--relay-size ({}) must be a multiple of 4 MiB (0 skips the relay case)",
            args.relay_size
        );
    }
    if !(args.change_pct > 0.0 && args.change_pct <= 100.0) {
        bail!("--change-pct ({}) must be in (0, 100]", args.change_pct);
    }
    for tool in ["mkfs.btrfs", "btrfs"] {
        if Command::new(tool).arg("--version").output().is_err() {
            bail!("{tool} is needed (apt-get update && apt-get install -y btrfs-progs)");
        }
    }
    let sluice_bin = match &args.sluice_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("cannot find this benchmark's binary")?
            .with_file_name("sluice"),
    };
    if !sluice_bin.is_file() {
        bail!(
            "no sluice binary at {}: run `cargo build --release -p sluice` first, or give --sluice-bin",
            sluice_bin.display()
        );
    }
    let seed = match args.seed {
        Some(s) => s,
        None => match std::env::var("SLUICE_SEED") {
            Ok(v) => v
                .trim()
                .parse()
                .with_context(|| format!("SLUICE_SEED={v:?} is not a u64"))?,
            Err(_) => rand::random(),
        },
    };
    eprintln!("seed: {seed} (replay with SLUICE_SEED={seed})");
    let blocks = args.size / BLOCK;
    let changed = ((blocks as f64 * args.change_pct / 100.0).round() as usize).max(1);
    let offsets = changed_offsets(seed, args.size, changed);
    let mut notes = Vec::new();

    progress(args, "tcp: raw loopback limit");
    let tcp = tcp_limit(args.size)?;

    let modes: &[(bool, &str)] = match args.secure {
        Secure::On => &[(true, "")],
        Secure::Off => &[(false, "")],
        Secure::Both => &[(true, " [encrypted]"), (false, " [clear]")],
    };
    let mut runs = Vec::new();
    let mut empty_updates = Vec::new();
    for &(encrypted, tag) in modes {
        let (s, mut empty) =
            sluice_phase(args, &sluice_bin, seed, &offsets, encrypted, &mut notes)?;
        empty.case = format!("{}{tag}", empty.case);
        runs.push((tag, s));
        empty_updates.push(empty);
    }
    let mut relay = Vec::new();
    if args.relay_size > 0 {
        relay.push(relay_phase(
            args,
            &sluice_bin,
            seed,
            args.secure != Secure::Off,
        )?);
    }
    let b = btrfs_phase(args, seed, &offsets)?;

    let names = [
        "baseline A->B",
        "baseline B->C (2nd hop)",
        "incremental A->B",
        "incremental B->C (2nd hop)",
    ];
    let mut rows = Vec::new();
    for (tag, s) in &runs {
        for (case, (s, b)) in names.iter().zip(s.iter().zip(b.iter())) {
            rows.push(CaseRow {
                case: format!("{case}{tag}"),
                sluice: *s,
                sluice_mb_s: s.mb_s(),
                btrfs: *b,
                btrfs_mb_s: b.mb_s(),
                ratio_time: if b.secs > 0.0 { s.secs / b.secs } else { 0.0 },
                tcp_mb_s: tcp.mb_s(),
            });
        }
    }
    let secure = match runs.as_slice() {
        [(_, enc), (_, clear)] => names
            .iter()
            .zip(enc.iter().zip(clear.iter()))
            .map(|(case, (e, c))| SecureRow {
                case,
                encrypted_mb_s: e.mb_s(),
                clear_mb_s: c.mb_s(),
                ratio: if c.mb_s() > 0.0 {
                    e.mb_s() / c.mb_s()
                } else {
                    0.0
                },
            })
            .collect(),
        _ => Vec::new(),
    };
    notes.push(match args.secure {
        Secure::On => "sluice peers: shared peer secret (authenticated, Noise-encrypted)".into(),
        Secure::Off => "sluice peers: --insecure-peers (clear text)".into(),
        Secure::Both => "sluice peers: the Sluice phase ran encrypted, then in clear (--insecure-peers), each on fresh devices".into(),
    });
    let report = ReplicateReport {
        size_bytes: args.size,
        change_pct: args.change_pct,
        changed_blocks: changed,
        seed,
        tcp,
        rows,
        secure,
        empty_updates,
        relay,
        notes,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(r: &ReplicateReport) {
    println!(
        "volume: {} MiB   change: {} % = {} random 4 KiB blocks   seed: {}   MB = 10^6 bytes",
        r.size_bytes >> 20,
        r.change_pct,
        r.changed_blocks,
        r.seed
    );
    println!();
    println!(
        "| {:<26} | {:>13} | {:>9} | {:>9} | {:>13} | {:>9} | {:>9} | {:>13} | {:>11} |",
        "case",
        "sluice bytes",
        "sluice s",
        "MB/s",
        "btrfs bytes",
        "btrfs s",
        "MB/s",
        "sluice/btrfs",
        "TCP MB/s"
    );
    println!(
        "|{:-<28}|{:->15}|{:->11}|{:->11}|{:->15}|{:->11}|{:->11}|{:->15}|{:->13}|",
        "", "", "", "", "", "", "", "", ""
    );
    for row in &r.rows {
        println!(
            "| {:<26} | {:>13} | {:>9.3} | {:>9.1} | {:>13} | {:>9.3} | {:>9.1} | {:>13.2} | {:>11.1} |",
            row.case,
            row.sluice.bytes,
            row.sluice.secs,
            row.sluice_mb_s,
            row.btrfs.bytes,
            row.btrfs.secs,
            row.btrfs_mb_s,
            row.ratio_time,
            row.tcp_mb_s
        );
    }
    if !r.secure.is_empty() {
        println!();
        println!(
            "| {:<26} | {:>14} | {:>10} | {:>15} |",
            "case", "encrypted MB/s", "clear MB/s", "encrypted/clear"
        );
        println!("|{:-<28}|{:->16}|{:->12}|{:->17}|", "", "", "", "");
        for row in &r.secure {
            println!(
                "| {:<26} | {:>14.1} | {:>10.1} | {:>15.3} |",
                row.case, row.encrypted_mb_s, row.clear_mb_s, row.ratio
            );
        }
    }
    if !r.empty_updates.is_empty() {
        println!();
        println!(
            "| {:<34} | {:>7} | {:>8} | {:>8} | {:>8} | {:>8} | {:>9} |",
            "case", "updates", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "target ms"
        );
        println!(
            "|{:-<36}|{:->9}|{:->10}|{:->10}|{:->10}|{:->10}|{:->11}|",
            "", "", "", "", "", "", ""
        );
        for e in &r.empty_updates {
            println!(
                "| {:<34} | {:>7} | {:>8.2} | {:>8.2} | {:>8.2} | {:>8.2} | {:>9.1} |",
                e.case, e.updates, e.p50_ms, e.p99_ms, e.p999_ms, e.max_ms, e.target_ms
            );
        }
    }
    for e in &r.relay {
        println!();
        println!(
            "| {:<40} | {:>9} | {:>10} | {:>10} | {:>6} | {:>6} |",
            "case", "MiB", "one hop s", "to D s", "ratio", "target"
        );
        println!(
            "|{:-<42}|{:->11}|{:->12}|{:->12}|{:->8}|{:->8}|",
            "", "", "", "", "", ""
        );
        println!(
            "| {:<40} | {:>9} | {:>10.3} | {:>10.3} | {:>6.2} | {:>6.1} |",
            e.case,
            e.changed_bytes >> 20,
            e.one_hop_s,
            e.to_end_s,
            e.ratio,
            e.target
        );
        let hops: Vec<String> = e
            .committed_after_s
            .iter()
            .map(|(n, t)| format!("{n} +{t:.3} s"))
            .collect();
        println!("relay commits after the snapshot on A: {}", hops.join(", "));
    }
    for n in &r.notes {
        println!("note: {n}");
    }
}

/// `EMPTY_UPDATES` updates of B with nothing new on A, each timed from the
/// control call (a new connection, as the CLI makes) to its answer.
fn empty_updates(b: &Node) -> Result<EmptyUpdateRow> {
    let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .context("histogram bounds")?;
    for _ in 0..EMPTY_UPDATES {
        let start = Instant::now();
        let rep = b.call(ControlRequest::MirrorUpdate { dst: VOLUME.into() })?;
        let us = start.elapsed().as_micros() as u64;
        let kind = rep.get("kind").and_then(Value::as_str).unwrap_or("?");
        if kind != "none" {
            bail!(
                "node {}: an update with nothing new sent {kind}: {rep}",
                b.name
            );
        }
        h.record(us.max(1)).context("recording a latency")?;
    }
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Ok(EmptyUpdateRow {
        case: "update with nothing to send A->B".into(),
        updates: h.len(),
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: h.max() as f64 / 1000.0,
        target_ms: 5.0,
    })
}

// ---------------------------------------------------------------- TCP

fn tcp_limit(size: u64) -> Result<Timed> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind 127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
        }
    });
    let mut buf = vec![0u8; 1 << 20];
    fill_random(0x7c9, &mut buf);
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).context("cannot connect to the TCP reader")?;
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n]).context("TCP write")?;
        left -= n as u64;
    }
    drop(s);
    let got = reader
        .join()
        .map_err(|_| anyhow::anyhow!("TCP reader thread panicked"))?
        .context("TCP read")?;
    let secs = start.elapsed().as_secs_f64();
    if got != size {
        bail!("TCP reader got {got} bytes of {size}");
    }
    Ok(Timed { bytes: size, secs })
}

// ---------------------------------------------------------------- Sluice

/// One `sluice serve` child on its own loop device; SIGTERM on drop.
struct Node {
    name: &'static str,
    child: Option<Child>,
    /// The control socket.
    control: String,
    /// The peer address: mirror sources name it.
    listen: String,
    nbd: String,
    log: PathBuf,
    // Dropped after `child` is stopped (Drop below runs first).
    _dev: BenchDevice,
}

impl Node {
    /// Start node `name`; `peers` are its peer-mode arguments
    /// (`--peer-secret FILE` or `--insecure-peers`).
    fn start(
        bin: &Path,
        dir: &Path,
        name: &'static str,
        dev_bytes: u64,
        peers: &[&std::ffi::OsStr],
    ) -> Result<Node> {
        let dev = BenchDevice::temporary(dev_bytes, Some(dir))?;
        run_cmd(
            Command::new(bin)
                .args(["init", "--shards", "1"])
                .arg(&dev.path),
            &format!("sluice init {} (node {name})", dev.path.display()),
        )?;
        let log = dir.join(format!("{name}.log"));
        let logf =
            File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut child = Command::new(bin)
            .arg("serve")
            .arg("--data")
            .arg(&dev.path)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--nbd",
                "127.0.0.1:0",
                "--name",
                name,
            ])
            .args(peers)
            .stdout(Stdio::piped())
            .stderr(logf)
            .spawn()
            .with_context(|| format!("cannot start {} serve", bin.display()))?;
        let mut node = Node {
            name,
            child: None,
            control: String::new(),
            listen: String::new(),
            nbd: String::new(),
            log,
            _dev: dev,
        };
        let stdout = child.stdout.take();
        node.child = Some(child);
        let Some(stdout) = stdout else {
            bail!("node {name}: no stdout pipe");
        };
        let mut lines = BufReader::new(stdout);
        let mut line = String::new();
        lines
            .read_line(&mut line)
            .with_context(|| format!("node {name}: reading its ready line"))?;
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .map(str::to_string)
        };
        let (Some(control), Some(listen), Some(nbd)) =
            (field("control="), field("listen="), field("nbd="))
        else {
            bail!(
                "node {name} did not start (stdout {:?}); its log: {}",
                line.trim(),
                node.log_tail()
            );
        };
        node.control = control;
        node.listen = listen;
        node.nbd = nbd;
        // Keep draining stdout so a later line never meets a closed pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while matches!(lines.read_line(&mut sink), Ok(n) if n > 0) {
                sink.clear();
            }
        });
        Ok(node)
    }

    fn call(&self, req: ControlRequest) -> Result<Value> {
        let what = req.op();
        Client::connect(&self.control)
            .and_then(|mut c| c.call(&req))
            .with_context(|| format!("node {}: {what} (log: {})", self.name, self.log_tail()))
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(c.id()) {
            // SAFETY: kill(2) with the pid of our own unreaped child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match c.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    eprintln!("warning: node {} ignored SIGTERM; killing it", self.name);
                    let _ = c.kill();
                    let _ = c.wait();
                    return;
                }
            }
        }
    }
}

/// The temp folder of one run's nodes, and their peer-mode arguments: a
/// peer secret created in it (`encrypted`), or `--insecure-peers`.
fn node_folder(
    args: &ReplicateArgs,
    encrypted: bool,
) -> Result<(tempfile::TempDir, Vec<std::ffi::OsString>)> {
    let tmp = match &args.dir {
        Some(p) => tempfile::tempdir_in(p),
        None => tempfile::tempdir(),
    }
    .context("cannot create a temp folder")?;
    let peers = if encrypted {
        let secret = tmp.path().join("peer.secret");
        sluice::auth::create_peer_secret(&secret).context("creating the peer secret")?;
        vec!["--peer-secret".into(), secret.into_os_string()]
    } else {
        vec!["--insecure-peers".into()]
    };
    Ok((tmp, peers))
}

/// A timed mirror call: wall-clock seconds and the report's byte count.
fn timed_mirror(node: &Node, req: ControlRequest, expect: &str) -> Result<(Timed, Value)> {
    drop_caches();
    let start = Instant::now();
    let rep = node.call(req)?;
    let secs = start.elapsed().as_secs_f64();
    let kind = rep.get("kind").and_then(Value::as_str).unwrap_or("?");
    if kind != expect {
        bail!(
            "node {}: expected a {expect} transfer, got {kind}: {rep}",
            node.name
        );
    }
    let bytes = rep.get("bytes").and_then(Value::as_u64).unwrap_or(0);
    Ok((Timed { bytes, secs }, rep))
}

fn sluice_phase(
    args: &ReplicateArgs,
    bin: &Path,
    seed: u64,
    offsets: &[u64],
    encrypted: bool,
    notes: &mut Vec<String>,
) -> Result<([Timed; 4], EmptyUpdateRow)> {
    let (tmp, peers) = node_folder(args, encrypted)?;
    let peers: Vec<&std::ffi::OsStr> = peers.iter().map(|p| p.as_os_str()).collect();
    let dev_bytes = device_bytes(args.size);
    let mode = if encrypted { "encrypted" } else { "clear text" };
    progress(args, &format!("sluice: starting nodes A, B, C ({mode})"));
    let a = Node::start(bin, tmp.path(), "a", dev_bytes, &peers)?;
    let b = Node::start(bin, tmp.path(), "b", dev_bytes, &peers)?;
    let c = Node::start(bin, tmp.path(), "c", dev_bytes, &peers)?;
    a.call(ControlRequest::VolCreate {
        name: VOLUME.into(),
        size_bytes: args.size,
    })?;

    progress(
        args,
        &format!("sluice: filling {} MiB on A through NBD", args.size >> 20),
    );
    let mut nbd = NbdClient::open(&a.nbd, VOLUME).context("opening A's NBD export")?;
    let mut buf = vec![0u8; FILL_WRITE];
    let start = Instant::now();
    let mut off = 0;
    while off < args.size {
        image_bytes(seed, off, &mut buf);
        nbd.write(off, &buf)
            .with_context(|| format!("NBD write at {off}"))?;
        off += FILL_WRITE as u64;
    }
    nbd.flush().context("NBD flush")?;
    notes.push(format!(
        "fill of A through NBD ({mode} run; 4 MiB writes, one in flight, untimed in the table): {:.1} MB/s",
        args.size as f64 / start.elapsed().as_secs_f64() / 1e6
    ));
    a.call(ControlRequest::SnapCreate {
        volume: VOLUME.into(),
        name: "s0".into(),
    })?;

    progress(args, "sluice: mirror create on B from A (baseline)");
    let (base_ab, _) = timed_mirror(
        &b,
        ControlRequest::MirrorCreate {
            keep: None,
            dst_volume: VOLUME.into(),
            source: format!("{}/{VOLUME}", a.listen),
            dst_qtree: None,
            every_secs: None,
            follow: false,
            throttle_bps: None,
        },
        "full",
    )?;
    progress(
        args,
        "sluice: mirror create on C from B (baseline, 2nd hop)",
    );
    let (base_bc, _) = timed_mirror(
        &c,
        ControlRequest::MirrorCreate {
            keep: None,
            dst_volume: VOLUME.into(),
            source: format!("{}/{VOLUME}", b.listen),
            dst_qtree: None,
            every_secs: None,
            follow: false,
            throttle_bps: None,
        },
        "full",
    )?;

    progress(
        args,
        &format!(
            "sluice: changing {} random 4 KiB blocks on A",
            offsets.len()
        ),
    );
    let mut blk = vec![0u8; BLOCK as usize];
    for &o in offsets {
        changed_block(seed, o, &mut blk);
        nbd.write(o, &blk)
            .with_context(|| format!("NBD write at {o}"))?;
    }
    nbd.flush().context("NBD flush")?;
    drop(nbd);
    a.call(ControlRequest::SnapCreate {
        volume: VOLUME.into(),
        name: "s1".into(),
    })?;

    progress(args, "sluice: mirror update on B (incremental)");
    let (inc_ab, _) = timed_mirror(
        &b,
        ControlRequest::MirrorUpdate { dst: VOLUME.into() },
        "incremental",
    )?;
    progress(args, "sluice: mirror update on C (incremental, 2nd hop)");
    let (inc_bc, _) = timed_mirror(
        &c,
        ControlRequest::MirrorUpdate { dst: VOLUME.into() },
        "incremental",
    )?;

    progress(args, "sluice: mirror updates on B with nothing to send");
    let empty = empty_updates(&b)?;

    // Read some changed blocks back from C, the end of the chain.
    let mut nbd_c = NbdClient::open(&c.nbd, VOLUME).context("opening C's NBD export")?;
    for &o in offsets.iter().take(VERIFY_SAMPLES) {
        changed_block(seed, o, &mut blk);
        let got = nbd_c
            .read(o, BLOCK as u32)
            .with_context(|| format!("NBD read of C at {o}"))?;
        if got != blk {
            bail!("node C's volume differs from A's change at offset {o}");
        }
    }
    notes.push(format!(
        "sluice ({mode}): {} changed blocks read back from C through NBD match A's writes",
        offsets.len().min(VERIFY_SAMPLES)
    ));
    progress(args, "sluice: stopping nodes");
    drop((c, b, a));
    Ok(([base_ab, base_bc, inc_ab, inc_bc], empty))
}

/// The relay case: A -> B -> C -> D, every hop created with `--follow`
/// on an empty volume; then `--relay-size` bytes written on A through NBD
/// and a snapshot taken, and D's `mirror status` polled until it holds it.
/// Each hop's commit time comes from its last transfer's report.
fn relay_phase(args: &ReplicateArgs, bin: &Path, seed: u64, encrypted: bool) -> Result<RelayRow> {
    let (tmp, peers) = node_folder(args, encrypted)?;
    let peers: Vec<&std::ffi::OsStr> = peers.iter().map(|p| p.as_os_str()).collect();
    let dev_bytes = device_bytes(args.relay_size);
    progress(args, "relay: starting nodes A, B, C, D");
    let names = ["a", "b", "c", "d"];
    let mut nodes = Vec::new();
    for n in names {
        nodes.push(Node::start(bin, tmp.path(), n, dev_bytes, &peers)?);
    }
    let a = &nodes[0];
    a.call(ControlRequest::VolCreate {
        name: VOLUME.into(),
        size_bytes: args.relay_size,
    })?;
    a.call(ControlRequest::SnapCreate {
        volume: VOLUME.into(),
        name: "r0".into(),
    })?;
    for w in nodes.windows(2) {
        w[1].call(ControlRequest::MirrorCreate {
            keep: None,
            dst_volume: VOLUME.into(),
            source: format!("{}/{VOLUME}", w[0].listen),
            dst_qtree: None,
            every_secs: None,
            follow: true,
            throttle_bps: None,
        })?;
    }
    let d = &nodes[3];
    let common = |n: &Node| -> Result<(String, Value)> {
        let st = n.call(ControlRequest::MirrorStatus)?;
        let m = st
            .as_array()
            .and_then(|a| a.iter().find(|m| m["dst"] == VOLUME))
            .cloned()
            .unwrap_or(Value::Null);
        let name = m["newest_common_snapshot"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        Ok((name, m))
    };
    // The followers' first (catch-up) updates are done when D has r0 and
    // its relationship is idle.
    let deadline = Instant::now() + Duration::from_secs(120);
    while common(d)?.0 != "r0" {
        if Instant::now() > deadline {
            bail!("D never had r0 (log: {})", d.log_tail());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    progress(
        args,
        &format!("relay: writing {} MiB on A", args.relay_size >> 20),
    );
    let mut nbd = NbdClient::open(&a.nbd, VOLUME).context("opening A's NBD export")?;
    let mut buf = vec![0u8; FILL_WRITE];
    let mut off = 0;
    while off < args.relay_size {
        image_bytes(seed ^ 0x5245_4c41, off, &mut buf);
        nbd.write(off, &buf)
            .with_context(|| format!("NBD write at {off}"))?;
        off += FILL_WRITE as u64;
    }
    nbd.flush().context("NBD flush")?;
    drop(nbd);
    progress(args, "relay: snapshot r1 on A, waiting for D to hold it");
    let snap = a.call(ControlRequest::SnapCreate {
        volume: VOLUME.into(),
        name: "r1".into(),
    })?;
    let created = snap["created_unix_ms"]
        .as_u64()
        .context("the snapshot's created_unix_ms")?;
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        if common(d)?.0 == "r1" {
            break;
        }
        if Instant::now() > deadline {
            bail!("D never had r1 (log: {})", d.log_tail());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut committed_after_s = Vec::new();
    let mut one_hop_s = 0.0;
    for (i, n) in nodes.iter().enumerate().skip(1) {
        let (_, m) = common(n)?;
        let last = &m["last_transfer"];
        if last["target"]["name"] != "r1" {
            bail!("node {}: its last transfer is not r1: {m}", n.name);
        }
        let finished = last["finished_unix_ms"].as_u64().unwrap_or(0);
        committed_after_s.push((
            n.name.to_uppercase(),
            finished.saturating_sub(created) as f64 / 1000.0,
        ));
        if i == 1 {
            one_hop_s = last["duration_ms"].as_u64().unwrap_or(0) as f64 / 1000.0;
        }
    }
    let to_end_s = committed_after_s.last().map_or(0.0, |(_, t)| *t);
    progress(args, "relay: stopping nodes");
    drop(nodes);
    Ok(RelayRow {
        case: format!(
            "new snapshot A->B->C->D, --follow{}",
            if encrypted { "" } else { " [clear]" }
        ),
        changed_bytes: args.relay_size,
        one_hop_s,
        to_end_s,
        ratio: if one_hop_s > 0.0 {
            to_end_s / one_hop_s
        } else {
            0.0
        },
        target: 1.3,
        committed_after_s,
    })
}

// ---------------------------------------------------------------- btrfs

/// A btrfs filesystem on its own loop device, mounted in the temp folder;
/// unmounted on drop (before the loop device is detached).
struct BtrfsFs {
    mnt: PathBuf,
    mounted: bool,
    _dev: BenchDevice,
}

impl BtrfsFs {
    fn create(dir: &Path, name: &str, dev_bytes: u64) -> Result<BtrfsFs> {
        let dev = BenchDevice::temporary(dev_bytes, Some(dir))?;
        run_cmd(
            Command::new("mkfs.btrfs")
                .args(["-f", "-q", "-L", name])
                .arg(&dev.path),
            &format!("mkfs.btrfs {}", dev.path.display()),
        )?;
        let mnt = dir.join(format!("mnt-{name}"));
        std::fs::create_dir_all(&mnt)
            .with_context(|| format!("cannot create {}", mnt.display()))?;
        let mut fs = BtrfsFs {
            mnt,
            mounted: false,
            _dev: dev,
        };
        run_cmd(
            Command::new("mount").arg(&fs._dev.path).arg(&fs.mnt),
            &format!("mount {}", fs.mnt.display()),
        )?;
        fs.mounted = true;
        Ok(fs)
    }

    fn sync(&self) -> Result<()> {
        run_cmd(
            Command::new("btrfs")
                .args(["filesystem", "sync"])
                .arg(&self.mnt),
            "btrfs filesystem sync",
        )
        .map(drop)
    }
}

impl Drop for BtrfsFs {
    fn drop(&mut self) {
        if self.mounted {
            let ok = Command::new("umount")
                .arg(&self.mnt)
                .status()
                .map(|s| s.success());
            if !matches!(ok, Ok(true)) {
                eprintln!(
                    "warning: could not unmount {}; run `umount {}`",
                    self.mnt.display(),
                    self.mnt.display()
                );
            }
        }
    }
}

/// `btrfs send [-p parent] snap | btrfs receive dst.mnt`, relayed through
/// this process to count the stream, then a sync of the receiver.
fn send_receive(parent: Option<&Path>, snap: &Path, dst: &BtrfsFs) -> Result<Timed> {
    drop_caches();
    let start = Instant::now();
    let mut send = Command::new("btrfs");
    send.arg("send").arg("-q");
    if let Some(p) = parent {
        send.arg("-p").arg(p);
    }
    let mut send = send
        .arg(snap)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start btrfs send")?;
    let mut recv = match Command::new("btrfs")
        .arg("receive")
        .arg(&dst.mnt)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(r) => r,
        Err(e) => {
            let _ = send.kill();
            let _ = send.wait();
            return Err(e).context("cannot start btrfs receive");
        }
    };
    let relay = (|| -> Result<u64> {
        let mut from = send.stdout.take().context("btrfs send stdout")?;
        let mut to = recv.stdin.take().context("btrfs receive stdin")?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = from.read(&mut buf).context("reading btrfs send")?;
            if n == 0 {
                return Ok(total);
            }
            to.write_all(&buf[..n])
                .context("writing to btrfs receive")?;
            total += n as u64;
        }
    })();
    let send_out = send.wait_with_output();
    let recv_out = recv.wait_with_output();
    let bytes = relay?;
    for (what, out) in [("btrfs send", send_out), ("btrfs receive", recv_out)] {
        let out = out.with_context(|| format!("waiting for {what}"))?;
        if !out.status.success() {
            bail!(
                "{what} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    dst.sync()?;
    Ok(Timed {
        bytes,
        secs: start.elapsed().as_secs_f64(),
    })
}

fn btrfs_phase(args: &ReplicateArgs, seed: u64, offsets: &[u64]) -> Result<[Timed; 4]> {
    let tmp = match &args.dir {
        Some(p) => tempfile::tempdir_in(p),
        None => tempfile::tempdir(),
    }
    .context("cannot create a temp folder")?;
    let dev_bytes = device_bytes(args.size);
    progress(args, "btrfs: three filesystems on loop devices");
    let f1 = BtrfsFs::create(tmp.path(), "b1", dev_bytes)?;
    let f2 = BtrfsFs::create(tmp.path(), "b2", dev_bytes)?;
    let f3 = BtrfsFs::create(tmp.path(), "b3", dev_bytes)?;
    let vol = f1.mnt.join(VOLUME);
    run_cmd(
        Command::new("btrfs")
            .args(["subvolume", "create"])
            .arg(&vol),
        "btrfs subvolume create",
    )?;
    progress(
        args,
        &format!(
            "btrfs: writing the same {} MiB into a file",
            args.size >> 20
        ),
    );
    let path = vol.join("data");
    let file = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut buf = vec![0u8; FILL_WRITE];
    let mut off = 0;
    while off < args.size {
        image_bytes(seed, off, &mut buf);
        file.write_all_at(&buf, off)
            .with_context(|| format!("write {} at {off}", path.display()))?;
        off += FILL_WRITE as u64;
    }
    file.sync_all().context("fsync of the btrfs file")?;
    let snapshot = |name: &str| -> Result<PathBuf> {
        let s = f1.mnt.join(name);
        run_cmd(
            Command::new("btrfs")
                .args(["subvolume", "snapshot", "-r"])
                .arg(&vol)
                .arg(&s),
            "btrfs subvolume snapshot -r",
        )?;
        f1.sync()?;
        Ok(s)
    };
    let s0 = snapshot("s0")?;
    progress(args, "btrfs: send | receive s0 into the 2nd filesystem");
    let base_ab = send_receive(None, &s0, &f2)?;
    progress(args, "btrfs: send | receive s0 into the 3rd (2nd hop)");
    let base_bc = send_receive(None, &f2.mnt.join("s0"), &f3)?;

    progress(
        args,
        &format!("btrfs: changing {} random 4 KiB blocks", offsets.len()),
    );
    let mut blk = vec![0u8; BLOCK as usize];
    for &o in offsets {
        changed_block(seed, o, &mut blk);
        file.write_all_at(&blk, o)
            .with_context(|| format!("write {} at {o}", path.display()))?;
    }
    file.sync_all().context("fsync of the btrfs file")?;
    drop(file);
    let s1 = snapshot("s1")?;
    progress(args, "btrfs: send -p s0 s1 | receive (incremental)");
    let inc_ab = send_receive(Some(&s0), &s1, &f2)?;
    progress(
        args,
        "btrfs: send -p s0 s1 | receive (incremental, 2nd hop)",
    );
    let inc_bc = send_receive(Some(&f2.mnt.join("s0")), &f2.mnt.join("s1"), &f3)?;

    let last = File::open(f3.mnt.join("s1").join("data")).context("opening the 3rd copy")?;
    let mut got = vec![0u8; BLOCK as usize];
    for &o in offsets.iter().take(VERIFY_SAMPLES) {
        changed_block(seed, o, &mut blk);
        last.read_exact_at(&mut got, o)
            .with_context(|| format!("reading the 3rd copy at {o}"))?;
        if got != blk {
            bail!("btrfs's 3rd copy differs from the change at offset {o}");
        }
    }
    drop(last);
    progress(args, "btrfs: unmounting");
    drop((f3, f2, f1));
    Ok([base_ab, base_bc, inc_ab, inc_bc])
}
