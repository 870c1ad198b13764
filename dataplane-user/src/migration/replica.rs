//! A hot replica on another host, driven from the serving host: a
//! migration kept between its convergence and its cutover.
//!
//! `replica.start` runs a migration's first phases (prepare, checkpoint,
//! transfer, restore and replay, convergence) and then stays: the mirror
//! goes on feeding the replica every input in the service's order, its
//! outputs stay muted, and this host compares them with the serving
//! instance's, round after round, for as long as the replica lives. A
//! planned migration to the replica's host ([`Command::Handover`]) is then
//! one more comparison and the cutover, with no CRIU at request time. An
//! output that differs once the replica was in sync ends it (diverged):
//! both hosts undo it, and it is restored afresh from a new checkpoint, at
//! most [`MAX_RESYNCS`] times.
use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::{UnboundedReceiver, error::TryRecvError};

use crate::{
    host::tasks::CpuTime,
    kernel::logs::Subscription,
    migration::{
        Context, Request,
        converge::Comparator,
        destination::PARKED_FOR,
        error::{Cause, MigrationError},
        hold,
        journal::FlowBefore,
        protocol::{Step, Watching},
        source::{self, Comparing, Migration, Progress, Source},
    },
    peer::{self, PeerError},
    report::{Mode, ReplicaState, ReplicaStatus, Report, Stage, State},
    service::Service,
};

/// What `replica.start` asks: a hot replica of `service` on the host whose
/// daemon listens at `to`. The checkpoint it starts from is taken of the
/// service's standby if it has one (the serving instance never pauses),
/// else of the serving instance left running.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaRequest {
    pub service: String,
    pub to: SocketAddr,
    /// Consecutive matching outputs that make it in sync.
    #[serde(default = "super::default_converge")]
    pub converge: u32,
    /// How long its first convergence may take, ms.
    #[serde(default = "super::default_deadline_ms")]
    pub deadline_ms: u64,
    #[serde(default)]
    pub compare: Comparator,
    #[serde(default)]
    pub hold: hold::Budget,
}

impl ReplicaRequest {
    /// The migration that builds the replica, checkpointing in `mode`.
    pub fn migration(&self, mode: Mode) -> Request {
        Request {
            service: self.service.clone(),
            to: self.to,
            mode,
            converge: self.converge,
            deadline_ms: self.deadline_ms,
            compare: self.compare.clone(),
            pre_dump_rounds: 0,
            hold: self.hold,
            keep_replica: false,
        }
    }
}

/// What the daemon tells a running replica.
pub enum Command {
    /// Hand the service over to the replica, as migration `id` asked by
    /// `request` (its deadline bounds the wait for K) at `asked`, stopped
    /// by `abort`.
    Handover {
        id: String,
        request: Request,
        asked: Instant,
        abort: Arc<AtomicBool>,
    },
    /// End the replica: its host removes it; this host serves on.
    Stop,
    /// This daemon stops: leave an in-sync replica as it is (its host
    /// keeps it) for the next start to attach to again; end one not in sync.
    Leave,
}

/// How a replica ended: its own last report, and the handover's if there
/// was one (the service is the other host's if that one picked K).
pub struct Ended {
    pub replica: Report,
    pub handover: Option<Report>,
    /// The replica's host took the service over (this one had gone
    /// silent): this host has let go of it.
    pub taken_over: bool,
}

/// Times a replica is restored afresh, after it diverged or failed once
/// restored, before it gives up.
pub const MAX_RESYNCS: u32 = 3;

/// How long one round of comparison waits for the replica's outputs: it
/// also bounds how long a handover waits for the round under way.
const ROUND_MS: u64 = 5;
/// Most outputs one round takes (what one `outputs` answer carries).
const ROUND_OUTPUTS: usize = 1024;
/// How often watchers are shown the replica's lag.
const SHOW_EVERY: Duration = Duration::from_millis(100);

