//! Fault: the caller goes away. `get_or_load` futures dropped (by
//! `tokio::time::timeout`) at every await point of the data path: reading,
//! taking the lock, the double check, the load, the fenced store, the release;
//! and while waiting for another process's lock, and as a follower.
//!
//! After each: the lock key is gone within the lock expiry, a follower in the
//! same cache and a waiter in another cache complete, and the runtime has no
//! more live tasks than before (the cache's own listener and connection tasks
//! are counted in the baseline). The test runs its own runtime, and the delaying
//! proxy (which makes each phase last long enough to be hit) runs on another,
//! so that only the cache's tasks are counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::support::{RedisServer, TcpProxy, eventually, join_all_checked, unique_prefix};
use locked_cache::LockedCache;

const EXPIRY: Duration = Duration::from_secs(1);
const LOAD: Duration = Duration::from_millis(100);
/// Added latency each way on the cancelled cache's link: every round trip takes
/// at least 40 ms, so each await point is a window a timeout can land in.
const LINK_DELAY: Duration = Duration::from_millis(20);

fn runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap()
}

async fn cache_at(url: String, prefix: &str) -> LockedCache {
    LockedCache::builder()
        .redis(url)
        .key_prefix(prefix)
        .lock_expiry(EXPIRY)
        .wait_time(Duration::from_secs(3))
        .retry_time(Duration::from_millis(50))
        .pool_size(1)
        .build()
        .await
        .expect("build")
}

/// How far one loader got.
#[derive(Default)]
struct Progress {
    started: AtomicBool,
    finished: AtomicBool,
}

