//! Faults during a whole migration between two daemons, each while a CPS
//! sends every 1 ms: the migration fails with an error that names the
//! phase and the cause, the CPS gets every output exactly once, the source
//! keeps serving, nothing is left half-done on the destination, and
//! (where the fault is gone) the next migration succeeds.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use dataplane_common::{
    CUT_AT_NEXT, GATE_HOLD_ALL, GATE_SEQUENCED, OUTPUT_MUTE, counter, decide::gate_open,
};
use dataplane_tests::{
    CONTROLLER_COMM, MigrationSetup, TestHosts, chain_state, cps_verdict, files_under, in_netns,
    kill_pid, pids_named, read_trace,
};
use dataplane_user::{daemon::STOP_WITHIN, kernel::loader::Dataplane, report::Mode};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::json;

/// Waits for the first `migration.phase` notification of `phase` on a
/// watching client.
fn wait_for_phase(watcher: &mut dataplane_user::control::client::Client, phase: &str) {
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
    fault: impl FnOnce(&mut dataplane_user::control::client::Client),
    phase: &str,
) -> String {
    let cps = setup.start_cps(cycles, 1000, None);
    let report = fault_with_cps(
        setup,
        cps,
        cycles,
        serde_json::json!({}),
        |watcher, _| fault(watcher),
        phase,
    );
    report["error"].as_str().unwrap().to_string()
}

/// As `migrate_with_fault`, with a CPS of `cycles` inputs the caller
/// started and the migration's `params`; `fault` gets the CPS's pid too.
/// The final report.
fn fault_with_cps(
    setup: &MigrationSetup,
    cps: std::process::Child,
    cycles: u64,
    params: serde_json::Value,
    fault: impl FnOnce(&mut dataplane_user::control::client::Client, Pid),
    phase: &str,
) -> serde_json::Value {
    let cps_pid = Pid::from_raw(cps.id() as i32);
    let (mut watcher, id) = setup.migrate_watched(params);
    fault(&mut watcher, cps_pid);
    let report = setup.wait(&id);
    let verdict = cps_verdict(cps);
    println!("report: {report}\nCPS: {verdict}");
    assert_eq!(report["state"], "failed", "{report}");
    assert_eq!(
        report["handover_seq"], 0,
        "failed before the flip: {report}"
    );
    let error = report["error"].as_str().unwrap().to_string();
    assert!(error.starts_with(&format!("{phase}:")), "{error}");
    assert_source_served_every_input(setup, &verdict, cycles);
    wait_until_dst_has_no_flows(setup);
    report
}

/// Every one of the CPS's `cycles` inputs was answered once, in order, by
/// the source instance.
fn assert_source_served_every_input(
    setup: &MigrationSetup,
    verdict: &serde_json::Value,
    cycles: u64,
) {
    for key in ["missed", "duplicates", "out_of_order", "wrong"] {
        assert_eq!(verdict[key], 0, "{key}: {verdict}");
    }
    assert_eq!(
        chain_state(&setup.hosts.src, setup.service).map(|s| s.0),
        Some(cycles),
        "the source instance kept serving every input"
    );
}

/// Waits (10 s at most) for the destination to undo its part of a failed
/// migration: at once, or when the peer link drops.
fn wait_until_dst_has_no_flows(setup: &MigrationSetup) {
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
}

/// A migration that must now succeed, exactly, of the controller that has
/// taken `taken` inputs (the CPS's own check of the outputs assumes a
/// fresh controller: the destination's count stands in for it).
fn migrate_cleanly(setup: &MigrationSetup, taken: u64) {
    let cycles = 1500;
    let (report, verdict) =
        setup.migrate_while_cps_runs(cycles, Duration::from_millis(300), serde_json::json!({}));
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
        |_| kill_new_criu(&setup.hosts.src, &before),
        "checkpoint",
    );
    println!("error: {error}");
    assert_criu_died(&error, "checkpoint: dump: ");
    migrate_cleanly(&setup, 2000);
}

/// Asserts `error` is `prefix` and the cause of a CRIU that died under
/// the request: its RPC socket reset or broken, or closed without an answer.
/// (Another failure in the same phase, CRIU refusing the request say,
/// does not pass.)
fn assert_criu_died(error: &str, prefix: &str) {
    let Some(cause) = error.strip_prefix(prefix) else {
        panic!("{error:?} does not start with {prefix:?}");
    };
    // Reset while CRIU answered, or a broken pipe when it died before the
    // request went out.
    let reset = cause.starts_with("CRIU RPC socket: ")
        && (cause.contains("reset") || cause.contains("Broken pipe"));
    let closed = cause.starts_with("CRIU closed the RPC socket during ");
    assert!(reset || closed, "not a CRIU that died: {error}");
}

/// Kills the first CRIU that starts in `host` after `before` (pids of
/// CRIUs running before the migration).
fn kill_new_criu(host: &dataplane_tests::NetNs, before: &[u32]) {
    kill_pid(wait_for_new_criu(host, before) as u64);
}

/// The first CRIU that starts in `host` after `before` (pids of CRIUs
/// running before the migration), once it runs.
fn wait_for_new_criu(host: &dataplane_tests::NetNs, before: &[u32]) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let new = pids_named("criu")
            .into_iter()
            .find(|p| !before.contains(p) && in_netns(*p, host));
        if let Some(pid) = new {
            return pid;
        }
        assert!(Instant::now() < deadline, "CRIU never ran");
        std::thread::sleep(Duration::from_micros(200));
    }
}

#[test]
fn criu_killed_during_the_restore_fails_it_and_the_next_migration_succeeds() {
    let setup = MigrationSetup::new("rcriu", &[], false);
    let before = pids_named("criu");
    let error = migrate_with_fault(
        &setup,
        2000,
        |watcher| {
            wait_for_phase(watcher, "restore");
            kill_new_criu(&setup.hosts.dst, &before);
        },
        "restore",
    );
    println!("error: {error}");
    assert_criu_died(&error, "restore: destination: restore: ");
    let left: Vec<u32> = pids_named("markov-controll")
        .into_iter()
        .filter(|&p| in_netns(p, &setup.hosts.dst))
        .collect();
    assert_eq!(left, [] as [u32; 0], "no half-restored instance on dst");
    migrate_cleanly(&setup, 2000);
}

/// Inputs of the burst that overflows a 1 MiB input log: it holds about
/// 5,950 of the CPS's inputs (a 128-byte record class each).
const OVERFLOW_BURST: u64 = 8000;

/// Makes `host`'s input log (1 MiB) overflow during a migration: its
/// daemon (`daemon`) is stopped (SIGSTOP) for 1.5 s at the start of
/// `phase`, so nobody drains the log, while the CPS sends
/// `OVERFLOW_BURST` inputs at 20 kHz. The migration must fail in
/// `failed_in`, naming the overflow, with the common fault checks; then
/// the next one must succeed. The error.
fn overflow_during(
    setup: &MigrationSetup,
    host: &str,
    daemon: u32,
    phase: &str,
    failed_in: &str,
) -> String {
    let cycles = 3000 + OVERFLOW_BURST;
    let trace = std::env::temp_dir().join(format!("overflow-{host}-{}.trace", std::process::id()));
    let cps = setup.start_bursty_cps(cycles, 1000, OVERFLOW_BURST, &trace);
    let ring_full = || {
        dataplane_user::kernel::loader::Dataplane::open(&setup.hosts.pin_root(host))
            .and_then(|d| d.counters())
            .unwrap()
            .get(counter::RING_FULL)
    };
    let before = ring_full();
    let report = fault_with_cps(
        setup,
        cps,
        cycles,
        serde_json::json!({}),
        |watcher, cps| {
            wait_for_phase(watcher, phase);
            let daemon = Pid::from_raw(daemon as i32);
            kill(daemon, Signal::SIGSTOP).unwrap();
            kill(cps, Signal::SIGUSR1).unwrap();
            std::thread::sleep(Duration::from_millis(1500));
            kill(daemon, Signal::SIGCONT).unwrap();
        },
        failed_in,
    );
    let error = report["error"].as_str().unwrap().to_string();
    let _ = std::fs::remove_file(&trace);
    println!("error: {error}");
    assert!(error.contains("the input log overflowed"), "{error}");
    let full = ring_full() - before;
    assert!(full > 0, "{host}'s ring_full rose");
    println!("{host}: ring_full rose by {full}");
    migrate_cleanly(setup, cycles);
    error
}

