//! Refreshes and detached loads: the work a call starts but need not wait for.
//!
//! - A call that finds a stale value (or one early refresh picked) tries the
//!   key's lock once, unless a refresh of the key already runs in this process.
//!   Whoever gets the lock refreshes; everyone else, in every process, returns
//!   the value they hold. With a `Send + 'static` loader the refresh runs on a
//!   task of its own and the caller returns at once; with a borrowing loader
//!   the caller refreshes in place ([`Lead::RefreshInPlace`]: its flight's
//!   followers get the stale value first), bounded by the soft and hard
//!   timeouts, and a failure returns the value it held (fail-safe).
//! - A detached miss runs its load on a task of its own, which stores the
//!   value and releases the lock even if the caller went away (but stops
//!   waiting for the lock once nobody waits for it); the caller waits for it,
//!   bounded by the hard timeout.
//!
//! Every task here is bounded by the background timeout, so a hung loader
//! cannot keep a key's lock alive forever.

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;
use tracing::Instrument;

use super::keys::Keys;
use super::load::{Detached, Led, Loader};
use super::options::Resolved;
use super::{Found, Inner, Replacing};
use crate::codec::Codec;
use crate::error::{Described, Error, LoadError};
use crate::lock::{Attempt, LockGuard};
use crate::stats::Stats;
use crate::telemetry::{CallTrace, Outcome};

/// What a flight's leader ends with: a value for everyone, or a stale value
/// for everyone that this caller then refreshes in place.
pub(super) enum Lead<T, L> {
    Done(Led<T>),
    RefreshInPlace(InPlace<T, L>),
}

/// A refresh the caller runs itself (its loader borrows from it), holding the
/// key's lock.
pub(super) struct InPlace<T, L> {
    keys: Keys,
    found: Found<T>,
    read_at: Instant,
    guard: LockGuard,
    loader: L,
    served: Outcome,
    _refreshing: RefreshMark,
}

impl<T, L> InPlace<T, L> {
    /// The stale value's bytes, for the flight's followers.
    pub fn bytes(&self) -> &[u8] {
        &self.found.bytes
    }
}

/// The keys this process is refreshing: a call on one of them serves what it
/// holds without a lock attempt. An entry lives as long as its [`RefreshMark`].
#[derive(Debug, Default)]
pub(super) struct Refreshing {
    keys: Mutex<HashSet<String>>,
}

