//! Services moving around a cell of three hosts (a, b, c), each with a
//! daemon that lists the two others: real kernel programs, real CRIU, real
//! processes, a CPS sending every 1 ms.
use std::time::{Duration, Instant};

use dataplane_tests::{CPS_V4, Cell, chain_state, cps_verdicts, sock};

fn assert_clean(verdict: &serde_json::Value) {
    for key in ["missed", "duplicates", "out_of_order", "wrong"] {
        assert_eq!(verdict[key], 0, "{key}: {verdict}");
    }
}

/// Asserts that service `name` is registered on host `on` (with the
/// instance `pid`, if given) and on no other host of `cell`.
fn assert_registered_only_on(cell: &Cell, name: &str, on: &str, pid: Option<u64>) {
    for host in dataplane_tests::CELL {
        let services = cell.services(host);
        let entry = services.iter().find(|s| s["name"] == name);
        match (host == on, entry) {
            (true, Some(s)) => {
                if let Some(pid) = pid {
                    assert_eq!(s["pid"], pid, "{name} on {host}: {s}");
                }
            }
            (true, None) => panic!("{name} is not registered on {host}: {services:?}"),
            (false, Some(s)) => panic!("{name} is still registered on {host}: {s}"),
            (false, None) => {}
        }
    }
}

/// Asserts that each of the four devices `cps` drives got every one of
/// its `cycles` inputs answered once, in order, correctly, and that the
/// controller at `service` on A took all of them.
fn assert_four_devices_served(
    cell: &Cell,
    cps: std::process::Child,
    service: std::net::SocketAddr,
    cycles: u64,
) {
    let verdicts = cps_verdicts(cps);
    println!("CPS: {verdicts:?}");
    assert_eq!(verdicts.len(), 4);
    verdicts.iter().for_each(assert_clean);
    assert_eq!(
        chain_state(cell.host("a"), service).map(|s| s.0),
        Some(4 * cycles)
    );
}

#[test]
fn a_service_goes_round_the_cell_with_each_daemon_killed_before_it_migrates() {
    // A -> B -> C -> A under one CPS run. Before each migration the
    // source's daemon is SIGKILLed and restarted: it finds the service in
    // its registry (the restored instance, on B and C) and migrates it on
    // with no manual step. Each host that hands the service on lets go of
    // it: no registration, no flow, no service address.
    let mut cell = Cell::new("round");
    let flow = (sock(CPS_V4, 4000), sock(dataplane_tests::SERVICE_V4, 5000));
    let _controller = cell.start_service("a", "markov", &[flow]);
    let cycles = 15_000;
    let cps = cell.start_cps(&[flow], cycles);
    let start = Instant::now();
    let mut pid = None;
    for (from, to) in [("a", "b"), ("b", "c"), ("c", "a")] {
        cell.kill_and_restart(from);
        assert_registered_only_on(&cell, "markov", from, pid);
        let id = cell.migrate("markov", from, to, "leave-running");
        let report = cell.wait(from, &id);
        println!("{from} -> {to}: {report}");
        assert_eq!(report["state"], "done", "{from} -> {to}: {report}");
        pid = report["destination_pid"].as_u64();
        assert_registered_only_on(&cell, "markov", to, pid);
        assert_eq!(
            cell.flows(from),
            Vec::<String>::new(),
            "{from} kept the flow"
        );
        assert!(!cell.holds(from, flow.1), "{from} kept the address");
        assert!(cell.holds(to, flow.1), "{to} lacks the address");
    }
    let elapsed = start.elapsed();
    let verdict = cps_verdicts(cps).swap_remove(0);
    println!("CPS: {verdict}");
    assert!(
        elapsed < Duration::from_millis(cycles - 500),
        "the migrations took {elapsed:?}, past the CPS's run: it proves less"
    );
    assert_clean(&verdict);
    // The instance on A took every input, through all three migrations.
    assert_eq!(
        chain_state(cell.host("a"), flow.1).map(|s| s.0),
        Some(cycles)
    );
}

