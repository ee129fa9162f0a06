//! Values handed out as `Arc<T>`: [`LockedCache::get_or_load_shared`] and
//! [`LockedCache::get_shared`], the calls the near cache (`local.rs`, feature
//! `near-cache`) answers from memory, and [`LockedCache::get_or_load_cloned`],
//! which hands out a clone of the same kept value. Without a near cache they behave as
//! `get_or_load` and `get`, the value wrapped in an `Arc`, except that the
//! followers of a flight share its leader's `Arc` instead of each decoding the
//! stored bytes (`flight::Sharing`).

use std::future::Future;
use std::sync::Arc;

use serde::de::{DeserializeOwned, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

#[cfg(feature = "near-cache")]
use std::time::Duration;

use super::flight::Sharing;
#[cfg(feature = "near-cache")]
use super::freshness::{self, Freshness};
#[cfg(feature = "near-cache")]
use super::keys;
use super::keys::ValueKey;
use super::load::Inline;
use super::{Found, Inner, LoadContext, LockedCache};
use crate::codec::Codec;
use crate::error::{LoadError, Result};
#[cfg(feature = "near-cache")]
use crate::stats::Stats;
use crate::telemetry::Outcome;

impl<C: Codec> LockedCache<C> {
    /// As [`get_or_load`](Self::get_or_load), handing out the value as an
    /// `Arc<T>`. With the [near cache](crate::Builder::near_cache) on, a value
    /// read or loaded once is kept decoded in this process: the next calls for
    /// the key return a clone of the `Arc` with no round trip and no decode,
    /// until the key is written by any process (`set`, `invalidate`, a stored
    /// load publish an invalidation) or the near cache TTL passes. Without it,
    /// `get_or_load`, with one decode per flight: concurrent callers of this
    /// process share the `Arc` their flight's leader decoded.
    ///
    /// A near cache hit counts in [`near_hits`](crate::StatsSnapshot::near_hits)
    /// (not in `hits`), reports [`Outcome::Hit`], and opens no span.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::sync::Arc;
    /// use locked_cache::LockedCache;
    ///
    /// let cache = LockedCache::builder().build().await?;
    /// let config: Arc<Vec<String>> = cache
    ///     .get_or_load_shared("config", || async { Ok::<_, std::io::Error>(vec!["a".to_owned()]) })
    ///     .await?;
    /// assert_eq!(config[0], "a");
    /// # Ok(()) }
    /// ```
    pub async fn get_or_load_shared<T, E, F, Fut>(
        &self,
        key: &str,
        loader: F,
    ) -> Result<Arc<T>, LoadError<E>>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let (value, _) = self
            .get_or_load_shared_with_outcome(key, |_| loader())
            .await?;
        Ok(value)
    }

    /// As [`get_or_load_shared`](Self::get_or_load_shared), with the loader's
    /// [`LoadContext`] and the call's [`Outcome`] (see
    /// [`get_or_load_with_outcome`](Self::get_or_load_with_outcome)).
    pub async fn get_or_load_shared_with_outcome<T, E, F, Fut>(
        &self,
        key: &str,
        loader: F,
    ) -> Result<(Arc<T>, Outcome), LoadError<E>>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: FnOnce(LoadContext) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        // On a near miss the flight's leader reads Redis, and keeps the value
        // if it is fresh (`Inner::near_keep`); a value it loads is kept by the
        // next read.
        #[cfg(feature = "near-cache")]
        if let Some(Some(value)) = self.near_get::<T>(key).await? {
            return Ok((value, Outcome::Hit));
        }
        let loader =
            Inline(|context| async move { loader(context).await.map(|v| Shared(Arc::new(v))) });
        let (Shared(value), outcome) = self
            .inner
            .traced_call(
                key,
                loader,
                &self.inner.defaults,
                Some(Shared::<T>::SHARING),
            )
            .await?;
        Ok((value, outcome))
    }

    /// As [`get_or_load`](Self::get_or_load), for a value that is `Clone`:
    /// the call to use with the [near cache](crate::Builder::near_cache) for
    /// owned values. The near cache keeps the value decoded (as
    /// [`get_or_load_shared`](Self::get_or_load_shared) does, and in the same
    /// entry: the two calls share it), and a near hit hands out a clone of it:
    /// no round trip and no decode. `get_or_load` itself never uses the near
    /// cache (a near hit there would decode the bytes again, which costs about
    /// as much as the round trip it saves).
    ///
    /// A near hit costs a clone of `T` (for a 1 KiB `Vec<u8>`, one allocation
    /// and a copy). A call that reads Redis decodes once and, when the value
    /// is kept, clones it once more. Without a near cache it is
    /// `get_or_load_shared` unwrapped: the `Arc` is taken apart when nothing
    /// else holds it, else cloned. Concurrency, errors, cancellation and
    /// panics are as for [`get_or_load`](Self::get_or_load); near hits are
    /// counted and reported as for `get_or_load_shared`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use locked_cache::LockedCache;
    ///
    /// let cache = LockedCache::builder().build().await?;
    /// let names: Vec<String> = cache
    ///     .get_or_load_cloned("names", || async { Ok::<_, std::io::Error>(vec!["a".to_owned()]) })
    ///     .await?;
    /// assert_eq!(names, ["a"]);
    /// # Ok(()) }
    /// ```
    pub async fn get_or_load_cloned<T, E, F, Fut>(
        &self,
        key: &str,
        loader: F,
    ) -> Result<T, LoadError<E>>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let (value, _) = self
            .get_or_load_cloned_with_outcome(key, |_| loader())
            .await?;
        Ok(value)
    }

    /// As [`get_or_load_cloned`](Self::get_or_load_cloned), with the loader's
    /// [`LoadContext`] and the call's [`Outcome`] (see
    /// [`get_or_load_with_outcome`](Self::get_or_load_with_outcome)).
    pub async fn get_or_load_cloned_with_outcome<T, E, F, Fut>(
        &self,
        key: &str,
        loader: F,
    ) -> Result<(T, Outcome), LoadError<E>>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: FnOnce(LoadContext) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        #[cfg(feature = "near-cache")]
        if let Some(Some(value)) = self.near_get::<T>(key).await? {
            return Ok((T::clone(&value), Outcome::Hit));
        }
        let (value, outcome) = self.get_or_load_shared_with_outcome(key, loader).await?;
        Ok((Arc::unwrap_or_clone(value), outcome))
    }

    /// As [`get`](Self::get), handing out the value as an `Arc<T>`, from the
    /// near cache when it holds the key (and keeping what it read there).
    pub async fn get_shared<T>(&self, key: &str) -> Result<Option<Arc<T>>>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        #[cfg(feature = "near-cache")]
        match self.near_get::<T>(key).await? {
            Some(Some(value)) => return Ok(Some(value)),
            Some(None) => {
                let value_key = ValueKey::new(&self.inner.key_prefix, key);
                if let Some(value) = self.near_fill::<T>(value_key).await? {
                    return Ok(Some(value));
                }
            }
            None => {}
        }
        Ok(self.get::<Shared<T>>(key).await?.map(|s| s.0))
    }

    /// The near cache's value for `key`: `None` without a near cache,
    /// `Some(None)` when it does not hold the key. The near cache is keyed by
    /// the cache key itself, so a lookup builds nothing. A near hit never
    /// waits, so it takes part in tokio's cooperative budget: a loop of hits
    /// yields now and then, as a loop of Redis reads would, instead of
    /// starving the worker.
    #[cfg(feature = "near-cache")]
    pub(super) async fn near_get<T>(&self, key: &str) -> Result<Option<Option<Arc<T>>>>
    where
        T: Send + Sync + 'static,
    {
        let inner = &*self.inner;
        let Some(near) = &inner.near else {
            return Ok(None);
        };
        keys::check_key(&inner.key_prefix, key, inner.max_key_len)?;
        let value = near.local.get::<T>(key);
        if value.is_some() {
            tokio::task::consume_budget().await;
        }
        Ok(Some(value))
    }

    /// The near cache's value for `key`, if it holds one of type `T`; never
    /// reads Redis. For tests and the staleness bench.
    #[cfg(feature = "near-cache")]
    #[doc(hidden)]
    pub fn near_peek<T: Send + Sync + 'static>(&self, key: &str) -> Option<Arc<T>> {
        let near = self.inner.near.as_ref()?;
        near.local.peek::<T>(key)
    }

    /// Whether the near cache's invalidation subscription is up (false without
    /// a near cache). For tests and diagnostics.
    #[cfg(feature = "near-cache")]
    #[doc(hidden)]
    pub fn near_is_live(&self) -> bool {
        self.inner.near.as_ref().is_some_and(|n| n.local.is_live())
    }

    /// After a near cache miss outside a flight (`get_shared`): reads the
    /// value with its time left (`GET` + `PTTL`, one round trip), keeps it if
    /// it is fresh, and returns it as a hit. `None` when it is missing, stale
    /// or a cached "not found": the caller takes the full path.
    #[cfg(feature = "near-cache")]
    async fn near_fill<T>(&self, value_key: ValueKey<'_>) -> Result<Option<Arc<T>>>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        let inner = &*self.inner;
        let keep = inner.near_ticket(value_key, Some(Shared::<T>::SHARING));
        let Some(found) = inner.read::<Shared<T>>(value_key, true).await? else {
            return Ok(None);
        };
        if found.meta.absent
            || freshness::judge(&found.meta, found.ttl_left, &inner.defaults, 0.0)
                != Freshness::Fresh
        {
            return Ok(None);
        }
        Stats::add(&inner.stats.hits);
        inner.near_keep(&found, keep);
        Ok(Some(found.value.0))
    }
}

