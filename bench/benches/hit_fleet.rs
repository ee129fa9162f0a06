//! # Hit fleet: hits from several OS processes at once, against raw `GET`s
//!
//! Two parts, each against a raw redis-rs `GET` on one `MultiplexedConnection`
//! per process (with the cache's `TCP_NODELAY`, undecoded) on the same keys of
//! the same server, measured in the same run:
//!
//! - **Fleet** (issue 26's shape): 2 processes × 1,000 tasks, each task reading
//!   its own cached 1 KiB `Vec<u8>` 200 times per round, coalescing off (each
//!   call is its own `GET`), default builder otherwise: `get_or_load`,
//!   `get_or_load_bytes`, `get_or_load::<String>`, `get_or_load_shared` (no
//!   near cache).
//! - **Near** (1 process × 100 tasks, near cache on, coalescing off): Redis
//!   hits of a `Vec<u8>` and of a ~1 KiB struct (20 lines, a string each), the
//!   same with the near cache on through `get_or_load` (it does not use it),
//!   near hits through `get_or_load_cloned` and `get_or_load_shared`, and the
//!   near cache's miss path (each task reads each of its keys once, in a
//!   process whose near cache starts empty: every call a near miss that reads
//!   Redis, `GET` + `PTTL`, and keeps the value).
//!
//! Each process has one cache (or, for the raw side, one connection). Each
//! round runs every side once, each **paired** with a raw run just before or
//! just after it (alternately; the sides' order rotates): a run's throughput
//! is all its hits over the time from the common start to the last process's
//! end, and a side's ratio is the median over rounds of its throughput ÷ its
//! paired raw run's (with quartiles, and min–max). Pairing matters on a
//! shared 2-core host: runs a few seconds apart differed by 30 % and more
//! (unpaired, the same build's ratio read 0.86–1.15× over five runs).
//! Beside it: p50 / p99 of one hit in 16 (timed around the call, over every round), and the CPU time per
//! hit (every worker process and the redis-server, during the round) as a
//! ratio, raw ÷ side, which moves far less with the host's scheduling.
//!
//! ```text
//! cargo bench --bench hit_fleet                       # about a minute
//! cargo bench --bench hit_fleet -- --help
//! ```
//!
//! Writes `target/bench-report/hit_fleet.md`. Run by `cargo test --benches`
//! (no flag) it does a small smoke run and writes nothing.

#[path = "../../tests/support/mod.rs"]
mod support;

use locked_cache_bench as common;

use std::hint::black_box;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use locked_cache::LockedCache;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use common::{Flags, Table, die, percentile, unix_micros};
use support::RedisServer;

const HELP: &str = "\
Hit fleet: hits from several processes vs raw GETs, coalescing off.

