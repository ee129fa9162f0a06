//! # Stampede bench: what a stampede guard buys, measured across processes
//!
//! K worker processes × M tasks (default 4 × 250 = 1000 callers) are released
//! at one shared instant and all call `get_or_load` on one cold key; the loader
//! sleeps L ms (default 50) and counts its runs in Redis. Compared in the same
//! run, on 1 and on 3 Redis masters:
//!
//! - **no protection**: plain `GET`, load, `SET` (what a cache without a guard does);
//! - **polling only**: locked-cache with `.wake_ups(false).coalesce(false)`;
//! - **all optimisations**: locked-cache with its defaults (pub/sub wake-ups and
//!   in-process coalescing).
//!
//! Reported per strategy: loader runs, caller latency p50/p90/p99/max (and
//! p99 of the callers that did not load), Redis commands per caller (server:
//! `INFO commandstats` deltas; client: counted per caller by a counting
//! `Store`, hence the median) and wall time. A second scenario draws many keys
//! from a Zipf(1.0) distribution for a fixed time, with a short TTL so that hot
//! keys expire and stampede again: loads against the ideal (one per key
//! expiry), latency percentiles.
//!
//! The bench starts its own `redis-server` processes on free loopback ports
//! (the test support in `tests/support/`), and its workers by re-running this
//! binary with `LC_STAMPEDE_WORKER` set. Run it with
//!
//! ```text
//! cargo bench --bench stampede                 # defaults, well under a minute
//! cargo bench --bench stampede -- --help       # flags: K, M, L, keys, retry, masters...
//! ```
//!
//! It prints markdown tables, writes them to `target/bench-report/stampede.md`
//! and a latency chart to `target/bench-report/stampede.svg` (copied to
//! `docs/stampede.svg` by a run with default flags). Run by `cargo test
//! --benches` (no `--bench` flag) it does a small smoke run and writes nothing.

#[path = "../../../tests/support/mod.rs"]
mod support;

use locked_cache_bench as common;

mod chart;
mod worker;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use common::{Flags, Table, die, ms, percentile, unix_micros};
use support::{Fleet, RedisServer};

/// Set in a worker's environment to its JSON [`WorkerConfig`].
const WORKER_ENV: &str = "LC_STAMPEDE_WORKER";

/// Commands the report does not count: the harness's own (`INFO`, `CONFIG`,
/// `FLUSHALL`), connection handshakes (`HELLO`, `CLIENT`, `PING`) and the
/// loader's run counter (`INCR`, bookkeeping of the bench, not of the strategy).
const NOT_COUNTED: &[&str] = &[
    "info", "ping", "config", "client", "hello", "flushall", "incr",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Strategy {
    NoProtection,
    PollingOnly,
    AllOn,
}

impl Strategy {
    const ALL: [Strategy; 3] = [
        Strategy::NoProtection,
        Strategy::PollingOnly,
        Strategy::AllOn,
    ];

    fn name(self) -> &'static str {
        match self {
            Strategy::NoProtection => "no protection",
            Strategy::PollingOnly => "polling only",
            Strategy::AllOn => "all optimisations",
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Strategy::NoProtection => "none",
            Strategy::PollingOnly => "polling",
            Strategy::AllOn => "all",
        }
    }
}

impl std::str::FromStr for Strategy {
    type Err = ();

    fn from_str(s: &str) -> Result<Strategy, ()> {
        Strategy::ALL.into_iter().find(|x| x.flag() == s).ok_or(())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
enum Scenario {
    /// Every caller once, on one cold key, at one instant.
    Cold,
    /// Callers loop over Zipf-drawn keys for a fixed time.
    Zipf {
        keys: u32,
        exponent: f64,
        duration_ms: u64,
        think_ms: u64,
        ttl_ms: u64,
    },
}

/// What one worker process does (passed as JSON in [`WORKER_ENV`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct WorkerConfig {
    scenario: Scenario,
    strategy: Strategy,
    /// Masters; values live on the first.
    urls: Vec<String>,
    prefix: String,
    worker_index: usize,
    tasks: usize,
    load_ms: u64,
    retry_ms: u64,
    value_bytes: usize,
    worker_threads: usize,
    /// The worker gives up (and exits non-zero) this long after `GO`.
    deadline_s: u64,
}

/// The cache's own counters, summed over a worker's caches.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct Counters {
    hits: u64,
    misses: u64,
    loads: u64,
    coalesced: u64,
    lock_attempts: u64,
    lock_timeouts: u64,
    wakeups: u64,
}

