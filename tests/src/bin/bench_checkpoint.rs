//! `cargo xtask bench checkpoint [SIZE_MIB...]` (default 1 16 64 256): a
//! controller with SIZE MiB of resident state (4 pages rewritten per input)
//! migrated in standby mode while the CPS sends every 1 ms, against a
//! stop-and-copy migration (CRIU dump, copy, CRIU restore, announce) of the
//! same service in the same run.
//!
//! For each it prints the frozen time (CRIU's), the checkpoint or dump, the
//! transfer or copy, the restore, the total, the time from the dump's start
//! to the instance restored and caught up on the destination, and what the
//! CPS saw: the largest output gap beyond T_U and the missed cycles.
use std::time::Duration;

use dataplane_tests::{MigrationSetup, cps_verdict, kill_pid, report_phase};

const PERIOD_US: u64 = 1000;
/// The migration starts this far into the CPS's run.
const LEAD: Duration = Duration::from_millis(500);

fn main() -> anyhow::Result<()> {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let sizes = if sizes.is_empty() {
        vec![1, 16, 64, 256]
    } else {
        sizes
    };
    let _tuning = dataplane_tests::tune_host_for_timing();
    println!(
        "{:>5} {:<14} {:>9} {:>11} {:>9} {:>9} {:>9} {:>10} {:>10} {:>7}",
        "MiB",
        "migration",
        "frozen",
        "checkpoint",
        "transfer",
        "restore",
        "total",
        "ready",
        "CPS gap",
        "missed"
    );
    println!(
        "{:>5} {:<14} {:>9} {:>11} {:>9} {:>9} {:>9} {:>10} {:>10} {:>7}",
        "", "", "ms", "/dump ms", "/copy ms", "ms", "ms", "ms", "max ms", ""
    );
    for size in sizes {
        let ours = standby(size)?;
        let baseline = stop_and_copy(size)?;
        for (name, row) in [("ours, standby", &ours), ("stop-and-copy", &baseline)] {
            println!(
                "{size:>5} {name:<14} {:>9.1} {:>11.1} {:>9.1} {:>9.1} {:>9.1} {:>10.1} {:>10.2} {:>7}",
                row.frozen_ms,
                row.checkpoint_ms,
                row.transfer_ms,
                row.restore_ms,
                row.total_ms,
                row.ready_ms,
                row.gap_ms,
                row.missed
            );
        }
        println!(
            "{size:>5} ratio ours/stop-and-copy: total {:.2}x, largest CPS gap {:.3}x",
            ours.total_ms / baseline.total_ms,
            ours.gap_ms / baseline.gap_ms.max(0.001)
        );
    }
    println!(
        "\n\"ready\": from the dump's start to the instance restored and caught up on dst \
         (ours: checkpoint start to restore-and-replay end). \"CPS gap\": the largest time \
         between two outputs at the CPS, minus T_U, over the whole run."
    );
    Ok(())
}

#[derive(Default)]
struct Row {
    frozen_ms: f64,
    checkpoint_ms: f64,
    transfer_ms: f64,
    restore_ms: f64,
    total_ms: f64,
    ready_ms: f64,
    gap_ms: f64,
    missed: u64,
}

fn controller_args(size: usize) -> [String; 4] {
    [
        "--state-mib".into(),
        size.to_string(),
        "--dirty-pages".into(),
        "4".into(),
    ]
}

/// Enough cycles to outlast the migration: about 20 ms per MiB, and 3 s.
fn cycles(size: usize) -> u64 {
    3000 + 20 * size as u64
}

fn standby(size: usize) -> anyhow::Result<Row> {
    let args = controller_args(size);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let setup = MigrationSetup::new(&format!("ck{size}"), &args, true);
    let cps = setup.start_cps(cycles(size), PERIOD_US, None);
    std::thread::sleep(LEAD);
    let id = setup.migrate(serde_json::json!({"mode": "standby"}));
    let report = setup.wait(&id);
    let verdict = cps_verdict(cps);
    kill_pid(report["destination_pid"].as_u64().unwrap_or(0));
    anyhow::ensure!(report["state"] == "done", "{size} MiB: {}", report["error"]);
    let phase = |name: &str| {
        let (start, duration) = report_phase(&report, name);
        (start as f64 / 1e3, duration as f64 / 1e3)
    };
    let (checkpoint_start, checkpoint_ms) = phase("checkpoint");
    let (restore_start, restore_ms) = phase("restore");
    Ok(Row {
        frozen_ms: report["frozen_us"].as_u64().unwrap_or(0) as f64 / 1e3,
        checkpoint_ms,
        transfer_ms: phase("transfer").1,
        restore_ms,
        total_ms: report["total_us"].as_u64().unwrap_or(0) as f64 / 1e3,
        ready_ms: restore_start + restore_ms - checkpoint_start,
        gap_ms: verdict["extra_gap_us"]["max"].as_i64().unwrap_or(0) as f64 / 1e3,
        missed: verdict["missed"].as_u64().unwrap_or(0),
    })
}

fn stop_and_copy(size: usize) -> anyhow::Result<Row> {
    let args = controller_args(size);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let setup = MigrationSetup::new(&format!("cs{size}"), &args, false);
    let cps = setup.start_cps(cycles(size), PERIOD_US, None);
    std::thread::sleep(LEAD);
    let images =
        std::env::temp_dir().join(format!("dataplane-bench-{}-{size}", std::process::id()));
    let copied = images.with_extension("copy");
    let migrated = setup.stop_and_copy(&images, &copied);
    let verdict = cps_verdict(cps);
    let _ = std::fs::remove_dir_all(&images);
    let _ = std::fs::remove_dir_all(&copied);
    let moved = migrated?;
    kill_pid(moved.pid as u64);
    // The restored root is this process's child.
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(moved.pid as i32), None);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let total = moved.dump + moved.copy + moved.restore;
    Ok(Row {
        frozen_ms: ms(moved.frozen),
        checkpoint_ms: ms(moved.dump),
        transfer_ms: ms(moved.copy),
        restore_ms: ms(moved.restore),
        total_ms: ms(total),
        ready_ms: ms(total),
        gap_ms: verdict["extra_gap_us"]["max"].as_i64().unwrap_or(0) as f64 / 1e3,
        missed: verdict["missed"].as_u64().unwrap_or(0),
    })
}
