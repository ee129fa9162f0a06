//! Every Redis command locked-cache sends, once, for any connection type: the
//! pooled multiplexed connections of [`RedisStore`](super::RedisStore) and the
//! cluster connection of `ClusterStore`. Each function is one round trip; the
//! stores add timeouts, re-sends and error naming around them.

use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{FromRedisValue, RedisResult, ToSingleRedisArg};

use super::claims::{self, Claim, Holding, Holdings};
use super::{Stored, scripts};

/// `PX` milliseconds; at least 1 (`PX 0` is an error in Redis; the builder
/// rejects zero durations, this is a guard).
pub fn millis(d: Duration) -> u64 {
    (d.as_millis() as u64).max(1)
}

pub async fn get<C: ConnectionLike + Send, K: ToSingleRedisArg>(
    conn: &mut C,
    key: K,
) -> RedisResult<Option<Vec<u8>>> {
    get_command(key).query_async(conn).await
}

/// `GET key`, its buffers sized up front for keys of up to 64 bytes:
/// `redis::Cmd::get` grows them as it writes, a reallocation on every hit.
pub fn get_command<K: ToSingleRedisArg>(key: K) -> redis::Cmd {
    let mut cmd = redis::Cmd::with_capacity(2, 3 + 64);
    cmd.arg("GET").arg(key);
    cmd
}

/// One command on a multiplexed connection, its reply as `T`: what
/// `cmd.query_async(conn)` does, without the boxed future redis-rs's
/// `ConnectionLike` makes of every command (an allocation, and a call the
/// compiler cannot see through, on every hit).
pub async fn send<T: FromRedisValue>(
    conn: &mut MultiplexedConnection,
    cmd: &redis::Cmd,
) -> RedisResult<T> {
    let reply = conn.send_packed_command(cmd).await?;
    Ok(redis::from_redis_value(reply.extract_error()?)?)
}

/// [`get_with_ttl`] on a multiplexed connection, without redis-rs's boxed
/// future (see [`send`]).
pub async fn send_get_with_ttl<K: ToSingleRedisArg>(
    conn: &mut MultiplexedConnection,
    key: K,
) -> RedisResult<Option<Stored>> {
    let replies = conn.send_packed_commands(&ttl_pipe(key), 0, 2).await?;
    ttl_replies(replies)
}

/// `GET` and `PTTL` pipelined: one round trip, the value with its remaining
/// time to live as the server counts it.
pub async fn get_with_ttl<C: ConnectionLike + Send, K: ToSingleRedisArg>(
    conn: &mut C,
    key: K,
) -> RedisResult<Option<Stored>> {
    let replies = conn.req_packed_commands(&ttl_pipe(key), 0, 2).await?;
    ttl_replies(replies)
}

fn ttl_pipe<K: ToSingleRedisArg>(key: K) -> redis::Pipeline {
    let mut pttl = redis::Cmd::with_capacity(2, 4 + 64);
    pttl.arg("PTTL").arg(&key);
    let mut pipe = redis::Pipeline::with_capacity(2);
    pipe.add_command(get_command(&key)).add_command(pttl);
    pipe
}

/// The replies of `GET` + `PTTL`, each checked on its own: an error reply
/// is that command's error with its code (`WRONGTYPE` for a key of another
/// type), as a single `GET` would give it. (redis-rs's `Pipeline::query_async`
/// folds error replies into one pipeline error without the code.)
fn ttl_replies(replies: Vec<redis::Value>) -> RedisResult<Option<Stored>> {
    let mut replies = replies.into_iter();
    let (Some(bytes), Some(pttl), None) = (replies.next(), replies.next(), replies.next()) else {
        return Err(redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "GET + PTTL did not answer two replies",
        )));
    };
    let bytes: Option<Vec<u8>> = redis::from_redis_value(bytes.extract_error()?)?;
    let pttl: i64 = redis::from_redis_value(pttl.extract_error()?)?;
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

/// The keys and script of a claim's `renew` / `unclaim`: keyed claims
/// (exclusive names, a writer) or member claims (readers, permits).
enum Shape {
    /// Lock keys, then their meta keys.
    Keyed(Vec<String>),
    /// The members' sorted set and the meta key.
    Member([String; 2]),
}

fn shape(claim: Claim<'_>) -> Shape {
    match claim {
        Claim::Exclusive(names) => {
            let mut keys: Vec<String> = names.to_vec();
            keys.extend(names.iter().map(|n| claims::meta_key(n)));
            Shape::Keyed(keys)
        }
        Claim::Load(name) | Claim::Write { name, .. } => {
            Shape::Keyed(vec![name.to_owned(), claims::meta_key(name)])
        }
        Claim::Read(name) => Shape::Member([claims::readers_key(name), claims::meta_key(name)]),
        Claim::Permit { name, .. } => {
            Shape::Member([claims::permits_key(name), claims::meta_key(name)])
        }
    }
}

