//! The sync-or-async decision for one request: pure, so it is unit-tested alone.

use std::time::Duration;

use crate::formation::{AsyncMode, AsyncSettings};
use crate::overlord::estimate::Estimate;
use crate::store::Mode;

/// How the caller is answered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Plan {
    /// Answer 202 with the request id at once.
    Async,
    /// Wait for the result. `limit` is auto mode's promise: a request judged quick
    /// that is still running at the threshold is answered 202 then.
    Wait { limit: Option<Duration> },
}

impl Plan {
    /// The mode recorded with the request.
    pub fn mode(self) -> Mode {
        match self {
            Plan::Async => Mode::Async,
            Plan::Wait { .. } => Mode::Sync,
        }
    }
}

/// Decides how to answer. A per-request `async` field overrides the formation's
/// mode; a per-request `threshold_seconds` overrides its threshold. In auto
/// mode an estimate resting on no history and no declared estimate is not
/// trusted to send work async: it is waited for up to the threshold.
pub fn decide(
    settings: &AsyncSettings,
    async_override: Option<bool>,
    threshold_override: Option<f64>,
    estimate: &Estimate,
) -> Plan {
    let mode = match async_override {
        Some(true) => AsyncMode::Async,
        Some(false) => AsyncMode::Sync,
        None => settings.mode,
    };
    match mode {
        AsyncMode::Async => Plan::Async,
        AsyncMode::Sync => Plan::Wait { limit: None },
        AsyncMode::Auto => {
            let threshold = threshold_override.unwrap_or(settings.threshold_seconds).max(0.0);
            if estimate.is_grounded() && estimate.seconds >= threshold {
                Plan::Async
            } else {
                Plan::Wait { limit: Some(crate::time::seconds_clamped(threshold, Duration::MAX)) }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlord::estimate::Basis;

    fn settings(mode: AsyncMode, threshold: f64) -> AsyncSettings {
        AsyncSettings { mode, threshold_seconds: threshold, ..AsyncSettings::default() }
    }

    fn declared(seconds: f64) -> Estimate {
        Estimate { seconds, basis: Basis::Declared }
    }

    #[test]
    fn auto_goes_async_at_or_above_the_threshold() {
        let s = settings(AsyncMode::Auto, 30.0);
        assert_eq!(decide(&s, None, None, &declared(30.0)), Plan::Async);
        assert_eq!(decide(&s, None, None, &declared(31.0)), Plan::Async);
        let history = Estimate { seconds: 31.0, basis: Basis::History { runs: 3 } };
        assert_eq!(decide(&s, None, None, &history), Plan::Async);
        assert_eq!(decide(&s, None, None, &declared(29.9)), Plan::Wait { limit: Some(Duration::from_secs(30)) });
    }

    #[test]
    fn auto_waits_up_to_the_threshold_on_an_ungrounded_guess() {
        let s = settings(AsyncMode::Auto, 30.0);
        for basis in [Basis::Features, Basis::Default] {
            let guess = Estimate { seconds: 60.0, basis };
            assert_eq!(decide(&s, None, None, &guess), Plan::Wait { limit: Some(Duration::from_secs(30)) });
            // The caller can still ask for async.
            assert_eq!(decide(&s, Some(true), None, &guess), Plan::Async);
        }
    }

    #[test]
    fn fixed_modes_ignore_the_estimate() {
        assert_eq!(decide(&settings(AsyncMode::Sync, 1.0), None, None, &declared(500.0)), Plan::Wait { limit: None });
        assert_eq!(decide(&settings(AsyncMode::Async, 100.0), None, None, &declared(0.0)), Plan::Async);
    }

    #[test]
    fn the_request_overrides_the_formation() {
        let s = settings(AsyncMode::Sync, 30.0);
        assert_eq!(decide(&s, Some(true), None, &declared(0.0)), Plan::Async);
        let s = settings(AsyncMode::Async, 30.0);
        assert_eq!(decide(&s, Some(false), None, &declared(500.0)), Plan::Wait { limit: None });
        let s = settings(AsyncMode::Auto, 30.0);
        assert_eq!(decide(&s, None, Some(5.0), &declared(10.0)), Plan::Async);
        assert_eq!(decide(&s, None, Some(60.0), &declared(10.0)), Plan::Wait { limit: Some(Duration::from_secs(60)) });
    }

    #[test]
    fn a_huge_threshold_never_panics() {
        let s = settings(AsyncMode::Auto, 1e300);
        assert!(matches!(decide(&s, None, None, &declared(1.0)), Plan::Wait { limit: Some(_) }));
    }
}
