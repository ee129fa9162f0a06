//! Taking a lock: one attempt on every master ([`Attempt`]) and the loop
//! around it that queues in process, waits for wake-ups and retries until the
//! wait time is spent, behind [`Redlock::acquire`], [`Redlock::try_acquire`]
//! and every other primitive.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::claim::Claimed;
use super::options::{check_expiry, check_wait};
use super::quorum::{self, quorum};
use super::token::Token;
use super::vote::{Ballot, Decision};
use super::{LockGuard, Owner, Redlock, Waiter, fencing, validity};
use crate::error::{Error, Result};
use crate::stats::Stats;
use crate::store::SharedStore;

/// What one acquisition attempt found.
pub(crate) enum Attempt {
    Acquired(LockGuard),
    /// Enough masters answered, but someone else holds the lock, or the votes
    /// split (`split`: this attempt was granted by some masters, not a majority).
    Held {
        split: bool,
    },
    /// Too few masters are reachable to reach a majority: the others refused
    /// the connection, dropped it, or did not answer within the command timeout.
    NoQuorum {
        reachable: usize,
    },
}

/// How many split votes in a row an acquisition has seen; the pause after the
/// next one doubles with each (randomised), so that contenders that keep
/// splitting the masters stop retrying in step.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Splits(u32);

impl Splits {
    /// Counts `outcome`: a split adds one, anything else starts over.
    pub(crate) fn after(&mut self, outcome: &Attempt) {
        self.0 = match outcome {
            Attempt::Held { split: true } => self.0.saturating_add(1),
            _ => 0,
        };
    }
}

impl Redlock {
    /// Takes the lock on `resource`, waiting up to the configured wait time.
    ///
    /// Errors: [`Error::LockTimeout`] when it stayed held by others,
    /// [`Error::QuorumNotReached`] when too few masters answered.
    pub async fn acquire(&self, resource: &str) -> Result<LockGuard> {
        self.acquire_with(resource, self.inner.options.expiry, self.inner.options.wait)
            .await
    }

    /// Takes the lock with an explicit expiry and wait time.
    ///
    /// Tasks of this process that want the same lock queue in process (first come,
    /// first served) and only the first of them sends commands to the masters.
    ///
    /// Cancellation: safe at every await. A call dropped while waiting leaves
    /// nothing behind; one dropped while an attempt is in flight has its grants
    /// undone by the masters' tasks (see `vote.rs`), and a guard dropped is
    /// released.
    pub async fn acquire_with(
        &self,
        resource: &str,
        expiry: Duration,
        wait: Duration,
    ) -> Result<LockGuard> {
        let claim = Claimed::Exclusive(vec![resource.to_owned()]);
        self.acquire_claim(claim, expiry, wait).await
    }

    /// One attempt, no waiting: `Ok(None)` when someone else (in this process or
    /// another) holds the lock, or when competing attempts split the votes so that
    /// nobody got a majority (try again shortly).
    pub async fn try_acquire(&self, resource: &str, expiry: Duration) -> Result<Option<LockGuard>> {
        let claim = Claimed::Exclusive(vec![resource.to_owned()]);
        self.try_claim(claim, expiry).await
    }

