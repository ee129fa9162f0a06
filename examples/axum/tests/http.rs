//! The axum example (its routes behind `CacheLayer`) under real HTTP requests: its router served on a free
//! loopback port, over a throwaway redis-server, with plain HTTP/1.1 requests
//! on TCP sockets.

// Only the redis-server launcher of the main crate's test support.
#[allow(dead_code)]
#[path = "../../../tests/support/server.rs"]
mod server;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use locked_cache::LockedCache;
use locked_cache_axum_example::{AppState, Config, Database, router};
use server::RedisServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

struct Reply {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

/// `GET path` on `addr`, HTTP/1.1, connection closed after the reply.
async fn get(addr: std::net::SocketAddr, path: &str) -> Reply {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete reply");
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// Serves `cache` on a free port until the returned sender fires.
async fn serve(
    cache: LockedCache,
    db: Arc<Database>,
) -> (
    std::net::SocketAddr,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(
            listener,
            router(AppState {
                cache,
                db,
                ttl: Duration::from_secs(300),
            }),
        )
        .with_graceful_shutdown(async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    (addr, stop, server)
}

async fn cache_on(server: &RedisServer, wait: Duration) -> LockedCache {
    LockedCache::builder()
        .redis(server.url())
        .key_prefix(unique_prefix("axum"))
        .wait_time(wait)
        .build()
        .await
        .unwrap()
}

#[tokio::test]
async fn concurrent_requests_run_the_query_once_and_say_so_in_x_cache() {
    let redis = RedisServer::start();
    let db = Arc::new(Database::new(Duration::from_millis(200)));
    let cache = cache_on(&redis, Duration::from_secs(5)).await;
    let (addr, stop, server) = serve(cache, Arc::clone(&db)).await;

    let requests = (0..20)
        .map(|_| tokio::spawn(async move { get(addr, "/reports/2026-11").await }))
        .collect();
    let replies = join_all_checked(requests).await;
    assert_eq!(
        db.queries.load(Ordering::SeqCst),
        1,
        "one query for 20 requests"
    );
    let mut by_header: HashMap<String, usize> = HashMap::new();
    for reply in &replies {
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert!(
            reply.body.contains("\"month\":\"2026-11\""),
            "{}",
            reply.body
        );
        assert_eq!(reply.headers["content-type"], "application/json");
        *by_header
            .entry(reply.headers["x-cache"].clone())
            .or_default() += 1;
    }
    assert_eq!(by_header.get("MISS"), Some(&1), "{by_header:?}");
    assert_eq!(by_header.get("HIT"), Some(&19), "{by_header:?}");
    assert!(replies.iter().all(|r| r.headers.contains_key("age")));

    let again = get(addr, "/reports/2026-11").await;
    assert_eq!(
        (again.status, again.headers["x-cache"].as_str()),
        (200, "HIT")
    );
    assert_eq!(
        again.headers["cache-control"],
        "max-age=300, stale-while-revalidate=600"
    );

    let stats = get(addr, "/stats").await;
    assert_eq!(stats.status, 200);
    assert!(stats.body.contains("\"loads\":1"), "{}", stats.body);

    // Graceful shutdown: the server stops once told to.
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the server stops gracefully")
        .unwrap();
}

/// A client that hangs up in the middle of the query does not cancel it: a
/// second service instance (another cache on the same Redis) asking for the
/// same report meanwhile gets that query's result, and the query runs once.
#[tokio::test]
async fn a_client_hanging_up_mid_query_does_not_cost_a_second_query() {
    let redis = RedisServer::start();
    let db = Arc::new(Database::new(Duration::from_millis(400)));
    let prefix = unique_prefix("axum-hangup");
    let instance = || async {
        LockedCache::builder()
            .redis(redis.url())
            .key_prefix(prefix.clone())
            .build()
            .await
            .unwrap()
    };
    let (first, stop_first, _) = serve(instance().await, Arc::clone(&db)).await;
    let (second, stop_second, _) = serve(instance().await, Arc::clone(&db)).await;

    // The first client sends its request and hangs up 100 ms into the query.
    let mut stream = TcpStream::connect(first).await.unwrap();
    stream
        .write_all(b"GET /reports/2026-10 HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(stream);

    let reply = get(second, "/reports/2026-10").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.headers["x-cache"], "HIT",
        "it waited for the first one's query"
    );
    assert_eq!(db.queries.load(Ordering::SeqCst), 1, "one query in all");
    let again = get(first, "/reports/2026-10").await;
    assert_eq!(again.headers["x-cache"], "HIT");
    stop_first.send(()).unwrap();
    stop_second.send(()).unwrap();
}

#[tokio::test]
async fn a_failed_query_is_502_and_a_busy_cache_is_503_with_retry_after() {
    let redis = RedisServer::start();
    let db = Arc::new(Database::new(Duration::from_millis(10)));
    let cache = cache_on(&redis, Duration::from_millis(200)).await;
    // Another instance holds the lock of one month (and does not finish in
    // time): requests for it wait 200 ms, then get 503.
    let guard = cache
        .lock()
        .try_acquire(
            &cache.lock_key("http:GET:/reports/2026-10"),
            Duration::from_secs(5),
        )
        .await
        .unwrap()
        .unwrap();
    let (addr, stop, server) = serve(cache, Arc::clone(&db)).await;

    let broken = get(addr, "/reports/broken").await;
    assert_eq!(broken.status, 502, "{}", broken.body);
    assert!(
        !broken.body.contains("orders"),
        "no upstream details leak: {}",
        broken.body
    );

    let busy = get(addr, "/reports/2026-10").await;
    assert_eq!(busy.status, 503, "{}", busy.body);
    assert_eq!(busy.headers["retry-after"], "1");
    assert_eq!(
        db.queries.load(Ordering::SeqCst),
        1,
        "only the broken query ran"
    );
    let broken_again = get(addr, "/reports/broken").await;
    assert_eq!(broken_again.status, 502);
    assert_eq!(db.queries.load(Ordering::SeqCst), 2, "a 502 is not cached");

    guard.release().await.unwrap();
    let after = get(addr, "/reports/2026-10").await;
    assert_eq!(
        (after.status, after.headers["x-cache"].as_str()),
        (200, "MISS")
    );
    assert_eq!(db.queries.load(Ordering::SeqCst), 3);

    stop.send(()).unwrap();
    server.await.unwrap();
}

#[test]
fn the_configuration_comes_from_the_environment() {
    let env: HashMap<&str, &str> = [
        (
            "REDIS_URLS",
            "redis://a:6379, redis://b:6379,redis://c:6379",
        ),
        ("LOCK_EXPIRY_MS", "1500"),
        ("QUORUM_LOSS", "fail-open"),
    ]
    .into();
    let config = Config::from_env(|k| env.get(k).map(|v| v.to_string())).unwrap();
    assert_eq!(config.redis.len(), 3);
    assert_eq!(config.redis[1], "redis://b:6379");
    assert_eq!(config.lock_expiry, Duration::from_millis(1500));
    assert_eq!(config.wait_time, Duration::from_millis(2500));
    assert_eq!(config.ttl, Duration::from_secs(300));
    assert_eq!(config.quorum_loss, locked_cache::QuorumLossPolicy::FailOpen);
    let bad = Config::from_env(|k| (k == "WAIT_TIME_MS").then(|| "soon".to_owned()));
    assert!(bad.unwrap_err().contains("WAIT_TIME_MS"));
    let defaults = Config::from_env(|_| None).unwrap();
    assert!(defaults.redis.is_empty());
    assert_eq!(defaults.listen, "127.0.0.1:3000");
}

fn unique_prefix(test: &str) -> String {
    format!("t:{test}:{}:", std::process::id())
}

/// Awaits every request task; a panic in one fails the test.
async fn join_all_checked<T>(handles: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for handle in handles {
        out.push(handle.await.expect("a request task panicked"));
    }
    out
}
