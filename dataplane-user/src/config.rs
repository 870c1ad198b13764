//! The daemon's configuration: /etc/dataplane/dataplane.toml by default.
//!
//! Every key is optional except `interface`; the defaults are the ones shown
//! in `dataplane.example.toml` and documented here.
use std::{net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::kernel::loader::{DEFAULT_PIN_ROOT, LoadOptions};

/// Where the daemon reads its configuration unless told otherwise.
pub const DEFAULT_CONFIG: &str = "/etc/dataplane/dataplane.toml";
/// Where the daemon serves its control socket unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/run/dataplane/dataplane.sock";

/// The daemon's configuration.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Service-facing interface: CPS inputs arrive and outputs leave here. Required.
    pub interface: String,
    /// This host's interface on the migration network, which links it to
    /// every other host: mirror copies leave and arrive here, each flow's
    /// to the host it migrates to (learned at `prepare`). Default: none
    /// (no mirroring).
    #[serde(default)]
    pub peer_interface: Option<String>,
    /// The interface mirror frames are taken on (a standby's dataplane: the
    /// link from its source). Default: `peer_interface`.
    #[serde(default)]
    pub mirror_from: Option<String>,
    /// bpffs directory of the pins. Default: /sys/fs/bpf/dataplane.
    #[serde(default = "default_pin_root")]
    pub pin_root: PathBuf,
    /// Most bytes of a frame to log; 0 logs whole frames. Default: 0.
    #[serde(default)]
    pub snap_len: u32,
    /// Input log size in MiB, a power of two. Default: 64.
    #[serde(default = "default_input_ring_mib")]
    pub input_ring_mib: u32,
    /// Output log size in MiB, a power of two. Default: 16.
    #[serde(default = "default_output_ring_mib")]
    pub output_ring_mib: u32,
    /// Control socket path. Default: /run/dataplane/dataplane.sock.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Group that may use the control socket (mode 0660). Default: root's group only.
    #[serde(default)]
    pub socket_group: Option<String>,
    /// Requests a second one control connection may send; 0: no limit. Default: 100.
    #[serde(default = "default_socket_rate")]
    pub socket_rate: u32,
    /// Requests one control connection may send at once above that rate. Default: 200.
    #[serde(default = "default_socket_burst")]
    pub socket_burst: u32,
    /// Control connections open at once; more are refused. Default: 64.
    #[serde(default = "default_socket_max_connections")]
    pub socket_max_connections: u32,
    /// Address the peer link listens on, "ADDR:PORT". Default: none (no peer link).
    #[serde(default)]
    pub peer_listen: Option<SocketAddr>,
    /// This host's identity key for the peer link (X25519, the private
    /// half in hex, mode 0600), made at first start if there is none.
    /// Default: /var/lib/dataplane/identity.key.
    #[serde(default = "default_identity")]
    pub identity: PathBuf,
    /// The hosts this daemon links with, each by name, `peer_listen`
    /// address and public key: the only destinations of its migrations,
    /// and the only hosts its `peer_listen` admits. Default: none.
    #[serde(default)]
    pub peers: Vec<crate::peer::Peer>,
    /// Peer links in clear and unauthenticated: anyone who reaches
    /// `peer_listen` can have this host restore images as root. Only for a
    /// link no one else can reach. Default: false.
    #[serde(default)]
    pub peer_insecure: bool,
    /// Where the registered services are kept, so that a restarted daemon
    /// knows them. Default: /var/lib/dataplane/services.json.
    #[serde(default = "default_registry")]
    pub registry: PathBuf,
    /// Where checkpoint images received from a peer go. Default: /var/lib/dataplane/images.
    #[serde(default = "default_images_dir")]
    pub images_dir: PathBuf,
    /// Most image data one migration to this host may send, in MiB; more
    /// is refused. Default: 16384 (16 GiB).
    #[serde(default = "default_images_max_mib")]
    pub images_max_mib: u64,
    /// Most image files (links included) one migration to this host may
    /// send; more is refused. Default: 100000.
    #[serde(default = "default_images_max_files")]
    pub images_max_files: u64,
    /// A migration to this host that gets no step for this long, in s,
    /// rolls back by itself; never less than the source's deadline and
    /// 2 s. It must cover the source's checkpoint. Default: 120.
    #[serde(default = "default_migration_idle_s")]
    pub migration_idle_s: u64,
    /// A hot replica held here takes its service over once the serving
    /// host has been silent this long, in ms, on the migration network
    /// (mirror and peer link) and on the service network (ARP) alike. A
    /// few control periods of the service: each one is a cycle the CPS
    /// goes unanswered. 0: no failover. Default: 2.
    #[serde(default = "default_failover_after_ms")]
    pub failover_after_ms: u64,
    /// Standby mode (gundall2022 Option 2): the veth leading to the
    /// network namespace where this host's standby instances run. The
    /// daemon builds at start what is missing of that namespace, the veth
    /// (`eth0` inside) and the dataplane there. Default: none (no standbys).
    #[serde(default)]
    pub standby_interface: Option<String>,
    /// The standbys' network namespace; one the daemon makes is under
    /// /run/netns. Default: /run/netns/dataplane-standby.
    #[serde(default = "default_standby_netns")]
    pub standby_netns: PathBuf,
    /// Pin root of the dataplane in the standbys' namespace.
    /// Default: /sys/fs/bpf/dataplane-standby.
    #[serde(default = "default_standby_pin_root")]
    pub standby_pin_root: PathBuf,
    /// Where the services this daemon starts (`service start`) run: each
    /// in NAME/ under it, its standby in NAME/standby/. Made on every host a
    /// service migrates to: CRIU restores a process in its own working
    /// directory. Default: /var/lib/dataplane/services.
    #[serde(default = "default_services_dir")]
    pub services_dir: PathBuf,
    /// CPUs the services this daemon starts (and their restored
    /// instances) run on; standbys run on the others. Default: any.
    #[serde(default)]
    pub service_cpus: Vec<usize>,
    /// SCHED_FIFO priority (1 to 99) of the services this daemon starts,
    /// and of their standbys; 0 starts them as ordinary tasks. Default: 0.
    #[serde(default)]
    pub service_priority: u8,
    /// The CRIU binary. Default: /usr/local/sbin/criu (what `cargo xtask setup` installs).
    #[serde(default = "default_criu")]
    pub criu: PathBuf,
    /// A `criu service` socket (`criu service --address PATH`, e.g. a
    /// systemd socket unit) for dumps and checks. Default: none, every
    /// request goes to a `criu swrk` the daemon starts. Restores into this
    /// host's network namespace always use swrk: they hand CRIU a file
    /// descriptor, which a service cannot take.
    #[serde(default)]
    pub criu_service: Option<PathBuf>,
    /// runc's state directory for the containers services run as
    /// (`service add --container`), as `runc --root`. Default: /run/runc.
    #[serde(default = "default_runc_root")]
    pub runc_root: PathBuf,
    /// Where this host keeps the root filesystems its containers run from,
    /// one directory per image, the same on every host (as a registry
    /// provides them): a container migrates if it runs read-only from
    /// one of them, and runs on its destination from that host's copy.
    /// Default: /var/lib/dataplane/container-images.
    #[serde(default = "default_container_images")]
    pub container_images: PathBuf,
    /// podman's storage for the containers services run as under podman
    /// (`service add --runtime podman`), as `podman --root`; podman's own
    /// default if unset.
    #[serde(default)]
    pub podman_root: Option<PathBuf>,
    /// podman's run-time state, as `podman --runroot`; podman's own
    /// default if unset.
    #[serde(default)]
    pub podman_runroot: Option<PathBuf>,
    /// Where `dataplane calibrate` saves this host's migration model and
    /// `dataplane plan` and `dataplane migrate` read it.
    /// Default: /var/lib/dataplane/calibration.json.
    #[serde(default = "default_calibration")]
    pub calibration: PathBuf,
    /// SCHED_FIFO priority (1 to 99) of the daemon's threads, below the
    /// control tasks' own; 0 runs it as an ordinary task. Default: 0.
    #[serde(default)]
    pub realtime_priority: u8,
}

