//! [`LockGuard`]: a held lock (an exclusive lock on one or several names, a
//! reader or the writer of a reader-writer lock, a semaphore permit), with its
//! watchdog, lost-lock signal and fencing token; released on drop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::claim::Claimed;
use super::local::Turn;
use super::quorum::validity;
use super::redlock::Inner;
use super::token::Token;
use super::watchdog::{LockLost, LostSignal, Watchdog};
use crate::error::Result;

/// A held lock: an exclusive lock ([`Redlock::acquire`](crate::Redlock::acquire),
/// [`acquire_all`](crate::Redlock::acquire_all)), a reader or the writer of a
/// [`RwLock`](crate::RwLock), or a [`Semaphore`](crate::Semaphore) permit.
///
/// # Keeping it, and losing it
///
/// A guard from the public API has a **watchdog** (unless
/// [`LockOptions::watchdog`](crate::LockOptions::watchdog) is off, or
/// [`stop_watchdog`](LockGuard::stop_watchdog) was called): a task that extends
/// the lock every third of its expiry for as long as the guard lives, so that
/// the work it protects may take longer than the expiry. The lock can still be
/// **lost**: a majority of masters refuses an extension (the process was paused
/// past the expiry, the key was deleted), or the masters stay unreachable until
/// the validity runs out (or, without the watchdog, nothing extended it in
/// time). Then [`lost`](LockGuard::lost) completes with the reason
/// ([`LockLost`]), [`is_lost`](LockGuard::is_lost) turns true, and another
/// process may hold the lock.
///
/// **What the holder must do when it fires**: stop the protected work as soon as
/// it can (`select!` on [`lost`](LockGuard::lost) next to it), and do not commit
/// anything that is not fenced: a write to a downstream store should carry the
/// [`fencing_token`](LockGuard::fencing_token), which the store compares with
/// the highest token it has seen, so that the write of a holder that lost its
/// lock without knowing it yet is refused there. The guard can still be
/// released (a no-op on masters where another holder has the lock).
///
/// # Releasing
///
/// Release it with [`release`](LockGuard::release) to learn whether it was still
/// held. If the guard is dropped instead (an early return, a panic, a cancelled
/// future), the watchdog stops and the release is sent from a spawned task;
/// without a tokio runtime the lock simply expires.
#[derive(Debug)]
pub struct LockGuard {
    inner: Arc<Inner>,
    claim: Arc<Claimed>,
    token: Token,
    fences: Vec<u64>,
    validity: Arc<Validity>,
    released: bool,
    /// Set once the release has started (explicit or on drop): a re-grant by
    /// the watchdog that lands after it is undone.
    ended: Arc<AtomicBool>,
    /// This task's turn in the process's line for the lock; dropped (letting the
    /// next task in) when the guard is: after an explicit release completed, or
    /// right after a dropped guard spawned its release (the next task then
    /// waits for that release's wake-up or its retry).
    turn: Option<Turn>,
    watchdog: Option<Watchdog>,
}

/// Until when a held lock is safely held (by this process's clock), shared by
/// the guard, its watchdog and the cache's keep-alive.
#[derive(Debug)]
pub(crate) struct Validity(Mutex<Instant>);

impl Validity {
    fn get(&self) -> Instant {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, until: Instant) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = until;
    }
}

impl LockGuard {
    pub(super) fn new(
        inner: Arc<Inner>,
        claim: Arc<Claimed>,
        token: Token,
        fences: Vec<u64>,
        valid_until: Instant,
    ) -> LockGuard {
        LockGuard {
            inner,
            claim,
            token,
            fences,
            validity: Arc::new(Validity(Mutex::new(valid_until))),
            released: false,
            ended: Arc::default(),
            turn: None,
            watchdog: None,
        }
    }

    pub(super) fn with_turn(mut self, turn: Option<Turn>) -> LockGuard {
        self.turn = turn;
        self
    }

    /// Starts the watchdog: extending to `expiry` when `extend`, else only
    /// watching the validity run out.
    pub(super) fn watched(mut self, expiry: Duration, extend: bool) -> LockGuard {
        self.watchdog = Some(Watchdog::start(self.extender(), expiry, extend, None));
        self
    }

    /// Keeps the claim until it expires: no watchdog, no release (a run-once
    /// window).
    pub(super) fn keep_until_expiry(mut self) {
        self.watchdog = None;
        self.released = true;
    }

    /// The lock's name (the first, for a lock on several names).
    pub fn resource(&self) -> &str {
        self.claim.name()
    }

    /// The fencing token of this acquisition: higher than the token of every
    /// earlier acquisition of the same name (see the crate docs, "Fencing
    /// tokens", for where that holds). For a lock on several names, the token
    /// of the first (in sorted order); see [`fencing_tokens`](Self::fencing_tokens).
    pub fn fencing_token(&self) -> u64 {
        self.fences.first().copied().unwrap_or(0)
    }

