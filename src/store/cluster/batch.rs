//! The batched commands of [`ClusterStore`] (`store/many.rs`, for
//! `get_or_load_many` and friends): one per slot (a script's keys must share
//! one), the slots at once, each chunked. The `Store` impl in `mod.rs`
//! forwards to these.

use std::time::Duration;

use super::super::Store;
use super::super::many::{self, by_slot, chunked, scatter};
use super::super::{FencedWrite, LoadClaim, Stored, Write};
use super::ClusterStore;
use crate::error::Result;

/// The slot of a group of [`by_slot`] (every item of it has the same).
fn slot_of<T>(group: &[T], key: impl Fn(&T) -> &str) -> u16 {
    group
        .first()
        .map_or(0, |item| super::super::slot::slot(key(item).as_bytes()))
}

impl ClusterStore {
    // Batched commands (`store/many.rs`): one per slot (a script's keys must
    // share one), the slots at once, each chunked.

    pub(super) async fn batch_get_many(
        &self,
        keys: &[&str],
        with_ttl: bool,
    ) -> Result<Vec<Option<Stored>>> {
        let groups = by_slot(keys, |k| k);
        let sends = groups.iter().map(|(_, group)| {
            let slot = slot_of(group, |k| k);
            chunked(
                group,
                |_| 0,
                move |chunk| {
                    self.run("MGET", slot, move |mut c| async move {
                        many::get_many(&mut c, chunk, with_ttl).await
                    })
                },
            )
        });
        let answers = futures_util::future::try_join_all(sends).await?;
        Ok(scatter(keys.len(), &groups, answers))
    }

    pub(super) async fn batch_set_many(&self, writes: &[Write<'_>]) -> Result<()> {
        let groups = by_slot(writes, |w| w.key);
        let sends = groups.iter().map(|(_, group)| {
            let slot = slot_of(group, |w| w.key);
            chunked(
                group,
                |w| w.value.len(),
                move |chunk| {
                    self.run("SET (pipelined)", slot, move |mut c| async move {
                        many::set_many(&mut c, chunk).await
                    })
                },
            )
        });
        futures_util::future::try_join_all(sends).await.map(drop)
    }

    pub(super) async fn batch_delete_many(&self, keys: &[&str]) -> Result<()> {
        let groups = by_slot(keys, |k| k);
        let sends = groups.iter().map(|(_, group)| {
            let slot = slot_of(group, |k| k);
            chunked(
                group,
                |_| 0,
                move |chunk| {
                    self.run("DEL", slot, move |mut c| async move {
                        many::delete_many(&mut c, chunk).await
                    })
                },
            )
        });
        futures_util::future::try_join_all(sends).await.map(drop)
    }

    pub(super) async fn batch_claim_loads(
        &self,
        names: &[&str],
        token: &[u8],
        expiry: Duration,
    ) -> Result<Vec<bool>> {
        let acks = self.cluster.replica_acks;
        let groups = by_slot(names, |k| k);
        let sends = groups.iter().map(|(_, group)| {
            let slot = slot_of(group, |k| k);
            chunked(
                group,
                |_| 0,
                move |chunk| {
                    self.run("EVALSHA claim_loads", slot, move |mut c| async move {
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
        let groups = by_slot(entries, |e| e.lock);
        let sends = groups.iter().map(|(_, group)| {
            let slot = slot_of(group, |e| e.lock);
            chunked(
                group,
                |_| 0,
                move |chunk| {
                    self.run(
                        "EVALSHA claim_loads_fenced",
                        slot,
                        move |mut c| async move {
                            many::claim_loads_fenced(&mut c, chunk, token, expiry, fence_expiry)
                                .await
                        },
                    )
                },
            )
        });
        let answers = futures_util::future::try_join_all(sends).await?;
        Ok(scatter(entries.len(), &groups, answers))
    }

    pub(super) async fn batch_renew_loads(
        &self,
        keys: &[&str],
        token: &[u8],
        expiry: Duration,
    ) -> Result<Vec<bool>> {
        let groups = by_slot(keys, |k| k);
        let sends = groups.iter().map(|(_, group)| {
            let slot = slot_of(group, |k| k);
            chunked(
                group,
                |_| 0,
                move |chunk| {
                    self.run("EVALSHA renew_loads", slot, move |mut c| async move {
                        many::renew_loads(&mut c, chunk, token, expiry).await
                    })
                },
            )
        });
        let answers = futures_util::future::try_join_all(sends).await?;
        Ok(scatter(keys.len(), &groups, answers))
    }

    pub(super) async fn batch_unclaim_loads(
        &self,
        names: &[&str],
        token: &[u8],
        channel: Option<&str>,
    ) -> Result<()> {
        let groups = by_slot(names, |k| k);
        let sends = groups.iter().map(|(_, group)| {
            let slot = slot_of(group, |k| k);
            chunked(
                group,
                |_| 0,
                move |chunk| {
                    self.run("EVALSHA unclaim_loads", slot, move |mut c| async move {
                        many::unclaim_loads(&mut c, chunk, token, channel).await
                    })
                },
            )
        });
        futures_util::future::try_join_all(sends).await.map(drop)
    }

    pub(super) async fn batch_get_or_fence_many(
        &self,
        entries: &[(&str, &str)],
        token: &[u8],
        fence_expiry: Duration,
    ) -> Result<Vec<Option<Stored>>> {
        let groups = by_slot(entries, |e| e.0);
        let sends = groups.iter().map(|(_, group)| {
            let slot = slot_of(group, |e| e.0);
            chunked(
                group,
                |_| 0,
                move |chunk| {
                    self.run("EVALSHA get_or_fence_many", slot, move |mut c| async move {
                        many::get_or_fence_many(&mut c, chunk, token, fence_expiry).await
                    })
                },
            )
        });
        let answers = futures_util::future::try_join_all(sends).await?;
        Ok(scatter(entries.len(), &groups, answers))
    }

    pub(super) async fn batch_set_fenced_many(
        &self,
        writes: &[FencedWrite<'_>],
        token: &[u8],
        channel: Option<&str>,
    ) -> Result<Vec<bool>> {
        let groups = by_slot(writes, |w| w.key);
        let sends = groups.iter().map(|(_, group)| {
            let slot = slot_of(group, |w| w.key);
            chunked(
                group,
                |w| w.value.len(),
                move |chunk| {
                    self.run("EVALSHA set_fenced_many", slot, move |mut c| async move {
                        many::set_fenced_many(&mut c, chunk, token, channel).await
                    })
                },
            )
        });
        let answers = futures_util::future::try_join_all(sends).await?;
        Ok(scatter(writes.len(), &groups, answers))
    }
}
