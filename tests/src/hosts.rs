//! The three test hosts (cps, src, dst) wired together, their addresses,
//! a dataplane loaded on one of them, and raw Ethernet sockets.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use dataplane_user::{
    kernel::{
        loader::{Dataplane, LoadOptions, MAP_INPUTS, MirrorMode},
        logs::{LogReader, Record},
    },
    peer::{Identity, Peer, Trust},
};

use crate::{
    daemon::{Flow, dataplane_bin},
    netns::{NetNs, run, veth},
    timing::realtime,
};

/// The CPS's IPv4 address.
pub const CPS_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The service's IPv4 address: a host address on `src`'s eth0, and on
/// `dst`'s lo.
pub const SERVICE_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// The CPS's IPv6 address.
pub const CPS_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// The service's IPv6 address.
pub const SERVICE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);

/// A host's own addresses: on the service network (IPv4, IPv6), and on
/// the migration network.
pub type HostAddresses = (Ipv4Addr, Ipv6Addr, Ipv4Addr);

/// `src`'s own addresses (the service's, 192.0.2.10, is another).
pub const SRC_ADDRESSES: HostAddresses = (
    Ipv4Addr::new(192, 0, 2, 30),
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x30),
    Ipv4Addr::new(198, 51, 100, 1),
);
/// `dst`'s own addresses.
pub const DST_ADDRESSES: HostAddresses = (
    Ipv4Addr::new(192, 0, 2, 20),
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x20),
    Ipv4Addr::new(198, 51, 100, 2),
);

