//! # locked-cache
//!
//! Protects expensive loads (database queries, remote calls, renders) from cache
//! stampedes across many processes and machines.
//!
//! [`LockedCache::get_or_load`] reads the value from Redis; on a miss it takes a
//! [`Redlock`] on the key, reads again, runs the loader **once** across every
//! caller, process and host, stores the value with a TTL, releases the lock, and
//! every waiter gets the value: waiters in this process share the leader's
//! outcome directly; waiters in other processes are woken by pub/sub the moment
//! the value is stored (before the lock is even released).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use locked_cache::LockedCache;
//!
//! // Without `.redis(url)` the cache runs on the embedded in-memory store.
//! let cache = LockedCache::builder().ttl(Duration::from_secs(60)).build().await?;
//! let answer: u64 = cache
//!     .get_or_load("answer", || async { Ok::<_, std::io::Error>(42) })
//!     .await?;
//! assert_eq!(answer, 42);
//! # Ok(()) }
//! ```
//!
//! # Locks
//!
//! The [`Redlock`] behind the cache is a toolkit of its own (README, "Locks"):
//! exclusive locks ([`Redlock::acquire`]), several names at once, all or none
//! ([`Redlock::acquire_all`]), a reader-writer lock ([`RwLock`]), a semaphore
//! on one server ([`Semaphore`]), run once per window ([`Redlock::run_once`])
//! and inspection ([`Redlock::inspect`]). Each hands out a [`LockGuard`] with
//! a watchdog that keeps the lock alive, a lost-lock signal
//! ([`LockGuard::lost`], [`LockLost`]) and a fencing token.
//!
//! # Fencing tokens
//!
//! [`LockGuard::fencing_token`] (and [`LoadContext::fencing_token`] in a
//! loader) is a number per lock name that grows with every acquisition. Write
//! it with the work the lock protects, to a store that refuses a token lower
//! than the highest it has seen: a holder that lost its lock without knowing
//! it (paused past its expiry) is then refused there.
//!
//! Each master keeps a counter per name and advances it in the script that
//! grants the lock; the token is the highest among the granting masters, and
//! when they disagree the acquisition raises every master's counter to it and
//! waits for a majority before returning. Any two majorities share a master,
//! so the next acquisition hands out a higher token. **Where it does not
//! hold**: a master restarted without persistence (AOF/RDB) loses its
//! counters, and a counter expires an hour after the last acquisition of its
//! name; a lost counter restarts from the server's clock in microseconds,
//! which is above every earlier token unless that clock went back. With
//! several masters, tokens stay monotonic as long as at most a minority lost
//! its counters at once; with a single master, as long as its clock does not
//! go back. A custom [`Store`] that implements only `set_nx` hands out 0.
//!
//! # Around an expiry
//!
//! By default a value is gone at its TTL and the next call waits for its
//! reload (one load across the fleet). [`CallOptions`] change that, for the
//! whole cache ([`Builder::call_options`]) or one call ([`LockedCache::with`]):
//! a stale window (stale-while-revalidate: the old value is served at once while
//! one caller refreshes it; fail-safe: served instead of a refresh's error),
//! early refresh (XFetch: hot keys reloaded before they expire), a negative TTL
//! for a loader's `None`, TTL jitter, soft and hard timeouts, and loads detached
//! from a caller that goes away. Freshness is judged from the key's remaining
//! TTL as Redis counts it, never from a host's clock.
//!
//! # Telemetry
//!
//! **Per call**: [`LockedCache::get_or_load_with_outcome`] returns how the value
//! was served ([`Outcome`]: `hit`, `coalesced`, `waited`, `loaded`, `stale` or
//! `fail_safe`), e.g. for an `X-Cache` header.
//!
//! **Spans** (`tracing`): every `get_or_load` call runs in an INFO span named
//! `get_or_load`; a miss opens DEBUG child spans `lock` (waiting for and taking
//! the lock), `load` (the loader) and `store` (the fenced write). Field names
//! follow OpenTelemetry's database semantic conventions where one applies, so
//! `tracing-opentelemetry` exports useful traces without this crate depending
//! on OpenTelemetry. Nothing is computed for a span nobody records.
//!
//! | field | on | value |
//! | --- | --- | --- |
//! | `db.system` | all | `"redis"`, or `"memory"` on the embedded store |
//! | `db.operation.name` | all | `"get_or_load"`, `"lock"`, `"load"`, `"store"` |
//! | `otel.kind` | `get_or_load` | `"client"` |
//! | `otel.status_code` | `get_or_load` | `"ERROR"` when the call failed |
//! | `error.type` | `get_or_load` | what failed: `loader`, `lock_timeout`, `quorum_not_reached`, `redis`, `command_timeout`... |
//! | `locked_cache.name` | `get_or_load` | the cache's [name](Builder::name) |
//! | `locked_cache.key_hash` | `get_or_load` | FNV-1a (64 bits, 16 hex digits) of prefix + key: never the key |
//! | `locked_cache.outcome` | `get_or_load` | `hit`, `coalesced`, `waited`, `loaded`, `stale`, `fail_safe`, `timeout` or `error` |
//! | `locked_cache.wait_ms` | `get_or_load` | time spent waiting for someone else's load (absent when it did not wait) |
//! | `locked_cache.lock_attempts` | `get_or_load`, `lock` | lock attempts made by the call |
//! | `locked_cache.lock_result` | `lock` | `acquired`, `value_found`, `quorum_lost`, `timeout`, `error` |
//! | `locked_cache.lock_lost` | `load` | whether the lock was lost while loading |
//! | `locked_cache.store_result` | `store` | `stored`, `refused` (fenced out by a newer writer), `failed` |
//!
//! The key hash is the same in every process and version, so one key's calls
//! can be followed across a fleet; it is not a secret (keys from a small space,
//! such as user ids, can be recovered by hashing every candidate): hash keys
//! yourself first if they must not be guessable. A call waiting for a lock says
//! at DEBUG what it waits for (once, then at most every second): a holder that
//! is loading, or one that crashed and whose lock has yet to expire.
//!
//! **Metrics** (feature `metrics`), through the [`metrics`](https://docs.rs/metrics)
//! facade: no recorder is installed; install yours (a Prometheus exporter...)
//! *before* building the cache, which registers its handles in `build()`. Every
//! metric has the label `cache` (the [name](Builder::name)); only
//! `locked_cache_calls_total` has another, `outcome` (the span's outcome values).
//!
//! - counters: `locked_cache_calls_total{outcome}`, and one
//!   `locked_cache_<field>_total` per [`StatsSnapshot`] field (`..._hits_total`,
//!   `..._misses_total`, `..._loads_total`...), counting exactly what the field
//!   counts;
//! - histograms, in seconds: `locked_cache_load_seconds` (each loader run),
//!   `locked_cache_wait_seconds` (calls that waited for someone else's load: an
//!   in-process leader or the lock), `locked_cache_lock_acquire_seconds` (from
//!   the first attempt to holding the lock), `locked_cache_time_to_value_seconds`
//!   (calls served by someone else's load, `coalesced` or `waited`: from the
//!   call to the value);
//! - gauges: `locked_cache_loads_in_flight`, `locked_cache_waiters` (calls of
//!   this process waiting for a flight or a lock), `locked_cache_subscribed_masters`
//!   (masters whose wake-up subscription is up, sampled every second).
//!
//! **Counters**: [`LockedCache::stats`] counts each call once; the hit ratio is
//! `hits / (hits + misses)` ([`StatsSnapshot::hit_ratio`]); see [`StatsSnapshot`].
//!
//! # Cargo features
//!
//! | feature | default | what it adds |
//! | --- | --- | --- |
//! | `json` | off | `JsonCodec`, via serde_json: values readable in `redis-cli` |
//! | `metrics` | off | the metrics above, via the `metrics` crate (the facade only) |
//! | `tls` | off | `rediss://` URLs, a custom CA and client certificates, over rustls |
//! | `cluster` | off | `Builder::cluster` and `ClusterStore`: Redis Cluster through redis-rs's cluster connection |
//! | `near-cache` | off | `Builder::near_cache`: decoded values kept in process (over moka), invalidated across processes by pub/sub |
//!
//! Modules, following a call from the top: the cache (`LockedCache`, its
//! [`Builder`], in-process flights and the lock keep-alive), the [lock](Redlock)
//! (quorum arithmetic, tokens, wake-ups, the [`LockGuard`]), the [`codec`], and
//! the [stores](Store) that send the commands.

#![warn(missing_docs)]
#![deny(unsafe_code)]

mod cache;
pub mod codec;
mod defaults;
mod error;
mod lock;
mod stats;
mod store;
mod stripes;
mod telemetry;

pub use cache::{Builder, CallOptions, LoadContext, LockedCache, QuorumLossPolicy, With};
#[cfg(feature = "json")]
pub use codec::JsonCodec;
pub use codec::{BincodeCodec, Codec};
pub use defaults::*;
pub use error::{CodecError, Error, LoadError, Result};
pub use lock::{
    HolderInfo, LockGuard, LockInfo, LockLost, LockOptions, LostSignal, Owner, Redlock, RunOnce,
    RwLock, Semaphore,
};
pub use stats::StatsSnapshot;
pub use store::{
    Claim, ConnectionOptions, Holding, Holdings, MemoryStore, Publish, RedisStore, SharedStore,
    Store, Stored,
};
#[cfg(feature = "cluster")]
pub use store::{ClusterOptions, ClusterStore};
pub use telemetry::Outcome;

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
