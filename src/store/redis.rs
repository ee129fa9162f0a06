//! [`RedisStore`]: the [`Store`] operations as Redis commands and Lua scripts.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use bb8_redis::RedisConnectionManager;
use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::{RedisError, ToSingleRedisArg};
use tokio::sync::mpsc;

use super::auth::CredentialSource;
use super::endpoint::Endpoint;
use super::many::{self, chunked};
use super::pool::{Connection, Health, Pool};
use super::tls::{self, TlsOptions};
use super::{Claim, FencedWrite, Holdings, LoadClaim, Publish, Store, Stored, Write, commands};
use crate::error::{Error, Result};

/// How often an idle wake-up subscription is checked with a PING.
const SUBSCRIPTION_PING_EVERY: Duration = Duration::from_secs(10);

/// Settings of the connections to one Redis server.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionOptions {
    /// Connections in the pool (each one multiplexed).
    pub pool_size: u32,
    /// Bound on opening a connection, and on waiting for one from the pool.
    pub connect_timeout: Duration,
    /// Bound on each command's answer.
    pub command_timeout: Duration,
}

/// One Redis server, reached through a bb8 pool of multiplexed connections.
///
/// Cheap to clone. Its `Debug` output and error messages name the server with
/// the password redacted.
#[derive(Clone)]
pub struct RedisStore {
    /// Where connections go: the URL's server, or the Sentinels' master.
    endpoint: Endpoint,
    pool: Pool,
    server: String,
    options: ConnectionOptions,
    /// For the pub/sub connections opened with rotating credentials (see
    /// `auth.rs`): the TLS settings the client was built with, and the source.
    #[cfg_attr(not(feature = "credentials"), allow(dead_code))]
    tls: TlsOptions,
    credentials: Option<CredentialSource>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("server", &self.server)
            .field("options", &self.options)
            .finish()
    }
}

/// A pool of at least one connection, timeouts from 1 ns to 1 h.
fn check_options(options: &ConnectionOptions) -> Result<()> {
    if options.pool_size == 0 {
        return Err(Error::InvalidConfig("pool size must be at least 1".into()));
    }
    let hour = Duration::from_secs(3600);
    if options.connect_timeout.is_zero()
        || options.command_timeout.is_zero()
        || options.connect_timeout > hour
        || options.command_timeout > hour
    {
        return Err(Error::InvalidConfig(
            "timeouts must be positive and at most 1 h".into(),
        ));
    }
    Ok(())
}

impl RedisStore {
    /// A store for the server at `url` (`redis://[user:password@]host:port[/db]`),
    /// with a pool of its own that does not PING on checkout. Connects lazily:
    /// an unreachable server shows up as errors on use, not here.
    ///
    /// A `rediss://` URL needs the `tls` feature (without it: [`Error::InvalidConfig`]
    /// naming the feature); the server certificate is then checked against the
    /// built-in roots. For a custom CA or a client certificate, use the builder's
    /// [`tls_root_ca`](crate::Builder::tls_root_ca) and
    /// [`tls_client_cert`](crate::Builder::tls_client_cert).
    pub fn open(url: &str, options: ConnectionOptions) -> Result<RedisStore> {
        RedisStore::open_with_tls(url, options, &TlsOptions::default())
    }

    /// [`open`](RedisStore::open) with TLS certificates (see `tls.rs`).
    pub(crate) fn open_with_tls(
        url: &str,
        options: ConnectionOptions,
        tls: &TlsOptions,
    ) -> Result<RedisStore> {
        RedisStore::open_with(url, options, tls, None)
    }

    /// [`open`](RedisStore::open) with TLS certificates and, when given,
    /// rotating credentials for every connection it opens (see `auth.rs`).
    pub(crate) fn open_with(
        url: &str,
        options: ConnectionOptions,
        tls: &TlsOptions,
        credentials: Option<CredentialSource>,
    ) -> Result<RedisStore> {
        let server = redact(url);
        check_options(&options)?;
        // The one client for the pool and the wake-up subscription alike.
        let client = tls::client(url, &server, tls)?;
        RedisStore::on(Endpoint::Fixed(client), server, options, tls, credentials)
    }

