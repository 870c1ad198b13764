//! Facts about network interfaces, read in the calling thread's network namespace.
use std::{io, os::fd::FromRawFd};

use nix::{ifaddrs::getifaddrs, net::if_::if_nametoindex};

/// A network interface of this host.
#[derive(Clone, Debug)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
}

impl Interface {
    /// Looks `name` up in the calling thread's network namespace.
    pub fn by_name(name: &str) -> Result<Self, InterfaceError> {
        let err = |source: io::Error| InterfaceError {
            name: name.to_owned(),
            source,
        };
        let index = if_nametoindex(name).map_err(|e| err(e.into()))?;
        let mac = getifaddrs()
            .map_err(|e| err(e.into()))?
            .filter(|a| a.interface_name == name)
            .find_map(|a| a.address?.as_link_addr()?.addr())
            .ok_or_else(|| err(io::Error::other("has no link-layer address")))?;
        Ok(Self {
            name: name.to_owned(),
            index,
            mac,
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
    let index = if_nametoindex(interface)?;
    let (family, prefix, flags, octets) = match addr {
        std::net::IpAddr::V4(a) => (libc::AF_INET, 32, 0, a.octets().to_vec()),
        std::net::IpAddr::V6(a) => (libc::AF_INET6, 128, libc::IFA_F_NODAD, a.octets().to_vec()),
    };
    // nlmsghdr (16) + ifaddrmsg (8) + IFA_LOCAL and IFA_ADDRESS.
    let attribute_len = 4 + octets.len();
    let len = 16 + 8 + 2 * attribute_len;
    let mut msg = Vec::with_capacity(len);
    let request =
        (libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16;
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&libc::RTM_NEWADDR.to_ne_bytes());
    msg.extend_from_slice(&request.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    msg.extend_from_slice(&[family as u8, prefix, flags as u8, libc::RT_SCOPE_UNIVERSE]);
    msg.extend_from_slice(&index.to_ne_bytes());
    for kind in [libc::IFA_LOCAL, libc::IFA_ADDRESS] {
        msg.extend_from_slice(&(attribute_len as u16).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&octets);
    }
    // SAFETY: plain socket calls on a descriptor this function owns.
    let fd = unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        std::os::fd::OwnedFd::from_raw_fd(fd)
    };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    // SAFETY: sockaddr_nl zeroed is the kernel's address; buffers are ours.
    let mut ack = [0u8; 256];
    let received = unsafe {
        let mut to: libc::sockaddr_nl = std::mem::zeroed();
        to.nl_family = libc::AF_NETLINK as u16;
        send_to(raw, &msg, &to)?;
        libc::recv(raw, ack.as_mut_ptr().cast(), ack.len(), 0)
    };
    if received < 20 {
        return Err(io::Error::other("no answer from rtnetlink"));
    }
    // NLMSG_ERROR: the error code (0 is the ack) follows the header.
    let error = i32::from_ne_bytes(ack[16..20].try_into().expect("4 bytes"));
    match -error {
        0 | libc::EEXIST => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

/// Sends a gratuitous ARP request for `addr` from `interface`: neighbours
/// that know `addr` move it to this interface's MAC address at once
/// (Linux overrides its neighbour entry for a gratuitous ARP).
pub fn gratuitous_arp(interface: &str, addr: std::net::Ipv4Addr) -> io::Result<()> {
    let iface = Interface::by_name(interface).map_err(io::Error::other)?;
    const ETH_P_ARP: u16 = 0x0806;
    let mut frame = Vec::with_capacity(42);
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&iface.mac);
    frame.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    // Ethernet, IPv4, address lengths 6 and 4, request.
    frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&iface.mac);
    frame.extend_from_slice(&addr.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&addr.octets());
    // SAFETY: plain socket calls on a descriptor this function owns.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
        let mut to: libc::sockaddr_ll = std::mem::zeroed();
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_protocol = ETH_P_ARP.to_be();
        to.sll_ifindex = iface.index as i32;
        to.sll_halen = 6;
        to.sll_addr[..6].fill(0xff);
        send_to(std::os::fd::AsRawFd::as_raw_fd(&fd), &frame, &to)
    }
}

/// Sends an unsolicited neighbour advertisement for `addr` from
/// `interface` to all nodes (RFC 4861 7.2.6), with the override flag and
/// this interface's MAC address: neighbours that know `addr` move it to
/// this interface at once, as a gratuitous ARP does for IPv4.
pub fn unsolicited_na(interface: &str, addr: std::net::Ipv6Addr) -> io::Result<()> {
    let iface = Interface::by_name(interface).map_err(io::Error::other)?;
    const NEIGHBOR_ADVERTISEMENT: u8 = 136;
    const OVERRIDE: u32 = 0x2000_0000;
    const TARGET_LINK_LAYER_ADDRESS: u8 = 2;
    let mut message = Vec::with_capacity(32);
    // Type, code, checksum (the kernel fills it in on ICMPv6 raw sockets).
    message.extend_from_slice(&[NEIGHBOR_ADVERTISEMENT, 0, 0, 0]);
    message.extend_from_slice(&OVERRIDE.to_be_bytes());
    message.extend_from_slice(&addr.octets());
    // The option: type, length in units of 8 bytes, the MAC address.
    message.extend_from_slice(&[TARGET_LINK_LAYER_ADDRESS, 1]);
    message.extend_from_slice(&iface.mac);
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
    use super::parse_mac;

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
}