/// Where the daemon keeps its identity key unless configured otherwise.
pub const DEFAULT_IDENTITY: &str = "/var/lib/dataplane/identity.key";

fn default_identity() -> PathBuf {
    PathBuf::from(DEFAULT_IDENTITY)
}

fn default_registry() -> PathBuf {
    PathBuf::from("/var/lib/dataplane/services.json")
}

/// Where the calibration goes unless configured otherwise.
pub const DEFAULT_CALIBRATION: &str = "/var/lib/dataplane/calibration.json";

fn default_calibration() -> PathBuf {
    PathBuf::from(DEFAULT_CALIBRATION)
}

fn default_criu() -> PathBuf {
    PathBuf::from(crate::criu::DEFAULT_CRIU)
}

fn default_runc_root() -> PathBuf {
    PathBuf::from("/run/runc")
}

fn default_container_images() -> PathBuf {
    PathBuf::from("/var/lib/dataplane/container-images")
}

fn default_standby_netns() -> PathBuf {
    PathBuf::from("/run/netns/dataplane-standby")
}

fn default_standby_pin_root() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/dataplane-standby")
}

fn default_services_dir() -> PathBuf {
    PathBuf::from("/var/lib/dataplane/services")
}

fn default_pin_root() -> PathBuf {
    PathBuf::from(DEFAULT_PIN_ROOT)
}
fn default_input_ring_mib() -> u32 {
    64
}
fn default_output_ring_mib() -> u32 {
    16
}
fn default_socket_rate() -> u32 {
    100
}
fn default_socket_burst() -> u32 {
    200
}
fn default_socket_max_connections() -> u32 {
    64
}
fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}
fn default_images_dir() -> PathBuf {
    PathBuf::from("/var/lib/dataplane/images")
}
fn default_images_max_mib() -> u64 {
    16 << 10
}
fn default_images_max_files() -> u64 {
    100_000
}
fn default_failover_after_ms() -> u64 {
    2
}
fn default_migration_idle_s() -> u64 {
    120
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("socket_max_connections must be at least 1")]
    NoConnections,
    #[error("{0} must be 0 (an ordinary task) to 99, not {1}")]
    Priority(&'static str, u8),
    #[error(
        "peer_listen needs the hosts it admits listed under [[peers]] (name, address and \
         key); peer_insecure = true admits anyone instead, in clear"
    )]
    NoPeers,
    #[error("[[peers]] {0} has no key: list the key `dataplane keygen` prints on that host")]
    PeerWithoutKey(String),
    #[error("[[peers]] lists {0} twice")]
    PeerTwice(String),
}

