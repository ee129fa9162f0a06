//! Counters of what the cache and the lock did, for metrics and for tests.
//!
//! Every counter is an [`AtomicU64`]; with the `metrics` feature it also feeds a
//! `metrics` counter of the same meaning (see `telemetry.rs` for the names), so
//! the two never disagree.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::stripes::{self, STRIPES};

/// One counter: a relaxed atomic and, with the `metrics` feature, the matching
/// `metrics` counter (a no-op one unless the cache was built with a recorder
/// installed).
///
/// The count is kept in `STRIPES` atomics (`stripes.rs`), each on a cache line of its own,
/// and each thread adds to one of them: a counter every hit of every thread
/// bumps (`hits`) would otherwise bounce one cache line between the cores.
/// A read sums them.
#[derive(Debug, Default)]
pub(crate) struct Counter {
    stripes: [Stripe; STRIPES],
    #[cfg(feature = "metrics")]
    metric: Option<metrics::Counter>,
}

/// One stripe, alone on its cache line (128 bytes: two lines on CPUs that
/// fetch lines in pairs).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe(AtomicU64);

impl Counter {
    /// Adds `n`; the same signature as [`AtomicU64::fetch_add`], so code that
    /// counts does not care whether metrics are on. Returns what this thread's
    /// stripe held, not the count.
    pub(crate) fn fetch_add(&self, n: u64, ordering: Ordering) -> u64 {
        #[cfg(feature = "metrics")]
        if let Some(metric) = &self.metric {
            metric.increment(n);
        }
        self.stripes[stripes::this_thread()]
            .0
            .fetch_add(n, ordering)
    }

    fn get(&self) -> u64 {
        self.stripes
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }
}

