//! Hot replicas on another host (`replica.start`): kept in sync by the
//! mirror and compared output by output, handed over to without a
//! checkpoint, never handed over to out of sync. Real kernel programs,
//! real CRIU, real processes, the CPS at T_U = 1 ms.
use std::time::{Duration, Instant};

use dataplane_tests::{MigrationSetup, chain_state, cps_verdict, kill_pid};
use serde_json::json;

fn assert_clean(verdict: &serde_json::Value) {
    for key in ["missed", "duplicates", "out_of_order", "wrong"] {
        assert_eq!(verdict[key], 0, "{key}: {verdict}");
    }
}

/// The handover `report` (by `daemon`) to the hot replica `replica` is
/// done, the CPS's `verdict` is exact, and the instance on the host it went
/// to has taken every one of the run's `cycles` inputs to `service`.
fn assert_exact_handover(
    report: &serde_json::Value,
    replica: &str,
    verdict: &serde_json::Value,
    daemon: &dataplane_tests::DaemonProcess,
    (host, service, cycles): (&dataplane_tests::NetNs, std::net::SocketAddr, u64),
) {
    assert_eq!(report["state"], "done", "{report:#}\n{}", daemon.log());
    assert_eq!(report["from_replica"], replica);
    assert_clean(verdict);
    assert_eq!(
        chain_state(host, service).map(|s| s.0),
        Some(cycles),
        "the instance handed over to took every input"
    );
}

#[test]
fn a_migration_to_an_in_sync_replica_is_a_comparison_and_a_cutover() {
    let setup = MigrationSetup::new("rep", &[], false);
    let cycles = 5000;
    let cps = setup.start_cps(cycles, 1000, None);
    std::thread::sleep(Duration::from_millis(300));
    let replica = setup.replicate(json!({}));
    let synced = setup.wait_in_sync(&replica);
    assert_eq!(synced["state"], "running", "{synced}");
    let status = &synced["replica"];
    assert!(status["sync_us"].as_u64() > Some(0), "{synced}");
    assert_eq!(status["resyncs"], 0, "{synced}");
    assert_eq!(
        MigrationSetup::instances_on(&setup.hosts.dst).len(),
        1,
        "one replica on dst"
    );
    // Kept in sync: the comparison goes on, and keeps up.
    std::thread::sleep(Duration::from_millis(600));
    let kept = setup
        .src
        .client()
        .call("migration.status", json!({"id": replica}))
        .expect("migration.status");
    println!("replica: {kept}");
    let compared = |r: &serde_json::Value| r["replica"]["compared"].as_u64().unwrap_or(0);
    assert_eq!(kept["replica"]["state"], "in_sync", "{kept}");
    assert!(
        compared(&kept) >= compared(&synced) + 300,
        "{synced}\n{kept}"
    );
    assert!(kept["replica"]["lag"].as_u64() < Some(200), "{kept}");
    // A migration elsewhere is refused while the replica lives.
    let elsewhere = setup.src.client().call(
        "migration.start",
        json!({"service": "markov", "to": dataplane_tests::SRC_PEER}),
    );
    let refused = elsewhere.expect_err("a migration past the replica");
    assert!(refused.to_string().contains("hot replica"), "{refused}");

    let id = setup.migrate(json!({}));
    let report = setup.wait(&id);
    let verdict = cps_verdict(cps);
    println!("handover: {report}\nCPS: {verdict}");
    assert_eq!(report["state"], "done", "{report:#}\n{}", setup.src.log());
    assert_eq!(report["from_replica"], replica.as_str());
    let phases: Vec<&str> = report["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
        ["converge", "cutover", "announce", "finish"],
        "no CRIU"
    );
    assert!(report["total_us"].as_u64() > Some(0));
    assert!(report["handover_seq"].as_u64() > Some(0));
    let ended = setup.wait(&replica);
    assert_eq!(ended["state"], "done", "{ended}");
    assert_clean(&verdict);
    // The replica served every input after K, and had taken every one
    // before: its chain covers them all.
    let state = chain_state(&setup.hosts.dst, setup.service);
    kill_pid(report["destination_pid"].as_u64().unwrap_or(0));
    assert_eq!(state.map(|s| s.0), Some(cycles));
    assert_eq!(
        MigrationSetup::instances_on(&setup.hosts.src),
        [] as [u32; 0]
    );
    // The destination knows the service; the source forgot it.
    let on = |daemon: &dataplane_tests::DaemonProcess| {
        daemon
            .client()
            .call("service.list", json!({}))
            .expect("service.list")
            .to_string()
    };
    assert!(on(&setup.dst).contains("markov"), "{}", on(&setup.dst));
    assert!(!on(&setup.src).contains("markov"), "{}", on(&setup.src));
}

