//! Multi-key locks: several names taken all or none.
//!
//! Each master takes every name in one script (all free, or held by this very
//! token, or nothing is written), so no caller ever holds some names while
//! waiting for others: callers that name the same locks in different orders
//! cannot deadlock. Across masters, an attempt granted by less than a majority
//! is undone like any other, and the caller retries after a randomised pause.

use std::time::Duration;

use super::claim::Claimed;
use super::{LockGuard, Redlock};
use crate::error::{Error, Result};

/// The most names one multi-key lock may take.
const MAX_NAMES: usize = 1024;

impl Redlock {
    /// Takes the exclusive locks on every one of `names` at once, all or none,
    /// waiting up to the configured wait time. The guard holds them all, with
    /// one fencing token per name ([`LockGuard::fencing_tokens`], in sorted
    /// order); its watchdog, lost signal and release cover every name.
    ///
    /// Concurrent callers: a caller that names the same locks in another order
    /// cannot deadlock with this one (each master takes all names in one step).
    /// Tasks of one process that ask for the same set queue in process; sets
    /// that merely overlap contend through the masters.
    ///
    /// On a Redis Cluster every name must hash to one slot (give them one hash
    /// tag, `{order:42}:row`, `{order:42}:stock`); names on several slots are
    /// refused before anything is sent, with [`Error::InvalidConfig`] naming
    /// the rule.
    ///
    /// Errors: [`Error::InvalidConfig`] for an empty list or more than 1024
    /// names; otherwise as [`acquire`](Self::acquire).
    pub async fn acquire_all(&self, names: &[&str]) -> Result<LockGuard> {
        let (expiry, wait) = (self.inner.options.expiry, self.inner.options.wait);
        self.acquire_claim(self.multi(names)?, expiry, wait).await
    }

    /// One attempt at [`acquire_all`](Self::acquire_all), no waiting: `Ok(None)`
    /// when any name is held by someone else (or the votes split).
    pub async fn try_acquire_all(
        &self,
        names: &[&str],
        expiry: Duration,
    ) -> Result<Option<LockGuard>> {
        self.try_claim(self.multi(names)?, expiry).await
    }

    /// The claim on `names`; on a Redis Cluster master, refused unless every
    /// name hashes to one slot (a multi-key script's keys must, and a claim's
    /// keys share their name's slot).
    fn multi(&self, names: &[&str]) -> Result<Claimed> {
        let claimed = multi(names)?;
        #[cfg(feature = "cluster")]
        if self.inner.masters.iter().any(|m| m.keys_share_one_slot()) {
            let slot = |n: &str| crate::store::slot::slot(n.as_bytes());
            let first = slot(names[0]);
            if let Some(other) = names.iter().find(|n| slot(n) != first) {
                return Err(Error::InvalidConfig(format!(
                    "on a Redis Cluster, a multi-key lock's names must share one hash tag \
                     (`{{order:42}}:row`, `{{order:42}}:stock`): `{}` and `{other}` hash to \
                     different slots",
                    names[0]
                )));
            }
        }
        Ok(claimed)
    }
}

/// The claim on `names`, sorted and without duplicates.
fn multi(names: &[&str]) -> Result<Claimed> {
    let mut names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    names.sort();
    names.dedup();
    if names.is_empty() || names.len() > MAX_NAMES {
        return Err(Error::InvalidConfig(format!(
            "a multi-key lock takes 1 to {MAX_NAMES} names, not {}",
            names.len()
        )));
    }
    Ok(Claimed::Exclusive(names))
}
