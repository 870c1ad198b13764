//! Services run as OCI containers by runc on the test hosts, sharing a
//! host's network namespace: the way a container joins the service
//! network that the dataplane's NIC sees. Real runc, real processes.
use std::os::unix::fs::MetadataExt;

use dataplane_tests::{CPS_V4, RuncContainer, SERVICE_V4, TestHosts, cps_verdict, sock};

/// Whether runc is installed (`cargo xtask setup` installs it).
fn runc_installed() -> bool {
    std::process::Command::new("runc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn a_controller_in_a_runc_container_on_a_test_host_answers_the_cps() {
    if !runc_installed() {
        eprintln!("skipped: runc is not installed (cargo xtask setup installs it)");
        return;
    }
    let hosts = TestHosts::new("ctr");
    let service = sock(SERVICE_V4, 5000);
    let container = RuncContainer::run(
        &hosts.src,
        "markov",
        "markov-controller",
        &[&service.to_string()],
    )
    .expect("runc runs the controller");
    assert_eq!(container.listed().unwrap(), ["markov"]);
    assert_eq!(container.state().unwrap()["status"], "running");
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
    for key in ["missed", "duplicates", "out_of_order", "wrong"] {
        assert_eq!(verdict[key], 0, "{key}: {verdict}");
    }
}
