//! Soft and hard expiry against real Redis: stale-while-revalidate (one refresh
//! per key across caches, served at once, fenced), fail-safe, early refresh,
//! negative caching, per-call TTL and jitter, hard timeouts, detached loads, and
//! values of the previous stored format.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::support::{RedisServer, counting_loader, eventually, join_all_checked, unique_prefix};
use locked_cache::{CallOptions, Error, LoadError, LockedCache, Outcome};

const MS: fn(u64) -> Duration = Duration::from_millis;

async fn cache_on(server: &RedisServer, prefix: &str) -> LockedCache {
    LockedCache::builder()
        .redis(server.url())
        .key_prefix(prefix)
        .build()
        .await
        .expect("build")
}

/// Several caches (one per "process") on one server, sharing a prefix.
async fn caches_on(server: &RedisServer, prefix: &str, n: usize) -> Vec<LockedCache> {
    let mut caches = Vec::new();
    for _ in 0..n {
        caches.push(cache_on(server, prefix).await);
    }
    caches
}

/// A cache on `server` under `prefix` whose calls have `ttl` and `options`.
async fn swr_cache(
    server: &RedisServer,
    prefix: &str,
    ttl: Duration,
    options: CallOptions,
) -> LockedCache {
    LockedCache::builder()
        .redis(server.url())
        .key_prefix(prefix)
        .ttl(ttl)
        .call_options(options)
        .build()
        .await
        .expect("build")
}

/// Loads `value` through `cache` with `options`, with a loader that must run.
async fn prime(cache: &LockedCache, options: CallOptions, key: &str, value: &str) {
    let value = value.to_owned();
    let (v, outcome) = cache
        .with(options)
        .get_or_load_with_outcome(key, move |_| async move { Ok::<_, String>(value) })
        .await
        .expect("prime");
    assert_eq!(outcome, Outcome::Loaded, "{v}");
}

/// At an expiry with a stale window, 3 caches x 10 callers all get the old
/// value at once (none waits for the 1.5 s refresh), exactly one refresh runs
/// across the caches, and the new value replaces the old one when it is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_value_is_served_at_once_while_one_refresh_runs_across_caches() {
    let server = RedisServer::start();
    let prefix = unique_prefix("swr");
    let caches = caches_on(&server, &prefix, 3).await;
    let options = CallOptions::new()
        .ttl(MS(300))
        .stale_for(Duration::from_secs(30));
    prime(&caches[0], options, "k", "old").await;
    tokio::time::sleep(MS(400)).await; // Past the TTL, inside the window.

    let runs = Arc::new(AtomicU32::new(0));
    let mut calls = Vec::new();
    for i in 0..30 {
        let cache = caches[i % 3].clone();
        let loader = counting_loader(&runs, MS(1500), "new".to_owned());
        calls.push(tokio::spawn(async move {
            let began = Instant::now();
            let (value, outcome) = cache
                .with(options)
                .get_or_load_with_outcome("k", |_| loader())
                .await
                .expect("call");
            (value, outcome, began.elapsed())
        }));
    }
    let results = join_all_checked(calls).await;
    for (value, outcome, took) in &results {
        assert_eq!(value, "old");
        assert!(
            matches!(outcome, Outcome::Stale | Outcome::Coalesced),
            "{outcome:?}"
        );
        // Far below the refresh's 1.5 s: nobody waited for it.
        assert!(*took < MS(1000), "a caller waited {took:?}");
    }
    let new_seen = eventually(Duration::from_secs(5), || async {
        caches[1].get::<String>("k").await.unwrap().as_deref() == Some("new")
    })
    .await;
    assert!(new_seen, "the refresh never stored its value");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "one refresh across 3 caches"
    );
    let refreshes: u64 = caches.iter().map(|c| c.stats().refreshes).sum();
    let stale: u64 = caches.iter().map(|c| c.stats().stale_served).sum();
    assert_eq!(refreshes, 1);
    assert!(
        stale >= 3,
        "each cache's flight leader served it stale: {stale}"
    );
    // Now fresh: a hit, no load.
    let (value, outcome) = caches[2]
        .with(options)
        .get_or_load_with_outcome("k", |_| async { Err::<String, _>("must not load") })
        .await
        .unwrap();
    assert_eq!((value.as_str(), outcome), ("new", Outcome::Hit));
    for cache in &caches {
        assert!(
            eventually(Duration::from_secs(2), || async {
                cache.retained_entries() == 0
            })
            .await
        );
    }
}

