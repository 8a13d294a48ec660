//! `sluice-bench nbd`: fio's NBD engine (libnbd) against a Sluice export
//! and against `qemu-nbd` serving the raw device, in one run on one device
//! (a loop device on a file by default), for the design's NBD cases:
//! 128 KiB sequential write, 4 KiB random write and random read at QD 32.
//!
//! Order: qemu-nbd first (it uses the device raw), then a freshly
//! formatted pool with one volume for Sluice. Each target is filled once
//! (128 KiB sequential, untimed) before its cases, so reads and overwrites
//! hit written blocks on both. qemu-nbd runs with `--cache=none
//! --aio=io_uring` (O_DIRECT, like Sluice's device). The Sluice server is
//! the real `sluice::nbd::NbdServer` in this process on 127.0.0.1.
//!
//! Numbers only: a benchmark never passes or fails on a time.

use crate::fio::{self, FioJob};
use crate::loopdev::BenchDevice;
use crate::report::Measured;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use sluice::nbd::{NbdMetrics, NbdServer};
use sluice_engine::api::Request;
use sluice_engine::device::uring::{UringDevice, UringOptions};
use sluice_engine::pool::{FormatOptions, Pool};
use sluice_engine::shard::{Engine, EngineOptions};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug, Clone)]
pub struct NbdArgs {
    /// Benchmark this block device or file instead of a fresh loop device.
    /// Everything on it is overwritten.
    #[arg(long)]
    pub device: Option<PathBuf>,
    /// Size of the fresh loop device's backing file, e.g. 4G, 512M.
    #[arg(long, default_value = "4G", value_parser = crate::parse_size)]
    pub size: u64,
    /// Folder for the backing file (default: the system temp folder).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Seconds per case.
    #[arg(long, default_value_t = 10)]
    pub runtime: u64,
    /// Bytes the cases address (the export's working set).
    #[arg(long, default_value = "1G", value_parser = crate::parse_size)]
    pub span: u64,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
}

struct Case {
    name: &'static str,
    rw: &'static str,
    bs_bytes: usize,
    qd: usize,
}

const CASES: [Case; 3] = [
    Case {
        name: "128K seqwrite QD16",
        rw: "write",
        bs_bytes: 128 << 10,
        qd: 16,
    },
    Case {
        name: "4K randwrite QD32",
        rw: "randwrite",
        bs_bytes: 4096,
        qd: 32,
    },
    Case {
        name: "4K randread QD32",
        rw: "randread",
        bs_bytes: 4096,
        qd: 32,
    },
];

