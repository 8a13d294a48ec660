//! The source side: serving a downstream's connection (`handle_peer`).
//!
//! Owns: the request loop of a peer session (lock sets, snapshot and
//! namespace lists, transfers, keepalive) and streaming a transfer with
//! read-ahead. Invariants: nothing is served before the handshake; a
//! transfer's base and target are guarded against deletion while it runs;
//! a served target is recorded as shared with that downstream (protected
//! until its after-transfer set arrives); a lock set received is durable
//! (pool flushed) before the next frame to that downstream, so a lock the
//! downstream saw acknowledged survives a crash here.

use super::*;

impl Replicator {
    /// Bound the downstreams one node tracks (a node without a secret
    /// accepts any peer name): a new one beyond [`DOWNSTREAMS_MAX`] is refused.
    pub(super) fn admit_downstream(&self, c: &mut Conn, key: &DownKey) -> Result<()> {
        let mut st = lock(&self.st);
        if st.down_shared.contains_key(key) {
            return Ok(());
        }
        let nodes: BTreeSet<&str> = st.down_shared.keys().map(|(n, _)| n.as_str()).collect();
        if !nodes.contains(key.0.as_str()) && nodes.len() >= DOWNSTREAMS_MAX {
            drop(st);
            let text = format!(
                "node {} already serves {DOWNSTREAMS_MAX} downstreams; delete unused mirrors downstream",
                self.cfg.node_name
            );
            c.send_error(0, codes::INTERNAL, &text);
            return Err(ReplError::Invalid(text));
        }
        st.down_shared.insert(key.clone(), BTreeSet::new());
        Ok(())
    }

    /// Serve one peer connection (its first bytes are the lockproto MAGIC).
    /// Returns when the peer closes, on a protocol error or on shutdown.
    pub fn handle_peer(self: &Arc<Self>, stream: std::net::TcpStream) {
        let _ = stream.set_nodelay(true);
        self.handle_stream(Box::new(stream));
    }

    /// [`Replicator::handle_peer`] on any stream (a simulated connection).
    pub fn handle_stream(&self, stream: Box<dyn crate::env::PeerStream>) {
        let peer = stream.peer_label();
        match self.serve(stream) {
            // Counted and logged (rate-limited) where it was refused.
            Ok(()) | Err(ReplError::AuthRefused { .. }) => {}
            Err(e) => tracing::info!(%peer, error = %e, "peer connection ended with an error"),
        }
    }

    /// Count a refused incoming peer, and log it unless its source was
    /// logged within the interval ([`crate::refusals`]).
    fn refused(&self, c: &Conn, e: &ReplError) {
        self.n.auth_failures.fetch_add(1, Ordering::Relaxed);
        self.n.peers_refused.fetch_add(1, Ordering::Relaxed);
        let source = crate::refusals::RefusalLog::source(&c.peer, &c.peer_node);
        let now = self.cfg.env.mono_ms();
        let Some(line) = lock(&self.refusals).note(&source, now) else {
            return;
        };
        let every_s = crate::refusals::INTERVAL_MS_DEFAULT / 1000;
        if line.overflow {
            tracing::warn!(peer = %c.who(), error = %e, suppressed = line.suppressed, "peer refused (refusals from too many sources: logged once per {every_s} s for all of them; sluice_repl_peers_refused_total counts each)");
        } else {
            tracing::warn!(peer = %c.who(), error = %e, suppressed = line.suppressed, "peer refused (further refusals from this source within {every_s} s are counted in sluice_repl_peers_refused_total, not logged)");
        }
    }

    pub(super) fn serve(&self, stream: Box<dyn crate::env::PeerStream>) -> Result<()> {
        let mut c = self.track(Conn::new(stream, self.cfg.peer_timeout)?)?;
        let r = self.serve_conn(&mut c);
        if let Err(e @ ReplError::AuthRefused { .. }) = &r {
            self.refused(&c, e);
        }
        r
    }

