//! Where a server's connections go: a fixed address, or (feature `sentinel`)
//! whichever server the Sentinels name as the master right now. Every pooled
//! connection and every subscription of a [`RedisStore`](super::RedisStore)
//! asks its endpoint for a client when it connects, so a store on Sentinel
//! follows a failover with its next connection (see `sentinel.rs`).

#[cfg(feature = "sentinel")]
use std::sync::Arc;
use std::time::Duration;

use redis::{Client, RedisResult};

/// The server a store connects to.
#[derive(Clone)]
// One per store, made once: its size does not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Endpoint {
    /// One address, known at build time.
    Fixed(Client),
    /// The current master of a Sentinel-monitored group.
    #[cfg(feature = "sentinel")]
    Sentinel(Arc<super::sentinel::SentinelMaster>),
}

impl Endpoint {
    /// A client for the server to connect to now; asking the Sentinels is
    /// bounded by `timeout`.
    #[cfg_attr(not(feature = "sentinel"), allow(unused_variables))]
    pub async fn client(&self, timeout: Duration) -> RedisResult<Client> {
        match self {
            Endpoint::Fixed(client) => Ok(client.clone()),
            #[cfg(feature = "sentinel")]
            Endpoint::Sentinel(master) => master.client(timeout).await,
        }
    }

    /// Changes on every failover the endpoint's Sentinels announce; `None`
    /// for a fixed endpoint.
    pub fn switches(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        match self {
            Endpoint::Fixed(_) => None,
            #[cfg(feature = "sentinel")]
            Endpoint::Sentinel(master) => Some(master.switches()),
        }
    }

    /// True when the endpoint moves: a `READONLY` reply then means the
    /// connection is to a demoted master, and is replaced.
    pub fn follows_failover(&self) -> bool {
        match self {
            Endpoint::Fixed(_) => false,
            #[cfg(feature = "sentinel")]
            Endpoint::Sentinel(_) => true,
        }
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Fixed(_) => f.write_str("Fixed"),
            #[cfg(feature = "sentinel")]
            Endpoint::Sentinel(master) => write!(f, "Sentinel({})", master.name()),
        }
    }
}
