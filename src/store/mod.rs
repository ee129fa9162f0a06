//! Where bytes live: the [`Store`] trait, with a Redis implementation
//! ([`RedisStore`], over a bb8 pool) and an embedded one ([`MemoryStore`]) with the
//! same semantics, used when no Redis is configured.
//!
//! The lock and the cache only ever speak to a `Store`; every Redis command the
//! library sends is in `redis.rs`, every Lua script in `scripts.rs`.

#[cfg(feature = "credentials")]
pub(crate) mod auth;
/// Without the `credentials` feature there is never a credentials source.
#[cfg(not(feature = "credentials"))]
pub(crate) mod auth {
    /// Uninhabited: no value of it exists without the feature.
    #[derive(Clone, Debug)]
    pub(crate) enum CredentialSource {}
    /// Uninhabited: no value of it exists without the feature.
    #[derive(Debug)]
    pub(crate) enum Provider {}

    impl CredentialSource {
        pub(crate) fn start(provider: &Provider) -> CredentialSource {
            match *provider {}
        }
    }
}
pub(crate) mod claims;
#[cfg(feature = "cluster")]
mod cluster;
mod commands;
mod endpoint;
mod eviction;
mod many;
mod memory;
mod memory_claims;
mod pool;
pub(crate) mod redis;
mod scripts;
#[cfg(feature = "sentinel")]
mod sentinel;
#[cfg(any(feature = "cluster", test))]
pub(crate) mod slot;
pub(crate) mod tls;

#[cfg(feature = "credentials")]
pub use auth::{BasicAuth, RotatingCredentials, StreamingCredentialsProvider};
pub use claims::{Claim, Holding, Holdings};
#[cfg(feature = "cluster")]
pub use cluster::{ClusterOptions, ClusterStore};
pub use memory::MemoryStore;
pub(crate) use redis::KeyArg;
pub use redis::{ConnectionOptions, RedisStore};

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::error::{Error, Result};

/// A message to publish together with a write: `payload` on `channel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publish<'a> {
    /// The pub/sub channel.
    pub channel: &'a str,
    /// The message (for lock wake-ups: the lock key).
    pub payload: &'a str,
}

/// A value as read from the store, with its remaining time to live as the
/// server counts it (so that freshness never depends on the clocks of the
/// hosts that read it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The stored bytes.
    pub bytes: Vec<u8>,
    /// Time left before the key expires; `None` when it has no expiry.
    pub ttl: Option<Duration>,
}

impl Stored {
    /// From a Redis `PTTL` answer: milliseconds left, `-1` for no expiry, `-2`
    /// for a key that expired between the read and the `PTTL` (no time left).
    pub fn from_pttl(bytes: Vec<u8>, pttl: i64) -> Stored {
        let ttl = match pttl {
            -1 => None,
            ms => Some(Duration::from_millis(ms.max(0) as u64)),
        };
        Stored { bytes, ttl }
    }
}

/// One write of [`Store::set_many`]: `SET key value PX ttl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Write<'a> {
    /// The key.
    pub key: &'a str,
    /// The bytes to store.
    pub value: &'a [u8],
    /// Its time to live.
    pub ttl: Duration,
}

/// One write of [`Store::set_fenced_many`]: as [`Store::set_fenced`], with
/// `message` published on the batch's channel once it is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FencedWrite<'a> {
    /// The value's key.
    pub key: &'a str,
    /// Its fence's key.
    pub fence: &'a str,
    /// The bytes to store.
    pub value: &'a [u8],
    /// Its time to live.
    pub ttl: Duration,
    /// What to publish once stored (for load wake-ups: the lock key).
    pub message: &'a str,
}

/// One key of [`Store::claim_loads_fenced`]: its lock, value and fence keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadClaim<'a> {
    /// The lock key.
    pub lock: &'a str,
    /// The value key.
    pub value: &'a str,
    /// The fence key.
    pub fence: &'a str,
}

/// A store shared by the lock, the cache and their background tasks.
pub type SharedStore = Arc<dyn Store>;

