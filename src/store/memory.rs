//! [`MemoryStore`]: the [`Store`] semantics (TTL, NX, compare-and-delete, lock
//! expiry, publish) inside one process, with no server.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{broadcast, mpsc};

use super::memory_claims::Claims;
use super::{Claim, Holdings, Publish, Store, Stored};
use crate::error::Result;

/// Sweep expired entries once per this many writes, so that keys nobody reads
/// again do not pile up.
const SWEEP_EVERY: u64 = 1024;

/// An embedded, in-process store with Redis semantics: values expire, `SET NX`
/// locks, scripts run atomically, releases are published to subscribers.
///
/// The default store when a [`LockedCache`](crate::LockedCache) is built without
/// Redis. It protects loads among the tasks of one process only: use Redis to
/// share values and locks between processes.
#[derive(Debug)]
pub struct MemoryStore {
    state: Mutex<State>,
    published: broadcast::Sender<(String, Vec<u8>)>,
}

#[derive(Debug, Default)]
pub(super) struct State {
    pub(super) entries: HashMap<String, Entry>,
    writes: u64,
    /// Readers, permits, fencing counters and owners (`memory_claims.rs`).
    pub(super) claims: Claims,
}

#[derive(Debug)]
pub(super) struct Entry {
    pub(super) value: Vec<u8>,
    pub(super) expires_at: Instant,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        let (published, _) = broadcast::channel(1024);
        MemoryStore {
            state: Mutex::new(State::default()),
            published,
        }
    }

    /// Number of live (unexpired) keys.
    pub fn len(&self) -> usize {
        let now = Instant::now();
        self.lock()
            .entries
            .values()
            .filter(|e| e.expires_at > now)
            .count()
    }

    /// True when no live key is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the map half-updated (every
        // critical section is a single map operation), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    pub(super) fn live(&mut self, key: &str) -> Option<&Vec<u8>> {
        let now = Instant::now();
        if self.entries.get(key).is_some_and(|e| e.expires_at <= now) {
            self.entries.remove(key);
        }
        self.entries.get(key).map(|e| &e.value)
    }

    /// The live value under `key` with its time left.
    fn live_with_ttl(&mut self, key: &str) -> Option<Stored> {
        self.live(key)?;
        let entry = self.entries.get(key)?;
        Some(Stored {
            bytes: entry.value.clone(),
            ttl: Some(entry.expires_at.saturating_duration_since(Instant::now())),
        })
    }

    pub(super) fn put(&mut self, key: &str, value: &[u8], ttl: Duration) {
        self.writes += 1;
        let now = Instant::now();
        if self.writes.is_multiple_of(SWEEP_EVERY) {
            self.entries.retain(|_, e| e.expires_at > now);
        }
        self.entries.insert(
            key.to_owned(),
            Entry {
                value: value.to_vec(),
                expires_at: deadline(now, ttl),
            },
        );
    }

    pub(super) fn holds(&mut self, key: &str, token: &[u8]) -> bool {
        self.live(key).is_some_and(|v| v == token)
    }
}

/// `now + ttl`, or a century from now for a TTL too large for an `Instant`.
fn deadline(now: Instant, ttl: Duration) -> Instant {
    now.checked_add(ttl)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
        .unwrap_or(now)
}

#[async_trait]
impl Store for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.lock().live(key).cloned())
    }

    async fn get_with_ttl(&self, key: &str) -> Result<Option<Stored>> {
        Ok(self.lock().live_with_ttl(key))
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<()> {
        self.lock().put(key, value, ttl);
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let mut state = self.lock();
        let was_live = state.live(key).is_some();
        state.entries.remove(key);
        Ok(was_live)
    }

    async fn set_nx(&self, key: &str, token: &[u8], expiry: Duration) -> Result<bool> {
        let mut state = self.lock();
        match state.live(key) {
            Some(held) => Ok(held == token),
            None => {
                state.put(key, token, expiry);
                Ok(true)
            }
        }
    }

    async fn release(&self, key: &str, token: &[u8], channel: Option<&str>) -> Result<bool> {
        let released = {
            let mut state = self.lock();
            let ours = state.holds(key, token);
            if ours {
                state.entries.remove(key);
            }
            ours
        };
        if released && let Some(channel) = channel {
            // No subscriber is not an error, as with PUBLISH.
            let _ = self
                .published
                .send((channel.to_owned(), key.as_bytes().to_vec()));
        }
        Ok(released)
    }

    async fn extend(&self, key: &str, token: &[u8], expiry: Duration) -> Result<bool> {
        let mut state = self.lock();
        if !state.holds(key, token) {
            return Ok(false);
        }
        if let Some(entry) = state.entries.get_mut(key) {
            entry.expires_at = deadline(Instant::now(), expiry);
        }
        Ok(true)
    }

    async fn get_or_fence(
        &self,
        key: &str,
        fence_key: &str,
        token: &[u8],
        fence_expiry: Duration,
    ) -> Result<Option<Stored>> {
        let mut state = self.lock();
        state.put(fence_key, token, fence_expiry);
        Ok(state.live_with_ttl(key))
    }

    async fn set_fenced(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        fence_key: &str,
        token: &[u8],
        publish: Option<Publish<'_>>,
    ) -> Result<bool> {
        {
            let mut state = self.lock();
            if !state.holds(fence_key, token) {
                return Ok(false);
            }
            state.put(key, value, ttl);
            state.entries.remove(fence_key);
        }
        if let Some(p) = publish {
            let _ = self
                .published
                .send((p.channel.to_owned(), p.payload.as_bytes().to_vec()));
        }
        Ok(true)
    }

    async fn claim(
        &self,
        claim: Claim<'_>,
        token: &[u8],
        expiry: Duration,
        owner: &str,
    ) -> Result<Option<Vec<u64>>> {
        Ok(self.lock().claim(claim, token, expiry, owner))
    }

    async fn renew(&self, claim: Claim<'_>, token: &[u8], expiry: Duration) -> Result<bool> {
        Ok(self.lock().renew(claim, token, expiry))
    }

    async fn unclaim(&self, claim: Claim<'_>, token: &[u8], channel: Option<&str>) -> Result<bool> {
        let released = self.lock().unclaim(claim, token);
        let Ok(names) = released else {
            return Ok(false);
        };
        if let Some(channel) = channel {
            for name in names {
                let _ = self.published.send((channel.to_owned(), name.into_bytes()));
            }
        }
        Ok(true)
    }

    async fn raise_fence(&self, claim: Claim<'_>, fences: &[u64]) -> Result<()> {
        self.lock().raise_fence(claim, fences);
        Ok(())
    }

    async fn holders(&self, claim: Claim<'_>) -> Result<Holdings> {
        Ok(self.lock().holders(claim))
    }

    async fn publish(&self, channel: &str, payload: &str) -> Result<()> {
        let _ = self
            .published
            .send((channel.to_owned(), payload.as_bytes().to_vec()));
        Ok(())
    }

    async fn subscribe(&self, channel: &str) -> Result<mpsc::Receiver<Vec<u8>>> {
        let mut published = self.published.subscribe();
        let channel = channel.to_owned();
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    message = published.recv() => match message {
                        Ok((ch, payload)) if ch == channel => {
                            if tx.send(payload).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        // Missed messages: end the subscription so the listener
                        // resubscribes and wakes every waiter to re-check.
                        Err(broadcast::error::RecvError::Lagged(_)) => return,
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        });
        Ok(rx)
    }

    fn server(&self) -> &str {
        "memory"
    }
}
