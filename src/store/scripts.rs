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
    redis.call('SET', KEYS[2], ARGV[1] .. ':stored', 'KEEPTTL')
    if ARGV[4] ~= '' then
        redis.call('PUBLISH', ARGV[4], ARGV[5])
    end
    return 1
end
if fence == ARGV[1] .. ':stored' then
    return 1
end
return 0";

// The lock primitives (`claims.rs` has the key layout). Each claim script
// answers false when refused, or an array with the fencing token of each name
// when granted; a re-send that finds the claim already held by the token
// answers the same array again (the counter is not advanced twice). Shared Lua
// helpers: the server's clock, sweeping expired members of a sorted set of
// holders (and their owner entries), and the fencing counter.
macro_rules! helpers {
    () => {
        r"local function now_ms()
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function sweep(members, meta, now)
    local gone = redis.call('ZRANGEBYSCORE', members, '-inf', now)
    for _, token in ipairs(gone) do
        redis.call('HDEL', meta, 'o:' .. token)
    end
    if #gone > 0 then
        redis.call('ZREMRANGEBYSCORE', members, '-inf', now)
    end
end
local function last_fence(meta)
    return redis.call('HINCRBY', meta, 'fence', 0)
end
local function next_fence(meta, field, owner, keep_ms)
    local fence = redis.call('HINCRBY', meta, 'fence', 1)
    if fence == 1 then
        local t = redis.call('TIME')
        fence = tonumber(t[1]) * 1000000 + tonumber(t[2])
        redis.call('HSET', meta, 'fence', string.format('%.0f', fence), field, owner)
    else
        redis.call('HSET', meta, field, owner)
    end
    redis.call('PEXPIRE', meta, keep_ms)
    return fence
end
local function keep_at_least(key, ms)
    if redis.call('PTTL', key) < tonumber(ms) then
        redis.call('PEXPIRE', key, ms)
    end
end
"
    };
}

/// Exclusive claim on several names at once, all or none. KEYS: the n lock
/// keys, then their n meta keys; ARGV[1] token, ARGV[2] expiry ms, ARGV[3]
/// owner, ARGV[4] how long the meta key is kept (ms).
pub static CLAIM_ALL: LazyLock<Script> = LazyLock::new(|| Script::new(CLAIM_ALL_LUA));
const CLAIM_ALL_LUA: &str = concat!(
    helpers!(),
    r"local n = #KEYS / 2
local owner = ARGV[1] .. ' ' .. ARGV[3]
if n == 1 then
    if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
        return {next_fence(KEYS[2], 'x', owner, ARGV[4])}
    end
    if redis.call('GET', KEYS[1]) == ARGV[1] then
        return {last_fence(KEYS[2])}
    end
    return false
end
local ours = {}
for i = 1, n do
    local held = redis.call('GET', KEYS[i])
    if held and held ~= ARGV[1] then
        return false
    end
    ours[i] = held == ARGV[1]
end
local fences = {}
for i = 1, n do
    if ours[i] then
        fences[i] = last_fence(KEYS[n + i])
    else
        redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2])
        fences[i] = next_fence(KEYS[n + i], 'x', owner, ARGV[4])
    end
end
return fences"
);

/// A load's claim (`Claim::Load`): the lock key alone, no meta key. KEYS[1]
/// the lock key; ARGV[1] token, ARGV[2] expiry ms. Granted (or already held
/// by the token): the fencing token, the server's clock in microseconds;
/// refused: false.
pub static CLAIM_LOAD: LazyLock<Script> = LazyLock::new(|| Script::new(CLAIM_LOAD_LUA));
const CLAIM_LOAD_LUA: &str = r"if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
    or redis.call('GET', KEYS[1]) == ARGV[1] then
    local t = redis.call('TIME')
    return {tonumber(t[1]) * 1000000 + tonumber(t[2])}
end
return false";

/// A reader's claim. KEYS[1] writer, KEYS[2] readers (sorted set, score: expiry
/// in server ms), KEYS[3] waiting writer, KEYS[4] meta; ARGV as `CLAIM_ALL`.
/// Refused while a writer holds the lock or waits for it.
pub static CLAIM_READ: LazyLock<Script> = LazyLock::new(|| Script::new(CLAIM_READ_LUA));
const CLAIM_READ_LUA: &str = concat!(
    helpers!(),
    r"local now = now_ms()
sweep(KEYS[2], KEYS[4], now)
if redis.call('EXISTS', KEYS[1]) == 1 then
    return false
end
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then
    return {last_fence(KEYS[4])}
end
if redis.call('EXISTS', KEYS[3]) == 1 then
    return false
end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
keep_at_least(KEYS[2], ARGV[2])
return {next_fence(KEYS[4], 'o:' .. ARGV[1], ARGV[3], ARGV[4])}"
);

