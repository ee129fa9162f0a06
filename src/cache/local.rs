//! The near cache (L1): decoded values kept in this process, in front of Redis,
//! over moka. The only file that knows L1 exists; the cache asks it for a value
//! before a read, offers it what a read or a load produced, and tells it (and,
//! through pub/sub, every other process) when a key changes.
//!
//! # Coherence
//!
//! Every write through a cache (`set`, `invalidate`, a stored load) publishes
//! the key on the cache's invalidation channel once the write is done; every
//! process applies it to its L1. Three rules keep an L1 from serving a value
//! Redis no longer has for longer than its bound:
//!
//! - **No stale insert.** A read takes a [`Ticket`] (the key's invalidation
//!   epoch) *before* its `GET`; the value is inserted only if no invalidation of
//!   that key (or of everything) was applied since, checked again after the
//!   insert. A value read just before a write is thus never kept once the
//!   write's invalidation arrived, whatever the order of the two.
//! - **Bounded life.** An entry lives at most the near cache's TTL and never
//!   longer than the value's remaining freshness in Redis, so a lost message
//!   (a publish that failed, a subscription that died silently) costs at most
//!   that long.
//! - **No L1 without the subscription.** The L1 answers only while its
//!   subscription is up. When it is lost the L1 is cleared and bypassed; when a
//!   new one is up it is cleared again (messages in between were missed).
//!
//! Messages are `origin id` (16 hex digits) + key; a process skips its own,
//! having already applied the invalidation before publishing it.

use std::any::Any;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use moka::sync::Cache;
use tokio::task::JoinHandle;

use super::keys;
use crate::stats::Stats;
use crate::store::SharedStore;

/// Independent invalidation epochs: a key's invalidation refuses the inserts
/// of the reads in flight for keys of the same slot (rarely another key).
const SLOTS: usize = 256;
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Length of the origin id at the start of a message.
const ORIGIN_LEN: usize = 16;

/// A decoded value (an `Arc<T>` behind `dyn Any`) and until when it may
/// answer.
///
/// The expiry is checked here on each read rather than by moka's per-entry
/// expiry: with a per-entry expiry policy, moka's every read does clock
/// arithmetic and timer bookkeeping, a fifth of a near hit (1,410
/// instructions against 1,130). An expired entry answers no read; moka drops
/// every entry once the near cache's TTL has passed since it was kept (its
/// cache-wide time to live, which costs reads little), so an expired entry
/// holds its memory no longer than that.
#[derive(Clone)]
struct Entry {
    value: Arc<dyn Any + Send + Sync>,
    expires: Instant,
    weight: u32,
}

/// The invalidation epochs a read saw before it went to Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    all: u64,
    slot: u64,
}

/// A near cache key: a cache key.
type Key = Box<str>;

/// The near cache of one [`LockedCache`](crate::LockedCache).
pub struct Local {
    /// By cache key (the key a caller gives, not its value key: a lookup
    /// builds nothing), hashed by foldhash (seeded per cache)
    /// rather than std's SipHash: hashing the key was a tenth of a near hit.
    entries: Cache<Key, Entry, foldhash::fast::RandomState>,
    /// Bumped by every clear (shared with the cache's known tag versions,
    /// which a clear distrusts: a message that is not a key's, such as a tag
    /// invalidation, or a lost subscription).
    all: Arc<AtomicU64>,
    /// Bumped by every invalidation of a key of the slot.
    slots: Box<[AtomicU64]>,
    /// The subscription is up: the L1 may answer and take values.
    live: AtomicBool,
    max_ttl: Duration,
    /// The cache's key prefix: entries are by cache key, messages name value
    /// keys (`keys.rs`).
    key_prefix: String,
    channel: String,
    origin: String,
    stats: Arc<Stats>,
}

