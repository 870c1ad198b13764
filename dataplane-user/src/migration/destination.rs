//! The destination's side of a migration, one step per `MIGRATE` frame from
//! the source daemon, each answered by a `MIGRATED` frame.
//!
//! The steps are taken in the order the source sends them and no other
//! ([`State`]): a step out of order, or repeated, is refused with an error
//! naming the step expected, and changes nothing. Checkpoint images are
//! taken only for the migration prepared on the link, in its turn, and
//! within the host's quota ([`Limits`]).
//!
//! The destination's state lives as long as the peer link: if the link
//! breaks before `Finish` (the source daemon died, the network did), or no
//! step comes for the idle limit, the destination rolls back on its own:
//! the restored instance is killed, the flows it adopted are removed, and
//! the images are deleted. Unless the source had already handed the
//! service over (an output gate opened at the first input forwarded past
//! K): then this host keeps serving and announces the service address
//! itself. An armed gate is waited for as long as the source may still
//! pick K (its deadline, see [`armed_grace`]).
//!
//! A journal says what to undo or keep should this daemon die
//! mid-migration; [`recover`] acts on it at the next start.
use std::{
    collections::VecDeque,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use dataplane_common::{
    FlowKey, GATE_HOLD_ALL, GATE_SEQUENCED, OUTPUT_ARMED, OUTPUT_FROM, OUTPUT_MUTE, RECORD_OUTPUT,
    RecordHeader,
};
use serde::Serialize;

use crate::{
    criu::{RestoreRequest, open_netns, stats},
    host::{runc, tasks::Identity},
    kernel::{
        flow,
        injector::Injector,
        loader::Dataplane,
        logs::{LogGuard, Record, Records, Subscription},
    },
    migration::{
        MAX_DEADLINE_MS,
        error::{Cause, InstanceEnd},
        failover::{Watch, Watched},
        hold,
        hold::FlowPosition,
        journal::{Files, Incoming, Journal, ReplicaHere, Side},
        protocol::{
            FedInput, Finished, Output, Prepared, Restored, SUBSCRIPTION_CAPACITY, Step, StepKind,
            TargetFlow, Watching,
        },
        seed::StandbyRequest,
    },
    peer::{
        Link, MAX_FRAME, PeerError, frame,
        transfer::{self, Quota},
    },
    registry::Registry,
    service::{FlowSpec, Service},
};

/// What the destination works with on this host.
#[derive(Clone)]
pub struct Host {
    /// Where received checkpoint images and the journals go.
    pub files: Files,
    /// The pinned dataplane, whose ingress program replays inputs.
    pub pin_root: PathBuf,
    /// The service-facing interface, where a migrated service's addresses are announced.
    pub interface: String,
    /// The interface replayed inputs arrive on, as mirror copies do.
    pub peer_interface: Option<String>,
    /// The one interface this host takes mirror copies on (`mirror_from`,
    /// by default the peer interface): its MAC is where a source sends them.
    pub mirror_from: Option<String>,
    /// Restores migrated services.
    pub criu: crate::criu::Criu,
    /// Restores migrated containers, and keeps them.
    pub containers: crate::host::container::Containers,
    /// The daemon's readers of the input and output logs.
    pub inputs: Option<Arc<crate::kernel::logs::Tap>>,
    pub outputs: Option<Arc<crate::kernel::logs::Tap>>,
    pub limits: Limits,
    /// The services this host knows: one handed over here joins them.
    pub services: Arc<Registry>,
    /// Where the services a daemon started run (`services_dir`).
    pub services_dir: PathBuf,
    /// Where a service handed over here that had a standby on its source
    /// gets one here (see [`super::seed`]).
    pub standby_requests: tokio::sync::mpsc::UnboundedSender<StandbyRequest>,
    /// Turns true when the daemon stops: a link then ends before its next
    /// step, and the migration on it rolls back (or, handed over, keeps
    /// serving) as when the link drops.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// After how long a silent source a hot replica held here takes its
    /// service over (`failover_after_ms`; zero: never).
    pub failover_after: Duration,
    /// The takeovers this host made, for `status`.
    pub takeovers: Arc<std::sync::Mutex<Vec<super::failover::Takeover>>>,
    /// Hot replicas in sync whose link went, by migration id, kept for
    /// their source to attach again ([`park`]).
    pub parked: Arc<std::sync::Mutex<std::collections::BTreeMap<String, Parked>>>,
    /// Where a handover whose source kept its instance asks the daemon to
    /// make it this host's hot replica ([`Adoption`]).
    pub adoptions: tokio::sync::mpsc::UnboundedSender<Adoption>,
    /// Where this daemon's peer link listens (a replica it keeps is
    /// attached to there).
    pub peer_listen: SocketAddr,
}

/// The instance a handover's source kept, to be this host's hot replica
/// of `service` now that this host serves it: attached to as `migration`
/// on the source's peer link at `to`, and fed every input after K
/// (`after`), starting with this host's `inputs` since `arm`.
pub struct Adoption {
    pub service: String,
    pub to: SocketAddr,
    pub migration: String,
    pub after: u64,
    pub inputs: Subscription,
}

/// What a handover's source keeps of its instance as the new serving
/// host's hot replica (see [`adopt`]).
pub struct Adopted {
    pub migration: String,
    /// As a journal of a replica here records it.
    pub incoming: Incoming,
    /// The handover's K: the replica is fed from K+1.
    pub after: u64,
    /// The service's inputs and outputs here, as the handover read them.
    pub logs: (Subscription, Subscription),
}

/// Parks the instance a handover's source kept (its outputs muted, its
/// inputs held past K) as the hot replica of the host it handed over to,
/// for that host to attach to and feed ([`Target::feed`]).
pub fn adopt(host: &Arc<Host>, adopted: Adopted) -> Result<(), String> {
    let Adopted {
        migration,
        incoming,
        after,
        logs,
    } = adopted;
    let mut target = Target::kept(host, migration, &incoming, Some(logs))?;
    target.fed_after = Some(after);
    target.write_journal().map_err(|e| e.to_string())?;
    park(target);
    Ok(())
}

impl Host {
    /// Whether a watch on this host took `service` over.
    fn took_over(&self, service: &str) -> bool {
        let takeovers = self.takeovers.lock().unwrap();
        takeovers.iter().any(|t| t.service == service)
    }
}

/// Registers the instance `pid` that this host kept as service `name`
/// fed by `flows` (started with `command`, if a daemon started it); a
/// registry that cannot take it is logged: the service runs here all the
/// same.
fn register(
    services: &Registry,
    name: &str,
    pid: u32,
    flows: &[TargetFlow],
    command: Option<Vec<String>>,
    runtime: Option<crate::service::Runtime>,
) {
    let service = Service {
        name: name.to_string(),
        pid,
        netns: None,
        flows: flows.iter().map(|f| f.spec).collect(),
        standby_pid: None,
        command,
        // Its runtime knows it here under the service's name.
        container: runtime.map(|_| name.to_string()),
        standby_container: None,
        runtime: runtime.unwrap_or_default(),
        registered: Identity::of(pid).into_iter().collect(),
    };
    match services.insert(service) {
        Ok(()) => tracing::info!(service = %name, pid, "registered the service this host kept"),
        Err(e) => tracing::warn!(service = %name, pid, "registering the service: {e}"),
    }
}

/// How the service a migration brings was started: the command its
/// daemon started it with, if it did, and whether it had a standby.
pub struct Started {
    pub command: Option<Vec<String>>,
    pub standby: bool,
    /// The container it runs as, if it does.
    pub container: Option<runc::Image>,
}

/// What one migration to this host may take.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Its checkpoint images (`images_max_files`, `images_max_mib`).
    pub images: Quota,
    /// How long a prepared migration may go without a step
    /// (`migration_idle_s`): at least the source's deadline and
    /// [`HANDOVER_MARGIN`] ([`Target::idle`]). It covers the source's
    /// checkpoint, which no deadline bounds.
    pub idle: Duration,
}

/// Serves one admitted peer link: pings, checkpoint images, and the steps
/// of a migration to this host, which lives as long as the link.
pub async fn serve_link(
    mut link: Link,
    from: SocketAddr,
    host: Arc<Host>,
) -> Result<(), PeerError> {
    let mut target: Option<Target> = None;
    let served = serve_frames(&mut link, from, &host, &mut target).await;
    if *host.stopping.borrow() {
        // The daemon stops: dropping the target undoes it at once (an
        // armed one is left to the journal's recovery at the next start).
        drop(target);
    } else if let Some(target) = target.take() {
        // The link is gone, or idle too long, before Finish or Abort.
        without_source(target).await;
    }
    served
}

/// Ends, or keeps, a migration whose source is gone from its link: a hot
/// replica in sync is parked for its source to attach again; any other
/// settles alone.
async fn without_source(mut target: Target) {
    if target.parkable() {
        park(target);
    } else {
        target.settle_alone().await;
    }
}

/// How long a hot replica whose link went stays parked for its source to
/// attach again: a daemon restart on either side, or a migration network
/// cut this long, costs the replica nothing.
pub const PARKED_FOR: Duration = Duration::from_secs(30);

/// Ends when the watch of `target` (a hot replica's) takes the service
/// over; never without one.
fn taken_over(target: Option<&Target>) -> impl Future<Output = ()> + use<> {
    let takeover = target
        .and_then(|t| t.watch.as_ref())
        .map(Watch::on_takeover);
    async {
        match takeover {
            Some(takeover) => takeover.await,
            None => std::future::pending().await,
        }
    }
}

/// Fed inputs, then what the log brings.
struct Fed<'a> {
    fed: VecDeque<Record>,
    log: &'a mut Subscription,
}

