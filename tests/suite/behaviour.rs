//! The behaviour of `get_or_load`, `get`, `set` and `invalidate`, run twice:
//! against a real redis-server started for the test, and against the embedded
//! in-memory store. Both must behave the same.

use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::support::{RedisServer, counting_loader, join_all_checked, unique_prefix};
use locked_cache::{Error, LoadError, LockedCache, MemoryStore, Outcome, RedisStore, SharedStore};
use serde::{Deserialize, Serialize};

/// Where the caches of one test keep their data.
enum Backend {
    Memory(Arc<MemoryStore>),
    Redis(RedisServer),
}

impl Backend {
    fn memory() -> Backend {
        Backend::Memory(Arc::new(MemoryStore::new()))
    }

    fn redis() -> Backend {
        Backend::Redis(RedisServer::start())
    }

    /// A cache on this backend; caches of one backend share its data, standing
    /// in for separate processes (each Redis cache has its own connections).
    async fn cache(&self, prefix: &str, ttl: Duration) -> LockedCache {
        self.builder(prefix, ttl).build().await.expect("build")
    }

    fn builder(&self, prefix: &str, ttl: Duration) -> locked_cache::Builder {
        let builder = LockedCache::builder().key_prefix(prefix).ttl(ttl);
        match self {
            Backend::Memory(store) => builder.store(Arc::clone(store) as SharedStore),
            Backend::Redis(server) => builder.redis(server.url()),
        }
    }

