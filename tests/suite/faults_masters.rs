//! Fault: Redlock masters die. Three real redis-server masters; one SIGKILLed in
//! the middle of a stampede (not the first: values live on the first master),
//! two down (no majority) under both quorum-loss policies, and the value master
//! itself down.

use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::support::{Fleet, join_all_checked, unique_prefix};
use locked_cache::{Builder, Error, LoadError, LockedCache, QuorumLossPolicy};
use tokio::sync::Notify;

const MINUTE: Duration = Duration::from_secs(60);
const TIMEOUT: Duration = Duration::from_millis(300);

fn builder(fleet: &Fleet, prefix: &str) -> Builder {
    LockedCache::builder()
        .masters(fleet.urls())
        .key_prefix(prefix)
        .ttl(MINUTE)
        .lock_expiry(Duration::from_millis(600))
        .retry_time(Duration::from_millis(50))
        .connect_timeout(TIMEOUT)
        .command_timeout(TIMEOUT)
}

/// A loader that counts its runs, says when it started, and takes `delay`.
fn loader(
    runs: &Arc<AtomicU32>,
    started: &Arc<Notify>,
    delay: Duration,
) -> impl FnOnce() -> std::pin::Pin<Box<dyn Future<Output = Result<String, String>> + Send>> + use<>
{
    let (runs, started) = (Arc::clone(runs), Arc::clone(started));
    move || {
        Box::pin(async move {
            runs.fetch_add(1, Ordering::SeqCst);
            started.notify_one();
            tokio::time::sleep(delay).await;
            Ok("fresh".to_owned())
        })
    }
}

type Call = tokio::task::JoinHandle<Result<String, LoadError<String>>>;

