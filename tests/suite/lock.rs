//! The Redlock on its own, over fleets of real redis-server processes: mutual
//! exclusion on 1, 3 and 5 masters, ownership of release and extend, the wait
//! timeout, and the quorum with masters down.

use crate::support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::{Fleet, join_all_checked, unique_prefix};
use locked_cache::{Error, LockOptions, Redlock};

async fn redlock(fleet: &Fleet, options: LockOptions) -> Redlock {
    support::redlock_on(&fleet.urls(), options).await
}

/// 500 holders each read a counter from Redis, increment it and write it back
/// under the lock, from 4 separate Redlock instances (separate connections). Any
/// overlap of two holders loses an increment, so the counter must end at 500.
async fn mutual_exclusion(masters: usize) {
    const HOLDERS: usize = 500;
    let fleet = Fleet::start(masters);
    let options = LockOptions {
        wait: Duration::from_secs(60),
        retry: Duration::from_millis(20),
        ..LockOptions::default()
    };
    let mut locks = Vec::new();
    for _ in 0..4 {
        locks.push(redlock(&fleet, options.clone()).await);
    }
    let prefix = unique_prefix("mutex");
    let resource = format!("lock.{prefix}counter");
    let counter_key = format!("{prefix}counter");
    let client = redis::Client::open(fleet.urls()[0].as_str()).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..HOLDERS {
        let lock = locks[i % locks.len()].clone();
        let (resource, counter_key, mut conn) =
            (resource.clone(), counter_key.clone(), conn.clone());
        tasks.push(tokio::spawn(async move {
            let guard = lock.acquire(&resource).await.expect("acquire");
            let n: Option<u64> = redis::cmd("GET")
                .arg(&counter_key)
                .query_async(&mut conn)
                .await
                .unwrap();
            tokio::task::yield_now().await;
            let _: () = redis::cmd("SET")
                .arg(&counter_key)
                .arg(n.unwrap_or(0) + 1)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert!(
                guard.release().await.expect("release"),
                "lock lost mid-section"
            );
        }));
    }
    join_all_checked(tasks).await;
    let mut conn = conn;
    let n: u64 = redis::cmd("GET")
        .arg(&counter_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, HOLDERS as u64, "increments lost: holders overlapped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_exclusion_on_1_master() {
    mutual_exclusion(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_exclusion_on_3_masters() {
    mutual_exclusion(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_exclusion_on_5_masters() {
    mutual_exclusion(5).await;
}

/// A holder whose lock expired and was taken by another can neither release nor
/// extend the new holder's lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_cannot_release_or_extend_another_holders_lock() {
    let fleet = Fleet::start(3);
    // No watchdog: the first lock must expire.
    let short = LockOptions {
        expiry: Duration::from_millis(200),
        watchdog: false,
        ..LockOptions::default()
    };
    let a = redlock(&fleet, short.clone()).await;
    let b = redlock(&fleet, short).await;
    let resource = format!("lock.{}x", unique_prefix("owner"));
    let mut first = a.acquire(&resource).await.unwrap();
    assert!(
        b.try_acquire(&resource, Duration::from_secs(5))
            .await
            .unwrap()
            .is_none()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(first.is_expired());
    let second = b
        .try_acquire(&resource, Duration::from_secs(5))
        .await
        .unwrap()
        .expect("lock is free after expiry");
    assert!(
        !first.extend(Duration::from_secs(5)).await.unwrap(),
        "extended another's lock"
    );
    assert!(!first.release().await.unwrap(), "released another's lock");
    // The second holder still holds it on every master.
    for server in &fleet.servers {
        let owner: Option<String> = server.query(&["GET", &resource]);
        assert!(owner.is_some(), "lock missing on {}", server.url());
    }
    assert!(
        a.try_acquire(&resource, Duration::from_secs(5))
            .await
            .unwrap()
            .is_none()
    );
    assert!(second.release().await.unwrap());
    assert!(
        a.try_acquire(&resource, Duration::from_secs(5))
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_keeps_the_lock_past_its_expiry() {
    let fleet = Fleet::start(3);
    let lock = redlock(
        &fleet,
        LockOptions {
            expiry: Duration::from_millis(300),
            ..LockOptions::default()
        },
    )
    .await;
    let resource = format!("lock.{}x", unique_prefix("extend"));
    let mut guard = lock.acquire(&resource).await.unwrap();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(guard.extend(Duration::from_millis(300)).await.unwrap());
    }
    assert!(!guard.is_expired());
    assert!(
        lock.try_acquire(&resource, Duration::from_secs(1))
            .await
            .unwrap()
            .is_none()
    );
    assert!(guard.release().await.unwrap());
}

/// A waiter gives up with the typed timeout error within the wait time + 100 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_timeout_returns_the_timeout_error_in_time() {
    let fleet = Fleet::start(3);
    let lock = redlock(&fleet, LockOptions::default()).await;
    let resource = format!("lock.{}x", unique_prefix("timeout"));
    let _held = lock.acquire(&resource).await.unwrap();
    for wait in [
        Duration::from_millis(50),
        Duration::from_millis(300),
        Duration::from_millis(700),
    ] {
        let started = Instant::now();
        let err = lock
            .acquire_with(&resource, Duration::from_secs(5), wait)
            .await
            .expect_err("the lock is held");
        let took = started.elapsed();
        assert!(matches!(err, Error::LockTimeout { .. }), "{err:?}");
        assert!(err.is_timeout());
        assert!(took >= wait, "gave up early: {took:?} < {wait:?}");
        assert!(
            took <= wait + Duration::from_millis(100),
            "gave up late: {took:?} for {wait:?}"
        );
    }
}

/// With one of three masters down the majority still grants the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_is_reached_with_one_of_three_masters_down() {
    let mut fleet = Fleet::start(3);
    let lock = redlock(&fleet, LockOptions::default()).await;
    fleet.kill(2);
    let resource = format!("lock.{}x", unique_prefix("quorum"));
    let guard = lock.acquire(&resource).await.expect("2 of 3 is a majority");
    assert!(
        lock.try_acquire(&resource, Duration::from_secs(5))
            .await
            .unwrap()
            .is_none()
    );
    assert!(guard.release().await.unwrap());
}

/// With two of three masters down no lock can be had: the typed quorum error,
/// within the wait time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_not_reached_with_two_of_three_masters_down() {
    let mut fleet = Fleet::start(3);
    let lock = redlock(
        &fleet,
        LockOptions {
            wait: Duration::from_millis(500),
            ..LockOptions::default()
        },
    )
    .await;
    fleet.kill(1);
    fleet.kill(2);
    let resource = format!("lock.{}x", unique_prefix("noquorum"));
    let started = Instant::now();
    let err = lock
        .acquire(&resource)
        .await
        .expect_err("1 of 3 is no majority");
    assert!(
        matches!(
            err,
            Error::QuorumNotReached {
                reachable: 1,
                masters: 3,
                quorum: 2,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_quorum_error());
    assert!(started.elapsed() < Duration::from_millis(500) + Duration::from_millis(300));
    // The partial grant on the live master was undone.
    let live = &fleet.servers[0];
    assert!(
        support::eventually(Duration::from_secs(1), || async {
            live.query::<Option<String>>(&["GET", &resource]).is_none()
        })
        .await,
        "partial acquisition left behind"
    );
}

/// Dropping a guard without releasing it releases the lock from a spawned task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_guard_releases_the_lock() {
    let fleet = Fleet::start(1);
    let lock = redlock(&fleet, LockOptions::default()).await;
    let resource = format!("lock.{}x", unique_prefix("drop"));
    drop(lock.acquire(&resource).await.unwrap());
    let lock2 = lock.clone();
    assert!(
        support::eventually(Duration::from_secs(1), || {
            let lock = lock2.clone();
            let resource = resource.clone();
            async move {
                matches!(
                    lock.try_acquire(&resource, Duration::from_secs(5)).await,
                    Ok(Some(_))
                )
            }
        })
        .await
    );
}

/// The lock works on the embedded store too, among tasks of one process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_lock_excludes() {
    let lock = Redlock::in_memory(LockOptions::default()).await.unwrap();
    let inside = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (lock, inside) = (lock.clone(), Arc::clone(&inside));
        tasks.push(tokio::spawn(async move {
            let guard = lock.acquire("lock.mem").await.unwrap();
            assert_eq!(inside.fetch_add(1, std::sync::atomic::Ordering::SeqCst), 0);
            tokio::task::yield_now().await;
            inside.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            guard.release().await.unwrap();
        }));
    }
    join_all_checked(tasks).await;
}

/// Nothing is kept per lock name once its calls end, however they end: an
/// `acquire` queued behind a holder in the same process and cancelled just as
/// its turn came (the holder released, the waiter not yet run), an acquire
/// that timed out, and one that succeeded. 3,000 names; the per-name entries
/// (in-process lines, registered waiters) must all be gone.
#[tokio::test(flavor = "current_thread")]
async fn no_entry_is_kept_per_lock_name_once_its_calls_end() {
    let fleet = Fleet::start(1);
    let lock = redlock(&fleet, LockOptions::default()).await;
    let prefix = unique_prefix("names");
    for i in 0..1000 {
        let name = format!("lock.{prefix}{i}");
        let holder = lock.acquire(&name).await.unwrap();
        let queued = {
            let (lock, name) = (lock.clone(), name.clone());
            tokio::spawn(async move { lock.acquire(&name).await.map(drop) })
        };
        // Let it queue behind the holder, then hand it the turn and cancel it
        // before it runs again (one thread: it cannot run in between).
        tokio::task::yield_now().await;
        assert!(holder.release().await.unwrap());
        queued.abort();
        assert!(queued.await.unwrap_err().is_cancelled());
    }
    for i in 1000..2000 {
        let name = format!("lock.{prefix}{i}");
        let holder = lock.acquire(&name).await.unwrap();
        let timed_out = lock
            .acquire_with(&name, Duration::from_secs(5), Duration::from_millis(1))
            .await;
        assert!(matches!(timed_out, Err(Error::LockTimeout { .. })));
        holder.release().await.unwrap();
    }
    for i in 2000..3000 {
        let name = format!("lock.{prefix}{i}");
        drop(lock.acquire(&name).await.unwrap());
    }
    assert_eq!(
        lock.retained_entries(),
        0,
        "entries left behind for 3,000 lock names"
    );
}

/// A store whose `SET NX` travels slowly: it is sent from a task of its own
/// that waits `delay` first, so a caller that gives up early does not stop it
/// from landing (as a command already on the wire would).
#[derive(Debug)]
struct SlowGrants {
    inner: locked_cache::SharedStore,
    delay: Duration,
}

#[async_trait::async_trait]
impl locked_cache::Store for SlowGrants {
    async fn get(&self, key: &str) -> locked_cache::Result<Option<Vec<u8>>> {
        self.inner.get(key).await
    }
    async fn get_with_ttl(&self, key: &str) -> locked_cache::Result<Option<locked_cache::Stored>> {
        self.inner.get_with_ttl(key).await
    }
    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> locked_cache::Result<()> {
        self.inner.set(key, value, ttl).await
    }
    async fn delete(&self, key: &str) -> locked_cache::Result<bool> {
        self.inner.delete(key).await
    }
    async fn set_nx(
        &self,
        key: &str,
        token: &[u8],
        expiry: Duration,
    ) -> locked_cache::Result<bool> {
        let (inner, delay) = (Arc::clone(&self.inner), self.delay);
        let (key, token) = (key.to_owned(), token.to_vec());
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            inner.set_nx(&key, &token, expiry).await
        })
        .await
        .expect("set_nx task")
    }
    async fn release(
        &self,
        key: &str,
        token: &[u8],
        channel: Option<&str>,
    ) -> locked_cache::Result<bool> {
        self.inner.release(key, token, channel).await
    }
    async fn extend(
        &self,
        key: &str,
        token: &[u8],
        expiry: Duration,
    ) -> locked_cache::Result<bool> {
        self.inner.extend(key, token, expiry).await
    }
    async fn get_or_fence(
        &self,
        key: &str,
        fence_key: &str,
        token: &[u8],
        fence_expiry: Duration,
    ) -> locked_cache::Result<Option<locked_cache::Stored>> {
        self.inner
            .get_or_fence(key, fence_key, token, fence_expiry)
            .await
    }
    async fn set_fenced(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        fence_key: &str,
        token: &[u8],
        publish: Option<locked_cache::Publish<'_>>,
    ) -> locked_cache::Result<bool> {
        self.inner
            .set_fenced(key, value, ttl, fence_key, token, publish)
            .await
    }
    async fn subscribe(
        &self,
        channel: &str,
    ) -> locked_cache::Result<tokio::sync::mpsc::Receiver<Vec<u8>>> {
        self.inner.subscribe(channel).await
    }
    async fn publish(&self, channel: &str, payload: &str) -> locked_cache::Result<()> {
        self.inner.publish(channel, payload).await
    }
    fn server(&self) -> &str {
        self.inner.server()
    }
}

