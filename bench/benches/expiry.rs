//! # Expiry bench: who waits when hot keys expire
//!
//! K worker processes (default 3) send a fixed request rate (default 300/s in
//! all) for D seconds (default 8) at keys drawn from a Zipf(1.0) over N keys
//! (default 100). Values live T ms (default 1000) and the loader takes L ms
//! (default 50). Compared in one run, on one server, each mode with fresh keys:
//!
//! - **blocking**: the defaults; a call at an expiry waits for the reload;
//! - **stale-while-revalidate**: `stale_for(10 s)`: a call at an expiry gets
//!   the stale value at once and one refresh runs in the background;
//! - **swr + early refresh**: also `early_refresh(true)` (XFetch, β = 1):
//!   hot keys are reloaded before they expire.
//!
//! Reported per mode (calls in the first second, when every key is cold, are
//! left out): calls, the share that waited for a load (took at least L/2 ms),
//! and of those the share on a warm key (one whose first load was done),
//! latency p50/p90/p99/max, the p99 of calls on warm keys and of hits alone,
//! stale values served (all keys, and the hot keys: those called at least once
//! per load time on average), loads, and loads that duplicated another
//! load of the same key less than T/2 apart (the ideal is 0: one load per key
//! per expiry).
//!
//! ```text
//! cargo bench --bench expiry                  # defaults, about 30 s
//! cargo bench --bench expiry -- --help
//! ```
//!
//! It prints a markdown table and writes it to `target/bench-report/expiry.md`.
//! Run by `cargo test --benches` it does a short smoke run and writes nothing.

#[path = "../../tests/support/mod.rs"]
mod support;

use locked_cache_bench as common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use locked_cache::{CallOptions, LockedCache, Outcome};
use serde::{Deserialize, Serialize};

use common::{Flags, Table, Zipf, die, ms, percentile, unix_micros};
use support::RedisServer;

/// Set in a worker's environment to its JSON [`WorkerConfig`].
const WORKER_ENV: &str = "LC_EXPIRY_WORKER";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Mode {
    Blocking,
    StaleWhileRevalidate,
    EarlyRefresh,
}

impl Mode {
    const ALL: [Mode; 3] = [
        Mode::Blocking,
        Mode::StaleWhileRevalidate,
        Mode::EarlyRefresh,
    ];

