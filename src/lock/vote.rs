//! Asking every master at once, and settling as soon as the answer is known.
//!
//! Each question goes to each master from a task of its own, so the caller stops
//! waiting once a majority has answered the same way: one stalled master (not
//! down, just slow) costs nothing while the others answer. The tasks run to the
//! end in the background, so a late answer is still acted on:
//!
//! - for an acquisition, a master that granted (or whose answer was lost) waits
//!   for the caller's [`Decision`]: keep the grant (the lock was taken; the guard
//!   releases it later), or undo it. If the caller is dropped before it decided (a
//!   cancelled `get_or_load`), the grant is undone and the release published, so
//!   no lock is left that nobody holds.
//! - releases and extensions simply complete.
//!
//! An acquisition does not wait long for a straggler: once a majority has
//! answered without deciding (the votes split, or an error reply) and the
//! per-master timeout has passed, it settles; and it settles at once when a
//! majority can no longer be reached, counting masters whose last command found
//! them unreachable ([`Health`]) as lost. This is the Redlock spec's per-master
//! timeout: a stalled master (no answer, no refusal) costs an attempt that
//! timeout, not the command timeout.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::claim::Claimed;
use super::quorum::quorum;
use super::token::Token;
use crate::error::{Error, Result};
use crate::store::SharedStore;

/// What the caller decided about an acquisition's grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Pending,
    /// The lock was taken: grants stay (the guard releases them).
    Keep,
    /// No lock: undo the grants, without waking anyone (nobody held the lock).
    Undo,
}

/// Which masters were unreachable at their last command (connection refused or
/// dropped, no answer within the command timeout). An acquisition does not wait
/// for such a master once the others have answered: it counts as lost until it
/// answers again.
#[derive(Debug)]
pub struct Health {
    down: Vec<AtomicBool>,
}

impl Health {
    pub fn new(masters: usize) -> Arc<Health> {
        Arc::new(Health {
            down: (0..masters).map(|_| AtomicBool::new(false)).collect(),
        })
    }

    pub(super) fn is_down(&self, master: usize) -> bool {
        self.down[master].load(Ordering::Relaxed)
    }

    /// Records what master `master` answered: an answer or an error reply means
    /// it is up; a connection failure or timeout, down.
    pub(super) fn note(&self, master: usize, answer: &Result<bool>) {
        let down = match answer {
            Ok(_) => false,
            Err(e) if e.is_error_reply() => false,
            Err(e) if e.is_connection_error() => true,
            Err(_) => return,
        };
        self.down[master].store(down, Ordering::Relaxed);
    }
}

/// The answers to one question, as they arrive.
pub struct Votes {
    answers: mpsc::UnboundedReceiver<(usize, Result<bool>)>,
    masters: usize,
    pub yes: usize,
    pub no: usize,
    /// The masters (by index) that answered no.
    pub refused_by: Vec<usize>,
    /// Masters that failed: unreachable, or answered with an error reply.
    pub failed: usize,
    /// Of those, the ones that answered with an error reply (they are up).
    pub error_replies: usize,
    pub first_error: Option<Error>,
    /// The first error reply (`OOM`, `NOPERM`, `READONLY`...).
    pub first_error_reply: Option<Error>,
    answered_by: Vec<bool>,
}

impl Votes {
    fn new(answers: mpsc::UnboundedReceiver<(usize, Result<bool>)>, masters: usize) -> Votes {
        Votes {
            answers,
            masters,
            yes: 0,
            no: 0,
            refused_by: Vec::new(),
            failed: 0,
            error_replies: 0,
            first_error: None,
            first_error_reply: None,
            answered_by: vec![false; masters],
        }
    }

    fn answered(&self) -> usize {
        self.yes + self.no + self.failed
    }

    /// Masters yet to answer that are not known to be down.
    pub fn pending_alive(&self, health: &Health) -> usize {
        (0..self.masters)
            .filter(|&i| !self.answered_by[i] && !health.is_down(i))
            .count()
    }

    fn record(&mut self, master: usize, answer: Result<bool>) {
        self.answered_by[master] = true;
        match answer {
            Ok(true) => self.yes += 1,
            Ok(false) => {
                self.no += 1;
                self.refused_by.push(master);
            }
            Err(e) => {
                self.failed += 1;
                if e.is_error_reply() {
                    self.error_replies += 1;
                    self.first_error_reply.get_or_insert_with(|| e.clone());
                }
                self.first_error.get_or_insert(e);
            }
        }
    }

    /// Takes the next answer, or returns false when no more can come (every
    /// task ended: the runtime is shutting down) or `until` passed.
    async fn next(&mut self, until: Option<Instant>) -> bool {
        let answer = match until {
            Some(until) => match tokio::time::timeout_at(until.into(), self.answers.recv()).await {
                Ok(answer) => answer,
                Err(_) => return false,
            },
            None => self.answers.recv().await,
        };
        match answer {
            Some((master, answer)) => {
                self.record(master, answer);
                true
            }
            None => {
                for i in 0..self.masters {
                    if !self.answered_by[i] {
                        self.record(i, Err(Error::Abandoned));
                    }
                }
                false
            }
        }
    }

    /// Collects answers until `done` says the outcome is known, or all are in.
    async fn collect_until(&mut self, done: impl Fn(&Votes) -> bool) {
        while self.answered() < self.masters && !done(self) {
            if !self.next(None).await {
                return;
            }
        }
    }

