//! `sluice-bench soak`: a soak run with fault injection on real `sluice
//! serve` processes (docs/SOAK.md). This module owns the run: its
//! arguments, the seeded random source every choice comes from, the
//! topology (which node pulls which volume from which node, through which
//! proxy), the main loop that interleaves snapshots, application locks,
//! clones, faults and checks, and the end of the run (heal, catch up, final checks,
//! report, exit status).
//!
//! Submodules: `control` (every CLI call: the one place to adapt when the
//! control transport changes), `cluster` (processes), `proxy` (network
//! faults), `nbd` (the writers' client), `model` (patterns, expected
//! content), `workload` (writers), `faults` (what to break, when), `checks`
//! (what must hold), `clones` (clones made and deleted, and their checks),
//! `report`.
//!
//! Invariants: the main loop is the only thread that changes the topology,
//! the node states, the snapshot models and the lock bookkeeping; writers
//! only touch their namespaces' block models, under the namespace gate.

mod checks;
mod clones;
mod cluster;
mod control;
mod faults;
mod model;
mod proxy;
mod report;
mod workload;

use anyhow::{bail, Context, Result};
use cluster::{Node, NodeState};
use control::Ctl;
use model::{Namespace, SnapModel};
use proxy::Proxy;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use report::{NodeReport, Report, Tally};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug, Clone)]
pub struct SoakArgs {
    /// Minutes of workload and faults (then: heal, catch up, final checks).
    #[arg(long, default_value_t = 10.0)]
    pub minutes: f64,
    /// Nodes: A (source), B (mirror of A), C (mirror of B), D (mirror of A),
    /// then each further node a mirror of the one before, below C. At least 4.
    #[arg(long, default_value_t = 4)]
    pub nodes: usize,
    /// Seed of every random choice (default: $SLUICE_SEED, else random; printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Write the report here: `.md` gives markdown, anything else JSON.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// The `sluice` binary (default: next to this one).
    #[arg(long)]
    pub sluice: Option<PathBuf>,
    /// Folder for pools and logs (default: a temp folder, kept on violation).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Seconds between faults: at random in MIN..MAX.
    #[arg(long, default_value_t = 8)]
    pub fault_gap_min_secs: u64,
    #[arg(long, default_value_t = 25)]
    pub fault_gap_max_secs: u64,
    /// Seconds between node kills (SIGKILL or power cut), at random in
    /// MIN..MAX, on their own schedule; without these, kills are one of the
    /// faults above.
    #[arg(long, requires = "kill_gap_max_secs")]
    pub kill_gap_min_secs: Option<u64>,
    #[arg(long, requires = "kill_gap_min_secs")]
    pub kill_gap_max_secs: Option<u64>,
    /// Pools straight on loop devices over plain files: no disk faults and
    /// no power cuts (they need root and /dev/fuse; without them this is
    /// what happens anyway).
    #[arg(long)]
    pub no_disk_faults: bool,
    /// Lease on the lock sets every node sends upstream, ms.
    #[arg(long, default_value_t = 6000)]
    pub lease_ms: u64,
    /// Bound on every node's resident set, MiB.
    #[arg(long, default_value_t = 1024)]
    pub rss_max_mib: u64,
    /// Writers per namespace.
    #[arg(long, default_value_t = 2)]
    pub writers: u64,
}

/// Volumes on A; `v1` also holds the qtree `db` (mirrored on B into `qv/db`).
pub const VOLUMES: [&str; 3] = ["v1", "v2", "v3"];
const VOL_SIZE: &str = "32M";
const QTREE_SIZE: &str = "8M";
const SPAN_BLOCKS: u64 = 1024;
const SOURCE_KEEP: usize = 3;
const MIRROR_KEEP: usize = 4;
pub const APP_OWNER: &str = "soak-app";

/// A mirror relationship, as the harness set it up.
#[derive(Clone, Debug)]
pub struct Rel {
    /// The destination node.
    pub node: usize,
    /// Its destination path (`mirror status` dst).
    pub dst: String,
    /// The volume on the destination node.
    pub dst_volume: String,
    /// The node it pulls from now.
    pub upstream: usize,
    /// Source path on the upstream: `VOL` or `VOL/QTREE`.
    pub source_path: String,
    /// Full transfers it may have had (the baseline; more after an allowed re-baseline).
    pub full_allowed: u64,
}

/// An application lock the harness holds on a downstream node.
#[derive(Clone, Debug)]
pub struct AppLock {
    pub node: usize,
    pub volume: String,
    pub snap: String,
    pub snap_id: String,
    /// Nodes that had the snapshot when the lock was added (they must keep it).
    pub holders_above: Vec<usize>,
    pub release_at: Instant,
}

