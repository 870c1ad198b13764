//! The source's side of a migration: prepare, checkpoint, transfer,
//! restore, then converge and cut over; a rollback on any failure before
//! the flip.
use std::{
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use dataplane_common::{
    CUT_AT_NEXT, FlowKey, MirrorTarget, OUTPUT_ARMED, OUTPUT_MUTE, RECORD_FLOODED, RECORD_OUTPUT,
    decide::gate_open,
};
use serde_json::Value;

use crate::{
    criu::precopy::IterativeDump,
    host::{container::Containers, runc::Image},
    kernel::{
        flow,
        loader::Dataplane,
        logs::{LogError, LogGuard, Record, Records, Subscription},
    },
    migration::{
        Context, Request,
        converge::{Answer, Convergence, Pairing},
        cutover::{self, Handover},
        destination,
        error::{Cause, MigrationError, NotConverged},
        hold::{self, FlowPosition},
        instance::Checkpointed,
        journal::{FlowBefore, Incoming, Journal, Outgoing, ReplicaHere, Side},
        protocol::{
            FedInput, Finished, KeepReplica, Output, Prepared, Restored, SUBSCRIPTION_CAPACITY,
            Step, TargetFlow,
        },
    },
    peer,
    planning::policy::StopPolicy,
    report::{Mode, Phase, Report, Stage, State},
    service::{Runtime, Service},
};

/// Runs the migration `id` of `service`; `progress` sees the report after
/// every phase. The final report says how it ended.
pub async fn run(
    id: String,
    service: Service,
    request: Request,
    context: Context,
    progress: impl Fn(&Report) + Send + Sync + 'static,
) -> Report {
    let mut migration = Migration::new(id, service, request, context, Arc::new(progress));
    let cpu = crate::host::tasks::CpuTime::now();
    let outcome = migration.execute().await;
    migration.conclude(cpu, outcome.map(|()| State::Done))
}

/// What sees a migration's report after every phase.
pub(super) type Progress = Arc<dyn Fn(&Report) + Send + Sync>;

/// One migration from this host (or a hot replica's life, see
/// [`super::replica`]): its request, its report, and what it works with.
pub(super) struct Migration {
    start: Instant,
    pub(super) report: Report,
    progress: Progress,
    pub(super) service: Service,
    pub(super) request: Request,
    pub(super) context: Context,
    /// The container the checkpoint is taken of, if the instance runs as
    /// one (from `prepare` on): its rootfs here and its image.
    container: Option<(PathBuf, Image)>,
}

/// The source's side of the steps, for rollback.
pub(super) struct Source {
    dataplane: Dataplane,
    /// The id the service's flows share here: one numbering, one gate.
    flow_id: u32,
    /// Their id on the destination (from `prepare` on), which every later
    /// step and the mirror copies use.
    remote_id: u32,
    /// The service's flows, each with its flags before the migration.
    flows: Vec<FlowBefore>,
    inputs: Subscription,
    outputs: Subscription,
    /// Whether the input log failed an input since the migration began.
    log: LogGuard,
}

impl Migration {
    pub(super) fn new(
        id: String,
        service: Service,
        request: Request,
        context: Context,
        progress: Progress,
    ) -> Self {
        Self {
            start: Instant::now(),
            report: Report {
                id,
                service: service.name.clone(),
                to: request.to.to_string(),
                mode: request.mode,
                state: State::Running,
                ..Default::default()
            },
            progress,
            service,
            request,
            context,
            container: None,
        }
    }

    /// Ends the migration with `outcome` (the state it ended in, or why
    /// it failed): its journal goes, the report gets its totals and
    /// state, and is shown a last time.
    pub(super) fn conclude(
        &mut self,
        cpu: crate::host::tasks::CpuTime,
        outcome: Result<State, MigrationError>,
    ) -> Report {
        // The images went with the transfer; the journal goes now.
        self.context.files.remove(Side::Source, &self.report.id);
        let report = &mut self.report;
        // A handover set it at `finish` (see `cutover`).
        if report.total_us == 0 {
            report.total_us = self.start.elapsed().as_micros() as u64;
        }
        (report.load.source_daemon_us, report.load.source_criu_us) =
            crate::host::tasks::CpuTime::since(cpu);
        match outcome {
            Ok(state) => {
                report.state = state;
                report.phase = Stage::Done;
            }
            Err(e) => {
                report.state = State::Failed;
                report.error = Some(e.to_string());
            }
        }
        (self.progress)(&self.report);
        self.report.clone()
    }

    /// Ends a hot replica's task with the replica left in place, its
    /// journal kept for the daemon's next start (see `replica::Command::Leave`).
    pub(super) fn leave(&mut self) -> Report {
        self.report.state = State::Stopped;
        (self.progress)(&self.report);
        self.report.clone()
    }

    /// What sees the report.
    pub(super) fn progress(&self) -> Progress {
        self.progress.clone()
    }

    /// Shows the report as it is now.
    pub(super) fn show(&self) {
        (self.progress)(&self.report);
    }

    /// When the migration started.
    pub(super) fn started(&self) -> Instant {
        self.start
    }

    /// Counts the migration from `at`, when it was asked for.
    pub(super) fn started_at(&mut self, at: Instant) {
        self.start = at;
    }

    pub(super) fn fail(&self, cause: impl Into<Cause>) -> MigrationError {
        MigrationError {
            phase: self.report.phase,
            cause: cause.into(),
        }
    }

    pub(super) fn begin(&mut self, phase: Stage) -> Result<Instant, MigrationError> {
        self.report.phase = phase;
        (self.progress)(&self.report);
        self.check_abort()?;
        Ok(Instant::now())
    }

    /// An error once `migration.abort` (or a stopping daemon) asked the
    /// migration to stop: it rolls back from there. Past the handover (K
    /// picked) there is nothing to roll back to: the destination serves,
    /// and the migration finishes.
    pub(super) fn check_abort(&self) -> Result<(), MigrationError> {
        match self.context.abort.load(Ordering::Relaxed) && self.report.flip_ns == 0 {
            true => Err(self.fail(Cause::Aborted)),
            false => Ok(()),
        }
    }

    pub(super) fn end(&mut self, started: Instant) {
        self.report.phases.push(Phase {
            name: self.report.phase,
            start_us: (started - self.start).as_micros() as u64,
            duration_us: started.elapsed().as_micros() as u64,
        });
        (self.progress)(&self.report);
    }

    async fn execute(&mut self) -> Result<(), MigrationError> {
        let (mut source, mut link) = self.open().await?;
        let outcome = self.migrate(&mut source, &mut link).await;
        if outcome.is_err() {
            self.settle_failure(&mut source, &mut link).await;
        }
        outcome
    }

    /// Prepares the destination and starts mirroring the service's flows
    /// to it (the `prepare` phase): this host's side of the migration and
    /// the link to the destination. A failure once the destination has
    /// prepared rolls both back.
    pub(super) async fn open(&mut self) -> Result<(Source, peer::Link), MigrationError> {
        self.link_up(None, None).await
    }

    /// Attaches again to this hot replica, kept on its host since its link
    /// (or a daemon) went, and points the mirror at it again: the flows
    /// were `before` it (as its journal says). A failure undoes this
    /// host's side.
    pub(super) async fn attach(
        &mut self,
        before: &[FlowBefore],
        inputs: Option<Subscription>,
    ) -> Result<(Source, peer::Link), MigrationError> {
        self.link_up(Some(before), inputs).await
    }

    /// `open`, or with `attach_to` (the flows before it) `attach`;
    /// `inputs`: the service's inputs here as a subscription has them
    /// already.
    async fn link_up(
        &mut self,
        attach_to: Option<&[FlowBefore]>,
        inputs: Option<Subscription>,
    ) -> Result<(Source, peer::Link), MigrationError> {
        let t = self.begin(Stage::Prepare)?;
        if attach_to.is_none() {
            self.container = self.checkpointed_container()?;
        }
        let mut source = self.source_side(attach_to, inputs)?;
        let linked = match attach_to {
            None => self.connect(&self.prepare_step()).await,
            Some(_) => {
                let linked = self.connect(&self.attach_step(&source)).await;
                if linked.is_err() {
                    source.undo_here();
                }
                linked
            }
        };
        let (mut link, linked) = linked?;
        source.remote_id = linked.remote_id;
        if attach_to.is_some() {
            self.report.destination_pid = linked.pid;
        }
        // From here on the destination holds state: a failure rolls it back.
        // Should this daemon die before the end, the journal tells the next
        // start what to undo (or, for a hot replica, keep).
        let mirrored = self
            .write_journal(&source, attach_to.is_some())
            .and_then(|()| {
                source.mirror_to(&linked)?;
                // The serving instance's outputs are paired with the
                // destination's by the input they answer: counted from
                // here on, as the destination counts its instance's (see
                // `TAG_COUNTED`); a replica attached to again counts on.
                if attach_to.is_none() {
                    let dataplane = &source.dataplane;
                    let flow_id = source.flow_id;
                    let delivered = || dataplane.sequence(flow_id).map_or(0, |s| s.last_delivered);
                    dataplane.gate_window()?.count_answers(flow_id, delivered);
                }
                Ok(())
            });
        self.end(t);
        if let Err(e) = mirrored {
            self.rollback(&mut source, &mut link).await;
            return Err(self.fail(e));
        }
        Ok((source, link))
    }

    /// The service's flows here (with their flags before the migration:
    /// as loaded now, or `before`) and its logs.
    fn source_side(
        &self,
        before: Option<&[FlowBefore]>,
        inputs: Option<Subscription>,
    ) -> Result<Source, MigrationError> {
        let specs = &self.service.flows;
        if specs.is_empty() {
            return Err(self.fail(Cause::FlowCount(0)));
        }
        let dataplane = Dataplane::open(&self.context.pin_root).map_err(|e| self.fail(e))?;
        let loaded = dataplane.flows().map_err(|e| self.fail(e))?;
        let mut flows = Vec::new();
        let mut ids = Vec::new();
        for spec in specs {
            let key = flow::udp(spec.cps, spec.service);
            let (_, config) = loaded
                .iter()
                .find(|(k, _)| *k == key)
                .ok_or_else(|| self.fail(Cause::FlowNotLoaded(flow::display(&key))))?;
            let flags = before
                .and_then(|b| b.iter().find(|f| f.flow == *spec))
                .map_or(config.flags, |f| f.flags);
            flows.push(FlowBefore { flow: *spec, flags });
            ids.push(config.flow_id);
        }
        // Registration joined them: one numbering, held and handed over as one.
        ids.dedup();
        let [flow_id] = ids[..] else {
            return Err(self.fail(Cause::FlowsApart(ids)));
        };
        let subscribe = |tap: &std::sync::Arc<crate::kernel::logs::Tap>| {
            tap.subscribe(&[flow_id], SUBSCRIPTION_CAPACITY)
                .map_err(|e| self.fail(e))
        };
        let inputs = match inputs {
            Some(inputs) => inputs,
            None => subscribe(&self.context.inputs)?,
        };
        let outputs = subscribe(&self.context.outputs)?;
        let log = LogGuard::new(&dataplane).map_err(|e| self.fail(e))?;
        Ok(Source {
            dataplane,
            flow_id,
            remote_id: 0,
            flows,
            inputs,
            outputs,
            log,
        })
    }

    /// A new link to this hot replica, kept on its host since the last one
    /// went, and the mirror pointed at it (as it was: the mirror went on).
    pub(super) async fn link_again(
        &mut self,
        source: &mut Source,
    ) -> Result<peer::Link, MigrationError> {
        let (link, linked) = self.connect(&self.attach_step(source)).await?;
        source.remote_id = linked.remote_id;
        source.mirror_to(&linked).map_err(|e| self.fail(e))?;
        Ok(link)
    }

    fn attach_step(&self, source: &Source) -> Step {
        Step::Attach {
            migration: self.report.id.clone(),
            service: self.service.name.clone(),
            last_seq: source.last_seq(),
        }
    }

    fn prepare_step(&self) -> Step {
        Step::Prepare {
            migration: self.report.id.clone(),
            service: self.service.name.clone(),
            flows: self.service.flows.clone(),
            // The destination waits at least this long for K once armed.
            deadline_ms: self.request.deadline_ms,
            command: self.service.command.clone(),
            standby: self.service.standby_pid.is_some(),
            container: self.container.as_ref().map(|(_, image)| image.clone()),
        }
    }

    /// Links to the destination over the migration network and sends
    /// `first` (`prepare` or `attach`): the link, and where the mirror
    /// copies go.
    async fn connect(&self, first: &Step) -> Result<(peer::Link, Linked), MigrationError> {
        // The mirror copies leave there: a migration without them cannot
        // replay.
        let peer_interface = self
            .context
            .peer_interface
            .as_deref()
            .ok_or_else(|| self.fail(Cause::NoPeerInterface))?;
        let running = crate::host::netdev::Interface::by_name(peer_interface)
            .map_err(|e| self.fail(crate::kernel::loader::LoadError::from(e)))?
            .running;
        if !running {
            return Err(self.fail(Cause::MigrationNetworkDown(peer_interface.into())));
        }
        let mut link = peer::connect(&self.context.trust, self.request.to)
            .await
            .map_err(|source| {
                self.fail(Cause::Connect {
                    to: self.request.to,
                    source,
                })
            })?
            .0;
        let prepared: Prepared = step(&mut link, first).await.map_err(|e| self.fail(e))?;
        let flows = self.service.flows.len();
        let remote_id = match prepared.flow_ids[..] {
            [first, ..]
                if prepared.flow_ids.len() == flows
                    && prepared.flow_ids.iter().all(|&id| id == first) =>
            {
                first
            }
            _ => {
                return Err(self.fail(Cause::FlowIds {
                    given: prepared.flow_ids,
                    flows,
                }));
            }
        };
        let linked = Linked {
            mirror_mac: prepared.mirror_mac,
            remote_id,
            pid: prepared.pid,
        };
        Ok((link, linked))
    }

    /// Writes this migration's journal; `replica`: a hot replica in sync,
    /// which a restarted daemon keeps.
    pub(super) fn write_journal(&self, source: &Source, replica: bool) -> Result<(), Cause> {
        let journal = Journal::Source(Outgoing {
            flow_id: source.flow_id,
            flows: source.flows.clone(),
            instances: self.service.registered.clone(),
            containers: self
                .service
                .instances()
                .filter_map(|(_, c)| c)
                .map(str::to_string)
                .collect(),
            runtime: self.service.runtime,
            replica: replica.then(|| self.request.clone()),
        });
        Ok(self.context.files.write(&self.report.id, &journal)?)
    }

    /// After a failure: before the flip, both sides roll back; handed over
    /// (the link went before `announce` or `finish`), the destination
    /// serves, as its own settling or recovery finds, and the instances
    /// here, which get no input past K, stop.
    pub(super) async fn settle_failure(&mut self, source: &mut Source, link: &mut peer::Link) {
        if self.report.flip_ns == 0 {
            self.rollback(source, link).await;
        } else {
            self.stop_instances();
            let outcome = source.let_go(&self.context.interface);
            tracing::info!(migration = %self.report.id, "{outcome}");
        }
    }

    /// Everything after `prepare`.
    async fn migrate(
        &mut self,
        source: &mut Source,
        link: &mut peer::Link,
    ) -> Result<(), MigrationError> {
        let replay_end = self.establish(source, link).await?;
        let mut comparing = Comparing::after_replay(replay_end, self.request.converge);
        self.converge(source, link, &mut comparing).await?;
        self.cutover(source, link).await
    }

    /// Checkpoints the instance at S, sends the images, and has the
    /// destination restore them and replay S+1 onwards: the last input
    /// the replay delivered.
    pub(super) async fn establish(
        &mut self,
        source: &mut Source,
        link: &mut peer::Link,
    ) -> Result<u64, MigrationError> {
        let position = self.checkpoint(source).await?;
        source.check_log().map_err(|e| self.fail(e))?;

        let t = self.begin(Stage::Transfer)?;
        let images = self.images();
        let id = self.report.id.clone();
        // Watchers see the bytes go, ten times a second.
        let mut shown = Instant::now();
        let mut progress = |bytes| {
            if shown.elapsed() >= Duration::from_millis(100) {
                shown = Instant::now();
                self.report.image_bytes = bytes;
                (self.progress)(&self.report);
            }
        };
        let sent = peer::transfer::send_counting(link, &id, &images, &mut progress).await;
        let _ = std::fs::remove_dir_all(&images);
        self.report.image_bytes = sent
            .map_err(|e| self.fail(Cause::Destination(e)))?
            .received
            .bytes;
        self.end(t);

        let t = self.begin(Stage::Restore)?;
        let restored: Restored = step(
            link,
            &Step::Restore {
                positions: vec![FlowPosition {
                    flow_id: source.remote_id,
                    ..position
                }],
                cpus: crate::host::tasks::cpus_of(self.service.pid).unwrap_or_default(),
            },
        )
        .await
        .map_err(|e| self.fail(e))?;
        self.report.destination_pid = restored.pid;
        self.report.criu_restore_us = restored.criu_us;
        self.report.replayed = restored.replayed;
        self.report.replay_rate =
            restored.replayed as f64 / (restored.replay_us.max(1) as f64 / 1e6);
        self.end(t);
        source.check_log().map_err(|e| self.fail(e))?;
        Ok(restored.replay_end)
    }

    /// The container the checkpoint is taken of, by mode, if the instance
    /// runs as one: it must still be the instance registered.
    fn checkpointed_container(&self) -> Result<Option<(PathBuf, Image)>, MigrationError> {
        let (id, pid) = match self.request.mode {
            Mode::LeaveRunning => (&self.service.container, Some(self.service.pid)),
            Mode::Standby => (&self.service.standby_container, self.service.standby_pid),
        };
        let (Some(id), Some(pid)) = (id, pid) else {
            return Ok(None);
        };
        let containers = &self.context.containers;
        let (init, image) = containers
            .image(self.service.runtime, id)
            .map_err(|e| self.fail(Cause::Container(e)))?;
        if init != pid || !self.service.still_runs(pid) {
            return Err(self.fail(Cause::NotRegistered(pid)));
        }
        Ok(Some((containers.images.join(&image.name), image)))
    }

    /// The instance the checkpoint is taken of, by mode.
    fn checkpointed(&self) -> Result<Checkpointed, MigrationError> {
        let dataplane = |root: &std::path::Path| Dataplane::open(root).map_err(|e| self.fail(e));
        let container = self.container.clone();
        match self.request.mode {
            Mode::LeaveRunning => Ok(Checkpointed {
                pid: self.service.pid,
                dataplane: dataplane(&self.context.pin_root)?,
                netns: None,
                interface: self.context.interface.clone(),
                container,
            }),
            Mode::Standby => {
                let pid = self.service.standby_pid.ok_or_else(|| {
                    self.fail(Cause::NoStandbyInstance(self.service.name.clone()))
                })?;
                let (netns, pin_root) = self
                    .context
                    .standby
                    .clone()
                    .ok_or_else(|| self.fail(Cause::NoStandbyConfigured))?;
                let dataplane = dataplane(&pin_root)?;
                let interface = dataplane
                    .attached_programs()
                    .map_err(|e| self.fail(e))?
                    .iter()
                    .find_map(|p| p.strip_suffix("/ingress").map(str::to_string))
                    .ok_or_else(|| self.fail(Cause::StandbyNotLoaded))?;
                Ok(Checkpointed {
                    pid,
                    dataplane,
                    netns: Some(netns),
                    interface,
                    container,
                })
            }
        }
    }

    /// Holds the checkpointed instance's inputs, waits for its socket to
    /// drain, dumps it (left running) and gives it the held inputs back.
    async fn checkpoint(&mut self, source: &mut Source) -> Result<FlowPosition, MigrationError> {
        let t = self.begin(Stage::Checkpoint)?;
        let mut instance = self.checkpointed()?;
        let (pid, flow_id) = (instance.pid, source.flow_id);
        if !self.service.still_runs(pid) {
            return Err(self.fail(Cause::NotRegistered(pid)));
        }
        let dump = instance
            .dump_request(&self.images())
            .map_err(|cause| self.fail(cause))?;
        // Pre-dump rounds copy most memory while the instance still serves.
        let rounds = match self.request.pre_dump_rounds {
            0 => IterativeDump::default(),
            max_rounds => {
                let policy = StopPolicy {
                    max_rounds,
                    ..StopPolicy::default()
                };
                let rounds =
                    tokio::task::block_in_place(|| self.context.criu.pre_dump(&dump, &policy))
                        .map_err(|e| self.fail(Cause::PreDump(e)))?;
                self.report.pre_dump = Some(match rounds.stop {
                    Some(stop) => format!("{} rounds, stopped: {stop:?}", rounds.rounds.len()),
                    None => "none: no memory tracking on this kernel, a single dump".into(),
                });
                rounds
            }
        };
        // Inputs cloned before the mirror to the peer was on are through by now.
        tokio::time::sleep(Duration::from_millis(1)).await;
        let taken = tokio::task::block_in_place(|| {
            instance.checkpoint(
                flow_id,
                &mut source.inputs,
                &self.context.criu,
                &rounds.final_dump(&dump),
                self.request.hold,
                &self.context.abort,
            )
        })
        .map_err(|cause| self.fail(cause))?;
        self.report.checkpoint_seq = taken.position.last_delivered;
        self.report.criu_dump_us = taken.dump_us;
        self.report.frozen_us = taken.frozen_us;
        if self.request.mode == Mode::LeaveRunning {
            self.report.held_us = taken.held_us;
        }
        self.check_abort()?;
        self.end(t);
        Ok(taken.position)
    }

    /// Compares the two instances' outputs, input by input, until
    /// `converge` in a row match; the deadline aborts.
    pub(super) async fn converge(
        &mut self,
        source: &mut Source,
        link: &mut peer::Link,
        comparing: &mut Comparing,
    ) -> Result<(), MigrationError> {
        let t = self.begin(Stage::Converge)?;
        let deadline = Instant::now() + Duration::from_millis(self.request.deadline_ms);
        while !comparing.convergence.converged() {
            self.check_abort()?;
            if Instant::now() > deadline {
                return Err(self.fail(NotConverged {
                    needed: self.request.converge,
                    deadline_ms: self.request.deadline_ms,
                    compared: comparing.convergence.compared(),
                    destination_up_to: comparing.pairing.after(),
                    source_up_to: comparing.pairing.reached(),
                    last_mismatch: comparing.convergence.last_mismatch.clone(),
                }));
            }
            let count = self.request.converge as usize;
            self.compare(source, link, comparing, count, 200).await?;
        }
        self.report.compared = comparing.convergence.compared();
        self.end(t);
        Ok(())
    }

    /// One round of comparison: the destination's next outputs (up to
    /// `count`, waiting at most `timeout_ms` for them), the source's
    /// answers to the same inputs, compared.
    pub(super) async fn compare(
        &self,
        source: &mut Source,
        link: &mut peer::Link,
        comparing: &mut Comparing,
        count: usize,
        timeout_ms: u64,
    ) -> Result<(), MigrationError> {
        // An overflow, not the mismatches it then causes, is the cause.
        source.check_log().map_err(|e| self.fail(e))?;
        // Past the checkpoint the inputs staged here only count losses.
        while source.inputs.try_next().is_some() {}
        let Comparing {
            pairing,
            convergence,
        } = comparing;
        let theirs: Vec<Output> = step(
            link,
            &Step::Outputs {
                after: pairing.after(),
                count,
                timeout_ms,
            },
        )
        .await
        .map_err(|e| self.fail(e))?;
        for output in theirs.into_iter().filter(|o| o.flow_id == source.remote_id) {
            pairing.theirs(output.seq, output.answer);
        }
        if let Some(last) = pairing.waiting_for() {
            // The source instance answers those inputs about as soon.
            source
                .collect_outputs(pairing, last, Duration::from_millis(200))
                .await;
            pairing.compare(&self.request.compare, convergence);
        }
        if source.outputs.lost() > 0 {
            return Err(self.fail(Cause::OutputsLost));
        }
        Ok(())
    }

    /// Agrees on K with the destination and flips.
    pub(super) async fn cutover(
        &mut self,
        source: &mut Source,
        link: &mut peer::Link,
    ) -> Result<(), MigrationError> {
        let t = self.begin(Stage::Cutover)?;
        let flow_id = source.flow_id;
        // The destination mutes its outputs until the first input the
        // source forwards past K; the source's kernel program picks K at
        // the first input numbered after the flip. No K is agreed ahead,
        // so no input can slip between an agreement and the flip, however
        // fast inputs come.
        let keep_replica = self.keep_replica();
        let _: Value = step(
            link,
            &Step::Arm {
                flows: vec![source.remote_id],
                keep_replica: keep_replica.clone(),
            },
        )
        .await
        .map_err(|e| self.fail(e))?;
        let window = source.dataplane.gate_window().map_err(|e| self.fail(e))?;
        // The last moment to back out if the source's log lost an input.
        source.check_log().map_err(|e| self.fail(e))?;
        let limit = Duration::from_millis(self.request.deadline_ms);
        let numbered = || source.last_seq();
        let handover =
            cutover::flip_and_wait(&window, flow_id, numbered, limit, &self.context.abort).await;
        let Handover { k, flip_ns } = match handover {
            Ok(handover) => handover,
            // A flip taken back on request fails for the request, not
            // for the quiet it was waiting through.
            Err(no_cutover) => {
                self.check_abort()?;
                return Err(self.fail(no_cutover));
            }
        };
        self.report.flip_ns = flip_ns;
        self.report.handover_seq = k;
        self.end(t);

        let t = self.begin(Stage::Announce)?;
        // Inputs above K now go to the destination through the mirror;
        // announcing the address there makes the path direct.
        let _: Value = step(link, &Step::Announce)
            .await
            .map_err(|e| self.fail(e))?;
        self.end(t);

        let t = self.begin(Stage::Finish)?;
        // Kept as the destination's hot replica before `finish`: the
        // destination attaches to it once it has the answer.
        let kept = match keep_replica {
            Some(keep) => self
                .keep_instance(source, k, keep.migration)
                .inspect_err(|e| {
                    tracing::warn!(migration = %self.report.id,
                        "the instance here is not kept as a replica: {e}");
                })
                .is_ok(),
            None => false,
        };
        if !kept {
            self.stop_instances();
        }
        let finished: Finished = step(link, &Step::Finish).await.map_err(|e| self.fail(e))?;
        self.report.load.destination_daemon_us = finished.daemon_cpu_us;
        self.report.load.destination_criu_us = finished.criu_cpu_us;
        self.end(t);
        // T_M ends here: the destination has the service. Letting go of
        // the flows waits until their inputs stop coming here (20 ms
        // without one at least), which the CPS does not wait for.
        self.report.total_us = self.start.elapsed().as_micros() as u64;
        if !kept {
            let outcome = source.let_go(&self.context.interface);
            tracing::info!(migration = %self.report.id, "{outcome}");
        }
        Ok(())
    }

    /// What `arm` asks of the destination when this host keeps its
    /// instance as the destination's hot replica (a handover with
    /// `keep_replica`, on a host that holds replicas): under the id of the
    /// replica handed over to.
    fn keep_replica(&self) -> Option<KeepReplica> {
        let host = self.context.replicas.as_ref()?;
        let migration = self.report.from_replica.clone()?;
        self.request.keep_replica.then(|| KeepReplica {
            migration,
            port: host.peer_listen.port(),
        })
    }

    /// Keeps the serving instance as the hot replica `migration` of the
    /// host it handed over to at K (see `destination::adopt`): its answers
    /// up to K leave, then its outputs are muted; once the CPS's inputs no
    /// longer come here, its flows stop mirroring and hold their inputs
    /// for the new serving host to feed, and the service addresses move to
    /// lo (the instance keeps its sockets; this host answers no ARP or
    /// neighbour discovery for them).
    fn keep_instance(
        &mut self,
        source: &mut Source,
        k: u64,
        migration: String,
    ) -> Result<(), String> {
        let host = self
            .context
            .replicas
            .clone()
            .ok_or("this host holds no replicas")?;
        let flow_id = source.flow_id;
        let dataplane = &source.dataplane;
        let window = dataplane.gate_window().map_err(|e| e.to_string())?;
        // Its answers up to K left before K was picked (see
        // `decide::cutover_candidate`).
        window.mute_outputs(flow_id);
        let quiet = tokio::task::block_in_place(|| inputs_stopped(dataplane, flow_id));
        if !quiet {
            return Err("the CPS's inputs still come here".into());
        }
        window.set_input_gate(flow_id, dataplane_common::GATE_HOLD_ALL, 0);
        window.set_deliver_until(flow_id, 0);
        for f in &source.flows {
            let key = flow::udp(f.flow.cps, f.flow.service);
            source
                .dataplane
                .set_flow_flags(&key, f.flags)
                .map_err(|e| e.to_string())?;
        }
        // Numbered here past K, forwarded: the new serving host numbers
        // them its own way and feeds them.
        while source.inputs.try_next().is_some() {}
        let addresses = service_addresses(&source.flows);
        for &address in &addresses {
            let interface = &self.context.interface;
            crate::host::netdev::own_address("lo", address)
                .and_then(|_| crate::host::netdev::release_address(interface, address))
                .map_err(|e| format!("moving {address} to lo: {e}"))?;
        }
        // A standby here has no part in it.
        for i in &self.service.registered {
            if i.pid != self.service.pid && i.runs() {
                stop_instance(i.pid);
            }
        }
        let incoming = Incoming {
            service: Some(self.service.name.clone()),
            flows: source
                .flows
                .iter()
                .map(|f| TargetFlow {
                    flow_id,
                    spec: f.flow,
                })
                .collect(),
            instance: crate::host::tasks::Identity::of(self.service.pid),
            deadline_ms: self.request.deadline_ms,
            local_addresses: addresses,
            command: self.service.command.clone(),
            standby: false,
            replica: Some(ReplicaHere {
                source: self.request.to.ip(),
                holder: [0; 6],
            }),
            container: None,
        };
        let empty = |tap: &Arc<crate::kernel::logs::Tap>| tap.subscribe(&[], 1);
        let (Ok(no_inputs), Ok(no_outputs)) =
            (empty(&self.context.inputs), empty(&self.context.outputs))
        else {
            return Err("the log readers are busy".into());
        };
        let logs = (
            std::mem::replace(&mut source.inputs, no_inputs),
            std::mem::replace(&mut source.outputs, no_outputs),
        );
        destination::adopt(
            &host,
            destination::Adopted {
                migration,
                incoming,
                after: k,
                logs,
            },
        )
    }

    /// Feeds the replica adopted from the instance the last handover's
    /// source kept (see `destination::adopt`) the inputs after K (`after`)
    /// that this host numbered before it attached; the live mirror brings
    /// the rest. The last input the replay gave it.
    pub(super) async fn feed(
        &mut self,
        source: &mut Source,
        link: &mut peer::Link,
        after: u64,
    ) -> Result<u64, MigrationError> {
        let t = self.begin(Stage::Restore)?;
        // The mirror carries every input numbered from now on; those up to
        // now come from the log, whose records trail the numbering by a
        // little: up to the last numbered now, waited for.
        let upto = source.last_seq();
        let mut inputs = Vec::new();
        let until = tokio::time::Instant::now() + Duration::from_secs(1);
        let mut reached = after;
        while reached < upto {
            let Ok(Some(record)) = tokio::time::timeout_at(until, source.inputs.next()).await
            else {
                return Err(self.fail(Cause::NotFed(reached + 1)));
            };
            let h = record.header;
            if h.flow_id == source.flow_id && h.seq > after && h.kind != RECORD_FLOODED {
                reached = reached.max(h.seq);
                inputs.push(FedInput {
                    seq: h.seq,
                    timestamp_ns: h.timestamp_ns,
                    frame: hex::encode(&record.frame),
                });
            }
        }
        let restored: Restored = step(link, &Step::Feed { after, inputs })
            .await
            .map_err(|e| self.fail(e))?;
        self.report.destination_pid = restored.pid;
        self.report.replayed = restored.replayed;
        self.end(t);
        Ok(restored.replay_end)
    }

    /// Kills the service's instances on this host once the destination
    /// serves: past K they get no input.
    fn stop_instances(&self) {
        stop_instances(&self.service, &self.context.containers);
    }

    /// Undoes the source's changes and tells the destination to undo its own.
    pub(super) async fn rollback(&mut self, source: &mut Source, link: &mut peer::Link) {
        source.undo_here();
        let _ = std::fs::remove_dir_all(self.images());
        if let Err(e) = peer::migrate_step(link, &Step::Abort).await {
            // The destination rolls back by itself when the link drops.
            tracing::warn!("asking the destination to roll back: {e}");
        }
    }

    fn images(&self) -> PathBuf {
        self.context.files.images(Side::Source, &self.report.id)
    }
}

/// The comparison of a migration's two instances: their outputs paired
/// by input, and the run of matches.
pub(super) struct Comparing {
    pub(super) pairing: Pairing,
    pub(super) convergence: Convergence,
}

impl Comparing {
    /// Pairing from the first live input after the replay (`replay_end`),
    /// converged after `needed` matches in a row.
    pub(super) fn after_replay(replay_end: u64, needed: u32) -> Self {
        Self {
            pairing: Pairing::after_replay(replay_end),
            convergence: Convergence::new(needed),
        }
    }
}

/// Where the destination takes a migration's mirror copies.
struct Linked {
    mirror_mac: [u8; 6],
    /// The id the service's flows have there.
    remote_id: u32,
    /// A hot replica's instance there, once restored.
    pid: u32,
}

impl Source {
    /// Sends each flow's mirror copies to the host `linked` says, under
    /// the flows' id there.
    fn mirror_to(&mut self, linked: &Linked) -> Result<(), Cause> {
        let target = MirrorTarget {
            mac: linked.mirror_mac,
            flow_id: linked.remote_id,
            ..Default::default()
        };
        for f in &self.flows {
            let key = flow::udp(f.flow.cps, f.flow.service);
            self.dataplane.mirror_flow(&key, Some(target))?;
        }
        Ok(())
    }

    /// Sets the flows' mirroring back to what it was before the migration,
    /// and their gate delivering and tagging as before.
    fn undo_here(&mut self) {
        for f in &self.flows {
            let key = flow::udp(f.flow.cps, f.flow.service);
            let _ = self.dataplane.set_flow_flags(&key, f.flags);
        }
        if let Ok(window) = self.dataplane.gate_window() {
            window.set_deliver_until(self.flow_id, 0);
            window.tag_latest(self.flow_id);
        }
    }

    /// The last input this host numbered for the service.
    pub(super) fn last_seq(&self) -> u64 {
        self.dataplane
            .sequence(self.flow_id)
            .map_or(0, |s| s.last_seq)
    }

    /// Stages the source instance's outputs until one answers `seq` or
    /// later, or `timeout` passes.
    async fn collect_outputs(&mut self, pairing: &mut Pairing, seq: u64, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            while let Some(record) = self.outputs.try_next() {
                self.keep_output(pairing, record);
            }
            if pairing.ours_reached(seq) {
                return;
            }
            match tokio::time::timeout_at(deadline, self.outputs.next()).await {
                Ok(Some(record)) => self.keep_output(pairing, record),
                _ => return,
            }
        }
    }

    fn keep_output(&self, pairing: &mut Pairing, record: Record) {
        let h = record.header;
        if h.kind == RECORD_OUTPUT && h.flow_id == self.flow_id {
            pairing.ours(h.seq, Answer::of(&record.frame));
        }
    }

    /// An error if the source's input log has failed an input since the
    /// migration began (an input that found the ring full went on
    /// unnumbered and was not mirrored: the destination never sees it).
    fn check_log(&self) -> Result<(), LogError> {
        self.log.check(&self.dataplane, &self.inputs)
    }

    /// Lets go of the flows once the destination serves them, if their
    /// inputs stop coming here ([`let_go`]): what it did, as text.
    fn let_go(&mut self, interface: &str) -> String {
        let quiet = tokio::task::block_in_place(|| inputs_stopped(&self.dataplane, self.flow_id));
        let (flow_id, flows) = (self.flow_id, &self.flows);
        let_go(&mut self.dataplane, interface, flows, flow_id, quiet)
    }
}

