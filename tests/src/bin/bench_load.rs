//! `cargo xtask bench load [--flows N] [RATE...]`: the input rate the
//! dataplane sustains across 16 flows (N) while one of their services migrates.
//!
//! Each step gets fresh test hosts with 16 Markov controllers on `src`, one
//! service and one flow each (the migrated one with its standby), and one CPS
//! simulator sending RATE inputs/s (default 1000 2500 5000 10000) on every
//! flow. After a warm-up the daemons' CPU is measured for a while with no
//! migration (the step's own baseline, at the same rate, on this shared
//! machine), then one service migrates in standby mode while all flows run.
//! Per step it prints the offered and achieved total rate, what the CPS saw
//! on all flows (missed, duplicate, wrong outputs), the inputs and outputs
//! the kernel logs failed (`ring_full`, `output_ring_full`, `mirror_errors`
//! on both hosts), the migration's outcome and T_M, and each daemon's CPU
//! (utime + stime, % of one core) and memory (VmRSS, VmHWM). The sustained
//! rate is the highest step with nothing lost and the migration done; the
//! bench reports, it does not assert.
use std::time::{Duration, Instant};

use dataplane_tests::{Flow, MigrationSetup, NetNs, cps_verdicts, kill_pid};

const FLOWS: u64 = 16;
const RATES: [u64; 4] = [1000, 2500, 5000, 10_000];
/// Traffic runs this long before the baseline window: start-up is over.
const WARMUP: Duration = Duration::from_millis(500);
/// The baseline window: every flow running, no migration. CPU time comes
/// in 10 ms ticks: 2 s make a tick 0.5 % of a core.
const STEADY: Duration = Duration::from_secs(2);
/// How long the CPS sends: well past the end of a migration that starts
/// after WARMUP + STEADY (about 0.3 s unloaded), so the cutover and the
/// path switch happen under load.
const RUN: Duration = Duration::from_secs(7);
/// The kernel's log failures: each is an input or output without its place
/// in the sequence (ring overflows, refused or failed mirror frames).
const LOG_FAILURES: [&str; 3] = ["ring_full", "output_ring_full", "mirror_errors"];

struct Step {
    flows: u64,
    /// Inputs per second on each flow.
    rate: u64,
    /// Inputs per second the CPS got out, over all flows.
    achieved: f64,
    missed: u64,
    duplicates: u64,
    /// Wrong or out-of-order outputs.
    wrong: u64,
    /// LOG_FAILURES summed over both hosts.
    log_failures: u64,
    /// The non-zero ones, by host.
    log_detail: Vec<String>,
    /// Datagrams dropped for a full socket receive buffer on the three
    /// hosts (controllers, CPS): an input lost there makes every later
    /// output of its controller wrong. On src, dst and cps.
    socket_drops: [u64; 3],
    /// The largest p99 of input-to-output latency over the flows, µs.
    latency_p99: u64,
    /// T_M in µs, or why the migration failed.
    migration: Result<u64, String>,
    /// % of one core for src and dst: with no migration, during it.
    cpu: [(f64, f64); 2],
    /// VmRSS and VmHWM in KiB for src and dst, after the migration.
    memory: [(u64, u64); 2],
}

impl Step {
    fn clean(&self) -> bool {
        self.missed + self.duplicates + self.wrong + self.log_failures == 0
            && self.migration.is_ok()
    }
}

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut flows = FLOWS;
    if let Some(i) = args.iter().position(|a| a == "--flows") {
        anyhow::ensure!(i + 1 < args.len(), "--flows needs a number");
        flows = args.remove(i + 1).parse()?;
        args.remove(i);
    }
    let mut rates = args
        .iter()
        .map(|a| a.parse())
        .collect::<Result<Vec<u64>, _>>()?;
    if rates.is_empty() {
        rates = RATES.to_vec();
    }
    println!(
        "{flows} flows, one Markov controller each on src; per step one migrates (standby \
         mode) {:.1} s into a {:.0} s CPS run",
        (WARMUP + STEADY).as_secs_f64(),
        RUN.as_secs_f64()
    );
    // Sixteen real-time controllers and the CPS need both CPUs: pinned to
    // one, they sustained less than half the rate.
    let _tuning = dataplane_tests::tune_host_for_timing(dataplane_tests::Pin::Anywhere);
    let mut steps = Vec::new();
    for (i, &rate) in rates.iter().enumerate() {
        let step = step(i, flows, rate)?;
        if let Err(e) = &step.migration {
            println!("  {rate}/s per flow: migration failed: {e}");
        }
        steps.push(step);
    }
    report(&steps);
    Ok(())
}

