//! ACL users (`redis://user:password@host`): a user with exactly the
//! permissions the cache needs runs everything (get_or_load, get, set,
//! invalidate, the lock with its extension, wake-ups); a user missing any one
//! of them gets a typed `NOPERM` error reply.
//!
//! The permissions (README, "TLS and ACL users"), derived from
//! `src/store/commands.rs`, `src/store/scripts.rs` and `src/store/pool.rs`:
//! commands sent directly (GET, SET, DEL, PING, PUBLISH, SUBSCRIBE, EVALSHA,
//! SCRIPT LOAD on every new connection), commands inside the Lua scripts (GET,
//! SET, DEL, PEXPIRE, PTTL, TYPE, PUBLISH: Redis checks them against the
//! script's caller), the keys `<prefix>*`, `lock.<prefix>*`, `fence.<prefix>*`
//! and the release channel. Not needed: `CONFIG GET` (the eviction-policy
//! check tolerates its refusal) and `CLIENT SETINFO` (redis-rs ignores its
//! answer; Redis 7.0 does not have it).

use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use crate::support::{RedisServer, counting, eventually, time_to_wake, unique_prefix};
use locked_cache::{CallOptions, Error, LockedCache};

/// The commands of the README's ACL line, each of which the cache needs.
const COMMANDS: &[&str] = &[
    "+get",
    "+set",
    "+del",
    "+ping",
    "+publish",
    "+subscribe",
    "+evalsha",
    "+script|load",
    "+pexpire",
    "+pttl",
    "+type",
    "+hincrby",
    "+hset",
    "+time",
];

/// Commands the cache (or redis-rs's handshake) tries and whose refusal it
/// ignores: the eviction-policy check, and `CLIENT SETINFO` (Valkey and Redis
/// 7.2+ have it and log its refusal; Redis 7.0 does not have it).
const TOLERATED: &[&str] = &["config|get", "client|setinfo"];

/// The README's ACL rules for key prefix `prefix`.
fn rules(prefix: &str) -> Vec<String> {
    let mut rules = vec![
        "reset".to_owned(),
        "on".to_owned(),
        ">pw".to_owned(),
        format!("~{prefix}*"),
        format!("~lock.{prefix}*"),
        format!("~fence.{prefix}*"),
        "&locked-cache:released".to_owned(),
    ];
    rules.extend(COMMANDS.iter().map(|c| (*c).to_owned()));
    rules
}

fn set_user(server: &RedisServer, user: &str, rules: &[String]) {
    let mut args = vec!["ACL", "SETUSER", user];
    args.extend(rules.iter().map(String::as_str));
    server.cmd(&args);
}

fn url(server: &RedisServer, user: &str) -> String {
    format!("redis://{user}:pw@127.0.0.1:{}", server.port())
}

async fn cache_as(server: &RedisServer, user: &str, prefix: &str) -> Result<LockedCache, Error> {
    LockedCache::builder()
        .redis(url(server, user))
        .key_prefix(prefix)
        .ttl(Duration::from_secs(60))
        .retry_time(Duration::from_secs(5))
        .wait_time(Duration::from_secs(3))
        .lock_expiry(Duration::from_secs(2))
        .build()
        .await
}

/// Everything the cache does, as this user; the first failure is returned.
async fn exercise(server: &RedisServer, user: &str, prefix: &str) -> Result<(), Error> {
    let cache = cache_as(server, user, prefix).await?;
    cache.ping().await?;
    let runs = Arc::new(AtomicU32::new(0));
    let v = cache
        .get_or_load("k", counting(&runs, "loaded"))
        .await
        .map_err(|e| e.cache_error().cloned().expect("the loader does not fail"))?;
    assert_eq!(v, "loaded");
    // A read that needs the value's time left (a stale window): GET + PTTL.
    let v = cache
        .with(CallOptions::new().stale_for(Duration::from_secs(5)))
        .get_or_load("k", counting(&runs, "reloaded"))
        .await
        .map_err(|e| e.cache_error().cloned().expect("the loader does not fail"))?;
    assert_eq!(v, "loaded");
    // A fenced store refused halfway (PUBLISH after the SET) is not an error of
    // get_or_load: the loaded value is returned, the failure counted and logged.
    let store_errors = cache.stats().store_errors;
    if store_errors > 0 {
        return Err(Error::InvalidConfig(format!(
            "the fenced store failed as {user} ({store_errors} store errors)"
        )));
    }
    assert_eq!(cache.get::<String>("k").await?.as_deref(), Some("loaded"));
    cache.set("k2", &"set".to_owned()).await?;
    assert_eq!(cache.get::<String>("k2").await?.as_deref(), Some("set"));
    assert!(cache.invalidate("k").await?);
    let mut guard = cache.lock().acquire(&cache.lock_key("manual")).await?;
    assert!(guard.extend(Duration::from_secs(2)).await?, "extended");
    assert!(guard.release().await?, "released");
    // The subscription is started in the background: wait for it, then check
    // it is there (a refused SUBSCRIBE only shows here).
    let subscribed = eventually(Duration::from_secs(2), || async {
        cache.lock().subscriptions() == 1
    })
    .await;
    if !subscribed {
        return Err(Error::InvalidConfig(format!(
            "no wake-up subscription as {user}"
        )));
    }
    Ok(())
}