impl Local {
    /// A near cache holding up to `max_bytes` (values weighed by their encoded
    /// size plus their key), each for at most `max_ttl`, invalidated on
    /// `channel`. Not live until [`listen`] subscribed.
    pub fn new(
        max_bytes: u64,
        max_ttl: Duration,
        key_prefix: &str,
        channel: String,
        stats: Arc<Stats>,
    ) -> Local {
        let entries = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|key: &Key, entry: &Entry| {
                entry
                    .weight
                    .saturating_add(u32::try_from(key.len()).unwrap_or(u32::MAX))
            })
            .time_to_live(max_ttl)
            .build_with_hasher(foldhash::fast::RandomState::default());
        let origin = format!("{:016x}", fastrand::u64(..));
        Local {
            entries,
            all: Arc::new(AtomicU64::new(0)),
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            live: AtomicBool::new(false),
            max_ttl,
            key_prefix: key_prefix.to_owned(),
            channel,
            origin,
            stats,
        }
    }

    /// The counter every clear bumps.
    pub fn clears(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.all)
    }

    /// The pub/sub channel of the invalidations.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// Whether the subscription is up (the L1 answers only then).
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::SeqCst)
    }

    /// The value of `key` as a `T`, if the L1 holds one of that type.
    pub fn get<T: Send + Sync + 'static>(&self, key: &str) -> Option<Arc<T>> {
        if !self.is_live() {
            return None;
        }
        let found = self.peek::<T>(key);
        Stats::add(if found.is_some() {
            &self.stats.near_hits
        } else {
            &self.stats.near_misses
        });
        found
    }

    /// As [`get`](Self::get), without counting (for tests and benches).
    pub fn peek<T: Send + Sync + 'static>(&self, key: &str) -> Option<Arc<T>> {
        if !self.is_live() {
            return None;
        }
        let entry = self.entries.get(key)?;
        if entry.expires <= Instant::now() {
            return None;
        }
        entry.value.downcast::<T>().ok()
    }

    /// Taken before reading `key` from Redis; hand it to [`insert`](Self::insert).
    pub fn ticket(&self, key: &str) -> Ticket {
        Ticket {
            all: self.all.load(Ordering::SeqCst),
            slot: self.slot(key).load(Ordering::SeqCst),
        }
    }

    /// Keeps `value` for `key` for at most `ttl` (its remaining freshness;
    /// capped at the near cache's TTL), unless an invalidation of `key` was
    /// applied since `ticket` was taken, or the subscription is down. `weight`
    /// is the encoded size.
    #[cfg(test)]
    pub fn insert<T: Send + Sync + 'static>(
        &self,
        key: &str,
        value: Arc<T>,
        weight: usize,
        ttl: Duration,
        ticket: Ticket,
    ) {
        self.insert_erased(key, value, weight, ttl, ticket);
    }

    /// Keeps `value`, an `Arc<T>` erased to `dyn Any` (as a flight shares it),
    /// for `key` for at most `ttl` (its remaining freshness; capped at the
    /// near cache's TTL), unless an invalidation of `key` was applied since
    /// `ticket` was taken, or the subscription is down. `weight` is the
    /// encoded size.
    pub fn insert_erased(
        &self,
        key: &str,
        value: Arc<dyn Any + Send + Sync>,
        weight: usize,
        ttl: Duration,
        ticket: Ticket,
    ) {
        let ttl = ttl.min(self.max_ttl);
        if ttl.is_zero() || !self.is_live() || self.ticket(key) != ticket {
            return;
        }
        let entry = Entry {
            value,
            expires: Instant::now() + ttl,
            weight: u32::try_from(weight).unwrap_or(u32::MAX),
        };
        self.entries.insert(key.into(), entry);
        // An invalidation between the check and the insert removed nothing:
        // take the value out again.
        if self.ticket(key) != ticket || !self.is_live() {
            self.entries.invalidate(key);
        }
    }

    /// Drops `key` here and refuses the inserts of reads already in flight.
    pub fn invalidate(&self, key: &str) {
        self.slot(key).fetch_add(1, Ordering::SeqCst);
        self.entries.invalidate(key);
    }

    /// [`invalidate`](Self::invalidate) for the key whose value key (as
    /// written to Redis, and sent in messages) is `value_key`; everything when
    /// no key of this cache has that value key (safe, if costly).
    pub fn invalidate_value_key(&self, value_key: &str) {
        match keys::cache_key_of(&self.key_prefix, value_key) {
            Some(key) => self.invalidate(key),
            None => self.clear(),
        }
    }

    /// Drops every entry and refuses the inserts of every read in flight.
    pub fn clear(&self) {
        self.all.fetch_add(1, Ordering::SeqCst);
        self.entries.invalidate_all();
    }

    /// The message telling other processes that the value at `value_key`
    /// changed (messages name value keys, as Redis does).
    pub fn message(&self, value_key: &str) -> String {
        format!("{}{value_key}", self.origin)
    }

    /// Applies a message from the channel: invalidates its key, unless it
    /// came from this process (which applied it before publishing). A message
    /// that is not ours to parse clears everything (safe, if costly).
    fn apply(&self, payload: &[u8]) {
        let parsed = std::str::from_utf8(payload)
            .ok()
            .filter(|m| m.len() >= ORIGIN_LEN && m.is_char_boundary(ORIGIN_LEN))
            .map(|m| m.split_at(ORIGIN_LEN));
        match parsed {
            Some((origin, _)) if origin == self.origin => {}
            Some((_, value_key)) => {
                Stats::add(&self.stats.near_invalidations);
                self.invalidate_value_key(value_key);
            }
            None => self.clear(),
        }
    }

    fn set_live(&self, live: bool) {
        self.live.store(live, Ordering::SeqCst);
        self.clear();
    }

    /// Entries held (approximate: moka applies removals lazily).
    #[cfg(test)]
    fn len(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    fn slot(&self, key: &str) -> &AtomicU64 {
        // FNV-1a, as the flights use: only spreads keys over the slots.
        let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        &self.slots[(hash % SLOTS as u64) as usize]
    }
}

