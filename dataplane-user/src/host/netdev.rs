//! Facts about network interfaces, read in the calling thread's network namespace.
use std::io;

use nix::{ifaddrs::getifaddrs, net::if_::if_nametoindex};

/// A network interface of this host.
#[derive(Clone, Debug)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
    /// Up, with a carrier: frames sent on it can reach its network.
    pub running: bool,
}

impl Interface {
    /// Looks `name` up in the calling thread's network namespace.
    pub fn by_name(name: &str) -> Result<Self, InterfaceError> {
        let err = |source: io::Error| InterfaceError {
            name: name.to_owned(),
            source,
        };
        use nix::net::if_::InterfaceFlags;
        let index = if_nametoindex(name).map_err(|e| err(e.into()))?;
        let (mac, flags) = getifaddrs()
            .map_err(|e| err(e.into()))?
            .filter(|a| a.interface_name == name)
            .find_map(|a| Some((a.address?.as_link_addr()?.addr()?, a.flags)))
            .ok_or_else(|| err(io::Error::other("has no link-layer address")))?;
        Ok(Self {
            name: name.to_owned(),
            index,
            mac,
            running: flags.contains(InterfaceFlags::IFF_UP | InterfaceFlags::IFF_RUNNING),
        })
    }
}

/// An interface that could not be looked up, and why.
#[derive(Debug, thiserror::Error)]
#[error("interface {name}: {source}")]
pub struct InterfaceError {
    pub name: String,
    pub source: io::Error,
}

/// Parses a MAC address written as `aa:bb:cc:dd:ee:ff` (or with hyphens,
/// `aa-bb-cc-dd-ee-ff`, or Cisco's dots, `aabb.ccdd.eeff`).
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    text.parse::<macaddr::MacAddr6>()
        .ok()
        .map(|mac| mac.into_array())
}

/// Makes `addr` one of `interface`'s own addresses (as a /32 or /128), so
/// that this host answers ARP or neighbour solicitations for it there;
/// nothing changes if it is one already. An IPv6 address skips duplicate
/// address detection (it would stay tentative, unusable, for a second:
/// the source still has it, by design). One rtnetlink request (no `ip`
/// process: this runs at the cutover, next to a control loop that must not
/// lose its CPU).
pub fn own_address(interface: &str, addr: std::net::IpAddr) -> io::Result<()> {
    match host_address(interface, addr, true) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        done => done,
    }
}

/// Takes `addr` off `interface` if it is there as a host address (/32 or
/// /128, as [`own_address`] adds it); an address with a wider prefix is
/// the host's own on that network and stays. Whether it was removed.
pub fn release_address(interface: &str, addr: std::net::IpAddr) -> io::Result<bool> {
    match host_address(interface, addr, false) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether `addr` is one of this host's addresses (on any interface): a
/// socket can bind it.
pub fn is_local(addr: std::net::IpAddr) -> bool {
    std::net::UdpSocket::bind((addr, 0)).is_ok()
}

/// Adds (`add`) or deletes `addr` as a host address of `interface`.
fn host_address(interface: &str, addr: std::net::IpAddr, add: bool) -> io::Result<()> {
    use netlink_packet_core::{
        NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
    };
    use netlink_packet_route::{
        AddressFamily, RouteNetlinkMessage,
        address::{AddressAttribute, AddressHeaderFlags, AddressMessage, AddressScope},
    };
    use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

    let mut address = AddressMessage::default();
    address.header.index = if_nametoindex(interface)?;
    address.header.scope = AddressScope::Universe;
    (address.header.family, address.header.prefix_len) = match addr {
        std::net::IpAddr::V4(_) => (AddressFamily::Inet, 32),
        std::net::IpAddr::V6(_) => (AddressFamily::Inet6, 128),
    };
    if addr.is_ipv6() {
        address.header.flags = AddressHeaderFlags::Nodad;
    }
    address.attributes = vec![
        AddressAttribute::Local(addr),
        AddressAttribute::Address(addr),
    ];
    let mut request = match add {
        true => {
            let mut r = NetlinkMessage::from(RouteNetlinkMessage::NewAddress(address));
            r.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
            r
        }
        false => {
            let mut r = NetlinkMessage::from(RouteNetlinkMessage::DelAddress(address));
            r.header.flags = NLM_F_REQUEST | NLM_F_ACK;
            r
        }
    };
    request.header.sequence_number = 1;
    request.finalize();
    let mut message = vec![0; request.buffer_len()];
    request.serialize(&mut message);

    let socket = Socket::new(NETLINK_ROUTE)?;
    socket.send_to(&message, &SocketAddr::new(0, 0), 0)?;
    let (answer, _) = socket.recv_from_full()?;
    let answer = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer)
        .map_err(|e| io::Error::other(format!("rtnetlink's answer: {e}")))?;
    match answer.payload {
        NetlinkPayload::Error(e) if e.code.is_none() => Ok(()),
        NetlinkPayload::Error(e) => Err(e.to_io()),
        other => Err(io::Error::other(format!(
            "rtnetlink answered {:?}, not an acknowledgement",
            other.message_type()
        ))),
    }
}

