//! `dataplane migrate`, `watch` and `abort`: running a migration and
//! following it.
use std::{
    path::PathBuf,
    sync::mpsc::{RecvTimeoutError, channel},
    time::{Duration, Instant},
};

use dataplane_user::{
    control::{
        answer::{Event, MigrationAborting, ReplicaStopping, Watching},
        method::{Call, MigrationId, ServiceName},
    },
    migration::{Request, replica::ReplicaRequest},
    planning::model::{Method, Prediction, error_pct},
    report::{ReplicaState, Report, State},
};
use serde_json::{Value, json};

use super::{Context, Failure, plan::predict_migration};

/// Runs `request`, showing each phase as it runs and a table at the end
/// (or, with `detach`, prints the migration's id and returns).
pub fn migrate(
    cx: &Context,
    request: Request,
    detach: bool,
    calibration: Option<PathBuf>,
) -> Result<(), Failure> {
    // The prediction needs the instance's size before it is gone.
    let predicted = if detach {
        None
    } else {
        predict_migration(cx, &request.service, request.mode, calibration)
    };
    // Watch first, so that no phase is missed.
    let mut watch = cx.client()?;
    let _: Watching = watch.request(&Call::MigrationWatch)?;
    let started: MigrationId = cx.call(Call::MigrationStart(request))?;
    if detach {
        cx.show(&started, |s| println!("{}", s.id));
        return Ok(());
    }
    let MigrationId { id } = started;
    let report = follow(watch, &id, |r| r.state != State::Running)?;
    // A handover to a hot replica is no migration the model predicts.
    let predicted = predicted.filter(|_| report.from_replica.is_none());
    let mut shown = json!(report);
    if let Some(p) = &predicted {
        shown["predicted"] = json!(p);
    }
    cx.show(&shown, |_| print_migration(&report, predicted.as_ref()));
    match report.error {
        Some(error) => Err(Failure::Migration(error)),
        None => Ok(()),
    }
}