impl Refreshing {
    /// Marks `value_key` as being refreshed, unless it already is.
    fn start(self: &Arc<Self>, value_key: &str) -> Option<RefreshMark> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.insert(value_key.to_owned()).then(|| RefreshMark {
            refreshing: Arc::clone(self),
            key: value_key.to_owned(),
        })
    }

    /// Keys being refreshed now (none once every refresh ended).
    pub fn len(&self) -> usize {
        self.keys.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// A refresh in progress in this process; dropping it ends the mark.
pub(super) struct RefreshMark {
    refreshing: Arc<Refreshing>,
    key: String,
}

impl Drop for RefreshMark {
    fn drop(&mut self) {
        let mut keys = self
            .refreshing
            .keys
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        keys.remove(&self.key);
    }
}

/// What a detached load's task hands its caller: the outcome (or the loader's
/// panic) and the task's trace.
type DetachedResult<T, E> = std::thread::Result<(Result<Led<T>, LoadError<E>>, CallTrace)>;

impl<C: Codec> Inner<C> {
    /// `found` is stale (`served` = [`Outcome::Stale`]) or early refresh picked
    /// it (`served` = [`Outcome::Hit`]): refresh it if this call gets the lock,
    /// and say what the caller gets. Counts the lookup.
    pub(super) async fn refresh<T, E, L>(
        self: &Arc<Self>,
        key: &str,
        keys: Keys,
        found: Found<T>,
        loader: L,
        options: &Resolved,
        served: Outcome,
    ) -> Result<Lead<T, L>, LoadError<E>>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        E: Send + Sync + 'static,
        L: Loader<Output = std::result::Result<T, E>>,
    {
        let read_at = Instant::now();
        let serve = |found: Found<T>| {
            Stats::add(&self.stats.hits);
            if served == Outcome::Stale {
                Stats::add(&self.stats.stale_served);
            }
            Ok(Lead::Done(Led::unlocked(found.value, found.bytes, served)))
        };
        // A refresh of this key already runs in this process.
        let Some(mark) = self.refreshing.start(&keys.value) else {
            return serve(found);
        };
        let guard = match self
            .lock
            .attempt(&keys.lock, self.lock.options().expiry)
            .await
        {
            Ok(Attempt::Acquired(guard)) => guard,
            // Someone holds the lock: they refresh. Or too few masters answered:
            // nobody refreshes now, and the value at hand is served either way.
            Ok(_) => return serve(found),
            Err(e) => {
                tracing::debug!(key = keys.value, error = %e, "the lock for a refresh failed; serving the value at hand");
                return serve(found);
            }
        };
        Stats::add(&self.stats.refreshes);
        match loader.detach() {
            Ok(detached) => {
                self.spawn_refresh(key, keys, guard, detached, options, &found, mark);
                serve(found)
            }
            Err(loader) => {
                // The caller runs the load: a lookup that loads, counted as a
                // miss (see `StatsSnapshot`).
                Stats::add(&self.stats.misses);
                Ok(Lead::RefreshInPlace(InPlace {
                    keys,
                    found,
                    read_at,
                    guard,
                    loader,
                    served,
                    _refreshing: mark,
                }))
            }
        }
    }

    /// Runs a refresh in place, bounded by the soft and hard timeouts, and
    /// returns the new value, or the held one when the refresh fails or times
    /// out (fail-safe; early refresh: the held value is still fresh).
    pub(super) async fn refresh_in_place<T, E, L>(
        &self,
        key: &str,
        refresh: InPlace<T, L>,
        options: &Resolved,
    ) -> Result<Led<T>, LoadError<E>>
    where
        T: Serialize + DeserializeOwned,
        L: Loader<Output = std::result::Result<T, E>>,
    {
        let InPlace {
            keys,
            found,
            read_at,
            guard,
            loader,
            served,
            _refreshing,
        } = refresh;
        let replacing = Replacing::of(&found);
        let load = self.load_locked(key, &keys, guard, loader, options, Some(&replacing));
        let limit = match (options.soft_timeout, options.hard_timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let (refreshed, timed_out) = match limit {
            None => (load.await, false),
            Some(limit) => match tokio::time::timeout(limit, load).await {
                Ok(refreshed) => (refreshed, false),
                Err(_) => (
                    Err(LoadError::Cache(Error::LoadTimeout {
                        key: key.to_owned(),
                        timeout: limit,
                    })),
                    true,
                ),
            },
        };
        let error = match refreshed {
            Ok(led) => {
                if led.outcome == Outcome::Waited {
                    Stats::add(&self.stats.found_while_waiting);
                }
                return Ok(led);
            }
            Err(e) => e,
        };
        // The held value, unless it expired from Redis meanwhile.
        let still_there = found.ttl_left.is_none_or(|left| left > read_at.elapsed());
        if served == Outcome::Hit && still_there {
            // Early refresh of a fresh value: it is still fresh, serve it.
            tracing::warn!(key = keys.value, error = %Described(&error), "early refresh failed; the value is still fresh");
            return Ok(Led::unlocked(found.value, found.bytes, Outcome::Hit));
        }
        if still_there && (timed_out || options.fail_safe) {
            Stats::add(&self.stats.fail_safe_served);
            tracing::warn!(key = keys.value, error = %Described(&error), "refreshing a stale value failed; serving the stale value (fail-safe)");
            return Ok(Led::unlocked(found.value, found.bytes, Outcome::FailSafe));
        }
        Err(error)
    }

    /// Runs a refresh under `guard` on a task of its own (in the call's span),
    /// bounded by the background timeout: it stores the value (fenced) and
    /// releases the lock; a failure is logged and counted, and the value in
    /// Redis is left as it was.
    #[allow(clippy::too_many_arguments)]
    fn spawn_refresh<T, E>(
        self: &Arc<Self>,
        key: &str,
        keys: Keys,
        guard: LockGuard,
        loader: Detached<std::result::Result<T, E>>,
        options: &Resolved,
        found: &Found<T>,
        mark: RefreshMark,
    ) where
        T: Serialize + DeserializeOwned + Send + 'static,
        E: Send + Sync + 'static,
    {
        let inner = Arc::clone(self);
        let key = key.to_owned();
        let options = *options;
        let replacing = Replacing::of(found);
        let task = async move {
            let _mark = mark;
            let refresh = inner.load_locked(&key, &keys, guard, loader, &options, Some(&replacing));
            let bounded = tokio::time::timeout(
                options.background_timeout,
                AssertUnwindSafe(refresh).catch_unwind(),
            );
            match bounded.await {
                Ok(Ok(Ok(led))) => drop(led.finish().await),
                Ok(Ok(Err(e))) => inner.background_failed(&keys, &Described(&e).to_string()),
                // The lock is released by its guard's drop; the panic was
                // reported by the panic hook.
                Ok(Err(_)) => inner.background_failed(&keys, "the loader panicked"),
                Err(_) => inner.background_timed_out(&keys, options.background_timeout),
            }
        };
        tokio::spawn(task.in_current_span());
    }

    /// A miss whose load runs on a task of its own (in the call's span): the
    /// task waits for the lock (until the caller goes away), loads, stores, and
    /// releases the lock (after handing the value to this call, if it is still
    /// there), within the background timeout. The call waits for it, at most
    /// the hard timeout; a panic of the loader resumes in the call.
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
        let (mut tx, rx) = oneshot::channel::<DetachedResult<T, E>>();
        let inner = Arc::clone(self);
        let owned_key = key.to_owned();
        // The task is not bounded by the hard timeout (the caller is), but by
        // the background timeout.
        let task_options = Resolved {
            hard_timeout: None,
            ..*options
        };
        let task = async move {
            let mut trace = CallTrace::default();
            let outcome = {
                let load = inner.load_after_miss(
                    &owned_key,
                    &keys,
                    loader,
                    &task_options,
                    started,
                    deadline,
                    &mut trace,
                    tx.closed(),
                );
                tokio::time::timeout(
                    task_options.background_timeout,
                    AssertUnwindSafe(load).catch_unwind(),
                )
                .await
            };
            let outcome = match outcome {
                Ok(outcome) => outcome,
                Err(_) => {
                    inner.background_timed_out(&keys, task_options.background_timeout);
                    Ok(Err(LoadError::Cache(Error::LoadTimeout {
                        key: owned_key,
                        timeout: task_options.background_timeout,
                    })))
                }
            };
            if let Err(unsent) = tx.send(outcome.map(|result| (result, trace))) {
                // The caller went away: finish for it.
                match unsent {
                    Ok((Ok(led), _)) => drop(led.finish().await),
                    Ok((Err(LoadError::Cache(Error::Abandoned)), _)) => {}
                    Ok((Err(e), _)) => inner.background_failed(&keys, &Described(&e).to_string()),
                    Err(_) => inner.background_failed(&keys, "the loader panicked"),
                }
            }
        };
        tokio::spawn(task.in_current_span());
        let received = match options.hard_timeout {
            None => rx.await,
            Some(limit) => match tokio::time::timeout(limit, rx).await {
                Ok(received) => received,
                Err(_) => return Err(self.hard_timeout_error(key, limit)),
            },
        };
        match received {
            Ok(Ok((result, task_trace))) => {
                trace.attempts += task_trace.attempts;
                if let Some(waited) = task_trace.waited {
                    trace.add_wait(waited);
                }
                result
            }
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            // The task ended without an answer: the runtime is shutting down.
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

    fn background_timed_out(&self, keys: &Keys, timeout: Duration) {
        self.background_failed(
            keys,
            &format!("the load passed the background timeout of {timeout:?} and was dropped"),
        );
    }
}
