//! The reader-writer lock: many readers or one writer, over the same masters as
//! the [`Redlock`], with writers not starved.
//!
//! A reader is a member of the lock's set of readers (each with its own
//! expiry); the writer is the lock key itself. On each master, a reader is
//! refused while a writer holds the lock **or waits for it**: the first writer
//! refused because readers hold the lock marks itself as waiting (for a few
//! retry times, refreshed by each of its attempts), so the readers drain and
//! the writer gets in next. Across masters it is a Redlock like the exclusive
//! lock: a claim counts once a majority granted it, so a writer (held on a
//! majority) and a reader (held on a majority) cannot both hold it: the two
//! majorities share a master, which refuses one of them.

use std::time::Duration;

use super::claim::Claimed;
use super::inspect::LockInfo;
use super::{LockGuard, Redlock};
use crate::error::Result;

/// A reader-writer lock, by name, over the masters of a [`Redlock`]
/// ([`Redlock::rw_lock`]). Cheap to clone.
///
/// # Concurrent callers
///
/// Any number of readers hold it at once, in every process; a writer holds it
/// alone. A writer waiting for readers to leave keeps new readers out, so a
/// steady stream of readers does not starve writers; readers waiting for a
/// writer all come in after it leaves (the release wakes one waiter per
/// process, which wakes the next reader of its process when it gets in, and
/// the rest of them poll every retry time at worst). Tasks of one process that
/// want to write queue in process, first come first served.
///
/// # Cancellation
///
/// Safe at every await: a dropped call leaves no claim behind (grants still in
/// flight are undone); a waiting writer's mark expires a few retry times after
/// its last attempt. A dropped guard is released from a spawned task.
///
/// # Errors
///
/// As [`Redlock::acquire`]: [`Error::LockTimeout`](crate::Error::LockTimeout)
/// after the wait time, [`Error::QuorumNotReached`](crate::Error::QuorumNotReached)
/// when too few masters answer.
///
/// # When the lock is lost
///
/// Both guards are [`LockGuard`]s with a watchdog and a lost-lock signal
/// ([`LockGuard::lost`]). A lost read guard means a writer may be writing:
/// what was read may be stale. A lost write guard means readers or another
/// writer may be in: stop writing, and fence what you commit
/// ([`LockGuard::fencing_token`], which every read and write acquisition of the
/// name advances).
#[derive(Debug, Clone)]
pub struct RwLock {
    lock: Redlock,
    name: String,
}

impl Redlock {
    /// The reader-writer lock `name` over this lock's masters. Its keys are
    /// `name` (the writer) and keys derived from it (see `store/claims.rs`):
    /// do not use the same name for an exclusive lock.
    pub fn rw_lock(&self, name: &str) -> RwLock {
        RwLock {
            lock: self.clone(),
            name: name.to_owned(),
        }
    }
}

impl RwLock {
    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Takes a read guard, waiting up to the configured wait time.
    pub async fn read(&self) -> Result<LockGuard> {
        let options = self.lock.options();
        self.read_with(options.expiry, options.wait).await
    }

    /// Takes a read guard with an explicit expiry and wait time.
    pub async fn read_with(&self, expiry: Duration, wait: Duration) -> Result<LockGuard> {
        self.lock
            .acquire_claim(Claimed::Read(self.name.clone()), expiry, wait)
            .await
    }

    /// One attempt at a read guard: `Ok(None)` while a writer holds or waits.
    pub async fn try_read(&self, expiry: Duration) -> Result<Option<LockGuard>> {
        self.lock
            .try_claim(Claimed::Read(self.name.clone()), expiry)
            .await
    }

    /// Takes the write guard, waiting up to the configured wait time.
    pub async fn write(&self) -> Result<LockGuard> {
        let options = self.lock.options();
        self.write_with(options.expiry, options.wait).await
    }

    /// Takes the write guard with an explicit expiry and wait time.
    pub async fn write_with(&self, expiry: Duration, wait: Duration) -> Result<LockGuard> {
        self.lock.acquire_claim(self.writer(), expiry, wait).await
    }

    /// One attempt at the write guard: `Ok(None)` while anyone holds the lock.
    /// A refusal because of readers still marks this writer as waiting (new
    /// readers are turned away for a few retry times).
    pub async fn try_write(&self, expiry: Duration) -> Result<Option<LockGuard>> {
        self.lock.try_claim(self.writer(), expiry).await
    }

    /// Who holds the lock: the writer, or the readers (see [`LockInfo`]).
    pub async fn inspect(&self) -> Result<LockInfo> {
        self.lock.inspect_claim(&self.writer()).await
    }

    fn writer(&self) -> Claimed {
        // A waiting writer's mark outlives the pause between its attempts
        // (at most 1.5 retry times, or a wake-up sooner).
        let queue = (self.lock.options().retry * 3).max(Duration::from_millis(100));
        Claimed::Write {
            name: self.name.clone(),
            queue,
        }
    }
}
