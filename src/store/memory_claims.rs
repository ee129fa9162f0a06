//! The lock primitives of [`MemoryStore`](super::MemoryStore), with the
//! semantics of the claim scripts in `scripts.rs` (see `claims.rs` for the
//! keys): exclusive names and writers are plain entries holding the token,
//! readers and permits are sets of tokens with expiries, and each name has a
//! fencing counter and owner entries.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::claims::{self, Claim, Holding, Holdings};
use super::memory::State;

/// The claim state that is not a plain entry.
#[derive(Debug, Default)]
pub struct Claims {
    /// Readers and permits, by their sorted-set key: token → expiry.
    members: HashMap<String, HashMap<Vec<u8>, Instant>>,
    /// Fencing counters and owners, by meta key.
    meta: HashMap<String, Meta>,
}

#[derive(Debug)]
struct Meta {
    fence: u64,
    owners: HashMap<Vec<u8>, String>,
    expires_at: Instant,
}

impl Claims {
    fn live_members(
        &mut self,
        key: &str,
        now: Instant,
        meta: &str,
    ) -> &mut HashMap<Vec<u8>, Instant> {
        let set = self.members.entry(key.to_owned()).or_default();
        let gone: Vec<Vec<u8>> = set
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(t, _)| t.clone())
            .collect();
        if let Some(m) = self.meta.get_mut(meta) {
            for token in &gone {
                m.owners.remove(token);
            }
        }
        set.retain(|_, until| *until > now);
        set
    }

    fn meta(&mut self, key: &str, now: Instant) -> Option<&mut Meta> {
        if self.meta.get(key).is_some_and(|m| m.expires_at <= now) {
            self.meta.remove(key);
        }
        self.meta.get_mut(key)
    }

    fn last_fence(&mut self, key: &str, now: Instant) -> u64 {
        self.meta(key, now).map_or(0, |m| m.fence)
    }

    /// Advances the counter (seeded from the clock, in microseconds, when
    /// there is none) and records the owner.
    fn next_fence(
        &mut self,
        key: &str,
        token: &[u8],
        owner: &str,
        keep: Duration,
        now: Instant,
    ) -> u64 {
        let seed = || {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| d.as_micros() as u64)
        };
        let fence = self.meta(key, now).map_or_else(seed, |m| m.fence + 1);
        let meta = self.meta.entry(key.to_owned()).or_insert_with(|| Meta {
            fence: 0,
            owners: HashMap::new(),
            expires_at: now,
        });
        meta.fence = fence;
        meta.owners.insert(token.to_vec(), owner.to_owned());
        meta.expires_at = meta.expires_at.max(now + keep);
        fence
    }

    fn forget_owner(&mut self, key: &str, token: &[u8]) {
        if let Some(m) = self.meta.get_mut(key) {
            m.owners.remove(token);
        }
    }

    fn forget_owners(&mut self, key: &str) {
        if let Some(m) = self.meta.get_mut(key) {
            m.owners.clear();
        }
    }
}

impl State {
    pub fn claim(
        &mut self,
        claim: Claim<'_>,
        token: &[u8],
        expiry: Duration,
        owner: &str,
    ) -> Option<Vec<u64>> {
        let now = Instant::now();
        let keep = claims::meta_keep_for(claim, expiry);
        match claim {
            Claim::Load(name) => {
                // The lock entry alone (see `CLAIM_LOAD`): the token is the
                // clock, in microseconds.
                if self.live(name).is_some_and(|held| held != token) {
                    return None;
                }
                if !self.holds(name, token) {
                    self.put(name, token, expiry);
                }
                let micros = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(1, |d| d.as_micros() as u64);
                Some(vec![micros])
            }
            Claim::Exclusive(_) => {
                let names = claim.names();
                if names
                    .iter()
                    .any(|n| self.live(n).is_some_and(|held| held != token))
                {
                    return None;
                }
                let mut fences = Vec::with_capacity(names.len());
                for name in names {
                    let meta = claims::meta_key(name);
                    if self.holds(name, token) {
                        fences.push(self.claims.last_fence(&meta, now));
                    } else {
                        self.put(name, token, expiry);
                        self.claims.forget_owners(&meta);
                        fences.push(self.claims.next_fence(&meta, token, owner, keep, now));
                    }
                }
                Some(fences)
            }
            Claim::Read(name) => {
                let (readers, meta) = (claims::readers_key(name), claims::meta_key(name));
                self.claims.live_members(&readers, now, &meta);
                if self.live(name).is_some() {
                    return None;
                }
                if self
                    .claims
                    .live_members(&readers, now, &meta)
                    .contains_key(token)
                {
                    return Some(vec![self.claims.last_fence(&meta, now)]);
                }
                if self.live(&claims::writer_waiting_key(name)).is_some() {
                    return None;
                }
                self.claims
                    .live_members(&readers, now, &meta)
                    .insert(token.to_vec(), now + expiry);
                Some(vec![self.claims.next_fence(&meta, token, owner, keep, now)])
            }
            Claim::Write { name, queue } => {
                let (readers, meta) = (claims::readers_key(name), claims::meta_key(name));
                let waiting_key = claims::writer_waiting_key(name);
                let busy = !self.claims.live_members(&readers, now, &meta).is_empty();
                match self.live(name) {
                    Some(held) if held == token => {
                        return Some(vec![self.claims.last_fence(&meta, now)]);
                    }
                    Some(_) => return None,
                    None => {}
                }
                if self.live(&waiting_key).is_some_and(|w| w != token) {
                    return None;
                }
                if busy {
                    self.put(&waiting_key, token, queue);
                    return None;
                }
                self.put(name, token, expiry);
                self.entries.remove(&waiting_key);
                self.claims.forget_owners(&meta);
                Some(vec![self.claims.next_fence(&meta, token, owner, keep, now)])
            }
            Claim::Permit { name, limit } => {
                let (permits, meta) = (claims::permits_key(name), claims::meta_key(name));
                let set = self.claims.live_members(&permits, now, &meta);
                if set.contains_key(token) {
                    return Some(vec![self.claims.last_fence(&meta, now)]);
                }
                if set.len() >= limit as usize {
                    return None;
                }
                set.insert(token.to_vec(), now + expiry);
                Some(vec![self.claims.next_fence(&meta, token, owner, keep, now)])
            }
        }
    }

