//! `mirror retarget`: a relationship goes on from a new source.
//!
//! The case it exists for: in A -> B -> C, B is lost for good. Every node
//! above keeps the locks of every node below (relayed up the cascade), so A
//! still holds the snapshots C depends on; C switches its source to A and
//! goes on incrementally from the newest snapshot it shares with A. The
//! same command moves a relationship to its source's new address.
//!
//! Invariants kept:
//! - Nothing changes unless the new source is reachable, is not this node
//!   nor one of this volume's downstreams, holds the source volume (or
//!   qtree) of the same kind, and either shares a snapshot with the
//!   destination or the operator accepted the full copy (`allow_full`),
//!   whose size is said first.
//! - The switch is one step: the relationship and the lock table are
//!   persisted together, the new upstream gets our whole set (the anchor
//!   stays locked here until the new source's first transfer), the former
//!   upstream a final empty set when it can be reached (otherwise its locks
//!   go stale there under their lease; nothing retries them).
//! - A transfer interrupted on the former source is not resumed from its
//!   position (the new source plans its own items): its checkpoint drops to
//!   position 0, so the next transfer reverts its partial data first.

use super::*;

impl Replicator {
    /// Point relationship `dst` at `source_addr/source_volume[/source_qtree]`
    /// and run an update from it (unless the relationship is broken).
    #[allow(clippy::too_many_arguments)]
    pub fn mirror_retarget(
        &self,
        dst: &str,
        source_addr: &str,
        source_volume: &str,
        source_qtree: Option<&str>,
        allow_full: bool,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<RetargetReport> {
        let old = self.rel(dst)?;
        let key = old.dst.clone();
        match (old.kind, source_qtree) {
            (MirrorKind::Volume, Some(q)) => {
                return Err(ReplError::Invalid(format!(
                    "mirror {key} is a volume mirror; its new source is a volume (ADDR/VOL), not the qtree {source_volume}/{q}"
                )))
            }
            (MirrorKind::Qtree, None) => {
                return Err(ReplError::Invalid(format!(
                    "mirror {key} is a qtree mirror; its new source is a qtree (ADDR/VOL/QTREE)"
                )))
            }
            _ => {}
        }
        let mut new = old.clone();
        new.source_addr = source_addr.to_string();
        new.source_volume = source_volume.to_string();
        new.source_qtree = source_qtree.map(str::to_string);
        let (base, full_copy_bytes, peer, old_final) = {
            let _busy = self.busy_guard(&key)?;
            let mut c = self.connect(source_addr)?;
            let peer = c.peer_node.clone();
            self.check_new_source(&old, &peer)?;
            let src = self.request_list(&mut c, &key, source_volume, source_qtree)?;
            let local = match volumes(&self.engine)?
                .iter()
                .any(|v| v.name == old.dst_volume)
            {
                true => snapshots(&self.engine, &old.dst_volume)?,
                false => Vec::new(),
            };
            let base = newest_common(&src, &local).map(wire_ref);
            let mut full_copy_bytes = None;
            if base.is_none() {
                let Some(newest) = src.last() else {
                    return Err(ReplError::NotFound(format!(
                        "any snapshot of {} (take one there with `snap create`)",
                        new.source_path()
                    )));
                };
                drop(c);
                let bytes = self.probe_full_bytes(&new, newest);
                if !allow_full {
                    return Err(ReplError::Invalid(format!(
                        "{key} shares no snapshot with {}: going on from there needs a full copy ({bytes} bytes); rerun with --allow-full to accept it",
                        new.source_path()
                    )));
                }
                full_copy_bytes = Some(bytes);
                c = self.connect(source_addr)?;
                if c.peer_node != peer {
                    return Err(ReplError::Invalid(format!(
                        "{source_addr} changed from node {peer:?} to {:?} during the retarget; try again",
                        c.peer_node
                    )));
                }
            }
            // An interrupted transfer's items are the former source's plan.
            if let Some(ck) = self.load_ckpt(&key)?.filter(|ck| ck.position > 0) {
                self.store_ckpt(&key, Some(&Checkpoint { position: 0, ..ck }))?;
            }
            let src_ids: Vec<Uuid> = src.iter().map(|s| Uuid::from_bytes(s.id)).collect();
            let ((), acts) = self.change(|t| {
                if let Some(r) = t.rel_mut(&key) {
                    r.source_addr = new.source_addr.clone();
                    r.source_volume = new.source_volume.clone();
                    r.source_qtree = new.source_qtree.clone();
                    r.source_node = Some(peer.clone());
                    r.source_snaps = src_ids.clone();
                    r.common = base.clone();
                    r.last_error = None;
                }
                t.lock(upstream_event(&new, &peer));
                t.lock(Event::UpstreamSnapshots {
                    relationship: key.clone(),
                    snapshots: src_ids,
                });
                t.lock(Event::TransferStarting {
                    relationship: key.clone(),
                });
                t.mem()
                    .pending_sets
                    .retain(|(rel, up), _| rel != &key || up == &peer);
                Ok(())
            })?;
            self.flush()?;
            // The final set for the former upstream goes to its address;
            // the rest (ours, for the new upstream) on this connection.
            let former = old.source_node.clone().filter(|n| n != &peer);
            let mut old_final = None;
            let mut rest = Vec::new();
            for a in acts {
                match a {
                    Action::SendLockSet { upstream, set, .. }
                        if Some(&upstream) == former.as_ref() && set.locks.is_empty() =>
                    {
                        old_final = Some((upstream, set))
                    }
                    other => rest.push(other),
                }
            }
            self.send_sets(&mut c, rest)?;
            let gone = self.barrier(&mut c)?;
            self.apply_gone(&key, gone, Some(&mut c));
            (base, full_copy_bytes, peer, old_final)
        };
        let released_old_upstream = match old_final {
            None => old.source_node.is_none() || old.source_node.as_deref() == Some(&peer),
            Some((up, set)) => match self.deliver_to(&old.source_addr, &up, &set) {
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!(dst = %key, old_source = %old.source_path(), error = %e, "the former upstream was not reached: its locks for this relationship go stale there under their lease");
                    false
                }
            },
        };
        tracing::info!(dst = %key, old_source = %old.source_path(), new_source = %new.source_path(), node = %peer, base = ?base.as_ref().map(|b| &b.name), "mirror retargeted");
        let mut report = RetargetReport {
            dst: key.clone(),
            old_source: old.source_path(),
            old_source_node: old.source_node.clone(),
            new_source: new.source_path(),
            new_source_node: peer,
            base: base.clone(),
            full_copy_bytes,
            released_old_upstream,
            transfer: None,
            transfer_error: None,
        };
        if !old.broken {
            // Without a base the accepted full copy is a re-baseline.
            let mode = if base.is_some() {
                Mode::Update
            } else {
                Mode::Resync { force: false }
            };
            match self.transfer(&key, mode, progress) {
                Ok(t) => report.transfer = Some(t),
                Err(e) => report.transfer_error = Some(e.to_string()),
            }
        }
        Ok(report)
    }

    /// Refuse a new source that is this node, or that pulls this
    /// relationship's destination volume from us (a cycle).
    fn check_new_source(&self, rel: &Relationship, peer: &str) -> Result<()> {
        if peer == self.cfg.node_name {
            return Err(ReplError::Invalid(format!(
                "that address is this node ({peer}); a mirror's source is another node"
            )));
        }
        let st = lock(&self.st);
        let downstream = st
            .locks()
            .downstreams()
            .into_iter()
            .any(|((node, _), vol)| node == peer && vol.as_deref() == Some(&rel.dst_volume));
        if downstream {
            return Err(ReplError::Invalid(format!(
                "node {peer} mirrors {} from this node; pulling from it would make a cycle",
                rel.dst_volume
            )));
        }
        Ok(())
    }
}
