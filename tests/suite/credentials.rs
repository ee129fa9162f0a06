//! Credentials that rotate (feature `credentials`): an ACL user whose password
//! changes every 2 s while the cache serves traffic, with its connections
//! killed now and then so that pools and pub/sub subscriptions reconnect
//! mid-rotation; a provider that fails; the one combination refused.
#![cfg(feature = "credentials")]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::support::{Fleet, RedisServer, eventually, unique_prefix};
use locked_cache::{LockedCache, RotatingCredentials};

const USER: &str = "app";

/// Runs `args` on the server at `url` as the default user.
fn run(url: &str, args: &[&str]) -> redis::RedisResult<redis::Value> {
    let client = redis::Client::open(url)?;
    let mut con = client.get_connection_with_timeout(Duration::from_secs(5))?;
    let (name, rest) = args.split_first().expect("a command");
    redis::cmd(name).arg(rest).query(&mut con)
}

fn must(url: &str, args: &[&str]) -> redis::Value {
    run(url, args).unwrap_or_else(|e| panic!("{args:?} on {url}: {e}"))
}

/// `url` with the ACL user's name in it and no password: the provider's
/// credentials are what authenticates.
fn as_user(url: &str) -> String {
    url.replacen("redis://", &format!("redis://{USER}@"), 1)
}

fn create_user(urls: &[String], password: &str) {
    for url in urls {
        must(
            url,
            &[
                "ACL",
                "SETUSER",
                USER,
                "reset",
                "on",
                &format!(">{password}"),
                "~*",
                "&*",
                "+@all",
            ],
        );
        must(url, &["ACL", "LOG", "RESET"]);
    }
}

/// Failed logins of the ACL user on `url` since the last `ACL LOG RESET`.
fn failed_logins(url: &str) -> usize {
    let redis::Value::Array(entries) = must(url, &["ACL", "LOG"]) else {
        panic!("ACL LOG is not an array");
    };
    entries
        .iter()
        .filter(|e| format!("{e:?}").contains("\"auth\""))
        .count()
}

/// Clients of the ACL user on `url` subscribed to a channel.
fn subscribed_clients(url: &str) -> usize {
    let list: String = redis::from_redis_value(must(url, &["CLIENT", "LIST"])).unwrap();
    list.lines()
        .filter(|l| l.contains(&format!(" user={USER} ")) && !l.contains(" sub=0 "))
        .count()
}

async fn cache(urls: &[String], prefix: &str, credentials: &RotatingCredentials) -> LockedCache {
    cache_on(false, urls, prefix, credentials).await
}

/// A cache on `urls` as masters, or as the seeds of a cluster.
async fn cache_on(
    cluster: bool,
    urls: &[String],
    prefix: &str,
    credentials: &RotatingCredentials,
) -> LockedCache {
    let urls = urls.iter().map(|u| as_user(u));
    let builder = if cluster {
        LockedCache::builder().cluster(urls)
    } else {
        LockedCache::builder().masters(urls)
    };
    builder
        .key_prefix(prefix)
        .credentials_provider(credentials.clone())
        .ttl(Duration::from_millis(150))
        .build()
        .await
        .expect("build")
}

/// What the traffic of one fleet came to.
#[derive(Debug, Default)]
struct Traffic {
    ok: AtomicU64,
    failed: AtomicU64,
    first_failure: std::sync::Mutex<Option<String>>,
}

/// Two caches on `urls` (two processes' worth of pools and wake-up
/// subscriptions), 8 callers each, on 20 keys that expire every 150 ms (so
/// loads, locks, fenced stores and wake-ups run all along) until `stop`.
async fn traffic(
    urls: Vec<String>,
    credentials: RotatingCredentials,
    stop: Arc<AtomicBool>,
) -> Arc<Traffic> {
    traffic_on(false, urls, credentials, stop).await
}

