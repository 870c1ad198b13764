//! The conditions timed runs take their figures under: real-time priority,
//! pinning to CPUs, the conntrack table's size, and the machine's CPU use.
use std::time::Duration;

/// The real-time priority (SCHED_FIFO) at which the controllers and the
/// CPS simulator run, as control tasks do on a factory host: 50 unless
/// DATAPLANE_TEST_RT says otherwise (`0` runs them as ordinary tasks, to
/// measure what the priority buys).
pub fn realtime_priority() -> u8 {
    std::env::var("DATAPLANE_TEST_RT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50)
}

/// With real-time tasks on, two CPUs or more and pinning wanted, the CPUs
/// they and the migration machinery (daemons, CRIU, the standby) are pinned
/// to: (real-time, machinery), as a control host keeps them apart. This
/// kernel is not preemptible (PREEMPT_NONE): a control task woken on a CPU
/// where CRIU runs a long stretch of kernel code waits for it, 10 ms and
/// more, however high its priority. The destination daemon gives a
/// restored instance its source's CPUs (CRIU does not restore affinity).
/// Pinning is wanted in the timing runs (the benchmarks and the demo, see
/// `tune_host_for_timing`) and where a test asks for it ([`Pinning`]);
/// DATAPLANE_TEST_PIN=1 or 0 decides for every run.
pub fn cpu_split() -> Option<(usize, usize)> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let wanted = match std::env::var("DATAPLANE_TEST_PIN").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => PINNING.load(std::sync::atomic::Ordering::SeqCst),
    };
    (realtime_priority() != 0 && cpus >= 2 && wanted).then_some((cpus - 1, 0))
}

static PINNING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Where a timing run puts the real-time tasks (see [`cpu_split`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pin {
    /// On a CPU of their own, the machinery on another: for latency.
    Apart,
    /// Anywhere: for throughput, when they need more than one CPU.
    Anywhere,
}

/// Pinning (see [`cpu_split`]) for test hosts set up while this lives.
pub struct Pinning(bool);

impl Pinning {
    pub fn on() -> Self {
        Self(PINNING.swap(true, std::sync::atomic::Ordering::SeqCst))
    }
}

impl Drop for Pinning {
    fn drop(&mut self) {
        PINNING.store(self.0, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The `taskset` and `chrt` prefix that starts a program at
/// `realtime_priority()` on the real-time CPU.
pub(crate) fn realtime() -> Vec<String> {
    let mut prefix: Vec<String> = Vec::new();
    if let Some((rt, _)) = cpu_split() {
        prefix.extend(["taskset".into(), "-c".into(), rt.to_string()]);
    }
    match realtime_priority() {
        0 => prefix,
        prio => {
            prefix.extend(["chrt".into(), "-f".into(), prio.to_string()]);
            prefix
        }
    }
}

/// Daemon configuration lines that start services (`service start`) as
/// [`realtime`] starts the test's own: on the real-time CPU, at the
/// real-time priority.
pub fn service_config() -> String {
    let cpus = match cpu_split() {
        Some((rt, _)) => format!("service_cpus = [{rt}]\n"),
        None => String::new(),
    };
    format!("{cpus}service_priority = {}\n", realtime_priority())
}

/// CRIU walks the host's whole conntrack hash table twice on every dump,
/// even with the service's network namespace an external, with softirqs
/// off on its CPU: at the kernel's default of 262,144 buckets each walk
/// stalls packet processing for about 10 ms. A real-time host sizes the
/// table to its needs; the benchmarks and the demo do so for their run
/// (`CONNTRACK_BUCKETS`) and put the old size back on drop.
pub struct ConntrackBuckets {
    old: Option<String>,
}

/// The conntrack table size the benchmarks and the demo run with.
pub const CONNTRACK_BUCKETS: u32 = 4096;
const BUCKETS_SYSCTL: &str = "/proc/sys/net/netfilter/nf_conntrack_buckets";

impl ConntrackBuckets {
    /// Shrinks the table to `CONNTRACK_BUCKETS` if it is larger (a host
    /// without conntrack has nothing to shrink).
    pub fn shrink() -> Self {
        let old = std::fs::read_to_string(BUCKETS_SYSCTL)
            .ok()
            .filter(|v| v.trim().parse::<u32>().is_ok_and(|n| n > CONNTRACK_BUCKETS));
        if old.is_some() && std::fs::write(BUCKETS_SYSCTL, CONNTRACK_BUCKETS.to_string()).is_err() {
            return Self { old: None };
        }
        Self { old }
    }

    /// "262144 -> 4096" or "4096" (what the run had).
    pub fn describe(&self) -> String {
        let now = std::fs::read_to_string(BUCKETS_SYSCTL).unwrap_or_else(|_| "none".into());
        match &self.old {
            Some(old) => format!("{} -> {}", old.trim(), now.trim()),
            None => now.trim().to_string(),
        }
    }
}

/// Prepares this host for a timed run (pinning, `ConntrackBuckets::shrink`)
/// and prints the conditions the figures were taken under.
pub fn tune_host_for_timing(pin: Pin) -> ConntrackBuckets {
    // For the whole run: the hosts of a timing run keep the real-time tasks
    // and the machinery apart, unless they need every CPU.
    PINNING.store(pin == Pin::Apart, std::sync::atomic::Ordering::SeqCst);
    let buckets = ConntrackBuckets::shrink();
    let priority = match realtime_priority() {
        0 => "ordinary tasks".to_string(),
        p => format!("SCHED_FIFO priority {p}"),
    };
    let cpus = match cpu_split() {
        Some((realtime, machinery)) => {
            format!(" on CPU {realtime}, daemons, CRIU and standbys on CPU {machinery}")
        }
        None => String::new(),
    };
    println!(
        "host: controllers and CPS at {priority}{cpus}; conntrack buckets {}",
        buckets.describe()
    );
    buckets
}

impl Drop for ConntrackBuckets {
    fn drop(&mut self) {
        if let Some(old) = &self.old {
            let _ = std::fs::write(BUCKETS_SYSCTL, old.trim());
        }
    }
}

/// The whole machine's CPU at a moment: the time and how long every CPU
/// has been idle.
pub struct MachineCpu {
    at: std::time::Instant,
    idle_ticks: u64,
}

impl MachineCpu {
    pub fn now() -> Self {
        Self {
            at: std::time::Instant::now(),
            idle_ticks: idle_ticks(),
        }
    }

    /// The CPU time all CPUs were busy since, summed: wall time times the
    /// CPUs, less their idle time. /proc/stat's idle time is exact on this
    /// tickless kernel (kept in ns while a CPU sleeps); its busy fields are
    /// sampled at the 100 Hz tick and miss work done in stretches shorter
    /// than one, as a control cycle's is (a 16 x 2500/s load read 2 % busy).
    pub fn busy_since(&self) -> Duration {
        let idle = Duration::from_millis(
            (idle_ticks() - self.idle_ticks) * 1000 / clock_ticks_per_second(),
        );
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        (self.at.elapsed() * cpus).saturating_sub(idle)
    }

    /// `busy_since` in % of all CPUs.
    pub fn busy_percent(&self) -> f64 {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        self.busy_since().as_secs_f64() / self.at.elapsed().as_secs_f64() / cpus * 100.0
    }
}

/// The clock ticks (USER_HZ) /proc counts CPU time in, per second.
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as u64 }
}

/// Idle and iowait time of all CPUs so far, in clock ticks.
fn idle_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").expect("read /proc/stat");
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .expect("cpu line")
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().expect("a number"))
        .collect();
    // user nice system idle iowait ...
    fields[3] + fields[4]
}