USAGE: cargo bench --bench hit_fleet -- [FLAGS]

  --processes N     fleet: OS processes                          [2]
  --tasks N         fleet: tasks per process (each its own key)  [1000]
  --hits N          hits per task and round (Redis sides)        [200]
  --sides LIST      fleet sides besides raw: vec, bytes, string, shared,
                    vec-boxed (the caller boxes the call's future)
                                                                 [vec,shared]
  --near-tasks N    near part: tasks (1 process)                 [100]
  --near-hits N     near hits per task and round                 [20000]
  --near-sides LIST near sides besides raw: vec, struct, near-vec,
                    near-struct, cloned-vec, cloned-struct, near-shared,
                    near-miss (empty: skip the part)
                    [vec,struct,near-vec,near-struct,cloned-vec,cloned-struct,near-shared,near-miss]
  --size B          value size, bytes (the struct is ~1 KiB)     [1024]
  --rounds N        rounds (each side and a paired raw run)      [5]

Report: target/bench-report/hit_fleet.md.";

const FLEET_SIDES: [&str; 5] = ["vec", "bytes", "string", "shared", "vec-boxed"];
const NEAR_SIDES: [&str; 8] = [
    "vec",
    "struct",
    "near-vec",
    "near-struct",
    "cloned-vec",
    "cloned-struct",
    "near-shared",
    "near-miss",
];

/// The struct value: 20 lines with a string each, about 1 KiB encoded.
#[derive(Clone, Serialize, Deserialize)]
struct Record {
    lines: Vec<Line>,
}

#[derive(Clone, Serialize, Deserialize)]
struct Line {
    number: u32,
    text: String,
}

impl Record {
    fn sample() -> Record {
        Record {
            lines: (0..20)
                .map(|number| Line {
                    number,
                    text: format!("{number:02} {}", "y".repeat(44)),
                })
                .collect(),
        }
    }
}

/// What a worker process does, from its command line.
struct Work {
    url: String,
    side: String,
    tasks: usize,
    hits: usize,
    /// First key of this process.
    first_key: usize,
}

/// One part of the bench: its shape and sides (the raw side first).
struct Part {
    name: &'static str,
    processes: usize,
    tasks: usize,
    sides: Vec<String>,
}

/// What the rounds of one side gave.
#[derive(Default, Clone)]
struct Measured {
    rates: Vec<f64>,
    cpus: Vec<f64>,
    latencies_ns: Vec<u64>,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--worker") {
        let get = |i: usize| {
            args.get(i)
                .cloned()
                .unwrap_or_else(|| die("worker arguments"))
        };
        let number = |i: usize| get(i).parse().unwrap_or_else(|_| die("worker arguments"));
        worker(Work {
            url: get(2),
            side: get(3),
            tasks: number(4),
            hits: number(5),
            first_key: number(6),
        });
        return;
    }
    let flags = Flags::parse(&[]);
    if flags.help {
        println!("{HELP}");
        return;
    }
    flags.reject_unknown(&[
        "processes",
        "tasks",
        "hits",
        "size",
        "rounds",
        "sides",
        "near-tasks",
        "near-hits",
        "near-sides",
    ]);
    let smoke = !flags.bench_mode && !flags.any_given();
    let processes: usize = flags.get("processes", 2);
    let tasks: usize = flags.get("tasks", if smoke { 4 } else { 1000 });
    let hits: usize = flags.get("hits", if smoke { 5 } else { 200 });
    let near_tasks: usize = flags.get("near-tasks", if smoke { 4 } else { 100 });
    let near_hits: usize = flags.get("near-hits", if smoke { 50 } else { 20_000 });
    let size: usize = flags.get("size", 1024);
    let rounds: usize = flags.get("rounds", if smoke { 1 } else { 5 });
    let sides = |flag: &str, default: &[&str], known: &[&str]| {
        let default: Vec<String> = default.iter().map(|s| (*s).to_owned()).collect();
        let mut sides = vec!["raw".to_owned()];
        for side in flags.list::<String>(flag, &default) {
            if side.is_empty() {
                continue;
            }
            if !known.contains(&side.as_str()) {
                die(&format!("unknown side {side}"));
            }
            sides.push(side);
        }
        sides
    };
    let parts = [
        Part {
            name: "fleet",
            processes,
            tasks,
            sides: sides("sides", &["vec", "shared"], &FLEET_SIDES),
        },
        Part {
            name: "near",
            processes: 1,
            tasks: near_tasks,
            sides: sides("near-sides", &NEAR_SIDES, &NEAR_SIDES),
        },
    ];

    let server = RedisServer::start();
    let url = server.url();
    // The near miss side reads each of its keys once: `hits` keys per task.
    let keys = (processes * tasks).max(near_tasks);
    seed(&url, keys, keys.max(near_tasks * hits), size);
    let mut info = redis::Client::open(url.as_str())
        .and_then(|c| c.get_connection())
        .unwrap_or_else(|e| die(&format!("redis: {e}")));
    let mut report = format!(
        "## Hit fleet ({})\n\nCommand: `{}`  \n{}\n\n",
        common::utc_now(),
        std::iter::once("cargo bench --bench hit_fleet --".to_owned())
            .chain(std::env::args().skip(1).filter(|a| a != "--bench"))
            .collect::<Vec<_>>()
            .join(" "),
        common::environment_line(&support::redis_server_binary()),
    );
    for part in parts.iter().filter(|p| p.sides.len() > 1) {
        // Per side: its own runs, and the raw runs paired with them.
        let mut measured = vec![Measured::default(); part.sides.len()];
        let mut paired_raw = vec![Measured::default(); part.sides.len()];
        let mut run = |side: &str, into: &mut Measured| {
            let side_hits = if is_near_hit(side) { near_hits } else { hits };
            let (rate, cpu, latencies) =
                run_round(&url, &mut info, side, part.processes, part.tasks, side_hits);
            into.rates.push(rate);
            into.cpus.push(cpu);
            into.latencies_ns.extend(latencies);
        };
        for round in 0..rounds {
            for i in 1..part.sides.len() {
                // Rotating which side goes first in a round, and which of
                // the pair goes first in a pair.
                let index = 1 + (round + i) % (part.sides.len() - 1);
                let side = part.sides[index].clone();
                if (round + i) % 2 == 0 {
                    run("raw", &mut paired_raw[index]);
                    run(&side, &mut measured[index]);
                } else {
                    run(&side, &mut measured[index]);
                    run("raw", &mut paired_raw[index]);
                }
            }
        }
        report.push_str(&format!(
            "### {} ({} process(es) × {} tasks, {hits} Redis hits or {near_hits} near hits \
             per task and round, {size} B values, coalescing off, {rounds} rounds)\n\n{}\n",
            part.name,
            part.processes,
            part.tasks,
            table(&part.sides, &mut measured, &mut paired_raw)
        ));
    }
    println!("{report}");
    if !smoke {
        let path = common::write_report("hit_fleet.md", &report);
        eprintln!("hit_fleet: report written to {}", path.display());
    }
}

