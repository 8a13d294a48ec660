//! The scheduler and its workers: what runs where.
//!
//! One scheduler thread only decides. Every tick it feeds `Tick` to the
//! lock table (stale leases, renewals) and queues the sets that produces
//! with the undelivered ones, hands every upstream with an undelivered set
//! and a retention pass to the chore workers, and hands the relationships
//! whose `--every` period is due to the transfer workers. It does no peer
//! I/O and never waits for a transfer, a delivery or a retention pass, so a
//! long transfer or a slow upstream cannot hold up renewals, retries,
//! retention or the other relationships.
//!
//! - Transfer workers (`max_transfers` threads): one scheduled update each.
//! - Chore workers ([`CHORE_WORKERS`] threads): lock-set deliveries on a
//!   short connection of their own, and retention passes. An unreachable
//!   upstream holds one of them for at most the peer timeout per attempt;
//!   the others keep delivering to everyone else.
//!
//! Invariants kept:
//! - A relationship is queued or running on the transfer workers at most
//!   once (`Jobs::scheduled`), and is not handed over while another
//!   transfer of it runs (`busy`, e.g. an operator's `mirror update`).
//! - A due relationship that cannot be handed over (all workers taken, or
//!   it is transferring) stays due: its next due time moves only when it is
//!   handed over, and the longest due goes first, on a later tick or to
//!   the first worker that finishes (a worker takes the next due one
//!   itself before it waits on its queue again).
//! - At most one delivery per upstream is queued or running
//!   (`Jobs::delivering`); it sends the newest undelivered set when it runs.
//! - At most one retention pass is queued or running (`Jobs::retaining`).
//! - The thread count is fixed at start (1 + `max_transfers` +
//!   [`CHORE_WORKERS`]), plus one follower per followed source address
//!   (`follow.rs`, at most `max_follow_sources`), started by the tick that
//!   first sees the source; queues are bounded; nothing else is spawned.
//! - Shutdown: the scheduler exits, dropping its ends of the queues; each
//!   worker finishes (or, once stopping, skips) what it holds and exits;
//!   `shutdown` joins them all before it persists the tables.

use super::*;

/// Threads for lock-set deliveries and retention passes.
pub(super) const CHORE_WORKERS: usize = 4;
/// Most chores queued at once (one per upstream plus a retention pass); a
/// chore that does not fit waits for the next tick.
const CHORES_QUEUED_MAX: usize = 1024;

/// Work for the chore workers.
pub(super) enum Chore {
    /// Deliver the newest undelivered set of this upstream.
    Deliver(String),
    /// One pass of every retention policy.
    Retention,
}

/// The scheduler thread, its workers and what they have in hand.
#[derive(Default)]
pub(super) struct Jobs {
    /// Relationships queued or running on the transfer workers.
    pub(super) scheduled: Mutex<BTreeSet<String>>,
    /// Upstreams with a delivery queued or running on the chore workers.
    delivering: Mutex<BTreeSet<String>>,
    /// A retention pass is queued or running.
    retaining: AtomicBool,
    scheduler: Mutex<Option<JoinHandle<()>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

/// The scheduler's ends of the worker queues; dropping them ends the workers.
struct Lanes {
    transfers: ChanTx<String>,
    chores: ChanTx<Chore>,
}

/// Removes a key from a set of claims when the job holding it ends.
pub(super) struct Claim<'a> {
    pub(super) set: &'a Mutex<BTreeSet<String>>,
    pub(super) key: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        lock(self.set).remove(&self.key);
    }
}

/// Clears a flag when the job holding it ends.
struct Flag<'a>(&'a AtomicBool);

impl Drop for Flag<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name)
        .spawn(f)
        .map_err(|e| ReplError::Io {
            peer: "local".into(),
            op: "spawn a replicator thread",
            source: e,
        })
}

