//! Redlock: a distributed lock over N independent Redis masters (N = 1 is valid),
//! as described on redis.io, with pub/sub wake-ups for waiters.
//!
//! Acquiring sends `SET resource token NX PX expiry` to every master at once; the
//! lock is held when a majority answered OK and the validity left
//! (`expiry - elapsed - drift`) is positive. Otherwise the partial acquisition is
//! undone on every master and the caller retries after a randomised delay, or
//! earlier when a release is published, until the wait time is spent. Release and
//! extension are compare-and-delete / compare-and-pexpire Lua scripts, so only the
//! holder of the token can do either.
//!
//! ```no_run
//! # async fn demo() -> Result<(), locked_cache::Error> {
//! use locked_cache::{LockOptions, Redlock};
//!
//! let lock = Redlock::connect(
//!     &["redis://10.0.0.1:6379", "redis://10.0.0.2:6379", "redis://10.0.0.3:6379"],
//!     LockOptions::default(),
//! )
//! .await?;
//! let guard = lock.acquire("lock.nightly-report").await?;
//! // ... work that must not run twice at once ...
//! guard.release().await?;
//! # Ok(()) }
//! ```

mod claim;
mod fencing;
mod guard;
mod inspect;
mod local;
mod multi;
mod quorum;
mod run_once;
mod rwlock;
mod semaphore;
mod token;
mod vote;
mod wakeups;
mod watchdog;

use claim::Claimed;
pub use guard::LockGuard;
pub use inspect::{HolderInfo, LockInfo, Owner};
use quorum::quorum;
pub(crate) use quorum::validity;
pub use run_once::RunOnce;
pub use rwlock::RwLock;
pub use semaphore::Semaphore;
pub(crate) use watchdog::Watchdog;
pub use watchdog::{LockLost, LostSignal};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::defaults::{
    DEFAULT_CHANNEL, DEFAULT_CONNECT_TIMEOUT, DEFAULT_LOCK_EXPIRY, DEFAULT_MASTER_TIMEOUT,
    DEFAULT_RETRY, DEFAULT_WAIT,
};
use crate::error::{Error, Result};
use crate::stats::Stats;
use crate::store::redis::ConnectionOptions;
use crate::store::{MemoryStore, RedisStore, SharedStore};
use local::Lines;
pub(crate) use token::Token;
use vote::{Ballot, Decision, Health};
pub(crate) use wakeups::Waiter;
use wakeups::{Listeners, Registry};

