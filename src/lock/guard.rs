//! [`LockGuard`]: a held Redlock, released on drop.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::Inner;
use super::local::Turn;
use super::quorum::validity;
use super::token::Token;
use crate::error::Result;

/// A lock held on a majority of masters.
///
/// Release it with [`release`](LockGuard::release) to learn whether it was still
/// held. If the guard is dropped instead (an early return, a panic, a cancelled
/// future), the release is sent from a spawned task; without a tokio runtime the
/// lock simply expires.
#[derive(Debug)]
pub struct LockGuard {
    inner: Arc<Inner>,
    resource: String,
    token: Token,
    valid_until: Instant,
    released: bool,
    /// Set once the release has started (explicit or on drop): a re-grant by
    /// the keep-alive that lands after it is undone.
    ended: Arc<AtomicBool>,
    /// This task's turn in the process's line for the lock; dropped (letting the
    /// next task in) when the guard is: after an explicit release completed, or
    /// right after a dropped guard spawned its release (the next task then
    /// waits for that release's wake-up or its retry).
    turn: Option<Turn>,
}

impl LockGuard {
    pub(super) fn new(
        inner: Arc<Inner>,
        resource: String,
        token: Token,
        valid_until: Instant,
    ) -> LockGuard {
        LockGuard {
            inner,
            resource,
            token,
            valid_until,
            released: false,
            ended: Arc::default(),
            turn: None,
        }
    }

    pub(super) fn with_turn(mut self, turn: Turn) -> LockGuard {
        self.turn = Some(turn);
        self
    }

    /// The lock key.
    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// Time the lock is still safely held, by this process's clock, minus the
    /// drift allowance. Zero once it may have expired.
    pub fn validity_left(&self) -> Duration {
        self.valid_until.saturating_duration_since(Instant::now())
    }

    /// True once the validity is spent: another process may hold the lock now.
    pub fn is_expired(&self) -> bool {
        self.validity_left().is_zero()
    }

    /// Resets the expiry to `expiry` on every master that still holds this token.
    /// True when a majority did, and the validity is renewed; false when the lock
    /// was lost (expired and maybe taken by another).
    pub async fn extend(&mut self, expiry: Duration) -> Result<bool> {
        super::check_expiry(expiry)?;
        let started = Instant::now();
        let extended = self
            .inner
            .extend_all(
                &self.resource,
                &self.token,
                expiry,
                self.valid_until,
                &self.ended,
            )
            .await?;
        let elapsed = started.elapsed();
        if extended && let Some(v) = validity(expiry, elapsed) {
            // The validity counts from when the answers were in.
            self.valid_until = started + elapsed + v;
            return Ok(true);
        }
        Ok(false)
    }

    /// Deletes the lock on every master that still holds this token and publishes
    /// the release to waiters. True when a majority still held it.
    pub async fn release(mut self) -> Result<bool> {
        self.ended.store(true, Ordering::Release);
        let released = self
            .inner
            .release_all(&self.resource, &self.token, true)
            .await;
        // Only now: if this future is dropped mid-release, `Drop` sends it again
        // (compare-and-delete, so a second release is harmless).
        self.released = true;
        released
    }

    /// A handle that extends this lock from another task (the cache's keep-alive).
    pub(crate) fn extender(&self) -> Extender {
        Extender {
            inner: Arc::clone(&self.inner),
            resource: self.resource.clone(),
            token: self.token.clone(),
            ended: Arc::clone(&self.ended),
        }
    }

    /// The token, for fencing the value write.
    pub(crate) fn token(&self) -> &[u8] {
        self.token.as_bytes()
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        self.ended.store(true, Ordering::Release);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let inner = Arc::clone(&self.inner);
        let resource = std::mem::take(&mut self.resource);
        let token = self.token.clone();
        runtime.spawn(async move {
            if let Err(e) = inner.release_all(&resource, &token, true).await {
                tracing::warn!(resource, error = %e, "releasing a dropped lock failed; it will expire");
            }
        });
    }
}

/// Extends a held lock from another task.
#[derive(Debug, Clone)]
pub(crate) struct Extender {
    inner: Arc<Inner>,
    resource: String,
    token: Token,
    ended: Arc<AtomicBool>,
}

impl Extender {
    /// Extends to `expiry`; `valid_until` is the validity the caller knows of.
    pub(crate) async fn extend(&self, expiry: Duration, valid_until: Instant) -> Result<bool> {
        self.inner
            .extend_all(
                &self.resource,
                &self.token,
                expiry,
                valid_until,
                &self.ended,
            )
            .await
    }
}