impl Counters {
    /// The counts from `earlier` to `self`.
    fn since(&self, earlier: &Counters) -> Counters {
        Counters {
            hits: self.hits - earlier.hits,
            misses: self.misses - earlier.misses,
            loads: self.loads - earlier.loads,
            coalesced: self.coalesced - earlier.coalesced,
            lock_attempts: self.lock_attempts - earlier.lock_attempts,
            lock_timeouts: self.lock_timeouts - earlier.lock_timeouts,
            wakeups: self.wakeups - earlier.wakeups,
        }
    }

    fn add(&mut self, o: &Counters) {
        self.hits += o.hits;
        self.misses += o.misses;
        self.loads += o.loads;
        self.coalesced += o.coalesced;
        self.lock_attempts += o.lock_attempts;
        self.lock_timeouts += o.lock_timeouts;
        self.wakeups += o.wakeups;
    }
}

/// What one worker process measured.
#[derive(Debug, Default, Serialize, Deserialize)]
struct WorkerReport {
    calls: u64,
    errors: u64,
    first_error: Option<String>,
    /// Per call (cold: one per task; Zipf: every call).
    latencies_us: Vec<u32>,
    /// Cold only, per call: commands sent on the caller's behalf.
    commands: Vec<u32>,
    /// Cold only, per call: whether the caller's own loader ran.
    loaded: Vec<bool>,
    /// Cold only: of `commands`, the lock commands inferred per caller (the lock
    /// may send them from tasks of its own), to check against the process total.
    lock_commands: u64,
    /// UNIX µs: when the first and the last task started their calls, and
    /// when the last ended.
    first_start_us: u64,
    last_start_us: u64,
    last_end_us: u64,
    /// Commands by store operation, the whole process, after `GO`.
    client_commands: BTreeMap<String, u64>,
    cache: Counters,
    /// Zipf only: (key rank, ms since start) of calls, one per key and ms.
    requests: Vec<(u32, u32)>,
}

/// The run's parameters, from the flags.
#[derive(Clone, Debug)]
struct Options {
    processes: usize,
    tasks: usize,
    load_ms: u64,
    retry_ms: u64,
    masters: Vec<usize>,
    strategies: Vec<Strategy>,
    scenarios: Vec<String>,
    keys: u32,
    exponent: f64,
    duration_s: f64,
    zipf_tasks: usize,
    think_ms: u64,
    ttl_ms: u64,
    value_bytes: usize,
    worker_threads: usize,
    lead_ms: u64,
    timeout_s: u64,
    /// Where the report and chart go; `None` in smoke mode.
    write: bool,
    /// True when every flag is at its default (the run whose chart goes to docs/).
    defaults: bool,
    command_line: String,
}

const HELP: &str = "\
Stampede bench for locked-cache: K processes x M tasks on one cold key, and a Zipf variant.

USAGE: cargo bench --bench stampede -- [FLAGS]

  --processes K       worker processes                                   [4]
  --tasks M           tasks per worker process (cold key)                [250]
  --load-ms L         loader duration, ms                                [50]
  --retry-ms R        lock retry time of both locked-cache strategies    [100]
  --masters LIST      master counts to run, e.g. 1,3 (max 7)              [1,3]
  --strategies LIST   of none,polling,all                                [none,polling,all]
  --scenarios LIST    of cold,zipf                                       [cold,zipf]
  --keys N            Zipf: number of keys                               [1000]
  --zipf-s S          Zipf: exponent                                     [1.0]
  --duration-s S      Zipf: run time per strategy, seconds               [3]
  --zipf-tasks N      Zipf: tasks per worker process                     [50]
  --think-ms T        Zipf: pause between a task's calls (+-50%)          [10]
  --ttl-ms T          Zipf: value TTL, so keys expire and stampede again [1000]
  --value-bytes B     size of the loaded value                           [100]
  --worker-threads N  tokio worker threads per worker process            [2]
  --lead-ms T         time between GO and the shared start instant       [300]
  --timeout-s T       a worker gives up this long after its start        [30]