impl Records for Fed<'_> {
    fn try_next(&mut self) -> Option<Record> {
        self.fed.pop_front().or_else(|| self.log.try_next())
    }
    async fn next(&mut self) -> Option<Record> {
        match self.fed.pop_front() {
            Some(record) => Some(record),
            None => self.log.next().await,
        }
    }
}

/// How long a replica's gate may wait for an input it lacks before the
/// input counts as lost (see [`Target::whole`]).
const GAP_SETTLES: Duration = Duration::from_millis(20);

/// A parked hot replica: whose it is, and how to claim it.
pub struct Parked {
    service: String,
    source: IpAddr,
    claim: tokio::sync::oneshot::Sender<tokio::sync::oneshot::Sender<Target>>,
}

/// Keeps the hot replica `target` (in sync; its link went) for its source
/// to attach again, [`PARKED_FOR`] at most. Its instance, flows and watch
/// run on meanwhile: the watch may take the service over. Unclaimed, it
/// rolls back; a daemon that stops leaves it to its next start.
fn park(mut target: Target) {
    use tokio::sync::oneshot;
    let host = target.host.clone();
    let id = target.migration.clone();
    let (claim, mut claimed) = oneshot::channel();
    let parked = Parked {
        service: target.service.clone(),
        source: target.source,
        claim,
    };
    host.parked.lock().unwrap().insert(id.clone(), parked);
    tracing::info!(migration = %id, "hot replica without its source's link: kept for it to attach again");
    let mut stopping = host.stopping.clone();
    tokio::spawn(async move {
        enum End {
            Claimed(oneshot::Sender<Target>),
            TakenOver,
            Stopping,
            Expired,
        }
        let taken_over = taken_over(Some(&target));
        let end = tokio::select! {
            biased;
            Ok(reply) = &mut claimed => End::Claimed(reply),
            () = taken_over => End::TakenOver,
            Ok(_) = stopping.wait_for(|stop| *stop) => End::Stopping,
            () = tokio::time::sleep(PARKED_FOR) => End::Expired,
        };
        // Claimed meanwhile: the claimer has taken it off the table.
        let end = match end {
            End::Claimed(_) => end,
            _ if host.parked.lock().unwrap().remove(&id).is_none() => match claimed.await {
                Ok(reply) => End::Claimed(reply),
                Err(_) => end,
            },
            _ => end,
        };
        match end {
            End::Claimed(reply) => {
                if let Err(target) = reply.send(target) {
                    park(target);
                }
            }
            End::TakenOver => target.keep(),
            End::Stopping => drop(target),
            End::Expired => {
                tracing::warn!(migration = %id,
                    "no source attached to the hot replica within {PARKED_FOR:?}: rolling back");
                target.rollback();
            }
        }
    });
}

/// Takes the parked hot replica `migration` of `service` for the source
/// at `source` that attaches to it again, having numbered inputs up to
/// `sent`: one that lacks any of them is rolled back.
async fn claim(
    host: &Host,
    source: IpAddr,
    migration: &str,
    service: &str,
    sent: u64,
) -> Result<Target, Cause> {
    let gone = || Cause::NoReplica(migration.to_string());
    if host.took_over(service) && host.services.contains(service) {
        return Err(Cause::TakenOver);
    }
    let parked = {
        let mut parked = host.parked.lock().unwrap();
        match parked.get(migration) {
            Some(p) if p.service == service && p.source == source => parked.remove(migration),
            Some(_) => return Err(Cause::NotYourReplica(migration.to_string())),
            None => None,
        }
    };
    let parked = parked.ok_or_else(gone)?;
    let (reply, replied) = tokio::sync::oneshot::channel();
    parked.claim.send(reply).map_err(|_| gone())?;
    let mut target = replied.await.map_err(|_| gone())?;
    // The mirror copies it got while parked may lack some (a cut
    // migration network drops them): then it cannot go on.
    if target.fed_after.is_none()
        && let Err(e) = target.whole(sent).await
    {
        target.rollback();
        return Err(e);
    }
    target.state = State::Restored;
    target.last_step = tokio::time::Instant::now();
    Ok(target)
}

/// Parks the hot replica `migration` that a stopped (or dead) run of this
/// daemon held, as its journal says, for its source to attach again; one
/// that cannot go on (its instance or flows gone) is rolled back. What
/// was done, as text.
pub fn resume_replica(host: &Arc<Host>, migration: String, incoming: &Incoming) -> String {
    match Target::resumed(host, migration.clone(), incoming) {
        Ok(target) => {
            park(target);
            "a hot replica in sync: kept for its source to attach again".into()
        }
        Err(why) => {
            host.files.remove(Side::Destination, &migration);
            let outcome = recover(
                &host.pin_root,
                &host.interface,
                &host.services,
                &host.containers,
                incoming,
            );
            format!("a hot replica that cannot go on ({why}): {outcome}")
        }
    }
}

/// The frames of one link, until it closes, the migration on it
/// (`target`) idles past its limit, or the daemon stops.
async fn serve_frames(
    link: &mut Link,
    from: SocketAddr,
    host: &Arc<Host>,
    target: &mut Option<Target>,
) -> Result<(), PeerError> {
    let mut stopping = host.stopping.clone();
    loop {
        // A prepared migration may idle so long, and then rolls back.
        let idle_until = target.as_ref().map(Target::idle_until);
        let next = async {
            match idle_until {
                Some(until) => tokio::time::timeout_at(until, link.recv(MAX_FRAME))
                    .await
                    .ok(),
                None => Some(link.recv(MAX_FRAME).await),
            }
        };
        // A hot replica's watch may take the service over meanwhile.
        let taken_over = taken_over(target.as_ref());
        let received = tokio::select! {
            biased;
            Ok(_) = stopping.wait_for(|stop| *stop) => {
                tracing::info!(%from, "the daemon stops: peer link closed");
                return Ok(());
            }
            () = taken_over => None,
            next = next => Some(next),
        };
        let Some(received) = received else {
            // Taken over: the service is this host's; the source, should
            // it speak again, hears so.
            if let Some(mut taken) = target.take() {
                taken.keep();
            }
            let why = Cause::TakenOver.to_string();
            let _ = link.send(frame::REFUSE, why.as_bytes()).await;
            return Ok(());
        };
        if let Some(watch) = target.as_ref().and_then(|t| t.watch.as_ref()) {
            watch.heard();
        }
        let Some(received) = received else {
            // Only a prepared migration has an idle limit.
            let why = target
                .as_ref()
                .map(|t| {
                    format!(
                        "migration {}: no step for {:.1} s: rolling back",
                        t.migration,
                        t.idle().as_secs_f64()
                    )
                })
                .unwrap_or_default();
            tracing::warn!(%from, "{why}");
            // Settled before the source hears of it: what it reads after
            // the refusal is a host with the migration gone (or parked).
            if let Some(target) = target.take() {
                without_source(target).await;
            }
            let _ = link.send(frame::REFUSE, why.as_bytes()).await;
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, why).into());
        };
        let (kind, payload) = match received {
            Ok(frame) => frame,
            Err(PeerError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                tracing::info!(%from, "peer link closed by the peer");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        match kind {
            frame::PING => link.send(frame::PONG, &[]).await?,
            frame::IMAGES => {
                let received = receive_images(link, &payload, host, target.as_mut()).await;
                if let Ok(r) = &received {
                    tracing::info!(%from, migration = %r.migration, files = r.files,
                        bytes = r.bytes, "received checkpoint images");
                }
                answer(link, from, received, frame::IMAGES_OK).await?;
            }
            frame::MIGRATE => {
                let outcome = match serde_json::from_slice::<Step>(&payload) {
                    Err(e) => Err(Cause::NotAStep(e)),
                    Ok(step) => run_step(host, target, from, step).await,
                };
                let answer = match outcome {
                    Ok(ok) => serde_json::json!({ "ok": ok }),
                    Err(error) => {
                        tracing::warn!(%from, "migration step refused or failed: {error}");
                        serde_json::json!({ "error": error.to_string() })
                    }
                };
                let answer = serde_json::to_vec(&answer).expect("serializes");
                link.send(frame::MIGRATED, &answer).await?;
                // A finished migration is kept once its source has the
                // answer: registering the service writes the registry to
                // disk (an fsync, tens of ms), which the source's T_M need
                // not wait for. Its journal covers a daemon that dies
                // between the two.
                if let Some(mut finished) = target.take_if(|t| t.state == State::Idle) {
                    finished.keep();
                }
            }
            other => {
                let reason = format!("unexpected frame type {other}");
                let _ = link.send(frame::REFUSE, reason.as_bytes()).await;
                return Err(PeerError::Garbage(reason));
            }
        }
    }
}

/// Runs `step` if the migration on this link (`target`; none before
/// `Prepare`) takes it in its state, and moves it on: to the next state,
/// or to [`State::Failed`] if the step failed. A step out of order is
/// refused and changes nothing.
async fn run_step(
    host: &Arc<Host>,
    target: &mut Option<Target>,
    from: SocketAddr,
    step: Step,
) -> Result<serde_json::Value, Cause> {
    let kind = step.kind();
    let state = target.as_ref().map_or(State::Idle, |t| t.state);
    let next = state.after(kind).ok_or_else(|| state.refuse(kind))?;
    let Some(t) = target.as_mut() else {
        if let Step::Attach {
            migration,
            service,
            last_seq,
        } = step
        {
            tracing::info!(%from, %migration, %service, "the source attaches to its hot replica again");
            let attached = claim(host, from.ip(), &migration, &service, last_seq).await?;
            let answer = attached.prepared();
            *target = Some(attached);
            return Ok(serde_json::to_value(answer).expect("serializes"));
        }
        let Step::Prepare {
            migration,
            service,
            flows,
            deadline_ms,
            command,
            standby,
            container,
        } = step
        else {
            return Err(state.refuse(kind));
        };
        tracing::info!(%from, %migration, %service, deadline_ms,
            "preparing a migration to this host");
        let prepared = Target::prepare(
            host,
            from.ip(),
            migration,
            service,
            flows,
            deadline_ms,
            Started {
                command,
                standby,
                container,
            },
        )?;
        let answer = prepared.prepared();
        *target = Some(prepared);
        return Ok(serde_json::to_value(answer).expect("serializes"));
    };
    t.admit(kind)?;
    let outcome = t.step(step).await;
    t.last_step = tokio::time::Instant::now();
    match (&outcome, next) {
        // Finished: kept once answered, then the link may prepare another.
        (Ok(_), State::Idle) if kind == StepKind::Finish => t.state = State::Idle,
        // Rolled back: the link may prepare another.
        (Ok(_), State::Idle) => *target = None,
        (Ok(_), next) => t.state = next,
        // A refused abort (the service is handed over) changes nothing.
        (Err(_), _) if kind == StepKind::Abort => {}
        (Err(_), _) => t.state = State::Failed,
    }
    outcome
}

