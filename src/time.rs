//! Time helpers: every timestamp muxi-rt stores is milliseconds since the Unix
//! epoch, and every number of seconds from outside (formation settings, request
//! bodies, `Retry-After` headers, agents) becomes a [`Duration`] only through
//! [`seconds`] or [`seconds_clamped`], which refuse or bound what no `Duration`
//! could hold (`Duration::from_secs_f64` panics on NaN, negatives and overflow).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The longest duration any setting, request field or header may ask for, in
/// seconds: one year. The schema's `maximum`s for seconds are this value (a unit
/// test in `formation::schema` checks they agree).
pub const MAX_SECONDS: f64 = 365.0 * 24.0 * 3600.0;

/// The longest retention, in days (ten years); the schema's `retention_days`
/// maximum.
pub const MAX_RETENTION_DAYS: f64 = 3650.0;

/// The longest `Retry-After` honoured from an agent or a webhook receiver: one
/// hour. A larger value is read as one hour, never as a panic or a parking.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// A number of seconds as a `Duration`: `None` for NaN, infinities, negatives and
/// anything over [`MAX_SECONDS`].
pub fn seconds(secs: f64) -> Option<Duration> {
    (secs.is_finite() && (0.0..=MAX_SECONDS).contains(&secs)).then(|| Duration::from_secs_f64(secs))
}

/// A number of seconds as a `Duration`, forced into range: NaN and negatives are
/// zero, anything over `max` (itself capped at [`MAX_SECONDS`]) is `max`.
pub fn seconds_clamped(secs: f64, max: Duration) -> Duration {
    let max = max.min(Duration::from_secs(MAX_SECONDS as u64));
    if secs.is_nan() || secs <= 0.0 {
        return Duration::ZERO;
    }
    if secs >= max.as_secs_f64() {
        return max;
    }
    Duration::from_secs_f64(secs)
}

/// Milliseconds in `secs` seconds, bounded like [`seconds_clamped`] by
/// [`MAX_SECONDS`]: for deadlines stored as epoch milliseconds.
pub fn millis(secs: f64) -> i64 {
    seconds_clamped(secs, Duration::MAX).as_millis() as i64
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// An RFC 3339 rendering of a millisecond timestamp, for humans and JSON.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The delay a `Retry-After` header value asks for: seconds (fractions allowed)
/// or an HTTP date, counted from `now_ms`, at most [`MAX_RETRY_AFTER`]. A date in
/// the past is no delay; anything else unreadable or negative is `None`.
pub fn retry_after(value: &str, now_ms: i64) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return (!secs.is_nan() && secs >= 0.0).then(|| seconds_clamped(secs, MAX_RETRY_AFTER));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?.timestamp_millis();
    Some(Duration::from_millis(at.saturating_sub(now_ms).max(0) as u64).min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_refuses_what_no_duration_holds() {
        assert_eq!(seconds(1.5), Some(Duration::from_millis(1500)));
        assert_eq!(seconds(0.0), Some(Duration::ZERO));
        assert_eq!(seconds(MAX_SECONDS), Some(Duration::from_secs(MAX_SECONDS as u64)));
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1.0, MAX_SECONDS + 1.0, 1e20, 1e300] {
            assert_eq!(seconds(bad), None, "{bad}");
        }
    }

    #[test]
    fn clamped_seconds_stay_in_range() {
        let max = Duration::from_secs(60);
        assert_eq!(seconds_clamped(2.0, max), Duration::from_secs(2));
        assert_eq!(seconds_clamped(1e300, max), max);
        assert_eq!(seconds_clamped(f64::INFINITY, max), max);
        assert_eq!(seconds_clamped(f64::NAN, max), Duration::ZERO);
        assert_eq!(seconds_clamped(-5.0, max), Duration::ZERO);
        assert_eq!(seconds_clamped(1e300, Duration::MAX), Duration::from_secs(MAX_SECONDS as u64));
        assert_eq!(millis(1e300), MAX_SECONDS as i64 * 1000);
        assert_eq!(millis(1.5), 1500);
    }

    #[test]
    fn retry_after_is_bounded() {
        let now = 1_445_412_480_000; // Wed, 21 Oct 2015 07:28:00 GMT
        assert_eq!(retry_after("1.5", now), Some(Duration::from_millis(1500)));
        assert_eq!(retry_after("1e20", now), Some(MAX_RETRY_AFTER));
        assert_eq!(retry_after("inf", now), Some(MAX_RETRY_AFTER));
        assert_eq!(retry_after("NaN", now), None);
        assert_eq!(retry_after("-1", now), None);
        assert_eq!(retry_after("Wed, 21 Oct 2015 07:29:30 GMT", now), Some(Duration::from_secs(90)));
        assert_eq!(retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now), Some(MAX_RETRY_AFTER));
        assert_eq!(retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(retry_after("soon", now), None);
    }
}