impl DaemonConfig {
    /// Reads and checks the configuration file at `path`.
    pub fn read(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config = Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_owned(),
                source,
            },
            other => other,
        })?;
        Ok(config)
    }

    /// Parses and checks a configuration text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::new(),
            source: Box::new(source),
        })?;
        if config.socket_max_connections == 0 {
            return Err(ConfigError::NoConnections);
        }
        for (key, priority) in [
            ("realtime_priority", config.realtime_priority),
            ("service_priority", config.service_priority),
        ] {
            if priority > 99 {
                return Err(ConfigError::Priority(key, priority));
            }
        }
        config.check_peers()?;
        Ok(config)
    }

    /// A listening daemon lists whom it admits; every listed peer has a
    /// key (unless links are insecure); none is listed twice.
    fn check_peers(&self) -> Result<(), ConfigError> {
        if self.peer_listen.is_some() && self.peers.is_empty() && !self.peer_insecure {
            return Err(ConfigError::NoPeers);
        }
        for (i, peer) in self.peers.iter().enumerate() {
            if peer.key.is_none() && !self.peer_insecure {
                return Err(ConfigError::PeerWithoutKey(peer.name.clone()));
            }
            for other in &self.peers[..i] {
                let twice = match (&other.key, &peer.key) {
                    _ if other.name == peer.name => Some(peer.name.clone()),
                    _ if other.address == peer.address => Some(peer.address.to_string()),
                    (Some(a), Some(b)) if a == b => Some(format!("key {a}")),
                    _ => None,
                };
                if let Some(twice) = twice {
                    return Err(ConfigError::PeerTwice(twice));
                }
            }
        }
        Ok(())
    }

    /// The CRIU driver this configuration names.
    pub fn criu(&self) -> crate::criu::Criu {
        let criu = crate::criu::Criu::new(&self.criu);
        match &self.criu_service {
            Some(socket) => criu.with_service(socket),
            None => criu,
        }
    }

    /// The containers this configuration names.
    pub fn containers(&self) -> crate::host::container::Containers {
        crate::host::container::Containers {
            runc: crate::host::runc::Runc {
                root: self.runc_root.clone(),
            },
            podman: crate::host::podman::Podman {
                root: self.podman_root.clone(),
                runroot: self.podman_runroot.clone(),
            },
            images: self.container_images.clone(),
            criu: self.criu.clone(),
        }
    }

    /// The one interface mirror frames are taken on: `mirror_from`, or the
    /// peer interface.
    pub fn mirror_interface(&self) -> Option<String> {
        self.mirror_from
            .clone()
            .or_else(|| self.peer_interface.clone())
    }

    /// The loader's options this configuration stands for; `standby_mac`
    /// is the MAC of the standbys' end of `standby_interface`.
    pub fn load_options(&self, standby_mac: Option<[u8; 6]>) -> LoadOptions {
        LoadOptions {
            pin_root: self.pin_root.clone(),
            peer_interface: self.peer_interface.clone(),
            mirror_from: self.mirror_from.clone(),
            standby: self.standby_interface.clone().zip(standby_mac),
            snap_len: self.snap_len,
            input_ring_bytes: self.input_ring_mib << 20,
            output_ring_bytes: self.output_ring_mib << 20,
            ..LoadOptions::new(self.interface.clone())
        }
    }

    /// Where this host's standbys run, if it has them.
    pub fn standby_host(&self) -> Option<crate::standby::StandbyHost> {
        Some(crate::standby::StandbyHost {
            link: self.standby_interface.clone()?,
            netns: self.standby_netns.clone(),
            pin_root: self.standby_pin_root.clone(),
            // Its input log is read as it fills (a seeding replays from
            // it); its outputs, all muted, are read by no one.
            ring_bytes: (4 << 20, 1 << 20),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_in_documented_defaults() {
        let config = DaemonConfig::parse("interface = \"eth0\"").unwrap();
        assert_eq!(config.pin_root, PathBuf::from(DEFAULT_PIN_ROOT));
        assert_eq!(config.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!((config.input_ring_mib, config.output_ring_mib), (64, 16));
        assert_eq!(config.peer_listen, None);
        assert!(config.peers.is_empty() && !config.peer_insecure);
        assert_eq!(config.identity, PathBuf::from(DEFAULT_IDENTITY));
        assert_eq!(
            (
                config.socket_rate,
                config.socket_burst,
                config.socket_max_connections
            ),
            (100, 200, 64)
        );
        assert_eq!(config.calibration, PathBuf::from(DEFAULT_CALIBRATION));
        assert_eq!(
            (
                config.images_max_mib,
                config.images_max_files,
                config.migration_idle_s
            ),
            (16384, 100_000, 120)
        );
        let options = config.load_options(None);
        assert_eq!(options.input_ring_bytes, 64 << 20);
        assert_eq!(options.mirror_from, None, "the peer interface's");
        assert!(config.standby_host().is_none() && options.standby.is_none());
        assert_eq!(
            (
                config.services_dir,
                config.service_cpus,
                config.service_priority
            ),
            (PathBuf::from("/var/lib/dataplane/services"), vec![], 0)
        );
        let standby = DaemonConfig::parse("interface = \"eth0\"\nmirror_from = \"eth0\"");
        let options = standby.unwrap().load_options(None);
        assert_eq!(options.mirror_from.as_deref(), Some("eth0"));
    }

    #[test]
    fn the_example_file_parses() {
        let example = include_str!("../../dataplane.example.toml");
        let config = DaemonConfig::parse(example).unwrap();
        assert_eq!(config.interface, "eth0");
        assert_eq!(
            config.peer_listen,
            Some("198.51.100.1:7070".parse().unwrap())
        );
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        assert!(DaemonConfig::parse("interface = \"eth0\"\nintreface = 1").is_err());
        assert!(DaemonConfig::parse("").is_err(), "interface is required");
        let mac = DaemonConfig::parse(
            "interface = \"eth0\"\nstandby_interface = \"stby0\"\nstandby_mac = \"02:00:00:00:00:03\"",
        );
        assert!(mac.is_err(), "the standby's MAC is read off its link");
        let gone = DaemonConfig::parse("interface = \"eth0\"\npeer_mac = \"02:00:00:00:00:02\"");
        assert!(
            gone.is_err(),
            "peer_mac is learned per migration, not configured"
        );
        let priority = DaemonConfig::parse("interface = \"eth0\"\nrealtime_priority = 100");
        assert!(matches!(
            priority,
            Err(ConfigError::Priority("realtime_priority", 100))
        ));
        let priority = DaemonConfig::parse("interface = \"eth0\"\nservice_priority = 100");
        assert!(matches!(
            priority,
            Err(ConfigError::Priority("service_priority", 100))
        ));
    }

    #[test]
    fn a_listening_daemon_lists_its_peers_by_key() {
        let key = "0123456789abcdef".repeat(4);
        let peer = |name: &str, port: u16, key: &str| {
            format!("{{ name = \"{name}\", address = \"192.0.2.1:{port}\", key = \"{key}\" }}")
        };
        let listen = "interface = \"eth0\"\npeer_listen = \"192.0.2.2:7070\"\n";
        let config = DaemonConfig::parse(&format!("{listen}peers = [{}]", peer("a", 1, &key)));
        let peers = config.unwrap().peers;
        assert_eq!(peers[0].key, Some(key.parse().unwrap()));
        assert!(matches!(
            DaemonConfig::parse(listen),
            Err(ConfigError::NoPeers)
        ));
        let insecure = DaemonConfig::parse(&format!("{listen}peer_insecure = true"));
        assert!(insecure.unwrap().peer_insecure);
        let keyless = format!("{listen}peers = [{{ name = \"a\", address = \"192.0.2.1:1\" }}]");
        assert!(matches!(
            DaemonConfig::parse(&keyless),
            Err(ConfigError::PeerWithoutKey(_))
        ));
        assert!(DaemonConfig::parse(&format!("{keyless}\npeer_insecure = true")).is_ok());
        let twice = format!(
            "{listen}peers = [{}, {}]",
            peer("a", 1, &key),
            peer("b", 2, &key)
        );
        assert!(matches!(
            DaemonConfig::parse(&twice),
            Err(ConfigError::PeerTwice(_))
        ));
        let bad = format!("{listen}peers = [{}]", peer("a", 1, "abcd"));
        let error = DaemonConfig::parse(&bad).unwrap_err().to_string();
        assert!(error.contains("not a public key"), "{error}");
    }
}
