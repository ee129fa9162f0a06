//! Cluster mode of the stampede and hit-path measurements: the same workloads
//! on a Redis Cluster (3 primaries + 3 replicas) and on one standalone master,
//! in one run, so the ratios compare like with like on this machine.
//!
//! - **Stampede**: 30 cold keys at once, each wanted by 4 caches × 25 tasks
//!   (100 callers per key, 3,000 in all), loader 50 ms. Loads per key, p50 and
//!   p99 of the callers' latency, and Redis commands per caller (counted by the
//!   servers, `INFO commandstats`, summed over the primaries).
//! - **Hit path**: 64 tasks calling `get_or_load` on 100 warm keys (1 KiB
//!   `String` values), coalescing off so each call is its own `GET`, against a
//!   raw redis-rs `GET` of the same keys on the same deployment.
//! - **Many keys**: 8 tasks each reading 100 warm keys (100-byte `String`s,
//!   spread over about 100 slots on the cluster) with one `get_or_load_many`,
//!   against a raw redis-rs `MGET` of the same keys: on one master one
//!   command, on the cluster redis-rs's own cross-slot `MGET` (one command
//!   per slot, sent at once); and the median latency of 20 cold batches of
//!   100 fresh keys with a loader that answers at once.
//!
//! ```text
//! cargo bench --bench cluster            # about half a minute
//! ```
//!
//! Run by `cargo test --benches` (no `--bench` flag) it does a small smoke run.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use locked_cache::LockedCache;
use locked_cache_bench::{Table, ms, percentile};
use support::RedisServer;
use support::cluster::Cluster;

