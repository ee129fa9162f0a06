//! The batched commands of [`ClusterStore`] (`store/many.rs`, for
//! `get_or_load_many` and friends), each a command per slot (a script's keys
//! must share one) sent in one pipeline per node (`route.rs`), but for the
//! lock claims that wait for replicas, which go per slot. The `Store` impl in
//! `mod.rs` forwards to these.

use std::time::Duration;

use super::super::Store;
use super::super::many;
use super::super::{FencedWrite, LoadClaim, Stored, Write};
use super::ClusterStore;
use crate::error::Result;

impl ClusterStore {
    /// `MGET`s (with `PTTL`s when `with_ttl`) of `keys`: one pipeline per
    /// node, an `MGET` per slot in it ([`per_node`](Self::per_node)).
    pub(super) async fn batch_get_many(
        &self,
        keys: &[&str],
        with_ttl: bool,
    ) -> Result<Vec<Option<Stored>>> {
        self.per_node(
            "MGET",
            keys,
            |k| k,
            |_| 0,
            |pipe: &mut redis::Pipeline, chunk: &[&str]| many::add_get_many(pipe, chunk, with_ttl),
            |replies: Vec<redis::Value>, chunk: &[&str]| {
                many::parse_get_many(replies, chunk.len(), with_ttl)
            },
            |mut c, chunk| async move { many::get_many(&mut c, &chunk, with_ttl).await },
        )
        .await
    }

    pub(super) async fn batch_set_many(&self, writes: &[Write<'_>]) -> Result<()> {
        self.per_node(
            "SET (pipelined)",
            writes,
            |w| w.key,
            |w| w.value.len(),
            |pipe: &mut redis::Pipeline, chunk: &[Write<'_>]| many::add_set_many(pipe, chunk),
            |replies: Vec<redis::Value>, chunk: &[Write<'_>]| many::parse_set_many(replies, chunk),
            |mut c, chunk| async move { many::set_many(&mut c, &chunk).await },
        )
        .await
        .map(drop)
    }

    pub(super) async fn batch_delete_many(&self, keys: &[&str]) -> Result<()> {
        self.per_node(
            "DEL",
            keys,
            |k| k,
            |_| 0,
            |pipe: &mut redis::Pipeline, chunk: &[&str]| many::add_delete_many(pipe, chunk),
            |replies: Vec<redis::Value>, chunk: &[&str]| many::parse_delete_many(replies, chunk),
            |mut c, chunk| async move { many::delete_many(&mut c, &chunk).await },
        )
        .await
        .map(drop)
    }

    pub(super) async fn batch_claim_loads(
        &self,
        names: &[&str],
        token: &[u8],
        expiry: Duration,
    ) -> Result<Vec<bool>> {
        let acks = self.cluster.replica_acks;
        self.per_slot(
            "EVALSHA claim_loads",
            names,
            |k| k,
            |_| 0,
            |mut c, chunk| async move {
                let granted = many::claim_loads(&mut c, &chunk, token, expiry).await?;
                let Some((replicas, timeout)) = acks.filter(|_| granted.contains(&true)) else {
                    return Ok(granted);
                };
                // As `claim`: too few replicas have the grants, undo them.
                let first = chunk.first().copied().unwrap_or_default();
                let acked = Self::replica_acks(&mut c, first, replicas, timeout).await?;
                if acked >= replicas {
                    return Ok(granted);
                }
                many::unclaim_loads(&mut c, &chunk, token, None).await?;
                Ok(vec![false; chunk.len()])
            },
        )
        .await
    }

    pub(super) async fn batch_claim_loads_fenced(
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
        self.per_node(
            "EVALSHA claim_loads_fenced",
            entries,
            |e| e.lock,
            |_| 0,
            |pipe: &mut redis::Pipeline, chunk: &[LoadClaim<'_>]| {
                many::add_claim_loads_fenced(pipe, chunk, token, expiry, fence_expiry)
            },
            |replies: Vec<redis::Value>, chunk: &[LoadClaim<'_>]| {
                many::parse_claim_loads_fenced(replies, chunk)
            },
            |mut c, chunk| async move {
                many::claim_loads_fenced(&mut c, &chunk, token, expiry, fence_expiry).await
            },
        )
        .await
    }

    pub(super) async fn batch_renew_loads(
        &self,
        keys: &[&str],
        token: &[u8],
        expiry: Duration,
    ) -> Result<Vec<bool>> {
        self.per_node(
            "EVALSHA renew_loads",
            keys,
            |k| k,
            |_| 0,
            |pipe: &mut redis::Pipeline, chunk: &[&str]| {
                many::add_renew_loads(pipe, chunk, token, expiry)
            },
            |replies: Vec<redis::Value>, chunk: &[&str]| many::parse_renew_loads(replies, chunk),
            |mut c, chunk| async move { many::renew_loads(&mut c, &chunk, token, expiry).await },
        )
        .await
    }

    pub(super) async fn batch_unclaim_loads(
        &self,
        names: &[&str],
        token: &[u8],
        channel: Option<&str>,
    ) -> Result<()> {
        self.per_node(
            "EVALSHA unclaim_loads",
            names,
            |k| k,
            |_| 0,
            |pipe: &mut redis::Pipeline, chunk: &[&str]| {
                many::add_unclaim_loads(pipe, chunk, token, channel)
            },
            |replies: Vec<redis::Value>, chunk: &[&str]| many::parse_unclaim_loads(replies, chunk),
            |mut c, chunk| async move { many::unclaim_loads(&mut c, &chunk, token, channel).await },
        )
        .await
        .map(drop)
    }

    pub(super) async fn batch_get_or_fence_many(
        &self,
        entries: &[(&str, &str)],
        token: &[u8],
        fence_expiry: Duration,
    ) -> Result<Vec<Option<Stored>>> {
        self.per_node(
            "EVALSHA get_or_fence_many",
            entries,
            |e| e.0,
            |_| 0,
            |pipe: &mut redis::Pipeline, chunk: &[(&str, &str)]| {
                many::add_get_or_fence_many(pipe, chunk, token, fence_expiry)
            },
            |replies: Vec<redis::Value>, chunk: &[(&str, &str)]| {
                many::parse_get_or_fence_many(replies, chunk)
            },
            |mut c, chunk| async move {
                many::get_or_fence_many(&mut c, &chunk, token, fence_expiry).await
            },
        )
        .await
    }

    pub(super) async fn batch_set_fenced_many(
        &self,
        writes: &[FencedWrite<'_>],
        token: &[u8],
        channel: Option<&str>,
    ) -> Result<Vec<bool>> {
        self.per_node(
            "EVALSHA set_fenced_many",
            writes,
            |w| w.key,
            |w| w.value.len(),
            |pipe: &mut redis::Pipeline, chunk: &[FencedWrite<'_>]| {
                many::add_set_fenced_many(pipe, chunk, token, channel)
            },
            |replies: Vec<redis::Value>, chunk: &[FencedWrite<'_>]| {
                many::parse_set_fenced_many(replies, chunk)
            },
            |mut c, chunk| async move {
                many::set_fenced_many(&mut c, &chunk, token, channel).await
            },
        )
        .await
    }
}
