//! # Near cache bench: hits from memory, and how fast a write reaches the others
//!
//! 1. **Throughput**: `get_or_load_shared` answered by the near cache (1 KiB
//!    `String`s, one key per caller) against a raw redis-rs `GET` on one
//!    `MultiplexedConnection`, and against the same call without a near cache
//!    (an L2 hit), at 1, 16 and 64 callers; sides in rotating order, the ratio
//!    is the median of per-round ratios.
//! 2. **Staleness**: three caches with near caches (each its own connections
//!    and subscription, as three processes would have), all holding a key;
//!    the first `set`s a new value, and the time until *both* others' near
//!    caches dropped the old one (a read then gets the new value from Redis)
//!    is measured from the start of the `set` and from its return.
//! 3. **A lost subscription**: `CLIENT KILL TYPE pubsub`, and the time until
//!    every near cache is subscribed (and serving) again; meanwhile the near
//!    caches are bypassed (every call is an L2 hit) and then cleared.
//!
//! ```text
//! cargo bench --bench near_cache               # about 30 s
//! cargo bench --bench near_cache -- --help
//! ```
//!
//! Writes `target/bench-report/near_cache.md`. Run by `cargo test --benches`
//! it does a small smoke run and writes nothing.

#[path = "../../tests/support/mod.rs"]
mod support;

use locked_cache_bench as common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use locked_cache::LockedCache;
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;

use common::{Flags, Table, die, percentile};
use support::RedisServer;

const HELP: &str = "\
Near cache bench for locked-cache: near hits vs raw GET, set-to-visible staleness, lost subscriptions.

USAGE: cargo bench --bench near_cache -- [FLAGS]

  --callers LIST      concurrent callers                 [1,16,64]
  --rounds N          rounds per configuration           [10]
  --round-ms T        one round of one side, ms          [150]
  --sets N            sets timed for the staleness       [500]
  --kills N           subscriptions killed               [10]

Report: target/bench-report/near_cache.md.";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Raw,
    L2,
    Near,
}

const SIDES: [Side; 3] = [Side::Raw, Side::L2, Side::Near];

