//! Run once per window: an action that runs at most once per time window
//! across every process that shares the masters.
//!
//! The window is a lock on the key that is taken for the window's length and
//! never released: whoever gets it (a majority of masters) runs the action;
//! everyone else in that window is told it was done elsewhere. It expires at
//! the window's end, and the next call after that runs the action again.

use std::future::Future;
use std::time::{Duration, Instant};

use super::claim::Claimed;
use super::options::check_expiry;
use super::{Attempt, Redlock, Splits};
use crate::error::Result;

/// What [`Redlock::run_once`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum RunOnce<T> {
    /// This caller ran the action, which returned this.
    Ran(T),
    /// Another caller (in this process or another) took the current window.
    Skipped,
}

impl<T> RunOnce<T> {
    /// True when this caller ran the action.
    pub fn ran(&self) -> bool {
        matches!(self, RunOnce::Ran(_))
    }
}

impl Redlock {
    /// Runs `action` unless it already ran in the current `window` for `key`,
    /// anywhere: across every caller, process and host that shares the
    /// masters, it runs at most once per window. Says whether this caller ran
    /// it ([`RunOnce::Ran`] with its output) or not ([`RunOnce::Skipped`]).
    ///
    /// The window starts when a caller takes it (not on a fixed clock) and is
    /// consumed whatever the action does: an action that fails or panics is not
    /// run again until the window ends. An action that takes longer than the
    /// window may overlap the next window's run. `key` is a lock name: do not
    /// use the same name for a lock.
    ///
    /// Concurrent callers: exactly one of a burst runs the action (a caller is
    /// told [`RunOnce::Skipped`] only once it saw another holding the window on
    /// a majority of masters; in the rare case that holder's own acquisition
    /// then fails, for instance its validity ran out while it was counting
    /// votes, nobody runs it in that window), unless the masters are unreachable (then [`Error::QuorumNotReached`](crate::Error::QuorumNotReached)
    /// and nobody runs it). When the attempts of several callers split the
    /// masters' votes, they retry within the configured wait time (then
    /// [`Error::LockTimeout`](crate::Error::LockTimeout)).
    ///
    /// Cancellation: dropped before it took the window, nothing is left; after,
    /// the window stays taken (the action may not have run).
    ///
    /// ```no_run
    /// # async fn demo(lock: locked_cache::Redlock) -> Result<(), locked_cache::Error> {
    /// use std::time::Duration;
    ///
    /// let run = lock
    ///     .run_once("job.hourly-digest", Duration::from_secs(3600), || async {
    ///         // send the digest
    ///     })
    ///     .await?;
    /// println!("this instance sent the digest: {}", run.ran());
    /// # Ok(()) }
    /// ```
    pub async fn run_once<F, Fut, T>(
        &self,
        key: &str,
        window: Duration,
        action: F,
    ) -> Result<RunOnce<T>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        check_expiry(window)?;
        let claim = std::sync::Arc::new(Claimed::Exclusive(vec![key.to_owned()]));
        let started = Instant::now();
        let deadline = started + self.inner.options.wait;
        // One contender per process (the others queue here, and are then
        // told about the window at once): a burst does not split the votes.
        let Some(_turn) = self.inner.lines.wait_turn(key, deadline).await else {
            let outcome = Attempt::Held { split: false };
            return Err(self.wait_error(key, &outcome, started.elapsed()));
        };
        let mut splits = Splits::default();
        loop {
            let outcome = self.attempt_claim(&claim, window).await?;
            match outcome {
                Attempt::Acquired(guard) => {
                    guard.keep_until_expiry();
                    return Ok(RunOnce::Ran(action().await));
                }
                // Refused by a majority: by the window's holder, or by
                // contenders that split the masters between them and are
                // undoing their grants (then nobody holds it: try again).
                Attempt::Held { split: false }
                    if self.inspect_claim(&claim).await?.holding().next().is_some() =>
                {
                    return Ok(RunOnce::Skipped);
                }
                Attempt::Held { .. } | Attempt::NoQuorum { .. } => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(self.wait_error(key, &outcome, now - started));
                    }
                    splits.after(&outcome);
                    let pause = self.retry_delay(&outcome, splits).min(deadline - now);
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }
}
