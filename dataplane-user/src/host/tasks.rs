//! Where a service's threads run. A control host keeps its real-time tasks
//! on CPUs of their own, away from the migration machinery (the daemon and
//! the CRIU it starts): this kernel is not preemptible, and a control task
//! woken on a CPU where CRIU runs a long stretch of kernel code waits for
//! it, whatever its priority. CRIU restores a task's scheduling policy but
//! not its CPU affinity, so a restored instance would inherit CRIU's CPUs
//! and serve beside the daemon; the destination gives it its source's.
use nix::{
    sched::{CpuSet, sched_getaffinity, sched_setaffinity},
    unistd::Pid,
};
use procfs::process::{Process, Stat};

/// The thread ids of process `root` and of all its descendants (none if
/// it is gone): a restored service may be a tree of processes.
fn threads(root: u32) -> Vec<i32> {
    let mut threads = Vec::new();
    let mut processes = vec![root as i32];
    while let Some(pid) = processes.pop() {
        let Ok(tasks) = Process::new(pid).and_then(|p| p.tasks()) else {
            continue;
        };
        for task in tasks.flatten() {
            threads.push(task.tid);
            let children = task.children().unwrap_or_default();
            processes.extend(children.into_iter().map(|c| c as i32));
        }
    }
    threads
}

/// /proc/PID/stat of process `pid`; none if it is gone.
fn stat(pid: u32) -> Option<Stat> {
    Process::new(pid as i32).ok()?.stat().ok()
}

/// Whether process `pid` exists and has not exited (a zombie has).
pub fn running(pid: u32) -> bool {
    stat(pid).is_some_and(|s| !matches!(s.state, 'Z' | 'X'))
}

/// Process `pid`'s start time in clock ticks since boot (field 22 of
/// /proc/PID/stat): with its pid, what names a process (pids are reused).
pub fn start_time(pid: u32) -> Option<u64> {
    stat(pid).map(|s| s.starttime)
}

/// A process, known by its pid and start time (pids are reused).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    pub pid: u32,
    pub start_time: u64,
}

impl Identity {
    /// Process `pid` as it runs now; `None` if it does not.
    pub fn of(pid: u32) -> Option<Self> {
        Some(Self {
            pid,
            start_time: start_time(pid)?,
        })
    }

    /// Whether the process still runs (and is the same process): not a
    /// zombie, which keeps its pid and start time until it is reaped.
    pub fn runs(&self) -> bool {
        stat(self.pid)
            .is_some_and(|s| s.starttime == self.start_time && !matches!(s.state, 'Z' | 'X'))
    }
}

/// CPU time process `pid` has used (utime + stime, fields 14 and 15 of
/// /proc/PID/stat, all its threads), in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    stat(pid).map(|s| s.utime + s.stime)
}

