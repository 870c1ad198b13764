//! Test hosts made of network namespaces and veth pairs, used by every
//! integration test and by the demo.
//!
//! ```text
//!   cps netns: br0 192.0.2.1/24 2001:db8::1/64 ── ports to-src, to-dst
//!   src netns: eth0 192.0.2.10 2001:db8::10 (the service address)   peer0 198.51.100.1 ──┐
//!   dst netns: eth0 192.0.2.20 2001:db8::20, service address on lo  peer0 198.51.100.2 ──┘
//! ```
//!
//! `dst` holds the service address on `lo` and ignores ARP for it on eth0,
//! so the CPS reaches `src` until a cutover moves the address. Names carry
//! the process id, so test runs never collide; everything is removed on drop.
use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use dataplane_user::kernel::{
    loader::{Dataplane, LoadOptions, MAP_INPUTS, MirrorMode},
    logs::{LogReader, Record},
};

/// The CPS's IPv4 address.
pub const CPS_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The service's IPv4 address, on `src` and (on lo) on `dst`.
pub const SERVICE_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// The CPS's IPv6 address.
pub const CPS_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// The service's IPv6 address.
pub const SERVICE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);

/// Runs `ip` with `args`, panicking with its output when it fails.
pub fn ip(args: &[&str]) {
    run("ip", args);
}

/// Runs `program` with `args`, panicking with its output when it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace, deleted on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace `name` with its loopback up.
    pub fn new(name: &str) -> Self {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ip(&["netns", "add", name]);
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        // Interfaces made here skip duplicate address detection: a new
        // host's link-local addresses would otherwise stay tentative for a
        // second or two, and neighbour discovery (which sends from them)
        // fail meanwhile, unlike on a host that has been up a while.
        for scope in ["all", "default"] {
            ns.sysctl(&format!("net.ipv6.conf.{scope}.accept_dad"), "0");
        }
        ns
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its bind-mounted file, for `nsenter --net=`.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs `ip -n <ns> args`.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// Sets an IPv4/IPv6 sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        run(
            "nsenter",
            &[
                &format!("--net={}", self.path().display()),
                "sysctl",
                "-qw",
                &format!("{key}={value}"),
            ],
        );
    }

    /// Runs `f` on this thread inside the namespace (sockets it opens stay
    /// there), then returns the thread to the namespace it was in.
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        let _entered = Entered::new(&self.path());
        f()
    }

    /// Runs a command inside the namespace with `nsenter --net` (no new mount
    /// namespace, unlike `ip netns exec`) and returns its stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        let net = format!("--net={}", self.path().display());
        let mut all = vec![net.as_str(), program];
        all.extend_from_slice(args);
        run("nsenter", &all)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// This thread inside another network namespace; back where it was on drop.
