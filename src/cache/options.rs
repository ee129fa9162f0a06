//! [`CallOptions`]: how long a value lives and what a call does around its
//! expiry, set for a whole cache ([`Builder::call_options`](crate::Builder::call_options))
//! or for one call ([`LockedCache::with`](crate::LockedCache::with)).

use std::time::Duration;

use crate::codec::MAX_META_DURATION;
use crate::defaults::{
    DEFAULT_BACKGROUND_TIMEOUT, DEFAULT_DETACHED, DEFAULT_EARLY_REFRESH,
    DEFAULT_EARLY_REFRESH_BETA, DEFAULT_FAIL_SAFE, DEFAULT_STALE_FOR, DEFAULT_TTL_JITTER,
};
use crate::error::{Error, Result};

use super::builder::MAX_TTL;
use super::tags::TagSet;

/// Freshness and timeout options of `get_or_load` calls.
///
/// Every option left unset takes the cache's setting (from
/// [`Builder::call_options`](crate::Builder::call_options) and
/// [`Builder::ttl`](crate::Builder::ttl)), and then the library default. The
/// setters are `const`, so a set of options can be a constant per endpoint:
///
/// ```
/// use std::time::Duration;
/// use locked_cache::CallOptions;
///
/// const PROFILE: CallOptions = CallOptions::new()
///     .ttl(Duration::from_secs(30))
///     .stale_for(Duration::from_secs(300))
///     .early_refresh(true)
///     .negative_ttl(Duration::from_secs(5))
///     .ttl_jitter(0.1);
/// ```
///
/// # Fresh, stale, gone
///
/// A stored value is *fresh* for its TTL, then *stale* for the stale window
/// ([`stale_for`](Self::stale_for)), then gone (its Redis key expires at TTL +
/// stale window). Freshness is judged from the key's remaining time to live as
/// Redis counts it, read in the same round trip as the value, so it never
/// depends on the clocks of the hosts agreeing.
///
/// | the value is | a call |
/// | --- | --- |
/// | fresh | returns it (a hit); with early refresh, the odd call shortly before the expiry also starts a refresh |
/// | stale, and the call accepts stale values | returns it at once, and starts a refresh unless one runs (at most one per key across every process) |
/// | stale, the call does not accept it, or gone | waits for the one load, as a miss |
#[derive(Clone, Copy, PartialEq, Default)]
pub struct CallOptions {
    ttl: Option<Duration>,
    stale_for: Option<Duration>,
    early_refresh: Option<bool>,
    early_refresh_beta: Option<f64>,
    negative_ttl: Option<Duration>,
    ttl_jitter: Option<f64>,
    fail_safe: Option<bool>,
    soft_timeout: Option<Duration>,
    hard_timeout: Option<Duration>,
    detached: Option<bool>,
    background_timeout: Option<Duration>,
    tags: TagSet,
}

impl CallOptions {
    /// Options with nothing set: every option as the cache has it.
    pub const fn new() -> CallOptions {
        CallOptions {
            ttl: None,
            stale_for: None,
            early_refresh: None,
            early_refresh_beta: None,
            negative_ttl: None,
            ttl_jitter: None,
            fail_safe: None,
            soft_timeout: None,
            hard_timeout: None,
            detached: None,
            background_timeout: None,
            tags: TagSet::new(),
        }
    }

    /// Tags the entries these calls store (loads and [`With::set`](crate::With::set)):
    /// [`invalidate_tag`](crate::LockedCache::invalidate_tag) with any of them
    /// makes the entry a miss in every process. Call it once per tag, up to
    /// [`MAX_TAGS`](crate::codec::MAX_TAGS) (8) per entry (more is
    /// [`Error::InvalidConfig`]); repeats count once. Needs a cache built with
    /// [`Builder::tags`](crate::Builder::tags) (else `InvalidConfig`).
    /// Defaults to no tags. A tagged entry lives at most
    /// [`tag_ttl`](crate::Builder::tag_ttl) in Redis. Tags set here replace
    /// the cache's (from [`Builder::call_options`](crate::Builder::call_options)),
    /// they do not add to them.
    ///
    /// ```
    /// use locked_cache::CallOptions;
    ///
    /// const PRODUCT_PAGE: CallOptions = CallOptions::new().tag("products").tag("pages");
    /// let user_42 = CallOptions::new().tag(&format!("user:{}", 42));
    /// # let _ = (PRODUCT_PAGE, user_42);
    /// ```
    pub const fn tag(mut self, name: &str) -> Self {
        self.tags = self.tags.with(name);
        self
    }

