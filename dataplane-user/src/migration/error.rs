//! Why a migration fails, on either side. The destination answers a step
//! that failed with the cause's text (it crosses the peer link as text);
//! the source wraps it as [`Cause::Destination`].
use std::{io, net::SocketAddr, ops::RangeInclusive, path::PathBuf};

use crate::{
    criu::CriuError,
    kernel::{
        injector::ReplayError,
        loader::LoadError,
        logs::{LogError, TapBusy},
    },
    migration::{
        MAX_DEADLINE_MS,
        converge::Mismatch,
        cutover::NoCutover,
        hold::{CheckpointError, HoldEnd, name_inputs},
        journal::JournalError,
        protocol::StepKind,
    },
    peer::PeerError,
    report::Stage,
};

/// A failed migration: the phase it failed in, and why.
#[derive(Debug, thiserror::Error)]
#[error("{phase}: {cause}")]
pub struct MigrationError {
    pub phase: Stage,
    pub cause: Cause,
}

impl MigrationError {
    /// Whether the destination answered that it took the service over
    /// (a hot replica's failover): this host must not serve it any more.
    pub fn taken_over(&self) -> bool {
        let taken = Cause::TakenOver.to_string();
        matches!(&self.cause,
            Cause::Destination(PeerError::StepFailed(why) | PeerError::Refused(why))
                if *why == taken)
    }
}

