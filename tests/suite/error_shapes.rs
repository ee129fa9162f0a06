//! `?` from a handler written the usual ways, against a real redis-server:
//! a loader returning `anyhow::Error` in an `anyhow::Result` handler, a boxed
//! error in a boxed-error handler, `eyre`, and a `thiserror` error through
//! `#[from] LoadError<MyError>` in the application's own enum. Each test
//! asserts on the error that comes out, and that the loader's message is in
//! it once (not lost, not doubled by `{:#}`).

use std::error::Error as StdError;
use std::sync::{Arc, Mutex};

use crate::support::{RedisServer, unique_prefix};
use locked_cache::{LoadError, LockedCache};

type BoxError = Box<dyn StdError + Send + Sync>;

async fn cache(server: &RedisServer, test: &str) -> LockedCache {
    LockedCache::builder()
        .redis(server.url())
        .key_prefix(unique_prefix(test))
        .build()
        .await
        .expect("build")
}

/// How often `needle` occurs in `haystack`.
fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

#[tokio::test]
async fn anyhow_loader_in_an_anyhow_handler() {
    let server = RedisServer::start();
    let cache = cache(&server, "anyhow").await;
    async fn handler(cache: &LockedCache) -> anyhow::Result<String> {
        let name: String = cache
            .get_or_load("user:42", || async {
                Err(anyhow::anyhow!("connection refused").context("loading user 42"))
            })
            .await?;
        Ok(name)
    }
    let e = handler(&cache).await.unwrap_err();
    let plain = format!("{e}");
    let chain = format!("{e:#}");
    assert_eq!(
        plain,
        "the loader failed: loading user 42: connection refused"
    );
    assert_eq!(count(&chain, "connection refused"), 1, "{chain}");
    // The handler can still get at the loader's own error.
    let load = e
        .downcast_ref::<LoadError<anyhow::Error>>()
        .expect("a LoadError inside");
    let loader = load.loader_error().expect("the loader failed");
    assert_eq!(loader.to_string(), "loading user 42");
    assert_eq!(loader.root_cause().to_string(), "connection refused");
    // And a cache failure comes out as the cache's error.
    async fn bad_key(cache: &LockedCache) -> anyhow::Result<u32> {
        Ok(cache
            .get_or_load("", || async { Ok::<_, anyhow::Error>(1) })
            .await?)
    }
    let e = bad_key(&cache).await.unwrap_err();
    let load = e.downcast_ref::<LoadError<anyhow::Error>>().unwrap();
    assert!(load.cache_error().unwrap().is_invalid_input(), "{e:#}");
}

#[tokio::test]
async fn io_error_loader_in_an_anyhow_handler() {
    let server = RedisServer::start();
    let cache = cache(&server, "io_anyhow").await;
    let result: anyhow::Result<u32> = async {
        let v: u32 = cache
            .get_or_load("k", || async { Err(std::io::Error::other("disk on fire")) })
            .await?;
        Ok(v)
    }
    .await;
    let e = result.unwrap_err();
    assert_eq!(format!("{e:#}"), "the loader failed: disk on fire");
    let load = e.downcast::<LoadError<std::io::Error>>().unwrap();
    let io = load.try_into_loader_error().expect("the only owner");
    assert_eq!(io.kind(), std::io::ErrorKind::Other);
}

#[tokio::test]
async fn boxed_loader_in_a_boxed_handler() {
    let server = RedisServer::start();
    let cache = cache(&server, "boxed").await;
    async fn handler(cache: &LockedCache) -> Result<u64, BoxError> {
        let n: u64 = cache
            .get_or_load("count", || async {
                Err::<u64, BoxError>("backend said no".into())
            })
            .await?;
        Ok(n)
    }
    let e = handler(&cache).await.unwrap_err();
    assert_eq!(e.to_string(), "the loader failed: backend said no");
    assert!(e.source().is_none(), "the message is shown, not repeated");
    let load = e.downcast_ref::<LoadError<BoxError>>().unwrap();
    assert_eq!(load.loader_error().unwrap().to_string(), "backend said no");
}

#[tokio::test]
async fn eyre_loader_in_an_eyre_handler() {
    let server = RedisServer::start();
    let cache = cache(&server, "eyre").await;
    async fn handler(cache: &LockedCache) -> eyre::Result<String> {
        let v: String = cache
            .get_or_load("k", || async {
                Err(eyre::eyre!("timeout").wrap_err("calling the pricing service"))
            })
            .await?;
        Ok(v)
    }
    let e = handler(&cache).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "the loader failed: calling the pricing service: timeout"
    );
    assert_eq!(e.chain().count(), 1, "one message, no repeated source");
}

#[derive(Debug, thiserror::Error)]
enum DbError {
    #[error("user {0} not found")]
    NotFound(u64),
}

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Cache(#[from] LoadError<DbError>),
    #[error("forbidden")]
    #[allow(dead_code)]
    Forbidden,
}

#[tokio::test]
async fn thiserror_loader_through_an_app_enum() {
    let server = RedisServer::start();
    let cache = cache(&server, "thiserror").await;
    async fn handler(cache: &LockedCache) -> Result<String, AppError> {
        let v: String = cache
            .get_or_load("user:7", || async { Err(DbError::NotFound(7)) })
            .await?;
        Ok(v)
    }
    let e = handler(&cache).await.unwrap_err();
    assert_eq!(e.to_string(), "the loader failed: user 7 not found");
    let AppError::Cache(load) = &e else {
        panic!("{e:?}")
    };
    assert!(matches!(load.loader_error(), Some(DbError::NotFound(7))));
    // Into anyhow as well, once.
    let any = anyhow::Error::from(e);
    assert_eq!(count(&format!("{any:#}"), "not found"), 1, "{any:#}");
}

/// A `tracing` error field (`error = &e as &dyn Error`) shows the loader's
/// message: the subscriber gets the error, whose Display carries it.
#[tokio::test]
async fn a_tracing_error_field_shows_the_cause() {
    struct Capture(Arc<Mutex<Vec<String>>>);
    struct Visitor<'a>(&'a mut Vec<String>);
    impl tracing::field::Visit for Visitor<'_> {
        fn record_error(
            &mut self,
            _field: &tracing::field::Field,
            value: &(dyn StdError + 'static),
        ) {
            // What tracing-subscriber's formatter prints: the error, then
            // its sources.
            let mut text = value.to_string();
            let mut source = value.source();
            while let Some(s) = source {
                text.push_str(&format!(" / {s}"));
                source = s.source();
            }
            self.0.push(text);
        }
        fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
    }
    impl tracing::Subscriber for Capture {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            event.record(&mut Visitor(&mut self.0.lock().unwrap()));
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    let server = RedisServer::start();
    let cache = cache(&server, "tracing").await;
    let e = cache
        .get_or_load::<u32, _, _, _>("k", || async { Err(DbError::NotFound(9)) })
        .await
        .unwrap_err();
    let seen = Arc::new(Mutex::new(Vec::new()));
    tracing::subscriber::with_default(Capture(Arc::clone(&seen)), || {
        tracing::error!(error = &e as &dyn StdError, "load failed");
    });
    assert_eq!(
        *seen.lock().unwrap(),
        vec!["the loader failed: user 9 not found".to_owned()]
    );
}