fn cpu_list(set: &CpuSet) -> Vec<usize> {
    (0..CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .collect()
}

/// The CPUs process `pid` may run on (its main thread's affinity).
pub fn cpus_of(pid: u32) -> nix::Result<Vec<usize>> {
    sched_getaffinity(Pid::from_raw(pid as i32)).map(|set| cpu_list(&set))
}

/// This host's CPUs outside `cpus` (where a standby runs, away from the
/// real-time tasks); empty (any) if `cpus` is empty or covers them all.
pub fn other_cpus(cpus: &[usize]) -> Vec<usize> {
    if cpus.is_empty() {
        return Vec::new();
    }
    (0..online_cpus()).filter(|c| !cpus.contains(c)).collect()
}

/// The number of CPUs online on this host.
fn online_cpus() -> usize {
    // Not available_parallelism(): that counts this daemon's own CPUs.
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize
}

/// Confines every thread of `pid` and its descendants to `cpus`, those of them this host has.
/// Returns the CPUs applied; an error names what failed. An empty `cpus`,
/// or one naming no CPU of this host, leaves the threads where they are.
pub fn pin(pid: u32, cpus: &[usize]) -> Result<Vec<usize>, String> {
    let online = online_cpus();
    let mut set = CpuSet::new();
    for &cpu in cpus.iter().filter(|&&cpu| cpu < online) {
        set.set(cpu).map_err(|e| format!("CPU {cpu}: {e}"))?;
    }
    let applied = cpu_list(&set);
    if applied.is_empty() {
        return Ok(applied);
    }
    for tid in threads(pid) {
        sched_setaffinity(Pid::from_raw(tid), &set)
            .map_err(|e| format!("thread {tid} of {pid} to CPUs {applied:?}: {e}"))?;
    }
    Ok(applied)
}

/// Runs the calling thread at SCHED_FIFO `priority` with reset-on-fork:
/// a daemon beside busy real-time control tasks must still drain its logs
/// and replay, and gets no CPU as an ordinary task while they run. Threads
/// and processes it starts (CRIU) start as ordinary tasks: CRIU in kernel
/// code at a real-time priority would hold up the control tasks.
pub fn run_realtime(priority: u8) -> std::io::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority.into(),
    };
    // SAFETY: a plain syscall on the calling thread (0) with a valid parameter.
    let rc = unsafe {
        libc::sched_setscheduler(0, libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, &param)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Moves every thread of `pid` and its descendants to this daemon's CPUs as an ordinary task,
/// before it is killed: a process frees its memory as it exits, in the
/// kernel, and at a real-time priority on a real-time CPU that would hold
/// up the control tasks there (milliseconds for a large service on a
/// non-preemptible kernel). Best effort: the process may be gone.
pub fn demote(pid: u32) {
    let ours = sched_getaffinity(Pid::from_raw(0));
    for tid in threads(pid) {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: a plain syscall on a thread id with a valid parameter.
        unsafe { libc::sched_setscheduler(tid, libc::SCHED_OTHER, &param) };
        if let Ok(cpus) = &ours {
            let _ = sched_setaffinity(Pid::from_raw(tid), cpus);
        }
    }
}

/// CPU time (user + system) this process has used, and that of its
/// children it has reaped: the daemon's own work, and the CRIU processes
/// it started and waited for (swrk folds in the helpers it reaped).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTime {
    pub own: std::time::Duration,
    pub children: std::time::Duration,
}

impl CpuTime {
    pub fn now() -> Self {
        let used = |who| {
            // SAFETY: getrusage fills the struct it is given.
            let usage = unsafe {
                let mut usage: libc::rusage = std::mem::zeroed();
                libc::getrusage(who, &mut usage);
                usage
            };
            let time = |t: libc::timeval| {
                std::time::Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000)
            };
            time(usage.ru_utime) + time(usage.ru_stime)
        };
        Self {
            own: used(libc::RUSAGE_SELF),
            children: used(libc::RUSAGE_CHILDREN),
        }
    }

    /// What was used since `earlier`, µs: (own, children).
    pub fn since(earlier: Self) -> (u64, u64) {
        let now = Self::now();
        let us =
            |a: std::time::Duration, b: std::time::Duration| a.saturating_sub(b).as_micros() as u64;
        (us(now.own, earlier.own), us(now.children, earlier.children))
    }
}

/// Whether a socket bound to `local` takes datagrams sent to `address`.
fn takes(local: std::net::SocketAddr, address: std::net::SocketAddr) -> bool {
    local.port() == address.port()
        && (local.ip() == address.ip()
            || local.ip().is_unspecified()
            || local.ip().to_canonical() == address.ip())
}

/// Whether a UDP socket in process `pid`'s network namespace is bound to
/// `address` (or to its port on the unspecified address): a service that
/// started there is ready for its inputs.
pub fn udp_bound_for(pid: u32, address: std::net::SocketAddr) -> bool {
    let Ok(process) = Process::new(pid as i32) else {
        return false;
    };
    [process.udp(), process.udp6()]
        .into_iter()
        .flatten()
        .flatten()
        .any(|entry| takes(entry.local_address, address))
}

