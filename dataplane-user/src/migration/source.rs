//! The source's side of a migration: prepare, checkpoint, transfer,
//! restore, then converge and cut over; a rollback on any failure before
//! the flip.
use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use dataplane_common::{FLOW_MIRROR, GATE_DELIVER_ALL, RECORD_OUTPUT};
use tokio::net::TcpStream;

use crate::{
    criu::{DumpRequest, netns_inode, precopy::IterativeDump, stats},
    kernel::{
        flow,
        injector::Injector,
        loader::Dataplane,
        logs::{LogGuard, Records, Subscription},
    },
    migration::{
        Context, Mode, Request, hold,
        hold::FlowPosition,
        journal::{SourceJournal, source_journal_path, spec_of},
        protocol::{Restored, SUBSCRIPTION_CAPACITY, Step, TargetFlow},
        report::{MigrationError, Phase, Report},
    },
    peer,
    planning::policy::StopPolicy,
    service::Service,
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
    let mut migration = Migration {
        start: Instant::now(),
        report: Report {
            id,
            service: service.name.clone(),
            to: request.to.to_string(),
            mode: request.mode,
            state: "running".into(),
            ..Default::default()
        },
        progress: Box::new(progress),
        service,
        request,
        context,
    };
    let cpu = crate::host::tasks::CpuTime::now();
    let outcome = migration.execute().await;
    let _ = std::fs::remove_file(migration.journal_path());
    let report = &mut migration.report;
    report.total_us = migration.start.elapsed().as_micros() as u64;
    (report.load.source_daemon_us, report.load.source_criu_us) =
        crate::host::tasks::CpuTime::since(cpu);
    match outcome {
        Ok(()) => {
            report.state = "done".into();
            report.phase = "done".into();
        }
        Err(e) => {
            report.state = "failed".into();
            report.error = Some(e.to_string());
        }
    }
    (migration.progress)(&migration.report);
    migration.report
}

pub(super) struct Migration {
    pub(super) start: Instant,
    pub(super) report: Report,
    pub(super) progress: Box<dyn Fn(&Report) + Send + Sync>,
    pub(super) service: Service,
    pub(super) request: Request,
    pub(super) context: Context,
}

/// The source's side of the steps, for rollback.
pub(super) struct Source {
    pub(super) dataplane: Dataplane,
    pub(super) flow_id: u32,
    pub(super) key: dataplane_common::FlowKey,
    pub(super) flags: u32,
    pub(super) inputs: Subscription,
    pub(super) outputs: Subscription,
    /// Outputs of the source instance by the input they answer.
    pub(super) seen: BTreeMap<u64, Vec<Vec<u8>>>,
    /// Whether the input log failed an input since the migration began.
    pub(super) log: LogGuard,
}

impl Migration {
    pub(super) fn fail(&self, cause: impl std::fmt::Display) -> MigrationError {
        MigrationError {
            phase: self.report.phase.clone(),
            cause: cause.to_string(),
        }
    }

    pub(super) fn begin(&mut self, phase: &str) -> Result<Instant, MigrationError> {
        self.report.phase = phase.into();
        (self.progress)(&self.report);
        if self.context.abort.load(Ordering::Relaxed) {
            return Err(self.fail("aborted on request"));
        }
        Ok(Instant::now())
    }

    pub(super) fn end(&mut self, started: Instant) {
        self.report.phases.push(Phase {
            name: self.report.phase.clone(),
            start_us: (started - self.start).as_micros() as u64,
            duration_us: started.elapsed().as_micros() as u64,
        });
        (self.progress)(&self.report);
    }

    async fn execute(&mut self) -> Result<(), MigrationError> {
        let t = self.begin("prepare")?;
        let [spec] = &self.service.flows[..] else {
            return Err(self.fail("a migrated service has exactly one flow here"));
        };
        let spec = spec.clone();
        let key = flow::udp(spec.cps, spec.service);
        let dataplane = Dataplane::open(&self.context.pin_root).map_err(|e| self.fail(e))?;
        let (_, config) = dataplane
            .flows()
            .map_err(|e| self.fail(e))?
            .into_iter()
            .find(|(k, _)| *k == key)
            .ok_or_else(|| self.fail(format!("flow {} is not loaded", flow::display(&key))))?;
        let inputs = self
            .context
            .inputs
            .subscribe(SUBSCRIPTION_CAPACITY)
            .map_err(|e| self.fail(e))?;
        let outputs = self
            .context
            .outputs
            .subscribe(SUBSCRIPTION_CAPACITY)
            .map_err(|e| self.fail(e))?;
        let log = LogGuard::new(&dataplane).map_err(|e| self.fail(e))?;
        let mut source = Source {
            dataplane,
            flow_id: config.flow_id,
            key,
            flags: config.flags,
            inputs,
            outputs,
            seen: BTreeMap::new(),
            log,
        };
        let mut link = peer::connect(self.request.to)
            .await
            .map_err(|e| self.fail(format!("peer {}: {e}", self.request.to)))?
            .0;
        let prepare = Step::Prepare {
            migration: self.report.id.clone(),
            flows: vec![TargetFlow {
                flow_id: source.flow_id,
                spec,
            }],
        };
        peer::migrate_step(&mut link, &prepare)
            .await
            .map_err(|e| self.fail(e))?;
        // From here on the destination holds state: a failure rolls it back.
        // Should this daemon die before the end, the journal tells the next
        // start what to undo.
        let journal = SourceJournal {
            flow_id: source.flow_id,
            flow: spec_of(&self.service),
            flags: source.flags,
        };
        let mirrored = journal.write(&self.journal_path()).and_then(|()| {
            source
                .dataplane
                .set_flow_flags(&key, source.flags | FLOW_MIRROR)
                .map_err(|e| e.to_string())
        });
        self.end(t);
        let outcome = match mirrored {
            Ok(()) => self.migrate(&mut source, &mut link).await,
            Err(e) => Err(self.fail(e)),
        };
        if outcome.is_err() && self.report.flip_ns == 0 {
            self.rollback(&mut source, &mut link).await;
        }
        outcome
    }

