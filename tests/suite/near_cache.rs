//! The near cache (feature `near-cache`): hot hits from memory, kept coherent
//! across processes by pub/sub invalidations, bounded when a message is lost.
//!
//! "Another process" is a second `LockedCache` with its own connections and its
//! own subscription; they share only the Redis server.
#![cfg(feature = "near-cache")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::support::{RedisServer, eventually, join_all_checked, unique_prefix};
use locked_cache::LockedCache;

const MINUTE: Duration = Duration::from_secs(60);

async fn near_cache(server: &RedisServer, prefix: &str, near_ttl: Duration) -> LockedCache {
    near_cache_sized(server, prefix, near_ttl, 1 << 20).await
}

async fn near_cache_sized(
    server: &RedisServer,
    prefix: &str,
    near_ttl: Duration,
    max_bytes: u64,
) -> LockedCache {
    let cache = LockedCache::builder()
        .redis(server.url())
        .key_prefix(prefix)
        .ttl(MINUTE)
        .near_cache(max_bytes)
        .near_cache_ttl(near_ttl)
        .build()
        .await
        .expect("build");
    assert!(cache.near_is_live(), "subscribed by build()");
    cache
}

/// Reads `k` until the near cache keeps it (a read racing the invalidation of
/// the write before it is not kept), checking it is `value`.
async fn kept(cache: &LockedCache, value: u64) {
    assert!(
        eventually(Duration::from_secs(1), || async {
            assert_eq!(read(cache, "k").await, value);
            cache.near_peek::<u64>("k").is_some()
        })
        .await,
        "value {value} never kept"
    );
}

async fn read(cache: &LockedCache, key: &str) -> u64 {
    *cache
        .get_or_load_shared(key, || async { Ok::<_, String>(0u64) })
        .await
        .expect("get_or_load_shared")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_hit_costs_no_round_trip_and_hands_out_one_value() {
    let server = RedisServer::start();
    let cache = near_cache(&server, &unique_prefix("hot"), MINUTE).await;
    let runs = Arc::new(AtomicU32::new(0));
    let load = || async {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, String>(vec![1u32, 2, 3])
    };
    // Loaded (and stored with an invalidation), then read back and kept.
    cache.get_or_load_shared("k", load).await.unwrap();
    let first = cache.get_or_load_shared("k", load).await.unwrap();
    server.reset_stats();
    let second = cache.get_or_load_shared("k", load).await.unwrap();
    let third: Arc<Vec<u32>> = cache.get_shared("k").await.unwrap().unwrap();
    assert!(Arc::ptr_eq(&first, &second) && Arc::ptr_eq(&second, &third));
    assert_eq!(server.command_calls("get"), 0, "served from memory");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(cache.stats().near_hits, 2);
    // The plain calls still read Redis and decode their own copy.
    let plain: Vec<u32> = cache.get_or_load("k", load).await.unwrap();
    assert_eq!(plain, *first);
    assert_eq!(server.command_calls("get"), 1);
}

/// `get_or_load_cloned` answers from the near cache (no `GET`) with a clone
/// of the kept value, shares `get_or_load_shared`'s entry, and sees another
/// cache's write once its invalidation arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloned_hits_come_from_memory_and_stay_coherent() {
    let server = RedisServer::start();
    let prefix = unique_prefix("cloned");
    let cache = near_cache(&server, &prefix, MINUTE).await;
    let writer = near_cache(&server, &prefix, MINUTE).await;
    let load = || async { Ok::<_, String>(vec![1u32, 2, 3]) };
    let loaded: Vec<u32> = cache.get_or_load_cloned("k", load).await.unwrap();
    assert_eq!(loaded, [1, 2, 3]);
    assert!(
        eventually(Duration::from_secs(1), || async {
            let read: Vec<u32> = cache.get_or_load_cloned("k", load).await.unwrap();
            assert_eq!(read, [1, 2, 3]);
            cache.near_peek::<Vec<u32>>("k").is_some()
        })
        .await,
        "never kept"
    );
    server.reset_stats();
    let hits = cache.stats().near_hits;
    let cloned: Vec<u32> = cache.get_or_load_cloned("k", load).await.unwrap();
    let shared: Arc<Vec<u32>> = cache.get_or_load_shared("k", load).await.unwrap();
    assert_eq!(
        (cloned.as_slice(), shared.as_slice()),
        (&[1, 2, 3][..], &[1, 2, 3][..])
    );
    assert_eq!(server.command_calls("get"), 0, "served from memory");
    assert_eq!(cache.stats().near_hits, hits + 2);
    writer.set("k", &vec![4u32]).await.unwrap();
    assert!(
        eventually(Duration::from_secs(1), || async {
            let read: Vec<u32> = cache.get_or_load_cloned("k", load).await.unwrap();
            read == [4]
        })
        .await,
        "the write never reached the near cache"
    );
}