    /// Waits up to `wait` for `claim`: the acquisition loop of every primitive.
    /// Claims that exclude each other in process too queue in the process's
    /// line first; the caller registers for wake-ups of every name before each
    /// attempt, and sleeps until one comes or the (jittered) retry time passes.
    pub(crate) async fn acquire_claim(
        &self,
        claim: Claimed,
        expiry: Duration,
        wait: Duration,
    ) -> Result<LockGuard> {
        check_expiry(expiry)?;
        check_wait(wait)?;
        let claim = Arc::new(claim);
        let started = Instant::now();
        let deadline = started + wait;
        let turn = match claim.line() {
            Some(line) => match self.inner.lines.wait_turn(&line, deadline).await {
                Some(turn) => Some(turn),
                None => {
                    Stats::add(&self.inner.stats.lock_timeouts);
                    return Err(Error::LockTimeout {
                        resource: claim.name().to_owned(),
                        waited: started.elapsed(),
                    });
                }
            },
            None => None,
        };
        let waiters: Vec<Waiter> = claim.names().iter().map(|n| self.waiter(n)).collect();
        let mut splits = Splits::default();
        loop {
            let outcome = self.attempt_claim(&claim, expiry).await?;
            match outcome {
                Attempt::Acquired(guard) => {
                    drop(waiters);
                    self.chain_wake_up(&claim);
                    return Ok(guard
                        .with_turn(turn)
                        .watched(expiry, self.inner.options.watchdog));
                }
                Attempt::Held { .. } | Attempt::NoQuorum { .. } => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(self.wait_error(claim.name(), &outcome, now - started));
                    }
                    splits.after(&outcome);
                    let pause = self.retry_delay(&outcome, splits).min(deadline - now);
                    wait_any(&waiters, pause).await;
                }
            }
        }
    }

    /// One attempt at `claim`, no waiting (see [`try_acquire`](Self::try_acquire)).
    pub(crate) async fn try_claim(
        &self,
        claim: Claimed,
        expiry: Duration,
    ) -> Result<Option<LockGuard>> {
        check_expiry(expiry)?;
        let claim = Arc::new(claim);
        let turn = match claim.line() {
            Some(line) => match self.inner.lines.try_turn(&line) {
                Some(turn) => Some(turn),
                None => return Ok(None),
            },
            None => None,
        };
        match self.attempt_claim(&claim, expiry).await? {
            Attempt::Acquired(guard) => {
                self.chain_wake_up(&claim);
                let watchdog = self.inner.options.watchdog;
                Ok(Some(guard.with_turn(turn).watched(expiry, watchdog)))
            }
            Attempt::Held { .. } => Ok(None),
            ref outcome @ Attempt::NoQuorum { .. } => {
                Err(self.wait_error(claim.name(), outcome, Duration::ZERO))
            }
        }
    }

    /// After a reader got in, wakes the next waiter of this process for the
    /// same lock: a writer's release wakes one waiter per process, and the
    /// readers behind it may all come in too.
    fn chain_wake_up(&self, claim: &Claimed) {
        if let Claimed::Read(name) = claim
            && self.inner.listeners.is_some()
        {
            self.inner.registry.wake(name);
        }
    }

    /// A registration for release wake-ups of `resource` (or a plain sleeper when
    /// wake-ups are off). Register *before* checking whatever the lock protects.
    pub(crate) fn waiter(&self, resource: &str) -> Waiter {
        if self.inner.listeners.is_some() {
            self.inner.registry.register(resource)
        } else {
            Waiter::polling()
        }
    }

    /// Publishes a wake-up for waiters of `resource` on every master, from a
    /// task of its own (for a value stored on a server that is not a master).
    pub(crate) fn publish_wake_up(&self, resource: &str) {
        if self.inner.listeners.is_none() {
            return;
        }
        for master in &self.inner.masters {
            let master = SharedStore::clone(master);
            let (channel, resource) = (self.inner.options.channel.clone(), resource.to_owned());
            tokio::spawn(async move {
                if let Err(e) = master.publish(&channel, &resource).await {
                    tracing::debug!(resource, error = %e, "publishing a wake-up failed; waiters poll");
                }
            });
        }
    }

    /// The randomised pause before the next attempt after `outcome`. After a
    /// split vote nobody holds the lock and no release will be published, so the
    /// contenders retry after a short random pause instead of the retry time,
    /// doubling with each split in a row (`splits`, counting this one) so that
    /// contenders that keep splitting the masters fall out of step.
    pub(crate) fn retry_delay(&self, outcome: &Attempt, splits: Splits) -> Duration {
        let retry = self.inner.options.retry;
        match outcome {
            Attempt::Held { split: true } => {
                quorum::jittered(retry.min(quorum::split_vote_retry(splits.0)))
            }
            _ => quorum::jittered(retry),
        }
    }

    /// The error for a wait that ended after `outcome`.
    pub(crate) fn wait_error(&self, resource: &str, outcome: &Attempt, waited: Duration) -> Error {
        match outcome {
            Attempt::NoQuorum { reachable } => Error::QuorumNotReached {
                resource: resource.to_owned(),
                reachable: *reachable,
                masters: self.inner.masters.len(),
                quorum: quorum(self.inner.masters.len()),
            },
            _ => {
                Stats::add(&self.inner.stats.lock_timeouts);
                Error::LockTimeout {
                    resource: resource.to_owned(),
                    waited,
                }
            }
        }
    }

    /// One attempt at an exclusive lock on `resource` (the cache's).
    pub(crate) async fn attempt(&self, resource: &str, expiry: Duration) -> Result<Attempt> {
        // A load's claim: its fencing counter lives no longer than the lock.
        let claim = Arc::new(Claimed::Load(resource.to_owned()));
        self.attempt_claim(&claim, expiry).await
    }

    /// Sends the claim to every master at once and counts the grants, deciding
    /// as soon as a majority answered alike (see `vote.rs`); when granted, makes
    /// the fencing tokens known to a majority (see `fencing.rs`).
    pub(crate) async fn attempt_claim(
        &self,
        claim: &Arc<Claimed>,
        expiry: Duration,
    ) -> Result<Attempt> {
        let token = Token::new().map_err(|e| {
            Error::InvalidConfig(format!("the OS random number generator failed: {e}"))
        })?;
        Stats::add(&self.inner.stats.lock_attempts);
        let started = Instant::now();
        let health = &self.inner.health;
        let owner = Owner::here(std::time::SystemTime::now()).encode();
        let mut ballot = Ballot::open(
            &self.inner.masters,
            health,
            claim,
            &token,
            expiry,
            &owner,
            &self.inner.options.channel,
        );
        ballot
            .count(
                health,
                started,
                self.inner.options.master_timeout.min(expiry / 4),
            )
            .await;
        let elapsed = ballot.settled_at - started;
        let votes = &ballot.votes;
        let masters = self.inner.masters.len();
        let needed = quorum(masters);
        if votes.yes >= needed
            && let Some(validity) = validity(expiry, elapsed)
        {
            ballot.decide(Decision::Keep);
            let (fences, up_to_date) =
                fencing::settle(&ballot.grants.lock().unwrap_or_else(|e| e.into_inner()));
            // The validity counts from when the grants were in.
            let guard = LockGuard::new(
                Arc::clone(&self.inner),
                Arc::clone(claim),
                token,
                fences.clone(),
                ballot.settled_at + validity,
            );
            if fencing::must_raise(up_to_date, masters)
                && !self.inner.raise_fences(claim, &fences).await
            {
                // The guard releases the lock as it drops; nobody could
                // count on its tokens.
                return Ok(Attempt::Held { split: true });
            }
            return Ok(Attempt::Acquired(guard));
        }
        // Undo the partial acquisition, including grants still to arrive and
        // masters whose answer was lost. Not published: the lock was never held,
        // and waking waiters for a split vote would only start the next one.
        ballot.decide(Decision::Undo);
        let resource = claim.name();
        if let Some(e) = &votes.first_error {
            tracing::debug!(resource, error = %e, granted = votes.yes, "lock attempt: a master failed");
        }
        // Masters that answered, with an error reply or not, are up; so are those
        // still to answer that are not known to be down (a straggler).
        let answered = votes.yes + votes.no + votes.error_replies;
        let reachable = answered + votes.pending_alive(health);
        if reachable < needed {
            return Ok(Attempt::NoQuorum { reachable });
        }
        if masters - votes.error_replies < needed
            && let Some(e) = &votes.first_error_reply
        {
            // Enough masters are up, but refuse the command (OOM, NOPERM...):
            // no retry will reach a majority until that changes.
            return Err(e.clone());
        }
        Ok(Attempt::Held {
            // Some masters granted and no majority refused: nobody may hold the
            // lock (the votes split, or a straggler did not answer in time), so
            // retry soon rather than wait for a release that may never come.
            split: votes.yes > 0 && votes.no < needed,
        })
    }
}

/// Sleeps until one of `waiters` is woken or `max` passes.
async fn wait_any(waiters: &[Waiter], max: Duration) {
    match waiters {
        [] => tokio::time::sleep(max).await,
        [one] => {
            one.wait(max).await;
        }
        many => {
            let waits = many.iter().map(|w| Box::pin(w.wait(max)));
            futures_util::future::select_all(waits).await;
        }
    }
}