    /// Everything after `prepare`.
    async fn migrate(
        &mut self,
        source: &mut Source,
        link: &mut TcpStream,
    ) -> Result<(), MigrationError> {
        let position = self.checkpoint(source).await?;
        source.check_log().map_err(|e| self.fail(e))?;

        let t = self.begin("transfer")?;
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
        self.report.image_bytes = sent.map_err(|e| self.fail(e))?.received.bytes;
        self.end(t);

        let t = self.begin("restore")?;
        let restored: Restored = step(
            link,
            &Step::Restore {
                positions: vec![position],
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

        self.converge(source, link, restored.replay_end).await?;
        self.cutover(source, link).await
    }

    /// The instance the checkpoint is taken of, by mode.
    fn checkpointed(&self) -> Result<Checkpointed, MigrationError> {
        let dataplane = |root: &std::path::Path| Dataplane::open(root).map_err(|e| self.fail(e));
        match self.request.mode {
            Mode::LeaveRunning => Ok(Checkpointed {
                pid: self.service.pid,
                dataplane: dataplane(&self.context.pin_root)?,
                netns: None,
                interface: self.context.interface.clone(),
            }),
            Mode::Standby => {
                let pid = self.service.standby_pid.ok_or_else(|| {
                    self.fail(format!(
                        "service {} has no standby instance",
                        self.service.name
                    ))
                })?;
                let (netns, pin_root) = self.context.standby.clone().ok_or_else(|| {
                    self.fail("this daemon has no standby configured (standby_interface)")
                })?;
                let dataplane = dataplane(&pin_root)?;
                let interface = dataplane
                    .attached_programs()
                    .map_err(|e| self.fail(e))?
                    .iter()
                    .find_map(|p| p.strip_suffix("/ingress").map(str::to_string))
                    .ok_or_else(|| self.fail("the standby's dataplane has no ingress program"))?;
                Ok(Checkpointed {
                    pid,
                    dataplane,
                    netns: Some(netns),
                    interface,
                })
            }
        }
    }

    /// Holds the checkpointed instance's inputs, waits for its socket to
    /// drain, dumps it (left running) and gives it the held inputs back.
    async fn checkpoint(&mut self, source: &mut Source) -> Result<FlowPosition, MigrationError> {
        let t = self.begin("checkpoint")?;
        let mut instance = self.checkpointed()?;
        let (pid, flow_id) = (instance.pid, source.flow_id);
        let images = self.images();
        let _ = std::fs::remove_dir_all(&images);
        let inode = netns_inode(pid).map_err(|e| self.fail(format!("process {pid}: {e}")))?;
        let dump = DumpRequest {
            pid,
            images_dir: images.clone(),
            leave_running: true,
            external: vec![format!("net[{inode}]:extnet")],
            ..Default::default()
        };
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
                        .map_err(|e| self.fail(format!("pre-dump: {e}")))?;
                self.report.pre_dump = Some(match rounds.stop {
                    Some(stop) => format!("{} rounds, stopped: {stop:?}", rounds.rounds.len()),
                    None => "none: no memory tracking on this kernel, a single dump".into(),
                });
                rounds
            }
        };
        // Inputs cloned before the mirror to the peer was on are through by now.
        tokio::time::sleep(Duration::from_millis(1)).await;
        let held = Instant::now();
        let position = tokio::task::block_in_place(|| {
            hold::hold_and_drain(
                &mut instance.dataplane,
                &[flow_id],
                pid,
                Duration::from_secs(2),
            )
        })
        .map_err(|e| self.fail(e))?[0];
        self.report.checkpoint_seq = position.last_delivered;
        let dumped = tokio::task::block_in_place(|| {
            let start = Instant::now();
            self.context
                .criu
                .dump(&rounds.final_dump(&dump), false, &mut |_| true)
                .map_err(|e| e.to_string())?;
            self.report.criu_dump_us = start.elapsed().as_micros() as u64;
            Ok::<_, String>(stats::dump(&images).map_or(0, |s| s.frozen_time.into()))
        });
        // Dumped or not, the instance gets the inputs held meanwhile, in order.
        let resumed = tokio::task::block_in_place(|| instance.resume(position, &mut source.inputs));
        let _ = instance
            .dataplane
            .set_input_gate(flow_id, GATE_DELIVER_ALL, 0);
        if self.request.mode == Mode::LeaveRunning {
            self.report.held_us = held.elapsed().as_micros() as u64;
        }
        self.report.frozen_us = dumped.map_err(|e| self.fail(format!("dump: {e}")))?;
        resumed.map_err(|e| self.fail(format!("giving the held inputs back: {e}")))?;
        self.end(t);
        Ok(position)
    }

