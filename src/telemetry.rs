//! What the cache tells the outside about its work: the per-call [`Outcome`],
//! `tracing` spans, and (with the `metrics` feature) `metrics` counters,
//! histograms and gauges. Names and helpers live here; the cache calls them from
//! where the work happens (`cache/mod.rs`).
//!
//! What they emit is documented for users in the crate docs (`lib.rs`,
//! "Telemetry"): keep the two in step.

use std::fmt;
use std::time::{Duration, Instant};

use crate::error::{Error, LoadError};

/// The label every metric carries: the cache's name.
#[cfg(feature = "metrics")]
pub(crate) const CACHE_LABEL: &str = "cache";
/// The label of `locked_cache_calls_total`: how the call ended.
#[cfg(feature = "metrics")]
pub(crate) const OUTCOME_LABEL: &str = "outcome";

/// How a successful `get_or_load` call was served, from
/// [`LockedCache::get_or_load_with_outcome`](crate::LockedCache::get_or_load_with_outcome).
///
/// The same names label the `get_or_load` span (`locked_cache.outcome`) and
/// the `locked_cache_calls_total` metric, which add `timeout` and `error` for
/// failed calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// The first read found the value: one Redis round trip.
    Hit,
    /// Another call in this process was already loading the key; this one
    /// waited for it and got its value without touching Redis.
    Coalesced,
    /// The key was missing; while this call waited for the lock, another
    /// process stored the value, and this call read it.
    Waited,
    /// This call ran its loader (and stored the value).
    Loaded,
    /// The value was past its fresh time but inside its stale window, and was
    /// returned at once while one refresh runs (started by this call, or
    /// already running elsewhere). See
    /// [`CallOptions::stale_for`](crate::CallOptions::stale_for).
    Stale,
    /// This call refreshed a stale value itself (a plain `get_or_load` that
    /// got the key's lock), the refresh failed (loader error, store failure) or
    /// passed its soft or hard timeout, and the stale value was returned
    /// instead of the error (fail-safe; the error is logged and counted in
    /// [`fail_safe_served`](crate::StatsSnapshot::fail_safe_served)).
    FailSafe,
}

impl Outcome {
    /// The outcome's name: `hit`, `coalesced`, `waited`, `loaded`, `stale` or
    /// `fail_safe`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Coalesced => "coalesced",
            Outcome::Waited => "waited",
            Outcome::Loaded => "loaded",
            Outcome::Stale => "stale",
            Outcome::FailSafe => "fail_safe",
        }
    }

    /// True when the value came from the cache rather than from this call's
    /// loader: anything but [`Loaded`](Outcome::Loaded). For an `X-Cache: HIT`
    /// header.
    pub fn is_cached(self) -> bool {
        self != Outcome::Loaded
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a call ended, successful or not: the `outcome` span field and label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CallEnd {
    Served(Outcome),
    Timeout,
    Error,
}

impl CallEnd {
    pub(crate) fn of<T, E>(result: &Result<(T, Outcome), LoadError<E>>) -> CallEnd {
        match result {
            Ok((_, outcome)) => CallEnd::Served(*outcome),
            Err(LoadError::Cache(Error::LockTimeout { .. } | Error::LoadTimeout { .. })) => {
                CallEnd::Timeout
            }
            Err(_) => CallEnd::Error,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CallEnd::Served(outcome) => outcome.as_str(),
            CallEnd::Timeout => "timeout",
            CallEnd::Error => "error",
        }
    }

    #[cfg(feature = "metrics")]
    const ALL: [CallEnd; 8] = [
        CallEnd::Served(Outcome::Hit),
        CallEnd::Served(Outcome::Coalesced),
        CallEnd::Served(Outcome::Waited),
        CallEnd::Served(Outcome::Loaded),
        CallEnd::Served(Outcome::Stale),
        CallEnd::Served(Outcome::FailSafe),
        CallEnd::Timeout,
        CallEnd::Error,
    ];

    #[cfg(feature = "metrics")]
    fn index(self) -> usize {
        match self {
            CallEnd::Served(Outcome::Hit) => 0,
            CallEnd::Served(Outcome::Coalesced) => 1,
            CallEnd::Served(Outcome::Waited) => 2,
            CallEnd::Served(Outcome::Loaded) => 3,
            CallEnd::Served(Outcome::Stale) => 4,
            CallEnd::Served(Outcome::FailSafe) => 5,
            CallEnd::Timeout => 6,
            CallEnd::Error => 7,
        }
    }
}

/// The `error.type` of a failed call: a short, stable name of what failed.
pub(crate) fn error_type<E>(error: &LoadError<E>) -> &'static str {
    match error {
        LoadError::Loader(_) => "loader",
        LoadError::Cache(e) => match e {
            Error::LockTimeout { .. } => "lock_timeout",
            Error::QuorumNotReached { .. } => "quorum_not_reached",
            Error::Redis { .. } => "redis",
            Error::PoolTimeout { .. } => "pool_timeout",
            Error::CommandTimeout { .. } => "command_timeout",
            Error::Codec(_) => "codec",
            Error::ValueTooLarge { .. } => "value_too_large",
            Error::InvalidKey(_) => "invalid_key",
            Error::InvalidConfig(_) => "invalid_config",
            Error::LoadTimeout { .. } => "load_timeout",
            Error::Store(_) => "store",
            Error::Abandoned => "abandoned",
        },
    }
}

