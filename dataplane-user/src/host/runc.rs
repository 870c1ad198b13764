//! Services that run as OCI containers, under runc or under podman (with
//! runc): what the daemon asks runc (a container's state, a restore from
//! a bundle, a delete) and what it takes from a container's configuration
//! to dump it with CRIU itself. podman's side is in [`super::podman`],
//! the choice between them in [`super::container`].
//!
//! The daemon dumps a container as it dumps a process, through CRIU's RPC
//! and under its own hold, with the options runc gives CRIU for one (the
//! rootfs as CRIU's root, the bind and cgroup mounts as external mounts,
//! cgroups managed, the network namespace an external under runc's key).
//! The container's runtime restores it on the destination (runc from a
//! bundle the daemon writes, podman into a container it made for it), so
//! that the destination's runtime knows it (docs/design.md, Containers).
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde::{Deserialize, Serialize};

use crate::service::Runtime;

/// The runc binary, as the daemon's PATH finds it.
const RUNC: &str = "runc";

/// The key under which runc names a container's network namespace when
/// that namespace is not the container's own: `runc restore` gives CRIU
/// the namespace of its bundle under this key, so a dump must use it.
pub const NETNS_KEY: &str = "extRootNetNS";

/// The file runc reads a checkpoint's standard descriptors from.
const DESCRIPTORS: &str = "descriptors.json";

/// Writes `spec` as the configuration of the bundle at `bundle`.
pub fn write_bundle(bundle: &Path, spec: &serde_json::Value) -> Result<(), ContainerError> {
    std::fs::create_dir_all(bundle)
        .and_then(|()| std::fs::write(bundle.join("config.json"), spec.to_string()))
        .map_err(|source| ContainerError::Bundle {
            path: bundle.to_owned(),
            source,
        })
}

/// runc with its state directory (`--root`): the containers of one host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Runc {
    /// runc's state directory, where `runc list` looks.
    pub root: PathBuf,
}

impl Runc {
    /// `runc state ID`.
    pub fn state(&self, id: &str) -> Result<State, ContainerError> {
        let out = self.call("state", &["state", id])?;
        serde_json::from_slice(&out).map_err(|e| ContainerError::Answer(format!("runc state: {e}")))
    }

    /// Restores container `id` from the checkpoint in `images` with the
    /// bundle `bundle`, detached, and returns its init process.
    pub fn restore(
        &self,
        criu: &Path,
        id: &str,
        bundle: &Path,
        images: &Path,
    ) -> Result<u32, ContainerError> {
        let (bundle, dir) = (bundle.display().to_string(), images.display().to_string());
        let restored = self.call(
            "restore",
            &[
                "--criu",
                &criu.display().to_string(),
                "restore",
                "--detach",
                "--image-path",
                &dir,
                "--work-path",
                &dir,
                "--bundle",
                &bundle,
                id,
            ],
        );
        restored.map_err(|e| with_criu_errors(e, &images.join("restore.log")))?;
        Ok(self.state(id)?.pid)
    }

    /// Runs container `id` from `bundle`, detached: its init process. The
    /// container keeps runc's standard descriptors, so they are /dev/null
    /// (CRIU can dump that); runc's messages go to `runc.log` in the bundle.
    pub fn run(&self, id: &str, bundle: &Path) -> Result<u32, ContainerError> {
        let log = bundle.join("runc.log");
        let status = Command::new(RUNC)
            .arg("--root")
            .arg(&self.root)
            .arg("--log")
            .arg(&log)
            .args(["run", "--detach", "--bundle"])
            .arg(bundle)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(ContainerError::Spawn)?;
        if !status.success() {
            let logged = std::fs::read_to_string(&log).unwrap_or_default();
            let message = logged.lines().rev().find(|l| !l.trim().is_empty());
            return Err(ContainerError::Failed {
                command: "runc run".into(),
                message: message.unwrap_or("no message").trim().to_string(),
            });
        }
        Ok(self.state(id)?.pid)
    }

    /// Kills container `id` and removes it from runc's state (and its
    /// cgroups). A container runc does not know is no error.
    pub fn delete(&self, id: &str) -> Result<(), ContainerError> {
        match self.call("delete", &["delete", "--force", id]) {
            Err(ContainerError::Failed { message, .. }) if message.contains("does not exist") => {
                Ok(())
            }
            other => other.map(drop),
        }
    }

