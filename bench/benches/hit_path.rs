//! # Hit-path bench: what a cached `get_or_load` costs over a raw Redis `GET`
//!
//! 1. **Throughput** at 1, 16 and 64 concurrent callers, values of 100 B,
//!    1 KiB and 64 KiB, in several shapes (`--shapes`: `String`, `Vec<u8>`,
//!    bytes through `get_or_load_bytes`, a struct with a byte field plain or
//!    `serde_bytes`, a nested struct with collections): `get_or_load` on a
//!    cached key (the cache on its own connections, `.redis(url)`, as users
//!    build it) against a raw redis-rs `GET` of the same Redis key: through a
//!    bb8-redis pool (a checkout per command, the connection cloned and the
//!    checkout returned at once) and, with `--sides manager,single`, on one
//!    `ConnectionManager` or one `MultiplexedConnection` shared by every
//!    caller. Each caller has its own key (so in-process coalescing never
//!    merges hits), and the raw sides return the bytes without decoding them:
//!    the baseline is the bare round trip. `LockedCache::get` (the same read
//!    without the in-process flight) can run as another side, to show where
//!    the difference goes. A custom harness, not criterion: N tasks run for a
//!    fixed time, the sides take turns over several rounds (rotating order),
//!    and the ratio is the median of the per-round ratios, which cancels most
//!    of the drift of a shared 2-core machine. Redis commands per hit come
//!    from `INFO commandstats` deltas of every round, counting *every* command
//!    (`PING` included) except the harness's `INFO`/`CONFIG`: one round trip
//!    shows as 1.00.
//! 2. **Micro benchmarks** (criterion): codec encode/decode, a hit on the
//!    embedded in-memory store, and lock acquire (+ release) on 1, 3 and 5
//!    masters, next to the floor: plain redis-rs `SET NX PX` sent to the same
//!    servers in parallel.
//!
//! The bench starts its own `redis-server` processes on free loopback ports
//! (the test support in `tests/support/`). Run it with
//!
//! ```text
//! cargo bench --bench hit_path                 # about two minutes
//! cargo bench --bench hit_path -- --help       # flags: callers, sizes, rounds...
//! ```
//!
//! It prints markdown tables and writes them to
//! `target/bench-report/hit_path.md` (criterion's own data goes to
//! `target/bench-report/criterion/`). Run by `cargo test --benches` (no
//! `--bench` flag) it does a small smoke run and writes nothing.

#[path = "../../tests/support/mod.rs"]
mod support;

use locked_cache_bench as common;

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use bb8_redis::RedisConnectionManager;
use criterion::{BenchmarkId, Criterion, Throughput};
use locked_cache::codec::{decode, encode};
use locked_cache::{BincodeCodec, DEFAULT_POOL_SIZE, LockOptions, LockedCache, Redlock};
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, MultiplexedConnection};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use common::{Flags, Table, die, percentile};
use support::{Fleet, RedisServer};

const HELP: &str = "\
Hit-path bench for locked-cache: get_or_load hits vs raw GET; codec, memory store, lock.

USAGE: cargo bench --bench hit_path -- [FLAGS]

  --callers LIST      concurrent callers                           [1,16,64]
  --sizes LIST        value sizes, bytes                           [100,1024,65536]
  --shapes LIST       values: string, vec, bytes, record,
                      record-bytes, nested                         [string]
  --sides LIST        besides the raw GET on the bb8 pool: get,
                      get_or_load, manager (raw GET on one
                      ConnectionManager), single (raw GET on one
                      MultiplexedConnection), tagged (get_or_load
                      of a tagged String, tags on)                 [get,get_or_load]
  --rounds N          rounds per configuration (each side once)    [16]
  --round-ms T        duration of one round of one side, ms         [150]
  --threads N         tokio worker threads                          [2]
  --raw-nodelay B     TCP_NODELAY on the raw sides' connections, as
                      the cache sets it on its own (false: Nagle's
                      algorithm, redis-rs's default)                [true]
  --masters LIST      lock benchmarks: master counts                [1,3,5]
  --skip-throughput   only the micro benchmarks
  --skip-micro        only the throughput comparison

Report: target/bench-report/hit_path.md.";

struct Options {
    callers: Vec<usize>,
    sizes: Vec<usize>,
    shapes: Vec<Shape>,
    sides: Vec<Side>,
    rounds: usize,
    round: Duration,
    threads: usize,
    raw_nodelay: bool,
    masters: Vec<usize>,
    throughput: bool,
    micro: bool,
    smoke: bool,
    command_line: String,
}

fn main() {
    let flags = Flags::parse(&["skip-micro", "skip-throughput"]);
    if flags.help {
        println!("{HELP}");
        return;
    }
    flags.reject_unknown(&[
        "callers",
        "sizes",
        "shapes",
        "sides",
        "rounds",
        "raw-nodelay",
        "round-ms",
        "threads",
        "masters",
        "skip-micro",
        "skip-throughput",
    ]);
    let smoke = !flags.bench_mode;
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let o = Options {
        callers: flags.list("callers", if smoke { &[1, 16] } else { &[1, 16, 64] }),
        sizes: flags.list("sizes", if smoke { &[100] } else { &[100, 1024, 65536] }),
        shapes: flags.list(
            "shapes",
            if smoke {
                &[
                    Shape::Str,
                    Shape::Vec,
                    Shape::Bytes,
                    Shape::Record,
                    Shape::RecordBytes,
                    Shape::Nested,
                ]
            } else {
                &[Shape::Str]
            },
        ),
        sides: flags.list(
            "sides",
            &[Side::Get(Shape::Str), Side::GetOrLoad(Shape::Str)],
        ),
        rounds: flags.get("rounds", if smoke { 2 } else { 16 }),
        round: Duration::from_millis(flags.get("round-ms", if smoke { 50 } else { 150 })),
        threads: flags.get("threads", 2),
        raw_nodelay: flags.get("raw-nodelay", true),
        masters: flags.list("masters", &[1, 3, 5]),
        throughput: !flags.switch("skip-throughput"),
        micro: !flags.switch("skip-micro"),
        smoke,
        command_line: if args.is_empty() {
            "cargo bench --bench hit_path".to_owned()
        } else {
            format!("cargo bench --bench hit_path -- {}", args.join(" "))
        },
    };
    if o.callers.is_empty() || o.callers.iter().any(|&c| c == 0 || c > 4096) {
        die("--callers: counts in 1..=4096");
    }
    if o.sizes.iter().any(|&s| s > 8 << 20) {
        die("--sizes: at most 8 MiB");
    }
    if !(1..=100).contains(&o.rounds) || o.round > Duration::from_secs(10) {
        die("--rounds: 1..=100, --round-ms: at most 10000");
    }
    if o.masters.iter().any(|&m| !(1..=7).contains(&m)) {
        die("--masters: counts in 1..=7");
    }

    let started = Instant::now();
    let env = common::environment_line(&support::redis_server_binary());
    let date = common::utc_now();
    let mut report = format!(
        "## Hit-path bench ({date})\n\nCommand: `{}`  \nMachine: {env}.\n\n",
        o.command_line
    );
    if o.throughput {
        report.push_str(&throughput(&o));
    }
    if o.micro {
        report.push_str(&micro(&o));
    }
    report.push_str(&format!(
        "\nThe whole run took {:.0} s.\n",
        started.elapsed().as_secs_f64()
    ));
    println!("\n{report}");
    if !o.smoke {
        let path = common::write_report("hit_path.md", &report);
        eprintln!("hit_path: wrote {}", path.display());
    }
}

fn value(size: usize) -> String {
    "x".repeat(size)
}

/// The shapes of value the throughput comparison caches.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Shape {
    /// `String`.
    Str,
    /// `Vec<u8>` through `get_or_load` (serde sees a sequence of `u8`).
    Vec,
    /// `Vec<u8>` through `get_or_load_bytes`, the documented way to cache bytes.
    Bytes,
    /// A struct with a plain `Vec<u8>` field.
    Record,
    /// The same struct with its field marked `#[serde(with = "serde_bytes")]`.
    RecordBytes,
    /// A nested struct with collections (a `Vec` of structs with strings and
    /// numbers, and a map).
    Nested,
}

