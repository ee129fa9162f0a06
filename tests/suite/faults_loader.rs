//! Faults of the loader: loads longer than the lock expiry (kept alive), a lock
//! lost anyway (fenced write, lock-lost signal, counter), loaders that fail, and
//! loaders that panic. Against real redis-server processes; "processes" are
//! separate `LockedCache` instances with their own connections.

use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::support::{Fleet, RedisServer, TcpProxy, eventually, join_all_checked, unique_prefix};
use locked_cache::{Builder, LoadError, LockedCache};
use tokio::sync::{Barrier, Notify};

const MINUTE: Duration = Duration::from_secs(60);

fn builder(urls: Vec<String>, prefix: &str) -> Builder {
    LockedCache::builder()
        .masters(urls)
        .key_prefix(prefix)
        .ttl(MINUTE)
        .retry_time(Duration::from_millis(50))
        .connect_timeout(Duration::from_millis(300))
        .command_timeout(Duration::from_millis(300))
}

/// Counts the loaders running at once, and the most at any time.
#[derive(Default)]
struct Concurrency {
    now: AtomicU32,
    max: AtomicU32,
    runs: AtomicU32,
}

impl Concurrency {
    fn enter(&self) {
        self.runs.fetch_add(1, Ordering::SeqCst);
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(now, Ordering::SeqCst);
    }

    fn leave(&self) {
        self.now.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A load of 1.6 s with a lock expiry of 500 ms, 60 callers on 3 caches over 3
/// masters: the keep-alive extends the lock every ~170 ms, so nobody else loads,
/// the lock stays with the first holder the whole time, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_three_times_longer_than_the_lock_expiry_still_runs_once() {
    let fleet = Fleet::start(3);
    let prefix = unique_prefix("slow");
    let expiry = Duration::from_millis(500);
    let mut caches = Vec::new();
    for _ in 0..3 {
        caches.push(
            builder(fleet.urls(), &prefix)
                .lock_expiry(expiry)
                .wait_time(Duration::from_secs(3))
                .build()
                .await
                .unwrap(),
        );
    }
    let lock_key = caches[0].lock_key("k");
    let loads = Arc::new(Concurrency::default());
    let start = Arc::new(Barrier::new(60));
    let mut calls = Vec::new();
    for i in 0..60 {
        let cache = caches[i % 3].clone();
        let (loads, start) = (Arc::clone(&loads), Arc::clone(&start));
        calls.push(tokio::spawn(async move {
            start.wait().await;
            cache
                .get_or_load("k", || async move {
                    let ctx = locked_cache::LoadContext::current().expect("inside a loader");
                    loads.enter();
                    tokio::time::sleep(Duration::from_millis(1600)).await;
                    loads.leave();
                    Ok::<_, String>((ctx.is_lock_lost(), "slow value".to_owned()))
                })
                .await
        }));
    }
    // Sample the lock while the load runs: always there, always the same token.
    assert!(
        eventually(Duration::from_secs(2), || async {
            loads.runs.load(Ordering::SeqCst) == 1
        })
        .await,
        "no load started"
    );
    // A majority of the masters holds it (not necessarily all: a losing
    // contender's `SET NX` may hold a minority until undone), with a TTL of at
    // most the expiry.
    let mut tokens = Vec::new();
    for _ in 0..7 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut held: Vec<String> = Vec::new();
        for server in &fleet.servers {
            let (token, pttl): (Option<String>, i64) = server.query(&[
                "EVAL",
                "return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}",
                "1",
                &lock_key,
            ]);
            if let Some(token) = token {
                assert!(pttl > 0 && pttl <= 500, "lock ttl {pttl} ms");
                held.push(token);
            }
        }
        let majority = held
            .iter()
            .find(|t| held.iter().filter(|u| u == t).count() >= 2)
            .unwrap_or_else(|| panic!("no majority holds the lock mid-load: {held:?}"));
        tokens.push(majority.clone());
    }
    tokens.dedup();
    assert_eq!(
        tokens.len(),
        1,
        "the lock changed hands mid-load: {tokens:?}"
    );
    for r in join_all_checked(calls).await {
        let (lost, value) = r.unwrap();
        assert!(!lost, "the loader saw its lock lost");
        assert_eq!(value, "slow value");
    }
    assert_eq!(loads.runs.load(Ordering::SeqCst), 1, "one load");
    for cache in &caches {
        assert_eq!(cache.stats().lock_lost, 0);
    }
    assert!(
        eventually(Duration::from_millis(500), || async {
            fleet[0]
                .query::<Option<String>>(&["GET", &lock_key])
                .is_none()
        })
        .await,
        "lock not released"
    );
}

