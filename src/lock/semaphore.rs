//! The semaphore: at most N holders of a name at once, on **one** server.
//!
//! Single server by design: Redlock's majority argument keeps one holder out
//! of another's way because any two majorities share a master, which refuses
//! the second. With N permits, each master counts its own holders, and
//! different majorities can each admit N different holders (N = 2 on 3
//! masters: A and B get masters 1 and 2, C and D get masters 2 and 3... the
//! master both share refuses one, but A, B and a C granted on 1 and 3 make
//! three). So a semaphore runs on one Redis server (or one cluster shard);
//! for availability, give that server a replica and failover, and accept that
//! a failover may lose permits that were not replicated yet.

use std::time::Duration;

use super::claim::Claimed;
use super::inspect::LockInfo;
use super::{LockGuard, Redlock};
use crate::error::{Error, Result};

/// A counting semaphore by name: at most `permits` holders at once across
/// every process ([`Redlock::semaphore`]). Cheap to clone.
///
/// # Concurrent callers
///
/// Up to `permits` callers hold a permit at once; the others wait until one is
/// released (its release is published, and wakes one waiter per process) or
/// expires (a holder that crashed frees its permit after the expiry, when the
/// next attempt sweeps expired permits). Waiters are not served in order.
/// Every process must use the same number of permits for a name.
///
/// # Cancellation
///
/// Safe at every await: a dropped call leaves no permit behind; a dropped
/// guard releases its permit from a spawned task.
///
/// # Errors
///
/// [`Error::LockTimeout`] after the wait time; connection errors of the one
/// server ([`Error::QuorumNotReached`] when it is unreachable).
///
/// # When a permit is lost
///
/// The permit guard is a [`LockGuard`] with a watchdog and lost-lock signal: a
/// lost permit may have been handed to another caller, so more than `permits`
/// holders may be at work until this one stops.
#[derive(Debug, Clone)]
pub struct Semaphore {
    lock: Redlock,
    name: String,
    permits: u32,
}

impl Redlock {
    /// The semaphore `name` with `permits` permits, on this lock's one master.
    ///
    /// Errors: [`Error::InvalidConfig`] when this `Redlock` has more than one
    /// master (a semaphore needs one server: build a `Redlock` on one URL for
    /// it; see the module docs for why) or `permits` is 0.
    pub fn semaphore(&self, name: &str, permits: u32) -> Result<Semaphore> {
        if self.masters() != 1 {
            return Err(Error::InvalidConfig(format!(
                "a semaphore runs on one server, not {} masters: Redlock does not keep a \
                 semaphore's count across masters",
                self.masters()
            )));
        }
        if permits == 0 {
            return Err(Error::InvalidConfig(
                "a semaphore needs at least one permit".into(),
            ));
        }
        Ok(Semaphore {
            lock: self.clone(),
            name: name.to_owned(),
            permits,
        })
    }
}

impl Semaphore {
    /// The semaphore's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The number of permits.
    pub fn permits(&self) -> u32 {
        self.permits
    }

    /// Takes a permit, waiting up to the configured wait time.
    pub async fn acquire(&self) -> Result<LockGuard> {
        let options = self.lock.options();
        self.acquire_with(options.expiry, options.wait).await
    }

    /// Takes a permit with an explicit expiry and wait time.
    pub async fn acquire_with(&self, expiry: Duration, wait: Duration) -> Result<LockGuard> {
        self.lock.acquire_claim(self.claim(), expiry, wait).await
    }

    /// One attempt: `Ok(None)` when every permit is taken.
    pub async fn try_acquire(&self, expiry: Duration) -> Result<Option<LockGuard>> {
        self.lock.try_claim(self.claim(), expiry).await
    }

    /// The current holders of a permit (see [`LockInfo`]).
    pub async fn inspect(&self) -> Result<LockInfo> {
        self.lock.inspect_claim(&self.claim()).await
    }

    fn claim(&self) -> Claimed {
        Claimed::Permit {
            name: self.name.clone(),
            limit: self.permits,
        }
    }
}
