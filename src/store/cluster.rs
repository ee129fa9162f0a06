//! [`ClusterStore`]: the [`Store`] operations on a Redis Cluster (feature
//! `cluster`), over redis-rs's async cluster connection.
//!
//! One multiplexed connection per node, managed by redis-rs: slots are
//! discovered from the seeds, `MOVED` and `ASK` redirections are followed, and a
//! failed-over shard is found again. Its retries are bounded by the cache's
//! command timeout (redis-rs's defaults retry for much longer). Every key of a
//! cache entry carries the same hash tag (`cache/keys.rs`), so each script runs
//! on one shard; scripts are loaded on every primary when the connection is
//! made, and again on `NOSCRIPT` (a promoted replica).
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
use std::time::Duration;

use async_trait::async_trait;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{RedisError, Value};
use tokio::sync::{OnceCell, mpsc};

use super::many::{self, by_slot, chunked, scatter};
use super::redis::{ConnectionOptions, RedisStore, redact};
use super::slot::slot;
use super::{
    Claim, FencedWrite, Holdings, LoadClaim, Publish, Store, Stored, Write, commands, scripts,
};
use crate::error::{Error, Result};

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

/// A Redis Cluster, reached through one redis-rs cluster connection (one
/// multiplexed connection per node). Cheap to clone.
#[derive(Clone)]
pub struct ClusterStore {
    client: ClusterClient,
    connection: std::sync::Arc<OnceCell<ClusterConnection>>,
    seeds: Vec<String>,
    server: String,
    options: ConnectionOptions,
    cluster: ClusterOptions,
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

impl ClusterStore {
    /// A store for the cluster reachable through `seeds` (one or more node
    /// URLs, `redis://[user:password@]host:port`). Connects lazily, on first
    /// use.
    pub fn open(
        seeds: &[String],
        options: ConnectionOptions,
        cluster: ClusterOptions,
    ) -> Result<ClusterStore> {
        if seeds.is_empty() {
            return Err(Error::InvalidConfig(
                "a cluster needs at least one seed URL".into(),
            ));
        }
        let names: Vec<String> = seeds.iter().map(|s| redact(s)).collect();
        let server = format!("cluster({})", names.join(", "));
        let client = ClusterClientBuilder::new(seeds.iter().map(String::as_str))
            .connection_timeout(options.connect_timeout)
            .response_timeout(options.command_timeout)
            .overall_response_timeout(Some(options.command_timeout))
            .tcp_settings(super::tls::tcp_settings())
            .retries(CLUSTER_RETRIES)
            .min_retry_wait(5)
            .max_retry_wait(options.command_timeout.as_millis().min(200) as u64)
            .build()
            .map_err(|e| Error::InvalidConfig(format!("redis cluster {server}: {e}")))?;
        Ok(ClusterStore {
            client,
            connection: Default::default(),
            seeds: seeds.to_vec(),
            server,
            options,
            cluster,
        })
    }

    fn redis_error(&self, source: RedisError) -> Error {
        Error::Redis {
            server: self.server.clone(),
            source,
        }
    }

    /// The cluster connection, made on first use (slots discovered, scripts
    /// loaded on every primary), within the connect timeout.
    async fn connection(&self) -> Result<ClusterConnection> {
        let connect = async {
            let mut conn = self
                .client
                .get_async_connection()
                .await
                .map_err(|e| self.redis_error(e))?;
            // SCRIPT LOAD goes to every primary; NOSCRIPT still falls back.
            for source in scripts::ALL {
                let _: std::result::Result<String, _> = redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(source)
                    .query_async(&mut conn)
                    .await;
            }
            Ok::<_, Error>(conn)
        };
        let timeout = self.options.connect_timeout + self.options.command_timeout;
        let conn = tokio::time::timeout(timeout, self.connection.get_or_try_init(|| connect))
            .await
            .map_err(|_| Error::PoolTimeout {
                server: self.server.clone(),
                timeout,
            })??;
        Ok(conn.clone())
    }

