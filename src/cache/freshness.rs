//! The freshness rules: pure functions of a value's stored [`Meta`], its
//! remaining time to live as Redis counts it, the call's options and a random
//! draw. No clock of this host is read, so hosts whose clocks disagree judge a
//! value alike.

use std::time::Duration;

use crate::codec::{MAX_META_DURATION, Meta};

use super::builder::MAX_TTL;
use super::keepalive::EntrySettings;
use super::options::Resolved;

/// What a call may do with a value it read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Fresh: return it.
    Fresh,
    /// Fresh, but early refresh drew this call to reload it: return it and
    /// refresh.
    RefreshEarly,
    /// Past its fresh time, inside its stale window and inside what the call
    /// accepts: return it and refresh.
    Stale,
    /// Past what the call accepts: a miss.
    TooStale,
}

/// Judges a value with `meta` whose key has `ttl_left` (`None`: no expiry, or
/// the time left was not read) for a call with `options`; `draw` is uniform in
/// `[0, 1)` (only early refresh uses it).
///
/// The value is fresh while `ttl_left > meta.stale_for` (the key lives its
/// fresh time plus the stale window it was stored with). Once stale, it has
/// been stale for `meta.stale_for - ttl_left`, and the call takes it while that
/// is under the call's own stale window.
pub fn judge(meta: &Meta, ttl_left: Option<Duration>, options: &Resolved, draw: f64) -> Freshness {
    let Some(left) = ttl_left else {
        return Freshness::Fresh;
    };
    if let Some(fresh_left) = left.checked_sub(meta.stale_for).filter(|d| !d.is_zero()) {
        // XFetch aimed at the last moment a refresh can start and still finish
        // before the value goes stale: one load time before its expiry.
        let early = options.early_refresh_beta > 0.0
            && meta.load_time + xfetch_margin(meta.load_time, options.early_refresh_beta, draw)
                >= fresh_left;
        return if early {
            Freshness::RefreshEarly
        } else {
            Freshness::Fresh
        };
    }
    let stale_since = meta.stale_for - left;
    if stale_since < options.stale_for {
        Freshness::Stale
    } else {
        Freshness::TooStale
    }
}

/// XFetch's margin: `load_time * beta * -ln(u)` with `u = 1 - draw` in `(0, 1]`.
/// A refresh starts when the fresh time left is at most the load time plus
/// this. Its mean is
/// `load_time * beta`; it exceeds `k * load_time * beta` with probability
/// `e^-k`.
pub fn xfetch_margin(load_time: Duration, beta: f64, draw: f64) -> Duration {
    let u = (1.0 - draw).clamp(f64::MIN_POSITIVE, 1.0);
    let factor = beta * -u.ln();
    Duration::try_from_secs_f64(load_time.as_secs_f64() * factor).unwrap_or(MAX_TTL)
}

/// How a loaded value is stored: its key's TTL (fresh time, jittered, plus
/// the stale window; `None` when it is not to be stored: a "not found" with a
/// zero negative TTL) and its [`Meta`]. A "not found" with a negative TTL keeps
/// a stale window no longer than that TTL, so that it does not linger.
pub fn storage(
    options: &Resolved,
    absent: bool,
    load_time: Duration,
    draw: f64,
) -> (Option<Duration>, Meta) {
    let (fresh, stale_for) = match (absent, options.negative_ttl) {
        (true, Some(negative)) => (negative, options.stale_for.min(negative)),
        _ => (options.ttl, options.stale_for),
    };
    let meta = Meta {
        stale_for,
        load_time,
        absent,
    };
    if fresh.is_zero() {
        return (None, meta);
    }
    let jittered = jitter(fresh, options.ttl_jitter, draw);
    (Some((jittered + stale_for).min(MAX_TTL)), meta)
}

/// The call's options with what the loader said about its entry applied: its
/// own TTL (exact: no jitter, and it replaces the negative TTL) and stale
/// window, each clamped to what can be stored.
pub fn adapt(options: &Resolved, entry: EntrySettings) -> Resolved {
    let mut adapted = *options;
    if let Some(ttl) = entry.ttl {
        adapted.ttl = ttl.min(MAX_TTL);
        adapted.negative_ttl = None;
        adapted.ttl_jitter = 0.0;
    }
    if let Some(window) = entry.stale_for {
        adapted.stale_for = window.min(MAX_META_DURATION);
    }
    adapted
}

