//! Faults of the data and of the input: values of another Redis type or with
//! corrupt bytes under a key (a miss, reloaded, overwritten, warned about and
//! counted), absurd TTLs and lock durations, odd and boundary-length keys,
//! oversized values, the lock tokens, and passwords in logs. (Empty and huge
//! keys, oversized values and corrupt bytes through `get_or_load` are in
//! `behaviour.rs`; passwords in `Debug` and errors in `config.rs`.)
//!
//! Tests that capture `tracing` events run on a current-thread runtime, so that
//! the cache's own tasks log on the capturing thread too.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::support::capture::capture;
use crate::support::{RedisServer, counting, join_all_checked, unique_prefix};
use locked_cache::codec::{self, BincodeCodec};
use locked_cache::{
    CallOptions, Error, LoadError, LockedCache, MemoryStore, RedisStore, SharedStore, Store,
};
use tracing::Level;

const MINUTE: Duration = Duration::from_secs(60);

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A list, a hash, a set, a sorted set and a stream under value keys: `get` sees
/// a miss, `get_or_load` loads once and overwrites the key with a string, each
/// with a warning event naming the key and a count in `corrupt_values`. The
/// same whether the value is read with a plain `GET`, or with `GET` + `PTTL`
/// (a stale window) on the cache's own connections or on a bb8 pool of one's
/// own (another code path).
#[test]
fn values_of_other_redis_types_are_a_miss_reloaded_overwritten_and_warned() {
    let server = RedisServer::start();
    current_thread().block_on(async {
        let (events, _guard) = capture();
        let stale = CallOptions::new().stale_for(MINUTE);
        let manager = bb8_redis::RedisConnectionManager::new(server.url()).unwrap();
        let pool = bb8::Pool::builder().build(manager).await.unwrap();
        let builder = || LockedCache::builder().key_prefix(unique_prefix("wrongtype"));
        let reads = [
            ("GET", builder().redis(server.url())),
            (
                "GET + PTTL",
                builder().redis(server.url()).call_options(stale),
            ),
            (
                "GET + PTTL on one's own pool",
                builder().redis_pool(server.url(), pool).call_options(stale),
            ),
        ];
        for (read, builder) in reads {
            let cache = builder.build().await.unwrap();
            let runs = Arc::new(AtomicU32::new(0));
            let kinds: [(&str, &[&str]); 5] = [
                ("list", &["RPUSH", "{key}", "a", "b"]),
                ("hash", &["HSET", "{key}", "field", "value"]),
                ("set", &["SADD", "{key}", "member"]),
                ("zset", &["ZADD", "{key}", "1", "member"]),
                ("stream", &["XADD", "{key}", "*", "field", "value"]),
            ];
            for (i, (kind, command)) in kinds.into_iter().enumerate() {
                let value_key = cache.value_key(kind);
                let args: Vec<&str> = command
                    .iter()
                    .map(|a| if *a == "{key}" { value_key.as_str() } else { a })
                    .collect();
                server.cmd(&args);
                assert_eq!(server.query::<String>(&["TYPE", &value_key]), kind);
                events.clear();
                let corrupt_before = cache.stats().corrupt_values;

                assert_eq!(
                    cache.get::<String>(kind).await.unwrap(),
                    None,
                    "{read}, {kind}: get"
                );
                let got: String = cache
                    .get_or_load(kind, counting(&runs, "reloaded"))
                    .await
                    .unwrap_or_else(|e| panic!("{read}, {kind}: {e:?}"));
                assert_eq!(got, "reloaded", "{kind}");
                assert_eq!(
                    runs.load(Ordering::SeqCst),
                    i as u32 + 1,
                    "{read}, {kind}: one load"
                );
                assert_eq!(
                    server.query::<String>(&["TYPE", &value_key]),
                    "string",
                    "{kind}"
                );
                assert_eq!(
                    cache.get::<String>(kind).await.unwrap().as_deref(),
                    Some("reloaded")
                );

                // get, the first read of get_or_load and its re-check under the lock.
                let counted = cache.stats().corrupt_values - corrupt_before;
                assert!(counted >= 2, "{read}, {kind}: counted {counted}");
                let warnings = events.at(Level::WARN);
                assert_eq!(warnings.len() as u64, counted, "{kind}: {warnings:?}");
                for w in &warnings {
                    assert_eq!(w.field("key"), Some(value_key.as_str()), "{kind}: {w:?}");
                    assert!(w.text().contains("WRONGTYPE"), "{kind}: {}", w.text());
                }
            }
        }
    });
}

