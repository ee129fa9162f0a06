//! Tags and clear ([`Builder::tags`](crate::Builder::tags)): invalidating every
//! entry that carries a tag, or every entry of the cache, in a constant number
//! of commands, without a `SCAN` or `KEYS`.
//!
//! Each tag has a *version* in Redis (`tag.<prefix>{#<id>}`, a random number
//! written by [`invalidate_tag`](crate::LockedCache::invalidate_tag)), and the
//! cache a *generation* (`tag.<prefix>{*}`, written by
//! [`clear`](crate::LockedCache::clear)); absent, either is 0. A value is
//! stored with its *marks* (`codec/envelope.rs`): the generation and its tags'
//! versions as they were when its load began. A read compares them with the
//! current ones: any difference and the value is a miss (reloaded and
//! overwritten), left otherwise to expire by its TTL. So an invalidation is one
//! `SET` and one `PUBLISH`, whatever the number of entries, and nothing grows
//! per entry.
//!
//! The current versions are kept in process ([`Known`]), each trusted for the
//! refresh interval ([`Builder::tag_refresh`](crate::Builder::tag_refresh),
//! 1 s by default) and refetched (one `GET` per tag, on the call that needs it)
//! once older, or at once when an invalidation message arrives on the near
//! cache's channel. That interval bounds how long a process that missed the
//! message (no near cache, or its subscription down) may serve an invalidated
//! entry. A mismatch with a version fetched earlier than the call is checked
//! again against Redis before the value is given up (the entry may be newer
//! than what this process knew).
//!
//! Versions live [`tag_ttl`](crate::Builder::tag_ttl) (7 days by default);
//! a tagged entry lives at most as long in Redis, so that an entry loaded
//! before an invalidation never outlives the version that invalidated it.
//!
//! The judgement is a pure function of (the entry's marks, the known
//! versions): [`verdict`], unit-tested below without Redis.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::Inner;
use crate::codec::{self, Codec, MAX_TAGS, Marks};
use crate::error::{Error, Result};
use crate::store::Stored;

/// The id of a tag: FNV-1a (64 bits) of its name. Two names with one id
/// share a version: invalidating one invalidates the other too (a spurious
/// miss, never a stale hit).
pub const fn tag_id(name: &str) -> u64 {
    let bytes = name.as_bytes();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// The tags of a call: up to [`MAX_TAGS`] ids, in the order given, without
/// repeats. `Copy`, so that [`CallOptions`](crate::CallOptions) stays a
/// constant-friendly value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TagSet {
    ids: [u64; MAX_TAGS],
    len: u8,
    /// More tags were given than fit: refused when the options are resolved.
    overflow: bool,
}

impl TagSet {
    /// No tags.
    pub const fn new() -> TagSet {
        TagSet {
            ids: [0; MAX_TAGS],
            len: 0,
            overflow: false,
        }
    }

    /// With the tag named `name` too.
    pub const fn with(mut self, name: &str) -> TagSet {
        let id = tag_id(name);
        let mut i = 0;
        while i < self.len as usize {
            if self.ids[i] == id {
                return self;
            }
            i += 1;
        }
        if self.len as usize == MAX_TAGS {
            self.overflow = true;
            return self;
        }
        self.ids[self.len as usize] = id;
        self.len += 1;
        self
    }

    /// The ids.
    pub fn ids(&self) -> &[u64] {
        &self.ids[..usize::from(self.len)]
    }

    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub const fn overflowed(&self) -> bool {
        self.overflow
    }

    /// These tags, or `fallback`'s when none is set.
    pub const fn or(self, fallback: TagSet) -> TagSet {
        if self.len == 0 && !self.overflow {
            fallback
        } else {
            self
        }
    }
}

/// The Redis key of the version of tag `id` under `prefix`.
pub fn tag_key(prefix: &str, id: u64) -> String {
    format!("{TAG_PREFIX}{prefix}{{#{id:016x}}}")
}

/// The Redis key of the generation of the cache under `prefix`.
pub fn generation_key(prefix: &str) -> String {
    format!("{TAG_PREFIX}{prefix}{{*}}")
}

/// The key space of tag versions and generations (no prefix may start so).
pub const TAG_PREFIX: &str = "tag.";

/// What a read decides about a stored value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Loaded after every invalidation it could be subject to: serve it.
    Current,
    /// Invalidated (by `clear` or one of its tags) since it was loaded.
    Invalidated,
    /// These versions must be fetched first: the generation (`None`) and the
    /// tags whose ids are listed.
    Unknown(Vec<Option<u64>>),
}