/// Start the workers, then the scheduler (which owns the queues' senders).
pub(super) fn start_threads(r: &Arc<Replicator>, stop: ChanRx<()>) -> Result<()> {
    let n = r.cfg.max_transfers;
    if n == 0 || n > TRANSFERS_MAX {
        return Err(ReplError::Invalid(format!(
            "max_transfers {n} must be 1..={TRANSFERS_MAX}"
        )));
    }
    let (transfers, transfer_rx) = bounded::<String>(n);
    let (chores, chore_rx) = bounded::<Chore>(CHORES_QUEUED_MAX);
    let node = &r.cfg.node_name;
    let mut workers = Vec::with_capacity(n + CHORE_WORKERS);
    for i in 0..n {
        let (weak, rx) = (Arc::downgrade(r), transfer_rx.clone());
        workers.push(spawn(format!("sluice-xfer-{node}-{i}"), move || {
            while let Ok(key) = rx.recv() {
                let Some(r) = weak.upgrade() else { return };
                r.run_scheduled(key);
                // Then whatever else is due, without waiting for a tick:
                // a tick hands out at most one job per worker.
                while let Some((key, _)) = r.claim_due() {
                    if r.stopping() {
                        lock(&r.jobs.scheduled).remove(&key);
                        break;
                    }
                    r.run_scheduled(key);
                }
            }
        })?);
    }
    for i in 0..CHORE_WORKERS {
        let (weak, rx) = (Arc::downgrade(r), chore_rx.clone());
        workers.push(spawn(format!("sluice-chore-{node}-{i}"), move || {
            while let Ok(chore) = rx.recv() {
                let Some(r) = weak.upgrade() else { return };
                r.run_chore(chore);
            }
        })?);
    }
    *lock(&r.jobs.workers) = workers;
    let weak = Arc::downgrade(r);
    let tick = r.cfg.tick;
    let lanes = Lanes { transfers, chores };
    let h = spawn(format!("sluice-repl-{node}"), move || {
        scheduler(weak, stop, tick, lanes)
    })?;
    *lock(&r.jobs.scheduler) = Some(h);
    Ok(())
}

fn scheduler(r: Weak<Replicator>, stop: ChanRx<()>, tick: Duration, lanes: Lanes) {
    loop {
        match stop.recv_timeout(tick) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {}
        }
        let Some(r) = r.upgrade() else { return };
        if r.stopping() {
            return;
        }
        r.tick(Some(&lanes));
        r.start_followers();
    }
}

/// Keep `set` as the one to deliver for `key` (relationship, upstream
/// node) unless a newer one waits.
pub(super) fn queue_set(
    pending: &mut BTreeMap<(String, String), LockSet>,
    key: (String, String),
    set: LockSet,
) {
    if pending
        .get(&key)
        .is_none_or(|p| p.generation <= set.generation)
    {
        pending.insert(key, set);
    }
}

impl Replicator {
    /// Join the scheduler, then the workers (once the scheduler is gone
    /// their queues are closed). Called by `shutdown` after `stop` is set.
    pub(super) fn join_threads(&self) {
        self.join_followers();
        let me = std::thread::current().id();
        let h = lock(&self.jobs.scheduler).take();
        if let Some(h) = h {
            if h.thread().id() != me && h.join().is_err() {
                tracing::error!("replicator scheduler thread panicked");
            }
        }
        let workers = std::mem::take(&mut *lock(&self.jobs.workers));
        for h in workers {
            if h.thread().id() != me && h.join().is_err() {
                tracing::error!("replicator worker thread panicked");
            }
        }
    }

    /// One whole scheduler tick in the caller's thread, for a replicator
    /// started with `background: false` (a simulation): the same decisions
    /// as the scheduler thread's tick, and every job it hands out (set
    /// deliveries, the retention pass, due updates, in that order) run to
    /// the end before this returns.
    pub fn tick_now(&self) {
        self.tick(None);
    }

    /// One scheduler tick: decide and hand out, never wait (module docs).
    /// Without lanes every job runs here, in order.
    fn tick(&self, lanes: Option<&Lanes>) {
        match self.lock_events(vec![Event::Tick]) {
            Ok(acts) => {
                // Renewals join the undelivered sets (delivered by the chore
                // workers); what is left only logs and counts.
                let mut rest = Vec::new();
                {
                    let mut st = lock(&self.st);
                    for a in acts {
                        match a {
                            Action::SendLockSet {
                                relationship,
                                upstream,
                                set,
                            } => queue_set(&mut st.pending_sets, (relationship, upstream), set),
                            other => rest.push(other),
                        }
                    }
                }
                self.perform(rest, None);
            }
            Err(e) => tracing::error!(error = %e, "lock tick failed"),
        }
        if self.stopping() {
            return;
        }
        self.hand_out_sets(lanes);
        if !self.jobs.retaining.swap(true, Ordering::SeqCst) {
            match lanes {
                None => self.run_chore(Chore::Retention),
                Some(l) => {
                    if l.chores.try_send(Chore::Retention).is_err() {
                        self.jobs.retaining.store(false, Ordering::SeqCst);
                    }
                }
            }
        }
        self.hand_out_transfers(lanes);
    }

