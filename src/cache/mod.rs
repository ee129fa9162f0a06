//! [`LockedCache`]: `get_or_load` with double-checked locking over Redlock.
//!
//! The data path of a call, top to bottom:
//!
//! 1. [`LockedCache::get_or_load_with_outcome`] (which the other `get_or_load`
//!    methods call) opens the call's span (`telemetry.rs`) and joins the key's
//!    in-process flight (`flight.rs`); followers wait for the leader's outcome.
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
//! 5. The leader hands the value to the flight's followers, then releases the
//!    lock (which publishes again); the call's outcome is recorded on its span
//!    and in the metrics.

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
use tracing::Instrument;
use tracing::field::Empty;

use crate::codec::{self, BincodeCodec, Codec};
use crate::error::{Error, LoadError, Result};
use crate::lock::{Attempt, LockGuard, Redlock, Splits, Token};
use crate::stats::{Stats, StatsSnapshot};
use crate::store::{Publish, SharedStore};
use crate::telemetry::{CallTrace, KeyHash, Outcome, Telemetry, key_hash, millis};
use flight::{Bytes, Flights, Role};
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

/// The configuration, as built (servers with passwords redacted); not the
/// pools, flights or counters.
impl<C> fmt::Debug for LockedCache<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &*self.inner;
        let lock = inner.lock.options();
        f.debug_struct("LockedCache")
            .field("name", &inner.telemetry.name)
            .field("masters", &inner.config.masters)
            .field("value_server", &inner.value_store.server())
            .field("ttl", &inner.ttl)
            .field("lock_expiry", &lock.expiry)
            .field("wait_time", &lock.wait)
            .field("retry_time", &lock.retry)
            .field("master_timeout", &lock.master_timeout)
            .field("wake_ups", &lock.wake_ups)
            .field("release_channel", &lock.channel)
            .field("coalesce", &inner.coalesce)
            .field("quorum_loss", &inner.quorum_loss)
            .field("key_prefix", &inner.key_prefix)
            .field("pool_size", &inner.config.pool_size)
            .field("connect_timeout", &inner.config.connect_timeout)
            .field("command_timeout", &inner.command_timeout)
            .field("max_value_size", &inner.max_value_size)
            .field("max_key_len", &inner.max_key_len)
            .field("codec", &std::any::type_name::<C>())
            .finish()
    }
}

