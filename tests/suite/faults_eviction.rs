//! Fault: the server evicts keys under memory pressure. Lock and fence keys are
//! short-lived keys with a TTL, the first ones `volatile-ttl` evicts. The cache
//! reads the policy once per server (a refused `CONFIG` is fine) and warns when
//! it can evict them; the recommended layout (locks on a `noeviction` master,
//! values on a server of their own under `allkeys-lru`) loads once per key
//! under pressure and never writes a stale value.

use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use crate::support::capture::capture;
use crate::support::{RedisServer, join_all_checked, unique_prefix};
use locked_cache::LockedCache;
use tracing::Level;

const MINUTE: Duration = Duration::from_secs(60);

fn eviction_warnings(events: &[support::capture::CapturedEvent]) -> usize {
    events
        .iter()
        .filter(|e| {
            e.text()
                .contains("maxmemory-policy can evict lock and fence keys")
        })
        .count()
}

/// `volatile-ttl` (and the other policies that can evict a key in use) with a
/// memory limit: one warning per server, however many connections and calls.
/// `noeviction` and `allkeys-lru` limits, or no limit at all: none. A user
/// whose ACL refuses `CONFIG`: no warning, no error, calls work.
#[tokio::test(flavor = "current_thread")]
async fn a_policy_that_can_evict_locks_is_warned_once_per_server() {
    let (captured, _guard) = capture();
    let cases = [
        ("volatile-ttl", "64mb", 1),
        ("volatile-lru", "64mb", 1),
        ("allkeys-random", "64mb", 1),
        ("volatile-ttl", "0", 0),
        ("noeviction", "64mb", 0),
        ("allkeys-lru", "64mb", 0),
    ];
    for (policy, maxmemory, expected) in cases {
        let server = RedisServer::start();
        server.cmd(&["CONFIG", "SET", "maxmemory-policy", policy]);
        server.cmd(&["CONFIG", "SET", "maxmemory", maxmemory]);
        captured.clear();
        let cache = LockedCache::builder()
            .redis(server.url())
            .key_prefix(unique_prefix("policy"))
            .pool_size(4)
            .build()
            .await
            .unwrap();
        for i in 0..20 {
            let key = format!("k{i}");
            let v: u32 = cache
                .get_or_load(&key, || async move { Ok::<_, String>(i) })
                .await
                .unwrap();
            assert_eq!(v, i);
        }
        let warnings = eviction_warnings(&captured.at(Level::WARN));
        assert_eq!(
            warnings, expected,
            "{policy} with maxmemory {maxmemory}: {warnings} warnings"
        );
    }

    // A user that may not run CONFIG (as on managed services).
    let server = RedisServer::start();
    server.cmd(&["CONFIG", "SET", "maxmemory-policy", "volatile-ttl"]);
    server.cmd(&["CONFIG", "SET", "maxmemory", "64mb"]);
    server.cmd(&[
        "ACL", "SETUSER", "app", "on", ">s3cret", "~*", "&*", "+@all", "-config",
    ]);
    captured.clear();
    let url = format!("redis://app:s3cret@127.0.0.1:{}", server.port());
    let cache = LockedCache::builder()
        .redis(url)
        .key_prefix(unique_prefix("noconfig"))
        .build()
        .await
        .unwrap();
    let v: u32 = cache
        .get_or_load("k", || async { Ok::<_, String>(1) })
        .await
        .unwrap();
    assert_eq!(v, 1);
    let events = captured.events();
    assert_eq!(eviction_warnings(&events), 0);
    assert!(
        events
            .iter()
            .any(|e| e.level == Level::DEBUG && e.text().contains("CONFIG GET refused")),
        "the refusal is logged at debug level"
    );
}

/// Locks on a `noeviction` master, values on a server of their own with a
/// 3 MB `allkeys-lru` limit that a writer keeps overfull (~200 writes of 10 KB
/// a second: the whole value server turns over every ~1.5 s). The lock is
/// never evicted, so two loads of a key never run at once; a fence or value
/// evicted mid-load costs one more load (the store is refused, or the value is
/// gone before a waiter reads it), never a stale write. 7 stampedes of 2 caches
/// × 5 callers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_pressure_the_recommended_layout_never_loads_a_key_twice_at_once() {
    let locks = RedisServer::start();
    let values = RedisServer::start();
    values.cmd(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"]);
    values.cmd(&["CONFIG", "SET", "maxmemory", "3mb"]);
    let prefix = unique_prefix("pressure");
    let build = || async {
        LockedCache::builder()
            .redis(locks.url())
            .cache_url(values.url())
            .key_prefix(&prefix)
            .ttl(MINUTE)
            .build()
            .await
            .unwrap()
    };
    let caches = [build().await, build().await];
    let stop = Arc::new(AtomicBool::new(false));
    let filler = {
        let (url, stop) = (values.url(), Arc::clone(&stop));
        tokio::spawn(async move {
            let client = redis::Client::open(url).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            let blob = vec![b'x'; 10_000];
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let _: () = redis::cmd("SET")
                    .arg(format!("filler:{i}"))
                    .arg(&blob)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            i
        })
    };
    // Fill it past the limit first.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut loads_per_key = Vec::new();
    let mut most_at_once = 0;
    for round in 0..7u32 {
        let key = format!("k{round}");
        let runs = Arc::new(AtomicU32::new(0));
        let running = Arc::new(AtomicU32::new(0));
        let peak = Arc::new(AtomicU32::new(0));
        let mut calls = Vec::new();
        for cache in &caches {
            for _ in 0..5 {
                let (cache, key) = (cache.clone(), key.clone());
                let (runs, running, peak) =
                    (Arc::clone(&runs), Arc::clone(&running), Arc::clone(&peak));
                calls.push(tokio::spawn(async move {
                    cache
                        .get_or_load(&key, || async move {
                            runs.fetch_add(1, Ordering::SeqCst);
                            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                            peak.fetch_max(now, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            running.fetch_sub(1, Ordering::SeqCst);
                            Ok::<_, String>(round)
                        })
                        .await
                }));
            }
        }
        for r in join_all_checked(calls).await {
            assert_eq!(r.unwrap(), round);
        }
        loads_per_key.push(runs.load(Ordering::SeqCst));
        most_at_once = most_at_once.max(peak.load(Ordering::SeqCst));
    }
    stop.store(true, Ordering::Relaxed);
    let written = join_all_checked(vec![filler]).await.remove(0);
    let evicted = values.info_number("stats", "evicted_keys");
    let refused: u64 = caches.iter().map(|c| c.stats().writes_refused).sum();
    eprintln!(
        "allkeys-lru value server under pressure ({written} filler writes, {evicted} keys \
         evicted): loads per key {loads_per_key:?}, {refused} stores refused, at most \
         {most_at_once} load(s) of a key at once"
    );
    assert!(evicted > 0, "no pressure: nothing was evicted");
    assert_eq!(most_at_once, 1, "two loads of one key ran at once");
    let extra: u64 = loads_per_key.iter().map(|&n| u64::from(n) - 1).sum();
    assert!(
        loads_per_key.iter().all(|&n| n >= 1) && extra <= 7,
        "loads per key {loads_per_key:?}"
    );
}
