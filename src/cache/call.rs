//! One `get_or_load` call, from its span down to the value.
//!
//! The call joins its key's in-process flight (`flight.rs`). As the leader it
//! reads the value and judges it (`freshness.rs`): a fresh hit, the common
//! case, ends right there. Everything past a fresh hit runs in a boxed future:
//! following another call's flight, a stale value and its refresh
//! (`refresh.rs`), a miss and its lock and load (`load.rs`).
//!
//! The boxing is for speed. An `async fn`'s future holds every future it may
//! await, so without it a hit's future would be as large as the slowest path's
//! (5 KiB). Moving a future that size into place costs more than the rest of a
//! hit's own work. A box costs one allocation, and only on the slow paths,
//! which wait for Redis, another call or the lock anyway. `tests::hit_future_is_small`
//! keeps it so.

use std::any::Any;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::Instrument;

use super::flight::{self, Leader, Role, Sharing};
use super::freshness::{self, Freshness};
use super::keys::{self, Keys, ValueKey};
use super::load::{Led, Loader};
use super::options::Resolved;
use super::refresh::Lead;
use super::shared::Keep;
use super::{Found, Inner, in_place};
use crate::codec::{self, Codec, Meta};
use crate::error::{Error, LoadError, Result};
use crate::stats::Stats;
use crate::store::Stored;
use crate::telemetry::{CallTrace, Outcome};

/// What every step of one call works from.
struct Call<'a, T> {
    key: &'a str,
    options: &'a Resolved,
    /// How followers take the leader's decoded value (calls that share it).
    sharing: Option<Sharing<T>>,
    started: Instant,
    /// Until when the call waits for someone else's load (a flight or the lock).
    deadline: Instant,
}

impl<T> Clone for Call<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Call<'_, T> {}

/// What a flight's leader read, judged for its call.
pub(super) struct Judged<T> {
    /// Where a fresh value is to be kept in the near cache, if it is.
    keep: Option<Keep<T>>,
    /// The value, if there is one that decodes, and its freshness.
    found: Option<(Found<T>, Freshness)>,
}

impl<C: Codec> Inner<C> {
    /// One call in its `get_or_load` span, timed and counted by outcome.
    pub(super) async fn traced_call<T, E, L>(
        self: &Arc<Self>,
        key: &str,
        loader: L,
        options: &Resolved,
        sharing: Option<Sharing<T>>,
    ) -> Result<(T, Outcome), LoadError<E>>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        E: Send + Sync + 'static,
        L: Loader<Output = std::result::Result<T, E>>,
    {
        let span = self.telemetry.call_span(&self.key_prefix, key);
        // One deadline per call, for waiting on someone else's load: in this
        // process (as a follower) or in another (for the lock).
        let started = Instant::now();
        let mut trace = CallTrace::default();
        // Without a subscriber that wants the span (the common case for a
        // hit), the call runs as it is: wrapping it would move the whole
        // future once more and enter and leave the span on every poll. (Each
        // branch makes its future where it awaits it: one made first and
        // then awaited is moved into place, 2 KiB.)
        let result = if span.is_disabled() {
            self.call(key, loader, options, sharing, started, &mut trace)
                .await
        } else {
            self.call(key, loader, options, sharing, started, &mut trace)
                .instrument(span.clone())
                .await
        };
        self.telemetry.call_ended(&span, &trace, started, &result);
        result
    }

