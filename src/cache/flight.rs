//! In-process coalescing: concurrent `get_or_load` calls for one key form a
//! flight. Its leader alone reads Redis, takes the lock and runs the loader;
//! followers wait for the leader's outcome.
//!
//! Followers receive the value as the encoded bytes (each decodes its own copy,
//! so `T` need not be `Clone`) and, for calls handing out an `Arc` (which is
//! cheap to share), the leader's decoded value, so the flight decodes once, the loader error as a shared `Arc`, or the
//! cache's error. If the leader is dropped (its caller was cancelled, or its
//! loader panicked) before it finished, the flight is *abandoned*: it is removed
//! and every follower joins again, so exactly one of them becomes the new leader.

use std::any::Any;
use std::collections::{HashMap, hash_map};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::error::Error;

/// A stored value (header + payload), shared without copying.
pub type Bytes = Arc<Vec<u8>>;

/// What a flight ended with.
#[derive(Clone)]
pub enum Outcome {
    /// The value, as stored (header + payload), and the leader's decoded value
    /// when the call shares it (see [`Sharing`]).
    Value(Bytes, Option<Arc<dyn Any + Send + Sync>>),
    /// The loader's error, type-erased; followers downcast it to their `E`.
    LoaderError(Arc<dyn Any + Send + Sync>),
    /// The cache failed.
    Failed(Error),
    /// The leader went away without an outcome.
    Abandoned,
}

/// How followers take the leader's decoded value instead of decoding the
/// bytes again, for values that are cheap to share (an `Arc`, `shared.rs`):
/// `share` makes the leader's copy for the flight (the value's own `Arc`,
/// erased), `take` turns it back into a follower's value (`None` for a
/// follower asking for another type).
pub struct Sharing<T> {
    pub share: fn(&T) -> Arc<dyn Any + Send + Sync>,
    pub take: fn(&Arc<dyn Any + Send + Sync>) -> Option<T>,
}

impl<T> Clone for Sharing<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Sharing<T> {}

type Slot = watch::Sender<Option<Outcome>>;

/// Independent parts of the map, so that concurrent calls for different keys
/// rarely wait on the same mutex.
const SHARDS: usize = 16;

/// A flight in the map. Its channel is made when the first follower arrives, so
/// a hit that nobody waits on allocates no channel.
struct Entry {
    key: FlightKey,
    id: u64,
    slot: Option<Slot>,
}

/// A flight's key, kept to tell apart two keys with one hash: in place when
/// it is short (most keys are), so that starting a flight allocates nothing.
enum FlightKey {
    Short { len: u8, bytes: [u8; SHORT_KEY] },
    Long(Box<str>),
}

/// The longest key a flight keeps in place.
const SHORT_KEY: usize = 48;

impl FlightKey {
    fn new(key: &str) -> FlightKey {
        match u8::try_from(key.len()) {
            Ok(len) if key.len() <= SHORT_KEY => {
                let mut bytes = [0; SHORT_KEY];
                bytes[..key.len()].copy_from_slice(key.as_bytes());
                FlightKey::Short { len, bytes }
            }
            _ => FlightKey::Long(key.into()),
        }
    }

    fn is(&self, key: &str) -> bool {
        match self {
            FlightKey::Short { len, bytes } => bytes[..usize::from(*len)] == *key.as_bytes(),
            FlightKey::Long(long) => **long == *key,
        }
    }
}

/// Flights by the hash of their key. The hash is computed once per call
/// (foldhash, seeded per cache, so keys cannot be aimed at one bucket)
/// and picks the shard too; each entry keeps its key, so two keys with one
/// hash are told apart (see [`Role::Alone`]).
///
/// Each shard (its lock and its map) is aligned to 128 bytes, so that it has
/// its cache lines to itself: calls on other threads for keys of neighbouring
/// shards would otherwise take turns at one line.
#[derive(Default)]
#[repr(align(128))]
struct Shard(Mutex<ShardMap>);

impl Shard {
    fn lock(&self) -> std::sync::MutexGuard<'_, ShardMap> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Default)]
struct ShardMap {
    flights: HashMap<u64, Entry, BuildHasherDefault<Prehashed>>,
    /// Ids of this shard's flights (a counter under the shard's lock rather
    /// than one atomic every call of every thread would write).
    next_id: u64,
}

/// The flights of one cache, by key.
pub struct Flights {
    shards: [Shard; SHARDS],
    hasher: foldhash::fast::RandomState,
}

impl Default for Flights {
    fn default() -> Self {
        Flights {
            shards: std::array::from_fn(|_| Shard::default()),
            hasher: foldhash::fast::RandomState::default(),
        }
    }
}

/// A caller's part in a flight.
pub enum Role<'a> {
    Leader(Leader<'a>),
    Follower(watch::Receiver<Option<Outcome>>),
    /// Another key with the same 64-bit hash has a flight (about one chance
    /// in 2^64 per pair of keys): this call goes alone, as it would with
    /// coalescing off. The lock still loads its key once.
    Alone,
}

impl Flights {
    /// Flights in progress (none once every call has ended).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().flights.len()).sum()
    }