/// Sides whose hits are near hits (many more per task, to last as long).
fn is_near_hit(side: &str) -> bool {
    side.starts_with("cloned-") || side == "near-shared"
}

/// The table of one part: per side, hits/s, the ratio to raw, p50/p99, CPU.
/// Every ratio compares a side with the raw runs paired with its own (run
/// just before or just after each of them): the ratio of hits/s and of CPU
/// per hit is the median over pairs, the p99 ratio is the side's p99 over
/// the p99 of its paired raw runs. The raw row pools every raw run.
fn table(sides: &[String], measured: &mut [Measured], paired_raw: &mut [Measured]) -> String {
    let median_of = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let bounds = (v[0], v[v.len() - 1]);
        let quartiles = (v[v.len() / 4], v[(v.len() * 3) / 4]);
        (v[v.len() / 2], bounds, quartiles)
    };
    let mut table = Table::new(&[
        "side",
        "hits/s (median)",
        "÷ raw GET (median of pairs) [quartiles] {min–max}",
        "p50 / p99 µs",
        "p99 ÷ paired raw's",
        "CPU µs per hit",
        "CPU: raw ÷ side",
    ]);
    let mut all_raw = Measured::default();
    for m in paired_raw.iter_mut().skip(1) {
        all_raw.rates.extend(&m.rates);
        all_raw.cpus.extend(&m.cpus);
        all_raw.latencies_ns.extend(&m.latencies_ns);
        m.latencies_ns.sort_unstable();
    }
    all_raw.latencies_ns.sort_unstable();
    measured[0] = all_raw;
    for m in measured.iter_mut() {
        m.latencies_ns.sort_unstable();
    }
    for ((side, m), raw) in sides.iter().zip(measured.iter()).zip(paired_raw.iter()) {
        let is_raw = side == "raw";
        let p50 = percentile(&m.latencies_ns, 50.0) as f64 / 1e3;
        let p99 = percentile(&m.latencies_ns, 99.0) as f64;
        let (ratio_cell, p99_cell, cpu_cell) = if is_raw {
            ("1".to_owned(), "1".to_owned(), "1".to_owned())
        } else {
            let ratios: Vec<f64> = m.rates.iter().zip(&raw.rates).map(|(s, r)| s / r).collect();
            let (ratio, (low, high), (q1, q3)) = median_of(ratios);
            let cpu_ratios: Vec<f64> = m.cpus.iter().zip(&raw.cpus).map(|(s, r)| r / s).collect();
            let (cpu_ratio, _, _) = median_of(cpu_ratios);
            let raw_p99 = percentile(&raw.latencies_ns, 99.0) as f64;
            (
                format!("{ratio:.3} [{q1:.2}–{q3:.2}] {{{low:.2}–{high:.2}}}"),
                format!("{:.2}", p99 / raw_p99),
                format!("{cpu_ratio:.3}"),
            )
        };
        table.row(vec![
            label(side).to_owned(),
            format!("{:.0}", median_of(m.rates.clone()).0),
            ratio_cell,
            format!("{p50:.1} / {:.1}", p99 / 1e3),
            p99_cell,
            format!("{:.2}", median_of(m.cpus.clone()).0),
            cpu_cell,
        ]);
    }
    table.markdown()
}