/// With a borrowing loader (plain `get_or_load`, cache-wide stale window), the
/// one caller that gets the lock refreshes before it returns; every other
/// caller gets the stale value at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_get_or_load_refreshes_in_the_caller_that_takes_the_lock() {
    let server = RedisServer::start();
    let prefix = unique_prefix("swr-inline");
    let options = CallOptions::new().stale_for(Duration::from_secs(30));
    let mut caches = Vec::new();
    for _ in 0..2 {
        caches.push(swr_cache(&server, &prefix, MS(300), options).await);
    }
    let runs = AtomicU32::new(0);
    let load = |value: &'static str, delay: Duration| {
        let runs = &runs;
        move |_| async move {
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            Ok::<_, String>(value.to_owned())
        }
    };
    caches[0]
        .get_or_load_with_outcome("k", load("old", Duration::ZERO))
        .await
        .unwrap();
    tokio::time::sleep(MS(400)).await;
    let later = |cache: &LockedCache| {
        let cache = cache.clone();
        let load = load("other", MS(600));
        async move {
            tokio::time::sleep(MS(100)).await;
            let began = Instant::now();
            let r = cache.get_or_load_with_outcome("k", load).await;
            (r, began.elapsed())
        }
    };
    let (a, b, c) = tokio::join!(
        caches[0].get_or_load_with_outcome("k", load("new", MS(600))),
        later(&caches[1]),
        // In the refreshing caller's own process too.
        later(&caches[0]),
    );
    assert_eq!(a.unwrap(), ("new".to_owned(), Outcome::Loaded));
    for (other, took) in [b, c] {
        assert_eq!(other.unwrap(), ("old".to_owned(), Outcome::Stale));
        assert!(took < MS(400), "another caller waited {took:?}");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2, "the prime and one refresh");
    for cache in &caches {
        assert!(
            eventually(Duration::from_secs(2), || async {
                cache.retained_entries() == 0
            })
            .await
        );
    }
}

/// A background refresh is fenced: a `set` while it runs wins, and the
/// refresh's value is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_never_overwrites_a_newer_set() {
    let server = RedisServer::start();
    let cache = cache_on(&server, &unique_prefix("swr-fence")).await;
    let options = CallOptions::new()
        .ttl(MS(200))
        .stale_for(Duration::from_secs(30));
    prime(&cache, options, "k", "old").await;
    tokio::time::sleep(MS(300)).await;
    let runs = Arc::new(AtomicU32::new(0));
    let loader = counting_loader(&runs, MS(500), "refreshed".to_owned());
    let (value, outcome) = cache
        .with(options)
        .get_or_load_with_outcome("k", |_| loader())
        .await
        .unwrap();
    assert_eq!((value.as_str(), outcome), ("old", Outcome::Stale));
    assert!(eventually(MS(1000), || async { runs.load(Ordering::SeqCst) == 1 }).await);
    cache
        .set("k", &"set while refreshing".to_owned())
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(3), || async {
            cache.stats().writes_refused == 1
        })
        .await
    );
    assert_eq!(
        cache.get::<String>("k").await.unwrap().as_deref(),
        Some("set while refreshing")
    );
}

