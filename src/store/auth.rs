//! Credentials that change while the cache runs (feature `credentials`): a
//! managed Redis's rotated password, a cloud identity's short-lived token.
//!
//! The user's [`StreamingCredentialsProvider`] is read by one task per cache
//! (its *pump*), which keeps the latest credentials. Every connection the cache
//! opens goes through [`CredentialSource`], and so uses the credentials current
//! at that moment:
//!
//! - pooled (multiplexed) connections and cluster node connections get the
//!   source as their redis-rs credentials provider: redis-rs authenticates a
//!   new connection with the latest credentials, and re-authenticates live
//!   ones (`AUTH`) each time new ones arrive;
//! - the dedicated pub/sub connections (wake-ups, near-cache invalidations),
//!   which redis-rs does not re-authenticate, are opened with the latest
//!   credentials written into their connection info. Redis keeps a
//!   connection authenticated after its password is rotated away, so these go
//!   on until they drop, and reconnect with the credentials current then.
//!
//! What redis-rs leaves to this crate, and how it is closed:
//!
//! - a provider whose stream ends or yields an error: the pump keeps the last
//!   good credentials for connections opened meanwhile only if the error came
//!   after them (an error first is an error for new connections, typed as
//!   [`Error::is_auth_error`](crate::Error::is_auth_error)), and subscribes
//!   again after [`RESUBSCRIBE_AFTER`] when the stream ended; the next good
//!   credentials recover without a restart;
//! - a connection's re-authentication stops for good after one refused
//!   `AUTH` (redis-rs): that connection goes on with its old login until the
//!   server refuses it (`NOAUTH`, `WRONGPASS`), which retires it from the pool
//!   (`pool.rs`), and the command is re-sent on a fresh connection, opened
//!   with the latest credentials;
//! - bb8-redis's `RedisConnectionManager` passes no connection config, so a
//!   user's own bb8-redis pool cannot take a provider: the builder refuses the
//!   combination with [`Error::InvalidConfig`](crate::Error::InvalidConfig).

use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
pub use redis::{BasicAuth, StreamingCredentialsProvider};
use redis::{ConnectionInfo, ErrorKind, RedisError, RedisResult};
use tokio::sync::watch;

/// How long the pump waits before subscribing again to a provider whose
/// stream ended.
pub const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(1);

/// What the pump last read from the provider.
#[derive(Clone)]
enum Latest {
    /// Nothing yet.
    Pending,
    Good(BasicAuth),
    /// The provider's error, with no good credentials before it.
    Failed(String),
}

/// The provider a builder was given.
pub(crate) struct Provider(pub Arc<dyn StreamingCredentialsProvider>);

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Provider(set)")
    }
}

/// The latest credentials of one provider, shared by every connection of a
/// cache (see the module docs). Cheap to clone.
#[derive(Clone)]
pub(crate) struct CredentialSource {
    latest: Arc<watch::Sender<Latest>>,
    /// Keeps the channel open while a source lives: the pump ends once no
    /// source and no connection's subscription is left.
    _alive: watch::Receiver<Latest>,
}

impl std::fmt::Debug for CredentialSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &*self.latest.borrow() {
            Latest::Pending => "pending".to_owned(),
            Latest::Good(auth) => format!("user {:?}", auth.username()),
            Latest::Failed(e) => format!("failed: {e}"),
        };
        f.debug_struct("CredentialSource")
            .field("state", &state)
            .finish()
    }
}

impl CredentialSource {
    /// Starts the pump on the current tokio runtime. It ends when the last
    /// clone of the source is dropped.
    pub fn start(provider: &Provider) -> CredentialSource {
        let (latest, alive) = watch::channel(Latest::Pending);
        let latest = Arc::new(latest);
        tokio::spawn(pump(Arc::clone(&provider.0), Arc::downgrade(&latest)));
        CredentialSource {
            latest,
            _alive: alive,
        }
    }

    /// Waits up to `timeout` for the provider's first answer; an error when it
    /// failed or did not answer in time.
    pub async fn first(&self, timeout: Duration) -> RedisResult<BasicAuth> {
        let mut rx = self.latest.subscribe();
        let got = tokio::time::timeout(timeout, async {
            loop {
                let answer = answer(&rx.borrow_and_update());
                if let Some(answer) = answer {
                    return answer;
                }
                if rx.changed().await.is_err() {
                    return Err(auth_error("the credentials provider ended".to_owned()));
                }
            }
        })
        .await;
        got.unwrap_or_else(|_| {
            Err(auth_error(format!(
                "the credentials provider gave no credentials within {timeout:?}"
            )))
        })
    }

    /// `info` with the latest credentials in it (waiting for the first ones up
    /// to `timeout`): for connections redis-rs does not authenticate from a
    /// provider (pub/sub).
    pub async fn apply(
        &self,
        info: &ConnectionInfo,
        timeout: Duration,
    ) -> RedisResult<ConnectionInfo> {
        let auth = self.first(timeout).await?;
        let settings = info
            .redis_settings()
            .clone()
            .set_username(auth.username())
            .set_password(auth.password());
        Ok(info.clone().set_redis_settings(settings))
    }
}