/// Waits until no input of `flow_id` has come for 20 ms, at most 2 s:
/// whether the CPS's inputs stopped coming here once the destination
/// announced the service.
fn inputs_stopped(dataplane: &Dataplane, flow_id: u32) -> bool {
    let (quiet, limit) = (Duration::from_millis(20), Duration::from_secs(2));
    let seq = || dataplane.sequence(flow_id).map_or(0, |s| s.last_seq);
    let start = Instant::now();
    let mut last = (seq(), Instant::now());
    while start.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(1));
        let now = seq();
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() >= quiet {
            return true;
        }
    }
    false
}

/// The service addresses of `flows`, each once.
fn service_addresses(flows: &[FlowBefore]) -> Vec<std::net::IpAddr> {
    let mut addresses: Vec<std::net::IpAddr> = flows.iter().map(|f| f.flow.service.ip()).collect();
    addresses.sort();
    addresses.dedup();
    addresses
}

/// Lets go of a service's `flows` (`flow_id`) once the destination serves
/// them: with their inputs stopped (`quiet`), the flows go, and each
/// service address goes off `interface` and lo unless another flow here
/// still has it. This host then neither answers ARP for the addresses nor
/// holds the flows, and a later migration may bring the service back.
/// Inputs still coming: the flows keep forwarding them past K, and the
/// addresses stay. What it did, as text.
fn let_go(
    dataplane: &mut Dataplane,
    interface: &str,
    flows: &[FlowBefore],
    flow_id: u32,
    quiet: bool,
) -> String {
    if !quiet {
        tracing::warn!(
            flow_id,
            "inputs still arrive here after the announce: \
            the flows stay, forwarding them to the destination"
        );
        return format!("inputs of flow {flow_id} still arrive here: it keeps forwarding them");
    }
    for f in flows {
        let _ = dataplane.remove_flow(&flow::udp(f.flow.cps, f.flow.service));
    }
    let _ = dataplane.set_gate(flow_id, Default::default());
    let addresses = service_addresses(flows);
    // With the table unreadable, every address stays.
    let remaining = dataplane.flows();
    let mut released = Vec::new();
    for address in addresses {
        // Another flow's: it stays.
        let held = remaining.as_ref().map_or(true, |flows| {
            flows
                .iter()
                .any(|(k, _)| flow::destination(k).ip() == address)
        });
        if held {
            continue;
        }
        for on in [interface, "lo"] {
            if let Err(e) = crate::host::netdev::release_address(on, address) {
                tracing::warn!(%address, interface = on, "releasing the service address: {e}");
            }
        }
        released.push(address);
    }
    format!("let go of flow {flow_id} and of {released:?}")
}

