//! How a request's progress is shown: a live bar (percent, current step,
//! elapsed time) when stdout is a terminal, plain lines on stderr otherwise,
//! nothing with `--json`.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub enum Display {
    Bar(ProgressBar),
    Plain { last: Option<(u64, String)> },
    Quiet,
}

/// A spinner with elapsed time while waiting for an answer; on a terminal only.
pub fn spinner(json: bool, text: &str) -> Option<ProgressBar> {
    if json || !std::io::stdout().is_terminal() {
        return None;
    }
    let spinner = ProgressBar::with_draw_target(None, ProgressDrawTarget::stdout());
    if let Ok(style) = ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}") {
        spinner.set_style(style);
    }
    spinner.set_message(text.to_string());
    spinner.enable_steady_tick(Duration::from_millis(120));
    Some(spinner)
}

impl Display {
    /// The display for this process: a bar only when stdout is a terminal.
    pub fn new(json: bool) -> Display {
        if json {
            Display::Quiet
        } else if std::io::stdout().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(100), ProgressDrawTarget::stdout());
            let style = ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos:>3}% {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(120));
            Display::Bar(bar)
        } else {
            Display::Plain { last: None }
        }
    }

    /// Shows `percent` (0-100) and the current step.
    pub fn update(&mut self, percent: f64, step: &str) {
        let percent = if percent.is_finite() { percent.clamp(0.0, 100.0) as u64 } else { 0 };
        match self {
            Display::Bar(bar) => {
                bar.set_position(percent);
                bar.set_message(step.to_string());
            }
            Display::Plain { last } => {
                let now = Some((percent, step.to_string()));
                if *last != now {
                    eprintln!("progress {percent:>3}% {step}");
                    *last = now;
                }
            }
            Display::Quiet => {}
        }
    }

    /// A line for people, above the bar.
    pub fn note(&self, text: &str) {
        match self {
            Display::Bar(bar) => bar.println(text),
            Display::Plain { .. } => eprintln!("{text}"),
            Display::Quiet => {}
        }
    }

    /// Runs `f` with the bar out of the way (prompts).
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        match self {
            Display::Bar(bar) => bar.suspend(f),
            _ => f(),
        }
    }

    /// Removes the bar for good.
    pub fn finish(&self) {
        if let Display::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}
