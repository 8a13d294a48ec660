//! The faults: which kind, on which node or link, and for how long, all
//! drawn from the run's seed; each kind counted (`fault.*`). Kinds: SIGKILL
//! of any node, or its power cut (the disk loses what no flush made
//! durable), with a restart after a random pause (after the source's
//! restart the flushed-write check runs before the writers go on);
//! SIGSTOP/SIGCONT longer than the lease; a link's connections cut,
//! stalled or delayed; a node partitioned from every peer until it heals;
//! the disk of a node failing writes and flushes (and maybe reads) with EIO,
//! or slowed, for a while, after which a node whose pool refused writes is
//! restarted, as an operator would; and once per run the middle node B lost
//! for good with C retargeted to A. Kills run on their own schedule when
//! `--kill-gap-*` is given.
//!
//! Invariants: a fault only picks a node that is up (and whose disk has no
//! fault on); every stop, kill and disk fault has its end scheduled
//! (`Pending`), and `run_pending(true)` ends them all.

use super::cluster::NodeState;
use super::{Pending, Soak, VOLUMES};
use anyhow::Result;
use rand::Rng;
use sluice_testkit::faultdisk::Fault;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// What this harness cannot inject on this machine (docs/SOAK.md);
/// `disks`: every node's pool is on a fault disk.
pub fn not_injected(disks: bool) -> Vec<String> {
    let mut out = vec![
        "packet loss and reordering inside a TCP stream (no netem): the proxy cuts, stalls and delays whole streams",
        "a disk that returns wrong data or tears a 4 KiB block: the fault disk fails, slows and forgets whole blocks, it never corrupts them",
    ];
    if !disks {
        out.push("disk I/O errors, latency and power loss: the pools are not on fault disks (not root, no /dev/fuse, or --no-disk-faults); SIGKILL loses the process, not the page cache under the loop device");
    }
    out.into_iter().map(str::to_string).collect()
}

