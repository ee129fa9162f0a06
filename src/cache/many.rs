//! Many keys in one call: [`LockedCache::get_or_load_many`],
//! [`get_many`](LockedCache::get_many) and [`set_many`](LockedCache::set_many)
//! (and their `with(CallOptions)` forms in `with.rs`).
//!
//! The call surface and the plain reads and writes are here; the call itself
//! is in `many_call.rs` (steps 1-3 and the answers) and `many_load.rs` (steps
//! 4-5). The data path of one `get_or_load_many`, top to bottom:
//!
//! 1. The keys are checked (as single keys are) and deduplicated; the near
//!    cache answers what it holds (the `_shared` form).
//! 2. **One read** for the rest: `MGET` on the value server (on a cluster, an
//!    `MGET` per slot in one pipeline per node), a `PTTL` per key pipelined behind it when freshness needs the
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

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::flight::Leader;
use super::keys::{self, Keys};
use super::options::Resolved;
use super::shared::Shared;
use super::{Found, Inner, LockedCache, Replacing};
use crate::codec::{self, Codec, Meta};
use crate::error::{LoadError, Result};
use crate::stats::Stats;
use crate::store::Write;

/// A value (`None`: not found) with its stored bytes (header + payload),
/// shared with a flight's followers and duplicate positions; `None` for a
/// hit nobody else needs them for (a near cache hit, a key asked once).
pub(super) type Got<V> = (Option<V>, Option<Arc<Vec<u8>>>);

/// The near cache's answer for a key, as the call's value kind.
pub(super) type NearLookup<'a, V> = dyn Fn(&str) -> Option<V> + Sync + 'a;

/// One key's answer.
pub(super) type Answer<V, E> = std::result::Result<Got<V>, LoadError<E>>;

/// A stale key of a batch: its position, what its refresh replaces, and the
/// value to serve.
pub(super) type Stale<V> = (usize, Replacing, Got<V>);

/// Where a batch whose only unfresh keys are stale sends its answers before
/// refreshing them (`Inner::many`).
pub(super) type EarlyAnswers<V, E> =
    tokio::sync::oneshot::Sender<Result<Vec<std::result::Result<Option<V>, LoadError<E>>>>>;

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
    /// All cached: one `MGET` (on a cluster, one pipeline per node with an
    /// `MGET` per slot in it; keys beyond
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
    /// the length limit, [`Error::InvalidKey`](crate::Error::InvalidKey) as for a single key; for a
    /// failed first read, the cache's error). Past that, each key succeeds or
    /// fails on its own, and this method returns the first failure; see
    /// [`get_or_load_many_each`](Self::get_or_load_many_each) for each key's
    /// result. A loader error goes to every key it was asked for (one shared
    /// `Arc`), nothing is stored for them and their locks are released; keys
    /// that were hits or loaded by others are unaffected. A key still held by
    /// another process at the wait time is [`Error::LockTimeout`](crate::Error::LockTimeout).
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
            .many(&keys, loader, &self.inner.defaults, None, None, &mut None)
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
                &mut None,
            )
            .await?;
        answers
            .into_iter()
            .map(|a| a.map(|v| v.map(|s| s.0)))
            .collect()
    }

    /// The values of `keys`, in their order (`None`: missing, stale past the
    /// cache's stale window, a cached "not found", or undecodable): one `MGET`
    /// (per [`MAX_KEYS_PER_COMMAND`](crate::MAX_KEYS_PER_COMMAND) keys; on a
    /// cluster one per slot, sent in one pipeline per node), no lock. The
    /// batch form of [`get`](Self::get).
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
        let inner = &*self.inner;
        inner
            .set_many(entries, inner.defaults.ttl, &inner.defaults)
            .await
    }

    /// Removes the values under `keys`, as [`invalidate`](Self::invalidate)
    /// does for each: the next `get_or_load` of each loads it again, and a
    /// load of any of them already running does not store its value (the
    /// fences go first). Two round trips whatever the number of keys (a `DEL`
    /// of the fences, then one of the values; chunked past
    /// [`MAX_KEYS_PER_COMMAND`](crate::MAX_KEYS_PER_COMMAND), and on a
    /// cluster one per slot in one pipeline per node); the near caches of
    /// every process drop them. To invalidate a group of entries without
    /// naming each, tag them ([`CallOptions::tag`](crate::CallOptions::tag),
    /// [`invalidate_tag`](Self::invalidate_tag)).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), locked_cache::Error> {
    /// use locked_cache::LockedCache;
    ///
    /// let cache = LockedCache::builder().build().await?;
    /// cache.set_many(&[("a", 1u8), ("b", 2u8)]).await?;
    /// cache.invalidate_many(&["a", "b", "never-set"]).await?;
    /// assert_eq!(cache.get_many::<_, u8>(&["a", "b"]).await?, [None, None]);
    /// # Ok(()) }
    /// ```
    pub async fn invalidate_many<K: AsRef<str>>(&self, keys: &[K]) -> Result<()> {
        let inner = &*self.inner;
        let mut all = Vec::with_capacity(keys.len());
        for key in keys {
            let key = key.as_ref();
            keys::check_key(&inner.key_prefix, key, inner.max_key_len)?;
            all.push(Keys::new(&inner.key_prefix, key));
        }
        if all.is_empty() {
            return Ok(());
        }
        // Fences first: a load already running must not store what it read
        // before the change.
        let fences: Vec<&str> = all.iter().map(|k| k.fence.as_str()).collect();
        inner.value_store.delete_many(&fences).await?;
        let values: Vec<&str> = all.iter().map(|k| k.value.as_str()).collect();
        inner.value_store.delete_many(&values).await?;
        inner.changed_many(values.into_iter()).await;
        Ok(())
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
pub(super) struct Led<'f, V> {
    pub(super) at: usize,
    pub(super) key: String,
    pub(super) keys: Keys,
    pub(super) leader: Option<Leader<'f>>,
    pub(super) refresh: Option<(Replacing, Got<V>)>,
    /// The stale value was already served (a batch that answered early).
    pub(super) served: bool,
}

impl<C: Codec> Inner<C> {
    /// `set_many` with `ttl`, and the stale window and tags of `options` (as
    /// `set_with` stores one key).
    pub(super) async fn set_many<K: AsRef<str>, T: Serialize>(
        &self,
        entries: &[(K, T)],
        ttl: Duration,
        options: &Resolved,
    ) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let meta_for = |value: &T| Meta {
            stale_for: options.stale_for,
            load_time: Duration::ZERO,
            absent: codec::is_absent(value),
        };
        let marks = self.marks_for(&options.tags).await?;
        let mut encoded = Vec::with_capacity(entries.len());
        for (key, value) in entries {
            let key = key.as_ref();
            keys::check_key(&self.key_prefix, key, self.max_key_len)?;
            let bytes = self.encode(key, value, &meta_for(value), marks.as_ref())?;
            encoded.push((Keys::new(&self.key_prefix, key), bytes));
        }
        let fences: Vec<&str> = encoded.iter().map(|(k, _)| k.fence.as_str()).collect();
        self.value_store.delete_many(&fences).await?;
        let key_ttl = self.key_ttl(ttl + options.stale_for, marks.as_ref());
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
    pub(super) async fn changed_many<'a>(&self, value_keys: impl Iterator<Item = &'a str>) {
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
    pub(super) async fn read_many<V: DeserializeOwned>(
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
}

/// Adds `n` to a counter.
pub(super) fn add_n(counter: &crate::stats::Counter, n: usize) {
    counter.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
}