/// Declares the counters once: the live [`Stats`], the [`StatsSnapshot`] fields
/// (with their docs), the snapshot, serialisation and the metrics names.
macro_rules! counters {
    ($( $(#[doc = $doc:literal])* $name:ident, )*) => {
        /// Live counters, shared by a cache, its lock and their tasks.
        #[derive(Debug, Default)]
        pub struct Stats {
            $( pub(crate) $name: Counter, )*
        }

        /// A copy of a cache's counters at one instant. All counts are since the
        /// cache was built, in this process.
        ///
        /// # Every call is counted once
        ///
        /// A `get_or_load` call either joins a load already in flight in this
        /// process (`coalesced`) or looks the key up itself, and a lookup is either
        /// a `hit` (its first read found the value) or a `miss`. A miss then ends in
        /// one of: a load by this call (`loads`), the value stored meanwhile by
        /// another process and found while waiting for the lock
        /// (`found_while_waiting`, never also a hit), or an error. So:
        ///
        /// - **hit ratio** = `hits / (hits + misses)` ([`hit_ratio`](Self::hit_ratio)):
        ///   the share of lookups the cache answered with one round trip;
        /// - calls that ran no loader = `hits + coalesced + found_while_waiting`,
        ///   out of `hits + misses + coalesced` calls.
        ///
        /// (One exception keeps each counter honest rather than the sum: a follower
        /// whose in-process leader was cancelled or panicked is counted in
        /// `coalesced` and then, leading itself, as a hit or a miss.)
        /// [`LockedCache::get`](crate::LockedCache::get) counts a hit or a miss too.
        ///
        /// Serialises (with serde) as a flat map of these counters, e.g. for a
        /// JSON status endpoint.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct StatsSnapshot {
            $( $(#[doc = $doc])* pub $name: u64, )*
        }

        impl Stats {
            /// Reads every counter.
            pub fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot { $( $name: self.$name.get(), )* }
            }

            /// Counters that also feed `metrics` counters named
            /// `locked_cache_<counter>_total`, labelled `cache = name`.
            #[cfg(feature = "metrics")]
            pub(crate) fn with_metrics(name: &str) -> Stats {
                Stats {
                    $( $name: Counter {
                        stripes: Default::default(),
                        metric: Some(metrics::counter!(
                            concat!("locked_cache_", stringify!($name), "_total"),
                            crate::telemetry::CACHE_LABEL => name.to_owned()
                        )),
                    }, )*
                }
            }
        }

        impl serde::Serialize for StatsSnapshot {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeStruct;
                const FIELDS: usize = [$( stringify!($name), )*].len();
                let mut s = serializer.serialize_struct("StatsSnapshot", FIELDS)?;
                $( s.serialize_field(stringify!($name), &self.$name)?; )*
                s.end()
            }
        }

        /// The names of the counters, in declaration order (for docs and tests).
        #[cfg(test)]
        const COUNTER_NAMES: &[&str] = &[$( stringify!($name), )*];
    };
}

counters! {
    /// Lookups whose first read found a value (one round trip). A value found
    /// later, after waiting for another process's load, is counted in
    /// `found_while_waiting` instead.
    hits,
    /// Lookups whose first read found no usable value, or a stale one this
    /// call then refreshed itself before returning (a plain `get_or_load`
    /// that got the key's lock).
    misses,
    /// Calls that joined a load already in flight in this process instead of
    /// touching Redis; they get that load's outcome.
    coalesced,
    /// Misses that found the value stored by another process while waiting for
    /// the lock (woken by its wake-up or at a retry, or on the re-check under
    /// the lock). Not counted as hits.
    found_while_waiting,
    /// Times this process ran a loader.
    loads,
    /// Loader runs that returned an error or panicked.
    load_errors,
    /// Lock acquisition attempts (one attempt = one `SET NX` per master).
    lock_attempts,
    /// Waits for a lock, or for an in-process leader, that ran out of time.
    lock_timeouts,
    /// Release messages that woke at least one waiter of this process.
    wakeups,
    /// Loads whose lock was lost (an extension was refused by the masters) before
    /// the value was stored. The value was returned, and stored only if no newer
    /// holder took the fence (see `writes_refused`).
    lock_lost,
    /// Stored values that could not be decoded (foreign bytes, another type,
    /// truncated, wrong Redis type) and were treated as misses.
    corrupt_values,
    /// Loads run without the lock because the quorum was lost and the policy is
    /// [`QuorumLossPolicy::FailOpen`](crate::QuorumLossPolicy::FailOpen).
    fail_open_loads,
    /// Loaded values not stored because the key's fence was taken meanwhile: by a
    /// newer lock holder (this one lost its lock), or by `set`/`invalidate`. The
    /// callers got the value; it was not written.
    writes_refused,
    /// Loaded values not stored because the store failed (Redis down, timeout).
    /// The callers got the value; it was not cached.
    store_errors,
    /// Lookups that found a value past its fresh time, inside its stale window
    /// (see [`CallOptions::stale_for`](crate::CallOptions::stale_for)), and
    /// served it at once ([`Outcome::Stale`](crate::Outcome::Stale)). Counted
    /// as hits too.
    stale_served,
    /// Refreshes started by this process for a stale value, or early (before
    /// the value went stale): at most one per key across every process at a
    /// time, since each holds the key's lock.
    refreshes,
    /// Fresh values that early refresh decided to reload before they expire.
    early_refreshes,
    /// Loads on a task of their own that failed with nobody to tell: a
    /// background refresh (loader error or panic, the cache failed, or the
    /// [background timeout](crate::CallOptions::background_timeout) passed),
    /// or a detached load whose caller had gone away. The error is logged;
    /// the value in Redis is kept.
    background_errors,
    /// Calls that refreshed a stale value themselves and, that refresh having
    /// failed or passed its soft or hard timeout, returned the stale value
    /// instead ([`Outcome::FailSafe`](crate::Outcome::FailSafe)). Counted as
    /// misses (see `misses`).
    fail_safe_served,
    /// Lookups that found a cached "not found" (a loader's `None` stored with
    /// the negative TTL). Counted as hits too.
    negative_hits,
    /// Calls answered by the near cache (feature `near-cache`): no round trip,
    /// no decode. Not counted in `hits` or `misses`.
    near_hits,
    /// Near cache lookups that went on to Redis (absent, expired, another type,
    /// or the invalidation subscription down).
    near_misses,
    /// Invalidations received from other processes and applied to the near cache.
    near_invalidations,
    /// Near cache invalidation subscriptions lost (each clears the near cache).
    near_resubscriptions,
}

impl StatsSnapshot {
    /// `hits / (hits + misses)`: the share of lookups answered by their first
    /// read. `None` before the first lookup.
    pub fn hit_ratio(&self) -> Option<f64> {
        let lookups = self.hits + self.misses;
        (lookups > 0).then(|| self.hits as f64 / lookups as f64)
    }
}

impl Stats {
    pub(crate) fn add(counter: &Counter) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_snapshot_serialises_every_counter_by_name() {
        let stats = Stats::default();
        Stats::add(&stats.hits);
        Stats::add(&stats.hits);
        Stats::add(&stats.misses);
        let json = serde_json::to_value(stats.snapshot()).unwrap();
        let map = json.as_object().unwrap();
        assert_eq!(map.len(), COUNTER_NAMES.len());
        assert_eq!(map["hits"], 2);
        assert_eq!(map["misses"], 1);
        assert_eq!(map["found_while_waiting"], 0);
        assert_eq!(stats.snapshot().hit_ratio(), Some(2.0 / 3.0));
        assert_eq!(StatsSnapshot::default().hit_ratio(), None);
    }

    #[test]
    fn counts_from_many_threads_add_up_across_the_stripes() {
        let stats = Stats::default();
        std::thread::scope(|scope| {
            for _ in 0..(STRIPES * 2 + 1) {
                scope.spawn(|| {
                    for _ in 0..1000 {
                        Stats::add(&stats.hits);
                    }
                });
            }
        });
        assert_eq!(stats.snapshot().hits, (STRIPES as u64 * 2 + 1) * 1000);
    }
}
