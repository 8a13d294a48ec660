//! `sluice demo`: a whole cascade of real `sluice serve` processes on
//! file-backed pools in a temporary folder, talking over 127.0.0.1.
//!
//! ```text
//!            ┌──▶ B:vol0 ──▶ C:vol0          (volume mirrors, a chain)
//!   A:vol0 ──┤          └──▶ C:dbcopy/db     (a qtree mirror in the chain)
//!            └──▶ D:vol0                     (fan-out)
//! ```
//!
//! The workload is written on A through NBD (this binary's own small client,
//! so the demo needs nothing installed). A snapshots every round and prunes
//! to the newest one; B updates every round, D every second round, C every
//! third, so C lags several snapshots behind A. The same scenario then runs
//! again with lock propagation switched off (a demonstration switch of
//! `serve`), to show the chains soft locks kept intact. With soft locks on,
//! a last act kills B for good: C re-attaches to A (`mirror retarget`) and
//! goes on incrementally from the newest snapshot it shares with A, which A
//! kept for the locks B had relayed. The nodes of a scenario share a peer
//! secret made in its folder (`sluice secret create`'s function), so the
//! demo replicates authenticated and encrypted, as a real cascade would.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use sluice::control::{Client, ControlRequest};
use sluice::nbd_client::NbdClient;
use sluice::units::fmt_bytes;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

const POOL: &str = "256M";
const VOL_BYTES: u64 = 64 << 20;
const QTREE_BYTES: u64 = 8 << 20;
const ROUNDS: u64 = 6;
const BLOCK: usize = 4096;

/// One `sluice serve` child process.
struct Node {
    name: &'static str,
    child: Option<Child>,
    /// The control socket.
    control: String,
    /// The peer address: mirror sources name it.
    listen: String,
    nbd: String,
}

