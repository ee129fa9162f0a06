//! One worker process of the stampede bench: M tokio tasks released at the
//! coordinator's instant, each calling `get_or_load` (or the unprotected
//! GET/load/SET), timed one by one.
//!
//! Protocol on stdio: the worker builds its cache, warms it up (pools opened,
//! scripts loaded) and prints `READY`; the coordinator answers `GO <unix µs>`
//! once every worker is ready and the servers' command statistics are reset;
//! the worker prints `RESULT <json>` and exits.

use std::cell::Cell;
use std::io::{BufRead, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use locked_cache::codec::{self, BincodeCodec};
use locked_cache::{ConnectionOptions, LockedCache, RedisStore, SharedStore, Store};
use redis::aio::MultiplexedConnection;

use crate::common::{Zipf, unix_micros};
use crate::support::store::{Hook, Observed, Op};
use crate::{Counters, Scenario, Strategy, WorkerConfig, WorkerReport};

tokio::task_local! {
    /// What one caller did: Redis commands sent on its behalf, and whether its
    /// own loader ran.
    static METER: Meter;
}

#[derive(Default)]
struct Meter {
    /// Store operations sent from the caller's own task, by index into [`OPS`].
    ops: [Cell<u32>; OPS.len()],
    loaded: Cell<bool>,
}

impl Meter {
    fn op(&self, op: usize) -> u32 {
        self.ops[op].get()
    }

    /// Commands sent on this caller's behalf, with `masters` lock masters;
    /// returns (all, of which lock commands).
    ///
    /// The lock may send its commands (`SET NX`, the release script) from tasks
    /// of its own (so that a cancelled caller leaves no lock behind), out of the
    /// caller's task-local reach. So the value commands are counted in the
    /// caller's task, and the lock commands inferred from the cache's loop: the
    /// first read, then per attempt either a wait and a read (held) or the double
    /// check under the lock (acquired), which is released once. Hence attempts =
    /// reads − 1 + double checks, releases = double checks, each sent to every
    /// master. The sum over callers is checked against the process-wide counts.
    fn commands(&self, masters: u32) -> (u32, u32) {
        let value = [GET, SET, DELETE, GET_OR_FENCE, SET_FENCED]
            .iter()
            .map(|&op| self.op(op))
            .sum::<u32>();
        let (reads, fences) = (self.op(GET), self.op(GET_OR_FENCE));
        let attempts = if reads == 0 { 0 } else { reads - 1 + fences };
        let lock = masters * (attempts + fences);
        (value + lock, lock)
    }
}

/// Runs the worker described by `config_json` and exits the process.
pub fn main(config_json: &str) -> ! {
    let config: WorkerConfig = serde_json::from_str(config_json)
        .unwrap_or_else(|e| fail(&format!("bad worker config: {e}")));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads.max(1))
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&format!("tokio runtime: {e}")));
    let report = runtime.block_on(run(config));
    let mut out = std::io::stdout().lock();
    let line = serde_json::to_string(&report).expect("serialize report");
    let _ = writeln!(out, "RESULT {line}");
    let _ = out.flush();
    drop(out);
    runtime.shutdown_timeout(Duration::from_millis(100));
    std::process::exit(0);
}

fn fail(message: &str) -> ! {
    eprintln!("stampede worker {}: {message}", std::process::id());
    std::process::exit(1);
}

/// Everything one call needs, shared by the tasks of the process.
struct Ctx {
    config: WorkerConfig,
    /// The cache, for the protected strategies.
    cache: Option<LockedCache>,
    /// The value store (first master) as seen by the unprotected strategy.
    store: SharedStore,
    /// A connection of its own for the loader's run counter (bookkeeping,
    /// not counted as the strategy's commands).
    counter: MultiplexedConnection,
    loads_key: String,
    value: String,
    ttl: Duration,
}