/// What the main loop has scheduled for later.
#[derive(Clone, Debug)]
pub enum Pending {
    Restart(usize),
    Cont(usize),
    /// The disk fault on this node ends (then a poisoned pool is restarted).
    DiskHeal(usize),
}

pub struct Soak {
    args: SoakArgs,
    ctl: Ctl,
    tally: Arc<Tally>,
    rng: SmallRng,
    _tmp: Option<tempfile::TempDir>,
    dir: PathBuf,
    nodes: Vec<Node>,
    /// (downstream, upstream) -> the proxy the downstream reaches it through.
    proxies: HashMap<(usize, usize), Proxy>,
    rels: Vec<Rel>,
    namespaces: Vec<Arc<Namespace>>,
    /// Snapshot name (unique over the run) -> what it must hold.
    snaps: BTreeMap<String, SnapModel>,
    snap_counter: u64,
    app_locks: Vec<AppLock>,
    /// Clones alive (made by `clone_step`), and how many were asked for.
    clones: Vec<clones::CloneRec>,
    clone_counter: u64,
    /// Snapshot ids whose app lock was released, and when.
    released: Vec<(String, Instant)>,
    pending: Vec<(Instant, Pending)>,
    /// (node, snapshot id, namespace id) read back byte for byte already.
    verified: HashSet<(usize, String, u32)>,
    /// (snapshot id, namespace id) -> the digest first seen.
    digests: HashMap<(String, u32), (usize, String)>,
    /// (node, dst) -> (full, incremental, last finished_unix_ms) seen.
    /// Per (node, relationship): full, incremental, last finish, resumed.
    transfers: HashMap<(usize, String), (u64, u64, u64, u64)>,
    reported: HashSet<String>,
    source_up: Arc<AtomicBool>,
    stop_writers: Arc<AtomicBool>,
    writers: Vec<std::thread::JoinHandle<()>>,
    middle_lost: bool,
}

fn default_sluice() -> Result<PathBuf> {
    let me = std::env::current_exe().context("current_exe")?;
    let p = me.with_file_name("sluice");
    if !p.exists() {
        bail!(
            "no sluice binary at {} (build it: cargo build --release, or pass --sluice)",
            p.display()
        );
    }
    Ok(p)
}

/// Run the soak; Ok(true) when no check was violated.
pub fn run(args: &SoakArgs) -> Result<bool> {
    if args.nodes < 4 {
        bail!("--nodes must be at least 4 (A -> B -> C and A -> D)");
    }
    if args.fault_gap_min_secs == 0 || args.fault_gap_max_secs < args.fault_gap_min_secs {
        bail!("fault gaps: 1 <= min <= max");
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::env::var("SLUICE_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random)
    });
    eprintln!(
        "soak: seed {seed} (replay: sluice-bench soak --seed {seed} --minutes {} --nodes {} and the same fault options; the report gives the whole command)",
        args.minutes, args.nodes
    );
    let ctl = Ctl {
        bin: match &args.sluice {
            Some(p) => p.clone(),
            None => default_sluice()?,
        },
    };
    let (tmp, dir) = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            (None, d.clone())
        }
        None => {
            let t = tempfile::Builder::new().prefix("sluice-soak-").tempdir()?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    let mut s = Soak {
        args: args.clone(),
        ctl,
        tally: Arc::new(Tally::new(seed)),
        rng: SmallRng::seed_from_u64(seed),
        _tmp: tmp,
        dir,
        nodes: Vec::new(),
        proxies: HashMap::new(),
        rels: Vec::new(),
        namespaces: Vec::new(),
        snaps: BTreeMap::new(),
        snap_counter: 0,
        app_locks: Vec::new(),
        clones: Vec::new(),
        clone_counter: 0,
        released: Vec::new(),
        pending: Vec::new(),
        verified: HashSet::new(),
        digests: HashMap::new(),
        transfers: HashMap::new(),
        reported: HashSet::new(),
        source_up: Arc::new(AtomicBool::new(false)),
        stop_writers: Arc::new(AtomicBool::new(false)),
        writers: Vec::new(),
        middle_lost: false,
    };
    let result = s.run_all();
    s.stop_writers.store(true, Ordering::SeqCst);
    for w in s.writers.drain(..) {
        let _ = w.join();
    }
    if let Err(e) = &result {
        s.tally
            .violation("harness", format!("the run stopped: {e:#}"));
    }
    for n in s.nodes.iter_mut() {
        if n.state == NodeState::Up || n.state == NodeState::Stopped {
            match n.terminate() {
                Some(st) if st.success() => {}
                other => s.tally.violation(
                    "clean-shutdown",
                    format!("node {} after SIGTERM: {other:?}", n.name),
                ),
            }
        }
    }
    s.check_panics();
    let violations = s.tally.violations();
    let report = s.report();
    if let Some(path) = &args.report {
        let text = if path.extension().is_some_and(|e| e == "md") {
            report.markdown()
        } else {
            report.json()
        };
        std::fs::write(path, text).with_context(|| format!("write {}", path.display()))?;
        eprintln!("soak: report in {}", path.display());
    }
    eprintln!(
        "soak: seed {seed}: {} violations; counts: {}",
        violations.len(),
        serde_json::to_string(&report.counts).unwrap_or_default()
    );
    if !violations.is_empty() {
        if let Some(t) = s._tmp.take() {
            eprintln!("soak: pools and logs kept in {}", t.keep().display());
        }
    }
    Ok(violations.is_empty())
}

