//! Where this host's standby instances run (gundall2022 Option 2): a
//! network namespace of their own, linked to this host's by a veth, with a
//! dataplane of its own that takes the mirror copies the link brings and
//! mutes every output. The daemon builds at start what is missing of it
//! and adopts what is there (its own earlier build, or one an admin made).
//! Set-up, not a fast path: it runs `ip` (iproute2).
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
};

use crate::{
    host::netdev::Interface,
    kernel::loader::{Dataplane, LoadError, LoadOptions},
    service::FlowSpec,
};

/// The standbys' end of the link, inside their namespace.
pub const STANDBY_END: &str = "eth0";

/// Where this host's standbys run.
#[derive(Clone, Debug)]
pub struct StandbyHost {
    /// This host's end of the link (`standby_interface`).
    pub link: String,
    /// The standbys' network namespace.
    pub netns: PathBuf,
    /// Pin root of the dataplane in that namespace.
    pub pin_root: PathBuf,
    /// Its input and output log sizes, in bytes.
    pub ring_bytes: (u32, u32),
}

impl StandbyHost {
    /// Builds what is missing: the namespace, the link (its MTU that of
    /// `interface`, the service-facing one, so that every input fits), the
    /// dataplane in the namespace. Returns the MAC of the standbys' end,
    /// where this host's dataplane sends their copies.
    pub fn ensure(&self, interface: &str) -> Result<[u8; 6], StandbyError> {
        if !self.netns.exists() {
            ip(&["netns", "add", self.netns_name()?])?;
        }
        if Interface::by_name(&self.link).is_err() {
            let mtu = std::fs::read_to_string(format!("/sys/class/net/{interface}/mtu"))
                .map_err(|e| StandbyError::Interface(interface.into(), e))?;
            let mtu = mtu.trim();
            let netns = self.netns_name()?;
            ip(&[
                "link",
                "add",
                &self.link,
                "mtu",
                mtu,
                "type",
                "veth",
                "peer",
                "name",
                STANDBY_END,
                "mtu",
                mtu,
                "netns",
                netns,
            ])?;
            ip(&["link", "set", &self.link, "up"])?;
            ip(&["-n", netns, "link", "set", STANDBY_END, "up"])?;
            ip(&["-n", netns, "link", "set", "lo", "up"])?;
        }
        let (pin_root, ring_bytes) = (self.pin_root.clone(), self.ring_bytes);
        self.inside(move || -> Result<[u8; 6], StandbyError> {
            let end = Interface::by_name(STANDBY_END).map_err(StandbyError::Link)?;
            match Dataplane::open(&pin_root) {
                Ok(_) => {}
                Err(LoadError::NotLoaded(_)) => {
                    Dataplane::load(&LoadOptions {
                        pin_root,
                        mirror_from: Some(STANDBY_END.into()),
                        input_ring_bytes: ring_bytes.0,
                        output_ring_bytes: ring_bytes.1,
                        ..LoadOptions::new(STANDBY_END)
                    })?;
                    tracing::info!(link = %STANDBY_END, "loaded the standbys' dataplane");
                }
                Err(e) => return Err(e.into()),
            }
            Ok(end.mac)
        })?
    }

    /// Gives the standbys' namespace what a standby of a service fed by
    /// `flows` needs before it starts: the service's addresses, and a
    /// route and neighbour entry for each field device through this host's
    /// end of the link, so that its outputs leave (and its dataplane
    /// mutes them) instead of waiting on neighbour discovery.
    pub fn make_room(&self, flows: &[FlowSpec]) -> Result<(), StandbyError> {
        let netns = self.netns_name()?;
        let here = Interface::by_name(&self.link).map_err(StandbyError::Link)?;
        let mac = macaddr::MacAddr6::from(here.mac).to_string();
        let host = |addr: IpAddr| match addr {
            IpAddr::V4(_) => format!("{addr}/32"),
            IpAddr::V6(_) => format!("{addr}/128"),
        };
        for flow in flows {
            let (service, cps) = (flow.service.ip(), flow.cps.ip());
            let service_net = host(service);
            let cps_net = host(cps);
            let cps_text = cps.to_string();
            let mut address = vec!["-n", netns, "addr", "replace", &service_net];
            address.extend(["dev", STANDBY_END]);
            if service.is_ipv6() {
                address.push("nodad");
            }
            ip(&address)?;
            ip(&[
                "-n",
                netns,
                "route",
                "replace",
                &cps_net,
                "dev",
                STANDBY_END,
            ])?;
            ip(&[
                "-n",
                netns,
                "neigh",
                "replace",
                &cps_text,
                "lladdr",
                &mac,
                "dev",
                STANDBY_END,
                "nud",
                "permanent",
            ])?;
        }
        Ok(())
    }

    /// Runs `work` on a thread in the standbys' namespace (what it starts
    /// starts there too).
    pub fn inside<T: Send>(&self, work: impl FnOnce() -> T + Send) -> Result<T, StandbyError> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let namespace = std::fs::File::open(&self.netns)
                        .map_err(|e| StandbyError::Netns(self.netns.clone(), e))?;
                    nix::sched::setns(namespace, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(|e| StandbyError::Netns(self.netns.clone(), e.into()))?;
                    Ok(work())
                })
                .join()
                .unwrap_or(Err(StandbyError::Panicked))
        })
    }

    /// The namespace's name for `ip netns`: one the daemon makes is
    /// /run/netns/NAME.
    fn netns_name(&self) -> Result<&str, StandbyError> {
        match (self.netns.parent(), self.netns.file_name()) {
            (Some(dir), Some(name)) if dir == Path::new("/run/netns") => name
                .to_str()
                .ok_or(StandbyError::NotNamed(self.netns.clone())),
            _ => Err(StandbyError::NotNamed(self.netns.clone())),
        }
    }
}

/// Runs `ip ARGS`; its error output names what failed.
fn ip(args: &[&str]) -> Result<(), StandbyError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(StandbyError::Ip)?;
    if !out.status.success() {
        return Err(StandbyError::Refused(
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

/// What kept the standbys' place from being built.
#[derive(Debug, thiserror::Error)]
pub enum StandbyError {
    #[error("standby_netns {0}: to be made by the daemon it must be /run/netns/NAME")]
    NotNamed(PathBuf),
    #[error("standby_netns {0}: {1}")]
    Netns(PathBuf, std::io::Error),
    #[error("interface {0}: {1}")]
    Interface(String, std::io::Error),
    #[error("running ip (iproute2): {0}")]
    Ip(std::io::Error),
    #[error("ip {0}: {1}")]
    Refused(String, String),
    #[error(transparent)]
    Link(#[from] crate::host::netdev::InterfaceError),
    #[error("the standbys' dataplane: {0}")]
    Dataplane(#[from] LoadError),
    #[error("a thread in the standbys' namespace panicked")]
    Panicked,
}
