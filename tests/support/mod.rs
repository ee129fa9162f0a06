//! Shared helpers for the integration tests: throwaway Redis servers
//! ([`server`]), a fault-injecting TCP proxy ([`proxy`]) and small async
//! utilities. Include with `mod support;`.
#![allow(dead_code)]

pub mod capture;
pub mod cluster;
pub mod proxy;
pub mod sentinel;
pub mod server;
pub mod store;

// Re-exports for convenience; a test file may not use all of them.
#[allow(unused_imports)]
pub use proxy::TcpProxy;
#[allow(unused_imports)]
pub use server::{Fleet, RedisServer, redis_server_binary};

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Interval at which [`eventually`] re-evaluates its condition.
pub const EVENTUALLY_POLL: Duration = Duration::from_millis(5);

/// A key prefix unique to this call: `t:{test}:{pid}:{counter}:`.
pub fn unique_prefix(test: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("t:{test}:{}:{n}:", std::process::id())
}

/// Polls `f` every 5 ms until it returns `true` (then returns `true`) or
/// `timeout` has passed (then returns `false`). `f` is always tried at
/// least once, and once more at the deadline.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        tokio::time::sleep(EVENTUALLY_POLL.min(deadline - now)).await;
    }
}

/// Awaits every handle, then returns the results in order. If any task
/// panicked, re-raises the first panic (after all tasks have finished, so
/// none is left running); a cancelled task is a panic too.
pub async fn join_all_checked<T>(handles: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut results = Vec::with_capacity(handles.len());
    let mut failures = Vec::new();
    for (i, handle) in handles.into_iter().enumerate() {
        match handle.await {
            Ok(v) => results.push(v),
            Err(e) if e.is_panic() => failures.push((i, Some(e.into_panic()))),
            Err(_) => failures.push((i, None)),
        }
    }
    let Some((first, payload)) = failures.first_mut().map(|(i, p)| (*i, p.take())) else {
        return results;
    };
    if failures.len() > 1 {
        let others: Vec<String> = failures[1..]
            .iter()
            .map(|(i, p)| format!("task {i}: {}", describe(p.as_deref())))
            .collect();
        eprintln!(
            "join_all_checked: {} tasks failed; also {others:?}",
            failures.len()
        );
    }
    match payload {
        Some(p) => std::panic::resume_unwind(p),
        None => panic!("join_all_checked: task {first} was cancelled"),
    }
}

/// Best-effort text of a panic payload (`None` = task was cancelled).
pub fn describe(payload: Option<&(dyn Any + Send)>) -> String {
    match payload {
        None => "cancelled".to_owned(),
        Some(p) => p
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panicked (non-string payload)".to_owned()),
    }
}

/// A [`locked_cache::Redlock`] over the servers at `urls`.
pub async fn redlock_on(
    urls: &[String],
    options: locked_cache::LockOptions,
) -> locked_cache::Redlock {
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    locked_cache::Redlock::connect(&urls, options)
        .await
        .expect("redlock")
}

/// A boxed loader, as `get_or_load` takes it.
pub type Loader<T> =
    Box<dyn FnOnce() -> std::pin::Pin<Box<dyn Future<Output = Result<T, String>> + Send>> + Send>;

/// A loader that counts its runs in `runs`, takes `delay`, and returns `value`.
pub fn counting_loader<T: Send + 'static>(
    runs: &std::sync::Arc<std::sync::atomic::AtomicU32>,
    delay: Duration,
    value: T,
) -> Loader<T> {
    let runs = std::sync::Arc::clone(runs);
    Box::new(move || {
        Box::pin(async move {
            runs.fetch_add(1, Ordering::SeqCst);
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok(value)
        })
    })
}

/// [`counting_loader`] of a string, with no delay.
pub fn counting(
    runs: &std::sync::Arc<std::sync::atomic::AtomicU32>,
    value: &str,
) -> Loader<String> {
    counting_loader(runs, Duration::ZERO, value.to_owned())
}

/// How long after the holder's loader finished a waiter in another cache got
/// the value. `holder` starts loading `key` (gated until the waiter is
/// waiting: it has made at least one lock attempt, then 100 ms more); the
/// waiter's own loader must not run. Both must return `"fresh"`, the holder's
/// value. Callers assert the latency against their retry time.
pub async fn time_to_wake(
    holder: &locked_cache::LockedCache,
    waiter: &locked_cache::LockedCache,
    key: &str,
) -> Duration {
    use std::sync::{Arc, Mutex};
    use tokio::sync::oneshot;

    let (finish_tx, finish_rx) = oneshot::channel::<()>();
    let (loading_tx, loading_rx) = oneshot::channel::<()>();
    let loaded_at = Arc::new(Mutex::new(None::<Instant>));
    let holding = tokio::spawn({
        let (holder, loaded_at, key) = (holder.clone(), Arc::clone(&loaded_at), key.to_owned());
        async move {
            holder
                .get_or_load(&key, || async move {
                    loading_tx.send(()).unwrap();
                    finish_rx.await.unwrap();
                    *loaded_at.lock().unwrap() = Some(Instant::now());
                    Ok::<_, String>("fresh".to_string())
                })
                .await
        }
    });
    loading_rx.await.unwrap();
    let waiting = tokio::spawn({
        let (waiter, key) = (waiter.clone(), key.to_owned());
        async move {
            let v = waiter
                .get_or_load(&key, || async {
                    Ok::<_, String>("second load".to_string())
                })
                .await;
            (v, Instant::now())
        }
    });
    // Let the waiter miss, fail its first attempt and go to sleep.
    assert!(
        eventually(Duration::from_secs(2), || async {
            waiter.stats().lock_attempts >= 1
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    finish_tx.send(()).unwrap();
    assert_eq!(
        join_all_checked(vec![holding]).await.remove(0).unwrap(),
        "fresh"
    );
    let (value, woke_at) = join_all_checked(vec![waiting]).await.remove(0);
    assert_eq!(value.unwrap(), "fresh", "the waiter must not load again");
    woke_at - loaded_at.lock().unwrap().unwrap()
}

/// What the batch tests' loaders find: `v-<key>` for each key asked.
pub fn v_values(missing: Vec<String>) -> Vec<(String, String)> {
    missing
        .into_iter()
        .map(|k| {
            let v = format!("v-{k}");
            (k, v)
        })
        .collect()
}

/// A batch's answer for `keys` when each holds what [`v_values`] loads.
pub fn v_expected<K: AsRef<str>>(keys: &[K]) -> Vec<Option<String>> {
    keys.iter()
        .map(|k| Some(format!("v-{}", k.as_ref())))
        .collect()
}
