//! The load locks of many keys at once, for `get_or_load_many`: one attempt
//! sends one `CLAIM_LOADS` script per master (per chunk of keys), which takes
//! every free lock among them for one token and reports the others. It never
//! waits while holding, and no key's grant depends on another's: each key is
//! decided on its own, held when a majority of masters granted it within the
//! validity, as a single key is (`vote.rs`).
//!
//! As for a single key, the grants of keys that did not reach a majority are
//! undone by the masters' tasks once the caller has decided, and every grant
//! is undone (and published) if the caller is dropped before deciding. The
//! keys held are released together ([`LoadLocks::release`]), or, if the
//! [`LoadLocks`] is dropped unreleased (a cancelled or panicking call), from a
//! task of its own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::Redlock;
use super::quorum::{quorum, validity};
use super::redlock::Inner;
use super::token::Token;
use crate::error::{Error, Result};
use crate::stats::Stats;
use crate::store::{LoadClaim, SharedStore, Stored};

/// What one batched attempt found for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyVote {
    /// A majority granted it: this call holds its lock.
    Held,
    /// Someone else holds it: wait for its release (or its value).
    Busy,
    /// Some masters granted, no majority: nobody holds it; retry soon.
    Split,
    /// Too few masters reachable to decide.
    NoQuorum,
}

/// One batched attempt: a vote per key asked, and the locks of the keys held.
pub(crate) struct BatchAttempt {
    pub votes: Vec<KeyVote>,
    pub locks: Option<LoadLocks>,
    /// With [`Fenced`]: per key, its value as read under its fence (for the
    /// keys held).
    pub found: Option<Vec<Option<Stored>>>,
}

/// With one master that is also the value server, the attempt also takes
/// the fences of the keys it gets and reads their values, in the same script
/// (`CLAIM_LOADS_FENCED`): per key, its (value key, fence key).
pub(crate) struct Fenced {
    pub entries: Arc<Vec<(String, String)>>,
    pub fence_expiry: Duration,
}

/// The load locks one batched attempt took, under one token. Released
/// together; dropped unreleased, they are released from a task of their own.
pub(crate) struct LoadLocks {
    inner: Arc<Inner>,
    names: Arc<Vec<String>>,
    token: Token,
    released: bool,
}