/// A cache's near cache and its invalidation listener (aborted on drop).
pub struct Near {
    pub local: Arc<Local>,
    _listener: Listener,
}

impl Near {
    /// A near cache of `max_bytes` whose entries live at most `max_ttl`,
    /// invalidated on the channel of `key_prefix` on `store`.
    pub fn start(
        max_bytes: u64,
        max_ttl: Duration,
        key_prefix: &str,
        store: SharedStore,
        stats: Arc<Stats>,
    ) -> Near {
        let channel = format!("locked-cache:near:{key_prefix}");
        let local = Arc::new(Local::new(max_bytes, max_ttl, key_prefix, channel, stats));
        let listener = listen(&local, store);
        Near {
            local,
            _listener: listener,
        }
    }

    /// Waits until the subscription is up, for at most `timeout`.
    pub async fn ready(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.local.is_live() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        true
    }

    /// After a write of `value_key` to the store: drops it here, and publishes
    /// the invalidation for the other processes. A failed publish is logged,
    /// not returned: the write happened, and the other processes' copies
    /// expire within the near cache's TTL.
    pub async fn changed(&self, store: &SharedStore, value_key: &str) {
        self.local.invalidate_value_key(value_key);
        let message = self.local.message(value_key);
        if let Err(e) = store.publish(self.local.channel(), &message).await {
            tracing::warn!(key = value_key, error = %e, "publishing a near cache invalidation failed; other processes may serve the old value until their near cache entry expires");
        }
    }
}

/// The invalidation listener of a near cache; aborted on drop.
#[derive(Debug)]
struct Listener(JoinHandle<()>);

