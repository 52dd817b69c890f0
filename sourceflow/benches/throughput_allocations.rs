//! The throughput benchmark's flow (`throughput.rs`, same rows, same baseline) with a global
//! allocator that counts: heap allocations per command (its event included), for each row.
//! A count does not vary with the machine's load the way a rate does, so it shows a change
//! to the allocations of the hot path at once; the rates are `throughput`'s.
//!
//! ```text
//! cargo bench -p sourceflow --bench throughput_allocations
//! cargo bench -p sourceflow --bench throughput_allocations -- "(defaults)" baseline
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

/// The system allocator, counting allocations (a reallocation counts as one).
struct Counting;

static COUNT: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is passed on to `System` unchanged; the counter is all that is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        COUNT.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc` is passed on as is.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        COUNT.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc_zeroed` is passed on as is.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        COUNT.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract for `realloc` is passed on as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[path = "throughput.rs"]
mod throughput;

fn main() {
    let _ = throughput::ALLOCATIONS.set(|| COUNT.load(Ordering::Relaxed));
    throughput::main()
}
