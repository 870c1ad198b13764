//! A workspace binary run as an OCI container by runc, from a bundle this
//! module builds (a root filesystem holding the binary and the libraries
//! it links), in a test host's network namespace: the way the service
//! network reaches a container on these hosts (docs/testing.md).
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use crate::{daemon::dataplane_bin, netns::NetNs};

/// A running container; killed and deleted on drop, its bundle and runc
/// state removed.
pub struct RuncContainer {
    id: String,
    /// runc's state directory (`--root`): one per container, as a host's
    /// runtime storage would be.
    root: PathBuf,
    bundle: PathBuf,
    /// The container's init process, as the root PID namespace sees it.
    pub pid: u32,
}

impl RuncContainer {
    /// Runs `program` (a binary of this workspace) with `args` as container
    /// `id` in `host`'s network namespace; why not, if runc cannot run it
    /// on this machine.
    pub fn run(host: &NetNs, id: &str, program: &str, args: &[&str]) -> Result<Self, String> {
        let dir = PathBuf::from(format!("/tmp/dataplane-test-{}-{id}", std::process::id()));
        let (bundle, root) = (dir.join("bundle"), dir.join("runc"));
        let binary = dataplane_bin().with_file_name(program);
        root_filesystem(&bundle.join("rootfs"), &binary)?;
        let mut process: Vec<String> = vec![format!("/bin/{program}")];
        process.extend(args.iter().map(|a| a.to_string()));
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
            "root": {"path": "rootfs", "readonly": false},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}
            ],
            "linux": {
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
            .arg(&root)
            .args(["run", "--detach", "--bundle"])
            .arg(&bundle)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("runc: {e}"))?;
        let mut container = Self {
            id: id.to_string(),
            root,
            bundle,
            pid: 0,
        };
        if !ran.success() {
            return Err(format!("runc run failed ({ran})"));
        }
        container.pid = container.state()?["pid"]
            .as_u64()
            .ok_or("runc state names no pid")? as u32;
        Ok(container)
    }

    /// `runc state` of the container.
    pub fn state(&self) -> Result<serde_json::Value, String> {
        let out = self.runc(&["state", &self.id])?;
        serde_json::from_slice(&out).map_err(|e| format!("runc state: {e}"))
    }

    /// The ids `runc list` shows in this container's runtime storage.
    pub fn listed(&self) -> Result<Vec<String>, String> {
        let out = self.runc(&["list", "--format", "json"])?;
        let list: Option<Vec<serde_json::Value>> =
            serde_json::from_slice(&out).map_err(|e| format!("runc list: {e}"))?;
        Ok(list
            .unwrap_or_default()
            .iter()
            .filter_map(|c| c["id"].as_str().map(str::to_string))
            .collect())
    }

    fn runc(&self, args: &[&str]) -> Result<Vec<u8>, String> {
        let out = Command::new("runc")
            .arg("--root")
            .arg(&self.root)
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
}

impl Drop for RuncContainer {
    fn drop(&mut self) {
        let _ = self.runc(&["delete", "--force", &self.id]);
        if let Some(dir) = self.bundle.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A root filesystem at `rootfs` holding `binary` in /bin and the shared
/// libraries it links (as `ldd` lists them) at their paths.
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
