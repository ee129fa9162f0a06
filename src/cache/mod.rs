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
mod bytes;
mod call;
mod flight;
mod freshness;
mod in_place;
mod keepalive;
mod keys;
mod load;
#[cfg(feature = "near-cache")]
mod local;
mod many;
mod many_call;
mod many_load;
mod options;
mod refresh;
mod shared;
mod tags;
mod with;

pub use builder::{Builder, QuorumLossPolicy};
pub use keepalive::LoadContext;
pub use options::CallOptions;
pub use with::With;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::{self, BincodeCodec, Codec, Meta};
use crate::error::{Error, LoadError, Result};
use crate::lock::Redlock;
use crate::stats::{Stats, StatsSnapshot};
use crate::store::{SharedStore, Stored};
use crate::telemetry::{Outcome, Telemetry};
use flight::Flights;
use freshness::Freshness;
use keepalive::EntrySettings;
use keys::{Keys, ValueKey};
use load::Inline;
use options::Resolved;
use refresh::Refreshing;

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
            .field("call_options", &inner.call_options)
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
    /// The near cache, when turned on (see `local.rs`).
    #[cfg(feature = "near-cache")]
    near: Option<local::Near>,
    value_store: SharedStore,
    lock: Redlock,
    /// The tag versions and generation this process knows, when tags are on
    /// (`tags.rs`).
    tags: Option<Arc<tags::Known>>,
    /// How long tag versions, and tagged entries, live.
    tag_ttl: Duration,
    ttl: Duration,
    /// The options calls start from (the builder's `call_options`).
    call_options: CallOptions,
    /// `call_options` resolved: what a plain `get_or_load` call uses.
    defaults: Resolved,
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
    /// Keys this process is refreshing (`refresh.rs`).
    refreshing: Arc<Refreshing>,
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
    /// never overwrites a newer value. Inside the loader,
    /// [`LoadContext::current`] observes the loss (and gives the fencing token).
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
        T: Serialize + DeserializeOwned + Send + 'static,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let (value, _) = self.get_or_load_with_outcome(key, |_| loader()).await?;
        Ok(value)
    }

    /// As [`get_or_load`](Self::get_or_load), for a loader that cannot fail:
    /// it returns the value itself (no `Ok::<_, E>` to spell), and the only
    /// error is the cache's own [`Error`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), locked_cache::Error> {
    /// use locked_cache::LockedCache;
    ///
    /// let cache = LockedCache::builder().build().await?;
    /// let squares: Vec<u64> = cache
    ///     .get_or_compute("squares", || async { (1..=4).map(|n| n * n).collect() })
    ///     .await?;
    /// assert_eq!(squares, [1, 4, 9, 16]);
    /// # Ok(()) }
    /// ```
    pub async fn get_or_compute<T, F, Fut>(&self, key: &str, compute: F) -> Result<T>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let loaded = self
            .get_or_load_with_outcome(key, |_| async move {
                Ok::<_, std::convert::Infallible>(compute().await)
            })
            .await;
        loaded.map(|(value, _)| value).map_err(infallible)
    }

    /// As [`get_or_load`](Self::get_or_load), handing the loader its
    /// [`LoadContext`] (also at hand as [`LoadContext::current`]) and telling
    /// how the call was served: a [`Outcome::Hit`], [`Outcome::Coalesced`] with another
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
        T: Serialize + DeserializeOwned + Send + 'static,
        E: Send + Sync + 'static,
        F: FnOnce(LoadContext) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.inner
            .traced_call(key, Inline(loader), &self.inner.defaults, None)
            .await
    }

    /// Calls with their own [`CallOptions`] (TTL, stale window, early refresh,
    /// negative TTL, jitter, timeouts, detached loads): the ones set in
    /// `options` override the cache's. The loader must be `Send + 'static` (move
    /// what it needs into it), so that refreshes can run in the background and
    /// loads can outlive a caller that went away.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use locked_cache::{CallOptions, LockedCache};
    ///
    /// const PROFILES: CallOptions = CallOptions::new()
    ///     .ttl(Duration::from_secs(30))
    ///     .stale_for(Duration::from_secs(600))
    ///     .negative_ttl(Duration::from_secs(5));
    ///
    /// let cache = LockedCache::builder().build().await?;
    /// let id = 42;
    /// let name: Option<String> = cache
    ///     .with(PROFILES)
    ///     .get_or_load("profile:42", move || async move {
    ///         Ok::<_, std::io::Error>((id == 42).then(|| "Ada".to_owned()))
    ///     })
    ///     .await?;
    /// assert_eq!(name.as_deref(), Some("Ada"));
    /// # Ok(()) }
    /// ```
    pub fn with(&self, options: CallOptions) -> With<'_, C> {
        With::new(self, options)
    }

    /// The value under `key`, if there is one that decodes and is fresh, or
    /// stale inside the cache's stale window. One round trip (two when the
    /// value was stored with a stale window and the cache has none: its time
    /// left is read to judge it); no lock. An undecodable value counts as
    /// absent (and as corrupt in the stats).
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        let inner = &*self.inner;
        keys::check_key(&inner.key_prefix, key, inner.max_key_len)?;
        let options = &inner.defaults;
        let found = inner
            .read(ValueKey::new(&inner.key_prefix, key), options.reads_ttl())
            .await?
            .filter(|found| found.usable(options));
        Stats::add(if found.is_some() {
            &inner.stats.hits
        } else {
            &inner.stats.misses
        });
        Ok(found.map(|found| found.value))
    }

    /// Stores `value` under `key` with the cache's TTL (and stale window),
    /// unconditionally (no lock):
    /// for writers that know the fresh value, such as after an update. A load of
    /// `key` already running when this is called will not overwrite it (its write
    /// is fenced out); its callers still get the value it loaded.
    pub async fn set<T: Serialize>(&self, key: &str, value: &T) -> Result<()> {
        self.set_with_ttl(key, value, self.inner.defaults.ttl).await
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
        inner.set_with(key, value, ttl, &inner.defaults).await
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
        let removed = inner.value_store.delete(&keys.value).await?;
        inner.changed(&keys.value).await;
        Ok(removed)
    }

    /// Makes every entry tagged `tag` ([`CallOptions::tag`]) a miss in every
    /// process: one `SET` of the tag's version and one `PUBLISH`, whatever the
    /// number of entries (no `SCAN`, no `KEYS`). The entries themselves stay
    /// until their TTL; the next call for each reloads and overwrites it.
    /// Processes with the near cache on and subscribed see it at once; others
    /// within [`tag_refresh`](crate::Builder::tag_refresh) (1 s by default). A
    /// stale window does not serve an invalidated entry: it is a miss, as if
    /// gone. A load running when this is called stores a value that is
    /// already a miss (its load began under the old version).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] without [`Builder::tags`](crate::Builder::tags);
    /// the value server's errors when the version cannot be written (then
    /// nothing was invalidated: retry).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use locked_cache::{CallOptions, LockedCache};
    ///
    /// let cache = LockedCache::builder().tags(true).build().await?;
    /// let user_7 = cache.with(CallOptions::new().tag("user:7"));
    /// let name: String = user_7.get_or_compute("name:7", || async { "Ada".to_owned() }).await?;
    /// cache.invalidate_tag("user:7").await?;
    /// let (_, outcome) = user_7
    ///     .get_or_load_with_outcome("name:7", |_| async { Ok::<_, String>("Grace".to_owned()) })
    ///     .await?;
    /// assert_eq!(outcome, locked_cache::Outcome::Loaded);
    /// # let _ = name; Ok(()) }
    /// ```
    pub async fn invalidate_tag(&self, tag: &str) -> Result<()> {
        self.inner.invalidate_version(Some(tags::tag_id(tag))).await
    }

    /// Makes every entry of this cache (its key prefix) a miss in every
    /// process, as [`invalidate_tag`](Self::invalidate_tag) does for a tag:
    /// one `SET` of the cache's generation and one `PUBLISH`; old entries
    /// expire by their TTL. Needs [`Builder::tags`](crate::Builder::tags).
    pub async fn clear(&self) -> Result<()> {
        self.inner.invalidate_version(None).await
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
        self.inner.flights.len() + self.inner.refreshing.len() + self.inner.lock.retained_entries()
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

    /// As [`get_or_load`](Self::get_or_load), with a [`LoadContext`] handed to the
    /// loader: it tells whether the lock protecting the load was lost, so a long
    /// load can stop early when another process has taken over.
    #[deprecated(
        since = "0.1.0",
        note = "use `get_or_load` and `LoadContext::current()` inside the loader, or `get_or_load_with_outcome`"
    )]
    pub async fn get_or_load_with<T, E, F, Fut>(
        &self,
        key: &str,
        loader: F,
    ) -> Result<T, LoadError<E>>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        E: Send + Sync + 'static,
        F: FnOnce(LoadContext) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let (value, _) = self.get_or_load_with_outcome(key, loader).await?;
        Ok(value)
    }
}