async fn run(config: WorkerConfig) -> WorkerReport {
    let counts = Arc::new(OpCounts::default());
    let stores: Vec<Arc<Observed>> = config
        .urls
        .iter()
        .map(|url| {
            let inner = RedisStore::open(url, ConnectionOptions::default())
                .unwrap_or_else(|e| fail(&format!("open {url}: {e}")));
            Arc::new(counting_store(inner, &counts))
        })
        .collect();
    let ttl = match config.scenario {
        Scenario::Cold => Duration::from_secs(60),
        Scenario::Zipf { ttl_ms, .. } => Duration::from_millis(ttl_ms),
    };
    let cache = match config.strategy {
        Strategy::NoProtection => None,
        Strategy::PollingOnly | Strategy::AllOn => {
            let mut builder = LockedCache::builder()
                .key_prefix(config.prefix.clone())
                .ttl(ttl)
                .retry_time(Duration::from_millis(config.retry_ms));
            for store in &stores {
                builder = builder.store(Arc::clone(store) as SharedStore);
            }
            if config.strategy == Strategy::PollingOnly {
                builder = builder.wake_ups(false).coalesce(false);
            }
            Some(
                builder
                    .build()
                    .await
                    .unwrap_or_else(|e| fail(&format!("build cache: {e}"))),
            )
        }
    };
    let counter = redis::Client::open(config.urls[0].as_str())
        .unwrap_or_else(|e| fail(&format!("counter client: {e}")))
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| fail(&format!("counter connection: {e}")));
    let ctx = Arc::new(Ctx {
        loads_key: format!("{}bench:loads", config.prefix),
        value: "v".repeat(config.value_bytes),
        cache,
        store: Arc::clone(&stores[0]) as SharedStore,
        counter,
        ttl,
        config,
    });

    warm_up(&ctx, &stores).await;
    println!("READY");
    let _ = std::io::stdout().flush();
    let start_us = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).ok()?;
        line.trim().strip_prefix("GO ")?.parse::<u64>().ok()
    })
    .await
    .ok()
    .flatten()
    .unwrap_or_else(|| fail("no GO from the coordinator"));
    let start = Instant::now() + Duration::from_micros(start_us.saturating_sub(unix_micros()));

    let before = counts.snapshot();
    let stats_before = cache_counters(&ctx);
    let deadline = Duration::from_secs(ctx.config.deadline_s);
    let mut report = match tokio::time::timeout(deadline, measure(&ctx, start, start_us)).await {
        Ok(report) => report,
        Err(_) => fail(&format!("did not finish within {deadline:?}")),
    };
    let after = counts.snapshot();
    report.client_commands = after
        .into_iter()
        .zip(before)
        .map(|((name, a), (_, b))| (name.to_owned(), a - b))
        .filter(|(_, n)| *n > 0)
        .collect();
    report.cache = cache_counters(&ctx).since(&stats_before);
    report
}

/// The cache's counters now (all zero for the unprotected strategy).
fn cache_counters(ctx: &Ctx) -> Counters {
    let Some(cache) = &ctx.cache else {
        return Counters::default();
    };
    let s = cache.stats();
    Counters {
        hits: s.hits,
        misses: s.misses,
        loads: s.loads,
        coalesced: s.coalesced,
        lock_attempts: s.lock_attempts,
        lock_timeouts: s.lock_timeouts,
        wakeups: s.wakeups,
    }
}

/// Opens the pools' connections and loads the Lua scripts, as a process that
/// has served traffic before would have: a miss on a key of its own (lock,
/// double check, fenced store, release), then concurrent reads on every master.
async fn warm_up(ctx: &Arc<Ctx>, stores: &[Arc<Observed>]) {
    let key = format!("warm:{}", ctx.config.worker_index);
    let counter = format!("{}bench:warm-up-loads", ctx.config.prefix);
    if let Err(e) = call(ctx, &key, &counter).await {
        fail(&format!("warm-up call: {e}"));
    }
    for store in stores {
        let reads = (0..32).map(|_| {
            let store = Arc::clone(store);
            tokio::spawn(async move { store.get("warm:none").await })
        });
        for read in futures_util::future::join_all(reads).await {
            if let Err(e) = read.expect("warm-up task") {
                fail(&format!("warm-up read: {e}"));
            }
        }
    }
}

