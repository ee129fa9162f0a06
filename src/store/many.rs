//! The batched commands of one `get_or_load_many` call, for any connection
//! type (as `commands.rs` has the single-key ones): `MGET` (with `PTTL`s when
//! freshness needs them), the load locks of many keys in one script
//! (`CLAIM_LOADS`: every free lock taken, the others reported, never a wait),
//! their renewal and release, the double check under the locks and the fenced
//! store. Each function sends one chunk of at most [`MAX_KEYS_PER_COMMAND`]
//! keys in one round trip; [`chunked`] splits a longer list (the stores call
//! it), so no command or script is ever unbounded.
//!
//! Every reply is checked against what was asked: a reply of the wrong length
//! or shape is an error, never a panic or an index out of bounds.

use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{RedisError, RedisResult, Value};

use super::commands::millis;
use super::{FencedWrite, LoadClaim, Stored, Write, scripts};
use crate::defaults::MAX_KEYS_PER_COMMAND;

/// The most value bytes one fenced-store script carries (a longer batch is
/// split): 4 MiB, so that one script does not hold the server for long.
pub const MAX_BYTES_PER_SCRIPT: usize = 4 * 1024 * 1024;

fn bad_reply(what: &'static str) -> RedisError {
    RedisError::from((redis::ErrorKind::UnexpectedReturnType, what))
}

/// Splits `items` into chunks of at most [`MAX_KEYS_PER_COMMAND`] and, when
/// `bytes` says how large each item is, of at most [`MAX_BYTES_PER_SCRIPT`]
/// (an item larger than that goes alone).
pub fn chunks<T>(items: &[T], bytes: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut size = 0;
    for (i, item) in items.iter().enumerate() {
        let len = bytes(item);
        if i > start && (i - start >= MAX_KEYS_PER_COMMAND || size + len > MAX_BYTES_PER_SCRIPT) {
            out.push(&items[start..i]);
            start = i;
            size = 0;
        }
        size += len;
    }
    if start < items.len() {
        out.push(&items[start..]);
    }
    out
}

/// Runs `f` on each chunk of `items` in turn and concatenates the answers.
pub async fn chunked<'a, T, R, F, Fut>(
    items: &'a [T],
    bytes: impl Fn(&T) -> usize,
    mut f: F,
) -> crate::Result<Vec<R>>
where
    F: FnMut(&'a [T]) -> Fut,
    Fut: Future<Output = crate::Result<Vec<R>>>,
{
    let mut out = Vec::with_capacity(items.len());
    for chunk in chunks(items, bytes) {
        out.extend(f(chunk).await?);
    }
    Ok(out)
}

/// Items grouped by the Redis Cluster slot of their key (`key`), in the order
/// first seen: per slot, the items' positions in `items` and the items. A
/// cluster runs a batched command or script once per group (every key of a
/// script must be on one slot), the groups at once.
#[cfg(any(feature = "cluster", test))]
pub fn by_slot<T: Copy>(items: &[T], key: impl Fn(&T) -> &str) -> Vec<(Vec<usize>, Vec<T>)> {
    let mut groups: Vec<(Vec<usize>, Vec<T>)> = Vec::new();
    let mut index: std::collections::HashMap<u16, usize> = std::collections::HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let slot = super::slot::slot(key(item).as_bytes());
        let at = *index.entry(slot).or_insert_with(|| {
            groups.push((Vec::new(), Vec::new()));
            groups.len() - 1
        });
        groups[at].0.push(i);
        groups[at].1.push(*item);
    }
    groups
}

/// The answers of each group of [`by_slot`] put back in the items' order
/// (`len` of them). An answer missing (a group that answered short, which the
/// commands above refuse) is the default: never an index out of bounds.
#[cfg(any(feature = "cluster", test))]
pub fn scatter<T, R: Default>(
    len: usize,
    groups: &[(Vec<usize>, Vec<T>)],
    answers: Vec<Vec<R>>,
) -> Vec<R> {
    let mut out: Vec<R> = (0..len).map(|_| R::default()).collect();
    for ((positions, _), answers) in groups.iter().zip(answers) {
        for (&at, answer) in positions.iter().zip(answers) {
            if let Some(slot) = out.get_mut(at) {
                *slot = answer;
            }
        }
    }
    out
}