/// Fail-safe: a refresh that fails, panics or passes its soft timeout gives the
/// caller the stale value (counted), or the error with fail-safe off; in the
/// background, the failure is counted and the stale value stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_refresh_serves_the_stale_value_fail_safe() {
    let server = RedisServer::start();
    let prefix = unique_prefix("fail-safe");
    let swr = CallOptions::new().stale_for(Duration::from_secs(30));
    let cache = swr_cache(&server, &prefix, MS(200), swr).await;
    let ok = |v: &'static str| move |_| async move { Ok::<_, String>(v.to_owned()) };
    cache
        .get_or_load_with_outcome("k", ok("old"))
        .await
        .unwrap();
    tokio::time::sleep(MS(300)).await;

    // Loader error, inline: the stale value, as FailSafe.
    let served = cache
        .get_or_load_with_outcome("k", |_| async { Err::<String, _>("db down".to_owned()) })
        .await
        .unwrap();
    assert_eq!(served, ("old".to_owned(), Outcome::FailSafe));
    assert_eq!(cache.stats().fail_safe_served, 1);

    // A `with` call whose refresh hangs: served at once; the hung refresh is
    // dropped at the background timeout, its lock released.
    let began = Instant::now();
    let served = cache
        .with(CallOptions::new().background_timeout(MS(300)))
        .get_or_load_with_outcome("k", |_| async {
            std::future::pending::<()>().await;
            Ok::<String, String>("never".to_owned())
        })
        .await;
    // A `with` call refreshes in the background: it returns at once, Stale.
    assert_eq!(served.unwrap(), ("old".to_owned(), Outcome::Stale));
    assert!(began.elapsed() < MS(500));
    // The pending background refresh holds the lock; a plain call meanwhile
    // finds it held and serves the stale value too.
    let served = cache
        .get_or_load_with_outcome("k", ok("new"))
        .await
        .unwrap();
    assert_eq!(served, ("old".to_owned(), Outcome::Stale));
    let timed_out = eventually(Duration::from_secs(2), || async {
        cache.stats().background_errors == 1
    })
    .await;
    assert!(timed_out, "the hung refresh was not dropped");
    assert!(began.elapsed() >= MS(300));
    let served = cache
        .get_or_load_with_outcome("k", ok("new"))
        .await
        .unwrap();
    assert_eq!(
        served,
        ("new".to_owned(), Outcome::Loaded),
        "the lock was freed"
    );
    tokio::time::sleep(MS(300)).await; // "new" is stale again.

    // Fail-safe off: the error.
    let other = swr_cache(&server, &prefix, MS(200), swr.fail_safe(false)).await;
    other
        .get_or_load_with_outcome("k2", ok("old"))
        .await
        .unwrap();
    tokio::time::sleep(MS(300)).await;
    let failed = other
        .get_or_load_with_outcome("k2", |_| async { Err::<String, _>("db down".to_owned()) })
        .await;
    assert!(matches!(failed, Err(LoadError::Loader(_))), "{failed:?}");

    // Soft timeout on an inline refresh.
    cache
        .get_or_load_with_outcome("k3", ok("old"))
        .await
        .unwrap();
    tokio::time::sleep(MS(300)).await;
    let slow = swr_cache(&server, &prefix, MS(200), swr.soft_timeout(MS(100))).await;
    let began = Instant::now();
    let served = slow
        .get_or_load_with_outcome("k3", |_| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<_, String>("late".to_owned())
        })
        .await
        .unwrap();
    assert_eq!(served, ("old".to_owned(), Outcome::FailSafe));
    assert!(
        began.elapsed() < Duration::from_secs(2),
        "{:?}",
        began.elapsed()
    );

    // Background failures: counted, the value stays.
    cache
        .get_or_load_with_outcome("k4", ok("old"))
        .await
        .unwrap();
    tokio::time::sleep(MS(300)).await;
    let served = cache
        .with(CallOptions::new())
        .get_or_load_with_outcome("k4", |_| async { Err::<String, _>("db down".to_owned()) })
        .await
        .unwrap();
    assert_eq!(served, ("old".to_owned(), Outcome::Stale));
    // The second background failure (the first was the hung refresh).
    assert!(
        eventually(Duration::from_secs(2), || async {
            cache.stats().background_errors == 2
        })
        .await
    );
    assert_eq!(
        cache.get::<String>("k4").await.unwrap().as_deref(),
        Some("old")
    );
}

/// With the lock masters down (values on their own server), a stale value is
/// still served: nobody can refresh, and nobody gets an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_value_is_served_when_the_lock_is_unavailable() {
    let values = RedisServer::start();
    let mut master = RedisServer::start();
    let cache = LockedCache::builder()
        .redis(master.url())
        .cache_url(values.url())
        .key_prefix(unique_prefix("swr-no-lock"))
        .ttl(MS(200))
        .call_options(CallOptions::new().stale_for(Duration::from_secs(30)))
        .command_timeout(MS(200))
        .connect_timeout(MS(200))
        .build()
        .await
        .unwrap();
    cache
        .get_or_load("k", || async { Ok::<_, String>("old".to_owned()) })
        .await
        .unwrap();
    tokio::time::sleep(MS(300)).await;
    master.kill();
    let served = cache
        .get_or_load_with_outcome("k", |_| async { Ok::<_, String>("new".to_owned()) })
        .await
        .unwrap();
    assert_eq!(served, ("old".to_owned(), Outcome::Stale));
    assert_eq!(cache.stats().loads, 1);
}