fn report(steps: &[Step]) {
    println!(
        "\n rate/flow  offered/s  achieved/s  missed    dup  wrong  log gaps  sock drops  latency p99 µs  migration  T_M ms"
    );
    for s in steps {
        let (outcome, t_m) = match &s.migration {
            Ok(us) => ("done", format!("{:.1}", *us as f64 / 1000.0)),
            Err(_) => ("failed", "-".into()),
        };
        println!(
            "{:>10} {:>10} {:>11.0} {:>7} {:>6} {:>6} {:>9} {:>11} {:>15}  {outcome:>9} {t_m:>7}",
            s.rate,
            s.rate * s.flows,
            s.achieved,
            s.missed,
            s.duplicates,
            s.wrong,
            s.log_failures,
            s.socket_drops.iter().sum::<u64>(),
            s.latency_p99
        );
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "\n           daemon CPU, % of one core                       memory, MiB (VmRSS/VmHWM)"
    );
    println!(" rate/flow  src steady  src migrating  ratio  dst migrating     src          dst");
    for s in steps {
        let [(steady, migrating), (_, dst)] = s.cpu;
        let [(src_rss, src_hwm), (dst_rss, dst_hwm)] = s.memory;
        println!(
            "{:>10} {steady:>11.1} {migrating:>14.1} {:>6.2} {dst:>14.1} {:>7.1}/{:<6.1} {:>5.1}/{:.1}",
            s.rate,
            migrating / steady.max(0.1),
            mib(src_rss),
            mib(src_hwm),
            mib(dst_rss),
            mib(dst_hwm)
        );
    }
    if let Some(first) = steps.first() {
        let base = first.cpu[0].0.max(0.1) / first.rate as f64;
        let scaling: Vec<String> = steps
            .iter()
            .map(|s| format!("{:.2}", s.cpu[0].0 / s.rate as f64 / base))
            .collect();
        println!(
            "src steady CPU per input, against the {}/s step: {}",
            first.rate,
            scaling.join(" ")
        );
    }
    match steps.iter().filter(|s| s.clean()).max_by_key(|s| s.rate) {
        Some(s) => println!(
            "sustained: {} x {}/s = {} inputs/s offered, {:.0} achieved, with no missed, \
             duplicate or wrong output, no log gap, the migration done",
            s.flows,
            s.rate,
            s.rate * s.flows,
            s.achieved
        ),
        None => println!("sustained: no step ran clean"),
    }
    for s in steps.iter().filter(|s| !s.clean()) {
        println!(
            "not sustained at {} x {}/s: achieved {:.0}/s, missed {}, duplicates {}, \
             wrong {}, log gaps {} {:?}, socket drops src/dst/cps {:?}, migration {}",
            s.flows,
            s.rate,
            s.achieved,
            s.missed,
            s.duplicates,
            s.wrong,
            s.log_failures,
            s.log_detail,
            s.socket_drops,
            s.migration.as_ref().err().map_or("done", String::as_str)
        );
    }
}

fn step(i: usize, flows: u64, rate: u64) -> anyhow::Result<Step> {
    let setup = MigrationSetup::new(&format!("bl{i}"), &[], true);
    let extra = setup.add_services(flows.saturating_sub(1) as u16);
    let all: Vec<Flow> = std::iter::once(setup.flow())
        .chain(extra.iter().map(|e| e.1))
        .collect();
    let period_us = 1_000_000 / rate;
    let cps = setup.start_cps_flows(&all, RUN.as_micros() as u64 / period_us, period_us);
    std::thread::sleep(WARMUP);
    let daemons = [setup.src.pid(), setup.dst.pid()];
    let before = daemons.map(Cpu::now);
    std::thread::sleep(STEADY);
    let steady = before.map(|c| c.percent());
    let before = daemons.map(Cpu::now);
    let id = setup.migrate(serde_json::json!({"mode": "standby"}));
    let report = setup.wait(&id);
    let migrating = before.map(|c| c.percent());
    let memory = daemons.map(memory_kib);
    let verdicts = cps_verdicts(cps);
    kill_pid(report["destination_pid"].as_u64().unwrap_or(0));
    let sum = |key: &str| verdicts.iter().map(|v| v[key].as_u64().unwrap_or(0)).sum();
    let send_s = verdicts[0]["send_us"].as_u64().unwrap_or(1) as f64 / 1e6;
    let mut log_detail = Vec::new();
    let mut log_failures = 0;
    for (host, daemon) in [("src", &setup.src), ("dst", &setup.dst)] {
        let status = daemon
            .client()
            .call("status", serde_json::Value::Null)
            .map_err(|e| anyhow::anyhow!("status: {e}"))?;
        for name in LOG_FAILURES {
            let n = status["counters"][name].as_u64().unwrap_or(0);
            if n > 0 {
                log_detail.push(format!("{host} {name} {n}"));
            }
            log_failures += n;
        }
    }
    Ok(Step {
        flows,
        rate,
        achieved: sum("sent") as f64 / send_s,
        missed: sum("missed"),
        duplicates: sum("duplicates"),
        wrong: sum("wrong") + sum("out_of_order"),
        log_failures,
        log_detail,
        socket_drops: [&setup.hosts.src, &setup.hosts.dst, &setup.hosts.cps].map(udp_receive_drops),
        latency_p99: verdicts
            .iter()
            .filter_map(|v| v["latency_us"]["p99"].as_u64())
            .max()
            .unwrap_or(0),
        migration: match report["state"].as_str() {
            Some("done") => Ok(report["total_us"].as_u64().unwrap_or(0)),
            _ => Err(report["error"].to_string()),
        },
        cpu: [0, 1].map(|h| (steady[h], migrating[h])),
        memory,
    })
}

/// A process's CPU time (utime + stime, all its threads) at a moment.
struct Cpu {
    pid: u32,
    ticks: u64,
    at: Instant,
}

impl Cpu {
    fn now(pid: u32) -> Self {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields from the third on follow the command name, which may hold
        // spaces: utime and stime are fields 14 and 15 of proc(5).
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
        Self {
            pid,
            ticks: field(14).unwrap_or(0) + field(15).unwrap_or(0),
            at: Instant::now(),
        }
    }

    /// The CPU it used since, in % of one core.
    fn percent(self) -> f64 {
        let now = Self::now(self.pid);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        (now.ticks - self.ticks) as f64 / hz / (now.at - self.at).as_secs_f64() * 100.0
    }
}

/// UDP datagrams the sockets of `host` dropped for a full receive buffer.
fn udp_receive_drops(host: &NetNs) -> u64 {
    // /proc/net follows the reader's network namespace.
    let snmp = host.exec("cat", &["/proc/net/snmp"]);
    // A line of names, then a line of values.
    let udp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Udp:")).collect();
    let [names, values] = udp[..] else { return 0 };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// VmRSS and VmHWM of `pid`, KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}
