//! Redlock arithmetic, as pure functions: the majority, the clock-drift
//! allowance, the validity left after an acquisition, and the retry jitter.

use std::time::Duration;

/// Masters that must grant a lock out of `masters`: a strict majority.
pub fn quorum(masters: usize) -> usize {
    masters / 2 + 1
}

/// Allowance for clock drift between the masters: 1% of the expiry plus 2 ms.
pub fn drift(expiry: Duration) -> Duration {
    expiry / 100 + Duration::from_millis(2)
}

/// Time the lock is still safely held after an acquisition that took `elapsed`:
/// `expiry - elapsed - drift`, or `None` when nothing is left.
pub fn validity(expiry: Duration, elapsed: Duration) -> Option<Duration> {
    expiry
        .checked_sub(elapsed)?
        .checked_sub(drift(expiry))
        .filter(|v| !v.is_zero())
}

/// Base pause after a split vote (some masters granted, no majority): short,
/// since the lock is free and nobody will publish its release.
pub const SPLIT_VOTE_RETRY: Duration = Duration::from_millis(2);

/// The pause (before jitter and the retry-time cap) after `splits` split votes
/// in a row: [`SPLIT_VOTE_RETRY`], doubling with each further split, so that
/// contenders that keep splitting the masters fall out of step.
pub fn split_vote_retry(splits: u32) -> Duration {
    SPLIT_VOTE_RETRY * (1u32 << splits.saturating_sub(1).min(10))
}

/// A retry delay drawn uniformly from 50% to 150% of `retry`, so that competing
/// processes do not retry in lock step.
pub fn jittered(retry: Duration) -> Duration {
    retry.mul_f64(0.5 + fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majority() {
        assert_eq!(quorum(1), 1);
        assert_eq!(quorum(2), 2);
        assert_eq!(quorum(3), 2);
        assert_eq!(quorum(4), 3);
        assert_eq!(quorum(5), 3);
    }

    #[test]
    fn validity_subtracts_elapsed_and_drift() {
        let expiry = Duration::from_secs(10);
        assert_eq!(drift(expiry), Duration::from_millis(102));
        assert_eq!(
            validity(expiry, Duration::from_millis(98)),
            Some(Duration::from_millis(9800))
        );
        assert_eq!(validity(expiry, Duration::from_millis(9898)), None);
        assert_eq!(validity(expiry, Duration::from_secs(11)), None);
        assert_eq!(validity(Duration::from_millis(2), Duration::ZERO), None);
    }

    #[test]
    fn split_pauses_double_then_stop_growing() {
        assert_eq!(split_vote_retry(0), Duration::from_millis(2));
        assert_eq!(split_vote_retry(1), Duration::from_millis(2));
        assert_eq!(split_vote_retry(2), Duration::from_millis(4));
        assert_eq!(split_vote_retry(5), Duration::from_millis(32));
        assert_eq!(split_vote_retry(u32::MAX), Duration::from_millis(2048));
    }

    #[test]
    fn jitter_stays_within_half_and_one_and_a_half() {
        let retry = Duration::from_millis(100);
        for _ in 0..1000 {
            let d = jittered(retry);
            assert!(d >= Duration::from_millis(50) && d <= Duration::from_millis(150));
        }
    }
}
