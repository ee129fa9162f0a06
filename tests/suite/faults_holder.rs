//! Fault: the lock holder crashes. A separate OS process (this test binary,
//! re-executed) takes the lock on 3 real masters and is SIGKILLed in the middle
//! of its load; the waiters in this process load once the lock expires.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use crate::support::{Fleet, join_all_checked, unique_prefix};
use locked_cache::{LoadError, LockedCache};

const URLS_ENV: &str = "LC_HOLDER_URLS";
const PREFIX_ENV: &str = "LC_HOLDER_PREFIX";
const KEY_ENV: &str = "LC_HOLDER_KEY";
const EXPIRY_ENV: &str = "LC_HOLDER_EXPIRY_MS";
const LOADING: &str = "LOADING";
/// When set, the holder's load takes this long and then returns its value
/// (otherwise it hangs until killed). Each load first counts itself with
/// `INCR <prefix>loads` on the first master, so loads are counted across
/// processes.
const LOAD_MS_ENV: &str = "LC_HOLDER_LOAD_MS";
/// Printed by a holder whose load returned: `DONE refused=<writes refused>`.
const DONE: &str = "DONE";

/// The holder process's entry point. In a normal test run (the variable unset)
/// it does nothing. Re-executed by [`Holder::spawn`], it takes the lock through
/// `get_or_load` and, inside the loader, prints `LOADING` and sleeps forever, its
/// keep-alive extending the lock, until the parent kills it.
#[test]
fn holder_process_entry() {
    let Ok(urls) = std::env::var(URLS_ENV) else {
        return;
    };
    let env = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} unset"));
    let (prefix, key) = (env(PREFIX_ENV), env(KEY_ENV));
    // Unset: the library's default lock expiry.
    let expiry = std::env::var(EXPIRY_ENV)
        .ok()
        .map(|ms| Duration::from_millis(ms.parse().expect("expiry ms")));
    let load_for = std::env::var(LOAD_MS_ENV)
        .ok()
        .map(|ms| Duration::from_millis(ms.parse().expect("load ms")));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let first = urls.split(',').next().unwrap().to_owned();
        let mut builder = LockedCache::builder()
            .masters(urls.split(','))
            .key_prefix(&prefix);
        if let Some(expiry) = expiry {
            builder = builder.lock_expiry(expiry);
        }
        let cache = builder.build().await.expect("holder: build");
        let r: Result<String, LoadError<String>> = cache
            .get_or_load(&key, || async {
                count_load(&first, &prefix);
                println!("{LOADING} pid={}", std::process::id());
                match load_for {
                    Some(load_for) => tokio::time::sleep(load_for).await,
                    None => std::future::pending().await,
                }
                Ok(format!("holder {}", std::process::id()))
            })
            .await;
        match (load_for, r) {
            (Some(_), Ok(_)) => println!("{DONE} refused={}", cache.stats().writes_refused),
            (_, r) => panic!("holder: unexpected end of the load: {r:?}"),
        }
    });
}

/// Counts one load of the test under `prefix`, on the server at `url`.
fn count_load(url: &str, prefix: &str) {
    let mut conn = redis::Client::open(url)
        .and_then(|c| c.get_connection())
        .expect("count_load: connect");
    let _: u64 = redis::cmd("INCR")
        .arg(format!("{prefix}loads"))
        .query(&mut conn)
        .expect("count_load: INCR");
}

/// A holder process, SIGKILLed when dropped.
struct Holder {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl Holder {
    fn spawn(urls: &[String], prefix: &str, key: &str, expiry: Duration) -> Holder {
        Holder::spawn_with(urls, prefix, key, Some(expiry), None)
    }