#[test]
fn the_source_input_log_overflowing_aborts_before_the_flip_and_the_next_migration_succeeds() {
    let setup = MigrationSetup::with_source_config("ovsrc", &[], false, "input_ring_mib = 1\n");
    overflow_during(&setup, "src", setup.src.pid(), "restore", "restore");
}

#[test]
fn the_destination_input_log_overflowing_aborts_before_the_flip_and_the_next_migration_succeeds() {
    let setup = MigrationSetup::with_configs("ovdst", &[], false, "", "input_ring_mib = 1\n");
    // Mirrored inputs held for the replay find the log full: the
    // destination refuses to replay (it would miss them) in `restore`.
    let error = overflow_during(&setup, "dst", setup.dst.pid(), "transfer", "restore");
    assert!(error.starts_with("restore: destination: "), "{error}");
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

/// A fault of the fault matrix.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// SIGKILL of the source daemon, restarted at once.
    SourceDaemon,
    /// SIGKILL of the destination daemon, restarted at once.
    DestinationDaemon,
    /// SIGKILL of the restored instance on the destination.
    DestinationInstance,
    /// The peer link down for 4 s (longer than the 3 s link timeout).
    PeerLink,
    /// SIGKILL of the standby instance, the one the checkpoint is taken of
    /// (standby mode only).
    StandbyInstance,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::SourceDaemon => "kill source daemon",
            Fault::DestinationDaemon => "kill destination daemon",
            Fault::DestinationInstance => "kill destination instance",
            Fault::PeerLink => "cut peer link 4 s",
            Fault::StandbyInstance => "kill standby instance",
        }
    }
}

/// The phases a fault of the matrix lands at the start of.
const MATRIX_PHASES: [&str; 6] = [
    "checkpoint",
    "transfer",
    "restore",
    "converge",
    "cutover",
    "announce",
];

/// The matrix's cells in `mode`: each of its faults at each phase.
fn matrix_cells(mode: Mode) -> Vec<(Fault, &'static str)> {
    let mut faults = vec![
        Fault::SourceDaemon,
        Fault::DestinationDaemon,
        Fault::DestinationInstance,
        Fault::PeerLink,
    ];
    if mode == Mode::Standby {
        faults.push(Fault::StandbyInstance);
    }
    faults
        .into_iter()
        .flat_map(|f| MATRIX_PHASES.iter().map(move |p| (f, *p)))
        .collect()
}

/// A mode as a migration request and the matrix name it.
fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::LeaveRunning => "leave-running",
        Mode::Standby => "standby",
    }
}

/// A cell's name, as FAULT_CELL gives it.
fn cell_name(mode: Mode, fault: Fault, phase: &str) -> String {
    format!("{}: {} at {phase}", mode_name(mode), fault.name())
}

/// One row of the fault table.
struct Row {
    fault: Fault,
    phase: &'static str,
    migration: String,
    /// The input the source's kernel cut over at (0: no handover).
    handover_seq: u64,
    served_by: &'static str,
    verdict: serde_json::Value,
    recovery: String,
    /// What the migration left on the source that it should not have.
    left_on_src: Vec<String>,
    next: String,
}

/// What the daemons' logs say they recovered.
fn recovered(setup: &MigrationSetup) -> String {
    let lines: Vec<String> = [setup.src.log(), setup.dst.log()]
        .iter()
        .flat_map(|log| {
            log.lines()
                .filter(|l| l.contains("from this host:") || l.contains("to this host:"))
                .filter_map(|l| l.split_once("migration ").map(|(_, r)| r.to_string()))
                .collect::<Vec<_>>()
        })
        .collect();
    lines.join("; ")
}

/// Inputs the CPS sends in a cell, 1 ms apart.
const CELL_CYCLES: u64 = 3000;

/// Whether process `pid` runs (a zombie does not).
fn runs(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z"))
}

/// Runs one cell in `mode`; `Err` says why it is not a cell (before any
/// host is made).
fn run_cell(
    mode: Mode,
    fault: Fault,
    phase: &'static str,
    index: usize,
) -> Result<Row, &'static str> {
    if fault == Fault::DestinationInstance && ["checkpoint", "transfer"].contains(&phase) {
        return Err("no instance exists on dst before restore");
    }
    if fault == Fault::StandbyInstance && !["checkpoint", "transfer"].contains(&phase) {
        return Err(
            "the standby is checkpointed by then and plays no further part, as at transfer",
        );
    }
    let standby = mode == Mode::Standby;
    let tag = format!("f{}{index}", &mode_name(mode)[..1]);
    let mut setup = MigrationSetup::new(&tag, &[], standby);
    let params = json!({"mode": mode});
    let cycles = CELL_CYCLES;
    let comm = CONTROLLER_COMM;
    let cps = setup.start_cps(cycles, 1000, None);
    let (mut watcher, id) = setup.migrate_watched(params.clone());
    wait_for_phase(&mut watcher, phase);
    match fault {
        Fault::SourceDaemon => setup.src.kill_and_restart(&setup.hosts.src),
        Fault::DestinationDaemon => setup.dst.kill_and_restart(&setup.hosts.dst),
        Fault::DestinationInstance => {
            // At the start of `restore` CRIU has not made it yet: it is
            // killed as soon as it appears (in the replay, as a rule).
            let deadline = Instant::now() + Duration::from_secs(10);
            let pid = loop {
                if let Some(pid) = pids_named(comm)
                    .into_iter()
                    .find(|&p| in_netns(p, &setup.hosts.dst))
                {
                    break pid;
                }
                assert!(Instant::now() < deadline, "no instance appeared on dst");
                std::thread::sleep(Duration::from_micros(500));
            };
            kill_pid(pid as u64);
        }
        Fault::PeerLink => {
            setup.hosts.src.ip(&["link", "set", "peer0", "down"]);
            std::thread::sleep(Duration::from_secs(4));
            setup.hosts.src.ip(&["link", "set", "peer0", "up"]);
        }
        Fault::StandbyInstance => {
            kill_pid(setup.standby.as_ref().expect("standby mode").1.pid as u64)
        }
    }
    let (migration, handover_seq) = if fault == Fault::SourceDaemon {
        // The report died with the daemon; its journal's recovery says
        // whether it had handed over (see `recovery`).
        ("lost with the daemon".to_string(), 0)
    } else {
        let report = setup.wait(&id);
        let handover_seq = report["handover_seq"].as_u64().unwrap_or(0);
        match report["error"].as_str() {
            Some(error) => (format!("failed: {error}"), handover_seq),
            None => ("done".to_string(), handover_seq),
        }
    };
    let verdict = cps_verdict(cps);
    if verdict["missed"] != 0 {
        let snmp = setup
            .hosts
            .src
            .run(|| std::fs::read_to_string("/proc/net/snmp"))
            .unwrap_or_default();
        let udp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Udp:")).collect();
        println!(
            "src UDP counters: {udp:?}\nsrc status: {}",
            setup
                .src
                .client()
                .call("status", serde_json::json!({}))
                .map(|s| s["counters"].clone())
                .unwrap_or_default()
        );
    }
    // The destination's journal recovery may wait out its armed grace.
    std::thread::sleep(Duration::from_millis(2500));
    let count = |host| chain_state(host, setup.service).map(|s| s.0);
    let served_by = match (count(&setup.hosts.src), count(&setup.hosts.dst)) {
        (Some(n), _) if n == cycles => "source",
        (_, Some(n)) if n == cycles => "destination",
        _ => "neither",
    };
    let recovery = recovered(&setup);
    // A migration rolled back leaves nothing running on dst, even when its
    // daemon died while CRIU restored (the journal names the tree as soon
    // as CRIU does). An armed destination whose source went away first
    // waits for the handover as long as the source may still pick K: its
    // deadline (10 s) and 2 s, from when it noticed (at once for a killed
    // daemon, within the 3 s link timeout for a cut link).
    let strays = || -> Vec<u32> {
        pids_named(comm)
            .into_iter()
            .filter(|&p| in_netns(p, &setup.hosts.dst))
            .collect()
    };
    let settled_by = Instant::now() + Duration::from_secs(10 + 2 + 3 + 2);
    while served_by == "source" && !strays().is_empty() && Instant::now() < settled_by {
        std::thread::sleep(Duration::from_millis(100));
    }
    let strays = strays();
    let handed_over = handover_seq > 0 || served_by == "destination";
    let left_on_src = left_on_src(&setup, fault, handed_over);
    let next = if served_by == "source" && !strays.is_empty() {
        format!("FAILED: instances {strays:?} left running on dst")
    } else if served_by == "source" {
        if fault == Fault::SourceDaemon {
            setup.assert_registered();
        }
        next_migration(&setup, mode, fault)
    } else {
        "- (handed over)".into()
    };
    // What serves on dst now goes with the cell: a restored instance whose
    // daemon died is nobody's child any more.
    for pid in pids_named(comm)
        .into_iter()
        .filter(|&p| in_netns(p, &setup.hosts.dst))
    {
        kill_pid(pid as u64);
    }
    Ok(Row {
        fault,
        phase,
        migration,
        handover_seq,
        served_by,
        verdict,
        recovery,
        left_on_src,
        next,
    })
}