/// A stream that yields the latest credentials at once (once there are any),
/// then each new ones: what redis-rs reads when it opens a connection and
/// while it lives.
impl StreamingCredentialsProvider for CredentialSource {
    fn subscribe(&self) -> Pin<Box<dyn Stream<Item = RedisResult<BasicAuth>> + Send + 'static>> {
        let mut rx = self.latest.subscribe();
        rx.mark_changed();
        Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
            loop {
                rx.changed().await.ok()?;
                let answer = answer(&rx.borrow_and_update());
                if let Some(answer) = answer {
                    return Some((answer, rx));
                }
            }
        }))
    }
}

fn answer(latest: &Latest) -> Option<RedisResult<BasicAuth>> {
    match latest {
        Latest::Pending => None,
        Latest::Good(auth) => Some(Ok(auth.clone())),
        Latest::Failed(e) => Some(Err(auth_error(e.clone()))),
    }
}

fn auth_error(detail: String) -> RedisError {
    RedisError::from((
        ErrorKind::AuthenticationFailed,
        "credentials provider failed",
        detail,
    ))
}

/// Reads the provider into `latest` until every source, and every
/// connection's subscription, is gone. An error
/// after good credentials is logged and the good ones kept (connections
/// opened meanwhile use them; the server says whether they still work); an
/// error first is kept for new connections to report. A stream that ends is
/// subscribed to again after [`RESUBSCRIBE_AFTER`].
async fn pump(
    provider: Arc<dyn StreamingCredentialsProvider>,
    latest: Weak<watch::Sender<Latest>>,
) {
    loop {
        let mut stream = provider.subscribe();
        loop {
            let item = {
                let Some(sender) = latest.upgrade() else {
                    return;
                };
                // Wake up when the last receiver is dropped, not only on items.
                tokio::select! {
                    item = stream.next() => item,
                    () = sender.closed() => return,
                }
            };
            let Some(sender) = latest.upgrade() else {
                return;
            };
            match item {
                Some(Ok(auth)) => {
                    sender.send_replace(Latest::Good(auth));
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "the credentials provider failed");
                    sender.send_if_modified(|l| match l {
                        Latest::Good(_) => false,
                        other => {
                            *other = Latest::Failed(e.to_string());
                            true
                        }
                    });
                }
                None => break,
            }
        }
        tracing::warn!(
            again_in = ?RESUBSCRIBE_AFTER,
            "the credentials provider's stream ended; subscribing again"
        );
        tokio::time::sleep(RESUBSCRIBE_AFTER).await;
    }
}

/// A [`StreamingCredentialsProvider`] you rotate by hand: give it the
/// credentials from your secret store at start, call
/// [`rotate`](RotatingCredentials::rotate) when they change (or
/// [`fail`](RotatingCredentials::fail) when they cannot be had). Clones share
/// the same credentials.
///
/// ```
/// # #[cfg(feature = "credentials")] {
/// use locked_cache::RotatingCredentials;
///
/// let credentials = RotatingCredentials::new("app", "first-password");
/// // builder.credentials_provider(credentials.clone());
/// // ... later, when the secret store has a new password:
/// credentials.rotate("app", "second-password");
/// # }
/// ```
#[derive(Clone)]
pub struct RotatingCredentials {
    current: Arc<watch::Sender<Result<BasicAuth, String>>>,
}

impl std::fmt::Debug for RotatingCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RotatingCredentials")
            .field("current", &*self.current.borrow())
            .finish()
    }
}

impl RotatingCredentials {
    /// Starts with `username` and `password`.
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> RotatingCredentials {
        let auth = BasicAuth::new(username.into(), password.into());
        RotatingCredentials {
            current: Arc::new(watch::channel(Ok(auth)).0),
        }
    }

    /// New credentials: connections opened from now on use them, and live
    /// pooled connections re-authenticate with them.
    pub fn rotate(&self, username: impl Into<String>, password: impl Into<String>) {
        let _previous = self
            .current
            .send_replace(Ok(BasicAuth::new(username.into(), password.into())));
    }

    /// The credentials cannot be had (`reason`). Connections opened from now
    /// on keep the last good credentials, if any; until there were some, they
    /// fail with an error for which
    /// [`Error::is_auth_error`](crate::Error::is_auth_error) is true.
    pub fn fail(&self, reason: impl Into<String>) {
        let _previous = self.current.send_replace(Err(reason.into()));
    }
}

impl StreamingCredentialsProvider for RotatingCredentials {
    fn subscribe(&self) -> Pin<Box<dyn Stream<Item = RedisResult<BasicAuth>> + Send + 'static>> {
        let mut rx = self.current.subscribe();
        rx.mark_changed();
        Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.changed().await.ok()?;
            let item = rx.borrow_and_update().clone().map_err(auth_error);
            Some((item, rx))
        }))
    }
}