/// The lock is deleted mid-load (as a restart or a long pause would lose it),
/// another process takes it over, loads and stores a newer value. The first
/// holder's loader sees `is_lock_lost()`, its caller still gets the value it
/// loaded, its write is refused by the fence (the newer value stays), and the
/// loss is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lock_is_signalled_and_its_stale_write_is_fenced_off() {
    let server = RedisServer::start();
    let prefix = unique_prefix("fenced");
    let expiry = Duration::from_millis(300);
    let a = builder(vec![server.url()], &prefix)
        .lock_expiry(expiry)
        .build()
        .await
        .unwrap();
    let b = builder(vec![server.url()], &prefix)
        .lock_expiry(expiry)
        .build()
        .await
        .unwrap();
    let (started, proceed) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let saw_lost = Arc::new(AtomicBool::new(false));
    let first = tokio::spawn({
        let (a, started, proceed, saw_lost) = (
            a.clone(),
            Arc::clone(&started),
            Arc::clone(&proceed),
            Arc::clone(&saw_lost),
        );
        async move {
            a.get_or_load("k", || async move {
                let ctx = locked_cache::LoadContext::current().expect("inside a loader");
                assert!(!ctx.is_lock_lost());
                started.notify_one();
                // The signal, as a loader would select! on it.
                let signalled = tokio::time::timeout(Duration::from_secs(2), ctx.lock_lost()).await;
                saw_lost.store(signalled.is_ok() && ctx.is_lock_lost(), Ordering::SeqCst);
                proceed.notified().await;
                Ok::<_, String>("old".to_owned())
            })
            .await
        }
    });
    started.notified().await;
    let deleted: u64 = server.query(&["DEL", &a.lock_key("k")]);
    assert_eq!(deleted, 1);
    assert!(
        eventually(Duration::from_secs(1), || async {
            saw_lost.load(Ordering::SeqCst)
        })
        .await,
        "the loader was not told that its lock was lost"
    );
    // Another process takes over and stores a newer value.
    let newer: String = b
        .get_or_load("k", || async { Ok::<_, String>("new".to_owned()) })
        .await
        .unwrap();
    assert_eq!(newer, "new");
    proceed.notify_one();
    let old = join_all_checked(vec![first]).await.remove(0).unwrap();
    assert_eq!(old, "old", "the first caller gets the value it loaded");
    assert_eq!(
        a.get::<String>("k").await.unwrap().as_deref(),
        Some("new"),
        "the holder that lost its lock overwrote a newer value"
    );
    assert_eq!(a.stats().lock_lost, 1);
    assert_eq!(b.stats().lock_lost, 0);
}

