//! Faults of the network and of Redis itself: a stalled or slow link (through the
//! loopback [`TcpProxy`]), cut and refused connections, and Redis killed and
//! restarted mid-operation. Calls fail with a typed error within the configured
//! timeouts, never hang, and the same `LockedCache` works again once Redis is
//! back.

use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::support::{
    RedisServer, TcpProxy, counting, eventually, join_all_checked, unique_prefix,
};
use locked_cache::{LoadError, LockedCache};
use tokio::sync::Notify;

const MINUTE: Duration = Duration::from_secs(60);
/// Both the connect and the command timeout of the caches under test.
const TIMEOUT: Duration = Duration::from_millis(250);
/// Allowance for scheduling on a loaded 2-core machine.
const SLACK: Duration = Duration::from_millis(250);

async fn cache_at(url: String, prefix: &str) -> LockedCache {
    LockedCache::builder()
        .redis(url)
        .key_prefix(prefix)
        .ttl(MINUTE)
        .lock_expiry(Duration::from_secs(2))
        .wait_time(Duration::from_secs(2))
        .retry_time(Duration::from_millis(50))
        .connect_timeout(TIMEOUT)
        .command_timeout(TIMEOUT)
        .build()
        .await
        .expect("build")
}

/// Waits until `cache` reads `key` as `expected` again; returns how long it took.
async fn recovery(cache: &LockedCache, key: &str, expected: &str) -> Duration {
    let began = Instant::now();
    let back = eventually(Duration::from_secs(5), || async {
        matches!(cache.get::<String>(key).await, Ok(Some(v)) if v == expected)
    })
    .await;
    assert!(back, "the cache did not recover within 5 s");
    began.elapsed()
}

