//! What the cache's loads leave on the lock masters: nothing, once their
//! locks are gone (each load used to leave a `{lock}:meta` hash for an hour).
//! Measured on real servers with 1 and 3 masters: the keys and `used_memory`
//! of the lock masters after many distinct loads, and while loads are in
//! flight, against the values' memory. A lock taken through the lock API
//! keeps its fencing metadata for the documented hour.

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use crate::support::{Fleet, RedisServer, join_all_checked, unique_prefix};
use locked_cache::LockedCache;

const VALUE: usize = 1024;

fn used_memory(server: &RedisServer) -> i64 {
    server.info_number("memory", "used_memory") as i64
}

fn keys(server: &RedisServer) -> Vec<String> {
    server.query(&["KEYS", "*"])
}

/// Runs `n` distinct loads of 1 KiB values through `cache`, 50 at a time;
/// each load takes `load_for`.
async fn load_distinct(cache: &LockedCache, n: usize, load_for: Duration) {
    let mut calls = Vec::new();
    for i in 0..n {
        let cache = cache.clone();
        calls.push(tokio::spawn(async move {
            cache
                .get_or_load_bytes(&format!("item:{i}"), move || async move {
                    tokio::time::sleep(load_for).await;
                    Ok::<_, String>(vec![b'x'; VALUE])
                })
                .await
                .map(|v| v.len())
        }));
        if calls.len() == 50 {
            for r in join_all_checked(std::mem::take(&mut calls)).await {
                assert_eq!(r.unwrap(), VALUE);
            }
        }
    }
    for r in join_all_checked(calls).await {
        assert_eq!(r.unwrap(), VALUE);
    }
}

/// 1 and 3 lock masters, values on a server of their own (`cache_url`), so
/// each side is measured alone: after 2,000 distinct loads the lock masters
/// hold no key at all, and, while 500 loads are in flight, the lock side costs
/// at most 10 % of what the values cost once stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loads_leave_no_key_on_the_lock_masters_and_little_memory_in_flight() {
    for masters in [1, 3] {
        let fleet = Fleet::start(masters);
        let values = RedisServer::start();
        let cache = LockedCache::builder()
            .masters(fleet.urls())
            .cache_url(values.url())
            .key_prefix(unique_prefix("memory"))
            .ttl(Duration::from_secs(600))
            .build()
            .await
            .unwrap();
        cache.ping().await.unwrap();
        let lock_before: Vec<i64> = fleet.servers.iter().map(used_memory).collect();
        let values_before = used_memory(&values);

        load_distinct(&cache, 2_000, Duration::ZERO).await;
        for (i, server) in fleet.servers.iter().enumerate() {
            support::eventually(Duration::from_secs(3), || async { keys(server).is_empty() }).await;
            let left = keys(server);
            assert!(
                left.is_empty(),
                "{masters} masters: master {i} keeps {} keys after 2,000 loads, e.g. {:?}",
                left.len(),
                &left[..left.len().min(3)]
            );
        }
        let per_value = (used_memory(&values) - values_before) as f64 / 2_000.0;

        // 500 loads in flight at once: their locks (a key each, no metadata)
        // are all there, and are all gone after.
        let in_flight = {
            let cache = cache.clone();
            tokio::spawn(async move {
                let calls: Vec<_> = (0..500)
                    .map(|i| {
                        let cache = cache.clone();
                        tokio::spawn(async move {
                            cache
                                .get_or_load_bytes(&format!("slow:{i}"), || async {
                                    tokio::time::sleep(Duration::from_millis(1500)).await;
                                    Ok::<_, String>(vec![b'y'; VALUE])
                                })
                                .await
                                .map(|v| v.len())
                        })
                    })
                    .collect();
                join_all_checked(calls).await
            })
        };
        let servers = Arc::new(fleet);
        // Each lock is held on a majority of the masters (a late master's
        // grant may be missing).
        let quorum = masters / 2 + 1;
        let held = support::eventually(Duration::from_secs(10), || {
            let servers = Arc::clone(&servers);
            async move {
                let held: usize = servers.servers.iter().map(|s| keys(s).len()).sum();
                held >= quorum * 500
            }
        })
        .await;
        assert!(held, "500 locks in flight");
        let per_load: Vec<f64> = servers
            .servers
            .iter()
            .zip(&lock_before)
            .map(|(s, before)| (used_memory(s) - before) as f64 / 500.0)
            .collect();
        for r in in_flight.await.unwrap() {
            assert_eq!(r.unwrap(), VALUE);
        }
        // Releases on the masters beyond the first majority finish from a
        // task of their own: give them a moment.
        for (i, server) in servers.servers.iter().enumerate() {
            let gone =
                support::eventually(Duration::from_secs(3), || async { keys(server).is_empty() })
                    .await;
            assert!(gone, "master {i} after the slow loads: {:?}", keys(server));
        }
        // The cache at that moment: 2,000 values stored, 500 loads in
        // flight (a quarter as many: far more than a cache loading 1,000
        // keys a second in 50 ms holds against its 60,000 values).
        let worst = per_load.iter().cloned().fold(0.0, f64::max);
        let share = (500.0 * worst) / (2_000.0 * per_value);
        eprintln!(
            "{masters} masters: {per_value:.0} B per 1 KiB value stored (with its fence, right after); lock side {per_load:.0?} B per load in flight on each master; 500 in flight against 2,000 values: {:.1} % of the values' memory; 0 keys left after",
            100.0 * share
        );
        assert!(
            share <= 0.10,
            "500 loads in flight cost {:.1} % of 2,000 values' memory on a lock master",
            100.0 * share
        );
    }
}

