//! Services that run as OCI containers under runc: what the daemon asks
//! runc (a container's state, a restore from a bundle, a delete) and what
//! it takes from a container's bundle to dump it with CRIU itself.
//!
//! The daemon dumps a container as it dumps a process, through CRIU's RPC
//! and under its own hold, with the options runc gives CRIU for one (the
//! rootfs as CRIU's root, the bind mounts as external mounts, cgroups
//! managed, the network namespace an external under runc's key). runc
//! restores it on the destination, from a bundle the daemon writes, so
//! that the destination's runc knows it (docs/design.md, Containers).
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde::{Deserialize, Serialize};

/// The runc binary, as the daemon's PATH finds it.
const RUNC: &str = "runc";

/// The key under which runc names a container's network namespace when
/// that namespace is not the container's own: `runc restore` gives CRIU
/// the namespace of its bundle under this key, so a dump must use it.
pub const NETNS_KEY: &str = "extRootNetNS";

/// The file runc reads a checkpoint's standard descriptors from.
const DESCRIPTORS: &str = "descriptors.json";

/// This host's containers: runc's state, and the images they run from.
#[derive(Clone, Debug)]
pub struct Containers {
    pub runc: Runc,
    /// Where the root filesystems of this host's containers are, one
    /// directory per image (`container_images`).
    pub images: PathBuf,
    /// The CRIU binary runc restores with.
    pub criu: PathBuf,
}

impl Containers {
    /// Container `id`'s init process and the image a migration carries.
    pub fn image(&self, id: &str) -> Result<(u32, Image), RuncError> {
        let state = self.runc.state(id)?;
        if state.status != "running" {
            return Err(RuncError::NotRunning(id.to_string(), state.status));
        }
        Ok((state.pid, Image::of(&state, &self.images)?))
    }

    /// Starts container `id` running `argv` from image `image`, with its
    /// bundle at `bundle`, in network namespace `netns`: its init process.
    /// As a migration needs it: read-only from the image, what it writes
    /// in tmpfs at /tmp, its standard descriptors /dev/null, its open
    /// files limited as the daemon's are; in cgroup /dataplane/ID.
    pub fn start(
        &self,
        id: &str,
        (image, argv): (&str, &[String]),
        netns: &Path,
        bundle: &Path,
    ) -> Result<u32, RuncError> {
        let rootfs = self.images.join(image);
        if !crate::service::is_plain_name(image) || !rootfs.is_dir() {
            return Err(RuncError::NoImage(rootfs));
        }
        let (_, files) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_err(|e| RuncError::Spawn(e.into()))?;
        // runc makes the devices (/dev/null, ...) in /dev: no `nodev` there.
        let tmpfs = |destination: &str, options: &[&str]| {
            serde_json::json!({"destination": destination, "type": "tmpfs", "source": "tmpfs",
                "options": options})
        };
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": 0, "gid": 0},
                "args": argv,
                "env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
                "cwd": "/",
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": files, "soft": files}],
                "noNewPrivileges": true
            },
            "root": {"path": rootfs, "readonly": true},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                tmpfs("/dev", &["nosuid", "mode=755"]),
                tmpfs("/tmp", &["nosuid", "nodev", "mode=1777"])
            ],
            "linux": {
                "cgroupsPath": format!("/dataplane/{id}"),
                "namespaces": [
                    {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                    {"type": "network", "path": netns}
                ]
            }
        });
        write_bundle(bundle, &spec)?;
        self.runc.run(id, bundle)
    }
}

