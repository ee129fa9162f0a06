//! The HTTP layer's test fixtures: an axum app of routes with counted
//! handler runs, served behind a `CacheLayer` on a free loopback port, and
//! hyper-util's client. Included by the `http_*` tests (`#[path]`), which need
//! the `http` feature; not a module of `support`, which the bench and TLS
//! crates include too.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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
use locked_cache::http::CacheLayer;

use crate::support::{RedisServer, unique_prefix};

pub const MS: fn(u64) -> Duration = Duration::from_millis;

/// How often each route's handler ran.
#[derive(Default)]
pub struct Runs(std::sync::Mutex<HashMap<&'static str, u32>>);

impl Runs {
    pub fn count(&self, route: &'static str) -> u32 {
        let mut runs = self.0.lock().unwrap();
        let n = runs.entry(route).or_default();
        *n += 1;
        *n
    }

    pub fn of(&self, route: &'static str) -> u32 {
        self.0.lock().unwrap().get(route).copied().unwrap_or(0)
    }
}

pub type Shared = Arc<Runs>;

pub fn cc(value: &'static str) -> [(&'static str, &'static str); 1] {
    [("cache-control", value)]
}

pub fn routes(runs: Shared) -> Router {
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
pub struct App {
    pub addr: SocketAddr,
    pub runs: Shared,
    _stop: tokio::sync::oneshot::Sender<()>,
}

pub async fn cache(redis: &RedisServer, prefix: &str) -> LockedCache {
    LockedCache::builder()
        .redis(redis.url())
        .key_prefix(prefix)
        .wait_time(Duration::from_secs(5))
        .build()
        .await
        .expect("build")
}

pub async fn app(layer: CacheLayer, runs: Shared) -> App {
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

pub async fn one_app(redis: &RedisServer, test: &str) -> App {
    let cache = cache(redis, &unique_prefix(test)).await;
    app(CacheLayer::new(cache), Shared::default()).await
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", |v| v.to_str().unwrap())
    }

    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }
}

pub fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub async fn send(
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

pub async fn get_(app: &App, path: &str, headers: &[(&str, &str)]) -> Reply {
    send(&client(), "GET", app.addr, path, headers).await
}