/// Judges the marks of a stored value (`None`: unmarked) against the known
/// versions: `generation` and `tag` answer `None` for a version not known
/// (or no longer trusted).
pub fn verdict(
    marks: Option<&Marks>,
    generation: Option<u64>,
    tag: impl Fn(u64) -> Option<u64>,
) -> Verdict {
    let (entry_generation, tags) = match marks {
        Some(marks) => (marks.generation, marks.tags.as_slice()),
        None => (0, &[][..]),
    };
    let mut unknown = Vec::new();
    let mut invalidated = false;
    match generation {
        None => unknown.push(None),
        Some(current) => invalidated |= current != entry_generation,
    }
    for &(id, version) in tags {
        match tag(id) {
            None => unknown.push(Some(id)),
            Some(current) => invalidated |= current != version,
        }
    }
    if invalidated {
        Verdict::Invalidated
    } else if unknown.is_empty() {
        Verdict::Current
    } else {
        Verdict::Unknown(unknown)
    }
}

/// One version as this process knows it.
#[derive(Debug, Clone, Copy)]
struct Version {
    value: u64,
    fetched: Instant,
    /// The [`Known::epoch`] when it was fetched.
    epoch: u64,
}

/// The versions this process knows, each trusted for the refresh interval,
/// and until the epoch changes (an invalidation message, a lost
/// subscription).
#[derive(Debug)]
pub struct Known {
    refresh: Duration,
    /// Bumped whenever what is known may be out of date at once.
    epoch: Arc<AtomicU64>,
    generation: Mutex<Option<Version>>,
    tags: Mutex<HashMap<u64, Version>>,
}

/// How many tag versions a process keeps before it forgets them all (they are
/// refetched as needed): bounds the map whatever the number of tags in use.
const MAX_KNOWN_TAGS: usize = 100_000;

impl Known {
    pub fn new(refresh: Duration, epoch: Arc<AtomicU64>) -> Known {
        Known {
            refresh,
            epoch,
            generation: Mutex::new(None),
            tags: Mutex::new(HashMap::new()),
        }
    }

    /// What may be trusted of `version` now.
    fn trusted(&self, version: Option<&Version>, now: Instant) -> Option<u64> {
        let epoch = self.epoch.load(Ordering::Acquire);
        version
            .filter(|v| v.epoch == epoch && now.duration_since(v.fetched) < self.refresh)
            .map(|v| v.value)
    }

    /// The trusted generation.
    pub fn generation(&self, now: Instant) -> Option<u64> {
        let known = self.generation.lock().unwrap_or_else(|e| e.into_inner());
        self.trusted(known.as_ref(), now)
    }

    /// The trusted version of tag `id`.
    pub fn tag(&self, id: u64, now: Instant) -> Option<u64> {
        let known = self.tags.lock().unwrap_or_else(|e| e.into_inner());
        self.trusted(known.get(&id), now)
    }

    /// When the version (`None`: the generation) was fetched, if it is known.
    pub fn fetched(&self, which: Option<u64>) -> Option<Instant> {
        match which {
            None => self
                .generation
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .map(|v| v.fetched),
            Some(id) => self
                .tags
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&id)
                .map(|v| v.fetched),
        }
    }

    /// Records a version read from Redis (or written by this process) at
    /// `fetched`, with the epoch read before the fetch began.
    pub fn record(&self, which: Option<u64>, value: u64, fetched: Instant, epoch: u64) {
        let version = Version {
            value,
            fetched,
            epoch,
        };
        match which {
            None => *self.generation.lock().unwrap_or_else(|e| e.into_inner()) = Some(version),
            Some(id) => {
                let mut tags = self.tags.lock().unwrap_or_else(|e| e.into_inner());
                if tags.len() >= MAX_KNOWN_TAGS && !tags.contains_key(&id) {
                    tags.clear();
                }
                tags.insert(id, version);
            }
        }
    }

    /// The epoch now (read before a fetch, recorded with its result).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Distrusts everything known (what a near cache clear does through the
    /// shared epoch).
    #[cfg(test)]
    pub fn distrust(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }
}

