//! Clones made on the nodes during a soak (`vol clone VOL@SNAP NEWVOL`,
//! issue 16): each of a snapshot the model knows, on a random node that is
//! up (the source or a mirror: a test copy of a DR replica), read back
//! through its NBD exports at once, kept a while, then deleted. Checks
//! (counted as `check.*`, each failure a violation):
//! - clone-bytes: a new clone reads, in every namespace, as its snapshot's
//!   model;
//! - clone-origin-held: while a clone exists its origin snapshot stays on
//!   its node, whatever retention, prune, a mirror's updates or faults do.
//!
//! Invariants: only the main loop makes and deletes clones; a clone on a
//! node lost for good is forgotten with the node.

use super::checks::read_blocks;
use super::cluster::NodeState;
use super::model::decode;
use super::{Soak, VOLUMES};
use rand::Rng;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Clones alive at once, at most.
const CLONES_MAX: usize = 2;

/// One clone the harness made.
#[derive(Clone, Debug)]
pub struct CloneRec {
    pub node: usize,
    pub volume: String,
    pub snap: String,
    pub name: String,
    pub delete_at: Instant,
}

impl Soak {
    /// Delete one clone that is due, else make one.
    pub(super) fn clone_step(&mut self) {
        self.clones
            .retain(|c| self.nodes[c.node].state != NodeState::Lost);
        let due = self
            .clones
            .iter()
            .position(|c| c.delete_at <= Instant::now() && self.up(c.node));
        if let Some(at) = due {
            let c = self.clones[at].clone();
            match self
                .ctl
                .text(&self.addr(c.node), &["vol", "delete", &c.name])
            {
                Ok(_) => {
                    self.tally.add("clones.deleted", 1);
                    self.clones.remove(at);
                }
                Err(e) => {
                    self.tally.add("clones.delete_failed", 1);
                    self.tally.event(format!(
                        "vol delete {} on {}: {e:#}",
                        c.name,
                        Self::name(c.node)
                    ));
                }
            }
            return;
        }
        let cands: Vec<usize> = (0..self.nodes.len()).filter(|&i| self.up(i)).collect();
        if cands.is_empty() || self.clones.len() >= CLONES_MAX {
            return;
        }
        let node = cands[self.rng.gen_range(0..cands.len())];
        let vol = VOLUMES[self.rng.gen_range(0..VOLUMES.len())];
        let Ok(list) = self.ctl.snap_list(&self.addr(node), vol) else {
            return;
        };
        let modelled: Vec<String> = list
            .iter()
            .filter_map(|s| s["name"].as_str())
            .filter(|n| self.snaps.contains_key(*n))
            .map(str::to_string)
            .collect();
        if modelled.is_empty() {
            return;
        }
        let snap = modelled[self.rng.gen_range(0..modelled.len())].clone();
        self.clone_counter += 1;
        let name = format!("clone{}", self.clone_counter);
        let origin = format!("{vol}@{snap}");
        if let Err(e) = self
            .ctl
            .json(&self.addr(node), &["vol", "clone", &origin, &name])
        {
            // Retention may have taken the snapshot since the list.
            self.tally.add("clones.failed", 1);
            self.tally.event(format!(
                "vol clone {origin} {name} on {}: {e:#}",
                Self::name(node)
            ));
            return;
        }
        self.tally.add("clones", 1);
        self.check_clone_bytes(node, vol, &snap, &name);
        let hold = Duration::from_secs(self.rng.gen_range(10..60));
        self.clones.push(CloneRec {
            node,
            volume: vol.to_string(),
            snap,
            name,
            delete_at: Instant::now() + hold,
        });
    }

    /// A new clone reads as its snapshot's model in every namespace.
    fn check_clone_bytes(&mut self, node: usize, vol: &str, snap: &str, name: &str) {
        let Some(model) = self.snaps.get(snap).cloned() else {
            return;
        };
        let nss: Vec<(u32, String)> = self
            .namespaces
            .iter()
            .filter(|n| n.volume == vol)
            .map(|n| (n.id, n.export.replacen(vol, name, 1)))
            .collect();
        for (ns_id, export) in nss {
            let Some(want) = model.images.get(&ns_id) else {
                continue;
            };
            self.tally.add("check.clone-bytes", 1);
            let blocks = match read_blocks(&self.nodes[node].nbd, &export, want.len() as u64) {
                Ok(b) => b,
                Err(e) => {
                    self.tally.add("check.clone-bytes.unreadable", 1);
                    self.tally
                        .event(format!("read {}:{export}: {e:#}", Self::name(node)));
                    continue;
                }
            };
            let bad: Vec<String> = blocks
                .iter()
                .enumerate()
                .filter_map(
                    |(lba, b)| match decode(self.tally.seed, ns_id, lba as u64, b) {
                        Ok(g) if want.get(lba) == Some(&g) => None,
                        Ok(g) => Some(format!("lba {lba} gen {g} want {:?}", want.get(lba))),
                        Err(w) => Some(format!("lba {lba}: {w}")),
                    },
                )
                .collect();
            if !bad.is_empty() {
                self.tally.violation(
                    "clone-bytes",
                    format!(
                        "{}:{export} (a clone of {vol}@{snap}): {} blocks differ, first: {}",
                        Self::name(node),
                        bad.len(),
                        bad[..bad.len().min(3)].join("; ")
                    ),
                );
            }
        }
    }

    /// Every clone's origin snapshot is still on its node (`present`: the
    /// snapshot names this check round listed per node and volume).
    pub(super) fn check_clones(&mut self, present: &BTreeMap<(usize, String), Vec<String>>) {
        for c in self.clones.clone() {
            let Some(names) = present.get(&(c.node, c.volume.clone())) else {
                continue; // not listed this round (down, or the list failed)
            };
            self.tally.add("check.clone-origin-held", 1);
            if !names.contains(&c.snap) {
                self.tally.violation(
                    "clone-origin-held",
                    format!(
                        "{}:{}@{} is gone while its clone {} exists",
                        Self::name(c.node),
                        c.volume,
                        c.snap,
                        c.name
                    ),
                );
            }
        }
    }
}
