//! The benchmark harness of locked-cache, a crate of its own so that
//! `cargo run -p quickstart` does not compile criterion and plotters.
//! This library holds the helpers the benches (under `benches/`) share:
//! command-line flags, percentiles, markdown tables and the report directory.
//! The benches start their redis-servers with the test support of the main
//! crate (`tests/support/`, included by path).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The connection info of `url` for a raw side: with `TCP_NODELAY` as told.
/// The cache sets it on every connection, so a raw side that is to be
/// compared with the cache sets it too (`nodelay`): the comparison is then of
/// the code, not of socket options.
pub fn raw_connection_info(url: &str, nodelay: bool) -> redis::ConnectionInfo {
    redis::IntoConnectionInfo::into_connection_info(url)
        .unwrap_or_else(|e| die(&format!("url {url}: {e}")))
        .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(nodelay))
}

/// One multiplexed connection to `url` with the cache's socket options
/// (`TCP_NODELAY`): a raw side's connection.
pub async fn raw_connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(raw_connection_info(url, true))
        .unwrap_or_else(|e| die(&format!("client: {e}")))
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| die(&format!("connection to {url}: {e}")))
}

/// Where reports go: `$CARGO_TARGET_DIR/bench-report`, else `target/bench-report`
/// in the workspace (the repository root).
pub fn report_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("bench-report")
}

/// Writes `text` to `report_dir()/name` and returns the path.
pub fn write_report(name: &str, text: &str) -> PathBuf {
    let dir = report_dir();
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

/// Microseconds since the UNIX epoch: a clock every process on the machine shares.
pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock before 1970")
        .as_micros() as u64
}

/// CPU time this process's threads have used so far (from
/// `/proc/self/task/*/schedstat`, nanoseconds); zero where `/proc` is not there.
pub fn process_cpu_time() -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    let ns: u64 = tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(ns)
}

/// CPU time a Redis server has used (user + system, from `INFO cpu`), given
/// that section's text.
pub fn redis_cpu_time(info_cpu: &str) -> Duration {
    let seconds: f64 = info_cpu
        .lines()
        .filter_map(|line| {
            let (name, value) = line.trim().split_once(':')?;
            matches!(name, "used_cpu_sys" | "used_cpu_user").then(|| value.parse::<f64>().ok())?
        })
        .sum();
    Duration::from_secs_f64(seconds.max(0.0))
}

/// The `p`-th percentile (0..=100) of sorted samples, nearest-rank; 0 if empty.
pub fn percentile<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Microseconds as milliseconds with one decimal: `51.3`.
pub fn ms(us: u64) -> String {
    format!("{:.1}", us as f64 / 1000.0)
}

/// A duration as milliseconds with one decimal.
pub fn ms_of(d: Duration) -> String {
    ms(d.as_micros() as u64)
}

/// A markdown table built row by row.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        assert_eq!(cells.len(), self.header.len(), "row width");
        self.rows.push(cells);
    }

    /// GitHub-flavoured markdown: first column left-aligned, the rest right.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "| {} |", self.header.join(" | "));
        let align: Vec<&str> = (0..self.header.len())
            .map(|i| if i == 0 { ":---" } else { "---:" })
            .collect();
        let _ = writeln!(out, "| {} |", align.join(" | "));
        for row in &self.rows {
            let _ = writeln!(out, "| {} |", row.join(" | "));
        }
        out
    }
}

/// Command-line flags `--name value` (or `--name=value`), plus bare switches.
/// `--bench` (added by `cargo bench`) is recorded, not an error.
pub struct Flags {
    pairs: Vec<(String, Option<String>)>,
    pub bench_mode: bool,
    pub help: bool,
}

impl Flags {
    /// Parses `std::env::args()`. `switches` are the flags that take no value.
    pub fn parse(switches: &[&str]) -> Flags {
        let mut flags = Flags {
            pairs: Vec::new(),
            bench_mode: false,
            help: false,
        };
        let mut args = std::env::args().skip(1).peekable();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--bench" => flags.bench_mode = true,
                "--help" | "-h" => flags.help = true,
                _ => {
                    let Some(name) = arg.strip_prefix("--") else {
                        die(&format!("unexpected argument {arg:?} (see --help)"));
                    };
                    if let Some((name, value)) = name.split_once('=') {
                        flags.pairs.push((name.to_owned(), Some(value.to_owned())));
                    } else if switches.contains(&name) {
                        flags.pairs.push((name.to_owned(), None));
                    } else {
                        let value = args
                            .next()
                            .unwrap_or_else(|| die(&format!("--{name} needs a value")));
                        flags.pairs.push((name.to_owned(), Some(value)));
                    }
                }
            }
        }
        flags
    }

    /// Fails on any flag not in `known` (values and switches alike).
    pub fn reject_unknown(&self, known: &[&str]) {
        for (name, _) in &self.pairs {
            if !known.contains(&name.as_str()) {
                die(&format!("unknown flag --{name} (see --help)"));
            }
        }
    }

    pub fn switch(&self, name: &str) -> bool {
        self.pairs.iter().any(|(n, _)| n == name)
    }

    pub fn get<T: std::str::FromStr>(&self, name: &str, default: T) -> T {
        match self.value(name) {
            None => default,
            Some(v) => v
                .parse()
                .unwrap_or_else(|_| die(&format!("--{name}: cannot parse {v:?}"))),
        }
    }

    /// A comma-separated list.
    pub fn list<T: std::str::FromStr + Clone>(&self, name: &str, default: &[T]) -> Vec<T> {
        match self.value(name) {
            None => default.to_vec(),
            Some(v) => v
                .split(',')
                .map(|item| {
                    item.trim()
                        .parse()
                        .unwrap_or_else(|_| die(&format!("--{name}: cannot parse {item:?}")))
                })
                .collect(),
        }
    }

    /// Whether any value flag was given (a run with defaults has none).
    pub fn any_given(&self) -> bool {
        !self.pairs.is_empty()
    }

    fn value(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }
}

/// Prints `message` and exits with status 2 (bad usage).
pub fn die(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(2);
}

/// A one-line description of this machine and moment, for report headers.
pub fn environment_line(redis_server: &Path) -> String {
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let redis = std::process::Command::new(redis_server)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|v| {
            v.split_whitespace()
                .find_map(|w| w.strip_prefix("v=").map(str::to_owned))
        })
        .unwrap_or_else(|| "?".into());
    format!("{cpus} CPUs, load average {load} at start, redis-server {redis}")
}

/// The current UTC time as `YYYY-MM-DD HH:MM UTC`.
pub fn utc_now() -> String {
    let secs = unix_micros() / 1_000_000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60
    )
}

/// Zipf(s) over ranks 1..=n by inverse CDF; returns the rank.
pub struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    /// Ranks 1..=n with weights 1/k^s.
    pub fn new(n: u32, s: f64) -> Zipf {
        let mut total = 0.0;
        let cumulative = (1..=n.max(1))
            .map(|k| {
                total += 1.0 / f64::from(k).powf(s);
                total
            })
            .collect();
        Zipf { cumulative }
    }

    /// A rank in 1..=n.
    pub fn sample(&self, rng: &mut fastrand::Rng) -> u32 {
        let total = *self.cumulative.last().expect("n >= 1");
        let u = rng.f64() * total;
        let i = self.cumulative.partition_point(|&c| c <= u);
        i.min(self.cumulative.len() - 1) as u32 + 1
    }
}