/// [`traffic`] on masters, or on a cluster seeded by `urls`.
async fn traffic_on(
    cluster: bool,
    urls: Vec<String>,
    credentials: RotatingCredentials,
    stop: Arc<AtomicBool>,
) -> Arc<Traffic> {
    let prefix = unique_prefix("rotate");
    let caches = [
        cache_on(cluster, &urls, &prefix, &credentials).await,
        cache_on(cluster, &urls, &prefix, &credentials).await,
    ];
    let counts = Arc::new(Traffic::default());
    let mut tasks = Vec::new();
    for (c, cache) in caches.iter().enumerate() {
        for t in 0..8u64 {
            let (cache, counts, stop) = (cache.clone(), Arc::clone(&counts), Arc::clone(&stop));
            tasks.push(tokio::spawn(async move {
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    i = i
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407 + c as u64);
                    let key = format!("k{}", (i >> 33) % 20);
                    let got = cache
                        .get_or_load(&key, || async {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            Ok::<_, String>(7u32)
                        })
                        .await;
                    match got {
                        Ok(7) => counts.ok.fetch_add(1, Ordering::Relaxed),
                        other => {
                            counts
                                .first_failure
                                .lock()
                                .unwrap()
                                .get_or_insert(format!("{other:?}"));
                            counts.failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }));
        }
    }
    for task in tasks {
        task.await.expect("traffic task");
    }
    counts
}

/// Every 2 s: the new password added, the provider rotated, the old password
/// removed 1 s later. Every 3 s (out of step with the rotation): the ACL
/// user's connections killed, so pools and subscriptions reconnect with
/// whatever credentials are current. Returns (rotations, connections killed).
fn rotate_and_kill(
    urls: &[String],
    credentials: &RotatingCredentials,
    for_how_long: Duration,
) -> (u32, i64) {
    let started = Instant::now();
    let (mut rotations, mut killed) = (0u32, 0i64);
    let mut next_kill = started + Duration::from_millis(1500);
    let mut next_rotation = started + Duration::from_secs(2);
    let mut remove_old: Option<(Instant, String)> = None;
    while started.elapsed() < for_how_long {
        let now = Instant::now();
        if now >= next_rotation {
            rotations += 1;
            let password = format!("pw{rotations}");
            for url in urls {
                must(url, &["ACL", "SETUSER", USER, &format!(">{password}")]);
            }
            credentials.rotate(USER, &password);
            remove_old = Some((now + Duration::from_secs(1), format!("pw{}", rotations - 1)));
            next_rotation += Duration::from_secs(2);
        }
        if let Some((_, old)) = remove_old.as_ref().filter(|(at, _)| now >= *at) {
            for url in urls {
                must(url, &["ACL", "SETUSER", USER, &format!("<{old}")]);
            }
            remove_old = None;
        }
        if now >= next_kill {
            for url in urls {
                if let Ok(redis::Value::Int(n)) = run(url, &["CLIENT", "KILL", "USER", USER]) {
                    killed += n;
                }
            }
            next_kill += Duration::from_secs(3);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (rotations, killed)
}

/// 30 s of traffic on 1 master and, at the same time, on 3 masters, while
/// the password rotates every 2 s and connections are killed every 3 s: no
/// call fails, no login is refused (each new connection used the password
/// current then), and the wake-up subscriptions are back after the last kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_rotating_every_two_seconds_fails_no_call_on_one_and_three_masters() {
    let (one, three) = (Fleet::start(1), Fleet::start(3));
    let (one_urls, three_urls) = (one.urls(), three.urls());
    create_user(&one_urls, "pw0");
    create_user(&three_urls, "pw0");
    let (c1, c3) = (
        RotatingCredentials::new(USER, "pw0"),
        RotatingCredentials::new(USER, "pw0"),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let run_for = Duration::from_secs(30);
    let rotators = [
        (one_urls.clone(), c1.clone()),
        (three_urls.clone(), c3.clone()),
    ]
    .map(|(urls, creds)| std::thread::spawn(move || rotate_and_kill(&urls, &creds, run_for)));
    let stopper = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            tokio::time::sleep(run_for).await;
            stop.store(true, Ordering::Relaxed);
        })
    };
    let (t1, t3) = tokio::join!(
        traffic(one_urls.clone(), c1, Arc::clone(&stop)),
        traffic(three_urls.clone(), c3, Arc::clone(&stop))
    );
    stopper.await.unwrap();
    let rotated: Vec<(u32, i64)> = rotators
        .into_iter()
        .map(|r| r.join().expect("rotator"))
        .collect();
    for (name, t, urls, (rotations, killed)) in [
        ("1 master", &t1, &one_urls, rotated[0]),
        ("3 masters", &t3, &three_urls, rotated[1]),
    ] {
        let (ok, failed) = (
            t.ok.load(Ordering::Relaxed),
            t.failed.load(Ordering::Relaxed),
        );
        let refused: usize = urls.iter().map(|u| failed_logins(u)).sum();
        eprintln!(
            "{name}: {ok} calls ok, {failed} failed, {rotations} rotations, {killed} connections killed, {refused} logins refused"
        );
        assert_eq!(
            failed,
            0,
            "{name}: first failure {:?}",
            t.first_failure.lock().unwrap()
        );
        assert!(ok > 1_000, "{name}: only {ok} calls in 30 s");
        assert!(rotations >= 14, "{name}: {rotations} rotations");
        assert!(
            killed > 0,
            "{name}: no connection was killed, so none had to log in again"
        );
        assert_eq!(
            refused, 0,
            "{name}: a connection logged in with a password already removed"
        );
    }
    drop((t1, t3));
}