    /// Direct access to the store, to plant or inspect raw bytes.
    fn store(&self) -> SharedStore {
        match self {
            Backend::Memory(store) => Arc::clone(store) as SharedStore,
            Backend::Redis(server) => {
                Arc::new(RedisStore::open(&server.url(), Default::default()).expect("store"))
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct User {
    id: u64,
    name: String,
}

fn user(id: u64) -> User {
    User {
        id,
        name: format!("user {id}"),
    }
}

const MINUTE: Duration = Duration::from_secs(60);

async fn hit_returns_the_stored_value_without_loading(backend: Backend) {
    let cache = backend.cache(&unique_prefix("hit"), MINUTE).await;
    cache.set("user:1", &user(1)).await.unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let got: User = cache
        .get_or_load("user:1", counting_loader(&runs, Duration::ZERO, user(99)))
        .await
        .unwrap();
    assert_eq!(got, user(1));
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    assert_eq!(cache.stats().hits, 1);
}

async fn miss_loads_once_and_stores_the_value(backend: Backend) {
    let cache = backend.cache(&unique_prefix("miss"), MINUTE).await;
    let runs = Arc::new(AtomicU32::new(0));
    let got: User = cache
        .get_or_load("user:2", counting_loader(&runs, Duration::ZERO, user(2)))
        .await
        .unwrap();
    assert_eq!(got, user(2));
    assert_eq!(cache.get::<User>("user:2").await.unwrap(), Some(user(2)));
    let again: User = cache
        .get_or_load("user:2", counting_loader(&runs, Duration::ZERO, user(99)))
        .await
        .unwrap();
    assert_eq!(again, user(2));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let stats = cache.stats();
    // One miss (the load), two hits (`get` and the second `get_or_load`).
    assert_eq!((stats.loads, stats.misses, stats.hits), (1, 1, 2));
    // The lock was released.
    let lock = cache
        .lock()
        .try_acquire(&cache.lock_key("user:2"), MINUTE)
        .await;
    assert!(lock.unwrap().is_some(), "lock still held after the load");
}

/// The double check: a caller that gets the lock after another stored the value
/// returns that value without loading.
async fn a_value_stored_while_waiting_is_returned_without_loading(backend: Backend) {
    let prefix = unique_prefix("double");
    let cache = backend.cache(&prefix, MINUTE).await;
    let other = backend.cache(&prefix, MINUTE).await;
    let holder = other
        .lock()
        .acquire(&other.lock_key("user:3"))
        .await
        .unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let waiter = tokio::spawn({
        let cache = cache.clone();
        let loader = counting_loader(&runs, Duration::ZERO, user(99));
        async move { cache.get_or_load::<User, _, _, _>("user:3", loader).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiter.is_finished(), "the waiter should wait for the lock");
    other.set("user:3", &user(3)).await.unwrap();
    assert!(holder.release().await.unwrap());
    let got = join_all_checked(vec![waiter]).await.remove(0).unwrap();
    assert_eq!(got, user(3));
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

/// The double check under the lock itself: the value appears between the first
/// read and the lock, with no release in between to wake the caller.
async fn the_recheck_under_the_lock_sees_a_value_stored_before_it(backend: Backend) {
    let prefix = unique_prefix("recheck");
    let cache = backend
        .builder(&prefix, MINUTE)
        .wake_ups(false)
        .retry_time(Duration::from_millis(20))
        .build()
        .await
        .unwrap();
    let store = backend.store();
    let holder = cache.lock().acquire(&cache.lock_key("k")).await.unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let waiter = tokio::spawn({
        let cache = cache.clone();
        let loader = counting_loader(&runs, Duration::ZERO, user(99));
        async move { cache.get_or_load::<User, _, _, _>("k", loader).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Store and free the lock without publishing (plain writes), as a holder in
    // a process without wake-ups would leave it.
    let bytes = locked_cache::codec::encode(&locked_cache::BincodeCodec, &user(4)).unwrap();
    store
        .set(&cache.value_key("k"), &bytes, MINUTE)
        .await
        .unwrap();
    std::mem::forget(holder);
    store.delete(&cache.lock_key("k")).await.unwrap();
    let got = join_all_checked(vec![waiter]).await.remove(0).unwrap();
    assert_eq!(got, user(4));
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

/// 300 concurrent callers on 3 separate caches (standing in for 3 processes) on
/// one cold key: the loader ran exactly once and all got the same value.
async fn stampede_of_300_callers_on_3_caches_loads_once(backend: Backend, coalesce: bool) {
    let prefix = unique_prefix("stampede");
    let mut caches = Vec::new();
    for _ in 0..3 {
        caches.push(
            backend
                .builder(&prefix, MINUTE)
                .coalesce(coalesce)
                .build()
                .await
                .unwrap(),
        );
    }
    let runs = Arc::new(AtomicU32::new(0));
    let start = Arc::new(tokio::sync::Barrier::new(300));
    let mut tasks = Vec::new();
    for i in 0..300u64 {
        let cache = caches[(i % 3) as usize].clone();
        let loader = counting_loader(&runs, Duration::from_millis(50), user(7));
        let start = Arc::clone(&start);
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            cache.get_or_load::<User, _, _, _>("hot", loader).await
        }));
    }
    let results = join_all_checked(tasks).await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "loader must run exactly once"
    );
    for r in results {
        assert_eq!(r.unwrap(), user(7));
    }
}

/// After the TTL the value is gone, and a burst of callers reloads it once.
async fn ttl_expiry_then_exactly_one_reload(backend: Backend) {
    let prefix = unique_prefix("ttl");
    let ttl = Duration::from_millis(300);
    let a = backend.cache(&prefix, ttl).await;
    let b = backend.cache(&prefix, ttl).await;
    let runs = Arc::new(AtomicU32::new(0));
    let _: User = a
        .get_or_load("k", counting_loader(&runs, Duration::ZERO, user(1)))
        .await
        .unwrap();
    assert_eq!(a.get::<User>("k").await.unwrap(), Some(user(1)));
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    assert_eq!(
        a.get::<User>("k").await.unwrap(),
        None,
        "value outlived its TTL"
    );
    let mut tasks = Vec::new();
    for i in 0..50 {
        let cache = if i % 2 == 0 { a.clone() } else { b.clone() };
        let loader = counting_loader(&runs, Duration::from_millis(20), user(2));
        tasks.push(tokio::spawn(async move {
            cache.get_or_load::<User, _, _, _>("k", loader).await
        }));
    }
    for r in join_all_checked(tasks).await {
        assert_eq!(r.unwrap(), user(2));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2, "one load, then one reload");
}

/// The loader's error comes back as its own type, is shared with the flight's
/// followers, nothing is stored, and the lock is free at once.
async fn loader_error_is_returned_shared_and_nothing_is_stored(backend: Backend) {
    #[derive(Debug, PartialEq)]
    struct DbDown(u32);
    let cache = backend.cache(&unique_prefix("err"), MINUTE).await;
    let runs = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let cache = cache.clone();
        let runs = Arc::clone(&runs);
        tasks.push(tokio::spawn(async move {
            cache
                .get_or_load::<User, DbDown, _, _>("k", || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Err(DbDown(503))
                })
                .await
        }));
    }
    let results = join_all_checked(tasks).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1, "followers share the error");
    for r in results {
        match r {
            Err(LoadError::Loader(e)) => assert_eq!(*e, DbDown(503)),
            other => panic!("expected the loader error, got {other:?}"),
        }
    }
    assert_eq!(cache.get::<User>("k").await.unwrap(), None);
    let started = Instant::now();
    let got: User = cache
        .get_or_load("k", counting_loader(&runs, Duration::ZERO, user(5)))
        .await
        .unwrap();
    assert_eq!(got, user(5));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "lock was not released"
    );
    assert_eq!(cache.stats().load_errors, 1);
}

async fn invalidate_forces_one_reload(backend: Backend) {
    let cache = backend.cache(&unique_prefix("inval"), MINUTE).await;
    let runs = Arc::new(AtomicU32::new(0));
    for expected in [1, 1, 2, 2] {
        if expected == 2 && runs.load(Ordering::SeqCst) == 1 {
            assert!(cache.invalidate("k").await.unwrap());
        }
        let _: User = cache
            .get_or_load("k", counting_loader(&runs, Duration::ZERO, user(1)))
            .await
            .unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), expected);
    }
    assert!(cache.invalidate("k").await.unwrap());
    assert!(
        !cache.invalidate("k").await.unwrap(),
        "nothing left to remove"
    );
}

/// Bytes that are not a locked-cache value of this type are a miss: reloaded,
/// overwritten, counted.
async fn undecodable_bytes_are_reloaded_and_overwritten(backend: Backend) {
    let cache = backend.cache(&unique_prefix("corrupt"), MINUTE).await;
    let store = backend.store();
    let good = locked_cache::codec::encode(&locked_cache::BincodeCodec, &user(1)).unwrap();
    let mut truncated = good.clone();
    truncated.truncate(good.len() - 2);
    let mut other_version = good.clone();
    other_version[2] = 99;
    let other_type = locked_cache::codec::encode(&locked_cache::BincodeCodec, &(1u8,)).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("foreign", b"<html>not ours</html>".to_vec()),
        ("empty", Vec::new()),
        ("truncated", truncated),
        ("other-version", other_version),
        ("other-type", other_type),
    ];
    let runs = Arc::new(AtomicU32::new(0));
    for (i, (name, bytes)) in cases.iter().enumerate() {
        store
            .set(&cache.value_key(name), bytes, MINUTE)
            .await
            .unwrap();
        assert_eq!(cache.get::<User>(name).await.unwrap(), None, "{name}: get");
        let got: User = cache
            .get_or_load(name, counting_loader(&runs, Duration::ZERO, user(9)))
            .await
            .unwrap();
        assert_eq!(got, user(9), "{name}");
        assert_eq!(
            runs.load(Ordering::SeqCst),
            i as u32 + 1,
            "{name}: one reload"
        );
        assert_eq!(
            cache.get::<User>(name).await.unwrap(),
            Some(user(9)),
            "{name}: overwritten"
        );
    }
    assert!(cache.stats().corrupt_values >= cases.len() as u64);
}

