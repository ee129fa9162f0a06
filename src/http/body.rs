//! Bodies and the stored form: the response body the layer answers with
//! ([`CacheBody`]), the buffering of a handler's body up to the limit, and
//! the versioned binary encoding of a stored response (status, headers, body,
//! lifetimes, the request's `Vary` values), stored through the cache's bytes
//! fast path and decoded with the body borrowed, not copied.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::StatusCode;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;

use super::policy::Lifetimes;

/// The error type of a streamed body: the handler's body error, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every response the layer answers with: a stored body (whole,
/// in memory, shared without a copy), or the handler's own body streamed
/// through (responses that are not cached, and bodies over the limit).
pub struct CacheBody {
    kind: Kind,
}

enum Kind {
    Full(Option<Bytes>),
    Stream(UnsyncBoxBody<Bytes, BoxError>),
}

impl CacheBody {
    pub(crate) fn full(bytes: Bytes) -> CacheBody {
        CacheBody {
            kind: Kind::Full(Some(bytes).filter(|b| !b.is_empty())),
        }
    }

    pub(crate) fn empty() -> CacheBody {
        CacheBody {
            kind: Kind::Full(None),
        }
    }

    pub(crate) fn stream(body: UnsyncBoxBody<Bytes, BoxError>) -> CacheBody {
        CacheBody {
            kind: Kind::Stream(body),
        }
    }
}

impl std::fmt::Debug for CacheBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Full(bytes) => write!(
                f,
                "CacheBody::Full({} bytes)",
                bytes.as_ref().map_or(0, Bytes::len)
            ),
            Kind::Stream(_) => f.write_str("CacheBody::Stream"),
        }
    }
}

impl Body for CacheBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Stream(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Stream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Stream(body) => body.size_hint(),
        }
    }
}

/// A handler's body, read up to the limit.
pub(crate) enum Buffered {
    /// All of it (trailers dropped).
    Whole(Bytes),
    /// Over the limit: what was read, then the rest, to stream on.
    TooLarge(UnsyncBoxBody<Bytes, BoxError>),
    /// The body failed while being read.
    Failed(BoxError),
}

/// Reads `body` whole if it is at most `limit` bytes; one past, it stops and
/// hands back what it read followed by the rest (never buffering it whole).
pub(crate) async fn buffer(mut body: UnsyncBoxBody<Bytes, BoxError>, limit: usize) -> Buffered {
    if body.size_hint().lower() > limit as u64 {
        return Buffered::TooLarge(body);
    }
    let mut read = VecDeque::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => return Buffered::Failed(e),
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers are not stored
        };
        total = total.saturating_add(data.len());
        read.push_back(data);
        if total > limit {
            return Buffered::TooLarge(Prefixed { read, rest: body }.boxed_unsync());
        }
    }
    Buffered::Whole(match read.len() {
        0 => Bytes::new(),
        1 => read.pop_front().unwrap_or_default(),
        _ => {
            let mut whole = BytesMut::with_capacity(total);
            read.iter().for_each(|chunk| whole.put_slice(chunk));
            whole.freeze()
        }
    })
}

/// The chunks already read, then the rest of the body.
struct Prefixed {
    read: VecDeque<Bytes>,
    rest: UnsyncBoxBody<Bytes, BoxError>,
}

impl Body for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(chunk) = self.read.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_empty() && self.rest.is_end_stream()
    }
}

/// A stored response.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    /// A key whose responses are not shared: its requests go to the handler.
    pub pass: bool,
    pub status: StatusCode,
    /// When the handler answered, in ms since the Unix epoch (for `Age`).
    pub stored_at_ms: u64,
    pub lifetimes: Lifetimes,
    /// The request's values of the `Vary` headers, in the `Vary` order.
    pub vary: Vec<Option<Vec<u8>>>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

const MAGIC: &[u8; 3] = b"LCH";
const VERSION: u8 = 1;
const PASS: u8 = 1;

