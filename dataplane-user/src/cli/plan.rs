//! `dataplane calibrate` and `dataplane plan`: this host's migration costs,
//! and what they predict for a service.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use dataplane_user::{
    config::{DEFAULT_CALIBRATION, DEFAULT_CONFIG, DaemonConfig},
    control::{answer::FlowInfo, method::Call},
    criu::{Criu, DEFAULT_CRIU},
    planning::{
        calibrate,
        model::{Calibration, LiveCosts, Method, Prediction, Workload, error_pct},
        plan::Plan,
    },
    report::{Mode, Report},
    service::{FlowSpec, Service},
};
use serde_json::Value;

use super::{Context, Failure};

/// The calibration file: `flag`, else the configuration's key, else the default.
fn calibration_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| {
        DaemonConfig::read(Path::new(DEFAULT_CONFIG))
            .ok()
            .map(|c| c.calibration)
    })
    .unwrap_or_else(|| PathBuf::from(DEFAULT_CALIBRATION))
}

fn read_calibration(path: &Path) -> anyhow::Result<Calibration> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "no calibration at {}: run `dataplane calibrate` first",
            path.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a calibration", path.display()))
}

/// Migration reports from a file: one report, an array of them, one a
/// line, or `dataplane --json status` (its `migrations`).
fn read_reports(path: &Path) -> anyhow::Result<Vec<Report>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let values: Vec<Value> = match serde_json::from_str::<Value>(&text) {
        Ok(Value::Array(all)) => all,
        Ok(Value::Object(status)) if status.contains_key("migrations") => {
            status["migrations"].as_array().cloned().unwrap_or_default()
        }
        Ok(one) => vec![one],
        Err(_) => text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()
            .with_context(|| format!("{}: not migration.status JSON", path.display()))?,
    };
    values
        .into_iter()
        .map(|v| serde_json::from_value(v).context("a migration report"))
        .collect()
}

