//! The in-process line for each lock: tasks of one process that want the same
//! lock queue here (FIFO) and only the head of the line talks to Redis.
//!
//! Without it, N tasks of a process would all send `SET NX` to every master on
//! every retry; on several masters their concurrent attempts split the votes so
//! that nobody reaches a majority, and the lock livelocks under contention. With
//! it, each process sends one contender per lock, and when a holder releases, the
//! next task of the same process takes its turn at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{Mutex as TurnLock, OwnedMutexGuard};

/// The lines of one [`Redlock`](super::Redlock), by lock key.
#[derive(Debug, Default)]
pub struct Lines {
    lines: Mutex<HashMap<String, Arc<TurnLock<()>>>>,
}

/// The head of a line; the next task's turn comes when this drops.
#[derive(Debug)]
pub struct Turn {
    guard: Option<OwnedMutexGuard<()>>,
    lines: Arc<Lines>,
    resource: String,
}

impl Lines {
    fn line(&self, resource: &str) -> Arc<TurnLock<()>> {
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(lines.entry(resource.to_owned()).or_default())
    }

    /// Waits for this task's turn on `resource` until `deadline`; `None` if it did
    /// not come in time.
    ///
    /// However the wait ends (its turn, the deadline, or the future dropped,
    /// even just as the turn came), the line is forgotten if nobody else holds
    /// or awaits it: nothing is left behind per lock name.
    pub async fn wait_turn(self: &Arc<Self>, resource: &str, deadline: Instant) -> Option<Turn> {
        let waiting = Waiting {
            line: Some(self.line(resource)),
            lines: self,
            resource,
        };
        let line = Arc::clone(waiting.line.as_ref()?);
        let guard = tokio::time::timeout_at(deadline.into(), line.lock_owned()).await;
        // `waiting` drops here, on every path, and forgets an idle line.
        drop(waiting);
        guard.ok().map(|guard| self.turn(resource, guard))
    }

    /// This task's turn on `resource` if nobody in the process holds or awaits it.
    pub fn try_turn(self: &Arc<Self>, resource: &str) -> Option<Turn> {
        let line = self.line(resource);
        match line.try_lock_owned() {
            Ok(guard) => Some(self.turn(resource, guard)),
            Err(_) => None,
        }
    }

    fn turn(self: &Arc<Self>, resource: &str, guard: OwnedMutexGuard<()>) -> Turn {
        Turn {
            guard: Some(guard),
            lines: Arc::clone(self),
            resource: resource.to_owned(),
        }
    }

    /// Drops the line of `resource` when no task holds or awaits it.
    fn forget_if_idle(&self, resource: &str) {
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        if lines
            .get(resource)
            .is_some_and(|line| Arc::strong_count(line) == 1)
        {
            lines.remove(resource);
        }
    }

    /// Lines currently kept (none should outlive their users).
    pub fn len(&self) -> usize {
        self.lines.lock().unwrap().len()
    }
}

/// A task waiting in a line: forgets the line, if idle, however the wait ends.
struct Waiting<'a> {
    line: Option<Arc<TurnLock<()>>>,
    lines: &'a Lines,
    resource: &'a str,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        // Our handle must go before the check, or the line never looks idle.
        drop(self.line.take());
        self.lines.forget_if_idle(self.resource);
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        drop(self.guard.take());
        self.lines.forget_if_idle(&self.resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn one_turn_at_a_time_and_lines_are_cleaned_up() {
        let lines = Arc::new(Lines::default());
        let first = lines.try_turn("a").unwrap();
        assert!(lines.try_turn("a").is_none());
        assert!(lines.try_turn("b").is_some());
        let soon = Instant::now() + Duration::from_millis(20);
        assert!(lines.wait_turn("a", soon).await.is_none());
        drop(first);
        assert!(
            lines
                .wait_turn("a", Instant::now() + Duration::from_millis(20))
                .await
                .is_some()
        );
        assert_eq!(lines.len(), 0);
    }

    /// A waiter cancelled just as its turn came (the holder left, the waiter
    /// was granted the line but not yet polled) leaves no line behind.
    #[tokio::test(flavor = "current_thread")]
    async fn a_wait_cancelled_as_its_turn_comes_leaves_no_line() {
        let lines = Arc::new(Lines::default());
        for name in 0..1000 {
            let name = format!("lock.{name}");
            let holder = lines.try_turn(&name).unwrap();
            let waiting = {
                let (lines, name) = (Arc::clone(&lines), name.clone());
                tokio::spawn(async move {
                    let deadline = Instant::now() + Duration::from_secs(60);
                    lines.wait_turn(&name, deadline).await.is_some()
                })
            };
            // Let the waiter queue up, then hand it the turn and cancel it
            // before it runs again.
            tokio::task::yield_now().await;
            drop(holder);
            waiting.abort();
            assert!(waiting.await.unwrap_err().is_cancelled());
        }
        assert_eq!(lines.len(), 0, "lines left behind by cancelled waits");
    }
}