impl std::str::FromStr for Shape {
    type Err = String;

    fn from_str(s: &str) -> Result<Shape, String> {
        Ok(match s {
            "string" => Shape::Str,
            "vec" => Shape::Vec,
            "bytes" => Shape::Bytes,
            "record" => Shape::Record,
            "record-bytes" => Shape::RecordBytes,
            "nested" => Shape::Nested,
            _ => return Err(format!("unknown shape {s:?}")),
        })
    }
}

impl Shape {
    fn label(self) -> &'static str {
        match self {
            Shape::Str => "`String`",
            Shape::Vec => "`Vec<u8>`",
            Shape::Bytes => "bytes (`get_or_load_bytes`)",
            Shape::Record => "struct, `Vec<u8>` field",
            Shape::RecordBytes => "struct, `serde_bytes` field",
            Shape::Nested => "nested struct, collections",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Shape::Str => "s",
            Shape::Vec => "v",
            Shape::Bytes => "b",
            Shape::Record => "r",
            Shape::RecordBytes => "rb",
            Shape::Nested => "n",
        }
    }
}

#[derive(Serialize, Deserialize, Clone)]
struct Record {
    id: u64,
    name: String,
    body: Vec<u8>,
}

#[derive(Serialize, Deserialize, Clone)]
struct RecordBytes {
    id: u64,
    name: String,
    #[serde(with = "serde_bytes")]
    body: Vec<u8>,
}

#[derive(Serialize, Deserialize, Clone)]
struct Item {
    id: u64,
    name: String,
    tags: Vec<String>,
    scores: Vec<f32>,
}

#[derive(Serialize, Deserialize, Clone)]
struct Nested {
    items: Vec<Item>,
    index: BTreeMap<String, u32>,
}

fn blob(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i % 251) as u8).collect()
}

/// About `size` bytes encoded: items of about 60 bytes, each indexed by name.
fn nested(size: usize) -> Nested {
    let items: Vec<Item> = (0..(size / 72).max(1))
        .map(|i| Item {
            id: i as u64,
            name: format!("item-{i:05}"),
            tags: vec!["red".into(), "large".into(), format!("t{}", i % 7)],
            scores: vec![0.5, 1.5, i as f32],
        })
        .collect();
    let index = items
        .iter()
        .map(|item| (item.name.clone(), item.id as u32))
        .collect();
    Nested { items, index }
}

fn record_body(size: usize) -> Vec<u8> {
    blob(size.saturating_sub(16))
}

fn key(shape: Shape, size: usize, caller: usize) -> String {
    format!("{}{size}:{caller}", shape.tag())
}

/// Stores the `shape` value of `size` bytes under `key`.
async fn store(cache: &LockedCache, shape: Shape, size: usize, key: &str) {
    let stored = match shape {
        Shape::Str => cache.set(key, &value(size)).await,
        Shape::Vec => cache.set(key, &blob(size)).await,
        Shape::Bytes => cache.set_bytes(key, &blob(size)).await,
        Shape::Record => {
            let body = record_body(size);
            let name = "record".into();
            cache.set(key, &Record { id: 7, name, body }).await
        }
        Shape::RecordBytes => {
            let body = record_body(size);
            let name = "record".into();
            cache.set(key, &RecordBytes { id: 7, name, body }).await
        }
        Shape::Nested => cache.set(key, &nested(size)).await,
    };
    stored.expect("store value");
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    /// redis-rs `GET` on a connection from the shared bb8 pool (the checkout
    /// returned at once, as the cache does); bytes not decoded.
    Raw,
    /// redis-rs `GET` on one `ConnectionManager` (one multiplexed connection
    /// that reconnects by itself), shared by every caller.
    RawManager,
    /// redis-rs `GET` on one plain `MultiplexedConnection`, shared by every caller.
    RawSingle,
    /// `LockedCache::get`: one `GET` and decode, no flight.
    Get(Shape),
    /// `LockedCache::get_or_load` on a cached key.
    GetOrLoad(Shape),
    /// `get_or_load` of a `String` on a cache with tags on whose entries carry
    /// a tag (`Builder::tags`): each hit checks the entry's marks.
    Tagged,
}

