//! What must hold, checked during the run (every 30 s, after every restart
//! of the source) and at the end, each check counted (`check.*`) and every
//! failure a violation:
//! - flushed-writes: the source's live image holds, per block, a generation
//!   between the last durable one and the last sent (exactly the last at the end);
//! - snapshot-bytes: every snapshot reads, through its NBD export on every
//!   node it reached, as the model recorded when it was taken;
//! - snapshot-digests: a snapshot's content digest (`snap list --json`) is
//!   the same on every node and at every later check (mirrors equal their
//!   sources at shared snapshots);
//! - no-full-copy: no relationship made a full transfer after its baseline;
//! - app-lock-held: a snapshot an application lock holds stays on its node
//!   and on every node above that had it;
//! - leaked-lock: no lock stays active whose holder (origin node or a node
//!   on its path) has been down, stopped or lost for longer than its lease
//!   allows, and no application lock outlives its release;
//! - rss: every node's resident set stays under the bound;
//! - panic, unexpected-exit: no node panics or exits by itself;
//! - catch-up: at the end, the last snapshot reaches every live mirror;
//! - clone-bytes, clone-origin-held: see `clones.rs`.
//!
//! Also here: the application locks the harness adds and releases downstream.
//!
//! Invariants: a check never changes what it checks (read-only calls and
//! read-only exports), except the model's reset after a restart (the
//! blocks that were not durable take what the node holds).

use super::cluster::NodeState;
use super::model::{decode, BLOCK_BYTES};
use super::workload::NBD_TIMEOUT;
use super::{AppLock, Soak, APP_OWNER, VOLUMES};
use rand::Rng;
use serde_json::Value;
use sluice::nbd_client::NbdClient as Nbd;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const CHUNK_BLOCKS: u64 = 64;

/// A namespace as a node shows it: (model namespace id, export, digest namespace).
type NsView = (u32, String, String);

pub(super) fn read_blocks(
    nbd: &str,
    export: &str,
    span_blocks: u64,
) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut c = Nbd::open_with_timeout(nbd, export, NBD_TIMEOUT)?;
    let mut out = Vec::with_capacity(span_blocks as usize);
    let mut lba = 0;
    while lba < span_blocks {
        let n = CHUNK_BLOCKS.min(span_blocks - lba);
        let data = c.read(lba * BLOCK_BYTES as u64, (n as usize * BLOCK_BYTES) as u32)?;
        out.extend(data.chunks(BLOCK_BYTES).map(|b| b.to_vec()));
        lba += n;
    }
    Ok(out)
}

impl Soak {
    /// The grace after which a lock whose holder is gone must be stale.
    fn stale_after(&self) -> Duration {
        Duration::from_millis(self.args.lease_ms * 3) + Duration::from_secs(15)
    }

    /// The source's live images against the model; writers must be held off
    /// (after a restart) or stopped (at the end: `label` "final", exact).
    /// `gates_held`: the caller holds every namespace's gate already.
    pub(super) fn check_live_images(&mut self, label: &str, gates_held: bool) {
        let exact = label == "final";
        let nbd = self.nodes[0].nbd.clone();
        for ns in self.namespaces.clone() {
            let gate = (!gates_held).then(|| ns.gate.write().unwrap_or_else(|p| p.into_inner()));
            let blocks = match read_blocks(&nbd, &ns.export, ns.span_blocks) {
                Ok(b) => b,
                Err(e) => {
                    self.tally.violation(
                        "flushed-writes",
                        format!("{label}: read {}: {e:#}", ns.export),
                    );
                    continue;
                }
            };
            let mut bad = Vec::new();
            let mut model = ns.blocks();
            for (lba, block) in blocks.iter().enumerate() {
                let e = &mut model[lba];
                match decode(self.tally.seed, ns.id, lba as u64, block) {
                    Ok(g)
                        if (exact && g == e.last) || (!exact && g >= e.durable && g <= e.last) =>
                    {
                        e.last = g;
                        e.durable = g;
                    }
                    Ok(g) => bad.push(format!(
                        "lba {lba} holds gen {g}, flushed {} last sent {}",
                        e.durable, e.last
                    )),
                    Err(why) => bad.push(format!("lba {lba}: {why}")),
                }
            }
            drop(model);
            drop(gate);
            self.tally.add("check.flushed-writes", 1);
            self.tally
                .add("check.flushed-writes.blocks", blocks.len() as u64);
            if !bad.is_empty() {
                self.tally.violation(
                    "flushed-writes",
                    format!(
                        "{label}: {} blocks of a:{} wrong, first: {}",
                        bad.len(),
                        ns.export,
                        bad[..bad.len().min(3)].join("; ")
                    ),
                );
            }
        }
    }