/// What a call needs to keep the value it is about to read in the near
/// cache: the key's invalidation epochs before the read, and how to share
/// the decoded value.
pub(super) struct Keep<T> {
    #[cfg(feature = "near-cache")]
    ticket: super::local::Ticket,
    /// The cache key (the near cache's key), for the insert.
    #[cfg(feature = "near-cache")]
    key: String,
    #[cfg(feature = "near-cache")]
    sharing: Sharing<T>,
    #[cfg(not(feature = "near-cache"))]
    never: std::convert::Infallible,
    #[cfg(not(feature = "near-cache"))]
    _type: std::marker::PhantomData<T>,
}

impl<C: Codec> Inner<C> {
    /// Before reading `value_key` for a call that shares its value: what
    /// keeping it in the near cache takes (`None`: no near cache, or a call
    /// that does not share its value).
    pub(super) fn near_ticket<T>(
        &self,
        value_key: ValueKey<'_>,
        sharing: Option<Sharing<T>>,
    ) -> Option<Keep<T>> {
        #[cfg(feature = "near-cache")]
        if let (Some(near), Some(sharing)) = (&self.near, sharing) {
            let key = value_key.key();
            return Some(Keep {
                ticket: near.local.ticket(key),
                key: key.to_owned(),
                sharing,
            });
        }
        let _ = (value_key, sharing);
        None
    }

