//! Tags and clear against real Redis: an invalidation in one process is a
//! miss in the others (near cache on and off), in a constant number of
//! commands whatever the number of entries; a process that missed the message
//! stops serving the entry within the refresh interval; stale windows do not
//! serve invalidated entries; failures are typed.

use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::support::{RedisServer, join_all_checked, unique_prefix};
use locked_cache::{CallOptions, LockedCache, Outcome};

const MS: fn(u64) -> Duration = Duration::from_millis;

async fn tagged_cache(server: &RedisServer, prefix: &str, near: bool) -> LockedCache {
    let builder = LockedCache::builder()
        .redis(server.url())
        .key_prefix(prefix)
        .tags(true)
        .tag_refresh(MS(300));
    #[cfg(feature = "near-cache")]
    let builder = if near {
        builder.near_cache(1 << 20)
    } else {
        builder
    };
    #[cfg(not(feature = "near-cache"))]
    assert!(!near, "the near cache needs the near-cache feature");
    builder.build().await.expect("build")
}

/// Reads `key` (tagged `tag`) through `cache`, counting loads in `loads`.
async fn read(cache: &LockedCache, key: &str, tag: &str, loads: &Arc<AtomicU32>) -> Outcome {
    let loads = Arc::clone(loads);
    let value = format!("{key}@{}", loads.load(Ordering::SeqCst));
    let (v, outcome) = cache
        .with(CallOptions::new().tag(tag))
        .get_or_load_shared_with_outcome(key, move |_| async move {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, String>(value)
        })
        .await
        .expect("read");
    assert!(v.starts_with(key), "{v}");
    outcome
}

/// Three caches on one server: 10 entries tagged `a`, 10 tagged `b`, loaded
/// by the first and read by all. `invalidate_tag("a")` in the second makes
/// exactly the `a` entries misses in all three (one reload each across them),
/// the `b` ones stay hits; `clear()` then makes every entry a miss. With the
/// near cache on, the other processes see it at once (the message); without,
/// within the refresh interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_tag_or_a_clear_is_a_miss_in_every_process() {
    let server = RedisServer::start();
    let nears: &[bool] = if cfg!(feature = "near-cache") {
        &[false, true]
    } else {
        &[false]
    };
    for &near in nears {
        let prefix = unique_prefix("tags");
        let mut caches = Vec::new();
        for _ in 0..3 {
            caches.push(tagged_cache(&server, &prefix, near).await);
        }
        let loads = Arc::new(AtomicU32::new(0));
        let keys: Vec<(String, &str)> = (0..20)
            .map(|i| (format!("k{i}"), if i < 10 { "a" } else { "b" }))
            .collect();
        for (key, tag) in &keys {
            assert_eq!(read(&caches[0], key, tag, &loads).await, Outcome::Loaded);
        }
        for cache in &caches {
            for (key, tag) in &keys {
                assert_eq!(read(cache, key, tag, &loads).await, Outcome::Hit);
            }
        }
        assert_eq!(loads.load(Ordering::SeqCst), 20);

        let invalidated_at = Instant::now();
        caches[1].invalidate_tag("a").await.unwrap();
        // Wait until every cache sees `a` as gone, then count: each `a` key
        // reloaded once in all, each `b` key still a hit everywhere.
        let bound = if near { MS(200) } else { MS(300) + MS(300) };
        let mut seen_after = Duration::ZERO;
        for cache in [&caches[0], &caches[2]] {
            let started = Instant::now();
            loop {
                let (v, outcome) = cache
                    .with(CallOptions::new().tag("a"))
                    .get_or_load_shared_with_outcome("k0", |_| async {
                        Ok::<_, String>("k0 reloaded".to_owned())
                    })
                    .await
                    .unwrap();
                if outcome != Outcome::Hit || v.as_str() == "k0 reloaded" {
                    break;
                }
                assert!(
                    started.elapsed() < bound + MS(500),
                    "near {near}: an entry tagged `a` still served {:?} after its invalidation",
                    invalidated_at.elapsed()
                );
                tokio::time::sleep(MS(10)).await;
            }
            seen_after = seen_after.max(invalidated_at.elapsed());
        }
        let before = loads.load(Ordering::SeqCst);
        for cache in &caches {
            for (key, tag) in &keys[1..] {
                let outcome = read(cache, key, tag, &loads).await;
                if *tag == "b" {
                    assert_eq!(outcome, Outcome::Hit, "near {near}: {key} tagged b");
                }
            }
        }
        assert_eq!(
            loads.load(Ordering::SeqCst) - before,
            9,
            "near {near}: each other `a` key reloaded once across the 3 caches"
        );

        caches[2].clear().await.unwrap();
        tokio::time::sleep(bound).await;
        let before = loads.load(Ordering::SeqCst);
        for (key, tag) in &keys[1..] {
            assert_eq!(
                read(&caches[0], key, tag, &loads).await,
                Outcome::Loaded,
                "near {near}: {key} after clear"
            );
        }
        assert_eq!(loads.load(Ordering::SeqCst) - before, 19);
        eprintln!(
            "near cache {near}: tag invalidation seen by the other caches {seen_after:?} after it"
        );
    }
}

