//! Workspace binaries run as OCI containers by runc on the test hosts.
//! Each test host has a container runtime of its own ([`Runtime`]): runc
//! state (`--root`) and an image store, as separate hosts would. A
//! container runs read-only from an image (a root filesystem holding the
//! binary and the libraries it links), keeps what it writes in tmpfs
//! (/tmp), and joins its host's network namespace: the way
//! the service network reaches a container on these hosts
//! (docs/testing.md).
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use crate::{daemon::dataplane_bin, netns::NetNs};

/// Whether runc runs here (`cargo xtask setup` installs it): why not, if it
/// does not.
pub fn runc_missing() -> Option<String> {
    match Command::new("runc").arg("--version").output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!("runc --version failed ({})", out.status)),
        Err(e) => Some(format!(
            "runc is not installed ({e}; cargo xtask setup installs it)"
        )),
    }
}

/// One test host's container runtime: runc's state directory and the
/// image store its daemon restores containers from. Whatever containers
/// its runc still knows are deleted on drop, with both directories.
pub struct Runtime {
    /// runc's `--root`.
    pub root: PathBuf,
    /// The image store (`container_images`): one rootfs per image.
    pub images: PathBuf,
    dir: PathBuf,
}

impl Runtime {
    /// An empty runtime for host `host` of test `tag`.
    pub fn new(tag: &str, host: &str) -> Self {
        let dir = PathBuf::from(format!(
            "/tmp/dataplane-test-{}-{tag}-{host}-containers",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let runtime = Self {
            root: dir.join("runc"),
            images: dir.join("images"),
            dir,
        };
        std::fs::create_dir_all(&runtime.images).expect("the image store");
        runtime
    }

    /// The lines of a daemon's configuration that use this runtime (and a
    /// services directory of its own, where restored bundles go).
    pub fn config(&self) -> String {
        format!(
            "runc_root = \"{}\"\ncontainer_images = \"{}\"\nservices_dir = \"{}\"\n",
            self.root.display(),
            self.images.display(),
            self.services_dir().display()
        )
    }

    /// Where the daemon using this runtime keeps its services' bundles.
    pub fn services_dir(&self) -> PathBuf {
        self.dir.join("services")
    }

    /// Puts image `program` in the store: a root filesystem holding that
    /// binary of the workspace in /bin and the libraries it links.
    pub fn install_image(&self, program: &str) -> Result<(), String> {
        let binary = dataplane_bin().with_file_name(program);
        root_filesystem(&self.images.join(program), &binary)
    }

    /// Runs image `program` with `args` as container `id` in `host`'s
    /// network namespace; why not, if runc cannot run it here.
    pub fn run(
        &self,
        host: &NetNs,
        id: &str,
        program: &str,
        args: &[&str],
    ) -> Result<RuncContainer, String> {
        let bundle = self.dir.join(format!("bundle-{id}"));
        std::fs::create_dir_all(&bundle).map_err(|e| format!("the bundle: {e}"))?;
        let mut process: Vec<String> = vec![format!("/bin/{program}")];
        process.extend(args.iter().map(|a| a.to_string()));
        let tmpfs = |destination: &str| {
            serde_json::json!({"destination": destination, "type": "tmpfs", "source": "tmpfs",
                "options": ["nosuid", "mode=755", "size=16m"]})
        };
        let config = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": 0, "gid": 0},
                "args": process,
                "env": ["PATH=/bin"],
                "cwd": "/",
                // The hard limit on open files here is below runc's default.
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 20000, "soft": 20000}],
                "noNewPrivileges": true
            },
            "root": {"path": self.images.join(program), "readonly": true},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                tmpfs("/dev"), tmpfs("/tmp")
            ],
            "linux": {
                // The test hosts share one kernel and so its cgroups.
                "cgroupsPath": format!("/{}/{id}", self.dir.file_name().unwrap().to_string_lossy()),
                "namespaces": [
                    {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                    {"type": "network", "path": host.path()}
                ]
            }
        });
        std::fs::write(bundle.join("config.json"), config.to_string())
            .map_err(|e| format!("writing the bundle's config: {e}"))?;
        // The container inherits runc's output, so to nowhere: a pipe
        // would stay open as long as it runs, and a file on the host would
        // keep it from being checkpointed.
        let ran = Command::new("runc")
            .arg("--root")
            .arg(&self.root)
            .args(["run", "--detach", "--bundle"])
            .arg(&bundle)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("runc: {e}"))?;
        let mut container = RuncContainer {
            id: id.to_string(),
            root: self.root.clone(),
            bundle,
            pid: 0,
        };
        if !ran.success() {
            return Err(format!("runc run failed ({ran})"));
        }
        container.pid = self.state(id)?["pid"]
            .as_u64()
            .ok_or("runc state names no pid")? as u32;
        Ok(container)
    }

    /// A handle on container `id` of this runtime that someone else (a
    /// daemon) started from `bundle`, its init `pid`.
    pub fn adopt(&self, id: &str, bundle: PathBuf, pid: u32) -> RuncContainer {
        RuncContainer {
            id: id.to_string(),
            root: self.root.clone(),
            bundle,
            pid,
        }
    }

    /// `runc state ID` in this runtime.
    pub fn state(&self, id: &str) -> Result<serde_json::Value, String> {
        let out = runc(&self.root, &["state", id])?;
        serde_json::from_slice(&out).map_err(|e| format!("runc state: {e}"))
    }

    /// The ids `runc list` shows in this runtime.
    pub fn listed(&self) -> Vec<String> {
        let out = runc(&self.root, &["list", "--format", "json"]).expect("runc list");
        let list: Option<Vec<serde_json::Value>> =
            serde_json::from_slice(&out).expect("runc list's JSON");
        list.unwrap_or_default()
            .iter()
            .filter_map(|c| c["id"].as_str().map(str::to_string))
            .collect()
    }

    /// Waits (5 s at most) until `runc list` shows `ids`; what it shows then.
    pub fn wait_listed(&self, ids: &[&str]) -> Vec<String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let listed = self.listed();
            if listed == ids || std::time::Instant::now() > deadline {
                return listed;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if self.root.exists() {
            for id in self.listed() {
                let _ = runc(&self.root, &["delete", "--force", &id]);
            }
        }
        // runc removes a container's cgroup, not the test's parent of it:
        // one in each hierarchy (cgroup v1), or the one (v2).
        let parent = self.dir.file_name().expect("a directory name");
        let hierarchies = std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten();
        let roots = hierarchies.flatten().map(|h| h.path());
        for root in roots.chain([PathBuf::from("/sys/fs/cgroup")]) {
            let _ = std::fs::remove_dir(root.join(parent));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A container a test runs; killed and deleted on drop, with its bundle.
pub struct RuncContainer {
    id: String,
    root: PathBuf,
    bundle: PathBuf,
    /// The container's init process, as the root PID namespace sees it.
    pub pid: u32,
}

impl RuncContainer {
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl Drop for RuncContainer {
    fn drop(&mut self) {
        let _ = runc(&self.root, &["delete", "--force", &self.id]);
        let _ = std::fs::remove_dir_all(&self.bundle);
    }
}

/// runc with state directory `root`: its output, or why it failed.
fn runc(root: &Path, args: &[&str]) -> Result<Vec<u8>, String> {
    let out = Command::new("runc")
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .map_err(|e| format!("runc: {e}"))?;
    match out.status.success() {
        true => Ok(out.stdout),
        false => Err(format!(
            "runc {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// A root filesystem at `rootfs` holding `binary` in /bin and the shared
/// libraries it links (as `ldd` lists them) at their paths, and the
/// directories the containers mount on.
fn root_filesystem(rootfs: &Path, binary: &Path) -> Result<(), String> {
    let copy = |from: &Path, to: &Path| -> Result<(), String> {
        std::fs::create_dir_all(to.parent().expect("a path in the rootfs"))
            .and_then(|()| std::fs::copy(from, to).map(drop))
            .map_err(|e| format!("copying {} into the rootfs: {e}", from.display()))
    };
    let name = binary.file_name().ok_or("a binary's name")?;
    copy(binary, &rootfs.join("bin").join(name))?;
    for dir in ["proc", "dev", "tmp"] {
        std::fs::create_dir_all(rootfs.join(dir)).map_err(|e| e.to_string())?;
    }
    let ldd = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| format!("ldd: {e}"))?;
    // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", or the
    // loader's own "/lib64/ld-linux-x86-64.so.2 (0x...)".
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let path = line
            .split("=>")
            .last()
            .and_then(|p| p.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        if let Some(path) = path {
            copy(Path::new(path), &rootfs.join(&path[1..]))?;
        }
    }
    Ok(())
}
