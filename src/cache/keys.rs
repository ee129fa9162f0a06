//! The Redis keys behind one cache key, and the checks a key must pass.
//!
//! For a cache key `k` and prefix `p`, the value lives at `p{k}`, the lock at
//! `lock.p{k}` and the write fence at `fence.p{k}`. The braces are a Redis
//! Cluster hash tag: the three keys of an entry hash to one slot, so every script
//! stays on one shard (and keys spread over the shards by `k`). A key starting
//! with `}` or `\` gets a `\` in front inside the braces, so that its tag is
//! never empty and no two keys share a layout; a prefix may not contain braces
//! (its own tag would win). The layout is versioned by the braces: values stored
//! by a version without them (`pk`) are simply not found (a one-time cold cache
//! on upgrade), never read as something else.
//!
//! A value key never starts with `lock.`, `fence.` or `tag.` (tag versions,
//! `tags.rs`): a prefix that does is
//! refused when the cache is built, and a key cannot make it so (it comes after
//! the prefix and the brace).

use crate::error::{Error, Result};

pub const LOCK_PREFIX: &str = "lock.";
pub const FENCE_PREFIX: &str = "fence.";

/// The keys of one cache entry.
#[derive(Debug)]
pub struct Keys {
    pub value: String,
    pub lock: String,
    pub fence: String,
}

/// The pieces of the value key of `key`, in order: `prefix{key}`, with a
/// `\` after the brace when the key starts with `}` or `\`.
fn value_key_parts<'a>(prefix: &'a str, key: &'a str) -> [&'a str; 5] {
    let escape = if key.starts_with(['}', '\\']) {
        "\\"
    } else {
        ""
    };
    [prefix, "{", escape, key, "}"]
}

/// The value key alone: `prefix{key}`.
pub fn value_key(prefix: &str, key: &str) -> String {
    value_key_parts(prefix, key).concat()
}

/// The cache key whose value key is `value_key` under `prefix`: the inverse
/// of [`value_key`]; `None` for a key no cache key of `prefix` maps to.
/// (The near cache keeps values by cache key; invalidations name value keys.)
#[cfg_attr(not(feature = "near-cache"), allow(dead_code))]
pub fn cache_key_of<'v>(prefix: &str, value_key: &'v str) -> Option<&'v str> {
    let braced = value_key
        .strip_prefix(prefix)?
        .strip_prefix('{')?
        .strip_suffix('}')?;
    match braced.strip_prefix('\\') {
        // The escape goes before a key starting with `}` or `\`, and only
        // there.
        Some(key) if key.starts_with(['}', '\\']) => Some(key),
        Some(_) => None,
        None if braced.starts_with('}') => None,
        None => Some(braced),
    }
}

/// The value key of a cache key, not yet built: a hit writes it straight
/// into its `GET` ([`ToRedisArgs`](redis::ToRedisArgs)) instead of building
/// a `String` for it; the paths past a hit [`build`](Self::build) it.
#[derive(Clone, Copy, Debug)]
pub struct ValueKey<'a> {
    prefix: &'a str,
    key: &'a str,
}

impl<'a> ValueKey<'a> {
    pub fn new(prefix: &'a str, key: &'a str) -> ValueKey<'a> {
        ValueKey { prefix, key }
    }

    /// The cache key it is the value key of.
    #[cfg_attr(not(feature = "near-cache"), allow(dead_code))]
    pub fn key(self) -> &'a str {
        self.key
    }

    /// The value key as a `String` ([`value_key`]).
    pub fn build(self) -> String {
        value_key(self.prefix, self.key)
    }
}

impl std::fmt::Display for ValueKey<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        value_key_parts(self.prefix, self.key)
            .iter()
            .try_for_each(|part| f.write_str(part))
    }
}

impl redis::ToRedisArgs for ValueKey<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        with_value_key_bytes(self.prefix, self.key, |value_key| out.write_arg(value_key));
    }
}

