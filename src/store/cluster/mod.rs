//! [`ClusterStore`]: the [`Store`] operations on a Redis Cluster (feature
//! `cluster`), over redis-rs's async cluster connection.
//!
//! One redis-rs cluster connection per shard group (`shards.rs`): the
//! slots of each primary found at connect time have a connection of their
//! own, so a primary down, hung or failing over delays only the calls on its
//! slots, and a hung primary's slots move to its promoted replica. Within a
//! group redis-rs discovers slots, follows `MOVED` and `ASK` and finds a
//! failed-over shard again; its retries are bounded by the cache's command
//! timeout (redis-rs's defaults retry for much longer). A redirection or a
//! `TRYAGAIN`/`CLUSTERDOWN`/`MASTERDOWN` reply that outlasts redis-rs's
//! retries is tried again here until the command timeout; a redirection is
//! never returned: at the deadline it is a [`Error::CommandTimeout`]. Every key
//! of a cache entry carries the same hash tag (`cache/keys.rs`), so each
//! script runs on one shard; scripts are loaded on every primary when a
//! connection is made, and again on `NOSCRIPT` (a promoted replica).
//!
//! For the lock, a cluster is **one** Redlock master: a key lives on one shard,
//! so its lock is that shard's primary. With [`ClusterOptions::replica_acks`],
//! an acquisition also waits (`WAIT`) until that many replicas have the lock, and
//! counts as refused otherwise, so a failover right after it does not lose it.
//! The value's fence still protects the store: a holder whose primary failed
//! over never overwrites a newer value.
//!
//! Wake-ups use classic `PUBLISH`, which a cluster delivers to every node: the
//! subscription is one connection to any node (a seed, or else a node of the
//! current topology), made again after any disconnect.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::FutureExt;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{RedisError, Value};
use tokio::sync::{OnceCell, mpsc};

use super::auth::CredentialSource;
use super::redis::{ConnectionOptions, redact};
use super::slot::slot;
use super::{
    Claim, FencedWrite, Holdings, LoadClaim, Publish, Store, Stored, Write, commands, scripts,
};
use crate::error::{Error, Result};
use shards::{Connect, Groups, parse_slots};

mod batch;
mod route;
mod shards;
mod subscribe;

/// How a [`ClusterStore`] acquires locks beyond the plain `SET NX`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClusterOptions {
    /// After a lock is granted, wait until this many replicas of its shard
    /// acknowledge it (`WAIT n timeout`), waiting at most the given time; an
    /// acquisition with fewer acknowledgements is undone and counts as
    /// refused. `None` (the default): no wait. Raising it keeps a lock through
    /// a failover that happens right after it was granted, at the cost of a
    /// round trip per acquisition and of locks becoming unavailable while the
    /// shard has fewer replicas than this.
    pub replica_acks: Option<(u32, Duration)>,
}

/// A Redis Cluster, reached through one redis-rs cluster connection per shard
/// group (each one multiplexed connection per node). Cheap to clone.
#[derive(Clone)]
pub struct ClusterStore {
    connect: Connect,
    groups: Arc<OnceCell<Arc<Groups>>>,
    seeds: Vec<String>,
    server: String,
    options: ConnectionOptions,
    cluster: ClusterOptions,
    /// Rotating credentials for the node and pub/sub connections (`auth.rs`).
    credentials: Option<CredentialSource>,
}

impl fmt::Debug for ClusterStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterStore")
            .field("server", &self.server)
            .field("options", &self.options)
            .field("cluster", &self.cluster)
            .finish()
    }
}

/// redis-rs's own retries within one command: few and short, all inside the
/// command timeout.
const CLUSTER_RETRIES: u32 = 3;

/// Sends of one command that may fail on a dead node connection before its
/// error is returned.
const DEAD_SENDS: u32 = 3;

/// The pause before a command that met a redirection or a `TRYAGAIN` /
/// `CLUSTERDOWN` / `MASTERDOWN` reply after redis-rs's retries is sent again.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// Server replies that mean "not executed, try again shortly": a redirection
/// redis-rs's retries did not get through, a slot being migrated, a shard
/// without a primary.
fn retry_later(e: &RedisError) -> bool {
    matches!(
        e.code(),
        Some("MOVED" | "ASK" | "TRYAGAIN" | "CLUSTERDOWN" | "MASTERDOWN")
    )
}