    fn serve_conn(&self, c: &mut Conn) -> Result<()> {
        if self.peers_allowed().is_err() {
            return Err(c.refuse_unauthenticated(&self.cfg.node_name));
        }
        let peer = c.handshake_with(&self.cfg.node_name, &|p| self.cfg.peer_key(p))?;
        let mut parts = SetAssembler::default();
        // The list the pages of one listing come from, as of its first
        // page: (volume, qtree, list, its hash). A listing costs one engine
        // listing, not one per page.
        let mut listing: Option<(String, Option<String>, Vec<SnapInfo>, u64)> = None;
        loop {
            if self.stopping() {
                c.send_error(0, codes::INTERNAL, "node is shutting down");
                return Ok(());
            }
            let Some(msg) = c.recv()? else {
                return Ok(());
            };
            match msg {
                Message::LockSet(w) => {
                    let max = sluice_lockproto::Bounds::default().max_locks_per_set;
                    match parts.push(w, max) {
                        Ok(Some(set)) => {
                            self.n.lock_sets_received.fetch_add(1, Ordering::Relaxed);
                            if let Err(e) = self.on_lock_set(c, &peer, set) {
                                self.n.lock_sets_refused.fetch_add(1, Ordering::Relaxed);
                                return Err(e);
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            c.send_error(0, codes::BAD_FRAME, &e.to_string());
                            return Err(e.into());
                        }
                    }
                }
                Message::Ping { nonce } => c.send(&Message::Pong { nonce }, &[])?,
                Message::Pong { .. } | Message::CheckpointAck { .. } => {}
                Message::SnapshotListRequest { req_id, volume, .. }
                    if !self.may_serve(&peer, &volume) =>
                {
                    c.send_error(req_id, codes::REFUSED, &self.not_exported(&peer, &volume))
                }
                Message::SnapshotListRequest {
                    req_id,
                    volume,
                    qtree,
                } => match self.list_for_peer(&volume, qtree.as_deref()) {
                    Ok(snapshots) => c.send(&Message::SnapshotList { req_id, snapshots }, &[])?,
                    Err(e) => c.send_error(req_id, codes::NOT_FOUND, &e.to_string()),
                },
                Message::SnapshotPageRequest { req_id, volume, .. }
                    if !self.may_serve(&peer, &volume) =>
                {
                    c.send_error(req_id, codes::REFUSED, &self.not_exported(&peer, &volume))
                }
                Message::SnapshotPageRequest {
                    req_id,
                    volume,
                    qtree,
                    start,
                } => {
                    let cached = listing
                        .as_ref()
                        .is_some_and(|(v, q, _, _)| start > 0 && *v == volume && *q == qtree);
                    if !cached {
                        listing = match self.list_for_peer(&volume, qtree.as_deref()) {
                            Ok(all) => {
                                let h = sluice_lockproto::wire::snapshot_list_hash(&all);
                                Some((volume, qtree, all, h))
                            }
                            Err(e) => {
                                c.send_error(req_id, codes::NOT_FOUND, &e.to_string());
                                continue;
                            }
                        };
                    }
                    let Some((_, _, all, list_hash)) = &listing else {
                        continue;
                    };
                    let page = Message::SnapshotPage {
                        req_id,
                        start,
                        total: u32::try_from(all.len()).unwrap_or(u32::MAX),
                        list_hash: *list_hash,
                        snapshots: all
                            .iter()
                            .skip(start as usize)
                            .take(SNAPSHOT_PAGE_MAX as usize)
                            .cloned()
                            .collect(),
                    };
                    c.send(&page, &[])?
                }
                Message::WatchRequest {
                    req_id,
                    wait_ms,
                    volumes,
                } => self.serve_watch(c, &peer, req_id, wait_ms, &volumes)?,
                Message::TransferRequest(r) => {
                    // The listing is done with by now.
                    listing = None;
                    self.serve_transfer(c, &peer, &r)?
                }
                Message::Error { code, text, .. } => {
                    tracing::info!(%peer, code, %text, "peer sent an error");
                    return Ok(());
                }
                other => {
                    let text = format!(
                        "unexpected message type {} from a downstream",
                        other.type_code()
                    );
                    c.send_error(0, codes::BAD_FRAME, &text);
                    return Err(ReplError::Protocol {
                        peer: c.who(),
                        detail: text,
                    });
                }
            }
        }
    }

    pub(super) fn on_lock_set(&self, c: &mut Conn, peer: &str, set: LockSet) -> Result<()> {
        if set.sender != peer {
            let text = format!(
                "lock set names sender {:?} but the connection authenticated as {peer:?}",
                set.sender
            );
            c.send_error(0, codes::BAD_FRAME, &text);
            return Err(ReplError::Protocol {
                peer: c.who(),
                detail: text,
            });
        }
        let key: DownKey = (peer.to_string(), set.relationship.clone());
        let empty = set.locks.is_empty() && set.gone_acks.is_empty();
        if !empty {
            if let Err(e) = volume_info(&self.engine, &set.volume) {
                let text = format!(
                    "lock set of {peer}:{} names volume {:?}, which {} does not have ({e})",
                    set.relationship, set.volume, self.cfg.node_name
                );
                c.send_error(0, codes::NOT_FOUND, &text);
                return Err(ReplError::Protocol {
                    peer: c.who(),
                    detail: text,
                });
            }
            if !self.may_serve(peer, &set.volume) {
                let text = self.not_exported(peer, &set.volume);
                c.send_error(0, codes::REFUSED, &text);
                return Err(ReplError::Protocol {
                    peer: c.who(),
                    detail: text,
                });
            }
            self.admit_downstream(c, &key)?;
        }
        let ((), acts) = self.change(|t| {
            if empty {
                // The downstream relationship holds nothing here any more
                // (deleted, or not yet based on anything of ours): it stops
                // being a downstream.
                t.mem().down_shared.remove(&key);
                t.lock(Event::DownstreamRemoved {
                    downstream: key.0.clone(),
                    relationship: key.1.clone(),
                });
            } else {
                t.lock(Event::DownstreamAdded {
                    downstream: key.0.clone(),
                    relationship: key.1.clone(),
                    volume: set.volume.clone(),
                });
                // What we share follows the set only if the table took it:
                // a set older than the last one (delivered late, or re-sent
                // after a newer one went on a transfer's connection) changes
                // nothing.
                let generation = set.generation;
                let named: BTreeSet<Uuid> = set
                    .locks
                    .iter()
                    .filter(|l| l.origin_node == peer)
                    .map(|l| l.snapshot)
                    .collect();
                let local = t.locks().snapshots(&set.volume).to_vec();
                t.lock(Event::LockSetReceived { set });
                if t.locks().generation_of(&key) == generation {
                    let before = t.locks().shared_with(&key);
                    let shared = next_shared(&local, &before, &named);
                    t.mem().down_shared.insert(key.clone(), shared.clone());
                    t.lock(Event::DownstreamShared {
                        downstream: key.0.clone(),
                        relationship: key.1.clone(),
                        shared: shared.into_iter().collect(),
                    });
                }
            }
            Ok(())
        })?;
        // Durable before anything answers it (the downstream's barrier
        // waits for our next frame): an acknowledged lock survives a crash
        // of this node.
        self.flush()?;
        // A set the table refused (a bound) is not silently dropped: the
        // downstream hears why, and its set stays undelivered there.
        let refused = acts.iter().find_map(|a| match a {
            Action::SetRejected { sender, error } if sender == peer => Some(error.to_string()),
            _ => None,
        });
        self.perform(acts, None);
        if let Some(why) = refused {
            let text = format!(
                "lock set of {peer}:{} refused by {}: {why}",
                key.1, self.cfg.node_name
            );
            c.send_error(0, codes::REFUSED, &text);
            return Err(ReplError::Protocol {
                peer: c.who(),
                detail: text,
            });
        }
        let gone = lock(&self.st).locks().pending_gone(&key.0, &key.1);
        for g in gone {
            c.send(
                &Message::SnapshotGone {
                    snapshot: *g.as_bytes(),
                    holders_text: format!(
                        "snapshot {g} was force-deleted on {}",
                        self.cfg.node_name
                    ),
                },
                &[],
            )?;
        }
        Ok(())
    }

    pub(super) fn list_for_peer(&self, volume: &str, qtree: Option<&str>) -> Result<Vec<SnapInfo>> {
        if qtree == Some(NS_LIST_TAG) {
            let v = volume_info(&self.engine, volume)?;
            let mut out = vec![SnapInfo {
                id: [0; 16],
                name: String::new(),
                created_ms: v.size_bytes,
                content_digest: [0; 32],
            }];
            let mut qs = v.qtrees.clone();
            qs.sort_by(|a, b| a.name.cmp(&b.name));
            for q in qs {
                out.push(SnapInfo {
                    id: [0; 16],
                    name: q.name,
                    created_ms: q.size_bytes,
                    content_digest: [0; 32],
                });
            }
            return Ok(out);
        }
        if let Some(q) = qtree {
            let v = volume_info(&self.engine, volume)?;
            if !v.qtrees.iter().any(|x| x.name == q) {
                return Err(ReplError::NotFound(format!("qtree {volume}/{q}")));
            }
        }
        // Names, ids and digests: no block-count walk per snapshot.
        Ok(snapshot_names_of(&self.engine, volume)?
            .iter()
            .filter_map(|s| {
                content_digest(&s.digests, qtree).map(|d| SnapInfo {
                    id: *s.id.as_bytes(),
                    name: s.name.clone(),
                    created_ms: s.created_unix_ms,
                    content_digest: d,
                })
            })
            .collect())
    }

    /// Namespaces of a volume in transfer order: own space, then qtrees by name.
    pub(super) fn transfer_namespaces(
        &self,
        volume: &str,
        qtree: Option<&str>,
    ) -> Result<Vec<NsName>> {
        if let Some(q) = qtree {
            return Ok(vec![NsName::qtree(volume, q)]);
        }
        let v = volume_info(&self.engine, volume)?;
        let mut names: Vec<String> = v.qtrees.iter().map(|q| q.name.clone()).collect();
        names.sort();
        let mut out = vec![NsName::volume(volume)];
        out.extend(names.iter().map(|q| NsName::qtree(volume, q)));
        Ok(out)
    }

    pub(super) fn serve_transfer(
        &self,
        c: &mut Conn,
        peer: &str,
        r: &TransferRequest,
    ) -> Result<()> {
        let req_id = r.req_id;
        let fail = |c: &mut Conn, code: u16, e: ReplError| -> Result<()> {
            c.send_error(req_id, code, &e.to_string());
            Ok(())
        };
        if !self.may_serve(peer, &r.volume) {
            c.send_error(req_id, codes::REFUSED, &self.not_exported(peer, &r.volume));
            return Ok(());
        }
        let snaps = match snapshots(&self.engine, &r.volume) {
            Ok(s) => s,
            Err(e) => return fail(c, codes::NOT_FOUND, e),
        };
        let (target, base) = match crate::session::admit_request(&self.cfg.node_name, r, &snaps) {
            Ok((t, b)) => (t.clone(), b.cloned()),
            Err(refused) => return fail(c, refused.code, refused.error),
        };
        let _guard = {
            let mut st = lock(&self.st);
            let mut ids = vec![target.id];
            ids.extend(base.as_ref().map(|b| b.id));
            for id in &ids {
                *st.serving.entry(*id).or_insert(0) += 1;
            }
            ServeGuard { r: self, ids }
        };
        let Some(digest) = content_digest(&target.digests, r.qtree.as_deref()) else {
            return fail(
                c,
                codes::NOT_FOUND,
                ReplError::NotFound(format!("qtree {:?} in snapshot {}", r.qtree, target.name)),
            );
        };
        let nss = match self.transfer_namespaces(&r.volume, r.qtree.as_deref()) {
            Ok(n) => n,
            Err(e) => return fail(c, codes::NOT_FOUND, e),
        };
        let mut diffs = Vec::with_capacity(nss.len());
        let mut ns_bytes = 0;
        for (i, ns) in nss.iter().enumerate() {
            let present = match &ns.qtree {
                None => true,
                Some(q) => target.digests.iter().any(|(n, _)| n.as_deref() == Some(q)),
            };
            if !present {
                diffs.push(Vec::new());
                continue;
            }
            match self.engine.call(Request::Diff {
                ns: ns.clone(),
                base: base.as_ref().map(|b| b.name.clone()),
                target: target.name.clone(),
            }) {
                Ok(Reply::Diff(d)) => diffs.push(d),
                Ok(_) => {
                    return fail(
                        c,
                        codes::INTERNAL,
                        ReplError::EngineReply { request: "Diff" },
                    )
                }
                Err(e) => {
                    return fail(
                        c,
                        codes::INTERNAL,
                        ReplError::engine(format!("diff of {ns}"), e),
                    )
                }
            }
            if i == 0 {
                ns_bytes = ns_size_bytes(&self.engine, ns)?;
            }
        }
        let items = plan(&diffs);
        let sender = match Sender::new(items, r.resume_from, self.cfg.checkpoint) {
            Ok(s) => s,
            Err(e) => return fail(c, codes::INTERNAL, ReplError::Invalid(e)),
        };
        let target_info = SnapInfo {
            id: *target.id.as_bytes(),
            name: target.name.clone(),
            created_ms: target.created_unix_ms,
            content_digest: digest,
        };
        c.send(
            &ServeSession::start_frame(r, &sender, target_info, ns_bytes),
            &[],
        )?;
        tracing::info!(%peer, volume = %r.volume, target = %target.name, base = ?base.as_ref().map(|b| &b.name), resume_from = r.resume_from, "serving transfer");
        // The session's shell: reads run ahead of the socket (up to
        // READ_AHEAD in the engine's queue at once, so the device sees
        // queue depth, not one request); frames go out in item order.
        let mut s = ServeSession::new(sender, req_id, digest, READ_AHEAD);
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let mut ready: BTreeMap<u64, sluice_engine::Result<Reply>> = BTreeMap::new();
        loop {
            if self.stopping() {
                c.send_error(
                    req_id,
                    codes::INTERNAL,
                    "source node is shutting down; resume later",
                );
                return Ok(());
            }
            match s.next_action() {
                ServeAction::Read { tag, item } => {
                    let ns = self.ns_at(&nss, item.ns)?;
                    self.engine.submit(
                        Request::Read {
                            image: Image {
                                ns,
                                snapshot: Some(target.name.clone()),
                            },
                            lba: item.lba,
                            len_blocks: item.len_blocks,
                        },
                        tag,
                        done_tx.clone(),
                    );
                }
                ServeAction::AwaitRead => match done_rx.recv() {
                    Ok((tag, reply)) => {
                        ready.insert(tag, reply);
                        s.read_done(tag);
                    }
                    Err(_) => {
                        return fail(
                            c,
                            codes::INTERNAL,
                            ReplError::engine(
                                format!("read {}@{}", r.volume, target.name),
                                sluice_engine::Error::ShutDown,
                            ),
                        )
                    }
                },
                ServeAction::SendExtent { tag, item } => {
                    let data = match ready.remove(&tag) {
                        Some(Ok(Reply::Data(d))) => d,
                        Some(Err(e)) => {
                            return fail(
                                c,
                                codes::INTERNAL,
                                ReplError::engine(
                                    format!("read {}@{} lba {}", r.volume, target.name, item.lba),
                                    e,
                                ),
                            )
                        }
                        Some(Ok(_)) | None => {
                            return fail(
                                c,
                                codes::INTERNAL,
                                ReplError::EngineReply { request: "Read" },
                            )
                        }
                    };
                    let payload = data.as_slice();
                    c.send(&Message::Extent(s.extent_header(&item, payload)), payload)?;
                    self.n
                        .bytes_sent
                        .fetch_add(payload.len() as u64, Ordering::Relaxed);
                }
                ServeAction::Send(m) => c.send(&m, &[])?,
                ServeAction::Finished => break,
            }
        }
        let sent = s.bytes;
        self.n.transfers_served.fetch_add(1, Ordering::Relaxed);
        // Protect the target for this downstream relationship until its
        // after-set arrives.
        let key: DownKey = (peer.to_string(), r.relationship.clone());
        self.admit_downstream(c, &key)?;
        let ((), acts) = self.change(|t| {
            t.lock(Event::DownstreamAdded {
                downstream: key.0.clone(),
                relationship: key.1.clone(),
                volume: r.volume.clone(),
            });
            t.mem().served.insert(
                key.clone(),
                crate::types::Served {
                    unix_ms: self.now_ms(),
                    snapshot: target.name.clone(),
                    kind: if r.base.is_some() {
                        "incremental"
                    } else {
                        "full"
                    }
                    .into(),
                    bytes: sent,
                },
            );
            let e = t.mem().down_shared.entry(key.clone()).or_default();
            e.insert(target.id);
            let shared: Vec<Uuid> = e.iter().copied().collect();
            t.lock(Event::DownstreamShared {
                downstream: key.0.clone(),
                relationship: key.1.clone(),
                shared,
            });
            Ok(())
        })?;
        self.perform(acts, None);
        Ok(())
    }
}