    /// A store on the master of the Sentinel group `name` (feature
    /// `sentinel`), found through `sentinel_urls` whenever a connection is
    /// made (see `sentinel.rs`). `node` holds the master's login (user,
    /// password, db); rotating credentials replace it.
    #[cfg(feature = "sentinel")]
    pub(crate) fn open_sentinel(
        name: &str,
        sentinel_urls: &[String],
        node: redis::RedisConnectionInfo,
        options: ConnectionOptions,
        credentials: Option<CredentialSource>,
    ) -> Result<RedisStore> {
        check_options(&options)?;
        let names: Vec<String> = sentinel_urls.iter().map(|u| redact(u)).collect();
        let server = format!("sentinel {name} ({})", names.join(", "));
        let master =
            super::sentinel::SentinelMaster::new(name, sentinel_urls, node, credentials.clone())?;
        RedisStore::on(
            Endpoint::Sentinel(std::sync::Arc::new(master)),
            server,
            options,
            &TlsOptions::default(),
            credentials,
        )
    }

    fn on(
        endpoint: Endpoint,
        server: String,
        options: ConnectionOptions,
        tls: &TlsOptions,
        credentials: Option<CredentialSource>,
    ) -> Result<RedisStore> {
        let pool = Pool::own(
            endpoint.clone(),
            server.clone(),
            options.pool_size,
            options.connect_timeout,
            options.command_timeout,
            credentials.clone(),
        );
        Ok(RedisStore {
            endpoint,
            pool,
            server,
            options,
            tls: tls.clone(),
            credentials,
        })
    }

    /// A store over a bb8-redis pool you already have. `url` names the same server;
    /// it is used for the pub/sub connection (a pool connection cannot subscribe).
    /// The pool's own settings (such as PING on checkout) are kept.
    pub fn from_pool(
        url: &str,
        pool: bb8::Pool<RedisConnectionManager>,
        options: ConnectionOptions,
    ) -> Result<RedisStore> {
        Ok(RedisStore::open(url, options)?.with_pool(pool))
    }

    /// This store with its commands sent on `pool` (a user's bb8-redis pool).
    pub(crate) fn with_pool(mut self, pool: bb8::Pool<RedisConnectionManager>) -> RedisStore {
        self.pool = Pool::User(pool);
        self
    }

    fn redis_error(&self, source: RedisError) -> Error {
        Error::Redis {
            server: self.server.clone(),
            source,
        }
    }

    async fn connection(&self) -> Result<Connection<'_>> {
        self.pool.get().await.map_err(|e| match e {
            Some(e) => self.redis_error(e),
            None => Error::PoolTimeout {
                server: self.server.clone(),
                timeout: self.options.connect_timeout,
            },
        })
    }

    /// Runs one command (or script) on a pooled connection, bounded by the
    /// command timeout; a connection that failed is retired from the pool.
    ///
    /// A command that fails because its connection was dead (closed by the
    /// server's idle `timeout`, a restart, `CLIENT KILL`, a proxy dropping idle
    /// flows) is re-sent on a fresh connection, up to [`SENDS`] times in all:
    /// when the server is up, no call fails because a pooled connection died.
    /// The dead connection's idle siblings are retired with it (see `pool.rs`),
    /// so the re-send does not take the next dead one. A dead connection may
    /// have carried the command before it died, so every command here answers
    /// the same when sent twice (see `scripts.rs`); `f` is told whether this is
    /// a re-send. A command that timed out is not re-sent: the server is
    /// stalled, and the call fails within its timeout.
    async fn run<T, F, Fut>(&self, command: &'static str, f: F) -> Result<T>
    where
        F: Fn(MultiplexedConnection, bool) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        self.run_after(0, command, f).await
    }

    /// [`run`](Self::run), after `sent` sends that failed on dead connections.
    async fn run_after<T, F, Fut>(&self, sent: u32, command: &'static str, f: F) -> Result<T>
    where
        F: Fn(MultiplexedConnection, bool) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let mut sends = sent;
        loop {
            sends += 1;
            let connection = match self.pool.current() {
                Some(connection) => connection,
                // Boxed: a checkout's future is large, and rarely needed.
                None => Box::pin(self.connection()).await?,
            };
            let (conn, health) = connection.split();
            // Bounded by the connection's own response timeout: the command
            // timeout on our pool's connections, the pool's setting on a user's.
            match f(conn, sends > 1).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    if let Some(error) = self.failed(command, e, &health, sends) {
                        return Err(error);
                    }
                }
            }
        }
    }

    /// A send of `command` that failed with `e` on the connection `health`
    /// watches (the `sends`th send): the error to return, or `None` when the
    /// connection was dead and the command may be re-sent on a fresh one.
    fn failed(
        &self,
        command: &'static str,
        e: RedisError,
        health: &Health<'_>,
        sends: u32,
    ) -> Option<Error> {
        if e.is_timeout() {
            health.note_error(&e);
            return Some(Error::CommandTimeout {
                command,
                server: self.server.clone(),
                timeout: self.options.command_timeout,
            });
        }
        let dead = health.note_error(&e);
        if dead && sends < SENDS {
            tracing::debug!(server = self.server, command, error = %e, "connection was dead; re-sending on a fresh one");
            return None;
        }
        Some(self.redis_error(e))
    }
}

