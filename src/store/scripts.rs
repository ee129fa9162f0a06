//! The Lua scripts locked-cache runs on Redis. Each is built once (its SHA1
//! computed once) and sent by EVALSHA, falling back to EVAL on `NOSCRIPT`
//! (after a server restart or `SCRIPT FLUSH`).

use std::sync::LazyLock;

use redis::Script;

/// KEYS[1] lock, ARGV[1] token, ARGV[2] channel (or empty): compare-and-delete,
/// then wake waiters.
pub static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[1])
    if ARGV[2] ~= '' then
        redis.call('PUBLISH', ARGV[2], KEYS[1])
    end
    return 1
end
return 0",
    )
});

/// KEYS[1] lock, ARGV[1] token, ARGV[2] expiry ms: compare-and-pexpire.
pub static EXTEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0",
    )
});

/// KEYS[1] value, KEYS[2] fence, ARGV[1] token, ARGV[2] fence expiry ms:
/// takes the fence for this token and returns the value if it is a string (a key
/// of another type reads as missing, and is overwritten by the fenced store).
pub static GET_OR_FENCE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
if redis.call('TYPE', KEYS[1]).ok == 'string' then
    return redis.call('GET', KEYS[1])
end
return false",
    )
});

/// KEYS[1] value, KEYS[2] fence, ARGV[1] token, ARGV[2] value, ARGV[3] ttl ms:
/// store the value only while the fence is still ours.
pub static SET_FENCED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('GET', KEYS[2]) == ARGV[1] then
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
    redis.call('DEL', KEYS[2])
    return 1
end
return 0",
    )
});