/// A replica kept on its host that this one attaches to instead of
/// making one.
pub struct Attach {
    /// The service's flows before it, as the journal has them (a flow it
    /// does not name: as loaded now).
    pub before: Vec<FlowBefore>,
    /// A replica adopted from the instance a handover's source kept: the
    /// handover's K and this host's inputs since its `arm`, which feed it.
    pub fed: Option<(u64, Subscription)>,
}

/// Runs the replica `id` of `service` until it is handed over to, stopped
/// (`commands`), aborted, or gives up; `progress` sees its report (and a
/// handover's) as they change. With `attach` it attaches to a replica
/// kept on its host (by this daemon's previous run, or adopted from the
/// instance a handover's source kept), and restores one afresh only if
/// that fails.
pub async fn run(
    id: String,
    service: Service,
    request: Request,
    context: Context,
    progress: impl Fn(&Report) + Send + Sync + 'static,
    mut commands: UnboundedReceiver<Command>,
    mut attach: Option<Attach>,
) -> Ended {
    let progress: Progress = Arc::new(progress);
    let mut status = ReplicaStatus::default();
    loop {
        let mut replica = Migration::new(
            id.clone(),
            service.clone(),
            request.clone(),
            context.clone(),
            progress.clone(),
        );
        // Counted afresh for each restore; what made it re-sync stays.
        replica.report.replica = Some(ReplicaStatus {
            resyncs: status.resyncs,
            mismatch: status.mismatch.clone(),
            ..Default::default()
        });
        let cpu = CpuTime::now();
        let attaching = attach.take();
        let attached = attaching.is_some();
        let kept = keep(&mut replica, &mut commands, attaching).await;
        let (outcome, handover) = match kept {
            Ok(Kept::Left) => {
                tracing::info!(replica = %id, "the daemon stops: the hot replica is left in sync, for the next start");
                return Ended {
                    replica: replica.leave(),
                    handover: None,
                    taken_over: false,
                };
            }
            Ok(Kept::Stopped) => (Ok(State::Stopped), None),
            // Handed over, or rolled back by the handover that failed.
            Ok(Kept::HandedOver(h)) => {
                let outcome = match &h.error {
                    Some(e) if h.handover_seq == 0 => {
                        Err(replica.fail(Cause::HandoverFailed(e.clone())))
                    }
                    _ => Ok(State::Done),
                };
                (outcome, Some(*h))
            }
            // Stopped before it was in sync: the stop aborted it.
            Err(e) if matches!(e.cause, Cause::Aborted) && stop_asked(&mut commands) => {
                (Ok(State::Stopped), None)
            }
            // Its host took the service over while this one was cut off
            // from both networks: this host stops serving it.
            Err(e) if e.taken_over() => {
                let fenced = source::fence(&replica.service, &context);
                tracing::warn!(replica = %id, "{e}: {fenced}");
                return Ended {
                    replica: replica.conclude(cpu, Err(e)),
                    handover: None,
                    taken_over: true,
                };
            }
            Err(e) => {
                if let (Some(status), Some(mismatch)) = (&mut replica.report.replica, mismatch(&e))
                {
                    status.mismatch = Some(mismatch);
                }
                let attach_failed = attached && e.phase == Stage::Prepare;
                if (resyncs(&e) || attach_failed) && status.resyncs < MAX_RESYNCS {
                    tracing::warn!(replica = %id, "{e}: restoring the replica afresh");
                    context.files.remove(super::journal::Side::Source, &id);
                    status = replica.report.replica.take().unwrap_or_default();
                    status.resyncs += 1;
                    continue;
                }
                // A replica that was in sync waits out a migration network
                // that is down (its re-sync cannot even prepare), and is
                // made afresh once it is back.
                if status.resyncs > 0 && unreachable(&e) {
                    tracing::warn!(replica = %id, "{e}: trying again in {RETRY:?}");
                    context.files.remove(super::journal::Side::Source, &id);
                    // Shown syncing meanwhile: no handover is taken.
                    if let Some(status) = &mut replica.report.replica {
                        status.state = ReplicaState::Syncing;
                    }
                    replica.show();
                    status = replica.report.replica.take().unwrap_or_default();
                    if wait_for_retry(&mut commands).await {
                        continue;
                    }
                    (Ok(State::Stopped), None)
                } else {
                    (Err(e), None)
                }
            }
        };
        return Ended {
            replica: replica.conclude(cpu, outcome),
            handover,
            taken_over: false,
        };
    }
}

