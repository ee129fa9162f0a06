//! The HTTP layer with real parts: axum servers over TCP on free loopback
//! ports, in front of a throwaway redis-server, and hyper-util's HTTP client.
//! The "fleet" is three `LockedCache`s, each behind its own axum server on its
//! own port, in this test process (they share nothing but Redis: no state
//! in process is common to them, as for three processes).

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use locked_cache::LockedCache;
use locked_cache::http::{CacheLayer, OnCacheError};
use support::{RedisServer, join_all_checked, unique_prefix};
use tokio::io::AsyncWriteExt;

const MS: fn(u64) -> Duration = Duration::from_millis;

/// How often each route's handler ran.
#[derive(Default)]
struct Runs(std::sync::Mutex<HashMap<&'static str, u32>>);

impl Runs {
    fn count(&self, route: &'static str) -> u32 {
        let mut runs = self.0.lock().unwrap();
        let n = runs.entry(route).or_default();
        *n += 1;
        *n
    }

    fn of(&self, route: &'static str) -> u32 {
        self.0.lock().unwrap().get(route).copied().unwrap_or(0)
    }
}

type Shared = Arc<Runs>;

fn cc(value: &'static str) -> [(&'static str, &'static str); 1] {
    [("cache-control", value)]
}

fn routes(runs: Shared) -> Router {
    Router::new()
        .route(
            "/slow",
            get(|State(r): State<Shared>| async move {
                r.count("slow");
                tokio::time::sleep(MS(300)).await;
                (cc("max-age=60"), "slow")
            }),
        )
        .route(
            "/plain",
            get(|State(r): State<Shared>| async move { format!("plain {}", r.count("plain")) }),
        )
        .route(
            "/short",
            get(|State(r): State<Shared>| async move {
                (cc("max-age=1"), format!("short {}", r.count("short")))
            }),
        )
        .route(
            "/cookie",
            get(|State(r): State<Shared>| async move {
                let n = r.count("cookie");
                tokio::time::sleep(MS(50)).await;
                ([("set-cookie", format!("sid={n}"))], "cookie")
            }),
        )
        .route(
            "/private",
            get(|State(r): State<Shared>| async move {
                r.count("private");
                (cc("private, max-age=60"), "private")
            }),
        )
        .route(
            "/nostore",
            get(|State(r): State<Shared>| async move {
                r.count("nostore");
                (cc("no-store"), "nostore")
            }),
        )
        .route(
            "/fail",
            get(|State(r): State<Shared>| async move {
                r.count("fail");
                (StatusCode::INTERNAL_SERVER_ERROR, "fail")
            }),
        )
        .route(
            "/panic",
            get(|State(r): State<Shared>| async move {
                r.count("panic");
                if r.of("panic") > 0 {
                    panic!("the handler panics");
                }
                "never"
            }),
        )
        .route(
            "/etag",
            get(|State(r): State<Shared>| async move {
                r.count("etag");
                (
                    [
                        ("etag", "\"v1\""),
                        ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
                    ],
                    "tagged",
                )
            }),
        )
        .route(
            "/vary",
            get(|State(r): State<Shared>, headers: HeaderMap| async move {
                r.count("vary");
                let lang = headers
                    .get("accept-language")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("none")
                    .to_owned();
                ([("vary", "accept-language")], lang)
            }),
        )
        .route(
            "/swr",
            get(|State(r): State<Shared>| async move {
                let n = r.count("swr");
                (
                    cc("max-age=1, stale-while-revalidate=30"),
                    format!("swr {n}"),
                )
            }),
        )
        .route(
            "/sie",
            get(|State(r): State<Shared>| async move {
                let n = r.count("sie");
                let status = if n == 1 {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                (
                    status,
                    cc("max-age=1, stale-if-error=30"),
                    format!("sie {n}"),
                )
            }),
        )
        .route(
            "/big",
            get(|State(r): State<Shared>| async move {
                r.count("big");
                let chunks =
                    (0..100).map(|i| Ok::<_, std::io::Error>(Bytes::from(vec![i as u8; 1000])));
                Body::from_stream(futures_util::stream::iter(chunks)).into_response()
            }),
        )
        .route(
            "/auth",
            get(|State(r): State<Shared>| async move { format!("auth {}", r.count("auth")) }),
        )
        .with_state(runs)
}

/// One server of the fleet: a cache, the app behind the layer, on a free port.
struct App {
    addr: SocketAddr,
    runs: Shared,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn cache(redis: &RedisServer, prefix: &str) -> LockedCache {
    LockedCache::builder()
        .redis(redis.url())
        .key_prefix(prefix)
        .wait_time(Duration::from_secs(5))
        .build()
        .await
        .expect("build")
}

async fn app(layer: CacheLayer, runs: Shared) -> App {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = routes(Arc::clone(&runs)).layer(layer);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    App {
        addr,
        runs,
        _stop: stop,
    }
}

async fn one_app(redis: &RedisServer, test: &str) -> App {
    let cache = cache(redis, &unique_prefix(test)).await;
    app(CacheLayer::new(cache), Shared::default()).await
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Bytes,
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", |v| v.to_str().unwrap())
    }

    fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }
}

fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn send(
    client: &Client<HttpConnector, Empty<Bytes>>,
    method: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let mut request = axum::http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Empty::new()).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .expect("no answer within 10 s")
        .expect("request");
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

async fn get_(app: &App, path: &str, headers: &[(&str, &str)]) -> Reply {
    send(&client(), "GET", app.addr, path, headers).await
}

/// 300 concurrent requests for a cold URL, spread over three servers, each
/// with its own cache: the handler runs once in the fleet, one MISS, 299 HIT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_url_runs_its_handler_once_across_three_servers() {
    let redis = RedisServer::start();
    let prefix = unique_prefix("http_fleet");
    let mut fleet = Vec::new();
    for _ in 0..3 {
        fleet.push(
            app(
                CacheLayer::new(cache(&redis, &prefix).await),
                Shared::default(),
            )
            .await,
        );
    }
    let client = client();
    let mut calls = Vec::new();
    for i in 0..300 {
        let (client, addr) = (client.clone(), fleet[i % 3].addr);
        calls.push(tokio::spawn(async move {
            send(&client, "GET", addr, "/slow", &[]).await
        }));
    }
    let replies = join_all_checked(calls).await;
    let runs: u32 = fleet.iter().map(|app| app.runs.of("slow")).sum();
    assert_eq!(runs, 1, "the handler ran once across the fleet");
    assert!(
        replies
            .iter()
            .all(|r| r.status == StatusCode::OK && r.text() == "slow")
    );
    let misses = replies
        .iter()
        .filter(|r| r.header("x-cache") == "MISS")
        .count();
    let hits = replies
        .iter()
        .filter(|r| r.header("x-cache") == "HIT")
        .count();
    assert_eq!((misses, hits), (1, 299));
    assert!(
        replies
            .iter()
            .all(|r| r.header("age").parse::<u64>().is_ok())
    );
}

