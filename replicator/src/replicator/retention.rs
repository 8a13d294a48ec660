//! Retention by count: a per-volume policy "keep the newest N snapshots",
//! applied on every tick (a pass the scheduler hands to a chore worker, see
//! `sched`; a pass lists volumes once and skips every volume that is
//! within its count or settled, see [`Replicator::apply_retention`]), on sources, middles and destinations alike (MISSION: scheduled
//! updates and pruning by count on each node). The policy is persisted in a
//! pool attribute ([`keys::RETENTION`]).
//!
//! Invariants kept:
//! - Every delete goes through [`Replicator::prune`], so a snapshot a soft
//!   lock names, or one an outgoing transfer uses, is never deleted here.
//! - What retention keeps beyond N, and why, is logged when that set
//!   changes, not on every tick; each delete is logged.

use super::*;

impl Replicator {
    /// Keep the newest `keep` snapshots of `volume` from now on (`None`
    /// ends the policy). The volume must exist; `keep` must be at least 1
    /// (a mirror needs a snapshot to stay incremental; `prune --keep 0`
    /// does a one-off).
    pub fn set_retention(&self, volume: &str, keep: Option<usize>) -> Result<()> {
        if keep == Some(0) {
            return Err(ReplError::Invalid(
                "retention keep must be at least 1 (end the policy instead)".into(),
            ));
        }
        volume_info(&self.engine, volume)?;
        self.store_retention(volume, keep)
    }

    /// The retention policy of every volume that has one.
    pub fn retention(&self) -> BTreeMap<String, usize> {
        lock(&self.st).retention().clone()
    }

    /// Set a policy without checking that the volume exists yet (a mirror's
    /// destination appears with its baseline; a config file may name a
    /// volume created later). `keep` must be at least 1.
    pub fn store_retention(&self, volume: &str, keep: Option<usize>) -> Result<()> {
        let (changed, acts) = self.change(|t| {
            let before = match keep {
                Some(k) => t.retention_mut().insert(volume.to_string(), k),
                None => t.retention_mut().remove(volume),
            };
            t.mem().retention_kept.remove(volume);
            if before != keep {
                tracing::info!(volume, keep = ?keep, before = ?before, "retention policy set");
            }
            Ok(before != keep)
        })?;
        // A policy the operator set is durable when confirmed (a crash must
        // not bring back the one it replaced).
        if changed {
            self.flush()?;
        }
        self.perform(acts, None);
        Ok(())
    }

    /// One pass of every policy (a chore worker's job, one pass at a time).
    ///
    /// Cheap when nothing changed: one volume listing gives every policy
    /// volume's snapshot count, and a volume whose count and lock
    /// protections are as they were at its last pass that deleted nothing
    /// and kept only locked snapshots is not listed again.
    pub(super) fn apply_retention(&self) {
        let policy = self.retention();
        if policy.is_empty() {
            return;
        }
        let counts: BTreeMap<String, usize> = match volumes(&self.engine) {
            Ok(v) => v.into_iter().map(|v| (v.name, v.snapshot_count)).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "retention pass: cannot list volumes");
                return;
            }
        };
        for (volume, keep) in policy {
            if self.stopping() {
                return;
            }
            // A volume that is not there (yet) has nothing to prune.
            let Some(&count) = counts.get(&volume) else {
                continue;
            };
            let rev = {
                let mut st = lock(&self.st);
                if count <= keep {
                    st.retention_kept.remove(&volume);
                    st.retention_settled.remove(&volume);
                    continue;
                }
                if st.retention_settled.get(&volume) == Some(&(count, st.protection_rev)) {
                    continue;
                }
                st.protection_rev
            };
            let plan = match self.prune(&volume, keep, false) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(volume = %volume, keep, error = %e, "retention pass failed");
                    continue;
                }
            };
            {
                // Settled only if nothing but locks kept what is beyond the
                // count (a snapshot in use, by a transfer or an NBD reader,
                // is tried again next pass).
                let settled =
                    plan.deleted.is_empty() && plan.skipped.iter().all(|s| !s.holders.is_empty());
                let mut st = lock(&self.st);
                if settled {
                    st.retention_settled.insert(volume.clone(), (count, rev));
                } else {
                    st.retention_settled.remove(&volume);
                }
            }
            for s in &plan.deleted {
                tracing::info!(volume = %volume, snapshot = %s, keep, "retention deleted snapshot");
            }
            let kept: Vec<String> = plan.skipped.iter().map(|s| s.snapshot.clone()).collect();
            let changed = {
                let mut st = lock(&self.st);
                st.retention_kept.insert(volume.clone(), kept.clone()) != Some(kept)
            };
            if changed && !plan.skipped.is_empty() {
                let why: Vec<String> = plan
                    .skipped
                    .iter()
                    .map(|s| format!("{}: {}", s.snapshot, s.reason))
                    .collect();
                tracing::info!(volume = %volume, keep, kept = %why.join("; "), "retention keeps snapshots beyond its count");
            }
        }
    }
}

/// Load the persisted policies.
pub(super) fn load_retention(e: &EngineHandle) -> Result<BTreeMap<String, usize>> {
    match get_attr(e, keys::RETENTION)? {
        Some(b) => serde_json::from_slice(&b).map_err(|err| ReplError::Persisted {
            key: keys::RETENTION.into(),
            detail: err.to_string(),
        }),
        None => Ok(BTreeMap::new()),
    }
}