fn label(side: &str) -> &'static str {
    match side {
        "raw" => "raw `GET`",
        "string" => "`get_or_load`, `String`",
        "bytes" => "`get_or_load_bytes`",
        "vec" => "`get_or_load`, `Vec<u8>`",
        "vec-boxed" => "`get_or_load`, `Vec<u8>`, its future boxed by the caller",
        "shared" => "`get_or_load_shared`, `Vec<u8>`",
        "struct" => "`get_or_load`, struct",
        "near-vec" => "`get_or_load`, `Vec<u8>`, near cache on",
        "near-struct" => "`get_or_load`, struct, near cache on",
        "cloned-vec" => "near hit, `get_or_load_cloned`, `Vec<u8>`",
        "cloned-struct" => "near hit, `get_or_load_cloned`, struct",
        "near-shared" => "near hit, `get_or_load_shared`, `Vec<u8>`",
        _ => "near miss (reads Redis), `get_or_load_shared`, `Vec<u8>`",
    }
}

/// Stores every key's values: `k<n>` a `String` of `size` bytes for `n` up to
/// `byte_keys`, which the byte sides read as bytes (the same stored format),
/// `r<n>` a [`Record`] for `n` up to `keys`.
fn seed(url: &str, keys: usize, byte_keys: usize, size: usize) {
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async {
        let cache = cache(url, None).await;
        let value = "x".repeat(size);
        let record = Record::sample();
        for key in 0..byte_keys {
            cache.set(&format!("k{key}"), &value).await.expect("SET");
        }
        for key in 0..keys {
            cache.set(&format!("r{key}"), &record).await.expect("SET");
        }
    });
}

/// The cache of a side: the default builder, coalescing off, with a near
/// cache of `near` bytes when given.
async fn cache(url: &str, near: Option<u64>) -> LockedCache {
    let mut builder = LockedCache::builder()
        .redis(url)
        .key_prefix("fleet:")
        .ttl(Duration::from_secs(3600))
        .coalesce(false);
    if let Some(bytes) = near {
        builder = builder
            .near_cache(bytes)
            .near_cache_ttl(Duration::from_secs(60));
    }
    builder.build().await.expect("cache")
}

/// One round of `side`: its hits per second, the CPU time per hit in µs (the
/// workers' and the redis-server's, `info` being a connection to it), and the
/// latencies of the timed hits (ns).
fn run_round(
    url: &str,
    info: &mut redis::Connection,
    side: &str,
    processes: usize,
    tasks: usize,
    hits: usize,
) -> (f64, f64, Vec<u64>) {
    let redis_cpu = |info: &mut redis::Connection| {
        let text: String = redis::cmd("INFO")
            .arg("cpu")
            .query(info)
            .unwrap_or_else(|e| die(&format!("INFO cpu: {e}")));
        common::redis_cpu_time(&text)
    };
    let exe = std::env::current_exe().expect("current exe");
    let mut children: Vec<_> = (0..processes)
        .map(|p| {
            Command::new(&exe)
                .args(["--worker", url, side])
                .args([tasks, hits, p * tasks].map(|n| n.to_string()))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("worker process")
        })
        .collect();
    let mut outputs: Vec<_> = children
        .iter_mut()
        .map(|c| BufReader::new(c.stdout.take().expect("stdout")).lines())
        .collect();
    for output in &mut outputs {
        let line = output.next().and_then(Result::ok).unwrap_or_default();
        if line != "READY" {
            die(&format!("worker said {line:?}"));
        }
    }
    let redis_before = redis_cpu(info);
    let start = unix_micros() + 20_000;
    for child in &mut children {
        let stdin = child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "GO {start}").expect("GO");
    }
    let mut last = start;
    let mut cpu = Duration::ZERO;
    let mut latencies = Vec::new();
    for output in &mut outputs {
        let line = output.next().and_then(Result::ok).unwrap_or_default();
        let mut fields = line
            .strip_prefix("END ")
            .unwrap_or_else(|| die(&format!("worker said {line:?}")))
            .split(' ')
            .map(|n| {
                n.parse::<u64>()
                    .unwrap_or_else(|_| die(&format!("worker said {line:?}")))
            });
        let (Some(end), Some(worker_cpu)) = (fields.next(), fields.next()) else {
            die(&format!("worker said {line:?}"));
        };
        last = last.max(end);
        cpu += Duration::from_nanos(worker_cpu);
        latencies.extend(fields);
    }
    cpu += redis_cpu(info).saturating_sub(redis_before);
    for mut child in children {
        child.wait().expect("worker exit");
    }
    let ops = (processes * tasks * hits) as f64;
    (
        ops / ((last - start) as f64 / 1e6),
        cpu.as_secs_f64() * 1e6 / ops,
        latencies,
    )
}