/// Sends of one command at most: the first, and re-sends after dead
/// connections (a fresh connection can die too, e.g. under `CLIENT KILL` loops).
const SENDS: u32 = 3;

/// A key a hit's `GET` is built from in the connection's command buffer:
/// its length in bytes, known before it is written.
pub(crate) trait KeyArg: ToSingleRedisArg + Copy + Send + Sync {
    /// Bytes the key takes in the command, or a little more.
    fn len(&self) -> usize;
}

impl KeyArg for &str {
    fn len(&self) -> usize {
        str::len(self)
    }
}

/// The longest key whose `GET` is built in a connection's command buffer.
const KEPT_KEY: usize = 4096;

impl RedisStore {
    /// `GET`: [`Store::get`], callable without a boxed future, and with a
    /// key that writes itself into the command (no `String` built for it).
    pub(crate) async fn read<K: KeyArg>(&self, key: K) -> Result<Option<Vec<u8>>> {
        self.read_on(
            "GET",
            async |conn, command| {
                command.clear();
                command.arg("GET").arg(key);
                let reply = commands::send(conn, command).await;
                // `Cmd::clear` keeps the buffer's allocation, and the
                // connection keeps the buffer: not one grown by a long key.
                if key.len() > KEPT_KEY {
                    *command = redis::Cmd::new();
                }
                reply
            },
            |mut c, _| async move { commands::get(&mut c, key).await },
        )
        .await
    }

    /// `MGET` (with `PTTL`s): [`Store::get_many`] with keys that write
    /// themselves into the command (no `String` built for each).
    pub(crate) async fn read_many<K: KeyArg>(
        &self,
        keys: &[K],
        with_ttl: bool,
    ) -> Result<Vec<Option<Stored>>> {
        super::many::chunked(
            keys,
            |_| 0,
            |chunk| {
                self.run("MGET", move |mut c, _| async move {
                    super::many::get_many(&mut c, chunk, with_ttl).await
                })
            },
        )
        .await
    }

    /// `GET` + `PTTL`: [`Store::get_with_ttl`], as [`read`](Self::read)
    /// sends `GET`.
    pub(crate) async fn read_with_ttl<K: ToSingleRedisArg + Copy + Send + Sync>(
        &self,
        key: K,
    ) -> Result<Option<Stored>> {
        self.read_on(
            "GET+PTTL",
            async |conn, _| commands::send_get_with_ttl(conn, key).await,
            |mut c, _| async move { commands::get_with_ttl(&mut c, key).await },
        )
        .await
    }