/// Sends a gratuitous ARP request for `addr` from `interface`: neighbours
/// that know `addr` move it to this interface's MAC address at once
/// (Linux overrides its neighbour entry for a gratuitous ARP).
pub fn gratuitous_arp(interface: &str, addr: std::net::Ipv4Addr) -> io::Result<()> {
    let iface = Interface::by_name(interface).map_err(io::Error::other)?;
    let frame = arp_announcement(iface.mac, addr)?;
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid start.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = ETH_P_ARP.to_be();
    to.sll_ifindex = iface.index as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].fill(0xff);
    send_to(packet_socket()?, &frame, &to)
}

/// A packet socket for sending frames in the calling thread's network
/// namespace (a socket sends in the namespace it was made in): one per
/// namespace, made at first use and never closed, because closing a
/// packet socket waits for an RCU grace period (`synchronize_net`), about
/// 10 ms here, which would fall on the announce of every cutover. It takes
/// no protocol, so it receives nothing.
fn packet_socket() -> io::Result<std::os::fd::RawFd> {
    use std::{
        collections::HashMap,
        os::fd::{AsRawFd, FromRawFd, OwnedFd},
        sync::Mutex,
    };
    static SOCKETS: Mutex<Option<HashMap<u64, OwnedFd>>> = Mutex::new(None);
    let namespace =
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata("/proc/thread-self/ns/net")?);
    let mut sockets = SOCKETS.lock().unwrap();
    let sockets = sockets.get_or_insert_with(HashMap::new);
    if let Some(fd) = sockets.get(&namespace) {
        return Ok(fd.as_raw_fd());
    }
    // SAFETY: a plain socket call; the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor no one else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(sockets.entry(namespace).or_insert(fd).as_raw_fd())
}

/// A gratuitous ARP request: from `mac` to all, for `addr` by `addr`.
fn arp_announcement(mac: [u8; 6], addr: std::net::Ipv4Addr) -> io::Result<Vec<u8>> {
    let request = etherparse::ArpEthIpv4Packet {
        operation: etherparse::ArpOperation::REQUEST,
        sender_mac: mac,
        sender_ipv4: addr.octets(),
        target_mac: [0; 6],
        target_ipv4: addr.octets(),
    };
    let builder = etherparse::PacketBuilder::ethernet2(mac, [0xff; 6]).arp(request.into());
    let mut frame = Vec::with_capacity(builder.size());
    builder.write_to_vec(&mut frame).map_err(io::Error::other)?;
    Ok(frame)
}

/// Makes this host the owner of `addresses` on `interface` (each once: a
/// service's flows from several devices share one) and tells the
/// neighbours: a gratuitous ARP, or an unsolicited neighbour advertisement
/// for IPv6. An address it has already is fine. The addresses announced.
pub fn announce(
    interface: &str,
    addresses: impl IntoIterator<Item = std::net::IpAddr>,
) -> Result<Vec<std::net::IpAddr>, AnnounceError> {
    let mut addresses: Vec<std::net::IpAddr> = addresses.into_iter().collect();
    addresses.sort();
    addresses.dedup();
    for &address in &addresses {
        let owned = match own_address(interface, address) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            owned => owned,
        };
        owned
            .and_then(|()| match address {
                std::net::IpAddr::V4(v4) => gratuitous_arp(interface, v4),
                std::net::IpAddr::V6(v6) => unsolicited_na(interface, v6),
            })
            .map_err(|source| AnnounceError { address, source })?;
    }
    Ok(addresses)
}

/// An address that could not be announced, and why.
#[derive(Debug, thiserror::Error)]
#[error("announcing {address}: {source}")]
pub struct AnnounceError {
    pub address: std::net::IpAddr,
    pub source: io::Error,
}

