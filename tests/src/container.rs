//! Workspace binaries run as OCI containers by runc or podman on the test
//! hosts. Each test host has a container runtime of its own ([`Runtime`]):
//! runc state (`--root`) or podman storage (`--root`, `--runroot`), and an
//! image store, as separate hosts would. A container runs read-only from
//! an image (a root filesystem holding the binary and the libraries it
//! links), keeps what it writes in tmpfs (/tmp), and joins its host's
//! network namespace: the way the service network reaches a container on
//! these hosts (docs/testing.md).
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use crate::{daemon::dataplane_bin, netns::NetNs};

/// Whether `program` (runc or podman) runs here (`cargo xtask setup`
/// installs both): why not, if it does not.
pub fn missing(program: &str) -> Option<String> {
    match Command::new(program).arg("--version").output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!("{program} --version failed ({})", out.status)),
        Err(e) => Some(format!(
            "{program} is not installed ({e}; cargo xtask setup installs it)"
        )),
    }
}

/// One test host's container runtime: runc's state directory or podman's
/// storage, and the image store its daemon restores containers from.
/// Whatever containers it still knows are removed on drop, with its
/// directories.
pub struct Runtime {
    engine: Engine,
    /// The image store (`container_images`): one rootfs per image.
    pub images: PathBuf,
    dir: PathBuf,
}

/// The runtime that runs a test host's containers, with its state.
#[derive(Clone)]
enum Engine {
    Runc { root: PathBuf },
    Podman { root: PathBuf, runroot: PathBuf },
}