    /// How long a loaded value is fresh (1 ms to 10 years). Defaults to the
    /// cache's [`ttl`](crate::Builder::ttl).
    pub const fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// The stale window: how long after its TTL a value may still be served
    /// while one caller refreshes it (stale-while-revalidate), and returned
    /// instead of an error when the refresh fails (fail-safe). The value's
    /// Redis key lives TTL + this. At most about 49 days.
    ///
    /// A call with a stale window returns a stale value at once and tries the
    /// key's lock once: if it gets it, it refreshes (in the background for
    /// [`with`](crate::LockedCache::with) calls, before returning for plain
    /// [`get_or_load`](crate::LockedCache::get_or_load) calls, whose loader
    /// cannot outlive them); if someone holds it, that someone refreshes. So at
    /// an expiry nobody waits, and one load per key runs across the fleet.
    ///
    /// Defaults to zero ([`DEFAULT_STALE_FOR`]): a value is gone at its TTL
    /// and calls wait for its reload, as without this option. Raising it trades
    /// staleness (a value up to TTL + window old may be served) for latency
    /// and availability, and keeps values in Redis longer.
    pub const fn stale_for(mut self, window: Duration) -> Self {
        self.stale_for = Some(window);
        self
    }

    /// Probabilistic early refresh (XFetch, Vattani et al. 2015): a call on a
    /// fresh value refreshes it when `fresh_left <= load_time + load_time *
    /// beta * -ln(rand)`, where `load_time` is how long the value's load took
    /// (stored with it) and `rand` is uniform in (0, 1]. That is XFetch aimed
    /// at the last moment a refresh can start and still be stored before the
    /// value goes stale (one load time before its expiry), rather than at the
    /// expiry itself. The closer the expiry and the slower the load, the
    /// likelier; under steady traffic a hot key is reloaded shortly before it
    /// expires, by one caller, and nobody sees it stale or missing. Keys called
    /// less often than about once per load time can still go stale (pair this
    /// with [`stale_for`](Self::stale_for) so they are not waited for either). The refresh runs as a stale one does
    /// (one per key across the fleet; in the background for
    /// [`with`](crate::LockedCache::with) calls).
    ///
    /// Values stored by `set` (no load time) and loads under a millisecond are
    /// refreshed early only once less than a millisecond of freshness is left.
    ///
    /// Defaults to off ([`DEFAULT_EARLY_REFRESH`]). On, it trades a few more
    /// loads (a value is replaced a little before its TTL) for no expiry ever
    /// seen by hot keys.
    pub const fn early_refresh(mut self, on: bool) -> Self {
        self.early_refresh = Some(on);
        self
    }

    /// XFetch's β (0 to 100): how early early refresh starts, as a multiple
    /// of the load time. Defaults to 1.0 ([`DEFAULT_EARLY_REFRESH_BETA`]).
    /// Higher refreshes earlier (more loads, more margin for slow loads).
    pub const fn early_refresh_beta(mut self, beta: f64) -> Self {
        self.early_refresh_beta = Some(beta);
        self
    }

