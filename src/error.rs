//! The library's own failures ([`Error`]), the codec's ([`CodecError`]), and the
//! error `get_or_load` returns ([`LoadError`]), which keeps the caller's loader
//! error as its own type.

use std::sync::Arc;
use std::time::Duration;

/// A failure of locked-cache itself (Redis, the lock, the codec, the configuration).
///
/// Cloneable, so that one failure can be handed to every caller waiting on the
/// same load. Use the predicates ([`is_timeout`](Error::is_timeout),
/// [`is_connection_error`](Error::is_connection_error), ...) to decide on retries
/// rather than matching variants: new variants may be added.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The lock stayed held by someone else for the whole wait time.
    #[error("timed out after {waited:?} waiting for lock `{resource}`")]
    LockTimeout {
        /// The lock key.
        resource: String,
        /// How long the caller waited.
        waited: Duration,
    },
    /// Too few Redlock masters answered to reach a majority within the wait time.
    #[error(
        "lock `{resource}`: quorum not reached ({reachable} of {masters} masters reachable, {quorum} needed)"
    )]
    QuorumNotReached {
        /// The lock key.
        resource: String,
        /// Masters that answered the last attempt (granted or refused).
        reachable: usize,
        /// Masters configured.
        masters: usize,
        /// Majority needed.
        quorum: usize,
    },
    /// Redis answered with an error, or the connection to it failed.
    #[error("redis {server}: {source}")]
    Redis {
        /// The server (password redacted).
        server: String,
        /// What redis-rs reported.
        #[source]
        source: redis::RedisError,
    },
    /// No connection could be had from the pool within the connect timeout.
    #[error("no connection to {server} within {timeout:?}")]
    PoolTimeout {
        /// The server (password redacted).
        server: String,
        /// The configured connect timeout.
        timeout: Duration,
    },
    /// A Redis command did not answer within the command timeout.
    #[error("redis command {command} on {server} timed out after {timeout:?}")]
    CommandTimeout {
        /// The command, e.g. `GET`.
        command: &'static str,
        /// The server (password redacted).
        server: String,
        /// The configured command timeout.
        timeout: Duration,
    },
    /// The value could not be encoded or decoded.
    #[error("codec: {0}")]
    Codec(#[from] CodecError),
    /// The encoded value is larger than the configured maximum, so it was not stored.
    #[error("value for `{key}` is {size} bytes, over the maximum of {max}")]
    ValueTooLarge {
        /// The cache key.
        key: String,
        /// Encoded size in bytes.
        size: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The key is empty, too long, or collides with the library's internal key space.
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// The builder was given a configuration that cannot work.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A custom [`Store`](crate::Store) failed (build it with [`Error::store`]).
    #[error("store: {0}")]
    Store(Arc<dyn std::error::Error + Send + Sync>),
    /// The call's hard timeout ([`CallOptions::hard_timeout`](crate::CallOptions::hard_timeout))
    /// passed before the loader returned, and no usable stale value was at
    /// hand. A detached load goes on in the background and still stores its
    /// value.
    #[error("loading `{key}` took longer than the hard timeout of {timeout:?}")]
    LoadTimeout {
        /// The cache key (without the prefix).
        key: String,
        /// The hard timeout.
        timeout: std::time::Duration,
    },
    /// A background task the call depended on (the one sending a lock command
    /// to a master) ended without an answer: the tokio runtime is shutting down.
    #[error("a background task ended without an answer (runtime shutting down)")]
    Abandoned,
}

impl Error {
    /// Wraps the error of a custom [`Store`](crate::Store) implementation.
    pub fn store(error: impl std::error::Error + Send + Sync + 'static) -> Error {
        Error::Store(Arc::new(error))
    }

    /// True when the failure is a timeout: lock wait, pool checkout, a command
    /// or the call's hard timeout.
    pub fn is_timeout(&self) -> bool {
        match self {
            Error::LockTimeout { .. }
            | Error::PoolTimeout { .. }
            | Error::CommandTimeout { .. }
            | Error::LoadTimeout { .. } => true,
            Error::Redis { source, .. } => source.is_timeout(),
            _ => false,
        }
    }

    /// True when Redis could not be reached or the connection dropped: worth a
    /// retry once the server is back.
    pub fn is_connection_error(&self) -> bool {
        match self {
            Error::PoolTimeout { .. } | Error::CommandTimeout { .. } => true,
            Error::Redis { source: e, .. } => {
                e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal()
            }
            _ => false,
        }
    }

    /// True when the TLS handshake with a server failed, or the server ended the
    /// session with a TLS alert: a certificate not signed by the trusted CA, a
    /// host name the certificate does not name, a client certificate missing or
    /// refused (feature `tls`). A retry will not help until the certificates
    /// change. Always false without the `tls` feature.
    pub fn is_tls_error(&self) -> bool {
        matches!(self, Error::Redis { source, .. } if crate::store::tls::is_tls_failure(source))
    }

    /// True when a Redis server answered with an error reply (`OOM` under
    /// `maxmemory`, `NOPERM` for an ACL user, `READONLY` on a replica,
    /// `WRONGTYPE`...): the server is up and refused the command, so a retry
    /// will not help until its configuration or memory changes. Never counted as
    /// an unreachable master.
    pub fn is_error_reply(&self) -> bool {
        matches!(self, Error::Redis { source, .. } if source.code().is_some())
    }

    /// True when a server refused to authenticate the connection (a wrong or
    /// revoked password, an expired token: `WRONGPASS`, `NOAUTH`), or a
    /// credentials provider ([`Builder::credentials_provider`](crate::Builder),
    /// feature `credentials`) had no credentials to give. A retry helps once
    /// the credentials are right; with a provider, the next good credentials
    /// it gives are used without a rebuild.
    pub fn is_auth_error(&self) -> bool {
        match self {
            Error::Redis { source, .. } => {
                source.kind() == redis::ErrorKind::AuthenticationFailed
                    || matches!(source.code(), Some("NOAUTH" | "WRONGPASS"))
            }
            _ => false,
        }
    }

    /// The Redis error code of an error reply (`"OOM"`, `"NOPERM"`...).
    pub fn redis_code(&self) -> Option<&str> {
        match self {
            Error::Redis { source, .. } => source.code(),
            _ => None,
        }
    }

    /// True when the Redlock majority could not be reached.
    pub fn is_quorum_error(&self) -> bool {
        matches!(self, Error::QuorumNotReached { .. })
    }

    /// True for errors caused by the caller's input or configuration, which a
    /// retry will not fix.
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            Error::InvalidKey(_) | Error::InvalidConfig(_) | Error::ValueTooLarge { .. }
        )
    }
}

