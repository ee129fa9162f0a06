//! What a guard holds: the lock primitive and its name(s), owned, as the
//! masters' tasks and the guard keep it.

use std::time::Duration;

use crate::store::Claim;

/// An owned [`Claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    /// An exclusive lock on one name, or on several (sorted, distinct).
    Exclusive(Vec<String>),
    /// The cache's lock for one load (`Claim::Load`: nothing left behind).
    Load(String),
    /// A reader of a reader-writer lock.
    Read(String),
    /// The writer of a reader-writer lock.
    Write { name: String, queue: Duration },
    /// A semaphore permit.
    Permit { name: String, limit: u32 },
}

impl Claimed {
    pub fn as_claim(&self) -> Claim<'_> {
        match self {
            Claimed::Exclusive(names) => Claim::Exclusive(names),
            Claimed::Load(name) => Claim::Load(name),
            Claimed::Read(name) => Claim::Read(name),
            Claimed::Write { name, queue } => Claim::Write {
                name,
                queue: *queue,
            },
            Claimed::Permit { name, limit } => Claim::Permit {
                name,
                limit: *limit,
            },
        }
    }

    /// The (first) name.
    pub fn name(&self) -> &str {
        match self {
            Claimed::Exclusive(names) => &names[0],
            Claimed::Load(name)
            | Claimed::Read(name)
            | Claimed::Write { name, .. }
            | Claimed::Permit { name, .. } => name,
        }
    }

    /// The names whose releases are published (and waited for).
    pub fn names(&self) -> Vec<&str> {
        match self {
            Claimed::Exclusive(names) => names.iter().map(String::as_str).collect(),
            _ => vec![self.name()],
        }
    }

    /// The in-process line the claim queues in, for claims that exclude each
    /// other within a process too (not readers or permits, which many tasks of
    /// one process may hold at once).
    pub fn line(&self) -> Option<String> {
        match self {
            Claimed::Exclusive(names) => Some(names.join("\n")),
            Claimed::Load(name) | Claimed::Write { name, .. } => Some(name.clone()),
            Claimed::Read(_) | Claimed::Permit { .. } => None,
        }
    }
}
