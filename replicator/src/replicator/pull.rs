//! The destination side: relationships and pull transfers.
//!
//! Owns: `mirror create/update/resync/break/delete/status`, base and target
//! selection, resume from the receiver checkpoint, commit (flush, snapshot
//! under the source's global id, digest verification), the volume-mirror
//! follow-up deletes, and write-behind into the engine. Invariants: a
//! snapshot is created only after every item arrived and passed its checks,
//! and removed at once if its digest differs; a checkpoint names only data
//! that is durable; a destination (the volume of a volume mirror, the qtree
//! of a qtree mirror) is read-only to clients from its creation until
//! `mirror break` or `mirror delete`, and again from `mirror resync` on
//! (the replicator itself writes it with `replica: true`).

use super::plan::{self, Refusal, Undo};
use super::*;

impl Replicator {
    pub(super) fn rel(&self, dst: &str) -> Result<Relationship> {
        let st = lock(&self.st);
        st.rels()
            .get(dst)
            .or_else(|| {
                // A destination volume names its relationship when only one
                // relationship writes into it (e.g. one qtree mirror).
                let mut it = st.rels().values().filter(|r| r.dst_volume == dst);
                match (it.next(), it.next()) {
                    (Some(r), None) => Some(r),
                    _ => None,
                }
            })
            .cloned()
            .ok_or_else(|| {
                ReplError::NotFound(format!("mirror relationship {dst:?}; see `mirror status`"))
            })
    }

    pub(super) fn update_rel(&self, key: &str, f: impl FnOnce(&mut Relationship)) -> Result<()> {
        let ((), acts) = self.change(|t| {
            if let Some(r) = t.rel_mut(key) {
                f(r);
            }
            Ok(())
        })?;
        self.perform(acts, None);
        Ok(())
    }

    pub(super) fn bucket(&self, key: &str, rate: Option<u64>) -> Arc<Bucket> {
        let mut m = lock(&self.rel_buckets);
        let b = m
            .entry(key.to_string())
            .or_insert_with(|| Arc::new(Bucket::new(rate)))
            .clone();
        b.set_rate(rate);
        b
    }

    /// Make the destination (volume read-only, or qtree) and do the baseline.
    pub fn mirror_create(&self, spec: MirrorSpec) -> Result<TransferReport> {
        self.mirror_create_with_progress(spec, &|_| {})
    }

