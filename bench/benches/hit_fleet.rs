//! # Hit fleet: hits from several OS processes at once, against raw `GET`s
//!
//! The shape of the outside measurement of issue 11: 4 processes × 250 tasks,
//! 200 hits each, 1 KiB values, coalescing off (each call is its own `GET`),
//! against a raw redis-rs `GET` on the same server. Each process has one
//! cache (or, for the raw side, one `MultiplexedConnection` with the cache's
//! `TCP_NODELAY`), every task its own key. The sides take turns over several
//! rounds (rotating order); a round's throughput is all its hits over the time
//! from the common start to the last process's end, and a side's ratio is the
//! median over rounds of its throughput ÷ the raw side's in the same round.
//! Beside it, the CPU time per hit (every worker process and the redis-server,
//! during the round) as a ratio, raw ÷ side: with clients and Redis sharing
//! the cores it estimates the throughput ratio, and moves far less with the
//! host's scheduling.
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
use std::time::Duration;

use locked_cache::LockedCache;
use redis::AsyncCommands;

use common::{Flags, Table, die, unix_micros};
use support::RedisServer;

const HELP: &str = "\
Hit fleet: get_or_load hits from several processes vs raw GETs, coalescing off.

USAGE: cargo bench --bench hit_fleet -- [FLAGS]

  --processes N   OS processes                                 [4]
  --tasks N       tasks per process (each on its own key)      [250]
  --hits N        hits per task and round                      [200]
  --size B        value size, bytes                            [1024]
  --rounds N      rounds (each side once per round)            [7]
  --sides LIST    besides raw: string, bytes, vec              [string,bytes,vec]

Report: target/bench-report/hit_fleet.md.";

/// What a worker process does, from its command line.
struct Work {
    url: String,
    side: String,
    tasks: usize,
    hits: usize,
    /// First key of this process.
    first_key: usize,
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
    flags.reject_unknown(&["processes", "tasks", "hits", "size", "rounds", "sides"]);
    let smoke = !flags.bench_mode && !flags.any_given();
    let processes: usize = flags.get("processes", if smoke { 2 } else { 4 });
    let tasks: usize = flags.get("tasks", if smoke { 4 } else { 250 });
    let hits: usize = flags.get("hits", if smoke { 5 } else { 200 });
    let size: usize = flags.get("size", 1024);
    let rounds: usize = flags.get("rounds", if smoke { 1 } else { 7 });
    let mut sides = vec!["raw".to_owned()];
    for side in flags.list::<String>("sides", &["string".into(), "bytes".into(), "vec".into()]) {
        if !["string", "bytes", "vec"].contains(&side.as_str()) {
            die(&format!("unknown side {side}"));
        }
        sides.push(side);
    }

    let server = RedisServer::start();
    let url = server.url();
    seed(&url, processes * tasks, size);
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); sides.len()];
    let mut cpus: Vec<Vec<f64>> = vec![Vec::new(); sides.len()];
    let mut info = redis::Client::open(url.as_str())
        .and_then(|c| c.get_connection())
        .unwrap_or_else(|e| die(&format!("redis: {e}")));
    for round in 0..rounds {
        for i in 0..sides.len() {
            let index = (round + i) % sides.len();
            let (rate, cpu) = run_round(&url, &mut info, &sides[index], processes, tasks, hits);
            rates[index].push(rate);
            cpus[index].push(cpu);
        }
    }

    let mut table = Table::new(&[
        "side",
        "hits/s (median)",
        "÷ raw GET [min–max]",
        "CPU µs per hit (median)",
        "CPU: raw ÷ side [min–max]",
    ]);
    let mut lines = String::new();
    let median_of = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let bounds = (v[0], v[v.len() - 1]);
        (v[v.len() / 2], bounds)
    };
    for ((side, side_rates), side_cpus) in sides.iter().zip(&rates).zip(&cpus) {
        let ratios: Vec<f64> = side_rates
            .iter()
            .zip(&rates[0])
            .map(|(s, r)| s / r)
            .collect();
        let (ratio, (low, high)) = median_of(ratios);
        let cpu_ratios: Vec<f64> = side_cpus.iter().zip(&cpus[0]).map(|(s, r)| r / s).collect();
        let (cpu_ratio, (cpu_low, cpu_high)) = median_of(cpu_ratios);
        table.row(vec![
            label(side).to_owned(),
            format!("{:.0}", median_of(side_rates.clone()).0),
            if side == "raw" {
                "1".to_owned()
            } else {
                format!("{ratio:.3} [{low:.2}–{high:.2}]")
            },
            format!("{:.2}", median_of(side_cpus.clone()).0),
            if side == "raw" {
                "1".to_owned()
            } else {
                format!("{cpu_ratio:.3} [{cpu_low:.2}–{cpu_high:.2}]")
            },
        ]);
        if side != "raw" {
            lines.push_str(&format!(
                "- Target L2 hit ≥ 0.95× raw GET, {}: {ratio:.3}× by hits/s, {cpu_ratio:.3}× by CPU per hit — {}\n",
                label(side),
                if ratio >= 0.95 { "met" } else { "**missed**" }
            ));
        }
    }
    let report = format!(
        "## Hit fleet ({})\n\nCommand: `{}`  \n{}\n\n{processes} processes × {tasks} tasks, \
         {hits} hits per task and round, {size} B values, coalescing off, {rounds} rounds in \
         rotating order; raw `GET` on one `MultiplexedConnection` per process (`TCP_NODELAY`), \
         undecoded.\n\n{}\n{lines}",
        common::utc_now(),
        std::iter::once("cargo bench --bench hit_fleet --".to_owned())
            .chain(std::env::args().skip(1).filter(|a| a != "--bench"))
            .collect::<Vec<_>>()
            .join(" "),
        common::environment_line(&support::redis_server_binary()),
        table.markdown()
    );
    println!("{report}");
    if !smoke {
        let path = common::write_report("hit_fleet.md", &report);
        eprintln!("hit_fleet: report written to {}", path.display());
    }
}

