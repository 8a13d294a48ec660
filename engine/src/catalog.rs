//! The catalog: what a region holds (volumes, their namespaces and
//! snapshots, the pool attributes) and how it reaches the device.
//!
//! From format 5 on the catalog is a log of records (docs/FORMAT.md,
//! "Catalog"): a consistency point appends the records of what changed
//! since the previous one -- a volume's head when its roots or counts
//! moved, one record per snapshot created or deleted, one per attribute
//! set or cleared -- so a snapshot create or delete writes metadata in
//! proportion to that change, not to the snapshots that exist. When the
//! log has grown past twice its newest full image (plus a slack), a CP
//! writes a full image instead and frees the old log: amortized O(changed)
//! per CP, and a mount reads at most about three images' worth.
//!
//! This module is the log's sans-IO half: the in-memory records, what was
//! already logged, the record codec, the replay, and the reading of the
//! format 1 to 4 blob. The pool does the block I/O.
//!
//! Invariants:
//! - A volume not marked `dirty` encodes to the head its last logged record
//!   holds (`Logged::head`, a hash): every writable access to a volume goes
//!   through `vol_at_mut` (pool.rs), which marks it; the pool's
//!   `check_invariants` checks the rest.
//! - A volume's snapshots with `gen > Logged::snaps_gen` are not logged yet;
//!   those at or below are, and a removed one's uuid waits in
//!   `Logged::gone` for its record. Snapshot generations of a volume
//!   increase, oldest first (one snapshot per CP at most).
//! - The records a CP builds mark the state logged before its blocks are
//!   written: a CP that fails poisons the pool, which then never takes
//!   another one (a reopen replays what is durable).

use crate::error::{Error, Result};
use crate::format::*;
use crate::tree::Tree;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use uuid::Uuid;

/// Bytes of a catalog block's payload after its `ptr` and `len` fields.
pub(crate) const PIECE: usize = PAYLOAD - 20;
/// Log blocks allowed past twice the newest image before a CP compacts.
pub(crate) const LOG_SLACK: u64 = 64;

/// Record tags of the format-5 log.
const REC_NEXT_VOLUME_ID: u8 = 1;
const REC_VOLUME: u8 = 2;
const REC_VOLUME_GONE: u8 = 3;
const REC_SNAPSHOT: u8 = 4;
const REC_SNAPSHOT_GONE: u8 = 5;
const REC_ATTR: u8 = 6;
const REC_ATTR_GONE: u8 = 7;

#[derive(Debug, Clone)]
pub(crate) struct Ns {
    pub(crate) name: Option<String>,
    pub(crate) size: u64,
    pub(crate) tree: Tree,
    pub(crate) digest: u128,
    /// Clients may not write or trim this namespace (a qtree mirror's
    /// destination); replica writes may. The volume's own space uses the
    /// volume's flag instead ([`Vol::ro`]), so this stays false there.
    pub(crate) ro: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct Snap {
    pub(crate) id: Uuid,
    pub(crate) name: String,
    pub(crate) gen: u64,
    pub(crate) created: u64,
    pub(crate) referenced: u64,
    pub(crate) plane: Ptr,
    pub(crate) ns: Vec<(Option<String>, Ptr, u128)>,
}

impl Snap {
    /// Its name, ids, time and digests (no block counts).
    pub(crate) fn name_info(&self) -> crate::api::SnapshotName {
        crate::api::SnapshotName {
            name: self.name.clone(),
            id: self.id,
            gen: self.gen,
            created_unix_ms: self.created,
            digests: self.ns.iter().map(|(n, _, d)| (n.clone(), *d)).collect(),
        }
    }
}

/// What a clone was made from: snapshot `snap` of volume `vol` (a local
/// id) of this pool, whose plane root is `plane` (a snapshot's plane never
/// changes). That plane is the clone's oldest image: every block it holds
/// stays held while the clone exists, and the snapshot cannot be deleted
/// meanwhile ([`Error::HasClones`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Origin {
    pub(crate) vol: u32,
    pub(crate) snap: Uuid,
    pub(crate) plane: Ptr,
}

