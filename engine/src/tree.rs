//! Fixed-depth copy-on-write radix trees (volume maps and bit planes), the
//! metadata block store with its clean-node cache, and the pool free map.
//!
//! Invariants:
//! - A tree has a fixed depth; the node covering leaf key `k` at level `L`
//!   has key `k / FANOUT^L`. Interior slots are `{pba, birth, hash}`.
//! - Dirty nodes (live image only) have no pba until the CP writes them;
//!   the dirty set is closed upwards (a dirty node's parent is dirty).
//! - Clean nodes are immutable and cached by pba; each load checks the
//!   header (kind, level, crc, self_pba, birth). The cache holds at most
//!   [`CACHE_NODES`] nodes (about 128 MiB) and evicts one node at a time,
//!   the first not used since the clock hand last passed it (CLOCK), so
//!   memory stays bounded and a full cache never empties at once.
//! - The free map is a lazily allocated chunked bitmap: a pba is
//!   allocatable iff its bit is clear.

use crate::device::{AlignedBuf, BlockDevice, IoCompletion, IoKind, IoRequest, BLOCK_SIZE};
use crate::error::{Error, Result};
use crate::format::{decode_block, encode_block, Ptr, PAYLOAD};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

pub const FANOUT: usize = 168;
pub const SLOT_LEN: usize = 24;
/// Map tree levels (168^5 blocks = 530 TiB per namespace).
pub const MAP_DEPTH: u8 = 5;
/// Plane tree levels (32512 * 168^3 pbas).
pub const PLANE_DEPTH: u8 = 4;
/// pbas covered by one plane leaf.
pub const LEAF_BITS: u64 = (PAYLOAD * 8) as u64;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Slot {
    pub pba: u64,
    pub birth: u64,
    pub hash: u64,
}

/// Slot `i` of an interior node's or map leaf's payload. Every caller
/// passes a payload of [`PAYLOAD`] bytes (a decoded or freshly built node)
/// and `i < FANOUT` (a key reduced mod `FANOUT`, or a loop over the
/// slots), and `FANOUT * SLOT_LEN <= PAYLOAD`; so the slices below are in
/// range by construction. This is the map-lookup hot path: kept as plain
/// indexing (one bounds check) rather than a `Result` at every caller.
#[allow(clippy::indexing_slicing)] // i < FANOUT, p.len() == PAYLOAD (see above)
pub fn slot_get(p: &[u8], i: usize) -> Slot {
    debug_assert!(i < FANOUT && p.len() >= FANOUT * SLOT_LEN);
    let o = i * SLOT_LEN;
    let rd = |a: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&p[a..a + 8]);
        u64::from_le_bytes(b)
    };
    Slot {
        pba: rd(o),
        birth: rd(o + 8),
        hash: rd(o + 16),
    }
}

/// Write slot `i`; in range by construction, as for [`slot_get`].
#[allow(clippy::indexing_slicing)] // i < FANOUT, p.len() == PAYLOAD (see slot_get)
pub fn slot_set(p: &mut [u8], i: usize, s: Slot) {
    debug_assert!(i < FANOUT && p.len() >= FANOUT * SLOT_LEN);
    let o = i * SLOT_LEN;
    p[o..o + 8].copy_from_slice(&s.pba.to_le_bytes());
    p[o + 8..o + 16].copy_from_slice(&s.birth.to_le_bytes());
    p[o + 16..o + 24].copy_from_slice(&s.hash.to_le_bytes());
}

pub fn slot_ptr(p: &[u8], i: usize) -> Ptr {
    let s = slot_get(p, i);
    Ptr {
        pba: s.pba,
        birth: s.birth,
    }
}

pub fn pow_fanout(level: u8) -> u64 {
    (FANOUT as u64).pow(level as u32)
}

