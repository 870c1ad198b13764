//! `dataplane calibrate`: CRIU's costs on this host, measured on a service
//! of our own making, and `dataplane plan`'s view of a running service.
//!
//! The synthetic service is started the way services are for CRIU here
//! (docs/migration.md): in a PID and a network namespace of its own, its own
//! session, no file descriptors but 0 to 2, a bound UDP socket, and M bytes
//! of anonymous memory, every page written. Each size is dumped (the
//! service stops), its images copied, and restored from the copy into the
//! same network namespace: the dump, copy and restore of calagna2023's
//! Stop&Copy stage, timed by the wall clock and CRIU's stats.
//!
//! A service's own binary costs CRIU more or less than the synthetic one
//! (its mappings, libraries, scheduling class): given a command, the same
//! is done with that program in the synthetic service's place, each size
//! put into its arguments where they say `{mib}`.
use std::{
    ffi::{CStr, CString},
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::{
    sched::CloneFlags,
    sys::{signal::Signal, wait::waitpid},
    unistd::{ForkResult, Pid},
};

use crate::{
    criu::{Criu, DumpRequest, RestoreRequest, netns_inode, open_netns, stats},
    planning::model::Sample,
};

/// The synthetic service renames itself to this once its memory is written.
const READY: &CStr = c"dp-calib-ready";
/// The service's name from its fork until its exec renames it: until then it
/// holds a copy of this process's memory, which is no measure of the command.
const FORKED: &CStr = c"dp-calib-forked";

/// M of a running process as CRIU sees it: its resident anonymous memory
/// (`Anonymous` of /proc/PID/smaps_rollup), the pages a dump writes.
pub fn state_bytes(pid: u32) -> std::io::Result<u64> {
    let rollup = procfs::process::Process::new(pid as i32)
        .and_then(|p| p.smaps_rollup())
        .map_err(std::io::Error::other)?;
    rollup
        .memory_map_rollup
        .iter()
        .find_map(|map| map.extension.map.get("Anonymous").copied())
        .ok_or_else(|| std::io::Error::other(format!("no Anonymous line for process {pid}")))
}

/// One dump, copy and restore of a service of `bytes` bytes, with its
/// images under `scratch` (removed afterwards): the synthetic service, or
/// `command` (program and arguments, `{mib}` standing for the size in MiB),
/// which must then hold `bytes` of resident anonymous memory once started.
///
/// Forks: call it from a single-threaded process (the CLI runs no runtime
/// for `calibrate`).
pub fn sample(
    criu: &Criu,
    bytes: usize,
    scratch: &Path,
    command: Option<&[String]>,
) -> anyhow::Result<Sample> {
    let images = scratch.join("images");
    let copied = scratch.join("copy");
    let _ = std::fs::remove_dir_all(scratch);
    let outcome = measure(criu, bytes, command, &images, &copied);
    let _ = std::fs::remove_dir_all(scratch);
    outcome
}

fn measure(
    criu: &Criu,
    bytes: usize,
    command: Option<&[String]>,
    images: &Path,
    copied: &Path,
) -> anyhow::Result<Sample> {
    let service = Synthetic::spawn(bytes, command)?;
    let netns = service.netns.as_ref().expect("opened by spawn");
    let state_bytes = state_bytes(service.pid)? as f64;
    let dump = DumpRequest {
        pid: service.pid,
        images_dir: images.to_owned(),
        external: vec![format!("net[{}]:extnet", netns_inode(service.pid)?)],
        ..Default::default()
    };
    let start = Instant::now();
    criu.dump(&dump, false, &mut |_| true)?;
    let dump_us = micros(start.elapsed());
    let frozen_us = stats::dump(images).map_or(0.0, |s| s.frozen_time as f64);
    // D: every file the peer link would send.
    let start = Instant::now();
    std::fs::create_dir_all(copied)?;
    let mut image_bytes = 0;
    for entry in std::fs::read_dir(images)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            image_bytes += std::fs::copy(entry.path(), copied.join(entry.file_name()))?;
        }
    }
    let copy_us = micros(start.elapsed());
    let restore = RestoreRequest {
        images_dir: copied.to_owned(),
        inherit: vec![("extnet".into(), netns)],
    };
    let start = Instant::now();
    let restored = criu.restore(&restore, &mut |_, _| true)?;
    let restore_us = micros(start.elapsed());
    // The restored root is this thread's child (CRIU's rst_sibling).
    let restored = Pid::from_raw(restored as i32);
    let _ = nix::sys::signal::kill(restored, Signal::SIGKILL);
    let _ = waitpid(restored, None);
    Ok(Sample {
        state_bytes,
        image_bytes: image_bytes as f64,
        dump_us,
        frozen_us,
        copy_us,
        restore_us,
    })
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The synthetic service: `pid` (as this PID namespace sees it) is the
/// first process of a new PID namespace, child of `parent`, which waits
/// for it. Killed on drop.
struct Synthetic {
    parent: Pid,
    pid: u32,
    /// Its network namespace, held open so a restore can go back into it.
    netns: Option<OwnedFd>,
}

