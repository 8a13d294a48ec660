//! `mirror create --follow`: updates that start when the source has a new
//! snapshot, not on a schedule.
//!
//! Owns: the follower threads (one per source address that a following
//! relationship pulls from, at most `max_follow_sources`, 16 by default:
//! a `mirror create --follow` past it is refused) and the source's
//! answer to a watch ([`Replicator::serve_watch`]).
//!
//! A follower holds one peer connection to its source and sends it a
//! `WatchRequest` naming each following relationship's source volume and
//! the newest snapshot this node saw there (`Relationship::source_snaps`);
//! the source answers as soon as one of them has a newer snapshot, or after
//! the wait with nothing. The follower then closes the watch (a transfer
//! can outlast the source's idle timeout) and runs the updates, one after
//! the other, on its own thread: the same `transfer` an operator's `mirror
//! update` runs, so the lock and commit rules are the ones of every update.
//! In a cascade where every hop follows, a snapshot taken on A is passed on
//! by each hop as soon as the one above it committed it.
//!
//! Invariants kept:
//! - Nothing a watch misses is lost: a follower starts with one update of
//!   each relationship it follows (what came while nobody watched), and a
//!   relationship whose follow update failed, or made no progress, is
//!   retried by itself after a backoff ([`RETRY_FIRST_MS`] doubling to
//!   [`RETRY_MAX_MS`]), not left to the next snapshot (the failed
//!   transfer already recorded the source's list as seen).
//! - A relationship is updated by one transfer at a time: a follow update
//!   claims `Jobs::scheduled` like a scheduled one, and the busy flag
//!   refuses an operator's update meanwhile.
//! - A follower exits when no relationship follows its source any more
//!   (deleted, broken, or the node stops); shutdown cuts its connection and
//!   joins it.
//! - A source of protocol minor 0 or 1 has no watch: its followers update
//!   every [`OLD_SOURCE_POLL_MS`] instead, and say so once.

use super::*;

use sluice_lockproto::wire::{WatchEntry, WATCH_VOLUMES_MAX, WATCH_WAIT_MAX_MS};

/// The longest one watch waits before it is sent again (ms); also kept
/// below half the peer timeout.
const WATCH_WAIT_MS: u64 = 10_000;
/// How often a source checks the watched volumes while it holds a watch:
/// this, plus [`WATCH_POLL_PER_VOLUME`] for each volume watched (one
/// engine call each), so a watch of many volumes costs a bounded share of
/// a core (a watch of 1,024 volumes looks about 4 times a second).
const WATCH_POLL: Duration = Duration::from_millis(5);
const WATCH_POLL_PER_VOLUME: Duration = Duration::from_micros(250);
/// First retry of a failed follow update (ms), doubled per failure.
pub(super) const RETRY_FIRST_MS: u64 = 1_000;
/// Longest retry interval of a failing follow update (ms).
pub(super) const RETRY_MAX_MS: u64 = 60_000;
/// Update interval of a relationship that follows a source without the
/// watch (protocol minor 0 or 1).
pub(super) const OLD_SOURCE_POLL_MS: u64 = 10_000;

/// The follower threads by source address.
#[derive(Default)]
pub(super) struct Followers {
    running: Mutex<BTreeMap<String, JoinHandle<()>>>,
    /// Sources refused a follower for `max_follow_sources` (logged once).
    refused: Mutex<BTreeSet<String>>,
}

/// One relationship a follower looks after.
struct Followed {
    dst: String,
    source_volume: String,
    source_qtree: Option<String>,
    /// The newest source snapshot this node saw (zeros: none).
    newest: [u8; 16],
}

/// A follow update to run at `at` (monotonic ms). `check`: it was
/// started by the watch, so an update that leaves the source's newest
/// snapshot as it was made no progress (and is retried after a backoff
/// instead of being watched, which would report it again at once).
#[derive(Clone, Copy)]
struct Due {
    at: u64,
    check: bool,
}

/// What a follower keeps between its connections.
#[derive(Default)]
struct FollowState {
    /// Updates to run, by destination.
    due: BTreeMap<String, Due>,
    /// The next retry interval of a destination whose last follow update
    /// failed or made no progress (cleared by one that did).
    delay: BTreeMap<String, u64>,
    /// The interval before the next connection after a failed one.
    backoff: u64,
}

impl FollowState {
    /// Run `dst` again after its backoff (which doubles).
    fn retry(&mut self, dst: &str, now: u64, check: bool) -> u64 {
        let d = self.delay.get(dst).copied().unwrap_or(RETRY_FIRST_MS);
        self.delay
            .insert(dst.to_string(), (d * 2).min(RETRY_MAX_MS));
        self.due.insert(
            dst.to_string(),
            Due {
                at: now.saturating_add(d),
                check,
            },
        );
        d
    }

