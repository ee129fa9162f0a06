//! Telemetry: the per-call outcome, the `get_or_load` span and its children
//! (OpenTelemetry database field names, a hashed key, never the raw key), the
//! DEBUG event of a call waiting on a crashed holder, stats semantics (a miss
//! that finds the value while waiting is not also a hit), `Debug` of a cache,
//! and (feature `metrics`) the metrics, with a capturing recorder.

#[path = "support/spans.rs"]
mod spans;
mod support;

use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::{Duration, Instant};

use locked_cache::{LoadError, LockedCache, Outcome};
use spans::capture_spans;
use support::{RedisServer, counting, counting_loader, join_all_checked, unique_prefix};

async fn cache_on(server: &RedisServer, test: &str) -> LockedCache {
    LockedCache::builder()
        .redis(server.url())
        .key_prefix(unique_prefix(test))
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn each_call_tells_how_it_was_served_hit_loaded_or_coalesced() {
    let server = RedisServer::start();
    let cache = cache_on(&server, "outcome").await;
    let runs = Arc::new(AtomicU32::new(0));
    let loader = counting_loader(&runs, Duration::from_millis(100), "v".to_owned());
    let first = cache.get_or_load_with_outcome("k", |_| loader());
    let followers = (0..3).map(|_| {
        let loader = counting(&runs, "never");
        cache.get_or_load_with_outcome("k", |_| loader())
    });
    let (first, followers) = tokio::join!(first, futures_util::future::join_all(followers));
    assert_eq!(first.unwrap(), ("v".to_owned(), Outcome::Loaded));
    for follower in followers {
        assert_eq!(follower.unwrap(), ("v".to_owned(), Outcome::Coalesced));
    }
    let again = cache
        .get_or_load_with_outcome("k", |_| counting(&runs, "never")())
        .await
        .unwrap();
    assert_eq!(again, ("v".to_owned(), Outcome::Hit));
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
    let stats = cache.stats();
    assert_eq!(
        (stats.hits, stats.misses, stats.coalesced, stats.loads),
        (1, 1, 3, 1),
        "{stats:?}"
    );
    assert_eq!(stats.hit_ratio(), Some(0.5));
}

#[tokio::test(flavor = "current_thread")]
async fn a_miss_that_finds_the_value_while_waiting_is_waited_not_a_hit() {
    let server = RedisServer::start();
    let prefix = unique_prefix("waited");
    let build = || {
        LockedCache::builder()
            .redis(server.url())
            .key_prefix(prefix.clone())
            .build()
    };
    // Two caches: two processes as far as coalescing goes.
    let (holder, waiter) = (build().await.unwrap(), build().await.unwrap());
    let (spans, _guard) = capture_spans();
    let runs = Arc::new(AtomicU32::new(0));
    let slow = counting_loader(&runs, Duration::from_millis(300), "v".to_owned());
    let holding = holder.get_or_load_with_outcome("k", |_| slow());
    let waiting = async {
        // Start once the holder has the lock.
        tokio::time::sleep(Duration::from_millis(100)).await;
        waiter
            .get_or_load_with_outcome("k", |_| counting(&runs, "never")())
            .await
    };
    let (held, waited) = tokio::join!(holding, waiting);
    assert_eq!(held.unwrap().1, Outcome::Loaded);
    assert_eq!(waited.unwrap(), ("v".to_owned(), Outcome::Waited));
    let stats = waiter.stats();
    assert_eq!(
        (
            stats.hits,
            stats.misses,
            stats.found_while_waiting,
            stats.loads
        ),
        (0, 1, 1, 0),
        "a miss that waited counts once: {stats:?}"
    );
    assert!(stats.lock_attempts >= 1);
    let calls = spans.named("get_or_load");
    assert_eq!(calls.len(), 2);
    let waited = calls
        .iter()
        .find(|s| s.field("locked_cache.outcome") == Some("waited"))
        .expect("a waited span");
    let wait_ms: f64 = waited
        .field("locked_cache.wait_ms")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (100.0..1000.0).contains(&wait_ms),
        "waited ~200 ms for the holder: {wait_ms}"
    );
    assert!(
        waited
            .field("locked_cache.lock_attempts")
            .unwrap()
            .parse::<u32>()
            .unwrap()
            >= 1
    );
}

