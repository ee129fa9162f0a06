//! The tower trio: [`CacheLayer`] (its builder), [`CacheService`] and
//! [`ResponseFuture`]. A request is judged by the policy, looked up through
//! the cache's public `with(..).get_or_load_bytes_with_outcome`, whose loader
//! runs the handler once across the fleet; the answer is built from the
//! stored entry (or is the handler's own, for what may not be shared).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use tower_layer::Layer;
use tower_service::Service;

use super::body::{BoxError, Buffered, CacheBody, Entry, buffer, now_ms};
use super::key::{self, KeyFn};
use super::policy::{ClientNoCache, Decision, OnCacheError, Policy, not_modified};
use crate::{BincodeCodec, CallOptions, Codec, LoadContext, LoadError, LockedCache, Outcome};

/// A tower [`Layer`] caching whole responses in a [`LockedCache`]: see the
/// [module docs](super) for what is stored, for how long, and what each
/// request sees. Cheap to clone.
pub struct CacheLayer<C = BincodeCodec> {
    cache: LockedCache<C>,
    policy: Policy,
    key: KeyFn,
    options: CallOptions,
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
            inner: Box::pin(serve(Arc::clone(&self.shared), ready, request)),
        }
    }
}

/// The request, and the service to answer it, used once: by the load, or,
/// when no load of this request ran, by a pass to the handler.
type Once<S, B> = Arc<Mutex<Option<(S, Request<B>)>>>;
/// The answer a load keeps for its own request only (what may not be
/// shared), or the handler's error.
type Mine<E> = Arc<Mutex<Option<Result<Response<CacheBody>, E>>>>;

fn take<T>(slot: &Mutex<Option<T>>) -> Option<T> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).take()
}

fn put<T>(slot: &Mutex<Option<T>>, value: T) {
    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(value);
}

/// What one lookup gave.
enum Got<E> {
    Entry(Entry, Outcome),
    Mine(Result<Response<CacheBody>, E>),
    /// Not shareable, or the load failed: the handler answers this request.
    Pass,
    CacheFailed,
}

/// The load failed (the handler errored or panicked): no value to share.
#[derive(Debug)]
struct Failed;

async fn serve<S, C, ReqB, ResB>(
    shared: Arc<CacheLayer<C>>,
    service: S,
    request: Request<ReqB>,
) -> Result<Response<CacheBody>, S::Error>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqB: Send + 'static,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
    C: Codec,
{
    let policy = &shared.policy;
    let (mut parts, body) = request.into_parts();
    let key = match policy.passes(&parts) {
        true => None,
        false => (shared.key)(&parts),
    };
    let Some(key) = key else {
        let response = pass(service, Request::from_parts(parts, body)).await?;
        return Ok(labelled(response, false, policy));
    };
    let head = parts.method == Method::HEAD;
    let asked = parts.headers.clone();
    parts.method = Method::GET; // a HEAD is loaded as its GET
    let once: Once<S, ReqB> = Arc::new(Mutex::new(Some((
        service,
        Request::from_parts(parts, body),
    ))));

    let accept_stale = CallOptions::new().stale_for(policy.max_stale);
    let mut got = lookup(&shared, &key, &once, &asked, accept_stale).await;
    // A response that varies: this request's variant, unless it is this one.
    if let Got::Entry(entry, _) = &got
        && let Some(names) = key::vary_names(&entry.headers)
        && !names.is_empty()
    {
        let values = key::vary_values(&names, &asked);
        if values != entry.vary {
            let variant = key::variant_key(&key, &values);
            got = match lookup(&shared, &variant, &once, &asked, accept_stale).await {
                Got::Entry(entry, _) if entry.vary != values => Got::Pass,
                other => other,
            };
        }
    }
    // Stale past `stale-while-revalidate` but inside `stale-if-error`: wait
    // for the refresh, and keep the stale answer if it fails.
    if let Got::Entry(stale, Outcome::Stale | Outcome::FailSafe) = &got
        && stale.age() > stale.lifetimes.ttl + stale.lifetimes.swr
    {
        let fresh = lookup(
            &shared,
            &key,
            &once,
            &asked,
            CallOptions::new().stale_for(Duration::ZERO),
        )
        .await;
        let failed = match &fresh {
            Got::Entry(e, _) => e.status.is_server_error(),
            Got::Mine(Ok(r)) => r.status().is_server_error(),
            _ => true,
        };
        if !failed || stale.age() > stale.lifetimes.ttl + stale.lifetimes.sie {
            got = fresh;
        }
    }
    let response = match got {
        Got::Entry(entry, outcome) => {
            let label = match outcome {
                Outcome::Loaded => "MISS",
                Outcome::Stale | Outcome::FailSafe => "STALE",
                _ => "HIT",
            };
            return Ok(answer(&entry, &asked, head, label, policy));
        }
        Got::Mine(response) => response?,
        Got::Pass => match take(&once) {
            Some((service, request)) => pass(service, request).await?,
            None => unavailable(),
        },
        Got::CacheFailed => match (policy.on_cache_error, take(&once)) {
            (OnCacheError::Handler, Some((service, request))) => pass(service, request).await?,
            _ => unavailable(),
        },
    };
    Ok(labelled(response, head, policy))
}