/// What a cell left on the source that its outcome does not account for,
/// one line each (empty: nothing): files in its images_dir (a journal,
/// images); after a handover, the serving instance or the standby still
/// running (the source stops both, as `finish` does, whichever way the
/// migration ended after the flip); before it, a standby that no longer
/// runs (unless the fault killed it), is held or not muted, or missed an
/// input. (The standby's count is read where the source serves, so that
/// every input has reached both.)
fn left_on_src(setup: &MigrationSetup, fault: Fault, handed_over: bool) -> Vec<String> {
    let mut left: Vec<String> = files_under(&setup.images_dir("src"))
        .into_iter()
        .map(|f| format!("file {f}"))
        .collect();
    let instances = std::iter::once(("instance", setup.controller.pid))
        .chain(setup.standby.as_ref().map(|s| ("standby", s.1.pid)));
    if handed_over {
        // The instances' parents reap them as soon as they are killed.
        let deadline = Instant::now() + Duration::from_secs(1);
        for (what, pid) in instances {
            while runs(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if runs(pid) {
                left.push(format!("{what} {pid} still runs after the handover"));
            }
        }
        return left;
    }
    let Some((loaded, standby, ns)) = &setup.standby else {
        return left;
    };
    if fault == Fault::StandbyInstance {
        // It was killed: what it leaves is its gate, below.
    } else if !runs(standby.pid) {
        left.push(format!("standby {} died", standby.pid));
    } else {
        let taken = chain_state(ns, setup.service).map(|s| s.0);
        if taken != Some(CELL_CYCLES) {
            left.push(format!("standby took {taken:?} inputs of {CELL_CYCLES}"));
        }
    }
    match loaded.dataplane.gate(setup.source_flow_id()) {
        // Open again: delivering all, or from the input after those it
        // opened over (named lost).
        Ok(gate) if gate_open(gate.mode) && gate.output == OUTPUT_MUTE => {}
        Ok(gate) => left.push(format!(
            "standby gate mode {}, output {} (not open, muted)",
            gate.mode, gate.output
        )),
        Err(e) => left.push(format!("standby gate: {e}")),
    }
    left
}

/// The migration after a cell the source still serves, in `mode`, of the
/// controller that has taken the cell's inputs: "succeeded", or what
/// failed. A standby the fault killed cannot be replaced while the service
/// runs (a standby must have every input from the first): a standby
/// migration must then be refused at the checkpoint, naming it, and a
/// leave-running one must succeed.
fn next_migration(setup: &MigrationSetup, mode: Mode, fault: Fault) -> String {
    let taken = CELL_CYCLES;
    let mut mode = mode;
    let mut done = String::new();
    if let Some((_, standby, _)) = &setup.standby
        && fault == Fault::StandbyInstance
        && !runs(standby.pid)
    {
        let id = setup.migrate(json!({"mode": mode}));
        let report = setup.wait(&id);
        let refused = format!(
            "checkpoint: process {} is not the one registered (it ended, or its pid was reused)",
            standby.pid
        );
        if report["error"] != refused {
            return format!("FAILED: not refused for the dead standby: {report}");
        }
        wait_until_dst_has_no_flows(setup);
        mode = Mode::LeaveRunning;
        done = " in leave-running mode (standby mode refused: the standby is gone)".into();
    }
    // Long enough to outlast a migration on a loaded machine (a standby
    // migration takes no hold: a third less).
    let next_cycles = match mode {
        Mode::LeaveRunning => 3000,
        Mode::Standby => 2000,
    };
    let (report, next) = setup.migrate_while_cps_runs(
        next_cycles,
        Duration::from_millis(300),
        json!({"mode": mode}),
    );
    let ok = report["state"] == "done"
        && ["missed", "duplicates", "out_of_order"]
            .iter()
            .all(|k| next[*k] == 0)
        && chain_state(&setup.hosts.dst, setup.service).map(|s| s.0) == Some(taken + next_cycles);
    kill_pid(report["destination_pid"].as_u64().unwrap_or(0));
    if ok {
        format!("succeeded{done}")
    } else {
        format!("FAILED: {report} {next}")
    }
}

/// The fault matrix in leave-running mode: each fault at the start of each
/// phase, with the CPS at 1 ms. See `fault_matrix_in`.
#[test]
fn fault_matrix() {
    fault_matrix_in(Mode::LeaveRunning);
}

/// The fault matrix in standby mode, with the standby instance killed as a
/// fault of its own. See `fault_matrix_in`.
#[test]
fn fault_matrix_standby() {
    fault_matrix_in(Mode::Standby);
}

/// Runs the fault matrix in `mode`, and writes its table to
/// target/fault-matrix-MODE.md, and both modes' tables (those written so
/// far) to target/fault-matrix.md (docs/migration.md shows them). In every
/// cell every input is answered exactly once, in order, by one of the
/// hosts, except where the fault kills the destination instance after it
/// took over (the service itself is dead then); nothing is left on the
/// source (see `left_on_src`); and where the source still serves, the
/// next migration succeeds.
fn fault_matrix_in(mode: Mode) {
    // FAULT_CELL="standby: kill destination daemon at checkpoint" runs one
    // cell; a name that is no cell's, in either mode, is an error, not a
    // run of nothing. (`fault_matrix` as a filter runs both halves: the
    // other half runs nothing then.)
    let only = std::env::var("FAULT_CELL").ok();
    if let Some(only) = &only {
        let names: Vec<String> = [Mode::LeaveRunning, Mode::Standby]
            .into_iter()
            .flat_map(|m| {
                matrix_cells(m)
                    .into_iter()
                    .map(move |(f, p)| cell_name(m, f, p))
            })
            .collect();
        assert!(
            names.contains(only),
            "FAULT_CELL={only:?} is not one of {names:#?}"
        );
    }
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    for (i, (fault, phase)) in matrix_cells(mode).into_iter().enumerate() {
        let cell = cell_name(mode, fault, phase);
        if only.as_ref().is_some_and(|c| *c != cell) {
            continue;
        }
        match run_cell(mode, fault, phase, i) {
            Err(reason) => {
                println!("{cell}: not run: {reason}");
                skipped.push((cell, reason));
            }
            Ok(row) => {
                println!(
                    "{cell}: {} | served by {} | {} | {} | left on src {:?} | next {}",
                    row.migration,
                    row.served_by,
                    row.verdict,
                    row.recovery,
                    row.left_on_src,
                    row.next
                );
                rows.push(row);
            }
        }
    }
    if rows.is_empty() && skipped.is_empty() {
        return;
    }
    let mut table = String::from(
        "| fault | at the start of | migration | served after by | missed | duplicates | \
         out of order | largest gap ms | recovered at restart | left on source | next \
         migration |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let or_dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.replace('|', "/")
        }
    };
    for r in &rows {
        table += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.1} | {} | {} | {} |\n",
            r.fault.name(),
            r.phase,
            // A CRIU error may quote its log, lines and all.
            r.migration.replace('|', "/").replace('\n', " "),
            r.served_by,
            r.verdict["missed"],
            r.verdict["duplicates"],
            r.verdict["out_of_order"],
            r.verdict["extra_gap_us"]["max"].as_f64().unwrap_or(0.0) / 1000.0,
            or_dash(&r.recovery),
            or_dash(&r.left_on_src.join("; ")),
            r.next.replace('|', "/"),
        );
    }
    for (cell, reason) in &skipped {
        table += &format!("\nNot run: {cell} ({reason}).\n");
    }
    if only.is_none() {
        write_matrix(mode, &table);
    }
    println!("{table}");
    for r in &rows {
        let cell = cell_name(mode, r.fault, r.phase);
        assert_eq!(r.verdict["duplicates"], 0, "{cell}");
        assert_eq!(r.verdict["out_of_order"], 0, "{cell}");
        assert_eq!(r.verdict["wrong"], 0, "{cell}");
        assert!(!r.next.starts_with("FAILED"), "{cell}: {}", r.next);
        assert_eq!(r.left_on_src, [] as [String; 0], "{cell}: left on src");
        // Killing the destination instance after the source handed the
        // service over kills the service: inputs past K go unanswered
        // then, and only then. Every input up to K was still answered by
        // the source. Before the handover, the source serves every input.
        if r.fault == Fault::DestinationInstance && r.handover_seq > 0 {
            let unanswered = r.verdict["missed"].as_u64().unwrap();
            assert!(
                unanswered <= CELL_CYCLES - r.handover_seq,
                "{cell}: {unanswered} missed, K = {}",
                r.handover_seq
            );
        } else {
            assert_eq!(r.verdict["missed"], 0, "{cell}");
            assert_ne!(r.served_by, "neither", "{cell}");
        }
    }
}