async fn bad_keys_and_oversized_values_get_typed_errors(backend: Backend) {
    let cache = backend
        .builder(&unique_prefix("input"), MINUTE)
        .max_value_size(1024)
        .build()
        .await
        .unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let empty = cache
        .get_or_load::<User, _, _, _>("", counting_loader(&runs, Duration::ZERO, user(1)))
        .await;
    assert!(matches!(empty, Err(LoadError::Cache(Error::InvalidKey(_)))));
    let huge_key = "k".repeat(2000);
    assert!(matches!(
        cache.get::<User>(&huge_key).await,
        Err(Error::InvalidKey(_))
    ));
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    // Odd bytes are fine in keys.
    for key in [
        "with space",
        "new\nline",
        "tab\there",
        "nul\0byte",
        "ünïcødé ✓",
    ] {
        let got: User = cache
            .get_or_load(key, counting_loader(&runs, Duration::ZERO, user(3)))
            .await
            .unwrap();
        assert_eq!(got, user(3), "{key:?}");
        assert_eq!(
            cache.get::<User>(key).await.unwrap(),
            Some(user(3)),
            "{key:?}"
        );
    }
    let big = "x".repeat(4096);
    let too_large = cache
        .get_or_load::<String, String, _, _>("big", || async { Ok(big) })
        .await;
    assert!(
        matches!(
            too_large,
            Err(LoadError::Cache(Error::ValueTooLarge { max: 1024, .. }))
        ),
        "{too_large:?}"
    );
    assert_eq!(cache.get::<String>("big").await.unwrap(), None);
    assert!(matches!(
        cache.set("big", &"y".repeat(4096)).await,
        Err(Error::ValueTooLarge { .. })
    ));
    // The lock was released after the refused value.
    assert!(
        cache
            .lock()
            .try_acquire(&cache.lock_key("big"), MINUTE)
            .await
            .unwrap()
            .is_some()
    );
}