/// A version as stored: decimal digits; anything else (absent, foreign
/// bytes) reads as 0.
pub fn parse_version(bytes: Option<&[u8]>) -> u64 {
    bytes
        .and_then(|b| std::str::from_utf8(b).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// A new version: random, never 0 (0 is "never invalidated").
pub fn new_version() -> u64 {
    fastrand::u64(1..)
}

// ---------------------------------------------------------------------------
// The cache's side: screening what it reads, marking what it stores, and the
// invalidations themselves.

/// How many times a read fetches versions before it gives up on trusting
/// them (invalidation messages arriving all the while): then the value is
/// taken as invalidated, which costs a reload, never a stale hit.
const MAX_FETCHES: usize = 3;

impl<C: Codec> Inner<C> {
    /// `stored` unless tags are on and it was invalidated since it was loaded
    /// (then `None`: a miss, reloaded and overwritten).
    pub(super) async fn screen(&self, stored: Option<Stored>) -> Result<Option<Stored>> {
        let (Some(known), Some(found)) = (&self.tags, &stored) else {
            return Ok(stored);
        };
        let marks = codec::marks(&found.bytes);
        if self.is_current(known, marks.as_ref()).await? {
            Ok(stored)
        } else {
            Ok(None)
        }
    }

    /// [`screen`](Self::screen) for each of a batch's values.
    pub(super) async fn screen_many(
        &self,
        stored: Vec<Option<Stored>>,
    ) -> Result<Vec<Option<Stored>>> {
        if self.tags.is_none() {
            return Ok(stored);
        }
        let mut screened = Vec::with_capacity(stored.len());
        for one in stored {
            screened.push(self.screen(one).await?);
        }
        Ok(screened)
    }

    /// Whether a value with `marks` is current, fetching the versions this
    /// process does not trust, and those a mismatch is judged by that were
    /// fetched before the call began (the value may be newer than they are).
    async fn is_current(&self, known: &Known, marks: Option<&Marks>) -> Result<bool> {
        let began = Instant::now();
        let mut rechecked = false;
        for _ in 0..MAX_FETCHES {
            let now = Instant::now();
            match verdict(marks, known.generation(now), |id| known.tag(id, now)) {
                Verdict::Current => return Ok(true),
                Verdict::Unknown(which) => drop(self.fetch_versions(known, &which).await?),
                Verdict::Invalidated if rechecked => return Ok(false),
                Verdict::Invalidated => {
                    let mut which = vec![None];
                    which.extend(
                        marks
                            .iter()
                            .flat_map(|m| m.tags.iter().map(|&(id, _)| Some(id))),
                    );
                    which.retain(|&w| known.fetched(w).is_none_or(|at| at < began));
                    if which.is_empty() {
                        return Ok(false);
                    }
                    self.fetch_versions(known, &which).await?;
                    rechecked = true;
                }
            }
        }
        Ok(false)
    }

    /// Reads the versions `which` (`None`: the generation) from the value
    /// server, at once, records them, and returns them in order.
    async fn fetch_versions(&self, known: &Known, which: &[Option<u64>]) -> Result<Vec<u64>> {
        let epoch = known.epoch();
        let fetched = Instant::now();
        let reads = which.iter().map(|&w| {
            let key = self.version_key(w);
            async move { self.value_store.get(&key).await }
        });
        let values = futures_util::future::try_join_all(reads).await?;
        let versions: Vec<u64> = values.iter().map(|v| parse_version(v.as_deref())).collect();
        for (&w, &version) in which.iter().zip(&versions) {
            known.record(w, version, fetched, epoch);
        }
        Ok(versions)
    }

    /// The Redis key of a version: the generation (`None`) or a tag's.
    fn version_key(&self, which: Option<u64>) -> String {
        match which {
            None => generation_key(&self.key_prefix),
            Some(id) => tag_key(&self.key_prefix, id),
        }
    }

    /// The marks of a value whose load (or `set`) begins now with `tags`:
    /// `None` when it needs none (tags off, or never cleared and no tags).
    /// The versions are read from Redis now (one round trip, the `GET`s at
    /// once), not taken from what this process knows: a load that began after
    /// an invalidation must carry its version, or every reader would take it
    /// for an older entry and load it again.
    pub(super) async fn marks_for(&self, tags: &TagSet) -> Result<Option<Marks>> {
        let Some(known) = &self.tags else {
            if tags.is_empty() {
                return Ok(None);
            }
            return Err(tags_off());
        };
        let mut which = vec![None];
        which.extend(tags.ids().iter().map(|&id| Some(id)));
        let versions = self.fetch_versions(known, &which).await?;
        let generation = versions[0];
        if generation == 0 && tags.is_empty() {
            return Ok(None);
        }
        let tags = tags
            .ids()
            .iter()
            .copied()
            .zip(versions[1..].iter().copied())
            .collect();
        Ok(Some(Marks { generation, tags }))
    }

    /// Writes a new version under `which` (`None`: the generation): one `SET`,
    /// then an invalidation message on the near cache's channel.
    pub(super) async fn invalidate_version(&self, which: Option<u64>) -> Result<()> {
        let Some(known) = &self.tags else {
            return Err(tags_off());
        };
        let key = self.version_key(which);
        let version = new_version();
        let epoch = known.epoch();
        let ttl = match which {
            // One key per cache: it may live as long as any value.
            None => super::builder::MAX_TTL,
            Some(_) => self.tag_ttl,
        };
        self.value_store
            .set(&key, version.to_string().as_bytes(), ttl)
            .await?;
        known.record(which, version, Instant::now(), epoch);
        // The near caches (here and elsewhere) clear on a message that names
        // no key of theirs, and their known versions are distrusted.
        self.changed(&key).await;
        Ok(())
    }
}

fn tags_off() -> Error {
    Error::InvalidConfig("tags and clear need Builder::tags(true)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marks(generation: u64, tags: &[(u64, u64)]) -> Marks {
        Marks {
            generation,
            tags: tags.to_vec(),
        }
    }

    #[test]
    fn an_unmarked_value_is_current_until_the_first_clear() {
        assert_eq!(verdict(None, Some(0), |_| None), Verdict::Current);
        assert_eq!(verdict(None, Some(7), |_| None), Verdict::Invalidated);
        assert_eq!(verdict(None, None, |_| None), Verdict::Unknown(vec![None]));
    }

    #[test]
    fn a_marked_value_is_current_while_every_version_matches() {
        let m = marks(5, &[(1, 10), (2, 0)]);
        let known = |id| match id {
            1 => Some(10),
            2 => Some(0),
            _ => None,
        };
        assert_eq!(verdict(Some(&m), Some(5), known), Verdict::Current);
        assert_eq!(verdict(Some(&m), Some(6), known), Verdict::Invalidated);
        let invalidated_tag = |id| if id == 2 { Some(3) } else { Some(10) };
        assert_eq!(
            verdict(Some(&m), Some(5), invalidated_tag),
            Verdict::Invalidated
        );
        assert_eq!(
            verdict(Some(&m), Some(5), |id| (id == 1).then_some(10)),
            Verdict::Unknown(vec![Some(2)])
        );
        // Known to differ wins over unknown: no fetch needed to refuse.
        assert_eq!(verdict(Some(&m), Some(9), |_| None), Verdict::Invalidated);
    }

    #[test]
    fn tag_sets_dedupe_cap_and_fall_back() {
        const SET: TagSet = TagSet::new().with("a").with("b").with("a");
        assert_eq!(SET.ids(), &[tag_id("a"), tag_id("b")]);
        let mut many = TagSet::new();
        for i in 0..MAX_TAGS + 1 {
            many = many.with(&format!("t{i}"));
        }
        assert!(many.overflowed());
        assert_eq!(many.ids().len(), MAX_TAGS);
        assert_eq!(TagSet::new().or(SET), SET);
        assert_eq!(SET.or(TagSet::new()), SET);
        assert_ne!(tag_id("user:1"), tag_id("user:2"));
    }

    #[test]
    fn known_versions_expire_with_the_refresh_and_the_epoch() {
        let epoch = Arc::new(AtomicU64::new(0));
        let known = Known::new(Duration::from_millis(100), Arc::clone(&epoch));
        let t0 = Instant::now();
        assert_eq!(known.generation(t0), None);
        known.record(None, 0, t0, known.epoch());
        known.record(Some(1), 42, t0, known.epoch());
        assert_eq!(known.generation(t0), Some(0));
        assert_eq!(known.tag(1, t0 + Duration::from_millis(50)), Some(42));
        assert_eq!(known.tag(1, t0 + Duration::from_millis(100)), None);
        assert_eq!(known.tag(tag_id("x"), t0), None, "x unknown");
        known.record(Some(tag_id("x")), 3, t0, known.epoch());
        assert_eq!(known.tag(tag_id("x"), t0), Some(3));
        known.distrust();
        assert_eq!(known.generation(t0), None, "a new epoch distrusts all");
    }

    #[test]
    fn versions_parse_leniently() {
        assert_eq!(parse_version(None), 0);
        assert_eq!(parse_version(Some(b"123")), 123);
        assert_eq!(parse_version(Some(b"\xff")), 0);
        assert_ne!(new_version(), 0);
    }
}
