//! TLS (`rediss://`, feature `tls`): the cache, its wake-ups and its lock over
//! a TLS-only `redis-server` with certificates the test makes itself; mTLS; a
//! wrong CA refused with a typed error; and, without the feature, a `rediss://`
//! URL refused at `build()` with an error naming the feature.
//!
//! Run with `cargo test --features tls --test tls` (CI runs `--all-features`).

#[path = "../../tests/support/mod.rs"]
mod support;
#[cfg(feature = "tls")]
#[path = "../../tests/support/tls.rs"]
#[allow(dead_code)]
mod tls_support;

use locked_cache::{Error, LockedCache};

/// Always compiled: what a `rediss://` URL does at `build()` depends on the
/// feature, and both sides are checked.
#[tokio::test]
async fn a_rediss_url_needs_the_tls_feature() {
    // Nothing listens there: building connects lazily, and a failed
    // subscription is retried in the background, so `build()` itself only
    // validates. Port 1 is never a Redis.
    let built = LockedCache::builder()
        .redis("rediss://127.0.0.1:1")
        .connect_timeout(std::time::Duration::from_millis(200))
        .build()
        .await;
    if cfg!(feature = "tls") {
        assert!(
            built.is_ok(),
            "with the tls feature a rediss:// URL builds: {:?}",
            built.err()
        );
    } else {
        let err = built.expect_err("rediss:// without the tls feature must fail");
        assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
        assert!(
            err.to_string().contains(r#"features = ["tls"]"#),
            "the message names the feature: {err}"
        );
    }
    // Certificates on a plain URL: refused either way (with the feature, for
    // being on a redis:// URL; without, for needing the feature).
    let err = LockedCache::builder()
        .redis("redis://127.0.0.1:1")
        .tls_root_ca(b"-----BEGIN CERTIFICATE-----\n".to_vec())
        .build()
        .await
        .expect_err("TLS options on a redis:// URL must fail");
    assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
}

#[cfg(feature = "tls")]
mod over_tls {
    use std::sync::Arc;
    use std::sync::atomic::AtomicU32;
    use std::time::{Duration, Instant};

    use locked_cache::LockedCache;

    use super::support::{
        RedisServer, counting_loader, eventually, join_all_checked, time_to_wake, unique_prefix,
    };
    use super::tls_support::{Certs, TlsServer};

    const MINUTE: Duration = Duration::from_secs(60);

    async fn cache_on(server: &TlsServer, certs: &Certs, prefix: &str) -> LockedCache {
        LockedCache::builder()
            .redis(server.url())
            .tls_root_ca(certs.ca_pem.clone())
            .tls_client_cert(certs.client_cert_pem.clone(), certs.client_key_pem.clone())
            .key_prefix(prefix)
            .ttl(MINUTE)
            .retry_time(Duration::from_secs(5))
            .build()
            .await
            .expect("build over TLS")
    }

    /// 3 caches × 20 callers on one cold key over TLS: one load, everyone gets it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stampede_over_tls_loads_once() {
        let certs = Certs::generate();
        let server = TlsServer::start(&certs, false);
        let prefix = unique_prefix("tls-stampede");
        let runs = Arc::new(AtomicU32::new(0));
        let mut caches = Vec::new();
        for _ in 0..3 {
            caches.push(cache_on(&server, &certs, &prefix).await);
        }
        let mut calls = Vec::new();
        for cache in &caches {
            for _ in 0..20 {
                let (cache, runs) = (cache.clone(), Arc::clone(&runs));
                calls.push(tokio::spawn(async move {
                    cache
                        .get_or_load(
                            "k",
                            counting_loader(&runs, Duration::from_millis(200), 42u64),
                        )
                        .await
                }));
            }
        }
        for result in join_all_checked(calls).await {
            assert_eq!(result.expect("get_or_load over TLS"), 42);
        }
        assert_eq!(
            runs.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "one load"
        );
        // The value is really on the TLS server.
        let stored: Option<Vec<u8>> = server.query(&["GET", &format!("{prefix}{{k}}")]);
        assert!(stored.is_some(), "the value is stored on the TLS server");
    }

    /// A waiter in another cache (its own subscription, over TLS) wakes when
    /// the value is stored, although its retry time is 5 s.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiter_in_another_cache_is_woken_over_tls() {
        let certs = Certs::generate();
        let server = TlsServer::start(&certs, true);
        let prefix = unique_prefix("tls-wake");
        let holder = cache_on(&server, &certs, &prefix).await;
        let waiter = cache_on(&server, &certs, &prefix).await;
        assert!(
            eventually(Duration::from_secs(2), || async {
                let n: Vec<redis::Value> =
                    server.query(&["PUBSUB", "NUMSUB", "locked-cache:released"]);
                matches!(n.get(1), Some(redis::Value::Int(2)))
            })
            .await,
            "both caches subscribe over TLS"
        );
        let latency = time_to_wake(&holder, &waiter, "k").await;
        println!("TLS: the waiter returned {latency:?} after the loader finished (retry 5 s)");
        assert!(
            latency < Duration::from_millis(500),
            "woke after {latency:?}"
        );
        assert!(
            waiter.stats().wakeups >= 1,
            "woken by pub/sub, not by polling"
        );
        assert_eq!(waiter.stats().loads, 0);
    }

    /// The lock on its own over TLS: acquire, refused to another holder,
    /// release, acquired again; the key is on the TLS server while held.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_lock_over_tls() {
        let certs = Certs::generate();
        let server = TlsServer::start(&certs, false);
        let prefix = unique_prefix("tls-lock");
        let a = cache_on(&server, &certs, &prefix).await;
        let b = cache_on(&server, &certs, &prefix).await;
        let name = format!("{prefix}resource");
        let guard = a.lock().acquire(&name).await.expect("acquire over TLS");
        let held: Option<Vec<u8>> = server.query(&["GET", &name]);
        assert!(held.is_some(), "the lock key is on the TLS server");
        let other = b
            .lock()
            .try_acquire(&name, Duration::from_secs(5))
            .await
            .expect("try_acquire over TLS");
        assert!(other.is_none(), "a held lock is refused to another holder");
        assert!(guard.release().await.expect("release over TLS"));
        let held: Option<Vec<u8>> = server.query(&["GET", &name]);
        assert!(held.is_none(), "released");
        let again = b
            .lock()
            .try_acquire(&name, Duration::from_secs(5))
            .await
            .expect("try_acquire over TLS");
        assert!(again.is_some(), "free again after the release");
    }

    /// A server that requires client certificates: with one, everything works;
    /// without one, a typed error, quickly.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mtls_with_and_without_a_client_certificate() {
        let certs = Certs::generate();
        let server = TlsServer::start(&certs, true);
        let prefix = unique_prefix("tls-mtls");
        let with_cert = cache_on(&server, &certs, &prefix).await;
        with_cert
            .ping()
            .await
            .expect("mTLS with a client certificate");
        with_cert.set("k", &7u32).await.expect("set over mTLS");
        assert_eq!(with_cert.get::<u32>("k").await.unwrap(), Some(7));

        let without = LockedCache::builder()
            .redis(server.url())
            .tls_root_ca(certs.ca_pem.clone())
            .key_prefix(&prefix)
            .build()
            .await
            .expect("build (connections open lazily)");
        let started = Instant::now();
        let err = without
            .ping()
            .await
            .expect_err("a server requiring a client certificate refuses a client without one");
        let took = started.elapsed();
        println!("mTLS without a client certificate: {err} ({took:?})");
        assert!(
            err.is_tls_error(),
            "a TLS error (the server's alert): {err:?}"
        );
        assert!(!err.is_timeout(), "refused, not timed out: {err:?}");
        assert!(
            took < Duration::from_millis(900),
            "refused quickly, took {took:?}"
        );
        let err = without
            .get_or_load("k2", || async { Ok::<_, String>(1u32) })
            .await
            .expect_err("get_or_load fails too");
        let err = err.cache_error().expect("a cache error");
        assert!(err.is_tls_error(), "{err:?}");
    }

    /// A server certificate from another CA: refused with a TLS error at once
    /// (no hang, no timeout), on the pool and on the subscription alike.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wrong_ca_is_refused_quickly_with_a_typed_error() {
        let certs = Certs::generate();
        let other = Certs::generate();
        let server = TlsServer::start(&certs, false);
        let cache = LockedCache::builder()
            .redis(server.url())
            .tls_root_ca(other.ca_pem.clone())
            .key_prefix(unique_prefix("tls-wrong-ca"))
            .build()
            .await
            .expect("build (connections open lazily)");
        let started = Instant::now();
        let err = cache
            .ping()
            .await
            .expect_err("a certificate from another CA must be refused");
        let took = started.elapsed();
        println!("wrong CA: {err} ({took:?})");
        assert!(err.is_tls_error(), "a TLS error: {err:?}");
        assert!(
            err.is_connection_error(),
            "also a connection error: {err:?}"
        );
        assert!(!err.is_timeout(), "refused, not timed out: {err:?}");
        assert!(
            took < Duration::from_millis(500),
            "refused quickly, took {took:?}"
        );
        let err = cache
            .get_or_load("k", || async { Ok::<_, String>(1u32) })
            .await
            .expect_err("get_or_load is refused too");
        assert!(
            err.cache_error()
                .is_some_and(locked_cache::Error::is_tls_error),
            "{err:?}"
        );
        // Without a custom CA, the built-in roots do not trust a private CA either.
        let default_roots = LockedCache::builder()
            .redis(server.url())
            .build()
            .await
            .expect("build");
        let err = default_roots
            .ping()
            .await
            .expect_err("a private CA is not in the built-in roots");
        assert!(err.is_tls_error(), "{err:?}");
    }

    /// Certificates from files (`tls_root_ca_file`, `tls_client_cert_files`),
    /// and what TLS costs: the first call (TCP, TLS handshake, script loading)
    /// and a hit, against the same on a clear-text server.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn certificates_from_files_and_what_tls_costs() {
        let certs = Certs::generate();
        let server = TlsServer::start(&certs, true);
        let plain = RedisServer::start();
        let prefix = unique_prefix("tls-cost");
        let tls_cache = LockedCache::builder()
            .redis(server.url())
            .tls_root_ca_file(certs.path("ca.pem"))
            .tls_client_cert_files(certs.path("client.pem"), certs.path("client.key"))
            .key_prefix(&prefix)
            .wake_ups(false)
            .build()
            .await
            .expect("build from files");
        let plain_cache = LockedCache::builder()
            .redis(plain.url())
            .key_prefix(&prefix)
            .wake_ups(false)
            .build()
            .await
            .expect("build plain");
        let mut firsts = Vec::new();
        for cache in [&tls_cache, &plain_cache] {
            let started = Instant::now();
            cache.ping().await.expect("first call");
            firsts.push(started.elapsed());
            cache.set("k", &1u64).await.expect("set");
        }
        let mut hits = Vec::new();
        for cache in [&tls_cache, &plain_cache] {
            let mut samples = Vec::new();
            for _ in 0..200 {
                let started = Instant::now();
                assert_eq!(cache.get::<u64>("k").await.unwrap(), Some(1));
                samples.push(started.elapsed());
            }
            samples.sort();
            hits.push(samples[samples.len() / 2]);
        }
        println!(
            "first call (connect, handshake, SCRIPT LOAD): TLS {:?}, plain {:?}; hit median: TLS {:?}, plain {:?}",
            firsts[0], firsts[1], hits[0], hits[1]
        );
        assert!(
            firsts[0] < Duration::from_secs(1),
            "TLS connect took {:?}",
            firsts[0]
        );
    }
}
