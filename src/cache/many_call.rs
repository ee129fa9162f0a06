//! The batch call itself (from `many.rs`): the first read judged, the keys'
//! flights joined, the led and followed keys answered (`many_load.rs`), each
//! position given its answer.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use futures_util::FutureExt;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::flight::{Role, Sharing};
use super::freshness::{self, Freshness};
use super::keys::{self, Keys, ValueKey};
use super::many::{Answer, EarlyAnswers, Led, NearLookup, Stale, add_n};
use super::options::Resolved;
use super::{Found, Inner, Replacing, call, in_place};
use crate::codec::{self, Codec};
use crate::error::{Described, Error, LoadError, Result};
use crate::stats::Stats;
use crate::store::Stored;

/// How the first part of a batch ended: every key answered, or (a batch
/// that answered early) its stale keys left to refresh.
pub(super) enum Ended<'k, V, E> {
    Answered(Vec<std::result::Result<Option<V>, LoadError<E>>>),
    Refresh {
        distinct: Vec<&'k str>,
        stale: Vec<Stale<V>>,
        started: Instant,
        deadline: Instant,
    },
}

impl<C: Codec> Inner<C> {
    /// The first read of a batch: the values of `keys` judged for `options`
    /// from their headers, then decoded; a fresh one that is not asked
    /// twice (`dup`) is decoded in place where its type allows
    /// (`in_place.rs`), and keeps no bytes.
    pub(super) async fn read_judged_many<V: DeserializeOwned + 'static>(
        &self,
        keys: &[&str],
        with_ttl: bool,
        options: &Resolved,
        dup: &[bool],
    ) -> Result<Vec<Option<(Found<Option<V>>, Freshness)>>> {
        let refs: Vec<ValueKey<'_>> = keys
            .iter()
            .map(|k| ValueKey::new(&self.key_prefix, k))
            .collect();
        // The built-in Redis store writes the value keys straight into its
        // `MGET` (as a hit's `GET` does); another store gets them built.
        let stored = match self.value_store.as_redis() {
            Some(redis) => redis.read_many(&refs, with_ttl).await?,
            None => {
                let built: Vec<String> = refs.iter().map(|k| k.build()).collect();
                let built: Vec<&str> = built.iter().map(String::as_str).collect();
                self.value_store.get_many(&built, with_ttl).await?
            }
        };
        let stored = self.screen_many(stored).await?;
        let mut out = Vec::with_capacity(stored.len());
        let mut reread = Vec::new();
        for (j, stored) in stored.into_iter().enumerate() {
            let Some(stored) = stored else {
                out.push(None);
                continue;
            };
            let Ok((meta, _)) = codec::split_header(C::ID, &stored.bytes) else {
                out.push(
                    self.decode_entry::<V>(&refs[j], stored, true)
                        .map(|f| (f, Freshness::TooStale)),
                );
                continue;
            };
            if !with_ttl && !meta.stale_for.is_zero() {
                // Stored with a stale window: judged by its time left.
                reread.push(j);
                out.push(None);
                continue;
            }
            let draw = if stored.ttl.is_some() && options.early_refresh_beta > 0.0 {
                fastrand::f64()
            } else {
                0.0
            };
            let judged = freshness::judge(&meta, stored.ttl, options, draw);
            if judged == Freshness::Fresh
                && !meta.absent
                && !dup.get(j).copied().unwrap_or(true)
                && stored.bytes.len() <= self.max_value_size
            {
                let Stored { mut bytes, ttl } = stored;
                let stored_len = bytes.len();
                match in_place::decode::<C, V>(&mut bytes) {
                    Some(Ok(value)) => {
                        let found = Found {
                            value: Some(value),
                            bytes: Vec::new(),
                            stored_len,
                            meta,
                            ttl_left: ttl,
                        };
                        out.push(Some((found, judged)));
                        continue;
                    }
                    Some(Err(e)) => {
                        self.report_corrupt(&refs[j], &e);
                        out.push(None);
                        continue;
                    }
                    None => {
                        let found = self.decode_entry::<V>(&refs[j], Stored { bytes, ttl }, true);
                        out.push(found.map(|mut f| {
                            f.bytes = Vec::new();
                            (f, judged)
                        }));
                        continue;
                    }
                }
            }
            out.push(
                self.decode_entry::<V>(&refs[j], stored, true)
                    .map(|f| (f, judged)),
            );
        }
        if !reread.is_empty() {
            let again: Vec<String> = reread.iter().map(|&j| refs[j].build()).collect();
            let again: Vec<&str> = again.iter().map(String::as_str).collect();
            let stored = self.value_store.get_many(&again, true).await?;
            let stored = self.screen_many(stored).await?;
            for (&j, stored) in reread.iter().zip(stored) {
                out[j] = stored
                    .and_then(|s| self.decode_entry::<V>(&refs[j], s, true))
                    .map(|f| {
                        let judged = freshness::judge(&f.meta, f.ttl_left, options, 0.0);
                        (f, judged)
                    });
            }
        }
        Ok(out)
    }

    /// Decodes a stored value: a cached "not found" (its header says so) as
    /// `None` without decoding, anything else as a `V`; undecodable: `None`
    /// (reported when `report`).
    pub(super) fn decode_entry<V: DeserializeOwned>(
        &self,
        value_key: &dyn std::fmt::Display,
        stored: Stored,
        report: bool,
    ) -> Option<Found<Option<V>>> {
        match codec::split_header(C::ID, &stored.bytes) {
            Ok((meta, _)) if meta.absent => Some(Found {
                value: None,
                stored_len: stored.bytes.len(),
                bytes: stored.bytes,
                meta,
                ttl_left: stored.ttl,
            }),
            _ => self
                .decode_or_report::<V>(value_key, stored, report)
                .map(|f| Found {
                    value: Some(f.value),
                    bytes: f.bytes,
                    stored_len: f.stored_len,
                    meta: f.meta,
                    ttl_left: f.ttl_left,
                }),
        }
    }

    /// Decodes a flight's bytes for a follower or a duplicate position.
    pub(super) fn decode_got<V: DeserializeOwned>(&self, bytes: &[u8]) -> Result<Option<V>> {
        match codec::split_header(C::ID, bytes) {
            Ok((meta, _)) if meta.absent => Ok(None),
            _ => Ok(Some(codec::decode(&self.codec, bytes)?)),
        }
    }

    /// The whole call: see the module docs. Each key's answer, in the order
    /// of `keys`; `Err` only for what fails the whole call.
    ///
    /// In a `get_or_load_many` span (DEBUG, with the number of keys) when a
    /// subscriber wants it, and bounded by the call's hard timeout, if any
    /// ([`Error::LoadTimeout`] for the whole call).
    ///
    /// With `early` (the `with(CallOptions)` calls, whose loader is `'static`
    /// and whose call runs on a task): a batch whose only unfresh keys are
    /// stale (or picked for early refresh) sends its answers there at once,
    /// the stale values included, and refreshes them afterwards, bounded by
    /// the background timeout. The hard timeout is then the caller's to
    /// apply, to its wait for the answers.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn many<V, E, F, Fut, R>(
        self: &Arc<Self>,
        keys: &[&str],
        mut loader: F,
        options: &Resolved,
        sharing: Option<Sharing<V>>,
        near: Option<&NearLookup<'_, V>>,
        early: &mut Option<EarlyAnswers<V, E>>,
    ) -> Result<Vec<std::result::Result<Option<V>, LoadError<E>>>>
    where
        V: Serialize + DeserializeOwned + Send + 'static,
        E: Send + Sync + 'static,
        F: FnMut(Vec<String>) -> Fut,
        Fut: Future<Output = std::result::Result<R, E>>,
        R: IntoIterator<Item = (String, V)>,
    {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let span = tracing::debug_span!(
            "get_or_load_many",
            db.system = self.telemetry.db_system,
            locked_cache.keys = keys.len(),
        );
        let call = self.many_untraced(keys, &mut loader, options, sharing, near, early);
        let call = tracing::Instrument::instrument(call, span.clone());
        let ended = match options.hard_timeout {
            None => call.await,
            Some(timeout) => match tokio::time::timeout(timeout, call).await {
                Ok(ended) => ended,
                Err(_) => Err(Error::LoadTimeout {
                    key: format!("{} keys of a batch", keys.len()),
                    timeout,
                }),
            },
        }?;
        match ended {
            Ended::Answered(answers) => Ok(answers),
            // Answered early: the refresh, past the hard timeout (it bounds
            // the caller's wait), within the background timeout.
            Ended::Refresh {
                distinct,
                stale,
                started,
                deadline,
            } => {
                let refresh = self.refresh_many_in_background(
                    &distinct, stale, loader, options, sharing, started, deadline,
                );
                tracing::Instrument::instrument(refresh, span).await;
                Ok(Vec::new())
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn many_untraced<'k, V, E, F, Fut, R>(
        self: &Arc<Self>,
        keys: &[&'k str],
        loader: &mut F,
        options: &Resolved,
        sharing: Option<Sharing<V>>,
        near: Option<&NearLookup<'k, V>>,
        early: &mut Option<EarlyAnswers<V, E>>,
    ) -> Result<Ended<'k, V, E>>
    where
        V: Serialize + DeserializeOwned + Send + 'static,
        E: Send + Sync + 'static,
        F: FnMut(Vec<String>) -> Fut,
        Fut: Future<Output = std::result::Result<R, E>>,
        R: IntoIterator<Item = (String, V)>,
    {
        for key in keys {
            keys::check_key(&self.key_prefix, key, self.max_key_len)?;
        }
        let started = Instant::now();
        let deadline = started + self.lock.options().wait;
        // Distinct keys, in the order first asked; each position's key.
        // foldhash: std's SipHash was a visible share of a 100-key hit.
        let mut index: HashMap<&str, usize, foldhash::fast::RandomState> =
            HashMap::with_capacity_and_hasher(keys.len(), Default::default());
        let mut distinct: Vec<&str> = Vec::with_capacity(keys.len());
        let positions: Vec<usize> = keys
            .iter()
            .map(|key| {
                *index.entry(key).or_insert_with(|| {
                    distinct.push(key);
                    distinct.len() - 1
                })
            })
            .collect();
        let mut answers: Vec<Option<Answer<V, E>>> = (0..distinct.len()).map(|_| None).collect();

        // 1. The near cache.
        if let Some(near) = near {
            for (i, key) in distinct.iter().enumerate() {
                if let Some(value) = near(key) {
                    answers[i] = Some(Ok((Some(value), None)));
                }
            }
        }
        // 2. One read for the rest.
        let unread: Vec<usize> = (0..distinct.len())
            .filter(|&i| answers[i].is_none())
            .collect();
        let mut misses = Vec::new();
        let mut stale = Vec::new();
        if !unread.is_empty() {
            let read_keys: Vec<&str> = unread.iter().map(|&i| distinct[i]).collect();
            let with_ttl = near.is_some() || options.reads_ttl();
            // Taken before the read, for what is kept in the near cache.
            let mut tickets: Vec<_> = match near {
                Some(_) => read_keys
                    .iter()
                    .map(|k| self.near_ticket(ValueKey::new(&self.key_prefix, k), sharing))
                    .collect(),
                None => Vec::new(),
            };
            tickets.reverse();
            let mut asked = vec![0u8; distinct.len()];
            for &i in &positions {
                asked[i] = asked[i].saturating_add(1);
            }
            let dup: Vec<bool> = unread.iter().map(|&i| asked[i] > 1).collect();
            let found = self
                .read_judged_many::<V>(&read_keys, with_ttl, options, &dup)
                .await?;
            for (&i, found) in unread.iter().zip(found) {
                let ticket = tickets.pop().flatten();
                let Some((found, judged)) = found else {
                    misses.push(i);
                    continue;
                };
                if judged == Freshness::TooStale {
                    misses.push(i);
                    continue;
                }
                Stats::add(&self.stats.hits);
                if found.meta.absent {
                    Stats::add(&self.stats.negative_hits);
                }
                let Found {
                    mut value,
                    bytes,
                    stored_len,
                    meta,
                    ttl_left,
                } = found;
                if judged == Freshness::Fresh
                    && ticket.is_some()
                    && let Some(kept) = value.take()
                {
                    let kept = Found {
                        value: kept,
                        bytes: Vec::new(),
                        stored_len,
                        meta,
                        ttl_left,
                    };
                    self.near_keep(&kept, ticket);
                    value = Some(kept.value);
                }
                if judged == Freshness::Fresh {
                    let bytes = (!bytes.is_empty()).then(|| Arc::new(bytes));
                    answers[i] = Some(Ok((value, bytes)));
                    continue;
                }
                if judged == Freshness::RefreshEarly {
                    Stats::add(&self.stats.early_refreshes);
                }
                let replacing = Replacing {
                    bytes: bytes.clone(),
                    ttl_left,
                };
                stale.push((i, replacing, (value, Some(Arc::new(bytes)))));
            }
            add_n(&self.stats.misses, misses.len());
        }

        // A stale-only batch whose caller takes its answers early: the stale
        // values now, their refresh after (in the background, as a single
        // key's is).
        if misses.is_empty()
            && !stale.is_empty()
            && let Some(tx) = early.take()
        {
            for (i, _, got) in &mut stale {
                Stats::add(&self.stats.stale_served);
                answers[*i] = Some(Ok((got.0.take(), got.1.clone())));
            }
            let _ = tx.send(Ok(self.answer_positions(answers, &positions, sharing)));
            return Ok(Ended::Refresh {
                distinct,
                stale,
                started,
                deadline,
            });
        }
        self.settle_many(
            &distinct,
            &mut answers,
            misses,
            stale,
            false,
            loader,
            options,
            sharing,
            started,
            deadline,
        )
        .await;
        Ok(Ended::Answered(
            self.answer_positions(answers, &positions, sharing),
        ))
    }

    /// The stale keys of a batch that answered early, refreshed (their locks
    /// tried once: a key another holder refreshes is left to it), bounded by
    /// the background timeout; failures are logged and counted, and the
    /// values in Redis are left as they were.
    #[allow(clippy::too_many_arguments)]
    async fn refresh_many_in_background<V, E, F, Fut, R>(
        self: &Arc<Self>,
        distinct: &[&str],
        stale: Vec<Stale<V>>,
        mut loader: F,
        options: &Resolved,
        sharing: Option<Sharing<V>>,
        started: Instant,
        deadline: Instant,
    ) where
        V: Serialize + DeserializeOwned + Send + 'static,
        E: Send + Sync + 'static,
        F: FnMut(Vec<String>) -> Fut,
        Fut: Future<Output = std::result::Result<R, E>>,
        R: IntoIterator<Item = (String, V)>,
    {
        // A failure is counted here, not masked by fail-safe: nobody waits
        // for these answers.
        let options = Resolved {
            fail_safe: false,
            ..*options
        };
        let keys = stale.len();
        let mut answers: Vec<Option<Answer<V, E>>> = (0..distinct.len()).map(|_| None).collect();
        let refresh = self.settle_many(
            distinct,
            &mut answers,
            Vec::new(),
            stale,
            true,
            &mut loader,
            &options,
            sharing,
            started,
            deadline,
        );
        let bounded = tokio::time::timeout(
            options.background_timeout,
            AssertUnwindSafe(refresh).catch_unwind(),
        );
        let failure = match bounded.await {
            Ok(Ok(())) => {
                let failed = answers.iter().filter(|a| matches!(a, Some(Err(_)))).count();
                let error = answers.iter().find_map(|a| match a {
                    Some(Err(e)) => Some(Described(e).to_string()),
                    _ => None,
                });
                error.map(|e| (failed, e))
            }
            // The locks are released by their guards' drop; the panic was
            // reported by the panic hook.
            Ok(Err(_)) => Some((keys, "the loader panicked".to_owned())),
            Err(_) => Some((
                keys,
                format!(
                    "the refresh passed the background timeout of {:?} and was dropped",
                    options.background_timeout
                ),
            )),
        };
        if let Some((failed, error)) = failure {
            add_n(&self.stats.background_errors, failed);
            tracing::warn!(
                keys = failed,
                error,
                "a batch's background refresh failed; the values in the store are unchanged"
            );
        }
    }

    /// Steps 3-5 for `misses` and `stale`, each key's answer into `answers`
    /// (`served`: the stale values were already handed out).
    #[allow(clippy::too_many_arguments)]
    async fn settle_many<V, E, F, Fut, R>(
        self: &Arc<Self>,
        distinct: &[&str],
        answers: &mut [Option<Answer<V, E>>],
        mut misses: Vec<usize>,
        mut stale: Vec<Stale<V>>,
        served: bool,
        loader: &mut F,
        options: &Resolved,
        sharing: Option<Sharing<V>>,
        started: Instant,
        deadline: Instant,
    ) where
        V: Serialize + DeserializeOwned + Send + 'static,
        E: Send + Sync + 'static,
        F: FnMut(Vec<String>) -> Fut,
        Fut: Future<Output = std::result::Result<R, E>>,
        R: IntoIterator<Item = (String, V)>,
    {
        // Flights, locks, the load; followed keys whose leader went away
        // are led on the next pass.
        let mut passes = 0;
        while !misses.is_empty() || !stale.is_empty() {
            passes += 1;
            let mut led = Vec::new();
            let mut followed = Vec::new();
            for i in std::mem::take(&mut misses) {
                let keys = Keys::new(&self.key_prefix, distinct[i]);
                let role = if self.coalesce {
                    self.flights.join(&call::flight_key(distinct[i], options))
                } else {
                    Role::Alone
                };
                match role {
                    Role::Leader(leader) => led.push(Led {
                        at: i,
                        key: distinct[i].to_owned(),
                        keys,
                        leader: Some(leader),
                        refresh: None,
                        served: false,
                    }),
                    Role::Alone => led.push(Led {
                        at: i,
                        key: distinct[i].to_owned(),
                        keys,
                        leader: None,
                        refresh: None,
                        served: false,
                    }),
                    Role::Follower(rx) => {
                        if passes == 1 {
                            Stats::add(&self.stats.coalesced);
                        }
                        followed.push((i, rx));
                    }
                }
            }
            for (i, replacing, got) in std::mem::take(&mut stale) {
                led.push(Led {
                    at: i,
                    key: distinct[i].to_owned(),
                    keys: Keys::new(&self.key_prefix, distinct[i]),
                    leader: None,
                    refresh: Some((replacing, got)),
                    served,
                });
            }
            let follow = self.follow_many::<V, E>(followed, sharing, options, deadline);
            let lead = self.lead_many(led, loader, options, sharing, started, deadline);
            let (followed, led) = tokio::join!(follow, lead);
            for (i, answer) in led {
                answers[i] = Some(answer);
            }
            for (i, answer) in followed {
                match answer {
                    Some(answer) => answers[i] = Some(answer),
                    None if Instant::now() < deadline => misses.push(i),
                    None => {
                        answers[i] = Some(Err(LoadError::Cache(Error::LockTimeout {
                            resource: Keys::new(&self.key_prefix, distinct[i]).lock,
                            waited: started.elapsed(),
                        })));
                    }
                }
            }
        }
    }

    /// Each position of the call its key's answer; a key asked twice is
    /// decoded again (or shared) from the bytes.
    fn answer_positions<V: DeserializeOwned, E>(
        &self,
        mut answers: Vec<Option<Answer<V, E>>>,
        positions: &[usize],
        sharing: Option<Sharing<V>>,
    ) -> Vec<std::result::Result<Option<V>, LoadError<E>>> {
        let mut left = vec![0usize; answers.len()];
        for &i in positions {
            left[i] += 1;
        }
        let mut out = Vec::with_capacity(positions.len());
        for &i in positions {
            left[i] -= 1;
            let answer = if left[i] == 0 {
                answers[i].take()
            } else {
                answers[i].as_ref().map(|a| self.copy_answer(a, sharing))
            };
            out.push(match answer {
                Some(Ok((value, _))) => Ok(value),
                Some(Err(e)) => Err(e),
                None => Err(LoadError::Cache(Error::Abandoned)),
            });
        }
        out
    }

    /// A second copy of an answer, for a key asked twice.
    pub(super) fn copy_answer<V: DeserializeOwned, E>(
        &self,
        answer: &Answer<V, E>,
        sharing: Option<Sharing<V>>,
    ) -> Answer<V, E> {
        match answer {
            Err(e) => Err(e.clone()),
            Ok((None, bytes)) => Ok((None, bytes.clone())),
            Ok((Some(value), bytes)) => {
                if let Some(sharing) = sharing
                    && let Some(copy) = (sharing.take)(&(sharing.share)(value))
                {
                    return Ok((Some(copy), bytes.clone()));
                }
                // A key asked twice keeps its bytes (`read_judged_many`).
                let Some(bytes) = bytes else {
                    return Err(LoadError::Cache(Error::Abandoned));
                };
                self.decode_got(bytes)
                    .map(|v| (v, Some(Arc::clone(bytes))))
                    .map_err(LoadError::Cache)
            }
        }
    }
}
