//! Starting a service as CRIU needs it to checkpoint it whole and restore it
//! on another host: the root of a PID namespace of its own (its pids cannot
//! collide with the destination's), the leader of a session of its own (no
//! terminal or process group outside what is dumped), no file descriptor
//! but /dev/null on 0 to 2 (nothing that exists on this host only), in a
//! working directory that every host has.
use std::{
    io::{self, Read},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::Path,
    process::{Command, Stdio},
};

/// A service's start.
pub struct Launch<'a> {
    /// The program and its arguments.
    pub argv: &'a [String],
    /// Its working directory.
    pub cwd: &'a Path,
    /// The network namespace it runs in; none: the daemon's.
    pub netns: Option<&'a Path>,
    /// The CPUs it runs on; empty: any.
    pub cpus: &'a [usize],
    /// Its SCHED_FIFO priority; 0: an ordinary task.
    pub priority: u8,
}

/// Starts the service; its pid as this daemon sees it.
pub fn start(launch: &Launch) -> Result<u32, LaunchError> {
    let (program, args) = launch.argv.split_first().ok_or(LaunchError::NoCommand)?;
    let netns = launch
        .netns
        .map(std::fs::File::open)
        .transpose()
        .map_err(LaunchError::Netns)?;
    let netns_fd = netns.as_ref().map(|f| f.as_raw_fd());
    // The intermediate process writes the service's pid here.
    let (mut pid_read, pid_write) = std::io::pipe().map_err(LaunchError::Start)?;
    let pid_fd = pid_write.as_raw_fd();
    // SAFETY: a cpu_set_t is plain bits; all zero is the empty set.
    let mut cpus: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in launch
        .cpus
        .iter()
        .filter(|&&c| c < libc::CPU_SETSIZE as usize)
    {
        // SAFETY: cpu is below CPU_SETSIZE.
        unsafe { libc::CPU_SET(cpu, &mut cpus) };
    }
    let pin = !launch.cpus.is_empty();
    let priority = libc::c_int::from(launch.priority);
    let mut command = Command::new(program);
    command
        .args(args)
        .current_dir(launch.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: between fork and exec the closure makes system calls only
    // (async-signal-safe), on values made before the fork.
    unsafe {
        command.pre_exec(move || {
            let check = |rc: libc::c_long| match rc {
                -1 => Err(io::Error::last_os_error()),
                _ => Ok(()),
            };
            if let Some(fd) = netns_fd {
                check(libc::setns(fd, libc::CLONE_NEWNET).into())?;
            }
            if pin {
                check(libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &cpus).into())?;
            }
            if priority > 0 {
                let param = libc::sched_param {
                    sched_priority: priority,
                };
                check(libc::sched_setscheduler(0, libc::SCHED_FIFO, &param).into())?;
            }
            // Every descriptor above 2 closes at exec: the daemon's own
            // (sockets, maps) must not reach the service, or CRIU would
            // have to dump and restore them.
            check(libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ))?;
            check(libc::unshare(libc::CLONE_NEWPID).into())?;
            match libc::fork() {
                -1 => Err(io::Error::last_os_error()),
                // The service: PID 1 of the new namespace, then its own
                // session's leader, then the program.
                0 => check(libc::setsid().into()),
                service => {
                    let pid = (service as u32).to_ne_bytes();
                    libc::write(pid_fd, pid.as_ptr().cast(), pid.len());
                    libc::_exit(0)
                }
            }
        });
    }
    // Returns once the service has started the program (or failed to).
    let mut intermediate = command.spawn().map_err(LaunchError::Start)?;
    drop(command);
    drop(pid_write);
    let _ = intermediate.wait();
    let mut pid = [0; 4];
    pid_read
        .read_exact(&mut pid)
        .map_err(|_| LaunchError::NoPid)?;
    Ok(u32::from_ne_bytes(pid))
}

/// A service that could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("no command to start")]
    NoCommand,
    #[error("its network namespace: {0}")]
    Netns(io::Error),
    #[error("starting it: {0}")]
    Start(io::Error),
    #[error("it did not start (no pid came back)")]
    NoPid,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The started process is PID 1 of a namespace of its own, leads its
    /// own session, holds no descriptor above 2 and runs where it is told.
    #[test]
    fn a_service_starts_alone_in_its_own_pid_namespace_and_session() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: a PID namespace needs root");
            return;
        }
        let cwd = tempfile::tempdir().unwrap();
        let argv = ["sleep".to_string(), "5".to_string()];
        let pid = start(&Launch {
            argv: &argv,
            cwd: cwd.path(),
            netns: None,
            cpus: &[0],
            priority: 0,
        })
        .unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.split_whitespace().collect::<Vec<_>>())
                .unwrap()
        };
        assert_eq!(field("NSpid:"), [pid.to_string().as_str(), "1"]);
        assert_eq!(field("NSsid:"), [pid.to_string().as_str(), "1"]);
        assert_eq!(field("Cpus_allowed_list:"), ["0"]);
        let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(fds.len(), 3, "{fds:?}");
        assert_eq!(
            std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap(),
            cwd.path()
        );
        assert_eq!(
            std::fs::read_link(format!("/proc/{pid}/fd/1")).unwrap(),
            Path::new("/dev/null")
        );
        crate::host::tasks::kill_pid_namespace(pid);
        let missing = start(&Launch {
            argv: &["/nonexistent/program".to_string()],
            cwd: cwd.path(),
            netns: None,
            cpus: &[],
            priority: 0,
        });
        assert!(matches!(missing, Err(LaunchError::Start(_))), "{missing:?}");
    }
}