impl<C: Codec> Inner<C> {
    /// The error of a call whose hard timeout passed with no value at hand.
    fn hard_timeout_error<E>(&self, key: &str, timeout: Duration) -> LoadError<E> {
        LoadError::Cache(Error::LoadTimeout {
            key: key.to_owned(),
            timeout,
        })
    }

    /// Reads and decodes the value at `value_key`, with its time left when
    /// `with_ttl` (or when the value turns out to have a stale window, whose
    /// freshness needs it: a second round trip, only where calls with and
    /// without a stale window share keys). A value that does not decode, or a
    /// key of another Redis type, is a miss (reported and counted).
    async fn read<T: DeserializeOwned>(
        &self,
        value_key: ValueKey<'_>,
        with_ttl: bool,
    ) -> Result<Option<Found<T>>> {
        let stored = self.read_stored(value_key, with_ttl).await?;
        let stored = match &self.tags {
            None => stored,
            Some(_) => Box::pin(self.screen(stored)).await?,
        };
        Ok(stored.and_then(|stored| self.decode_or_report(&value_key, stored, true)))
    }

    /// The bytes behind [`read`](Self::read), not yet decoded: `GET`, or
    /// `GET` and `PTTL`; a key of another Redis type is reported and reads as
    /// missing. (One function rather than a read step calling a fetch step: a
    /// hit's future holds every step's arguments, and moves each step's.)
    async fn read_stored(&self, value_key: ValueKey<'_>, with_ttl: bool) -> Result<Option<Stored>> {
        let untimed = |bytes: Option<Vec<u8>>| bytes.map(|bytes| Stored { bytes, ttl: None });
        let mut with_ttl = with_ttl;
        loop {
            // The built-in Redis store is called directly: a trait call would
            // box its future, an allocation on every hit; and the key is
            // written straight into the command. `GET` + `PTTL` (a value with
            // a stale window) is boxed, so that its larger future does not
            // make every plain `GET` move a larger one (90 instructions a hit).
            let read = match (self.value_store.as_redis(), with_ttl) {
                (Some(redis), true) => Box::pin(redis.read_with_ttl(value_key)).await,
                (Some(redis), false) => redis.read(value_key).await.map(untimed),
                (None, true) => self.value_store.get_with_ttl(&value_key.build()).await,
                (None, false) => self.value_store.get(&value_key.build()).await.map(untimed),
            };
            let stored = match read {
                Err(Error::Redis { source: e, .. }) if e.code() == Some("WRONGTYPE") => {
                    self.report_corrupt(&value_key, &e);
                    return Ok(None);
                }
                read => read?,
            };
            // The header says whether the value has a stale window: read its
            // time left before decoding, so the value is decoded once.
            let has_window = |stored: &Stored| codec::has_stale_window(C::ID, &stored.bytes);
            if !with_ttl && stored.as_ref().is_some_and(has_window) {
                with_ttl = true;
                continue;
            }
            return Ok(stored);
        }
    }