impl Soak {
    fn name(i: usize) -> String {
        ((b'a' + i as u8) as char).to_string()
    }

    /// The node a volume mirror on node `i` pulls from at the start.
    fn first_upstream(i: usize) -> usize {
        match i {
            1 | 3 => 0,
            2 => 1,
            4 => 2,
            n => n - 1,
        }
    }

    /// What `--node` takes to reach node `i`'s control API.
    fn addr(&self, i: usize) -> String {
        self.nodes[i].control.clone()
    }

    /// Up, and its disk answering (a node under a disk fault is alive, but
    /// its reads may fail: the checks and the other faults leave it alone).
    fn up(&self, i: usize) -> bool {
        self.nodes[i].state == NodeState::Up && !self.nodes[i].disk_faulted
    }

    fn run_all(&mut self) -> Result<()> {
        self.setup()?;
        self.start_writers();
        self.main_loop()?;
        self.finish()
    }

    fn setup(&mut self) -> Result<()> {
        let pool_bytes = 512u64 << 20;
        for i in 0..self.args.nodes {
            let mut n = Node::create(
                &self.ctl,
                &self.dir,
                &Self::name(i),
                pool_bytes,
                self.args.lease_ms,
                !self.args.no_disk_faults,
            )?;
            n.start(&self.ctl)?;
            self.tally.event(format!(
                "node {} on {}{} control {} nbd {}",
                n.name,
                n.device,
                if n.faults.is_some() {
                    " (over a fault disk)"
                } else {
                    ""
                },
                n.listen,
                n.nbd
            ));
            self.nodes.push(n);
        }
        for d in 0..self.nodes.len() {
            for u in 0..self.nodes.len() {
                if d != u {
                    let p = Proxy::start(&self.nodes[u].listen)?;
                    self.proxies.insert((d, u), p);
                }
            }
        }
        let a = self.addr(0);
        let mut id = 0u32;
        for v in VOLUMES {
            self.ctl.vol_create(&a, v, VOL_SIZE)?;
            self.namespaces
                .push(Arc::new(Namespace::new(id, v, v, "", SPAN_BLOCKS)));
            id += 1;
            if v == "v1" {
                self.ctl.qtree_create(&a, v, "db", QTREE_SIZE)?;
                self.namespaces
                    .push(Arc::new(Namespace::new(id, "v1/db", v, "db", SPAN_BLOCKS)));
                id += 1;
            }
            self.ctl.vol_retain(&a, v, SOURCE_KEEP)?;
        }
        self.source_up.store(true, Ordering::SeqCst);
        for v in VOLUMES {
            self.snapshot(v)?;
        }
        // Volume mirrors, in node order (each upstream has its baseline first).
        for i in 1..self.nodes.len() {
            let up = Self::first_upstream(i);
            for v in VOLUMES {
                let every = 4 + (i as u64 % 4);
                self.create_rel(i, v, v, up, v, every)?;
            }
        }
        // The qtree mirror between the same pair as B's volume mirrors.
        self.create_rel(1, "qv/db", "qv", 0, "v1/db", 5)?;
        Ok(())
    }