/// Writes `mode`'s table to target/fault-matrix-MODE.md, and
/// target/fault-matrix.md anew from both modes' files, each under its
/// mode's heading.
fn write_matrix(mode: Mode, table: &str) {
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    let file = |m| target.join(format!("fault-matrix-{}.md", mode_name(m)));
    std::fs::write(file(mode), table).unwrap();
    let both: Vec<String> = [Mode::LeaveRunning, Mode::Standby]
        .into_iter()
        .filter_map(|m| {
            let table = std::fs::read_to_string(file(m)).ok()?;
            Some(format!("## {}\n\n{table}", mode_name(m)))
        })
        .collect();
    std::fs::write(target.join("fault-matrix.md"), both.join("\n")).unwrap();
}

#[test]
fn migration_abort_stops_a_running_migration_before_the_flip_and_the_source_keeps_serving() {
    let setup = MigrationSetup::new("abort", &[], false);
    let error = migrate_with_fault(
        &setup,
        2000,
        |watcher| {
            // Asked while dst restores: the migration stops where its
            // next phase would begin, and rolls back.
            wait_for_phase(watcher, "restore");
            let running = setup
                .src
                .client()
                .call("migration.status", serde_json::json!({}))
                .unwrap();
            let id = running[0]["id"].as_str().expect("a running migration");
            let answer = setup
                .src
                .client()
                .call("migration.abort", serde_json::json!({"id": id}))
                .unwrap();
            assert_eq!(answer["aborting"], id);
        },
        "converge",
    );
    assert_eq!(error, "converge: aborted on request");
    migrate_cleanly(&setup, 2000);
}

#[test]
fn a_destination_that_would_announce_the_service_address_early_is_refused_at_prepare() {
    let setup = MigrationSetup::new("arpann", &[], false);
    // The restored instance's first (muted) output would name the service
    // address in an ARP request and pull the CPS's traffic over early.
    setup
        .hosts
        .dst
        .sysctl("net.ipv4.conf.eth0.arp_announce", "0");
    let error = migrate_with_fault(&setup, 1500, |_| {}, "prepare");
    assert_eq!(
        error,
        "prepare: destination: set net.ipv4.conf.eth0.arp_announce=2 on the destination: \
         otherwise the restored instance's first output announces the service address and \
         takes the CPS's traffic before the cutover"
    );
    // Refused before the source changed anything: its flow is not mirrored.
    let flows = setup
        .src
        .client()
        .call("flow.list", serde_json::json!({}))
        .unwrap();
    assert_eq!(flows[0]["mirror"], false, "{flows}");
}

#[test]
fn a_registered_process_that_ended_is_not_checkpointed() {
    // A migration checks that the pid it is about to hand CRIU (and later
    // kill) is still the process registered, by its start time: a pid
    // reused by another process must not be dumped or killed. Here the
    // controller ends and its pid goes; the check must name it.
    let setup = MigrationSetup::new("gone", &[], false);
    let pid = setup.controller.pid;
    kill_pid(pid as u64);
    // Its parent (the pid namespace's `unshare`) reaps it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "process {pid} was not reaped");
        std::thread::sleep(Duration::from_millis(10));
    }
    let id = setup.migrate(serde_json::json!({}));
    let report = setup.wait(&id);
    assert_eq!(
        report["error"],
        format!(
            "checkpoint: process {pid} is not the one registered (it ended, or its pid was \
             reused)"
        ),
        "{report}"
    );
    wait_until_dst_has_no_flows(&setup);
}

/// A CPS of the test's own on `flow`: "SEQ" every 1 ms while not paused,
/// with the outputs' cycle numbers collected. (cps-sim keeps an absolute
/// schedule: after a pause it would send what it held back in one burst.)
struct QuietCps {
    paused: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    sender: std::thread::JoinHandle<u64>,
    receiver: std::thread::JoinHandle<Vec<u64>>,
}

