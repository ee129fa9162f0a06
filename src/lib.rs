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
//! # Which call
//!
//! | you need | call |
//! | --- | --- |
//! | a value; the loader may borrow from the caller | [`cache.get_or_load(key, \|\| async { .. })`](LockedCache::get_or_load) → [`Result<T, LoadError<E>>`](LoadError) |
//! | a loader that cannot fail (no `Ok::<_, E>` to spell) | [`get_or_compute`](LockedCache::get_or_compute) → [`Result<T, Error>`](Error) |
//! | the value as `Arc<T>`, answered from the near cache without a round trip | [`get_or_load_shared`](LockedCache::get_or_load_shared) |
//! | many keys in one call (a page of products, a list of ids): one round trip for the hits, **one** loader call for the misses | [`get_or_load_many`](LockedCache::get_or_load_many) → `Vec<Option<T>>` in the keys' order, [`get_many`](LockedCache::get_many), [`set_many`](LockedCache::set_many); guide: [many keys](guide::many_keys) |
//! | a blob (HTML, protobuf, an image): stored as bytes, read with one copy | [`get_or_load_bytes`](LockedCache::get_or_load_bytes) |
//! | how the call was served (`X-Cache`), or the loader's [`LoadContext`] as an argument | the same name + `_with_outcome`: [`get_or_load_with_outcome`](LockedCache::get_or_load_with_outcome), [`get_or_load_shared_with_outcome`](LockedCache::get_or_load_shared_with_outcome), [`get_or_load_bytes_with_outcome`](LockedCache::get_or_load_bytes_with_outcome) |
//! | per-call options (TTL, stale window, fail-safe, early refresh, negative TTL, timeouts) or a load that finishes for the others when its caller goes away | [`cache.with(CallOptions)`](LockedCache::with) then the same names ([`With`], [`CallOptions`]); the loader must be `Send + 'static` |
//! | read, write or remove without loading | [`get`](LockedCache::get), [`get_shared`](LockedCache::get_shared), [`get_bytes`](LockedCache::get_bytes), [`set`](LockedCache::set), [`set_with_ttl`](LockedCache::set_with_ttl), [`set_bytes`](LockedCache::set_bytes), [`invalidate`](LockedCache::invalidate) |
//! | remove a group of entries, or all of them, in every process (`Builder::tags(true)`) | [`CallOptions::tag`], then [`invalidate_tag`](LockedCache::invalidate_tag); [`clear`](LockedCache::clear) |
//! | the lock on its own | [`cache.lock()`](LockedCache::lock), [`Redlock`] |
//!
//! Inside any loader, [`LoadContext::current()`](LoadContext::current) gives the
//! lock's fencing token and lost signal. [`get_or_load_with`](LockedCache::get_or_load_with)
//! is deprecated: use `LoadContext::current()` or the `_with_outcome` calls.
//!
//! # Errors
//!
//! [`LoadError<E>`](LoadError) is a [`std::error::Error`] whenever
//! `E: Debug + Display`, so `?` works into `anyhow::Result`, `eyre::Result`,
//! `Box<dyn Error + Send + Sync>` or an application enum with
//! `#[from] LoadError<MyError>`. Its `Display` shows the loader's message
//! (`the loader failed: <message>`), and [`loader_error()`](LoadError::loader_error)
//! borrows the loader's error to match it. The cache's own failures are an
//! [`Error`], with predicates such as [`Error::is_timeout`] to decide retries.
//!
//! # Guide
//!
//! The [`guide`] has the rest, one chapter per subject:
//! [how it works](guide::how_it_works), [around an expiry](guide::around_an_expiry),
//! [caching bytes](guide::caching_bytes), [the near cache](guide::near_cache),
//! [deployments](guide::deployments), [configuration](guide::configuration),
//! [TLS and ACL users](guide::tls_and_acl), [in a web service](guide::web_service),
//! [observability](guide::observability), [locks](guide::locks),
//! [guarantees](guide::guarantees), [failure modes](guide::failure_modes),
//! [performance](guide::performance) and [development](guide::development).
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
//! **The cache's own loads** keep no counter, so that a Redis that runs the
//! cache for a day holds what is cached, not a trace of every load (see
//! [guide::locks]): a load's [`LoadContext::fencing_token`] is the granting
//! masters' highest clock reading in microseconds, above every earlier load's
//! token of the key as long as the masters' clocks do not go back or disagree
//! by more than the time between two loads of it. The value's own store does
//! not rely on it (it is fenced by the lock's random token).
//!
//! # Telemetry
//!
//! How each call was served ([`Outcome`], from the `_with_outcome` calls), a
//! `tracing` span per call (`get_or_load`, with DEBUG children `lock`, `load`
//! and `store`) whose field names follow OpenTelemetry's database conventions,
//! metrics through the `metrics` facade (feature `metrics`) and
//! [`LockedCache::stats`]. The span fields, the metric names and what each
//! counter counts are in [`guide::observability`].
//!
//! # Cargo features
//!
//! | feature | default | what it adds |
//! | --- | --- | --- |
//! | `json` | off | `JsonCodec`, via serde_json: values readable in `redis-cli` |
//! | `metrics` | off | the metrics of [`guide::observability`], via the `metrics` crate (the facade only) |
//! | `tls` | off | `rediss://` URLs, a custom CA and client certificates, over rustls |
//! | `cluster` | off | `Builder::cluster` and `ClusterStore`: Redis Cluster through redis-rs's cluster connection |
//! | `near-cache` | off | `Builder::near_cache`: decoded values kept in process (over moka), invalidated across processes by pub/sub |
//! | `http` | off | [`http::CacheLayer`]: whole HTTP responses cached by a tower layer (axum), one handler run per key across the fleet |
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
/// The guide: how it works, deployments, configuration, guarantees, failure modes, performance.
pub mod guide;
#[cfg(feature = "http")]
pub mod http;
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
#[cfg(feature = "credentials")]
pub use store::{BasicAuth, RotatingCredentials, StreamingCredentialsProvider};
pub use store::{
    Claim, ConnectionOptions, FencedWrite, Holding, Holdings, LoadClaim, MemoryStore, Publish,
    RedisStore, SharedStore, Store, Stored, Write,
};
#[cfg(feature = "cluster")]
pub use store::{ClusterOptions, ClusterStore};
pub use telemetry::Outcome;

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