    /// [`Self::mirror_create`], telling `progress` how the baseline goes
    /// (as [`Self::mirror_update`] does).
    pub fn mirror_create_with_progress(
        &self,
        spec: MirrorSpec,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<TransferReport> {
        let kind = if spec.source_qtree.is_some() {
            MirrorKind::Qtree
        } else {
            MirrorKind::Volume
        };
        let dst_qtree = match kind {
            MirrorKind::Qtree => spec.dst_qtree.clone().or_else(|| spec.source_qtree.clone()),
            MirrorKind::Volume => {
                if spec.dst_qtree.is_some() {
                    return Err(ReplError::Invalid(
                        "a destination qtree needs a source qtree (qtree mirror)".into(),
                    ));
                }
                None
            }
        };
        for (what, name) in [
            ("volume", Some(&spec.dst_volume)),
            ("qtree", dst_qtree.as_ref()),
        ] {
            if let Some(n) = name.filter(|n| n.is_empty() || n.contains(['/', '@'])) {
                return Err(ReplError::Invalid(format!(
                    "destination {what} name {n:?} must be non-empty without '/' or '@' (a qtree mirror's destination is a volume; the qtree in it takes the source qtree's name)"
                )));
            }
        }
        if spec.follow {
            self.check_follow_sources(&spec.source_addr)?;
        }
        let key = match &dst_qtree {
            Some(q) => format!("{}/{q}", spec.dst_volume),
            None => spec.dst_volume.clone(),
        };
        let exists = volumes(&self.engine)?
            .into_iter()
            .find(|v| v.name == spec.dst_volume);
        match (&kind, &exists) {
            // An empty read-only volume is the leftover of a baseline that
            // failed before its first checkpoint: it is reused.
            (MirrorKind::Volume, Some(v)) if !(v.read_only && v.snapshot_count == 0) => {
                return Err(ReplError::Invalid(format!(
                    "volume {} exists already; a volume mirror creates its destination",
                    spec.dst_volume
                )))
            }
            (MirrorKind::Qtree, Some(v))
                if v.qtrees.iter().any(|q| Some(&q.name) == dst_qtree.as_ref()) =>
            {
                return Err(ReplError::Invalid(format!(
                    "qtree {key} exists already; a qtree mirror creates its destination"
                )))
            }
            _ => {}
        }
        let ((), acts) = self.change(|t| {
            if t.rels().contains_key(&key) {
                return Err(ReplError::RelationshipExists(key.clone()));
            }
            t.rel_insert(
                key.clone(),
                Relationship {
                    dst: key.clone(),
                    dst_volume: spec.dst_volume.clone(),
                    dst_qtree,
                    source_addr: spec.source_addr.clone(),
                    source_volume: spec.source_volume.clone(),
                    source_qtree: spec.source_qtree.clone(),
                    source_node: None,
                    kind,
                    broken: false,
                    every_ms: spec.every.map(|d| d.as_millis() as u64),
                    follow: spec.follow,
                    throttle_bps: spec.throttle_bps,
                    source_snaps: Vec::new(),
                    full_transfers: 0,
                    incremental_transfers: 0,
                    resumed_transfers: 0,
                    last_transfer: None,
                    last_update_unix_ms: None,
                    last_error: None,
                    common: None,
                    broken_unix_ms: None,
                    source_notice: None,
                },
            );
            Ok(())
        })?;
        self.perform(acts, None);
        let res = self.transfer(&key, Mode::Create, progress);
        // The policy holds for the relationship's life, also when its
        // baseline has to be resumed.
        if spec.keep.is_some() && lock(&self.st).rels().contains_key(&key) {
            self.store_retention(&spec.dst_volume, spec.keep)?;
        }
        match res {
            Ok(r) => Ok(r),
            Err(e) => {
                // A baseline that never started leaves no relationship; one
                // cut midway keeps it (and its checkpoint) so update resumes.
                let started = self.load_ckpt(&key)?.is_some();
                if !started {
                    self.forget_failed_create(&key, &spec.dst_volume);
                }
                Err(e)
            }
        }
    }

    /// Undo what a `mirror create` whose baseline never started left: the
    /// relationship, its upstream in the lock table (the upstream gets a
    /// final empty set, so it drops whatever the sets before the transfer
    /// told it), the resume lock, and a destination volume it created that
    /// holds nothing. The lock state is as it was before the command.
    fn forget_failed_create(&self, key: &str, dst_volume: &str) {
        let r = (|| -> Result<()> {
            let owner = self.resume_owner(key);
            let mut evs: Vec<Event> = lock(&self.st)
                .locks()
                .all_locks()
                .into_iter()
                .filter(|h| h.lock.kind == LockKind::OwnerName && h.lock.text == owner)
                .map(|h| Event::AppLockReleased {
                    volume: h.volume,
                    snapshot: h.lock.snapshot,
                    owner: owner.clone(),
                })
                .collect();
            evs.push(Event::UpstreamRemoved {
                relationship: key.to_string(),
            });
            let acts = self.lock_events(evs)?;
            lock(&self.st).pending_sets.retain(|(rel, _), _| rel != key);
            // Delivered while the relationship (and so the upstream's
            // address) is still known.
            if let Some(Err(e)) = self.perform_final(key, acts) {
                tracing::warn!(dst = %key, error = %e, "final lock set after a failed create not delivered; the upstream drops it when its lease ends");
            }
            let ((), acts) = self.change(|t| {
                t.rel_remove(key);
                Ok(())
            })?;
            self.perform(acts, None);
            self.store_ckpt(key, None)?;
            // Durable now: a crash must not bring back a relationship (and
            // its resume lock, re-sent upstream at start) the operator was
            // told had failed.
            self.flush()
        })();
        if let Err(e) = r {
            tracing::warn!(dst = %key, error = %e, "cleaning up after a failed mirror create failed");
        }
        let _ = dst_volume;
    }

    /// Perform `acts`, delivering the final set of `relationship` (if any)
    /// synchronously; returns whether the upstream acknowledged it (`None`
    /// when there was none to send).
    fn perform_final(&self, relationship: &str, acts: Vec<Action>) -> Option<Result<()>> {
        let mut final_set = None;
        let mut rest = Vec::new();
        for a in acts {
            match a {
                Action::SendLockSet {
                    relationship: r,
                    upstream,
                    set,
                } if r == relationship && set.locks.is_empty() => final_set = Some((upstream, set)),
                other => rest.push(other),
            }
        }
        self.perform(rest, None);
        let (up, set) = final_set?;
        let own = lock(&self.st)
            .rels()
            .get(relationship)
            .map(|r| r.source_addr.clone());
        let addr = own.or_else(|| self.upstream_addr(relationship, &up));
        let r = match addr {
            Some(addr) => self.deliver_to(&addr, &up, &set).map(|_| ()),
            None => Err(ReplError::NotFound(format!(
                "address of upstream node {up}"
            ))),
        };
        Some(r)
    }

    /// One transfer now (incremental from the newest common snapshot).
    pub fn mirror_update(
        &self,
        dst_volume: &str,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<TransferReport> {
        let key = self.rel(dst_volume)?.dst;
        self.transfer(&key, Mode::Update, progress)
    }

    /// Re-establish a broken or chainless mirror: from the newest common
    /// snapshot (reverting local changes), or a full re-baseline.
    /// Refused while it would discard snapshots taken here while broken
    /// (the source never had them), unless `force`.
    pub fn mirror_resync(
        &self,
        dst: &str,
        force: bool,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<TransferReport> {
        let key = self.rel(dst)?.dst;
        self.transfer(&key, Mode::Resync { force }, progress)
    }

    /// Make the destination writable and stop updates until a resync.
    pub fn mirror_break(&self, dst: &str) -> Result<()> {
        let r = self.rel(dst)?;
        let _busy = self.busy_guard(&r.dst)?;
        self.set_dst_read_only(&r, false)?;
        self.update_rel(&r.dst, |x| {
            x.broken = true;
            x.broken_unix_ms = Some(self.now_ms());
        })?;
        // Durable when confirmed: after a crash that lost the break, the
        // scheduler would update a destination the operator is writing to.
        self.flush()?;
        tracing::info!(dst = %r.dst, "mirror broken: destination writable");
        Ok(())
    }

    /// End the relationship and release its locks upstream. The destination
    /// volume stays, writable. Returns whether the upstream released them
    /// (`false`: it could not be reached, and its locks there will go stale
    /// under their lease).
    pub fn mirror_delete(&self, dst: &str) -> Result<bool> {
        let r = self.rel(dst)?;
        let _busy = self.busy_guard(&r.dst)?;
        let acts = self.lock_events(vec![Event::UpstreamRemoved {
            relationship: r.dst.clone(),
        }])?;
        // Deliver synchronously (the relationship is still in the table, so
        // its address is known): the upstream releases before we return.
        let released = match self.perform_final(&r.dst, acts) {
            None | Some(Ok(())) => true,
            Some(Err(e)) => {
                tracing::warn!(dst = %r.dst, source = %r.source_path(), error = %e, "final lock set not delivered; the upstream keeps our locks until their lease ends");
                false
            }
        };
        let ((), acts) = self.change(|t| {
            t.rel_remove(&r.dst);
            t.mem().pending_sets.retain(|(rel, _), _| rel != &r.dst);
            Ok(())
        })?;
        self.perform(acts, None);
        self.store_ckpt(&r.dst, None)?;
        if let Err(e) = self.set_dst_read_only(&r, false) {
            tracing::warn!(dst = %r.dst, error = %e, "could not make the former destination writable");
        }
        self.flush()?;
        if released {
            tracing::info!(dst = %r.dst, "mirror relationship deleted; its locks were released upstream");
        } else {
            tracing::warn!(dst = %r.dst, "mirror relationship deleted; the upstream was not reached, so its locks there stay until their lease runs out");
        }
        Ok(released)
    }

    /// Every relationship's status.
    pub fn mirror_status(&self) -> Vec<MirrorStatus> {
        let (rels, busy) = {
            let st = lock(&self.st);
            let rels: Vec<Relationship> = st.rels().values().cloned().collect();
            (rels, st.busy.clone())
        };
        let now = self.now_ms();
        rels.into_iter()
            .map(|r| MirrorStatus {
                source: r.source_path(),
                source_node: r.source_node.clone(),
                kind: r.kind,
                state: if r.broken {
                    "broken".into()
                } else if busy.contains(&r.dst) {
                    "transferring".into()
                } else {
                    "idle".into()
                },
                lag_ms: r
                    .common
                    .as_ref()
                    .map(|c| now.saturating_sub(c.created_unix_ms)),
                newest_common_snapshot: r.common.clone(),
                next_update: self.next_update(&r),
                notice: r.source_notice.clone(),
                full_transfers: r.full_transfers,
                incremental_transfers: r.incremental_transfers,
                resumed_transfers: r.resumed_transfers,
                last_transfer: r.last_transfer.clone(),
                last_update_unix_ms: r.last_update_unix_ms,
                last_error: r.last_error.clone(),
                checkpoint: self.load_ckpt(&r.dst).ok().flatten(),
                every_secs: r.every_ms.map(|m| m / 1000),
                follow: r.follow,
                throttle_bps: r.throttle_bps,
                dst: r.dst,
            })
            .collect()
    }

    /// What the next update of `r` will do, for `mirror status`.
    fn next_update(&self, r: &Relationship) -> String {
        if r.broken {
            return format!(
                "none: broken; `mirror resync {}` makes it a mirror again",
                r.dst
            );
        }
        if let Some(c) = &r.common {
            return format!("incremental from {}", c.name);
        }
        if r.last_transfer.is_none() {
            return "the baseline (a full copy)".into();
        }
        let estimate = snapshots(&self.engine, &r.dst_volume)
            .ok()
            .and_then(|s| s.into_iter().max_by_key(|s| (s.created_unix_ms, s.gen)))
            .map(|s| {
                format!(
                    " of about {} bytes (the newest snapshot here)",
                    s.referenced_blocks * BLOCK_SIZE as u64
                )
            })
            .unwrap_or_default();
        format!(
            "a full copy{estimate}: no snapshot in common with the source; `mirror resync {}` runs it",
            r.dst
        )
    }

    pub(super) fn busy_guard(&self, key: &str) -> Result<BusyGuard<'_>> {
        if !lock(&self.st).busy.insert(key.to_string()) {
            return Err(ReplError::Busy(key.to_string()));
        }
        Ok(BusyGuard {
            r: self,
            key: key.to_string(),
        })
    }

    pub(super) fn transfer(
        &self,
        key: &str,
        mode: Mode,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<TransferReport> {
        let rel = self.rel(key)?;
        if rel.broken && mode == Mode::Update {
            return Err(ReplError::Broken(key.to_string()));
        }
        let _busy = self.busy_guard(key)?;
        let started = Instant::now();
        let r = self.transfer_inner(&rel, mode, progress, started);
        match &r {
            Ok(rep) => {
                tracing::info!(dst = %key, kind = %rep.kind, bytes = rep.bytes, "mirror transfer done");
            }
            Err(e) => {
                self.n.transfer_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(dst = %key, error = %e, "mirror transfer failed");
                let msg = e.to_string();
                let _ = self.update_rel(key, |x| x.last_error = Some(msg));
            }
        }
        r
    }

    pub(super) fn recv_reply(&self, c: &mut Conn, relationship: &str) -> Result<Message> {
        loop {
            match c.recv()? {
                Some(Message::SnapshotGone { snapshot, .. }) => {
                    self.apply_gone(relationship, vec![Uuid::from_bytes(snapshot)], Some(c))
                }
                Some(Message::Ping { nonce }) => c.send(&Message::Pong { nonce }, &[])?,
                Some(Message::Error { code, text, .. }) => {
                    return Err(ReplError::Remote {
                        peer: c.who(),
                        code,
                        text,
                    })
                }
                Some(m) => return Ok(m),
                None => {
                    return Err(closed(
                        c,
                        "receive",
                        "the source closed the connection; the next update resumes from the last checkpoint",
                    ))
                }
            }
        }
    }

    /// The source's snapshot list of `volume` (or `qtree` of it), oldest
    /// first: page by page from a source of protocol minor 1 on (a list of
    /// any length; pages of a list that changed in between are thrown
    /// away and the listing starts again), in one frame of at most 4096
    /// entries from an older one.
    pub(super) fn request_list(
        &self,
        c: &mut Conn,
        relationship: &str,
        volume: &str,
        qtree: Option<&str>,
    ) -> Result<Vec<SnapInfo>> {
        if c.peer_minor == 0 {
            return self.request_list_whole(c, relationship, volume, qtree);
        }
        /// Listings started again before giving up on a list that keeps
        /// changing.
        const TRIES: usize = 4;
        /// More entries than any volume holds: a peer that says more is
        /// refused before we gather them.
        const LIST_MAX: u32 = 1 << 20;
        for _ in 0..TRIES {
            let mut out: Vec<SnapInfo> = Vec::new();
            let mut hash = None;
            let changed = loop {
                let req_id = self.cfg.env.random_u64();
                let start = u32::try_from(out.len()).unwrap_or(u32::MAX);
                c.send(
                    &Message::SnapshotPageRequest {
                        req_id,
                        volume: volume.to_string(),
                        qtree: qtree.map(str::to_string),
                        start,
                    },
                    &[],
                )?;
                let (total, list_hash, page) = match self.recv_reply(c, relationship)? {
                    Message::SnapshotPage {
                        req_id: r,
                        start: s,
                        total,
                        list_hash,
                        snapshots,
                    } if r == req_id && s == start => (total, list_hash, snapshots),
                    other => {
                        return Err(ReplError::Protocol {
                            peer: c.who(),
                            detail: format!(
                                "expected SnapshotPage from {start}, got message type {}",
                                other.type_code()
                            ),
                        })
                    }
                };
                if total > LIST_MAX
                    || page.len() > SNAPSHOT_PAGE_MAX as usize
                    || u64::from(start) + page.len() as u64 > u64::from(total)
                {
                    return Err(ReplError::Protocol {
                        peer: c.who(),
                        detail: format!(
                            "snapshot page of {} entries from {start} of a list of {total}",
                            page.len()
                        ),
                    });
                }
                if *hash.get_or_insert(list_hash) != list_hash {
                    break true;
                }
                out.extend(page);
                if out.len() as u64 >= u64::from(total) {
                    break false;
                }
                if out.len() as u64 == u64::from(start) {
                    return Err(ReplError::Protocol {
                        peer: c.who(),
                        detail: format!("empty snapshot page from {start} of a list of {total}"),
                    });
                }
            };
            if !changed && hash == Some(sluice_lockproto::wire::snapshot_list_hash(&out)) {
                return Ok(out);
            }
        }
        Err(ReplError::Protocol {
            peer: c.who(),
            detail: format!(
                "the snapshot list of {volume} changed under {TRIES} listings in a row"
            ),
        })
    }

    /// [`Replicator::request_list`] of a source of protocol minor 0.
    fn request_list_whole(
        &self,
        c: &mut Conn,
        relationship: &str,
        volume: &str,
        qtree: Option<&str>,
    ) -> Result<Vec<SnapInfo>> {
        let req_id = self.cfg.env.random_u64();
        c.send(
            &Message::SnapshotListRequest {
                req_id,
                volume: volume.to_string(),
                qtree: qtree.map(str::to_string),
            },
            &[],
        )?;
        match self.recv_reply(c, relationship)? {
            Message::SnapshotList {
                req_id: r,
                snapshots,
            } if r == req_id => {
                if snapshots.len() > 4096 {
                    return Err(ReplError::Protocol {
                        peer: c.who(),
                        detail: format!("snapshot list of {} entries", snapshots.len()),
                    });
                }
                Ok(snapshots)
            }
            other => Err(ReplError::Protocol {
                peer: c.who(),
                detail: format!(
                    "expected SnapshotList, got message type {}",
                    other.type_code()
                ),
            }),
        }
    }

    /// Ask the source what a baseline would send (for the no-common-base error).
    pub(super) fn probe_full_bytes(&self, rel: &Relationship, target: &SnapInfo) -> u64 {
        let r = (|| -> Result<u64> {
            let mut c = self.connect(&rel.source_addr)?;
            c.send(
                &Message::TransferRequest(TransferRequest {
                    req_id: 1,
                    relationship: rel.dst.clone(),
                    volume: rel.source_volume.clone(),
                    qtree: rel.source_qtree.clone(),
                    base: None,
                    target: target.id,
                    resume_from: 0,
                }),
                &[],
            )?;
            match self.recv_reply(&mut c, &rel.dst)? {
                Message::TransferStart(s) => {
                    c.close();
                    Ok(s.byte_count)
                }
                _ => Ok(0),
            }
        })();
        r.unwrap_or(0)
    }

    /// Register the relationship's upstream node (checked against the one
    /// it had); returns the lock-table actions, for the caller to perform
    /// on its connection to that upstream.
    pub(super) fn ensure_upstream(&self, rel: &Relationship, peer: &str) -> Result<Vec<Action>> {
        if let Some(n) = &rel.source_node {
            if n != peer {
                return Err(ReplError::Invalid(format!(
                    "{} is now node {peer:?}, but mirror {} pulls from node {n:?}; fix the address or recreate the mirror",
                    rel.source_addr, rel.dst
                )));
            }
        }
        let ((), acts) = self.change(|t| {
            if let Some(r) = t.rel_mut(&rel.dst) {
                r.source_node = Some(peer.to_string());
            }
            t.lock(upstream_event(rel, peer));
            Ok(())
        })?;
        Ok(acts)
    }

    /// Create the destination namespaces (volume + qtrees, or the qtree).
    pub(super) fn ensure_dst(
        &self,
        rel: &Relationship,
        ns_sizes: &[(Option<String>, u64)],
    ) -> Result<()> {
        let vols = volumes(&self.engine)?;
        let existing = vols.iter().find(|v| v.name == rel.dst_volume);
        let ctx = |what: String| move |e| ReplError::engine(what, e);
        match rel.kind {
            MirrorKind::Volume => {
                let own = ns_sizes
                    .iter()
                    .find(|(n, _)| n.is_none())
                    .map(|x| x.1)
                    .ok_or_else(|| ReplError::Invalid("source volume size unknown".into()))?;
                if existing.is_none() {
                    self.engine
                        .call(Request::CreateVolume {
                            name: rel.dst_volume.clone(),
                            size_bytes: own,
                        })
                        .map_err(ctx(format!("create volume {}", rel.dst_volume)))?;
                    self.engine
                        .call(Request::SetReadOnly {
                            ns: NsName::volume(&rel.dst_volume),
                            read_only: true,
                        })
                        .map_err(ctx(format!("make {} read-only", rel.dst_volume)))?;
                }
                // The destination follows the source's size (`vol resize`
                // there): grown before the blocks past its old end arrive.
                // A shrink the destination refuses (one of its own
                // snapshots, e.g. kept longer by retention, maps a block
                // past the new end) leaves it larger, which a transfer
                // needs no less: logged, and tried again next time.
                if let Some(v) = existing.filter(|v| v.size_bytes != own) {
                    match self.engine.call(Request::ResizeVolume {
                        name: rel.dst_volume.clone(),
                        size_bytes: own,
                        replica: true,
                    }) {
                        Ok(_) => {
                            tracing::info!(dst = %rel.dst, from = v.size_bytes, to = own, "destination resized to follow its source")
                        }
                        Err(e) if own < v.size_bytes => {
                            tracing::warn!(dst = %rel.dst, from = v.size_bytes, to = own, error = %e, "destination kept larger than its source")
                        }
                        Err(e) => {
                            return Err(ReplError::engine(
                                format!("grow {} to its source's size", rel.dst_volume),
                                e,
                            ))
                        }
                    }
                }
                let have: BTreeSet<String> = existing
                    .map(|v| v.qtrees.iter().map(|q| q.name.clone()).collect())
                    .unwrap_or_default();
                for (n, size) in ns_sizes {
                    if let Some(q) = n {
                        if !have.contains(q) {
                            self.engine
                                .call(Request::CreateQtree {
                                    volume: rel.dst_volume.clone(),
                                    name: q.clone(),
                                    size_bytes: *size,
                                })
                                .map_err(ctx(format!("create qtree {}/{q}", rel.dst_volume)))?;
                        }
                    }
                }
            }
            MirrorKind::Qtree => {
                let q = rel.dst_qtree.clone().ok_or_else(|| {
                    ReplError::Invalid("qtree mirror without a destination qtree".into())
                })?;
                let size = ns_sizes.first().map(|x| x.1).unwrap_or(0);
                if existing.is_none() {
                    // A fresh volume for the qtree; its own space stays tiny.
                    self.engine
                        .call(Request::CreateVolume {
                            name: rel.dst_volume.clone(),
                            size_bytes: BLOCK_SIZE as u64,
                        })
                        .map_err(ctx(format!("create volume {}", rel.dst_volume)))?;
                }
                let have = existing.and_then(|v| v.qtrees.iter().find(|x| x.name == q));
                if have.is_none() {
                    self.engine
                        .call(Request::CreateQtree {
                            volume: rel.dst_volume.clone(),
                            name: q.clone(),
                            size_bytes: size,
                        })
                        .map_err(ctx(format!("create qtree {}/{q}", rel.dst_volume)))?;
                }
                // A transfer runs only into an unbroken mirror, whose
                // qtree is read-only; one made before qtrees had the flag
                // gets it here.
                if !have.is_some_and(|x| x.read_only) {
                    self.engine
                        .call(Request::SetReadOnly {
                            ns: NsName::qtree(&rel.dst_volume, &q),
                            read_only: true,
                        })
                        .map_err(ctx(format!("make {}/{q} read-only", rel.dst_volume)))?;
                }
            }
        }
        Ok(())
    }

    /// Make a relationship's destination read-only to clients (a mirror)
    /// or writable (broken, deleted): the volume of a volume mirror, the
    /// qtree of a qtree mirror. Nothing to do while the destination does
    /// not exist yet: [`Self::ensure_dst`] creates it read-only.
    pub(super) fn set_dst_read_only(&self, rel: &Relationship, read_only: bool) -> Result<()> {
        let Some(v) = volumes(&self.engine)?
            .into_iter()
            .find(|v| v.name == rel.dst_volume)
        else {
            return Ok(());
        };
        let ns = match (rel.kind, &rel.dst_qtree) {
            (MirrorKind::Volume, _) => NsName::volume(&rel.dst_volume),
            (MirrorKind::Qtree, Some(q)) if v.qtrees.iter().any(|x| &x.name == q) => {
                NsName::qtree(&rel.dst_volume, q)
            }
            (MirrorKind::Qtree, _) => return Ok(()),
        };
        let what = if read_only { "read-only" } else { "writable" };
        self.engine
            .call(Request::SetReadOnly {
                ns: ns.clone(),
                read_only,
            })
            .map_err(|e| ReplError::engine(format!("make {ns} {what}"), e))?;
        Ok(())
    }

    pub(super) fn dst_ns(
        &self,
        rel: &Relationship,
        ns_sizes: &[(Option<String>, u64)],
    ) -> Vec<NsName> {
        match rel.kind {
            MirrorKind::Volume => ns_sizes
                .iter()
                .map(|(n, _)| match n {
                    None => NsName::volume(&rel.dst_volume),
                    Some(q) => NsName::qtree(&rel.dst_volume, q),
                })
                .collect(),
            MirrorKind::Qtree => vec![NsName {
                volume: rel.dst_volume.clone(),
                qtree: rel.dst_qtree.clone(),
            }],
        }
    }

    /// Revert the destination's live image to snapshot `base` (resync after
    /// a break): apply the diff from a temporary snapshot of now back to base.
    pub(super) fn revert_to(
        &self,
        rel: &Relationship,
        nss: &[NsName],
        base: &SnapshotInfo,
    ) -> Result<()> {
        let tmp = format!("resync-{:012x}", self.cfg.env.random_u64() >> 16);
        let e = |c: String| move |x| ReplError::engine(c, x);
        self.engine
            .call(Request::CreateSnapshot {
                volume: rel.dst_volume.clone(),
                name: tmp.clone(),
                id: Some(self.cfg.env.new_snapshot_id()),
                created_unix_ms: Some(self.now_ms()),
            })
            .map_err(e(format!("snapshot {}@{tmp}", rel.dst_volume)))?;
        let r = (|| -> Result<()> {
            for ns in nss {
                // Only forward diffs (older base, newer target) are used:
                // what changed since the base, and what the base maps. A
                // changed block the base mapped is restored from it; one it
                // did not map is trimmed.
                let diff = |from: Option<&str>, to: &str| -> Result<Vec<DiffExtent>> {
                    match self.engine.call(Request::Diff {
                        ns: ns.clone(),
                        base: from.map(str::to_string),
                        target: to.to_string(),
                    }) {
                        Ok(Reply::Diff(d)) => Ok(d),
                        Ok(_) => Err(ReplError::EngineReply { request: "Diff" }),
                        Err(x) => Err(ReplError::engine(format!("diff {ns} ..{to}"), x)),
                    }
                };
                let changed = diff(Some(&base.name), &tmp)?;
                let mapped: Vec<(u64, u64)> = diff(None, &base.name)?
                    .into_iter()
                    .filter(|e| e.kind == DiffKind::Data)
                    .map(|e| (e.lba, e.lba + e.len_blocks))
                    .collect();
                let d = revert_extents(&changed, &mapped);
                for it in plan(&[d]) {
                    match it.kind {
                        ItemKind::Data => {
                            let data = match self.engine.call(Request::Read {
                                image: Image {
                                    ns: ns.clone(),
                                    snapshot: Some(base.name.clone()),
                                },
                                lba: it.lba,
                                len_blocks: it.len_blocks,
                            }) {
                                Ok(Reply::Data(d)) => d,
                                Ok(_) => return Err(ReplError::EngineReply { request: "Read" }),
                                Err(x) => {
                                    return Err(ReplError::engine(
                                        format!("read {ns}@{}", base.name),
                                        x,
                                    ))
                                }
                            };
                            self.engine
                                .call(Request::Write {
                                    ns: ns.clone(),
                                    lba: it.lba,
                                    data,
                                    fua: false,
                                    replica: true,
                                })
                                .map_err(e(format!("revert {ns} lba {}", it.lba)))?;
                        }
                        ItemKind::Trim => {
                            self.engine
                                .call(Request::Trim {
                                    ns: ns.clone(),
                                    lba: it.lba,
                                    len_blocks: u64::from(it.len_blocks),
                                    replica: true,
                                })
                                .map_err(e(format!("revert {ns} lba {}", it.lba)))?;
                        }
                    }
                }
            }
            Ok(())
        })();
        let d = self.engine.call(Request::DeleteSnapshot {
            volume: rel.dst_volume.clone(),
            name: tmp.clone(),
        });
        r?;
        d.map_err(e(format!("delete {}@{tmp}", rel.dst_volume)))?;
        Ok(())
    }

    /// Unmap every block of the destination (full re-baseline).
    pub(super) fn wipe(&self, nss: &[NsName]) -> Result<()> {
        for ns in nss {
            let blocks = ns_size_bytes(&self.engine, ns)? / BLOCK_SIZE as u64;
            self.engine
                .call(Request::Trim {
                    ns: ns.clone(),
                    lba: 0,
                    len_blocks: blocks,
                    replica: true,
                })
                .map_err(|e| ReplError::engine(format!("wipe {ns}"), e))?;
        }
        Ok(())
    }

    pub(super) fn send_sets(&self, c: &mut Conn, acts: Vec<Action>) -> Result<()> {
        self.perform(acts, Some(c));
        Ok(())
    }

    pub(super) fn transfer_inner(
        &self,
        rel: &Relationship,
        mode: Mode,
        progress: &(dyn Fn(Progress) + Sync),
        started: Instant,
    ) -> Result<TransferReport> {
        let key = rel.dst.clone();
        let mut c = self.connect(&rel.source_addr)?;
        let up = c.peer_node.clone();
        let acts = self.ensure_upstream(rel, &up)?;
        self.send_sets(&mut c, acts)?;
        // Claims 10/20: our lock set before the transfer.
        let acts = self.lock_events(vec![Event::TransferStarting {
            relationship: key.clone(),
        }])?;
        self.send_sets(&mut c, acts)?;
        let src = self.request_list(
            &mut c,
            &key,
            &rel.source_volume,
            rel.source_qtree.as_deref(),
        )?;
        let src_ids: Vec<Uuid> = src.iter().map(|s| Uuid::from_bytes(s.id)).collect();
        let ((), a) = self.change(|t| {
            if let Some(r) = t.rel_mut(&key) {
                r.source_snaps = src_ids.clone();
            }
            t.lock(Event::UpstreamSnapshots {
                relationship: key.clone(),
                snapshots: src_ids.clone(),
            });
            Ok(())
        })?;
        self.send_sets(&mut c, a)?;
        if src.is_empty() {
            return Err(ReplError::NotFound(format!(
                "any snapshot of {} (take one there with `snap create`)",
                rel.source_path()
            )));
        }
        let ns_sizes: Vec<(Option<String>, u64)> = match rel.kind {
            MirrorKind::Volume => self
                .request_list(&mut c, &key, &rel.source_volume, Some(NS_LIST_TAG))?
                .into_iter()
                .map(|s| {
                    (
                        if s.name.is_empty() {
                            None
                        } else {
                            Some(s.name)
                        },
                        s.created_ms,
                    )
                })
                .collect(),
            MirrorKind::Qtree => Vec::new(), // size from TransferStart
        };
        if ns_sizes.len() > crate::transfer::NS_MAX {
            return Err(ReplError::Protocol {
                peer: c.who(),
                detail: format!("{} namespaces", ns_sizes.len()),
            });
        }
        let dst_exists = volumes(&self.engine)?
            .iter()
            .any(|v| v.name == rel.dst_volume);
        let local = if dst_exists {
            snapshots(&self.engine, &rel.dst_volume)?
        } else {
            Vec::new()
        };
        let ckpt = self.load_ckpt(&key)?;
        let local_ids: Vec<Uuid> = local.iter().map(|l| l.id).collect();
        let discards = match mode {
            Mode::Resync { .. } => self.discarded_by_resync(rel, &local, &src_ids),
            _ => Vec::new(),
        };
        let decided = plan::plan(&plan::Inputs {
            mode,
            src: &src,
            local: &local_ids,
            ckpt: ckpt.as_ref(),
            completed_before: rel.last_transfer.is_some(),
            resync_discards: &discards,
        });
        let p = match decided {
            Ok(p) => p,
            Err(Refusal::NoSourceSnapshot) => {
                return Err(ReplError::NotFound(format!(
                    "any snapshot of {} (take one there with `snap create`)",
                    rel.source_path()
                )))
            }
            Err(Refusal::HoldsSourceSnapshots) => {
                return Err(ReplError::Invalid(format!(
                    "destination {key} already holds source snapshots"
                )))
            }
            Err(Refusal::NoCommonSnapshot { newest }) => {
                drop(c);
                let bytes = self.probe_full_bytes(rel, &newest);
                return Err(ReplError::NoCommonSnapshot {
                    dst: key.clone(),
                    source_path: rel.source_path(),
                    bytes,
                });
            }
            Err(Refusal::WouldDiscard(discard)) => {
                return Err(ReplError::Invalid(format!(
                    "resync of {key} would discard {} snapshot(s) taken here while it was broken, which {} never had: {}; rerun with --force to discard them",
                    discard.len(),
                    rel.source_path(),
                    discard.join(", ")
                )))
            }
        };
        if let Some(t) = p.abandon {
            // The interrupted transfer does not go on: its checkpoint and
            // its resume lock go; the partial data it left is undone below
            // before the new transfer.
            self.store_ckpt(&key, None)?;
            self.resume_lock(rel, t, false, Some(&mut c))?;
        }
        let mut report = TransferReport {
            dst: key.clone(),
            kind: "none".into(),
            base: p.base.as_ref().map(wire_ref),
            target: Some(wire_ref(&p.target)),
            bytes: 0,
            extents: 0,
            trims: 0,
            resumed_from: p.resume_from,
            total_items: 0,
            deleted_snapshots: Vec::new(),
            kept_locked: Vec::new(),
            full_reason: p.full_reason.map(str::to_string),
            finished_unix_ms: 0,
            duration_ms: 0,
        };
        if p.undo != Undo::Nothing {
            // Read-only before the undo, so no client writes during it.
            // Also when the source has nothing newer: a resync after a break
            // still undoes the local writes (back to the base), or the next
            // update would apply the source's changes on top of them and
            // fail its digest check.
            self.set_dst_read_only(rel, true)?;
            if dst_exists {
                let nss = if rel.kind == MirrorKind::Volume {
                    self.dst_ns(rel, &ns_sizes)
                        .into_iter()
                        .filter(|n| ns_size_bytes(&self.engine, n).is_ok())
                        .collect()
                } else {
                    self.dst_ns(rel, &ns_sizes)
                };
                match &p.base {
                    Some(b) => {
                        let bi = local
                            .iter()
                            .find(|l| l.id.as_bytes() == &b.id)
                            .cloned()
                            .ok_or_else(|| {
                                ReplError::NotFound(format!("base {} locally", b.name))
                            })?;
                        self.revert_to(rel, &nss, &bi)?;
                    }
                    None => {
                        tracing::info!(dst = %key, "full re-baseline: the destination is wiped first");
                        self.wipe(&nss)?;
                    }
                }
            }
        }
        if !p.up_to_date {
            report = self.pull(
                &mut c,
                rel,
                &up,
                p.base,
                &p.target,
                p.resume_from,
                &ns_sizes,
                progress,
                &mut report,
            )?;
        }
        if rel.kind == MirrorKind::Volume {
            self.drop_follow_ups(&mut c, rel, &src_ids, &mut report)?;
        }
        // Claims 10/20: our lock set after the transfer (sent by
        // TransferFinished in pull); make sure the source processed it.
        let gone = self.barrier(&mut c)?;
        self.apply_gone(&key, gone, Some(&mut c));
        let common = {
            let local = snapshots(&self.engine, &rel.dst_volume)?;
            newest_common(&src, &local).map(wire_ref)
        };
        report.finished_unix_ms = self.now_ms();
        report.duration_ms = started.elapsed().as_millis() as u64;
        self.update_rel(&key, |r| plan::record_completion(r, &report, mode, common))?;
        self.flush()?;
        Ok(report)
    }

    /// A volume mirror's follow-up deletes: the destination drops the
    /// snapshots its source no longer has ([`plan::dropped_by_source`]),
    /// except those in use here ([`Uses`]) and those the lock table refuses
    /// (own downstreams, applications). The lock table decides them all in
    /// one transaction; the engine then deletes what it allowed.
    fn drop_follow_ups(
        &self,
        c: &mut Conn,
        rel: &Relationship,
        src_ids: &[Uuid],
        report: &mut TransferReport,
    ) -> Result<()> {
        let local = snapshots(&self.engine, &rel.dst_volume)?;
        let uses = self.uses(&rel.dst_volume);
        let candidates: Vec<&SnapshotInfo> = plan::dropped_by_source(&local, src_ids)
            .filter(|s| uses.of(s.id, &s.name).is_none())
            .collect();
        if candidates.is_empty() {
            return Ok(());
        }
        let acts = self.lock_events(
            candidates
                .iter()
                .map(|s| Event::DeleteRequested {
                    volume: rel.dst_volume.clone(),
                    snapshot: s.id,
                    force: false,
                })
                .collect(),
        )?;
        let allowed: BTreeSet<Uuid> = acts
            .iter()
            .filter_map(|a| match a {
                Action::Deleted { snapshot, .. } => Some(*snapshot),
                _ => None,
            })
            .collect();
        for s in candidates {
            if !allowed.contains(&s.id) {
                report.kept_locked.push(s.name.clone());
                continue;
            }
            self.engine
                .call(Request::DeleteSnapshot {
                    volume: rel.dst_volume.clone(),
                    name: s.name.clone(),
                })
                .map_err(|e| {
                    ReplError::engine(format!("delete {}@{}", rel.dst_volume, s.name), e)
                })?;
            report.deleted_snapshots.push(s.name.clone());
        }
        self.send_sets(c, acts)
    }

    /// The snapshots a resync of `rel` deletes that were taken here while
    /// it was broken (volume mirrors only: a qtree mirror's destination
    /// volume keeps its snapshots): not on the source, not locked here,
    /// created since the break.
    fn discarded_by_resync(
        &self,
        rel: &Relationship,
        local: &[SnapshotInfo],
        src_ids: &[Uuid],
    ) -> Vec<String> {
        if rel.kind != MirrorKind::Volume || !rel.broken {
            return Vec::new();
        }
        let since = rel.broken_unix_ms.unwrap_or(0);
        let unlocked: Vec<&SnapshotInfo> = {
            let st = lock(&self.st);
            local
                .iter()
                .filter(|s| {
                    !src_ids.contains(&s.id)
                        && s.created_unix_ms >= since
                        && st.locks().holders(&rel.dst_volume, s.id).is_empty()
                })
                .collect()
        };
        // One in use (a clone's origin, an open export) is kept too.
        let uses = self.uses(&rel.dst_volume);
        unlocked
            .into_iter()
            .filter(|s| uses.of(s.id, &s.name).is_none())
            .map(|s| s.name.clone())
            .collect()
    }

    /// Whether an incremental from `base` that sent `bytes` of data into
    /// `nss` (committed as snapshot `name`, `info`) was in truth a full
    /// copy: it sent every block of the target, and most of what it sent
    /// the base already held unchanged at the same place (the source
    /// re-wrote its data since the base, as a re-baseline does). Such a
    /// transfer is reported and counted as `full`; the reason is returned.
    /// A diff of the base and the target (O(changed), content hashes
    /// compared) decides first; the costlier count of the whole target
    /// runs only when it says most blocks were re-sent.
    fn resent_whole(
        &self,
        nss: &[NsName],
        local: &[SnapshotInfo],
        base: &SnapInfo,
        name: &str,
        info: &SnapshotInfo,
        bytes: u64,
    ) -> Result<Option<String>> {
        let Some(base_name) = local
            .iter()
            .find(|l| l.id.as_bytes() == &base.id)
            .map(|l| l.name.clone())
        else {
            return Ok(None);
        };
        let mut st = DiffStats::default();
        for ns in nss {
            match self.engine.call(Request::DiffStats {
                ns: ns.clone(),
                base: Some(base_name.clone()),
                target: name.to_string(),
            }) {
                Ok(Reply::DiffStats(d)) => {
                    st.data_blocks += d.data_blocks;
                    st.unchanged_blocks += d.unchanged_blocks;
                }
                Ok(_) => {
                    return Err(ReplError::EngineReply {
                        request: "DiffStats",
                    })
                }
                Err(e) => return Err(ReplError::engine(format!("diff of {ns}@{name}"), e)),
            }
        }
        if st.data_blocks == 0 || st.unchanged_blocks * 2 <= st.data_blocks {
            return Ok(None);
        }
        if !self.sent_everything(nss, name, info, bytes)? {
            return Ok(None);
        }
        Ok(Some(format!(
            "it sent every block of {}, and {} of its {} blocks held what the base {} already had: the source re-wrote its data since the base (a re-baseline)",
            name, st.unchanged_blocks, st.data_blocks, base.name
        )))
    }

    /// Whether `bytes` of data sent into `nss` are all of snapshot `name`.
    /// The exact count (a diff from nothing, a walk of the target's maps)
    /// runs only when `bytes` is at least half the snapshot's referenced
    /// blocks (a cheap bound below which it cannot be everything).
    fn sent_everything(
        &self,
        nss: &[NsName],
        name: &str,
        info: &SnapshotInfo,
        bytes: u64,
    ) -> Result<bool> {
        // Referenced blocks are data and map nodes; a map leaf holds at
        // least one data block and the inner levels are few, so the data
        // is at least about half of them: below that, not everything.
        let referenced = info.referenced_blocks * BLOCK_SIZE as u64;
        let slack = 8 * BLOCK_SIZE as u64;
        if bytes == 0 || bytes.saturating_mul(2) + slack < referenced {
            return Ok(false);
        }
        let mut whole = 0u64;
        for ns in nss {
            let ext = match self.engine.call(Request::Diff {
                ns: ns.clone(),
                base: None,
                target: name.to_string(),
            }) {
                Ok(Reply::Diff(d)) => d,
                Ok(_) => return Err(ReplError::EngineReply { request: "Diff" }),
                Err(e) => return Err(ReplError::engine(format!("diff of {ns}@{name}"), e)),
            };
            whole += ext
                .iter()
                .filter(|e| e.kind == DiffKind::Data)
                .map(|e| e.len_blocks * BLOCK_SIZE as u64)
                .sum::<u64>();
        }
        Ok(whole > 0 && bytes >= whole)
    }

    pub(super) fn resume_owner(&self, key: &str) -> String {
        resume_owner(&self.cfg.node_name, key)
    }

    /// Lock (or release) the target of an interrupted-able transfer (held
    /// for the destination volume, relayed to the source).
    pub(super) fn resume_lock(
        &self,
        rel: &Relationship,
        target: Uuid,
        on: bool,
        c: Option<&mut Conn>,
    ) -> Result<()> {
        let owner = self.resume_owner(&rel.dst);
        let volume = rel.dst_volume.clone();
        let ev = if on {
            Event::AppLockAdded {
                volume,
                snapshot: target,
                owner,
            }
        } else {
            Event::AppLockReleased {
                volume,
                snapshot: target,
                owner,
            }
        };
        let acts = self.lock_events(vec![ev])?;
        self.perform(acts, c);
        Ok(())
    }

    /// What uses snapshot `volume@name` (global id `id`) now; see [`Uses`].
    pub(super) fn in_use(&self, volume: &str, id: Uuid, name: &str) -> Option<String> {
        self.uses(volume).of(id, name)
    }

    /// What uses `volume`'s snapshots now besides the lock table, read once
    /// for a decision about several of them.
    pub(super) fn uses(&self, volume: &str) -> Uses {
        let serving = lock(&self.st).serving.keys().copied().collect();
        // A failed listing counts as no clone: the engine's own check stands.
        let clones = volumes(&self.engine)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|v| {
                let o = v.origin?;
                (o.volume == volume).then_some((o.snapshot, v.name))
            })
            .collect();
        Uses {
            volume: volume.to_string(),
            serving,
            readers: self.users.get().cloned(),
            clones,
        }
    }

    /// Who reads snapshots besides the replicator (the node's NBD server);
    /// a snapshot it names is kept from every delete, forced or not. Set
    /// once: a second call is refused (logged) and the first stays.
    pub fn set_snapshot_users(&self, users: Arc<dyn crate::SnapshotUsers>) {
        if self.users.set(users).is_err() {
            tracing::error!("the snapshot users were set already; the first stay");
        }
    }

    /// Run one transfer's [`PullSession`]: this is its shell, performing
    /// the session's actions in order and feeding it the source's frames
    /// and the engine's answers.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn pull(
        &self,
        c: &mut Conn,
        rel: &Relationship,
        up: &str,
        base: Option<SnapInfo>,
        target: &SnapInfo,
        resume_from: u64,
        ns_sizes: &[(Option<String>, u64)],
        progress: &(dyn Fn(Progress) + Sync),
        report: &mut TransferReport,
    ) -> Result<TransferReport> {
        let key = rel.dst.clone();
        let target_id = Uuid::from_bytes(target.id);
        let mut s = PullSession::new(PullSpec {
            dst: key.clone(),
            source_path: rel.source_path(),
            upstream: up.to_string(),
            kind: rel.kind,
            dst_qtree: rel.dst_qtree.clone(),
            request: TransferRequest {
                req_id: self.cfg.env.random_u64(),
                relationship: key.clone(),
                volume: rel.source_volume.clone(),
                qtree: rel.source_qtree.clone(),
                base: base.as_ref().map(|b| b.id),
                target: target.id,
                resume_from,
            },
            target: target.clone(),
            ns_sizes: ns_sizes.to_vec(),
        });
        report.kind = if base.is_some() {
            "incremental"
        } else {
            "full"
        }
        .into();
        let rel_bucket = self.bucket(&key, rel.throttle_bps);
        let mut wb = WriteBehind::new(&self.engine);
        // What the actions leave for the ones after them.
        let mut nss: Vec<NsName> = Vec::new();
        let mut sets: Vec<Action> = Vec::new();
        let mut local: Vec<SnapshotInfo> = Vec::new();
        let mut taken: Option<(String, SnapshotInfo)> = None;
        let mut queue: std::collections::VecDeque<PullAction> = s.begin().into();
        loop {
            let Some(act) = queue.pop_front() else {
                if self.stopping() {
                    return Err(ReplError::ShuttingDown);
                }
                let msg = self.recv_reply(c, &key)?;
                let acts = s.handle(PullInput::Received {
                    msg: &msg,
                    payload: c.payload(),
                })?;
                queue.extend(acts);
                continue;
            };
            let then = match act {
                PullAction::StoreCheckpoint(ck) => {
                    self.store_ckpt(&key, ck.as_ref())?;
                    None
                }
                PullAction::ResumeLock(on) => {
                    self.resume_lock(rel, target_id, on, Some(c))?;
                    None
                }
                PullAction::Flush => {
                    self.flush()?;
                    None
                }
                PullAction::Send(m) => {
                    c.send(&m, &[])?;
                    None
                }
                PullAction::Prepare { ns_sizes } => {
                    self.ensure_dst(rel, &ns_sizes)?;
                    nss = self.dst_ns(rel, &ns_sizes);
                    let mut ns_blocks = Vec::with_capacity(nss.len());
                    for ns in &nss {
                        ns_blocks.push(ns_size_bytes(&self.engine, ns)? / BLOCK_SIZE as u64);
                    }
                    report.total_items = s
                        .start()
                        .map_or(0, |t| t.start_position.saturating_add(t.extent_count));
                    Some(s.handle(PullInput::Prepared { ns_blocks })?)
                }
                PullAction::Write { ns, lba } => {
                    let ns = self.ns_at(&nss, ns)?;
                    let data = c.take_payload();
                    let n = data.len_bytes() as u64;
                    wb.submit(
                        Request::Write {
                            ns: ns.clone(),
                            lba,
                            data,
                            fua: false,
                            replica: true,
                        },
                        || format!("write {ns} lba {lba}"),
                    )?;
                    self.n.bytes_received.fetch_add(n, Ordering::Relaxed);
                    pace(&[&rel_bucket, &self.node_bucket], n);
                    None
                }
                PullAction::Trim {
                    ns,
                    lba,
                    len_blocks,
                } => {
                    let ns = self.ns_at(&nss, ns)?;
                    wb.submit(
                        Request::Trim {
                            ns: ns.clone(),
                            lba,
                            len_blocks,
                            replica: true,
                        },
                        || format!("trim {ns} lba {lba}"),
                    )?;
                    None
                }
                PullAction::Drain => {
                    wb.drain()?;
                    None
                }
                PullAction::Progress => {
                    let (done_items, total_items) = s.items();
                    progress(Progress {
                        done_items,
                        total_items,
                        done_bytes: s.bytes,
                        total_bytes: s.start().map_or(0, |t| t.byte_count),
                    });
                    None
                }
                PullAction::Snapshot => {
                    // Under the source's global id and time; a local name
                    // already taken gets the id's first digits.
                    local = snapshots(&self.engine, &rel.dst_volume)?;
                    let mut name = target.name.clone();
                    if local.iter().any(|l| l.name == name) {
                        name = format!("{}.{}", target.name, &target_id.simple().to_string()[..8]);
                    }
                    let info = match self.engine.call(Request::CreateSnapshot {
                        volume: rel.dst_volume.clone(),
                        name: name.clone(),
                        id: Some(target_id),
                        created_unix_ms: Some(target.created_ms),
                    }) {
                        Ok(Reply::Snapshot(i)) => i,
                        Ok(_) => {
                            return Err(ReplError::EngineReply {
                                request: "CreateSnapshot",
                            })
                        }
                        Err(e) => {
                            return Err(ReplError::engine(
                                format!("snapshot {}@{name}", rel.dst_volume),
                                e,
                            ))
                        }
                    };
                    let digest = content_digest(&info.digests, rel.dst_qtree.as_deref());
                    taken = Some((name, info));
                    Some(s.handle(PullInput::Snapshotted { digest })?)
                }
                PullAction::DropSnapshot => {
                    if let Some((name, _)) = &taken {
                        let _ = self.engine.call(Request::DeleteSnapshot {
                            volume: rel.dst_volume.clone(),
                            name: name.clone(),
                        });
                    }
                    None
                }
                PullAction::Commit => {
                    // The base lock first, then the resume lock goes, in
                    // one change: the set the source sees never lacks the
                    // target (an empty set in between would end this
                    // downstream relationship there for a moment).
                    sets = self.lock_events(vec![
                        Event::TransferFinished {
                            relationship: key.clone(),
                            target: target_id,
                        },
                        Event::AppLockReleased {
                            volume: rel.dst_volume.clone(),
                            snapshot: target_id,
                            owner: self.resume_owner(&key),
                        },
                    ])?;
                    None
                }
                PullAction::Classify => {
                    if let (Some(b), Some((name, info))) = (base.as_ref(), taken.as_ref()) {
                        if let Some(why) =
                            self.resent_whole(&nss, &local, b, name, info, s.bytes)?
                        {
                            report.kind = "full".into();
                            report.full_reason = Some(why);
                        }
                    }
                    None
                }
                PullAction::SendSets => {
                    self.send_sets(c, std::mem::take(&mut sets))?;
                    None
                }
                PullAction::Fail(e) => return Err(e),
                PullAction::Finished => break,
            };
            if let Some(acts) = then {
                for a in acts.into_iter().rev() {
                    queue.push_front(a);
                }
            }
        }
        report.bytes += s.bytes;
        report.extents += s.extents;
        report.trims += s.trims;
        if let Some((_, info)) = &taken {
            report.target = Some(snap_ref(info));
        }
        Ok(report.clone())
    }

    /// The transfer's namespace at index `i` (a bad index is a bug or a
    /// lying peer's, refused).
    pub(super) fn ns_at(&self, nss: &[NsName], i: u16) -> Result<NsName> {
        nss.get(usize::from(i))
            .cloned()
            .ok_or_else(|| ReplError::Invalid(format!("namespace index {i} out of range")))
    }
}

/// What keeps a volume's snapshots from every delete, forced or not,
/// besides the lock table: a transfer this node serves from one, NBD
/// clients reading its export ([`crate::SnapshotUsers`]), or volumes
/// cloned from it (the engine refuses that delete too; asked here so that
/// retention, prune and a mirror's follow-up deletes skip it before the
/// lock table records a delete).
pub(super) struct Uses {
    volume: String,
    serving: BTreeSet<Uuid>,
    readers: Option<Arc<dyn crate::SnapshotUsers>>,
    /// (origin snapshot, clone volume).
    clones: Vec<(String, String)>,
}

impl Uses {
    /// What uses snapshot `name` (global id `id`), if anything.
    pub(super) fn of(&self, id: Uuid, name: &str) -> Option<String> {
        if self.serving.contains(&id) {
            return Some("a running transfer".into());
        }
        let n = self
            .readers
            .as_ref()
            .map_or(0, |u| u.readers(&self.volume, name));
        if n > 0 {
            return Some(format!("{n} NBD client(s) reading its export"));
        }
        let clones: Vec<&str> = self
            .clones
            .iter()
            .filter(|(snap, _)| snap == name)
            .map(|(_, clone)| clone.as_str())
            .collect();
        (!clones.is_empty())
            .then(|| format!("clone(s) {} (`vol delete` ends a clone)", clones.join(", ")))
    }
}

/// The owner text of the resume lock that relationship `key` of node
/// `node` holds while a transfer of it is interrupted-able.
pub(super) fn resume_owner(node: &str, key: &str) -> String {
    format!("transfer to {node}:{key} in progress")
}

/// The relationship of node `node` whose resume lock has owner text `text`
/// (the inverse of [`resume_owner`]).
pub(super) fn resume_key<'a>(node: &str, text: &'a str) -> Option<&'a str> {
    text.strip_prefix("transfer to ")?
        .strip_prefix(node)?
        .strip_prefix(':')?
        .strip_suffix(" in progress")
}