/// Stops serving `service` here: another host took it over (a hot
/// replica's failover) while this one was cut off. Its instances are
/// killed, and its flows and addresses go: this host answers neither the
/// service nor ARP for it. What it did, as text.
pub(super) fn fence(service: &Service, context: &Context) -> String {
    stop_instances(service, &context.containers);
    let mut dataplane = match Dataplane::open(&context.pin_root) {
        Ok(dataplane) => dataplane,
        Err(e) => return format!("killed its instances; its flows stay: {e}"),
    };
    let flow_id = dataplane.flows().ok().and_then(|flows| {
        let key = flow::udp(service.flows.first()?.cps, service.flows.first()?.service);
        flows
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, c)| c.flow_id)
    });
    let Some(flow_id) = flow_id else {
        return "killed its instances; it has no flow here".into();
    };
    let flows: Vec<FlowBefore> = service
        .flows
        .iter()
        .map(|&flow| FlowBefore { flow, flags: 0 })
        .collect();
    let released = let_go(&mut dataplane, &context.interface, &flows, flow_id, true);
    format!("killed its instances; {released}")
}

/// Kills `service`'s instances on this host: the serving one and the
/// standby, as registered (a pid reused since is someone else's); those
/// that are containers leave their runtime too.
fn stop_instances(service: &Service, containers: &Containers) {
    for (pid, container) in service.instances() {
        if service.still_runs(pid) {
            stop_instance(pid);
        }
        if let Some(id) = container {
            forget_container(containers, service.runtime, id);
        }
    }
}