/// What of a volume the catalog log already holds.
#[derive(Debug, Clone, Default)]
pub(crate) struct Logged {
    /// xxh3 of the volume's newest head record in the log; `None`: none.
    pub(crate) head: Option<u64>,
    /// The volume may differ from that head (a writable access since).
    pub(crate) dirty: bool,
    /// Snapshots up to this generation are logged.
    pub(crate) snaps_gen: u64,
    /// Logged snapshots deleted since, to log as gone.
    pub(crate) gone: Vec<Uuid>,
}

#[derive(Debug, Clone)]
pub(crate) struct Vol {
    pub(crate) id: u32,
    pub(crate) name: String,
    /// Clients may not write or trim any namespace of the volume (a volume
    /// mirror's destination).
    pub(crate) ro: bool,
    pub(crate) ns: Vec<Ns>,
    pub(crate) plane: Tree,
    pub(crate) live_count: u64,
    /// Oldest first.
    pub(crate) snaps: Vec<Snap>,
    /// A clone's origin; `None` for a volume created empty.
    pub(crate) origin: Option<Origin>,
    pub(crate) logged: Logged,
    /// Snapshot uuid -> its generation (snapshots are in generation order,
    /// so a binary search finds it): lookups by global id in O(log n).
    pub(crate) ids: HashMap<Uuid, u64>,
}

impl Vol {
    /// A volume of these head fields, with no snapshot.
    pub(crate) fn new(
        id: u32,
        name: String,
        ns: Vec<Ns>,
        plane: Tree,
        live_count: u64,
        origin: Option<Origin>,
    ) -> Vol {
        Vol {
            id,
            name,
            ro: false,
            ns,
            plane,
            live_count,
            snaps: Vec::new(),
            origin,
            logged: Logged::default(),
            ids: HashMap::new(),
        }
    }

    /// Add `s` as the newest snapshot.
    pub(crate) fn push_snap(&mut self, s: Snap) {
        self.ids.insert(s.id, s.gen);
        self.snaps.push(s);
    }

    /// Take snapshot `si` out of the volume, noting it for the log.
    pub(crate) fn remove_snap(&mut self, si: usize) -> Option<Snap> {
        if si >= self.snaps.len() {
            return None;
        }
        let s = self.snaps.remove(si);
        self.ids.remove(&s.id);
        if s.gen <= self.logged.snaps_gen {
            self.logged.gone.push(s.id);
        }
        Some(s)
    }

    /// The newest snapshots, not logged yet (oldest first).
    pub(crate) fn unlogged_snaps(&self) -> &[Snap] {
        let logged = self
            .snaps
            .partition_point(|s| s.gen <= self.logged.snaps_gen);
        self.snaps.get(logged..).unwrap_or_default()
    }

    /// The index of the snapshot whose global id is `id`.
    pub(crate) fn snap_by_id(&self, id: &Uuid) -> Option<usize> {
        let g = self.ids.get(id)?;
        self.snaps.binary_search_by_key(g, |s| s.gen).ok()
    }

    /// The id index agrees with the snapshot list (the pool's invariant
    /// check).
    pub(crate) fn ids_agree(&self) -> bool {
        self.ids.len() == self.snaps.len()
            && self
                .snaps
                .iter()
                .enumerate()
                .all(|(i, s)| self.snap_by_id(&s.id) == Some(i))
    }
}

/// A region's catalog as read at mount.
pub(crate) struct Loaded {
    pub(crate) next_vol_id: u32,
    pub(crate) vols: Vec<Vol>,
    pub(crate) attrs: BTreeMap<String, Vec<u8>>,
}

/// The catalog log of a region: where it is and what waits for the next CP.
#[derive(Debug, Default)]
pub(crate) struct Log {
    /// Every block of the log (or of the older format's chain), oldest first.
    pub(crate) blocks: Vec<u64>,
    /// The newest block: what the superblock points at.
    pub(crate) head: Ptr,
    /// Blocks of the newest full image.
    pub(crate) image_blocks: u64,
    /// No format-5 log yet (a new pool, or one in an older format): the
    /// next CP writes a full image.
    pub(crate) legacy: bool,
    /// `next_vol_id` as logged.
    pub(crate) next_vol_id: u32,
    /// Ids of logged volumes deleted since, to log as gone.
    pub(crate) gone_vols: Vec<u32>,
    /// Attribute keys set or cleared since.
    pub(crate) attrs_dirty: BTreeSet<String>,
}

/// Blocks that `bytes` of records take.
pub(crate) fn blocks_for(bytes: usize) -> u64 {
    bytes.div_ceil(PIECE).max(1) as u64
}