    /// As [`Runc::delete`], for a cleanup that goes on whatever happens:
    /// a failure is logged.
    pub fn discard(&self, id: &str) {
        if let Err(e) = self.delete(id) {
            tracing::warn!(container = id, "{e}");
        }
    }

    /// The ids of the containers runc knows here.
    pub fn list(&self) -> Result<Vec<String>, ContainerError> {
        #[derive(Deserialize)]
        struct Listed {
            id: String,
        }
        let out = self.call("list", &["list", "--format", "json"])?;
        let listed: Option<Vec<Listed>> = serde_json::from_slice(&out)
            .map_err(|e| ContainerError::Answer(format!("runc list: {e}")))?;
        Ok(listed.into_iter().flatten().map(|c| c.id).collect())
    }

    /// runc's output for `command` (`args` name it, after runc's own
    /// options), or its error.
    fn call(&self, command: &str, args: &[&str]) -> Result<Vec<u8>, ContainerError> {
        let mut runc = Command::new(RUNC);
        runc.arg("--root").arg(&self.root).args(args);
        call(runc, &format!("runc {command}"))
    }
}

/// A runtime's failed restore `failed`, with CRIU's own account of it
/// from its log at `log`, which says more than the runtime's.
pub(super) fn with_criu_errors(failed: ContainerError, log: &Path) -> ContainerError {
    match failed {
        ContainerError::Failed { command, message } => {
            let criu = crate::criu::logged_errors(&log.display().to_string());
            ContainerError::Failed {
                command,
                message: match criu {
                    Some(errors) => format!("{message}; CRIU: {errors}"),
                    None => message,
                },
            }
        }
        other => other,
    }
}

/// The output of a runtime's `command` (`program` runs it), or its error.
/// Its stdout and stderr are files in memory: a container it starts may
/// keep the runtime's descriptors open, and a pipe would then wait for the
/// container to end.
pub(super) fn call(mut program: Command, command: &str) -> Result<Vec<u8>, ContainerError> {
    let memory = || -> Result<std::fs::File, ContainerError> {
        use nix::sys::memfd::{MFdFlags, memfd_create};
        let fd = memfd_create("runtime", MFdFlags::MFD_CLOEXEC)
            .map_err(|e| ContainerError::Spawn(e.into()))?;
        Ok(fd.into())
    };
    let (out, err) = (memory()?, memory()?);
    let status = program
        .stdin(Stdio::null())
        .stdout(out.try_clone().map_err(ContainerError::Spawn)?)
        .stderr(err.try_clone().map_err(ContainerError::Spawn)?)
        .status()
        .map_err(ContainerError::Spawn)?;
    let read = |mut file: std::fs::File| {
        use std::io::{Read, Seek};
        let mut bytes = Vec::new();
        let _ = file.rewind().and_then(|()| file.read_to_end(&mut bytes));
        bytes
    };
    // Runtimes log warnings before their error: the last line is the error.
    let error = String::from_utf8_lossy(&read(err)).to_string();
    let message = error.lines().rev().find(|l| !l.trim().is_empty());
    match status.success() {
        true => Ok(read(out)),
        false => Err(ContainerError::Failed {
            command: command.to_string(),
            message: message.unwrap_or("no message").trim().to_string(),
        }),
    }
}

/// A container as its runtime shows it (`runc state`, `podman inspect`).
#[derive(Clone, Debug, Deserialize)]
pub struct State {
    pub pid: u32,
    pub status: String,
    /// Where its config.json is.
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
}