    /// Runs one command on the cluster connection, bounded by the command
    /// timeout (redis-rs retries within it: redirections, reconnects).
    async fn run<T, F, Fut>(&self, command: &'static str, f: F) -> Result<T>
    where
        F: FnOnce(ClusterConnection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let conn = self.connection().await?;
        // A little over the command timeout: redis-rs's own overall timeout
        // ends it first, with its own error.
        let bound = self.options.command_timeout + Duration::from_millis(50);
        let timed_out = || Error::CommandTimeout {
            command,
            server: self.server.clone(),
            timeout: self.options.command_timeout,
        };
        match tokio::time::timeout(bound, f(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if e.is_timeout() => Err(timed_out()),
            Ok(Err(e)) => Err(self.redis_error(e)),
            Err(_) => Err(timed_out()),
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
        let route = Route::new(slot(key.as_bytes()), SlotAddr::Master);
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
        match conn.route_command(wait, routing).await? {
            Value::Int(n) => Ok(n.max(0) as u32),
            other => Err(RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "WAIT answered with a non-integer",
                format!("{other:?}"),
            ))),
        }
    }

    /// URLs of the nodes of the current topology that are not failing (asked
    /// only when no seed would take the subscription: a seed may be gone after
    /// a failover).
    async fn topology_nodes(&self) -> Vec<String> {
        let Ok(nodes) = self
            .run("CLUSTER NODES", |mut c| async move {
                redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query_async::<String>(&mut c)
                    .await
            })
            .await
        else {
            return Vec::new();
        };
        let scheme_and_auth = self.seeds[0]
            .rsplit_once('@')
            .map(|(head, _)| format!("{head}@"))
            .unwrap_or_else(|| "redis://".to_owned());
        nodes
            .lines()
            .filter(|line| !line.contains("fail"))
            .filter_map(|line| line.split_whitespace().nth(1))
            .map(|addr| addr.split('@').next().unwrap_or(addr))
            .filter(|host_port| !host_port.starts_with(':'))
            .map(|host_port| format!("{scheme_and_auth}{host_port}"))
            .collect()
    }

    /// Subscribes on the first of `urls` that takes it.
    async fn subscribe_on(
        &self,
        urls: &[String],
        channel: &str,
        last: &mut Option<Error>,
    ) -> Option<mpsc::Receiver<Vec<u8>>> {
        for url in urls {
            let subscribed = match RedisStore::open(url, self.options) {
                Ok(node) => node.subscribe(channel).await,
                Err(e) => Err(e),
            };
            match subscribed {
                Ok(messages) => return Some(messages),
                Err(e) => *last = Some(e),
            }
        }
        None
    }
}

#[async_trait]
impl Store for ClusterStore {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.run(
            "GET",
            |mut c| async move { commands::get(&mut c, key).await },
        )
        .await
    }