/// Destination writes queued in the engine without waiting for each one:
/// at most [`WRITE_BEHIND`] outstanding; `drain` before anything that must
/// see them (a checkpoint, the commit). The engine runs requests in order.
struct WriteBehind<'a> {
    engine: &'a EngineHandle,
    tx: ChanTx<(u64, sluice_engine::Result<Reply>)>,
    rx: ChanRx<(u64, sluice_engine::Result<Reply>)>,
    what: BTreeMap<u64, (String, u64)>,
    queued_bytes: u64,
    next_tag: u64,
}

impl<'a> WriteBehind<'a> {
    fn new(engine: &'a EngineHandle) -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        WriteBehind {
            engine,
            tx,
            rx,
            what: BTreeMap::new(),
            queued_bytes: 0,
            next_tag: 0,
        }
    }

    fn submit(&mut self, req: Request, what: impl FnOnce() -> String) -> Result<()> {
        let tag = self.next_tag;
        self.next_tag += 1;
        let bytes = match &req {
            Request::Write { data, .. } => data.len_bytes() as u64,
            _ => 0,
        };
        self.what.insert(tag, (what(), bytes));
        self.queued_bytes += bytes;
        self.engine.submit(req, tag, self.tx.clone());
        while self.what.len() >= WRITE_BEHIND || self.queued_bytes > WRITE_BEHIND_BYTES {
            self.wait_one()?;
        }
        Ok(())
    }

    fn wait_one(&mut self) -> Result<()> {
        let (tag, r) = self
            .rx
            .recv()
            .map_err(|_| ReplError::engine("queued write", sluice_engine::Error::ShutDown))?;
        let (what, bytes) = self.what.remove(&tag).unwrap_or_default();
        self.queued_bytes = self.queued_bytes.saturating_sub(bytes);
        r.map(|_| ()).map_err(|e| ReplError::engine(what, e))
    }

    fn drain(&mut self) -> Result<()> {
        while !self.what.is_empty() {
            self.wait_one()?;
        }
        Ok(())
    }
}

