//! Many keys in one call (`get_or_load_many`, `get_many`, `set_many`): on the
//! embedded store, on 1 and 3 real masters and on the cluster fixture. A
//! stampede of 4 OS processes (this binary, re-executed) x 50 tasks over
//! random overlapping 50-key subsets of 500 cold keys loads every key exactly
//! once (on 1 and 3 masters and on the cluster); a master killed mid-batch, a
//! panicking loader, a caller cancelled while waiting and while loading, and a
//! holder process SIGKILLed mid-load (this binary, re-executed) leave no lock
//! behind and no key loaded twice.

use crate::support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::server::{Fleet, RedisServer};
use crate::support::{eventually, join_all_checked, unique_prefix, v_values};
use locked_cache::{CallOptions, Error, LoadError, LockedCache};

const MINUTE: Duration = Duration::from_secs(60);

/// Every key each loader call was asked for, across the caches of a test.
#[derive(Clone, Default)]
struct Loads(Arc<Mutex<(HashMap<String, u32>, u32)>>);

impl Loads {
    fn record(&self, keys: &[String]) {
        let mut loads = self.0.lock().unwrap();
        loads.1 += 1;
        for key in keys {
            *loads.0.entry(key.clone()).or_default() += 1;
        }
    }

    fn per_key(&self) -> HashMap<String, u32> {
        self.0.lock().unwrap().0.clone()
    }

    fn calls(&self) -> u32 {
        self.0.lock().unwrap().1
    }
}

/// A lock expiry of 3 s: the stampede asserts that no key is loaded twice,
/// which a holder stalled past its expiry (this machine's 2 cores are shared)
/// would rightly break; the holder-kill test sets its own.
async fn cache_on(urls: &[String], prefix: &str) -> LockedCache {
    LockedCache::builder()
        .masters(urls.iter().map(String::as_str))
        .key_prefix(prefix)
        .ttl(MINUTE)
        .lock_expiry(Duration::from_secs(3))
        .wait_time(Duration::from_secs(10))
        .command_timeout(Duration::from_secs(1))
        .connect_timeout(Duration::from_secs(1))
        .build()
        .await
        .expect("build")
}

/// Lock keys of `prefix` left on a server.
fn locks_left(server: &RedisServer, prefix: &str) -> usize {
    let keys: Vec<String> = server.query(&["KEYS", &format!("lock.{prefix}*")]);
    keys.len()
}

#[tokio::test]
async fn the_embedded_store_answers_in_order_with_one_loader_call() {
    let cache = LockedCache::builder().build().await.unwrap();
    let loads = Loads::default();
    // Empty: no loader call.
    let none: Vec<Option<u32>> = cache
        .get_or_load_many(&[] as &[&str], |_| async { Ok::<_, String>(Vec::new()) })
        .await
        .unwrap();
    assert!(none.is_empty());
    cache.set("a", &1u32).await.unwrap();
    let l = loads.clone();
    let got: Vec<Option<u32>> = cache
        .get_or_load_many(&["a", "b", "c", "b", "a"], move |missing| {
            l.record(&missing);
            async move {
                assert_eq!(missing, ["b", "c"]);
                // `c` not found; `zz` was not asked for (ignored).
                Ok::<_, String>(vec![("b".to_owned(), 2u32), ("zz".to_owned(), 9)])
            }
        })
        .await
        .unwrap();
    assert_eq!(got, [Some(1), Some(2), None, Some(2), Some(1)]);
    assert_eq!(loads.calls(), 1);
    // Stored as `T` (b) and as a cached "not found" (c): no second load.
    let again: Vec<Option<u32>> = cache
        .get_or_load_many(&["b", "c"], |_| async {
            Err::<Vec<(String, u32)>, _>("loaded again")
        })
        .await
        .unwrap();
    assert_eq!(again, [Some(2), None]);
    assert_eq!(cache.get::<u32>("b").await.unwrap(), Some(2));
    assert!(cache.get::<u32>("zz").await.unwrap().is_none());
    // A loader error goes to every key it was asked for, shared.
    let each = cache
        .get_or_load_many_each(&["a", "x", "y"], |_| async {
            Err::<Vec<(String, u32)>, _>("db down")
        })
        .await
        .unwrap();
    assert_eq!(*each[0].as_ref().unwrap(), Some(1));
    let (Err(LoadError::Loader(x)), Err(LoadError::Loader(y))) = (&each[1], &each[2]) else {
        panic!("loader errors expected: {each:?}");
    };
    assert!(Arc::ptr_eq(x, y));
    // Bad input: the single key's typed error.
    let long = "k".repeat(2000);
    let bad = cache
        .get_or_load_many(&["ok", ""], |_| async {
            Ok::<_, String>(Vec::<(String, u32)>::new())
        })
        .await;
    assert!(matches!(bad, Err(LoadError::Cache(Error::InvalidKey(_)))));
    let bad = cache.get_many::<_, u32>(&[long.as_str()]).await;
    assert!(matches!(bad, Err(Error::InvalidKey(_))));
    // set_many / get_many, and with(CallOptions): TTL and negative TTL.
    cache
        .set_many(&[("s1", 10u32), ("s2", 20u32)])
        .await
        .unwrap();
    assert_eq!(
        cache
            .get_many::<_, u32>(&["s1", "nope", "s2"])
            .await
            .unwrap(),
        [Some(10), None, Some(20)]
    );
    let short = CallOptions::new()
        .ttl(Duration::from_millis(50))
        .negative_ttl(Duration::ZERO);
    let got: Vec<Option<u32>> = cache
        .with(short)
        .get_or_load_many(&["t1", "t2"], |_| async {
            Ok::<_, String>(vec![("t1".to_owned(), 5u32)])
        })
        .await
        .unwrap();
    assert_eq!(got, [Some(5), None]);
    // t2 was not cached (negative TTL zero); t1 expires after 50 ms.
    assert!(cache.get::<Option<u32>>("t2").await.unwrap().is_none());
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert!(cache.get::<u32>("t1").await.unwrap().is_none());
    assert_eq!(cache.retained_entries(), 0);
}

