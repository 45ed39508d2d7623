//! How long will a request take? The estimate the overlord compares with
//! `async.threshold_seconds`, and the `estimated_time` of a 202 answer.
//!
//! In order of trust:
//! 1. **history**: with at least [`MIN_HISTORY`] recent durations of the same
//!    formation and agent, the median of the latest [`HISTORY_WINDOW`]. A declared
//!    estimate is blended in as if it were [`DECLARED_WEIGHT`] more samples, so
//!    history takes over as it grows.
//! 2. **declared**: the agent's `estimated_seconds`.
//! 3. **features** of the message, after the factor table of the async
//!    processing guide: see [`FACTORS`].
//!
//! With `enable_estimation: false` only the declared estimate is used, else
//! [`BASE_SECONDS`].
//!
//! Only history and a declared estimate are *grounded*: in auto mode a request
//! whose estimate rests on neither is waited for up to the threshold (and
//! answered 202 then if still running) rather than sent async on a guess.

use std::fmt;

use serde::Serialize;

/// Fewest history samples that outweigh the other sources.
pub const MIN_HISTORY: usize = 3;
/// How many of the newest samples are looked at.
pub const HISTORY_WINDOW: usize = 20;
/// How many samples a declared estimate is worth when blended with history.
pub const DECLARED_WEIGHT: f64 = 3.0;
/// Any request costs this much (a model turn, a process start).
pub const BASE_SECONDS: f64 = 2.0;

/// How a factor's seconds are multiplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// Once per item: the largest number (1-100, digits or words) in the same
    /// clause as the word, else one. "research 3 competitors" is three items.
    PerItem,
    /// Once, however often the words appear.
    Once,
    /// Once per word that matches.
    PerMention,
    /// Once, when the words appear or the message combines two or more of the
    /// other factors (a multi-step task for several agents).
    Coordination,
}

/// One row of the factor table.
#[derive(Debug)]
pub struct Factor {
    pub name: &'static str,
    /// Word beginnings matched against the lower-cased words of the message
    /// (`"analy"` matches "analyze", "analysis", ...).
    pub stems: &'static [&'static str],
    pub seconds: f64,
    pub count: Count,
}

/// The message features and what each adds (the guide's "Execution Time
/// Estimation" table, with one value picked from each of its ranges).
pub const FACTORS: &[Factor] = &[
    Factor {
        name: "research",
        stems: &["research", "investigat", "source", "competitor", "survey", "gather"],
        seconds: 10.0,
        count: Count::PerItem,
    },
    Factor {
        name: "analysis",
        stems: &["analy", "compar", "evaluat", "assess", "review", "summari", "benchmark", "audit"],
        seconds: 15.0,
        count: Count::Once,
    },
    Factor {
        name: "tools",
        stems: &["api", "tool", "search", "browse", "fetch", "download", "scrape", "quer", "database", "web"],
        seconds: 5.0,
        count: Count::PerMention,
    },
    Factor {
        name: "files",
        stems: &["report", "document", "pdf", "spreadsheet", "presentation", "slide", "csv", "excel", "chart"],
        seconds: 10.0,
        count: Count::PerItem,
    },
    // Last: it counts the factors above.
    Factor {
        name: "coordination",
        stems: &["delegat", "coordinat", "team", "agents", "workflow"],
        seconds: 3.0,
        count: Count::Coordination,
    },
];

/// Number words understood as item counts.
const NUMBER_WORDS: &[(&str, u32)] = &[
    ("one", 1),
    ("two", 2),
    ("three", 3),
    ("four", 4),
    ("five", 5),
    ("six", 6),
    ("seven", 7),
    ("eight", 8),
    ("nine", 9),
    ("ten", 10),
    ("eleven", 11),
    ("twelve", 12),
    ("dozen", 12),
    ("fifteen", 15),
    ("twenty", 20),
    ("few", 3),
    ("several", 3),
];
/// Larger numbers are years, sizes, prices... not item counts.
const MAX_ITEMS: u32 = 100;

/// What the estimate is made from.
#[derive(Debug, Clone, Copy)]
pub struct EstimateInput<'a> {
    pub message: &'a str,
    /// The agent's declared `estimated_seconds`.
    pub estimated_seconds: Option<f64>,
    /// Recent durations in milliseconds of the same formation and agent, newest first.
    pub history: &'a [i64],
    /// `async.enable_estimation`.
    pub enable_estimation: bool,
}