impl Drop for Listener {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Subscribes `local` to its channel on `store` and applies every message,
/// resubscribing with backoff after a loss (clearing the L1 each time), until
/// the near cache is dropped.
fn listen(local: &Arc<Local>, store: SharedStore) -> Listener {
    Listener(tokio::spawn(run(Arc::downgrade(local), store)))
}

async fn run(local: Weak<Local>, store: SharedStore) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let Some(channel) = local.upgrade().map(|l| l.channel.clone()) else {
            return;
        };
        match store.subscribe(&channel).await {
            Ok(mut messages) => {
                backoff = BACKOFF_MIN;
                match local.upgrade() {
                    Some(l) => l.set_live(true),
                    None => return,
                }
                while let Some(payload) = messages.recv().await {
                    let Some(l) = local.upgrade() else {
                        return;
                    };
                    l.apply(&payload);
                }
                match local.upgrade() {
                    Some(l) => {
                        l.set_live(false);
                        Stats::add(&l.stats.near_resubscriptions);
                    }
                    None => return,
                }
                tracing::warn!(
                    server = store.server(),
                    "near cache invalidation subscription lost: near cache cleared and bypassed until resubscribed"
                );
            }
            Err(e) => {
                tracing::debug!(server = store.server(), error = %e, "near cache invalidation subscription failed");
            }
        }
        if local.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    const MINUTE: Duration = Duration::from_secs(60);

    fn local(max_bytes: u64) -> Local {
        let l = Local::new(max_bytes, MINUTE, "", "inv".into(), Arc::default());
        l.live.store(true, Ordering::SeqCst);
        l
    }

    #[test]
    fn a_value_is_kept_and_handed_out_shared() {
        let l = local(1 << 20);
        let t = l.ticket("k");
        l.insert("k", Arc::new(String::from("v")), 1, MINUTE, t);
        let a = l.get::<String>("k").unwrap();
        let b = l.get::<String>("k").unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        // Another type under the key is a miss, not a panic.
        assert!(l.get::<u64>("k").is_none());
        assert_eq!(l.stats.snapshot().near_hits, 2);
    }

    #[test]
    fn an_invalidation_after_the_ticket_refuses_the_insert() {
        let l = local(1 << 20);
        let t = l.ticket("k");
        l.invalidate("k");
        l.insert("k", Arc::new(1u32), 1, MINUTE, t);
        assert!(l.get::<u32>("k").is_none());
        let t = l.ticket("k");
        l.clear();
        l.insert("k", Arc::new(1u32), 1, MINUTE, t);
        assert!(l.get::<u32>("k").is_none());
        // A fresh ticket inserts.
        let t = l.ticket("k");
        l.insert("k", Arc::new(2u32), 1, MINUTE, t);
        assert_eq!(*l.get::<u32>("k").unwrap(), 2);
    }

    #[test]
    fn entries_expire_with_the_shorter_of_their_ttl_and_the_cap() {
        let l = Local::new(
            1 << 20,
            Duration::from_millis(30),
            "",
            "inv".into(),
            Arc::default(),
        );
        l.live.store(true, Ordering::SeqCst);
        l.insert("cap", Arc::new(1u8), 1, MINUTE, l.ticket("cap"));
        l.insert(
            "own",
            Arc::new(1u8),
            1,
            Duration::from_millis(10),
            l.ticket("own"),
        );
        l.insert("none", Arc::new(1u8), 1, Duration::ZERO, l.ticket("none"));
        assert!(l.get::<u8>("cap").is_some());
        assert!(l.get::<u8>("none").is_none());
        std::thread::sleep(Duration::from_millis(15));
        assert!(l.get::<u8>("own").is_none());
        assert!(l.get::<u8>("cap").is_some());
        std::thread::sleep(Duration::from_millis(20));
        assert!(l.get::<u8>("cap").is_none());
        // An expired entry is replaced by the next value kept.
        l.insert("cap", Arc::new(2u8), 1, MINUTE, l.ticket("cap"));
        assert_eq!(l.get::<u8>("cap").as_deref(), Some(&2));
    }