/// Three caches write and read the same keys concurrently (set, invalidate,
/// loads); once the writes stop, every cache sees Redis's value at once: no
/// near cache kept a value that was replaced, although its TTL (a minute)
/// would have let it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_caches_stay_coherent_under_concurrent_writes() {
    let server = RedisServer::start();
    let prefix = unique_prefix("coherent");
    let mut caches = Vec::new();
    for _ in 0..3 {
        caches.push(near_cache(&server, &prefix, MINUTE).await);
    }
    // Keys whose value keys carry an escape or braces too: the near cache
    // keeps values by key and invalidations name value keys.
    let keys: Vec<String> = ["k0", "}k1", "\\k2", "k{3}", "{", "}", "\\", "é:7"]
        .map(str::to_owned)
        .into();
    let deadline = Instant::now() + Duration::from_millis(1500);
    let mut tasks = Vec::new();
    for (c, cache) in caches.iter().enumerate() {
        for t in 0..4 {
            let (cache, keys) = (cache.clone(), keys.clone());
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    n += 1;
                    let key = &keys[fastrand::usize(..keys.len())];
                    match (t, n % 10) {
                        // Writers: set a new value, or invalidate (the next
                        // read loads one).
                        (0, 0) => {
                            cache.invalidate(key).await.unwrap();
                        }
                        (0, _) => {
                            let value = (c as u64 + 1) * 1_000_000 + n;
                            cache.set(key, &value).await.unwrap();
                        }
                        // Readers, through the near cache.
                        _ => {
                            read(&cache, key).await;
                        }
                    }
                }
            }));
        }
    }
    join_all_checked(tasks).await;
    // Let the last invalidations arrive (a loopback message takes well under
    // a millisecond; allow for a loaded machine).
    tokio::time::sleep(Duration::from_millis(200)).await;
    for key in &keys {
        let truth: Option<u64> = caches[0].get(key).await.unwrap();
        for (c, cache) in caches.iter().enumerate() {
            let seen = match truth {
                Some(_) => Some(read(cache, key).await),
                None => cache.get_shared::<u64>(key).await.unwrap().map(|v| *v),
            };
            let truth_now: Option<u64> = caches[0].get(key).await.unwrap();
            let expected = truth.or(truth_now);
            assert_eq!(seen, expected, "cache {c}, key {key}");
        }
    }
    let stats: Vec<_> = caches.iter().map(|c| c.stats()).collect();
    assert!(stats.iter().all(|s| s.near_invalidations > 0), "{stats:?}");
    assert!(stats.iter().all(|s| s.near_hits > 0), "{stats:?}");
}

/// After a `set` in one process, the others' near caches drop the old value
/// within a few milliseconds (the figure is the bench's; here: well under the
/// near cache TTL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_reaches_the_other_near_caches() {
    let server = RedisServer::start();
    let prefix = unique_prefix("reach");
    let writer = near_cache(&server, &prefix, MINUTE).await;
    let reader = near_cache(&server, &prefix, MINUTE).await;
    writer.set("k", &1u64).await.unwrap();
    kept(&reader, 1).await;
    for value in 2..20u64 {
        writer.set("k", &value).await.unwrap();
        assert!(
            eventually(Duration::from_secs(1), || async {
                reader.near_peek::<u64>("k").is_none()
            })
            .await,
            "the invalidation of value {value} never arrived"
        );
        kept(&reader, value).await;
    }
    // And a stored load invalidates too.
    reader.invalidate("k").await.unwrap();
    assert!(
        eventually(Duration::from_secs(1), || async {
            writer.near_peek::<u64>("k").is_none()
        })
        .await
    );
}

/// The subscription is killed: the near cache is bypassed and cleared, the
/// listener resubscribes, and a write whose message was lost meanwhile is seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_subscription_clears_the_near_cache() {
    let server = RedisServer::start();
    let prefix = unique_prefix("killed");
    let writer = near_cache(&server, &prefix, MINUTE).await;
    let reader = near_cache(&server, &prefix, MINUTE).await;
    writer.set("k", &1u64).await.unwrap();
    assert_eq!(read(&reader, "k").await, 1);
    server.client_kill_pubsub();
    // Written while the reader may not be subscribed: its message may be lost.
    writer.set("k", &2u64).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            reader.stats().near_resubscriptions >= 1 && reader.near_is_live()
        })
        .await,
        "never resubscribed: {:?}",
        reader.stats()
    );
    assert_eq!(read(&reader, "k").await, 2, "cleared on resubscription");
    // Coherent again afterwards.
    writer.set("k", &3u64).await.unwrap();
    assert!(
        eventually(Duration::from_secs(1), || async {
            read(&reader, "k").await == 3
        })
        .await
    );
}

