//! Fault: pooled connections die while the server is fine. Redis restarts,
//! closes idle clients (`timeout`), kills them (`CLIENT KILL TYPE normal`), or
//! answers with an error reply (`OOM`). No public call may fail because a
//! connection died: a dead pooled connection is retired with its idle siblings
//! and the command re-sent on a fresh one, and every command is safe to send
//! twice. An error reply is its own typed outcome, never "unreachable".

use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::support::{Fleet, RedisServer, counting_loader, join_all_checked, unique_prefix};
use locked_cache::{LoadError, LockGuard, LockedCache, QuorumLossPolicy};

const MINUTE: Duration = Duration::from_secs(60);
const POOL_SIZES: [u32; 3] = [1, 4, 16];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// The server is killed and started again on the same port (data lost).
    Restart,
    /// `CONFIG SET timeout 1` and 2.5 s idle: the server closes idle clients.
    IdleTimeout,
    /// `CLIENT KILL TYPE normal`: every pooled connection is killed.
    ClientKill,
}

/// Every public call that talks to Redis, each run on a cache of its own
/// whose pooled connections all died.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Get,
    GetOrLoadMiss,
    GetOrLoadHit,
    Set,
    Invalidate,
    Ping,
    Acquire,
    TryAcquire,
    Extend,
    Release,
}

const OPS: [Op; 10] = [
    Op::Get,
    Op::GetOrLoadMiss,
    Op::GetOrLoadHit,
    Op::Set,
    Op::Invalidate,
    Op::Ping,
    Op::Acquire,
    Op::TryAcquire,
    Op::Extend,
    Op::Release,
];

async fn cache_on(urls: &[String], pool: u32, prefix: &str) -> LockedCache {
    LockedCache::builder()
        .masters(urls.iter().cloned())
        .key_prefix(prefix)
        .pool_size(pool)
        .ttl(MINUTE)
        .lock_expiry(Duration::from_secs(5))
        .build()
        .await
        .expect("build")
}

/// Opens as many pooled connections as the pool allows: bursts of concurrent
/// reads from several tasks.
async fn warm(cache: &LockedCache) {
    for _ in 0..2 {
        let reads: Vec<_> = (0..32)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get::<String>("warm").await })
            })
            .collect();
        for r in join_all_checked(reads).await {
            r.expect("warm-up read");
        }
    }
}

/// A cache prepared for one op: warmed, with a value stored and, for the lock
/// ops, a lock held from before the fault.
struct Case {
    op: Op,
    pool: u32,
    /// Lock names are Redis keys as given: one of its own per case.
    lock_name: String,
    cache: LockedCache,
    guard: Option<LockGuard>,
    loads: Arc<AtomicU32>,
}

async fn prepare(urls: &[String], op: Op, pool: u32) -> Case {
    let prefix = unique_prefix("conn");
    let lock_name = format!("lock.{prefix}");
    let cache = cache_on(urls, pool, &prefix).await;
    warm(&cache).await;
    cache.set("stored", &"before".to_owned()).await.unwrap();
    let guard = match op {
        Op::Extend | Op::Release => Some(
            cache
                .lock()
                .acquire_with(&lock_name, MINUTE, MINUTE)
                .await
                .unwrap(),
        ),
        _ => None,
    };
    Case {
        op,
        pool,
        lock_name,
        cache,
        guard,
        loads: Arc::new(AtomicU32::new(0)),
    }
}