    /// Run `dst` now, unless it is queued already.
    fn now(&mut self, dst: String, now: u64, check: bool) {
        self.due.entry(dst).or_insert(Due { at: now, check });
    }
}

impl Replicator {
    /// Start a follower for every followed source without one, and reap
    /// those that ended. Called by the scheduler thread each tick.
    pub(super) fn start_followers(self: &Arc<Self>) {
        let wanted: BTreeSet<String> = {
            let st = lock(&self.st);
            st.rels()
                .values()
                .filter(|r| r.follow && !r.broken)
                .map(|r| r.source_addr.clone())
                .collect()
        };
        let mut running = lock(&self.followers.running);
        let ended: Vec<String> = running
            .iter()
            .filter(|(_, h)| h.is_finished())
            .map(|(a, _)| a.clone())
            .collect();
        for a in ended {
            if let Some(h) = running.remove(&a) {
                if h.join().is_err() {
                    tracing::error!(source = %a, "follower thread panicked");
                }
            }
        }
        for addr in wanted {
            if running.contains_key(&addr) || self.stopping() {
                continue;
            }
            let max = self.cfg.max_follow_sources;
            if running.len() >= max {
                // Refused at create; reached only by a retarget.
                if lock(&self.followers.refused).insert(addr.clone()) {
                    tracing::warn!(source = %addr, "relationships from {addr} are not followed: this node follows {max} sources already (their --every schedule, if any, still runs)");
                }
                continue;
            }
            let weak = Arc::downgrade(self);
            let a = addr.clone();
            let name = format!("sluice-follow-{}", self.cfg.node_name);
            match std::thread::Builder::new()
                .name(name)
                .spawn(move || follow_loop(weak, a))
            {
                Ok(h) => {
                    running.insert(addr, h);
                }
                Err(e) => {
                    tracing::error!(source = %addr, error = %e, "cannot start a follower thread")
                }
            }
        }
    }

    /// Refuse a `--follow` relationship from `addr` that would take this
    /// node past `max_follow_sources` followed source addresses.
    pub(super) fn check_follow_sources(&self, addr: &str) -> Result<()> {
        let max = self.cfg.max_follow_sources;
        let st = lock(&self.st);
        let mut sources: BTreeSet<&str> = st
            .rels()
            .values()
            .filter(|r| r.follow && !r.broken)
            .map(|r| r.source_addr.as_str())
            .collect();
        sources.insert(addr);
        if sources.len() > max {
            return Err(ReplError::Invalid(format!(
                "--follow from {addr} would make {} sources this node follows, and it follows at most {max} (one thread each): use --every for this relationship, or follow fewer sources",
                sources.len()
            )));
        }
        Ok(())
    }

    /// Join every follower (shutdown, after the sockets were cut).
    pub(super) fn join_followers(&self) {
        let me = std::thread::current().id();
        let all = std::mem::take(&mut *lock(&self.followers.running));
        for (addr, h) in all {
            if h.thread().id() != me && h.join().is_err() {
                tracing::error!(source = %addr, "follower thread panicked");
            }
        }
    }

    /// The relationships that follow `addr` now, by destination.
    fn followed_from(&self, addr: &str) -> BTreeMap<String, Followed> {
        let st = lock(&self.st);
        st.rels()
            .values()
            .filter(|r| r.follow && !r.broken && r.source_addr == addr)
            .map(|r| {
                let newest = r.source_snaps.last().map_or([0; 16], |u| *u.as_bytes());
                let f = Followed {
                    dst: r.dst.clone(),
                    source_volume: r.source_volume.clone(),
                    source_qtree: r.source_qtree.clone(),
                    newest,
                };
                (r.dst.clone(), f)
            })
            .collect()
    }

