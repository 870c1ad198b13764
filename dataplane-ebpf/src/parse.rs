//! Bounds-checked parsing of Ethernet / one VLAN tag / IPv4 or IPv6 / UDP.
//!
//! Anything the dataplane does not handle is reported as [`Skip`] so the
//! caller passes the frame untouched.
use dataplane_common::{ETH_P_MIRROR, FlowKey};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_FRAGMENT: u8 = 44;

/// Why a frame is not a UDP input the dataplane handles.
pub enum Skip {
    /// Truncated headers, or UDP in an IPv4 header with options or in a fragment.
    Malformed,
    /// Not UDP over IP.
    NotUdp,
}

/// What a frame is, when it is one the dataplane handles.
pub enum Frame {
    /// UDP over IPv4 or IPv6; the key is in the frame's own direction, and
    /// the headers up to the UDP payload take the given number of bytes.
    Udp(FlowKey, usize),
    /// A mirror frame from the peer host.
    Mirror,
}

/// A pointer to a `T` at `offset` into the packet, if the packet holds all of it.
#[inline(always)]
pub fn ptr_at<T>(data: usize, data_end: usize, offset: usize) -> Option<*const T> {
    if data + offset + core::mem::size_of::<T>() > data_end {
        return None;
    }
    Some((data + offset) as *const T)
}

#[inline(always)]
fn bytes<const N: usize>(data: usize, data_end: usize, offset: usize) -> Result<[u8; N], Skip> {
    let p = ptr_at::<[u8; N]>(data, data_end, offset).ok_or(Skip::Malformed)?;
    // SAFETY: ptr_at checked that the N bytes lie inside the packet.
    Ok(unsafe { p.read_unaligned() })
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// Parses the frame between `data` and `data_end`.
#[inline(always)]
pub fn parse(data: usize, data_end: usize) -> Result<Frame, Skip> {
    let mut ether_type = be16(bytes::<2>(data, data_end, 12)?);
    let mut l3 = ETH_HLEN;
    if ether_type == ETH_P_MIRROR {
        return Ok(Frame::Mirror);
    }
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        ether_type = be16(bytes::<2>(data, data_end, ETH_HLEN + 2)?);
        l3 += 4;
    }
    let mut key = FlowKey::default();
    let l4 = match ether_type {
        ETH_P_IP => {
            let ip = bytes::<20>(data, data_end, l3)?;
            if ip[0] >> 4 != 4 {
                return Err(Skip::Malformed);
            }
            if ip[9] != IPPROTO_UDP {
                return Err(Skip::NotUdp);
            }
            if ip[0] & 0x0F != 5 {
                // A header with options (or a bogus length): not handled.
                return Err(Skip::Malformed);
            }
            if be16([ip[6], ip[7]]) & 0x3FFF != 0 {
                // More-fragments bit or a fragment offset.
                return Err(Skip::Malformed);
            }
            key.src_addr[10] = 0xFF;
            key.src_addr[11] = 0xFF;
            key.src_addr[12..].copy_from_slice(&ip[12..16]);
            key.dst_addr[10] = 0xFF;
            key.dst_addr[11] = 0xFF;
            key.dst_addr[12..].copy_from_slice(&ip[16..20]);
            l3 + 20
        }
        ETH_P_IPV6 => {
            let ip = bytes::<40>(data, data_end, l3)?;
            if ip[0] >> 4 != 6 {
                return Err(Skip::Malformed);
            }
            match ip[6] {
                IPPROTO_UDP => {}
                IPPROTO_FRAGMENT => return Err(Skip::Malformed),
                _ => return Err(Skip::NotUdp),
            }
            key.src_addr.copy_from_slice(&ip[8..24]);
            key.dst_addr.copy_from_slice(&ip[24..40]);
            l3 + 40
        }
        _ => return Err(Skip::NotUdp),
    };
    let udp = bytes::<8>(data, data_end, l4)?;
    key.src_port = be16([udp[0], udp[1]]);
    key.dst_port = be16([udp[2], udp[3]]);
    key.protocol = IPPROTO_UDP;
    Ok(Frame::Udp(key, l4 + 8))
}