    /// An entry past its own expiry answers no read, and every entry is
    /// dropped (its memory freed) once the near cache's TTL has passed,
    /// whether it was read or not.
    #[test]
    fn expired_entries_are_dropped_within_the_near_cache_ttl() {
        let l = Local::new(
            1 << 20,
            Duration::from_millis(40),
            "",
            "inv".into(),
            Arc::default(),
        );
        l.live.store(true, Ordering::SeqCst);
        for key in ["read", "unread", "capped"] {
            let ttl = if key == "capped" {
                MINUTE
            } else {
                Duration::from_millis(10)
            };
            l.insert(key, Arc::new(1u8), 1, ttl, l.ticket(key));
        }
        assert_eq!(l.len(), 3);
        std::thread::sleep(Duration::from_millis(15));
        assert!(l.get::<u8>("read").is_none());
        assert!(l.get::<u8>("capped").is_some());
        std::thread::sleep(Duration::from_millis(35));
        assert_eq!(l.len(), 0);
    }

    #[test]
    fn the_size_bound_holds() {
        let l = local(10_000);
        for i in 0..1000 {
            let key = format!("k{i}");
            l.insert(&key, Arc::new(vec![0u8; 100]), 100, MINUTE, l.ticket(&key));
        }
        assert!(l.len() <= 100, "{} entries of ~100 bytes in 10 KB", l.len());
        assert!(l.entries.weighted_size() <= 10_000);
    }

    #[test]
    fn nothing_is_served_or_kept_while_not_live() {
        let l = local(1 << 20);
        l.insert("k", Arc::new(1u8), 1, MINUTE, l.ticket("k"));
        l.set_live(false);
        assert!(l.get::<u8>("k").is_none());
        l.insert("k", Arc::new(1u8), 1, MINUTE, l.ticket("k"));
        l.set_live(true);
        assert!(l.get::<u8>("k").is_none(), "cleared on the way back");
    }

    #[test]
    fn messages_invalidate_other_origins_keys_only() {
        let l = local(1 << 20);
        for key in ["a", "b"] {
            l.insert(key, Arc::new(1u8), 1, MINUTE, l.ticket(key));
        }
        // Messages name value keys (`{a}` with the empty prefix); entries
        // are by cache key.
        l.apply(l.message("{a}").as_bytes());
        assert!(l.get::<u8>("a").is_some(), "our own message is skipped");
        l.apply(format!("{:016x}{{a}}", 1).as_bytes());
        assert!(l.get::<u8>("a").is_none());
        assert!(l.get::<u8>("b").is_some());
        // A value key no key of this cache has clears everything.
        l.insert("a", Arc::new(1u8), 1, MINUTE, l.ticket("a"));
        l.apply(format!("{:016x}a", 1).as_bytes());
        assert!(l.get::<u8>("a").is_none() && l.get::<u8>("b").is_none());
        // Garbage clears everything rather than being ignored.
        l.insert("b", Arc::new(1u8), 1, MINUTE, l.ticket("b"));
        l.apply(&[0xff, 0xfe]);
        assert!(l.get::<u8>("b").is_none());
    }

    #[tokio::test]
    async fn the_listener_applies_published_invalidations() {
        let store: SharedStore = Arc::new(MemoryStore::new());
        let a = Arc::new(Local::new(
            1 << 20,
            MINUTE,
            "",
            "inv".into(),
            Arc::default(),
        ));
        let b = Local::new(1 << 20, MINUTE, "", "inv".into(), Arc::default());
        let _listener = listen(&a, Arc::clone(&store));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !a.is_live() {
            assert!(Instant::now() < deadline, "never subscribed");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        a.insert("k", Arc::new(1u8), 1, MINUTE, a.ticket("k"));
        store.publish("inv", &b.message("{k}")).await.unwrap();
        while a.get::<u8>("k").is_some() {
            assert!(Instant::now() < deadline, "never invalidated");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}