/// A container's OCI configuration (config.json) at `path`.
pub fn read_spec(path: &Path) -> Result<serde_json::Value, ContainerError> {
    let text = std::fs::read(path).map_err(|source| ContainerError::Bundle {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_slice(&text)
        .map_err(|e| ContainerError::Answer(format!("{}: {e}", path.display())))
}

/// What a migration carries of a container: its configuration and the
/// image (rootfs) it runs from, by name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Image {
    /// The image's name: its rootfs is IMAGES/NAME on every host
    /// (`container_images`).
    pub name: String,
    /// The container's OCI configuration (config.json), as on its source.
    pub spec: serde_json::Value,
    /// The runtime it runs under, and is restored by.
    #[serde(default)]
    pub runtime: Runtime,
}

impl Image {
    /// The image of a running container of `runtime` configured as `spec`,
    /// which must run from a read-only `rootfs` in `images` (this host's
    /// `container_images`).
    pub fn of(
        rootfs: &Path,
        spec: serde_json::Value,
        images: &Path,
        runtime: Runtime,
    ) -> Result<Self, ContainerError> {
        // runc resolves the rootfs's links; so must the comparison.
        let store = std::fs::canonicalize(images).ok();
        let name = rootfs
            .parent()
            .filter(|dir| std::fs::canonicalize(dir).ok() == store && store.is_some())
            .and(rootfs.file_name())
            .and_then(|n| n.to_str())
            .filter(|n| crate::service::is_plain_name(n))
            .ok_or_else(|| ContainerError::NotAnImage {
                rootfs: rootfs.to_owned(),
                images: images.to_owned(),
            })?;
        if spec["root"]["readonly"] != serde_json::Value::Bool(true) {
            return Err(ContainerError::WritableRoot(rootfs.to_owned()));
        }
        let image = Self {
            name: name.to_string(),
            spec,
            runtime,
        };
        image.network()?;
        Ok(image)
    }

    /// The network namespace the container joins, by path.
    fn network(&self) -> Result<&str, ContainerError> {
        self.spec["linux"]["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|ns| ns["type"] == "network")
            .and_then(|ns| ns["path"].as_str())
            .ok_or(ContainerError::OwnNetwork)
    }

    /// The mounts CRIU must take as external for a dump: the container's
    /// bind mounts, each under its destination in the container (the key
    /// `runc restore` maps to the mount's source on the destination).
    pub fn external_mounts(&self) -> Vec<String> {
        self.mounts()
            .filter(|m| is_bind(m))
            .filter_map(|m| m["destination"].as_str())
            .map(|dest| format!("mnt[{dest}]:{dest}"))
            .collect()
    }

    fn mounts(&self) -> impl Iterator<Item = &serde_json::Value> {
        self.spec["mounts"].as_array().into_iter().flatten()
    }

    /// Its rootfs on this host, if this host can restore it: the image is
    /// a plain name in `images` (a peer names an image, never a path), and
    /// the container joins a network namespace by path.
    pub fn rootfs(&self, images: &Path) -> Result<PathBuf, ContainerError> {
        if !crate::service::is_plain_name(&self.name) {
            return Err(ContainerError::ImageName(self.name.clone()));
        }
        let rootfs = images.join(&self.name);
        if !rootfs.is_dir() {
            return Err(ContainerError::NoImage(rootfs));
        }
        self.network()?;
        Ok(rootfs)
    }

    /// The bundle that restores it on this host: its [rootfs](Self::rootfs)
    /// (read-only), its network namespace `netns`, its cgroup
    /// `cgroups_path`. Hooks are left out: a peer may have this host
    /// restore a container, not run commands on it.
    pub fn bundle(
        &self,
        images: &Path,
        netns: &Path,
        cgroups_path: &str,
    ) -> Result<serde_json::Value, ContainerError> {
        let rootfs = self.rootfs(images)?;
        let mut spec = self.spec.clone();
        spec["root"] = serde_json::json!({"path": rootfs, "readonly": true});
        if let Some(spec) = spec.as_object_mut() {
            spec.remove("hooks");
        }
        spec["linux"]["cgroupsPath"] = cgroups_path.into();
        join_network(&mut spec, netns);
        Ok(spec)
    }
}

/// The cgroup mounts in the container of process `pid`, for CRIU as
/// external mounts under their paths in the container: runc makes them
/// from the host's hierarchies (one per controller on cgroup v1), and
/// `runc restore` maps the same keys to this host's.
pub fn cgroup_mounts(pid: u32) -> Result<Vec<String>, ContainerError> {
    let path = format!("/proc/{pid}/mountinfo");
    let mountinfo = std::fs::read_to_string(&path).map_err(|source| ContainerError::Bundle {
        path: path.into(),
        source,
    })?;
    Ok(parse_cgroup_mounts(&mountinfo))
}

/// The mount points (as the process sees them) of the cgroup file systems
/// in `mountinfo`: "ID PARENT MAJ:MIN ROOT POINT OPTIONS ... - TYPE ...".
fn parse_cgroup_mounts(mountinfo: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            let point = mount.split(' ').nth(4)?;
            let fs_type = fs.split(' ').next()?;
            matches!(fs_type, "cgroup" | "cgroup2").then(|| format!("mnt[{point}]:{point}"))
        })
        .collect()
}