/// The three test hosts and their links.
pub struct TestHosts {
    pub cps: NetNs,
    pub src: NetNs,
    pub dst: NetNs,
    /// The migration network's switch: a bridge (`br0`) that every host's
    /// peer0 is a port of (`to-HOST`), in a namespace of its own that the
    /// field network does not reach.
    pub migration: NetNs,
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
            migration: NetNs::new(&format!("{tag}-mig")),
            tag,
        };
        hosts.wire();
        hosts
    }

    fn wire(&self) {
        self.cps.ip(&["link", "add", "br0", "type", "bridge"]);
        self.migration.ip(&["link", "add", "br0", "type", "bridge"]);
        // A switch forwards frames as they are. With br_netfilter loaded (as
        // container hosts have it), a bridge would drop malformed IP frames
        // that the tests send through it on purpose.
        if std::path::Path::new("/proc/sys/net/bridge").exists() {
            for family in ["iptables", "ip6tables", "arptables"] {
                self.migration
                    .sysctl(&format!("net.bridge.bridge-nf-call-{family}"), "0");
            }
        }
        self.migration.ip(&["link", "set", "br0", "up"]);
        self.cps.ip(&["link", "set", "br0", "up"]);
        self.cps.ip(&["addr", "add", "192.0.2.1/24", "dev", "br0"]);
        self.cps
            .ip(&["addr", "add", "2001:db8::1/64", "dev", "br0", "nodad"]);
        // A field device puts real checksums on the wire. A sender on this
        // machine leaves them to a checksum offload that veth never performs,
        // which only works while the skb's checksum state travels with it.
        self.cps.exec("ethtool", &["-K", "br0", "tx", "off"]);
        self.join(&self.src, "src", SRC_ADDRESSES);
        self.join(&self.dst, "dst", DST_ADDRESSES);
        // src serves the service to begin with: its address is src's on
        // the service network (a host address beside src's own, which a
        // migration away takes off).
        self.src
            .ip(&["addr", "add", "192.0.2.10/32", "dev", "eth0"]);
        self.src
            .ip(&["addr", "add", "2001:db8::10/128", "dev", "eth0", "nodad"]);
        // dst holds it on lo, as an admin may provision it (a destination
        // without it adds it there itself).
        self.dst.ip(&["addr", "add", "192.0.2.10/32", "dev", "lo"]);
        self.dst
            .ip(&["addr", "add", "2001:db8::10/128", "dev", "lo", "nodad"]);
    }

    /// Makes `host` (called `name`) a host of the cell: its eth0 a port of
    /// the service network's bridge on `cps`, its peer0 one of the
    /// migration network's, with `addresses` its own; set up as the
    /// operations guide asks of every host that may take a migration.
    fn join(&self, host: &NetNs, name: &str, addresses: HostAddresses) {
        let port = format!("to-{name}");
        veth((&port, &self.cps), ("eth0", host));
        self.cps.ip(&["link", "set", &port, "master", "br0", "up"]);
        self.cps.exec("ethtool", &["-K", &port, "tx", "off"]);
        self.join_migration_network(host, &port);
        let (v4, v6, peer) = addresses;
        host.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"]);
        host.ip(&["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"]);
        host.ip(&["addr", "add", &format!("{peer}/24"), "dev", "peer0"]);
        host.ip(&["link", "set", "eth0", "up"]);
        // A host answers ARP only for the addresses of the interface asked
        // on (not for a service address it holds on lo), and names its
        // own address in its requests: a service address moves only when
        // a cutover announces it.
        host.sysctl("net.ipv4.conf.eth0.arp_ignore", "1");
        host.sysctl("net.ipv4.conf.eth0.arp_announce", "2");
        // Mirrored inputs from the CPS arrive on peer0, not on the CPS's subnet.
        for key in ["all", "default", "peer0", "eth0"] {
            host.sysctl(&format!("net.ipv4.conf.{key}.rp_filter"), "0");
        }
    }

    /// One more host of the cell, `name`, on both networks, with
    /// `addresses` its own, and no service address: as `src` and `dst` are
    /// joined.
    pub fn add_host(&self, name: &str, addresses: HostAddresses) -> NetNs {
        let ns = NetNs::new(&format!("{}-{name}", self.tag));
        self.join(&ns, name, addresses);
        ns
    }

    /// Makes `host`'s peer0 a port (`port`) of the migration network's
    /// bridge.
    fn join_migration_network(&self, host: &NetNs, port: &str) {
        veth((port, &self.migration), ("peer0", host));
        // Mirror frames carry 46 bytes (50 with a VLAN tag) around a
        // full-size input. A bridge takes its ports' MTU.
        self.migration
            .ip(&["link", "set", port, "mtu", "1600", "master", "br0", "up"]);
        // Devmap mode redirects copies from XDP into peer0: its other end
        // takes them only with NAPI on.
        self.migration.exec("ethtool", &["-K", port, "gro", "on"]);
        host.ip(&["link", "set", "peer0", "mtu", "1600", "up"]);
        // A veth hands a frame to its peer's NAPI ring, in order, when the
        // peer runs XDP or the sender has no TSO (veth_xmit); otherwise to
        // the backlog of the CPU that sent it, and two CPUs' backlogs
        // reorder mirror copies. Here the peer is a bridge port, without
        // XDP.
        host.exec("ethtool", &["-K", "peer0", "tso", "off"]);
        // A veth has no queue: when the image transfer fills its peer's
        // ring, a mirror copy cloned onto it is dropped. With a qdisc the
        // veth pushes back (Linux 6.15 and later) and the copy waits.
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

    /// A third host on the migration network only (peer0, 198.51.100.3),
    /// to watch what reaches a host that takes no part in a migration.
    pub fn add_bystander(&self) -> NetNs {
        let ns = NetNs::new(&format!("{}-by", self.tag));
        self.join_migration_network(&ns, "to-by");
        ns.ip(&["addr", "add", "198.51.100.3/24", "dev", "peer0"]);
        ns
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
        veth(("stby0", &self.src), ("eth0", &ns));
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

    /// `host`'s identity key (made on first use, kept until the hosts
    /// are dropped): its file, for a daemon's `identity`, and the key pair,
    /// for a test that acts as `host` itself.
    pub fn identity(&self, host: &str) -> (PathBuf, Identity) {
        let path = self.keys_dir().join(format!("{host}.key"));
        let (identity, _) = Identity::load_or_create(&path).expect("a test identity");
        (path, identity)
    }

    /// Daemon configuration lines: `host`'s identity, and `peers`, each a
    /// test host's name and `peer_listen` address, listed with its key.
    pub fn peer_config(&self, host: &str, peers: &[(&str, &str)]) -> String {
        let (path, _) = self.identity(host);
        let listed: Vec<String> = peers
            .iter()
            .map(|(name, address)| {
                let key = self.identity(name).1.public();
                format!("{{ name = \"{name}\", address = \"{address}\", key = \"{key}\" }}")
            })
            .collect();
        format!(
            "identity = \"{}\"\npeers = [{}]\n",
            path.display(),
            listed.join(", ")
        )
    }

    /// What the test process trusts when it acts as `host` toward `peers`
    /// (as in [`Self::peer_config`]).
    pub fn trust(&self, host: &str, peers: &[(&str, &str)]) -> Trust {
        let peers = peers
            .iter()
            .map(|(name, address)| Peer {
                name: name.to_string(),
                address: address.parse().expect("a test address"),
                key: Some(self.identity(name).1.public()),
            })
            .collect();
        Trust::sealed(self.identity(host).1, peers)
    }

    fn keys_dir(&self) -> PathBuf {
        std::env::temp_dir().join(format!("{}-keys", self.tag))
    }

    /// Daemon configuration lines for `host`'s standbys' place, which its
    /// daemon builds: the link stby0, a namespace and a pin root of this
    /// test run.
    pub fn standby_config(&self, host: &str) -> String {
        format!(
            "standby_interface = \"stby0\"\nstandby_netns = \"{}\"\n\
             standby_pin_root = \"{}\"\n",
            self.standby_netns(host).display(),
            self.pin_root(&format!("{host}-stb")).display()
        )
    }

    /// The namespace `host`'s daemon runs standbys in ([`Self::standby_config`]).
    pub fn standby_netns(&self, host: &str) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}-{host}-stb", self.tag))
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

    /// The index of `iface` in `host`.
    pub fn ifindex(host: &NetNs, iface: &str) -> u32 {
        host.run(|| dataplane_user::host::netdev::Interface::by_name(iface))
            .expect("interface exists")
            .index
    }

    /// Load options for the dataplane in a standby namespace
    /// ([`TestHosts::add_standby`]): no peer; its mirror copies arrive on
    /// eth0, the link from `src`.
    pub fn standby_options(&self) -> LoadOptions {
        LoadOptions {
            pin_root: self.pin_root("stb"),
            mirror_from: Some("eth0".into()),
            input_ring_bytes: 1 << 20,
            output_ring_bytes: 1 << 20,
            ..LoadOptions::new("eth0")
        }
    }

    /// Load options for `src`: eth0, mirroring over peer0 (each flow to
    /// the host [`Loaded::add_mirrored_flow`] names).
    pub fn src_options(&self) -> LoadOptions {
        LoadOptions {
            pin_root: self.pin_root("src"),
            peer_interface: Some("peer0".into()),
            input_ring_bytes: 8 << 20,
            output_ring_bytes: 1 << 20,
            ..LoadOptions::new("eth0")
        }
    }

    /// Load options for `dst`: eth0, receiving mirror frames on peer0.
    pub fn dst_options(&self) -> LoadOptions {
        LoadOptions {
            pin_root: self.pin_root("dst"),
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

impl Drop for TestHosts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.keys_dir());
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

    /// Adds flow `key`, mirrored to `to`'s peer0 (under the same id
    /// there): its id.
    pub fn add_mirrored_flow(&mut self, key: dataplane_common::FlowKey, to: &NetNs) -> u32 {
        let flow_id = self.dataplane.add_flow(key, 0).expect("add the flow");
        // The tests give a flow the same id on every host.
        let target = dataplane_common::MirrorTarget {
            mac: TestHosts::mac(to, "peer0"),
            flow_id,
            ..Default::default()
        };
        self.dataplane
            .mirror_flow(&key, Some(target))
            .expect("mirror the flow");
        flow_id
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
