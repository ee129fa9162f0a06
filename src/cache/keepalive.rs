//! Keeps a lock (and its write fence) alive while a loader runs, and signals when
//! it was lost: the lock's [`Watchdog`], with the fence's extension added to
//! each round.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::lock::{LockGuard, LostSignal, Watchdog};
use crate::store::SharedStore;

/// A background task that extends the lock and the fence every `expiry / 3`.
/// [`stop`](KeepAlive::stop) lets an extension in flight finish (so no re-grant
/// can land after the release); dropping it instead aborts the task, so a
/// cancelled or panicking load leaves no task behind.
pub struct KeepAlive {
    watchdog: Watchdog,
    fencing_token: u64,
}

impl KeepAlive {
    /// Extends the lock (to `expiry`) and the fence (to `fence_expiry`) every
    /// third of the lock expiry. The lock counts as lost when the masters refuse an
    /// extension, or when extensions keep failing (masters unreachable) until the
    /// last known validity has run out.
    pub fn start(
        guard: &LockGuard,
        value_store: SharedStore,
        fence_key: String,
        expiry: Duration,
        fence_expiry: Duration,
    ) -> KeepAlive {
        let token: Arc<[u8]> = guard.token().into();
        let fence_key: Arc<str> = fence_key.into();
        let fence = move || {
            let (store, key, token) = (
                Arc::clone(&value_store),
                Arc::clone(&fence_key),
                Arc::clone(&token),
            );
            Box::pin(async move {
                // A fence that is gone while the lock holds (the value server
                // restarted, or set/invalidate superseded this load) is left
                // gone: the write will be refused, which is right in both cases.
                if let Err(e) = store.extend(&key, &token, fence_expiry).await {
                    tracing::debug!(fence = &*key, error = %e, "extending the fence failed");
                }
            }) as _
        };
        KeepAlive {
            watchdog: Watchdog::start(guard.extender(), expiry, true, Some(Box::new(fence))),
            fencing_token: guard.fencing_token(),
        }
    }

    /// Stops extending, after the extension in flight (if any) has answered.
    /// Returns whether the lock was lost.
    pub async fn stop(self) -> bool {
        self.watchdog.stop().await
    }

    /// The loader's view of the lock: its lost signal and fencing token.
    pub fn context(&self) -> LoadContext {
        LoadContext {
            lost: Some(self.watchdog.signal()),
            fencing_token: Some(self.fencing_token),
            entry: Arc::default(),
        }
    }
}

tokio::task_local! {
    /// The context of the load running in this task, for
    /// [`LoadContext::current`].
    pub(super) static CURRENT: LoadContext;
}

/// What a loader can learn about its lock while it runs (whether it was lost,
/// its fencing token), and what it can say about the entry it loads: its own
/// TTL and stale window ([`set_ttl`](Self::set_ttl),
/// [`set_stale_for`](Self::set_stale_for)), or not to store it at all
/// ([`do_not_store`](Self::do_not_store)). See [adaptive
/// entries](#adaptive-entries).
///
/// Inside any loader, [`LoadContext::current`] returns it; the
/// `*_with_outcome` calls also hand it to the loader as its argument. Clones
/// share one entry: a setting made through any of them counts.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use locked_cache::{LoadContext, LockedCache};
///
/// let cache = LockedCache::builder().build().await?;
/// let token: Option<u64> = cache
///     .get_or_compute("k", || async {
///         let context = LoadContext::current().expect("inside a loader");
///         context.fencing_token()
///     })
///     .await?;
/// assert!(token.is_some());
/// assert!(LoadContext::current().is_none(), "outside a loader");
/// # Ok(()) }
/// ```
///
/// # Adaptive entries
///
/// A loader often learns how long its value is good for only once it has it:
/// a token's `expires_in`, a response's `Cache-Control: max-age`, a feed's
/// next update time. And some answers should reach the caller without being
/// stored: a rate-limited or partial answer, an HTTP 5xx or a response that
/// sets a cookie. The loader says so on its context; the settings apply to the
/// value this load returns, with every value kind (owned, shared, bytes) and
/// with or without per-call [`CallOptions`](crate::CallOptions):
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use locked_cache::{LoadContext, LockedCache};
///
/// let cache = LockedCache::builder().build().await?;
/// let token: String = cache
///     .get_or_load("oauth:token", || async {
///         let (token, expires_in) = ("abc".to_owned(), Duration::from_secs(3600));
///         if let Some(load) = LoadContext::current() {
///             // Fresh until a minute before the token expires.
///             load.set_ttl(expires_in.saturating_sub(Duration::from_secs(60)));
///         }
///         Ok::<_, std::io::Error>(token)
///     })
///     .await?;
/// # let _ = token;
/// let busy: Vec<u8> = cache
///     .get_or_load_bytes("page:/busy", || async {
///         LoadContext::current().expect("in a loader").do_not_store();
///         Ok::<_, std::io::Error>(b"try again".to_vec())
///     })
///     .await?;
/// assert_eq!(busy, b"try again");
/// assert_eq!(cache.get_bytes("page:/busy").await?, None, "answered, not stored");
/// # Ok(()) }
/// ```
///
/// A value that is not stored still reaches every caller that waited on this
/// load *in this process* (they share the one load, as for any value);
/// callers waiting in *other* processes are woken when the lock is released,
/// find nothing stored, and the next of them runs its own load (one at a time
/// per key across the fleet, as for any miss). A stale entry the load would
/// have replaced is left as it was (it is still served within its window, and
/// fail-safe can still return it). A loader that must not share its answer
/// with the other callers of this process (a response with a session cookie)
/// has to tell them apart itself: see the `http` module's layer for one way.
///
/// These settings apply to single-key loads (`get_or_load` and its
/// variants, including background refreshes); the loader of
/// [`get_or_load_many`](crate::LockedCache::get_or_load_many) has no context.
#[derive(Debug, Clone)]
pub struct LoadContext {
    lost: Option<LostSignal>,
    fencing_token: Option<u64>,
    entry: Arc<Mutex<EntrySettings>>,
}