/// `MGET` (and, with `with_ttl`, a `PTTL` per key, pipelined in the same
/// round trip). A key of another type reads as missing (`MGET` answers nil).
pub async fn get_many<C: ConnectionLike + Send, K: redis::ToSingleRedisArg>(
    conn: &mut C,
    keys: &[K],
    with_ttl: bool,
) -> RedisResult<Vec<Option<Stored>>> {
    if !with_ttl {
        let values: Vec<Option<Vec<u8>>> = mget(keys).query_async(conn).await?;
        if values.len() != keys.len() {
            return Err(bad_reply("MGET answered another number of values"));
        }
        return Ok(values
            .into_iter()
            .map(|v| v.map(|bytes| Stored { bytes, ttl: None }))
            .collect());
    }
    let mut pipe = redis::Pipeline::with_capacity(keys.len() + 1);
    let count = add_get_many(&mut pipe, keys, with_ttl);
    let replies = conn.req_packed_commands(&pipe, 0, count).await?;
    parse_get_many(replies, keys.len(), with_ttl)
}

fn mget<K: redis::ToSingleRedisArg>(keys: &[K]) -> redis::Cmd {
    let mut mget = redis::Cmd::with_capacity(keys.len() + 1, 8 + keys.len() * 32);
    mget.arg("MGET");
    for key in keys {
        mget.arg(key);
    }
    mget
}

/// Adds [`get_many`]'s commands for `keys` to `pipe` (an `MGET`, and with
/// `with_ttl` a `PTTL` per key): a cluster node's pipeline carries several
/// slots' worth. Answers how many replies they make.
pub fn add_get_many<K: redis::ToSingleRedisArg>(
    pipe: &mut redis::Pipeline,
    keys: &[K],
    with_ttl: bool,
) -> usize {
    pipe.add_command(mget(keys));
    if !with_ttl {
        return 1;
    }
    for key in keys {
        pipe.cmd("PTTL").arg(key);
    }
    keys.len() + 1
}

/// Reads the replies of [`add_get_many`]'s commands for `len` keys: an error
/// reply (a redirection, say) or a reply of the wrong shape is an error.
pub fn parse_get_many(
    replies: Vec<Value>,
    len: usize,
    with_ttl: bool,
) -> RedisResult<Vec<Option<Stored>>> {
    let mut replies = replies.into_iter();
    let values: Vec<Option<Vec<u8>>> = match replies.next() {
        Some(reply) => redis::from_redis_value(reply.extract_error()?)?,
        None => return Err(bad_reply("MGET answered nothing")),
    };
    let ttls = if with_ttl { len } else { 0 };
    if values.len() != len || replies.len() != ttls {
        return Err(bad_reply("MGET + PTTL answered another number of values"));
    }
    if !with_ttl {
        return Ok(values
            .into_iter()
            .map(|v| v.map(|bytes| Stored { bytes, ttl: None }))
            .collect());
    }
    values
        .into_iter()
        .zip(replies)
        .map(|(value, pttl)| {
            let pttl: i64 = redis::from_redis_value(pttl.extract_error()?)?;
            Ok(value.map(|bytes| Stored::from_pttl(bytes, pttl)))
        })
        .collect()
}