/// Each kind of bad bytes (no header, another format version, another codec,
/// truncated, a value of another type, trailing garbage) is counted and warned
/// about with its cause, never a panic; and a stampede of 60 callers on 3 caches
/// over a corrupt value reloads it exactly once.
#[test]
fn corrupt_bytes_of_each_kind_warn_with_the_cause_and_a_stampede_reloads_once() {
    let server = RedisServer::start();
    current_thread().block_on(async {
        let (events, _guard) = capture();
        let prefix = unique_prefix("corrupt");
        let mut caches = Vec::new();
        for _ in 0..3 {
            caches.push(
                LockedCache::builder()
                    .redis(server.url())
                    .key_prefix(&prefix)
                    .build()
                    .await
                    .unwrap(),
            );
        }
        let cache = &caches[0];
        let good = codec::encode(&BincodeCodec, &"a string value".to_owned()).unwrap();
        let mut other_version = good.clone();
        other_version[2] = 7;
        let mut other_codec = good.clone();
        other_codec[3] = b'j';
        let mut trailing = good.clone();
        trailing.extend_from_slice(b"junk");
        let kinds: Vec<(&str, Vec<u8>, &str)> = vec![
            ("foreign", b"{\"json\": true}".to_vec(), "foreign bytes"),
            (
                "other-version",
                other_version,
                "unsupported format version 7",
            ),
            ("other-codec", other_codec, "written by codec"),
            (
                "truncated",
                good[..good.len() - 4].to_vec(),
                "decode failed",
            ),
            (
                "other-type",
                codec::encode(&BincodeCodec, &u64::MAX).unwrap(),
                "decode failed",
            ),
            ("trailing", trailing, "trailing bytes"),
        ];
        let store = RedisStore::open(&server.url(), Default::default()).unwrap();
        for (kind, bytes, cause) in &kinds {
            store
                .set(&cache.value_key(kind), bytes, MINUTE)
                .await
                .unwrap();
            events.clear();
            let before = cache.stats().corrupt_values;
            assert_eq!(cache.get::<String>(kind).await.unwrap(), None, "{kind}");
            assert_eq!(cache.stats().corrupt_values, before + 1, "{kind}");
            let warnings = events.at(Level::WARN);
            assert_eq!(warnings.len(), 1, "{kind}: {warnings:?}");
            assert_eq!(
                warnings[0].field("key"),
                Some(cache.value_key(kind).as_str())
            );
            let error = warnings[0].field("error").unwrap_or_default();
            assert!(
                error.contains(cause),
                "{kind}: warned {error:?}, expected {cause:?}"
            );
        }

        // A stampede over one corrupt value.
        store
            .set(&cache.value_key("hot"), b"\xC7\x4C\x01bgarbage", MINUTE)
            .await
            .unwrap();
        let runs = Arc::new(AtomicU32::new(0));
        let mut calls = Vec::new();
        for i in 0..60 {
            let (cache, load) = (caches[i % 3].clone(), counting(&runs, "repaired"));
            calls.push(tokio::spawn(
                async move { cache.get_or_load("hot", load).await },
            ));
        }
        for r in join_all_checked(calls).await {
            assert_eq!(r.unwrap(), "repaired");
        }
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "a corrupt value is reloaded once"
        );
        assert_eq!(
            cache.get::<String>("hot").await.unwrap().as_deref(),
            Some("repaired")
        );
    });
}