/// `dataplane calibrate`'s arguments.
#[derive(clap::Args)]
pub struct CalibrateArgs {
    /// State sizes of the synthetic service, MiB.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub sizes: Vec<u64>,
    /// Dumps and restores per size.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Where to save it (default: the configuration's `calibration`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Finished migrations to fit the live modes' costs to: migration.status
    /// JSON (a report, an array of them, or one a line) or `--json status`.
    #[arg(long)]
    pub from_reports: Option<PathBuf>,
    /// The CRIU binary.
    #[arg(long, default_value = DEFAULT_CRIU)]
    pub criu: PathBuf,
    /// The CPS period the reports' migrations ran at, µs (their replay).
    #[arg(long, default_value_t = 1000)]
    pub period_us: u64,
    /// Your service's own program instead of the synthetic service
    /// (after `--`; `{mib}` in its arguments becomes each size): run
    /// in namespaces of its own, it must hold that much resident
    /// anonymous memory once started.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// `dataplane calibrate`: measure (or fit reports), save, print the fit.
pub fn calibrate(args: CalibrateArgs) -> Result<(), Failure> {
    Ok(run_calibrate(args)?)
}

fn run_calibrate(args: CalibrateArgs) -> anyhow::Result<()> {
    let CalibrateArgs {
        sizes,
        repeat,
        out,
        from_reports,
        criu,
        period_us,
        command,
    } = args;
    let out = &calibration_path(out);
    let from_reports = from_reports.as_deref();
    let command = (!command.is_empty()).then_some(&command[..]);
    let mut calibration = match from_reports {
        // The CRIU terms stay as measured; the live costs sit on top of them.
        Some(_) => read_calibration(out)?,
        None => {
            let criu = Criu::new(criu);
            let start = std::time::Instant::now();
            let mut mem_track = false;
            for _ in 0..3 {
                mem_track = criu.features()?.mem_track.unwrap_or(false);
            }
            let check_us = start.elapsed().as_secs_f64() * 1e6 / 3.0;
            let scratch = calibrate::scratch_dir(None);
            let mut samples = Vec::new();
            for &mib in &sizes {
                for _ in 0..repeat.max(1) {
                    let sample = calibrate::sample(&criu, (mib << 20) as usize, &scratch, command)
                        .with_context(|| format!("{mib} MiB"))?;
                    eprintln!(
                        "  {mib:>4} MiB: dump {:7.1} ms  copy {:6.1} ms  restore {:7.1} ms",
                        sample.dump_us / 1e3,
                        sample.copy_us / 1e3,
                        sample.restore_us / 1e3
                    );
                    samples.push(sample);
                }
            }
            // Live costs fitted earlier sat on the old CRIU terms: refit them.
            let mut calibration = Calibration {
                host: nix::unistd::gethostname()
                    .map(|h| h.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                created: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                mem_track,
                service: command.map(|c| c.join(" ")),
                ..Calibration::default()
            };
            calibration.criu.check_us = check_us;
            calibration.fit_samples(samples);
            calibration
        }
    };
    let reports = from_reports.map(read_reports).transpose()?;
    if let Some(reports) = &reports {
        calibration.fit_reports(reports);
    }
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(&calibration).expect("serializes");
    std::fs::write(out, text).with_context(|| format!("{}", out.display()))?;
    print_calibration(
        &calibration,
        reports.as_deref(),
        1e6 / period_us.max(1) as f64,
    );
    println!("saved to {}", out.display());
    Ok(())
}

const MIB: f64 = 1048576.0;

/// The fitted lines, and how far each sample or report is from them.
fn print_calibration(c: &Calibration, reports: Option<&[Report]>, input_rate: f64) {
    let k = &c.criu;
    println!(
        "CRIU on {} (memory tracking: {}), {} samples of {}",
        c.host,
        if c.mem_track {
            "yes"
        } else {
            "no: pre-copy is a single dump"
        },
        c.samples.len(),
        c.service_name()
    );
    println!("  {:<26} {:>10} {:>12}", "term", "fixed ms", "ms per MiB");
    for (name, line) in [
        ("dump T^d (Eq. 2, 12, 13)", k.dump),
        ("frozen (Eq. 12)", k.frozen),
        ("copy T^net (per MiB of D)", k.copy),
        ("restore T^r (Eq. 16)", k.restore),
    ] {
        println!(
            "  {name:<26} {:>10.2} {:>12.3}",
            line.fixed / 1e3,
            line.slope * MIB / 1e3
        );
    }
    println!(
        "  image D (Eq. 14)           {:.0} KiB + {:.3} x M",
        k.image.fixed / 1024.0,
        k.image.slope
    );
    println!("  FEATURE_CHECK              {:.2} ms", k.check_us / 1e3);
    if c.criu_reports > 0 {
        println!(
            "  dump, frozen and restore: fixed costs from {} migrations' CRIU times, slopes \
             from the samples",
            c.criu_reports
        );
    }
    if !c.samples.is_empty() {
        println!(
            "  {:>7} {:>7}  {:>15} {:>15} {:>15} {:>15}",
            "M MiB", "D MiB", "dump ms (fit)", "frozen (fit)", "copy (fit)", "restore (fit)"
        );
    }
    let cell =
        |measured: f64, fitted: f64| format!("{:>6.1} ({:>6.1})", measured / 1e3, fitted / 1e3);
    for s in &c.samples {
        let m = s.state_bytes;
        println!(
            "  {:>7.2} {:>7.2}  {:>15} {:>15} {:>15} {:>15}",
            m / MIB,
            s.image_bytes / MIB,
            cell(s.dump_us, k.dump.at(m)),
            cell(s.frozen_us, k.frozen.at(m)),
            cell(s.copy_us, k.copy.at(s.image_bytes)),
            cell(s.restore_us, k.restore.at(m))
        );
    }
    for (name, live) in [("leave-running", &c.leave_running), ("standby", &c.standby)] {
        let Some(l) = live else {
            println!("{name}: no reports fitted (`dataplane calibrate --from-reports FILE`)");
            continue;
        };
        println!(
            "{name}, from {} reports, ms: prepare {:.1}; checkpoint {:.1} + {:.2} x dump; \
             transfer {:.1} + {:.2} per MiB; restore {:.1} + {:.2} x CRIU's, then replay at \
             {:.0}/s; converge {:.1}; cutover {:.1}; announce {:.1}; finish {:.1} + {:.2} per MiB",
            l.reports,
            l.prepare_us / 1e3,
            l.checkpoint.fixed / 1e3,
            l.checkpoint.slope,
            l.transfer.fixed / 1e3,
            l.transfer.slope * MIB / 1e3,
            l.restore.fixed / 1e3,
            l.restore.slope,
            l.replay_rate,
            l.converge_us / 1e3,
            l.cutover_us / 1e3,
            l.announce_us / 1e3,
            l.finish.fixed / 1e3,
            l.finish.slope * MIB / 1e3
        );
    }
    for r in reports
        .into_iter()
        .flatten()
        .filter(|r| r.is_whole_migration())
    {
        let work = Workload {
            state_bytes: c.state_of(r),
            dirty_rate: 0.0,
            input_rate,
        };
        let p = c.predict(r.mode.into(), &work);
        println!(
            "  {:<16} {:<14} D {:>7.2} MiB  T_M {:>8.1} ms, model {:>8.1} ms ({:+.1}%)",
            r.id,
            Method::from(r.mode).name(),
            r.image_bytes as f64 / MIB,
            r.total_us as f64 / 1e3,
            p.total_us / 1e3,
            error_pct(p.total_us, r.total_us as f64)
        );
    }
}

/// `dataplane plan`: prints (or with --json, gives) the service's plan.
pub fn plan(
    cx: &Context,
    service: &str,
    mode: Option<Mode>,
    dirty_rate: f64,
    calibration: Option<PathBuf>,
) -> Result<(), Failure> {
    let path = calibration_path(calibration);
    let calibration = read_calibration(&path)?;
    let plan = make_plan(cx, service, dirty_rate, &calibration)?;
    cx.show(&plan, |plan| print_plan(plan, &path, &calibration, mode));
    Ok(())
}

/// Sizes the service's instances, measures its input rate, and predicts
/// every method.
fn make_plan(
    cx: &Context,
    name: &str,
    dirty_rate: f64,
    calibration: &Calibration,
) -> Result<Plan, Failure> {
    let services: Vec<Service> = cx.call(Call::ServiceList)?;
    let service = services
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| Failure::Local(anyhow::anyhow!("no service {name:?} is registered")))?;
    let pid = service.pid;
    let state_bytes = calibrate::state_bytes(pid)
        .with_context(|| format!("the size of service {name} (process {pid})"))?;
    let standby_state_bytes = service
        .standby_pid
        .map(calibrate::state_bytes)
        .transpose()
        .with_context(|| format!("the size of {name}'s standby"))?;
    let workload = Workload {
        state_bytes: state_bytes as f64,
        dirty_rate,
        input_rate: input_rate(cx, service)?,
    };
    Ok(Plan::predict(
        service,
        state_bytes,
        standby_state_bytes,
        workload,
        calibration,
    ))
}

/// Inputs per second on the service's flows, over 200 ms of their counters.
fn input_rate(cx: &Context, service: &Service) -> Result<f64, Failure> {
    let last_seq = || -> Result<Option<u64>, Failure> {
        let flows: Vec<FlowInfo> = cx.call(Call::FlowList)?;
        let ours = flows.iter().filter(|f| {
            let ends = FlowSpec {
                cps: f.cps,
                service: f.service,
            };
            service.flows.contains(&ends)
        });
        Ok(ours.map(|f| f.last_seq).reduce(|a, b| a + b))
    };
    let start = std::time::Instant::now();
    let before = last_seq()?;
    std::thread::sleep(Duration::from_millis(200));
    let after = last_seq()?;
    Ok(match (before, after) {
        (Some(a), Some(b)) => b.saturating_sub(a) as f64 / start.elapsed().as_secs_f64(),
        _ => 0.0,
    })
}

fn print_plan(plan: &Plan, path: &Path, c: &Calibration, mode: Option<Mode>) {
    let mib = |b: u64| b as f64 / MIB;
    print!(
        "service {}: process {}, M = {:.2} MiB (Anonymous in /proc/{}/smaps_rollup)",
        plan.service,
        plan.pid,
        mib(plan.state_bytes),
        plan.pid
    );
    match (plan.standby_pid, plan.standby_state_bytes) {
        (Some(pid), Some(m)) => println!("; standby {pid}, {:.2} MiB", mib(m)),
        _ => println!("; no standby"),
    }
    println!(
        "inputs: {:.0}/s on its flow; dirty rate R = {:.0} B/s from --dirty-rate (not measured: \
         this kernel has no soft-dirty tracking; only pre-copy rounds depend on it)",
        plan.workload.input_rate, plan.workload.dirty_rate
    );
    let age = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .saturating_sub(c.created);
    let reports = |l: &Option<LiveCosts>| l.as_ref().map_or(0, |l| l.reports);
    println!(
        "calibration {} (host {}, {} min old): CRIU from {} dumps of {}, live costs from \
         {} leave-running and {} standby reports",
        path.display(),
        c.host,
        age / 60,
        c.samples.len(),
        c.service_name(),
        reports(&c.leave_running),
        reports(&c.standby)
    );
    println!(
        "  {:<24} {:>10} {:>10} {:>10} {:>8}",
        "method", "T_M ms", "T_D ms", "frozen ms", "D MiB"
    );
    for p in &plan.predictions {
        println!(
            "  {:<24} {:>10.1} {:>10.1} {:>10.1} {:>8.2}",
            p.method.name(),
            p.total_us / 1e3,
            p.downtime_us / 1e3,
            p.frozen_us / 1e3,
            p.image_bytes / MIB
        );
    }
    let Some(chosen) = mode.map(Method::from) else {
        return;
    };
    if let Some(p) = plan.predictions.iter().find(|p| p.method == chosen) {
        let phases: Vec<String> = p
            .phases
            .iter()
            .map(|(name, us)| format!("{name} {:.1}", us / 1e3))
            .collect();
        println!("{} phases, ms: {}", chosen.name(), phases.join(", "));
    }
}

/// The prediction for `dataplane migrate`, when this host is calibrated.
pub fn predict_migration(
    cx: &Context,
    service: &str,
    mode: Mode,
    calibration: Option<PathBuf>,
) -> Option<Prediction> {
    let calibration = read_calibration(&calibration_path(calibration)).ok()?;
    let method = Method::from(mode);
    match make_plan(cx, service, 0.0, &calibration) {
        Ok(plan) => plan.predictions.into_iter().find(|p| p.method == method),
        Err(_) => None,
    }
}
