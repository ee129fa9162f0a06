//! [`LockedCache`]: `get_or_load` with double-checked locking over Redlock.
//!
//! The data path of a call, top to bottom:
//!
//! 1. [`LockedCache::get_or_load_with`] joins the key's in-process flight
//!    (`flight.rs`); followers wait for the leader's outcome.
//! 2. The leader ([`Inner::lead`]) reads the value (`GET`, one round trip); a hit
//!    ends here.
//! 3. On a miss it registers for release wake-ups and takes the lock
//!    ([`Redlock`], `lock/`: `SET NX PX` on every master), sleeping between
//!    attempts until a release is published or the retry time passes, and
//!    re-reading the value after each wake.
//! 4. Holding the lock, it reads again and takes the write fence in one script
//!    (`get_or_fence`); if still missing it runs the loader while `keepalive.rs`
//!    extends the lock, and stores the value with the fenced `SET` script, which
//!    publishes the wake-up for other processes.
//! 5. [`LockedCache::get_or_load_with`] hands the value to the flight's
//!    followers, then releases the lock (which publishes again).

mod builder;
mod flight;
mod keepalive;
mod keys;

pub use builder::{Builder, QuorumLossPolicy};
pub use keepalive::LoadContext;

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::{self, BincodeCodec, Codec};
use crate::error::{Error, LoadError, Result};
use crate::lock::{Attempt, LockGuard, Redlock, Splits, Token};
use crate::stats::{Stats, StatsSnapshot};
use crate::store::{Publish, SharedStore};
use flight::{Bytes, Flights, Outcome, Role};
use keepalive::KeepAlive;
use keys::Keys;

/// A cache over Redis (or the embedded store) whose misses are loaded once across
/// every process, guarded by a Redlock. Cheap to clone; clones share everything.
///
/// ```no_run
/// # use std::time::Duration;
/// # #[derive(serde::Serialize, serde::Deserialize)] struct Report;
/// # async fn build_report() -> Result<Report, std::io::Error> { Ok(Report) }
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use locked_cache::LockedCache;
///
/// let cache = LockedCache::builder()
///     .redis("redis://127.0.0.1:6379")
///     .ttl(Duration::from_secs(60))
///     .build()
///     .await?;
/// let report: Report = cache
///     .get_or_load("report:2026-11", || async { build_report().await })
///     .await?;
/// # Ok(()) }
/// ```
pub struct LockedCache<C = BincodeCodec> {
    inner: Arc<Inner<C>>,
}