    /// Sleep `ms`, in short slices, unless the node stops first.
    fn pause(&self, ms: u64) {
        let end = Instant::now() + Duration::from_millis(ms);
        while !self.stopping() {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
    }

    /// One follow update of `dst`, claimed like a scheduled one. `Ok(true)`:
    /// it ran and the source's newest snapshot it saw changed (or it was
    /// already running elsewhere); `Ok(false)`: it ran and made no progress.
    fn follow_update(&self, dst: &str, before: [u8; 16]) -> Result<bool> {
        if !lock(&self.jobs.scheduled).insert(dst.to_string()) {
            return Ok(true); // a scheduled update of it runs now
        }
        let _claim = sched::Claim {
            set: &self.jobs.scheduled,
            key: dst.to_string(),
        };
        match self.transfer(dst, Mode::Update, &|_| {}) {
            Ok(_) => {}
            Err(ReplError::Busy(_)) => return Ok(true),
            Err(e) => return Err(e),
        }
        let after = lock(&self.st)
            .rels()
            .get(dst)
            .and_then(|r| r.source_snaps.last().copied());
        Ok(after.map_or([0; 16], |u| *u.as_bytes()) != before)
    }

    /// Watch `addr` on `c` for the relationships in `watch` (at most
    /// [`WATCH_VOLUMES_MAX`]), for at most `wait_ms`: the destinations
    /// whose source has a newer snapshot.
    fn watch_once(&self, c: &mut Conn, watch: &[&Followed], wait_ms: u64) -> Result<Vec<String>> {
        let req_id = self.cfg.env.random_u64();
        let volumes = watch
            .iter()
            .map(|f| WatchEntry {
                volume: f.source_volume.clone(),
                qtree: f.source_qtree.clone(),
                newest: f.newest,
            })
            .collect();
        let wait = u32::try_from(wait_ms).unwrap_or(WATCH_WAIT_MAX_MS);
        c.send(
            &Message::WatchRequest {
                req_id,
                wait_ms: wait.min(WATCH_WAIT_MAX_MS),
                volumes,
            },
            &[],
        )?;
        loop {
            match c.recv()? {
                Some(Message::WatchReply { req_id: r, changed }) if r == req_id => {
                    let mut out = Vec::new();
                    for i in changed {
                        let f = watch.get(i as usize).ok_or_else(|| ReplError::Protocol {
                            peer: c.who(),
                            detail: format!(
                                "watch reply names volume {i} of a watch of {}",
                                watch.len()
                            ),
                        })?;
                        out.push(f.dst.clone());
                    }
                    return Ok(out);
                }
                Some(Message::Ping { nonce }) => c.send(&Message::Pong { nonce }, &[])?,
                Some(Message::Error { code, text, .. }) => {
                    return Err(ReplError::Remote {
                        peer: c.who(),
                        code,
                        text,
                    })
                }
                Some(other) => {
                    return Err(ReplError::Protocol {
                        peer: c.who(),
                        detail: format!(
                            "expected a watch reply, got message type {}",
                            other.type_code()
                        ),
                    })
                }
                None => return Err(closed(c, "watch", "the source closed the watch")),
            }
        }
    }

    /// The follower of `addr` until nothing follows it: returns `Ok` then,
    /// or the error that cut its connection.
    fn follow_source(&self, addr: &str, fs: &mut FollowState) -> Result<()> {
        let wait_cap = WATCH_WAIT_MS.min(self.cfg.peer_timeout.as_millis() as u64 / 2);
        loop {
            // Run what is due, with no watch open.
            let followed = self.followed_from(addr);
            if followed.is_empty() || self.stopping() {
                return Ok(());
            }
            fs.due.retain(|dst, _| followed.contains_key(dst));
            fs.delay.retain(|dst, _| followed.contains_key(dst));
            let now = self.cfg.env.mono_ms();
            let ready: Vec<(String, Due)> = fs
                .due
                .iter()
                .filter(|(_, d)| d.at <= now)
                .map(|(k, d)| (k.clone(), *d))
                .collect();
            for (dst, d) in ready {
                if self.stopping() {
                    return Ok(());
                }
                fs.due.remove(&dst);
                let before = followed.get(&dst).map_or([0; 16], |f| f.newest);
                let now = self.cfg.env.mono_ms();
                match self.follow_update(&dst, before) {
                    Ok(progress) if progress || !d.check => {
                        fs.delay.remove(&dst);
                    }
                    Ok(_) => {
                        let ms = fs.retry(&dst, now, true);
                        tracing::info!(%dst, retry_ms = ms, "follow update found nothing newer than the watch reported; retried after a pause");
                    }
                    Err(e) => {
                        let ms = fs.retry(&dst, now, d.check);
                        tracing::warn!(%dst, error = %e, retry_ms = ms, "follow update failed; retried after a pause");
                    }
                }
            }
            let followed = self.followed_from(addr);
            if followed.is_empty() {
                return Ok(());
            }
            // Watch the rest until something changes or a retry is due.
            let now = self.cfg.env.mono_ms();
            let next_retry = fs.due.values().map(|d| d.at.saturating_sub(now)).min();
            let wait = next_retry.map_or(wait_cap, |r| r.min(wait_cap));
            let watch: Vec<&Followed> = followed
                .values()
                .filter(|f| !fs.due.contains_key(&f.dst))
                .take(WATCH_VOLUMES_MAX)
                .collect();
            if watch.is_empty() {
                self.pause(wait.max(10));
                continue;
            }
            let mut c = self.connect(addr)?;
            if c.peer_minor < 2 {
                drop(c);
                tracing::info!(source = %addr, "the source has no snapshot watch (an older build): its followed relationships update every {} s", OLD_SOURCE_POLL_MS / 1000);
                self.pause(OLD_SOURCE_POLL_MS);
                let at = self.cfg.env.mono_ms();
                for f in &watch {
                    fs.now(f.dst.clone(), at, false);
                }
                continue;
            }
            loop {
                let changed = self.watch_once(&mut c, &watch, wait)?;
                fs.backoff = RETRY_FIRST_MS;
                if !changed.is_empty() || next_retry.is_some() || self.stopping() {
                    let at = self.cfg.env.mono_ms();
                    for dst in changed {
                        fs.now(dst, at, true);
                    }
                    break;
                }
                // Nothing new: watch again on the same connection, unless
                // what is followed changed meanwhile.
                let again = self.followed_from(addr);
                let same = again.len() == followed.len()
                    && again
                        .values()
                        .all(|f| followed.get(&f.dst).is_some_and(|g| g.newest == f.newest));
                if !same {
                    break;
                }
            }
        }
    }

    /// The source's side of a watch: answer with the volumes whose newest
    /// snapshot (as this node would list it to `peer`) is not the one
    /// named, as soon as there is one, or with none after the wait. A
    /// volume that cannot be served (gone, not exported) counts as
    /// changed: the update that follows names why.
    pub(super) fn serve_watch(
        &self,
        c: &mut Conn,
        peer: &str,
        req_id: u64,
        wait_ms: u32,
        volumes: &[WatchEntry],
    ) -> Result<()> {
        if volumes.len() > WATCH_VOLUMES_MAX {
            let text = format!(
                "a watch of {} volumes (at most {WATCH_VOLUMES_MAX})",
                volumes.len()
            );
            c.send_error(req_id, codes::BAD_FRAME, &text);
            return Err(ReplError::Protocol {
                peer: c.who(),
                detail: text,
            });
        }
        let end = Instant::now() + Duration::from_millis(u64::from(wait_ms.min(WATCH_WAIT_MAX_MS)));
        let poll = WATCH_POLL + WATCH_POLL_PER_VOLUME * volumes.len() as u32;
        loop {
            let changed: Vec<u32> = volumes
                .iter()
                .enumerate()
                .filter(|(_, w)| self.watched_changed(peer, w))
                .map(|(i, _)| i as u32)
                .collect();
            if !changed.is_empty() || self.stopping() || Instant::now() >= end {
                return c.send(&Message::WatchReply { req_id, changed }, &[]);
            }
            std::thread::sleep(poll.min(end.saturating_duration_since(Instant::now())));
        }
    }

    /// Whether the newest snapshot `peer` would be listed of `w`'s volume
    /// (or qtree) is not the one it names.
    fn watched_changed(&self, peer: &str, w: &WatchEntry) -> bool {
        if !self.may_serve(peer, &w.volume) {
            return true;
        }
        let newest = match self.engine.call(Request::NewestSnapshot {
            volume: w.volume.clone(),
        }) {
            Ok(Reply::SnapshotNames(v)) => v.into_iter().next(),
            _ => return true,
        };
        let id = match (newest, &w.qtree) {
            (None, _) => [0; 16],
            (Some(s), None) => *s.id.as_bytes(),
            (Some(s), Some(q)) if content_digest(&s.digests, Some(q)).is_some() => *s.id.as_bytes(),
            // The newest snapshot has no image of the qtree: what the
            // qtree's listing ends with.
            (Some(_), Some(q)) => match self.list_for_peer(&w.volume, Some(q)) {
                Ok(l) => l.last().map_or([0; 16], |s| s.id),
                Err(_) => return true,
            },
        };
        id != w.newest
    }
}

/// A follower thread: [`Replicator::follow_source`] again after each cut
/// connection (with a backoff), until nothing follows its source.
fn follow_loop(weak: Weak<Replicator>, addr: String) {
    let mut fs = FollowState {
        backoff: RETRY_FIRST_MS,
        ..FollowState::default()
    };
    // Start with one update of each relationship: what came while nobody
    // watched (before a restart, or during a failed transfer).
    if let Some(r) = weak.upgrade() {
        let now = r.cfg.env.mono_ms();
        for dst in r.followed_from(&addr).into_keys() {
            fs.now(dst, now, false);
        }
    }
    loop {
        let Some(r) = weak.upgrade() else { return };
        if r.stopping() {
            return;
        }
        match r.follow_source(&addr, &mut fs) {
            Ok(()) => return,
            Err(e) => {
                if !r.stopping() {
                    tracing::warn!(source = %addr, error = %e, retry_ms = fs.backoff, "watch of the source failed; watching again after a pause");
                    r.pause(fs.backoff);
                    fs.backoff = (fs.backoff * 2).min(RETRY_MAX_MS);
                }
            }
        }
    }
}