/// Early refresh under steady traffic: a key with a 1 s TTL and a 100 ms load
/// is reloaded before it expires, in the background, and no call in 2.6 s sees
/// it stale or missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_refresh_reloads_hot_keys_before_they_expire() {
    let server = RedisServer::start();
    let cache = cache_on(&server, &unique_prefix("xfetch")).await;
    let options = CallOptions::new()
        .ttl(Duration::from_secs(1))
        .early_refresh(true)
        .early_refresh_beta(3.0);
    let runs = Arc::new(AtomicU32::new(0));
    let until = Instant::now() + MS(2600);
    let mut outcomes = Vec::new();
    while Instant::now() < until {
        let loader = counting_loader(&runs, MS(100), "v".to_owned());
        let (_, outcome) = cache
            .with(options)
            .get_or_load_with_outcome("k", |_| loader())
            .await
            .unwrap();
        outcomes.push(outcome);
        tokio::time::sleep(MS(10)).await;
    }
    assert_eq!(outcomes[0], Outcome::Loaded);
    let later: Vec<_> = outcomes[1..]
        .iter()
        .filter(|o| **o != Outcome::Hit)
        .collect();
    assert!(later.is_empty(), "calls after the first: {later:?}");
    let stats = cache.stats();
    assert!(stats.early_refreshes >= 2, "{stats:?}");
    assert!(runs.load(Ordering::SeqCst) >= 3, "reloaded at least twice");
    assert_eq!(
        stats.stale_served + stats.misses,
        1,
        "only the cold miss: {stats:?}"
    );
}

/// A loader's `None` is cached for the negative TTL (and counted as a
/// negative hit); a zero negative TTL does not cache it at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_none_is_cached_for_the_negative_ttl() {
    let server = RedisServer::start();
    let cache = cache_on(&server, &unique_prefix("negative")).await;
    let runs = Arc::new(AtomicU32::new(0));
    let options = CallOptions::new()
        .ttl(Duration::from_secs(60))
        .negative_ttl(MS(300));
    let missing = || counting_loader(&runs, Duration::ZERO, Option::<String>::None);
    for _ in 0..3 {
        let loader = missing();
        let v = cache
            .with(options)
            .get_or_load("user:404", loader)
            .await
            .unwrap();
        assert_eq!(v, None);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(cache.stats().negative_hits, 2);
    let left: i64 = server.query(&["PTTL", &cache.value_key("user:404")]);
    assert!((1..=300).contains(&left), "negative entry lives {left} ms");
    tokio::time::sleep(MS(350)).await;
    let loader = missing();
    cache
        .with(options)
        .get_or_load("user:404", loader)
        .await
        .unwrap();
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "reloaded after the negative TTL"
    );

    // Found values keep the full TTL.
    let found = counting_loader(&runs, Duration::ZERO, Some("Ada".to_owned()));
    cache
        .with(options)
        .get_or_load("user:1", found)
        .await
        .unwrap();
    let left: i64 = server.query(&["PTTL", &cache.value_key("user:1")]);
    assert!(left > 50_000, "{left}");

    // Zero: not cached.
    let uncached = options.negative_ttl(Duration::ZERO);
    for _ in 0..2 {
        let loader = missing();
        cache
            .with(uncached)
            .get_or_load("user:405", loader)
            .await
            .unwrap();
    }
    assert_eq!(runs.load(Ordering::SeqCst), 5);
    assert_eq!(cache.get::<Option<String>>("user:405").await.unwrap(), None);
}