impl Synthetic {
    fn spawn(bytes: usize, command: Option<&[String]>) -> anyhow::Result<Self> {
        // Made before the fork: the children allocate nothing.
        let argv = command
            .map(|words| {
                let mib = (bytes >> 20).to_string();
                words
                    .iter()
                    .map(|w| CString::new(w.replace("{mib}", &mib)))
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        anyhow::ensure!(
            argv.as_ref().is_none_or(|a| !a.is_empty()),
            "an empty service command"
        );
        // SAFETY: the caller is single-threaded; the children use plain
        // syscalls only and leave through _exit or exec.
        let parent = match unsafe { nix::unistd::fork() }? {
            ForkResult::Child => {
                let code = match nix::sched::unshare(
                    CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWNET,
                ) {
                    // SAFETY: as above.
                    Ok(()) => match unsafe {
                        libc::prctl(libc::PR_SET_NAME, FORKED.as_ptr());
                        nix::unistd::fork()
                    } {
                        Ok(ForkResult::Child) => match &argv {
                            Some(argv) => exec_service(argv),
                            None => run_service(bytes),
                        },
                        Ok(ForkResult::Parent { child }) => {
                            let _ = waitpid(child, None);
                            0
                        }
                        Err(_) => 1,
                    },
                    Err(_) => 1,
                };
                // SAFETY: leaves the forked child without running the parent's destructors.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => child,
        };
        let mut service = Self {
            parent,
            pid: 0,
            netns: None,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let children = format!("/proc/{parent}/task/{parent}/children");
        loop {
            if service.pid == 0 {
                let text = std::fs::read_to_string(&children).unwrap_or_default();
                service.pid = text
                    .split_whitespace()
                    .next()
                    .map_or(0, |p| p.parse().unwrap_or(0));
            }
            // The name first: read after it, the size is the exec'd command's.
            let name = std::fs::read_to_string(format!("/proc/{}/comm", service.pid));
            let ready = service.pid != 0
                && match command {
                    None => name.is_ok_and(|c| c.trim().as_bytes() == READY.to_bytes()),
                    Some(_) => {
                        name.is_ok_and(|c| c.trim().as_bytes() != FORKED.to_bytes())
                            && state_bytes(service.pid).is_ok_and(|b| b >= bytes as u64)
                    }
                };
            if ready {
                break;
            }
            // The namespace's first process gone: its parent has exited.
            if !matches!(
                waitpid(service.parent, Some(nix::sys::wait::WaitPidFlag::WNOHANG)),
                Ok(nix::sys::wait::WaitStatus::StillAlive)
            ) {
                service.parent = Pid::from_raw(0);
                anyhow::bail!(
                    "the service of {bytes} bytes ({}) exited before it was ready",
                    command.map_or("synthetic".into(), |c| c.join(" "))
                );
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the service of {bytes} bytes ({}) did not start within 10 s",
                command.map_or("synthetic".into(), |c| c.join(" "))
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        service.netns = Some(open_netns(Path::new(&format!(
            "/proc/{}/ns/net",
            service.pid
        )))?);
        Ok(service)
    }
}

impl Drop for Synthetic {
    fn drop(&mut self) {
        if self.pid != 0 {
            let _ = nix::sys::signal::kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        }
        if self.parent.as_raw() != 0 {
            let _ = nix::sys::signal::kill(self.parent, Signal::SIGKILL);
            let _ = waitpid(self.parent, None);
        }
    }
}

/// Makes this process what CRIU dumps here: a session leader (inside the
/// dumped tree) with fds 0 to 2 on /dev/null and no other fd.
fn detach() {
    // SAFETY: plain syscalls on this process's own fds.
    unsafe {
        libc::setsid();
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        for fd in 0..3 {
            libc::dup2(null, fd);
        }
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
    }
}

/// A service command's process, in its new namespaces: never returns.
fn exec_service(argv: &[CString]) -> ! {
    detach();
    let _ = nix::unistd::execvp(&argv[0], argv);
    // SAFETY: leaves the forked child without running the parent's destructors.
    unsafe { libc::_exit(127) }
}

/// The synthetic service's body, in its new namespaces: never returns.
fn run_service(bytes: usize) -> ! {
    detach();
    // SAFETY: plain syscalls on this process's own memory.
    unsafe {
        let memory = libc::mmap(
            std::ptr::null_mut(),
            bytes.max(4096),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if memory == libc::MAP_FAILED {
            libc::_exit(2);
        }
        // Every page written, with non-zero bytes: resident, and dumped.
        for page in (0..bytes).step_by(4096) {
            *memory.cast::<u8>().add(page) = (page >> 12) as u8 | 1;
        }
        // A service has a socket; CRIU dumps it with the rest.
        let socket = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 5000u16.to_be(),
            sin_addr: libc::in_addr { s_addr: 0 },
            sin_zero: [0; 8],
        };
        libc::bind(
            socket,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        );
        libc::prctl(libc::PR_SET_NAME, READY.as_ptr());
        loop {
            libc::pause();
        }
    }
}

/// A directory for calibration images: `base`, or one in the temp dir.
pub fn scratch_dir(base: Option<&Path>) -> PathBuf {
    base.map(Path::to_owned).unwrap_or_else(|| {
        std::env::temp_dir().join(format!("dataplane-calibrate-{}", std::process::id()))
    })
}

#[cfg(test)]
mod tests {
    /// Other tests run in this process at the same time and allocate and
    /// free a few MiB (the control tests' 4 MiB lines): 64 MiB against a
    /// 48 MiB bar stays clear of them and still fails a reader that does
    /// not see the process grow.
    #[test]
    fn reads_this_process_state_size() {
        let before = super::state_bytes(std::process::id()).unwrap();
        let memory = std::hint::black_box(vec![1u8; 64 << 20]);
        let after = super::state_bytes(std::process::id()).unwrap();
        assert!(after >= before + (48 << 20), "{before} -> {after}");
        drop(std::hint::black_box(memory));
    }
}