    async fn get_with_ttl(&self, key: &str) -> Result<Option<Stored>> {
        self.run("GET+PTTL", |mut c| async move {
            commands::get_with_ttl(&mut c, key).await
        })
        .await
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<()> {
        self.run("SET", |mut c| async move {
            commands::set(&mut c, key, value, ttl).await
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        self.run(
            "DEL",
            |mut c| async move { commands::delete(&mut c, key).await },
        )
        .await
    }

    async fn set_nx(&self, key: &str, token: &[u8], expiry: Duration) -> Result<bool> {
        let acks = self.cluster.replica_acks;
        self.run("EVALSHA acquire", |mut c| async move {
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
        self.run("EVALSHA release", |mut c| async move {
            commands::release(&mut c, key, token, channel, false).await
        })
        .await
    }

    async fn extend(&self, key: &str, token: &[u8], expiry: Duration) -> Result<bool> {
        self.run("EVALSHA extend", |mut c| async move {
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
        self.run("EVALSHA get_or_fence", |mut c| async move {
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
        self.run("EVALSHA set_fenced", |mut c| async move {
            commands::set_fenced(&mut c, key, value, ttl, fence_key, token, publish).await
        })
        .await
    }

    async fn subscribe(&self, channel: &str) -> Result<mpsc::Receiver<Vec<u8>>> {
        // The seeds first; the topology (one more command, and one that waits
        // while the cluster fails over) only when none of them answers.
        let mut last = None;
        if let Some(messages) = self.subscribe_on(&self.seeds, channel, &mut last).await {
            return Ok(messages);
        }
        let others: Vec<String> = self
            .topology_nodes()
            .await
            .into_iter()
            .filter(|url| !self.seeds.contains(url))
            .collect();
        if let Some(messages) = self.subscribe_on(&others, channel, &mut last).await {
            return Ok(messages);
        }
        Err(last.unwrap_or_else(|| Error::InvalidConfig("no cluster node to subscribe on".into())))
    }

    async fn publish(&self, channel: &str, payload: &str) -> Result<()> {
        self.run("PUBLISH", |mut c| async move {
            commands::publish(&mut c, channel, payload).await
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
        self.run("EVALSHA claim", |mut c| async move {
            let granted = commands::claim(&mut c, claim, token, expiry, owner).await?;
            let Some((replicas, timeout)) = acks.filter(|_| granted.is_some()) else {
                return Ok(granted);
            };
            let acked = Self::replica_acks(&mut c, &key, replicas, timeout).await?;
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
        self.run("EVALSHA renew", |mut c| async move {
            commands::renew(&mut c, claim, token, expiry).await
        })
        .await
    }

    async fn unclaim(&self, claim: Claim<'_>, token: &[u8], channel: Option<&str>) -> Result<bool> {
        self.run("EVALSHA unclaim", |mut c| async move {
            commands::unclaim(&mut c, claim, token, channel, false).await
        })
        .await
    }

    async fn raise_fence(&self, claim: Claim<'_>, fences: &[u64]) -> Result<()> {
        self.run("EVALSHA raise_fence", |mut c| async move {
            commands::raise_fence(&mut c, claim, fences).await
        })
        .await
    }

    async fn holders(&self, claim: Claim<'_>) -> Result<Holdings> {
        self.run("EVALSHA holders", |mut c| async move {
            commands::holders(&mut c, claim).await
        })
        .await
    }

    async fn ping(&self) -> Result<()> {
        self.run("PING", |mut c| async move { commands::ping(&mut c).await })
            .await
    }

    // Batched commands (`store/many.rs`): one per slot (a script's keys must
    // share one), the slots at once, each chunked.

    async fn get_many(&self, keys: &[&str], with_ttl: bool) -> Result<Vec<Option<Stored>>> {
        let groups = by_slot(keys, |k| k);
        let sends = groups.iter().map(|(_, group)| {
            chunked(
                group,
                |_| 0,
                |chunk| {
                    self.run("MGET", move |mut c| async move {
                        many::get_many(&mut c, chunk, with_ttl).await
                    })
                },
            )
        });
        let answers = futures_util::future::try_join_all(sends).await?;
        Ok(scatter(keys.len(), &groups, answers))
    }

    async fn set_many(&self, writes: &[Write<'_>]) -> Result<()> {
        let groups = by_slot(writes, |w| w.key);
        let sends = groups.iter().map(|(_, group)| {
            chunked(
                group,
                |w| w.value.len(),
                |chunk| {
                    self.run("SET (pipelined)", move |mut c| async move {
                        many::set_many(&mut c, chunk).await
                    })
                },
            )
        });
        futures_util::future::try_join_all(sends).await.map(drop)
    }

    async fn delete_many(&self, keys: &[&str]) -> Result<()> {
        let groups = by_slot(keys, |k| k);
        let sends = groups.iter().map(|(_, group)| {
            chunked(
                group,
                |_| 0,
                |chunk| {
                    self.run("DEL", move |mut c| async move {
                        many::delete_many(&mut c, chunk).await
                    })
                },
            )
        });
        futures_util::future::try_join_all(sends).await.map(drop)
    }

    async fn claim_loads(
        &self,
        names: &[&str],
        token: &[u8],
        expiry: Duration,
    ) -> Result<Vec<bool>> {
        let acks = self.cluster.replica_acks;
        let groups = by_slot(names, |k| k);
        let sends = groups.iter().map(|(_, group)| {
            chunked(
                group,
                |_| 0,
                |chunk| {
                    self.run("EVALSHA claim_loads", move |mut c| async move {
                        let granted = many::claim_loads(&mut c, chunk, token, expiry).await?;
                        let Some((replicas, timeout)) = acks.filter(|_| granted.contains(&true))
                        else {
                            return Ok(granted);
                        };
                        // As `claim`: too few replicas have the grants, undo them.
                        let acked = Self::replica_acks(
                            &mut c,
                            chunk.first().copied().unwrap_or_default(),
                            replicas,
                            timeout,
                        )
                        .await?;
                        if acked >= replicas {
                            return Ok(granted);
                        }
                        many::unclaim_loads(&mut c, chunk, token, None).await?;
                        Ok(vec![false; chunk.len()])
                    })
                },
            )
        });
        let answers = futures_util::future::try_join_all(sends).await?;
        Ok(scatter(names.len(), &groups, answers))
    }

    async fn claim_loads_fenced(
        &self,
        entries: &[LoadClaim<'_>],
        token: &[u8],
        expiry: Duration,
        fence_expiry: Duration,
    ) -> Result<Vec<Option<Option<Stored>>>> {
        if self.cluster.replica_acks.is_some() {
            // The replicas' acknowledgement comes between the two.
            let locks: Vec<&str> = entries.iter().map(|e| e.lock).collect();
            let granted = self.claim_loads(&locks, token, expiry).await?;
            let held: Vec<(&str, &str)> = entries
                .iter()
                .zip(&granted)
                .filter(|(_, g)| **g)
                .map(|(e, _)| (e.value, e.fence))
                .collect();
            let mut found = self
                .get_or_fence_many(&held, token, fence_expiry)
                .await?
                .into_iter();
            return Ok(granted
                .into_iter()
                .map(|g| {
                    if g {
                        Some(found.next().flatten())
                    } else {
                        None
                    }
                })
                .collect());
        }
        let groups = by_slot(entries, |e| e.lock);
        let sends = groups.iter().map(|(_, group)| {
            chunked(
                group,
                |_| 0,
                |chunk| {
                    self.run("EVALSHA claim_loads_fenced", move |mut c| async move {
                        many::claim_loads_fenced(&mut c, chunk, token, expiry, fence_expiry).await
                    })
                },
            )
        });
        let answers = futures_util::future::try_join_all(sends).await?;
        Ok(scatter(entries.len(), &groups, answers))
    }

    async fn renew_loads(
        &self,
        keys: &[&str],
        token: &[u8],
        expiry: Duration,
    ) -> Result<Vec<bool>> {
        let groups = by_slot(keys, |k| k);
        let sends = groups.iter().map(|(_, group)| {
            chunked(
                group,
                |_| 0,
                |chunk| {
                    self.run("EVALSHA renew_loads", move |mut c| async move {
                        many::renew_loads(&mut c, chunk, token, expiry).await
                    })
                },
            )
        });
        let answers = futures_util::future::try_join_all(sends).await?;
        Ok(scatter(keys.len(), &groups, answers))
    }

    async fn unclaim_loads(
        &self,
        names: &[&str],
        token: &[u8],
        channel: Option<&str>,
    ) -> Result<()> {
        let groups = by_slot(names, |k| k);
        let sends = groups.iter().map(|(_, group)| {
            chunked(
                group,
                |_| 0,
                |chunk| {
                    self.run("EVALSHA unclaim_loads", move |mut c| async move {
                        many::unclaim_loads(&mut c, chunk, token, channel).await
                    })
                },
            )
        });
        futures_util::future::try_join_all(sends).await.map(drop)
    }

    async fn get_or_fence_many(
        &self,
        entries: &[(&str, &str)],
        token: &[u8],
        fence_expiry: Duration,
    ) -> Result<Vec<Option<Stored>>> {
        let groups = by_slot(entries, |e| e.0);
        let sends = groups.iter().map(|(_, group)| {
            chunked(
                group,
                |_| 0,
                |chunk| {
                    self.run("EVALSHA get_or_fence_many", move |mut c| async move {
                        many::get_or_fence_many(&mut c, chunk, token, fence_expiry).await
                    })
                },
            )
        });
        let answers = futures_util::future::try_join_all(sends).await?;
        Ok(scatter(entries.len(), &groups, answers))
    }

    async fn set_fenced_many(
        &self,
        writes: &[FencedWrite<'_>],
        token: &[u8],
        channel: Option<&str>,
    ) -> Result<Vec<bool>> {
        let groups = by_slot(writes, |w| w.key);
        let sends = groups.iter().map(|(_, group)| {
            chunked(
                group,
                |w| w.value.len(),
                |chunk| {
                    self.run("EVALSHA set_fenced_many", move |mut c| async move {
                        many::set_fenced_many(&mut c, chunk, token, channel).await
                    })
                },
            )
        });
        let answers = futures_util::future::try_join_all(sends).await?;
        Ok(scatter(writes.len(), &groups, answers))
    }

    fn server(&self) -> &str {
        &self.server
    }
}
