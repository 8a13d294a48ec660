//! The pool: single-threaded owner of one device. Volumes, qtrees,
//! copy-on-write map trees, bit planes, the catalog, consistency points,
//! snapshots and diffs.
//!
//! Invariants (checked by [`Pool::check_invariants`]):
//! - The live plane of a volume holds exactly the data blocks and clean map
//!   nodes of its namespaces' live trees; a snapshot plane exactly those of
//!   its frozen trees.
//! - The free map = union of all planes + all plane nodes + catalog blocks +
//!   superblocks + pending-free. A pba is allocatable iff its bit is clear.
//! - Free only after durability: a block released since the last CP stays in
//!   `pending` (allocated in the free map) until the NEXT CP's superblock is
//!   written and flushed, because the durable image may still point at it.
//! - Writes never overwrite a block the durable image references.
//! - Started requests ([`Pool::start`], the shard loop's pipeline): a
//!   started write's pbas are allocated and in no plane until its data is
//!   written; then its metadata is applied, each write as soon as its own
//!   data and that of every write before it is written, in the order they
//!   were started, so the end state is that of the same writes run one
//!   after another. A CP while some are in flight neither references nor
//!   frees their blocks, and a failed one poisons the pool and fails every
//!   later one. Reads are started the same way, never together with
//!   writes: no block a read in flight reads can be freed and reused.
//! - Only the volumes in `touched` (each writable access notes one; a CP
//!   clears the set) can have dirty nodes or catalog changes; `by_name`
//!   and each volume's snapshot id index agree with `vols`.

use crate::api::*;
use crate::catalog::{self, Log, Ns, Origin, Snap, Vol};
use crate::device::{AlignedBuf, BlockDevice, IoCompletion, IoKind, BLOCK_SIZE};
use crate::error::{Error, Result};
use crate::format::*;
use crate::tree::*;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use uuid::Uuid;

pub use crate::tree::PoolStats;

/// Smallest device a pool can live on, in blocks.
pub const MIN_BLOCKS: u64 = 256;
/// Largest pool, in blocks: the reach of a plane tree.
pub const MAX_BLOCKS: u64 = LEAF_BITS * 168 * 168 * 168;
/// Longest single read, in blocks (64 MiB).
pub const READ_BLOCKS_MAX: u64 = 16384;
/// Snapshots per volume (docs/FORMAT.md, "Limits": the catalog log sets
/// none; this bounds a volume's memory and its listings).
pub const SNAPSHOTS_MAX: usize = 65_536;
/// Volumes per region unless `init` says otherwise.
pub const VOLUMES_MAX_DEFAULT: u32 = 16_384;
/// Largest namespace, in blocks (the map tree's reach).
pub const NS_BLOCKS_MAX: u64 = 168u64.pow(5);
/// A CP is taken after a request once this many nodes are dirty.
const DIRTY_BOUND: usize = 16384;
/// ... or once this many released blocks wait for a CP to become free.
const PENDING_BOUND: usize = 1 << 20;
/// Blocks client writes leave free for trims and snapshot deletes.
const TRIM_HEADROOM: u64 = 64;

#[derive(Debug, Clone, Copy)]
pub struct FormatOptions {
    pub volumes_max: u32,
}

impl Default for FormatOptions {
    fn default() -> Self {
        FormatOptions {
            volumes_max: VOLUMES_MAX_DEFAULT,
        }
    }
}

/// `vols[vi]` for a `vi` this request found (`vol_idx`, `ns_idx`, a loop
/// over `vols`): a miss is a bug, refused as `Invariant` rather than a panic.
fn vol_at(vols: &[Vol], vi: usize) -> Result<&Vol> {
    vols.get(vi)
        .ok_or_else(|| Error::Invariant(format!("volume index {vi} of {}", vols.len())))
}

/// [`vol_at`], writable. Every writable access to a volume goes through
/// here, which marks it for the catalog log (crate::catalog: its head is
/// logged again at the next CP if it changed) and notes it in `touched`
/// (the pool's set of volumes a CP and a space check look at: no other
/// volume can have changed).
fn vol_at_mut<'a>(
    vols: &'a mut [Vol],
    touched: &mut BTreeSet<usize>,
    vi: usize,
) -> Result<&'a mut Vol> {
    let len = vols.len();
    let v = vols
        .get_mut(vi)
        .ok_or_else(|| Error::Invariant(format!("volume index {vi} of {len}")))?;
    v.logged.dirty = true;
    touched.insert(vi);
    Ok(v)
}

impl Vol {
    /// Namespace `ni` (0 is the volume's own), found by `ns_idx` or a loop
    /// over `ns`: a miss is a bug.
    fn ns_at(&self, ni: usize) -> Result<&Ns> {
        self.ns.get(ni).ok_or_else(|| {
            Error::Invariant(format!(
                "volume {}: namespace index {ni} of {}",
                self.name,
                self.ns.len()
            ))
        })
    }

    /// [`Vol::ns_at`], writable.
    fn ns_at_mut(&mut self, ni: usize) -> Result<&mut Ns> {
        let (name, len) = (&self.name, self.ns.len());
        self.ns.get_mut(ni).ok_or_else(|| {
            Error::Invariant(format!("volume {name}: namespace index {ni} of {len}"))
        })
    }

    /// Snapshot `si` (oldest first), found by `snap_idx` or a loop over
    /// `snaps`: a miss is a bug.
    fn snap_at(&self, si: usize) -> Result<&Snap> {
        self.snaps.get(si).ok_or_else(|| {
            Error::Invariant(format!(
                "volume {}: snapshot index {si} of {}",
                self.name,
                self.snaps.len()
            ))
        })
    }

    /// The plane a block the live image releases may still be held by: the
    /// newest snapshot's, else a clone's origin's (the clone's oldest
    /// image). A block in the live plane and in any older image is in this
    /// one too, since a block is never reused while an image holds it.
    fn base_plane(&self) -> Option<Ptr> {
        self.snaps
            .last()
            .map(|s| s.plane)
            .or(self.origin.map(|o| o.plane))
    }

    /// The roots of the live plane and of every snapshot's plane.
    fn plane_roots(&self) -> impl Iterator<Item = Ptr> + '_ {
        std::iter::once(self.plane.root).chain(self.snaps.iter().map(|s| s.plane))
    }
}

/// A validated write of a batch: (volume, namespace, lba, data, pbas).
/// A validated, allocated write of a batch: namespace (vi, ni), first lba,
/// its data (taken when it goes to the device whole), fresh pbas and each
/// block's hash.
/// What [`Pool::prepare_run`] made of a run of writes.
struct PreparedRun {
    writes: Vec<Result<PreparedWrite>>,
    requests: Vec<(IoKind, u64, Option<AlignedBuf>)>,
    meta: u64,
}

struct PreparedWrite {
    vi: usize,
    ni: usize,
    lba: u64,
    data: Option<AlignedBuf>,
    pbas: Vec<u64>,
    hashes: Vec<u64>,
    /// What its metadata may add to the CP reserve.
    meta: u64,
}

fn block_hashes(data: &AlignedBuf) -> Vec<u64> {
    (0..data.len_blocks())
        .map(|i| xxhash_rust::xxh3::xxh3_64(data.block(i)))
        .collect()
}

pub struct Pool<D: BlockDevice> {
    store: Store<D>,
    fm: FreeMap,
    pending: BTreeSet<u64>,
    gen: u64,
    uuid: [u8; 16],
    volumes_max: u32,
    /// Snapshots per volume: [`SNAPSHOTS_MAX`] (lowered by unit tests).
    snapshots_max: usize,
    /// This pool's region in a sharded pool (0 of 1 when not sharded).
    shard_index: u32,
    shard_count: u32,
    next_vol_id: u32,
    vols: Vec<Vol>,
    attrs: BTreeMap<String, Vec<u8>>,
    /// The catalog log (crate::catalog).
    log: Log,
    /// Indices of the volumes changed (or created) since the last CP: a
    /// CP, the CP reserve and the catalog records look at these alone, so
    /// a request costs nothing per volume that exists.
    touched: BTreeSet<usize>,
    /// Volume name -> index in `vols`.
    by_name: HashMap<String, usize>,
    poisoned: Option<String>,
    meta_dirty: bool,
    /// Bumped by every request that may change the pool's state (and by
    /// every consistency point): while it stands where the last passing
    /// `check_invariants` saw it, the state is the one that check passed.
    changes: u64,
    /// `changes` at the last `check_invariants` that passed.
    checked_at: Option<u64>,
    /// Requests started and not yet answered, oldest first
    /// ([`Pool::start`]); the front one has sequence number `flights_seq`.
    /// `None`: a read answered while an earlier one is still in flight.
    flights: std::collections::VecDeque<Option<Flight>>,
    flights_seq: u64,
    /// Started reads whose data is all here, to answer at the next reap.
    ready: Vec<u64>,
    /// The device requests of the started requests, by start.
    batches: std::collections::VecDeque<FlightBatch>,
    /// What the flights' metadata may add to the CP reserve (their
    /// [`Pool::write_meta_need`]s), counted by later writes' space checks.
    flight_meta: u64,
}

/// A request started and not yet answered ([`Pool::start`]).
///
/// A write's data is on its way to the device: validated and allocated, not
/// yet in any map. Its metadata is applied (in the order requests started)
/// once its device requests and those of every request before it are
/// complete; until then its pbas are allocated and in no plane, so a CP
/// meanwhile neither references nor frees them. A read's map was looked up
/// when it started; writes never run while reads are in flight, so the
/// blocks it reads stay where they are.
enum Flight {
    Write {
        /// Prepared, or refused at once (answered in its place, so answers
        /// keep the order of the requests).
        write: Result<PreparedWrite>,
        /// Device requests carrying its data not yet complete.
        outstanding: u64,
        /// The first failed request's error.
        failed: Option<Error>,
    },
    Read {
        image: Image,
        lba: u64,
        len_blocks: u32,
        plan: Result<Vec<Slot>>,
        outstanding: u64,
        failed: bool,
        /// Its device requests' completions, as they came.
        comps: Vec<IoCompletion>,
    },
}

impl Flight {
    fn outstanding(&mut self) -> &mut u64 {
        match self {
            Flight::Write { outstanding, .. } | Flight::Read { outstanding, .. } => outstanding,
        }
    }
}

/// The device requests of one [`Pool::start`]: tags `first_tag ..
/// first_tag + covers.len()`; request i carries data of the started
/// requests with sequence numbers `covers[i].0 ..= covers[i].1`.
struct FlightBatch {
    first_tag: u64,
    covers: Vec<(u64, u64)>,
    /// Requests not yet complete.
    left: u64,
}

/// For each device request of a run of prepared writes (the `k`-th write
/// has sequence number `first + k`), the first and last write whose blocks
/// it carries. A gathered request may span a whole write it does not carry
/// (one that went in its own buffer): that write then also waits for it,
/// which costs nothing, since writes are applied in order anyway.
fn request_covers(
    writes: &[Result<PreparedWrite>],
    requests: &[(IoKind, u64, Option<AlignedBuf>)],
    first: u64,
) -> Vec<(u64, u64)> {
    let mut owner: Vec<(u64, u64)> = writes
        .iter()
        .enumerate()
        .filter_map(|(k, w)| w.as_ref().ok().map(|w| (k, w)))
        .flat_map(|(k, w)| w.pbas.iter().map(move |&p| (p, first + k as u64)))
        .collect();
    owner.sort_unstable();
    requests
        .iter()
        .map(|(_, pba, buf)| {
            let end = pba + buf.as_ref().map_or(1, |b| b.len_blocks() as u64);
            let lo = owner.partition_point(|&(p, _)| p < *pba);
            let hi = owner.partition_point(|&(p, _)| p < end);
            let seqs = owner.get(lo..hi).unwrap_or_default();
            let min = seqs.iter().map(|&(_, s)| s).min().unwrap_or(first);
            let max = seqs.iter().map(|&(_, s)| s).max().unwrap_or(first);
            (min, max)
        })
        .collect()
}

fn digest_term(lba: u64, hash: u64) -> u128 {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&lba.to_le_bytes());
    b[8..].copy_from_slice(&hash.to_le_bytes());
    xxhash_rust::xxh3::xxh3_128(&b)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Whether `req` may change a pool's state (everything but the requests
/// that only look; a read may fill caches, which hold no state).
fn changes_state(req: &Request) -> bool {
    !matches!(
        req,
        Request::Read { .. }
            | Request::ListVolumes
            | Request::ListSnapshots { .. }
            | Request::ListSnapshotNames { .. }
            | Request::NewestSnapshot { .. }
            | Request::SnapshotNamesOf { .. }
            | Request::Diff { .. }
            | Request::DiffStats { .. }
            | Request::Space
            | Request::GetAttr { .. }
            | Request::CheckInvariants
    )
}

