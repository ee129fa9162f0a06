//! The Redis keys behind one cache key, and the checks a key must pass.
//!
//! For a cache key `k` and prefix `p`, the value lives at `pk`, the lock at
//! `lock.pk` and the write fence at `fence.pk`. A value key must therefore never
//! itself start with `lock.` or `fence.`: a prefix that does is refused when the
//! cache is built, and a key that would make `pk` do so (with an empty or short
//! prefix, such as `lo` + `ck.x`) is refused with [`Error::InvalidKey`].

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

/// The value key alone, for the hit path.
pub fn value_key(prefix: &str, key: &str) -> String {
    let mut value = String::with_capacity(prefix.len() + key.len());
    value.push_str(prefix);
    value.push_str(key);
    value
}

impl Keys {
    pub fn new(prefix: &str, key: &str) -> Keys {
        Keys::with_value_key(value_key(prefix, key))
    }

    /// The lock and fence keys that go with `value` (a value key).
    pub fn with_value_key(value: String) -> Keys {
        Keys {
            lock: format!("{LOCK_PREFIX}{value}"),
            fence: format!("{FENCE_PREFIX}{value}"),
            value,
        }
    }
}

/// Refuses a prefix whose value keys could collide with lock or fence keys.
pub fn check_prefix(prefix: &str) -> Result<()> {
    if prefix.starts_with(LOCK_PREFIX) || prefix.starts_with(FENCE_PREFIX) {
        return Err(Error::InvalidConfig(format!(
            "key prefix must not start with `{LOCK_PREFIX}` or `{FENCE_PREFIX}`"
        )));
    }
    Ok(())
}

/// Refuses empty keys, keys over `max_len` bytes, and (with an empty prefix) keys
/// in the lock or fence key space. Any other bytes (spaces, newlines, control
/// characters, non-ASCII) are fine: Redis keys are binary-safe.
pub fn check_key(prefix: &str, key: &str, max_len: usize) -> Result<()> {
    if key.is_empty() {
        return Err(Error::InvalidKey("the key is empty".into()));
    }
    if key.len() > max_len {
        return Err(Error::InvalidKey(format!(
            "the key is {} bytes, over the maximum of {max_len}",
            key.len()
        )));
    }
    if [LOCK_PREFIX, FENCE_PREFIX]
        .iter()
        .any(|reserved| joined_starts_with(prefix, key, reserved))
    {
        return Err(Error::InvalidKey(format!(
            "prefix + key must not start with `{LOCK_PREFIX}` or `{FENCE_PREFIX}` (the lock and fence key spaces)"
        )));
    }
    Ok(())
}

/// Whether `a + b` starts with `pattern` (ASCII), without joining them.
fn joined_starts_with(a: &str, b: &str, pattern: &str) -> bool {
    if a.len() >= pattern.len() {
        a.starts_with(pattern)
    } else {
        pattern.starts_with(a) && b.as_bytes().starts_with(&pattern.as_bytes()[a.len()..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_namespaced() {
        let k = Keys::new("lc:", "user:42");
        assert_eq!(k.value, "lc:user:42");
        assert_eq!(k.lock, "lock.lc:user:42");
        assert_eq!(k.fence, "fence.lc:user:42");
    }

    #[test]
    fn bad_keys_are_refused() {
        assert!(check_key("lc:", "", 10).is_err());
        assert!(check_key("lc:", "12345678901", 10).is_err());
        assert!(check_key("lc:", "a b\n\0c", 10).is_ok());
        assert!(check_key("lc:", "lock.x", 10).is_ok());
        assert!(check_key("", "lock.x", 10).is_err());
        assert!(check_key("", "fence.x", 10).is_err());
        // A short prefix joined with the key can reach the reserved spaces too.
        assert!(check_key("lo", "ck.lofoo", 10).is_err());
        assert!(check_key("fe", "nce.x", 10).is_err());
        assert!(check_key("lo", "cker", 10).is_ok());
        assert!(check_key("l", "ock", 10).is_ok());
        assert!(check_prefix("lock.app:").is_err());
        assert!(check_prefix("app:").is_ok());
    }
}
