//! Services run as OCI containers by runc or podman on the test hosts,
//! each host with a runtime of its own (runc state or podman storage, and
//! an image store), a container sharing its host's network namespace: the
//! way a container joins the service network the dataplane's NIC sees.
//! Real runc, real podman, real CRIU, real processes; the migrations keep
//! every guarantee a process's has.
use std::{os::unix::fs::MetadataExt, path::Path, time::Duration};

use dataplane_tests::{
    CPS_V4, ContainerStart, MigrationSetup, SERVICE_V4, TestHosts, cps_verdict, missing, sock,
};

/// Whether runc can run here; says why not (the test then skips). Under
/// CI, where `cargo xtask setup` has installed it, its absence fails.
fn runc_runs() -> bool {
    runs("runc")
}

/// Whether the runtimes `start` needs run here, as [`runc_runs`].
fn runtime_runs(start: ContainerStart) -> bool {
    runc_runs() && (start != ContainerStart::ByPodman || runs("podman"))
}

/// Whether `program` runs here, as [`runc_runs`].
fn runs(program: &str) -> bool {
    match missing(program) {
        None => true,
        Some(why) if std::env::var_os("CI").is_some() => panic!("{why}"),
        Some(why) => {
            eprintln!("skipped: {why}");
            false
        }
    }
}

#[test]
fn a_controller_in_a_runc_container_on_a_test_host_answers_the_cps() {
    if !runc_runs() {
        return;
    }
    let hosts = TestHosts::new("ctr");
    let runtime = dataplane_tests::Runtime::new("ctr", "src", false);
    runtime.install_image("markov-controller").unwrap();
    let service = sock(SERVICE_V4, 5000);
    let container = runtime
        .run(
            &hosts.src,
            "markov",
            "markov-controller",
            &[&service.to_string()],
        )
        .expect("runc runs the controller");
    assert_eq!(runtime.listed(), ["markov"]);
    assert_eq!(runtime.state(container.id()).unwrap()["status"], "running");
    // On the host's service network: the host's network namespace.
    let netns = |path: String| std::fs::metadata(path).expect("a netns").ino();
    assert_eq!(
        netns(format!("/proc/{}/ns/net", container.pid)),
        netns(hosts.src.path().display().to_string()),
    );
    let cps = hosts
        .cps_command(&[(sock(CPS_V4, 4000), service)], 1000, 1000)
        .spawn()
        .expect("the CPS simulator");
    let verdict = cps_verdict(cps);
    println!("CPS: {verdict}");
    assert_eq!(verdict["answered"], 1000, "{verdict}");
    assert_clean(&verdict);
}

/// The CPS got every answer exactly once, in order, right.
fn assert_clean(verdict: &serde_json::Value) {
    for key in ["missed", "duplicates", "out_of_order", "wrong"] {
        assert_eq!(verdict[key], 0, "{key}: {verdict}");
    }
}

/// A file in the container of process `pid`, as the host reads it.
fn container_file(pid: u64, path: &str) -> std::path::PathBuf {
    Path::new(&format!("/proc/{pid}/root")).join(path.trim_start_matches('/'))
}