/// The operations locked-cache needs from one server. Each call is one round trip
/// on Redis. Tokens and values are opaque bytes.
#[async_trait]
pub trait Store: Send + Sync + Debug + 'static {
    /// `GET key`. A key holding another Redis type is an error
    /// ([`Error::Redis`](crate::Error::Redis) whose source has code `WRONGTYPE`), which the
    /// cache treats as a corrupt value.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;

    /// This store as the built-in [`RedisStore`], if it is one: the cache then
    /// reads through it directly, without the boxed future of a trait call.
    /// Leave the default (`None`) in a store of your own.
    #[doc(hidden)]
    fn as_redis(&self) -> Option<&RedisStore> {
        None
    }

    /// True when one command's keys must share a hash slot (a Redis
    /// Cluster): a multi-key lock then checks its names before sending
    /// anything. Leave the default (`false`) in a store of your own unless it
    /// has that rule.
    #[doc(hidden)]
    fn keys_share_one_slot(&self) -> bool {
        false
    }

    /// `GET key` and `PTTL key` in one round trip (Redis: pipelined): the value
    /// with the time it has left. Errors as [`get`](Store::get).
    async fn get_with_ttl(&self, key: &str) -> Result<Option<Stored>>;

    /// `SET key value PX ttl`.
    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<()>;

    /// `DEL key`; true when a key was removed. (After a re-send the answer may
    /// be false for a key the first send removed.)
    async fn delete(&self, key: &str) -> Result<bool>;

    /// `SET key token NX PX expiry`; true when the key was free and is now ours,
    /// or already held `token` (so that a re-sent acquisition, or a re-grant,
    /// answers true; the expiry is then left as it was).
    async fn set_nx(&self, key: &str, token: &[u8], expiry: Duration) -> Result<bool>;

    /// Deletes `key` only if it holds `token`, and then, given a `channel`,
    /// publishes `key` on it so that waiters wake up. True when the key was ours
    /// (on Redis, also when a re-send finds the key gone: the first send removed it).
    async fn release(&self, key: &str, token: &[u8], channel: Option<&str>) -> Result<bool>;

    /// Sets the expiry of `key` to `expiry` only if it holds `token`.
    async fn extend(&self, key: &str, token: &[u8], expiry: Duration) -> Result<bool>;

    /// The double check of the cache, in one round trip: writes `token` under
    /// `fence_key` (expiring after `fence_expiry`), so that only this holder may
    /// store the value, and returns the value under `key` with its time left
    /// (`None` when missing or of another type).
    async fn get_or_fence(
        &self,
        key: &str,
        fence_key: &str,
        token: &[u8],
        fence_expiry: Duration,
    ) -> Result<Option<Stored>>;

    /// Stores `value` under `key` with `ttl` only if `fence_key` still holds
    /// `token`, then deletes the fence and, given a [`Publish`], publishes it (so
    /// waiters wake as soon as the value is stored, not when the lock is
    /// released). False (and nothing written or published) when a newer holder
    /// took the fence, or `set`/`invalidate` removed it. Sent twice, the second
    /// answers as the first did and writes nothing (Redis marks the fence as
    /// used by this token rather than deleting it).
    async fn set_fenced(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        fence_key: &str,
        token: &[u8],
        publish: Option<Publish<'_>>,
    ) -> Result<bool>;

    /// Subscribes to `channel` on a connection of its own. Messages arrive on the
    /// returned receiver; the receiver closes when the subscription is lost
    /// (connection dropped), and the caller subscribes again.
    async fn subscribe(&self, channel: &str) -> Result<mpsc::Receiver<Vec<u8>>>;

    /// `PUBLISH channel payload`: a wake-up sent on its own, where the write it
    /// announces went to another server (a value server set with
    /// [`cache_url`](crate::Builder::cache_url)).
    async fn publish(&self, channel: &str, payload: &str) -> Result<()>;

    /// Takes `claim` for `token` until `expiry`, writing `owner` (metadata for
    /// operators) next to it: the fencing token of each name when granted
    /// (each name's counter advanced once), `None` when refused. Sent twice, the
    /// second answers the same tokens and advances nothing.
    ///
    /// The default implementation supports a single-name [`Claim::Exclusive`]
    /// through [`set_nx`](Store::set_nx), with fencing token 0 (no counter),
    /// so that a custom store keeps working for plain locks; other claims are
    /// [`Error::InvalidConfig`].
    async fn claim(
        &self,
        claim: Claim<'_>,
        token: &[u8],
        expiry: Duration,
        owner: &str,
    ) -> Result<Option<Vec<u64>>> {
        let _ = owner;
        let key = single_name(self, claim, "claim")?;
        Ok(self.set_nx(key, token, expiry).await?.then(|| vec![0]))
    }

    /// Resets the expiry of `claim` to `expiry` if `token` still holds it (every
    /// name of it). Default: [`extend`](Store::extend), for a single name.
    async fn renew(&self, claim: Claim<'_>, token: &[u8], expiry: Duration) -> Result<bool> {
        let key = single_name(self, claim, "renew")?;
        self.extend(key, token, expiry).await
    }

    /// Releases `claim` if `token` holds it and, given a `channel`, publishes
    /// its name(s) there. True when it was ours (on Redis, also when a re-send
    /// finds it gone). Default: [`release`](Store::release), for a single name.
    async fn unclaim(&self, claim: Claim<'_>, token: &[u8], channel: Option<&str>) -> Result<bool> {
        let key = single_name(self, claim, "unclaim")?;
        self.release(key, token, channel).await
    }

    /// Raises the fencing counter of each name of `claim` to at least the
    /// matching entry of `fences` (after an acquisition on several masters, so
    /// that a majority knows the highest token handed out). Default: nothing to
    /// raise (the default `claim` keeps no counter).
    async fn raise_fence(&self, claim: Claim<'_>, fences: &[u64]) -> Result<()> {
        let _ = (claim, fences);
        Ok(())
    }

    /// Who holds the (first) name of `claim`, for how long, with the owner
    /// metadata they wrote, and the last fencing token handed out. Default:
    /// [`Error::InvalidConfig`] (not supported).
    async fn holders(&self, claim: Claim<'_>) -> Result<Holdings> {
        let _ = claim;
        Err(unsupported(self, "holders"))
    }

    /// The values of `keys`, in order (with their time left when `with_ttl`,
    /// else `ttl: None`); a missing key, or one of another type, is `None`.
    /// Redis: one `MGET` per [`MAX_KEYS_PER_COMMAND`](crate::MAX_KEYS_PER_COMMAND)
    /// keys (with a `PTTL` per key pipelined behind it when `with_ttl`); a
    /// cluster sends one per slot, in one pipeline per node. Default: [`get`](Store::get) or
    /// [`get_with_ttl`](Store::get_with_ttl) for each key.
    async fn get_many(&self, keys: &[&str], with_ttl: bool) -> Result<Vec<Option<Stored>>> {
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            let stored = if with_ttl {
                self.get_with_ttl(key).await
            } else {
                self.get(key)
                    .await
                    .map(|v| v.map(|bytes| Stored { bytes, ttl: None }))
            };
            // As `MGET`: a key of another type is missing.
            out.push(match stored {
                Err(Error::Redis { source, .. }) if source.code() == Some("WRONGTYPE") => None,
                stored => stored?,
            });
        }
        Ok(out)
    }

    /// [`set`](Store::set) for each write (Redis: pipelined). Default: one
    /// `set` after another.
    async fn set_many(&self, writes: &[Write<'_>]) -> Result<()> {
        for w in writes {
            self.set(w.key, w.value, w.ttl).await?;
        }
        Ok(())
    }

    /// [`delete`](Store::delete) of each key (Redis: one `DEL`).
    async fn delete_many(&self, keys: &[&str]) -> Result<()> {
        for key in keys {
            self.delete(key).await?;
        }
        Ok(())
    }

    /// Takes every free lock among `names` (as [`Claim::Load`] claims) for
    /// `token`, and reports the others: per name, true when it is now
    /// `token`'s (or already was). Never waits. Redis: one script per
    /// [`MAX_KEYS_PER_COMMAND`](crate::MAX_KEYS_PER_COMMAND) names (a
    /// cluster: per slot). Default: [`claim`](Store::claim) of each name.
    async fn claim_loads(
        &self,
        names: &[&str],
        token: &[u8],
        expiry: Duration,
    ) -> Result<Vec<bool>> {
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let granted = self.claim(Claim::Load(name), token, expiry, "").await?;
            out.push(granted.is_some());
        }
        Ok(out)
    }

    /// [`claim_loads`](Store::claim_loads) and, for each lock granted,
    /// [`get_or_fence`](Store::get_or_fence) of its value, in one round trip
    /// on Redis: the batch's path where the one lock master is also the value
    /// server. Per entry, `None` when another token holds its lock (its fence
    /// untouched), else its value (`Some(None)`: missing). Default: the two,
    /// one after the other.
    async fn claim_loads_fenced(
        &self,
        entries: &[LoadClaim<'_>],
        token: &[u8],
        expiry: Duration,
        fence_expiry: Duration,
    ) -> Result<Vec<Option<Option<Stored>>>> {
        let locks: Vec<&str> = entries.iter().map(|e| e.lock).collect();
        let granted = self.claim_loads(&locks, token, expiry).await?;
        let held: Vec<(&str, &str)> = entries
            .iter()
            .zip(&granted)
            .filter(|(_, g)| **g)
            .map(|(e, _)| (e.value, e.fence))
            .collect();
        let mut found = self
            .get_or_fence_many(&held, token, fence_expiry)
            .await?
            .into_iter();
        Ok(granted
            .into_iter()
            .map(|g| {
                if g {
                    Some(found.next().flatten())
                } else {
                    None
                }
            })
            .collect())
    }

    /// Compare-and-pexpire on each key (load locks, fences): per key, true
    /// when it still held `token` and now expires after `expiry`. Default:
    /// [`extend`](Store::extend) of each key.
    async fn renew_loads(
        &self,
        keys: &[&str],
        token: &[u8],
        expiry: Duration,
    ) -> Result<Vec<bool>> {
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            out.push(self.extend(key, token, expiry).await?);
        }
        Ok(out)
    }

    /// Releases each of `names` that `token` holds and, given a `channel`,
    /// publishes each name released there. Default: [`unclaim`](Store::unclaim)
    /// of each name.
    async fn unclaim_loads(
        &self,
        names: &[&str],
        token: &[u8],
        channel: Option<&str>,
    ) -> Result<()> {
        for name in names {
            self.unclaim(Claim::Load(name), token, channel).await?;
        }
        Ok(())
    }

    /// [`get_or_fence`](Store::get_or_fence) on each `(key, fence_key)`, in one
    /// round trip on Redis. Default: one after another.
    async fn get_or_fence_many(
        &self,
        entries: &[(&str, &str)],
        token: &[u8],
        fence_expiry: Duration,
    ) -> Result<Vec<Option<Stored>>> {
        let mut out = Vec::with_capacity(entries.len());
        for (key, fence) in entries {
            out.push(self.get_or_fence(key, fence, token, fence_expiry).await?);
        }
        Ok(out)
    }

    /// [`set_fenced`](Store::set_fenced) on each write (each on its own: one
    /// refused does not stop the others), publishing each stored write's
    /// message on `channel`; per write, whether it was stored. Redis: one
    /// script per chunk. Default: one after another.
    async fn set_fenced_many(
        &self,
        writes: &[FencedWrite<'_>],
        token: &[u8],
        channel: Option<&str>,
    ) -> Result<Vec<bool>> {
        let mut out = Vec::with_capacity(writes.len());
        for w in writes {
            let publish = channel.map(|channel| Publish {
                channel,
                payload: w.message,
            });
            out.push(
                self.set_fenced(w.key, w.value, w.ttl, w.fence, token, publish)
                    .await?,
            );
        }
        Ok(out)
    }

    /// Checks that the server answers (Redis: `PING`). The embedded store always
    /// does.
    async fn ping(&self) -> Result<()> {
        Ok(())
    }

    /// A human-readable name of the server, password redacted.
    fn server(&self) -> &str;
}

/// The one name of a single-name exclusive claim, for the default methods.
fn single_name<'a, S: Store + ?Sized>(store: &S, claim: Claim<'a>, what: &str) -> Result<&'a str> {
    match claim {
        Claim::Exclusive([name]) => Ok(name),
        Claim::Load(name) => Ok(name),
        _ => Err(unsupported(store, what)),
    }
}

fn unsupported<S: Store + ?Sized>(store: &S, what: &str) -> Error {
    Error::InvalidConfig(format!(
        "store {} does not implement `{what}` for this lock primitive",
        store.server()
    ))
}