/// The claim scripts: the fencing token per name when granted, `None` when refused.
pub async fn claim<C: ConnectionLike + Send>(
    conn: &mut C,
    claim: Claim<'_>,
    token: &[u8],
    expiry: Duration,
    owner: &str,
) -> RedisResult<Option<Vec<u64>>> {
    let keep = millis(claims::meta_keep_for(claim, expiry));
    let mut invocation = match claim {
        Claim::Load(name) => {
            let mut inv = scripts::CLAIM_LOAD.prepare_invoke();
            inv.key(name);
            return inv.arg(token).arg(millis(expiry)).invoke_async(conn).await;
        }
        Claim::Exclusive(names) => {
            let mut inv = scripts::CLAIM_ALL.prepare_invoke();
            for name in names {
                inv.key(name);
            }
            for name in names {
                inv.key(claims::meta_key(name));
            }
            inv
        }
        Claim::Read(name) | Claim::Write { name, .. } => {
            let script = match claim {
                Claim::Read(_) => &*scripts::CLAIM_READ,
                _ => &*scripts::CLAIM_WRITE,
            };
            let mut inv = script.prepare_invoke();
            inv.key(name)
                .key(claims::readers_key(name))
                .key(claims::writer_waiting_key(name))
                .key(claims::meta_key(name));
            inv
        }
        Claim::Permit { name, .. } => {
            let mut inv = scripts::CLAIM_PERMIT.prepare_invoke();
            inv.key(claims::permits_key(name))
                .key(claims::meta_key(name));
            inv
        }
    };
    invocation
        .arg(token)
        .arg(millis(expiry))
        .arg(owner)
        .arg(keep);
    match claim {
        Claim::Write { queue, .. } => {
            invocation.arg(millis(queue));
        }
        Claim::Permit { limit, .. } => {
            invocation.arg(limit);
        }
        _ => {}
    }
    invocation.invoke_async(conn).await
}

/// Renews a claim: true when it was still held by `token` (on every name).
pub async fn renew<C: ConnectionLike + Send>(
    conn: &mut C,
    claim: Claim<'_>,
    token: &[u8],
    expiry: Duration,
) -> RedisResult<bool> {
    let keep = millis(claims::meta_keep_for(claim, expiry));
    let mut invocation = match shape(claim) {
        Shape::Keyed(keys) => {
            let mut inv = scripts::RENEW_ALL.prepare_invoke();
            for key in keys {
                inv.key(key);
            }
            inv
        }
        Shape::Member([members, meta]) => {
            let mut inv = scripts::RENEW_MEMBER.prepare_invoke();
            inv.key(members).key(meta);
            inv
        }
    };
    let renewed: i64 = invocation
        .arg(token)
        .arg(millis(expiry))
        .arg(keep)
        .invoke_async(conn)
        .await?;
    Ok(renewed == 1)
}

/// Releases a claim and publishes its name(s) on `channel`. True when it was
/// ours, and, on a re-send (`resent`), also when it was already gone.
pub async fn unclaim<C: ConnectionLike + Send>(
    conn: &mut C,
    claim: Claim<'_>,
    token: &[u8],
    channel: Option<&str>,
    resent: bool,
) -> RedisResult<bool> {
    let channel = channel.unwrap_or("");
    let released: i64 = match shape(claim) {
        Shape::Keyed(keys) => {
            let mut inv = scripts::UNCLAIM_ALL.prepare_invoke();
            for key in keys {
                inv.key(key);
            }
            inv.arg(token).arg(channel).invoke_async(conn).await?
        }
        Shape::Member([members, meta]) => {
            scripts::UNCLAIM_MEMBER
                .key(members)
                .key(meta)
                .arg(token)
                .arg(channel)
                .arg(claim.names()[0])
                .invoke_async(conn)
                .await?
        }
    };
    Ok(released == 1 || (released == -1 && resent))
}

/// Raises the fencing counter of each name of the claim to at least `fences`.
pub async fn raise_fence<C: ConnectionLike + Send>(
    conn: &mut C,
    claim: Claim<'_>,
    fences: &[u64],
) -> RedisResult<()> {
    if let Claim::Load(_) = claim {
        // Its counter lives no longer than the lock, which nobody else can
        // take meanwhile: raising it would only leave a key behind.
        return Ok(());
    }
    let mut inv = scripts::RAISE_FENCE.prepare_invoke();
    for name in claim.names() {
        inv.key(claims::meta_key(name));
    }
    for fence in fences {
        inv.arg(*fence);
    }
    let _: i64 = inv
        .arg(millis(claims::META_KEEP))
        .invoke_async(conn)
        .await?;
    Ok(())
}

/// Who holds the claim's (first) name, and its last fencing token.
pub async fn holders<C: ConnectionLike + Send>(
    conn: &mut C,
    claim: Claim<'_>,
) -> RedisResult<Holdings> {
    let [lock, members, meta] = claim.holders_keys();
    let raw: Vec<Vec<u8>> = scripts::HOLDERS
        .key(lock)
        .key(members)
        .key(meta)
        .invoke_async(conn)
        .await?;
    Ok(parse_holdings(&raw))
}

/// The `HOLDERS` answer as [`Holdings`]; fields that do not parse read as 0
/// or absent (never a panic on what a server hands back).
fn parse_holdings(raw: &[Vec<u8>]) -> Holdings {
    let number = |b: &[u8]| {
        std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
    };
    let fence = raw
        .first()
        .and_then(|b| number(b))
        .map_or(0, |n| n.max(0) as u64);
    let holders = raw
        .get(1..)
        .unwrap_or_default()
        .chunks_exact(3)
        .map(|h| Holding {
            token: h[0].clone(),
            ttl: Duration::from_millis(number(&h[1]).unwrap_or(0).max(0) as u64),
            owner: (!h[2].is_empty()).then(|| String::from_utf8_lossy(&h[2]).into_owned()),
        })
        .collect();
    Holdings { fence, holders }
}