/// How a [`Redlock`] takes and waits for locks. Plain data: build it with
/// struct-update syntax from `LockOptions::default()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockOptions {
    /// How long a lock lives on the masters unless extended or released.
    /// Defaults to [`DEFAULT_LOCK_EXPIRY`] (5 s). Longer: a crashed holder blocks
    /// others for longer. Shorter: more extension traffic, and a holder paused
    /// (GC, swap) for longer than this loses the lock. The cache extends the lock
    /// while a loader runs, so this does not bound the load time.
    pub expiry: Duration,
    /// How long [`Redlock::acquire`] (and a cache miss) waits for the lock before
    /// giving up with [`Error::LockTimeout`]. Defaults to [`DEFAULT_WAIT`] (10 s),
    /// twice the expiry, so that a waiter outlives a holder that crashed.
    pub wait: Duration,
    /// Pause between attempts, randomised ±50%. Defaults to [`DEFAULT_RETRY`]
    /// (100 ms). With wake-ups on, this is only the fallback when a wake-up
    /// (the value stored, or the lock released) is lost; with them off, it is
    /// how late a waiter notices the value. Shorter: lower worst-case latency,
    /// more Redis commands per waiting process. After a split vote (nobody won
    /// a majority) the pause is shorter: 1–3 ms, doubling with each split in a
    /// row up to this.
    pub retry: Duration,
    /// The Redlock spec's per-master timeout: once a majority of masters has
    /// answered an acquisition without deciding it (split votes), the attempt
    /// waits at most this long (from its start) for the rest. A master whose
    /// last command found it unreachable is not waited for at all. Defaults to
    /// [`DEFAULT_MASTER_TIMEOUT`] (50 ms). Shorter: a stalled minority master
    /// costs less per contended attempt; too short on a network whose masters
    /// answer at very different speeds: more split votes. It never fails a
    /// call: an undecided attempt is retried. Capped at a quarter of the
    /// expiry; must be positive and at most 1 h.
    pub master_timeout: Duration,
    /// Wake waiters by pub/sub as soon as a lock is released. Defaults to `true`.
    /// Off: one fewer connection per master, and waiters poll every `retry`.
    pub wake_ups: bool,
    /// The pub/sub channel releases are published on. Defaults to
    /// [`DEFAULT_CHANNEL`]. All processes sharing locks must use the same one.
    pub channel: String,
    /// Give each guard of the public API a watchdog that extends the lock
    /// every third of its expiry while the guard lives. Defaults to `true`.
    /// Off: a guard's lock expires after its expiry unless the holder calls
    /// [`LockGuard::extend`] (or a single acquisition opts out with
    /// [`LockGuard::stop_watchdog`]); a holder that hangs then frees the lock
    /// after the expiry instead of keeping it. The lost-lock signal works
    /// either way. (The cache's own loads always keep their lock alive.)
    pub watchdog: bool,
}

impl Default for LockOptions {
    fn default() -> Self {
        LockOptions {
            expiry: DEFAULT_LOCK_EXPIRY,
            wait: DEFAULT_WAIT,
            retry: DEFAULT_RETRY,
            master_timeout: DEFAULT_MASTER_TIMEOUT,
            wake_ups: true,
            channel: DEFAULT_CHANNEL.to_owned(),
            watchdog: true,
        }
    }
}

impl LockOptions {
    /// Rejects settings that cannot work.
    pub fn validate(&self) -> Result<()> {
        let invalid = |m: &str| Err(Error::InvalidConfig(m.to_owned()));
        check_expiry(self.expiry)?;
        if self.retry.is_zero() || self.retry > Duration::from_secs(3600) {
            return invalid("retry time must be positive and at most 1 h");
        }
        check_wait(self.wait)?;
        if self.master_timeout.is_zero() || self.master_timeout > Duration::from_secs(3600) {
            return invalid("master timeout must be positive and at most 1 h");
        }
        if self.channel.is_empty() {
            return invalid("release channel must not be empty");
        }
        Ok(())
    }
}

/// A lock expiry must be 10 ms to 24 h: in the options, and when given to
/// [`Redlock::acquire_with`], [`Redlock::try_acquire`] or [`LockGuard::extend`].
fn check_expiry(expiry: Duration) -> Result<()> {
    let invalid = |m: &str| Err(Error::InvalidConfig(m.to_owned()));
    if expiry < Duration::from_millis(10) {
        return invalid("lock expiry must be at least 10 ms");
    }
    if expiry > Duration::from_secs(24 * 3600) {
        return invalid("lock expiry must be at most 24 h");
    }
    Ok(())
}

/// A wait time must be at most 24 h.
fn check_wait(wait: Duration) -> Result<()> {
    if wait > Duration::from_secs(24 * 3600) {
        let message = "wait time must be at most 24 h";
        return Err(Error::InvalidConfig(message.into()));
    }
    Ok(())
}

/// A distributed lock over one or more independent Redis masters (or the
/// embedded store). Cheap to clone; clones share connections and wake-ups.
#[derive(Debug, Clone)]
pub struct Redlock {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    masters: Vec<SharedStore>,
    /// Which masters were unreachable at their last command.
    health: Arc<Health>,
    options: LockOptions,
    registry: Arc<Registry>,
    listeners: Option<Listeners>,
    lines: Arc<Lines>,
    stats: Arc<Stats>,
}