/// Removes container `id`, whose init is killed, from `runtime` (and its
/// cgroups), on a thread of its own: the runtime waits for the
/// container's end, which no step waits for.
fn forget_container(containers: &Containers, runtime: Runtime, id: &str) {
    let (containers, id) = (containers.clone(), id.to_string());
    std::thread::spawn(move || containers.discard(runtime, &id));
}

/// Kills an instance of a service the destination now serves, demoted
/// first: a process frees its memory as it exits, at its own priority and
/// on its own CPU.
fn stop_instance(pid: u32) {
    crate::host::tasks::demote(pid);
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
}

/// One step whose answer is a `T`.
pub(super) async fn step<T: serde::de::DeserializeOwned>(
    link: &mut peer::Link,
    step: &Step,
) -> Result<T, Cause> {
    let value = peer::migrate_step(link, step)
        .await
        .map_err(Cause::Destination)?;
    serde_json::from_value(value).map_err(Cause::Answer)
}

/// Undoes what a migration from this host changed, from its journal
/// (see [`super::recovery`]). Before the flip: the flow's mirroring goes back to
/// what it was and its gates (and the standby's) deliver again. Inputs
/// held when the daemon died went with its memory: they are lost to the
/// instance, and the outcome names them. Handed over (K picked): the
/// destination serves; inputs above K keep going to it, and the service's
/// instances here, which get none of them, are stopped; once no input
/// comes here, the flow and the service address on `interface` go.
pub(super) fn recover(
    pin_root: &Path,
    standby_pin_root: Option<&Path>,
    interface: &str,
    containers: &Containers,
    outgoing: &Outgoing,
) -> String {
    match undo(
        pin_root,
        standby_pin_root,
        outgoing.flow_id,
        Some(&outgoing.flows),
    ) {
        // The service died here with the daemon (its host went down, say):
        // a hot replica elsewhere may have taken it over, so this host must
        // not answer for it, not even ARP.
        Ok(lost)
            if !outgoing
                .instances
                .iter()
                .any(crate::host::tasks::Identity::runs) =>
        {
            let released = match Dataplane::open(pin_root) {
                Ok(mut dataplane) => {
                    let (flow_id, flows) = (outgoing.flow_id, &outgoing.flows);
                    let_go(&mut dataplane, interface, flows, flow_id, true)
                }
                Err(e) => e.to_string(),
            };
            format!(
                "rolled back{lost}; its instances are gone (a hot replica may serve it now): {released}"
            )
        }
        Ok(lost) => format!("rolled back: mirroring off, gates delivering{lost}"),
        Err(handed_over @ Cause::HandedOver(_)) => {
            let stopped: Vec<u32> = outgoing
                .instances
                .iter()
                .filter(|i| i.runs())
                .map(|i| {
                    stop_instance(i.pid);
                    i.pid
                })
                .collect();
            for id in &outgoing.containers {
                containers.discard(outgoing.runtime, id);
            }
            let released = match Dataplane::open(pin_root) {
                Ok(mut dataplane) => {
                    let (flow_id, flows) = (outgoing.flow_id, &outgoing.flows);
                    let quiet = inputs_stopped(&dataplane, flow_id);
                    let_go(&mut dataplane, interface, flows, flow_id, quiet)
                }
                Err(e) => e.to_string(),
            };
            match stopped[..] {
                [] => format!("{handed_over}; {released}"),
                _ => format!("{handed_over}; stopped the instances here: {stopped:?}; {released}"),
            }
        }
        Err(e) => e.to_string(),
    }
}