/// The holder is cut off from Redis (its link stalls, as in a long GC pause or a
/// partition) for longer than the lock expiry. Another process takes the lock
/// and stores a newer value. When the link resumes, the holder's loader is told
/// the lock was lost, its caller gets the value it loaded, its write is refused
/// by the fence, and the loss is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_cut_off_past_its_lock_expiry_is_told_and_fenced_off() {
    let server = RedisServer::start();
    let proxy = TcpProxy::start(server.addr()).await;
    let prefix = unique_prefix("partition");
    let expiry = Duration::from_millis(400);
    let a = builder(vec![proxy.url()], &prefix)
        .lock_expiry(expiry)
        .build()
        .await
        .unwrap();
    let b = builder(vec![server.url()], &prefix)
        .lock_expiry(expiry)
        .build()
        .await
        .unwrap();
    let (started, proceed) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let first = tokio::spawn({
        let (a, started, proceed) = (a.clone(), Arc::clone(&started), Arc::clone(&proceed));
        async move {
            a.get_or_load("k", || async move {
                let ctx = locked_cache::LoadContext::current().expect("inside a loader");
                started.notify_one();
                proceed.notified().await;
                let _ = tokio::time::timeout(Duration::from_secs(3), ctx.lock_lost()).await;
                Ok::<_, String>((ctx.is_lock_lost(), "stale".to_owned()))
            })
            .await
        }
    });
    started.notified().await;
    proxy.stall();
    // Past the expiry: the holder's lock is gone from Redis.
    assert!(
        eventually(expiry * 2, || async {
            server
                .query::<Option<String>>(&["GET", &a.lock_key("k")])
                .is_none()
        })
        .await,
        "the cut-off holder's lock did not expire"
    );
    let newer: String = b
        .get_or_load("k", || async { Ok::<_, String>("fresh".to_owned()) })
        .await
        .unwrap();
    assert_eq!(newer, "fresh");
    proxy.resume();
    proceed.notify_one();
    let (lost, stale) = join_all_checked(vec![first]).await.remove(0).unwrap();
    assert!(lost, "the holder was not told that its lock was lost");
    assert_eq!(
        stale, "stale",
        "the holder's caller gets the value it loaded"
    );
    assert_eq!(
        b.get::<String>("k").await.unwrap().as_deref(),
        Some("fresh"),
        "the holder that lost its lock overwrote a newer value"
    );
    assert_eq!(a.stats().lock_lost, 1);
    assert_eq!(b.stats().lock_lost, 0);
}

/// The only master restarts mid-load (empty: lock and fence gone). The loader is
/// told, the caller gets its value, the loss is counted, and the value is not
/// stored (the fence is no longer the holder's); the same cache loads it again
/// on the next call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_restart_mid_load_loses_the_lock_value_returned_not_stored() {
    let mut server = RedisServer::start();
    let cache = builder(vec![server.url()], &unique_prefix("restart"))
        .lock_expiry(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let started = Arc::new(Notify::new());
    let call = tokio::spawn({
        let (cache, started) = (cache.clone(), Arc::clone(&started));
        async move {
            cache
                .get_or_load("k", || async move {
                    let ctx = locked_cache::LoadContext::current().expect("inside a loader");
                    started.notify_one();
                    let _ = tokio::time::timeout(Duration::from_secs(3), ctx.lock_lost()).await;
                    Ok::<_, String>((ctx.is_lock_lost(), "v1".to_owned()))
                })
                .await
        }
    });
    started.notified().await;
    let began = Instant::now();
    tokio::task::block_in_place(|| server.restart());
    let (lost, value) = join_all_checked(vec![call]).await.remove(0).unwrap();
    let took = began.elapsed();
    assert!(lost, "the loader was not told that its lock was lost");
    assert_eq!(value, "v1");
    assert!(
        took < Duration::from_secs(2),
        "noticed the loss after {took:?}"
    );
    assert_eq!(cache.stats().lock_lost, 1);
    assert_eq!(cache.get::<String>("k").await.unwrap(), None);
    let again: String = cache
        .get_or_load("k", || async { Ok::<_, String>("v2".to_owned()) })
        .await
        .unwrap();
    assert_eq!(again, "v2");
    assert_eq!(
        cache.get::<String>("k").await.unwrap().as_deref(),
        Some("v2")
    );
    eprintln!(
        "master restart mid-load: loss noticed and call returned {took:?} after the restart began"
    );
}

