//! # Many keys: `get_or_load_many` against a raw `MGET` and 100 `get_or_load`s
//!
//! Issue 24's measurement, on one redis-server this bench starts:
//!
//! - **100 keys, all cached** (100-byte values): batches per second of
//!   `get_or_load_many` over the 100 keys, of a raw redis-rs `MGET` of the
//!   same value keys (one multiplexed connection with `TCP_NODELAY`, as the
//!   cache has), and of 100 concurrent `get_or_load` calls (`join_all`), each
//!   side from 8 tasks at once, taking turns over 5 rounds; the ratios are
//!   medians over rounds, measured in the same run.
//! - **100 cold keys, a 50 ms loader**: the latency of one
//!   `get_or_load_many` (fresh keys each time, 10 times), split into before,
//!   inside and after the loader (as the loader timed itself), the server's
//!   own time and commands per batch, and its loader calls; the time outside
//!   the loader in round trips, both of a `PING` and of a 100-key batch (the
//!   mean of a raw `MGET` of 100 missing keys and a raw pipeline of 100
//!   `SET`s, the cache-aside a user would write by hand, measured in the same
//!   run).
//!
//! ```text
//! cargo bench --bench many      # about 15 seconds
//! ```
//!
//! Writes `target/bench-report/many.md`. Run by `cargo test --benches` (no
//! `--bench` flag) it does a small smoke run and writes nothing.

#[path = "../../tests/support/mod.rs"]
mod support;

use locked_cache_bench as common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use locked_cache::LockedCache;
use support::RedisServer;

const KEYS: usize = 100;
const TASKS: usize = 8;

fn main() {
    let smoke = !std::env::args().any(|a| a == "--bench");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(smoke));
}

async fn open_cache(url: &str, prefix: &str) -> LockedCache {
    LockedCache::builder()
        .redis(url)
        .key_prefix(prefix)
        .ttl(Duration::from_secs(600))
        .build()
        .await
        .unwrap()
}

/// Batches per second of `side`, from `TASKS` tasks, for `window`.
async fn throughput<F, Fut>(window: Duration, side: F) -> f64
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let side = side.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                while started.elapsed() < window {
                    side().await;
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut total = 0;
    for t in support::join_all_checked(tasks).await {
        total += t;
    }
    total as f64 / started.elapsed().as_secs_f64()
}