struct Sizes {
    keys: usize,
    caches: usize,
    tasks: usize,
    hit_secs: f64,
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let sizes = if full {
        Sizes {
            keys: 30,
            caches: 4,
            tasks: 25,
            hit_secs: 3.0,
        }
    } else {
        Sizes {
            keys: 3,
            caches: 2,
            tasks: 3,
            hit_secs: 0.2,
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let standalone = RedisServer::start();
    let cluster = Cluster::start(Duration::from_secs(2));
    let deployments: [(&str, Vec<&RedisServer>); 2] = [
        ("1 standalone master", vec![&standalone]),
        ("cluster, 3 primaries", cluster.nodes[..3].iter().collect()),
    ];
    let mut stampede = Table::new(&[
        "deployment",
        "callers",
        "loads per key",
        "p50 ms",
        "p99 ms",
        "commands per caller",
    ]);
    let mut hits = Table::new(&["deployment", "get_or_load hits/s", "raw GET/s", "ratio"]);
    let mut many = Table::new(&[
        "deployment",
        "get_or_load_many batches/s",
        "raw MGET batches/s",
        "ratio",
        "cold batch p50 ms",
    ]);
    for (name, servers) in &deployments {
        let is_cluster = servers.len() > 1;
        let (row, hit) = runtime.block_on(async {
            let build = |prefix: String| {
                let builder = LockedCache::builder()
                    .key_prefix(prefix)
                    .ttl(Duration::from_secs(600));
                let builder = if is_cluster {
                    builder.cluster(cluster.urls())
                } else {
                    builder.redis(standalone.url())
                };
                async move { builder.build().await.expect("build") }
            };
            let prefix = format!("bench:{}:", std::process::id());
            let mut caches = Vec::new();
            for _ in 0..sizes.caches {
                let cache = build(format!("{prefix}s:")).await;
                cache.ping().await.expect("ping");
                caches.push(cache);
            }
            for s in servers {
                s.reset_stats();
            }
            let (loads, mut latencies) = run_stampede(&caches, &sizes).await;
            let commands: u64 = servers.iter().map(|s| s.total_commands()).sum();
            latencies.sort_unstable();
            let callers = latencies.len();
            let row = vec![
                (*name).to_owned(),
                callers.to_string(),
                format!("{:.2}", loads as f64 / sizes.keys as f64),
                ms(percentile(&latencies, 50.0)),
                ms(percentile(&latencies, 99.0)),
                format!("{:.2}", commands as f64 / callers as f64),
            ];
            let hit_cache = LockedCache::builder()
                .key_prefix(format!("{prefix}h:"))
                .ttl(Duration::from_secs(600))
                .coalesce(false);
            let hit_cache = if is_cluster {
                hit_cache.cluster(cluster.urls())
            } else {
                hit_cache.redis(standalone.url())
            }
            .build()
            .await
            .expect("build");
            let hit = run_hits(&hit_cache, is_cluster, &cluster, &standalone, &sizes).await;
            let batch = run_many(&hit_cache, is_cluster, &cluster, &standalone, &sizes).await;
            (row, (hit, batch))
        });
        let (hit, batch) = hit;
        many.row(vec![
            (*name).to_owned(),
            format!("{:.0}", batch.0),
            format!("{:.0}", batch.1),
            format!("{:.2}", batch.0 / batch.1),
            format!("{:.2}", batch.2),
        ]);
        stampede.row(row);
        hits.row(vec![
            (*name).to_owned(),
            format!("{:.0}", hit.0),
            format!("{:.0}", hit.1),
            format!("{:.2}", hit.0 / hit.1),
        ]);
    }
    println!(
        "## Stampede: {} cold keys × {} caches × {} tasks, loader 50 ms\n",
        sizes.keys, sizes.caches, sizes.tasks
    );
    println!("{}", stampede.markdown());
    println!("## Hit path: 64 tasks, 100 warm keys of 1 KiB, coalescing off\n");
    println!("{}", hits.markdown());
    println!("## Many keys: 8 tasks, 100 warm keys of 100 bytes per batch\n");
    println!("{}", many.markdown());
}

/// Batches per second of `get_or_load_many` over 100 warm keys, and of a raw
/// redis-rs `MGET` of the same keys, each from 8 tasks for the hit window.
async fn run_many(
    cache: &LockedCache,
    is_cluster: bool,
    cluster: &Cluster,
    standalone: &RedisServer,
    sizes: &Sizes,
) -> (f64, f64, f64) {
    let keys: Vec<String> = (0..100).map(|i| format!("many:{i}")).collect();
    let entries: Vec<(String, String)> =
        keys.iter().map(|k| (k.clone(), "z".repeat(100))).collect();
    cache.set_many(&entries).await.expect("set_many");
    let window = Duration::from_secs_f64(sizes.hit_secs);
    let keys = Arc::new(keys);
    let through_cache = per_second(window, |count| {
        let (cache, keys) = (cache.clone(), Arc::clone(&keys));
        async move {
            let until = Instant::now() + window;
            while Instant::now() < until {
                let got: Vec<Option<String>> = cache
                    .get_or_load_many(&keys, |_| async {
                        Err::<Vec<(String, String)>, _>("a warm key missed")
                    })
                    .await
                    .expect("hits");
                assert_eq!(got.len(), 100);
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
    })
    .await;
    let redis_keys: Arc<Vec<String>> = Arc::new(keys.iter().map(|k| cache.value_key(k)).collect());
    let raw = if is_cluster {
        let client = redis::cluster::ClusterClient::new(cluster.urls()).expect("client");
        let conn = client.get_async_connection().await.expect("connect");
        raw_mgets_per_second(conn, redis_keys, window).await
    } else {
        let client = redis::Client::open(standalone.url()).expect("client");
        let conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        raw_mgets_per_second(conn, redis_keys, window).await
    };
    // Cold batches: 100 fresh keys each, a loader that answers at once (the
    // lock, store and release scripts, one per slot on the cluster).
    let mut cold = Vec::new();
    for round in 0..20 {
        let keys: Vec<String> = (0..100).map(|i| format!("cold{round}:{i}")).collect();
        let t = Instant::now();
        let got: Vec<Option<String>> = cache
            .get_or_load_many(&keys, |missing| async move {
                Ok::<_, String>(
                    missing
                        .into_iter()
                        .map(|k| (k, "c".repeat(100)))
                        .collect::<Vec<_>>(),
                )
            })
            .await
            .expect("cold batch");
        cold.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(got.iter().all(Option::is_some));
    }
    cold.sort_by(f64::total_cmp);
    (through_cache, raw, cold[cold.len() / 2])
}

/// Runs `task` on 8 tasks at once; each counts what it did in the counter
/// it is given. The count per second of `window`.
async fn per_second<F, Fut>(window: Duration, task: F) -> f64
where
    F: Fn(Arc<AtomicU64>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let count = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..8)
        .map(|_| tokio::spawn(task(Arc::clone(&count))))
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
    count.load(Ordering::Relaxed) as f64 / window.as_secs_f64()
}

/// Raw redis-rs `MGET`s of `keys` per second from 8 tasks sharing `conn`.
async fn raw_mgets_per_second<C>(conn: C, keys: Arc<Vec<String>>, window: Duration) -> f64
where
    C: redis::aio::ConnectionLike + Clone + Send + 'static,
{
    per_second(window, |count| {
        let (mut conn, keys) = (conn.clone(), Arc::clone(&keys));
        async move {
            let until = Instant::now() + window;
            while Instant::now() < until {
                let got: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
                    .arg(&keys[..])
                    .query_async(&mut conn)
                    .await
                    .expect("MGET");
                assert_eq!(got.len(), 100);
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
    })
    .await
}

/// Every key wanted by every task of every cache at once; returns the loads
/// and each caller's latency in µs.
async fn run_stampede(caches: &[LockedCache], sizes: &Sizes) -> (u32, Vec<u64>) {
    let loads = Arc::new(AtomicU32::new(0));
    let mut calls = Vec::new();
    let began = Instant::now();
    for k in 0..sizes.keys {
        for cache in caches {
            for _ in 0..sizes.tasks {
                let (cache, loads) = (cache.clone(), Arc::clone(&loads));
                calls.push(tokio::spawn(async move {
                    let key = format!("cold:{k}");
                    let started = Instant::now();
                    let v: String = cache
                        .get_or_load(&key, || async move {
                            loads.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            Ok::<_, String>("x".repeat(1024))
                        })
                        .await
                        .expect("get_or_load");
                    assert_eq!(v.len(), 1024);
                    started.elapsed().as_micros() as u64
                }));
            }
        }
    }
    let mut latencies = Vec::with_capacity(calls.len());
    for call in calls {
        latencies.push(call.await.expect("task"));
    }
    let _ = began;
    (loads.load(Ordering::SeqCst), latencies)
}

/// Hits per second through the cache, then raw `GET`s per second of the same
/// stored keys on the same deployment.
async fn run_hits(
    cache: &LockedCache,
    is_cluster: bool,
    cluster: &Cluster,
    standalone: &RedisServer,
    sizes: &Sizes,
) -> (f64, f64) {
    let keys: Vec<String> = (0..100).map(|i| format!("warm:{i}")).collect();
    for key in &keys {
        cache.set(key, &"y".repeat(1024)).await.expect("set");
    }
    let window = Duration::from_secs_f64(sizes.hit_secs);
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let until = Instant::now() + window;
    for t in 0..64 {
        let (cache, keys, count) = (cache.clone(), keys.clone(), Arc::clone(&count));
        tasks.push(tokio::spawn(async move {
            let mut i = t;
            while Instant::now() < until {
                let v: String = cache
                    .get_or_load(&keys[i % keys.len()], || async {
                        Err::<String, _>("a warm key missed")
                    })
                    .await
                    .expect("hit");
                assert_eq!(v.len(), 1024);
                count.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    let through_cache = count.load(Ordering::Relaxed) as f64 / window.as_secs_f64();

    let redis_keys: Vec<String> = keys.iter().map(|k| cache.value_key(k)).collect();
    let raw = if is_cluster {
        let client = redis::cluster::ClusterClient::new(cluster.urls()).expect("client");
        let conn = client.get_async_connection().await.expect("connect");
        raw_gets_per_second(conn, redis_keys, window).await
    } else {
        let client = redis::Client::open(standalone.url()).expect("client");
        let conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        raw_gets_per_second(conn, redis_keys, window).await
    };
    (through_cache, raw)
}

/// Raw redis-rs `GET`s per second of `keys` from 64 tasks sharing `conn`.
async fn raw_gets_per_second<C>(conn: C, keys: Vec<String>, window: Duration) -> f64
where
    C: redis::aio::ConnectionLike + Clone + Send + 'static,
{
    let count = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + window;
    let mut tasks = Vec::new();
    for t in 0..64 {
        let (mut conn, keys, count) = (conn.clone(), keys.clone(), Arc::clone(&count));
        tasks.push(tokio::spawn(async move {
            let mut i = t;
            while Instant::now() < until {
                let v: Vec<u8> = redis::cmd("GET")
                    .arg(&keys[i % keys.len()])
                    .query_async(&mut conn)
                    .await
                    .expect("GET");
                assert!(!v.is_empty());
                count.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    count.load(Ordering::Relaxed) as f64 / window.as_secs_f64()
}
