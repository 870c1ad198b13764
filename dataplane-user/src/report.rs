//! What a migration is asked for (its mode) and what it tells its
//! watchers: its report, phase by phase. Below `migration` and `planning`,
//! which both read reports.
use serde::{Deserialize, Serialize};

/// Which instance the checkpoint is taken of.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// The serving instance itself, left running after the dump: its
    /// frozen time (and the replay of the inputs held meanwhile) delays its
    /// outputs.
    #[default]
    LeaveRunning,
    /// A standby instance on this host, fed every input by the mirror since
    /// it started (gundall2022 Option 2): the serving instance never stops.
    Standby,
}

/// A migration's account: phases with their durations, and the figures.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub id: String,
    pub service: String,
    pub to: String,
    pub mode: Mode,
    pub state: State,
    /// The phase running now (or that failed).
    pub phase: Stage,
    pub phases: Vec<Phase>,
    /// The checkpoint position S.
    pub checkpoint_seq: u64,
    /// The handover point K: inputs above it are answered by the destination.
    pub handover_seq: u64,
    /// How long the checkpointed instance was frozen (CRIU), µs.
    pub frozen_us: u64,
    /// Wall time of CRIU's final dump on the source and of its restore on
    /// the destination, µs: CRIU's terms as this service and these hosts
    /// see them (`dataplane calibrate --from-reports` fits the model's
    /// fixed costs to them).
    #[serde(default)]
    pub criu_dump_us: u64,
    #[serde(default)]
    pub criu_restore_us: u64,
    /// Image bytes moved (the data volume D).
    pub image_bytes: u64,
    pub replayed: u64,
    pub replay_rate: f64,
    /// Output pairs compared before convergence.
    pub compared: u64,
    /// The flip's own duration, ns.
    pub flip_ns: u64,
    /// The instance on the destination.
    pub destination_pid: u32,
    pub total_us: u64,
    /// How long the serving instance's inputs were held (not delivered),
    /// µs: its downtime as the daemon sees it (leave-running: the hold, the
    /// dump and the replay; standby: none). The CPS sees this plus the
    /// handover's own gap.
    pub held_us: u64,
    /// CPU time the migration cost.
    pub load: Load,
    /// What the pre-dump rounds did, when they were asked for.
    pub pre_dump: Option<String>,
    pub error: Option<String>,
}

/// A migration's phases, in the order they run (`Done` after the last).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    #[default]
    Prepare,
    Checkpoint,
    Transfer,
    Restore,
    Converge,
    Cutover,
    Announce,
    Finish,
    Done,
}

impl Stage {
    /// The phase's name, as reports and predictions give it.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Prepare => "prepare",
            Stage::Checkpoint => "checkpoint",
            Stage::Transfer => "transfer",
            Stage::Restore => "restore",
            Stage::Converge => "converge",
            Stage::Cutover => "cutover",
            Stage::Announce => "announce",
            Stage::Finish => "finish",
            Stage::Done => "done",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a migration is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    #[default]
    Running,
    /// Handed over: the destination serves.
    Done,
    /// Rolled back: the source serves.
    Failed,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Done => "done",
            State::Failed => "failed",
        }
    }
}

/// CPU time used while a migration ran, µs: each daemon's own (all its
/// threads) and that of the CRIU processes it ran and reaped. The
/// destination's figures arrive with its answer to `finish`.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Load {
    pub source_daemon_us: u64,
    pub source_criu_us: u64,
    pub destination_daemon_us: u64,
    pub destination_criu_us: u64,
}

/// One timed phase, relative to the migration's start.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Phase {
    pub name: Stage,
    pub start_us: u64,
    pub duration_us: u64,
}
