//! The containers services run as: which runtime a question goes to, and
//! the images they run from.
use std::path::{Path, PathBuf};

use super::{
    podman::Podman,
    runc::{ContainerError, Image, Runc, join_network_by_path, own_netns, read_spec, write_bundle},
};
use crate::service::Runtime;

/// This host's containers: their runtimes, and the images they run from.
#[derive(Clone, Debug)]
pub struct Containers {
    pub runc: Runc,
    pub podman: Podman,
    /// Where the root filesystems of this host's containers are, one
    /// directory per image (`container_images`).
    pub images: PathBuf,
    /// The CRIU binary runc restores with.
    pub criu: PathBuf,
}

impl Containers {
    /// Container `id`'s init process and the image a migration carries.
    pub fn image(&self, runtime: Runtime, id: &str) -> Result<(u32, Image), ContainerError> {
        let (state, spec) = match runtime {
            Runtime::Runc => {
                let state = self.runc.state(id)?;
                let spec = read_spec(&state.bundle.join("config.json"))?;
                (state, spec)
            }
            Runtime::Podman => self.podman.state(id)?,
        };
        if state.status != "running" {
            return Err(ContainerError::NotRunning(id.to_string(), state.status));
        }
        let spec = join_network_by_path(spec, state.pid);
        let image = Image::of(&state.rootfs, spec, &self.images, runtime)?;
        Ok((state.pid, image))
    }

    /// The names of the containers `runtime` knows here.
    pub fn list(&self, runtime: Runtime) -> Result<Vec<String>, ContainerError> {
        match runtime {
            Runtime::Runc => self.runc.list(),
            Runtime::Podman => self.podman.list(),
        }
    }

    /// Readies this host to restore container `name` of `image` from its
    /// `rootfs` into network namespace `netns`: podman needs the
    /// container it restores into made first ([`Podman::prepare`]); runc
    /// needs nothing before its restore. A failure leaves no container.
    pub fn prepare(
        &self,
        name: &str,
        image: &Image,
        rootfs: &Path,
        netns: &Path,
    ) -> Result<(), ContainerError> {
        match image.runtime {
            Runtime::Runc => Ok(()),
            Runtime::Podman => self.podman.prepare(name, image, rootfs, netns),
        }
    }

    /// Has `image`'s runtime restore container `id` from `images`: runc
    /// from a bundle (written at `bundle`) that runs it from this host's
    /// copy of the image, in this host's network namespace, in `cgroup`;
    /// podman into the container [`Self::prepare`] made. Its init pid.
    pub fn restore(
        &self,
        image: &Image,
        id: &str,
        (bundle, cgroup): (&Path, &str),
        images: &Path,
    ) -> Result<u32, ContainerError> {
        match image.runtime {
            Runtime::Runc => {
                let spec = image.bundle(&self.images, &own_netns()?, cgroup)?;
                write_bundle(bundle, &spec)?;
                self.runc.restore(&self.criu, id, bundle, images)
            }
            Runtime::Podman => self.podman.restore(&self.criu, id, images),
        }
    }

    /// Removes container `id` from `runtime` (killing it), for a cleanup
    /// that goes on whatever happens: a failure is logged.
    pub fn discard(&self, runtime: Runtime, id: &str) {
        match runtime {
            Runtime::Runc => self.runc.discard(id),
            Runtime::Podman => self.podman.discard(id),
        }
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
    ) -> Result<u32, ContainerError> {
        let rootfs = self.images.join(image);
        if !crate::service::is_plain_name(image) || !rootfs.is_dir() {
            return Err(ContainerError::NoImage(rootfs));
        }
        let (_, files) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_err(|e| ContainerError::Spawn(e.into()))?;
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
