//! The keys a batch leads or follows (from `many_call.rs`): flights of this
//! process followed; the led keys' locks taken in one attempt per master
//! (`lock/batch.rs`), the keys held loaded with one loader call and stored
//! with one fenced store, the others waited for and tried again.

use super::keepalive::EntrySettings;
use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Inner;
use super::flight::{self, Sharing};
use super::many::{Answer, Led, add_n};
use super::options::Resolved;
use crate::cache::QuorumLossPolicy;
use crate::codec::Codec;
use crate::error::{Error, LoadError};
use crate::lock::{Fenced, KeyVote, LoadLocks, jittered, split_vote_retry};
use crate::stats::Stats;
use crate::store::{FencedWrite, Stored};

/// A loaded value, encoded: its key's TTL (`None`: not stored) and bytes.
type Encoded = std::result::Result<(Option<Duration>, Vec<u8>), Error>;

impl<C: Codec> Inner<C> {
    /// Waits for the flights other calls of this process lead. `None` for a
    /// key whose leader went away (or failed in a way that is not this
    /// call's): it is led on the next pass.
    pub(super) async fn follow_many<V, E>(
        &self,
        followed: Vec<(usize, tokio::sync::watch::Receiver<Option<flight::Outcome>>)>,
        sharing: Option<Sharing<V>>,
        options: &Resolved,
        deadline: Instant,
    ) -> Vec<(usize, Option<Answer<V, E>>)>
    where
        V: DeserializeOwned,
        E: Send + Sync + 'static,
    {
        let until = deadline + self.command_timeout * 2;
        let waits = followed.into_iter().map(|(i, rx)| async move {
            let outcome = tokio::time::timeout_at(until.into(), flight::outcome(rx)).await;
            let answer = match outcome {
                Err(_) => None,
                Ok(flight::Outcome::Value(bytes, shared)) => {
                    let taken = sharing.zip(shared).and_then(|(s, v)| (s.take)(&v));
                    Some(match taken {
                        Some(value) => Ok((Some(value), Some(bytes))),
                        None => self
                            .decode_got(&bytes)
                            .map(|v| (v, Some(bytes)))
                            .map_err(LoadError::Cache),
                    })
                }
                Ok(flight::Outcome::LoaderError(shared)) => shared
                    .downcast::<E>()
                    .ok()
                    .map(|e| Err(LoadError::Loader(e))),
                Ok(flight::Outcome::Failed(Error::LoadTimeout { .. }))
                    if options.hard_timeout.is_none() =>
                {
                    None
                }
                Ok(flight::Outcome::Failed(e)) => Some(Err(LoadError::Cache(e))),
                Ok(flight::Outcome::Abandoned) => None,
            };
            (i, answer)
        });
        futures_util::future::join_all(waits).await
    }