fn label(side: &str) -> &'static str {
    match side {
        "raw" => "raw `GET`",
        "string" => "`get_or_load`, `String`",
        "bytes" => "`get_or_load_bytes`",
        _ => "`get_or_load`, `Vec<u8>`",
    }
}

/// Stores every key's value: a `String` of `size` bytes, which the byte sides
/// read as bytes (the same stored format).
fn seed(url: &str, keys: usize, size: usize) {
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async {
        let cache = cache(url).await;
        let value = "x".repeat(size);
        for key in 0..keys {
            cache.set(&format!("k{key}"), &value).await.expect("SET");
        }
    });
}

async fn cache(url: &str) -> LockedCache {
    LockedCache::builder()
        .redis(url)
        .key_prefix("fleet:")
        .ttl(Duration::from_secs(3600))
        .coalesce(false)
        .build()
        .await
        .expect("cache")
}

/// One round of one side: the workers start together and report their end.
/// One round of `side`: its hits per second, and the CPU time per hit in µs
/// (the workers' and the redis-server's, `info` being a connection to it).
fn run_round(
    url: &str,
    info: &mut redis::Connection,
    side: &str,
    processes: usize,
    tasks: usize,
    hits: usize,
) -> (f64, f64) {
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
    for output in &mut outputs {
        let line = output.next().and_then(Result::ok).unwrap_or_default();
        let (end, worker_cpu) = line
            .strip_prefix("END ")
            .and_then(|rest| rest.split_once(' '))
            .and_then(|(end, ns)| Some((end.parse::<u64>().ok()?, ns.parse::<u64>().ok()?)))
            .unwrap_or_else(|| die(&format!("worker said {line:?}")));
        last = last.max(end);
        cpu += Duration::from_nanos(worker_cpu);
    }
    cpu += redis_cpu(info).saturating_sub(redis_before);
    for mut child in children {
        child.wait().expect("worker exit");
    }
    let ops = (processes * tasks * hits) as f64;
    (
        ops / ((last - start) as f64 / 1e6),
        cpu.as_secs_f64() * 1e6 / ops,
    )
}

/// A worker process: builds its cache or connection, warms it, says READY,
/// waits for `GO <unix µs>`, runs its tasks from that instant, prints `END
/// <unix µs> <CPU ns it used from GO to END>`.
fn worker(work: Work) {
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async {
        let cache = cache(&work.url).await;
        let raw = common::raw_connection(&work.url).await;
        // Warm: the cache's connection open and its scripts loaded.
        let _: Option<String> = cache.get("k0").await.expect("warm-up");
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
                let key = format!("k{}", work.first_key + t);
                let raw_key = cache.value_key(&key);
                let (cache, mut raw, side) = (cache.clone(), raw.clone(), work.side.clone());
                tokio::spawn(async move {
                    let no_load = || async { Err::<Vec<u8>, &str>("a hit must not load") };
                    for _ in 0..work.hits {
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
                                let v = cache.get_or_load_bytes(&key, no_load).await.expect("hit");
                                black_box(v);
                            }
                            _ => {
                                let v: Vec<u8> =
                                    cache.get_or_load(&key, no_load).await.expect("hit");
                                black_box(v);
                            }
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
        let end = unix_micros();
        let cpu = common::process_cpu_time().saturating_sub(cpu_before);
        println!("END {end} {}", cpu.as_nanos());
    });
}