No-protection runs once, on the first master count (it takes no lock).
Reports: target/bench-report/stampede.{md,svg}; with all flags at their
defaults the chart is also copied to docs/stampede.svg.";

const VALUE_FLAGS: &[&str] = &[
    "processes",
    "tasks",
    "load-ms",
    "retry-ms",
    "masters",
    "strategies",
    "scenarios",
    "keys",
    "zipf-s",
    "duration-s",
    "zipf-tasks",
    "think-ms",
    "ttl-ms",
    "value-bytes",
    "worker-threads",
    "lead-ms",
    "timeout-s",
];

fn main() {
    if let Ok(config) = std::env::var(WORKER_ENV) {
        worker::main(&config);
    }
    let flags = Flags::parse(&[]);
    if flags.help {
        println!("{HELP}");
        return;
    }
    flags.reject_unknown(VALUE_FLAGS);
    let options = options(&flags);
    run(&options);
}

fn options(flags: &Flags) -> Options {
    // Without `--bench` we run under `cargo test --benches`: a small smoke run.
    let smoke = !flags.bench_mode;
    macro_rules! pick {
        ($full:expr, $small:expr) => {
            if smoke { $small } else { $full }
        };
    }
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let command_line = if args.is_empty() {
        "cargo bench --bench stampede".to_owned()
    } else {
        format!("cargo bench --bench stampede -- {}", args.join(" "))
    };
    let o = Options {
        processes: flags.get("processes", pick!(4, 2)),
        tasks: flags.get("tasks", pick!(250, 20)),
        load_ms: flags.get("load-ms", pick!(50, 20)),
        retry_ms: flags.get("retry-ms", 100),
        masters: flags.list("masters", &[1, 3]),
        strategies: flags.list("strategies", &Strategy::ALL),
        scenarios: flags.list("scenarios", &["cold".to_owned(), "zipf".to_owned()]),
        keys: flags.get("keys", pick!(1000, 50)),
        exponent: flags.get("zipf-s", 1.0),
        duration_s: flags.get("duration-s", pick!(3.0, 0.5)),
        zipf_tasks: flags.get("zipf-tasks", pick!(50, 10)),
        think_ms: flags.get("think-ms", 10),
        ttl_ms: flags.get("ttl-ms", pick!(1000, 200)),
        value_bytes: flags.get("value-bytes", 100),
        worker_threads: flags.get("worker-threads", 2),
        lead_ms: flags.get("lead-ms", 300),
        timeout_s: flags.get("timeout-s", 30),
        write: !smoke,
        defaults: !smoke && !flags.any_given(),
        command_line,
    };
    let bounded = |ok: bool, what: &str| {
        if !ok {
            die(what)
        }
    };
    bounded((1..=64).contains(&o.processes), "--processes: 1..=64");
    bounded((1..=10_000).contains(&o.tasks), "--tasks: 1..=10000");
    bounded(
        (1..=10_000).contains(&o.zipf_tasks),
        "--zipf-tasks: 1..=10000",
    );
    bounded(o.load_ms <= 10_000, "--load-ms: at most 10000");
    bounded((1..=10_000).contains(&o.retry_ms), "--retry-ms: 1..=10000");
    bounded(
        !o.masters.is_empty() && o.masters.iter().all(|m| (1..=7).contains(m)),
        "--masters: counts in 1..=7",
    );
    bounded(!o.strategies.is_empty(), "--strategies: at least one");
    bounded(
        o.scenarios.iter().all(|s| s == "cold" || s == "zipf"),
        "--scenarios: cold and/or zipf",
    );
    bounded((1..=1_000_000).contains(&o.keys), "--keys: 1..=1000000");
    bounded(
        o.duration_s > 0.0 && o.duration_s <= 60.0,
        "--duration-s: at most 60",
    );
    bounded(o.ttl_ms >= 1, "--ttl-ms: at least 1");
    bounded(o.value_bytes <= 1 << 20, "--value-bytes: at most 1 MiB");
    bounded(
        (1..=64).contains(&o.worker_threads),
        "--worker-threads: 1..=64",
    );
    bounded((1..=600).contains(&o.timeout_s), "--timeout-s: 1..=600");
    o
}