/// A lock taken through the lock API keeps its fencing counter and owner
/// for the documented hour (tokens stay monotonic across acquisitions),
/// while a cache load on the same server leaves nothing.
#[tokio::test]
async fn user_locks_keep_their_metadata_and_cache_loads_do_not() {
    let server = RedisServer::start();
    let cache = LockedCache::builder()
        .redis(server.url())
        .key_prefix(unique_prefix("user_lock"))
        .build()
        .await
        .unwrap();
    let first = cache.lock().acquire("jobs:nightly").await.unwrap();
    let token = first.fencing_token();
    first.release().await.unwrap();
    let ttl: i64 = server.query(&["PTTL", "{jobs:nightly}:meta"]);
    assert!(
        ttl > 3_500_000,
        "the user lock's metadata lives an hour: {ttl} ms"
    );
    let second = cache.lock().acquire("jobs:nightly").await.unwrap();
    assert_eq!(second.fencing_token(), token + 1, "the counter went on");
    second.release().await.unwrap();

    let v: String = cache
        .get_or_compute("k", || async { "v".to_owned() })
        .await
        .unwrap();
    assert_eq!(v, "v");
    let meta = format!("{{{}}}:meta", cache.lock_key("k"));
    assert_eq!(
        server.query::<i64>(&["EXISTS", &cache.lock_key("k"), &meta]),
        0
    );
}

/// What keeping a load's lock alive costs with the default 800 ms expiry:
/// extensions every third of it, counted on each of 3 masters during one
/// 3 s load (the lock's `EVALSHA`s: the claim, the extensions, the release),
/// and the fence extensions on the value server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_load_renews_its_lock_about_four_times_a_second_per_master() {
    let fleet = Fleet::start(3);
    let values = RedisServer::start();
    let cache = LockedCache::builder()
        .masters(fleet.urls())
        .cache_url(values.url())
        .key_prefix(unique_prefix("renewals"))
        .build()
        .await
        .unwrap();
    cache.ping().await.unwrap();
    for server in fleet.servers.iter().chain([&values]) {
        server.reset_stats();
    }
    let load = Duration::from_secs(3);
    let v = cache
        .get_or_load_bytes("slow", || async move {
            tokio::time::sleep(load).await;
            Ok::<_, String>(vec![1; 16])
        })
        .await
        .unwrap();
    assert_eq!(v.len(), 16);
    let per_master: Vec<f64> = fleet
        .servers
        .iter()
        .map(|s| {
            // The claim and the release are one script each; the rest renew.
            let scripts = s.command_calls("evalsha") + s.command_calls("eval");
            scripts.saturating_sub(2) as f64 / load.as_secs_f64()
        })
        .collect();
    let fence = (values.command_calls("evalsha") + values.command_calls("eval")) as f64
        / load.as_secs_f64();
    eprintln!(
        "one running load, default lock expiry: {per_master:.2?} lock extensions/s per master, {fence:.2} scripts/s on the value server (fence extensions, the double check and the store)"
    );
    for rate in &per_master {
        assert!(
            (2.5..=5.0).contains(rate),
            "{rate:.2} extensions a second (expected about 3.75: every 267 ms)"
        );
    }
}