    /// The keys this call leads: their locks in one attempt per master, the
    /// load of those held, and waiting (then trying again) for the others.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn lead_many<V, E, F, Fut, R>(
        &self,
        mut led: Vec<Led<'_, V>>,
        loader: &mut F,
        options: &Resolved,
        sharing: Option<Sharing<V>>,
        started: Instant,
        deadline: Instant,
    ) -> Vec<(usize, Answer<V, E>)>
    where
        V: Serialize + DeserializeOwned + Send + 'static,
        E: Send + Sync + 'static,
        F: FnMut(Vec<String>) -> Fut,
        Fut: Future<Output = std::result::Result<R, E>>,
        R: IntoIterator<Item = (String, V)>,
    {
        let mut done = Vec::with_capacity(led.len());
        if led.is_empty() {
            return done;
        }
        let expiry = self.lock.options().expiry;
        // Registered before the first attempt: a release after it wakes us.
        let mut waiters: Vec<_> = led.iter().map(|l| self.lock.waiter(&l.keys.lock)).collect();
        let mut splits = 0u32;
        loop {
            let names: Vec<String> = led.iter().map(|l| l.keys.lock.clone()).collect();
            // One master that is also the value server: the fences and the
            // double check ride on the lock script (one round trip fewer).
            let fenced =
                (self.lock.masters() == 1 && !self.separate_value_server).then(|| Fenced {
                    entries: Arc::new(
                        led.iter()
                            .map(|l| (l.keys.value.clone(), l.keys.fence.clone()))
                            .collect(),
                    ),
                    fence_expiry: expiry * 2,
                });
            let attempt = match self.lock.attempt_loads(&names, expiry, fenced).await {
                Ok(attempt) => attempt,
                Err(e) => {
                    for l in led {
                        done.push(self.finish_led(l, Err(LoadError::Cache(e.clone())), sharing));
                    }
                    return done;
                }
            };
            let mut held = Vec::new();
            let mut prefetched = attempt.found.as_ref().map(|_| Vec::new());
            let mut busy = Vec::new();
            let mut busy_waiters = Vec::new();
            let mut no_quorum = false;
            let mut split = false;
            // Keys whose quorum is lost, loaded without their locks under
            // `QuorumLossPolicy::FailOpen` (as a single key would be).
            let mut open = Vec::new();
            let fail_open = self.quorum_loss == QuorumLossPolicy::FailOpen;
            let mut found = attempt.found.map(Vec::into_iter);
            for ((l, vote), waiter) in led.into_iter().zip(&attempt.votes).zip(waiters) {
                let value = found.as_mut().and_then(Iterator::next).flatten();
                match vote {
                    KeyVote::Held => {
                        if let Some(prefetched) = &mut prefetched {
                            prefetched.push(value);
                        }
                        held.push(l);
                    }
                    // A refresh someone else holds: they refresh it; serve the
                    // stale value.
                    _ if l.refresh.is_some() => {
                        let mut l = l;
                        if let Some((_, got)) = l.refresh.take() {
                            if !l.served {
                                Stats::add(&self.stats.stale_served);
                            }
                            done.push(self.finish_led(l, Ok(got), sharing));
                        }
                    }
                    KeyVote::NoQuorum if fail_open => open.push(l),
                    vote => {
                        no_quorum |= *vote == KeyVote::NoQuorum;
                        split |= *vote == KeyVote::Split;
                        busy.push(l);
                        busy_waiters.push(waiter);
                    }
                }
            }
            if let Some(locks) = attempt.locks {
                let loaded = self
                    .load_held(held, prefetched, locks, loader, options, sharing)
                    .await;
                done.extend(loaded);
            }
            if !open.is_empty() {
                add_n(&self.stats.fail_open_loads, open.len());
                tracing::warn!(
                    keys = open.len(),
                    "lock quorum lost: loading a batch's keys without their locks (fail-open)"
                );
                match self.lock.unlocked_loads() {
                    Ok(unlocked) => {
                        let loaded = self
                            .load_held(open, None, unlocked, loader, options, sharing)
                            .await;
                        done.extend(loaded);
                    }
                    Err(e) => {
                        for l in open {
                            done.push(self.finish_led(
                                l,
                                Err(LoadError::Cache(e.clone())),
                                sharing,
                            ));
                        }
                    }
                }
            }
            if busy.is_empty() {
                return done;
            }
            let now = Instant::now();
            if now >= deadline {
                for l in busy {
                    let error = if no_quorum {
                        Error::QuorumNotReached {
                            resource: l.keys.lock.clone(),
                            reachable: 0,
                            masters: self.lock.masters(),
                            quorum: self.lock.masters() / 2 + 1,
                        }
                    } else {
                        Stats::add(&self.stats.lock_timeouts);
                        Error::LockTimeout {
                            resource: l.keys.lock.clone(),
                            waited: started.elapsed(),
                        }
                    };
                    done.push(self.finish_led(l, Err(LoadError::Cache(error)), sharing));
                }
                return done;
            }
            let retry = self.lock.options().retry;
            let pause = if split {
                splits += 1;
                jittered(retry.min(split_vote_retry(splits)))
            } else {
                splits = 0;
                jittered(retry)
            };
            let pause = pause.min(deadline - now);
            {
                let _waiting = self.telemetry.waiting();
                let waits = busy_waiters.iter().map(|w| Box::pin(w.wait(pause)));
                futures_util::future::select_all(waits).await;
            }
            // Read again: the holders store before they release.
            let value_keys: Vec<&str> = busy.iter().map(|l| l.keys.value.as_str()).collect();
            let found = match self
                .value_store
                .get_many(&value_keys, options.reads_ttl())
                .await
            {
                Ok(found) => self.screen_many(found).await,
                Err(e) => Err(e),
            };
            let found = match found {
                Ok(found) => found,
                Err(e) => {
                    for l in busy {
                        done.push(self.finish_led(l, Err(LoadError::Cache(e.clone())), sharing));
                    }
                    return done;
                }
            };
            led = Vec::new();
            waiters = Vec::new();
            for ((l, found), waiter) in busy.into_iter().zip(found).zip(busy_waiters) {
                let usable = found
                    .and_then(|s| self.decode_entry::<V>(&l.keys.value, s, true))
                    .filter(|f| f.usable(options));
                match usable {
                    Some(found) => {
                        Stats::add(&self.stats.found_while_waiting);
                        let got = (found.value, Some(Arc::new(found.bytes)));
                        done.push(self.finish_led(l, Ok(got), sharing));
                    }
                    None => {
                        led.push(l);
                        waiters.push(waiter);
                    }
                }
            }
            if led.is_empty() {
                return done;
            }
        }
    }

    /// Holding the locks of `held`: the double check and fence in one round
    /// trip, the loader once for what is still missing, one fenced store,
    /// the flights handed their values, the locks released.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn load_held<V, E, F, Fut, R>(
        &self,
        held: Vec<Led<'_, V>>,
        prefetched: Option<Vec<Option<Stored>>>,
        locks: LoadLocks,
        loader: &mut F,
        options: &Resolved,
        sharing: Option<Sharing<V>>,
    ) -> Vec<(usize, Answer<V, E>)>
    where
        V: Serialize + DeserializeOwned + Send + 'static,
        E: Send + Sync + 'static,
        F: FnMut(Vec<String>) -> Fut,
        Fut: Future<Output = std::result::Result<R, E>>,
        R: IntoIterator<Item = (String, V)>,
    {
        let mut done = Vec::with_capacity(held.len());
        let expiry = self.lock.options().expiry;
        let fence_expiry = expiry * 2;
        let entries: Vec<(&str, &str)> = held
            .iter()
            .map(|l| (l.keys.value.as_str(), l.keys.fence.as_str()))
            .collect();
        let found = match prefetched {
            Some(found) => Ok(found),
            None => {
                self.value_store
                    .get_or_fence_many(&entries, locks.token(), fence_expiry)
                    .await
            }
        };
        // Invalidated (tags on): as missing. And the marks of what this batch
        // will store, as of now, before the loader reads anything.
        let found = match found {
            Ok(found) => self.screen_many(found).await,
            Err(e) => Err(e),
        };
        let marks = match found {
            Ok(_) => self.marks_for(&options.tags).await.map(Some),
            Err(_) => Ok(None),
        };
        let (found, marks) = match (found, marks) {
            (Ok(found), Ok(marks)) => (Ok(found), marks.flatten()),
            (Err(e), _) | (_, Err(e)) => (Err(e), None),
        };
        let found = match found {
            Ok(found) => found,
            Err(e) => {
                locks.release().await;
                for l in held {
                    done.push(self.finish_led(l, Err(LoadError::Cache(e.clone())), sharing));
                }
                return done;
            }
        };
        let mut to_load = Vec::new();
        for (l, found) in held.into_iter().zip(found) {
            let found = found.and_then(|s| self.decode_entry::<V>(&l.keys.value, s, false));
            if let Some(found) = found {
                let skip = match &l.refresh {
                    Some((old, _)) => found.bytes != old.bytes || found.ttl_left > old.ttl_left,
                    None => found.usable(options),
                };
                if skip {
                    Stats::add(&self.stats.found_while_waiting);
                    let got = (found.value, Some(Arc::new(found.bytes)));
                    done.push(self.finish_led(l, Ok(got), sharing));
                    continue;
                }
            }
            to_load.push(l);
        }
        if to_load.is_empty() {
            locks.release().await;
            return done;
        }

        // The keep-alive: the locks and the fences, every third of the expiry.
        let renewer = locks.renewer();
        let fences: Vec<String> = to_load.iter().map(|l| l.keys.fence.clone()).collect();
        let (store, token) = (Arc::clone(&self.value_store), locks.token().to_vec());
        let keepalive = AbortOnDrop::new(&tokio::spawn(async move {
            loop {
                tokio::time::sleep(expiry / 3).await;
                let held = renewer.renew(expiry).await;
                let lost = held.iter().filter(|h| !**h).count();
                if lost > 0 {
                    tracing::warn!(
                        lost,
                        "batched load: locks lost during the load; their values are stored only if nobody took over"
                    );
                }
                let refs: Vec<&str> = fences.iter().map(String::as_str).collect();
                if let Err(e) = store.renew_loads(&refs, &token, fence_expiry).await {
                    tracing::debug!(error = %e, "extending the batch's fences failed");
                }
            }
        }));

        let asked: Vec<String> = to_load.iter().map(|l| l.key.clone()).collect();
        Stats::add(&self.stats.loads);
        let began = Instant::now();
        let output = {
            let _loading = self.telemetry.loading();
            match AssertUnwindSafe(loader(asked.clone())).catch_unwind().await {
                Ok(output) => output,
                Err(panic) => {
                    Stats::add(&self.stats.load_errors);
                    std::panic::resume_unwind(panic)
                }
            }
        };
        let load_time = began.elapsed();
        self.telemetry.load_took(load_time);
        drop(keepalive);

        let found = match output {
            Ok(found) => found,
            Err(e) => {
                Stats::add(&self.stats.load_errors);
                let e = Arc::new(e);
                locks.release().await;
                for mut l in to_load {
                    let answer = match l.refresh.take() {
                        // Fail-safe: the stale value rather than the error.
                        Some((_, got)) if options.fail_safe => {
                            Stats::add(&self.stats.fail_safe_served);
                            Ok(got)
                        }
                        _ => Err(LoadError::Loader(Arc::clone(&e))),
                    };
                    done.push(self.finish_led(l, answer, sharing));
                }
                return done;
            }
        };
        let mut by_key: HashMap<&str, usize> = asked
            .iter()
            .enumerate()
            .map(|(j, k)| (k.as_str(), j))
            .collect();
        let mut values: Vec<Option<V>> = (0..asked.len()).map(|_| None).collect();
        let mut unasked = 0usize;
        for (key, value) in found {
            match by_key.remove(key.as_str()) {
                Some(j) => values[j] = Some(value),
                None => unasked += 1,
            }
        }
        if unasked > 0 {
            tracing::warn!(
                unasked,
                asked = asked.len(),
                "the batch loader returned keys it was not asked for (or a key twice); ignored"
            );
        }

        // Encode, then one fenced store.
        let mut encoded: Vec<(Led<'_, V>, Option<V>, Encoded)> = Vec::with_capacity(to_load.len());
        for ((l, value), key) in to_load.into_iter().zip(values).zip(&asked) {
            let stored = match &value {
                Some(value) => self.encode_loaded(
                    key,
                    value,
                    load_time,
                    options,
                    EntrySettings::default(),
                    marks.as_ref(),
                ),
                None => self.encode_loaded(
                    key,
                    &None::<()>,
                    load_time,
                    options,
                    EntrySettings::default(),
                    marks.as_ref(),
                ),
            };
            encoded.push((l, value, stored));
        }
        let wake_ups = self.lock.options().wake_ups;
        let in_script = (wake_ups && !self.separate_value_server)
            .then_some(self.lock.options().channel.as_str());
        let writes: Vec<FencedWrite<'_>> = encoded
            .iter()
            .filter_map(|(l, _, stored)| match stored {
                Ok((Some(ttl), bytes)) => Some(FencedWrite {
                    key: &l.keys.value,
                    fence: &l.keys.fence,
                    value: bytes,
                    ttl: *ttl,
                    message: &l.keys.lock,
                }),
                _ => None,
            })
            .collect();
        let stored = if writes.is_empty() {
            Ok(Vec::new())
        } else {
            self.value_store
                .set_fenced_many(&writes, locks.token(), in_script)
                .await
        };
        match &stored {
            Ok(flags) => {
                let refused = flags.iter().filter(|f| !**f).count();
                if refused > 0 {
                    add_n(&self.stats.writes_refused, refused);
                    tracing::warn!(
                        refused,
                        "batched load: some fences were taken during the load (a newer holder, or set/invalidate): values returned, not stored"
                    );
                }
                let stored_keys = writes.iter().zip(flags).filter(|(_, f)| **f);
                if wake_ups && self.separate_value_server {
                    for (w, _) in stored_keys.clone() {
                        self.lock.publish_wake_up(w.message);
                    }
                }
                self.changed_many(stored_keys.map(|(w, _)| w.key)).await;
            }
            Err(e) => {
                Stats::add(&self.stats.store_errors);
                tracing::warn!(error = %e, keys = writes.len(), "storing the batch's loaded values failed; returning them uncached");
            }
        }
        drop(writes);
        for (l, value, stored) in encoded {
            let answer = match stored {
                Ok((_, bytes)) => Ok((value, Some(Arc::new(bytes)))),
                Err(e) => Err(LoadError::Cache(e)),
            };
            done.push(self.finish_led(l, answer, sharing));
        }
        // The waiters were woken by the store; the release needs no waiting
        // for (and a dropped call would release from a task anyway).
        tokio::spawn(locks.release());
        done
    }

    /// A led key's answer, handed to its flight's followers.
    pub(super) fn finish_led<V, E>(
        &self,
        l: Led<'_, V>,
        answer: Answer<V, E>,
        sharing: Option<Sharing<V>>,
    ) -> (usize, Answer<V, E>)
    where
        E: Send + Sync + 'static,
    {
        if let Some(leader) = l.leader {
            leader.finish_with(|| match &answer {
                Ok((value, bytes)) => flight::Outcome::Value(
                    bytes.clone().unwrap_or_default(),
                    sharing.zip(value.as_ref()).map(|(s, v)| (s.share)(v)),
                ),
                Err(LoadError::Loader(e)) => {
                    flight::Outcome::LoaderError(Arc::clone(e) as Arc<dyn Any + Send + Sync>)
                }
                Err(LoadError::Cache(e)) => flight::Outcome::Failed(e.clone()),
            });
        }
        (l.at, answer)
    }
}

/// Aborts a batch's task when dropped (a cancelled or panicking load, a
/// caller that went away), unless [disarmed](AbortOnDrop::disarm).
pub(super) struct AbortOnDrop(Option<tokio::task::AbortHandle>);

impl AbortOnDrop {
    pub(super) fn new<T>(task: &tokio::task::JoinHandle<T>) -> AbortOnDrop {
        AbortOnDrop(Some(task.abort_handle()))
    }

    /// Lets the task run on.
    pub(super) fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}
