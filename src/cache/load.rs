//! The miss path, from the lock to the store: wait for the key's lock (woken by
//! pub/sub), read again and take the write fence, run the loader while the
//! lock is kept alive, store the value through the fence. Also the fail-open
//! load without the lock, and the [`Loader`] abstraction over the caller's
//! loader (run in place, or handed to a task of its own).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::Instrument;
use tracing::field::Empty;

use super::keepalive::{KeepAlive, LoadContext};
use super::keys::{Keys, ValueKey};
use super::options::Resolved;
use super::{Found, Inner, QuorumLossPolicy, Replacing};
use crate::codec::Codec;
use crate::error::{Error, LoadError, Result};
use crate::lock::{Attempt, LockGuard, Splits, Token};
use crate::stats::Stats;
use crate::store::Publish;
use crate::telemetry::{CallTrace, KeyHash, Outcome, Telemetry, key_hash, millis};

/// The caller's loader, as the miss path runs it: in place ([`Inline`], any
/// closure) or, when it can outlive its caller ([`Spawnable`]), on a task of
/// its own (a background refresh, a detached load). Its output is
/// `Result<T, E>`. (An associated type rather than trait parameters, so that
/// loaders whose error type has a lifetime, such as `&'static str`, keep
/// their futures `Send`.)
pub(super) trait Loader: Sized {
    /// What the loader returns.
    type Output;
    /// The loader's future.
    type Future: Future<Output = Self::Output>;

    /// Runs the loader.
    fn load(self, ctx: LoadContext) -> Self::Future;

    /// The loader boxed for a task of its own, or itself back when it cannot
    /// outlive its caller.
    fn detach(self) -> std::result::Result<Detached<Self::Output>, Self>;
}

