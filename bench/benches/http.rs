//! # HTTP: the layer's hit against a hand-written handler and the origin
//!
//! Three axum servers on loopback ports, over one redis-server, answering the
//! same 4 KiB page, measured in one run with the same client (hyper-util,
//! keep-alive connections), the sides taken in turn, request by request, so
//! that the machine's noise falls on all of them alike:
//!
//! - `origin`: the 50 ms handler itself, uncached;
//! - `handwritten`: a handler calling `get_or_load_bytes` on its own (the
//!   glue the layer replaces: key, load, store, `X-Cache`);
//! - `layer`: the 50 ms handler behind `CacheLayer` (a hit).
//!
//! Prints the mean and median latency of each side and the ratios (the goal:
//! the layer's hit at most 1.2x the hand-written handler's).
//!
//! ```text
//! cargo bench --bench http                        # ~10 s
//! cargo bench --bench http -- --ops 20000 --callers 8
//! ```

#[path = "../../tests/support/mod.rs"]
mod support;

use locked_cache_bench as common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use locked_cache::LockedCache;
use locked_cache::http::CacheLayer;

use common::{Flags, die, percentile};
use support::RedisServer;

const HELP: &str = "\
HTTP: the layer's hit against a hand-written get_or_load handler and the 50 ms origin.

USAGE: cargo bench --bench http -- [FLAGS]

  --ops N         requests per cached side                     [6000]
  --origin N      requests to the uncached origin              [40]
  --callers N     concurrent clients                           [8]
  --threads N     tokio worker threads                         [2]";

const ORIGIN: Duration = Duration::from_millis(50);

async fn render() -> Vec<u8> {
    tokio::time::sleep(ORIGIN).await;
    let mut page = b"<html><body>".to_vec();
    page.resize(4096 - 14, b'x');
    page.extend_from_slice(b"</body></html>");
    page
}

async fn origin() -> ([(&'static str, &'static str); 1], Vec<u8>) {
    ([("cache-control", "max-age=3600")], render().await)
}

async fn handwritten(State(cache): State<LockedCache>) -> axum::response::Response {
    use axum::response::IntoResponse;
    match cache
        .get_or_load_bytes_with_outcome("page:/", |_| async { Ok::<_, String>(render().await) })
        .await
    {
        Ok((page, outcome)) => {
            let label = if outcome == locked_cache::Outcome::Loaded {
                "MISS"
            } else {
                "HIT"
            };
            ([("x-cache", label)], page).into_response()
        }
        Err(_) => axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, router).await.expect("serve") });
    addr
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

async fn fetch(client: &HttpClient, addr: SocketAddr) -> Duration {
    let began = Instant::now();
    let uri = format!("http://{addr}/").parse().expect("uri");
    let response = client.get(uri).await.expect("request");
    assert!(response.status().is_success(), "{}", response.status());
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(body.len(), 4096);
    began.elapsed()
}

fn main() {
    let flags = Flags::parse(&[]);
    if flags.help {
        println!("{HELP}");
        return;
    }
    flags.reject_unknown(&["ops", "origin", "callers", "threads"]);
    let smoke = !(flags.bench_mode || flags.any_given());
    let ops: usize = if smoke { 60 } else { flags.get("ops", 6000) };
    let origin_ops: usize = if smoke { 8 } else { flags.get("origin", 40) };
    let callers: usize = flags.get("callers", 8_usize).max(1);
    let threads: usize = flags.get("threads", 2_usize).max(1);
    if ops < callers {
        die("--ops must be at least --callers");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let server = RedisServer::start();
    runtime.block_on(async {
        let cache = |prefix: &'static str| {
            LockedCache::builder()
                .redis(server.url())
                .key_prefix(prefix)
                .ttl(Duration::from_secs(3600))
                .build()
        };
        let origin_addr = serve(Router::new().route("/", get(origin))).await;
        let hand = cache("hand:").await.expect("cache");
        let hand_addr = serve(Router::new().route("/", get(handwritten)).with_state(hand)).await;
        let layer = CacheLayer::new(cache("layer:").await.expect("cache"));
        let layer_addr = serve(Router::new().route("/", get(origin)).layer(layer)).await;
        let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
        // Warm: connections open, both cached sides loaded once.
        for addr in [hand_addr, layer_addr] {
            for _ in 0..callers {
                fetch(&client, addr).await;
            }
        }
        let began = Instant::now();
        let tasks: Vec<_> = (0..callers)
            .map(|caller| {
                let client = client.clone();
                let (per, origin_per) = (ops / callers, origin_ops.div_ceil(callers));
                tokio::spawn(async move {
                    let mut spent: [Vec<Duration>; 3] = Default::default();
                    for i in 0..per {
                        // Taken in turn, starting on a different side per caller.
                        for side in 0..2 {
                            let side = (side + i + caller) % 2;
                            let addr = [hand_addr, layer_addr][side];
                            spent[side].push(fetch(&client, addr).await);
                        }
                        if i % (per / origin_per).max(1) == 0 && spent[2].len() < origin_per {
                            spent[2].push(fetch(&client, origin_addr).await);
                        }
                    }
                    spent
                })
            })
            .collect();
        let mut all: [Vec<Duration>; 3] = Default::default();
        for task in tasks {
            let spent = task.await.expect("caller");
            for (side, times) in spent.into_iter().enumerate() {
                all[side].extend(times);
            }
        }
        let elapsed = began.elapsed();
        let stats = |times: &mut Vec<Duration>| {
            times.sort_unstable();
            let mean = times.iter().sum::<Duration>() / times.len().max(1) as u32;
            (mean, percentile(times, 50.0), times.len())
        };
        let [hand_t, layer_t, origin_t] = &mut all;
        let (hand, layer, origin) = (stats(hand_t), stats(layer_t), stats(origin_t));
        let us = |d: Duration| format!("{:.0} µs", d.as_secs_f64() * 1e6);
        println!("{}", common::environment_line(&support::redis_server_binary()));
        println!("{callers} clients, {threads} threads, 4 KiB page, {elapsed:.1?} in all");
        for (name, (mean, p50, n)) in [("origin (50 ms handler)", origin), ("hand-written get_or_load_bytes", hand), ("CacheLayer hit", layer)] {
            println!("  {name:32} mean {:>9}  p50 {:>9}  ({n} requests)", us(mean), us(p50));
        }
        let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
        println!(
            "  layer / hand-written: {:.2}x mean, {:.2}x p50 (goal <= 1.2x); origin / layer: {:.0}x mean",
            ratio(layer.0, hand.0),
            ratio(layer.1, hand.1),
            ratio(origin.0, layer.0)
        );
    });
}