/// A hit: same body, `Age`, `HIT`; HEAD is served from the GET entry without
/// a body; the TTL comes from `max-age`, or the default.
#[tokio::test]
async fn hits_head_age_and_ttl_from_max_age() {
    let redis = RedisServer::start();
    let app = one_app(&redis, "http_basics").await;
    let first = get_(&app, "/short", &[]).await;
    assert_eq!((first.text(), first.header("x-cache")), ("short 1", "MISS"));
    let hit = get_(&app, "/short", &[]).await;
    assert_eq!(
        (hit.text(), hit.header("x-cache"), hit.header("age")),
        ("short 1", "HIT", "0")
    );
    let head = send(&client(), "HEAD", app.addr, "/short", &[]).await;
    assert_eq!(
        (head.status, head.header("x-cache")),
        (StatusCode::OK, "HIT")
    );
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), "7");
    tokio::time::sleep(MS(1200)).await; // past max-age=1
    let again = get_(&app, "/short", &[]).await;
    assert_eq!((again.text(), again.header("x-cache")), ("short 2", "MISS"));
    // No Cache-Control: the default TTL (60 s) keeps it.
    get_(&app, "/plain", &[]).await;
    let plain = get_(&app, "/plain", &[]).await;
    assert_eq!((plain.text(), plain.header("x-cache")), ("plain 1", "HIT"));
    // HEAD of a cold URL loads the GET entry.
    let head = send(&client(), "HEAD", app.addr, "/etag", &[]).await;
    assert!(head.body.is_empty());
    let get = get_(&app, "/etag", &[]).await;
    assert_eq!(
        (get.text(), get.header("x-cache"), app.runs.of("etag")),
        ("tagged", "HIT", 1)
    );
}