#[tokio::test(flavor = "current_thread")]
async fn spans_carry_otel_db_fields_a_key_hash_and_never_the_raw_key() {
    let server = RedisServer::start();
    let cache = LockedCache::builder()
        .redis(server.url())
        .name("users")
        .key_prefix(unique_prefix("spans"))
        .build()
        .await
        .unwrap();
    let (spans, _guard) = capture_spans();
    let secret = "user:alice@example.com";
    let runs = Arc::new(AtomicU32::new(0));
    let value: String = cache
        .get_or_load(secret, counting(&runs, "v"))
        .await
        .unwrap();
    assert_eq!(value, "v");
    let _: String = cache
        .get_or_load(secret, counting(&runs, "v"))
        .await
        .unwrap();
    let failed = cache
        .get_or_load("other", || async {
            Err::<String, _>(std::io::Error::other("db down"))
        })
        .await;
    assert!(matches!(failed, Err(LoadError::Loader(_))));

    let calls = spans.named("get_or_load");
    assert_eq!(calls.len(), 3, "{calls:#?}");
    let outcomes: Vec<_> = calls
        .iter()
        .map(|s| s.field("locked_cache.outcome"))
        .collect();
    assert_eq!(outcomes, [Some("loaded"), Some("hit"), Some("error")]);
    for call in &calls {
        assert_eq!(call.level, tracing::Level::INFO);
        assert_eq!(call.field("db.system"), Some("redis"));
        assert_eq!(call.field("db.operation.name"), Some("get_or_load"));
        assert_eq!(call.field("otel.kind"), Some("client"));
        assert_eq!(call.field("locked_cache.name"), Some("users"));
        let hash = call.field("locked_cache.key_hash").unwrap();
        assert_eq!(hash.len(), 16, "{hash}");
        assert!(hash.chars().all(|c| c.is_ascii_hexdigit()), "{hash}");
        assert!(call.closed, "the span ended with the call");
    }
    assert_eq!(
        calls[0].field("locked_cache.key_hash"),
        calls[1].field("locked_cache.key_hash")
    );
    assert_ne!(
        calls[0].field("locked_cache.key_hash"),
        calls[2].field("locked_cache.key_hash")
    );
    assert_eq!(
        calls[1].field("locked_cache.wait_ms"),
        None,
        "a hit does not wait"
    );
    assert_eq!(calls[2].field("otel.status_code"), Some("ERROR"));
    assert_eq!(calls[2].field("error.type"), Some("loader"));
    assert_eq!(calls[0].field("otel.status_code"), None);

    // The loaded call's children: lock, load, store, with their results.
    let loaded = spans.index_of("get_or_load", 0);
    assert_eq!(spans.children(loaded), ["lock", "load", "store"]);
    let lock = &spans.named("lock")[0];
    assert_eq!(lock.field("locked_cache.lock_result"), Some("acquired"));
    assert_eq!(lock.field("locked_cache.lock_attempts"), Some("1"));
    assert_eq!(lock.field("db.system"), Some("redis"));
    assert_eq!(
        spans.named("load")[0].field("locked_cache.lock_lost"),
        Some("false")
    );
    assert_eq!(
        spans.named("store")[0].field("locked_cache.store_result"),
        Some("stored")
    );
    // The hit has no children: one read.
    assert!(spans.children(spans.index_of("get_or_load", 1)).is_empty());

    let everything = spans.all_text();
    assert!(
        !everything.contains("alice"),
        "the raw key leaked:\n{everything}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_waiter_on_a_crashed_holder_says_at_debug_what_it_waits_for() {
    let server = RedisServer::start();
    let expiry = Duration::from_millis(600);
    let cache = LockedCache::builder()
        .redis(server.url())
        .key_prefix(unique_prefix("crashed"))
        .lock_expiry(expiry)
        .wait_time(Duration::from_secs(3))
        .build()
        .await
        .unwrap();
    // A holder that took the lock and died: nobody extends or releases it.
    let guard = cache
        .lock()
        .try_acquire(&cache.lock_key("report:secret"), expiry)
        .await
        .unwrap()
        .expect("the lock is free");
    // Its watchdog must not keep the lock alive either.
    let mut guard = guard;
    guard.stop_watchdog();
    std::mem::forget(guard);
    let (spans, _guard) = capture_spans();
    let started = Instant::now();
    let runs = Arc::new(AtomicU32::new(0));
    let (value, outcome) = cache
        .get_or_load_with_outcome("report:secret", |_| counting(&runs, "v")())
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!((value.as_str(), outcome), ("v", Outcome::Loaded));
    assert!(
        took >= expiry / 2,
        "it waited for the dead holder's lock: {took:?}"
    );

    let waits: Vec<_> = spans
        .events()
        .into_iter()
        .filter(|e| {
            e.level == tracing::Level::DEBUG && e.message().starts_with("waiting for the lock")
        })
        .collect();
    assert!(
        !waits.is_empty(),
        "no DEBUG event while waiting: {:#?}",
        spans.events()
    );
    let first = &waits[0];
    assert!(
        first.message().contains("if it crashed"),
        "{}",
        first.message()
    );
    assert_eq!(first.field("lock_expiry_ms"), Some("600.0"));
    assert!(first.field("locked_cache.key_hash").is_some());
    assert!(first.field("wait_left_ms").is_some());
    // Logged in the call's lock span.
    let lock_span = first.span.expect("inside a span");
    assert_eq!(spans.spans()[lock_span].name, "lock");
    // Once, then at most every second: this wait was under a second.
    assert_eq!(waits.len(), 1, "{waits:#?}");
    assert!(!spans.all_text().contains("secret"));
}

#[tokio::test(flavor = "current_thread")]
async fn a_wait_that_runs_out_is_a_timeout_outcome() {
    let server = RedisServer::start();
    let cache = LockedCache::builder()
        .redis(server.url())
        .key_prefix(unique_prefix("timeout"))
        .wait_time(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let guard = cache
        .lock()
        .try_acquire(&cache.lock_key("k"), Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    let (spans, _guard) = capture_spans();
    let runs = Arc::new(AtomicU32::new(0));
    let err = cache
        .get_or_load_with_outcome("k", |_| counting(&runs, "v")())
        .await
        .unwrap_err();
    assert!(err.cache_error().unwrap().is_timeout(), "{err}");
    let call = &spans.named("get_or_load")[0];
    assert_eq!(call.field("locked_cache.outcome"), Some("timeout"));
    assert_eq!(call.field("error.type"), Some("lock_timeout"));
    assert_eq!(call.field("otel.status_code"), Some("ERROR"));
    assert_eq!(
        spans.named("lock")[0].field("locked_cache.lock_result"),
        Some("timeout")
    );
    guard.release().await.unwrap();
}

#[tokio::test]
async fn debug_shows_the_configuration_not_the_internals() {
    let server = RedisServer::start();
    let url = server.url().replace("redis://", "redis://:hunter2@");
    let cache = LockedCache::builder()
        .redis(&url)
        .name("reports")
        .ttl(Duration::from_secs(300))
        .build()
        .await
        .unwrap();
    let debug = format!("{cache:?}");
    for expected in [
        "name: \"reports\"",
        "ttl: 300s",
        "lock_expiry: 800ms",
        "wait_time: 10s",
        "quorum_loss: FailClosed",
        "key_prefix: \"lc:\"",
        "BincodeCodec",
    ] {
        assert!(debug.contains(expected), "{expected} missing from {debug}");
    }
    assert!(!debug.contains("hunter2"), "{debug}");
    assert!(
        !debug.contains("Health") && !debug.contains("registry"),
        "{debug}"
    );
    assert!(debug.len() < 700, "{} bytes: {debug}", debug.len());
}

#[tokio::test]
async fn the_stats_snapshot_serialises_with_serde() {
    let server = RedisServer::start();
    let cache = cache_on(&server, "serde").await;
    let runs = Arc::new(AtomicU32::new(0));
    let _: String = cache.get_or_load("k", counting(&runs, "v")).await.unwrap();
    let json = serde_json::to_value(cache.stats()).unwrap();
    assert_eq!(json["loads"], 1);
    assert_eq!(json["misses"], 1);
    assert_eq!(json["hits"], 0);
    assert!(json.get("found_while_waiting").is_some(), "{json}");
}

#[tokio::test]
async fn many_waiters_in_many_tasks_are_all_served() {
    // The spans' bookkeeping must not change behaviour under concurrency.
    let server = RedisServer::start();
    let cache = cache_on(&server, "tasks").await;
    let runs = Arc::new(AtomicU32::new(0));
    let handles = (0..50)
        .map(|_| {
            let (cache, runs) = (cache.clone(), Arc::clone(&runs));
            tokio::spawn(async move {
                cache
                    .get_or_load_with_outcome("k", |_| {
                        counting_loader(&runs, Duration::from_millis(50), 7_u32)()
                    })
                    .await
                    .unwrap()
            })
        })
        .collect();
    let results = join_all_checked(handles).await;
    let loaded = results
        .iter()
        .filter(|(_, o)| *o == Outcome::Loaded)
        .count();
    assert_eq!(loaded, 1);
    assert!(results.iter().all(|(v, _)| *v == 7));
}