/// Headers of one connection, never stored (RFC 9110 7.6.1), and `Age`,
/// which is recomputed on every answer.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "age"
    )
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Entry {
    /// The marker of a key whose responses are not shared.
    pub fn pass() -> Entry {
        Entry {
            pass: true,
            status: StatusCode::OK,
            stored_at_ms: now_ms(),
            lifetimes: Lifetimes::default(),
            vary: Vec::new(),
            headers: HeaderMap::new(),
            body: Bytes::new(),
        }
    }

    /// How long ago the handler answered, in whole seconds (`Age`).
    pub fn age(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.stored_at_ms))
    }

    /// Version 1: `LCH`, version, flags, status (u16), stored at (u64 ms),
    /// ttl, swr, sie (u64 ms each), vary values (u16 count; per value a
    /// presence byte, u32 length, bytes), headers (u16 count; per header u16
    /// name length, name, u32 value length, value), then the body to the end.
    /// Big-endian.
    pub fn encode(&self) -> Vec<u8> {
        let headers: Vec<_> = self
            .headers
            .iter()
            .filter(|(n, _)| !hop_by_hop(n))
            .collect();
        let size = 64
            + self.body.len()
            + headers
                .iter()
                .map(|(n, v)| 6 + n.as_str().len() + v.len())
                .sum::<usize>()
            + self
                .vary
                .iter()
                .map(|v| 5 + v.as_ref().map_or(0, Vec::len))
                .sum::<usize>();
        let mut out = Vec::with_capacity(size);
        out.extend_from_slice(MAGIC);
        out.put_u8(VERSION);
        out.put_u8(if self.pass { PASS } else { 0 });
        out.put_u16(self.status.as_u16());
        out.put_u64(self.stored_at_ms);
        let Lifetimes { ttl, swr, sie } = self.lifetimes;
        for d in [ttl, swr, sie] {
            out.put_u64(d.as_millis() as u64);
        }
        out.put_u16(self.vary.len().min(u16::MAX as usize) as u16);
        for value in self.vary.iter().take(u16::MAX as usize) {
            out.put_u8(u8::from(value.is_some()));
            let value = value.as_deref().unwrap_or_default();
            out.put_u32(value.len() as u32);
            out.extend_from_slice(value);
        }
        out.put_u16(headers.len().min(u16::MAX as usize) as u16);
        for (name, value) in headers.iter().take(u16::MAX as usize) {
            out.put_u16(name.as_str().len() as u16);
            out.extend_from_slice(name.as_str().as_bytes());
            out.put_u32(value.len() as u32);
            out.extend_from_slice(value.as_bytes());
        }
        out.extend_from_slice(&self.body);
        out
    }

    /// Decodes an entry; `None` for anything malformed (never a panic). The
    /// body is a slice of `stored`, not a copy.
    pub fn decode(stored: Vec<u8>) -> Option<Entry> {
        let stored = Bytes::from(stored);
        let mut buf = &stored[..];
        if buf.len() < 4 || &buf[..3] != MAGIC || buf[3] != VERSION {
            return None;
        }
        buf.advance(4);
        let flags = take_u8(&mut buf)?;
        let status = StatusCode::from_u16(take_u16(&mut buf)?).ok()?;
        let stored_at_ms = take_u64(&mut buf)?;
        let mut ms = || take_u64(&mut buf).map(Duration::from_millis);
        let lifetimes = Lifetimes {
            ttl: ms()?,
            swr: ms()?,
            sie: ms()?,
        };
        let mut vary = Vec::new();
        for _ in 0..take_u16(&mut buf)? {
            let present = take_u8(&mut buf)? == 1;
            let len = take_u32(&mut buf)? as usize;
            let value = take(&mut buf, len)?;
            vary.push(present.then(|| value.to_vec()));
        }
        let count = take_u16(&mut buf)?;
        // The count comes from the data: preallocate a little on its word, and
        // append without panicking (a `HeaderMap` has a maximum size).
        let mut headers = HeaderMap::with_capacity(usize::from(count).min(64));
        for _ in 0..count {
            let len = usize::from(take_u16(&mut buf)?);
            let name = HeaderName::from_bytes(take(&mut buf, len)?).ok()?;
            let len = take_u32(&mut buf)? as usize;
            let value = HeaderValue::from_bytes(take(&mut buf, len)?).ok()?;
            headers.try_append(name, value).ok()?;
        }
        let body = stored.slice(stored.len() - buf.len()..);
        Some(Entry {
            pass: flags & PASS != 0,
            status,
            stored_at_ms,
            lifetimes,
            vary,
            headers,
            body,
        })
    }

    /// Whether the entry's `Content-Length`, if any, matches its body (a
    /// HEAD answer keeps the header).
    pub fn content_length_ok(&self) -> bool {
        self.headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
            .is_none_or(|len| len == self.body.len())
    }
}