    /// A holder with the library's default lock expiry when `expiry` is
    /// `None`, whose load returns after `load_for` (hangs when `None`).
    fn spawn_with(
        urls: &[String],
        prefix: &str,
        key: &str,
        expiry: Option<Duration>,
        load_for: Option<Duration>,
    ) -> Holder {
        let mut command = Command::new(std::env::current_exe().expect("current_exe"));
        command
            .args([
                "--exact",
                "faults_holder::holder_process_entry",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(URLS_ENV, urls.join(","))
            .env(PREFIX_ENV, prefix)
            .env(KEY_ENV, key);
        if let Some(expiry) = expiry {
            command.env(EXPIRY_ENV, expiry.as_millis().to_string());
        }
        if let Some(load_for) = load_for {
            command.env(LOAD_MS_ENV, load_for.as_millis().to_string());
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the holder process");
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Holder {
            child,
            lines,
            stderr,
        }
    }

    /// Blocks until the holder prints a line containing `marker` (libtest may
    /// have printed `test holder_process_entry ... ` before it on the same line).
    fn wait_for_line(&self, marker: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(marker) => return line,
                Ok(_) => {}
                Err(e) => panic!(
                    "holder did not print {marker:?} ({e}); its stderr:\n{}",
                    self.stderr.lock().unwrap()
                ),
            }
        }
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`).
    fn stop(&self, stop: bool) {
        let signal = if stop { "-STOP" } else { "-CONT" };
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} failed");
    }

    /// SIGKILL, then reap.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The holder process takes the lock on 3 masters and is SIGKILLed mid-load
/// while 60 callers in 2 caches of this process wait. Until the kill, they wait
/// (even past one lock expiry: the holder's keep-alive extends the lock); after
/// it, exactly one of them loads, within lock expiry + retry (+ 300 ms slack) of
/// the kill and not before the lock could have expired, and all get its value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_process_sigkilled_mid_load_waiters_elsewhere_load_once_after_expiry() {
    let fleet = Fleet::start(3);
    let prefix = unique_prefix("holder");
    let expiry = Duration::from_millis(600);
    let retry = Duration::from_millis(50);
    let mut holder = Holder::spawn(&fleet.urls(), &prefix, "report", expiry);
    tokio::task::block_in_place(|| holder.wait_for_line(LOADING, Duration::from_secs(20)));

    let mut caches = Vec::new();
    for _ in 0..2 {
        caches.push(
            LockedCache::builder()
                .masters(fleet.urls())
                .key_prefix(&prefix)
                .lock_expiry(expiry)
                .retry_time(retry)
                .wait_time(Duration::from_secs(5))
                .build()
                .await
                .unwrap(),
        );
    }
    let lock_key = caches[0].lock_key("report");
    let held_on = |fleet: &Fleet| {
        fleet
            .servers
            .iter()
            .filter(|s| s.query::<Option<String>>(&["GET", &lock_key]).is_some())
            .count()
    };
    assert!(
        held_on(&fleet) >= 2,
        "the holder should hold the lock on a majority"
    );

    let runs = Arc::new(AtomicU32::new(0));
    let load_started: Arc<Mutex<Option<Instant>>> = Arc::default();
    let mut calls = Vec::new();
    for i in 0..60 {
        let cache = caches[i % 2].clone();
        let (runs, load_started) = (Arc::clone(&runs), Arc::clone(&load_started));
        calls.push(tokio::spawn(async move {
            cache
                .get_or_load("report", || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    load_started.lock().unwrap().get_or_insert(Instant::now());
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok::<_, String>(format!("loaded by {}", std::process::id()))
                })
                .await
        }));
    }
    // Longer than the expiry: only the holder's keep-alive keeps the waiters out.
    tokio::time::sleep(expiry + Duration::from_millis(200)).await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "a waiter loaded while the holder lived"
    );
    assert!(
        calls.iter().all(|c| !c.is_finished()),
        "a waiter gave up early"
    );
    assert!(
        held_on(&fleet) >= 2,
        "the live holder's lock was not extended"
    );

    holder.kill();
    let killed_at = Instant::now();
    let results = join_all_checked(calls).await;
    let done = killed_at.elapsed();
    let expected = format!("loaded by {}", std::process::id());
    for r in results {
        assert_eq!(r.unwrap(), expected);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "exactly one more load");
    let after_kill = load_started.lock().unwrap().unwrap() - killed_at;
    // At the kill the lock had between expiry - expiry/3 and expiry left.
    assert!(
        after_kill >= expiry / 2,
        "loaded {after_kill:?} after the kill: the lock cannot have expired yet"
    );
    let bound = expiry + retry * 3 / 2 + Duration::from_millis(300);
    assert!(
        after_kill <= bound,
        "loaded {after_kill:?} after the kill, over expiry + retry + slack = {bound:?}"
    );
    for cache in &caches {
        assert_eq!(cache.stats().lock_timeouts, 0);
    }
    eprintln!(
        "holder SIGKILLed: load started {after_kill:?} after the kill (expiry {expiry:?}), all 60 calls done after {done:?}; loads: 1"
    );
}

/// How many loads of the test under `prefix` ran, in every process.
fn loads_counted(fleet: &Fleet, prefix: &str) -> u64 {
    fleet.servers[0]
        .query::<Option<u64>>(&["GET", &format!("{prefix}loads")])
        .unwrap_or(0)
}

/// With the library's defaults (no lock expiry, retry or wait set), a holder
/// process SIGKILLed at 10 %, 50 % and 90 % of a 2 s load costs the survivors
/// (two caches with 20 callers each) under a second: one of them starts
/// loading within 1 s of the kill, everyone is served within 1 s + the load
/// time, and the loader ran at most twice (the dead holder's and one
/// survivor's), counted across processes in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_holder_costs_the_survivors_under_a_second_with_the_defaults() {
    let fleet = Fleet::start(3);
    let load = Duration::from_secs(2);
    let mut report = Vec::new();
    for percent in [10_u32, 50, 90] {
        let prefix = unique_prefix("killed_default");
        let mut holder = Holder::spawn_with(&fleet.urls(), &prefix, "page", None, Some(load));
        tokio::task::block_in_place(|| holder.wait_for_line(LOADING, Duration::from_secs(20)));
        let loading_since = Instant::now();
        let mut caches = Vec::new();
        for _ in 0..2 {
            caches.push(
                LockedCache::builder()
                    .masters(fleet.urls())
                    .key_prefix(&prefix)
                    .build()
                    .await
                    .unwrap(),
            );
        }
        let first = fleet.urls()[0].clone();
        let load_started: Arc<Mutex<Option<Instant>>> = Arc::default();
        let mut calls = Vec::new();
        for i in 0..40 {
            let cache = caches[i % 2].clone();
            let (first, prefix) = (first.clone(), prefix.clone());
            let load_started = Arc::clone(&load_started);
            calls.push(tokio::spawn(async move {
                let value = cache
                    .get_or_load("page", || async move {
                        load_started.lock().unwrap().get_or_insert(Instant::now());
                        tokio::task::block_in_place(|| count_load(&first, &prefix));
                        tokio::time::sleep(load).await;
                        Ok::<_, String>(format!("survivor {}", std::process::id()))
                    })
                    .await;
                (value, Instant::now())
            }));
        }
        let kill_at = load * percent / 100;
        tokio::time::sleep(kill_at.saturating_sub(loading_since.elapsed())).await;
        assert!(
            load_started.lock().unwrap().is_none(),
            "a survivor loaded while the holder lived"
        );
        holder.kill();
        let killed_at = Instant::now();
        let results = join_all_checked(calls).await;
        let expected = format!("survivor {}", std::process::id());
        let mut last_served = killed_at;
        for (value, served_at) in results {
            assert_eq!(value.unwrap(), expected);
            last_served = last_served.max(served_at);
        }
        let takeover = load_started.lock().unwrap().expect("a survivor loaded") - killed_at;
        let served = last_served - killed_at;
        let loads = loads_counted(&fleet, &prefix);
        assert!(
            loads <= 2,
            "{loads} loads: the dead holder's and more than one survivor's"
        );
        assert!(
            takeover <= Duration::from_millis(1000),
            "killed at {percent} %: a survivor took over {takeover:?} after the kill"
        );
        assert!(
            served <= Duration::from_millis(1000) + load + Duration::from_millis(200),
            "killed at {percent} %: the last survivor was served {served:?} after the kill"
        );
        report.push(format!(
            "{percent} %: takeover {takeover:?}, last served {served:?} after the kill, {loads} loads"
        ));
    }
    eprintln!("holder SIGKILLed, library defaults: {}", report.join("; "));
}

/// With the defaults, a holder SIGSTOPped mid-load for 3 s loses its lock:
/// the survivors take the key over and store their value; when the holder
/// resumes and its load returns, its write is refused by the fence, and the
/// survivors' value stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_holders_late_write_is_refused_with_the_defaults() {
    let fleet = Fleet::start(3);
    let prefix = unique_prefix("paused_default");
    let holder = Holder::spawn_with(
        &fleet.urls(),
        &prefix,
        "page",
        None,
        Some(Duration::from_millis(500)),
    );
    tokio::task::block_in_place(|| holder.wait_for_line(LOADING, Duration::from_secs(20)));
    holder.stop(true);
    let stopped_at = Instant::now();
    let cache = LockedCache::builder()
        .masters(fleet.urls())
        .key_prefix(&prefix)
        .build()
        .await
        .unwrap();
    let first = fleet.urls()[0].clone();
    let survivors: Vec<_> = (0..20)
        .map(|_| {
            let (cache, first, prefix) = (cache.clone(), first.clone(), prefix.clone());
            tokio::spawn(async move {
                cache
                    .get_or_load("page", || async move {
                        tokio::task::block_in_place(|| count_load(&first, &prefix));
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Ok::<_, String>("survivor".to_owned())
                    })
                    .await
            })
        })
        .collect();
    for value in join_all_checked(survivors).await {
        assert_eq!(value.unwrap(), "survivor");
    }
    let served = stopped_at.elapsed();
    assert!(
        served < Duration::from_secs(3),
        "the survivors waited {served:?} for a paused holder"
    );
    // Resume the holder after 3 s of pause: its load returns, its write must
    // be refused.
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(stopped_at.elapsed())).await;
    holder.stop(false);
    let done = tokio::task::block_in_place(|| holder.wait_for_line(DONE, Duration::from_secs(10)));
    assert!(
        done.contains("refused=1"),
        "the paused holder's write: {done}"
    );
    assert_eq!(
        cache.get::<String>("page").await.unwrap().as_deref(),
        Some("survivor"),
        "the survivors' value stays"
    );
    assert_eq!(
        loads_counted(&fleet, &prefix),
        2,
        "the holder's load and one survivor's"
    );
    eprintln!("holder SIGSTOPped 3 s, library defaults: survivors served after {served:?}; {done}");
}