fn is_bind(mount: &serde_json::Value) -> bool {
    mount["type"] == "bind"
        || mount["options"]
            .as_array()
            .is_some_and(|o| o.iter().any(|o| o == "bind" || o == "rbind"))
}

/// Writes what runc reads of a checkpoint besides CRIU's images: the
/// container's standard descriptors, as its init process has them.
pub fn write_descriptors(pid: u32, images: &Path) -> Result<(), ContainerError> {
    let descriptors: Vec<String> = (0..3)
        .map(|fd| std::fs::read_link(format!("/proc/{pid}/fd/{fd}")))
        .map(|target| target.map(|t| t.display().to_string()))
        .collect::<Result<_, _>>()
        .map_err(ContainerError::Descriptors)?;
    let json = serde_json::to_vec(&descriptors).expect("strings serialize");
    std::fs::write(images.join(DESCRIPTORS), json).map_err(ContainerError::Descriptors)
}

/// `spec` of a container whose init is `pid`, joining by path the network
/// namespace it shares with its runtime if its spec names none (podman's
/// `--network host`, run in the service's namespace): as every container
/// a migration moves, it joins a namespace the destination replaces with
/// its own. A namespace of its own (no path) stays, and is refused.
pub(super) fn join_network_by_path(mut spec: serde_json::Value, pid: u32) -> serde_json::Value {
    let namespaces = spec["linux"]["namespaces"].as_array();
    if !namespaces
        .into_iter()
        .flatten()
        .any(|ns| ns["type"] == "network")
    {
        join_network(&mut spec, Path::new(&format!("/proc/{pid}/ns/net")));
    }
    spec
}

/// Has `spec` join the network namespace at `path`.
pub fn join_network(spec: &mut serde_json::Value, path: &Path) {
    let network = serde_json::json!({"type": "network", "path": path});
    let namespaces = &mut spec["linux"]["namespaces"];
    match namespaces.as_array_mut() {
        Some(namespaces) => {
            namespaces.retain(|ns| ns["type"] != "network");
            namespaces.push(network);
        }
        None => *namespaces = serde_json::json!([network]),
    }
}

/// A path that names the daemon's network namespace to runc, which a
/// container restored here joins: the host's own (/proc/1/ns/net), or the
/// namespace's name under /run/netns.
pub fn own_netns() -> Result<PathBuf, ContainerError> {
    use std::os::unix::fs::MetadataExt;
    let id = |path: &Path| std::fs::metadata(path).map(|m| (m.dev(), m.ino())).ok();
    let own = id(Path::new("/proc/self/ns/net")).ok_or(ContainerError::UnnamedNetns)?;
    let host = PathBuf::from("/proc/1/ns/net");
    if id(&host) == Some(own) {
        return Ok(host);
    }
    std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .find(|path| id(path) == Some(own))
        .ok_or(ContainerError::UnnamedNetns)
}

