//! Every default of locked-cache, in one place. The builders' `Default` impls
//! use these; each setter's documentation says what changing it trades.

use std::time::Duration;

/// How long a stored value lives: 60 s.
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);
/// How long the lock of a cache's load lives unless extended or released
/// ([`Builder::lock_expiry`](crate::Builder::lock_expiry)): 800 ms. A live holder
/// extends it every third of it (267 ms) for as long as its load runs, so long
/// loads are safe; a holder that died (SIGKILL, OOM kill, a lost host) blocks
/// its key for at most this long, and waiters in other processes take over
/// within it plus one retry (under 1 s). The price is renewal traffic: about
/// 3.75 extension scripts a second per running load on each master, and as
/// many fence extensions on the value server; and a holder paused (CPU
/// starvation, a stop-the-world pause, SIGSTOP) for more than about 530 ms
/// loses its lock: another process then loads the key too, and the paused
/// holder's late write is refused by the fence (the value stays the newer
/// one). Raise it where holders are often paused that long.
pub const DEFAULT_LOCK_EXPIRY: Duration = Duration::from_millis(800);
/// How long a lock of the lock toolkit lives unless extended or released
/// ([`LockOptions::default`](crate::LockOptions), a [`Redlock`](crate::Redlock)
/// built on its own): 5 s. Longer than a cache load's: such a lock guards
/// work of the caller's whose loss is costlier than a second load, so it
/// tolerates pauses of its holder up to about 3.3 s (its watchdog extends it
/// every third), at the price of a crashed holder blocking the name that long.
pub const DEFAULT_REDLOCK_EXPIRY: Duration = Duration::from_secs(5);
/// How long a miss waits for someone else's load: 10 s. Well above the lock
/// expiry, so a waiter outlives a crashed holder's lock and loads the value
/// itself; and long enough for a slow load by a live holder.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(10);
/// Pause between lock attempts, randomised ±50%: 100 ms. Only a fallback while
/// wake-ups are on (waiters in other processes are woken by pub/sub the moment
/// the value is stored, and again when the lock is released).
pub const DEFAULT_RETRY: Duration = Duration::from_millis(100);
/// The Redlock per-master timeout: 50 ms (the upper end of the Redlock spec's
/// "5–50 ms for a 10 s expiry"; a 16th of the default lock expiry, so a lock
/// taken at that bound still has most of its validity left). Once a majority
/// of masters has answered an acquisition without deciding it, the attempt
/// waits at most this long (from its start) for the others.
pub const DEFAULT_MASTER_TIMEOUT: Duration = Duration::from_millis(50);
/// Pub/sub channel on which lock releases are published.
pub const DEFAULT_CHANNEL: &str = "locked-cache:released";
/// Prefix of every key the cache writes: `lc:`.
pub const DEFAULT_KEY_PREFIX: &str = "lc:";
/// Connections per Redis server, at most: 4. Commands share one multiplexed
/// connection until it fails; the others replace it.
pub const DEFAULT_POOL_SIZE: u32 = 4;
/// Bound on opening a connection or waiting for one from the pool: 1 s.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on each Redis command's answer: 1 s.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest encoded value the cache stores: 16 MiB.
pub const DEFAULT_MAX_VALUE_SIZE: usize = 16 * 1024 * 1024;
/// Longest key the cache accepts: 1024 bytes (prefix not counted).
pub const DEFAULT_MAX_KEY_LEN: usize = 1024;
/// The name a cache reports itself under in metrics labels and spans: `default`.
pub const DEFAULT_CACHE_NAME: &str = "default";
/// How long a value stays usable after its TTL: zero, so a value is gone at
/// its TTL and the next call waits for the reload (the behaviour without a
/// stale window). See [`CallOptions::stale_for`](crate::CallOptions::stale_for).
pub const DEFAULT_STALE_FOR: Duration = Duration::ZERO;
/// Early refresh (XFetch) is off by default.
pub const DEFAULT_EARLY_REFRESH: bool = false;
/// XFetch's β when early refresh is on: 1.0, the paper's choice (Vattani et al.
/// 2015). Above 1 refreshes earlier; below 1 later.
pub const DEFAULT_EARLY_REFRESH_BETA: f64 = 1.0;
/// TTL jitter: 0 (every value of a call lives exactly its TTL).
pub const DEFAULT_TTL_JITTER: f64 = 0.0;
/// Fail-safe is on: a usable stale value is served when its refresh fails.
pub const DEFAULT_FAIL_SAFE: bool = true;
/// Loads with a `'static` loader ([`LockedCache::with`](crate::LockedCache::with))
/// are detached from their caller by default: a load runs to completion even
/// if the caller that started it goes away.
pub const DEFAULT_DETACHED: bool = true;
/// The longest a load on a task of its own (a background refresh, a detached
/// load) may run: 60 s. Then it is dropped, its lock released, and the failure
/// counted: a hung backend call cannot hold a key's lock forever.
pub const DEFAULT_BACKGROUND_TIMEOUT: Duration = Duration::from_secs(60);
/// Tags and clear ([`Builder::tags`](crate::Builder::tags)) are off by default.
pub const DEFAULT_TAGS: bool = false;
/// How long a process trusts a tag version or the cache's generation it read:
/// 1 s, the near cache's default TTL. It bounds how long a process that missed
/// an invalidation message may serve an invalidated entry.
pub const DEFAULT_TAG_REFRESH: Duration = Duration::from_secs(1);
/// How long a tag's version lives after its last invalidation, and the longest
/// a tagged entry lives in Redis: 7 days.
pub const DEFAULT_TAG_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest an entry lives in the near cache (feature `near-cache`): 1 s, and
/// never longer than the value's remaining time in Redis. This bounds how long a
/// process may serve a value another process replaced when the invalidation
/// message is lost.
pub const DEFAULT_NEAR_CACHE_TTL: Duration = Duration::from_secs(1);
/// The most keys one Redis command or script of a batch call
/// ([`get_or_load_many`](crate::LockedCache::get_or_load_many),
/// [`get_many`](crate::LockedCache::get_many),
/// [`set_many`](crate::LockedCache::set_many)) carries: 500. A longer batch
/// is sent as several, one after another, so that no command holds the
/// server for long and no reply is unbounded. (The fenced store also keeps
/// each script under 4 MiB of values.)
pub const MAX_KEYS_PER_COMMAND: usize = 500;