/// Whether a restarted daemon keeps the hot replica this journal is of,
/// to attach to it again: one in sync, whose instances here still run,
/// and whose flow was not flipped for a handover.
pub(super) fn keeps_replica(pin_root: &Path, outgoing: &Outgoing) -> bool {
    let unflipped = || {
        let dataplane = Dataplane::open(pin_root).ok()?;
        let gate = dataplane.gate(outgoing.flow_id).ok()?;
        Some(gate.deliver_until == 0 && gate_open(gate.mode))
    };
    outgoing.replica.is_some()
        && outgoing
            .instances
            .iter()
            .any(crate::host::tasks::Identity::runs)
        && unflipped() == Some(true)
}

/// Undoes, from the kernel alone, what a migration from this host whose
/// journal cannot be read may have left: every flow whose inputs are held
/// (here or on the standby) or whose window is flipped with K not yet
/// picked gets its gates delivering again, and the held inputs are named.
/// Its mirroring stays as it is (what it was before is what the journal
/// said). Flows adopted by a migration to this host (muted or armed) are
/// the destination's side ([`super::destination::recover_unjournaled`]).
pub(super) fn recover_unjournaled(pin_root: &Path, standby_pin_root: Option<&Path>) -> String {
    let in_migration = || -> Result<Vec<(FlowKey, u32)>, Cause> {
        let dataplane = Dataplane::open(pin_root)?;
        let standby = standby_pin_root.map(Dataplane::open).transpose()?;
        let held = |d: &Dataplane, flow_id| d.gate(flow_id).is_ok_and(|g| !gate_open(g.mode));
        let mut flows = Vec::new();
        for (key, config) in dataplane.flows()? {
            let gate = dataplane.gate(config.flow_id)?;
            if [OUTPUT_MUTE, OUTPUT_ARMED].contains(&gate.output) {
                continue;
            }
            if !gate_open(gate.mode)
                || gate.deliver_until == CUT_AT_NEXT
                || standby.as_ref().is_some_and(|s| held(s, config.flow_id))
            {
                flows.push((key, config.flow_id));
            }
        }
        // A service's flows share an id: undone once.
        flows.sort_by_key(|&(_, flow_id)| flow_id);
        flows.dedup_by_key(|&mut (_, flow_id)| flow_id);
        Ok(flows)
    };
    let flows = match in_migration() {
        Ok(flows) => flows,
        Err(e) => return e.to_string(),
    };
    if flows.is_empty() {
        return "no flow held or flipped: nothing to undo".into();
    }
    let undone: Vec<String> = flows
        .iter()
        .map(|(key, flow_id)| {
            let outcome = match undo(pin_root, standby_pin_root, *flow_id, None) {
                Ok(lost) => format!("gates delivering{lost}"),
                Err(e) => e.to_string(),
            };
            format!("flow {}: {outcome}", flow::display(key))
        })
        .collect();
    format!("from the kernel: {}", undone.join("; "))
}