fn str_len(s: &str) -> usize {
    4 + s.len()
}

/// Length of a volume's head record.
fn head_len(v: &Vol) -> usize {
    let ns: usize =
        v.ns.iter()
            .map(|n| str_len(n.name.as_deref().unwrap_or("")) + 8 + 16 + 16 + 1)
            .sum();
    1 + 4 + str_len(&v.name) + 1 + 8 + 16 + 4 + ns + 1 + if v.origin.is_some() { 20 } else { 0 }
}

/// Length of a snapshot record.
fn snap_len(s: &Snap) -> usize {
    let ns: usize =
        s.ns.iter()
            .map(|(n, _, _)| str_len(n.as_deref().unwrap_or("")) + 16 + 16)
            .sum();
    1 + 4 + 16 + str_len(&s.name) + 24 + 16 + 4 + ns
}

fn write_head(w: &mut Writer, v: &Vol) {
    w.u8(REC_VOLUME);
    w.u32(v.id);
    w.str(&v.name);
    w.u8(v.ro as u8);
    w.u64(v.live_count);
    w.ptr(v.plane.root);
    w.u32(v.ns.len() as u32);
    for n in &v.ns {
        w.str(n.name.as_deref().unwrap_or(""));
        w.u64(n.size);
        w.ptr(n.tree.root);
        w.u128(n.digest);
        w.u8(if n.ro { NS_FLAG_READ_ONLY } else { 0 });
    }
    write_origin(w, v.origin);
}

fn write_origin(w: &mut Writer, origin: Option<Origin>) {
    match origin {
        None => w.u8(0),
        Some(o) => {
            w.u8(1);
            w.u32(o.vol);
            w.bytes(o.snap.as_bytes());
        }
    }
}

fn write_snap(w: &mut Writer, vol: u32, s: &Snap) {
    w.u8(REC_SNAPSHOT);
    w.u32(vol);
    write_snap_body(w, s);
}

fn write_snap_body(w: &mut Writer, s: &Snap) {
    w.bytes(s.id.as_bytes());
    w.str(&s.name);
    w.u64(s.gen);
    w.u64(s.created);
    w.u64(s.referenced);
    w.ptr(s.plane);
    w.u32(s.ns.len() as u32);
    for (n, root, d) in &s.ns {
        w.str(n.as_deref().unwrap_or(""));
        w.ptr(*root);
        w.u128(*d);
    }
}

fn write_attr(w: &mut Writer, key: &str, value: Option<&Vec<u8>>) {
    match value {
        Some(v) => {
            w.u8(REC_ATTR);
            w.str(key);
            w.blob(v);
        }
        None => {
            w.u8(REC_ATTR_GONE);
            w.str(key);
        }
    }
}

fn head_hash(v: &Vol) -> u64 {
    let mut w = Writer::default();
    write_head(&mut w, v);
    xxhash_rust::xxh3::xxh3_64(&w.buf)
}

/// The volume differs from its newest logged head (the pool's invariant
/// check: a volume not marked dirty must not).
pub(crate) fn head_changed(v: &Vol) -> bool {
    v.logged.head != Some(head_hash(v))
}

impl Log {
    /// The log of a new pool, or of one whose catalog is in an older format.
    pub(crate) fn legacy() -> Log {
        Log {
            legacy: true,
            ..Log::default()
        }
    }