/// The one rule for volume, qtree and snapshot names (checked when one is
/// created; see docs/CONTROL.md): 1 to 64 bytes of UTF-8; not `.` or `..`;
/// not only white space; not starting with `-` (it would read as an
/// option) or white space; no `/` or `@` (they separate the parts of a
/// path), no control characters and no bidirectional formatting
/// characters (they make a name print as another).
fn check_name(name: &str) -> Result<()> {
    let bad = |reason| {
        Err(Error::BadName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > NAME_LEN_MAX {
        return bad("longer than 64 bytes");
    }
    if name == "." || name == ".." {
        return bad("`.` and `..` are not names");
    }
    if name.chars().all(char::is_whitespace) {
        return bad("only white space");
    }
    if name.starts_with('-') {
        return bad("starts with '-' (it would read as an option)");
    }
    if name.starts_with(char::is_whitespace) || name.ends_with(char::is_whitespace) {
        return bad("starts or ends with white space");
    }
    if name.chars().any(|c| c == '/' || c == '@' || c.is_control()) {
        return bad("contains '/', '@' or a control character");
    }
    if name.chars().any(is_bidi_format) {
        return bad("contains a bidirectional formatting character");
    }
    Ok(())
}

/// Unicode's bidirectional formatting characters (marks, embeddings,
/// overrides, isolates).
fn is_bidi_format(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

fn check_size(what: &str, size_bytes: u64) -> Result<u64> {
    let bad = |reason| {
        Err(Error::BadSize {
            what: what.to_string(),
            size: size_bytes,
            reason,
        })
    };
    if size_bytes == 0 {
        return bad("zero");
    }
    if !size_bytes.is_multiple_of(BLOCK_SIZE as u64) {
        return bad("not a multiple of 4096");
    }
    let blocks = size_bytes / BLOCK_SIZE as u64;
    if blocks > NS_BLOCKS_MAX {
        return bad("larger than the 530 TiB namespace limit");
    }
    Ok(blocks)
}

/// Set or clear `pba` in a live plane. Plane nodes replaced by the copy on
/// write are released unless the newest snapshot's plane tree has the same
/// pba at that position (then that snapshot still holds them).
/// Nodes of a complete plane tree over `total` pbas: the most nodes one
/// CP can dirty (and write) in one volume's live plane.
fn plane_nodes_max(total: u64) -> u64 {
    let mut level = total.div_ceil(LEAF_BITS).max(1);
    let mut sum = level;
    for _ in 1..PLANE_DEPTH {
        level = level.div_ceil(FANOUT as u64);
        sum += level;
    }
    sum
}

/// Map nodes on the paths of lbas `lba..lba + n` (every level, root
/// included): the most map nodes a write of those lbas can dirty.
fn map_span_nodes(lba: u64, n: u64) -> u64 {
    if n == 0 {
        return 0;
    }
    let (mut first, mut last) = (lba, lba.saturating_add(n - 1));
    let mut sum = 0;
    for _ in 0..MAP_DEPTH {
        first /= FANOUT as u64;
        last /= FANOUT as u64;
        sum += last - first + 1;
    }
    sum
}

fn plane_update<D: BlockDevice>(
    store: &mut Store<D>,
    plane: &mut Tree,
    live_count: &mut u64,
    newest: Option<Ptr>,
    pending: &mut BTreeSet<u64>,
    pba: u64,
    on: bool,
) -> Result<()> {
    plane_update_many(store, plane, live_count, newest, pending, &[pba], on)
}

/// [`plane_update`] for each of `pbas`, one plane leaf at a time: a run of
/// pbas on the same leaf makes that leaf dirty once (one path walk) and
/// then flips its bits. The end state is that of one `plane_update` per
/// pba, in any order (the bits are independent).
fn plane_update_many<D: BlockDevice>(
    store: &mut Store<D>,
    plane: &mut Tree,
    live_count: &mut u64,
    newest: Option<Ptr>,
    pending: &mut BTreeSet<u64>,
    pbas: &[u64],
    on: bool,
) -> Result<()> {
    for run in pbas.chunk_by(|a, b| a / LEAF_BITS == b / LEAF_BITS) {
        let Some(&first) = run.first() else {
            continue;
        };
        let leaf = first / LEAF_BITS;
        let mut rel = Vec::new();
        let r = make_dirty(store, plane, 0, leaf, &mut rel);
        for (level, key, ptr) in rel {
            let shared = match newest {
                Some(root) => node_ptr(store, &Tree::plane(root), level, key)?.pba == ptr.pba,
                None => false,
            };
            if !shared {
                pending.insert(ptr.pba);
            }
        }
        r?;
        let p = plane
            .dirty
            .get_mut(&(0, leaf))
            .ok_or_else(|| Error::Invalid("plane leaf not dirty".into()))?;
        for &pba in run {
            let bit = pba % LEAF_BITS;
            if bit_get(p, bit) != on {
                bit_put(p, bit, on);
                if on {
                    *live_count += 1;
                } else {
                    *live_count -= 1;
                }
            }
        }
    }
    Ok(())
}

/// The live image releases `pba`: clear it in the live plane; if the newest
/// snapshot (or a clone's origin: [`Vol::base_plane`]) holds it, it stays
/// held, else it goes to pending-free.
fn release_live<D: BlockDevice>(
    store: &mut Store<D>,
    vol: &mut Vol,
    pending: &mut BTreeSet<u64>,
    pba: u64,
) -> Result<()> {
    release_live_many(store, vol, pending, &[pba])
}

/// [`release_live`] for each of `pbas` (distinct), one plane leaf at a
/// time: the newest snapshot's plane leaf is looked up once per run of
/// pbas on the same leaf.
fn release_live_many<D: BlockDevice>(
    store: &mut Store<D>,
    vol: &mut Vol,
    pending: &mut BTreeSet<u64>,
    pbas: &[u64],
) -> Result<()> {
    let newest = vol.base_plane();
    plane_update_many(
        store,
        &mut vol.plane,
        &mut vol.live_count,
        newest,
        pending,
        pbas,
        false,
    )?;
    match newest {
        Some(root) => {
            for run in pbas.chunk_by(|a, b| a / LEAF_BITS == b / LEAF_BITS) {
                let Some(&first) = run.first() else {
                    continue;
                };
                let held = get_leaf(store, &Tree::plane(root), first / LEAF_BITS)?;
                for &pba in run {
                    if !held.as_ref().is_some_and(|p| bit_get(p, pba % LEAF_BITS)) {
                        pending.insert(pba);
                    }
                }
            }
        }
        None => pending.extend(pbas.iter().copied()),
    }
    Ok(())
}

/// One side of the three-way plane walk: a tree and the pointer reached.
#[derive(Clone, Copy)]
struct Side<'a> {
    tree: &'a Tree,
    ptr: Ptr,
}

/// Node identity for sharing: a dirty node is shared with nobody.
const DIRTY_ID: u64 = u64::MAX;

fn side_node<D: BlockDevice>(
    store: &mut Store<D>,
    s: Option<Side>,
    level: u8,
    key: u64,
) -> Result<(u64, Option<std::sync::Arc<Vec<u8>>>)> {
    let Some(s) = s else { return Ok((0, None)) };
    if let Some(d) = s.tree.dirty.get(&(level, key)) {
        return Ok((DIRTY_ID, Some(std::sync::Arc::new(d.clone()))));
    }
    if s.ptr.pba == 0 {
        return Ok((0, None));
    }
    Ok((
        s.ptr.pba,
        Some(store.load(s.ptr, s.tree.kind(level), level)?),
    ))
}

/// Walk snapshot plane `s` against its neighbours; report every block only
/// `s` holds (plane bits `S & !P & !N` and plane nodes shared with neither).
fn unique_walk<D: BlockDevice>(
    store: &mut Store<D>,
    level: u8,
    key: u64,
    s: Side,
    p: Option<Side>,
    n: Option<Side>,
    out: &mut dyn FnMut(u64),
) -> Result<()> {
    if s.ptr.pba == 0 {
        return Ok(());
    }
    let (pid, pp) = side_node(store, p, level, key)?;
    let (nid, np) = side_node(store, n, level, key)?;
    if pid == s.ptr.pba || nid == s.ptr.pba {
        return Ok(()); // shared subtree: nothing unique below
    }
    out(s.ptr.pba);
    let sp = store.load(s.ptr, s.tree.kind(level), level)?;
    if level == 0 {
        // A missing neighbour leaf has no bit set: it shares nothing.
        let none = [0u8; PAYLOAD];
        let pb: &[u8] = pp.as_deref().map_or(&none, |x| x.as_slice());
        let nb: &[u8] = np.as_deref().map_or(&none, |x| x.as_slice());
        for (byte, ((&s_bits, &p_bits), &n_bits)) in sp.iter().zip(pb).zip(nb).enumerate() {
            let mut m = s_bits & !p_bits & !n_bits;
            while m != 0 {
                let b = m.trailing_zeros() as u64;
                out(key * LEAF_BITS + byte as u64 * 8 + b);
                m &= m - 1;
            }
        }
        return Ok(());
    }
    for i in 0..FANOUT {
        let c = slot_ptr(&sp, i);
        if c.pba == 0 {
            continue;
        }
        let ck = key * FANOUT as u64 + i as u64;
        let pc = p.map(|sd| Side {
            tree: sd.tree,
            ptr: pp.as_ref().map(|x| slot_ptr(x, i)).unwrap_or_default(),
        });
        let nc = n.map(|sd| Side {
            tree: sd.tree,
            ptr: np.as_ref().map(|x| slot_ptr(x, i)).unwrap_or_default(),
        });
        unique_walk(
            store,
            level - 1,
            ck,
            Side {
                tree: s.tree,
                ptr: c,
            },
            pc,
            nc,
            out,
        )?;
    }
    Ok(())
}

/// The first lba at or past `from` that map tree `root` (clean: on disk)
/// maps to a block, if any. Visits only the nodes that reach past `from`.
fn first_mapped_from<D: BlockDevice>(
    store: &mut Store<D>,
    root: Ptr,
    from: u64,
) -> Result<Option<u64>> {
    fn go<D: BlockDevice>(
        store: &mut Store<D>,
        level: u8,
        key: u64,
        ptr: Ptr,
        from: u64,
    ) -> Result<Option<u64>> {
        // The node at (level, key) covers lbas [key * F^(level+1), (key + 1) * F^(level+1)).
        let span = pow_fanout(level + 1);
        if ptr.pba == 0 || (key + 1).saturating_mul(span) <= from {
            return Ok(None);
        }
        let node = store.load(ptr, KIND_MAP, level)?;
        for i in 0..FANOUT {
            let ck = key * FANOUT as u64 + i as u64;
            if level == 0 {
                if ck >= from && slot_get(&node, i).pba != 0 {
                    return Ok(Some(ck));
                }
            } else if let Some(l) = go(store, level - 1, ck, slot_ptr(&node, i), from)? {
                return Ok(Some(l));
            }
        }
        Ok(None)
    }
    go(store, MAP_DEPTH - 1, 0, root, from)
}

/// A size for people: whole GiB, MiB or KiB when it is one, else bytes.
fn human_size(bytes: u64) -> String {
    for (unit, name) in [(1u64 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")] {
        if bytes >= unit && bytes.is_multiple_of(unit) {
            return format!("{} {name}", bytes / unit);
        }
    }
    format!("{bytes} bytes")
}

fn push_extent(out: &mut Vec<DiffExtent>, lba: u64, kind: DiffKind) {
    if let Some(last) = out.last_mut() {
        if last.kind == kind && last.lba + last.len_blocks == lba {
            last.len_blocks += 1;
            return;
        }
    }
    out.push(DiffExtent {
        lba,
        len_blocks: 1,
        kind,
    });
}

fn diff_walk<D: BlockDevice>(
    store: &mut Store<D>,
    level: u8,
    key: u64,
    base: Ptr,
    target: Ptr,
    out: &mut dyn FnMut(u64, DiffKind, bool),
) -> Result<()> {
    if target.pba == 0 || target.pba == base.pba {
        return Ok(());
    }
    let tp = store.load(target, KIND_MAP, level)?;
    let bp = if base.pba != 0 {
        Some(store.load(base, KIND_MAP, level)?)
    } else {
        None
    };
    for i in 0..FANOUT {
        let t = slot_get(&tp, i);
        let b = bp.as_ref().map(|x| slot_get(x, i)).unwrap_or_default();
        let ck = key * FANOUT as u64 + i as u64;
        if level == 0 {
            if t.pba != 0 && t.pba != b.pba {
                out(ck, DiffKind::Data, b.pba != 0 && t.hash == b.hash);
            } else if t.pba == 0 && b.pba != 0 {
                out(ck, DiffKind::Trim, false);
            }
        } else {
            diff_walk(
                store,
                level - 1,
                ck,
                Ptr {
                    pba: b.pba,
                    birth: b.birth,
                },
                Ptr {
                    pba: t.pba,
                    birth: t.birth,
                },
                out,
            )?;
        }
    }
    Ok(())
}

impl<D: BlockDevice> Pool<D> {
    fn empty(dev: D, uuid: [u8; 16], volumes_max: u32, shard: (u32, u32)) -> Self {
        let total = dev.info().block_count;
        let mut fm = FreeMap::new(total);
        // The superblock slots (in range: a device this small is refused
        // before a pool is made on it).
        for p in 0..total.min(2) {
            let _in_range = fm.set(p).is_ok();
        }
        Pool {
            store: Store::new(dev),
            fm,
            pending: BTreeSet::new(),
            gen: 0,
            uuid,
            volumes_max,
            snapshots_max: SNAPSHOTS_MAX,
            shard_index: shard.0,
            shard_count: shard.1,
            next_vol_id: 1,
            vols: Vec::new(),
            attrs: BTreeMap::new(),
            log: Log::legacy(),
            touched: BTreeSet::new(),
            by_name: HashMap::new(),
            poisoned: None,
            meta_dirty: true,
            changes: 0,
            checked_at: None,
            flights: std::collections::VecDeque::new(),
            flight_meta: 0,
            flights_seq: 0,
            ready: Vec::new(),
            batches: std::collections::VecDeque::new(),
        }
    }

    /// Make a new, empty pool on `dev` (both superblock slots are cleared
    /// first, so an older pool on the device cannot win at mount).
    pub fn format(dev: D, opts: FormatOptions) -> Result<Self> {
        Self::format_region(dev, opts, *Uuid::new_v4().as_bytes(), 0, 1)
    }

    /// Format `dev` as region `shard_index` of a pool of `shard_count`
    /// regions that all carry `uuid` (see `crate::sharded`).
    pub(crate) fn format_region(
        dev: D,
        opts: FormatOptions,
        uuid: [u8; 16],
        shard_index: u32,
        shard_count: u32,
    ) -> Result<Self> {
        if shard_count == 0 || shard_index >= shard_count {
            return Err(Error::Invalid(format!(
                "shard {shard_index} of {shard_count} does not exist"
            )));
        }
        let blocks = dev.info().block_count;
        if blocks < MIN_BLOCKS {
            return Err(Error::DeviceTooSmall {
                blocks,
                min: MIN_BLOCKS,
            });
        }
        if blocks > MAX_BLOCKS {
            return Err(Error::Invalid(format!(
                "device has {blocks} blocks; a pool holds at most {MAX_BLOCKS} (the bit-plane reach)"
            )));
        }
        if opts.volumes_max == 0 {
            return Err(Error::Invalid("volumes_max must be at least 1".into()));
        }
        let mut pool = Pool::empty(dev, uuid, opts.volumes_max, (shard_index, shard_count));
        pool.store.write_raw(
            vec![(0, vec![0u8; BLOCK_SIZE]), (1, vec![0u8; BLOCK_SIZE])],
            false,
        )?;
        pool.cp(None)?;
        Ok(pool)
    }

    /// Mount: the valid superblock with the highest generation wins. A
    /// pool of several shards is refused here (it spans regions of the
    /// device): open it with `crate::sharded::open_sharded`.
    pub fn open(dev: D) -> Result<Self> {
        Self::open_inner(dev, false)
    }

    /// Mount one region (any shard index); the caller checks the shard
    /// fields against the rest of the pool.
    pub(crate) fn open_region(dev: D) -> Result<Self> {
        Self::open_inner(dev, true)
    }

    fn open_inner(dev: D, region: bool) -> Result<Self> {
        let blocks = dev.info().block_count;
        if blocks < 2 {
            return Err(Error::NotAPool);
        }
        let mut store = Store::new(dev);
        let sb = newest_superblock(&store.read_raw(&[0, 1])?)?;
        if !region && sb.shard_count != 1 {
            return Err(Error::Invalid(format!(
                "{} holds a pool of {} shards; open it as a sharded pool (sluice_engine::sharded)",
                store.dev.info().name,
                sb.shard_count
            )));
        }
        if sb.block_count != blocks {
            return Err(Error::Invalid(format!(
                "superblock says {} blocks, device has {}",
                sb.block_count, blocks
            )));
        }
        let mut pool = Pool::empty(
            store.dev,
            sb.uuid,
            sb.volumes_max,
            (sb.shard_index, sb.shard_count),
        );
        pool.gen = sb.gen;
        pool.meta_dirty = false;
        pool.load_catalog(sb.catalog, sb.version)?;
        pool.rebuild_free_map()?;
        Ok(pool)
    }

    /// Read the catalog the superblock of format `version` points at
    /// (`at`): from format 5 on the log, its newest block first, replayed
    /// oldest first; before, the one blob's chain, oldest block first,
    /// which the next CP replaces with a log (crate::catalog).
    fn load_catalog(&mut self, at: Ptr, version: u32) -> Result<()> {
        let kind = if version >= LOG_SINCE {
            KIND_CATALOG_LOG
        } else {
            KIND_CATALOG
        };
        let mut pieces = Vec::new();
        let mut ptr = at;
        let mut seen = HashSet::new();
        while ptr.pba != 0 {
            if ptr.pba >= self.fm.total || !seen.insert(ptr.pba) {
                return Err(Error::CorruptMetadata {
                    pba: ptr.pba,
                    kind: kind_name(kind),
                    reason: "bad or looping chain pointer".into(),
                });
            }
            let raw = self
                .store
                .read_raw(&[ptr.pba])?
                .into_iter()
                .next()
                .unwrap_or_default();
            let payload = decode_block(&raw, ptr, kind, 0)?;
            let mut r = Reader::new(payload, ptr.pba, kind_name(kind));
            let link = r.ptr()?;
            let len = r.u32()? as usize;
            pieces.push((ptr.pba, r.take(len)?.to_vec()));
            ptr = link;
        }
        if version >= LOG_SINCE {
            // Newest first on the device; the records run oldest first.
            pieces.reverse();
        }
        let stream: Vec<u8> = pieces.iter().flat_map(|(_, b)| b.iter().copied()).collect();
        self.log.blocks = pieces.iter().map(|&(pba, _)| pba).collect();
        let loaded = if version >= LOG_SINCE {
            let l = catalog::replay(&stream, at.pba)?;
            self.log.legacy = false;
            self.log.head = at;
            self.log.next_vol_id = l.next_vol_id;
            self.log.image_blocks = catalog::blocks_for(catalog::image_len(&l.vols, &l.attrs));
            l
        } else {
            catalog::decode_blob(&stream, version, at.pba)?
        };
        self.next_vol_id = loaded.next_vol_id;
        self.vols = loaded.vols;
        self.reindex();
        self.attrs = loaded.attrs;
        Ok(())
    }

    /// Mount-time free map: superblocks, catalog, plane nodes (each distinct
    /// node once) and plane bits.
    fn rebuild_free_map(&mut self) -> Result<()> {
        let mut fm = FreeMap::new(self.fm.total);
        fm.set(0)?;
        fm.set(1)?;
        for &c in &self.log.blocks {
            fm.set(c)?;
        }
        let roots: Vec<Ptr> = self.vols.iter().flat_map(Vol::plane_roots).collect();
        let mut bad = None;
        self.plane_blocks(&roots, &mut |p| {
            if let Err(e) = fm.set(p) {
                bad.get_or_insert(e);
            }
        })?;
        if let Some(e) = bad {
            return Err(e);
        }
        self.fm = fm;
        Ok(())
    }

    /// Every block the planes `roots` hold: their nodes (each distinct node
    /// once) and the blocks their bits name. Only clean planes are read
    /// (their dirty nodes are not on the device yet).
    fn plane_blocks(&mut self, roots: &[Ptr], out: &mut dyn FnMut(u64)) -> Result<()> {
        let total = self.fm.total;
        let mut seen = HashSet::new();
        for &root in roots {
            let tree = Tree::plane(root);
            let mut nodes = Vec::new();
            let mut leaves: Vec<(u64, Vec<u8>)> = Vec::new();
            walk_tree(
                &mut self.store,
                &tree,
                &mut |p| {
                    if seen.insert(p) {
                        nodes.push(p);
                        true
                    } else {
                        false
                    }
                },
                &mut |k, pl| leaves.push((k, pl.to_vec())),
            )?;
            for p in nodes {
                out(p);
            }
            for (k, pl) in leaves {
                for (byte, &b) in pl.iter().enumerate() {
                    let mut m = b;
                    while m != 0 {
                        let bit = m.trailing_zeros() as u64;
                        let pba = k * LEAF_BITS + byte as u64 * 8 + bit;
                        if pba >= total {
                            return Err(Error::CorruptMetadata {
                                pba: 0,
                                kind: "plane leaf",
                                reason: format!("plane holds block {pba} beyond the device"),
                            });
                        }
                        out(pba);
                        m &= m - 1;
                    }
                }
            }
        }
        Ok(())
    }

    /// The name index, after volumes were loaded or one was removed (the
    /// indices after it moved down). `touched` follows.
    fn reindex(&mut self) {
        self.by_name = self
            .vols
            .iter()
            .enumerate()
            .map(|(i, v)| (v.name.clone(), i))
            .collect();
    }

    /// Add volume `v` at the end of `vols`, indexed and touched.
    fn push_vol(&mut self, v: Vol) {
        let i = self.vols.len();
        self.by_name.insert(v.name.clone(), i);
        self.touched.insert(i);
        self.vols.push(v);
    }

    /// Remove volume `vi`, noting it for the catalog log.
    fn remove_vol(&mut self, vi: usize) -> Result<()> {
        self.log.volume_gone(vol_at(&self.vols, vi)?);
        self.vols.remove(vi);
        self.touched = std::mem::take(&mut self.touched)
            .into_iter()
            .filter(|&i| i != vi)
            .map(|i| if i > vi { i - 1 } else { i })
            .collect();
        self.reindex();
        Ok(())
    }

    /// The touched volumes (see `touched`).
    fn touched_vols(&self) -> impl Iterator<Item = &Vol> + '_ {
        self.touched.iter().filter_map(|&i| self.vols.get(i))
    }

    fn dirty_nodes(&self) -> usize {
        self.touched_vols()
            .map(|v| v.plane.dirty.len() + v.ns.iter().map(|n| n.tree.dirty.len()).sum::<usize>())
            .sum()
    }

    /// Blocks a CP may need right now (upper bound; docs/FORMAT.md, "Space
    /// reserve"). Per volume: a block for each dirty map node, and the plane
    /// nodes the CP may dirty and write -- each dirty map node's new pba may
    /// dirty a plane path, each dirty plane node is written -- but never
    /// more than a whole live plane, since a CP writes each plane node at
    /// most once. Plus the catalog.
    fn cp_reserve(&self) -> u64 {
        let plane_max = plane_nodes_max(self.fm.total);
        let vols: u64 = self
            .touched_vols()
            .map(|v| {
                let map: u64 = v.ns.iter().map(|n| n.tree.dirty.len() as u64).sum();
                let plane = v.plane.dirty.len() as u64;
                map + (map * PLANE_DEPTH as u64 + plane).min(plane_max)
            })
            .sum();
        vols + self.log.reserve(self.touched_vols(), &self.attrs)
    }

    /// Blocks a write of `n` blocks at `lba` may add to what the pool needs
    /// beyond its data: the map nodes on its lbas' paths (each may become
    /// dirty, and the CP writes each), and the plane nodes that dirtying
    /// them (old versions released, new ones allocated by the CP), setting
    /// its `n` new pbas and clearing the `n` pbas it replaces may dirty --
    /// at most a whole live plane. See [`Pool::cp_reserve`]: this is how
    /// much the write can raise it.
    fn write_meta_need(&self, lba: u64, n: u64) -> u64 {
        let map = map_span_nodes(lba, n);
        let plane = 2 * (map + n) * PLANE_DEPTH as u64;
        map + plane.min(plane_nodes_max(self.fm.total))
    }

    /// Make sure `extra` blocks plus the CP reserve are free, taking a CP
    /// to reclaim pending-free blocks if that helps.
    fn ensure_space(&mut self, extra: u64) -> Result<()> {
        let need = extra + self.cp_reserve();
        if self.fm.free() >= need {
            return Ok(());
        }
        if !self.pending.is_empty() || self.dirty_nodes() > 0 {
            self.cp(None)?;
            let need = extra + self.cp_reserve();
            if self.fm.free() >= need {
                return Ok(());
            }
        }
        Err(Error::NoSpace {
            needed: extra,
            free: self.fm.free().saturating_sub(self.cp_reserve()),
        })
    }

    fn poison(&mut self, e: &Error) {
        if self.poisoned.is_none() {
            self.poisoned = Some(e.to_string());
            tracing::error!(error = %e, "pool poisoned for writes");
        }
    }

    fn check_writable(&self) -> Result<()> {
        match &self.poisoned {
            Some(r) => Err(Error::Poisoned { reason: r.clone() }),
            None => Ok(()),
        }
    }

    /// A consistency point (see the module doc and docs/FORMAT.md).
    fn cp(&mut self, snap: Option<(usize, String, Uuid, u64)>) -> Result<()> {
        self.check_writable()?;
        if snap.is_none() && !self.meta_dirty && self.pending.is_empty() && self.dirty_nodes() == 0
        {
            return Ok(());
        }
        let r = self.cp_inner(snap);
        if let Err(e) = &r {
            self.poison(e);
        }
        r
    }

    fn cp_inner(&mut self, snap: Option<(usize, String, Uuid, u64)>) -> Result<()> {
        let g = self.gen + 1;
        let touched: Vec<usize> = self.touched.iter().copied().collect();
        for vi in touched {
            let v = vol_at(&self.vols, vi)?;
            if v.plane.dirty.is_empty() && v.ns.iter().all(|n| n.tree.dirty.is_empty()) {
                continue;
            }
            for ni in 0..vol_at(&self.vols, vi)?.ns.len() {
                let new = flush_tree(
                    &mut self.store,
                    &mut vol_at_mut(&mut self.vols, &mut self.touched, vi)?
                        .ns_at_mut(ni)?
                        .tree,
                    &mut self.fm,
                    g,
                )?;
                let vol = vol_at_mut(&mut self.vols, &mut self.touched, vi)?;
                let newest = vol.base_plane();
                for p in new {
                    plane_update(
                        &mut self.store,
                        &mut vol.plane,
                        &mut vol.live_count,
                        newest,
                        &mut self.pending,
                        p,
                        true,
                    )?;
                }
            }
            flush_tree(
                &mut self.store,
                &mut vol_at_mut(&mut self.vols, &mut self.touched, vi)?.plane,
                &mut self.fm,
                g,
            )?;
        }
        if let Some((vi, name, id, created)) = snap {
            let v = vol_at_mut(&mut self.vols, &mut self.touched, vi)?;
            let s = Snap {
                id,
                name,
                gen: g,
                created,
                referenced: v.live_count,
                plane: v.plane.root,
                ns: v
                    .ns
                    .iter()
                    .map(|n| (n.name.clone(), n.tree.root, n.digest))
                    .collect(),
            };
            v.push_snap(s);
        }
        let compacted = self.write_catalog(g)?;
        // Everything the new CP references must be durable before its
        // superblock points at it.
        self.store.flush()?;
        let sb = Superblock {
            version: FORMAT_VERSION,
            block_count: self.fm.total,
            gen: g,
            catalog: self.log.head,
            uuid: self.uuid,
            volumes_max: self.volumes_max,
            shard_index: self.shard_index,
            shard_count: self.shard_count,
        };
        self.store.write_raw(vec![(g % 2, sb.encode())], false)?;
        self.store.flush()?;
        // The CP is durable: nothing durable points at pending blocks now.
        self.gen = g;
        if let Some(n) = compacted {
            self.log.image_blocks = n;
        }
        self.touched.clear();
        for p in std::mem::take(&mut self.pending) {
            self.fm.clear(p)?;
        }
        self.meta_dirty = false;
        self.store.stats.checkpoints += 1;
        Ok(())
    }

    /// Step 4 of CP `g`: append the records of what changed to the catalog
    /// log, or, when the log has grown past twice its newest image (plus
    /// [`catalog::LOG_SLACK`] blocks) and the space allows, or it is not
    /// yet in format 5, write a full image as a new log and free the old
    /// one once the CP is durable. The blocks of one CP chain newest to
    /// oldest, the oldest pointing at the log's previous head. Returns the
    /// image's blocks when it wrote one.
    fn write_catalog(&mut self, g: u64) -> Result<Option<u64>> {
        let mut bytes =
            self.log
                .delta(&mut self.vols, &self.touched, &self.attrs, self.next_vol_id);
        let grown = self.log.blocks.len() as u64 + catalog::blocks_for(bytes.len())
            > 2 * self.log.image_blocks + catalog::LOG_SLACK;
        let mut compact = self.log.legacy;
        if !compact && grown {
            // Sized without encoding it: a pool short of space keeps
            // appending, and does not build an image it cannot write.
            let need = catalog::blocks_for(catalog::image_len(&self.vols, &self.attrs));
            compact = self.fm.free() >= 2 * need + self.cp_reserve() + TRIM_HEADROOM;
        }
        if compact {
            bytes = self
                .log
                .image(&mut self.vols, &self.attrs, self.next_vol_id);
        }
        if bytes.is_empty() {
            return Ok(None);
        }
        let pieces: Vec<&[u8]> = bytes.chunks(catalog::PIECE).collect();
        let mut pbas = Vec::with_capacity(pieces.len());
        for _ in 0..pieces.len() {
            pbas.push(self.fm.alloc()?);
        }
        let mut prev = if compact {
            Ptr::default()
        } else {
            self.log.head
        };
        let mut writes = Vec::with_capacity(pbas.len());
        for (piece, &pba) in pieces.iter().zip(&pbas) {
            let mut w = Writer::default();
            w.ptr(prev);
            w.u32(piece.len() as u32);
            w.bytes(piece);
            writes.push((pba, encode_block(KIND_CATALOG_LOG, 0, pba, g, &w.buf)));
            prev = Ptr { pba, birth: g };
        }
        self.store.stats.metadata_blocks_written += writes.len() as u64;
        self.store.write_raw(writes, false)?;
        self.log.head = prev;
        if compact {
            for c in std::mem::replace(&mut self.log.blocks, pbas) {
                self.pending.insert(c);
            }
            self.log.legacy = false;
            Ok(Some(pieces.len() as u64))
        } else {
            self.log.blocks.extend(pbas);
            Ok(None)
        }
    }

    /// A consistency point now (what `Flush` does).
    pub fn checkpoint(&mut self) -> Result<()> {
        if self
            .flights
            .iter()
            .flatten()
            .any(|f| matches!(f, Flight::Read { .. }))
        {
            // It could free, and a later CP reuse, a block a read is reading.
            return Err(Error::Invariant(
                "a consistency point asked for while reads are in flight".into(),
            ));
        }
        self.changes += 1;
        self.cp(None)
    }

    /// Why writes are refused, if they are.
    pub fn poisoned(&self) -> Option<String> {
        self.poisoned.clone()
    }

    pub fn device(&self) -> &D {
        &self.store.dev
    }

    pub fn into_device(self) -> D {
        self.store.dev
    }

    pub fn stats(&self) -> PoolStats {
        self.store.stats
    }

    /// Current CP generation.
    pub fn generation(&self) -> u64 {
        self.gen
    }

    /// The pool uuid (the same in every region of a sharded pool).
    pub fn uuid(&self) -> Uuid {
        Uuid::from_bytes(self.uuid)
    }

    /// `(shard_index, shard_count)`: which region of the pool this is.
    pub fn shard(&self) -> (u32, u32) {
        (self.shard_index, self.shard_count)
    }

    /// The id a volume shows outside: `local_id * shard_count +
    /// shard_index`, unique across the shards of a pool and equal to the
    /// local id when there is one shard.
    fn public_id(&self, local_id: u32) -> u32 {
        local_id
            .wrapping_mul(self.shard_count)
            .wrapping_add(self.shard_index)
    }

    fn vol_idx(&self, name: &str) -> Result<usize> {
        self.by_name
            .get(name)
            .copied()
            .ok_or_else(|| Error::NoSuchVolume(name.to_string()))
    }

    fn ns_idx(&self, ns: &NsName) -> Result<(usize, usize)> {
        let vi = self.vol_idx(&ns.volume)?;
        let ni = vol_at(&self.vols, vi)?
            .ns
            .iter()
            .position(|n| n.name == ns.qtree)
            .ok_or_else(|| Error::NoSuchQtree {
                volume: ns.volume.clone(),
                qtree: ns.qtree.clone().unwrap_or_default(),
            })?;
        Ok((vi, ni))
    }

    fn snap_idx(&self, vi: usize, name: &str) -> Result<usize> {
        let v = vol_at(&self.vols, vi)?;
        v.snaps
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| Error::NoSuchSnapshot {
                volume: v.name.clone(),
                snapshot: name.to_string(),
            })
    }

    /// A client write or trim (`replica: false`) to a read-only volume, or
    /// to a read-only qtree, is refused with an error naming which of the
    /// two is read-only; the replicator's writes (`replica: true`) pass.
    fn check_client_writable(
        &self,
        vi: usize,
        ni: usize,
        ns: &NsName,
        replica: bool,
    ) -> Result<()> {
        if replica {
            return Ok(());
        }
        if vol_at(&self.vols, vi)?.ro {
            return Err(Error::ReadOnly {
                what: "volume",
                name: ns.volume.clone(),
            });
        }
        if vol_at(&self.vols, vi)?.ns_at(ni)?.ro {
            return Err(Error::ReadOnly {
                what: "qtree",
                name: ns.to_string(),
            });
        }
        Ok(())
    }

    fn check_range(&self, vi: usize, ni: usize, ns: &NsName, lba: u64, len: u64) -> Result<()> {
        let size = vol_at(&self.vols, vi)?.ns_at(ni)?.size;
        if len == 0 || lba >= size || len > size - lba {
            return Err(Error::OutOfRange {
                ns: ns.to_string(),
                lba,
                len,
                size,
            });
        }
        Ok(())
    }

    fn vol_info(&self, v: &Vol) -> VolumeInfo {
        VolumeInfo {
            name: v.name.clone(),
            id: self.public_id(v.id),
            // Namespace 0 (the volume's own) always exists.
            size_bytes: v.ns.first().map_or(0, |n| n.size) * BLOCK_SIZE as u64,
            qtrees: v
                .ns
                .iter()
                .skip(1)
                .map(|n| QtreeInfo {
                    name: n.name.clone().unwrap_or_default(),
                    size_bytes: n.size * BLOCK_SIZE as u64,
                    read_only: n.ro,
                })
                .collect(),
            read_only: v.ro,
            // Current, not as of the last CP: the live plane holds every
            // data block at once, but a map node a write dirtied gets its
            // block only at the next CP (its previous version is already
            // released), one block each -- counted here.
            used_blocks: v.live_count + v.ns.iter().map(|n| n.tree.dirty.len() as u64).sum::<u64>(),
            snapshot_count: v.snaps.len(),
            origin: v.origin.and_then(|o| {
                let ov = self.vols.iter().find(|x| x.id == o.vol)?;
                let os = ov.snaps.iter().find(|x| x.id == o.snap)?;
                Some(CloneOrigin {
                    volume: ov.name.clone(),
                    snapshot: os.name.clone(),
                })
            }),
        }
    }

    /// Run many requests; results in input order, as if one after another.
    ///
    /// Consecutive non-FUA writes are validated and allocated one by one,
    /// their data goes to the device as one batch, then they are applied
    /// in order; every other request runs alone.
    pub fn execute_batch(&mut self, reqs: Vec<Request>) -> Vec<Result<Reply>> {
        debug_assert!(
            self.flights.is_empty(),
            "requests run while started requests are in flight"
        );
        let mut out = Vec::with_capacity(reqs.len());
        let mut run: Vec<Request> = Vec::new();
        let mut reads: Vec<Request> = Vec::new();
        for r in reqs {
            if matches!(r, Request::Write { fua: false, .. }) {
                if !reads.is_empty() {
                    out.extend(self.read_run(std::mem::take(&mut reads)));
                }
                run.push(r);
                continue;
            }
            if !run.is_empty() {
                out.extend(self.write_run(std::mem::take(&mut run)));
            }
            if matches!(r, Request::Read { .. }) {
                reads.push(r);
                continue;
            }
            if !reads.is_empty() {
                out.extend(self.read_run(std::mem::take(&mut reads)));
            }
            out.push(self.execute(r));
        }
        if !run.is_empty() {
            out.extend(self.write_run(run));
        }
        if !reads.is_empty() {
            out.extend(self.read_run(reads));
        }
        out
    }

    /// A run of consecutive reads: map every read first, send all their
    /// block reads to the device as one batch (the caller's queue depth
    /// reaches the device), then verify and assemble each. Reads change no
    /// state, so this is the same as running them one after another. If the
    /// batch fails, the reads run again one by one so each gets its own
    /// error.
    fn read_run(&mut self, reqs: Vec<Request>) -> Vec<Result<Reply>> {
        let mut plans = Vec::with_capacity(reqs.len());
        let mut io = Vec::new();
        for r in &reqs {
            let Request::Read {
                image,
                lba,
                len_blocks,
            } = r
            else {
                plans.push(Err(Error::Invalid("non-read in a read run".into())));
                continue;
            };
            let plan = self.read_plan(image, *lba, *len_blocks as u64);
            if let Ok(slots) = &plan {
                io.extend(read_ios(slots));
            }
            plans.push(plan);
        }
        let comps = match self.store.run(io) {
            Ok(c) => c,
            Err(_) => return reqs.into_iter().map(|r| self.execute(r)).collect(),
        };
        let mut comps = comps.into_iter();
        reqs.iter()
            .zip(plans)
            .map(|(r, plan)| {
                let Request::Read { image, lba, .. } = r else {
                    return Err(Error::Invalid("non-read in a read run".into()));
                };
                let slots = plan?;
                self.read_finish(image, *lba, &slots, &mut comps)
                    .map(Reply::Data)
            })
            .collect()
    }

    pub fn execute(&mut self, req: Request) -> Result<Reply> {
        if changes_state(&req) {
            self.changes += 1;
        }
        let r = self.execute_inner(req);
        if self.poisoned.is_none()
            && (self.dirty_nodes() > DIRTY_BOUND || self.pending.len() > PENDING_BOUND)
        {
            self.cp(None)?;
        }
        r
    }

    fn execute_inner(&mut self, req: Request) -> Result<Reply> {
        match req {
            Request::CreateVolume { name, size_bytes } => {
                self.check_writable()?;
                check_name(&name)?;
                let size = check_size(&name, size_bytes)?;
                self.check_new_volume(&name)?;
                self.ensure_space(4)?;
                let id = self.next_vol_id;
                self.next_vol_id += 1;
                self.push_vol(Vol::new(
                    id,
                    name,
                    vec![Ns {
                        name: None,
                        size,
                        tree: Tree::map(Ptr::default()),
                        digest: 0,
                        ro: false,
                    }],
                    Tree::plane(Ptr::default()),
                    0,
                    None,
                ));
                self.meta_dirty = true;
                self.cp(None)?;
                let v = self
                    .vols
                    .last()
                    .ok_or_else(|| Error::Invalid("volume vanished".into()))?;
                Ok(Reply::Volume(self.vol_info(v)))
            }
            Request::CloneVolume {
                origin,
                snapshot,
                name,
            } => self
                .clone_volume(&origin, &snapshot, name)
                .map(Reply::Volume),
            Request::CreateQtree {
                volume,
                name,
                size_bytes,
            } => {
                self.check_writable()?;
                let vi = self.vol_idx(&volume)?;
                check_name(&name)?;
                let size = check_size(&format!("{volume}/{name}"), size_bytes)?;
                if vol_at(&self.vols, vi)?
                    .ns
                    .iter()
                    .any(|n| n.name.as_deref() == Some(&name))
                {
                    return Err(Error::AlreadyExists {
                        what: "qtree",
                        name: format!("{volume}/{name}"),
                    });
                }
                self.ensure_space(4)?;
                vol_at_mut(&mut self.vols, &mut self.touched, vi)?
                    .ns
                    .push(Ns {
                        name: Some(name),
                        size,
                        tree: Tree::map(Ptr::default()),
                        digest: 0,
                        ro: false,
                    });
                self.meta_dirty = true;
                self.cp(None)?;
                Ok(Reply::Volume(self.vol_info(vol_at(&self.vols, vi)?)))
            }
            Request::ListVolumes => Ok(Reply::Volumes(
                self.vols.iter().map(|v| self.vol_info(v)).collect(),
            )),
            Request::SetReadOnly { ns, read_only } => {
                self.check_writable()?;
                let (vi, ni) = self.ns_idx(&ns)?;
                if ni == 0 {
                    vol_at_mut(&mut self.vols, &mut self.touched, vi)?.ro = read_only;
                } else {
                    vol_at_mut(&mut self.vols, &mut self.touched, vi)?
                        .ns_at_mut(ni)?
                        .ro = read_only;
                }
                self.meta_dirty = true;
                self.cp(None)?;
                Ok(Reply::Done)
            }
            Request::Read {
                image,
                lba,
                len_blocks,
            } => self.read(&image, lba, len_blocks as u64).map(Reply::Data),
            Request::Write {
                ns,
                lba,
                data,
                fua,
                replica,
            } => {
                self.write(&ns, lba, &data, replica)?;
                if fua {
                    self.cp(None)?;
                }
                Ok(Reply::Done)
            }
            Request::Trim {
                ns,
                lba,
                len_blocks,
                replica,
            } => {
                self.trim(&ns, lba, len_blocks, replica)?;
                Ok(Reply::Done)
            }
            Request::Flush => {
                self.cp(None)?;
                Ok(Reply::Done)
            }
            Request::CreateSnapshot {
                volume,
                name,
                id,
                created_unix_ms,
            } => {
                self.check_writable()?;
                let vi = self.vol_idx(&volume)?;
                check_name(&name)?;
                if vol_at(&self.vols, vi)?.snaps.iter().any(|s| s.name == name) {
                    return Err(Error::AlreadyExists {
                        what: "snapshot",
                        name: format!("{volume}@{name}"),
                    });
                }
                if vol_at(&self.vols, vi)?.snaps.len() >= self.snapshots_max {
                    return Err(Error::TooManySnapshots {
                        volume,
                        limit: self.snapshots_max,
                    });
                }
                self.ensure_space(4)?;
                let id = id.unwrap_or_else(Uuid::new_v4);
                let created = created_unix_ms.unwrap_or_else(now_ms);
                self.cp(Some((vi, name, id, created)))?;
                let si = vol_at(&self.vols, vi)?.snaps.len() - 1;
                Ok(Reply::Snapshot(self.snap_info(vi, si)?))
            }
            Request::DeleteSnapshot { volume, name } => {
                self.check_writable()?;
                let vi = self.vol_idx(&volume)?;
                let si = self.snap_idx(vi, &name)?;
                self.refuse_clones(vi, si..si + 1)?;
                self.ensure_space(4)?;
                let mut freed = Vec::new();
                let r = self.unique_blocks(vi, si, &mut |p| freed.push(p));
                if let Err(e) = r {
                    self.poison(&e);
                    return Err(e);
                }
                self.pending.extend(freed);
                vol_at_mut(&mut self.vols, &mut self.touched, vi)?.remove_snap(si);
                self.meta_dirty = true;
                self.cp(None)?;
                Ok(Reply::Done)
            }
            Request::ResizeVolume {
                name,
                size_bytes,
                replica,
            } => self.resize(&name, size_bytes, replica).map(Reply::Volume),
            Request::Rollback {
                volume,
                snapshot,
                destroy_newer,
            } => self
                .rollback(&volume, &snapshot, destroy_newer)
                .map(Reply::Volume),
            Request::DeleteVolume { name } => {
                self.check_writable()?;
                let vi = self.vol_idx(&name)?;
                self.refuse_clones(vi, 0..vol_at(&self.vols, vi)?.snaps.len())?;
                self.ensure_space(4)?;
                // Flushed first, every block of the volume is in one of its
                // planes (no dirty map node holds one the planes lack).
                self.cp(None)?;
                let mut freed = Vec::new();
                if let Err(e) = self.volume_blocks(vi, &mut |p| freed.push(p)) {
                    self.poison(&e);
                    return Err(e);
                }
                // Free after the CP that drops the volume from the catalog.
                self.pending.extend(freed);
                self.remove_vol(vi)?;
                self.meta_dirty = true;
                self.cp(None)?;
                Ok(Reply::Done)
            }
            Request::ListSnapshots { volume } => {
                let vi = self.vol_idx(&volume)?;
                let mut out = Vec::new();
                // The clones of every snapshot of the volume, found in one
                // pass over the volumes (not one per snapshot).
                let id = vol_at(&self.vols, vi)?.id;
                let mut clones: HashMap<Uuid, Vec<String>> = HashMap::new();
                for c in &self.vols {
                    if let Some(o) = c.origin.filter(|o| o.vol == id) {
                        clones.entry(o.snap).or_default().push(c.name.clone());
                    }
                }
                for si in 0..vol_at(&self.vols, vi)?.snaps.len() {
                    let mut info = self.snap_info_with(vi, si, Vec::new())?;
                    info.clones = clones.remove(&info.id).unwrap_or_default();
                    out.push(info);
                }
                Ok(Reply::Snapshots(out))
            }
            Request::SnapshotNamesOf { volume, ids } => {
                let v = vol_at(&self.vols, self.vol_idx(&volume)?)?;
                let out = ids
                    .iter()
                    .filter_map(|id| v.snap_by_id(id).and_then(|si| v.snaps.get(si)))
                    .map(Snap::name_info)
                    .collect();
                Ok(Reply::SnapshotNames(out))
            }
            Request::ListSnapshotNames { volume } => {
                let vi = self.vol_idx(&volume)?;
                let out = vol_at(&self.vols, vi)?
                    .snaps
                    .iter()
                    .map(Snap::name_info)
                    .collect();
                Ok(Reply::SnapshotNames(out))
            }
            Request::NewestSnapshot { volume } => {
                let vi = self.vol_idx(&volume)?;
                let v = vol_at(&self.vols, vi)?;
                Ok(Reply::SnapshotNames(
                    v.snaps.last().map(Snap::name_info).into_iter().collect(),
                ))
            }
            Request::Diff { ns, base, target } => {
                self.diff(&ns, base.as_deref(), &target).map(Reply::Diff)
            }
            Request::DiffStats { ns, base, target } => self
                .diff_stats(&ns, base.as_deref(), &target)
                .map(Reply::DiffStats),
            Request::CheckInvariants => self.check_invariants().map(|()| Reply::Done),
            Request::Space => Ok(Reply::Space(SpaceInfo {
                total_blocks: self.fm.total,
                used_blocks: self.fm.used - self.pending.len() as u64,
                free_blocks: self.fm.free(),
                pending_free_blocks: self.pending.len() as u64,
                poisoned_shards: u32::from(self.poisoned.is_some()),
            })),
            Request::SetAttr { key, value } => {
                self.check_writable()?;
                if key.is_empty() || key.len() > 255 {
                    return Err(Error::Invalid(format!(
                        "attribute key {key:?} must be 1..=255 bytes"
                    )));
                }
                // The value it already has changes nothing: no consistency
                // point for it (a table written again with the same bytes,
                // e.g. a retention policy or an export list set again).
                if self.attrs.get(&key) == value.as_ref() {
                    return Ok(Reply::Done);
                }
                match value {
                    Some(v) => {
                        self.ensure_space(2 + v.len() as u64 / PAYLOAD as u64)?;
                        self.attrs.insert(key.clone(), v);
                    }
                    None => {
                        self.attrs.remove(&key);
                    }
                }
                self.log.attrs_dirty.insert(key);
                self.meta_dirty = true;
                Ok(Reply::Done)
            }
            Request::GetAttr { key } => Ok(Reply::Attr(self.attrs.get(&key).cloned())),
        }
    }

    /// [`Request::ResizeVolume`]. A shrink takes a CP first, so every tree
    /// it checks is clean (on disk), then looks for a mapped lba at or past
    /// the new end in the live image and in every snapshot; the new size
    /// is durable at the CP that ends the request (crash before it: the old
    /// size, after it: the new one).
    fn resize(&mut self, name: &str, size_bytes: u64, replica: bool) -> Result<VolumeInfo> {
        self.check_writable()?;
        let vi = self.vol_idx(name)?;
        if vol_at(&self.vols, vi)?.ro && !replica {
            return Err(Error::ReadOnly {
                what: "volume",
                name: name.to_string(),
            });
        }
        let size = check_size(name, size_bytes)?;
        let old = vol_at(&self.vols, vi)?.ns_at(0)?.size;
        if size == old {
            return Ok(self.vol_info(vol_at(&self.vols, vi)?));
        }
        self.ensure_space(4)?;
        if size < old {
            self.cp(None)?;
            let v = vol_at(&self.vols, vi)?;
            let own = v.ns_at(0)?;
            debug_assert!(own.name.is_none(), "namespace 0 is the volume's own");
            debug_assert!(own.tree.dirty.is_empty(), "clean after the CP");
            let mut images: Vec<(String, Ptr)> = vec![("the live image".into(), own.tree.root)];
            for s in &v.snaps {
                if let Some((_, root, _)) = s.ns.iter().find(|(n, _, _)| n.is_none()) {
                    images.push((format!("snapshot {}", s.name), *root));
                }
            }
            for (image, root) in images {
                if let Some(lba) = first_mapped_from(&mut self.store, root, size)? {
                    return Err(Error::MappedPastEnd {
                        volume: name.to_string(),
                        size: human_size(size_bytes),
                        image,
                        lba,
                    });
                }
            }
        }
        vol_at_mut(&mut self.vols, &mut self.touched, vi)?
            .ns_at_mut(0)?
            .size = size;
        self.meta_dirty = true;
        self.cp(None)?;
        debug_assert_eq!(vol_at(&self.vols, vi)?.ns_at(0)?.size, size);
        Ok(self.vol_info(vol_at(&self.vols, vi)?))
    }

    /// [`Request::Rollback`]. A CP first, so the live maps and plane are
    /// clean and every block the live image holds is a bit of its plane.
    /// Then, in memory: each newer snapshot goes as a delete would (its
    /// unique blocks against its neighbours, newest first), the blocks
    /// only the live plane holds (live & !target, and its plane nodes the
    /// target does not share) are released, and the live maps and plane
    /// become the target's roots -- the state right after the target was
    /// taken. One CP makes all of it durable at once: a crash before its
    /// superblock leaves the volume as it was, after it as rolled back;
    /// the released blocks are free only after that CP.
    fn rollback(
        &mut self,
        volume: &str,
        snapshot: &str,
        destroy_newer: bool,
    ) -> Result<VolumeInfo> {
        self.check_writable()?;
        let vi = self.vol_idx(volume)?;
        let si = self.snap_idx(vi, snapshot)?;
        let v = vol_at(&self.vols, vi)?;
        if v.ro {
            return Err(Error::ReadOnly {
                what: "volume",
                name: volume.to_string(),
            });
        }
        if let Some(q) = v.ns.iter().find(|n| n.ro) {
            return Err(Error::ReadOnly {
                what: "qtree",
                name: format!("{volume}/{}", q.name.clone().unwrap_or_default()),
            });
        }
        if destroy_newer {
            self.refuse_clones(vi, si + 1..v.snaps.len())?;
        }
        let v = vol_at(&self.vols, vi)?;
        if si + 1 < v.snaps.len() && !destroy_newer {
            let newer: Vec<&str> = v
                .snaps
                .iter()
                .skip(si + 1)
                .map(|s| s.name.as_str())
                .collect();
            return Err(Error::NewerSnapshots {
                volume: volume.to_string(),
                snapshot: snapshot.to_string(),
                newer: newer.join(", "),
            });
        }
        self.ensure_space(4)?;
        self.cp(None)?;
        let r = self.rollback_apply(vi, si);
        if let Err(e) = &r {
            // The in-memory volume may be half changed; nothing of it is
            // durable. Refuse writes until a reopen reloads the last CP.
            self.poison(e);
        }
        r?;
        self.meta_dirty = true;
        self.cp(None)?;
        Ok(self.vol_info(vol_at(&self.vols, vi)?))
    }

    /// The in-memory part of a rollback of volume `vi` to snapshot `si`
    /// (see [`Pool::rollback`]); the caller took a CP before and takes one
    /// after.
    fn rollback_apply(&mut self, vi: usize, si: usize) -> Result<()> {
        let mut freed = Vec::new();
        while vol_at(&self.vols, vi)?.snaps.len() > si + 1 {
            let newest = vol_at(&self.vols, vi)?.snaps.len() - 1;
            self.unique_blocks(vi, newest, &mut |p| freed.push(p))?;
            vol_at_mut(&mut self.vols, &mut self.touched, vi)?.remove_snap(newest);
        }
        let v = vol_at(&self.vols, vi)?;
        if !v.plane.dirty.is_empty() || v.ns.iter().any(|n| !n.tree.dirty.is_empty()) {
            return Err(Error::Invariant(format!(
                "volume {}: dirty nodes after the CP before a rollback",
                v.name
            )));
        }
        let live = Tree::plane(v.plane.root);
        let target = Tree::plane(v.snap_at(si)?.plane);
        unique_walk(
            &mut self.store,
            live.top(),
            0,
            Side {
                tree: &live,
                ptr: live.root,
            },
            Some(Side {
                tree: &target,
                ptr: target.root,
            }),
            None,
            &mut |p| freed.push(p),
        )?;
        let v = vol_at_mut(&mut self.vols, &mut self.touched, vi)?;
        let s = v.snap_at(si)?.clone();
        v.plane = Tree::plane(s.plane);
        v.live_count = s.referenced;
        for n in v.ns.iter_mut() {
            let (root, digest) =
                s.ns.iter()
                    .find(|(name, _, _)| *name == n.name)
                    .map(|(_, r, d)| (*r, *d))
                    // A qtree created after the snapshot: empty in its image.
                    .unwrap_or((Ptr::default(), 0));
            n.tree = Tree::map(root);
            n.digest = digest;
        }
        self.pending.extend(freed);
        Ok(())
    }

    fn snap_info(&mut self, vi: usize, si: usize) -> Result<SnapshotInfo> {
        let clones = self.clones_of(vi, si)?;
        self.snap_info_with(vi, si, clones)
    }

    /// [`Pool::snap_info`] with the clones already known.
    fn snap_info_with(
        &mut self,
        vi: usize,
        si: usize,
        clones: Vec<String>,
    ) -> Result<SnapshotInfo> {
        let mut unique = 0u64;
        self.unique_blocks(vi, si, &mut |_| unique += 1)?;
        let s = vol_at(&self.vols, vi)?.snap_at(si)?;
        Ok(SnapshotInfo {
            name: s.name.clone(),
            id: s.id,
            gen: s.gen,
            created_unix_ms: s.created,
            digests: s.ns.iter().map(|(n, _, d)| (n.clone(), *d)).collect(),
            referenced_blocks: s.referenced,
            unique_blocks: unique,
            clones,
        })
    }

    /// The names of the volumes cloned from snapshot `si` of volume `vi`.
    fn clones_of(&self, vi: usize, si: usize) -> Result<Vec<String>> {
        let v = vol_at(&self.vols, vi)?;
        let s = v.snap_at(si)?;
        Ok(self
            .vols
            .iter()
            .filter(|c| c.origin.is_some_and(|o| o.vol == v.id && o.snap == s.id))
            .map(|c| c.name.clone())
            .collect())
    }

    /// Refuse ([`Error::HasClones`]) when any snapshot in `range` of volume
    /// `vi` has a clone: deleting it would take blocks the clone holds.
    fn refuse_clones(&self, vi: usize, range: std::ops::Range<usize>) -> Result<()> {
        let v = vol_at(&self.vols, vi)?;
        // One pass over the volumes: the first snapshot in `range` (oldest
        // first) that any of them was cloned from.
        let first = self
            .vols
            .iter()
            .filter_map(|c| c.origin.filter(|o| o.vol == v.id))
            .filter_map(|o| v.snap_by_id(&o.snap))
            .filter(|si| range.contains(si))
            .min();
        let Some(si) = first else {
            return Ok(());
        };
        Err(Error::HasClones {
            volume: v.name.clone(),
            snapshot: v.snap_at(si)?.name.clone(),
            clones: self.clones_of(vi, si)?.join(", "),
        })
    }

    /// A new volume may be named `name`: no volume has the name, and the
    /// pool is below its volume limit.
    fn check_new_volume(&self, name: &str) -> Result<()> {
        if self.by_name.contains_key(name) {
            return Err(Error::AlreadyExists {
                what: "volume",
                name: name.to_string(),
            });
        }
        if self.vols.len() >= self.volumes_max as usize {
            return Err(Error::TooManyVolumes {
                limit: self.volumes_max,
            });
        }
        Ok(())
    }

    /// [`Request::CloneVolume`]: the new volume's live image is the
    /// snapshot's (its map roots, digests, plane root and count), so it
    /// shares every block and plane node with it; one CP makes it durable
    /// (a crash before its superblock: no clone; after: the whole clone).
    fn clone_volume(&mut self, origin: &str, snapshot: &str, name: String) -> Result<VolumeInfo> {
        self.check_writable()?;
        check_name(&name)?;
        let vi = self.vol_idx(origin)?;
        let si = self.snap_idx(vi, snapshot)?;
        self.check_new_volume(&name)?;
        self.ensure_space(4)?;
        let o = vol_at(&self.vols, vi)?;
        let s = o.snap_at(si)?;
        let mut ns = Vec::with_capacity(s.ns.len());
        for (n, root, digest) in &s.ns {
            // Snapshots record no size: they are read at the namespace's
            // current size, and so is the clone made. Qtrees are never
            // removed, so every namespace of a snapshot is live.
            let size =
                o.ns.iter()
                    .find(|x| x.name == *n)
                    .map(|x| x.size)
                    .ok_or_else(|| {
                        Error::Invariant(format!(
                            "snapshot {origin}@{snapshot} has namespace {n:?} its volume lacks"
                        ))
                    })?;
            ns.push(Ns {
                name: n.clone(),
                size,
                tree: Tree::map(*root),
                digest: *digest,
                ro: false,
            });
        }
        let vol = Vol::new(
            self.next_vol_id,
            name,
            ns,
            Tree::plane(s.plane),
            s.referenced,
            Some(Origin {
                vol: o.id,
                snap: s.id,
                plane: s.plane,
            }),
        );
        self.next_vol_id += 1;
        self.push_vol(vol);
        self.meta_dirty = true;
        self.cp(None)?;
        let v = self
            .vols
            .last()
            .ok_or_else(|| Error::Invariant("the clone vanished".into()))?;
        Ok(self.vol_info(v))
    }

    /// Every block deleting volume `vi` frees (its planes clean: after a
    /// CP): what its planes hold, less what a clone's origin holds (the
    /// origin snapshot keeps those).
    fn volume_blocks(&mut self, vi: usize, out: &mut dyn FnMut(u64)) -> Result<()> {
        let v = vol_at(&self.vols, vi)?;
        let roots: Vec<Ptr> = v.plane_roots().collect();
        let Some(origin) = v.origin else {
            return self.plane_blocks(&roots, out);
        };
        let base = Tree::plane(origin.plane);
        let mut seen = HashSet::new();
        for root in roots {
            let tree = Tree::plane(root);
            unique_walk(
                &mut self.store,
                tree.top(),
                0,
                Side {
                    tree: &tree,
                    ptr: root,
                },
                Some(Side {
                    tree: &base,
                    ptr: base.root,
                }),
                None,
                &mut |p| {
                    if seen.insert(p) {
                        out(p)
                    }
                },
            )?;
        }
        Ok(())
    }

    /// The blocks deleting snapshot `si` alone would free.
    fn unique_blocks(&mut self, vi: usize, si: usize, out: &mut dyn FnMut(u64)) -> Result<()> {
        let v = vol_at(&self.vols, vi)?;
        let s_tree = Tree::plane(v.snap_at(si)?.plane);
        // The older neighbour (for the oldest snapshot: a clone's origin,
        // else none) and the newer one (the live plane for the newest).
        let p_tree = match si.checked_sub(1) {
            Some(older) => Some(Tree::plane(v.snap_at(older)?.plane)),
            None => v.origin.map(|o| Tree::plane(o.plane)),
        };
        let n_tree = match v.snaps.get(si + 1) {
            Some(newer) => Tree::plane(newer.plane),
            None => v.plane.clone(),
        };
        let top = s_tree.top();
        unique_walk(
            &mut self.store,
            top,
            0,
            Side {
                tree: &s_tree,
                ptr: s_tree.root,
            },
            p_tree.as_ref().map(|t| Side {
                tree: t,
                ptr: t.root,
            }),
            Some(Side {
                tree: &n_tree,
                ptr: n_tree.root,
            }),
            out,
        )
    }

    fn image_tree(&self, image: &Image) -> Result<(usize, usize, Tree)> {
        let (vi, ni) = self.ns_idx(&image.ns)?;
        match &image.snapshot {
            None => Ok((vi, ni, vol_at(&self.vols, vi)?.ns_at(ni)?.tree.clone())),
            Some(sn) => {
                let si = self.snap_idx(vi, sn)?;
                let s = vol_at(&self.vols, vi)?.snap_at(si)?;
                let root =
                    s.ns.iter()
                        .find(|(n, _, _)| *n == image.ns.qtree)
                        .map(|x| x.1)
                        .ok_or_else(|| Error::NoSuchSnapshot {
                            volume: image.ns.to_string(),
                            snapshot: sn.clone(),
                        })?;
                Ok((vi, ni, Tree::map(root)))
            }
        }
    }

    fn read(&mut self, image: &Image, lba: u64, len: u64) -> Result<AlignedBuf> {
        let slots = self.read_plan(image, lba, len)?;
        let comps = self.store.run(read_ios(&slots).collect())?;
        self.read_finish(image, lba, &slots, &mut comps.into_iter())
    }

    /// Map a read: the slot of every block (pba 0 = hole, reads as zeroes).
    fn read_plan(&mut self, image: &Image, lba: u64, len: u64) -> Result<Vec<Slot>> {
        let (vi, ni) = self.ns_idx(&image.ns)?;
        self.check_range(vi, ni, &image.ns, lba, len)?;
        if len > READ_BLOCKS_MAX {
            return Err(Error::Invalid(format!(
                "read of {len} blocks; at most {READ_BLOCKS_MAX} per request"
            )));
        }
        let tree = if image.snapshot.is_none() {
            // Borrow-free: the live tree may be large in dirty nodes; walk it in place.
            None
        } else {
            Some(self.image_tree(image)?.2)
        };
        let mut slots = Vec::with_capacity(len as usize);
        let mut leaf_cache: Option<(u64, Option<std::sync::Arc<Vec<u8>>>)> = None;
        for i in 0..len {
            let l = lba + i;
            let key = l / FANOUT as u64;
            if leaf_cache.as_ref().is_none_or(|(k, _)| *k != key) {
                let t = match &tree {
                    Some(t) => t,
                    None => &vol_at(&self.vols, vi)?.ns_at(ni)?.tree,
                };
                let leaf = get_leaf(&mut self.store, t, key)?;
                leaf_cache = Some((key, leaf));
            }
            let s = match &leaf_cache {
                Some((_, Some(p))) => slot_get(p, (l % FANOUT as u64) as usize),
                _ => Slot::default(),
            };
            slots.push(s);
        }
        Ok(slots)
    }

    /// Verify and assemble a mapped read from its completions, taken in
    /// order from `ci` (one per mapped slot).
    fn read_finish(
        &mut self,
        image: &Image,
        lba: u64,
        slots: &[Slot],
        ci: &mut impl Iterator<Item = IoCompletion>,
    ) -> Result<AlignedBuf> {
        // Take exactly this read's completions before anything can fail, so
        // the next read of a run starts at its own.
        let runs = read_runs(slots);
        let mine: Vec<IoCompletion> = ci.by_ref().take(runs.len()).collect();
        self.store.stats.data_blocks_read += runs.iter().map(|r| r.1 as u64).sum::<u64>();
        // One device read covering the whole request (the usual case): its
        // buffer is the answer, verified in place and not copied.
        let whole = matches!(runs.as_slice(), [(0, len, _)] if *len == slots.len());
        let mut out: Option<AlignedBuf> = None;
        for ((start, len, _), c) in runs.into_iter().zip(mine) {
            let data = c
                .buf
                .ok_or_else(|| Error::Invalid("read completion without buffer".into()))?;
            for (k, (i, s)) in slots.iter().enumerate().skip(start).take(len).enumerate() {
                if xxhash_rust::xxh3::xxh3_64(data.block(k)) != s.hash {
                    return Err(Error::DataChecksum {
                        vol: image.ns.to_string(),
                        lba: lba + i as u64,
                        pba: s.pba,
                    });
                }
            }
            if whole && data.len_blocks() == slots.len() {
                return Ok(data);
            }
            let o = out.get_or_insert_with(|| AlignedBuf::zeroed(slots.len()));
            for (k, i) in (start..start + len).enumerate() {
                o.block_mut(i).copy_from_slice(data.block(k));
            }
        }
        Ok(out.unwrap_or_else(|| AlignedBuf::zeroed(slots.len())))
    }

    /// Point slot `lba` of namespace (vi, ni) at `new` (pba 0 = hole),
    /// releasing what it replaces.
    fn set_slot(&mut self, vi: usize, ni: usize, lba: u64, new: Slot) -> Result<()> {
        let key = lba / FANOUT as u64;
        let idx = (lba % FANOUT as u64) as usize;
        let mut rel = Vec::new();
        let r = make_dirty(
            &mut self.store,
            &mut vol_at_mut(&mut self.vols, &mut self.touched, vi)?
                .ns_at_mut(ni)?
                .tree,
            0,
            key,
            &mut rel,
        );
        for (_, _, ptr) in rel {
            release_live(
                &mut self.store,
                vol_at_mut(&mut self.vols, &mut self.touched, vi)?,
                &mut self.pending,
                ptr.pba,
            )?;
        }
        r?;
        let leaf = vol_at_mut(&mut self.vols, &mut self.touched, vi)?
            .ns_at_mut(ni)?
            .tree
            .dirty
            .get_mut(&(0, key))
            .ok_or_else(|| Error::Invalid("map leaf not dirty".into()))?;
        let old = slot_get(leaf, idx);
        slot_set(leaf, idx, new);
        let ns = vol_at_mut(&mut self.vols, &mut self.touched, vi)?.ns_at_mut(ni)?;
        if old.pba != 0 {
            ns.digest = ns.digest.wrapping_sub(digest_term(lba, old.hash));
        }
        if new.pba != 0 {
            ns.digest = ns.digest.wrapping_add(digest_term(lba, new.hash));
            let vol = vol_at_mut(&mut self.vols, &mut self.touched, vi)?;
            let newest = vol.base_plane();
            plane_update(
                &mut self.store,
                &mut vol.plane,
                &mut vol.live_count,
                newest,
                &mut self.pending,
                new.pba,
                true,
            )?;
        }
        if old.pba != 0 {
            release_live(
                &mut self.store,
                vol_at_mut(&mut self.vols, &mut self.touched, vi)?,
                &mut self.pending,
                old.pba,
            )?;
        }
        Ok(())
    }

    fn write(&mut self, ns: &NsName, lba: u64, data: &AlignedBuf, replica: bool) -> Result<()> {
        let (vi, ni, pbas, _) = self.write_prepare(ns, lba, data, replica, 0)?;
        let writes = pbas.iter().enumerate().map(|(i, &p)| (p, data.block(i)));
        self.write_data(Vec::new(), writes, &pbas)?;
        self.write_apply(vi, ni, lba, &block_hashes(data), &pbas)
    }

    /// Validate a write and allocate its data blocks. `pending_meta`: the
    /// metadata need ([`Pool::write_meta_need`]) of earlier writes in the
    /// same batch, allocated but not applied yet (so not yet counted by
    /// [`Pool::cp_reserve`]). Returns the volume and namespace index, the
    /// fresh pbas and this write's own metadata need.
    fn write_prepare(
        &mut self,
        ns: &NsName,
        lba: u64,
        data: &AlignedBuf,
        replica: bool,
        pending_meta: u64,
    ) -> Result<(usize, usize, Vec<u64>, u64)> {
        self.check_writable()?;
        let (vi, ni) = self.ns_idx(ns)?;
        self.check_client_writable(vi, ni, ns, replica)?;
        if !data.len_bytes().is_multiple_of(BLOCK_SIZE) {
            return Err(Error::Invalid(format!(
                "write of {} bytes is not whole blocks",
                data.len_bytes()
            )));
        }
        let n = data.len_blocks() as u64;
        self.check_range(vi, ni, ns, lba, n)?;
        // Writes leave TRIM_HEADROOM free so that a full pool can still
        // trim (and delete snapshots) to make room.
        let meta = self.write_meta_need(lba, n);
        self.ensure_space(n + meta + pending_meta + TRIM_HEADROOM)?;
        let mut pbas = Vec::with_capacity(n as usize);
        for _ in 0..n {
            match self.fm.alloc() {
                Ok(p) => pbas.push(p),
                Err(e) => {
                    for &p in &pbas {
                        self.fm.clear(p)?;
                    }
                    return Err(e);
                }
            }
        }
        Ok((vi, ni, pbas, meta))
    }

    /// Write data to fresh pbas in one batch: `whole` buffers as they are
    /// (each at its first pba), `writes` block by block (coalesced where
    /// pbas follow each other). On failure the pbas (`pbas`: all of them)
    /// are unallocated again (nothing references them) and the pool is
    /// poisoned.
    fn write_data<'a>(
        &mut self,
        whole: Vec<(u64, AlignedBuf)>,
        writes: impl IntoIterator<Item = (u64, &'a [u8])>,
        pbas: &[u64],
    ) -> Result<()> {
        let n = pbas.len() as u64;
        if let Err(e) = self.store.write_mixed(whole, writes, false) {
            for &p in pbas {
                self.fm.clear(p)?;
            }
            self.poison(&e);
            return Err(e);
        }
        self.store.stats.data_blocks_written += n;
        Ok(())
    }

    /// Point the map at data blocks already written (`hashes`: of each).
    fn write_apply(
        &mut self,
        vi: usize,
        ni: usize,
        lba: u64,
        hashes: &[u64],
        pbas: &[u64],
    ) -> Result<()> {
        let birth = self.gen + 1;
        if let Err(e) = self.apply_run(vi, ni, lba, birth, hashes, pbas) {
            self.poison(&e);
            return Err(e);
        }
        Ok(())
    }

    /// Point slots `lba..` of namespace (vi, ni) at the fresh `pbas`
    /// (`hashes`: of each), one map leaf at a time: each leaf the run
    /// covers is made dirty once (one path walk), its slots are set, and
    /// then the live plane takes the new pbas and releases the replaced
    /// ones a plane leaf at a time. The end state is that of one
    /// [`Pool::set_slot`] per block in order: the new pbas are fresh
    /// (allocated, in no plane, distinct from every replaced block and
    /// map node), so the plane and pending-free updates commute.
    fn apply_run(
        &mut self,
        vi: usize,
        ni: usize,
        lba: u64,
        birth: u64,
        hashes: &[u64],
        pbas: &[u64],
    ) -> Result<()> {
        if hashes.len() != pbas.len() {
            return Err(Error::Invalid("one hash per written block".into()));
        }
        let fanout = FANOUT as u64;
        let mut olds: Vec<u64> = Vec::new();
        let mut done = 0usize;
        while let (Some(rest), Some(rest_h)) = (
            pbas.get(done..).filter(|r| !r.is_empty()),
            hashes.get(done..),
        ) {
            let first = lba + done as u64;
            let key = first / fanout;
            let idx0 = (first % fanout) as usize;
            let take = (FANOUT - idx0).min(rest.len());
            let mut rel = Vec::new();
            let r = make_dirty(
                &mut self.store,
                &mut vol_at_mut(&mut self.vols, &mut self.touched, vi)?
                    .ns_at_mut(ni)?
                    .tree,
                0,
                key,
                &mut rel,
            );
            if !rel.is_empty() {
                let nodes: Vec<u64> = rel.iter().map(|(_, _, ptr)| ptr.pba).collect();
                release_live_many(
                    &mut self.store,
                    vol_at_mut(&mut self.vols, &mut self.touched, vi)?,
                    &mut self.pending,
                    &nodes,
                )?;
            }
            r?;
            let ns = vol_at_mut(&mut self.vols, &mut self.touched, vi)?.ns_at_mut(ni)?;
            let leaf = ns
                .tree
                .dirty
                .get_mut(&(0, key))
                .ok_or_else(|| Error::Invalid("map leaf not dirty".into()))?;
            let mut digest = ns.digest;
            for (j, (&pba, &hash)) in rest.iter().zip(rest_h).take(take).enumerate() {
                let l = first + j as u64;
                let new = Slot { pba, birth, hash };
                let old = slot_get(leaf, idx0 + j);
                slot_set(leaf, idx0 + j, new);
                if old.pba != 0 {
                    digest = digest.wrapping_sub(digest_term(l, old.hash));
                    olds.push(old.pba);
                }
                if new.pba != 0 {
                    digest = digest.wrapping_add(digest_term(l, new.hash));
                }
            }
            ns.digest = digest;
            done += take;
        }
        let vol = vol_at_mut(&mut self.vols, &mut self.touched, vi)?;
        let newest = vol.base_plane();
        let fresh: Vec<u64> = pbas.iter().copied().filter(|&p| p != 0).collect();
        plane_update_many(
            &mut self.store,
            &mut vol.plane,
            &mut vol.live_count,
            newest,
            &mut self.pending,
            &fresh,
            true,
        )?;
        if !olds.is_empty() {
            release_live_many(
                &mut self.store,
                vol_at_mut(&mut self.vols, &mut self.touched, vi)?,
                &mut self.pending,
                &olds,
            )?;
        }
        Ok(())
    }

    /// Validate and allocate each write of a run of non-FUA writes
    /// (`pending_meta`: what writes allocated before and not yet applied
    /// may add to the CP reserve), and build the device requests of their
    /// data: a write of several blocks on consecutive pbas goes in its own
    /// buffer, uncopied; single blocks are gathered into runs. Returns the
    /// writes (data moved into the requests), the requests and the
    /// writes' metadata need.
    fn prepare_run(&mut self, run: Vec<Request>, mut pending_meta: u64) -> PreparedRun {
        let meta0 = pending_meta;
        let mut prepared: Vec<Result<PreparedWrite>> = Vec::new();
        for r in run {
            self.changes += 1;
            if let Request::Write {
                ns,
                lba,
                data,
                replica,
                ..
            } = r
            {
                match self.write_prepare(&ns, lba, &data, replica, pending_meta) {
                    Ok((vi, ni, pbas, meta)) => {
                        pending_meta += meta;
                        prepared.push(Ok(PreparedWrite {
                            vi,
                            ni,
                            lba,
                            hashes: block_hashes(&data),
                            data: Some(data),
                            pbas,
                            meta,
                        }));
                    }
                    Err(e) => prepared.push(Err(e)),
                }
            } else {
                prepared.push(Err(Error::Invalid("not a write".into())));
            }
        }
        let mut whole = Vec::new();
        for p in prepared.iter_mut().flatten() {
            let n = p.pbas.len();
            let consecutive = p
                .pbas
                .windows(2)
                .all(|w| matches!(w, [a, b] if *b == a + 1));
            if n > 1 && n <= COALESCE_MAX && consecutive {
                if let (Some(&first), Some(d)) = (p.pbas.first(), p.data.take()) {
                    whole.push((first, d));
                }
            }
        }
        let writes = prepared.iter().flatten().flat_map(|p| {
            p.data
                .iter()
                .flat_map(|d| p.pbas.iter().enumerate().map(|(i, &pba)| (pba, d.block(i))))
        });
        let requests = mixed_requests(whole, writes, false);
        // The requests own their buffers now.
        for p in prepared.iter_mut().flatten() {
            p.data = None;
        }
        PreparedRun {
            writes: prepared,
            requests,
            meta: pending_meta - meta0,
        }
    }

    /// The end of one write whose data went to the device (`failed`: the
    /// first error of its device requests): on success, and with the pool
    /// unpoisoned, its metadata is applied; else its pbas are unallocated
    /// again (nothing references them), the pool poisoned, and the write
    /// answered `Poisoned`. Writes are finished in the order they started,
    /// so a later write of an lba wins.
    fn finish_write(
        &mut self,
        write: Result<PreparedWrite>,
        failed: Option<Error>,
    ) -> Result<Reply> {
        let p = write?;
        if let Some(e) = failed {
            self.poison(&e);
        }
        if let Some(reason) = self.poisoned.clone() {
            for &pba in &p.pbas {
                if let Err(e) = self.fm.clear(pba) {
                    self.poison(&e);
                }
            }
            return Err(Error::Poisoned { reason });
        }
        self.store.stats.data_blocks_written += p.pbas.len() as u64;
        self.write_apply(p.vi, p.ni, p.lba, &p.hashes, &p.pbas)
            .map(|_| Reply::Done)
    }

    /// A CP once the dirty or pending-free bound is passed (after writes
    /// were applied).
    fn cp_if_over_bounds(&mut self) {
        if self.poisoned.is_none()
            && (self.dirty_nodes() > DIRTY_BOUND || self.pending.len() > PENDING_BOUND)
        {
            if let Err(e) = self.cp(None) {
                tracing::error!(error = %e, "checkpoint after a write batch failed");
            }
        }
    }

    /// A run of non-FUA writes from one batch: validate and allocate each,
    /// write all their data in one device batch, then apply them in order.
    fn write_run(&mut self, run: Vec<Request>) -> Vec<Result<Reply>> {
        let r = self.prepare_run(run, self.flight_meta);
        if !r.requests.is_empty() {
            if let Err(e) = self.store.run(r.requests) {
                self.poison(&e);
            }
        }
        let out = r
            .writes
            .into_iter()
            .map(|w| self.finish_write(w, None))
            .collect();
        self.cp_if_over_bounds();
        out
    }

    /// Start a batch of plain (non-FUA) writes, or of reads: each write is
    /// validated and allocated now, each read mapped, and their device
    /// requests submitted without waiting. The requests have sequence
    /// numbers `first ..` (the caller's count of the requests it started),
    /// and every answer names its request by its number: it comes from this
    /// call or from [`Pool::reap`] as soon as the request's own data is
    /// done, a write's once every write before it is applied too (writes
    /// are applied in start order), a read's whatever the others do. So a
    /// caller keeps the device busy with the next requests while earlier
    /// ones complete. Writes and reads are never in flight together (a
    /// write may run a CP, which frees blocks a read in flight may still be
    /// reading): a batch of the other kind, or of anything else (run at
    /// once, as by [`Pool::execute_batch`]), first waits for every started
    /// request, whose answers this call returns. Anything else must wait
    /// until [`Pool::in_flight`] is 0 (the shard loop reaps them all
    /// first): it sees every started write applied.
    #[must_use = "answers for their callers"]
    pub fn start(&mut self, first: u64, batch: Vec<Request>) -> Vec<Answer> {
        let reads = batch.iter().all(|r| matches!(r, Request::Read { .. }));
        let writes = batch
            .iter()
            .all(|r| matches!(r, Request::Write { fua: false, .. }));
        let mut out = Vec::new();
        let other_kind_in_flight = self.flights.iter().flatten().any(|f| match f {
            Flight::Write { .. } => !writes,
            Flight::Read { .. } => !reads,
        });
        let in_sequence = self.flights_seq + self.flights.len() as u64 == first;
        if other_kind_in_flight || !(reads || writes) || !in_sequence {
            while !self.flights.is_empty() {
                out.extend(self.reap(true));
            }
        }
        if self.flights.is_empty() {
            self.flights_seq = first;
        }
        let (requests, covers) = if writes {
            let r = self.prepare_run(batch, self.flight_meta);
            self.flight_meta += r.meta;
            let covers = request_covers(&r.writes, &r.requests, first);
            for w in r.writes {
                self.flights.push_back(Some(Flight::Write {
                    write: w,
                    outstanding: 0,
                    failed: None,
                }));
            }
            for &(lo, hi) in &covers {
                for seq in lo..=hi {
                    if let Some(f) = self.flight_mut(seq) {
                        *f.outstanding() += 1;
                    }
                }
            }
            (r.requests, covers)
        } else if reads {
            let mut requests = Vec::new();
            let mut covers = Vec::new();
            for (k, r) in batch.into_iter().enumerate() {
                let seq = first + k as u64;
                let Request::Read {
                    image,
                    lba,
                    len_blocks,
                } = r
                else {
                    continue;
                };
                let plan = self.read_plan(&image, lba, len_blocks as u64);
                let mut outstanding = 0;
                if let Ok(slots) = &plan {
                    // A read's device requests carry its data alone.
                    for io in read_ios(slots) {
                        requests.push(io);
                        covers.push((seq, seq));
                        outstanding += 1;
                    }
                }
                if outstanding == 0 {
                    // Refused, or all holes: answered at the next reap.
                    self.ready.push(seq);
                }
                self.flights.push_back(Some(Flight::Read {
                    image,
                    lba,
                    len_blocks,
                    plan,
                    outstanding,
                    failed: false,
                    comps: Vec::new(),
                }));
            }
            (requests, covers)
        } else {
            let results = self.execute_batch(batch);
            out.extend((first..).zip(results));
            return out;
        };
        if !requests.is_empty() {
            let first_tag = self.store.start(requests);
            self.batches.push_back(FlightBatch {
                first_tag,
                left: covers.len() as u64,
                covers,
            });
        }
        out
    }

    /// The started request with sequence number `seq`, if in flight.
    fn flight_mut(&mut self, seq: u64) -> Option<&mut Flight> {
        let i = usize::try_from(seq.checked_sub(self.flights_seq)?).ok()?;
        self.flights.get_mut(i)?.as_mut()
    }

    /// Requests started and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.flights.iter().flatten().count()
    }

    /// Note one device completion of a started request.
    fn flight_completed(&mut self, c: IoCompletion) {
        let Some(b) = self
            .batches
            .iter_mut()
            .find(|b| (b.first_tag..b.first_tag + b.covers.len() as u64).contains(&c.tag))
        else {
            tracing::error!(
                tag = c.tag,
                "a completion no started request is waiting for"
            );
            return;
        };
        let cover = usize::try_from(c.tag - b.first_tag)
            .ok()
            .and_then(|i| b.covers.get(i).copied());
        b.left = b.left.saturating_sub(1);
        if b.left == 0 {
            self.batches.retain(|b| b.left > 0);
        }
        let Some((lo, hi)) = cover else {
            return;
        };
        let device = self.store.dev.info().name.clone();
        let mut c = Some(c);
        let mut done_read = None;
        for seq in lo..=hi {
            let Some(f) = self.flight_mut(seq) else {
                continue;
            };
            match f {
                Flight::Write {
                    outstanding,
                    failed,
                    ..
                } => {
                    *outstanding = outstanding.saturating_sub(1);
                    if let (Some(Err(e)), None) = (c.as_ref().map(|c| &c.result), &failed) {
                        *failed = Some(Error::Io {
                            device: device.clone(),
                            op: "write",
                            pba: c.as_ref().map_or(0, |c| c.pba),
                            source: std::io::Error::new(e.kind(), e.to_string()),
                        });
                    }
                }
                Flight::Read {
                    outstanding,
                    failed,
                    comps,
                    ..
                } => {
                    *outstanding = outstanding.saturating_sub(1);
                    if let Some(c) = c.take() {
                        *failed |= c.result.is_err();
                        comps.push(c);
                    }
                    if *outstanding == 0 {
                        done_read = Some(seq);
                    }
                }
            }
        }
        self.ready.extend(done_read);
    }

    /// Nothing more will complete (the device failed or lost requests):
    /// every started request ends now, writes as failed (the pool is
    /// poisoned), reads to be retried one by one for their own errors.
    fn flights_lost(&mut self, e: &Error) {
        self.poison(e);
        self.batches.clear();
        for (seq, f) in (self.flights_seq..).zip(self.flights.iter_mut()) {
            if let Some(f) = f {
                let was = std::mem::take(f.outstanding());
                if let Flight::Read { failed, .. } = f {
                    *failed = true;
                    if was > 0 {
                        self.ready.push(seq);
                    }
                }
            }
        }
    }

    /// The answer of a started request whose device requests are all done.
    fn finish_flight(&mut self, f: Flight) -> Result<Reply> {
        match f {
            Flight::Write { write, failed, .. } => {
                if let Ok(w) = &write {
                    self.flight_meta = self.flight_meta.saturating_sub(w.meta);
                }
                self.finish_write(write, failed)
            }
            Flight::Read {
                image,
                lba,
                len_blocks,
                plan,
                failed,
                mut comps,
                ..
            } => {
                let slots = plan?;
                if failed {
                    // Again on its own: the read gets its own error.
                    return self.execute(Request::Read {
                        image,
                        lba,
                        len_blocks,
                    });
                }
                comps.sort_by_key(|c| c.tag);
                self.read_finish(&image, lba, &slots, &mut comps.into_iter())
                    .map(Reply::Data)
            }
        }
    }

    /// The answers of started requests that are done (empty when none
    /// is), each with its sequence number: writes in start order, reads as
    /// they complete. `wait`: block until one is done when none is yet.
    #[must_use = "answers for their callers"]
    pub fn reap(&mut self, wait: bool) -> Vec<Answer> {
        let mut out = Vec::new();
        let mut wrote = false;
        loop {
            for seq in std::mem::take(&mut self.ready) {
                let Some(i) = seq
                    .checked_sub(self.flights_seq)
                    .and_then(|i| usize::try_from(i).ok())
                else {
                    continue;
                };
                if let Some(f) = self.flights.get_mut(i).and_then(Option::take) {
                    let r = self.finish_flight(f);
                    out.push((seq, r));
                }
            }
            while let Some(front) = self.flights.front_mut() {
                match front {
                    None => {}
                    Some(Flight::Write { outstanding: 0, .. }) => {
                        if let Some(f) = front.take() {
                            wrote = true;
                            let seq = self.flights_seq;
                            let r = self.finish_flight(f);
                            out.push((seq, r));
                        }
                    }
                    Some(_) => break,
                }
                self.flights.pop_front();
                self.flights_seq += 1;
            }
            if self.flights.is_empty() {
                break;
            }
            let block = wait && out.is_empty();
            match self.store.reap(block) {
                Ok(comps) if comps.is_empty() => {
                    if !block {
                        break;
                    }
                    if self.store.dev.in_flight() == 0 {
                        // Waited, and nothing is in flight: the device lost
                        // requests. End them all rather than wait for ever.
                        let e = Error::Io {
                            device: self.store.dev.info().name.clone(),
                            op: "complete",
                            pba: 0,
                            source: std::io::Error::other("device lost requests"),
                        };
                        self.flights_lost(&e);
                    }
                }
                Ok(comps) => {
                    for c in comps {
                        self.flight_completed(c);
                    }
                }
                // The device itself failed: nothing more completes.
                Err(e) => self.flights_lost(&e),
            }
        }
        if wrote {
            self.cp_if_over_bounds();
        }
        out
    }

    fn trim(&mut self, ns: &NsName, lba: u64, len: u64, replica: bool) -> Result<()> {
        self.check_writable()?;
        let (vi, ni) = self.ns_idx(ns)?;
        self.check_client_writable(vi, ni, ns, replica)?;
        self.check_range(vi, ni, ns, lba, len)?;
        let birth = self.gen + 1;
        let mut l = lba;
        while l < lba + len {
            let key = l / FANOUT as u64;
            let end = ((key + 1) * FANOUT as u64).min(lba + len);
            let leaf = match leaf_or_gap(
                &mut self.store,
                &vol_at(&self.vols, vi)?.ns_at(ni)?.tree,
                key,
            )? {
                Ok(p) => p,
                Err(next_key) => {
                    // An absent subtree: nothing mapped up to its end.
                    l = next_key.saturating_mul(FANOUT as u64).max(end);
                    continue;
                }
            };
            let mapped: Vec<(u64, u64)> = (l..end)
                .map(|x| (x, slot_get(&leaf, (x % FANOUT as u64) as usize).pba))
                .filter(|&(_, p)| p != 0)
                .collect();
            if !mapped.is_empty() {
                // Released blocks dirty one plane path per plane leaf.
                let leaves: BTreeSet<u64> = mapped.iter().map(|&(_, p)| p / LEAF_BITS).collect();
                self.ensure_space(
                    MAP_DEPTH as u64 * (1 + PLANE_DEPTH as u64)
                        + PLANE_DEPTH as u64 * (leaves.len() as u64 + 1),
                )?;
            }
            for (x, _) in mapped {
                if let Err(e) = self.set_slot(
                    vi,
                    ni,
                    x,
                    Slot {
                        pba: 0,
                        birth,
                        hash: 0,
                    },
                ) {
                    self.poison(&e);
                    return Err(e);
                }
            }
            l = end;
        }
        Ok(())
    }

    /// Changed extents of `ns` from snapshot `base` (None: nothing) to
    /// snapshot `target`, coalesced.
    pub fn diff(
        &mut self,
        ns: &NsName,
        base: Option<&str>,
        target: &str,
    ) -> Result<Vec<DiffExtent>> {
        let (b, t) = self.diff_roots(ns, base, target)?;
        let mut out = Vec::new();
        diff_walk(&mut self.store, MAP_DEPTH - 1, 0, b, t, &mut |lba, k, _| {
            push_extent(&mut out, lba, k)
        })?;
        Ok(out)
    }

    /// [`Pool::diff`] counted, unchanged content told apart.
    pub fn diff_stats(
        &mut self,
        ns: &NsName,
        base: Option<&str>,
        target: &str,
    ) -> Result<DiffStats> {
        let (b, t) = self.diff_roots(ns, base, target)?;
        let mut st = DiffStats::default();
        diff_walk(
            &mut self.store,
            MAP_DEPTH - 1,
            0,
            b,
            t,
            &mut |_, k, same| match k {
                DiffKind::Data => {
                    st.data_blocks += 1;
                    st.unchanged_blocks += u64::from(same);
                }
                DiffKind::Trim => st.trim_blocks += 1,
            },
        )?;
        Ok(st)
    }

    /// The map roots of `ns` in snapshots `base` (or nothing) and `target`.
    fn diff_roots(&self, ns: &NsName, base: Option<&str>, target: &str) -> Result<(Ptr, Ptr)> {
        let (vi, _) = self.ns_idx(ns)?;
        let root_of = |pool: &Self, name: &str| -> Result<Ptr> {
            let si = pool.snap_idx(vi, name)?;
            vol_at(&pool.vols, vi)?
                .snap_at(si)?
                .ns
                .iter()
                .find(|(n, _, _)| *n == ns.qtree)
                .map(|x| x.1)
                .ok_or_else(|| Error::NoSuchSnapshot {
                    volume: ns.to_string(),
                    snapshot: name.to_string(),
                })
        };
        let t = root_of(self, target)?;
        if let Some(b) = base {
            // The walk skips subtrees born before the base: it is only
            // correct from an older image to a newer one.
            let (bi, ti) = (self.snap_idx(vi, b)?, self.snap_idx(vi, target)?);
            let v = vol_at(&self.vols, vi)?;
            if v.snap_at(bi)?.gen > v.snap_at(ti)?.gen {
                return Err(Error::Invalid(format!(
                    "diff of {ns} from {b} to {target}: the base is newer than the target; diff from the older snapshot to the newer"
                )));
            }
        }
        let b = match base {
            // A qtree created after the base snapshot: diff from nothing.
            Some(b) => match root_of(self, b) {
                Ok(p) => p,
                Err(_) if self.snap_idx(vi, b).is_ok() => Ptr::default(),
                Err(e) => return Err(e),
            },
            None => Ptr::default(),
        };
        Ok((b, t))
    }

    /// Expensive consistency check (tests): planes agree with the map
    /// trees, the free map is exactly planes + plane nodes + catalog +
    /// superblocks + pending-free, counts and digests are exact. A check
    /// with no state-changing request since the last passing one passes
    /// without walking (the simulation checks every pool after every step).
    pub fn check_invariants(&mut self) -> Result<()> {
        // Nothing ran that could change the state this check passed on.
        if self.checked_at == Some(self.changes) {
            return Ok(());
        }
        self.check_invariants_walk()?;
        self.checked_at = Some(self.changes);
        Ok(())
    }

    fn check_invariants_walk(&mut self) -> Result<()> {
        let fail = |m: String| Err(Error::Invalid(format!("invariant violated: {m}")));
        let mut expect: BTreeSet<u64> = BTreeSet::new();
        expect.insert(0);
        expect.insert(1);
        for &c in &self.log.blocks {
            if !expect.insert(c) {
                return fail(format!("catalog block {c} doubly owned"));
            }
        }
        for (i, v) in self.vols.iter().enumerate() {
            let dirty = !v.plane.dirty.is_empty() || v.ns.iter().any(|n| !n.tree.dirty.is_empty());
            if (dirty || v.logged.dirty) && !self.touched.contains(&i) {
                return fail(format!(
                    "volume {} changed but not noted as touched",
                    v.name
                ));
            }
            if !v.ids_agree() {
                return fail(format!(
                    "volume {}: the snapshot id index disagrees",
                    v.name
                ));
            }
            if self.by_name.get(&v.name) != Some(&i) {
                return fail(format!("volume {} missing from the name index", v.name));
            }
            if !v.logged.dirty && v.logged.head.is_some() && catalog::head_changed(v) {
                return fail(format!(
                    "volume {} changed without being marked for the catalog log",
                    v.name
                ));
            }
        }
        // Volumes share blocks only within a family: a volume and the
        // clones made from its snapshots (and theirs). The family of a
        // volume is the id of the oldest volume up its origin chain.
        let mut family: BTreeMap<u32, u32> = BTreeMap::new();
        for v in &self.vols {
            let mut root = v.id;
            let mut origin = v.origin;
            for _ in 0..=self.vols.len() {
                let Some(o) = origin else { break };
                let Some(up) = self.vols.iter().find(|x| x.id == o.vol) else {
                    return fail(format!("clone {}: origin volume {} is gone", v.name, o.vol));
                };
                let Some(snap) = up.snaps.iter().find(|x| x.id == o.snap) else {
                    return fail(format!(
                        "clone {}: origin snapshot {} of {} is gone",
                        v.name, o.snap, up.name
                    ));
                };
                if snap.plane != o.plane {
                    return fail(format!("clone {}: origin plane is stale", v.name));
                }
                root = up.id;
                origin = up.origin;
            }
            if origin.is_some() {
                return fail(format!("clone {}: origin chain loops", v.name));
            }
            family.insert(v.id, root);
        }
        let mut data_owner: BTreeMap<u64, u32> = BTreeMap::new();
        let mut plane_nodes: BTreeSet<u64> = BTreeSet::new();
        for vi in 0..self.vols.len() {
            let v = vol_at(&self.vols, vi)?.clone();
            let fam = family.get(&v.id).copied().unwrap_or(v.id);
            // (plane tree, map trees) per image
            let mut images: Vec<(Tree, Vec<Tree>, Option<u64>)> = vec![(
                v.plane.clone(),
                v.ns.iter().map(|n| n.tree.clone()).collect(),
                Some(v.live_count),
            )];
            for s in &v.snaps {
                images.push((
                    Tree::plane(s.plane),
                    s.ns.iter().map(|x| Tree::map(x.1)).collect(),
                    Some(s.referenced),
                ));
            }
            for (plane, maps, count) in images {
                let mut bits = BTreeSet::new();
                walk_tree(
                    &mut self.store,
                    &plane,
                    &mut |p| {
                        plane_nodes.insert(p);
                        true
                    },
                    &mut |k, pl| {
                        for (byte, &b) in pl.iter().enumerate().take(PAYLOAD) {
                            let mut m = b;
                            while m != 0 {
                                bits.insert(
                                    k * LEAF_BITS + byte as u64 * 8 + m.trailing_zeros() as u64,
                                );
                                m &= m - 1;
                            }
                        }
                    },
                )?;
                let mut held = BTreeSet::new();
                let mut dup = None;
                for m in &maps {
                    let mut leaves = Vec::new();
                    walk_tree(
                        &mut self.store,
                        m,
                        &mut |p| {
                            if !held.insert(p) {
                                dup = Some(p);
                            }
                            true
                        },
                        &mut |_, pl| leaves.push(pl.to_vec()),
                    )?;
                    for pl in leaves {
                        for i in 0..FANOUT {
                            let s = slot_get(&pl, i);
                            if s.pba != 0 && !held.insert(s.pba) {
                                dup = Some(s.pba);
                            }
                        }
                    }
                }
                if let Some(d) = dup {
                    return fail(format!(
                        "volume {}: block {d} mapped twice in one image",
                        v.name
                    ));
                }
                if held != bits {
                    let a: Vec<_> = held.difference(&bits).take(5).collect();
                    let b: Vec<_> = bits.difference(&held).take(5).collect();
                    return fail(format!(
                        "volume {}: plane disagrees with maps: unrecorded {a:?}, stale {b:?}",
                        v.name
                    ));
                }
                if let Some(c) = count {
                    if c != bits.len() as u64 {
                        return fail(format!(
                            "volume {}: count {c} != plane bits {}",
                            v.name,
                            bits.len()
                        ));
                    }
                }
                for b in bits {
                    if let Some(o) = data_owner.insert(b, fam) {
                        if o != fam {
                            return fail(format!(
                                "block {b} held by volume families {o} and {fam} (volume {})",
                                v.name
                            ));
                        }
                    }
                }
            }
            for n in &v.ns {
                let mut d = 0u128;
                let mut leaves = Vec::new();
                walk_tree(&mut self.store, &n.tree, &mut |_| true, &mut |k, pl| {
                    leaves.push((k, pl.to_vec()))
                })?;
                for (k, pl) in leaves {
                    for i in 0..FANOUT {
                        let s = slot_get(&pl, i);
                        if s.pba != 0 {
                            d = d.wrapping_add(digest_term(k * FANOUT as u64 + i as u64, s.hash));
                        }
                    }
                }
                if d != n.digest {
                    return fail(format!(
                        "volume {}: digest of {:?} is stale",
                        v.name, n.name
                    ));
                }
            }
        }
        for &p in &plane_nodes {
            if !expect.insert(p) {
                return fail(format!("plane node {p} also used as catalog or superblock"));
            }
        }
        for &p in data_owner.keys() {
            if !expect.insert(p) {
                return fail(format!(
                    "block {p} is both held data/map and a plane node or catalog"
                ));
            }
        }
        for &p in &self.pending {
            if !expect.insert(p) {
                return fail(format!("pending-free block {p} is still held"));
            }
        }
        let actual: BTreeSet<u64> = self.fm.iter_set().into_iter().collect();
        if actual != expect {
            let leaked: Vec<_> = actual.difference(&expect).take(5).collect();
            let missing: Vec<_> = expect.difference(&actual).take(5).collect();
            return fail(format!(
                "free map: leaked {leaked:?}, held but free {missing:?}"
            ));
        }
        if self.fm.used != actual.len() as u64 {
            return fail("free count drifted".into());
        }
        Ok(())
    }
}

