//! `cargo xtask bench failover [N]` (default 10): N failovers to a hot
//! replica at T_U = 1 ms.
//!
//! Each run builds fresh test hosts with the Markov controller on `src`,
//! makes a hot replica of it on `dst` (`failover_after_ms` 2, the
//! default), lets the CPS run, then stops the source host as a power cut
//! would: its interfaces down together, then its daemon and its instance
//! frozen (`MigrationSetup::freeze_source_host`; killed, they would be
//! torn down for milliseconds on the CPUs the other test hosts share,
//! which a host losing power does not do to its neighbours), and lets the
//! CPS run on. Per run: the cycles the CPS saw unanswered, the inputs `dst`
//! replayed at the takeover (those the switch flooded to it once the
//! source's port was down), the silence `dst` measured before it took
//! over (its detection time), the takeover (gates, replay and announce),
//! and what else the CPS saw (duplicate, out of order, wrong: `--skips`,
//! see cps-sim). The baseline, once in the same process: the same stop
//! with no replica, whose service is then lost for the rest of the run.
//! Bars: missed <= 3 at p99, 0 duplicates.
use std::time::Duration;

use dataplane_tests::{MigrationSetup, Sample, bar, cps_verdict};
use serde_json::{Value, json};

/// Cycles per run, at 1 ms: about a second past the stop.
const CYCLES: u64 = 2500;

fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::args().nth(1).map_or(Ok(10), |a| a.parse())?;
    let _tuning = dataplane_tests::tune_host_for_timing(dataplane_tests::Pin::Apart);
    println!("failover to a hot replica at T_U = 1 ms: {runs} runs\n");
    let baseline = stop_source(0, false)?;
    let lost = baseline.verdict["missed"].as_u64().unwrap_or(0);
    println!(
        "baseline, no replica: the source host stops at cycle ~{}: {lost} cycles of {CYCLES} \
         never answered (the service is gone)\n",
        CYCLES - lost
    );
    println!(
        "{:>4} {:>7} {:>9} {:>12} {:>12} {:>22}",
        "run", "missed", "replayed", "silent ms", "takeover ms", "dup/out of order/wrong"
    );
    let mut failovers = Vec::new();
    for i in 1..=runs {
        let run = stop_source(i, true)?;
        let n = |key: &str| run.verdict[key].as_u64().unwrap_or(0);
        let t = |key: &str| run.takeover[key].as_u64().unwrap_or(0) as f64 / 1000.0;
        println!(
            "{i:>4} {:>7} {:>9} {:>12.2} {:>12.2} {:>22}{}",
            n("missed"),
            run.takeover["replayed"].as_u64().unwrap_or(0),
            t("silent_us"),
            t("takeover_us"),
            format!("{}/{}/{}", n("duplicates"), n("out_of_order"), n("wrong")),
            match &run.takeover["error"] {
                Value::Null => String::new(),
                e => format!("  (takeover: {e})"),
            }
        );
        failovers.push(run);
    }
    let sample = |f: &dyn Fn(&Run) -> f64| Sample::new(failovers.iter().map(f));
    let missed = sample(&|r| r.verdict["missed"].as_f64().unwrap_or(f64::NAN));
    let silent = sample(&|r| r.takeover["silent_us"].as_f64().unwrap_or(f64::NAN) / 1000.0);
    let takeover = sample(&|r| r.takeover["takeover_us"].as_f64().unwrap_or(f64::NAN) / 1000.0);
    let total = |key: &str| -> u64 {
        failovers
            .iter()
            .map(|r| r.verdict[key].as_u64().unwrap_or(0))
            .sum()
    };
    let cycles = |v: f64| format!("{v:.0}");
    let ms = |v: f64| format!("{v:.2} ms");
    println!("\nmissed cycles: {}", missed.describe(&[0.5, 0.99], cycles));
    println!(
        "detection (silence before the takeover): {}",
        silent.describe(&[0.5, 0.99], ms)
    );
    println!(
        "takeover (gates, announce): {}",
        takeover.describe(&[0.5, 0.99], ms)
    );
    println!(
        "duplicates {} out of order {} wrong {}; baseline without a replica: {lost} missed \
         ({:.0}x the failover's p50)",
        total("duplicates"),
        total("out_of_order"),
        total("wrong"),
        lost as f64 / missed.percentile(0.5).unwrap_or(1.0).max(1.0)
    );
    // Below 100 runs there is no p99: the largest bounds it.
    let (p99, judged) = match missed.percentile(0.99) {
        Some(p99) => (p99, "p99"),
        None => (missed.max().unwrap_or(f64::INFINITY), "max"),
    };
    println!(
        "{}",
        bar(
            "missed <= 3 cycles at p99",
            &format!("{judged} {p99:.0} (n {runs})"),
            p99 <= 3.0
        )
    );
    let duplicates = total("duplicates");
    println!(
        "{}",
        bar(
            "0 duplicates",
            &format!("{duplicates} in {runs} runs"),
            duplicates == 0
        )
    );
    Ok(())
}

/// One run: what the CPS saw, and the takeover `dst` reports (none
/// without a replica).
struct Run {
    verdict: Value,
    takeover: Value,
}

/// Stops the source host mid-run, with a hot replica on `dst` or without.
fn stop_source(i: usize, replica: bool) -> anyhow::Result<Run> {
    let mut setup = MigrationSetup::with_configs(
        &format!("bfo{i}"),
        &[],
        false,
        "",
        "failover_after_ms = 2\n",
    );
    let cps = setup.start_cps_with(CYCLES, 1000, &["--skips"]);
    std::thread::sleep(Duration::from_millis(300));
    if replica {
        let id = setup.replicate(json!({}));
        let synced = setup.wait_in_sync(&id);
        if synced["replica"]["state"] != "in_sync" {
            let verdict = cps_verdict(cps);
            anyhow::bail!("run {i}: the replica did not sync: {synced}\nCPS: {verdict}");
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    setup.freeze_source_host();
    let verdict = cps_verdict(cps);
    let status = setup.dst.client().call("status", json!({}))?;
    Ok(Run {
        verdict,
        takeover: status["takeovers"][0].clone(),
    })
}
