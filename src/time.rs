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

/// An RFC 3339 rendering of a millisecond timestamp, for humans and JSON:
/// `2026-11-22T04:52:07.123Z`.
pub fn rfc3339(ms: i64) -> String {
    Rfc3339::new(ms).as_str().to_owned()
}

/// A time as RFC 3339 text with milliseconds, `2026-11-22T04:52:07.123Z`,
/// held without allocating (a status document writes three). Written digit by
/// digit for years 0 to 9999 (chrono's formatter costs a status poll about 700
/// instructions a date); chrono writes the rest.
#[derive(Clone, Copy)]
pub struct Rfc3339 {
    text: [u8; Rfc3339::CAPACITY],
    len: u8,
}

impl Rfc3339 {
    /// Chrono's widest: `+262143-12-31T23:59:59.999Z`.
    const CAPACITY: usize = 32;

    pub fn new(ms: i64) -> Rfc3339 {
        use chrono::{Datelike, Timelike};
        let at = chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default();
        let mut text = [0u8; Rfc3339::CAPACITY];
        let year = at.year();
        if !(0..=9999).contains(&year) {
            let wide = at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            let len = wide.len().min(Rfc3339::CAPACITY);
            text[..len].copy_from_slice(&wide.as_bytes()[..len]);
            return Rfc3339 { text, len: len as u8 };
        }
        text[..24].copy_from_slice(b"0000-00-00T00:00:00.000Z");
        let mut put = |at: usize, value: u32, digits: usize| {
            let mut value = value;
            for i in (at..at + digits).rev() {
                text[i] = b'0' + (value % 10) as u8;
                value /= 10;
            }
        };
        put(0, year as u32, 4);
        put(5, at.month(), 2);
        put(8, at.day(), 2);
        put(11, at.hour(), 2);
        put(14, at.minute(), 2);
        put(17, at.second(), 2);
        // A leap second's nanoseconds run past 999,999,999; chrono never makes one from a timestamp.
        put(20, (at.nanosecond() / 1_000_000).min(999), 3);
        Rfc3339 { text, len: 24 }
    }

    pub fn as_str(&self) -> &str {
        // Digits and separators, or chrono's ASCII: always UTF-8.
        std::str::from_utf8(&self.text[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl serde::Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
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

    /// The hand-written dates are chrono's, byte for byte, over 10,000 years
    /// and at the edges (the epoch, before it, leap days, the last millisecond
    /// of a year), and chrono's own beyond year 9999.
    #[test]
    fn dates_are_written_as_chrono_writes_them() {
        let chrono = |ms: i64| {
            chrono::DateTime::from_timestamp_millis(ms)
                .unwrap_or_default()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        };
        let edges = [
            0,
            -1,
            1,
            999,
            951_782_400_000,     // 2000-02-29
            1_798_761_599_999,   // 2026-12-31T23:59:59.999
            -62_167_219_200_000, // 0000-01-01
            253_402_300_799_999, // 9999-12-31T23:59:59.999
            253_402_300_800_000, // 10000-01-01
            -62_167_219_200_001, // before year 0
            i64::MAX,
            i64::MIN,
        ];
        let mut ms: i64 = -62_167_219_200_000;
        let mut spread = Vec::new();
        while ms < 253_402_300_800_000 {
            spread.push(ms);
            ms += 31_556_952_123 + ms.rem_euclid(86_400_000); // about a year, at a new time of day
        }
        for ms in edges.into_iter().chain(spread) {
            assert_eq!(rfc3339(ms), chrono(ms), "{ms}");
        }
    }

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