impl<D: BlockDevice + 'static> crate::api::Executor for Pool<D> {
    fn execute_batch(&mut self, reqs: Vec<Request>) -> Vec<Result<Reply>> {
        Pool::execute_batch(self, reqs)
    }
    fn start(&mut self, first: u64, reqs: Vec<Request>) -> Vec<Answer> {
        Pool::start(self, first, reqs)
    }
    fn reap(&mut self, wait: bool) -> Vec<Answer> {
        Pool::reap(self, wait)
    }
    fn in_flight(&self) -> usize {
        Pool::in_flight(self)
    }
    fn checkpoint(&mut self) -> Result<()> {
        Pool::checkpoint(self)
    }
}

/// The runs of a read plan that go to the device: (first slot, blocks,
/// first pba), consecutive mapped slots whose pbas follow each other, at
/// most [`COALESCE_MAX`] blocks each. Holes (pba 0) are not read.
fn read_runs(slots: &[Slot]) -> Vec<(usize, usize, u64)> {
    let mut runs: Vec<(usize, usize, u64)> = Vec::new();
    // The pba of slot i - 1 (0 before the first slot).
    let mut prev_pba = 0u64;
    for (i, s) in slots.iter().enumerate() {
        let follows = prev_pba != 0 && prev_pba + 1 == s.pba;
        prev_pba = s.pba;
        if s.pba == 0 {
            continue;
        }
        match runs.last_mut() {
            Some((start, len, _)) if *start + *len == i && follows && *len < COALESCE_MAX => {
                *len += 1
            }
            _ => runs.push((i, 1, s.pba)),
        }
    }
    runs
}