    pub(super) fn check_exits(&mut self) {
        for i in 0..self.nodes.len() {
            if let Some(why) = self.nodes[i].exited_unexpectedly() {
                self.tally.violation("unexpected-exit", why);
                // Bring it back so the run goes on (the violation stands).
                self.pending
                    .push((Instant::now(), super::Pending::Restart(i)));
                if i == 0 {
                    self.source_up
                        .store(false, std::sync::atomic::Ordering::SeqCst);
                }
            }
        }
    }

    pub(super) fn check_rss(&mut self) {
        for i in 0..self.nodes.len() {
            if let Some(kib) = self.nodes[i].rss_kib() {
                self.tally.add("check.rss", 1);
                if kib > self.args.rss_max_mib * 1024 && self.reported.insert(format!("rss {i}")) {
                    self.tally.violation(
                        "rss",
                        format!(
                            "node {} RSS {} MiB > {} MiB",
                            Self::name(i),
                            kib / 1024,
                            self.args.rss_max_mib
                        ),
                    );
                }
            }
        }
    }

    pub(super) fn check_panics(&mut self) {
        for n in &self.nodes {
            self.tally.add("check.panic", 1);
            for l in n.panics() {
                if self.reported.insert(format!("panic {} {l}", n.name)) {
                    self.tally
                        .violation("panic", format!("node {}: {l}", n.name));
                }
            }
        }
    }

    /// Volumes to read on node `i`: (volume, [(namespace id, export suffix, digest ns)]).
    fn volumes_on(&self, i: usize) -> Vec<(String, Vec<NsView>)> {
        let mut out = Vec::new();
        for v in VOLUMES {
            let nss = self
                .namespaces
                .iter()
                .filter(|n| n.volume == v)
                .map(|n| (n.id, n.export.clone(), n.digest_ns.clone()))
                .collect();
            out.push((v.to_string(), nss));
        }
        if i == 1 {
            let db = self.namespaces.iter().find(|n| n.export == "v1/db");
            if let Some(db) = db {
                out.push(("qv".into(), vec![(db.id, "qv/db".into(), "db".into())]));
            }
        }
        out
    }

    /// One round of every check (`last`: the end of the run).
    pub(super) fn check_round(&mut self, last: bool) {
        self.check_panics();
        let mut present: BTreeMap<(usize, String), Vec<String>> = BTreeMap::new();
        for i in 0..self.nodes.len() {
            if !self.up(i) {
                continue;
            }
            for (vol, nss) in self.volumes_on(i) {
                let list = match self.ctl.snap_list(&self.addr(i), &vol) {
                    Ok(l) => l,
                    Err(e) => {
                        self.tally
                            .event(format!("snap list {vol} on {}: {e:#}", Self::name(i)));
                        continue;
                    }
                };
                let mut names = Vec::new();
                for s in &list {
                    let name = s["name"].as_str().unwrap_or("").to_string();
                    names.push(name.clone());
                    self.check_snapshot(i, &vol, &nss, s);
                }
                present.insert((i, vol), names);
            }
        }
        self.check_app_locks(&present);
        self.check_clones(&present);
        for i in 0..self.nodes.len() {
            if self.up(i) {
                self.check_mirrors(i, last);
                self.check_locks(i, last);
            }
        }
    }

