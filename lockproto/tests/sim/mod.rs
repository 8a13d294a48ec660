//! Shared simulated cascade for the property tests (included with `mod sim`).
//!
//! Nodes hold snapshot lists per volume (the "engine"), mirrors copy the
//! newest upstream snapshot downstream, every node creates snapshots and
//! rotates aggressively (keep 1 unlocked), and lock sets travel through a
//! network that can lose, duplicate and reorder them. Nodes restart from
//! persisted bytes. Everything is driven by one seed. `SLUICE_TRACE=1`
//! prints every step (snapshot lists, creates, transfers, deletes,
//! deliveries) to replay a failing sub-seed by hand.
//!
//! Each simulated mirror is one relationship: for an edge (u, d) and each
//! volume `vol` of the simulation, d pulls u's `vol` into its own `vol` as
//! relationship `vol/<u>` (so a fan-in writes one volume from two
//! upstreams, as qtree mirrors into one volume do). The usual simulation has
//! one volume; [`Sim::new_dag_volumes`] gives every pair of nodes two or
//! three relationships (the shape of the production bug where one node
//! pulled several volumes from one upstream).
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sluice_lockproto::{
    Action, Event, LeasePolicy, LockKind, LockNode, LockSet, NodeConfig, ReleaseReason,
};
use uuid::Uuid;

/// Seed for a test run: `SLUICE_SEED` or fresh; always printed.
pub use sluice_testkit::seed as run_seed;

pub struct Faults {
    pub loss: f64,
    pub dup: f64,
    pub restart: f64,
}

pub const NO_FAULTS: Faults = Faults {
    loss: 0.0,
    dup: 0.0,
    restart: 0.0,
};

#[derive(Default, Debug)]
pub struct Outcome {
    /// Chains that broke (a downstream lost every common snapshot).
    pub broken: usize,
    /// Deletes of a snapshot a delivered set protected (must be 0).
    pub violations: Vec<String>,
    /// Locks left naming a dead downstream after its lease ran out.
    pub leaked: Vec<String>,
    pub transfers: usize,
    pub deletes: usize,
    /// Deletes refused because of a lock relayed over two or more hops.
    pub relayed_refusals: usize,
    /// Downstream sets dropped because their lease and grace ran out.
    pub lease_releases: usize,
}

pub struct Sim {
    pub rng: SmallRng,
    pub names: Vec<String>,
    pub nodes: Vec<Option<LockNode>>,
    pub persisted: Vec<Vec<u8>>,
    /// The volumes every node has (and every edge mirrors).
    pub vols: Vec<String>,
    /// Per node, per volume (index into `vols`), snapshots oldest first.
    pub snaps: Vec<Vec<Vec<Uuid>>>,
    pub edges: Vec<(usize, usize)>,
    /// (upstream, downstream, volume) mirrors that made a first transfer.
    pub baselined: BTreeSet<(usize, usize, usize)>,
    pub net: Vec<(usize, usize, LockSet)>,
    /// (receiver, sender, volume) -> (highest generation the receiver
    /// accepted for that relationship, snapshots that set names; emptied
    /// when the receiver releases it).
    pub delivered: BTreeMap<(usize, usize, usize), (u64, BTreeSet<Uuid>)>,
    pub now: u64,
    pub propagate: bool,
    pub out: Outcome,
    pub cfgs: Vec<NodeConfig>,
    pub trace: bool,
}

pub const LEASE_MS: u64 = 10_000;
pub const GRACE_MS: u64 = 5_000;

impl Sim {
    pub fn new(seed: u64, propagate: bool) -> Sim {
        let mut rng = SmallRng::seed_from_u64(seed);
        let (n, edges) = Sim::chain_topology(&mut rng);
        Sim::build(rng, n, edges, propagate, 1)
    }

    /// A random DAG of 3..=8 nodes: node 0 is the root, every later node
    /// pulls from one to three distinct earlier nodes. So fan-in nodes can
    /// have their own downstreams (their sets relay to every upstream), there
    /// can be several fan-ins, diamonds and long paths.
    pub fn new_dag(seed: u64, propagate: bool) -> Sim {
        let mut rng = SmallRng::seed_from_u64(seed);
        let (n, edges) = Sim::dag_topology(&mut rng);
        Sim::build(rng, n, edges, propagate, 1)
    }