/// Why stored bytes could not be turned back into a value, or a value into bytes.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CodecError {
    /// The bytes do not start with the locked-cache header: written by someone else.
    #[error("foreign bytes: no locked-cache header")]
    ForeignBytes,
    /// The header names a format version this build does not read.
    #[error("unsupported format version {0}")]
    UnsupportedVersion(u8),
    /// The bytes were written by another codec.
    #[error("written by codec {found:?}, this cache uses {expected:?}")]
    WrongCodec {
        /// Codec id in the header.
        found: u8,
        /// Codec id of this cache's codec.
        expected: u8,
    },
    /// The payload could not be decoded (truncated, or a value of another type).
    #[error("decode failed: {0}")]
    Decode(String),
    /// The value could not be encoded.
    #[error("encode failed: {0}")]
    Encode(String),
}

/// The error of [`LockedCache::get_or_load`](crate::LockedCache::get_or_load): either
/// the caller's own loader error, or a failure of the cache.
///
/// The loader error is behind an [`Arc`] because one load serves every concurrent
/// caller of the same key in this process: they all receive the same error.
/// [`loader_error`](LoadError::loader_error) borrows it (to `match` it),
/// [`try_into_loader_error`](LoadError::try_into_loader_error) takes it out by
/// value when no other caller still holds it, and
/// [`into_loader_error`](LoadError::into_loader_error) hands over the `Arc`.
///
/// # As a [`std::error::Error`]
///
/// `LoadError<E>` is an error whenever `E` is `Debug + Display`, so `?` works
/// in a handler returning `anyhow::Result`, `eyre::Result`,
/// `Result<_, Box<dyn Error + Send + Sync>>` or an enum of your own with
/// `#[from] LoadError<MyError>`, whatever the loader returns (an
/// `anyhow::Error` too, which is not itself a `std::error::Error`).
///
/// It follows the Rust convention of showing a cause *or* returning it from
/// [`source`](std::error::Error::source), never both, so a reporter (anyhow's
/// `{:#}`, `tracing`'s `error = &e as &dyn Error`) prints each message once:
///
/// - `Loader` **shows** the loader's message: `the loader failed: <message>`
///   (the loader error formatted with `{:#}`, so an `anyhow`/`eyre` loader
///   error prints its whole chain) and has no `source()`. `format!("{e}")`,
///   `%e` in `tracing` and `anyhow!("{e}")` all say why.
/// - `Cache` is transparent: it displays as the [`Error`] and its `source()`
///   is the error's own (the `redis::RedisError` of [`Error::Redis`]).
///
/// ```
/// use std::sync::Arc;
/// use locked_cache::LoadError;
///
/// #[derive(Debug, thiserror::Error)]
/// enum DbError {
///     #[error("user {0} not found")]
///     NotFound(u64),
///     #[error("database unavailable")]
///     Down,
/// }
///
/// let e: LoadError<DbError> = LoadError::Loader(Arc::new(DbError::NotFound(42)));
/// assert_eq!(e.to_string(), "the loader failed: user 42 not found");
/// match e.loader_error() {
///     Some(DbError::NotFound(id)) => assert_eq!(*id, 42),
///     Some(DbError::Down) => unreachable!(),
///     None => unreachable!("the cache failed: {e}"),
/// }
/// // After `?` into `anyhow::Error`, the same through `downcast_ref`:
/// // `err.downcast_ref::<LoadError<DbError>>().and_then(LoadError::loader_error)`.
/// ```
///
/// A loader error type without `Display` (and so without `?` into an error
/// reporter) does not convert:
///
/// ```compile_fail
/// # async fn demo(cache: locked_cache::LockedCache) -> Result<(), Box<dyn std::error::Error>> {
/// #[derive(Debug)]
/// struct Opaque;
/// let v: u32 = cache.get_or_load("k", || async { Err::<u32, _>(Opaque) }).await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub enum LoadError<E> {
    /// The loader returned this error. Nothing was stored.
    Loader(Arc<E>),
    /// The cache itself failed.
    Cache(Error),
}