/// 100,000 entries tagged `big` (written as the cache writes them: the bytes of
/// one entry the cache stored, under each entry's key): `invalidate_tag` is
/// one `SET` and no `SCAN`/`KEYS`, however many entries; the server holds the
/// entries and one tag key, nothing per entry more; after it, sampled entries
/// are misses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_over_100_000_entries_is_invalidated_in_one_command_and_memory_stays_flat() {
    let server = RedisServer::start();
    let prefix = unique_prefix("big");
    let cache = tagged_cache(&server, &prefix, false).await;
    let tagged = cache.with(CallOptions::new().tag("big").ttl(Duration::from_secs(600)));
    tagged.set("e0", &"payload".to_owned()).await.unwrap();
    let bytes: Vec<u8> = server.query(&["GET", &cache.value_key("e0")]);
    let base_keys: u64 = server.query(&["DBSIZE"]);
    let base_memory = used_memory(&server);
    let mut conn = server.connection().unwrap();
    for chunk in (1..100_000).collect::<Vec<u32>>().chunks(5_000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            pipe.cmd("SET")
                .arg(cache.value_key(&format!("e{i}")))
                .arg(&bytes)
                .arg("EX")
                .arg(600)
                .ignore();
        }
        let () = pipe.query(&mut conn).unwrap();
    }
    let keys: u64 = server.query(&["DBSIZE"]);
    assert_eq!(keys, base_keys + 99_999, "one key per entry, nothing else");
    let per_entry = (used_memory(&server) - base_memory) as f64 / 99_999.0;
    for i in [1_u32, 50_000, 99_999] {
        assert_eq!(
            cache
                .with(CallOptions::new().tag("big"))
                .get_or_compute(&format!("e{i}"), || async { "reloaded".to_owned() })
                .await
                .unwrap(),
            "payload",
            "a hit before the invalidation"
        );
    }

    server.reset_stats();
    let started = Instant::now();
    cache.invalidate_tag("big").await.unwrap();
    let took = started.elapsed();
    let stats = server.command_stats();
    assert_eq!(server.command_calls("set"), 1, "{stats:?}");
    assert_eq!(
        server.command_calls("scan") + server.command_calls("keys"),
        0
    );
    assert!(server.total_commands() <= 2, "{stats:?}");
    let keys_after: u64 = server.query(&["DBSIZE"]);
    assert_eq!(keys_after, keys + 1, "the tag's version is one key");
    for i in [0_u32, 1, 77_777, 99_999] {
        assert_eq!(
            cache
                .with(CallOptions::new().tag("big"))
                .get_or_compute(&format!("e{i}"), || async { "reloaded".to_owned() })
                .await
                .unwrap(),
            "reloaded",
            "e{i} after the invalidation"
        );
    }
    eprintln!(
        "100,000 tagged entries ({per_entry:.0} B each): invalidate_tag took {took:?}, {} commands",
        stats.values().sum::<u64>()
    );
}

fn used_memory(server: &RedisServer) -> i64 {
    server.info_number("memory", "used_memory") as i64
}

