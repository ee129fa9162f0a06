//! Many keys in one call: [`LockedCache::get_or_load_many`],
//! [`get_many`](LockedCache::get_many) and [`set_many`](LockedCache::set_many)
//! (and their `with(CallOptions)` forms in `with.rs`).
//!
//! The data path of one `get_or_load_many`, top to bottom:
//!
//! 1. The keys are checked (as single keys are) and deduplicated; the near
//!    cache answers what it holds (the `_shared` form).
//! 2. **One read** for the rest: `MGET` on the value server (per slot on a
//!    cluster), a `PTTL` per key pipelined behind it when freshness needs the
//!    time left. Fresh values are hits; stale ones are served and refreshed in
//!    this call's load if their locks are free.
//! 3. Each miss joins its key's in-process flight (`flight.rs`), exactly as a
//!    single `get_or_load` does: keys another call of this process is loading
//!    are followed, the others led.
//! 4. The led keys' locks: **one attempt per master**, a script that takes
//!    every free lock among them and reports the others (`lock/batch.rs`).
//!    For the keys held, one `GET_OR_FENCE_MANY` takes their fences and reads
//!    them again (another process may have stored them meanwhile: those are
//!    not loaded; where the one lock master is also the value server, the
//!    lock script does this too, `CLAIM_LOADS_FENCED`), then the loader runs **once** with the keys still missing
//!    while a keep-alive task renews their locks and fences, then **one**
//!    fenced store (`SET_FENCED_MANY`, which publishes each key's wake-up),
//!    the flights are handed their values, and the locks are released (from
//!    a task: the waiters were already woken by the store).
//! 5. Keys held elsewhere are waited for as single keys are: registered for
//!    their release wake-ups before the attempt, woken by the store's publish
//!    (or the retry time), read again (one `MGET`), and tried again if still
//!    missing: a holder that died is taken over once its lock expires. Each
//!    such takeover is one more loader call, with the keys taken over.
//!
//! # Why two batches cannot deadlock
//!
//! A batch never waits while it holds a lock it took: the lock script takes
//! what is free and answers at once, and the keys it took are loaded, stored
//! and released without waiting for any other key (in this process, the
//! flights it leads are finished the same way, whatever the flights it
//! follows do). So no batch's progress on what it holds depends on a lock
//! someone else holds: the waits-for graph has no edge out of a holder, hence
//! no cycle. (A holder that hangs is bounded by the lock expiry if it dies,
//! and by the wait time for the waiters otherwise, as for single keys.)

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::flight::{self, Leader, Role, Sharing};
use super::freshness::{self, Freshness};
use super::keys::{self, Keys, ValueKey};
use super::options::Resolved;
use super::shared::Shared;
use super::{Found, Inner, LockedCache, Replacing, call, in_place};
use crate::codec::{self, Codec, Meta};
use crate::error::{Error, LoadError, Result};
use crate::lock::{Fenced, KeyVote, LoadLocks, jittered, split_vote_retry};
use crate::stats::Stats;
use crate::store::{FencedWrite, Stored, Write};

/// A value (`None`: not found) with its stored bytes (header + payload),
/// shared with a flight's followers and duplicate positions; `None` for a
/// hit nobody else needs them for (a near cache hit, a key asked once).
type Got<V> = (Option<V>, Option<Arc<Vec<u8>>>);

/// The near cache's answer for a key, as the call's value kind.
type NearLookup<'a, V> = dyn Fn(&str) -> Option<V> + Sync + 'a;

/// A loaded value, encoded: its key's TTL (`None`: not stored) and bytes.
type Encoded = std::result::Result<(Option<Duration>, Vec<u8>), Error>;

/// One key's answer.
type Answer<V, E> = std::result::Result<Got<V>, LoadError<E>>;

impl<C: Codec> LockedCache<C> {
    /// Returns a value (or `None`) for every key of `keys`, in their order,
    /// loading the missing ones with **one** call of `loader`, once across
    /// every caller, process and host: the batch form of
    /// [`get_or_load`](Self::get_or_load).
    ///
    /// The loader is handed the keys this call must load (distinct, in the
    /// order first asked) and returns the values it found, as any
    /// `IntoIterator<Item = (String, T)>` (a `HashMap<String, T>`, a
    /// `Vec<(String, T)>`...). A key it does not return is *not found*:
    /// `None`, cached as a "not found" for the negative TTL (by default the
    /// TTL; see [`CallOptions::negative_ttl`](crate::CallOptions::negative_ttl)),
    /// exactly as a single `get_or_load::<Option<T>>` caches `None`. A key it
    /// returns that it was not asked for is ignored (and said once in a
    /// warning).
    ///
    /// Found values are stored as `T`, as [`set`](Self::set) stores them: a
    /// `get::<T>`, `get_or_load::<T>` or `get_many::<T>` of the same key reads
    /// them.
    ///
    /// # Round trips
    ///
    /// All cached: one `MGET` (one per slot on a cluster; keys beyond
    /// [`MAX_KEYS_PER_COMMAND`](crate::MAX_KEYS_PER_COMMAND) are sent in
    /// further chunks). Cold: the `MGET`, one lock script per master, one
    /// fence-and-read script, the loader, one fenced store, one release. An
    /// empty `keys` answers at once with no round trip.
    ///
    /// # Concurrent callers
    ///
    /// Keys another call of this process is loading (single or batch) are
    /// followed, not loaded again. Keys another process holds are waited for
    /// with the single keys' wake-ups and read again once stored; if their
    /// holder dies, they are taken over when its lock expires (one more loader
    /// call, with those keys). No key is loaded twice while its first load's
    /// value is fresh: under the lock every key is read again before loading.
    /// Two batches with overlapping keys never deadlock: neither waits while
    /// holding (see the guide's [many keys](crate::guide::many_keys) chapter).
    ///
    /// # Errors
    ///
    /// The outer `Result` fails the whole call (for a bad key: empty or over
    /// the length limit, [`Error::InvalidKey`] as for a single key; for a
    /// failed first read, the cache's error). Past that, each key succeeds or
    /// fails on its own, and this method returns the first failure; see
    /// [`get_or_load_many_each`](Self::get_or_load_many_each) for each key's
    /// result. A loader error goes to every key it was asked for (one shared
    /// `Arc`), nothing is stored for them and their locks are released; keys
    /// that were hits or loaded by others are unaffected. A key still held by
    /// another process at the wait time is [`Error::LockTimeout`].
    ///
    /// # Cancellation and panics
    ///
    /// Dropping the future at any await releases every lock it took (from a
    /// task, or at their expiry if the process dies) and abandons its
    /// flights, whose followers take over. A panicking loader propagates to
    /// the caller, with the same clean-up.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::collections::HashMap;
    /// use locked_cache::LockedCache;
    ///
    /// let cache = LockedCache::builder().build().await?;
    /// cache.set("user:1", &"Ada".to_owned()).await?;
    /// let names: Vec<Option<String>> = cache
    ///     .get_or_load_many(&["user:1", "user:2", "user:3"], |missing| async move {
    ///         // One query for every missing key: `WHERE id = ANY($1)`.
    ///         assert_eq!(missing, ["user:2", "user:3"]);
    ///         let found: HashMap<String, String> =
    ///             [("user:2".to_owned(), "Grace".to_owned())].into();
    ///         Ok::<_, std::io::Error>(found)
    ///     })
    ///     .await?;
    /// assert_eq!(names, [Some("Ada".into()), Some("Grace".into()), None]);
    /// # Ok(()) }
    /// ```
    pub async fn get_or_load_many<K, T, E, F, Fut, R>(
        &self,
        keys: &[K],
        loader: F,
    ) -> std::result::Result<Vec<Option<T>>, LoadError<E>>
    where
        K: AsRef<str>,
        T: Serialize + DeserializeOwned + Send + 'static,
        E: Send + Sync + 'static,
        F: FnMut(Vec<String>) -> Fut,
        Fut: Future<Output = std::result::Result<R, E>>,
        R: IntoIterator<Item = (String, T)>,
    {
        self.get_or_load_many_each(keys, loader)
            .await?
            .into_iter()
            .collect()
    }