/// `ttl` less a share `fraction * draw` of it, at least 1 ms.
pub fn jitter(ttl: Duration, fraction: f64, draw: f64) -> Duration {
    let share = fraction * draw;
    // `mul_f64` would panic on NaN.
    if share.is_nan() || share <= 0.0 {
        return ttl;
    }
    let cut = ttl.mul_f64(share.min(1.0));
    (ttl - cut).max(Duration::from_millis(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::options::CallOptions;

    fn options(build: CallOptions) -> Resolved {
        build.resolve(Duration::from_secs(10)).unwrap()
    }

    fn meta(stale_ms: u64, load_ms: u64) -> Meta {
        Meta {
            stale_for: Duration::from_millis(stale_ms),
            load_time: Duration::from_millis(load_ms),
            absent: false,
        }
    }

    const MS: fn(u64) -> Option<Duration> = |ms| Some(Duration::from_millis(ms));

    #[test]
    fn fresh_while_the_key_outlives_its_stale_window() {
        let plain = options(CallOptions::new());
        let swr = options(CallOptions::new().stale_for(Duration::from_secs(5)));
        // Stored with a 5 s window: fresh while more than 5 s are left.
        let m = meta(5_000, 50);
        assert_eq!(judge(&m, MS(5_001), &plain, 0.5), Freshness::Fresh);
        assert_eq!(judge(&m, MS(5_000), &swr, 0.5), Freshness::Stale);
        assert_eq!(judge(&m, MS(1), &swr, 0.5), Freshness::Stale);
        // A call without a window does not take a stale value.
        assert_eq!(judge(&m, MS(4_000), &plain, 0.5), Freshness::TooStale);
        // A call with a shorter window takes only the recently stale.
        let short = options(CallOptions::new().stale_for(Duration::from_secs(1)));
        assert_eq!(judge(&m, MS(4_500), &short, 0.5), Freshness::Stale);
        assert_eq!(judge(&m, MS(3_500), &short, 0.5), Freshness::TooStale);
        // Stored without a window: fresh until it is gone.
        assert_eq!(judge(&meta(0, 0), MS(1), &plain, 0.5), Freshness::Fresh);
        // No expiry: always fresh.
        assert_eq!(judge(&m, None, &plain, 0.5), Freshness::Fresh);
    }

    #[test]
    fn early_refresh_fires_near_the_expiry_in_proportion_to_the_load_time() {
        let early = options(CallOptions::new().early_refresh(true));
        let m = meta(0, 100);
        // Far from the expiry: even an extreme draw (margin ~ 100 ms * 23) does
        // not reach 10 s.
        assert_eq!(judge(&m, MS(10_000), &early, 1.0 - 1e-10), Freshness::Fresh);
        // Less than a load time left: a refresh started now ends after the
        // expiry, so every draw refreshes.
        assert_eq!(judge(&m, MS(100), &early, 0.0), Freshness::RefreshEarly);
        // 150 ms left, a median draw (margin 100 ms * ln 2 = 69 ms, aimed 100
        // ms before the expiry): refresh; a draw of 0 (no margin): not yet.
        assert_eq!(judge(&m, MS(150), &early, 0.5), Freshness::RefreshEarly);
        assert_eq!(judge(&m, MS(150), &early, 0.0), Freshness::Fresh);
        // Off: never.
        let off = options(CallOptions::new());
        assert_eq!(judge(&m, MS(1), &off, 0.99), Freshness::Fresh);
        // The share of calls that refresh at 200 ms left is P(margin >= 100 ms)
        // = e^-1 with beta 1.
        let draws = 10_000;
        let fired = (0..draws)
            .filter(|i| {
                let draw = (*i as f64 + 0.5) / draws as f64;
                judge(&m, MS(200), &early, draw) == Freshness::RefreshEarly
            })
            .count();
        let share = fired as f64 / draws as f64;
        assert!((share - (-1.0f64).exp()).abs() < 0.01, "{share}");
    }

    #[test]
    fn storage_adds_the_stale_window_applies_negative_ttl_and_jitter() {
        let o = options(
            CallOptions::new()
                .ttl(Duration::from_secs(10))
                .stale_for(Duration::from_secs(5))
                .negative_ttl(Duration::from_secs(1))
                .ttl_jitter(0.2),
        );
        let load = Duration::from_millis(7);
        let (ttl, m) = storage(&o, false, load, 0.0);
        assert_eq!(ttl, Some(Duration::from_secs(15)));
        assert_eq!(
            (m.stale_for, m.load_time, m.absent),
            (Duration::from_secs(5), load, false)
        );
        // The largest draw takes 20% off the fresh time only.
        let (ttl, _) = storage(&o, false, load, 1.0);
        assert_eq!(ttl, Some(Duration::from_secs(13)));
        // A "not found": the negative TTL, and a stale window no longer than it.
        let (ttl, m) = storage(&o, true, load, 0.0);
        assert_eq!((ttl, m.absent), (Some(Duration::from_secs(2)), true));
        assert_eq!(m.stale_for, Duration::from_secs(1));
        let no_negative = options(CallOptions::new().negative_ttl(Duration::ZERO));
        assert_eq!(storage(&no_negative, true, load, 0.0).0, None);
        assert!(storage(&no_negative, false, load, 0.0).0.is_some());
    }

    #[test]
    fn margins_and_jitter_stay_in_range_for_any_draw() {
        for draw in [0.0, 1e-300, 0.5, 1.0 - 1e-16, 1.0, 2.0, -1.0, f64::NAN] {
            let m = xfetch_margin(Duration::from_secs(1), 1.0, draw);
            assert!(m <= MAX_TTL);
            let j = jitter(Duration::from_secs(10), 0.9, draw);
            assert!(j >= Duration::from_millis(1) && j <= Duration::from_secs(10));
        }
    }

    #[test]
    fn a_loaders_entry_settings_replace_the_calls() {
        let call = options(
            CallOptions::new()
                .negative_ttl(Duration::from_secs(1))
                .ttl_jitter(0.5)
                .stale_for(Duration::from_secs(5)),
        );
        assert_eq!(adapt(&call, EntrySettings::default()), call);
        let entry = EntrySettings {
            ttl: Some(Duration::from_secs(20 * 365 * 24 * 3600)),
            stale_for: Some(Duration::from_secs(60 * 24 * 3600)),
            skip_store: false,
        };
        let adapted = adapt(&call, entry);
        assert_eq!(adapted.ttl, MAX_TTL);
        assert_eq!(adapted.stale_for, MAX_META_DURATION);
        assert_eq!((adapted.negative_ttl, adapted.ttl_jitter), (None, 0.0));
        // Exact: no jitter, whatever the draw.
        let (ttl, _) = storage(
            &adapt(
                &call,
                EntrySettings {
                    ttl: Some(Duration::from_secs(7)),
                    ..entry
                },
            ),
            false,
            Duration::ZERO,
            0.99,
        );
        assert_eq!(
            ttl,
            Some((Duration::from_secs(7) + MAX_META_DURATION).min(MAX_TTL))
        );
    }
}