/// Migrates the containerised controller of a fresh setup (its containers
/// started as `start` says) in `mode` while the CPS runs at 1 ms, and
/// checks what a container's migration must keep: every input answered
/// once, in order, right; the container known to dst's runtime (`runc
/// list`, `podman ps`) under the service's name, running, in dst's network
/// namespace, and gone from src's; the files it wrote (in its tmpfs) there
/// after.
fn migrate_a_container(tag: &str, mode: &str, start: ContainerStart) {
    if !runtime_runs(start) {
        return;
    }
    let standby = mode == "standby";
    let setup = MigrationSetup::containerised(tag, &[], (standby, start), true);
    let (src, dst) = setup.runtimes.as_ref().expect("container runtimes");
    let checkpointed = match &setup.standby {
        Some((_, standby, _)) => standby.pid,
        None => setup.controller.pid,
    };
    std::fs::write(
        container_file(checkpointed.into(), "/tmp/written-before"),
        "state kept in tmpfs",
    )
    .expect("write into the container's tmpfs");
    let (report, verdict) = setup.migrate_while_cps_runs(
        3000,
        Duration::from_millis(500),
        serde_json::json!({"mode": mode}),
    );
    println!("report: {report}\nCPS: {verdict}");
    assert_eq!(report["state"], "done", "{report:#}\n{}", setup.src.log());
    assert_eq!(verdict["answered"], 3000, "{verdict}");
    assert_clean(&verdict);
    // dst's runtime runs it under the service's name; src's knows none.
    assert_eq!(dst.listed(), ["markov"], "{}", setup.dst.log());
    let state = dst.state("markov").unwrap();
    assert_eq!(state["status"], "running", "{state}");
    let pid = state["pid"].as_u64().unwrap();
    assert_eq!(report["destination_pid"].as_u64(), Some(pid), "{report}");
    let netns = |path: &Path| std::fs::metadata(path).expect("a netns").ino();
    assert_eq!(
        netns(Path::new(&format!("/proc/{pid}/ns/net"))),
        netns(&setup.hosts.dst.path())
    );
    assert_eq!(
        src.wait_listed(&[]),
        Vec::<String>::new(),
        "{}",
        setup.src.log()
    );
    let written = std::fs::read_to_string(container_file(pid, "/tmp/written-before"));
    assert_eq!(written.as_deref().ok(), Some("state kept in tmpfs"));
    // Registered there as a container: a migration on starts from it.
    let services = setup
        .dst
        .client()
        .call("service.list", serde_json::json!({}));
    let services = services.expect("service.list");
    assert_eq!(services[0]["container"], "markov", "{services}");
    assert_eq!(services[0]["runtime"], src.name(), "{services}");
    assert_eq!(services[0]["pid"].as_u64(), Some(pid), "{services}");
}

#[test]
fn a_containerised_controller_migrates_leaving_it_running_and_keeps_every_guarantee() {
    migrate_a_container("ctlr", "leave-running", ContainerStart::ByRunc);
}

#[test]
fn a_containerised_controller_the_daemon_started_migrates_from_its_standby_container() {
    migrate_a_container("ctsb", "standby", ContainerStart::ByDaemon);
}

#[test]
fn a_podman_container_migrates_leaving_it_running_and_podman_knows_it_on_dst() {
    migrate_a_container("cplr", "leave-running", ContainerStart::ByPodman);
}

#[test]
fn a_podman_container_migrates_from_its_standby_container() {
    migrate_a_container("cpsb", "standby", ContainerStart::ByPodman);
}

/// Migrates the containerised controller of a fresh setup (containers
/// started as `start` says) whose dst has `image` ("none", or "broken":
/// without the C library the controller links) while the CPS runs; the migration must
/// fail with `error`, the source's container serve on, and dst keep
/// nothing.
fn fail_for_the_image(tag: &str, start: ContainerStart, image: &str, error: &str) {
    let setup = MigrationSetup::containerised(tag, &[], (false, start), image != "none");
    let (src, dst) = setup.runtimes.as_ref().expect("container runtimes");
    if image == "broken" {
        // The runtime still starts the binary's container; CRIU cannot
        // map the library the dumped process has mapped.
        let libc = dst
            .images
            .join("markov-controller/lib/x86_64-linux-gnu/libc.so.6");
        std::fs::remove_file(libc).expect("remove libc from dst's image");
    }
    let (report, verdict) =
        setup.migrate_while_cps_runs(1500, Duration::from_millis(300), serde_json::json!({}));
    println!("report: {report}\nCPS: {verdict}");
    assert_eq!(report["state"], "failed", "{report:#}");
    let said = report["error"].as_str().unwrap_or_default();
    assert!(said.contains(error), "{said}");
    assert_eq!(verdict["answered"], 1500, "{verdict}");
    assert_clean(&verdict);
    assert_eq!(src.listed(), ["markov"]);
    assert_eq!(src.state("markov").unwrap()["status"], "running");
    assert_eq!(dst.listed(), Vec::<String>::new(), "{}", setup.dst.log());
    let bundle = dst.services_dir().join("markov");
    assert!(!bundle.exists(), "{} is left", bundle.display());
    assert_eq!(setup.left_on_dst(), Vec::<String>::new());
}

#[test]
fn a_container_whose_image_dst_lacks_is_refused_before_the_hold_and_keeps_serving() {
    if runc_runs() {
        fail_for_the_image(
            "ctim",
            ContainerStart::ByRunc,
            "none",
            "the image is not on this host",
        );
    }
}