/// Runs the case's op once; `Err` describes a failed call. `data_kept` is
/// false after a restart (the server came back empty).
async fn run(case: &mut Case, data_kept: bool) -> Result<(), String> {
    let cache = &case.cache;
    let fail = |e: &dyn std::fmt::Display| format!("{:?} (pool {}): {e}", case.op, case.pool);
    match case.op {
        Op::Get => {
            let got = cache.get::<String>("stored").await.map_err(|e| fail(&e))?;
            if data_kept && got.as_deref() != Some("before") {
                return Err(fail(&format!("read {got:?}")));
            }
        }
        Op::GetOrLoadMiss | Op::GetOrLoadHit => {
            let key = if case.op == Op::GetOrLoadHit {
                "stored"
            } else {
                "missing"
            };
            let loader = counting_loader(&case.loads, Duration::ZERO, "loaded".to_owned());
            let got: String = cache
                .get_or_load(key, loader)
                .await
                .map_err(|e: LoadError<String>| fail(&e))?;
            let expected = if case.op == Op::GetOrLoadHit && data_kept {
                "before"
            } else {
                "loaded"
            };
            if got != expected {
                return Err(fail(&format!("got {got:?}, expected {expected:?}")));
            }
            let stored = cache.get::<String>(key).await.map_err(|e| fail(&e))?;
            if stored.as_deref() != Some(expected) {
                return Err(fail(&format!("stored {stored:?}")));
            }
        }
        Op::Set => {
            cache
                .set("stored", &"after".to_owned())
                .await
                .map_err(|e| fail(&e))?;
            let got = cache.get::<String>("stored").await.map_err(|e| fail(&e))?;
            if got.as_deref() != Some("after") {
                return Err(fail(&format!("read back {got:?}")));
            }
        }
        Op::Invalidate => {
            let removed = cache.invalidate("stored").await.map_err(|e| fail(&e))?;
            if data_kept && !removed {
                return Err(fail(&"reported nothing removed"));
            }
            let got = cache.get::<String>("stored").await.map_err(|e| fail(&e))?;
            if got.is_some() {
                return Err(fail(&"value still there"));
            }
        }
        Op::Ping => cache.ping().await.map_err(|e| fail(&e))?,
        Op::Acquire => {
            let guard = cache
                .lock()
                .acquire(&case.lock_name)
                .await
                .map_err(|e| fail(&e))?;
            let released = guard.release().await.map_err(|e| fail(&e))?;
            if !released {
                return Err(fail(&"acquired lock not held at release"));
            }
        }
        Op::TryAcquire => {
            let guard = cache
                .lock()
                .try_acquire(&case.lock_name, Duration::from_secs(5))
                .await
                .map_err(|e| fail(&e))?
                .ok_or_else(|| fail(&"a free lock was refused"))?;
            guard.release().await.map_err(|e| fail(&e))?;
        }
        Op::Extend => {
            let guard = case.guard.as_mut().expect("held");
            let extended = guard.extend(MINUTE).await.map_err(|e| fail(&e))?;
            if data_kept && !extended {
                return Err(fail(&"extension refused"));
            }
        }
        Op::Release => {
            let guard = case.guard.take().expect("held");
            let released = guard.release().await.map_err(|e| fail(&e))?;
            if data_kept && !released {
                return Err(fail(&"release found the lock gone"));
            }
        }
    }
    Ok(())
}

fn connections_received(server: &RedisServer) -> u64 {
    server.info_number("stats", "total_connections_received")
}

fn connected_clients(server: &RedisServer) -> u64 {
    server.info_number("clients", "connected_clients")
}

/// Closes idle clients with `timeout 1`, waiting (2.5 s at least, 10 s at most)
/// until only the pub/sub connections (exempt from `timeout`), `subscribers`,
/// and the probe itself are left.
async fn close_idle_clients(server: &RedisServer, subscribers: u64) {
    server.cmd(&["CONFIG", "SET", "timeout", "1"]);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let closed = support::eventually(Duration::from_secs(8), || async {
        connected_clients(server) <= subscribers + 1
    })
    .await;
    server.cmd(&["CONFIG", "SET", "timeout", "0"]);
    assert!(
        closed,
        "the server did not close its idle clients: {} connected",
        connected_clients(server)
    );
}

async fn apply(fault: Fault, server: &mut RedisServer, subscribers: u64) {
    match fault {
        Fault::Restart => server.restart(),
        Fault::IdleTimeout => close_idle_clients(server, subscribers).await,
        Fault::ClientKill => {
            server.cmd(&["CLIENT", "KILL", "TYPE", "normal"]);
        }
    }
}

