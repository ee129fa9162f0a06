//! The cache on a Redis Cluster (feature `cluster`): 3 primaries + 3 replicas
//! started by the test. A stampede of three caches on keys spread over every
//! shard; a primary killed mid-load and its replica promoted; a primary killed,
//! and one hung, five times each under a stampede, the calls on the healthy
//! shards counted apart from those on the failed one; a slot migrated while
//! calls run.
#![cfg(feature = "cluster")]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::support::cluster::Cluster;
use crate::support::{join_all_checked, unique_prefix, v_expected, v_values};
use locked_cache::{LoadError, LockedCache};
use tokio::sync::oneshot;

const MINUTE: Duration = Duration::from_secs(60);

async fn cache_on(cluster: &Cluster, prefix: &str) -> LockedCache {
    LockedCache::builder()
        .cluster(cluster.urls())
        .key_prefix(prefix)
        .ttl(MINUTE)
        .lock_expiry(Duration::from_secs(2))
        .wait_time(Duration::from_secs(5))
        // Only a lost wake-up would make a waiter sleep this long.
        .retry_time(Duration::from_secs(5))
        .command_timeout(Duration::from_millis(500))
        .connect_timeout(Duration::from_millis(500))
        .build()
        .await
        .expect("build")
}

fn key_slot(cluster: &Cluster, redis_key: &str) -> u16 {
    let slot: i64 = cluster
        .live_node()
        .query(&["CLUSTER", "KEYSLOT", redis_key]);
    slot as u16
}

/// 30 keys over all three shards, each hit by 3 caches × 4 callers at once:
/// one load per key, every caller gets the value, and waiters in other caches
/// are woken (their retry time is 5 s) through the cluster's pub/sub. The
/// value, lock and fence of a key share its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stampede_over_every_shard_loads_each_key_once() {
    let cluster = tokio::task::block_in_place(|| Cluster::start(Duration::from_secs(1)));
    let prefix = unique_prefix("cstampede");
    let mut caches = Vec::new();
    for _ in 0..3 {
        let cache = cache_on(&cluster, &prefix).await;
        cache.ping().await.unwrap();
        caches.push(cache);
    }
    let keys: Vec<String> = (0..30).map(|i| format!("user:{i}")).collect();
    let shards: BTreeSet<usize> = keys
        .iter()
        .map(|k| {
            let slot = key_slot(&cluster, &caches[0].value_key(k));
            assert_eq!(key_slot(&cluster, &caches[0].lock_key(k)), slot, "{k}");
            cluster.primary_of(slot)
        })
        .collect();
    assert_eq!(shards.len(), 3, "keys on every shard: {shards:?}");

    let began = Instant::now();
    let mut calls = Vec::new();
    let runs: Vec<Arc<AtomicU32>> = keys.iter().map(|_| Arc::default()).collect();
    for (i, key) in keys.iter().enumerate() {
        for cache in &caches {
            for _ in 0..4 {
                let (cache, key, runs) = (cache.clone(), key.clone(), Arc::clone(&runs[i]));
                let value = format!("value of {key}");
                calls.push(tokio::spawn(async move {
                    cache
                        .get_or_load(&key, || async move {
                            runs.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(30)).await;
                            Ok::<_, String>(value)
                        })
                        .await
                }));
            }
        }
    }
    let results = join_all_checked(calls).await;
    let took = began.elapsed();
    for r in &results {
        assert!(r.as_ref().is_ok_and(|v| v.starts_with("value of")), "{r:?}");
    }
    let loads: Vec<u32> = runs.iter().map(|r| r.load(Ordering::SeqCst)).collect();
    eprintln!(
        "cluster stampede: 30 keys on 3 shards, 360 calls from 3 caches: loads per key {loads:?}, {took:?}"
    );
    assert_eq!(loads, vec![1; 30], "one load per key");
    assert!(
        took < Duration::from_secs(4),
        "waiters slept until their 5 s retry: {took:?}"
    );
    // Hits come from the shards, once per call.
    for key in &keys {
        let v: Option<String> = caches[2].get(key).await.unwrap();
        assert_eq!(v.as_deref(), Some(format!("value of {key}").as_str()));
    }
}

