//! Every Redis command locked-cache sends, once, for any connection type: the
//! pooled multiplexed connections of [`RedisStore`](super::RedisStore) and the
//! cluster connection of `ClusterStore`. Each function is one round trip; the
//! stores add timeouts, re-sends and error naming around them.

use std::time::Duration;

use redis::RedisResult;
use redis::aio::ConnectionLike;

use super::{Stored, scripts};

/// `PX` milliseconds; at least 1 (`PX 0` is an error in Redis; the builder
/// rejects zero durations, this is a guard).
pub fn millis(d: Duration) -> u64 {
    (d.as_millis() as u64).max(1)
}

pub async fn get<C: ConnectionLike + Send>(
    conn: &mut C,
    key: &str,
) -> RedisResult<Option<Vec<u8>>> {
    redis::Cmd::get(key).query_async(conn).await
}

/// `GET` and `PTTL` pipelined: one round trip, the value with its remaining
/// time to live as the server counts it.
pub async fn get_with_ttl<C: ConnectionLike + Send>(
    conn: &mut C,
    key: &str,
) -> RedisResult<Option<Stored>> {
    let (bytes, pttl): (Option<Vec<u8>>, i64) = redis::pipe()
        .get(key)
        .cmd("PTTL")
        .arg(key)
        .query_async(conn)
        .await?;
    Ok(bytes.map(|bytes| Stored::from_pttl(bytes, pttl)))
}

pub async fn set<C: ConnectionLike + Send>(
    conn: &mut C,
    key: &str,
    value: &[u8],
    ttl: Duration,
) -> RedisResult<()> {
    redis::cmd("SET")
        .arg(key)
        .arg(value)
        .arg("PX")
        .arg(millis(ttl))
        .query_async(conn)
        .await
}

pub async fn delete<C: ConnectionLike + Send>(conn: &mut C, key: &str) -> RedisResult<bool> {
    let removed: u64 = redis::Cmd::del(key).query_async(conn).await?;
    Ok(removed > 0)
}

/// The acquire script: true when granted, or already held by `token`.
pub async fn acquire<C: ConnectionLike + Send>(
    conn: &mut C,
    key: &str,
    token: &[u8],
    expiry: Duration,
) -> RedisResult<bool> {
    let granted: i64 = scripts::ACQUIRE
        .key(key)
        .arg(token)
        .arg(millis(expiry))
        .invoke_async(conn)
        .await?;
    Ok(granted == 1)
}

/// The release script. True when the key held `token` and was deleted, and,
/// on a re-send (`resent`), also when the key was already gone (the first
/// send, whose answer was lost with its connection, most likely deleted it).
pub async fn release<C: ConnectionLike + Send>(
    conn: &mut C,
    key: &str,
    token: &[u8],
    channel: Option<&str>,
    resent: bool,
) -> RedisResult<bool> {
    // The script publishes only when the channel is not empty.
    let released: i64 = scripts::RELEASE
        .key(key)
        .arg(token)
        .arg(channel.unwrap_or(""))
        .invoke_async(conn)
        .await?;
    Ok(released == 1 || (released == -1 && resent))
}

pub async fn extend<C: ConnectionLike + Send>(
    conn: &mut C,
    key: &str,
    token: &[u8],
    expiry: Duration,
) -> RedisResult<bool> {
    let extended: i64 = scripts::EXTEND
        .key(key)
        .arg(token)
        .arg(millis(expiry))
        .invoke_async(conn)
        .await?;
    Ok(extended == 1)
}

pub async fn get_or_fence<C: ConnectionLike + Send>(
    conn: &mut C,
    key: &str,
    fence_key: &str,
    token: &[u8],
    fence_expiry: Duration,
) -> RedisResult<Option<Stored>> {
    let found: Option<(Vec<u8>, i64)> = scripts::GET_OR_FENCE
        .key(key)
        .key(fence_key)
        .arg(token)
        .arg(millis(fence_expiry))
        .invoke_async(conn)
        .await?;
    Ok(found.map(|(bytes, pttl)| Stored::from_pttl(bytes, pttl)))
}

/// The fenced store; `publish` is `(channel, message)`.
#[allow(clippy::too_many_arguments)]
pub async fn set_fenced<C: ConnectionLike + Send>(
    conn: &mut C,
    key: &str,
    value: &[u8],
    ttl: Duration,
    fence_key: &str,
    token: &[u8],
    publish: (&str, &str),
) -> RedisResult<bool> {
    let stored: i64 = scripts::SET_FENCED
        .key(key)
        .key(fence_key)
        .arg(token)
        .arg(value)
        .arg(millis(ttl))
        .arg(publish.0)
        .arg(publish.1)
        .invoke_async(conn)
        .await?;
    Ok(stored == 1)
}

pub async fn publish<C: ConnectionLike + Send>(
    conn: &mut C,
    channel: &str,
    payload: &str,
) -> RedisResult<()> {
    let _receivers: u64 = redis::cmd("PUBLISH")
        .arg(channel)
        .arg(payload)
        .query_async(conn)
        .await?;
    Ok(())
}

pub async fn ping<C: ConnectionLike + Send>(conn: &mut C) -> RedisResult<()> {
    redis::cmd("PING").query_async(conn).await
}
