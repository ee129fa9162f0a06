//! Redis Sentinel (feature `sentinel`): the master of a monitored group,
//! found through redis-rs's `SentinelClient` when a connection is made.
//!
//! redis-rs finds the master only when it connects, and does not move live
//! connections after a failover (redis-rs #1438). This crate closes that gap
//! where connections fail: a master that died kills its connections, which
//! retires them from the pool (`pool.rs`), and the next connection asks the
//! Sentinels again; a demoted master answers writes with `READONLY`, which
//! retires its connections the same way (see [`Endpoint::follows_failover`]
//! in `endpoint.rs`); a hung one times out, which retires the connection
//! that waited. Subscriptions (wake-ups, near-cache invalidations) end with
//! their connection and reconnect through the Sentinels as well.
//!
//! [`Endpoint::follows_failover`]: super::endpoint::Endpoint::follows_failover

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;

use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{Client, ErrorKind, RedisError, RedisResult};
use tokio::sync::{Mutex, watch};

use super::auth::CredentialSource;
use crate::error::{Error, Result};

/// The master of the group `name`, as the Sentinels see it.
pub(crate) struct SentinelMaster {
    name: String,
    #[cfg_attr(not(feature = "credentials"), allow(dead_code))]
    urls: Vec<String>,
    #[cfg_attr(not(feature = "credentials"), allow(dead_code))]
    node: redis::RedisConnectionInfo,
    /// Rotating credentials for the master (redis-rs logs in to check its
    /// role, so the lookup needs them too).
    credentials: Option<CredentialSource>,
    /// redis-rs's client (it caches its connections to the Sentinels) and
    /// the login it was built with: one lookup at a time.
    sentinels: Mutex<(SentinelClient, Option<(String, String)>)>,
    /// Raised on every `+switch-master` for this group (see [`watch_switches`]).
    switches: Arc<watch::Sender<u64>>,
}

fn build(name: &str, urls: &[String], node: redis::RedisConnectionInfo) -> Result<SentinelClient> {
    let info = SentinelNodeConnectionInfo::default()
        .set_redis_connection_info(node)
        .set_tcp_settings(super::tls::tcp_settings());
    // The name is a `String` without redis-rs's `tls-rustls`, `impl AsRef<str>` with it.
    #[allow(clippy::unnecessary_to_owned)]
    SentinelClient::build(
        urls.to_vec(),
        name.to_owned(),
        Some(info),
        SentinelServerType::Master,
    )
    .map_err(|e| Error::InvalidConfig(format!("sentinel {name}: {e}")))
}

impl SentinelMaster {
    /// Checks the Sentinel URLs (`redis://host:26379`, with the Sentinels'
    /// own user and password if they have one); connects to nothing yet.
    /// `node` holds what the master is logged in with (user, password, db).
    pub fn new(
        name: &str,
        sentinel_urls: &[String],
        node: redis::RedisConnectionInfo,
        credentials: Option<CredentialSource>,
    ) -> Result<SentinelMaster> {
        if sentinel_urls.is_empty() {
            return Err(Error::InvalidConfig(
                "Sentinel needs at least one Sentinel URL".into(),
            ));
        }
        if name.is_empty() {
            return Err(Error::InvalidConfig(
                "the Sentinel master name is empty".into(),
            ));
        }
        let client = build(name, sentinel_urls, node.clone())?;
        let switches = Arc::new(watch::channel(0).0);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(watch_switches(
                name.to_owned(),
                sentinel_urls.to_vec(),
                Arc::downgrade(&switches),
            ));
        }
        Ok(SentinelMaster {
            name: name.to_owned(),
            urls: sentinel_urls.to_vec(),
            node,
            credentials,
            sentinels: Mutex::new((client, None)),
            switches,
        })
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Changes on every failover the Sentinels announce: the pool retires
    /// its connections and subscriptions end, so all of them reconnect to the
    /// new master. (A demoted master may keep answering as a master for
    /// seconds before the Sentinels reconfigure it: writes there would be
    /// lost.)
    pub fn switches(&self) -> watch::Receiver<u64> {
        self.switches.subscribe()
    }

    /// A client for the current master (redis-rs checks that it answers
    /// `ROLE` as a master), within `timeout`.
    pub async fn client(&self, timeout: Duration) -> RedisResult<Client> {
        let ask = async {
            let mut sentinels = self.sentinels.lock().await;
            #[cfg(not(feature = "credentials"))]
            if let Some(source) = &self.credentials {
                match *source {}
            }
            #[cfg(feature = "credentials")]
            if let Some(source) = &self.credentials {
                let auth = source.first(timeout).await?;
                let login = (auth.username().to_owned(), auth.password().to_owned());
                if sentinels.1.as_ref() != Some(&login) {
                    let node = self
                        .node
                        .clone()
                        .set_username(&login.0)
                        .set_password(&login.1);
                    let client = build(&self.name, &self.urls, node).map_err(|e| {
                        RedisError::from((
                            ErrorKind::InvalidClientConfig,
                            "sentinel",
                            e.to_string(),
                        ))
                    })?;
                    *sentinels = (client, Some(login));
                }
            }
            sentinels.0.async_get_client().await
        };
        match tokio::time::timeout(timeout, ask).await {
            Ok(client) => client,
            Err(_) => Err(RedisError::from((
                ErrorKind::Io,
                "no master from the Sentinels within the connect timeout",
                self.name.clone(),
            ))),
        }
    }
}

/// Listens to `+switch-master` on the first Sentinel that takes the
/// subscription (the next one when it goes away) and raises `switches` for
/// each announcement about `name`, until the master is dropped.
async fn watch_switches(name: String, urls: Vec<String>, switches: Weak<watch::Sender<u64>>) {
    let mut next = 0usize;
    loop {
        let url = &urls[next % urls.len()];
        next += 1;
        let subscribed = async {
            let mut pubsub = Client::open(url.as_str())?.get_async_pubsub().await?;
            pubsub.subscribe("+switch-master").await?;
            Ok::<_, RedisError>(pubsub)
        };
        if let Ok(Ok(pubsub)) = tokio::time::timeout(Duration::from_secs(2), subscribed).await {
            let mut messages = pubsub.into_on_message();
            let mut alive = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    message = messages.next() => {
                        let Some(message) = message else { break };
                        let payload: String = message.get_payload().unwrap_or_default();
                        if payload.split_whitespace().next() == Some(name.as_str()) {
                            let Some(switches) = switches.upgrade() else { return };
                            tracing::info!(master = %name, announced = %payload, "the Sentinels switched the master");
                            switches.send_modify(|n| *n += 1);
                        }
                    }
                    _ = alive.tick() => {
                        if switches.strong_count() == 0 {
                            return;
                        }
                    }
                }
            }
        }
        if switches.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