/// TTLs and lock durations out of range get `InvalidConfig`, on Redis and on the
/// embedded store alike, never a panic or a silently different expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_ttls_and_lock_durations_get_a_typed_error_and_never_panic() {
    let server = RedisServer::start();
    let prefix = unique_prefix("ttl");
    let redis = LockedCache::builder()
        .redis(server.url())
        .key_prefix(&prefix)
        .build()
        .await
        .unwrap();
    let memory = LockedCache::builder()
        .store(Arc::new(MemoryStore::new()) as SharedStore)
        .key_prefix(&prefix)
        .build()
        .await
        .unwrap();
    let absurd = [
        Duration::ZERO,
        Duration::from_nanos(999_999),
        Duration::from_secs(11 * 365 * 24 * 3600),
        Duration::from_secs(u64::MAX),
        Duration::MAX,
    ];
    for cache in [&redis, &memory] {
        for ttl in absurd {
            let r = cache.set_with_ttl("k", &"v", ttl).await;
            assert!(
                matches!(r, Err(Error::InvalidConfig(_))),
                "ttl {ttl:?}: {r:?}"
            );
            assert!(r.unwrap_err().is_invalid_input());
        }
        assert_eq!(cache.get::<String>("k").await.unwrap(), None);
        // In range: stored, with that expiry.
        cache
            .set_with_ttl("k", &"v", Duration::from_millis(300))
            .await
            .unwrap();
        assert_eq!(
            cache.get::<String>("k").await.unwrap().as_deref(),
            Some("v")
        );
        let lock = cache.lock();
        let resource = cache.lock_key("k");
        for expiry in [Duration::ZERO, Duration::from_secs(u64::MAX), Duration::MAX] {
            let r = lock.try_acquire(&resource, expiry).await;
            assert!(
                matches!(r, Err(Error::InvalidConfig(_))),
                "expiry {expiry:?}: {r:?}"
            );
            let r = lock
                .acquire_with(&resource, expiry, Duration::from_millis(10))
                .await;
            assert!(
                matches!(r, Err(Error::InvalidConfig(_))),
                "expiry {expiry:?}: {r:?}"
            );
        }
        let r = lock
            .acquire_with(&resource, Duration::from_secs(1), Duration::MAX)
            .await;
        assert!(matches!(r, Err(Error::InvalidConfig(_))), "wait MAX: {r:?}");
        // Nothing was left locked by the refused calls.
        let guard = lock
            .try_acquire(&resource, Duration::from_secs(1))
            .await
            .unwrap();
        guard.expect("the lock is free").release().await.unwrap();
    }
    let pttl: i64 = server.query(&["PTTL", &redis.value_key("k")]);
    assert!(pttl > 0 && pttl <= 300, "stored with pttl {pttl}");
}

/// Keys with spaces, CR/LF (and a RESP-looking payload), NUL and non-ASCII, and
/// a key of exactly the maximum length, work across processes: the lock and the
/// pub/sub wake-up carry them intact (the waiter's retry time is 5 s, so only a
/// wake-up gets it its value at once). One byte over the maximum (counted in
/// bytes, not characters) is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_and_maximum_length_keys_work_across_processes_and_one_byte_more_is_refused() {
    let server = RedisServer::start();
    let prefix = unique_prefix("keys");
    let builder = || {
        LockedCache::builder()
            .redis(server.url())
            .key_prefix(&prefix)
            .max_key_len(64)
            .retry_time(Duration::from_secs(5))
    };
    let a = builder().build().await.unwrap();
    let b = builder().build().await.unwrap();
    let max = "m".repeat(64);
    let keys = [
        "with space",
        "crlf\r\n*1\r\n$4\r\nPING\r\n",
        "nul\0byte",
        "ünïcødé ✓ 🦀",
        "\t\x07\x1b[0m",
        max.as_str(),
    ];
    let runs = Arc::new(AtomicU32::new(0));
    for key in keys {
        let holder = tokio::spawn({
            let (a, key, runs) = (a.clone(), key.to_owned(), Arc::clone(&runs));
            async move {
                let value = format!("value of {key:?}");
                a.get_or_load(&key, || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    Ok::<_, String>(value)
                })
                .await
            }
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        let began = Instant::now();
        let waited: String = b
            .get_or_load(key, counting(&runs, "not expected"))
            .await
            .unwrap();
        let took = began.elapsed();
        let held = join_all_checked(vec![holder]).await.remove(0).unwrap();
        assert_eq!(waited, format!("value of {key:?}"), "{key:?}");
        assert_eq!(held, waited);
        assert!(
            took < Duration::from_secs(1),
            "{key:?}: woken after {took:?}"
        );
        let stored: Option<Vec<u8>> = server.query(&["GET", &a.value_key(key)]);
        assert!(stored.is_some(), "{key:?} stored under another key");
    }
    assert_eq!(runs.load(Ordering::SeqCst), keys.len() as u32);
    for over in ["m".repeat(65), format!("{}é", "m".repeat(63))] {
        assert_eq!(over.chars().count() <= 64, over.ends_with('é'));
        let r = a.get_or_load(&over, counting(&runs, "never")).await;
        assert!(
            matches!(r, Err(LoadError::Cache(Error::InvalidKey(_)))),
            "{r:?}"
        );
        assert!(matches!(
            a.set(&over, &"v").await,
            Err(Error::InvalidKey(_))
        ));
        assert!(matches!(
            a.invalidate(&over).await,
            Err(Error::InvalidKey(_))
        ));
    }
    assert_eq!(runs.load(Ordering::SeqCst), keys.len() as u32);
}

