//! Live migrations between two daemons with a CPS sending every 1 ms:
//! real kernel programs, real CRIU, real processes.
use std::time::Duration;

use dataplane_tests::{MigrationSetup, chain_state, cps_verdict, kill_pid};

fn assert_clean(verdict: &serde_json::Value) {
    for key in ["missed", "duplicates", "out_of_order", "wrong"] {
        assert_eq!(verdict[key], 0, "{key}: {verdict}");
    }
}

#[test]
fn a_controller_migrates_while_the_cps_runs_and_no_cycle_is_lost() {
    let setup = MigrationSetup::new("mig", &[], false);
    let cycles = 3000;
    let cps = setup.start_cps(cycles, 1000, None);
    std::thread::sleep(Duration::from_millis(500));
    let id = setup.migrate(serde_json::json!({}));
    let report = setup.wait(&id);
    let verdict = cps_verdict(cps);
    let pid = report["destination_pid"].as_u64().unwrap_or(0);
    println!("report: {report}\nCPS: {verdict}");
    assert_eq!(report["state"], "done", "{report:#}\n{}", setup.src.log());
    assert_clean(&verdict);
    let s = report["checkpoint_seq"].as_u64().unwrap();
    let k = report["handover_seq"].as_u64().unwrap();
    assert!(s > 0 && k > s, "S = {s}, K = {k}");
    assert!(report["flip_ns"].as_u64().unwrap() > 0);
    // The controller now runs on dst, with every cycle in its state; the
    // source instance is gone.
    let state = chain_state(&setup.hosts.dst, setup.service).expect("dst answers");
    assert_eq!(state.0, cycles, "the destination took every input once");
    assert!(
        !std::path::Path::new(&format!("/proc/{}", setup.controller.pid)).exists()
            || std::fs::read_to_string(format!("/proc/{}/stat", setup.controller.pid))
                .is_ok_and(|s| s.contains(") Z")),
        "the source instance was stopped"
    );
    kill_pid(pid);
}

#[test]
fn a_service_that_never_converges_is_rolled_back_and_the_source_keeps_serving() {
    // Outputs carry the time of day: the instances can never agree.
    let setup = MigrationSetup::new("nc", &["--wall-clock"], false);
    let cycles = 2500;
    let cps = setup.start_cps(cycles, 1000, None);
    std::thread::sleep(Duration::from_millis(300));
    let id = setup.migrate(serde_json::json!({"deadline_ms": 800}));
    let report = setup.wait(&id);
    let verdict = cps_verdict(cps);
    println!("report: {report}\nCPS: {verdict}");
    assert_eq!(report["state"], "failed");
    let error = report["error"].as_str().unwrap();
    assert!(
        error.starts_with("converge:") && error.contains("mismatch"),
        "{error}"
    );
    assert_clean(&verdict);
    assert_eq!(
        chain_state(&setup.hosts.src, setup.service).map(|s| s.0),
        Some(cycles),
        "the source instance kept serving every input"
    );
    // The destination removed what the migration made there.
    let status = setup
        .dst
        .client()
        .call("status", serde_json::json!({}))
        .unwrap();
    assert_eq!(status["flows"], serde_json::json!([]), "{status}");
}

#[test]
fn standby_mode_migrates_without_stopping_the_serving_instance() {
    let setup = MigrationSetup::new("stb", &[], true);
    let cycles = 3000;
    let cps = setup.start_cps(cycles, 1000, None);
    std::thread::sleep(Duration::from_millis(500));
    let id = setup.migrate(serde_json::json!({"mode": "standby"}));
    let report = setup.wait(&id);
    let verdict = cps_verdict(cps);
    println!("report: {report}\nCPS: {verdict}");
    assert_eq!(report["state"], "done", "{report}\n{}", setup.src.log());
    assert_clean(&verdict);
    // The serving instance never stopped: the source's own gate held
    // nothing (the standby's did, for the checkpoint).
    let status = setup
        .src
        .client()
        .call("status", serde_json::json!({}))
        .unwrap();
    assert_eq!(status["counters"]["held"], 0, "{status}");
    let standby = &setup.standby.as_ref().unwrap().0.dataplane;
    assert!(
        standby
            .counters()
            .unwrap()
            .get(dataplane_common::counter::HELD)
            > 0
    );
    let state = chain_state(&setup.hosts.dst, setup.service).expect("dst answers");
    assert_eq!(state.0, cycles, "the destination took every input once");
    kill_pid(report["destination_pid"].as_u64().unwrap_or(0));
}

#[test]
fn every_input_is_answered_long_after_the_announce() {
    // The CPS goes on for 12 s after the migration: long enough for its
    // neighbour entry to be probed again (about 5 s after the gratuitous
    // ARP), when its path may swing back to the source for a while. Inputs
    // the source forwards then, and those reaching the destination
    // directly, must still be answered once each, in order.
    let setup = MigrationSetup::new("long", &[], false);
    let cycles = 12_500;
    let cps = setup.start_cps(cycles, 1000, None);
    std::thread::sleep(Duration::from_millis(300));
    let id = setup.migrate(serde_json::json!({}));
    let report = setup.wait(&id);
    let verdict = cps_verdict(cps);
    println!("report: {report}\nCPS: {verdict}");
    let state = chain_state(&setup.hosts.dst, setup.service);
    kill_pid(report["destination_pid"].as_u64().unwrap_or(0));
    assert_eq!(report["state"], "done", "{report}");
    assert_clean(&verdict);
    assert_eq!(state.map(|s| s.0), Some(cycles));
}

/// Migrations in a row, each on fresh hosts, in `mode`: every one exact.
fn repeated(mode: &str, count: usize) {
    for i in 0..count {
        let setup = MigrationSetup::new(&format!("r{}{i}", &mode[..1]), &[], mode == "standby");
        let cycles = 1200;
        let cps = setup.start_cps(cycles, 1000, None);
        std::thread::sleep(Duration::from_millis(300));
        let id = setup.migrate(serde_json::json!({"mode": mode}));
        let report = setup.wait(&id);
        let verdict = cps_verdict(cps);
        let state = chain_state(&setup.hosts.dst, setup.service);
        kill_pid(report["destination_pid"].as_u64().unwrap_or(0));
        assert_eq!(report["state"], "done", "run {i}: {report}");
        assert_clean(&verdict);
        assert_eq!(state.map(|s| s.0), Some(cycles), "run {i}: {verdict}");
        println!(
            "run {i}: S {} K {} T_M {} µs, CPS extra gap max {} µs",
            report["checkpoint_seq"],
            report["handover_seq"],
            report["total_us"],
            verdict["extra_gap_us"]["max"]
        );
    }
}

#[test]
fn twenty_standby_migrations_in_a_row_each_exact() {
    repeated("standby", 20);
}

#[test]
fn twenty_leave_running_migrations_in_a_row_each_exact() {
    repeated("leave-running", 20);
}