impl ClusterStore {
    /// A store for the cluster reachable through `seeds` (one or more node
    /// URLs, `redis://[user:password@]host:port`). Connects lazily, on first
    /// use.
    pub fn open(
        seeds: &[String],
        options: ConnectionOptions,
        cluster: ClusterOptions,
    ) -> Result<ClusterStore> {
        ClusterStore::open_with(seeds, options, cluster, None)
    }

    /// [`open`](ClusterStore::open) with rotating credentials on every node
    /// connection (redis-rs re-authenticates them) and pub/sub connection.
    pub(crate) fn open_with(
        seeds: &[String],
        options: ConnectionOptions,
        cluster: ClusterOptions,
        credentials: Option<CredentialSource>,
    ) -> Result<ClusterStore> {
        if seeds.is_empty() {
            return Err(Error::InvalidConfig(
                "a cluster needs at least one seed URL".into(),
            ));
        }
        let names: Vec<String> = seeds.iter().map(|s| redact(s)).collect();
        let server = format!("cluster({})", names.join(", "));
        let provider = credentials.clone();
        let builder = move |seeds: &[String]| {
            let builder = ClusterClientBuilder::new(seeds.iter().map(String::as_str));
            let builder = match &provider {
                None => builder,
                #[cfg(feature = "credentials")]
                Some(source) => builder.set_credentials_provider(source.clone()),
                #[cfg(not(feature = "credentials"))]
                Some(source) => match *source {},
            };
            builder
                .connection_timeout(options.connect_timeout)
                // redis-rs's default is none: a hung node would hold a
                // request (and a slot refresh) forever.
                .response_timeout(options.command_timeout)
                .overall_response_timeout(Some(options.command_timeout))
                .tcp_settings(super::tls::tcp_settings())
                .retries(CLUSTER_RETRIES)
                .min_retry_wait(5)
                .max_retry_wait(options.command_timeout.as_millis().min(200) as u64)
                .build()
        };
        // Checked now, so that a bad seed is a configuration error.
        builder(seeds).map_err(|e| Error::InvalidConfig(format!("redis cluster {server}: {e}")))?;
        let connect: Connect = Arc::new(move |seeds: Vec<String>| {
            let client = builder(&seeds);
            async move { client?.get_async_connection().await }.boxed()
        });
        Ok(ClusterStore {
            connect,
            groups: Default::default(),
            seeds: seeds.to_vec(),
            server,
            options,
            cluster,
            credentials,
        })
    }

    fn redis_error(&self, source: RedisError) -> Error {
        Error::Redis {
            server: self.server.clone(),
            source,
        }
    }

    /// The shard groups, connected on first use (slots discovered, one
    /// cluster connection per primary, scripts loaded on every primary),
    /// within the connect timeout plus the command timeout.
    async fn groups(&self) -> Result<Arc<Groups>> {
        let bound = self.options.connect_timeout + self.options.command_timeout;
        let connect = async {
            let mut first = (self.connect)(self.seeds.clone())
                .await
                .map_err(|e| self.redis_error(e))?;
            // SCRIPT LOAD goes to every primary; NOSCRIPT still falls back.
            for source in scripts::ALL {
                let _: std::result::Result<String, _> = redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(source)
                    .query_async(&mut first)
                    .await;
            }
            let reply: Value = redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async(&mut first)
                .await
                .map_err(|e| self.redis_error(e))?;
            let slots = parse_slots(&reply);
            let groups = Groups::connect(
                first,
                &slots,
                self.seeds.clone(),
                Arc::clone(&self.connect),
                bound,
            )
            .await
            .map_err(|e| self.redis_error(e))?;
            Ok::<_, Error>(Arc::new(groups))
        };
        let groups = tokio::time::timeout(bound, self.groups.get_or_try_init(|| connect))
            .await
            .map_err(|_| Error::PoolTimeout {
                server: self.server.clone(),
                timeout: bound,
            })??;
        Ok(Arc::clone(groups))
    }