    /// One `get_or_load` call: lead the key's flight (or, with coalescing
    /// off, go alone) and serve a fresh hit; anything else goes on boxed, in
    /// [`follow`](Self::follow) or [`lead_on`](Self::lead_on). With `sharing`,
    /// followers take the leader's decoded value rather than decoding the
    /// bytes.
    async fn call<T, E, L>(
        self: &Arc<Self>,
        key: &str,
        loader: L,
        options: &Resolved,
        sharing: Option<Sharing<T>>,
        started: Instant,
        trace: &mut CallTrace,
    ) -> Result<(T, Outcome), LoadError<E>>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        E: Send + Sync + 'static,
        L: Loader<Output = std::result::Result<T, E>>,
    {
        keys::check_key(&self.key_prefix, key, self.max_key_len)?;
        let call = Call {
            key,
            options,
            sharing,
            started,
            deadline: started + self.lock.options().wait,
        };
        let leader = if self.coalesce {
            match self.flights.join(&flight_key(key, options)) {
                Role::Leader(leader) => Some(leader),
                Role::Alone => None,
                Role::Follower(rx) => return Box::pin(self.follow(rx, call, loader, trace)).await,
            }
        } else {
            None
        };
        let judged = match self.read_judged(key, options, sharing).await {
            Ok(judged) => judged,
            Err(e) => {
                if let Some(leader) = leader {
                    leader.finish(flight::Outcome::Failed(e.clone()));
                }
                return Err(LoadError::Cache(e));
            }
        };
        match judged {
            Judged {
                keep,
                found: Some((found, Freshness::Fresh)),
            } => {
                self.hit(&found, keep);
                let Some(leader) = leader else {
                    // Alone (coalescing off): nobody to hand anything to.
                    return Ok((found.value, Outcome::Hit));
                };
                let mut led = Led::unlocked(found.value, found.bytes, Outcome::Hit);
                self.hand_over::<T, E>(Some(leader), Ok(&mut led), sharing);
                Ok((led.value, Outcome::Hit))
            }
            judged => Box::pin(self.lead_on(leader, judged, call, loader, trace)).await,
        }
    }

    /// A call that found the key's flight led by another call of this process:
    /// waits for its outcome. When the leader went away without one, the call
    /// joins again, and leads if nobody else has started to.
    async fn follow<T, E, L>(
        self: &Arc<Self>,
        rx: tokio::sync::watch::Receiver<Option<flight::Outcome>>,
        call: Call<'_, T>,
        loader: L,
        trace: &mut CallTrace,
    ) -> Result<(T, Outcome), LoadError<E>>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        E: Send + Sync + 'static,
        L: Loader<Output = std::result::Result<T, E>>,
    {
        let Call {
            key,
            options,
            sharing,
            started,
            deadline,
        } = call;
        Stats::add(&self.stats.coalesced);
        let flight_key = flight_key(key, options);
        let mut first = Some(rx);
        let leader = loop {
            let rx = match first.take() {
                Some(rx) => rx,
                None => match self.flights.join(&flight_key) {
                    Role::Leader(leader) => break Some(leader),
                    Role::Alone => break None,
                    Role::Follower(rx) => rx,
                },
            };
            // The leader gives up on the lock at the same deadline, after at most
            // one more read and one more attempt: leave it that long to hand over
            // its own outcome. A follower with a hard timeout waits no longer.
            let give_up = deadline + self.command_timeout * 2;
            let hard_limit = options.hard_timeout.map(|limit| (started + limit, limit));
            let until = hard_limit.map_or(give_up, |(at, _)| at.min(give_up));
            let waiting_since = Instant::now();
            let waited = {
                let _waiting = self.telemetry.waiting();
                tokio::time::timeout_at(until.into(), flight::outcome(rx)).await
            };
            trace.add_wait(waiting_since.elapsed());
            let Ok(outcome) = waited else {
                if let Some((at, limit)) = hard_limit
                    && at <= give_up
                {
                    return Err(self.hard_timeout_error(key, limit));
                }
                Stats::add(&self.stats.lock_timeouts);
                return Err(LoadError::Cache(Error::LockTimeout {
                    resource: Keys::new(&self.key_prefix, key).lock,
                    waited: started.elapsed(),
                }));
            };
            match outcome {
                flight::Outcome::Value(bytes, shared) => {
                    let taken = sharing.zip(shared).and_then(|(s, v)| (s.take)(&v));
                    if let Some(value) = taken {
                        return Ok((value, Outcome::Coalesced));
                    }
                    return codec::decode(&self.codec, &bytes)
                        .map(|value| (value, Outcome::Coalesced))
                        .map_err(|e| LoadError::Cache(e.into()));
                }
                flight::Outcome::LoaderError(shared) => match shared.downcast::<E>() {
                    Ok(e) => return Err(LoadError::Loader(e)),
                    // A caller with another error type led: load for ourselves.
                    Err(_) => continue,
                },
                // The leader's own hard timeout is not this call's.
                flight::Outcome::Failed(Error::LoadTimeout { .. })
                    if options.hard_timeout.is_none() =>
                {
                    continue;
                }
                flight::Outcome::Failed(e) => return Err(LoadError::Cache(e)),
                flight::Outcome::Abandoned => continue,
            }
        };
        let judged = match self.read_judged(key, options, sharing).await {
            Ok(judged) => judged,
            Err(e) => {
                if let Some(leader) = leader {
                    leader.finish(flight::Outcome::Failed(e.clone()));
                }
                return Err(LoadError::Cache(e));
            }
        };
        self.lead_on(leader, judged, call, loader, trace).await
    }

