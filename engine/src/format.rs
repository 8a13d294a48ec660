//! On-disk encoding: superblocks, the common metadata block header, and a
//! bounds-checked little-endian reader/writer. Byte tables: docs/FORMAT.md.
//!
//! Invariants: every metadata block carries a header whose crc32c covers the
//! whole block (crc field zeroed), whose `self_pba` is the block's own
//! address and whose `gen` equals the parent pointer's `birth`; a block that
//! fails any of these decodes to `Error::CorruptMetadata`, never a panic.

use crate::device::BLOCK_SIZE;
use crate::error::{Error, Result};

pub const SB_MAGIC: &[u8; 8] = b"SLUICE01";
/// Version 2 added `shard_index`/`shard_count`; a version-1 superblock
/// decodes as shard 0 of 1 (the whole device is one region). Version 3
/// added a flags byte to each live namespace in the catalog
/// ([`NS_FLAG_READ_ONLY`]); the catalog of a version 1 or 2 superblock has
/// none (every qtree writable). Version 4 added a clone's origin to each
/// volume of the catalog; a catalog of version 3 or older has no clones.
/// Version 5 made the catalog a log of records ([`KIND_CATALOG_LOG`]
/// blocks) appended per CP; versions 1 to 4 have one blob rewritten whole.
pub const FORMAT_VERSION: u32 = 5;
/// First format version whose catalog is a log (crate::catalog).
pub const LOG_SINCE: u32 = 5;
/// First format version whose catalog has a flags byte per live namespace.
pub const NS_FLAGS_SINCE: u32 = 3;
/// First format version whose catalog says, per volume, whether it is a
/// clone and of which snapshot.
pub const ORIGIN_SINCE: u32 = 4;
/// Namespace flag: clients may not write or trim it (a qtree mirror's
/// destination). The other bits are zero; a catalog with one set is
/// corrupt (or from a newer build).
pub const NS_FLAG_READ_ONLY: u8 = 1;
pub const MD_MAGIC: u32 = 0x534C_4D44; // "SLMD"
pub const HDR_LEN: usize = 32;
/// Bytes after the header of a metadata block.
pub const PAYLOAD: usize = BLOCK_SIZE - HDR_LEN;

/// Metadata block kinds.
pub const KIND_MAP: u16 = 1;
pub const KIND_PLANE_NODE: u16 = 2;
pub const KIND_PLANE_LEAF: u16 = 3;
pub const KIND_CATALOG: u16 = 4;
pub const KIND_CATALOG_LOG: u16 = 5;

pub fn kind_name(kind: u16) -> &'static str {
    match kind {
        KIND_MAP => "map node",
        KIND_PLANE_NODE => "plane node",
        KIND_PLANE_LEAF => "plane leaf",
        KIND_CATALOG => "catalog",
        KIND_CATALOG_LOG => "catalog log",
        _ => "unknown",
    }
}

/// A pointer to a metadata block: its address and the CP generation that
/// wrote it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Ptr {
    pub pba: u64,
    pub birth: u64,
}

/// Build a metadata block: header then payload (payload.len() <= PAYLOAD).
pub fn encode_block(kind: u16, level: u8, self_pba: u64, gen: u64, payload: &[u8]) -> Vec<u8> {
    // A fixed-size array: every header offset below is checked at compile
    // time, and the payload copy is bounded by the zip.
    let mut b = [0u8; BLOCK_SIZE];
    b[0..4].copy_from_slice(&MD_MAGIC.to_le_bytes());
    b[4..6].copy_from_slice(&kind.to_le_bytes());
    b[6] = level;
    b[16..24].copy_from_slice(&self_pba.to_le_bytes());
    b[24..32].copy_from_slice(&gen.to_le_bytes());
    for (dst, src) in b[HDR_LEN..].iter_mut().zip(payload) {
        *dst = *src;
    }
    let crc = crc32c::crc32c(&b);
    b[8..12].copy_from_slice(&crc.to_le_bytes());
    b.to_vec()
}

