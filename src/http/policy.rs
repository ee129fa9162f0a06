//! What may be stored and for how long (RFC 9111, RFC 5861): pure functions of
//! a request's and a response's heads, so the layer never spells an HTTP rule
//! inline. Unit-tested without a server.
//!
//! Written here rather than over `http-cache-semantics`: that crate keeps a
//! serialised policy per entry and judges freshness from the wall clock at
//! each request, where this cache's freshness is the entry's TTL in Redis; it
//! falls back to a heuristic lifetime (10% of `Last-Modified`'s age) where
//! this layer takes a configured default; it treats a request's `no-cache` as
//! "revalidate", which here would let any client bypass the shield; and it
//! does not answer conditional requests. What it decides that matters here
//! fits in this file.

use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap, HeaderName};
use http::{Method, StatusCode, request};

/// The fresh time of a response that says nothing about it (no `s-maxage`,
/// `max-age` or `Expires`): 60 s.
pub const DEFAULT_HTTP_TTL: Duration = Duration::from_secs(60);
/// The largest body buffered and stored: 1 MiB. A larger one streams
/// through to its client uncached.
pub const DEFAULT_MAX_BODY: usize = 1 << 20;
/// The longest `stale-while-revalidate` or `stale-if-error` window honoured:
/// one day.
pub const DEFAULT_MAX_STALE: Duration = Duration::from_secs(24 * 3600);
/// How long a key whose response may not be shared (private, a cookie, too
/// large) is remembered as such, so that its requests go straight to the
/// handler instead of queueing for its lock: 10 s.
pub const DEFAULT_PASS_TTL: Duration = Duration::from_secs(10);
/// The header telling how a response was served: `x-cache`.
pub const DEFAULT_STATUS_HEADER: &str = "x-cache";

/// What a request's `Cache-Control: no-cache` (or `Pragma: no-cache`) does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ClientNoCache {
    /// Ignored: the request is served from the cache like any other, so a
    /// client cannot push a load onto the origin (the shield holds). The
    /// default.
    #[default]
    Ignore,
    /// The request goes to the handler, bypassing the cache (nothing read,
    /// nothing stored, no lock): any client can then reach the origin.
    PassThrough,
}

/// What a request gets when the cache itself fails (Redis unreachable, the
/// lock wait timed out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnCacheError {
    /// The handler answers, uncached (`X-Cache: MISS`). The default: the
    /// service stays up without Redis, at the origin's cost.
    #[default]
    Handler,
    /// `503 Service Unavailable` with `Retry-After: 1`: the origin is
    /// protected while the cache is down.
    Unavailable,
}

/// The layer's rules, set through [`CacheLayer`](super::CacheLayer)'s
/// builder methods; `Default` is the one home of every default.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    pub default_ttl: Duration,
    pub max_body: usize,
    pub max_stale: Duration,
    pub pass_ttl: Duration,
    pub status_header: HeaderName,
    pub store_set_cookie: bool,
    pub store_private: bool,
    pub store_no_store: bool,
    pub store_authorized: bool,
    pub client_no_cache: ClientNoCache,
    pub on_cache_error: OnCacheError,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            default_ttl: DEFAULT_HTTP_TTL,
            max_body: DEFAULT_MAX_BODY,
            max_stale: DEFAULT_MAX_STALE,
            pass_ttl: DEFAULT_PASS_TTL,
            status_header: HeaderName::from_static(DEFAULT_STATUS_HEADER),
            store_set_cookie: false,
            store_private: false,
            store_no_store: false,
            store_authorized: false,
            client_no_cache: ClientNoCache::Ignore,
            on_cache_error: OnCacheError::Handler,
        }
    }
}

/// How long a stored response lives: fresh, then stale while revalidated,
/// then stale only in place of an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Lifetimes {
    pub ttl: Duration,
    pub swr: Duration,
    pub sie: Duration,
}

/// What to do with a loaded response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Store it for these lifetimes.
    Store(Lifetimes),
    /// Hand it to the requests that waited for this load, not stored (a 5xx,
    /// an uncacheable status, a zero lifetime).
    Share,
    /// Only for the request that ran the handler: private, a cookie, `Vary: *`.
    Pass,
}

/// The `Cache-Control` directives this layer reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Directives {
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
}

