//! The lock primitives on one server: what a [`Claim`] is, the Redis keys it
//! lives under, and what a server says about who holds it ([`Holdings`]).
//!
//! For a lock name `n` (with a hash tag `{t}`, the derived keys are `n:meta`
//! etc.; without one, `{n}:meta`, so that on a cluster every key of a lock
//! hashes to the slot of `n`):
//!
//! | primitive | keys |
//! | --- | --- |
//! | exclusive lock (one or several names) | `n` (the token, `PX` expiry), `{n}:meta` |
//! | reader-writer lock | `n` (the writer's token), `{n}:readers` (sorted set: token → expiry, server ms), `{n}:writer-waiting` (a queued writer's token), `{n}:meta` |
//! | semaphore | `{n}:permits` (sorted set: token → expiry), `{n}:meta` |
//!
//! The meta key is a hash: `fence` (the last fencing token handed out for `n`),
//! `x` (the exclusive holder's or writer's token, a space, its owner metadata:
//! written on each grant, never deleted, so that a release costs no more than
//! before) and `o:<token>` (each reader's or permit holder's owner metadata,
//! deleted with its claim). It outlives the lock by at
//! least [`META_KEEP`] after the last claim, so that the fencing counter
//! survives between acquisitions; once it is gone, the next token is seeded
//! from the server's clock (microseconds), which stays above every token handed
//! out before as long as that clock does not go back.
//!
//! # What a cache load leaves behind: nothing
//!
//! The cache takes a lock per key it loads ([`Claim::Load`]), so keeping a
//! meta key an hour per loaded name made the lock masters hold a trace of
//! every load of the last hour (a 336-byte hash each: at 1,000 distinct loads
//! a second, 1.2 GB for 70 MB of values). A load's claim is the lock key
//! alone (`CLAIM_LOAD`: about 120 bytes while the load runs, gone at its
//! release or expiry): no meta key is written. Once a cache's last lock has
//! expired, its loads have left no key on the lock masters (on the value
//! server, the value's own fence outlives it by at most one more lock expiry).
//!
//! What a load gives up is the counter and the owner entry: its fencing
//! token is the server's clock (microseconds) at the grant, the highest among
//! the granting masters, which is above every earlier token of the key as
//! long as the servers' clocks do not go back, or (with several masters) do
//! not disagree by more than the time between two loads of the key; and
//! `inspect` shows a load's holder without owner metadata. The value itself
//! does not depend on either: its store is fenced by the lock's own random
//! token (`SET_FENCED`). Locks taken through the [`Redlock`](crate::Redlock)
//! API ([`Claim::Exclusive`] and the others) keep their meta key for
//! [`META_KEEP`], as before, at about 370 bytes a name.

use std::time::Duration;

/// How long the meta key (fencing counter, owners) is kept after a claim, at
/// least: 1 hour, or twice the claim's expiry when that is longer.
pub const META_KEEP: Duration = Duration::from_secs(3600);

/// A claim on one lock primitive, as sent to one server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Claim<'a> {
    /// An exclusive lock on every name, all or none.
    Exclusive(&'a [String]),
    /// An exclusive lock on one name, taken by the cache for one load: as
    /// [`Claim::Exclusive`] on that name, except that it keeps no fencing
    /// counter or owner entry (its fencing token is the server's clock, in
    /// microseconds), so that a cache's loads leave no key behind on the lock
    /// masters. A custom [`Store`](crate::Store) may treat it as a single-name
    /// exclusive claim.
    Load(&'a str),
    /// A reader of the reader-writer lock `name`.
    Read(&'a str),
    /// The writer of the reader-writer lock `name`. A writer refused because
    /// readers hold the lock keeps new readers out for `queue` (refreshed by
    /// each of its attempts).
    Write {
        /// The lock's name.
        name: &'a str,
        /// How long a refused writer's place at the head of the queue lasts.
        queue: Duration,
    },
    /// One of the `limit` permits of the semaphore `name`.
    Permit {
        /// The semaphore's name.
        name: &'a str,
        /// Number of permits.
        limit: u32,
    },
}

/// What one server says about a lock: the last fencing token it handed out,
/// and its holders.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Holdings {
    /// The last fencing token this server handed out for the name (0: none).
    pub fence: u64,
    /// The current holders.
    pub holders: Vec<Holding>,
}

/// One holder of a lock on one server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holding {
    /// The holder's token.
    pub token: Vec<u8>,
    /// Time left before the claim expires on this server.
    pub ttl: Duration,
    /// The owner metadata the holder wrote (see `lock/inspect.rs`), if any.
    pub owner: Option<String>,
}

/// `name` followed by `suffix`, hashing to the same cluster slot as `name`:
/// `name` + suffix when it has a hash tag, `{name}` + suffix otherwise.
pub fn derived(name: &str, suffix: &str) -> String {
    if has_hash_tag(name) {
        format!("{name}{suffix}")
    } else {
        format!("{{{name}}}{suffix}")
    }
}

/// True when `key` has a non-empty `{...}` hash tag.
fn has_hash_tag(key: &str) -> bool {
    key.find('{')
        .and_then(|open| key[open + 1..].find('}'))
        .is_some_and(|close| close > 0)
}

pub fn meta_key(name: &str) -> String {
    derived(name, ":meta")
}

pub fn readers_key(name: &str) -> String {
    derived(name, ":readers")
}

pub fn writer_waiting_key(name: &str) -> String {
    derived(name, ":writer-waiting")
}

pub fn permits_key(name: &str) -> String {
    derived(name, ":permits")
}

/// How long the meta key is kept for a claim of `expiry`.
pub fn meta_keep(expiry: Duration) -> Duration {
    META_KEEP.max(expiry * 2)
}

/// How long `claim`'s meta key is kept when it is taken or renewed for
/// `expiry`: as long as the lock for a load's claim, [`meta_keep`] otherwise.
pub fn meta_keep_for(claim: Claim<'_>, expiry: Duration) -> Duration {
    match claim {
        Claim::Load(_) => expiry,
        _ => meta_keep(expiry),
    }
}

impl Claim<'_> {
    /// The names the claim covers (one, except for a multi-name lock).
    pub fn names(&self) -> Vec<&str> {
        match self {
            Claim::Exclusive(names) => names.iter().map(String::as_str).collect(),
            Claim::Load(name)
            | Claim::Read(name)
            | Claim::Write { name, .. }
            | Claim::Permit { name, .. } => vec![name],
        }
    }

    /// The keys `HOLDERS` reads for the first name: lock key, members, meta.
    pub fn holders_keys(&self) -> [String; 3] {
        let name = self.names()[0];
        let members = match self {
            Claim::Permit { .. } => permits_key(name),
            _ => readers_key(name),
        };
        // A semaphore has no lock key: its sorted set, read as one, is no string.
        let lock = match self {
            Claim::Permit { .. } => members.clone(),
            _ => name.to_owned(),
        };
        [lock, members, meta_key(name)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::slot::slot;

    #[test]
    fn derived_keys_share_the_names_slot() {
        // (A name with a `}` but no hash tag, such as `{}x`, is the exception:
        // give such names a tag on a cluster.)
        for name in ["report", "lock.lc:{user:42}", "a{b}c", "x{", "lock.{"] {
            for key in [meta_key(name), readers_key(name), permits_key(name)] {
                assert_eq!(
                    slot(key.as_bytes()),
                    slot(name.as_bytes()),
                    "{name} -> {key}"
                );
            }
        }
        assert_eq!(meta_key("report"), "{report}:meta");
        assert_eq!(meta_key("lock.lc:{k}"), "lock.lc:{k}:meta");
    }
}