/// The device reads of a read plan, one per run.
fn read_ios(slots: &[Slot]) -> impl Iterator<Item = (IoKind, u64, Option<AlignedBuf>)> + '_ {
    read_runs(slots)
        .into_iter()
        .map(|(_, len, pba)| (IoKind::Read, pba, Some(AlignedBuf::zeroed(len))))
}

#[cfg(test)]
mod tests {

    #[test]
    fn names_follow_one_rule() {
        for good in [
            "v",
            "vol-0",
            "db_1.snap",
            "a b",
            "nightly:2026-12-02",
            "ünïcode",
            &"x".repeat(64),
        ] {
            assert!(check_name(good).is_ok(), "{good:?} refused");
        }
        for bad in [
            "",
            ".",
            "..",
            " ",
            "\t",
            "-v",
            " v",
            "v ",
            "a/b",
            "a@b",
            "a\nb",
            "a\u{202E}b",
            "a\u{2066}b",
            "a\u{200F}",
            &"x".repeat(65),
        ] {
            let e = check_name(bad).expect_err(bad);
            assert!(e.to_string().contains("bad name"), "{e}");
        }
    }
    use super::*;
    use crate::device::sim::{CrashMode, Fault, SimDevice};

    #[test]
    fn read_runs_join_consecutive_pbas_and_skip_holes() {
        let s = |pba| Slot {
            pba,
            ..Slot::default()
        };
        let slots = [s(10), s(11), s(0), s(12), s(13), s(20), s(21)];
        assert_eq!(read_runs(&slots), vec![(0, 2, 10), (3, 2, 12), (5, 2, 20)]);
        let long: Vec<Slot> = (0..COALESCE_MAX as u64 + 3).map(|i| s(100 + i)).collect();
        assert_eq!(
            read_runs(&long),
            vec![
                (0, COALESCE_MAX, 100),
                (COALESCE_MAX, 3, 100 + COALESCE_MAX as u64)
            ]
        );
        assert!(read_runs(&[s(0), s(0)]).is_empty());
    }