    /// Decodes a stored value; an undecodable one is `None`, and reported when
    /// `report` (the re-check under the lock does not report the bytes the first
    /// read already did).
    fn decode_or_report<T: DeserializeOwned>(
        &self,
        value_key: &dyn fmt::Display,
        stored: Stored,
        report: bool,
    ) -> Option<Found<T>> {
        let report_corrupt = |error: &dyn fmt::Display| {
            if report {
                self.report_corrupt(value_key, error);
            }
        };
        let Stored { bytes, ttl } = stored;
        if bytes.len() > self.max_value_size {
            let error = format!(
                "{} bytes, over the maximum value size of {}",
                bytes.len(),
                self.max_value_size
            );
            report_corrupt(&error);
            return None;
        }
        match codec::decode_with_meta(&self.codec, &bytes) {
            Ok((value, meta)) => Some(Found {
                stored_len: bytes.len(),
                value,
                bytes,
                meta,
                ttl_left: ttl,
            }),
            Err(e) => {
                report_corrupt(&e);
                None
            }
        }
    }

    fn report_corrupt(&self, value_key: &dyn fmt::Display, error: &dyn fmt::Display) {
        Stats::add(&self.stats.corrupt_values);
        tracing::warn!(key = %value_key, %error, "undecodable value treated as a miss; it will be reloaded and overwritten");
    }