#[test]
fn a_container_whose_restore_fails_on_dst_rolls_back_and_keeps_serving() {
    if runc_runs() {
        fail_for_the_image("ctbr", ContainerStart::ByRunc, "broken", "runc restore");
    }
}

#[test]
fn a_podman_container_whose_restore_fails_on_dst_rolls_back_and_keeps_serving() {
    if runtime_runs(ContainerStart::ByPodman) {
        fail_for_the_image(
            "cpbr",
            ContainerStart::ByPodman,
            "broken",
            "podman container restore",
        );
    }
}

#[test]
fn a_containerised_controller_gets_a_hot_replica_container_and_is_handed_over_to_it() {
    hand_over_to_a_replica_container("ctrp", ContainerStart::ByRunc);
}

#[test]
fn a_podman_container_gets_a_hot_replica_container_and_is_handed_over_to_it() {
    hand_over_to_a_replica_container("cprp", ContainerStart::ByPodman);
}

/// Makes a hot replica of the containerised controller of a fresh setup
/// (its container started as `start` says) while the CPS runs, and hands
/// over to it: every input answered exactly once, the replica a container
/// of dst's runtime, gone from src's.
fn hand_over_to_a_replica_container(tag: &str, start: ContainerStart) {
    if !runtime_runs(start) {
        return;
    }
    let setup = MigrationSetup::containerised(tag, &[], (false, start), true);
    let (src, dst) = setup.runtimes.as_ref().expect("container runtimes");
    let cycles = 4000;
    let cps = setup.start_cps(cycles, 1000, None);
    std::thread::sleep(Duration::from_millis(300));
    let replica = setup.replicate(serde_json::json!({}));
    let synced = setup.wait_in_sync(&replica);
    assert_eq!(
        synced["replica"]["state"],
        "in_sync",
        "{synced}\n{}",
        setup.dst.log()
    );
    // The replica is a container of dst's runtime, beside src's serving one.
    assert_eq!(dst.listed(), ["markov"], "{}", setup.dst.log());
    assert_eq!(src.listed(), ["markov"]);
    std::thread::sleep(Duration::from_millis(500));
    let report = setup.wait(&setup.migrate(serde_json::json!({})));
    let verdict = cps_verdict(cps);
    println!("handover: {report}\nCPS: {verdict}");
    assert_eq!(report["state"], "done", "{report:#}\n{}", setup.src.log());
    assert_eq!(report["from_replica"], replica.as_str());
    assert_eq!(verdict["answered"], cycles, "{verdict}");
    assert_clean(&verdict);
    assert_eq!(
        dataplane_tests::chain_state(&setup.hosts.dst, setup.service).map(|s| s.0),
        Some(cycles),
        "the replica took every input"
    );
    assert_eq!(dst.state("markov").unwrap()["status"], "running");
    assert_eq!(
        src.wait_listed(&[]),
        Vec::<String>::new(),
        "{}",
        setup.src.log()
    );
}

#[test]
fn a_container_that_cannot_migrate_is_refused_by_name_and_the_daemon_serves_on() {
    if !runc_runs() {
        return;
    }
    let setup = MigrationSetup::containerised("ctrf", &[], (false, ContainerStart::ByRunc), true);
    let (src, _) = setup.runtimes.as_ref().expect("container runtimes");
    let flow = serde_json::json!([{"cps": "192.0.2.1:4100", "service": "192.0.2.10:5100"}]);
    let refused = |method: &str, params: serde_json::Value| {
        let mut c = setup.src.client();
        match c.call(method, params.clone()) {
            Err(dataplane_user::control::client::ClientError::Rpc(e)) => (e.code, e.message),
            other => panic!("{method} {params}: {other:?}"),
        }
    };
    let cases = [
        (
            serde_json::json!({"name": "x", "container": "nosuch", "flows": flow}),
            -32002,
            "container nosuch",
        ),
        (
            serde_json::json!({"name": "x", "container": "markov", "pid": 1, "flows": flow}),
            -32602,
            "not 1",
        ),
        (
            serde_json::json!({"name": "x", "standby_container": "markov", "flows": flow}),
            -32602,
            "needs a container",
        ),
        (
            serde_json::json!({"name": "x", "flows": flow}),
            -32602,
            "a pid or a container",
        ),
    ];
    for (params, code, says) in cases {
        let (got, message) = refused("service.register", params.clone());
        assert_eq!(got, code, "{params}: {message}");
        assert!(message.contains(says), "{params}: {message}");
    }
    // An image that is not a plain name in the store starts nothing.
    let start = serde_json::json!({"name": "x", "flows": flow, "image": "../markov-controller",
        "command": ["/bin/markov-controller", "192.0.2.10:5100"]});
    let (got, message) = refused("service.start", start);
    assert_eq!(got, -32603, "{message}");
    assert!(message.contains("image is not on this host"), "{message}");
    assert_eq!(src.listed(), ["markov"]);
    let services = setup
        .src
        .client()
        .call("service.list", serde_json::json!({}));
    assert_eq!(
        services
            .expect("the daemon serves on")
            .as_array()
            .map(Vec::len),
        Some(1)
    );
}