/// A writer's claim. KEYS as `CLAIM_READ`; ARGV as `CLAIM_ALL`, plus ARGV[5]:
/// how long a refused writer's place at the head of the queue is kept (ms).
/// While readers hold the lock, the first writer refused marks itself waiting,
/// which turns new readers away until it got its turn (or its mark expired).
pub static CLAIM_WRITE: LazyLock<Script> = LazyLock::new(|| Script::new(CLAIM_WRITE_LUA));
const CLAIM_WRITE_LUA: &str = concat!(
    helpers!(),
    r"local now = now_ms()
sweep(KEYS[2], KEYS[4], now)
local writer = redis.call('GET', KEYS[1])
if writer == ARGV[1] then
    return {last_fence(KEYS[4])}
end
if writer then
    return false
end
local waiting = redis.call('GET', KEYS[3])
if waiting and waiting ~= ARGV[1] then
    return false
end
if redis.call('ZCARD', KEYS[2]) > 0 then
    redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[5])
    return false
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if waiting then
    redis.call('DEL', KEYS[3])
end
return {next_fence(KEYS[4], 'x', ARGV[1] .. ' ' .. ARGV[3], ARGV[4])}"
);

/// A semaphore permit. KEYS[1] permits (sorted set, score: expiry in server
/// ms), KEYS[2] meta; ARGV as `CLAIM_ALL`, plus ARGV[5]: the number of permits.
pub static CLAIM_PERMIT: LazyLock<Script> = LazyLock::new(|| Script::new(CLAIM_PERMIT_LUA));
const CLAIM_PERMIT_LUA: &str = concat!(
    helpers!(),
    r"local now = now_ms()
sweep(KEYS[1], KEYS[2], now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
    return {last_fence(KEYS[2])}
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[5]) then
    return false
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
keep_at_least(KEYS[1], ARGV[2])
return {next_fence(KEYS[2], 'o:' .. ARGV[1], ARGV[3], ARGV[4])}"
);

/// Renews keyed claims (exclusive names, a writer). KEYS: n lock keys, then n
/// meta keys; ARGV[1] token, ARGV[2] expiry ms, ARGV[3] meta keep ms. 1 when
/// every name still held the token (all renewed), else 0 (none touched).
pub static RENEW_ALL: LazyLock<Script> = LazyLock::new(|| Script::new(RENEW_ALL_LUA));
const RENEW_ALL_LUA: &str = concat!(
    helpers!(),
    r"local n = #KEYS / 2
for i = 1, n do
    if redis.call('GET', KEYS[i]) ~= ARGV[1] then
        return 0
    end
end
for i = 1, n do
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
    redis.call('PEXPIRE', KEYS[n + i], ARGV[3])
end
return 1"
);