/// Per-call TTL, stale window and jitter set the key's Redis TTL: fresh time
/// (jittered down by up to the fraction) plus the stale window; per-call
/// writes (`set`, `set_many`) take the TTL and window too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_call_ttl_stale_window_and_jitter_set_the_keys_ttl() {
    let server = RedisServer::start();
    let cache = cache_on(&server, &unique_prefix("jitter")).await;
    let options = CallOptions::new()
        .ttl(Duration::from_secs(100))
        .stale_for(Duration::from_secs(50))
        .ttl_jitter(0.5);
    let mut ttls = Vec::new();
    for i in 0..20 {
        let key = format!("k{i}");
        cache
            .with(options)
            .get_or_load(&key, || async { Ok::<_, String>(1u8) })
            .await
            .unwrap();
        let left: i64 = server.query(&["PTTL", &cache.value_key(&key)]);
        ttls.push(left);
    }
    for left in &ttls {
        assert!((99_000..=150_000).contains(left), "{left}");
    }
    let spread = ttls.iter().max().unwrap() - ttls.iter().min().unwrap();
    assert!(spread > 5_000, "expiries not spread: {ttls:?}");
    // `with(..).set` and `with(..).set_many` store the call's TTL and stale
    // window too (no jitter on a write).
    let no_jitter = options.ttl_jitter(0.0);
    cache.with(no_jitter).set("one", &1u8).await.unwrap();
    cache
        .with(no_jitter)
        .set_many(&[("many1", 1u8), ("many2", 2u8)])
        .await
        .unwrap();
    for key in ["one", "many1", "many2"] {
        let left: i64 = server.query(&["PTTL", &cache.value_key(key)]);
        assert!((149_000..=150_000).contains(&left), "{key}: {left}");
    }
    // Plain calls keep the cache's 60 s TTL and no window.
    cache
        .get_or_load("plain", || async { Ok::<_, String>(1u8) })
        .await
        .unwrap();
    let left: i64 = server.query(&["PTTL", &cache.value_key("plain")]);
    assert!((59_000..=60_000).contains(&left), "{left}");
}

/// Freshness is judged from the server's remaining TTL, not from any host's
/// clock: shortening the key's TTL on the server makes the value stale at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freshness_follows_the_servers_ttl_not_a_clock() {
    let server = RedisServer::start();
    let cache = cache_on(&server, &unique_prefix("server-ttl")).await;
    let options = CallOptions::new()
        .ttl(Duration::from_secs(3600))
        .stale_for(Duration::from_secs(600));
    prime(&cache, options, "k", "old").await;
    let must_not_load = |_| async { Err::<String, _>("must not load") };
    let (_, fresh) = cache
        .with(options)
        .get_or_load_with_outcome("k", must_not_load)
        .await
        .unwrap();
    assert_eq!(fresh, Outcome::Hit);
    // 599 s left of a 600 s window: stale by one second, whatever the clocks say.
    let _: i64 = server.query(&["PEXPIRE", &cache.value_key("k"), "599000"]);
    let runs = Arc::new(AtomicU32::new(0));
    let loader = counting_loader(&runs, Duration::ZERO, "new".to_owned());
    let (value, outcome) = cache
        .with(options)
        .get_or_load_with_outcome("k", |_| loader())
        .await
        .unwrap();
    assert_eq!((value.as_str(), outcome), ("old", Outcome::Stale));
    assert!(
        eventually(Duration::from_secs(2), || async {
            runs.load(Ordering::SeqCst) == 1
        })
        .await
    );
    // A call without a stale window does not take the stale value: it loads.
    let (value, outcome) = cache
        .with(CallOptions::new().stale_for(Duration::ZERO))
        .get_or_load_with_outcome("k2", |_| async { Ok::<_, String>("x".to_owned()) })
        .await
        .unwrap();
    assert_eq!((value.as_str(), outcome), ("x", Outcome::Loaded));
}

