//! Which stripe of a striped structure this thread uses.
//!
//! Something every hit of every thread writes (a counter, the spare
//! connections) is split into [`STRIPES`] parts, each on a cache line of its
//! own, and each thread uses one of them: one shared part would bounce its
//! cache line between the cores on every hit.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Stripes of a striped structure.
pub(crate) const STRIPES: usize = 4;

thread_local! {
    /// This thread's stripe, handed out in turn as threads first ask.
    static STRIPE: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES
    };
}

/// This thread's stripe (the first one while the thread is being torn down).
#[inline]
pub(crate) fn this_thread() -> usize {
    STRIPE.try_with(|s| *s).unwrap_or(0)
}