impl redis::ToSingleRedisArg for ValueKey<'_> {}

impl crate::store::KeyArg for ValueKey<'_> {
    fn len(&self) -> usize {
        // At most: braces and an escape.
        self.prefix.len() + self.key.len() + 3
    }
}

/// Calls `f` with the value key of `key` ([`value_key`]), built on the stack
/// when it is short: a `GET` writes it into its command without a `String`.
fn with_value_key_bytes<R>(prefix: &str, key: &str, f: impl FnOnce(&[u8]) -> R) -> R {
    let mut buf = [0u8; 128];
    let escape = key.starts_with(['}', '\\']);
    let len = prefix.len() + usize::from(escape) + key.len() + 2;
    if len > buf.len() {
        return f(value_key(prefix, key).as_bytes());
    }
    // Piece by piece as `value_key_parts` has them: two copies and three
    // single bytes.
    buf[..prefix.len()].copy_from_slice(prefix.as_bytes());
    let mut at = prefix.len();
    buf[at] = b'{';
    at += 1;
    if escape {
        buf[at] = b'\\';
        at += 1;
    }
    buf[at..at + key.len()].copy_from_slice(key.as_bytes());
    at += key.len();
    buf[at] = b'}';
    f(&buf[..=at])
}

impl Keys {
    pub fn new(prefix: &str, key: &str) -> Keys {
        let value = value_key(prefix, key);
        Keys {
            lock: format!("{LOCK_PREFIX}{value}"),
            fence: format!("{FENCE_PREFIX}{value}"),
            value,
        }
    }
}

/// Refuses a prefix whose value keys could collide with lock or fence keys, or
/// whose braces would replace the entry's hash tag.
pub fn check_prefix(prefix: &str) -> Result<()> {
    let tag = super::tags::TAG_PREFIX;
    if prefix.starts_with(LOCK_PREFIX)
        || prefix.starts_with(FENCE_PREFIX)
        || prefix.starts_with(tag)
    {
        return Err(Error::InvalidConfig(format!(
            "key prefix must not start with `{LOCK_PREFIX}`, `{FENCE_PREFIX}` or `{tag}`"
        )));
    }
    if prefix.contains(['{', '}']) {
        return Err(Error::InvalidConfig(
            "key prefix must not contain `{` or `}` (the cache adds the key's hash tag)".into(),
        ));
    }
    Ok(())
}