/// An extension that re-grants the lock on masters that lost it, cancelled
/// while a re-grant is still on its way (as a keep-alive aborted with its
/// load), then the lock released: the late re-grant is undone when it lands,
/// so no lock is left that nobody holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_grant_landing_after_the_release_is_undone() {
    let fleet = Fleet::start(3);
    let redis = |i: usize| -> locked_cache::SharedStore {
        Arc::new(locked_cache::RedisStore::open(&fleet.urls()[i], Default::default()).unwrap())
    };
    let slow: locked_cache::SharedStore = Arc::new(SlowGrants {
        inner: redis(2),
        delay: Duration::from_millis(300),
    });
    let lock = Redlock::new(vec![redis(0), redis(1), slow], LockOptions::default())
        .await
        .unwrap();
    let name = format!("lock.{}", unique_prefix("regrant"));
    let mut guard = lock.acquire(&name).await.unwrap();
    // Let the slow master's grant land, then take the lock from masters 1 and
    // 2 (as if they had restarted empty).
    tokio::time::sleep(Duration::from_millis(400)).await;
    for server in &fleet.servers[1..] {
        let removed: u64 = server.query(&["DEL", &name]);
        assert_eq!(removed, 1);
    }
    // The extension re-grants on 1 (at once) and 2 (300 ms on the way), and is
    // cancelled before the slow one answers.
    let cancelled = tokio::time::timeout(
        Duration::from_millis(100),
        guard.extend(Duration::from_secs(5)),
    )
    .await;
    assert!(
        cancelled.is_err(),
        "the extension was not cancelled mid-re-grant"
    );
    guard.release().await.unwrap();
    // The late re-grant has landed by now, and must have been undone.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let left: Vec<u64> = fleet
        .servers
        .iter()
        .map(|s| s.query(&["EXISTS", &name]))
        .collect();
    assert_eq!(left, vec![0, 0, 0], "a lock nobody holds was left behind");
}
