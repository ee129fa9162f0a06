//! Waiters get the value the moment it is stored: in-process coalescing and
//! cross-process wake-ups by pub/sub, with polling as the fallback.
//!
//! "Another process" is a second `LockedCache` with its own connections and its
//! own subscription; they share only the Redis server.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::store::{Hook, Observed, Op};
use crate::support::{RedisServer, eventually, join_all_checked, time_to_wake, unique_prefix};
use locked_cache::{LockedCache, RedisStore};
use tokio::sync::{mpsc, oneshot};

const MINUTE: Duration = Duration::from_secs(60);

async fn cache_on(server: &RedisServer, prefix: &str, retry: Duration) -> LockedCache {
    LockedCache::builder()
        .redis(server.url())
        .key_prefix(prefix)
        .ttl(MINUTE)
        .retry_time(retry)
        .build()
        .await
        .expect("build")
}

/// Commands a test is interested in, without the harness's own bookkeeping.
fn data_commands(server: &RedisServer) -> u64 {
    server.total_commands()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_costs_one_redis_command() {
    let server = RedisServer::start();
    let cache = cache_on(&server, &unique_prefix("hit"), Duration::from_millis(100)).await;
    cache.set("k", &"v".to_string()).await.unwrap();
    server.reset_stats();
    let before = data_commands(&server);
    let v: String = cache
        .get_or_load("k", || async { Ok::<_, String>("loaded".to_string()) })
        .await
        .unwrap();
    assert_eq!(v, "v");
    let stats = server.command_stats();
    assert_eq!(
        data_commands(&server) - before,
        1,
        "a hit must be one command: {stats:?}"
    );
    assert_eq!(server.command_calls("get"), 1, "{stats:?}");
}

/// 200 concurrent callers in one process: one load, one lock attempt, and a
/// handful of Redis commands in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_share_one_load_and_one_lock_in_process() {
    let server = RedisServer::start();
    let cache = cache_on(
        &server,
        &unique_prefix("coalesce"),
        Duration::from_millis(100),
    )
    .await;
    // Warm up: the pool's first connection loads the Lua scripts (SCRIPT LOAD);
    // measure the steady state.
    let _: u64 = cache
        .get_or_load("warm", || async { Ok::<_, String>(0u64) })
        .await
        .unwrap();
    server.reset_stats();
    let runs = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (cache, runs) = (cache.clone(), Arc::clone(&runs));
        tasks.push(tokio::spawn(async move {
            cache
                .get_or_load("k", || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok::<_, String>(7u64)
                })
                .await
        }));
    }
    for r in join_all_checked(tasks).await {
        assert_eq!(r.unwrap(), 7);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let stats = cache.stats();
    assert_eq!(
        stats.lock_attempts, 2,
        "one for the warm-up, one for the 200: {stats:?}"
    );
    assert_eq!(stats.coalesced, 199, "{stats:?}");
    // GET, then four scripts (acquire, re-check, store, release): five round
    // trips. Redis counts the commands inside scripts too (SET NX; SET fence +
    // TYPE; GET fence, SET value, PTTL + SET fence mark, PUBLISH; GET lock, DEL
    // lock, PUBLISH): 16 for 200 callers; and the acquire's fencing counter
    // and owner (HINCRBY, HSET, PEXPIRE, and TIME for a name's first token): 20.
    let commands = server.command_stats();
    assert_eq!(server.command_calls("evalsha"), 4, "{commands:?}");
    assert_eq!(
        server.command_calls("set"),
        4,
        "SET NX, fence, value, fence mark: {commands:?}"
    );
    assert_eq!(server.command_calls("get"), 3, "{commands:?}");
    assert_eq!(server.command_calls("del"), 1, "{commands:?}");
    assert_eq!(
        server.command_calls("publish"),
        2,
        "stored, then released: {commands:?}"
    );
    // Connections the pool opened during the burst load the scripts first.
    let script_loads = server.command_calls("script|load");
    assert!(server.total_commands() - script_loads <= 20, "{commands:?}");
}

/// A waiter in another process learns of the stored value at once, although its
/// retry time is 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_in_another_process_wakes_as_soon_as_the_value_is_stored() {
    let server = RedisServer::start();
    let prefix = unique_prefix("wake");
    let retry = Duration::from_secs(5);
    let holder = cache_on(&server, &prefix, retry).await;
    let waiter = cache_on(&server, &prefix, retry).await;
    let latency = time_to_wake(&holder, &waiter, "k").await;
    println!("waiter returned {latency:?} after the loader finished (retry time {retry:?})");
    assert!(
        latency < Duration::from_millis(100),
        "woke after {latency:?}"
    );
    assert_eq!(waiter.stats().loads, 0);
    assert!(waiter.stats().wakeups >= 1);
}