/// From `INFO commandstats`: the microseconds the server spent on the
/// commands a client sent (`MGET`, `SET` and the scripts, `EVALSHA`: a
/// script's time includes the commands it runs), the calls of those, and the
/// calls of every other command (for a cold batch, the commands the scripts
/// ran, which the server also lists on their own).
fn server_time(info: &str) -> (f64, u64, u64) {
    let (mut usec, mut sent, mut inner) = (0.0, 0, 0);
    for line in info.lines() {
        let Some((name, fields)) = line
            .trim()
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        if ["info", "config", "ping"]
            .iter()
            .any(|n| name.starts_with(n))
        {
            continue;
        }
        let top = matches!(name, "mget" | "evalsha" | "eval");
        for field in fields.split(',') {
            match field.split_once('=') {
                Some(("usec", v)) if top => usec += v.parse::<f64>().unwrap_or(0.0),
                Some(("calls", v)) if top => sent += v.parse::<u64>().unwrap_or(0),
                Some(("calls", v)) => inner += v.parse::<u64>().unwrap_or(0),
                _ => {}
            }
        }
    }
    (usec, sent, inner)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

async fn run(smoke: bool) {
    let server = RedisServer::start();
    let url = server.url();
    let (rounds, window, colds) = if smoke {
        (1, Duration::from_millis(100), 2)
    } else {
        (5, Duration::from_secs(1), 10)
    };
    let cache = open_cache(&url, "bm:").await;
    let keys: Arc<Vec<String>> = Arc::new((0..KEYS).map(|i| format!("item:{i}")).collect());
    let entries: Vec<(String, String)> =
        keys.iter().map(|k| (k.clone(), "x".repeat(100))).collect();
    cache.set_many(&entries).await.unwrap();
    let value_keys: Arc<Vec<String>> = Arc::new(keys.iter().map(|k| cache.value_key(k)).collect());
    let raw = common::raw_connection(&url).await;

    let (mut many, mut mget, mut singles) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (c, k) = (cache.clone(), Arc::clone(&keys));
        let m = throughput(window, move || {
            let (c, k) = (c.clone(), Arc::clone(&k));
            async move {
                let got: Vec<Option<String>> = c
                    .get_or_load_many(&k, |_| async { Err::<Vec<(String, String)>, _>("cold") })
                    .await
                    .unwrap();
                assert_eq!(got.len(), KEYS);
            }
        })
        .await;
        let (r, vk) = (raw.clone(), Arc::clone(&value_keys));
        let g = throughput(window, move || {
            let (mut r, vk) = (r.clone(), Arc::clone(&vk));
            async move {
                let got: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
                    .arg(&vk[..])
                    .query_async(&mut r)
                    .await
                    .unwrap();
                assert_eq!(got.len(), KEYS);
            }
        })
        .await;
        let (c, k) = (cache.clone(), Arc::clone(&keys));
        let s = throughput(window, move || {
            let (c, k) = (c.clone(), Arc::clone(&k));
            async move {
                let calls = k
                    .iter()
                    .map(|key| c.get_or_load(key, || async { Err::<String, _>("cold") }));
                for r in futures_util::future::join_all(calls).await {
                    r.unwrap();
                }
            }
        })
        .await;
        many.push(m);
        mget.push(g);
        singles.push(s);
    }
    let ratios_mget: Vec<f64> = many.iter().zip(&mget).map(|(m, g)| m / g).collect();
    let ratios_single: Vec<f64> = many.iter().zip(&singles).map(|(m, s)| m / s).collect();

    // A round trip on this connection.
    let mut pings = Vec::new();
    let mut r = raw.clone();
    for _ in 0..200 {
        let t = Instant::now();
        let _: String = redis::cmd("PING").query_async(&mut r).await.unwrap();
        pings.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let rtt_ms = median(pings);
    let loader = Duration::from_millis(50);
    let mut lat = Vec::new();
    let (mut before_ms, mut loading_ms, mut after_ms) = (Vec::new(), Vec::new(), Vec::new());
    let _: () = server.query(&["CONFIG", "RESETSTAT"]);
    let calls = Arc::new(AtomicU32::new(0));
    for round in 0..colds {
        let cold_keys: Vec<String> = (0..KEYS).map(|i| format!("cold{round}:{i}")).collect();
        let calls = Arc::clone(&calls);
        // When the loader began and ended, as measured inside it.
        let marks = Arc::new(std::sync::Mutex::new((None, None)));
        let loader_marks = Arc::clone(&marks);
        let t = Instant::now();
        let got: Vec<Option<String>> = cache
            .get_or_load_many(&cold_keys, move |missing| {
                calls.fetch_add(1, Ordering::Relaxed);
                let marks = Arc::clone(&loader_marks);
                async move {
                    marks.lock().unwrap().0 = Some(Instant::now());
                    tokio::time::sleep(loader).await;
                    marks.lock().unwrap().1 = Some(Instant::now());
                    Ok::<_, String>(
                        missing
                            .into_iter()
                            .map(|k| (k, "v".to_owned()))
                            .collect::<Vec<_>>(),
                    )
                }
            })
            .await
            .unwrap();
        let end = Instant::now();
        lat.push((end - t).as_secs_f64() * 1e3);
        assert!(got.iter().all(Option::is_some));
        if let (Some(began), Some(ended)) = *marks.lock().unwrap() {
            before_ms.push((began - t).as_secs_f64() * 1e3);
            loading_ms.push((ended - began).as_secs_f64() * 1e3);
            after_ms.push((end - ended).as_secs_f64() * 1e3);
        }
    }
    let commandstats: String = server.query(&["INFO", "commandstats"]);
    if std::env::var_os("MANY_STATS").is_some() {
        eprintln!("{commandstats}");
    }
    let (server_usec, sent, inner) = server_time(&commandstats);
    let server_ms = server_usec / 1e3 / colds as f64;
    let (sent, inner) = (sent as f64 / colds as f64, inner as f64 / colds as f64);

    // The same cold batch without the library, as a cache-aside by hand
    // would send it: a raw MGET of the 100 (missing) keys, the same loader,
    // a raw pipeline of 100 `SET ... PX` (two round trips of 100 keys, no
    // lock, no fence, no wake-up).
    let (mut raw_before, mut raw_after) = (Vec::new(), Vec::new());
    let mut r = raw.clone();
    for round in 0..colds {
        let cold_keys: Vec<String> = (0..KEYS).map(|i| format!("raw{round}:{i}")).collect();
        let t = Instant::now();
        let got: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
            .arg(&cold_keys[..])
            .query_async(&mut r)
            .await
            .unwrap();
        let began = Instant::now();
        assert!(got.iter().all(Option::is_none));
        tokio::time::sleep(loader).await;
        let ended = Instant::now();
        let mut pipe = redis::pipe();
        for key in &cold_keys {
            pipe.cmd("SET")
                .arg(key)
                .arg("v")
                .arg("PX")
                .arg(600_000)
                .ignore();
        }
        let () = pipe.query_async(&mut r).await.unwrap();
        raw_before.push((began - t).as_secs_f64() * 1e3);
        raw_after.push((Instant::now() - ended).as_secs_f64() * 1e3);
    }
    let (raw_before, raw_after) = (median(raw_before), median(raw_after));
    // A round trip of a 100-key batch, as the raw side measured it.
    let batch_rtt = (raw_before + raw_after) / 2.0;
    let lat_ms = median(lat);
    // The loader's own time as it measured it (a 50 ms tokio sleep lasts
    // up to a timer tick longer), and the call's time outside it.
    let (before, loading, after) = (median(before_ms), median(loading_ms), median(after_ms));
    let extra_rtts = (before + after) / rtt_ms;
    let extra_batch_rtts = (before + after) / batch_rtt;
    let report = format!(
        "| measurement | result |\n| --- | --- |\n\
         | 100 cached keys: `get_or_load_many` batches/s | {:.0} |\n\
         | 100 cached keys: raw `MGET` batches/s | {:.0} |\n\
         | 100 cached keys: 100 concurrent `get_or_load` batches/s | {:.0} |\n\
         | `get_or_load_many` ÷ raw `MGET` (median of {rounds} rounds; goal ≥ 0.9) | **{:.2}x** |\n\
         | `get_or_load_many` ÷ 100 `get_or_load` (median) | **{:.1}x** |\n\
         | 100 cold keys, 50 ms loader: latency (median of {colds}) | {lat_ms:.2} ms |\n\
         | … before the loader / the loader (as it measured itself) / after it | {before:.2} / {loading:.2} / {after:.2} ms |\n\
         | … the server's own time per cold batch (`INFO commandstats`: {sent:.1} commands sent, {inner:.0} run by its scripts) | {server_ms:.2} ms |\n\
         | … outside the loader, in `PING` round trips (RTT {rtt_ms:.3} ms) | loader + {extra_rtts:.1} RTT |\n\
         | raw cache-aside of the same batch (`MGET`, loader, pipelined `SET`s): before / after the loader | {raw_before:.2} / {raw_after:.2} ms |\n\
         | … outside the loader, in round trips of a 100-key batch ({batch_rtt:.3} ms, the raw side's mean; goal ≤ 3) | **loader + {extra_batch_rtts:.1} batch RTT** |\n\
         | loader calls per cold batch | {:.1} |\n",
        median(many.clone()),
        median(mget.clone()),
        median(singles.clone()),
        median(ratios_mget),
        median(ratios_single),
        f64::from(calls.load(Ordering::Relaxed)) / colds as f64,
    );
    println!("{report}");
    if !smoke {
        let path = common::write_report("many.md", &report);
        println!("report: {}", path.display());
    }
}
