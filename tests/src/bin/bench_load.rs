//! `cargo xtask bench load [--flows N] [--others controllers|none] [RATE...]`:
//! the input rate the dataplane sustains across 16 flows (N) while one of
//! their services migrates.
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
//!
//! Each step's baseline is the same hosts, controllers and CPS with no
//! dataplane at all (no kernel programs, no daemons): what this machine
//! carries at that rate without us, run just before the step. The machine's
//! busy CPU is printed for both.
//!
//! A second series measures the kernel side alone: the migrated controller
//! (with its standby) and 15 flows with no service, whose inputs a socket
//! drops unread once the dataplane has numbered and logged them, at the
//! same rates. With no services to wake, the machine has the CPU to show whether
//! the kernel programs number and log every input of 16 flows at 10 kHz
//! during a migration: per flow that stays on src, its last sequence number
//! must equal the inputs the CPS sent ("unnumbered" counts the difference,
//! inputs the log refused included).
use std::{
    net::UdpSocket,
    time::{Duration, Instant},
};

use dataplane_tests::{
    CPS_V4, ChainService, EXTRA_SERVICE_V4, Flow, MachineCpu, MigrationSetup, NetNs, SERVICE_V4,
    TestHosts, cps_verdicts, kill_pid, sock,
};

const FLOWS: u64 = 16;
const RATES: [u64; 4] = [1000, 2500, 5000, 10_000];
/// Traffic runs this long before the baseline window: start-up is over.
const WARMUP: Duration = Duration::from_millis(500);
/// The baseline window: every flow running, no migration. CPU time comes
/// in 10 ms ticks: 2 s make a tick 0.5 % of a core.
const STEADY: Duration = Duration::from_secs(2);
/// How long the CPS sends: well past the end of a migration that starts
/// after WARMUP + STEADY (about 0.3 s unloaded, 5 s and more before the
/// convergence on a saturated machine), so the cutover and the path switch
/// happen under load.
const RUN: Duration = Duration::from_secs(15);
/// The CPS's sender threads, a field device each: one thread cannot send
/// 16 inputs every 100 µs here, with the receiving hosts' kernel path run
/// in its sends (veth delivers inline).
const SENDERS: usize = 2;
/// The daemons' SCHED_FIFO priority: below the controllers' and the CPS's
/// (`realtime_priority()`, 50), above every ordinary task.
const DAEMON_PRIORITY: u8 = 20;
/// The kernel's log failures: each is an input or output without its place
/// in the sequence (ring overflows, refused or failed mirror frames).
const LOG_FAILURES: [&str; 3] = ["ring_full", "output_ring_full", "mirror_errors"];

/// What the CPS saw over one run.
struct Traffic {
    /// Inputs per second the CPS got out, over all flows.
    achieved: f64,
    missed: u64,
    duplicates: u64,
    /// Wrong or out-of-order outputs.
    wrong: u64,
    /// The largest p99 of input-to-output latency over the flows, µs.
    latency_p99: u64,
}

impl Traffic {
    fn from(verdicts: &[serde_json::Value]) -> Self {
        let sum = |key: &str| verdicts.iter().map(|v| v[key].as_u64().unwrap_or(0)).sum();
        let send_s = verdicts[0]["send_us"].as_u64().unwrap_or(1) as f64 / 1e6;
        Self {
            achieved: sum("sent") as f64 / send_s,
            missed: sum("missed"),
            duplicates: sum("duplicates"),
            wrong: sum("wrong") + sum("out_of_order"),
            latency_p99: verdicts
                .iter()
                .filter_map(|v| v["latency_us"]["p99"].as_u64())
                .max()
                .unwrap_or(0),
        }
    }

    /// The flows with a controller judged, the rate over all of them.
    fn judge(verdicts: &[serde_json::Value], others: Others) -> Self {
        let controlled = match others {
            Others::Controllers => verdicts,
            Others::Unserved => &verdicts[..1],
        };
        Self {
            achieved: Self::from(verdicts).achieved,
            ..Self::from(controlled)
        }
    }

    fn lossless(&self) -> bool {
        self.missed + self.duplicates + self.wrong == 0
    }
}

/// The baseline of a step: no dataplane.
struct Bare {
    traffic: Traffic,
    /// Receive-buffer drops on src and cps.
    socket_drops: u64,
    /// The machine's busy CPU over a window as long as the step's baseline
    /// window, at the same time into the run, in % of all CPUs.
    machine_busy: f64,
}