/// setns changes only the calling thread, so this guard is !Send.
struct Entered {
    previous: File,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Entered {
    fn new(target: &Path) -> Self {
        let previous = File::open("/proc/thread-self/ns/net").expect("open own netns");
        let target =
            File::open(target).unwrap_or_else(|e| panic!("open {}: {e}", target.display()));
        nix::sched::setns(target.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("setns into the test namespace");
        Self {
            previous,
            _not_send: std::marker::PhantomData,
        }
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        nix::sched::setns(self.previous.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("setns back");
    }
}

/// The three test hosts and their links.
pub struct TestHosts {
    pub cps: NetNs,
    pub src: NetNs,
    pub dst: NetNs,
    tag: String,
}

impl TestHosts {
    /// Builds the hosts; `tag` keeps names apart between tests of one process.
    pub fn new(tag: &str) -> Self {
        let tag = format!("dp{}{tag}", std::process::id());
        let hosts = Self {
            cps: NetNs::new(&format!("{tag}-cps")),
            src: NetNs::new(&format!("{tag}-src")),
            dst: NetNs::new(&format!("{tag}-dst")),
            tag,
        };
        hosts.wire();
        hosts
    }

    fn wire(&self) {
        let (cps, src, dst) = (self.cps.name(), self.src.name(), self.dst.name());
        self.cps.ip(&["link", "add", "br0", "type", "bridge"]);
        for (port, host) in [("to-src", src), ("to-dst", dst)] {
            ip(&[
                "link", "add", port, "netns", cps, "type", "veth", "peer", "name", "eth0", "netns",
                host,
            ]);
            self.cps.ip(&["link", "set", port, "master", "br0", "up"]);
        }
        ip(&[
            "link", "add", "peer0", "netns", src, "type", "veth", "peer", "name", "peer0", "netns",
            dst,
        ]);
        self.cps.ip(&["link", "set", "br0", "up"]);
        self.cps.ip(&["addr", "add", "192.0.2.1/24", "dev", "br0"]);
        self.cps
            .ip(&["addr", "add", "2001:db8::1/64", "dev", "br0", "nodad"]);
        self.src
            .ip(&["addr", "add", "192.0.2.10/24", "dev", "eth0"]);
        self.src
            .ip(&["addr", "add", "2001:db8::10/64", "dev", "eth0", "nodad"]);
        self.src
            .ip(&["addr", "add", "198.51.100.1/24", "dev", "peer0"]);
        self.dst
            .ip(&["addr", "add", "192.0.2.20/24", "dev", "eth0"]);
        self.dst
            .ip(&["addr", "add", "2001:db8::20/64", "dev", "eth0", "nodad"]);
        self.dst.ip(&["addr", "add", "192.0.2.10/32", "dev", "lo"]);
        self.dst
            .ip(&["addr", "add", "2001:db8::10/128", "dev", "lo", "nodad"]);
        self.dst
            .ip(&["addr", "add", "198.51.100.2/24", "dev", "peer0"]);
        // Mirror frames carry 46 bytes (50 with a VLAN tag) around a full-size input.
        for host in [&self.src, &self.dst] {
            host.ip(&["link", "set", "peer0", "mtu", "1600", "up"]);
            host.ip(&["link", "set", "eth0", "up"]);
            // A veth has no queue: when the image transfer fills its peer's
            // ring, a mirror copy cloned onto it is dropped. With a qdisc
            // the veth pushes back (Linux 6.15 and later) and the copy waits.
            run(
                "nsenter",
                &[
                    &format!("--net={}", host.path().display()),
                    "tc",
                    "qdisc",
                    "replace",
                    "dev",
                    "peer0",
                    "root",
                    "pfifo",
                    "limit",
                    "10000",
                ],
            );
        }
        // A field device puts real checksums on the wire. A sender on this
        // machine leaves them to a checksum offload that veth never performs,
        // which only works while the skb's checksum state travels with it.
        for iface in ["br0", "to-src", "to-dst"] {
            self.cps.exec("ethtool", &["-K", iface, "tx", "off"]);
        }
        // Only src answers ARP for the service address, and dst never
        // announces it (its ARP requests name its own address) before a
        // migration's cutover does.
        self.dst.sysctl("net.ipv4.conf.eth0.arp_ignore", "1");
        self.dst.sysctl("net.ipv4.conf.eth0.arp_announce", "2");
        // Mirrored inputs from the CPS arrive on peer0, not on the CPS's subnet.
        for key in ["all", "default", "peer0", "eth0"] {
            self.dst
                .sysctl(&format!("net.ipv4.conf.{key}.rp_filter"), "0");
        }
    }

    /// The CPS simulator on `cps`, at the real-time priority, driving every
    /// flow of `flows` (each cycle sends an input on each): `count` inputs
    /// every `period_us`, its verdicts on stdout (see `cps_verdicts`).
    pub fn cps_command(&self, flows: &[Flow], count: u64, period_us: u64) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", self.cps.path().display()))
            .args(realtime())
            .arg(dataplane_bin().with_file_name("cps-sim"));
        for (cps, service) in flows {
            command
                .args(["--to", &service.to_string()])
                .args(["--bind", &cps.to_string()]);
        }
        command
            .args(["--count", &count.to_string()])
            .args(["--period-us", &period_us.to_string()])
            .stdout(std::process::Stdio::piped());
        command
    }

    /// A standby host inside `src`: a namespace linked to it by the veth
    /// stby0 (src) / eth0 (standby) with the service address, whose outputs
    /// go nowhere (its dataplane mutes them).
    pub fn add_standby(&self) -> NetNs {
        let ns = NetNs::new(&format!("{}-stb", self.tag));
        ip(&[
            "link",
            "add",
            "stby0",
            "netns",
            self.src.name(),
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ]);
        self.src.ip(&["link", "set", "stby0", "mtu", "1600", "up"]);
        ns.ip(&["link", "set", "eth0", "mtu", "1600", "up"]);
        ns.ip(&["addr", "add", "192.0.2.10/24", "dev", "eth0"]);
        let mac = mac_text(Self::mac(&self.src, "stby0"));
        // The standby's outputs need a next hop to reach the egress program.
        ns.ip(&[
            "neigh",
            "add",
            "192.0.2.1",
            "lladdr",
            &mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ]);
        ns.sysctl("net.ipv4.conf.eth0.arp_announce", "2");
        ns.sysctl("net.ipv4.conf.eth0.arp_ignore", "1");
        ns
    }

    /// A bpffs pin root of this test run for `host`.
    pub fn pin_root(&self, host: &str) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/{}-{host}", self.tag))
    }

    /// The MAC address of `iface` in `host`.
    pub fn mac(host: &NetNs, iface: &str) -> [u8; 6] {
        host.run(|| dataplane_user::host::netdev::Interface::by_name(iface))
            .expect("interface exists")
            .mac
    }

    /// Load options for `src`: eth0, mirroring over peer0 to dst's peer0.
    pub fn src_options(&self) -> LoadOptions {
        LoadOptions {
            pin_root: self.pin_root("src"),
            peer_interface: Some("peer0".into()),
            peer_mac: Some(Self::mac(&self.dst, "peer0")),
            input_ring_bytes: 8 << 20,
            output_ring_bytes: 1 << 20,
            ..LoadOptions::new("eth0")
        }
    }

    /// Load options for `dst`: eth0, receiving mirror frames on peer0.
    pub fn dst_options(&self) -> LoadOptions {
        LoadOptions {
            pin_root: self.pin_root("dst"),
            peer_mac: Some(Self::mac(&self.src, "peer0")),
            ..self.src_options()
        }
    }

    /// Loads the dataplane on `src` with [`TestHosts::src_options`].
    pub fn load_src(&self) -> Loaded {
        Loaded::new(&self.src, &self.src_options())
    }

    /// Loads the dataplane on `dst` with [`TestHosts::dst_options`].
    pub fn load_dst(&self) -> Loaded {
        Loaded::new(&self.dst, &self.dst_options())
    }

    /// Adds the veth pair svc0 (dataplane side) / svc1 (service side) on `src`,
    /// the local-delivery port of `MirrorMode::Devmap`, and returns that mode.
    pub fn add_delivery_veth(&self) -> MirrorMode {
        self.src.ip(&[
            "link", "add", "svc0", "type", "veth", "peer", "name", "svc1",
        ]);
        for iface in ["svc0", "svc1"] {
            self.src.ip(&["link", "set", iface, "up"]);
        }
        // A veth takes XDP-redirected frames only with NAPI on its peer: GRO turns it on.
        self.src.exec("ethtool", &["-K", "svc1", "gro", "on"]);
        // Inputs for eth0's address arrive on svc1.
        for key in ["all", "default", "svc1"] {
            self.src
                .sysctl(&format!("net.ipv4.conf.{key}.rp_filter"), "0");
        }
        MirrorMode::Devmap {
            deliver_interface: "svc0".into(),
            deliver_mac: Self::mac(&self.src, "svc1"),
        }
    }
}

/// A dataplane loaded for a test, unloaded on drop.
pub struct Loaded {
    pub dataplane: Dataplane,
}

impl Loaded {
    /// Loads the dataplane in `host` with `options`.
    pub fn new(host: &NetNs, options: &LoadOptions) -> Self {
        let dataplane = host
            .run(|| Dataplane::load(options))
            .unwrap_or_else(|e| panic!("loading the dataplane in {}: {e}", host.name()));
        Self { dataplane }
    }
}

impl Loaded {
    /// Up to `count` records of the input log (whatever arrives within 10 s),
    /// sorted by sequence number.
    pub fn read_inputs(&self, count: usize) -> Vec<Record> {
        self.read_log(MAP_INPUTS, count)
    }