impl Node {
    /// Start node `name` on a new pool in `dir`; the nodes of one `dir`
    /// share the peer secret `dir/peer.secret` (created by the first).
    fn start(dir: &Path, name: &'static str, locks: bool) -> Result<Node> {
        let secret = dir.join("peer.secret");
        if !secret.exists() {
            sluice::auth::create_peer_secret(&secret)?;
        }
        let exe = std::env::current_exe().context("finding the sluice binary")?;
        let pool = dir.join(format!("{name}.img"));
        let out = Command::new(&exe)
            .args(["init", pool.to_str().unwrap_or_default(), "--size", POOL])
            .output()
            .context("running sluice init")?;
        if !out.status.success() {
            bail!(
                "init {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        let mut cmd = Command::new(&exe);
        cmd.args(["serve", "--data", pool.to_str().unwrap_or_default()])
            .args([
                "--listen",
                "127.0.0.1:0",
                "--nbd",
                "127.0.0.1:0",
                "--name",
                name,
            ])
            .arg("--peer-secret")
            .arg(&secret)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(log);
        if !locks {
            cmd.arg("--no-lock-propagation");
        }
        let mut child = cmd.spawn().context("starting sluice serve")?;
        let stdout = child.stdout.take().context("child stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .map(str::to_string)
        };
        let (Some(control), Some(listen), Some(nbd)) =
            (field("control="), field("listen="), field("nbd="))
        else {
            let _ = child.kill();
            bail!(
                "node {name} did not start; see {}",
                dir.join(format!("{name}.log")).display()
            );
        };
        Ok(Node {
            name,
            child: Some(child),
            control,
            listen,
            nbd,
        })
    }

    fn call(&self, req: ControlRequest) -> Result<Value> {
        Ok(Client::connect(&self.control)?.call(&req)?)
    }

    fn try_call(&self, req: ControlRequest) -> Result<Value, String> {
        Client::connect(&self.control)
            .and_then(|mut c| c.call(&req))
            .map_err(|e| e.to_string())
    }

    /// SIGKILL and wait: the node is lost.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait: the node takes its final consistency point.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// xorshift64: a fixed, printable workload.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// What one run of the scenario saw.
#[derive(Default)]
struct RunResult {
    incremental: u64,
    full_after_baseline: u64,
    broken: Vec<String>,
    identical: Vec<String>,
    reattached: Vec<String>,
}

pub fn run() -> Result<()> {
    let start = Instant::now();
    let dir = tempfile::tempdir().context("creating a temporary folder")?;
    sluice::out!(
        "sluice demo: a cascade of four nodes in {}",
        dir.path().display()
    );
    sluice::out!();
    sluice::out!("           ┌──▶ B:vol0 ──▶ C:vol0          volume mirrors (a chain)");
    sluice::out!("  A:vol0 ──┤          └──▶ C:dbcopy/db     qtree mirror of vol0/db");
    sluice::out!("           └──▶ D:vol0                     fan-out");
    sluice::out!();
    sluice::out!(
        "Each round writes ~1 % of vol0 and some of its qtree db on A through NBD, snapshots A\n\
         and prunes A to its newest snapshot (keep 1). B updates every round, D every 2nd,\n\
         C every 3rd: C lags behind snapshots that A's retention would delete.\n"
    );
    sluice::out!("== 1. with soft locks ==");
    let with = scenario(&dir.path().join("on"), true)?;
    sluice::out!();
    sluice::out!("== 2. the same with lock propagation switched off ==");
    let without = scenario(&dir.path().join("off"), false)?;
    sluice::out!();
    sluice::out!("== summary ==");
    sluice::out!(
        "with soft locks:    {} incremental updates, {} full copies after the baseline, {} broken chains",
        with.incremental,
        with.full_after_baseline,
        with.broken.len()
    );
    for i in with.reattached.iter().chain(&with.identical) {
        sluice::out!("                    {i}");
    }
    sluice::out!(
        "without soft locks: {} incremental updates, {} broken chains:",
        without.incremental,
        without.broken.len()
    );
    for b in &without.broken {
        sluice::out!("                    {b}");
    }
    sluice::out!(
        "\ndone in {:.1} s; the temporary folder is removed.",
        start.elapsed().as_secs_f64()
    );
    if !with.broken.is_empty() || with.full_after_baseline > 0 {
        bail!("a chain broke although soft locks were on");
    }
    Ok(())
}

fn write_round(a: &Node, rng: &mut Rng, round: u64) -> Result<u64> {
    let mut vol = NbdClient::open(&a.nbd, "vol0")?;
    let mut db = NbdClient::open(&a.nbd, "vol0/db")?;
    let mut written = 0;
    if round == 0 {
        // Baseline: 8 MiB of vol0 and 1 MiB of db.
        for mb in 0..8u64 {
            vol.write(mb << 20, &vec![(mb as u8) ^ 0x5a; 1 << 20])?;
        }
        db.write(0, &vec![0xdb; 1 << 20])?;
        written += 9 << 20;
    } else {
        let blocks = VOL_BYTES / BLOCK as u64;
        for _ in 0..blocks / 100 {
            let lba = rng.next() % blocks;
            let mut b = vec![0u8; BLOCK];
            b[..8].copy_from_slice(&rng.next().to_le_bytes());
            b[8] = round as u8;
            vol.write(lba * BLOCK as u64, &b)?;
            written += BLOCK as u64;
        }
        let qblocks = QTREE_BYTES / BLOCK as u64;
        for _ in 0..qblocks / 50 {
            let lba = rng.next() % qblocks;
            db.write(lba * BLOCK as u64, &vec![round as u8; BLOCK])?;
            written += BLOCK as u64;
        }
    }
    vol.flush()?;
    db.flush()?;
    Ok(written)
}

fn cell(r: &Result<Value, String>, out: &mut RunResult, who: &str, round: u64) -> String {
    match r {
        Ok(v) => {
            let kind = v["kind"].as_str().unwrap_or("?");
            match kind {
                "incremental" => out.incremental += 1,
                "full" => out.full_after_baseline += 1,
                _ => {}
            }
            let short = match kind {
                "incremental" => "incr",
                "none" => "same",
                k => k,
            };
            format!("{short} {}", fmt_bytes(v["bytes"].as_u64().unwrap_or(0)))
        }
        Err(e) => {
            let full = e
                .split("sends ")
                .nth(1)
                .and_then(|t| t.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok())
                .map(|b| format!(", a full copy of {} needed", fmt_bytes(b)))
                .unwrap_or_default();
            let why = if e.contains("no common snapshot") {
                "no common snapshot left"
            } else {
                e.as_str()
            };
            out.broken
                .push(format!("round {round}: {who}: {why}{full}"));
            "BROKEN".into()
        }
    }
}

fn scenario(dir: &Path, locks: bool) -> Result<RunResult> {
    std::fs::create_dir_all(dir)?;
    let mut nodes = Vec::new();
    for name in ["A", "B", "C", "D"] {
        nodes.push(Node::start(dir, name, locks)?);
    }
    let mut result = drive(&nodes);
    if locks {
        if let Ok(out) = &mut result {
            reattach(&mut nodes, out)?;
        }
    }
    for n in &mut nodes {
        n.stop();
    }
    result
}

fn mirror(n: &Node, dst: &str, source: String) -> Result<Value> {
    n.call(ControlRequest::MirrorCreate {
        keep: None,
        dst_volume: dst.into(),
        source,
        dst_qtree: None,
        every_secs: None,
        follow: false,
        throttle_bps: None,
    })
    .with_context(|| format!("mirror create on {}", n.name))
}

fn update(n: &Node, dst: &str) -> Result<Value, String> {
    n.try_call(ControlRequest::MirrorUpdate { dst: dst.into() })
}

fn drive(nodes: &[Node]) -> Result<RunResult> {
    let (a, b, c, d) = (&nodes[0], &nodes[1], &nodes[2], &nodes[3]);
    let mut out = RunResult::default();
    let mut rng = Rng(0x5eed_cafe);
    a.call(ControlRequest::VolCreate {
        name: "vol0".into(),
        size_bytes: VOL_BYTES,
    })?;
    a.call(ControlRequest::QtreeCreate {
        volume: "vol0".into(),
        name: "db".into(),
        size_bytes: QTREE_BYTES,
    })?;
    write_round(a, &mut rng, 0)?;
    a.call(ControlRequest::SnapCreate {
        volume: "vol0".into(),
        name: "r0".into(),
    })?;
    let base = [
        ("B:vol0", mirror(b, "vol0", format!("{}/vol0", a.listen))?),
        ("C:vol0", mirror(c, "vol0", format!("{}/vol0", b.listen))?),
        (
            "C:dbcopy/db",
            mirror(c, "dbcopy", format!("{}/vol0/db", b.listen))?,
        ),
        ("D:vol0", mirror(d, "vol0", format!("{}/vol0", a.listen))?),
    ];
    sluice::out!(
        "baseline r0: {}",
        base.iter()
            .map(|(w, v)| format!(
                "{w} {} {}",
                v["kind"].as_str().unwrap_or("?"),
                fmt_bytes(v["bytes"].as_u64().unwrap_or(0))
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    sluice::out!();
    sluice::out!(
        "{:<6} {:>9} {:<22} {:<14} {:<14} {:<14} {:<14}",
        "round",
        "written",
        "A keeps",
        "B:vol0",
        "C:vol0",
        "C:dbcopy/db",
        "D:vol0"
    );
    for round in 1..=ROUNDS {
        let written = write_round(a, &mut rng, round)?;
        a.call(ControlRequest::SnapCreate {
            volume: "vol0".into(),
            name: format!("r{round}"),
        })?;
        a.call(ControlRequest::Prune {
            volume: "vol0".into(),
            keep: 1,
            dry_run: false,
        })?;
        let kept: Vec<String> = a
            .call(ControlRequest::SnapList {
                volume: "vol0".into(),
            })?
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| s["name"].as_str().unwrap_or("?").to_string())
            .collect();
        let last = round == ROUNDS;
        let mut row = Vec::new();
        for (who, node, dst, every) in [
            ("B:vol0", b, "vol0", 1),
            ("C:vol0", c, "vol0", 3),
            ("C:dbcopy/db", c, "dbcopy", 3),
            ("D:vol0", d, "vol0", 2),
        ] {
            if round % every == 0 || last {
                row.push(cell(&update(node, dst), &mut out, who, round));
            } else {
                row.push("-".into());
            }
        }
        sluice::out!(
            "r{:<5} {:>9} {:<22} {:<14} {:<14} {:<14} {:<14}",
            round,
            fmt_bytes(written),
            kept.join(" "),
            row[0],
            row[1],
            row[2],
            row[3]
        );
    }
    sluice::out!();
    print_locks(a)?;
    check_identical(a, &[b, c, d], c, &format!("r{ROUNDS}"), &mut out)?;
    Ok(out)
}

/// The last act: B is lost for good; C re-attaches to A past it and goes
/// on incrementally, D (a mirror of A) notices nothing.
fn reattach(nodes: &mut [Node], out: &mut RunResult) -> Result<()> {
    sluice::out!();
    sluice::out!("== 3. B is lost for good: C re-attaches to A ==");
    let mut rng = Rng(0xdead_beef);
    fn a_round(a: &Node, rng: &mut Rng, round: u64) -> Result<(u64, Vec<String>)> {
        let written = write_round(a, rng, round)?;
        a.call(ControlRequest::SnapCreate {
            volume: "vol0".into(),
            name: format!("r{round}"),
        })?;
        a.call(ControlRequest::Prune {
            volume: "vol0".into(),
            keep: 1,
            dry_run: false,
        })?;
        let kept = a
            .call(ControlRequest::SnapList {
                volume: "vol0".into(),
            })?
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| s["name"].as_str().unwrap_or("?").to_string())
            .collect();
        Ok((written, kept))
    }
    // One more round that B and D follow and C does not: C's base r6 is
    // then held on A only by the lock B relays for C.
    let round = ROUNDS + 1;
    a_round(&nodes[0], &mut rng, round)?;
    let b_cell = cell(&update(&nodes[1], "vol0"), out, "B:vol0", round);
    let d_cell = cell(&update(&nodes[3], "vol0"), out, "D:vol0", round);
    sluice::out!("r{round}: B:vol0 {b_cell}, D:vol0 {d_cell}, C lags at r{ROUNDS}");
    nodes[1].kill();
    let (a, c, d) = (&nodes[0], &nodes[2], &nodes[3]);
    let round = round + 1;
    let (written, kept) = a_round(a, &mut rng, round)?;
    sluice::out!(
        "B killed (SIGKILL). A wrote {} more, took r{round}, pruned to keep 1 and keeps {}:\n\
         r{ROUNDS} only for C's locks, which B relayed before it died.",
        fmt_bytes(written),
        kept.join(" ")
    );
    for (who, dst, source) in [
        ("C:vol0", "vol0", format!("{}/vol0", a.listen)),
        ("C:dbcopy/db", "dbcopy", format!("{}/vol0/db", a.listen)),
    ] {
        sluice::out!("  sluice mirror retarget {dst} --from {source}   (on C)");
        let r = c.try_call(ControlRequest::MirrorRetarget {
            dst: dst.into(),
            source,
            allow_full: false,
        });
        match &r {
            Ok(v) => {
                let t = &v["transfer"];
                let kind = t["kind"].as_str().unwrap_or("?");
                if kind == "full" {
                    out.full_after_baseline += 1;
                } else if kind == "incremental" {
                    out.incremental += 1;
                }
                let line = format!(
                    "{who}: re-attached to A, went on from {} with an {kind} transfer of {} to {}{}",
                    v["base"]["name"].as_str().unwrap_or("?"),
                    fmt_bytes(t["bytes"].as_u64().unwrap_or(0)),
                    t["target"]["name"].as_str().unwrap_or("?"),
                    if v["released_old_upstream"] == false {
                        " (B unreachable: its locks on A go stale under their lease)"
                    } else {
                        ""
                    }
                );
                sluice::out!("  {line}");
                out.reattached.push(line);
                if let Some(e) = v["transfer_error"].as_str() {
                    out.broken.push(format!("{who}: after the retarget: {e}"));
                }
            }
            Err(e) => out.broken.push(format!("{who}: retarget: {e}")),
        }
    }
    let d_cell = cell(&update(d, "vol0"), out, "D:vol0", round);
    sluice::out!("  D:vol0 (from A, untouched by the loss): {d_cell}");
    sluice::out!();
    print_locks(a)?;
    check_identical(a, &[c, d], c, &format!("r{round}"), out)
}

fn print_locks(a: &Node) -> Result<()> {
    let locks = a.call(ControlRequest::LockList)?;
    let locks = locks.as_array().cloned().unwrap_or_default();
    if locks.is_empty() {
        sluice::out!("locks on A: none");
        return Ok(());
    }
    sluice::out!("locks on A (why A keeps the snapshots it keeps):");
    for l in locks {
        let snap = match (l["volume"].as_str(), l["snapshot"].as_str()) {
            (Some(v), Some(s)) => format!("{v}@{s}"),
            _ => l["snapshot_id"].as_str().unwrap_or("?").to_string(),
        };
        let hops: Vec<&str> = l["hop_path"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        sluice::out!(
            "  {:<10} held for {:<22} ({}, from node {}, via {})",
            snap,
            l["text"].as_str().unwrap_or("?"),
            l["kind"].as_str().unwrap_or("?"),
            l["origin_node"].as_str().unwrap_or("?"),
            if hops.is_empty() {
                "-".to_string()
            } else {
                hops.join(" > ")
            }
        );
    }
    sluice::out!();
    Ok(())
}

/// Compare every mirror in `others` with A at A's snapshot `target`, and
/// C's qtree mirror with A's qtree: content digests, and the bytes
/// themselves read through NBD.
fn check_identical(
    a: &Node,
    others: &[&Node],
    c: &Node,
    target: &str,
    out: &mut RunResult,
) -> Result<()> {
    let snaps = |n: &Node, vol: &str| -> Result<Vec<Value>> {
        Ok(n.call(ControlRequest::SnapList { volume: vol.into() })?
            .as_array()
            .cloned()
            .unwrap_or_default())
    };
    let find = |list: &[Value], id: &Value| list.iter().find(|s| &s["id"] == id).cloned();
    let a_snaps = snaps(a, "vol0")?;
    let Some(a_last) = a_snaps.iter().find(|s| s["name"] == target).cloned() else {
        return Ok(());
    };
    let read_all = |n: &Node, export: &str, size: u64| -> Result<Vec<u8>> {
        let mut c = NbdClient::open(&n.nbd, export)?;
        let mut all = Vec::with_capacity(size as usize);
        let mut off = 0;
        while off < size {
            all.extend(c.read(off, (1 << 20).min(size - off) as u32)?);
            off += 1 << 20;
        }
        Ok(all)
    };
    let a_bytes = read_all(a, &format!("vol0@{target}"), VOL_BYTES)?;
    let a_db = read_all(a, &format!("vol0/db@{target}"), QTREE_BYTES)?;
    for n in others {
        let Some(s) = find(&snaps(n, "vol0")?, &a_last["id"]) else {
            continue;
        };
        let same_digest = s["digests"] == a_last["digests"];
        let same_bytes = read_all(n, &format!("vol0@{target}"), VOL_BYTES)? == a_bytes;
        out.identical.push(format!(
            "{}:vol0@{target} vs A: content digest {}, bytes read through NBD {}",
            n.name,
            if same_digest { "equal" } else { "DIFFERENT" },
            if same_bytes { "identical" } else { "DIFFERENT" }
        ));
    }
    if let Ok(db) = read_all(c, "dbcopy/db", QTREE_BYTES) {
        out.identical.push(format!(
            "C:dbcopy/db vs A:vol0/db@{target}: bytes read through NBD {}",
            if db == a_db { "identical" } else { "DIFFERENT" }
        ));
    }
    Ok(())
}
