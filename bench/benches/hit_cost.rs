//! # Hit cost: what one hit costs the client, for a profiler
//!
//! The throughput bench (`hit_path`) measures ratios on a shared 2-core VM,
//! where rounds spread by ±30%. This one runs a fixed number of operations of
//! one side, so that a profiler can count what a hit costs: under
//! `valgrind --tool=callgrind` the instruction count of a run is the same from
//! run to run whatever else the machine does, and the difference between two
//! sides divided by the operations is what one hit adds to a raw `GET`.
//!
//! ```text
//! cargo bench --bench hit_cost --no-run     # prints the binary's path
//! B=target/release/deps/hit_cost-...        # that path
//! for side in raw get get_or_load bytes; do
//!   valgrind --tool=callgrind --callgrind-out-file=cg.$side $B --side $side --ops 20000
//! done                                      # "Collected" is the instruction count
//! valgrind --tool=callgrind $B --side raw --ops 64   # a run's fixed cost, to subtract
//! ```
//!
//! Sides: `raw` (redis-rs `GET` on one `MultiplexedConnection`, the bytes
//! undecoded), `get` (`LockedCache::get::<String>`), `get_or_load` (a hit,
//! `String`), `bytes` (a hit through `get_or_load_bytes`), `near` (a near
//! cache hit of `get_or_load_shared`, after one fill). Values are 1 KiB,
//! each caller on its own key. Without a profiler it prints operations per
//! second and the process's CPU time per operation (from `/proc`), which are
//! as noisy as the machine. `--side alternate` runs one caller taking the raw
//! side, `get` and `get_or_load` in turn, op by op, and prints each one's mean
//! latency.

#[path = "../../tests/support/mod.rs"]
mod support;

use locked_cache_bench as common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use locked_cache::LockedCache;
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;

use common::{Flags, die, process_cpu_time};
use support::RedisServer;

const HELP: &str = "\
Hit cost: a fixed number of operations of one side, for callgrind or perf.

USAGE: cargo bench --bench hit_cost -- [FLAGS]

  --side S        raw, get, get_or_load, bytes, near or
                  alternate                                    [get_or_load]
  --ops N         operations in all                            [20000]
  --callers N     concurrent callers (tasks)                   [64]
  --threads N     tokio worker threads                         [1]
  --coalesce B    in-process coalescing                        [true]";

fn main() {
    let flags = Flags::parse(&[]);
    if flags.help {
        println!("{HELP}");
        return;
    }
    flags.reject_unknown(&["side", "ops", "callers", "threads", "coalesce"]);
    let side: String = flags.get("side", "get_or_load".to_owned());
    if !["raw", "get", "get_or_load", "bytes", "near", "alternate"].contains(&side.as_str()) {
        die(&format!("unknown side {side}"));
    }
    let ops: usize = flags.get("ops", 20_000);
    let callers: usize = flags.get("callers", 64_usize).max(1);
    let threads: usize = flags.get("threads", 1_usize).max(1);
    let coalesce: bool = flags.get("coalesce", true);
    // Under `cargo test --benches` (no flag at all): a smoke run.
    let ops = if flags.bench_mode || flags.any_given() {
        ops
    } else {
        256
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let server = RedisServer::start();
    let url = server.url();
    runtime.block_on(async {
        let mut builder = LockedCache::builder()
            .redis(url.as_str())
            .key_prefix("hit:")
            .ttl(Duration::from_secs(3600))
            .coalesce(coalesce);
        if side == "near" {
            builder = builder
                .near_cache(64 << 20)
                .near_cache_ttl(Duration::from_secs(3600));
        }
        let cache = builder.build().await.expect("cache");
        let raw = common::raw_connection(&url).await;
        let value = "x".repeat(1024);
        for caller in 0..callers {
            cache.set(&format!("k{caller}"), &value).await.expect("SET");
        }
        if side == "alternate" {
            alternate(&cache, raw, ops).await;
            return;
        }
        let per_caller = ops / callers;
        let started = Instant::now();
        let cpu_before = process_cpu_time();
        let tasks: Vec<_> = (0..callers)
            .map(|caller| {
                let key = format!("k{caller}");
                let raw_key = cache.value_key(&key);
                let (cache, mut raw, side) = (cache.clone(), raw.clone(), side.clone());
                tokio::spawn(async move {
                    for _ in 0..per_caller {
                        match side.as_str() {
                            "raw" => {
                                let v: Option<Vec<u8>> = raw.get(&raw_key).await.expect("GET");
                                black_box(v.expect("stored"));
                            }
                            "get" => {
                                let v: Option<String> = cache.get(&key).await.expect("get");
                                black_box(v.expect("stored"));
                            }
                            "near" => {
                                let v: std::sync::Arc<String> = cache
                                    .get_or_load_shared(&key, || async {
                                        Err::<String, &str>("a hit must not load")
                                    })
                                    .await
                                    .expect("hit");
                                black_box(v);
                            }
                            "bytes" => {
                                let v = cache
                                    .get_or_load_bytes(&key, || async {
                                        Err::<Vec<u8>, &str>("a hit must not load")
                                    })
                                    .await
                                    .expect("hit");
                                black_box(v);
                            }
                            _ => {
                                let v: String = cache
                                    .get_or_load(&key, || async {
                                        Err::<String, &str>("a hit must not load")
                                    })
                                    .await
                                    .expect("hit");
                                black_box(v);
                            }
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("caller task");
        }
        let elapsed = started.elapsed();
        let cpu = process_cpu_time() - cpu_before;
        let done = per_caller * callers;
        println!(
            "side {side}: {done} ops, {:.0} ops/s, process CPU {:.2} µs per op",
            done as f64 / elapsed.as_secs_f64(),
            cpu.as_secs_f64() * 1e6 / done as f64
        );
    });
}

/// One caller: the raw side, `get` and `get_or_load`, op by op.
async fn alternate(cache: &LockedCache, mut raw: MultiplexedConnection, ops: usize) {
    let raw_key = cache.value_key("k0");
    let mut spent = [Duration::ZERO; 3];
    for i in 0..ops {
        let t0 = Instant::now();
        match i % 3 {
            0 => {
                let v: Option<Vec<u8>> = raw.get(&raw_key).await.expect("GET");
                black_box(v);
            }
            1 => {
                let v: Option<String> = cache.get("k0").await.expect("get");
                black_box(v);
            }
            _ => {
                let v: String = cache
                    .get_or_load("k0", || async {
                        Err::<String, &str>("a hit must not load")
                    })
                    .await
                    .expect("hit");
                black_box(v);
            }
        }
        spent[i % 3] += t0.elapsed();
    }
    let each = (ops / 3).max(1) as f64;
    let us = |d: Duration| d.as_secs_f64() * 1e6 / each;
    println!(
        "alternate: raw GET {:.1} µs, get {:.1} µs, get_or_load {:.1} µs (mean of {} each)",
        us(spent[0]),
        us(spent[1]),
        us(spent[2]),
        ops / 3
    );
}
