//! [`Builder`]: every option of a [`LockedCache`], with its default.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bb8_redis::RedisConnectionManager;

use super::{CallOptions, DebugConfig, Inner, LockedCache, keys};
use crate::codec::{BincodeCodec, Codec};
use crate::defaults::*;
use crate::error::{Error, Result};
use crate::lock::{LockOptions, Redlock};
use crate::stats::Stats;
use crate::store::auth::{CredentialSource, Provider};
use crate::store::redis::{ConnectionOptions, redact};
use crate::store::tls::{Pem, TlsOptions};
use crate::store::{MemoryStore, RedisStore, SharedStore};
use crate::telemetry::Telemetry;

/// The longest TTL accepted, by the builder and by `set_with_ttl`: 10 years.
pub(super) const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// What a miss does when the Redlock majority cannot be reached (too many
/// masters down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum QuorumLossPolicy {
    /// Fail the call with [`Error::QuorumNotReached`] once the wait time is spent.
    /// The default: with the lock unavailable, loading anyway could stampede the
    /// backend the cache exists to protect.
    #[default]
    FailClosed,
    /// Run the loader without the lock (still one load per key per process, by
    /// in-process coalescing). Availability over protection: each process may
    /// load once. The store is still fenced: the load takes the key's fence
    /// before it starts, so a `set`/`invalidate` or a lock holder that comes
    /// after it wins over its write. Only a majority of masters really
    /// unreachable (connections refused or dropped, or no answer within the
    /// command timeout) counts as a lost quorum: a master that answers with an
    /// error reply (`OOM`, `NOPERM`) is up, and the call fails with that error.
    FailOpen,
}

/// A master given to the builder.
enum Master {
    Url(String),
    Pool(String, bb8::Pool<RedisConnectionManager>),
    Store(SharedStore),
    #[cfg(feature = "cluster")]
    Cluster(Vec<String>),
    /// The master's group name and the Sentinels' URLs.
    #[cfg(feature = "sentinel")]
    Sentinel(String, Vec<String>),
}

impl fmt::Debug for Master {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Master::Url(url) => write!(f, "Url({})", redact(url)),
            Master::Pool(url, _) => write!(f, "Pool({})", redact(url)),
            Master::Store(store) => write!(f, "Store({})", store.server()),
            #[cfg(feature = "sentinel")]
            Master::Sentinel(name, urls) => {
                let urls: Vec<String> = urls.iter().map(|s| redact(s)).collect();
                write!(f, "Sentinel({name}: {})", urls.join(", "))
            }
            #[cfg(feature = "cluster")]
            Master::Cluster(seeds) => {
                let seeds: Vec<String> = seeds.iter().map(|s| redact(s)).collect();
                write!(f, "Cluster({})", seeds.join(", "))
            }
        }
    }
}

/// Builds a [`LockedCache`]. Every setter documents its default; all defaults are
/// the `DEFAULT_*` constants of this crate. [`build`](Builder::build) validates
/// and returns [`Error::InvalidConfig`] rather than panicking.
#[derive(Debug)]
pub struct Builder<C = BincodeCodec> {
    masters: Vec<Master>,
    cache_url: Option<String>,
    tls: TlsOptions,
    credentials: Option<Provider>,
    ttl: Duration,
    call_options: CallOptions,
    lock: LockOptions,
    key_prefix: String,
    pool_size: u32,
    connect_timeout: Duration,
    command_timeout: Duration,
    max_value_size: usize,
    max_key_len: usize,
    coalesce: bool,
    quorum_loss: QuorumLossPolicy,
    name: String,
    #[cfg(feature = "cluster")]
    cluster: crate::store::ClusterOptions,
    /// Near cache: size in bytes (`None`: off) and entry TTL.
    near_cache: Option<u64>,
    near_cache_ttl: Duration,
    tags: TagOptions,
    codec: C,
}

/// Tags and clear: on or off, how long a version read is trusted, how long
/// versions (and tagged entries) live.
#[derive(Debug, Clone, Copy)]
struct TagOptions {
    on: bool,
    refresh: Duration,
    ttl: Duration,
}