/// How a replica that got past its first phases ended.
enum Kept {
    /// On request: both hosts have undone it.
    Stopped,
    /// A handover was asked for: its report.
    HandedOver(Box<Report>),
    /// Left as it is for this daemon's next start (see [`Command::Leave`]).
    Left,
}

/// Whether a stop is among the commands not taken yet.
fn stop_asked(commands: &mut UnboundedReceiver<Command>) -> bool {
    std::iter::from_fn(|| commands.try_recv().ok())
        .any(|c| matches!(c, Command::Stop | Command::Leave))
}

/// How long a replica waits before it tries its host again.
const RETRY: Duration = Duration::from_secs(1);

/// Whether a replica failed because its host cannot be reached: the
/// migration network is down here, or the link cannot be made.
fn unreachable(e: &MigrationError) -> bool {
    e.phase == Stage::Prepare
        && matches!(
            e.cause,
            Cause::MigrationNetworkDown(_) | Cause::Connect { .. }
        )
}

/// Waits [`RETRY`] before the next attempt: false if a stop came
/// meanwhile (a handover is refused while out of sync, and never comes).
async fn wait_for_retry(commands: &mut UnboundedReceiver<Command>) -> bool {
    let until = tokio::time::Instant::now() + RETRY;
    loop {
        match tokio::time::timeout_at(until, commands.recv()).await {
            Err(_) => return true,
            Ok(Some(Command::Stop | Command::Leave) | None) => return false,
            Ok(Some(Command::Handover { .. })) => {}
        }
    }
}

/// Whether a replica that failed this way is restored afresh: it had been
/// restored (it diverged, or never converged, or its instance died), and
/// was not aborted.
fn resyncs(e: &MigrationError) -> bool {
    matches!(e.phase, Stage::Converge | Stage::Replica) && !matches!(e.cause, Cause::Aborted)
}

/// The pair of outputs that told the instances apart, if that is why
/// the replica failed: the input, and how they differ.
fn mismatch(e: &MigrationError) -> Option<String> {
    let (seq, why) = match &e.cause {
        Cause::Diverged { seq, why } => (seq, why),
        Cause::NotConverged(n) => n.last_mismatch.as_ref().map(|(seq, why)| (seq, why))?,
        _ => return None,
    };
    Some(format!("input {seq}: {why}"))
}

/// Builds the replica (or, `attach`, attaches to the one kept) and keeps
/// it in sync, attaching to it again whenever its link goes while it is
/// in sync; anything but a handover ends with both hosts undoing it.
async fn keep(
    replica: &mut Migration,
    commands: &mut UnboundedReceiver<Command>,
    attach: Option<Attach>,
) -> Result<Kept, MigrationError> {
    let mut attached = attach.is_some();
    let (mut feed, (mut source, mut link)) = match attach {
        Some(Attach { before, fed }) => {
            let (after, inputs) = fed.unzip();
            (after, replica.attach(&before, inputs).await?)
        }
        None => (None, replica.open().await?),
    };
    loop {
        let how = match (attached, feed.take()) {
            (_, Some(after)) => Synced::Fed(after),
            (true, None) => Synced::Attached,
            (false, None) => Synced::Restored,
        };
        let kept = sync_and_compare(replica, &mut source, &mut link, commands, how).await;
        if let Err(e) = &kept
            && link_lost(replica, e)
        {
            tracing::warn!(replica = %replica.report.id, "{e}: attaching to it again");
            match reattach(replica, &mut source, commands).await {
                Ok(again) => {
                    link = again;
                    attached = true;
                    continue;
                }
                Err(Some(refused)) => {
                    replica.rollback(&mut source, &mut link).await;
                    return Err(refused);
                }
                Err(None) => {}
            }
        }
        if !matches!(kept, Ok(Kept::HandedOver(_) | Kept::Left)) {
            replica.rollback(&mut source, &mut link).await;
        }
        return kept;
    }
}