/// The primary of a key is SIGKILLed while its value loads; the cluster
/// promotes the replica. Calls meanwhile fail with typed errors within a
/// bounded time (or succeed); a `set` after the failover wins over the old
/// holder's write (the fence); the same caches work again without a rebuild.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_mid_load_fails_typed_then_recovers_and_never_writes_stale() {
    let mut cluster = tokio::task::block_in_place(|| Cluster::start(Duration::from_millis(1000)));
    let prefix = unique_prefix("cfailover");
    let holder = cache_on(&cluster, &prefix).await;
    let other = cache_on(&cluster, &prefix).await;
    holder.ping().await.unwrap();
    other.ping().await.unwrap();
    // A key whose primary is node 0, the first seed: every cache's wake-up
    // subscription is on it, so the kill also tests the resubscription.
    let key_name = (0..1000)
        .map(|i| format!("k{i}"))
        .find(|k| cluster.primary_of(key_slot(&cluster, &holder.value_key(k))) == 0)
        .expect("a key on node 0");
    let key: &'static str = Box::leak(key_name.into_boxed_str());
    let slot = key_slot(&cluster, &holder.value_key(key));
    let primary = cluster.primary_of(slot);

    let (finish_tx, finish_rx) = oneshot::channel::<()>();
    let loads = Arc::new(AtomicU32::new(0));
    let lead = tokio::spawn({
        let (holder, loads) = (holder.clone(), Arc::clone(&loads));
        async move {
            holder
                .get_or_load(key, || async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    finish_rx.await.ok();
                    Ok::<_, String>("old".to_owned())
                })
                .await
        }
    });
    while loads.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Let the lock and fence reach the replica, then kill the primary.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let killed = Instant::now();
    tokio::task::block_in_place(|| cluster.nodes[primary].kill());

    // During the outage: every call returns, typed, within a bounded time.
    let mut outage_errors = 0;
    let failed_over = |c: &Cluster| c.primary_of(slot) != primary && !cluster_not_ok(c);
    while !failed_over(&cluster) && killed.elapsed() < Duration::from_secs(15) {
        let began = Instant::now();
        let r: Result<Option<String>, _> = other.get("elsewhere").await;
        let took = began.elapsed();
        assert!(
            took < Duration::from_secs(3),
            "a call hung for {took:?}: {r:?}"
        );
        if let Err(e) = r {
            outage_errors += 1;
            assert!(
                e.is_connection_error() || e.is_timeout() || e.is_error_reply(),
                "{e}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::task::block_in_place(|| cluster.wait_until("the replica took over", failed_over));
    let failover = killed.elapsed();
    let new_primary = cluster.primary_of(slot);
    assert_ne!(new_primary, primary, "no failover");

    // A newer value, written after the failover, wins over the old load.
    let began = Instant::now();
    let set = loop {
        match other.set(key, &"newer".to_owned()).await {
            Ok(()) => break Ok(()),
            Err(e) if began.elapsed() < Duration::from_secs(5) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => break Err(e),
        }
    };
    set.expect("set after the failover");
    finish_tx.send(()).unwrap();
    let led = join_all_checked(vec![lead]).await.remove(0);
    match &led {
        Ok(v) => assert_eq!(v, "old", "its caller gets what it loaded"),
        Err(LoadError::Cache(e)) => assert!(e.is_connection_error() || e.is_timeout(), "{e}"),
        Err(other) => panic!("{other:?}"),
    }
    let stored: Option<String> = other.get(key).await.unwrap();
    assert_eq!(
        stored.as_deref(),
        Some("newer"),
        "the old holder overwrote a newer value"
    );

    // The same caches load a new key, once.
    let runs = Arc::new(AtomicU32::new(0));
    let mut calls = Vec::new();
    for cache in [&holder, &other] {
        let (cache, runs) = (cache.clone(), Arc::clone(&runs));
        calls.push(tokio::spawn(async move {
            cache
                .get_or_load("after", || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, String>(1u8)
                })
                .await
        }));
    }
    for r in join_all_checked(calls).await {
        assert_eq!(r.unwrap(), 1);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // Wake-ups work again: the subscriptions moved to another node. A waiter
    // in the other cache (retry time 5 s) gets the value as soon as it is
    // stored.
    let (release_tx, release_rx) = oneshot::channel::<()>();
    let lead = tokio::spawn({
        let holder = holder.clone();
        async move {
            holder
                .get_or_load("woken", || async move {
                    release_rx.await.ok();
                    Ok::<_, String>(9u8)
                })
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let wait = tokio::spawn({
        let other = other.clone();
        async move {
            other
                .get_or_load("woken", || async { Ok::<_, String>(0u8) })
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stored_at = Instant::now();
    release_tx.send(()).unwrap();
    assert_eq!(join_all_checked(vec![wait]).await.remove(0).unwrap(), 9);
    let woke_after = stored_at.elapsed();
    assert_eq!(join_all_checked(vec![lead]).await.remove(0).unwrap(), 9);
    eprintln!(
        "cluster failover: primary of slot {slot} (the first seed, where the subscriptions were) \
         killed mid-load; {outage_errors} typed errors during the outage, cluster ok again after \
         {failover:?}; old load {led:?}; newer value kept; {} load(s) after; a waiter woken \
         {woke_after:?} after the store",
        runs.load(Ordering::SeqCst)
    );
    assert!(
        woke_after < Duration::from_secs(3),
        "the waiter slept until its retry: no resubscription ({woke_after:?})"
    );
}

fn cluster_not_ok(cluster: &Cluster) -> bool {
    cluster.answering().any(|n| {
        let info: String = n.query(&["CLUSTER", "INFO"]);
        !info.contains("cluster_state:ok")
    })
}

/// A slot is migrated from one primary to another (`MIGRATING`/`IMPORTING`,
/// `MIGRATE`, `SETSLOT NODE`) while two caches keep loading, reading and
/// writing keys in it: every call succeeds (`ASK`, `MOVED` and `TRYAGAIN` are
/// followed), and each key loads once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_succeed_while_a_slot_is_migrated() {
    let cluster = tokio::task::block_in_place(|| Cluster::start(Duration::from_secs(1)));
    let prefix = unique_prefix("cmigrate");
    let a = cache_on(&cluster, &prefix).await;
    let b = cache_on(&cluster, &prefix).await;
    // A user key starting with `{grp}` puts `{grp` in the entry's hash tag, so
    // all 40 keys (and their locks and fences) share one slot.
    let keys: Vec<String> = (0..40).map(|i| format!("{{grp}}:{i}")).collect();
    let slot = key_slot(&cluster, &a.value_key(&keys[0]));
    let src = cluster.primary_of(slot);
    let dst = (src + 1) % 3;
    let src_id: String = cluster.nodes[src].query(&["CLUSTER", "MYID"]);
    let dst_id: String = cluster.nodes[dst].query(&["CLUSTER", "MYID"]);
    for key in &keys {
        assert_eq!(key_slot(&cluster, &a.value_key(key)), slot, "{key}");
    }
    for key in &keys[..20] {
        let _: String = a
            .get_or_load(key, || async { Ok::<_, String>("v".to_owned()) })
            .await
            .unwrap();
    }
    let runs = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for cache in [a.clone(), b.clone()] {
        let (keys, runs, stop) = (keys.clone(), Arc::clone(&runs), Arc::clone(&stop));
        workers.push(tokio::spawn(async move {
            let mut calls = 0u32;
            let mut failures = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let key = &keys[i % keys.len()];
                let runs = Arc::clone(&runs);
                let r = cache
                    .get_or_load(key, || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, String>("v".to_owned())
                    })
                    .await;
                if let Err(e) = r {
                    failures.push(format!("{key}: {e}"));
                }
                if let Err(e) = cache.get::<String>(key).await {
                    failures.push(format!("get {key}: {e}"));
                }
                calls += 2;
                i += 1;
            }
            (calls, failures)
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let migrated = tokio::task::block_in_place(|| {
        let slot_s = slot.to_string();
        cluster.nodes[dst].cmd(&["CLUSTER", "SETSLOT", &slot_s, "IMPORTING", &src_id]);
        cluster.nodes[src].cmd(&["CLUSTER", "SETSLOT", &slot_s, "MIGRATING", &dst_id]);
        let mut moved = 0;
        loop {
            let batch: Vec<String> =
                cluster.nodes[src].query(&["CLUSTER", "GETKEYSINSLOT", &slot_s, "10"]);
            if batch.is_empty() {
                break;
            }
            let port = cluster.nodes[dst].port().to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(batch.iter().map(String::as_str));
            let _: redis::Value = cluster.nodes[src].query(&args);
            moved += batch.len();
            std::thread::sleep(Duration::from_millis(20));
        }
        for node in &cluster.nodes[..3] {
            node.cmd(&["CLUSTER", "SETSLOT", &slot_s, "NODE", &dst_id]);
        }
        moved
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut calls = 0;
    let mut failures = Vec::new();
    for (n, f) in join_all_checked(workers).await {
        calls += n;
        failures.extend(f);
    }
    assert_eq!(cluster.primary_of(slot), dst, "the slot moved");
    eprintln!(
        "slot {slot} migrated ({migrated} keys) from node {src} to node {dst} during {calls} calls: \
         {} failures, {} loads for 40 keys",
        failures.len(),
        runs.load(Ordering::SeqCst)
    );
    assert!(migrated > 0, "nothing was migrated");
    assert!(failures.is_empty(), "{failures:#?}");
    // 20 keys were loaded before; the other 20 load once each.
    assert_eq!(runs.load(Ordering::SeqCst), 20);
}

/// The fault a failover test puts on one primary.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// SIGKILL: its connections close, its port refuses.
    Kill,
    /// SIGSTOP: its connections stay open and nothing answers (a hung host);
    /// its replica is promoted while it hangs, then it gets SIGCONT.
    Stop,
}

/// The command timeout of the failover tests' caches.
const FAILOVER_COMMAND_TIMEOUT: Duration = Duration::from_millis(500);
/// What a round trip may add to it on this shared 2-core host with six
/// servers and 60 busy callers (a healthy call is a few round trips).
const ROUND_TRIP: Duration = Duration::from_millis(250);
/// Repetitions of each fault.
const REPETITIONS: usize = 5;
/// Callers per cache; three caches.
const CALLERS: usize = 20;

async fn failover_cache(cluster: &Cluster, prefix: &str) -> LockedCache {
    LockedCache::builder()
        .cluster(cluster.urls())
        .key_prefix(prefix)
        // Keys expire during the outage, so loads (lock, load, fenced store)
        // run through it and not only hits.
        .ttl(Duration::from_secs(1))
        .lock_expiry(Duration::from_millis(800))
        .wait_time(Duration::from_secs(3))
        .retry_time(Duration::from_millis(50))
        .command_timeout(FAILOVER_COMMAND_TIMEOUT)
        .connect_timeout(FAILOVER_COMMAND_TIMEOUT)
        .build()
        .await
        .expect("build")
}

/// The first slot of each shard (`Cluster::start`'s ranges; a failover
/// moves no slot).
const SHARD_FIRST_SLOTS: [u16; 3] = [0, 5461, 10923];

fn shard_of(slot: u16) -> usize {
    SHARD_FIRST_SLOTS
        .iter()
        .rposition(|&first| slot >= first)
        .unwrap()
}

/// One finished call: its key's shard, when it ended (since the repetition
/// began), how long it took, and its error if any.
struct Call {
    shard: usize,
    ended: Duration,
    took: Duration,
    error: Option<String>,
    /// A raw `MOVED` or `ASK` reached the caller.
    redirected: bool,
}

/// What one repetition measured.
struct Repetition {
    healthy_calls: usize,
    healthy_failures: Vec<String>,
    healthy_slowest: Duration,
    failed_calls: usize,
    failed_failures: usize,
    failover: Duration,
    /// The last failed-shard failure, after the promotion (zero if none).
    failed_recovered_after: Duration,
    failed_last_error: Option<String>,
    redirections: usize,
    /// Calls a second, healthy shards and failed shard: the second before
    /// the fault, and from one to two seconds after the promotion.
    rate_before: (f64, f64),
    rate_after: (f64, f64),
}

/// One repetition: callers stampede 60 keys over the three shards; after two
/// seconds the primary of shard `shard` gets `fault`; the callers go on until
/// two seconds after its replica is promoted; then the node comes back (a
/// restart, or SIGCONT) and rejoins as a replica.
async fn fail_one_primary(
    cluster: &mut Cluster,
    caches: &[LockedCache],
    keys: &[(String, usize)],
    shard: usize,
    fault: Fault,
) -> Repetition {
    let shard_slot = SHARD_FIRST_SLOTS[shard];
    let victim = cluster.primary_of(shard_slot);
    let began = Instant::now();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loads: Arc<Vec<AtomicU32>> = Arc::new(keys.iter().map(|_| AtomicU32::new(0)).collect());
    let keys: Arc<Vec<(String, usize)>> = Arc::new(keys.to_vec());
    let mut workers = Vec::new();
    for (c, cache) in caches.iter().enumerate() {
        for w in 0..CALLERS {
            let (cache, keys, loads, stop) = (
                cache.clone(),
                Arc::clone(&keys),
                Arc::clone(&loads),
                Arc::clone(&stop),
            );
            workers.push(tokio::spawn(async move {
                let mut calls = Vec::new();
                let mut i = c * CALLERS + w;
                while !stop.load(Ordering::Relaxed) {
                    let k = i % keys.len();
                    let (key, shard) = &keys[k];
                    let loads = Arc::clone(&loads);
                    let start = Instant::now();
                    let r = cache
                        .get_or_load(key, || async move {
                            loads[k].fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            Ok::<_, String>(k as u32)
                        })
                        .await;
                    let redirected = matches!(&r, Err(LoadError::Cache(e))
                        if matches!(e.redis_code(), Some("MOVED" | "ASK")));
                    calls.push(Call {
                        shard: *shard,
                        ended: began.elapsed(),
                        took: start.elapsed(),
                        error: r.err().map(|e| e.to_string()),
                        redirected,
                    });
                    i += 7;
                }
                calls
            }));
        }
    }
    // Two seconds before the fault: the rate is measured over the second
    // one, when the keys' 1 s expiries have spread out (over the first, every
    // key loads at once and then hits until they all expire together).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let faulted = began.elapsed();
    tokio::task::block_in_place(|| match fault {
        Fault::Kill => cluster.nodes[victim].kill(),
        Fault::Stop => cluster.pause(victim),
    });
    let promoted = tokio::task::block_in_place(|| {
        cluster.wait_until("the replica took over", |c| {
            c.primary_of(shard_slot) != victim && !cluster_not_ok(c)
        });
        began.elapsed()
    });
    // The victim stays down (or hung) for two seconds after the promotion.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let calls: Vec<Call> = join_all_checked(workers)
        .await
        .into_iter()
        .flatten()
        .collect();
    tokio::task::block_in_place(|| {
        match fault {
            Fault::Kill => cluster.nodes[victim].restart(),
            Fault::Stop => cluster.resume(victim),
        }
        cluster.wait_healed();
    });
    let healthy: Vec<&Call> = calls.iter().filter(|c| c.shard != shard).collect();
    let failed: Vec<&Call> = calls.iter().filter(|c| c.shard == shard).collect();
    let rate = |from: Duration, to: Duration| {
        let per_second = |calls: &[&Call]| {
            let n = calls
                .iter()
                .filter(|c| c.ended >= from && c.ended < to)
                .count();
            n as f64 / (to - from).as_secs_f64()
        };
        (per_second(&healthy), per_second(&failed))
    };
    let second = Duration::from_secs(1);
    Repetition {
        healthy_calls: healthy.len(),
        healthy_failures: healthy.iter().filter_map(|c| c.error.clone()).collect(),
        healthy_slowest: healthy.iter().map(|c| c.took).max().unwrap_or_default(),
        failed_calls: failed.len(),
        failed_failures: failed.iter().filter(|c| c.error.is_some()).count(),
        failover: promoted - faulted,
        failed_recovered_after: failed
            .iter()
            .filter(|c| c.error.is_some() && c.ended > promoted)
            .map(|c| c.ended - promoted)
            .max()
            .unwrap_or_default(),
        failed_last_error: failed
            .iter()
            .filter(|c| c.error.is_some())
            .max_by_key(|c| c.ended)
            .and_then(|c| c.error.clone()),
        redirections: calls.iter().filter(|c| c.redirected).count(),
        rate_before: rate(faulted - second, faulted),
        rate_after: rate(promoted + second, promoted + 2 * second),
    }
}

/// Five times, a primary (of each shard in turn) gets `fault` under a
/// stampede of 3 caches × 20 callers on 60 keys over the three shards; the
/// calls on the two healthy shards are counted apart from those on the
/// failed one.
async fn failover_repetitions(fault: Fault) {
    let mut cluster = tokio::task::block_in_place(|| Cluster::start(Duration::from_millis(1000)));
    let prefix = unique_prefix(&format!("c{fault:?}").to_lowercase());
    let mut caches = Vec::new();
    for _ in 0..3 {
        let cache = failover_cache(&cluster, &prefix).await;
        cache.ping().await.unwrap();
        caches.push(cache);
    }
    let keys: Vec<(String, usize)> = (0..60)
        .map(|i| {
            let key = format!("k{i}");
            let shard = shard_of(key_slot(&cluster, &caches[0].value_key(&key)));
            (key, shard)
        })
        .collect();
    for s in 0..3 {
        assert!(
            keys.iter().any(|(_, shard)| *shard == s),
            "no key on shard {s}"
        );
    }
    let mut broken = Vec::new();
    for rep in 0..REPETITIONS {
        let shard = rep % 3;
        let r = fail_one_primary(&mut cluster, &caches, &keys, shard, fault).await;
        let healthy_failed = r.healthy_failures.len();
        eprintln!(
            "cluster {fault:?} #{rep} (shard {shard}): healthy shards {healthy_failed} of {} calls \
             failed ({:.3} %), slowest {:?}; failed shard {} of {} calls failed, the last {:?} \
             after the promotion; failover {:?}; calls/s (healthy, failed shard) {:.0?} before, \
             {:.0?} from 1 to 2 s after the promotion; first healthy failures: {:?}; the failed shard's last failure: {:?}",
            r.healthy_calls,
            100.0 * healthy_failed as f64 / r.healthy_calls.max(1) as f64,
            r.healthy_slowest,
            r.failed_failures,
            r.failed_calls,
            r.failed_recovered_after,
            r.failover,
            r.rate_before,
            r.rate_after,
            &r.healthy_failures[..healthy_failed.min(3)],
            r.failed_last_error,
        );
        let bound = FAILOVER_COMMAND_TIMEOUT + ROUND_TRIP;
        if healthy_failed * 1000 > r.healthy_calls {
            broken.push(format!(
                "#{rep}: {healthy_failed} healthy-shard failures of {}",
                r.healthy_calls
            ));
        }
        if r.redirections > 0 {
            broken.push(format!(
                "#{rep}: {} raw redirections returned",
                r.redirections
            ));
        }
        if r.healthy_slowest > bound {
            broken.push(format!(
                "#{rep}: a healthy-shard call took {:?}",
                r.healthy_slowest
            ));
        }
        if r.failed_recovered_after > bound {
            broken.push(format!(
                "#{rep}: failed-shard calls still failed {:?} after the promotion",
                r.failed_recovered_after
            ));
        }
    }
    assert!(broken.is_empty(), "{broken:#?}");
}

/// A primary SIGKILLed, five times: the healthy shards do not notice
/// (at most 0.1 % of their calls fail, none takes longer than the command
/// timeout and a round trip), and the failed shard's calls are served by the
/// promoted replica within a command timeout of its promotion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_fails_only_its_own_slots_five_times() {
    failover_repetitions(Fault::Kill).await;
}

/// A primary SIGSTOPped (hung, its sockets open), five times; its replica is
/// promoted while it hangs, then it gets SIGCONT. The same bounds as for a
/// kill: nothing routes the hung node's slots to the promoted replica but
/// this crate (redis-rs refreshes its slots on `MOVED`, never on a timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_primary_fails_only_its_own_slots_five_times() {
    failover_repetitions(Fault::Stop).await;
}

/// `total_reads_processed` of a node (`INFO stats`): each read event, about
/// one per round trip a client makes to it.
fn reads_processed(node: &crate::support::RedisServer) -> u64 {
    node.info_number("stats", "total_reads_processed")
}

/// 150 keys over about as many slots: `get_many` and a `get_or_load_many`
/// of hits send one `MGET` per slot, and cold batches their lock, store and
/// release scripts one per slot, each in one pipeline per node (the node
/// reads about one request per pipeline, where a command per slot would be
/// ~50); answers come in the caller's order (duplicates and missing keys
/// included). After one slot moved to another primary (its commands answer
/// `MOVED` inside the old node's pipeline) and after every primary forgot
/// the scripts (`NOSCRIPT`), the failed chunks are sent again on their own:
/// every key answered, loaded once and stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_send_one_pipeline_per_node_and_follow_a_moved_slot() {
    let cluster = tokio::task::block_in_place(|| Cluster::start(Duration::from_secs(1)));
    let prefix = unique_prefix("cmany");
    let cache = cache_on(&cluster, &prefix).await;
    let keys: Vec<String> = (0..150).map(|i| format!("item:{i}")).collect();
    let entries: Vec<(String, String)> =
        keys.iter().map(|k| (k.clone(), format!("v-{k}"))).collect();
    cache.set_many(&entries).await.unwrap();
    let mut slots_of_shard = [BTreeSet::new(), BTreeSet::new(), BTreeSet::new()];
    for key in &keys {
        let slot = key_slot(&cluster, &cache.value_key(key));
        slots_of_shard[shard_of(slot)].insert(slot);
    }
    assert!(
        slots_of_shard.iter().all(|s| s.len() >= 20),
        "the keys should cover many slots of every shard: {slots_of_shard:?}"
    );
    // The caller's order, a duplicate and a key never stored.
    let mut asked: Vec<String> = keys.iter().rev().cloned().collect();
    asked.push(keys[3].clone());
    asked.push("never-stored".to_owned());
    let expected: Vec<Option<String>> = asked
        .iter()
        .map(|k| (k != "never-stored").then(|| format!("v-{k}")))
        .collect();

    let mgets = |node: &crate::support::RedisServer| -> u64 {
        node.command_stats().get("mget").copied().unwrap_or(0)
    };
    // Each node's share of the slots asked (the never-stored key's too).
    let mut asked_slots = [BTreeSet::new(), BTreeSet::new(), BTreeSet::new()];
    for key in &asked {
        let slot = key_slot(&cluster, &cache.value_key(key));
        asked_slots[shard_of(slot)].insert(slot);
    }
    const BATCHES: u64 = 50;
    let before: Vec<(u64, u64)> = cluster.nodes[..3]
        .iter()
        .map(|n| (mgets(n), reads_processed(n)))
        .collect();
    for _ in 0..BATCHES {
        let got: Vec<Option<String>> = cache.get_many(&asked).await.unwrap();
        assert_eq!(got, expected);
    }
    for (shard, node) in cluster.nodes[..3].iter().enumerate() {
        let (mget_before, reads_before) = before[shard];
        let slots = asked_slots[shard].len() as u64;
        let mget_calls = mgets(node) - mget_before;
        // Besides the batches' reads: this check's own INFO reads, the
        // replica's acknowledgements and the cluster bus.
        let reads = reads_processed(node) - reads_before;
        eprintln!(
            "shard {shard}: {slots} slots, {BATCHES} batches: {mget_calls} MGETs, {reads} reads"
        );
        assert_eq!(mget_calls, BATCHES * slots, "one MGET per slot per batch");
        assert!(
            reads <= 2 * BATCHES + 20,
            "shard {shard}: {reads} reads for {BATCHES} batches of {slots} slots: \
             the MGETs were not pipelined per node"
        );
    }

    // Cold batches: the lock, store and release scripts go one per slot too,
    // in one pipeline per node each (with the MGET: four round trips per
    // node and batch; a script per slot sent alone would be ~150 each).
    const COLD: u64 = 10;
    let evalshas = |node: &crate::support::RedisServer| -> u64 {
        node.command_stats().get("evalsha").copied().unwrap_or(0)
    };
    let cold_batches: Vec<Vec<String>> = (0..COLD)
        .map(|b| (0..150).map(|i| format!("cold{b}:{i}")).collect())
        .collect();
    let mut cold_slots = [0u64; 3];
    for batch in &cold_batches {
        let mut slots = [BTreeSet::new(), BTreeSet::new(), BTreeSet::new()];
        for key in batch {
            let slot = key_slot(&cluster, &cache.value_key(key));
            slots[shard_of(slot)].insert(slot);
        }
        for (shard, slots) in slots.iter().enumerate() {
            cold_slots[shard] += slots.len() as u64;
        }
    }
    let before: Vec<(u64, u64)> = cluster.nodes[..3]
        .iter()
        .map(|n| (evalshas(n), reads_processed(n)))
        .collect();
    let loads = Arc::new(AtomicU32::new(0));
    for batch in &cold_batches {
        let loads = Arc::clone(&loads);
        let got: Vec<Option<String>> = cache
            .get_or_load_many(batch, move |missing: Vec<String>| {
                loads.fetch_add(1, Ordering::SeqCst);
                async move { Ok::<_, String>(v_values(missing)) }
            })
            .await
            .unwrap();
        let expected = v_expected(batch);
        assert_eq!(got, expected);
    }
    assert_eq!(
        loads.load(Ordering::SeqCst),
        COLD as u32,
        "one loader call per batch"
    );
    // The releases run after the answers: wait until every lock is gone.
    let released = crate::support::eventually(Duration::from_secs(5), || async {
        cluster.nodes[..3].iter().all(|n| {
            let locks: Vec<String> = n.query(&["KEYS", &format!("lock.{prefix}*")]);
            locks.is_empty()
        })
    })
    .await;
    assert!(released, "the cold batches' locks were not all released");
    for (shard, node) in cluster.nodes[..3].iter().enumerate() {
        let (evalsha_before, reads_before) = before[shard];
        let scripts = evalshas(node) - evalsha_before;
        let reads = reads_processed(node) - reads_before;
        eprintln!(
            "shard {shard}: {COLD} cold batches over {} slots: {scripts} scripts, {reads} reads",
            cold_slots[shard]
        );
        assert_eq!(
            scripts,
            3 * cold_slots[shard],
            "lock, store, release per slot"
        );
        assert!(
            reads <= 2 * 4 * COLD + 40,
            "shard {shard}: {reads} reads for {COLD} cold batches: the scripts were not \
             pipelined per node"
        );
    }

    // A get_or_load_many of hits (with a stale window: MGET + PTTLs) takes
    // the same path and loads nothing.
    let stale_cache = LockedCache::builder()
        .cluster(cluster.urls())
        .key_prefix(&prefix)
        .ttl(MINUTE)
        .call_options(locked_cache::CallOptions::new().stale_for(Duration::from_secs(5)))
        .command_timeout(Duration::from_millis(500))
        .build()
        .await
        .unwrap();
    let got: Vec<Option<String>> = stale_cache
        .get_or_load_many(&keys, |missing: Vec<String>| async move {
            Err::<Vec<(String, String)>, _>(format!("loaded {missing:?}"))
        })
        .await
        .unwrap();
    assert_eq!(got, v_expected(&keys));

    // Move the slot of one key to another primary: the caches' shard
    // groups still send it to the old node, which answers MOVED.
    let moved_key = &keys[7];
    let slot = key_slot(&cluster, &cache.value_key(moved_key));
    let src = cluster.primary_of(slot);
    let dst = (src + 1) % 3;
    tokio::task::block_in_place(|| {
        let src_id: String = cluster.nodes[src].query(&["CLUSTER", "MYID"]);
        let dst_id: String = cluster.nodes[dst].query(&["CLUSTER", "MYID"]);
        let slot_s = slot.to_string();
        cluster.nodes[dst].cmd(&["CLUSTER", "SETSLOT", &slot_s, "IMPORTING", &src_id]);
        cluster.nodes[src].cmd(&["CLUSTER", "SETSLOT", &slot_s, "MIGRATING", &dst_id]);
        loop {
            let batch: Vec<String> =
                cluster.nodes[src].query(&["CLUSTER", "GETKEYSINSLOT", &slot_s, "100"]);
            if batch.is_empty() {
                break;
            }
            let port = cluster.nodes[dst].port().to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(batch.iter().map(String::as_str));
            let _: redis::Value = cluster.nodes[src].query(&args);
        }
        for node in &cluster.nodes[..3] {
            node.cmd(&["CLUSTER", "SETSLOT", &slot_s, "NODE", &dst_id]);
        }
    });
    assert_eq!(cluster.primary_of(slot), dst, "the slot moved");
    // The old node refuses the moved slot's MGET (`MOVED`, counted in its
    // `rejected_calls`) in the first batch only: the slot is then grouped
    // with its new node.
    let rejected_mgets = |node: &crate::support::RedisServer| -> u64 {
        let info: String = node.query(&["INFO", "commandstats"]);
        info.lines()
            .find_map(|l| l.trim().strip_prefix("cmdstat_mget:"))
            .and_then(|f| f.split(',').find_map(|f| f.strip_prefix("rejected_calls=")))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let mut rejected = vec![rejected_mgets(&cluster.nodes[src])];
    for cache in [&cache, &stale_cache] {
        for _ in 0..3 {
            let got: Vec<Option<String>> = cache.get_many(&asked).await.unwrap();
            assert_eq!(got, expected);
            rejected.push(rejected_mgets(&cluster.nodes[src]));
        }
    }
    eprintln!("MGETs the old node refused, after each batch: {rejected:?}");
    for cache_batches in rejected[1..].chunks(3) {
        assert_eq!(
            cache_batches[1], cache_batches[2],
            "a cache kept sending the moved slot to its old node: {rejected:?}"
        );
    }
    let got: Vec<Option<String>> = stale_cache
        .get_or_load_many(&keys, |missing: Vec<String>| async move {
            Err::<Vec<(String, String)>, _>(format!("loaded {missing:?}"))
        })
        .await
        .unwrap();
    assert_eq!(got.iter().filter(|v| v.is_some()).count(), keys.len());

    // A cold batch with keys in the moved slot (their scripts answer MOVED in
    // the old node's pipeline), then one after every primary forgot the
    // scripts (NOSCRIPT in the pipelines): each chunk that failed in its
    // pipeline is sent again on its own, and every key loads once.
    // The moved key, made cold again.
    assert!(cache.invalidate(moved_key).await.unwrap());
    for (round, flush) in [(0, false), (1, true)] {
        if flush {
            for node in &cluster.nodes[..3] {
                node.cmd(&["SCRIPT", "FLUSH"]);
            }
        }
        let mut batch: Vec<String> = (0..60).map(|i| format!("late{round}:{i}")).collect();
        if round == 0 {
            batch.push(moved_key.clone());
        }
        let loads = Arc::new(AtomicU32::new(0));
        let counted = Arc::clone(&loads);
        let got: Vec<Option<String>> = cache
            .get_or_load_many(&batch, move |missing: Vec<String>| {
                counted.fetch_add(missing.len() as u32, Ordering::SeqCst);
                async move { Ok::<_, String>(v_values(missing)) }
            })
            .await
            .unwrap();
        let expected = v_expected(&batch);
        assert_eq!(got, expected, "round {round}");
        assert_eq!(loads.load(Ordering::SeqCst), batch.len() as u32);
        let again: Vec<Option<String>> = cache.get_many(&batch).await.unwrap();
        assert_eq!(again, expected, "round {round}: stored");
    }

    // `invalidate_many` over every slot of the 150 keys (one pipeline per
    // node): all gone.
    cache.invalidate_many(&keys).await.unwrap();
    let gone: Vec<Option<String>> = cache.get_many(&keys).await.unwrap();
    assert!(gone.iter().all(Option::is_none), "{gone:?}");
}

/// Cold batches while a primary is down, counted by where their keys live.
/// A primary is SIGKILLed while a batch over every shard is loading: that
/// batch returns what it loaded (its store fails on the dead shard: counted
/// in `store_errors`, the values returned uncached) within a bounded time.
/// Until the replica is promoted, batches whose keys are all on the healthy
/// shards load and store as before, and batches that touch the failed shard
/// fail typed and fast; after the promotion every batch works: the first
/// batch's keys on the healthy shards were stored (not loaded again), those
/// on the failed shard load once more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_mid_batch_fails_only_batches_on_its_shard() {
    batch_through_a_failover(Fault::Kill).await;
}

/// The same with the primary SIGSTOPped (hung, its sockets open) instead:
/// nothing hangs. The batch loading when it froze returns within its
/// store's command timeout; batches on the healthy shards answer; batches
/// touching the hung shard time out, typed, each within a command timeout
/// and a round trip; after the promotion (and SIGCONT) every batch works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_hung_mid_batch_fails_only_batches_on_its_shard() {
    batch_through_a_failover(Fault::Stop).await;
}

async fn batch_through_a_failover(fault: Fault) {
    let mut cluster = tokio::task::block_in_place(|| Cluster::start(Duration::from_millis(1000)));
    let prefix = unique_prefix("cbatchkill");
    // A TTL of a minute: what the first batch stored outlives the outage.
    let cache = cache_on(&cluster, &prefix).await;
    cache.ping().await.unwrap();
    // The victim: shard 1's primary (not node 0, the first seed).
    let victim = cluster.primary_of(SHARD_FIRST_SLOTS[1]);
    // Fresh keys by shard, found before the kill (each used once).
    let mut pool: [Vec<String>; 3] = Default::default();
    for i in 0..3000 {
        let key = format!("p:{i}");
        pool[shard_of(key_slot(&cluster, &cache.value_key(&key)))].push(key);
    }
    let mut shard_keys = |shard: usize, n: usize| -> Vec<String> {
        let from = pool[shard].len().saturating_sub(n);
        pool[shard].split_off(from)
    };
    let mut first: Vec<String> = Vec::new();
    for shard in 0..3 {
        first.extend(shard_keys(shard, 20));
    }
    let loads: Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>> = Arc::default();
    let loader = |loads: Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>>,
                  gate: Option<Arc<tokio::sync::Notify>>| {
        move |missing: Vec<String>| {
            let (loads, gate) = (Arc::clone(&loads), gate.clone());
            async move {
                for k in &missing {
                    *loads.lock().unwrap().entry(k.clone()).or_default() += 1;
                }
                if let Some(gate) = gate {
                    gate.notified().await;
                }
                Ok::<_, String>(v_values(missing))
            }
        }
    };
    let expected = |keys: &[String]| v_expected(keys);

    let gate = Arc::new(tokio::sync::Notify::new());
    let batch = tokio::spawn({
        let (cache, keys, loads) = (cache.clone(), first.clone(), Arc::clone(&loads));
        let load = loader(loads, Some(Arc::clone(&gate)));
        async move { cache.get_or_load_many(&keys, load).await }
    });
    while loads.lock().unwrap().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Let the locks and fences reach the replicas, then kill the primary.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let store_errors = cache.stats().store_errors;
    tokio::task::block_in_place(|| match fault {
        Fault::Kill => cluster.nodes[victim].kill(),
        Fault::Stop => cluster.pause(victim),
    });
    let killed = Instant::now();
    gate.notify_one();
    let got = join_all_checked(vec![batch]).await.remove(0);
    let took = killed.elapsed();
    assert_eq!(
        got.unwrap(),
        expected(&first),
        "the batch returns what it loaded"
    );
    assert!(took < Duration::from_secs(3), "the batch took {took:?}");
    assert!(
        cache.stats().store_errors > store_errors,
        "the store on the dead shard failed, and was counted"
    );

    // During the outage.
    let failed_over =
        |c: &Cluster| c.primary_of(SHARD_FIRST_SLOTS[1]) != victim && !cluster_not_ok(c);
    let (mut healthy_ok, mut failed_errors, mut round) = (0, 0, 0);
    while !failed_over(&cluster) && killed.elapsed() < Duration::from_secs(15) {
        round += 1;
        let mut healthy = shard_keys(0, 5);
        healthy.extend(shard_keys(2, 5));
        let began = Instant::now();
        let got = cache
            .get_or_load_many(&healthy, loader(Arc::clone(&loads), None))
            .await;
        assert!(
            began.elapsed() < Duration::from_secs(2),
            "{:?}",
            began.elapsed()
        );
        assert_eq!(
            got.expect("a batch on the healthy shards"),
            expected(&healthy)
        );
        healthy_ok += 1;
        let mut mixed = shard_keys(0, 3);
        mixed.extend(shard_keys(1, 3));
        let began = Instant::now();
        let got = cache
            .get_or_load_many(&mixed, loader(Arc::clone(&loads), None))
            .await;
        let took = began.elapsed();
        assert!(
            took < Duration::from_secs(3),
            "a batch on the failed shard took {took:?}"
        );
        match got {
            Ok(values) => assert_eq!(values, expected(&mixed)),
            Err(LoadError::Cache(e)) => {
                failed_errors += 1;
                assert!(
                    e.is_connection_error() || e.is_timeout() || e.is_error_reply(),
                    "{e}"
                );
            }
            Err(e) => panic!("{e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::task::block_in_place(|| cluster.wait_until("the replica took over", failed_over));
    let failover = killed.elapsed();
    if fault == Fault::Stop {
        // Thawed, it rejoins as a replica of the promoted one.
        tokio::task::block_in_place(|| {
            cluster.resume(victim);
            cluster.wait_healed();
        });
    }

    // After the promotion: the first batch's keys answer (those whose store
    // was lost load once more), and new batches over every shard work.
    let began = Instant::now();
    let again = loop {
        match cache
            .get_or_load_many(&first, loader(Arc::clone(&loads), None))
            .await
        {
            Ok(values) => break values,
            Err(e) if began.elapsed() < Duration::from_secs(5) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("after the failover: {e:?}"),
        }
    };
    assert_eq!(again, expected(&first));
    let mut after: Vec<String> = Vec::new();
    for shard in 0..3 {
        after.extend(shard_keys(shard, 10));
    }
    let got = cache
        .get_or_load_many(&after, loader(Arc::clone(&loads), None))
        .await
        .expect("a batch over every shard after the failover");
    assert_eq!(got, expected(&after));
    let loads = loads.lock().unwrap();
    let twice = first.iter().filter(|k| loads.get(*k) == Some(&2)).count();
    let healthy_twice = first
        .iter()
        .filter(|k| loads.get(*k) == Some(&2))
        .filter(|k| shard_of(key_slot(&cluster, &cache.value_key(k))) != 1)
        .count();
    assert!(
        loads.values().all(|&n| n <= 2),
        "a key loaded more than twice: {:?}",
        loads.iter().filter(|(_, n)| **n > 2).collect::<Vec<_>>()
    );
    assert!(
        after.iter().all(|k| loads.get(k) == Some(&1)),
        "the batch after the failover loaded each key once"
    );
    assert_eq!(
        healthy_twice, 0,
        "the first batch's stores on the healthy shards were lost"
    );
    eprintln!(
        "cluster batch, primary of shard 1 {fault:?} mid-load: the batch answered in {took:?}; \
         {healthy_ok} batches on the healthy shards all answered during the outage, \
         {failed_errors} of {round} batches touching the failed shard failed typed; \
         failover after {failover:?}; {twice} of {} first-batch keys loaded again \
         ({healthy_twice} of them on the healthy shards)",
        first.len()
    );
    assert!(healthy_ok > 0, "no batch ran during the outage");
}