/// Settings kept only to be shown by `Debug`.
struct DebugConfig {
    masters: Vec<String>,
    pool_size: u32,
    connect_timeout: Duration,
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
    telemetry: Telemetry,
    config: DebugConfig,
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
        let (value, _) = self.get_or_load_with_outcome(key, |_| loader()).await?;
        Ok(value)
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
        let (value, _) = self.get_or_load_with_outcome(key, loader).await?;
        Ok(value)
    }

    /// As [`get_or_load_with`](Self::get_or_load_with), also telling how the
    /// call was served: a [`Outcome::Hit`], [`Outcome::Coalesced`] with another
    /// call of this process, [`Outcome::Waited`] for another process's load, or
    /// [`Outcome::Loaded`] by this call's loader. The other `get_or_load` methods
    /// are this one without the outcome; failures are told by the
    /// [`LoadError`].
    ///
    /// Every call also runs in a `get_or_load` span and, with the `metrics`
    /// feature, counts in `locked_cache_calls_total` under the same outcome
    /// names (see the [telemetry](crate#telemetry) section).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use locked_cache::{LockedCache, Outcome};
    ///
    /// let cache = LockedCache::builder().build().await?;
    /// let load = |_| async { Ok::<_, std::io::Error>(42_u32) };
    /// let (_, first) = cache.get_or_load_with_outcome("k", load).await?;
    /// let (_, second) = cache.get_or_load_with_outcome("k", load).await?;
    /// assert_eq!((first, second), (Outcome::Loaded, Outcome::Hit));
    /// // e.g. an `X-Cache` header:
    /// let header = if second.is_cached() { "HIT" } else { "MISS" };
    /// assert_eq!(header, "HIT");
    /// # Ok(()) }
    /// ```
    pub async fn get_or_load_with_outcome<T, E, F, Fut>(
        &self,
        key: &str,
        loader: F,
    ) -> Result<(T, Outcome), LoadError<E>>
    where
        T: Serialize + DeserializeOwned,
        E: Send + Sync + 'static,
        F: FnOnce(LoadContext) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let inner = &*self.inner;
        let span = inner.telemetry.call_span(&inner.key_prefix, key);
        // One deadline per call, for waiting on someone else's load: in this
        // process (as a follower) or in another (for the lock).
        let started = Instant::now();
        let mut trace = CallTrace::default();
        let result = inner
            .call(key, loader, started, &mut trace)
            .instrument(span.clone())
            .await;
        inner.telemetry.call_ended(&span, &trace, started, &result);
        result
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
    /// One `get_or_load` call: join the key's flight and wait for its leader,
    /// or lead it.
    async fn call<T, E, F, Fut>(
        &self,
        key: &str,
        loader: F,
        started: Instant,
        trace: &mut CallTrace,
    ) -> Result<(T, Outcome), LoadError<E>>
    where
        T: Serialize + DeserializeOwned,
        E: Send + Sync + 'static,
        F: FnOnce(LoadContext) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        keys::check_key(&self.key_prefix, key, self.max_key_len)?;
        let deadline = started + self.lock.options().wait;
        if !self.coalesce {
            let led = self.lead(key, loader, started, deadline, trace).await?;
            let outcome = led.outcome;
            return Ok((led.finish().await, outcome));
        }
        let mut counted = false;
        let leader = loop {
            let rx = match self.flights.join(key) {
                Role::Leader(leader) => break leader,
                Role::Follower(rx) => rx,
            };
            if !std::mem::replace(&mut counted, true) {
                Stats::add(&self.stats.coalesced);
            }
            // The leader gives up on the lock at the same deadline, after at most
            // one more read and one more attempt: leave it that long to hand over
            // its own outcome.
            let give_up = deadline + self.command_timeout * 2;
            let waiting_since = Instant::now();
            let waited = {
                let _waiting = self.telemetry.waiting();
                tokio::time::timeout_at(give_up.into(), flight::outcome(rx)).await
            };
            trace.add_wait(waiting_since.elapsed());
            let Ok(outcome) = waited else {
                Stats::add(&self.stats.lock_timeouts);
                return Err(LoadError::Cache(Error::LockTimeout {
                    resource: Keys::new(&self.key_prefix, key).lock,
                    waited: started.elapsed(),
                }));
            };
            match outcome {
                flight::Outcome::Value(bytes) => {
                    return codec::decode(&self.codec, &bytes)
                        .map(|value| (value, Outcome::Coalesced))
                        .map_err(|e| LoadError::Cache(e.into()));
                }
                flight::Outcome::LoaderError(shared) => match shared.downcast::<E>() {
                    Ok(e) => return Err(LoadError::Loader(e)),
                    // A caller with another error type led: load for ourselves.
                    Err(_) => continue,
                },
                flight::Outcome::Failed(e) => return Err(LoadError::Cache(e)),
                flight::Outcome::Abandoned => continue,
            }
        };
        let result = self.lead(key, loader, started, deadline, trace).await;
        // Followers get the outcome first; then the lock is released.
        leader.finish(match &result {
            Ok(led) => flight::Outcome::Value(Arc::clone(&led.bytes)),
            Err(LoadError::Loader(e)) => {
                flight::Outcome::LoaderError(Arc::clone(e) as Arc<dyn Any + Send + Sync>)
            }
            Err(LoadError::Cache(e)) => flight::Outcome::Failed(e.clone()),
        });
        let led = result?;
        let outcome = led.outcome;
        Ok((led.finish().await, outcome))
    }

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
        trace: &mut CallTrace,
    ) -> Result<Led<T>, LoadError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(LoadContext) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let value_key = keys::value_key(&self.key_prefix, key);
        if let Some(found) = self.read(&value_key).await? {
            Stats::add(&self.stats.hits);
            return Ok(Led::unlocked(found.0, found.1, Outcome::Hit));
        }
        Stats::add(&self.stats.misses);
        let keys = Keys::with_value_key(value_key);
        let guard = match self
            .lock_phase(key, &keys, started, deadline, trace)
            .await?
        {
            Locked::Guard(guard) => guard,
            Locked::ValueAppeared(found) => {
                Stats::add(&self.stats.found_while_waiting);
                return Ok(Led::unlocked(found.0, found.1, Outcome::Waited));
            }
            Locked::QuorumLost => return self.load_unlocked(key, &keys, loader).await,
        };
        self.load_locked(key, &keys, guard, loader).await
    }

    /// [`wait_for_lock`](Self::wait_for_lock) in a `lock` span, timed.
    async fn lock_phase<T: DeserializeOwned>(
        &self,
        key: &str,
        keys: &Keys,
        started: Instant,
        deadline: Instant,
        trace: &mut CallTrace,
    ) -> Result<Locked<T>> {
        let span = tracing::debug_span!(
            "lock",
            db.system = self.telemetry.db_system,
            db.operation.name = "lock",
            locked_cache.lock_attempts = Empty,
            locked_cache.lock_result = Empty,
        );
        let began = Instant::now();
        let mut wait = LockWait::default();
        let locked = self
            .wait_for_lock(key, keys, started, deadline, &mut wait)
            .instrument(span.clone())
            .await;
        trace.attempts += wait.attempts;
        if let Some(since) = wait.refused_at {
            trace.add_wait(since.elapsed());
        }
        let result = match &locked {
            Ok(Locked::Guard(_)) => {
                self.telemetry.lock_acquired(began.elapsed());
                "acquired"
            }
            Ok(Locked::ValueAppeared(_)) => "value_found",
            Ok(Locked::QuorumLost) => "quorum_lost",
            Err(Error::LockTimeout { .. }) => "timeout",
            Err(_) => "error",
        };
        span.record("locked_cache.lock_attempts", wait.attempts);
        span.record("locked_cache.lock_result", result);
        locked
    }

    /// Stores a loaded value through the fence (in a `store` span) and accounts
    /// for the outcome. A refused or failed write is logged and counted, never
    /// returned: the callers get the value they loaded either way.
    async fn store_fenced(&self, keys: &Keys, bytes: &[u8], token: &[u8], lock_lost: bool) {
        let span = tracing::debug_span!(
            "store",
            db.system = self.telemetry.db_system,
            db.operation.name = "store",
            locked_cache.store_result = Empty,
        );
        let result = self
            .store_fenced_untraced(keys, bytes, token, lock_lost)
            .instrument(span.clone())
            .await;
        span.record("locked_cache.store_result", result);
    }

    async fn store_fenced_untraced(
        &self,
        keys: &Keys,
        bytes: &[u8],
        token: &[u8],
        lock_lost: bool,
    ) -> &'static str {
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
            Ok(true) if !lock_lost => "stored",
            Ok(true) => {
                // Extension was refused but nobody took over: the write was still
                // the newest. Count the loss all the same.
                Stats::add(&self.stats.lock_lost);
                "stored"
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
                "refused"
            }
            Err(e) => {
                Stats::add(&self.stats.store_errors);
                tracing::warn!(key = keys.value, error = %e, "storing the loaded value failed; returning it uncached");
                "failed"
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
    /// While it waits it says at DEBUG what for (once, then at most every
    /// second): a holder that crashed keeps the key blocked until its lock
    /// expires, and the log should show it.
    async fn wait_for_lock<T: DeserializeOwned>(
        &self,
        key: &str,
        keys: &Keys,
        started: Instant,
        deadline: Instant,
        wait: &mut LockWait,
    ) -> Result<Locked<T>> {
        let options = self.lock.options();
        // Registered before the first attempt: a release after it wakes us.
        let waiter = self.lock.waiter(&keys.lock);
        let mut splits = Splits::default();
        let mut waiting = None;
        let mut next_log = started;
        loop {
            let outcome = self.lock.attempt(&keys.lock, options.expiry).await?;
            wait.attempts += 1;
            if let Attempt::Acquired(guard) = outcome {
                return Ok(Locked::Guard(guard));
            }
            if matches!(outcome, Attempt::NoQuorum { .. })
                && self.quorum_loss == QuorumLossPolicy::FailOpen
            {
                return Ok(Locked::QuorumLost);
            }
            let now = Instant::now();
            wait.refused_at.get_or_insert(now);
            waiting.get_or_insert_with(|| self.telemetry.waiting());
            if now >= deadline {
                return Err(self.lock.wait_error(&keys.lock, &outcome, now - started));
            }
            splits.after(&outcome);
            let delay = self.lock.retry_delay(&outcome, splits).min(deadline - now);
            if now >= next_log {
                next_log = now + Duration::from_secs(1);
                self.log_wait(
                    key,
                    &outcome,
                    wait.attempts,
                    now - started,
                    deadline - now,
                    delay,
                );
            }
            waiter.wait(delay).await;
            if let Some(found) = self.read(&keys.value).await? {
                return Ok(Locked::ValueAppeared(found));
            }
        }
    }

    /// Says at DEBUG what a waiting call waits for.
    fn log_wait(
        &self,
        key: &str,
        outcome: &Attempt,
        attempts: u32,
        waited: Duration,
        left: Duration,
        next_try: Duration,
    ) {
        if !tracing::enabled!(tracing::Level::DEBUG) {
            return;
        }
        let key_hash = KeyHash(key_hash(&self.key_prefix, key));
        let options = self.lock.options();
        let (waited_ms, wait_left_ms) = (millis(waited), millis(left));
        let next_try_ms = millis(next_try);
        match outcome {
            Attempt::NoQuorum { reachable } => tracing::debug!(
                locked_cache.key_hash = %key_hash,
                reachable,
                masters = self.lock.masters(),
                attempts,
                waited_ms,
                wait_left_ms,
                next_try_ms,
                "waiting for the lock: too few masters reachable for a majority; retrying until the wait time is spent"
            ),
            Attempt::Held { split: true } => tracing::debug!(
                locked_cache.key_hash = %key_hash,
                attempts,
                waited_ms,
                wait_left_ms,
                next_try_ms,
                "waiting for the lock: the votes split between contenders; retrying soon"
            ),
            _ => tracing::debug!(
                locked_cache.key_hash = %key_hash,
                attempts,
                waited_ms,
                wait_left_ms,
                next_try_ms,
                lock_expiry_ms = millis(options.expiry),
                wake_ups = options.wake_ups,
                "waiting for the lock: another holder is loading this key; woken when it stores the value or releases the lock, or, if it crashed, when its lock expires (at most lock_expiry_ms after its last extension)"
            ),
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
                    Stats::add(&self.stats.found_while_waiting);
                    release(guard).await;
                    return Ok(Led::unlocked(found.0, found.1, Outcome::Waited));
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
        let span = load_span(&self.telemetry);
        let loaded = self
            .run_loader(loader(keepalive.context()))
            .instrument(span.clone())
            .await;
        let lost_during_load = keepalive.stop().await;
        span.record("locked_cache.lock_lost", lost_during_load);
        drop(span); // The load is over: close its span before the store's.

        let value = match loaded {
            Ok(value) => value,
            Err(e) => {
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
            outcome: Outcome::Loaded,
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
                    Stats::add(&self.stats.found_while_waiting);
                    return Ok(Led::unlocked(found.0, found.1, Outcome::Waited));
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
        tracing::warn!(
            key = keys.value,
            "lock quorum lost: loading without the lock (fail-open)"
        );
        let value = match self
            .run_loader(loader(LoadContext::new(None)))
            .instrument(load_span(&self.telemetry))
            .await
        {
            Ok(value) => value,
            Err(e) => return Err(LoadError::Loader(Arc::new(e))),
        };
        let bytes = self.encode(key, &value)?;
        if fenced {
            self.store_fenced(keys, &bytes, token.as_bytes(), false)
                .await;
        } else {
            Stats::add(&self.stats.store_errors);
        }
        Ok(Led {
            value,
            bytes: bytes.into(),
            unlock: None,
            outcome: Outcome::Loaded,
        })
    }

    /// Runs a loader: counts it (and its failure, or panic), times it, and
    /// counts it in flight while it runs. A panic continues to the caller (the
    /// panic hook has already run; it is not run again).
    async fn run_loader<T, E, Fut>(&self, load: Fut) -> Result<T, E>
    where
        Fut: Future<Output = Result<T, E>>,
    {
        Stats::add(&self.stats.loads);
        let _loading = self.telemetry.loading();
        let began = Instant::now();
        let output = match AssertUnwindSafe(load).catch_unwind().await {
            Ok(output) => output,
            Err(panic) => {
                Stats::add(&self.stats.load_errors);
                std::panic::resume_unwind(panic)
            }
        };
        self.telemetry.load_took(began.elapsed());
        if output.is_err() {
            Stats::add(&self.stats.load_errors);
        }
        output
    }
}

/// The span of a loader run.
fn load_span(telemetry: &Telemetry) -> tracing::Span {
    tracing::debug_span!(
        "load",
        db.system = telemetry.db_system,
        db.operation.name = "load",
        locked_cache.lock_lost = Empty,
    )
}

/// What a wait for the lock saw: attempts, and when the first was refused.
#[derive(Default)]
struct LockWait {
    attempts: u32,
    refused_at: Option<Instant>,
}

/// What a leader got: the value, its stored bytes (for the followers), the
/// lock to release once the followers have them, and how it was served.
struct Led<T> {
    value: T,
    bytes: Bytes,
    unlock: Option<LockGuard>,
    outcome: Outcome,
}

impl<T> Led<T> {
    fn unlocked(value: T, bytes: Bytes, outcome: Outcome) -> Led<T> {
        Led {
            value,
            bytes,
            unlock: None,
            outcome,
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