/// One `get_or_load` (or unprotected GET, load, SET) of `key`; the loader
/// counts its runs under `counter`.
async fn call(ctx: &Ctx, key: &str, counter: &str) -> Result<String, String> {
    let loader = || async {
        let _ = METER.try_with(|m| m.loaded.set(true));
        let mut connection = ctx.counter.clone();
        redis::cmd("INCR")
            .arg(counter)
            .query_async::<i64>(&mut connection)
            .await?;
        tokio::time::sleep(Duration::from_millis(ctx.config.load_ms)).await;
        Ok::<_, redis::RedisError>(ctx.value.clone())
    };
    match &ctx.cache {
        Some(cache) => cache
            .get_or_load(key, loader)
            .await
            .map_err(|e| e.to_string()),
        None => {
            let value_key = format!("{}{key}", ctx.config.prefix);
            if let Some(bytes) = ctx.store.get(&value_key).await.map_err(|e| e.to_string())? {
                return codec::decode(&BincodeCodec, &bytes).map_err(|e| e.to_string());
            }
            let value = loader().await.map_err(|e| e.to_string())?;
            let bytes = codec::encode(&BincodeCodec, &value).map_err(|e| e.to_string())?;
            ctx.store
                .set(&value_key, &bytes, ctx.ttl)
                .await
                .map_err(|e| e.to_string())?;
            Ok(value)
        }
    }
}

/// A call measured: latency, commands, whether it loaded.
struct Measured {
    latency: Duration,
    commands: u32,
    /// Of `commands`, the lock commands inferred from the cache's loop.
    lock_commands: u32,
    loaded: bool,
    error: Option<String>,
}

async fn measured_call(ctx: &Ctx, key: &str) -> Measured {
    let started = Instant::now();
    METER
        .scope(Meter::default(), async {
            let result = call(ctx, key, &ctx.loads_key).await;
            let latency = started.elapsed();
            let masters = if ctx.cache.is_some() {
                ctx.config.urls.len() as u32
            } else {
                0
            };
            let ((commands, lock_commands), loaded) =
                METER.with(|m| (m.commands(masters), m.loaded.get()));
            Measured {
                latency,
                commands,
                lock_commands,
                loaded,
                error: result.err(),
            }
        })
        .await
}

async fn measure(ctx: &Arc<Ctx>, start: Instant, start_us: u64) -> WorkerReport {
    match ctx.config.scenario {
        Scenario::Cold => cold(ctx, start).await,
        Scenario::Zipf {
            keys,
            exponent,
            duration_ms,
            think_ms,
            ..
        } => {
            let zipf = Arc::new(Zipf::new(keys, exponent));
            zipf_run(
                ctx,
                start,
                start_us,
                zipf,
                Duration::from_millis(duration_ms),
                Duration::from_millis(think_ms),
            )
            .await
        }
    }
}

/// Every task calls once for the one cold key, at the shared instant.
async fn cold(ctx: &Arc<Ctx>, start: Instant) -> WorkerReport {
    let tasks: Vec<_> = (0..ctx.config.tasks)
        .map(|_| {
            let ctx = Arc::clone(ctx);
            tokio::spawn(async move {
                tokio::time::sleep_until(start.into()).await;
                let began = unix_micros();
                let m = measured_call(&ctx, "cold").await;
                (began, unix_micros(), m)
            })
        })
        .collect();
    let mut report = WorkerReport {
        first_start_us: u64::MAX,
        ..WorkerReport::default()
    };
    for task in tasks {
        let (began, ended, m) = task.await.unwrap_or_else(|e| fail(&format!("task: {e}")));
        report.first_start_us = report.first_start_us.min(began);
        report.last_start_us = report.last_start_us.max(began);
        report.last_end_us = report.last_end_us.max(ended);
        report.latencies_us.push(m.latency.as_micros() as u32);
        report.commands.push(m.commands);
        report.lock_commands += u64::from(m.lock_commands);
        report.loaded.push(m.loaded);
        if let Some(e) = m.error {
            report.errors += 1;
            report.first_error.get_or_insert(e);
        }
    }
    report.calls = report.latencies_us.len() as u64;
    report
}

