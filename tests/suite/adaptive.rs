//! Adaptive entries against real Redis: a loader sets its own entry's TTL and
//! stale window from what it loaded, or answers without storing
//! (`LoadContext::set_ttl`, `set_stale_for`, `do_not_store`), with every value
//! kind and with per-call options; a load that does not store releases its
//! lock, so waiters in this process share its answer and waiters in other
//! caches wake and load for themselves, none hanging.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::support::{RedisServer, join_all_checked, unique_prefix};
use locked_cache::{CallOptions, LoadContext, LockedCache, Outcome};

const MS: fn(u64) -> Duration = Duration::from_millis;

async fn cache_on(server: &RedisServer, prefix: &str) -> LockedCache {
    LockedCache::builder()
        .redis(server.url())
        .key_prefix(prefix)
        .ttl(Duration::from_secs(60))
        .build()
        .await
        .expect("build")
}

fn context() -> LoadContext {
    LoadContext::current().expect("inside a loader")
}

/// The loader's TTL replaces the cache's 60 s: the entry is gone after it.
#[tokio::test]
async fn a_loader_sets_its_entrys_ttl() {
    let server = RedisServer::start();
    let cache = cache_on(&server, &unique_prefix("adaptive_ttl")).await;
    let value: String = cache
        .get_or_load("token", || async {
            context().set_ttl(MS(300));
            Ok::<_, String>("abc".to_owned())
        })
        .await
        .unwrap();
    assert_eq!(value, "abc");
    assert_eq!(
        cache.get::<String>("token").await.unwrap().as_deref(),
        Some("abc")
    );
    tokio::time::sleep(MS(500)).await;
    assert_eq!(
        cache.get::<String>("token").await.unwrap(),
        None,
        "gone after the loader's TTL"
    );
}

/// Bytes with per-call options: the loader's TTL wins over the call's, and
/// the context handed as the argument is the same as `current()`'s.
#[tokio::test]
async fn bytes_with_per_call_options_take_the_loaders_ttl() {
    let server = RedisServer::start();
    let cache = cache_on(&server, &unique_prefix("adaptive_bytes")).await;
    let options = CallOptions::new().ttl(Duration::from_secs(30));
    let (page, outcome) = cache
        .with(options)
        .get_or_load_bytes_with_outcome("page", |ctx| async move {
            ctx.set_ttl(MS(300));
            Ok::<_, String>(b"<html>".to_vec())
        })
        .await
        .unwrap();
    assert_eq!(
        (page.as_slice(), outcome),
        (&b"<html>"[..], Outcome::Loaded)
    );
    assert!(cache.get_bytes("page").await.unwrap().is_some());
    tokio::time::sleep(MS(500)).await;
    assert_eq!(cache.get_bytes("page").await.unwrap(), None);
}

/// The loader's stale window: its entry is served stale past its TTL to a
/// call that accepts stale values, though the call's own entries have none.
#[tokio::test]
async fn a_loader_sets_its_entrys_stale_window() {
    let server = RedisServer::start();
    let cache = cache_on(&server, &unique_prefix("adaptive_stale")).await;
    let accepts_stale = CallOptions::new().stale_for(Duration::from_secs(60));
    cache
        .with(CallOptions::new())
        .get_or_load("k", || async {
            let load = context();
            load.set_ttl(MS(200));
            load.set_stale_for(Duration::from_secs(30));
            Ok::<_, String>("old".to_owned())
        })
        .await
        .unwrap();
    tokio::time::sleep(MS(400)).await;
    let (value, outcome) = cache
        .with(accepts_stale)
        .get_or_load_with_outcome("k", |_| async { Ok::<_, String>("new".to_owned()) })
        .await
        .unwrap();
    assert_eq!((value.as_str(), outcome), ("old", Outcome::Stale));
}

/// Not stored: the caller gets the value, nothing is in Redis, the next call
/// loads again. `set_ttl(0)` is the same.
#[tokio::test]
async fn a_loader_answers_without_storing() {
    let server = RedisServer::start();
    let cache = cache_on(&server, &unique_prefix("adaptive_skip")).await;
    let runs = Arc::new(AtomicU32::new(0));
    for round in 1..=2 {
        let runs2 = Arc::clone(&runs);
        let (value, outcome) = cache
            .get_or_load_with_outcome("busy", |ctx| async move {
                runs2.fetch_add(1, Ordering::SeqCst);
                ctx.do_not_store();
                Ok::<_, String>("503".to_owned())
            })
            .await
            .unwrap();
        assert_eq!((value.as_str(), outcome), ("503", Outcome::Loaded));
        assert_eq!(runs.load(Ordering::SeqCst), round);
        assert_eq!(cache.get::<String>("busy").await.unwrap(), None);
    }
    let _: Vec<u8> = cache
        .get_or_load_bytes("zero", || async {
            context().set_ttl(Duration::ZERO);
            Ok::<_, String>(vec![1])
        })
        .await
        .unwrap();
    assert_eq!(cache.get_bytes("zero").await.unwrap(), None);
}