/// One (scenario, strategy, master count) measured.
struct Run {
    scenario: String,
    strategy: Strategy,
    masters: usize,
    reports: Vec<WorkerReport>,
    /// Loader runs, from the counter in Redis.
    loader_runs: u64,
    /// Commands by name, summed over the masters, `NOT_COUNTED` left out.
    server_commands: BTreeMap<String, u64>,
    /// From the shared start instant to the last call's end.
    wall: Duration,
}

impl Run {
    fn label(&self) -> String {
        match self.strategy {
            Strategy::NoProtection => self.strategy.name().to_owned(),
            s => format!(
                "{}, {} master{}",
                s.name(),
                self.masters,
                plural(self.masters)
            ),
        }
    }

    fn calls(&self) -> u64 {
        self.reports.iter().map(|r| r.calls).sum()
    }

    fn errors(&self) -> (u64, Option<&str>) {
        let n = self.reports.iter().map(|r| r.errors).sum();
        let first = self.reports.iter().find_map(|r| r.first_error.as_deref());
        (n, first)
    }

    fn latencies(&self) -> Vec<u32> {
        let mut all: Vec<u32> = self
            .reports
            .iter()
            .flat_map(|r| r.latencies_us.iter().copied())
            .collect();
        all.sort_unstable();
        all
    }

    /// Latencies of the callers whose own loader did not run (cold only).
    fn waiter_latencies(&self) -> Vec<u32> {
        let mut all: Vec<u32> = self
            .reports
            .iter()
            .flat_map(|r| {
                r.latencies_us
                    .iter()
                    .zip(&r.loaded)
                    .filter(|(_, loaded)| !**loaded)
                    .map(|(l, _)| *l)
            })
            .collect();
        all.sort_unstable();
        all
    }

    fn client_commands_per_call(&self) -> Vec<u32> {
        let mut all: Vec<u32> = self
            .reports
            .iter()
            .flat_map(|r| r.commands.iter().copied())
            .collect();
        all.sort_unstable();
        all
    }

    fn client_commands_total(&self) -> u64 {
        self.reports
            .iter()
            .flat_map(|r| r.client_commands.iter())
            .filter(|(op, _)| op.as_str() != "subscribe")
            .map(|(_, n)| n)
            .sum()
    }

    /// From the first caller's start to the last caller's start, over all processes.
    fn start_spread(&self) -> Duration {
        let first = self
            .reports
            .iter()
            .map(|r| r.first_start_us)
            .min()
            .unwrap_or(0);
        let last = self
            .reports
            .iter()
            .map(|r| r.last_start_us)
            .max()
            .unwrap_or(0);
        Duration::from_micros(last.saturating_sub(first))
    }

    fn inferred_lock_commands(&self) -> u64 {
        self.reports.iter().map(|r| r.lock_commands).sum()
    }

    /// `SET NX` and release scripts the processes sent.
    fn client_lock_commands(&self) -> u64 {
        self.reports
            .iter()
            .flat_map(|r| ["set_nx", "release"].map(|op| r.client_commands.get(op)))
            .flatten()
            .sum()
    }

    fn server_total(&self) -> u64 {
        self.server_commands.values().sum()
    }

