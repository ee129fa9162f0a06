//! Fault: the lock holder crashes. A separate OS process (this test binary,
//! re-executed) takes the lock on 3 real masters and is SIGKILLed in the middle
//! of its load; the waiters in this process load once the lock expires.

mod support;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use locked_cache::{LoadError, LockedCache};
use support::{Fleet, join_all_checked, unique_prefix};

const URLS_ENV: &str = "LC_HOLDER_URLS";
const PREFIX_ENV: &str = "LC_HOLDER_PREFIX";
const KEY_ENV: &str = "LC_HOLDER_KEY";
const EXPIRY_ENV: &str = "LC_HOLDER_EXPIRY_MS";
const LOADING: &str = "LOADING";

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
    let expiry = Duration::from_millis(env(EXPIRY_ENV).parse().expect("expiry ms"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let cache = LockedCache::builder()
            .masters(urls.split(','))
            .key_prefix(prefix)
            .lock_expiry(expiry)
            .build()
            .await
            .expect("holder: build");
        let r: Result<String, LoadError<String>> = cache
            .get_or_load(&key, || async {
                println!("{LOADING} pid={}", std::process::id());
                std::future::pending().await
            })
            .await;
        panic!("holder: the load was supposed to hang, got {r:?}");
    });
}

/// A holder process, SIGKILLed when dropped.
struct Holder {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl Holder {
    fn spawn(urls: &[String], prefix: &str, key: &str, expiry: Duration) -> Holder {
        let mut child = Command::new(std::env::current_exe().expect("current_exe"))
            .args([
                "--exact",
                "holder_process_entry",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(URLS_ENV, urls.join(","))
            .env(PREFIX_ENV, prefix)
            .env(KEY_ENV, key)
            .env(EXPIRY_ENV, expiry.as_millis().to_string())
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