impl<C> Clone for LockedCache<C> {
    fn clone(&self) -> Self {
        LockedCache {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<C> fmt::Debug for LockedCache<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockedCache")
            .field("value_store", &self.inner.value_store)
            .field("lock", &self.inner.lock)
            .field("ttl", &self.inner.ttl)
            .field("key_prefix", &self.inner.key_prefix)
            .finish_non_exhaustive()
    }
}

struct Inner<C> {
    value_store: SharedStore,
    lock: Redlock,
    ttl: Duration,
    key_prefix: String,
    max_value_size: usize,
    max_key_len: usize,
    command_timeout: Duration,
    coalesce: bool,
    quorum_loss: QuorumLossPolicy,
    /// Values live on a server of their own (`cache_url`), not on a lock master.
    separate_value_server: bool,
    codec: C,
    flights: Flights,
    stats: Arc<Stats>,
}

impl LockedCache<BincodeCodec> {
    /// A builder with every option at its default (the embedded store, bincode).
    pub fn builder() -> Builder<BincodeCodec> {
        Builder::default()
    }
}

impl<C: Codec> LockedCache<C> {
    /// Returns the value under `key`, or runs `loader` to produce it, once across
    /// every caller, process and host sharing the Redis masters.
    ///
    /// A hit costs one Redis round trip. On a miss the caller takes the lock on
    /// `lock.<prefix><key>`, reads again (another process may have stored the
    /// value meanwhile, and then it is returned without loading), runs the loader,
    /// stores the value with the cache's TTL, releases the lock and returns it.
    ///
    /// # Concurrent callers
    ///
    /// In one process, concurrent calls for the same key share one *flight*: only
    /// its leader reads Redis, takes the lock and runs its loader; the others wait
    /// for its outcome and never run theirs (a cold stampede of N callers costs
    /// one read and one lock per process, not N). Callers in other processes
    /// wait for the lock; the moment the holder stores the value they are woken
    /// by pub/sub (or at their next retry if the message was lost), find the
    /// value and return it, without waiting for the release. Nobody waits much longer than the wait time for someone else's
    /// load (at most two command timeouts more, for a last read and attempt);
    /// followers of a slow loader get [`Error::LockTimeout`] too.
    ///
    /// # Errors
    ///
    /// - [`LoadError::Loader`]: the loader failed. Nothing is stored and the lock is
    ///   released at once. In-process followers of the flight receive the *same*
    ///   error (the `Arc` is shared), so a failing backend is hit once, not once per
    ///   caller. Waiters in other processes are woken and one of them takes the lock
    ///   and tries its own loader: at most one load at a time per key.
    /// - [`LoadError::Cache`]: [`Error::LockTimeout`] when the lock stayed held for
    ///   the whole wait time; [`Error::QuorumNotReached`] when too few masters
    ///   answered (see [`QuorumLossPolicy`]); Redis, pool or timeout errors;
    ///   [`Error::ValueTooLarge`] when the loaded value exceeds the maximum (it is
    ///   not stored); [`Error::InvalidKey`] for an empty or over-long key.
    ///
    /// A stored value that cannot be decoded (foreign bytes, another type, another
    /// codec, a Redis type other than string) is treated as a miss: it is reloaded
    /// and overwritten, with a `tracing` warning and the
    /// [`corrupt_values`](StatsSnapshot::corrupt_values) counter.
    ///
    /// # Cancellation
    ///
    /// Dropping the future at any await point is safe. A follower just leaves. A
    /// leader's flight is abandoned and one of its followers becomes the new
    /// leader (reading Redis again, so a value stored meanwhile is not reloaded).
    /// A held lock is released by a spawned task (or expires), and the lock
    /// keep-alive task is aborted: nothing keeps running.
    ///
    /// # Panics
    ///
    /// This method does not panic. If the loader panics, the panic propagates to
    /// the caller whose loader it was, exactly as if the loader had been called
    /// directly; the lock is released as for cancellation; followers are not
    /// stranded: one of them takes over and runs its own loader. Later calls are
    /// unaffected (nothing is poisoned).
    ///
    /// # Lock loss
    ///
    /// While the loader runs, the lock is extended every third of its expiry. If an
    /// extension is refused (the lock expired during a pause, or a master lost
    /// it), the value is still returned to the callers, but it is written only if
    /// no newer holder took the key's fence since: a holder that lost its lock
    /// never overwrites a newer value. See [`get_or_load_with`](Self::get_or_load_with)
    /// to observe the loss from inside the loader.
    ///
    /// # Example
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::sync::atomic::{AtomicU32, Ordering};
    /// use locked_cache::LockedCache;
    ///
    /// // No Redis given: the embedded store.
    /// let cache = LockedCache::builder().build().await?;
    /// let loads = AtomicU32::new(0);
    /// let load = || async {
    ///     loads.fetch_add(1, Ordering::SeqCst);
    ///     Ok::<_, std::io::Error>(format!("expensive value"))
    /// };
    /// let (a, b) = tokio::join!(cache.get_or_load("k", load), cache.get_or_load("k", load));
    /// assert_eq!(a?, "expensive value");
    /// assert_eq!(b?, "expensive value");
    /// let c: String = cache.get_or_load("k", load).await?;
    /// assert_eq!(c, "expensive value");
    /// assert_eq!(loads.load(Ordering::SeqCst), 1);
    /// # Ok(()) }
    /// ```
    pub async fn get_or_load<T, E, F, Fut>(&self, key: &str, loader: F) -> Result<T, LoadError<E>>
    where
        T: Serialize + DeserializeOwned,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.get_or_load_with(key, |_| loader()).await
    }

