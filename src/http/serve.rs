//! One request's path through the layer: judged by the policy, looked up
//! through the cache's public `with(..).get_or_load_bytes_with_outcome`,
//! whose loader runs the handler (once across the fleet) and tells the cache
//! what to store; then the answer, built from the stored entry, or the
//! handler's own for what may not be shared.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use tower_service::Service;

use super::body::{BoxError, Buffered, CacheBody, Entry, buffer, now_ms};
use super::key;
use super::layer::CacheLayer;
use super::policy::{Decision, OnCacheError, Policy, not_modified};
use crate::{CallOptions, Codec, LoadContext, LoadError, Outcome};

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

pub(super) async fn serve<S, C, ReqB, ResB>(
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
