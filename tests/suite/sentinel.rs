//! Redis Sentinel (feature `sentinel`): 1 master, 1 replica, 3 Sentinels;
//! the master SIGKILLed under traffic. Calls resume on the promoted replica
//! within the failover plus one command timeout, and none hangs.
#![cfg(feature = "sentinel")]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::sentinel::{MASTER_NAME, SentinelGroup};
use crate::support::unique_prefix;
use locked_cache::LockedCache;

const COMMAND_TIMEOUT: Duration = Duration::from_millis(500);

/// One call: when it started and ended (from the test's start), and whether
/// it got the value.
#[derive(Debug, Clone)]
struct Call {
    started: Duration,
    took: Duration,
    ok: Result<(), String>,
}

/// How the master goes.
#[derive(Debug, Clone, Copy)]
enum Failover {
    /// SIGKILL: its connections die.
    Kill,
    /// `SENTINEL FAILOVER`: it stays up, demoted to a replica, and answers
    /// writes with `READONLY` on the connections it keeps.
    Manual,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_is_followed_to_the_promoted_replica() {
    failover_under_traffic(Failover::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demoted_master_is_left_for_the_promoted_replica() {
    failover_under_traffic(Failover::Manual).await;
}

/// 16 callers in two caches on 20 keys expiring every 200 ms; after 2 s the
/// master goes (`how`): no call failed before, none started later than the
/// promotion plus one command timeout (and 200 ms) fails, and none hangs.
async fn failover_under_traffic(how: Failover) {
    let mut group =
        tokio::task::block_in_place(|| SentinelGroup::start(Duration::from_millis(1000)));
    let old_master = group.servers[0].port();
    let prefix = unique_prefix("sentinel");
    let build = || {
        LockedCache::builder()
            .sentinel(MASTER_NAME, group.sentinel_urls())
            .key_prefix(&prefix)
            .ttl(Duration::from_millis(200))
            .command_timeout(COMMAND_TIMEOUT)
            .wait_time(Duration::from_secs(3))
            .build()
    };
    let caches = [build().await.expect("build"), build().await.expect("build")];
    assert_eq!(
        caches[0]
            .get_or_load("warm", || async { Ok::<_, String>(1u32) })
            .await
            .unwrap(),
        1
    );
    let t0 = Instant::now();
    let calls = Arc::new(Mutex::new(Vec::<Call>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (c, cache) in caches.iter().enumerate() {
        for t in 0..8u32 {
            let (cache, calls, stop) = (cache.clone(), Arc::clone(&calls), Arc::clone(&stop));
            tasks.push(tokio::spawn(async move {
                let mut i = t * 7 + c as u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    i = i.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                    let key = format!("k{}", (i >> 16) % 20);
                    let started = t0.elapsed();
                    let got = cache
                        .get_or_load(&key, || async {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            Ok::<_, String>(9u32)
                        })
                        .await;
                    let call = Call {
                        started,
                        took: t0.elapsed() - started,
                        ok: match got {
                            Ok(9) => Ok(()),
                            other => Err(format!("{other:?}")),
                        },
                    };
                    calls.lock().unwrap().push(call);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_at = t0.elapsed();
    match how {
        Failover::Kill => group.servers[0].kill(),
        Failover::Manual => {
            let sentinel = group.sentinels[0].port;
            tokio::task::block_in_place(|| {
                let client = redis::Client::open(format!("redis://127.0.0.1:{sentinel}")).unwrap();
                let mut con = client.get_connection().unwrap();
                let _: () = redis::cmd("SENTINEL")
                    .arg("FAILOVER")
                    .arg(MASTER_NAME)
                    .query(&mut con)
                    .expect("SENTINEL FAILOVER");
            });
        }
    }
    // The promotion, as the Sentinels report it.
    let switched_at = tokio::task::block_in_place(|| {
        group.wait_until("a replica is promoted", |g| {
            g.master_port().is_some_and(|p| p != old_master)
        });
        t0.elapsed()
    });
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in tasks {
        task.await.expect("traffic task");
    }
    let calls = calls.lock().unwrap().clone();
    let resumed_by = switched_at + COMMAND_TIMEOUT + Duration::from_millis(200);
    let before: Vec<&Call> = calls
        .iter()
        .filter(|c| c.started + c.took < killed_at)
        .collect();
    let after: Vec<&Call> = calls.iter().filter(|c| c.started >= resumed_by).collect();
    let failed_between = calls
        .iter()
        .filter(|c| c.started + c.took >= killed_at && c.started < resumed_by && c.ok.is_err())
        .count();
    let first_ok_after_kill = calls
        .iter()
        .filter(|c| c.started >= killed_at && c.ok.is_ok())
        .map(|c| c.started + c.took)
        .min();
    let slowest = calls.iter().map(|c| c.took).max().unwrap();
    eprintln!(
        "sentinel failover ({how:?}): master gone at {killed_at:?}, promoted at {switched_at:?} ({:?} later), \
         first call ok after the kill ended at {first_ok_after_kill:?}; {} calls before, \
         {failed_between} failed in between, {} after {resumed_by:?}; slowest call {slowest:?}",
        switched_at - killed_at,
        before.len(),
        after.len()
    );
    assert!(
        before.iter().all(|c| c.ok.is_ok()),
        "a call failed before the kill"
    );
    assert!(
        after.len() > 100,
        "too few calls after the promotion: {}",
        after.len()
    );
    let failed_after: Vec<&&Call> = after.iter().filter(|c| c.ok.is_err()).collect();
    assert!(
        failed_after.is_empty(),
        "{} calls failed after the promotion + one command timeout, first {:?}",
        failed_after.len(),
        failed_after.first()
    );
    // No call hangs: none outlives the lock wait time plus a few command timeouts.
    assert!(slowest < Duration::from_secs(5), "a call took {slowest:?}");
    // Writes go to the promoted replica.
    caches[0]
        .set("probe", &5u32)
        .await
        .expect("set after the failover");
    let new_master = group.master_port().unwrap();
    let on_new: Vec<String> = group
        .servers
        .iter()
        .filter(|s| s.port() == new_master)
        .map(|s| {
            s.query::<Vec<String>>(&["KEYS", &format!("*{prefix}*probe*")])
                .join(" ")
        })
        .collect();
    assert_eq!(on_new.len(), 1, "the promoted master is not one of ours");
    assert!(
        on_new[0].contains("probe"),
        "the write did not reach the promoted master: {on_new:?}"
    );
    assert_eq!(caches[1].get::<u32>("probe").await.unwrap(), Some(5));
}