impl Redlock {
    /// One attempt at the load locks of `names` (distinct), no waiting.
    pub(crate) async fn attempt_loads(
        &self,
        names: &[String],
        expiry: Duration,
        fenced: Option<Fenced>,
    ) -> Result<BatchAttempt> {
        let fenced =
            fenced.filter(|f| self.inner.masters.len() == 1 && f.entries.len() == names.len());
        let inner = &self.inner;
        let token = Token::new().map_err(|e| {
            Error::InvalidConfig(format!("the OS random number generator failed: {e}"))
        })?;
        Stats::add(&inner.stats.lock_attempts);
        let started = Instant::now();
        let masters = inner.masters.len();
        let all: Arc<Vec<String>> = Arc::new(names.to_vec());
        let (decision, decided) = watch::channel::<Option<Arc<Vec<bool>>>>(None);
        let (tx, mut answers) = mpsc::unbounded_channel();
        let channel = inner.options.channel.clone();
        for (i, master) in inner.masters.iter().enumerate() {
            let (master, all, token) =
                (SharedStore::clone(master), Arc::clone(&all), token.clone());
            let (tx, mut decided, health) =
                (tx.clone(), decided.clone(), Arc::clone(&inner.health));
            let channel = channel.clone();
            let fenced = fenced
                .as_ref()
                .map(|f| (Arc::clone(&f.entries), f.fence_expiry));
            tokio::spawn(async move {
                let refs: Vec<&str> = all.iter().map(String::as_str).collect();
                let answer = match &fenced {
                    None => master
                        .claim_loads(&refs, token.as_bytes(), expiry)
                        .await
                        .map(|granted| (granted, None)),
                    Some((entries, fence_expiry)) => {
                        let claims: Vec<LoadClaim<'_>> = refs
                            .iter()
                            .zip(entries.iter())
                            .map(|(lock, (value, fence))| LoadClaim { lock, value, fence })
                            .collect();
                        master
                            .claim_loads_fenced(&claims, token.as_bytes(), expiry, *fence_expiry)
                            .await
                            .map(|found| {
                                let granted = found.iter().map(Option::is_some).collect();
                                (
                                    granted,
                                    Some(found.into_iter().map(Option::flatten).collect()),
                                )
                            })
                    }
                };
                health.note(i, &answer.as_ref().map(|_| true).map_err(Error::clone));
                // `None`: unknown (the answer was lost), so any may be granted.
                let granted = answer.as_ref().ok().map(|(granted, _)| granted.clone());
                let _ = tx.send((i, answer));
                if granted.as_ref().is_some_and(|g| !g.contains(&true)) {
                    return;
                }
                let maybe = |j: usize| granted.as_ref().is_none_or(|g| g.get(j) == Some(&true));
                let (undo, publish): (Vec<&str>, _) = match decided.wait_for(Option::is_some).await
                {
                    Ok(keep) => {
                        let keep = keep.clone().unwrap_or_default();
                        let undo = (0..refs.len())
                            .filter(|&j| maybe(j) && keep.get(j) != Some(&true))
                            .map(|j| refs[j])
                            .collect();
                        (undo, None)
                    }
                    // The caller is gone: undo every grant, and wake whoever
                    // saw one held.
                    Err(_) => (
                        (0..refs.len())
                            .filter(|&j| maybe(j))
                            .map(|j| refs[j])
                            .collect(),
                        Some(channel.as_str()),
                    ),
                };
                if !undo.is_empty() {
                    let _ = master.unclaim_loads(&undo, token.as_bytes(), publish).await;
                }
            });
        }
        drop(tx);

        let needed = quorum(masters);
        let master_timeout = inner.options.master_timeout.min(expiry / 4);
        let stragglers_after = started + master_timeout;
        let mut yes = vec![0usize; names.len()];
        let mut answered_by = vec![false; masters];
        let (mut ok, mut error_replies, mut answered) = (0usize, 0usize, 0usize);
        let mut first_error_reply = None;
        let mut found: Option<Vec<Option<Stored>>> = None;
        let pending_alive = |answered_by: &[bool]| {
            (0..masters)
                .filter(|&i| !answered_by[i] && !inner.health.is_down(i))
                .count()
        };
        while answered < masters {
            if ok + pending_alive(&answered_by) < needed {
                break;
            }
            let now = Instant::now();
            if answered >= needed && now >= stragglers_after {
                break;
            }
            let until = if answered >= needed {
                stragglers_after
            } else {
                stragglers_after.max(now + master_timeout)
            };
            match tokio::time::timeout_at(until.into(), answers.recv()).await {
                Ok(Some((i, answer))) => {
                    answered += 1;
                    answered_by[i] = true;
                    match answer {
                        Ok((granted, values)) => {
                            ok += 1;
                            found = found.or(values);
                            for (count, granted) in yes.iter_mut().zip(granted) {
                                *count += usize::from(granted);
                            }
                        }
                        Err(e) => {
                            if e.is_error_reply() {
                                error_replies += 1;
                                first_error_reply.get_or_insert(e);
                            } else {
                                tracing::debug!(error = %e, "batched lock attempt: a master failed");
                            }
                        }
                    }
                }
                Ok(None) => break,
                Err(_) => {}
            }
        }
        let elapsed = started.elapsed();
        let valid = validity(expiry, elapsed).is_some();
        let reachable = ok + error_replies + pending_alive(&answered_by);
        let votes: Vec<KeyVote> = yes
            .iter()
            .map(|&granted| {
                if granted >= needed && valid {
                    KeyVote::Held
                } else if reachable < needed {
                    KeyVote::NoQuorum
                } else if granted > 0 && ok - granted < needed {
                    KeyVote::Split
                } else {
                    KeyVote::Busy
                }
            })
            .collect();
        let keep: Vec<bool> = votes.iter().map(|v| *v == KeyVote::Held).collect();
        let held: Vec<String> = names
            .iter()
            .zip(&keep)
            .filter(|(_, keep)| **keep)
            .map(|(name, _)| name.clone())
            .collect();
        decision.send_replace(Some(Arc::new(keep)));
        if held.is_empty()
            && masters - error_replies < needed
            && let Some(e) = first_error_reply
        {
            // Enough masters are up, but refuse the script (OOM, NOPERM...).
            return Err(e);
        }
        let locks = (!held.is_empty()).then(|| LoadLocks {
            inner: Arc::clone(inner),
            names: Arc::new(held),
            token,
            released: false,
        });
        Ok(BatchAttempt {
            votes,
            locks,
            found,
        })
    }
}