/// Refuses empty keys and keys over `max_len` bytes. Any other bytes (spaces,
/// newlines, control characters, braces, non-ASCII) are fine: Redis keys are
/// binary-safe, and the layout keeps every key apart and on one slot.
pub fn check_key(_prefix: &str, key: &str, max_len: usize) -> Result<()> {
    if key.is_empty() {
        return Err(Error::InvalidKey("the key is empty".into()));
    }
    if key.len() > max_len {
        return Err(Error::InvalidKey(format!(
            "the key is {} bytes, over the maximum of {max_len}",
            key.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::slot::slot;

    #[test]
    fn a_value_key_built_on_the_stack_is_the_value_key() {
        let long = "k".repeat(200);
        for key in ["a", "}x", "\\y", "é:ü", long.as_str(), ""] {
            for prefix in ["", "p:", "prefix-ÿ:"] {
                let built =
                    with_value_key_bytes(prefix, key, |k| String::from_utf8(k.to_vec())).unwrap();
                assert_eq!(built, value_key(prefix, key), "{prefix:?} {key:?}");
                let unbuilt = ValueKey::new(prefix, key);
                assert_eq!(unbuilt.build(), built);
                assert_eq!(unbuilt.to_string(), built);
                let arg = redis::ToRedisArgs::to_redis_args(&unbuilt);
                assert_eq!(arg, vec![built.clone().into_bytes()], "{prefix:?} {key:?}");
            }
        }
    }

    /// `cache_key_of` inverts `value_key` for every key (escaped or not),
    /// and refuses what no key maps to.
    #[test]
    fn the_cache_key_of_a_value_key_is_its_key() {
        let long = "k".repeat(200);
        let keys = [
            "a",
            "}",
            "}x",
            "\\",
            "\\}x",
            "\\\\",
            "{",
            "{}",
            "a{b}c",
            "a}b",
            "}{",
            "é:ü",
            "",
            long.as_str(),
        ];
        for prefix in ["", "lc:", "p{"] {
            for key in keys {
                let value_key = value_key(prefix, key);
                assert_eq!(
                    cache_key_of(prefix, &value_key),
                    Some(key),
                    "{prefix:?} {key:?}"
                );
            }
        }
        for bad in [
            "lc:k", "lc:{k", "lc:k}", "x:{k}", "lc:{}x}", "lc:{\\x}", "lc:{\\}",
        ] {
            assert_eq!(cache_key_of("lc:", bad), None, "{bad:?}");
        }
    }

    /// Around the stack buffer's 128 bytes, with and without the escape.
    #[test]
    fn value_keys_on_both_sides_of_the_stack_buffer_are_the_value_key() {
        for prefix in ["", "p:"] {
            for len in 118..=132 {
                for first in ["k", "}", "\\"] {
                    let key = format!("{first}{}", "x".repeat(len));
                    let built =
                        with_value_key_bytes(prefix, &key, |k| String::from_utf8(k.to_vec()))
                            .unwrap();
                    assert_eq!(built, value_key(prefix, &key), "{prefix:?} {len}");
                    let arg = redis::ToRedisArgs::to_redis_args(&ValueKey::new(prefix, &key));
                    assert_eq!(arg, vec![built.into_bytes()], "{prefix:?} {len}");
                }
            }
        }
    }

    #[test]
    fn keys_are_namespaced_and_tagged() {
        let k = Keys::new("lc:", "user:42");
        assert_eq!(k.value, "lc:{user:42}");
        assert_eq!(k.lock, "lock.lc:{user:42}");
        assert_eq!(k.fence, "fence.lc:{user:42}");
    }

    #[test]
    fn slots_follow_redis() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"123456789"), 12739);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_ne!(slot(b"foo{}{bar}"), slot(b"bar"));
    }

    #[test]
    fn every_key_keeps_its_three_keys_on_one_slot_and_apart_from_others() {
        let keys = [
            "plain", "}", "}x", "\\", "\\}x", "{", "{}", "a{b}c", "a}b", "}{", "{{}}", "lock.x",
            "fence.x", " ", "\n", "é{ü}",
        ];
        let mut seen = std::collections::HashSet::new();
        for prefix in ["", "lc:", "lo"] {
            for key in keys {
                let k = Keys::new(prefix, key);
                let s = slot(k.value.as_bytes());
                assert_eq!(slot(k.lock.as_bytes()), s, "{prefix:?} {key:?}");
                assert_eq!(slot(k.fence.as_bytes()), s, "{prefix:?} {key:?}");
                assert!(!k.value.starts_with(LOCK_PREFIX) && !k.value.starts_with(FENCE_PREFIX));
                for redis_key in [&k.value, &k.lock, &k.fence] {
                    assert!(seen.insert(redis_key.clone()), "{redis_key:?} twice");
                }
            }
        }
    }

    #[test]
    fn bad_keys_and_prefixes_are_refused() {
        assert!(check_key("lc:", "", 10).is_err());
        assert!(check_key("lc:", "12345678901", 10).is_err());
        assert!(check_key("lc:", "a b\n\0c", 10).is_ok());
        assert!(check_key("lc:", "lock.x", 10).is_ok());
        assert!(check_prefix("lock.app:").is_err());
        assert!(check_prefix("fence.").is_err());
        assert!(check_prefix("app{1}:").is_err());
        assert!(check_prefix("app:").is_ok());
        assert!(check_prefix("").is_ok());
    }
}