    /// Blocks the next CP's catalog write may take (part of the CP
    /// reserve): the records of what changed, or, while the log is not
    /// yet in format 5, a full image (at most about the older chain plus
    /// a tenth). A compaction of a format-5 log is taken only when the
    /// free space allows it (the pool checks), so it needs no reserve.
    /// `touched`: every volume that changed since the last CP (no other
    /// has anything to log).
    pub(crate) fn reserve<'a>(
        &self,
        touched: impl Iterator<Item = &'a Vol>,
        attrs: &BTreeMap<String, Vec<u8>>,
    ) -> u64 {
        if self.legacy {
            let chain = self.blocks.len() as u64;
            return 2 * chain + chain / 8 + 8;
        }
        let mut bytes = 5 + 5 * self.gone_vols.len();
        for v in touched {
            if v.logged.dirty || v.logged.head.is_none() {
                bytes += head_len(v);
            }
            bytes += 21 * v.logged.gone.len();
            bytes += v.unlogged_snaps().iter().map(snap_len).sum::<usize>();
        }
        for k in &self.attrs_dirty {
            bytes += 1 + str_len(k) + attrs.get(k).map_or(0, |v| 4 + v.len());
        }
        blocks_for(bytes) + 2
    }

    /// The records of everything changed since the last CP, marking it
    /// logged (empty: nothing to write). `touched`: the indices of every
    /// volume changed or created since, in `vols` order.
    pub(crate) fn delta(
        &mut self,
        vols: &mut [Vol],
        touched: &BTreeSet<usize>,
        attrs: &BTreeMap<String, Vec<u8>>,
        next_vol_id: u32,
    ) -> Vec<u8> {
        let mut w = Writer::default();
        if next_vol_id != self.next_vol_id {
            w.u8(REC_NEXT_VOLUME_ID);
            w.u32(next_vol_id);
            self.next_vol_id = next_vol_id;
        }
        for id in self.gone_vols.drain(..) {
            w.u8(REC_VOLUME_GONE);
            w.u32(id);
        }
        for &i in touched {
            let Some(v) = vols.get_mut(i) else { continue };
            if v.logged.dirty || v.logged.head.is_none() {
                let at = w.buf.len();
                write_head(&mut w, v);
                let h = w.buf.get(at..).map(xxhash_rust::xxh3::xxh3_64);
                if h == v.logged.head {
                    w.buf.truncate(at);
                }
                v.logged.head = h;
                v.logged.dirty = false;
            }
            for u in v.logged.gone.drain(..) {
                w.u8(REC_SNAPSHOT_GONE);
                w.u32(v.id);
                w.bytes(u.as_bytes());
            }
            for s in v.unlogged_snaps() {
                write_snap(&mut w, v.id, s);
            }
            if let Some(s) = v.snaps.last() {
                v.logged.snaps_gen = v.logged.snaps_gen.max(s.gen);
            }
        }
        for k in std::mem::take(&mut self.attrs_dirty) {
            write_attr(&mut w, &k, attrs.get(&k));
        }
        w.buf
    }

    /// A full image of the catalog as records, marking everything logged.
    pub(crate) fn image(
        &mut self,
        vols: &mut [Vol],
        attrs: &BTreeMap<String, Vec<u8>>,
        next_vol_id: u32,
    ) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(REC_NEXT_VOLUME_ID);
        w.u32(next_vol_id);
        self.next_vol_id = next_vol_id;
        self.gone_vols.clear();
        self.attrs_dirty.clear();
        for v in vols.iter_mut() {
            let at = w.buf.len();
            write_head(&mut w, v);
            v.logged.head = w.buf.get(at..).map(xxhash_rust::xxh3::xxh3_64);
            v.logged.dirty = false;
            v.logged.gone.clear();
            for s in &v.snaps {
                write_snap(&mut w, v.id, s);
            }
            v.logged.snaps_gen = v.snaps.last().map_or(0, |s| s.gen);
        }
        for (k, v) in attrs {
            write_attr(&mut w, k, Some(v));
        }
        w.buf
    }

    /// A logged volume `v` is deleted.
    pub(crate) fn volume_gone(&mut self, v: &Vol) {
        if v.logged.head.is_some() {
            self.gone_vols.push(v.id);
        }
    }
}

fn corrupt(pba: u64, reason: String) -> Error {
    Error::CorruptMetadata {
        pba,
        kind: "catalog",
        reason,
    }
}

/// A volume's head fields as formats 1 to 5 encode them, up to its
/// namespaces (the snapshot table and origin follow in 1 to 4).
fn read_head(r: &mut Reader, version: u32, pba: u64) -> Result<Vol> {
    let id = r.u32()?;
    let name = r.str()?;
    let ro = r.u8()? != 0;
    let live_count = r.u64()?;
    let plane = Tree::plane(r.ptr()?);
    let nns = r.u32()?;
    let mut ns = Vec::new();
    for _ in 0..nns {
        let n = r.str()?;
        let size = r.u64()?;
        let root = r.ptr()?;
        let digest = r.u128()?;
        let flags = if version >= NS_FLAGS_SINCE {
            r.u8()?
        } else {
            0
        };
        if flags & !NS_FLAG_READ_ONLY != 0 {
            return Err(corrupt(
                pba,
                format!("namespace {name}/{n}: unknown flags {flags:#04x}"),
            ));
        }
        ns.push(Ns {
            name: if n.is_empty() { None } else { Some(n) },
            size,
            tree: Tree::map(root),
            digest,
            ro: flags & NS_FLAG_READ_ONLY != 0,
        });
    }
    let mut v = Vol::new(id, name, ns, plane, live_count, None);
    v.ro = ro;
    Ok(v)
}