    fn check_snapshot(&mut self, i: usize, vol: &str, nss: &[NsView], s: &Value) {
        let name = s["name"].as_str().unwrap_or("").to_string();
        let id = s["id"].as_str().unwrap_or("").to_string();
        let Some(model) = self.snaps.get(&name).cloned() else {
            self.tally.add("snapshots.unmodelled", 1);
            return;
        };
        for (ns_id, export, digest_ns) in nss {
            let digest = s["digests"]
                .as_array()
                .and_then(|ds| ds.iter().find(|d| d[0] == digest_ns.as_str()))
                .and_then(|d| d[1].as_str())
                .map(str::to_string);
            self.tally.add("check.snapshot-digests", 1);
            match (digest, self.digests.get(&(id.clone(), *ns_id))) {
                (None, _) => self.tally.violation(
                    "snapshot-digests",
                    format!(
                        "{}:{vol}@{name}: no digest of {digest_ns:?}: {s}",
                        Self::name(i)
                    ),
                ),
                (Some(d), Some((first_node, first))) if &d != first => self.tally.violation(
                    "snapshot-digests",
                    format!(
                        "{}:{vol}@{name} ({export}) digest {d}, {} had {first}",
                        Self::name(i),
                        Self::name(*first_node)
                    ),
                ),
                (Some(d), None) => {
                    self.digests.insert((id.clone(), *ns_id), (i, d));
                }
                _ => {}
            }
            if !self.verified.insert((i, id.clone(), *ns_id)) {
                continue;
            }
            let Some(want) = model.images.get(ns_id) else {
                continue;
            };
            let exp = format!("{export}@{name}");
            self.tally.add("check.snapshot-bytes", 1);
            match read_blocks(&self.nodes[i].nbd, &exp, want.len() as u64) {
                Err(e) => {
                    // The snapshot may have been pruned since the list; try again next round.
                    self.verified.remove(&(i, id.clone(), *ns_id));
                    self.tally.add("check.snapshot-bytes.unreadable", 1);
                    self.tally
                        .event(format!("read {}:{exp}: {e:#}", Self::name(i)));
                }
                Ok(blocks) => {
                    let bad: Vec<String> = blocks
                        .iter()
                        .enumerate()
                        .filter_map(|(lba, b)| {
                            match decode(self.tally.seed, *ns_id, lba as u64, b) {
                                Ok(g) if g == want[lba] => None,
                                Ok(g) => Some(format!("lba {lba} gen {g} want {}", want[lba])),
                                Err(w) => Some(format!("lba {lba}: {w} (want gen {})", want[lba])),
                            }
                        })
                        .collect();
                    if !bad.is_empty() {
                        self.tally.violation(
                            "snapshot-bytes",
                            format!(
                                "{}:{exp} (taken at {:.1}s): {} blocks differ, first: {}",
                                Self::name(i),
                                model.t_secs,
                                bad.len(),
                                bad[..bad.len().min(3)].join("; ")
                            ),
                        );
                    }
                }
            }
        }
    }

    fn check_mirrors(&mut self, i: usize, last: bool) {
        let Ok(list) = self.ctl.mirror_status(&self.addr(i)) else {
            return;
        };
        for m in list {
            let dst = m["dst"].as_str().unwrap_or("").to_string();
            let full = m["full_transfers"].as_u64().unwrap_or(0);
            let inc = m["incremental_transfers"].as_u64().unwrap_or(0);
            let fin = m["last_transfer"]["finished_unix_ms"].as_u64().unwrap_or(0);
            let resumed = m["resumed_transfers"].as_u64().unwrap_or(0);
            let key = (i, dst.clone());
            let prev = self.transfers.get(&key).copied().unwrap_or((0, 0, 0, 0));
            self.transfers.insert(
                key,
                (full.max(prev.0), inc.max(prev.1), fin, resumed.max(prev.3)),
            );
            self.tally.add("check.no-full-copy", 1);
            let allowed = self
                .rels
                .iter()
                .find(|r| r.node == i && r.dst == dst)
                .map(|r| r.full_allowed)
                .unwrap_or(1);
            if full > allowed && self.reported.insert(format!("full {i} {dst} {full}")) {
                self.tally.violation(
                    "no-full-copy",
                    format!(
                        "{}:{dst}: {full} full transfers (allowed {allowed}); last: {}",
                        Self::name(i),
                        m["last_transfer"]
                    ),
                );
            }
            if last {
                let err = m["last_error"].as_str().unwrap_or("");
                if !err.is_empty() {
                    self.tally.event(format!(
                        "{}:{dst} last_error at the end: {err}",
                        Self::name(i)
                    ));
                }
            }
        }
        let (mut f, mut n, mut r) = (0, 0, 0);
        for (full, inc, _, resumed) in self.transfers.values() {
            f += full;
            n += inc;
            r += resumed;
        }
        self.tally.set("transfers.full", f);
        self.tally.set("transfers.incremental", n);
        self.tally.set("transfers.resumed", r);
    }

    fn dead_for(&self, name: &str) -> Option<Duration> {
        let n = self.nodes.iter().find(|n| n.name == name)?;
        match n.state {
            NodeState::Up => None,
            _ => Some(n.since.elapsed()),
        }
    }