/// What serves the flows besides the migrated one.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Others {
    /// A Markov controller each, as the migrated one.
    Controllers,
    /// No service: a socket that drops every input unread.
    Unserved,
}

impl Others {
    fn name(self) -> &'static str {
        match self {
            Others::Controllers => "controllers",
            Others::Unserved => "none",
        }
    }
}

struct Step {
    others: Others,
    flows: u64,
    /// Inputs per second on each flow.
    rate: u64,
    /// What the CPS saw on the flows with a controller.
    traffic: Traffic,
    /// The same hosts and services without the dataplane.
    bare: Bare,
    /// Inputs the CPS sent on the flows that stay on src and the source's
    /// kernel gave no sequence number: sent - last_seq, summed. Inputs the
    /// full log refused are among them (the kernel numbers logged inputs).
    unnumbered: u64,
    /// LOG_FAILURES summed over both hosts.
    log_failures: u64,
    /// The non-zero ones, by host.
    log_detail: Vec<String>,
    /// Datagrams dropped for a full socket receive buffer on the three
    /// hosts (controllers, CPS): an input lost there makes every later
    /// output of its controller wrong. On src, dst and cps.
    socket_drops: [u64; 3],
    /// T_M in µs, or why the migration failed.
    migration: Result<u64, String>,
    /// % of one core for src and dst: with no migration, during it.
    cpu: [(f64, f64); 2],
    /// The machine's busy CPU, % of all CPUs: with no migration, during it.
    machine_busy: (f64, f64),
    /// VmRSS and VmHWM in KiB for src and dst, after the migration.
    memory: [(u64, u64); 2],
}