    /// Waits until a majority said yes (true), or a majority can no longer (false,
    /// or the first error when failed masters might have said yes).
    pub async fn majority(mut self) -> Result<bool> {
        let needed = quorum(self.masters);
        self.collect_until(|v| v.yes >= needed || v.no > v.masters - needed)
            .await;
        self.verdict()
    }

    /// Waits until a majority said yes, or all answered.
    pub async fn all_or_majority(&mut self) {
        let needed = quorum(self.masters);
        self.collect_until(|v| v.yes >= needed).await;
    }

    /// True with a majority of yes; false when that is out of reach even
    /// counting the failed masters; otherwise the first error (unknown).
    pub fn verdict(self) -> Result<bool> {
        let needed = quorum(self.masters);
        if self.yes >= needed {
            return Ok(true);
        }
        if self.yes + self.failed < needed {
            return Ok(false);
        }
        Err(self.first_error.unwrap_or(Error::Abandoned))
    }
}

/// Sends one question to every master; answers arrive on the returned [`Votes`].
pub fn ask<F, Fut>(masters: &[SharedStore], health: &Arc<Health>, question: F) -> Votes
where
    F: Fn(SharedStore) -> Fut,
    Fut: Future<Output = Result<bool>> + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    for (i, master) in masters.iter().enumerate() {
        let (tx, answer) = (tx.clone(), question(SharedStore::clone(master)));
        let health = Arc::clone(health);
        tokio::spawn(async move {
            let answer = answer.await;
            health.note(i, &answer);
            let _ = tx.send((i, answer));
        });
    }
    Votes::new(rx, masters.len())
}

/// An acquisition in progress: the grants, and the decision the masters' tasks
/// wait for.
pub struct Ballot {
    pub votes: Votes,
    decision: watch::Sender<Decision>,
    /// When enough grants were in, for the validity.
    pub settled_at: Instant,
    /// The fencing tokens each master granted, by master.
    pub grants: Arc<Mutex<Vec<Option<Vec<u64>>>>>,
}

impl Ballot {
    /// Sends the claim (for an exclusive lock: `SET resource token NX PX
    /// expiry`, and the fencing counter's increment) to every master.
    pub fn open(
        masters: &[SharedStore],
        health: &Arc<Health>,
        claim: &Arc<Claimed>,
        token: &Token,
        expiry: Duration,
        owner: &str,
        channel: &str,
    ) -> Ballot {
        let (decision, decided) = watch::channel(Decision::Pending);
        let (tx, rx) = mpsc::unbounded_channel();
        let grants = Arc::new(Mutex::new(vec![None; masters.len()]));
        for (i, master) in masters.iter().enumerate() {
            let (tx, mut decided) = (tx.clone(), decided.clone());
            let (master, claim, token) =
                (SharedStore::clone(master), Arc::clone(claim), token.clone());
            let (channel, owner) = (channel.to_owned(), owner.to_owned());
            let (health, grants) = (Arc::clone(health), Arc::clone(&grants));
            tokio::spawn(async move {
                let answer = master
                    .claim(claim.as_claim(), token.as_bytes(), expiry, &owner)
                    .await
                    .map(|granted| match granted {
                        Some(fences) => {
                            grants.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(fences);
                            true
                        }
                        None => false,
                    });
                health.note(i, &answer);
                let maybe_granted = !matches!(answer, Ok(false));
                let _ = tx.send((i, answer));
                if !maybe_granted {
                    return;
                }
                let publish = match decided.wait_for(|d| *d != Decision::Pending).await {
                    Ok(d) if *d == Decision::Keep => return,
                    Ok(_) => None,
                    // The caller is gone: someone may have seen the lock held.
                    Err(_) => Some(channel.as_str()),
                };
                let _ = master
                    .unclaim(claim.as_claim(), token.as_bytes(), publish)
                    .await;
            });
        }
        Ballot {
            votes: Votes::new(rx, masters.len()),
            decision,
            settled_at: Instant::now(),
            grants,
        }
    }

    /// Waits until a majority granted, a majority refused, or all answered; or,
    /// undecided, until a majority can no longer be reached (masters known to be
    /// down counting as lost), or until `master_timeout` has passed since
    /// `started` with a majority of the answers in.
    pub async fn count(&mut self, health: &Health, started: Instant, master_timeout: Duration) {
        let votes = &mut self.votes;
        let needed = quorum(votes.masters);
        let stragglers_after = started + master_timeout;
        loop {
            let answered = votes.answered();
            if votes.yes >= needed || votes.no >= needed || answered == votes.masters {
                break;
            }
            if votes.yes + votes.pending_alive(health) < needed {
                break;
            }
            let now = Instant::now();
            let until = (answered >= needed).then_some(stragglers_after);
            if until.is_some_and(|until| now >= until) {
                break;
            }
            // Wake at the straggler deadline even while fewer than a majority
            // answered, to look again at which masters are known to be down.
            let until = until.unwrap_or(stragglers_after.max(now + master_timeout));
            votes.next(Some(until)).await;
        }
        self.settled_at = Instant::now();
    }

    /// Tells the masters' tasks what became of their grants.
    pub fn decide(&self, decision: Decision) {
        self.decision.send_replace(decision);
    }
}
