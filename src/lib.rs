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
//! Modules, following a call from the top: the cache (`LockedCache`, its
//! [`Builder`], in-process flights and the lock keep-alive), the [lock](Redlock)
//! (quorum arithmetic, tokens, wake-ups, the [`LockGuard`]), the [`codec`], and
//! the [stores](Store) that send the commands.

#![warn(missing_docs)]

mod cache;
pub mod codec;
mod defaults;
mod error;
mod lock;
mod stats;
mod store;
mod telemetry;

pub use cache::{Builder, LoadContext, LockedCache, QuorumLossPolicy};
#[cfg(feature = "json")]
pub use codec::JsonCodec;
pub use codec::{BincodeCodec, Codec};
pub use defaults::*;
pub use error::{CodecError, Error, LoadError, Result};
pub use lock::{LockGuard, LockOptions, Redlock};
pub use stats::StatsSnapshot;
#[cfg(feature = "cluster")]
pub use store::{ClusterOptions, ClusterStore};
pub use store::{ConnectionOptions, MemoryStore, Publish, RedisStore, SharedStore, Store};
pub use telemetry::Outcome;

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