/// The extents that undo `changed` (a forward diff base -> now) given the
/// ranges `mapped` (sorted, disjoint) the base maps: `Data` = restore from
/// the base, `Trim` = unmap.
pub(crate) fn revert_extents(changed: &[DiffExtent], mapped: &[(u64, u64)]) -> Vec<DiffExtent> {
    let mut out = Vec::new();
    for e in changed {
        let (start, end) = (e.lba, e.lba + e.len_blocks);
        if e.kind == DiffKind::Trim {
            // Unmapped now, mapped in the base: restore.
            out.push(DiffExtent {
                kind: DiffKind::Data,
                ..*e
            });
            continue;
        }
        let mut at = start;
        let first = mapped.partition_point(|&(_, me)| me <= start);
        for &(ms, me) in &mapped[first..] {
            if ms >= end {
                break;
            }
            let (s0, e0) = (ms.max(start), me.min(end));
            if s0 > at {
                out.push(DiffExtent {
                    lba: at,
                    len_blocks: s0 - at,
                    kind: DiffKind::Trim,
                });
            }
            out.push(DiffExtent {
                lba: s0,
                len_blocks: e0 - s0,
                kind: DiffKind::Data,
            });
            at = e0;
        }
        if at < end {
            out.push(DiffExtent {
                lba: at,
                len_blocks: end - at,
                kind: DiffKind::Trim,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_owner_text_reads_back_as_its_relationship() {
        let t = resume_owner("b", "qv/db");
        assert_eq!(resume_key("b", &t), Some("qv/db"));
        assert_eq!(resume_key("c", &t), None, "another node's resume lock");
        assert_eq!(resume_key("b", "app: transfer to b:x"), None);
    }

    #[test]
    fn revert_restores_mapped_and_trims_new_blocks() {
        let ch = [
            DiffExtent {
                lba: 0,
                len_blocks: 10,
                kind: DiffKind::Data,
            },
            DiffExtent {
                lba: 20,
                len_blocks: 2,
                kind: DiffKind::Trim,
            },
        ];
        let got = revert_extents(&ch, &[(2, 4), (6, 8), (20, 22)]);
        let k = |g: &DiffExtent| (g.lba, g.len_blocks, g.kind == DiffKind::Data);
        assert_eq!(
            got.iter().map(k).collect::<Vec<_>>(),
            vec![
                (0, 2, false),
                (2, 2, true),
                (4, 2, false),
                (6, 2, true),
                (8, 2, false),
                (20, 2, true)
            ]
        );
    }
}
