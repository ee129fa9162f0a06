//! The semaphore on a real redis-server: the permit count under contention
//! from several Redlocks, wake-ups when a permit is freed, expiring permits
//! of a holder that vanished, the server killed mid-hold, and the refusal to
//! run on several masters.

use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::support::{Fleet, RedisServer, join_all_checked, redlock_on, unique_prefix};
use locked_cache::{Error, LockLost, LockOptions};

/// 200 holders from 4 Redlocks take one of 3 permits: never more than 3
/// inside, and 3 at once is reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_more_holders_than_permits() {
    const HOLDERS: usize = 200;
    let server = RedisServer::start();
    let options = LockOptions {
        wait: Duration::from_secs(60),
        retry: Duration::from_millis(20),
        ..LockOptions::default()
    };
    let mut sems = Vec::new();
    let name = format!("{}pool", unique_prefix("sem"));
    for _ in 0..4 {
        let lock = redlock_on(&[server.url()], options.clone()).await;
        sems.push(lock.semaphore(&name, 3).unwrap());
    }
    let inside = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..HOLDERS {
        let (sem, inside, most) = (sems[i % 4].clone(), Arc::clone(&inside), Arc::clone(&most));
        tasks.push(tokio::spawn(async move {
            let permit = sem.acquire().await.expect("permit");
            let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
            assert!(now <= 3, "{now} holders of 3 permits");
            most.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(3)).await;
            inside.fetch_sub(1, Ordering::SeqCst);
            assert!(permit.release().await.unwrap());
        }));
    }
    join_all_checked(tasks).await;
    assert_eq!(
        most.load(Ordering::SeqCst),
        3,
        "the permits were never all used"
    );
    let info = sems[0].inspect().await.unwrap();
    assert!(info.holders.is_empty(), "{info:?}");
    eprintln!(
        "semaphore: {HOLDERS} holders of 3 permits, at most 3 at once, in {:?}",
        started.elapsed()
    );
}

/// With a 2 s retry time, a waiter for a permit gets it within 300 ms of the
/// release (the release is published), in another Redlock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freed_permit_wakes_a_waiter() {
    let server = RedisServer::start();
    let options = LockOptions {
        retry: Duration::from_secs(2),
        ..LockOptions::default()
    };
    let name = format!("{}one", unique_prefix("sem"));
    let a = redlock_on(&[server.url()], options.clone())
        .await
        .semaphore(&name, 1)
        .unwrap();
    let b = redlock_on(&[server.url()], options)
        .await
        .semaphore(&name, 1)
        .unwrap();
    let held = a.acquire().await.unwrap();
    let waiting = tokio::spawn(async move {
        let permit = b.acquire().await.expect("permit");
        (Instant::now(), permit)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let released = Instant::now();
    held.release().await.unwrap();
    let (got, _permit) = join_all_checked(vec![waiting]).await.remove(0);
    let latency = got - released;
    assert!(
        latency < Duration::from_millis(300),
        "woken after {latency:?}"
    );
    eprintln!("semaphore wake-up: permit taken {latency:?} after the release (retry 2 s)");
}

/// A holder that vanished without releasing (no watchdog, guard forgotten)
/// frees its permit at its expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permit_whose_holder_vanished_expires() {
    let server = RedisServer::start();
    let expiry = Duration::from_millis(300);
    let options = LockOptions {
        expiry,
        watchdog: false,
        ..LockOptions::default()
    };
    let sem = redlock_on(&[server.url()], options)
        .await
        .semaphore(&format!("{}x", unique_prefix("sem")), 1)
        .unwrap();
    let vanished = sem.acquire().await.unwrap();
    std::mem::forget(vanished);
    let started = Instant::now();
    assert!(sem.try_acquire(expiry).await.unwrap().is_none());
    let _permit = sem.acquire().await.expect("the permit after expiry");
    let after = started.elapsed();
    assert!(
        after >= expiry / 2 && after <= expiry + Duration::from_millis(300),
        "{after:?}"
    );
}

/// The server is SIGKILLed while a permit is held: the holder's lost signal
/// fires (the validity runs out, extensions failing), acquisitions fail with
/// a typed error; after a restart, permits are free again (the state was lost
/// with the server: a semaphore is as durable as its server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_killed_mid_hold_signals_the_loss_and_recovers() {
    let mut fleet = Fleet::start(1);
    let expiry = Duration::from_millis(400);
    let options = LockOptions {
        expiry,
        wait: Duration::from_millis(300),
        ..LockOptions::default()
    };
    let lock = redlock_on(&fleet.urls(), options).await;
    let sem = lock
        .semaphore(&format!("{}k", unique_prefix("sem")), 1)
        .unwrap();
    let permit = sem.acquire().await.unwrap();
    fleet.kill(0);
    let killed = Instant::now();
    let reason = tokio::time::timeout(expiry * 3, permit.lost())
        .await
        .expect("lost signal");
    assert!(
        matches!(
            reason,
            LockLost::Expired {
                last_error: Some(_)
            }
        ),
        "{reason:?}"
    );
    let lost_after = killed.elapsed();
    let err = sem.acquire().await.unwrap_err();
    assert!(
        err.is_quorum_error() || err.is_connection_error(),
        "{err:?}"
    );
    fleet.restart(0);
    assert!(
        support::eventually(Duration::from_secs(5), || async {
            matches!(sem.try_acquire(expiry).await, Ok(Some(_)))
        })
        .await
    );
    eprintln!(
        "semaphore server killed: lost signal after {lost_after:?} ({reason}); free again after restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_semaphore_refuses_several_masters() {
    let fleet = Fleet::start(3);
    let lock = redlock_on(&fleet.urls(), LockOptions::default()).await;
    let err = lock.semaphore("s", 2).unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
    let single = redlock_on(&fleet.urls()[..1], LockOptions::default()).await;
    assert!(single.semaphore("s", 0).is_err());
}
