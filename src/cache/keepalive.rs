//! Keeps a lock (and its write fence) alive while a loader runs, and signals when
//! it was lost: the lock's [`Watchdog`], with the fence's extension added to
//! each round.

use std::sync::Arc;
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
        }
    }
}

tokio::task_local! {
    /// The context of the load running in this task, for
    /// [`LoadContext::current`].
    pub(super) static CURRENT: LoadContext;
}

/// What a loader can learn about its lock while it runs: whether it was lost,
/// and its fencing token.
///
/// Inside any loader, [`LoadContext::current`] returns it; the
/// `*_with_outcome` calls also hand it to the loader as its argument.
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
#[derive(Debug, Clone)]
pub struct LoadContext {
    lost: Option<LostSignal>,
    fencing_token: Option<u64>,
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
        }
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
