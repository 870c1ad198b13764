//! podman's side of the containers services run as: a container's state
//! and configuration (`podman inspect`), the container a restore goes
//! into, the restore, the removal. podman runs its containers with runc
//! (and cgroupfs), so the daemon dumps one as it dumps any container
//! ([`super::runc`]).
//!
//! podman restores only into a container it knows, from a checkpoint in
//! that container's directory. So at `prepare` the destination has podman
//! make the service's container from the same image and options (create,
//! init, stop: podman writes its config.json and mount sources for this
//! host, and the command never runs), and at `restore` links the
//! migration's images in as its checkpoint and has podman restore it. The
//! container restored has this host's paths, cgroup and network namespace,
//! and podman knows it, running, under the service's name.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use serde::Deserialize;

use super::runc::{ContainerError, Image, State, call, join_network, read_spec, with_criu_errors};

/// The podman binary, as the daemon's PATH finds it.
const PODMAN: &str = "podman";

/// podman with its storage: the containers of one host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Podman {
    /// podman's `--root` (`podman_root`), if not its default.
    pub root: Option<PathBuf>,
    /// podman's `--runroot` (`podman_runroot`), if not its default.
    pub runroot: Option<PathBuf>,
}

impl Podman {
    /// Container `id`'s state and OCI configuration.
    pub fn state(&self, id: &str) -> Result<(State, serde_json::Value), ContainerError> {
        let inspected = self.inspect(id)?;
        let spec = read_spec(&inspected.oci_config_path)?;
        let state = State {
            pid: inspected.state.pid,
            status: inspected.state.status,
            bundle: inspected.static_dir,
            rootfs: inspected.rootfs,
        };
        Ok((state, spec))
    }

    /// The names of the containers podman knows here.
    pub fn list(&self) -> Result<Vec<String>, ContainerError> {
        let mut podman = self.command();
        podman.args(["ps", "--all", "--format", "{{.Names}}"]);
        let out = call(podman, "podman ps")?;
        Ok(String::from_utf8_lossy(&out)
            .lines()
            .map(str::to_string)
            .collect())
    }

    /// Makes container `name` for a restore of `image` here: from its
    /// `rootfs` (read-only), in network namespace `netns`, with the
    /// image's resource limits (runc sets them at init) and command.
    /// podman then has what it restores into: a container stopped before
    /// its command ran. A failure leaves no container.
    pub fn prepare(
        &self,
        name: &str,
        image: &Image,
        rootfs: &Path,
        netns: &Path,
    ) -> Result<(), ContainerError> {
        let mut create = self.command();
        // In the daemon's network namespace, which podman runs in. (Not
        // by path: runc refuses podman's network sysctls in the namespace
        // it runs in.) The restore joins `netns` by path.
        create.args(["create", "--name", name, "--read-only", "--network=host"]);
        for limit in image.spec["process"]["rlimits"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let kind = limit["type"].as_str().unwrap_or_default();
            let kind = kind.trim_start_matches("RLIMIT_").to_lowercase();
            create.arg(format!(
                "--ulimit={kind}={}:{}",
                limit["soft"], limit["hard"]
            ));
        }
        // Options end at the rootfs: what follows is the command.
        create.arg("--rootfs").arg(rootfs);
        for arg in image.spec["process"]["args"]
            .as_array()
            .into_iter()
            .flatten()
        {
            create.arg(arg.as_str().unwrap_or_default());
        }
        let made = call(create, "podman create").and_then(|_| {
            let mut init = self.command();
            init.args(["init", name]);
            call(init, "podman init")?;
            let mut stop = self.command();
            stop.args(["stop", "--time", "0", name]);
            call(stop, "podman stop")?;
            // The configuration podman restores with: the dump's network
            // namespace is an external that runc maps to this path.
            let config = self.inspect(name)?.oci_config_path;
            let mut spec = read_spec(&config)?;
            join_network(&mut spec, netns);
            std::fs::write(&config, spec.to_string()).map_err(|source| ContainerError::Bundle {
                path: config,
                source,
            })
        });
        if made.is_err() {
            let _ = self.remove(name);
        }
        made
    }

    /// Restores container `name` (made by [`Self::prepare`]) from the
    /// checkpoint in `images`, with CRIU at `criu`: its init process.
    pub fn restore(&self, criu: &Path, name: &str, images: &Path) -> Result<u32, ContainerError> {
        let dir = self.inspect(name)?.static_dir;
        // podman restores from the container's own directory (and removes
        // what is there once restored: here, the link).
        let checkpoint = dir.join("checkpoint");
        let _ = std::fs::remove_file(&checkpoint);
        std::os::unix::fs::symlink(images, &checkpoint).map_err(|source| {
            ContainerError::Bundle {
                path: checkpoint,
                source,
            }
        })?;
        let mut restore = self.command();
        // runc, which podman has restore it, finds CRIU on its PATH.
        let path = std::env::var_os("PATH").unwrap_or_default();
        let criu_dir = criu.parent().map(Path::to_path_buf).unwrap_or_default();
        let path =
            std::env::join_paths(std::iter::once(criu_dir).chain(std::env::split_paths(&path)))
                .map_err(|e| ContainerError::Answer(format!("PATH: {e}")))?;
        restore
            .env("PATH", path)
            .args(["container", "restore", name]);
        call(restore, "podman container restore")
            .map_err(|e| with_criu_errors(e, &dir.join("restore.log")))?;
        Ok(self.inspect(name)?.state.pid)
    }

    /// Kills container `name` and removes it from podman. A container
    /// podman does not know is no error.
    pub fn remove(&self, name: &str) -> Result<(), ContainerError> {
        let mut rm = self.command();
        rm.args(["rm", "--force", "--ignore", "--time", "0", name]);
        call(rm, "podman rm").map(drop)
    }

    /// As [`Self::remove`], for a cleanup that goes on whatever happens:
    /// a failure is logged.
    pub fn discard(&self, name: &str) {
        if let Err(e) = self.remove(name) {
            tracing::warn!(container = name, "{e}");
        }
    }

    fn inspect(&self, id: &str) -> Result<Inspected, ContainerError> {
        let mut inspect = self.command();
        inspect.args(["container", "inspect", id]);
        let out = call(inspect, "podman container inspect")?;
        let mut inspected: Vec<Inspected> = serde_json::from_slice(&out)
            .map_err(|e| ContainerError::Answer(format!("podman container inspect: {e}")))?;
        inspected
            .pop()
            .ok_or_else(|| ContainerError::Answer(format!("podman knows no container {id}")))
    }

    /// podman with this host's storage, running containers with runc and
    /// cgroupfs as the daemon dumps them.
    fn command(&self) -> Command {
        let mut podman = Command::new(PODMAN);
        if let Some(root) = &self.root {
            podman.arg("--root").arg(root);
        }
        if let Some(runroot) = &self.runroot {
            podman.arg("--runroot").arg(runroot);
        }
        podman.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
        podman
    }
}

/// What the daemon reads of `podman container inspect`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Inspected {
    state: InspectedState,
    rootfs: PathBuf,
    #[serde(rename = "OCIConfigPath")]
    oci_config_path: PathBuf,
    /// The container's directory: its config.json, its checkpoint.
    static_dir: PathBuf,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct InspectedState {
    status: String,
    pid: u32,
}