    fn pool() -> Pool<SimDevice> {
        let mut p = Pool::format(SimDevice::new(8192), FormatOptions::default()).unwrap();
        p.execute(Request::CreateVolume {
            name: "v".into(),
            size_bytes: 1000 * 4096,
        })
        .unwrap();
        p
    }

    fn write(p: &mut Pool<SimDevice>, lba: u64, n: usize, v: u8) {
        let mut b = AlignedBuf::zeroed(n);
        b.as_mut_slice().fill(v);
        p.execute(Request::Write {
            ns: NsName::volume("v"),
            lba,
            data: b,
            fua: false,
            replica: false,
        })
        .unwrap();
    }

    fn snap(p: &mut Pool<SimDevice>, name: &str) -> SnapshotInfo {
        match p
            .execute(Request::CreateSnapshot {
                volume: "v".into(),
                name: name.into(),
                id: None,
                created_unix_ms: None,
            })
            .unwrap()
        {
            Reply::Snapshot(s) => s,
            _ => panic!(),
        }
    }

    fn snaps(p: &mut Pool<SimDevice>) -> Vec<SnapshotInfo> {
        match p
            .execute(Request::ListSnapshots { volume: "v".into() })
            .unwrap()
        {
            Reply::Snapshots(s) => s,
            _ => panic!(),
        }
    }