#[test]
fn two_services_migrate_at_once_in_opposite_directions() {
    // "markov" goes from A to B while "other" goes from B to A: each host
    // is the source of one migration and the destination of the other,
    // both flows have id 0 where they start, and each destination gives
    // the arriving flow an id of its own.
    let cell = Cell::new("cross");
    let markov = (sock(CPS_V4, 4000), sock(dataplane_tests::SERVICE_V4, 5000));
    let other = (sock(CPS_V4, 4001), sock([192, 0, 2, 11], 5001));
    let _on_a = cell.start_service("a", "markov", &[markov]);
    let _on_b = cell.start_service("b", "other", &[other]);
    let cycles = 6_000;
    let cps = cell.start_cps(&[markov, other], cycles);
    let there = cell.migrate("markov", "a", "b", "leave-running");
    let back = cell.migrate("other", "b", "a", "leave-running");
    let (there, back) = (cell.wait("a", &there), cell.wait("b", &back));
    println!("markov a -> b: {there}\nother b -> a: {back}");
    assert_eq!(there["state"], "done", "{there}");
    assert_eq!(back["state"], "done", "{back}");
    let verdicts = cps_verdicts(cps);
    println!("CPS: {verdicts:?}");
    assert_eq!(verdicts.len(), 2);
    verdicts.iter().for_each(assert_clean);
    assert_registered_only_on(&cell, "markov", "b", there["destination_pid"].as_u64());
    assert_registered_only_on(&cell, "other", "a", back["destination_pid"].as_u64());
    assert_eq!(
        chain_state(cell.host("b"), markov.1).map(|s| s.0),
        Some(cycles)
    );
    assert_eq!(
        chain_state(cell.host("a"), other.1).map(|s| s.0),
        Some(cycles)
    );
}

