//! Wake-ups for lock waiters: one subscription per master, shared by every waiter
//! of the process.
//!
//! Releasing a lock runs a Lua script that deletes the key and `PUBLISH`es the
//! key's name on one channel (the cache's fenced store publishes it too, as soon
//! as the value is written). Each [`Redlock`](super::Redlock) keeps one listener
//! task per master subscribed to that channel; a waiter registers its interest in a
//! lock key *before* it checks the value or tries the lock, so a release that
//! happens after the check always reaches it (a registered waiter keeps a permit,
//! so a wake-up that arrives while it is not yet sleeping is not lost).
//!
//! A release wakes one waiter per process (see [`Registry::wake`]); the
//! others poll until a later release or their retry timer.
//!
//! One channel for all keys (the key is the payload), rather than a channel per
//! key: the subscription is made once per connection, not once per wait, so
//! waiting costs no extra Redis command and there is no subscribe/check race to
//! get wrong. The price is that every process receives every release under the
//! channel; a release happens once per load, so that is small.
//!
//! When a listener loses its connection it resubscribes with backoff and, once
//! back, wakes every waiter so that none sleeps on a release it missed. Waiters
//! also wake on their retry timer, so a lost message costs latency, never
//! correctness.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::stats::Stats;
use crate::store::SharedStore;

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Registered waiters of one lock key, oldest first: (id, its wake-up permit).
type Line = Vec<(u64, Arc<Notify>)>;

/// The waiters of one process, by lock key.
#[derive(Debug)]
pub struct Registry {
    waiters: Mutex<HashMap<String, Line>>,
    next_id: AtomicU64,
    stats: Arc<Stats>,
}

impl Registry {
    pub fn new(stats: Arc<Stats>) -> Arc<Registry> {
        Arc::new(Registry {
            waiters: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            stats,
        })
    }

    /// Registers interest in releases of `resource` until the [`Waiter`] drops.
    pub fn register(self: &Arc<Self>, resource: &str) -> Waiter {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let notify = Arc::new(Notify::new());
        self.map()
            .entry(resource.to_owned())
            .or_default()
            .push((id, Arc::clone(&notify)));
        Waiter {
            registry: Some(Arc::clone(self)),
            resource: resource.to_owned(),
            id,
            notify,
        }
    }

    /// Wakes one waiter of `resource`: the one that waited longest, which then
    /// goes to the back of the line. One, not all: a release frees the lock for one
    /// holder, and waking every waiter of every process at once makes them all
    /// send `SET NX` together, which on several masters splits the votes so that
    /// nobody wins. (The cache coalesces its callers, so a process has one waiter
    /// per key there anyway.) The others keep their retry timers.
    pub fn wake(&self, resource: &str) {
        let mut map = self.map();
        if let Some(list) = map.get_mut(resource)
            && !list.is_empty()
        {
            self.stats.wakeups.fetch_add(1, Ordering::Relaxed);
            let first = list.remove(0);
            first.1.notify_one();
            list.push(first);
        }
    }

    fn wake_all(&self) {
        for list in self.map().values() {
            for (_, notify) in list {
                notify.notify_one();
            }
        }
    }

    /// Lock keys with registered waiters (none once every wait has ended).
    pub fn len(&self) -> usize {
        self.map().len()
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Line>> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A registered waiter for one lock key. Without a registry (wake-ups turned
/// off) it only sleeps.
#[derive(Debug)]
pub struct Waiter {
    registry: Option<Arc<Registry>>,
    resource: String,
    id: u64,
    notify: Arc<Notify>,
}

impl Waiter {
    /// A waiter that is never woken early: polling only.
    pub fn polling() -> Waiter {
        Waiter {
            registry: None,
            resource: String::new(),
            id: 0,
            notify: Arc::new(Notify::new()),
        }
    }

    /// Sleeps until the lock is released (or a listener reconnected) or `max` passes.
    /// Returns true when woken by a release.
    pub async fn wait(&self, max: Duration) -> bool {
        tokio::select! {
            _ = self.notify.notified() => true,
            _ = tokio::time::sleep(max) => false,
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let Some(registry) = self.registry.take() else {
            return;
        };
        let mut map = registry.map();
        if let Some(list) = map.get_mut(&self.resource) {
            list.retain(|(id, _)| *id != self.id);
            if list.is_empty() {
                map.remove(&self.resource);
            }
        }
    }
}

/// The listener tasks of one [`Redlock`](super::Redlock); aborted on drop.
#[derive(Debug)]
pub struct Listeners {
    tasks: Vec<JoinHandle<()>>,
    subscribed: watch::Receiver<usize>,
}

impl Listeners {
    /// Starts one listener per master on `channel`.
    pub fn start(masters: &[SharedStore], channel: &str, registry: &Arc<Registry>) -> Listeners {
        let (count_tx, subscribed) = watch::channel(0usize);
        let count_tx = Arc::new(count_tx);
        let connected = Arc::new(AtomicUsize::new(0));
        let tasks = masters
            .iter()
            .map(|store| {
                tokio::spawn(listen(
                    Arc::clone(store),
                    channel.to_owned(),
                    Arc::downgrade(registry),
                    Arc::clone(&connected),
                    Arc::clone(&count_tx),
                ))
            })
            .collect();
        Listeners { tasks, subscribed }
    }

    /// Waits until every listener has subscribed once, for at most `timeout`.
    /// Returns how many are subscribed now.
    pub async fn ready(&self, expected: usize, timeout: Duration) -> usize {
        let mut rx = self.subscribed.clone();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|n| *n >= expected)).await;
        *self.subscribed.borrow()
    }

    /// How many listeners are subscribed right now.
    pub fn subscribed(&self) -> usize {
        *self.subscribed.borrow()
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn listen(
    store: SharedStore,
    channel: String,
    registry: Weak<Registry>,
    connected: Arc<AtomicUsize>,
    count: Arc<watch::Sender<usize>>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        match store.subscribe(&channel).await {
            Ok(mut messages) => {
                backoff = BACKOFF_MIN;
                count.send_replace(connected.fetch_add(1, Ordering::SeqCst) + 1);
                // Releases may have been missed while we were away.
                match registry.upgrade() {
                    Some(r) => r.wake_all(),
                    None => return,
                }
                while let Some(payload) = messages.recv().await {
                    let Some(registry) = registry.upgrade() else {
                        return;
                    };
                    if let Ok(resource) = std::str::from_utf8(&payload) {
                        registry.wake(resource);
                    }
                }
                count.send_replace(connected.fetch_sub(1, Ordering::SeqCst) - 1);
                tracing::warn!(
                    server = store.server(),
                    "lock wake-up subscription lost; resubscribing"
                );
            }
            Err(e) => {
                tracing::debug!(server = store.server(), error = %e, "lock wake-up subscription failed");
            }
        }
        if registry.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}