/// The processes holding a UDP socket bound, in this network namespace,
/// to `address` (or to its port on the unspecified address).
pub fn bound_udp(address: std::net::SocketAddr) -> Vec<u32> {
    let inodes: std::collections::HashSet<u64> = [procfs::net::udp(), procfs::net::udp6()]
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| takes(entry.local_address, address))
        .map(|entry| entry.inode)
        .collect();
    if inodes.is_empty() {
        return Vec::new();
    }
    let Ok(processes) = procfs::process::all_processes() else {
        return Vec::new();
    };
    processes
        .flatten()
        .filter(|p| {
            p.fd().is_ok_and(|fds| {
                fds.flatten().any(|fd| {
                    matches!(fd.target, procfs::process::FDTarget::Socket(i) if inodes.contains(&i))
                })
            })
        })
        .map(|p| p.pid as u32)
        .collect()
}

/// SIGKILLs every process in process `pid`'s PID namespace, unless that is
/// this daemon's own (a migrated service has one of its own; a process
/// sharing the daemon's is not one to kill): the pids killed.
pub fn kill_pid_namespace(pid: u32) -> Vec<u32> {
    let namespace = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
    let Some(theirs) = namespace(&pid.to_string()) else {
        return Vec::new();
    };
    if namespace("self").as_ref() == Some(&theirs) {
        return Vec::new();
    }
    let Ok(processes) = procfs::process::all_processes() else {
        return Vec::new();
    };
    let members: Vec<u32> = processes
        .flatten()
        .filter(|p| namespace(&p.pid.to_string()).as_ref() == Some(&theirs))
        .map(|p| p.pid as u32)
        .collect();
    for &member in &members {
        let _ = nix::sys::signal::kill(
            Pid::from_raw(member as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    members
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_that_exited_does_not_run_even_before_it_is_reaped() {
        let mut child = std::process::Command::new("sleep")
            .arg("0.2")
            .spawn()
            .unwrap();
        let identity = Identity::of(child.id()).expect("it runs");
        assert!(identity.runs());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        // Unreaped, it stays a zombie with its pid and start time.
        while stat(child.id()).is_some_and(|s| s.state != 'Z') {
            assert!(std::time::Instant::now() < deadline, "sleep never exited");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!identity.runs(), "a zombie does not run");
        child.wait().unwrap();
        assert!(!identity.runs());
    }

    #[test]
    fn pin_confines_a_process_tree_and_ignores_cpus_the_host_lacks() {
        // A shell with a child: both must move.
        let mut shell = std::process::Command::new("sh")
            .args(["-c", "sleep 5 & wait"])
            .spawn()
            .expect("spawn sh");
        let root = shell.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while threads(root).len() < 2 {
            assert!(std::time::Instant::now() < deadline, "sleep never started");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let all = cpus_of(root).unwrap();
        let last = *all.last().unwrap();
        assert_eq!(pin(root, &[last, 100_000]).unwrap(), [last]);
        for tid in threads(root) {
            assert_eq!(cpus_of(tid as u32).unwrap(), [last], "thread {tid}");
        }
        // Nothing this host has: left where it is.
        assert_eq!(pin(root, &[100_000]).unwrap(), Vec::<usize>::new());
        assert_eq!(pin(root, &[]).unwrap(), Vec::<usize>::new());
        assert_eq!(cpus_of(root).unwrap(), [last]);
        let _ = shell.kill();
        let _ = shell.wait();
    }

    #[test]
    fn reads_state_start_time_and_cpu_ticks() {
        let me = std::process::id();
        assert!(running(me));
        assert!(start_time(me).is_some_and(|t| t > 0));
        assert!(cpu_ticks(me).is_some());
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = child.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while running(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "an exited child still runs"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(start_time(pid).is_some(), "a zombie has a start time");
        child.wait().unwrap();
        assert_eq!(start_time(pid), None, "a reaped child is gone");
    }

    #[test]
    fn cpu_time_counts_reaped_children() {
        let before = CpuTime::now();
        // A child that burns about 50 ms of CPU, then is reaped.
        let status = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done"])
            .status()
            .expect("run sh");
        assert!(status.success());
        let (_, children) = CpuTime::since(before);
        assert!(children > 1_000, "children used {children} µs");
    }
}
