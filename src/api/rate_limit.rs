//! Rate limits (`governor` token buckets), checked once a caller's key is
//! known good (in [`super::auth::authorize`]):
//! - per server: `serve --rate-limit RPS[:BURST]`, per API key presented;
//! - per formation: `server.rate_limits.per_key` and `.per_user`.
//!
//! A caller over a limit is answered 429 `rate_limited` with a `Retry-After`
//! giving the real wait: governor's earliest possible time, rounded up to
//! whole seconds. Keys are held as digests, never as presented.

use foldhash::HashMap;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use axum::http::HeaderMap;
use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota};
use serde_json::json;

use super::auth;
use crate::error::{ApiError, Code};
use crate::formation::{Formation, Rate};

/// The largest rate and burst accepted (the schema says the same).
pub const MAX_RATE: f64 = 1_000_000.0;
pub const MAX_BURST: u32 = 1_000_000;
/// Past this many tracked keys, buckets back to full are forgotten.
const MAX_TRACKED: usize = 100_000;

type Limiter = DefaultKeyedRateLimiter<String>;

/// The limiters of this server.
#[derive(Default)]
pub struct RateLimits {
    server: Option<Limiter>,
    /// Per formation id: the limits they were built from, per key and per user.
    formations: Mutex<HashMap<String, FormationLimiters>>,
}

struct FormationLimiters {
    config: crate::formation::RateLimits,
    per_key: Option<std::sync::Arc<Limiter>>,
    per_user: Option<std::sync::Arc<Limiter>>,
}

/// Parses `RPS[:BURST]` (`serve --rate-limit`).
pub fn parse_rate(text: &str) -> Result<Rate, String> {
    let (rps, burst) = match text.split_once(':') {
        Some((rps, burst)) => (rps, Some(burst)),
        None => (text, None),
    };
    let requests_per_second: f64 = rps.trim().parse().map_err(|_| format!("`{rps}` is not a number of requests"))?;
    if !(requests_per_second > 0.0 && requests_per_second <= MAX_RATE) {
        return Err(format!("the rate must be above 0 and at most {MAX_RATE} requests per second"));
    }
    let burst = match burst {
        None => None,
        Some(b) => match b.trim().parse::<u32>() {
            Ok(n) if (1..=MAX_BURST).contains(&n) => Some(n),
            _ => return Err(format!("the burst `{b}` must be a whole number from 1 to {MAX_BURST}")),
        },
    };
    Ok(Rate { requests_per_second, burst })
}

fn quota(rate: &Rate) -> Quota {
    let rps = if rate.requests_per_second.is_finite() { rate.requests_per_second.clamp(1e-6, MAX_RATE) } else { 1.0 };
    let burst = rate.burst.unwrap_or_else(|| rps.ceil() as u32).clamp(1, MAX_BURST);
    let period = crate::time::seconds_clamped(1.0 / rps, Duration::MAX).max(Duration::from_nanos(1));
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(period).unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN)).allow_burst(burst)
}

fn digest(text: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(text.as_bytes())[..16])
}

impl RateLimits {
    /// Limits with a server-wide rate per key (`None`: none).
    pub fn new(server: Option<Rate>) -> RateLimits {
        RateLimits { server: server.map(|r| Limiter::keyed(quota(&r))), formations: Mutex::default() }
    }

    /// Takes one token from every bucket the call falls in; the first empty
    /// one refuses it with the wait.
    pub fn check(&self, formation: &Formation, headers: &HeaderMap) -> Result<(), ApiError> {
        let (per_key, per_user) = self.of(formation);
        // The key's digest only when a limit per key needs it.
        let key = if self.server.is_some() || per_key.is_some() {
            let key = auth::header(headers, auth::CLIENT_KEY).or_else(|| auth::header(headers, auth::ADMIN_KEY));
            key.map(|k| digest(&format!("{}\n{k}", formation.id)))
        } else {
            None
        };
        if let (Some(limiter), Some(key)) = (&self.server, &key) {
            take(limiter, key, formation, "server")?;
        }
        if let (Some(limiter), Some(key)) = (per_key, &key) {
            take(&limiter, key, formation, "key")?;
        }
        if let Some(limiter) = per_user {
            let user = auth::header(headers, auth::USER_ID).unwrap_or(auth::DEFAULT_USER);
            take(&limiter, &digest(user), formation, "user")?;
        }
        Ok(())
    }

    /// The formation's limiters, rebuilt when its limits changed on reload.
    fn of(&self, formation: &Formation) -> (Option<std::sync::Arc<Limiter>>, Option<std::sync::Arc<Limiter>>) {
        let config = &formation.rate_limits;
        if config.per_key.is_none() && config.per_user.is_none() {
            return (None, None);
        }
        let mut all = self.formations.lock().unwrap_or_else(|e| e.into_inner());
        let entry = all.entry(formation.id.clone()).or_insert_with(|| FormationLimiters {
            config: Default::default(),
            per_key: None,
            per_user: None,
        });
        if &entry.config != config {
            entry.config = config.clone();
            entry.per_key = config.per_key.as_ref().map(|r| std::sync::Arc::new(Limiter::keyed(quota(r))));
            entry.per_user = config.per_user.as_ref().map(|r| std::sync::Arc::new(Limiter::keyed(quota(r))));
        }
        (entry.per_key.clone(), entry.per_user.clone())
    }
}

fn take(limiter: &Limiter, key: &String, formation: &Formation, which: &'static str) -> Result<(), ApiError> {
    if limiter.len() > MAX_TRACKED {
        limiter.retain_recent();
    }
    match limiter.check_key(key) {
        Ok(()) => Ok(()),
        Err(not_until) => {
            let wait = not_until.wait_time_from(limiter.clock().now());
            crate::observability::metrics::rate_limited(&formation.id, which);
            Err(limited(wait, &format!("the {which} rate limit of formation `{}` is reached", formation.id)))
        }
    }
}

/// A 429 `rate_limited` with a `Retry-After` of `wait` rounded up (at least 1 s).
pub fn limited(wait: Duration, what: &str) -> ApiError {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let seconds = seconds.max(1);
    ApiError::new(Code::RateLimited, format!("{what}; try again in {seconds} s"))
        .with_details(json!({ "retry_after_seconds": seconds }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rates_and_refuses_nonsense() {
        assert_eq!(parse_rate("5").unwrap(), Rate { requests_per_second: 5.0, burst: None });
        assert_eq!(parse_rate("0.5:3").unwrap(), Rate { requests_per_second: 0.5, burst: Some(3) });
        for bad in ["0", "-1", "x", "1e9", "NaN", "inf", "5:0", "5:x", "5:2000000"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_wait_is_rounded_up() {
        let error = limited(Duration::from_millis(1200), "x");
        assert_eq!(error.details.unwrap()["retry_after_seconds"], 2);
        let error = limited(Duration::ZERO, "x");
        assert_eq!(error.details.unwrap()["retry_after_seconds"], 1);
    }
}
