//! Cache keys of requests: the default (method, path and query, HEAD as
//! GET), a custom closure, and the variant keys of responses with `Vary`.

use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName};
use http::request;

/// A custom key: the request's head in, the key out (`None`: this request
/// is not cached, it goes to the handler).
pub(crate) type KeyFn = Arc<dyn Fn(&request::Parts) -> Option<String> + Send + Sync>;

/// `http:GET:/path?query`. HEAD requests get the GET key: they are served
/// from the GET entry.
pub(crate) fn default_key(request: &request::Parts) -> Option<String> {
    let target = request.uri.path_and_query().map_or("/", |pq| pq.as_str());
    Some(format!("http:GET:{target}"))
}

/// The header names a response varies on (`None` for `Vary: *` or an
/// unreadable `Vary`), lower case, in order.
pub(crate) fn vary_names(response: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut names = Vec::new();
    for value in response.get_all(header::VARY) {
        for name in value.to_str().ok()?.split(',') {
            let name = name.trim();
            if name.is_empty() {
                continue;
            }
            if name == "*" {
                return None;
            }
            names.push(HeaderName::from_bytes(name.as_bytes()).ok()?);
        }
    }
    Some(names)
}

/// A request's values of the `names` headers (several fields of one name
/// joined by `, `; `None` when absent), as stored with a response and
/// compared with the next request's.
pub(crate) fn vary_values(names: &[HeaderName], request: &HeaderMap) -> Vec<Option<Vec<u8>>> {
    names
        .iter()
        .map(|name| {
            let mut fields = request.get_all(name).iter();
            let first = fields.next()?;
            let mut joined = first.as_bytes().to_vec();
            for more in fields {
                joined.extend_from_slice(b", ");
                joined.extend_from_slice(more.as_bytes());
            }
            Some(joined)
        })
        .collect()
}

/// The key of one variant: the base key and a hash of the request's values
/// of the varying headers. The entry stores the values themselves and they
/// are compared on every read, so a collision is a miss, never a wrong answer.
pub(crate) fn variant_key(base: &str, values: &[Option<Vec<u8>>]) -> String {
    // FNV-1a: stable across processes (the std and foldhash hashers are seeded).
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |byte: u8| {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    };
    for value in values {
        match value {
            Some(bytes) => {
                eat(1);
                bytes.iter().copied().for_each(&mut eat);
            }
            None => eat(0),
        }
        eat(0xff);
    }
    format!("{base}|vary:{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderValue, Method, Request};

    #[test]
    fn head_and_get_share_a_key_and_the_query_counts() {
        let parts = |method: Method, uri: &str| {
            let req = Request::builder().method(method).uri(uri).body(()).unwrap();
            req.into_parts().0
        };
        let get = default_key(&parts(Method::GET, "http://h/a?b=1")).unwrap();
        assert_eq!(get, "http:GET:/a?b=1");
        assert_eq!(default_key(&parts(Method::HEAD, "/a?b=1")).unwrap(), get);
        assert_ne!(default_key(&parts(Method::GET, "/a?b=2")).unwrap(), get);
    }

    #[test]
    fn vary() {
        let mut response = HeaderMap::new();
        response.append(
            header::VARY,
            HeaderValue::from_static("Accept-Language, accept"),
        );
        let names = vary_names(&response).unwrap();
        assert_eq!(names, [header::ACCEPT_LANGUAGE, header::ACCEPT]);
        response.append(header::VARY, HeaderValue::from_static("*"));
        assert_eq!(vary_names(&response), None);

        let mut request = HeaderMap::new();
        request.append(header::ACCEPT_LANGUAGE, HeaderValue::from_static("fr"));
        request.append(header::ACCEPT_LANGUAGE, HeaderValue::from_static("en"));
        let values = vary_values(&names, &request);
        assert_eq!(values, [Some(b"fr, en".to_vec()), None]);
        let other = vec![Some(b"de".to_vec()), None];
        assert_ne!(variant_key("k", &values), variant_key("k", &other));
        assert_eq!(variant_key("k", &values), variant_key("k", &values.clone()));
        assert_ne!(
            variant_key("k", &[None]),
            variant_key("k", &[Some(Vec::new())])
        );
    }
}
