//! Services in test hosts: the chain service and its state, starting a
//! workspace binary as a service, and looking at processes and datagrams.
use std::{net::SocketAddr, path::PathBuf, process::Command, time::Duration};

use crate::{
    container::{RuncContainer, Runtime},
    daemon::dataplane_bin,
    netns::NetNs,
    timing::realtime,
};

/// One step of the chain-service's state: FNV-1a 64 over the previous hash
/// and the input.
pub fn chain(hash: u64, input: &[u8]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01B3;
    hash.to_le_bytes()
        .iter()
        .chain(input)
        .fold(0xCBF2_9CE4_8422_2325, |h, &b| {
            (h ^ b as u64).wrapping_mul(PRIME)
        })
}

/// The command line a service `program` (a binary of this workspace) runs
/// with here: on the real-time CPU at the real-time priority, if any.
pub fn service_command(program: &str, args: &[&str]) -> Vec<String> {
    let exe = dataplane_bin().with_file_name(program);
    let mut command = realtime();
    command.push(exe.to_string_lossy().into_owned());
    command.extend(args.iter().map(|a| a.to_string()));
    command
}

/// A chain-service process in its own PID namespace inside a test host,
/// started as CRIU needs it (docs/migration.md): `nsenter --net` (no new mount
/// namespace) and `unshare --pid --fork`, or as a container. Killed on drop.
pub struct ChainService {
    runner: Runner,
    /// The service's pid, as this (the root) PID namespace sees it.
    pub pid: u32,
}

/// What runs a [`ChainService`].
enum Runner {
    /// The `unshare` process, whose only child the service is, and the
    /// service's working directory (removed on drop if empty).
    Unshare(std::process::Child, PathBuf),
    /// Held for its drop, which deletes it.
    Container(#[expect(dead_code, reason = "held for its drop")] RuncContainer),
}

impl ChainService {
    /// Starts the service on `addr` in `host`.
    pub fn start(host: &NetNs, addr: SocketAddr) -> Self {
        Self::spawn(host, "chain-service", &[&addr.to_string()], addr)
    }