impl Step {
    fn clean(&self) -> bool {
        self.traffic.lossless()
            && self.unnumbered + self.log_failures == 0
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
    let mut series = vec![Others::Controllers, Others::Unserved];
    if let Some(i) = args.iter().position(|a| a == "--others") {
        anyhow::ensure!(i + 1 < args.len(), "--others needs controllers or none");
        let name = args.remove(i + 1);
        args.remove(i);
        series.retain(|o| o.name() == name);
        anyhow::ensure!(
            !series.is_empty(),
            "--others: controllers or none, not {name}"
        );
    }
    let mut rates = args
        .iter()
        .map(|a| a.parse())
        .collect::<Result<Vec<u64>, _>>()?;
    if rates.is_empty() {
        rates = RATES.to_vec();
    }
    println!(
        "{flows} flows on src; per step one Markov controller migrates (standby mode) \
         {:.1} s into a {:.0} s CPS run",
        (WARMUP + STEADY).as_secs_f64(),
        RUN.as_secs_f64()
    );
    // Sixteen real-time controllers and the CPS need both CPUs: pinned to
    // one, they sustained less than half the rate.
    let _tuning = dataplane_tests::tune_host_for_timing(dataplane_tests::Pin::Anywhere);
    let mut steps = Vec::new();
    for others in series {
        for (i, &rate) in rates.iter().enumerate() {
            let bare = bare(i, flows, rate, others);
            let step = step(i, flows, rate, others, bare)?;
            if let Err(e) = &step.migration {
                println!("  {rate}/s per flow: migration failed: {e}");
            }
            steps.push(step);
        }
    }
    report(&steps);
    Ok(())
}

fn report(steps: &[Step]) {
    for (others, title) in [
        (Others::Controllers, "a Markov controller on every flow"),
        (
            Others::Unserved,
            "the kernel side: the migrated controller, and no service on the other flows \
             (missed, dup, wrong and latency: the controller's flow)",
        ),
    ] {
        println!("\n {title}");
        println!(
            " rate/flow  offered/s  achieved/s  missed    dup  wrong  unnumbered  log gaps  sock drops  latency p99 µs  migration  T_M ms"
        );
        for s in steps.iter().filter(|s| s.others == others) {
            let (outcome, t_m) = match &s.migration {
                Ok(us) => ("done", format!("{:.1}", *us as f64 / 1000.0)),
                Err(_) => ("failed", "-".into()),
            };
            let t = &s.traffic;
            println!(
                "{:>10} {:>10} {:>11.0} {:>7} {:>6} {:>6} {:>11} {:>9} {:>11} {:>15}  {outcome:>9} {t_m:>7}",
                s.rate,
                s.rate * s.flows,
                t.achieved,
                t.missed,
                t.duplicates,
                t.wrong,
                s.unnumbered,
                s.log_failures,
                s.socket_drops.iter().sum::<u64>(),
                t.latency_p99
            );
        }
    }
    println!(
        "\n without the dataplane (same hosts, services and CPS; no kernel programs, no daemons)"
    );
    println!(
        " others       rate/flow  achieved/s  missed    dup  wrong  sock drops  latency p99 µs  ours/bare p99"
    );
    for s in steps {
        let b = &s.bare.traffic;
        println!(
            " {:<11} {:>10} {:>11.0} {:>7} {:>6} {:>6} {:>11} {:>15} {:>14.2}",
            s.others.name(),
            s.rate,
            b.achieved,
            b.missed,
            b.duplicates,
            b.wrong,
            s.bare.socket_drops,
            b.latency_p99,
            s.traffic.latency_p99 as f64 / b.latency_p99.max(1) as f64
        );
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "\n                  daemon CPU, % of one core                       memory, MiB (VmRSS/VmHWM)    machine busy, % of all CPUs"
    );
    println!(
        " others       rate/flow  src steady  src migrating  ratio  dst migrating     src          dst      bare  steady  migrating"
    );
    for s in steps {
        let [(steady, migrating), (_, dst)] = s.cpu;
        let [(src_rss, src_hwm), (dst_rss, dst_hwm)] = s.memory;
        println!(
            " {:<11} {:>10} {steady:>11.1} {migrating:>14.1} {:>6.2} {dst:>14.1} {:>7.1}/{:<6.1} {:>5.1}/{:<6.1} {:>5.0} {:>7.0} {:>10.0}",
            s.others.name(),
            s.rate,
            migrating / steady.max(0.1),
            mib(src_rss),
            mib(src_hwm),
            mib(dst_rss),
            mib(dst_hwm),
            s.bare.machine_busy,
            s.machine_busy.0,
            s.machine_busy.1
        );
    }
    for (others, what) in [
        (Others::Controllers, "with a controller on every flow"),
        (
            Others::Unserved,
            "on the kernel side (no service on 15 flows)",
        ),
    ] {
        let ours = steps.iter().filter(|s| s.others == others);
        match ours.clone().filter(|s| s.clean()).max_by_key(|s| s.rate) {
            Some(s) => println!(
                "sustained {what}: {} x {}/s = {} inputs/s offered, {:.0} achieved, with no \
                 missed, duplicate or wrong output, every input numbered and logged, the migration done",
                s.flows,
                s.rate,
                s.rate * s.flows,
                s.traffic.achieved
            ),
            None => println!("sustained {what}: no step ran clean"),
        }
        for s in ours.filter(|s| !s.clean()) {
            println!(
                "  not at {} x {}/s: achieved {:.0}/s, missed {}, duplicates {}, wrong {}, \
                 unnumbered {}, log gaps {} {:?}, socket drops src/dst/cps {:?}, migration {}",
                s.flows,
                s.rate,
                s.traffic.achieved,
                s.traffic.missed,
                s.traffic.duplicates,
                s.traffic.wrong,
                s.unnumbered,
                s.log_failures,
                s.log_detail,
                s.socket_drops,
                s.migration.as_ref().err().map_or("done", String::as_str)
            );
        }
    }
    let controlled = steps.iter().filter(|s| s.others == Others::Controllers);
    match controlled
        .filter(|s| s.bare.traffic.lossless())
        .max_by_key(|s| s.rate)
    {
        Some(s) => println!(
            "without the dataplane this machine carried {} x {}/s = {} inputs/s with a \
             controller on every flow and no missed, duplicate or wrong output",
            s.flows,
            s.rate,
            s.rate * s.flows
        ),
        None => println!("without the dataplane no step with a controller on every flow ran clean"),
    }
}

/// The step's baseline: the same services on plain test hosts, driven by
/// the CPS at `rate` per flow for as long as a step's run.
fn bare(i: usize, flows: u64, rate: u64, others: Others) -> Bare {
    let hosts = TestHosts::new(&format!("bb{i}"));
    let flows: Vec<Flow> = (0..flows as u16)
        .map(|k| (sock(CPS_V4, 4000 + k), sock(SERVICE_V4, 5000 + k)))
        .collect();
    let mut controllers = Vec::new();
    let mut dropping = Vec::new();
    for (k, (_, service)) in flows.iter().enumerate() {
        if k == 0 || others == Others::Controllers {
            let args = [service.to_string()];
            controllers.push(ChainService::spawn(
                &hosts.src,
                "markov-controller",
                &[&args[0]],
                *service,
            ));
        } else {
            dropping.push(dropping_socket(&hosts.src, *service));
        }
    }
    resolve_neighbours(&hosts, &flows);
    let cps = start_cps(&hosts, &flows, rate);
    std::thread::sleep(WARMUP);
    let machine = MachineCpu::now();
    std::thread::sleep(STEADY);
    let machine_busy = machine.busy_percent();
    let verdicts = cps_verdicts(cps);
    let traffic = Traffic::judge(&verdicts, others);
    Bare {
        traffic,
        socket_drops: [&hosts.src, &hosts.cps].map(udp_receive_drops).iter().sum(),
        machine_busy,
    }
}

fn step(i: usize, flows: u64, rate: u64, others: Others, bare: Bare) -> anyhow::Result<Step> {
    // The daemons must not starve beside seventeen busy real-time tasks.
    let daemon = format!("realtime_priority = {DAEMON_PRIORITY}\n");
    let tag = match others {
        Others::Controllers => format!("bl{i}"),
        Others::Unserved => format!("bk{i}"),
    };
    let setup = MigrationSetup::with_configs(&tag, &[], true, &daemon, &daemon);
    let n = flows.saturating_sub(1) as u16;
    let (_controllers, _dropping, staying) = match others {
        Others::Controllers => {
            let extra = setup.add_services(n);
            let staying = extra.iter().map(|e| e.1).collect();
            (extra, Vec::new(), staying)
        }
        Others::Unserved => {
            let (sockets, flows) = unserved_flows(&setup, n);
            (Vec::new(), sockets, flows)
        }
    };
    let all: Vec<Flow> = std::iter::once(setup.flow())
        .chain(staying.iter().copied())
        .collect();
    resolve_neighbours(&setup.hosts, &all);
    let cps = start_cps(&setup.hosts, &all, rate);
    let cps_end = Instant::now() + RUN;
    std::thread::sleep(WARMUP);
    let daemons = [setup.src.pid(), setup.dst.pid()];
    let (before, machine) = (daemons.map(Cpu::now), MachineCpu::now());
    std::thread::sleep(STEADY);
    let (steady, machine_steady) = (before.map(|c| c.percent()), machine.busy_percent());
    let (before, machine) = (daemons.map(Cpu::now), MachineCpu::now());
    let id = setup.migrate(serde_json::json!({"mode": "standby"}));
    // CPU during the migration while the CPS runs: a migration that
    // outlasts the run (one failing at its deadline) idles at the end.
    let (report, migrating, machine_migrating) = std::thread::scope(|scope| {
        let waiting = scope.spawn(|| setup.wait(&id));
        while !waiting.is_finished() && Instant::now() < cps_end {
            std::thread::sleep(Duration::from_millis(10));
        }
        let (migrating, machine) = (before.map(|c| c.percent()), machine.busy_percent());
        (waiting.join().expect("the migration"), migrating, machine)
    });
    if std::env::var("BENCH_VERBOSE").is_ok() {
        println!(
            "  {}/s per flow, others {}: report {report}",
            rate,
            others.name()
        );
    }
    let memory = daemons.map(memory_kib);
    let verdicts = cps_verdicts(cps);
    kill_pid(report["destination_pid"].as_u64().unwrap_or(0));
    let mut log_detail = Vec::new();
    let mut log_failures = 0;
    let mut unnumbered = 0;
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
        if host == "src" {
            // The migrated flow's later inputs go to dst: the CPS's verdict
            // judges that one.
            for (flow, verdict) in staying.iter().zip(&verdicts[1..]) {
                let service = flow.1.to_string();
                let numbered = status["flows"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|f| f["service"].as_str() == Some(service.as_str()))
                    .and_then(|f| f["last_seq"].as_u64())
                    .unwrap_or(0);
                unnumbered += verdict["sent"]
                    .as_u64()
                    .unwrap_or(0)
                    .saturating_sub(numbered);
            }
        }
    }
    Ok(Step {
        others,
        flows,
        rate,
        traffic: Traffic::judge(&verdicts, others),
        bare,
        unnumbered,
        log_failures,
        log_detail,
        socket_drops: [&setup.hosts.src, &setup.hosts.dst, &setup.hosts.cps].map(udp_receive_drops),
        migration: match report["state"].as_str() {
            Some("done") => Ok(report["total_us"].as_u64().unwrap_or(0)),
            _ => Err(report["error"].to_string()),
        },
        cpu: [0, 1].map(|h| (steady[h], migrating[h])),
        machine_busy: (machine_steady, machine_migrating),
        memory,
    })
}

