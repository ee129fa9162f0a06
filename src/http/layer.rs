//! The tower trio: [`CacheLayer`] (its builder), [`CacheService`] and
//! [`ResponseFuture`]. What a request goes through is in `serve.rs`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderName;
use http::{Request, Response};
use http_body::Body;
use tower_layer::Layer;
use tower_service::Service;

use super::body::{BoxError, CacheBody};
use super::key::{self, KeyFn};
use super::policy::{ClientNoCache, OnCacheError, Policy};
use crate::{BincodeCodec, CallOptions, Codec, LockedCache};

/// A tower [`Layer`] caching whole responses in a [`LockedCache`]: see the
/// [module docs](super) for what is stored, for how long, and what each
/// request sees. Cheap to clone.
pub struct CacheLayer<C = BincodeCodec> {
    pub(super) cache: LockedCache<C>,
    pub(super) policy: Policy,
    pub(super) key: KeyFn,
    pub(super) options: CallOptions,
}

impl<C> Clone for CacheLayer<C> {
    fn clone(&self) -> Self {
        CacheLayer {
            cache: self.cache.clone(),
            policy: self.policy.clone(),
            key: Arc::clone(&self.key),
            options: self.options,
        }
    }
}

impl<C> std::fmt::Debug for CacheLayer<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheLayer")
            .field("policy", &self.policy)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<C: Codec> CacheLayer<C> {
    /// A layer over `cache`, with every rule at its default.
    pub fn new(cache: LockedCache<C>) -> CacheLayer<C> {
        CacheLayer {
            cache,
            policy: Policy::default(),
            key: Arc::new(key::default_key),
            options: CallOptions::new(),
        }
    }

    /// The cache key of a request (`None`: not cached, straight to the
    /// handler): add a tenant header or a user id to it, or leave out a
    /// query parameter. HEAD requests come with their own method: give them
    /// their GET's key to serve them from it. Defaults to `http:GET:` and
    /// the path and query (the same for GET and HEAD).
    pub fn key<F>(mut self, key: F) -> Self
    where
        F: Fn(&http::request::Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.key = Arc::new(key);
        self
    }

    /// The options of the cache calls (tags, timeouts, early refresh, ...).
    /// Their TTL and stale window are replaced per response (from its
    /// `Cache-Control`). Defaults to the cache's own.
    pub fn call_options(mut self, options: CallOptions) -> Self {
        self.options = options;
        self
    }

    /// The fresh time of a response without `s-maxage`, `max-age` or
    /// `Expires`. Defaults to 60 s ([`DEFAULT_HTTP_TTL`](super::DEFAULT_HTTP_TTL)).
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.policy.default_ttl = ttl;
        self
    }

    /// The largest body stored; a larger one streams through to its client
    /// uncached (and its key passes for [`pass_ttl`](Self::pass_ttl)).
    /// Defaults to 1 MiB ([`DEFAULT_MAX_BODY`](super::DEFAULT_MAX_BODY)).
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.policy.max_body = bytes;
        self
    }

    /// The longest `stale-while-revalidate` / `stale-if-error` honoured.
    /// Defaults to one day ([`DEFAULT_MAX_STALE`](super::DEFAULT_MAX_STALE)).
    pub fn max_stale(mut self, window: Duration) -> Self {
        self.policy.max_stale = window;
        self
    }

    /// How long a key whose response may not be shared (private, a cookie,
    /// `Vary: *`, over the body limit) sends its requests straight to the
    /// handler, without queueing for the key's lock. Zero remembers nothing:
    /// such requests then run one at a time per key across the fleet.
    /// Defaults to 10 s ([`DEFAULT_PASS_TTL`](super::DEFAULT_PASS_TTL)).
    pub fn pass_ttl(mut self, ttl: Duration) -> Self {
        self.policy.pass_ttl = ttl;
        self
    }

    /// The header telling how a response was served: `HIT`, `MISS` or
    /// `STALE`. Defaults to `x-cache` ([`DEFAULT_STATUS_HEADER`](super::DEFAULT_STATUS_HEADER)).
    pub fn status_header(mut self, name: HeaderName) -> Self {
        self.policy.status_header = name;
        self
    }

    /// Store responses with `Set-Cookie` (the cookie then goes to every
    /// client). Defaults to off.
    pub fn store_set_cookie(mut self, on: bool) -> Self {
        self.policy.store_set_cookie = on;
        self
    }

    /// Store `Cache-Control: private` responses. Defaults to off.
    pub fn store_private(mut self, on: bool) -> Self {
        self.policy.store_private = on;
        self
    }

    /// Store `Cache-Control: no-store` responses. Defaults to off.
    pub fn store_no_store(mut self, on: bool) -> Self {
        self.policy.store_no_store = on;
        self
    }

    /// Cache requests with `Authorization` (off: they go to the handler,
    /// nothing read or stored). On, make the [key](Self::key) tell users
    /// apart if the answers differ. Defaults to off.
    pub fn store_authorized(mut self, on: bool) -> Self {
        self.policy.store_authorized = on;
        self
    }

    /// What a request's `Cache-Control: no-cache` does. Defaults to
    /// [`ClientNoCache::Ignore`]: a client cannot bypass the shield.
    pub fn client_no_cache(mut self, policy: ClientNoCache) -> Self {
        self.policy.client_no_cache = policy;
        self
    }

    /// What a request gets when the cache fails. Defaults to
    /// [`OnCacheError::Handler`].
    pub fn on_cache_error(mut self, policy: OnCacheError) -> Self {
        self.policy.on_cache_error = policy;
        self
    }
}

impl<S, C: Codec> Layer<S> for CacheLayer<C> {
    type Service = CacheService<S, C>;

    fn layer(&self, inner: S) -> CacheService<S, C> {
        CacheService {
            inner,
            shared: Arc::new(self.clone()),
        }
    }
}

/// The [`Service`] of a [`CacheLayer`].
pub struct CacheService<S, C = BincodeCodec> {
    inner: S,
    shared: Arc<CacheLayer<C>>,
}

impl<S: Clone, C> Clone for CacheService<S, C> {
    fn clone(&self) -> Self {
        CacheService {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: std::fmt::Debug, C> std::fmt::Debug for CacheService<S, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// The future of a [`CacheService`] call.
pub struct ResponseFuture<E> {
    inner: Pin<Box<dyn Future<Output = Result<Response<CacheBody>, E>> + Send>>,
}

impl<E> Future for ResponseFuture<E> {
    type Output = Result<Response<CacheBody>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<E> std::fmt::Debug for ResponseFuture<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResponseFuture")
    }
}

impl<S, C, ReqB, ResB> Service<Request<ReqB>> for CacheService<S, C>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqB: Send + 'static,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
    C: Codec,
{
    type Response = Response<CacheBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqB>) -> ResponseFuture<S::Error> {
        // The service that was polled ready serves this request.
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        ResponseFuture {
            inner: Box::pin(super::serve::serve(
                Arc::clone(&self.shared),
                ready,
                request,
            )),
        }
    }
}
