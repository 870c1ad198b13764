//! A service as the daemon knows it: the processes a migration moves and the
//! flows that feed them.
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::host::tasks::Identity;

/// A service the daemon knows: the processes and flows a migration moves.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// Unique name.
    pub name: String,
    /// The service's process (the root of its PID namespace, if it has
    /// one). With a `container`, the daemon takes its init process.
    #[serde(default)]
    pub pid: u32,
    /// Its network namespace, e.g. /run/netns/src. Default: the daemon's.
    #[serde(default)]
    pub netns: Option<String>,
    /// The flows that feed it, as "CPS_ADDR:PORT" -> "SERVICE_ADDR:PORT" pairs.
    pub flows: Vec<FlowSpec>,
    /// A standby instance's process, fed by the mirror (gundall2022 Option 2).
    #[serde(default)]
    pub standby_pid: Option<u32>,
    /// The command the daemon started it with (`service start`): what a
    /// host it migrates to starts again for a standby. None for a service
    /// started otherwise.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// The OCI container the service runs as, by its id (or name) in this
    /// host's `runtime`; `pid` is its init process.
    #[serde(default)]
    pub container: Option<String>,
    /// The standby's container, by its id; `standby_pid` is its init.
    #[serde(default)]
    pub standby_container: Option<String>,
    /// The runtime its containers run under.
    #[serde(default)]
    pub runtime: Runtime,
    /// Its processes as they were when the daemon registered them: a
    /// migration checks them before CRIU touches a process and before it
    /// kills one (pids are reused). Set by the daemon, never by a caller.
    #[serde(skip)]
    pub registered: Vec<Identity>,
}

impl Service {
    /// Whether `pid`, one of this service's processes, is still the
    /// process that was registered.
    pub fn still_runs(&self, pid: u32) -> bool {
        self.registered.iter().any(|p| p.pid == pid && p.runs())
    }

    /// Its instances: the serving one and the standby, each with its
    /// container if it runs as one.
    pub fn instances(&self) -> impl Iterator<Item = (u32, Option<&str>)> {
        let serving = (self.pid, self.container.as_deref());
        let standby = self
            .standby_pid
            .map(|pid| (pid, self.standby_container.as_deref()));
        std::iter::once(serving).chain(standby)
    }
}

/// The runtime a container runs under.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// runc, with this host's `runc_root`.
    #[default]
    Runc,
    /// podman (with runc and cgroupfs), with this host's `podman_root`.
    Podman,
}

/// Whether `name` is a plain name: letters, digits, `.`, `_`, `-`, at most
/// 128 bytes, never `.` or `..`. Service names, migration ids and image
/// file names are plain: each becomes a path component on some host.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// A service name that is not a [plain name](is_plain_name).
#[derive(Debug, thiserror::Error)]
#[error("service name {0:?}: a plain name is 1 to 128 letters, digits, `.`, `_` or `-`")]
pub struct NotPlainName(pub String);

/// `name` if it is a plain name, for a service.
pub fn service_name(name: &str) -> Result<&str, NotPlainName> {
    match is_plain_name(name) {
        true => Ok(name),
        false => Err(NotPlainName(name.to_string())),
    }
}

/// A flow by its ends.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FlowSpec {
    pub cps: SocketAddr,
    pub service: SocketAddr,
}