impl Default for Builder<BincodeCodec> {
    fn default() -> Self {
        Builder {
            masters: Vec::new(),
            cache_url: None,
            tls: TlsOptions::default(),
            credentials: None,
            ttl: DEFAULT_TTL,
            call_options: CallOptions::new(),
            // The cache's loads: a shorter expiry than the lock toolkit's (a
            // holder that died costs under a second; see DEFAULT_LOCK_EXPIRY).
            lock: LockOptions {
                expiry: DEFAULT_LOCK_EXPIRY,
                ..LockOptions::default()
            },
            key_prefix: DEFAULT_KEY_PREFIX.to_owned(),
            pool_size: DEFAULT_POOL_SIZE,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            max_value_size: DEFAULT_MAX_VALUE_SIZE,
            max_key_len: DEFAULT_MAX_KEY_LEN,
            coalesce: true,
            quorum_loss: QuorumLossPolicy::FailClosed,
            name: DEFAULT_CACHE_NAME.to_owned(),
            #[cfg(feature = "cluster")]
            cluster: Default::default(),
            near_cache: None,
            near_cache_ttl: DEFAULT_NEAR_CACHE_TTL,
            tags: TagOptions {
                on: DEFAULT_TAGS,
                refresh: DEFAULT_TAG_REFRESH,
                ttl: DEFAULT_TAG_TTL,
            },
            codec: BincodeCodec,
        }
    }
}

impl<C: Codec> Builder<C> {
    /// Adds a Redis master by URL (`redis://[user:password@]host:port[/db]`). Call
    /// once per master: one master is plain locking; 3 or 5 independent masters
    /// make a Redlock that survives the loss of a minority. Values live on the
    /// first master unless [`cache_url`](Builder::cache_url) is set.
    /// Defaults to none, which means the embedded in-memory store: no Redis,
    /// and protection within this process only.
    pub fn redis(mut self, url: impl Into<String>) -> Self {
        self.masters.push(Master::Url(url.into()));
        self
    }

    /// Adds several masters by URL; see [`redis`](Builder::redis).
    pub fn masters<I, S>(mut self, urls: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.masters
            .extend(urls.into_iter().map(|u| Master::Url(u.into())));
        self
    }

    /// Adds a master through a bb8-redis pool you already have. `url` names the
    /// same server and is used for the wake-up subscription. The pool keeps its
    /// own settings: bb8-redis PINGs on every checkout by default (a round trip
    /// per command, but it is also what replaces connections after a Redis
    /// restart: bb8-redis never marks a connection broken, so keep it on), and its
    /// connections' response timeout (redis-rs default 500 ms) bounds each
    /// command instead of [`command_timeout`](Builder::command_timeout).
    pub fn redis_pool(
        mut self,
        url: impl Into<String>,
        pool: bb8::Pool<RedisConnectionManager>,
    ) -> Self {
        self.masters.push(Master::Pool(url.into(), pool));
        self
    }

    /// Adds a master as any [`Store`](crate::Store), e.g. a [`MemoryStore`] shared
    /// by several caches in one process, or your own wrapper.
    pub fn store(mut self, store: SharedStore) -> Self {
        self.masters.push(Master::Store(store));
        self
    }

    /// Adds the master of the Sentinel-monitored group `master_name` as one
    /// master (feature `sentinel`), found through `sentinel_urls`
    /// (`redis://host:26379`, with the Sentinels' own user and password if
    /// they need one) whenever a connection is made. After a failover the
    /// cache moves over as its connections fail: a dead master's connections
    /// die, a demoted one's writes answer `READONLY`, a hung one's time out;
    /// each is replaced by a connection to the master the Sentinels name
    /// then, and so are the wake-up subscriptions. The master's login (if it
    /// has `requirepass` or ACL users) comes from
    /// [`credentials_provider`](Builder::credentials_provider) (feature
    /// `credentials`; a fixed password is
    /// `RotatingCredentials::new("default", password)`). Counts as **one**
    /// Redlock master; what a failover does to the lock is in the guide's
    /// deployments chapter. Defaults to none.
    #[cfg(feature = "sentinel")]
    pub fn sentinel<I, S>(mut self, master_name: impl Into<String>, sentinel_urls: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.masters.push(Master::Sentinel(
            master_name.into(),
            sentinel_urls.into_iter().map(Into::into).collect(),
        ));
        self
    }