    fn cache(&self) -> Counters {
        let mut c = Counters::default();
        for r in &self.reports {
            c.add(&r.cache);
        }
        c
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn run(o: &Options) {
    let started = Instant::now();
    let env = common::environment_line(&support::redis_server_binary());
    let date = common::utc_now();
    let max_masters = o.masters.iter().copied().max().unwrap_or(1);
    eprintln!("stampede: starting {max_masters} redis-server(s); {env}");
    let fleet = Fleet::start(max_masters);
    let exe = std::env::current_exe().expect("current_exe");

    let mut plan = Vec::new();
    for scenario in &o.scenarios {
        for &strategy in &o.strategies {
            for &masters in &o.masters {
                if strategy == Strategy::NoProtection && masters != o.masters[0] {
                    continue;
                }
                plan.push((scenario.clone(), strategy, masters));
            }
        }
    }
    let mut runs = Vec::new();
    for (i, (scenario, strategy, masters)) in plan.into_iter().enumerate() {
        eprintln!(
            "stampede: {scenario} / {} / {masters} master(s)...",
            strategy.name()
        );
        let run = run_one(&fleet, &exe, o, &scenario, strategy, masters, i);
        runs.push(run);
    }
    drop(fleet);

    let report = render(o, &runs, &date, &env, started.elapsed());
    println!("{report}");
    if o.write {
        let md = common::write_report("stampede.md", &report);
        let cold: Vec<&Run> = runs.iter().filter(|r| r.scenario == "cold").collect();
        if !cold.is_empty() {
            let svg = common::report_dir().join("stampede.svg");
            chart::latency_cdf(&svg, &cold, o, &date);
            eprintln!("stampede: wrote {} and {}", md.display(), svg.display());
            if o.defaults {
                // The chart goes to the repository's docs/, next to the README.
                let docs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs");
                std::fs::create_dir_all(&docs).expect("create docs/");
                std::fs::copy(&svg, docs.join("stampede.svg")).expect("copy chart to docs/");
                eprintln!("stampede: copied the chart to docs/stampede.svg");
            }
        } else {
            eprintln!("stampede: wrote {}", md.display());
        }
    }
}

fn run_one(
    fleet: &Fleet,
    exe: &Path,
    o: &Options,
    scenario: &str,
    strategy: Strategy,
    masters: usize,
    index: usize,
) -> Run {
    let servers: Vec<&RedisServer> = fleet.servers[..masters].iter().collect();
    for server in &servers {
        server.cmd(&["FLUSHALL"]);
    }
    let prefix = format!("stampede:{index}:");
    let (scenario_config, tasks, deadline_s) = match scenario {
        "cold" => (Scenario::Cold, o.tasks, o.timeout_s),
        _ => (
            Scenario::Zipf {
                keys: o.keys,
                exponent: o.exponent,
                duration_ms: (o.duration_s * 1000.0) as u64,
                think_ms: o.think_ms,
                ttl_ms: o.ttl_ms,
            },
            o.zipf_tasks,
            o.timeout_s + o.duration_s.ceil() as u64,
        ),
    };
    let configs: Vec<WorkerConfig> = (0..o.processes)
        .map(|worker_index| WorkerConfig {
            scenario: scenario_config.clone(),
            strategy,
            urls: servers.iter().map(|s| s.url()).collect(),
            prefix: prefix.clone(),
            worker_index,
            tasks,
            load_ms: o.load_ms,
            retry_ms: o.retry_ms,
            value_bytes: o.value_bytes,
            worker_threads: o.worker_threads,
            deadline_s,
        })
        .collect();

    let mut workers = Workers::spawn(exe, &configs);
    workers.expect_all("READY", Duration::from_secs(30));
    for server in &servers {
        server.reset_stats();
    }
    let start_us = unix_micros() + o.lead_ms * 1000;
    workers.send_all(&format!("GO {start_us}"));
    let results = workers.expect_all("RESULT ", Duration::from_secs(deadline_s + 10));
    workers.wait_exit(Duration::from_secs(10));

    let mut server_commands = BTreeMap::new();
    for server in &servers {
        for (name, calls) in server.command_stats() {
            let base = name.split('|').next().unwrap_or(&name).to_owned();
            if !NOT_COUNTED.contains(&base.as_str()) {
                *server_commands.entry(name).or_insert(0) += calls;
            }
        }
    }
    let loads: Option<u64> = servers[0].query(&["GET", &format!("{prefix}bench:loads")]);
    let reports: Vec<WorkerReport> = results
        .iter()
        .map(|line| {
            serde_json::from_str(line.trim_start_matches("RESULT "))
                .unwrap_or_else(|e| panic!("bad worker report: {e}"))
        })
        .collect();
    let end_us = reports
        .iter()
        .map(|r| r.last_end_us)
        .max()
        .unwrap_or(start_us);
    Run {
        scenario: scenario.to_owned(),
        strategy,
        masters,
        reports,
        loader_runs: loads.unwrap_or(0),
        server_commands,
        wall: Duration::from_micros(end_us.saturating_sub(start_us)),
    }
}

/// The worker processes of one run; any still running when this drops is killed.
struct Workers {
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    lines: mpsc::Receiver<(usize, Option<String>)>,
}

impl Workers {
    fn spawn(exe: &Path, configs: &[WorkerConfig]) -> Workers {
        let (tx, lines) = mpsc::channel();
        let mut workers = Workers {
            children: Vec::new(),
            stdins: Vec::new(),
            lines,
        };
        for (i, config) in configs.iter().enumerate() {
            let mut child = Command::new(exe)
                .env(
                    WORKER_ENV,
                    serde_json::to_string(config).expect("config json"),
                )
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap_or_else(|e| panic!("spawn worker {}: {e}", exe.display()));
            workers
                .stdins
                .push(child.stdin.take().expect("worker stdin"));
            let stdout = child.stdout.take().expect("worker stdout");
            workers.children.push(child);
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send((i, Some(line))).is_err() {
                        return;
                    }
                }
                let _ = tx.send((i, None));
            });
        }
        workers
    }

    /// Waits until every worker printed a line starting with `prefix`; returns
    /// those lines in worker order. Panics (killing the workers) on a timeout or
    /// a worker that exits first.
    fn expect_all(&mut self, prefix: &str, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut got: Vec<Option<String>> = vec![None; self.children.len()];
        while got.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((i, Some(line))) if line.starts_with(prefix) => got[i] = Some(line),
                Ok((_, Some(_))) => {}
                Ok((i, None)) if got[i].is_none() => {
                    let status = self.children[i].wait().ok();
                    panic!("worker {i} exited before {prefix:?}: {status:?} (its stderr is above)");
                }
                Ok((_, None)) => {}
                Err(_) => panic!("workers did not all print {prefix:?} within {timeout:?}"),
            }
        }
        got.into_iter().map(|l| l.expect("checked")).collect()
    }

    fn send_all(&mut self, line: &str) {
        for (i, stdin) in self.stdins.iter_mut().enumerate() {
            writeln!(stdin, "{line}")
                .and_then(|()| stdin.flush())
                .unwrap_or_else(|e| panic!("worker {i} stdin: {e}"));
        }
    }

    /// Waits for every worker to exit by itself, up to `timeout`.
    fn wait_exit(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for (i, child) in self.children.iter_mut().enumerate() {
            loop {
                match child.try_wait() {
                    Ok(Some(status)) if status.success() => break,
                    Ok(Some(status)) => panic!("worker {i} failed: {status}"),
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    _ => panic!("worker {i} did not exit within {timeout:?}"),
                }
            }
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for child in &mut self.children {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// The minimum number of loads for the observed requests, if every key were
/// loaded once per expiry: per key, a request at `t` after the value's window
/// (`load + ttl` from the request that loaded it) needs a new load.
fn ideal_loads(runs: &[WorkerReport], load_ms: u64, ttl_ms: u64) -> u64 {
    let mut requests: Vec<(u32, u32)> = runs
        .iter()
        .flat_map(|r| r.requests.iter().copied())
        .collect();
    requests.sort_unstable();
    let window = load_ms + ttl_ms;
    let mut loads = 0;
    let mut current: Option<(u32, u64)> = None;
    for (key, at) in requests {
        let at = u64::from(at);
        match current {
            Some((k, until)) if k == key && at < until => {}
            _ => {
                loads += 1;
                current = Some((key, at + window));
            }
        }
    }
    loads
}

fn render(o: &Options, runs: &[Run], date: &str, env: &str, took: Duration) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "## Stampede bench ({date})\n");
    let _ = writeln!(out, "Command: `{}`  ", o.command_line);
    let _ = writeln!(
        out,
        "Machine: {env}; the whole run took {:.0} s.\n",
        took.as_secs_f64()
    );

    let cold: Vec<&Run> = runs.iter().filter(|r| r.scenario == "cold").collect();
    if !cold.is_empty() {
        let callers = o.processes * o.tasks;
        let _ = writeln!(
            out,
            "### One cold key: {} processes × {} tasks = {callers} callers, loader {} ms, retry {} ms\n",
            o.processes, o.tasks, o.load_ms, o.retry_ms
        );
        let mut t = Table::new(&[
            "strategy",
            "loader runs",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "waiter p99 ms",
            "cmds/caller (server)",
            "cmds/caller p50 / max (client)",
            "wall ms",
            "errors",
        ]);
        for r in &cold {
            let lat = r.latencies();
            let waiters = r.waiter_latencies();
            let per_call = r.client_commands_per_call();
            let calls = r.calls().max(1) as f64;
            t.row(vec![
                r.label(),
                r.loader_runs.to_string(),
                ms(percentile(&lat, 50.0).into()),
                ms(percentile(&lat, 90.0).into()),
                ms(percentile(&lat, 99.0).into()),
                ms(percentile(&lat, 100.0).into()),
                if waiters.is_empty() {
                    "–".to_owned()
                } else {
                    ms(percentile(&waiters, 99.0).into())
                },
                format!("{:.3}", r.server_total() as f64 / calls),
                format!(
                    "{} / {}",
                    percentile(&per_call, 50.0),
                    percentile(&per_call, 100.0)
                ),
                common::ms_of(r.wall),
                r.errors().0.to_string(),
            ]);
        }
        out.push_str(&t.markdown());
        let _ = writeln!(
            out,
            "\nLatency is per caller, from its call to its result. *Waiter* = a caller whose own \
             loader did not run. *cmds/caller (server)*: `INFO commandstats` deltas summed over the \
             masters, divided by callers; it counts the commands a Lua script runs inside Redis too \
             (the bench's `INCR` run counter and the harness's `INFO`/`CONFIG` are left out). \
             *Client*: commands sent on each caller's behalf, counted by a `Store` wrapper, so the \
             median exists (a caller served by another caller's flight sends none). The lock may send \
             its `SET NX` and release from tasks of its own, out of that count's reach: they are \
             inferred per caller from its reads and double checks, and *lock commands: per caller / \
             process* checks the sum against every `SET NX` and release the processes sent (more on \
             the right = undos of split votes, not attributed). *Start \
             spread*: from the first caller's start to the last one's, over all processes.\n"
        );
        let mut t = Table::new(&[
            "strategy",
            "server commands (incl. inside scripts)",
            "client commands",
            "lock attempts",
            "wake-ups",
            "coalesced",
            "lock commands: per caller / process",
            "start spread ms",
        ]);
        for r in &cold {
            let breakdown: Vec<String> = r
                .server_commands
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(name, n)| format!("{name} {n}"))
                .collect();
            let c = r.cache();
            t.row(vec![
                r.label(),
                format!("{}: {}", r.server_total(), breakdown.join(", ")),
                r.client_commands_total().to_string(),
                c.lock_attempts.to_string(),
                c.wakeups.to_string(),
                c.coalesced.to_string(),
                format!(
                    "{} / {}",
                    r.inferred_lock_commands(),
                    r.client_lock_commands()
                ),
                common::ms_of(r.start_spread()),
            ]);
        }
        out.push_str(&t.markdown());
        out.push('\n');
    }

    let zipf: Vec<&Run> = runs.iter().filter(|r| r.scenario == "zipf").collect();
    if !zipf.is_empty() {
        let callers = o.processes * o.zipf_tasks;
        let _ = writeln!(
            out,
            "### Many keys: Zipf(s = {}) over {} keys, {} processes × {} tasks = {callers} callers, \
             {} s, pause {} ms ±50% between calls, TTL {} ms, loader {} ms\n",
            o.exponent,
            o.keys,
            o.processes,
            o.zipf_tasks,
            o.duration_s,
            o.think_ms,
            o.ttl_ms,
            o.load_ms
        );
        let mut t = Table::new(&[
            "strategy",
            "calls",
            "calls/s",
            "loader runs",
            "ideal loads",
            "excess loads",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "cmds/call (server)",
            "errors",
        ]);
        for r in &zipf {
            let lat = r.latencies();
            let ideal = ideal_loads(&r.reports, o.load_ms, o.ttl_ms);
            let calls = r.calls();
            t.row(vec![
                r.label(),
                calls.to_string(),
                format!("{:.0}", calls as f64 / r.wall.as_secs_f64().max(1e-9)),
                r.loader_runs.to_string(),
                ideal.to_string(),
                format!(
                    "{:+} ({:+.0}%)",
                    r.loader_runs as i64 - ideal as i64,
                    (r.loader_runs as f64 / ideal.max(1) as f64 - 1.0) * 100.0
                ),
                ms(percentile(&lat, 50.0).into()),
                ms(percentile(&lat, 90.0).into()),
                ms(percentile(&lat, 99.0).into()),
                ms(percentile(&lat, 100.0).into()),
                format!("{:.2}", r.server_total() as f64 / calls.max(1) as f64),
                r.errors().0.to_string(),
            ]);
        }
        out.push_str(&t.markdown());
        let _ = writeln!(
            out,
            "\n*Ideal loads*: one per key expiry for the requests actually made (per key, a request \
             more than loader + TTL after the request that loaded the value needs a new load).\n"
        );
    }

    for r in runs {
        if let (n, Some(first)) = r.errors()
            && n > 0
        {
            let _ = writeln!(
                out,
                "- {} / {}: {n} errors, first: {first}",
                r.scenario,
                r.label()
            );
        }
    }
    if !cold.is_empty() {
        out.push_str(&targets(o, &cold));
    }
    out
}

