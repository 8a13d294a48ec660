//! A range of another device seen as a device of its own: the region of a
//! sharded pool that one shard owns.
//!
//! What it owns: the inner device (for a [`super::uring::UringDevice`], the
//! shard's own ring on the shared file) and the region's bounds.
//!
//! Invariants kept:
//! - Region pba `p` is inner pba `start + p`; a read or write that does not
//!   fit inside `[0, block_count)` never reaches the inner device: it
//!   completes with `InvalidInput` naming the region.
//! - Completions come back with region-relative pbas, exactly as submitted.
//! - A flush goes to the inner device unchanged: it covers more than the
//!   region (every write that completed on the device before it), which
//!   the flush contract allows.
//! - The region's [`DeviceInfo::name`] names the inner device and the region,
//!   so every engine error on it says which shard's region failed (a region
//!   that is the whole device keeps the device's name).

use super::{BlockDevice, DeviceInfo, IoCompletion, IoKind, IoRequest};
use crate::error::{Error, Result};

/// Blocks `[start, start + block_count)` of `inner`.
#[derive(Debug)]
pub struct Region<D: BlockDevice> {
    inner: D,
    index: u32,
    start: u64,
    info: DeviceInfo,
    /// Completions decided without the inner device (out-of-range requests).
    ready: Vec<IoCompletion>,
}

impl<D: BlockDevice> Region<D> {
    /// Region number `index` of `inner`: blocks `start..start + block_count`.
    pub fn new(inner: D, index: u32, start: u64, block_count: u64) -> Result<Region<D>> {
        let inner_blocks = inner.info().block_count;
        let fits = start
            .checked_add(block_count)
            .is_some_and(|end| end <= inner_blocks);
        if block_count == 0 || !fits {
            return Err(Error::Invalid(format!(
                "region {index} (blocks {start}..+{block_count}) does not fit in {} ({inner_blocks} blocks)",
                inner.info().name
            )));
        }
        // The whole device (a pool of one shard) keeps the device's name.
        let name = if start == 0 && block_count == inner_blocks {
            inner.info().name.clone()
        } else {
            format!(
                "{} region {index} (blocks {start}..{})",
                inner.info().name,
                start + block_count
            )
        };
        let info = DeviceInfo { name, block_count };
        Ok(Region {
            inner,
            index,
            start,
            info,
            ready: Vec::new(),
        })
    }

    /// Which region of its device this is.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// First inner block of the region.
    pub fn start(&self) -> u64 {
        self.start
    }

    pub fn inner(&self) -> &D {
        &self.inner
    }

    pub fn into_inner(self) -> D {
        self.inner
    }

    fn refuse(&mut self, req: IoRequest, what: String) {
        let err = std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{}: {:?} at block {}: {what}",
                self.info.name, req.kind, req.pba
            ),
        );
        self.ready.push(IoCompletion {
            tag: req.tag,
            kind: req.kind,
            pba: req.pba,
            result: Err(err),
            buf: req.buf,
        });
    }
}

impl<D: BlockDevice> BlockDevice for Region<D> {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn submit(&mut self, mut req: IoRequest) {
        if matches!(req.kind, IoKind::Flush) {
            self.inner.submit(req);
            return;
        }
        let Some(len_blocks) = req.buf.as_ref().map(|b| b.len_blocks() as u64) else {
            self.refuse(req, "no buffer".into());
            return;
        };
        let fits = req
            .pba
            .checked_add(len_blocks)
            .is_some_and(|end| end <= self.info.block_count);
        if !fits {
            let what = format!(
                "{len_blocks} blocks beyond the region end ({} blocks)",
                self.info.block_count
            );
            self.refuse(req, what);
            return;
        }
        debug_assert!(self.start + req.pba + len_blocks <= self.inner.info().block_count);
        req.pba += self.start;
        self.inner.submit(req);
    }

    fn complete(
        &mut self,
        min_complete: usize,
        out: &mut Vec<IoCompletion>,
    ) -> std::io::Result<usize> {
        let start_len = out.len();
        let ready = self.ready.len();
        out.append(&mut self.ready);
        let want = min_complete.saturating_sub(ready);
        let first_inner = out.len();
        self.inner.complete(want, out)?;
        for c in out.iter_mut().skip(first_inner) {
            if !matches!(c.kind, IoKind::Flush) {
                debug_assert!(c.pba >= self.start, "completion outside the region");
                c.pba = c.pba.saturating_sub(self.start);
            }
        }
        Ok(out.len() - start_len)
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.ready.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::sim::{run_one, SimDevice};
    use crate::device::AlignedBuf;

    fn run(r: &mut Region<SimDevice>, kind: IoKind, pba: u64, buf: AlignedBuf) -> IoCompletion {
        let req = IoRequest {
            tag: 1,
            kind,
            pba,
            buf: Some(buf),
        };
        run_one(r, req).expect("device")
    }

    fn block(fill: u8) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(1);
        b.as_mut_slice().fill(fill);
        b
    }

    #[test]
    fn addresses_are_region_relative() {
        let sim = SimDevice::new(1000);
        let h = sim.handle();
        let mut r = Region::new(sim, 2, 300, 200).expect("region");
        assert_eq!(r.info().block_count, 200);
        assert!(r.info().name.contains("region 2"), "{}", r.info().name);
        let c = run(&mut r, IoKind::Write { fua: false }, 7, block(5));
        assert!(c.result.is_ok());
        assert_eq!(c.pba, 7, "completion pba is the region's");
        assert!(h.read_live(307).iter().all(|&b| b == 5));
        assert!(h.read_live(7).iter().all(|&b| b == 0));
        let c = run(&mut r, IoKind::Read, 7, AlignedBuf::zeroed(1));
        assert!(c.buf.expect("buf").as_slice().iter().all(|&b| b == 5));
    }

    #[test]
    fn out_of_range_is_refused_naming_the_region() {
        let sim = SimDevice::new(1000);
        let h = sim.handle();
        let mut r = Region::new(sim, 1, 100, 100).expect("region");
        for (pba, blocks) in [(100u64, 1usize), (99, 2), (u64::MAX, 1)] {
            let c = run(
                &mut r,
                IoKind::Write { fua: false },
                pba,
                AlignedBuf::zeroed(blocks),
            );
            let e = c.result.expect_err("beyond the region");
            assert!(e.to_string().contains("region 1"), "{e}");
            assert_eq!(c.pba, pba);
        }
        assert_eq!(h.counters().blocks_written, 0, "nothing reached the device");
        assert!(Region::new(SimDevice::new(10), 0, 5, 6).is_err());
        assert!(Region::new(SimDevice::new(10), 0, 0, 0).is_err());
    }
}