/// The lost wake-up race: the holder stores the value and releases the lock
/// right after the waiter's attempt failed and before it sleeps. The waiter was
/// registered before its attempt, so it still wakes at once (retry time: 5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_between_the_check_and_the_sleep_is_not_lost() {
    let server = RedisServer::start();
    let prefix = unique_prefix("race");
    let holder = cache_on(&server, &prefix, Duration::from_secs(5)).await;
    // After the waiter's first SET NX answered, hand control to the test and
    // wait until it says go on.
    let (hook_tx, mut hook_rx) = mpsc::unbounded_channel::<oneshot::Sender<()>>();
    let first_set_nx = Arc::new(Mutex::new(Some(hook_tx)));
    let hook: Hook = Arc::new(move |op| {
        let hook = (op == Op::SetNx)
            .then(|| first_set_nx.lock().unwrap().take())
            .flatten();
        Box::pin(async move {
            if let Some(hook) = hook {
                let (done_tx, done_rx) = oneshot::channel();
                hook.send(done_tx).unwrap();
                done_rx.await.unwrap();
            }
        })
    });
    let interposer = Arc::new(Observed::new(
        Arc::new(RedisStore::open(&server.url(), Default::default()).unwrap()),
        hook,
    ));
    let waiter = LockedCache::builder()
        .store(interposer)
        .key_prefix(&prefix)
        .retry_time(Duration::from_secs(5))
        .build()
        .await
        .unwrap();

    let guard = holder.lock().acquire(&holder.lock_key("k")).await.unwrap();
    let started = Instant::now();
    let waiting = tokio::spawn({
        let waiter = waiter.clone();
        async move {
            waiter
                .get_or_load("k", || async { Ok::<_, String>("second load".to_string()) })
                .await
        }
    });
    // The waiter's SET NX failed (the lock is held); before it can sleep, store
    // the value and release the lock, publishing the wake-up.
    let done = hook_rx.recv().await.unwrap();
    holder.set("k", &"fresh".to_string()).await.unwrap();
    assert!(guard.release().await.unwrap());
    done.send(()).unwrap();
    let value = join_all_checked(vec![waiting]).await.remove(0).unwrap();
    assert_eq!(value, "fresh");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "the wake-up was lost: {took:?}"
    );
    assert_eq!(waiter.stats().loads, 0);
}

/// The subscription connection is killed while a waiter sleeps: the waiter still
/// completes (the listener resubscribes and wakes everyone to re-check, and the
/// retry timer polls in any case), and wake-ups work again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_subscription_does_not_strand_waiters() {
    let server = RedisServer::start();
    let prefix = unique_prefix("resub");
    let retry = Duration::from_millis(500);
    let holder = cache_on(&server, &prefix, retry).await;
    let waiter = cache_on(&server, &prefix, retry).await;
    assert_eq!(waiter.lock().subscriptions(), 1);

    for round in 0..2 {
        let key = format!("k{round}");
        let guard = holder.lock().acquire(&holder.lock_key(&key)).await.unwrap();
        let waiting = tokio::spawn({
            let (waiter, key) = (waiter.clone(), key.clone());
            async move {
                waiter
                    .get_or_load(&key, || async {
                        Ok::<_, String>("second load".to_string())
                    })
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        if round == 0 {
            server.client_kill_pubsub();
        }
        holder.set(&key, &"fresh".to_string()).await.unwrap();
        guard.release().await.unwrap();
        let started = Instant::now();
        let value = tokio::time::timeout(retry * 3, async {
            join_all_checked(vec![waiting]).await.remove(0)
        })
        .await
        .expect("waiter stranded after the subscription was killed");
        assert_eq!(value.unwrap(), "fresh");
        println!(
            "round {round}: waiter done {:?} after the release",
            started.elapsed()
        );
        assert!(
            eventually(Duration::from_secs(3), || async {
                waiter.lock().subscriptions() == 1
            })
            .await,
            "the listener did not resubscribe"
        );
    }
    assert_eq!(waiter.stats().loads, 0);
}

/// The leader's future is dropped mid-load: a follower takes over and completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_complete_when_the_leader_is_cancelled() {
    let server = RedisServer::start();
    let cache = cache_on(
        &server,
        &unique_prefix("cancel"),
        Duration::from_millis(100),
    )
    .await;
    let runs = Arc::new(AtomicU32::new(0));
    let leader_started = Arc::new(AtomicBool::new(false));
    let leader = tokio::spawn({
        let (cache, runs, started) = (
            cache.clone(),
            Arc::clone(&runs),
            Arc::clone(&leader_started),
        );
        async move {
            cache
                .get_or_load("k", || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    started.store(true, Ordering::SeqCst);
                    tokio::time::sleep(MINUTE).await;
                    Ok::<_, String>("never".to_string())
                })
                .await
        }
    });
    assert!(
        eventually(Duration::from_secs(2), || async {
            leader_started.load(Ordering::SeqCst)
        })
        .await
    );
    let mut followers = Vec::new();
    for _ in 0..10 {
        let (cache, runs) = (cache.clone(), Arc::clone(&runs));
        followers.push(tokio::spawn(async move {
            cache
                .get_or_load("k", || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, String>("taken over".to_string())
                })
                .await
        }));
    }
    assert!(
        eventually(Duration::from_secs(2), || async {
            cache.stats().coalesced == 10
        })
        .await
    );
    leader.abort();
    assert!(leader.await.unwrap_err().is_cancelled());
    let started = Instant::now();
    for v in join_all_checked(followers).await {
        assert_eq!(v.unwrap(), "taken over");
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "the cancelled load and one takeover"
    );
    // The takeover waited for the cancelled leader's lock to be released (a
    // spawned release), not for it to expire.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