    /// As [`get_or_load_many`](Self::get_or_load_many), with each key's own
    /// result: a key whose load failed does not hide the others' values. The
    /// outer `Result` is what fails the whole call (a bad key, a failed first
    /// read).
    pub async fn get_or_load_many_each<K, T, E, F, Fut, R>(
        &self,
        keys: &[K],
        loader: F,
    ) -> Result<Vec<std::result::Result<Option<T>, LoadError<E>>>>
    where
        K: AsRef<str>,
        T: Serialize + DeserializeOwned + Send + 'static,
        E: Send + Sync + 'static,
        F: FnMut(Vec<String>) -> Fut,
        Fut: Future<Output = std::result::Result<R, E>>,
        R: IntoIterator<Item = (String, T)>,
    {
        let keys: Vec<&str> = keys.iter().map(AsRef::as_ref).collect();
        self.inner
            .many(&keys, loader, &self.inner.defaults, None, None)
            .await
    }

    /// As [`get_or_load_many`](Self::get_or_load_many), handing out values as
    /// `Arc<T>`: keys the near cache holds (feature `near-cache`) are answered
    /// from it first, and fresh values read or loaded are kept there.
    pub async fn get_or_load_many_shared<K, T, E, F, Fut, R>(
        &self,
        keys: &[K],
        mut loader: F,
    ) -> std::result::Result<Vec<Option<Arc<T>>>, LoadError<E>>
    where
        K: AsRef<str>,
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: FnMut(Vec<String>) -> Fut,
        Fut: Future<Output = std::result::Result<R, E>>,
        R: IntoIterator<Item = (String, T)>,
    {
        let keys: Vec<&str> = keys.iter().map(AsRef::as_ref).collect();
        let loader = move |missing| {
            let load = loader(missing);
            async move { load.await.map(share_all) }
        };
        let near = self.near_lookup::<T>();
        let answers = self
            .inner
            .many(
                &keys,
                loader,
                &self.inner.defaults,
                Some(super::shared::Shared::<T>::SHARING),
                near.as_deref(),
            )
            .await?;
        answers
            .into_iter()
            .map(|a| a.map(|v| v.map(|s| s.0)))
            .collect()
    }

    /// The values of `keys`, in their order (`None`: missing, stale past the
    /// cache's stale window, a cached "not found", or undecodable): one `MGET`
    /// (per slot on a cluster, per [`MAX_KEYS_PER_COMMAND`](crate::MAX_KEYS_PER_COMMAND)
    /// keys), no lock. The batch form of [`get`](Self::get).
    pub async fn get_many<K: AsRef<str>, T: DeserializeOwned>(
        &self,
        keys: &[K],
    ) -> Result<Vec<Option<T>>> {
        let inner = &*self.inner;
        let keys: Vec<&str> = keys.iter().map(AsRef::as_ref).collect();
        for key in &keys {
            keys::check_key(&inner.key_prefix, key, inner.max_key_len)?;
        }
        let options = &inner.defaults;
        let found = inner.read_many::<T>(&keys, options.reads_ttl()).await?;
        Ok(found
            .into_iter()
            .map(|found| {
                let usable = found.filter(|f| f.usable(options));
                Stats::add(if usable.is_some() {
                    &inner.stats.hits
                } else {
                    &inner.stats.misses
                });
                usable.and_then(|f| f.value)
            })
            .collect())
    }

    /// Stores every `(key, value)` with the cache's TTL (and stale window),
    /// unconditionally, as [`set`](Self::set) does for each: loads of these
    /// keys already running will not overwrite them (their fences are removed
    /// first). Two round trips (one `DEL` of the fences, one pipeline of
    /// `SET`s), whatever the number of keys (chunked past
    /// [`MAX_KEYS_PER_COMMAND`](crate::MAX_KEYS_PER_COMMAND)).
    pub async fn set_many<K: AsRef<str>, T: Serialize>(&self, entries: &[(K, T)]) -> Result<()> {
        self.inner.set_many(entries, self.inner.defaults.ttl).await
    }

