//! The HTTP layer's header rules with real parts (axum over TCP, hyper-util's
//! client, redis-server; fixtures in `support/http.rs`): hits, HEAD, `Age`,
//! TTLs from `max-age`, what is never stored, client `no-cache`, `304`s,
//! `Vary`, `stale-while-revalidate` and `stale-if-error`.
#![cfg(feature = "http")]

#[allow(dead_code)]
use crate::http_fixtures as fixtures;

use std::time::{Duration, Instant};

use crate::support::{RedisServer, join_all_checked};
use axum::http::StatusCode;
use fixtures::{MS, client, get_, one_app, send};

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
