//! The HTTP layer with real parts, the fleet and the failures: axum servers
//! over TCP on free loopback ports, in front of a throwaway redis-server, and
//! hyper-util's HTTP client (fixtures in `support/http.rs`). The "fleet" is
//! three `LockedCache`s, each behind its own axum server on its own port, in
//! this test process (they share nothing but Redis, as three processes
//! would). The header rules are in `http_rules.rs`.
#![cfg(feature = "http")]

#[allow(dead_code)]
use crate::http_fixtures as fixtures;

use std::time::{Duration, Instant};

use crate::support::{RedisServer, join_all_checked, unique_prefix};
use axum::http::StatusCode;
use fixtures::{MS, Shared, app, cache, client, get_, one_app, send};
use locked_cache::http::{CacheLayer, OnCacheError};
use tokio::io::AsyncWriteExt;

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

/// The child side of the next test: with `LC_HTTP_CHILD_REDIS` set, an axum
/// server behind `CacheLayer` in a process of its own, on a free port (it
/// prints `PORT <n>`), until its stdin closes; it then prints
/// `RUNS <handler runs>`. Without the variable (a normal run), nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_server_process_entry() {
    let (Ok(url), Ok(prefix)) = (
        std::env::var("LC_HTTP_CHILD_REDIS"),
        std::env::var("LC_HTTP_CHILD_PREFIX"),
    ) else {
        return;
    };
    let cache = locked_cache::LockedCache::builder()
        .redis(url)
        .key_prefix(prefix)
        .wait_time(Duration::from_secs(5))
        .build()
        .await
        .expect("build");
    let served = app(CacheLayer::new(cache), Shared::default()).await;
    println!("PORT {}", served.addr.port());
    tokio::task::spawn_blocking(|| std::io::read_to_string(std::io::stdin()))
        .await
        .unwrap()
        .ok();
    println!("RUNS {}", served.runs.of("slow"));
}

/// 300 concurrent requests for a cold URL over three server **processes**
/// (this test binary, started three times, each with its own cache on the
/// one redis-server): the handler runs once in all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_url_runs_its_handler_once_across_three_server_processes() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let redis = RedisServer::start();
    let prefix = unique_prefix("http_procs");
    let mut children = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..3 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "http_layer::http_server_process_entry",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("LC_HTTP_CHILD_REDIS", redis.url())
            .env("LC_HTTP_CHILD_PREFIX", &prefix)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn a server process");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let port = tokio::task::block_in_place(|| {
            lines
                .by_ref()
                .map_while(Result::ok)
                .find_map(|l| {
                    l.split("PORT ")
                        .nth(1)
                        .map(|p| p.trim().parse::<u16>().unwrap())
                })
                .expect("the server process printed no port")
        });
        ports.push(port);
        children.push((child, lines));
    }
    let client = client();
    let mut calls = Vec::new();
    for i in 0..300 {
        let (client, addr) = (
            client.clone(),
            std::net::SocketAddr::from(([127, 0, 0, 1], ports[i % 3])),
        );
        calls.push(tokio::spawn(async move {
            send(&client, "GET", addr, "/slow", &[]).await
        }));
    }
    let replies = join_all_checked(calls).await;
    let mut runs = 0u32;
    for (mut child, mut lines) in children {
        drop(child.stdin.take());
        runs += tokio::task::block_in_place(|| {
            lines
                .by_ref()
                .map_while(Result::ok)
                .find_map(|l| {
                    l.split("RUNS ")
                        .nth(1)
                        .map(|n| n.trim().parse::<u32>().unwrap())
                })
                .expect("the server process printed no count")
        });
        let _ = child.wait();
    }
    let hits = replies
        .iter()
        .filter(|r| r.header("x-cache") == "HIT")
        .count();
    eprintln!("three processes: {runs} handler run(s), {hits} HIT of 300");
    assert_eq!(runs, 1, "the handler ran once across three processes");
    assert!(
        replies
            .iter()
            .all(|r| r.status == StatusCode::OK && r.text() == "slow")
    );
    assert_eq!(hits, 299);
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