/// Every public call, on pools of 1, 4 and 16 whose connections all died under
/// `fault`: 0 errors, and a miss loads once.
async fn every_call_survives(fault: Fault) {
    let mut server = RedisServer::start();
    let urls = vec![server.url()];
    let mut cases = Vec::new();
    for pool in POOL_SIZES {
        for op in OPS {
            cases.push(prepare(&urls, op, pool).await);
        }
    }
    apply(fault, &mut server, cases.len() as u64).await;
    let before = connections_received(&server);
    let data_kept = fault != Fault::Restart;
    let started = Instant::now();
    let mut errors = Vec::new();
    for case in &mut cases {
        if let Err(e) = run(case, data_kept).await {
            errors.push(e);
        }
    }
    let took = started.elapsed();
    let reconnects = connections_received(&server) - before;
    let loads: Vec<u32> = cases
        .iter()
        .filter(|c| c.op == Op::GetOrLoadMiss)
        .map(|c| c.loads.load(Ordering::SeqCst))
        .collect();
    eprintln!(
        "{fault:?}: {} calls on pools {POOL_SIZES:?}: {} errors, loads per miss {loads:?}, \
         {reconnects} new connections, {took:?}",
        cases.len(),
        errors.len()
    );
    assert!(errors.is_empty(), "{fault:?}: calls failed: {errors:#?}");
    assert_eq!(
        loads,
        vec![1; POOL_SIZES.len()],
        "{fault:?}: one load per miss"
    );
    // The fault really killed the pooled connections: each cache had to open
    // new ones (a restart resets the counter, so it counts them all).
    assert!(
        reconnects >= cases.len() as u64,
        "{fault:?}: only {reconnects} new connections for {} caches",
        cases.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_public_call_succeeds_after_a_server_restart() {
    every_call_survives(Fault::Restart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_public_call_succeeds_after_the_server_closed_idle_connections() {
    every_call_survives(Fault::IdleTimeout).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_public_call_succeeds_after_client_kill() {
    every_call_survives(Fault::ClientKill).await;
}

/// `CLIENT KILL TYPE normal` in the middle of a load: the holder's keep-alive,
/// fenced store and release are re-sent on fresh connections, so the value is
/// cached, the lock is freed at once, and 20 waiters in another cache get the
/// value from the one load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_kill_mid_load_loses_nothing() {
    let server = RedisServer::start();
    let urls = [server.url()];
    for pool in [1, 4] {
        let prefix = unique_prefix("killmid");
        let build = || async {
            LockedCache::builder()
                .masters(urls.iter().cloned())
                .key_prefix(&prefix)
                .pool_size(pool)
                .ttl(MINUTE)
                .lock_expiry(Duration::from_millis(600))
                .retry_time(Duration::from_millis(50))
                .build()
                .await
                .expect("build")
        };
        let (holder, waiters) = (build().await, build().await);
        warm(&holder).await;
        warm(&waiters).await;
        let loads = Arc::new(AtomicU32::new(0));
        let started = Instant::now();
        let lead = {
            let (holder, loads) = (holder.clone(), Arc::clone(&loads));
            tokio::spawn(async move {
                holder
                    .get_or_load("k", || async move {
                        loads.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(400)).await;
                        Ok::<_, String>("v".to_owned())
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let followers: Vec<_> = (0..20)
            .map(|_| {
                let (waiters, loads) = (waiters.clone(), Arc::clone(&loads));
                tokio::spawn(async move {
                    waiters
                        .get_or_load("k", || async move {
                            loads.fetch_add(1, Ordering::SeqCst);
                            Ok::<_, String>("second load".to_owned())
                        })
                        .await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        server.cmd(&["CLIENT", "KILL", "TYPE", "normal"]);
        let led = lead.await.expect("holder task");
        let mut failed = Vec::new();
        for r in join_all_checked(followers).await {
            match r {
                Ok(v) if v == "v" => {}
                other => failed.push(format!("{other:?}")),
            }
        }
        // Checked once every caller is done: a follower whose retry takes the
        // lock just after the holder's release (and then finds the value)
        // holds it for a round trip, which is not a leak. A leaked lock would
        // still be there: the keep-alive renewed it until the load ended.
        let lock_left: u64 = server.query(&["EXISTS", &holder.lock_key("k")]);
        let took = started.elapsed();
        eprintln!(
            "CLIENT KILL mid-load, pool {pool}: holder {led:?}, {} of 20 waiters failed, \
             {} loads, all done in {took:?}",
            failed.len(),
            loads.load(Ordering::SeqCst)
        );
        assert_eq!(led.unwrap(), "v");
        assert!(failed.is_empty(), "pool {pool}: waiters failed: {failed:?}");
        assert_eq!(loads.load(Ordering::SeqCst), 1, "pool {pool}");
        assert_eq!(lock_left, 0, "pool {pool}: the lock was left behind");
        let stats = holder.stats();
        assert_eq!(stats.store_errors, 0, "pool {pool}: {stats:?}");
        assert_eq!(
            holder.get::<String>("k").await.unwrap().as_deref(),
            Some("v"),
            "pool {pool}: the value was not cached"
        );
    }
}

/// Three masters whose idle connections were all closed by the servers: two
/// caches missing one key load once, with the lock; the dead connections are
/// not mistaken for unreachable masters, so `FailOpen` does not fire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_does_not_fire_on_healthy_masters_whose_connections_died() {
    let fleet = Fleet::start(3);
    let urls = fleet.urls();
    let prefix = unique_prefix("idle3");
    let build = || async {
        LockedCache::builder()
            .masters(urls.iter().cloned())
            .key_prefix(&prefix)
            .quorum_loss(QuorumLossPolicy::FailOpen)
            .build()
            .await
            .expect("build")
    };
    let (a, b) = (build().await, build().await);
    warm(&a).await;
    warm(&b).await;
    a.lock().ping().await.unwrap();
    b.lock().ping().await.unwrap();
    let closing = fleet
        .servers
        .iter()
        .map(|server| close_idle_clients(server, 2));
    futures_util::future::join_all(closing).await;
    let loads = Arc::new(AtomicU32::new(0));
    let calls: Vec<_> = [a.clone(), b.clone()]
        .iter()
        .cloned()
        .map(|cache| {
            let loads = Arc::clone(&loads);
            tokio::spawn(async move {
                cache
                    .get_or_load("k", || async move {
                        loads.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Ok::<_, String>(7u64)
                    })
                    .await
            })
        })
        .collect();
    for r in join_all_checked(calls).await {
        assert_eq!(r.unwrap(), 7);
    }
    let fail_open = a.stats().fail_open_loads + b.stats().fail_open_loads;
    eprintln!(
        "3 masters, idle connections closed: {} loads, {fail_open} fail-open",
        loads.load(Ordering::SeqCst)
    );
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    assert_eq!(fail_open, 0, "fail-open fired on healthy masters");
}

/// Two of three masters refuse writes (`OOM` under `maxmemory`): they are up,
/// so this is not a lost quorum. Under `FailOpen` no loader runs without the
/// lock; the call fails at once with the error reply, typed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_reply_from_live_masters_is_its_own_typed_outcome_not_a_lost_quorum() {
    let fleet = Fleet::start(3);
    let cache = LockedCache::builder()
        .masters(fleet.urls())
        .key_prefix(unique_prefix("oom"))
        .quorum_loss(QuorumLossPolicy::FailOpen)
        .build()
        .await
        .expect("build");
    cache.ping().await.unwrap();
    for server in &fleet.servers[1..] {
        server.cmd(&["CONFIG", "SET", "maxmemory", "1"]);
    }
    let loads = Arc::new(AtomicU32::new(0));
    let started = Instant::now();
    let result: Result<u64, LoadError<String>> = cache
        .get_or_load("k", counting_loader(&loads, Duration::ZERO, 1u64))
        .await;
    let took = started.elapsed();
    eprintln!("2 of 3 masters OOM: {result:?} after {took:?}");
    let error = match result {
        Err(LoadError::Cache(e)) => e,
        other => panic!("expected the OOM error reply, got {other:?}"),
    };
    assert!(error.is_error_reply(), "{error}");
    assert_eq!(error.redis_code(), Some("OOM"), "{error}");
    assert!(!error.is_quorum_error() && !error.is_connection_error());
    assert_eq!(loads.load(Ordering::SeqCst), 0, "loaded without the lock");
    assert_eq!(cache.stats().fail_open_loads, 0);
    // Not after the whole wait time (10 s): the refusal is final.
    assert!(took < Duration::from_secs(5), "{took:?}");
}
