//! Quick start: a stampede of 100 concurrent requests for one slow value, and the
//! loader runs once.
//!
//! Runs on the embedded in-memory store, or on Redis when `REDIS_URL` is set:
//!
//! ```text
//! cargo run -p quickstart
//! REDIS_URL=redis://127.0.0.1:6379 cargo run -p quickstart
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use locked_cache::{LockedCache, Store};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Report {
    month: String,
    revenue_cents: u64,
}

/// Stands in for a slow database query.
async fn build_report(month: &str, runs: &AtomicU32) -> Result<Report, std::io::Error> {
    runs.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(Report {
        month: month.to_owned(),
        revenue_cents: 1_234_567,
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut builder = LockedCache::builder()
        .ttl(Duration::from_secs(60))
        .key_prefix(format!("quickstart:{}:", std::process::id()));
    let store = match std::env::var("REDIS_URL") {
        Ok(url) if !url.is_empty() => {
            builder = builder.redis(url.clone());
            format!(
                "Redis at {}",
                locked_cache::RedisStore::open(&url, Default::default())?.server()
            )
        }
        _ => "the embedded in-memory store (set REDIS_URL to use Redis)".to_owned(),
    };
    let cache = builder.build().await?;
    println!("locked-cache quick start on {store}");

    let runs = Arc::new(AtomicU32::new(0));
    let started = Instant::now();
    let mut requests = Vec::new();
    for _ in 0..100 {
        let (cache, runs) = (cache.clone(), Arc::clone(&runs));
        requests.push(tokio::spawn(async move {
            cache
                .get_or_load("report:2026-11", || build_report("2026-11", &runs))
                .await
        }));
    }
    for request in requests {
        let report: Report = request.await??;
        assert_eq!(report.month, "2026-11");
    }
    println!(
        "100 concurrent requests served in {:?}; the 200 ms loader ran {} time(s)",
        started.elapsed(),
        runs.load(Ordering::SeqCst)
    );

    let started = Instant::now();
    let report: Report = cache
        .get_or_load("report:2026-11", || build_report("2026-11", &runs))
        .await?;
    println!(
        "a later request: {report:?} in {:?} (a hit)",
        started.elapsed()
    );
    println!("stats: {:?}", cache.stats());
    cache.invalidate("report:2026-11").await?;
    Ok(())
}
