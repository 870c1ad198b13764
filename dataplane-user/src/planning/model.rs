//! The PAM model of calagna2023 ("processing-aware migration") for this
//! host's migrations: migration time T_M (the paper's T^mig) and downtime
//! T_D (T^down) from the service's state size M (bytes) and dirty rate R
//! (bytes/s), with CRIU's processing costs measured on this host rather
//! than assumed away.
//!
//! The paper's Podman and runC factors (alpha_1..alpha_4, Eq. 9, 10, 16)
//! are 1 here: the daemon drives CRIU directly. Every processing term is a
//! line, fixed + slope * size, as the paper fits them (Eq. 11 to 16); the
//! fixed parts are what the paper shows dominating small services.
//!
//! Our live modes run CRIU once, on an instance that keeps running, and
//! add steps of their own around it (hold and replay, the peer link,
//! convergence, the cutover); their fixed costs come from real migration
//! reports (`fit_reports`), the CRIU terms from `dataplane calibrate`.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::report::{Mode, Report, Stage};

/// y = fixed + slope * x, fitted by least squares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Line {
    pub fixed: f64,
    pub slope: f64,
}

impl Line {
    pub fn at(&self, x: f64) -> f64 {
        self.fixed + self.slope * x
    }
}

/// The points' mean (x, y).
pub fn mean(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len().max(1) as f64;
    (
        points.iter().map(|p| p.0).sum::<f64>() / n,
        points.iter().map(|p| p.1).sum::<f64>() / n,
    )
}

/// The least-squares line through `points` (x, y); none when the x values
/// do not spread (one size says nothing about a slope).
pub fn fit_line(points: &[(f64, f64)]) -> Option<Line> {
    let (mx, my) = mean(points);
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if points.is_empty() || sxx <= f64::EPSILON * mx.abs().max(1.0) {
        return None;
    }
    let slope = sxy / sxx;
    Some(Line {
        fixed: my - slope * mx,
        slope,
    })
}

/// The least-squares line, or without spread in x the line of `slope`
/// through the points' mean.
pub fn fit_line_or(points: &[(f64, f64)], slope: f64) -> Line {
    fit_line(points).unwrap_or_else(|| {
        let (mx, my) = mean(points);
        Line {
            fixed: my - slope * mx,
            slope,
        }
    })
}

/// Eq. 4: the bytes dirtied while a round ran, R times the time the process
/// was running (the round's duration minus its frozen time), at most M.
pub fn dirtied(rate_bytes_per_s: f64, running_us: f64, state_bytes: f64) -> f64 {
    (rate_bytes_per_s * running_us.max(0.0) / 1e6).min(state_bytes)
}

/// CRIU on this host: times in µs, sizes in bytes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CriuCosts {
    /// T^d, the dump's wall time against M (Eq. 2 with Eq. 12 and 13:
    /// freezing, frozen and memory terms, each fixed + slope * M).
    pub dump: Line,
    /// T^{d,frozen} against M (Eq. 12: phi^d + gamma^d * M), CRIU's
    /// `frozen_time`.
    pub frozen: Line,
    /// The image's bytes D against M (Eq. 14: mu + nu * M, in bytes).
    pub image: Line,
    /// T^net = V / L against D: the image copied to where it is restored
    /// (a file copy for stop-and-copy on one host).
    pub copy: Line,
    /// T^r against M (Eq. 16: psi + omega * M), the restore's wall time.
    pub restore: Line,
    /// CRIU's FEATURE_CHECK, which pre-copy asks before any round: µs.
    #[serde(default)]
    pub check_us: f64,
}