const STAMPEDE_URLS_ENV: &str = "LC_MANY_STAMPEDE_URLS";
const STAMPEDE_PREFIX_ENV: &str = "LC_MANY_STAMPEDE_PREFIX";
const STAMPEDE_CLUSTER_ENV: &str = "LC_MANY_STAMPEDE_CLUSTER";
/// Processes, tasks per process, keys per batch, and the cold keys.
const STAMPEDE_PROCESSES: usize = 4;
const STAMPEDE_TASKS: usize = 50;
const STAMPEDE_BATCH: usize = 50;
const STAMPEDE_KEYS: u32 = 500;

/// The cache of a stampede process: on the masters, or on the cluster.
async fn stampede_cache(urls: &[String], prefix: &str, cluster: bool) -> LockedCache {
    if !cluster {
        return cache_on(urls, prefix).await;
    }
    LockedCache::builder()
        .cluster(urls.to_vec())
        .key_prefix(prefix)
        .ttl(MINUTE)
        .lock_expiry(Duration::from_secs(3))
        .wait_time(Duration::from_secs(10))
        .command_timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(2))
        .build()
        .await
        .expect("build")
}

/// One process of [`stampede`] (this test binary, re-executed): one cache,
/// `STAMPEDE_TASKS` tasks each asking at once (after the parent's `GO`) for
/// a random `STAMPEDE_BATCH`-key subset of the cold keys, checking every
/// value, then reading them again with `get_many`. Prints each loader call's
/// keys (`LOADED k1 k2 ...`).
#[test]
fn many_stampede_process_entry() {
    let Ok(urls) = std::env::var(STAMPEDE_URLS_ENV) else {
        return;
    };
    let urls: Vec<String> = urls.split(',').map(str::to_owned).collect();
    let prefix = std::env::var(STAMPEDE_PREFIX_ENV).expect("prefix");
    let cluster = std::env::var(STAMPEDE_CLUSTER_ENV).is_ok_and(|v| v == "1");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let cache = stampede_cache(&urls, &prefix, cluster).await;
        cache.ping().await.unwrap();
        println!("READY");
        let mut go = String::new();
        tokio::task::block_in_place(|| std::io::stdin().read_line(&mut go)).unwrap();
        assert_eq!(go.trim(), "GO", "read {go:?}");
        let mut tasks = Vec::new();
        for _ in 0..STAMPEDE_TASKS {
            let cache = cache.clone();
            let mut all: Vec<u32> = (0..STAMPEDE_KEYS).collect();
            fastrand::shuffle(&mut all);
            let keys: Vec<String> = all[..STAMPEDE_BATCH]
                .iter()
                .map(|i| format!("k{i}"))
                .collect();
            tasks.push(tokio::spawn(async move {
                let got: Vec<Option<String>> = cache
                    .get_or_load_many(&keys, |missing: Vec<String>| {
                        println!("LOADED {}", missing.join(" "));
                        async move {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            Ok::<_, String>(v_values(missing))
                        }
                    })
                    .await
                    .expect("batch");
                for (key, value) in keys.iter().zip(got) {
                    assert_eq!(value.as_deref(), Some(format!("v-{key}").as_str()));
                }
                let again: Vec<Option<String>> = cache.get_many(&keys).await.unwrap();
                assert!(again.iter().all(Option::is_some), "{again:?}");
            }));
        }
        join_all_checked(tasks).await;
        assert_eq!(cache.retained_entries(), 0);
        println!("DONE {:?}", cache.stats());
    });
}

