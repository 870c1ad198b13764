//! Reading what a run recorded: the CPS simulator's per-cycle trace and
//! the phases of a migration report.

/// One cycle of a CPS simulator trace: when its input was sent and its
/// output answered (µs since the CPS started; 0: never answered).
#[derive(Clone, Copy, Debug)]
pub struct Cycle {
    pub seq: u64,
    pub sent_us: u64,
    pub answered_us: u64,
}

/// Parses a trace written by `cps-sim --trace` ("SEQ SENT ANSWERED" lines).
pub fn read_trace(text: &str) -> Vec<Cycle> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<u64> = line
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            (f.len() == 3).then(|| Cycle {
                seq: f[0],
                sent_us: f[1],
                answered_us: f[2],
            })
        })
        .collect()
}

/// Output gaps beyond `period_us` from a CPS trace (µs), by the cycle that
/// ended them.
pub fn output_gaps(trace: &str, period_us: u64) -> Vec<(u64, i64)> {
    gaps_between(
        read_trace(trace).iter().map(|c| (c.seq, c.answered_us)),
        period_us,
    )
}

/// Output gaps beyond `period_us` between consecutive answered cycles of
/// `cycles` ((seq, answered µs), 0: never answered), by the cycle that
/// ended them: its number, not its place among the answered ones.
pub fn gaps_between(
    cycles: impl IntoIterator<Item = (u64, u64)>,
    period_us: u64,
) -> Vec<(u64, i64)> {
    let answered: Vec<(u64, u64)> = cycles.into_iter().filter(|c| c.1 != 0).collect();
    answered
        .windows(2)
        .map(|w| (w[1].0, w[1].1 as i64 - w[0].1 as i64 - period_us as i64))
        .collect()
}

/// A phase of a migration report: (start, duration) in µs; zeros if absent.
pub fn report_phase(report: &serde_json::Value, name: &str) -> (u64, u64) {
    report["phases"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == name)
        .map_or((0, 0), |p| {
            (
                p["start_us"].as_u64().unwrap_or(0),
                p["duration_us"].as_u64().unwrap_or(0),
            )
        })
}