#[derive(Debug, Clone, Serialize)]
struct NbdRow {
    case: String,
    /// `qemu-nbd` or `sluice`.
    server: String,
    #[serde(flatten)]
    m: Measured,
    /// Sluice IOPS / qemu-nbd IOPS for the same case.
    ratio_to_qemu_nbd: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
struct NbdReport {
    device: String,
    runtime_s: u64,
    span_bytes: u64,
    client: String,
    rows: Vec<NbdRow>,
}

fn progress(args: &NbdArgs, what: &str) {
    if !args.json {
        eprintln!("... {what}");
    }
}

fn tool_works(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

pub fn run(args: &NbdArgs) -> Result<()> {
    if !fio::available() || !tool_works("fio", &["--enghelp=nbd"]) {
        bail!("fio with its nbd engine is needed (apt-get install -y fio)");
    }
    if !tool_works("qemu-nbd", &["--version"]) {
        bail!("qemu-nbd is needed (apt-get install -y qemu-utils)");
    }
    let dev = match &args.device {
        Some(p) => BenchDevice::given(p)?,
        None => BenchDevice::temporary(args.size, args.dir.as_deref())?,
    };
    if args.span > args.size / 2 {
        bail!(
            "--span ({}) must be at most half of --size ({}): the engine needs room to copy on write",
            args.span,
            args.size
        );
    }
    let mut rows = Vec::new();

    // 1. qemu-nbd on the raw device.
    progress(args, "qemu-nbd: starting");
    let port = free_port()?;
    let mut q = QemuNbd::start(&dev.path, port)?;
    let uri = format!("nbd://127.0.0.1:{port}/bench");
    let r = cases(args, &uri, "qemu-nbd", &mut rows);
    q.stop();
    r?;

    // 2. Sluice: a fresh pool, one volume, the NBD server in-process.
    progress(args, "sluice: formatting the pool");
    let udev = UringDevice::open(&dev.path, UringOptions::default())
        .with_context(|| format!("cannot open {}", dev.path.display()))?;
    let mut pool =
        Pool::format(udev, FormatOptions::default()).context("cannot format the bench pool")?;
    pool.execute(Request::CreateVolume {
        name: "bench".to_string(),
        size_bytes: args.span,
    })
    .context("cannot create the bench volume")?;
    let engine = Engine::start(pool, EngineOptions::default());
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind 127.0.0.1:0")?;
    let metrics = Arc::new(NbdMetrics::new());
    let server = NbdServer::start(listener, engine.clone(), metrics)
        .context("cannot start the NBD server")?;
    let uri = format!("nbd://{}/bench", server.local_addr());
    let r = cases(args, &uri, "sluice", &mut rows);
    server.shutdown();
    engine.shutdown().context("engine shutdown")?;
    r?;

    for i in 0..rows.len() {
        if rows[i].server != "sluice" {
            continue;
        }
        let base = rows
            .iter()
            .find(|b| b.server == "qemu-nbd" && b.case == rows[i].case)
            .map(|b| b.m.iops);
        rows[i].ratio_to_qemu_nbd = base.filter(|b| *b > 0.0).map(|b| rows[i].m.iops / b);
    }
    let report = NbdReport {
        device: dev.description.clone(),
        runtime_s: args.runtime,
        span_bytes: args.span,
        client: "fio --ioengine=nbd (libnbd), 1 job, 1 connection".to_string(),
        rows,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn cases(args: &NbdArgs, uri: &str, server: &str, rows: &mut Vec<NbdRow>) -> Result<()> {
    progress(
        args,
        &format!("{server}: fill (128K sequential over the span)"),
    );
    let fill = FioJob {
        rw: "write",
        bs_bytes: 128 << 10,
        iodepth: 16,
        size_bytes: args.span,
        runtime_s: args.runtime,
        time_based: false,
    };
    fio::run_nbd(uri, &fill).with_context(|| format!("{server}: fill"))?;
    for c in &CASES {
        progress(args, &format!("{server}: {}", c.name));
        let job = FioJob {
            rw: c.rw,
            bs_bytes: c.bs_bytes,
            iodepth: c.qd,
            size_bytes: args.span,
            runtime_s: args.runtime,
            time_based: true,
        };
        let m = fio::run_nbd(uri, &job).with_context(|| format!("{server}: {}", c.name))?;
        rows.push(NbdRow {
            case: c.name.to_string(),
            server: server.to_string(),
            m,
            ratio_to_qemu_nbd: None,
        });
    }
    Ok(())
}

fn print_table(r: &NbdReport) {
    println!(
        "device: {}   runtime per case: {} s   span: {} MiB   client: {}",
        r.device,
        r.runtime_s,
        r.span_bytes >> 20,
        r.client
    );
    println!();
    println!(
        "| {:<20} | {:<8} | {:>9} | {:>8} | {:>9} | {:>9} | {:>10} | {:>11} |",
        "case", "server", "IOPS", "MB/s", "p50 us", "p99 us", "p99.9 us", "vs qemu-nbd"
    );
    println!(
        "|{:-<22}|{:-<10}|{:->11}|{:->10}|{:->11}|{:->11}|{:->12}|{:->13}|",
        "", "", "", "", "", "", "", ""
    );
    for row in &r.rows {
        let ratio = row
            .ratio_to_qemu_nbd
            .map_or(String::new(), |x| format!("{x:.2}"));
        println!(
            "| {:<20} | {:<8} | {:>9.0} | {:>8.1} | {:>9.1} | {:>9.1} | {:>10.1} | {:>11} |",
            row.case,
            row.server,
            row.m.iops,
            row.m.mb_s,
            row.m.p50_us,
            row.m.p99_us,
            row.m.p999_us,
            ratio
        );
    }
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(l.local_addr()?.port())
}

/// A `qemu-nbd` child serving `device` raw as export `bench`; killed on stop
/// or drop.
struct QemuNbd {
    child: Option<Child>,
}

impl QemuNbd {
    fn start(device: &Path, port: u16) -> Result<QemuNbd> {
        let child = Command::new("qemu-nbd")
            .args([
                "--format=raw",
                "--cache=none",
                "--aio=io_uring",
                "--persistent",
                "--shared=4",
                "--export-name=bench",
                "--bind=127.0.0.1",
            ])
            .arg(format!("--port={port}"))
            .arg(device)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start qemu-nbd")?;
        let mut q = QemuNbd { child: Some(child) };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).is_err() {
            if let Some(c) = q.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    bail!("qemu-nbd exited at start: {status}");
                }
            }
            if Instant::now() > deadline {
                bail!("qemu-nbd does not listen on {addr}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(q)
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        self.stop();
    }
}