/// Where an estimate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Basis {
    /// The median of this many recent runs (blended with a declared estimate).
    History {
        runs: u32,
    },
    Declared,
    Features,
    /// Estimation disabled and nothing declared: [`BASE_SECONDS`].
    Default,
}

impl Basis {
    pub fn as_str(self) -> &'static str {
        match self {
            Basis::History { .. } => "history",
            Basis::Declared => "declared",
            Basis::Features => "features",
            Basis::Default => "default",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// Never negative, always finite.
    pub seconds: f64,
    pub basis: Basis,
}

impl Estimate {
    /// Whether the estimate rests on the agent's history or its declared
    /// estimate, rather than on a guess from the message or nothing.
    pub fn is_grounded(&self) -> bool {
        matches!(self.basis, Basis::History { .. } | Basis::Declared)
    }

    /// A human range ending at the estimate, for `estimated_time`:
    /// "about 1 second", "7-10 seconds", "45-60 seconds", "2-3 minutes".
    pub fn range(&self) -> Range {
        Range { seconds: self.seconds }
    }
}

/// The `estimated_time` of a 202: the range and what it rests on, e.g.
/// "15-20 seconds (declared)", "35-50 seconds (history of 12 runs)",
/// "unknown (no history)". Written where it goes, no string built.
impl fmt::Display for Estimate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Piece by piece rather than with `write!`: a 202 writes one, and each
        // level of `format_args` costs a pass of `core::fmt::write`.
        match self.basis {
            Basis::Declared => {
                self.range().fmt(f)?;
                f.write_str(" (declared)")
            }
            Basis::History { runs } => {
                self.range().fmt(f)?;
                f.write_str(" (history of ")?;
                f.write_str(itoa::Buffer::new().format(runs))?;
                f.write_str(if runs == 1 { " run)" } else { " runs)" })
            }
            Basis::Features | Basis::Default => f.write_str("unknown (no history)"),
        }
    }
}

/// See [`Estimate::range`].
#[derive(Debug, Clone, Copy)]
pub struct Range {
    seconds: f64,
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let high = self.seconds.max(0.0);
        let low = high * 0.75;
        let (low, high, unit) = if high >= 120.0 {
            ((low / 60.0).floor().max(1.0), (high / 60.0).ceil(), "minute")
        } else if high >= 20.0 {
            ((low / 5.0).floor() * 5.0, (high / 5.0).ceil() * 5.0, "second")
        } else {
            (low.floor().max(1.0), high.ceil().max(1.0), "second")
        };
        // Whole numbers by construction; the casts only drop the ".0".
        let (low, high) = (low as u64, high as u64);
        let mut digits = itoa::Buffer::new();
        if low >= high {
            f.write_str("about ")?;
            f.write_str(digits.format(high))?;
            f.write_str(" ")?;
            f.write_str(unit)?;
            f.write_str(if high == 1 { "" } else { "s" })
        } else {
            f.write_str(digits.format(low))?;
            f.write_str("-")?;
            f.write_str(digits.format(high))?;
            f.write_str(" ")?;
            f.write_str(unit)?;
            f.write_str("s")
        }
    }
}

/// Estimates how long the request will take. Pure.
pub fn estimate(input: &EstimateInput) -> Estimate {
    let declared = input.estimated_seconds.filter(|s| s.is_finite() && *s >= 0.0);
    if !input.enable_estimation {
        return match declared {
            Some(seconds) => Estimate { seconds, basis: Basis::Declared },
            None => Estimate { seconds: BASE_SECONDS, basis: Basis::Default },
        };
    }
    if let Some(median) = history_median(input.history) {
        let runs = input.history.iter().take(HISTORY_WINDOW).filter(|ms| **ms > 0).count();
        let seconds = match declared {
            Some(declared) => {
                let n = runs as f64;
                (median * n + declared * DECLARED_WEIGHT) / (n + DECLARED_WEIGHT)
            }
            None => median,
        };
        return Estimate { seconds, basis: Basis::History { runs: runs as u32 } };
    }
    if let Some(seconds) = declared {
        return Estimate { seconds, basis: Basis::Declared };
    }
    Estimate { seconds: feature_seconds(input.message), basis: Basis::Features }
}

