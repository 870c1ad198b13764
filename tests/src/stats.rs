//! What the benchmarks print of their samples, honest about small ones,
//! and the verdict line of every bar a benchmark states.
//!
//! A percentile is taken by nearest rank, and shown only when the sample
//! has a value above it: below 1 / (1 - p) values (100 for p99) the
//! nearest rank is the last, and "p99" would be the maximum under another
//! name.

/// A sample's values, sorted.
#[derive(Clone, Debug, Default)]
pub struct Sample(Vec<f64>);

impl Sample {
    pub fn new(values: impl IntoIterator<Item = f64>) -> Self {
        let mut values: Vec<f64> = values.into_iter().collect();
        values.sort_by(f64::total_cmp);
        Self(values)
    }

    pub fn n(&self) -> usize {
        self.0.len()
    }

    pub fn min(&self) -> Option<f64> {
        self.0.first().copied()
    }

    pub fn max(&self) -> Option<f64> {
        self.0.last().copied()
    }

    /// The smallest value with at least a fraction `p` of the sample at or
    /// below it; none when that is the maximum (too few values to tell).
    pub fn percentile(&self, p: f64) -> Option<f64> {
        let n = self.0.len();
        // The epsilon keeps 0.99 * 100 at rank 99 whatever its rounding.
        let rank = (p * n as f64 - 1e-9).ceil().max(1.0) as usize;
        (rank < n).then(|| self.0[rank - 1])
    }

    /// "p50 61 p99 330 max 383 (n 100)", each value through `show`; a
    /// percentile the sample is too small for is "-".
    pub fn describe(&self, percentiles: &[f64], show: impl Fn(f64) -> String) -> String {
        let shown = |v: Option<f64>| v.map_or("-".to_string(), &show);
        let mut parts: Vec<String> = percentiles
            .iter()
            .map(|&p| format!("p{} {}", p * 100.0, shown(self.percentile(p))))
            .collect();
        parts.push(format!("max {}", shown(self.max())));
        format!("{} (n {})", parts.join(" "), self.n())
    }
}

/// The line a bar gets: what it asks, what it was judged on (the statistic
/// and its n), and whether it is met.
pub fn bar(asks: &str, judged_on: &str, met: bool) -> String {
    let verdict = if met { "met" } else { "not met" };
    format!("bar: {asks}: {judged_on}: {verdict}")
}

/// What a benchmark's migrations (of one kind, in the order they ran) did
/// to the CPS's outputs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Outcomes {
    pub migrations: usize,
    /// Migrations that failed and rolled back.
    pub failed: usize,
    pub missed: u64,
    pub duplicates: u64,
    pub wrong: u64,
}

impl Outcomes {
    /// The bar of `needed` consecutive migrations with every output once
    /// and right. A failed migration fails it too: rolled back, it handed
    /// nothing over, so it is not one of the migrations the bar counts.
    pub fn bar(&self, needed: usize) -> String {
        let Self {
            migrations,
            failed,
            missed,
            duplicates,
            wrong,
        } = *self;
        bar(
            &format!(
                "{needed} consecutive migrations, none failed, no output missed, duplicated or \
                 wrong"
            ),
            &format!(
                "{migrations} migrations, {failed} failed, missed {missed} duplicates \
                 {duplicates} wrong {wrong}"
            ),
            migrations >= needed && failed == 0 && missed + duplicates + wrong == 0,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p99_needs_a_hundred_values_and_is_otherwise_the_maximum() {
        let twenty = Sample::new((1..=20).map(f64::from));
        assert_eq!(twenty.percentile(0.99), None, "rank 20 of 20: the max");
        assert_eq!(twenty.percentile(0.5), Some(10.0));
        let hundred = Sample::new((1..=100).rev().map(f64::from));
        assert_eq!(hundred.percentile(0.99), Some(99.0));
        assert_eq!(hundred.percentile(0.999), None);
        assert_eq!((hundred.min(), hundred.max()), (Some(1.0), Some(100.0)));
        assert_eq!(Sample::new([7.0]).percentile(0.5), None);
        assert_eq!(Sample::default().max(), None);
        assert_eq!(
            twenty.describe(&[0.5, 0.99], |v| format!("{v:.0}")),
            "p50 10 p99 - max 20 (n 20)"
        );
        assert_eq!(
            hundred.describe(&[0.999], |v| format!("{v}")),
            "p99.9 - max 100 (n 100)"
        );
    }

    #[test]
    fn a_bar_line_names_its_statistic() {
        assert_eq!(
            bar("p99 under 1 ms", "p99 0.5 ms (n 100)", true),
            "bar: p99 under 1 ms: p99 0.5 ms (n 100): met"
        );
        assert!(bar("x", "y", false).ends_with(": not met"));
    }

    /// Each of a wrong output, a failed migration and too few migrations
    /// fails the outputs bar on its own.
    #[test]
    fn the_outputs_bar_counts_wrong_outputs_failures_and_runs() {
        let clean = Outcomes {
            migrations: 100,
            ..Outcomes::default()
        };
        assert_eq!(
            clean.bar(100),
            "bar: 100 consecutive migrations, none failed, no output missed, duplicated or \
             wrong: 100 migrations, 0 failed, missed 0 duplicates 0 wrong 0: met"
        );
        for spoilt in [
            Outcomes { wrong: 1, ..clean },
            Outcomes { failed: 1, ..clean },
            Outcomes { missed: 1, ..clean },
            Outcomes {
                duplicates: 1,
                ..clean
            },
            Outcomes {
                migrations: 99,
                ..clean
            },
        ] {
            assert!(spoilt.bar(100).ends_with("not met"), "{spoilt:?}");
        }
    }
}
