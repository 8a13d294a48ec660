//! Snapshots, retention and locks as the operator sees them.
//!
//! Owns: `snap create/delete/rollback`, `vol resize`, `prune`, `lock
//! add/list/release`, the lock views. Invariant: every delete (also those
//! of a rollback with `-r`) goes through the lock table
//! (`DeleteRequested`) and is refused while a transfer uses the snapshot;
//! a mirror's destination volume is neither resized nor rolled back here
//! (it follows its source).

use super::*;

/// Snapshot names by (volume, global id).
pub(super) type SnapNames = BTreeMap<(String, Uuid), String>;

impl Replicator {
    /// Take a snapshot and tell the lock table.
    pub fn snap_create(&self, volume: &str, name: &str) -> Result<SnapshotInfo> {
        let info = match self.engine.call(Request::CreateSnapshot {
            volume: volume.to_string(),
            name: name.to_string(),
            id: Some(self.cfg.env.new_snapshot_id()),
            created_unix_ms: Some(self.now_ms()),
        }) {
            Ok(Reply::Snapshot(s)) => s,
            Ok(_) => {
                return Err(ReplError::EngineReply {
                    request: "CreateSnapshot",
                })
            }
            Err(e) => return Err(ReplError::engine(format!("snapshot {volume}@{name}"), e)),
        };
        let acts = self.lock_events(vec![Event::SnapshotCreated {
            volume: volume.to_string(),
            snapshot: info.id,
        }])?;
        self.perform(acts, None);
        Ok(info)
    }