/// Shows migration `id`'s phase as it runs (on a terminal), from the
/// events on `watch`, until a report of it is `over`: that report.
fn follow(
    mut watch: dataplane_user::control::client::Client,
    id: &str,
    over: impl Fn(&Report) -> bool,
) -> Result<Report, Failure> {
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // Notifications come on a thread of their own, so that the progress
    // line can tick between them.
    let (lines, notifications) = channel();
    std::thread::spawn(move || {
        while let Ok(line) = watch.next_line() {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let started = Instant::now();
    let mut progress = Progress::default();
    let report = loop {
        let line = match notifications.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => {
                if terminal {
                    progress.show(id, started.elapsed());
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(anyhow::anyhow!("the daemon closed the watch").into());
            }
        };
        let Ok(Event::Phase(report)) = serde_json::from_str(&line) else {
            continue;
        };
        if report.id != id {
            continue;
        }
        if over(&report) {
            break *report;
        }
        progress.update(&report);
        if terminal {
            progress.show(id, started.elapsed());
        }
    };
    if terminal {
        eprintln!();
    }
    Ok(report)
}

/// Starts a hot replica and shows it until it is in sync (or, with
/// `detach`, prints its id and returns).
pub fn replicate(cx: &Context, request: ReplicaRequest, detach: bool) -> Result<(), Failure> {
    let mut watch = cx.client()?;
    let _: Watching = watch.request(&Call::MigrationWatch)?;
    let MigrationId { id } = cx.call(Call::ReplicaStart(request))?;
    if detach {
        println!("{id}");
        return Ok(());
    }
    let in_sync = |r: &Report| r.replica.as_ref().map(|s| s.state) == Some(ReplicaState::InSync);
    let report = follow(watch, &id, |r| r.state != State::Running || in_sync(r))?;
    cx.show(&report, |r| {
        println!(
            "hot replica {} of {} at {}: {}",
            r.id,
            r.service,
            r.to,
            match &r.replica {
                Some(s) if r.state == State::Running => s.state.name(),
                _ => r.state.name(),
            }
        );
        if let Some(s) = &r.replica {
            println!(
                "  in sync after            {:>10.3} ms",
                s.sync_us as f64 / 1e3
            );
            println!("  checkpoint position S    {:>10}", r.checkpoint_seq);
            println!("  image data D             {:>10} bytes", r.image_bytes);
            println!("  outputs compared         {:>10}", s.compared);
            println!("  lag                      {:>10} inputs", s.lag);
        }
        if let Some(error) = &r.error {
            println!("  error: {error}");
        }
    });
    match report.error {
        Some(error) => Err(Failure::Migration(error)),
        None => Ok(()),
    }
}

pub fn stop_replica(cx: &Context, service: String) -> Result<(), Failure> {
    let stopping: ReplicaStopping = cx.call(Call::ReplicaStop(ServiceName { name: service }))?;
    cx.show(&stopping, |s| {
        println!("stopping hot replica {}", s.stopping)
    });
    Ok(())
}

/// Streams migration phase changes until the daemon goes away.
pub fn watch(cx: &Context) -> Result<(), Failure> {
    let mut client = cx.client()?;
    let _: Watching = client.request(&Call::MigrationWatch)?;
    loop {
        let line = client.next_line()?;
        if cx.json {
            print!("{line}");
        } else {
            let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            println!("{} {}", v["method"].as_str().unwrap_or("?"), v["params"]);
        }
    }
}

pub fn abort(cx: &Context, id: String) -> Result<(), Failure> {
    let aborting: MigrationAborting = cx.call(Call::MigrationAbort(MigrationId { id }))?;
    cx.show(&aborting, |a| println!("aborting {}", a.aborting));
    Ok(())
}

/// What `dataplane migrate` shows while a migration runs: the phase, the
/// time since it started, and the image bytes sent with their rate.
#[derive(Default)]
struct Progress {
    phase: &'static str,
    bytes: u64,
    /// When the transfer's first bytes were reported, and how many.
    first: Option<(Instant, u64)>,
    rate: f64,
}

impl Progress {
    fn update(&mut self, report: &Report) {
        self.phase = report.phase.name();
        self.bytes = report.image_bytes;
        if self.bytes > 0 {
            let (at, bytes) = *self.first.get_or_insert((Instant::now(), self.bytes));
            let seconds = at.elapsed().as_secs_f64();
            if seconds > 0.0 {
                self.rate = self.bytes.saturating_sub(bytes) as f64 / seconds;
            }
        }
    }

    fn show(&self, id: &str, elapsed: Duration) {
        let rate = if self.rate > 0.0 {
            format!(" at {:.1} MiB/s", self.rate / (1 << 20) as f64)
        } else {
            String::new()
        };
        eprint!(
            "\r{id}: {:<10} {:>7.2} s, image data {:.2} MiB{rate}      ",
            self.phase,
            elapsed.as_secs_f64(),
            self.bytes as f64 / (1 << 20) as f64
        );
    }
}

/// A migration's report as a table: phases, then the figures; with the
/// model's prediction beside them when there is one.
fn print_migration(r: &Report, predicted: Option<&Prediction>) {
    let method = match &r.from_replica {
        Some(replica) => format!("handover to hot replica {replica}"),
        None => Method::from(r.mode).name().to_string(),
    };
    println!(
        "migration {} of {} to {} ({method}): {}",
        r.id,
        r.service,
        r.to,
        r.state.name()
    );
    let column = if predicted.is_some() {
        format!(" {:>12}", "predicted ms")
    } else {
        String::new()
    };
    println!(
        "  {:<10} {:>10} {:>12}{column}",
        "phase", "start ms", "duration ms"
    );
    for phase in &r.phases {
        let name = phase.name.name();
        let column = predicted
            .and_then(|p| p.phases.iter().find(|(n, _)| n == name))
            .map(|(_, us)| format!(" {:>12.3}", us / 1e3))
            .unwrap_or_default();
        println!(
            "  {:<10} {:>10.3} {:>12.3}{column}",
            name,
            phase.start_us as f64 / 1e3,
            phase.duration_us as f64 / 1e3
        );
    }
    // "predicted X ms (+E%)" after a measured figure in µs.
    let beside = |measured_us: u64, predicted_us: Option<f64>| {
        predicted_us.map_or(String::new(), |p| {
            format!(
                "   predicted {:>9.3} ms ({:+.0}%)",
                p / 1e3,
                error_pct(p, measured_us as f64)
            )
        })
    };
    println!(
        "  migration time T_M       {:>10.3} ms{}",
        r.total_us as f64 / 1e3,
        beside(r.total_us, predicted.map(|p| p.total_us))
    );
    println!("  checkpoint position S    {:>10}", r.checkpoint_seq);
    println!("  handover point K         {:>10}", r.handover_seq);
    println!(
        "  frozen (checkpointed)    {:>10.3} ms{}",
        r.frozen_us as f64 / 1e3,
        beside(r.frozen_us, predicted.map(|p| p.frozen_us))
    );
    println!("  image data D             {:>10} bytes", r.image_bytes);
    if let Some(pre_dump) = &r.pre_dump {
        println!("  pre-dump                 {pre_dump}");
    }
    println!(
        "  replayed                 {:>10} inputs at {:.0}/s",
        r.replayed, r.replay_rate
    );
    println!("  outputs compared         {:>10}", r.compared);
    println!("  flip                     {:>10} ns", r.flip_ns);
    println!(
        "  serving instance held    {:>10.3} ms (T_D: its inputs not delivered){}",
        r.held_us as f64 / 1e3,
        // Standby mode holds nothing of the serving instance's.
        beside(
            r.held_us,
            predicted.filter(|_| r.held_us > 0).map(|p| p.downtime_us)
        )
    );
    let ms = |us: u64| us as f64 / 1e3;
    println!(
        "  CPU time, source         {:>10.3} ms daemon, {:.3} ms CRIU",
        ms(r.load.source_daemon_us),
        ms(r.load.source_criu_us)
    );
    println!(
        "  CPU time, destination    {:>10.3} ms daemon, {:.3} ms CRIU",
        ms(r.load.destination_daemon_us),
        ms(r.load.destination_criu_us)
    );
    if let Some(error) = &r.error {
        println!("  error: {error}");
    }
}