/// Whether the replica, in sync, lost its link (its host's daemon
/// restarted, or the migration network went): its host keeps it for a
/// while ([`PARKED_FOR`]) for this one to attach again.
fn link_lost(replica: &Migration, e: &MigrationError) -> bool {
    let in_sync = replica.report.replica.as_ref().map(|r| r.state) == Some(ReplicaState::InSync);
    in_sync
        && !e.taken_over()
        && matches!(
            e.cause,
            Cause::Destination(PeerError::Io(_) | PeerError::Refused(_))
        )
}

/// Attaches again to the replica whose link went, once a second for as
/// long as its host keeps it: the new link; or why its host refused (the
/// replica is gone there, or missed inputs, or the host took the service
/// over); or nothing (stopped, or its host never came back).
async fn reattach(
    replica: &mut Migration,
    source: &mut Source,
    commands: &mut UnboundedReceiver<Command>,
) -> Result<peer::Link, Option<MigrationError>> {
    if let Some(status) = &mut replica.report.replica {
        status.state = ReplicaState::Syncing;
    }
    replica.show();
    // Not kept there (yet): its host may not have seen the old link end.
    let not_kept = Cause::NoReplica(replica.report.id.clone()).to_string();
    let until = Instant::now() + PARKED_FOR;
    while Instant::now() < until {
        if !wait_for_retry(commands).await {
            return Err(None);
        }
        match replica.link_again(source).await {
            Ok(link) => return Ok(link),
            Err(e) => match &e.cause {
                Cause::Destination(PeerError::StepFailed(why)) if *why != not_kept => {
                    return Err(Some(e));
                }
                _ => tracing::debug!(replica = %replica.report.id, "{e}"),
            },
        }
    }
    Err(None)
}

/// How a replica gets to where it is compared from.
#[derive(Clone, Copy)]
enum Synced {
    /// Restored from a checkpoint and replayed.
    Restored,
    /// Attached to again as it was kept.
    Attached,
    /// Adopted, and fed the inputs after this K.
    Fed(u64),
}

/// Restores the replica (or compares the one attached to from now on, or
/// feeds the one adopted), waits for N matching outputs in a row, then
/// compares every output until a command comes or one differs.
async fn sync_and_compare(
    replica: &mut Migration,
    source: &mut Source,
    link: &mut peer::Link,
    commands: &mut UnboundedReceiver<Command>,
    how: Synced,
) -> Result<Kept, MigrationError> {
    let compare_after = match how {
        Synced::Restored => replica.establish(source, link).await?,
        Synced::Attached => source.last_seq(),
        Synced::Fed(after) => replica.feed(source, link, after).await?,
    };
    let attached = matches!(how, Synced::Attached);
    let mut comparing = Comparing::after_replay(compare_after, replica.request.converge);
    replica.converge(source, link, &mut comparing).await?;
    let t = replica.begin(Stage::Replica)?;
    let synced = replica.started().elapsed();
    let failover_after_ms = watch(replica, link).await?;
    // In sync: a restart of this daemon keeps it, and attaches again.
    replica
        .write_journal(source, true)
        .map_err(|e| replica.fail(e))?;
    if let Some(status) = &mut replica.report.replica {
        if attached {
            status.reattached += 1;
        } else {
            status.sync_us = synced.as_micros() as u64;
        }
        status.state = ReplicaState::InSync;
        status.failover_after_ms = failover_after_ms;
    }
    tracing::info!(replica = %replica.report.id, to = %replica.request.to,
        sync_ms = synced.as_millis() as u64, "the hot replica is in sync");
    let mut shown: Option<Instant> = None;
    loop {
        if shown.is_none_or(|at| at.elapsed() >= SHOW_EVERY) {
            update(replica, source, &comparing);
            replica.show();
            shown = Some(Instant::now());
        }
        match commands.try_recv() {
            Ok(Command::Handover {
                id,
                request,
                asked,
                abort,
            }) => {
                replica.end(t);
                let mut handover = Migration::new(
                    id,
                    replica.service.clone(),
                    request,
                    Context {
                        abort,
                        ..replica.context.clone()
                    },
                    replica.progress(),
                );
                // T_M counts from the request, the round it waited for included.
                handover.started_at(asked);
                let report = hand_over(handover, replica, source, link, &mut comparing).await;
                return Ok(Kept::HandedOver(Box::new(report)));
            }
            Ok(Command::Stop) | Err(TryRecvError::Disconnected) => {
                replica.end(t);
                return Ok(Kept::Stopped);
            }
            Ok(Command::Leave) => {
                replica.end(t);
                return Ok(Kept::Left);
            }
            Err(TryRecvError::Empty) => {}
        }
        replica.check_abort()?;
        replica
            .compare(source, link, &mut comparing, ROUND_OUTPUTS, ROUND_MS)
            .await?;
        if !comparing.convergence.converged() {
            let Some((seq, why)) = comparing.convergence.last_mismatch.clone() else {
                unreachable!("only a mismatch ends a run of matches");
            };
            update(replica, source, &comparing);
            if let Some(status) = &mut replica.report.replica {
                status.state = ReplicaState::Diverged;
            }
            replica.show();
            return Err(replica.fail(Cause::Diverged { seq, why }));
        }
    }
}

