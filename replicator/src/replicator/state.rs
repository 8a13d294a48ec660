//! The replicator's state, and the one way it changes.
//!
//! Owns: the four persisted tables (relationships, the lock table,
//! retention policies, export lists) and the memory-only bookkeeping beside them
//! (undelivered lock sets, what each downstream is known to share, when
//! each relationship is due, which relationships have an operation in hand
//! and which snapshots outgoing transfers read).
//!
//! Invariants kept:
//! - The persisted tables are private to this module. Everything else reads
//!   them through [`State::rels`], [`State::locks`] and
//!   [`State::retention`], and changes them only inside a [`Txn`]: the lock
//!   table takes its events at exactly one point ([`Txn::lock`]), and what a
//!   transaction touched reaches the pool at exactly one point
//!   ([`commit`]), before the lock table's actions go back to the caller to
//!   be performed. An action is therefore never performed for a state that
//!   a crash could take back (the caller flushes when it must be durable).
//! - A transaction that fails part way still writes what it changed, so the
//!   pool's tables never lag behind the ones in memory.

use std::collections::{BTreeMap, BTreeSet};

use sluice_engine::shard::EngineHandle;
use sluice_lockproto::{Action, DownKey, Event, LockNode, LockSet};
use uuid::Uuid;

use super::set_attr;
use crate::error::{ReplError, Result};
use crate::types::{keys, Relationship};

pub(super) struct State {
    rels: BTreeMap<String, Relationship>,
    locks: LockNode,
    /// Retention by count: volume -> snapshots to keep.
    retention: BTreeMap<String, usize>,
    /// Export lists: volume -> the peers that may pull it (`*`: any).
    exports: BTreeMap<String, BTreeSet<String>>,
    /// Latest undelivered set per (relationship, upstream node).
    pub(super) pending_sets: BTreeMap<(String, String), LockSet>,
    /// Per downstream relationship: snapshots we know it holds as its bases.
    pub(super) down_shared: BTreeMap<DownKey, BTreeSet<Uuid>>,
    /// Per downstream relationship: the last transfer served to it.
    pub(super) served: BTreeMap<DownKey, crate::types::Served>,
    /// Per relationship: when the next scheduled update is due
    /// ([`crate::env::Env::mono_ms`]).
    pub(super) next_due: BTreeMap<String, u64>,
    /// Per volume: the snapshots retention last kept beyond its count.
    pub(super) retention_kept: BTreeMap<String, Vec<String>>,
    /// Bumped whenever the lock table changes which snapshots are
    /// protected, or by whom (retention's cue to look again).
    pub(super) protection_rev: u64,
    /// Per volume: (snapshot count, `protection_rev`) at the last pass that
    /// deleted nothing and kept only locked snapshots. While both are the
    /// same, another pass would find the same: it is skipped.
    pub(super) retention_settled: BTreeMap<String, (usize, u64)>,
    /// Relationships with an operation in hand (update, resync, break,
    /// delete, retarget): one at a time each.
    pub(super) busy: BTreeSet<String>,
    /// Snapshots an outgoing transfer reads now (global id -> transfers):
    /// no delete takes them.
    pub(super) serving: BTreeMap<Uuid, usize>,
}

impl State {
    pub(super) fn new(
        rels: BTreeMap<String, Relationship>,
        locks: LockNode,
        retention: BTreeMap<String, usize>,
        exports: BTreeMap<String, BTreeSet<String>>,
    ) -> State {
        State {
            rels,
            locks,
            retention,
            exports,
            pending_sets: BTreeMap::new(),
            down_shared: BTreeMap::new(),
            served: BTreeMap::new(),
            next_due: BTreeMap::new(),
            retention_kept: BTreeMap::new(),
            protection_rev: 0,
            retention_settled: BTreeMap::new(),
            busy: BTreeSet::new(),
            serving: BTreeMap::new(),
        }
    }

    /// The relationships, by destination key.
    pub(super) fn rels(&self) -> &BTreeMap<String, Relationship> {
        &self.rels
    }

    /// The lock table (read only: events go through [`Txn::lock`]).
    pub(super) fn locks(&self) -> &LockNode {
        &self.locks
    }

    /// Retention by count: volume -> snapshots to keep.
    pub(super) fn retention(&self) -> &BTreeMap<String, usize> {
        &self.retention
    }

    /// Export lists: volume -> the peers that may pull it.
    pub(super) fn exports(&self) -> &BTreeMap<String, BTreeSet<String>> {
        &self.exports
    }
}

/// The state split into its tables (read only) and its memory-only
/// bookkeeping (to change), for code that needs both at once.
pub(super) struct Parts<'a> {
    pub(super) rels: &'a BTreeMap<String, Relationship>,
    pub(super) locks: &'a LockNode,
    pub(super) pending_sets: &'a mut BTreeMap<(String, String), LockSet>,
    pub(super) next_due: &'a mut BTreeMap<String, u64>,
    pub(super) busy: &'a BTreeSet<String>,
}

impl State {
    pub(super) fn parts(&mut self) -> Parts<'_> {
        Parts {
            rels: &self.rels,
            locks: &self.locks,
            pending_sets: &mut self.pending_sets,
            next_due: &mut self.next_due,
            busy: &self.busy,
        }
    }
}

/// Which persisted tables a transaction touched.
#[derive(Clone, Default)]
struct Dirty {
    /// Relationships (by destination key) changed, added or removed.
    rels: BTreeSet<String>,
    /// The set of relationship keys changed (the index is written).
    rel_index: bool,
    locks: bool,
    retention: bool,
    exports: bool,
}