/// The hard timeout bounds a cold call; a detached load goes on and stores its
/// value, so the next call hits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hard_timeout_bounds_a_cold_call_and_the_detached_load_finishes() {
    let server = RedisServer::start();
    let cache = cache_on(&server, &unique_prefix("hard-timeout")).await;
    let runs = Arc::new(AtomicU32::new(0));
    let loader = counting_loader(&runs, MS(800), "slow".to_owned());
    let began = Instant::now();
    let result = cache
        .with(CallOptions::new().hard_timeout(MS(150)))
        .get_or_load("k", loader)
        .await;
    assert!(
        matches!(result, Err(LoadError::Cache(Error::LoadTimeout { .. }))),
        "{result:?}"
    );
    assert!(result.unwrap_err().cache_error().unwrap().is_timeout());
    assert!(began.elapsed() < MS(600), "{:?}", began.elapsed());
    let stored = eventually(Duration::from_secs(3), || async {
        cache.get::<String>("k").await.unwrap().as_deref() == Some("slow")
    })
    .await;
    assert!(stored, "the detached load did not store its value");
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // Not detached: the load is dropped with the call.
    let loader = counting_loader(&runs, MS(800), "slow".to_owned());
    let result = cache
        .with(CallOptions::new().hard_timeout(MS(150)).detached(false))
        .get_or_load("k2", loader)
        .await;
    assert!(result.is_err());
    tokio::time::sleep(MS(1000)).await;
    assert_eq!(cache.get::<String>("k2").await.unwrap(), None);
}

/// A caller that goes away (its future dropped, as a web framework does when
/// the client disconnects) does not stop a detached load: one load in all,
/// and a caller in another cache that was waiting gets its value. Without
/// detaching, the load is dropped and the waiter loads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_load_outlives_its_cancelled_caller() {
    let server = RedisServer::start();
    let prefix = unique_prefix("detached");
    let caches = caches_on(&server, &prefix, 2).await;
    for (detached, expected_runs) in [(true, 1), (false, 2)] {
        let key = format!("k-{detached}");
        let options = CallOptions::new().detached(detached);
        let runs = Arc::new(AtomicU32::new(0));
        let first = counting_loader(&runs, MS(500), "loaded".to_owned());
        let cancelled =
            tokio::time::timeout(MS(150), caches[0].with(options).get_or_load(&key, first)).await;
        assert!(
            cancelled.is_err(),
            "the first caller should have been cut off"
        );
        let second = counting_loader(&runs, MS(500), "loaded".to_owned());
        let (value, outcome) = caches[1]
            .with(options)
            .get_or_load_with_outcome(&key, |_| second())
            .await
            .unwrap();
        assert_eq!(value, "loaded");
        assert_eq!(
            runs.load(Ordering::SeqCst),
            expected_runs,
            "detached: {detached}"
        );
        let expected = if detached {
            Outcome::Waited
        } else {
            Outcome::Loaded
        };
        assert_eq!(outcome, expected);
    }
}

/// Bytes of the previous stored format (a 4-byte header) read as a miss: the
/// value is reloaded and overwritten in format 2, never mis-decoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_of_the_previous_format_are_reloaded() {
    let server = RedisServer::start();
    let cache = cache_on(&server, &unique_prefix("format-1")).await;
    let key = cache.value_key("k");
    // Format 1: magic, version 1, bincode, then a bincode string "old".
    let mut conn = server.connection().unwrap();
    let v1: Vec<u8> = vec![0xC7, 0x4C, 1, b'b', 3, b'o', b'l', b'd'];
    redis::cmd("SET")
        .arg(&key)
        .arg(&v1)
        .exec(&mut conn)
        .unwrap();
    assert_eq!(cache.get::<String>("k").await.unwrap(), None);
    let v: String = cache
        .get_or_load("k", || async { Ok::<_, String>("reloaded".to_owned()) })
        .await
        .unwrap();
    assert_eq!(v, "reloaded");
    let stored: Vec<u8> = redis::cmd("GET").arg(&key).query(&mut conn).unwrap();
    assert_eq!(stored[2], locked_cache::codec::FORMAT_VERSION);
    assert_eq!(stored[2], 2);
}