    fn create_rel(
        &mut self,
        node: usize,
        dst: &str,
        dst_vol: &str,
        up: usize,
        src: &str,
        every: u64,
    ) -> Result<()> {
        let source = format!("{}/{src}", self.proxies[&(node, up)].addr);
        // The volume mirrors of every second node (C, E, ...) also follow
        // their source: updates started by the snapshot watch, through the
        // same proxies and faults as the scheduled ones.
        let follow = node.is_multiple_of(2) && dst == dst_vol;
        let r = self.ctl.mirror_create(
            &self.addr(node),
            dst_vol,
            &source,
            every,
            MIRROR_KEEP,
            follow,
        )?;
        self.tally.add("transfers.baseline", 1);
        self.tally.event(format!(
            "{}: mirror {dst} <- {}:{src} every {every}s{} keep {MIRROR_KEEP}: {}",
            Self::name(node),
            Self::name(up),
            if follow { " --follow" } else { "" },
            r["kind"]
        ));
        self.rels.push(Rel {
            node,
            dst: dst.to_string(),
            dst_volume: dst_vol.to_string(),
            upstream: up,
            source_path: src.to_string(),
            full_allowed: 1,
        });
        Ok(())
    }

    fn topology(&self) -> Vec<String> {
        let mut t: Vec<String> = self
            .rels
            .iter()
            .map(|r| {
                format!(
                    "{}:{} <- {}:{} (through a proxy)",
                    Self::name(r.node),
                    r.dst,
                    Self::name(r.upstream),
                    r.source_path
                )
            })
            .collect();
        t.push(format!(
            "retention: A keeps {SOURCE_KEEP} per volume, every mirror {MIRROR_KEEP}; lease {} ms (policy keep)",
            self.args.lease_ms
        ));
        t
    }

    fn start_writers(&mut self) {
        let nbd = self.nodes[0].nbd.clone();
        for ns in &self.namespaces {
            for w in 0..self.args.writers {
                let writer = workload::Writer {
                    ns: ns.clone(),
                    index: w,
                    writers: self.args.writers,
                    nbd_addr: nbd.clone(),
                    seed: self.tally.seed,
                    rng_seed: self.rng.gen(),
                    tally: self.tally.clone(),
                    stop: self.stop_writers.clone(),
                    source_up: self.source_up.clone(),
                };
                self.writers.push(std::thread::spawn(move || writer.run()));
            }
        }
    }

    /// Take a snapshot of `vol` on A with its writers held off; record its model.
    fn snapshot(&mut self, vol: &str) -> Result<()> {
        self.snap_counter += 1;
        let name = format!("s{}", self.snap_counter);
        let nss: Vec<Arc<Namespace>> = self
            .namespaces
            .iter()
            .filter(|n| n.volume == vol)
            .cloned()
            .collect();
        let gates: Vec<_> = nss
            .iter()
            .map(|n| n.gate.write().unwrap_or_else(|p| p.into_inner()))
            .collect();
        let images: BTreeMap<u32, Vec<u64>> = nss.iter().map(|n| (n.id, n.image())).collect();
        let r = self.ctl.snap_create(&self.addr(0), vol, &name);
        drop(gates);
        r?;
        self.tally.add("snapshots", 1);
        self.snaps.insert(
            name,
            SnapModel {
                t_secs: self.tally.secs(),
                images,
            },
        );
        Ok(())
    }