/// Why a migration (or one step of it on the destination) failed.
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    #[error("aborted on request")]
    Aborted,
    #[error("a migration moves 1 to 1024 flows ({0} given)")]
    FlowCount(usize),
    #[error("flow {0} is not loaded")]
    FlowNotLoaded(String),
    #[error("the destination's flow ids {given:?} are not one id for the service's {flows} flows")]
    FlowIds { given: Vec<u32>, flows: usize },
    #[error(
        "the service's flows are numbered apart here (ids {0:?}): register the service again \
         to join them"
    )]
    FlowsApart(Vec<u32>),
    #[error("flow {0} is not part of this migration")]
    ForeignFlow(u32),
    #[error("service {0} has no standby instance")]
    NoStandbyInstance(String),
    #[error("this daemon has no standby configured (standby_interface)")]
    NoStandbyConfigured,
    #[error("the standby's dataplane has no ingress program")]
    StandbyNotLoaded,
    #[error("this daemon does not read its logs")]
    NoLogs,
    #[error("this daemon has no peer interface (peer_interface): no mirror copies, no replay")]
    NoPeerInterface,
    #[error(
        "set net.ipv4.conf.{0}.arp_announce=2 on the destination: otherwise the restored \
         instance's first output announces the service address and takes the CPS's traffic \
         before the cutover"
    )]
    ArpAnnounce(String),
    #[error(
        "set net.ipv4.conf.{0}.arp_ignore=1 on the destination: otherwise it answers ARP for \
         the service address, which it holds from prepare on, and takes the CPS's traffic \
         before the cutover"
    )]
    ArpIgnore(String),
    #[error("making the service address {address} this host's (on lo) for the restore: {source}")]
    LocalAddress {
        address: std::net::IpAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Kernel(#[from] LoadError),
    #[error(transparent)]
    LogBusy(#[from] TapBusy),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("peer {to}: {source}")]
    Connect { to: SocketAddr, source: PeerError },
    /// The link to the destination broke, or a step failed there.
    #[error("destination: {0}")]
    Destination(PeerError),
    #[error("destination's answer: {0}")]
    Answer(serde_json::Error),
    #[error("process {pid}: {source}")]
    Netns { pid: u32, source: io::Error },
    #[error("process {0} is not the one registered (it ended, or its pid was reused)")]
    NotRegistered(u32),
    #[error("pre-dump: {0}")]
    PreDump(CriuError),
    #[error("dump: {0}")]
    Dump(CriuError),
    #[error(transparent)]
    Hold(#[from] CheckpointError),
    #[error(transparent)]
    HoldEnded(#[from] HoldEnd),
    #[error(
        "giving the held inputs back: {error}{}",
        lost.as_ref().map(|r| format!("; {} did not reach the instance", name_inputs(r))).unwrap_or_default()
    )]
    Resume {
        error: ResumeError,
        /// Held inputs the gate opened over.
        lost: Option<RangeInclusive<u64>>,
    },
    #[error(transparent)]
    NotConverged(#[from] NotConverged),
    #[error("the output log reader fell behind")]
    OutputsLost,
    #[error(transparent)]
    NoCutover(#[from] NoCutover),
    #[error("handed over at K = {0}: inputs above K keep going to the destination")]
    HandedOver(u64),
    #[error("the hot replica diverged: outputs for input {seq} differ: {why}")]
    Diverged { seq: u64, why: Mismatch },
    #[error("the handover to the hot replica failed, and the replica went with it: {0}")]
    HandoverFailed(String),
    // The destination's own causes.
    #[error("not a migration step: {0}")]
    NotAStep(serde_json::Error),
    /// A step the destination's state does not take now (see
    /// `destination::State`): what it is, and what it expects.
    #[error("{step} out of order: {state}; expected {expected}")]
    OutOfOrder {
        step: StepKind,
        state: &'static str,
        expected: String,
    },
    #[error("images of migration {sent}, but migration {prepared} is prepared on this link")]
    OtherImages { prepared: String, sent: String },
    #[error("bad migration name: {0}")]
    Name(PeerError),
    #[error("migration id {0:?} names an entry of images_dir (journal, outgoing, *.partial)")]
    ReservedName(String),
    #[error("deadline_ms must be 1 to {MAX_DEADLINE_MS}, not {0}")]
    Deadline(u64),
    #[error(transparent)]
    ServiceName(#[from] crate::service::NotPlainName),
    #[error("a service named {0} is registered on this host already")]
    ServiceHere(String),
    #[error("this host takes no mirror copies (no peer_interface or mirror_from configured)")]
    NoMirrorInterface,
    #[error("this host's interface on the migration network, {0}, is down (or has no carrier)")]
    MigrationNetworkDown(String),
    #[error("the standbys' place: {0}")]
    Standby(crate::standby::StandbyError),
    #[error("the service's working directory {}: {source}", path.display())]
    WorkingDirectory {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "flow {flow} (id {id}) is on this host already: a migration adopts only a flow this host does not have"
    )]
    FlowPresent { flow: String, id: u32 },
    #[error("flow {0} of the migration is not armed: arm names every flow of it")]
    NotArmed(u32),
    #[error("the service is handed over (an output gate opened past K): this host serves it")]
    ServingHere,
    #[error("the source went silent on both networks and this host took the service over")]
    TakenOver,
    #[error("no hot replica {0} is kept here to attach to (it was rolled back, or never in sync)")]
    NoReplica(String),
    #[error("the hot replica {0} kept here is another host's (or another service's)")]
    NotYourReplica(String),
    #[error(
        "the instance lacks input {0}: its mirror copy was lost (the migration network dropped \
         it)"
    )]
    ReplicaMissed(u64),
    #[error("feed: no replica adopted here waits for these inputs")]
    NotAdopted,
    #[error("feed: input {0} is not a hex frame")]
    NotHex(u64),
    #[error("input {0} is not in this host's log within 1 s: the adopted replica cannot be fed")]
    NotFed(u64),
    #[error("one flow position expected")]
    OnePosition,
    #[error("no images at {}", .0.display())]
    NoImages(PathBuf),
    #[error("opening this host's network namespace: {0}")]
    HostNetns(io::Error),
    #[error("restore: {0}")]
    Restore(CriuError),
    #[error("restore task: {0}")]
    RestoreTask(tokio::task::JoinError),
    #[error("container: {0}")]
    Container(#[from] crate::host::runc::ContainerError),
    #[error("a container {0} is already on this host (runc list)")]
    ContainerHere(String),
    #[error(transparent)]
    Injector(#[from] ReplayError),
    #[error("the restored instance {pid} {how} during {during}")]
    InstanceEnded {
        pid: u32,
        how: InstanceEnd,
        during: &'static str,
    },
    #[error("replay: {0}")]
    Replay(CheckpointError),
    #[error("the instance is not restored and replayed yet")]
    NotReplayed,
    #[error(transparent)]
    Announce(#[from] crate::host::netdev::AnnounceError),
}

/// How a restored instance ended before its migration did.
#[derive(Debug, thiserror::Error)]
pub enum InstanceEnd {
    #[error("exited with status {0}")]
    Exited(i32),
    #[error("was killed by {0}")]
    Killed(nix::sys::signal::Signal),
    #[error("changed state ({0})")]
    Changed(String),
    #[error("is gone ({0})")]
    Gone(nix::Error),
}

/// Why the held inputs could not be given back to the checkpointed instance.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error("entering {}: {source}", path.display())]
    Netns { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Injector(#[from] ReplayError),
    #[error("starting the replay's runtime: {0}")]
    Runtime(io::Error),
    #[error(transparent)]
    Replay(#[from] CheckpointError),
    #[error("the replay thread panicked")]
    Panicked,
}

/// The outputs did not converge before the deadline; how far each side got.
#[derive(Debug, thiserror::Error)]
#[error(
    "no {needed} matching outputs in a row within {deadline_ms} ms ({compared} compared; the \
     destination answered up to input {destination_up_to}, the source's log holds answers up \
     to {source_up_to}){}",
    last_mismatch.as_ref().map(|(seq, why)| format!("; last mismatch: outputs for input {seq}: {why}")).unwrap_or_default()
)]
pub struct NotConverged {
    pub needed: u32,
    pub deadline_ms: u64,
    pub compared: u64,
    pub destination_up_to: u64,
    pub source_up_to: u64,
    pub last_mismatch: Option<(u64, Mismatch)>,
}