/// `STAMPEDE_PROCESSES` OS processes (each one cache, its own connections
/// and wake-up subscription) x `STAMPEDE_TASKS` tasks, each asking for a
/// random `STAMPEDE_BATCH`-key subset of `STAMPEDE_KEYS` cold keys, all
/// released at once: every key is loaded exactly once across them, every
/// caller gets every value (each process checks its own and exits cleanly).
async fn stampede(urls: &[String], label: &str, cluster: bool) {
    let prefix = unique_prefix(label);
    let started = Instant::now();
    let mut children = Vec::new();
    let mut readers = Vec::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..STAMPEDE_PROCESSES {
        let mut child: Child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "many::many_stampede_process_entry",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(STAMPEDE_URLS_ENV, urls.join(","))
            .env(STAMPEDE_PREFIX_ENV, &prefix)
            .env(STAMPEDE_CLUSTER_ENV, if cluster { "1" } else { "0" })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let ready = ready_tx.clone();
        // Every line but READY, once the process has ended.
        readers.push(tokio::task::spawn_blocking(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // libtest's "test ... " may come first on the line.
                if line.ends_with("READY") {
                    let _ = ready.send(());
                } else {
                    lines.push(line);
                }
            }
            lines
        }));
        children.push(child);
    }
    for _ in 0..STAMPEDE_PROCESSES {
        tokio::time::timeout(Duration::from_secs(30), ready_rx.recv())
            .await
            .expect("a stampede process did not get ready within 30 s")
            .expect("a stampede process ended before it was ready");
    }
    for child in &mut children {
        use std::io::Write;
        let stdin = child.stdin.as_mut().unwrap();
        stdin.write_all(b"GO\n").unwrap();
        stdin.flush().unwrap();
    }
    let mut loads: HashMap<String, u32> = HashMap::new();
    let mut calls = 0;
    for reader in readers {
        let lines = tokio::time::timeout(Duration::from_secs(60), reader)
            .await
            .expect("a stampede process did not end within 60 s")
            .unwrap();
        for line in lines {
            if let Some(keys) = line.strip_prefix("LOADED ") {
                calls += 1;
                for key in keys.split(' ') {
                    *loads.entry(key.to_owned()).or_default() += 1;
                }
            } else if line.starts_with("DONE") {
                eprintln!("{label}: {line}");
            }
        }
    }
    for mut child in children {
        let status = child.wait().unwrap();
        assert!(status.success(), "a stampede process failed: {status}");
    }
    let twice: Vec<_> = loads.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "keys loaded more than once: {twice:?}");
    // Every key asked was loaded by someone: what is stored is what was loaded.
    let check = stampede_cache(urls, &prefix, cluster).await;
    let all: Vec<String> = (0..STAMPEDE_KEYS).map(|i| format!("k{i}")).collect();
    let stored = check.get_many::<_, String>(&all).await.unwrap();
    let stored: Vec<&String> = all
        .iter()
        .zip(&stored)
        .filter(|(_, v)| v.is_some())
        .map(|(k, _)| k)
        .collect();
    assert_eq!(stored.len(), loads.len());
    assert!(stored.iter().all(|k| loads.get(*k) == Some(&1)));
    eprintln!(
        "{label}: {} distinct keys loaded once each by {calls} loader calls for {} batches \
         of {STAMPEDE_BATCH} from {STAMPEDE_PROCESSES} processes, in {:?}",
        loads.len(),
        STAMPEDE_PROCESSES * STAMPEDE_TASKS,
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stampede_on_one_master_loads_every_key_once() {
    let server = RedisServer::start();
    stampede(&[server.url()], "many1", false).await;
    assert_eq!(locks_left(&server, "t:many1"), 0);
    // All cached now: one batch of 100 is one MGET, no GET.
    let prefix = unique_prefix("hits1");
    let cache = cache_on(&[server.url()], &prefix).await;
    let keys: Vec<String> = (0..100).map(|i| format!("h{i}")).collect();
    let entries: Vec<(String, u32)> = keys.iter().cloned().zip(0..).collect();
    cache.set_many(&entries).await.unwrap();
    server.reset_stats();
    let got: Vec<Option<u32>> = cache
        .get_or_load_many(&keys, |_| async { Err::<Vec<(String, u32)>, _>("no load") })
        .await
        .unwrap();
    assert_eq!(got, (0..100).map(Some).collect::<Vec<_>>());
    assert_eq!(server.command_calls("mget"), 1);
    assert_eq!(server.command_calls("get"), 0);

    // Cold: 100 keys, of which the loader finds 99 (a "not found" is not
    // cached here). The fenced store publishes the wake-up of the 99 it
    // stored, the release that of all 100 (a waiter that registered after the
    // store's message hears the release's).
    let cold: Vec<String> = (0..100).map(|i| format!("c{i}")).collect();
    server.reset_stats();
    let got: Vec<Option<u32>> = cache
        .with(CallOptions::new().negative_ttl(Duration::ZERO))
        .get_or_load_many(&cold, |missing: Vec<String>| async move {
            Ok::<_, String>(
                missing
                    .into_iter()
                    .filter(|k| k != "c0")
                    .map(|k| (k, 7))
                    .collect::<Vec<_>>(),
            )
        })
        .await
        .unwrap();
    assert_eq!(got[0], None);
    assert!(got[1..].iter().all(|v| *v == Some(7)), "{got:?}");
    let released = eventually(Duration::from_secs(5), || async {
        locks_left(&server, &prefix) == 0
    })
    .await;
    assert!(released, "the batch's locks were not released");
    let c0_stored: i64 = server.query(&["EXISTS", &cache.value_key("c0")]);
    assert_eq!(c0_stored, 0, "a \"not found\" was cached");
    assert_eq!(server.command_calls("publish"), 99 + 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stampede_on_three_masters_loads_every_key_once() {
    let fleet = Fleet::start(3);
    stampede(&fleet.urls(), "many3", false).await;
}

#[cfg(feature = "cluster")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stampede_on_a_cluster_loads_every_key_once() {
    use support::cluster::Cluster;
    let cluster = tokio::task::block_in_place(|| Cluster::start(Duration::from_secs(1)));
    stampede(&cluster.urls(), "manyc", true).await;
}

/// A master of three is killed while a batch loads: the batch still answers
/// (the two others are a majority) and stores what it loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_mid_batch_does_not_fail_it() {
    let mut fleet = Fleet::start(3);
    let prefix = unique_prefix("kill");
    let cache = cache_on(&fleet.urls(), &prefix).await;
    cache.ping().await.unwrap();
    let keys: Vec<String> = (0..40).map(|i| format!("m{i}")).collect();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let batch = {
        let (cache, keys) = (cache.clone(), keys.clone());
        tokio::spawn(async move {
            let mut tx = Some(tx);
            cache
                .get_or_load_many(&keys, move |missing| {
                    let started = tx.take();
                    async move {
                        if let Some(tx) = started {
                            let _ = tx.send(());
                        }
                        tokio::time::sleep(Duration::from_millis(600)).await;
                        Ok::<_, String>(missing.into_iter().map(|k| (k, 1u8)).collect::<Vec<_>>())
                    }
                })
                .await
        })
    };
    rx.await.unwrap();
    // Master 2 is not the value server (master 0 is).
    tokio::task::block_in_place(|| fleet.kill(2));
    let got = join_all_checked(vec![batch]).await.remove(0).unwrap();
    assert!(got.iter().all(|v| *v == Some(1)));
    let again: Vec<Option<u8>> = cache
        .get_or_load_many(&keys, |_| async {
            Err::<Vec<(String, u8)>, _>("loaded twice")
        })
        .await
        .unwrap();
    assert!(again.iter().all(|v| *v == Some(1)));
}

/// Two masters of three down, so no lock quorum: with
/// `QuorumLossPolicy::FailOpen` a batch loads its keys without their locks
/// (one loader call, fenced stores on the value server, counted as fail-open
/// loads), as a single key would; with the default (fail-closed) it fails
/// with a quorum error and loads nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_without_quorum_fails_open_or_closed_by_policy() {
    let mut fleet = Fleet::start(3);
    let values = RedisServer::start();
    let prefix = unique_prefix("open");
    let build = |policy| {
        LockedCache::builder()
            .masters(fleet.urls())
            .cache_url(values.url())
            .key_prefix(&prefix)
            .wait_time(Duration::from_millis(500))
            .command_timeout(Duration::from_millis(300))
            .quorum_loss(policy)
    };
    let open = build(locked_cache::QuorumLossPolicy::FailOpen)
        .build()
        .await
        .unwrap();
    let closed = build(locked_cache::QuorumLossPolicy::FailClosed)
        .build()
        .await
        .unwrap();
    tokio::task::block_in_place(|| {
        fleet.kill(1);
        fleet.kill(2);
    });
    let keys: Vec<String> = (0..10).map(|i| format!("o{i}")).collect();
    let calls = Arc::new(AtomicU32::new(0));
    let loader = |calls: Arc<AtomicU32>| {
        move |missing: Vec<String>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, String>(missing.into_iter().map(|k| (k, 3u8)).collect::<Vec<_>>()) }
        }
    };
    let err = closed
        .get_or_load_many(&keys, loader(Arc::clone(&calls)))
        .await
        .expect_err("fail-closed without a quorum");
    assert!(
        err.cache_error().is_some_and(|e| e.is_quorum_error()),
        "{err:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0, "fail-closed loaded");
    let got: Vec<Option<u8>> = open
        .get_or_load_many(&keys, loader(Arc::clone(&calls)))
        .await
        .expect("fail-open without a quorum");
    assert!(got.iter().all(|v| *v == Some(3)), "{got:?}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "one loader call for the batch"
    );
    assert_eq!(open.stats().fail_open_loads, 10);
    let stored: Vec<Option<u8>> = closed.get_many(&keys).await.unwrap();
    assert!(
        stored.iter().all(|v| *v == Some(3)),
        "not stored: {stored:?}"
    );
}

