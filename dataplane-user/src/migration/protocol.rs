//! The steps of a migration between the two daemons, source to destination,
//! each a JSON `MIGRATE` frame on the peer link answered by a `MIGRATED` one:
//!
//! ```text
//! source                                   destination
//!   | Prepare {migration, service,-------->  adopt the flows, hold their
//!   |     flows, deadline_ms,                mirrored inputs, mute outputs
//!   |     command, standby,
//!   |     container}
//!   |                             <--------  Prepared {mirror_mac, flow_ids}
//!   | (checkpoint at S, IMAGES frames) --->  images under images_dir
//!   | Restore {positions, cpus}   -------->  CRIU restore, replay S+1..
//!   |                             <--------  Restored {pid, replay_end, ..}
//!   | Outputs {after, count}      -------->  (repeated until N match)
//!   |                             <--------  [Output {flow_id, seq, payload}]
//!   | Watch {holder} (a hot replica ----->  watch the source; take the
//!   |   in sync; Outputs go on)              service over if it stops
//!   |                             <--------  Watching {failover_after_ms}
//!   | Arm {flows}                 -------->  output gate armed: opens at the
//!   |   flip; the source's kernel picks K    first input forwarded past K
//!   | Announce                    -------->  the service's addresses here
//!   | Finish                      -------->  keep and register the instance
//!   |                                        (and seed a standby)
//!   |                             <--------  Finished {pid, cpu}
//!   | Abort (any time before the flip) --->  roll back
//!
//!   | Attach {migration, service} ------->  a hot replica kept here since
//!   |   (a new link, in place of Prepare      its link went: back to
//!   |   .. Restore)                           comparing (Outputs, Watch, ..)
//!   |                             <--------  Prepared {mirror_mac, flow_ids}
//! ```
//!
//! Both modes (standby, leave-running) send the same steps in this order;
//! the destination takes them in no other ([`super::destination::State`]).
//! Every step after `Prepare` names flows by the ids the destination gave
//! them (`flow_ids`), which the source's mirror copies carry too: each host
//! numbers its own flow table.
use serde::{Deserialize, Serialize};

use crate::{
    migration::{converge::Answer, hold::FlowPosition},
    service::FlowSpec,
};

/// Records a migration may stage before the destination reads them.
pub const SUBSCRIPTION_CAPACITY: usize = 1 << 20;

/// One step the source asks of the destination.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    /// Adopt the service's flows under ids free here; hold their mirrored
    /// inputs in the log and mute the outputs.
    Prepare {
        migration: String,
        /// The service's name: the destination registers it under that
        /// name once it is handed over.
        service: String,
        flows: Vec<FlowSpec>,
        /// The source's `deadline_ms`: how long it may wait for
        /// convergence and for K. The destination's idle limit and its
        /// grace for an armed handover are derived from it.
        deadline_ms: u64,
        /// The command the source's daemon started the service with, if
        /// it did: the destination keeps it with the service, and makes
        /// the working directories such a service has on every host.
        #[serde(default)]
        command: Option<Vec<String>>,
        /// Whether the service has a standby on the source: the
        /// destination seeds one once it serves the service, if it runs
        /// standbys.
        #[serde(default)]
        standby: bool,
        /// The container the restore brings, if the instance runs as one:
        /// runc restores it here from this host's copy of its image.
        #[serde(default)]
        container: Option<crate::host::runc::Image>,
    },
    /// Take back the hot replica `migration` of `service` that this host
    /// kept after its link (or a daemon) went, as at `Restore`'s end:
    /// answered like `Prepare`. Only its own source may. `last_seq`: the
    /// last input the source had numbered; a replica that lacks one of
    /// them cannot go on.
    Attach {
        migration: String,
        service: String,
        last_seq: u64,
    },
    /// Restore the received images, confine the instance to `cpus` (the
    /// source instance's affinity; empty: leave it on CRIU's) and replay
    /// the inputs after `positions`.
    Restore {
        positions: Vec<FlowPosition>,
        #[serde(default)]
        cpus: Vec<usize>,
    },
    /// The next outputs answering inputs after `after`, at most `count`.
    Outputs {
        after: u64,
        count: usize,
        timeout_ms: u64,
    },
    /// A hot replica in sync: watch the source (whose MAC on the service
    /// network is `holder`), and take the service over should it stop
    /// (see [`super::failover`]). Until `arm` or `abort`.
    Watch { holder: [u8; 6] },
    /// Let outputs answering inputs above each flow's K leave. With
    /// `keep_replica`, the source keeps its instance as the destination's
    /// hot replica once the destination serves (see [`KeepReplica`]).
    Arm {
        flows: Vec<u32>,
        #[serde(default)]
        keep_replica: Option<KeepReplica>,
    },
    /// An adopted replica's inputs after its K, as the host that serves
    /// now numbered them: replayed into it, with the live mirror after
    /// them. Answered like `restore`.
    Feed { after: u64, inputs: Vec<FedInput> },
    /// Announce the service addresses from this host (gratuitous ARP).
    Announce,
    /// The migration is complete: keep the instance, drop the images.
    Finish,
    /// Roll back: kill the instance, forget the flows, drop the images.
    Abort,
}