/// Bit `bit` of a plane leaf's payload. Every caller passes a payload of
/// [`PAYLOAD`] bytes and `bit < LEAF_BITS` (a pba reduced mod
/// `LEAF_BITS`), so the byte is in range by construction.
#[allow(clippy::indexing_slicing)] // bit < LEAF_BITS == p.len() * 8 (see above)
pub fn bit_get(p: &[u8], bit: u64) -> bool {
    debug_assert!(bit < LEAF_BITS && p.len() * 8 >= LEAF_BITS as usize);
    p[(bit / 8) as usize] & (1 << (bit % 8)) != 0
}

/// Set or clear bit `bit`; in range by construction, as for [`bit_get`].
#[allow(clippy::indexing_slicing)] // bit < LEAF_BITS == p.len() * 8 (see bit_get)
pub fn bit_put(p: &mut [u8], bit: u64, on: bool) {
    debug_assert!(bit < LEAF_BITS && p.len() * 8 >= LEAF_BITS as usize);
    let m = 1u8 << (bit % 8);
    if on {
        p[(bit / 8) as usize] |= m;
    } else {
        p[(bit / 8) as usize] &= !m;
    }
}

/// One COW tree: a root pointer plus the dirty overlay.
#[derive(Debug, Clone)]
pub struct Tree {
    pub root: Ptr,
    pub depth: u8,
    pub leaf_kind: u16,
    pub node_kind: u16,
    pub dirty: HashMap<(u8, u64), Vec<u8>>,
}

impl Tree {
    pub fn map(root: Ptr) -> Tree {
        Tree {
            root,
            depth: MAP_DEPTH,
            leaf_kind: crate::format::KIND_MAP,
            node_kind: crate::format::KIND_MAP,
            dirty: HashMap::new(),
        }
    }
    pub fn plane(root: Ptr) -> Tree {
        Tree {
            root,
            depth: PLANE_DEPTH,
            leaf_kind: crate::format::KIND_PLANE_LEAF,
            node_kind: crate::format::KIND_PLANE_NODE,
            dirty: HashMap::new(),
        }
    }
    pub fn kind(&self, level: u8) -> u16 {
        if level == 0 {
            self.leaf_kind
        } else {
            self.node_kind
        }
    }
    pub fn top(&self) -> u8 {
        self.depth - 1
    }
}

/// Counters, for tests and operators.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Metadata nodes looked at (cache hits, misses and dirty nodes).
    pub metadata_blocks_visited: u64,
    pub metadata_blocks_read: u64,
    pub metadata_blocks_written: u64,
    pub data_blocks_read: u64,
    pub data_blocks_written: u64,
    pub checkpoints: u64,
}

/// Most clean nodes the cache holds (each about 4 KiB of payload).
pub const CACHE_NODES: usize = 32_768;

/// Clean metadata nodes by pba, bounded, with CLOCK eviction: a hit marks
/// its node used; an insert into a full cache moves the hand over the ring,
/// giving each used node a second chance (its mark cleared), and evicts the
/// first unmarked one.
pub struct NodeCache {
    map: HashMap<u64, (Arc<Vec<u8>>, bool)>,
    /// Every cached pba once, in insertion order from the hand on.
    ring: std::collections::VecDeque<u64>,
    max: usize,
}

impl NodeCache {
    pub fn new(max: usize) -> NodeCache {
        NodeCache {
            map: HashMap::new(),
            ring: std::collections::VecDeque::new(),
            max: max.max(1),
        }
    }

    pub fn get(&mut self, pba: u64) -> Option<Arc<Vec<u8>>> {
        let (p, used) = self.map.get_mut(&pba)?;
        *used = true;
        Some(p.clone())
    }