/// What one of our live modes adds to CRIU's terms, fitted to real
/// migrations' reports (µs). The checkpoint and restore phases wrap a CRIU
/// dump and restore: each is a line in CRIU's own term, a fixed cost of
/// ours plus a factor alpha on CRIU's time, as calagna2023 relates Podman's
/// and runC's times to CRIU's (alpha_1 alpha_2 in Eq. 9 and 10, alpha_3
/// alpha_4 in Eq. 16). From reports of a single size, alpha is 1.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LiveCosts {
    /// How many reports these come from.
    pub reports: usize,
    pub prepare_us: f64,
    /// The checkpoint phase (hold, drain, the dump left running, the held
    /// inputs given back) against CRIU's T^d(M).
    pub checkpoint: Line,
    /// The image over the peer link against D (T^net with the link's L).
    pub transfer: Line,
    /// The restore phase without its replay, against CRIU's T^r(M).
    pub restore: Line,
    /// Inputs per second the destination replays from its log.
    pub replay_rate: f64,
    pub converge_us: f64,
    pub cutover_us: f64,
    pub announce_us: f64,
    /// Stopping the source's instances against M: their memory is freed.
    pub finish: Line,
}

impl LiveCosts {
    /// No reports: CRIU's terms alone, the image at the copy's rate.
    fn criu_only(copy: Line) -> Self {
        let same = Line {
            fixed: 0.0,
            slope: 1.0,
        };
        Self {
            checkpoint: same,
            restore: same,
            transfer: copy,
            ..Self::default()
        }
    }
}

/// One synthetic dump, copy and restore measured by `dataplane calibrate`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub state_bytes: f64,
    pub image_bytes: f64,
    pub dump_us: f64,
    pub frozen_us: f64,
    pub copy_us: f64,
    pub restore_us: f64,
}

/// A host's calibration, as `dataplane calibrate` saves it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub host: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// Whether CRIU can track memory here (pre-dump rounds possible).
    pub mem_track: bool,
    /// The command whose dumps CRIU's terms come from; none: the synthetic
    /// service.
    #[serde(default)]
    pub service: Option<String>,
    /// Reports of real migrations whose CRIU times set the dump, frozen
    /// and restore terms' fixed costs (0: the samples set them).
    #[serde(default)]
    pub criu_reports: usize,
    pub criu: CriuCosts,
    pub samples: Vec<Sample>,
    #[serde(default)]
    pub leave_running: Option<LiveCosts>,
    #[serde(default)]
    pub standby: Option<LiveCosts>,
}

/// How a service is migrated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Inter-copy C/R: dump (the service stops), copy, restore.
    StopAndCopy,
    /// Iterative pre-copy (kaur2020): `rounds` pre-dumps while the service
    /// runs, then a final dump of what they left dirty. 0 rounds (a kernel
    /// without memory tracking) is a single dump: stop-and-copy.
    PreCopy { rounds: usize },
    /// Ours: the serving instance checkpointed and left running.
    LeaveRunning,
    /// Ours: a standby instance checkpointed; the serving one never stops.
    Standby,
}

impl Method {
    pub fn name(&self) -> String {
        match self {
            Method::StopAndCopy => "stop-and-copy".into(),
            Method::PreCopy { rounds: 0 } => "pre-copy (single dump)".into(),
            Method::PreCopy { rounds } => format!("pre-copy ({rounds} rounds)"),
            Method::LeaveRunning => "leave-running".into(),
            Method::Standby => "standby".into(),
        }
    }
}

impl From<Mode> for Method {
    fn from(mode: Mode) -> Self {
        match mode {
            Mode::LeaveRunning => Method::LeaveRunning,
            Mode::Standby => Method::Standby,
        }
    }
}

/// What is migrated.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    /// M: the state CRIU dumps (resident anonymous memory), bytes.
    pub state_bytes: f64,
    /// R: bytes dirtied per second.
    pub dirty_rate: f64,
    /// Inputs per second the service receives (1 / T_U).
    pub input_rate: f64,
}

/// A prediction: phases and totals in µs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub method: Method,
    pub phases: Vec<(String, f64)>,
    /// T_M.
    pub total_us: f64,
    /// T_D: how long the serving instance gives no output.
    pub downtime_us: f64,
    /// CRIU's frozen time of the checkpointed instance.
    pub frozen_us: f64,
    /// D, bytes moved.
    pub image_bytes: f64,
}