    /// Every upstream with an undelivered set and no delivery in hand.
    fn hand_out_sets(&self, lanes: Option<&Lanes>) {
        let ups: Vec<String> = {
            let mut st = lock(&self.st);
            let Parts {
                pending_sets,
                locks,
                ..
            } = st.parts();
            pending_sets.retain(|(rel, up), _| locks.upstream_of(rel) == Some(up.as_str()));
            let ups: BTreeSet<String> = pending_sets.keys().map(|(_, up)| up.clone()).collect();
            ups.into_iter().collect()
        };
        for u in ups {
            if !lock(&self.jobs.delivering).insert(u.clone()) {
                continue;
            }
            let Some(lanes) = lanes else {
                self.run_chore(Chore::Deliver(u));
                continue;
            };
            if lanes.chores.try_send(Chore::Deliver(u.clone())).is_err() {
                // Queue full: this and the rest go on a later tick.
                lock(&self.jobs.delivering).remove(&u);
                break;
            }
        }
    }

    /// Due relationships, longest due first, while a transfer worker is
    /// free (without lanes each runs here, in turn).
    fn hand_out_transfers(&self, lanes: Option<&Lanes>) {
        while !self.stopping() {
            let Some((key, was_due)) = self.claim_due() else {
                return;
            };
            let Some(l) = lanes else {
                self.run_scheduled(key);
                continue;
            };
            if l.transfers.try_send(key.clone()).is_err() {
                // The workers are gone (shutdown): it stays due.
                lock(&self.jobs.scheduled).remove(&key);
                lock(&self.st).next_due.insert(key, was_due);
                return;
            }
        }
    }

    /// Claim the longest due relationship that no transfer holds, if a
    /// transfer worker is free: it joins `Jobs::scheduled` and its next due
    /// time moves one period on. Returns it with the due time it had.
    fn claim_due(&self) -> Option<(String, u64)> {
        let now = self.cfg.env.mono_ms();
        let mut scheduled = lock(&self.jobs.scheduled);
        if scheduled.len() >= self.cfg.max_transfers {
            return None; // every worker is taken: the rest stay due
        }
        let mut st = lock(&self.st);
        let Parts {
            rels,
            next_due,
            busy,
            ..
        } = st.parts();
        next_due.retain(|k, _| rels.contains_key(k));
        let mut pick: Option<(u64, &str, u64)> = None;
        for r in rels.values().filter(|r| !r.broken) {
            let Some(every) = r.every_ms else { continue };
            let next = *next_due
                .entry(r.dst.clone())
                .or_insert_with(|| now.saturating_add(every));
            // Transferring (scheduled, or an operator's update): stays due.
            if next > now || scheduled.contains(&r.dst) || busy.contains(&r.dst) {
                continue;
            }
            if pick.is_none_or(|(n, k, _)| (next, r.dst.as_str()) < (n, k)) {
                pick = Some((next, &r.dst, every));
            }
        }
        let (was_due, key, every) = pick?;
        let key = key.to_string();
        scheduled.insert(key.clone());
        next_due.insert(key.clone(), now.saturating_add(every));
        Some((key, was_due))
    }

    /// A transfer worker's job: one scheduled update of `key`.
    fn run_scheduled(&self, key: String) {
        let _claim = Claim {
            set: &self.jobs.scheduled,
            key: key.clone(),
        };
        if self.stopping() {
            return;
        }
        match self.transfer(&key, Mode::Update, &|_| {}) {
            Ok(_) => {}
            Err(ReplError::Busy(_)) => {
                tracing::info!(dst = %key, "scheduled update skipped: another transfer of it started first")
            }
            Err(e) => tracing::warn!(dst = %key, error = %e, "scheduled update failed"),
        }
    }

    /// A chore worker's job.
    fn run_chore(&self, chore: Chore) {
        match chore {
            Chore::Deliver(upstream) => {
                let _claim = Claim {
                    set: &self.jobs.delivering,
                    key: upstream.clone(),
                };
                if self.stopping() {
                    return;
                }
                // Every undelivered set of this upstream, one relationship
                // after the other, on this worker.
                self.deliver_pending(|_, _, up| up == upstream);
            }
            Chore::Retention => {
                let _flag = Flag(&self.jobs.retaining);
                if !self.stopping() {
                    self.apply_retention();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(generation: u64) -> LockSet {
        LockSet {
            sender: "b".into(),
            relationship: "v".into(),
            volume: "v".into(),
            generation,
            lease_ms: 1000,
            locks: Vec::new(),
            gone_acks: Vec::new(),
        }
    }

    #[test]
    fn a_queued_set_never_replaces_a_newer_one() {
        let mut pending = BTreeMap::new();
        let k = || ("v".to_string(), "a".to_string());
        queue_set(&mut pending, k(), set(5));
        queue_set(&mut pending, k(), set(4));
        assert_eq!(pending[&k()].generation, 5);
        queue_set(&mut pending, k(), set(6));
        assert_eq!(pending[&k()].generation, 6);
    }
}