/// Receives the images of the migration prepared on this link, in its turn
/// and within the host's quota; any other transfer is read to its end
/// (none of it kept) and refused.
async fn receive_images(
    link: &mut Link,
    begin: &[u8],
    host: &Host,
    target: Option<&mut Target>,
) -> Result<transfer::Received, String> {
    let migration = transfer::parse_begin(begin).map_err(|e| e.to_string());
    let state = target.as_ref().map_or(State::Idle, |t| t.state);
    let admitted = migration.and_then(|id| match target {
        Some(t) if t.migration != id => Err(Cause::OtherImages {
            prepared: t.migration.clone(),
            sent: id,
        }
        .to_string()),
        Some(t) if state.after(StepKind::Images).is_some() => Ok((t, id)),
        _ => Err(state.refuse(StepKind::Images).to_string()),
    });
    let (t, id) = match admitted {
        Ok(admitted) => admitted,
        Err(why) => {
            transfer::skip(link).await.map_err(|e| e.to_string())?;
            return Err(why);
        }
    };
    let received = transfer::receive(link, &id, host.files.incoming_root(), host.limits.images)
        .await
        .map_err(|e| e.to_string());
    t.last_step = tokio::time::Instant::now();
    t.state = match received {
        Ok(_) => State::Received,
        Err(_) => State::Failed,
    };
    received
}

/// Answers a request that moved data: its receipt in an `ok_kind` frame,
/// or a `REFUSE` with the reason. The link stays up after a refusal (the
/// transfer was read to its end): the source then aborts on it.
async fn answer<T: Serialize>(
    link: &mut Link,
    from: SocketAddr,
    outcome: Result<T, String>,
    ok_kind: u8,
) -> Result<(), PeerError> {
    match outcome {
        Ok(receipt) => {
            let ok = serde_json::to_vec(&receipt).expect("serializes");
            link.send(ok_kind, &ok).await
        }
        Err(e) => {
            tracing::warn!(%from, "refused: {e}");
            link.send(frame::REFUSE, e.as_bytes()).await
        }
    }
}

/// A migration in progress on the destination.
pub struct Target {
    host: Arc<Host>,
    dataplane: Dataplane,
    migration: String,
    /// The service's name, under which this host registers it.
    service: String,
    /// How it was started, kept with it.
    started: Started,
    /// The MAC of the interface this host takes the migration's mirror
    /// copies on: the source sends them there.
    mirror_mac: [u8; 6],
    flows: Vec<TargetFlow>,
    /// Where it stands: the step it takes next.
    state: State,
    /// The source's deadline.
    deadline: Duration,
    /// When the last step was answered (for the idle limit).
    last_step: tokio::time::Instant,
    inputs: Subscription,
    outputs: Subscription,
    /// Whether the input log failed a mirrored input: the replay needs them all.
    log: LogGuard,
    instance: Option<u32>,
    /// The service addresses this migration made local (on lo): a
    /// rollback takes them off again.
    local_addresses: Vec<IpAddr>,
    finished: bool,
    /// CPU time used when `Prepare` came.
    cpu: crate::host::tasks::CpuTime,
    /// A hot replica's watch of its source, from `Watch` to `Arm` or `Abort`.
    watch: Option<Watch>,
    /// The address the source's daemon links from.
    source: IpAddr,
    /// Set at `Watch`: a hot replica in sync, which outlives its link and
    /// this daemon's restart (see [`park`]).
    replica: Option<ReplicaHere>,
    /// The restored instance as it was restored: a restarted daemon finds
    /// it no child of its own.
    identity: Option<Identity>,
    /// The input the instance's gate has waited for since when, while
    /// later ones were numbered ([`Target::check_gap`]).
    waiting: Option<(u64, Instant)>,
    /// Set at `arm` when the source keeps its instance as this host's hot
    /// replica: where to attach to it (its peer link, its id there).
    keep: Option<(SocketAddr, String)>,
    /// A replica adopted from the instance a handover left (see
    /// [`adopt`]): the K after which `feed` gives it its inputs.
    fed_after: Option<u64>,
}

impl Target {
    /// Handles `Prepare`. Nothing is adopted unless every check passes.
    pub fn prepare(
        host: &Arc<Host>,
        source: IpAddr,
        migration: String,
        service: String,
        flows: Vec<FlowSpec>,
        deadline_ms: u64,
        started: Started,
    ) -> Result<Self, Cause> {
        transfer::plain_name(&migration).map_err(Cause::Name)?;
        crate::service::service_name(&service)?;
        // Once handed over it is registered here, under its name; taken
        // over, its source hears so (and stops serving it).
        if host.services.contains(&service) {
            return Err(if host.took_over(&service) {
                Cause::TakenOver
            } else {
                Cause::ServiceHere(service)
            });
        }
        if Files::reserved(&migration) {
            return Err(Cause::ReservedName(migration));
        }
        if flows.is_empty() || flows.len() > dataplane_common::MAX_FLOWS as usize {
            return Err(Cause::FlowCount(flows.len()));
        }
        if !(1..=MAX_DEADLINE_MS).contains(&deadline_ms) {
            return Err(Cause::Deadline(deadline_ms));
        }
        let (Some(inputs), Some(outputs)) = (&host.inputs, &host.outputs) else {
            return Err(Cause::NoLogs);
        };
        answers_only_its_own(&host.interface, &flows)?;
        // A container is restored from this host's copy of its image,
        // under the service's name: both checked before the source holds.
        let mut container_here = None;
        if let Some(image) = &started.container {
            let containers = &host.containers;
            let rootfs = image.rootfs(&containers.images)?;
            let netns = runc::own_netns()?;
            if containers.list(image.runtime)?.contains(&service) {
                return Err(Cause::ContainerHere(service));
            }
            container_here = Some((image, rootfs, netns));
        }
        // CRIU restores a process in its working directory: a service a
        // daemon started has services_dir/NAME (its standby NAME/standby).
        if started.command.is_some() {
            let cwd = host.services_dir.join(&service).join("standby");
            std::fs::create_dir_all(&cwd)
                .map_err(|source| Cause::WorkingDirectory { path: cwd, source })?;
        }
        let mirror_from = match &host.mirror_from {
            Some(name) => crate::host::netdev::Interface::by_name(name)
                .map_err(crate::kernel::loader::LoadError::from)?,
            None => return Err(Cause::NoMirrorInterface),
        };
        if !mirror_from.running {
            return Err(Cause::MigrationNetworkDown(mirror_from.name));
        }
        let mirror_mac = mirror_from.mac;
        let mut dataplane = Dataplane::open(&host.pin_root)?;
        let log = LogGuard::new(&dataplane)?;
        // Another migration may choose ids at the same time.
        let _table = Dataplane::lock_flow_table();
        // A flow this host has already is another service's (or this
        // one's, running here): adopting it would renumber it, and a
        // rollback would remove it.
        let present = dataplane.flows()?;
        for spec in &flows {
            let key = flow::udp(spec.cps, spec.service);
            if let Some((k, c)) = present.iter().find(|(k, _)| *k == key) {
                return Err(Cause::FlowPresent {
                    flow: flow::display(k),
                    id: c.flow_id,
                });
            }
        }
        // The service's flows, numbered as one here too.
        let flow_id = dataplane.free_flow_ids(1)?[0];
        let flows: Vec<TargetFlow> = flows
            .into_iter()
            .map(|spec| TargetFlow { flow_id, spec })
            .collect();
        let inputs = inputs.subscribe(&[flow_id], SUBSCRIPTION_CAPACITY)?;
        let outputs = outputs.subscribe(&[flow_id], SUBSCRIPTION_CAPACITY)?;
        // The restored instance binds the service addresses: those this
        // host lacks go on lo (where it answers no ARP for them) until the
        // announce puts them on the service interface.
        let mut local_addresses: Vec<IpAddr> = flows.iter().map(|f| f.spec.service.ip()).collect();
        local_addresses.sort();
        local_addresses.dedup();
        local_addresses.retain(|a| !crate::host::netdev::is_local(*a));
        // Journaled before anything changes: a daemon that dies while it
        // adopts leaves flows its next start removes.
        let journal = Journal::Destination(Incoming {
            service: Some(service.clone()),
            flows: flows.clone(),
            instance: None,
            deadline_ms,
            local_addresses: local_addresses.clone(),
            command: started.command.clone(),
            standby: started.standby,
            replica: None,
            container: started.container.clone(),
        });
        host.files.write(&migration, &journal)?;
        // Before the source holds: podman's restore needs a container made
        // first (see host::podman).
        if let Some((image, rootfs, netns)) = container_here {
            let containers = &host.containers;
            let made = tokio::task::block_in_place(|| {
                containers.prepare(&service, image, &rootfs, &netns)
            });
            if let Err(e) = made {
                host.files.remove(Side::Destination, &migration);
                return Err(Cause::Container(e));
            }
        }
        let adopt = |dataplane: &mut Dataplane| -> Result<(), Cause> {
            let keys: Vec<FlowKey> = flows
                .iter()
                .map(|f| flow::udp(f.spec.cps, f.spec.service))
                .collect();
            let gate = dataplane_common::Gate {
                mode: GATE_HOLD_ALL,
                output: OUTPUT_MUTE,
                // A replica fed in order from its first input: its
                // outputs are counted (a burst at the cutover must not
                // tag the answer to K as K+1's).
                tagging: dataplane_common::TAG_COUNTED,
                ..Default::default()
            };
            dataplane
                .adopt_flows(&keys, flow_id)
                .and_then(|()| dataplane.set_gate(flow_id, gate))?;
            for &address in &local_addresses {
                crate::host::netdev::own_address("lo", address)
                    .map_err(|source| Cause::LocalAddress { address, source })?;
            }
            Ok(())
        };
        if let Err(e) = adopt(&mut dataplane) {
            forget(&mut dataplane, &flows, &local_addresses);
            if let Some(image) = &started.container {
                host.containers.discard(image.runtime, &service);
            }
            host.files.remove(Side::Destination, &migration);
            return Err(e);
        }
        let target = Self {
            host: host.clone(),
            dataplane,
            migration,
            service,
            started,
            mirror_mac,
            flows,
            state: State::Prepared,
            deadline: Duration::from_millis(deadline_ms),
            last_step: tokio::time::Instant::now(),
            inputs,
            outputs,
            log,
            instance: None,
            local_addresses,
            finished: false,
            cpu: crate::host::tasks::CpuTime::now(),
            watch: None,
            source,
            replica: None,
            identity: None,
            waiting: None,
            keep: None,
            fed_after: None,
        };
        Ok(target)
    }

