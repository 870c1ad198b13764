//! CPS flows: building, parsing and printing flow keys.
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use dataplane_common::FlowKey;

const IPPROTO_UDP: u8 = 17;

/// The key of the UDP flow from `cps` to `service`.
pub fn udp(cps: SocketAddr, service: SocketAddr) -> FlowKey {
    FlowKey {
        src_addr: mapped(cps.ip()),
        dst_addr: mapped(service.ip()),
        src_port: cps.port(),
        dst_port: service.port(),
        protocol: IPPROTO_UDP,
        _pad: [0; 3],
    }
}

/// The CPS end of `key`.
pub fn source(key: &FlowKey) -> SocketAddr {
    SocketAddr::new(unmapped(key.src_addr), key.src_port)
}

/// The service end of `key`.
pub fn destination(key: &FlowKey) -> SocketAddr {
    SocketAddr::new(unmapped(key.dst_addr), key.dst_port)
}

/// `udp 192.0.2.1:4000 -> 192.0.2.10:5000`
pub fn display(key: &FlowKey) -> String {
    format!("udp {} -> {}", source(key), destination(key))
}

fn mapped(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn unmapped(octets: [u8; 16]) -> IpAddr {
    Ipv6Addr::from(octets).to_canonical()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_v4_and_v6() {
        for (cps, svc) in [
            ("192.0.2.1:4000", "192.0.2.10:5000"),
            ("[2001:db8::1]:4000", "[2001:db8::10]:5000"),
        ] {
            let (cps, svc) = (cps.parse().unwrap(), svc.parse().unwrap());
            let key = udp(cps, svc);
            assert_eq!(source(&key), cps);
            assert_eq!(destination(&key), svc);
        }
        let key = udp(
            "192.0.2.1:4000".parse().unwrap(),
            "192.0.2.10:5000".parse().unwrap(),
        );
        assert_eq!(
            &key.src_addr[..12],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF]
        );
        assert_eq!(display(&key), "udp 192.0.2.1:4000 -> 192.0.2.10:5000");
    }
}