/// What a loader said about the entry it loads (see [`LoadContext`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct EntrySettings {
    /// The entry's own fresh time, instead of the call's TTL.
    pub ttl: Option<Duration>,
    /// The entry's own stale window, instead of the call's.
    pub stale_for: Option<Duration>,
    /// Hand the value out without storing it.
    pub skip_store: bool,
}

impl LoadContext {
    /// The context of the load this code runs in: `Some` inside a loader
    /// (in the loader's own future, not in tasks it spawns), `None`
    /// elsewhere.
    pub fn current() -> Option<LoadContext> {
        CURRENT.try_with(LoadContext::clone).ok()
    }

    /// The context of a load without the lock (fail-open): never lost, no token.
    pub(crate) fn new(lost: Option<LostSignal>) -> LoadContext {
        LoadContext {
            lost,
            fencing_token: None,
            entry: Arc::default(),
        }
    }

    /// What the loader said about its entry, read once the load is over.
    pub(crate) fn entry_settings(&self) -> EntrySettings {
        *self.entry.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, change: impl FnOnce(&mut EntrySettings)) {
        change(&mut self.entry.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// The fresh time of the entry this load stores, instead of the call's
    /// TTL (and of its [negative TTL](crate::CallOptions::negative_ttl)), with
    /// no [jitter](crate::CallOptions::ttl_jitter): the entry is fresh for
    /// exactly this long, then stale for its stale window, then gone. Above
    /// 10 years counts as 10 years; zero does not store the value (as
    /// [`do_not_store`](Self::do_not_store)). The last call wins. Defaults to
    /// the call's TTL.
    pub fn set_ttl(&self, ttl: Duration) {
        self.update(|entry| entry.ttl = Some(ttl));
    }

    /// The stale window of the entry this load stores (how long after its
    /// TTL it may still be served while it is refreshed, or instead of an
    /// error with fail-safe), instead of the call's
    /// [`stale_for`](crate::CallOptions::stale_for). A call still serves a
    /// stale value only within its own window too: the shorter of the two
    /// counts. Above about 49 days counts as 49 days. The last call wins.
    /// Defaults to the call's stale window.
    pub fn set_stale_for(&self, window: Duration) {
        self.update(|entry| entry.stale_for = Some(window));
    }

    /// Hands the value this load returns to its callers without storing it:
    /// see [adaptive entries](#adaptive-entries) for who gets it. The lock is
    /// released as after any load. Cannot be taken back within the load.
    pub fn do_not_store(&self) {
        self.update(|entry| entry.skip_store = true);
    }

    /// The fencing token of the lock protecting this load: higher than that
    /// of every earlier lock on the same key (see the crate docs, "Fencing
    /// tokens"). Write it with whatever the loader changes downstream (a row
    /// version that refuses lower tokens), so that a load that lost its lock
    /// cannot overwrite a newer one's work. `None` for a load that runs without
    /// the lock ([`QuorumLossPolicy::FailOpen`](crate::QuorumLossPolicy::FailOpen)).
    pub fn fencing_token(&self) -> Option<u64> {
        self.fencing_token
    }

    /// True once the lock protecting this load was lost: another process may be
    /// loading the same key now. The value this load returns is still handed to
    /// its callers, but stored only if no newer holder took over.
    pub fn is_lock_lost(&self) -> bool {
        self.lost.as_ref().is_some_and(LostSignal::is_lost)
    }

    /// Completes when the lock is lost (never, if it is not): `select!` on it to
    /// abandon work another process has taken over.
    pub async fn lock_lost(&self) {
        match &self.lost {
            Some(lost) => {
                lost.lost().await;
            }
            None => std::future::pending().await,
        }
    }
}