    /// As [`get_or_load`](Self::get_or_load), with a [`LoadContext`] handed to the
    /// loader: it tells whether the lock protecting the load was lost, so a long
    /// load can stop early when another process has taken over.
    pub async fn get_or_load_with<T, E, F, Fut>(
        &self,
        key: &str,
        loader: F,
    ) -> Result<T, LoadError<E>>
    where
        T: Serialize + DeserializeOwned,
        E: Send + Sync + 'static,
        F: FnOnce(LoadContext) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let inner = &*self.inner;
        keys::check_key(&inner.key_prefix, key, inner.max_key_len)?;
        // One deadline per call, for waiting on someone else's load: in this
        // process (as a follower) or in another (for the lock).
        let started = Instant::now();
        let deadline = started + inner.lock.options().wait;
        if !inner.coalesce {
            return Ok(inner
                .lead(key, loader, started, deadline)
                .await?
                .finish()
                .await);
        }
        let mut counted = false;
        let leader = loop {
            let rx = match inner.flights.join(key) {
                Role::Leader(leader) => break leader,
                Role::Follower(rx) => rx,
            };
            if !std::mem::replace(&mut counted, true) {
                Stats::add(&inner.stats.coalesced);
            }
            // The leader gives up on the lock at the same deadline, after at most
            // one more read and one more attempt: leave it that long to hand over
            // its own outcome.
            let give_up = deadline + inner.command_timeout * 2;
            let Ok(outcome) = tokio::time::timeout_at(give_up.into(), flight::outcome(rx)).await
            else {
                Stats::add(&inner.stats.lock_timeouts);
                return Err(LoadError::Cache(Error::LockTimeout {
                    resource: Keys::new(&inner.key_prefix, key).lock,
                    waited: started.elapsed(),
                }));
            };
            match outcome {
                Outcome::Value(bytes) => {
                    return codec::decode(&inner.codec, &bytes)
                        .map_err(|e| LoadError::Cache(e.into()));
                }
                Outcome::LoaderError(shared) => match shared.downcast::<E>() {
                    Ok(e) => return Err(LoadError::Loader(e)),
                    // A caller with another error type led: load for ourselves.
                    Err(_) => continue,
                },
                Outcome::Failed(e) => return Err(LoadError::Cache(e)),
                Outcome::Abandoned => continue,
            }
        };
        let result = inner.lead(key, loader, started, deadline).await;
        // Followers get the outcome first; then the lock is released.
        leader.finish(match &result {
            Ok(led) => Outcome::Value(Arc::clone(&led.bytes)),
            Err(LoadError::Loader(e)) => {
                Outcome::LoaderError(Arc::clone(e) as Arc<dyn Any + Send + Sync>)
            }
            Err(LoadError::Cache(e)) => Outcome::Failed(e.clone()),
        });
        Ok(result?.finish().await)
    }

    /// The value under `key`, if there is one that decodes. One round trip; no
    /// lock. An undecodable value counts as absent (and as corrupt in the stats).
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        let inner = &*self.inner;
        keys::check_key(&inner.key_prefix, key, inner.max_key_len)?;
        let found = inner.read(&keys::value_key(&inner.key_prefix, key)).await?;
        Stats::add(if found.is_some() {
            &inner.stats.hits
        } else {
            &inner.stats.misses
        });
        Ok(found.map(|(value, _)| value))
    }

    /// Stores `value` under `key` with the cache's TTL, unconditionally (no lock):
    /// for writers that know the fresh value, such as after an update. A load of
    /// `key` already running when this is called will not overwrite it (its write
    /// is fenced out); its callers still get the value it loaded.
    pub async fn set<T: Serialize>(&self, key: &str, value: &T) -> Result<()> {
        self.set_with_ttl(key, value, self.inner.ttl).await
    }

    /// As [`set`](Self::set), with its own TTL (1 ms to 10 years, else
    /// [`Error::InvalidConfig`]).
    pub async fn set_with_ttl<T: Serialize>(
        &self,
        key: &str,
        value: &T,
        ttl: Duration,
    ) -> Result<()> {
        let inner = &*self.inner;
        keys::check_key(&inner.key_prefix, key, inner.max_key_len)?;
        if ttl < Duration::from_millis(1) || ttl > builder::MAX_TTL {
            return Err(Error::InvalidConfig(
                "ttl must be at least 1 ms and at most 10 years".into(),
            ));
        }
        let bytes = inner.encode(key, value)?;
        let keys = Keys::new(&inner.key_prefix, key);
        // Fence first: a load already running must not overwrite this value with
        // what it read before the change.
        inner.value_store.delete(&keys.fence).await?;
        inner.value_store.set(&keys.value, &bytes, ttl).await
    }

    /// Removes the value under `key`; the next `get_or_load` loads it again.
    /// A load already running when this is called does not store its value (it
    /// read the data before the change). True when there was a value.
    pub async fn invalidate(&self, key: &str) -> Result<bool> {
        let inner = &*self.inner;
        keys::check_key(&inner.key_prefix, key, inner.max_key_len)?;
        let keys = Keys::new(&inner.key_prefix, key);
        // Fence first: a load already running must not store what it read before.
        inner.value_store.delete(&keys.fence).await?;
        inner.value_store.delete(&keys.value).await
    }

    /// Checks that the value server and every lock master answer, and returns
    /// the first failure (which names its server). The cache connects lazily, so
    /// a wrong URL or password otherwise shows up only on the first call: call
    /// this at startup to fail fast.
    pub async fn ping(&self) -> Result<()> {
        let (value, lock) = tokio::join!(self.inner.value_store.ping(), self.inner.lock.ping());
        value.and(lock)
    }

    /// The distributed lock the cache uses, for locking of your own. Lock names
    /// are used as Redis keys as given (the cache's key prefix is not added).
    pub fn lock(&self) -> &Redlock {
        &self.inner.lock
    }

    /// Per-key entries the cache and its lock keep in memory right now
    /// (in-process flights, lock lines, registered waiters). Zero once every
    /// call has ended, however it ended. For tests and diagnostics.
    #[doc(hidden)]
    pub fn retained_entries(&self) -> usize {
        self.inner.flights.len() + self.inner.lock.retained_entries()
    }

    /// Counters of hits, loads, wake-ups, lost locks, corrupt values...
    pub fn stats(&self) -> StatsSnapshot {
        self.inner.stats.snapshot()
    }

    /// The Redis key (prefix included) the value of `key` is stored under.
    pub fn value_key(&self, key: &str) -> String {
        Keys::new(&self.inner.key_prefix, key).value
    }

    /// The lock key of `key`.
    pub fn lock_key(&self, key: &str) -> String {
        Keys::new(&self.inner.key_prefix, key).lock
    }
}