    /// What `Prepare` (and `Attach`) answers.
    fn prepared(&self) -> Prepared {
        Prepared {
            mirror_mac: self.mirror_mac,
            flow_ids: self.flows.iter().map(|f| f.flow_id).collect(),
            pid: self.instance.unwrap_or(0),
        }
    }

    /// The hot replica `migration` as the journal of a daemon that stopped
    /// (or died) left it, its instance still running and its flows still
    /// fed: watching its source again, for it to attach.
    fn resumed(host: &Arc<Host>, migration: String, incoming: &Incoming) -> Result<Self, String> {
        let replica = incoming.replica.ok_or("not a hot replica")?;
        let dataplane = Dataplane::open(&host.pin_root).map_err(|e| e.to_string())?;
        let flows = &incoming.flows;
        let flow_id = flows.first().ok_or("it has no flows")?.flow_id;
        let present = dataplane.flows().map_err(|e| e.to_string())?;
        let fed = flows.iter().all(|f| {
            let key = flow::udp(f.spec.cps, f.spec.service);
            present
                .iter()
                .any(|(k, c)| *k == key && c.flow_id == f.flow_id)
        });
        let gate = dataplane.gate(flow_id).map_err(|e| e.to_string())?;
        if !fed || !dataplane_common::decide::keeps_flooded(gate.mode, gate.output) {
            return Err("its flows are no longer a replica's (sequenced, muted)".into());
        }
        let mut target = Self::kept(host, migration, incoming, None)?;
        target.watch(replica.holder).map_err(|e| e.to_string())?;
        Ok(target)
    }

    /// A hot replica this host holds as `incoming` (its journal) says,
    /// reading its logs through `logs` (inputs, outputs) or new
    /// subscriptions.
    fn kept(
        host: &Arc<Host>,
        migration: String,
        incoming: &Incoming,
        logs: Option<(Subscription, Subscription)>,
    ) -> Result<Self, String> {
        let (Some(service), Some(replica)) = (&incoming.service, incoming.replica) else {
            return Err("not a hot replica".into());
        };
        let identity = incoming
            .instance
            .filter(Identity::runs)
            .ok_or("its instance is gone")?;
        let (Some(inputs), Some(outputs)) = (&host.inputs, &host.outputs) else {
            return Err(Cause::NoLogs.to_string());
        };
        let mirror_mac = match &host.mirror_from {
            Some(name) => {
                crate::host::netdev::Interface::by_name(name)
                    .map_err(|e| e.to_string())?
                    .mac
            }
            None => return Err(Cause::NoMirrorInterface.to_string()),
        };
        let dataplane = Dataplane::open(&host.pin_root).map_err(|e| e.to_string())?;
        let flows = incoming.flows.clone();
        let flow_id = flows.first().ok_or("it has no flows")?.flow_id;
        let log = LogGuard::new(&dataplane).map_err(|e| e.to_string())?;
        let (inputs, outputs) = match logs {
            Some(logs) => logs,
            None => {
                let subscribe = |tap: &Arc<crate::kernel::logs::Tap>| {
                    tap.subscribe(&[flow_id], SUBSCRIPTION_CAPACITY)
                        .map_err(|e| e.to_string())
                };
                (subscribe(inputs)?, subscribe(outputs)?)
            }
        };
        Ok(Self {
            host: host.clone(),
            dataplane,
            migration,
            service: service.clone(),
            started: Started {
                command: incoming.command.clone(),
                standby: incoming.standby,
                container: incoming.container.clone(),
            },
            mirror_mac,
            flows,
            state: State::Restored,
            deadline: Duration::from_millis(incoming.deadline_ms.min(MAX_DEADLINE_MS)),
            last_step: tokio::time::Instant::now(),
            inputs,
            outputs,
            log,
            instance: Some(identity.pid),
            local_addresses: incoming.local_addresses.clone(),
            finished: false,
            cpu: crate::host::tasks::CpuTime::now(),
            watch: None,
            source: replica.source,
            replica: Some(replica),
            identity: Some(identity),
            waiting: None,
            keep: None,
            fed_after: None,
        })
    }