/// The median in seconds of the newest valid samples, when there are enough.
fn history_median(history: &[i64]) -> Option<f64> {
    let mut samples: Vec<i64> = history.iter().take(HISTORY_WINDOW).copied().filter(|ms| *ms > 0).collect();
    if samples.len() < MIN_HISTORY {
        return None;
    }
    samples.sort_unstable();
    let mid = samples.len() / 2;
    let median_ms = if samples.len().is_multiple_of(2) {
        (samples[mid - 1] as f64 + samples[mid] as f64) / 2.0
    } else {
        samples[mid] as f64
    };
    Some(median_ms / 1000.0)
}

/// [`BASE_SECONDS`] plus what the [`FACTORS`] add for this message.
fn feature_seconds(message: &str) -> f64 {
    let clauses = clauses(message);
    let mut total = BASE_SECONDS;
    let mut work_factors = 0;
    for factor in FACTORS {
        let hits: Vec<&Vec<String>> =
            clauses.iter().filter(|clause| clause.iter().any(|word| matches(factor, word))).collect();
        let mentions: usize = clauses.iter().flatten().filter(|word| matches(factor, word)).count();
        let times = match factor.count {
            Count::PerItem => hits.iter().map(|clause| items(clause)).max().unwrap_or(0) as f64,
            Count::Once => f64::from(u8::from(mentions > 0)),
            Count::PerMention => mentions as f64,
            Count::Coordination => f64::from(u8::from(mentions > 0 || work_factors >= 2)),
        };
        if times > 0.0 && factor.count != Count::Coordination {
            work_factors += 1;
        }
        total += factor.seconds * times;
    }
    total
}

fn matches(factor: &Factor, word: &str) -> bool {
    factor.stems.iter().any(|stem| word.starts_with(stem))
}

/// The message's clauses (split at punctuation, "and", "then"), each as its
/// lower-cased words.
fn clauses(message: &str) -> Vec<Vec<String>> {
    let mut clauses = Vec::new();
    for part in message.split([',', ';', '.', ':', '!', '?', '\n']) {
        let mut clause = Vec::new();
        for word in part.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()) {
            let word = word.to_lowercase();
            if word == "and" || word == "then" {
                clauses.push(std::mem::take(&mut clause));
            } else {
                clause.push(word);
            }
        }
        clauses.push(clause);
    }
    clauses.retain(|clause| !clause.is_empty());
    clauses
}

