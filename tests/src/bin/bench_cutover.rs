//! `cargo xtask bench cutover [MIGRATIONS] [BASELINES]`: live migrations of
//! the Markov controller in standby mode while the CPS sends every 1 ms,
//! against stop-and-copy migrations (CRIU dump, copy, restore, announce) of
//! the same service in the same run.
//!
//! Per run it prints what the CPS saw: missed and duplicate outputs, and
//! the output gap beyond T_U around the handover (cycles K-10 to K+100,
//! which covers the flip and the path switch) and over the whole run; for
//! ours also the replay rate, the time from restore to convergence, the
//! flip's duration and T_M. Each migration gets fresh test hosts.
//!
//! The baseline for the gaps around K is the same gaps (111 consecutive
//! cycles) in a window of the same run before the migration starts
//! (`QUIET`): what this machine's scheduling gives with no migration at
//! all. Besides the largest gap per migration, it prints the gap the
//! handover itself makes (the one output K+1 ends, the first from the
//! destination) and every gap of the windows pooled over the runs.
use std::time::{Duration, Instant};

use dataplane_tests::{MigrationSetup, cps_verdict, kill_pid, output_gaps, report_phase};

const PERIOD_US: u64 = 1000;
const CYCLES: u64 = 1500;
/// The migration starts this far into the CPS's run.
const LEAD: Duration = Duration::from_millis(400);
/// Cycles of the quiet window: as many as K-10..=K+100, before `LEAD`.
const QUIET: (u64, u64) = (150, 260);

struct Run {
    missed: u64,
    duplicates: u64,
    wrong: u64,
    /// The gap output K+1 ends (the handover's own), µs.
    seam_gap: i64,
    /// Every gap of the window around K, and of the quiet window, µs.
    window_gaps: Vec<i64>,
    quiet_gaps: Vec<i64>,
    /// Largest output gap beyond T_U over the whole run, µs.
    max_gap: i64,
    replay_rate: f64,
    converge_us: u64,
    flip_ns: u64,
    total_us: u64,
}

impl Run {
    /// Largest output gap beyond T_U around the handover, µs.
    fn handover_gap(&self) -> i64 {
        self.window_gaps.iter().copied().max().unwrap_or(0)
    }