impl Calibration {
    /// What CRIU's terms were measured on.
    pub fn service_name(&self) -> &str {
        self.service.as_deref().unwrap_or("the synthetic service")
    }

    /// T_M and T_D of migrating `work` by `method`.
    pub fn predict(&self, method: Method, work: &Workload) -> Prediction {
        let c = &self.criu;
        let m = work.state_bytes;
        let d = c.image.at(m);
        let phase = |name: &str, us: f64| (name.to_string(), us.max(0.0));
        match method {
            Method::StopAndCopy | Method::PreCopy { rounds: 0 } => {
                // Eq. 6 and 19 with I = 0: one dump, the copy, the restore,
                // one after the other while the service is stopped. The
                // service stops at the freeze, so T_D counts the frozen part
                // of the dump (Eq. 2), not CRIU's set-up before it.
                // Pre-copy asks CRIU whether it can track memory first.
                let check = match method {
                    Method::PreCopy { .. } => c.check_us,
                    _ => 0.0,
                };
                let phases = vec![
                    phase("dump", check + c.dump.at(m)),
                    phase("copy", c.copy.at(d)),
                    phase(Stage::Restore.name(), c.restore.at(m)),
                ];
                Prediction {
                    method,
                    total_us: phases.iter().map(|p| p.1).sum(),
                    downtime_us: c.frozen.at(m) + c.copy.at(d) + c.restore.at(m),
                    frozen_us: c.frozen.at(m),
                    image_bytes: d,
                    phases,
                }
            }
            Method::PreCopy { rounds } => {
                // Eq. 1, 17, 18: round 0 pre-dumps all of M, round i the
                // bytes dirtied while round i-1 ran (Eq. 4). Pre-dump costs
                // are taken to be the dump's line: a kernel without memory
                // tracking cannot measure them.
                let mut phases = Vec::new();
                let (mut volume, mut moved) = (m, 0.0);
                for i in 0..rounds {
                    let round = c.dump.at(volume) + c.copy.at(c.image.at(volume));
                    phases.push(phase(&format!("pre-dump {i}"), round));
                    moved += c.image.at(volume);
                    volume = dirtied(work.dirty_rate, round - c.frozen.at(volume), m);
                }
                // Eq. 19: the final dump of what is dirty, its copy, and a
                // restore of all of M (Eq. 16 depends on M alone).
                let last_copy = c.copy.at(c.image.at(volume));
                phases[0].1 += c.check_us;
                phases.push(phase("dump", c.dump.at(volume)));
                phases.push(phase("copy", last_copy));
                phases.push(phase(Stage::Restore.name(), c.restore.at(m)));
                Prediction {
                    method,
                    total_us: phases.iter().map(|p| p.1).sum(),
                    downtime_us: c.frozen.at(volume) + last_copy + c.restore.at(m),
                    frozen_us: c.frozen.at(volume),
                    image_bytes: moved + c.image.at(volume),
                    phases,
                }
            }
            Method::LeaveRunning | Method::Standby => {
                let live = self.live(method);
                // The checkpoint phase: hold and drain, the dump (left
                // running), the held inputs given back.
                let checkpoint = live.checkpoint.at(c.dump.at(m));
                let transfer = live.transfer.at(d);
                let restore = live.restore.at(c.restore.at(m));
                // The destination replays every input since S: those that
                // came during the checkpoint, transfer and restore, and
                // those arriving while it replays, so it catches up after
                // backlog / (replay rate - input rate).
                let backlog = work.input_rate * (checkpoint + transfer + restore) / 1e6;
                // Without a measured replay rate (no reports) there is no
                // replay term: the prediction is CRIU's and the link's.
                let catch_up = if work.input_rate <= 0.0 || live.replay_rate <= 0.0 {
                    0.0
                } else if live.replay_rate > work.input_rate {
                    backlog / (live.replay_rate - work.input_rate) * 1e6
                } else {
                    f64::INFINITY
                };
                let phases = vec![
                    phase(Stage::Prepare.name(), live.prepare_us),
                    phase(Stage::Checkpoint.name(), checkpoint),
                    phase(Stage::Transfer.name(), transfer),
                    phase(Stage::Restore.name(), restore + catch_up),
                    phase(Stage::Converge.name(), live.converge_us),
                    phase(Stage::Cutover.name(), live.cutover_us),
                    phase(Stage::Announce.name(), live.announce_us),
                    phase(Stage::Finish.name(), live.finish.at(m)),
                ];
                // Leave-running: the serving instance's outputs wait for the
                // checkpoint phase (its inputs are held meanwhile). Standby:
                // the serving instance never stops, and the flip is one store.
                let downtime_us = match method {
                    Method::LeaveRunning => checkpoint,
                    _ => 0.0,
                };
                Prediction {
                    method,
                    total_us: phases.iter().map(|p| p.1).sum(),
                    downtime_us,
                    frozen_us: c.frozen.at(m),
                    image_bytes: d,
                    phases,
                }
            }
        }
    }