/// Every task loops over Zipf-drawn keys for `duration`, pausing `think`
/// (±50%) between calls.
async fn zipf_run(
    ctx: &Arc<Ctx>,
    start: Instant,
    start_us: u64,
    zipf: Arc<Zipf>,
    duration: Duration,
    think: Duration,
) -> WorkerReport {
    let end = start + duration;
    let tasks: Vec<_> = (0..ctx.config.tasks)
        .map(|_| {
            let (ctx, zipf) = (Arc::clone(ctx), Arc::clone(&zipf));
            tokio::spawn(async move {
                tokio::time::sleep_until(start.into()).await;
                let mut rng = fastrand::Rng::new();
                let mut latencies = Vec::new();
                let mut requests = Vec::new();
                let mut errors = (0u64, None);
                while Instant::now() < end {
                    let k = zipf.sample(&mut rng);
                    let at_ms = start.elapsed().as_millis() as u32;
                    let m = measured_call(&ctx, &format!("z{k}")).await;
                    latencies.push(m.latency.as_micros() as u32);
                    requests.push((k, at_ms));
                    if let Some(e) = m.error {
                        errors.0 += 1;
                        errors.1.get_or_insert(e);
                    }
                    let pause = think.mul_f64(0.5 + rng.f64());
                    tokio::time::sleep(pause).await;
                }
                (latencies, requests, errors)
            })
        })
        .collect();
    let mut report = WorkerReport {
        first_start_us: start_us,
        last_start_us: start_us,
        ..WorkerReport::default()
    };
    for task in tasks {
        let (latencies, requests, (errors, first)) =
            task.await.unwrap_or_else(|e| fail(&format!("task: {e}")));
        report.latencies_us.extend(latencies);
        report.requests.extend(requests);
        report.errors += errors;
        if report.first_error.is_none() {
            report.first_error = first;
        }
    }
    report.last_end_us = unix_micros();
    report.calls = report.latencies_us.len() as u64;
    // Only the first request of a key in each millisecond matters for the
    // ideal-load count: keep the report small.
    report.requests.sort_unstable();
    report.requests.dedup();
    report
}
/// Store operations, counted process-wide and per caller, in the order of
/// [`Op::ALL`].
const OPS: [&str; Op::ALL.len()] = {
    let mut names = [""; Op::ALL.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = Op::ALL[i].name();
        i += 1;
    }
    names
};

const GET: usize = Op::Get.index();
const SET: usize = Op::Set.index();
const DELETE: usize = Op::Delete.index();
const GET_OR_FENCE: usize = Op::GetOrFence.index();
const SET_FENCED: usize = Op::SetFenced.index();

#[derive(Debug, Default)]
struct OpCounts([AtomicU64; OPS.len()]);

impl OpCounts {
    fn snapshot(&self) -> Vec<(&'static str, u64)> {
        OPS.iter()
            .zip(&self.0)
            .map(|(name, n)| (*name, n.load(Ordering::Relaxed)))
            .collect()
    }
}

/// A [`RedisStore`] that counts its commands: each [`Store`] call is one
/// command to one server. Counted per process, and per caller through the
/// task-local [`METER`] when the call runs inside a measured caller's task
/// (commands the library sends from tasks of its own are counted only
/// per process).
fn counting_store(inner: RedisStore, counts: &Arc<OpCounts>) -> Observed {
    let counts = Arc::clone(counts);
    let hook: Hook = Arc::new(move |op| {
        let i = op.index();
        counts.0[i].fetch_add(1, Ordering::Relaxed);
        let _ = METER.try_with(|m| m.ops[i].set(m.ops[i].get() + 1));
        Box::pin(async {})
    });
    Observed::new(Arc::new(inner), hook)
}
