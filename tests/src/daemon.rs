//! A `dataplane daemon` process in a test host, the workspace's binaries
//! beside the test executable, and the flows daemons are given.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use dataplane_user::{
    kernel::loader::Dataplane,
    migration::{DEFAULT_DEADLINE_MS, destination::armed_grace},
};

use crate::{netns::NetNs, timing::cpu_split};

/// The path of the `dataplane` binary built beside the test executable.
pub fn dataplane_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    // Tests run from target/<profile>/deps/, the demo and benchmarks from target/<profile>/.
    let mut dir = exe.parent().expect("target dir");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target dir");
    }
    let bin = dir.join("dataplane");
    assert!(
        bin.exists(),
        "{} is missing: `cargo xtask` builds it before tests, demo and benchmarks",
        bin.display()
    );
    bin
}

/// A flow: (the CPS's end, the service's).
pub type Flow = (SocketAddr, SocketAddr);

/// A `dataplane daemon` process in a test host; on drop it is killed and
/// what it pinned and wrote is removed.
pub struct DaemonProcess {
    child: std::process::Child,
    /// Its control socket.
    pub socket: PathBuf,
    dir: PathBuf,
    pin_root: PathBuf,
    /// The standbys' place it builds (or adopts), if configured.
    standby: Option<dataplane_user::standby::StandbyHost>,
}

impl DaemonProcess {
    /// Starts the daemon in `host` with `config` (TOML) and waits for its socket.
    pub fn start(host: &NetNs, name: &str, config: &str) -> Self {
        Self::start_with_socket(host, name, config, None)
    }

    /// As `start`, with the control socket at `socket` (default: in the
    /// daemon's test directory).
    pub fn start_with_socket(
        host: &NetNs,
        name: &str,
        config: &str,
        socket: Option<PathBuf>,
    ) -> Self {
        let dir = PathBuf::from(format!("/tmp/dataplane-test-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("test dir");
        // Each daemon's registry in its own directory, never the host's.
        let config = match config.contains("registry =") {
            true => config.to_string(),
            false => format!(
                "registry = \"{}\"\n{config}",
                dir.join("services.json").display()
            ),
        };
        let config = config.as_str();
        std::fs::write(dir.join("dataplane.toml"), config).expect("write config");
        let parsed = dataplane_user::config::DaemonConfig::parse(config)
            .expect("a valid test configuration");
        let socket = socket.unwrap_or_else(|| dir.join("dataplane.sock"));
        let child = Self::spawn(host, &dir, &socket);
        Self {
            child,
            socket,
            dir,
            pin_root: parsed.pin_root.clone(),
            standby: parsed.standby_host(),
        }
    }

    /// Starts `dataplane daemon` with the configuration in `dir`, its log
    /// appended to `dir`/daemon.log, and waits until `socket` answers.
    fn spawn(host: &NetNs, dir: &Path, socket: &Path) -> std::process::Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("daemon.log"))
            .expect("log file");
        // The daemon and the CRIU it starts stay off the real-time CPU.
        let mut command = match cpu_split() {
            Some((_, machinery)) => {
                let mut c = Command::new("taskset");
                c.args(["-c", &machinery.to_string(), "nsenter"]);
                c
            }
            None => Command::new("nsenter"),
        };
        let mut child = command
            .arg(format!("--net={}", host.path().display()))
            .arg(dataplane_bin())
            .arg("--socket")
            .arg(socket)
            .arg("daemon")
            .arg("--config")
            .arg(dir.join("dataplane.toml"))
            .stderr(log)
            .spawn()
            .expect("spawn the daemon");
        // A restart serves its socket once its journal's recovery is done:
        // an armed destination's waits for the handover as long as its
        // source may still pick K (with the tests' default deadline).
        let recovery = armed_grace(Duration::from_millis(DEFAULT_DEADLINE_MS));
        let deadline = std::time::Instant::now() + recovery + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the daemon exited: {status}");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the daemon did not come up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    /// SIGKILLs the daemon (its pinned dataplane and its children stay, as
    /// after a crash) and starts it again with the same configuration, as
    /// its supervisor would.
    pub fn kill_and_restart(&mut self, host: &NetNs) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.restart(host);
    }

    /// Sends `signal` and waits for the process to end: its exit status.
    /// [`DaemonProcess::restart`] starts it again.
    pub fn signal_and_wait(
        &mut self,
        signal: nix::sys::signal::Signal,
    ) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("signal the daemon");
        self.child.wait().expect("wait for the daemon")
    }

    /// Starts the daemon again with the same configuration, as its
    /// supervisor would.
    pub fn restart(&mut self, host: &NetNs) {
        self.child = Self::spawn(host, &self.dir, &self.socket);
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the daemon has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The file the daemon logs to (every run of it, appended).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("daemon.log")
    }

    /// A control-socket client.
    pub fn client(&self) -> dataplane_user::control::client::Client {
        dataplane_user::control::client::Client::connect(&self.socket)
            .expect("connect to the daemon")
    }

    /// Waits for the daemon's migration `id` to end (60 s at most): its
    /// final report.
    pub fn wait_for_migration(&self, id: &str) -> serde_json::Value {
        self.wait_for_report(id, |_| false)
    }

    /// Waits (60 s at most) until the daemon's migration `id` has ended or
    /// its report is `ready`: that report.
    pub fn wait_for_report(
        &self,
        id: &str,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let report = self
                .client()
                .call("migration.status", serde_json::json!({"id": id}))
                .expect("migration.status");
            if report["state"] != "running" || ready(&report) {
                return report;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "migration {id} still running: {report}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Adds `flow` to the daemon's dataplane.
    pub fn add_flow(&self, (cps, service): Flow) {
        self.client()
            .call(
                "flow.add",
                serde_json::json!({"cps": cps, "service": service}),
            )
            .expect("flow.add");
    }

    /// Sends `signal` and waits for the process to end; its exit status.
    /// The pinned dataplane stays, for a restart to adopt.
    pub fn stop(mut self, signal: nix::sys::signal::Signal) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("signal the daemon");
        let status = self.child.wait().expect("wait for the daemon");
        self.pin_root = PathBuf::new();
        self.standby = None;
        status
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default();
            eprintln!("--- daemon log ({}) ---\n{log}", self.dir.display());
        }
        if self.pin_root.join("links").exists() {
            let _ = Dataplane::unload(&self.pin_root);
        }
        if let Some(standby) = &self.standby {
            if standby.pin_root.join("links").exists() {
                let _ = Dataplane::unload(&standby.pin_root);
            }
            if let Some(name) = standby.netns.file_name().filter(|_| standby.netns.exists()) {
                let _ = Command::new("ip")
                    .arg("netns")
                    .arg("del")
                    .arg(name)
                    .status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