    /// Starts `program` (a binary of this workspace) with `args` as a service
    /// on `addr` in `host`; it must answer "?" as the chain service does.
    pub fn spawn(host: &NetNs, program: &str, args: &[&str], addr: SocketAddr) -> Self {
        // A working directory of its own, as on a host of its own: CRIU
        // makes a directory there to dump it, and two services dumped at
        // once from one directory would meet.
        let cwd = PathBuf::from(format!(
            "/tmp/dataplane-test-{}-{}-{}",
            std::process::id(),
            host.name(),
            addr.port()
        ));
        std::fs::create_dir_all(&cwd).expect("the service's working directory");
        let unshare = Command::new("nsenter")
            .current_dir(&cwd)
            .arg(format!("--net={}", host.path().display()))
            .args(["unshare", "--pid", "--fork"])
            .args(service_command(program, args))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the chain service");
        let children = format!("/proc/{0}/task/{0}/children", unshare.id());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let pid = loop {
            let text = std::fs::read_to_string(&children).unwrap_or_default();
            if let Some(pid) = text.split_whitespace().next() {
                break pid.parse().expect("a pid");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the service did not start"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        let service = Self {
            runner: Runner::Unshare(unshare, cwd),
            pid,
        };
        // Ready once it answers: inputs sent before it binds would be lost.
        assert_eq!(chain_state(host, addr), Some((0, 0)), "the service answers");
        service
    }

    /// A handle on a service that runs as `container`.
    pub fn of(container: RuncContainer) -> Self {
        Self {
            pid: container.pid,
            runner: Runner::Container(container),
        }
    }

    /// Runs image `program` of `runtime` with `args` as container `id` in
    /// `host`, a service on `addr` as [`ChainService::spawn`] starts one.
    pub fn in_container(
        host: &NetNs,
        runtime: &Runtime,
        id: &str,
        (program, args): (&str, &[&str]),
        addr: SocketAddr,
    ) -> Self {
        let container = runtime
            .run(host, id, program, args)
            .expect("runc runs the service");
        // Where `spawn` starts a service; an ordinary task all the same:
        // a new cgroup has no real-time budget here (cpu.rt_runtime_us 0).
        if let Some((rt, _)) = crate::timing::cpu_split() {
            dataplane_user::host::tasks::pin(container.pid, &[rt]).expect("pin the container");
        }
        let service = Self::of(container);
        assert_eq!(chain_state(host, addr), Some((0, 0)), "the service answers");
        service
    }
}

impl ChainService {
    /// A CRIU dump of this service into `images_dir`, its network namespace
    /// an external (`extnet`) to be supplied on restore.
    pub fn dump_request(
        &self,
        images_dir: PathBuf,
        leave_running: bool,
    ) -> dataplane_user::criu::DumpRequest {
        let inode = dataplane_user::criu::netns_inode(self.pid).expect("the service's netns");
        dataplane_user::criu::DumpRequest {
            pid: self.pid,
            images_dir,
            leave_running,
            external: vec![format!("net[{inode}]:extnet")],
            ..Default::default()
        }
    }
}

impl Drop for ChainService {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        // A container goes with its own drop.
        if let Runner::Unshare(unshare, cwd) = &mut self.runner {
            let _ = unshare.kill();
            let _ = unshare.wait();
            let _ = std::fs::remove_dir(cwd);
        }
    }
}

/// Asks the chain service at `addr` in `host` for its state: (count,
/// hash). None if nothing there answers, or `host` does not hold the
/// address (a host that let go of a service after its migration).
pub fn chain_state(host: &NetNs, addr: SocketAddr) -> Option<(u64, u64)> {
    let socket = match host.run(|| std::net::UdpSocket::bind(SocketAddr::new(addr.ip(), 0))) {
        Ok(socket) => socket,
        Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => return None,
        Err(e) => panic!("bind a query socket: {e}"),
    };
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 64];
    for _ in 0..10 {
        socket.send_to(b"?", addr).expect("send a query");
        if let Ok(n) = socket.recv(&mut buf) {
            let text = std::str::from_utf8(&buf[..n]).ok()?;
            let (count, hash) = text.split_once(' ')?;
            return Some((count.parse().ok()?, u64::from_str_radix(hash, 16).ok()?));
        }
    }
    None
}

/// The UDP payload of an Ethernet frame from a log.
pub fn udp_payload(frame: &[u8]) -> Vec<u8> {
    match etherparse::SlicedPacket::from_ethernet(frame)
        .expect("a logged frame parses")
        .transport
    {
        Some(etherparse::TransportSlice::Udp(udp)) => udp.payload().to_vec(),
        other => panic!("logged frame is not UDP: {other:?}"),
    }
}

/// Counts what `socket` receives on a thread, until it is quiet for `quiet`.
pub fn count_datagrams(
    socket: std::net::UdpSocket,
    quiet: Duration,
) -> std::thread::JoinHandle<u64> {
    socket
        .set_read_timeout(Some(quiet))
        .expect("a read timeout");
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        let mut n = 0u64;
        while socket.recv(&mut buf).is_ok() {
            n += 1;
        }
        n
    })
}

/// Kills a restored instance (not our child: the destination daemon's).
pub fn kill_pid(pid: u64) {
    if pid != 0 {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Pids of running processes named `comm` (as /proc/PID/comm has it).
pub fn pids_named(comm: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|pid: &u32| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .collect()
}

/// Whether process `pid` lives in the network namespace of `host`.
pub fn in_netns(pid: u32, host: &NetNs) -> bool {
    in_netns_at(pid, &host.path())
}

/// Whether process `pid` runs in the network namespace bound at `path`.
pub fn in_netns_at(pid: u32, path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ours = std::fs::metadata(format!("/proc/{pid}/ns/net")).map(|m| m.ino());
    let theirs = std::fs::metadata(path).map(|m| m.ino());
    matches!((ours, theirs), (Ok(a), Ok(b)) if a == b)
}