/// Hits build their `GET` in a command buffer each connection keeps between
/// commands: keys of very different lengths, escaped or not, read in turn and
/// at once on one thread (so the same buffers come back) each get their own
/// value, never a previous key's.
#[test]
fn hits_on_reused_command_buffers_read_their_own_keys() {
    let server = RedisServer::start();
    current_thread().block_on(async {
        let cache = LockedCache::builder()
            .redis(server.url())
            .key_prefix(unique_prefix("buffers"))
            .max_key_len(8192)
            .build()
            .await
            .unwrap();
        let long = "l".repeat(900);
        // Past the longest key whose command a connection's buffer keeps.
        let longer = "m".repeat(6000);
        let keys = [
            "a",
            long.as_str(),
            "}braced",
            longer.as_str(),
            "mid-length key",
            "\\x",
            "b",
        ];
        for key in keys {
            cache.set(key, &format!("value of {key}")).await.unwrap();
        }
        for round in 0..20 {
            // In turn, in an order that changes by round...
            for i in 0..keys.len() {
                let key = keys[(i * 5 + round) % keys.len()];
                let got: Option<String> = cache.get(key).await.unwrap();
                assert_eq!(got.as_deref(), Some(format!("value of {key}").as_str()));
            }
            // ...and all at once, each call on a buffer another just used.
            let reads = keys.iter().map(|key| {
                let cache = cache.clone();
                async move {
                    let got: String = cache
                        .get_or_load(key, || async { Err::<String, &str>("a hit must not load") })
                        .await
                        .unwrap();
                    (key, got)
                }
            });
            for (key, got) in futures_util::future::join_all(reads).await {
                assert_eq!(got, format!("value of {key}"));
            }
        }
        assert_eq!(cache.stats().hits, 20 * 2 * keys.len() as u64);
    });
}

/// A value over the maximum size, with 20 callers in the flight: the loader runs
/// once, every caller gets `ValueTooLarge`, nothing is stored, and the lock is
/// free at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_value_fails_every_caller_of_the_flight_and_frees_the_lock() {
    let server = RedisServer::start();
    let cache = LockedCache::builder()
        .redis(server.url())
        .key_prefix(unique_prefix("big"))
        .max_value_size(1000)
        .build()
        .await
        .unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let mut calls = Vec::new();
    for _ in 0..20 {
        let (cache, runs) = (cache.clone(), Arc::clone(&runs));
        calls.push(tokio::spawn(async move {
            cache
                .get_or_load::<Vec<u8>, String, _, _>("big", || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok(vec![7u8; 5000])
                })
                .await
        }));
    }
    for r in join_all_checked(calls).await {
        match r {
            Err(LoadError::Cache(e @ Error::ValueTooLarge { max: 1000, .. })) => {
                assert!(e.is_invalid_input());
            }
            other => panic!("expected ValueTooLarge, got {other:?}"),
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let stored: Option<Vec<u8>> = server.query(&["GET", &cache.value_key("big")]);
    assert_eq!(stored, None);
    let lock: Option<String> = server.query(&["GET", &cache.lock_key("big")]);
    assert_eq!(lock, None, "lock left behind");
}

/// Lock tokens as stored in Redis: 32 hex digits (128 bits), all distinct over
/// 500 acquisitions, and every hex digit used in every position class (random,
/// not a counter or a timestamp).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_tokens_are_128_bit_random_and_distinct() {
    let server = RedisServer::start();
    let cache = LockedCache::builder()
        .redis(server.url())
        .key_prefix(unique_prefix("tokens"))
        .build()
        .await
        .unwrap();
    let mut tokens = std::collections::HashSet::new();
    let mut digits_first = std::collections::HashSet::new();
    let mut digits_last = std::collections::HashSet::new();
    for i in 0..500 {
        let resource = cache.lock_key(&format!("k{i}"));
        let guard = cache
            .lock()
            .try_acquire(&resource, Duration::from_secs(5))
            .await
            .unwrap()
            .expect("free");
        let token: String = server.query(&["GET", &resource]);
        guard.release().await.unwrap();
        assert_eq!(token.len(), 32, "{token}");
        assert!(token.bytes().all(|c| c.is_ascii_hexdigit()), "{token}");
        digits_first.insert(token.as_bytes()[0]);
        digits_last.insert(token.as_bytes()[31]);
        assert!(tokens.insert(token), "a token repeated");
    }
    assert_eq!(digits_first.len(), 16);
    assert_eq!(digits_last.len(), 16);
}