impl std::str::FromStr for Side {
    type Err = String;

    /// The shape-independent part; shapes are filled in per row.
    fn from_str(s: &str) -> Result<Side, String> {
        Ok(match s {
            "manager" => Side::RawManager,
            "single" => Side::RawSingle,
            "get" => Side::Get(Shape::Str),
            "get_or_load" => Side::GetOrLoad(Shape::Str),
            "tagged" => Side::Tagged,
            _ => return Err(format!("unknown side {s:?}")),
        })
    }
}

impl Side {
    fn with_shape(self, shape: Shape) -> Side {
        match self {
            Side::Get(_) => Side::Get(shape),
            Side::GetOrLoad(_) => Side::GetOrLoad(shape),
            other => other,
        }
    }

    fn is_raw(self) -> bool {
        matches!(self, Side::Raw | Side::RawManager | Side::RawSingle)
    }

    fn label(self) -> String {
        match self {
            Side::Raw => "raw `GET` (bb8 pool)".into(),
            Side::RawManager => "raw `GET` (one `ConnectionManager`)".into(),
            Side::RawSingle => "raw `GET` (one `MultiplexedConnection`)".into(),
            Side::Get(shape) => format!("`get`, {}", shape.label()),
            Side::GetOrLoad(shape) => format!("`get_or_load`, {}", shape.label()),
            Side::Tagged => "`get_or_load`, `String`, tagged entry".into(),
        }
    }
}

/// One side of one round.
struct Measured {
    ops: u64,
    elapsed: Duration,
    /// Per-op latency, ns, sorted.
    latencies: Vec<u32>,
    /// CPU time used during the round by this process (the callers, the
    /// cache, redis-rs) and by the redis-server.
    cpu: Duration,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
}

/// The cache (on its own connections), the raw sides' connections, and the
/// server.
struct Bench {
    server: RedisServer,
    pool: bb8::Pool<RedisConnectionManager>,
    manager: ConnectionManager,
    single: MultiplexedConnection,
    cache: LockedCache,
    /// Tags on, every entry tagged (the `tagged` side).
    tagged: LockedCache,
}

/// A hit through `get_or_load`, decoded as `T`.
async fn hit<T: Serialize + DeserializeOwned + Send + 'static>(cache: &LockedCache, key: &str) {
    let v: T = cache
        .get_or_load(key, || async { Err::<T, &str>("a hit must not load") })
        .await
        .expect("cache hit");
    black_box(v);
}

/// A read through `LockedCache::get`, decoded as `T`.
async fn get<T: DeserializeOwned>(cache: &LockedCache, key: &str) {
    let v: Option<T> = cache.get(key).await.expect("cache get");
    black_box(v.expect("the value is stored"));
}

/// One caller's connections and key: what an operation of any side needs.
struct Caller {
    pool: bb8::Pool<RedisConnectionManager>,
    manager: ConnectionManager,
    single: MultiplexedConnection,
    cache: LockedCache,
    tagged: LockedCache,
    key: String,
    raw_key: String,
}

impl Caller {
    /// One operation of `side`.
    async fn op(&mut self, side: Side) {
        let (cache, key, raw_key) = (&self.cache, self.key.as_str(), self.raw_key.as_str());
        match side {
            Side::Raw => {
                let mut conn = checkout(&self.pool).await;
                let bytes: Option<Vec<u8>> = conn.get(raw_key).await.expect("raw GET");
                black_box(bytes.expect("the value is stored"));
            }
            Side::RawManager => {
                let bytes: Option<Vec<u8>> = self.manager.get(raw_key).await.expect("raw GET");
                black_box(bytes.expect("the value is stored"));
            }
            Side::RawSingle => {
                let bytes: Option<Vec<u8>> = self.single.get(raw_key).await.expect("raw GET");
                black_box(bytes.expect("the value is stored"));
            }
            Side::Get(shape) => match shape {
                Shape::Str => get::<String>(cache, key).await,
                Shape::Vec => get::<Vec<u8>>(cache, key).await,
                Shape::Bytes => {
                    let v = cache.get_bytes(key).await.expect("cache get");
                    black_box(v.expect("the value is stored"));
                }
                Shape::Record => get::<Record>(cache, key).await,
                Shape::RecordBytes => get::<RecordBytes>(cache, key).await,
                Shape::Nested => get::<Nested>(cache, key).await,
            },
            Side::Tagged => hit::<String>(&self.tagged, key).await,
            Side::GetOrLoad(shape) => match shape {
                Shape::Str => hit::<String>(cache, key).await,
                Shape::Vec => hit::<Vec<u8>>(cache, key).await,
                Shape::Bytes => {
                    let v = cache
                        .get_or_load_bytes(key, || async {
                            Err::<Vec<u8>, &str>("a hit must not load")
                        })
                        .await
                        .expect("cache hit");
                    black_box(v);
                }
                Shape::Record => hit::<Record>(cache, key).await,
                Shape::RecordBytes => hit::<RecordBytes>(cache, key).await,
                Shape::Nested => hit::<Nested>(cache, key).await,
            },
        }
    }
}

impl Bench {
    fn caller(&self, shape: Shape, size: usize, caller: usize) -> Caller {
        let key = key(shape, size, caller);
        Caller {
            pool: self.pool.clone(),
            manager: self.manager.clone(),
            single: self.single.clone(),
            cache: self.cache.clone(),
            tagged: self.tagged.clone(),
            raw_key: self.cache.value_key(&key),
            key,
        }
    }

