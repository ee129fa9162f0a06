//! The load calls with their own [`CallOptions`]: [`With`], from
//! [`LockedCache::with`]. Every value kind the plain calls have (an owned
//! `T`, a shared `Arc<T>`, bytes) with the same names, each with or without
//! its [`Outcome`], and an infallible form; all of them go down one path,
//! `Inner::traced_call`, as the plain calls do.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::bytes::Blob;
use super::flight::Sharing;
use super::load::Spawnable;
use super::many_load::AbortOnDrop;
use super::shared::Shared;
use super::{CallOptions, LoadContext, LockedCache};
use crate::codec::Codec;
use crate::error::{Error, LoadError};
use crate::telemetry::Outcome;

/// The cache's load calls with per-call [`CallOptions`], for loaders that
/// are `Send + 'static` (move what they need into them), so that a refresh
/// can run in the background (the caller returns the stale value at once) and
/// a load can be detached from its caller. Made by [`LockedCache::with`];
/// cheap, and reusable for many calls.
///
/// It has the plain calls' names: [`get_or_load`](With::get_or_load) (an
/// owned value), [`get_or_load_shared`](With::get_or_load_shared) (`Arc<T>`,
/// the near cache's kind), [`get_or_load_cloned`](With::get_or_load_cloned)
/// (an owned clone of the near cache's value),
/// [`get_or_load_bytes`](With::get_or_load_bytes) (a blob), each but
/// `get_or_load_cloned` also `_with_outcome`, and
/// [`get_or_compute`](With::get_or_compute) for a loader that cannot fail.
///
/// What the calls do around an expiry is told by [`CallOptions`]; errors,
/// concurrency and cancellation are as for [`LockedCache::get_or_load`], plus:
///
/// - a stale value is returned at once (as [`Outcome::Stale`]) when the call
///   accepts it; a refresh failure is logged and counted
///   ([`background_errors`](crate::StatsSnapshot::background_errors)), never
///   returned;
/// - with [`detached`](CallOptions::detached) loads (the default), dropping the
///   call's future does not stop a load it started: the load stores its value
///   and releases the lock, and callers waiting on it get the value;
/// - the [`hard_timeout`](CallOptions::hard_timeout) bounds the call, and is
///   [`Error::LoadTimeout`] when it passes;
/// - options out of range are [`Error::InvalidConfig`].
#[derive(Debug)]
pub struct With<'a, C> {
    cache: &'a LockedCache<C>,
    options: CallOptions,
}

impl<'a, C: Codec> With<'a, C> {
    pub(super) fn new(cache: &'a LockedCache<C>, options: CallOptions) -> With<'a, C> {
        With { cache, options }
    }

    /// As [`LockedCache::get_or_load`], with these options.
    pub async fn get_or_load<T, E, F, Fut>(&self, key: &str, loader: F) -> Result<T, LoadError<E>>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let (value, _) = self.get_or_load_with_outcome(key, |_| loader()).await?;
        Ok(value)
    }

    /// As [`LockedCache::get_or_compute`], with these options: a loader that
    /// cannot fail, and the cache's [`Error`] as the only error.
    pub async fn get_or_compute<T, F, Fut>(&self, key: &str, compute: F) -> Result<T, Error>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + Send + 'static,
    {
        let loaded = self
            .get_or_load_with_outcome(key, |_| async move {
                Ok::<_, std::convert::Infallible>(compute().await)
            })
            .await;
        loaded.map(|(value, _)| value).map_err(super::infallible)
    }

