//! In-process coalescing: concurrent `get_or_load` calls for one key form a
//! flight. Its leader alone reads Redis, takes the lock and runs the loader;
//! followers wait for the leader's outcome.
//!
//! Followers receive the value as the encoded bytes (each decodes its own copy,
//! so `T` need not be `Clone`), the loader error as a shared `Arc`, or the
//! cache's error. If the leader is dropped (its caller was cancelled, or its
//! loader panicked) before it finished, the flight is *abandoned*: it is removed
//! and every follower joins again, so exactly one of them becomes the new leader.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::error::Error;

/// A stored value (header + payload), shared without copying.
pub type Bytes = Arc<Vec<u8>>;

/// What a flight ended with.
#[derive(Clone)]
pub enum Outcome {
    /// The value, as stored (header + payload).
    Value(Bytes),
    /// The loader's error, type-erased; followers downcast it to their `E`.
    LoaderError(Arc<dyn Any + Send + Sync>),
    /// The cache failed.
    Failed(Error),
    /// The leader went away without an outcome.
    Abandoned,
}

type Slot = watch::Sender<Option<Outcome>>;

/// The flights of one cache, by key.
#[derive(Default)]
pub struct Flights {
    map: Mutex<HashMap<String, Arc<Slot>>>,
}

/// A caller's part in a flight.
pub enum Role<'a> {
    Leader(Leader<'a>),
    Follower(watch::Receiver<Option<Outcome>>),
}

impl Flights {
    /// Joins the flight for `key`, leading it if there is none.
    pub fn join(&self, key: &str) -> Role<'_> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = map.get(key) {
            return Role::Follower(slot.subscribe());
        }
        let slot = Arc::new(watch::channel(None).0);
        map.insert(key.to_owned(), Arc::clone(&slot));
        Role::Leader(Leader {
            flights: self,
            key: key.to_owned(),
            slot,
            finished: false,
        })
    }

    fn remove(&self, key: &str, slot: &Arc<Slot>) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(key).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            map.remove(key);
        }
    }
}

/// The leader's handle: [`finish`](Leader::finish) hands the outcome to the
/// followers; dropping it unfinished abandons the flight.
pub struct Leader<'a> {
    flights: &'a Flights,
    key: String,
    slot: Arc<Slot>,
    finished: bool,
}

impl Leader<'_> {
    pub fn finish(mut self, outcome: Outcome) {
        self.finished = true;
        // Remove first: a call arriving after this point starts a fresh flight
        // (and reads the store) instead of receiving a finished outcome.
        self.flights.remove(&self.key, &self.slot);
        self.slot.send_replace(Some(outcome));
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.flights.remove(&self.key, &self.slot);
            self.slot.send_replace(Some(Outcome::Abandoned));
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