fn loader(
    progress: &Arc<Progress>,
    runs: &Arc<AtomicU32>,
    value: &str,
) -> impl FnOnce() -> std::pin::Pin<Box<dyn Future<Output = Result<String, String>> + Send>> + use<>
{
    let (progress, runs, value) = (Arc::clone(progress), Arc::clone(runs), value.to_owned());
    move || {
        Box::pin(async move {
            runs.fetch_add(1, Ordering::SeqCst);
            progress.started.store(true, Ordering::SeqCst);
            tokio::time::sleep(LOAD).await;
            progress.finished.store(true, Ordering::SeqCst);
            Ok(value)
        })
    }
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Waits until the runtime is back to at most `baseline` live tasks.
async fn no_task_left(baseline: usize, what: &str) {
    let settled = eventually(Duration::from_secs(2), || async {
        alive_tasks() <= baseline
    })
    .await;
    assert!(
        settled,
        "{what}: {} live tasks, {baseline} before: a background task was left running",
        alive_tasks()
    );
}

/// Waits until nobody holds the lock on `key`; panics after the lock expiry.
async fn lock_gone(server: &RedisServer, cache: &LockedCache, key: &str, what: &str) -> Duration {
    let lock_key = cache.lock_key(key);
    let began = Instant::now();
    let gone = eventually(EXPIRY + Duration::from_millis(100), || async {
        server
            .query::<Option<String>>(&["GET", &lock_key])
            .is_none()
    })
    .await;
    assert!(gone, "{what}: the lock outlived its expiry");
    began.elapsed()
}

#[test]
fn a_get_or_load_dropped_at_any_await_point_leaks_no_lock_strands_no_waiter_leaves_no_task() {
    let server = RedisServer::start();
    let proxy_runtime = runtime(1);
    let proxy = proxy_runtime.block_on(TcpProxy::start(server.addr()));
    proxy.set_delay(LINK_DELAY);
    runtime(2).block_on(async {
        let prefix = unique_prefix("cancel");
        let a = cache_at(proxy.url(), &prefix).await;
        let b = cache_at(server.url(), &prefix).await;
        let runs = Arc::new(AtomicU32::new(0));
        // Warm up (connections, subscriptions, scripts) and time a whole miss.
        let _: String = b.get_or_load("warm", loader(&Arc::default(), &runs, "w")).await.unwrap();
        let _: String = a.get_or_load("warm", loader(&Arc::default(), &runs, "w")).await.unwrap();
        // The shortest of five calls: cancelling at 95% of it must land before
        // the end even when the machine is busy (one slow reference call made
        // the last cancellation come too late).
        let mut whole = Duration::MAX;
        for i in 0..5 {
            let began = Instant::now();
            let key = format!("measure{i}");
            let _: String = a.get_or_load(&key, loader(&Arc::default(), &runs, "m")).await.unwrap();
            whole = whole.min(began.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let baseline = alive_tasks();

        let mut phases = Vec::new();
        for (i, fraction) in [0.03, 0.15, 0.3, 0.45, 0.6, 0.75, 0.85, 0.95].into_iter().enumerate() {
            let key = format!("k{i}");
            let after = whole.mul_f64(fraction);
            let runs = Arc::new(AtomicU32::new(0));
            let progress = Arc::new(Progress::default());
            let leader = tokio::spawn({
                let (a, key, load) = (a.clone(), key.clone(), loader(&progress, &runs, "leader"));
                async move { tokio::time::timeout(after, a.get_or_load(&key, load)).await }
            });
            tokio::time::sleep(Duration::from_millis(2)).await;
            let follower = tokio::spawn({
                let (a, key, load) = (a.clone(), key.clone(), loader(&Arc::default(), &runs, "follower"));
                async move { a.get_or_load(&key, load).await }
            });
            // Another process arrives just before the cancellation: it waits for
            // the lock the leader holds by then (if it does).
            tokio::time::sleep(after.mul_f64(0.9).saturating_sub(Duration::from_millis(2))).await;
            let elsewhere = tokio::spawn({
                let (b, key, load) = (b.clone(), key.clone(), loader(&Arc::default(), &runs, "elsewhere"));
                async move { b.get_or_load(&key, load).await }
            });
            let cancelled = join_all_checked(vec![leader]).await.remove(0);
            assert!(cancelled.is_err(), "{key}: finished within {after:?}: {cancelled:?}");
            let phase = match (
                progress.started.load(Ordering::SeqCst),
                progress.finished.load(Ordering::SeqCst),
            ) {
                (false, _) => "before the load",
                (true, false) => "during the load",
                (true, true) => "after the load (store, release)",
            };
            let began = Instant::now();
            let results = join_all_checked(vec![follower, elsewhere]).await;
            let waited = began.elapsed();
            let values: Vec<String> = results.into_iter().map(|r| r.expect("waiter failed")).collect();
            assert_eq!(values[0], values[1], "{key}: waiters disagree");
            assert!(waited < Duration::from_secs(2), "{key}: waiters took {waited:?}");
            let stored = a.get::<String>(&key).await.unwrap();
            assert_eq!(stored.as_ref(), Some(&values[0]), "{key}");
            assert!(runs.load(Ordering::SeqCst) <= 2, "{key}: {} loads", runs.load(Ordering::SeqCst));
            let lock_gone_after = lock_gone(&server, &a, &key, &key).await;
            no_task_left(baseline, &key).await;
            eprintln!(
                "cancelled after {after:?} {phase}: waiters done in {waited:?} with {:?}, loads {}, lock gone {lock_gone_after:?} after",
                values[0],
                runs.load(Ordering::SeqCst)
            );
            phases.push(phase);
        }
        for phase in ["before the load", "during the load", "after the load (store, release)"] {
            assert!(phases.contains(&phase), "no cancellation landed {phase}: {phases:?}");
        }

        // The task count sees the keep-alive: a task aborted mid-load (another
        // way to drop the future) had one more task running, and leaves none.
        let started = Arc::new(tokio::sync::Notify::new());
        let aborted = tokio::spawn({
            let (a, started) = (a.clone(), Arc::clone(&started));
            async move {
                a.get_or_load::<String, String, _, _>("aborted", || async move {
                    started.notify_one();
                    std::future::pending().await
                })
                .await
            }
        });
        started.notified().await;
        assert!(
            alive_tasks() >= baseline + 2,
            "the caller's task and the keep-alive should be alive: {} vs {baseline}",
            alive_tasks()
        );
        aborted.abort();
        assert!(aborted.await.unwrap_err().is_cancelled());
        lock_gone(&server, &a, "aborted", "task aborted mid-load").await;
        no_task_left(baseline, "task aborted mid-load").await;

        // A caller dropped while it waits for a lock another process holds.
        let held = b.lock().acquire(&b.lock_key("held")).await.unwrap();
        let waiting = tokio::time::timeout(
            Duration::from_millis(200),
            a.get_or_load("held", loader(&Arc::default(), &runs, "never")),
        )
        .await;
        assert!(waiting.is_err(), "{waiting:?}");
        // One task more: the holder's guard has its watchdog.
        no_task_left(baseline + 1, "waiting for a lock").await;
        held.release().await.unwrap();
        // The `SET NX` the dropped caller had sent may land after the release:
        // it is undone as soon as its answer is in, not left until it expires.
        let began = Instant::now();
        tokio::time::sleep(LINK_DELAY * 2).await;
        let v: String = a.get_or_load("held", loader(&Arc::default(), &runs, "after")).await.unwrap();
        assert_eq!(v, "after");
        let took = began.elapsed();
        assert!(took < EXPIRY * 4 / 5, "a lock attempt of the dropped caller outlived it: {took:?}");
        eprintln!("dropped while waiting for a lock: next call done {took:?} after the holder released");

        // A follower dropped: the leader carries on and loads once.
        let follower_runs = Arc::new(AtomicU32::new(0));
        let leader = tokio::spawn({
            let (a, load) = (a.clone(), loader(&Arc::default(), &follower_runs, "led"));
            async move { a.get_or_load("f", load).await }
        });
        tokio::time::sleep(Duration::from_millis(2)).await;
        let dropped = tokio::time::timeout(
            Duration::from_millis(30),
            a.get_or_load("f", loader(&Arc::default(), &follower_runs, "never")),
        )
        .await;
        assert!(dropped.is_err(), "{dropped:?}");
        let led = join_all_checked(vec![leader]).await.remove(0).unwrap();
        assert_eq!(led, "led");
        assert_eq!(follower_runs.load(Ordering::SeqCst), 1);
        lock_gone(&server, &a, "f", "follower dropped").await;
        no_task_left(baseline, "follower dropped").await;
    });
    drop(proxy);
}

/// The leader's caller hangs up (its task aborted 250 ms into a 1 s load)
/// while 99 callers wait on three caches of one server, with the library's
/// defaults. With `with(CallOptions::new())` (the loader is `'static`, the
/// load detached): the load finishes for the others, one load in all, and
/// everyone is served by its end. With a plain `get_or_load` (the loader
/// may borrow, so it cannot outlive its caller): a waiter starts over at
/// once (well within one lock expiry, woken by the release), two loads in
/// all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_caller_hangs_up_costs_one_load_detached_and_a_prompt_takeover_borrowing() {
    const LOAD: Duration = Duration::from_secs(1);
    const HANG_UP: Duration = Duration::from_millis(250);
    let server = RedisServer::start();
    for detached in [true, false] {
        let prefix = unique_prefix("hang_up");
        let mut caches = Vec::new();
        for _ in 0..3 {
            caches.push(
                LockedCache::builder()
                    .redis(server.url())
                    .key_prefix(&prefix)
                    .build()
                    .await
                    .unwrap(),
            );
        }
        let runs = Arc::new(AtomicU32::new(0));
        let starts: Arc<std::sync::Mutex<Vec<Instant>>> = Arc::default();
        let call = |cache: LockedCache, who: u32| {
            let (runs, starts) = (Arc::clone(&runs), Arc::clone(&starts));
            tokio::spawn(async move {
                let load = move || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    starts.lock().unwrap().push(Instant::now());
                    tokio::time::sleep(LOAD).await;
                    Ok::<_, String>(format!("loaded by {who}"))
                };
                let value = if detached {
                    cache
                        .with(locked_cache::CallOptions::new())
                        .get_or_load("k", load)
                        .await
                } else {
                    cache.get_or_load("k", load).await
                };
                (value, Instant::now())
            })
        };
        let leader = call(caches[0].clone(), 0);
        assert!(
            eventually(Duration::from_secs(2), || async {
                runs.load(Ordering::SeqCst) == 1
            })
            .await
        );
        let waiters: Vec<_> = (1..100)
            .map(|i| call(caches[i as usize % 3].clone(), i))
            .collect();
        tokio::time::sleep(HANG_UP).await;
        leader.abort();
        let hung_up = Instant::now();
        let results = join_all_checked(waiters).await;
        let first_start = starts.lock().unwrap()[0];
        let mut last_served = hung_up;
        let mut values = std::collections::HashSet::new();
        for (value, at) in results {
            values.insert(value.expect("a waiter failed"));
            last_served = last_served.max(at);
        }
        let loads = runs.load(Ordering::SeqCst);
        if detached {
            assert_eq!(loads, 1, "the detached load was finished for the others");
            assert_eq!(values.len(), 1, "{values:?}");
            assert!(values.contains("loaded by 0"), "{values:?}");
            let after_load = last_served.saturating_duration_since(first_start + LOAD);
            assert!(
                after_load < Duration::from_millis(300),
                "served {after_load:?} after the load's end"
            );
            eprintln!(
                "caller hung up, detached: 1 load, last waiter served {after_load:?} after it ended"
            );
        } else {
            assert_eq!(
                loads, 2,
                "the borrowing load stopped with its caller; one takeover"
            );
            assert_eq!(
                values.len(),
                1,
                "every waiter got the one takeover's value: {values:?}"
            );
            let takeover = starts.lock().unwrap()[1] - hung_up;
            assert!(
                takeover < Duration::from_millis(300),
                "a waiter took over {takeover:?} after the hang-up (the lock expiry is 800 ms)"
            );
            eprintln!(
                "caller hung up, borrowing: 2 loads, takeover {takeover:?} after the hang-up"
            );
        }
    }
}