/// Looks `key` up; on a miss the loader runs this request's handler.
async fn lookup<S, C, ReqB, ResB>(
    shared: &Arc<CacheLayer<C>>,
    key: &str,
    once: &Once<S, ReqB>,
    asked: &HeaderMap,
    options: CallOptions,
) -> Got<S::Error>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqB: Send + 'static,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
    C: Codec,
{
    let mine: Mine<S::Error> = Arc::new(Mutex::new(None));
    let loader = {
        let (once, mine, layer) = (Arc::clone(once), Arc::clone(&mine), Arc::clone(shared));
        let asked = asked.clone();
        move |context: LoadContext| load(context, once, mine, layer, asked)
    };
    let called = shared
        .cache
        .with(options.or(shared.options))
        .get_or_load_bytes_with_outcome(key, loader)
        .await;
    if let Some(own) = take(&mine) {
        return Got::Mine(own);
    }
    match called {
        Ok((stored, outcome)) => match Entry::decode(stored) {
            Some(entry) if entry.pass => Got::Pass,
            Some(entry) => Got::Entry(entry, outcome),
            None => {
                tracing::warn!(
                    key,
                    "an unreadable HTTP cache entry: removed, the handler answers"
                );
                let _ = shared.cache.invalidate(key).await;
                Got::Pass
            }
        },
        Err(LoadError::Loader(_)) => Got::Pass,
        Err(LoadError::Cache(e)) => {
            tracing::warn!(key, error = %e, "the HTTP cache failed");
            Got::CacheFailed
        }
    }
}

/// The loader: runs the handler, buffers its body, and tells the cache what
/// to do with the answer.
async fn load<S, C, ReqB, ResB>(
    context: LoadContext,
    once: Once<S, ReqB>,
    mine: Mine<S::Error>,
    layer: Arc<CacheLayer<C>>,
    asked: HeaderMap,
) -> Result<Vec<u8>, Failed>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqB: Send + 'static,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    let policy = &layer.policy;
    let Some((mut service, request)) = take(&once) else {
        return Err(Failed); // this request was already answered by an earlier load
    };
    let response = match AssertUnwindSafe(service.call(request)).catch_unwind().await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => {
            put(&mine, Err(e));
            return Err(Failed);
        }
        Err(_) => {
            tracing::error!("the handler panicked: 500, not cached");
            put(&mine, Ok(status(StatusCode::INTERNAL_SERVER_ERROR)));
            return Err(Failed);
        }
    };
    let (parts, body) = response.into_parts();
    let decision = policy.judge(parts.status, &parts.headers);
    let body = match buffer(body.map_err(Into::into).boxed_unsync(), policy.max_body).await {
        Buffered::Whole(body) => body,
        Buffered::TooLarge(rest) => {
            put(
                &mine,
                Ok(Response::from_parts(parts, CacheBody::stream(rest))),
            );
            return Ok(pass_marker(&context, policy));
        }
        Buffered::Failed(e) => {
            tracing::warn!(error = %e, "the handler's body failed: 502, not cached");
            put(&mine, Ok(status(StatusCode::BAD_GATEWAY)));
            return Err(Failed);
        }
    };
    let lifetimes = match decision {
        Decision::Store(lifetimes) => lifetimes,
        Decision::Share => {
            context.do_not_store();
            Default::default()
        }
        Decision::Pass => {
            put(
                &mine,
                Ok(Response::from_parts(parts, CacheBody::full(body))),
            );
            return Ok(pass_marker(&context, policy));
        }
    };
    context.set_ttl(lifetimes.ttl);
    context.set_stale_for(lifetimes.swr.max(lifetimes.sie));
    let vary = key::vary_values(&key::vary_names(&parts.headers).unwrap_or_default(), &asked);
    let entry = Entry {
        pass: false,
        status: parts.status,
        stored_at_ms: now_ms(),
        lifetimes,
        vary,
        headers: parts.headers,
        body,
    };
    Ok(entry.encode())
}