    /// A live mode's fitted costs; without reports of that mode, the other
    /// mode's; without any, none (the image then moves at the copy's rate).
    pub fn live(&self, method: Method) -> LiveCosts {
        let (own, other) = match method {
            Method::Standby => (&self.standby, &self.leave_running),
            _ => (&self.leave_running, &self.standby),
        };
        own.clone()
            .or_else(|| other.clone())
            .unwrap_or_else(|| LiveCosts::criu_only(self.criu.copy))
    }

    /// Pre-dump rounds kaur2020's loop would run here: none without memory
    /// tracking; otherwise rounds while each leaves less dirty than the one
    /// before (the stop policy's no-gain rule, Eq. 4), at most `max`.
    pub fn precopy_rounds(&self, work: &Workload, max: usize) -> usize {
        if !self.mem_track {
            return 0;
        }
        let c = &self.criu;
        let mut volume = work.state_bytes;
        for rounds in 1..=max {
            let round = c.dump.at(volume) + c.copy.at(c.image.at(volume));
            let next = dirtied(
                work.dirty_rate,
                round - c.frozen.at(volume),
                work.state_bytes,
            );
            if next >= volume {
                return rounds;
            }
            volume = next;
        }
        max
    }

    /// Fits CRIU's lines to synthetic samples (`dataplane calibrate`). From
    /// a single size the times are taken as fixed costs (the paper's
    /// lower bounds phi, psi), the image as proportional to M.
    pub fn fit_samples(&mut self, samples: Vec<Sample>) {
        let line = |x: fn(&Sample) -> f64, y: fn(&Sample) -> f64, slope: f64| {
            let points: Vec<(f64, f64)> = samples.iter().map(|s| (x(s), y(s))).collect();
            fit_line_or(&points, slope)
        };
        let m = |s: &Sample| s.state_bytes;
        let one_size_image = samples
            .first()
            .map_or(1.0, |s| s.image_bytes / s.state_bytes);
        self.criu = CriuCosts {
            dump: line(m, |s| s.dump_us, 0.0),
            frozen: line(m, |s| s.frozen_us, 0.0),
            image: line(m, |s| s.image_bytes, one_size_image),
            restore: line(m, |s| s.restore_us, 0.0),
            copy: line(|s| s.image_bytes, |s| s.copy_us, 0.0),
            check_us: self.criu.check_us,
        };
        self.samples = samples;
    }