/// Check a metadata block read from `ptr` against what its parent expects;
/// return its payload.
pub fn decode_block(block: &[u8], ptr: Ptr, kind: u16, level: u8) -> Result<&[u8]> {
    let bad = |reason: String| Error::CorruptMetadata {
        pba: ptr.pba,
        kind: kind_name(kind),
        reason,
    };
    let Ok(block) = <&[u8; BLOCK_SIZE]>::try_from(block) else {
        return Err(bad(format!("block is {} bytes", block.len())));
    };
    // From here on `block` is a fixed-size array: constant offsets cannot
    // run off its end.
    let magic = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
    if magic != MD_MAGIC {
        return Err(bad(format!("bad magic {magic:#x}")));
    }
    let stored = u32::from_le_bytes([block[8], block[9], block[10], block[11]]);
    // The crc covers the whole block with its own field zeroed.
    let crc = crc32c::crc32c(&block[..8]);
    let crc = crc32c::crc32c_append(crc, &[0u8; 4]);
    let crc = crc32c::crc32c_append(crc, &block[12..]);
    if crc != stored {
        return Err(bad(format!(
            "checksum mismatch (stored {stored:#x}, computed {crc:#x})"
        )));
    }
    let k = u16::from_le_bytes([block[4], block[5]]);
    if k != kind {
        return Err(bad(format!(
            "kind {} ({}) where a {} was expected",
            k,
            kind_name(k),
            kind_name(kind)
        )));
    }
    if block[6] != level {
        return Err(bad(format!(
            "level {} where {} was expected",
            block[6], level
        )));
    }
    let self_pba = u64::from_le_bytes(le_bytes(block, 16));
    if self_pba != ptr.pba {
        return Err(bad(format!(
            "misdirected: block says it lives at {self_pba}"
        )));
    }
    let gen = u64::from_le_bytes(le_bytes(block, 24));
    if gen != ptr.birth {
        return Err(bad(format!(
            "generation {gen} but the parent expects {}",
            ptr.birth
        )));
    }
    Ok(&block[HDR_LEN..])
}

/// The `N` bytes of a block at constant offset `at` (header fields).
/// `at + N <= BLOCK_SIZE` for every caller (constant header offsets); a
/// violation is a bug caught by the debug assertion, and yields zeroes
/// (which then fail the field's check) rather than a panic.
fn le_bytes<const N: usize>(block: &[u8; BLOCK_SIZE], at: usize) -> [u8; N] {
    let field = block.get(at..).and_then(|s| s.first_chunk::<N>()).copied();
    debug_assert!(field.is_some(), "header field {at}+{N} past the block");
    field.unwrap_or([0; N])
}

/// The superblock (pba 0 and 1; CP gen g writes slot g % 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub version: u32,
    pub block_count: u64,
    pub gen: u64,
    pub catalog: Ptr,
    pub uuid: [u8; 16],
    pub volumes_max: u32,
    /// Which region of a sharded pool this superblock heads (0-based).
    pub shard_index: u32,
    /// How many regions (shards) the pool has; region 0's count is the
    /// pool's. Version 1 had neither field: shard 0 of 1.
    pub shard_count: u32,
}

impl Superblock {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.bytes(SB_MAGIC);
        w.u32(self.version);
        w.u32(BLOCK_SIZE as u32);
        w.u64(self.block_count);
        w.u64(self.gen);
        w.u64(self.catalog.pba);
        w.u64(self.catalog.birth);
        w.bytes(&self.uuid);
        w.u32(self.volumes_max);
        w.u32(self.shard_index);
        w.u32(self.shard_count);
        let mut b = w.buf;
        b.resize(BLOCK_SIZE - 4, 0);
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// `Ok(None)`: no magic (not a superblock). `Err(CorruptSuperblock)`:
    /// magic present, checksum wrong. `Err(UnsupportedVersion)`: newer.
    pub fn decode(b: &[u8], slot: u64) -> Result<Option<Superblock>> {
        let Ok(b) = <&[u8; BLOCK_SIZE]>::try_from(b) else {
            return Ok(None);
        };
        if &b[0..8] != SB_MAGIC {
            return Ok(None);
        }
        let stored = u32::from_le_bytes(le_bytes(b, BLOCK_SIZE - 4));
        if crc32c::crc32c(&b[..BLOCK_SIZE - 4]) != stored {
            return Err(Error::CorruptSuperblock {
                slot,
                reason: "checksum mismatch".into(),
            });
        }
        let mut r = Reader::new(&b[8..], slot, "superblock");
        let version = r.u32()?;
        if version > FORMAT_VERSION {
            return Err(Error::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let bs = r.u32()?;
        if bs as usize != BLOCK_SIZE {
            return Err(Error::CorruptSuperblock {
                slot,
                reason: format!("block size {bs}"),
            });
        }
        let block_count = r.u64()?;
        let gen = r.u64()?;
        let catalog = Ptr {
            pba: r.u64()?,
            birth: r.u64()?,
        };
        let uuid = r.array::<16>()?;
        let volumes_max = r.u32()?;
        let (shard_index, shard_count) = if version >= 2 {
            (r.u32()?, r.u32()?)
        } else {
            (0, 1)
        };
        if shard_count == 0 || shard_index >= shard_count {
            return Err(Error::CorruptSuperblock {
                slot,
                reason: format!("shard {shard_index} of {shard_count}"),
            });
        }
        Ok(Some(Superblock {
            version,
            block_count,
            gen,
            catalog,
            uuid,
            volumes_max,
            shard_index,
            shard_count,
        }))
    }
}

/// Little-endian writer.
#[derive(Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn bytes(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
    pub fn u128(&mut self, v: u128) {
        self.bytes(&v.to_le_bytes());
    }
    pub fn ptr(&mut self, p: Ptr) {
        self.u64(p.pba);
        self.u64(p.birth);
    }
    pub fn str(&mut self, s: &str) {
        self.blob(s.as_bytes());
    }
    pub fn blob(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.bytes(b);
    }
}

/// Bounds-checked little-endian reader: running off the end is an error
/// naming the block, never a panic.
pub struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
    pba: u64,
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub fn new(b: &'a [u8], pba: u64, what: &'static str) -> Self {
        Reader {
            b,
            pos: 0,
            pba,
            what,
        }
    }
    fn err(&self, reason: String) -> Error {
        Error::CorruptMetadata {
            pba: self.pba,
            kind: self.what,
            reason,
        }
    }
    /// Nothing left to read.
    pub fn is_empty(&self) -> bool {
        self.pos >= self.b.len()
    }
    /// Bytes left to read.
    pub fn remaining(&self) -> usize {
        self.b.len().saturating_sub(self.pos)
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let Some(s) = self
            .pos
            .checked_add(n)
            .and_then(|end| self.b.get(self.pos..end))
        else {
            return Err(self.err(format!("truncated: need {n} bytes at offset {}", self.pos)));
        };
        self.pos += n;
        Ok(s)
    }
    /// The next `N` bytes as an array.
    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let s = self.take(N)?;
        s.first_chunk::<N>()
            .copied()
            .ok_or_else(|| self.err(format!("truncated: need {N} bytes")))
    }
    pub fn u8(&mut self) -> Result<u8> {
        let [v] = self.array::<1>()?;
        Ok(v)
    }
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub fn u128(&mut self) -> Result<u128> {
        Ok(u128::from_le_bytes(self.array()?))
    }
    pub fn ptr(&mut self) -> Result<Ptr> {
        Ok(Ptr {
            pba: self.u64()?,
            birth: self.u64()?,
        })
    }
    pub fn blob(&mut self) -> Result<Vec<u8>> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    pub fn str(&mut self) -> Result<String> {
        let b = self.blob()?;
        String::from_utf8(b).map_err(|_| self.err("name is not UTF-8".into()))
    }
}