/// A load that read the data before an update must not overwrite what `set`
/// stored after it, nor refill a key `invalidate` emptied after it: its caller
/// gets what it loaded; the cache keeps the newer state.
async fn set_and_invalidate_during_a_load_win_over_it(backend: Backend) {
    let cache = backend.cache(&unique_prefix("supersede"), MINUTE).await;
    for invalidate in [false, true] {
        let key = if invalidate { "inval" } else { "set" };
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
        let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
        let loading = tokio::spawn({
            let cache = cache.clone();
            async move {
                cache
                    .get_or_load::<User, String, _, _>(key, || async move {
                        started_tx.send(()).unwrap();
                        finish_rx.await.unwrap();
                        Ok(user(1))
                    })
                    .await
            }
        });
        started_rx.await.unwrap();
        if invalidate {
            cache.invalidate(key).await.unwrap();
        } else {
            cache.set(key, &user(2)).await.unwrap();
        }
        finish_tx.send(()).unwrap();
        let loaded = join_all_checked(vec![loading]).await.remove(0).unwrap();
        assert_eq!(loaded, user(1), "the caller gets what its loader returned");
        let stored = cache.get::<User>(key).await.unwrap();
        let expected = if invalidate { None } else { Some(user(2)) };
        assert_eq!(
            stored, expected,
            "{key}: the stale load overwrote the newer state"
        );
    }
    assert_eq!(cache.stats().writes_refused, 2);
}

/// Runs each behaviour against both backends.
macro_rules! on_both_backends {
    ($($name:ident $(($arg:expr))?),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::memory() $(, $arg)?).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::redis() $(, $arg)?).await;
                }
            )*
        }
    };
}

async fn stampede_with_coalescing(backend: Backend) {
    stampede_of_300_callers_on_3_caches_loads_once(backend, true).await;
}

async fn stampede_without_coalescing(backend: Backend) {
    stampede_of_300_callers_on_3_caches_loads_once(backend, false).await;
}

