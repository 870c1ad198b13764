//! A CRIU client over CRIU's RPC: `criu swrk` on a SEQPACKET socketpair.
//!
//! Each call spawns one `criu swrk` worker, sends one request, answers the
//! worker's notifications, and returns its response; the worker exits when
//! its end of the socket closes. Calls block: the daemon runs them on a
//! blocking thread.
pub mod precopy;
pub mod proto;
pub mod stats;

use std::{
    os::{
        fd::{AsRawFd, OwnedFd, RawFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use nix::sys::{
    socket::{
        AddressFamily, MsgFlags, SockFlag, SockType, recv, send, setsockopt, socketpair, sockopt,
    },
    time::TimeVal,
};
use prost::Message;
pub use proto::{Features, Opts, ReqType, Resp, Version};
use proto::{InheritFd, NetworkLock, Notify, PageServerInfo, Req};

/// Where CRIU is installed by `cargo xtask setup`.
pub const DEFAULT_CRIU: &str = "/usr/local/sbin/criu";

/// Largest RPC message read from CRIU.
const MAX_MESSAGE: usize = 1 << 20;

/// Errors of talking to CRIU, each naming what failed.
#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    #[error("starting {bin}: {source} (is CRIU installed? `cargo xtask setup` installs it)")]
    Spawn {
        bin: PathBuf,
        source: std::io::Error,
    },
    #[error("connecting to the criu service at {path}: {source} (is `criu service` running?)")]
    Service {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("CRIU RPC socket: {0}")]
    Socket(#[from] nix::Error),
    #[error("CRIU sent a message that does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("CRIU closed the RPC socket during {0:?} (killed, or crashed; see its log)")]
    Closed(ReqType),
    #[error("CRIU {request:?} failed: {message} (errno {errno}); see {log}")]
    Failed {
        request: ReqType,
        message: String,
        errno: i32,
        log: String,
    },
    #[error("CRIU answered {got:?} to {sent:?}")]
    Unexpected { sent: ReqType, got: ReqType },
    #[error("CRIU {request:?} made no progress for {after:?}; stopped it (see {log})")]
    Timeout {
        request: ReqType,
        after: Duration,
        log: String,
    },
    #[error("restored task {pid} died before CRIU finished the restore; stopped CRIU")]
    RestoredDied { pid: u32 },
    #[error("CRIU {0:?} stopped before it finished, as its caller asked")]
    Stopped(ReqType),
}

/// How often a request waiting on CRIU looks whether it is still worth
/// waiting for (a restored task CRIU waits on may have died).
const WATCH_EVERY: Duration = Duration::from_millis(100);

/// How often [`Criu::dump_until`] asks whether to stop: a hold's budget is
/// kept to within this.
const STOP_EVERY: Duration = Duration::from_millis(2);

/// The CRIU binary and how long a request may take.
#[derive(Clone, Debug)]
pub struct Criu {
    bin: PathBuf,
    timeout: Duration,
    /// A `criu service` socket that requests go to instead of a fresh
    /// `criu swrk`, where they need no file descriptor of ours.
    service: Option<PathBuf>,
}

impl Default for Criu {
    fn default() -> Self {
        Self::new(DEFAULT_CRIU)
    }
}

/// A dump or pre-dump of a process tree.
#[derive(Clone, Debug, Default)]
pub struct DumpRequest {
    /// Root of the process tree.
    pub pid: u32,
    /// Directory the images go to (created if missing).
    pub images_dir: PathBuf,
    /// Keep the tree running after the dump.
    pub leave_running: bool,
    /// Previous pre-dump's images, relative to `images_dir` (iterative dumps).
    pub parent_img: Option<String>,
    /// Track memory changes for a following round (needs soft-dirty).
    pub track_mem: bool,
    /// External resources, as CRIU's `--external`, e.g. `net[4026532000]:extnet`.
    pub external: Vec<String>,
    /// A container's rootfs: CRIU's root for the tree, whose cgroups it
    /// then dumps too (as runc has CRIU dump a container).
    pub root: Option<PathBuf>,
    /// A `criu page-server` to send the memory pages to instead of
    /// `images_dir` (the other images still go there).
    pub page_server: Option<std::net::SocketAddr>,
}

/// A restore of a dumped tree.
#[derive(Debug)]
pub struct RestoreRequest<'a> {
    pub images_dir: PathBuf,
    /// Open fds that stand for the dump's externals: (key, fd), e.g. the
    /// destination's network namespace for `extnet`.
    pub inherit: Vec<(String, &'a OwnedFd)>,
}

impl Criu {
    /// A client of the CRIU binary at `bin`, allowing each request a minute.
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        Self {
            bin: bin.into(),
            timeout: Duration::from_secs(60),
            service: None,
        }
    }

    /// The same client sending its requests to the `criu service` listening
    /// on `socket` (`criu service --address SOCKET`), except those that
    /// hand CRIU file descriptors (a restore into another network
    /// namespace): a service cannot take them, so those still go to a
    /// `criu swrk` of our own.
    pub fn with_service(self, socket: impl Into<PathBuf>) -> Self {
        Self {
            service: Some(socket.into()),
            ..self
        }
    }

    /// The same client with `timeout` for CRIU's silence within a request.
    pub fn with_timeout(self, timeout: Duration) -> Self {
        Self { timeout, ..self }
    }

    /// CRIU's version.
    pub fn version(&self) -> Result<Version, CriuError> {
        let resp = self.call(
            request(ReqType::Version, None),
            &[],
            &mut |_| true,
            &mut || None,
            WATCH_EVERY,
        )?;
        resp.version.ok_or(CriuError::Unexpected {
            sent: ReqType::Version,
            got: ReqType::Empty,
        })
    }

    /// Whether this CRIU and kernel can track memory changes, which
    /// decides whether pre-dump is possible.
    pub fn features(&self) -> Result<Features, CriuError> {
        let mut req = request(ReqType::FeatureCheck, None);
        req.features = Some(Features {
            mem_track: Some(true),
            ..Default::default()
        });
        let resp = self.call(req, &[], &mut |_| true, &mut || None, WATCH_EVERY)?;
        Ok(resp.features.unwrap_or_default())
    }

    /// Asks CRIU for its version and features and logs them: a daemon
    /// does this at its start, so that a missing or unusable CRIU, or a
    /// kernel without memory tracking, shows then and not in the first
    /// migration. Blocks for the two requests (tens of ms).
    pub fn log_capabilities(&self) {
        match self.version().and_then(|v| Ok((v, self.features()?))) {
            Ok((version, features)) => {
                let mem_track = features.mem_track.unwrap_or(false);
                tracing::info!(
                    version = %format!("{}.{}", version.major_number, version.minor_number),
                    sublevel = version.sublevel,
                    mem_track,
                    "CRIU ready"
                );
                if !mem_track {
                    warn_no_memory_tracking();
                }
            }
            Err(e) => tracing::warn!(
                "CRIU at {} is not usable ({e}): migrations from and to this host fail \
                 until it is",
                self.bin.display()
            ),
        }
    }

    /// Dumps (or with `pre`, pre-dumps) a process tree. `notify` sees each
    /// notification (`pre-dump`, `post-dump`, ...) and may fail it, which
    /// makes CRIU abort and resume the tree.
    pub fn dump(
        &self,
        dump: &DumpRequest,
        pre: bool,
        notify: &mut dyn FnMut(&str) -> bool,
    ) -> Result<(), CriuError> {
        self.dump_watched(dump, pre, notify, &mut || None, WATCH_EVERY)
    }

    /// A dump whose wait for CRIU asks `watch` every `slice` of silence.
    fn dump_watched(
        &self,
        dump: &DumpRequest,
        pre: bool,
        notify: &mut dyn FnMut(&str) -> bool,
        watch: &mut dyn FnMut() -> Option<CriuError>,
        slice: Duration,
    ) -> Result<(), CriuError> {
        let _one_at_a_time = loop {
            match DUMPS.try_lock() {
                Ok(held) => break held,
                Err(std::sync::TryLockError::Poisoned(e)) => break e.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
            if let Some(stopped) = watch() {
                return Err(stopped);
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        std::fs::create_dir_all(&dump.images_dir).map_err(|source| CriuError::Spawn {
            bin: dump.images_dir.clone(),
            source,
        })?;
        let opts = Opts {
            pid: Some(dump.pid as i32),
            images_dir: Some(dump.images_dir.display().to_string()),
            leave_running: Some(dump.leave_running),
            parent_img: dump.parent_img.clone(),
            track_mem: Some(dump.track_mem),
            external: dump.external.clone(),
            root: dump.root.as_ref().map(|root| root.display().to_string()),
            manage_cgroups: dump.root.is_some().then_some(true),
            ps: dump.page_server.map(|addr| PageServerInfo {
                address: Some(addr.ip().to_string()),
                port: Some(i32::from(addr.port())),
                ..Default::default()
            }),
            // The dataplane holds the service's input, so CRIU need not lock the network.
            network_lock: Some(NetworkLock::Skip as i32),
            log_file: Some(if pre { "pre-dump.log" } else { "dump.log" }.into()),
            ..base_opts()
        };
        let kind = if pre { ReqType::PreDump } else { ReqType::Dump };
        let notify = &mut |n: &Notify| notify(n.script.as_deref().unwrap_or_default());
        self.call(request(kind, Some(opts)), &[], notify, watch, slice)
            .map(drop)
    }

    /// Dumps a process tree, stopped as soon as `stop` says so: CRIU is
    /// killed, and the tree goes on as the kernel takes it from a tracer
    /// that died. (A `criu service` worker is not ours to kill: it ends
    /// when it finds the connection closed.)
    pub fn dump_until(
        &self,
        dump: &DumpRequest,
        stop: &mut dyn FnMut() -> bool,
    ) -> Result<(), CriuError> {
        let watch = &mut || stop().then_some(CriuError::Stopped(ReqType::Dump));
        self.dump_watched(dump, false, &mut |_| true, watch, STOP_EVERY)
    }

    /// Restores a dumped tree, detached (a sibling of this process, not of
    /// CRIU), and returns the restored root's pid. `notify` sees each
    /// notification with the root's pid where CRIU gives it
    /// (`setup-namespaces`, `post-restore`: the tree exists, and a caller
    /// that dies from here on must be able to find it), and may fail it.
    pub fn restore(
        &self,
        restore: &RestoreRequest,
        notify: &mut dyn FnMut(&str, Option<u32>) -> bool,
    ) -> Result<u32, CriuError> {
        let inherit_fd = restore
            .inherit
            .iter()
            .map(|(key, fd)| InheritFd {
                key: key.clone(),
                fd: fd.as_raw_fd(),
            })
            .collect();
        let opts = Opts {
            images_dir: Some(restore.images_dir.display().to_string()),
            rst_sibling: Some(true),
            inherit_fd,
            log_file: Some("restore.log".into()),
            ..base_opts()
        };
        let fds: Vec<RawFd> = restore
            .inherit
            .iter()
            .map(|(_, fd)| fd.as_raw_fd())
            .collect();
        // CRIU waits on the restored tasks at each stage and cannot see one
        // die (with rst_sibling the root is not its child): a task killed
        // meanwhile would stall it until the timeout. Watch the root.
        let root = std::cell::Cell::new(None);
        let notify = &mut |n: &Notify| {
            let pid = n.pid.and_then(|p| u32::try_from(p).ok());
            if pid.is_some() {
                root.set(pid);
            }
            notify(n.script.as_deref().unwrap_or_default(), pid)
        };
        let watch = &mut || match root.get() {
            Some(pid) if !crate::host::tasks::running(pid) => Some(CriuError::RestoredDied { pid }),
            _ => None,
        };
        let resp = self.call(
            request(ReqType::Restore, Some(opts)),
            &fds,
            notify,
            watch,
            WATCH_EVERY,
        )?;
        Ok(resp.restore.map(|r| r.pid as u32).unwrap_or_default())
    }

    /// One request: to the `criu service` if there is one and `inherit` is
    /// empty, else to a fresh `criu swrk` with `inherit` fds passed to it.
    /// `watch` is asked every `slice` that CRIU is silent, and ends the
    /// request with its error.
    fn call(
        &self,
        req: Req,
        inherit: &[RawFd],
        notify: &mut dyn FnMut(&Notify) -> bool,
        watch: &mut dyn FnMut() -> Option<CriuError>,
        slice: Duration,
    ) -> Result<Resp, CriuError> {
        let sent = ReqType::try_from(req.r#type).unwrap_or(ReqType::Empty);
        let log = req
            .opts
            .as_ref()
            .and_then(|o| o.images_dir.as_ref().zip(o.log_file.as_ref()))
            .map(|(dir, file)| format!("{dir}/{file}"))
            .unwrap_or_else(|| "CRIU's stderr".into());
        // Each receive waits a slice; `exchange` adds slices of silence up.
        let slice = slice.min(self.timeout);
        let timeout = TimeVal::new(slice.as_secs() as _, slice.subsec_micros() as _);
        let wait = Wait {
            slice,
            silence: self.timeout,
            watch,
        };
        let timed_out = |e| match e {
            CriuError::Socket(nix::Error::EAGAIN) => CriuError::Timeout {
                request: sent,
                after: self.timeout,
                log: log.clone(),
            },
            e => e,
        };
        if let (Some(service), []) = (&self.service, inherit) {
            // The service forks a worker per connection; closing ours ends it.
            let sock = connect_service(service)?;
            setsockopt(&sock, sockopt::ReceiveTimeout, &timeout)?;
            return exchange(&sock, req, sent, notify, wait, &log).map_err(timed_out);
        }
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        setsockopt(&ours, sockopt::ReceiveTimeout, &timeout)?;
        let before = thread_children();
        let mut worker = self.spawn(&theirs, inherit)?;
        drop(theirs);
        let outcome = exchange(&ours, req, sent, notify, wait, &log).map_err(timed_out);
        if outcome.is_err() {
            // A failed or stuck restore can leave half-restored tasks behind
            // as this thread's children (rst_sibling): remove them with CRIU.
            let _ = worker.kill();
            for pid in thread_children().difference(&before) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(*pid as i32), None);
            }
        }
        drop(ours);
        let _ = worker.wait();
        outcome
    }

    fn spawn(&self, theirs: &OwnedFd, inherit: &[RawFd]) -> Result<Child, CriuError> {
        let mut keep: Vec<RawFd> = inherit.to_vec();
        keep.push(theirs.as_raw_fd());
        let mut cmd = Command::new(&self.bin);
        cmd.arg("swrk")
            .arg(theirs.as_raw_fd().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // SAFETY: between fork and exec only async-signal-safe fcntl calls run.
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &keep {
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        cmd.spawn().map_err(|source| CriuError::Spawn {
            bin: self.bin.clone(),
            source,
        })
    }
}

/// A SEQPACKET connection to a `criu service` socket.
fn connect_service(path: &Path) -> Result<OwnedFd, CriuError> {
    let sock = nix::sys::socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let address = nix::sys::socket::UnixAddr::new(path)?;
    nix::sys::socket::connect(sock.as_raw_fd(), &address).map_err(|e| CriuError::Service {
        path: path.to_owned(),
        source: e.into(),
    })?;
    Ok(sock)
}

fn request(kind: ReqType, opts: Option<Opts>) -> Req {
    Req {
        r#type: kind as i32,
        opts,
        ..Default::default()
    }
}

/// Options every request shares: notifications on, verbose logs into the images directory.
fn base_opts() -> Opts {
    Opts {
        images_dir_fd: -1,
        notify_scripts: Some(true),
        log_level: Some(4),
        ..Default::default()
    }
}

/// How `exchange` waits for CRIU: receives of `slice` (the socket's
/// timeout), `watch` asked after each one that timed out, up to `silence`
/// without a message.
struct Wait<'a> {
    slice: Duration,
    silence: Duration,
    watch: &'a mut dyn FnMut() -> Option<CriuError>,
}

/// Held for each dump and pre-dump. For a process whose /proc is not its
/// PID namespace's, CRIU's parasite mounts one on a directory it makes in
/// the process's working directory (`proc.crtools`), and a second dump of
/// a process with the same working directory fails while the first holds
/// it. One dump at a time in this daemon: migrations of several services
/// from this host wait for each other's dump, not each other's replay.
static DUMPS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The last errors CRIU logged in the file `log`, one line each. Its answer
/// names only the first, and that is not always the cause: CRIU logs some
/// errors it then goes on from.
pub(crate) fn logged_errors(log: &str) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    let errors: Vec<&str> = text
        .lines()
        .filter_map(|l| l.find("Error (").map(|at| &l[at..]))
        .collect();
    let last = &errors[errors.len().saturating_sub(3)..];
    (!last.is_empty()).then(|| last.join(" | "))
}

/// Sends `req`, answers notifications with `notify`, and returns the final response.
fn exchange(
    sock: &OwnedFd,
    req: Req,
    sent: ReqType,
    notify: &mut dyn FnMut(&Notify) -> bool,
    wait: Wait,
    log: &str,
) -> Result<Resp, CriuError> {
    send(sock.as_raw_fd(), &req.encode_to_vec(), MsgFlags::empty())?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut quiet = Duration::ZERO;
    loop {
        let n = match recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Err(nix::Error::EAGAIN) => {
                if let Some(stop) = (wait.watch)() {
                    return Err(stop);
                }
                quiet += wait.slice;
                if quiet >= wait.silence {
                    return Err(CriuError::Socket(nix::Error::EAGAIN));
                }
                continue;
            }
            n => n?,
        };
        quiet = Duration::ZERO;
        if n == 0 {
            return Err(CriuError::Closed(sent));
        }
        let resp = Resp::decode(&buf[..n])?;
        let got = ReqType::try_from(resp.r#type).unwrap_or(ReqType::Empty);
        if got == ReqType::Notify {
            let ok = notify(&resp.notify.unwrap_or_default());
            let answer = Req {
                r#type: ReqType::Notify as i32,
                notify_success: Some(ok),
                ..Default::default()
            };
            send(sock.as_raw_fd(), &answer.encode_to_vec(), MsgFlags::empty())?;
            continue;
        }
        if !resp.success {
            let message = logged_errors(log)
                .or(resp.cr_errmsg)
                .unwrap_or_else(|| "no message".into());
            return Err(CriuError::Failed {
                request: sent,
                message,
                errno: resp.cr_errno.unwrap_or_default(),
                log: log.to_string(),
            });
        }
        if got != sent {
            return Err(CriuError::Unexpected { sent, got });
        }
        return Ok(resp);
    }
}

/// The children of the calling thread, from /proc.
fn thread_children() -> std::collections::HashSet<u32> {
    let tid = nix::unistd::gettid();
    std::fs::read_to_string(format!("/proc/self/task/{tid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The inode that names a process's network namespace for `--external net[...]`.
pub fn netns_inode(pid: u32) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(format!("/proc/{pid}/ns/net"))?.ino())
}

/// Opens a network namespace file (e.g. /run/netns/dst) for `inherit_fd`.
pub fn open_netns(path: &Path) -> std::io::Result<OwnedFd> {
    Ok(std::fs::File::open(path)?.into())
}
/// Says once per process that pre-dump rounds cannot be taken here.
pub fn warn_no_memory_tracking() {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        tracing::warn!(
            "CRIU reports no memory tracking on this kernel (no soft-dirty): \
             no pre-dump rounds, a single dump"
        )
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_names_the_last_errors_of_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("dump.log");
        let lines = [
            "(00.01) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE",
            "(00.02) dumping",
            "(00.03) Error (criu/sk-inet.c:1): cannot dump socket",
            "(00.04) Error (criu/files.c:2): fd 3",
            "(00.05) Error (criu/cr-dump.c:3): Dumping FAILED.",
        ];
        std::fs::write(&log, lines.join("\n")).unwrap();
        assert_eq!(
            logged_errors(log.to_str().unwrap()).as_deref(),
            Some(
                "Error (criu/sk-inet.c:1): cannot dump socket | Error (criu/files.c:2): fd 3 \
                 | Error (criu/cr-dump.c:3): Dumping FAILED."
            )
        );
        std::fs::write(&log, "(00.01) all good\n").unwrap();
        assert_eq!(logged_errors(log.to_str().unwrap()), None);
        assert_eq!(logged_errors("/nonexistent/dump.log"), None);
    }
}