    /// `callers` tasks call for `duration`; every task on its own key.
    async fn run(
        &self,
        side: Side,
        shape: Shape,
        callers: usize,
        size: usize,
        duration: Duration,
    ) -> Measured {
        let started = Instant::now();
        let deadline = started + duration;
        let tasks: Vec<_> = (0..callers)
            .map(|caller| {
                let mut caller = self.caller(shape, size, caller);
                tokio::spawn(async move {
                    let mut latencies = Vec::with_capacity(1 << 14);
                    while Instant::now() < deadline {
                        let t0 = Instant::now();
                        caller.op(side).await;
                        latencies.push(t0.elapsed().as_nanos().min(u32::MAX as u128) as u32);
                    }
                    (latencies, Instant::now())
                })
            })
            .collect();
        let mut all = Vec::new();
        let mut last = started;
        for task in tasks {
            let (latencies, ended) = task.await.expect("caller task");
            all.extend(latencies);
            last = last.max(ended);
        }
        all.sort_unstable();
        Measured {
            ops: all.len() as u64,
            elapsed: last - started,
            latencies: all,
            cpu: Duration::ZERO,
        }
    }

    /// One caller, the sides taking turns op by op for `duration`: each side's
    /// latencies, measured under the same conditions at the same moments
    /// (rounds of a whole side at a time are bimodal at 1 caller on this VM:
    /// a round lands in a fast or a slow phase of the host's scheduling).
    async fn alternate(
        &self,
        sides: &[(Side, Shape)],
        size: usize,
        duration: Duration,
    ) -> Vec<Vec<u32>> {
        let mut callers: Vec<Caller> = sides
            .iter()
            .map(|&(_, shape)| self.caller(shape, size, 0))
            .collect();
        let mut latencies = vec![Vec::with_capacity(1 << 16); sides.len()];
        let deadline = Instant::now() + duration;
        let mut turn = 0;
        while Instant::now() < deadline {
            // Rotate which side starts each cycle, so no side always follows another.
            for i in 0..sides.len() {
                let index = (turn + i) % sides.len();
                let t0 = Instant::now();
                callers[index].op(sides[index].0).await;
                latencies[index].push(t0.elapsed().as_nanos().min(u32::MAX as u128) as u32);
            }
            turn += 1;
        }
        latencies
    }

    /// CPU time used so far by this process and the redis-server.
    fn cpu(&self) -> Duration {
        let info: String = self.server.query(&["INFO", "cpu"]);
        common::process_cpu_time() + common::redis_cpu_time(&info)
    }

    /// Every command since the last reset except the harness's own.
    fn commands(&self) -> u64 {
        self.server
            .command_stats()
            .iter()
            .filter(|(name, _)| {
                let base = name.split('|').next().unwrap_or(name);
                base != "info" && base != "config"
            })
            .map(|(_, n)| n)
            .sum()
    }
}

/// A clone of a pooled multiplexed connection, the checkout returned at once:
/// what the cache does with a pool given by `.redis_pool(..)`.
async fn checkout(pool: &bb8::Pool<RedisConnectionManager>) -> MultiplexedConnection {
    let conn = pool.get().await.expect("pool checkout");
    (*conn).clone()
}

/// Every round of one side.
#[derive(Default)]
struct SideRuns {
    runs: Vec<Measured>,
    /// Server commands during these rounds.
    commands: u64,
}

impl SideRuns {
    fn ops(&self) -> u64 {
        self.runs.iter().map(|m| m.ops).sum()
    }

    fn median_rate(&self) -> f64 {
        median(&mut self.runs.iter().map(Measured::rate).collect::<Vec<_>>())
    }

    fn commands_per_op(&self) -> f64 {
        self.commands as f64 / self.ops().max(1) as f64
    }

    /// Latency percentile over every op of every round, µs.
    fn latency(&self, p: f64) -> String {
        let mut all: Vec<u32> = self
            .runs
            .iter()
            .flat_map(|m| m.latencies.iter().copied())
            .collect();
        all.sort_unstable();
        format!("{:.0}", f64::from(percentile(&all, p)) / 1000.0)
    }

    /// CPU time (this process + redis-server) per operation over every
    /// round, µs.
    fn cpu_per_op(&self) -> f64 {
        let cpu: Duration = self.runs.iter().map(|m| m.cpu).sum();
        cpu.as_secs_f64() * 1e6 / self.ops().max(1) as f64
    }

    /// Per round: this side's ops/s ÷ the raw side's, sorted.
    fn ratios(&self, raw: &SideRuns) -> Vec<f64> {
        let mut ratios: Vec<f64> = self
            .runs
            .iter()
            .zip(&raw.runs)
            .map(|(m, r)| m.rate() / r.rate())
            .collect();
        ratios.sort_by(f64::total_cmp);
        ratios
    }
}

/// One configuration: the raw side first, then the others.
struct Row {
    callers: usize,
    size: usize,
    sides: Vec<(Side, SideRuns)>,
    /// At 1 caller: each side's latencies (ns) with the sides taking turns op
    /// by op, in the order of `sides`.
    alternated: Option<Vec<Vec<u32>>>,
}

/// Mean of latencies in ns.
fn mean(latencies: &[u32]) -> f64 {
    latencies.iter().map(|&l| f64::from(l)).sum::<f64>() / latencies.len().max(1) as f64
}

/// The sides of every configuration: the raw `GET` first, then the connection
/// baselines asked for, then each cache side for each shape.
fn sides(o: &Options) -> Vec<(Side, Shape)> {
    let mut sides = vec![(Side::Raw, Shape::Str)];
    for &side in &o.sides {
        if side.is_raw() {
            sides.push((side, Shape::Str));
        }
    }
    for &shape in &o.shapes {
        for &side in &o.sides {
            if !side.is_raw() {
                sides.push((side.with_shape(shape), shape));
            }
        }
    }
    sides
}