/// Set-Cookie, private, no-store, Authorization and 5xx: answered, never
/// stored (every request runs the handler); the cookie reaches only its own
/// request.
#[tokio::test]
async fn what_is_never_stored() {
    let redis = RedisServer::start();
    let app = one_app(&redis, "http_never").await;
    for (path, route) in [
        ("/cookie", "cookie"),
        ("/private", "private"),
        ("/nostore", "nostore"),
        ("/fail", "fail"),
    ] {
        for round in 1..=2 {
            let reply = get_(&app, path, &[]).await;
            assert_eq!(reply.header("x-cache"), "MISS", "{path}");
            assert_eq!(app.runs.of(route), round, "{path} ran again");
        }
    }
    // Concurrent requests: each gets its own handler's cookie, none another's.
    let client = client();
    let calls = (0..20).map(|_| {
        let (client, addr) = (client.clone(), app.addr);
        tokio::spawn(async move { send(&client, "GET", addr, "/cookie", &[]).await })
    });
    let replies = join_all_checked(calls.collect()).await;
    let mut cookies: Vec<&str> = replies.iter().map(|r| r.header("set-cookie")).collect();
    cookies.sort_unstable();
    cookies.dedup();
    assert_eq!(cookies.len(), 20, "a cookie was shared: {cookies:?}");
    assert_eq!(
        get_(&app, "/fail", &[]).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    for round in 1..=2 {
        let reply = get_(&app, "/auth", &[("authorization", "Bearer x")]).await;
        assert_eq!(reply.text(), format!("auth {round}"));
    }
}

/// A panicking handler: 500, not cached.
#[tokio::test]
async fn a_panicking_handler_is_a_500_not_cached() {
    let redis = RedisServer::start();
    let app = one_app(&redis, "http_panic").await;
    for round in 1..=2 {
        let reply = get_(&app, "/panic", &[]).await;
        assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(app.runs.of("panic"), round);
    }
}

/// `no-cache` from a client does not bypass the shield by default.
#[tokio::test]
async fn a_client_no_cache_does_not_bypass_the_shield() {
    let redis = RedisServer::start();
    let app = one_app(&redis, "http_nocache").await;
    get_(&app, "/plain", &[]).await;
    let reply = get_(
        &app,
        "/plain",
        &[("cache-control", "no-cache"), ("pragma", "no-cache")],
    )
    .await;
    assert_eq!((reply.text(), reply.header("x-cache")), ("plain 1", "HIT"));
}

/// ETag and Last-Modified kept; conditional requests answered 304 from the cache.
#[tokio::test]
async fn conditional_requests_get_304_from_the_cache() {
    let redis = RedisServer::start();
    let app = one_app(&redis, "http_304").await;
    let first = get_(&app, "/etag", &[]).await;
    assert_eq!(
        (first.header("etag"), first.header("last-modified")),
        ("\"v1\"", "Sun, 06 Nov 1994 08:49:37 GMT")
    );
    let inm = get_(&app, "/etag", &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(
        (inm.status, inm.header("etag"), inm.header("x-cache")),
        (StatusCode::NOT_MODIFIED, "\"v1\"", "HIT")
    );
    assert!(inm.body.is_empty());
    let other = get_(&app, "/etag", &[("if-none-match", "\"v0\"")]).await;
    assert_eq!((other.status, other.text()), (StatusCode::OK, "tagged"));
    let ims = get_(
        &app,
        "/etag",
        &[("if-modified-since", "Mon, 07 Nov 1994 08:49:37 GMT")],
    )
    .await;
    assert_eq!(ims.status, StatusCode::NOT_MODIFIED);
    let older = get_(
        &app,
        "/etag",
        &[("if-modified-since", "Sat, 05 Nov 1994 08:49:37 GMT")],
    )
    .await;
    assert_eq!(older.status, StatusCode::OK);
    assert_eq!(app.runs.of("etag"), 1);
}

/// `Vary: Accept-Language`: one entry per language, each served to its own.
#[tokio::test]
async fn vary_keeps_one_entry_per_variant() {
    let redis = RedisServer::start();
    let app = one_app(&redis, "http_vary").await;
    for _ in 0..2 {
        for lang in ["fr", "de", "fr", "de"] {
            let reply = get_(&app, "/vary", &[("accept-language", lang)]).await;
            assert_eq!(reply.text(), lang);
        }
    }
    assert_eq!(app.runs.of("vary"), 2, "one handler run per language");
}

/// stale-while-revalidate: past max-age the old answer comes at once as
/// STALE, and the refresh replaces it.
#[tokio::test]
async fn stale_while_revalidate_serves_the_old_answer_while_refreshing() {
    let redis = RedisServer::start();
    let app = one_app(&redis, "http_swr").await;
    assert_eq!(get_(&app, "/swr", &[]).await.text(), "swr 1");
    tokio::time::sleep(MS(1200)).await;
    let stale = get_(&app, "/swr", &[]).await;
    assert_eq!((stale.text(), stale.header("x-cache")), ("swr 1", "STALE"));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let reply = get_(&app, "/swr", &[]).await;
        if reply.text() == "swr 2" {
            assert_eq!(reply.header("x-cache"), "HIT");
            break;
        }
        assert!(Instant::now() < deadline, "the refresh never landed");
        tokio::time::sleep(MS(20)).await;
    }
}

/// stale-if-error: the handler answers 503 after its first answer; past
/// max-age the stale answer is served instead of the 503.
#[tokio::test]
async fn stale_if_error_serves_the_old_answer_instead_of_a_5xx() {
    let redis = RedisServer::start();
    let app = one_app(&redis, "http_sie").await;
    assert_eq!(get_(&app, "/sie", &[]).await.text(), "sie 1");
    tokio::time::sleep(MS(1200)).await;
    for _ in 0..3 {
        let reply = get_(&app, "/sie", &[]).await;
        assert_eq!(
            (reply.status, reply.text(), reply.header("x-cache")),
            (StatusCode::OK, "sie 1", "STALE")
        );
    }
    assert!(app.runs.of("sie") >= 2, "the handler was asked again");
}

/// A body over the limit streams through whole, uncached.
#[tokio::test]
async fn a_body_over_the_limit_streams_through_uncached() {
    let redis = RedisServer::start();
    let cache = cache(&redis, &unique_prefix("http_big")).await;
    let app = app(CacheLayer::new(cache).max_body(10_000), Shared::default()).await;
    for round in 1..=2 {
        let reply = get_(&app, "/big", &[]).await;
        assert_eq!(reply.body.len(), 100_000);
        assert!(
            reply
                .body
                .chunks(1000)
                .enumerate()
                .all(|(i, c)| c.iter().all(|&b| b == i as u8))
        );
        assert_eq!(
            (reply.header("x-cache"), app.runs.of("big")),
            ("MISS", round)
        );
    }
}

/// A client that hangs up mid-load: the load finishes and is stored; the
/// next request is a hit, one handler run in all.
#[tokio::test]
async fn a_client_hanging_up_mid_load_costs_no_second_load() {
    let redis = RedisServer::start();
    let app = one_app(&redis, "http_hangup").await;
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    stream
        .write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(MS(100)).await;
    drop(stream); // mid-load (the handler takes 300 ms)
    let reply = get_(&app, "/slow", &[]).await;
    assert_eq!(reply.text(), "slow");
    assert_eq!((reply.header("x-cache"), app.runs.of("slow")), ("HIT", 1));
}

/// Redis down: the handler answers (by default) or 503 (by policy), quickly.
#[tokio::test]
async fn with_redis_down_requests_are_answered_not_hung() {
    let mut redis = RedisServer::start();
    let prefix = unique_prefix("http_down");
    let handler = app(
        CacheLayer::new(cache(&redis, &prefix).await),
        Shared::default(),
    )
    .await;
    let strict =
        CacheLayer::new(cache(&redis, &prefix).await).on_cache_error(OnCacheError::Unavailable);
    let strict = app(strict, Shared::default()).await;
    redis.kill();
    let began = Instant::now();
    for round in 1..=2 {
        let reply = get_(&handler, "/plain", &[]).await;
        assert_eq!(
            (reply.status, reply.text()),
            (StatusCode::OK, format!("plain {round}").as_str())
        );
        let refused = get_(&strict, "/plain", &[]).await;
        assert_eq!(
            (refused.status, refused.header("retry-after")),
            (StatusCode::SERVICE_UNAVAILABLE, "1")
        );
    }
    assert!(
        began.elapsed() < Duration::from_secs(8),
        "{:?}",
        began.elapsed()
    );
}
