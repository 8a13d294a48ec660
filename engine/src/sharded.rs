//! Sharded pools: one device split into N equal regions, each a complete
//! pool of today's format (its own superblock slots, catalog, bit planes),
//! owned by one shard thread (see `shard.rs`).
//!
//! What it owns: the layout rule (region `i` = blocks `[i*R, (i+1)*R)` with
//! `R = floor(device_blocks / N)`; a tail of fewer than N blocks is unused),
//! the volume -> shard rule ([`shard_of`]), and formatting and opening the N
//! region pools together.
//!
//! Invariants kept:
//! - Every region of a pool carries the same pool uuid, the same
//!   `shard_count` and its own `shard_index`; region 0's superblock is where
//!   the layout is learned. Opening checks all three for every region; a
//!   missing, corrupt or foreign region is an error naming the region
//!   ([`Error::Region`], [`Error::RegionMismatch`]), never a panic and never
//!   a pool opened with a region left out.
//! - Format first zeroes region 0's superblock slots (durably), then formats
//!   regions N-1 down to 1, then region 0: a crash during format leaves no
//!   pool at all (`NotAPool`), never an older pool whose blocks the new
//!   regions already overwrote, nor a pool that silently lacks a region.
//! - A volume lives on shard `shard_of(name, N)`, a pure function of its
//!   name: part of the on-disk meaning (docs/FORMAT.md), so it never changes
//!   for a pool.
//! - One shard (N = 1) is exactly the unsharded pool: region 0 is the whole
//!   device, volume ids are the local ids, and a version-1 pool opens as
//!   shard 0 of 1.

use crate::device::uring::{UringDevice, UringOptions};
use crate::device::{BlockDevice, Region};
use crate::error::{Error, Result};
use crate::format::newest_superblock;
pub use crate::format::shard_of;
use crate::pool::{FormatOptions, Pool, MAX_BLOCKS, MIN_BLOCKS};
use crate::tree::Store;
use uuid::Uuid;

/// Most shards a pool may have.
pub const SHARDS_MAX: u32 = 256;

/// How a pool splits its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub shard_count: u32,
    /// Blocks in each region (R).
    pub region_blocks: u64,
}

impl Layout {
    /// `shard_count` equal regions of a device of `device_blocks`.
    pub fn new(device_blocks: u64, shard_count: u32) -> Result<Layout> {
        if shard_count == 0 || shard_count > SHARDS_MAX {
            return Err(Error::Invalid(format!(
                "{shard_count} shards: a pool has 1 to {SHARDS_MAX}"
            )));
        }
        let region_blocks = device_blocks / shard_count as u64;
        if region_blocks < MIN_BLOCKS {
            return Err(Error::DeviceTooSmall {
                blocks: device_blocks,
                min: MIN_BLOCKS * shard_count as u64,
            });
        }
        if region_blocks > MAX_BLOCKS {
            return Err(Error::Invalid(format!(
                "{shard_count} regions of {region_blocks} blocks: a region holds at most {MAX_BLOCKS}; use more shards"
            )));
        }
        Ok(Layout {
            shard_count,
            region_blocks,
        })
    }

    /// First device block of region `index`.
    pub fn region_start(&self, index: u32) -> u64 {
        index as u64 * self.region_blocks
    }
}

/// Read the layout of the pool on a whole device from region 0's
/// superblock (a version-1 pool: one region, the whole device). The device
/// comes back for the caller to split.
pub fn read_layout<D: BlockDevice>(dev: D) -> Result<(Layout, D)> {
    let device_blocks = dev.info().block_count;
    if device_blocks < 2 {
        return Err(Error::NotAPool);
    }
    let mut store = Store::new(dev);
    let sb = newest_superblock(&store.read_raw(&[0, 1])?)?;
    if sb.shard_index != 0 {
        return Err(Error::RegionMismatch {
            index: 0,
            reason: format!(
                "the start of the device holds region {} of {}",
                sb.shard_index, sb.shard_count
            ),
        });
    }
    let fits = sb
        .block_count
        .checked_mul(sb.shard_count as u64)
        .is_some_and(|b| b <= device_blocks);
    if !fits || sb.block_count == 0 {
        return Err(Error::RegionMismatch {
            index: 0,
            reason: format!(
                "the pool has {} regions of {} blocks but the device has {device_blocks} blocks",
                sb.shard_count, sb.block_count
            ),
        });
    }
    Ok((
        Layout {
            shard_count: sb.shard_count,
            region_blocks: sb.block_count,
        },
        store.dev,
    ))
}