    pub fn renew(&mut self, claim: Claim<'_>, token: &[u8], expiry: Duration) -> bool {
        let now = Instant::now();
        match member_key(claim) {
            None => {
                let names = claim.names();
                if !names.iter().all(|n| self.holds(n, token)) {
                    return false;
                }
                for name in names {
                    if let Some(entry) = self.entries.get_mut(name) {
                        entry.expires_at = now + expiry;
                    }
                }
                true
            }
            Some(members) => {
                let meta = claims::meta_key(claim.names()[0]);
                match self
                    .claims
                    .live_members(&members, now, &meta)
                    .get_mut(token)
                {
                    Some(until) => {
                        *until = now + expiry;
                        true
                    }
                    None => false,
                }
            }
        }
    }

    /// The names released (to publish), or `Err(true)` when another token
    /// holds one and none was ours, `Err(false)` when none was there.
    pub fn unclaim(&mut self, claim: Claim<'_>, token: &[u8]) -> Result<Vec<String>, bool> {
        let now = Instant::now();
        let names = claim.names();
        let meta = claims::meta_key(names[0]);
        match member_key(claim) {
            None => {
                let (mut released, mut others) = (Vec::new(), false);
                for name in names {
                    match self.live(name) {
                        Some(held) if held == token => {
                            self.entries.remove(name);
                            self.claims.forget_owner(&claims::meta_key(name), token);
                            released.push(name.to_owned());
                        }
                        Some(_) => others = true,
                        None => {}
                    }
                }
                if released.is_empty() {
                    Err(others)
                } else {
                    Ok(released)
                }
            }
            Some(members) => {
                if self
                    .claims
                    .live_members(&members, now, &meta)
                    .remove(token)
                    .is_some()
                {
                    self.claims.forget_owner(&meta, token);
                    Ok(vec![names[0].to_owned()])
                } else {
                    Err(false)
                }
            }
        }
    }

    pub fn raise_fence(&mut self, claim: Claim<'_>, fences: &[u64]) {
        if let Claim::Load(_) = claim {
            return; // as on Redis: nothing to raise beyond the lock's life
        }
        let now = Instant::now();
        for (name, fence) in claim.names().into_iter().zip(fences) {
            let meta = self
                .claims
                .meta
                .entry(claims::meta_key(name))
                .or_insert_with(|| Meta {
                    fence: 0,
                    owners: HashMap::new(),
                    expires_at: now,
                });
            meta.fence = meta.fence.max(*fence);
            meta.expires_at = meta.expires_at.max(now + claims::META_KEEP);
        }
    }

    pub fn holders(&mut self, claim: Claim<'_>) -> Holdings {
        let now = Instant::now();
        let name = claim.names()[0];
        let meta = claims::meta_key(name);
        let mut holders = Vec::new();
        let owner_of = |claims: &mut Claims, token: &[u8]| {
            claims
                .meta(&meta, now)
                .and_then(|m| m.owners.get(token).cloned())
        };
        let add = |claims: &mut Claims, members: &str, holders: &mut Vec<Holding>| {
            let set: Vec<(Vec<u8>, Instant)> = claims
                .live_members(members, now, &meta)
                .iter()
                .map(|(t, u)| (t.clone(), *u))
                .collect();
            for (token, until) in set {
                let owner = owner_of(claims, &token);
                holders.push(Holding {
                    token,
                    ttl: until - now,
                    owner,
                });
            }
        };
        if let Claim::Permit { .. } = claim {
            add(&mut self.claims, &claims::permits_key(name), &mut holders);
        } else {
            if let Some(entry) = self.entries.get(name).filter(|e| e.expires_at > now) {
                let (token, ttl) = (entry.value.clone(), entry.expires_at - now);
                let owner = owner_of(&mut self.claims, &token);
                holders.push(Holding { token, ttl, owner });
            }
            add(&mut self.claims, &claims::readers_key(name), &mut holders);
        }
        let fence = self.claims.last_fence(&meta, now);
        Holdings { fence, holders }
    }
}

/// The sorted-set key of a member claim (readers, permits); `None` for keyed
/// claims (exclusive names, a writer).
fn member_key(claim: Claim<'_>) -> Option<String> {
    match claim {
        Claim::Read(name) => Some(claims::readers_key(name)),
        Claim::Permit { name, .. } => Some(claims::permits_key(name)),
        _ => None,
    }
}