    /// Up to `count` records of the log `name` (whatever arrives within 10 s),
    /// sorted by sequence number.
    pub fn read_log(&self, name: &'static str, count: usize) -> Vec<Record> {
        let ring = self.dataplane.open_log(name).expect("open the log");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        runtime.block_on(async {
            let mut reader = LogReader::spawn(ring, 1024).expect("watch the log");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            let mut records = Vec::new();
            while records.len() < count {
                match tokio::time::timeout_at(deadline, reader.next()).await {
                    Ok(r) => records.push(r),
                    Err(_) => break,
                }
            }
            records.sort_by_key(|r| r.header.seq);
            records
        })
    }
}

impl Drop for Loaded {
    fn drop(&mut self) {
        let root = self.dataplane.pin_root().to_owned();
        if root.exists() {
            let _ = Dataplane::unload(&root);
        }
    }
}

/// A MAC address as `ip` prints it: `aa:bb:cc:dd:ee:ff`, lower case.
pub fn mac_text(mac: [u8; 6]) -> String {
    macaddr::MacAddr6::from(mac)
        .to_string()
        .to_ascii_lowercase()
}

/// `addr:port` as a socket address.
pub fn sock(addr: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(addr.into(), port)
}

/// The path of the `dataplane` binary built beside the test executable.
pub fn dataplane_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    // Tests run from target/<profile>/deps/, the demo and benchmarks from target/<profile>/.
    let mut dir = exe.parent().expect("target dir");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target dir");
    }
    let bin = dir.join("dataplane");
    assert!(
        bin.exists(),
        "{} is missing: `cargo xtask` builds it before tests, demo and benchmarks",
        bin.display()
    );
    bin
}

/// A raw AF_PACKET socket bound to one interface: sends and receives whole
/// Ethernet frames, for tagged and malformed traffic a UDP socket cannot make.
pub struct RawSocket {
    fd: std::os::fd::OwnedFd,
}

impl RawSocket {
    /// Opens a raw socket on `iface` inside `host`.
    pub fn open(host: &NetNs, iface: &str) -> Self {
        host.run(|| {
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain socket(2) call; the fd is owned below.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto.into()) };
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: fd is a fresh socket we own.
            let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            let index = nix::net::if_::if_nametoindex(iface).expect("interface exists");
            // SAFETY: sockaddr_ll is plain data; all-zero is a valid start.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = proto;
            addr.sll_ifindex = index as i32;
            let len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: addr is a valid sockaddr_ll of len bytes.
            let rc = unsafe {
                libc::bind(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    (&raw const addr).cast(),
                    len,
                )
            };
            assert_eq!(rc, 0, "bind AF_PACKET: {}", std::io::Error::last_os_error());
            let timeout = libc::timeval {
                tv_sec: 0,
                tv_usec: 300_000,
            };
            // SAFETY: setting SO_RCVTIMEO with a timeval.
            unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&raw const timeout).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                )
            };
            Self { fd }
        })
    }

    /// Sends one frame as it is.
    pub fn send(&self, frame: &[u8]) {
        let sent = self.try_send(frame);
        assert_eq!(
            sent.as_ref().ok(),
            Some(&frame.len()),
            "send raw frame: {sent:?}"
        );
    }

    /// Sends one frame as it is; the bytes sent, or why the kernel refused it.
    pub fn try_send(&self, frame: &[u8]) -> std::io::Result<usize> {
        // SAFETY: frame is a valid buffer of its length.
        let n = unsafe {
            libc::send(
                std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                frame.as_ptr().cast(),
                frame.len(),
                0,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// The next frame, or None after the receive timeout.
    pub fn recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 16384];
        // SAFETY: buf is a valid writable buffer of its length.
        let n = unsafe {
            libc::recv(
                std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
            )
        };
        (n >= 0).then(|| {
            buf.truncate(n as usize);
            buf
        })
    }
}

/// A `dataplane daemon` process in a test host; on drop it is killed and
/// what it pinned and wrote is removed.
pub struct DaemonProcess {
    child: std::process::Child,
    /// Its control socket.
    pub socket: PathBuf,
    dir: PathBuf,
    pin_root: PathBuf,
}