/// `SET key value PX ttl` for each write, pipelined.
pub async fn set_many<C: ConnectionLike + Send>(
    conn: &mut C,
    writes: &[Write<'_>],
) -> RedisResult<Vec<()>> {
    let mut pipe = redis::Pipeline::with_capacity(writes.len());
    add_set_many(&mut pipe, writes);
    pipe.query_async::<()>(conn).await?;
    Ok(vec![(); writes.len()])
}

/// Adds [`set_many`]'s `SET`s to `pipe`; answers how many replies they make.
pub fn add_set_many(pipe: &mut redis::Pipeline, writes: &[Write<'_>]) -> usize {
    for w in writes {
        pipe.cmd("SET")
            .arg(w.key)
            .arg(w.value)
            .arg("PX")
            .arg(millis(w.ttl));
    }
    writes.len()
}

#[cfg(feature = "cluster")]
/// Reads the replies of [`add_set_many`]'s commands.
pub fn parse_set_many(replies: Vec<Value>, writes: &[Write<'_>]) -> RedisResult<Vec<()>> {
    if replies.len() != writes.len() {
        return Err(bad_reply("SET answered another number of replies"));
    }
    for reply in replies {
        reply.extract_error()?;
    }
    Ok(vec![(); writes.len()])
}

/// `DEL` of the keys (one command).
pub async fn delete_many<C: ConnectionLike + Send>(
    conn: &mut C,
    keys: &[&str],
) -> RedisResult<Vec<()>> {
    let _: i64 = delete_cmd(keys).query_async(conn).await?;
    Ok(vec![(); keys.len()])
}

fn delete_cmd(keys: &[&str]) -> redis::Cmd {
    let mut del = redis::cmd("DEL");
    for key in keys {
        del.arg(*key);
    }
    del
}

#[cfg(feature = "cluster")]
/// Adds [`delete_many`]'s `DEL` to `pipe`.
pub fn add_delete_many(pipe: &mut redis::Pipeline, keys: &[&str]) -> usize {
    pipe.add_command(delete_cmd(keys));
    1
}

#[cfg(feature = "cluster")]
/// Reads the reply of [`add_delete_many`]'s `DEL`.
pub fn parse_delete_many(replies: Vec<Value>, keys: &[&str]) -> RedisResult<Vec<()>> {
    let _: i64 = redis::from_redis_value(one(replies, "DEL")?)?;
    Ok(vec![(); keys.len()])
}

#[cfg(feature = "cluster")]
/// The one reply of a one-command part of a pipeline (an error reply as an
/// error).
fn one(replies: Vec<Value>, what: &'static str) -> RedisResult<Value> {
    let mut replies = replies.into_iter();
    match (replies.next(), replies.next()) {
        (Some(reply), None) => reply.extract_error(),
        _ => Err(bad_reply(what)),
    }
}

#[cfg(feature = "cluster")]
/// `EVALSHA` of `script` with `keys` keys, for a pipeline: a `NOSCRIPT`
/// reply is the caller's to handle (a cluster sends the part again on its
/// own, through [`redis::Script`], which loads it).
fn evalsha(script: &redis::Script, keys: usize) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(keys);
    cmd
}

/// A script's answer of one integer per key, as flags (non-zero: true).
fn flags(value: Value, expected: usize, what: &'static str) -> RedisResult<Vec<bool>> {
    let answers: Vec<i64> = redis::from_redis_value(value)?;
    if answers.len() != expected {
        return Err(bad_reply(what));
    }
    Ok(answers.into_iter().map(|a| a != 0).collect())
}

/// `CLAIM_LOADS`: per name, whether its lock is now `token`'s.
pub async fn claim_loads<C: ConnectionLike + Send>(
    conn: &mut C,
    names: &[&str],
    token: &[u8],
    expiry: Duration,
) -> RedisResult<Vec<bool>> {
    let mut inv = scripts::CLAIM_LOADS.prepare_invoke();
    for name in names {
        inv.key(*name);
    }
    let answer: Value = inv
        .arg(token)
        .arg(millis(expiry))
        .invoke_async(conn)
        .await?;
    flags(
        answer,
        names.len(),
        "CLAIM_LOADS answered another number of flags",
    )
}

/// `CLAIM_LOADS_FENCED`: per entry, `None` when another token holds its
/// lock, else its value under the fence just taken.
pub async fn claim_loads_fenced<C: ConnectionLike + Send>(
    conn: &mut C,
    entries: &[LoadClaim<'_>],
    token: &[u8],
    expiry: Duration,
    fence_expiry: Duration,
) -> RedisResult<Vec<Option<Option<Stored>>>> {
    let mut inv = scripts::CLAIM_LOADS_FENCED.prepare_invoke();
    for e in entries {
        inv.key(e.lock).key(e.value).key(e.fence);
    }
    let answer: Value = inv
        .arg(token)
        .arg(millis(expiry))
        .arg(millis(fence_expiry))
        .invoke_async(conn)
        .await?;
    claim_loads_fenced_answer(answer, entries.len())
}

#[cfg(feature = "cluster")]
/// Adds [`claim_loads_fenced`]'s script to `pipe` (as `EVALSHA`).
pub fn add_claim_loads_fenced(
    pipe: &mut redis::Pipeline,
    entries: &[LoadClaim<'_>],
    token: &[u8],
    expiry: Duration,
    fence_expiry: Duration,
) -> usize {
    let mut cmd = evalsha(&scripts::CLAIM_LOADS_FENCED, entries.len() * 3);
    for e in entries {
        cmd.arg(e.lock).arg(e.value).arg(e.fence);
    }
    cmd.arg(token).arg(millis(expiry)).arg(millis(fence_expiry));
    pipe.add_command(cmd);
    1
}

#[cfg(feature = "cluster")]
/// Reads the reply of [`add_claim_loads_fenced`]'s script.
pub fn parse_claim_loads_fenced(
    replies: Vec<Value>,
    entries: &[LoadClaim<'_>],
) -> RedisResult<Vec<Option<Option<Stored>>>> {
    claim_loads_fenced_answer(one(replies, "CLAIM_LOADS_FENCED")?, entries.len())
}

fn claim_loads_fenced_answer(
    answer: Value,
    len: usize,
) -> RedisResult<Vec<Option<Option<Stored>>>> {
    let answer: Vec<Value> = redis::from_redis_value(answer)?;
    if answer.len() != len * 3 {
        return Err(bad_reply(
            "CLAIM_LOADS_FENCED answered another number of values",
        ));
    }
    let mut answer = answer.into_iter();
    let mut out = Vec::with_capacity(len);
    while let (Some(granted), Some(value), Some(pttl)) =
        (answer.next(), answer.next(), answer.next())
    {
        let granted: i64 = redis::from_redis_value(granted)?;
        let value: Option<Vec<u8>> = redis::from_redis_value(value)?;
        let pttl: i64 = redis::from_redis_value(pttl)?;
        out.push((granted != 0).then(|| value.map(|bytes| Stored::from_pttl(bytes, pttl))));
    }
    Ok(out)
}

/// `RENEW_LOADS`: per key, whether it still held `token` (and was extended).
pub async fn renew_loads<C: ConnectionLike + Send>(
    conn: &mut C,
    keys: &[&str],
    token: &[u8],
    expiry: Duration,
) -> RedisResult<Vec<bool>> {
    let mut inv = scripts::RENEW_LOADS.prepare_invoke();
    for key in keys {
        inv.key(*key);
    }
    let answer: Value = inv
        .arg(token)
        .arg(millis(expiry))
        .invoke_async(conn)
        .await?;
    flags(
        answer,
        keys.len(),
        "RENEW_LOADS answered another number of flags",
    )
}

#[cfg(feature = "cluster")]
/// Adds [`renew_loads`]'s script to `pipe` (as `EVALSHA`).
pub fn add_renew_loads(
    pipe: &mut redis::Pipeline,
    keys: &[&str],
    token: &[u8],
    expiry: Duration,
) -> usize {
    let mut cmd = evalsha(&scripts::RENEW_LOADS, keys.len());
    for key in keys {
        cmd.arg(*key);
    }
    cmd.arg(token).arg(millis(expiry));
    pipe.add_command(cmd);
    1
}

#[cfg(feature = "cluster")]
/// Reads the reply of [`add_renew_loads`]'s script.
pub fn parse_renew_loads(replies: Vec<Value>, keys: &[&str]) -> RedisResult<Vec<bool>> {
    flags(
        one(replies, "RENEW_LOADS")?,
        keys.len(),
        "RENEW_LOADS answered another number of flags",
    )
}

/// `UNCLAIM_LOADS`: releases the names `token` holds, publishing each on
/// `channel`.
pub async fn unclaim_loads<C: ConnectionLike + Send>(
    conn: &mut C,
    names: &[&str],
    token: &[u8],
    channel: Option<&str>,
) -> RedisResult<Vec<()>> {
    let mut inv = scripts::UNCLAIM_LOADS.prepare_invoke();
    for name in names {
        inv.key(*name);
    }
    let _: i64 = inv
        .arg(token)
        .arg(channel.unwrap_or(""))
        .invoke_async(conn)
        .await?;
    Ok(vec![(); names.len()])
}

#[cfg(feature = "cluster")]
/// Adds [`unclaim_loads`]'s script to `pipe` (as `EVALSHA`).
pub fn add_unclaim_loads(
    pipe: &mut redis::Pipeline,
    names: &[&str],
    token: &[u8],
    channel: Option<&str>,
) -> usize {
    let mut cmd = evalsha(&scripts::UNCLAIM_LOADS, names.len());
    for name in names {
        cmd.arg(*name);
    }
    cmd.arg(token).arg(channel.unwrap_or(""));
    pipe.add_command(cmd);
    1
}

#[cfg(feature = "cluster")]
/// Reads the reply of [`add_unclaim_loads`]'s script.
pub fn parse_unclaim_loads(replies: Vec<Value>, names: &[&str]) -> RedisResult<Vec<()>> {
    let _: i64 = redis::from_redis_value(one(replies, "UNCLAIM_LOADS")?)?;
    Ok(vec![(); names.len()])
}

/// `GET_OR_FENCE_MANY`: takes each entry's fence for `token`, and answers its
/// value with its time left.
pub async fn get_or_fence_many<C: ConnectionLike + Send>(
    conn: &mut C,
    entries: &[(&str, &str)],
    token: &[u8],
    fence_expiry: Duration,
) -> RedisResult<Vec<Option<Stored>>> {
    let mut inv = scripts::GET_OR_FENCE_MANY.prepare_invoke();
    for (value, fence) in entries {
        inv.key(*value).key(*fence);
    }
    let answer: Value = inv
        .arg(token)
        .arg(millis(fence_expiry))
        .invoke_async(conn)
        .await?;
    get_or_fence_many_answer(answer, entries.len())
}

#[cfg(feature = "cluster")]
/// Adds [`get_or_fence_many`]'s script to `pipe` (as `EVALSHA`).
pub fn add_get_or_fence_many(
    pipe: &mut redis::Pipeline,
    entries: &[(&str, &str)],
    token: &[u8],
    fence_expiry: Duration,
) -> usize {
    let mut cmd = evalsha(&scripts::GET_OR_FENCE_MANY, entries.len() * 2);
    for (value, fence) in entries {
        cmd.arg(*value).arg(*fence);
    }
    cmd.arg(token).arg(millis(fence_expiry));
    pipe.add_command(cmd);
    1
}

#[cfg(feature = "cluster")]
/// Reads the reply of [`add_get_or_fence_many`]'s script.
pub fn parse_get_or_fence_many(
    replies: Vec<Value>,
    entries: &[(&str, &str)],
) -> RedisResult<Vec<Option<Stored>>> {
    get_or_fence_many_answer(one(replies, "GET_OR_FENCE_MANY")?, entries.len())
}

fn get_or_fence_many_answer(answer: Value, len: usize) -> RedisResult<Vec<Option<Stored>>> {
    let answer: Vec<Value> = redis::from_redis_value(answer)?;
    if answer.len() != len * 2 {
        return Err(bad_reply(
            "GET_OR_FENCE_MANY answered another number of values",
        ));
    }
    let mut answer = answer.into_iter();
    let mut out = Vec::with_capacity(len);
    while let (Some(value), Some(pttl)) = (answer.next(), answer.next()) {
        let value: Option<Vec<u8>> = redis::from_redis_value(value)?;
        let pttl: i64 = redis::from_redis_value(pttl)?;
        out.push(value.map(|bytes| Stored::from_pttl(bytes, pttl)));
    }
    Ok(out)
}

/// `SET_FENCED_MANY`: per write, whether it was stored (its fence was still
/// `token`'s).
pub async fn set_fenced_many<C: ConnectionLike + Send>(
    conn: &mut C,
    writes: &[FencedWrite<'_>],
    token: &[u8],
    channel: Option<&str>,
) -> RedisResult<Vec<bool>> {
    let mut inv = scripts::SET_FENCED_MANY.prepare_invoke();
    for w in writes {
        inv.key(w.key).key(w.fence);
    }
    inv.arg(token).arg(channel.unwrap_or(""));
    for w in writes {
        inv.arg(w.value).arg(millis(w.ttl)).arg(w.message);
    }
    let answer: Value = inv.invoke_async(conn).await?;
    flags(
        answer,
        writes.len(),
        "SET_FENCED_MANY answered another number of flags",
    )
}

#[cfg(feature = "cluster")]
/// Adds [`set_fenced_many`]'s script to `pipe` (as `EVALSHA`).
pub fn add_set_fenced_many(
    pipe: &mut redis::Pipeline,
    writes: &[FencedWrite<'_>],
    token: &[u8],
    channel: Option<&str>,
) -> usize {
    let mut cmd = evalsha(&scripts::SET_FENCED_MANY, writes.len() * 2);
    for w in writes {
        cmd.arg(w.key).arg(w.fence);
    }
    cmd.arg(token).arg(channel.unwrap_or(""));
    for w in writes {
        cmd.arg(w.value).arg(millis(w.ttl)).arg(w.message);
    }
    pipe.add_command(cmd);
    1
}

#[cfg(feature = "cluster")]
/// Reads the reply of [`add_set_fenced_many`]'s script.
pub fn parse_set_fenced_many(
    replies: Vec<Value>,
    writes: &[FencedWrite<'_>],
) -> RedisResult<Vec<bool>> {
    flags(
        one(replies, "SET_FENCED_MANY")?,
        writes.len(),
        "SET_FENCED_MANY answered another number of flags",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_bound_keys_and_bytes() {
        let items: Vec<usize> = vec![1; MAX_KEYS_PER_COMMAND * 2 + 1];
        let split = chunks(&items, |_| 0);
        assert_eq!(
            split.iter().map(|c| c.len()).collect::<Vec<_>>(),
            [MAX_KEYS_PER_COMMAND, MAX_KEYS_PER_COMMAND, 1]
        );
        let big = vec![MAX_BYTES_PER_SCRIPT / 2 + 1; 3];
        assert_eq!(chunks(&big, |n| *n).len(), 3);
        let huge = vec![MAX_BYTES_PER_SCRIPT * 2, 1];
        assert_eq!(chunks(&huge, |n| *n).len(), 2);
        assert!(chunks::<u8>(&[], |_| 0).is_empty());
    }

    #[test]
    fn groups_by_slot_scatter_back_in_order() {
        let keys = ["lc:{a}", "lc:{b}", "lock.lc:{a}", "lc:{c}", "fence.lc:{b}"];
        let groups = by_slot(&keys, |k| k);
        assert_eq!(groups.len(), 3);
        assert_eq!(groups[0].0, [0, 2]);
        assert_eq!(groups[1].0, [1, 4]);
        let answers: Vec<Vec<usize>> = groups.iter().map(|(at, _)| at.clone()).collect();
        assert_eq!(scatter(keys.len(), &groups, answers), [0, 1, 2, 3, 4]);
        // A short answer leaves the default, never a panic.
        assert_eq!(scatter(3, &groups[..1], vec![vec![7]]), [7, 0, 0]);
    }
}