    /// Runs one command on the connection of the group that serves `slot`,
    /// bounded by the command timeout (redis-rs retries within it:
    /// redirections, reconnects; and so does this, after a redirection or a
    /// busy cluster). A timeout or a connection error makes the group's
    /// primary suspect (checked off the request path).
    async fn run<T, F, Fut>(&self, command: &'static str, slot: u16, f: F) -> Result<T>
    where
        F: Fn(ClusterConnection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        // Connected first (on first use), so that the command timeout is the
        // command's own.
        let groups = self.groups().await?;
        let deadline = Instant::now() + self.options.command_timeout;
        self.run_until(&groups, command, slot, deadline, f).await
    }

    /// [`run`](Self::run) on the connected `groups`, bounded by `deadline`
    /// instead of a command timeout from now: a node's pipeline and the
    /// per-slot commands it falls back to share one (`route.rs`).
    async fn run_until<T, F, Fut>(
        &self,
        groups: &Arc<Groups>,
        command: &'static str,
        slot: u16,
        deadline: Instant,
        f: F,
    ) -> Result<T>
    where
        F: Fn(ClusterConnection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let g = groups.of_slot(slot);
        let timeout = self.options.command_timeout;
        let timed_out = || Error::CommandTimeout {
            command,
            server: self.server.clone(),
            timeout,
        };
        let mut dead_sends = 0;
        loop {
            let group = groups.group(g);
            let replaced = group.replaced();
            let conn = group.connection();
            // A little over what is left: redis-rs's own overall timeout
            // ends it first, with its own error.
            let left = deadline.saturating_duration_since(Instant::now());
            let result = tokio::select! {
                result = tokio::time::timeout(left + Duration::from_millis(50), f(conn)) => result,
                // The group's primary failed over while this waited on it
                // (hung): the command goes to the new connection. What the
                // old primary may still run is discarded when it rejoins as
                // a replica of the new one, and the cache's scripts are
                // idempotent for one token should both have run.
                () = replaced => continue,
            };
            match result {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) if retry_later(&e) => {
                    if deadline.saturating_duration_since(Instant::now()) > RETRY_PAUSE {
                        tokio::time::sleep(RETRY_PAUSE).await;
                        continue;
                    }
                    groups.suspect(g);
                    // A redirection still unfollowed at the deadline: the
                    // slot was moving for the whole command timeout.
                    return Err(if e.redirect_node().is_some() {
                        timed_out()
                    } else {
                        self.redis_error(e)
                    });
                }
                Ok(Err(e))
                    if e.kind() == redis::ErrorKind::ClusterConnectionNotFound
                        || super::pool::is_dead(&e) =>
                {
                    // The node's connection died (killed clients, a proxy's
                    // idle timeout, a restart) and redis-rs's retries came
                    // before its reconnect. As on one server (`redis.rs`,
                    // `run`): every command answers the same when sent twice,
                    // so it is sent again, up to `DEAD_SENDS` times within the
                    // command timeout.
                    groups.suspect(g);
                    dead_sends += 1;
                    if dead_sends < DEAD_SENDS
                        && deadline.saturating_duration_since(Instant::now()) > RETRY_PAUSE
                    {
                        tokio::time::sleep(RETRY_PAUSE).await;
                        continue;
                    }
                    return Err(self.redis_error(e));
                }
                Ok(Err(e)) if e.is_timeout() => {
                    groups.suspect(g);
                    return Err(timed_out());
                }
                Ok(Err(e)) => {
                    if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
                        groups.suspect(g);
                    }
                    return Err(self.redis_error(e));
                }
                Err(_) => {
                    groups.suspect(g);
                    return Err(timed_out());
                }
            }
        }
    }

    /// `WAIT n timeout` on the primary that holds `key`'s slot: how many
    /// replicas acknowledged this connection's writes to that node.
    async fn replica_acks(
        conn: &mut ClusterConnection,
        key: &str,
        replicas: u32,
        timeout: Duration,
    ) -> Result<u32, RedisError> {
        let mut wait = redis::cmd("WAIT");
        wait.arg(replicas).arg(commands::millis(timeout));
        match conn.route_command(wait, primary_of(slot_of(key))).await? {
            Value::Int(n) => Ok(n.max(0) as u32),
            other => Err(RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "WAIT answered with a non-integer",
                format!("{other:?}"),
            ))),
        }
    }
}

/// The slot of a key (or channel), as bytes go.
fn slot_of(key: &str) -> u16 {
    slot(key.as_bytes())
}