fn read_snap(r: &mut Reader) -> Result<Snap> {
    let mut u = [0u8; 16];
    u.copy_from_slice(r.take(16)?);
    let name = r.str()?;
    let gen = r.u64()?;
    let created = r.u64()?;
    let referenced = r.u64()?;
    let plane = r.ptr()?;
    let k = r.u32()?;
    let mut ns = Vec::new();
    for _ in 0..k {
        let n = r.str()?;
        let root = r.ptr()?;
        let d = r.u128()?;
        ns.push((if n.is_empty() { None } else { Some(n) }, root, d));
    }
    Ok(Snap {
        id: Uuid::from_bytes(u),
        name,
        gen,
        created,
        referenced,
        plane,
        ns,
    })
}

/// A volume's origin (format 4 on); its plane is learned once every
/// volume is read ([`resolve_origins`]).
fn read_origin(r: &mut Reader, name: &str, pba: u64) -> Result<Option<Origin>> {
    match r.u8()? {
        0 => Ok(None),
        1 => {
            let vol = r.u32()?;
            let mut u = [0u8; 16];
            u.copy_from_slice(r.take(16)?);
            Ok(Some(Origin {
                vol,
                snap: Uuid::from_bytes(u),
                plane: Ptr::default(),
            }))
        }
        other => Err(corrupt(
            pba,
            format!("volume {name}: origin tag {other} (0 or 1)"),
        )),
    }
}

/// Decode the catalog blob of formats 1 to 4 (one blob, rewritten whole at
/// each CP).
pub(crate) fn decode_blob(blob: &[u8], version: u32, pba: u64) -> Result<Loaded> {
    let mut r = Reader::new(blob, pba, "catalog");
    let next_vol_id = r.u32()?;
    let nvol = r.u32()?;
    let mut vols = Vec::new();
    for _ in 0..nvol {
        let mut v = read_head(&mut r, version, pba)?;
        let nsnap = r.u32()?;
        for _ in 0..nsnap {
            v.push_snap(read_snap(&mut r)?);
        }
        if version >= ORIGIN_SINCE {
            v.origin = read_origin(&mut r, &v.name, pba)?;
        }
        vols.push(v);
    }
    let mut attrs = BTreeMap::new();
    let nattr = r.u32()?;
    for _ in 0..nattr {
        let k = r.str()?;
        let v = r.blob()?;
        attrs.insert(k, v);
    }
    resolve_origins(&mut vols, pba)?;
    Ok(Loaded {
        next_vol_id,
        vols,
        attrs,
    })
}

/// A volume while the log is replayed: its snapshots by the order they
/// were added, `None` once deleted, and where each uuid is.
struct ReplayVol {
    vol: Vol,
    snaps: Vec<Option<Snap>>,
    at: HashMap<Uuid, usize>,
    newest_gen: u64,
}