/// A process that never hears the message (no near cache) serves an
/// invalidated entry for at most the refresh interval; and a stale window
/// never serves an invalidated entry (a miss, as if gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_message_the_refresh_bounds_staleness_and_stale_windows_do_not_serve_invalidated_entries()
 {
    let server = RedisServer::start();
    let prefix = unique_prefix("bound");
    let writer = tagged_cache(&server, &prefix, false).await;
    let reader = tagged_cache(&server, &prefix, false).await;
    let options = CallOptions::new()
        .tag("t")
        .ttl(MS(800))
        .stale_for(Duration::from_secs(60));
    let loads = Arc::new(AtomicU32::new(0));
    let load = |cache: &LockedCache| {
        let loads = Arc::clone(&loads);
        let cache = cache.clone();
        async move {
            cache
                .with(options)
                .get_or_load_with_outcome("k", move |_| async move {
                    let n = loads.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, String>(format!("v{n}"))
                })
                .await
                .unwrap()
        }
    };
    assert_eq!(load(&writer).await.1, Outcome::Loaded);
    assert_eq!(load(&reader).await.1, Outcome::Hit);
    writer.invalidate_tag("t").await.unwrap();
    let invalidated = Instant::now();
    let mut served_after = Duration::ZERO;
    loop {
        // When the call was made (a loaded host may take long to answer it).
        let asked = invalidated.elapsed();
        let (value, _) = load(&reader).await;
        if value != "v0" {
            break;
        }
        served_after = asked;
        assert!(
            served_after < MS(300) + MS(50),
            "a call made {served_after:?} after the invalidation got the entry (refresh 300 ms)"
        );
        tokio::time::sleep(MS(5)).await;
    }
    eprintln!("a process without the message served the entry up to {served_after:?} after it");

    // Now stale (its TTL of 800 ms passed, 60 s window): served stale...
    tokio::time::sleep(MS(900)).await;
    assert_eq!(load(&reader).await.1, Outcome::Stale);
    tokio::time::sleep(MS(100)).await; // let that refresh finish
    tokio::time::sleep(MS(900)).await;
    // ...but once invalidated, a stale entry is a miss, not served.
    writer.invalidate_tag("t").await.unwrap();
    let (_, outcome) = load(&writer).await;
    assert_eq!(
        outcome,
        Outcome::Loaded,
        "an invalidated stale entry is gone"
    );
}

/// Typed errors: tags on a cache built without them, too many tags, and an
/// invalidation that cannot reach its server (never a silent success).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_misuse_and_unreachable_servers_are_typed_errors() {
    let mut server = RedisServer::start();
    let plain = LockedCache::builder()
        .redis(server.url())
        .key_prefix(unique_prefix("plain"))
        .build()
        .await
        .unwrap();
    assert!(
        plain
            .invalidate_tag("x")
            .await
            .unwrap_err()
            .is_invalid_input()
    );
    assert!(plain.clear().await.unwrap_err().is_invalid_input());
    let e = plain
        .with(CallOptions::new().tag("x"))
        .get_or_compute("k", || async { 1_u8 })
        .await
        .unwrap_err();
    assert!(e.is_invalid_input(), "{e}");

    let cache = tagged_cache(&server, &unique_prefix("typed"), false).await;
    let mut many = CallOptions::new();
    for i in 0..9 {
        many = many.tag(&format!("t{i}"));
    }
    let e = cache
        .with(many)
        .get_or_compute("k", || async { 1_u8 })
        .await
        .unwrap_err();
    assert!(e.is_invalid_input(), "{e}");

    server.kill();
    let e = cache.invalidate_tag("x").await.unwrap_err();
    assert!(e.is_connection_error() || e.is_timeout(), "{e}");
    let e = cache.clear().await.unwrap_err();
    assert!(e.is_connection_error() || e.is_timeout(), "{e}");
}

/// Many callers of one tagged key across caches during an invalidation: one
/// reload per cache at most, never a value from before the invalidation after
/// the callers saw the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stampede_after_an_invalidation_reloads_once() {
    let server = RedisServer::start();
    let prefix = unique_prefix("stampede");
    let mut caches = Vec::new();
    for _ in 0..3 {
        caches.push(tagged_cache(&server, &prefix, false).await);
    }
    let loads = Arc::new(AtomicU32::new(0));
    assert_eq!(read(&caches[0], "hot", "h", &loads).await, Outcome::Loaded);
    caches[0].invalidate_tag("h").await.unwrap();
    tokio::time::sleep(MS(350)).await; // past every cache's refresh
    let calls: Vec<_> = (0..90)
        .map(|i| {
            let cache = caches[i % 3].clone();
            let loads = Arc::clone(&loads);
            tokio::spawn(async move { read(&cache, "hot", "h", &loads).await })
        })
        .collect();
    join_all_checked(calls).await;
    assert_eq!(
        loads.load(Ordering::SeqCst),
        2,
        "one reload for 90 callers on 3 caches"
    );
}