    fn main_loop(&mut self) -> Result<()> {
        let end = Instant::now() + Duration::from_secs_f64(self.args.minutes * 60.0);
        let started = Instant::now();
        let mut next_snap = Instant::now();
        let mut next_fault = Instant::now() + self.fault_gap();
        let mut next_kill = self.kill_gap().map(|g| Instant::now() + g);
        let mut next_lock = Instant::now() + Duration::from_secs(10);
        let mut next_clone = Instant::now() + Duration::from_secs(15);
        let mut next_check = Instant::now() + Duration::from_secs(20);
        let mut next_rss = Instant::now();
        let lose_at = started + Duration::from_secs_f64(self.args.minutes * 60.0 * 0.55);
        while Instant::now() < end {
            let now = Instant::now();
            self.run_pending(false)?;
            self.check_exits();
            if now >= next_snap {
                if self.up(0) {
                    let v = VOLUMES[self.rng.gen_range(0..VOLUMES.len())];
                    if let Err(e) = self.snapshot(v) {
                        self.tally.add("snapshots.failed", 1);
                        self.tally
                            .event(format!("snap create {v} on a failed: {e:#}"));
                    }
                }
                next_snap = now + Duration::from_millis(self.rng.gen_range(1500..4000));
            }
            if now >= lose_at && !self.middle_lost && self.up(0) && self.up(1) && self.up(2) {
                self.lose_middle()?;
            } else if now >= next_fault {
                self.inject()?;
                next_fault = now + self.fault_gap();
            } else if next_kill.is_some_and(|k| now >= k) {
                self.kill_one()?;
                next_kill = self.kill_gap().map(|g| now + g);
            }
            if now >= next_lock {
                self.app_lock_step();
                next_lock = now + Duration::from_millis(self.rng.gen_range(4000..12000));
            }
            if now >= next_clone {
                self.clone_step();
                next_clone = now + Duration::from_millis(self.rng.gen_range(5000..15000));
            }
            if now >= next_rss {
                self.check_rss();
                next_rss = now + Duration::from_secs(5);
            }
            if now >= next_check {
                self.check_round(false);
                next_check = now + Duration::from_secs(30);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// The next gap of the kills' own schedule, if they have one.
    fn kill_gap(&mut self) -> Option<Duration> {
        let (lo, hi) = (self.args.kill_gap_min_secs?, self.args.kill_gap_max_secs?);
        Some(Duration::from_secs(self.rng.gen_range(lo..=hi.max(lo))))
    }

    fn fault_gap(&mut self) -> Duration {
        Duration::from_secs(
            self.rng
                .gen_range(self.args.fault_gap_min_secs..=self.args.fault_gap_max_secs),
        )
    }

    /// The end: every fault healed, writers stopped, a last snapshot of
    /// every volume, every mirror caught up to it, every check once more.
    fn finish(&mut self) -> Result<()> {
        self.tally.event("end of faults: healing".into());
        self.run_pending(true)?;
        for i in 0..self.nodes.len() {
            if self.nodes[i].state == NodeState::Stopped {
                self.nodes[i].cont();
            }
        }
        self.stop_writers.store(true, Ordering::SeqCst);
        for w in self.writers.drain(..) {
            let _ = w.join();
        }
        self.check_live_images("final", false);
        for l in std::mem::take(&mut self.app_locks) {
            self.release_app_lock(&l);
        }
        let mut finals = Vec::new();
        for v in VOLUMES {
            self.snapshot(v)?;
            finals.push((v, format!("s{}", self.snap_counter)));
        }
        self.wait_caught_up(&finals);
        std::thread::sleep(Duration::from_millis(self.args.lease_ms));
        self.check_round(true);
        Ok(())
    }

    fn report(&self) -> Report {
        let conns: u64 = self.proxies.values().map(|p| p.connections()).sum();
        self.tally.set("net.proxied_connections", conns);
        // What the fault disks saw, summed over the nodes.
        let disks: Vec<_> = self
            .nodes
            .iter()
            .filter_map(|n| n.faults.as_ref().map(|f| f.counts()))
            .collect();
        if !disks.is_empty() {
            type Field = fn(&sluice_testkit::faultdisk::FaultCounts) -> u64;
            let fields: [(&str, Field); 7] = [
                ("disk.reads", |c| c.reads),
                ("disk.writes", |c| c.writes),
                ("disk.flushes", |c| c.flushes),
                ("disk.eio_reads", |c| c.eio_reads),
                ("disk.eio_writes", |c| c.eio_writes),
                ("disk.eio_flushes", |c| c.eio_flushes),
                ("disk.delayed", |c| c.delayed),
            ];
            for (name, f) in fields {
                self.tally.set(name, disks.iter().map(f).sum());
            }
        }
        Report {
            seed: self.tally.seed,
            command: format!(
                "sluice-bench soak --seed {} --minutes {} --nodes {} --fault-gap-min-secs {} --fault-gap-max-secs {}{} --lease-ms {} --writers {}{}",
                self.tally.seed,
                self.args.minutes,
                self.args.nodes,
                self.args.fault_gap_min_secs,
                self.args.fault_gap_max_secs,
                match (self.args.kill_gap_min_secs, self.args.kill_gap_max_secs) {
                    (Some(lo), Some(hi)) =>
                        format!(" --kill-gap-min-secs {lo} --kill-gap-max-secs {hi}"),
                    _ => String::new(),
                },
                self.args.lease_ms,
                self.args.writers,
                if self.args.no_disk_faults { " --no-disk-faults" } else { "" }
            ),
            minutes_asked: self.args.minutes,
            duration_secs: self.tally.secs(),
            nodes: self
                .nodes
                .iter()
                .map(|n| NodeReport {
                    name: n.name.clone(),
                    device: n.device.clone(),
                    starts: n.starts,
                    final_state: format!("{:?}", n.state),
                    rss_max_kib: n.rss_max_kib,
                })
                .collect(),
            topology: self.topology(),
            counts: self.tally.counts(),
            not_injected: faults::not_injected(self.nodes.iter().all(|n| n.faults.is_some())),
            violations: self.tally.violations(),
            events: self.tally.events(),
        }
    }
}
