//! Wall-clock helpers: every timestamp muxi-rt stores is milliseconds since the Unix epoch.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// An RFC 3339 rendering of a millisecond timestamp, for humans and JSON.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The delay a `Retry-After` header value asks for: seconds (fractions allowed)
/// or an HTTP date, counted from `now_ms`. A date in the past is no delay;
/// anything else unreadable or negative is `None`.
pub fn retry_after(value: &str, now_ms: i64) -> Option<std::time::Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| std::time::Duration::from_secs_f64(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?.timestamp_millis();
    Some(std::time::Duration::from_millis((at - now_ms).max(0) as u64))
}