/// Asks one neighbour whether it still holds an address: its kernel
/// answers each probe while it is up and reachable on this interface's
/// network, whatever its processes do. A probe goes to the holder's MAC
/// only, so that nothing else on the network sees it while that MAC is
/// known.
///
/// - IPv4: a unicast ARP probe saying 0.0.0.0 as its sender (RFC 5227),
///   so that no neighbour learns anything from it; the holder answers with
///   an ARP reply.
/// - IPv6: a unicast neighbour solicitation (RFC 4861 7.2.2) from this
///   interface's EUI-64 link-local address, naming this MAC (the holder
///   notes it, as for any neighbour that asks); the holder answers with a
///   solicited neighbour advertisement.
pub struct HolderProbe {
    socket: std::os::fd::OwnedFd,
    probe: Vec<u8>,
    to: libc::sockaddr_ll,
    address: std::net::IpAddr,
    holder: [u8; 6],
}

impl HolderProbe {
    /// A probe of `address` at `holder` from `interface`.
    pub fn open(interface: &str, address: std::net::IpAddr, holder: [u8; 6]) -> io::Result<Self> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let iface = Interface::by_name(interface).map_err(io::Error::other)?;
        let ethertype = match address {
            std::net::IpAddr::V4(_) => ETH_P_ARP,
            std::net::IpAddr::V6(_) => ETH_P_IPV6,
        };
        let protocol = ethertype.to_be();
        // SAFETY: a plain socket call; the descriptor is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                protocol as i32,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor no one else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid start.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_protocol = protocol;
        to.sll_ifindex = iface.index as i32;
        // Only this interface's frames of that type are received.
        // SAFETY: `to` is a valid sockaddr_ll for the call.
        let bound = unsafe {
            libc::bind(
                socket.as_raw_fd(),
                (&to as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if bound < 0 {
            return Err(io::Error::last_os_error());
        }
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&holder);
        let probe = match address {
            std::net::IpAddr::V4(v4) => arp_probe(iface.mac, holder, v4),
            std::net::IpAddr::V6(v6) => neighbour_solicitation(iface.mac, holder, v6),
        }?;
        Ok(Self {
            socket,
            probe,
            to,
            address,
            holder,
        })
    }

    /// Sends one probe.
    pub fn send(&self) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        send_to(self.socket.as_raw_fd(), &self.probe, &self.to)
    }

    /// Whether the holder answered a probe since the last call: reads
    /// every frame of the probe's type that came meanwhile.
    pub fn answered(&self) -> io::Result<bool> {
        use std::os::fd::AsRawFd;
        // An answer's headers fit; a longer frame is read cut.
        let mut frame = [0u8; 128];
        let mut answered = false;
        loop {
            // SAFETY: `frame` is valid for writes of its length.
            let n = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    frame.as_mut_ptr().cast(),
                    frame.len(),
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(answered),
                    _ => Err(e),
                };
            }
            let frame = &frame[..(n as usize).min(frame.len())];
            answered |= match self.address {
                std::net::IpAddr::V4(v4) => is_arp_reply(frame, v4, self.holder),
                std::net::IpAddr::V6(v6) => is_neighbour_advertisement(frame, v6, self.holder),
            };
        }
    }
}

/// An ARP probe of `address` from `mac` to `holder` (sender 0.0.0.0).
fn arp_probe(mac: [u8; 6], holder: [u8; 6], address: std::net::Ipv4Addr) -> io::Result<Vec<u8>> {
    let request = etherparse::ArpEthIpv4Packet {
        operation: etherparse::ArpOperation::REQUEST,
        sender_mac: mac,
        sender_ipv4: [0; 4],
        target_mac: [0; 6],
        target_ipv4: address.octets(),
    };
    let builder = etherparse::PacketBuilder::ethernet2(mac, holder).arp(request.into());
    let mut probe = Vec::with_capacity(builder.size());
    builder.write_to_vec(&mut probe).map_err(io::Error::other)?;
    Ok(probe)
}

/// A unicast neighbour solicitation of `address`, from `mac` (and its
/// EUI-64 link-local address) to `holder`, with the source link-layer
/// address option; hop limit 255, as neighbour discovery requires.
fn neighbour_solicitation(
    mac: [u8; 6],
    holder: [u8; 6],
    address: std::net::Ipv6Addr,
) -> io::Result<Vec<u8>> {
    const SOURCE_LINK_LAYER_ADDRESS: u8 = 1;
    let mut payload = address.octets().to_vec();
    payload.extend_from_slice(&[SOURCE_LINK_LAYER_ADDRESS, 1]);
    payload.extend_from_slice(&mac);
    let builder = etherparse::PacketBuilder::ethernet2(mac, holder)
        .ipv6(link_local(mac).octets(), address.octets(), 255)
        .icmpv6_raw(NEIGHBOUR_SOLICITATION, 0, [0; 4]);
    let mut probe = Vec::with_capacity(builder.size(payload.len()));
    builder
        .write(&mut probe, &payload)
        .map_err(io::Error::other)?;
    Ok(probe)
}