/// A panicking loader panics its caller; its locks are released and the
/// next call loads the keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_loader_releases_every_lock() {
    let server = RedisServer::start();
    let prefix = unique_prefix("panic");
    let cache = cache_on(&[server.url()], &prefix).await;
    let keys: Vec<String> = (0..20).map(|i| format!("p{i}")).collect();
    let panicked = {
        let (cache, keys) = (cache.clone(), keys.clone());
        tokio::spawn(async move {
            let _: Result<Vec<Option<u8>>, LoadError<String>> = cache
                .get_or_load_many(&keys, |_| async {
                    panic!("loader panicked");
                    #[allow(unreachable_code)]
                    Ok(Vec::<(String, u8)>::new())
                })
                .await;
        })
        .await
    };
    assert!(panicked.unwrap_err().is_panic());
    assert!(
        eventually(Duration::from_secs(2), || async {
            locks_left(&server, &prefix) == 0
        })
        .await
    );
    let started = Instant::now();
    let got: Vec<Option<u8>> = cache
        .get_or_load_many(&keys, |missing| async move {
            Ok::<_, String>(missing.into_iter().map(|k| (k, 7u8)).collect::<Vec<_>>())
        })
        .await
        .unwrap();
    assert!(got.iter().all(|v| *v == Some(7)));
    // Released, not expired.
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(cache.retained_entries(), 0);
}