/// What one acquisition attempt found.
pub(crate) enum Attempt {
    Acquired(LockGuard),
    /// Enough masters answered, but someone else holds the lock, or the votes
    /// split (`split`: this attempt was granted by some masters, not a majority).
    Held {
        split: bool,
    },
    /// Too few masters are reachable to reach a majority: the others refused
    /// the connection, dropped it, or did not answer within the command timeout.
    NoQuorum {
        reachable: usize,
    },
}

/// How many split votes in a row an acquisition has seen; the pause after the
/// next one doubles with each (randomised), so that contenders that keep
/// splitting the masters stop retrying in step.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Splits(u32);

impl Splits {
    /// Counts `outcome`: a split adds one, anything else starts over.
    pub(crate) fn after(&mut self, outcome: &Attempt) {
        self.0 = match outcome {
            Attempt::Held { split: true } => self.0.saturating_add(1),
            _ => 0,
        };
    }
}

impl Redlock {
    /// A lock over the Redis masters at `urls`, each with a default pool.
    pub async fn connect(urls: &[&str], options: LockOptions) -> Result<Redlock> {
        let masters = urls
            .iter()
            .map(|url| {
                RedisStore::open(url, ConnectionOptions::default()).map(|s| Arc::new(s) as _)
            })
            .collect::<Result<Vec<SharedStore>>>()?;
        Redlock::new(masters, options).await
    }

    /// A lock among the tasks of this process, on the embedded store.
    pub async fn in_memory(options: LockOptions) -> Result<Redlock> {
        Redlock::new(vec![Arc::new(MemoryStore::new())], options).await
    }

    /// A lock over the given stores, one per master.
    pub async fn new(masters: Vec<SharedStore>, options: LockOptions) -> Result<Redlock> {
        Redlock::with_stats(masters, options, Arc::default(), DEFAULT_CONNECT_TIMEOUT).await
    }

    /// As [`new`](Redlock::new), counting into `stats`, and waiting up to
    /// `subscribe_timeout` for the wake-up subscriptions.
    pub(crate) async fn with_stats(
        masters: Vec<SharedStore>,
        options: LockOptions,
        stats: Arc<Stats>,
        subscribe_timeout: Duration,
    ) -> Result<Redlock> {
        options.validate()?;
        if masters.is_empty() {
            return Err(Error::InvalidConfig("at least one master is needed".into()));
        }
        let registry = Registry::new(Arc::clone(&stats));
        let listeners = options
            .wake_ups
            .then(|| Listeners::start(&masters, &options.channel, &registry));
        if let Some(listeners) = &listeners {
            let ready = listeners.ready(masters.len(), subscribe_timeout).await;
            if ready < masters.len() {
                tracing::warn!(
                    subscribed = ready,
                    masters = masters.len(),
                    "not every wake-up subscription is up yet; waiters poll until it is"
                );
            }
        }
        Ok(Redlock {
            inner: Arc::new(Inner {
                health: Health::new(masters.len()),
                masters,
                options,
                registry,
                listeners,
                lines: Arc::default(),
                stats,
            }),
        })
    }

    /// The options this lock was built with.
    pub fn options(&self) -> &LockOptions {
        &self.inner.options
    }

    /// Number of masters.
    pub fn masters(&self) -> usize {
        self.inner.masters.len()
    }

    /// Checks that every master answers, and returns the first failure (which
    /// names its server). Building connects lazily, so this is the way to find a
    /// wrong URL or password at startup rather than on the first lock.
    pub async fn ping(&self) -> Result<()> {
        let answers =
            futures_util::future::join_all(self.inner.masters.iter().map(|m| m.ping())).await;
        answers.into_iter().collect()
    }

