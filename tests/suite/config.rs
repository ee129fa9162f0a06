//! Configuration is validated by `build()`, which returns a typed error and
//! never panics; defaults are what the docs say; public futures are `Send`.

use std::time::Duration;

use locked_cache::{Error, LockOptions, LockedCache, Redlock};

async fn rejected(builder: locked_cache::Builder) -> String {
    match builder.build().await {
        Err(Error::InvalidConfig(message)) => message,
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

#[tokio::test]
async fn invalid_configuration_is_rejected_with_a_typed_error() {
    let b = LockedCache::builder;
    assert!(rejected(b().ttl(Duration::ZERO)).await.contains("ttl"));
    assert!(
        rejected(b().ttl(Duration::from_secs(u64::MAX / 4)))
            .await
            .contains("ttl")
    );
    assert!(
        rejected(b().lock_expiry(Duration::ZERO))
            .await
            .contains("expiry")
    );
    assert!(
        rejected(b().lock_expiry(Duration::from_secs(90_000)))
            .await
            .contains("expiry")
    );
    assert!(
        rejected(b().retry_time(Duration::ZERO))
            .await
            .contains("retry")
    );
    assert!(
        rejected(b().wait_time(Duration::from_secs(90_000)))
            .await
            .contains("wait")
    );
    assert!(rejected(b().pool_size(0)).await.contains("pool"));
    assert!(
        rejected(b().connect_timeout(Duration::ZERO))
            .await
            .contains("timeout")
    );
    assert!(
        rejected(b().command_timeout(Duration::ZERO))
            .await
            .contains("timeout")
    );
    assert!(rejected(b().max_value_size(0)).await.contains("maximum"));
    assert!(
        rejected(b().key_prefix("lock.app:"))
            .await
            .contains("prefix")
    );
    assert!(rejected(b().release_channel("")).await.contains("channel"));
    assert!(rejected(b().redis("not a url")).await.contains("redis url"));
    assert!(
        rejected(
            b().redis("redis://127.0.0.1:7001")
                .redis("redis://127.0.0.1:7001")
        )
        .await
        .contains("twice")
    );
    assert!(
        rejected(b().command_timeout(Duration::MAX))
            .await
            .contains("timeout")
    );
    assert!(
        rejected(b().connect_timeout(Duration::from_secs(7200)))
            .await
            .contains("timeout")
    );
    assert!(
        rejected(b().retry_time(Duration::from_secs(7200)))
            .await
            .contains("retry")
    );
    assert!(
        rejected(b().redis("http://127.0.0.1:1"))
            .await
            .contains("redis url")
    );
    assert!(
        rejected(b().redis("redis://127.0.0.1:1").cache_url("nope"))
            .await
            .contains("redis url")
    );
    assert!(matches!(
        Redlock::new(Vec::new(), LockOptions::default()).await,
        Err(Error::InvalidConfig(_))
    ));
}

#[tokio::test]
async fn passwords_never_appear_in_debug_output_or_errors() {
    let url = "redis://user:hunter2@127.0.0.1:1/0";
    let builder = LockedCache::builder()
        .redis(url)
        .connect_timeout(Duration::from_millis(100));
    assert!(!format!("{builder:?}").contains("hunter2"), "{builder:?}");
    let cache = builder.wake_ups(false).build().await.unwrap();
    assert!(!format!("{cache:?}").contains("hunter2"), "{cache:?}");
    let err = cache
        .get::<u8>("k")
        .await
        .expect_err("nothing listens on port 1");
    assert!(err.is_connection_error(), "{err:?}");
    assert!(!format!("{err} {err:?}").contains("hunter2"), "{err:?}");
    for malformed in [
        "redis://:hunter2@[::1",
        "user:hunter2@127.0.0.1:6379",
        "redis:/:hunter2@127.0.0.1:6379",
        "redis://:hun/ter2@127.0.0.1:6379",
    ] {
        let bad = LockedCache::builder().redis(malformed).build().await;
        let error = bad
            .as_ref()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        let shown = format!("{bad:?} {error}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("ter2"),
            "{malformed}: {shown}"
        );
    }
}

/// A short prefix joined with a key cannot reach the lock or fence key space
/// (where a value would overwrite another key's lock): the key sits inside the
/// hash-tag braces, after the prefix. `lo` + `ck.lofoo` is its own entry, apart
/// from `foo`'s lock; a prefix with braces (which would replace the entry's
/// hash tag) is refused.
#[tokio::test]
async fn keys_cannot_reach_the_lock_key_space() {
    let cache = LockedCache::builder()
        .key_prefix("lo")
        .build()
        .await
        .unwrap();
    assert_eq!(cache.value_key("ck.lofoo"), "lo{ck.lofoo}");
    assert_eq!(cache.lock_key("foo"), "lock.lo{foo}");
    let a: u8 = cache
        .get_or_load("ck.lofoo", || async { Ok::<_, String>(1u8) })
        .await
        .unwrap();
    let b: u8 = cache
        .get_or_load("foo", || async { Ok::<_, String>(2u8) })
        .await
        .unwrap();
    assert_eq!((a, b), (1, 2));
    assert!(cache.invalidate("ck.lofoo").await.unwrap());
    assert_eq!(cache.get::<u8>("foo").await.unwrap(), Some(2));
    let braces = LockedCache::builder().key_prefix("app{1}:").build().await;
    assert!(matches!(braces, Err(Error::InvalidConfig(_))), "{braces:?}");
}

#[test]
fn defaults_are_the_documented_constants() {
    let options = LockOptions::default();
    assert_eq!(options.expiry, locked_cache::DEFAULT_REDLOCK_EXPIRY);
    assert_eq!(options.wait, locked_cache::DEFAULT_WAIT);
    assert_eq!(options.retry, locked_cache::DEFAULT_RETRY);
    assert!(
        options.wait > options.expiry,
        "waiters must outlive a crashed holder"
    );
    assert!(options.wake_ups);
    assert_eq!(options.channel, locked_cache::DEFAULT_CHANNEL);
}

#[test]
fn public_futures_are_send() {
    fn is_send<T: Send>(_: &T) {}
    let cache: LockedCache = unreachable_cache();
    let lock = cache.lock().clone();
    // Never polled: only their types are checked.
    is_send(&cache.get_or_load("k", || async { Ok::<u32, std::io::Error>(1) }));
    is_send(&cache.get::<u32>("k"));
    is_send(&cache.set("k", &1u32));
    is_send(&cache.invalidate("k"));
    is_send(&lock.acquire("r"));
    is_send(&lock.try_acquire("r", Duration::from_secs(1)));
    is_send(&LockedCache::builder().build());
}

fn unreachable_cache() -> LockedCache {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(LockedCache::builder().build())
        .unwrap()
}