/// The README's permissions are enough for everything, wake-ups included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_with_exactly_the_documented_permissions_runs_everything() {
    let server = RedisServer::start();
    let prefix = unique_prefix("acl");
    set_user(&server, "cache", &rules(&prefix));
    exercise(&server, "cache", &prefix)
        .await
        .expect("the documented permissions are enough");

    // A waiter in another cache is woken by pub/sub as this user.
    let holder = cache_as(&server, "cache", &prefix).await.unwrap();
    let waiter = cache_as(&server, "cache", &prefix).await.unwrap();
    let latency = time_to_wake(&holder, &waiter, "woken").await;
    assert!(
        latency < Duration::from_millis(500),
        "woken by pub/sub, not polling (retry 5 s): {latency:?}"
    );
    assert!(waiter.stats().wakeups >= 1);
    // Nothing was refused along the way but what the cache tolerates.
    let refused = refused_commands(&server);
    assert!(
        refused.iter().all(|c| TOLERATED.contains(&c.as_str())),
        "refused: {refused:?}"
    );
}

/// The commands, keys or channels the server's ACL log has refused.
fn refused_commands(server: &RedisServer) -> Vec<String> {
    let log: Vec<Vec<redis::Value>> = server.query(&["ACL", "LOG"]);
    log.iter()
        .filter_map(|entry| {
            let at = entry
                .iter()
                .position(|v| matches!(v, redis::Value::BulkString(b) if b == b"object"))?;
            match entry.get(at + 1)? {
                redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
                _ => None,
            }
        })
        .collect()
}

/// Each documented permission is needed: without any one of them, something
/// the cache does fails with a typed error reply (`NOPERM`, or for a command
/// refused inside a script on Redis 7.0, an error naming the script), or, for
/// SUBSCRIBE, the wake-up subscription is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_missing_any_one_permission_gets_a_typed_noperm_error() {
    let server = RedisServer::start();
    let base = unique_prefix("acl-minus");
    // Rules 0..3 are `reset on >pw`; each of the others is left out in turn,
    // with a key prefix of its own (so no value stored earlier is a hit).
    for i in 3..rules(&base).len() {
        let prefix = format!("{base}{i}:");
        let mut rules = rules(&prefix);
        let skipped = rules.remove(i);
        let user = format!("minus{i}");
        set_user(&server, &user, &rules);
        server.cmd(&["ACL", "LOG", "RESET"]);
        let result = exercise(&server, &user, &prefix).await;
        let err = result.expect_err(&format!("without `{skipped}` something must fail"));
        println!("without `{skipped}`: {err}");
        if err.redis_code() == Some("NOPERM") && skipped.starts_with('+') {
            let command = skipped.trim_start_matches('+').split('|').next().unwrap();
            assert!(
                err.to_string().to_lowercase().contains(command),
                "the error names the command it cannot live without: {err}"
            );
        }
        if let Error::InvalidConfig(why) = &err {
            // Refused where no call fails (the background subscription, the
            // end of the fenced store): the server's ACL log shows it.
            let refused: Vec<String> = refused_commands(&server)
                .into_iter()
                .filter(|c| !TOLERATED.contains(&c.as_str()))
                .collect();
            assert!(
                !refused.is_empty(),
                "without `{skipped}` ({why}) the ACL log names the refusal"
            );
            continue;
        }
        assert!(err.is_error_reply(), "without `{skipped}`: {err:?}");
        // A command refused directly is `NOPERM`; one refused inside a
        // script is an `ERR` reply naming the script ("The user executing the
        // script can't ..." on Redis 7.0, "ACL failure in script: ..." on
        // Valkey).
        let in_script = err.to_string().contains("@user_script");
        assert!(
            err.redis_code() == Some("NOPERM") || in_script,
            "without `{skipped}`: {err:?}"
        );
        assert!(!err.is_connection_error() && !err.is_timeout(), "{err:?}");
    }
}

/// A managed server's restrictions: the documented user is denied `CONFIG`,
/// `CLIENT`, `KEYS`, `INFO` and every other command the cache can live
/// without. Everything works, and what was refused costs at most one debug
/// line per server, nothing louder.
#[tokio::test]
async fn refused_optional_commands_cost_at_most_one_debug_line_per_server() {
    let server = RedisServer::start();
    let prefix = unique_prefix("managed");
    let mut rules = rules(&prefix);
    rules.extend(
        [
            "-config", "-client", "-keys", "-info", "-scan", "-debug", "-monitor", "-hello",
        ]
        .map(str::to_owned),
    );
    set_user(&server, "managed", &rules);
    server.cmd(&["ACL", "LOG", "RESET"]);
    let (events, _guard) = crate::support::capture::capture();
    exercise(&server, "managed", &prefix)
        .await
        .expect("everything works without the optional commands");
    let all = events.events();
    let loud: Vec<String> = all
        .iter()
        .filter(|e| e.level <= tracing::Level::INFO)
        .map(|e| e.text())
        .collect();
    assert!(loud.is_empty(), "louder than debug: {loud:?}");
    let about_refusals: Vec<String> = all
        .iter()
        .map(|e| e.text())
        .filter(|t| t.contains("refused") || t.contains("NOPERM"))
        .collect();
    assert!(
        about_refusals.len() <= 1,
        "more than one line for one server: {about_refusals:?}"
    );
    let refused = refused_commands(&server);
    assert!(
        refused.iter().all(|c| TOLERATED.contains(&c.as_str())),
        "refused beyond the tolerated: {refused:?}"
    );
}
