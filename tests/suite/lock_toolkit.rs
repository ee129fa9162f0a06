//! The lock toolkit over fleets of real redis-server processes: the guard's
//! watchdog and lost-lock signal, fencing tokens (monotonic under contention,
//! across a master restart, in the cache's `LoadContext`), multi-key locks
//! (no deadlock in any order), run-once windows, inspection, a holder process
//! SIGKILLed mid-hold and a master killed mid-hold.

use crate::support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::{Fleet, join_all_checked, redlock_on, unique_prefix};
use locked_cache::{LockLost, LockOptions, LockedCache, Redlock, RunOnce};

fn contended() -> LockOptions {
    LockOptions {
        wait: Duration::from_secs(60),
        retry: Duration::from_millis(20),
        ..LockOptions::default()
    }
}

/// 200 holders from 4 Redlocks (separate connections) take one lock; each
/// checks that nobody else is inside and that its fencing token is higher than
/// every token committed before it (a "database" that refuses lower tokens).
async fn fencing_under_contention(masters: usize) {
    const HOLDERS: usize = 200;
    let fleet = Fleet::start(masters);
    let mut locks = Vec::new();
    for _ in 0..4 {
        locks.push(redlock_on(&fleet.urls(), contended()).await);
    }
    let resource = format!("{}fenced", unique_prefix("fencing"));
    let inside = Arc::new(AtomicUsize::new(0));
    let committed = Arc::new(Mutex::new(0u64));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..HOLDERS {
        let lock = locks[i % locks.len()].clone();
        let (resource, inside, committed) = (
            resource.clone(),
            Arc::clone(&inside),
            Arc::clone(&committed),
        );
        tasks.push(tokio::spawn(async move {
            let guard = lock.acquire(&resource).await.expect("acquire");
            assert_eq!(
                inside.fetch_add(1, Ordering::SeqCst),
                0,
                "two holders at once"
            );
            tokio::task::yield_now().await;
            {
                let mut last = committed.lock().unwrap();
                assert!(
                    guard.fencing_token() > *last,
                    "token {} not above the last committed {}",
                    guard.fencing_token(),
                    *last
                );
                *last = guard.fencing_token();
            }
            inside.fetch_sub(1, Ordering::SeqCst);
            assert!(guard.release().await.expect("release"), "lost mid-hold");
        }));
    }
    join_all_checked(tasks).await;
    eprintln!(
        "fencing on {masters} masters: {HOLDERS} holders, exclusive and strictly increasing tokens, last {}, in {:?}",
        committed.lock().unwrap(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_increase_under_contention_on_1_master() {
    fencing_under_contention(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_increase_under_contention_on_3_masters() {
    fencing_under_contention(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_increase_under_contention_on_5_masters() {
    fencing_under_contention(5).await;
}

/// A master restarted without persistence loses its counters: with 3 masters
/// the next token is still higher (the majority kept theirs); and even the
/// only master restarted hands out a higher one (seeded from its clock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_stay_monotonic_across_a_master_restart() {
    for masters in [3, 1] {
        let mut fleet = Fleet::start(masters);
        let lock = redlock_on(&fleet.urls(), LockOptions::default()).await;
        let name = format!("{}restart", unique_prefix("fencing"));
        let mut tokens = Vec::new();
        for _ in 0..3 {
            let guard = lock.acquire(&name).await.unwrap();
            tokens.push(guard.fencing_token());
            guard.release().await.unwrap();
        }
        fleet.restart(0);
        let mut after = None;
        for _ in 0..50 {
            match lock.acquire(&name).await {
                Ok(guard) => {
                    after = Some(guard.fencing_token());
                    guard.release().await.unwrap();
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        let after = after.expect("acquire after the restart");
        assert!(tokens.windows(2).all(|w| w[1] > w[0]), "{tokens:?}");
        assert!(
            after > tokens[2],
            "{masters} masters: {after} after {tokens:?}"
        );
        eprintln!("restart of master 0 of {masters}: tokens {tokens:?} then {after}");
    }
}

/// The watchdog keeps a lock 4× past its expiry; deleting the key on every
/// master fires the lost signal with `Refused`; without the watchdog the
/// signal fires with `Expired` once the validity runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_keeps_the_lock_and_the_lost_signal_says_why() {
    let fleet = Fleet::start(3);
    let expiry = Duration::from_millis(300);
    let options = LockOptions {
        expiry,
        ..LockOptions::default()
    };
    let holder = redlock_on(&fleet.urls(), options.clone()).await;
    let other = redlock_on(&fleet.urls(), options.clone()).await;
    let name = format!("{}watched", unique_prefix("watchdog"));

    let guard = holder.acquire(&name).await.unwrap();
    let until = Instant::now() + expiry * 4;
    while Instant::now() < until {
        assert!(
            other.try_acquire(&name, expiry).await.unwrap().is_none(),
            "taken from a live holder"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!guard.is_lost() && !guard.is_expired());
    let signal = guard.lost_signal().expect("a watchdog");
    for server in &fleet.servers {
        server.cmd(&["DEL", &name]);
    }
    let deleted = Instant::now();
    let reason = tokio::time::timeout(expiry * 2, guard.lost())
        .await
        .expect("lost signal");
    assert!(matches!(reason, LockLost::Refused), "{reason:?}");
    assert!(signal.is_lost() && guard.is_lost());
    eprintln!(
        "lost signal {:?} after the keys were deleted: {reason}",
        deleted.elapsed()
    );
    drop(guard);

    let mut unwatched = redlock_on(
        &fleet.urls(),
        LockOptions {
            watchdog: false,
            ..options
        },
    )
    .await
    .acquire(&name)
    .await
    .unwrap();
    let acquired = Instant::now();
    let reason = tokio::time::timeout(expiry * 3, unwatched.lost())
        .await
        .expect("expired signal");
    assert!(
        matches!(reason, LockLost::Expired { last_error: None }),
        "{reason:?}"
    );
    let after = acquired.elapsed();
    assert!(
        after >= expiry / 2 && after <= expiry + Duration::from_millis(200),
        "{after:?}"
    );
    // The validity ends a little before the masters' keys do (drift allowance).
    assert!(
        support::eventually(Duration::from_millis(200), || async {
            other.try_acquire(&name, expiry).await.unwrap().is_some()
        })
        .await,
        "expired, so free"
    );
    // stop_watchdog on a watched guard: the same, per acquisition.
    let mut opted_out = holder.acquire(&format!("{name}.2")).await.unwrap();
    opted_out.stop_watchdog();
    let reason = tokio::time::timeout(expiry * 3, opted_out.lost())
        .await
        .expect("expired");
    assert!(matches!(reason, LockLost::Expired { .. }));
    assert!(unwatched.extend(expiry).await.is_ok());
}

/// The cache hands its loader the lock's fencing token; each load of a key
/// gets a higher one (the masters' clock at the grant), and none is left on
/// the masters afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_context_carries_a_rising_fencing_token() {
    let fleet = Fleet::start(3);
    let cache = LockedCache::builder()
        .masters(fleet.urls())
        .key_prefix(unique_prefix("ctx"))
        .build()
        .await
        .unwrap();
    let mut tokens = Vec::new();
    for _ in 0..3 {
        let token: u64 = cache
            .get_or_load("k", || async move {
                let ctx = locked_cache::LoadContext::current().expect("inside a loader");
                assert!(!ctx.is_lock_lost());
                Ok::<_, String>(ctx.fencing_token().expect("a token"))
            })
            .await
            .unwrap();
        tokens.push(token);
        cache.invalidate("k").await.unwrap();
    }
    assert!(tokens.windows(2).all(|w| w[1] > w[0]), "{tokens:?}");
    let info = cache.lock().inspect(&cache.lock_key("k")).await.unwrap();
    // A load's lock keeps no counter once released (nothing is left behind on
    // the masters): its tokens are the masters' clocks, in microseconds.
    assert_eq!(info.fencing_token, 0, "a load leaves no counter");
    assert!(info.holders.is_empty());
    let now_micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    assert!(
        tokens[2] <= now_micros + 1_000_000 && tokens[0] + 60_000_000 > now_micros,
        "tokens are clock readings: {tokens:?} vs {now_micros}"
    );
}

/// 150 tasks from 4 Redlocks each take two or three of the names a, b, c, in
/// a random order; nobody ever shares a name, and every call completes (no
/// deadlock).
async fn multi_key(masters: usize) {
    const CALLS: usize = 150;
    let fleet = Fleet::start(masters);
    let mut locks = Vec::new();
    for _ in 0..4 {
        locks.push(redlock_on(&fleet.urls(), contended()).await);
    }
    let prefix = unique_prefix("multi");
    let names: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|n| format!("{prefix}{n}"))
        .collect();
    let inside: Arc<HashMap<String, AtomicUsize>> = Arc::new(
        names
            .iter()
            .map(|n| (n.clone(), AtomicUsize::new(0)))
            .collect(),
    );
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..CALLS {
        let lock = locks[i % locks.len()].clone();
        let mut mine = names.clone();
        fastrand_shuffle(&mut mine, i);
        mine.truncate(2 + i % 2);
        let inside = Arc::clone(&inside);
        tasks.push(tokio::spawn(async move {
            let refs: Vec<&str> = mine.iter().map(String::as_str).collect();
            let guard = lock.acquire_all(&refs).await.expect("acquire_all");
            assert_eq!(guard.fencing_tokens().len(), mine.len());
            for n in &mine {
                assert_eq!(inside[n].fetch_add(1, Ordering::SeqCst), 0, "{n} shared");
            }
            tokio::task::yield_now().await;
            for n in &mine {
                inside[n].fetch_sub(1, Ordering::SeqCst);
            }
            assert!(guard.release().await.unwrap());
        }));
    }
    join_all_checked(tasks).await;
    eprintln!(
        "multi-key on {masters} masters: {CALLS} calls over 2-3 of 3 names in random orders, exclusive, done in {:?}",
        started.elapsed()
    );
}

/// A deterministic shuffle (the order each caller names its locks in).
fn fastrand_shuffle(names: &mut [String], seed: usize) {
    let n = names.len();
    for i in (1..n).rev() {
        let j = (seed * 7 + i * 13) % (i + 1);
        names.swap(i, j);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_key_locks_exclude_and_never_deadlock_on_1_master() {
    multi_key(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_key_locks_exclude_and_never_deadlock_on_3_masters() {
    multi_key(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_key_locks_exclude_and_never_deadlock_on_5_masters() {
    multi_key(5).await;
}

/// 100 callers from 4 Redlocks call `run_once` on one key with a 1.5 s
/// window: exactly one runs the action. After the window, the next call runs
/// it again.
async fn run_once(masters: usize) {
    let fleet = Fleet::start(masters);
    let mut locks = Vec::new();
    for _ in 0..4 {
        locks.push(redlock_on(&fleet.urls(), contended()).await);
    }
    let key = format!("{}digest", unique_prefix("once"));
    let window = Duration::from_millis(1500);
    let runs = Arc::new(AtomicU32::new(0));
    let ran_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let mut tasks = Vec::new();
    let started = Instant::now();
    for i in 0..100 {
        let (lock, key, runs) = (locks[i % 4].clone(), key.clone(), Arc::clone(&runs));
        let ran_at = Arc::clone(&ran_at);
        tasks.push(tokio::spawn(async move {
            lock.run_once(&key, window, || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                *ran_at.lock().unwrap() = Some(Instant::now());
                i
            })
            .await
            .expect("run_once")
        }));
    }
    let outcomes = join_all_checked(tasks).await;
    let ran = outcomes.iter().filter(|o| o.ran()).count();
    assert_eq!(ran, 1, "ran {ran} times in one window");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let elapsed = started.elapsed();
    assert!(
        elapsed < window,
        "the burst took longer than the window: {elapsed:?}"
    );
    // Still the same window: skipped.
    let inside = locks[2]
        .run_once(&key, window, || async { 0 })
        .await
        .unwrap();
    assert_eq!(inside, RunOnce::Skipped);
    // The window counts from when the winner took it (at most just before it ran).
    let ran_at = ran_at.lock().unwrap().unwrap();
    tokio::time::sleep(
        (ran_at + window + Duration::from_millis(50)).saturating_duration_since(Instant::now()),
    )
    .await;
    let again = locks[1]
        .run_once(&key, window, || async { 7 })
        .await
        .unwrap();
    assert_eq!(again, RunOnce::Ran(7), "a new window");
    eprintln!("run_once on {masters} masters: 100 callers, 1 ran, burst decided in {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_once_runs_once_per_window_on_1_master() {
    run_once(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_once_runs_once_per_window_on_3_masters() {
    run_once(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_once_runs_once_per_window_on_5_masters() {
    run_once(5).await;
}

/// Another process's view of a held lock: its owner (host, pid, since), the
/// time it has left on a majority of masters, and the last fencing token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_names_the_holder_and_its_time_left() {
    let fleet = Fleet::start(3);
    let expiry = Duration::from_secs(2);
    let options = LockOptions {
        expiry,
        ..LockOptions::default()
    };
    let lock = redlock_on(&fleet.urls(), options.clone()).await;
    let operator = redlock_on(&fleet.urls(), options).await;
    let name = format!("{}report", unique_prefix("inspect"));
    let before = std::time::SystemTime::now();
    let guard = lock.acquire(&name).await.unwrap();
    let info = operator.inspect(&name).await.unwrap();
    assert_eq!((info.answered, info.quorum), (3, 2));
    let holder = info.holding().next().expect("a holder");
    let owner = holder.owner.as_ref().expect("owner metadata");
    assert_eq!(owner.pid, std::process::id());
    assert!(!owner.host.is_empty() && !owner.process.is_empty());
    assert!(owner.since >= before - Duration::from_secs(1));
    assert!(holder.ttl > Duration::ZERO && holder.ttl <= expiry);
    assert_eq!(holder.masters, 3);
    // The highest counter of any master: at least this guard's token (a master
    // that granted after the majority may be ahead; never behind).
    assert!(info.fencing_token >= guard.fencing_token());
    eprintln!("inspect: {holder:?}, last token {}", info.fencing_token);
    guard.release().await.unwrap();
    let info = operator.inspect(&name).await.unwrap();
    assert!(info.holders.is_empty(), "{info:?}");
}

/// Every primitive on the embedded store, with the same semantics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primitives_work_on_the_embedded_store() {
    let lock = Redlock::in_memory(LockOptions::default()).await.unwrap();
    let a = lock.acquire("m").await.unwrap();
    let b = lock
        .try_acquire_all(&["n", "m"], Duration::from_secs(1))
        .await
        .unwrap();
    assert!(b.is_none(), "m is held");
    let t = a.fencing_token();
    a.release().await.unwrap();
    let b = lock.acquire_all(&["n", "m"]).await.unwrap();
    assert!(b.fencing_tokens()[0] > t, "m's token rose");
    assert_eq!(b.names(), vec!["m", "n"]);
    b.release().await.unwrap();
    let rw = lock.rw_lock("rw");
    let r1 = rw.read().await.unwrap();
    let r2 = rw.read().await.unwrap();
    assert!(
        rw.try_write(Duration::from_secs(1))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        rw.try_read(Duration::from_secs(1)).await.unwrap().is_none(),
        "a writer waits"
    );
    assert_eq!(rw.inspect().await.unwrap().holders.len(), 2);
    drop((r1, r2));
    let w = rw.write().await.unwrap();
    w.release().await.unwrap();
    let sem = lock.semaphore("s", 2).unwrap();
    let p1 = sem.acquire().await.unwrap();
    let _p2 = sem.acquire().await.unwrap();
    assert!(
        sem.try_acquire(Duration::from_secs(1))
            .await
            .unwrap()
            .is_none()
    );
    p1.release().await.unwrap();
    assert!(
        sem.try_acquire(Duration::from_secs(1))
            .await
            .unwrap()
            .is_some()
    );
    let once = lock
        .run_once("o", Duration::from_secs(5), || async { 1 })
        .await
        .unwrap();
    let twice = lock
        .run_once("o", Duration::from_secs(5), || async { 2 })
        .await
        .unwrap();
    assert_eq!((once, twice), (RunOnce::Ran(1), RunOnce::Skipped));
}

/// 3 masters; an exclusive lock, a multi-key lock, a reader and a writer (of
/// two rw locks) are held when master 0 is SIGKILLed: every guard keeps its
/// lock on the other two (the watchdog extends there), others stay out, and
/// all are released cleanly afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_mid_hold_loses_no_guard() {
    let mut fleet = Fleet::start(3);
    let expiry = Duration::from_millis(400);
    let options = LockOptions {
        expiry,
        ..LockOptions::default()
    };
    let holder = redlock_on(&fleet.urls(), options.clone()).await;
    let other = redlock_on(&fleet.urls(), options).await;
    let p = unique_prefix("masterkill");
    let (x, m1, m2, rw1, rw2) = (
        format!("{p}x"),
        format!("{p}m1"),
        format!("{p}m2"),
        format!("{p}rw1"),
        format!("{p}rw2"),
    );
    let guards = vec![
        holder.acquire(&x).await.unwrap(),
        holder.acquire_all(&[&m1, &m2]).await.unwrap(),
        holder.rw_lock(&rw1).read().await.unwrap(),
        holder.rw_lock(&rw2).write().await.unwrap(),
    ];
    fleet.kill(0);
    let killed = Instant::now();
    while killed.elapsed() < expiry * 3 {
        assert!(other.try_acquire(&x, expiry).await.unwrap().is_none());
        assert!(
            other
                .try_acquire_all(&[&m2], expiry)
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            other
                .rw_lock(&rw1)
                .try_write(expiry)
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            other
                .rw_lock(&rw2)
                .try_read(expiry)
                .await
                .unwrap()
                .is_none()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for guard in guards {
        assert!(!guard.is_lost(), "{} lost", guard.resource());
        assert!(guard.release().await.unwrap(), "released on the majority");
    }
    // Free at once, not by expiry: each is taken within 150 ms, while a lock
    // left behind would live at least 260 ms more (its last extension was at
    // most a third of the expiry before the release). Single attempts may lose
    // to a loaded machine (both live masters must answer in time), so a few.
    let within = Duration::from_millis(150);
    assert!(
        support::eventually(within, || async {
            other.try_acquire(&x, expiry).await.unwrap().is_some()
        })
        .await
    );
    assert!(
        support::eventually(within, || async {
            other
                .try_acquire_all(&[&m1, &m2], expiry)
                .await
                .unwrap()
                .is_some()
        })
        .await
    );
    assert!(
        support::eventually(within, || async {
            other
                .rw_lock(&rw1)
                .try_write(expiry)
                .await
                .unwrap()
                .is_some()
        })
        .await
    );
    assert!(
        support::eventually(within, || async {
            other
                .rw_lock(&rw2)
                .try_read(expiry)
                .await
                .unwrap()
                .is_some()
        })
        .await
    );
}

const HOLD_URLS_ENV: &str = "LC_TOOLKIT_HOLDER_URLS";
const HOLD_NAME_ENV: &str = "LC_TOOLKIT_HOLDER_NAME";
const HOLDING: &str = "HOLDING";

/// The holder process's entry point: in a normal run (the variable unset) it
/// does nothing. Re-executed by `a_holder_sigkilled_mid_hold_frees_every_lock_after_expiry`,
/// it takes an exclusive lock, a multi-key lock and a write lock on the 3
/// masters and a semaphore permit on the first, prints `HOLDING` and sleeps,
/// its watchdogs extending everything, until it is killed.
#[test]
fn toolkit_holder_process_entry() {
    let Ok(urls) = std::env::var(HOLD_URLS_ENV) else {
        return;
    };
    let name = std::env::var(HOLD_NAME_ENV).expect("name");
    let urls: Vec<String> = urls.split(',').map(str::to_owned).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let options = LockOptions {
            expiry: Duration::from_millis(600),
            ..LockOptions::default()
        };
        let lock = redlock_on(&urls, options.clone()).await;
        let single = redlock_on(&urls[..1], options).await;
        let _x = lock.acquire(&format!("{name}x")).await.unwrap();
        let _m = lock
            .acquire_all(&[&format!("{name}m1"), &format!("{name}m2")])
            .await
            .unwrap();
        let _w = lock.rw_lock(&format!("{name}rw")).write().await.unwrap();
        let _p = single
            .semaphore(&format!("{name}sem"), 1)
            .unwrap()
            .acquire()
            .await
            .unwrap();
        println!("{HOLDING} pid={}", std::process::id());
        std::future::pending::<()>().await;
    });
}

/// Kills the child (SIGKILL) when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A separate process holds an exclusive lock, a multi-key lock, a write lock
/// and the one permit of a semaphore, and is SIGKILLed. While it lives, each
/// stays held past its expiry (its watchdogs); after the kill, waiters here get
/// each of them once it expired: no sooner than half the expiry, no later
/// than expiry + 400 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_sigkilled_mid_hold_frees_every_lock_after_expiry() {
    let fleet = Fleet::start(3);
    let name = unique_prefix("sigkill");
    let expiry = Duration::from_millis(600);
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "lock_toolkit::toolkit_holder_process_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HOLD_URLS_ENV, fleet.urls().join(","))
        .env(HOLD_NAME_ENV, &name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the holder");
    let mut child = Killed(child);
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains(HOLDING) {
                let _ = tx.send(());
            }
        }
    });
    tokio::task::block_in_place(|| rx.recv_timeout(Duration::from_secs(20)))
        .expect("the holder did not report HOLDING");

    let options = LockOptions {
        expiry,
        wait: Duration::from_secs(10),
        retry: Duration::from_millis(50),
        ..LockOptions::default()
    };
    let lock = redlock_on(&fleet.urls(), options.clone()).await;
    let single = redlock_on(&fleet.urls()[..1], options).await;
    tokio::time::sleep(expiry + Duration::from_millis(200)).await;
    let info = lock.inspect(&format!("{name}x")).await.unwrap();
    let pid = info
        .holding()
        .next()
        .and_then(|h| h.owner.as_ref())
        .map(|o| o.pid);
    assert_eq!(pid, Some(child.0.id()), "the child holds x past its expiry");
    let sem = single.semaphore(&format!("{name}sem"), 1).unwrap();
    assert!(
        sem.try_acquire(expiry).await.unwrap().is_none(),
        "the child's permit"
    );

    let _ = child.0.kill();
    let _ = child.0.wait();
    let killed = Instant::now();
    let (x, m1, m2, rw) = (
        format!("{name}x"),
        format!("{name}m1"),
        format!("{name}m2"),
        format!("{name}rw"),
    );
    let (lx, lm, lr) = (lock.clone(), lock.clone(), lock.clone());
    let waits = vec![
        tokio::spawn(async move { lx.acquire(&x).await.map(|_| killed.elapsed()) }),
        tokio::spawn(async move { lm.acquire_all(&[&m2, &m1]).await.map(|_| killed.elapsed()) }),
        tokio::spawn(async move { lr.rw_lock(&rw).read().await.map(|_| killed.elapsed()) }),
        tokio::spawn(async move { sem.acquire().await.map(|_| killed.elapsed()) }),
    ];
    let after: Vec<Duration> = join_all_checked(waits)
        .await
        .into_iter()
        .map(|r| r.expect("acquired after the kill"))
        .collect();
    for a in &after {
        assert!(
            *a >= expiry / 2,
            "acquired {a:?} after the kill: before it could expire"
        );
        assert!(
            *a <= expiry + Duration::from_millis(400),
            "acquired {a:?} after the kill"
        );
    }
    eprintln!(
        "holder SIGKILLed (expiry {expiry:?}): exclusive, multi-key, rw (as a reader), permit free after {after:?}"
    );
}