    /// As [`LockedCache::get_or_load_with`], with these options.
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
        F: FnOnce(LoadContext) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let (value, _) = self.get_or_load_with_outcome(key, loader).await?;
        Ok(value)
    }

    /// As [`LockedCache::get_or_load_with_outcome`], with these options: the
    /// loader gets its [`LoadContext`], and the call tells how it was served
    /// ([`Outcome::Stale`] and [`Outcome::FailSafe`] included).
    pub async fn get_or_load_with_outcome<T, E, F, Fut>(
        &self,
        key: &str,
        loader: F,
    ) -> Result<(T, Outcome), LoadError<E>>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        E: Send + Sync + 'static,
        F: FnOnce(LoadContext) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        self.call(key, loader, None).await
    }

    /// As [`LockedCache::get_or_load_shared`], with these options: the value
    /// as an `Arc<T>`, from the near cache when it holds a fresh one.
    pub async fn get_or_load_shared<T, E, F, Fut>(
        &self,
        key: &str,
        loader: F,
    ) -> Result<Arc<T>, LoadError<E>>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let (value, _) = self
            .get_or_load_shared_with_outcome(key, |_| loader())
            .await?;
        Ok(value)
    }

    /// As [`LockedCache::get_or_load_shared_with_outcome`], with these
    /// options.
    pub async fn get_or_load_shared_with_outcome<T, E, F, Fut>(
        &self,
        key: &str,
        loader: F,
    ) -> Result<(Arc<T>, Outcome), LoadError<E>>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: FnOnce(LoadContext) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        #[cfg(feature = "near-cache")]
        if let Some(Some(value)) = self.cache.near_get::<T>(key).await? {
            return Ok((value, Outcome::Hit));
        }
        let loader =
            move |context| async move { loader(context).await.map(|v| Shared(Arc::new(v))) };
        let (Shared(value), outcome) = self.call(key, loader, Some(Shared::<T>::SHARING)).await?;
        Ok((value, outcome))
    }

    /// As [`LockedCache::get_or_load_cloned`], with these options: an owned
    /// value, a clone of the near cache's when it holds a fresh one.
    pub async fn get_or_load_cloned<T, E, F, Fut>(
        &self,
        key: &str,
        loader: F,
    ) -> Result<T, LoadError<E>>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let (value, _) = self
            .get_or_load_shared_with_outcome(key, |_| loader())
            .await?;
        Ok(Arc::unwrap_or_clone(value))
    }

    /// As [`LockedCache::get_or_load_bytes`], with these options: a blob,
    /// stored as bytes and read back with one copy.
    pub async fn get_or_load_bytes<E, F, Fut>(
        &self,
        key: &str,
        loader: F,
    ) -> Result<Vec<u8>, LoadError<E>>
    where
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<u8>, E>> + Send + 'static,
    {
        let (value, _) = self
            .get_or_load_bytes_with_outcome(key, |_| loader())
            .await?;
        Ok(value)
    }

    /// As [`LockedCache::get_or_load_bytes_with_outcome`], with these
    /// options.
    pub async fn get_or_load_bytes_with_outcome<E, F, Fut>(
        &self,
        key: &str,
        loader: F,
    ) -> Result<(Vec<u8>, Outcome), LoadError<E>>
    where
        E: Send + Sync + 'static,
        F: FnOnce(LoadContext) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<u8>, E>> + Send + 'static,
    {
        let loader = move |context| async move { loader(context).await.map(Blob) };
        let (Blob(value), outcome) = self.call(key, loader, None).await?;
        Ok((value, outcome))
    }

    /// As [`LockedCache::set`], with these options: their TTL, stale window
    /// and tags.
    pub async fn set<T: Serialize>(&self, key: &str, value: &T) -> Result<(), Error> {
        let inner = &self.cache.inner;
        super::keys::check_key(&inner.key_prefix, key, inner.max_key_len)?;
        let options = self.options.or(inner.call_options).resolve(inner.ttl)?;
        inner.set_with(key, value, options.ttl, &options).await
    }

    /// As [`LockedCache::set_bytes`], with these options.
    pub async fn set_bytes(&self, key: &str, value: &[u8]) -> Result<(), Error> {
        self.set(key, &super::bytes::BlobRef(value)).await
    }

    /// As [`LockedCache::get_or_load_many`], with these options (TTL, negative
    /// TTL, stale window, fail-safe, early refresh, jitter, hard timeout).
    ///
    /// The call runs on a task of its own. With
    /// [`detached`](CallOptions::detached) loads (the default) dropping its
    /// future does not stop it, so the keys it locked are loaded, stored and
    /// released for the callers waiting on them; without, dropping it stops
    /// the task as if the call ran in place.
    ///
    /// **Stale values are not waited for**: a batch whose only unfresh keys
    /// are stale (past their TTL, within the stale window) or picked for an
    /// early refresh answers at once, with those values, and refreshes them
    /// afterwards in one loader call, bounded by the background timeout (a
    /// failure is logged and counted in
    /// [`background_errors`](crate::StatsSnapshot::background_errors); the
    /// values in Redis stay as they were). A batch that also has misses
    /// waits for them, and refreshes its stale keys in the same loader call.
    ///
    /// The loader must be `Send + 'static` and may be called more than once
    /// (`FnMut`: a key taken over from a holder that died is loaded in a
    /// call of its own). So it owns what it uses, an `Arc` of your database
    /// handle for example, and clones that into each call's future:
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> anyhow::Result<()> {
    /// use std::collections::HashMap;
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use locked_cache::{CallOptions, LockedCache};
    ///
    /// struct Db; // your pool
    /// impl Db {
    ///     async fn names(&self, ids: &[String]) -> anyhow::Result<HashMap<String, String>> {
    ///         Ok(ids.iter().map(|id| (id.clone(), format!("name of {id}"))).collect())
    ///     }
    /// }
    ///
    /// let cache = LockedCache::builder().build().await?;
    /// let db = Arc::new(Db);
    /// let ids = ["u1", "u2", "u3"];
    /// let names: Vec<Option<String>> = cache
    ///     .with(CallOptions::new().stale_for(Duration::from_secs(60)))
    ///     .get_or_load_many(&ids, move |missing: Vec<String>| {
    ///         let db = Arc::clone(&db);
    ///         async move { db.names(&missing).await }
    ///     })
    ///     .await?;
    /// assert_eq!(names[1].as_deref(), Some("name of u2"));
    /// # Ok(()) }
    /// ```
    pub async fn get_or_load_many<K, T, E, F, Fut, R>(
        &self,
        keys: &[K],
        loader: F,
    ) -> Result<Vec<Option<T>>, LoadError<E>>
    where
        K: AsRef<str>,
        T: Serialize + DeserializeOwned + Send + 'static,
        E: Send + Sync + 'static,
        F: FnMut(Vec<String>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<R, E>> + Send + 'static,
        R: IntoIterator<Item = (String, T)> + Send + 'static,
    {
        self.get_or_load_many_each(keys, loader)
            .await?
            .into_iter()
            .collect()
    }

    /// As [`LockedCache::get_or_load_many_each`], with these options: each
    /// key's own result.
    pub async fn get_or_load_many_each<K, T, E, F, Fut, R>(
        &self,
        keys: &[K],
        loader: F,
    ) -> Result<Vec<Result<Option<T>, LoadError<E>>>, Error>
    where
        K: AsRef<str>,
        T: Serialize + DeserializeOwned + Send + 'static,
        E: Send + Sync + 'static,
        F: FnMut(Vec<String>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<R, E>> + Send + 'static,
        R: IntoIterator<Item = (String, T)> + Send + 'static,
    {
        let inner = Arc::clone(&self.cache.inner);
        let options = self.options.or(inner.call_options).resolve(inner.ttl)?;
        let keys: Vec<String> = keys.iter().map(|k| k.as_ref().to_owned()).collect();
        // The call runs on a task of its own, which answers through `tx`: at
        // its end, or, for a batch whose only unfresh keys are stale, at once
        // (then it goes on to refresh them).
        let (tx, rx) = tokio::sync::oneshot::channel();
        let call = async move {
            let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
            let mut early = Some(tx);
            let answers = inner
                .many(&refs, loader, &options, None, None, &mut early)
                .await;
            if let Some(tx) = early {
                let _ = tx.send(answers);
            }
        };
        let task = tokio::spawn(tracing::Instrument::in_current_span(call));
        // Not detached: dropping this call's future stops the task, as if it
        // ran in place, until it has answered.
        let stop = (!options.detached).then(|| AbortOnDrop::new(&task));
        // The hard timeout is applied in the task (it ends the call there).
        let answered = rx.await;
        match answered {
            Ok(answers) => {
                if let Some(stop) = stop {
                    stop.disarm();
                }
                answers
            }
            // The task ended without answering: it panicked (resumed here).
            Err(_) => match task.await {
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                _ => Err(Error::Abandoned),
            },
        }
    }

    /// As [`LockedCache::set_many`], with these options' TTL, stale window
    /// and tags (as [`set`](Self::set) stores one key).
    pub async fn set_many<K: AsRef<str>, T: Serialize>(
        &self,
        entries: &[(K, T)],
    ) -> Result<(), Error> {
        let inner = &self.cache.inner;
        let options = self.options.or(inner.call_options).resolve(inner.ttl)?;
        inner.set_many(entries, options.ttl, &options).await
    }

    /// The one path of every call above: these options resolved against the
    /// cache's, then the cache's own call.
    async fn call<T, E, F, Fut>(
        &self,
        key: &str,
        loader: F,
        sharing: Option<Sharing<T>>,
    ) -> Result<(T, Outcome), LoadError<E>>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        E: Send + Sync + 'static,
        F: FnOnce(LoadContext) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let inner = &self.cache.inner;
        let options = self.options.or(inner.call_options).resolve(inner.ttl)?;
        // Boxed as `Send` here, where the compiler proves it once for any `T`,
        // `E` and loader (a caller's `tokio::spawn` of this future otherwise
        // trips over rustc's higher-ranked lifetime check of nested spawns).
        let call: Pin<Box<dyn Future<Output = _> + Send + '_>> =
            Box::pin(inner.traced_call(key, Spawnable(loader), &options, sharing));
        call.await
    }
}
