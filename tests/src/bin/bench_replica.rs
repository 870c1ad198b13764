//! `cargo xtask bench replica [SECONDS]` (default 3): what a hot replica
//! costs while it is kept in sync.
//!
//! At 1 kHz and 10 kHz, on fresh test hosts with the Markov controller on
//! `src` and the CPS sending at that rate: both daemons' CPU (utime +
//! stime, % of one core) and memory (VmRSS) over SECONDS with no replica
//! (the baseline, same hosts, same rate, just before), then over SECONDS
//! with a replica of the controller on `dst` in sync (`replica.start`),
//! while its lag is sampled every 100 ms. Prints both, their ratio, the
//! replica instance's own CPU on `dst`, the lag (p50, max, in inputs) and
//! what the CPS saw (missed, duplicate, wrong: the service's outputs go on
//! exactly once throughout). It reports; it does not assert.
use std::time::{Duration, Instant};

use dataplane_tests::{MigrationSetup, Sample, cps_verdict};
use serde_json::json;

const RATES: [u64; 2] = [1000, 10_000];
/// Traffic runs this long before the baseline: start-up is over.
const WARMUP: Duration = Duration::from_millis(500);

fn main() -> anyhow::Result<()> {
    let seconds: u64 = std::env::args().nth(1).map_or(Ok(3), |a| a.parse())?;
    let window = Duration::from_secs(seconds);
    let _tuning = dataplane_tests::tune_host_for_timing(dataplane_tests::Pin::Apart);
    println!("hot replica steady cost: {seconds} s windows, without then with a replica in sync\n");
    println!(
        "{:>7} {:>21} {:>21} {:>21} {:>21} {:>10} {:>13} {:>18}",
        "rate/s",
        "src daemon CPU %",
        "dst daemon CPU %",
        "src daemon RSS MiB",
        "dst daemon RSS MiB",
        "replica %",
        "lag p50/max",
        "missed/dup/wrong"
    );
    for rate in RATES {
        let row = measure(rate, window)?;
        println!("{row}");
    }
    println!(
        "\nEach pair: without / with the replica (CPU: the difference in points of one core; \
         memory: the ratio). replica %: the replica instance's own \
         CPU on dst. lag: inputs numbered on src past the last one compared, sampled every \
         100 ms. The CPS's outputs over the whole run, the replica's making included."
    );
    Ok(())
}

/// One rate's figures, as a table row.
fn measure(rate: u64, window: Duration) -> anyhow::Result<String> {
    let setup = MigrationSetup::new(&format!("brep{}", rate / 1000), &[], false);
    let period_us = 1_000_000 / rate;
    // Long enough for both windows, the replica's making and a margin.
    let run = WARMUP + 2 * window + Duration::from_secs(3);
    let cycles = rate * run.as_secs();
    let cps = setup.start_cps(cycles, period_us, None);
    std::thread::sleep(WARMUP);
    let daemons = [setup.src.pid(), setup.dst.pid()];
    let without = Window::measure(&daemons, None, window, || {});
    let replica = setup.replicate(json!({}));
    let synced = setup.wait_in_sync(&replica);
    if synced["replica"]["state"] != "in_sync" {
        let verdict = cps_verdict(cps);
        anyhow::bail!("the replica did not sync: {synced}\nCPS: {verdict}");
    }
    let instance = synced["destination_pid"].as_u64().map(|p| p as u32);
    let mut lags = Vec::new();
    let mut last = Instant::now();
    let with = Window::measure(&daemons, instance, window, || {
        if last.elapsed() >= Duration::from_millis(100) {
            last = Instant::now();
            let report = setup
                .src
                .client()
                .call("migration.status", json!({"id": replica}))
                .unwrap_or_default();
            if let Some(lag) = report["replica"]["lag"].as_f64() {
                lags.push(lag);
            }
        }
    });
    let _ = setup
        .src
        .client()
        .call("replica.stop", json!({"name": "markov"}));
    let ended = setup.wait(&replica);
    let verdict = cps_verdict(cps);
    let lags = Sample::new(lags);
    let n = |key: &str| verdict[key].as_u64().unwrap_or(0);
    // CPU: the points a replica adds (a ratio to an idle daemon's 0.0 %
    // says nothing); memory: the ratio.
    let cpu = |a: f64, b: f64| format!("{a:.1} / {b:.1} ({:+.1})", b - a);
    let rss = |a: f64, b: f64| format!("{a:.1} / {b:.1} ({:.2}x)", b / a.max(0.1));
    Ok(format!(
        "{rate:>7} {:>21} {:>21} {:>21} {:>21} {:>10.1} {:>13} {:>18}{}",
        cpu(without.cpu[0], with.cpu[0]),
        cpu(without.cpu[1], with.cpu[1]),
        rss(without.rss_mib[0], with.rss_mib[0]),
        rss(without.rss_mib[1], with.rss_mib[1]),
        with.instance_cpu,
        format!(
            "{:.0}/{:.0}",
            lags.percentile(0.5).unwrap_or(f64::NAN),
            lags.max().unwrap_or(f64::NAN)
        ),
        format!("{}/{}/{}", n("missed"), n("duplicates"), n("wrong")),
        match ended["state"].as_str() {
            Some("stopped") => String::new(),
            other => format!("  (replica ended {other:?}: {})", ended["error"]),
        }
    ))
}

/// The daemons' CPU (% of one core) and memory over one window.
struct Window {
    cpu: [f64; 2],
    rss_mib: [f64; 2],
    /// The replica instance's CPU, % of one core (0 without one).
    instance_cpu: f64,
}

impl Window {
    /// Measures `daemons` (and `instance`) for `length`, calling `during`
    /// every 10 ms meanwhile.
    fn measure(
        daemons: &[u32; 2],
        instance: Option<u32>,
        length: Duration,
        mut during: impl FnMut(),
    ) -> Self {
        let ticks = |pid: u32| dataplane_user::host::tasks::cpu_ticks(pid).unwrap_or(0);
        let before = daemons.map(ticks);
        let instance_before = instance.map_or(0, ticks);
        let start = Instant::now();
        while start.elapsed() < length {
            during();
            std::thread::sleep(Duration::from_millis(10));
        }
        let seconds = start.elapsed().as_secs_f64();
        let percent = |used: u64| {
            used as f64 / dataplane_tests::clock_ticks_per_second() as f64 / seconds * 100.0
        };
        let after = daemons.map(ticks);
        Self {
            cpu: [0, 1].map(|i| percent(after[i] - before[i])),
            rss_mib: daemons.map(|pid| rss_kib(pid) as f64 / 1024.0),
            instance_cpu: instance.map_or(0.0, |pid| percent(ticks(pid) - instance_before)),
        }
    }
}

/// VmRSS of `pid`, KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
