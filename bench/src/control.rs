//! `sluice-bench control`: the control plane's cost as populations grow.
//!
//! Two real `sluice serve` processes (A and B) on plain sparse files in a
//! temp folder (metadata costs only: no data is written). Through A's
//! control API the run builds `--snapshots` snapshots spread over volumes of
//! at most `--per-volume` snapshots each (volume `v0` is the full one that
//! `snap list` reads; `--per-volume` equal to `--snapshots` puts them all
//! in one volume), `--locks` application locks spread over those
//! snapshots (half of them on `v0`), and `--relationships` mirrors on B of
//! small volumes of A, plus one of `v0` (whose update plans over all of
//! v0's snapshots). It then reports p50/p99 (hdrhistogram, µs) of
//! snapshot create (every create of the build) and delete, `snap list v0`,
//! `lock list` and `status` on A, `mirror status` on B, a prune of one
//! snapshot, an update of the `v0` mirror with nothing to send (its
//! planning), A's restart time to its ready line and a first answer, A's
//! RSS and threads, and the bytes A wrote per create, delete and prune
//! (`write_bytes` of /proc/PID/io, read around each call). With
//! `--find-limit` a separate volume is filled until the engine refuses, to
//! report the per-volume snapshot limit as it is.
//!
//! Invariants: each process and the temp folder is owned by a guard whose
//! `Drop` undoes it (SIGTERM first). Numbers only: nothing passes or fails
//! on a time.

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::Value;
use sluice::control::{Client, ControlRequest};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Size of every volume the run creates: metadata only.
const VOLUME_BYTES: u64 = 16 << 20;
/// Size of each node's sparse pool file.
const POOL_BYTES: u64 = 4 << 30;

#[derive(clap::Args, Debug, Clone)]
pub struct ControlArgs {
    /// Snapshots on A, spread over volumes of at most `--per-volume` each.
    #[arg(long, default_value_t = 1000)]
    pub snapshots: usize,
    /// Snapshots per volume (`--snapshots` or more: all in one volume; the
    /// engine takes 65,536).
    #[arg(long, default_value_t = 1000)]
    pub per_volume: usize,
    /// Also fill one more volume until the engine refuses a snapshot.
    #[arg(long)]
    pub find_limit: bool,
    /// Application locks on A's snapshots (half on the listed volume).
    #[arg(long, default_value_t = 200)]
    pub locks: usize,
    /// Mirror relationships on B pulling from A.
    #[arg(long, default_value_t = 8)]
    pub relationships: usize,
    /// Give the relationships `--every SECS`, and at the end watch B's
    /// `mirror status` for `--observe` seconds: how late each scheduled
    /// update is (the gap between two updates of one relationship, minus
    /// the period).
    #[arg(long)]
    pub every: Option<u64>,
    /// Seconds of watching the schedule (with `--every`).
    #[arg(long, default_value_t = 150)]
    pub observe: u64,
    /// Timed calls of each list operation, and snapshot deletes.
    #[arg(long, default_value_t = 50)]
    pub samples: usize,
    /// Shards of A's pool.
    #[arg(long, default_value_t = 1)]
    pub shards: u32,
    /// Folder for the temp folder (default: the system temp folder).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// The `sluice` binary (default: next to this benchmark's binary).
    #[arg(long)]
    pub sluice_bin: Option<PathBuf>,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Serialize)]