impl Directives {
    /// Every `Cache-Control` field of `headers`. A field that is not visible
    /// ASCII counts as `no-store` (it cannot be read, so nothing is assumed);
    /// a malformed number counts as 0 (RFC 9111 4.2.1: stale).
    pub fn of(headers: &HeaderMap) -> Directives {
        let mut d = Directives::default();
        for value in headers.get_all(header::CACHE_CONTROL) {
            let Ok(value) = value.to_str() else {
                d.no_store = true;
                continue;
            };
            for directive in value.split(',') {
                let (name, arg) = match directive.split_once('=') {
                    Some((name, arg)) => (name.trim(), Some(arg.trim().trim_matches('"'))),
                    None => (directive.trim(), None),
                };
                let seconds = || Some(arg.and_then(|a| a.parse::<u64>().ok()).unwrap_or(0));
                match name.to_ascii_lowercase().as_str() {
                    "no-store" => d.no_store = true,
                    "no-cache" => d.no_cache = true,
                    "private" => d.private = true,
                    "public" => d.public = true,
                    "must-revalidate" | "proxy-revalidate" => d.must_revalidate = true,
                    "max-age" => d.max_age = seconds(),
                    "s-maxage" => d.s_maxage = seconds(),
                    "stale-while-revalidate" => d.stale_while_revalidate = seconds(),
                    "stale-if-error" => d.stale_if_error = seconds(),
                    _ => {}
                }
            }
        }
        d
    }
}

/// Statuses stored without explicit freshness (RFC 9110 15.1, "heuristically
/// cacheable"), less 206 (ranges are passed through) and 501 (no 5xx is stored).
pub(crate) fn cacheable_status(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414
    )
}

impl Policy {
    /// Whether a request skips the cache altogether (goes to the handler,
    /// nothing read or stored): not GET or HEAD, a `Range`, an
    /// `Authorization` (unless opted in), or `no-cache` under
    /// [`ClientNoCache::PassThrough`].
    pub fn passes(&self, request: &request::Parts) -> bool {
        if request.method != Method::GET && request.method != Method::HEAD {
            return true;
        }
        let headers = &request.headers;
        if headers.contains_key(header::RANGE)
            || (headers.contains_key(header::AUTHORIZATION) && !self.store_authorized)
        {
            return true;
        }
        self.client_no_cache == ClientNoCache::PassThrough && asks_no_cache(headers)
    }

    /// What to do with a response to a GET that passed [`passes`](Self::passes).
    pub fn judge(&self, status: StatusCode, headers: &HeaderMap) -> Decision {
        let d = Directives::of(headers);
        if headers.get_all(header::VARY).iter().any(|v| {
            v.to_str()
                .map_or(true, |v| v.split(',').any(|n| n.trim() == "*"))
        }) {
            return Decision::Pass;
        }
        if (headers.contains_key(header::SET_COOKIE) && !self.store_set_cookie)
            || (d.private && !self.store_private)
            || (d.no_store && !self.store_no_store)
        {
            return Decision::Pass;
        }
        if !cacheable_status(status) || d.no_cache {
            return Decision::Share;
        }
        let ttl = match d.s_maxage.or(d.max_age) {
            Some(seconds) => Duration::from_secs(seconds),
            None => expires(headers).unwrap_or(self.default_ttl),
        };
        if ttl.is_zero() {
            return Decision::Share;
        }
        let window = |w: Option<u64>| match d.must_revalidate {
            true => Duration::ZERO,
            false => Duration::from_secs(w.unwrap_or(0)).min(self.max_stale),
        };
        Decision::Store(Lifetimes {
            ttl,
            swr: window(d.stale_while_revalidate),
            sie: window(d.stale_if_error),
        })
    }
}

/// A request's `Cache-Control: no-cache`, `max-age=0` or `Pragma: no-cache`.
fn asks_no_cache(headers: &HeaderMap) -> bool {
    let d = Directives::of(headers);
    d.no_cache
        || d.max_age == Some(0)
        || headers
            .get(header::PRAGMA)
            .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"no-cache"))
}