#[test]
fn a_host_whose_migration_network_is_down_is_refused_at_prepare() {
    // The source's own interface on the migration network down: it
    // refuses before it asks anything of the destination. The
    // destination's down (its peer link, on the service network, still
    // up): the destination refuses at prepare. Either way the source
    // serves on, nothing is left on the destination, and once the network
    // is back the migration goes through.
    let cell = Cell::new("down");
    let flow = (sock(CPS_V4, 4000), sock(dataplane_tests::SERVICE_V4, 5000));
    let _controller = cell.start_service("a", "markov", &[flow]);
    let cycles = 5_000;
    let cps = cell.start_cps(&[flow], cycles);
    // Whose refusal it is: the destination's comes over the link.
    let refused = |to: &str, whose: &str, down: &dyn Fn(&str)| {
        down("down");
        let report = cell.wait("a", &cell.migrate("markov", "a", to, "leave-running"));
        down("up");
        println!("a -> {to}: {report}");
        assert_eq!(report["state"], "failed", "{report}");
        assert_eq!(report["phase"], "prepare", "{report}");
        let error = report["error"].as_str().unwrap_or_default();
        assert!(error.starts_with(whose), "{error}");
        assert!(error.contains("peer0, is down"), "{error}");
        assert_eq!(cell.flows(to), Vec::<String>::new(), "left on {to}");
    };
    // The kernel reports a carrier back within a second (linkwatch).
    let running = |host: &str| {
        let deadline = Instant::now() + Duration::from_secs(3);
        while !cell
            .host(host)
            .run(|| dataplane_user::host::netdev::Interface::by_name("peer0"))
            .is_ok_and(|i| i.running)
        {
            assert!(Instant::now() < deadline, "{host}'s peer0 is still down");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    refused("b", "prepare: this host's", &|state| {
        cell.host("a").ip(&["link", "set", "peer0", state])
    });
    running("a");
    refused("c", "prepare: destination: ", &|state| {
        cell.hosts.migration.ip(&["link", "set", "to-c", state])
    });
    running("c");
    assert_registered_only_on(&cell, "markov", "a", None);
    let report = cell.wait("a", &cell.migrate("markov", "a", "c", "leave-running"));
    assert_eq!(report["state"], "done", "{report}");
    let verdict = cps_verdicts(cps).swap_remove(0);
    println!("CPS: {verdict}");
    assert_clean(&verdict);
    assert_eq!(
        chain_state(cell.host("c"), flow.1).map(|s| s.0),
        Some(cycles)
    );
}

#[test]
fn a_controller_of_four_devices_goes_round_the_cell_taking_their_inputs_in_one_order() {
    // One controller reads four field devices (four flows, CPS ports
    // 4000-4003, to one socket), each sending every 1 ms. Its state steps
    // on every input, in the order its socket gives them, and each output
    // carries that state: a restored instance whose inputs came in another
    // interleaving than the source's answers differently, and never
    // converges. It goes A -> B -> C -> A; every input of every device is
    // answered once, in order, correctly.
    let cell = Cell::new("four");
    let service = sock(dataplane_tests::SERVICE_V4, 5000);
    let flows: Vec<_> = (0..4).map(|i| (sock(CPS_V4, 4000 + i), service)).collect();
    let _controller = cell.start_service("a", "plc", &flows);
    let cycles = 8_000;
    let cps = cell.start_cps(&flows, cycles);
    for (from, to) in [("a", "b"), ("b", "c"), ("c", "a")] {
        let report = cell.wait(from, &cell.migrate("plc", from, to, "leave-running"));
        println!("{from} -> {to}: {report}");
        assert_eq!(report["state"], "done", "{from} -> {to}: {report}");
        assert_registered_only_on(&cell, "plc", to, report["destination_pid"].as_u64());
        assert_eq!(cell.flows(from), Vec::<String>::new(), "{from} kept flows");
    }
    assert_four_devices_served(&cell, cps, service, cycles);
}

#[test]
fn a_service_the_daemon_starts_with_a_standby_migrates_with_nothing_built_by_hand() {
    // `service.start` on A: the daemon built A's standbys' namespace, link
    // and dataplane at its start, and now starts the controller and its
    // standby from one command, as CRIU needs them. The controller reads
    // four devices. It goes A -> B -> C -> A in standby mode: each time the
    // standby is checkpointed, and the host it arrives on seeds a standby
    // of its own from its serving instance, which the next migration
    // checkpoints. Each host registers it with the command it was started
    // with.
    let cell = Cell::new("start");
    let service = sock(dataplane_tests::SERVICE_V4, 5000);
    let flows: Vec<_> = (0..4).map(|i| (sock(CPS_V4, 4000 + i), service)).collect();

    // A command that cannot start leaves nothing behind.
    let failed = cell.daemon("a").client().call(
        "service.start",
        serde_json::json!({"name": "plc", "flows": dataplane_tests::flows_json(&flows), "standby": true,
            "command": ["/nonexistent/controller"]}),
    );
    let error = failed
        .expect_err("a missing program cannot start")
        .to_string();
    assert!(
        error.contains("/nonexistent/controller") || error.contains("plc"),
        "{error}"
    );
    assert!(cell.services("a").is_empty());
    assert_eq!(
        cell.flows("a"),
        Vec::<String>::new(),
        "flows added for it stay"
    );

    let started = cell.start_by_daemon("a", "plc", &flows, true);
    println!("started: {started}");
    let pid = started["pid"].as_u64().expect("a pid") as u32;
    let standby = started["standby_pid"].as_u64().expect("a standby") as u32;
    assert!(dataplane_tests::in_netns(pid, cell.host("a")));
    assert!(dataplane_tests::in_netns_at(
        standby,
        &cell.hosts.standby_netns("a")
    ));
    for process in [pid, standby] {
        let status = std::fs::read_to_string(format!("/proc/{process}/status")).unwrap();
        let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
        assert!(
            nspid.ends_with("\t1"),
            "PID 1 of its own namespace: {nspid}"
        );
    }
    let registered = cell.services("a");
    let command = registered[0]["command"].clone();
    assert!(
        command.as_array().is_some_and(|c| !c.is_empty()),
        "{registered:?}"
    );
    assert_eq!(registered[0]["standby_pid"], standby);

    let cycles = 10_000;
    let cps = cell.start_cps(&flows, cycles);
    for (from, to) in [("a", "b"), ("b", "c"), ("c", "a")] {
        let report = cell.wait(from, &cell.migrate("plc", from, to, "standby"));
        println!("{from} -> {to}: {report}");
        assert_eq!(report["state"], "done", "{from} -> {to}: {report}");
        assert_registered_only_on(&cell, "plc", to, report["destination_pid"].as_u64());
        let registered = cell.services(to).swap_remove(0);
        assert_eq!(registered["command"], command, "{to} keeps the command");
        let seeded = cell.wait_for_standby(to, "plc");
        println!("{to} seeded standby {seeded}");
        assert!(dataplane_tests::in_netns_at(
            seeded,
            &cell.hosts.standby_netns(to)
        ));
    }
    assert!(
        !dataplane_user::host::tasks::running(standby),
        "A's standby ended at the handover"
    );
    assert_four_devices_served(&cell, cps, service, cycles);
}

/// The JSON-RPC error code of a failed call.
fn rpc_code(
    outcome: Result<serde_json::Value, dataplane_user::control::client::ClientError>,
) -> i64 {
    match outcome {
        Err(dataplane_user::control::client::ClientError::Rpc(e)) => e.code,
        other => panic!("not an error reply: {other:?}"),
    }
}

#[test]
fn a_running_service_is_given_a_standby_seeded_from_it_while_it_serves() {
    // A controller started by hand and registered without a standby gets
    // one (`service.standby`) while the CPS runs: restored in A's standbys'
    // namespace from a leave-running checkpoint of the serving instance and
    // fed every later input. A standby-mode migration then checkpoints that
    // standby: exact, and the instance on B took every input. B seeds a
    // standby of its own.
    let cell = Cell::new("seed");
    let flow = (sock(CPS_V4, 4000), sock(dataplane_tests::SERVICE_V4, 5000));
    let _controller = cell.start_service("a", "markov", &[flow]);
    let mut client = cell.daemon("a").client();
    let unknown = client.call("service.standby", serde_json::json!({"name": "nope"}));
    assert_eq!(rpc_code(unknown), -32002);
    let cycles = 6_000;
    let cps = cell.start_cps(&[flow], cycles);
    let seeded = client
        .call("service.standby", serde_json::json!({"name": "markov"}))
        .expect("service.standby");
    println!("seeded: {seeded}");
    let standby = seeded["standby_pid"].as_u64().expect("a standby pid") as u32;
    assert!(dataplane_tests::in_netns_at(
        standby,
        &cell.hosts.standby_netns("a")
    ));
    assert_eq!(cell.services("a")[0]["standby_pid"], standby);
    let again = client.call("service.standby", serde_json::json!({"name": "markov"}));
    assert_eq!(rpc_code(again), -32003, "one standby at a time");
    std::thread::sleep(Duration::from_millis(500));
    let report = cell.wait("a", &cell.migrate("markov", "a", "b", "standby"));
    println!("a -> b: {report}");
    assert_eq!(report["state"], "done", "{report}");
    cell.wait_for_standby("b", "markov");
    let verdict = cps_verdicts(cps).swap_remove(0);
    println!("CPS: {verdict}");
    assert_clean(&verdict);
    assert_eq!(
        chain_state(cell.host("b"), flow.1).map(|s| s.0),
        Some(cycles)
    );
}