/// A password-protected Redis: with a wrong password every call fails with a
/// typed error, with the right one the cache works, and through a kill of the
/// server the cache logs warnings and debug events that name it. None of the
/// errors, `Debug` outputs or log events (all levels) contains either password.
#[test]
fn passwords_never_appear_in_log_events_errors_or_debug_output() {
    let mut server = RedisServer::start();
    server.cmd(&["CONFIG", "SET", "requirepass", "right-s3cret"]);
    let port = server.port();
    current_thread().block_on(async {
        let (events, _guard) = capture();
        let mut seen = Vec::new();
        let wrong = LockedCache::builder()
            .redis(format!("redis://:wrong-s3cret@127.0.0.1:{port}"))
            .key_prefix(unique_prefix("password"))
            .connect_timeout(Duration::from_millis(300))
            .command_timeout(Duration::from_millis(300))
            .build()
            .await
            .unwrap();
        seen.push(format!("{wrong:?}"));
        let e = wrong.get::<String>("k").await.expect_err("wrong password");
        seen.push(format!("{e} {e:?}"));
        let e = wrong
            .get_or_load("k", || async { Ok::<_, String>("v".to_owned()) })
            .await
            .expect_err("wrong password");
        seen.push(format!("{e} {e:?}"));

        let right = LockedCache::builder()
            .redis(format!("redis://:right-s3cret@127.0.0.1:{port}"))
            .key_prefix(unique_prefix("password"))
            .connect_timeout(Duration::from_millis(300))
            .command_timeout(Duration::from_millis(300))
            .build()
            .await
            .unwrap();
        seen.push(format!("{right:?} {:?}", right.lock()));
        let v: String = right
            .get_or_load("k", || async { Ok::<_, String>("v".to_owned()) })
            .await
            .unwrap();
        assert_eq!(v, "v");
        // Errors and warnings while the server is gone, then the load path.
        server.kill();
        let e = right.get::<String>("k").await.expect_err("down");
        seen.push(format!("{e} {e:?}"));
        let e = right
            .get_or_load("other", || async { Ok::<_, String>("v".to_owned()) })
            .await
            .expect_err("down");
        seen.push(format!("{e} {e:?}"));
        tokio::time::sleep(Duration::from_millis(300)).await;

        let events = events.events();
        let texts: Vec<String> = events.iter().map(|e| e.text()).collect();
        assert!(
            events.iter().any(|e| e.level <= Level::DEBUG
                && e.field("server").is_some_and(|s| s.contains(":***@"))),
            "expected events naming the (redacted) server: {texts:#?}"
        );
        for text in texts.iter().chain(&seen) {
            assert!(!text.contains("s3cret"), "a password leaked: {text}");
        }
        eprintln!(
            "{} events and {} errors/Debug outputs checked",
            texts.len(),
            seen.len()
        );
    });
}

/// A recursive value type, for crafted deep nesting.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
enum Tree {
    Leaf,
    Node(Box<Tree>),
}

