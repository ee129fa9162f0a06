//! The lock toolkit on the 3 + 3 Redis Cluster (feature `cluster`): the
//! exclusive lock, reader-writer lock, semaphore, multi-key lock (names on
//! one hash tag; others refused with a typed error naming the rule), run-once
//! and `inspect`, and a primary killed mid-hold.
#![cfg(feature = "cluster")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::support::cluster::Cluster;
use crate::support::unique_prefix;
use locked_cache::{
    ClusterOptions, ClusterStore, ConnectionOptions, LockOptions, Redlock, SharedStore,
};

async fn redlock(cluster: &Cluster) -> Redlock {
    let store = ClusterStore::open(
        &cluster.urls(),
        ConnectionOptions::default(),
        ClusterOptions::default(),
    )
    .expect("cluster store");
    let options = LockOptions {
        expiry: Duration::from_millis(1500),
        wait: Duration::from_secs(5),
        retry: Duration::from_millis(50),
        ..LockOptions::default()
    };
    Redlock::new(vec![Arc::new(store) as SharedStore], options)
        .await
        .expect("redlock on the cluster")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_lock_primitive_works_on_a_cluster() {
    let cluster = tokio::task::block_in_place(|| Cluster::start(Duration::from_secs(1)));
    let lock = redlock(&cluster).await;
    let p = unique_prefix("toolkit");

    // Exclusive: one holder at a time, across names on every shard.
    for i in 0..12 {
        let name = format!("{p}:x{i}");
        let guard = lock.acquire(&name).await.expect("acquire");
        assert!(
            lock.try_acquire(&name, Duration::from_secs(1))
                .await
                .unwrap()
                .is_none(),
            "{name} twice"
        );
        let info = lock.inspect(&name).await.expect("inspect");
        assert_eq!(info.holders.len(), 1, "{name}: {info:?}");
        assert!(guard.release().await.unwrap());
        assert!(lock.inspect(&name).await.unwrap().holders.is_empty());
    }

    // Reader-writer: readers share, a writer excludes them.
    let rw = lock.rw_lock(&format!("{p}:rw"));
    let (r1, r2) = (
        rw.read().await.expect("read 1"),
        rw.read().await.expect("read 2"),
    );
    assert!(
        rw.try_write(Duration::from_secs(1))
            .await
            .unwrap()
            .is_none(),
        "a writer beside readers"
    );
    assert_eq!(rw.inspect().await.unwrap().holders.len(), 2);
    r1.release().await.unwrap();
    r2.release().await.unwrap();
    let w = rw.write().await.expect("write");
    assert!(
        rw.try_read(Duration::from_secs(1)).await.unwrap().is_none(),
        "a reader beside the writer"
    );
    w.release().await.unwrap();

    // Semaphore: 3 permits, the fourth refused until one is given back.
    let sem = lock.semaphore(&format!("{p}:sem"), 3).unwrap();
    let mut permits = Vec::new();
    for _ in 0..3 {
        permits.push(sem.acquire().await.expect("permit"));
    }
    assert!(
        sem.try_acquire(Duration::from_secs(1))
            .await
            .unwrap()
            .is_none(),
        "a fourth permit"
    );
    assert_eq!(sem.inspect().await.unwrap().holders.len(), 3);
    permits.pop().unwrap().release().await.unwrap();
    permits.push(
        sem.try_acquire(Duration::from_secs(1))
            .await
            .unwrap()
            .expect("a freed permit"),
    );
    for permit in permits {
        permit.release().await.unwrap();
    }

    // Multi-key: names on one hash tag are taken together.
    let tagged = [format!("{{{p}:order}}:row"), format!("{{{p}:order}}:stock")];
    let names: Vec<&str> = tagged.iter().map(String::as_str).collect();
    let all = lock
        .acquire_all(&names)
        .await
        .expect("acquire_all on one hash tag");
    assert_eq!(all.fencing_tokens().len(), 2);
    assert!(
        lock.try_acquire(&tagged[1], Duration::from_secs(1))
            .await
            .unwrap()
            .is_none()
    );
    all.release().await.unwrap();
    // Names on different slots: a typed error that names the rule.
    let spread = [format!("{p}:a"), format!("{p}:b"), format!("{p}:c")];
    let names: Vec<&str> = spread.iter().map(String::as_str).collect();
    let err = lock
        .acquire_all(&names)
        .await
        .expect_err("names on several slots");
    assert!(err.is_invalid_input(), "{err:?}");
    assert!(err.to_string().contains("hash tag"), "{err}");

    // Run once: of 6 concurrent callers, one runs the action.
    let ran = Arc::new(AtomicU32::new(0));
    let job = format!("{p}:job");
    let runs: Vec<_> = (0..6)
        .map(|_| {
            let (lock, ran, job) = (lock.clone(), Arc::clone(&ran), job.clone());
            tokio::spawn(async move {
                lock.run_once(&job, Duration::from_secs(60), || async move {
                    ran.fetch_add(1, Ordering::SeqCst);
                })
                .await
                .expect("run_once")
                .ran()
            })
        })
        .collect();
    let mut ran_here = 0;
    for run in runs {
        ran_here += u32::from(run.await.unwrap());
    }
    assert_eq!((ran.load(Ordering::SeqCst), ran_here), (1, 1));
}

/// A holder whose shard's primary is SIGKILLed mid-hold: the replica takes
/// over; the lock is either still held (the replica had it) or free, and
/// either way a new holder gets a higher fencing token than the old one,
/// and the toolkit works again within the failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_mid_hold_leaves_a_working_lock_with_rising_tokens() {
    let mut cluster = tokio::task::block_in_place(|| Cluster::start(Duration::from_secs(1)));
    let lock = redlock(&cluster).await;
    let name = format!("{}:held", unique_prefix("kill"));
    let guard = lock.acquire(&name).await.expect("acquire");
    let token = guard.fencing_token();
    let slot: u16 = cluster.live_node().query(&["CLUSTER", "KEYSLOT", &name]);
    let primary = cluster.primary_of(slot);
    // Give the replica time to receive the lock key and its fence.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let killed = Instant::now();
    tokio::task::block_in_place(|| cluster.nodes[primary].kill());
    drop(guard);
    let next = lock
        .acquire_with(&name, Duration::from_millis(1500), Duration::from_secs(15))
        .await
        .expect("a holder after the failover");
    let after = killed.elapsed();
    eprintln!("cluster lock: primary {primary} killed mid-hold, lock taken again {after:?} later");
    assert!(
        next.fencing_token() > token,
        "token {} after {token}",
        next.fencing_token()
    );
    next.release().await.unwrap();
    let rw = lock.rw_lock(&name);
    rw.write()
        .await
        .expect("rw lock on the failed-over shard")
        .release()
        .await
        .unwrap();
}