impl QuietCps {
    fn start(hosts: &dataplane_tests::TestHosts, (cps, service): dataplane_tests::Flow) -> Self {
        let socket = hosts
            .cps
            .run(|| std::net::UdpSocket::bind(cps))
            .expect("the CPS's socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let listener = socket.try_clone().unwrap();
        let (paused, stop) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let (p, s) = (paused.clone(), stop.clone());
        let sender = std::thread::spawn(move || {
            let mut sent = 0;
            while !s.load(Ordering::SeqCst) {
                if !p.load(Ordering::SeqCst) {
                    sent += 1;
                    let _ = socket.send_to(sent.to_string().as_bytes(), service);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            sent
        });
        let s = stop.clone();
        let receiver = std::thread::spawn(move || {
            let mut answered = Vec::new();
            let mut buf = [0u8; 256];
            let mut stopped_at = None;
            loop {
                if let Ok(n) = listener.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    answered.push(text.split(' ').next().unwrap().parse().unwrap());
                }
                // Answers still on their way when the sender stops.
                if s.load(Ordering::SeqCst) {
                    let at = *stopped_at.get_or_insert_with(Instant::now);
                    if at.elapsed() > Duration::from_millis(500) {
                        return answered;
                    }
                }
            }
        });
        Self {
            paused,
            stop,
            sender,
            receiver,
        }
    }

    fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
    }

    /// Stops it: how many inputs it sent, and the cycles answered, in the
    /// order the answers came.
    fn stop(self) -> (u64, Vec<u64>) {
        self.stop.store(true, Ordering::SeqCst);
        (self.sender.join().unwrap(), self.receiver.join().unwrap())
    }
}

#[test]
fn a_cps_quiet_across_the_flip_and_a_peer_link_cut_keeps_its_service() {
    // The destination, armed, that loses the link must wait as long as the
    // source may still pick K: a CPS quiet for 7 s across the cut is then
    // served by it, not lost.
    quiet_across_the_flip("quiet", AfterTheFlip::PeerLink);
}

#[test]
fn a_cps_quiet_across_the_flip_and_a_source_daemon_killed_after_it_keeps_its_service() {
    // The restarted source takes the flip back before any input came: it
    // serves on, and the destination rolls back once its wait is over.
    quiet_across_the_flip("qsrc", AfterTheFlip::SourceDaemon);
}

#[test]
fn a_cps_quiet_across_the_flip_and_a_source_daemon_down_at_its_next_input_hands_over() {
    // The source's kernel picks K without its daemon; the destination,
    // waiting, takes the service, and the restarted source stops its own
    // instance.
    quiet_across_the_flip("qsrcd", AfterTheFlip::SourceDaemonDown);
}

#[test]
fn a_cps_quiet_across_the_flip_and_a_destination_daemon_killed_after_it_keeps_its_service() {
    // The restarted destination's journal recovery waits for the handover
    // as the live daemon would: the first input after the flip hands the
    // service to it.
    quiet_across_the_flip("qdst", AfterTheFlip::DestinationDaemon);
}

#[test]
fn a_cps_quiet_across_the_flip_and_a_migration_aborted_meanwhile_keeps_its_service() {
    // The source takes the flip back at once and fails for the request:
    // the next input is the source's, the destination rolls back.
    quiet_across_the_flip("qabort", AfterTheFlip::Abort);
}

#[test]
fn a_migration_aborted_once_its_source_picked_k_finishes() {
    // Too late to roll back: the destination serves, and the migration
    // finishes rather than fail with its service moved.
    quiet_across_the_flip("qlate", AfterTheFlip::AbortAfterK);
}

/// A fault between the flip and K, with the CPS quiet across the flip.
#[derive(Clone, Copy, Debug, PartialEq)]
enum AfterTheFlip {
    /// The peer link down for 6 s; the CPS resumes 7 s after the flip.
    PeerLink,
    /// SIGKILL of the source daemon, restarted at once; then the CPS resumes.
    SourceDaemon,
    /// SIGKILL of the source daemon; the CPS resumes while it is down, and
    /// it restarts once the destination serves.
    SourceDaemonDown,
    /// SIGKILL of the destination daemon, restarted; the CPS resumes while
    /// its journal's recovery waits for the handover.
    DestinationDaemon,
    /// `migration.abort` on the source; the CPS resumes once it failed.
    Abort,
    /// The source daemon stopped (SIGSTOP) while the CPS resumes and its
    /// kernel picks K; `migration.abort` sent to it; then it goes on.
    AbortAfterK,
}

/// Waits until the source has flipped service "markov"'s flow: its gate
/// cuts at the next input (`CUT_AT_NEXT`), no K picked yet.
fn wait_for_the_flip(setup: &MigrationSetup) {
    wait_for_the_gate(setup, "flipped", |until| until == CUT_AT_NEXT);
}

/// Waits until the source's kernel has picked K for service "markov"'s
/// flow after a flip: its gate no longer cuts at the next input.
fn wait_for_k(setup: &MigrationSetup) {
    wait_for_the_gate(setup, "picked K", |until| until != CUT_AT_NEXT);
}

/// Waits (15 s at most) until the source's gate of service "markov"'s
/// flow has a `deliver_until` that `done` accepts: the source has `what`.
fn wait_for_the_gate(setup: &MigrationSetup, what: &str, done: impl Fn(u64) -> bool) {
    let flow_id = setup.source_flow_id();
    let dataplane = Dataplane::open(&setup.hosts.pin_root("src")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !done(dataplane.gate(flow_id).unwrap().deliver_until) {
        assert!(
            Instant::now() < deadline,
            "the source never {what}:\n{}",
            setup.src.log()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits (`limit` at most) until the daemon log `log` has `line` `times` times.
fn wait_for_log(log: &std::path::Path, line: &str, times: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    let count = || {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .matches(line)
            .count()
    };
    while count() < times {
        assert!(
            Instant::now() < deadline,
            "{} never logged {line:?}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Between the flip and K: a CPS quiet across the flip, `fault` once the
/// source has flipped, then the CPS's next inputs. The source's kernel
/// picks K at the first of them whether or not its daemon lives; a
/// restarted source daemon takes a flip with no K back first; an armed
/// destination (its journal's recovery too) waits for the handover for
/// the source's deadline and 2 s. So every input is answered once, in
/// order, by one host, and nothing of the migration is left on the other.
fn quiet_across_the_flip(tag: &str, fault: AfterTheFlip) {
    let mut setup = MigrationSetup::new(tag, &[], false);
    let cps = QuietCps::start(&setup.hosts, setup.flow());
    let (mut watcher, id) = setup.migrate_watched(json!({}));
    wait_for_phase(&mut watcher, "converge");
    // Quiet before the flip: the source daemon is held while the CPS sends
    // 300 more inputs and pauses, then let go to converge on the outputs
    // both hosts logged meanwhile.
    let source = Pid::from_raw(setup.src.pid() as i32);
    kill(source, Signal::SIGSTOP).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    cps.pause(true);
    std::thread::sleep(Duration::from_millis(200));
    kill(source, Signal::SIGCONT).unwrap();
    wait_for_the_flip(&setup);
    let adopted = "re-adopted the pinned dataplane";
    match fault {
        AfterTheFlip::PeerLink => {
            // The link down longer than its timeout: the destination
            // notices (within about 4 s) and waits for the handover.
            setup.hosts.src.ip(&["link", "set", "peer0", "down"]);
            std::thread::sleep(Duration::from_secs(6));
            setup.hosts.src.ip(&["link", "set", "peer0", "up"]);
            std::thread::sleep(Duration::from_secs(1));
            // 7 s after the flip, within the source's deadline: the next
            // input is K+1.
            cps.pause(false);
        }
        AfterTheFlip::SourceDaemon => {
            // Its journal's recovery finds no K and takes the flip back:
            // the next input is the source's.
            setup.src.kill_and_restart(&setup.hosts.src);
            cps.pause(false);
        }
        AfterTheFlip::SourceDaemonDown => {
            setup.src.signal_and_wait(Signal::SIGKILL);
            cps.pause(false);
            wait_for_log(
                &setup.dst.log_path(),
                "this host keeps serving",
                1,
                Duration::from_secs(5),
            );
            setup.src.restart(&setup.hosts.src);
        }
        AfterTheFlip::Abort => {
            let answer = setup
                .src
                .client()
                .call("migration.abort", json!({"id": id}))
                .unwrap();
            assert_eq!(answer["aborting"], id);
            let report = setup.wait(&id);
            assert_eq!(report["error"], "cutover: aborted on request", "{report}");
            cps.pause(false);
        }
        AfterTheFlip::AbortAfterK => {
            let daemon = Pid::from_raw(setup.src.pid() as i32);
            kill(daemon, Signal::SIGSTOP).unwrap();
            cps.pause(false);
            wait_for_k(&setup);
            // The request waits in the stopped daemon's socket, read when
            // it goes on: at once, as the migration sees K.
            let mut client = setup.src.client();
            let asked = std::thread::spawn({
                let id = id.clone();
                move || client.call("migration.abort", json!({"id": id}))
            });
            std::thread::sleep(Duration::from_millis(50));
            kill(daemon, Signal::SIGCONT).unwrap();
            let answer = asked.join().unwrap();
            println!("migration.abort: {answer:?}");
        }
        AfterTheFlip::DestinationDaemon => {
            // The restarted daemon's recovery waits for the handover before
            // it serves its socket: the CPS resumes while it waits.
            setup.dst.signal_and_wait(Signal::SIGKILL);
            let log = setup.dst.log_path();
            let starts = std::fs::read_to_string(&log)
                .unwrap_or_default()
                .matches(adopted)
                .count();
            let hosts_images = setup.dst_images_dir();
            let (dst, hosts) = (&mut setup.dst, &setup.hosts);
            std::thread::scope(|scope| {
                let restarted = scope.spawn(|| dst.restart(&hosts.dst));
                wait_for_log(&log, adopted, starts + 1, Duration::from_secs(10));
                // A second on, the recovery still waits: the journal stays
                // until it has decided.
                std::thread::sleep(Duration::from_secs(1));
                let journal = files_under(&hosts_images);
                assert!(
                    journal.iter().any(|f| f.ends_with(".destination.json")),
                    "the recovery did not wait: {journal:?}"
                );
                cps.pause(false);
                restarted.join().unwrap();
            });
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let (sent, answered) = cps.stop();
    let report = match fault {
        // The report died with the daemon.
        AfterTheFlip::SourceDaemon | AfterTheFlip::SourceDaemonDown => json!({}),
        _ => setup.wait(&id),
    };
    let recovered = recovered(&setup);
    println!("report: {report}\nrecovered: {recovered}");
    let expected: Vec<u64> = (1..=sent).collect();
    assert!(
        answered == expected,
        "every input answered once, in order: {} answers to {sent} inputs, the first \
         unanswered {:?}",
        answered.len(),
        expected.iter().find(|seq| !answered.contains(seq))
    );
    let (served_by, server, other) = match fault {
        AfterTheFlip::SourceDaemon | AfterTheFlip::Abort => {
            ("src", &setup.hosts.src, &setup.hosts.dst)
        }
        _ => ("dst", &setup.hosts.dst, &setup.hosts.src),
    };
    assert_eq!(
        chain_state(server, setup.service).map(|s| s.0),
        Some(sent),
        "{served_by}'s instance took every input"
    );
    // The source's journal is gone (the destination's below).
    assert_eq!(
        files_under(&setup.images_dir("src")),
        [] as [String; 0],
        "left in src's images_dir"
    );
    if served_by == "src" {
        assert!(
            fault == AfterTheFlip::Abort
                || recovered
                    .contains("from this host: rolled back: mirroring off, gates delivering"),
            "{recovered}"
        );
        // The destination rolls back once told, or once its wait (the
        // source's deadline and 2 s, from the kill) is over.
        wait_for_nothing_left_on_dst_within(&setup, Duration::from_secs(10 + 2 + 3));
        setup.assert_registered();
        migrate_cleanly(&setup, sent);
        return;
    }
    // Past K the source's instance gets no input: it is stopped, whether
    // the migration failed after the handover or its daemon died.
    let strays: Vec<u32> = pids_named("markov-controll")
        .into_iter()
        .filter(|&p| in_netns(p, other))
        .collect();
    assert_eq!(strays, [] as [u32; 0], "instances left on src: {report}");
    if fault == AfterTheFlip::SourceDaemonDown {
        // Its journal says which instances were the service's.
        assert!(
            recovered.contains("from this host: handed over at K = ")
                && recovered.contains("; stopped the instances here: "),
            "{recovered}"
        );
    } else {
        let k = report["handover_seq"].as_u64().unwrap_or(0);
        assert!(k > 0, "handed over: {report}");
    }
    if fault == AfterTheFlip::AbortAfterK {
        assert_eq!(report["state"], "done", "{report}");
    }
    let kept = match fault {
        AfterTheFlip::DestinationDaemon => {
            Some("to this host: handed over; kept serving, announced")
        }
        // It finished (its report says so, above).
        AfterTheFlip::AbortAfterK => None,
        _ => Some("the source is gone after the handover: this host keeps serving"),
    };
    if let Some(kept) = kept {
        let log = setup.dst.log();
        assert!(log.contains(kept), "{log}");
    }
    assert_eq!(
        files_under(&setup.dst_images_dir()),
        [] as [String; 0],
        "left in dst's images_dir"
    );
    // What serves on dst goes with the test: a restored instance whose
    // daemon died is nobody's child any more.
    for pid in pids_named("markov-controll")
        .into_iter()
        .filter(|&p| in_netns(p, server))
    {
        kill_pid(pid as u64);
    }
}

/// Waits until the checkpoint's hold of service "markov"'s inputs has
/// begun: the source's gate holds them.
fn wait_for_the_hold(setup: &MigrationSetup) {
    let flow_id = setup.source_flow_id();
    let dataplane = Dataplane::open(&setup.hosts.pin_root("src")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while dataplane.gate(flow_id).unwrap().mode != GATE_HOLD_ALL {
        assert!(Instant::now() < deadline, "no hold began");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Starts the CPS with `cycles` inputs at 1 ms, its trace to `trace`, and
/// `args` added.
fn start_traced_cps(
    setup: &MigrationSetup,
    cycles: u64,
    trace: &std::path::Path,
    args: &[&str],
) -> std::process::Child {
    setup
        .hosts
        .cps_command(&[setup.flow()], cycles, 1000)
        .args(args)
        .arg("--trace")
        .arg(trace)
        .spawn()
        .expect("start the CPS simulator")
}

/// The cycles of a CPS trace that were never answered.
fn unanswered(trace: &std::path::Path) -> Vec<u64> {
    let text = std::fs::read_to_string(trace).expect("the CPS's trace");
    let _ = std::fs::remove_file(trace);
    read_trace(&text)
        .iter()
        .filter(|c| c.answered_us == 0)
        .map(|c| c.seq)
        .collect()
}

#[test]
fn a_hold_over_its_budget_ends_at_once_every_held_input_is_given_back_and_the_next_migration_succeeds()
 {
    let setup = MigrationSetup::new("budget", &[], false);
    let cps = setup.start_cps(2000, 1000, None);
    // A budget of 3 inputs: the CPS sends one a millisecond, a dump takes
    // tens of milliseconds.
    let report = fault_with_cps(
        &setup,
        cps,
        2000,
        json!({"hold": {"inputs": 3}}),
        |_, _| {},
        "checkpoint",
    );
    let error = report["error"].as_str().unwrap();
    assert!(
        error.starts_with("checkpoint: the hold went over its budget: ")
            && error.contains(" inputs held, hold.inputs is 3; the hold ended there, and every held input was given back in order"),
        "{error}"
    );
    assert_eq!(report["criu_dump_us"], 0, "the dump was stopped: {report}");
    migrate_cleanly(&setup, 2000);
}

/// The bytes of an input too large for a replay (at most 2,001 bytes): a
/// 2,042-byte frame, which the controller's 2,048-byte buffer still takes.
const LARGE_INPUT: usize = 2000;

/// Lets a `LARGE_INPUT` input through unfragmented: the CPS's and the
/// service links at an MTU of 2,100, the peer link 100 above it for the
/// mirror headers.
fn raise_mtus(hosts: &TestHosts) {
    // A bridge takes its ports' MTU: the ports first.
    for iface in ["to-src", "to-dst", "br0"] {
        hosts.cps.ip(&["link", "set", iface, "mtu", "2100"]);
    }
    for iface in ["to-src", "to-dst", "br0"] {
        hosts.migration.ip(&["link", "set", iface, "mtu", "2200"]);
    }
    for host in [&hosts.src, &hosts.dst] {
        host.ip(&["link", "set", "peer0", "mtu", "2200"]);
        host.ip(&["link", "set", "eth0", "mtu", "2100"]);
    }
}

#[test]
fn an_input_too_large_to_replay_held_for_the_checkpoint_is_named_and_every_other_one_given_back() {
    let setup = MigrationSetup::new("large", &[], false);
    raise_mtus(&setup.hosts);
    let cycles = 2000;
    let trace = std::env::temp_dir().join(format!("large-{}.trace", std::process::id()));
    let cps = start_traced_cps(
        &setup,
        cycles,
        &trace,
        &["--large", &LARGE_INPUT.to_string()],
    );
    let cps_pid = Pid::from_raw(cps.id() as i32);
    let (_watcher, id) = setup.migrate_watched(json!({}));
    // The next input, one large, comes while the instance is held.
    wait_for_the_hold(&setup);
    kill(cps_pid, Signal::SIGUSR1).unwrap();
    let report = setup.wait(&id);
    let verdict = cps_verdict(cps);
    println!("report: {report}\nCPS: {verdict}");
    let large = verdict["large"][0]
        .as_u64()
        .expect("a large input went out");
    assert_eq!(
        report["error"],
        format!(
            "checkpoint: giving the held inputs back: the instance did not get these inputs, \
             and got every other one in order: input {large} is a {}-byte frame: a replay takes \
             frames of up to 2001 bytes",
            LARGE_INPUT + 42
        ),
        "{report}"
    );
    assert_eq!(
        report["criu_dump_us"], 0,
        "the hold ended at once: {report}"
    );
    // That input alone was lost: every other one was answered once, in order.
    assert_eq!(unanswered(&trace), [large], "{verdict}");
    for key in ["duplicates", "out_of_order"] {
        assert_eq!(verdict[key], 0, "{key}: {verdict}");
    }
    assert_eq!(
        chain_state(&setup.hosts.src, setup.service).map(|s| s.0),
        Some(cycles - 1),
        "the source instance took every other input"
    );
    wait_until_dst_has_no_flows(&setup);
    migrate_cleanly(&setup, cycles - 1);
}

#[test]
fn a_source_daemon_killed_during_the_hold_names_the_held_inputs_lost_with_it() {
    source_daemon_killed_during_the_hold("khold", false);
}

#[test]
fn a_torn_source_journal_is_undone_from_the_kernel_naming_the_held_inputs() {
    source_daemon_killed_during_the_hold("tornsrc", true);
}

/// Kills the source daemon during the hold and starts it again, with its
/// journal cut in half in between if `torn`: the restarted daemon finds the
/// gate holding and opens it naming the held inputs, which were in the dead
/// daemon's memory; with the journal torn, from the kernel's gates alone.
fn source_daemon_killed_during_the_hold(tag: &str, torn: bool) {
    // 8 MiB of state: a dump, and so a hold, long enough to kill it in.
    let mut setup = MigrationSetup::new(tag, &["--state-mib", "8"], false);
    let cycles = 3000;
    let trace = std::env::temp_dir().join(format!("{tag}-{}.trace", std::process::id()));
    let cps = start_traced_cps(&setup, cycles, &trace, &[]);
    let (_watcher, _id) = setup.migrate_watched(json!({}));
    wait_for_the_hold(&setup);
    setup.src.signal_and_wait(Signal::SIGKILL);
    if torn {
        assert_eq!(tear_journals(&setup.images_dir("src")), 1, "one journal");
    }
    setup.src.restart(&setup.hosts.src);
    let verdict = cps_verdict(cps);
    let recovered = recovered(&setup);
    println!("CPS: {verdict}\nrecovered: {recovered}");
    let lost = unanswered(&trace);
    let (Some(&first), Some(&last)) = (lost.first(), lost.last()) else {
        panic!("no input held when the daemon died: {verdict}");
    };
    assert_eq!(lost, (first..=last).collect::<Vec<_>>(), "one range");
    let named = format!(
        "gates delivering; inputs {first} to {last}, held when the daemon stopped, did not \
         reach the instance"
    );
    let outcome = if torn {
        let (cps, service) = setup.flow();
        let flow =
            dataplane_user::kernel::flow::display(&dataplane_user::kernel::flow::udp(cps, service));
        assert!(
            recovered.contains("is not a journal: EOF while parsing"),
            "{recovered}"
        );
        format!("from the kernel: flow {flow}: {named}")
    } else {
        format!("rolled back: mirroring off, {named}")
    };
    assert!(
        recovered.contains(&outcome),
        "{recovered}\nexpected: {outcome}"
    );
    for key in ["duplicates", "out_of_order"] {
        assert_eq!(verdict[key], 0, "{key}: {verdict}");
    }
    assert_eq!(files_under(&setup.images_dir("src")), [] as [String; 0]);
    wait_until_dst_has_no_flows(&setup);
    setup.assert_registered();
    migrate_cleanly(&setup, cycles - lost.len() as u64);
}

#[test]
fn a_torn_destination_journal_is_undone_from_the_kernel_and_the_next_migration_succeeds() {
    let mut setup = MigrationSetup::new("torndst", &[], false);
    let cycles = 4000;
    let cps = setup.start_cps(cycles, 1000, None);
    let (mut watcher, id) = setup.migrate_watched(json!({"converge": LONG_CONVERGE}));
    // Restored and journaled: the instance runs, muted, its flow adopted.
    wait_for_phase(&mut watcher, "converge");
    setup.dst.signal_and_wait(Signal::SIGKILL);
    assert_eq!(tear_journals(&setup.images_dir("dst")), 1, "one journal");
    setup.dst.restart(&setup.hosts.dst);
    let report = setup.wait(&id);
    let verdict = cps_verdict(cps);
    println!(
        "report: {report}\nCPS: {verdict}\nrecovered: {}",
        recovered(&setup)
    );
    assert!(report["error"].is_string(), "{report}");
    assert_source_served_every_input(&setup, &verdict, cycles);
    wait_for_nothing_left_on_dst(&setup);
    // The instance was found by its socket and killed, not left to idle.
    let recovered = recovered(&setup);
    let killed = recovered
        .split_once("from the kernel: rolled back: killed [")
        .map(|(_, rest)| rest);
    assert!(
        killed.is_some_and(|k| k.starts_with(|c: char| c.is_ascii_digit())),
        "{recovered}"
    );
    migrate_cleanly(&setup, cycles);
}

/// Cuts every journal under `images_dir` to half its length, as a failing
/// disk might (the daemon itself never leaves one torn): how many.
fn tear_journals(images_dir: &std::path::Path) -> usize {
    let journals: Vec<_> = std::fs::read_dir(images_dir.join("journal"))
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    for journal in &journals {
        let text = std::fs::read(journal).unwrap();
        std::fs::write(journal, &text[..text.len() / 2]).unwrap();
    }
    journals.len()
}

/// Convergence over this many outputs (2 s at 1 ms): long enough for a
/// signal sent at its start to land in it.
const LONG_CONVERGE: u32 = 2000;

/// Starts a migration with a long convergence while the CPS sends
/// `cycles` inputs, and once `when` returns (given a watching client)
/// sends SIGTERM to `host`'s daemon ("src" or "dst"), which must then exit
/// cleanly within `STOP_WITHIN`. The CPS, and the migration's id.
fn sigterm_mid_migration(
    setup: &mut MigrationSetup,
    host: &str,
    cycles: u64,
    when: impl FnOnce(&mut dataplane_user::control::client::Client, &MigrationSetup),
) -> (std::process::Child, String) {
    let cps = setup.start_cps(cycles, 1000, None);
    let (mut watcher, id) = setup.migrate_watched(json!({"converge": LONG_CONVERGE}));
    when(&mut watcher, setup);
    let daemon = match host {
        "src" => &mut setup.src,
        _ => &mut setup.dst,
    };
    let stopping = Instant::now();
    let status = daemon.signal_and_wait(Signal::SIGTERM);
    let took = stopping.elapsed();
    println!("{host}'s daemon stopped in {took:?}: {status}");
    assert!(status.success(), "{status}");
    assert!(took < STOP_WITHIN, "stopped in {took:?}");
    (cps, id)
}

#[test]
fn sigterm_to_the_source_daemon_mid_migration_rolls_it_back_before_it_exits() {
    let mut setup = MigrationSetup::new("termsrc", &[], false);
    let cycles = 4000;
    let (cps, _) = sigterm_mid_migration(&mut setup, "src", cycles, |watcher, _| {
        wait_for_phase(watcher, "converge")
    });
    let log = setup.src.log();
    assert!(
        log.contains("migration failed, rolled back: converge: aborted on request"),
        "{log}"
    );
    // Rolled back before the exit: no journal left for the next start.
    let journals = files_under(&setup.images_dir("src"));
    assert_eq!(journals, [] as [String; 0], "left in src's images_dir");
    let verdict = cps_verdict(cps);
    println!("CPS: {verdict}");
    assert_source_served_every_input(&setup, &verdict, cycles);
    wait_for_nothing_left_on_dst(&setup);
    setup.src.restart(&setup.hosts.src);
    setup.assert_registered();
    migrate_cleanly(&setup, cycles);
}

#[test]
fn sigterm_to_the_destination_daemon_while_criu_restores_rolls_back_what_it_adopted_before_it_exits()
 {
    let mut setup = MigrationSetup::new("termdst", &[], false);
    let cycles = 4000;
    let before = pids_named("criu");
    // Mid-step: the daemon ends the link after the step, so that the
    // instance CRIU is making is known, and killed, before the exit.
    let (cps, id) = sigterm_mid_migration(&mut setup, "dst", cycles, |watcher, setup| {
        wait_for_phase(watcher, "restore");
        wait_for_new_criu(&setup.hosts.dst, &before);
    });
    // Undone before the exit: the restored instance, the flow, the images
    // and the journal.
    assert_eq!(setup.left_on_dst(), [] as [String; 0], "left on dst");
    let report = setup.wait(&id);
    let verdict = cps_verdict(cps);
    println!("report: {report}\nCPS: {verdict}");
    let error = report["error"].as_str().unwrap();
    assert!(error.starts_with("converge: destination: "), "{error}");
    assert_source_served_every_input(&setup, &verdict, cycles);
    setup.dst.restart(&setup.hosts.dst);
    migrate_cleanly(&setup, cycles);
}

/// Waits (10 s at most) until nothing of a rolled-back migration is left
/// on dst.
fn wait_for_nothing_left_on_dst(setup: &MigrationSetup) {
    wait_for_nothing_left_on_dst_within(setup, Duration::from_secs(10));
}

/// As `wait_for_nothing_left_on_dst`, for at most `limit`.
fn wait_for_nothing_left_on_dst_within(setup: &MigrationSetup, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let left = setup.left_on_dst();
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "left on dst: {left:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Service "markov"'s flow on dst, once the migration has prepared it, and
/// dst's dataplane.
fn destination_flow(setup: &MigrationSetup) -> (Dataplane, u32) {
    let key = dataplane_user::kernel::flow::udp(setup.flow().0, setup.flow().1);
    let dataplane = Dataplane::open(&setup.hosts.pin_root("dst")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let flow_id = dataplane
            .flows()
            .unwrap()
            .into_iter()
            .find_map(|(k, config)| (k == key).then_some(config.flow_id));
        if let Some(flow_id) = flow_id {
            return (dataplane, flow_id);
        }
        assert!(Instant::now() < deadline, "no flow prepared on dst");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits until dst replays the inputs logged since the checkpoint into
/// the restored instance, and stops (SIGSTOP) the instance there: the
/// replay paces itself by the instance's socket queue, so it stalls until
/// the instance is let go. Checks that it has: the gate's `next_expected`
/// stays put while the live inputs go on being numbered (a replay that was
/// over would let them through). The instance, and how many inputs the
/// replay had still to give.
fn stall_the_replay(setup: &MigrationSetup) -> (Pid, u64) {
    let (dataplane, flow_id) = destination_flow(setup);
    let deadline = Instant::now() + Duration::from_secs(30);
    // Sequenced, with more left to give than fits the socket's queue.
    while !(dataplane.gate(flow_id).unwrap().mode == GATE_SEQUENCED
        && dataplane.sequence(flow_id).unwrap().last_seq
            > dataplane.gate(flow_id).unwrap().next_expected + 64)
    {
        assert!(Instant::now() < deadline, "no replay seen on dst");
        std::thread::sleep(Duration::from_micros(100));
    }
    let instance: Vec<u32> = pids_named("markov-controll")
        .into_iter()
        .filter(|&p| in_netns(p, &setup.hosts.dst))
        .collect();
    let [instance] = instance[..] else {
        panic!("one restored instance on dst: {instance:?}");
    };
    let instance = Pid::from_raw(instance as i32);
    kill(instance, Signal::SIGSTOP).unwrap();
    let position = || {
        (
            dataplane.gate(flow_id).unwrap().next_expected,
            dataplane.sequence(flow_id).unwrap().last_seq,
        )
    };
    // Whatever was on its way into the socket goes in first (later on a
    // loaded machine): stalled once `next_expected` of the still
    // sequenced gate has stood for 100 ms while live inputs were numbered.
    let deadline = Instant::now() + Duration::from_secs(5);
    let (next, last) = loop {
        let (next, last) = position();
        std::thread::sleep(Duration::from_millis(100));
        let (next_then, last_then) = position();
        let sequenced = dataplane.gate(flow_id).unwrap().mode == GATE_SEQUENCED;
        if sequenced && next_then == next && last_then > last {
            break (next, last);
        }
        assert!(
            Instant::now() < deadline,
            "the replay did not stall: next_expected {next} -> {next_then}, last numbered \
             {last} -> {last_then}"
        );
    };
    (instance, last + 1 - next)
}

/// During the replay: `fault` lands while the destination replays the
/// inputs logged since the checkpoint (about a second of them: 64 MiB of
/// images take that long to go) into the restored instance, stalled there
/// (`stall_the_replay`) until the fault is in, and let go after it. The
/// migration fails in `restore`, the source answers every input once, in
/// order, nothing is left on the destination, and the next migration
/// succeeds.
fn fault_during_the_replay(tag: &str, fault: Fault) {
    let mut setup = MigrationSetup::new(tag, &["--state-mib", "64"], false);
    let cycles = 7000;
    let cps = setup.start_cps(cycles, 1000, None);
    let (_watcher, id) = setup.migrate_watched(json!({}));
    let (instance, behind) = stall_the_replay(&setup);
    println!("{}: {behind} inputs still to replay", fault.name());
    match fault {
        Fault::SourceDaemon => setup.src.kill_and_restart(&setup.hosts.src),
        Fault::DestinationDaemon => setup.dst.kill_and_restart(&setup.hosts.dst),
        Fault::DestinationInstance => kill(instance, Signal::SIGKILL).unwrap(),
        Fault::PeerLink => {
            setup.hosts.src.ip(&["link", "set", "peer0", "down"]);
            std::thread::sleep(Duration::from_secs(4));
            setup.hosts.src.ip(&["link", "set", "peer0", "up"]);
        }
        Fault::StandbyInstance => panic!("a leave-running migration has no standby"),
    }
    // Gone already if the fault (or a rollback) killed it.
    let _ = kill(instance, Signal::SIGCONT);
    let report = match fault {
        // The report died with the daemon.
        Fault::SourceDaemon => None,
        _ => Some(setup.wait(&id)),
    };
    let verdict = cps_verdict(cps);
    let recovered = recovered(&setup);
    println!("report: {report:?}\nCPS: {verdict}\nrecovered: {recovered}");
    if let Some(report) = &report {
        assert_eq!(report["state"], "failed", "{report}");
        assert_eq!(report["handover_seq"], 0, "{report}");
        let error = report["error"].as_str().unwrap();
        assert!(error.starts_with("restore: destination: "), "{error}");
        if fault == Fault::DestinationInstance {
            assert!(
                error.contains("was killed by SIGKILL during replay"),
                "{error}"
            );
        }
    } else {
        assert!(
            recovered.contains("from this host: rolled back: mirroring off, gates delivering"),
            "{recovered}"
        );
    }
    assert_source_served_every_input(&setup, &verdict, cycles);
    assert_eq!(
        files_under(&setup.images_dir("src")),
        [] as [String; 0],
        "left in src's images_dir"
    );
    wait_for_nothing_left_on_dst(&setup);
    if fault == Fault::SourceDaemon {
        setup.assert_registered();
    }
    migrate_cleanly(&setup, cycles);
}

#[test]
fn a_source_daemon_killed_during_the_replay_rolls_back_and_the_next_migration_succeeds() {
    fault_during_the_replay("rpsrc", Fault::SourceDaemon);
}

#[test]
fn a_destination_daemon_killed_during_the_replay_rolls_back_and_the_next_migration_succeeds() {
    fault_during_the_replay("rpdst", Fault::DestinationDaemon);
}

#[test]
fn the_restored_instance_killed_during_the_replay_rolls_back_and_the_next_migration_succeeds() {
    fault_during_the_replay("rpinst", Fault::DestinationInstance);
}

#[test]
fn the_peer_link_cut_during_the_replay_rolls_back_and_the_next_migration_succeeds() {
    fault_during_the_replay("rpcut", Fault::PeerLink);
}