struct Row {
    op: String,
    count: u64,
    p50_us: u64,
    p99_us: u64,
    /// Bytes the node wrote per call (write_bytes of /proc/PID/io).
    write_bytes_per_op: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
struct ControlReport {
    snapshots: usize,
    volumes: usize,
    per_volume: usize,
    locks: usize,
    relationships: usize,
    /// Snapshots the extra volume took before a refusal (`--find-limit`).
    per_volume_limit: Option<usize>,
    /// A's resident memory and threads after the build (/proc/PID/status).
    rss_kib: u64,
    threads: u64,
    rows: Vec<Row>,
    /// With `--every`: how the schedule kept up.
    schedule: Option<ScheduleReport>,
}

/// Scheduled updates of `--relationships` mirrors set to `--every`, as B's
/// `mirror status` (sampled every second) showed them: each relationship's
/// `last_update_unix_ms` values, and the gaps between them.
#[derive(Debug, Clone, Serialize)]
struct ScheduleReport {
    every_s: u64,
    observed_s: u64,
    relationships: usize,
    /// Relationships with at least one update seen in the window.
    updated: usize,
    /// Gaps between two updates of one relationship seen.
    gaps: u64,
    /// Gap minus the period (ms; 0 when early).
    p50_late_ms: u64,
    p99_late_ms: u64,
    max_late_ms: u64,
}

/// One `sluice serve` child on a sparse file; SIGTERM on drop.
struct Node {
    name: &'static str,
    child: Option<Child>,
    control: String,
    listen: String,
    data: PathBuf,
    log: PathBuf,
}

impl Node {
    fn init(bin: &Path, dir: &Path, name: &'static str, shards: u32) -> Result<PathBuf> {
        let data = dir.join(format!("{name}.img"));
        File::create(&data)
            .and_then(|f| f.set_len(POOL_BYTES))
            .with_context(|| format!("cannot create {}", data.display()))?;
        let out = Command::new(bin)
            .args(["init", "--shards", &shards.to_string()])
            .arg(&data)
            .output()
            .context("cannot run sluice init")?;
        if !out.status.success() {
            bail!(
                "sluice init: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(data)
    }

    /// Start `serve` on `data`; returns when its ready line is out.
    fn start(bin: &Path, dir: &Path, name: &'static str, data: &Path) -> Result<Node> {
        let log = dir.join(format!("{name}.log"));
        let logf = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let mut child = Command::new(bin)
            .arg("serve")
            .arg("--data")
            .arg(data)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--name",
                name,
                "--insecure-peers",
            ])
            .stdout(Stdio::piped())
            .stderr(logf)
            .spawn()
            .with_context(|| format!("cannot start {} serve", bin.display()))?;
        let stdout = child.stdout.take();
        let mut node = Node {
            name,
            child: Some(child),
            control: String::new(),
            listen: String::new(),
            data: data.to_path_buf(),
            log,
        };
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
        let (Some(control), Some(listen)) = (field("control="), field("listen=")) else {
            bail!("node {name} did not start (stdout {:?})", line.trim());
        };
        node.control = control;
        node.listen = listen;
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
            .with_context(|| format!("node {}: {what} (log {})", self.name, self.log.display()))
    }

    /// A field of /proc/PID/status (its number: kB for sizes).
    fn status_field(&self, key: &str) -> Result<u64> {
        let pid = self.child.as_ref().map(Child::id).unwrap_or_default();
        let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {key} in /proc/PID/status"))
    }

    /// Bytes this process has caused to be written to storage so far.
    fn write_bytes(&self) -> Result<u64> {
        let pid = self.child.as_ref().map(Child::id).unwrap_or_default();
        let text = std::fs::read_to_string(format!("/proc/{pid}/io"))
            .with_context(|| format!("reading /proc/{pid}/io"))?;
        text.lines()
            .find_map(|l| l.strip_prefix("write_bytes: "))
            .and_then(|v| v.trim().parse().ok())
            .context("no write_bytes in /proc/PID/io")
    }

    fn stop(&mut self) {
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
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = c.kill();
                    let _ = c.wait();
                    return;
                }
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

fn hist() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 600_000_000, 3).context("histogram bounds")
}

/// Latencies (µs) and bytes written of one operation.
struct Series {
    op: String,
    h: Histogram<u64>,
    bytes: Option<u64>,
}

impl Series {
    fn new(op: &str) -> Result<Series> {
        Ok(Series {
            op: op.to_string(),
            h: hist()?,
            bytes: None,
        })
    }

    /// Time one call of `f` on `node`, counting its writes.
    fn time(&mut self, node: &Node, f: impl FnOnce() -> Result<Value>) -> Result<Value> {
        let before = node.write_bytes()?;
        let t = Instant::now();
        let v = f()?;
        let us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.h.record(us.max(1)).context("histogram record")?;
        let wrote = node.write_bytes()?.saturating_sub(before);
        self.bytes = Some(self.bytes.unwrap_or(0) + wrote);
        Ok(v)
    }

    fn row(&self, with_bytes: bool) -> Row {
        let n = self.h.len();
        Row {
            op: self.op.clone(),
            count: n,
            p50_us: self.h.value_at_quantile(0.5),
            p99_us: self.h.value_at_quantile(0.99),
            write_bytes_per_op: with_bytes.then(|| self.bytes.unwrap_or(0) / n.max(1)),
        }
    }
}

fn vol_create(n: &Node, name: &str) -> Result<()> {
    n.call(ControlRequest::VolCreate {
        name: name.into(),
        size_bytes: VOLUME_BYTES,
    })
    .map(drop)
}

