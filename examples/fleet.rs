//! The main promise across processes: several OS processes stampede one cold
//! key at the same instant, and the slow load runs once in the whole fleet.
//!
//! ```text
//! cargo run --example fleet                    # starts a throwaway redis-server
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example fleet
//! cargo run --example fleet -- 8               # 8 processes (default 4)
//! ```
//!
//! It needs Redis (the embedded store protects one process only): it uses
//! `REDIS_URL` when set, else starts `redis-server` (from `REDIS_SERVER`, the
//! `PATH`, or /usr/bin, /usr/local/bin, /usr/sbin) on a free loopback port, and
//! stops it at the end. Each process is this same binary, started again with
//! `LC_FLEET_WORKER` set; it runs 50 concurrent `get_or_load` calls and reports
//! how they were served.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use locked_cache::{LockedCache, Outcome};

const CALLS_PER_PROCESS: usize = 50;
const LOAD_TIME: Duration = Duration::from_millis(500);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("LC_FLEET_WORKER").is_some() {
        return worker();
    }
    let processes: usize = match std::env::args().nth(1) {
        Some(n) => n.parse().map_err(|e| format!("processes: {n}: {e}"))?,
        None => 4,
    };
    let (url, _server) = match std::env::var("REDIS_URL") {
        Ok(url) if !url.is_empty() => (url, None),
        _ => match start_redis_server() {
            Some((url, server)) => (url, Some(server)),
            None => {
                eprintln!(
                    "fleet: this demo needs Redis (the embedded store protects one process only).\n\
                     Set REDIS_URL=redis://host:port, or install redis-server \
                     (e.g. `apt-get install redis-server`) and run it again."
                );
                std::process::exit(2);
            }
        },
    };
    let prefix = format!("fleet:{}:{}:", std::process::id(), unix_millis());
    // Every worker starts its calls at the same instant, after all have connected.
    let start_at = unix_millis() + 1500;
    println!(
        "fleet: {processes} processes × {CALLS_PER_PROCESS} concurrent calls for one cold key, on {url}"
    );
    let exe = std::env::current_exe()?;
    let children: Vec<Child> = (0..processes)
        .map(|i| {
            Command::new(&exe)
                .env("LC_FLEET_WORKER", i.to_string())
                .env("LC_FLEET_URL", &url)
                .env("LC_FLEET_PREFIX", &prefix)
                .env("LC_FLEET_START_AT", start_at.to_string())
                .stdout(Stdio::piped())
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    let mut loads = 0;
    let mut calls = 0;
    for child in children {
        let output = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&output.stdout);
        for line in text.lines() {
            println!("  {line}");
            if let Some(n) = field(line, "loads=") {
                loads += n;
            }
            if let Some(n) = field(line, "calls=") {
                calls += n;
            }
        }
        if !output.status.success() {
            return Err(format!("a worker failed: {}", output.status).into());
        }
    }
    println!("fleet: {calls} calls in {processes} processes, the loader ran {loads} time(s)");
    if loads != 1 {
        return Err(format!("expected one load, got {loads}").into());
    }
    Ok(())
}

/// One process of the fleet.
fn worker() -> Result<(), Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let var = |name: &str| std::env::var(name).map_err(|_| format!("{name} not set"));
        let id = var("LC_FLEET_WORKER")?;
        let start_at: u64 = var("LC_FLEET_START_AT")?.parse()?;
        let cache = LockedCache::builder()
            .redis(var("LC_FLEET_URL")?)
            .key_prefix(var("LC_FLEET_PREFIX")?)
            .name("fleet")
            .build()
            .await?;
        cache.ping().await?;
        tokio::time::sleep(Duration::from_millis(start_at.saturating_sub(unix_millis()))).await;
        let began = Instant::now();
        let loads = Arc::new(AtomicU32::new(0));
        let calls: Vec<_> = (0..CALLS_PER_PROCESS)
            .map(|_| {
                let (cache, loads) = (cache.clone(), Arc::clone(&loads));
                tokio::spawn(async move {
                    cache
                        .get_or_load_with_outcome("monthly-report", |_| async move {
                            loads.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(LOAD_TIME).await; // the slow query
                            Ok::<_, std::io::Error>(format!("report built by pid {}", std::process::id()))
                        })
                        .await
                })
            })
            .collect();
        let mut by_outcome = [0; 4];
        let mut value = String::new();
        for call in calls {
            let (v, outcome) = call.await??;
            value = v;
            by_outcome[match outcome {
                Outcome::Hit => 0,
                Outcome::Coalesced => 1,
                Outcome::Waited => 2,
                _ => 3,
            }] += 1;
        }
        println!(
            "worker {id} (pid {}): calls={CALLS_PER_PROCESS} loads={} in {} ms; hit {} coalesced {} waited {} loaded {}; got \"{value}\"",
            std::process::id(),
            loads.load(Ordering::SeqCst),
            began.elapsed().as_millis(),
            by_outcome[0],
            by_outcome[1],
            by_outcome[2],
            by_outcome[3],
        );
        Ok(())
    })
}

fn field(line: &str, name: &str) -> Option<u32> {
    let rest = &line[line.find(name)? + name.len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A redis-server on a free loopback port, killed on drop.
struct RedisServer(Child);

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Finds and starts `redis-server` as `scripts/test.sh` finds it; `None` when
/// there is none (or it does not come up).
fn start_redis_server() -> Option<(String, RedisServer)> {
    let candidates = std::env::var("REDIS_SERVER")
        .ok()
        .into_iter()
        .chain(std::env::var("PATH").ok().into_iter().flat_map(|path| {
            path.split(':')
                .map(|dir| format!("{dir}/redis-server"))
                .collect::<Vec<_>>()
        }))
        .chain(
            ["/usr/bin", "/usr/local/bin", "/usr/sbin"]
                .iter()
                .map(|d| format!("{d}/redis-server")),
        );
    let binary = candidates
        .into_iter()
        .find(|c| std::path::Path::new(c).is_file())?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let mut child = Command::new(&binary)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    // Ready when it logs so (or at least accepts connections).
    let stdout = child.stdout.take()?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("Ready to accept connections") {
                let _ = ready_tx.send(());
            }
        }
    });
    let server = RedisServer(child);
    ready_rx.recv_timeout(Duration::from_secs(5)).ok()?;
    TcpStream::connect(("127.0.0.1", port)).ok()?;
    eprintln!("fleet: started {binary} on port {port}");
    Some((format!("redis://127.0.0.1:{port}"), server))
}
