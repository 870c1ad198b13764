//! `cargo xtask demo`: a live migration of a running control service.
//!
//! Builds the test hosts (cps, src with a standby namespace, dst), starts a
//! daemon on src and on dst, the Markov controller of gundall2022 on src
//! (with its standby) and the CPS simulator on cps, sending one input every
//! millisecond. Then `dataplane migrate --mode standby` moves the controller
//! to dst while the CPS runs. Prints the migration's phase table and the
//! CPS's verdict, and writes a timeline picture (SVG) of the migration.
use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use dataplane_tests::{
    DST_PEER, MigrationSetup, chain_state, cps_verdict, dataplane_bin, kill_pid, read_trace,
};

const CYCLES: u64 = 4000;
const PERIOD_US: u64 = 1000;

fn main() -> anyhow::Result<()> {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "standby".into());
    println!(
        "building the test hosts: cps, src (+ a standby namespace), dst; starting both daemons"
    );
    let _tuning = dataplane_tests::tune_host_for_timing(dataplane_tests::Pin::Apart);
    let setup = MigrationSetup::new("demo", &[], mode == "standby");
    println!(
        "Markov controller (gundall2022 Sec. VII-B) on src at {}{}",
        setup.service,
        if setup.standby.is_some() {
            ", its standby beside it"
        } else {
            ""
        }
    );
    let trace = std::env::temp_dir().join(format!("dataplane-demo-{}.trace", std::process::id()));
    println!("CPS sends {CYCLES} inputs, one every {PERIOD_US} µs, and checks every output");
    let cps_started = Instant::now();
    let cps = setup.start_cps(CYCLES, PERIOD_US, Some(&trace));
    std::thread::sleep(Duration::from_millis(1000));
    println!("\n$ dataplane migrate markov --to {DST_PEER} --mode {mode}");
    let migration_started = cps_started.elapsed();
    let status = Command::new(dataplane_bin())
        .arg("--socket")
        .arg(&setup.src.socket)
        .args(["migrate", "markov", "--to", DST_PEER, "--mode", &mode])
        .status();
    let verdict = cps_verdict(cps);
    let migrated = status?.success();
    let report = setup
        .src
        .client()
        .call("migration.status", serde_json::Value::Null)?[0]
        .clone();
    println!("\nCPS verdict over {} cycles:", verdict["sent"]);
    println!(
        "  answered {}  missed {}  duplicates {}  out of order {}  wrong {}",
        verdict["answered"],
        verdict["missed"],
        verdict["duplicates"],
        verdict["out_of_order"],
        verdict["wrong"]
    );
    let gap = &verdict["extra_gap_us"];
    println!(
        "  output gap beyond T_U: p50 {} µs, p99 {} µs, max {} µs (at cycle {})",
        gap["p50"], gap["p99"], gap["max"], gap["at_cycle"]
    );
    if let Some((step, _)) = chain_state(&setup.hosts.dst, setup.service) {
        println!("  the controller on dst has taken {step} inputs");
    }
    let svg = PathBuf::from("target/demo-timeline.svg");
    std::fs::write(
        &svg,
        timeline(
            &std::fs::read_to_string(&trace)?,
            &report,
            migration_started,
        ),
    )?;
    let _ = std::fs::remove_file(&trace);
    println!("\ntimeline: {}", svg.display());
    kill_pid(report["destination_pid"].as_u64().unwrap_or(0));
    anyhow::ensure!(migrated, "the migration failed: {}", report["error"]);
    anyhow::ensure!(
        verdict["missed"] == 0 && verdict["duplicates"] == 0 && verdict["wrong"] == 0,
        "the CPS saw missed, duplicate or wrong outputs"
    );
    Ok(())
}

/// An SVG of the migration: the CPS's output gap per cycle over time, the
/// phases as bands above it, the flip at K marked.
fn timeline(trace: &str, report: &serde_json::Value, migration_started: Duration) -> String {
    // (sent µs, answered µs) per cycle.
    let cycles: Vec<(u64, u64)> = read_trace(trace)
        .into_iter()
        .map(|c| (c.sent_us, c.answered_us))
        .collect();
    let origin = migration_started.as_micros() as i64;
    let total = report["total_us"].as_i64().unwrap_or(0);
    // Show from 100 ms before the migration to 100 ms after it.
    let (from, to) = (origin - 100_000, origin + total + 100_000);
    let (width, height, top) = (1000.0, 420.0, 90.0);
    let x = |t: i64| (t - from) as f64 / (to - from) as f64 * width;
    let gaps: Vec<(i64, i64)> = cycles
        .windows(2)
        .filter(|w| w[0].1 != 0 && w[1].1 != 0)
        .map(|w| (w[1].1 as i64, w[1].1 as i64 - w[0].1 as i64))
        .filter(|(t, _)| (from..to).contains(t))
        .collect();
    let max_gap = gaps.iter().map(|g| g.1).max().unwrap_or(1000).max(2000) as f64;
    let y = |gap: i64| height - 30.0 - gap as f64 / max_gap * (height - top - 40.0);
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' \
         font-family='sans-serif' font-size='11'>\n<rect width='100%' height='100%' fill='white'/>\n"
    );
    let colors = [
        "#cfe2f3", "#f4cccc", "#d9ead3", "#fff2cc", "#d9d2e9", "#fce5cd", "#d0e0e3", "#eeeeee",
    ];
    for (i, phase) in report["phases"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let start = origin + phase["start_us"].as_i64().unwrap_or(0);
        let end = start + phase["duration_us"].as_i64().unwrap_or(0);
        let (x0, x1) = (x(start), x(end));
        svg += &format!(
            "<rect x='{x0:.1}' y='10' width='{:.1}' height='{}' fill='{}'/>\n\
             <text x='{x0:.1}' y='{}' >{}</text>\n",
            (x1 - x0).max(1.0),
            height - 40.0,
            colors[i % colors.len()],
            22 + (i % 4) * 14,
            phase["name"].as_str().unwrap_or("?")
        );
    }
    let k = report["handover_seq"].as_u64().unwrap_or(0) as usize;
    if let Some(&(sent, _)) = cycles.get(k) {
        let xf = x(sent as i64);
        svg += &format!(
            "<line x1='{xf:.1}' y1='10' x2='{xf:.1}' y2='{}' stroke='red' stroke-width='2'/>\n\
             <text x='{:.1}' y='80' fill='red'>flip: input K+1 = {}</text>\n",
            height - 30.0,
            xf + 4.0,
            k + 1
        );
    }
    let points: String = gaps
        .iter()
        .map(|&(t, g)| format!("{:.1},{:.1} ", x(t), y(g)))
        .collect();
    svg += &format!("<polyline points='{points}' fill='none' stroke='black' stroke-width='1'/>\n");
    svg += &format!(
        "<line x1='0' y1='{0}' x2='{width}' y2='{0}' stroke='gray' stroke-dasharray='4'/>\n\
         <text x='4' y='{1}'>T_U = 1 ms</text>\n\
         <text x='4' y='{2}'>output gap at the CPS (top of scale {3:.1} ms); time axis {4:.0} ms wide</text>\n</svg>\n",
        y(PERIOD_US as i64),
        y(PERIOD_US as i64) - 4.0,
        height - 10.0,
        max_gap / 1000.0,
        (to - from) as f64 / 1000.0
    );
    svg
}