/// The same on the 3 + 3 cluster for 12 s: the node connections redis-rs
/// opens (and re-authenticates) and the per-node subscriptions.
#[cfg(feature = "cluster")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotating_password_fails_no_call_on_a_cluster() {
    use crate::support::cluster::Cluster;
    let cluster = tokio::task::block_in_place(|| Cluster::start(Duration::from_secs(1)));
    let urls = cluster.urls();
    create_user(&urls, "pw0");
    let credentials = RotatingCredentials::new(USER, "pw0");
    let stop = Arc::new(AtomicBool::new(false));
    let run_for = Duration::from_secs(12);
    let rotator = {
        let (urls, credentials) = (urls.clone(), credentials.clone());
        std::thread::spawn(move || rotate_and_kill(&urls, &credentials, run_for))
    };
    let stopper = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            tokio::time::sleep(run_for).await;
            stop.store(true, Ordering::Relaxed);
        })
    };
    let t = traffic_on(true, urls.clone(), credentials, stop).await;
    stopper.await.unwrap();
    let (rotations, killed) = rotator.join().expect("rotator");
    let (ok, failed) = (
        t.ok.load(Ordering::Relaxed),
        t.failed.load(Ordering::Relaxed),
    );
    let refused: usize = urls.iter().map(|u| failed_logins(u)).sum();
    eprintln!(
        "cluster: {ok} calls ok, {failed} failed, {rotations} rotations, {killed} connections killed, {refused} logins refused"
    );
    assert_eq!(
        failed,
        0,
        "first failure {:?}",
        t.first_failure.lock().unwrap()
    );
    assert!(ok > 300, "only {ok} calls");
    assert!(
        rotations >= 5 && killed > 0,
        "{rotations} rotations, {killed} killed"
    );
    assert_eq!(
        refused, 0,
        "a connection logged in with a password already removed"
    );
}