/// A refresh that does not store leaves the stale entry: still served.
#[tokio::test]
async fn a_refresh_that_does_not_store_leaves_the_stale_entry() {
    let server = RedisServer::start();
    let cache = cache_on(&server, &unique_prefix("adaptive_refresh")).await;
    let options = CallOptions::new()
        .ttl(MS(200))
        .stale_for(Duration::from_secs(30));
    let ok = |v: &'static str| async move { Ok::<_, String>(v.to_owned()) };
    cache
        .with(options)
        .get_or_load("k", move || ok("old"))
        .await
        .unwrap();
    tokio::time::sleep(MS(300)).await;
    // A plain call refreshes in place (it waits for its refresh): the loader
    // answers without storing, and the caller gets that answer.
    let fresh = cache
        .get_or_load("k", || async {
            context().do_not_store();
            Ok::<_, String>("error page".to_owned())
        })
        .await
        .unwrap();
    assert!(fresh == "error page" || fresh == "old", "{fresh}");
    let (value, outcome) = cache
        .with(options)
        .get_or_load_with_outcome("k", |_| async {
            context().do_not_store();
            Ok::<_, String>("again".to_owned())
        })
        .await
        .unwrap();
    assert_eq!(
        (value.as_str(), outcome),
        ("old", Outcome::Stale),
        "the stale entry stays"
    );
}

/// One cache's load does not store: its 20 in-process callers share the one
/// load; a caller in another cache, waiting on the lock, is woken by the
/// release (not by the lock's 10 s expiry or its 5 s retry), finds nothing
/// and runs its own load. Nobody hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_in_other_caches_wake_and_load_for_themselves() {
    let server = RedisServer::start();
    let prefix = unique_prefix("adaptive_wake");
    let build = || {
        LockedCache::builder()
            .redis(server.url())
            .key_prefix(&prefix)
            .lock_expiry(Duration::from_secs(10))
            .retry_time(Duration::from_secs(5))
            .build()
    };
    let (a, b) = (build().await.unwrap(), build().await.unwrap());
    let runs_a = Arc::new(AtomicU32::new(0));
    let (gate_tx, gate_rx) = tokio::sync::watch::channel(false);
    let mut calls = Vec::new();
    for _ in 0..20 {
        let (a, runs, mut gate) = (a.clone(), Arc::clone(&runs_a), gate_rx.clone());
        calls.push(tokio::spawn(async move {
            a.with(CallOptions::new())
                .get_or_load("k", move || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    gate.wait_for(|open| *open).await.unwrap();
                    context().do_not_store();
                    Ok::<_, String>("a".to_owned())
                })
                .await
                .unwrap()
        }));
    }
    while runs_a.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(MS(5)).await;
    }
    let runs_b = Arc::new(AtomicU32::new(0));
    let waiter = tokio::spawn({
        let (b, runs) = (b.clone(), Arc::clone(&runs_b));
        async move {
            b.get_or_load("k", || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, String>("b".to_owned())
            })
            .await
            .unwrap()
        }
    });
    tokio::time::sleep(MS(300)).await; // b is waiting on the lock
    assert_eq!(runs_b.load(Ordering::SeqCst), 0);
    let released = Instant::now();
    gate_tx.send(true).unwrap();
    let answers = join_all_checked(calls).await;
    assert!(answers.iter().all(|v| v == "a"), "{answers:?}");
    assert_eq!(runs_a.load(Ordering::SeqCst), 1, "one load in cache a");
    let b_value = tokio::time::timeout(Duration::from_secs(3), waiter)
        .await
        .expect("the waiter in cache b hung")
        .unwrap();
    assert!(released.elapsed() < Duration::from_secs(3));
    assert_eq!((b_value.as_str(), runs_b.load(Ordering::SeqCst)), ("b", 1));
    assert_eq!(b.get::<String>("k").await.unwrap().as_deref(), Some("b"));
}