/// The leader's loader panics: the panic reaches the leader's caller, and a
/// follower takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_complete_when_the_leaders_loader_panics() {
    let server = RedisServer::start();
    let cache = cache_on(&server, &unique_prefix("panic"), Duration::from_millis(100)).await;
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let leader = tokio::spawn({
        let cache = cache.clone();
        async move {
            cache
                .get_or_load::<String, String, _, _>("k", || async move {
                    go_rx.await.unwrap();
                    panic!("loader bug");
                })
                .await
        }
    });
    assert!(
        eventually(Duration::from_secs(2), || async {
            cache.stats().loads == 1
        })
        .await
    );
    let mut followers = Vec::new();
    for _ in 0..10 {
        let cache = cache.clone();
        followers.push(tokio::spawn(async move {
            cache
                .get_or_load("k", || async { Ok::<_, String>("taken over".to_string()) })
                .await
        }));
    }
    assert!(
        eventually(Duration::from_secs(2), || async {
            cache.stats().coalesced == 10
        })
        .await
    );
    go_tx.send(()).unwrap();
    let err = leader
        .await
        .expect_err("the leader's caller sees the panic");
    assert!(err.is_panic());
    for v in join_all_checked(followers).await {
        assert_eq!(v.unwrap(), "taken over");
    }
    assert_eq!(
        cache.get::<String>("k").await.unwrap().as_deref(),
        Some("taken over")
    );
}

/// Values on a server of their own (`cache_url`): the wake-up for the stored
/// value is published on the lock master, where waiters subscribe, not on the
/// value server where nobody listens. A waiter in another process with a 5 s
/// retry gets the value as soon as it is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_separate_value_server_the_wake_up_reaches_the_waiters() {
    let master = RedisServer::start();
    let values = RedisServer::start();
    let prefix = unique_prefix("cacheurl");
    let build = || async {
        LockedCache::builder()
            .redis(master.url())
            .cache_url(values.url())
            .key_prefix(&prefix)
            .ttl(MINUTE)
            .retry_time(Duration::from_secs(5))
            .build()
            .await
            .expect("build")
    };
    let (holder, waiter) = (build().await, build().await);
    holder.ping().await.unwrap();
    waiter.ping().await.unwrap();
    master.reset_stats();
    values.reset_stats();
    let (finish_tx, finish_rx) = oneshot::channel::<()>();
    let lead = tokio::spawn({
        let holder = holder.clone();
        async move {
            holder
                .get_or_load("k", || async move {
                    finish_rx.await.ok();
                    Ok::<_, String>(1u32)
                })
                .await
        }
    });
    assert!(
        eventually(Duration::from_secs(5), || async {
            holder.stats().loads == 1
        })
        .await
    );
    let wait = tokio::spawn({
        let waiter = waiter.clone();
        async move {
            let began = Instant::now();
            let r = waiter
                .get_or_load("k", || async { Ok::<_, String>(2u32) })
                .await;
            (r, began.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let finished = Instant::now();
    finish_tx.send(()).unwrap();
    let (got, _) = join_all_checked(vec![wait]).await.remove(0);
    let woke_after = finished.elapsed();
    assert_eq!(join_all_checked(vec![lead]).await.remove(0).unwrap(), 1);
    assert_eq!(got.unwrap(), 1);
    eprintln!("separate value server: the waiter had the value {woke_after:?} after the load");
    assert!(
        woke_after < Duration::from_secs(2),
        "the waiter slept until its retry: {woke_after:?}"
    );
    assert!(
        eventually(Duration::from_secs(2), || async {
            master.command_calls("publish") == 2
        })
        .await,
        "published on the master: stored, then released: {:?}",
        master.command_stats()
    );
    assert_eq!(
        values.command_calls("publish"),
        0,
        "nobody listens on the value server: {:?}",
        values.command_stats()
    );
}