/// Has the replica's host watch this one, to take the service over should
/// this host stop: after how long a silence it would (0: it would not).
async fn watch(replica: &Migration, link: &mut peer::Link) -> Result<u64, MigrationError> {
    let holder = crate::host::netdev::Interface::by_name(&replica.context.interface)
        .map_err(|e| replica.fail(crate::kernel::loader::LoadError::from(e)))?
        .mac;
    let watching: Watching = source::step(link, &Step::Watch { holder })
        .await
        .map_err(|e| replica.fail(e))?;
    Ok(watching.failover_after_ms)
}

/// The replica's figures as the comparison has them now.
fn update(replica: &mut Migration, source: &Source, comparing: &Comparing) {
    let compared = comparing.convergence.compared();
    replica.report.compared = compared;
    if let Some(status) = &mut replica.report.replica {
        status.compared = compared;
        status.compared_up_to = comparing.convergence.compared_up_to();
        status.lag = source.last_seq().saturating_sub(status.compared_up_to);
    }
}

/// Hands the service over to the in-sync `replica` as migration
/// `handover`: the replica's latest output compared, then the cutover. A
/// failure before the flip rolls both hosts back (the replica with it).
async fn hand_over(
    mut handover: Migration,
    replica: &Migration,
    source: &mut Source,
    link: &mut peer::Link,
    comparing: &mut Comparing,
) -> Report {
    handover.report.mode = replica.report.mode;
    handover.report.from_replica = Some(replica.report.id.clone());
    handover.report.image_bytes = replica.report.image_bytes;
    handover.report.checkpoint_seq = replica.report.checkpoint_seq;
    handover.report.destination_pid = replica.report.destination_pid;
    let cpu = CpuTime::now();
    let outcome = last_comparison_and_cutover(&mut handover, source, link, comparing).await;
    if outcome.is_err() {
        handover.settle_failure(source, link).await;
    }
    handover.conclude(cpu, outcome.map(|()| State::Done))
}

async fn last_comparison_and_cutover(
    handover: &mut Migration,
    source: &mut Source,
    link: &mut peer::Link,
    comparing: &mut Comparing,
) -> Result<(), MigrationError> {
    let t = handover.begin(Stage::Converge)?;
    // Every output so far was compared; the replica's next one is too
    // (at most one control period away), so that what is handed over is
    // what answered last.
    handover.compare(source, link, comparing, 1, 100).await?;
    if !comparing.convergence.converged()
        && let Some((seq, why)) = comparing.convergence.last_mismatch.clone()
    {
        return Err(handover.fail(Cause::Diverged { seq, why }));
    }
    handover.report.compared = comparing.convergence.compared();
    handover.end(t);
    handover.cutover(source, link).await
}