/// Takes back the flip of flow `flow_id` unless K was picked, sets its
/// flows' flags back (`restore`: the flows and their flags before the
/// migration), and opens its held gates, here and on the standby: what
/// the held inputs lost with the daemon were, as text to append.
fn undo(
    pin_root: &Path,
    standby_pin_root: Option<&Path>,
    flow_id: u32,
    restore: Option<&[FlowBefore]>,
) -> Result<String, Cause> {
    let mut dataplane = Dataplane::open(pin_root)?;
    let window = dataplane.gate_window()?;
    if let Err(k) = window.unflip(flow_id) {
        return Err(Cause::HandedOver(k));
    }
    window.tag_latest(flow_id);
    for f in restore.unwrap_or_default() {
        dataplane.set_flow_flags(&flow::udp(f.flow.cps, f.flow.service), f.flags)?;
    }
    let mut lost = String::new();
    if let Some(range) = hold::open(&mut dataplane, flow_id)? {
        let inputs = hold::name_inputs(&range);
        lost += &format!("; {inputs}, held when the daemon stopped, did not reach the instance");
    }
    if let Some(root) = standby_pin_root
        && let Some(range) = hold::open(&mut Dataplane::open(root)?, flow_id)?
    {
        lost += &format!("; {} did not reach the standby", hold::name_inputs(&range));
    }
    Ok(lost)
}