/// How many items a clause names: its largest count, else one.
fn items(clause: &[String]) -> u32 {
    clause
        .iter()
        .filter_map(|word| {
            word.parse::<u32>().ok().or_else(|| NUMBER_WORDS.iter().find(|(w, _)| w == word).map(|(_, n)| *n))
        })
        .filter(|n| (1..=MAX_ITEMS).contains(n))
        .max()
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(message: &str) -> Estimate {
        estimate(&EstimateInput { message, estimated_seconds: None, history: &[], enable_estimation: true })
    }

    #[test]
    fn seed_example_is_about_a_minute() {
        let e = features("Research 3 competitors, compare features, create report");
        assert_eq!(e.basis, Basis::Features);
        // 2 base + 3 × 10 research + 15 analysis + 10 report + 3 coordination.
        assert_eq!(e.seconds, 60.0);
        assert!(e.seconds >= 45.0);
        assert_eq!(e.range().to_string(), "45-60 seconds");
    }

    #[test]
    fn quick_questions_are_quick() {
        let e = features("What's the weather in SF?");
        assert!(e.seconds < 10.0, "{e:?}");
        assert_eq!(e.seconds, BASE_SECONDS);
        assert!(features("hello").seconds < 10.0);
    }

    #[test]
    fn item_counts_come_from_the_same_clause() {
        assert_eq!(features("research three sources").seconds, BASE_SECONDS + 30.0);
        // The 3 belongs to the research clause, not to the report.
        let e = features("research 3 competitors and write a report");
        assert_eq!(e.seconds, BASE_SECONDS + 30.0 + 10.0 + 3.0);
        // Years are not counts.
        assert_eq!(features("research AI trends in 2024").seconds, BASE_SECONDS + 10.0);
        // Bigger tasks go into minutes.
        let big = features("Research top 10 AI companies, analyze products, create comparison report");
        assert!(big.seconds >= 120.0, "{big:?}");
        assert!(big.range().to_string().ends_with("minutes"), "{}", big.range());
    }

    #[test]
    fn tools_count_per_mention() {
        assert_eq!(features("call the API").seconds, BASE_SECONDS + 5.0);
        assert_eq!(features("search the web").seconds, BASE_SECONDS + 10.0);
    }

    #[test]
    fn history_overrides_features_and_declared_is_blended() {
        let history = [40_000, 50_000, 60_000, 45_000];
        let e = estimate(&EstimateInput {
            message: "Research 10 competitors and create 5 reports",
            estimated_seconds: None,
            history: &history,
            enable_estimation: true,
        });
        assert_eq!(e, Estimate { seconds: 47.5, basis: Basis::History { runs: 4 } });

        let e = estimate(&EstimateInput {
            message: "hi",
            estimated_seconds: Some(20.0),
            history: &[30_000, 30_000, 30_000],
            enable_estimation: true,
        });
        // Three samples of 30 s weigh as much as the declared 20 s.
        assert_eq!(e, Estimate { seconds: 25.0, basis: Basis::History { runs: 3 } });
    }

    #[test]
    fn too_little_history_falls_back() {
        let e = estimate(&EstimateInput {
            message: "Research 3 competitors",
            estimated_seconds: Some(20.0),
            history: &[90_000, 0, -5, 80_000],
            enable_estimation: true,
        });
        assert_eq!(e, Estimate { seconds: 20.0, basis: Basis::Declared });
    }

    #[test]
    fn declared_is_used_without_history() {
        let e = estimate(&EstimateInput {
            message: "Research 3 competitors, compare features, create report",
            estimated_seconds: Some(1.0),
            history: &[],
            enable_estimation: true,
        });
        assert_eq!(e, Estimate { seconds: 1.0, basis: Basis::Declared });
    }

    #[test]
    fn disabled_estimation_uses_only_the_declared_estimate() {
        let history = [90_000, 90_000, 90_000];
        let mut input = EstimateInput {
            message: "Research 3 competitors, compare features, create report",
            estimated_seconds: Some(20.0),
            history: &history,
            enable_estimation: false,
        };
        assert_eq!(estimate(&input), Estimate { seconds: 20.0, basis: Basis::Declared });
        input.estimated_seconds = None;
        assert_eq!(estimate(&input), Estimate { seconds: BASE_SECONDS, basis: Basis::Default });
        input.estimated_seconds = Some(f64::NAN);
        assert_eq!(estimate(&input).basis, Basis::Default);
    }

    #[test]
    fn ranges_read_well() {
        let range = |seconds| Estimate { seconds, basis: Basis::Declared }.range().to_string();
        assert_eq!(range(0.0), "about 1 second");
        assert_eq!(range(1.0), "about 1 second");
        assert_eq!(range(2.0), "1-2 seconds");
        assert_eq!(range(10.0), "7-10 seconds");
        assert_eq!(range(20.0), "15-20 seconds");
        assert_eq!(range(47.0), "35-50 seconds");
        assert_eq!(range(60.0), "45-60 seconds");
        assert_eq!(range(180.0), "2-3 minutes");
        assert_eq!(range(3600.0), "45-60 minutes");
    }

    #[test]
    fn descriptions_say_what_the_estimate_rests_on() {
        let declared = Estimate { seconds: 20.0, basis: Basis::Declared };
        assert_eq!(declared.to_string(), "15-20 seconds (declared)");
        assert!(declared.is_grounded());
        let history = Estimate { seconds: 47.0, basis: Basis::History { runs: 12 } };
        assert_eq!(history.to_string(), "35-50 seconds (history of 12 runs)");
        let once = Estimate { seconds: 1.0, basis: Basis::History { runs: 1 } };
        assert_eq!(once.to_string(), "about 1 second (history of 1 run)");
        assert!(history.is_grounded());
        for basis in [Basis::Features, Basis::Default] {
            let guess = Estimate { seconds: 60.0, basis };
            assert_eq!(guess.to_string(), "unknown (no history)");
            assert!(!guess.is_grounded());
        }
    }

    #[test]
    fn factor_table_is_sane() {
        assert_eq!(FACTORS.iter().position(|f| f.count == Count::Coordination), Some(FACTORS.len() - 1));
        for factor in FACTORS {
            assert!(factor.seconds > 0.0, "{}", factor.name);
            assert!(factor.stems.iter().all(|s| !s.is_empty() && *s == s.to_lowercase()), "{}", factor.name);
        }
    }
}