/// What went wrong with a container or its runtime.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("starting the container runtime: {0} (`cargo xtask setup` installs runc and podman)")]
    Spawn(std::io::Error),
    #[error("{command}: {message}")]
    Failed { command: String, message: String },
    #[error("{0}")]
    Answer(String),
    #[error("the container's standard descriptors, for runc: {0}")]
    Descriptors(std::io::Error),
    #[error("container {0} is {1}, not running")]
    NotRunning(String, String),
    #[error("reading the container's bundle {}: {source}", path.display())]
    Bundle {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the container runs from {}, not from an image in {} (`container_images`): \
         a destination could not find its rootfs",
        rootfs.display(),
        images.display()
    )]
    NotAnImage { rootfs: PathBuf, images: PathBuf },
    #[error(
        "the container's rootfs {} is writable: what it wrote there would stay on the source \
         (make root.readonly true and keep its state in tmpfs mounts, which CRIU carries)",
        .0.display()
    )]
    WritableRoot(PathBuf),
    #[error("the image is not on this host: no {}", .0.display())]
    NoImage(PathBuf),
    #[error("image name {0:?}: a plain name is 1 to 128 letters, digits, `.`, `_` or `-`")]
    ImageName(String),
    #[error(
        "the container has a network namespace of its own: it must join its host's service \
         namespace (a `network` namespace with a path), where the dataplane sees its traffic"
    )]
    OwnNetwork,
    #[error(
        "the daemon's network namespace has no name under /run/netns, so a container \
         restored here could not join it"
    )]
    UnnamedNetns,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> Image {
        Image {
            name: "plc".into(),
            spec: serde_json::json!({
                "root": {"path": "rootfs", "readonly": true},
                "hooks": {"prestart": [{"path": "/bin/sh"}]},
                "mounts": [
                    {"destination": "/proc", "type": "proc", "source": "proc"},
                    {"destination": "/etc/hosts", "type": "bind", "source": "/x/hosts"},
                    {"destination": "/cfg", "type": "none", "source": "/x/cfg",
                     "options": ["rbind", "ro"]}
                ],
                "linux": {"namespaces": [
                    {"type": "pid"},
                    {"type": "network", "path": "/run/netns/src"}
                ]}
            }),
            runtime: Runtime::Runc,
        }
    }

    #[test]
    fn a_dump_takes_the_bind_mounts_as_external() {
        assert_eq!(
            image().external_mounts(),
            ["mnt[/etc/hosts]:/etc/hosts", "mnt[/cfg]:/cfg"]
        );
    }

    #[test]
    fn a_dump_takes_the_cgroup_mounts_as_external() {
        let mountinfo = "\
78 51 254:0 /img / ro,relatime - ext4 /dev/vda rw
89 81 0:47 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs rw,mode=755
90 89 0:29 /libpod_parent/c /sys/fs/cgroup/cpu ro,nosuid - cgroup cgroup rw,cpu
98 89 0:37 /libpod_parent/c /sys/fs/cgroup/unified ro,nosuid - cgroup2 cgroup2 rw";
        assert_eq!(
            parse_cgroup_mounts(mountinfo),
            [
                "mnt[/sys/fs/cgroup/cpu]:/sys/fs/cgroup/cpu",
                "mnt[/sys/fs/cgroup/unified]:/sys/fs/cgroup/unified"
            ]
        );
    }

    #[test]
    fn a_bundle_runs_the_hosts_copy_of_the_image_read_only_in_its_namespace_without_hooks() {
        let images = tempfile::tempdir().unwrap();
        let missing = image().bundle(images.path(), Path::new("/run/netns/dst"), "/d/plc");
        assert!(
            matches!(missing, Err(ContainerError::NoImage(_))),
            "{missing:?}"
        );
        std::fs::create_dir(images.path().join("plc")).unwrap();
        let spec = image()
            .bundle(images.path(), Path::new("/run/netns/dst"), "/d/plc")
            .unwrap();
        assert_eq!(
            spec["root"]["path"],
            images.path().join("plc").to_str().unwrap()
        );
        assert_eq!(spec["root"]["readonly"], true);
        assert_eq!(spec["linux"]["namespaces"][1]["path"], "/run/netns/dst");
        assert_eq!(spec["linux"]["cgroupsPath"], "/d/plc");
        assert!(spec.get("hooks").is_none());
        let mut own = image();
        own.spec["linux"]["namespaces"][1] = serde_json::json!({"type": "network"});
        let refused = own.bundle(images.path(), Path::new("/run/netns/dst"), "/d/plc");
        assert!(
            matches!(refused, Err(ContainerError::OwnNetwork)),
            "{refused:?}"
        );
        // A peer names an image, never a path.
        for name in ["..", "../plc", "/plc", "a/b", ""] {
            let outside = Image {
                name: name.into(),
                ..image()
            };
            let refused = outside.bundle(images.path(), Path::new("/run/netns/dst"), "/d/plc");
            assert!(
                matches!(refused, Err(ContainerError::ImageName(_))),
                "{name}: {refused:?}"
            );
        }
    }

    #[test]
    fn only_a_read_only_rootfs_in_the_image_store_migrates() {
        let images = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let of = |rootfs: PathBuf, spec: serde_json::Value| {
            Image::of(&rootfs, spec, images.path(), Runtime::Podman)
        };
        let image_of = of(images.path().join("plc"), image().spec).unwrap();
        assert_eq!(
            (image_of.name.as_str(), image_of.runtime),
            ("plc", Runtime::Podman)
        );
        let outside = of(elsewhere.path().join("rootfs"), image().spec);
        assert!(matches!(outside, Err(ContainerError::NotAnImage { .. })));
        let mut writable = image().spec;
        writable["root"]["readonly"] = false.into();
        let refused = of(images.path().join("plc"), writable);
        assert!(matches!(refused, Err(ContainerError::WritableRoot(_))));
    }
}