impl<E> From<Error> for LoadError<E> {
    fn from(error: Error) -> Self {
        LoadError::Cache(error)
    }
}

impl<E: std::fmt::Display> std::fmt::Display for LoadError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::Loader(e) => write!(f, "the loader failed: {e:#}"),
            LoadError::Cache(e) => std::fmt::Display::fmt(e, f),
        }
    }
}

impl<E: std::fmt::Debug + std::fmt::Display> std::error::Error for LoadError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            // Shown in the message, so not returned again (see the type's docs).
            LoadError::Loader(_) => None,
            LoadError::Cache(e) => std::error::Error::source(e),
        }
    }
}

/// What the library's own log lines say of a [`LoadError`] whose loader error
/// type it does not know to be `Display`: the cache's error, or that the
/// loader failed.
pub(crate) struct Described<'a, E>(pub(crate) &'a LoadError<E>);

impl<E> std::fmt::Display for Described<'_, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            LoadError::Loader(_) => f.write_str("the loader failed"),
            LoadError::Cache(e) => std::fmt::Display::fmt(e, f),
        }
    }
}

impl<E> Clone for LoadError<E> {
    fn clone(&self) -> Self {
        match self {
            LoadError::Loader(e) => LoadError::Loader(Arc::clone(e)),
            LoadError::Cache(e) => LoadError::Cache(e.clone()),
        }
    }
}

impl<E> LoadError<E> {
    /// The loader's error, if that is what failed: borrowed, to `match` it.
    pub fn loader_error(&self) -> Option<&E> {
        match self {
            LoadError::Loader(e) => Some(e),
            LoadError::Cache(_) => None,
        }
    }

    /// The cache's error, if that is what failed.
    pub fn cache_error(&self) -> Option<&Error> {
        match self {
            LoadError::Cache(e) => Some(e),
            LoadError::Loader(_) => None,
        }
    }

    /// The cache's error, or `None` when the loader failed.
    pub fn into_cache_error(self) -> Option<Error> {
        match self {
            LoadError::Cache(e) => Some(e),
            LoadError::Loader(_) => None,
        }
    }

    /// True when the loader failed (rather than the cache).
    pub fn is_loader_error(&self) -> bool {
        matches!(self, LoadError::Loader(_))
    }

