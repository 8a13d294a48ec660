//! The nodes: one `sluice serve` process each, on a loop device when root
//! (a plain file otherwise), with fixed loopback ports kept across restarts,
//! a config file (naming the soak's shared peer secret), a log; and the
//! signals the faults send (SIGKILL, SIGSTOP, SIGCONT). When root and
//! /dev/fuse allow, the loop device sits on a fault disk
//! (`sluice_testkit::faultdisk`: our FUSE file over the pool's image, with
//! a volatile write cache), so the faults can also fail the disk, slow it,
//! or cut its power. Owns each node's process and disk state: the checks
//! ask it which nodes are up, stopped, down or lost for good.
//!
//! Invariants: a node's ports, name and pool never change over the run, so
//! a restart is the same node; a start clears its disk's fault (the
//! operator fixed the device); every loop device attached is detached on
//! drop, before the fault disk under it is unmounted.

use super::control::Ctl;
use anyhow::{bail, Context, Result};
use sluice_testkit::faultdisk::{Fault, FaultControl, FaultDisk, LoopDev};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    Up,
    Stopped,
    Down,
    Lost,
}

pub struct Node {
    pub name: String,
    pub listen: String,
    /// The control API's Unix socket (what `--node` names).
    pub control: String,
    pub nbd: String,
    pub log: PathBuf,
    config: PathBuf,
    pub device: String,
    child: Option<Child>,
    /// Detached before `_disk` is unmounted (fields drop in this order);
    /// both held only to be dropped.
    _loop_dev: Option<LoopDev>,
    _disk: Option<FaultDisk>,
    /// The fault switch of the disk under the pool (None: a plain file).
    pub faults: Option<Arc<FaultControl>>,
    /// A disk fault is on: the node's reads or writes may fail.
    pub disk_faulted: bool,
    pub state: NodeState,
    /// When the node last changed state (stopped, killed, lost).
    pub since: Instant,
    pub rss_max_kib: u64,
    pub starts: u64,
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn is_root() -> bool {
    // SAFETY: geteuid takes no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

impl Node {
    /// Make a pool for node `name` in `dir` (loop device when root) and
    /// write its config; not started yet.
    pub fn create(
        ctl: &Ctl,
        dir: &Path,
        name: &str,
        pool_bytes: u64,
        lease_ms: u64,
        disk_faults: bool,
    ) -> Result<Node> {
        let img = dir.join(format!("{name}.img"));
        let f = std::fs::File::create(&img)?;
        f.set_len(pool_bytes)?;
        drop(f);
        let (mut loop_dev, mut disk) = (None, None);
        let mut device = img.to_string_lossy().to_string();
        if is_root() {
            let mut under = img.clone();
            if disk_faults {
                match FaultDisk::mount(&img, &dir.join(format!("{name}.disk"))) {
                    Ok(d) => {
                        under = d.path().to_path_buf();
                        disk = Some(d);
                    }
                    Err(e) => {
                        eprintln!("soak: no fault disk for node {name} ({e}); its disk cannot fail")
                    }
                }
            }
            device = under.to_string_lossy().to_string();
            match LoopDev::attach(&under) {
                Ok(l) => {
                    device = l.path().to_string_lossy().to_string();
                    loop_dev = Some(l);
                }
                Err(e) => eprintln!("soak: losetup failed ({e}); node {name} runs on {device}"),
            }
        }
        ctl.init(Path::new(&device), None)
            .with_context(|| format!("init {device}"))?;
        let listen = format!("127.0.0.1:{}", free_port()?);
        let nbd = format!("127.0.0.1:{}", free_port()?);
        let control = dir
            .join(format!("{name}.sock"))
            .to_string_lossy()
            .to_string();
        // The nodes of one soak share a peer secret: they replicate
        // authenticated and encrypted, as a deployment should.
        let secret = dir.join("peer.secret");
        if !secret.exists() {
            sluice::auth::create_peer_secret(&secret).context("creating the soak's peer secret")?;
        }
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "data = {device:?}\nlisten = {listen:?}\ncontrol_socket = {control:?}\n\
                 nbd = {nbd:?}\nname = {name:?}\n\
                 checkpoint_interval_ms = 1000\npin_shards = false\nlease_ms = {lease_ms}\n\
                 lease_policy = \"keep\"\npeer_timeout_ms = 10000\nmax_transfers = 2\n\
                 checkpoint_items = 256\npeer_secret = {secret:?}\n"
            ),
        )?;
        Ok(Node {
            name: name.to_string(),
            listen,
            control,
            nbd,
            log: dir.join(format!("{name}.log")),
            config,
            device,
            child: None,
            _loop_dev: loop_dev,
            faults: disk.as_ref().map(|d| d.control()),
            _disk: disk,
            disk_faulted: false,
            state: NodeState::Down,
            since: Instant::now(),
            rss_max_kib: 0,
            starts: 0,
        })
    }