    /// The fencing token of each name, in the sorted order of
    /// [`names`](Self::names).
    pub fn fencing_tokens(&self) -> &[u64] {
        &self.fences
    }

    /// The names this guard holds (sorted, for a lock on several names).
    pub fn names(&self) -> Vec<&str> {
        self.claim.names()
    }

    /// Time the lock is still safely held, by this process's clock, minus the
    /// drift allowance. Zero once it may have expired.
    pub fn validity_left(&self) -> Duration {
        self.validity
            .get()
            .saturating_duration_since(Instant::now())
    }

    /// True once the validity is spent: another process may hold the lock now.
    pub fn is_expired(&self) -> bool {
        self.validity_left().is_zero()
    }

    /// Completes with the reason once the lock is lost (see the type's docs);
    /// never while it is held. Cancel safe. Without a watchdog (a guard the
    /// cache took for itself) it never completes.
    pub async fn lost(&self) -> LockLost {
        match &self.watchdog {
            Some(w) => w.signal().lost().await,
            None => std::future::pending().await,
        }
    }

    /// True once the lock was lost (see [`lost`](Self::lost)).
    pub fn is_lost(&self) -> bool {
        self.watchdog.as_ref().is_some_and(|w| w.signal().is_lost())
    }

    /// A cloneable handle on the lost-lock signal, for another task (the one
    /// doing the protected work). `None` for a guard without a watchdog.
    pub fn lost_signal(&self) -> Option<LostSignal> {
        self.watchdog.as_ref().map(Watchdog::signal)
    }

    /// Stops extending the lock automatically (for this acquisition): it then
    /// expires after its expiry unless [`extend`](Self::extend) is called, and
    /// the lost signal fires when the validity runs out.
    pub fn stop_watchdog(&mut self) {
        if let Some(w) = &self.watchdog {
            w.set_extending(false);
        }
    }

    /// Resets the expiry to `expiry` on every master that still holds this token.
    /// True when a majority did, and the validity is renewed; false when the lock
    /// was lost (expired and maybe taken by another).
    pub async fn extend(&mut self, expiry: Duration) -> Result<bool> {
        super::options::check_expiry(expiry)?;
        self.extender().extend(expiry).await
    }

    /// Deletes the lock on every master that still holds this token and publishes
    /// the release to waiters. True when a majority still held it.
    pub async fn release(mut self) -> Result<bool> {
        self.ended.store(true, Ordering::Release);
        self.watchdog = None;
        let released = self.inner.release_all(&self.claim, &self.token, true).await;
        // Only now: if this future is dropped mid-release, `Drop` sends it again
        // (compare-and-delete, so a second release is harmless).
        self.released = true;
        released
    }

    /// A handle that extends this lock from another task (the watchdog, the
    /// cache's keep-alive).
    pub(crate) fn extender(&self) -> Extender {
        Extender {
            inner: Arc::clone(&self.inner),
            claim: Arc::clone(&self.claim),
            token: self.token.clone(),
            ended: Arc::clone(&self.ended),
            validity: Arc::clone(&self.validity),
        }
    }

    /// The token, for fencing the value write.
    pub(crate) fn token(&self) -> &[u8] {
        self.token.as_bytes()
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.watchdog = None;
        if self.released {
            return;
        }
        self.ended.store(true, Ordering::Release);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let inner = Arc::clone(&self.inner);
        let claim = Arc::clone(&self.claim);
        let token = self.token.clone();
        runtime.spawn(async move {
            if let Err(e) = inner.release_all(&claim, &token, true).await {
                let resource = claim.name();
                tracing::warn!(resource, error = %e, "releasing a dropped lock failed; it will expire");
            }
        });
    }
}

/// Extends a held lock from another task, keeping the guard's validity.
#[derive(Debug, Clone)]
pub(crate) struct Extender {
    inner: Arc<Inner>,
    claim: Arc<Claimed>,
    token: Token,
    ended: Arc<AtomicBool>,
    validity: Arc<Validity>,
}

impl Extender {
    /// Extends to `expiry`; true (and the validity renewed) when a majority
    /// still held the lock.
    pub(crate) async fn extend(&self, expiry: Duration) -> Result<bool> {
        let started = Instant::now();
        let extended = self
            .inner
            .extend_all(
                &self.claim,
                &self.token,
                expiry,
                self.validity.get(),
                &self.ended,
            )
            .await?;
        let elapsed = started.elapsed();
        if extended && let Some(v) = validity(expiry, elapsed) {
            // The validity counts from when the answers were in.
            self.validity.set(started + elapsed + v);
            return Ok(true);
        }
        Ok(false)
    }

    pub(crate) fn valid_until(&self) -> Instant {
        self.validity.get()
    }

    pub(crate) fn validity_left(&self) -> Duration {
        self.valid_until().saturating_duration_since(Instant::now())
    }
}