/// A worker process: builds its cache or connection, warms it, says READY,
/// waits for `GO <unix µs>`, runs its tasks from that instant, prints `END
/// <unix µs> <CPU ns it used from GO to END> <ns of each timed hit>...`.
fn worker(work: Work) {
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async {
        let near = match work.side.as_str() {
            side if side.starts_with("near-") || side.starts_with("cloned-") => Some(64 << 20),
            _ => None,
        };
        let cache = cache(&work.url, near).await;
        let raw = common::raw_connection(&work.url).await;
        // Warm: the cache's connection open and its scripts loaded, and the
        // near cache's subscription up.
        let _: Option<String> = cache.get("k0").await.expect("warm-up");
        let deadline = Instant::now() + Duration::from_secs(5);
        while near.is_some() && !cache.near_is_live() {
            if Instant::now() > deadline {
                die("the near cache never subscribed");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        println!("READY");
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).expect("GO");
        let start: u64 = line
            .trim()
            .strip_prefix("GO ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| die("expected GO"));
        let now = unix_micros();
        if start > now {
            tokio::time::sleep(Duration::from_micros(start - now)).await;
        }
        let cpu_before = common::process_cpu_time();
        let tasks: Vec<_> = (0..work.tasks)
            .map(|t| {
                let n = work.first_key + t;
                let (cache, raw, side) = (cache.clone(), raw.clone(), work.side.clone());
                tokio::spawn(run_task(cache, raw, side, n, work.hits))
            })
            .collect();
        let mut latencies = Vec::new();
        for task in tasks {
            latencies.extend(task.await.expect("task"));
        }
        let end = unix_micros();
        let cpu = common::process_cpu_time().saturating_sub(cpu_before);
        let mut out = format!("END {end} {}", cpu.as_nanos());
        for ns in latencies {
            out.push_str(&format!(" {ns}"));
        }
        println!("{out}");
    });
}

/// One task: `hits` hits of key number `n` through `side`; the latencies
/// (ns) of one hit in 16.
async fn run_task(
    cache: LockedCache,
    mut raw: redis::aio::MultiplexedConnection,
    side: String,
    n: usize,
    hits: usize,
) -> Vec<u64> {
    let (key, record_key) = (format!("k{n}"), format!("r{n}"));
    let raw_key = cache.value_key(&key);
    let no_load = || async { Err::<Vec<u8>, &str>("a hit must not load") };
    let no_record = || async { Err::<Record, &str>("a hit must not load") };
    let mut latencies = Vec::with_capacity(hits / 16 + 1);
    for i in 0..hits {
        let started = (i % 16 == 0).then(Instant::now);
        match side.as_str() {
            "raw" => {
                let v: Option<Vec<u8>> = raw.get(&raw_key).await.expect("GET");
                black_box(v.expect("stored"));
            }
            "string" => {
                let v: String = cache
                    .get_or_load(&key, || async {
                        Err::<String, &str>("a hit must not load")
                    })
                    .await
                    .expect("hit");
                black_box(v);
            }
            "bytes" => {
                black_box(cache.get_or_load_bytes(&key, no_load).await.expect("hit"));
            }
            "vec-boxed" => {
                let call = Box::pin(cache.get_or_load(&key, no_load));
                black_box(call.await.expect("hit"));
            }
            "vec" | "near-vec" => {
                black_box(cache.get_or_load(&key, no_load).await.expect("hit"));
            }
            "struct" | "near-struct" => {
                black_box(
                    cache
                        .get_or_load(&record_key, no_record)
                        .await
                        .expect("hit"),
                );
            }
            "cloned-vec" => {
                black_box(cache.get_or_load_cloned(&key, no_load).await.expect("hit"));
            }
            "cloned-struct" => {
                let v = cache.get_or_load_cloned(&record_key, no_record).await;
                black_box(v.expect("hit"));
            }
            "near-miss" => {
                // Each key once (the worker's near cache starts empty): every
                // call a near miss that reads Redis and keeps the value.
                let key = format!("k{}", n * hits + i);
                black_box(cache.get_or_load_shared(&key, no_load).await.expect("hit"));
            }
            _ => {
                // shared, near-shared
                black_box(cache.get_or_load_shared(&key, no_load).await.expect("hit"));
            }
        }
        if let Some(started) = started {
            latencies.push(started.elapsed().as_nanos() as u64);
        }
    }
    latencies
}
