//! locked-cache in an axum service: `GET /reports/{month}` shields a slow
//! query (see `lib.rs` for the HTTP mapping). Configuration from the
//! environment; stops gracefully on Ctrl-C or SIGTERM (in-flight requests
//! finish; their locks are released).
//!
//! ```text
//! cargo run -p locked-cache-axum-example                      # embedded store
//! REDIS_URL=redis://127.0.0.1:6379 cargo run -p locked-cache-axum-example
//! curl -i localhost:3000/reports/2026-11                      # X-Cache: MISS, then HIT
//! LOG_LEVEL=debug cargo run -p locked-cache-axum-example      # the cache's spans too
//! ```
//!
//! Environment: `LISTEN_ADDR`, `REDIS_URL` or `REDIS_URLS` (comma-separated
//! masters), `CACHE_TTL_SECS`, `LOCK_EXPIRY_MS`, `WAIT_TIME_MS`, `QUORUM_LOSS`
//! (`fail-open`/`fail-closed`), `LOG_LEVEL` (see `Config` in `lib.rs`).

use std::sync::Arc;
use std::time::Duration;

use locked_cache_axum_example::{AppState, Config, Database, router};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Spans are printed when they close, with their fields (outcome, wait...).
    let level = match std::env::var("LOG_LEVEL").as_deref() {
        Ok("debug") => tracing::Level::DEBUG,
        Ok("warn") => tracing::Level::WARN,
        _ => tracing::Level::INFO,
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .with_writer(std::io::stderr)
        .init();
    let config = Config::from_env(|name| std::env::var(name).ok())?;
    let cache = config.cache().await?;
    // Fail fast on a wrong URL or password rather than on the first request.
    cache.ping().await?;
    let state = AppState {
        cache,
        db: Arc::new(Database::new(Duration::from_millis(300))),
        ttl: config.ttl,
    };
    let listener = tokio::net::TcpListener::bind(&config.listen).await?;
    eprintln!(
        "listening on http://{}  ({config:?})",
        listener.local_addr()?
    );
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    eprintln!("stopped");
    Ok(())
}

/// Ctrl-C, or SIGTERM (what orchestrators send) on Unix.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}