/// A loader that runs on a task of its own. (A struct rather than a type
/// alias: the compiler then knows its lifetimes inside spawned futures.)
pub(super) struct Detached<O>(Box<dyn FnOnce(LoadContext) -> BoxedLoad<O> + Send + 'static>);

/// A detached loader's future.
pub(super) type BoxedLoad<O> = Pin<Box<dyn Future<Output = O> + Send + 'static>>;

/// A loader that may borrow from its caller: it runs in place.
pub(super) struct Inline<F>(pub F);

impl<F, Fut> Loader for Inline<F>
where
    F: FnOnce(LoadContext) -> Fut,
    Fut: Future,
{
    type Output = Fut::Output;
    type Future = Fut;

    fn load(self, ctx: LoadContext) -> Fut {
        (self.0)(ctx)
    }

    fn detach(self) -> std::result::Result<Detached<Fut::Output>, Self> {
        Err(self)
    }
}

/// A `'static + Send` loader: it can run on a task of its own.
pub(super) struct Spawnable<F>(pub F);

impl<F, Fut> Loader for Spawnable<F>
where
    F: FnOnce(LoadContext) -> Fut + Send + 'static,
    Fut: Future + Send + 'static,
{
    type Output = Fut::Output;
    type Future = Fut;

    fn load(self, ctx: LoadContext) -> Fut {
        (self.0)(ctx)
    }

    fn detach(self) -> std::result::Result<Detached<Fut::Output>, Self> {
        let f = self.0;
        Ok(Detached(Box::new(move |ctx| Box::pin(f(ctx)))))
    }
}

impl<O> Loader for Detached<O> {
    type Output = O;
    type Future = BoxedLoad<O>;

    fn load(self, ctx: LoadContext) -> BoxedLoad<O> {
        (self.0)(ctx)
    }

    fn detach(self) -> std::result::Result<Detached<O>, Self> {
        Ok(self)
    }
}

impl<C: Codec> Inner<C> {
    /// The miss path: wait for the lock (or a value stored meanwhile), then
    /// load under it, or without it when the quorum is lost and the policy
    /// says fail open. The wait for the lock ends early, with
    /// [`Error::Abandoned`], when `abandon` completes (a detached load whose
    /// caller went away: nobody is left to load for).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn load_after_miss<T, E, L>(
        &self,
        key: &str,
        keys: &Keys,
        loader: L,
        options: &Resolved,
        started: Instant,
        deadline: Instant,
        trace: &mut CallTrace,
        abandon: impl Future<Output = ()>,
    ) -> std::result::Result<Led<T>, LoadError<E>>
    where
        T: Serialize + DeserializeOwned,
        L: Loader<Output = std::result::Result<T, E>>,
    {
        let locked = tokio::select! {
            biased;
            locked = self.lock_phase(key, keys, options, started, deadline, trace) => locked?,
            () = abandon => return Err(LoadError::Cache(Error::Abandoned)),
        };
        let guard = match locked {
            Locked::Guard(guard) => guard,
            Locked::ValueAppeared(found) => {
                Stats::add(&self.stats.found_while_waiting);
                return Ok(Led::unlocked(found.value, found.bytes, Outcome::Waited));
            }
            Locked::QuorumLost => return self.load_unlocked(key, keys, loader, options).await,
        };
        let led = self
            .load_locked(key, keys, guard, loader, options, None)
            .await?;
        if led.outcome == Outcome::Waited {
            Stats::add(&self.stats.found_while_waiting);
        }
        Ok(led)
    }

    /// [`wait_for_lock`](Self::wait_for_lock) in a `lock` span, timed.
    pub(super) async fn lock_phase<T: DeserializeOwned>(
        &self,
        key: &str,
        keys: &Keys,
        options: &Resolved,
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
            .wait_for_lock(key, keys, options, started, deadline, &mut wait)
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
    async fn store_fenced(
        &self,
        keys: &Keys,
        bytes: &[u8],
        ttl: Duration,
        token: &[u8],
        lock_lost: bool,
    ) {
        let span = tracing::debug_span!(
            "store",
            db.system = self.telemetry.db_system,
            db.operation.name = "store",
            locked_cache.store_result = Empty,
        );
        let result = self
            .store_fenced_untraced(keys, bytes, ttl, token, lock_lost)
            .instrument(span.clone())
            .await;
        span.record("locked_cache.store_result", result);
    }

    async fn store_fenced_untraced(
        &self,
        keys: &Keys,
        bytes: &[u8],
        ttl: Duration,
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
            .set_fenced(&keys.value, bytes, ttl, &keys.fence, token, in_script)
            .await;
        if afterwards && matches!(stored, Ok(true)) {
            self.lock.publish_wake_up(&keys.lock);
        }
        if matches!(stored, Ok(true)) {
            self.changed(&keys.value).await;
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

    /// After a write of `value_key`: the near cache, if on, drops it and tells
    /// the other processes.
    pub(super) async fn changed(&self, value_key: &str) {
        #[cfg(feature = "near-cache")]
        if let Some(near) = &self.near {
            near.changed(&self.value_store, value_key).await;
        }
        #[cfg(not(feature = "near-cache"))]
        let _ = value_key;
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
        call_options: &Resolved,
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
            if let Some(found) = self
                .read(
                    ValueKey::new(&self.key_prefix, key),
                    call_options.reads_ttl(),
                )
                .await?
                && found.usable(call_options)
            {
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
    ///
    /// `replacing` is the value a refresh replaces (a stale one, or a fresh one
    /// early refresh picked): the load is skipped when the value under the lock
    /// is no longer that one (another process refreshed it meanwhile). For a
    /// miss, it is skipped when the value under the lock is usable. A skipped
    /// load is [`Outcome::Waited`] (the caller counts it).
    pub(super) async fn load_locked<T, E, L>(
        &self,
        key: &str,
        keys: &Keys,
        guard: LockGuard,
        loader: L,
        options: &Resolved,
        replacing: Option<&Replacing>,
    ) -> Result<Led<T>, LoadError<E>>
    where
        T: Serialize + DeserializeOwned,
        L: Loader<Output = std::result::Result<T, E>>,
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
        // Invalidated (tags on): as missing. And the marks of what this load
        // will store, as of now, before the loader reads anything.
        let found = match found {
            Ok(stored) => self.screen(stored).await,
            Err(e) => Err(e),
        };
        let marks = match self.marks_for(&options.tags).await {
            Ok(marks) => marks,
            Err(e) => {
                release(guard).await;
                return Err(e.into());
            }
        };
        match found {
            Ok(Some(stored)) => {
                if let Some(found) = self.decode_or_report::<T>(&keys.value, stored, false) {
                    let done = match replacing {
                        Some(old) => old.superseded_by(&found),
                        None => found.usable(options),
                    };
                    if done {
                        release(guard).await;
                        return Ok(Led::unlocked(found.value, found.bytes, Outcome::Waited));
                    }
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
        let context = keepalive.context();
        let loaded = self
            .run_loader(loader, context.clone())
            .instrument(span.clone())
            .await;
        let lost_during_load = keepalive.stop().await;
        span.record("locked_cache.lock_lost", lost_during_load);
        drop(span); // The load is over: close its span before the store's.

        let (value, load_time) = match loaded {
            Ok(loaded) => loaded,
            Err(e) => {
                release(guard).await;
                return Err(LoadError::Loader(Arc::new(e)));
            }
        };
        let entry = context.entry_settings();
        let (ttl, bytes) =
            match self.encode_loaded(key, &value, load_time, options, entry, marks.as_ref()) {
                Ok(stored) => stored,
                Err(e) => {
                    release(guard).await;
                    return Err(e.into());
                }
            };
        let Some(ttl) = ttl else {
            // A "not found" with a zero negative TTL, or a loader that said
            // not to store it: handed out, not stored.
            return Ok(Led {
                value,
                bytes,
                unlock: Some(guard),
                outcome: Outcome::Loaded,
            });
        };
        self.store_fenced(keys, &bytes, ttl, guard.token(), lost_during_load)
            .await;
        // Released by the caller, after the flight's followers have the value.
        Ok(Led {
            value,
            bytes,
            unlock: Some(guard),
            outcome: Outcome::Loaded,
        })
    }

    /// Fail-open path: the quorum is lost, load without the lock.
    pub(super) async fn load_unlocked<T, E, L>(
        &self,
        key: &str,
        keys: &Keys,
        loader: L,
        options: &Resolved,
    ) -> Result<Led<T>, LoadError<E>>
    where
        T: Serialize + DeserializeOwned,
        L: Loader<Output = std::result::Result<T, E>>,
    {
        // Take the fence *before* loading (and look once more for a value): a
        // `set`/`invalidate`, or a holder that gets the lock when the masters
        // come back, takes the fence after us, and then our stale write is
        // refused. Without the value server nothing can be stored anyway.
        let fence_expiry = self.lock.options().expiry * 2;
        let token = Token::new().map_err(|e| {
            Error::InvalidConfig(format!("the OS random number generator failed: {e}"))
        })?;
        let found = match self
            .value_store
            .get_or_fence(&keys.value, &keys.fence, token.as_bytes(), fence_expiry)
            .await
        {
            Ok(stored) => self.screen(stored).await,
            Err(e) => Err(e),
        };
        let marks = self.marks_for(&options.tags).await?;
        let fenced = match found {
            Ok(Some(stored)) => {
                if let Some(found) = self.decode_or_report::<T>(&keys.value, stored, false)
                    && found.usable(options)
                {
                    Stats::add(&self.stats.found_while_waiting);
                    return Ok(Led::unlocked(found.value, found.bytes, Outcome::Waited));
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
        let context = LoadContext::new(None);
        let (value, load_time) = match self
            .run_loader(loader, context.clone())
            .instrument(load_span(&self.telemetry))
            .await
        {
            Ok(loaded) => loaded,
            Err(e) => return Err(LoadError::Loader(Arc::new(e))),
        };
        let entry = context.entry_settings();
        let (ttl, bytes) =
            self.encode_loaded(key, &value, load_time, options, entry, marks.as_ref())?;
        let Some(ttl) = ttl else {
            return Ok(Led {
                value,
                bytes,
                unlock: None,
                outcome: Outcome::Loaded,
            });
        };
        if fenced {
            self.store_fenced(keys, &bytes, ttl, token.as_bytes(), false)
                .await;
        } else {
            Stats::add(&self.stats.store_errors);
        }
        Ok(Led {
            value,
            bytes,
            unlock: None,
            outcome: Outcome::Loaded,
        })
    }

    /// Runs a loader: counts it (and its failure, or panic), times it, and
    /// counts it in flight while it runs. A panic continues to the caller (the
    /// panic hook has already run; it is not run again). Returns the value with
    /// how long the load took.
    async fn run_loader<T, E, L>(&self, loader: L, context: LoadContext) -> Result<(T, Duration), E>
    where
        L: Loader<Output = Result<T, E>>,
    {
        Stats::add(&self.stats.loads);
        let _loading = self.telemetry.loading();
        let began = Instant::now();
        // The context is handed to the loader, and is what
        // `LoadContext::current()` answers inside it.
        let load = super::keepalive::CURRENT.scope(context.clone(), loader.load(context));
        let output = match AssertUnwindSafe(load).catch_unwind().await {
            Ok(output) => output,
            Err(panic) => {
                Stats::add(&self.stats.load_errors);
                std::panic::resume_unwind(panic)
            }
        };
        let took = began.elapsed();
        self.telemetry.load_took(took);
        if output.is_err() {
            Stats::add(&self.stats.load_errors);
        }
        output.map(|value| (value, took))
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
pub(super) struct Led<T> {
    pub value: T,
    pub bytes: Vec<u8>,
    pub unlock: Option<LockGuard>,
    pub outcome: Outcome,
}

impl<T> Led<T> {
    pub fn unlocked(value: T, bytes: Vec<u8>, outcome: Outcome) -> Led<T> {
        Led {
            value,
            bytes,
            unlock: None,
            outcome,
        }
    }

    /// Releases the lock, if held, and hands over the value.
    pub async fn finish(self) -> T {
        if let Some(guard) = self.unlock {
            release(guard).await;
        }
        self.value
    }
}

/// How a wait for the lock ended.
pub(super) enum Locked<T> {
    Guard(LockGuard),
    ValueAppeared(Found<T>),
    QuorumLost,
}

/// Releases the lock, logging (not returning) a failure: the lock then expires
/// on its own, and the caller's value or error matters more.
pub(super) async fn release(guard: LockGuard) {
    let resource = guard.resource().to_owned();
    match guard.release().await {
        Ok(true) => {}
        Ok(false) => tracing::debug!(resource, "lock was no longer held at release"),
        Err(e) => tracing::warn!(resource, error = %e, "releasing the lock failed; it will expire"),
    }
}
