//! Runs fio with the same workload as an engine case and reads its JSON.
//! [`run_jobs`] runs several jobs at once, each over its own range of the
//! device, and reads their group report (IOPS summed, latency merged).

use crate::report::Measured;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;
use std::process::Command;

pub fn available() -> bool {
    Command::new("fio")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// One fio job; `rw` is fio's (`randwrite`, `randread`, `write`).
pub struct FioJob<'a> {
    pub rw: &'a str,
    pub bs_bytes: usize,
    pub iodepth: usize,
    pub size_bytes: u64,
    pub runtime_s: u64,
    /// false: run once over `size_bytes` (a fill), not for `runtime_s`.
    pub time_based: bool,
}

pub fn run(device: &Path, job: &FioJob) -> Result<Measured> {
    let mut cmd = Command::new("fio");
    cmd.arg(format!("--filename={}", device.display()))
        .args(["--ioengine=io_uring", "--direct=1"]);
    measure(cmd, job, 1)
}

/// `numjobs` copies of `job` at once on `device`, each job over its own
/// `size_bytes` (job `i` starts at `i * size_bytes`: `--offset_increment`),
/// reported as one group: IOPS and MB/s summed, latency percentiles over
/// every job's requests.
pub fn run_jobs(device: &Path, job: &FioJob, numjobs: usize) -> Result<Measured> {
    let mut cmd = Command::new("fio");
    cmd.arg(format!("--filename={}", device.display()))
        .args(["--ioengine=io_uring", "--direct=1"]);
    measure(cmd, job, numjobs.max(1))
}

/// The same job through fio's NBD engine (libnbd) against `uri`
/// (`nbd://127.0.0.1:PORT/EXPORT`).
pub fn run_nbd(uri: &str, job: &FioJob) -> Result<Measured> {
    let mut cmd = Command::new("fio");
    cmd.args(["--ioengine=nbd", &format!("--uri={uri}")]);
    measure(cmd, job, 1)
}

fn measure(mut cmd: Command, job: &FioJob, numjobs: usize) -> Result<Measured> {
    cmd.arg("--name=sluice-bench")
        .arg(format!("--numjobs={numjobs}"))
        .arg("--output-format=json")
        .args([
            "--lat_percentiles=1",
            "--percentile_list=50:99:99.9",
            "--norandommap",
            "--randrepeat=0",
        ])
        .arg(format!("--rw={}", job.rw))
        .arg(format!("--bs={}", job.bs_bytes))
        .arg(format!("--iodepth={}", job.iodepth))
        .arg(format!("--size={}", job.size_bytes));
    if numjobs > 1 {
        cmd.arg(format!("--offset_increment={}", job.size_bytes))
            .arg("--group_reporting");
    }
    if job.time_based {
        cmd.arg("--time_based")
            .arg(format!("--runtime={}", job.runtime_s));
    }
    let out = cmd.output().context("cannot run fio")?;
    if !out.status.success() {
        bail!(
            "fio failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notes before the JSON document.
    let start = text.find('{').context("fio printed no JSON")?;
    let v: Value = serde_json::from_str(&text[start..]).context("cannot parse fio JSON")?;
    let job_v = v
        .get("jobs")
        .and_then(|j| j.get(0))
        .context("fio JSON has no jobs")?;
    let dir = if job.rw.contains("read") {
        "read"
    } else {
        "write"
    };
    let d = job_v
        .get(dir)
        .context("fio JSON has no read/write section")?;
    let num = |x: Option<&Value>| x.and_then(Value::as_f64).unwrap_or(0.0);
    let lat = d.get("lat_ns").or_else(|| d.get("clat_ns"));
    let pct = |p: &str| num(lat.and_then(|l| l.get("percentile")).and_then(|m| m.get(p))) / 1000.0;
    Ok(Measured {
        iops: num(d.get("iops")),
        mb_s: num(d.get("bw_bytes")) / 1e6,
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
        p999_us: pct("99.900000"),
    })
}
