//! The `dataplane` CLI loads, survives its own exit, and unloads cleanly.
use aya::programs::{SchedClassifier, TcAttachType};
use dataplane_tests::{TestHosts, dataplane_bin};

fn attached(hosts: &TestHosts, iface: &str) -> (bool, usize) {
    let link = hosts.src.exec("ip", &["link", "show", iface]);
    let tcx = hosts.src.run(|| {
        [TcAttachType::Ingress, TcAttachType::Egress]
            .into_iter()
            .map(|hook| {
                SchedClassifier::query_tcx(iface, hook)
                    .expect("query tcx")
                    .1
                    .len()
            })
            .sum()
    });
    (link.contains("xdp"), tcx)
}

#[test]
fn load_outlives_the_cli_and_unload_leaves_nothing_behind() {
    let hosts = TestHosts::new("unl");
    let root = hosts.pin_root("src");
    let bin = dataplane_bin();
    let (bin, root_arg) = (bin.to_str().unwrap(), root.to_str().unwrap());
    hosts.src.exec(
        bin,
        &[
            "--pin-root",
            root_arg,
            "load",
            "--interface",
            "eth0",
            "--peer-interface",
            "peer0",
        ],
    );
    assert_eq!(
        attached(&hosts, "eth0"),
        (true, 2),
        "xdp, tc ingress and egress on eth0"
    );
    assert_eq!(
        attached(&hosts, "peer0"),
        (true, 1),
        "xdp and tc egress on peer0"
    );
    let adopted =
        dataplane_user::kernel::loader::Dataplane::open(&root).expect("the pins outlive the CLI");
    assert_eq!(adopted.attached_programs().unwrap().len(), 5);
    drop(adopted);

    hosts.src.exec(bin, &["--pin-root", root_arg, "unload"]);
    assert!(!root.exists(), "no pin left at {}", root.display());
    assert_eq!(attached(&hosts, "eth0"), (false, 0));
    assert_eq!(attached(&hosts, "peer0"), (false, 0));
}

#[test]
fn a_failed_load_leaves_nothing_behind() {
    let hosts = TestHosts::new("fail");
    let options = dataplane_user::kernel::loader::LoadOptions {
        pin_root: hosts.pin_root("src"),
        peer_interface: Some("no-such-if".into()),
        ..dataplane_user::kernel::loader::LoadOptions::new("eth0")
    };
    let err = hosts
        .src
        .run(|| dataplane_user::kernel::loader::Dataplane::load(&options))
        .err();
    let err = err
        .expect("loading with a missing peer interface fails")
        .to_string();
    assert!(
        err.contains("no-such-if"),
        "the error names the interface: {err}"
    );
    assert!(!options.pin_root.exists(), "nothing pinned");
    assert_eq!(attached(&hosts, "eth0"), (false, 0), "nothing attached");
}