    /// Fits the live modes' costs to finished migrations' reports, on top
    /// of the CRIU terms, by least squares per phase. First CRIU's own
    /// dump, frozen and restore terms move to the reports' level: a real
    /// service under its inputs costs CRIU more than an idle synthetic one
    /// (the fixed costs come from the reports, the slopes stay the sweep's).
    pub fn fit_reports(&mut self, reports: &[Report]) {
        let done: Vec<&Report> = reports.iter().filter(|r| r.is_whole_migration()).collect();
        let through = |line: Line, points: Vec<(f64, f64)>| match points.len() {
            0 => line,
            n => Line {
                fixed: points.iter().map(|(m, y)| y - line.slope * m).sum::<f64>() / n as f64,
                slope: line.slope,
            },
        };
        let measured = |y: fn(&Report) -> u64| -> Vec<(f64, f64)> {
            done.iter()
                .filter(|r| y(r) > 0)
                .map(|r| (self.state_of(r), y(r) as f64))
                .collect()
        };
        let (dumps, frozen, restores) = (
            measured(|r| r.criu_dump_us),
            measured(|r| r.frozen_us),
            measured(|r| r.criu_restore_us),
        );
        self.criu_reports = dumps.len().max(restores.len());
        self.criu.dump = through(self.criu.dump, dumps);
        self.criu.frozen = through(self.criu.frozen, frozen);
        self.criu.restore = through(self.criu.restore, restores);
        for mode in [Mode::LeaveRunning, Mode::Standby] {
            let done: Vec<&Report> = reports
                .iter()
                .filter(|r| r.is_whole_migration() && r.mode == mode)
                .collect();
            if done.is_empty() {
                continue;
            }
            let c = &self.criu;
            let mean_of = |f: &dyn Fn(&Report) -> f64| {
                done.iter().map(|r| f(r)).sum::<f64>() / done.len() as f64
            };
            let line = |x: &dyn Fn(&Report) -> f64, y: &dyn Fn(&Report) -> f64, slope: f64| {
                let points: Vec<(f64, f64)> = done.iter().map(|r| (x(r), y(r))).collect();
                fit_line_or(&points, slope)
            };
            let m = |r: &Report| self.state_of(r);
            let costs = LiveCosts {
                reports: done.len(),
                prepare_us: mean_of(&|r| phase_us(r, Stage::Prepare)),
                checkpoint: line(
                    &|r| c.dump.at(m(r)),
                    &|r| phase_us(r, Stage::Checkpoint),
                    1.0,
                ),
                transfer: line(
                    &|r| r.image_bytes as f64,
                    &|r| phase_us(r, Stage::Transfer),
                    c.copy.slope,
                ),
                restore: line(
                    &|r| c.restore.at(m(r)),
                    &|r| phase_us(r, Stage::Restore) - replay_us(r),
                    1.0,
                ),
                replay_rate: mean_of(&|r| r.replay_rate),
                converge_us: mean_of(&|r| phase_us(r, Stage::Converge)),
                cutover_us: mean_of(&|r| phase_us(r, Stage::Cutover)),
                announce_us: mean_of(&|r| phase_us(r, Stage::Announce)),
                finish: line(&m, &|r| phase_us(r, Stage::Finish), 0.0),
            };
            match mode {
                Mode::LeaveRunning => self.leave_running = Some(costs),
                Mode::Standby => self.standby = Some(costs),
            }
        }
    }

    /// M of a migrated service, from its image size (Eq. 14 inverted).
    pub fn state_of(&self, report: &Report) -> f64 {
        let image = self.criu.image;
        if image.slope > 0.0 {
            ((report.image_bytes as f64 - image.fixed) / image.slope).max(0.0)
        } else {
            report.image_bytes as f64
        }
    }
}

/// A report's phase duration, µs (0 if it has none of that name).
pub fn phase_us(report: &Report, name: Stage) -> f64 {
    report
        .phases
        .iter()
        .find(|p| p.name == name)
        .map_or(0.0, |p| p.duration_us as f64)
}

/// The time the destination spent replaying, µs.
fn replay_us(report: &Report) -> f64 {
    if report.replay_rate > 0.0 {
        report.replayed as f64 / report.replay_rate * 1e6
    } else {
        0.0
    }
}