    /// The pool's space, `used_blocks` without the catalog log's blocks
    /// (the log grows by a block per CP until it is compacted, whatever
    /// the request freed or took).
    fn space(p: &mut Pool<SimDevice>) -> SpaceInfo {
        match p.execute(Request::Space).unwrap() {
            Reply::Space(mut s) => {
                s.used_blocks -= p.log.blocks.len() as u64;
                s
            }
            _ => panic!(),
        }
    }

    #[test]
    fn setting_an_attribute_to_the_value_it_has_takes_no_consistency_point() {
        let mut p = pool();
        let set = |p: &mut Pool<SimDevice>, v: &[u8]| {
            p.execute(Request::SetAttr {
                key: "k".into(),
                value: Some(v.to_vec()),
            })
            .expect("set");
            p.execute(Request::Flush).expect("flush");
            p.generation()
        };
        let g1 = set(&mut p, b"one");
        assert_eq!(set(&mut p, b"one"), g1, "the same value wrote a CP");
        let g2 = set(&mut p, b"two");
        assert!(g2 > g1, "a new value must reach the medium");
        p.execute(Request::SetAttr {
            key: "k".into(),
            value: None,
        })
        .expect("remove");
        p.execute(Request::Flush).expect("flush");
        let g3 = p.generation();
        assert!(g3 > g2, "a removal must reach the medium");
        p.execute(Request::SetAttr {
            key: "k".into(),
            value: None,
        })
        .expect("remove again");
        p.execute(Request::Flush).expect("flush");
        assert_eq!(p.generation(), g3, "removing a missing key wrote a CP");
    }