/// The EUI-64 link-local address of `mac` (RFC 4291 appendix A), the one
/// the kernel gives an interface by default.
fn link_local(mac: [u8; 6]) -> std::net::Ipv6Addr {
    std::net::Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        mac[0] ^ 2,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ])
}

/// Whether `frame` is an ARP reply saying that `holder` has `address`.
fn is_arp_reply(frame: &[u8], address: std::net::Ipv4Addr, holder: [u8; 6]) -> bool {
    // Ethernet header, then: hardware and protocol types and sizes (6),
    // the operation (2), the sender's MAC (6) and address (4).
    const ARP: usize = 14;
    const REPLY: [u8; 2] = [0, 2];
    frame.len() >= ARP + 18
        && frame[12..14] == ETH_P_ARP.to_be_bytes()
        && frame[ARP + 6..ARP + 8] == REPLY
        && frame[ARP + 8..ARP + 14] == holder
        && frame[ARP + 14..ARP + 18] == address.octets()
}

/// Whether `frame` is a neighbour advertisement from `holder` for `address`.
fn is_neighbour_advertisement(frame: &[u8], address: std::net::Ipv6Addr, holder: [u8; 6]) -> bool {
    // Ethernet header, the IPv6 header (next header at 6), then ICMPv6:
    // type, code, checksum, flags (8 bytes), the target address.
    const IP: usize = 14;
    const ICMP: usize = IP + 40;
    const ICMPV6: u8 = 58;
    frame.len() >= ICMP + 24
        && frame[6..12] == holder
        && frame[12..14] == ETH_P_IPV6.to_be_bytes()
        && frame[IP + 6] == ICMPV6
        && frame[ICMP] == NEIGHBOUR_ADVERTISEMENT
        && frame[ICMP + 8..ICMP + 24] == address.octets()
}

const NEIGHBOUR_SOLICITATION: u8 = 135;
const NEIGHBOUR_ADVERTISEMENT: u8 = 136;
const ETH_P_IPV6: u16 = 0x86DD;

const ETH_P_ARP: u16 = 0x0806;

/// Sends an unsolicited neighbour advertisement for `addr` from
/// `interface` to all nodes (RFC 4861 7.2.6), with the override flag and
/// this interface's MAC address: neighbours that know `addr` move it to
/// this interface at once, as a gratuitous ARP does for IPv4.
pub fn unsolicited_na(interface: &str, addr: std::net::Ipv6Addr) -> io::Result<()> {
    let iface = Interface::by_name(interface).map_err(io::Error::other)?;
    let message = neighbour_advertisement(iface.mac, addr);
    use std::net::{Ipv6Addr, SocketAddrV6};

    use nix::sys::socket::{
        AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn6, bind, sendto,
        setsockopt, socket, sockopt,
    };
    let fd = socket(
        AddressFamily::Inet6,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::IcmpV6,
    )?;
    // Receivers drop neighbour discovery that crossed a router.
    setsockopt(&fd, sockopt::Ipv6MulticastHops, &255)?;
    // From the address itself, as the kernel's own advertisements are.
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    bind(raw, &SockaddrIn6::from(SocketAddrV6::new(addr, 0, 0, 0)))?;
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let to = SockaddrIn6::from(SocketAddrV6::new(all_nodes, 0, 0, iface.index));
    sendto(raw, &message, &to, MsgFlags::empty())?;
    Ok(())
}

/// An ICMPv6 neighbour advertisement of `addr` at `mac`, overriding, not
/// solicited, with the checksum 0 (the kernel fills it in on ICMPv6 raw
/// sockets).
fn neighbour_advertisement(mac: [u8; 6], addr: std::net::Ipv6Addr) -> Vec<u8> {
    use etherparse::{Icmpv6Header, Icmpv6Type, icmpv6};
    const TARGET_LINK_LAYER_ADDRESS: u8 = 2;
    let header = Icmpv6Header::new(Icmpv6Type::NeighborAdvertisement(
        icmpv6::NeighborAdvertisementHeader {
            router: false,
            solicited: false,
            r#override: true,
        },
    ));
    let target = icmpv6::NeighborAdvertisementPayload {
        target_address: addr,
    };
    let mut message = header.to_bytes().to_vec();
    message.extend_from_slice(&target.to_bytes());
    // The option (etherparse writes no NDP options): type, length in
    // units of 8 bytes, the MAC address.
    message.extend_from_slice(&[TARGET_LINK_LAYER_ADDRESS, 1]);
    message.extend_from_slice(&mac);
    message
}