/// Routing to the primary of `slot`.
fn primary_of(slot: u16) -> RoutingInfo {
    RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(
        slot,
        SlotAddr::Master,
    )))
}

#[async_trait]
impl Store for ClusterStore {
    fn keys_share_one_slot(&self) -> bool {
        true
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.run("GET", slot_of(key), |mut c| async move {
            commands::get(&mut c, key).await
        })
        .await
    }

    async fn get_with_ttl(&self, key: &str) -> Result<Option<Stored>> {
        self.run("GET+PTTL", slot_of(key), |mut c| async move {
            commands::get_with_ttl(&mut c, key).await
        })
        .await
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<()> {
        self.run("SET", slot_of(key), |mut c| async move {
            commands::set(&mut c, key, value, ttl).await
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        self.run("DEL", slot_of(key), |mut c| async move {
            commands::delete(&mut c, key).await
        })
        .await
    }

    async fn set_nx(&self, key: &str, token: &[u8], expiry: Duration) -> Result<bool> {
        let acks = self.cluster.replica_acks;
        self.run("EVALSHA acquire", slot_of(key), |mut c| async move {
            let granted = commands::acquire(&mut c, key, token, expiry).await?;
            let Some((replicas, timeout)) = acks.filter(|_| granted) else {
                return Ok(granted);
            };
            let acked = Self::replica_acks(&mut c, key, replicas, timeout).await?;
            if acked >= replicas {
                return Ok(true);
            }
            tracing::warn!(
                key,
                acked,
                wanted = replicas,
                "too few replicas acknowledged the lock; undone (a failover could lose it)"
            );
            commands::release(&mut c, key, token, None, false).await?;
            Ok(false)
        })
        .await
    }

    async fn release(&self, key: &str, token: &[u8], channel: Option<&str>) -> Result<bool> {
        // `channel` publishes on the key's shard; a classic PUBLISH reaches
        // every node of the cluster.
        self.run("EVALSHA release", slot_of(key), |mut c| async move {
            commands::release(&mut c, key, token, channel, false).await
        })
        .await
    }

    async fn extend(&self, key: &str, token: &[u8], expiry: Duration) -> Result<bool> {
        self.run("EVALSHA extend", slot_of(key), |mut c| async move {
            commands::extend(&mut c, key, token, expiry).await
        })
        .await
    }

    async fn get_or_fence(
        &self,
        key: &str,
        fence_key: &str,
        token: &[u8],
        fence_expiry: Duration,
    ) -> Result<Option<Stored>> {
        self.run("EVALSHA get_or_fence", slot_of(key), |mut c| async move {
            commands::get_or_fence(&mut c, key, fence_key, token, fence_expiry).await
        })
        .await
    }

    async fn set_fenced(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        fence_key: &str,
        token: &[u8],
        publish: Option<Publish<'_>>,
    ) -> Result<bool> {
        let publish = publish.map_or(("", ""), |p| (p.channel, p.payload));
        self.run("EVALSHA set_fenced", slot_of(key), |mut c| async move {
            commands::set_fenced(&mut c, key, value, ttl, fence_key, token, publish).await
        })
        .await
    }

    async fn subscribe(&self, channel: &str) -> Result<mpsc::Receiver<Vec<u8>>> {
        self.subscribe_anywhere(channel).await
    }

    async fn publish(&self, channel: &str, payload: &str) -> Result<()> {
        // On the channel's shard (a cluster delivers it to every node), not
        // a random node that may be the one down.
        let slot = slot_of(channel);
        self.run("PUBLISH", slot, |mut c| async move {
            let mut publish = redis::cmd("PUBLISH");
            publish.arg(channel).arg(payload);
            c.route_command(publish, primary_of(slot)).await.map(drop)
        })
        .await
    }

    async fn claim(
        &self,
        claim: Claim<'_>,
        token: &[u8],
        expiry: Duration,
        owner: &str,
    ) -> Result<Option<Vec<u64>>> {
        let acks = self.cluster.replica_acks;
        let key = claim.names()[0].to_owned();
        let key = key.as_str();
        self.run("EVALSHA claim", slot_of(key), |mut c| async move {
            let granted = commands::claim(&mut c, claim, token, expiry, owner).await?;
            let Some((replicas, timeout)) = acks.filter(|_| granted.is_some()) else {
                return Ok(granted);
            };
            let acked = Self::replica_acks(&mut c, key, replicas, timeout).await?;
            if acked >= replicas {
                return Ok(granted);
            }
            tracing::warn!(
                key,
                acked,
                wanted = replicas,
                "too few replicas acknowledged the claim; undone (a failover could lose it)"
            );
            commands::unclaim(&mut c, claim, token, None, false).await?;
            Ok(None)
        })
        .await
    }

    async fn renew(&self, claim: Claim<'_>, token: &[u8], expiry: Duration) -> Result<bool> {
        self.run(
            "EVALSHA renew",
            slot_of(claim.names()[0]),
            |mut c| async move { commands::renew(&mut c, claim, token, expiry).await },
        )
        .await
    }

    async fn unclaim(&self, claim: Claim<'_>, token: &[u8], channel: Option<&str>) -> Result<bool> {
        self.run(
            "EVALSHA unclaim",
            slot_of(claim.names()[0]),
            |mut c| async move { commands::unclaim(&mut c, claim, token, channel, false).await },
        )
        .await
    }

    async fn raise_fence(&self, claim: Claim<'_>, fences: &[u64]) -> Result<()> {
        self.run(
            "EVALSHA raise_fence",
            slot_of(claim.names()[0]),
            |mut c| async move { commands::raise_fence(&mut c, claim, fences).await },
        )
        .await
    }

    async fn holders(&self, claim: Claim<'_>) -> Result<Holdings> {
        self.run(
            "EVALSHA holders",
            slot_of(claim.names()[0]),
            |mut c| async move { commands::holders(&mut c, claim).await },
        )
        .await
    }

    async fn ping(&self) -> Result<()> {
        // Every group's primary, at once.
        let groups = self.groups().await?;
        let pings = (0..groups.len()).map(|g| {
            let slot = groups.group(g).slot;
            self.run("PING", slot, move |mut c| async move {
                c.route_command(redis::cmd("PING"), primary_of(slot))
                    .await
                    .map(drop)
            })
        });
        futures_util::future::try_join_all(pings).await.map(drop)
    }

    fn server(&self) -> &str {
        &self.server
    }

    // Batched commands: `batch.rs`.

    async fn get_many(&self, keys: &[&str], with_ttl: bool) -> Result<Vec<Option<Stored>>> {
        self.batch_get_many(keys, with_ttl).await
    }

    async fn set_many(&self, writes: &[Write<'_>]) -> Result<()> {
        self.batch_set_many(writes).await
    }

    async fn delete_many(&self, keys: &[&str]) -> Result<()> {
        self.batch_delete_many(keys).await
    }

    async fn claim_loads(
        &self,
        names: &[&str],
        token: &[u8],
        expiry: Duration,
    ) -> Result<Vec<bool>> {
        self.batch_claim_loads(names, token, expiry).await
    }

    async fn claim_loads_fenced(
        &self,
        entries: &[LoadClaim<'_>],
        token: &[u8],
        expiry: Duration,
        fence_expiry: Duration,
    ) -> Result<Vec<Option<Option<Stored>>>> {
        self.batch_claim_loads_fenced(entries, token, expiry, fence_expiry)
            .await
    }

    async fn renew_loads(
        &self,
        keys: &[&str],
        token: &[u8],
        expiry: Duration,
    ) -> Result<Vec<bool>> {
        self.batch_renew_loads(keys, token, expiry).await
    }

    async fn unclaim_loads(
        &self,
        names: &[&str],
        token: &[u8],
        channel: Option<&str>,
    ) -> Result<()> {
        self.batch_unclaim_loads(names, token, channel).await
    }

    async fn get_or_fence_many(
        &self,
        entries: &[(&str, &str)],
        token: &[u8],
        fence_expiry: Duration,
    ) -> Result<Vec<Option<Stored>>> {
        self.batch_get_or_fence_many(entries, token, fence_expiry)
            .await
    }

    async fn set_fenced_many(
        &self,
        writes: &[FencedWrite<'_>],
        token: &[u8],
        channel: Option<&str>,
    ) -> Result<Vec<bool>> {
        self.batch_set_fenced_many(writes, token, channel).await
    }
}