    /// The TTL of a cached "not found": a loaded value that serialises as
    /// `None` (the loader's `T` is an `Option` and it found nothing). Its
    /// stale window is no longer than this. Zero does not cache them at all
    /// (each caller then loads in turn, one at a time per key across the
    /// fleet; callers in one process still share one load). At most 10 years.
    ///
    /// Defaults to unset: a `None` is cached like any value, for the TTL.
    /// Setting it short lets a missing id appear soon after it is created,
    /// while still sparing the database a query per request for it.
    pub const fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.negative_ttl = Some(ttl);
        self
    }

    /// Spreads expiries: each stored value lives its TTL minus a random share
    /// of up to `fraction` of it (0.0 to 0.9), so keys loaded together do not
    /// all expire together. Defaults to 0 ([`DEFAULT_TTL_JITTER`]). Raising it
    /// trades a shorter average TTL (more loads) for smoother load on the
    /// backend.
    pub const fn ttl_jitter(mut self, fraction: f64) -> Self {
        self.ttl_jitter = Some(fraction);
        self
    }

    /// Fail-safe: when a caller holding a stale value (inside the stale
    /// window) runs its refresh itself (a plain `get_or_load` that got the
    /// key's lock) and the loader returns an error, or the store fails, return
    /// the stale value ([`Outcome::FailSafe`](crate::Outcome::FailSafe)) instead
    /// of the error, logged and counted in
    /// [`fail_safe_served`](crate::StatsSnapshot::fail_safe_served), as long as
    /// the stale value has not expired meanwhile. A panicking loader still
    /// panics in its caller. Defaults to on ([`DEFAULT_FAIL_SAFE`]). Off, such
    /// calls get the error.
    ///
    /// Without fail-safe too, a stale value is served when nobody can refresh
    /// it (the lock is held elsewhere, or the lock masters are unreachable), and
    /// when a refresh runs in the background (its failure is logged and
    /// counted in [`background_errors`](crate::StatsSnapshot::background_errors)).
    /// Without a stale window there is never a value at hand, so this does
    /// nothing.
    pub const fn fail_safe(mut self, on: bool) -> Self {
        self.fail_safe = Some(on);
        self
    }

    /// How long a plain `get_or_load` caller that holds a stale value and runs
    /// its refresh itself waits for it before it returns the stale value
    /// ([`Outcome::FailSafe`](crate::Outcome::FailSafe), whatever
    /// [`fail_safe`](Self::fail_safe) says: the caller chose to bound its wait).
    /// Its loader is then dropped (it cannot outlive the call) and the lock
    /// released; the next call tries again. [`with`](crate::LockedCache::with)
    /// calls never wait for a refresh, so this does not apply to them.
    /// Defaults to none (wait for the refresh).
    pub const fn soft_timeout(mut self, timeout: Duration) -> Self {
        self.soft_timeout = Some(timeout);
        self
    }

    /// The longest a call waits for a load (its own, or one it joined in this
    /// process), from the miss to the value: then it fails with
    /// [`Error::LoadTimeout`] (`is_timeout()`). A detached load goes on and
    /// stores its value (within the [background
    /// timeout](Self::background_timeout)); a plain call's load is dropped. A
    /// plain call refreshing a stale value is bounded by it too, and then
    /// returns the stale value, as for the soft timeout. Defaults to none: a
    /// call waits for its loader as long as it takes (and for someone else's
    /// load up to the [wait time](crate::Builder::wait_time)).
    pub const fn hard_timeout(mut self, timeout: Duration) -> Self {
        self.hard_timeout = Some(timeout);
        self
    }

    /// For [`with`](crate::LockedCache::with) calls: run a load on a task of its
    /// own, so that it finishes, stores its value and hands it to the other
    /// waiters even if the caller that started it goes away (a web framework
    /// drops a handler's future when its client disconnects). Defaults to on
    /// ([`DEFAULT_DETACHED`]): a half-done load is worth finishing for everyone
    /// waiting on it, and the next caller finds the value instead of starting
    /// the load again. Off, a cancelled leader's load is dropped and one of its
    /// followers starts over. Plain `get_or_load` calls are never detached: their
    /// loader may borrow from the caller.
    pub const fn detached(mut self, on: bool) -> Self {
        self.detached = Some(on);
        self
    }

    /// The longest a load on a task of its own may run: a background refresh,
    /// or a detached load (whose caller may have gone away). Then the load is
    /// dropped, its lock released, and the failure logged and counted in
    /// [`background_errors`](crate::StatsSnapshot::background_errors); a
    /// caller still waiting gets [`Error::LoadTimeout`]. Defaults to 60 s
    /// ([`DEFAULT_BACKGROUND_TIMEOUT`]): without a bound, a backend call that
    /// hangs would hold the key's lock (kept alive by its holder) for as long
    /// as the process lives. Raise it for loads that legitimately take longer.
    pub const fn background_timeout(mut self, timeout: Duration) -> Self {
        self.background_timeout = Some(timeout);
        self
    }

    /// These options, with every unset one taken from `fallback`.
    pub const fn or(self, fallback: CallOptions) -> CallOptions {
        CallOptions {
            ttl: or(self.ttl, fallback.ttl),
            stale_for: or(self.stale_for, fallback.stale_for),
            early_refresh: or(self.early_refresh, fallback.early_refresh),
            early_refresh_beta: or(self.early_refresh_beta, fallback.early_refresh_beta),
            negative_ttl: or(self.negative_ttl, fallback.negative_ttl),
            ttl_jitter: or(self.ttl_jitter, fallback.ttl_jitter),
            fail_safe: or(self.fail_safe, fallback.fail_safe),
            soft_timeout: or(self.soft_timeout, fallback.soft_timeout),
            hard_timeout: or(self.hard_timeout, fallback.hard_timeout),
            detached: or(self.detached, fallback.detached),
            background_timeout: or(self.background_timeout, fallback.background_timeout),
            tags: self.tags.or(fallback.tags),
        }
    }

    /// Every option resolved (unset ones at the library defaults, the TTL at
    /// `ttl`), and checked.
    pub(crate) fn resolve(&self, ttl: Duration) -> Result<Resolved> {
        let resolved = Resolved {
            ttl: self.ttl.unwrap_or(ttl),
            stale_for: self.stale_for.unwrap_or(DEFAULT_STALE_FOR),
            early_refresh_beta: match self.early_refresh {
                Some(true) => match self.early_refresh_beta {
                    Some(beta) => beta,
                    None => DEFAULT_EARLY_REFRESH_BETA,
                },
                Some(false) => 0.0,
                None if DEFAULT_EARLY_REFRESH => DEFAULT_EARLY_REFRESH_BETA,
                None => 0.0,
            },
            negative_ttl: self.negative_ttl,
            ttl_jitter: self.ttl_jitter.unwrap_or(DEFAULT_TTL_JITTER),
            fail_safe: self.fail_safe.unwrap_or(DEFAULT_FAIL_SAFE),
            soft_timeout: self.soft_timeout,
            hard_timeout: self.hard_timeout,
            detached: self.detached.unwrap_or(DEFAULT_DETACHED),
            background_timeout: self
                .background_timeout
                .unwrap_or(DEFAULT_BACKGROUND_TIMEOUT),
            tags: self.tags,
        };
        if self.tags.overflowed() {
            return Err(Error::InvalidConfig(format!(
                "more than {} tags on one entry",
                crate::codec::MAX_TAGS
            )));
        }
        resolved.check()?;
        Ok(resolved)
    }
}