/// Cancelled while loading: every lock released at once; cancelled while
/// waiting: nothing left registered, and the holder's load is not disturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_caller_leaves_nothing_behind() {
    let server = RedisServer::start();
    let prefix = unique_prefix("cancel");
    let holder = cache_on(&[server.url()], &prefix).await;
    let waiter = cache_on(&[server.url()], &prefix).await;
    let keys: Vec<String> = (0..30).map(|i| format!("c{i}")).collect();
    // While loading.
    let loading = {
        let (cache, keys) = (holder.clone(), keys.clone());
        tokio::spawn(async move {
            let _: Result<Vec<Option<u8>>, LoadError<String>> = cache
                .get_or_load_many(&keys, |_| {
                    std::future::pending::<Result<Vec<(String, u8)>, String>>()
                })
                .await;
        })
    };
    assert!(
        eventually(Duration::from_secs(2), || async {
            locks_left(&server, &prefix) == 30
        })
        .await
    );
    loading.abort();
    assert!(loading.await.unwrap_err().is_cancelled());
    assert!(
        eventually(Duration::from_millis(300), || async {
            locks_left(&server, &prefix) == 0
        })
        .await
    );
    assert!(
        eventually(Duration::from_secs(1), || async {
            holder.retained_entries() == 0
        })
        .await
    );
    // While waiting for another cache's load.
    let load = {
        let (cache, keys) = (holder.clone(), keys.clone());
        tokio::spawn(async move {
            let got: Vec<Option<u8>> = cache
                .get_or_load_many(&keys, move |missing| async move {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    Ok::<_, String>(missing.into_iter().map(|k| (k, 3u8)).collect::<Vec<_>>())
                })
                .await
                .unwrap();
            got
        })
    };
    assert!(
        eventually(Duration::from_secs(2), || async {
            locks_left(&server, &prefix) == 30
        })
        .await
    );
    let waiting = {
        let (cache, keys) = (waiter.clone(), keys.clone());
        tokio::spawn(async move {
            let _: Result<Vec<Option<u8>>, LoadError<String>> = cache
                .get_or_load_many(&keys, |_| async {
                    Err::<Vec<(String, u8)>, _>("the waiter must not load".to_owned())
                })
                .await;
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    waiting.abort();
    assert!(waiting.await.unwrap_err().is_cancelled());
    assert_eq!(waiter.retained_entries(), 0);
    let got = join_all_checked(vec![load]).await.remove(0);
    assert!(got.iter().all(|v| *v == Some(3)));
    assert!(
        eventually(Duration::from_millis(300), || async {
            locks_left(&server, &prefix) == 0
        })
        .await
    );
}

const URL_ENV: &str = "LC_MANY_HOLDER_URL";
const PREFIX_ENV: &str = "LC_MANY_HOLDER_PREFIX";

/// The holder process (re-executed by the test below): locks 20 keys in one
/// batch and hangs in its loader until killed.
#[test]
fn many_holder_process_entry() {
    let Ok(url) = std::env::var(URL_ENV) else {
        return;
    };
    let prefix = std::env::var(PREFIX_ENV).expect("prefix");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let cache = LockedCache::builder()
            .redis(url)
            .key_prefix(&prefix)
            .lock_expiry(Duration::from_millis(500))
            .build()
            .await
            .unwrap();
        let keys: Vec<String> = (0..20).map(|i| format!("h{i}")).collect();
        let _: Result<Vec<Option<u8>>, LoadError<String>> = cache
            .get_or_load_many(&keys, |_| async {
                println!("LOADING");
                std::future::pending::<Result<Vec<(String, u8)>, String>>().await
            })
            .await;
    });
}