    /// A random DAG as [`Sim::new_dag`] where every node has two or three
    /// volumes and every edge mirrors each of them: each pair of nodes has
    /// several relationships, each with its own base, set and lease.
    pub fn new_dag_volumes(seed: u64, propagate: bool) -> Sim {
        let mut rng = SmallRng::seed_from_u64(seed);
        let (n, edges) = Sim::dag_topology(&mut rng);
        let vols = rng.gen_range(2..=3);
        Sim::build(rng, n, edges, propagate, vols)
    }

    fn chain_topology(rng: &mut SmallRng) -> (usize, Vec<(usize, usize)>) {
        // Topology: a chain of depth 2..=6, extra fan-out branches, maybe a fan-in.
        let depth = rng.gen_range(2..=6);
        let mut edges = Vec::new();
        for i in 1..depth {
            edges.push((i - 1, i));
        }
        let mut n = depth;
        for _ in 0..rng.gen_range(0..=2) {
            let up = rng.gen_range(0..n);
            edges.push((up, n));
            n += 1;
        }
        if rng.gen_bool(0.4) {
            // fan-in: a new node pulls from two different nodes
            let a = rng.gen_range(0..n);
            let b = rng.gen_range(0..n);
            edges.push((a, n));
            if a != b {
                edges.push((b, n));
            }
            n += 1;
        }
        (n, edges)
    }

    fn dag_topology(rng: &mut SmallRng) -> (usize, Vec<(usize, usize)>) {
        let n = rng.gen_range(3..=8);
        let mut edges = Vec::new();
        for d in 1..n {
            let want = match rng.gen_range(0..100) {
                0..=54 => 1,
                55..=89 => 2,
                _ => 3,
            };
            let mut ups: Vec<usize> = Vec::new();
            while ups.len() < want.min(d) {
                let u = rng.gen_range(0..d);
                if !ups.contains(&u) {
                    ups.push(u);
                }
            }
            edges.extend(ups.into_iter().map(|u| (u, d)));
        }
        (n, edges)
    }

    fn build(
        rng: SmallRng,
        n: usize,
        edges: Vec<(usize, usize)>,
        propagate: bool,
        nvols: usize,
    ) -> Sim {
        let names: Vec<String> = (0..n).map(|i| format!("n{i}")).collect();
        let vols: Vec<String> = (0..nvols)
            .map(|k| {
                if k == 0 {
                    "vol".to_string()
                } else {
                    format!("vol{k}")
                }
            })
            .collect();
        let cfgs: Vec<NodeConfig> = names
            .iter()
            .map(|nm| NodeConfig {
                lease_ms: LEASE_MS,
                renew_every_ms: 2_000,
                policy: LeasePolicy::ReleaseAfter { grace_ms: GRACE_MS },
                propagate,
                ..NodeConfig::new(nm.clone())
            })
            .collect();
        let mut nodes: Vec<Option<LockNode>> = cfgs
            .iter()
            .map(|c| Some(LockNode::new(c.clone())))
            .collect();
        for (u, d) in &edges {
            for vol in &vols {
                let relationship = rel_name(vol, &names[*u]);
                if let Some(x) = nodes[*d].as_mut() {
                    let _ = x.handle(
                        0,
                        Event::UpstreamAdded {
                            relationship: relationship.clone(),
                            upstream: names[*u].clone(),
                            source: vol.clone(),
                            volume: vol.clone(),
                            kind: LockKind::DestinationPath,
                        },
                    );
                }
                if let Some(x) = nodes[*u].as_mut() {
                    let _ = x.handle(
                        0,
                        Event::DownstreamAdded {
                            downstream: names[*d].clone(),
                            relationship,
                            volume: vol.clone(),
                        },
                    );
                }
            }
        }
        let persisted = nodes
            .iter()
            .map(|x| {
                x.as_ref()
                    .map(|x| x.to_bytes().expect("persist"))
                    .unwrap_or_default()
            })
            .collect();
        Sim {
            rng,
            names,
            nodes,
            persisted,
            snaps: vec![vec![Vec::new(); nvols]; n],
            vols,
            edges,
            baselined: BTreeSet::new(),
            net: Vec::new(),
            delivered: BTreeMap::new(),
            now: 0,
            propagate,
            out: Outcome::default(),
            cfgs,
            trace: std::env::var_os("SLUICE_TRACE").is_some(),
        }
    }

