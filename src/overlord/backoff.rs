//! Delays between attempts: exponential backoff with "equal jitter".
//!
//! The nominal delay before retry number `n` (1 = the first retry) is
//! `min(max_delay, initial_delay × backoff_factor^(n-1))`. Jitter then scales it
//! into `[nominal/2, nominal)`: `nominal × (0.5 + jitter/2)` with `jitter` in
//! `[0, 1)`. Half the delay is kept, so retries never bunch up at zero, and the
//! other half spreads replicas retrying together. The result never exceeds
//! `max_delay` and is never negative.

use std::time::Duration;

use crate::formation::RetryPolicy;

/// The delay before retry number `attempt` (1 = the first retry; 0 is read as
/// 1), with `jitter` in `[0, 1)` (clamped into it).
pub fn retry_delay(policy: &RetryPolicy, attempt: u32, jitter: f64) -> Duration {
    let max = non_negative(policy.max_delay);
    let exponent = i32::try_from(attempt.max(1) - 1).unwrap_or(i32::MAX);
    let nominal = non_negative(policy.initial_delay) * non_negative(policy.backoff_factor).powi(exponent);
    // 0 × ∞ is NaN: no initial delay stays no delay. ∞ is capped by `min`.
    let nominal = if nominal.is_nan() { 0.0 } else { nominal.min(max) };
    let jitter = if jitter.is_finite() { jitter.clamp(0.0, 1.0) } else { 0.0 };
    seconds(nominal * (0.5 + jitter / 2.0))
}

/// [`retry_delay`] with a random jitter.
pub fn jittered(policy: &RetryPolicy, attempt: u32) -> Duration {
    retry_delay(policy, attempt, rand::random::<f64>())
}

/// `initial × 2^(n-1)` capped at `max` (n = 1 is the first retry): the plain
/// doubling used where no formation policy applies (recording an end while the
/// store refuses writes, webhook deliveries).
pub fn doubling(initial: Duration, n: u32, max: Duration) -> Duration {
    let factor = 2u32.saturating_pow(n.saturating_sub(1).min(31));
    initial.saturating_mul(factor).min(max)
}

/// The policy's cap on any delay.
pub fn max_delay(policy: &RetryPolicy) -> Duration {
    seconds(non_negative(policy.max_delay))
}

/// The larger of our computed delay and the delay the other side asked for
/// (`Retry-After`), capped at `max`.
pub fn honour_retry_after(computed: Duration, retry_after: Option<Duration>, max: Duration) -> Duration {
    computed.max(retry_after.unwrap_or(Duration::ZERO)).min(max)
}

/// Negative and NaN settings read as zero.
fn non_negative(value: f64) -> f64 {
    if value > 0.0 {
        value
    } else {
        0.0
    }
}

fn seconds(value: f64) -> Duration {
    crate::time::seconds_clamped(value, Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubling_starts_at_initial_and_stops_at_max() {
        let (initial, max) = (Duration::from_millis(100), Duration::from_secs(30));
        assert_eq!(doubling(initial, 0, max), initial);
        assert_eq!(doubling(initial, 1, max), initial);
        assert_eq!(doubling(initial, 3, max), Duration::from_millis(400));
        assert_eq!(doubling(initial, 40, max), max);
        assert_eq!(doubling(initial, u32::MAX, max), max);
    }

    fn policy(initial: f64, max: f64, factor: f64) -> RetryPolicy {
        RetryPolicy { max_attempts: 5, initial_delay: initial, max_delay: max, backoff_factor: factor }
    }

    fn secs(d: Duration) -> f64 {
        d.as_secs_f64()
    }

    #[test]
    fn grows_exponentially() {
        let p = policy(1.0, 60.0, 2.0);
        // jitter just under 1 gives (almost) the nominal delay.
        let top = |n| secs(retry_delay(&p, n, 0.999_999));
        assert!((top(1) - 1.0).abs() < 1e-3);
        assert!((top(2) - 2.0).abs() < 1e-3);
        assert!((top(3) - 4.0).abs() < 1e-3);
        assert!((top(4) - 8.0).abs() < 1e-3);
        // Attempt 0 is read as the first retry.
        assert_eq!(retry_delay(&p, 0, 0.0), retry_delay(&p, 1, 0.0));
    }

    #[test]
    fn is_capped_at_max_delay() {
        let p = policy(1.0, 60.0, 2.0);
        for attempt in [7, 10, 100, u32::MAX] {
            let d = retry_delay(&p, attempt, 0.999_999);
            assert!(d <= Duration::from_secs(60), "attempt {attempt}: {d:?}");
            assert!(d >= Duration::from_secs(30), "attempt {attempt}: {d:?}");
        }
        assert_eq!(max_delay(&p), Duration::from_secs(60));
    }

    #[test]
    fn jitter_stays_within_half_and_full_nominal() {
        let p = policy(1.0, 60.0, 2.0);
        assert_eq!(retry_delay(&p, 3, 0.0), Duration::from_secs(2));
        for attempt in 1..=10 {
            let nominal = (2f64.powi(attempt as i32 - 1)).min(60.0);
            for jitter in [0.0, 0.25, 0.5, 0.75, 0.999_999] {
                let d = secs(retry_delay(&p, attempt, jitter));
                assert!(d >= nominal / 2.0 - 1e-9 && d <= nominal, "{attempt} {jitter}: {d}");
            }
            for _ in 0..50 {
                let d = secs(jittered(&p, attempt));
                assert!(d >= nominal / 2.0 - 1e-9 && d <= nominal, "{attempt}: {d}");
            }
        }
        // Out-of-range jitter is clamped, never beyond the cap.
        assert_eq!(retry_delay(&p, 1, 5.0), Duration::from_secs(1));
        assert_eq!(retry_delay(&p, 1, -3.0), Duration::from_millis(500));
        assert_eq!(retry_delay(&p, 1, f64::NAN), Duration::from_millis(500));
    }

    #[test]
    fn odd_settings_never_panic_or_go_negative() {
        assert_eq!(retry_delay(&policy(-1.0, 60.0, 2.0), 3, 0.5), Duration::ZERO);
        assert_eq!(retry_delay(&policy(1.0, -5.0, 2.0), 3, 0.5), Duration::ZERO);
        assert_eq!(retry_delay(&policy(0.0, 60.0, f64::INFINITY), 3, 0.5), Duration::ZERO);
        assert_eq!(retry_delay(&policy(1.0, 60.0, f64::INFINITY), 3, 0.0), Duration::from_secs(30));
        assert_eq!(
            retry_delay(&policy(1.0, f64::INFINITY, 2.0), 200, 0.0),
            Duration::from_secs(crate::time::MAX_SECONDS as u64)
        );
        assert_eq!(retry_delay(&policy(f64::NAN, 10.0, 2.0), 2, 0.0), Duration::ZERO);
        // A factor of 1 is a constant delay.
        assert_eq!(retry_delay(&policy(3.0, 60.0, 1.0), 9, 0.0), Duration::from_millis(1500));
    }

    #[test]
    fn retry_after_wins_when_longer_but_is_capped() {
        let max = Duration::from_secs(60);
        let two = Duration::from_secs(2);
        assert_eq!(honour_retry_after(two, None, max), two);
        assert_eq!(honour_retry_after(two, Some(Duration::from_secs(1)), max), two);
        assert_eq!(honour_retry_after(two, Some(Duration::from_secs(30)), max), Duration::from_secs(30));
        assert_eq!(honour_retry_after(two, Some(Duration::from_secs(3600)), max), max);
    }
}