/// 64-bit FNV-1a of `prefix` then `key`: stable across processes, cheap, no
/// allocation.
pub(crate) fn key_hash(prefix: &str, key: &str) -> u64 {
    prefix
        .bytes()
        .chain(key.bytes())
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
}

/// A key hash as 16 hex digits, formatted only if a subscriber records it.
#[derive(Clone, Copy)]
pub(crate) struct KeyHash(pub(crate) u64);

impl fmt::Display for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Milliseconds, with microsecond precision, for span fields.
pub(crate) fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// What one `get_or_load` call did, gathered on the way and recorded on its span
/// and in the metrics when it ends.
#[derive(Debug, Default)]
pub(crate) struct CallTrace {
    /// Lock attempts made by this call.
    pub(crate) attempts: u32,
    /// Time spent waiting for someone else's load (a flight or the lock).
    pub(crate) waited: Option<Duration>,
}

impl CallTrace {
    pub(crate) fn add_wait(&mut self, wait: Duration) {
        self.waited = Some(self.waited.unwrap_or_default() + wait);
    }
}

/// A cache's telemetry: its name, and with the `metrics` feature its metric
/// handles (registered once, in `build()`).
pub(crate) struct Telemetry {
    pub(crate) name: String,
    pub(crate) db_system: &'static str,
    #[cfg(feature = "metrics")]
    metrics: Metrics,
}

impl fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Telemetry")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Telemetry {
    pub(crate) fn new(name: String, db_system: &'static str) -> Telemetry {
        Telemetry {
            #[cfg(feature = "metrics")]
            metrics: Metrics::new(&name),
            name,
            db_system,
        }
    }

    /// The span of one `get_or_load` call. Nothing is computed for it (not even
    /// the key hash) unless a subscriber wants it.
    pub(crate) fn call_span(&self, prefix: &str, key: &str) -> tracing::Span {
        let span = tracing::info_span!(
            "get_or_load",
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            db.system = self.db_system,
            db.operation.name = "get_or_load",
            error.type = tracing::field::Empty,
            locked_cache.name = self.name.as_str(),
            locked_cache.key_hash = tracing::field::Empty,
            locked_cache.outcome = tracing::field::Empty,
            locked_cache.wait_ms = tracing::field::Empty,
            locked_cache.lock_attempts = tracing::field::Empty,
        );
        if !span.is_disabled() {
            span.record(
                "locked_cache.key_hash",
                tracing::field::display(KeyHash(key_hash(prefix, key))),
            );
        }
        span
    }

    /// Records how a call ended: on its span, and in the metrics.
    pub(crate) fn call_ended<T, E>(
        &self,
        span: &tracing::Span,
        trace: &CallTrace,
        started: Instant,
        result: &Result<(T, Outcome), LoadError<E>>,
    ) {
        let end = CallEnd::of(result);
        if !span.is_disabled() {
            span.record("locked_cache.outcome", end.as_str());
            if let Some(waited) = trace.waited {
                span.record("locked_cache.wait_ms", millis(waited));
            }
            if trace.attempts > 0 {
                span.record("locked_cache.lock_attempts", trace.attempts);
            }
            if let Err(e) = result {
                span.record("otel.status_code", "ERROR");
                span.record("error.type", error_type(e));
            }
        }
        #[cfg(feature = "metrics")]
        self.metrics.call_ended(end, trace, started);
        #[cfg(not(feature = "metrics"))]
        let _ = started;
    }

    /// The lock phase took `elapsed` and ended holding the lock.
    pub(crate) fn lock_acquired(&self, elapsed: Duration) {
        #[cfg(feature = "metrics")]
        self.metrics.lock_acquire.record(elapsed);
        #[cfg(not(feature = "metrics"))]
        let _ = elapsed;
    }

    /// A loader ran for `elapsed`.
    pub(crate) fn load_took(&self, elapsed: Duration) {
        #[cfg(feature = "metrics")]
        self.metrics.load.record(elapsed);
        #[cfg(not(feature = "metrics"))]
        let _ = elapsed;
    }

    /// Counts a loader running until the guard drops (panics and cancellation
    /// included).
    pub(crate) fn loading(&self) -> GaugeGuard<'_> {
        #[cfg(feature = "metrics")]
        return GaugeGuard::new(&self.metrics.loads_in_flight);
        #[cfg(not(feature = "metrics"))]
        GaugeGuard::new()
    }

    /// Counts a call waiting for someone else's load until the guard drops.
    pub(crate) fn waiting(&self) -> GaugeGuard<'_> {
        #[cfg(feature = "metrics")]
        return GaugeGuard::new(&self.metrics.waiters);
        #[cfg(not(feature = "metrics"))]
        GaugeGuard::new()
    }

    /// Sets the subscribed-masters gauge.
    #[cfg(feature = "metrics")]
    pub(crate) fn subscribed_masters(&self, n: usize) {
        self.metrics.subscribed_masters.set(n as f64);
    }
}

