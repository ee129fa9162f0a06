//! What a cache costs Redis in memory, per cached key, after many distinct
//! loads: the value server's `used_memory` and keys, and the lock masters'
//! (which should hold nothing once the loads are done), for 100 B and 1 KiB
//! values on 1 and 3 masters; and the lock side's cost per load in flight.
//!
//! ```text
//! cargo bench --bench memory                    # 100,000 loads per shape; ~2-4 min
//! cargo bench --bench memory -- --loads 20000   # quicker
//! ```
//!
//! Writes `target/bench-report/memory.md`. Run by `cargo test --benches` it
//! does a short smoke run and writes nothing.

#[path = "../../tests/support/mod.rs"]
mod support;

use locked_cache_bench as common;

use std::time::{Duration, Instant};

use common::{Flags, Table, die};
use locked_cache::LockedCache;
use support::{Fleet, RedisServer};

fn used_memory(server: &RedisServer) -> i64 {
    let info: String = server.query(&["INFO", "memory"]);
    support::server::parse_info_number(&info, "used_memory")
        .map(|n| n as i64)
        .unwrap_or_else(|| die("no used_memory in INFO memory"))
}

fn dbsize(server: &RedisServer) -> u64 {
    server.query(&["DBSIZE"])
}

/// Runs `n` loads of keys `<tag><i>`, `concurrency` at a time, each loading
/// `size` bytes after `load_for`.
async fn loads(
    cache: &LockedCache,
    tag: &str,
    n: usize,
    size: usize,
    load_for: Duration,
    concurrency: usize,
) {
    let mut next = 0;
    while next < n {
        let batch: Vec<_> = (next..(next + concurrency).min(n))
            .map(|i| {
                let cache = cache.clone();
                let key = format!("{tag}{i}");
                tokio::spawn(async move {
                    cache
                        .get_or_load_bytes(&key, move || async move {
                            if !load_for.is_zero() {
                                tokio::time::sleep(load_for).await;
                            }
                            Ok::<_, String>(vec![b'v'; size])
                        })
                        .await
                        .unwrap_or_else(|e| die(&format!("load {key}: {e}")))
                })
            })
            .collect();
        next += batch.len();
        for call in batch {
            call.await.unwrap_or_else(|e| die(&format!("task: {e}")));
        }
    }
}

fn main() {
    let flags = Flags::parse(&[]);
    flags.reject_unknown(&["loads", "in-flight", "concurrency"]);
    let smoke = !flags.bench_mode;
    let n: usize = flags.get("loads", if smoke { 500 } else { 100_000 });
    let in_flight: usize = flags.get("in-flight", if smoke { 50 } else { 1_000 });
    let concurrency: usize = flags.get("concurrency", 64);
    if n == 0 || in_flight == 0 || concurrency == 0 {
        die("--loads, --in-flight and --concurrency must be above zero");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut table = Table::new(&[
        "masters",
        "value",
        "loads",
        "value server: B per cached key",
        "value server: keys",
        "lock masters after: keys",
        "lock masters after: B per loaded key",
        "lock side per load in flight (B, worst master)",
        "in flight vs values (share)",
    ]);
    for masters in [1_usize, 3] {
        for size in [100_usize, 1024] {
            let fleet = Fleet::start(masters);
            let values = RedisServer::start();
            let row = runtime.block_on(async {
                let cache = LockedCache::builder()
                    .masters(fleet.urls())
                    .cache_url(values.url())
                    .key_prefix("mem:")
                    .ttl(Duration::from_secs(3600))
                    .build()
                    .await
                    .unwrap_or_else(|e| die(&format!("build: {e}")));
                cache
                    .ping()
                    .await
                    .unwrap_or_else(|e| die(&format!("ping: {e}")));
                let lock_before: Vec<i64> = fleet.servers.iter().map(used_memory).collect();
                let values_before = used_memory(&values);
                let started = Instant::now();
                loads(&cache, "k", n, size, Duration::ZERO, concurrency).await;
                let took = started.elapsed();
                // Let the fences (2 lock expiries) go.
                tokio::time::sleep(Duration::from_secs(2)).await;
                let value_keys = dbsize(&values);
                let per_value = (used_memory(&values) - values_before) as f64 / n as f64;
                let lock_keys: u64 = fleet.servers.iter().map(dbsize).sum();
                let lock_after = fleet
                    .servers
                    .iter()
                    .zip(&lock_before)
                    .map(|(s, b)| (used_memory(s) - b) as f64 / n as f64)
                    .fold(f64::MIN, f64::max);
                // Loads in flight: each waits 3 s in its loader.
                let slow = {
                    let cache = cache.clone();
                    tokio::spawn(async move {
                        loads(
                            &cache,
                            "slow",
                            in_flight,
                            size,
                            Duration::from_secs(3),
                            in_flight,
                        )
                        .await
                    })
                };
                let deadline = Instant::now() + Duration::from_secs(10);
                while dbsize(&fleet.servers[0]) < in_flight as u64 && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let per_flight = fleet
                    .servers
                    .iter()
                    .zip(&lock_before)
                    .map(|(s, b)| (used_memory(s) - b) as f64 / in_flight as f64)
                    .fold(f64::MIN, f64::max);
                slow.await
                    .unwrap_or_else(|e| die(&format!("slow loads: {e}")));
                let share = per_flight * in_flight as f64 / (per_value * n as f64);
                eprintln!("{masters} masters, {size} B: {n} loads in {took:?}");
                vec![
                    masters.to_string(),
                    format!("{size} B"),
                    n.to_string(),
                    format!("{per_value:.0}"),
                    value_keys.to_string(),
                    lock_keys.to_string(),
                    format!("{lock_after:.1}"),
                    format!("{per_flight:.0}"),
                    format!(
                        "{in_flight} in flight vs {n} values: {:.2} %",
                        100.0 * share
                    ),
                ]
            });
            table.row(row);
        }
    }
    let text = format!(
        "# Redis memory per cached key ({})\n\n{}\n\n{}\n",
        common::utc_now(),
        common::environment_line(&support::redis_server_binary()),
        table.markdown()
    );
    println!("{text}");
    if !smoke {
        let path = common::write_report("memory.md", &text);
        eprintln!("report: {}", path.display());
    }
}