impl Step {
    pub fn kind(&self) -> StepKind {
        match self {
            Step::Prepare { .. } => StepKind::Prepare,
            Step::Attach { .. } => StepKind::Attach,
            Step::Restore { .. } => StepKind::Restore,
            Step::Outputs { .. } => StepKind::Outputs,
            Step::Watch { .. } => StepKind::Watch,
            Step::Arm { .. } => StepKind::Arm,
            Step::Feed { .. } => StepKind::Feed,
            Step::Announce => StepKind::Announce,
            Step::Finish => StepKind::Finish,
            Step::Abort => StepKind::Abort,
        }
    }
}

/// What `arm` asks of a destination when the source keeps its instance
/// as the destination's hot replica: once it serves, attach to the
/// replica kept as `migration` on the source's peer link (its address as
/// this link comes from, at `port`), and feed it from K+1 on.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KeepReplica {
    pub migration: String,
    pub port: u16,
}

/// One input `feed` gives: its number, and the frame as it arrived (hex).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FedInput {
    pub seq: u64,
    pub timestamp_ns: u64,
    pub frame: String,
}

/// A flow the destination adopted, under its id there.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TargetFlow {
    pub flow_id: u32,
    #[serde(flatten)]
    pub spec: FlowSpec,
}

/// What `Restore` did.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Restored {
    pub pid: u32,
    /// CRIU's own restore time.
    pub restore_us: u64,
    /// From the request to the restored process running.
    pub restore_total_us: u64,
    /// Wall time of CRIU's restore request.
    #[serde(default)]
    pub criu_us: u64,
    pub replayed: u64,
    pub replay_us: u64,
    /// The last input the replay delivered; later ones came live.
    pub replay_end: u64,
}

/// What `Prepare` answers: where the source sends the migration's mirror
/// copies on the migration network, the MAC of the destination's
/// interface that takes them (its `mirror_from`), and the id each flow has
/// there, in the order `Prepare` named them.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Prepared {
    pub mirror_mac: [u8; 6],
    pub flow_ids: Vec<u32>,
    /// `Attach`: the replica's instance (`Prepare`: 0, none yet).
    #[serde(default)]
    pub pid: u32,
}

/// What `Finish` answers: the instance, and the CPU time this daemon and
/// the CRIU processes it reaped used since `Prepare`, µs.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Finished {
    pub pid: Option<u32>,
    pub daemon_cpu_us: u64,
    pub criu_cpu_us: u64,
}

/// What `Watch` answers: the time after which the destination takes the
/// service over from a silent source; 0: it does not (no failover there).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Watching {
    pub failover_after_ms: u64,
}

/// An output of the destination instance.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Output {
    pub flow_id: u32,
    /// The input it answers.
    pub seq: u64,
    /// Where it goes and what it says.
    #[serde(flatten)]
    pub answer: Answer,
}

/// A step of the protocol by its kind: a [`Step`], or the IMAGES transfer
/// (frames of its own, see [`crate::peer::transfer`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepKind {
    Prepare,
    Attach,
    Images,
    Restore,
    Outputs,
    Watch,
    Feed,
    Arm,
    Announce,
    Finish,
    Abort,
}

impl StepKind {
    pub const ALL: [StepKind; 11] = [
        StepKind::Prepare,
        StepKind::Attach,
        StepKind::Images,
        StepKind::Restore,
        StepKind::Outputs,
        StepKind::Watch,
        StepKind::Feed,
        StepKind::Arm,
        StepKind::Announce,
        StepKind::Finish,
        StepKind::Abort,
    ];

    /// Its name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            StepKind::Prepare => "prepare",
            StepKind::Attach => "attach",
            StepKind::Images => "images",
            StepKind::Restore => "restore",
            StepKind::Outputs => "outputs",
            StepKind::Watch => "watch",
            StepKind::Arm => "arm",
            StepKind::Feed => "feed",
            StepKind::Announce => "announce",
            StepKind::Finish => "finish",
            StepKind::Abort => "abort",
        }
    }
}

impl std::fmt::Display for StepKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
