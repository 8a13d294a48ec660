//! 4 KiB-aligned block buffers, as O_DIRECT and registered io_uring buffers
//! require. A buffer is always a whole number of blocks and every byte of
//! it is initialised when allocated (zeroed, or filled by `gather`); it owns
//! its memory and is `Send`.
//!
//! [`BufPool`] recycles buffers of one size: one taken from it goes back to
//! it when dropped (on whichever thread drops it), so a stream of writes of
//! one size (a client's 128 KiB writes, an NBD connection's requests)
//! allocates and zeroes nothing after its first round; [`BufPools`] keeps
//! one per size for a stream of a few sizes. A recycled buffer holds the
//! bytes of its last use, so its taker overwrites what it uses.

use super::BLOCK_SIZE;
use std::alloc::{alloc, alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len_bytes: usize,
    /// The pool this buffer returns to when dropped.
    home: Option<Arc<Shelf>>,
}

/// A buffer's memory while it waits in a [`BufPool`].
struct Spare(NonNull<u8>);

// SAFETY: a spare is memory no one else references (its AlignedBuf was
// dropped), so it may move between threads as the buffer could.
unsafe impl Send for Spare {}

/// The free list of a [`BufPool`]: spares of `len_bytes` each, at most `cap`.
struct Shelf {
    len_bytes: usize,
    cap: usize,
    spares: Mutex<Vec<Spare>>,
}

impl Shelf {
    /// Keep `ptr` (of `len_bytes`) for reuse; false when the shelf is full.
    fn keep(&self, ptr: NonNull<u8>) -> bool {
        let mut s = self.spares.lock().unwrap_or_else(|p| p.into_inner());
        if s.len() >= self.cap {
            return false;
        }
        s.push(Spare(ptr));
        true
    }
}

impl Drop for Shelf {
    fn drop(&mut self) {
        let layout = AlignedBuf::layout(self.len_bytes);
        let spares = self.spares.get_mut().unwrap_or_else(|p| p.into_inner());
        for Spare(ptr) in spares.drain(..) {
            // SAFETY: every spare was allocated by AlignedBuf with the
            // layout of `len_bytes` and is referenced by no one.
            unsafe { dealloc(ptr.as_ptr(), layout) }
        }
    }
}

/// Buffers of one size, recycled: [`BufPool::take`] hands out a spare when
/// there is one, else a new zeroed buffer; every buffer it handed out comes
/// back when dropped, up to `keep` spares (the rest are freed). Cloning the
/// pool shares it.
#[derive(Clone)]
pub struct BufPool {
    shelf: Arc<Shelf>,
}

impl BufPool {
    /// A pool of `len_blocks`-block buffers (at least one block) keeping
    /// at most `keep` spares.
    pub fn new(len_blocks: usize, keep: usize) -> Self {
        BufPool {
            shelf: Arc::new(Shelf {
                len_bytes: len_blocks.max(1) * BLOCK_SIZE,
                cap: keep,
                spares: Mutex::new(Vec::with_capacity(keep)),
            }),
        }
    }

    /// Blocks per buffer.
    pub fn len_blocks(&self) -> usize {
        self.shelf.len_bytes / BLOCK_SIZE
    }

    /// A buffer of the pool's size. Its bytes are those of its last use
    /// (zeros when new): initialised, but not cleared.
    pub fn take(&self) -> AlignedBuf {
        let spare = self
            .shelf
            .spares
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        let mut b = match spare {
            Some(Spare(ptr)) => AlignedBuf {
                ptr,
                len_bytes: self.shelf.len_bytes,
                home: None,
            },
            None => AlignedBuf::zeroed(self.len_blocks()),
        };
        b.home = Some(self.shelf.clone());
        b
    }