/// Sends `message` on socket `fd` to the socket address `to` (a libc
/// `sockaddr_*` of the socket's family).
fn send_to<A>(fd: std::os::fd::RawFd, message: &[u8], to: &A) -> io::Result<()> {
    // SAFETY: `message` and `to` are valid for the call; the length is the
    // address type's own.
    let sent = unsafe {
        libc::sendto(
            fd,
            message.as_ptr().cast(),
            message.len(),
            0,
            (to as *const A).cast(),
            size_of::<A>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_macs() {
        assert_eq!(
            parse_mac("02:00:5e:10:00:0a"),
            Some([2, 0, 0x5e, 0x10, 0, 0x0a])
        );
        assert_eq!(parse_mac("02:00:5e:10:00"), None);
        assert_eq!(parse_mac("02:00:5e:10:00:0a:01"), None);
        assert_eq!(parse_mac("zz:00:5e:10:00:0a"), None);
        assert_eq!(
            parse_mac("02-00-5E-10-00-0A"),
            Some([2, 0, 0x5e, 0x10, 0, 0x0a])
        );
        assert_eq!(parse_mac("02:00-5e:10:00:0a"), None);
    }

    const MAC: [u8; 6] = [2, 0, 0x5e, 0x10, 0, 0x0a];

    #[test]
    fn builds_a_gratuitous_arp_request() {
        let addr = std::net::Ipv4Addr::new(192, 0, 2, 10);
        let mut expected = vec![0xff; 6];
        expected.extend_from_slice(&MAC);
        expected.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
        expected.extend_from_slice(&MAC);
        expected.extend_from_slice(&addr.octets());
        expected.extend_from_slice(&[0; 6]);
        expected.extend_from_slice(&addr.octets());
        assert_eq!(arp_announcement(MAC, addr).unwrap(), expected);
    }

    #[test]
    fn solicits_the_holder_from_its_link_local_address_and_knows_its_advertisement() {
        let addr: std::net::Ipv6Addr = "2001:db8::10".parse().unwrap();
        let holder = [2, 0, 0, 0, 0, 9];
        let probe = neighbour_solicitation(MAC, holder, addr).unwrap();
        let parsed = etherparse::SlicedPacket::from_ethernet(&probe).unwrap();
        let Some(etherparse::NetSlice::Ipv6(ip)) = &parsed.net else {
            panic!("not IPv6: {parsed:?}")
        };
        assert_eq!(ip.header().hop_limit(), 255);
        assert_eq!(
            ip.header().source_addr(),
            "fe80::5eff:fe10:a".parse::<std::net::Ipv6Addr>().unwrap()
        );
        assert_eq!(ip.header().destination_addr(), addr);
        let Some(etherparse::TransportSlice::Icmpv6(icmp)) = &parsed.transport else {
            panic!("not ICMPv6")
        };
        assert_eq!(icmp.type_u8(), NEIGHBOUR_SOLICITATION);
        assert!(icmp.is_checksum_valid(ip.header().source(), ip.header().destination()));
        assert_eq!(&icmp.payload()[..16], &addr.octets());
        assert_eq!(&icmp.payload()[16..], &[1, 1, 2, 0, 0x5e, 0x10, 0, 0x0a]);
        // The holder's answer: a neighbour advertisement for the address.
        let answer = |from: [u8; 6], target: std::net::Ipv6Addr| {
            let mut payload = target.octets().to_vec();
            payload.extend_from_slice(&[2, 1]);
            payload.extend_from_slice(&from);
            let builder = etherparse::PacketBuilder::ethernet2(from, MAC)
                .ipv6(target.octets(), link_local(MAC).octets(), 255)
                .icmpv6_raw(NEIGHBOUR_ADVERTISEMENT, 0, [0x60, 0, 0, 0]);
            let mut frame = Vec::new();
            builder.write(&mut frame, &payload).unwrap();
            frame
        };
        assert!(is_neighbour_advertisement(
            &answer(holder, addr),
            addr,
            holder
        ));
        assert!(
            !is_neighbour_advertisement(&answer(MAC, addr), addr, holder),
            "another MAC"
        );
        let other: std::net::Ipv6Addr = "2001:db8::11".parse().unwrap();
        assert!(
            !is_neighbour_advertisement(&answer(holder, other), addr, holder),
            "another address"
        );
        assert!(
            !is_neighbour_advertisement(&probe, addr, MAC),
            "a solicitation"
        );
        assert!(
            !is_neighbour_advertisement(&answer(holder, addr)[..70], addr, holder),
            "cut short"
        );
    }

    #[test]
    fn knows_an_arp_reply_of_the_holder_only() {
        let addr = std::net::Ipv4Addr::new(192, 0, 2, 10);
        let reply = |operation, mac: [u8; 6], sender: std::net::Ipv4Addr| {
            let packet = etherparse::ArpEthIpv4Packet {
                operation,
                sender_mac: mac,
                sender_ipv4: sender.octets(),
                target_mac: [2, 0, 0, 0, 0, 1],
                target_ipv4: [0; 4],
            };
            let builder =
                etherparse::PacketBuilder::ethernet2(mac, [2, 0, 0, 0, 0, 1]).arp(packet.into());
            let mut frame = Vec::new();
            builder.write_to_vec(&mut frame).unwrap();
            frame
        };
        let reply_op = etherparse::ArpOperation::REPLY;
        assert!(is_arp_reply(&reply(reply_op, MAC, addr), addr, MAC));
        let other = [2, 0, 0, 0, 0, 9];
        assert!(
            !is_arp_reply(&reply(reply_op, other, addr), addr, MAC),
            "another holder"
        );
        let elsewhere = std::net::Ipv4Addr::new(192, 0, 2, 11);
        assert!(
            !is_arp_reply(&reply(reply_op, MAC, elsewhere), addr, MAC),
            "another address"
        );
        let request = etherparse::ArpOperation::REQUEST;
        assert!(
            !is_arp_reply(&reply(request, MAC, addr), addr, MAC),
            "a request"
        );
        assert!(
            !is_arp_reply(&reply(reply_op, MAC, addr)[..30], addr, MAC),
            "cut short"
        );
    }

    #[test]
    fn builds_an_overriding_neighbour_advertisement() {
        let addr: std::net::Ipv6Addr = "2001:db8::10".parse().unwrap();
        let mut expected = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
        expected.extend_from_slice(&addr.octets());
        expected.extend_from_slice(&[2, 1]);
        expected.extend_from_slice(&MAC);
        assert_eq!(neighbour_advertisement(MAC, addr), expected);
    }

    /// In a network namespace of its own (root only; skipped otherwise):
    /// the address is added once and found there, a second time is fine,
    /// it is released once, and an interface that does not exist is an
    /// error; a network address (a wider prefix) is never released.
    #[test]
    fn owns_and_releases_an_address_once() {
        std::thread::spawn(|| {
            if nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).is_err() {
                eprintln!("skipped: no network namespace (not root)");
                return;
            }
            let ip = |args: &[&str]| {
                let status = std::process::Command::new("ip").args(args).status();
                assert!(status.is_ok_and(|s| s.success()), "ip {args:?}");
            };
            // Only an address on an interface that is up can be bound.
            ip(&["link", "set", "lo", "up"]);
            for addr in ["192.0.2.10", "2001:db8::10"] {
                let addr: std::net::IpAddr = addr.parse().unwrap();
                own_address("lo", addr).unwrap();
                own_address("lo", addr).unwrap();
                let found = getifaddrs().unwrap().any(|a| {
                    a.interface_name == "lo"
                        && a.address.is_some_and(|s| {
                            s.as_sockaddr_in().map(|s| std::net::IpAddr::from(s.ip())) == Some(addr)
                                || s.as_sockaddr_in6().map(|s| std::net::IpAddr::from(s.ip()))
                                    == Some(addr)
                        })
                });
                assert!(found, "{addr} is not on lo");
                assert!(is_local(addr));
                assert!(release_address("lo", addr).unwrap());
                assert!(!is_local(addr), "{addr} released");
                assert!(!release_address("lo", addr).unwrap());
            }
            assert!(own_address("nonesuch0", "192.0.2.11".parse().unwrap()).is_err());
            ip(&["addr", "add", "192.0.2.20/24", "dev", "lo"]);
            let network = "192.0.2.20".parse().unwrap();
            assert!(!release_address("lo", network).unwrap());
            assert!(is_local(network));
        })
        .join()
        .unwrap();
    }
}