    fn name(self) -> &'static str {
        match self {
            Mode::Blocking => "blocking (defaults)",
            Mode::StaleWhileRevalidate => "stale-while-revalidate",
            Mode::EarlyRefresh => "swr + early refresh",
        }
    }

    fn options(self, ttl: Duration, beta: f64) -> CallOptions {
        let base = CallOptions::new().ttl(ttl);
        match self {
            Mode::Blocking => base,
            Mode::StaleWhileRevalidate => base.stale_for(Duration::from_secs(10)),
            Mode::EarlyRefresh => base
                .stale_for(Duration::from_secs(10))
                .early_refresh(true)
                .early_refresh_beta(beta),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct WorkerConfig {
    url: String,
    prefix: String,
    mode: Mode,
    seed: u64,
    /// Requests per second of this worker.
    rate: f64,
    duration_ms: u64,
    keys: u32,
    ttl_ms: u64,
    loader_ms: u64,
    /// XFetch's β for early refresh.
    beta: f64,
    /// Shared start instant, µs since the epoch.
    start_us: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct WorkerReport {
    /// (µs since start at the call's start, latency µs, key rank, outcome).
    calls: Vec<(u64, u64, u32, String)>,
    /// (key rank, µs since start) of each loader run.
    loads: Vec<(u32, u64)>,
    errors: u64,
}

fn main() {
    if let Ok(config) = std::env::var(WORKER_ENV) {
        let config: WorkerConfig = serde_json::from_str(&config).expect("worker config");
        let report = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(worker(config));
        println!("{}", serde_json::to_string(&report).expect("report"));
        return;
    }
    let flags = Flags::parse(&[]);
    if flags.help {
        println!(
            "Expiry bench for locked-cache: blocking vs stale-while-revalidate vs early refresh.\n\
             \n  --processes K     worker processes                 [3]\
             \n  --rate R          requests per second, in all      [300]\
             \n  --duration-s D    seconds per mode                 [8]\
             \n  --keys N          Zipf(1.0) keys                   [100]\
             \n  --ttl-ms T        value TTL                        [1000]\
             \n  --loader-ms L     loader time                      [50]\
             \n  --beta B          early refresh's XFetch beta      [1.0]"
        );
        return;
    }
    flags.reject_unknown(&[
        "processes",
        "rate",
        "duration-s",
        "keys",
        "ttl-ms",
        "loader-ms",
        "beta",
    ]);
    // `cargo test --benches` runs this without `--bench`: a smoke run.
    let smoke = !flags.bench_mode;
    let processes: usize = flags.get("processes", if smoke { 2 } else { 3 });
    let rate: f64 = flags.get("rate", if smoke { 100.0 } else { 300.0 });
    let duration_s: f64 = flags.get("duration-s", if smoke { 2.5 } else { 8.0 });
    let keys: u32 = flags.get("keys", 100);
    let ttl_ms: u64 = flags.get("ttl-ms", if smoke { 500 } else { 1000 });
    let loader_ms: u64 = flags.get("loader-ms", 50);
    let beta: f64 = flags.get("beta", 1.0);
    if processes == 0 || rate <= 0.0 || keys == 0 || ttl_ms == 0 {
        die("--processes, --rate, --keys and --ttl-ms must be above zero");
    }

    let server = RedisServer::start();
    let mut table = Table::new(&[
        "mode",
        "calls",
        "waited for a load",
        "of which on a warm key",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "warm-key p99 ms",
        "hit p99 ms",
        "stale served (on hot keys)",
        "loads",
        "duplicate loads",
    ]);
    for (i, mode) in Mode::ALL.into_iter().enumerate() {
        let start_us = unix_micros() + 1_500_000;
        let mut children = Vec::new();
        for p in 0..processes {
            let config = WorkerConfig {
                url: server.url(),
                prefix: format!("expiry:{i}:"),
                mode,
                seed: (i * 100 + p) as u64,
                rate: rate / processes as f64,
                duration_ms: (duration_s * 1000.0) as u64,
                keys,
                ttl_ms,
                loader_ms,
                beta,
                start_us,
            };
            let child = Command::new(std::env::current_exe().expect("current exe"))
                .env(WORKER_ENV, serde_json::to_string(&config).expect("config"))
                .stdout(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| die(&format!("spawn worker: {e}")));
            children.push(child);
        }
        let mut reports = Vec::new();
        for mut child in children {
            let stdout = child.stdout.take().expect("stdout");
            let line = BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .last()
                .unwrap_or_else(|| die("a worker printed nothing"));
            let status = child.wait().expect("wait");
            if !status.success() {
                die(&format!("a worker failed: {status}"));
            }
            reports.push(serde_json::from_str::<WorkerReport>(&line).expect("report"));
        }
        table.row(summarise(mode, &reports, ttl_ms, loader_ms));
    }
    let text = format!(
        "{processes} processes, {rate} requests/s in all, {duration_s} s per mode, Zipf(1.0) over {keys} keys, \
         TTL {ttl_ms} ms, loader {loader_ms} ms; the first second (cold keys) left out.\n\n{}",
        table.markdown()
    );
    println!("{text}");
    if !smoke {
        let path = common::write_report("expiry.md", &text);
        println!("written to {}", path.display());
    }
}

fn summarise(mode: Mode, reports: &[WorkerReport], ttl_ms: u64, loader_ms: u64) -> Vec<String> {
    let warm_after_us = 1_000_000;
    // A key is cold until its first load (in any process) is done.
    let mut first_load: BTreeMap<u32, u64> = BTreeMap::new();
    for report in reports {
        for (rank, at) in &report.loads {
            let first = first_load.entry(*rank).or_insert(*at);
            *first = (*first).min(*at);
        }
    }
    let cold_until = |rank: u32| {
        first_load
            .get(&rank)
            .map_or(u64::MAX, |at| at + loader_ms * 1000 + 10_000)
    };
    // Hot keys: called at least once per load time on average (the steady
    // load early refresh is for).
    let mut calls_per_key: BTreeMap<u32, u64> = BTreeMap::new();
    let mut span_us = 1u64;
    for report in reports {
        for (at, _, rank, _) in &report.calls {
            *calls_per_key.entry(*rank).or_default() += 1;
            span_us = span_us.max(*at);
        }
    }
    let hot = |rank: u32| {
        let per_s = calls_per_key.get(&rank).copied().unwrap_or(0) as f64 / (span_us as f64 / 1e6);
        per_s * (loader_ms as f64 / 1000.0) >= 1.0
    };
    let hot_keys = calls_per_key.keys().filter(|r| hot(**r)).count();
    let mut latencies = Vec::new();
    let mut warm_latencies = Vec::new();
    let mut hit_latencies = Vec::new();
    let (mut waited, mut waited_warm, mut stale, mut stale_hot, mut errors) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    for report in reports {
        errors += report.errors;
        for (at, took, rank, outcome) in &report.calls {
            if *at < warm_after_us {
                continue;
            }
            latencies.push(*took);
            if *at > cold_until(*rank) {
                warm_latencies.push(*took);
            }
            if *took >= loader_ms * 1000 / 2 {
                waited += 1;
                if *at > cold_until(*rank) {
                    waited_warm += 1;
                }
            }
            match outcome.as_str() {
                "hit" => hit_latencies.push(*took),
                "stale" | "fail_safe" => {
                    stale += 1;
                    if hot(*rank) {
                        stale_hot += 1;
                    }
                }
                _ => {}
            }
        }
    }
    if errors > 0 {
        die(&format!("{}: {errors} calls failed", mode.name()));
    }
    latencies.sort_unstable();
    warm_latencies.sort_unstable();
    hit_latencies.sort_unstable();
    // Loads of one key less than half a TTL apart: a duplicate.
    let mut by_key: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for report in reports {
        for (rank, at) in &report.loads {
            by_key.entry(*rank).or_default().push(*at);
        }
    }
    let loads: usize = by_key.values().map(Vec::len).sum();
    let duplicates: usize = by_key
        .values_mut()
        .map(|times| {
            times.sort_unstable();
            times
                .windows(2)
                .filter(|w| w[1] - w[0] < ttl_ms * 1000 / 2)
                .count()
        })
        .sum();
    let calls = latencies.len().max(1);
    vec![
        mode.name().to_owned(),
        latencies.len().to_string(),
        format!("{:.1}%", 100.0 * waited as f64 / calls as f64),
        format!("{:.1}%", 100.0 * waited_warm as f64 / calls as f64),
        ms(percentile(&latencies, 50.0)),
        ms(percentile(&latencies, 90.0)),
        ms(percentile(&latencies, 99.0)),
        ms(latencies.last().copied().unwrap_or(0)),
        ms(percentile(&warm_latencies, 99.0)),
        ms(percentile(&hit_latencies, 99.0)),
        format!("{stale} ({stale_hot} on {hot_keys})"),
        loads.to_string(),
        duplicates.to_string(),
    ]
}

async fn worker(config: WorkerConfig) -> WorkerReport {
    let cache = LockedCache::builder()
        .redis(&config.url)
        .key_prefix(config.prefix.clone())
        .build()
        .await
        .unwrap_or_else(|e| die(&format!("build: {e}")));
    cache
        .ping()
        .await
        .unwrap_or_else(|e| die(&format!("ping: {e}")));
    let options = config
        .mode
        .options(Duration::from_millis(config.ttl_ms), config.beta);
    let zipf = Zipf::new(config.keys, 1.0);
    let mut rng = fastrand::Rng::with_seed(config.seed);
    let report = Arc::new(Mutex::new(WorkerReport::default()));
    let now_us = unix_micros();
    let start = Instant::now() + Duration::from_micros(config.start_us.saturating_sub(now_us));
    tokio::time::sleep_until(start.into()).await;
    let interval = Duration::from_secs_f64(1.0 / config.rate);
    let total = (config.duration_ms as f64 / 1000.0 * config.rate) as u64;
    let loader_time = Duration::from_millis(config.loader_ms);
    let mut tasks = Vec::new();
    for n in 0..total {
        let due = start + interval.mul_f64(n as f64);
        tokio::time::sleep_until(due.into()).await;
        let rank = zipf.sample(&mut rng);
        let (cache, report) = (cache.clone(), Arc::clone(&report));
        tasks.push(tokio::spawn(async move {
            let key = format!("item:{rank}");
            let began = Instant::now();
            let loads = Arc::clone(&report);
            let result = cache
                .with(options)
                .get_or_load_with_outcome(&key, move |_| async move {
                    let at = start.elapsed().as_micros() as u64;
                    loads.lock().unwrap().loads.push((rank, at));
                    tokio::time::sleep(loader_time).await;
                    Ok::<_, String>(format!("value of {rank} loaded at {at}"))
                })
                .await;
            let took = began.elapsed().as_micros() as u64;
            let at = began.duration_since(start).as_micros() as u64;
            let mut report = report.lock().unwrap();
            match result {
                Ok((_, outcome)) => {
                    let outcome: Outcome = outcome;
                    report
                        .calls
                        .push((at, took, rank, outcome.as_str().to_owned()));
                }
                Err(e) => {
                    eprintln!("call failed: {e}");
                    report.errors += 1;
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("call task");
    }
    // Background refreshes still running are not calls; let them finish so
    // their loads are counted.
    tokio::time::sleep(loader_time * 2).await;
    let mut report = report.lock().unwrap();
    std::mem::take(&mut *report)
}