/// Renews a member claim (a reader, a permit). KEYS[1] members, KEYS[2] meta;
/// ARGV as `RENEW_ALL`. 0 when the member is gone or expired.
pub static RENEW_MEMBER: LazyLock<Script> = LazyLock::new(|| Script::new(RENEW_MEMBER_LUA));
const RENEW_MEMBER_LUA: &str = concat!(
    helpers!(),
    r"local now = now_ms()
local until_ms = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not until_ms or tonumber(until_ms) <= now then
    return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
keep_at_least(KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1"
);

/// Releases keyed claims. KEYS: n lock keys, then n meta keys; ARGV[1] token,
/// ARGV[2] channel (or empty). Each name held by the token is deleted and
/// published (its owner entry stays, naming a token that no longer holds; a
/// load's claim has no meta key).
/// 1: at least one was ours; 0: none was, and
/// another token holds one; -1: none was there.
pub static UNCLAIM_ALL: LazyLock<Script> = LazyLock::new(|| Script::new(UNCLAIM_ALL_LUA));
const UNCLAIM_ALL_LUA: &str = r"local n = #KEYS / 2
local ours, others = 0, 0
for i = 1, n do
    local held = redis.call('GET', KEYS[i])
    if held == ARGV[1] then
        redis.call('DEL', KEYS[i])
        if ARGV[2] ~= '' then
            redis.call('PUBLISH', ARGV[2], KEYS[i])
        end
        ours = ours + 1
    elseif held then
        others = others + 1
    end
end
if ours > 0 then
    return 1
end
if others > 0 then
    return 0
end
return -1";

/// Releases a member claim. KEYS[1] members, KEYS[2] meta; ARGV[1] token,
/// ARGV[2] channel (or empty), ARGV[3] the name to publish. 1: removed; -1: not
/// there.
pub static UNCLAIM_MEMBER: LazyLock<Script> = LazyLock::new(|| Script::new(UNCLAIM_MEMBER_LUA));
const UNCLAIM_MEMBER_LUA: &str = r"if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
    redis.call('HDEL', KEYS[2], 'o:' .. ARGV[1])
    if ARGV[2] ~= '' then
        redis.call('PUBLISH', ARGV[2], ARGV[3])
    end
    return 1
end
return -1";

/// Raises the fencing counters to at least the given tokens (so that a
/// majority of masters knows the highest token handed out). KEYS: meta keys;
/// ARGV[i] the token for KEYS[i], ARGV[#KEYS + 1] meta keep ms.
pub static RAISE_FENCE: LazyLock<Script> = LazyLock::new(|| Script::new(RAISE_FENCE_LUA));
const RAISE_FENCE_LUA: &str = r"for i = 1, #KEYS do
    if redis.call('HINCRBY', KEYS[i], 'fence', 0) < tonumber(ARGV[i]) then
        redis.call('HSET', KEYS[i], 'fence', ARGV[i])
    end
    redis.call('PEXPIRE', KEYS[i], ARGV[#KEYS + 1])
end
return 1";

/// Who holds a lock. KEYS[1] lock key (a string, when held), KEYS[2] members
/// (readers or permits), KEYS[3] meta. Answers the last fencing token, then
/// (token, ms left, owner) per holder, all as strings.
pub static HOLDERS: LazyLock<Script> = LazyLock::new(|| Script::new(HOLDERS_LUA));
const HOLDERS_LUA: &str = concat!(
    helpers!(),
    r"local out = {redis.call('HGET', KEYS[3], 'fence') or '0'}
if redis.call('TYPE', KEYS[1]).ok == 'string' then
    local token = redis.call('GET', KEYS[1])
    local owner = redis.call('HGET', KEYS[3], 'x') or ''
    if string.sub(owner, 1, #token + 1) == token .. ' ' then
        owner = string.sub(owner, #token + 2)
    else
        owner = ''
    end
    table.insert(out, token)
    table.insert(out, tostring(redis.call('PTTL', KEYS[1])))
    table.insert(out, owner)
end
if redis.call('TYPE', KEYS[2]).ok == 'zset' then
    local now = now_ms()
    local members = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. now, '+inf', 'WITHSCORES')
    for i = 1, #members, 2 do
        table.insert(out, members[i])
        table.insert(out, string.format('%.0f', tonumber(members[i + 1]) - now))
        table.insert(out, redis.call('HGET', KEYS[3], 'o:' .. members[i]) or '')
    end
end
return out"
);

// Batched scripts (`store/many.rs`): many keys of one cache call in one
// round trip, each key taken on its own (no all-or-none: one busy key does
// not hold up the others). Sent in chunks of at most
// `MAX_KEYS_PER_COMMAND` keys.

/// Takes every free load lock among KEYS (the lock keys) for ARGV[1] (token)
/// with ARGV[2] (expiry ms), and reports the others: an array of 1 (granted,
/// or already held by the token: a re-send answers the same) or 0 (held by
/// another token), one per key. Never waits; keeps no meta key.
pub static CLAIM_LOADS: LazyLock<Script> = LazyLock::new(|| Script::new(CLAIM_LOADS_LUA));
const CLAIM_LOADS_LUA: &str = r"local out = {}
for i = 1, #KEYS do
    if redis.call('SET', KEYS[i], ARGV[1], 'NX', 'PX', ARGV[2])
        or redis.call('GET', KEYS[i]) == ARGV[1] then
        out[i] = 1
    else
        out[i] = 0
    end
end
return out";

/// `CLAIM_LOADS` and `GET_OR_FENCE_MANY` in one script, where the one lock
/// master is also the value server. KEYS: lock 1, value 1, fence 1, lock 2...;
/// ARGV[1] token, ARGV[2] lock expiry ms, ARGV[3] fence expiry ms. Per key,
/// three answers: 1 and the value (false when missing or not a string) and
/// its `PTTL` when the lock was granted (its fence then taken), 0, false, -2
/// when another token holds it (its fence untouched).
pub static CLAIM_LOADS_FENCED: LazyLock<Script> =
    LazyLock::new(|| Script::new(CLAIM_LOADS_FENCED_LUA));
const CLAIM_LOADS_FENCED_LUA: &str = r"local out = {}
for i = 1, #KEYS, 3 do
    if redis.call('SET', KEYS[i], ARGV[1], 'NX', 'PX', ARGV[2])
        or redis.call('GET', KEYS[i]) == ARGV[1] then
        redis.call('SET', KEYS[i + 2], ARGV[1], 'PX', ARGV[3])
        table.insert(out, 1)
        if redis.call('TYPE', KEYS[i + 1]).ok == 'string' then
            table.insert(out, redis.call('GET', KEYS[i + 1]))
            table.insert(out, redis.call('PTTL', KEYS[i + 1]))
        else
            table.insert(out, false)
            table.insert(out, -2)
        end
    else
        table.insert(out, 0)
        table.insert(out, false)
        table.insert(out, -2)
    end
end
return out";

/// Compare-and-pexpire on each of KEYS (locks or fences) for ARGV[1]
/// (token), to ARGV[2] ms: 1 per key still held by the token, else 0.
pub static RENEW_LOADS: LazyLock<Script> = LazyLock::new(|| Script::new(RENEW_LOADS_LUA));
const RENEW_LOADS_LUA: &str = r"local out = {}
for i = 1, #KEYS do
    if redis.call('GET', KEYS[i]) == ARGV[1] then
        out[i] = redis.call('PEXPIRE', KEYS[i], ARGV[2])
    else
        out[i] = 0
    end
end
return out";

/// Compare-and-delete on each of KEYS for ARGV[1] (token), publishing each
/// released key on ARGV[2] (or not, when empty). Answers how many were
/// released.
pub static UNCLAIM_LOADS: LazyLock<Script> = LazyLock::new(|| Script::new(UNCLAIM_LOADS_LUA));
const UNCLAIM_LOADS_LUA: &str = r"local released = 0
for i = 1, #KEYS do
    if redis.call('GET', KEYS[i]) == ARGV[1] then
        redis.call('DEL', KEYS[i])
        if ARGV[2] ~= '' then
            redis.call('PUBLISH', ARGV[2], KEYS[i])
        end
        released = released + 1
    end
end
return released";

/// `GET_OR_FENCE` on many entries. KEYS: value 1, fence 1, value 2, fence
/// 2...; ARGV[1] token, ARGV[2] fence expiry ms. Answers, per entry, the value
/// (false when missing or not a string) and its `PTTL` (-2 when missing).
pub static GET_OR_FENCE_MANY: LazyLock<Script> =
    LazyLock::new(|| Script::new(GET_OR_FENCE_MANY_LUA));
const GET_OR_FENCE_MANY_LUA: &str = r"local out = {}
for i = 1, #KEYS, 2 do
    redis.call('SET', KEYS[i + 1], ARGV[1], 'PX', ARGV[2])
    if redis.call('TYPE', KEYS[i]).ok == 'string' then
        table.insert(out, redis.call('GET', KEYS[i]))
        table.insert(out, redis.call('PTTL', KEYS[i]))
    else
        table.insert(out, false)
        table.insert(out, -2)
    end
end
return out";

/// `SET_FENCED` on many entries, each on its own. KEYS: value 1, fence 1,
/// value 2, fence 2...; ARGV[1] token, ARGV[2] channel (or empty), then per
/// entry its value, ttl ms and message. Answers 1 (stored, or stored by a
/// first send) or 0 (the fence was taken) per entry.
pub static SET_FENCED_MANY: LazyLock<Script> = LazyLock::new(|| Script::new(SET_FENCED_MANY_LUA));
const SET_FENCED_MANY_LUA: &str = r"local out = {}
for j = 1, #KEYS / 2 do
    local value, fence_key = KEYS[2 * j - 1], KEYS[2 * j]
    local a = 3 + (j - 1) * 3
    local fence = redis.call('GET', fence_key)
    if fence == ARGV[1] then
        redis.call('SET', value, ARGV[a], 'PX', ARGV[a + 1])
        redis.call('SET', fence_key, ARGV[1] .. ':stored', 'KEEPTTL')
        if ARGV[2] ~= '' then
            redis.call('PUBLISH', ARGV[2], ARGV[a + 2])
        end
        out[j] = 1
    elseif fence == ARGV[1] .. ':stored' then
        out[j] = 1
    else
        out[j] = 0
    end
end
return out";

/// The source of every script, for loading them on a new connection.
pub const ALL: [&str; 22] = [
    RELEASE_LUA,
    EXTEND_LUA,
    GET_OR_FENCE_LUA,
    SET_FENCED_LUA,
    ACQUIRE_LUA,
    CLAIM_ALL_LUA,
    CLAIM_LOAD_LUA,
    CLAIM_READ_LUA,
    CLAIM_WRITE_LUA,
    CLAIM_PERMIT_LUA,
    RENEW_ALL_LUA,
    RENEW_MEMBER_LUA,
    UNCLAIM_ALL_LUA,
    UNCLAIM_MEMBER_LUA,
    RAISE_FENCE_LUA,
    HOLDERS_LUA,
    CLAIM_LOADS_LUA,
    RENEW_LOADS_LUA,
    UNCLAIM_LOADS_LUA,
    GET_OR_FENCE_MANY_LUA,
    SET_FENCED_MANY_LUA,
    CLAIM_LOADS_FENCED_LUA,
];