#[derive(Debug, PartialEq)]
struct DbDown;

/// Every loader fails (the backend is down), 3 caches × 10 callers. The lock is
/// released at once after each failure: each cache's flight tries once, one at
/// a time, and every caller gets the error; nothing waits for a lock expiry
/// (5 s here), nothing is stored, the lock is free at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_loaders_release_at_once_and_retry_one_at_a_time_once_per_process() {
    let server = RedisServer::start();
    let prefix = unique_prefix("fail");
    let mut caches = Vec::new();
    for _ in 0..3 {
        caches.push(
            builder(vec![server.url()], &prefix)
                .lock_expiry(Duration::from_secs(5))
                .retry_time(Duration::from_secs(1))
                .build()
                .await
                .unwrap(),
        );
    }
    let loads = Arc::new(Concurrency::default());
    let start = Arc::new(Barrier::new(30));
    let began = Instant::now();
    let mut calls = Vec::new();
    for i in 0..30 {
        let cache = caches[i % 3].clone();
        let (loads, start) = (Arc::clone(&loads), Arc::clone(&start));
        calls.push(tokio::spawn(async move {
            start.wait().await;
            cache
                .get_or_load::<String, _, _, _>("k", || async move {
                    loads.enter();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    loads.leave();
                    Err(DbDown)
                })
                .await
        }));
    }
    for r in join_all_checked(calls).await {
        match r {
            Err(LoadError::Loader(e)) => assert_eq!(*e, DbDown),
            other => panic!("expected the loader error, got {other:?}"),
        }
    }
    let took = began.elapsed();
    assert_eq!(loads.max.load(Ordering::SeqCst), 1, "loaders overlapped");
    assert_eq!(loads.runs.load(Ordering::SeqCst), 3, "one try per process");
    for cache in &caches {
        let stats = cache.stats();
        assert_eq!((stats.loads, stats.load_errors), (1, 1), "{stats:?}");
    }
    // Woken by the releases (retry is 1 s, expiry 5 s): 3 loads of 100 ms.
    assert!(took < Duration::from_millis(900), "took {took:?}");
    assert_eq!(caches[0].get::<String>("k").await.unwrap(), None);
    let lock: Option<String> = server.query(&["GET", &caches[0].lock_key("k")]);
    assert_eq!(lock, None, "lock left behind");
    eprintln!(
        "3 processes × 10 callers, all loaders failing: 3 sequential tries, all 30 calls failed in {took:?}"
    );
}

/// One process's loader fails; the others' succeed. The failing process's
/// callers share its error; of the others, the first to get the lock loads and
/// the rest get its value: 2 loads in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failed_load_one_waiter_elsewhere_loads_and_the_rest_share_it() {
    let server = RedisServer::start();
    let prefix = unique_prefix("failthenok");
    let mut caches = Vec::new();
    for _ in 0..3 {
        caches.push(
            builder(vec![server.url()], &prefix)
                .lock_expiry(Duration::from_secs(5))
                .build()
                .await
                .unwrap(),
        );
    }
    let loads = Arc::new(Concurrency::default());
    let failing = {
        let (cache, loads) = (caches[0].clone(), Arc::clone(&loads));
        tokio::spawn(async move {
            cache
                .get_or_load::<String, _, _, _>("k", || async move {
                    loads.enter();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    loads.leave();
                    Err(DbDown)
                })
                .await
        })
    };
    assert!(
        eventually(Duration::from_secs(1), || async {
            loads.runs.load(Ordering::SeqCst) == 1
        })
        .await
    );
    let began = Instant::now();
    let mut calls = Vec::new();
    for i in 0..20 {
        let cache = caches[1 + i % 2].clone();
        let loads = Arc::clone(&loads);
        calls.push(tokio::spawn(async move {
            cache
                .get_or_load::<String, DbDown, _, _>("k", || async move {
                    loads.enter();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    loads.leave();
                    Ok("recovered".to_owned())
                })
                .await
        }));
    }
    assert!(matches!(
        join_all_checked(vec![failing]).await.remove(0),
        Err(LoadError::Loader(_))
    ));
    for r in join_all_checked(calls).await {
        assert_eq!(r.unwrap(), "recovered");
    }
    assert_eq!(loads.runs.load(Ordering::SeqCst), 2);
    assert_eq!(loads.max.load(Ordering::SeqCst), 1);
    assert!(
        began.elapsed() < Duration::from_secs(1),
        "took {:?}",
        began.elapsed()
    );
}