    #[test]
    fn an_unchanged_pool_is_not_walked_again_and_a_changed_one_is() {
        let mut p = pool();
        write(&mut p, 0, 4, 1);
        p.check_invariants().expect("a sound pool");
        // Damage no request made: the next check trusts the last one...
        if let Some(v) = p.vols.first_mut() {
            v.live_count += 1;
        }
        p.check_invariants()
            .expect("nothing ran since the passing check");
        p.execute(Request::ListSnapshotNames { volume: "v".into() })
            .expect("a listing changes nothing");
        p.check_invariants().expect("still nothing ran");
        // ...and any request that may change the state makes it walk again.
        write(&mut p, 8, 1, 2);
        let e = p.check_invariants().expect_err("the walk sees the damage");
        assert!(e.to_string().contains("invariant violated"), "{e}");
    }

    #[test]
    fn snapshot_names_of_ids_finds_those_it_has_in_the_order_asked() {
        let mut p = pool();
        for n in ["a", "b", "c"] {
            snap(&mut p, n);
        }
        let ids: Vec<Uuid> = snaps(&mut p).iter().map(|s| s.id).collect();
        p.execute(Request::DeleteSnapshot {
            volume: "v".into(),
            name: "b".into(),
        })
        .unwrap();
        let ask = |p: &mut Pool<SimDevice>| match p
            .execute(Request::SnapshotNamesOf {
                volume: "v".into(),
                ids: vec![ids[2], Uuid::new_v4(), ids[1], ids[0]],
            })
            .unwrap()
        {
            Reply::SnapshotNames(n) => n.into_iter().map(|s| s.name).collect::<Vec<_>>(),
            _ => panic!(),
        };
        assert_eq!(ask(&mut p), vec!["c", "a"]);
        p.check_invariants().unwrap();
        let mut p = Pool::open(p.into_device()).unwrap();
        assert_eq!(ask(&mut p), vec!["c", "a"]);
        p.check_invariants().unwrap();
    }

    #[test]
    fn snapshot_names_list_what_the_full_listing_lists_in_its_order() {
        let mut p = pool();
        write(&mut p, 0, 4, 1);
        snap(&mut p, "a");
        write(&mut p, 8, 4, 2);
        snap(&mut p, "b");
        let full = snaps(&mut p);
        let names = match p
            .execute(Request::ListSnapshotNames { volume: "v".into() })
            .unwrap()
        {
            Reply::SnapshotNames(n) => n,
            _ => panic!(),
        };
        assert_eq!(names.len(), 2);
        let newest = |p: &mut Pool<SimDevice>, v: &str| match p
            .execute(Request::NewestSnapshot { volume: v.into() })
        {
            Ok(Reply::SnapshotNames(n)) => Ok(n),
            Ok(_) => panic!(),
            Err(e) => Err(e),
        };
        assert_eq!(newest(&mut p, "v").unwrap(), names[1..].to_vec());
        for (f, n) in full.iter().zip(&names) {
            assert_eq!(
                (&f.name, f.id, f.gen, f.created_unix_ms, &f.digests),
                (&n.name, n.id, n.gen, n.created_unix_ms, &n.digests)
            );
        }
        let e = p
            .execute(Request::ListSnapshotNames { volume: "w".into() })
            .unwrap_err();
        assert!(matches!(e, Error::NoSuchVolume(_)), "{e}");
        let e = newest(&mut p, "w").unwrap_err();
        assert!(matches!(e, Error::NoSuchVolume(_)), "{e}");
        p.execute(Request::CreateVolume {
            name: "e".into(),
            size_bytes: 1 << 20,
        })
        .unwrap();
        assert_eq!(newest(&mut p, "e").unwrap(), Vec::new());
    }

    #[test]
    fn a_diff_from_newer_to_older_is_refused() {
        let mut p = pool();
        write(&mut p, 0, 4, 1);
        snap(&mut p, "a");
        write(&mut p, 8, 4, 2);
        snap(&mut p, "b");
        let fwd = p.diff(&NsName::volume("v"), Some("a"), "b").unwrap();
        assert_eq!(fwd.iter().map(|e| e.len_blocks).sum::<u64>(), 4);
        let e = p.diff(&NsName::volume("v"), Some("b"), "a").unwrap_err();
        assert!(e.to_string().contains("base is newer"), "{e}");
    }

    #[test]
    fn overwrite_after_snapshot_keeps_old_blocks_held() {
        let mut p = pool();
        write(&mut p, 0, 10, 1);
        snap(&mut p, "a");
        let used_before = space(&mut p).used_blocks;
        write(&mut p, 0, 10, 2);
        p.checkpoint().unwrap();
        // The old 10 data blocks stay held by `a`; new data + new map path.
        assert!(space(&mut p).used_blocks >= used_before + 10);
        p.check_invariants().unwrap();
        let s = &snaps(&mut p)[0];
        // `a` alone holds its 10 data blocks and its map path.
        assert!(s.unique_blocks >= 10, "unique {}", s.unique_blocks);
    }

    #[test]
    fn delete_frees_exactly_unique_blocks() {
        let mut p = pool();
        write(&mut p, 0, 20, 1);
        snap(&mut p, "a");
        write(&mut p, 0, 5, 2);
        snap(&mut p, "b");
        write(&mut p, 5, 5, 3);
        p.checkpoint().unwrap();
        for name in ["a", "b"] {
            let list = snaps(&mut p);
            let s = list.iter().find(|s| s.name == name).unwrap();
            let unique = s.unique_blocks;
            let before = space(&mut p);
            p.execute(Request::DeleteSnapshot {
                volume: "v".into(),
                name: name.into(),
            })
            .unwrap();
            p.check_invariants().unwrap();
            let after = space(&mut p);
            assert_eq!(
                before.used_blocks - after.used_blocks,
                unique,
                "snapshot {name}"
            );
        }
        // With no snapshots left, only the live image remains.
        let v = match p.execute(Request::ListVolumes).unwrap() {
            Reply::Volumes(v) => v,
            _ => panic!(),
        };
        assert_eq!(v[0].snapshot_count, 0);
        p.check_invariants().unwrap();
    }

    #[test]
    fn diff_stats_tell_rewritten_from_changed_blocks() {
        let mut p = pool();
        write(&mut p, 0, 10, 1);
        snap(&mut p, "a");
        write(&mut p, 0, 4, 1); // the same bytes again
        write(&mut p, 4, 2, 9); // new bytes
        write(&mut p, 20, 3, 5); // new blocks
        p.execute(Request::Trim {
            ns: NsName::volume("v"),
            lba: 8,
            len_blocks: 2,
            replica: false,
        })
        .unwrap();
        snap(&mut p, "b");
        let st = p.diff_stats(&NsName::volume("v"), Some("a"), "b").unwrap();
        assert_eq!(
            st,
            DiffStats {
                data_blocks: 9,
                unchanged_blocks: 4,
                trim_blocks: 2
            }
        );
        let ext = p.diff(&NsName::volume("v"), Some("a"), "b").unwrap();
        let sum = |k| -> u64 {
            ext.iter()
                .filter(|e| e.kind == k)
                .map(|e| e.len_blocks)
                .sum()
        };
        assert_eq!((sum(DiffKind::Data), sum(DiffKind::Trim)), (9, 2));
        let full = p.diff_stats(&NsName::volume("v"), None, "b").unwrap();
        assert_eq!((full.data_blocks, full.unchanged_blocks), (11, 0));
    }

    fn read_of(p: &mut Pool<SimDevice>, volume: &str, snapshot: Option<&str>, n: u32) -> Vec<u8> {
        match p
            .execute(Request::Read {
                image: Image {
                    ns: NsName::volume(volume),
                    snapshot: snapshot.map(str::to_string),
                },
                lba: 0,
                len_blocks: n,
            })
            .unwrap()
        {
            Reply::Data(d) => d.as_slice().to_vec(),
            _ => panic!(),
        }
    }

    fn clone_of(
        p: &mut Pool<SimDevice>,
        origin: &str,
        snapshot: &str,
        name: &str,
    ) -> Result<Reply> {
        p.execute(Request::CloneVolume {
            origin: origin.into(),
            snapshot: snapshot.into(),
            name: name.into(),
        })
    }

    fn wr(volume: &str, lba: u64, n: usize, v: u8) -> Request {
        let mut b = AlignedBuf::zeroed(n);
        b.as_mut_slice().fill(v);
        Request::Write {
            ns: NsName::volume(volume),
            lba,
            data: b,
            fua: false,
            replica: false,
        }
    }

    /// The results of started requests `0..n` in start order, checking each
    /// was answered exactly once (and, with `ordered`, in start order).
    fn by_seq(mut answers: Vec<Answer>, n: usize, ordered: bool) -> Vec<Result<Reply>> {
        if ordered {
            assert!(
                answers.windows(2).all(|w| w[0].0 < w[1].0),
                "answered out of start order"
            );
        }
        answers.sort_by_key(|a| a.0);
        let seqs: Vec<u64> = answers.iter().map(|a| a.0).collect();
        assert_eq!(
            seqs,
            (0..n as u64).collect::<Vec<_>>(),
            "one answer per request"
        );
        answers.into_iter().map(|a| a.1).collect()
    }

    /// A pool on a simulated device with one 64-block volume `v`.
    fn pool_v64() -> (Pool<SimDevice>, crate::device::sim::SimHandle) {
        let dev = SimDevice::new(8192);
        let sim = dev.handle();
        let mut p = Pool::format(dev, FormatOptions::default()).unwrap();
        p.execute(Request::CreateVolume {
            name: "v".into(),
            size_bytes: 64 * 4096,
        })
        .unwrap();
        (p, sim)
    }

    /// Started writes (several runs in flight, overlapping lbas, a CP while
    /// some are in flight, a refused write among them) answer in start
    /// order and end as the same writes run one after another would.
    #[test]
    fn started_writes_answer_in_order_and_end_as_sequential_writes() {
        let mut rng = sluice_testkit::rng(sluice_testkit::seed("started_writes"));
        for round in 0..20 {
            let (mut p, sim) = pool_v64();
            let mut model = [0u8; 64];
            let mut answers = Vec::new();
            let mut started = 0usize;
            let mut refused = 0usize;
            for step in 0..12u8 {
                let mut run = Vec::new();
                for k in 0..rand::Rng::gen_range(&mut rng, 1..5usize) {
                    let lba = rand::Rng::gen_range(&mut rng, 0..60u64);
                    let n = rand::Rng::gen_range(&mut rng, 1..5usize);
                    let v = step * 10 + k as u8 + 1;
                    if k == 3 || (step == 5 && k == 0) {
                        // Out of range: refused, answered in its place.
                        refused += 1;
                        run.push(wr("v", 64, 1, v));
                        continue;
                    }
                    model[lba as usize..lba as usize + n].fill(v);
                    run.push(wr("v", lba, n, v));
                }
                let first = started as u64;
                started += run.len();
                answers.extend(p.start(first, run));
                if step % 4 == 1 {
                    // A CP with writes in flight: it takes none of them.
                    p.checkpoint().unwrap();
                }
                if rand::Rng::gen_bool(&mut rng, 0.3) {
                    answers.extend(p.reap(false));
                }
            }
            while p.in_flight() > 0 {
                answers.extend(p.reap(true));
            }
            let answers = by_seq(answers, started, true);
            let errors = answers.iter().filter(|a| a.is_err()).count();
            assert_eq!(errors, refused, "round {round}: the refused writes, only");
            p.check_invariants().unwrap();
            let got = read_of(&mut p, "v", None, 64);
            for (lba, &v) in model.iter().enumerate() {
                assert!(
                    got[lba * 4096..(lba + 1) * 4096].iter().all(|&b| b == v),
                    "round {round}: lba {lba}"
                );
            }
            // The CPs taken mid-flight left a pool that mounts whole.
            let mut q = Pool::open(sim.crash_image(CrashMode::DropAll, 0)).unwrap();
            q.check_invariants().unwrap();
        }
    }

