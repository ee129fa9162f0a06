//! Redlock: a distributed lock over N independent Redis masters (N = 1 is valid),
//! as described on redis.io, with pub/sub wake-ups for waiters.
//!
//! Acquiring sends `SET resource token NX PX expiry` to every master at once; the
//! lock is held when a majority answered OK and the validity left
//! (`expiry - elapsed - drift`) is positive. Otherwise the partial acquisition is
//! undone on every master and the caller retries after a randomised delay, or
//! earlier when a release is published, until the wait time is spent. Release and
//! extension are compare-and-delete / compare-and-pexpire Lua scripts, so only the
//! holder of the token can do either.
//!
//! ```no_run
//! # async fn demo() -> Result<(), locked_cache::Error> {
//! use locked_cache::{LockOptions, Redlock};
//!
//! let lock = Redlock::connect(
//!     &["redis://10.0.0.1:6379", "redis://10.0.0.2:6379", "redis://10.0.0.3:6379"],
//!     LockOptions::default(),
//! )
//! .await?;
//! let guard = lock.acquire("lock.nightly-report").await?;
//! // ... work that must not run twice at once ...
//! guard.release().await?;
//! # Ok(()) }
//! ```

mod acquire;
mod batch;
mod claim;
mod fencing;
mod guard;
mod held;
mod inspect;
mod local;
mod multi;
mod options;
mod quorum;
mod redlock;
mod run_once;
mod rwlock;
mod semaphore;
mod token;
mod vote;
mod wakeups;
mod watchdog;

pub(crate) use acquire::{Attempt, Splits};
pub(crate) use batch::{Fenced, KeyVote, LoadLocks};
pub use guard::LockGuard;
pub use inspect::{HolderInfo, LockInfo, Owner};
pub use options::LockOptions;
pub(crate) use quorum::{jittered, split_vote_retry, validity};
pub use redlock::Redlock;
pub use run_once::RunOnce;
pub use rwlock::RwLock;
pub use semaphore::Semaphore;
pub(crate) use token::Token;
pub(crate) use wakeups::Waiter;
pub(crate) use watchdog::Watchdog;
pub use watchdog::{LockLost, LostSignal};