/// Only the options that are set: `CallOptions { stale_for: 600s }`.
impl std::fmt::Debug for CallOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = f.debug_struct("CallOptions");
        macro_rules! set {
            ($($field:ident),*) => {
                $(if let Some(value) = &self.$field {
                    s.field(stringify!($field), value);
                })*
            };
        }
        set!(
            ttl,
            stale_for,
            early_refresh,
            early_refresh_beta,
            negative_ttl,
            ttl_jitter,
            fail_safe,
            soft_timeout,
            hard_timeout,
            detached,
            background_timeout
        );
        if !self.tags.is_empty() {
            s.field("tags", &self.tags.ids().len());
        }
        s.finish()
    }
}

const fn or<T: Copy>(a: Option<T>, b: Option<T>) -> Option<T> {
    match a {
        Some(a) => Some(a),
        None => b,
    }
}

/// Every option of one call, resolved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Resolved {
    pub ttl: Duration,
    pub stale_for: Duration,
    /// 0 when early refresh is off.
    pub early_refresh_beta: f64,
    pub negative_ttl: Option<Duration>,
    pub ttl_jitter: f64,
    pub fail_safe: bool,
    pub soft_timeout: Option<Duration>,
    pub hard_timeout: Option<Duration>,
    pub detached: bool,
    pub background_timeout: Duration,
    /// The tags of the entries these calls store.
    pub tags: TagSet,
}