    /// Joins the flight for `key`, leading it if there is none.
    pub fn join(&self, key: &str) -> Role<'_> {
        self.join_hashed(key, self.hasher.hash_one(key))
    }

    fn join_hashed(&self, key: &str, hash: u64) -> Role<'_> {
        // Middle bits: the map takes its buckets from the low ones and its
        // tags from the top ones.
        let shard = &self.shards[(hash >> 32) as usize % SHARDS];
        let mut shard_map = shard.lock();
        let ShardMap { flights, next_id } = &mut *shard_map;
        // One probe of the map, whether the flight exists or not.
        let vacant = match flights.entry(hash) {
            hash_map::Entry::Occupied(mut occupied) => {
                let entry = occupied.get_mut();
                if !entry.key.is(key) {
                    return Role::Alone;
                }
                let slot = entry.slot.get_or_insert_with(|| watch::channel(None).0);
                return Role::Follower(slot.subscribe());
            }
            hash_map::Entry::Vacant(vacant) => vacant,
        };
        let id = *next_id;
        *next_id = next_id.wrapping_add(1);
        vacant.insert(Entry {
            key: FlightKey::new(key),
            id,
            slot: None,
        });
        Role::Leader(Leader {
            shard,
            hash,
            id,
            finished: false,
        })
    }
}

/// A hasher for keys that are hashes already: passes the `u64` through.
#[derive(Default)]
pub struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64`s are hashed here (`write_u64`); fold anything else in.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// The leader's handle: [`finish`](Leader::finish) hands the outcome to the
/// followers; dropping it unfinished abandons the flight.
pub struct Leader<'a> {
    shard: &'a Shard,
    hash: u64,
    id: u64,
    finished: bool,
}

impl Leader<'_> {
    pub fn finish(self, outcome: Outcome) {
        self.finish_with(|| outcome);
    }

    /// As [`finish`](Self::finish), with the outcome made only when the
    /// flight has followers (a hit nobody waited on shares nothing).
    pub fn finish_with(mut self, outcome: impl FnOnce() -> Outcome) {
        self.finished = true;
        self.close(outcome);
    }

    /// Removes the flight (a call arriving after this starts a fresh one and
    /// reads the store) and hands `outcome` to its followers, if any.
    fn close(&self, outcome: impl FnOnce() -> Outcome) {
        let slot = {
            let mut map = self.shard.lock();
            match map.flights.entry(self.hash) {
                hash_map::Entry::Occupied(entry) if entry.get().id == self.id => {
                    entry.remove().slot
                }
                _ => None,
            }
        };
        if let Some(slot) = slot {
            slot.send_replace(Some(outcome()));
        }
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.close(|| Outcome::Abandoned);
        }
    }
}

/// Waits for the flight's outcome. A leader that vanished counts as abandoned.
pub async fn outcome(mut rx: watch::Receiver<Option<Outcome>>) -> Outcome {
    match rx.wait_for(Option::is_some).await {
        Ok(outcome) => outcome.clone().unwrap_or(Outcome::Abandoned),
        Err(_) => Outcome::Abandoned,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(rx: &watch::Receiver<Option<Outcome>>) -> Option<Vec<u8>> {
        match &*rx.borrow() {
            Some(Outcome::Value(bytes, _)) => Some(bytes.to_vec()),
            _ => None,
        }
    }

    #[test]
    fn followers_get_the_leaders_value_and_the_flight_ends() {
        let flights = Flights::default();
        let Role::Leader(leader) = flights.join("k") else {
            panic!("the first call leads");
        };
        let Role::Follower(rx) = flights.join("k") else {
            panic!("the second call follows");
        };
        assert!(matches!(flights.join("other"), Role::Leader(_)));
        leader.finish(Outcome::Value(Arc::new(b"v".to_vec()), None));
        assert_eq!(value(&rx), Some(b"v".to_vec()));
        assert_eq!(flights.len(), 0);
        assert!(matches!(flights.join("k"), Role::Leader(_)));
    }

    #[test]
    fn a_dropped_leader_abandons_its_flight() {
        let flights = Flights::default();
        let leader = flights.join("k");
        let Role::Follower(rx) = flights.join("k") else {
            panic!("the second call follows");
        };
        drop(leader);
        assert!(matches!(&*rx.borrow(), Some(Outcome::Abandoned)));
        assert_eq!(flights.len(), 0);
    }

    #[test]
    fn flight_keys_short_and_long_match_only_themselves() {
        let long = "k".repeat(SHORT_KEY + 1);
        let exact = "k".repeat(SHORT_KEY);
        for key in ["", "a", "é", exact.as_str(), long.as_str()] {
            let kept = FlightKey::new(key);
            assert!(kept.is(key), "{key:?}");
            for other in ["", "b", "a\0", exact.as_str(), long.as_str()] {
                assert_eq!(kept.is(other), key == other, "{key:?} {other:?}");
            }
        }
    }

    #[test]
    fn two_keys_with_one_hash_never_share_a_flight() {
        let flights = Flights::default();
        let Role::Leader(leader) = flights.join_hashed("a", 7) else {
            panic!("the first call leads");
        };
        assert!(matches!(flights.join_hashed("b", 7), Role::Alone));
        assert!(matches!(flights.join_hashed("a", 7), Role::Follower(_)));
        leader.finish(Outcome::Abandoned);
        assert!(matches!(flights.join_hashed("b", 7), Role::Leader(_)));
    }

    #[test]
    fn a_late_leader_does_not_end_a_newer_flight() {
        let flights = Flights::default();
        let Role::Leader(first) = flights.join("k") else {
            panic!("leads");
        };
        // The first flight ends; a second starts under the same key.
        first.finish(Outcome::Abandoned);
        let Role::Leader(second) = flights.join("k") else {
            panic!("leads");
        };
        let Role::Follower(rx) = flights.join("k") else {
            panic!("follows");
        };
        assert!(rx.borrow().is_none());
        second.finish(Outcome::Value(Arc::new(b"2".to_vec()), None));
        assert_eq!(value(&rx), Some(b"2".to_vec()));
    }
}