/// In one process, a call that accepts no stale value never gets one from a
/// concurrent call that does: they do not share a flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_without_a_stale_window_never_gets_a_stale_value_from_a_concurrent_one() {
    let server = RedisServer::start();
    let cache = cache_on(&server, &unique_prefix("flight-window")).await;
    let swr = CallOptions::new()
        .ttl(MS(200))
        .stale_for(Duration::from_secs(30));
    prime(&cache, swr, "k", "old").await;
    tokio::time::sleep(MS(300)).await;
    let slow_refresh = || async {
        tokio::time::sleep(MS(300)).await;
        Ok::<_, String>("new".to_owned())
    };
    let with_swr = cache.with(swr);
    let strict_options = cache.with(CallOptions::new().stale_for(Duration::ZERO));
    let (stale, strict) = tokio::join!(
        with_swr.get_or_load_with_outcome("k", move |_| slow_refresh()),
        async {
            tokio::time::sleep(MS(20)).await;
            strict_options
                .get_or_load_with_outcome("k", |_| async { Ok::<_, String>("strict".to_owned()) })
                .await
        }
    );
    assert_eq!(stale.unwrap(), ("old".to_owned(), Outcome::Stale));
    let (value, outcome) = strict.unwrap();
    assert_ne!(
        value, "old",
        "a strict call got the stale value ({outcome:?})"
    );
}

/// A detached load's panic reaches its caller, as a plain loader's would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_loaders_panic_reaches_its_caller() {
    let server = RedisServer::start();
    let cache = cache_on(&server, &unique_prefix("detached-panic")).await;
    let call = {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .with(CallOptions::new())
                .get_or_load("k", || async {
                    if true {
                        panic!("the loader blew up");
                    }
                    Ok::<String, String>(String::new())
                })
                .await
        })
    };
    let joined = call.await;
    let panic = joined.expect_err("the caller should have panicked");
    assert!(panic.is_panic());
    // The lock is free: the next call loads.
    let v: String = cache
        .with(CallOptions::new())
        .get_or_load("k", || async { Ok::<_, String>("after".to_owned()) })
        .await
        .unwrap();
    assert_eq!(v, "after");
    assert!(
        eventually(Duration::from_secs(2), || async {
            cache.retained_entries() == 0
        })
        .await
    );
}

/// Nothing is kept per key once calls end, with stale windows, early refresh
/// and detached loads: 100,000 distinct keys (embedded store), loaded, then
/// read stale (a background refresh each), leave 0 entries behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_entry_is_kept_per_key_after_100_000_keys_with_refreshes() {
    let cache = LockedCache::builder().build().await.unwrap();
    // A stale window far longer than a round can take (a round took 26 s in a
    // debug build under CI, and longer on a loaded machine): every round-1
    // value is still stale, not too stale, when round 2 reads it.
    let options = CallOptions::new()
        .ttl(MS(200))
        .stale_for(Duration::from_secs(3600))
        .early_refresh(true);
    let keys: Vec<String> = (0..100_000).map(|i| format!("k{i}")).collect();
    for round in 0..2 {
        for chunk in keys.chunks(1_000) {
            let calls: Vec<_> = chunk
                .iter()
                .map(|key| {
                    let (cache, key) = (cache.clone(), key.clone());
                    tokio::spawn(async move {
                        cache
                            .with(options)
                            .get_or_load(&key, move || async move { Ok::<_, String>(round) })
                            .await
                            .unwrap()
                    })
                })
                .collect();
            join_all_checked(calls).await;
        }
        tokio::time::sleep(MS(300)).await; // Every value stale for round 2.
    }
    let stats = cache.stats();
    assert!(stats.refreshes >= 90_000, "{stats:?}");
    let drained = eventually(Duration::from_secs(10), || async {
        cache.retained_entries() == 0
    })
    .await;
    assert!(drained, "{} entries left", cache.retained_entries());
}