/// The link stalls (connections open, no bytes forwarded): a hit, a miss, a
/// write and a caller already waiting for a lock all fail with a typed timeout
/// within the command timeout (+ slack), no loader runs, and after the link
/// resumes the same cache serves the old value without reloading it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_link_fails_calls_with_a_typed_timeout_and_the_same_cache_recovers() {
    let server = RedisServer::start();
    let proxy = TcpProxy::start(server.addr()).await;
    let prefix = unique_prefix("stall");
    let cache = cache_at(proxy.url(), &prefix).await;
    let direct = cache_at(server.url(), &prefix).await;
    let runs = Arc::new(AtomicU32::new(0));
    let v: String = cache
        .get_or_load("warm", counting(&runs, "v"))
        .await
        .unwrap();
    assert_eq!(v, "v");

    // A caller waiting for a lock held elsewhere when the link stalls.
    let held = direct
        .lock()
        .acquire(&direct.lock_key("held"))
        .await
        .unwrap();
    let waiting = tokio::spawn({
        let (cache, load) = (cache.clone(), counting(&runs, "never"));
        async move {
            let r = cache.get_or_load("held", load).await;
            (r, Instant::now())
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiting.is_finished());
    proxy.stall();
    let stalled_at = Instant::now();

    let began = Instant::now();
    let hit = cache.get::<String>("warm").await;
    let took = began.elapsed();
    let e = hit.expect_err("stalled");
    assert!(e.is_timeout(), "{e:?}");
    assert!(
        took >= TIMEOUT - Duration::from_millis(20) && took < TIMEOUT + SLACK,
        "get: {took:?}"
    );

    let began = Instant::now();
    let miss = cache.get_or_load("cold", counting(&runs, "never")).await;
    let took_miss = began.elapsed();
    match miss {
        Err(LoadError::Cache(e)) => assert!(e.is_timeout(), "{e:?}"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(
        took_miss < TIMEOUT * 2 + SLACK,
        "get_or_load: {took_miss:?}"
    );

    let began = Instant::now();
    let e = cache.set("x", &"y").await.expect_err("stalled");
    assert!(e.is_timeout(), "{e:?}");
    assert!(
        began.elapsed() < TIMEOUT * 2 + SLACK,
        "set: {:?}",
        began.elapsed()
    );

    let (r, ended) = join_all_checked(vec![waiting]).await.remove(0);
    match r {
        Err(LoadError::Cache(e)) => assert!(e.is_timeout(), "{e:?}"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    let waited = ended - stalled_at;
    assert!(
        waited < Duration::from_millis(75) + TIMEOUT * 2 + SLACK,
        "waiter: {waited:?}"
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "no loader ran while stalled"
    );

    proxy.resume();
    held.release().await.unwrap();
    let recovered = recovery(&cache, "warm", "v").await;
    let v: String = cache
        .get_or_load("warm", counting(&runs, "reloaded"))
        .await
        .unwrap();
    assert_eq!(v, "v", "the value survived; nothing was reloaded");
    let cold: String = cache
        .get_or_load("cold", counting(&runs, "cold"))
        .await
        .unwrap();
    assert_eq!(cold, "cold");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    eprintln!(
        "stall: get failed after {took:?}, get_or_load after {took_miss:?}, lock waiter after {waited:?}; recovered {recovered:?} after resume"
    );
}

/// 25 ms of added latency each way is tolerated: a stampede of 20 callers on 2
/// caches loads once. (A round trip is ~50 ms; a script's first use after a
/// server start costs 3 of them, EVALSHA, SCRIPT LOAD, EVALSHA, inside one
/// 250 ms command timeout.) At 400 ms each way calls fail with a typed timeout;
/// back to no delay, the same caches work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_under_the_timeout_is_tolerated_and_over_it_fails_typed() {
    let server = RedisServer::start();
    let proxy = TcpProxy::start(server.addr()).await;
    let prefix = unique_prefix("latency");
    let a = cache_at(proxy.url(), &prefix).await;
    let b = cache_at(proxy.url(), &prefix).await;
    proxy.set_delay(Duration::from_millis(25));
    let runs = Arc::new(AtomicU32::new(0));
    let mut calls = Vec::new();
    for i in 0..20 {
        let cache = if i % 2 == 0 { a.clone() } else { b.clone() };
        let load = counting(&runs, "slow link");
        calls.push(tokio::spawn(
            async move { cache.get_or_load("k", load).await },
        ));
    }
    for r in join_all_checked(calls).await {
        assert_eq!(r.unwrap(), "slow link");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    proxy.set_delay(Duration::from_millis(400));
    let began = Instant::now();
    let e = a.get::<String>("k").await.expect_err("over the timeout");
    assert!(e.is_timeout(), "{e:?}");
    assert!(began.elapsed() < TIMEOUT + SLACK, "{:?}", began.elapsed());

    proxy.set_delay(Duration::ZERO);
    let recovered = recovery(&a, "k", "slow link").await;
    recovery(&b, "k", "slow link").await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    eprintln!(
        "latency: 25 ms each way tolerated; 400 ms fails typed; recovered {recovered:?} after the delay was removed"
    );
}

/// Every connection is cut and new ones are refused: calls fail fast with a
/// typed connection error (well within the connect timeout) and no loader
/// runs. When connections are accepted again, the same cache serves the stored
/// value without reloading, and its wake-up subscription comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_and_refused_connections_fail_typed_and_the_same_cache_recovers() {
    let server = RedisServer::start();
    let proxy = TcpProxy::start(server.addr()).await;
    let cache = cache_at(proxy.url(), &unique_prefix("cut")).await;
    let runs = Arc::new(AtomicU32::new(0));
    let _: String = cache.get_or_load("k", counting(&runs, "v")).await.unwrap();
    assert_eq!(cache.lock().subscriptions(), 1);

    proxy.refuse(true);
    proxy.cut_all();
    let mut slowest = Duration::ZERO;
    for _ in 0..3 {
        let began = Instant::now();
        let e = cache.get::<String>("k").await.expect_err("cut");
        assert!(e.is_connection_error(), "{e:?}");
        let r = cache.get_or_load("cold", counting(&runs, "never")).await;
        match r {
            Err(LoadError::Cache(e)) => assert!(e.is_connection_error(), "{e:?}"),
            other => panic!("expected a connection error, got {other:?}"),
        }
        slowest = slowest.max(began.elapsed());
    }
    assert!(
        slowest < TIMEOUT * 2 + SLACK,
        "calls while cut took up to {slowest:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(
        eventually(Duration::from_secs(1), || async {
            cache.lock().subscriptions() == 0
        })
        .await,
        "the wake-up subscription should have been cut too"
    );

    proxy.refuse(false);
    let recovered = recovery(&cache, "k", "v").await;
    let v: String = cache
        .get_or_load("k", counting(&runs, "reloaded"))
        .await
        .unwrap();
    assert_eq!(v, "v");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "nothing reloaded");
    assert!(
        eventually(Duration::from_secs(5), || async {
            cache.lock().subscriptions() == 1
        })
        .await,
        "the wake-up subscription did not come back"
    );
    eprintln!(
        "cut: calls failed within {slowest:?}; recovered {recovered:?} after connections were accepted again"
    );
}

/// Redis is SIGKILLed while a loader runs: the caller still gets the value it
/// loaded (storing and releasing fail, are logged, and the lock would expire).
/// While Redis is down, calls fail with a typed connection error within the
/// timeouts. After a restart on the same port (empty: no persistence), the same
/// cache reloads the value once and stores it, and its wake-ups resubscribe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_load_and_restarted_fails_typed_then_recovers_without_a_rebuild() {
    let mut server = RedisServer::start();
    let prefix = unique_prefix("restart");
    let cache = cache_at(server.url(), &prefix).await;
    let runs = Arc::new(AtomicU32::new(0));
    let started = Arc::new(Notify::new());
    let call = tokio::spawn({
        let (cache, runs, started) = (cache.clone(), Arc::clone(&runs), Arc::clone(&started));
        async move {
            cache
                .get_or_load("k", || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    started.notify_one();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok::<_, String>("v1".to_owned())
                })
                .await
        }
    });
    started.notified().await;
    server.kill();
    let killed_at = Instant::now();
    let r = join_all_checked(vec![call]).await.remove(0);
    assert_eq!(
        r.unwrap(),
        "v1",
        "the loaded value is returned even if it cannot be stored"
    );
    let returned = killed_at.elapsed();
    assert!(
        returned < Duration::from_millis(200) + TIMEOUT * 2 + SLACK,
        "{returned:?}"
    );

    let mut slowest = Duration::ZERO;
    for key in ["k", "other"] {
        let began = Instant::now();
        match cache.get_or_load(key, counting(&runs, "never")).await {
            Err(LoadError::Cache(e)) => assert!(e.is_connection_error(), "{e:?}"),
            other => panic!("expected a connection error, got {other:?}"),
        }
        let e = cache.set(key, &"x").await.expect_err("down");
        assert!(e.is_connection_error(), "{e:?}");
        slowest = slowest.max(began.elapsed());
    }
    assert!(
        slowest < TIMEOUT * 2 + SLACK,
        "calls while down took up to {slowest:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(
        cache.lock().subscriptions(),
        0,
        "subscribed to a dead server"
    );

    tokio::task::block_in_place(|| server.restart());
    let restarted = Instant::now();
    let back = eventually(Duration::from_secs(5), || async {
        cache.get_or_load("k", counting(&runs, "v2")).await.is_ok()
    })
    .await;
    assert!(back, "no recovery after the restart");
    let recovered = restarted.elapsed();
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "reloaded once (the restart emptied Redis)"
    );
    assert_eq!(
        cache.get::<String>("k").await.unwrap().as_deref(),
        Some("v2")
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            cache.lock().subscriptions() == 1
        })
        .await,
        "the wake-up subscription did not come back"
    );
    eprintln!(
        "redis killed: loaded value returned {returned:?} after the kill; calls failed within {slowest:?}; recovered {recovered:?} after the restart"
    );
}

/// `ping` finds a wrong setup at startup: a master that is down, or a server
/// that wants a password, each named in a plain error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_names_the_server_that_is_down_or_refuses() {
    let mut fleet = support::Fleet::start(3);
    let cache = LockedCache::builder()
        .masters(fleet.urls())
        .key_prefix(unique_prefix("ping"))
        .connect_timeout(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    cache.ping().await.expect("all up");
    fleet.kill(2);
    let down = fleet.servers[2].url();
    let err = cache.ping().await.expect_err("a master is down");
    assert!(err.is_connection_error(), "{err:?}");
    assert!(err.to_string().contains(&down), "{err} should name {down}");

    let guarded = RedisServer::start();
    let _: () = guarded.query(&["CONFIG", "SET", "requirepass", "hunter2"]);
    let no_password = LockedCache::builder()
        .redis(guarded.url())
        .wake_ups(false)
        .build()
        .await
        .unwrap();
    let err = no_password
        .ping()
        .await
        .expect_err("a password is required");
    let text = err.to_string();
    assert!(text.contains(&guarded.url()), "{text}");
    assert!(text.contains("NOAUTH"), "{text}");
    assert!(!text.contains("Pipeline"), "{text}");
}