    /// An error if the replica lacks an input up to `sent` (the last its
    /// source had numbered when it attached): its gate waits at one that
    /// never comes. One merely on its way reaches it within
    /// [`GAP_SETTLES`].
    async fn whole(&self, sent: u64) -> Result<(), Cause> {
        let until = Instant::now() + GAP_SETTLES;
        loop {
            let next = self.next_input()?;
            if next > sent {
                return Ok(());
            }
            if Instant::now() > until {
                return Err(Cause::ReplicaMissed(next));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// An error once the instance has waited [`GAP_SETTLES`] for one
    /// input while later ones were numbered: its mirror copy was lost (the
    /// migration network dropped it), and nothing will bring it. Asked at
    /// every `outputs` step, when the replay is over.
    fn check_gap(&mut self) -> Result<(), Cause> {
        let next = self.next_input()?;
        let last = self.dataplane.sequence(self.flows[0].flow_id)?.last_seq;
        self.waiting = match self.waiting {
            _ if next > last => None,
            Some((input, since)) if input == next => {
                if since.elapsed() > GAP_SETTLES {
                    return Err(Cause::ReplicaMissed(next));
                }
                Some((input, since))
            }
            _ => Some((next, Instant::now())),
        };
        Ok(())
    }

    /// The input the instance's sequenced gate takes next.
    fn next_input(&self) -> Result<u64, Cause> {
        let gate = self.dataplane.gate(self.flows[0].flow_id)?;
        Ok(dataplane_common::decide::expected_input(gate.next_expected))
    }

    /// Whether this is a hot replica in sync between two steps: it outlives
    /// its link and its daemon.
    fn parkable(&self) -> bool {
        self.replica.is_some() && self.state == State::Restored
    }

    /// Handles every step after `Prepare`, in its turn (see [`run_step`]);
    /// the reply's JSON value.
    async fn step(&mut self, step: Step) -> Result<serde_json::Value, Cause> {
        let json = |v| serde_json::to_value(v).expect("serializes");
        match step {
            Step::Prepare { .. } => Err(self.state.refuse(StepKind::Prepare)),
            Step::Attach { .. } => Err(self.state.refuse(StepKind::Attach)),
            Step::Restore { positions, cpus } => self.restore(positions, cpus).await.map(json),
            Step::Outputs {
                after,
                count,
                timeout_ms,
            } => {
                // Bounded: the answer fits a frame, and the step ends
                // well within the idle limit.
                let timeout = Duration::from_millis(timeout_ms).min(MAX_OUTPUTS_WAIT);
                // Past the replay the inputs staged here only count losses
                // (a hot replica is compared for as long as it lives), and
                // a lost one ends the comparison: the instance missed it.
                while self.inputs.try_next().is_some() {}
                self.log.check(&self.dataplane, &self.inputs)?;
                self.check_gap()?;
                let outputs = self
                    .next_outputs(after, count.min(MAX_OUTPUTS), timeout)
                    .await;
                self.check_instance("convergence")?;
                Ok(serde_json::to_value(outputs).expect("serializes"))
            }
            Step::Watch { holder } => self.watch(holder).map(|w| serde_json::json!(w)),
            Step::Arm {
                flows,
                keep_replica,
            } => {
                self.check_instance("the cutover")?;
                self.arm(&flows)?;
                self.keep =
                    keep_replica.map(|k| (SocketAddr::new(self.source, k.port), k.migration));
                Ok(serde_json::json!({}))
            }
            Step::Feed { after, inputs } => self.feed(after, inputs).await.map(json),
            Step::Announce => self.announce().map(|a| serde_json::json!({"announced": a})),
            Step::Finish => {
                // Kept once the source has this answer (see `serve_frames`).
                let (daemon_cpu_us, criu_cpu_us) = crate::host::tasks::CpuTime::since(self.cpu);
                let finished = Finished {
                    pid: self.instance,
                    daemon_cpu_us,
                    criu_cpu_us,
                };
                Ok(serde_json::to_value(finished).expect("serializes"))
            }
            Step::Abort => {
                // Past K the service is this host's: the source does not
                // abort then, and no one else may.
                if opened(&self.dataplane, &self.flows) {
                    return Err(Cause::ServingHere);
                }
                self.rollback();
                Ok(serde_json::json!({}))
            }
        }
    }

    /// Refuses `feed` but to a replica adopted here, and any step once a
    /// watch took the service over; `arm` and `abort` end the watch first
    /// (a planned handover, a rollback): the source cannot hand over or
    /// take back what this host took.
    fn admit(&mut self, step: StepKind) -> Result<(), Cause> {
        // Only a replica adopted here is fed; refused, nothing changes.
        if step == StepKind::Feed && self.fed_after.is_none() {
            return Err(Cause::NotAdopted);
        }
        let Some(watch) = &self.watch else {
            return Ok(());
        };
        let ended = match step {
            StepKind::Arm | StepKind::Abort => watch.stop(),
            _ => !watch.taken_over(),
        };
        if !ended {
            return Err(Cause::TakenOver);
        }
        if matches!(step, StepKind::Arm | StepKind::Abort) {
            self.watch = None;
        }
        Ok(())
    }

    /// Starts watching the source of this hot replica (`holder`: its MAC
    /// on the service network); what it answers says whether failover is
    /// on. A replica without it still serves planned handovers.
    fn watch(&mut self, holder: [u8; 6]) -> Result<Watching, Cause> {
        self.check_instance("the watch")?;
        // In sync: from here on it outlives its link and this daemon.
        let replica = ReplicaHere {
            source: self.source,
            holder,
        };
        if self.replica != Some(replica) {
            self.replica = Some(replica);
            self.write_journal()?;
        }
        let failover_after = self.host.failover_after;
        let watching = Watching {
            failover_after_ms: failover_after.as_millis() as u64,
        };
        if failover_after.is_zero() {
            return Ok(Watching::default());
        }
        if self.watch.is_some() {
            return Ok(watching);
        }
        let watched = Watched {
            service: self.service.clone(),
            flows: self.flows.clone(),
            pin_root: self.host.pin_root.clone(),
            interface: self.host.interface.clone(),
            holder,
            failover_after,
            takeovers: self.host.takeovers.clone(),
            flooded: self.flooded(),
        };
        match Watch::start(watched) {
            Ok(watch) => self.watch = Some(watch),
            Err(e) => {
                tracing::warn!(service = %self.service, "no failover for this replica: {e}");
                return Ok(Watching::default());
            }
        }
        Ok(watching)
    }

    /// What a watch needs to replay the inputs flooded here at a
    /// takeover; none (logged) if this host cannot.
    fn flooded(&self) -> Option<(Subscription, Injector)> {
        let flow_id = self.flows[0].flow_id;
        let tap = self.host.inputs.as_ref()?;
        let interface = self.host.peer_interface.as_deref()?;
        let taken = tap
            .subscribe_flooded(&[flow_id], SUBSCRIPTION_CAPACITY)
            .map_err(|e| e.to_string())
            .and_then(|s| {
                let injector = Injector::open(&self.host.pin_root, interface);
                Ok((s, injector.map_err(|e| e.to_string())?))
            });
        taken
            .inspect_err(|e| tracing::warn!(service = %self.service, "flooded inputs: {e}"))
            .ok()
    }

    /// How long this migration may go without a step: the host's limit,
    /// and never less than the source may stay silent while it waits for
    /// K (its deadline, and a margin).
    fn idle(&self) -> Duration {
        idle_limit(self.host.limits.idle, self.deadline)
    }

    /// When this migration idles out unless a step comes.
    fn idle_until(&self) -> tokio::time::Instant {
        self.last_step + self.idle()
    }

    fn images(&self) -> std::path::PathBuf {
        self.host.files.images(Side::Destination, &self.migration)
    }

    async fn restore(
        &mut self,
        positions: Vec<FlowPosition>,
        cpus: Vec<usize>,
    ) -> Result<Restored, Cause> {
        let [position] = positions[..] else {
            return Err(Cause::OnePosition);
        };
        if !self.flows.iter().any(|f| f.flow_id == position.flow_id) {
            return Err(Cause::ForeignFlow(position.flow_id));
        }
        let images = self.images();
        if !images.is_dir() {
            return Err(Cause::NoImages(images));
        }
        let start = Instant::now();
        let restored = match self.started.container.clone() {
            Some(image) => {
                let containers = self.host.containers.clone();
                let (id, bundle) = (self.service.clone(), self.bundle());
                // Its cgroup is this migration's (the containers this host
                // starts have /dataplane/NAME).
                let cgroup = format!("/dataplane/migrated/{}", self.migration);
                tokio::task::spawn_blocking(move || {
                    restore_container(&containers, &image, &id, &bundle, &cgroup, &images)
                })
                .await
                .map_err(Cause::RestoreTask)??
            }
            None => self.restore_process(images).await?,
        };
        let (pid, restore_us, criu_us) = restored;
        self.instance = Some(pid);
        self.identity = Identity::of(pid);
        self.write_journal()?;
        // Before the replay: the instance catches up where it will serve.
        match crate::host::tasks::pin(pid, &cpus) {
            Ok(applied) if !applied.is_empty() => {
                tracing::info!(pid, ?applied, "restored instance on its source's CPUs")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(pid, "restored instance left on CRIU's CPUs: {e}"),
        }
        let restore_total_us = start.elapsed().as_micros() as u64;
        let mut injector = self.injector()?;
        // Held inputs that found the log full are gone: no replay can start.
        self.log.check(&self.dataplane, &self.inputs)?;
        let start = Instant::now();
        let replayed = hold::resume(
            &mut self.dataplane,
            position,
            pid,
            &mut injector,
            &mut self.inputs,
        )
        .await;
        self.check_instance("replay")?;
        // An overflow explains an input missing from the log.
        self.log.check(&self.dataplane, &self.inputs)?;
        let replayed = replayed.map_err(Cause::Replay)?;
        let replay_end = dataplane_common::decide::expected_input(
            self.dataplane.gate(position.flow_id)?.next_expected,
        ) - 1;
        Ok(Restored {
            pid,
            restore_us,
            restore_total_us,
            criu_us,
            replayed,
            replay_us: start.elapsed().as_micros() as u64,
            replay_end,
        })
    }

    /// Where a container restored here has its bundle.
    fn bundle(&self) -> PathBuf {
        self.host.services_dir.join(&self.service).join("bundle")
    }

    /// CRIU's restore of a process tree into this host's network
    /// namespace: its root pid, CRIU's restore time and the request's, µs.
    async fn restore_process(&self, images: PathBuf) -> Result<(u32, u64, u64), Cause> {
        let criu = self.host.criu.clone();
        let (files, migration) = (self.host.files.clone(), self.migration.clone());
        let mut journal_of_tree = self.journal(None);
        tokio::task::spawn_blocking(move || {
            let netns = open_netns(Path::new("/proc/self/ns/net")).map_err(Cause::HostNetns)?;
            let request = RestoreRequest {
                images_dir: images.clone(),
                inherit: vec![("extnet".into(), &netns)],
            };
            // The restored tree is journaled as soon as CRIU names it (at
            // `setup-namespaces`, early): a daemon killed before the
            // restore returns leaves a running instance that nobody else
            // knows of. Once only: at `post-restore` the tasks wait on CRIU,
            // and one killed while they wait stalls CRIU until its timeout.
            // A journal that cannot be written fails the restore, and CRIU
            // removes the tree.
            let mut journaled = false;
            let mut journal = |_: &str, pid: Option<u32>| match pid {
                Some(pid) if !journaled => {
                    if let Journal::Destination(incoming) = &mut journal_of_tree {
                        incoming.instance = Identity::of(pid);
                    }
                    journaled = files
                        .write(&migration, &journal_of_tree)
                        .inspect_err(|e| tracing::warn!("{e}"))
                        .is_ok();
                    journaled
                }
                _ => true,
            };
            let start = Instant::now();
            let pid = criu
                .restore(&request, &mut journal)
                .map_err(Cause::Restore)?;
            let criu_us = start.elapsed().as_micros() as u64;
            let restore_us = stats::restore(&images).map_or(0, |s| s.restore_time.into());
            Ok::<_, Cause>((pid, restore_us, criu_us))
        })
        .await
        .map_err(Cause::RestoreTask)?
    }

    /// Gives an adopted replica (see [`adopt`]) its inputs after K
    /// (`after`): those `inputs` its new source numbered before it attached,
    /// then the live mirror's, in order through its sequenced gate.
    async fn feed(&mut self, after: u64, inputs: Vec<FedInput>) -> Result<Restored, Cause> {
        if self.fed_after != Some(after) {
            return Err(Cause::NotAdopted);
        }
        let pid = self.instance.ok_or(Cause::NotReplayed)?;
        let flow_id = self.flows[0].flow_id;
        let mut fed = VecDeque::new();
        for input in inputs {
            let frame = hex::decode(&input.frame).map_err(|_| Cause::NotHex(input.seq))?;
            fed.push_back(Record {
                header: RecordHeader {
                    timestamp_ns: input.timestamp_ns,
                    kind: dataplane_common::RECORD_MIRRORED,
                    flow_id,
                    frame_len: frame.len() as u32,
                    captured_len: frame.len() as u32,
                    seq: input.seq,
                    ..Default::default()
                },
                frame: frame.into(),
            });
        }
        let mut injector = self.injector()?;
        let start = Instant::now();
        let position = FlowPosition {
            flow_id,
            last_delivered: after,
        };
        let mut records = Fed {
            fed,
            log: &mut self.inputs,
        };
        let replayed = hold::resume(
            &mut self.dataplane,
            position,
            pid,
            &mut injector,
            &mut records,
        )
        .await
        .map_err(Cause::Replay)?;
        self.check_instance("replay")?;
        self.log.check(&self.dataplane, &self.inputs)?;
        self.fed_after = None;
        Ok(Restored {
            pid,
            replayed,
            replay_us: start.elapsed().as_micros() as u64,
            replay_end: self.next_input()? - 1,
            ..Default::default()
        })
    }

    /// Replays into the instance, as if the inputs came on the peer
    /// interface (where mirror copies do).
    fn injector(&self) -> Result<Injector, Cause> {
        let interface = self
            .host
            .peer_interface
            .as_deref()
            .ok_or(Cause::NoPeerInterface)?;
        Ok(Injector::open(&self.host.pin_root, interface)?)
    }

    /// Up to `count` outputs answering inputs after `after`, as they come,
    /// waiting at most `timeout` for them.
    async fn next_outputs(&mut self, after: u64, count: usize, timeout: Duration) -> Vec<Output> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut outputs = Vec::new();
        while outputs.len() < count {
            let Ok(Some(record)) = tokio::time::timeout_at(deadline, self.outputs.next()).await
            else {
                break;
            };
            if compared(&record.header, &self.flows, after) {
                outputs.push(Output {
                    flow_id: record.header.flow_id,
                    seq: record.header.seq,
                    answer: crate::migration::converge::Answer::of(&record.frame),
                });
            }
        }
        outputs
    }

    /// Arms the output gates: each flow's outputs stay muted until the
    /// source forwards its first input past the cutover, and leave from
    /// that input on (the kernel programs do the rest, see `OUTPUT_ARMED`).
    fn arm(&mut self, flows: &[u32]) -> Result<(), Cause> {
        // The last moment to back out if this log lost an input.
        self.log.check(&self.dataplane, &self.inputs)?;
        // Every flow of the migration, and only those: an armed state
        // with a muted flow would announce a service nobody answers.
        if let Some(&foreign) = flows
            .iter()
            .find(|&&id| !self.flows.iter().any(|f| f.flow_id == id))
        {
            return Err(Cause::ForeignFlow(foreign));
        }
        if let Some(missing) = self.flows.iter().find(|f| !flows.contains(&f.flow_id)) {
            return Err(Cause::NotArmed(missing.flow_id));
        }
        for f in &self.flows {
            if self.dataplane.gate(f.flow_id)?.mode != GATE_SEQUENCED {
                return Err(Cause::NotReplayed);
            }
        }
        let window = self.dataplane.gate_window()?;
        for f in &self.flows {
            window.arm_outputs(f.flow_id);
        }
        tracing::info!(migration = %self.migration,
            "armed: outputs leave from the first input forwarded past K");
        Ok(())
    }

    fn announce(&self) -> Result<Vec<IpAddr>, Cause> {
        announce(&self.host.interface, &self.flows)
    }

    /// Records the flows and the instance, for [`recover`].
    fn write_journal(&self) -> Result<(), Cause> {
        let journal = self.journal(self.identity);
        Ok(self.host.files.write(&self.migration, &journal)?)
    }

    /// This migration's journal, with `instance` as the restored tree.
    fn journal(&self, instance: Option<Identity>) -> Journal {
        Journal::Destination(Incoming {
            service: Some(self.service.clone()),
            flows: self.flows.clone(),
            instance,
            deadline_ms: self.deadline.as_millis() as u64,
            local_addresses: self.local_addresses.clone(),
            command: self.started.command.clone(),
            standby: self.started.standby,
            replica: self.replica,
            container: self.started.container.clone(),
        })
    }

    /// The service is this host's: registered, so that it can be migrated
    /// on from here; then the migration ends.
    fn keep(&mut self) {
        if let Some(pid) = self.instance {
            register(
                &self.host.services,
                &self.service,
                pid,
                &self.flows,
                self.started.command.clone(),
                self.started.container.as_ref().map(|image| image.runtime),
            );
            // Its source kept its instance: this host feeds it from K+1.
            if let Some((to, migration)) = self.keep.take() {
                self.adopt_source(to, migration);
            }
            // Its standby on the source ended with the handover. (A
            // container's is not seeded: see `service standby`.)
            if self.started.standby && self.started.container.is_none() {
                let _ = self.host.standby_requests.send(StandbyRequest {
                    service: self.service.clone(),
                    after_migration: true,
                    answer: None,
                });
            }
        }
        self.end();
    }

    /// Hands the daemon what it needs to attach to the instance the source
    /// kept as this host's hot replica (as `migration`, on the peer link at
    /// `to`): K, and this host's inputs since `arm`.
    fn adopt_source(&mut self, to: SocketAddr, migration: String) {
        let after = self
            .dataplane
            .gate(self.flows[0].flow_id)
            .map(|g| g.answer_from.saturating_sub(1));
        let empty = self.host.inputs.as_ref().map(|tap| tap.subscribe(&[], 1));
        let (Ok(after), Some(Ok(empty))) = (after, empty) else {
            tracing::warn!(service = %self.service, "the source's instance cannot be adopted");
            return;
        };
        let adoption = Adoption {
            service: self.service.clone(),
            to,
            migration,
            after,
            inputs: std::mem::replace(&mut self.inputs, empty),
        };
        if self.host.adoptions.send(adoption).is_err() {
            tracing::warn!(service = %self.service, "the daemon stops: no replica is adopted");
        }
    }

    /// The migration is over here, either way: the images and the journal go.
    fn end(&mut self) {
        self.host.files.remove(Side::Destination, &self.migration);
        self.finished = true;
    }

    /// An error if the restored instance (this daemon's child) has exited;
    /// it is reaped then.
    fn check_instance(&mut self, during: &'static str) -> Result<(), Cause> {
        use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
        let Some(pid) = self.instance else {
            return Ok(());
        };
        let status = waitpid(
            nix::unistd::Pid::from_raw(pid as i32),
            Some(WaitPidFlag::WNOHANG),
        );
        let how = match status {
            Ok(WaitStatus::StillAlive) => return Ok(()),
            // Restored by an earlier run of this daemon: no child of this one.
            Err(nix::errno::Errno::ECHILD) if self.identity.is_some_and(|i| i.runs()) => {
                return Ok(());
            }
            Ok(WaitStatus::Exited(_, code)) => InstanceEnd::Exited(code),
            Ok(WaitStatus::Signaled(_, signal, _)) => InstanceEnd::Killed(signal),
            Ok(other) => InstanceEnd::Changed(format!("{other:?}")),
            Err(e) => InstanceEnd::Gone(e),
        };
        self.instance = None;
        Err(Cause::InstanceEnded { pid, how, during })
    }

    /// Undoes whatever this migration did on this host.
    fn rollback(&mut self) {
        drop(self.watch.take());
        if let Some(image) = &self.started.container {
            let (runtime, bundle) = (image.runtime, self.bundle());
            remove_container(&self.host.containers, runtime, &self.service, &bundle);
        }
        if let Some(pid) = self.instance.take() {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            // The restored root is this daemon's child: reap it.
            let _ = nix::sys::wait::waitpid(pid, None);
        }
        forget(&mut self.dataplane, &self.flows, &self.local_addresses);
        self.end();
    }

    /// Ends the migration without its source (the link is gone, or it
    /// went quiet past the idle limit): keeps the service if the source
    /// handed it over, waiting for that while a gate is armed for as long
    /// as the source may still pick K ([`armed_grace`]); rolls back
    /// otherwise.
    async fn settle_alone(&mut self) {
        let grace = armed_grace(self.deadline);
        let (dataplane, flows) = (&self.dataplane, &self.flows);
        // It polls the gates: off the runtime's workers while it waits.
        let kept = tokio::task::block_in_place(|| handed_over(dataplane, flows, grace));
        self.settle(kept);
    }

    fn settle(&mut self, handed_over: bool) {
        if handed_over {
            tracing::warn!(migration = %self.migration,
                "the source is gone after the handover: this host keeps serving");
            if let Err(e) = self.announce() {
                tracing::warn!(migration = %self.migration, "announcing: {e}");
            }
            self.keep();
        } else {
            tracing::warn!(migration = %self.migration,
                "the source is gone mid-migration: rolling back");
            self.rollback();
        }
    }
}

impl Drop for Target {
    /// An unfinished migration is dropped here only when its task is
    /// cancelled (the daemon stops, or a journal could not be written at
    /// `prepare`): a link that ends goes through [`Target::settle_alone`].
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // Its thread stops first: a takeover it made shows in the gates.
        drop(self.watch.take());
        if self.parkable() && !output_modes(&self.dataplane, &self.flows).contains(&OUTPUT_FROM) {
            tracing::info!(migration = %self.migration,
                "stopping with a hot replica in sync: it runs on, for the next start");
            return;
        }
        let modes = output_modes(&self.dataplane, &self.flows);
        if modes.contains(&OUTPUT_ARMED) && !modes.contains(&OUTPUT_FROM) {
            // The source's kernel may still hand the service here; no
            // waiting in a drop: the journal's recovery decides at the
            // next start, after the grace.
            tracing::warn!(migration = %self.migration,
                "stopping while armed: the next start decides from the journal");
            return;
        }
        self.settle(modes.contains(&OUTPUT_FROM));
    }
}

/// What an armed destination adds to the source's deadline before it
/// gives up on a handover: the flip follows the answer to `Arm` (a trip
/// back over the link, a look at the source's log), and may come that much
/// later than the destination armed.
pub const HANDOVER_MARGIN: Duration = Duration::from_secs(2);

/// How long an armed destination without its source waits for the
/// handover: the source's kernel picks K at the first input after the
/// flip, with its daemon alive or not, and the source daemon takes the
/// flip back only once `deadline` has passed without an input. Until then
/// a CPS that is quiet may still hand its service here.
pub fn armed_grace(deadline: Duration) -> Duration {
    deadline + HANDOVER_MARGIN
}

/// How long a migration with the source's `deadline` may go without a
/// step, with the host's `limit`: never less than the source may be silent
/// while it waits for K.
fn idle_limit(limit: Duration, deadline: Duration) -> Duration {
    limit.max(armed_grace(deadline))
}

/// The output gate modes of `flows`, as they are now.
fn output_modes(dataplane: &Dataplane, flows: &[TargetFlow]) -> Vec<u32> {
    flows
        .iter()
        .filter_map(|f| dataplane.gate(f.flow_id).ok().map(|g| g.output))
        .collect()
}

/// Whether an output gate of `flows` has opened past K: the service is this host's.
fn opened(dataplane: &Dataplane, flows: &[TargetFlow]) -> bool {
    output_modes(dataplane, flows).contains(&OUTPUT_FROM)
}

/// Whether the source has handed the service over: an output gate was
/// opened by the first input forwarded past K. While a gate is armed and
/// not yet opened, waits up to `grace` for that input.
fn handed_over(dataplane: &Dataplane, flows: &[TargetFlow], grace: Duration) -> bool {
    wait_for_handover(|| output_modes(dataplane, flows), grace)
}

/// The decision of [`handed_over`], over the flows' output gate modes as
/// `outputs` reads them now.
fn wait_for_handover(outputs: impl Fn() -> Vec<u32>, grace: Duration) -> bool {
    let start = Instant::now();
    loop {
        let modes = outputs();
        if modes.contains(&OUTPUT_FROM) {
            return true;
        }
        if !modes.contains(&OUTPUT_ARMED) || start.elapsed() > grace {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether an output record is one `Outputs` answers with: an output of
/// the migration's own flows (never another local service's), answering
/// an input after `after`.
fn compared(header: &RecordHeader, flows: &[TargetFlow], after: u64) -> bool {
    header.kind == RECORD_OUTPUT
        && header.seq > after
        && flows.iter().any(|f| f.flow_id == header.flow_id)
}

/// Most outputs one `Outputs` answer carries: it must fit a frame.
const MAX_OUTPUTS: usize = 1024;
/// Longest an `Outputs` step waits for them.
const MAX_OUTPUTS_WAIT: Duration = Duration::from_secs(1);

/// Removes the flows a migration adopted, their gates, and the service
/// addresses it made local (`local_addresses`, on lo).
fn forget(dataplane: &mut Dataplane, flows: &[TargetFlow], local_addresses: &[IpAddr]) {
    for f in flows {
        let _ = dataplane.remove_flow(&flow::udp(f.spec.cps, f.spec.service));
        let _ = dataplane.set_gate(f.flow_id, Default::default());
    }
    for &address in local_addresses {
        if let Err(e) = crate::host::netdev::release_address("lo", address) {
            tracing::warn!(%address, "taking the service address off lo: {e}");
        }
    }
}

/// Makes this host the owner of `flows`' service addresses on
/// `interface` and tells the neighbours (see
/// [`crate::host::netdev::announce`]).
fn announce(interface: &str, flows: &[TargetFlow]) -> Result<Vec<IpAddr>, Cause> {
    let addresses = flows.iter().map(|f| f.spec.service.ip());
    Ok(crate::host::netdev::announce(interface, addresses)?)
}

/// Recovery of flows handed over here: their addresses announced; what
/// came of it.
fn keep_serving(interface: &str, flows: &[TargetFlow]) -> String {
    match announce(interface, flows) {
        Ok(addresses) => format!("handed over; kept serving, announced {addresses:?}"),
        Err(e) => format!("handed over; kept serving; {e}"),
    }
}

/// The restore of container `id` from `images` by its runtime: runc's
/// with a bundle (written at `bundle`) that runs it from this host's copy
/// of `image`, in this host's network namespace, in `cgroup`; podman's
/// into the container it made at `prepare`. Its init pid, CRIU's restore
/// time and the runtime's whole request, µs. A failure leaves neither the
/// container nor its bundle.
fn restore_container(
    containers: &crate::host::container::Containers,
    image: &runc::Image,
    id: &str,
    bundle: &Path,
    cgroup: &str,
    images: &Path,
) -> Result<(u32, u64, u64), Cause> {
    let start = Instant::now();
    match containers.restore(image, id, (bundle, cgroup), images) {
        Ok(pid) => {
            let runc_us = start.elapsed().as_micros() as u64;
            let restore_us = stats::restore(images).map_or(0, |s| s.restore_time.into());
            Ok((pid, restore_us, runc_us))
        }
        Err(e) => {
            remove_container(containers, image.runtime, id, bundle);
            Err(Cause::Container(e))
        }
    }
}

/// Removes container `id` from this host's `runtime` (killing it), and
/// its bundle.
fn remove_container(
    containers: &crate::host::container::Containers,
    runtime: crate::service::Runtime,
    id: &str,
    bundle: &Path,
) {
    containers.discard(runtime, id);
    let _ = std::fs::remove_dir_all(bundle);
    // The service's directory, if the bundle was all it held.
    let _ = bundle.parent().map(std::fs::remove_dir);
}

/// Finishes what a migration to this host left when the daemon died, from
/// its journal (see [`super::recovery`]). Handed over: the instance keeps
/// serving, the address is announced, and the instance is registered in
/// `services` under the service's name. Not: the instance is killed (if it
/// is still the process the journal names), the flows and the addresses
/// made local go.
pub(super) fn recover(
    pin_root: &Path,
    interface: &str,
    services: &Registry,
    containers: &crate::host::container::Containers,
    incoming: &Incoming,
) -> String {
    let mut dataplane = match Dataplane::open(pin_root) {
        Ok(d) => d,
        Err(e) => return format!("no dataplane to clean up ({e})"),
    };
    let flows = &incoming.flows;
    let deadline = Duration::from_millis(incoming.deadline_ms.min(MAX_DEADLINE_MS));
    let instance = incoming.instance.filter(Identity::runs);
    if handed_over(&dataplane, flows, armed_grace(deadline)) {
        if let (Some(name), Some(i)) = (&incoming.service, instance) {
            let runtime = incoming.container.as_ref().map(|image| image.runtime);
            register(
                services,
                name,
                i.pid,
                flows,
                incoming.command.clone(),
                runtime,
            );
        }
        return keep_serving(interface, flows);
    }
    if let (Some(image), Some(name)) = (&incoming.container, &incoming.service) {
        containers.discard(image.runtime, name);
    }
    if let Some(i) = instance {
        let pid = nix::unistd::Pid::from_raw(i.pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
    forget(&mut dataplane, flows, &incoming.local_addresses);
    match instance {
        Some(i) => format!("rolled back: killed instance {}, removed its flows", i.pid),
        None => "rolled back: removed its flows".into(),
    }
}

/// Finishes, from the kernel alone, what a migration to this host whose
/// journal cannot be read may have left: the flows it adopted are the ones
/// whose outputs are still muted or armed (nothing else sets those here).
/// An armed one is waited for as for the default deadline: handed over,
/// it is kept and announced. The others go, with the instance restored for
/// them, found as the processes in a PID namespace of their own holding a
/// UDP socket on the flow's service address (no other process here can:
/// the host had no such flow before, and the restore bound it).
pub(super) fn recover_unjournaled(pin_root: &Path, interface: &str) -> String {
    let mut dataplane = match Dataplane::open(pin_root) {
        Ok(d) => d,
        Err(e) => return format!("no dataplane to clean up ({e})"),
    };
    let adopted: Vec<TargetFlow> = match dataplane.flows() {
        Ok(flows) => flows
            .into_iter()
            .filter(|(_, config)| {
                dataplane
                    .gate(config.flow_id)
                    .is_ok_and(|g| [OUTPUT_MUTE, OUTPUT_ARMED].contains(&g.output))
            })
            .map(|(key, config)| TargetFlow {
                flow_id: config.flow_id,
                spec: FlowSpec {
                    cps: flow::source(&key),
                    service: flow::destination(&key),
                },
            })
            .collect(),
        Err(e) => return format!("no dataplane to clean up ({e})"),
    };
    if adopted.is_empty() {
        return "no flow muted or armed: nothing to undo".into();
    }
    let grace = armed_grace(Duration::from_millis(super::DEFAULT_DEADLINE_MS));
    wait_for_handover(|| output_modes(&dataplane, &adopted), grace);
    let (kept, undone): (Vec<TargetFlow>, Vec<TargetFlow>) = adopted.into_iter().partition(|f| {
        dataplane
            .gate(f.flow_id)
            .is_ok_and(|g| g.output == OUTPUT_FROM)
    });
    let mut outcome = Vec::new();
    if !kept.is_empty() {
        outcome.push(keep_serving(interface, &kept));
    }
    if !undone.is_empty() {
        let killed: Vec<u32> = undone
            .iter()
            .flat_map(|f| crate::host::tasks::bound_udp(f.spec.service))
            .flat_map(crate::host::tasks::kill_pid_namespace)
            .collect();
        // The addresses a migration made local are in its journal only;
        // on lo they answer no ARP (`arp_ignore`) and stay.
        forget(&mut dataplane, &undone, &[]);
        outcome.push(format!(
            "rolled back: killed {killed:?}, removed flows {:?}",
            undone.iter().map(|f| f.flow_id).collect::<Vec<_>>()
        ));
    }
    format!("from the kernel: {}", outcome.join("; "))
}

/// Refuses a destination whose kernel would give the service address away
/// before the cutover: by naming it in its own ARP requests (the restored
/// instance's first, muted, output would announce it), or by answering ARP
/// for it while it is on lo (IPv4 only: Linux answers a neighbour
/// solicitation only for an address of the interface it came in on).
/// Either pulls the CPS's traffic over early.
fn answers_only_its_own(interface: &str, flows: &[FlowSpec]) -> Result<(), Cause> {
    let read = |name: &str, key: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{name}/{key}"))
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
            .unwrap_or(0)
    };
    // The kernel uses the larger of "all" and the interface's value.
    let setting = |key| read("all", key).max(read(interface, key));
    if setting("arp_announce") < 2 {
        return Err(Cause::ArpAnnounce(interface.to_string()));
    }
    if flows.iter().any(|f| f.service.is_ipv4()) && setting("arp_ignore") < 1 {
        return Err(Cause::ArpIgnore(interface.to_string()));
    }
    Ok(())
}

/// Where a migration to this host stands, on its peer link: what it takes
/// next. The order is what the source sends, the same in both modes
/// (standby and leave-running; see [`super::protocol`]):
///
/// ```text
/// Idle --prepare--> Prepared --images--> Received --restore--> Restored
///   Restored --outputs--> Restored (repeated while the source compares)
///   Restored --watch--> Restored (a hot replica in sync: failover on)
///   Restored --arm--> Armed --announce--> Announced --finish--> Idle
///   any state but Idle and Announced --abort--> Idle (refused once the
///     service is handed over: an output gate opened past K)
///   a step that fails --> Failed --abort--> Idle
/// ```
///
/// Anything else is refused and changes nothing: a step out of order, a
/// repeated one, images of another migration or before `prepare`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// No migration on this link: `prepare` comes first.
    Idle,
    /// The flows are adopted and held: the images come next.
    Prepared,
    /// The images are here: `restore` comes next.
    Received,
    /// Restored and replayed: `outputs` while the source compares, then `arm`.
    Restored,
    /// The output gates open at the first input past K: `announce` next.
    Armed,
    /// The service addresses are here: `finish`.
    Announced,
    /// A step failed: the source rolls back (`abort`).
    Failed,
}

impl State {
    /// The state after `step` succeeds in this one; none if `step` is out
    /// of order here.
    pub fn after(self, step: StepKind) -> Option<State> {
        use State::*;
        use StepKind as S;
        match (self, step) {
            (Idle, S::Prepare) => Some(Prepared),
            (Idle, S::Attach) => Some(Restored),
            (Prepared, S::Images) => Some(Received),
            (Received, S::Restore) => Some(Restored),
            (Restored, S::Outputs | S::Watch | S::Feed) => Some(Restored),
            (Restored, S::Arm) => Some(Armed),
            (Armed, S::Announce) => Some(Announced),
            (Announced, S::Finish) => Some(Idle),
            (Prepared | Received | Restored | Armed | Failed, S::Abort) => Some(Idle),
            _ => None,
        }
    }

    /// The steps this state takes, for an error that names them.
    pub fn expected(self) -> String {
        let steps: Vec<&str> = StepKind::ALL
            .iter()
            .filter(|&&step| self.after(step).is_some())
            .map(|step| step.name())
            .collect();
        steps.join(" or ")
    }

    /// What this state means, for an error.
    pub fn describe(self) -> &'static str {
        match self {
            State::Idle => "no migration is prepared on this link",
            State::Prepared => "the migration is prepared",
            State::Received => "the migration's images are here",
            State::Restored => "the migration's instance is restored",
            State::Armed => "the migration is armed",
            State::Announced => "the migration is announced",
            State::Failed => "a step of the migration failed",
        }
    }

    /// The refusal of `step`, out of order in this state.
    fn refuse(self, step: StepKind) -> Cause {
        Cause::OutOfOrder {
            step,
            state: self.describe(),
            expected: self.expected(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    /// The steps the source sends, in order (source.rs; the same in both
    /// modes), and the state each leaves the destination in.
    const SOURCE_SENDS: [(StepKind, State); 8] = [
        (StepKind::Prepare, State::Prepared),
        (StepKind::Images, State::Received),
        (StepKind::Restore, State::Restored),
        (StepKind::Outputs, State::Restored),
        (StepKind::Outputs, State::Restored),
        (StepKind::Arm, State::Armed),
        (StepKind::Announce, State::Announced),
        (StepKind::Finish, State::Idle),
    ];

    #[test]
    fn the_steps_the_source_sends_pass_in_order() {
        let mut state = State::Idle;
        for (step, next) in SOURCE_SENDS {
            assert_eq!(state.after(step), Some(next), "{step} in {state:?}");
            state = next;
        }
        // A rollback (the source's, or a failed step's) before the handover.
        for (_, state) in &SOURCE_SENDS[..6] {
            assert_eq!(state.after(StepKind::Abort), Some(State::Idle), "{state:?}");
        }
        assert_eq!(State::Failed.after(StepKind::Abort), Some(State::Idle));
    }

    #[test]
    fn a_step_out_of_order_or_repeated_is_refused_naming_the_expected_one() {
        // In every state the source's steps pass through, only its next
        // step, `attach` in place of `prepare` (a replica kept), `outputs`,
        // `watch`, `feed` (a replica adopted) or `arm` while it compares,
        // and `abort` before the handover are taken.
        let mut state = State::Idle;
        for (expected, next) in SOURCE_SENDS {
            for step in StepKind::ALL {
                let comparing = [
                    StepKind::Outputs,
                    StepKind::Watch,
                    StepKind::Feed,
                    StepKind::Arm,
                ];
                let taken = step == expected
                    || (state == State::Idle && step == StepKind::Attach)
                    || (state == State::Restored && comparing.contains(&step))
                    || (step == StepKind::Abort
                        && ![State::Idle, State::Announced].contains(&state));
                assert_eq!(state.after(step).is_some(), taken, "{step} in {state:?}");
                if !taken {
                    let refused = state.refuse(step).to_string();
                    let (head, names) = refused.split_once("; expected ").unwrap();
                    assert!(
                        head.starts_with(&format!("{step} out of order")),
                        "{refused}"
                    );
                    assert!(
                        names.split(" or ").any(|n| n == expected.name()),
                        "{refused}"
                    );
                }
            }
            state = next;
        }
        // The cases that mattered: an announce right after prepare, a
        // second prepare, images twice, abort after the announce.
        assert_eq!(State::Prepared.after(StepKind::Announce), None);
        assert_eq!(State::Prepared.after(StepKind::Prepare), None);
        assert_eq!(State::Received.after(StepKind::Images), None);
        assert_eq!(State::Announced.after(StepKind::Abort), None);
        // After a failed step, only the rollback.
        assert_eq!(State::Failed.expected(), "abort");
        assert_eq!(
            State::Idle.refuse(StepKind::Images).to_string(),
            "images out of order: no migration is prepared on this link; expected prepare or \
             attach"
        );
    }

    #[test]
    fn an_armed_destination_waits_at_least_the_sources_deadline() {
        for deadline_ms in [1, 800, 10_000, MAX_DEADLINE_MS] {
            let deadline = Duration::from_millis(deadline_ms);
            assert!(armed_grace(deadline) >= deadline + HANDOVER_MARGIN);
            // And a quiet link is given as long, whatever the host's limit.
            assert!(idle_limit(Duration::from_secs(1), deadline) >= armed_grace(deadline));
            assert!(idle_limit(Duration::from_secs(900), deadline) >= Duration::from_secs(900));
        }
    }

    #[test]
    fn outputs_answer_with_the_migrations_own_flows_only() {
        let flow = |flow_id| TargetFlow {
            flow_id,
            spec: crate::service::FlowSpec {
                cps: "192.0.2.1:4000".parse().unwrap(),
                service: "192.0.2.10:5000".parse().unwrap(),
            },
        };
        let ours = [flow(7)];
        let output = |flow_id, seq| RecordHeader {
            kind: RECORD_OUTPUT,
            flow_id,
            seq,
            ..Default::default()
        };
        assert!(compared(&output(7, 11), &ours, 10));
        assert!(!compared(&output(8, 11), &ours, 10), "another service's");
        assert!(
            !compared(&output(7, 10), &ours, 10),
            "answers an earlier input"
        );
        let input = RecordHeader {
            kind: dataplane_common::RECORD_INPUT,
            ..output(7, 11)
        };
        assert!(!compared(&input, &ours, 10));
    }

    #[test]
    fn a_gate_opened_past_k_is_a_handover_and_a_muted_one_is_not() {
        let grace = Duration::from_secs(5);
        assert!(wait_for_handover(|| vec![OUTPUT_MUTE, OUTPUT_FROM], grace));
        let start = Instant::now();
        assert!(!wait_for_handover(|| vec![OUTPUT_MUTE], grace));
        // Nothing armed: nothing to wait for.
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn an_armed_gate_is_waited_for_up_to_the_grace() {
        // The source's kernel may cut over at its next input with its
        // daemon gone: a gate that opens within the grace is a handover.
        let reads = Cell::new(0);
        let opens_at_third_read = || {
            reads.set(reads.get() + 1);
            vec![if reads.get() >= 3 {
                OUTPUT_FROM
            } else {
                OUTPUT_ARMED
            }]
        };
        assert!(wait_for_handover(
            opens_at_third_read,
            Duration::from_secs(5)
        ));
        assert_eq!(reads.get(), 3);
        // One that stays armed is not, once the grace has passed.
        let grace = Duration::from_millis(50);
        let start = Instant::now();
        assert!(!wait_for_handover(|| vec![OUTPUT_ARMED], grace));
        assert!(start.elapsed() >= grace);
    }
}
