//! 4 KiB-aligned block buffers, as O_DIRECT and registered io_uring buffers
//! require. A buffer is always a whole number of blocks and is zeroed when
//! allocated; it owns its memory and is `Send`.

use super::BLOCK_SIZE;
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len_bytes: usize,
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
        AlignedBuf { ptr, len_bytes }
    }

    /// A buffer holding a copy of `data`, zero-padded to whole blocks.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut buf = Self::zeroed(data.len().div_ceil(BLOCK_SIZE));
        buf.as_mut_slice()[..data.len()].copy_from_slice(data);
        buf
    }

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
    pub fn block(&self, i: usize) -> &[u8] {
        &self.as_slice()[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE]
    }

    pub fn block_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.as_mut_slice()[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE]
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this exact layout.
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
}
