//! Progress of long-running commands (`rebuild`): a bar with rate and ETA on a terminal,
//! a line every few seconds otherwise (CI logs, `kubectl logs`).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

pub enum Progress {
    Hidden,
    Bar(indicatif::ProgressBar),
    Lines {
        what: &'static str,
        total: u64,
        done: u64,
        started: Instant,
        last: Instant,
        every: Duration,
    },
}

impl Progress {
    /// Chooses the form from where stderr goes; `enabled: false` shows nothing.
    pub fn new(what: &'static str, total: u64, enabled: bool) -> Progress {
        if !enabled {
            return Progress::Hidden;
        }
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:40}] {pos}/{len} ({per_sec}, ETA {eta})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message(what);
            Progress::Bar(bar)
        } else {
            let now = Instant::now();
            Progress::Lines {
                what,
                total,
                done: 0,
                started: now,
                last: now,
                every: Duration::from_secs(5),
            }
        }
    }

    pub fn advance(&mut self, n: u64) {
        match self {
            Progress::Hidden => {}
            Progress::Bar(b) => b.inc(n),
            Progress::Lines {
                what,
                total,
                done,
                started,
                last,
                every,
            } => {
                *done += n;
                if last.elapsed() >= *every {
                    *last = Instant::now();
                    eprintln!("{}", line(what, *done, *total, started.elapsed()));
                }
            }
        }
    }

    pub fn finish(self) {
        if let Progress::Bar(b) = self {
            b.finish_and_clear();
        }
    }
}

/// `rebuild: 12000/50000 (24%), 35000/s, ETA 1s`
pub fn line(what: &str, done: u64, total: u64, elapsed: Duration) -> String {
    let rate = done as f64 / elapsed.as_secs_f64().max(1e-3);
    let eta = total.saturating_sub(done) as f64 / rate.max(1.0);
    let pct = 100.0 * done as f64 / total.max(1) as f64;
    format!("{what}: {done}/{total} ({pct:.0}%), {rate:.0}/s, ETA {eta:.0}s")
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_progress_line_has_count_rate_and_eta() {
        assert_eq!(
            super::line("rebuild", 250, 1000, std::time::Duration::from_secs(5)),
            "rebuild: 250/1000 (25%), 50/s, ETA 15s"
        );
    }
}