    /// Adds a Redis Cluster as one master (feature `cluster`), reached through
    /// `seeds` (one or more node URLs; the rest of the topology is discovered).
    /// Values and locks live on the shard of each key: the cache's keys carry
    /// a hash tag, so an entry's value, lock and fence share one slot. A
    /// cluster counts as **one** Redlock master: its failover is the cluster's
    /// business (see [`cluster_replica_acks`](Builder::cluster_replica_acks));
    /// add independent servers or clusters with further calls for a Redlock
    /// across them. Defaults to none.
    #[cfg(feature = "cluster")]
    pub fn cluster<I, S>(mut self, seeds: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.masters
            .push(Master::Cluster(seeds.into_iter().map(Into::into).collect()));
        self
    }

    /// On a cluster, wait after each lock acquisition until `replicas` replicas
    /// of the key's shard acknowledge it (`WAIT`), for at most `timeout`; with
    /// fewer, the acquisition is undone and retried. Defaults to no wait.
    /// Waiting keeps a lock through a failover that happens right after it
    /// was granted (without it, a promoted replica may not have the lock, and
    /// a second holder can load too; the fence still keeps the older holder
    /// from overwriting the newer value). It costs a round trip per
    /// acquisition, and locks are unavailable while a shard has fewer live
    /// replicas than `replicas`.
    #[cfg(feature = "cluster")]
    pub fn cluster_replica_acks(mut self, replicas: u32, timeout: Duration) -> Self {
        self.cluster.replica_acks = Some((replicas, timeout));
        self
    }

    /// Keeps values on this server instead of the first master. Defaults to the
    /// first master. A dedicated server separates cache memory from lock traffic;
    /// it is not part of the lock majority.
    pub fn cache_url(mut self, url: impl Into<String>) -> Self {
        self.cache_url = Some(url.into());
        self
    }

    /// Trusts the CA certificate(s) in `pem` (PEM bytes, one or more
    /// certificates) for the `rediss://` servers this builder opens: every lock
    /// master and the [`cache_url`](Builder::cache_url) server. Defaults to none:
    /// with the `tls` feature, server certificates are checked against Mozilla's
    /// roots compiled into the binary (webpki-roots), which managed services'
    /// public certificates chain to. A CA given here *replaces* those roots
    /// (only it is trusted): use it for a private CA or self-signed servers.
    /// Host names are always checked. Needs the `tls` feature and `rediss://`
    /// URLs; otherwise [`build`](Builder::build) fails with
    /// [`Error::InvalidConfig`]. Malformed PEM fails there too; a server
    /// whose certificate the CA did not sign fails on use with an error for
    /// which [`Error::is_tls_error`] is true.
    pub fn tls_root_ca(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls.root_ca = Some(Pem::Bytes(pem.into()));
        self
    }