/// The wake-up subscriptions log in again with the current password after a
/// kill, and the pooled connections re-authenticate live: after a rotation
/// and the old password's removal, a kill of only the subscriptions is
/// followed by subscriptions that are back, and calls on the pooled
/// connections that were not killed go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_reconnect_with_the_rotated_password() {
    let server = RedisServer::start();
    let urls = [server.url()];
    create_user(&urls, "first");
    let credentials = RotatingCredentials::new(USER, "first");
    let cache = cache(&urls, &unique_prefix("resub"), &credentials).await;
    assert_eq!(
        cache
            .get_or_load("k", || async { Ok::<_, String>(1u8) })
            .await
            .unwrap(),
        1
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            subscribed_clients(&urls[0]) >= 1
        })
        .await,
        "no wake-up subscription"
    );
    must(&urls[0], &["ACL", "SETUSER", USER, ">second"]);
    credentials.rotate(USER, "second");
    tokio::time::sleep(Duration::from_millis(200)).await;
    must(&urls[0], &["ACL", "SETUSER", USER, "<first"]);
    must(&urls[0], &["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert!(
        eventually(Duration::from_secs(15), || async {
            subscribed_clients(&urls[0]) >= 1
        })
        .await,
        "the subscription did not come back with the new password"
    );
    cache.set("k", &2u8).await.unwrap();
    assert_eq!(cache.get::<u8>("k").await.unwrap(), Some(2));
    assert_eq!(
        failed_logins(&urls[0]),
        0,
        "a login used the removed password"
    );
}

/// A provider that fails before giving any credentials: calls fail with an
/// error for which `is_auth_error()` is true; its first good credentials
/// recover the same cache. One that fails later: the connections already
/// logged in go on; once the server refuses the last good password, new
/// connections fail with an auth error; the next good credentials recover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_provider_is_a_typed_error_and_the_next_good_credentials_recover() {
    let server = RedisServer::start();
    let urls = [server.url()];
    create_user(&urls, "a");
    let credentials = RotatingCredentials::new(USER, "a");
    credentials.fail("the secret store is down");
    let cache = LockedCache::builder()
        .masters([as_user(&urls[0])])
        .key_prefix(unique_prefix("failing"))
        .credentials_provider(credentials.clone())
        .connect_timeout(Duration::from_millis(500))
        .build()
        .await
        .expect("build");
    let err = cache
        .get_or_load("k", || async { Ok::<_, String>(1u8) })
        .await
        .expect_err("no credentials yet");
    let err = err.into_cache_error().expect("a cache error");
    assert!(err.is_auth_error(), "not an auth error: {err:?}");

    credentials.rotate(USER, "a");
    assert!(
        eventually(Duration::from_secs(5), || async {
            cache
                .get_or_load("k", || async { Ok::<_, String>(1u8) })
                .await
                .is_ok()
        })
        .await,
        "the good credentials did not recover the cache"
    );

    credentials.fail("the secret store is down again");
    cache
        .set("k", &2u8)
        .await
        .expect("logged-in connections go on");
    must(&urls[0], &["ACL", "SETUSER", USER, "resetpass", ">b"]);
    cache
        .set("k", &3u8)
        .await
        .expect("a connection stays logged in after a password change");
    must(&urls[0], &["CLIENT", "KILL", "USER", USER]);
    let err = cache
        .get::<u8>("k")
        .await
        .expect_err("the last good password was removed");
    assert!(err.is_auth_error(), "not an auth error: {err:?}");

    credentials.rotate(USER, "b");
    assert!(
        eventually(Duration::from_secs(5), || async {
            cache.get::<u8>("k").await.is_ok()
        })
        .await,
        "the next good credentials did not recover the cache"
    );
    assert_eq!(cache.get::<u8>("k").await.unwrap(), Some(3));
}

/// A bb8-redis pool takes no credentials provider: the builder says so.
#[tokio::test]
async fn a_provider_with_a_users_bb8_pool_is_refused() {
    let manager = bb8_redis::RedisConnectionManager::new("redis://127.0.0.1:1").unwrap();
    let pool = bb8::Pool::builder().build_unchecked(manager);
    let err = LockedCache::builder()
        .redis_pool("redis://127.0.0.1:1", pool)
        .credentials_provider(RotatingCredentials::new(USER, "x"))
        .build()
        .await
        .expect_err("refused");
    assert!(err.is_invalid_input(), "{err:?}");
    assert!(err.to_string().contains("credentials provider"), "{err}");
}