    /// Reads the value of `key` and judges it for a call with `options`.
    async fn read_judged<T: DeserializeOwned + 'static>(
        &self,
        key: &str,
        options: &Resolved,
        sharing: Option<Sharing<T>>,
    ) -> Result<Judged<T>> {
        let value_key = ValueKey::new(&self.key_prefix, key);
        // A shared call with the near cache on keeps a fresh value it reads
        // (`shared.rs`); that needs its time left.
        let keep = self.near_ticket(value_key, sharing);
        let with_ttl = options.reads_ttl() || keep.is_some();
        let stored = self.read_stored(value_key, with_ttl).await?;
        // With tags on, an invalidated value is a miss (`tags.rs`); boxed, so
        // that a hit without tags keeps its small future.
        let stored = match &self.tags {
            None => stored,
            Some(_) => Box::pin(self.screen(stored)).await?,
        };
        let found = stored.and_then(|stored| {
            let (found, judged) = self.decode_judged::<T>(value_key, stored, options)?;
            if judged != Freshness::TooStale && found.meta.absent {
                Stats::add(&self.stats.negative_hits);
            }
            Some((found, judged))
        });
        Ok(Judged { keep, found })
    }

    /// Judges a stored value from its header, then decodes it: a fresh
    /// `String` or byte value in place (`in_place.rs`; its `Found` then holds
    /// no bytes), anything else through the codec. `None` for an undecodable
    /// value (reported).
    fn decode_judged<T: DeserializeOwned + 'static>(
        &self,
        value_key: ValueKey<'_>,
        stored: Stored,
        options: &Resolved,
    ) -> Option<(Found<T>, Freshness)> {
        let Ok((meta, _)) = codec::split_header(C::ID, &stored.bytes) else {
            // Undecodable: reported there.
            return self
                .decode_or_report::<T>(&value_key, stored, true)
                .map(|found| {
                    let judged = freshness::judge(&found.meta, found.ttl_left, options, 0.0);
                    (found, judged)
                });
        };
        // XFetch's draw, only where it is used.
        let draw = if stored.ttl.is_some() && options.early_refresh_beta > 0.0 {
            fastrand::f64()
        } else {
            0.0
        };
        let judged = freshness::judge(&meta, stored.ttl, options, draw);
        let stored = if judged == Freshness::Fresh && stored.bytes.len() <= self.max_value_size {
            let Stored { mut bytes, ttl } = stored;
            let stored_len = bytes.len();
            match in_place::decode::<C, T>(&mut bytes) {
                Some(Ok(value)) => {
                    let found = Found {
                        value,
                        bytes,
                        stored_len,
                        meta,
                        ttl_left: ttl,
                    };
                    return Some((found, judged));
                }
                Some(Err(e)) => {
                    self.report_corrupt(&value_key, &e);
                    return None;
                }
                // Not a type decoded in place: `bytes` is untouched.
                None => Stored { bytes, ttl },
            }
        } else {
            stored
        };
        self.decode_or_report(&value_key, stored, true)
            .map(|found| (found, judged))
    }

    /// A fresh value found by the first read: a hit, kept in the near cache
    /// (when `keep` says so) and counted.
    fn hit<T>(&self, found: &Found<T>, keep: Option<Keep<T>>) {
        self.near_keep(found, keep);
        Stats::add(&self.stats.hits);
    }

    /// The leader's path past its read (`leader` is `None` with coalescing
    /// off): serve or refresh the value, or load it, then hand the outcome to
    /// the flight's followers before releasing the lock.
    async fn lead_on<T, E, L>(
        self: &Arc<Self>,
        leader: Option<Leader<'_>>,
        judged: Judged<T>,
        call: Call<'_, T>,
        loader: L,
        trace: &mut CallTrace,
    ) -> Result<(T, Outcome), LoadError<E>>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        E: Send + Sync + 'static,
        L: Loader<Output = std::result::Result<T, E>>,
    {
        let Call { key, options, .. } = call;
        let mut result = match self.lead(judged, call, loader, trace).await {
            Ok(Lead::Done(led)) => Ok(led),
            Ok(Lead::RefreshInPlace(refresh)) => {
                // The followers get the stale value now; this caller refreshes.
                if let Some(leader) = leader {
                    leader.finish_with(|| {
                        flight::Outcome::Value(Arc::new(refresh.bytes().to_vec()), None)
                    });
                }
                let led = self.refresh_in_place(key, refresh, options).await?;
                let outcome = led.outcome;
                return Ok((led.finish().await, outcome));
            }
            Err(e) => Err(e),
        };
        // Followers get the outcome first; then the lock is released.
        self.hand_over(leader, result.as_mut(), call.sharing);
        let led = result?;
        let outcome = led.outcome;
        Ok((led.finish().await, outcome))
    }

    /// What the leader does with what it read: a fresh value is a hit; a
    /// stale one is served while one refresh runs (`refresh.rs`); a miss
    /// waits for the lock and loads (`load.rs`), on a task of its own when the
    /// load is detached. Returns the value and its stored bytes (for the
    /// followers).
    async fn lead<T, E, L>(
        self: &Arc<Self>,
        judged: Judged<T>,
        call: Call<'_, T>,
        loader: L,
        trace: &mut CallTrace,
    ) -> Result<Lead<T, L>, LoadError<E>>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        E: Send + Sync + 'static,
        L: Loader<Output = std::result::Result<T, E>>,
    {
        let Call {
            key,
            options,
            started,
            deadline,
            ..
        } = call;
        let Judged { keep, found } = judged;
        match found {
            Some((found, Freshness::Fresh)) => {
                self.hit(&found, keep);
                let led = Led::unlocked(found.value, found.bytes, Outcome::Hit);
                return Ok(Lead::Done(led));
            }
            Some((found, Freshness::RefreshEarly)) => {
                Stats::add(&self.stats.early_refreshes);
                let keys = Keys::new(&self.key_prefix, key);
                return self
                    .refresh(key, keys, found, loader, options, Outcome::Hit)
                    .await;
            }
            Some((found, Freshness::Stale)) => {
                let keys = Keys::new(&self.key_prefix, key);
                return self
                    .refresh(key, keys, found, loader, options, Outcome::Stale)
                    .await;
            }
            // Too old for this call: a miss.
            Some((_, Freshness::TooStale)) | None => {}
        }
        Stats::add(&self.stats.misses);
        let keys = Keys::new(&self.key_prefix, key);
        let loader = if options.detached {
            match loader.detach() {
                Ok(detached) => {
                    return self
                        .load_detached(key, keys, detached, options, started, deadline, trace)
                        .await
                        .map(Lead::Done);
                }
                Err(loader) => loader,
            }
        } else {
            loader
        };
        let load = self.load_after_miss(
            key,
            &keys,
            loader,
            options,
            started,
            deadline,
            trace,
            std::future::pending(),
        );
        let led = match options.hard_timeout {
            None => load.await,
            Some(limit) => match tokio::time::timeout(limit, load).await {
                Ok(led) => led,
                Err(_) => Err(self.hard_timeout_error(key, limit)),
            },
        };
        led.map(Lead::Done)
    }
    /// Hands a leader's outcome to its flight's followers (when there is a
    /// flight with followers): the value (as stored, and decoded when the call
    /// shares it), the loader's error, or the cache's. A value decoded in
    /// place has no stored bytes left: it is encoded again for them.
    fn hand_over<T, E>(
        &self,
        leader: Option<Leader<'_>>,
        result: std::result::Result<&mut Led<T>, &mut LoadError<E>>,
        sharing: Option<Sharing<T>>,
    ) where
        T: Serialize,
        E: Send + Sync + 'static,
    {
        let Some(leader) = leader else {
            return;
        };
        leader.finish_with(|| match result {
            Ok(led) => {
                let bytes = if led.bytes.is_empty() {
                    match codec::encode_with_meta(&self.codec, &led.value, &Meta::default()) {
                        Ok(bytes) => bytes,
                        // Cannot happen for what decodes in place; the
                        // followers then read for themselves.
                        Err(_) => return flight::Outcome::Abandoned,
                    }
                } else {
                    std::mem::take(&mut led.bytes)
                };
                flight::Outcome::Value(Arc::new(bytes), sharing.map(|s| (s.share)(&led.value)))
            }
            Err(LoadError::Loader(e)) => {
                flight::Outcome::LoaderError(Arc::clone(e) as Arc<dyn Any + Send + Sync>)
            }
            Err(LoadError::Cache(e)) => flight::Outcome::Failed(e.clone()),
        });
    }
}