impl Redlock {
    /// No locks, under a fresh token: for keys loaded without their locks
    /// after a lost quorum (`QuorumLossPolicy::FailOpen`). The token still
    /// fences their stores; renewing and releasing do nothing.
    pub(crate) fn unlocked_loads(&self) -> Result<LoadLocks> {
        let token = Token::new().map_err(|e| {
            Error::InvalidConfig(format!("the OS random number generator failed: {e}"))
        })?;
        Ok(LoadLocks {
            inner: Arc::clone(&self.inner),
            names: Arc::new(Vec::new()),
            token,
            released: false,
        })
    }
}

impl LoadLocks {
    /// The token every lock of the batch holds (also its fences' token).
    pub fn token(&self) -> &[u8] {
        self.token.as_bytes()
    }

    /// A handle that renews these locks, for the batch's keep-alive task.
    pub fn renewer(&self) -> Renewer {
        Renewer {
            inner: Arc::clone(&self.inner),
            names: Arc::clone(&self.names),
            token: self.token.clone(),
        }
    }

    /// Releases every lock on every master, publishing each release;
    /// failures are logged (the locks then expire on their own). Every
    /// release is published, even of a key whose store already published
    /// the same message: a waiter that registered after that message (it
    /// read the key just before the store) hears only this one.
    pub async fn release(mut self) {
        self.released = true;
        let names: Vec<&str> = self.names.iter().map(String::as_str).collect();
        release(&self.inner, &names, &self.token).await;
    }
}

impl Drop for LoadLocks {
    fn drop(&mut self) {
        if !self.released {
            let (inner, names, token) = (
                Arc::clone(&self.inner),
                Arc::clone(&self.names),
                self.token.clone(),
            );
            // Outside a runtime (a process shutting down) the locks expire.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let names: Vec<&str> = names.iter().map(String::as_str).collect();
                    release(&inner, &names, &token).await;
                });
            }
        }
    }
}

/// Releases `names` on every master, publishing each release when wake-ups
/// are on.
async fn release(inner: &Inner, names: &[&str], token: &Token) {
    if names.is_empty() {
        return;
    }
    let channel = inner
        .options
        .wake_ups
        .then_some(inner.options.channel.as_str());
    let releases = inner
        .masters
        .iter()
        .map(|master| master.unclaim_loads(names, token.as_bytes(), channel));
    for result in futures_util::future::join_all(releases).await {
        if let Err(e) = result {
            tracing::debug!(locks = names.len(), error = %e, "releasing batched load locks failed on a master; they will expire");
        }
    }
}

/// Renews the locks of a [`LoadLocks`] (see [`LoadLocks::renewer`]).
#[derive(Clone)]
pub(crate) struct Renewer {
    inner: Arc<Inner>,
    names: Arc<Vec<String>>,
    token: Token,
}

impl Renewer {
    /// Compare-and-pexpire on every master: per lock, whether a majority
    /// still holds it.
    pub async fn renew(&self, expiry: Duration) -> Vec<bool> {
        if self.names.is_empty() {
            return Vec::new();
        }
        let refs: Vec<&str> = self.names.iter().map(String::as_str).collect();
        let renewals = self
            .inner
            .masters
            .iter()
            .map(|master| master.renew_loads(&refs, self.token.as_bytes(), expiry));
        let mut counts = vec![0usize; refs.len()];
        for renewed in futures_util::future::join_all(renewals)
            .await
            .into_iter()
            .flatten()
        {
            for (count, renewed) in counts.iter_mut().zip(renewed) {
                *count += usize::from(renewed);
            }
        }
        let needed = quorum(self.inner.masters.len());
        counts.into_iter().map(|n| n >= needed).collect()
    }
}