    pub(super) fn find_snap(&self, volume: &str, name: &str) -> Result<SnapshotName> {
        snapshot_names_of(&self.engine, volume)?
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| ReplError::NotFound(format!("snapshot {volume}@{name}")))
    }

    /// Delete a snapshot; refused (naming every holder) if locked, unless
    /// `force` (logged; affected downstreams are told).
    pub fn snap_delete(&self, volume: &str, name: &str, force: bool) -> Result<()> {
        let s = self.find_snap(volume, name)?;
        if let Some(by) = self.in_use(volume, s.id, &s.name) {
            return Err(ReplError::InUse {
                volume: volume.into(),
                snapshot: name.into(),
                by,
            });
        }
        let acts = self.lock_events(vec![Event::DeleteRequested {
            volume: volume.to_string(),
            snapshot: s.id,
            force,
        }])?;
        if let Some(Action::DeleteRefused { holders, .. }) = acts
            .iter()
            .find(|a| matches!(a, Action::DeleteRefused { .. }))
        {
            self.n.deletes_refused.fetch_add(1, Ordering::Relaxed);
            return Err(ReplError::Locked {
                volume: volume.into(),
                snapshot: name.into(),
                holders: holders_text(holders),
            });
        }
        self.engine
            .call(Request::DeleteSnapshot {
                volume: volume.into(),
                name: name.into(),
            })
            .map_err(|e| ReplError::engine(format!("delete {volume}@{name}"), e))?;
        self.perform(acts, None);
        Ok(())
    }

    /// The mirror relationship whose destination is `volume`, as an error
    /// for an operator's `what` (resize, roll back) on it. `qtrees`: a
    /// qtree mirror into the volume counts too (a rollback would change
    /// its qtree; a resize of the volume's own space does not touch it).
    fn refuse_on_mirror_destination(
        &self,
        volume: &str,
        what: &'static str,
        qtrees: bool,
    ) -> Result<()> {
        match lock(&self.st)
            .rels()
            .values()
            .find(|r| r.dst_volume == volume && (qtrees || r.kind == MirrorKind::Volume))
        {
            Some(r) => Err(ReplError::MirrorDestination {
                volume: volume.into(),
                dst: r.dst.clone(),
                source_path: r.source_path(),
                what,
            }),
            None => Ok(()),
        }
    }

    /// Resize `volume` (its own space): grow always, shrink only when no
    /// image maps a block past the new end (the engine names the image).
    /// Refused on a volume mirror's destination: it follows its source at
    /// the next transfer ([`Replicator::ensure_dst`]). A volume that holds
    /// a qtree mirror's destination may resize its own space.
    pub fn vol_resize(&self, volume: &str, size_bytes: u64) -> Result<VolumeInfo> {
        volume_info(&self.engine, volume)?;
        self.refuse_on_mirror_destination(volume, "resize", false)?;
        match self.engine.call(Request::ResizeVolume {
            name: volume.into(),
            size_bytes,
            replica: false,
        }) {
            Ok(Reply::Volume(v)) => {
                tracing::info!(%volume, size_bytes, "volume resized");
                Ok(v)
            }
            Ok(_) => Err(ReplError::EngineReply {
                request: "ResizeVolume",
            }),
            Err(e) => Err(ReplError::engine(format!("resize {volume}"), e)),
        }
    }

    /// Roll `volume` back to `snapshot` (its live image becomes the
    /// snapshot's). Refused on a mirror destination. Newer snapshots are
    /// refused by the engine unless `destroy_newer`; then each is a delete
    /// that obeys the soft locks: a locked one (or one a transfer reads)
    /// fails the whole rollback, naming it and its holders, and nothing
    /// changes. There is no forced form: locked snapshots are never
    /// deleted silently (`snap delete --force` them first).
    pub fn snap_rollback(
        &self,
        volume: &str,
        snapshot: &str,
        destroy_newer: bool,
    ) -> Result<RollbackReport> {
        self.refuse_on_mirror_destination(volume, "roll back", true)?;
        let mut snaps = snapshots(&self.engine, volume)?;
        snaps.sort_by_key(|s| s.gen);
        let at = snaps
            .iter()
            .position(|s| s.name == snapshot)
            .ok_or_else(|| ReplError::NotFound(format!("snapshot {volume}@{snapshot}")))?;
        let newer: Vec<SnapshotInfo> = snaps.split_off(at + 1);
        if destroy_newer && !newer.is_empty() {
            let uses = self.uses(volume);
            if let Some((s, by)) = newer
                .iter()
                .find_map(|s| uses.of(s.id, &s.name).map(|by| (s, by)))
            {
                return Err(ReplError::InUse {
                    volume: volume.into(),
                    snapshot: s.name.clone(),
                    by,
                });
            }
            let locked: Vec<String> = {
                let st = lock(&self.st);
                newer
                    .iter()
                    .filter_map(|s| {
                        let h = st.locks().holders(volume, s.id);
                        if h.is_empty() {
                            return None;
                        }
                        let locks: Vec<SoftLock> = h.into_iter().map(|x| x.lock).collect();
                        Some(format!(
                            "{volume}@{} locked by {}",
                            s.name,
                            holders_text(&locks)
                        ))
                    })
                    .collect()
            };
            if !locked.is_empty() {
                self.n.deletes_refused.fetch_add(1, Ordering::Relaxed);
                return Err(ReplError::RollbackLocked {
                    volume: volume.into(),
                    snapshot: snapshot.into(),
                    detail: locked.join("; "),
                });
            }
        }
        // The lock table learns of the deletes first (as `snap_delete`
        // does); one that it refuses after all (a lock arrived since the
        // check) stops the rollback before the engine changes anything.
        let acts = if destroy_newer {
            self.lock_events(
                newer
                    .iter()
                    .map(|s| Event::DeleteRequested {
                        volume: volume.to_string(),
                        snapshot: s.id,
                        force: false,
                    })
                    .collect(),
            )?
        } else {
            Vec::new()
        };
        if let Some(Action::DeleteRefused { holders, .. }) = acts
            .iter()
            .find(|a| matches!(a, Action::DeleteRefused { .. }))
        {
            self.n.deletes_refused.fetch_add(1, Ordering::Relaxed);
            return Err(ReplError::RollbackLocked {
                volume: volume.into(),
                snapshot: snapshot.into(),
                detail: holders_text(holders),
            });
        }
        self.engine
            .call(Request::Rollback {
                volume: volume.into(),
                snapshot: snapshot.into(),
                destroy_newer,
            })
            .map_err(|e| ReplError::engine(format!("roll back {volume} to {snapshot}"), e))?;
        self.perform(acts, None);
        let deleted: Vec<String> = if destroy_newer {
            newer.into_iter().map(|s| s.name).collect()
        } else {
            Vec::new()
        };
        tracing::warn!(%volume, %snapshot, deleted = ?deleted, "volume rolled back");
        Ok(RollbackReport {
            volume: volume.into(),
            snapshot: snapshot.into(),
            deleted_snapshots: deleted,
        })
    }

    /// Delete `volume` with its qtrees and snapshots. Refused while it is a
    /// mirror destination here, while a transfer reads it, and (unless
    /// `force`) while a downstream pulls it or any of its snapshots is
    /// locked, naming each. Forced, every locked snapshot is a forced
    /// delete (logged, counted, holders told) and the downstream
    /// relationships on it end here.
    pub fn vol_delete(&self, volume: &str, force: bool) -> Result<VolDeleteReport> {
        volume_info(&self.engine, volume)?;
        if let Some(r) = lock(&self.st)
            .rels()
            .values()
            .find(|r| r.dst_volume == volume)
        {
            return Err(ReplError::Invalid(format!(
                "volume {volume} is the destination of mirror {} (from {}); `mirror delete {}` first",
                r.dst,
                r.source_path(),
                r.dst
            )));
        }
        let snaps = snapshots(&self.engine, volume)?;
        let uses = self.uses(volume);
        if let Some((s, by)) = snaps
            .iter()
            .find_map(|s| uses.of(s.id, &s.name).map(|by| (s, by)))
        {
            return Err(ReplError::InUse {
                volume: volume.into(),
                snapshot: s.name.clone(),
                by,
            });
        }
        let (locked, downs) = {
            let st = lock(&self.st);
            let locked: Vec<(&SnapshotInfo, Vec<Held>)> = snaps
                .iter()
                .map(|s| (s, st.locks().holders(volume, s.id)))
                .filter(|(_, h)| !h.is_empty())
                .collect();
            let stale = st.locks().stale_downstreams();
            let downs: Vec<(DownKey, bool)> = st
                .locks()
                .downstreams()
                .into_iter()
                .filter(|(_, v)| v.as_deref() == Some(volume))
                .map(|(k, _)| {
                    let s = stale.contains(&k);
                    (k, s)
                })
                .collect();
            (locked, downs)
        };
        let lines: Vec<String> = locked
            .iter()
            .map(|(s, h)| {
                let locks: Vec<SoftLock> = h.iter().map(|x| x.lock.clone()).collect();
                format!("{}@{} locked by {}", volume, s.name, holders_text(&locks))
            })
            .collect();
        let down_lines: Vec<String> = downs
            .iter()
            .map(|((node, rel), stale)| {
                format!(
                    "{node}:{rel} pulls it{}",
                    if *stale { " (stale)" } else { "" }
                )
            })
            .collect();
        let live_down = downs.iter().any(|(_, stale)| !stale);
        if !force && (live_down || !lines.is_empty()) {
            let detail: Vec<&str> = down_lines
                .iter()
                .chain(&lines)
                .map(String::as_str)
                .collect();
            return Err(ReplError::VolumeInUse {
                volume: volume.into(),
                detail: detail.join("; "),
            });
        }
        // Forced: each locked snapshot goes as a forced delete (the
        // holders are told), then the volume with the rest.
        let forced_acts = self.lock_events(
            locked
                .iter()
                .map(|(s, _)| Event::DeleteRequested {
                    volume: volume.to_string(),
                    snapshot: s.id,
                    force: true,
                })
                .collect(),
        )?;
        self.engine
            .call(Request::DeleteVolume {
                name: volume.to_string(),
            })
            .map_err(|e| ReplError::engine(format!("delete volume {volume}"), e))?;
        self.perform(forced_acts, None);
        let mut evs = vec![Event::VolumeRemoved {
            volume: volume.to_string(),
        }];
        for ((node, rel), _) in &downs {
            evs.push(Event::DownstreamRemoved {
                downstream: node.clone(),
                relationship: rel.clone(),
            });
        }
        let acts = self.lock_events(evs)?;
        self.perform(acts, None);
        {
            let mut st = lock(&self.st);
            st.down_shared
                .retain(|k, _| !downs.iter().any(|(d, _)| d == k));
        }
        if self.retention().contains_key(volume) {
            self.store_retention(volume, None)?;
        }
        if self.exports().contains_key(volume) {
            let ((), acts) = self.change(|t| {
                t.exports_mut().remove(volume);
                Ok(())
            })?;
            self.perform(acts, None);
        }
        self.flush()?;
        tracing::warn!(%volume, snapshots = snaps.len(), forced = lines.len(), downstreams = down_lines.len(), "volume deleted");
        Ok(VolDeleteReport {
            volume: volume.into(),
            deleted_snapshots: snaps.into_iter().map(|s| s.name).collect(),
            forced_locks: lines,
            ended_downstreams: down_lines,
        })
    }

    /// Keep the newest `keep` snapshots of `volume`; delete older ones
    /// unless locked or in a transfer (each skip says why).
    pub fn prune(&self, volume: &str, keep: usize, dry_run: bool) -> Result<PrunePlan> {
        self.prune_with_progress(volume, keep, dry_run, &|_| {})
    }

    /// [`Self::prune`], telling `progress` after each snapshot past the
    /// newest `keep` is settled (deleted, or kept and why): `done_items`
    /// of `total_items` snapshots; no bytes (what a delete frees is known
    /// only after a plane walk, which a prune does not do).
    pub fn prune_with_progress(
        &self,
        volume: &str,
        keep: usize,
        dry_run: bool,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<PrunePlan> {
        let mut snaps = snapshot_names_of(&self.engine, volume)?;
        snaps.sort_by_key(|s| (s.created_unix_ms, s.gen));
        let cut = snaps.len().saturating_sub(keep);
        let (old, recent) = snaps.split_at(cut);
        let mut plan = PrunePlan {
            volume: volume.into(),
            keep,
            dry_run,
            deleted: Vec::new(),
            kept_recent: recent.iter().map(|s| s.name.clone()).collect(),
            skipped: Vec::new(),
        };
        // Every holder of a snapshot of `volume` holds it in `volume`.
        let names = names_of(volume, &snaps);
        let held: Vec<Vec<(Held, LockView)>> = {
            let st = lock(&self.st);
            snaps
                .iter()
                .map(|s| {
                    st.locks()
                        .holders(volume, s.id)
                        .into_iter()
                        .map(|h| {
                            let v = self.view_with(&h, &names, &st);
                            (h, v)
                        })
                        .collect()
                })
                .collect()
        };
        let mut shares = Shares::default();
        for (s, hs) in snaps.iter().zip(&held) {
            shares.add(&s.name, hs);
        }
        let views: Vec<Vec<LockView>> = held
            .iter()
            .map(|hs| hs.iter().map(|(_, v)| v.clone()).collect())
            .collect();
        let mut prog = Progress {
            done_items: 0,
            total_items: old.len() as u64,
            done_bytes: 0,
            total_bytes: 0,
        };
        progress(prog);
        for ((s, holders), hs) in old.iter().zip(&views).zip(&held) {
            if prog.done_items > 0 {
                progress(prog);
            }
            prog.done_items += 1;
            if let Some(by) = self.in_use(volume, s.id, &s.name) {
                plan.skipped.push(PruneSkip {
                    snapshot: s.name.clone(),
                    reason: format!("in use by {by}"),
                    holders: Vec::new(),
                    effects: Vec::new(),
                });
                continue;
            }
            if !holders.is_empty() {
                let mut who: Vec<String> = holders
                    .iter()
                    .map(|v| format!("{} {:?} from {}", v.kind, v.text, v.origin_node))
                    .collect();
                who.dedup();
                plan.skipped.push(PruneSkip {
                    snapshot: s.name.clone(),
                    reason: format!("locked by {}", who.join("; ")),
                    holders: holders.clone(),
                    effects: shares.delete_effects(&s.name, hs),
                });
                continue;
            }
            if dry_run {
                plan.deleted.push(s.name.clone());
                continue;
            }
            match self.snap_delete(volume, &s.name, false) {
                Ok(()) => plan.deleted.push(s.name.clone()),
                Err(e) => plan.skipped.push(PruneSkip {
                    snapshot: s.name.clone(),
                    reason: e.to_string(),
                    holders: Vec::new(),
                    effects: Vec::new(),
                }),
            }
        }
        if prog.done_items > 0 {
            progress(prog);
        }
        Ok(plan)
    }

    /// An application on this node depends on `volume@snap`: lock it here
    /// and on every node upstream.
    pub fn lock_add(
        &self,
        volume: &str,
        snap: &str,
        owner: &str,
        text: Option<&str>,
    ) -> Result<LockAdded> {
        if owner.is_empty() || owner.contains(": ") {
            return Err(ReplError::Invalid(format!(
                "owner {owner:?} must be non-empty without \": \""
            )));
        }
        let s = self.find_snap(volume, snap)?;
        let full = match text {
            Some(t) if !t.is_empty() => format!("{owner}: {t}"),
            _ => owner.to_string(),
        };
        let bounds = sluice_lockproto::Bounds::default();
        if full.len() > bounds.max_text_len {
            return Err(ReplError::Invalid(format!(
                "lock text is {} bytes; at most {}",
                full.len(),
                bounds.max_text_len
            )));
        }
        lock(&self.st)
            .locks()
            .app_lock_room(volume)
            .map_err(|e| ReplError::Invalid(format!("lock on {volume}@{snap} refused: {e}")))?;
        let acts = self.lock_events(vec![Event::AppLockAdded {
            volume: volume.to_string(),
            snapshot: s.id,
            owner: full.clone(),
        }])?;
        // Durable before anyone hears of it: an application told its lock
        // holds must find it after a crash (the cascade simulation and the
        // soak found a power cut that lost a lock `lock add` had confirmed,
        // and the snapshot went with the next update).
        self.flush()?;
        let mut undelivered = self.perform(acts, None);
        // The set of an earlier change may still wait for its upstream (a
        // re-add of a lock changes nothing, so sends nothing): it is sent
        // now, and what still waits is undelivered too.
        undelivered.extend(self.deliver_pending(|st, rel, _| {
            st.rels().get(rel).is_some_and(|r| r.dst_volume == volume)
        }));
        undelivered.sort();
        undelivered.dedup();
        if !undelivered.is_empty() {
            tracing::warn!(%volume, snapshot = %snap, upstreams = %undelivered.join(", "), "application lock held here, but not yet on the upstream (unreachable): retried every tick");
        }
        let names = self.snapshot_names_in([volume])?;
        let l = lock(&self.st)
            .locks()
            .holders(volume, s.id)
            .into_iter()
            .find(|h| h.lock.text == full && h.lock.kind == LockKind::OwnerName && h.via.is_none())
            .ok_or_else(|| ReplError::NotFound("the lock just added".into()))?;
        Ok(LockAdded {
            lock: self.view(&l, &names),
            delivered: undelivered.is_empty(),
            undelivered_upstreams: undelivered,
        })
    }

    /// Every downstream relationship that pulls from this node: its locks
    /// here, whether they are stale, the last transfer served to it, and
    /// how old the newest snapshot it holds here is.
    pub fn mirror_destinations(&self) -> Result<Vec<crate::types::Destination>> {
        // Names and creation times from one listing of every volume.
        let mut names: SnapNames = BTreeMap::new();
        let mut created: BTreeMap<Uuid, u64> = BTreeMap::new();
        for v in volumes(&self.engine)? {
            for s in snapshot_names_of(&self.engine, &v.name)? {
                created.insert(s.id, s.created_unix_ms);
                names.insert((v.name.clone(), s.id), s.name);
            }
        }
        let now = self.now_ms();
        let st = lock(&self.st);
        let stale = st.locks().stale_downstreams();
        let all = st.locks().all_locks();
        let mut out = Vec::new();
        for (key, volume) in st.locks().downstreams() {
            let mine: Vec<&Held> = all
                .iter()
                .filter(|h| h.via.as_ref() == Some(&key))
                .collect();
            let mut snaps: Vec<(u64, String)> = mine
                .iter()
                .map(|h| {
                    let at = created.get(&h.lock.snapshot).copied().unwrap_or(0);
                    let name = names
                        .get(&(h.volume.clone(), h.lock.snapshot))
                        .cloned()
                        .unwrap_or_else(|| h.lock.snapshot.to_string());
                    (at, name)
                })
                .collect();
            snaps.sort();
            snaps.dedup();
            let lag_ms = snaps.last().map(|(at, _)| now.saturating_sub(*at));
            out.push(crate::types::Destination {
                node: key.0.clone(),
                relationship: key.1.clone(),
                volume,
                stale: stale.contains(&key),
                locks: mine.len(),
                locked_snapshots: snaps.into_iter().map(|(_, n)| n).collect(),
                last_served: st.served.get(&key).cloned(),
                lag_ms,
            });
        }
        Ok(out)
    }

    /// Every lock effective on this node: O(locks), plus one name listing
    /// (no tree walk) per volume a lock names.
    pub fn lock_list(&self) -> Vec<LockView> {
        let locks = lock(&self.st).locks().all_locks();
        let mut wanted: BTreeMap<&str, BTreeSet<Uuid>> = BTreeMap::new();
        for h in &locks {
            wanted
                .entry(h.volume.as_str())
                .or_default()
                .insert(h.lock.snapshot);
        }
        let names = self.names_of_ids(wanted).unwrap_or_default();
        let st = lock(&self.st);
        locks
            .iter()
            .map(|l| self.view_with(l, &names, &st))
            .collect()
    }

    /// The locks past their lease, as (origin node, text): what `status`
    /// reports, O(locks) and without names.
    pub fn stale_locks(&self) -> Vec<(String, String)> {
        let now = self.now_ms();
        let st = lock(&self.st);
        st.locks()
            .all_locks()
            .into_iter()
            .filter(|h| st.locks().is_stale(h, now))
            .map(|h| (h.lock.origin_node, h.lock.text))
            .collect()
    }

    /// Release an application lock on `volume@snap` (holder = its owner),
    /// or, holder = a downstream node (or a node behind it), every lock that
    /// downstream's set holds here (an operator release; it is restored by
    /// the downstream's next set if it is still alive).
    pub fn lock_release(&self, volume: &str, snap: &str, holder: &str) -> Result<()> {
        let s = self.find_snap(volume, snap)?;
        let locks = lock(&self.st).locks().holders(volume, s.id);
        let me = &self.cfg.node_name;
        // Only this node's own application locks (a copy of one that came
        // back through a downstream is that downstream's).
        let app = locks
            .iter()
            .filter(|h| h.via.is_none())
            .map(|h| &h.lock)
            .find(|l| {
                l.kind == LockKind::OwnerName
                    && &l.origin_node == me
                    && (l.text == holder || l.text.starts_with(&format!("{holder}: ")))
            });
        // A downstream's locks: released as a whole (the set of the
        // downstream relationship through which the holder's locks reach us).
        let down = locks
            .iter()
            .filter_map(|h| Some((h, h.via.as_ref()?)))
            .find(|(h, (downstream, _))| {
                downstream == holder
                    || (&h.lock.origin_node != me && h.lock.origin_node == holder)
                    || h.lock.hop_path.iter().any(|x| x == holder)
            })
            .map(|(_, via)| via.clone());
        let ev = match (app, down) {
            (Some(l), _) => Event::AppLockReleased {
                volume: volume.to_string(),
                snapshot: s.id,
                owner: l.text.clone(),
            },
            (None, Some((downstream, relationship))) => Event::OperatorRelease {
                downstream,
                relationship: Some(relationship),
            },
            (None, None) => {
                return Err(ReplError::NotFound(format!(
                    "lock on {volume}@{snap} held by {holder:?}; see `lock list`"
                )))
            }
        };
        let acts = self.lock_events(vec![ev])?;
        // Durable before it is confirmed: a release lost in a crash would
        // bring back a lock its application no longer knows of (it has no
        // lease: it would hold the snapshot for ever).
        self.flush()?;
        self.perform(acts, None);
        Ok(())
    }

    /// Each snapshot of `volume` with the locks that hold it.
    pub fn snapshot_locks(&self, volume: &str) -> Result<Vec<(SnapshotInfo, Vec<LockView>)>> {
        let snaps = snapshots(&self.engine, volume)?;
        // Every holder of a snapshot of `volume` holds it in `volume`: its
        // own listing names them all (O(its snapshots + their locks)).
        let names: SnapNames = snaps
            .iter()
            .map(|s| ((volume.to_string(), s.id), s.name.clone()))
            .collect();
        let st = lock(&self.st);
        Ok(snaps
            .into_iter()
            .map(|s| {
                let v = st
                    .locks()
                    .holders(volume, s.id)
                    .iter()
                    .map(|l| self.view_with(l, &names, &st))
                    .collect();
                (s, v)
            })
            .collect())
    }

    /// Snapshot names by (volume, global id) of `vols` (one id may exist
    /// in two local volumes); a volume that is not there names nothing.
    pub(super) fn snapshot_names_in<'a>(
        &self,
        vols: impl IntoIterator<Item = &'a str>,
    ) -> Result<SnapNames> {
        let mut m = BTreeMap::new();
        for v in vols {
            if v.is_empty() {
                continue;
            }
            let snaps = match snapshot_names_of(&self.engine, v) {
                Ok(s) => s,
                Err(ReplError::Engine {
                    source: sluice_engine::Error::NoSuchVolume(_),
                    ..
                }) => continue,
                Err(e) => return Err(e),
            };
            m.extend(names_of(v, &snaps));
        }
        Ok(m)
    }

    /// The names of the snapshots `wanted` names, per volume: O(them),
    /// whatever else the volumes hold (the engine's id index).
    fn names_of_ids(&self, wanted: BTreeMap<&str, BTreeSet<Uuid>>) -> Result<SnapNames> {
        let mut m = BTreeMap::new();
        for (v, ids) in wanted {
            if v.is_empty() {
                continue;
            }
            let snaps = match self.engine.call(Request::SnapshotNamesOf {
                volume: v.to_string(),
                ids: ids.into_iter().collect(),
            }) {
                Ok(Reply::SnapshotNames(s)) => s,
                Ok(_) => {
                    return Err(ReplError::EngineReply {
                        request: "SnapshotNamesOf",
                    })
                }
                Err(sluice_engine::Error::NoSuchVolume(_)) => continue,
                Err(e) => return Err(ReplError::engine(format!("name the snapshots of {v}"), e)),
            };
            m.extend(names_of(v, &snaps));
        }
        Ok(m)
    }

    pub(super) fn view(&self, h: &Held, names: &SnapNames) -> LockView {
        let st = lock(&self.st);
        self.view_with(h, names, &st)
    }

    pub(super) fn view_with(&self, h: &Held, names: &SnapNames, st: &State) -> LockView {
        let l = &h.lock;
        let me = &self.cfg.node_name;
        let via = l.hop_path.last().cloned().unwrap_or_default();
        // A lock made here can come back in a downstream's set too (this
        // node's volume feeds a downstream that feeds another of its
        // volumes): that copy is the downstream's to hold and release.
        let from_down = &l.origin_node != me || h.via.is_some();
        // By the lock's own lease (its origin's renewal time, as relayed)
        // and by the set it came in: stale is visible at every hop.
        let stale = st.locks().is_stale(h, self.now_ms());
        let holder = if !from_down && l.kind == LockKind::OwnerName {
            l.text.split(": ").next().unwrap_or(&l.text).to_string()
        } else if let Some((down, _)) = &h.via {
            down.clone()
        } else if from_down {
            if via == *me {
                l.origin_node.clone()
            } else {
                via
            }
        } else {
            me.clone()
        };
        let dv = l.dependency_view();
        let name = names.get(&(h.volume.clone(), l.snapshot)).cloned();
        LockView {
            volume: (!h.volume.is_empty()).then(|| h.volume.clone()),
            snapshot: name,
            snapshot_id: l.snapshot,
            kind: l.kind.to_string(),
            text: l.text.clone(),
            origin_node: l.origin_node.clone(),
            hop_path: l.hop_path.clone(),
            state: if stale { "stale" } else { "active" }.into(),
            created_unix_ms: l.created_ms,
            renewed_unix_ms: l.renewed_ms,
            lease_ms: l.lease_ms,
            holder,
            resource_id: dv.resource_id,
            locking_dataset_id: dv.locking_dataset_id,
        }
    }
}