/// Replay a format-5 log (`stream`: the payloads of its blocks, oldest
/// first, concatenated) into the catalog it describes, every volume marked
/// logged as replayed.
pub(crate) fn replay(stream: &[u8], pba: u64) -> Result<Loaded> {
    let mut r = Reader::new(stream, pba, "catalog");
    let mut next_vol_id = 0;
    let mut vols: Vec<Option<ReplayVol>> = Vec::new();
    let mut by_id: HashMap<u32, usize> = HashMap::new();
    let mut attrs = BTreeMap::new();
    let missing = |id: u32| {
        corrupt(
            pba,
            format!("a record names volume id {id}, not in the log"),
        )
    };
    while !r.is_empty() {
        match r.u8()? {
            REC_NEXT_VOLUME_ID => next_vol_id = r.u32()?,
            REC_VOLUME => {
                let mut head = read_head(&mut r, FORMAT_VERSION, pba)?;
                head.origin = read_origin(&mut r, &head.name, pba)?;
                match by_id
                    .get(&head.id)
                    .and_then(|&i| vols.get_mut(i))
                    .and_then(Option::as_mut)
                {
                    Some(rv) => rv.vol = head,
                    None => {
                        by_id.insert(head.id, vols.len());
                        vols.push(Some(ReplayVol {
                            vol: head,
                            snaps: Vec::new(),
                            at: HashMap::new(),
                            newest_gen: 0,
                        }));
                    }
                }
            }
            REC_VOLUME_GONE => {
                let id = r.u32()?;
                let i = by_id.remove(&id).ok_or_else(|| missing(id))?;
                if let Some(slot) = vols.get_mut(i) {
                    *slot = None;
                }
            }
            REC_SNAPSHOT => {
                let id = r.u32()?;
                let s = read_snap(&mut r)?;
                let rv = by_id
                    .get(&id)
                    .and_then(|&i| vols.get_mut(i))
                    .and_then(Option::as_mut)
                    .ok_or_else(|| missing(id))?;
                if s.gen <= rv.newest_gen {
                    return Err(corrupt(
                        pba,
                        format!(
                            "volume {}: snapshot {} of generation {} after one of {}",
                            rv.vol.name, s.name, s.gen, rv.newest_gen
                        ),
                    ));
                }
                rv.newest_gen = s.gen;
                rv.at.insert(s.id, rv.snaps.len());
                rv.snaps.push(Some(s));
            }
            REC_SNAPSHOT_GONE => {
                let id = r.u32()?;
                let mut u = [0u8; 16];
                u.copy_from_slice(r.take(16)?);
                let u = Uuid::from_bytes(u);
                let rv = by_id
                    .get(&id)
                    .and_then(|&i| vols.get_mut(i))
                    .and_then(Option::as_mut)
                    .ok_or_else(|| missing(id))?;
                let k = rv.at.remove(&u).ok_or_else(|| {
                    corrupt(
                        pba,
                        format!(
                            "volume {}: snapshot {u} deleted, not in the log",
                            rv.vol.name
                        ),
                    )
                })?;
                if let Some(slot) = rv.snaps.get_mut(k) {
                    *slot = None;
                }
            }
            REC_ATTR => {
                let k = r.str()?;
                let v = r.blob()?;
                attrs.insert(k, v);
            }
            REC_ATTR_GONE => {
                let k = r.str()?;
                attrs.remove(&k);
            }
            other => return Err(corrupt(pba, format!("unknown record tag {other}"))),
        }
    }
    let mut out = Vec::with_capacity(by_id.len());
    for rv in vols.into_iter().flatten() {
        let mut v = rv.vol;
        for s in rv.snaps.into_iter().flatten() {
            v.push_snap(s);
        }
        v.logged = Logged {
            head: Some(head_hash(&v)),
            dirty: false,
            snaps_gen: rv.newest_gen,
            gone: Vec::new(),
        };
        out.push(v);
    }
    resolve_origins(&mut out, pba)?;
    Ok(Loaded {
        next_vol_id,
        vols: out,
        attrs,
    })
}

/// Fill in each clone's origin plane from the snapshot it names.
fn resolve_origins(vols: &mut [Vol], pba: u64) -> Result<()> {
    let planes: HashMap<(u32, Uuid), Ptr> = vols
        .iter()
        .flat_map(|v| v.snaps.iter().map(move |s| ((v.id, s.id), s.plane)))
        .collect();
    for v in vols.iter_mut() {
        let name = v.name.clone();
        if let Some(o) = &mut v.origin {
            o.plane = *planes.get(&(o.vol, o.snap)).ok_or_else(|| {
                corrupt(
                    pba,
                    format!(
                        "clone {name}: its origin (volume id {}, snapshot {}) is missing",
                        o.vol, o.snap
                    ),
                )
            })?;
        }
    }
    Ok(())
}

/// Length of a full image of the catalog (what [`Log::image`] writes).
pub(crate) fn image_len(vols: &[Vol], attrs: &BTreeMap<String, Vec<u8>>) -> usize {
    let v: usize = vols
        .iter()
        .map(|v| head_len(v) + v.snaps.iter().map(snap_len).sum::<usize>())
        .sum();
    let a: usize = attrs
        .iter()
        .map(|(k, v)| 1 + str_len(k) + 4 + v.len())
        .sum();
    5 + v + a
}