    /// Stores `value` under `key` for `ttl` (plus the stale window of
    /// `options`, with its tags), unconditionally.
    async fn set_with<T: Serialize>(
        &self,
        key: &str,
        value: &T,
        ttl: Duration,
        options: &Resolved,
    ) -> Result<()> {
        let meta = Meta {
            stale_for: options.stale_for,
            load_time: Duration::ZERO,
            absent: codec::is_absent(value),
        };
        let marks = self.marks_for(&options.tags).await?;
        let bytes = self.encode(key, value, &meta, marks.as_ref())?;
        let keys = Keys::new(&self.key_prefix, key);
        // Fence first: a load already running must not overwrite this value with
        // what it read before the change.
        self.value_store.delete(&keys.fence).await?;
        let key_ttl = self.key_ttl(ttl + meta.stale_for, marks.as_ref());
        self.value_store.set(&keys.value, &bytes, key_ttl).await?;
        self.changed(&keys.value).await;
        Ok(())
    }

    /// The Redis TTL of a value that lives `ttl`: at most 10 years, and at
    /// most the tag TTL for a marked one (which must not outlive the versions
    /// it is judged by).
    fn key_ttl(&self, ttl: Duration, marks: Option<&codec::Marks>) -> Duration {
        let ttl = ttl.min(builder::MAX_TTL);
        match marks {
            Some(_) => ttl.min(self.tag_ttl),
            None => ttl,
        }
    }

    fn encode<T: Serialize>(
        &self,
        key: &str,
        value: &T,
        meta: &Meta,
        marks: Option<&codec::Marks>,
    ) -> Result<Vec<u8>> {
        let bytes = codec::encode_marked(&self.codec, value, meta, marks)?;
        if bytes.len() > self.max_value_size {
            return Err(Error::ValueTooLarge {
                key: key.to_owned(),
                size: bytes.len(),
                max: self.max_value_size,
            });
        }
        Ok(bytes)
    }

    /// Encodes a loaded value: its bytes (for the store and the followers), and
    /// its key's TTL, or `None` when it is not to be stored (a "not found" with
    /// a zero negative TTL, or the loader said so), with what the loader said
    /// about its entry applied.
    fn encode_loaded<T: Serialize>(
        &self,
        key: &str,
        value: &T,
        load_time: Duration,
        options: &Resolved,
        entry: EntrySettings,
        marks: Option<&codec::Marks>,
    ) -> Result<(Option<Duration>, Vec<u8>)> {
        let absent = codec::is_absent(value);
        let options = &freshness::adapt(options, entry);
        let (ttl, meta) = freshness::storage(options, absent, load_time, fastrand::f64());
        let ttl = ttl.filter(|_| !entry.skip_store);
        let ttl = ttl.map(|ttl| self.key_ttl(ttl, marks));
        Ok((ttl, self.encode(key, value, &meta, marks)?))
    }
}

/// The error of a call whose loader cannot fail: the cache's.
fn infallible(error: LoadError<std::convert::Infallible>) -> Error {
    match error {
        LoadError::Cache(e) => e,
        LoadError::Loader(never) => match *never {},
    }
}

/// A decoded value as read, with what its freshness is judged by.
struct Found<T> {
    value: T,
    /// As stored (header + payload): for the flight's followers, if any.
    /// Empty when the value was decoded in place (`in_place.rs`).
    bytes: Vec<u8>,
    /// How many bytes were stored (the near cache's weight of the value).
    #[cfg_attr(not(feature = "near-cache"), allow(dead_code))]
    stored_len: usize,
    meta: Meta,
    /// The key's remaining time to live; `None` when it has no expiry or it
    /// was not read.
    ttl_left: Option<Duration>,
}

impl<T> Found<T> {
    /// Whether a call with `options` may return it without loading: fresh, or
    /// stale within the call's stale window.
    fn usable(&self, options: &Resolved) -> bool {
        // The draw only matters for early refresh, which still counts as usable.
        freshness::judge(&self.meta, self.ttl_left, options, 0.0) != Freshness::TooStale
    }
}

/// The value a refresh replaces, to tell whether someone else replaced it first.
#[derive(Debug, Clone)]
struct Replacing {
    bytes: Vec<u8>,
    ttl_left: Option<Duration>,
}

impl Replacing {
    fn of<T>(found: &Found<T>) -> Replacing {
        Replacing {
            bytes: found.bytes.clone(),
            ttl_left: found.ttl_left,
        }
    }

    /// True when `found` (read under the lock) is another value than the one
    /// being replaced, or the same bytes stored again (more time left): someone
    /// refreshed it since.
    fn superseded_by<T>(&self, found: &Found<T>) -> bool {
        found.bytes != self.bytes || found.ttl_left > self.ttl_left
    }
}