    /// The near cache's lookup for `T`, when there is a near cache.
    #[allow(clippy::type_complexity)]
    fn near_lookup<T: Send + Sync + 'static>(
        &self,
    ) -> Option<Box<dyn Fn(&str) -> Option<Shared<T>> + Sync + '_>> {
        #[cfg(feature = "near-cache")]
        if let Some(near) = &self.inner.near {
            return Some(Box::new(move |key: &str| {
                near.local.get::<T>(key).map(Shared)
            }));
        }
        None
    }
}

/// A shared loader's values as the flight shares them.
fn share_all<T, R: IntoIterator<Item = (String, T)>>(found: R) -> Vec<(String, Shared<T>)> {
    found
        .into_iter()
        .map(|(key, value)| (key, Shared(Arc::new(value))))
        .collect()
}

/// One key this call leads: its keys, its in-process flight (if coalescing),
/// and, for a stale value being refreshed, what it replaces.
struct Led<'f, V> {
    at: usize,
    key: String,
    keys: Keys,
    leader: Option<Leader<'f>>,
    refresh: Option<(Replacing, Got<V>)>,
}

impl<C: Codec> Inner<C> {
    /// `set_many` with `ttl`.
    pub(super) async fn set_many<K: AsRef<str>, T: Serialize>(
        &self,
        entries: &[(K, T)],
        ttl: Duration,
    ) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let meta_for = |value: &T| Meta {
            stale_for: self.defaults.stale_for,
            load_time: Duration::ZERO,
            absent: codec::is_absent(value),
        };
        let marks = self.marks_for(&self.defaults.tags).await?;
        let mut encoded = Vec::with_capacity(entries.len());
        for (key, value) in entries {
            let key = key.as_ref();
            keys::check_key(&self.key_prefix, key, self.max_key_len)?;
            let bytes = self.encode(key, value, &meta_for(value), marks.as_ref())?;
            encoded.push((Keys::new(&self.key_prefix, key), bytes));
        }
        let fences: Vec<&str> = encoded.iter().map(|(k, _)| k.fence.as_str()).collect();
        self.value_store.delete_many(&fences).await?;
        let key_ttl = self.key_ttl(ttl + self.defaults.stale_for, marks.as_ref());
        let writes: Vec<Write<'_>> = encoded
            .iter()
            .map(|(k, bytes)| Write {
                key: &k.value,
                value: bytes,
                ttl: key_ttl,
            })
            .collect();
        self.value_store.set_many(&writes).await?;
        self.changed_many(encoded.iter().map(|(k, _)| k.value.as_str()))
            .await;
        Ok(())
    }

    /// After writes: the near cache, if on, drops the keys and tells the
    /// other processes (the messages at once).
    async fn changed_many<'a>(&self, value_keys: impl Iterator<Item = &'a str>) {
        #[cfg(feature = "near-cache")]
        if self.near.is_some() {
            futures_util::future::join_all(value_keys.map(|k| self.changed(k))).await;
        }
        #[cfg(not(feature = "near-cache"))]
        let _ = value_keys;
    }

    /// Reads and decodes the values of `keys` (one `MGET`, or `MGET` +
    /// `PTTL`s), a cached "not found" as `value: None`. Values stored with a
    /// stale window read without their time left are read again with it.
    async fn read_many<V: DeserializeOwned>(
        &self,
        keys: &[&str],
        with_ttl: bool,
    ) -> Result<Vec<Option<Found<Option<V>>>>> {
        let value_keys: Vec<String> = keys
            .iter()
            .map(|k| keys::value_key(&self.key_prefix, k))
            .collect();
        let refs: Vec<&str> = value_keys.iter().map(String::as_str).collect();
        let stored = self.value_store.get_many(&refs, with_ttl).await?;
        let mut stored = self.screen_many(stored).await?;
        if !with_ttl {
            let again: Vec<usize> = (0..stored.len())
                .filter(|&i| {
                    stored[i]
                        .as_ref()
                        .is_some_and(|s| codec::has_stale_window(C::ID, &s.bytes))
                })
                .collect();
            if !again.is_empty() {
                let keys: Vec<&str> = again.iter().map(|&i| refs[i]).collect();
                let reread = self.value_store.get_many(&keys, true).await?;
                let reread = self.screen_many(reread).await?;
                for (&i, s) in again.iter().zip(reread) {
                    stored[i] = s;
                }
            }
        }
        Ok(stored
            .into_iter()
            .zip(&refs)
            .map(|(stored, key)| stored.and_then(|s| self.decode_entry::<V>(key, s, true)))
            .collect())
    }

    /// The first read of a batch: the values of `keys` judged for `options`
    /// from their headers, then decoded; a fresh one that is not asked
    /// twice (`dup`) is decoded in place where its type allows
    /// (`in_place.rs`), and keeps no bytes.
    async fn read_judged_many<V: DeserializeOwned + 'static>(
        &self,
        keys: &[&str],
        with_ttl: bool,
        options: &Resolved,
        dup: &[bool],
    ) -> Result<Vec<Option<(Found<Option<V>>, Freshness)>>> {
        let refs: Vec<ValueKey<'_>> = keys
            .iter()
            .map(|k| ValueKey::new(&self.key_prefix, k))
            .collect();
        // The built-in Redis store writes the value keys straight into its
        // `MGET` (as a hit's `GET` does); another store gets them built.
        let stored = match self.value_store.as_redis() {
            Some(redis) => redis.read_many(&refs, with_ttl).await?,
            None => {
                let built: Vec<String> = refs.iter().map(|k| k.build()).collect();
                let built: Vec<&str> = built.iter().map(String::as_str).collect();
                self.value_store.get_many(&built, with_ttl).await?
            }
        };
        let stored = self.screen_many(stored).await?;
        let mut out = Vec::with_capacity(stored.len());
        let mut reread = Vec::new();
        for (j, stored) in stored.into_iter().enumerate() {
            let Some(stored) = stored else {
                out.push(None);
                continue;
            };
            let Ok((meta, _)) = codec::split_header(C::ID, &stored.bytes) else {
                out.push(
                    self.decode_entry::<V>(&refs[j], stored, true)
                        .map(|f| (f, Freshness::TooStale)),
                );
                continue;
            };
            if !with_ttl && !meta.stale_for.is_zero() {
                // Stored with a stale window: judged by its time left.
                reread.push(j);
                out.push(None);
                continue;
            }
            let draw = if stored.ttl.is_some() && options.early_refresh_beta > 0.0 {
                fastrand::f64()
            } else {
                0.0
            };
            let judged = freshness::judge(&meta, stored.ttl, options, draw);
            if judged == Freshness::Fresh
                && !meta.absent
                && !dup.get(j).copied().unwrap_or(true)
                && stored.bytes.len() <= self.max_value_size
            {
                let Stored { mut bytes, ttl } = stored;
                let stored_len = bytes.len();
                match in_place::decode::<C, V>(&mut bytes) {
                    Some(Ok(value)) => {
                        let found = Found {
                            value: Some(value),
                            bytes: Vec::new(),
                            stored_len,
                            meta,
                            ttl_left: ttl,
                        };
                        out.push(Some((found, judged)));
                        continue;
                    }
                    Some(Err(e)) => {
                        self.report_corrupt(&refs[j], &e);
                        out.push(None);
                        continue;
                    }
                    None => {
                        let found = self.decode_entry::<V>(&refs[j], Stored { bytes, ttl }, true);
                        out.push(found.map(|mut f| {
                            f.bytes = Vec::new();
                            (f, judged)
                        }));
                        continue;
                    }
                }
            }
            out.push(
                self.decode_entry::<V>(&refs[j], stored, true)
                    .map(|f| (f, judged)),
            );
        }
        if !reread.is_empty() {
            let again: Vec<String> = reread.iter().map(|&j| refs[j].build()).collect();
            let again: Vec<&str> = again.iter().map(String::as_str).collect();
            let stored = self.value_store.get_many(&again, true).await?;
            let stored = self.screen_many(stored).await?;
            for (&j, stored) in reread.iter().zip(stored) {
                out[j] = stored
                    .and_then(|s| self.decode_entry::<V>(&refs[j], s, true))
                    .map(|f| {
                        let judged = freshness::judge(&f.meta, f.ttl_left, options, 0.0);
                        (f, judged)
                    });
            }
        }
        Ok(out)
    }

    /// Decodes a stored value: a cached "not found" (its header says so) as
    /// `None` without decoding, anything else as a `V`; undecodable: `None`
    /// (reported when `report`).
    fn decode_entry<V: DeserializeOwned>(
        &self,
        value_key: &dyn std::fmt::Display,
        stored: Stored,
        report: bool,
    ) -> Option<Found<Option<V>>> {
        match codec::split_header(C::ID, &stored.bytes) {
            Ok((meta, _)) if meta.absent => Some(Found {
                value: None,
                stored_len: stored.bytes.len(),
                bytes: stored.bytes,
                meta,
                ttl_left: stored.ttl,
            }),
            _ => self
                .decode_or_report::<V>(value_key, stored, report)
                .map(|f| Found {
                    value: Some(f.value),
                    bytes: f.bytes,
                    stored_len: f.stored_len,
                    meta: f.meta,
                    ttl_left: f.ttl_left,
                }),
        }
    }

    /// Decodes a flight's bytes for a follower or a duplicate position.
    fn decode_got<V: DeserializeOwned>(&self, bytes: &[u8]) -> Result<Option<V>> {
        match codec::split_header(C::ID, bytes) {
            Ok((meta, _)) if meta.absent => Ok(None),
            _ => Ok(Some(codec::decode(&self.codec, bytes)?)),
        }
    }

    /// The whole call: see the module docs. Each key's answer, in the order
    /// of `keys`; `Err` only for what fails the whole call.
    ///
    /// In a `get_or_load_many` span (DEBUG, with the number of keys) when a
    /// subscriber wants it, and bounded by the call's hard timeout, if any
    /// ([`Error::LoadTimeout`] for the whole call).
    pub(super) async fn many<V, E, F, Fut, R>(
        self: &Arc<Self>,
        keys: &[&str],
        loader: F,
        options: &Resolved,
        sharing: Option<Sharing<V>>,
        near: Option<&NearLookup<'_, V>>,
    ) -> Result<Vec<std::result::Result<Option<V>, LoadError<E>>>>
    where
        V: Serialize + DeserializeOwned + Send + 'static,
        E: Send + Sync + 'static,
        F: FnMut(Vec<String>) -> Fut,
        Fut: Future<Output = std::result::Result<R, E>>,
        R: IntoIterator<Item = (String, V)>,
    {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let span = tracing::debug_span!(
            "get_or_load_many",
            db.system = self.telemetry.db_system,
            locked_cache.keys = keys.len(),
        );
        let call = self.many_untraced(keys, loader, options, sharing, near);
        let call = tracing::Instrument::instrument(call, span);
        match options.hard_timeout {
            None => call.await,
            Some(timeout) => match tokio::time::timeout(timeout, call).await {
                Ok(answers) => answers,
                Err(_) => Err(Error::LoadTimeout {
                    key: format!("{} keys of a batch", keys.len()),
                    timeout,
                }),
            },
        }
    }

    async fn many_untraced<V, E, F, Fut, R>(
        self: &Arc<Self>,
        keys: &[&str],
        mut loader: F,
        options: &Resolved,
        sharing: Option<Sharing<V>>,
        near: Option<&NearLookup<'_, V>>,
    ) -> Result<Vec<std::result::Result<Option<V>, LoadError<E>>>>
    where
        V: Serialize + DeserializeOwned + Send + 'static,
        E: Send + Sync + 'static,
        F: FnMut(Vec<String>) -> Fut,
        Fut: Future<Output = std::result::Result<R, E>>,
        R: IntoIterator<Item = (String, V)>,
    {
        for key in keys {
            keys::check_key(&self.key_prefix, key, self.max_key_len)?;
        }
        let started = Instant::now();
        let deadline = started + self.lock.options().wait;
        // Distinct keys, in the order first asked; each position's key.
        // foldhash: std's SipHash was a visible share of a 100-key hit.
        let mut index: HashMap<&str, usize, foldhash::fast::RandomState> =
            HashMap::with_capacity_and_hasher(keys.len(), Default::default());
        let mut distinct: Vec<&str> = Vec::with_capacity(keys.len());
        let positions: Vec<usize> = keys
            .iter()
            .map(|key| {
                *index.entry(key).or_insert_with(|| {
                    distinct.push(key);
                    distinct.len() - 1
                })
            })
            .collect();
        let mut answers: Vec<Option<Answer<V, E>>> = (0..distinct.len()).map(|_| None).collect();

        // 1. The near cache.
        if let Some(near) = near {
            for (i, key) in distinct.iter().enumerate() {
                if let Some(value) = near(key) {
                    answers[i] = Some(Ok((Some(value), None)));
                }
            }
        }
        // 2. One read for the rest.
        let unread: Vec<usize> = (0..distinct.len())
            .filter(|&i| answers[i].is_none())
            .collect();
        let mut misses = Vec::new();
        let mut stale = Vec::new();
        if !unread.is_empty() {
            let read_keys: Vec<&str> = unread.iter().map(|&i| distinct[i]).collect();
            let with_ttl = near.is_some() || options.reads_ttl();
            // Taken before the read, for what is kept in the near cache.
            let mut tickets: Vec<_> = match near {
                Some(_) => read_keys
                    .iter()
                    .map(|k| self.near_ticket(ValueKey::new(&self.key_prefix, k), sharing))
                    .collect(),
                None => Vec::new(),
            };
            tickets.reverse();
            let mut asked = vec![0u8; distinct.len()];
            for &i in &positions {
                asked[i] = asked[i].saturating_add(1);
            }
            let dup: Vec<bool> = unread.iter().map(|&i| asked[i] > 1).collect();
            let found = self
                .read_judged_many::<V>(&read_keys, with_ttl, options, &dup)
                .await?;
            for (&i, found) in unread.iter().zip(found) {
                let ticket = tickets.pop().flatten();
                let Some((found, judged)) = found else {
                    misses.push(i);
                    continue;
                };
                if judged == Freshness::TooStale {
                    misses.push(i);
                    continue;
                }
                Stats::add(&self.stats.hits);
                if found.meta.absent {
                    Stats::add(&self.stats.negative_hits);
                }
                let Found {
                    mut value,
                    bytes,
                    stored_len,
                    meta,
                    ttl_left,
                } = found;
                if judged == Freshness::Fresh
                    && ticket.is_some()
                    && let Some(kept) = value.take()
                {
                    let kept = Found {
                        value: kept,
                        bytes: Vec::new(),
                        stored_len,
                        meta,
                        ttl_left,
                    };
                    self.near_keep(&kept, ticket);
                    value = Some(kept.value);
                }
                if judged == Freshness::Fresh {
                    let bytes = (!bytes.is_empty()).then(|| Arc::new(bytes));
                    answers[i] = Some(Ok((value, bytes)));
                    continue;
                }
                if judged == Freshness::RefreshEarly {
                    Stats::add(&self.stats.early_refreshes);
                }
                let replacing = Replacing {
                    bytes: bytes.clone(),
                    ttl_left,
                };
                stale.push((i, replacing, (value, Some(Arc::new(bytes)))));
            }
            add_n(&self.stats.misses, misses.len());
        }

        // 3-5. Flights, locks, the load; followed keys whose leader went away
        // are led on the next pass.
        let mut passes = 0;
        while !misses.is_empty() || !stale.is_empty() {
            passes += 1;
            let mut led = Vec::new();
            let mut followed = Vec::new();
            for i in std::mem::take(&mut misses) {
                let keys = Keys::new(&self.key_prefix, distinct[i]);
                let role = if self.coalesce {
                    self.flights.join(&call::flight_key(distinct[i], options))
                } else {
                    Role::Alone
                };
                match role {
                    Role::Leader(leader) => led.push(Led {
                        at: i,
                        key: distinct[i].to_owned(),
                        keys,
                        leader: Some(leader),
                        refresh: None,
                    }),
                    Role::Alone => led.push(Led {
                        at: i,
                        key: distinct[i].to_owned(),
                        keys,
                        leader: None,
                        refresh: None,
                    }),
                    Role::Follower(rx) => {
                        if passes == 1 {
                            Stats::add(&self.stats.coalesced);
                        }
                        followed.push((i, rx));
                    }
                }
            }
            for (i, replacing, got) in std::mem::take(&mut stale) {
                led.push(Led {
                    at: i,
                    key: distinct[i].to_owned(),
                    keys: Keys::new(&self.key_prefix, distinct[i]),
                    leader: None,
                    refresh: Some((replacing, got)),
                });
            }
            let follow = self.follow_many::<V, E>(followed, sharing, options, deadline);
            let lead = self.lead_many(led, &mut loader, options, sharing, started, deadline);
            let (followed, led) = tokio::join!(follow, lead);
            for (i, answer) in led {
                answers[i] = Some(answer);
            }
            for (i, answer) in followed {
                match answer {
                    Some(answer) => answers[i] = Some(answer),
                    None if Instant::now() < deadline => misses.push(i),
                    None => {
                        answers[i] = Some(Err(LoadError::Cache(Error::LockTimeout {
                            resource: Keys::new(&self.key_prefix, distinct[i]).lock,
                            waited: started.elapsed(),
                        })));
                    }
                }
            }
        }

        // Each position its answer; a key asked twice is decoded again (or
        // shared) from the bytes.
        let mut left = vec![0usize; distinct.len()];
        for &i in &positions {
            left[i] += 1;
        }
        let mut out = Vec::with_capacity(keys.len());
        for &i in &positions {
            left[i] -= 1;
            let answer = if left[i] == 0 {
                answers[i].take()
            } else {
                answers[i].as_ref().map(|a| self.copy_answer(a, sharing))
            };
            out.push(match answer {
                Some(Ok((value, _))) => Ok(value),
                Some(Err(e)) => Err(e),
                None => Err(LoadError::Cache(Error::Abandoned)),
            });
        }
        Ok(out)
    }

    /// A second copy of an answer, for a key asked twice.
    fn copy_answer<V: DeserializeOwned, E>(
        &self,
        answer: &Answer<V, E>,
        sharing: Option<Sharing<V>>,
    ) -> Answer<V, E> {
        match answer {
            Err(e) => Err(e.clone()),
            Ok((None, bytes)) => Ok((None, bytes.clone())),
            Ok((Some(value), bytes)) => {
                if let Some(sharing) = sharing
                    && let Some(copy) = (sharing.take)(&(sharing.share)(value))
                {
                    return Ok((Some(copy), bytes.clone()));
                }
                // A key asked twice keeps its bytes (`read_judged_many`).
                let Some(bytes) = bytes else {
                    return Err(LoadError::Cache(Error::Abandoned));
                };
                self.decode_got(bytes)
                    .map(|v| (v, Some(Arc::clone(bytes))))
                    .map_err(LoadError::Cache)
            }
        }
    }

    /// Waits for the flights other calls of this process lead. `None` for a
    /// key whose leader went away (or failed in a way that is not this
    /// call's): it is led on the next pass.
    async fn follow_many<V, E>(
        &self,
        followed: Vec<(usize, tokio::sync::watch::Receiver<Option<flight::Outcome>>)>,
        sharing: Option<Sharing<V>>,
        options: &Resolved,
        deadline: Instant,
    ) -> Vec<(usize, Option<Answer<V, E>>)>
    where
        V: DeserializeOwned,
        E: Send + Sync + 'static,
    {
        let until = deadline + self.command_timeout * 2;
        let waits = followed.into_iter().map(|(i, rx)| async move {
            let outcome = tokio::time::timeout_at(until.into(), flight::outcome(rx)).await;
            let answer = match outcome {
                Err(_) => None,
                Ok(flight::Outcome::Value(bytes, shared)) => {
                    let taken = sharing.zip(shared).and_then(|(s, v)| (s.take)(&v));
                    Some(match taken {
                        Some(value) => Ok((Some(value), Some(bytes))),
                        None => self
                            .decode_got(&bytes)
                            .map(|v| (v, Some(bytes)))
                            .map_err(LoadError::Cache),
                    })
                }
                Ok(flight::Outcome::LoaderError(shared)) => shared
                    .downcast::<E>()
                    .ok()
                    .map(|e| Err(LoadError::Loader(e))),
                Ok(flight::Outcome::Failed(Error::LoadTimeout { .. }))
                    if options.hard_timeout.is_none() =>
                {
                    None
                }
                Ok(flight::Outcome::Failed(e)) => Some(Err(LoadError::Cache(e))),
                Ok(flight::Outcome::Abandoned) => None,
            };
            (i, answer)
        });
        futures_util::future::join_all(waits).await
    }

    /// The keys this call leads: their locks in one attempt per master, the
    /// load of those held, and waiting (then trying again) for the others.
    #[allow(clippy::too_many_arguments)]
    async fn lead_many<V, E, F, Fut, R>(
        &self,
        mut led: Vec<Led<'_, V>>,
        loader: &mut F,
        options: &Resolved,
        sharing: Option<Sharing<V>>,
        started: Instant,
        deadline: Instant,
    ) -> Vec<(usize, Answer<V, E>)>
    where
        V: Serialize + DeserializeOwned + Send + 'static,
        E: Send + Sync + 'static,
        F: FnMut(Vec<String>) -> Fut,
        Fut: Future<Output = std::result::Result<R, E>>,
        R: IntoIterator<Item = (String, V)>,
    {
        let mut done = Vec::with_capacity(led.len());
        if led.is_empty() {
            return done;
        }
        let expiry = self.lock.options().expiry;
        // Registered before the first attempt: a release after it wakes us.
        let mut waiters: Vec<_> = led.iter().map(|l| self.lock.waiter(&l.keys.lock)).collect();
        let mut splits = 0u32;
        loop {
            let names: Vec<String> = led.iter().map(|l| l.keys.lock.clone()).collect();
            // One master that is also the value server: the fences and the
            // double check ride on the lock script (one round trip fewer).
            let fenced =
                (self.lock.masters() == 1 && !self.separate_value_server).then(|| Fenced {
                    entries: Arc::new(
                        led.iter()
                            .map(|l| (l.keys.value.clone(), l.keys.fence.clone()))
                            .collect(),
                    ),
                    fence_expiry: expiry * 2,
                });
            let attempt = match self.lock.attempt_loads(&names, expiry, fenced).await {
                Ok(attempt) => attempt,
                Err(e) => {
                    for l in led {
                        done.push(self.finish_led(l, Err(LoadError::Cache(e.clone())), sharing));
                    }
                    return done;
                }
            };
            let mut held = Vec::new();
            let mut prefetched = attempt.found.as_ref().map(|_| Vec::new());
            let mut busy = Vec::new();
            let mut busy_waiters = Vec::new();
            let mut no_quorum = false;
            let mut split = false;
            let mut found = attempt.found.map(Vec::into_iter);
            for ((l, vote), waiter) in led.into_iter().zip(&attempt.votes).zip(waiters) {
                let value = found.as_mut().and_then(Iterator::next).flatten();
                match vote {
                    KeyVote::Held => {
                        if let Some(prefetched) = &mut prefetched {
                            prefetched.push(value);
                        }
                        held.push(l);
                    }
                    // A refresh someone else holds: they refresh it; serve the
                    // stale value.
                    _ if l.refresh.is_some() => {
                        let mut l = l;
                        if let Some((_, got)) = l.refresh.take() {
                            Stats::add(&self.stats.stale_served);
                            done.push(self.finish_led(l, Ok(got), sharing));
                        }
                    }
                    vote => {
                        no_quorum |= *vote == KeyVote::NoQuorum;
                        split |= *vote == KeyVote::Split;
                        busy.push(l);
                        busy_waiters.push(waiter);
                    }
                }
            }
            if let Some(locks) = attempt.locks {
                let loaded = self
                    .load_held(held, prefetched, locks, loader, options, sharing)
                    .await;
                done.extend(loaded);
            }
            if busy.is_empty() {
                return done;
            }
            let now = Instant::now();
            if now >= deadline {
                for l in busy {
                    let error = if no_quorum {
                        Error::QuorumNotReached {
                            resource: l.keys.lock.clone(),
                            reachable: 0,
                            masters: self.lock.masters(),
                            quorum: self.lock.masters() / 2 + 1,
                        }
                    } else {
                        Stats::add(&self.stats.lock_timeouts);
                        Error::LockTimeout {
                            resource: l.keys.lock.clone(),
                            waited: started.elapsed(),
                        }
                    };
                    done.push(self.finish_led(l, Err(LoadError::Cache(error)), sharing));
                }
                return done;
            }
            let retry = self.lock.options().retry;
            let pause = if split {
                splits += 1;
                jittered(retry.min(split_vote_retry(splits)))
            } else {
                splits = 0;
                jittered(retry)
            };
            let pause = pause.min(deadline - now);
            {
                let _waiting = self.telemetry.waiting();
                let waits = busy_waiters.iter().map(|w| Box::pin(w.wait(pause)));
                futures_util::future::select_all(waits).await;
            }
            // Read again: the holders store before they release.
            let value_keys: Vec<&str> = busy.iter().map(|l| l.keys.value.as_str()).collect();
            let found = match self
                .value_store
                .get_many(&value_keys, options.reads_ttl())
                .await
            {
                Ok(found) => self.screen_many(found).await,
                Err(e) => Err(e),
            };
            let found = match found {
                Ok(found) => found,
                Err(e) => {
                    for l in busy {
                        done.push(self.finish_led(l, Err(LoadError::Cache(e.clone())), sharing));
                    }
                    return done;
                }
            };
            led = Vec::new();
            waiters = Vec::new();
            for ((l, found), waiter) in busy.into_iter().zip(found).zip(busy_waiters) {
                let usable = found
                    .and_then(|s| self.decode_entry::<V>(&l.keys.value, s, true))
                    .filter(|f| f.usable(options));
                match usable {
                    Some(found) => {
                        Stats::add(&self.stats.found_while_waiting);
                        let got = (found.value, Some(Arc::new(found.bytes)));
                        done.push(self.finish_led(l, Ok(got), sharing));
                    }
                    None => {
                        led.push(l);
                        waiters.push(waiter);
                    }
                }
            }
            if led.is_empty() {
                return done;
            }
        }
    }

    /// Holding the locks of `held`: the double check and fence in one round
    /// trip, the loader once for what is still missing, one fenced store,
    /// the flights handed their values, the locks released.
    #[allow(clippy::too_many_arguments)]
    async fn load_held<V, E, F, Fut, R>(
        &self,
        held: Vec<Led<'_, V>>,
        prefetched: Option<Vec<Option<Stored>>>,
        locks: LoadLocks,
        loader: &mut F,
        options: &Resolved,
        sharing: Option<Sharing<V>>,
    ) -> Vec<(usize, Answer<V, E>)>
    where
        V: Serialize + DeserializeOwned + Send + 'static,
        E: Send + Sync + 'static,
        F: FnMut(Vec<String>) -> Fut,
        Fut: Future<Output = std::result::Result<R, E>>,
        R: IntoIterator<Item = (String, V)>,
    {
        let mut done = Vec::with_capacity(held.len());
        let expiry = self.lock.options().expiry;
        let fence_expiry = expiry * 2;
        let entries: Vec<(&str, &str)> = held
            .iter()
            .map(|l| (l.keys.value.as_str(), l.keys.fence.as_str()))
            .collect();
        let found = match prefetched {
            Some(found) => Ok(found),
            None => {
                self.value_store
                    .get_or_fence_many(&entries, locks.token(), fence_expiry)
                    .await
            }
        };
        // Invalidated (tags on): as missing. And the marks of what this batch
        // will store, as of now, before the loader reads anything.
        let found = match found {
            Ok(found) => self.screen_many(found).await,
            Err(e) => Err(e),
        };
        let marks = match found {
            Ok(_) => self.marks_for(&options.tags).await.map(Some),
            Err(_) => Ok(None),
        };
        let (found, marks) = match (found, marks) {
            (Ok(found), Ok(marks)) => (Ok(found), marks.flatten()),
            (Err(e), _) | (_, Err(e)) => (Err(e), None),
        };
        let found = match found {
            Ok(found) => found,
            Err(e) => {
                locks.release().await;
                for l in held {
                    done.push(self.finish_led(l, Err(LoadError::Cache(e.clone())), sharing));
                }
                return done;
            }
        };
        let mut to_load = Vec::new();
        for (l, found) in held.into_iter().zip(found) {
            let found = found.and_then(|s| self.decode_entry::<V>(&l.keys.value, s, false));
            if let Some(found) = found {
                let skip = match &l.refresh {
                    Some((old, _)) => found.bytes != old.bytes || found.ttl_left > old.ttl_left,
                    None => found.usable(options),
                };
                if skip {
                    Stats::add(&self.stats.found_while_waiting);
                    let got = (found.value, Some(Arc::new(found.bytes)));
                    done.push(self.finish_led(l, Ok(got), sharing));
                    continue;
                }
            }
            to_load.push(l);
        }
        if to_load.is_empty() {
            locks.release().await;
            return done;
        }

        // The keep-alive: the locks and the fences, every third of the expiry.
        let renewer = locks.renewer();
        let fences: Vec<String> = to_load.iter().map(|l| l.keys.fence.clone()).collect();
        let (store, token) = (Arc::clone(&self.value_store), locks.token().to_vec());
        let keepalive = AbortOnDrop(tokio::spawn(async move {
            loop {
                tokio::time::sleep(expiry / 3).await;
                let held = renewer.renew(expiry).await;
                let lost = held.iter().filter(|h| !**h).count();
                if lost > 0 {
                    tracing::warn!(
                        lost,
                        "batched load: locks lost during the load; their values are stored only if nobody took over"
                    );
                }
                let refs: Vec<&str> = fences.iter().map(String::as_str).collect();
                if let Err(e) = store.renew_loads(&refs, &token, fence_expiry).await {
                    tracing::debug!(error = %e, "extending the batch's fences failed");
                }
            }
        }));

        let asked: Vec<String> = to_load.iter().map(|l| l.key.clone()).collect();
        Stats::add(&self.stats.loads);
        let began = Instant::now();
        let output = {
            let _loading = self.telemetry.loading();
            match AssertUnwindSafe(loader(asked.clone())).catch_unwind().await {
                Ok(output) => output,
                Err(panic) => {
                    Stats::add(&self.stats.load_errors);
                    std::panic::resume_unwind(panic)
                }
            }
        };
        let load_time = began.elapsed();
        self.telemetry.load_took(load_time);
        drop(keepalive);

        let found = match output {
            Ok(found) => found,
            Err(e) => {
                Stats::add(&self.stats.load_errors);
                let e = Arc::new(e);
                locks.release().await;
                for mut l in to_load {
                    let answer = match l.refresh.take() {
                        // Fail-safe: the stale value rather than the error.
                        Some((_, got)) if options.fail_safe => {
                            Stats::add(&self.stats.fail_safe_served);
                            Ok(got)
                        }
                        _ => Err(LoadError::Loader(Arc::clone(&e))),
                    };
                    done.push(self.finish_led(l, answer, sharing));
                }
                return done;
            }
        };
        let mut by_key: HashMap<&str, usize> = asked
            .iter()
            .enumerate()
            .map(|(j, k)| (k.as_str(), j))
            .collect();
        let mut values: Vec<Option<V>> = (0..asked.len()).map(|_| None).collect();
        let mut unasked = 0usize;
        for (key, value) in found {
            match by_key.remove(key.as_str()) {
                Some(j) => values[j] = Some(value),
                None => unasked += 1,
            }
        }
        if unasked > 0 {
            tracing::warn!(
                unasked,
                asked = asked.len(),
                "the batch loader returned keys it was not asked for (or a key twice); ignored"
            );
        }

        // Encode, then one fenced store.
        let mut encoded: Vec<(Led<'_, V>, Option<V>, Encoded)> = Vec::with_capacity(to_load.len());
        for ((l, value), key) in to_load.into_iter().zip(values).zip(&asked) {
            let stored = match &value {
                Some(value) => self.encode_loaded(key, value, load_time, options, marks.as_ref()),
                None => self.encode_loaded(key, &None::<()>, load_time, options, marks.as_ref()),
            };
            encoded.push((l, value, stored));
        }
        let wake_ups = self.lock.options().wake_ups;
        let in_script = (wake_ups && !self.separate_value_server)
            .then_some(self.lock.options().channel.as_str());
        let writes: Vec<FencedWrite<'_>> = encoded
            .iter()
            .filter_map(|(l, _, stored)| match stored {
                Ok((Some(ttl), bytes)) => Some(FencedWrite {
                    key: &l.keys.value,
                    fence: &l.keys.fence,
                    value: bytes,
                    ttl: *ttl,
                    message: &l.keys.lock,
                }),
                _ => None,
            })
            .collect();
        let stored = if writes.is_empty() {
            Ok(Vec::new())
        } else {
            self.value_store
                .set_fenced_many(&writes, locks.token(), in_script)
                .await
        };
        match &stored {
            Ok(flags) => {
                let refused = flags.iter().filter(|f| !**f).count();
                if refused > 0 {
                    add_n(&self.stats.writes_refused, refused);
                    tracing::warn!(
                        refused,
                        "batched load: some fences were taken during the load (a newer holder, or set/invalidate): values returned, not stored"
                    );
                }
                let stored_keys = writes.iter().zip(flags).filter(|(_, f)| **f);
                if wake_ups && self.separate_value_server {
                    for (w, _) in stored_keys.clone() {
                        self.lock.publish_wake_up(w.message);
                    }
                }
                self.changed_many(stored_keys.map(|(w, _)| w.key)).await;
            }
            Err(e) => {
                Stats::add(&self.stats.store_errors);
                tracing::warn!(error = %e, keys = writes.len(), "storing the batch's loaded values failed; returning them uncached");
            }
        }
        drop(writes);
        for (l, value, stored) in encoded {
            let answer = match stored {
                Ok((_, bytes)) => Ok((value, Some(Arc::new(bytes)))),
                Err(e) => Err(LoadError::Cache(e)),
            };
            done.push(self.finish_led(l, answer, sharing));
        }
        // The waiters were woken by the store; the release needs no waiting
        // for (and a dropped call would release from a task anyway).
        tokio::spawn(locks.release());
        done
    }

    /// A led key's answer, handed to its flight's followers.
    fn finish_led<V, E>(
        &self,
        l: Led<'_, V>,
        answer: Answer<V, E>,
        sharing: Option<Sharing<V>>,
    ) -> (usize, Answer<V, E>)
    where
        E: Send + Sync + 'static,
    {
        if let Some(leader) = l.leader {
            leader.finish_with(|| match &answer {
                Ok((value, bytes)) => flight::Outcome::Value(
                    bytes.clone().unwrap_or_default(),
                    sharing.zip(value.as_ref()).map(|(s, v)| (s.share)(v)),
                ),
                Err(LoadError::Loader(e)) => {
                    flight::Outcome::LoaderError(Arc::clone(e) as Arc<dyn Any + Send + Sync>)
                }
                Err(LoadError::Cache(e)) => flight::Outcome::Failed(e.clone()),
            });
        }
        (l.at, answer)
    }
}

/// Adds `n` to a counter.
fn add_n(counter: &crate::stats::Counter, n: usize) {
    counter.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
}

/// Aborts the task when dropped (a cancelled or panicking load).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