#[test]
fn a_restored_container_that_does_not_converge_is_deleted_and_the_source_serves_on() {
    if !runc_runs() {
        return;
    }
    let setup = MigrationSetup::containerised("ctnc", &[], (false, ContainerStart::ByRunc), true);
    let (src, dst) = setup.runtimes.as_ref().expect("container runtimes");
    // More matches than the deadline allows: restored, then rolled back.
    let (report, verdict) = setup.migrate_while_cps_runs(
        2000,
        Duration::from_millis(300),
        serde_json::json!({"converge": 100000, "deadline_ms": 300}),
    );
    println!("report: {report}\nCPS: {verdict}");
    assert_eq!(report["state"], "failed", "{report:#}");
    assert!(
        report["destination_pid"].as_u64() > Some(0),
        "restored first: {report}"
    );
    assert_eq!(report["phase"], "converge", "{report:#}");
    assert_eq!(verdict["answered"], 2000, "{verdict}");
    assert_clean(&verdict);
    assert_eq!(src.listed(), ["markov"]);
    assert_eq!(
        dst.wait_listed(&[]),
        Vec::<String>::new(),
        "{}",
        setup.dst.log()
    );
    assert!(!dst.services_dir().join("markov").exists());
    assert_eq!(setup.left_on_dst(), Vec::<String>::new());
}

#[test]
fn a_hot_replica_container_takes_over_when_the_source_host_stops() {
    if !runc_runs() {
        return;
    }
    let mut setup =
        MigrationSetup::containerised("ctfo", &[], (false, ContainerStart::ByRunc), true);
    // The inputs sent to the stopped host reached no instance: the
    // replica's chain may skip those (and only those) cycles.
    let cps = setup.start_cps_with(3000, 1000, &["--skips"]);
    std::thread::sleep(Duration::from_millis(300));
    let replica = setup.replicate(serde_json::json!({}));
    let synced = setup.wait_in_sync(&replica);
    assert_eq!(synced["replica"]["state"], "in_sync", "{synced}");
    std::thread::sleep(Duration::from_millis(500));
    setup.stop_source_host();
    let verdict = cps_verdict(cps);
    let status = setup.dst.client().call("status", serde_json::json!({}));
    let status = status.expect("status");
    println!("CPS: {verdict}\ntakeovers: {}", status["takeovers"]);
    assert_eq!(status["takeovers"][0]["service"], "markov", "{status}");
    assert_eq!(status["takeovers"][0]["error"], serde_json::Value::Null);
    for key in ["duplicates", "out_of_order", "wrong"] {
        assert_eq!(verdict[key], 0, "{key}: {verdict}");
    }
    let silent_ms = status["takeovers"][0]["silent_us"].as_u64().unwrap() / 1000;
    assert!(
        verdict["missed"].as_u64().unwrap() <= silent_ms + 10,
        "{verdict}"
    );
    // The replica serves as dst's container, registered as one.
    let (_, dst) = setup.runtimes.as_ref().expect("container runtimes");
    assert_eq!(dst.listed(), ["markov"]);
    assert_eq!(dst.state("markov").unwrap()["status"], "running");
    let services = setup
        .dst
        .client()
        .call("service.list", serde_json::json!({}));
    assert_eq!(services.expect("service.list")[0]["container"], "markov");
}