    /// The loader's error (still shared with the other callers of the same
    /// load), or `None` when the cache failed.
    pub fn into_loader_error(self) -> Option<Arc<E>> {
        match self {
            LoadError::Loader(e) => Some(e),
            LoadError::Cache(_) => None,
        }
    }

    /// The loader's error by value, when this is the last reference to it
    /// (the other callers that shared the load have dropped theirs: always so
    /// for a call nobody joined). Otherwise, or when the cache failed, `self`
    /// unchanged. With `E: Clone`, `into_loader_error().map(Arc::unwrap_or_clone)`
    /// always succeeds for a loader error.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use locked_cache::LoadError;
    ///
    /// let e: LoadError<std::io::Error> = LoadError::Loader(Arc::new(std::io::Error::other("db")));
    /// let io: std::io::Error = e.try_into_loader_error().unwrap();
    /// assert_eq!(io.to_string(), "db");
    /// ```
    pub fn try_into_loader_error(self) -> Result<E, Self> {
        match self {
            LoadError::Loader(e) => Arc::try_unwrap(e).map_err(LoadError::Loader),
            cache => Err(cache),
        }
    }
}

/// Shorthand for results of the library's own operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predicates_classify_the_variants() {
        let timeout = Error::LockTimeout {
            resource: "lock.k".into(),
            waited: Duration::from_secs(1),
        };
        assert!(timeout.is_timeout() && !timeout.is_connection_error());
        let pool = Error::PoolTimeout {
            server: "redis://h".into(),
            timeout: Duration::from_secs(1),
        };
        assert!(pool.is_timeout() && pool.is_connection_error());
        let quorum = Error::QuorumNotReached {
            resource: "lock.k".into(),
            reachable: 1,
            masters: 3,
            quorum: 2,
        };
        assert!(quorum.is_quorum_error() && !quorum.is_timeout());
        assert!(Error::InvalidKey("".into()).is_invalid_input());
        let custom = Error::store(std::io::Error::other("disk on fire"));
        assert_eq!(custom.to_string(), "store: disk on fire");
        assert!(!custom.is_invalid_input());
        let refused = Error::Redis {
            server: "redis://h".into(),
            source: redis::RedisError::from(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused,
            )),
        };
        assert!(refused.is_connection_error() && !refused.is_error_reply());
        let oom = Error::Redis {
            server: "redis://h".into(),
            source: redis::RedisError::from((
                redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
                "OOM command not allowed",
            )),
        };
        assert!(oom.is_error_reply() && !oom.is_connection_error());
        assert!(
            refused.to_string().starts_with("redis redis://h: "),
            "{refused}"
        );
    }

    #[test]
    fn a_loader_error_is_shown_once_and_can_be_taken_out() {
        use std::error::Error as _;
        let e: LoadError<std::io::Error> = LoadError::Loader(Arc::new(std::io::Error::other("db")));
        assert_eq!(e.to_string(), "the loader failed: db");
        assert!(
            e.source().is_none(),
            "shown in the message, not returned again"
        );
        assert!(e.is_loader_error());
        let shared = e.clone();
        // Shared: not taken out, handed back.
        let e = e.try_into_loader_error().unwrap_err();
        drop(shared);
        assert_eq!(e.try_into_loader_error().unwrap().to_string(), "db");
        let cache: LoadError<std::io::Error> = Error::InvalidKey("".into()).into();
        assert_eq!(cache.to_string(), "invalid key: ");
        assert!(cache.source().is_none());
        assert!(cache.clone().into_loader_error().is_none());
        assert!(cache.try_into_loader_error().is_err());
        let redis: LoadError<std::io::Error> = Error::Redis {
            server: "redis://h".into(),
            source: redis::RedisError::from(std::io::Error::other("reset")),
        }
        .into();
        assert!(
            redis.source().is_some(),
            "transparent: the cache error's source"
        );
    }

    #[test]
    fn load_error_keeps_the_callers_type() {
        let e: LoadError<std::io::Error> = LoadError::Loader(Arc::new(std::io::Error::other("db")));
        assert_eq!(e.loader_error().unwrap().to_string(), "db");
        assert!(e.cache_error().is_none());
        let c: LoadError<std::io::Error> = Error::Abandoned.into();
        assert!(c.cache_error().is_some() && c.clone().loader_error().is_none());
        assert!(matches!(c.into_cache_error(), Some(Error::Abandoned)));
    }
}