    /// A fresh value read under `keep`: kept in the near cache for at most
    /// its remaining freshness (its time left in Redis less its stale window),
    /// so the near cache never serves a value Redis would call stale. Cached
    /// "not found"s are not kept.
    pub(super) fn near_keep<T>(&self, found: &Found<T>, keep: Option<Keep<T>>) {
        #[cfg(feature = "near-cache")]
        if let (Some(near), Some(keep)) = (&self.near, keep) {
            if found.meta.absent {
                return;
            }
            // No expiry in Redis: the near cache's own TTL bounds it.
            let fresh_left = found.ttl_left.map_or(Duration::MAX, |left| {
                left.saturating_sub(found.meta.stale_for)
            });
            near.local.insert_erased(
                &keep.key,
                (keep.sharing.share)(&found.value),
                found.stored_len,
                fresh_left,
                keep.ticket,
            );
        }
        #[cfg(not(feature = "near-cache"))]
        if let Some(keep) = keep {
            match keep.never {}
        }
        let _ = found;
    }
}

/// A `T` behind an `Arc`, stored exactly as `T` is.
pub(super) struct Shared<T>(pub(super) Arc<T>);

impl<T: Send + Sync + 'static> Shared<T> {
    /// The flight's followers share the leader's `Arc`: one decode per flight.
    pub(super) const SHARING: Sharing<Shared<T>> = Sharing {
        share: |value| Arc::clone(&value.0) as Arc<dyn std::any::Any + Send + Sync>,
        take: |shared| Arc::clone(shared).downcast::<T>().ok().map(Shared),
    };
}

impl<T: Serialize> Serialize for Shared<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Shared<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        T::deserialize(deserializer).map(|v| Shared(Arc::new(v)))
    }
}
