//! Keeps a lock (and its write fence) alive while a loader runs, and signals when
//! it was lost.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::lock::LockGuard;
use crate::store::SharedStore;

/// A background task that extends the lock and the fence every `expiry / 3`.
/// Aborted on drop, so a cancelled or panicking load leaves no task behind.
pub struct KeepAlive {
    task: JoinHandle<()>,
    lost: watch::Receiver<bool>,
}

impl KeepAlive {
    pub fn start(
        guard: &LockGuard,
        value_store: SharedStore,
        fence_key: String,
        expiry: Duration,
    ) -> KeepAlive {
        let extender = guard.extender();
        let token = guard.token().to_vec();
        let (lost_tx, lost) = watch::channel(false);
        let task = tokio::spawn(async move {
            let cadence = expiry / 3;
            loop {
                tokio::time::sleep(cadence).await;
                let (lock, fence) = tokio::join!(
                    extender.extend(expiry),
                    value_store.extend(&fence_key, &token, expiry)
                );
                match (lock, fence) {
                    (Ok(true), Ok(true)) => continue,
                    (Ok(false), _) | (_, Ok(false)) => {
                        tracing::warn!(
                            fence = fence_key,
                            "lock lost while loading (extension refused); the value will be stored only if no newer holder took the fence"
                        );
                        lost_tx.send_replace(true);
                        return;
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        // Unknown: keep trying; the fenced write decides in the end.
                        tracing::warn!(fence = fence_key, error = %e, "extending the lock failed; retrying");
                    }
                }
            }
        });
        KeepAlive { task, lost }
    }

    /// A receiver that turns `true` once the lock was lost.
    pub fn lost_signal(&self) -> watch::Receiver<bool> {
        self.lost.clone()
    }

    /// True once an extension was refused.
    pub fn lost(&self) -> bool {
        *self.lost.borrow()
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a loader can learn about its lock while it runs.
#[derive(Debug, Clone)]
pub struct LoadContext {
    lost: Option<watch::Receiver<bool>>,
}

impl LoadContext {
    pub(crate) fn new(lost: Option<watch::Receiver<bool>>) -> LoadContext {
        LoadContext { lost }
    }

    /// True once the lock protecting this load was lost: another process may be
    /// loading the same key now. The value this load returns is still handed to
    /// its callers, but stored only if no newer holder took over.
    pub fn is_lock_lost(&self) -> bool {
        self.lost.as_ref().is_some_and(|l| *l.borrow())
    }

    /// Completes when the lock is lost (never, if it is not): `select!` on it to
    /// abandon work another process has taken over.
    pub async fn lock_lost(&self) {
        match &self.lost {
            Some(lost) => {
                let mut lost = lost.clone();
                if lost.wait_for(|l| *l).await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    }
}
