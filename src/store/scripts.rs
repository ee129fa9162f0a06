//! The Lua scripts locked-cache runs on Redis. Each is built once (its SHA1
//! computed once) and sent by EVALSHA. Every new pooled connection loads them
//! all (one pipelined round trip), so the first call on a fresh server is not
//! three round trips (EVALSHA, `NOSCRIPT`, SCRIPT LOAD, EVALSHA) inside one
//! command timeout; after a `SCRIPT FLUSH` the `NOSCRIPT` fallback still applies.
//!
//! Every script that changes state answers the same when sent twice with the same
//! arguments, so a command whose connection died under it (it may or may not
//! have run) can be re-sent on a fresh connection: the acquire answers 1 when the
//! key already holds this token, the fenced store leaves a `<token>:stored` mark
//! in the fence, and the release tells "already gone" (-1) from "someone else's"
//! (0).

use std::sync::LazyLock;

use redis::Script;

/// KEYS[1] lock, ARGV[1] token, ARGV[2] expiry ms: `SET NX PX`, and 1 as well
/// when the key already holds this token (a re-sent acquire, or a re-grant).
pub static ACQUIRE: LazyLock<Script> = LazyLock::new(|| Script::new(ACQUIRE_LUA));
const ACQUIRE_LUA: &str = r"if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return 1
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return 1
end
return 0";

/// KEYS[1] lock, ARGV[1] token, ARGV[2] channel (or empty): compare-and-delete,
/// then wake waiters. 1: deleted; 0: another token holds it; -1: no such key.
pub static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE_LUA));
const RELEASE_LUA: &str = r"local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then
    redis.call('DEL', KEYS[1])
    if ARGV[2] ~= '' then
        redis.call('PUBLISH', ARGV[2], KEYS[1])
    end
    return 1
end
if held then
    return 0
end
return -1";

/// KEYS[1] lock, ARGV[1] token, ARGV[2] expiry ms: compare-and-pexpire.
pub static EXTEND: LazyLock<Script> = LazyLock::new(|| Script::new(EXTEND_LUA));
const EXTEND_LUA: &str = r"if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0";

/// KEYS[1] value, KEYS[2] fence, ARGV[1] token, ARGV[2] fence expiry ms:
/// takes the fence for this token and returns the value with its remaining
/// time to live (`PTTL`) if it is a string (a key of another type reads as
/// missing, and is overwritten by the fenced store).
pub static GET_OR_FENCE: LazyLock<Script> = LazyLock::new(|| Script::new(GET_OR_FENCE_LUA));
const GET_OR_FENCE_LUA: &str = r"redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
if redis.call('TYPE', KEYS[1]).ok == 'string' then
    return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}
end
return false";

/// KEYS[1] value, KEYS[2] fence, ARGV[1] token, ARGV[2] value, ARGV[3] ttl ms,
/// ARGV[4] channel (or empty), ARGV[5] message: store the value only while the
/// fence is still ours, mark the fence `<token>:stored` (keeping its expiry), then
/// publish. A re-send finds the mark and answers 1 without writing again; a
/// `set`/`invalidate` or a newer holder in between removes or replaces the mark,
/// and the re-send answers 0.
pub static SET_FENCED: LazyLock<Script> = LazyLock::new(|| Script::new(SET_FENCED_LUA));
const SET_FENCED_LUA: &str = r"local fence = redis.call('GET', KEYS[2])
if fence == ARGV[1] then
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
    local left = redis.call('PTTL', KEYS[2])
    if left > 0 then
        redis.call('SET', KEYS[2], ARGV[1] .. ':stored', 'PX', left)
    else
        redis.call('DEL', KEYS[2])
    end
    if ARGV[4] ~= '' then
        redis.call('PUBLISH', ARGV[4], ARGV[5])
    end
    return 1
end
if fence == ARGV[1] .. ':stored' then
    return 1
end
return 0";

/// The source of every script, for loading them on a new connection.
pub const ALL: [&str; 5] = [
    RELEASE_LUA,
    EXTEND_LUA,
    GET_OR_FENCE_LUA,
    SET_FENCED_LUA,
    ACQUIRE_LUA,
];