/// The valid superblock with the highest generation among the raw blocks
/// of slots 0 and 1 (in slot order): `NotAPool` when neither has the magic,
/// the corruption when only corrupt ones have it.
pub fn newest_superblock(slots: &[impl AsRef<[u8]>]) -> Result<Superblock> {
    let mut best: Option<Superblock> = None;
    let mut corrupt = None;
    for (slot, b) in slots.iter().enumerate() {
        match Superblock::decode(b.as_ref(), slot as u64) {
            Ok(Some(sb)) => {
                if best.as_ref().is_none_or(|x| sb.gen > x.gen) {
                    best = Some(sb);
                }
            }
            Ok(None) => {}
            Err(e @ Error::UnsupportedVersion { .. }) => return Err(e),
            Err(e) => corrupt = Some(e),
        }
    }
    match (best, corrupt) {
        (Some(sb), _) => Ok(sb),
        (None, Some(e)) => Err(e),
        (None, None) => Err(Error::NotAPool),
    }
}

/// The shard that owns the volume `name` in a pool of `shard_count` shards:
/// `xxh3_64(name as UTF-8 bytes) mod shard_count` (0 for one shard).
pub fn shard_of(name: &str, shard_count: usize) -> usize {
    if shard_count <= 1 {
        return 0;
    }
    (xxhash_rust::xxh3::xxh3_64(name.as_bytes()) % shard_count as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_round_trip_and_corruption() {
        let sb = Superblock {
            version: FORMAT_VERSION,
            block_count: 1 << 34,
            gen: 7,
            catalog: Ptr { pba: 99, birth: 7 },
            uuid: [3; 16],
            volumes_max: 64,
            shard_index: 2,
            shard_count: 3,
        };
        let mut b = sb.encode();
        assert_eq!(Superblock::decode(&b, 1).unwrap(), Some(sb));
        b[40] ^= 1;
        assert!(matches!(
            Superblock::decode(&b, 1),
            Err(Error::CorruptSuperblock { .. })
        ));
        assert_eq!(Superblock::decode(&[0u8; BLOCK_SIZE], 0).unwrap(), None);
    }

    /// A version-1 superblock (no shard fields; bytes 68.. zero) is shard 0
    /// of 1, so pools made before sharding open unchanged.
    #[test]
    fn version_1_superblock_is_shard_0_of_1() {
        let mut w = Writer::default();
        w.bytes(SB_MAGIC);
        w.u32(1);
        w.u32(BLOCK_SIZE as u32);
        w.u64(4096);
        w.u64(3);
        w.u64(17);
        w.u64(3);
        w.bytes(&[9; 16]);
        w.u32(64);
        let mut b = w.buf;
        b.resize(BLOCK_SIZE - 4, 0);
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        let sb = Superblock::decode(&b, 1).unwrap().unwrap();
        assert_eq!((sb.version, sb.shard_index, sb.shard_count), (1, 0, 1));
        assert_eq!((sb.block_count, sb.gen, sb.volumes_max), (4096, 3, 64));
    }

    #[test]
    fn shard_fields_out_of_range_are_corrupt() {
        for (index, count) in [(0, 0), (3, 3), (7, 2)] {
            let sb = Superblock {
                version: FORMAT_VERSION,
                block_count: 4096,
                gen: 1,
                catalog: Ptr { pba: 5, birth: 1 },
                uuid: [1; 16],
                volumes_max: 64,
                shard_index: index,
                shard_count: count,
            };
            assert!(matches!(
                Superblock::decode(&sb.encode(), 0),
                Err(Error::CorruptSuperblock { .. })
            ));
        }
    }

    #[test]
    fn metadata_header_checks() {
        let b = encode_block(KIND_MAP, 2, 55, 9, &[1, 2, 3]);
        let p = Ptr { pba: 55, birth: 9 };
        assert_eq!(&decode_block(&b, p, KIND_MAP, 2).unwrap()[..3], &[1, 2, 3]);
        assert!(decode_block(&b, Ptr { pba: 56, birth: 9 }, KIND_MAP, 2).is_err());
        assert!(decode_block(&b, Ptr { pba: 55, birth: 8 }, KIND_MAP, 2).is_err());
        assert!(decode_block(&b, p, KIND_PLANE_LEAF, 2).is_err());
        assert!(decode_block(&b, p, KIND_MAP, 1).is_err());
        let mut c = b.clone();
        c[100] ^= 4;
        assert!(decode_block(&c, p, KIND_MAP, 2).is_err());
    }

    /// The header layout and crc that `encode_block` writes and
    /// `decode_block` checks (docs/FORMAT.md): the crc is of the whole
    /// block with its field zeroed, whichever way it is computed.
    #[test]
    fn metadata_header_bytes_are_unchanged() {
        let b = encode_block(KIND_PLANE_NODE, 3, 0x0102_0304, 0x0a0b, &[7; PAYLOAD + 10]);
        assert_eq!(b.len(), BLOCK_SIZE);
        assert_eq!(&b[0..4], &MD_MAGIC.to_le_bytes());
        assert_eq!(&b[4..6], &KIND_PLANE_NODE.to_le_bytes());
        assert_eq!(b[6], 3);
        assert_eq!(b[7], 0);
        assert_eq!(&b[12..16], &[0; 4]);
        assert_eq!(&b[16..24], &0x0102_0304u64.to_le_bytes());
        assert_eq!(&b[24..32], &0x0a0bu64.to_le_bytes());
        assert!(
            b[HDR_LEN..].iter().all(|&x| x == 7),
            "payload truncated to PAYLOAD"
        );
        let mut zeroed = b.clone();
        zeroed[8..12].fill(0);
        assert_eq!(&b[8..12], &crc32c::crc32c(&zeroed).to_le_bytes());
    }

    /// Bad bytes of any length decode to an error, never a panic.
    #[test]
    fn garbage_blocks_are_errors_not_panics() {
        let p = Ptr { pba: 3, birth: 1 };
        for len in [
            0,
            1,
            7,
            31,
            32,
            33,
            BLOCK_SIZE - 1,
            BLOCK_SIZE,
            BLOCK_SIZE + 1,
        ] {
            let junk = vec![0xa5u8; len];
            assert!(decode_block(&junk, p, KIND_MAP, 0).is_err(), "len {len}");
            assert!(
                matches!(Superblock::decode(&junk, 0), Ok(None)),
                "len {len}"
            );
        }
        let mut sb = vec![0u8; BLOCK_SIZE];
        sb[..8].copy_from_slice(SB_MAGIC);
        assert!(matches!(
            Superblock::decode(&sb, 1),
            Err(Error::CorruptSuperblock { slot: 1, .. })
        ));
    }

    #[test]
    fn reader_is_bounds_checked() {
        let mut r = Reader::new(&[1, 2, 3], 5, "catalog");
        assert!(r.u64().is_err());
        let mut w = Writer::default();
        w.str("abc");
        w.u128(5);
        let mut r = Reader::new(&w.buf, 0, "catalog");
        assert_eq!(r.str().unwrap(), "abc");
        assert_eq!(r.u128().unwrap(), 5);
        assert!(r.u8().is_err());
    }
}
