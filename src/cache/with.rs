//! [`With`]: `get_or_load` calls with their own [`CallOptions`], from
//! [`LockedCache::with`].

use std::future::Future;
use std::pin::Pin;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::load::Spawnable;
use super::{CallOptions, LoadContext, LockedCache};
use crate::codec::Codec;
use crate::error::LoadError;
use crate::telemetry::Outcome;

/// A cache with per-call [`CallOptions`]: the `get_or_load` methods of
/// [`LockedCache`], for loaders that are `Send + 'static`, so that a refresh
/// can run in the background (the caller returns the stale value at once) and
/// a load can be detached from its caller. Made by [`LockedCache::with`];
/// cheap, and reusable for many calls.
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
///   [`Error::LoadTimeout`](crate::Error::LoadTimeout) when it passes;
/// - options out of range are [`Error::InvalidConfig`](crate::Error::InvalidConfig).
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

    /// As [`LockedCache::get_or_load_with`], with these options: the loader gets
    /// a [`LoadContext`].
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

    /// As [`LockedCache::get_or_load_with_outcome`], with these options: also
    /// tells how the call was served ([`Outcome::Stale`] and
    /// [`Outcome::FailSafe`] included).
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
        let inner = &self.cache.inner;
        let options = self.options.or(inner.call_options).resolve(inner.ttl)?;
        // Boxed as `Send` here, where the compiler proves it once for any `T`,
        // `E` and loader (a caller's `tokio::spawn` of this future otherwise
        // trips over rustc's higher-ranked lifetime check of nested spawns).
        let call: Pin<Box<dyn Future<Output = _> + Send + '_>> =
            Box::pin(inner.traced_call(key, Spawnable(loader), &options));
        call.await
    }
}
