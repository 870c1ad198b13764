//! Failover to a hot replica: the replica's host takes the service over
//! when the serving host stops, and never while only one network is cut.
//! Real kernel programs, real CRIU, real processes, the CPS at T_U = 1 ms.
use std::time::Duration;

use dataplane_tests::{MigrationSetup, cps_verdict};
use serde_json::{Value, json};

/// `failover_after_ms` on the replica's host in these tests.
const FAILOVER_AFTER_MS: u64 = 2;

fn setup(tag: &str) -> MigrationSetup {
    let dst = format!("failover_after_ms = {FAILOVER_AFTER_MS}\n");
    MigrationSetup::with_configs(tag, &[], false, "", &dst)
}

fn status(daemon: &dataplane_tests::DaemonProcess) -> Value {
    daemon.client().call("status", json!({})).expect("status")
}

fn services(daemon: &dataplane_tests::DaemonProcess) -> String {
    let list = daemon.client().call("service.list", json!({}));
    list.expect("service.list").to_string()
}

/// Once the CPS run `cps` has ended: dst took the service over, with no
/// error, and registered it; the CPS saw no duplicate, out-of-order or
/// wrong output, and missed at most the cycles sent while the source was
/// silent before the takeover (fewer: those flooded to dst are replayed)
/// and while it learned the new owner; a few more only if the machine
/// stalls (the bar is `bench failover`'s).
fn assert_taken_over(setup: &MigrationSetup, cps: std::process::Child) {
    let verdict = cps_verdict(cps);
    let after = status(&setup.dst);
    println!("CPS: {verdict}\ndst took over: {}", after["takeovers"]);
    let takeover = &after["takeovers"][0];
    assert_eq!(takeover["service"], "markov", "{after}");
    assert_eq!(takeover["error"], Value::Null, "{takeover}");
    assert!(services(&setup.dst).contains("markov"), "registered on dst");
    for key in ["duplicates", "out_of_order", "wrong"] {
        assert_eq!(verdict[key], 0, "{key}: {verdict}");
    }
    let silent_ms = takeover["silent_us"].as_u64().unwrap() / 1000;
    let missed = verdict["missed"].as_u64().unwrap();
    assert!(
        missed <= silent_ms + 10,
        "missed {missed} with {silent_ms} ms of silence"
    );
}

#[test]
fn the_replicas_host_serves_when_the_source_host_stops_and_the_source_stays_silent_after() {
    let mut setup = setup("fo");
    let cycles = 4000;
    // The inputs sent to the stopped host reached no instance: the
    // replica's chain may skip those (and only those) cycles.
    let cps = setup.start_cps_with(cycles, 1000, &["--skips"]);
    std::thread::sleep(Duration::from_millis(300));
    let replica = setup.replicate(json!({}));
    let synced = setup.wait_in_sync(&replica);
    assert_eq!(
        synced["replica"]["failover_after_ms"], FAILOVER_AFTER_MS,
        "{synced}"
    );
    std::thread::sleep(Duration::from_millis(500));

    // The source host stops: its links go down, its daemon and its
    // instance die, at once.
    setup.stop_source_host();

    assert_taken_over(&setup, cps);
    assert_eq!(
        MigrationSetup::instances_on(&setup.hosts.dst).len(),
        1,
        "the replica serves"
    );

    // The source host comes back: its daemon finds the service dead and
    // lets go of its flows and its address, so that it answers nothing.
    for interface in ["eth0", "peer0"] {
        setup.hosts.src.ip(&["link", "set", interface, "up"]);
    }
    setup.src.restart(&setup.hosts.src);
    let src_status = status(&setup.src);
    assert_eq!(src_status["flows"], json!([]), "{src_status}");
    assert!(!services(&setup.src).contains("markov"));
    let addresses = setup
        .hosts
        .src
        .exec("ip", &["-o", "addr", "show", "dev", "eth0"]);
    assert!(!addresses.contains("192.0.2.10/"), "{addresses}");
    let cps = setup.start_cps_with(500, 1000, &["--no-check"]);
    let verdict = cps_verdict(cps);
    println!("after the source came back: {verdict}");
    for key in ["missed", "duplicates", "out_of_order"] {
        assert_eq!(verdict[key], 0, "{key}: {verdict}");
    }
}