    /// Start (or restart) the process on a healthy disk; waits for its
    /// `ready` line.
    pub fn start(&mut self, ctl: &Ctl) -> Result<()> {
        assert!(
            self.child.is_none(),
            "node {} already has a process",
            self.name
        );
        self.set_disk_fault(Fault::None);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut child = ctl
            .serve_command(&self.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("spawn sluice serve")?;
        let out = child.stdout.take().context("stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            let mut line = String::new();
            while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                if line.starts_with("ready") {
                    let _ = tx.send(());
                }
                line.clear();
            }
        });
        if rx.recv_timeout(Duration::from_secs(120)).is_err() {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "node {} did not become ready (see {})",
                self.name,
                self.log.display()
            );
        }
        self.child = Some(child);
        self.state = NodeState::Up;
        self.since = Instant::now();
        self.starts += 1;
        Ok(())
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on our own child's pid; no memory is touched.
            unsafe {
                libc::kill(pid, sig);
            }
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        self.state = NodeState::Down;
        self.since = Instant::now();
    }

    /// Power loss: the disk fails every request from now on (nothing the
    /// process sends later lands), loses what no flush made durable (but a
    /// seeded part of it), and the process dies. How many blocks were lost.
    pub fn power_cut(&mut self, seed: u64) -> u64 {
        let lost = self.faults.as_ref().map(|f| {
            f.set(Fault::Eio {
                reads: true,
                writes: true,
                flushes: true,
            });
            f.power_cut(seed)
        });
        self.kill();
        lost.unwrap_or(0)
    }

    /// Turn a disk fault on or off (no-op without a fault disk).
    pub fn set_disk_fault(&mut self, f: Fault) {
        if let Some(c) = &self.faults {
            c.set(f);
            self.disk_faulted = f != Fault::None;
        }
    }

    pub fn stop(&mut self) {
        self.signal(libc::SIGSTOP);
        self.state = NodeState::Stopped;
        self.since = Instant::now();
    }

    pub fn cont(&mut self) {
        self.signal(libc::SIGCONT);
        self.state = NodeState::Up;
        self.since = Instant::now();
    }

    /// Killed for good: never restarted.
    pub fn lose(&mut self) {
        self.kill();
        self.state = NodeState::Lost;
    }

    /// SIGTERM at the end of the run; the exit status (None: had to kill).
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        if self.state == NodeState::Stopped {
            self.cont();
        }
        self.signal(libc::SIGTERM);
        let mut c = self.child.take()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                self.state = NodeState::Down;
                return Some(s);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                self.state = NodeState::Down;
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process exited by itself (not by a signal we sent)?
    pub fn exited_unexpectedly(&mut self) -> Option<String> {
        let c = self.child.as_mut()?;
        match c.try_wait() {
            Ok(Some(s)) => {
                self.child = None;
                self.state = NodeState::Down;
                self.since = Instant::now();
                Some(format!("node {} exited by itself: {s}", self.name))
            }
            _ => None,
        }
    }

    /// Resident set size now, in KiB (None: no process).
    pub fn rss_kib(&mut self) -> Option<u64> {
        let pid = self.pid()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        self.rss_max_kib = self.rss_max_kib.max(kib);
        Some(kib)
    }

    /// Lines of the log that report a panic.
    pub fn panics(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("panicked"))
            .map(|l| l.to_string())
            .collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: as in `signal`.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGCONT);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // Healthy again, so the loop device's last writes and its detach
        // do not fail (then `loop_dev` and `disk` drop, in that order).
        self.set_disk_fault(Fault::None);
    }
}