#[test]
fn a_replica_that_never_matches_is_reported_resynced_at_most_three_times_and_not_handed_over_to() {
    // Outputs carry the time of day: the replica can never agree.
    let setup = MigrationSetup::new("repdiv", &["--wall-clock"], false);
    let cycles = 6000;
    let cps = setup.start_cps(cycles, 1000, None);
    std::thread::sleep(Duration::from_millis(300));
    let replica = setup.replicate(json!({"deadline_ms": 300}));
    std::thread::sleep(Duration::from_millis(200));
    let refused = setup
        .src
        .client()
        .call(
            "migration.start",
            json!({"service": "markov", "to": dataplane_tests::DST_PEER}),
        )
        .expect_err("a handover to a replica out of sync");
    assert!(refused.to_string().contains("only in sync"), "{refused}");
    let ended = setup.wait(&replica);
    println!("replica: {ended}");
    assert_eq!(ended["state"], "failed", "{ended}");
    assert_eq!(ended["replica"]["resyncs"], 3, "{ended}");
    assert!(
        ended["replica"]["mismatch"]
            .as_str()
            .is_some_and(|m| m.starts_with("input ")),
        "the mismatch is reported: {ended}"
    );
    let error = ended["error"].as_str().unwrap();
    assert!(error.contains("matching outputs in a row"), "{error}");
    let verdict = cps_verdict(cps);
    assert_clean(&verdict);
    assert_eq!(
        chain_state(&setup.hosts.src, setup.service).map(|s| s.0),
        Some(cycles),
        "the source served every input"
    );
    assert_eq!(setup.left_on_dst(), [] as [String; 0], "left on dst");
}

#[test]
fn a_stopped_replica_is_removed_and_the_source_serves_on() {
    let setup = MigrationSetup::new("repstop", &[], false);
    let cycles = 3000;
    let cps = setup.start_cps(cycles, 1000, None);
    std::thread::sleep(Duration::from_millis(300));
    let replica = setup.replicate(json!({}));
    let synced = setup.wait_in_sync(&replica);
    assert_eq!(synced["replica"]["state"], "in_sync", "{synced}");
    let stopping = setup
        .src
        .client()
        .call("replica.stop", json!({"name": "markov"}))
        .expect("replica.stop");
    assert_eq!(stopping["stopping"], replica.as_str());
    let ended = setup.wait(&replica);
    assert_eq!(ended["state"], "stopped", "{ended}");
    let verdict = cps_verdict(cps);
    assert_clean(&verdict);
    assert_eq!(setup.left_on_dst(), [] as [String; 0], "left on dst");
    let flows = setup
        .src
        .client()
        .call("flow.list", json!({}))
        .expect("flow.list");
    assert_eq!(flows[0]["mirror"], false, "mirroring off again: {flows}");
    let again = setup
        .src
        .client()
        .call("replica.stop", json!({"name": "markov"}))
        .expect_err("no replica left");
    assert!(again.to_string().contains("no hot replica"), "{again}");
}

#[test]
fn a_replica_stopped_while_it_syncs_ends_at_once() {
    // It never gets in sync: its outputs carry the time of day.
    let setup = MigrationSetup::new("repstop2", &["--wall-clock"], false);
    let cycles = 3000;
    let cps = setup.start_cps(cycles, 1000, None);
    std::thread::sleep(Duration::from_millis(300));
    let replica = setup.replicate(json!({"deadline_ms": 60000}));
    std::thread::sleep(Duration::from_millis(800));
    let asked = Instant::now();
    setup
        .src
        .client()
        .call("replica.stop", json!({"name": "markov"}))
        .expect("replica.stop");
    let ended = setup.wait(&replica);
    let took = asked.elapsed();
    println!("replica: {ended}\nstopped in {took:?}");
    assert_eq!(ended["state"], "stopped", "{ended}");
    assert!(
        took < Duration::from_secs(2),
        "not its 60 s deadline: {took:?}"
    );
    let verdict = cps_verdict(cps);
    assert_clean(&verdict);
    assert_eq!(setup.left_on_dst(), [] as [String; 0], "left on dst");
}