impl<C: Codec> Inner<C> {
    /// Reads and decodes the value at `value_key`. A value that does not decode,
    /// or a key of another Redis type, is a miss (reported and counted).
    async fn read<T: DeserializeOwned>(&self, value_key: &str) -> Result<Option<(T, Bytes)>> {
        match self.value_store.get(value_key).await {
            Ok(Some(bytes)) => Ok(self.decode_or_report(value_key, bytes, true)),
            Ok(None) => Ok(None),
            Err(Error::Redis { source: e, .. }) if e.code() == Some("WRONGTYPE") => {
                self.report_corrupt(value_key, &e);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Decodes a stored value; an undecodable one is `None`, and reported when
    /// `report` (the re-check under the lock does not report the bytes the first
    /// read already did).
    fn decode_or_report<T: DeserializeOwned>(
        &self,
        value_key: &str,
        bytes: Vec<u8>,
        report: bool,
    ) -> Option<(T, Bytes)> {
        let report_corrupt = |error: &dyn fmt::Display| {
            if report {
                self.report_corrupt(value_key, error);
            }
        };
        if bytes.len() > self.max_value_size {
            let error = format!(
                "{} bytes, over the maximum value size of {}",
                bytes.len(),
                self.max_value_size
            );
            report_corrupt(&error);
            return None;
        }
        match codec::decode(&self.codec, &bytes) {
            Ok(value) => Some((value, Arc::new(bytes))),
            Err(e) => {
                report_corrupt(&e);
                None
            }
        }
    }

    fn report_corrupt(&self, value_key: &str, error: &dyn fmt::Display) {
        Stats::add(&self.stats.corrupt_values);
        tracing::warn!(key = value_key, %error, "undecodable value treated as a miss; it will be reloaded and overwritten");
    }

    fn encode<T: Serialize>(&self, key: &str, value: &T) -> Result<Vec<u8>> {
        let bytes = codec::encode(&self.codec, value)?;
        if bytes.len() > self.max_value_size {
            return Err(Error::ValueTooLarge {
                key: key.to_owned(),
                size: bytes.len(),
                max: self.max_value_size,
            });
        }
        Ok(bytes)
    }

    /// The leader's path: read; on a miss lock, re-read, load, store, release.
    /// Returns the value and its stored bytes (for the followers).
    async fn lead<T, E, F, Fut>(
        &self,
        key: &str,
        loader: F,
        started: Instant,
        deadline: Instant,
    ) -> Result<Led<T>, LoadError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(LoadContext) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let value_key = keys::value_key(&self.key_prefix, key);
        if let Some(found) = self.read(&value_key).await? {
            Stats::add(&self.stats.hits);
            return Ok(Led::unlocked(found.0, found.1));
        }
        Stats::add(&self.stats.misses);
        let keys = Keys::with_value_key(value_key);
        let guard = match self.wait_for_lock(&keys, started, deadline).await? {
            Locked::Guard(guard) => guard,
            Locked::ValueAppeared(found) => {
                Stats::add(&self.stats.hits);
                return Ok(Led::unlocked(found.0, found.1));
            }
            Locked::QuorumLost => return self.load_unlocked(key, &keys, loader).await,
        };
        self.load_locked(key, &keys, guard, loader).await
    }

    /// Stores a loaded value through the fence and accounts for the outcome. A
    /// refused or failed write is logged and counted, never returned: the
    /// callers get the value they loaded either way.
    async fn store_fenced(&self, keys: &Keys, bytes: &[u8], token: &[u8], lock_lost: bool) {
        // Waiters listen on the lock masters. When the value server is one of
        // them, the store script publishes the wake-up; otherwise it is
        // published on the masters once the value is stored.
        let wake_up = self.wake_up(keys);
        let (in_script, afterwards) = match wake_up {
            Some(_) if self.separate_value_server => (None, true),
            other => (other, false),
        };
        let stored = self
            .value_store
            .set_fenced(&keys.value, bytes, self.ttl, &keys.fence, token, in_script)
            .await;
        if afterwards && matches!(stored, Ok(true)) {
            self.lock.publish_wake_up(&keys.lock);
        }
        match stored {
            Ok(true) if !lock_lost => {}
            Ok(true) => {
                // Extension was refused but nobody took over: the write was still
                // the newest. Count the loss all the same.
                Stats::add(&self.stats.lock_lost);
            }
            Ok(false) => {
                Stats::add(&self.stats.writes_refused);
                if lock_lost {
                    Stats::add(&self.stats.lock_lost);
                }
                tracing::warn!(
                    key = keys.value,
                    "the fence was taken during the load (a newer holder, or set/invalidate): value returned, not stored"
                );
            }
            Err(e) => {
                Stats::add(&self.stats.store_errors);
                tracing::warn!(key = keys.value, error = %e, "storing the loaded value failed; returning it uncached");
            }
        }
    }

    /// The wake-up the fenced store publishes: waiters of the key's lock learn of
    /// the value the moment it is stored, a round trip before the release.
    fn wake_up<'k>(&'k self, keys: &'k Keys) -> Option<Publish<'k>> {
        let options = self.lock.options();
        options.wake_ups.then_some(Publish {
            channel: &options.channel,
            payload: &keys.lock,
        })
    }

    /// Waits for the lock, re-reading the value after every wake-up or retry.
    async fn wait_for_lock<T: DeserializeOwned>(
        &self,
        keys: &Keys,
        started: Instant,
        deadline: Instant,
    ) -> Result<Locked<T>> {
        let options = self.lock.options();
        // Registered before the first attempt: a release after it wakes us.
        let waiter = self.lock.waiter(&keys.lock);
        let mut splits = Splits::default();
        loop {
            let outcome = self.lock.attempt(&keys.lock, options.expiry).await?;
            if let Attempt::Acquired(guard) = outcome {
                return Ok(Locked::Guard(guard));
            }
            if matches!(outcome, Attempt::NoQuorum { .. })
                && self.quorum_loss == QuorumLossPolicy::FailOpen
            {
                return Ok(Locked::QuorumLost);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(self.lock.wait_error(&keys.lock, &outcome, now - started));
            }
            splits.after(&outcome);
            waiter
                .wait(self.lock.retry_delay(&outcome, splits).min(deadline - now))
                .await;
            if let Some(found) = self.read(&keys.value).await? {
                return Ok(Locked::ValueAppeared(found));
            }
        }
    }

    /// Holding the lock: the double check, then the load and the fenced store.
    async fn load_locked<T, E, F, Fut>(
        &self,
        key: &str,
        keys: &Keys,
        guard: LockGuard,
        loader: F,
    ) -> Result<Led<T>, LoadError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(LoadContext) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let expiry = self.lock.options().expiry;
        // The fence outlives the lock a little, so that a slow but live holder's
        // write is judged by whether someone *else* took the fence, not by timing.
        let fence_expiry = expiry * 2;
        let found = self
            .value_store
            .get_or_fence(&keys.value, &keys.fence, guard.token(), fence_expiry)
            .await;
        // The fence is taken either way (a corrupt value is reloaded under it);
        // a key of another Redis type reads as missing here.
        match found {
            Ok(Some(bytes)) => {
                if let Some(found) = self.decode_or_report(&keys.value, bytes, false) {
                    Stats::add(&self.stats.hits);
                    release(guard).await;
                    return Ok(Led::unlocked(found.0, found.1));
                }
            }
            Ok(None) => {}
            Err(e) => {
                release(guard).await;
                return Err(e.into());
            }
        }

        let keepalive = KeepAlive::start(
            &guard,
            Arc::clone(&self.value_store),
            keys.fence.clone(),
            expiry,
            fence_expiry,
        );
        Stats::add(&self.stats.loads);
        let loaded = run_loader(
            &self.stats,
            loader(LoadContext::new(Some(keepalive.lost_signal()))),
        )
        .await;
        let lost_during_load = keepalive.stop().await;

        let value = match loaded {
            Ok(value) => value,
            Err(e) => {
                Stats::add(&self.stats.load_errors);
                release(guard).await;
                return Err(LoadError::Loader(Arc::new(e)));
            }
        };
        let bytes = match self.encode(key, &value) {
            Ok(bytes) => bytes,
            Err(e) => {
                release(guard).await;
                return Err(e.into());
            }
        };
        self.store_fenced(keys, &bytes, guard.token(), lost_during_load)
            .await;
        // Released by the caller, after the flight's followers have the value.
        Ok(Led {
            value,
            bytes: bytes.into(),
            unlock: Some(guard),
        })
    }

    /// Fail-open path: the quorum is lost, load without the lock.
    async fn load_unlocked<T, E, F, Fut>(
        &self,
        key: &str,
        keys: &Keys,
        loader: F,
    ) -> Result<Led<T>, LoadError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(LoadContext) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        // Take the fence *before* loading (and look once more for a value): a
        // `set`/`invalidate`, or a holder that gets the lock when the masters
        // come back, takes the fence after us, and then our stale write is
        // refused. Without the value server nothing can be stored anyway.
        let fence_expiry = self.lock.options().expiry * 2;
        let token = Token::new().map_err(|e| {
            Error::InvalidConfig(format!("the OS random number generator failed: {e}"))
        })?;
        let fenced = match self
            .value_store
            .get_or_fence(&keys.value, &keys.fence, token.as_bytes(), fence_expiry)
            .await
        {
            Ok(Some(bytes)) => {
                if let Some(found) = self.decode_or_report(&keys.value, bytes, false) {
                    Stats::add(&self.stats.hits);
                    return Ok(Led::unlocked(found.0, found.1));
                }
                true
            }
            Ok(None) => true,
            Err(e) => {
                tracing::warn!(key = keys.value, error = %e, "the value server failed too; the loaded value will not be cached");
                false
            }
        };
        Stats::add(&self.stats.fail_open_loads);
        Stats::add(&self.stats.loads);
        tracing::warn!(
            key = keys.value,
            "lock quorum lost: loading without the lock (fail-open)"
        );
        let value = match run_loader(&self.stats, loader(LoadContext::new(None))).await {
            Ok(value) => value,
            Err(e) => {
                Stats::add(&self.stats.load_errors);
                return Err(LoadError::Loader(Arc::new(e)));
            }
        };
        let bytes = self.encode(key, &value)?;
        if fenced {
            self.store_fenced(keys, &bytes, token.as_bytes(), false)
                .await;
        } else {
            Stats::add(&self.stats.store_errors);
        }
        Ok(Led::unlocked(value, bytes.into()))
    }
}