/// Decrements its gauge on drop (a no-op without the `metrics` feature).
pub(crate) struct GaugeGuard<'a> {
    #[cfg(feature = "metrics")]
    gauge: &'a metrics::Gauge,
    #[cfg(not(feature = "metrics"))]
    _lifetime: std::marker::PhantomData<&'a ()>,
}

impl<'a> GaugeGuard<'a> {
    #[cfg(feature = "metrics")]
    fn new(gauge: &'a metrics::Gauge) -> GaugeGuard<'a> {
        gauge.increment(1.0);
        GaugeGuard { gauge }
    }

    #[cfg(not(feature = "metrics"))]
    fn new() -> GaugeGuard<'a> {
        GaugeGuard {
            _lifetime: std::marker::PhantomData,
        }
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        #[cfg(feature = "metrics")]
        self.gauge.decrement(1.0);
    }
}

#[cfg(feature = "metrics")]
struct Metrics {
    calls: [metrics::Counter; 8],
    load: metrics::Histogram,
    wait: metrics::Histogram,
    lock_acquire: metrics::Histogram,
    time_to_value: metrics::Histogram,
    loads_in_flight: metrics::Gauge,
    waiters: metrics::Gauge,
    subscribed_masters: metrics::Gauge,
}

#[cfg(feature = "metrics")]
impl Metrics {
    fn new(name: &str) -> Metrics {
        let histogram =
            |metric: &'static str| metrics::histogram!(metric, CACHE_LABEL => name.to_owned());
        let gauge = |metric: &'static str| metrics::gauge!(metric, CACHE_LABEL => name.to_owned());
        Metrics {
            calls: CallEnd::ALL.map(|end| {
                metrics::counter!(
                    "locked_cache_calls_total",
                    CACHE_LABEL => name.to_owned(),
                    OUTCOME_LABEL => end.as_str()
                )
            }),
            load: histogram("locked_cache_load_seconds"),
            wait: histogram("locked_cache_wait_seconds"),
            lock_acquire: histogram("locked_cache_lock_acquire_seconds"),
            time_to_value: histogram("locked_cache_time_to_value_seconds"),
            loads_in_flight: gauge("locked_cache_loads_in_flight"),
            waiters: gauge("locked_cache_waiters"),
            subscribed_masters: gauge("locked_cache_subscribed_masters"),
        }
    }

    fn call_ended(&self, end: CallEnd, trace: &CallTrace, started: Instant) {
        self.calls[end.index()].increment(1);
        if let Some(waited) = trace.waited {
            self.wait.record(waited);
        }
        if matches!(end, CallEnd::Served(Outcome::Coalesced | Outcome::Waited)) {
            self.time_to_value.record(started.elapsed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_hash_is_fnv1a_of_prefix_and_key() {
        // FNV-1a 64 of the empty string is the offset basis; of "a", a known value.
        assert_eq!(key_hash("", ""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(key_hash("", "a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(key_hash("lc:", "user:42"), key_hash("lc:user", ":42"));
        assert_ne!(key_hash("lc:", "user:42"), key_hash("lc:", "user:43"));
        assert_eq!(KeyHash(0xab).to_string(), "00000000000000ab");
    }

    #[test]
    fn outcomes_have_stable_names() {
        let names: Vec<_> = [
            CallEnd::Served(Outcome::Hit),
            CallEnd::Served(Outcome::Coalesced),
            CallEnd::Served(Outcome::Waited),
            CallEnd::Served(Outcome::Loaded),
            CallEnd::Served(Outcome::Stale),
            CallEnd::Served(Outcome::FailSafe),
            CallEnd::Timeout,
            CallEnd::Error,
        ]
        .iter()
        .map(|e| e.as_str())
        .collect();
        assert_eq!(
            names,
            [
                "hit",
                "coalesced",
                "waited",
                "loaded",
                "stale",
                "fail_safe",
                "timeout",
                "error"
            ]
        );
        assert!(Outcome::Waited.is_cached() && !Outcome::Loaded.is_cached());
    }
}