    /// [`tls_root_ca`](Builder::tls_root_ca) from a PEM file, read once by
    /// [`build`](Builder::build) (an unreadable file is
    /// [`Error::InvalidConfig`] naming it). Defaults to none.
    pub fn tls_root_ca_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.tls.root_ca = Some(Pem::File(path.into()));
        self
    }

    /// Presents this client certificate (PEM chain) and private key (PEM,
    /// PKCS#8, PKCS#1 or SEC1) to every `rediss://` server this builder opens,
    /// for servers that require client authentication (mTLS, Redis's
    /// `tls-auth-clients yes`). Defaults to none: no client certificate, which
    /// such a server refuses (an error for which [`Error::is_tls_error`] or
    /// [`Error::is_connection_error`] is true, on first use). Authentication by
    /// certificate is in addition to, not instead of, an ACL user and password
    /// in the URL. Needs the `tls` feature and `rediss://` URLs; otherwise
    /// [`build`](Builder::build) fails with [`Error::InvalidConfig`]. The key
    /// never appears in `Debug` output.
    pub fn tls_client_cert(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.tls.client_cert = Some((Pem::Bytes(cert_pem.into()), Pem::Bytes(key_pem.into())));
        self
    }

    /// [`tls_client_cert`](Builder::tls_client_cert) from PEM files, read once by
    /// [`build`](Builder::build). Defaults to none.
    pub fn tls_client_cert_files(
        mut self,
        cert_path: impl Into<std::path::PathBuf>,
        key_path: impl Into<std::path::PathBuf>,
    ) -> Self {
        self.tls.client_cert = Some((Pem::File(cert_path.into()), Pem::File(key_path.into())));
        self
    }

    /// Authenticates every connection the cache opens with `provider`'s latest
    /// credentials (feature `credentials`): the pooled connections to every
    /// master and to the [`cache_url`](Self::cache_url) server, the cluster's
    /// node connections, and the pub/sub connections of wake-ups and near-cache
    /// invalidations. Live pooled and cluster connections re-authenticate
    /// (`AUTH`) when new credentials arrive; the others use the new ones when
    /// they reconnect. Use [`RotatingCredentials`](crate::RotatingCredentials)
    /// to rotate by hand, or any redis-rs
    /// [`StreamingCredentialsProvider`](crate::StreamingCredentialsProvider)
    /// (redis-rs's Entra ID provider for Azure). Credentials in the URLs are
    /// replaced. Defaults to none: the URLs' credentials.
    ///
    /// A provider that fails: connections opened before go on with the last
    /// good credentials; a connection opened with none fails with an error for
    /// which [`Error::is_auth_error`] is true; the next good credentials
    /// recover without a rebuild. Not with [`redis_pool`](Self::redis_pool)
    /// (a bb8-redis pool takes no provider): [`build`](Self::build) refuses it
    /// with [`Error::InvalidConfig`]. What is re-authenticated, and what is
    /// not, is in the guide's deployments chapter.
    #[cfg(feature = "credentials")]
    pub fn credentials_provider(
        mut self,
        provider: impl crate::StreamingCredentialsProvider + 'static,
    ) -> Self {
        self.credentials = Some(Provider(Arc::new(provider)));
        self
    }

    /// How long a stored value lives (is fresh). Defaults to [`DEFAULT_TTL`]
    /// (60 s). Longer: fewer loads, staler values. Must be at least 1 ms. A
    /// call can set its own ([`CallOptions::ttl`]).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The cache's [`CallOptions`]: stale window (stale-while-revalidate and
    /// fail-safe), early refresh, negative TTL, TTL jitter, soft and hard
    /// timeouts, detached loads. Every call uses them, and a call through
    /// [`LockedCache::with`] overrides the ones it sets. A TTL set here
    /// overrides [`ttl`](Self::ttl). Defaults to [`CallOptions::new`]: every
    /// option at its library default (no stale window, no early refresh, see
    /// each option).
    pub fn call_options(mut self, options: CallOptions) -> Self {
        self.call_options = options;
        self
    }

    /// How long a lock lives unless extended. Defaults to [`DEFAULT_LOCK_EXPIRY`]
    /// (800 ms: a holder that died costs the others under a second). The lock
    /// is extended every third of this while the loader runs, so long loads
    /// are safe; this bounds how long a crashed holder blocks a key. Shorter:
    /// faster recovery from crashes, more extension commands, and less
    /// tolerance for pauses of the holder (GC, swap, CPU starvation) before
    /// the lock is lost (the paused holder's write is then fenced out, and
    /// the key loaded a second time). Longer: the reverse.
    pub fn lock_expiry(mut self, expiry: Duration) -> Self {
        self.lock.expiry = expiry;
        self
    }

    /// How long a call waits for someone else's load (the lock held by another
    /// process, or an in-process leader still loading) before failing with
    /// [`Error::LockTimeout`]. Defaults to [`DEFAULT_WAIT`] (10 s). Keep it above
    /// the lock expiry so that waiters outlive a crashed holder (`build()` logs a
    /// warning otherwise). Shorter: callers fail sooner when a load is slow; zero:
    /// a miss that finds the lock held fails at once.
    pub fn wait_time(mut self, wait: Duration) -> Self {
        self.lock.wait = wait;
        self
    }

    /// Pause between lock attempts, randomised ±50%. Defaults to [`DEFAULT_RETRY`]
    /// (100 ms). With wake-ups on, waiters are woken the moment the lock is
    /// released, and this only bounds the delay when a wake-up is lost. Shorter:
    /// lower worst case, more commands per waiting process.
    pub fn retry_time(mut self, retry: Duration) -> Self {
        self.lock.retry = retry;
        self
    }

    /// The Redlock per-master timeout: once a majority of the masters has
    /// answered a lock attempt without deciding it (split votes), the attempt
    /// waits at most this long for the others, so a stalled minority master
    /// (no answer, no refusal) costs a contended attempt this, not the command
    /// timeout; a master known to be unreachable is not waited for at all.
    /// Defaults to [`DEFAULT_MASTER_TIMEOUT`] (50 ms), capped at a quarter of
    /// the lock expiry. Shorter: less lost per contended attempt while a master
    /// stalls; too short for masters that answer at very different speeds:
    /// more split votes (retried, never failed).
    pub fn master_timeout(mut self, timeout: Duration) -> Self {
        self.lock.master_timeout = timeout;
        self
    }

    /// Wake waiters by pub/sub when a lock is released. Defaults to `true`. Off:
    /// no subscription connection, and waiters notice a stored value only at
    /// their next retry (polling).
    pub fn wake_ups(mut self, on: bool) -> Self {
        self.lock.wake_ups = on;
        self
    }

    /// The pub/sub channel for lock releases. Defaults to [`DEFAULT_CHANNEL`].
    /// Every process sharing the cache must use the same one.
    pub fn release_channel(mut self, channel: impl Into<String>) -> Self {
        self.lock.channel = channel.into();
        self
    }

    /// Coalesce concurrent `get_or_load` calls for one key within this process
    /// into one flight (one Redis read, one lock, one load). Defaults to `true`.
    /// Off: every call reads Redis and competes for the lock on its own (only
    /// useful to measure what coalescing saves).
    pub fn coalesce(mut self, on: bool) -> Self {
        self.coalesce = on;
        self
    }

    /// What a miss does when the lock majority cannot be reached. Defaults to
    /// [`QuorumLossPolicy::FailClosed`].
    pub fn quorum_loss(mut self, policy: QuorumLossPolicy) -> Self {
        self.quorum_loss = policy;
        self
    }

    /// Prefix of every value key: the value of `k` lives at `<prefix>{k}`, its
    /// lock at `lock.<prefix>{k}` and its fence at `fence.<prefix>{k}` (the
    /// braces are a Redis Cluster hash tag: an entry's keys share a slot).
    /// Defaults to [`DEFAULT_KEY_PREFIX`] (`lc:`). Use one
    /// per application or data version to keep their keys apart. Must not start
    /// with `lock.` or `fence.`.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// Connections per Redis server, at most. Defaults to [`DEFAULT_POOL_SIZE`]
    /// (4). Commands share one multiplexed connection (many in flight at once,
    /// pipelined) until it fails; the pool then hands out the next one, so the
    /// size bounds the connections opened while replacing dead ones rather than
    /// the concurrency. A pool given with [`redis_pool`](Self::redis_pool) is
    /// used as it is (a checkout per command).
    pub fn pool_size(mut self, size: u32) -> Self {
        self.pool_size = size;
        self
    }

    /// Bound on opening a connection or waiting for one from the pool. Defaults
    /// to [`DEFAULT_CONNECT_TIMEOUT`] (1 s). Shorter: faster failure while Redis
    /// is down; too short fails on a slow network.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Bound on each Redis command's answer (the response timeout of the
    /// connections the cache opens; a pool given with
    /// [`redis_pool`](Builder::redis_pool) keeps its own). Defaults to
    /// [`DEFAULT_COMMAND_TIMEOUT`] (1 s). Shorter: faster failure on a stalled
    /// server; too short fails on large values or a slow network.
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// Largest encoded value stored. Defaults to [`DEFAULT_MAX_VALUE_SIZE`]
    /// (16 MiB). A larger value fails with [`Error::ValueTooLarge`] and is not
    /// stored: huge values block Redis for every other client.
    pub fn max_value_size(mut self, bytes: usize) -> Self {
        self.max_value_size = bytes;
        self
    }

    /// Longest key accepted, in bytes, prefix not counted. Defaults to
    /// [`DEFAULT_MAX_KEY_LEN`] (1024). Longer keys fail with [`Error::InvalidKey`].
    pub fn max_key_len(mut self, bytes: usize) -> Self {
        self.max_key_len = bytes;
        self
    }

    /// The cache's name in telemetry: the `cache` label of every metric (feature
    /// `metrics`) and the `locked_cache.name` field of its spans. Defaults to
    /// [`DEFAULT_CACHE_NAME`] (`default`). Give each cache of a process its own
    /// (`users`, `reports`): a few fixed names, never anything per key or per
    /// request, since every name is a label value of every metric series.
    /// 1 to 64 characters.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Turns on the near cache (feature `near-cache`): decoded values kept in
    /// this process, up to `max_bytes` (each weighed by its encoded size plus
    /// its key), so that a hot hit of
    /// [`get_or_load_shared`](LockedCache::get_or_load_shared) or
    /// [`get_shared`](LockedCache::get_shared) costs no round trip and no
    /// decode. Defaults to off.
    ///
    /// Every `set`, `invalidate` and stored load of any cache with the same key
    /// prefix publishes an invalidation that every process applies (one
    /// `PUBLISH` more per write); a value another process replaced stays
    /// visible here until the message arrives (about a millisecond on a LAN),
    /// or, if it is lost, at most the [near cache TTL](Builder::near_cache_ttl).
    /// While the invalidation subscription is down the near cache is bypassed,
    /// and it is cleared when the subscription comes back. Bigger holds more
    /// hot keys and costs that much memory.
    #[cfg(feature = "near-cache")]
    pub fn near_cache(mut self, max_bytes: u64) -> Self {
        self.near_cache = Some(max_bytes);
        self
    }

    /// Longest a value stays in the near cache (feature `near-cache`), and so
    /// the longest a process may serve a replaced value when an invalidation
    /// message is lost; an entry never outlives the value's remaining time in
    /// Redis either. Defaults to [`DEFAULT_NEAR_CACHE_TTL`] (1 s). Longer saves
    /// round trips on hot keys (one per key per TTL per process); shorter
    /// bounds staleness tighter. 1 ms to 1 h.
    #[cfg(feature = "near-cache")]
    pub fn near_cache_ttl(mut self, ttl: Duration) -> Self {
        self.near_cache_ttl = ttl;
        self
    }

    /// Turns on tags ([`CallOptions::tag`], [`LockedCache::invalidate_tag`])
    /// and [`LockedCache::clear`]. Defaults to [`DEFAULT_TAGS`] (off). Every
    /// process of a cache must turn it on (one that does not ignores the
    /// invalidations). On: each read compares the stored entry's marks with
    /// the current tag versions and generation, which this process keeps and
    /// refetches once older than [`tag_refresh`](Builder::tag_refresh) (a
    /// `GET` per tag in use and one for the generation, per second per
    /// process by default), and a value with tags or stored after a `clear`
    /// carries 9 + 16 bytes per tag more. Off: `invalidate_tag`, `clear` and
    /// tagged calls are [`Error::InvalidConfig`].
    pub fn tags(mut self, on: bool) -> Self {
        self.tags.on = on;
        self
    }

    /// How long a process trusts a tag version or generation it read: a
    /// process that missed an invalidation message (no near cache, or its
    /// subscription down) serves an invalidated entry for at most this long.
    /// With the near cache on and subscribed, invalidations are seen at once.
    /// Defaults to [`DEFAULT_TAG_REFRESH`] (1 s). Shorter: a tighter bound,
    /// more `GET`s of versions. 1 ms to 1 h.
    pub fn tag_refresh(mut self, refresh: Duration) -> Self {
        self.tags.refresh = refresh;
        self
    }

    /// How long a tag version lives after its last invalidation, and the
    /// longest a tagged entry (or one stored after a `clear`) lives in Redis,
    /// so that no entry outlives the version that invalidated it. Defaults to
    /// [`DEFAULT_TAG_TTL`] (7 days). Longer keeps one small key per
    /// invalidated tag for longer. 1 s to 10 years.
    pub fn tag_ttl(mut self, ttl: Duration) -> Self {
        self.tags.ttl = ttl;
        self
    }

    /// The codec for values. Defaults to [`BincodeCodec`].
    pub fn codec<C2: Codec>(self, codec: C2) -> Builder<C2> {
        Builder {
            masters: self.masters,
            cache_url: self.cache_url,
            tls: self.tls,
            credentials: self.credentials,
            ttl: self.ttl,
            call_options: self.call_options,
            lock: self.lock,
            key_prefix: self.key_prefix,
            pool_size: self.pool_size,
            connect_timeout: self.connect_timeout,
            command_timeout: self.command_timeout,
            max_value_size: self.max_value_size,
            max_key_len: self.max_key_len,
            coalesce: self.coalesce,
            quorum_loss: self.quorum_loss,
            name: self.name,
            #[cfg(feature = "cluster")]
            cluster: self.cluster,
            near_cache: self.near_cache,
            near_cache_ttl: self.near_cache_ttl,
            tags: self.tags,
            codec,
        }
    }

    fn validate(&self) -> Result<()> {
        let invalid = |m: String| Err(Error::InvalidConfig(m));
        if self.ttl < Duration::from_millis(1) {
            return invalid("ttl must be at least 1 ms".into());
        }
        if self.ttl > MAX_TTL {
            return invalid("ttl must be at most 10 years".into());
        }
        self.call_options.resolve(self.ttl)?;
        if self.pool_size == 0 {
            return invalid("pool size must be at least 1".into());
        }
        let hour = Duration::from_secs(3600);
        if self.connect_timeout.is_zero()
            || self.command_timeout.is_zero()
            || self.connect_timeout > hour
            || self.command_timeout > hour
        {
            return invalid("timeouts must be positive and at most 1 h".into());
        }
        if self.near_cache_ttl < Duration::from_millis(1)
            || self.near_cache_ttl > Duration::from_secs(3600)
        {
            return invalid("the near cache TTL must be 1 ms to 1 h".into());
        }
        if self.tags.refresh < Duration::from_millis(1)
            || self.tags.refresh > Duration::from_secs(3600)
        {
            return invalid("the tag refresh must be 1 ms to 1 h".into());
        }
        if self.tags.ttl < Duration::from_secs(1) || self.tags.ttl > MAX_TTL {
            return invalid("the tag TTL must be 1 s to 10 years".into());
        }
        if !self.tags.on && !self.call_options.resolve(self.ttl)?.tags.is_empty() {
            return invalid("tagged call options need Builder::tags(true)".into());
        }
        if self.near_cache == Some(0) {
            return invalid("the near cache size must be positive".into());
        }
        if self.name.is_empty() || self.name.len() > 64 {
            return invalid("the cache name must be 1 to 64 bytes".into());
        }
        if self.max_value_size == 0 || self.max_key_len == 0 {
            return invalid("maximum value size and key length must be positive".into());
        }
        let mut urls: Vec<&str> = self
            .masters
            .iter()
            .filter_map(|m| match m {
                Master::Url(url) | Master::Pool(url, _) => Some(url.as_str()),
                Master::Store(_) => None,
                #[cfg(feature = "cluster")]
                Master::Cluster(_) => None,
                #[cfg(feature = "sentinel")]
                Master::Sentinel(..) => None,
            })
            .collect();
        urls.sort_unstable();
        if let Some(twice) = urls.windows(2).find(|w| w[0] == w[1]) {
            // The same server twice would count its vote twice (and every lock
            // attempt would refuse itself): masters must be independent.
            return invalid(format!("master {} is given twice", redact(twice[0])));
        }
        self.lock.validate()?;
        keys::check_prefix(&self.key_prefix)
    }

    /// Validates the options, opens the pools (lazily: an unreachable Redis shows
    /// up on first use, not here), starts the wake-up subscriptions (waiting up to
    /// the connect timeout for them), and returns the cache.
    pub async fn build(self) -> Result<LockedCache<C>> {
        self.validate()?;
        let options = ConnectionOptions {
            pool_size: self.pool_size,
            connect_timeout: self.connect_timeout,
            command_timeout: self.command_timeout,
        };
        let tls = self.tls.resolve()?;
        if self.credentials.is_some() && self.masters.iter().any(|m| matches!(m, Master::Pool(..)))
        {
            return Err(Error::InvalidConfig(
                "a credentials provider cannot reach a bb8-redis pool's connections (it passes no \
                 connection config): give the master's URL instead of its pool"
                    .into(),
            ));
        }
        let credentials = self.credentials.as_ref().map(CredentialSource::start);
        let masters = if self.masters.is_empty() {
            vec![Arc::new(MemoryStore::new()) as SharedStore]
        } else {
            self.masters
                .into_iter()
                .map(|m| -> Result<SharedStore> {
                    Ok(match m {
                        Master::Url(url) => Arc::new(RedisStore::open_with(
                            &url,
                            options,
                            &tls,
                            credentials.clone(),
                        )?),
                        Master::Pool(url, pool) => Arc::new(
                            RedisStore::open_with_tls(&url, options, &tls)?.with_pool(pool),
                        ),
                        Master::Store(store) => store,
                        #[cfg(feature = "sentinel")]
                        Master::Sentinel(name, urls) => Arc::new(RedisStore::open_sentinel(
                            &name,
                            &urls,
                            redis::RedisConnectionInfo::default(),
                            options,
                            credentials.clone(),
                        )?),
                        #[cfg(feature = "cluster")]
                        Master::Cluster(seeds) => Arc::new(crate::store::ClusterStore::open_with(
                            &seeds,
                            options,
                            self.cluster,
                            credentials.clone(),
                        )?),
                    })
                })
                .collect::<Result<Vec<_>>>()?
        };
        if masters.len() > 1 && masters.len() % 2 == 0 {
            tracing::warn!(
                masters = masters.len(),
                "an even number of masters tolerates no more failures than one fewer; use 3 or 5"
            );
        }
        if self.lock.wait <= self.lock.expiry {
            tracing::warn!(
                wait = ?self.lock.wait,
                expiry = ?self.lock.expiry,
                "wait time not above the lock expiry: waiters give up before a crashed holder's lock expires"
            );
        }
        let value_store = match &self.cache_url {
            Some(url) => Arc::new(RedisStore::open_with(
                url,
                options,
                &tls,
                credentials.clone(),
            )?) as SharedStore,
            None => Arc::clone(&masters[0]),
        };
        #[cfg(feature = "metrics")]
        let stats = Arc::new(Stats::with_metrics(&self.name));
        #[cfg(not(feature = "metrics"))]
        let stats = Arc::new(Stats::default());
        let config = DebugConfig {
            masters: masters.iter().map(|m| m.server().to_owned()).collect(),
            pool_size: self.pool_size,
            connect_timeout: self.connect_timeout,
        };
        let db_system = if config.masters.iter().all(|m| m == "memory") {
            "memory"
        } else {
            "redis"
        };
        let lock =
            Redlock::with_stats(masters, self.lock, Arc::clone(&stats), self.connect_timeout)
                .await?;
        #[cfg(feature = "near-cache")]
        let near = match self.near_cache {
            Some(max_bytes) => {
                let near = super::local::Near::start(
                    max_bytes,
                    self.near_cache_ttl.min(self.ttl),
                    &self.key_prefix,
                    Arc::clone(&value_store),
                    Arc::clone(&stats),
                );
                // Like the lock's wake-ups: subscribed before the first call,
                // unless the server is down (then the near cache stays off
                // until the listener gets through).
                near.ready(self.connect_timeout).await;
                Some(near)
            }
            None => None,
        };
        // The known tag versions are distrusted whenever the near cache clears
        // (a message that names no key, such as a tag invalidation, or a lost
        // subscription).
        #[cfg(feature = "near-cache")]
        let clears = near.as_ref().map(|n| n.local.clears());
        #[cfg(not(feature = "near-cache"))]
        let clears: Option<Arc<std::sync::atomic::AtomicU64>> = None;
        let tags = self.tags.on.then(|| {
            Arc::new(super::tags::Known::new(
                self.tags.refresh,
                clears.unwrap_or_default(),
            ))
        });
        let inner = Arc::new(Inner {
            #[cfg(feature = "near-cache")]
            near,
            tags,
            tag_ttl: self.tags.ttl,
            value_store,
            lock,
            ttl: self.ttl,
            call_options: self.call_options,
            defaults: self.call_options.resolve(self.ttl)?,
            key_prefix: self.key_prefix,
            max_value_size: self.max_value_size,
            max_key_len: self.max_key_len,
            command_timeout: self.command_timeout,
            coalesce: self.coalesce,
            quorum_loss: self.quorum_loss,
            separate_value_server: self.cache_url.is_some(),
            codec: self.codec,
            flights: Default::default(),
            refreshing: Default::default(),
            stats,
            telemetry: Telemetry::new(self.name, db_system),
            config,
        });
        #[cfg(feature = "metrics")]
        sample_subscriptions(Arc::downgrade(&inner));
        Ok(LockedCache { inner })
    }
}

impl Default for ConnectionOptions {
    fn default() -> Self {
        ConnectionOptions {
            pool_size: DEFAULT_POOL_SIZE,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
        }
    }
}

/// Keeps the subscribed-masters gauge current: sets it every second until the
/// cache is dropped.
#[cfg(feature = "metrics")]
fn sample_subscriptions<C: Codec>(cache: std::sync::Weak<Inner<C>>) {
    tokio::spawn(async move {
        while let Some(inner) = cache.upgrade() {
            inner
                .telemetry
                .subscribed_masters(inner.lock.subscriptions());
            drop(inner);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}
