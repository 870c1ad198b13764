//! Facts about network interfaces, read in the calling thread's network namespace.
use std::io;

use nix::{ifaddrs::getifaddrs, net::if_::if_nametoindex};

use crate::loader::LoadError;

/// A network interface of this host.
#[derive(Clone, Debug)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
}

impl Interface {
    /// Looks `name` up in the calling thread's network namespace.
    pub fn by_name(name: &str) -> Result<Self, LoadError> {
        let err = |source: io::Error| LoadError::Interface {
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

/// Parses a MAC address written as `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
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
    }
}