    fn check_locks(&mut self, i: usize, last: bool) {
        let Ok(list) = self.ctl.lock_list(&self.addr(i)) else {
            return;
        };
        if !self.reported.contains("lock sample") && !list.is_empty() {
            self.reported.insert("lock sample".into());
            self.tally
                .event(format!("a lock on {}: {}", Self::name(i), list[0]));
        }
        for l in list {
            self.tally.add("check.leaked-lock", 1);
            if l["state"] == "stale" {
                self.tally.add("locks.stale_seen", 1);
                continue;
            }
            let mut names: Vec<String> = Vec::new();
            for k in ["origin_node", "holder"] {
                if let Some(s) = l[k].as_str() {
                    names.push(s.to_string());
                }
            }
            if let Some(hops) = l["hop_path"].as_array() {
                names.extend(hops.iter().filter_map(|h| h.as_str().map(str::to_string)));
            }
            let gone = names
                .iter()
                .filter_map(|n| self.dead_for(n).map(|d| (n.clone(), d)))
                .find(|(_, d)| *d > self.stale_after());
            let id = l["snapshot_id"].as_str().unwrap_or("").to_string();
            let what = format!(
                "{}: {}@{} kind {} text {} origin {} path {} holder {}",
                Self::name(i),
                l["volume"],
                l["snapshot"],
                l["kind"],
                l["text"],
                l["origin_node"],
                l["hop_path"],
                l["holder"]
            );
            if let Some((n, d)) = gone {
                if self.reported.insert(format!("leak {what}")) {
                    self.tally.violation(
                        "leaked-lock",
                        format!("{what}: still active, {n} gone for {} s", d.as_secs()),
                    );
                }
                continue;
            }
            let is_app = l["text"].as_str().unwrap_or("").contains(APP_OWNER)
                || l["holder"].as_str().unwrap_or("").contains(APP_OWNER);
            let held = self.app_locks.iter().any(|a| a.snap_id == id);
            let released_long_ago = self
                .released
                .iter()
                .any(|(rid, t)| *rid == id && t.elapsed() > self.stale_after());
            if is_app
                && !held
                && (released_long_ago || last)
                && self.reported.insert(format!("leak {what}"))
            {
                self.tally.violation(
                    "leaked-lock",
                    format!("{what}: the application released it"),
                );
            }
        }
    }

    fn check_app_locks(&mut self, present: &BTreeMap<(usize, String), Vec<String>>) {
        for a in self.app_locks.clone() {
            for n in std::iter::once(a.node).chain(a.holders_above.iter().copied()) {
                let Some(names) = present.get(&(n, a.volume.clone())) else {
                    continue;
                };
                self.tally.add("check.app-lock-held", 1);
                if !names.contains(&a.snap)
                    && self.reported.insert(format!("applock {n} {}", a.snap))
                {
                    self.tally.violation(
                        "app-lock-held",
                        format!(
                            "{}:{}@{} is gone although {APP_OWNER} on {} holds it",
                            Self::name(n),
                            a.volume,
                            a.snap,
                            Self::name(a.node)
                        ),
                    );
                }
            }
        }
    }

    /// Nodes above `i` for `vol`, nearest first.
    fn chain_above(&self, i: usize, vol: &str) -> Vec<usize> {
        let mut out = Vec::new();
        let mut cur = i;
        while let Some(r) = self.rels.iter().find(|r| r.node == cur && r.dst == vol) {
            out.push(r.upstream);
            cur = r.upstream;
        }
        out
    }