    /// Cache `payload` as the node at `pba` (replacing what was there: a
    /// pba freed and written again holds a new node).
    pub fn insert(&mut self, pba: u64, payload: Arc<Vec<u8>>) {
        if let Some(e) = self.map.get_mut(&pba) {
            *e = (payload, false);
            return;
        }
        while self.map.len() >= self.max {
            let Some(k) = self.ring.pop_front() else {
                break;
            };
            match self.map.get_mut(&k) {
                Some((_, used)) if *used => {
                    *used = false;
                    self.ring.push_back(k);
                }
                Some(_) => {
                    self.map.remove(&k);
                }
                None => {}
            }
        }
        self.map.insert(pba, (payload, false));
        self.ring.push_back(pba);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The device plus the clean-node cache.
///
/// Requests go out either through [`Store::run`] (submit, wait for every
/// one, completions in order) or, for data writes the pool keeps in
/// flight, through [`Store::start`] (submit, return their tags). A `run`
/// may reap completions of started requests while it waits for its own:
/// those go to `stash`, where [`Store::reap`] finds them.
pub struct Store<D: BlockDevice> {
    pub dev: D,
    pub cache: NodeCache,
    pub stats: PoolStats,
    next_tag: u64,
    /// Tags of started requests not yet reaped (first tag -> count).
    started: BTreeMap<u64, u64>,
    /// Completions of started requests, reaped by a `run` or a `reap`.
    stash: Vec<IoCompletion>,
}

impl<D: BlockDevice> Store<D> {
    pub fn new(dev: D) -> Self {
        Store {
            dev,
            cache: NodeCache::new(CACHE_NODES),
            stats: PoolStats::default(),
            next_tag: 1,
            started: BTreeMap::new(),
            stash: Vec::new(),
        }
    }

    /// Hand `reqs` to the device with consecutive new tags; returns the
    /// first.
    fn submit_all(&mut self, reqs: Vec<(IoKind, u64, Option<AlignedBuf>)>) -> u64 {
        let base = self.next_tag;
        self.next_tag += reqs.len() as u64;
        for (i, (kind, pba, buf)) in reqs.into_iter().enumerate() {
            self.dev.submit(IoRequest {
                tag: base + i as u64,
                kind,
                pba,
                buf,
            });
        }
        base
    }

    /// Whether `tag` belongs to a started (not `run`) request.
    fn is_started(&self, tag: u64) -> bool {
        self.started
            .range(..=tag)
            .next_back()
            .is_some_and(|(&first, &n)| tag < first + n)
    }

    /// Submit `reqs` without waiting; returns the first tag (the requests
    /// have consecutive tags). Their completions come back from
    /// [`Store::reap`].
    pub fn start(&mut self, reqs: Vec<(IoKind, u64, Option<AlignedBuf>)>) -> u64 {
        let n = reqs.len() as u64;
        let base = self.submit_all(reqs);
        if n > 0 {
            self.started.insert(base, n);
        }
        base
    }

    /// Completions of started requests: those stashed, plus what the
    /// device has now (`wait`: block for at least one when none is
    /// stashed and some are in flight).
    pub fn reap(&mut self, wait: bool) -> Result<Vec<IoCompletion>> {
        if self.stash.is_empty() && !self.started.is_empty() {
            let mut out = Vec::new();
            let min = usize::from(wait && self.dev.in_flight() > 0);
            if let Err(e) = self.dev.complete(min, &mut out) {
                return Err(Error::Io {
                    device: self.dev.info().name.clone(),
                    op: "complete",
                    pba: 0,
                    source: e,
                });
            }
            self.stash.append(&mut out);
        }
        let got = std::mem::take(&mut self.stash);
        for c in &got {
            self.retire(c.tag);
        }
        Ok(got)
    }

    /// Forget started tag `tag` (reaped).
    fn retire(&mut self, tag: u64) {
        let Some((&first, &n)) = self.started.range(..=tag).next_back() else {
            return;
        };
        if tag >= first + n {
            return;
        }
        self.started.remove(&first);
        if tag > first {
            self.started.insert(first, tag - first);
        }
        if tag + 1 < first + n {
            self.started.insert(tag + 1, first + n - tag - 1);
        }
    }

    fn io_error(&self, c: &IoCompletion, e: &std::io::Error) -> Error {
        let op = match c.kind {
            IoKind::Read => "read",
            IoKind::Write { .. } => "write",
            IoKind::Flush => "flush",
        };
        Error::Io {
            device: self.dev.info().name.clone(),
            op,
            pba: c.pba,
            source: std::io::Error::new(e.kind(), e.to_string()),
        }
    }

    /// Submit all, complete all; completions in submission order.
    pub fn run(
        &mut self,
        reqs: Vec<(IoKind, u64, Option<AlignedBuf>)>,
    ) -> Result<Vec<IoCompletion>> {
        let n = reqs.len();
        self.submit_all(reqs);
        let mut out = Vec::with_capacity(n);
        let mut got = Vec::new();
        while out.len() < n {
            let before = out.len();
            let r = self.dev.complete(1, &mut got);
            if let Err(e) = r {
                return Err(Error::Io {
                    device: self.dev.info().name.clone(),
                    op: "complete",
                    pba: 0,
                    source: e,
                });
            }
            // Started requests complete meanwhile too: set them aside.
            for c in got.drain(..) {
                if self.is_started(c.tag) {
                    self.stash.push(c);
                } else {
                    out.push(c);
                }
            }
            if out.len() == before && self.dev.in_flight() == 0 {
                return Err(Error::Io {
                    device: self.dev.info().name.clone(),
                    op: "complete",
                    pba: 0,
                    source: std::io::Error::other("device lost requests"),
                });
            }
        }
        out.sort_by_key(|c| c.tag);
        let mut first_err = None;
        for c in &out {
            if let Err(e) = &c.result {
                if first_err.is_none() {
                    first_err = Some(self.io_error(c, e));
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    pub fn read_raw(&mut self, pbas: &[u64]) -> Result<Vec<Vec<u8>>> {
        let reqs = pbas
            .iter()
            .map(|&p| (IoKind::Read, p, Some(AlignedBuf::zeroed(1))))
            .collect();
        let out = self.run(reqs)?;
        Ok(out
            .into_iter()
            .map(|c| {
                c.buf
                    .map(|b| b.as_slice().to_vec())
                    .unwrap_or_else(|| vec![0u8; BLOCK_SIZE])
            })
            .collect())
    }

    pub fn write_raw(&mut self, blocks: Vec<(u64, Vec<u8>)>, fua: bool) -> Result<()> {
        self.write_blocks(blocks.iter().map(|(p, b)| (*p, b.as_slice())), fua)
    }

    /// Write whole blocks, in one device batch. Blocks whose pbas follow
    /// each other (in the order given) go to the device as one request of
    /// up to [`COALESCE_MAX`] blocks: a sequential stream of fresh
    /// allocations costs one I/O per run, not one per block.
    pub fn write_blocks<'a>(
        &mut self,
        blocks: impl IntoIterator<Item = (u64, &'a [u8])>,
        fua: bool,
    ) -> Result<()> {
        self.write_mixed(Vec::new(), blocks, fua)
    }

    /// [`Store::write_blocks`] plus `whole` buffers that go to the device
    /// as they are, each at its first pba over consecutive blocks (no copy),
    /// all in one submission.
    pub fn write_mixed<'a>(
        &mut self,
        whole: Vec<(u64, AlignedBuf)>,
        blocks: impl IntoIterator<Item = (u64, &'a [u8])>,
        fua: bool,
    ) -> Result<()> {
        let reqs = mixed_requests(whole, blocks, fua);
        if reqs.is_empty() {
            return Ok(());
        }
        self.run(reqs).map(|_| ())
    }

    pub fn flush(&mut self) -> Result<()> {
        self.run(vec![(IoKind::Flush, 0, None)]).map(|_| ())
    }

    /// Load a clean metadata node's payload (checked) through the cache.
    pub fn load(&mut self, ptr: Ptr, kind: u16, level: u8) -> Result<Arc<Vec<u8>>> {
        self.stats.metadata_blocks_visited += 1;
        if let Some(p) = self.cache.get(ptr.pba) {
            return Ok(p);
        }
        let raw = self.read_raw(&[ptr.pba])?;
        self.stats.metadata_blocks_read += 1;
        let block = raw.into_iter().next().unwrap_or_default();
        let payload = decode_block(&block, ptr, kind, level)?.to_vec();
        let a = Arc::new(payload);
        self.cache.insert(ptr.pba, a.clone());
        Ok(a)
    }
}

/// Most blocks in one coalesced write request (1 MiB).
pub const COALESCE_MAX: usize = 256;

/// The device requests that write `whole` buffers as they are (each at its
/// first pba) and `blocks` gathered into runs of consecutive pbas of at
/// most [`COALESCE_MAX`] blocks.
pub fn mixed_requests<'a>(
    whole: Vec<(u64, AlignedBuf)>,
    blocks: impl IntoIterator<Item = (u64, &'a [u8])>,
    fua: bool,
) -> Vec<(IoKind, u64, Option<AlignedBuf>)> {
    let mut reqs: Vec<_> = whole
        .into_iter()
        .map(|(pba, buf)| (IoKind::Write { fua }, pba, Some(buf)))
        .collect();
    let mut run: Vec<&'a [u8]> = Vec::new();
    let mut start = 0u64;
    let flush_run = |start: u64, run: &mut Vec<&'a [u8]>, reqs: &mut Vec<_>| {
        if run.is_empty() {
            return;
        }
        let buf = AlignedBuf::gather(run);
        reqs.push((IoKind::Write { fua }, start, Some(buf)));
        run.clear();
    };
    for (pba, data) in blocks {
        let follows = !run.is_empty() && start + run.len() as u64 == pba;
        if !follows || run.len() >= COALESCE_MAX {
            flush_run(start, &mut run, &mut reqs);
            start = pba;
        }
        run.push(data);
    }
    flush_run(start, &mut run, &mut reqs);
    reqs
}

/// The payload of the leaf covering `leaf_key`, if the tree has one.
pub fn get_leaf<D: BlockDevice>(
    store: &mut Store<D>,
    tree: &Tree,
    leaf_key: u64,
) -> Result<Option<Arc<Vec<u8>>>> {
    Ok(leaf_or_gap(store, tree, leaf_key)?.ok())
}

/// Like [`get_leaf`], but when the leaf is absent returns `Err(next)`: the
/// first leaf key after the whole absent subtree (so sparse ranges are
/// skipped a subtree at a time).
pub fn leaf_or_gap<D: BlockDevice>(
    store: &mut Store<D>,
    tree: &Tree,
    leaf_key: u64,
) -> Result<std::result::Result<Arc<Vec<u8>>, u64>> {
    let mut ptr = tree.root;
    for level in (0..=tree.top()).rev() {
        let key = leaf_key / pow_fanout(level);
        let payload = if let Some(d) = tree.dirty.get(&(level, key)) {
            store.stats.metadata_blocks_visited += 1;
            Arc::new(d.clone())
        } else if ptr.pba == 0 {
            return Ok(Err((key + 1).saturating_mul(pow_fanout(level))));
        } else {
            store.load(ptr, tree.kind(level), level)?
        };
        if level == 0 {
            return Ok(Ok(payload));
        }
        ptr = slot_ptr(
            &payload,
            ((leaf_key / pow_fanout(level - 1)) % FANOUT as u64) as usize,
        );
    }
    Ok(Err(leaf_key + 1))
}

/// The pointer to the clean node at (level, key) (zero if absent). Only
/// meaningful for trees without dirty nodes on that path.
pub fn node_ptr<D: BlockDevice>(
    store: &mut Store<D>,
    tree: &Tree,
    level: u8,
    key: u64,
) -> Result<Ptr> {
    let mut ptr = tree.root;
    let mut l = tree.top();
    while l > level {
        if ptr.pba == 0 {
            return Ok(Ptr::default());
        }
        let payload = store.load(ptr, tree.kind(l), l)?;
        let child_key = key / pow_fanout(l - 1 - level);
        ptr = slot_ptr(&payload, (child_key % FANOUT as u64) as usize);
        l -= 1;
    }
    Ok(ptr)
}

/// Make the node at (level, key) and its ancestors dirty (copy on write).
/// Every clean node replaced is pushed to `released` as (level, key, ptr).
pub fn make_dirty<D: BlockDevice>(
    store: &mut Store<D>,
    tree: &mut Tree,
    level: u8,
    key: u64,
    released: &mut Vec<(u8, u64, Ptr)>,
) -> Result<()> {
    if tree.dirty.contains_key(&(level, key)) {
        return Ok(());
    }
    let ptr = if level == tree.top() {
        tree.root
    } else {
        let pk = key / FANOUT as u64;
        make_dirty(store, tree, level + 1, pk, released)?;
        match tree.dirty.get(&(level + 1, pk)) {
            Some(p) => slot_ptr(p, (key % FANOUT as u64) as usize),
            None => return Err(Error::Invalid("dirty parent vanished".into())),
        }
    };
    let payload = if ptr.pba != 0 {
        let p = store.load(ptr, tree.kind(level), level)?;
        released.push((level, key, ptr));
        p.to_vec()
    } else {
        vec![0u8; PAYLOAD]
    };
    tree.dirty.insert((level, key), payload);
    Ok(())
}

/// Write every dirty node bottom-up at CP generation `gen`; returns the new
/// pbas (the caller records them in the plane when it is a map tree).
pub fn flush_tree<D: BlockDevice>(
    store: &mut Store<D>,
    tree: &mut Tree,
    fm: &mut FreeMap,
    gen: u64,
) -> Result<Vec<u64>> {
    let mut keys: Vec<(u8, u64)> = tree.dirty.keys().copied().collect();
    keys.sort_unstable();
    let mut writes = Vec::with_capacity(keys.len());
    let mut new = Vec::with_capacity(keys.len());
    for (level, key) in keys {
        let payload = match tree.dirty.remove(&(level, key)) {
            Some(p) => p,
            None => continue,
        };
        let pba = fm.alloc()?;
        let block = encode_block(tree.kind(level), level, pba, gen, &payload);
        let ptr = Ptr { pba, birth: gen };
        if level == tree.top() {
            tree.root = ptr;
        } else {
            match tree.dirty.get_mut(&(level + 1, key / FANOUT as u64)) {
                Some(pp) => slot_set(
                    pp,
                    (key % FANOUT as u64) as usize,
                    Slot {
                        pba,
                        birth: gen,
                        hash: 0,
                    },
                ),
                None => return Err(Error::Invalid("dirty node without dirty parent".into())),
            }
        }
        store.cache.insert(pba, Arc::new(payload));
        writes.push((pba, block));
        new.push(pba);
    }
    store.stats.metadata_blocks_written += writes.len() as u64;
    store.write_raw(writes, false)?;
    Ok(new)
}

/// Visit every node of a tree (dirty overlay included): `node(pba)` for each
/// clean node, `leaf(leaf_key, payload)` for each leaf.
pub fn walk_tree<D: BlockDevice>(
    store: &mut Store<D>,
    tree: &Tree,
    node: &mut dyn FnMut(u64) -> bool,
    leaf: &mut dyn FnMut(u64, &[u8]),
) -> Result<()> {
    fn go<D: BlockDevice>(
        store: &mut Store<D>,
        tree: &Tree,
        level: u8,
        key: u64,
        ptr: Ptr,
        node: &mut dyn FnMut(u64) -> bool,
        leaf: &mut dyn FnMut(u64, &[u8]),
    ) -> Result<()> {
        let payload = if let Some(d) = tree.dirty.get(&(level, key)) {
            Arc::new(d.clone())
        } else if ptr.pba == 0 {
            return Ok(());
        } else {
            if !node(ptr.pba) {
                return Ok(());
            }
            store.load(ptr, tree.kind(level), level)?
        };
        if level == 0 {
            leaf(key, &payload);
            return Ok(());
        }
        for i in 0..FANOUT {
            let c = slot_ptr(&payload, i);
            let ck = key * FANOUT as u64 + i as u64;
            if c.pba != 0 || tree.dirty.contains_key(&(level - 1, ck)) {
                go(store, tree, level - 1, ck, c, node, leaf)?;
            }
        }
        Ok(())
    }
    go(store, tree, tree.top(), 0, tree.root, node, leaf)
}

const CHUNK_BITS: u64 = 32768;
const CHUNK_WORDS: usize = (CHUNK_BITS / 64) as usize;

/// The pool free map (see module doc).
#[derive(Debug, Clone)]
pub struct FreeMap {
    chunks: HashMap<u64, Box<[u64]>>,
    pub total: u64,
    pub used: u64,
    cursor: u64,
}

impl FreeMap {
    pub fn new(total: u64) -> Self {
        FreeMap {
            chunks: HashMap::new(),
            total,
            used: 0,
            cursor: 0,
        }
    }
    pub fn test(&self, p: u64) -> bool {
        self.chunks
            .get(&(p / CHUNK_BITS))
            .and_then(|c| c.get(((p % CHUNK_BITS) / 64) as usize))
            .is_some_and(|w| w & (1 << (p % 64)) != 0)
    }
    /// Mark `p` used. A block beyond the device is a bug (every pba read
    /// from the device is range-checked before it gets here).
    pub fn set(&mut self, p: u64) -> Result<()> {
        if p >= self.total {
            return Err(Error::Invariant(format!(
                "free map: block {p} marked used on a device of {} blocks",
                self.total
            )));
        }
        let c = self
            .chunks
            .entry(p / CHUNK_BITS)
            .or_insert_with(|| vec![0u64; CHUNK_WORDS].into_boxed_slice());
        // A chunk has CHUNK_WORDS words and the index is < CHUNK_WORDS.
        let Some(w) = c.get_mut(((p % CHUNK_BITS) / 64) as usize) else {
            return Err(Error::Invariant(format!(
                "free map: block {p} has no word in its chunk"
            )));
        };
        if *w & (1 << (p % 64)) == 0 {
            *w |= 1 << (p % 64);
            self.used += 1;
        }
        Ok(())
    }
    /// Mark `p` free. Freeing a free block (a double free) is a bug.
    pub fn clear(&mut self, p: u64) -> Result<()> {
        let w = self
            .chunks
            .get_mut(&(p / CHUNK_BITS))
            .and_then(|c| c.get_mut(((p % CHUNK_BITS) / 64) as usize))
            .filter(|w| **w & (1 << (p % 64)) != 0)
            .ok_or_else(|| Error::Invariant(format!("free map: block {p} freed twice")))?;
        *w &= !(1 << (p % 64));
        self.used -= 1;
        Ok(())
    }
    pub fn free(&self) -> u64 {
        self.total - self.used
    }
    /// Next-fit allocation.
    pub fn alloc(&mut self) -> Result<u64> {
        if self.used >= self.total {
            return Err(Error::NoSpace { needed: 1, free: 0 });
        }
        let mut p = self.cursor % self.total;
        let mut scanned = 0u64;
        while scanned <= self.total + CHUNK_BITS {
            let ci = p / CHUNK_BITS;
            match self.chunks.get(&ci) {
                None => {
                    self.set(p)?;
                    self.cursor = p + 1;
                    return Ok(p);
                }
                Some(c) => {
                    let first = ((p % CHUNK_BITS) / 64) as usize;
                    let mut mask = !0u64 << (p % 64);
                    let mut found = None;
                    for (wi, &word) in c.iter().enumerate().skip(first) {
                        let free = !word & mask;
                        if free != 0 {
                            found = Some(
                                ci * CHUNK_BITS + wi as u64 * 64 + free.trailing_zeros() as u64,
                            );
                            break;
                        }
                        mask = !0;
                    }
                    if let Some(q) = found.filter(|&q| q < self.total) {
                        self.set(q)?;
                        self.cursor = q + 1;
                        return Ok(q);
                    }
                }
            }
            let next = (ci + 1) * CHUNK_BITS;
            scanned += next - p;
            p = if next >= self.total { 0 } else { next };
        }
        Err(Error::NoSpace {
            needed: 1,
            free: self.free(),
        })
    }
    /// Every allocated pba (tests).
    pub fn iter_set(&self) -> Vec<u64> {
        let mut v = Vec::new();
        for (&ci, c) in &self.chunks {
            for (wi, &w) in c.iter().enumerate() {
                let mut w = w;
                while w != 0 {
                    let b = w.trailing_zeros() as u64;
                    v.push(ci * CHUNK_BITS + wi as u64 * 64 + b);
                    w &= w - 1;
                }
            }
        }
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_cache_stays_bounded_and_keeps_what_is_used() {
        let node = |n: u64| Arc::new(vec![n as u8; 8]);
        let mut c = NodeCache::new(4);
        for pba in 0..4 {
            c.insert(pba, node(pba));
        }
        // 0 and 2 are used again; 1 and 3 are not.
        assert!(c.get(0).is_some() && c.get(2).is_some());
        c.insert(10, node(10));
        c.insert(11, node(11));
        assert_eq!(c.len(), 4, "bounded");
        assert!(c.get(0).is_some() && c.get(2).is_some(), "used ones kept");
        assert!(
            c.get(1).is_none() && c.get(3).is_none(),
            "unused ones evicted"
        );
        // A pba written again holds its new node.
        c.insert(10, node(99));
        assert_eq!(c.get(10).as_deref(), Some(&vec![99u8; 8]));
        assert_eq!(c.len(), 4);
        for pba in 100..10_000 {
            c.insert(pba, node(pba));
            assert!(c.len() <= 4);
        }
    }

    #[test]
    fn slot_round_trip() {
        let mut p = vec![0u8; PAYLOAD];
        let s = Slot {
            pba: 1 << 40,
            birth: 77,
            hash: u64::MAX,
        };
        slot_set(&mut p, FANOUT - 1, s);
        assert_eq!(slot_get(&p, FANOUT - 1), s);
        assert_eq!(slot_get(&p, 0), Slot::default());
        const { assert!(FANOUT * SLOT_LEN <= PAYLOAD) };
    }

    #[test]
    fn freemap_next_fit_and_wrap() {
        let mut f = FreeMap::new(100_000);
        for i in 0..10 {
            assert_eq!(f.alloc().unwrap(), i);
        }
        f.clear(3).unwrap();
        assert!(f.clear(3).is_err(), "a double free is refused");
        assert!(f.set(100_000).is_err(), "a block beyond the device");
        assert_eq!(f.alloc().unwrap(), 10, "next fit, not first fit");
        assert_eq!(f.free(), 100_000 - 10);
        let mut f = FreeMap::new(70);
        for _ in 0..70 {
            f.alloc().unwrap();
        }
        assert!(f.alloc().is_err());
        f.clear(5).unwrap();
        assert_eq!(f.alloc().unwrap(), 5);
        // huge thin map is cheap
        let mut f = FreeMap::new(1 << 34);
        f.set((1 << 34) - 1).unwrap();
        assert!(f.test((1 << 34) - 1));
        assert_eq!(f.chunks.len(), 1);
    }
}