fn main() {
    let flags = Flags::parse(&[]);
    if flags.help {
        println!("{HELP}");
        return;
    }
    flags.reject_unknown(&["callers", "rounds", "round-ms", "sets", "kills"]);
    let smoke = !flags.bench_mode;
    let callers: Vec<usize> = flags.list("callers", if smoke { &[1, 16] } else { &[1, 16, 64] });
    let rounds: usize = flags.get("rounds", if smoke { 2 } else { 10 });
    let round = Duration::from_millis(flags.get("round-ms", if smoke { 30 } else { 150 }));
    let sets: usize = flags.get("sets", if smoke { 20 } else { 500 });
    let kills: usize = flags.get("kills", if smoke { 2 } else { 10 });
    if callers.iter().any(|&c| c == 0 || c > 4096) || rounds == 0 || sets == 0 || kills == 0 {
        die("--callers in 1..=4096; --rounds, --sets, --kills at least 1");
    }
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let command = if args.is_empty() {
        "cargo bench --bench near_cache".to_owned()
    } else {
        format!("cargo bench --bench near_cache -- {}", args.join(" "))
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let server = RedisServer::start();
    let env = common::environment_line(&support::redis_server_binary());
    let mut report = format!(
        "## Near cache bench ({})\n\nCommand: `{command}`  \nMachine: {env}.\n\n",
        common::utc_now()
    );
    runtime.block_on(async {
        report.push_str(&throughput(&server, &callers, rounds, round).await);
        report.push_str(&staleness(&server, sets).await);
        report.push_str(&lost_subscription(&server, kills).await);
    });
    println!("\n{report}");
    if !smoke {
        let path = common::write_report("near_cache.md", &report);
        eprintln!("near_cache: wrote {}", path.display());
    }
}

async fn cache(server: &RedisServer, prefix: &str, near: bool) -> LockedCache {
    let builder = LockedCache::builder()
        .redis(server.url())
        .key_prefix(prefix)
        .ttl(Duration::from_secs(3600));
    let builder = if near {
        builder
            .near_cache(64 << 20)
            .near_cache_ttl(Duration::from_secs(3600))
    } else {
        builder
    };
    builder.build().await.expect("cache")
}

async fn throughput(
    server: &RedisServer,
    callers: &[usize],
    rounds: usize,
    round: Duration,
) -> String {
    let near = cache(server, "near:", true).await;
    let l2 = cache(server, "near:", false).await;
    // The raw side with the cache's socket options (TCP_NODELAY), as in the
    // hit path bench: with Nagle's algorithm a multiplexed connection packs
    // more commands per packet at 16-64 callers and answers later.
    let conn = common::raw_connection(&server.url()).await;
    let max = callers.iter().copied().max().unwrap_or(1);
    let value = "x".repeat(1024);
    for c in 0..max {
        near.set(&format!("k{c}"), &value).await.expect("set");
    }
    let mut t = Table::new(&[
        "callers",
        "raw `GET` ops/s",
        "L2 hit ops/s",
        "near hit ops/s",
        "L2 ÷ raw",
        "near ÷ raw [min–max]",
        "near p50 / p99 µs",
    ]);
    let mut targets = String::new();
    for &n in callers {
        eprintln!("near_cache: throughput, {n} caller(s)...");
        let mut rates = [Vec::new(), Vec::new(), Vec::new()];
        let mut near_latencies = Vec::new();
        for side in SIDES {
            run(side, n, round / 2, &near, &l2, &conn).await;
        }
        for r in 0..rounds {
            for i in 0..SIDES.len() {
                let index = (r + i) % SIDES.len();
                let (rate, latencies) = run(SIDES[index], n, round, &near, &l2, &conn).await;
                rates[index].push(rate);
                if SIDES[index] == Side::Near {
                    near_latencies.extend(latencies);
                }
            }
        }
        near_latencies.sort_unstable();
        let ratio = |i: usize| -> (f64, f64, f64) {
            let mut r: Vec<f64> = rates[i].iter().zip(&rates[0]).map(|(a, b)| a / b).collect();
            r.sort_by(f64::total_cmp);
            (r[r.len() / 2], r[0], r[r.len() - 1])
        };
        let med = |i: usize| {
            let mut r = rates[i].clone();
            r.sort_by(f64::total_cmp);
            r[r.len() / 2]
        };
        let (l2_ratio, _, _) = ratio(1);
        let (near_ratio, lo, hi) = ratio(2);
        t.row(vec![
            n.to_string(),
            format!("{:.0}", med(0)),
            format!("{:.0}", med(1)),
            format!("{:.0}", med(2)),
            format!("{l2_ratio:.3}"),
            format!("{near_ratio:.1} [{lo:.1}–{hi:.1}]"),
            format!(
                "{:.2} / {:.2}",
                f64::from(percentile(&near_latencies, 50.0)) / 1000.0,
                f64::from(percentile(&near_latencies, 99.0)) / 1000.0
            ),
        ]);
        targets.push_str(&format!(
            "- Target near hit ≥ 20× raw GET at {n} caller(s): {near_ratio:.1}× — {}\n",
            if near_ratio >= 20.0 {
                "met"
            } else {
                "**missed**"
            }
        ));
    }
    format!(
        "### Near hits vs raw `GET` (1 KiB `String`, one key per caller)\n\n\
         {rounds} rounds of {} ms per side; one op in 16 timed for the latencies (a clock read \
         costs about as much as a near hit here); raw `GET` on one `MultiplexedConnection` (`TCP_NODELAY`, as the cache's), undecoded; \
         *L2 hit* is `get_or_load_shared` without a near cache (one `GET` and a decode); *near \
         hit* the same call answered by the near cache (an `Arc` clone).\n\n{}\n{targets}\n",
        round.as_millis(),
        t.markdown()
    )
}

/// `n` callers on their own keys for `duration`: ops/s and latencies (ns).
async fn run(
    side: Side,
    n: usize,
    duration: Duration,
    near: &LockedCache,
    l2: &LockedCache,
    conn: &MultiplexedConnection,
) -> (f64, Vec<u32>) {
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..n)
        .map(|c| {
            let key = format!("k{c}");
            let raw_key = near.value_key(&key);
            let (near, l2, mut conn) = (near.clone(), l2.clone(), conn.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(1 << 16);
                let mut ops = 0u64;
                // One op in 16 is timed (and the deadline checked before it):
                // a near hit costs about as much as two clock reads on this VM,
                // so timing every op would mostly measure the clock.
                loop {
                    let timed = if ops.is_multiple_of(16) {
                        let now = Instant::now();
                        if now >= deadline {
                            break;
                        }
                        Some(now)
                    } else {
                        None
                    };
                    match side {
                        Side::Raw => {
                            let v: Option<Vec<u8>> = conn.get(&raw_key).await.expect("GET");
                            black_box(v.expect("stored"));
                        }
                        Side::L2 | Side::Near => {
                            let cache = if side == Side::Near { &near } else { &l2 };
                            let v: Arc<String> = cache
                                .get_or_load_shared(&key, || async {
                                    Err::<String, &str>("a hit must not load")
                                })
                                .await
                                .expect("hit");
                            black_box(v);
                        }
                    }
                    if let Some(t0) = timed {
                        latencies.push(t0.elapsed().as_nanos().min(u32::MAX as u128) as u32);
                    }
                    ops += 1;
                }
                (latencies, ops, Instant::now())
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut total = 0;
    let mut last = started;
    for task in tasks {
        let (latencies, ops, ended) = task.await.expect("caller");
        all.extend(latencies);
        total += ops;
        last = last.max(ended);
    }
    let rate = total as f64 / (last - started).as_secs_f64();
    (rate, all)
}

async fn staleness(server: &RedisServer, sets: usize) -> String {
    eprintln!("near_cache: staleness, {sets} sets...");
    let mut caches = Vec::new();
    for _ in 0..3 {
        caches.push(cache(server, "stale:", true).await);
    }
    let (from_start, from_return) = (&mut Vec::new(), &mut Vec::new());
    let mut lost = 0;
    for i in 0..sets as u64 {
        // Every cache holds the current value.
        for c in &caches {
            let deadline = Instant::now() + Duration::from_secs(1);
            while c.near_peek::<u64>("k").is_none_or(|v| *v != i) && Instant::now() < deadline {
                c.get_shared::<u64>("k").await.expect("get");
                if c.near_peek::<u64>("k").is_none() {
                    c.set("k", &i).await.expect("set");
                }
                tokio::task::yield_now().await;
            }
        }
        let started = Instant::now();
        caches[0].set("k", &(i + 1)).await.expect("set");
        let returned = Instant::now();
        let deadline = returned + Duration::from_secs(1);
        loop {
            if caches[1..]
                .iter()
                .all(|c| c.near_peek::<u64>("k").is_none_or(|v| *v != i))
            {
                let now = Instant::now();
                from_start.push((now - started).as_micros() as u64);
                from_return.push((now - returned).as_micros() as u64);
                break;
            }
            if Instant::now() > deadline {
                lost += 1;
                break;
            }
            tokio::task::yield_now().await;
        }
    }
    from_start.sort_unstable();
    from_return.sort_unstable();
    let us = |v: &[u64], p: f64| format!("{:.2}", percentile(v, p) as f64 / 1000.0);
    let mut t = Table::new(&["measured from", "p50 ms", "p99 ms", "max ms"]);
    t.row(vec![
        "start of `set`".into(),
        us(from_start, 50.0),
        us(from_start, 99.0),
        us(from_start, 100.0),
    ]);
    t.row(vec![
        "return of `set`".into(),
        us(from_return, 50.0),
        us(from_return, 99.0),
        us(from_return, 100.0),
    ]);
    let p99 = percentile(from_start, 99.0) as f64 / 1000.0;
    format!(
        "### Set-to-visible staleness (3 caches, {sets} sets)\n\n\
         Time until both other caches' near caches dropped the old value (their next read \
         gets the new one from Redis). {lost} of {sets} invalidations did not arrive within 1 s.\n\n{}\n\
         - Target staleness p99 < 5 ms on loopback: {p99:.2} ms — {}\n\n",
        t.markdown(),
        if p99 < 5.0 { "met" } else { "**missed**" }
    )
}

async fn lost_subscription(server: &RedisServer, kills: usize) -> String {
    eprintln!("near_cache: {kills} killed subscriptions...");
    let mut caches = Vec::new();
    for _ in 0..3 {
        caches.push(cache(server, "lost:", true).await);
    }
    let mut downtimes = Vec::new();
    for _ in 0..kills {
        let killed = Instant::now();
        server.client_kill_pubsub();
        // Each listener notices the closed connection, backs off 50 ms and
        // subscribes again.
        let deadline = killed + Duration::from_secs(10);
        tokio::time::sleep(Duration::from_millis(1)).await;
        while !caches.iter().all(|c| c.near_is_live()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        downtimes.push(killed.elapsed().as_micros() as u64);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    downtimes.sort_unstable();
    let ms = |p: f64| format!("{:.1}", percentile(&downtimes, p) as f64 / 1000.0);
    format!(
        "### A lost subscription (`CLIENT KILL TYPE pubsub`, {kills} times, 3 caches)\n\n\
         Near caches bypassed, from the kill until every cache is subscribed again: p50 {} ms, \
         max {} ms. Meanwhile every call is an L2 hit (one `GET` and a decode); afterwards \
         every near cache starts empty, so each hot key costs one more `GET` per process. A \
         connection dropped silently (no reset) is found by the subscription's PING every \
         10 s; until then a lost invalidation is bounded by the near cache TTL.\n\n",
        ms(50.0),
        ms(100.0)
    )
}