fn region_err(index: usize, count: usize) -> impl Fn(Error) -> Error {
    move |source| Error::Region {
        index: index as u32,
        count: count as u32,
        source: Box::new(source),
    }
}

/// Format one pool over `devices` (one per region, all the same size):
/// region `i` is shard `i` of `devices.len()`. Pools come back in shard
/// order, ready for `Engine::start_sharded`.
pub fn format_sharded<D: BlockDevice>(
    devices: Vec<D>,
    opts: FormatOptions,
) -> Result<Vec<Pool<D>>> {
    let n = devices.len();
    let count = u32::try_from(n)
        .ok()
        .filter(|&c| (1..=SHARDS_MAX).contains(&c))
        .ok_or_else(|| Error::Invalid(format!("{n} regions: a pool has 1 to {SHARDS_MAX}")))?;
    let blocks = devices.first().map_or(0, |d| d.info().block_count);
    if let Some((i, d)) = devices
        .iter()
        .enumerate()
        .find(|(_, d)| d.info().block_count != blocks)
    {
        return Err(Error::RegionMismatch {
            index: i as u32,
            reason: format!(
                "{} has {} blocks, region 0 has {blocks}: regions are equal",
                d.info().name,
                d.info().block_count
            ),
        });
    }
    let uuid = *Uuid::new_v4().as_bytes();
    // Region 0's superblock is what makes the device a pool: unmake
    // whatever pool was there before touching any region, and write the
    // new one last.
    let mut devices = devices;
    if n > 1 {
        let mut store = Store::new(devices.remove(0));
        let zero = vec![0u8; crate::device::BLOCK_SIZE];
        store
            .write_raw(vec![(0, zero.clone()), (1, zero)], false)
            .and_then(|()| store.flush())
            .map_err(region_err(0, n))?;
        devices.insert(0, store.dev);
    }
    let mut pools: Vec<Pool<D>> = Vec::with_capacity(n);
    for (i, dev) in devices.into_iter().enumerate().rev() {
        let pool =
            Pool::format_region(dev, opts, uuid, i as u32, count).map_err(region_err(i, n))?;
        pools.push(pool);
    }
    pools.reverse();
    debug_assert!(pools
        .iter()
        .enumerate()
        .all(|(i, p)| p.shard() == (i as u32, count)));
    Ok(pools)
}

/// Open the pool whose regions are `devices` (in shard order). Region 0
/// says how many regions there are; every region must be there, carry its
/// own index, the same count and the same pool uuid.
pub fn open_sharded<D: BlockDevice>(devices: Vec<D>) -> Result<Vec<Pool<D>>> {
    let n = devices.len();
    let mut devices = devices.into_iter();
    let Some(first) = devices.next() else {
        return Err(Error::Invalid("no regions given to open".into()));
    };
    let pool0 = Pool::open_region(first).map_err(region_err(0, n))?;
    let (index0, count) = pool0.shard();
    if index0 != 0 {
        return Err(Error::RegionMismatch {
            index: 0,
            reason: format!("it says it is region {index0} of {count}"),
        });
    }
    if count as usize != n {
        let (index, reason) = if (count as usize) > n {
            (
                n as u32,
                format!("missing: the pool has {count} regions, only {n} given"),
            )
        } else {
            (
                count,
                format!("extra: the pool has {count} regions, {n} given"),
            )
        };
        return Err(Error::RegionMismatch { index, reason });
    }
    let uuid = pool0.uuid();
    let mut pools = Vec::with_capacity(n);
    pools.push(pool0);
    for (i, dev) in devices.enumerate().map(|(i, d)| (i + 1, d)) {
        let pool = Pool::open_region(dev).map_err(region_err(i, n))?;
        let (index, c) = pool.shard();
        if index as usize != i || c != count {
            return Err(Error::RegionMismatch {
                index: i as u32,
                reason: format!("it says it is region {index} of {c}, expected {i} of {count}"),
            });
        }
        if pool.uuid() != uuid {
            return Err(Error::RegionMismatch {
                index: i as u32,
                reason: format!(
                    "it belongs to pool {}, region 0 to pool {uuid}",
                    pool.uuid()
                ),
            });
        }
        pools.push(pool);
    }
    Ok(pools)
}