/// One change of the state: see the module docs.
pub(super) struct Txn<'a> {
    st: &'a mut State,
    now_ms: u64,
    acts: Vec<Action>,
    dirty: Dirty,
}

impl std::ops::Deref for Txn<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        self.st
    }
}

impl Txn<'_> {
    /// Feed one event to the lock table; its actions are returned by
    /// [`commit`] once the table is written. A tick that changed nothing
    /// writes nothing.
    pub(super) fn lock(&mut self, ev: Event) {
        let quiet = matches!(ev, Event::Tick);
        let acts = self.st.locks.handle(self.now_ms, ev);
        if !(quiet && acts.is_empty()) {
            self.dirty.locks = true;
        }
        if acts
            .iter()
            .any(|a| matches!(a, Action::Protected { .. } | Action::Unprotected { .. }))
        {
            self.st.protection_rev = self.st.protection_rev.wrapping_add(1);
        }
        self.acts.extend(acts);
    }

    /// Feed several events, in order.
    pub(super) fn lock_all(&mut self, evs: impl IntoIterator<Item = Event>) {
        for ev in evs {
            self.lock(ev);
        }
    }

    /// One relationship, to change (it is written at commit).
    pub(super) fn rel_mut(&mut self, key: &str) -> Option<&mut Relationship> {
        let r = self.st.rels.get_mut(key)?;
        self.dirty.rels.insert(key.to_string());
        Some(r)
    }

    /// Add (or replace) relationship `key` (written at commit).
    pub(super) fn rel_insert(&mut self, key: String, r: Relationship) {
        self.dirty.rels.insert(key.clone());
        if self.st.rels.insert(key, r).is_none() {
            self.dirty.rel_index = true;
        }
    }

    /// Remove relationship `key` (written at commit).
    pub(super) fn rel_remove(&mut self, key: &str) -> Option<Relationship> {
        let r = self.st.rels.remove(key)?;
        self.dirty.rels.insert(key.to_string());
        self.dirty.rel_index = true;
        Some(r)
    }

    /// The retention policies, to change (written at commit).
    pub(super) fn retention_mut(&mut self) -> &mut BTreeMap<String, usize> {
        self.dirty.retention = true;
        &mut self.st.retention
    }

    /// The export lists, to change (written at commit).
    pub(super) fn exports_mut(&mut self) -> &mut BTreeMap<String, BTreeSet<String>> {
        self.dirty.exports = true;
        &mut self.st.exports
    }

    /// The memory-only bookkeeping, which is never persisted.
    pub(super) fn mem(&mut self) -> &mut State {
        self.st
    }

    /// Write the relationship and lock tables whether touched or not
    /// (start and shutdown).
    pub(super) fn touch_tables(&mut self) {
        self.dirty.rels = self.st.rels.keys().cloned().collect();
        self.dirty.rel_index = true;
        self.dirty.locks = true;
    }
}

/// Run `f` as one transaction on `st`, then write what it touched; returns
/// `f`'s result and the lock table's actions, to be performed by the
/// caller. When `f` fails, what it changed is still written, and its error
/// is returned (the actions of a failed transaction are dropped: they were
/// for a change its caller gives up on, and the lock table re-sends sets on
/// the next change or tick).
#[must_use = "the lock table's actions must be performed: a dropped SendLockSet never reaches the upstream"]
pub(super) fn commit<R>(
    engine: &EngineHandle,
    st: &mut State,
    now_ms: u64,
    f: impl FnOnce(&mut Txn<'_>) -> Result<R>,
) -> Result<(R, Vec<Action>)> {
    let mut t = Txn {
        st,
        now_ms,
        acts: Vec::new(),
        dirty: Dirty::default(),
    };
    let r = f(&mut t);
    let Txn {
        st, acts, dirty, ..
    } = t;
    let saved = save(engine, st, dirty);
    let r = r?;
    saved?;
    Ok((r, acts))
}

fn save(engine: &EngineHandle, st: &State, dirty: Dirty) -> Result<()> {
    let json = |key: &str, v: serde_json::Result<Vec<u8>>| {
        v.map_err(|e| ReplError::Persisted {
            key: key.into(),
            detail: e.to_string(),
        })
    };
    if dirty.locks {
        set_attr(engine, keys::LOCKS, Some(st.locks.to_bytes()?))?;
    }
    // One key per relationship changed; the index only when the set of
    // relationships changed (written after the records it names, so a
    // crash between leaves no index entry without its record); the table
    // of older builds goes with the first index written.
    for key in &dirty.rels {
        let k = format!("{}{key}", keys::RELATIONSHIP_PREFIX);
        let b = match st.rels.get(key) {
            Some(r) => Some(json(&k, serde_json::to_vec(r))?),
            None => None,
        };
        set_attr(engine, &k, b)?;
    }
    if dirty.rel_index {
        let v: Vec<&String> = st.rels.keys().collect();
        let b = json(keys::RELATIONSHIP_INDEX, serde_json::to_vec(&v))?;
        set_attr(engine, keys::RELATIONSHIP_INDEX, Some(b))?;
        set_attr(engine, keys::RELATIONSHIPS, None)?;
    }
    if dirty.retention {
        let b = json(keys::RETENTION, serde_json::to_vec(&st.retention))?;
        set_attr(engine, keys::RETENTION, Some(b))?;
    }
    if dirty.exports {
        let b = json(keys::EXPORTS, serde_json::to_vec(&st.exports))?;
        set_attr(engine, keys::EXPORTS, Some(b))?;
    }
    Ok(())
}