    /// Started reads and writes, their device requests completing in a
    /// random order: every answer comes in start order, each read sees
    /// exactly the writes started before it, a CP is refused while reads
    /// are in flight, and the pool ends as the same requests run one after
    /// another would leave it.
    #[test]
    fn started_reads_and_writes_answer_in_order_whatever_the_completion_order() {
        let seed = sluice_testkit::seed("started_reads_and_writes");
        let mut rng = sluice_testkit::rng(seed);
        for round in 0..20u64 {
            let dev = SimDevice::new(8192).with_completion_shuffle(seed ^ round);
            let mut p = Pool::format(dev, FormatOptions::default()).unwrap();
            p.execute(Request::CreateVolume {
                name: "v".into(),
                size_bytes: 64 * 4096,
            })
            .unwrap();
            let mut model = [0u8; 64];
            // What each started request must answer, in start order.
            let mut expect: Vec<Option<Vec<u8>>> = Vec::new();
            let mut answers = Vec::new();
            for step in 0..24u8 {
                let reads = rand::Rng::gen_bool(&mut rng, 0.5);
                let mut batch = Vec::new();
                for k in 0..rand::Rng::gen_range(&mut rng, 1..6usize) {
                    let lba = rand::Rng::gen_range(&mut rng, 0..60u64);
                    let n = rand::Rng::gen_range(&mut rng, 1..5usize);
                    let range = lba as usize..lba as usize + n;
                    if reads {
                        let want: Vec<u8> = model[range]
                            .iter()
                            .flat_map(|&v| std::iter::repeat_n(v, 4096))
                            .collect();
                        expect.push(Some(want));
                        batch.push(Request::Read {
                            image: Image {
                                ns: NsName::volume("v"),
                                snapshot: None,
                            },
                            lba,
                            len_blocks: n as u32,
                        });
                    } else {
                        let v = step * 10 + k as u8 + 1;
                        model[range].fill(v);
                        expect.push(None);
                        batch.push(wr("v", lba, n, v));
                    }
                }
                let first = (expect.len() - batch.len()) as u64;
                answers.extend(p.start(first, batch));
                if reads {
                    assert!(p.checkpoint().is_err(), "round {round}: a CP under reads");
                } else if step % 5 == 1 {
                    // A CP with writes in flight: it takes none of them.
                    p.checkpoint().unwrap();
                }
                if rand::Rng::gen_bool(&mut rng, 0.3) {
                    answers.extend(p.reap(false));
                }
            }
            while p.in_flight() > 0 {
                answers.extend(p.reap(true));
            }
            let answers = by_seq(answers, expect.len(), false);
            for (i, (a, want)) in answers.into_iter().zip(expect).enumerate() {
                match (a, want) {
                    (Ok(Reply::Done), None) => {}
                    (Ok(Reply::Data(d)), Some(want)) => {
                        assert!(d.as_slice() == want, "round {round}: request {i}'s data")
                    }
                    (a, want) => panic!(
                        "round {round} (seed {seed}): request {i} answered {a:?}, wanted {}",
                        if want.is_some() { "data" } else { "done" }
                    ),
                }
            }
            p.check_invariants().unwrap();
            let got = read_of(&mut p, "v", None, 64);
            for (lba, &v) in model.iter().enumerate() {
                assert!(
                    got[lba * 4096..(lba + 1) * 4096].iter().all(|&b| b == v),
                    "round {round}: lba {lba}"
                );
            }
        }
    }

    /// A started read whose device request fails is read again alone, and
    /// answers its own error only if that fails too: ten one-shot faults
    /// fail all eight first attempts and the retries of the first two reads.
    #[test]
    fn a_started_read_that_fails_is_read_again_alone() {
        let (mut p, sim) = pool_v64();
        for i in 0..8u8 {
            // Every other block, so each read is its own device request.
            p.execute(wr("v", 2 * i as u64, 1, 1 + i)).unwrap();
        }
        p.checkpoint().unwrap();
        for _ in 0..10 {
            sim.inject(Fault::ReadEio { after: 0 });
        }
        let batch = (0..8u64)
            .map(|i| Request::Read {
                image: Image {
                    ns: NsName::volume("v"),
                    snapshot: None,
                },
                lba: 2 * i,
                len_blocks: 1,
            })
            .collect();
        let mut answers = p.start(0, batch);
        while p.in_flight() > 0 {
            answers.extend(p.reap(true));
        }
        let answers = by_seq(answers, 8, false);
        for (i, a) in answers.into_iter().enumerate() {
            match a {
                Err(Error::Io { op: "read", .. }) if i < 2 => {}
                Ok(Reply::Data(d)) if i >= 2 => {
                    assert!(d.as_slice().iter().all(|&b| b == 1 + i as u8), "read {i}")
                }
                a => panic!("read {i}: {a:?}"),
            }
        }
        assert!(p.poisoned().is_none(), "a read fault poisons nothing");
        assert_eq!(read_of(&mut p, "v", None, 1), vec![1u8; 4096]);
    }

    /// A write that fails in flight poisons the pool: it and every write
    /// started after it are answered with an error, their blocks are free
    /// again, and a reopen recovers.
    #[test]
    fn a_started_write_that_fails_fails_every_later_one() {
        let (mut p, sim) = pool_v64();
        p.execute(wr("v", 0, 4, 1)).unwrap();
        p.checkpoint().unwrap();
        // Two device writes per run: the first run is written, the second fails.
        sim.inject(Fault::WriteEio { after: 2 });
        let mut answers = Vec::new();
        for i in 0..4u8 {
            answers.extend(p.start(
                2 * i as u64,
                vec![wr("v", 8 * i as u64, 2, 10 + i), wr("v", 40, 1, 20 + i)],
            ));
        }
        while p.in_flight() > 0 {
            answers.extend(p.reap(true));
        }
        let answers = by_seq(answers, 8, true);
        let first_err = answers.iter().position(|a| a.is_err()).unwrap();
        assert_eq!(first_err, 2, "the first run went through: {answers:?}");
        assert!(
            answers[first_err..].iter().all(|a| a.is_err()),
            "{answers:?}"
        );
        assert!(p.poisoned().is_some());
        sim.clear_faults();
        let mut p = Pool::open(p.into_device()).unwrap();
        p.check_invariants().unwrap();
        assert_eq!(read_of(&mut p, "v", None, 1), vec![1u8; 4096]);
    }

    #[test]
    fn a_clone_shares_its_snapshot_and_frees_only_what_it_wrote() {
        let mut p = pool();
        write(&mut p, 0, 100, 1);
        snap(&mut p, "a");
        p.check_invariants().unwrap();
        let before = space(&mut p).used_blocks;
        let Reply::Volume(info) = clone_of(&mut p, "v", "a", "c").unwrap() else {
            panic!()
        };
        assert_eq!(
            info.origin,
            Some(CloneOrigin {
                volume: "v".into(),
                snapshot: "a".into()
            })
        );
        assert!(!info.read_only);
        assert_eq!(info.size_bytes, 1000 * 4096);
        // O(1): the catalog only, no data block and no map node copied.
        assert!(
            space(&mut p).used_blocks <= before + 2,
            "a clone copied blocks"
        );
        p.check_invariants().unwrap();
        assert_eq!(read_of(&mut p, "c", None, 100), vec![1u8; 100 * 4096]);
        // The clone and its origin diverge independently.
        let mut b = AlignedBuf::zeroed(10);
        b.as_mut_slice().fill(2);
        p.execute(Request::Write {
            ns: NsName::volume("c"),
            lba: 0,
            data: b,
            fua: false,
            replica: false,
        })
        .unwrap();
        write(&mut p, 50, 10, 3);
        p.check_invariants().unwrap();
        let c = read_of(&mut p, "c", None, 100);
        assert_eq!(&c[..10 * 4096], &[2u8; 10 * 4096][..]);
        assert_eq!(&c[10 * 4096..], &[1u8; 90 * 4096][..]);
        assert_eq!(read_of(&mut p, "v", Some("a"), 100), vec![1u8; 100 * 4096]);
        assert_eq!(read_of(&mut p, "v", None, 1), vec![1u8; 4096]);
        // The origin snapshot and volume are held while the clone lives.
        let e = p.execute(Request::DeleteSnapshot {
            volume: "v".into(),
            name: "a".into(),
        });
        assert!(
            matches!(&e, Err(Error::HasClones { clones, .. }) if clones == "c"),
            "{e:?}"
        );
        let e = p.execute(Request::DeleteVolume { name: "v".into() });
        assert!(matches!(e, Err(Error::HasClones { .. })), "{e:?}");
        snap(&mut p, "b");
        let e = p.execute(Request::Rollback {
            volume: "v".into(),
            snapshot: "b".into(),
            destroy_newer: true,
        });
        assert!(e.is_ok(), "a rollback to the newest takes nothing: {e:?}");
        assert_eq!(snaps(&mut p)[0].clones, vec!["c".to_string()]);
        // A clone of the clone, then a reopen: all of it is durable.
        p.execute(Request::CreateSnapshot {
            volume: "c".into(),
            name: "c1".into(),
            id: None,
            created_unix_ms: None,
        })
        .unwrap();
        clone_of(&mut p, "c", "c1", "cc").unwrap();
        p.execute(Request::Flush).unwrap();
        let mut p = Pool::open(p.into_device()).unwrap();
        p.check_invariants().unwrap();
        assert_eq!(read_of(&mut p, "cc", None, 100), c);
        let e = p.execute(Request::DeleteVolume { name: "c".into() });
        assert!(matches!(e, Err(Error::HasClones { .. })), "{e:?}");
        // Deleting the clones (newest first) frees what they wrote, and
        // nothing the origin holds; then the snapshot can go.
        let with_b = space(&mut p).used_blocks;
        p.execute(Request::DeleteVolume { name: "cc".into() })
            .unwrap();
        p.execute(Request::DeleteVolume { name: "c".into() })
            .unwrap();
        p.execute(Request::Flush).unwrap();
        p.check_invariants().unwrap();
        let after = space(&mut p).used_blocks;
        assert!(after < with_b, "the clones' own blocks were not freed");
        assert_eq!(read_of(&mut p, "v", Some("a"), 100), vec![1u8; 100 * 4096]);
        p.execute(Request::DeleteSnapshot {
            volume: "v".into(),
            name: "a".into(),
        })
        .unwrap();
        p.check_invariants().unwrap();
    }

    #[test]
    fn a_clone_is_refused_with_a_clear_error() {
        let mut p = pool();
        snap(&mut p, "a");
        let e = clone_of(&mut p, "v", "nope", "c");
        assert!(matches!(e, Err(Error::NoSuchSnapshot { .. })), "{e:?}");
        let e = clone_of(&mut p, "nope", "a", "c");
        assert!(matches!(e, Err(Error::NoSuchVolume(_))), "{e:?}");
        let e = clone_of(&mut p, "v", "a", "v");
        assert!(matches!(e, Err(Error::AlreadyExists { .. })), "{e:?}");
        let e = clone_of(&mut p, "v", "a", "..");
        assert!(matches!(e, Err(Error::BadName { .. })), "{e:?}");
        p.check_invariants().unwrap();
    }

    #[test]
    fn volume_delete_frees_everything_it_held_and_nothing_else() {
        let mut p = pool();
        let empty = space(&mut p).used_blocks;
        p.execute(Request::CreateVolume {
            name: "w".into(),
            size_bytes: 1000 * 4096,
        })
        .unwrap();
        p.execute(Request::CreateQtree {
            volume: "w".into(),
            name: "q".into(),
            size_bytes: 100 * 4096,
        })
        .unwrap();
        write(&mut p, 0, 30, 7);
        snap(&mut p, "a");
        let keep = |p: &mut Pool<SimDevice>| -> Vec<u8> {
            match p
                .execute(Request::Read {
                    image: Image {
                        ns: NsName::volume("v"),
                        snapshot: Some("a".into()),
                    },
                    lba: 0,
                    len_blocks: 30,
                })
                .unwrap()
            {
                Reply::Data(d) => d.as_slice().to_vec(),
                _ => panic!(),
            }
        };
        let v_only = space(&mut p).used_blocks;
        for (ns, n) in [(NsName::volume("w"), 40), (NsName::qtree("w", "q"), 9)] {
            let mut b = AlignedBuf::zeroed(n);
            b.as_mut_slice().fill(3);
            p.execute(Request::Write {
                ns,
                lba: 0,
                data: b,
                fua: false,
                replica: false,
            })
            .unwrap();
        }
        p.execute(Request::CreateSnapshot {
            volume: "w".into(),
            name: "s".into(),
            id: None,
            created_unix_ms: None,
        })
        .unwrap();
        let mut b = AlignedBuf::zeroed(10);
        b.as_mut_slice().fill(4);
        p.execute(Request::Write {
            ns: NsName::volume("w"),
            lba: 0,
            data: b,
            fua: false,
            replica: false,
        })
        .unwrap();
        // Dirty (unflushed) writes of w are freed too.
        p.execute(Request::DeleteVolume { name: "w".into() })
            .unwrap();
        p.check_invariants().unwrap();
        assert_eq!(space(&mut p).used_blocks, v_only, "blocks of w left behind");
        assert!(v_only > empty);
        let before = keep(&mut p);
        assert!(before.iter().all(|&x| x == 7));
        let e = p
            .execute(Request::ListSnapshots { volume: "w".into() })
            .unwrap_err();
        assert!(matches!(e, Error::NoSuchVolume(_)), "{e}");
        // Durable: the reopened pool has no w and the same free space, and
        // w can be created again.
        let mut p = Pool::open(p.into_device()).unwrap();
        p.check_invariants().unwrap();
        assert_eq!(space(&mut p).used_blocks, v_only);
        assert_eq!(keep(&mut p), before);
        p.execute(Request::CreateVolume {
            name: "w".into(),
            size_bytes: 1000 * 4096,
        })
        .unwrap();
        p.check_invariants().unwrap();
    }

    #[test]
    fn middle_snapshot_delete_keeps_neighbours_intact() {
        let mut p = pool();
        write(&mut p, 0, 3, 1);
        snap(&mut p, "a");
        write(&mut p, 1, 1, 2);
        snap(&mut p, "b");
        write(&mut p, 2, 1, 3);
        snap(&mut p, "c");
        p.execute(Request::DeleteSnapshot {
            volume: "v".into(),
            name: "b".into(),
        })
        .unwrap();
        p.check_invariants().unwrap();
        for (name, want) in [("a", [1u8, 1, 1]), ("c", [1, 2, 3])] {
            let r = p
                .execute(Request::Read {
                    image: Image {
                        ns: NsName::volume("v"),
                        snapshot: Some(name.into()),
                    },
                    lba: 0,
                    len_blocks: 3,
                })
                .unwrap();
            let Reply::Data(b) = r else { panic!() };
            for (i, w) in want.iter().enumerate() {
                assert_eq!(b.block(i)[0], *w, "{name} lba {i}");
            }
        }
    }

    #[test]
    fn trim_of_a_huge_thin_range_skips_absent_subtrees() {
        let mut p = Pool::format(SimDevice::new(1 << 20), FormatOptions::default()).unwrap();
        p.execute(Request::CreateVolume {
            name: "v".into(),
            size_bytes: 1 << 40,
        })
        .unwrap();
        for lba in [0u64, 5_000_000, (1 << 28) - 1] {
            write(&mut p, lba, 1, 4);
        }
        let before = p.stats().metadata_blocks_visited;
        p.execute(Request::Trim {
            ns: NsName::volume("v"),
            lba: 0,
            len_blocks: 1 << 28,
            replica: false,
        })
        .unwrap();
        // O(mapped paths x fanout x depth), not O(size): 1.6M leaves without the skip.
        assert!(p.stats().metadata_blocks_visited - before < 20_000);
        p.checkpoint().unwrap();
        p.check_invariants().unwrap();
        let v = match p.execute(Request::ListVolumes).unwrap() {
            Reply::Volumes(v) => v,
            _ => panic!(),
        };
        // Only the (now empty) map nodes remain.
        assert!(v[0].used_blocks < 30, "used {}", v[0].used_blocks);
    }

    #[test]
    fn digests_match_for_equal_content() {
        let mut a = pool();
        let mut b = pool();
        write(&mut a, 0, 4, 9);
        write(&mut a, 0, 4, 7);
        write(&mut b, 0, 4, 7);
        write(&mut b, 100, 1, 1);
        b.execute(Request::Trim {
            ns: NsName::volume("v"),
            lba: 100,
            len_blocks: 1,
            replica: false,
        })
        .unwrap();
        assert_eq!(snap(&mut a, "s").digests, snap(&mut b, "s").digests);
    }

    #[test]
    fn snapshot_limit_and_attrs_persist() {
        let mut p = pool();
        p.execute(Request::SetAttr {
            key: "k".into(),
            value: Some(vec![1; 10_000]),
        })
        .unwrap();
        // The real limit in small: the catalog log takes any number.
        p.snapshots_max = 300;
        for i in 0..p.snapshots_max {
            snap(&mut p, &format!("s{i}"));
        }
        let e = p.execute(Request::CreateSnapshot {
            volume: "v".into(),
            name: "x".into(),
            id: None,
            created_unix_ms: None,
        });
        assert!(matches!(e, Err(Error::TooManySnapshots { .. })));
        let mut p = Pool::open(p.into_device()).unwrap();
        assert_eq!(snaps(&mut p).len(), 300);
        match p.execute(Request::GetAttr { key: "k".into() }).unwrap() {
            Reply::Attr(Some(v)) => assert_eq!(v, vec![1; 10_000]),
            _ => panic!("attr lost"),
        }
        p.check_invariants().unwrap();
    }
}
