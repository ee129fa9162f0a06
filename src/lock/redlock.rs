//! The [`Redlock`] handle: the masters it locks on, their health, its
//! options, wake-ups and in-process lines; how it is built and what it tells
//! about itself. Taking locks is in `acquire.rs`, extending and releasing them
//! in `held.rs`.

use std::sync::Arc;
use std::time::Duration;

use super::LockOptions;
use super::local::Lines;
use super::vote::Health;
use super::wakeups::{Listeners, Registry};
use crate::defaults::DEFAULT_CONNECT_TIMEOUT;
use crate::error::{Error, Result};
use crate::stats::Stats;
use crate::store::redis::ConnectionOptions;
use crate::store::{MemoryStore, RedisStore, SharedStore};

/// A distributed lock over one or more independent Redis masters (or the
/// embedded store). Cheap to clone; clones share connections and wake-ups.
#[derive(Debug, Clone)]
pub struct Redlock {
    pub(super) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(super) struct Inner {
    pub(super) masters: Vec<SharedStore>,
    /// Which masters were unreachable at their last command.
    pub(super) health: Arc<Health>,
    pub(super) options: LockOptions,
    pub(super) registry: Arc<Registry>,
    pub(super) listeners: Option<Listeners>,
    pub(super) lines: Arc<Lines>,
    pub(super) stats: Arc<Stats>,
}

impl Redlock {
    /// A lock over the Redis masters at `urls`, each with a default pool.
    pub async fn connect(urls: &[&str], options: LockOptions) -> Result<Redlock> {
        let masters = urls
            .iter()
            .map(|url| {
                RedisStore::open(url, ConnectionOptions::default()).map(|s| Arc::new(s) as _)
            })
            .collect::<Result<Vec<SharedStore>>>()?;
        Redlock::new(masters, options).await
    }

    /// A lock among the tasks of this process, on the embedded store.
    pub async fn in_memory(options: LockOptions) -> Result<Redlock> {
        Redlock::new(vec![Arc::new(MemoryStore::new())], options).await
    }

    /// A lock over the given stores, one per master.
    pub async fn new(masters: Vec<SharedStore>, options: LockOptions) -> Result<Redlock> {
        Redlock::with_stats(masters, options, Arc::default(), DEFAULT_CONNECT_TIMEOUT).await
    }

    /// As [`new`](Redlock::new), counting into `stats`, and waiting up to
    /// `subscribe_timeout` for the wake-up subscriptions.
    pub(crate) async fn with_stats(
        masters: Vec<SharedStore>,
        options: LockOptions,
        stats: Arc<Stats>,
        subscribe_timeout: Duration,
    ) -> Result<Redlock> {
        options.validate()?;
        if masters.is_empty() {
            return Err(Error::InvalidConfig("at least one master is needed".into()));
        }
        let registry = Registry::new(Arc::clone(&stats));
        let listeners = options
            .wake_ups
            .then(|| Listeners::start(&masters, &options.channel, &registry));
        if let Some(listeners) = &listeners {
            let ready = listeners.ready(masters.len(), subscribe_timeout).await;
            if ready < masters.len() {
                tracing::warn!(
                    subscribed = ready,
                    masters = masters.len(),
                    "not every wake-up subscription is up yet; waiters poll until it is"
                );
            }
        }
        Ok(Redlock {
            inner: Arc::new(Inner {
                health: Health::new(masters.len()),
                masters,
                options,
                registry,
                listeners,
                lines: Arc::default(),
                stats,
            }),
        })
    }

    /// The options this lock was built with.
    pub fn options(&self) -> &LockOptions {
        &self.inner.options
    }

    /// Number of masters.
    pub fn masters(&self) -> usize {
        self.inner.masters.len()
    }

    /// Checks that every master answers, and returns the first failure (which
    /// names its server). Building connects lazily, so this is the way to find a
    /// wrong URL or password at startup rather than on the first lock.
    pub async fn ping(&self) -> Result<()> {
        let answers =
            futures_util::future::join_all(self.inner.masters.iter().map(|m| m.ping())).await;
        answers.into_iter().collect()
    }

    /// Per-name entries this lock keeps in memory right now (in-process lines
    /// and registered waiters). Zero once every call has ended, however it
    /// ended: nothing grows with the number of distinct lock names. For tests
    /// and diagnostics.
    #[doc(hidden)]
    pub fn retained_entries(&self) -> usize {
        self.inner.lines.len() + self.inner.registry.len()
    }

    /// Wake-up subscriptions currently connected (0 with wake-ups off).
    pub fn subscriptions(&self) -> usize {
        self.inner.listeners.as_ref().map_or(0, |l| l.subscribed())
    }
}