/// The value leaves Redis without a message (evicted, expired, deleted by
/// another program): the near cache serves it at most its TTL longer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_gone_from_redis_lives_at_most_the_near_ttl() {
    let server = RedisServer::start();
    let near_ttl = Duration::from_millis(300);
    let cache = near_cache(&server, &unique_prefix("gone"), near_ttl).await;
    let runs = Arc::new(AtomicU32::new(0));
    let load = || async {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, String>(runs.load(Ordering::SeqCst))
    };
    assert_eq!(*cache.get_or_load_shared("k", load).await.unwrap(), 1);
    let deleted_at = Instant::now();
    let _: u64 = server.query(&["DEL", &cache.value_key("k")]);
    // Still served from memory for a while: no message was sent.
    while *cache.get_or_load_shared("k", load).await.unwrap() == 1 {
        assert!(
            deleted_at.elapsed() < near_ttl + Duration::from_millis(200),
            "served {:?} after the value left Redis (near TTL {near_ttl:?})",
            deleted_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2, "reloaded once");
}

/// A near cache far smaller than the working set: values are evicted, every
/// call still returns the right value, and the hottest keys are still served
/// from memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_near_cache_evicts_and_stays_correct() {
    let server = RedisServer::start();
    // ~4 KiB for 200 values of ~100 bytes.
    let cache = near_cache_sized(&server, &unique_prefix("full"), MINUTE, 4096).await;
    let value = |k: usize| format!("{k:0>100}");
    for k in 0..200 {
        cache.set(&format!("k{k}"), &value(k)).await.unwrap();
    }
    for round in 0..3 {
        for k in 0..200 {
            let key = format!("k{k}");
            let got = cache
                .get_or_load_shared(&key, || async { Err::<String, _>("must not load") })
                .await
                .unwrap();
            assert_eq!(*got, value(k), "round {round}");
        }
    }
    let held = (0..200)
        .filter(|k| cache.near_peek::<String>(&format!("k{k}")).is_some())
        .count();
    assert!(held < 60, "{held} values of ~100 B held in 4 KiB");
    // A hot key stays in memory.
    for _ in 0..50 {
        cache
            .get_or_load_shared("k0", || async { Err::<String, _>("must not load") })
            .await
            .unwrap();
    }
    assert!(cache.stats().near_hits > 0);
    assert_eq!(cache.stats().loads, 0);
}

/// A value with little time left in Redis is kept in the near cache only for
/// that time, however long the near cache TTL: the near cache never serves a
/// value Redis has expired (or would call stale).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_near_cache_never_outlives_the_value_in_redis() {
    let server = RedisServer::start();
    let cache = near_cache(&server, &unique_prefix("short"), MINUTE).await;
    let ttl = Duration::from_millis(400);
    cache.set_with_ttl("k", &1u64, ttl).await.unwrap();
    let set_at = Instant::now();
    kept(&cache, 1).await;
    assert!(
        eventually(Duration::from_secs(2), || async {
            cache.near_peek::<u64>("k").is_none()
        })
        .await
    );
    assert!(
        set_at.elapsed() < ttl + Duration::from_millis(300),
        "kept {:?} for a value of {ttl:?}",
        set_at.elapsed()
    );
    let reloaded = cache
        .get_or_load_shared("k", || async { Ok::<_, String>(2u64) })
        .await
        .unwrap();
    assert_eq!(*reloaded, 2, "expired in Redis too");
}

/// With a stale window, a value stays in Redis past its fresh time; the near
/// cache keeps it only while fresh, and keeps the refreshed value again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_near_cache_keeps_a_value_only_while_it_is_fresh() {
    let server = RedisServer::start();
    let fresh = Duration::from_millis(400);
    let cache = LockedCache::builder()
        .redis(server.url())
        .key_prefix(unique_prefix("fresh"))
        .call_options(
            locked_cache::CallOptions::new()
                .ttl(fresh)
                .stale_for(Duration::from_secs(30)),
        )
        .near_cache(1 << 20)
        .near_cache_ttl(MINUTE)
        .build()
        .await
        .unwrap();
    cache.set("k", &1u64).await.unwrap();
    let set_at = Instant::now();
    kept(&cache, 1).await;
    assert!(
        eventually(Duration::from_secs(2), || async {
            cache.near_peek::<u64>("k").is_none()
        })
        .await
    );
    assert!(
        set_at.elapsed() < fresh + Duration::from_millis(300),
        "kept {:?}, fresh for {fresh:?}",
        set_at.elapsed()
    );
    // Still in Redis, stale: the next call refreshes it (this caller in place,
    // its followers served the stale value), and the refreshed value is kept.
    let value = cache
        .get_or_load_shared("k", || async { Ok::<_, String>(2u64) })
        .await
        .unwrap();
    assert!(*value == 1 || *value == 2, "{value}");
    kept(&cache, 2).await;
}