#[test]
fn daemons_restarted_with_a_replica_in_place_keep_it_in_sync_without_a_restore() {
    use nix::sys::signal::Signal;

    let mut setup = MigrationSetup::new("reprs", &[], false);
    let cycles = 12_000;
    let cps = setup.start_cps(cycles, 1000, None);
    std::thread::sleep(Duration::from_millis(300));
    let replica = setup.replicate(json!({}));
    let synced = setup.wait_in_sync(&replica);
    assert_eq!(synced["replica"]["state"], "in_sync", "{synced}");
    let pid = synced["destination_pid"]
        .as_u64()
        .expect("the replica's pid");
    let status = |setup: &MigrationSetup| {
        setup
            .src
            .client()
            .call("migration.status", json!({ "id": replica }))
            .expect("migration.status")
    };
    // Each daemon stops (as its supervisor stops it) or dies, and comes back.
    let restarts = [
        ("dst", Signal::SIGTERM),
        ("src", Signal::SIGKILL),
        ("src", Signal::SIGTERM),
        ("dst", Signal::SIGKILL),
    ];
    for (host, signal) in restarts {
        // The serving host's daemon attaches to the replica again: the
        // count is its run's (a restarted source counts from 0).
        let attached_before = match host {
            "src" => 0,
            _ => status(&setup)["replica"]["reattached"]
                .as_u64()
                .unwrap_or(0),
        };
        let (daemon, netns) = match host {
            "src" => (&mut setup.src, &setup.hosts.src),
            _ => (&mut setup.dst, &setup.hosts.dst),
        };
        daemon.signal_and_wait(signal);
        daemon.restart(netns);
        let again = setup.src.wait_for_report(&replica, |r| {
            r["replica"]["state"] == "in_sync"
                && r["replica"]["reattached"].as_u64() > Some(attached_before)
        });
        println!("after the {host} daemon's {signal}: {again}");
        assert_eq!(again["state"], "running", "{again}\n{}", setup.src.log());
        assert_eq!(again["replica"]["state"], "in_sync", "{again}");
        assert_eq!(again["replica"]["resyncs"], 0, "no restore: {again}");
        assert_eq!(again["destination_pid"], pid, "{again}");
        assert_eq!(
            MigrationSetup::instances_on(&setup.hosts.dst),
            [pid as u32],
            "the same replica instance on dst"
        );
    }
    // It matched again and goes on matching: a handover to it is exact.
    let kept = setup
        .src
        .wait_for_report(&replica, |r| r["replica"]["compared"].as_u64() > Some(200));
    assert_eq!(kept["replica"]["state"], "in_sync", "{kept}");
    let id = setup.migrate(json!({}));
    let report = setup.wait(&id);
    let verdict = cps_verdict(cps);
    println!("handover: {report}\nCPS: {verdict}");
    assert_exact_handover(
        &report,
        &replica,
        &verdict,
        &setup.src,
        (&setup.hosts.dst, setup.service, cycles),
    );
    kill_pid(pid);
}

#[test]
fn a_handover_that_keeps_the_source_instance_makes_it_the_new_hosts_replica_without_a_checkpoint() {
    // src listens on the peer link too: dst attaches to the instance it keeps.
    let src = format!("peer_listen = \"{}\"\n", dataplane_tests::SRC_PEER);
    let setup = MigrationSetup::with_configs("repkeep", &[], false, &src, "");
    let cycles = 8000;
    let cps = setup.start_cps(cycles, 1000, None);
    std::thread::sleep(Duration::from_millis(300));
    let replica = setup.replicate(json!({}));
    setup.wait_in_sync(&replica);
    let id = setup.migrate(json!({ "keep_replica": true }));
    let report = setup.wait(&id);
    println!("handover: {report}");
    assert_eq!(report["state"], "done", "{report:#}\n{}", setup.src.log());
    // dst serves, and src's instance, which took every input up to K, is
    // its replica now: fed from K+1, compared, in sync, no checkpoint.
    // (dst adopts it once it has answered `finish`: a moment after.)
    let deadline = Instant::now() + Duration::from_secs(5);
    while setup
        .dst
        .client()
        .call("migration.status", json!({ "id": replica }))
        .is_err()
    {
        assert!(Instant::now() < deadline, "dst never adopted {replica}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let adopted = setup
        .dst
        .wait_for_report(&replica, |r| r["replica"]["state"] == "in_sync");
    println!("adopted: {adopted}\n{}", setup.dst.log());
    assert_eq!(adopted["state"], "running", "{adopted}");
    assert_eq!(adopted["replica"]["state"], "in_sync", "{adopted}");
    assert_eq!(adopted["replica"]["resyncs"], 0, "{adopted}");
    let phases: Vec<&str> = adopted["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(!phases.contains(&"checkpoint"), "no CRIU: {phases:?}");
    assert_eq!(
        MigrationSetup::instances_on(&setup.hosts.src),
        [setup.controller.pid],
        "the source's own instance, kept"
    );
    // Handed back to it: a handover to the adopted replica, exact.
    let back = setup
        .dst
        .client()
        .call(
            "migration.start",
            json!({"service": "markov", "to": dataplane_tests::SRC_PEER}),
        )
        .expect("migration.start");
    let back = setup
        .dst
        .wait_for_migration(back["id"].as_str().expect("an id"));
    let verdict = cps_verdict(cps);
    println!("handed back: {back}\nCPS: {verdict}");
    assert_exact_handover(
        &back,
        &replica,
        &verdict,
        &setup.dst,
        (&setup.hosts.src, setup.service, cycles),
    );
}
