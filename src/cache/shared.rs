//! Values handed out as `Arc<T>`: [`LockedCache::get_or_load_shared`] and
//! [`LockedCache::get_shared`], the calls the near cache (`local.rs`, feature
//! `near-cache`) answers from memory. Without a near cache they behave as
//! `get_or_load` and `get`, the value wrapped in an `Arc`.

use std::future::Future;
use std::sync::Arc;

use serde::de::{DeserializeOwned, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

#[cfg(feature = "near-cache")]
use std::time::Duration;

#[cfg(feature = "near-cache")]
use super::freshness::{self, Freshness};
#[cfg(feature = "near-cache")]
use super::keys;
#[cfg(feature = "near-cache")]
use super::local::Near;
use super::{LoadContext, LockedCache};
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
    /// exactly `get_or_load`.
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
        #[cfg(feature = "near-cache")]
        if let Some(near) = &self.inner.near {
            let inner = &*self.inner;
            keys::check_key(&inner.key_prefix, key, inner.max_key_len)?;
            let value_key = keys::value_key(&inner.key_prefix, key);
            if let Some(value) = near.local.get::<T>(&value_key) {
                // A near hit never waits: take part in tokio's cooperative
                // budget so that a loop of hits yields now and then, as a loop
                // of Redis reads would, instead of starving the worker.
                tokio::task::consume_budget().await;
                return Ok((value, Outcome::Hit));
            }
            if let Some(value) = self.near_fill::<T>(near, &value_key).await? {
                return Ok((value, Outcome::Hit));
            }
            // Missing, stale or not fresh enough for the near cache: the full
            // path (lock, load, stale-while-revalidate), nothing kept; the
            // next call's read keeps the value then stored.
        }
        let (Shared(value), outcome) = self
            .get_or_load_with_outcome(key, |context| async move {
                loader(context).await.map(|v| Shared(Arc::new(v)))
            })
            .await?;
        Ok((value, outcome))
    }

    /// As [`get`](Self::get), handing out the value as an `Arc<T>`, from the
    /// near cache when it holds the key (and keeping what it read there).
    pub async fn get_shared<T>(&self, key: &str) -> Result<Option<Arc<T>>>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        #[cfg(feature = "near-cache")]
        if let Some(near) = &self.inner.near {
            let inner = &*self.inner;
            keys::check_key(&inner.key_prefix, key, inner.max_key_len)?;
            let value_key = keys::value_key(&inner.key_prefix, key);
            if let Some(value) = near.local.get::<T>(&value_key) {
                tokio::task::consume_budget().await;
                return Ok(Some(value));
            }
            if let Some(value) = self.near_fill::<T>(near, &value_key).await? {
                return Ok(Some(value));
            }
        }
        Ok(self.get::<Shared<T>>(key).await?.map(|s| s.0))
    }

    /// The near cache's value for `key`, if it holds one of type `T`; never
    /// reads Redis. For tests and the staleness bench.
    #[cfg(feature = "near-cache")]
    #[doc(hidden)]
    pub fn near_peek<T: Send + Sync + 'static>(&self, key: &str) -> Option<Arc<T>> {
        let near = self.inner.near.as_ref()?;
        near.local
            .peek::<T>(&keys::value_key(&self.inner.key_prefix, key))
    }

    /// Whether the near cache's invalidation subscription is up (false without
    /// a near cache). For tests and diagnostics.
    #[cfg(feature = "near-cache")]
    #[doc(hidden)]
    pub fn near_is_live(&self) -> bool {
        self.inner.near.as_ref().is_some_and(|n| n.local.is_live())
    }

    /// After a near cache miss: reads the value with its time left (`GET` +
    /// `PTTL`, one round trip) and, if it is fresh, keeps it for at most its
    /// remaining freshness (so the near cache never serves a value Redis
    /// would call stale) and returns it as a hit. `None` when it is missing,
    /// stale, or a cached "not found": the caller takes the full path.
    #[cfg(feature = "near-cache")]
    async fn near_fill<T>(&self, near: &Near, value_key: &str) -> Result<Option<Arc<T>>>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        let inner = &*self.inner;
        let ticket = near.local.ticket(value_key);
        let Some(found) = inner.read::<Shared<T>>(value_key, true).await? else {
            return Ok(None);
        };
        let options = &inner.defaults;
        if found.meta.absent
            || freshness::judge(&found.meta, found.ttl_left, options, 0.0) != Freshness::Fresh
        {
            return Ok(None);
        }
        Stats::add(&inner.stats.hits);
        // No expiry in Redis: the near cache's own TTL bounds it.
        let fresh_left = found.ttl_left.map_or(Duration::MAX, |left| {
            left.saturating_sub(found.meta.stale_for)
        });
        let value = found.value.0;
        near.local.insert(
            value_key,
            Arc::clone(&value),
            found.bytes.len(),
            fresh_left,
            ticket,
        );
        Ok(Some(value))
    }
}

/// A `T` behind an `Arc`, stored exactly as `T` is.
struct Shared<T>(Arc<T>);

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