/// Crafted bytes with a valid locked-cache header, written straight into Redis:
/// 10,000 and 100,000 nesting levels of a recursive type (a stack overflow
/// aborted the process), a 2^62 length for `Vec<()>` and `BTreeSet<()>` (a
/// worker spun forever), and a 2^40-byte `String` claim. `get` reads each as a
/// miss (warned, counted), `get_or_load` reloads and overwrites it once; the
/// process lives on and every call returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_bytes_never_take_the_process_down_and_read_as_a_miss() {
    let server = RedisServer::start();
    let cache = LockedCache::builder()
        .redis(server.url())
        .key_prefix(unique_prefix("crafted"))
        .build()
        .await
        .unwrap();
    let header = |payload: &[u8]| {
        let mut bytes = codec::header(b'b', &codec::Meta::default()).to_vec();
        bytes.extend_from_slice(payload);
        bytes
    };
    let varint_u64 = |n: u64| {
        let mut v = vec![253u8];
        v.extend_from_slice(&n.to_le_bytes());
        v
    };
    let deep = |levels: usize| {
        let mut payload = vec![1u8; levels];
        payload.push(0);
        header(&payload)
    };
    let store = RedisStore::open(&server.url(), Default::default()).unwrap();
    let started = Instant::now();

    // Recursive type.
    for levels in [10_000, 100_000] {
        let key = format!("tree{levels}");
        store
            .set(
                &cache.value_key(&key),
                &deep(levels),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        assert_eq!(cache.get::<Tree>(&key).await.unwrap(), None);
        let loaded: Tree = cache
            .get_or_load(&key, || async {
                Ok::<_, String>(Tree::Node(Box::new(Tree::Leaf)))
            })
            .await
            .unwrap();
        assert_eq!(loaded, Tree::Node(Box::new(Tree::Leaf)));
        assert_eq!(
            cache.get::<Tree>(&key).await.unwrap(),
            Some(loaded),
            "overwritten"
        );
    }
    // Zero-sized elements with an absurd count.
    let spin = header(&varint_u64(1 << 62));
    store
        .set(&cache.value_key("units"), &spin, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(cache.get::<Vec<()>>("units").await.unwrap(), None);
    assert_eq!(
        cache
            .get::<std::collections::BTreeSet<()>>("units")
            .await
            .unwrap(),
        None
    );
    let loaded: Vec<()> = cache
        .get_or_load("units", || async { Ok::<_, String>(vec![(); 3]) })
        .await
        .unwrap();
    assert_eq!(loaded.len(), 3);
    // A huge allocation claim.
    let claim = header(&varint_u64(1 << 40));
    store
        .set(&cache.value_key("claim"), &claim, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(cache.get::<String>("claim").await.unwrap(), None);
    assert_eq!(cache.get::<Vec<u8>>("claim").await.unwrap(), None);

    let took = started.elapsed();
    let corrupt = cache.stats().corrupt_values;
    eprintln!("crafted bytes: {corrupt} corrupt reads, all calls done in {took:?}");
    assert!(corrupt >= 7, "each crafted read counted: {corrupt}");
}

/// Nothing is kept per key once `get_or_load` calls end, however they end:
/// hits, loads, loader errors, and calls cancelled while waiting as followers
/// or for the lock held by another cache. 600 distinct keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_entry_is_kept_per_key_once_its_calls_end() {
    let server = RedisServer::start();
    let prefix = unique_prefix("entries");
    let build = || async {
        LockedCache::builder()
            .redis(server.url())
            .key_prefix(&prefix)
            .build()
            .await
            .unwrap()
    };
    let (cache, other) = (build().await, build().await);
    let runs = Arc::new(AtomicU32::new(0));
    for i in 0..200 {
        let key = format!("ok{i}");
        let _: String = cache.get_or_load(&key, counting(&runs, "v")).await.unwrap();
        let _: String = cache.get_or_load(&key, counting(&runs, "v")).await.unwrap();
        let failed: Result<String, LoadError<String>> = cache
            .get_or_load(&format!("err{i}"), || async { Err("no".to_owned()) })
            .await;
        assert!(failed.is_err());
    }
    for i in 0..200 {
        // A leader holding the lock in another cache; here a leader and a
        // follower waiting for it, both cancelled.
        let key = format!("cancel{i}");
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let holder = tokio::spawn({
            let other = other.clone();
            let key = key.clone();
            async move {
                other
                    .get_or_load(&key, || async move {
                        release_rx.await.ok();
                        Ok::<_, String>(1u32)
                    })
                    .await
            }
        });
        while other.stats().loads < (i + 1) as u64 {
            tokio::task::yield_now().await;
        }
        let waiting: Vec<_> = (0..2)
            .map(|_| {
                let (cache, key) = (cache.clone(), key.clone());
                tokio::spawn(async move {
                    cache
                        .get_or_load(&key, || async { Ok::<_, String>(2u32) })
                        .await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(2)).await;
        for task in &waiting {
            task.abort();
        }
        for task in waiting {
            let _ = task.await;
        }
        release_tx.send(()).unwrap();
        assert_eq!(holder.await.unwrap().unwrap(), 1);
    }
    let left = cache.retained_entries() + other.retained_entries();
    eprintln!("600 keys, 200 with cancelled waiters: {left} entries left");
    assert_eq!(left, 0, "entries left behind");
}