    /// Spares waiting now.
    pub fn spares(&self) -> usize {
        self.shelf
            .spares
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

/// Buffers of a few sizes, recycled: one [`BufPool`] per size asked for, up
/// to `sizes` of them (a stream uses few: its block size, its largest
/// request, the parts it splits into), each keeping at most `spare_bytes`
/// of spares and no more than `keep_max` buffers. Other sizes get a new
/// zeroed buffer.
pub struct BufPools {
    pools: Vec<BufPool>,
    sizes: usize,
    spare_bytes: usize,
    keep_max: usize,
}

impl BufPools {
    pub fn new(sizes: usize, spare_bytes: usize, keep_max: usize) -> Self {
        BufPools {
            pools: Vec::new(),
            sizes,
            spare_bytes,
            keep_max,
        }
    }

    /// A buffer of `len_blocks` blocks (at least one), as
    /// [`BufPool::take`]: its bytes are those of its last use, for a taker
    /// that overwrites it whole.
    pub fn take(&mut self, len_blocks: usize) -> AlignedBuf {
        let len_blocks = len_blocks.max(1);
        if let Some(p) = self.pools.iter().find(|p| p.len_blocks() == len_blocks) {
            return p.take();
        }
        if self.pools.len() < self.sizes {
            let keep =
                (self.spare_bytes / (len_blocks * BLOCK_SIZE)).clamp(1, self.keep_max.max(1));
            let p = BufPool::new(len_blocks, keep);
            let b = p.take();
            self.pools.push(p);
            return b;
        }
        AlignedBuf::zeroed(len_blocks)
    }
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len_blocks` blocks (at least one).
    pub fn zeroed(len_blocks: usize) -> Self {
        let len_bytes = len_blocks.max(1) * BLOCK_SIZE;
        let layout = Self::layout(len_bytes);
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf {
            ptr,
            len_bytes,
            home: None,
        }
    }

    /// A buffer holding copies of `blocks`, one block each, in order:
    /// gathers the pieces of a coalesced write without zeroing first.
    /// A piece that is not exactly one block is zero-padded or cut.
    pub fn gather(blocks: &[&[u8]]) -> Self {
        let len_bytes = blocks.len().max(1) * BLOCK_SIZE;
        let layout = Self::layout(len_bytes);
        // SAFETY: layout has a non-zero size; every byte is written below
        // (through raw pointers) before the buffer is handed out.
        let raw = unsafe { alloc(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        let base = ptr.as_ptr();
        for k in 0..len_bytes / BLOCK_SIZE {
            let src = blocks.get(k).copied().unwrap_or(&[]);
            let n = src.len().min(BLOCK_SIZE);
            // SAFETY: block k lies inside the allocation of `len_bytes`;
            // `src` is a live slice that cannot overlap our new allocation.
            // Raw writes initialise every byte before any reference exists.
            unsafe {
                let dst = base.add(k * BLOCK_SIZE);
                std::ptr::copy_nonoverlapping(src.as_ptr(), dst, n);
                std::ptr::write_bytes(dst.add(n), 0, BLOCK_SIZE - n);
            }
        }
        AlignedBuf {
            ptr,
            len_bytes,
            home: None,
        }
    }

    /// A buffer holding a copy of `data`, zero-padded to whole blocks.
    /// Copies without zeroing first (only the padding is zeroed): on a
    /// destination's receive path each 1 MiB extent passes through here.
    pub fn from_slice(data: &[u8]) -> Self {
        let len_bytes = data.len().div_ceil(BLOCK_SIZE).max(1) * BLOCK_SIZE;
        debug_assert!(len_bytes >= data.len() && len_bytes - data.len() <= BLOCK_SIZE);
        let layout = Self::layout(len_bytes);
        // SAFETY: layout has a non-zero size; every byte is written below
        // (through raw pointers) before the buffer is handed out.
        let raw = unsafe { alloc(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        let base = ptr.as_ptr();
        // SAFETY: `data.len() <= len_bytes`, so both ranges lie inside the
        // allocation; `data` is a live slice that cannot overlap it. The
        // two writes together initialise all `len_bytes` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), base, data.len());
            std::ptr::write_bytes(base.add(data.len()), 0, len_bytes - data.len());
        }
        AlignedBuf {
            ptr,
            len_bytes,
            home: None,
        }
    }

    // BLOCK_SIZE is a non-zero power of two and `len_bytes` a multiple of
    // it that a slice's length produced, so it cannot overflow isize.
    #[allow(clippy::expect_used)] // cannot fail: see above
    fn layout(len_bytes: usize) -> Layout {
        Layout::from_size_align(len_bytes, BLOCK_SIZE).expect("block-aligned layout is valid")
    }

    pub fn len_bytes(&self) -> usize {
        self.len_bytes
    }

    pub fn len_blocks(&self) -> usize {
        self.len_bytes / BLOCK_SIZE
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len_bytes initialised (zeroed) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len_bytes) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len_bytes) }
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Block `i` of the buffer.
    ///
    /// # Panics
    /// If `i >= self.len_blocks()`, like slice indexing: every caller
    /// passes an index below the block count it sized the buffer with.
    #[allow(clippy::indexing_slicing)] // i < len_blocks() by construction (see above)
    pub fn block(&self, i: usize) -> &[u8] {
        &self.as_slice()[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE]
    }

    /// Block `i` of the buffer, writable; panics as [`Self::block`] does.
    #[allow(clippy::indexing_slicing)] // i < len_blocks() by construction (see block)
    pub fn block_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.as_mut_slice()[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE]
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Some(home) = self.home.take() {
            // A pool's buffers all have its size (no method changes one).
            if home.len_bytes == self.len_bytes && home.keep(self.ptr) {
                return;
            }
        }
        // SAFETY: allocated in `zeroed`, `gather` or `from_slice` with the
        // layout of `len_bytes`, and no longer referenced.
        unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.len_bytes)) }
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> Self {
        Self::from_slice(self.as_slice())
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} blocks)", self.len_blocks())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn gather_copies_each_block_and_pads() {
        let a = vec![1u8; super::BLOCK_SIZE];
        let b = vec![2u8; 10];
        let g = super::AlignedBuf::gather(&[&a, &b]);
        assert_eq!(g.len_blocks(), 2);
        assert!(g.block(0).iter().all(|&x| x == 1));
        assert!(g.block(1)[..10].iter().all(|&x| x == 2));
        assert!(g.block(1)[10..].iter().all(|&x| x == 0));
        assert!(super::AlignedBuf::gather(&[])
            .as_slice()
            .iter()
            .all(|&x| x == 0));
    }

    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        let mut b = AlignedBuf::zeroed(3);
        assert_eq!(b.as_mut_ptr() as usize % BLOCK_SIZE, 0);
        assert_eq!(b.len_bytes(), 3 * BLOCK_SIZE);
        assert!(b.as_slice().iter().all(|&x| x == 0));
        let c = AlignedBuf::from_slice(&[7u8; 5000]);
        assert_eq!(c.len_blocks(), 2);
        assert_eq!(c.as_slice()[4999], 7);
        assert_eq!(c.as_slice()[5000], 0);
    }

    #[test]
    fn from_slice_copies_and_pads_without_a_zeroed_buffer() {
        // Every byte is written: the copy, then zero padding to the block.
        let data: Vec<u8> = (0..3 * BLOCK_SIZE + 10)
            .map(|i| (i % 251) as u8 + 1)
            .collect();
        let b = AlignedBuf::from_slice(&data);
        assert_eq!(b.as_slice().as_ptr() as usize % BLOCK_SIZE, 0);
        assert_eq!(b.len_blocks(), 4);
        assert_eq!(&b.as_slice()[..data.len()], &data[..]);
        assert!(b.as_slice()[data.len()..].iter().all(|&x| x == 0));
        let whole = AlignedBuf::from_slice(&data[..2 * BLOCK_SIZE]);
        assert_eq!(whole.as_slice(), &data[..2 * BLOCK_SIZE]);
        let empty = AlignedBuf::from_slice(&[]);
        assert_eq!(empty.len_blocks(), 1);
        assert!(empty.as_slice().iter().all(|&x| x == 0));
    }

    #[test]
    fn a_pool_recycles_its_buffers_up_to_its_keep() {
        let pool = super::BufPool::new(2, 1);
        let mut a = pool.take();
        assert_eq!(a.len_blocks(), 2);
        assert!(
            a.as_slice().iter().all(|&x| x == 0),
            "a new buffer is zeroed"
        );
        a.as_mut_slice()[0] = 9;
        let at = a.as_mut_ptr();
        let b = pool.take();
        drop(a);
        drop(b); // beyond `keep`: freed
        assert_eq!(pool.spares(), 1);
        let mut c = pool.take();
        assert_eq!(c.as_mut_ptr(), at, "the spare comes back");
        assert_eq!(c.as_slice()[0], 9, "holding its last bytes");
        assert_eq!(pool.spares(), 0);
        // A clone is a plain buffer; a buffer outliving its pool still
        // goes back to the (now private) shelf and is freed with it.
        let d = c.clone();
        drop(pool);
        drop(c);
        drop(d);
    }

    #[test]
    fn a_pool_is_shared_across_threads() {
        let pool = super::BufPool::new(1, 8);
        let bufs: Vec<_> = (0..8).map(|_| pool.take()).collect();
        std::thread::spawn(move || drop(bufs)).join().unwrap();
        assert_eq!(pool.spares(), 8);
    }

    #[test]
    fn pools_of_a_few_sizes_recycle_each_and_allocate_the_rest() {
        // Two sizes recycled, 8 KiB of spares per size, at most 3 buffers.
        let mut pools = super::BufPools::new(2, 8192, 3);
        let mut a = pools.take(1);
        a.as_mut_slice()[0] = 1;
        let at = a.as_mut_ptr();
        drop(a);
        let mut again = pools.take(1);
        assert_eq!(again.as_mut_ptr(), at, "size 1 recycled");
        let mut b = pools.take(2);
        b.as_mut_slice()[0] = 2;
        let bt = b.as_mut_ptr();
        drop(b);
        assert_eq!(pools.take(2).as_mut_ptr(), bt, "size 2 recycled");
        // A third size is past `sizes`: a new zeroed buffer, not kept.
        let mut c = pools.take(3);
        assert_eq!(c.len_blocks(), 3);
        assert!(c.as_slice().iter().all(|&x| x == 0));
        c.as_mut_slice()[0] = 3;
        drop(c);
        assert!(pools.take(3).as_slice().iter().all(|&x| x == 0));
        // Size 1 keeps at most 8 KiB / 4 KiB = 2 spares.
        let bufs: Vec<_> = (0..3).map(|_| pools.take(1)).collect();
        drop(bufs);
        drop(again);
        assert_eq!(pools.pools[0].spares(), 2);
    }
}