/// Split an io_uring device into the regions of `layout`, each with its
/// own ring on the one locked file (region 0 keeps `dev`'s ring).
pub fn split_uring(
    dev: UringDevice,
    layout: Layout,
    opts: &UringOptions,
) -> Result<Vec<Region<UringDevice>>> {
    let mut rings = Vec::with_capacity(layout.shard_count as usize);
    for _ in 1..layout.shard_count {
        rings.push(dev.open_another_ring(opts)?);
    }
    let mut regions = Vec::with_capacity(layout.shard_count as usize);
    for (i, d) in std::iter::once(dev).chain(rings).enumerate() {
        let i = i as u32;
        regions.push(Region::new(
            d,
            i,
            layout.region_start(i),
            layout.region_blocks,
        )?);
    }
    Ok(regions)
}

/// Format the whole io_uring device `dev` as a pool of `shards` shards.
pub fn format_uring(
    dev: UringDevice,
    shards: u32,
    format: FormatOptions,
    ring: &UringOptions,
) -> Result<Vec<Pool<Region<UringDevice>>>> {
    let layout = Layout::new(dev.info().block_count, shards)?;
    format_sharded(split_uring(dev, layout, ring)?, format)
}

/// Open the pool on the whole io_uring device `dev`, however many shards
/// it has.
pub fn open_uring(dev: UringDevice, ring: &UringOptions) -> Result<Vec<Pool<Region<UringDevice>>>> {
    let (layout, dev) = read_layout(dev)?;
    open_sharded(split_uring(dev, layout, ring)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_splits_evenly_and_refuses_tiny_regions() {
        let l = Layout::new(1000, 3).expect("layout");
        assert_eq!(l.region_blocks, 333);
        assert_eq!(l.region_start(2), 666);
        assert!(matches!(
            Layout::new(1000, 4),
            Err(Error::DeviceTooSmall { .. })
        ));
        assert!(Layout::new(1000, 0).is_err());
        assert!(Layout::new(1 << 40, SHARDS_MAX + 1).is_err());
        assert_eq!(Layout::new(4096, 1).expect("one").region_blocks, 4096);
    }

    /// The hash is part of the on-disk meaning (a pool's volumes are found
    /// on the shard it names): pin a few values, so a change of hash or of
    /// its input fails here before it strands a volume.
    #[test]
    fn shard_of_is_pinned() {
        assert_eq!(shard_of("anything", 1), 0);
        assert_eq!(xxhash_rust::xxh3::xxh3_64(b"a"), 16629034431890738719);
        let names = ["a", "b", "vol0", "vol1", "vol2", "vol3"];
        let two: Vec<usize> = names.iter().map(|n| shard_of(n, 2)).collect();
        let three: Vec<usize> = names.iter().map(|n| shard_of(n, 3)).collect();
        assert_eq!(two, [1, 1, 1, 0, 0, 1]);
        assert_eq!(three, [1, 2, 2, 1, 2, 2]);
    }
}