impl Soak {
    /// Carry out what is due (with `all`: everything, now).
    pub(super) fn run_pending(&mut self, all: bool) -> Result<()> {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|(t, _)| all || *t <= now);
        self.pending = later;
        for (_, p) in due {
            match p {
                Pending::Cont(i) => {
                    self.nodes[i].cont();
                    self.tally.event(format!("SIGCONT {}", Self::name(i)));
                }
                Pending::Restart(i) => self.restart(i)?,
                Pending::DiskHeal(i) => self.disk_heal(i)?,
            }
        }
        Ok(())
    }

    fn restart(&mut self, i: usize) -> Result<()> {
        // The source: hold the writers off until its image is checked.
        let gates: Vec<_> = if i == 0 {
            self.namespaces.clone()
        } else {
            Vec::new()
        };
        let held: Vec<_> = gates
            .iter()
            .map(|n| n.gate.write().unwrap_or_else(|p| p.into_inner()))
            .collect();
        let t = Instant::now();
        self.nodes[i].start(&self.ctl)?;
        self.tally.event(format!(
            "restarted {} (ready in {} ms)",
            Self::name(i),
            t.elapsed().as_millis()
        ));
        if i == 0 {
            // Still holding every gate: no writer can reach the new process first.
            self.check_live_images("after restart of a", true);
            self.source_up.store(true, Ordering::SeqCst);
        }
        drop(held);
        Ok(())
    }

    /// Inject one fault, chosen from the seed.
    pub(super) fn inject(&mut self) -> Result<()> {
        let up: Vec<usize> = (0..self.nodes.len()).filter(|&i| self.up(i)).collect();
        if up.is_empty() {
            return Ok(());
        }
        // Kills on their own schedule leave this stream; disk faults only
        // where the pools are on fault disks.
        let from = if self.args.kill_gap_min_secs.is_some() {
            25
        } else {
            0
        };
        let disks = self.nodes.iter().all(|n| n.faults.is_some());
        let roll = self.rng.gen_range(from..if disks { 100 } else { 82u32 });
        let node = up[self.rng.gen_range(0..up.len())];
        let links: Vec<(usize, usize)> = self
            .rels
            .iter()
            .filter(|r| self.nodes[r.node].state != NodeState::Lost)
            .map(|r| (r.node, r.upstream))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let link = links[self.rng.gen_range(0..links.len())];
        let lname = format!("{}->{}", Self::name(link.0), Self::name(link.1));
        match roll {
            0..=24 => self.kill_node(node),
            25..=39 => {
                let lease = self.args.lease_ms;
                let d = Duration::from_millis(self.rng.gen_range(lease + lease / 4..lease * 5 / 2));
                self.nodes[node].stop();
                self.tally.add("fault.stop", 1);
                self.tally.event(format!(
                    "SIGSTOP {} for {} ms (lease {lease} ms)",
                    Self::name(node),
                    d.as_millis()
                ));
                self.pending.push((Instant::now() + d, Pending::Cont(node)));
            }
            40..=52 => {
                self.proxies[&link].cut();
                self.tally.add("fault.net_cut", 1);
                self.tally.event(format!("cut every connection {lname}"));
            }
            53..=61 => {
                let d = Duration::from_millis(self.rng.gen_range(2000..15_000));
                self.proxies[&link].stall(d);
                self.tally.add("fault.net_stall", 1);
                self.tally
                    .event(format!("stall {lname} for {} ms", d.as_millis()));
            }
            62..=70 => {
                let d = Duration::from_millis(self.rng.gen_range(5000..20_000));
                let ms = self.rng.gen_range(5..200);
                self.proxies[&link].delay(d, ms);
                self.tally.add("fault.net_delay", 1);
                self.tally.event(format!(
                    "delay {lname} by {ms} ms a chunk for {} ms",
                    d.as_millis()
                ));
            }
            71..=81 => {
                let d = Duration::from_millis(self.rng.gen_range(3000..20_000));
                for ((a, b), p) in &self.proxies {
                    if *a == node || *b == node {
                        p.partition(d);
                    }
                }
                self.tally.add("fault.net_partition", 1);
                self.tally.event(format!(
                    "partition {} from every peer for {} ms",
                    Self::name(node),
                    d.as_millis()
                ));
            }
            82..=92 => {
                let d = Duration::from_millis(self.rng.gen_range(2000..10_000));
                // A quarter of the windows fail flushes only: the writes
                // land in the disk's cache, and the flush path fails alone.
                let writes = self.rng.gen_bool(0.75);
                let reads = writes && self.rng.gen_bool(0.3);
                self.nodes[node].set_disk_fault(Fault::Eio {
                    reads,
                    writes,
                    flushes: true,
                });
                self.tally.add("fault.disk_eio", 1);
                let what = match (writes, reads) {
                    (false, _) => "flushes",
                    (true, false) => "writes and flushes",
                    (true, true) => "writes, flushes and reads",
                };
                self.tally.event(format!(
                    "disk of {} fails {what} with EIO for {} ms",
                    Self::name(node),
                    d.as_millis()
                ));
                self.pending
                    .push((Instant::now() + d, Pending::DiskHeal(node)));
            }
            _ => {
                let d = Duration::from_millis(self.rng.gen_range(5000..20_000));
                let ms = self.rng.gen_range(5..100);
                self.nodes[node].set_disk_fault(Fault::Delay(Duration::from_millis(ms)));
                self.tally.add("fault.disk_delay", 1);
                self.tally.event(format!(
                    "disk of {} answers {ms} ms late for {} ms",
                    Self::name(node),
                    d.as_millis()
                ));
                self.pending
                    .push((Instant::now() + d, Pending::DiskHeal(node)));
            }
        }
        Ok(())
    }

    /// A kill on the kills' own schedule (`--kill-gap-*`).
    pub(super) fn kill_one(&mut self) -> Result<()> {
        let up: Vec<usize> = (0..self.nodes.len()).filter(|&i| self.up(i)).collect();
        if !up.is_empty() {
            let node = up[self.rng.gen_range(0..up.len())];
            self.kill_node(node);
        }
        Ok(())
    }

    /// SIGKILL, or (half the time, on a fault disk) a power cut; the
    /// restart comes after a random pause.
    fn kill_node(&mut self, node: usize) {
        let pause = Duration::from_millis(self.rng.gen_range(500..10_000));
        if node == 0 {
            self.source_up.store(false, Ordering::SeqCst);
        }
        if self.nodes[node].faults.is_some() && self.rng.gen_bool(0.5) {
            let lost = self.nodes[node].power_cut(self.rng.gen());
            self.tally.add("fault.power_cut", 1);
            self.tally.add("disk.lost_blocks", lost);
            self.tally.event(format!(
                "power cut {}: {lost} unflushed blocks lost (restart in {} ms)",
                Self::name(node),
                pause.as_millis()
            ));
        } else {
            self.nodes[node].kill();
            self.tally.add("fault.kill", 1);
            self.tally.event(format!(
                "SIGKILL {} (restart in {} ms)",
                Self::name(node),
                pause.as_millis()
            ));
        }
        self.pending
            .push((Instant::now() + pause, Pending::Restart(node)));
    }

    /// The disk fault ends; a pool that refused writes meanwhile stays
    /// poisoned until its node restarts, so the operator restarts it.
    fn disk_heal(&mut self, i: usize) -> Result<()> {
        if !self.nodes[i].disk_faulted {
            return Ok(());
        }
        self.nodes[i].set_disk_fault(Fault::None);
        self.tally
            .event(format!("disk of {} healthy again", Self::name(i)));
        if self.nodes[i].state != NodeState::Up {
            return Ok(());
        }
        let poisoned = match self.ctl.status(&self.addr(i)) {
            Ok(s) => s["space"]["poisoned_shards"].as_u64().unwrap_or(0),
            Err(e) => {
                self.tally
                    .event(format!("status of {}: {e:#}", Self::name(i)));
                0
            }
        };
        if poisoned == 0 {
            return Ok(());
        }
        if i == 0 {
            self.source_up.store(false, Ordering::SeqCst);
        }
        let exit = self.nodes[i].terminate();
        self.tally.add("restarts.poisoned", 1);
        self.tally.event(format!(
            "{}: {poisoned} shard(s) refused writes after the disk error: restarted (exit {exit:?})",
            Self::name(i)
        ));
        self.restart(i)
    }

    /// B is lost for good; C's volume mirrors go on from A (`mirror retarget`).
    pub(super) fn lose_middle(&mut self) -> Result<()> {
        self.middle_lost = true;
        self.nodes[1].lose();
        self.pending
            .retain(|(_, p)| !matches!(p, Pending::Restart(1) | Pending::Cont(1)));
        self.tally.add("fault.middle_lost", 1);
        self.tally.event("b lost for good; c retargets to a".into());
        let source = self.proxies[&(2, 0)].addr.clone();
        // The operator's retarget runs on a healthy link (faults elsewhere go on).
        self.proxies[&(2, 0)].heal();
        for v in VOLUMES {
            let mut r = self
                .ctl
                .mirror_retarget(&self.addr(2), v, &format!("{source}/{v}"));
            for _ in 0..3 {
                if r.is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_secs(3));
                r = self
                    .ctl
                    .mirror_retarget(&self.addr(2), v, &format!("{source}/{v}"));
            }
            match r {
                Ok(rep) => {
                    self.tally.add("retargets", 1);
                    let kind = rep["transfer"]["kind"]
                        .as_str()
                        .unwrap_or("none")
                        .to_string();
                    self.tally.event(format!(
                        "c: retarget {v} to a: base {} transfer {kind} {}",
                        rep["base"]["name"], rep["transfer_error"]
                    ));
                    if kind == "full" {
                        self.tally.violation(
                            "no-full-copy",
                            format!("c:{v} retargeted to a needed a full copy: {rep}"),
                        );
                    }
                }
                Err(e) => self
                    .tally
                    .violation("retarget", format!("c: retarget {v} to a: {e:#}")),
            }
            for r in self.rels.iter_mut() {
                if r.node == 2 && r.dst == v {
                    r.upstream = 0;
                }
            }
        }
        Ok(())
    }
}