/// The leader's loader panics. Its caller's task panics (as if it had called the
/// loader itself); its 20 in-process followers and 10 waiters in another cache
/// are not stranded: one of them takes over and loads, and all get that value.
/// The lock is free right after the panic (expiry is 5 s), and later calls work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_loader_propagates_to_its_caller_frees_the_lock_and_strands_nobody() {
    let server = RedisServer::start();
    let prefix = unique_prefix("panic");
    let a = builder(vec![server.url()], &prefix)
        .lock_expiry(Duration::from_secs(5))
        .build()
        .await
        .unwrap();
    let b = builder(vec![server.url()], &prefix)
        .lock_expiry(Duration::from_secs(5))
        .build()
        .await
        .unwrap();
    let lock_key = a.lock_key("k");
    let loads = Arc::new(Concurrency::default());
    let panicking = {
        let (cache, loads) = (a.clone(), Arc::clone(&loads));
        tokio::spawn(async move {
            cache
                .get_or_load::<String, String, _, _>("k", || async move {
                    loads.enter();
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    loads.leave();
                    panic!("loader exploded");
                })
                .await
        })
    };
    assert!(
        eventually(Duration::from_secs(1), || async {
            loads.runs.load(Ordering::SeqCst) == 1
        })
        .await
    );
    let mut calls = Vec::new();
    for i in 0..30 {
        let cache = if i < 20 { a.clone() } else { b.clone() };
        let loads = Arc::clone(&loads);
        calls.push(tokio::spawn(async move {
            cache
                .get_or_load::<String, String, _, _>("k", || async move {
                    loads.enter();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    loads.leave();
                    Ok("good".to_owned())
                })
                .await
        }));
    }
    let err = panicking.await.expect_err("the caller's task must panic");
    assert!(err.is_panic(), "{err:?}");
    let panicked_at = Instant::now();
    assert_eq!(
        support::describe(Some(&*err.into_panic())),
        "loader exploded"
    );
    for r in join_all_checked(calls).await {
        assert_eq!(r.unwrap(), "good");
    }
    let took_over = panicked_at.elapsed();
    assert!(
        took_over < Duration::from_secs(1),
        "followers took {took_over:?}"
    );
    assert_eq!(
        loads.runs.load(Ordering::SeqCst),
        2,
        "the panicked load and one more"
    );
    assert_eq!(loads.max.load(Ordering::SeqCst), 1);
    assert!(
        eventually(Duration::from_millis(500), || async {
            server
                .query::<Option<String>>(&["GET", &lock_key])
                .is_none()
        })
        .await,
        "lock left behind after the panic"
    );
    // Nothing poisoned: hits, and a fresh load on another key, from both caches.
    for cache in [&a, &b] {
        let v: String = cache
            .get_or_load("k", || async { Ok::<_, String>("unexpected".to_owned()) })
            .await
            .unwrap();
        assert_eq!(v, "good");
    }
    let other: String = a
        .get_or_load("other", || async { Ok::<_, String>("fine".to_owned()) })
        .await
        .unwrap();
    assert_eq!(other, "fine");
    assert!(
        a.stats().load_errors >= 1,
        "the panic is a failed load: {:?}",
        a.stats()
    );
    eprintln!("loader panic: 30 waiters done {took_over:?} after it; loads 2 (panicked + one)");
}