fn throughput(o: &Options) -> String {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.threads)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let server = RedisServer::start();
    let url = server.url();
    let bench = runtime.block_on(async {
        // The raw sides' sockets, with the cache's TCP_NODELAY unless told
        // otherwise: the comparison is of the code, not of socket options.
        let info = common::raw_connection_info(&url, o.raw_nodelay);
        let manager = RedisConnectionManager::new(info.clone()).expect("manager");
        let pool = bb8::Pool::builder()
            .max_size(DEFAULT_POOL_SIZE)
            .test_on_check_out(false)
            .build(manager)
            .await
            .expect("pool");
        let cache = LockedCache::builder()
            .redis(url.as_str())
            .key_prefix("hit:")
            .ttl(Duration::from_secs(3600))
            .build()
            .await
            .expect("cache");
        let tagged = LockedCache::builder()
            .redis(url.as_str())
            .key_prefix("hit-tagged:")
            .ttl(Duration::from_secs(3600))
            .tags(true)
            .call_options(locked_cache::CallOptions::new().tag("bench"))
            .build()
            .await
            .expect("tagged cache");
        let client = redis::Client::open(info).expect("client");
        let manager = ConnectionManager::new(client.clone())
            .await
            .expect("connection manager");
        let single = client
            .get_multiplexed_async_connection()
            .await
            .expect("connection");
        let max_callers = o.callers.iter().copied().max().unwrap_or(1);
        for &size in &o.sizes {
            for &shape in &o.shapes {
                for caller in 0..max_callers {
                    store(&cache, shape, size, &key(shape, size, caller)).await;
                }
            }
            if o.sides.contains(&Side::Tagged) {
                for caller in 0..max_callers {
                    store(&tagged, Shape::Str, size, &key(Shape::Str, size, caller)).await;
                }
            }
            // The raw sides read the string values (one per shape would do).
            if !o.shapes.contains(&Shape::Str) {
                for caller in 0..max_callers {
                    store(&cache, Shape::Str, size, &key(Shape::Str, size, caller)).await;
                }
            }
        }
        Bench {
            server,
            pool,
            manager,
            single,
            cache,
            tagged,
        }
    });

    let sides = sides(o);
    let mut rows = Vec::new();
    for &callers in &o.callers {
        for &size in &o.sizes {
            eprintln!("hit_path: {callers} caller(s), {size} B...");
            let row = runtime.block_on(async {
                // Warm-up: connections opened, allocator and caches warm.
                for &(side, shape) in &sides {
                    bench.run(side, shape, callers, size, o.round / 2).await;
                }
                let mut runs: Vec<SideRuns> = sides.iter().map(|_| SideRuns::default()).collect();
                for round in 0..o.rounds {
                    // Each side goes first, second and last equally often.
                    for i in 0..sides.len() {
                        let index = (round + i) % sides.len();
                        let (side, shape) = sides[index];
                        bench.server.reset_stats();
                        let cpu_before = bench.cpu();
                        let mut m = bench.run(side, shape, callers, size, o.round).await;
                        m.cpu = bench.cpu().saturating_sub(cpu_before);
                        runs[index].commands += bench.commands();
                        runs[index].runs.push(m);
                    }
                }
                // One caller: also the sides op by op, for as long as the rounds took.
                let alternated = if callers == 1 {
                    let duration = o.round * (o.rounds * sides.len()) as u32;
                    Some(bench.alternate(&sides, size, duration).await)
                } else {
                    None
                };
                Row {
                    callers,
                    size,
                    sides: sides.iter().map(|&(side, _)| side).zip(runs).collect(),
                    alternated,
                }
            });
            rows.push(row);
        }
    }
    drop(bench);
    render_throughput(o, &rows)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return 0.0;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn size_label(size: usize) -> String {
    if size >= 1024 && size & 1023 == 0 {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}

fn render_throughput(o: &Options, rows: &[Row]) -> String {
    let mut t = Table::new(&[
        "callers",
        "value",
        "side",
        "ops/s",
        "÷ raw GET [min–max]",
        "÷ one connection",
        "p50 / p99 µs",
        "commands per op",
        "CPU µs per op",
        "CPU: raw GET ÷ side / one connection ÷ side",
    ]);
    let mut targets = String::new();
    for r in rows {
        let raw = &r.sides[0].1;
        let single = r
            .sides
            .iter()
            .find(|(side, _)| *side == Side::RawSingle)
            .map(|(_, runs)| runs);
        for (side, runs) in &r.sides {
            let mut ratios = runs.ratios(raw);
            let (lo, hi) = (
                ratios.first().copied().unwrap_or(0.0),
                ratios.last().copied().unwrap_or(0.0),
            );
            let ratio = median(&mut ratios);
            t.row(vec![
                r.callers.to_string(),
                size_label(r.size),
                side.label(),
                format!("{:.0}", runs.median_rate()),
                if *side == Side::Raw {
                    "1".to_owned()
                } else {
                    format!("{ratio:.3} [{lo:.2}–{hi:.2}]")
                },
                single.map_or("–".to_owned(), |single| {
                    format!("{:.3}", median(&mut runs.ratios(single)))
                }),
                format!("{} / {}", runs.latency(50.0), runs.latency(99.0)),
                format!("{:.3}", runs.commands_per_op()),
                format!("{:.2}", runs.cpu_per_op()),
                format!(
                    "{:.3}{}",
                    raw.cpu_per_op() / runs.cpu_per_op(),
                    single.map_or(String::new(), |single| format!(
                        " / {:.3}",
                        single.cpu_per_op() / runs.cpu_per_op()
                    ))
                ),
            ]);
            if r.size == 1024
                && matches!(
                    side,
                    Side::GetOrLoad(Shape::Str) | Side::GetOrLoad(Shape::Bytes)
                )
            {
                // Against the strongest raw side measured: the bb8 pool, or
                // one connection (what the cache itself sends on). At one
                // caller, from the sides taken op by op.
                let (vs_pool, vs_single) = match &r.alternated {
                    Some(alternated) => {
                        let at = |s: Side| r.sides.iter().position(|(x, _)| *x == s);
                        let of = |i: Option<usize>| i.map(|i| mean(&alternated[i]));
                        let this = of(at(*side)).unwrap_or(f64::NAN);
                        (
                            of(at(Side::Raw)).unwrap_or(f64::NAN) / this,
                            of(at(Side::RawSingle)).map(|raw| raw / this),
                        )
                    }
                    None => (ratio, single.map(|single| median(&mut runs.ratios(single)))),
                };
                let judged = vs_single.map_or(vs_pool, |v| v.min(vs_pool));
                let how = if r.alternated.is_some() {
                    "op by op"
                } else {
                    "median of rounds"
                };
                // The same from CPU time per op (this process + the
                // server), which the host's scheduling moves far less than
                // wall time: on a machine both share, throughput ratio.
                let cpu = format!(
                    "; by CPU per op {:.3}{}",
                    raw.cpu_per_op() / runs.cpu_per_op(),
                    single.map_or(String::new(), |single| format!(
                        " / {:.3}",
                        single.cpu_per_op() / runs.cpu_per_op()
                    ))
                );
                targets.push_str(&format!(
                    "- Target L2 hit ≥ 0.95× raw GET, {}, {} caller(s), 1 KiB ({how}): ÷ pooled raw GET {vs_pool:.3}{}{cpu} — {}\n",
                    side.label(),
                    r.callers,
                    vs_single.map_or(String::new(), |v| format!(", ÷ one raw connection {v:.3}")),
                    if judged >= 0.95 {
                        "met".to_owned()
                    } else {
                        format!("**missed** by {:.1} points", (0.95 - judged) * 100.0)
                    }
                ));
            }
        }
    }
    let mut out = format!(
        "### Hits vs raw redis-rs `GET`, same server\n\n\
         {} rounds of {} ms per side and configuration, the sides in rotating order; {} tokio \
         worker threads; one redis-server; each caller on its own key; coalescing on (it never \
         merges: one key per caller). ops/s are medians over rounds; *÷ raw GET* = median over \
         rounds of the side ÷ the raw `GET` on the bb8 pool in the same round (min–max of the \
         rounds in brackets); *÷ one connection* the same against the raw `GET` on one \
         `MultiplexedConnection` (when measured). The raw sides return the bytes undecoded: \
         the bare round trip. The cache runs on its own connections (`.redis(url)`). *CPU µs \
         per op*: CPU time this process (callers, cache, redis-rs) and the redis-server used \
         during the side's rounds, per op; its ratios (raw ÷ side: above 1 means the side \
         costs less) estimate the throughput ratio where the client and Redis share the \
         CPUs, and move far less with the host's scheduling than the ops/s do.\n\n",
        o.rounds,
        o.round.as_millis(),
        o.threads
    );
    out.push_str(&t.markdown());
    out.push_str(
        "\n*Commands per op*: every command the server counted during the side's rounds \
         (`PING`, `HELLO`, `CLIENT` included; only the harness's `INFO`/`CONFIG` left out) \
         divided by the operations.\n\n",
    );
    for r in rows {
        let Some(alternated) = &r.alternated else {
            continue;
        };
        let mut a = Table::new(&[
            "value",
            "side",
            "ops",
            "mean µs",
            "p50 / p99 µs",
            "÷ raw GET",
            "÷ one connection",
        ]);
        let at = |s: Side| r.sides.iter().position(|(x, _)| *x == s);
        let raw = at(Side::Raw).map(|i| mean(&alternated[i]));
        let single = at(Side::RawSingle).map(|i| mean(&alternated[i]));
        for ((side, _), latencies) in r.sides.iter().zip(alternated) {
            let m = mean(latencies);
            let mut sorted = latencies.clone();
            sorted.sort_unstable();
            a.row(vec![
                size_label(r.size),
                side.label(),
                latencies.len().to_string(),
                format!("{:.1}", m / 1000.0),
                format!(
                    "{:.0} / {:.0}",
                    percentile(&sorted, 50.0) as f64 / 1000.0,
                    percentile(&sorted, 99.0) as f64 / 1000.0
                ),
                raw.map_or("–".to_owned(), |raw| format!("{:.3}", raw / m)),
                single.map_or("–".to_owned(), |single| format!("{:.3}", single / m)),
            ]);
        }
        out.push_str(&format!(
            "\n1 caller, the sides taking turns op by op for as long as the rounds took \
             (each side measured at the same moments: whole rounds are bimodal at one caller \
             on this VM); ratios are of mean latencies, which at one caller is the ratio of \
             throughputs:\n\n{}\n",
            a.markdown()
        ));
    }
    out.push('\n');
    out.push_str(&targets);
    out.push('\n');
    out
}

/// Criterion groups; returns the markdown table built from criterion's estimates.
fn micro(o: &Options) -> String {
    let out_dir = common::report_dir().join("criterion");
    let mut c = if o.smoke {
        Criterion::default()
            .warm_up_time(Duration::from_millis(50))
            .measurement_time(Duration::from_millis(100))
            .sample_size(10)
    } else {
        Criterion::default()
            .warm_up_time(Duration::from_millis(800))
            .measurement_time(Duration::from_secs(2))
            .sample_size(40)
    }
    .without_plots()
    .output_directory(&out_dir);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut ids: Vec<(String, String)> = Vec::new();

    {
        let mut g = c.benchmark_group("codec");
        for &size in &o.sizes {
            let v = value(size);
            let bytes = encode(&BincodeCodec, &v).expect("encode");
            g.throughput(Throughput::Bytes(size as u64));
            g.bench_with_input(BenchmarkId::new("encode", size), &v, |b, v| {
                b.iter(|| encode(&BincodeCodec, black_box(v)).expect("encode"))
            });
            g.bench_with_input(BenchmarkId::new("decode", size), &bytes, |b, bytes| {
                b.iter(|| decode::<_, String>(&BincodeCodec, black_box(bytes)).expect("decode"))
            });
            ids.push((
                format!("codec/encode/{size}"),
                format!("encode, {}", size_label(size)),
            ));
            ids.push((
                format!("codec/decode/{size}"),
                format!("decode, {}", size_label(size)),
            ));
            // Bytes: as a `Vec<u8>` (a sequence of `u8`s to serde) and as a
            // byte buffer (`serde_bytes`, what `get_or_load_bytes` uses): the
            // same stored bytes.
            let blob_bytes = encode(&BincodeCodec, &blob(size)).expect("encode");
            g.bench_with_input(
                BenchmarkId::new("decode_vec_u8", size),
                &blob_bytes,
                |b, bytes| {
                    b.iter(|| {
                        decode::<_, Vec<u8>>(&BincodeCodec, black_box(bytes)).expect("decode")
                    })
                },
            );
            g.bench_with_input(
                BenchmarkId::new("decode_byte_buf", size),
                &blob_bytes,
                |b, bytes| {
                    b.iter(|| {
                        decode::<_, serde_bytes::ByteBuf>(&BincodeCodec, black_box(bytes))
                            .expect("decode")
                    })
                },
            );
            ids.push((
                format!("codec/decode_vec_u8/{size}"),
                format!("decode `Vec<u8>`, {}", size_label(size)),
            ));
            ids.push((
                format!("codec/decode_byte_buf/{size}"),
                format!("decode bytes (`serde_bytes`), {}", size_label(size)),
            ));
        }
        g.finish();
    }

    {
        let cache = runtime.block_on(async {
            let cache = LockedCache::builder().build().await.expect("memory cache");
            cache.set("k", &value(1024)).await.expect("set");
            cache
        });
        let mut g = c.benchmark_group("memory_store");
        g.bench_function(BenchmarkId::new("get_or_load_hit", 1024), |b| {
            b.iter_custom(|iters| {
                runtime.block_on(async {
                    let started = Instant::now();
                    for _ in 0..iters {
                        let v: String = cache
                            .get_or_load("k", || async { Err::<String, &str>("must not load") })
                            .await
                            .expect("hit");
                        black_box(v);
                    }
                    started.elapsed()
                })
            })
        });
        g.finish();
        ids.push((
            "memory_store/get_or_load_hit/1024".into(),
            "in-memory store: get_or_load hit, 1 KiB".into(),
        ));
    }

    let max_masters = o.masters.iter().copied().max().unwrap_or(1);
    let fleet = Fleet::start(max_masters);
    let urls = fleet.urls();
    let setups: Vec<LockSetup> = o
        .masters
        .iter()
        .map(|&n| runtime.block_on(LockSetup::new(&urls[..n])))
        .collect();
    {
        let mut g = c.benchmark_group("lock");
        for setup in &setups {
            let n = setup.conns.len();
            g.bench_with_input(BenchmarkId::new("raw_set_nx", n), &n, |b, _| {
                b.iter_custom(|iters| {
                    runtime.block_on(async {
                        let mut timed = Duration::ZERO;
                        for _ in 0..iters {
                            timed += setup.raw_set_nx().await;
                        }
                        timed
                    })
                })
            });
            g.bench_with_input(BenchmarkId::new("acquire", n), &n, |b, _| {
                b.iter_custom(|iters| {
                    runtime.block_on(async {
                        let mut timed = Duration::ZERO;
                        for _ in 0..iters {
                            timed += setup.acquire().await;
                        }
                        timed
                    })
                })
            });
            g.bench_with_input(BenchmarkId::new("acquire_release", n), &n, |b, _| {
                b.iter_custom(|iters| {
                    runtime.block_on(async {
                        let started = Instant::now();
                        for _ in 0..iters {
                            let guard = setup.lock.acquire("lock.bench").await.expect("acquire");
                            guard.release().await.expect("release");
                        }
                        started.elapsed()
                    })
                })
            });
            let s = if n == 1 { "" } else { "s" };
            ids.push((
                format!("lock/raw_set_nx/{n}"),
                format!("floor: raw redis-rs `SET NX PX` to {n} server{s} in parallel"),
            ));
            ids.push((
                format!("lock/acquire/{n}"),
                format!("lock acquire, {n} master{s}"),
            ));
            ids.push((
                format!("lock/acquire_release/{n}"),
                format!("lock acquire + release, {n} master{s}"),
            ));
        }
        g.finish();
    }
    let interleaved = runtime.block_on(lock_interleaved(o, &setups));
    drop(setups);
    drop(fleet);
    c.final_summary();

    let mut t = Table::new(&["benchmark", "median", "mean [95% CI]"]);
    for (id, label) in &ids {
        let Some(e) = estimates(&out_dir, id) else {
            t.row(vec![label.clone(), "?".into(), "?".into()]);
            continue;
        };
        t.row(vec![
            label.clone(),
            duration_label(e.median),
            format!(
                "{} [{} – {}]",
                duration_label(e.mean),
                duration_label(e.mean_lo),
                duration_label(e.mean_hi)
            ),
        ]);
    }
    let mut out = String::from(
        "### Micro benchmarks (criterion)\n\n\
         Codec: bincode with the locked-cache header, `String` values unless said. Lock: `Redlock` with \
         default options on loopback redis-servers; *acquire* times only the acquisition \
         (the release runs untimed between iterations).\n\n",
    );
    out.push_str(&t.markdown());
    out.push('\n');
    out.push_str(&interleaved);
    out
}

/// A Redlock over the first N servers, and plain redis-rs connections to the
/// same servers for the floor.
struct LockSetup {
    lock: Redlock,
    conns: Vec<MultiplexedConnection>,
}

impl LockSetup {
    async fn new(urls: &[String]) -> LockSetup {
        let masters: Vec<&str> = urls.iter().map(String::as_str).collect();
        let lock = Redlock::connect(&masters, LockOptions::default())
            .await
            .expect("redlock");
        let mut conns = Vec::new();
        for url in urls {
            let client = redis::Client::open(url.as_str()).expect("client");
            conns.push(
                client
                    .get_multiplexed_async_connection()
                    .await
                    .expect("connection"),
            );
        }
        let setup = LockSetup { lock, conns };
        // Warm the pools (and load the release script) outside the measurement.
        for _ in 0..8 {
            setup.acquire().await;
            setup.raw_set_nx().await;
        }
        setup
    }

    /// One acquisition, timed; the release runs untimed.
    async fn acquire(&self) -> Duration {
        let started = Instant::now();
        let guard = self.lock.acquire("lock.bench").await.expect("acquire");
        let took = started.elapsed();
        guard.release().await.expect("release");
        took
    }

    /// The floor: `SET NX PX` from plain redis-rs to every server in parallel,
    /// timed; the keys are deleted untimed.
    async fn raw_set_nx(&self) -> Duration {
        let started = Instant::now();
        let answers = futures_util::future::join_all(self.conns.iter().map(|c| {
            let mut c = c.clone();
            async move {
                redis::cmd("SET")
                    .arg("lock.raw")
                    .arg("token")
                    .arg("NX")
                    .arg("PX")
                    .arg(5000)
                    .query_async::<Option<String>>(&mut c)
                    .await
            }
        }))
        .await;
        let took = started.elapsed();
        for (answer, c) in answers.into_iter().zip(&self.conns) {
            assert!(answer.expect("SET NX").is_some(), "raw lock was taken");
            let _: i64 = c.clone().del("lock.raw").await.expect("DEL");
        }
        took
    }
}

/// Lock acquire latency on every master count, and its floor, measured
/// interleaved: each round runs a batch of each (rotating order), so that a
/// slow spell of the machine hits all of them alike. The ratio to one master is
/// the median over rounds of the per-round ratio of batch medians.
async fn lock_interleaved(o: &Options, setups: &[LockSetup]) -> String {
    let (rounds, batch) = if o.smoke { (3, 20) } else { (30, 100) };
    // [setup][0 = acquire, 1 = raw] -> per-round batch medians, ns.
    let mut medians = vec![[Vec::new(), Vec::new()]; setups.len()];
    let mut all = vec![[Vec::new(), Vec::new()]; setups.len()];
    let jobs: Vec<(usize, usize)> = (0..setups.len()).flat_map(|i| [(i, 0), (i, 1)]).collect();
    for round in 0..rounds {
        for k in 0..jobs.len() {
            let (i, kind) = jobs[(round + k) % jobs.len()];
            let mut samples = Vec::with_capacity(batch);
            for _ in 0..batch {
                let took = if kind == 0 {
                    setups[i].acquire().await
                } else {
                    setups[i].raw_set_nx().await
                };
                samples.push(took.as_nanos() as f64);
            }
            all[i][kind].extend_from_slice(&samples);
            medians[i][kind].push(median(&mut samples));
        }
    }
    let mut t = Table::new(&[
        "masters",
        "acquire p50",
        "acquire p90",
        "floor p50",
        "acquire ÷ 1 master [min–max of rounds]",
        "floor ÷ 1 server",
    ]);
    let ratio_to_first = |i: usize, kind: usize| -> (f64, f64, f64) {
        let mut r: Vec<f64> = medians[i][kind]
            .iter()
            .zip(&medians[0][kind])
            .map(|(a, b)| a / b)
            .collect();
        r.sort_by(f64::total_cmp);
        let (lo, hi) = (r[0], r[r.len() - 1]);
        (median(&mut r), lo, hi)
    };
    let mut out = String::new();
    for (i, setup) in setups.iter().enumerate() {
        let n = setup.conns.len();
        let pct = |kind: usize, p: f64| {
            let mut v = all[i][kind].clone();
            v.sort_by(f64::total_cmp);
            duration_label(v[((v.len() as f64 * p) as usize).min(v.len() - 1)])
        };
        let (ratio, lo, hi) = ratio_to_first(i, 0);
        let (floor, _, _) = ratio_to_first(i, 1);
        t.row(vec![
            n.to_string(),
            pct(0, 0.5),
            pct(0, 0.9),
            pct(1, 0.5),
            format!("{ratio:.2} [{lo:.2}–{hi:.2}]"),
            format!("{floor:.2}"),
        ]);
        if n == 3 && setups[0].conns.len() == 1 {
            out = format!(
                "- Target lock acquire on 3 masters ≤ 1.3× 1 master (interleaved): {ratio:.2}× — {}; \
                 the floor (plain redis-rs `SET NX` to 3 servers in parallel ÷ to 1) is {floor:.2}× \
                 on this machine.\n",
                if ratio <= 1.3 {
                    "met".to_owned()
                } else {
                    format!("**missed** by {:.0}%", (ratio / 1.3 - 1.0) * 100.0)
                }
            );
        }
    }
    format!(
        "\n#### Lock acquire, interleaved ({rounds} rounds × {batch} acquisitions per master count)\n\n\
         Criterion runs its benchmarks one after the other, so a slow spell of a shared machine \
         lands on one master count; here every round measures each, and the ratios are per round.\n\n{}\n{out}",
        t.markdown()
    )
}

struct Estimate {
    median: f64,
    mean: f64,
    mean_lo: f64,
    mean_hi: f64,
}

/// Criterion's point estimates (ns) for `id`, from its `new/estimates.json`.
fn estimates(dir: &std::path::Path, id: &str) -> Option<Estimate> {
    let path = dir.join(id).join("new").join("estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let get = |stat: &str, field: &str| -> Option<f64> {
        match field {
            "point" => json[stat]["point_estimate"].as_f64(),
            bound => json[stat]["confidence_interval"][bound].as_f64(),
        }
    };
    Some(Estimate {
        median: get("median", "point")?,
        mean: get("mean", "point")?,
        mean_lo: get("mean", "lower_bound")?,
        mean_hi: get("mean", "upper_bound")?,
    })
}

fn duration_label(ns: f64) -> String {
    if ns < 0.0 {
        return format!("−{}", duration_label(-ns));
    }
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}