/// Every value kind takes every option the same way: an owned value, a shared
/// `Arc` and bytes, each through `with(options)`, are served stale at once
/// while one background refresh runs, detach their load from a caller that
/// goes away, and the infallible form and `LoadContext::current()` work in
/// each. The deprecated `get_or_load_with` still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_value_kind_takes_every_option() {
    let server = RedisServer::start();
    let prefix = unique_prefix("kinds");
    let cache = cache_on(&server, &prefix).await;
    let options = CallOptions::new()
        .ttl(MS(300))
        .stale_for(Duration::from_secs(30));
    let with = cache.with(options);
    let loads = Arc::new(AtomicU32::new(0));
    let counted = |value: &'static str| {
        let loads = Arc::clone(&loads);
        move || async move {
            loads.fetch_add(1, Ordering::SeqCst);
            let context = locked_cache::LoadContext::current().expect("inside a loader");
            assert!(context.fencing_token().is_some() && !context.is_lock_lost());
            Ok::<_, String>(value.to_owned())
        }
    };
    // Prime each kind, then let them go stale.
    let owned: String = with.get_or_load("owned", counted("o1")).await.unwrap();
    let shared = with
        .get_or_load_shared("shared", counted("s1"))
        .await
        .unwrap();
    let bytes_loads = Arc::clone(&loads);
    let bytes = with
        .get_or_load_bytes("bytes", move || async move {
            bytes_loads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, String>(b"b1".to_vec())
        })
        .await
        .unwrap();
    assert_eq!(
        (owned.as_str(), shared.as_str(), &bytes[..]),
        ("o1", "s1", &b"b1"[..])
    );
    assert_eq!(loads.load(Ordering::SeqCst), 3);
    tokio::time::sleep(MS(400)).await;

    // Stale: served at once, the refresh in the background.
    let (owned, o) = with
        .get_or_load_with_outcome("owned", |_| async { Ok::<_, String>("o2".to_owned()) })
        .await
        .unwrap();
    let (shared, s) = with
        .get_or_load_shared_with_outcome("shared", |_| async { Ok::<_, String>("s2".to_owned()) })
        .await
        .unwrap();
    let (bytes, b) = with
        .get_or_load_bytes_with_outcome("bytes", |_| async { Ok::<_, String>(b"b2".to_vec()) })
        .await
        .unwrap();
    assert_eq!((o, s, b), (Outcome::Stale, Outcome::Stale, Outcome::Stale));
    assert_eq!(
        (owned.as_str(), shared.as_str(), &bytes[..]),
        ("o1", "s1", &b"b1"[..])
    );
    assert!(
        eventually(Duration::from_secs(3), || async {
            cache.get::<String>("owned").await.unwrap().as_deref() == Some("o2")
                && cache.get::<String>("shared").await.unwrap().as_deref() == Some("s2")
                && cache.get_bytes("bytes").await.unwrap().as_deref() == Some(&b"b2"[..])
        })
        .await,
        "each kind's refresh stored its value"
    );

    // Detached: a caller that goes away at once still gets the value stored.
    for (i, kind) in ["owned", "shared", "bytes"].into_iter().enumerate() {
        let key = format!("detached:{kind}");
        let slow = || async {
            tokio::time::sleep(MS(200)).await;
            Ok::<_, String>("late".to_owned())
        };
        let call = async {
            match i {
                0 => drop(with.get_or_load::<String, _, _, _>(&key, slow).await),
                1 => drop(with.get_or_load_shared::<String, _, _, _>(&key, slow).await),
                _ => drop(
                    with.get_or_load_bytes(&key, || async {
                        tokio::time::sleep(MS(200)).await;
                        Ok::<_, String>(b"late".to_vec())
                    })
                    .await,
                ),
            }
        };
        assert!(tokio::time::timeout(MS(50), call).await.is_err(), "{kind}");
        assert!(
            eventually(Duration::from_secs(3), || async {
                server
                    .try_query::<Option<Vec<u8>>>(&["GET", &cache.value_key(&key)])
                    .ok()
                    .flatten()
                    .is_some()
            })
            .await,
            "the detached {kind} load stored its value"
        );
    }

    // The infallible form, plain and with options.
    let n: u32 = cache
        .get_or_compute("compute", || async { 7 })
        .await
        .unwrap();
    let m: u32 = with
        .get_or_compute("compute2", || async { 8 })
        .await
        .unwrap();
    assert_eq!((n, m), (7, 8));
    let invalid = cache
        .get_or_compute("", || async { 1_u32 })
        .await
        .unwrap_err();
    assert!(invalid.is_invalid_input(), "{invalid}");

    // The deprecated context-taking calls still work for this release.
    #[allow(deprecated)]
    let token = cache
        .get_or_load_with("old-api", |ctx| async move {
            Ok::<_, String>(ctx.fencing_token())
        })
        .await
        .unwrap();
    assert!(token.is_some());
    #[allow(deprecated)]
    let token = with
        .get_or_load_with("old-api-with", |ctx| async move {
            Ok::<_, String>(ctx.fencing_token())
        })
        .await
        .unwrap();
    assert!(token.is_some());
}