    /// Per-name entries this lock keeps in memory right now (in-process lines
    /// and registered waiters). Zero once every call has ended, however it
    /// ended: nothing grows with the number of distinct lock names. For tests
    /// and diagnostics.
    #[doc(hidden)]
    pub fn retained_entries(&self) -> usize {
        self.inner.lines.len() + self.inner.registry.len()
    }

    /// Wake-up subscriptions currently connected (0 with wake-ups off).
    pub fn subscriptions(&self) -> usize {
        self.inner.listeners.as_ref().map_or(0, |l| l.subscribed())
    }

    /// Takes the lock on `resource`, waiting up to the configured wait time.
    ///
    /// Errors: [`Error::LockTimeout`] when it stayed held by others,
    /// [`Error::QuorumNotReached`] when too few masters answered.
    pub async fn acquire(&self, resource: &str) -> Result<LockGuard> {
        self.acquire_with(resource, self.inner.options.expiry, self.inner.options.wait)
            .await
    }

    /// Takes the lock with an explicit expiry and wait time.
    ///
    /// Tasks of this process that want the same lock queue in process (first come,
    /// first served) and only the first of them sends commands to the masters.
    ///
    /// Cancellation: safe at every await. A call dropped while waiting leaves
    /// nothing behind; one dropped while an attempt is in flight has its grants
    /// undone by the masters' tasks (see `vote.rs`), and a guard dropped is
    /// released.
    pub async fn acquire_with(
        &self,
        resource: &str,
        expiry: Duration,
        wait: Duration,
    ) -> Result<LockGuard> {
        let claim = Claimed::Exclusive(vec![resource.to_owned()]);
        self.acquire_claim(claim, expiry, wait).await
    }

    /// One attempt, no waiting: `Ok(None)` when someone else (in this process or
    /// another) holds the lock, or when competing attempts split the votes so that
    /// nobody got a majority (try again shortly).
    pub async fn try_acquire(&self, resource: &str, expiry: Duration) -> Result<Option<LockGuard>> {
        let claim = Claimed::Exclusive(vec![resource.to_owned()]);
        self.try_claim(claim, expiry).await
    }