impl Resolved {
    /// Whether reads need the key's time left: only to judge stale windows and
    /// early refresh. Without either, a hit is a plain `GET`.
    pub fn reads_ttl(&self) -> bool {
        !self.stale_for.is_zero() || self.early_refresh_beta > 0.0
    }

    fn check(&self) -> Result<()> {
        let invalid = |what: &str| Err(Error::InvalidConfig(what.to_owned()));
        if self.ttl < Duration::from_millis(1) || self.ttl > MAX_TTL {
            return invalid("ttl must be at least 1 ms and at most 10 years");
        }
        if self.stale_for > MAX_META_DURATION {
            return invalid("stale_for must be at most u32::MAX ms (about 49 days)");
        }
        if !(0.0..=100.0).contains(&self.early_refresh_beta) {
            return invalid("early_refresh_beta must be between 0 and 100");
        }
        if self.negative_ttl.is_some_and(|t| t > MAX_TTL) {
            return invalid("negative_ttl must be at most 10 years");
        }
        if !(0.0..=0.9).contains(&self.ttl_jitter) {
            return invalid("ttl_jitter must be between 0.0 and 0.9");
        }
        if self.soft_timeout.is_some_and(|t| t.is_zero())
            || self.hard_timeout.is_some_and(|t| t.is_zero())
            || self.background_timeout.is_zero()
        {
            return invalid("soft_timeout, hard_timeout and background_timeout must be above zero");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_options_come_from_the_fallback_then_the_defaults() {
        let cache = CallOptions::new()
            .stale_for(Duration::from_secs(60))
            .early_refresh(true);
        let call = CallOptions::new().ttl(Duration::from_secs(5)).or(cache);
        let resolved = call.resolve(Duration::from_secs(99)).unwrap();
        assert_eq!(resolved.ttl, Duration::from_secs(5));
        assert_eq!(resolved.stale_for, Duration::from_secs(60));
        assert_eq!(resolved.early_refresh_beta, DEFAULT_EARLY_REFRESH_BETA);
        assert_eq!(resolved.fail_safe, DEFAULT_FAIL_SAFE);
        assert_eq!(resolved.negative_ttl, None);
        let plain = CallOptions::new().resolve(Duration::from_secs(99)).unwrap();
        assert_eq!(plain.ttl, Duration::from_secs(99));
        assert_eq!(plain.stale_for, Duration::ZERO);
        assert_eq!(plain.early_refresh_beta, 0.0);
        let off = CallOptions::new().early_refresh(false).or(cache);
        assert_eq!(
            off.resolve(Duration::from_secs(1))
                .unwrap()
                .early_refresh_beta,
            0.0
        );
    }

    #[test]
    fn debug_shows_only_the_options_set() {
        assert_eq!(format!("{:?}", CallOptions::new()), "CallOptions");
        let set = CallOptions::new()
            .stale_for(Duration::from_secs(600))
            .fail_safe(false);
        assert_eq!(
            format!("{set:?}"),
            "CallOptions { stale_for: 600s, fail_safe: false }"
        );
    }

    #[test]
    fn out_of_range_options_are_invalid_config() {
        let ttl = Duration::from_secs(1);
        for bad in [
            CallOptions::new().ttl(Duration::ZERO),
            CallOptions::new().stale_for(Duration::from_secs(60 * 24 * 3600)),
            CallOptions::new()
                .early_refresh(true)
                .early_refresh_beta(-1.0),
            CallOptions::new()
                .early_refresh(true)
                .early_refresh_beta(f64::NAN),
            CallOptions::new().ttl_jitter(1.5),
            CallOptions::new().negative_ttl(Duration::from_secs(20 * 365 * 24 * 3600)),
            CallOptions::new().soft_timeout(Duration::ZERO),
            CallOptions::new().hard_timeout(Duration::ZERO),
            CallOptions::new().background_timeout(Duration::ZERO),
        ] {
            assert!(
                matches!(bad.resolve(ttl), Err(Error::InvalidConfig(_))),
                "{bad:?}"
            );
        }
    }
}
