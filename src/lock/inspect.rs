//! Inspection, for operators: who holds a lock (the owner metadata each holder
//! writes next to its claim: host, process, since when), how long it has left,
//! and the last fencing token handed out.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::Redlock;
use super::claim::Claimed;
use super::quorum::quorum;
use crate::error::{Error, Result};

/// Who took a lock, as the holder wrote it when it acquired the lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The holder's host name (`/proc/sys/kernel/hostname`, else `$HOSTNAME`,
    /// else `unknown`).
    pub host: String,
    /// The holder's process id.
    pub pid: u32,
    /// The holder's executable name.
    pub process: String,
    /// When the holder acquired the lock (its clock).
    pub since: SystemTime,
}

/// Format version of the encoded owner.
const OWNER_V1: &str = "lc1";

impl Owner {
    /// This process, acquiring at `since`.
    pub(crate) fn here(since: SystemTime) -> Owner {
        static HERE: OnceLock<(String, String)> = OnceLock::new();
        let (host, process) = HERE.get_or_init(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .or_else(|| std::env::var("HOSTNAME").ok())
                .unwrap_or_else(|| "unknown".to_owned());
            let process = std::env::current_exe()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "unknown".to_owned());
            (clean(&host), clean(&process))
        });
        Owner {
            host: host.clone(),
            pid: std::process::id(),
            process: process.clone(),
            since,
        }
    }

    /// `lc1 <tab> host <tab> pid <tab> process <tab> since (Unix ms)`.
    pub(crate) fn encode(&self) -> String {
        let since = self
            .since
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        format!(
            "{OWNER_V1}\t{}\t{}\t{}\t{since}",
            self.host, self.pid, self.process
        )
    }

    /// Reads what [`encode`](Owner::encode) wrote; `None` for anything else.
    pub(crate) fn decode(text: &str) -> Option<Owner> {
        let mut fields = text.split('\t');
        if fields.next()? != OWNER_V1 {
            return None;
        }
        let host = fields.next()?.to_owned();
        let pid = fields.next()?.parse().ok()?;
        let process = fields.next()?.to_owned();
        let since_ms: u64 = fields.next()?.parse().ok()?;
        let since = UNIX_EPOCH.checked_add(Duration::from_millis(since_ms))?;
        Some(Owner {
            host,
            pid,
            process,
            since,
        })
    }
}

/// Tabs would break the encoding: replaced by spaces.
fn clean(field: &str) -> String {
    field.replace(['\t', '\n'], " ")
}

/// What the masters say about a lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockInfo {
    /// The lock's name.
    pub name: String,
    /// The highest fencing token any master reports handed out for the name
    /// (0: none, or a store without counters).
    pub fencing_token: u64,
    /// The holders, those on most masters first. A holder on fewer masters
    /// than [`quorum`](LockInfo::quorum) does not hold the lock (an attempt
    /// that is being undone, or a lock lost on some masters).
    pub holders: Vec<HolderInfo>,
    /// Masters that answered.
    pub answered: usize,
    /// Masters needed for a majority.
    pub quorum: usize,
}

impl LockInfo {
    /// The holders on a majority of masters: one for an exclusive lock or a
    /// writer, any number of readers or permit holders.
    pub fn holding(&self) -> impl Iterator<Item = &HolderInfo> {
        self.holders.iter().filter(|h| h.masters >= self.quorum)
    }
}

/// One holder of a lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderInfo {
    /// The first 8 characters of the holder's token: enough to tell holders
    /// apart in logs, not enough to release or extend its lock.
    pub id: String,
    /// The owner metadata it wrote (`None`: written by a store or version
    /// that does not write it).
    pub owner: Option<Owner>,
    /// Time left before its claim expires: the least among the masters that
    /// have it.
    pub ttl: Duration,
    /// Masters on which it holds the lock.
    pub masters: usize,
}

impl Redlock {
    /// Who holds the exclusive lock `name` (or the cache's lock of a key, by
    /// [`LockedCache::lock_key`](crate::LockedCache::lock_key)), how long it has
    /// left, and the last fencing token: asked of every master at once.
    /// Read only; fails only when no master answers (with the first error).
    pub async fn inspect(&self, name: &str) -> Result<LockInfo> {
        self.inspect_claim(&Claimed::Exclusive(vec![name.to_owned()]))
            .await
    }

    pub(crate) async fn inspect_claim(&self, claim: &Claimed) -> Result<LockInfo> {
        let answers = futures_util::future::join_all(
            self.inner
                .masters
                .iter()
                .map(|m| m.holders(claim.as_claim())),
        )
        .await;
        let masters = self.inner.masters.len();
        let mut info = LockInfo {
            name: claim.name().to_owned(),
            fencing_token: 0,
            holders: Vec::new(),
            answered: 0,
            quorum: quorum(masters),
        };
        let mut by_token: HashMap<Vec<u8>, usize> = HashMap::new();
        let mut first_error: Option<Error> = None;
        for answer in answers {
            let holdings = match answer {
                Ok(h) => h,
                Err(e) => {
                    first_error.get_or_insert(e);
                    continue;
                }
            };
            info.answered += 1;
            info.fencing_token = info.fencing_token.max(holdings.fence);
            for holding in holdings.holders {
                let owner = holding.owner.as_deref().and_then(Owner::decode);
                match by_token.get(&holding.token) {
                    Some(&i) => {
                        let h = &mut info.holders[i];
                        h.masters += 1;
                        h.ttl = h.ttl.min(holding.ttl);
                        if h.owner.is_none() {
                            h.owner = owner;
                        }
                    }
                    None => {
                        by_token.insert(holding.token.clone(), info.holders.len());
                        let id = String::from_utf8_lossy(&holding.token)
                            .chars()
                            .take(8)
                            .collect();
                        info.holders.push(HolderInfo {
                            id,
                            owner,
                            ttl: holding.ttl,
                            masters: 1,
                        });
                    }
                }
            }
        }
        if info.answered == 0
            && let Some(e) = first_error
        {
            return Err(e);
        }
        info.holders.sort_by_key(|h| std::cmp::Reverse(h.masters));
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_round_trip_and_garbage_is_none() {
        let since = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let owner = Owner::here(since);
        assert_eq!(Owner::decode(&owner.encode()), Some(owner.clone()));
        assert_eq!(owner.pid, std::process::id());
        for garbage in [
            "",
            "lc1",
            "lc2\th\t1\tp\t0",
            "lc1\th\tpid\tp\t0",
            "lc1\th\t1\tp\t-5",
        ] {
            assert_eq!(Owner::decode(garbage), None, "{garbage:?}");
        }
    }
}