/// Has the CPS resolve the addresses of `flows`' services before it starts:
/// inputs sent while ARP resolves wait in the neighbour's queue and go out
/// behind later ones, sent from the other sender's CPU.
fn resolve_neighbours(hosts: &TestHosts, flows: &[Flow]) {
    let probe = hosts
        .cps
        .run(|| UdpSocket::bind(sock(CPS_V4, 0)))
        .expect("bind a probe");
    let mut addresses: Vec<_> = flows.iter().map(|f| f.1).collect();
    addresses.dedup_by_key(|a| a.ip());
    for service in addresses {
        // "?" asks a controller for its state without a step.
        probe.send_to(b"?", service).expect("send a probe");
        let ip = service.ip().to_string();
        let deadline = Instant::now() + Duration::from_secs(2);
        while !hosts
            .cps
            .exec("ip", &["neigh", "show", &ip])
            .contains("lladdr")
        {
            assert!(Instant::now() < deadline, "the CPS cannot resolve {ip}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The CPS simulator driving `flows` at `rate` inputs/s each for RUN, with
/// SENDERS sender threads.
fn start_cps(hosts: &TestHosts, flows: &[Flow], rate: u64) -> std::process::Child {
    let period_us = 1_000_000 / rate;
    hosts
        .cps_command(flows, RUN.as_micros() as u64 / period_us, period_us)
        .args(["--senders", &SENDERS.to_string()])
        .spawn()
        .expect("start the CPS simulator")
}

/// `n` flows on src with no service behind them, on [`EXTRA_SERVICE_V4`]
/// ports 5001..: the dataplane numbers and logs their inputs, then the
/// host's stack drops them ([`dropping_socket`]).
fn unserved_flows(setup: &MigrationSetup, n: u16) -> (Vec<UdpSocket>, Vec<Flow>) {
    let address = format!("{EXTRA_SERVICE_V4}/24");
    setup
        .hosts
        .src
        .ip(&["addr", "add", &address, "dev", "eth0"]);
    (1..=n)
        .map(|i| {
            let flow = (
                sock(CPS_V4, 4000 + i),
                sock(EXTRA_SERVICE_V4, setup.service.port() + i),
            );
            setup.src.add_flow(flow);
            (dropping_socket(&setup.hosts.src, flow.1), flow)
        })
        .unzip()
}

/// A socket bound to `addr` in `host` whose filter drops every datagram
/// before it is queued: the port is served (no ICMP port unreachable,
/// which would fail the CPS's next send on that flow) and nothing wakes.
fn dropping_socket(host: &NetNs, addr: std::net::SocketAddr) -> UdpSocket {
    let socket = host.run(|| UdpSocket::bind(addr)).expect("bind");
    // Classic BPF "ret #0": keep no byte of the packet.
    let mut drop_all = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let program = libc::sock_fprog {
        len: 1,
        filter: drop_all.as_mut_ptr(),
    };
    // SAFETY: a valid socket and a filter program that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&program as *const libc::sock_fprog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "SO_ATTACH_FILTER: {}",
        std::io::Error::last_os_error()
    );
    socket
}

/// A process's CPU time (utime + stime, all its threads) at a moment.
struct Cpu {
    pid: u32,
    ticks: u64,
    at: Instant,
}

impl Cpu {
    fn now(pid: u32) -> Self {
        Self {
            pid,
            ticks: dataplane_user::host::tasks::cpu_ticks(pid).unwrap_or(0),
            at: Instant::now(),
        }
    }

    /// The CPU it used since, in % of one core.
    fn percent(self) -> f64 {
        let now = Self::now(self.pid);
        (now.ticks - self.ticks) as f64
            / dataplane_tests::clock_ticks_per_second() as f64
            / (now.at - self.at).as_secs_f64()
            * 100.0
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
