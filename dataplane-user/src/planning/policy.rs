//! When to stop iterative pre-dump and take the final dump.
//!
//! Each pre-dump round copies the pages dirtied since the previous one while
//! the service runs; the final dump freezes it and copies what is left. More
//! rounds pay while they shrink what is left. The policy stops at the first
//! of: a round limit; a round that wrote fewer pages than a threshold; two
//! consecutive rounds with equal image hashes (kaur2020); or a prediction,
//! in the spirit of calagna2023's PAM model, that another round would not
//! leave fewer pages for the final dump than there are now.
//!
//! The prediction is the PAM model's (`crate::planning::model`): the pages a round
//! leaves are the dirty rate times the time the service ran during it
//! (calagna2023 Eq. 4), with the round's duration a line in the pages it
//! copies (Eq. 17, 18), fitted here to the rounds so far.
use crate::planning::model::{Line, dirtied, fit_line, mean};

/// What one pre-dump round did, from CRIU's stats-dump.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Round {
    /// Pages the round wrote (dirty since the round before).
    pub pages_written: u64,
    /// The round's duration in microseconds.
    pub duration_us: u64,
    /// A hash of the round's page images.
    pub images_hash: u64,
}

/// Why pre-dumping stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The configured number of rounds is reached.
    RoundLimit,
    /// The last round wrote fewer pages than the threshold.
    FewDirtyPages,
    /// The last two rounds' images hash equal: the state stopped changing.
    ImagesUnchanged,
    /// The model predicts another round leaves as much for the final dump.
    NoGain,
}

/// The stop policy; every criterion is checked after each round.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StopPolicy {
    /// Most pre-dump rounds.
    pub max_rounds: usize,
    /// Stop once a round writes fewer pages than this.
    pub dirty_pages_below: u64,
    /// Stop when two consecutive rounds' images hash equal.
    pub stop_on_equal_hashes: bool,
    /// Stop when the model predicts no gain from another round.
    pub predict: bool,
}

impl Default for StopPolicy {
    fn default() -> Self {
        Self {
            max_rounds: 5,
            dirty_pages_below: 64,
            stop_on_equal_hashes: true,
            predict: true,
        }
    }
}

impl StopPolicy {
    /// After `rounds`, whether to stop, and why; `None` means do another round.
    pub fn decide(&self, rounds: &[Round]) -> Option<Stop> {
        let last = rounds.last()?;
        if rounds.len() >= self.max_rounds {
            return Some(Stop::RoundLimit);
        }
        if last.pages_written < self.dirty_pages_below {
            return Some(Stop::FewDirtyPages);
        }
        if let [.., before, last] = rounds {
            if self.stop_on_equal_hashes && before.images_hash == last.images_hash {
                return Some(Stop::ImagesUnchanged);
            }
            if self.predict && predicted_left(rounds)? >= last.pages_written as f64 {
                return Some(Stop::NoGain);
            }
        }
        None
    }
}

/// Pages another round would leave for the final dump: the dirty rate
/// (pages written by the last round over the previous round's duration, the
/// time they had to get dirty) times the next round's predicted duration
/// (Eq. 4), from the line duration = a + b * pages over the rounds so far.
fn predicted_left(rounds: &[Round]) -> Option<f64> {
    let [.., before, last] = rounds else {
        return None;
    };
    let pages_per_s = last.pages_written as f64 / before.duration_us.max(1) as f64 * 1e6;
    let next_duration = fit(rounds).at(last.pages_written as f64).max(0.0);
    Some(dirtied(pages_per_s, next_duration, f64::INFINITY))
}

/// Least-squares fit of duration = a + b * pages (through the origin if all
/// rounds wrote the same number of pages).
fn fit(rounds: &[Round]) -> Line {
    let points: Vec<(f64, f64)> = rounds
        .iter()
        .map(|r| (r.pages_written as f64, r.duration_us as f64))
        .collect();
    fit_line(&points).unwrap_or_else(|| {
        let (pages, duration) = mean(&points);
        Line {
            fixed: 0.0,
            slope: if pages > 0.0 { duration / pages } else { 0.0 },
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rounds made up to show each rule, not recorded: the test kernel has
    /// no soft-dirty memory tracking, so CRIU cannot pre-dump there.
    fn rounds(made_up: &[(u64, u64, u64)]) -> Vec<Round> {
        made_up
            .iter()
            .map(|&(pages_written, duration_us, images_hash)| Round {
                pages_written,
                duration_us,
                images_hash,
            })
            .collect()
    }

    #[test]
    fn a_converging_service_is_pre_dumped_until_little_is_dirty() {
        // A service whose working set settles: every round writes a fifth of the last.
        let policy = StopPolicy::default();
        let made_up = rounds(&[
            (4096, 40_000, 1),
            (800, 9_000, 2),
            (150, 2_500, 3),
            (30, 800, 4),
        ]);
        let decisions: Vec<_> = (1..=made_up.len())
            .map(|n| policy.decide(&made_up[..n]))
            .collect();
        assert_eq!(decisions, [None, None, None, Some(Stop::FewDirtyPages)]);
    }

    #[test]
    fn a_service_dirtying_faster_than_a_round_copies_gains_nothing() {
        // 16 MiB dirtied at a steady rate: each round writes as much as the last.
        let policy = StopPolicy::default();
        let made_up = rounds(&[(4096, 40_000, 1), (4096, 40_000, 2)]);
        assert_eq!(policy.decide(&made_up[..1]), None);
        assert_eq!(policy.decide(&made_up), Some(Stop::NoGain));
    }

    #[test]
    fn equal_image_hashes_stop_as_in_kaur2020() {
        let policy = StopPolicy {
            predict: false,
            ..StopPolicy::default()
        };
        let made_up = rounds(&[(4096, 40_000, 7), (500, 5_000, 9), (500, 5_000, 9)]);
        assert_eq!(policy.decide(&made_up[..2]), None);
        assert_eq!(policy.decide(&made_up), Some(Stop::ImagesUnchanged));
    }

    #[test]
    fn the_round_limit_holds_whatever_else_says() {
        let policy = StopPolicy {
            max_rounds: 2,
            ..StopPolicy::default()
        };
        let made_up = rounds(&[(4096, 40_000, 1), (2000, 20_000, 2)]);
        assert_eq!(policy.decide(&made_up), Some(Stop::RoundLimit));
        assert_eq!(policy.decide(&[]), None, "no round yet: do one");
    }

    #[test]
    fn the_fit_recovers_a_linear_cost() {
        // duration = 500 us + 10 us per page.
        let made_up = rounds(&[(100, 1_500, 0), (300, 3_500, 0), (1000, 10_500, 0)]);
        let line = fit(&made_up);
        assert!(
            (line.fixed - 500.0).abs() < 1e-6 && (line.slope - 10.0).abs() < 1e-9,
            "{line:?}"
        );
        let same = rounds(&[(100, 2_000, 0), (100, 2_000, 0)]);
        assert_eq!(
            fit(&same),
            Line {
                fixed: 0.0,
                slope: 20.0
            }
        );
    }
}