/// The names of `snaps`, snapshots of `volume`, by (volume, global id).
fn names_of(volume: &str, snaps: &[SnapshotName]) -> SnapNames {
    snaps
        .iter()
        .map(|s| ((volume.to_string(), s.id), s.name.clone()))
        .collect()
}

/// Which snapshots of one volume each downstream holds here, for what a
/// delete would cost: per downstream relationship (every lock that came
/// through it, its own and those it relays, names a snapshot it has), and
/// per downstream dataset further down (its locks, relayed).
#[derive(Default)]
struct Shares<'a> {
    by_rel: BTreeMap<DownKey, BTreeSet<&'a str>>,
    by_dataset: BTreeMap<String, BTreeSet<&'a str>>,
}

impl<'a> Shares<'a> {
    fn add(&mut self, snap: &'a str, holders: &[(Held, LockView)]) {
        for (h, v) in holders {
            if let Some(via) = &h.via {
                self.by_rel.entry(via.clone()).or_default().insert(snap);
            }
            if v.kind != LockKind::OwnerName.to_string() {
                self.by_dataset
                    .entry(v.locking_dataset_id.clone())
                    .or_default()
                    .insert(snap);
            }
        }
    }

    /// What deleting `snap` would cost each of its holders, one line per
    /// holder: an application lock is named; a downstream relationship
    /// that holds no other snapshot of the volume here would need a full
    /// copy; a dataset further down that locks no other one would need one
    /// should it re-attach here past the node it comes through.
    fn delete_effects(&self, snap: &str, holders: &[(Held, LockView)]) -> Vec<String> {
        fn others<'s>(set: Option<&BTreeSet<&'s str>>, snap: &str) -> Vec<&'s str> {
            set.into_iter()
                .flatten()
                .copied()
                .filter(|s| *s != snap)
                .collect()
        }
        let key_of = |v: &LockView| {
            if v.kind == LockKind::OwnerName.to_string() {
                format!("app {}", v.text)
            } else {
                v.locking_dataset_id.clone()
            }
        };
        // One line per holder; it is stale only when every lock of it here
        // is (its locks' leases end at slightly different times, and one
        // live lock says the holder lives).
        let mut live: BTreeSet<String> = BTreeSet::new();
        for (_, v) in holders {
            if v.state != "stale" {
                live.insert(key_of(v));
            }
        }
        let mut out: Vec<String> = Vec::new();
        let mut seen = BTreeSet::new();
        for (h, v) in holders {
            let app = v.kind == LockKind::OwnerName.to_string();
            let key = key_of(v);
            let all_stale = !live.contains(&key);
            if !seen.insert(key) {
                continue;
            }
            let stale = if all_stale {
                " [stale: not renewed within its lease]"
            } else {
                ""
            };
            let ds = v.locking_dataset_id.as_str();
            let direct = h
                .via
                .as_ref()
                .is_some_and(|(node, _)| *node == v.origin_node);
            let rest = if direct {
                others(h.via.as_ref().and_then(|k| self.by_rel.get(k)), snap)
            } else {
                others(self.by_dataset.get(ds), snap)
            };
            let line = if app {
                format!("{snap} is held by the application lock {:?}{stale}", v.text)
            } else if !rest.is_empty() {
                format!(
                    "{ds} also holds {}: deleting {snap} would cost it no full copy{stale}",
                    rest.join(", ")
                )
            } else if direct {
                format!("deleting {snap} would force a full copy of {ds}{stale}")
            } else {
                format!(
                    "deleting {snap} would force a full copy of {ds} should it re-attach here past {}{stale}",
                    v.holder
                )
            };
            out.push(line);
        }
        out
    }
}