    /// Add an application lock on a downstream node, or release one that is due.
    pub(super) fn app_lock_step(&mut self) {
        let due: Vec<AppLock> = self
            .app_locks
            .iter()
            .filter(|a| a.release_at <= Instant::now() && self.up(a.node))
            .cloned()
            .collect();
        if let Some(a) = due.first() {
            self.release_app_lock(a);
            self.app_locks
                .retain(|x| x.snap_id != a.snap_id || x.node != a.node);
            return;
        }
        let cands: Vec<usize> = (2..self.nodes.len()).filter(|&i| self.up(i)).collect();
        if cands.is_empty() || self.app_locks.len() >= 3 {
            return;
        }
        let node = cands[self.rng.gen_range(0..cands.len())];
        let vol = VOLUMES[self.rng.gen_range(0..VOLUMES.len())];
        let Ok(list) = self.ctl.snap_list(&self.addr(node), vol) else {
            return;
        };
        if list.is_empty() {
            return;
        }
        let s = &list[self.rng.gen_range(0..list.len())];
        let (snap, id) = (
            s["name"].as_str().unwrap_or("").to_string(),
            s["id"].as_str().unwrap_or("").to_string(),
        );
        if self.app_locks.iter().any(|a| a.snap_id == id) {
            return;
        }
        let hold = Duration::from_secs(self.rng.gen_range(10..60));
        match self.ctl.lock_add(&self.addr(node), vol, &snap, APP_OWNER) {
            Ok(()) => {
                // The nodes above that have the snapshot and the lock now
                // must keep it. One that has the snapshot but not the lock
                // (the set is undelivered: a partition, a stopped node) is
                // counted, not held to it: it protects the snapshot only
                // once the retried set arrives.
                let mut above = Vec::new();
                for u in self.chain_above(node, vol) {
                    if self.up(u) {
                        let has = self
                            .ctl
                            .snap_list(&self.addr(u), vol)
                            .map(|l| l.iter().any(|x| x["id"] == id.as_str()))
                            .unwrap_or(false);
                        let locked = self
                            .ctl
                            .lock_list(&self.addr(u))
                            .map(|l| {
                                l.iter().any(|x| {
                                    x["snapshot_id"] == id.as_str()
                                        && x["state"] == "active"
                                        && (x["kind"] == "owner"
                                            || x["text"].as_str().unwrap_or("").contains(APP_OWNER))
                                })
                            })
                            .unwrap_or(false);
                        if has && locked {
                            above.push(u);
                        } else if has {
                            self.tally.add("locks.app_add_returned_undelivered", 1);
                            self.tally.event(format!(
                                "lock add on {} returned before its lock reached {} (which has {vol}@{snap})",
                                Self::name(node),
                                Self::name(u)
                            ));
                        }
                    }
                }
                self.tally.add("locks.app_added", 1);
                self.tally.event(format!(
                    "{APP_OWNER} locks {}:{vol}@{snap} for {} s (held above on {:?})",
                    Self::name(node),
                    hold.as_secs(),
                    above.iter().map(|&u| Self::name(u)).collect::<Vec<_>>()
                ));
                self.app_locks.push(AppLock {
                    node,
                    volume: vol.to_string(),
                    snap,
                    snap_id: id,
                    holders_above: above,
                    release_at: Instant::now() + hold,
                });
            }
            Err(e) => {
                self.tally.add("locks.app_add_failed", 1);
                self.tally
                    .event(format!("lock add on {}: {e:#}", Self::name(node)));
            }
        }
    }

    pub(super) fn release_app_lock(&mut self, a: &AppLock) {
        if self.nodes[a.node].state == NodeState::Lost {
            return;
        }
        let r = self
            .ctl
            .lock_release(&self.addr(a.node), &a.volume, &a.snap, APP_OWNER);
        match r {
            Ok(()) => {
                self.tally.add("locks.app_released", 1);
                self.released.push((a.snap_id.clone(), Instant::now()));
            }
            Err(e) => self.tally.violation(
                "app-lock-release",
                format!("{}:{}@{}: {e:#}", Self::name(a.node), a.volume, a.snap),
            ),
        }
    }

    /// Every live volume mirror holds the last snapshot of its volume.
    pub(super) fn wait_caught_up(&mut self, finals: &[(&str, String)]) {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let mut missing = Vec::new();
            for r in self.rels.clone() {
                if self.nodes[r.node].state == NodeState::Lost {
                    continue;
                }
                let src_vol = r.source_path.split('/').next().unwrap_or("").to_string();
                let Some((_, want)) = finals.iter().find(|(v, _)| *v == src_vol) else {
                    continue;
                };
                let has = self
                    .ctl
                    .snap_list(&self.addr(r.node), &r.dst_volume)
                    .map(|l| l.iter().any(|s| s["name"] == want.as_str()))
                    .unwrap_or(false);
                if !has {
                    missing.push(format!("{}:{} lacks {want}", Self::name(r.node), r.dst));
                }
            }
            self.tally.add("check.catch-up", 1);
            if missing.is_empty() {
                self.tally
                    .event("every mirror caught up with the last snapshots".into());
                return;
            }
            if Instant::now() > deadline {
                self.tally
                    .violation("catch-up", format!("after 180 s: {}", missing.join(", ")));
                return;
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }
}
