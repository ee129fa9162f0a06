//! Refreshes and detached loads: the work a call starts but need not wait for.
//!
//! - A call that finds a stale value (or one early refresh picked) tries the
//!   key's lock once. Whoever gets it refreshes; everyone else, in every
//!   process, returns the value they hold. With a `Send + 'static` loader the
//!   refresh runs on a task of its own and the caller returns at once; with a
//!   borrowing loader the caller refreshes before it returns (bounded by the
//!   soft timeout), and a failure returns the value it held (fail-safe).
//! - A detached miss runs its load on a task of its own, which stores the
//!   value and releases the lock even if the caller went away; the caller
//!   waits for it, bounded by the hard timeout.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use futures_util::FutureExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;

use super::keys::Keys;
use super::load::{Detached, Led, Loader};
use super::options::Resolved;
use super::{Found, Inner, Replacing};
use crate::codec::Codec;
use crate::error::{Error, LoadError};
use crate::lock::Attempt;
use crate::stats::Stats;
use crate::telemetry::{CallTrace, Outcome};

impl<C: Codec> Inner<C> {
    /// `found` is stale (`served` = [`Outcome::Stale`]) or early refresh picked
    /// it (`served` = [`Outcome::Hit`]): refresh it if this call gets the lock,
    /// and return what the caller gets.
    pub(super) async fn refresh<T, E, L>(
        self: &Arc<Self>,
        key: &str,
        keys: Keys,
        found: Found<T>,
        loader: L,
        options: &Resolved,
        served: Outcome,
    ) -> Result<Led<T>, LoadError<E>>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        E: Send + Sync + 'static,
        L: Loader<Output = std::result::Result<T, E>>,
    {
        let guard = match self
            .lock
            .attempt(&keys.lock, self.lock.options().expiry)
            .await
        {
            Ok(Attempt::Acquired(guard)) => guard,
            // Someone holds the lock: they refresh. Or too few masters answered:
            // nobody refreshes now, and the value at hand is served either way.
            Ok(_) => return Ok(Led::unlocked(found.value, found.bytes, served)),
            Err(e) => {
                tracing::debug!(key = keys.value, error = %e, "the lock for a refresh failed; serving the value at hand");
                return Ok(Led::unlocked(found.value, found.bytes, served));
            }
        };
        Stats::add(&self.stats.refreshes);
        let replacing = Replacing::of(&found);
        let loader = match loader.detach() {
            Ok(detached) => {
                self.spawn_refresh(key, keys, guard, detached, options, replacing);
                return Ok(Led::unlocked(found.value, found.bytes, served));
            }
            Err(loader) => loader,
        };
        // The loader borrows from the caller: the caller refreshes, bounded by
        // the soft (and hard) timeout; everyone else serves the value at hand.
        let refresh = self.load_locked(key, &keys, guard, loader, options, Some(&replacing));
        let limit = match (options.soft_timeout, options.hard_timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let refreshed = match limit {
            None => refresh.await,
            Some(limit) => match tokio::time::timeout(limit, refresh).await {
                Ok(refreshed) => refreshed,
                Err(_) => Err(LoadError::Cache(Error::LoadTimeout {
                    key: key.to_owned(),
                    timeout: limit,
                })),
            },
        };
        match refreshed {
            Ok(led) => Ok(led),
            // Early refresh of a fresh value: it is still fresh, serve it.
            Err(e) if served == Outcome::Hit => {
                tracing::warn!(key = keys.value, error = %e, "early refresh failed; the value is still fresh");
                Ok(Led::unlocked(found.value, found.bytes, Outcome::Hit))
            }
            Err(e) if options.fail_safe => {
                Stats::add(&self.stats.fail_safe_served);
                tracing::warn!(key = keys.value, error = %e, "refreshing a stale value failed; serving the stale value (fail-safe)");
                Ok(Led::unlocked(found.value, found.bytes, Outcome::FailSafe))
            }
            Err(e) => Err(e),
        }
    }

    /// Runs a refresh under `guard` on a task of its own: it stores the value
    /// (fenced) and releases the lock; a failure is logged and counted, and the
    /// value in Redis is left as it was.
    fn spawn_refresh<T, E>(
        self: &Arc<Self>,
        key: &str,
        keys: Keys,
        guard: crate::lock::LockGuard,
        loader: Detached<std::result::Result<T, E>>,
        options: &Resolved,
        replacing: Replacing,
    ) where
        T: Serialize + DeserializeOwned + Send + 'static,
        E: Send + Sync + 'static,
    {
        let inner = Arc::clone(self);
        let key = key.to_owned();
        let options = *options;
        tokio::spawn(async move {
            let refresh = inner.load_locked(&key, &keys, guard, loader, &options, Some(&replacing));
            match AssertUnwindSafe(refresh).catch_unwind().await {
                Ok(Ok(led)) => drop(led.finish().await),
                Ok(Err(e)) => inner.background_failed(&keys, &e.to_string()),
                // The lock is released by its guard's drop; the panic was
                // reported by the panic hook.
                Err(_) => inner.background_failed(&keys, "the loader panicked"),
            }
        });
    }

    /// A miss whose load runs on a task of its own: the task waits for the
    /// lock, loads, stores, and releases the lock (after handing the value to
    /// this call, if it is still there). The call waits for it, at most the
    /// hard timeout.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn load_detached<T, E>(
        self: &Arc<Self>,
        key: &str,
        keys: Keys,
        loader: Detached<std::result::Result<T, E>>,
        options: &Resolved,
        started: Instant,
        deadline: Instant,
        trace: &mut CallTrace,
    ) -> Result<Led<T>, LoadError<E>>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        E: Send + Sync + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let inner = Arc::clone(self);
        let owned_key = key.to_owned();
        // The task is not bounded by the hard timeout: the caller is.
        let task_options = Resolved {
            hard_timeout: None,
            ..*options
        };
        tokio::spawn(async move {
            let mut trace = CallTrace::default();
            let load = inner.load_after_miss(
                &owned_key,
                &keys,
                loader,
                &task_options,
                started,
                deadline,
                &mut trace,
            );
            let result = match AssertUnwindSafe(load).catch_unwind().await {
                Ok(result) => result,
                Err(_) => {
                    inner.background_failed(&keys, "the loader panicked");
                    return; // `tx` dropped: the caller sees the load abandoned.
                }
            };
            if let Err(unsent) = tx.send((result, trace)) {
                // The caller went away: finish for it.
                match unsent.0 {
                    Ok(led) => drop(led.finish().await),
                    Err(e) => inner.background_failed(&keys, &e.to_string()),
                }
            }
        });
        let received = match options.hard_timeout {
            None => rx.await,
            Some(limit) => match tokio::time::timeout(limit, rx).await {
                Ok(received) => received,
                Err(_) => return Err(self.hard_timeout_error(key, limit)),
            },
        };
        match received {
            Ok((result, task_trace)) => {
                trace.attempts += task_trace.attempts;
                if let Some(waited) = task_trace.waited {
                    trace.add_wait(waited);
                }
                result
            }
            Err(_) => Err(LoadError::Cache(Error::Abandoned)),
        }
    }

    fn background_failed(&self, keys: &Keys, error: &str) {
        Stats::add(&self.stats.background_errors);
        tracing::warn!(
            key = keys.value,
            error,
            "a background load failed; the value in the store is unchanged"
        );
    }
}
