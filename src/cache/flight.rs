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
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
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
/// `share` makes the leader's copy for the flight, `take` turns it back into
/// a follower's value (`None` for a follower asking for another type).
pub struct Sharing<T> {
    pub share: fn(&T) -> Arc<dyn Any + Send + Sync>,
    pub take: fn(&(dyn Any + Send + Sync)) -> Option<T>,
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
    id: u64,
    slot: Option<Slot>,
}

type Shard = Mutex<HashMap<Arc<str>, Entry>>;

/// The flights of one cache, by key.
pub struct Flights {
    shards: [Shard; SHARDS],
    next_id: AtomicU64,
}

impl Default for Flights {
    fn default() -> Self {
        Flights {
            shards: std::array::from_fn(|_| Mutex::default()),
            next_id: AtomicU64::new(0),
        }
    }
}

/// A caller's part in a flight.
pub enum Role<'a> {
    Leader(Leader<'a>),
    Follower(watch::Receiver<Option<Outcome>>),
}

impl Flights {
    /// Flights in progress (none once every call has ended).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    fn shard(&self, key: &str) -> &Shard {
        // FNV-1a: cheap, and only spreads keys over the shards.
        let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        &self.shards[(hash % SHARDS as u64) as usize]
    }

    /// Joins the flight for `key`, leading it if there is none.
    pub fn join(&self, key: &str) -> Role<'_> {
        let shard = self.shard(key);
        let mut map = shard.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = map.get_mut(key) {
            let slot = entry.slot.get_or_insert_with(|| watch::channel(None).0);
            return Role::Follower(slot.subscribe());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let key: Arc<str> = Arc::from(key);
        map.insert(Arc::clone(&key), Entry { id, slot: None });
        Role::Leader(Leader {
            shard,
            key,
            id,
            finished: false,
        })
    }
}

/// The leader's handle: [`finish`](Leader::finish) hands the outcome to the
/// followers; dropping it unfinished abandons the flight.
pub struct Leader<'a> {
    shard: &'a Shard,
    key: Arc<str>,
    id: u64,
    finished: bool,
}

impl Leader<'_> {
    pub fn finish(mut self, outcome: Outcome) {
        self.finished = true;
        self.close(outcome);
    }

    /// Removes the flight (a call arriving after this starts a fresh one and
    /// reads the store) and hands `outcome` to its followers, if any.
    fn close(&self, outcome: Outcome) {
        let slot = {
            let mut map = self.shard.lock().unwrap_or_else(|e| e.into_inner());
            match map.get(&self.key) {
                Some(entry) if entry.id == self.id => map.remove(&self.key).and_then(|e| e.slot),
                _ => None,
            }
        };
        if let Some(slot) = slot {
            slot.send_replace(Some(outcome));
        }
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.close(Outcome::Abandoned);
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