#[test]
fn a_cut_migration_network_makes_no_takeover_and_the_replica_resyncs_after() {
    let setup = setup("focut");
    let cycles = 9000;
    let cps = setup.start_cps(cycles, 1000, None);
    std::thread::sleep(Duration::from_millis(300));
    let replica = setup.replicate(json!({}));
    setup.wait_in_sync(&replica);
    // Longer than the peer link's timeout (3 s): the link goes too.
    setup.hosts.migration.ip(&["link", "set", "to-src", "down"]);
    std::thread::sleep(Duration::from_secs(4));
    setup.hosts.migration.ip(&["link", "set", "to-src", "up"]);
    let resynced = setup.src.wait_for_report(&replica, |r| {
        r["replica"]["state"] == "in_sync" && r["replica"]["resyncs"].as_u64() >= Some(1)
    });
    println!("replica: {resynced}");
    assert_eq!(resynced["replica"]["state"], "in_sync", "{resynced}");
    let verdict = cps_verdict(cps);
    println!("CPS: {verdict}");
    for key in ["missed", "duplicates", "out_of_order", "wrong"] {
        assert_eq!(verdict[key], 0, "{key}: {verdict}");
    }
    assert_eq!(status(&setup.dst)["takeovers"], json!([]), "no takeover");
    assert!(!services(&setup.dst).contains("markov"));
}

#[test]
fn a_source_cut_off_from_both_networks_stops_serving_once_it_hears_of_the_takeover() {
    let setup = setup("fopart");
    let cps = setup.start_cps_with(5000, 1000, &["--skips"]);
    std::thread::sleep(Duration::from_millis(300));
    let replica = setup.replicate(json!({}));
    setup.wait_in_sync(&replica);
    // The source host keeps running, cut off from both networks: the
    // replica's host cannot tell it from a stopped one, and takes over.
    setup.hosts.cps.ip(&["link", "set", "to-src", "down"]);
    setup.hosts.migration.ip(&["link", "set", "to-src", "down"]);
    std::thread::sleep(Duration::from_millis(1500));
    setup.hosts.cps.ip(&["link", "set", "to-src", "up"]);
    setup.hosts.migration.ip(&["link", "set", "to-src", "up"]);
    // Back on the networks, the source hears of the takeover on its
    // link and lets the service go.
    let ended = setup.wait(&replica);
    println!("replica: {ended}");
    let error = ended["error"].as_str().unwrap_or_default();
    assert!(error.contains("took the service over"), "{ended}");
    let verdict = cps_verdict(cps);
    println!("CPS: {verdict}");
    for key in ["duplicates", "out_of_order", "wrong"] {
        assert_eq!(verdict[key], 0, "{key}: {verdict}");
    }
    assert_eq!(status(&setup.dst)["takeovers"][0]["service"], "markov");
    assert!(
        !services(&setup.src).contains("markov"),
        "unregistered on src"
    );
    assert_eq!(status(&setup.src)["flows"], json!([]), "its flows gone");
    // Killed: gone once it has exited.
    let killed = std::time::Instant::now();
    while !MigrationSetup::instances_on(&setup.hosts.src).is_empty() {
        assert!(
            killed.elapsed() < Duration::from_secs(2),
            "the controller still runs on src"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let cps = setup.start_cps_with(500, 1000, &["--no-check"]);
    let verdict = cps_verdict(cps);
    for key in ["missed", "duplicates", "out_of_order"] {
        assert_eq!(verdict[key], 0, "{key}: {verdict}");
    }
}

#[test]
fn an_ipv6_service_fails_over_only_when_its_host_stops() {
    let dst = format!("failover_after_ms = {FAILOVER_AFTER_MS}\n");
    let mut setup = MigrationSetup::ipv6_with_configs("fo6", "", &dst);
    let cps = setup.start_cps_with(12_000, 1000, &["--skips"]);
    std::thread::sleep(Duration::from_millis(300));
    let replica = setup.replicate(json!({}));
    let synced = setup.wait_in_sync(&replica);
    assert_eq!(
        synced["replica"]["failover_after_ms"], FAILOVER_AFTER_MS,
        "an IPv6 replica is watched: {synced}"
    );
    // The migration network alone is cut: the source answers the
    // neighbour solicitations, so dst does not take over.
    setup.hosts.migration.ip(&["link", "set", "to-src", "down"]);
    std::thread::sleep(Duration::from_secs(1));
    setup.hosts.migration.ip(&["link", "set", "to-src", "up"]);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(status(&setup.dst)["takeovers"], json!([]), "no takeover");
    // The cut lost mirror copies: the replica's gate waits for one that
    // never comes, its host says so, and it is made afresh (never left
    // stuck and reported in sync).
    let again = setup.src.wait_for_report(&replica, |r| {
        r["replica"]["state"] == "in_sync" && r["replica"]["resyncs"].as_u64() > Some(0)
    });
    println!("replica after the cut: {}", again["replica"]);
    assert_eq!(again["replica"]["state"], "in_sync", "{again}");
    std::thread::sleep(Duration::from_millis(300));

    // The source host stops: dst takes the service over.
    setup.stop_source_host();
    assert_taken_over(&setup, cps);
}