/// Writes `spec` as the configuration of the bundle at `bundle`.
pub fn write_bundle(bundle: &Path, spec: &serde_json::Value) -> Result<(), RuncError> {
    std::fs::create_dir_all(bundle)
        .and_then(|()| std::fs::write(bundle.join("config.json"), spec.to_string()))
        .map_err(|source| RuncError::Bundle {
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
    pub fn state(&self, id: &str) -> Result<State, RuncError> {
        let out = self.call("state", &["state", id])?;
        serde_json::from_slice(&out).map_err(|e| RuncError::Answer(format!("runc state: {e}")))
    }

    /// Restores container `id` from the checkpoint in `images` with the
    /// bundle `bundle`, detached, and returns its init process.
    pub fn restore(
        &self,
        criu: &Path,
        id: &str,
        bundle: &Path,
        images: &Path,
    ) -> Result<u32, RuncError> {
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
        // CRIU's own account says more than runc's.
        if let Err(RuncError::Failed { command, message }) = restored {
            let log = images.join("restore.log");
            let criu = crate::criu::logged_errors(&log.display().to_string());
            return Err(RuncError::Failed {
                command,
                message: match criu {
                    Some(errors) => format!("{message}; CRIU: {errors}"),
                    None => message,
                },
            });
        }
        Ok(self.state(id)?.pid)
    }

    /// Runs container `id` from `bundle`, detached: its init process. The
    /// container keeps runc's standard descriptors, so they are /dev/null
    /// (CRIU can dump that); runc's messages go to `runc.log` in the bundle.
    pub fn run(&self, id: &str, bundle: &Path) -> Result<u32, RuncError> {
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
            .map_err(RuncError::Spawn)?;
        if !status.success() {
            let logged = std::fs::read_to_string(&log).unwrap_or_default();
            let message = logged.lines().rev().find(|l| !l.trim().is_empty());
            return Err(RuncError::Failed {
                command: "run".into(),
                message: message.unwrap_or("no message").trim().to_string(),
            });
        }
        Ok(self.state(id)?.pid)
    }

    /// Kills container `id` and removes it from runc's state (and its
    /// cgroups). A container runc does not know is no error.
    pub fn delete(&self, id: &str) -> Result<(), RuncError> {
        match self.call("delete", &["delete", "--force", id]) {
            Err(RuncError::Failed { message, .. }) if message.contains("does not exist") => Ok(()),
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
    pub fn list(&self) -> Result<Vec<String>, RuncError> {
        #[derive(Deserialize)]
        struct Listed {
            id: String,
        }
        let out = self.call("list", &["list", "--format", "json"])?;
        let listed: Option<Vec<Listed>> = serde_json::from_slice(&out)
            .map_err(|e| RuncError::Answer(format!("runc list: {e}")))?;
        Ok(listed.into_iter().flatten().map(|c| c.id).collect())
    }

    /// runc's output for `command` (`args` name it, after runc's own
    /// options), or its error. Its stdout and stderr are files in
    /// memory: a container it starts may keep runc's descriptors open,
    /// and a pipe would then wait for the container to end.
    fn call(&self, command: &str, args: &[&str]) -> Result<Vec<u8>, RuncError> {
        let memory = || -> Result<std::fs::File, RuncError> {
            use nix::sys::memfd::{MFdFlags, memfd_create};
            let fd = memfd_create("runc", MFdFlags::MFD_CLOEXEC)
                .map_err(|e| RuncError::Spawn(e.into()))?;
            Ok(fd.into())
        };
        let (out, err) = (memory()?, memory()?);
        let status = Command::new(RUNC)
            .arg("--root")
            .arg(&self.root)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().map_err(RuncError::Spawn)?)
            .stderr(err.try_clone().map_err(RuncError::Spawn)?)
            .status()
            .map_err(RuncError::Spawn)?;
        let read = |mut file: std::fs::File| {
            use std::io::{Read, Seek};
            let mut bytes = Vec::new();
            let _ = file.rewind().and_then(|()| file.read_to_end(&mut bytes));
            bytes
        };
        // runc logs warnings before its error: the last line is the error.
        let error = String::from_utf8_lossy(&read(err)).to_string();
        let message = error.lines().rev().find(|l| !l.trim().is_empty());
        match status.success() {
            true => Ok(read(out)),
            false => Err(RuncError::Failed {
                command: command.to_string(),
                message: message.unwrap_or("no message").trim().to_string(),
            }),
        }
    }
}

/// A container as `runc state` shows it.
#[derive(Clone, Debug, Deserialize)]
pub struct State {
    pub pid: u32,
    pub status: String,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
}

impl State {
    /// The container's OCI configuration, from its bundle.
    pub fn spec(&self) -> Result<serde_json::Value, RuncError> {
        let path = self.bundle.join("config.json");
        let text = std::fs::read(&path).map_err(|source| RuncError::Bundle {
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&text)
            .map_err(|e| RuncError::Answer(format!("{}: {e}", path.display())))
    }
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
}

impl Image {
    /// The image of a running container, which must run from a read-only
    /// rootfs in `images` (this host's `container_images`).
    pub fn of(state: &State, images: &Path) -> Result<Self, RuncError> {
        let spec = state.spec()?;
        // runc resolves the rootfs's links; so must the comparison.
        let store = std::fs::canonicalize(images).ok();
        let name = state
            .rootfs
            .parent()
            .filter(|dir| std::fs::canonicalize(dir).ok() == store && store.is_some())
            .and(state.rootfs.file_name())
            .and_then(|n| n.to_str())
            .filter(|n| crate::service::is_plain_name(n))
            .ok_or_else(|| RuncError::NotAnImage {
                rootfs: state.rootfs.clone(),
                images: images.to_owned(),
            })?;
        if spec["root"]["readonly"] != serde_json::Value::Bool(true) {
            return Err(RuncError::WritableRoot(state.rootfs.clone()));
        }
        let image = Self {
            name: name.to_string(),
            spec,
        };
        image.network()?;
        Ok(image)
    }

    /// The network namespace the container joins, by path.
    fn network(&self) -> Result<&str, RuncError> {
        self.spec["linux"]["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|ns| ns["type"] == "network")
            .and_then(|ns| ns["path"].as_str())
            .ok_or(RuncError::OwnNetwork)
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
    pub fn rootfs(&self, images: &Path) -> Result<PathBuf, RuncError> {
        if !crate::service::is_plain_name(&self.name) {
            return Err(RuncError::ImageName(self.name.clone()));
        }
        let rootfs = images.join(&self.name);
        if !rootfs.is_dir() {
            return Err(RuncError::NoImage(rootfs));
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
    ) -> Result<serde_json::Value, RuncError> {
        let rootfs = self.rootfs(images)?;
        let mut spec = self.spec.clone();
        spec["root"] = serde_json::json!({"path": rootfs, "readonly": true});
        if let Some(spec) = spec.as_object_mut() {
            spec.remove("hooks");
        }
        let linux = &mut spec["linux"];
        linux["cgroupsPath"] = cgroups_path.into();
        for ns in linux["namespaces"].as_array_mut().into_iter().flatten() {
            if ns["type"] == "network" {
                ns["path"] = netns.display().to_string().into();
            }
        }
        Ok(spec)
    }
}

fn is_bind(mount: &serde_json::Value) -> bool {
    mount["type"] == "bind"
        || mount["options"]
            .as_array()
            .is_some_and(|o| o.iter().any(|o| o == "bind" || o == "rbind"))
}

/// Writes what runc reads of a checkpoint besides CRIU's images: the
/// container's standard descriptors, as its init process has them.
pub fn write_descriptors(pid: u32, images: &Path) -> Result<(), RuncError> {
    let descriptors: Vec<String> = (0..3)
        .map(|fd| std::fs::read_link(format!("/proc/{pid}/fd/{fd}")))
        .map(|target| target.map(|t| t.display().to_string()))
        .collect::<Result<_, _>>()
        .map_err(RuncError::Descriptors)?;
    let json = serde_json::to_vec(&descriptors).expect("strings serialize");
    std::fs::write(images.join(DESCRIPTORS), json).map_err(RuncError::Descriptors)
}

/// A path that names the daemon's network namespace to runc, which a
/// container restored here joins: the host's own (/proc/1/ns/net), or the
/// namespace's name under /run/netns.
pub fn own_netns() -> Result<PathBuf, RuncError> {
    use std::os::unix::fs::MetadataExt;
    let id = |path: &Path| std::fs::metadata(path).map(|m| (m.dev(), m.ino())).ok();
    let own = id(Path::new("/proc/self/ns/net")).ok_or(RuncError::UnnamedNetns)?;
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
        .ok_or(RuncError::UnnamedNetns)
}

/// What went wrong with a container or its runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuncError {
    #[error("starting runc: {0} (`cargo xtask setup` installs it)")]
    Spawn(std::io::Error),
    #[error("runc {command}: {message}")]
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
    fn a_bundle_runs_the_hosts_copy_of_the_image_read_only_in_its_namespace_without_hooks() {
        let images = tempfile::tempdir().unwrap();
        let missing = image().bundle(images.path(), Path::new("/run/netns/dst"), "/d/plc");
        assert!(matches!(missing, Err(RuncError::NoImage(_))), "{missing:?}");
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
        assert!(matches!(refused, Err(RuncError::OwnNetwork)), "{refused:?}");
        // A peer names an image, never a path.
        for name in ["..", "../plc", "/plc", "a/b", ""] {
            let outside = Image {
                name: name.into(),
                ..image()
            };
            let refused = outside.bundle(images.path(), Path::new("/run/netns/dst"), "/d/plc");
            assert!(
                matches!(refused, Err(RuncError::ImageName(_))),
                "{name}: {refused:?}"
            );
        }
    }

    #[test]
    fn only_a_read_only_rootfs_in_the_image_store_migrates() {
        let images = tempfile::tempdir().unwrap();
        let bundle = tempfile::tempdir().unwrap();
        let write = |spec: &serde_json::Value| {
            std::fs::write(bundle.path().join("config.json"), spec.to_string()).unwrap()
        };
        let state = |rootfs: PathBuf| State {
            pid: 1,
            status: "running".into(),
            bundle: bundle.path().to_owned(),
            rootfs,
        };
        write(&image().spec);
        let image_of = Image::of(&state(images.path().join("plc")), images.path()).unwrap();
        assert_eq!(image_of.name, "plc");
        let elsewhere = Image::of(&state(bundle.path().join("rootfs")), images.path());
        assert!(matches!(elsewhere, Err(RuncError::NotAnImage { .. })));
        let mut writable = image().spec;
        writable["root"]["readonly"] = false.into();
        write(&writable);
        let refused = Image::of(&state(images.path().join("plc")), images.path());
        assert!(matches!(refused, Err(RuncError::WritableRoot(_))));
    }
}
