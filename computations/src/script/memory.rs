//! What a script call allocates: a global allocator that counts, per
//! thread, the bytes allocated and freed, and the budget a call checks
//! against them.
//!
//! A call runs on one executor thread from start to end, so the change in
//! that thread's count between the call's start and any moment of it is
//! what the call holds then (less what it freed of older allocations).
//! The `millrace` binary installs [`MeteredAlloc`] over its allocator;
//! without it the count stays 0 and no call is stopped for its memory.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;

thread_local! {
    /// Bytes this thread allocated less those it freed (wrapping; only
    /// differences are used).
    static LIVE: Cell<i64> = const { Cell::new(0) };
    /// [`LIVE`] when the running call started.
    static CALL_START: Cell<i64> = const { Cell::new(0) };
}

fn add(bytes: usize, sign: i64) {
    // `try_with`: an allocation while the thread's locals are torn down
    // is not counted (no call runs then).
    let _ = LIVE.try_with(|l| l.set(l.get().wrapping_add(sign.wrapping_mul(bytes as i64))));
}

/// An allocator counting what each thread allocates, over `A`.
pub struct MeteredAlloc<A>(pub A);

// SAFETY: every request is passed to `A` unchanged; the counting touches
// only a thread-local integer (constant-initialised, no destructor, so it
// never allocates).
unsafe impl<A: GlobalAlloc> GlobalAlloc for MeteredAlloc<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on to `A`.
        let p = unsafe { self.0.alloc(layout) };
        if !p.is_null() {
            add(layout.size(), 1);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { self.0.alloc_zeroed(layout) };
        if !p.is_null() {
            add(layout.size(), 1);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as for `alloc`.
        unsafe { self.0.dealloc(ptr, layout) };
        add(layout.size(), -1);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { self.0.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            add(layout.size(), -1);
            add(new_size, 1);
        }
        p
    }
}

/// Marks the start of a call on this thread.
pub(crate) fn start_call() {
    let now = LIVE.with(Cell::get);
    CALL_START.with(|s| s.set(now));
}

/// Bytes the call running on this thread holds now (0 without
/// [`MeteredAlloc`]).
pub(crate) fn held() -> i64 {
    LIVE.with(Cell::get)
        .wrapping_sub(CALL_START.with(Cell::get))
}

/// The unit tests run with the counting allocator, as the binary does.
#[cfg(test)]
#[global_allocator]
static TESTS: MeteredAlloc<std::alloc::System> = MeteredAlloc(std::alloc::System);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_holds_what_it_allocated_and_did_not_free() {
        // Held from before the call: not the call's.
        let older = std::hint::black_box(vec![0u8; 1 << 20]);
        start_call();
        let kept = vec![0u8; 1 << 20];
        let grown = {
            let mut v = Vec::<u8>::with_capacity(16);
            v.resize(1 << 16, 1);
            v
        };
        let freed = vec![0u8; 1 << 20];
        drop(freed);
        let zeroed = std::hint::black_box(vec![0u64; 1 << 10]);
        let held = held();
        let want = (1 << 20) + (1 << 16) + (8 << 10);
        // Other allocations of the test harness on this thread are small.
        assert!((want..want + 4096).contains(&held), "{held}");
        drop((kept, grown, zeroed, older));
        assert!(self::held() < 4096);
    }
}
