//! Counters of what the cache and the lock did, for metrics and for tests.

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters, shared by a cache, its lock and their tasks.
#[derive(Debug, Default)]
pub struct Stats {
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) loads: AtomicU64,
    pub(crate) load_errors: AtomicU64,
    pub(crate) coalesced: AtomicU64,
    pub(crate) lock_attempts: AtomicU64,
    pub(crate) lock_timeouts: AtomicU64,
    pub(crate) wakeups: AtomicU64,
    pub(crate) lock_lost: AtomicU64,
    pub(crate) corrupt_values: AtomicU64,
    pub(crate) fail_open_loads: AtomicU64,
    pub(crate) writes_refused: AtomicU64,
    pub(crate) store_errors: AtomicU64,
}

/// A copy of the counters at one instant. All counts are since the cache was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StatsSnapshot {
    /// Lookups answered from the store (including a value found on the re-check).
    pub hits: u64,
    /// Lookups that found no (usable) value on the first read.
    pub misses: u64,
    /// Times this process ran a loader.
    pub loads: u64,
    /// Loader runs that returned an error or panicked.
    pub load_errors: u64,
    /// Calls that joined a load already in flight in this process instead of
    /// touching Redis.
    pub coalesced: u64,
    /// Lock acquisition attempts (one attempt = one `SET NX` per master).
    pub lock_attempts: u64,
    /// Waits for a lock that ran out of time.
    pub lock_timeouts: u64,
    /// Release messages that woke at least one waiter of this process.
    pub wakeups: u64,
    /// Loads whose lock was lost (an extension was refused by the masters) before
    /// the value was stored. The value was returned, and stored only if no newer
    /// holder took the fence (see `writes_refused`).
    pub lock_lost: u64,
    /// Stored values that could not be decoded (foreign bytes, another type,
    /// truncated, wrong Redis type) and were treated as misses.
    pub corrupt_values: u64,
    /// Loads run without the lock because the quorum was lost and the policy is
    /// [`QuorumLossPolicy::FailOpen`](crate::QuorumLossPolicy::FailOpen).
    pub fail_open_loads: u64,
    /// Loaded values not stored because the key's fence was taken meanwhile: by a
    /// newer lock holder (this one lost its lock), or by `set`/`invalidate`. The
    /// callers got the value; it was not written.
    pub writes_refused: u64,
    /// Loaded values not stored because the store failed (Redis down, timeout).
    /// The callers got the value; it was not cached.
    pub store_errors: u64,
}

impl Stats {
    /// Reads every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            hits: get(&self.hits),
            misses: get(&self.misses),
            loads: get(&self.loads),
            load_errors: get(&self.load_errors),
            coalesced: get(&self.coalesced),
            lock_attempts: get(&self.lock_attempts),
            lock_timeouts: get(&self.lock_timeouts),
            wakeups: get(&self.wakeups),
            lock_lost: get(&self.lock_lost),
            corrupt_values: get(&self.corrupt_values),
            fail_open_loads: get(&self.fail_open_loads),
            writes_refused: get(&self.writes_refused),
            store_errors: get(&self.store_errors),
        }
    }

    pub(crate) fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
