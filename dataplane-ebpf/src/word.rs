//! Atomic updates of the map words that several CPUs, and user space through
//! memory mappings, write: one compare-and-exchange, and a bounded loop of
//! them for words that only ever move one way.

use core::intrinsics::{AtomicOrdering, atomic_cxchg};

/// One compare-and-exchange of `word` from `current` to `new`: the value it
/// held, and whether that was `current` (it is now `new`).
///
/// # Safety
/// `word` points into a map slot, which lives as long as the map.
#[inline(always)]
pub(crate) unsafe fn exchange(word: *mut u64, current: u64, new: u64) -> (u64, bool) {
    // SAFETY: the caller's word is valid; the exchange is atomic across CPUs
    // and with user space.
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            word, current, new,
        )
    }
}

/// Moves `word` to `next(current)` until `next` has no move for it (`None`)
/// or an exchange succeeds: a few attempts, bounded for the verifier.
/// Returns the value the successful exchange replaced.
///
/// # Safety
/// As for `exchange`.
#[inline(always)]
pub(crate) unsafe fn update(word: *mut u64, next: impl Fn(u64) -> Option<u64>) -> Option<u64> {
    for _ in 0..4 {
        // SAFETY: the caller's word is valid. A volatile read: other CPUs
        // and user space write it.
        let current = unsafe { core::ptr::read_volatile(word) };
        let new = next(current)?;
        // SAFETY: as above.
        if unsafe { exchange(word, current, new) }.1 {
            return Some(current);
        }
    }
    None
}
