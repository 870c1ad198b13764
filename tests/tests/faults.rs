//! Faults during a whole migration between two daemons, each while a CPS
//! sends every 1 ms: the migration fails with an error that names the
//! phase and the cause, the CPS gets every output exactly once, the source
//! keeps serving, nothing is left half-done on the destination, and
//! (where the fault is gone) the next migration succeeds.
use std::time::{Duration, Instant};

use dataplane_tests::{MigrationSetup, chain_state, cps_verdict, kill_pid};

/// Pids of running processes named `comm` (as /proc/PID/comm has it).
fn pids_named(comm: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|pid: &u32| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .collect()
}

/// Waits for the first `migration.phase` notification of `phase` on a
/// watching client.
fn wait_for_phase(watcher: &mut dataplane_user::control::Client, phase: &str) {
    loop {
        let line = watcher.next_line().expect("a migration.phase notification");
        let note: serde_json::Value = serde_json::from_str(&line).unwrap();
        let report = &note["params"];
        if report["phase"] == phase {
            return;
        }
        assert_eq!(report["state"], "running", "ended before {phase}: {report}");
    }
}

/// Runs a migration with the CPS sending `cycles` inputs, calls `fault`
/// (with a watching client) after it starts, and checks what every fault
/// must leave: a failed migration whose error starts with `phase`, every
/// input answered once, the source's controller with every input, the
/// destination with no flow. The error.
fn migrate_with_fault(
    setup: &MigrationSetup,
    cycles: u64,
    fault: impl FnOnce(&mut dataplane_user::control::Client),
    phase: &str,
) -> String {
    let cps = setup.start_cps(cycles, 1000, None);
    let mut watcher = setup.src.client();
    watcher
        .call("migration.watch", serde_json::json!({}))
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let id = setup.migrate(serde_json::json!({}));
    fault(&mut watcher);
    let report = setup.wait(&id);
    let verdict = cps_verdict(cps);
    println!("report: {report}\nCPS: {verdict}");
    assert_eq!(report["state"], "failed", "{report}");
    let error = report["error"].as_str().unwrap().to_string();
    assert!(error.starts_with(&format!("{phase}:")), "{error}");
    for key in ["missed", "duplicates", "out_of_order", "wrong"] {
        assert_eq!(verdict[key], 0, "{key}: {verdict}");
    }
    assert_eq!(
        chain_state(&setup.hosts.src, setup.service).map(|s| s.0),
        Some(cycles),
        "the source instance kept serving every input"
    );
    // The destination undoes its part (at once, or when the link drops).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = setup
            .dst
            .client()
            .call("status", serde_json::json!({}))
            .unwrap();
        if status["flows"] == serde_json::json!([]) {
            break;
        }
        assert!(Instant::now() < deadline, "dst kept {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
    error
}

/// A migration that must now succeed, exactly, of the controller that has
/// taken `taken` inputs (the CPS's own check of the outputs assumes a
/// fresh controller: the destination's count stands in for it).
fn migrate_cleanly(setup: &MigrationSetup, taken: u64) {
    let cycles = 1500;
    let cps = setup.start_cps(cycles, 1000, None);
    std::thread::sleep(Duration::from_millis(300));
    let id = setup.migrate(serde_json::json!({}));
    let report = setup.wait(&id);
    let verdict = cps_verdict(cps);
    let state = chain_state(&setup.hosts.dst, setup.service);
    kill_pid(report["destination_pid"].as_u64().unwrap_or(0));
    assert_eq!(report["state"], "done", "the next migration: {report}");
    for key in ["missed", "duplicates", "out_of_order"] {
        assert_eq!(verdict[key], 0, "{key}: {verdict}");
    }
    assert_eq!(state.map(|s| s.0), Some(taken + cycles), "{verdict}");
}

#[test]
fn a_missing_criu_binary_fails_the_checkpoint_and_names_it() {
    let setup =
        MigrationSetup::with_source_config("nocriu", &[], false, "criu = \"/nonexistent/criu\"\n");
    let error = migrate_with_fault(&setup, 1500, |_| {}, "checkpoint");
    assert!(error.contains("/nonexistent/criu"), "{error}");
}

#[test]
fn criu_killed_during_the_dump_fails_the_checkpoint_and_the_next_migration_succeeds() {
    let setup = MigrationSetup::new("kcriu", &[], false);
    let before = pids_named("criu");
    let error = migrate_with_fault(
        &setup,
        2000,
        |_| {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(&pid) = pids_named("criu").iter().find(|p| !before.contains(p)) {
                    kill_pid(pid as u64);
                    return;
                }
                assert!(Instant::now() < deadline, "CRIU never ran");
                std::thread::sleep(Duration::from_micros(200));
            }
        },
        "checkpoint",
    );
    println!("error: {error}");
    migrate_cleanly(&setup, 2000);
}

#[test]
fn the_peer_link_cut_during_the_transfer_fails_it_and_the_next_migration_succeeds() {
    // 64 MiB of state: a transfer long enough to cut.
    let setup = MigrationSetup::new("cut", &["--state-mib", "64", "--dirty-pages", "4"], false);
    let error = migrate_with_fault(
        &setup,
        7000,
        |watcher| {
            // Down for longer than the link timeout (3 s), then back.
            wait_for_phase(watcher, "transfer");
            setup.hosts.src.ip(&["link", "set", "peer0", "down"]);
            std::thread::sleep(Duration::from_secs(4));
            setup.hosts.src.ip(&["link", "set", "peer0", "up"]);
        },
        "transfer",
    );
    println!("error: {error}");
    migrate_cleanly(&setup, 7000);
}

#[test]
fn a_full_destination_disk_fails_the_transfer_and_the_next_migration_succeeds() {
    let setup = MigrationSetup::new("full", &[], false);
    let images = setup.dst_images_dir();
    std::fs::create_dir_all(&images).unwrap();
    let mount = |args: &[&str]| {
        let status = std::process::Command::new(args[0])
            .args(&args[1..])
            .status()
            .unwrap();
        assert!(status.success(), "{args:?}");
    };
    let path = images.to_str().unwrap();
    mount(&["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", path]);
    let error = migrate_with_fault(&setup, 1500, |_| {}, "transfer");
    mount(&["umount", path]);
    assert!(error.contains("No space left"), "{error}");
    migrate_cleanly(&setup, 1500);
}