impl DaemonProcess {
    /// Starts the daemon in `host` with `config` (TOML) and waits for its socket.
    pub fn start(host: &NetNs, name: &str, config: &str) -> Self {
        let dir = PathBuf::from(format!("/tmp/dataplane-test-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("test dir");
        std::fs::write(dir.join("dataplane.toml"), config).expect("write config");
        let pin_root = dataplane_user::config::DaemonConfig::parse(config)
            .expect("a valid test configuration")
            .pin_root;
        let socket = dir.join("dataplane.sock");
        let child = Self::spawn(host, &dir, &socket);
        Self {
            child,
            socket,
            dir,
            pin_root,
        }
    }

    /// Starts `dataplane daemon` with the configuration in `dir`, its log
    /// appended to `dir`/daemon.log, and waits until `socket` answers.
    fn spawn(host: &NetNs, dir: &Path, socket: &Path) -> std::process::Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("daemon.log"))
            .expect("log file");
        // The daemon and the CRIU it starts stay off the real-time CPU.
        let mut command = match cpu_split() {
            Some((_, machinery)) => {
                let mut c = Command::new("taskset");
                c.args(["-c", &machinery.to_string(), "nsenter"]);
                c
            }
            None => Command::new("nsenter"),
        };
        let mut child = command
            .arg(format!("--net={}", host.path().display()))
            .arg(dataplane_bin())
            .arg("--socket")
            .arg(socket)
            .arg("daemon")
            .arg("--config")
            .arg(dir.join("dataplane.toml"))
            .stderr(log)
            .spawn()
            .expect("spawn the daemon");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the daemon exited: {status}");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the daemon did not come up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    /// SIGKILLs the daemon (its pinned dataplane and its children stay, as
    /// after a crash) and starts it again with the same configuration, as
    /// its supervisor would.
    pub fn kill_and_restart(&mut self, host: &NetNs) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(host, &self.dir, &self.socket);
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the daemon has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// A control-socket client.
    pub fn client(&self) -> dataplane_user::control::Client {
        dataplane_user::control::Client::connect(&self.socket).expect("connect to the daemon")
    }

    /// Adds `flow` to the daemon's dataplane.
    pub fn add_flow(&self, (cps, service): Flow) {
        self.client()
            .call(
                "flow.add",
                serde_json::json!({"cps": cps, "service": service}),
            )
            .expect("flow.add");
    }

    /// Sends `signal` and waits for the process to end; its exit status.
    /// The pinned dataplane stays, for a restart to adopt.
    pub fn stop(mut self, signal: nix::sys::signal::Signal) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("signal the daemon");
        let status = self.child.wait().expect("wait for the daemon");
        self.pin_root = PathBuf::new();
        status
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default();
            eprintln!("--- daemon log ({}) ---\n{log}", self.dir.display());
        }
        if self.pin_root.join("links").exists() {
            let _ = Dataplane::unload(&self.pin_root);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

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

/// The real-time priority (SCHED_FIFO) at which the controllers and the
/// CPS simulator run, as control tasks do on a factory host: 50 unless
/// DATAPLANE_TEST_RT says otherwise (`0` runs them as ordinary tasks, to
/// measure what the priority buys).
pub fn realtime_priority() -> u8 {
    std::env::var("DATAPLANE_TEST_RT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50)
}

/// With real-time tasks on, two CPUs or more and pinning wanted, the CPUs
/// they and the migration machinery (daemons, CRIU, the standby) are pinned
/// to: (real-time, machinery), as a control host keeps them apart. This
/// kernel is not preemptible (PREEMPT_NONE): a control task woken on a CPU
/// where CRIU runs a long stretch of kernel code waits for it, 10 ms and
/// more, however high its priority. The destination daemon gives a
/// restored instance its source's CPUs (CRIU does not restore affinity).
/// Pinning is wanted in the timing runs (the benchmarks and the demo, see
/// `tune_host_for_timing`) and where a test asks for it ([`Pinning`]);
/// DATAPLANE_TEST_PIN=1 or 0 decides for every run.
pub fn cpu_split() -> Option<(usize, usize)> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let wanted = match std::env::var("DATAPLANE_TEST_PIN").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => PINNING.load(std::sync::atomic::Ordering::SeqCst),
    };
    (realtime_priority() != 0 && cpus >= 2 && wanted).then_some((cpus - 1, 0))
}

static PINNING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Where a timing run puts the real-time tasks (see [`cpu_split`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pin {
    /// On a CPU of their own, the machinery on another: for latency.
    Apart,
    /// Anywhere: for throughput, when they need more than one CPU.
    Anywhere,
}

/// Pinning (see [`cpu_split`]) for test hosts set up while this lives.
pub struct Pinning(bool);

impl Pinning {
    pub fn on() -> Self {
        Self(PINNING.swap(true, std::sync::atomic::Ordering::SeqCst))
    }
}

impl Drop for Pinning {
    fn drop(&mut self) {
        PINNING.store(self.0, std::sync::atomic::Ordering::SeqCst);
    }
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

/// The `taskset` and `chrt` prefix that starts a program at
/// `realtime_priority()` on the real-time CPU.
fn realtime() -> Vec<String> {
    let mut prefix: Vec<String> = Vec::new();
    if let Some((rt, _)) = cpu_split() {
        prefix.extend(["taskset".into(), "-c".into(), rt.to_string()]);
    }
    match realtime_priority() {
        0 => prefix,
        prio => {
            prefix.extend(["chrt".into(), "-f".into(), prio.to_string()]);
            prefix
        }
    }
}

/// CRIU walks the host's whole conntrack hash table twice on every dump,
/// even with the service's network namespace an external, with softirqs
/// off on its CPU: at the kernel's default of 262,144 buckets each walk
/// stalls packet processing for about 10 ms. A real-time host sizes the
/// table to its needs; the benchmarks and the demo do so for their run
/// (`CONNTRACK_BUCKETS`) and put the old size back on drop.
pub struct ConntrackBuckets {
    old: Option<String>,
}

/// The conntrack table size the benchmarks and the demo run with.
pub const CONNTRACK_BUCKETS: u32 = 4096;
const BUCKETS_SYSCTL: &str = "/proc/sys/net/netfilter/nf_conntrack_buckets";

impl ConntrackBuckets {
    /// Shrinks the table to `CONNTRACK_BUCKETS` if it is larger (a host
    /// without conntrack has nothing to shrink).
    pub fn shrink() -> Self {
        let old = std::fs::read_to_string(BUCKETS_SYSCTL)
            .ok()
            .filter(|v| v.trim().parse::<u32>().is_ok_and(|n| n > CONNTRACK_BUCKETS));
        if old.is_some() && std::fs::write(BUCKETS_SYSCTL, CONNTRACK_BUCKETS.to_string()).is_err() {
            return Self { old: None };
        }
        Self { old }
    }

    /// "262144 -> 4096" or "4096" (what the run had).
    pub fn describe(&self) -> String {
        let now = std::fs::read_to_string(BUCKETS_SYSCTL).unwrap_or_else(|_| "none".into());
        match &self.old {
            Some(old) => format!("{} -> {}", old.trim(), now.trim()),
            None => now.trim().to_string(),
        }
    }
}

/// Prepares this host for a timed run (pinning, `ConntrackBuckets::shrink`)
/// and prints the conditions the figures were taken under.
pub fn tune_host_for_timing(pin: Pin) -> ConntrackBuckets {
    // For the whole run: the hosts of a timing run keep the real-time tasks
    // and the machinery apart, unless they need every CPU.
    PINNING.store(pin == Pin::Apart, std::sync::atomic::Ordering::SeqCst);
    let buckets = ConntrackBuckets::shrink();
    let priority = match realtime_priority() {
        0 => "ordinary tasks".to_string(),
        p => format!("SCHED_FIFO priority {p}"),
    };
    let cpus = match cpu_split() {
        Some((realtime, machinery)) => {
            format!(" on CPU {realtime}, daemons, CRIU and standbys on CPU {machinery}")
        }
        None => String::new(),
    };
    println!(
        "host: controllers and CPS at {priority}{cpus}; conntrack buckets {}",
        buckets.describe()
    );
    buckets
}

impl Drop for ConntrackBuckets {
    fn drop(&mut self) {
        if let Some(old) = &self.old {
            let _ = std::fs::write(BUCKETS_SYSCTL, old.trim());
        }
    }
}

/// A chain-service process in its own PID namespace inside a test host,
/// started as DESIGN.md says CRIU needs it: `nsenter --net` (no new mount
/// namespace) and `unshare --pid --fork`. Killed on drop.
pub struct ChainService {
    /// The `unshare` process; the service is its only child.
    unshare: std::process::Child,
    /// The service's pid, as this (the root) PID namespace sees it.
    pub pid: u32,
}

impl ChainService {
    /// Starts the service on `addr` in `host`.
    pub fn start(host: &NetNs, addr: SocketAddr) -> Self {
        Self::spawn(host, "chain-service", &[&addr.to_string()], addr)
    }

    /// Starts `program` (a binary of this workspace) with `args` as a service
    /// on `addr` in `host`; it must answer "?" as the chain service does.
    pub fn spawn(host: &NetNs, program: &str, args: &[&str], addr: SocketAddr) -> Self {
        let unshare = Command::new("nsenter")
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
        let service = Self { unshare, pid };
        // Ready once it answers: inputs sent before it binds would be lost.
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
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

/// Asks the chain service at `addr` in `host` for its state: (count, hash).
pub fn chain_state(host: &NetNs, addr: SocketAddr) -> Option<(u64, u64)> {
    let socket = host
        .run(|| std::net::UdpSocket::bind(SocketAddr::new(addr.ip(), 0)))
        .expect("bind a query socket");
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

/// Two daemons on `src` and `dst` with a peer link, and a Markov controller
/// on `src` registered as service "markov" on the flow 192.0.2.1:4000 ->
/// 192.0.2.10:5000 ([2001:db8::1]:4000 -> [2001:db8::10]:5000 with
/// [`MigrationSetup::ipv6`]): a migration ready to start.
pub struct MigrationSetup {
    pub hosts: TestHosts,
    pub src: DaemonProcess,
    pub dst: DaemonProcess,
    pub controller: ChainService,
    /// Standby mode: the standby's namespace (linked to `src` by the veth
    /// stby0), its dataplane and its controller.
    pub standby: Option<(Loaded, ChainService, NetNs)>,
    /// The controller's address (the same on both hosts).
    pub service: SocketAddr,
    /// The CPS's end of the controller's flow.
    cps: SocketAddr,
    tag: String,
}

/// A flow: (the CPS's end, the service's).
pub type Flow = (SocketAddr, SocketAddr);

/// The CPS's port on the flow of [`MigrationSetup`]'s service "markov".
const CPS_PORT: u16 = 4000;

/// The address of [`MigrationSetup::add_services`]'s services, on `src` only.
pub const EXTRA_SERVICE_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);

/// The destination daemon's peer link address in [`MigrationSetup`].
pub const DST_PEER: &str = "198.51.100.2:7070";
/// The `peer_key` both daemons of [`MigrationSetup`] share.
pub const PEER_KEY: &str = "6d6967726174696f6e2d746573742d6b65792d6f662d33322d62797465732121";

impl MigrationSetup {
    /// Builds it; `controller_args` go to the controller after its address.
    /// With `standby`, a standby controller runs in a namespace of its own
    /// on the source host, fed by the source's dataplane.
    pub fn new(tag: &str, controller_args: &[&str], standby: bool) -> Self {
        Self::with_source_config(tag, controller_args, standby, "")
    }

    /// As `new`, with `extra` TOML lines in the source daemon's configuration.
    pub fn with_source_config(
        tag: &str,
        controller_args: &[&str],
        standby: bool,
        extra: &str,
    ) -> Self {
        Self::with_configs(tag, controller_args, standby, extra, "")
    }

    /// As `new`, with `src_extra` and `dst_extra` TOML lines in the source's
    /// and the destination's daemon configuration.
    pub fn with_configs(
        tag: &str,
        controller_args: &[&str],
        standby: bool,
        src_extra: &str,
        dst_extra: &str,
    ) -> Self {
        let flow = (sock(CPS_V4, CPS_PORT), sock(SERVICE_V4, 5000));
        Self::build(tag, controller_args, standby, (src_extra, dst_extra), flow)
    }

    /// As `new` without a standby, the controller on the IPv6 flow.
    pub fn ipv6(tag: &str) -> Self {
        let flow = (
            SocketAddr::from((CPS_V6, CPS_PORT)),
            SocketAddr::from((SERVICE_V6, 5000)),
        );
        Self::build(tag, &[], false, ("", ""), flow)
    }

    fn build(
        tag: &str,
        controller_args: &[&str],
        standby: bool,
        (src_extra, dst_extra): (&str, &str),
        (cps, service): Flow,
    ) -> Self {
        let hosts = TestHosts::new(tag);
        let standby_ns = standby.then(|| hosts.add_standby());
        let standby_dataplane = standby_ns.as_ref().map(|ns| {
            let options = LoadOptions {
                pin_root: hosts.pin_root("stb"),
                input_ring_bytes: 1 << 20,
                output_ring_bytes: 1 << 20,
                ..LoadOptions::new("eth0")
            };
            Loaded::new(ns, &options)
        });
        let standby_config = standby_ns
            .as_ref()
            .map(|ns| {
                let mac = mac_text(TestHosts::mac(ns, "eth0"));
                format!(
                    "standby_interface = \"stby0\"\nstandby_mac = \"{mac}\"\n\
                     standby_netns = \"{}\"\nstandby_pin_root = \"{}\"\n",
                    ns.path().display(),
                    hosts.pin_root("stb").display()
                )
            })
            .unwrap_or_default();
        let config = |host: &str, peer_mac: [u8; 6], listen: &str| {
            let mac = mac_text(peer_mac);
            // `extra` may size the input ring itself (TOML refuses a key twice).
            let ring = if listen.contains("input_ring_mib") {
                ""
            } else {
                "input_ring_mib = 8\n"
            };
            format!(
                "interface = \"eth0\"\npeer_interface = \"peer0\"\npeer_mac = \"{mac}\"\n\
                 pin_root = \"{}\"\n{ring}output_ring_mib = 4\n\
                 images_dir = \"/tmp/dataplane-test-{}-{tag}-{host}-images\"\n\
                 peer_key = \"{PEER_KEY}\"\n{listen}",
                hosts.pin_root(host).display(),
                std::process::id(),
            )
        };
        let src_config = config(
            "src",
            TestHosts::mac(&hosts.dst, "peer0"),
            &format!("{standby_config}{src_extra}"),
        );
        let dst_config = config(
            "dst",
            TestHosts::mac(&hosts.src, "peer0"),
            &format!("peer_listen = \"{DST_PEER}\"\n{dst_extra}"),
        );
        let src = DaemonProcess::start(&hosts.src, &format!("{tag}-src"), &src_config);
        let dst = DaemonProcess::start(&hosts.dst, &format!("{tag}-dst"), &dst_config);
        let mut args = vec![service.to_string()];
        args.extend(controller_args.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let controller = ChainService::spawn(&hosts.src, "markov-controller", &args, service);
        let standby_controller = standby_ns.as_ref().map(|ns| {
            let standby = ChainService::spawn(ns, "markov-controller", &args, service);
            // The standby only has to be fed; it serves nothing until it is
            // checkpointed and restored (with the primary's CPUs). Off the
            // real-time CPU it takes no time from the serving instance.
            if let Some((_, machinery)) = cpu_split() {
                dataplane_user::host::tasks::pin(standby.pid, &[machinery])
                    .expect("pin the standby");
            }
            standby
        });
        src.add_flow((cps, service));
        let standby = standby_ns.map(|ns| {
            (
                standby_dataplane.expect("loaded with the namespace"),
                standby_controller.expect("started with the namespace"),
                ns,
            )
        });
        let setup = Self {
            hosts,
            src,
            dst,
            controller,
            standby,
            service,
            cps,
            tag: tag.to_string(),
        };
        setup.register();
        setup
    }

    /// Registers the controller (and its standby) as service "markov" on
    /// the source daemon (again, after a restart: the daemon keeps its
    /// flows pinned but not its services).
    pub fn register(&self) {
        self.register_service(
            "markov",
            self.controller.pid,
            self.standby.as_ref().map(|s| s.1.pid),
            self.flow(),
        );
    }

    fn register_service(&self, name: &str, pid: u32, standby_pid: Option<u32>, flow: Flow) {
        self.src
            .client()
            .call(
                "service.register",
                serde_json::json!({"name": name, "pid": pid, "standby_pid": standby_pid,
                    "flows": [{"cps": flow.0, "service": flow.1}]}),
            )
            .expect("service.register");
    }

    /// The flow of service "markov": (the CPS's end, the service's).
    pub fn flow(&self) -> Flow {
        (self.cps, self.service)
    }

    /// The id of service "markov"'s flow in the source's dataplane.
    pub fn source_flow_id(&self) -> u32 {
        let key = dataplane_user::kernel::flow::udp(self.cps, self.service);
        let flows = Dataplane::open(&self.hosts.pin_root("src"))
            .and_then(|d| d.flows())
            .expect("the source's flows");
        flows
            .into_iter()
            .find_map(|(k, config)| (k == key).then_some(config.flow_id))
            .expect("service markov's flow on the source")
    }

    /// Starts `n` more Markov controllers on `src` (no standby), on
    /// [`EXTRA_SERVICE_V4`] ports 5001.., each on its own flow from CPS
    /// port 4001.. and registered as service "markov-I". Their address is
    /// not the migrated service's: a migration's announce moves that address,
    /// every port of it, to `dst`, and these stay on `src`. Call it once.
    pub fn add_services(&self, n: u16) -> Vec<(ChainService, Flow)> {
        self.hosts.src.ip(&[
            "addr",
            "add",
            &format!("{EXTRA_SERVICE_V4}/24"),
            "dev",
            "eth0",
        ]);
        (1..=n)
            .map(|i| {
                let flow = (
                    sock(CPS_V4, CPS_PORT + i),
                    sock(EXTRA_SERVICE_V4, self.service.port() + i),
                );
                let addr = flow.1.to_string();
                let controller =
                    ChainService::spawn(&self.hosts.src, "markov-controller", &[&addr], flow.1);
                self.src.add_flow(flow);
                self.register_service(&format!("markov-{i}"), controller.pid, None, flow);
                (controller, flow)
            })
            .collect()
    }

    /// Starts the CPS simulator on `cps`: `count` inputs every `period_us`,
    /// with its per-cycle trace written to `trace` if given.
    pub fn start_cps(
        &self,
        count: u64,
        period_us: u64,
        trace: Option<&std::path::Path>,
    ) -> std::process::Child {
        let mut command = self.hosts.cps_command(&[self.flow()], count, period_us);
        if let Some(trace) = trace {
            command.arg("--trace").arg(trace);
        }
        command.spawn().expect("start the CPS simulator")
    }

    /// As `start_cps`, sending `burst` inputs at 20 kHz on each SIGUSR1.
    pub fn start_bursty_cps(
        &self,
        count: u64,
        period_us: u64,
        burst: u64,
        trace: &std::path::Path,
    ) -> std::process::Child {
        let mut command = self.hosts.cps_command(&[self.flow()], count, period_us);
        command
            .args(["--burst", &burst.to_string()])
            .arg("--trace")
            .arg(trace);
        command.spawn().expect("start the CPS simulator")
    }

    /// The destination daemon's image directory.
    pub fn dst_images_dir(&self) -> PathBuf {
        PathBuf::from(format!(
            "/tmp/dataplane-test-{}-{}-dst-images",
            std::process::id(),
            self.tag
        ))
    }

    /// Subscribes to `migration.watch` on the source, lets the CPS run
    /// 300 ms, and starts a migration with `params`: the phase stream and
    /// the migration's id.
    pub fn migrate_watched(
        &self,
        params: serde_json::Value,
    ) -> (dataplane_user::control::Client, String) {
        let mut watcher = self.src.client();
        watcher
            .call("migration.watch", serde_json::json!({}))
            .expect("migration.watch");
        std::thread::sleep(Duration::from_millis(300));
        (watcher, self.migrate(params))
    }

    /// Starts the CPS for `cycles` at 1 ms, migrates "markov" to `dst` with
    /// `params` added `lead` later, and waits for both to end: the final
    /// report and the CPS's verdict.
    pub fn migrate_while_cps_runs(
        &self,
        cycles: u64,
        lead: Duration,
        params: serde_json::Value,
    ) -> (serde_json::Value, serde_json::Value) {
        let cps = self.start_cps(cycles, 1000, None);
        std::thread::sleep(lead);
        let id = self.migrate(params);
        let report = self.wait(&id);
        (report, cps_verdict(cps))
    }

    /// Starts migrating "markov" to `dst` with `params` added; the migration id.
    pub fn migrate(&self, params: serde_json::Value) -> String {
        let mut request = serde_json::json!({"service": "markov", "to": DST_PEER});
        request
            .as_object_mut()
            .unwrap()
            .extend(params.as_object().cloned().unwrap_or_default());
        let started = self
            .src
            .client()
            .call("migration.start", request)
            .expect("migration.start");
        started["id"].as_str().expect("an id").to_string()
    }

    /// Waits for migration `id` to end; its final report.
    pub fn wait(&self, id: &str) -> serde_json::Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let report = self
                .src
                .client()
                .call("migration.status", serde_json::json!({"id": id}))
                .expect("migration.status");
            if report["state"] != "running" {
                return report;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "migration {id} still running: {report}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// What a stop-and-copy migration took, phase by phase.
#[derive(Clone, Copy, Debug, Default)]
pub struct StopAndCopy {
    /// The restored controller on `dst` (this process's child).
    pub pid: u32,
    /// The dump, with any pre-dump rounds before it.
    pub dump: Duration,
    /// CRIU's frozen time of the final dump, from stats-dump.
    pub frozen: Duration,
    pub copy: Duration,
    pub restore: Duration,
    pub image_bytes: u64,
    /// Pre-dump rounds taken (pre-copy only).
    pub rounds: usize,
}

impl MigrationSetup {
    /// The classic migration of the controller, the papers' baseline: CRIU
    /// dump (the service stops), copy the images, CRIU restore on `dst`,
    /// take the address there and announce it. Inputs meanwhile are lost.
    pub fn stop_and_copy(
        &self,
        images: &std::path::Path,
        copied: &std::path::Path,
    ) -> anyhow::Result<StopAndCopy> {
        self.dump_copy_restore(images, copied, None)
    }

    /// kaur2020's iterative pre-copy of the controller: pre-dump rounds
    /// while it runs, stopped by `policy`, then the final dump, copy and
    /// restore as in `stop_and_copy`. CRIU's driver takes a single dump
    /// where the kernel cannot track memory (`rounds` is then 0).
    pub fn pre_copy(
        &self,
        images: &std::path::Path,
        copied: &std::path::Path,
        policy: &dataplane_user::planning::policy::StopPolicy,
    ) -> anyhow::Result<StopAndCopy> {
        self.dump_copy_restore(images, copied, Some(policy))
    }

    /// Runs CRIU where the daemons would: on the machinery's CPU when the
    /// run pins (CRIU's tasks inherit this thread's CPUs), and gives the
    /// restored controller its source's CPUs, as the destination daemon
    /// does; the baselines then pay what our live modes pay for CRIU.
    fn dump_copy_restore(
        &self,
        images: &std::path::Path,
        copied: &std::path::Path,
        precopy: Option<&dataplane_user::planning::policy::StopPolicy>,
    ) -> anyhow::Result<StopAndCopy> {
        use nix::{sched::CpuSet, unistd::Pid};
        let here = Pid::from_raw(0);
        let before = nix::sched::sched_getaffinity(here)?;
        if let Some((_, machinery)) = cpu_split() {
            let mut set = CpuSet::new();
            set.set(machinery)?;
            nix::sched::sched_setaffinity(here, &set)?;
        }
        let source_cpus =
            dataplane_user::host::tasks::cpus_of(self.controller.pid).unwrap_or_default();
        let outcome = self.dump_copy_restore_here(images, copied, precopy);
        nix::sched::sched_setaffinity(here, &before)?;
        let outcome = outcome?;
        if !source_cpus.is_empty() {
            dataplane_user::host::tasks::pin(outcome.pid, &source_cpus)
                .map_err(anyhow::Error::msg)?;
        }
        Ok(outcome)
    }

    fn dump_copy_restore_here(
        &self,
        images: &std::path::Path,
        copied: &std::path::Path,
        precopy: Option<&dataplane_user::planning::policy::StopPolicy>,
    ) -> anyhow::Result<StopAndCopy> {
        use dataplane_user::criu::{
            Criu, DumpRequest, RestoreRequest, netns_inode, open_netns, stats,
        };
        let criu = Criu::default();
        let pid = self.controller.pid;
        let dump = DumpRequest {
            pid,
            images_dir: images.to_owned(),
            external: vec![format!("net[{}]:extnet", netns_inode(pid)?)],
            ..Default::default()
        };
        let start = std::time::Instant::now();
        let rounds = match precopy {
            Some(policy) => criu.iterative_dump(&dump, policy)?.rounds.len(),
            None => {
                criu.dump(&dump, false, &mut |_| true)?;
                0
            }
        };
        let dumped = start.elapsed();
        let frozen = Duration::from_micros(stats::dump(images).map_or(0, |s| s.frozen_time.into()));
        // Pre-dump rounds sit in subdirectories: copy the tree.
        let image_bytes = copy_tree(images, copied)?;
        let copied_at = start.elapsed();
        let netns = open_netns(&self.hosts.dst.path())?;
        let restore = RestoreRequest {
            images_dir: copied.to_owned(),
            inherit: vec![("extnet".into(), &netns)],
        };
        let restored = criu.restore(&restore, &mut |_, _| true)?;
        self.hosts.dst.run(|| -> anyhow::Result<()> {
            let addr = SERVICE_V4;
            dataplane_user::host::netdev::own_address("eth0", addr.into())?;
            dataplane_user::host::netdev::gratuitous_arp("eth0", addr)?;
            Ok(())
        })?;
        Ok(StopAndCopy {
            pid: restored,
            dump: dumped,
            frozen,
            copy: copied_at - dumped,
            restore: start.elapsed() - copied_at,
            image_bytes,
            rounds,
        })
    }
}

/// Copies the directory tree `from` to `to`; the bytes copied.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<u64> {
    std::fs::create_dir_all(to)?;
    let mut bytes = 0;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        bytes += if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?
        } else {
            std::fs::copy(entry.path(), target)?
        };
    }
    Ok(bytes)
}

/// Waits for a CPS simulator to finish; its verdict.
pub fn cps_verdict(child: std::process::Child) -> serde_json::Value {
    cps_verdicts(child).swap_remove(0)
}

/// Waits for a CPS simulator to finish; its verdict on each flow.
pub fn cps_verdicts(child: std::process::Child) -> Vec<serde_json::Value> {
    let output = child.wait_with_output().expect("the CPS simulator");
    assert!(output.status.success(), "cps-sim failed: {}", output.status);
    output
        .stdout
        .split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| serde_json::from_slice(line).expect("a JSON verdict"))
        .collect()
}

/// The whole machine's CPU at a moment: the time and how long every CPU
/// has been idle.
pub struct MachineCpu {
    at: std::time::Instant,
    idle_ticks: u64,
}

impl MachineCpu {
    pub fn now() -> Self {
        Self {
            at: std::time::Instant::now(),
            idle_ticks: idle_ticks(),
        }
    }

    /// The CPU time all CPUs were busy since, summed: wall time times the
    /// CPUs, less their idle time. /proc/stat's idle time is exact on this
    /// tickless kernel (kept in ns while a CPU sleeps); its busy fields are
    /// sampled at the 100 Hz tick and miss work done in stretches shorter
    /// than one, as a control cycle's is (a 16 x 2500/s load read 2 % busy).
    pub fn busy_since(&self) -> Duration {
        let idle = Duration::from_millis(
            (idle_ticks() - self.idle_ticks) * 1000 / clock_ticks_per_second(),
        );
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        (self.at.elapsed() * cpus).saturating_sub(idle)
    }

    /// `busy_since` in % of all CPUs.
    pub fn busy_percent(&self) -> f64 {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        self.busy_since().as_secs_f64() / self.at.elapsed().as_secs_f64() / cpus * 100.0
    }
}

/// The clock ticks (USER_HZ) /proc counts CPU time in, per second.
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as u64 }
}

/// Idle and iowait time of all CPUs so far, in clock ticks.
fn idle_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").expect("read /proc/stat");
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .expect("cpu line")
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().expect("a number"))
        .collect();
    // user nice system idle iowait ...
    fields[3] + fields[4]
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

/// One cycle of a CPS simulator trace: when its input was sent and its
/// output answered (µs since the CPS started; 0: never answered).
#[derive(Clone, Copy, Debug)]
pub struct Cycle {
    pub seq: u64,
    pub sent_us: u64,
    pub answered_us: u64,
}

/// Parses a trace written by `cps-sim --trace` ("SEQ SENT ANSWERED" lines).
pub fn read_trace(text: &str) -> Vec<Cycle> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<u64> = line
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            (f.len() == 3).then(|| Cycle {
                seq: f[0],
                sent_us: f[1],
                answered_us: f[2],
            })
        })
        .collect()
}

/// Output gaps beyond `period_us` from a CPS trace (µs), by the cycle that
/// ended them.
pub fn output_gaps(trace: &str, period_us: u64) -> Vec<(u64, i64)> {
    let answered: Vec<(u64, u64)> = read_trace(trace)
        .into_iter()
        .filter(|c| c.answered_us != 0)
        .map(|c| (c.seq, c.answered_us))
        .collect();
    answered
        .windows(2)
        .map(|w| (w[1].0, w[1].1 as i64 - w[0].1 as i64 - period_us as i64))
        .collect()
}

/// A phase of a migration report: (start, duration) in µs; zeros if absent.
pub fn report_phase(report: &serde_json::Value, name: &str) -> (u64, u64) {
    report["phases"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == name)
        .map_or((0, 0), |p| {
            (
                p["start_us"].as_u64().unwrap_or(0),
                p["duration_us"].as_u64().unwrap_or(0),
            )
        })
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
    use std::os::unix::fs::MetadataExt;
    let ours = std::fs::metadata(format!("/proc/{pid}/ns/net")).map(|m| m.ino());
    let theirs = std::fs::metadata(host.path()).map(|m| m.ino());
    matches!((ours, theirs), (Ok(a), Ok(b)) if a == b)
}