/// A holder process SIGKILLed mid-load: the waiter in this process takes the
/// keys over once the holder's locks expire, and loads each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_killed_mid_load_is_taken_over() {
    let server = RedisServer::start();
    let prefix = unique_prefix("holder");
    let mut child: Child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "many::many_holder_process_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(URL_ENV, server.url())
        .env(PREFIX_ENV, &prefix)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let loading = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|line| line.contains("LOADING"))
    });
    assert!(
        tokio::time::timeout(Duration::from_secs(20), loading)
            .await
            .unwrap()
            .unwrap(),
        "the holder process did not start loading"
    );
    assert_eq!(locks_left(&server, &prefix), 20);
    let cache = cache_on(&[server.url()], &prefix).await;
    let loads = Loads::default();
    let keys: Vec<String> = (0..25).map(|i| format!("h{i}")).collect();
    let waiting = {
        let (cache, keys, loads) = (cache.clone(), keys.clone(), loads.clone());
        tokio::spawn(async move {
            cache
                .get_or_load_many(&keys, move |missing| {
                    loads.record(&missing);
                    async move {
                        Ok::<_, String>(missing.into_iter().map(|k| (k, 9u8)).collect::<Vec<_>>())
                    }
                })
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let killed = Instant::now();
    child.kill().unwrap();
    child.wait().unwrap();
    let got = join_all_checked(vec![waiting]).await.remove(0);
    assert!(got.iter().all(|v| *v == Some(9)));
    // h20..h24 were free (the first call), h0..h19 taken over (the second).
    assert_eq!(loads.calls(), 2);
    assert!(loads.per_key().values().all(|n| *n == 1));
    // The holder's locks expire 500 ms after its last extension.
    assert!(
        killed.elapsed() < Duration::from_secs(2),
        "{:?}",
        killed.elapsed()
    );
    assert!(
        eventually(Duration::from_millis(300), || async {
            locks_left(&server, &prefix) == 0
        })
        .await
    );
}

/// The `_shared` form answers from the near cache first: after a load and a
/// read that keeps the values there, a batch costs no round trip at all.
#[cfg(feature = "near-cache")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_form_answers_from_the_near_cache() {
    let server = RedisServer::start();
    let cache = LockedCache::builder()
        .redis(server.url())
        .key_prefix(unique_prefix("near"))
        .ttl(MINUTE)
        .near_cache(1 << 20)
        .build()
        .await
        .unwrap();
    assert!(eventually(Duration::from_secs(2), || async { cache.near_is_live() }).await);
    let keys: Vec<String> = (0..20).map(|i| format!("n{i}")).collect();
    let loads = Loads::default();
    for _ in 0..3 {
        let l = loads.clone();
        let got: Vec<Option<Arc<u32>>> = cache
            .get_or_load_many_shared(&keys, move |missing| {
                l.record(&missing);
                async move {
                    Ok::<_, String>(
                        missing
                            .iter()
                            .map(|k| (k.clone(), 1u32))
                            .collect::<Vec<_>>(),
                    )
                }
            })
            .await
            .unwrap();
        assert!(got.iter().all(|v| v.as_deref() == Some(&1)));
    }
    assert_eq!(loads.calls(), 1);
    // Loaded, then read once from Redis (and kept), then served in process.
    assert_eq!(cache.stats().near_hits, 20, "{:?}", cache.stats());
    server.reset_stats();
    let _: Vec<Option<Arc<u32>>> = cache
        .get_or_load_many_shared(&keys, |_| async { Err::<Vec<(String, u32)>, _>("no load") })
        .await
        .unwrap();
    assert_eq!(server.command_calls("mget"), 0);
}

/// A stale window through `with(CallOptions)` (a `'static` loader): a batch
/// whose only unfresh keys are stale answers with the stale values at once
/// and refreshes them in the background, one loader call; a refresh that
/// fails leaves the values as they were and is counted; a batch with a miss
/// waits for it and refreshes its stale keys in the same loader call
/// (fail-safe serves a stale one whose refresh fails). On a real server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_only_batch_answers_at_once_and_refreshes_in_the_background() {
    let server = RedisServer::start();
    let prefix = unique_prefix("many-swr");
    let cache = LockedCache::builder()
        .redis(server.url())
        .key_prefix(&prefix)
        .build()
        .await
        .unwrap();
    let swr = CallOptions::new()
        .ttl(Duration::from_millis(100))
        .stale_for(Duration::from_secs(30));
    let loads = Loads::default();
    let load = |value: u32, delay: Duration| {
        let loads = loads.clone();
        move |missing: Vec<String>| {
            loads.record(&missing);
            async move {
                tokio::time::sleep(delay).await;
                Ok::<_, String>(missing.into_iter().map(|k| (k, value)).collect::<Vec<_>>())
            }
        }
    };
    let keys = ["s1", "s2", "s3"];
    let got = cache
        .with(swr)
        .get_or_load_many(&keys, load(1, Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(got, [Some(1); 3]);
    tokio::time::sleep(Duration::from_millis(150)).await;

    // Stale, the refresh fails: the stale values at once, then the failure
    // counted, the values left as they were.
    let got: Vec<Option<u32>> = cache
        .with(swr)
        .get_or_load_many(&keys, |_| async {
            Err::<Vec<(String, u32)>, _>("db down".to_owned())
        })
        .await
        .unwrap();
    assert_eq!(got, [Some(1); 3]);
    assert!(
        eventually(Duration::from_secs(5), || async {
            cache.stats().background_errors == 3
        })
        .await,
        "background errors: {:?}",
        cache.stats()
    );
    assert_eq!(cache.stats().fail_safe_served, 0);
    let still: Vec<Option<u32>> = cache.get_many(&keys).await.unwrap();
    assert_eq!(
        still, [None; 3],
        "stale values are not served by a plain get"
    );

    // Stale, a 400 ms refresh: the caller does not wait for it.
    let started = Instant::now();
    let got = cache
        .with(swr)
        .get_or_load_many(&keys, load(2, Duration::from_millis(400)))
        .await
        .unwrap();
    let answered = started.elapsed();
    assert_eq!(got, [Some(1); 3]);
    assert!(
        answered < Duration::from_millis(300),
        "a stale-only batch waited {answered:?} for its refresh"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            cache.get_many::<_, u32>(&keys).await.unwrap() == [Some(2); 3]
        })
        .await,
        "the background refresh stored the new values"
    );
    assert_eq!(loads.calls(), 2, "one loader call per refresh");
    assert!(cache.stats().stale_served >= 6, "{:?}", cache.stats());
    assert_eq!(locks_left(&server, &prefix), 0);

    // A miss beside stale keys: the call waits for the miss, and its stale
    // keys are refreshed in the same loader call.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let before = loads.calls();
    let got = cache
        .with(swr)
        .get_or_load_many(
            &["s1", "s2", "s3", "m1"],
            load(3, Duration::from_millis(50)),
        )
        .await
        .unwrap();
    assert_eq!(got, [Some(3); 4]);
    assert_eq!(loads.calls(), before + 1);

    // The same, the refresh failing: fail-safe serves the stale keys, the
    // miss gets the error.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let got: Vec<Result<Option<u32>, LoadError<String>>> = cache
        .with(swr.fail_safe(true))
        .get_or_load_many_each(&["s1", "m2"], |_| async {
            Err::<Vec<(String, u32)>, _>("db down".to_owned())
        })
        .await
        .unwrap();
    assert!(matches!(got[0], Ok(Some(3))), "{:?}", got[0].as_ref().ok());
    assert!(matches!(&got[1], Err(LoadError::Loader(e)) if **e == "db down"));
    assert_eq!(cache.stats().fail_safe_served, 1);

    // A borrowing loader (the plain call, the builder's stale window)
    // refreshes in place: the caller gets the new values.
    let plain = LockedCache::builder()
        .redis(server.url())
        .key_prefix(&prefix)
        .call_options(swr)
        .build()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let got = plain
        .get_or_load_many(&["s1", "s2"], load(4, Duration::from_millis(50)))
        .await
        .unwrap();
    assert_eq!(got, [Some(4); 2]);
}