pub fn run(args: &ControlArgs) -> Result<()> {
    let bin = match &args.sluice_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()
            .context("cannot find this binary")?
            .with_file_name("sluice"),
    };
    let tmp = match &args.dir {
        Some(p) => tempfile::tempdir_in(p),
        None => tempfile::tempdir(),
    }
    .context("cannot create a temp folder")?;
    let dir = tmp.path();
    let say = |s: &str| {
        if !args.json {
            eprintln!("... {s}");
        }
    };
    let per = args.per_volume.max(1);
    let volumes = args.snapshots.div_ceil(per).max(1);
    let a_data = Node::init(&bin, dir, "a", args.shards)?;
    let b_data = Node::init(&bin, dir, "b", 1)?;
    let mut a = Node::start(&bin, dir, "a", &a_data)?;
    let b = Node::start(&bin, dir, "b", &b_data)?;

    say(&format!(
        "building {} snapshots over {volumes} volumes",
        args.snapshots
    ));
    for v in 0..volumes {
        vol_create(&a, &format!("v{v}"))?;
    }
    let mut create = Series::new("snap create")?;
    let mut names: Vec<Vec<String>> = vec![Vec::new(); volumes];
    for i in 0..args.snapshots {
        let v = i / per;
        let name = format!("s{}", i % per);
        create.time(&a, || {
            a.call(ControlRequest::SnapCreate {
                volume: format!("v{v}"),
                name: name.clone(),
            })
        })?;
        if let Some(n) = names.get_mut(v) {
            n.push(name);
        }
    }

    say(&format!("adding {} locks", args.locks));
    for i in 0..args.locks {
        // Even locks on v0, odd ones on the other volumes.
        let v = if i % 2 == 0 || volumes == 1 {
            0
        } else {
            1 + (i / 2) % (volumes - 1)
        };
        let Some(list) = names.get(v).filter(|l| !l.is_empty()) else {
            continue;
        };
        let snap = &list[(i / 2) % list.len()];
        a.call(ControlRequest::LockAdd {
            volume: format!("v{v}"),
            snapshot: snap.clone(),
            owner: format!("app{i}"),
            text: None,
        })?;
    }

    say(&format!("creating {} mirrors on b", args.relationships));
    for r in 0..args.relationships {
        let src = format!("m{r}");
        vol_create(&a, &src)?;
        a.call(ControlRequest::SnapCreate {
            volume: src.clone(),
            name: "base".into(),
        })?;
        b.call(ControlRequest::MirrorCreate {
            dst_volume: src.clone(),
            source: format!("{}/{src}", a.listen),
            dst_qtree: None,
            every_secs: args.every,
            follow: false,
            throttle_bps: None,
            keep: None,
        })?;
    }

    // A mirror of v0: its update with nothing new plans over every
    // snapshot of v0.
    b.call(ControlRequest::MirrorCreate {
        dst_volume: "v0".into(),
        source: format!("{}/v0", a.listen),
        dst_qtree: None,
        every_secs: None,
        follow: false,
        throttle_bps: None,
        keep: None,
    })?;
    let rss_kib = a.status_field("VmRSS:")?;
    let threads = a.status_field("Threads:")?;

    say("timing the lists");
    let mut snap_list = Series::new("snap list v0")?;
    let mut lock_list = Series::new("lock list")?;
    let mut status = Series::new("status")?;
    let mut mirror_status = Series::new("mirror status (b)")?;
    let mut update = Series::new("mirror update v0, nothing new (b)")?;
    for _ in 0..args.samples {
        snap_list.time(&a, || {
            a.call(ControlRequest::SnapList {
                volume: "v0".into(),
            })
        })?;
        lock_list.time(&a, || a.call(ControlRequest::LockList))?;
        status.time(&a, || a.call(ControlRequest::Status))?;
        mirror_status.time(&b, || b.call(ControlRequest::MirrorStatus))?;
        update.time(&b, || {
            b.call(ControlRequest::MirrorUpdate { dst: "v0".into() })
        })?;
    }

    say("timing prunes");
    vol_create(&a, "p")?;
    let mut prune = Series::new("prune (1 of 2)")?;
    for i in 0..args.samples {
        for k in 0..2 {
            a.call(ControlRequest::SnapCreate {
                volume: "p".into(),
                name: format!("p{i}-{k}"),
            })?;
        }
        prune.time(&a, || {
            a.call(ControlRequest::Prune {
                volume: "p".into(),
                keep: 1,
                dry_run: false,
            })
        })?;
    }

    say("timing deletes");
    let mut delete = Series::new("snap delete")?;
    let mut deleted = 0;
    'del: for (v, list) in names.iter().enumerate().rev() {
        for name in list.iter().rev() {
            if deleted >= args.samples {
                break 'del;
            }
            // Unlocked snapshots only: the newest of the last volumes.
            let r = delete.time(&a, || {
                a.call(ControlRequest::SnapDelete {
                    volume: format!("v{v}"),
                    name: name.clone(),
                    force: false,
                })
            });
            if r.is_err() {
                continue;
            }
            deleted += 1;
        }
    }

    let mut limit = None;
    if args.find_limit {
        say("finding the per-volume snapshot limit");
        vol_create(&a, "limit")?;
        let mut n = 0usize;
        while n < 200_000 {
            let r = a.call(ControlRequest::SnapCreate {
                volume: "limit".into(),
                name: format!("l{n}"),
            });
            if r.is_err() {
                break;
            }
            n += 1;
        }
        limit = Some(n);
    }

    // Before A's restart, which gives A a new peer port (B's sources).
    let schedule = match args.every {
        Some(every) => Some(observe_schedule(&b, args, every)?),
        None => None,
    };

    say("restarting a");
    let mut restart = Series::new("restart to ready")?;
    for _ in 0..3 {
        a.stop();
        let t = Instant::now();
        let next = Node::start(&bin, dir, "a", &a.data)?;
        next.call(ControlRequest::Status)?;
        restart
            .h
            .record(
                u64::try_from(t.elapsed().as_micros())
                    .unwrap_or(u64::MAX)
                    .max(1),
            )
            .context("histogram record")?;
        a = next;
    }

    let report = ControlReport {
        snapshots: args.snapshots,
        volumes,
        per_volume: per.min(args.snapshots),
        locks: args.locks,
        relationships: args.relationships,
        per_volume_limit: limit,
        rss_kib,
        threads,
        rows: vec![
            create.row(true),
            delete.row(true),
            prune.row(true),
            snap_list.row(false),
            lock_list.row(false),
            status.row(false),
            mirror_status.row(false),
            update.row(false),
            restart.row(false),
        ],
        schedule,
    };
    drop(b);
    drop(a);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "control plane: {} snapshots over {} volumes ({} per volume at most), {} locks, {} relationships (+1 of v0); A after the build: RSS {} KiB, {} threads",
        report.snapshots,
        report.volumes,
        report.per_volume,
        report.locks,
        report.relationships,
        report.rss_kib,
        report.threads
    );
    if let Some(n) = report.per_volume_limit {
        println!("the engine refused snapshot {} of one volume", n + 1);
    }
    println!(
        "{:<34} {:>7} {:>10} {:>10} {:>14}",
        "op", "count", "p50 µs", "p99 µs", "bytes/op"
    );
    for r in &report.rows {
        println!(
            "{:<34} {:>7} {:>10} {:>10} {:>14}",
            r.op,
            r.count,
            r.p50_us,
            r.p99_us,
            r.write_bytes_per_op
                .map_or_else(|| "-".to_string(), |b| b.to_string())
        );
    }
    if let Some(s) = &report.schedule {
        println!(
            "schedule: {} relationships --every {}s watched {} s: {} updated, {} gaps, late p50 {} ms, p99 {} ms, max {} ms",
            s.relationships,
            s.every_s,
            s.observed_s,
            s.updated,
            s.gaps,
            s.p50_late_ms,
            s.p99_late_ms,
            s.max_late_ms
        );
    }
    Ok(())
}

