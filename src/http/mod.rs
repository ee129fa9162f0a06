//! Whole HTTP responses cached in front of an axum or tower service, with one
//! handler run per key per expiry across every instance (feature `http`).
//!
//! ```no_run
//! use std::time::Duration;
//! use axum::{Router, routing::get};
//! use locked_cache::LockedCache;
//! use locked_cache::http::CacheLayer;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let cache = LockedCache::builder().redis("redis://127.0.0.1:6379").build().await?;
//! let app: Router = Router::new()
//!     .route("/report", get(|| async {
//!         tokio::time::sleep(Duration::from_millis(50)).await; // the slow query
//!         ([("cache-control", "max-age=30, stale-while-revalidate=300")], "the report")
//!     }))
//!     .layer(CacheLayer::new(cache).default_ttl(Duration::from_secs(10)));
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:3000").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```
//!
//! [`CacheLayer`] looks each request up through the cache's own
//! [`With::get_or_load_bytes_with_outcome`](crate::With::get_or_load_bytes_with_outcome)
//! (the calls a user makes, nothing private): a hit is one Redis round trip
//! and a copy-free decode; on a miss one request in the whole fleet runs the
//! handler while the others, in every process, wait for its answer. The
//! loader sets the entry's lifetime from the response
//! ([`LoadContext::set_ttl`](crate::LoadContext::set_ttl)) and answers
//! without storing what must not be stored
//! ([`LoadContext::do_not_store`](crate::LoadContext::do_not_store)). Loads
//! are detached: a client that hangs up does not stop the handler run that
//! the others wait for.
//!
//! # What is cached
//!
//! | request or response | what happens |
//! | --- | --- |
//! | not GET or HEAD; a `Range`; `Authorization` (unless [`store_authorized`](CacheLayer::store_authorized)); the [key](CacheLayer::key) closure said `None` | straight to the handler: nothing read, stored or locked |
//! | HEAD | served from the GET entry (a miss loads the GET), without the body |
//! | request `Cache-Control: no-cache` / `Pragma: no-cache` | ignored by default, so clients cannot bypass the shield ([`ClientNoCache`]) |
//! | status 200, 203, 204, 300, 301, 308, 404, 405, 410, 414 | stored: fresh for `s-maxage`, else `max-age`, else `Expires - Date`, else the [default TTL](CacheLayer::default_ttl) |
//! | `stale-while-revalidate=N` | served stale (`STALE`) for N s past its freshness while one refresh runs |
//! | `stale-if-error=N` | past the revalidate window, a request waits for the refresh; if it answers 5xx or fails, the stale response is served (`STALE`) up to N s past its freshness |
//! | `must-revalidate` / `proxy-revalidate` | no stale window |
//! | other statuses, 5xx, `no-cache`, zero lifetime | handed to the requests that waited for it, not stored |
//! | `Set-Cookie`, `private`, `no-store` (each unless opted in), `Vary: *`, a body over [`max_body`](CacheLayer::max_body) | answered to its own request only (a body over the limit streamed, never buffered whole); the requests that waited run the handler themselves, and the key goes straight to the handler for [`pass_ttl`](CacheLayer::pass_ttl) |
//! | `Vary: a, b` | one entry per value of the request's `a` and `b` headers |
//! | the handler errors or panics | nothing stored; its own request gets the error (a panic: `500`), the requests that waited run the handler themselves |
//!
//! Stored responses keep their headers (less hop-by-hop ones) including
//! `ETag` and `Last-Modified`: a request whose `If-None-Match` matches the
//! stored `ETag` (or, without one, whose `If-Modified-Since` is not before
//! `Last-Modified`) gets `304 Not Modified` from the cache. Every answer from
//! the cache has an `Age` (seconds since the handler answered, by the wall
//! clock of the hosts) and an `X-Cache` ([name configurable](CacheLayer::status_header)):
//! `MISS` (this request's handler ran, or the response is the handler's own),
//! `HIT` (served from an entry, including one another request was loading) or
//! `STALE`.
//!
//! When the cache fails (Redis down, the lock wait timed out) the handler
//! answers by default, or `503` ([`OnCacheError`]).
//!
//! # Stored form
//!
//! One Redis value per key (per variant): a small versioned binary encoding
//! (`LCH`, version 1) of status, headers, body, lifetimes and the request's
//! `Vary` values, stored as bytes. An unreadable entry is removed and the
//! handler answers.

mod body;
mod key;
mod layer;
mod policy;
mod serve;

pub use body::{BoxError, CacheBody};
pub use layer::{CacheLayer, CacheService, ResponseFuture};
pub use policy::{
    ClientNoCache, DEFAULT_HTTP_TTL, DEFAULT_MAX_BODY, DEFAULT_MAX_STALE, DEFAULT_PASS_TTL,
    DEFAULT_STATUS_HEADER, OnCacheError,
};