    /// A hit's read: its first send (`first`) spelled out on the current
    /// connection, with the connection's command buffer to build it in (a
    /// `GET` built in a fresh `Cmd` cost a hit 220 instructions of
    /// allocating and freeing), and the connection given back after a
    /// success; anything else (no current connection, a dead one) goes on
    /// through `run`'s loop (`again`), boxed. (Through `run` and its
    /// closure, a hit cost 600 more instructions.)
    async fn read_on<T, F, Fut>(
        &self,
        command: &'static str,
        first: impl AsyncFnOnce(&mut MultiplexedConnection, &mut redis::Cmd) -> Result<T, RedisError>,
        again: F,
    ) -> Result<T>
    where
        F: Fn(MultiplexedConnection, bool) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let mut sent = 0;
        if let Some(mut connection) = self.pool.current() {
            let lent = &mut *connection.lent;
            match first(&mut lent.conn, &mut lent.command).await {
                Ok(value) => {
                    connection.give_back();
                    return Ok(value);
                }
                Err(e) => match self.failed(command, e, connection.health(), 1) {
                    Some(error) => return Err(error),
                    None => sent = 1,
                },
            }
        }
        Box::pin(self.run_after(sent, command, again)).await
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.read(key).await
    }

    fn as_redis(&self) -> Option<&RedisStore> {
        Some(self)
    }

    async fn get_with_ttl(&self, key: &str) -> Result<Option<Stored>> {
        self.read_with_ttl(key).await
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<()> {
        self.run("SET", |mut c, _| async move {
            commands::set(&mut c, key, value, ttl).await
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        self.run("DEL", |mut c, _| async move {
            commands::delete(&mut c, key).await
        })
        .await
    }

    async fn set_nx(&self, key: &str, token: &[u8], expiry: Duration) -> Result<bool> {
        self.run("EVALSHA acquire", |mut c, _| async move {
            commands::acquire(&mut c, key, token, expiry).await
        })
        .await
    }

    async fn release(&self, key: &str, token: &[u8], channel: Option<&str>) -> Result<bool> {
        self.run("EVALSHA release", |mut c, resent| async move {
            commands::release(&mut c, key, token, channel, resent).await
        })
        .await
    }

    async fn extend(&self, key: &str, token: &[u8], expiry: Duration) -> Result<bool> {
        self.run("EVALSHA extend", |mut c, _| async move {
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
        self.run("EVALSHA get_or_fence", |mut c, _| async move {
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
        self.run("EVALSHA set_fenced", |mut c, _| async move {
            commands::set_fenced(&mut c, key, value, ttl, fence_key, token, publish).await
        })
        .await
    }

    async fn subscribe(&self, channel: &str) -> Result<mpsc::Receiver<Vec<u8>>> {
        let timeout = self.options.connect_timeout;
        let timed_out = || Error::CommandTimeout {
            command: "SUBSCRIBE",
            server: self.server.clone(),
            timeout,
        };
        // Bounded by `timeout` itself (asking the Sentinels; a fixed
        // endpoint answers at once).
        let client = self
            .endpoint
            .client(timeout)
            .await
            .map_err(|e| self.redis_error(e))?;
        let client = match &self.credentials {
            None => client,
            // redis-rs does not authenticate a pub/sub connection from a
            // provider: it gets the latest credentials in its connection info.
            #[cfg(feature = "credentials")]
            Some(source) => {
                let info = source
                    .apply(client.get_connection_info(), timeout)
                    .await
                    .map_err(|e| self.redis_error(e))?;
                tls::client_for(info, &self.server, &self.tls)?
            }
            #[cfg(not(feature = "credentials"))]
            Some(source) => match *source {},
        };
        let mut pubsub = tokio::time::timeout(timeout, client.get_async_pubsub())
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| self.redis_error(e))?;
        tokio::time::timeout(timeout, pubsub.subscribe(channel))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| self.redis_error(e))?;
        let (tx, rx) = mpsc::channel(1024);
        let ping_timeout = self.options.command_timeout;
        // On a Sentinel endpoint, a failover ends the subscription: the
        // listener subscribes again, on the new master.
        let mut switches = self.endpoint.switches();
        tokio::spawn(async move {
            let (mut sink, mut messages) = pubsub.split();
            // A connection dropped silently (a NAT or firewall forgetting it) would
            // leave the subscription dead but looking alive: PING it now and then
            // and end the subscription when it does not answer, so the listener
            // reconnects and wakes every waiter.
            let mut health = tokio::time::interval(SUBSCRIPTION_PING_EVERY);
            health.tick().await;
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    Some(()) = async {
                        match switches.as_mut() {
                            Some(s) => s.changed().await.ok(),
                            None => std::future::pending().await,
                        }
                    } => return,
                    _ = health.tick() => {
                        let pong = tokio::time::timeout(ping_timeout, sink.ping::<redis::Value>()).await;
                        if !matches!(pong, Ok(Ok(_))) {
                            return;
                        }
                    }
                    message = messages.next() => match message {
                        Some(m) => {
                            if tx.send(m.get_payload_bytes().to_vec()).await.is_err() {
                                return;
                            }
                        }
                        None => return,
                    },
                }
            }
        });
        Ok(rx)
    }

    async fn claim(
        &self,
        claim: Claim<'_>,
        token: &[u8],
        expiry: Duration,
        owner: &str,
    ) -> Result<Option<Vec<u64>>> {
        self.run("EVALSHA claim", |mut c, _| async move {
            commands::claim(&mut c, claim, token, expiry, owner).await
        })
        .await
    }

    async fn renew(&self, claim: Claim<'_>, token: &[u8], expiry: Duration) -> Result<bool> {
        self.run("EVALSHA renew", |mut c, _| async move {
            commands::renew(&mut c, claim, token, expiry).await
        })
        .await
    }

    async fn unclaim(&self, claim: Claim<'_>, token: &[u8], channel: Option<&str>) -> Result<bool> {
        self.run("EVALSHA unclaim", |mut c, resent| async move {
            commands::unclaim(&mut c, claim, token, channel, resent).await
        })
        .await
    }

    async fn raise_fence(&self, claim: Claim<'_>, fences: &[u64]) -> Result<()> {
        self.run("EVALSHA raise_fence", |mut c, _| async move {
            commands::raise_fence(&mut c, claim, fences).await
        })
        .await
    }

    async fn holders(&self, claim: Claim<'_>) -> Result<Holdings> {
        self.run("EVALSHA holders", |mut c, _| async move {
            commands::holders(&mut c, claim).await
        })
        .await
    }

    async fn get_many(&self, keys: &[&str], with_ttl: bool) -> Result<Vec<Option<Stored>>> {
        chunked(
            keys,
            |_| 0,
            |chunk| {
                self.run("MGET", move |mut c, _| async move {
                    many::get_many(&mut c, chunk, with_ttl).await
                })
            },
        )
        .await
    }

    async fn set_many(&self, writes: &[Write<'_>]) -> Result<()> {
        chunked(
            writes,
            |w| w.value.len(),
            |chunk| {
                self.run("SET (pipelined)", move |mut c, _| async move {
                    many::set_many(&mut c, chunk).await
                })
            },
        )
        .await
        .map(drop)
    }

    async fn delete_many(&self, keys: &[&str]) -> Result<()> {
        chunked(
            keys,
            |_| 0,
            |chunk| {
                self.run("DEL", move |mut c, _| async move {
                    many::delete_many(&mut c, chunk).await
                })
            },
        )
        .await
        .map(drop)
    }

    async fn claim_loads(
        &self,
        names: &[&str],
        token: &[u8],
        expiry: Duration,
    ) -> Result<Vec<bool>> {
        chunked(
            names,
            |_| 0,
            |chunk| {
                self.run("EVALSHA claim_loads", move |mut c, _| async move {
                    many::claim_loads(&mut c, chunk, token, expiry).await
                })
            },
        )
        .await
    }

    async fn claim_loads_fenced(
        &self,
        entries: &[LoadClaim<'_>],
        token: &[u8],
        expiry: Duration,
        fence_expiry: Duration,
    ) -> Result<Vec<Option<Option<Stored>>>> {
        chunked(
            entries,
            |_| 0,
            |chunk| {
                self.run("EVALSHA claim_loads_fenced", move |mut c, _| async move {
                    many::claim_loads_fenced(&mut c, chunk, token, expiry, fence_expiry).await
                })
            },
        )
        .await
    }

    async fn renew_loads(
        &self,
        keys: &[&str],
        token: &[u8],
        expiry: Duration,
    ) -> Result<Vec<bool>> {
        chunked(
            keys,
            |_| 0,
            |chunk| {
                self.run("EVALSHA renew_loads", move |mut c, _| async move {
                    many::renew_loads(&mut c, chunk, token, expiry).await
                })
            },
        )
        .await
    }

    async fn unclaim_loads(
        &self,
        names: &[&str],
        token: &[u8],
        channel: Option<&str>,
    ) -> Result<()> {
        chunked(
            names,
            |_| 0,
            |chunk| {
                self.run("EVALSHA unclaim_loads", move |mut c, _| async move {
                    many::unclaim_loads(&mut c, chunk, token, channel).await
                })
            },
        )
        .await
        .map(drop)
    }

    async fn get_or_fence_many(
        &self,
        entries: &[(&str, &str)],
        token: &[u8],
        fence_expiry: Duration,
    ) -> Result<Vec<Option<Stored>>> {
        chunked(
            entries,
            |_| 0,
            |chunk| {
                self.run("EVALSHA get_or_fence_many", move |mut c, _| async move {
                    many::get_or_fence_many(&mut c, chunk, token, fence_expiry).await
                })
            },
        )
        .await
    }

    async fn set_fenced_many(
        &self,
        writes: &[FencedWrite<'_>],
        token: &[u8],
        channel: Option<&str>,
    ) -> Result<Vec<bool>> {
        chunked(
            writes,
            |w| w.value.len(),
            |chunk| {
                self.run("EVALSHA set_fenced_many", move |mut c, _| async move {
                    many::set_fenced_many(&mut c, chunk, token, channel).await
                })
            },
        )
        .await
    }

    async fn ping(&self) -> Result<()> {
        self.run(
            "PING",
            |mut c, _| async move { commands::ping(&mut c).await },
        )
        .await
    }

    async fn publish(&self, channel: &str, payload: &str) -> Result<()> {
        self.run("PUBLISH", |mut c, _| async move {
            commands::publish(&mut c, channel, payload).await
        })
        .await
    }

    fn server(&self) -> &str {
        &self.server
    }
}

/// `url` with any password replaced by `***`, for logs and errors. Errs on the
/// side of hiding: everything between the scheme and the last `@` is user
/// information, whether or not the URL is well formed (no scheme, a `/` in the
/// password, `redis:/` with one slash...); a user name before a `:` is kept.
pub fn redact(url: &str) -> String {
    let url = redact_query_password(url);
    let Some(at) = url.rfind('@') else {
        return url;
    };
    let start = url[..at]
        .find("://")
        .map(|i| i + 3)
        .or_else(|| url[..at].find(":/").map(|i| i + 2))
        .unwrap_or(0);
    let userinfo = &url[start..at];
    let hidden = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_owned(),
    };
    format!("{}{hidden}{}", &url[..start], &url[at..])
}

/// Masks `pass=` / `password=` query parameters (`redis+unix:///s?pass=x`).
fn redact_query_password(url: &str) -> String {
    let Some(query_start) = url.find('?') else {
        return url.to_owned();
    };
    let params: Vec<String> = url[query_start + 1..]
        .split('&')
        .map(|param| match param.split_once('=') {
            Some((name, _)) if name == "pass" || name == "password" => format!("{name}=***"),
            _ => param.to_owned(),
        })
        .collect();
    format!("{}?{}", &url[..query_start], params.join("&"))
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("redis://:s3cret@host:6379/0"),
            "redis://:***@host:6379/0"
        );
        assert_eq!(
            redact("redis://user:s3cret@host:6379"),
            "redis://user:***@host:6379"
        );
        assert_eq!(redact("rediss://token@host"), "rediss://***@host");
        assert_eq!(redact("redis://host:6379"), "redis://host:6379");
        assert_eq!(redact("not a url"), "not a url");
        // Malformed URLs hide the secret too.
        assert_eq!(
            redact("user:s3cret@127.0.0.1:6379"),
            "user:***@127.0.0.1:6379"
        );
        assert_eq!(redact("redis:/:s3cret@h:1"), "redis:/:***@h:1");
        assert_eq!(redact("redis://:pa/ss@h:1"), "redis://:***@h:1");
        assert_eq!(redact("redis://:p@ss@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(
            redact("redis+unix:///tmp/r.sock?db=1&pass=s3cret"),
            "redis+unix:///tmp/r.sock?db=1&pass=***"
        );
    }
}