fn take<'a>(buf: &mut &'a [u8], len: usize) -> Option<&'a [u8]> {
    if buf.len() < len {
        return None;
    }
    let (head, rest) = buf.split_at(len);
    *buf = rest;
    Some(head)
}

fn take_u8(buf: &mut &[u8]) -> Option<u8> {
    take(buf, 1).map(|b| b[0])
}

fn take_u16(buf: &mut &[u8]) -> Option<u16> {
    take(buf, 2).map(|b| u16::from_be_bytes([b[0], b[1]]))
}

fn take_u32(buf: &mut &[u8]) -> Option<u32> {
    take(buf, 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_be_bytes)
}

fn take_u64(buf: &mut &[u8]) -> Option<u64> {
    take(buf, 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        let mut headers = HeaderMap::new();
        headers.append(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
        headers.append(header::SET_COOKIE, HeaderValue::from_static("a=1"));
        headers.append(header::SET_COOKIE, HeaderValue::from_static("b=2"));
        headers.append(header::CONNECTION, HeaderValue::from_static("close"));
        Entry {
            pass: false,
            status: StatusCode::NOT_FOUND,
            stored_at_ms: 1_700_000_000_000,
            lifetimes: Lifetimes {
                ttl: Duration::from_secs(5),
                swr: Duration::from_secs(6),
                sie: Duration::from_millis(7),
            },
            vary: vec![Some(b"fr".to_vec()), None],
            headers,
            body: Bytes::from_static(b"<html>hello</html>"),
        }
    }

    #[test]
    fn round_trip_without_hop_by_hop_headers() {
        let e = entry();
        let back = Entry::decode(e.encode()).unwrap();
        let mut expected = e.clone();
        expected.headers.remove(header::CONNECTION);
        assert_eq!(back, expected);
        assert_eq!(back.headers.get_all(header::SET_COOKIE).iter().count(), 2);
        let pass = Entry::decode(Entry::pass().encode()).unwrap();
        assert!(pass.pass);
    }

    #[test]
    fn every_truncation_and_corruption_is_none_not_a_panic() {
        let bytes = entry().encode();
        let body_at = bytes.len() - entry().body.len();
        for len in 0..body_at {
            assert_eq!(
                Entry::decode(bytes[..len].to_vec()),
                None,
                "truncated at {len}"
            );
        }
        for i in 0..body_at {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = bytes.clone();
                bad[i] ^= flip;
                let _ = Entry::decode(bad); // any answer but a panic
            }
        }
        let mut other_version = bytes.clone();
        other_version[3] = 2;
        assert_eq!(Entry::decode(other_version), None);
    }

    #[tokio::test]
    async fn bodies_over_the_limit_stream_on_with_nothing_lost() {
        let body = || {
            let chunks =
                (0..10).map(|i| Ok::<_, BoxError>(Frame::data(Bytes::from(vec![i as u8; 100]))));
            http_body_util::StreamBody::new(futures_util::stream::iter(chunks)).boxed_unsync()
        };
        let Buffered::Whole(all) = buffer(body(), 1000).await else {
            panic!("1000 bytes fit a 1000-byte limit");
        };
        assert_eq!(all.len(), 1000);
        let Buffered::TooLarge(rest) = buffer(body(), 250).await else {
            panic!("over the limit");
        };
        let streamed = rest.collect().await.unwrap().to_bytes();
        assert_eq!(streamed, all);
    }
}
