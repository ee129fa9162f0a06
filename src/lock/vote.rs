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

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

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

/// The answers to one question, as they arrive.
pub struct Votes {
    answers: mpsc::UnboundedReceiver<(usize, Result<bool>)>,
    masters: usize,
    pub yes: usize,
    pub no: usize,
    /// The masters (by index) that answered no.
    pub refused_by: Vec<usize>,
    pub failed: usize,
    pub first_error: Option<Error>,
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
            first_error: None,
        }
    }

    fn answered(&self) -> usize {
        self.yes + self.no + self.failed
    }

    /// Collects answers until `done` says the outcome is known, or all are in.
    async fn collect_until(&mut self, done: impl Fn(&Votes) -> bool) {
        while self.answered() < self.masters && !done(self) {
            match self.answers.recv().await {
                Some((_, Ok(true))) => self.yes += 1,
                Some((master, Ok(false))) => {
                    self.no += 1;
                    self.refused_by.push(master);
                }
                Some((_, Err(e))) => {
                    self.failed += 1;
                    self.first_error.get_or_insert(e);
                }
                // A task ended without answering: the runtime is shutting down.
                None => {
                    self.failed += self.masters - self.answered();
                    self.first_error.get_or_insert(Error::Abandoned);
                }
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
pub fn ask<F, Fut>(masters: &[SharedStore], question: F) -> Votes
where
    F: Fn(SharedStore) -> Fut,
    Fut: Future<Output = Result<bool>> + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    for (i, master) in masters.iter().enumerate() {
        let (tx, answer) = (tx.clone(), question(SharedStore::clone(master)));
        tokio::spawn(async move {
            let _ = tx.send((i, answer.await));
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
}

impl Ballot {
    /// Sends `SET resource token NX PX expiry` to every master.
    pub fn open(
        masters: &[SharedStore],
        resource: &str,
        token: &Token,
        expiry: Duration,
        channel: &str,
    ) -> Ballot {
        let (decision, decided) = watch::channel(Decision::Pending);
        let (tx, rx) = mpsc::unbounded_channel();
        for (i, master) in masters.iter().enumerate() {
            let (tx, mut decided) = (tx.clone(), decided.clone());
            let (master, resource, token) = (
                SharedStore::clone(master),
                resource.to_owned(),
                token.clone(),
            );
            let channel = channel.to_owned();
            tokio::spawn(async move {
                let answer = master.set_nx(&resource, token.as_bytes(), expiry).await;
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
                let _ = master.release(&resource, token.as_bytes(), publish).await;
            });
        }
        Ballot {
            votes: Votes::new(rx, masters.len()),
            decision,
            settled_at: Instant::now(),
        }
    }

    /// Waits until a majority granted, a majority refused, or all answered.
    pub async fn count(&mut self) {
        let needed = quorum(self.votes.masters);
        self.votes
            .collect_until(|v| v.yes >= needed || v.no >= needed)
            .await;
        self.settled_at = Instant::now();
    }

    /// Tells the masters' tasks what became of their grants.
    pub fn decide(&self, decision: Decision) {
        self.decision.send_replace(decision);
    }
}
