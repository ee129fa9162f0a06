//! Keeps a lock (and its write fence) alive while a loader runs, and signals when
//! it was lost.

use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::lock::{LockGuard, validity};
use crate::store::SharedStore;

/// A background task that extends the lock and the fence every `expiry / 3`.
/// [`stop`](KeepAlive::stop) lets an extension in flight finish (so no re-grant
/// can land after the release); dropping it instead aborts the task, so a
/// cancelled or panicking load leaves no task behind.
pub struct KeepAlive {
    task: Option<JoinHandle<()>>,
    stop: watch::Sender<bool>,
    lost: watch::Receiver<bool>,
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
        let extender = guard.extender();
        let token = guard.token().to_vec();
        let mut valid_until = Instant::now() + guard.validity_left();
        let (lost_tx, lost) = watch::channel(false);
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let cadence = expiry / 3;
            // After a slow acquisition little validity may be left: extend early.
            let mut next = cadence.min(valid_until.saturating_duration_since(Instant::now()) / 2);
            let lost = |why: &str| {
                tracing::warn!(
                    fence = fence_key,
                    why,
                    "lock lost while loading; the value will be stored only if no newer holder took the fence"
                );
                lost_tx.send_replace(true);
            };
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(std::mem::replace(&mut next, cadence)) => {}
                    _ = stopped.wait_for(|s| *s) => return,
                }
                let started = Instant::now();
                let (lock, fence) = tokio::join!(
                    extender.extend(expiry, valid_until),
                    value_store.extend(&fence_key, &token, fence_expiry)
                );
                match lock {
                    Ok(true) => {
                        let elapsed = started.elapsed();
                        if let Some(v) = validity(expiry, elapsed) {
                            valid_until = started + elapsed + v;
                        }
                    }
                    Ok(false) => return lost("extension refused"),
                    Err(e) if Instant::now() >= valid_until => {
                        return lost(&format!("extensions failed until the lock expired: {e}"));
                    }
                    Err(e) => {
                        tracing::warn!(fence = fence_key, error = %e, "extending the lock failed; retrying");
                    }
                }
                // A fence that is gone while the lock holds (the value server
                // restarted, or set/invalidate superseded this load) is left gone:
                // the write will be refused, which is right in both cases.
                if let Err(e) = fence {
                    tracing::debug!(fence = fence_key, error = %e, "extending the fence failed");
                }
            }
        });
        KeepAlive {
            task: Some(task),
            stop,
            lost,
        }
    }

    /// Stops extending, after the extension in flight (if any) has answered.
    /// Returns whether the lock was lost.
    pub async fn stop(mut self) -> bool {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        *self.lost.borrow()
    }

    /// A receiver that turns `true` once the lock was lost.
    pub fn lost_signal(&self) -> watch::Receiver<bool> {
        self.lost.clone()
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
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