/// 3 masters, 3 caches (standing in for 3 processes) and 180 callers on one cold
/// key. Master 2 is SIGKILLed while the loader runs, with 120 callers waiting and
/// 60 more arriving after the kill: every call succeeds, the loader runs once,
/// and the lock is not lost: the load (900 ms) outlasts the lock expiry (600 ms),
/// and the keep-alive still extends it on 2 of 3 masters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_three_masters_sigkilled_mid_stampede_every_call_succeeds_and_loads_once() {
    let mut fleet = Fleet::start(3);
    let prefix = unique_prefix("masterloss");
    let mut caches = Vec::new();
    for _ in 0..3 {
        caches.push(
            builder(&fleet, &prefix)
                .wait_time(Duration::from_secs(5))
                .build()
                .await
                .unwrap(),
        );
    }
    let runs = Arc::new(AtomicU32::new(0));
    let started = Arc::new(Notify::new());
    let stampede = |n: usize| -> Vec<Call> {
        (0..n)
            .map(|i| {
                let cache = caches[i % 3].clone();
                let load = loader(&runs, &started, Duration::from_millis(900));
                tokio::spawn(async move { cache.get_or_load("hot", load).await })
            })
            .collect()
    };
    let began = Instant::now();
    let mut calls = stampede(120);
    started.notified().await;
    // Let the other caches' waiters reach the lock, then kill a master under them.
    tokio::time::sleep(Duration::from_millis(50)).await;
    fleet.kill(2);
    let killed_at = began.elapsed();
    calls.extend(stampede(60));
    let results = join_all_checked(calls).await;
    let took = began.elapsed();
    let failed: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} calls failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    assert!(results.iter().all(|r| matches!(r.as_deref(), Ok("fresh"))));
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the loader must run exactly once"
    );
    for cache in &caches {
        assert_eq!(
            cache.stats().lock_lost,
            0,
            "the lock survives a minority loss"
        );
        assert_eq!(cache.stats().lock_timeouts, 0);
    }
    // Values live on master 0, which is up: later calls are hits.
    let again: String = caches[1]
        .get_or_load("hot", loader(&runs, &started, Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(again, "fresh");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // A new key still locks and loads on the surviving majority.
    let other: String = caches[2]
        .get_or_load("cold", loader(&runs, &started, Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(other, "fresh");
    assert!(took < Duration::from_secs(3), "stampede took {took:?}");
    eprintln!("master killed at {killed_at:?}; 180 calls done in {took:?}; loads: 1");
}

/// 2 of 3 masters down, default policy (fail closed): every miss fails with the
/// typed quorum error once the wait time is spent, and no loader runs; hits are
/// still served (values live on master 0). After one master returns, the same
/// caches lock and load again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_of_three_masters_down_fail_closed_with_the_quorum_error_within_the_wait_time() {
    let mut fleet = Fleet::start(3);
    let prefix = unique_prefix("failclosed");
    let wait = Duration::from_millis(600);
    let a = builder(&fleet, &prefix)
        .wait_time(wait)
        .build()
        .await
        .unwrap();
    let b = builder(&fleet, &prefix)
        .wait_time(wait)
        .build()
        .await
        .unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let started = Arc::new(Notify::new());
    let warm: String = a
        .get_or_load("warm", loader(&runs, &started, Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(warm, "fresh");
    fleet.kill(1);
    fleet.kill(2);

    let began = Instant::now();
    let mut calls = Vec::new();
    for i in 0..40 {
        let cache = if i % 2 == 0 { a.clone() } else { b.clone() };
        let load = loader(&runs, &started, Duration::ZERO);
        calls.push(tokio::spawn(async move {
            let r = cache.get_or_load("cold", load).await;
            (r, began.elapsed())
        }));
    }
    let mut slowest = Duration::ZERO;
    for (r, took) in join_all_checked(calls).await {
        slowest = slowest.max(took);
        match r {
            Err(LoadError::Cache(
                e @ Error::QuorumNotReached {
                    reachable: 1,
                    masters: 3,
                    quorum: 2,
                    ..
                },
            )) => {
                assert!(e.is_quorum_error());
            }
            other => panic!("expected QuorumNotReached, got {other:?}"),
        }
        assert!(took >= wait, "gave up before the wait time: {took:?}");
        assert!(
            took < wait + TIMEOUT + Duration::from_millis(400),
            "took {took:?}"
        );
    }
    eprintln!("fail-closed: 40 calls got QuorumNotReached, slowest after {slowest:?}");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "no load without the lock (only the warm-up ran)"
    );
    assert_eq!(a.stats().fail_open_loads + b.stats().fail_open_loads, 0);
    // Hits need only the value master.
    assert_eq!(
        b.get::<String>("warm").await.unwrap().as_deref(),
        Some("fresh")
    );

    tokio::task::block_in_place(|| fleet.restart(1));
    let restarted = Instant::now();
    let recovered = support::eventually(Duration::from_secs(5), || async {
        b.get_or_load("cold", loader(&runs, &started, Duration::ZERO))
            .await
            .is_ok()
    })
    .await;
    assert!(recovered, "no recovery after a master came back");
    eprintln!(
        "locked and loaded {:?} after master 1 came back",
        restarted.elapsed()
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// 2 of 3 masters down with `QuorumLossPolicy::FailOpen`: calls do not wait, the
/// loader runs without the lock, once per process (in-process coalescing bounds
/// it), and the value is stored on master 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_of_three_masters_down_fail_open_loads_once_per_process() {
    let mut fleet = Fleet::start(3);
    let prefix = unique_prefix("failopen");
    let mut caches = Vec::new();
    for _ in 0..2 {
        caches.push(
            builder(&fleet, &prefix)
                .wait_time(Duration::from_secs(5))
                .quorum_loss(QuorumLossPolicy::FailOpen)
                .build()
                .await
                .unwrap(),
        );
    }
    fleet.kill(1);
    fleet.kill(2);
    let runs = Arc::new(AtomicU32::new(0));
    let started = Arc::new(Notify::new());
    let began = Instant::now();
    let mut calls = Vec::new();
    for i in 0..60 {
        let cache = caches[i % 2].clone();
        let load = loader(&runs, &started, Duration::from_millis(200));
        calls.push(tokio::spawn(
            async move { cache.get_or_load("k", load).await },
        ));
    }
    for r in join_all_checked(calls).await {
        assert_eq!(r.unwrap(), "fresh");
    }
    let took = began.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "fail-open must not wait for the lock: {took:?}"
    );
    eprintln!("fail-open: 60 calls done in {took:?}");
    for cache in &caches {
        let stats = cache.stats();
        assert_eq!((stats.loads, stats.fail_open_loads), (1, 1), "{stats:?}");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2, "one load per process");
    assert_eq!(
        caches[0].get::<String>("k").await.unwrap().as_deref(),
        Some("fresh")
    );
}

/// Values live on the first master: with it down, calls fail with a typed
/// connection error within the timeouts, even though the lock majority is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_value_master_down_fails_calls_with_a_typed_connection_error() {
    let mut fleet = Fleet::start(3);
    let cache = builder(&fleet, &unique_prefix("valuemaster"))
        .build()
        .await
        .unwrap();
    fleet.kill(0);
    let runs = Arc::new(AtomicU32::new(0));
    let started = Arc::new(Notify::new());
    let began = Instant::now();
    let r = cache
        .get_or_load("k", loader(&runs, &started, Duration::ZERO))
        .await;
    let took = began.elapsed();
    match r {
        Err(LoadError::Cache(e)) => assert!(e.is_connection_error(), "{e:?}"),
        other => panic!("expected a connection error, got {other:?}"),
    }
    assert!(
        took < TIMEOUT * 2 + Duration::from_millis(200),
        "took {took:?}"
    );
    eprintln!("value master down: typed error after {took:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

/// One master stalls (the TCP link to it holds every byte): it neither answers
/// nor refuses. A majority still answers at once, so a miss, a hit and the
/// release do not wait for the stalled master's command timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_minority_master_does_not_slow_misses_down() {
    let fleet = Fleet::start(3);
    let proxy = support::TcpProxy::start(fleet.servers[2].addr()).await;
    let urls = vec![
        fleet.urls()[0].clone(),
        fleet.urls()[1].clone(),
        proxy.url(),
    ];
    let cache = LockedCache::builder()
        .masters(urls)
        .key_prefix(unique_prefix("stalled"))
        .ttl(MINUTE)
        .command_timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let started = Arc::new(Notify::new());
    // Warm the connection to the proxied master, then stall it.
    let _: String = cache
        .get_or_load("warm", loader(&runs, &started, Duration::ZERO))
        .await
        .unwrap();
    proxy.stall();
    for key in ["cold-1", "cold-2", "cold-3"] {
        let began = Instant::now();
        let v: String = cache
            .get_or_load(key, loader(&runs, &started, Duration::ZERO))
            .await
            .unwrap();
        let took = began.elapsed();
        assert_eq!(v, "fresh");
        eprintln!("miss with one master stalled: {took:?}");
        assert!(
            took < Duration::from_millis(500),
            "{key}: a miss waited for the stalled master: {took:?}"
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 4);
    assert_eq!(cache.stats().lock_lost, 0);
    proxy.resume();
}

/// Fail-open loads take the fence before loading: a `set` made while such a
/// load runs (the fresh value after an update) is not overwritten by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_during_a_fail_open_load_is_not_overwritten() {
    let mut fleet = Fleet::start(3);
    let cache = builder(&fleet, &unique_prefix("failopenset"))
        .quorum_loss(QuorumLossPolicy::FailOpen)
        .build()
        .await
        .unwrap();
    fleet.kill(1);
    fleet.kill(2);
    let runs = Arc::new(AtomicU32::new(0));
    let started = Arc::new(Notify::new());
    let load = loader(&runs, &started, Duration::from_millis(200));
    let loading = tokio::spawn({
        let cache = cache.clone();
        async move { cache.get_or_load("k", load).await }
    });
    started.notified().await;
    cache.set("k", &"updated".to_owned()).await.unwrap();
    let loaded = join_all_checked(vec![loading]).await.remove(0).unwrap();
    assert_eq!(loaded, "fresh", "the caller gets what its loader returned");
    assert_eq!(
        cache.get::<String>("k").await.unwrap().as_deref(),
        Some("updated"),
        "the fail-open load overwrote a newer value"
    );
    let stats = cache.stats();
    assert_eq!(
        (stats.fail_open_loads, stats.writes_refused),
        (1, 1),
        "{stats:?}"
    );
}

/// One of three masters frozen (SIGSTOP: its connections stay open, nothing
/// answers, nothing is refused) while three caches (as three processes would)
/// contend for the same keys, 30 times. Two contenders that split the two live
/// masters do not wait out the command timeout for the frozen one (the
/// per-master timeout, then no wait at all once it is known unreachable), and
/// their retries fall out of step: no call ends in `LockTimeout`, each key
/// loads once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contended_stampedes_with_a_stalled_minority_master_do_not_livelock() {
    let fleet = Fleet::start(3);
    let prefix = unique_prefix("livelock");
    let wait = Duration::from_secs(3);
    let mut caches = Vec::new();
    for _ in 0..3 {
        let cache = builder(&fleet, &prefix)
            .lock_expiry(Duration::from_secs(2))
            .wait_time(wait)
            .command_timeout(Duration::from_millis(500))
            .build()
            .await
            .unwrap();
        cache.ping().await.unwrap();
        caches.push(cache);
    }
    fleet.servers[2].pause();
    let loader_time = Duration::from_millis(20);
    let mut latencies = Vec::new();
    let mut errors = Vec::new();
    let mut loads_per_key = Vec::new();
    for round in 0..30 {
        let key = format!("k{round}");
        let runs = Arc::new(AtomicU32::new(0));
        let mut calls = Vec::new();
        for cache in &caches {
            for _ in 0..4 {
                let (cache, key, runs) = (cache.clone(), key.clone(), Arc::clone(&runs));
                calls.push(tokio::spawn(async move {
                    let began = Instant::now();
                    let r = cache
                        .get_or_load(&key, || async move {
                            runs.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(loader_time).await;
                            Ok::<_, String>(round)
                        })
                        .await;
                    (r, began.elapsed())
                }));
            }
        }
        for (r, took) in join_all_checked(calls).await {
            latencies.push(took);
            match r {
                Ok(v) => assert_eq!(v, round),
                Err(e) => errors.push(format!("{key}: {e}")),
            }
        }
        loads_per_key.push(runs.load(Ordering::SeqCst));
    }
    fleet.servers[2].resume();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    let lock_timeouts: u64 = caches.iter().map(|c| c.stats().lock_timeouts).sum();
    eprintln!(
        "30 contended stampedes (3 caches x 4 callers), 1 of 3 masters frozen, loader {loader_time:?}: \
         {} errors, {lock_timeouts} lock timeouts, p50 {:?}, p99 {:?}, max {:?}",
        errors.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    );
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(lock_timeouts, 0);
    assert_eq!(loads_per_key, vec![1; 30], "one load per key");
}
