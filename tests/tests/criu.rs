//! The CRIU driver against real CRIU 4.2.1 and a real stateful service.
use std::{
    net::UdpSocket,
    path::PathBuf,
    time::{Duration, Instant},
};

use dataplane_tests::{
    CPS_V4, ChainService, SERVICE_V4, TestHosts, chain, chain_state, kill_pid, sock, udp_payload,
};
use dataplane_user::criu::{
    Criu, CriuError, DumpRequest, ReqType, RestoreRequest, open_netns, stats,
};

fn images_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dataplane-criu-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Sends `count` inputs to the service at `addr` from inside `host`; returns the chain they make.
fn feed(host: &dataplane_tests::NetNs, addr: std::net::SocketAddr, count: u64) -> (u64, u64) {
    let socket = host.run(|| UdpSocket::bind(sock(SERVICE_V4, 0))).unwrap();
    let mut hash = 0;
    for i in 1..=count {
        let input = format!("input {i}");
        socket.send_to(input.as_bytes(), addr).unwrap();
        hash = chain(hash, input.as_bytes());
        // Paced, so the service's socket buffer never overflows.
        if i % 50 == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    (count, hash)
}

#[test]
fn criu_reports_its_version_and_features() {
    let criu = Criu::default();
    let version = criu.version().expect("criu swrk answers VERSION");
    assert!(
        (version.major_number, version.minor_number) >= (4, 2),
        "CRIU 4.2 or newer, got {}.{}",
        version.major_number,
        version.minor_number
    );
    let features = criu.features().expect("criu swrk answers FEATURE_CHECK");
    // CRIU answers the question explicitly (false here: no soft-dirty tracking).
    let mem_track = features.mem_track.expect("FEATURE_CHECK reports mem_track");
    println!("memory tracking (pre-dump possible): {mem_track}");
}

/// Dumps with `criu`, checking that CRIU's `post-dump` notification came.
fn dump_through_post_dump(criu: &Criu, dump: &DumpRequest) {
    let mut seen = Vec::new();
    criu.dump(dump, false, &mut |script| {
        seen.push(script.to_string());
        true
    })
    .unwrap_or_else(|e| panic!("dump: {e}\n{}", log(&dump.images_dir, "dump.log")));
    assert!(
        seen.iter().any(|s| s == "post-dump"),
        "notifications: {seen:?}"
    );
}

/// Restores the images in `dir` into `dst`'s network namespace; the
/// restored root's pid (panics with CRIU's errors if it fails).
fn restore_in_dst(criu: &Criu, hosts: &TestHosts, dir: &std::path::Path) -> u32 {
    let dst_net = open_netns(&hosts.dst.path()).unwrap();
    let restore = RestoreRequest {
        images_dir: dir.to_owned(),
        inherit: vec![("extnet".into(), &dst_net)],
    };
    criu.restore(&restore, &mut |_, _| true)
        .unwrap_or_else(|e| panic!("restore: {e}\n{}", log(dir, "restore.log")))
}

/// A `criu service` the test started, stopped on drop.
struct CriuService {
    child: std::process::Child,
    socket: PathBuf,
}

impl CriuService {
    fn start(name: &str) -> Self {
        let socket =
            std::env::temp_dir().join(format!("criu-service-{}-{name}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        let child = std::process::Command::new(dataplane_user::criu::DEFAULT_CRIU)
            .arg("service")
            .arg("--address")
            .arg(&socket)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start criu service");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !socket.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "criu service never listened"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child, socket }
    }
}

impl Drop for CriuService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

#[test]
fn a_criu_service_socket_dumps_and_swrk_restores_into_dst() {
    let service = CriuService::start("dump");
    let criu = Criu::default().with_service(&service.socket);
    let version = criu.version().expect("the service answers VERSION");
    assert!((version.major_number, version.minor_number) >= (4, 2));
    criu.features().expect("the service answers FEATURE_CHECK");

    let hosts = TestHosts::new("crsvc");
    let addr = sock(SERVICE_V4, 5000);
    let instance = ChainService::start(&hosts.src, addr);
    let fed = feed(&hosts.src, addr, 300);
    assert_eq!(chain_state(&hosts.src, addr), Some(fed));
    let dir = images_dir("service");
    dump_through_post_dump(&criu, &instance.dump_request(dir.clone(), true));
    assert_eq!(chain_state(&hosts.src, addr), Some(fed), "left running");

    // The restore hands CRIU dst's network namespace: swrk takes it.
    let pid = restore_in_dst(&criu, &hosts, &dir);
    assert_eq!(
        chain_state(&hosts.dst, addr),
        Some(fed),
        "the exact state in dst"
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
    let _ = std::fs::remove_dir_all(&dir);

    // A socket nobody serves: the error says so.
    drop(service);
    let gone = Criu::default().with_service(std::env::temp_dir().join("no-criu-service.sock"));
    let error = gone.version().expect_err("nobody serves that socket");
    assert!(matches!(error, CriuError::Service { .. }), "{error}");
}

#[test]
fn a_service_dumped_in_src_resumes_in_dst_with_its_exact_state() {
    let hosts = TestHosts::new("criu");
    let addr = sock(SERVICE_V4, 5000);
    let service = ChainService::start(&hosts.src, addr);
    let fed = feed(&hosts.src, addr, 500);
    // Every input reached the service before the dump: its queue is empty.
    assert_eq!(chain_state(&hosts.src, addr), Some(fed));

    let criu = Criu::default();
    let dir = images_dir("move");
    dump_through_post_dump(&criu, &service.dump_request(dir.clone(), false));
    let dumped = stats::dump(&dir).expect("stats-dump");
    assert!(
        dumped.pages_written > 0 && dumped.frozen_time > 0,
        "{dumped:?}"
    );
    assert_eq!(
        chain_state(&hosts.src, addr),
        None,
        "the source instance is gone after the dump"
    );

    let pid = restore_in_dst(&criu, &hosts, &dir);
    let restored = stats::restore(&dir).expect("stats-restore");
    println!(
        "dump: frozen {} us, {} pages; restore: {} us",
        dumped.frozen_time, dumped.pages_written, restored.restore_time
    );
    assert_eq!(
        chain_state(&hosts.dst, addr),
        Some(fed),
        "the restored state is the chain of every input"
    );
    let more = feed(&hosts.dst, addr, 10);
    let expected = (
        fed.0 + 10,
        (1..=10).fold(fed.1, |h, i| chain(h, format!("input {i}").as_bytes())),
    );
    assert_eq!(more.0, 10);
    assert_eq!(
        chain_state(&hosts.dst, addr),
        Some(expected),
        "and it keeps serving"
    );

    // The restored root is this process's child (rst_sibling): end and reap it.
    end_restored(pid);
    drop(service);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_restored_task_killed_before_criu_finishes_fails_the_restore_at_once() {
    let hosts = TestHosts::new("rdie");
    let addr = sock(SERVICE_V4, 5000);
    let service = ChainService::start(&hosts.src, addr);
    feed(&hosts.src, addr, 20);
    let criu = Criu::default();
    let dir = images_dir("rdie");
    dump_through_post_dump(&criu, &service.dump_request(dir.clone(), false));
    let dst_net = open_netns(&hosts.dst.path()).unwrap();
    let restore = RestoreRequest {
        images_dir: dir.clone(),
        inherit: vec![("extnet".into(), &dst_net)],
    };
    // At `post-restore` the tasks wait on CRIU to finish: kill the root
    // there. CRIU cannot see it die (it is not CRIU's child).
    let mut killed = None;
    let start = Instant::now();
    let error = criu
        .restore(&restore, &mut |script, pid| {
            if let ("post-restore", Some(pid)) = (script, pid) {
                kill_pid(pid.into());
                killed = Some(pid);
            }
            true
        })
        .expect_err("a restore whose task died");
    let took = start.elapsed();
    println!("after {took:?}: {error}");
    let pid = killed.expect("CRIU named the restored root at post-restore");
    assert!(
        matches!(error, CriuError::RestoredDied { pid: p } if p == pid),
        "{error}"
    );
    assert!(
        took < Duration::from_secs(5),
        "not CRIU's 60 s timeout: {took:?}"
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the dead root is reaped"
    );
    drop(service);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn criu_failures_name_the_request_and_the_cause() {
    let missing = Criu::new("/nonexistent/criu").version().unwrap_err();
    assert!(matches!(missing, CriuError::Spawn { .. }), "{missing}");
    assert!(
        missing.to_string().contains("cargo xtask setup"),
        "{missing}"
    );

    let dir = images_dir("nopid");
    // A pid that cannot exist (above pid_max).
    let dump = DumpRequest {
        pid: 4_194_305,
        images_dir: dir.clone(),
        ..Default::default()
    };
    let err = Criu::default()
        .dump(&dump, false, &mut |_| true)
        .unwrap_err();
    match &err {
        CriuError::Failed { request, log, .. } => {
            assert_eq!(*request, ReqType::Dump);
            assert!(log.ends_with("dump.log"), "{err}");
        }
        other => panic!("expected a failed dump, got {other}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_dump_whose_post_dump_notification_fails_leaves_the_source_serving() {
    let hosts = TestHosts::new("crb");
    let addr = sock(SERVICE_V4, 5000);
    let service = ChainService::start(&hosts.src, addr);
    let fed = feed(&hosts.src, addr, 50);
    assert_eq!(chain_state(&hosts.src, addr), Some(fed));
    let dir = images_dir("rollback");
    let dump = service.dump_request(dir.clone(), false);
    // Answering post-dump with failure is the rollback path: CRIU resumes the tree.
    let mut seen = Vec::new();
    let err = Criu::default()
        .dump(&dump, false, &mut |script| {
            seen.push(script.to_string());
            script != "post-dump"
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            CriuError::Failed {
                request: ReqType::Dump,
                ..
            }
        ),
        "{err}"
    );
    // CRIU still tells network-unlock as it cleans up after the refused post-dump.
    assert!(
        seen.iter().any(|s| s == "post-dump"),
        "failed at our answer: {seen:?}"
    );
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        chain_state(&hosts.src, addr),
        Some(fed),
        "the source still serves, state intact"
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", service.pid)).unwrap();
    assert!(!status.contains("State:\tT"), "not left stopped:\n{status}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Ends a restored service (this process's child, from rst_sibling) and reaps it.
fn end_restored(pid: u32) {
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    let _ = nix::sys::wait::waitpid(pid, None);
}

/// Prepares migration `id` on a link to a destination daemon, for a flow
/// from the CPS's port `cps_port` (its id `cps_port - 3990`): the daemon
/// takes images only for a prepared migration.
async fn prepare(
    link: &mut dataplane_user::peer::Link,
    id: &str,
    cps_port: u16,
) -> Result<serde_json::Value, dataplane_user::peer::PeerError> {
    let step: dataplane_user::migration::protocol::Step = serde_json::from_value(
        serde_json::json!({"step": "prepare", "migration": id, "service": id, "deadline_ms": 10_000,
            "flows": [{"cps": sock(CPS_V4, cps_port),
                "service": sock(SERVICE_V4, 5000)}]}),
    )
    .unwrap();
    dataplane_user::peer::migrate_step(link, &step).await
}

async fn abort(
    link: &mut dataplane_user::peer::Link,
) -> Result<serde_json::Value, dataplane_user::peer::PeerError> {
    let abort = dataplane_user::migration::protocol::Step::Abort;
    dataplane_user::peer::migrate_step(link, &abort).await
}

fn log(dir: &std::path::Path, name: &str) -> String {
    let text = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Error") || l.contains("rror ("))
        .collect();
    lines.join("\n")
}

/// The CPS sending inputs "tick N" every millisecond on a thread, until stopped.
struct Ticker {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl Ticker {
    fn start(hosts: &TestHosts) -> Self {
        let socket = hosts
            .cps
            .run(|| UdpSocket::bind(sock(CPS_V4, 4000)))
            .unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut n = 0;
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) && n < 100_000 {
                n += 1;
                socket
                    .send_to(format!("tick {n}").as_bytes(), sock(SERVICE_V4, 5000))
                    .unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
            n
        });
        Self { stop, thread }
    }

    /// Stops it; how many inputs it sent.
    fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Test hosts with a dataplane on src and a flow from the CPS's port 4000
/// to a service at port 5000: the service's address, and the flow's id.
fn src_with_flow(
    tag: &str,
) -> (
    TestHosts,
    dataplane_tests::Loaded,
    std::net::SocketAddr,
    u32,
) {
    let hosts = TestHosts::new(tag);
    let mut src = hosts.load_src();
    let addr = sock(SERVICE_V4, 5000);
    let key = dataplane_user::kernel::flow::udp(sock(CPS_V4, 4000), addr);
    let flow_id = src.dataplane.add_flow(key, 0).unwrap();
    (hosts, src, addr, flow_id)
}

/// Holds `flow_id` and waits until process `pid` has drained its socket: S.
fn hold(dataplane: &mut dataplane_user::kernel::loader::Dataplane, flow_id: u32, pid: u32) -> u64 {
    use dataplane_user::migration::hold;
    let position = hold::hold(dataplane, flow_id).unwrap();
    let start = std::time::Instant::now();
    let drained = hold::drain(pid, &mut || start.elapsed() > Duration::from_secs(2)).unwrap();
    assert!(drained, "process {pid} drained its socket");
    position.last_delivered
}

#[test]
fn a_checkpoint_holds_exactly_the_inputs_up_to_its_position_20_times() {
    use std::collections::BTreeMap;

    use dataplane_user::{kernel::loader::MAP_INPUTS, migration::hold};

    let (hosts, mut src, addr, flow_id) = src_with_flow("ckpt");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let mut log = dataplane_user::kernel::logs::LogReader::spawn(
        src.dataplane.open_log(MAP_INPUTS).unwrap(),
        1 << 16,
    )
    .unwrap();
    let mut payloads: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let criu = Criu::default();
    let dst_net = open_netns(&hosts.dst.path()).unwrap();
    for round in 1..=20 {
        let first = src.dataplane.sequence(flow_id).unwrap().last_seq + 1;
        let service = ChainService::start(&hosts.src, addr);
        let sender = Ticker::start(&hosts);
        std::thread::sleep(Duration::from_millis(30));

        let s = hold(&mut src.dataplane, flow_id, service.pid);
        let dir = images_dir(&format!("ckpt{round}"));
        let dump = service.dump_request(dir.clone(), false);
        criu.dump(&dump, false, &mut |_| true)
            .unwrap_or_else(|e| panic!("round {round}: dump: {e}"));
        std::thread::sleep(Duration::from_millis(5));
        sender.stop();
        let restore = RestoreRequest {
            images_dir: dir.clone(),
            inherit: vec![("extnet".into(), &dst_net)],
        };
        let pid = criu
            .restore(&restore, &mut |_, _| true)
            .unwrap_or_else(|e| panic!("round {round}: restore: {e}"));
        let state = chain_state(&hosts.dst, addr).expect("the restored service answers");

        // The log has every input of the round, held ones included.
        let last = src.dataplane.sequence(flow_id).unwrap().last_seq;
        runtime.block_on(async {
            while payloads.last_key_value().map_or(0, |(k, _)| *k) < last {
                let r = tokio::time::timeout(Duration::from_secs(5), log.next())
                    .await
                    .expect("log records");
                payloads.insert(r.header.seq, udp_payload(&r.frame));
            }
        });
        assert!(
            last > s,
            "round {round}: inputs after S={s} were held in the log (last {last})"
        );
        let expected = (first..=s).fold(0, |h, seq| chain(h, &payloads[&seq]));
        assert_eq!(
            state,
            (s - first + 1, expected),
            "round {round}: the image holds inputs {first}..={s} exactly"
        );

        end_restored(pid);
        hold::open(&mut src.dataplane, flow_id).unwrap();
        drop(service);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn images_travel_to_the_peer_daemon_checksummed_and_restore_there() {
    use dataplane_tests::DaemonProcess;
    use dataplane_user::{
        peer,
        peer::{PeerError, frame, transfer},
    };

    let hosts = TestHosts::new("xfer");
    let images_root = std::env::temp_dir().join(format!("dataplane-xfer-{}", std::process::id()));
    let config = format!(
        "interface = \"eth0\"\npeer_interface = \"peer0\"\npin_root = \"{}\"\ninput_ring_mib = 1\noutput_ring_mib = 1\n\
         peer_listen = \"198.51.100.2:7070\"\nimages_dir = \"{}\"\n{}",
        hosts.pin_root("dst").display(),
        images_root.display(),
        hosts.peer_config("dst", &[("src", "198.51.100.1:7070")]),
    );
    let dst = DaemonProcess::start(&hosts.dst, "xfer", &config);
    let addr = sock(SERVICE_V4, 5000);
    let service = ChainService::start(&hosts.src, addr);
    let fed = feed(&hosts.src, addr, 200);
    assert_eq!(chain_state(&hosts.src, addr), Some(fed));
    let dir = images_dir("xfer");
    let dump = service.dump_request(dir.clone(), false);
    Criu::default().dump(&dump, false, &mut |_| true).unwrap();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let peer_addr = "198.51.100.2:7070".parse().unwrap();
    let trust = hosts.trust("src", &[("dst", "198.51.100.2:7070")]);
    // The socket is made while connecting: the whole connect runs inside src.
    let (mut link, _) = hosts
        .src
        .run(|| runtime.block_on(peer::connect(&trust, peer_addr)))
        .unwrap();
    assert!(link.is_sealed());
    runtime.block_on(prepare(&mut link, "m1", 4000)).unwrap();
    let sent = runtime
        .block_on(transfer::send(&mut link, "m1", &dir))
        .unwrap();
    let on_disk: u64 = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert_eq!(sent.received.bytes, on_disk, "D counts every image byte");
    println!(
        "moved {} files, {} bytes in {:?}",
        sent.received.files, sent.received.bytes, sent.elapsed
    );
    let received = images_root.join("m1");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let entry = entry.unwrap();
        let copy = std::fs::read(received.join(entry.file_name())).unwrap();
        assert_eq!(
            copy,
            std::fs::read(entry.path()).unwrap(),
            "{:?} arrived intact",
            entry.file_name()
        );
    }

    // The destination restores from what it received.
    let pid = restore_in_dst(&Criu::default(), &hosts, &received);
    assert_eq!(
        chain_state(&hosts.dst, addr),
        Some(fed),
        "restored from the transferred images"
    );
    end_restored(pid);

    // A corrupted transfer is refused and leaves nothing half-written behind.
    runtime.block_on(abort(&mut link)).unwrap();
    runtime.block_on(prepare(&mut link, "m2", 4001)).unwrap();
    let refused: Result<(), PeerError> = runtime.block_on(async {
        link.send(frame::IMAGES, br#"{"migration":"m2"}"#).await?;
        let header = br#"{"name":"core-1.img","size":4}"#;
        link.send(frame::FILE, header).await?;
        link.send(frame::DATA, b"abcd").await?;
        link.send(frame::FILE_END, br#"{"sha256":"00"}"#).await?;
        link.send(frame::IMAGES_END, &[]).await?;
        match link.recv(4096).await? {
            (frame::REFUSE, reason) => {
                Err(PeerError::Refused(String::from_utf8_lossy(&reason).into()))
            }
            (other, _) => panic!("expected a refusal, got frame type {other}"),
        }
    });
    let refused = refused.unwrap_err().to_string();
    assert!(refused.contains("checksum mismatch"), "{refused}");
    assert!(!images_root.join("m2").exists() && !images_root.join("m2.partial").exists());
    runtime.block_on(abort(&mut link)).unwrap();
    drop((dst, service));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&images_root);
}

#[test]
fn a_corrupted_image_fails_the_restore_and_the_source_keeps_serving() {
    let hosts = TestHosts::new("corr");
    let addr = sock(SERVICE_V4, 5000);
    let service = ChainService::start(&hosts.src, addr);
    let fed = feed(&hosts.src, addr, 100);
    let dir = images_dir("corrupt");
    let dump = service.dump_request(dir.clone(), true);
    Criu::default().dump(&dump, false, &mut |_| true).unwrap();
    // Cut the memory image short, as a failed copy would.
    let pages = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("pages-")
        })
        .expect("a pages image");
    let len = std::fs::metadata(&pages).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pages)
        .unwrap()
        .set_len(len / 2)
        .unwrap();

    let dst_net = open_netns(&hosts.dst.path()).unwrap();
    let restore = RestoreRequest {
        images_dir: dir.clone(),
        inherit: vec![("extnet".into(), &dst_net)],
    };
    // CRIU 4.2.1 either fails on such an image or spins on it: the driver's
    // timeout stops it and removes the half-restored tasks.
    let criu = Criu::default().with_timeout(Duration::from_secs(5));
    let err = criu.restore(&restore, &mut |_, _| true).unwrap_err();
    match &err {
        CriuError::Failed { request, log, .. } | CriuError::Timeout { request, log, .. } => {
            assert_eq!(*request, ReqType::Restore, "{err}");
            assert!(log.ends_with("restore.log"), "{err}");
        }
        other => panic!("expected a failed restore, got {other}"),
    }
    let tid = nix::unistd::gettid();
    let children = std::fs::read_to_string(format!("/proc/self/task/{tid}/children")).unwrap();
    let stray: Vec<&str> = children
        .split_whitespace()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "criu")
        })
        .collect();
    assert!(stray.is_empty(), "no half-restored task is left: {stray:?}");
    assert_eq!(
        chain_state(&hosts.dst, addr),
        None,
        "nothing half-restored answers in dst"
    );
    assert_eq!(
        chain_state(&hosts.src, addr),
        Some(fed),
        "the source still serves, state intact"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_full_destination_disk_and_an_unreachable_peer_fail_the_transfer_cleanly() {
    use dataplane_tests::DaemonProcess;
    use dataplane_user::{
        peer,
        peer::{PeerError, transfer},
    };

    let hosts = TestHosts::new("full");
    // A 64 KiB tmpfs as the destination's image store: the images do not fit.
    let images_root = std::env::temp_dir().join(format!("dataplane-full-{}", std::process::id()));
    std::fs::create_dir_all(&images_root).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &images_root,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=64k"),
    )
    .expect("mount a small tmpfs");
    let config = format!(
        "interface = \"eth0\"\npeer_interface = \"peer0\"\npin_root = \"{}\"\ninput_ring_mib = 1\noutput_ring_mib = 1\n\
         peer_listen = \"198.51.100.2:7070\"\nimages_dir = \"{}\"\n{}",
        hosts.pin_root("dst").display(),
        images_root.display(),
        hosts.peer_config("dst", &[("src", "198.51.100.1:7070")]),
    );
    let dst = DaemonProcess::start(&hosts.dst, "full", &config);
    let addr = sock(SERVICE_V4, 5000);
    let service = ChainService::start(&hosts.src, addr);
    let fed = feed(&hosts.src, addr, 20);
    let dir = images_dir("full");
    let dump = service.dump_request(dir.clone(), true);
    Criu::default().dump(&dump, false, &mut |_| true).unwrap();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let trust = hosts.trust(
        "src",
        &[("dst", "198.51.100.2:7070"), ("none", "198.51.100.2:7071")],
    );
    let result = hosts.src.run(|| {
        runtime.block_on(async {
            let (mut link, _) = peer::connect(&trust, "198.51.100.2:7070".parse().unwrap()).await?;
            prepare(&mut link, "m1", 4000).await?;
            let sent = transfer::send(&mut link, "m1", &dir).await;
            // As the source does on any failure.
            abort(&mut link).await?;
            sent
        })
    });
    let err = result.unwrap_err().to_string();
    assert!(
        err.contains("No space left"),
        "the refusal names the cause: {err}"
    );
    // The journal's directory stays, empty.
    let left: Vec<_> = std::fs::read_dir(&images_root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|name| name != "journal")
        .collect();
    assert!(left.is_empty(), "nothing half-written is left: {left:?}");
    let journals = std::fs::read_dir(images_root.join("journal")).map_or(0, |d| d.count());
    assert_eq!(journals, 0, "the migration's journal went with it");

    // No daemon listens on this port of dst: the link fails at once, with the cause.
    let unreachable = hosts
        .src
        .run(|| runtime.block_on(peer::connect(&trust, "198.51.100.2:7071".parse().unwrap())));
    match unreachable {
        Err(PeerError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused),
        other => panic!("expected a refused connection, got {:?}", other.map(|_| ())),
    }
    assert_eq!(
        chain_state(&hosts.src, addr),
        Some(fed),
        "the source still serves"
    );
    drop((dst, service));
    nix::mount::umount(&images_root).unwrap();
    let _ = std::fs::remove_dir_all(&images_root);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn criu_killed_during_a_dump_leaves_the_source_serving() {
    let hosts = TestHosts::new("ckill");
    let addr = sock(SERVICE_V4, 5000);
    let service = ChainService::start(&hosts.src, addr);
    let fed = feed(&hosts.src, addr, 50);
    let dir = images_dir("killed");
    let dump = service.dump_request(dir.clone(), false);
    // At network-lock CRIU has seized and stopped the tree: kill CRIU there,
    // as an OOM killer or an admin's kill -9 would.
    let err = Criu::default()
        .dump(&dump, false, &mut |script| {
            if script == "network-lock" {
                let tid = nix::unistd::gettid();
                let children =
                    std::fs::read_to_string(format!("/proc/self/task/{tid}/children")).unwrap();
                for pid in children.split_whitespace() {
                    if std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .is_ok_and(|c| c.trim() == "criu")
                    {
                        let pid = nix::unistd::Pid::from_raw(pid.parse().unwrap());
                        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
                    }
                }
            }
            true
        })
        .unwrap_err();
    assert!(
        matches!(err, CriuError::Closed(ReqType::Dump) | CriuError::Socket(_)),
        "the error says CRIU went away during the dump: {err}"
    );
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        chain_state(&hosts.src, addr),
        Some(fed),
        "the source resumes and serves"
    );
    feed(&hosts.src, addr, 5);
    let after = chain_state(&hosts.src, addr).unwrap();
    assert_eq!(after.0, fed.0 + 5, "and keeps taking inputs");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The CPS feeding a service on src every millisecond through a flow, and
/// that flow's log: the ground of a leave-running checkpoint.
struct Fed {
    hosts: TestHosts,
    src: dataplane_tests::Loaded,
    addr: std::net::SocketAddr,
    flow_id: u32,
    runtime: tokio::runtime::Runtime,
    log: dataplane_user::kernel::logs::LogReader,
    service: ChainService,
    sender: Option<Ticker>,
}

impl Fed {
    fn start(tag: &str) -> Self {
        use dataplane_user::kernel::{loader::MAP_INPUTS, logs::LogReader};
        let (hosts, src, addr, flow_id) = src_with_flow(tag);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let log = {
            let _guard = runtime.enter();
            LogReader::spawn(src.dataplane.open_log(MAP_INPUTS).unwrap(), 1 << 16).unwrap()
        };
        let service = ChainService::start(&hosts.src, addr);
        let sender = Some(Ticker::start(&hosts));
        std::thread::sleep(Duration::from_millis(30));
        Self {
            hosts,
            src,
            addr,
            flow_id,
            runtime,
            log,
            service,
            sender,
        }
    }

    /// Holds the flow until the service has drained its socket: S.
    fn hold(&mut self) -> u64 {
        hold(&mut self.src.dataplane, self.flow_id, self.service.pid)
    }

    /// Gives the service the inputs held since `s` back, from a log that
    /// lost the records of `lost`; then opens the gate. The replay's
    /// outcome, and the held inputs the gate opened over.
    fn give_back(
        &mut self,
        s: u64,
        lost: std::ops::RangeInclusive<u64>,
    ) -> (Result<u64, String>, Option<std::ops::RangeInclusive<u64>>) {
        use dataplane_user::{kernel::injector::Injector, migration::hold};
        // Injection runs in the namespace of the interface it injects on.
        let mut injector = self
            .hosts
            .src
            .run(|| Injector::open(self.src.dataplane.pin_root(), "eth0"))
            .unwrap();
        let position = hold::FlowPosition {
            flow_id: self.flow_id,
            last_delivered: s,
        };
        let mut log = Losing {
            log: &mut self.log,
            lost,
        };
        let outcome = self.hosts.src.run(|| {
            self.runtime
                .block_on(hold::resume(
                    &mut self.src.dataplane,
                    position,
                    self.service.pid,
                    &mut injector,
                    &mut log,
                ))
                .map_err(|e| e.to_string())
        });
        let opened_over = hold::open(&mut self.src.dataplane, self.flow_id).unwrap();
        (outcome, opened_over)
    }

    /// Stops the CPS once the service has caught up: how many inputs it
    /// sent, each of them numbered.
    fn stop_cps(&mut self) -> u64 {
        std::thread::sleep(Duration::from_millis(30));
        let sent = self.sender.take().expect("the CPS runs").stop();
        std::thread::sleep(Duration::from_millis(20));
        let last = self.src.dataplane.sequence(self.flow_id).unwrap().last_seq;
        assert_eq!(last, sent, "every input the CPS sent was numbered");
        let counters = self.src.dataplane.counters().unwrap();
        assert_eq!(counters.get(dataplane_common::counter::RING_FULL), 0);
        sent
    }
}

/// The service's state after inputs `1..=upto` but those in `lost`.
fn ticks(upto: u64, lost: &std::ops::RangeInclusive<u64>) -> (u64, u64) {
    let taken: Vec<u64> = (1..=upto).filter(|n| !lost.contains(n)).collect();
    let hash = taken
        .iter()
        .fold(0, |h, n| chain(h, format!("tick {n}").as_bytes()));
    (taken.len() as u64, hash)
}

/// A log that lost the records of `lost`, as a daemon's reader that fell
/// behind loses them.
struct Losing<'a> {
    log: &'a mut dataplane_user::kernel::logs::LogReader,
    lost: std::ops::RangeInclusive<u64>,
}

impl dataplane_user::kernel::logs::Records for Losing<'_> {
    fn try_next(&mut self) -> Option<dataplane_user::kernel::logs::Record> {
        loop {
            let record = self.log.try_next()?;
            if !self.lost.contains(&record.header.seq) {
                return Some(record);
            }
        }
    }
    async fn next(&mut self) -> Option<dataplane_user::kernel::logs::Record> {
        loop {
            let record = self.log.next().await;
            if !self.lost.contains(&record.header.seq) {
                return Some(record);
            }
        }
    }
}

#[test]
fn leave_running_the_image_holds_inputs_up_to_s_and_the_primary_misses_none() {
    let mut fed = Fed::start("lrun");
    let s = fed.hold();
    let dir = images_dir("lrun");
    let dump = fed.service.dump_request(dir.clone(), true);
    let criu = Criu::default();
    criu.dump(&dump, false, &mut |_| true).unwrap();
    // The primary gets the inputs held during the checkpoint back, in order.
    // Numbers start at 1: nothing lost.
    let none = 0..=0;
    let (replayed, opened_over) = fed.give_back(s, none.clone());
    let replayed = replayed.unwrap();
    assert_eq!(opened_over, None, "the gate opened over no held input");
    let last = fed.stop_cps();
    assert!(
        replayed > 0,
        "inputs were held during the checkpoint and replayed"
    );
    assert_eq!(
        chain_state(&fed.hosts.src, fed.addr),
        Some(ticks(last, &none)),
        "the primary got every input once, in order"
    );

    let pid = restore_in_dst(&criu, &fed.hosts, &dir);
    assert_eq!(
        chain_state(&fed.hosts.dst, fed.addr),
        Some(ticks(s, &none)),
        "the image holds inputs 1..=S={s} exactly"
    );
    println!("S = {s}, replayed {replayed} held inputs to the primary, {last} inputs in all");
    end_restored(pid);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_gap_in_the_held_inputs_is_passed_over_named_and_every_other_input_given_back() {
    let mut fed = Fed::start("gap");
    let s = fed.hold();
    std::thread::sleep(Duration::from_millis(20));
    let lost = s + 3..=s + 5;
    let (outcome, opened_over) = fed.give_back(s, lost.clone());
    let last = fed.stop_cps();
    assert_eq!(
        outcome,
        Err(format!(
            "the instance did not get these inputs, and got every other one in order: inputs {} \
             to {} are not in the log",
            s + 3,
            s + 5
        ))
    );
    assert_eq!(opened_over, None, "the gate opened over no held input");
    assert_eq!(
        chain_state(&fed.hosts.src, fed.addr),
        Some(ticks(last, &lost)),
        "the instance got every input but the three lost, once each, in order"
    );
}
