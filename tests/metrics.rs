//! The `metrics` feature: counters mirroring the stats, calls by outcome,
//! histograms and gauges, all labelled with the cache's name, asserted with a
//! capturing recorder (`support/metrics.rs`).
#![cfg(feature = "metrics")]

#[path = "support/metrics.rs"]
mod metrics_capture;
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use locked_cache::{LockedCache, Outcome};
use support::{RedisServer, counting, eventually, join_all_checked, unique_prefix};
use tokio::sync::oneshot;

#[tokio::test]
async fn calls_counters_histograms_and_gauges_are_recorded_under_the_cache_name() {
    let recorder = metrics_capture::recorder();
    let server = RedisServer::start();
    let name = "metrics-stampede";
    let cache = LockedCache::builder()
        .redis(server.url())
        .name(name)
        .key_prefix(unique_prefix("metrics"))
        .build()
        .await
        .unwrap();
    let label = [("cache", name)];

    // A leader whose loader waits for a signal, and 5 followers.
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let runs = Arc::new(AtomicU32::new(0));
    let leader = {
        let (cache, runs) = (cache.clone(), Arc::clone(&runs));
        tokio::spawn(async move {
            cache
                .get_or_load_with_outcome("k", |_| async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    go_rx.await.unwrap();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok::<_, String>("v".to_owned())
                })
                .await
                .unwrap()
        })
    };
    assert!(
        eventually(Duration::from_secs(2), || async {
            runs.load(Ordering::SeqCst) == 1
        })
        .await
    );
    let followers: Vec<_> = (0..5)
        .map(|_| {
            let (cache, runs) = (cache.clone(), Arc::clone(&runs));
            tokio::spawn(async move {
                cache
                    .get_or_load_with_outcome("k", |_| counting(&runs, "never")())
                    .await
                    .unwrap()
            })
        })
        .collect();
    // While the load runs: one load in flight, five waiters.
    assert!(
        eventually(Duration::from_secs(2), || async {
            recorder.gauge("locked_cache_waiters", &label) == Some(5.0)
        })
        .await,
        "waiters gauge: {:?}",
        recorder.gauge("locked_cache_waiters", &label)
    );
    assert_eq!(
        recorder.gauge("locked_cache_loads_in_flight", &label),
        Some(1.0)
    );
    go_tx.send(()).unwrap();
    assert_eq!(leader.await.unwrap().1, Outcome::Loaded);
    for (_, outcome) in join_all_checked(followers).await {
        assert_eq!(outcome, Outcome::Coalesced);
    }
    let (_, hit) = cache
        .get_or_load_with_outcome("k", |_| counting(&runs, "never")())
        .await
        .unwrap();
    assert_eq!(hit, Outcome::Hit);
    let failed = cache
        .get_or_load("bad", || async { Err::<String, _>("db down".to_owned()) })
        .await;
    assert!(failed.is_err());

    let calls = |outcome| {
        recorder.counter(
            "locked_cache_calls_total",
            &[("cache", name), ("outcome", outcome)],
        )
    };
    assert_eq!(
        [
            calls("loaded"),
            calls("coalesced"),
            calls("hit"),
            calls("error"),
            calls("waited")
        ],
        [1, 5, 1, 1, 0]
    );
    // Counters mirror the stats exactly.
    let stats = cache.stats();
    let counter = |n: &str| recorder.counter(&format!("locked_cache_{n}_total"), &label);
    assert_eq!(counter("hits"), stats.hits);
    assert_eq!(counter("misses"), stats.misses);
    assert_eq!(counter("loads"), stats.loads);
    assert_eq!(counter("load_errors"), stats.load_errors);
    assert_eq!(counter("coalesced"), stats.coalesced);
    assert_eq!(counter("lock_attempts"), stats.lock_attempts);
    assert_eq!(
        (stats.hits, stats.misses, stats.loads, stats.coalesced),
        (1, 2, 2, 5)
    );

    let loads = recorder.histogram("locked_cache_load_seconds", &label);
    assert_eq!(loads.len(), 2, "{loads:?}");
    assert!(loads.iter().any(|&s| s >= 0.02), "{loads:?}");
    let to_value = recorder.histogram("locked_cache_time_to_value_seconds", &label);
    assert_eq!(to_value.len(), 5, "one per coalesced call: {to_value:?}");
    assert!(to_value.iter().all(|&s| s >= 0.02), "{to_value:?}");
    assert_eq!(
        recorder
            .histogram("locked_cache_wait_seconds", &label)
            .len(),
        5
    );
    assert_eq!(
        recorder
            .histogram("locked_cache_lock_acquire_seconds", &label)
            .len(),
        2
    );
    // Back to idle.
    assert_eq!(recorder.gauge("locked_cache_waiters", &label), Some(0.0));
    assert_eq!(
        recorder.gauge("locked_cache_loads_in_flight", &label),
        Some(0.0)
    );
    // The wake-up subscription to the one master (sampled every second).
    assert!(
        eventually(Duration::from_secs(3), || async {
            recorder.gauge("locked_cache_subscribed_masters", &label) == Some(1.0)
        })
        .await
    );
    // Labels stay low-cardinality: only the cache name and the outcome.
    for series in recorder.series_with("cache", name) {
        let labels = series.split_once('{').unwrap().1;
        for label in labels.trim_end_matches('}').split(',') {
            let key = label.split('=').next().unwrap();
            assert!(key == "cache" || key == "outcome", "{series}");
        }
    }
}

#[tokio::test]
async fn a_waiter_in_another_process_counts_waited_and_its_time_to_value() {
    let recorder = metrics_capture::recorder();
    let server = RedisServer::start();
    let prefix = unique_prefix("metrics-waited");
    let build = |name: &'static str| {
        LockedCache::builder()
            .redis(server.url())
            .name(name)
            .key_prefix(prefix.clone())
            .build()
    };
    let holder = build("metrics-holder").await.unwrap();
    let waiter = build("metrics-waiter").await.unwrap();
    let holding = holder.get_or_load("k", || async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok::<_, String>(1_u32)
    });
    let waiting = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        waiter
            .get_or_load_with_outcome("k", |_| async { Ok::<_, String>(2_u32) })
            .await
    };
    let (held, waited) = tokio::join!(holding, waiting);
    assert_eq!(held.unwrap(), 1);
    assert_eq!(waited.unwrap(), (1, Outcome::Waited));
    let label = [("cache", "metrics-waiter")];
    assert_eq!(
        recorder.counter(
            "locked_cache_calls_total",
            &[("cache", "metrics-waiter"), ("outcome", "waited")]
        ),
        1
    );
    assert_eq!(
        recorder.counter("locked_cache_found_while_waiting_total", &label),
        1
    );
    assert_eq!(recorder.counter("locked_cache_hits_total", &label), 0);
    let waits = recorder.histogram("locked_cache_wait_seconds", &label);
    assert_eq!(waits.len(), 1);
    assert!((0.05..2.0).contains(&waits[0]), "{waits:?}");
    let to_value = recorder.histogram("locked_cache_time_to_value_seconds", &label);
    assert_eq!(to_value.len(), 1);
    assert!(to_value[0] >= waits[0], "{to_value:?} {waits:?}");
}
