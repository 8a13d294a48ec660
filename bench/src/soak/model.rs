//! What the data must be: the seeded block pattern, and the model of every
//! namespace the writers write (per block: the generation last flushed and
//! the newest one attempted) and of every snapshot (per block: the
//! generation it must hold, recorded while writes are held off).
//!
//! A block's content is a pure function of (run seed, namespace, lba,
//! generation), with the three numbers in its first bytes, so any read can
//! be decoded and checked without storing data. Generation 0 is a block
//! never written (zeroes).
//!
//! Invariants: `durable <= last` for every block; a generation is used once
//! per block over the whole run (`next` only grows), so a read names
//! exactly which write it shows.

use std::collections::BTreeMap;
use std::sync::{Mutex, RwLock};

pub const BLOCK_BYTES: usize = 4096;
const MAGIC: u32 = 0x534f_414b; // "SOAK"

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The 4 KiB written to (`ns`, `lba`) at generation `gen` (>= 1).
pub fn pattern(seed: u64, ns: u32, lba: u64, gen: u64) -> Vec<u8> {
    assert!(gen >= 1, "generation 0 is the unwritten block");
    let mut b = vec![0u8; BLOCK_BYTES];
    b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[4..8].copy_from_slice(&ns.to_le_bytes());
    b[8..16].copy_from_slice(&lba.to_le_bytes());
    b[16..24].copy_from_slice(&gen.to_le_bytes());
    let mut x = seed ^ ((ns as u64) << 56) ^ (lba << 24) ^ gen.rotate_left(17);
    for chunk in b[24..].chunks_mut(8) {
        let v = splitmix(&mut x).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    b
}

/// The generation a block read back shows, or why it is none.
pub fn decode(seed: u64, ns: u32, lba: u64, block: &[u8]) -> Result<u64, String> {
    if block.len() != BLOCK_BYTES {
        return Err(format!("read {} bytes", block.len()));
    }
    if block.iter().all(|&x| x == 0) {
        return Ok(0);
    }
    let u32_at =
        |o: usize| u32::from_le_bytes([block[o], block[o + 1], block[o + 2], block[o + 3]]);
    let u64_at = |o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&block[o..o + 8]);
        u64::from_le_bytes(a)
    };
    let (magic, bns, blba, gen) = (u32_at(0), u32_at(4), u64_at(8), u64_at(16));
    if magic != MAGIC || bns != ns || blba != lba || gen == 0 {
        return Err(format!(
            "header says magic {magic:#x} ns {bns} lba {blba} gen {gen} (misdirected or garbage)"
        ));
    }
    if pattern(seed, ns, lba, gen) != block {
        return Err(format!(
            "gen {gen}: body differs from the pattern (torn or corrupt)"
        ));
    }
    Ok(gen)
}

/// One block's state in the model.
#[derive(Clone, Copy, Default, Debug)]
pub struct BlockGen {
    /// Made durable by a flush or FUA that was acknowledged.
    pub durable: u64,
    /// The newest generation sent (acknowledged or not).
    pub last: u64,
    /// The highest generation ever sent (the next write uses next + 1).
    pub next: u64,
}

/// One namespace the writers write: a volume's own space or a qtree.
pub struct Namespace {
    pub id: u32,
    /// NBD export name, `VOL` or `VOL/QTREE`.
    pub export: String,
    /// The volume it belongs to (snapshots are per volume).
    pub volume: String,
    /// Source-side name in snapshot digests: "" or the qtree name.
    pub digest_ns: String,
    pub span_blocks: u64,
    pub blocks: Mutex<Vec<BlockGen>>,
    /// Writers hold it shared for one operation; snapshots and recovery
    /// checks hold it exclusively, so no write is in flight meanwhile.
    pub gate: RwLock<()>,
}

impl Namespace {
    pub fn new(
        id: u32,
        export: &str,
        volume: &str,
        digest_ns: &str,
        span_blocks: u64,
    ) -> Namespace {
        Namespace {
            id,
            export: export.to_string(),
            volume: volume.to_string(),
            digest_ns: digest_ns.to_string(),
            span_blocks,
            blocks: Mutex::new(vec![BlockGen::default(); span_blocks as usize]),
            gate: RwLock::new(()),
        }
    }

    pub fn blocks(&self) -> std::sync::MutexGuard<'_, Vec<BlockGen>> {
        self.blocks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The generation every block holds now (call with the gate held exclusively).
    pub fn image(&self) -> Vec<u64> {
        self.blocks().iter().map(|b| b.last).collect()
    }
}

/// What a snapshot must contain, per namespace id, taken at `t_secs`.
#[derive(Clone, Debug)]
pub struct SnapModel {
    pub t_secs: f64,
    pub images: BTreeMap<u32, Vec<u64>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pattern_decodes_to_its_generation_and_a_flip_is_caught() {
        let b = pattern(7, 2, 41, 9);
        assert_eq!(decode(7, 2, 41, &b), Ok(9));
        assert_eq!(decode(7, 2, 41, &vec![0u8; BLOCK_BYTES]), Ok(0));
        // A block written for another lba (a misdirected write) is named.
        assert!(decode(7, 2, 40, &b).unwrap_err().contains("misdirected"));
        let mut torn = b.clone();
        torn[4000] ^= 1;
        assert!(decode(7, 2, 41, &torn).unwrap_err().contains("torn"));
        // Another run's seed does not decode.
        assert!(decode(8, 2, 41, &b).is_err());
    }
}
