//! The server's eviction policy, checked once per server: locks and fences are
//! short-lived keys with a TTL, which some `maxmemory-policy` settings evict
//! first.
//!
//! | policy | lock and fence keys under memory pressure |
//! | --- | --- |
//! | `noeviction` | never evicted (writes fail with `OOM` instead): safe |
//! | `allkeys-lru`, `allkeys-lfu` | among the most recently used keys, evicted last: safe in practice |
//! | `volatile-ttl` | the shortest TTLs on the server, evicted **first** |
//! | `volatile-lru`, `volatile-lfu`, `volatile-random`, `allkeys-random` | may be evicted while held |
//!
//! An evicted lock lets a second holder in (two loads); an evicted fence makes
//! the holder's fenced store refuse itself (the value is returned, not cached).
//! Neither ever writes a stale value. The check is a `CONFIG GET`, which managed
//! services and restricted ACL users often refuse: a refusal is not an error,
//! only logged at debug level.

use redis::aio::MultiplexedConnection;

/// Whether `policy` may evict a lock or fence key that is still in use.
pub fn policy_evicts_locks(policy: &str) -> bool {
    matches!(
        policy,
        "volatile-ttl" | "volatile-lru" | "volatile-lfu" | "volatile-random" | "allkeys-random"
    )
}

/// Reads `maxmemory` and `maxmemory-policy` and warns when the policy can evict
/// lock or fence keys. Called once per server, on its first connection.
pub async fn check_policy(conn: &mut MultiplexedConnection, server: &str) {
    let reply: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory*")
        .query_async(conn)
        .await;
    let pairs = match reply {
        Ok(pairs) => pairs,
        Err(e) => {
            tracing::debug!(server, error = %e, "CONFIG GET refused; the eviction policy is not checked");
            return;
        }
    };
    let get = |name: &str| {
        pairs
            .chunks(2)
            .find(|pair| pair[0] == name)
            .and_then(|pair| pair.get(1))
            .map(String::as_str)
    };
    let limited = get("maxmemory").is_some_and(|m| m != "0");
    if let Some(policy) = get("maxmemory-policy")
        && limited
        && policy_evicts_locks(policy)
    {
        tracing::warn!(
            server,
            policy,
            "maxmemory-policy can evict lock and fence keys under memory pressure \
             (a second load, or a loaded value left uncached); use noeviction on lock \
             masters, and allkeys-lru or allkeys-lfu on a value server"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::policy_evicts_locks;

    #[test]
    fn which_policies_evict_locks() {
        for safe in ["noeviction", "allkeys-lru", "allkeys-lfu"] {
            assert!(!policy_evicts_locks(safe), "{safe}");
        }
        for unsafe_ in [
            "volatile-ttl",
            "volatile-lru",
            "volatile-lfu",
            "volatile-random",
            "allkeys-random",
        ] {
            assert!(policy_evicts_locks(unsafe_), "{unsafe_}");
        }
    }
}
