//! The wake-up subscription of a [`ClusterStore`]: classic `PUBLISH` reaches
//! every node of a cluster, so one connection to any node will do: a seed, or
//! else a node of the current topology (a seed may be gone after a failover).

use tokio::sync::mpsc;

use super::ClusterStore;
use crate::error::{Error, Result};
use crate::store::tls::TlsOptions;
use crate::store::{RedisStore, Store};

impl ClusterStore {
    /// Subscribes to `channel` on the first seed that takes it, else on a
    /// node of the topology.
    pub(super) async fn subscribe_anywhere(
        &self,
        channel: &str,
    ) -> Result<mpsc::Receiver<Vec<u8>>> {
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

    /// URLs of the nodes of the current topology that are not failing (asked
    /// only when no seed would take the subscription: a seed may be gone after
    /// a failover).
    async fn topology_nodes(&self) -> Vec<String> {
        let Ok(nodes) = self
            .run("CLUSTER NODES", 0, |mut c| async move {
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
            let subscribed = match RedisStore::open_with(
                url,
                self.options,
                &TlsOptions::default(),
                self.credentials.clone(),
            ) {
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