/// Concurrent shared calls on one key form one flight whose followers take
/// the leader's decoded value: the callers of a load hold the same `Arc` (one
/// decode per flight) instead of each decoding the stored bytes.
async fn a_shared_flight_decodes_once(backend: Backend) {
    let cache = backend.cache(&unique_prefix("shared"), MINUTE).await;
    let runs = Arc::new(AtomicU32::new(0));
    for round in 0..2 {
        let calls: Vec<_> = (0..20)
            .map(|_| {
                let (cache, runs) = (cache.clone(), Arc::clone(&runs));
                tokio::spawn(async move {
                    cache
                        .get_or_load_shared("k", || async move {
                            runs.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            Ok::<_, String>(user(1))
                        })
                        .await
                        .unwrap()
                })
            })
            .collect();
        let values = join_all_checked(calls).await;
        assert!(values.iter().all(|v| **v == user(1)));
        if round > 0 {
            // Hits: a flight forms only where callers overlap a read.
            continue;
        }
        // Followers that joined the loading flight share its leader's value.
        let distinct = values
            .iter()
            .fold(Vec::<&Arc<User>>::new(), |mut seen, v| {
                if !seen.iter().any(|s| Arc::ptr_eq(s, v)) {
                    seen.push(v);
                }
                seen
            })
            .len();
        assert!(
            distinct < values.len() / 2,
            "round {round}: {distinct} distinct values for {} callers",
            values.len()
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

on_both_backends!(
    a_shared_flight_decodes_once,
    hit_returns_the_stored_value_without_loading,
    miss_loads_once_and_stores_the_value,
    a_value_stored_while_waiting_is_returned_without_loading,
    the_recheck_under_the_lock_sees_a_value_stored_before_it,
    stampede_with_coalescing,
    stampede_without_coalescing,
    ttl_expiry_then_exactly_one_reload,
    loader_error_is_returned_shared_and_nothing_is_stored,
    invalidate_forces_one_reload,
    undecodable_bytes_are_reloaded_and_overwritten,
    bad_keys_and_oversized_values_get_typed_errors,
    set_and_invalidate_during_a_load_win_over_it,
);

/// A fresh `String`, `Vec<u8>` or bytes hit is decoded in place (the buffer
/// Redis handed over becomes the value), so its leader has no stored bytes
/// left for the followers that joined its flight: it encodes the value again
/// for them. Every follower gets the value, whatever type it asks for; the
/// followers of a shared call (`get_or_load_shared`) share the leader's `Arc`.
#[tokio::test]
async fn followers_of_a_hit_decoded_in_place_get_its_value() {
    let server = RedisServer::start();
    // Each read takes 50 ms, so the calls below all join the first one's flight.
    let proxy = support::TcpProxy::start(server.addr()).await;
    let cache = LockedCache::builder()
        .redis(proxy.url())
        .key_prefix(unique_prefix("in-place"))
        .ttl(MINUTE)
        .build()
        .await
        .unwrap();
    let text = "é-".repeat(700);
    let blob: Vec<u8> = (0..3000).map(|i| (i % 251) as u8).collect();
    cache.set("text", &text).await.unwrap();
    cache.set_bytes("blob", &blob).await.unwrap();
    proxy.set_delay(Duration::from_millis(50));
    let no_load = || async { Err::<String, &str>("a hit must not load") };

    let calls = (0..20).map(|_| cache.get_or_load_with_outcome("text", |_| no_load()));
    let results = futures_util::future::join_all(calls).await;
    let mut outcomes = Vec::new();
    for result in results {
        let (value, outcome) = result.unwrap();
        assert_eq!(value, text);
        outcomes.push(outcome);
    }
    assert_eq!(outcomes.iter().filter(|o| **o == Outcome::Hit).count(), 1);
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| **o == Outcome::Coalesced)
            .count(),
        19
    );

    // A leader asking for bytes, followers asking for a Vec<u8> and bytes.
    let as_bytes = cache.get_or_load_bytes("blob", || async { Err::<Vec<u8>, &str>("no") });
    let as_vecs = (0..5)
        .map(|_| cache.get_or_load_with_outcome("blob", |_| async { Err::<Vec<u8>, &str>("no") }));
    let (first, rest) = tokio::join!(as_bytes, futures_util::future::join_all(as_vecs));
    assert_eq!(first.unwrap(), blob);
    for result in rest {
        let (value, outcome) = result.unwrap();
        assert_eq!(value, blob);
        assert_eq!(outcome, Outcome::Coalesced);
    }
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.coalesced, stats.loads), (2, 24, 0));

    // Shared calls (an `Arc<String>`, decoded in place too): one decode, the
    // followers holding the leader's `Arc`; then followers asking for a plain
    // `String` of a shared leader, which get the bytes encoded again.
    let shared = (0..10).map(|_| cache.get_or_load_shared("text", no_load));
    let values: Vec<Arc<String>> = futures_util::future::join_all(shared)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert!(values.iter().all(|v| **v == text));
    assert!(values.iter().all(|v| Arc::ptr_eq(v, &values[0])));
    let leader = cache.get_or_load_shared("text", no_load);
    let plain = (0..5).map(|_| cache.get_or_load("text", no_load));
    let (leader, plain) = tokio::join!(leader, futures_util::future::join_all(plain));
    assert_eq!(*leader.unwrap(), text);
    for value in plain {
        assert_eq!(value.unwrap(), text);
    }
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.coalesced, stats.loads), (4, 38, 0));
    assert_eq!(stats.corrupt_values, 0);
}
