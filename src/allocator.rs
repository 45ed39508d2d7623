//! The process's allocator: mimalloc (per-thread heaps instead of glibc
//! malloc's shared arenas and locks, which the accept path's small
//! allocations were paying for; see docs/benchmarks.md).
//!
//! A layout whose alignment `mi_malloc` already guarantees goes to `mi_malloc`,
//! any other to `mi_malloc_aligned`, as Rust's own `System` allocator calls
//! `malloc` where it can. The
//! `mimalloc` crate sends every layout to `mi_malloc_aligned`, whose quick path
//! serves only blocks up to 1 KiB: a request's larger allocations (a
//! connection's buffers, boxed futures, task cells) took its slow path, about
//! 180 instructions each.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment `mi_malloc` gives every block, whatever its size: its size
/// classes are whole machine words (a 24-byte block is only 8-aligned, so its
/// `MI_MAX_ALIGN_SIZE` of 16 holds only for some sizes).
const MALLOC_ALIGN: usize = std::mem::size_of::<usize>();

/// mimalloc, with `mi_malloc` for every layout it aligns on its own.
pub struct Mimalloc;

/// Whether `mi_malloc` alone already aligns a block of this layout.
fn plain(layout: &Layout) -> bool {
    layout.align() <= MALLOC_ALIGN
}

// SAFETY: every block comes from mimalloc and goes back to it through
// `mi_free` / `mi_realloc*`, which accept blocks from any of its allocation
// functions; a layout is sent to an aligned function unless `plain` holds,
// in which case `mi_malloc`'s own guarantee covers its alignment.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if plain(&layout) {
            mi::mi_malloc(layout.size()).cast()
        } else {
            mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if plain(&layout) {
            mi::mi_zalloc(layout.size()).cast()
        } else {
            mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        mi::mi_free(ptr.cast::<c_void>());
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if plain(&layout) {
            mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
        } else {
            mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every block is aligned as its layout asks, keeps its bytes across a
    /// realloc that grows or shrinks it, and reads zero when asked zeroed.
    #[test]
    fn blocks_are_aligned_and_keep_their_bytes() {
        let allocator = Mimalloc;
        for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in [1, 7, 8, 15, 16, 17, 100, 1024, 1025, 5000, 70_000] {
                let layout = Layout::from_size_align(size, align).unwrap();
                unsafe {
                    let zeroed = allocator.alloc_zeroed(layout);
                    assert!(!zeroed.is_null());
                    assert_eq!(zeroed as usize % align, 0, "zeroed {size}/{align}");
                    assert!(std::slice::from_raw_parts(zeroed, size).iter().all(|&b| b == 0));
                    allocator.dealloc(zeroed, layout);

                    let block = allocator.alloc(layout);
                    assert_eq!(block as usize % align, 0, "{size}/{align}");
                    for i in 0..size {
                        *block.add(i) = (i % 251) as u8;
                    }
                    // Grow, then shrink below the first size: the bytes kept
                    // each time are the ones written first.
                    let mut block = block;
                    let mut old = layout;
                    for new_size in [size * 3, size / 2 + 1] {
                        block = allocator.realloc(block, old, new_size);
                        assert_eq!(block as usize % align, 0, "realloc {size}->{new_size}/{align}");
                        let kept = old.size().min(new_size);
                        assert!((0..kept).all(|i| *block.add(i) == (i % 251) as u8), "{size}->{new_size}/{align}");
                        old = Layout::from_size_align(new_size, align).unwrap();
                    }
                    allocator.dealloc(block, old);
                }
            }
        }
    }
}