    /// The same over the quiet window before the migration, µs.
    fn quiet_gap(&self) -> i64 {
        self.quiet_gaps.iter().copied().max().unwrap_or(0)
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let migrations: usize = args.next().map_or(Ok(100), |a| a.parse())?;
    let baselines: usize = args.next().map_or(Ok(20), |a| a.parse())?;
    println!(
        "{migrations} live migrations (standby mode) and {baselines} stop-and-copy migrations, \
         CPS period {PERIOD_US} µs, {CYCLES} cycles each"
    );
    let _tuning = dataplane_tests::tune_host_for_timing(dataplane_tests::Pin::Apart);
    let mut ours = Vec::new();
    let started = Instant::now();
    for i in 0..migrations {
        let run = live(i)?;
        if run.missed + run.duplicates + run.wrong != 0 {
            println!(
                "  run {i}: missed {} duplicates {} wrong {}",
                run.missed, run.duplicates, run.wrong
            );
        }
        ours.push(run);
        if (i + 1) % 10 == 0 {
            println!(
                "  {} live migrations done ({:.0} s)",
                i + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    let mut baseline = Vec::new();
    for i in 0..baselines {
        baseline.push(stop_and_copy(i)?);
    }
    report("ours (standby)", &ours, true);
    report("stop-and-copy", &baseline, false);
    // A stop-and-copy migration's gap is its downtime, wherever it falls;
    // ours is the handover's.
    let p99 = |gaps: Vec<i64>| percentile(gaps, 0.99);
    println!(
        "p99 of the handover gap, ours around K / stop-and-copy's downtime: {:.4}",
        p99(ours.iter().map(|r| r.handover_gap()).collect()) as f64
            / p99(baseline.iter().map(|r| r.max_gap).collect()).max(1) as f64
    );
    println!(
        "p99 of the largest gap over 111 cycles, around K / before the migration: {:.2}",
        p99(ours.iter().map(|r| r.handover_gap()).collect()) as f64
            / p99(ours.iter().map(|r| r.quiet_gap()).collect()).max(1) as f64
    );
    Ok(())
}

fn percentile<T: Ord + Copy + Default>(mut v: Vec<T>, p: f64) -> T {
    v.sort_unstable();
    v.get(((v.len().max(1) - 1) as f64 * p).round() as usize)
        .copied()
        .unwrap_or_default()
}

fn report(name: &str, runs: &[Run], live: bool) {
    let sum = |f: fn(&Run) -> u64| runs.iter().map(f).sum::<u64>();
    let dist = |f: fn(&Run) -> i64| {
        let v: Vec<i64> = runs.iter().map(f).collect();
        format!(
            "p50 {} p99 {} max {}",
            percentile(v.clone(), 0.5),
            percentile(v.clone(), 0.99),
            percentile(v, 1.0)
        )
    };
    println!("\n{name}: {} migrations", runs.len());
    println!(
        "  missed outputs {}  duplicate outputs {}  wrong outputs {}",
        sum(|r| r.missed),
        sum(|r| r.duplicates),
        sum(|r| r.wrong)
    );
    println!("  extra gap around K, µs: {}", dist(|r| r.handover_gap()));
    println!(
        "  the same over cycles {}-{} (no migration yet), µs: {}",
        QUIET.0,
        QUIET.1,
        dist(|r| r.quiet_gap())
    );
    let pooled = |f: fn(&Run) -> &Vec<i64>| {
        let v: Vec<i64> = runs.iter().flat_map(|r| f(r).iter().copied()).collect();
        format!(
            "p50 {} p99 {} p99.9 {} max {} ({} gaps)",
            percentile(v.clone(), 0.5),
            percentile(v.clone(), 0.99),
            percentile(v.clone(), 0.999),
            percentile(v.clone(), 1.0),
            v.len()
        )
    };
    if live {
        println!(
            "  extra gap at the handover (K to K+1), µs: {}",
            dist(|r| r.seam_gap)
        );
    }
    println!("  every gap around K, µs: {}", pooled(|r| &r.window_gaps));
    println!(
        "  every gap before the migration, µs: {}",
        pooled(|r| &r.quiet_gaps)
    );
    println!("  extra gap over the run, µs: {}", dist(|r| r.max_gap));
    println!("  T_M, µs: {}", dist(|r| r.total_us as i64));
    if live {
        let rates: Vec<i64> = runs.iter().map(|r| r.replay_rate as i64).collect();
        println!(
            "  replay rate, inputs/s: p50 {} min {} ({}x the CPS rate at p50)",
            percentile(rates.clone(), 0.5),
            percentile(rates.clone(), 0.0),
            percentile(rates, 0.5) / (1_000_000 / PERIOD_US as i64)
        );
        println!(
            "  restore to convergence, µs: {}",
            dist(|r| r.converge_us as i64)
        );
        println!("  flip, ns: {}", dist(|r| r.flip_ns as i64));
    }
}

fn judge(trace: &std::path::Path, verdict: &serde_json::Value, k: u64) -> anyhow::Result<Run> {
    let gaps = output_gaps(&std::fs::read_to_string(trace)?, PERIOD_US);
    let _ = std::fs::remove_file(trace);
    let within = |lo: u64, hi: u64| -> Vec<i64> {
        gaps.iter()
            .filter(|(c, _)| (lo..=hi).contains(c))
            .map(|g| g.1)
            .collect()
    };
    let around = |lo: u64, hi: u64| within(lo, hi).into_iter().max().unwrap_or(0);
    if std::env::var_os("BENCH_VERBOSE").is_some() {
        let late: Vec<String> = gaps
            .iter()
            .filter(|(c, g)| *g > 150 && (k.saturating_sub(10)..=k + 100).contains(c))
            .map(|(c, g)| format!("K{:+}: {g} µs", *c as i64 - k as i64))
            .collect();
        println!("  gaps over 150 µs near K = {k}: {late:?}");
        let far: Vec<String> = gaps
            .iter()
            .filter(|(_, g)| *g > 2000)
            .map(|(c, g)| format!("K{:+}: {g} µs", *c as i64 - k as i64))
            .collect();
        println!("  gaps over 2 ms in the run: {far:?}");
    }
    let n = |key: &str| verdict[key].as_u64().unwrap_or(0);
    Ok(Run {
        missed: n("missed"),
        duplicates: n("duplicates"),
        wrong: n("wrong"),
        seam_gap: around(k + 1, k + 1),
        window_gaps: within(k.saturating_sub(10), k + 100),
        quiet_gaps: within(QUIET.0, QUIET.1),
        max_gap: around(0, u64::MAX),
        replay_rate: 0.0,
        converge_us: 0,
        flip_ns: 0,
        total_us: 0,
    })
}

fn trace_path(kind: &str, i: usize) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("dataplane-bench-{}-{kind}-{i}", std::process::id()))
}

fn live(i: usize) -> anyhow::Result<Run> {
    let setup = MigrationSetup::new(&format!("bc{i}"), &[], true);
    let trace = trace_path("live", i);
    let cps = setup.start_cps(CYCLES, PERIOD_US, Some(&trace));
    std::thread::sleep(LEAD);
    let id = setup.migrate(serde_json::json!({"mode": "standby"}));
    let report = setup.wait(&id);
    let verdict = cps_verdict(cps);
    kill_pid(report["destination_pid"].as_u64().unwrap_or(0));
    anyhow::ensure!(
        report["state"] == "done",
        "migration {i}: {}",
        report["error"]
    );
    let k = report["handover_seq"].as_u64().unwrap_or(0);
    Ok(Run {
        replay_rate: report["replay_rate"].as_f64().unwrap_or(0.0),
        converge_us: report_phase(&report, "converge").1,
        flip_ns: report["flip_ns"].as_u64().unwrap_or(0),
        total_us: report["total_us"].as_u64().unwrap_or(0),
        ..judge(&trace, &verdict, k)?
    })
}

/// The classic migration: dump (the service stops), copy, restore on dst,
/// announce the address from dst. Inputs meanwhile are lost.
fn stop_and_copy(i: usize) -> anyhow::Result<Run> {
    let setup = MigrationSetup::new(&format!("bs{i}"), &[], false);
    let trace = trace_path("stop", i);
    let cps = setup.start_cps(CYCLES, PERIOD_US, Some(&trace));
    std::thread::sleep(LEAD);
    let start = Instant::now();
    // The cycle the CPS is at when the dump starts: the window is around it.
    let k = LEAD.as_micros() as u64 / PERIOD_US;
    let images =
        std::env::temp_dir().join(format!("dataplane-bench-{}-img-{i}", std::process::id()));
    let copied = images.with_extension("copy");
    let migrated = setup.stop_and_copy(&images, &copied);
    let total_us = start.elapsed().as_micros() as u64;
    let verdict = cps_verdict(cps);
    let restored = migrated?.pid;
    kill_pid(restored as u64);
    // The restored root is this process's child.
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(restored as i32), None);
    let _ = std::fs::remove_dir_all(&images);
    let _ = std::fs::remove_dir_all(&copied);
    Ok(Run {
        total_us,
        ..judge(&trace, &verdict, k)?
    })
}
