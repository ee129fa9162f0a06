//! The watchdog: keeps a held lock alive (an extension every third of its
//! expiry) and signals, with the reason, when it was lost. Guards of the public
//! API start one (unless told not to extend, when it only watches the validity
//! run out); the cache's keep-alive is one with the write fence's extension
//! added to each round.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::guard::Extender;
use crate::error::Error;

/// Why a held lock was lost. Once it is, another holder may have the lock:
/// stop the work it protects, and do not commit its results unless they are
/// fenced ([`LockGuard::fencing_token`](crate::LockGuard::fencing_token)).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum LockLost {
    /// A majority of masters refused an extension: the lock had expired (the
    /// process was paused, or the masters were unreachable for too long) or was
    /// deleted, and may be someone else's now.
    Refused,
    /// The validity ran out before an extension succeeded: the masters did not
    /// answer (`last_error` says how), or nothing extended the lock (the
    /// watchdog was off).
    Expired {
        /// The last extension's failure, if one was tried.
        last_error: Option<Error>,
    },
}

impl fmt::Display for LockLost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockLost::Refused => f.write_str("a majority of masters refused the extension"),
            LockLost::Expired { last_error: None } => f.write_str("the validity ran out"),
            LockLost::Expired {
                last_error: Some(e),
            } => write!(f, "the validity ran out; last extension: {e}"),
        }
    }
}

/// A handle on a lock's lost-lock signal; cheap to clone and to move to other
/// tasks. It never fires for a lock released by its holder.
#[derive(Debug, Clone)]
pub struct LostSignal {
    lost: watch::Receiver<Option<LockLost>>,
}

impl LostSignal {
    /// True once the lock was lost.
    pub fn is_lost(&self) -> bool {
        self.lost.borrow().is_some()
    }

    /// Why the lock was lost, once it was.
    pub fn reason(&self) -> Option<LockLost> {
        self.lost.borrow().clone()
    }

    /// Completes with the reason when the lock is lost; never, if it is
    /// released first. Cancel safe: `select!` on it next to the work.
    pub async fn lost(&self) -> LockLost {
        let mut lost = self.lost.clone();
        // The borrow (not Send) must end before any other await.
        let reason = lost.wait_for(Option::is_some).await.map(|r| r.clone());
        match reason {
            Ok(reason) => reason.unwrap_or(LockLost::Refused),
            Err(_) => std::future::pending().await,
        }
    }
}

/// Extra work for each round of extensions (the cache's fence), run alongside.
pub(crate) type Hook = Box<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The watchdog task of one held lock. Dropping it aborts the task;
/// [`stop`](Watchdog::stop) lets an extension in flight finish first.
#[derive(Debug)]
pub(crate) struct Watchdog {
    task: Option<JoinHandle<()>>,
    stop: watch::Sender<bool>,
    extending: Arc<AtomicBool>,
    lost: watch::Receiver<Option<LockLost>>,
}

impl Watchdog {
    /// Extends through `extender` to `expiry` every `expiry / 3` while
    /// `extend` (see [`set_extending`](Watchdog::set_extending)), running
    /// `also` alongside each extension; signals the loss when a majority
    /// refuses an extension, or when the validity runs out first.
    pub fn start(extender: Extender, expiry: Duration, extend: bool, also: Option<Hook>) -> Self {
        let (lost_tx, lost) = watch::channel(None);
        let (stop, mut stopped) = watch::channel(false);
        let extending = Arc::new(AtomicBool::new(extend));
        let on = Arc::clone(&extending);
        let task = tokio::spawn(async move {
            // No lock name in the events: it may hold a cache key, which
            // this crate never logs (the holder learns the name from the signal).
            let lose = |reason: LockLost| {
                if on.load(Ordering::Acquire) {
                    tracing::warn!(%reason, "lock lost");
                } else {
                    tracing::debug!(%reason, "lock not extended: expired");
                }
                lost_tx.send_replace(Some(reason));
            };
            let cadence = expiry / 3;
            // After a slow acquisition little validity may be left: extend early.
            let mut next = cadence.min(extender.validity_left() / 2);
            let mut last_error = None;
            loop {
                let wake = if on.load(Ordering::Acquire) {
                    Instant::now() + std::mem::replace(&mut next, cadence)
                } else {
                    extender.valid_until()
                };
                tokio::select! {
                    _ = tokio::time::sleep_until(wake.into()) => {}
                    _ = stopped.wait_for(|s| *s) => return,
                }
                if on.load(Ordering::Acquire) {
                    let extension = extender.extend(expiry);
                    let answer = match &also {
                        Some(also) => tokio::join!(extension, also()).0,
                        None => extension.await,
                    };
                    match answer {
                        Ok(true) => last_error = None,
                        Ok(false) => return lose(LockLost::Refused),
                        Err(e) => {
                            tracing::warn!(error = %e, "extending the lock failed; retrying");
                            last_error = Some(e);
                        }
                    }
                }
                if extender.validity_left().is_zero() {
                    return lose(LockLost::Expired { last_error });
                }
            }
        });
        Watchdog {
            task: Some(task),
            stop,
            extending,
            lost,
        }
    }

    /// The lost-lock signal.
    pub fn signal(&self) -> LostSignal {
        LostSignal {
            lost: self.lost.clone(),
        }
    }

    /// Turns extensions on or off; off, the watchdog only signals when the
    /// validity runs out (at the next round).
    pub fn set_extending(&self, on: bool) {
        self.extending.store(on, Ordering::Release);
    }

    /// Stops, after the extension in flight (if any) has answered. Returns
    /// whether the lock was lost.
    pub async fn stop(mut self) -> bool {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.lost.borrow().is_some()
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_send<T: Send>(_: T) {}

    #[test]
    fn the_lost_futures_are_send() {
        let (_tx, rx) = watch::channel(None);
        let signal = LostSignal { lost: rx };
        is_send(signal.lost());
    }
}