/// Sample B's `mirror status` every second for `--observe` seconds and
/// measure the gaps between the updates of each scheduled relationship.
fn observe_schedule(b: &Node, args: &ControlArgs, every: u64) -> Result<ScheduleReport> {
    if !args.json {
        eprintln!(
            "... watching {} relationships --every {every}s for {} s",
            args.relationships, args.observe
        );
    }
    let mut seen: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    let end = Instant::now() + Duration::from_secs(args.observe);
    while Instant::now() < end {
        let t = Instant::now();
        let st = b.call(ControlRequest::MirrorStatus)?;
        for m in st.as_array().into_iter().flatten() {
            let (Some(dst), Some(at)) = (m["dst"].as_str(), m["last_update_unix_ms"].as_u64())
            else {
                continue;
            };
            if !dst.starts_with('m') {
                continue; // the v0 mirror has no schedule
            }
            let v = seen.entry(dst.to_string()).or_default();
            if v.last() != Some(&at) {
                v.push(at);
            }
        }
        std::thread::sleep(Duration::from_secs(1).saturating_sub(t.elapsed()));
    }
    let mut h = Histogram::<u64>::new_with_bounds(1, 24 * 3_600_000, 3).context("histogram")?;
    let mut updated = 0;
    for times in seen.values() {
        // The first value seen may be from before the window.
        if times.len() >= 2 {
            updated += 1;
        }
        for w in times.windows(2) {
            let late = (w[1] - w[0]).saturating_sub(every * 1000);
            h.record(late.max(1)).context("histogram record")?;
        }
    }
    Ok(ScheduleReport {
        every_s: every,
        observed_s: args.observe,
        relationships: args.relationships,
        updated,
        gaps: h.len(),
        p50_late_ms: h.value_at_quantile(0.5),
        p99_late_ms: h.value_at_quantile(0.99),
        max_late_ms: h.max(),
    })
}