/// The relative error of `predicted` against `measured`, in percent.
pub fn error_pct(predicted: f64, measured: f64) -> f64 {
    (predicted - measured) / measured * 100.0
}

/// Phases of a report by name, µs.
pub fn phases(report: &Report) -> BTreeMap<String, f64> {
    report
        .phases
        .iter()
        .map(|p| (p.name.name().to_string(), p.duration_us as f64))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Phase;

    const MIB: f64 = 1048576.0;

    /// The lines a calibration on this host's kind of machine gives
    /// (µs, bytes): dump 80 ms + 0.9 ms/MiB, frozen 40 ms + 0.65 ms/MiB,
    /// image 200 KiB + M, copy 2 ms + 0.4 ms/MiB, restore 65 ms + 0.55 ms/MiB.
    fn calibration() -> Calibration {
        let per_mib = |ms: f64| ms * 1e3 / MIB;
        Calibration {
            criu: CriuCosts {
                dump: Line {
                    fixed: 80e3,
                    slope: per_mib(0.9),
                },
                frozen: Line {
                    fixed: 40e3,
                    slope: per_mib(0.65),
                },
                image: Line {
                    fixed: 200.0 * 1024.0,
                    slope: 1.0,
                },
                copy: Line {
                    fixed: 2e3,
                    slope: per_mib(0.4),
                },
                restore: Line {
                    fixed: 65e3,
                    slope: per_mib(0.55),
                },
                check_us: 0.0,
            },
            ..Calibration::default()
        }
    }

    fn work(mib: f64) -> Workload {
        Workload {
            state_bytes: mib * MIB,
            dirty_rate: 4.0 * 4096.0 * 1000.0,
            input_rate: 1000.0,
        }
    }

    #[test]
    fn a_line_is_recovered_from_noiseless_points_and_one_size_has_no_slope() {
        let line = fit_line(&[(1.0, 12.0), (16.0, 42.0), (64.0, 138.0)]).unwrap();
        assert!((line.fixed - 10.0).abs() < 1e-9 && (line.slope - 2.0).abs() < 1e-9);
        assert_eq!(fit_line(&[(4.0, 10.0), (4.0, 14.0)]), None);
        assert_eq!(fit_line(&[]), None);
        assert_eq!(
            fit_line_or(&[(4.0, 10.0), (4.0, 14.0)], 1.0),
            Line {
                fixed: 8.0,
                slope: 1.0
            }
        );
    }

    #[test]
    fn stop_and_copy_is_eq_6_and_pre_copy_without_tracking_is_one_dump_after_the_check() {
        let cal = calibration();
        let sc = cal.predict(Method::StopAndCopy, &work(16.0));
        // 80 + 14.4 = 94.4 ms dump, 2 + 0.4 * 16.2 copy, 65 + 8.8 restore.
        let copy = 2e3 + 0.4e3 * (16.0 + 200.0 / 1024.0);
        assert!((sc.total_us - (94.4e3 + copy + 73.8e3)).abs() < 1.0);
        assert!((sc.downtime_us - (50.4e3 + copy + 73.8e3)).abs() < 1.0);
        // Pre-copy asks FEATURE_CHECK first, then takes the same single dump.
        let checked = Calibration {
            criu: CriuCosts {
                check_us: 30e3,
                ..cal.criu.clone()
            },
            ..cal.clone()
        };
        let single = checked.predict(Method::PreCopy { rounds: 0 }, &work(16.0));
        assert_eq!(single.downtime_us, sc.downtime_us);
        assert!((single.total_us - sc.total_us - 30e3).abs() < 1e-6);
        assert_eq!(cal.precopy_rounds(&work(16.0), 5), 0, "no memory tracking");
    }

    #[test]
    fn pre_copy_rounds_shrink_the_downtime_of_a_slowly_dirtying_service() {
        let cal = Calibration {
            mem_track: true,
            ..calibration()
        };
        let w = Workload {
            dirty_rate: 1e6,
            ..work(256.0)
        };
        let rounds = cal.precopy_rounds(&w, 5);
        assert!(rounds >= 2, "{rounds}");
        let pre = cal.predict(Method::PreCopy { rounds }, &w);
        let sc = cal.predict(Method::StopAndCopy, &w);
        assert!(pre.downtime_us < sc.downtime_us);
        assert!(pre.total_us > sc.total_us, "the rounds cost migration time");
        // A service that dirties all of M within a round gains nothing:
        // one round, then the policy's no-gain stop.
        let hot = Workload {
            dirty_rate: 1e12,
            ..w
        };
        assert_eq!(cal.precopy_rounds(&hot, 5), 1);
    }

    /// A finished migration of `image_mib` MiB (D = M + 200 KiB, as
    /// `calibration()`'s image line has it) with these phases, and no
    /// replay figures: its replay stays in its restore phase.
    fn report(mode: Mode, image_mib: f64, phases: &[(Stage, u64)]) -> Report {
        Report {
            mode,
            state: crate::report::State::Done,
            image_bytes: ((image_mib * 1024.0 + 200.0) * 1024.0) as u64,
            phases: phases
                .iter()
                .map(|&(name, duration_us)| Phase {
                    name,
                    start_us: 0,
                    duration_us,
                })
                .collect(),
            total_us: phases.iter().map(|p| p.1).sum(),
            ..Report::default()
        }
    }

    /// One recorded run of `bench checkpoint` (README.md at 5c4cd39,
    /// standby mode): MiB, then checkpoint, transfer, restore and total in
    /// µs. The table gives no other phase: the rest of the total (prepare,
    /// converge, cutover, announce, finish together) goes in `finish`, the
    /// other phase the model fits against M.
    const RECORDED: [(f64, u64, u64, u64, u64); 3] = [
        (1.0, 105_000, 19_900, 67_700, 278_300),
        (16.0, 126_300, 90_900, 100_000, 406_200),
        (64.0, 138_700, 356_000, 129_700, 723_100),
    ];

    fn recorded(mib: f64) -> Report {
        let &(_, checkpoint, transfer, restore, total) =
            RECORDED.iter().find(|r| r.0 == mib).unwrap();
        report(
            Mode::Standby,
            mib,
            &[
                (Stage::Checkpoint, checkpoint),
                (Stage::Transfer, transfer),
                (Stage::Restore, restore),
                (Stage::Finish, total - checkpoint - transfer - restore),
            ],
        )
    }

    /// Fitted to the 1 and 64 MiB migrations of one recorded run, the model
    /// predicts the 16 MiB one of the same run, which it never saw. Tested
    /// on the reports it was fitted to, it could not fail: a line through
    /// two points passes through both, whatever it is a line in.
    #[test]
    fn live_costs_fitted_from_reports_predict_a_size_held_out() {
        let mut cal = calibration();
        cal.fit_reports(&[recorded(1.0), recorded(64.0)]);
        assert!(cal.leave_running.is_none());
        let live = cal.standby.clone().unwrap();
        assert_eq!(live.reports, 2);
        let held_out = recorded(16.0);
        let w = Workload {
            input_rate: 0.0,
            ..work(16.0)
        };
        let p = cal.predict(Method::Standby, &w);
        let err = error_pct(p.total_us, held_out.total_us as f64);
        // -5.4 % now; the benchmark holds the model to 20 %, this to 10 %.
        assert!(err.abs() < 10.0, "16 MiB held out: {err:.1}% {p:?}");
        // 19.9 ms for 1.2 MiB and 356 ms for 64.2 MiB: 5.3 ms per MiB.
        assert!((live.transfer.slope * MIB - 5335.0).abs() < 1.0, "{live:?}");
        assert_eq!(
            p.downtime_us, 0.0,
            "standby: the serving instance never stops"
        );
        // Leave-running borrows standby's costs, and its T_D is the checkpoint.
        let lr = cal.predict(Method::LeaveRunning, &work(16.0));
        assert_eq!(lr.downtime_us, lr.phases[1].1);
        // With a replay rate of 10k/s, 1 kHz of inputs add backlog / (10k -
        // 1k) per second to the restore.
        cal.standby.as_mut().unwrap().replay_rate = 10_000.0;
        let fast = cal.predict(Method::Standby, &work(16.0));
        let slow = cal.predict(Method::Standby, &w);
        let catch_up = fast.total_us - slow.total_us;
        let backlog_s = (fast.phases[1].1 + fast.phases[2].1 + slow.phases[3].1) / 1e6;
        assert!((catch_up - backlog_s * 1000.0 / 9000.0 * 1e6).abs() < 1.0);
    }

    #[test]
    fn reports_move_criu_fixed_costs_and_keep_the_sweeps_slopes() {
        let mut cal = calibration();
        let before = cal.criu.clone();
        // Reports without CRIU times leave the terms alone.
        cal.fit_reports(&[report(Mode::Standby, 1.0, &[(Stage::Checkpoint, 60_000)])]);
        assert_eq!(
            (cal.criu.dump, cal.criu.restore),
            (before.dump, before.restore)
        );
        assert_eq!(cal.criu_reports, 0);
        let timed = |image_mib: f64, dump_us: u64, restore_us: u64| Report {
            criu_dump_us: dump_us,
            criu_restore_us: restore_us,
            frozen_us: 9_000,
            ..report(Mode::Standby, image_mib, &[(Stage::Checkpoint, 60_000)])
        };
        let reports = [timed(1.0, 50_000, 47_000), timed(1.0, 52_000, 45_000)];
        cal.fit_reports(&reports);
        assert_eq!(cal.criu_reports, 2);
        let m = cal.state_of(&reports[0]);
        assert!(
            (cal.criu.dump.at(m) - 51_000.0).abs() < 1.0,
            "{:?}",
            cal.criu.dump
        );
        assert!((cal.criu.restore.at(m) - 46_000.0).abs() < 1.0);
        assert!((cal.criu.frozen.at(m) - 9_000.0).abs() < 1.0);
        assert_eq!(cal.criu.dump.slope, before.dump.slope);
        assert_eq!(cal.criu.restore.slope, before.restore.slope);
        // Fitting the same reports again changes nothing.
        let once = cal.criu.clone();
        cal.fit_reports(&reports);
        assert_eq!(cal.criu, once);
    }

    #[test]
    fn the_fit_is_saved_and_read_back() {
        let mut cal = calibration();
        cal.fit_samples(vec![
            Sample {
                state_bytes: MIB,
                image_bytes: 1.2 * MIB,
                dump_us: 81e3,
                frozen_us: 41e3,
                copy_us: 2.5e3,
                restore_us: 66e3,
            },
            Sample {
                state_bytes: 64.0 * MIB,
                image_bytes: 64.2 * MIB,
                dump_us: 138e3,
                frozen_us: 82e3,
                copy_us: 28e3,
                restore_us: 100e3,
            },
        ]);
        assert!((cal.criu.dump.at(MIB) - 81e3).abs() < 1e-6);
        assert!((cal.criu.image.slope - 1.0).abs() < 1e-9);
        let text = serde_json::to_string(&cal).unwrap();
        let back: Calibration = serde_json::from_str(&text).unwrap();
        assert_eq!(back.samples, cal.samples);
        // JSON keeps a float to within its last digit.
        let close = |a: Line, b: Line| {
            (a.fixed - b.fixed).abs() <= 1e-9 * b.fixed.abs()
                && (a.slope - b.slope).abs() <= 1e-9 * b.slope.abs()
        };
        assert!(close(back.criu.image, cal.criu.image) && close(back.criu.dump, cal.criu.dump));
    }
}