impl Runtime {
    /// An empty runtime for host `host` of test `tag`: podman's if
    /// `podman`, else runc's.
    pub fn new(tag: &str, host: &str, podman: bool) -> Self {
        let dir = PathBuf::from(format!(
            "/tmp/dataplane-test-{}-{tag}-{host}-containers",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let engine = match podman {
            true => Engine::Podman {
                root: dir.join("podman"),
                // podman takes no run root path longer than 50 bytes.
                runroot: PathBuf::from(format!("/tmp/dpt-{}-{tag}-{host}", std::process::id())),
            },
            false => Engine::Runc {
                root: dir.join("runc"),
            },
        };
        let runtime = Self {
            engine,
            images: dir.join("images"),
            dir,
        };
        std::fs::create_dir_all(&runtime.images).expect("the image store");
        runtime
    }

    /// The runtime's name, as `service.register` takes it.
    pub fn name(&self) -> &'static str {
        match self.engine {
            Engine::Runc { .. } => "runc",
            Engine::Podman { .. } => "podman",
        }
    }

    /// The lines of a daemon's configuration that use this runtime (and a
    /// services directory of its own, where restored bundles go).
    pub fn config(&self) -> String {
        let runtime = match &self.engine {
            Engine::Runc { root } => format!("runc_root = \"{}\"\n", root.display()),
            Engine::Podman { root, runroot } => format!(
                "podman_root = \"{}\"\npodman_runroot = \"{}\"\n",
                root.display(),
                runroot.display()
            ),
        };
        format!(
            "{runtime}container_images = \"{}\"\nservices_dir = \"{}\"\n",
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
    /// network namespace; why not, if the runtime cannot run it here.
    pub fn run(
        &self,
        host: &NetNs,
        id: &str,
        program: &str,
        args: &[&str],
    ) -> Result<RuncContainer, String> {
        let rootfs = self.images.join(program);
        let mut container = RuncContainer {
            id: id.to_string(),
            engine: self.engine.clone(),
            bundle: None,
            pid: 0,
        };
        match &self.engine {
            Engine::Runc { .. } => container.bundle = Some(self.run_runc(host, id, &rootfs, args)?),
            Engine::Podman { .. } => {
                // As an admin runs a container that can migrate
                // (docs/operations.md); the limits within this machine's.
                // In the host's network namespace, as a host's daemon
                // would run in its own: the container shares it.
                let mut run = Command::new("nsenter");
                run.arg(format!("--net={}", host.path().display()));
                let podman = self.engine.command();
                run.arg(podman.get_program()).args(podman.get_args());
                run.args([
                    "run",
                    "--detach",
                    "--name",
                    id,
                    "--read-only",
                    "--network=host",
                ])
                .args(["--ulimit=nofile=20000:20000", "--ulimit=nproc=1024:1024"])
                .arg("--rootfs")
                .arg(&rootfs)
                .arg(format!("/bin/{program}"))
                .args(args);
                call(run)?;
            }
        }
        container.pid = self.state(id)?["pid"]
            .as_u64()
            .ok_or("the runtime names no pid")? as u32;
        Ok(container)
    }

    /// runc runs container `id` from `rootfs` with `args` in `host`, from
    /// a bundle the test writes: the bundle.
    fn run_runc(
        &self,
        host: &NetNs,
        id: &str,
        rootfs: &Path,
        args: &[&str],
    ) -> Result<PathBuf, String> {
        let bundle = self.dir.join(format!("bundle-{id}"));
        std::fs::create_dir_all(&bundle).map_err(|e| format!("the bundle: {e}"))?;
        let program = rootfs.file_name().unwrap_or_default().to_string_lossy();
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
            "root": {"path": rootfs, "readonly": true},
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
        let mut run = self.engine.command();
        run.args(["run", "--detach", "--bundle"])
            .arg(&bundle)
            .arg(id)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let ran = run.status().map_err(|e| format!("runc: {e}"))?;
        match ran.success() {
            true => Ok(bundle),
            false => {
                let _ = std::fs::remove_dir_all(&bundle);
                Err(format!("runc run failed ({ran})"))
            }
        }
    }

    /// A handle on container `id` of this runtime that someone else (a
    /// daemon) started from `bundle`, its init `pid`.
    pub fn adopt(&self, id: &str, bundle: PathBuf, pid: u32) -> RuncContainer {
        RuncContainer {
            id: id.to_string(),
            engine: self.engine.clone(),
            bundle: Some(bundle),
            pid,
        }
    }

    /// Container `id`'s state in this runtime: its "status" and "pid".
    pub fn state(&self, id: &str) -> Result<serde_json::Value, String> {
        self.engine.state(id)
    }

    /// The containers this runtime knows, by id (runc) or name (podman).
    pub fn listed(&self) -> Vec<String> {
        self.engine
            .listed()
            .expect("the runtime lists its containers")
    }

    /// Waits (5 s at most) until the runtime lists `ids`; what it lists then.
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
        for id in self.engine.listed().unwrap_or_default() {
            self.engine.remove(&id);
        }
        if let Engine::Podman { runroot, .. } = &self.engine {
            let _ = std::fs::remove_dir_all(runroot);
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

impl Engine {
    /// The runtime's command with this host's state.
    fn command(&self) -> Command {
        let mut command;
        match self {
            Engine::Runc { root } => {
                command = Command::new("runc");
                command.arg("--root").arg(root);
            }
            Engine::Podman { root, runroot } => {
                command = Command::new("podman");
                command
                    .arg("--root")
                    .arg(root)
                    .arg("--runroot")
                    .arg(runroot);
                command.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
            }
        }
        command.stdin(Stdio::null());
        command
    }

    fn state(&self, id: &str) -> Result<serde_json::Value, String> {
        let mut state = self.command();
        match self {
            Engine::Runc { .. } => state.args(["state", id]),
            Engine::Podman { .. } => state.args(["container", "inspect", id]),
        };
        let out: serde_json::Value =
            serde_json::from_slice(&call(state)?).map_err(|e| format!("the state: {e}"))?;
        Ok(match self {
            Engine::Runc { .. } => out,
            Engine::Podman { .. } => serde_json::json!({
                "status": out[0]["State"]["Status"], "pid": out[0]["State"]["Pid"]}),
        })
    }

    fn listed(&self) -> Result<Vec<String>, String> {
        let mut list = self.command();
        match self {
            Engine::Runc { root } if !root.exists() => return Ok(vec![]),
            Engine::Runc { .. } => list.args(["list", "--format", "json"]),
            Engine::Podman { .. } => list.args(["ps", "--all", "--format", "{{.Names}}"]),
        };
        let out = call(list)?;
        Ok(match self {
            Engine::Runc { .. } => {
                let list: Option<Vec<serde_json::Value>> =
                    serde_json::from_slice(&out).expect("runc list's JSON");
                list.unwrap_or_default()
                    .iter()
                    .filter_map(|c| c["id"].as_str().map(str::to_string))
                    .collect()
            }
            Engine::Podman { .. } => String::from_utf8_lossy(&out)
                .lines()
                .map(str::to_string)
                .collect(),
        })
    }

    fn remove(&self, id: &str) {
        let mut remove = self.command();
        match self {
            Engine::Runc { .. } => remove.args(["delete", "--force", id]),
            Engine::Podman { .. } => remove.args(["rm", "--force", "--time", "0", id]),
        };
        let _ = call(remove);
    }
}

/// A container a test runs; killed and removed on drop, with its bundle.
pub struct RuncContainer {
    id: String,
    engine: Engine,
    bundle: Option<PathBuf>,
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
        self.engine.remove(&self.id);
        if let Some(bundle) = &self.bundle {
            let _ = std::fs::remove_dir_all(bundle);
        }
    }
}

/// `command`'s output, or why it failed.
fn call(mut command: Command) -> Result<Vec<u8>, String> {
    let out = command.output().map_err(|e| format!("{command:?}: {e}"))?;
    match out.status.success() {
        true => Ok(out.stdout),
        false => Err(format!(
            "{command:?}: {}",
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
