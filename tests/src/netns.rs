//! Network namespaces as test hosts are built from them: `ip` and program
//! runners, [`NetNs`], and entering a namespace on this thread.
use std::{
    fs::File,
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::Command,
};

/// Runs `ip` with `args`, panicking with its output when it fails.
pub fn ip(args: &[&str]) {
    run("ip", args);
}

/// Runs `program` with `args`, panicking with its output when it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Links `a` (an interface made in namespace `in_a`) and `b` (in `in_b`)
/// with a veth pair.
pub fn veth((a, in_a): (&str, &NetNs), (b, in_b): (&str, &NetNs)) {
    ip(&[
        "link",
        "add",
        a,
        "netns",
        in_a.name(),
        "type",
        "veth",
        "peer",
        "name",
        b,
        "netns",
        in_b.name(),
    ]);
}

/// A network namespace, deleted on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace `name` with its loopback up.
    pub fn new(name: &str) -> Self {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ip(&["netns", "add", name]);
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        // Interfaces made here skip duplicate address detection: a new
        // host's link-local addresses would otherwise stay tentative for a
        // second or two, and neighbour discovery (which sends from them)
        // fail meanwhile, unlike on a host that has been up a while.
        for scope in ["all", "default"] {
            ns.sysctl(&format!("net.ipv6.conf.{scope}.accept_dad"), "0");
        }
        ns
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its bind-mounted file, for `nsenter --net=`.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs `ip -n <ns> args`.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// Sets an IPv4/IPv6 sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        run(
            "nsenter",
            &[
                &format!("--net={}", self.path().display()),
                "sysctl",
                "-qw",
                &format!("{key}={value}"),
            ],
        );
    }

    /// Runs `f` on this thread inside the namespace (sockets it opens stay
    /// there), then returns the thread to the namespace it was in.
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        let _entered = Entered::new(&self.path());
        f()
    }

    /// Runs a command inside the namespace with `nsenter --net` (no new mount
    /// namespace, unlike `ip netns exec`) and returns its stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        let net = format!("--net={}", self.path().display());
        let mut all = vec![net.as_str(), program];
        all.extend_from_slice(args);
        run("nsenter", &all)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// This thread inside another network namespace; back where it was on drop.
/// setns changes only the calling thread, so this guard is !Send.
struct Entered {
    previous: File,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Entered {
    fn new(target: &Path) -> Self {
        let previous = File::open("/proc/thread-self/ns/net").expect("open own netns");
        let target =
            File::open(target).unwrap_or_else(|e| panic!("open {}: {e}", target.display()));
        nix::sched::setns(target.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("setns into the test namespace");
        Self {
            previous,
            _not_send: std::marker::PhantomData,
        }
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        nix::sched::setns(self.previous.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("setns back");
    }
}
