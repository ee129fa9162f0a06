//! locked-cache in an axum service: the router, its state, and
//! [`CacheLayer`] in front of it. `main.rs` reads the configuration from the
//! environment and serves it; `tests/http.rs` sends it real requests.
//!
//! `GET /reports/{month}` runs a slow query (300 ms). The handler knows nothing
//! of the cache: it answers with `Cache-Control: max-age=<CACHE_TTL_SECS>,
//! stale-while-revalidate=600`, and the layer runs it at most once per month
//! per TTL across every instance of the service. Past its TTL a report is
//! served stale for up to 10 minutes while one request refreshes it (nobody
//! waits at an expiry), and a client that hangs up mid-query does not cancel
//! it: the requests waiting for it get its result.
//!
//! - `200` with the report, `X-Cache: HIT`, `MISS` (this request ran the
//!   query) or `STALE`, and `Age`;
//! - `503 Service Unavailable` with `Retry-After: 1` when the cache cannot
//!   answer in time (the lock stayed held for the wait time, the lock quorum
//!   is lost, Redis is unreachable): [`OnCacheError::Unavailable`], so that
//!   the database is not stampeded while the cache is down;
//! - `502 Bad Gateway` when the query itself failed (not cached).
//!
//! `GET /stats` returns the cache's counters as JSON (not cached: it is
//! outside the layer).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use locked_cache::http::{CacheLayer, OnCacheError};
use locked_cache::{LockedCache, QuorumLossPolicy};
use serde::{Deserialize, Serialize};

/// A monthly report: what the slow query returns and the cache stores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub month: String,
    pub revenue_cents: u64,
}

/// The upstream failed (a database error).
#[derive(Debug)]
pub struct DbError(pub String);

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "database: {}", self.0)
    }
}

impl std::error::Error for DbError {}

/// Stands in for the database: a slow query, counted.
#[derive(Debug, Default)]
pub struct Database {
    pub queries: AtomicU64,
    pub latency: Duration,
}

impl Database {
    pub fn new(latency: Duration) -> Database {
        Database {
            queries: AtomicU64::new(0),
            latency,
        }
    }

    /// The slow query. The month `broken` fails, as a database can.
    pub async fn monthly_report(&self, month: &str) -> Result<Report, DbError> {
        self.queries.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.latency).await;
        if month == "broken" {
            return Err(DbError("relation \"orders\" is locked".into()));
        }
        Ok(Report {
            month: month.to_owned(),
            revenue_cents: 1_234_567,
        })
    }
}

/// What the handlers share: clone-cheap.
#[derive(Clone)]
pub struct AppState {
    pub cache: LockedCache,
    pub db: Arc<Database>,
    /// How long a report is fresh (its `max-age`).
    pub ttl: Duration,
}

/// The service's routes: the reports behind the cache layer.
pub fn router(state: AppState) -> Router {
    let cache = CacheLayer::new(state.cache.clone()).on_cache_error(OnCacheError::Unavailable);
    let reports = Router::new()
        .route("/reports/{month}", get(report))
        .layer(cache);
    Router::new()
        .route("/stats", get(stats))
        .merge(reports)
        .with_state(state)
}

/// The slow query, answered with how long its answer may be cached.
async fn report(State(state): State<AppState>, Path(month): Path<String>) -> Response {
    match state.db.monthly_report(&month).await {
        Ok(report) => {
            let policy = format!(
                "max-age={}, stale-while-revalidate=600",
                state.ttl.as_secs()
            );
            let mut response = Json(report).into_response();
            let policy = HeaderValue::from_str(&policy).expect("a valid header");
            response.headers_mut().insert(header::CACHE_CONTROL, policy);
            response
        }
        Err(e) => {
            tracing::warn!(error = %e, "the report query failed");
            (StatusCode::BAD_GATEWAY, "the report query failed\n").into_response()
        }
    }
}

async fn stats(State(state): State<AppState>) -> Json<locked_cache::StatsSnapshot> {
    Json(state.cache.stats())
}

/// The service's configuration, from environment variables.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `LISTEN_ADDR`, default `127.0.0.1:3000`.
    pub listen: String,
    /// `REDIS_URLS` (comma-separated: 1, 3 or 5 masters) or `REDIS_URL`;
    /// none: the embedded store (one instance only).
    pub redis: Vec<String>,
    /// `CACHE_TTL_SECS`, default 300.
    pub ttl: Duration,
    /// `LOCK_EXPIRY_MS`, default 2000: how long a crashed instance blocks a key.
    pub lock_expiry: Duration,
    /// `WAIT_TIME_MS`, default 2500: above the lock expiry (waiters outlive a
    /// crashed holder) and below the clients' own timeout.
    pub wait_time: Duration,
    /// `QUORUM_LOSS=fail-open` to load without the lock when the masters are
    /// lost; default fail-closed (503s rather than a stampede on the database).
    pub quorum_loss: QuorumLossPolicy,
}

impl Config {
    /// Reads the configuration from `var` (`std::env::var` in `main`).
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Config, String> {
        let millis = |name: &str, default: u64| -> Result<Duration, String> {
            match var(name) {
                Some(v) => v
                    .parse()
                    .map(Duration::from_millis)
                    .map_err(|e| format!("{name}={v}: {e}")),
                None => Ok(Duration::from_millis(default)),
            }
        };
        let redis = var("REDIS_URLS")
            .or_else(|| var("REDIS_URL"))
            .map(|urls| {
                urls.split(',')
                    .map(str::trim)
                    .filter(|u| !u.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let quorum_loss = match var("QUORUM_LOSS").as_deref() {
            None | Some("fail-closed") => QuorumLossPolicy::FailClosed,
            Some("fail-open") => QuorumLossPolicy::FailOpen,
            Some(other) => return Err(format!("QUORUM_LOSS={other}: fail-open or fail-closed")),
        };
        Ok(Config {
            listen: var("LISTEN_ADDR").unwrap_or_else(|| "127.0.0.1:3000".into()),
            redis,
            ttl: millis("CACHE_TTL_SECS", 300)?.saturating_mul(1000),
            lock_expiry: millis("LOCK_EXPIRY_MS", 2000)?,
            wait_time: millis("WAIT_TIME_MS", 2500)?,
            quorum_loss,
        })
    }

    /// The cache this configuration describes.
    pub async fn cache(&self) -> Result<LockedCache, locked_cache::Error> {
        LockedCache::builder()
            .name("reports")
            .masters(self.redis.iter().cloned())
            .ttl(self.ttl)
            .lock_expiry(self.lock_expiry)
            .wait_time(self.wait_time)
            .quorum_loss(self.quorum_loss)
            .key_prefix("axum-example:v1:")
            .build()
            .await
    }
}