    /// Undoes the source's changes and tells the destination to undo its own.
    async fn rollback(&mut self, source: &mut Source, link: &mut TcpStream) {
        let _ = source.dataplane.set_flow_flags(&source.key, source.flags);
        if let Ok(window) = source.dataplane.gate_window() {
            window.set_deliver_until(source.flow_id, 0);
        }
        let _ = std::fs::remove_dir_all(self.images());
        if let Err(e) = peer::migrate_step(link, &Step::Abort).await {
            // The destination rolls back by itself when the link drops.
            tracing::warn!("asking the destination to roll back: {e}");
        }
    }

    pub(super) fn journal_path(&self) -> PathBuf {
        source_journal_path(&self.context.images_dir, &self.report.id)
    }

    pub(super) fn images(&self) -> PathBuf {
        self.context
            .images_dir
            .join("outgoing")
            .join(&self.report.id)
    }
}

/// The instance a checkpoint is taken of: the serving one, or a standby in
/// a network namespace of its own with a dataplane of its own.
pub(super) struct Checkpointed {
    pid: u32,
    dataplane: Dataplane,
    netns: Option<PathBuf>,
    /// Where its inputs arrive (replays are injected as if there).
    interface: String,
}

impl Checkpointed {
    /// Replays the inputs held since `position` (from `log`) into the
    /// instance, on a thread in its network namespace: injection resolves
    /// the interface in the caller's namespace.
    fn resume(&mut self, position: FlowPosition, log: &mut Subscription) -> Result<u64, String> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    if let Some(netns) = &self.netns {
                        let ns = std::fs::File::open(netns)
                            .map_err(|e| format!("{}: {e}", netns.display()))?;
                        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                            .map_err(|e| format!("entering {}: {e}", netns.display()))?;
                    }
                    let mut injector = Injector::open(self.dataplane.pin_root(), &self.interface)
                        .map_err(|e| e.to_string())?;
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_time()
                        .build()
                        .map_err(|e| e.to_string())?;
                    runtime
                        .block_on(hold::resume(
                            &mut self.dataplane,
                            position,
                            self.pid,
                            &mut injector,
                            log,
                        ))
                        .map_err(|e| e.to_string())
                })
                .join()
                .map_err(|_| "the replay thread panicked".to_string())?
        })
    }
}

impl Source {
    /// Stages the source instance's outputs until one answers `seq` or
    /// later, or `timeout` passes.
    pub(super) async fn collect_outputs(&mut self, seq: u64, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            while let Some(record) = self.outputs.try_next() {
                self.keep_output(record);
            }
            if self.seen.keys().next_back().is_some_and(|&s| s >= seq) {
                return;
            }
            match tokio::time::timeout_at(deadline, self.outputs.next()).await {
                Ok(Some(record)) => self.keep_output(record),
                _ => return,
            }
        }
    }

    fn keep_output(&mut self, record: crate::kernel::logs::Record) {
        let h = record.header;
        if h.kind == RECORD_OUTPUT && h.flow_id == self.flow_id {
            let payload = crate::migration::converge::udp_payload(&record.frame).to_vec();
            self.seen.entry(h.seq).or_default().push(payload);
        }
    }

    /// An error if the source's input log has failed an input since the
    /// migration began (an input that found the ring full went on
    /// unnumbered and was not mirrored: the destination never sees it).
    pub(super) fn check_log(&self) -> Result<(), String> {
        self.log.check(&self.dataplane, &self.inputs)
    }

    /// Waits until no input has arrived for `quiet` (at most `limit`).
    pub(super) async fn wait_quiet(&self, quiet: Duration, limit: Duration) {
        let seq = || {
            self.dataplane
                .sequence(self.flow_id)
                .map_or(0, |s| s.last_seq)
        };
        let start = Instant::now();
        let mut last = (seq(), Instant::now());
        while start.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let now = seq();
            if now != last.0 {
                last = (now, Instant::now());
            } else if last.1.elapsed() >= quiet {
                return;
            }
        }
    }
}

/// One step whose answer is a `T`.
pub(super) async fn step<T: serde::de::DeserializeOwned>(
    link: &mut TcpStream,
    step: &Step,
) -> Result<T, String> {
    let value = peer::migrate_step(link, step)
        .await
        .map_err(|e| format!("destination: {e}"))?;
    serde_json::from_value(value).map_err(|e| format!("destination's answer: {e}"))
}
