//! What a granted lock does on every master: raise its fencing counters
//! (see `fencing.rs`), extend it (with re-grants on masters that lost it) and
//! release it. Called by the acquisition and by [`LockGuard`](super::LockGuard).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::Owner;
use super::claim::Claimed;
use super::quorum::quorum;
use super::redlock::Inner;
use super::token::Token;
use super::vote;
use crate::error::Result;
use crate::store::SharedStore;

impl Inner {
    /// Compare-and-delete on every master, publishing the release to waiters when
    /// `publish`; true when a majority still held `token`.
    pub(super) async fn release_all(
        &self,
        claim: &Arc<Claimed>,
        token: &Token,
        publish: bool,
    ) -> Result<bool> {
        let channel = publish.then(|| self.options.channel.clone());
        let (claim, token) = (Arc::clone(claim), token.clone());
        vote::ask(&self.masters, &self.health, move |master| {
            let (claim, token, channel) = (Arc::clone(&claim), token.clone(), channel.clone());
            async move {
                master
                    .unclaim(claim.as_claim(), token.as_bytes(), channel.as_deref())
                    .await
            }
        })
        .majority()
        .await
    }

    /// Raises the fencing counters of every master to `fences`; true once a
    /// majority has them (see `fencing.rs`).
    pub(super) async fn raise_fences(&self, claim: &Arc<Claimed>, fences: &[u64]) -> bool {
        let (claim, fences) = (Arc::clone(claim), fences.to_vec());
        let raised = vote::ask(&self.masters, &self.health, move |master| {
            let (claim, fences) = (Arc::clone(&claim), fences.clone());
            async move {
                master.raise_fence(claim.as_claim(), &fences).await?;
                Ok(true)
            }
        })
        .majority()
        .await;
        matches!(raised, Ok(true))
    }

    /// Compare-and-pexpire on every master; true when a majority holds `token`
    /// afterwards.
    ///
    /// While the lock is still valid (`valid_until`, by this process's clock) and
    /// some master still holds the token, a master that no longer has the key (it
    /// restarted, or missed the original grant) is granted it again with
    /// `SET NX`: the holder has had a majority all along, so nobody else can hold
    /// the lock, and re-granting keeps a majority when another master is lost
    /// during a long hold. After the validity, or with the token gone from every
    /// master, nothing is re-granted: the lock counts as lost.
    ///
    /// A re-grant counts only if its answer came within the validity (a pause
    /// between the check and the answer would otherwise count a stale vote);
    /// one that came later is undone. Each re-grant runs on a task of its own
    /// that undoes it if the lock was released meanwhile (`ended`), so a
    /// keep-alive cancelled mid-re-grant cannot leave a lock behind that nobody
    /// holds.
    pub(super) async fn extend_all(
        &self,
        claim: &Arc<Claimed>,
        token: &Token,
        expiry: Duration,
        valid_until: Instant,
        ended: &Arc<AtomicBool>,
    ) -> Result<bool> {
        let resource = claim.name();
        let (owned_claim, owned_token) = (Arc::clone(claim), token.clone());
        let mut votes = vote::ask(&self.masters, &self.health, move |master| {
            let (claim, token) = (Arc::clone(&owned_claim), owned_token.clone());
            async move {
                master
                    .renew(claim.as_claim(), token.as_bytes(), expiry)
                    .await
            }
        });
        votes.all_or_majority().await;
        let needed = quorum(self.masters.len());
        if votes.yes < needed
            && votes.yes > 0
            && !votes.refused_by.is_empty()
            && votes.yes + votes.refused_by.len() >= needed
            && Instant::now() < valid_until
        {
            let regrants = votes.refused_by.iter().map(|&i| {
                let master = SharedStore::clone(&self.masters[i]);
                let (claim, token, ended) = (Arc::clone(claim), token.clone(), Arc::clone(ended));
                let owner = Owner::here(std::time::SystemTime::now()).encode();
                tokio::spawn(async move {
                    let claimed = claim.as_claim();
                    let granted = matches!(
                        master
                            .claim(claimed, token.as_bytes(), expiry, &owner)
                            .await,
                        Ok(Some(_))
                    );
                    let in_time = Instant::now() < valid_until;
                    if granted && (!in_time || ended.load(Ordering::Acquire)) {
                        let _ = master.unclaim(claimed, token.as_bytes(), None).await;
                        return false;
                    }
                    granted
                })
            });
            let regranted = futures_util::future::join_all(regrants).await;
            let more = regranted.iter().filter(|a| matches!(a, Ok(true))).count();
            if more > 0 {
                tracing::debug!(
                    resource,
                    regranted = more,
                    "lock re-granted on masters that had lost it"
                );
            }
            votes.yes += more;
            votes.no -= more;
        }
        votes.verdict()
    }
}