/// The targets of the issue, checked against the cold-key runs: one loader run
/// with either guard; for the default mode (all optimisations) also waiter p99
/// ≤ loader + 5 ms and a median of at most 2 commands per caller. Polling-only
/// is shown against the same numbers for comparison.
fn targets(o: &Options, cold: &[&Run]) -> String {
    use std::fmt::Write as _;
    let mut out = String::from("### Targets\n\n");
    let bound = o.load_ms * 1000 + 5000;
    let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
    for r in cold.iter().filter(|r| r.strategy != Strategy::NoProtection) {
        let p99 = u64::from(percentile(&r.waiter_latencies(), 99.0));
        let median = percentile(&r.client_commands_per_call(), 50.0);
        let by = if p99 > bound {
            format!(", over by {} ms", ms(p99 - bound))
        } else {
            String::new()
        };
        let (p99_verdict, median_verdict) = if r.strategy == Strategy::AllOn {
            (verdict(p99 <= bound), verdict(median <= 2))
        } else {
            ("comparison", "comparison")
        };
        let _ = writeln!(
            out,
            "- {}: loader runs {} (target 1: {}); waiter p99 {} ms (≤ {} ms: {p99_verdict}{by}); \
             median commands per caller {median} (≤ 2: {median_verdict})",
            r.label(),
            r.loader_runs,
            verdict(r.loader_runs == 1),
            ms(p99),
            ms(bound),
        );
    }
    out
}
