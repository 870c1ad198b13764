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
    /// A hot replica's (`replica.start`): how it keeps up with the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<ReplicaStatus>,
    /// A handover to a hot replica: the replica's id. Such a handover runs
    /// no checkpoint: its phases are the last comparison and the cutover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_replica: Option<String>,
}

impl Report {
    /// A migration that ran whole, checkpoint to cutover, and handed over:
    /// the model's kind (a hot replica's life, or a handover to one, is not).
    pub fn is_whole_migration(&self) -> bool {
        self.state == State::Done && self.replica.is_none() && self.from_replica.is_none()
    }
}

/// How a hot replica keeps up with the service it replicates: its outputs
/// compared with the serving instance's, input by input.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub state: ReplicaState,
    /// Output pairs compared since the replica was (last) restored.
    pub compared: u64,
    /// The last input whose answers were compared.
    pub compared_up_to: u64,
    /// Inputs the serving host has numbered past `compared_up_to`.
    pub lag: u64,
    /// From the request (or the re-sync) to the replica first in sync, µs.
    pub sync_us: u64,
    /// Times the replica was restored afresh after it diverged or failed.
    pub resyncs: u32,
    /// Times this host attached to the replica again (no restore) after
    /// its link or a daemon went, and it matched again.
    #[serde(default)]
    pub reattached: u32,
    /// The first pair of outputs that differed, once it diverged: the
    /// input, and how they differ.
    pub mismatch: Option<String>,
    /// After how long a silence the replica's host takes the service
    /// over should this one stop, ms; 0: no failover (see
    /// `failover_after_ms`).
    #[serde(default)]
    pub failover_after_ms: u64,
}

/// Where a hot replica stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaState {
    /// Restoring, replaying, or comparing towards N matches in a row.
    #[default]
    Syncing,
    /// N outputs in a row matched and every later one has: a handover to
    /// it is a comparison and a cutover.
    InSync,
    /// An output differed after it was in sync: it is restored afresh.
    Diverged,
}

impl ReplicaState {
    pub fn name(self) -> &'static str {
        match self {
            ReplicaState::Syncing => "syncing",
            ReplicaState::InSync => "in sync",
            ReplicaState::Diverged => "diverged",
        }
    }
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
    /// A hot replica kept in sync until a handover to it or its stop.
    Replica,
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
            Stage::Replica => "replica",
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
    /// A hot replica ended on request (`replica.stop`): removed, the
    /// source serves.
    Stopped,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Done => "done",
            State::Failed => "failed",
            State::Stopped => "stopped",
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
