//! The reader-writer lock over fleets of real redis-server processes: many
//! readers or one writer on 1, 3 and 5 masters under contention from several
//! Redlocks, and writers not starved by a steady stream of readers.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::support::{Fleet, join_all_checked, redlock_on, unique_prefix};
use locked_cache::LockOptions;

/// 200 callers from 4 Redlocks (one writer in five) take the lock; a writer is
/// never inside with anyone, readers share it (several at once are seen).
async fn readers_or_one_writer(masters: usize) {
    const CALLS: usize = 200;
    let fleet = Fleet::start(masters);
    let options = LockOptions {
        wait: Duration::from_secs(60),
        retry: Duration::from_millis(20),
        ..LockOptions::default()
    };
    let mut locks = Vec::new();
    for _ in 0..4 {
        locks.push(redlock_on(&fleet.urls(), options.clone()).await);
    }
    let name = format!("{}rw", unique_prefix("rw"));
    let readers = Arc::new(AtomicUsize::new(0));
    let writers = Arc::new(AtomicUsize::new(0));
    let most_readers = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..CALLS {
        let rw = locks[i % locks.len()].rw_lock(&name);
        let (readers, writers, most) = (
            Arc::clone(&readers),
            Arc::clone(&writers),
            Arc::clone(&most_readers),
        );
        tasks.push(tokio::spawn(async move {
            if i % 5 == 0 {
                let guard = rw.write().await.expect("write");
                assert_eq!(writers.fetch_add(1, Ordering::SeqCst), 0, "two writers");
                assert_eq!(readers.load(Ordering::SeqCst), 0, "a writer with readers");
                tokio::time::sleep(Duration::from_millis(2)).await;
                assert_eq!(readers.load(Ordering::SeqCst), 0, "a reader got in");
                writers.fetch_sub(1, Ordering::SeqCst);
                assert!(guard.release().await.unwrap());
            } else {
                let guard = rw.read().await.expect("read");
                let now = readers.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                assert_eq!(writers.load(Ordering::SeqCst), 0, "a reader with a writer");
                tokio::time::sleep(Duration::from_millis(5)).await;
                assert_eq!(writers.load(Ordering::SeqCst), 0, "a writer got in");
                readers.fetch_sub(1, Ordering::SeqCst);
                assert!(guard.release().await.unwrap());
            }
        }));
    }
    join_all_checked(tasks).await;
    let most = most_readers.load(Ordering::SeqCst);
    assert!(most > 1, "readers never shared the lock");
    eprintln!(
        "rw lock on {masters} masters: {CALLS} calls (40 writers), writers alone, up to {most} readers at once, in {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_readers_or_one_writer_on_1_master() {
    readers_or_one_writer(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_readers_or_one_writer_on_3_masters() {
    readers_or_one_writer(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_readers_or_one_writer_on_5_masters() {
    readers_or_one_writer(5).await;
}

/// 6 reader tasks in 2 Redlocks keep the lock read-held without a gap
/// (overlapping 40 ms reads); a writer still gets in (within 5 s), and
/// readers that come while it waits wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_is_not_starved_by_a_stream_of_readers() {
    let fleet = Fleet::start(3);
    let options = LockOptions {
        retry: Duration::from_millis(20),
        ..LockOptions::default()
    };
    let name = format!("{}hot", unique_prefix("starve"));
    let mut locks = Vec::new();
    for _ in 0..3 {
        locks.push(redlock_on(&fleet.urls(), options.clone()).await);
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let mut readers = Vec::new();
    for i in 0..6 {
        let (rw, stop, reads) = (
            locks[i % 2].rw_lock(&name),
            Arc::clone(&stop),
            Arc::clone(&reads),
        );
        readers.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(7 * i as u64)).await;
            while !stop.load(Ordering::SeqCst) {
                let guard = rw.read().await.expect("read");
                reads.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(40)).await;
                guard.release().await.unwrap();
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let writer = locks[2].rw_lock(&name);
    let started = Instant::now();
    let guard = writer.write().await.expect("the writer starved");
    let waited = started.elapsed();
    let reads_before = reads.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        reads.load(Ordering::SeqCst),
        reads_before,
        "a reader got in with the writer"
    );
    guard.release().await.unwrap();
    stop.store(true, Ordering::SeqCst);
    join_all_checked(readers).await;
    // Readers alone would keep it out for ever; the bound is loose because
    // this 2-core machine runs the whole suite at once (1 s was missed at 3 s).
    assert!(
        waited < Duration::from_secs(5),
        "the writer waited {waited:?}"
    );
    eprintln!(
        "writer under a stream of 6 readers: in after {waited:?} ({reads_before} reads so far)"
    );
}
