//! [`LockOptions`]: how a [`Redlock`] takes and waits for locks, their
//! defaults and validation, and the checks on an expiry or wait time given
//! to a single call.

use std::time::Duration;

use crate::defaults::{
    DEFAULT_CHANNEL, DEFAULT_MASTER_TIMEOUT, DEFAULT_REDLOCK_EXPIRY, DEFAULT_RETRY, DEFAULT_WAIT,
};
use crate::error::{Error, Result};

/// How a [`Redlock`](crate::Redlock) takes and waits for locks. Plain data:
/// build it with struct-update syntax from `LockOptions::default()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockOptions {
    /// How long a lock lives on the masters unless extended or released.
    /// Defaults to [`DEFAULT_REDLOCK_EXPIRY`] (5 s) here, and to
    /// [`DEFAULT_LOCK_EXPIRY`](crate::DEFAULT_LOCK_EXPIRY) (800 ms) in a
    /// cache's [`Builder`](crate::Builder) (its loads' locks, and
    /// [`LockedCache::lock`](crate::LockedCache::lock)). Longer: a crashed
    /// holder blocks others for longer. Shorter: more extension traffic, and a
    /// holder paused (GC, swap, CPU starvation) for longer than about two
    /// thirds of this loses the lock. The cache and every guard's watchdog
    /// extend the lock every third of it, so this does not bound the load time.
    pub expiry: Duration,
    /// How long [`Redlock::acquire`](crate::Redlock::acquire) (and a cache
    /// miss) waits for the lock before giving up with [`Error::LockTimeout`].
    /// Defaults to [`DEFAULT_WAIT`] (10 s), well above the expiry, so that a
    /// waiter outlives a holder that crashed.
    pub wait: Duration,
    /// Pause between attempts, randomised ±50%. Defaults to [`DEFAULT_RETRY`]
    /// (100 ms). With wake-ups on, this is only the fallback when a wake-up
    /// (the value stored, or the lock released) is lost; with them off, it is
    /// how late a waiter notices the value. Shorter: lower worst-case latency,
    /// more Redis commands per waiting process. After a split vote (nobody won
    /// a majority) the pause is shorter: 1–3 ms, doubling with each split in a
    /// row up to this.
    pub retry: Duration,
    /// The Redlock spec's per-master timeout: once a majority of masters has
    /// answered an acquisition without deciding it (split votes), the attempt
    /// waits at most this long (from its start) for the rest. A master whose
    /// last command found it unreachable is not waited for at all. Defaults to
    /// [`DEFAULT_MASTER_TIMEOUT`] (50 ms). Shorter: a stalled minority master
    /// costs less per contended attempt; too short on a network whose masters
    /// answer at very different speeds: more split votes. It never fails a
    /// call: an undecided attempt is retried. Capped at a quarter of the
    /// expiry; must be positive and at most 1 h.
    pub master_timeout: Duration,
    /// Wake waiters by pub/sub as soon as a lock is released. Defaults to `true`.
    /// Off: one fewer connection per master, and waiters poll every `retry`.
    pub wake_ups: bool,
    /// The pub/sub channel releases are published on. Defaults to
    /// [`DEFAULT_CHANNEL`]. All processes sharing locks must use the same one.
    pub channel: String,
    /// Give each guard of the public API a watchdog that extends the lock
    /// every third of its expiry while the guard lives. Defaults to `true`.
    /// Off: a guard's lock expires after its expiry unless the holder calls
    /// [`LockGuard::extend`](crate::LockGuard::extend) (or a single
    /// acquisition opts out with
    /// [`LockGuard::stop_watchdog`](crate::LockGuard::stop_watchdog)); a
    /// holder that hangs then frees the lock after the expiry instead of
    /// keeping it. The lost-lock signal works either way. (The cache's own
    /// loads always keep their lock alive.)
    pub watchdog: bool,
}

impl Default for LockOptions {
    fn default() -> Self {
        LockOptions {
            expiry: DEFAULT_REDLOCK_EXPIRY,
            wait: DEFAULT_WAIT,
            retry: DEFAULT_RETRY,
            master_timeout: DEFAULT_MASTER_TIMEOUT,
            wake_ups: true,
            channel: DEFAULT_CHANNEL.to_owned(),
            watchdog: true,
        }
    }
}

impl LockOptions {
    /// Rejects settings that cannot work.
    pub fn validate(&self) -> Result<()> {
        let invalid = |m: &str| Err(Error::InvalidConfig(m.to_owned()));
        check_expiry(self.expiry)?;
        if self.retry.is_zero() || self.retry > Duration::from_secs(3600) {
            return invalid("retry time must be positive and at most 1 h");
        }
        check_wait(self.wait)?;
        if self.master_timeout.is_zero() || self.master_timeout > Duration::from_secs(3600) {
            return invalid("master timeout must be positive and at most 1 h");
        }
        if self.channel.is_empty() {
            return invalid("release channel must not be empty");
        }
        Ok(())
    }
}

/// A lock expiry must be 10 ms to 24 h: in the options, and when given to
/// [`Redlock::acquire_with`](crate::Redlock::acquire_with),
/// [`Redlock::try_acquire`](crate::Redlock::try_acquire) or
/// [`LockGuard::extend`](crate::LockGuard::extend).
pub(super) fn check_expiry(expiry: Duration) -> Result<()> {
    let invalid = |m: &str| Err(Error::InvalidConfig(m.to_owned()));
    if expiry < Duration::from_millis(10) {
        return invalid("lock expiry must be at least 10 ms");
    }
    if expiry > Duration::from_secs(24 * 3600) {
        return invalid("lock expiry must be at most 24 h");
    }
    Ok(())
}

/// A wait time must be at most 24 h.
pub(super) fn check_wait(wait: Duration) -> Result<()> {
    if wait > Duration::from_secs(24 * 3600) {
        let message = "wait time must be at most 24 h";
        return Err(Error::InvalidConfig(message.into()));
    }
    Ok(())
}