/// The marker of a key that passes, stored for the pass TTL.
fn pass_marker(context: &LoadContext, policy: &Policy) -> Vec<u8> {
    context.set_ttl(policy.pass_ttl);
    context.set_stale_for(Duration::ZERO);
    Entry::pass().encode()
}

/// The answer from a stored entry: `304` to a matching conditional request,
/// the body left out for HEAD, `Age` and the status header added.
fn answer(
    entry: &Entry,
    asked: &HeaderMap,
    head: bool,
    label: &'static str,
    policy: &Policy,
) -> Response<CacheBody> {
    let mut response = if entry.status == StatusCode::OK && not_modified(asked, &entry.headers) {
        let mut response = status(StatusCode::NOT_MODIFIED);
        for name in [
            header::ETAG,
            header::LAST_MODIFIED,
            header::CACHE_CONTROL,
            header::EXPIRES,
            header::VARY,
            header::DATE,
            header::CONTENT_LOCATION,
        ] {
            for value in entry.headers.get_all(&name) {
                response.headers_mut().append(name.clone(), value.clone());
            }
        }
        response
    } else {
        let body = match head {
            true => CacheBody::empty(),
            false => CacheBody::full(entry.body.clone()),
        };
        let mut response = Response::new(body);
        *response.status_mut() = entry.status;
        *response.headers_mut() = entry.headers.clone();
        if !entry.content_length_ok() {
            response.headers_mut().remove(header::CONTENT_LENGTH);
        }
        if head {
            // What the GET would have said (hyper would say 0 for the empty body).
            let length = HeaderValue::from(entry.body.len());
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, length);
        }
        response
    };
    let headers = response.headers_mut();
    headers.insert(header::AGE, HeaderValue::from(entry.age().as_secs()));
    headers.insert(
        policy.status_header.clone(),
        HeaderValue::from_static(label),
    );
    response
}

/// The handler's own answer (not from the cache): `MISS`, no body for HEAD.
fn labelled(mut response: Response<CacheBody>, head: bool, policy: &Policy) -> Response<CacheBody> {
    if head {
        *response.body_mut() = CacheBody::empty();
    }
    response.headers_mut().insert(
        policy.status_header.clone(),
        HeaderValue::from_static("MISS"),
    );
    response
}

/// Straight to the handler.
async fn pass<S, ReqB, ResB>(
    mut service: S,
    request: Request<ReqB>,
) -> Result<Response<CacheBody>, S::Error>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    let response = service.call(request).await?;
    Ok(response.map(|body| CacheBody::stream(body.map_err(Into::into).boxed_unsync())))
}

fn status(code: StatusCode) -> Response<CacheBody> {
    let mut response = Response::new(CacheBody::empty());
    *response.status_mut() = code;
    response
}

fn unavailable() -> Response<CacheBody> {
    let mut response = status(StatusCode::SERVICE_UNAVAILABLE);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}
