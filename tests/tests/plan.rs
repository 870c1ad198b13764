//! `dataplane calibrate`, `dataplane plan` and the prediction beside
//! `dataplane migrate`'s figures: real CRIU, a real daemon, a real service.
use std::{path::Path, process::Command, time::Duration};

use dataplane_tests::{DST_PEER, MigrationSetup, cps_verdict, dataplane_bin, kill_pid};
use dataplane_user::planning::model::Calibration;

fn dataplane(args: &[&str]) -> String {
    let out = Command::new(dataplane_bin())
        .args(args)
        .output()
        .expect("run dataplane");
    assert!(
        out.status.success(),
        "dataplane {} failed: {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn read(path: &Path) -> Calibration {
    serde_json::from_str(&std::fs::read_to_string(path).expect("saved")).expect("a calibration")
}

fn positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

#[test]
fn calibrate_plan_and_migrate_with_a_prediction() {
    let dir = std::env::temp_dir().join(format!("dataplane-plan-{}", std::process::id()));
    let calibration = dir.join("calibration.json");
    let path = calibration.to_str().unwrap();
    let printed = dataplane(&["calibrate", "--sizes", "1", "--repeat", "1", "--out", path]);
    println!("{printed}");
    let fitted = read(&calibration);
    assert_eq!(fitted.samples.len(), 1);
    let criu = &fitted.criu;
    for line in [criu.dump, criu.frozen, criu.restore] {
        assert!(positive(line.fixed), "{criu:?}");
    }
    assert!(positive(criu.image.at(1048576.0)), "{criu:?}");

    let setup = MigrationSetup::new("plan", &["--state-mib", "4"], true);
    let cps = setup.start_cps(3000, 1000, None);
    std::thread::sleep(Duration::from_millis(300));
    let socket = setup.src.socket.to_str().unwrap();
    let json = dataplane(&[
        "--socket",
        socket,
        "--json",
        "plan",
        "markov",
        "--calibration",
        path,
    ]);
    let plan: serde_json::Value = serde_json::from_str(&json).expect("plan's JSON");
    println!("{plan:#}");
    assert!(plan["state_bytes"].as_u64().unwrap() >= 4 << 20, "{plan}");
    assert!(
        plan["standby_state_bytes"].as_u64().unwrap() >= 4 << 20,
        "{plan}"
    );
    let rate = plan["workload"]["input_rate"].as_f64().unwrap();
    assert!(
        (500.0..2000.0).contains(&rate),
        "the CPS sends 1000/s: {rate}"
    );
    let predictions = plan["predictions"].as_array().unwrap();
    assert_eq!(
        predictions.len(),
        4,
        "stop-and-copy, pre-copy, both live modes"
    );
    for p in predictions {
        assert!(positive(p["total_us"].as_f64().unwrap()), "{p}");
        let downtime = p["downtime_us"].as_f64().unwrap();
        assert!(downtime.is_finite() && downtime >= 0.0, "{p}");
    }
    let table = dataplane(&[
        "--socket",
        socket,
        "plan",
        "markov",
        "--mode",
        "standby",
        "--calibration",
        path,
    ]);
    println!("{table}");
    assert!(table.contains("pre-copy (single dump)") && table.contains("standby phases"));

    // The migration's table shows the prediction beside the measurement.
    let (shown, report) = migrate_standby(&setup, cps, path);
    assert!(
        shown.contains("predicted ms") && shown.contains("predicted"),
        "{shown}"
    );
    // And what the migration cost: CRIU ran on both hosts (dump, restore)
    // and both daemons worked; standby mode held nothing of the serving
    // instance's.
    assert!(shown.contains("CPU time, source"), "{shown}");
    for key in [
        "source_daemon_us",
        "source_criu_us",
        "destination_daemon_us",
        "destination_criu_us",
    ] {
        assert!(report["load"][key].as_u64() > Some(0), "{key}: {report}");
    }
    assert_eq!(report["held_us"], 0, "{report}");

    // Its report fits the standby mode's costs.
    let reports = dir.join("reports.json");
    std::fs::write(&reports, report.to_string()).unwrap();
    let printed = dataplane(&[
        "calibrate",
        "--from-reports",
        reports.to_str().unwrap(),
        "--out",
        path,
    ]);
    println!("{printed}");
    let fitted = read(&calibration);
    let standby = fitted.standby.expect("standby costs fitted");
    assert_eq!(standby.reports, 1);
    assert!(fitted.leave_running.is_none());
    assert!(
        printed.contains("model"),
        "the report against the model: {printed}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `dataplane plan` and `dataplane migrate` with the calibration `cargo
/// xtask bench migrate` made for 16 MiB, on a 16 MiB controller: what the
/// README shows. Run by hand after the benchmark (`--ignored`).
#[test]
#[ignore]
fn plan_and_migrate_with_the_benchmark_calibration() {
    let calibration = dataplane_bin().with_file_name("../bench-migrate-calibration-16.json");
    let path = calibration.to_str().unwrap();
    assert!(
        calibration.exists(),
        "run `cargo xtask bench migrate` first"
    );
    let setup = MigrationSetup::new("planb", &["--state-mib", "16", "--dirty-pages", "4"], true);
    let cps = setup.start_cps(3000, 1000, None);
    std::thread::sleep(Duration::from_millis(400));
    let socket = setup.src.socket.to_str().unwrap();
    println!(
        "$ dataplane plan markov --mode standby --dirty-rate 16384000\n{}",
        dataplane(&[
            "--socket",
            socket,
            "plan",
            "markov",
            "--mode",
            "standby",
            "--dirty-rate",
            "16384000",
            "--calibration",
            path,
        ])
    );
    println!("$ dataplane migrate markov --to {DST_PEER} --mode standby");
    migrate_standby(&setup, cps, path);
}

/// `dataplane migrate` of the controller in standby mode with the
/// calibration at `path`, checked done with no cycle missed: what it
/// printed, and the report.
fn migrate_standby(
    setup: &MigrationSetup,
    cps: std::process::Child,
    path: &str,
) -> (String, serde_json::Value) {
    let shown = dataplane(&[
        "--socket",
        setup.src.socket.to_str().unwrap(),
        "migrate",
        "markov",
        "--to",
        DST_PEER,
        "--mode",
        "standby",
        "--calibration",
        path,
    ]);
    println!("{shown}");
    let verdict = cps_verdict(cps);
    let id = shown
        .split_whitespace()
        .nth(1)
        .expect("migration ID of ...");
    let report = setup
        .src
        .client()
        .call("migration.status", serde_json::json!({ "id": id }))
        .expect("migration.status");
    kill_pid(report["destination_pid"].as_u64().unwrap_or(0));
    assert_eq!(report["state"], "done", "{report}");
    assert_eq!(verdict["missed"], 0, "{verdict}");
    (shown, report)
}

#[test]
fn calibrate_on_the_services_own_program() {
    let dir = std::env::temp_dir().join(format!("dataplane-calib-cmd-{}", std::process::id()));
    let calibration = dir.join("calibration.json");
    let path = calibration.to_str().unwrap();
    let controller = dataplane_bin().with_file_name("markov-controller");
    let controller = controller.to_str().unwrap();
    let command = [controller, "0.0.0.0:5000", "--state-mib", "{mib}"];
    let args = [
        "calibrate",
        "--sizes",
        "2",
        "--repeat",
        "1",
        "--out",
        path,
        "--",
    ];
    let printed = dataplane(&[&args[..], &command[..]].concat());
    println!("{printed}");
    let fitted = read(&calibration);
    assert_eq!(fitted.service.as_deref(), Some(command.join(" ").as_str()));
    assert_eq!(fitted.samples.len(), 1);
    let sample = &fitted.samples[0];
    assert!(sample.state_bytes >= (2 << 20) as f64, "{sample:?}");
    assert!(
        positive(sample.dump_us) && positive(sample.restore_us),
        "{sample:?}"
    );
    assert!(printed.contains("samples of"), "{printed}");

    // A program that never holds the memory is an error that names it.
    let out = Command::new(dataplane_bin())
        .args([
            "calibrate",
            "--sizes",
            "1",
            "--repeat",
            "1",
            "--out",
            path,
            "--",
            "true",
        ])
        .output()
        .expect("run dataplane");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("(true) exited before it was ready"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