/// The in-process flight a call joins: the key, and the stale window the call
/// accepts, so that a call never gets, from a leader that accepts staler
/// values, a value staler than it accepts. `\0<window ms>\0<key>` when there
/// is a window (or the key itself starts with `\0`), else the key.
pub(super) fn flight_key<'k>(key: &'k str, options: &Resolved) -> std::borrow::Cow<'k, str> {
    if options.stale_for.is_zero() && !key.starts_with('\0') {
        std::borrow::Cow::Borrowed(key)
    } else {
        std::borrow::Cow::Owned(format!("\0{}\0{key}", options.stale_for.as_millis()))
    }
}

#[cfg(test)]
mod tests {
    use crate::LockedCache;

    /// See the module docs: every path past a fresh hit is boxed, so that a
    /// call's future is its `GET`'s future (redis-rs's, 1.3 KiB, kept inline:
    /// boxing it cost more than moving it) and little more. With every path
    /// inline the whole future was 5.4 KiB, and moving it into place cost
    /// more than the rest of a hit's own work.
    #[tokio::test]
    async fn hit_future_is_small() {
        let store = crate::store::RedisStore::open("redis://127.0.0.1:1", Default::default())
            .expect("a store (it does not connect until used)");
        let get = std::mem::size_of_val(&store.read("k"));
        let cache = LockedCache::builder().build().await.unwrap();
        let call = cache.get_or_load("k", || async { Ok::<_, std::io::Error>(1_u64) });
        let size = std::mem::size_of_val(&call);
        eprintln!("get_or_load: {size} bytes, its GET: {get}");
        assert!(
            size <= get + 1280,
            "get_or_load's future is {size} bytes, its GET's {get}"
        );
        let call = cache.get_or_load_bytes("b", || async { Ok::<_, std::io::Error>(vec![1]) });
        let size = std::mem::size_of_val(&call);
        assert!(
            size <= get + 1280,
            "get_or_load_bytes's future is {size} bytes, its GET's {get}"
        );
    }
}