/// The hard timeout bounds the whole call; the keys it locked are released
/// (the next call loads them at once).
#[tokio::test]
async fn the_hard_timeout_bounds_a_batch_and_releases_its_locks() {
    let cache = LockedCache::builder().build().await.unwrap();
    let hard = CallOptions::new().hard_timeout(Duration::from_millis(50));
    let started = Instant::now();
    let timed_out = cache
        .with(hard)
        .get_or_load_many(&["h1", "h2"], |_| {
            std::future::pending::<Result<Vec<(String, u8)>, String>>()
        })
        .await;
    assert!(matches!(
        timed_out,
        Err(LoadError::Cache(Error::LoadTimeout { .. }))
    ));
    assert!(started.elapsed() < Duration::from_millis(500));
    let started = Instant::now();
    let got: Vec<Option<u8>> = cache
        .get_or_load_many(&["h1", "h2"], |missing| async move {
            Ok::<_, String>(missing.into_iter().map(|k| (k, 4u8)).collect::<Vec<_>>())
        })
        .await
        .unwrap();
    assert_eq!(got, [Some(4), Some(4)]);
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
}

/// `invalidate_many` on a real server: the values are gone, and a batch
/// loading those keys when it runs returns what it loaded but stores none of
/// it (their fences went first): the next call loads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_many_removes_values_and_fences_out_running_loads() {
    let server = RedisServer::start();
    let prefix = unique_prefix("invmany");
    let cache = cache_on(&[server.url()], &prefix).await;
    let keys: Vec<String> = (0..30).map(|i| format!("i{i}")).collect();
    let entries: Vec<(String, u32)> = keys.iter().cloned().zip(0..).collect();
    cache.set_many(&entries).await.unwrap();
    cache.invalidate_many(&keys).await.unwrap();
    let got: Vec<Option<u32>> = cache.get_many(&keys).await.unwrap();
    assert!(got.iter().all(Option::is_none), "{got:?}");
    cache.invalidate_many::<&str>(&[]).await.unwrap();
    let too_long = "k".repeat(100_000);
    assert!(cache.invalidate_many(&[too_long]).await.is_err());

    // A batch loading when the keys are invalidated.
    let gate = Arc::new(tokio::sync::Notify::new());
    let loading = Arc::new(AtomicU32::new(0));
    let batch = {
        let (cache, keys) = (cache.clone(), keys.clone());
        let (gate, loading) = (Arc::clone(&gate), Arc::clone(&loading));
        tokio::spawn(async move {
            cache
                .get_or_load_many(&keys, move |missing: Vec<String>| {
                    let (gate, loading) = (Arc::clone(&gate), Arc::clone(&loading));
                    async move {
                        loading.fetch_add(1, Ordering::SeqCst);
                        gate.notified().await;
                        Ok::<_, String>(missing.into_iter().map(|k| (k, 7u32)).collect::<Vec<_>>())
                    }
                })
                .await
        })
    };
    assert!(
        eventually(Duration::from_secs(5), || async {
            loading.load(Ordering::SeqCst) == 1
        })
        .await
    );
    let refused = cache.stats().writes_refused;
    cache.invalidate_many(&keys).await.unwrap();
    gate.notify_one();
    let got = join_all_checked(vec![batch]).await.remove(0).unwrap();
    assert!(
        got.iter().all(|v| *v == Some(7)),
        "the batch returns what it loaded"
    );
    assert_eq!(
        cache.stats().writes_refused - refused,
        keys.len() as u64,
        "every store was refused (its fence was gone)"
    );
    let stored: Vec<Option<u32>> = cache.get_many(&keys).await.unwrap();
    assert!(stored.iter().all(Option::is_none), "{stored:?}");
}