/// On a Redis Cluster, entries and their tag's version on different shards:
/// invalidating the tag (its version on one shard) makes the entries on
/// every shard misses; `clear` too.
#[cfg(feature = "cluster")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_and_clear_work_across_cluster_shards() {
    let cluster = tokio::task::block_in_place(|| support::cluster::Cluster::start(MS(1000)));
    let prefix = unique_prefix("ctags");
    let cache = LockedCache::builder()
        .cluster(cluster.urls())
        .key_prefix(&prefix)
        .tags(true)
        .tag_refresh(MS(300))
        .build()
        .await
        .unwrap();
    let keys: Vec<String> = (0..30).map(|i| format!("item:{i}")).collect();
    let shards: std::collections::BTreeSet<usize> = keys
        .iter()
        .map(|k| {
            let slot: i64 = cluster
                .live_node()
                .query(&["CLUSTER", "KEYSLOT", &cache.value_key(k)]);
            cluster.primary_of(slot as u16)
        })
        .collect();
    assert_eq!(shards.len(), 3, "the entries span every shard");
    let loads = Arc::new(AtomicU32::new(0));
    for key in &keys {
        assert_eq!(read(&cache, key, "catalog", &loads).await, Outcome::Loaded);
        assert_eq!(read(&cache, key, "catalog", &loads).await, Outcome::Hit);
    }
    cache.invalidate_tag("catalog").await.unwrap();
    for key in &keys {
        assert_eq!(
            read(&cache, key, "catalog", &loads).await,
            Outcome::Loaded,
            "{key}"
        );
    }
    cache.clear().await.unwrap();
    for key in &keys {
        assert_eq!(
            read(&cache, key, "catalog", &loads).await,
            Outcome::Loaded,
            "{key}"
        );
    }
    assert_eq!(loads.load(Ordering::SeqCst), 90);
}

/// Batches honour tags: `get_or_load_many` stores its values with the call's
/// tags, `invalidate_tag` makes them misses for the next batch (and for single
/// calls), and `get_many` does not return invalidated entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_store_and_honour_tags() {
    let server = RedisServer::start();
    let cache = tagged_cache(&server, &unique_prefix("batch_tags"), false).await;
    let tagged = cache.with(CallOptions::new().tag("page"));
    let keys = ["p1", "p2", "p3"];
    let loads = Arc::new(AtomicU32::new(0));
    let batch = |round: u32| {
        let loads = Arc::clone(&loads);
        move |missing: Vec<String>| {
            let loads = Arc::clone(&loads);
            async move {
                loads.fetch_add(missing.len() as u32, Ordering::SeqCst);
                Ok::<_, String>(
                    missing
                        .into_iter()
                        .map(|k| (k.clone(), format!("{k}@{round}")))
                        .collect::<std::collections::HashMap<_, _>>(),
                )
            }
        }
    };
    let first: Vec<Option<String>> = tagged.get_or_load_many(&keys, batch(1)).await.unwrap();
    assert_eq!(first[0].as_deref(), Some("p1@1"));
    let again: Vec<Option<String>> = tagged.get_or_load_many(&keys, batch(2)).await.unwrap();
    assert_eq!(again[2].as_deref(), Some("p3@1"), "hits");
    assert_eq!(loads.load(Ordering::SeqCst), 3);
    cache.invalidate_tag("page").await.unwrap();
    let got: Vec<Option<String>> = cache.get_many(&keys).await.unwrap();
    assert!(
        got.iter().all(Option::is_none),
        "get_many: invalidated is absent: {got:?}"
    );
    let after: Vec<Option<String>> = tagged.get_or_load_many(&keys, batch(3)).await.unwrap();
    assert_eq!(after[1].as_deref(), Some("p2@3"), "reloaded");
    assert_eq!(loads.load(Ordering::SeqCst), 6);
    let single: String = tagged
        .get_or_compute("p1", || async { "single".to_owned() })
        .await
        .unwrap();
    assert_eq!(
        single, "p1@3",
        "a single call hits the batch's tagged value"
    );

    // `with(..).set_many` stores with the call's tags (as `with(..).set`
    // does): invalidating the tag makes its entries absent.
    let written = ["w1", "w2"];
    let entries: Vec<(&str, String)> = written.iter().map(|k| (*k, format!("{k}!"))).collect();
    cache
        .with(CallOptions::new().tag("written"))
        .set_many(&entries)
        .await
        .unwrap();
    let got: Vec<Option<String>> = cache.get_many(&written).await.unwrap();
    assert!(got.iter().all(Option::is_some), "{got:?}");
    cache.invalidate_tag("written").await.unwrap();
    let got: Vec<Option<String>> = cache.get_many(&written).await.unwrap();
    assert!(
        got.iter().all(Option::is_none),
        "set_many ignored the call's tag: {got:?}"
    );
}