/// What a leader got: the value, its stored bytes (for the followers), and the
/// lock to release once the followers have them.
struct Led<T> {
    value: T,
    bytes: Bytes,
    unlock: Option<LockGuard>,
}

impl<T> Led<T> {
    fn unlocked(value: T, bytes: Bytes) -> Led<T> {
        Led {
            value,
            bytes,
            unlock: None,
        }
    }

    /// Releases the lock, if held, and hands over the value.
    async fn finish(self) -> T {
        if let Some(guard) = self.unlock {
            release(guard).await;
        }
        self.value
    }
}

/// Awaits the loader's future, counting a panic as a failed load before letting
/// it continue to the caller (the panic hook has already run; it is not run again).
async fn run_loader<Fut: Future>(stats: &Stats, load: Fut) -> Fut::Output {
    match AssertUnwindSafe(load).catch_unwind().await {
        Ok(output) => output,
        Err(panic) => {
            Stats::add(&stats.load_errors);
            std::panic::resume_unwind(panic)
        }
    }
}

/// How a wait for the lock ended.
enum Locked<T> {
    Guard(LockGuard),
    ValueAppeared((T, Bytes)),
    QuorumLost,
}

/// Releases the lock, logging (not returning) a failure: the lock then expires
/// on its own, and the caller's value or error matters more.
async fn release(guard: LockGuard) {
    let resource = guard.resource().to_owned();
    match guard.release().await {
        Ok(true) => {}
        Ok(false) => tracing::debug!(resource, "lock was no longer held at release"),
        Err(e) => tracing::warn!(resource, error = %e, "releasing the lock failed; it will expire"),
    }
}