    /// Waits up to `wait` for `claim`: the acquisition loop of every primitive.
    /// Claims that exclude each other in process too queue in the process's
    /// line first; the caller registers for wake-ups of every name before each
    /// attempt, and sleeps until one comes or the (jittered) retry time passes.
    pub(crate) async fn acquire_claim(
        &self,
        claim: Claimed,
        expiry: Duration,
        wait: Duration,
    ) -> Result<LockGuard> {
        check_expiry(expiry)?;
        check_wait(wait)?;
        let claim = Arc::new(claim);
        let started = Instant::now();
        let deadline = started + wait;
        let turn = match claim.line() {
            Some(line) => match self.inner.lines.wait_turn(&line, deadline).await {
                Some(turn) => Some(turn),
                None => {
                    Stats::add(&self.inner.stats.lock_timeouts);
                    return Err(Error::LockTimeout {
                        resource: claim.name().to_owned(),
                        waited: started.elapsed(),
                    });
                }
            },
            None => None,
        };
        let waiters: Vec<Waiter> = claim.names().iter().map(|n| self.waiter(n)).collect();
        let mut splits = Splits::default();
        loop {
            let outcome = self.attempt_claim(&claim, expiry).await?;
            match outcome {
                Attempt::Acquired(guard) => {
                    drop(waiters);
                    self.chain_wake_up(&claim);
                    return Ok(guard
                        .with_turn(turn)
                        .watched(expiry, self.inner.options.watchdog));
                }
                Attempt::Held { .. } | Attempt::NoQuorum { .. } => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(self.wait_error(claim.name(), &outcome, now - started));
                    }
                    splits.after(&outcome);
                    let pause = self.retry_delay(&outcome, splits).min(deadline - now);
                    wait_any(&waiters, pause).await;
                }
            }
        }
    }

    /// One attempt at `claim`, no waiting (see [`try_acquire`](Self::try_acquire)).
    pub(crate) async fn try_claim(
        &self,
        claim: Claimed,
        expiry: Duration,
    ) -> Result<Option<LockGuard>> {
        check_expiry(expiry)?;
        let claim = Arc::new(claim);
        let turn = match claim.line() {
            Some(line) => match self.inner.lines.try_turn(&line) {
                Some(turn) => Some(turn),
                None => return Ok(None),
            },
            None => None,
        };
        match self.attempt_claim(&claim, expiry).await? {
            Attempt::Acquired(guard) => {
                self.chain_wake_up(&claim);
                let watchdog = self.inner.options.watchdog;
                Ok(Some(guard.with_turn(turn).watched(expiry, watchdog)))
            }
            Attempt::Held { .. } => Ok(None),
            ref outcome @ Attempt::NoQuorum { .. } => {
                Err(self.wait_error(claim.name(), outcome, Duration::ZERO))
            }
        }
    }

    /// After a reader got in, wakes the next waiter of this process for the
    /// same lock: a writer's release wakes one waiter per process, and the
    /// readers behind it may all come in too.
    fn chain_wake_up(&self, claim: &Claimed) {
        if let Claimed::Read(name) = claim
            && self.inner.listeners.is_some()
        {
            self.inner.registry.wake(name);
        }
    }

    /// A registration for release wake-ups of `resource` (or a plain sleeper when
    /// wake-ups are off). Register *before* checking whatever the lock protects.
    pub(crate) fn waiter(&self, resource: &str) -> Waiter {
        if self.inner.listeners.is_some() {
            self.inner.registry.register(resource)
        } else {
            Waiter::polling()
        }
    }

    /// Publishes a wake-up for waiters of `resource` on every master, from a
    /// task of its own (for a value stored on a server that is not a master).
    pub(crate) fn publish_wake_up(&self, resource: &str) {
        if self.inner.listeners.is_none() {
            return;
        }
        for master in &self.inner.masters {
            let master = SharedStore::clone(master);
            let (channel, resource) = (self.inner.options.channel.clone(), resource.to_owned());
            tokio::spawn(async move {
                if let Err(e) = master.publish(&channel, &resource).await {
                    tracing::debug!(resource, error = %e, "publishing a wake-up failed; waiters poll");
                }
            });
        }
    }

    /// The randomised pause before the next attempt after `outcome`. After a
    /// split vote nobody holds the lock and no release will be published, so the
    /// contenders retry after a short random pause instead of the retry time,
    /// doubling with each split in a row (`splits`, counting this one) so that
    /// contenders that keep splitting the masters fall out of step.
    pub(crate) fn retry_delay(&self, outcome: &Attempt, splits: Splits) -> Duration {
        let retry = self.inner.options.retry;
        match outcome {
            Attempt::Held { split: true } => {
                quorum::jittered(retry.min(quorum::split_vote_retry(splits.0)))
            }
            _ => quorum::jittered(retry),
        }
    }

    /// The error for a wait that ended after `outcome`.
    pub(crate) fn wait_error(&self, resource: &str, outcome: &Attempt, waited: Duration) -> Error {
        match outcome {
            Attempt::NoQuorum { reachable } => Error::QuorumNotReached {
                resource: resource.to_owned(),
                reachable: *reachable,
                masters: self.inner.masters.len(),
                quorum: quorum(self.inner.masters.len()),
            },
            _ => {
                Stats::add(&self.inner.stats.lock_timeouts);
                Error::LockTimeout {
                    resource: resource.to_owned(),
                    waited,
                }
            }
        }
    }

    /// One attempt at an exclusive lock on `resource` (the cache's).
    pub(crate) async fn attempt(&self, resource: &str, expiry: Duration) -> Result<Attempt> {
        let claim = Arc::new(Claimed::Exclusive(vec![resource.to_owned()]));
        self.attempt_claim(&claim, expiry).await
    }

    /// Sends the claim to every master at once and counts the grants, deciding
    /// as soon as a majority answered alike (see `vote.rs`); when granted, makes
    /// the fencing tokens known to a majority (see `fencing.rs`).
    pub(crate) async fn attempt_claim(
        &self,
        claim: &Arc<Claimed>,
        expiry: Duration,
    ) -> Result<Attempt> {
        let token = Token::new().map_err(|e| {
            Error::InvalidConfig(format!("the OS random number generator failed: {e}"))
        })?;
        Stats::add(&self.inner.stats.lock_attempts);
        let started = Instant::now();
        let health = &self.inner.health;
        let owner = Owner::here(std::time::SystemTime::now()).encode();
        let mut ballot = Ballot::open(
            &self.inner.masters,
            health,
            claim,
            &token,
            expiry,
            &owner,
            &self.inner.options.channel,
        );
        ballot
            .count(
                health,
                started,
                self.inner.options.master_timeout.min(expiry / 4),
            )
            .await;
        let elapsed = ballot.settled_at - started;
        let votes = &ballot.votes;
        let masters = self.inner.masters.len();
        let needed = quorum(masters);
        if votes.yes >= needed
            && let Some(validity) = validity(expiry, elapsed)
        {
            ballot.decide(Decision::Keep);
            let (fences, up_to_date) =
                fencing::settle(&ballot.grants.lock().unwrap_or_else(|e| e.into_inner()));
            // The validity counts from when the grants were in.
            let guard = LockGuard::new(
                Arc::clone(&self.inner),
                Arc::clone(claim),
                token,
                fences.clone(),
                ballot.settled_at + validity,
            );
            if fencing::must_raise(up_to_date, masters)
                && !self.inner.raise_fences(claim, &fences).await
            {
                // The guard releases the lock as it drops; nobody could
                // count on its tokens.
                return Ok(Attempt::Held { split: true });
            }
            return Ok(Attempt::Acquired(guard));
        }
        // Undo the partial acquisition, including grants still to arrive and
        // masters whose answer was lost. Not published: the lock was never held,
        // and waking waiters for a split vote would only start the next one.
        ballot.decide(Decision::Undo);
        let resource = claim.name();
        if let Some(e) = &votes.first_error {
            tracing::debug!(resource, error = %e, granted = votes.yes, "lock attempt: a master failed");
        }
        // Masters that answered, with an error reply or not, are up; so are those
        // still to answer that are not known to be down (a straggler).
        let answered = votes.yes + votes.no + votes.error_replies;
        let reachable = answered + votes.pending_alive(health);
        if reachable < needed {
            return Ok(Attempt::NoQuorum { reachable });
        }
        if masters - votes.error_replies < needed
            && let Some(e) = &votes.first_error_reply
        {
            // Enough masters are up, but refuse the command (OOM, NOPERM...):
            // no retry will reach a majority until that changes.
            return Err(e.clone());
        }
        Ok(Attempt::Held {
            // Some masters granted and no majority refused: nobody may hold the
            // lock (the votes split, or a straggler did not answer in time), so
            // retry soon rather than wait for a release that may never come.
            split: votes.yes > 0 && votes.no < needed,
        })
    }
}

/// Sleeps until one of `waiters` is woken or `max` passes.
async fn wait_any(waiters: &[Waiter], max: Duration) {
    match waiters {
        [] => tokio::time::sleep(max).await,
        [one] => {
            one.wait(max).await;
        }
        many => {
            let waits = many.iter().map(|w| Box::pin(w.wait(max)));
            futures_util::future::select_all(waits).await;
        }
    }
}

impl Inner {
    /// Compare-and-delete on every master, publishing the release to waiters when
    /// `publish`; true when a majority still held `token`.
    async fn release_all(
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
    async fn raise_fences(&self, claim: &Arc<Claimed>, fences: &[u64]) -> bool {
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
    async fn extend_all(
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