/// `Expires - Date` (or `- now` without a `Date`); an unreadable `Expires`
/// is already expired (RFC 9111 5.3).
fn expires(headers: &HeaderMap) -> Option<Duration> {
    let expires = headers.get(header::EXPIRES)?;
    let Some(at) = http_date(expires.as_bytes()) else {
        return Some(Duration::ZERO);
    };
    let now = headers
        .get(header::DATE)
        .and_then(|d| http_date(d.as_bytes()))
        .unwrap_or_else(SystemTime::now);
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

fn http_date(value: &[u8]) -> Option<SystemTime> {
    httpdate::parse_http_date(std::str::from_utf8(value).ok()?).ok()
}

/// Whether a stored 200 answers a conditional request with `304`: its ETag
/// matches `If-None-Match` (weak comparison, or `*`), or, without
/// `If-None-Match`, its `Last-Modified` is no later than `If-Modified-Since`.
pub(crate) fn not_modified(request: &HeaderMap, stored: &HeaderMap) -> bool {
    if let Some(wanted) = request.get(header::IF_NONE_MATCH) {
        let (Ok(wanted), Some(etag)) = (wanted.to_str(), stored.get(header::ETAG)) else {
            return false;
        };
        let weak = |tag: &str| tag.trim().trim_start_matches("W/").to_owned();
        let etag = weak(etag.to_str().unwrap_or(""));
        return wanted.trim() == "*" || wanted.split(',').any(|tag| weak(tag) == etag);
    }
    let since = request.get(header::IF_MODIFIED_SINCE);
    let modified = stored.get(header::LAST_MODIFIED);
    match (since.and_then(|s| http_date(s.as_bytes())), modified) {
        (Some(since), Some(modified)) => http_date(modified.as_bytes()).is_some_and(|m| m <= since),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn judge(pairs: &[(&str, &str)]) -> Decision {
        Policy::default().judge(StatusCode::OK, &headers(pairs))
    }

    fn stored(ttl: u64, swr: u64, sie: u64) -> Decision {
        Decision::Store(Lifetimes {
            ttl: Duration::from_secs(ttl),
            swr: Duration::from_secs(swr),
            sie: Duration::from_secs(sie),
        })
    }

    #[test]
    fn lifetimes_come_from_s_maxage_then_max_age_then_the_default() {
        assert_eq!(judge(&[]), stored(60, 0, 0));
        assert_eq!(judge(&[("cache-control", "max-age=5")]), stored(5, 0, 0));
        assert_eq!(
            judge(&[("cache-control", "public, max-age=5, s-maxage=9")]),
            stored(9, 0, 0)
        );
        assert_eq!(
            judge(&[(
                "cache-control",
                "max-age=5, stale-while-revalidate=30, stale-if-error=999999"
            )]),
            stored(5, 30, 86_400)
        );
        assert_eq!(
            judge(&[(
                "cache-control",
                "max-age=5, stale-if-error=9, must-revalidate"
            )]),
            stored(5, 0, 0)
        );
        assert_eq!(
            judge(&[("cache-control", "max-age=banana")]),
            Decision::Share
        );
        assert_eq!(
            judge(&[
                ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
                ("expires", "Sun, 06 Nov 1994 08:50:37 GMT")
            ]),
            stored(60, 0, 0)
        );
        assert_eq!(judge(&[("expires", "0")]), Decision::Share);
    }

    #[test]
    fn private_answers_pass_and_uncacheable_ones_are_shared_unstored() {
        for pass in [
            &[("set-cookie", "sid=1")][..],
            &[("cache-control", "private, max-age=60")],
            &[("cache-control", "no-store")],
            &[("vary", "accept, *")],
        ] {
            assert_eq!(judge(pass), Decision::Pass, "{pass:?}");
        }
        let opted = Policy {
            store_set_cookie: true,
            store_private: true,
            store_no_store: true,
            ..Policy::default()
        };
        let h = headers(&[
            ("set-cookie", "a=b"),
            ("cache-control", "private, no-store"),
        ]);
        assert_eq!(opted.judge(StatusCode::OK, &h), stored(60, 0, 0));
        let policy = Policy::default();
        for status in [201, 302, 400, 500, 503] {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(policy.judge(status, &HeaderMap::new()), Decision::Share);
        }
        assert_eq!(judge(&[("cache-control", "no-cache")]), Decision::Share);
    }

    #[test]
    fn requests_that_skip_the_cache() {
        let parts = |method: Method, pairs: &[(&str, &str)]| {
            let mut req = http::Request::builder().method(method).uri("/x");
            for (n, v) in pairs {
                req = req.header(*n, *v);
            }
            req.body(()).unwrap().into_parts().0
        };
        let policy = Policy::default();
        assert!(!policy.passes(&parts(Method::GET, &[])));
        assert!(!policy.passes(&parts(Method::HEAD, &[])));
        assert!(!policy.passes(&parts(Method::GET, &[("cache-control", "no-cache")])));
        assert!(policy.passes(&parts(Method::POST, &[])));
        assert!(policy.passes(&parts(Method::GET, &[("authorization", "Bearer x")])));
        assert!(policy.passes(&parts(Method::GET, &[("range", "bytes=0-1")])));
        let bypass = Policy {
            client_no_cache: ClientNoCache::PassThrough,
            store_authorized: true,
            ..Policy::default()
        };
        assert!(bypass.passes(&parts(Method::GET, &[("pragma", "no-cache")])));
        assert!(!bypass.passes(&parts(Method::GET, &[("authorization", "Bearer x")])));
    }

    #[test]
    fn conditional_requests() {
        let stored = headers(&[
            ("etag", "W/\"v1\""),
            ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ]);
        let yes = |pairs: &[(&str, &str)]| not_modified(&headers(pairs), &stored);
        assert!(yes(&[("if-none-match", "\"v0\", \"v1\"")]));
        assert!(yes(&[("if-none-match", "*")]));
        assert!(!yes(&[("if-none-match", "\"v2\"")]));
        assert!(yes(&[(
            "if-modified-since",
            "Sun, 06 Nov 1994 08:49:37 GMT"
        )]));
        assert!(!yes(&[(
            "if-modified-since",
            "Sun, 06 Nov 1994 08:49:36 GMT"
        )]));
        assert!(!yes(&[("if-modified-since", "yesterday")]));
        // If-None-Match wins over If-Modified-Since.
        assert!(!yes(&[
            ("if-none-match", "\"v2\""),
            ("if-modified-since", "Sun, 06 Nov 1994 08:49:37 GMT")
        ]));
        assert!(!yes(&[]));
    }
}