    /// Whether some node pulls from two upstreams (fan-in).
    pub fn has_fan_in(&self) -> bool {
        (0..self.nodes.len()).any(|d| self.edges.iter().filter(|(_, x)| *x == d).count() > 1)
    }

    fn log(&self, what: impl FnOnce() -> String) {
        if self.trace {
            eprintln!("t={} {}", self.now, what());
        }
    }

    fn short(&self, s: &Uuid) -> String {
        format!("{:04x}", (s.as_u128() >> 112) as u16)
    }

    fn shorts(&self, v: &[Uuid]) -> String {
        v.iter()
            .map(|s| self.short(s))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn idx(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// The volume index of a relationship name (`vol/<upstream>`).
    fn rel_vol(&self, relationship: &str) -> Option<usize> {
        let vol = relationship.split('/').next()?;
        self.vols.iter().position(|v| v == vol)
    }

    /// The relationship of downstream `d`'s mirror of `u`'s volume `k`.
    fn rel(&self, u: usize, k: usize) -> String {
        rel_name(&self.vols[k], &self.names[u])
    }

    /// A random volume (no draw with one volume, so single-volume runs
    /// replay the same scenarios as before volumes existed).
    fn pick_vol(&mut self) -> usize {
        if self.vols.len() > 1 {
            self.rng.gen_range(0..self.vols.len())
        } else {
            0
        }
    }

    fn apply(&mut self, i: usize, ev: Event) -> Vec<Action> {
        let now = self.now;
        let Some(node) = self.nodes[i].as_mut() else {
            return Vec::new();
        };
        let acts = node.handle(now, ev);
        for a in &acts {
            match a {
                Action::SendLockSet { upstream, set, .. } => {
                    if let Some(u) = self.idx(upstream) {
                        self.net.push((i, u, set.clone()));
                    }
                }
                Action::RelayedReleased {
                    downstream,
                    relationship,
                    unprotected,
                    ..
                } => {
                    // Relayed locks whose origin's lease and grace ran out
                    // were dropped (reported): the snapshots that set no
                    // longer names are no longer needed here.
                    self.out.lease_releases += 1;
                    if let (Some(d), Some(k)) = (self.idx(downstream), self.rel_vol(relationship)) {
                        if let Some((_, locked)) = self.delivered.get_mut(&(i, d, k)) {
                            for s in unprotected {
                                locked.remove(s);
                            }
                        }
                    }
                }
                Action::Released {
                    downstream,
                    relationship,
                    reason,
                } => {
                    if *reason == ReleaseReason::LeaseExpired {
                        self.out.lease_releases += 1;
                    }
                    // The released set no longer protects anything, but the
                    // node still remembers the highest generation it took
                    // from that relationship: a late older set stays ignored.
                    if let (Some(d), Some(k)) = (self.idx(downstream), self.rel_vol(relationship)) {
                        if let Some((_, locked)) = self.delivered.get_mut(&(i, d, k)) {
                            locked.clear();
                        }
                    }
                }
                _ => {}
            }
        }
        if let Some(node) = self.nodes[i].as_ref() {
            self.persisted[i] = node.to_bytes().expect("persist");
        }
        acts
    }

    fn base(&self, u: usize, d: usize, k: usize) -> Option<Uuid> {
        self.snaps[d][k]
            .iter()
            .rev()
            .find(|s| self.snaps[u][k].contains(s))
            .copied()
    }

    fn create(&mut self, i: usize) {
        let k = self.pick_vol();
        let id = Uuid::from_u128(self.rng.gen());
        self.snaps[i][k].push(id);
        self.log(|| {
            format!(
                "{} creates {}@{}",
                self.names[i],
                self.vols[k],
                self.short(&id)
            )
        });
        self.apply(
            i,
            Event::SnapshotCreated {
                volume: self.vols[k].clone(),
                snapshot: id,
            },
        );
    }

    fn transfer(&mut self, u: usize, d: usize, k: usize) {
        if self.nodes[u].is_none() || self.nodes[d].is_none() {
            return;
        }
        let Some(&target) = self.snaps[u][k].last() else {
            return;
        };
        let list = self.snaps[u][k].clone();
        let relationship = self.rel(u, k);
        self.apply(
            d,
            Event::UpstreamSnapshots {
                relationship: relationship.clone(),
                snapshots: list,
            },
        );
        self.apply(
            d,
            Event::TransferStarting {
                relationship: relationship.clone(),
            },
        );
        if !self.snaps[d][k].contains(&target) {
            if self.base(u, d, k).is_none() && self.baselined.contains(&(u, d, k)) {
                self.out.broken += 1; // no common base: the chain broke (full copy)
            }
            self.log(|| {
                format!(
                    "transfer {}->{} {} target {} base {:?}",
                    self.names[u],
                    self.names[d],
                    relationship,
                    self.short(&target),
                    self.base(u, d, k).map(|b| self.short(&b))
                )
            });
            self.snaps[d][k].push(target);
            self.out.transfers += 1;
        }
        self.baselined.insert((u, d, k));
        self.apply(
            d,
            Event::TransferFinished {
                relationship,
                target,
            },
        );
        self.share_update(u, d, k);
    }

    fn share_update(&mut self, u: usize, d: usize, k: usize) {
        let shared: Vec<Uuid> = self.snaps[d][k]
            .iter()
            .filter(|s| self.snaps[u][k].contains(s))
            .copied()
            .collect();
        self.apply(
            u,
            Event::DownstreamShared {
                downstream: self.names[d].clone(),
                relationship: self.rel(u, k),
                shared,
            },
        );
    }

    fn rotate(&mut self, i: usize) {
        for k in 0..self.vols.len() {
            self.rotate_volume(i, k);
        }
    }

    fn rotate_volume(&mut self, i: usize, k: usize) {
        let Some(&newest) = self.snaps[i][k].last() else {
            return;
        };
        let cands: Vec<Uuid> = self.snaps[i][k]
            .iter()
            .copied()
            .filter(|s| *s != newest)
            .collect();
        for s in cands {
            // What delivered sets say must survive here: any snapshot named
            // by the newest set accepted from a downstream relationship of
            // this volume (its own base, its shared snapshots, or locks
            // relayed from further down the cascade), unless that set was
            // released (reported).
            let needed: Vec<usize> = self
                .delivered
                .iter()
                .filter(|((to, _, kk), (_, l))| *to == i && *kk == k && l.contains(&s))
                .map(|((_, from, _), _)| *from)
                .collect();
            let acts = self.apply(
                i,
                Event::DeleteRequested {
                    volume: self.vols[k].clone(),
                    snapshot: s,
                    force: false,
                },
            );
            if acts.iter().any(|a| matches!(a, Action::DeleteRefused { holders, .. } if holders.iter().any(|h| h.hop_path.len() >= 2))) {
                self.out.relayed_refusals += 1;
            }
            if acts.iter().any(|a| matches!(a, Action::Deleted { .. })) {
                for d in needed {
                    self.out.violations.push(format!(
                        "{} deleted {}@{s}, named in the set delivered from {}",
                        self.names[i], self.vols[k], self.names[d]
                    ));
                }
                self.log(|| {
                    format!(
                        "{} deletes {}@{}",
                        self.names[i],
                        self.vols[k],
                        self.short(&s)
                    )
                });
                self.snaps[i][k].retain(|x| *x != s);
                self.out.deletes += 1;
            }
        }
        let downs: Vec<usize> = self
            .edges
            .iter()
            .filter(|(u, _)| *u == i)
            .map(|(_, d)| *d)
            .collect();
        for d in downs {
            if self.nodes[d].is_some() {
                self.share_update(i, d, k);
            }
        }
    }

    fn deliver_one(&mut self, f: &Faults) {
        if self.net.is_empty() {
            return;
        }
        let k = self.rng.gen_range(0..self.net.len());
        let (from, to, set) = if self.rng.gen_bool(f.dup) {
            self.net[k].clone()
        } else {
            self.net.swap_remove(k)
        };
        if self.rng.gen_bool(f.loss) || self.nodes[to].is_none() {
            return;
        }
        let generation = set.generation;
        let k = self.vols.iter().position(|v| *v == set.volume);
        assert_eq!(
            k,
            self.rel_vol(&set.relationship),
            "a set for {} locks volume {}",
            set.relationship,
            set.volume
        );
        let snaps: BTreeSet<Uuid> = set.locks.iter().map(|l| l.snapshot).collect();
        self.log(|| {
            format!(
                "deliver {}->{} {} gen {} locks [{}]",
                self.names[from],
                self.names[to],
                set.relationship,
                generation,
                self.shorts(&snaps.iter().copied().collect::<Vec<_>>())
            )
        });
        let acts = self.apply(to, Event::LockSetReceived { set });
        let rejected = acts.iter().any(|a| matches!(a, Action::SetRejected { .. }));
        let Some(k) = k else {
            assert!(rejected, "a set for an unknown volume was accepted");
            return;
        };
        let newer = self
            .delivered
            .get(&(to, from, k))
            .is_none_or(|(g, _)| generation > *g);
        if !rejected && newer {
            self.delivered.insert((to, from, k), (generation, snaps));
        }
    }

    fn restart(&mut self, i: usize) {
        if self.nodes[i].is_none() {
            return;
        }
        // The pool's snapshots, as the replicator hands them over.
        let lists = self
            .vols
            .iter()
            .zip(&self.snaps[i])
            .map(|(v, s)| (v.clone(), s.clone()))
            .collect();
        let node = LockNode::from_bytes(self.cfgs[i].clone(), &self.persisted[i], &lists)
            .expect("restore persisted lock table");
        self.nodes[i] = Some(node);
        self.apply(i, Event::Restarted);
    }

    fn tick_all(&mut self, dt: u64) {
        self.now += dt;
        for i in 0..self.nodes.len() {
            self.apply(i, Event::Tick);
        }
    }

    /// One random step.
    pub fn step(&mut self, f: &Faults) {
        let n = self.nodes.len();
        if self.trace {
            for i in 0..n {
                for k in 0..self.vols.len() {
                    self.log(|| {
                        format!(
                            "  {} {} has [{}]",
                            self.names[i],
                            self.vols[k],
                            self.shorts(&self.snaps[i][k])
                        )
                    });
                }
            }
        }
        match self.rng.gen_range(0..100) {
            0..=19 => {
                let i = self.rng.gen_range(0..n);
                self.create(i)
            }
            20..=44 => {
                if !self.edges.is_empty() {
                    let (u, d) = self.edges[self.rng.gen_range(0..self.edges.len())];
                    let k = self.pick_vol();
                    self.transfer(u, d, k);
                }
            }
            45..=64 => {
                let i = self.rng.gen_range(0..n);
                self.rotate(i)
            }
            65..=89 => {
                for _ in 0..3 {
                    self.deliver_one(f)
                }
            }
            _ => {
                let dt = self.rng.gen_range(0..1_000);
                self.tick_all(dt)
            }
        }
        if self.rng.gen_bool(f.restart) {
            let i = self.rng.gen_range(0..n);
            self.restart(i);
        }
    }

    /// Kill a non-root node, heal the network and let leases run out; every
    /// lock naming it must be gone everywhere.
    pub fn kill_and_expire(&mut self) {
        let cands: Vec<usize> = self.edges.iter().map(|(_, d)| *d).collect();
        let victim = cands[self.rng.gen_range(0..cands.len())];
        let vname = self.names[victim].clone();
        self.nodes[victim] = None;
        self.edges.retain(|(u, d)| *u != victim && *d != victim);
        self.net.retain(|(f, t, _)| *f != victim && *t != victim);
        let until = self.now + LEASE_MS + GRACE_MS + 6 * 2_000;
        while self.now <= until {
            self.tick_all(500);
            let heal = Faults {
                loss: 0.0,
                dup: 0.0,
                restart: 0.0,
            };
            while !self.net.is_empty() {
                self.deliver_one(&heal);
            }
        }
        for (i, node) in self.nodes.iter().enumerate() {
            let Some(node) = node else { continue };
            for h in node.all_locks() {
                if h.lock.origin_node == vname || h.lock.hop_path.contains(&vname) {
                    self.out.leaked.push(format!(
                        "{} still holds {} on {}",
                        self.names[i], h.lock, h.volume
                    ));
                }
            }
        }
    }
}

/// The relationship name of a mirror of `upstream`'s `vol` into our `vol`.
pub fn rel_name(vol: &str, upstream: &str) -> String {
    format!("{vol}/{upstream}")
}
