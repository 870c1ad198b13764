//! What each control method does: the daemon as the control socket's
//! [`Handler`].
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use dataplane_common::{FLOW_MIRROR, FlowConfig, FlowKey, counter};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::broadcast;

use super::{Daemon, MigrationEntry};
use crate::{
    control::{
        RpcError,
        answer::{
            FlowAdded, FlowInfo, FlowRemoved, Interfaces, MigrationAborting, PeerPong,
            ReplicaStopping, ServiceRegistered, ServiceStarted, ServiceUnregistered, StandbySeeded,
            Status, Watching,
        },
        code,
        method::{Call, MigrationId, PeerAddress, ServiceName, ServiceStart},
        server::Handler,
    },
    host::{
        launch::{self, Launch},
        runc,
        tasks::{self, Identity},
    },
    kernel::{
        flow,
        loader::{Dataplane, LoadError},
        logs::Tap,
    },
    metrics,
    migration::{
        self, destination,
        journal::{Files, Outgoing},
        replica,
        replica::ReplicaRequest,
        seed::StandbyRequest,
    },
    peer,
    registry::RegistryError,
    report::{Mode, ReplicaState, ReplicaStatus, Report, State},
    service::{FlowSpec, Service},
    standby::StandbyHost,
};

impl Handler for Daemon {
    async fn call(&self, call: Call) -> Result<Value, RpcError> {
        match call {
            Call::Status => answer(self.status()),
            Call::Metrics => answer(self.metrics()),
            Call::FlowAdd(params) => answer(self.flow_add(params)),
            Call::FlowRemove(spec) => answer(self.flow_remove(spec)),
            Call::FlowList => answer(flow_rows(&self.dataplane.lock().unwrap())),
            Call::ServiceRegister(service) => answer(self.service_register(service)),
            Call::ServiceStart(start) => answer(self.service_start(start).await),
            Call::ServiceStandby(name) => answer(self.service_standby(name).await),
            Call::ServiceUnregister(name) => answer(self.service_unregister(name)),
            Call::ServiceList => answer(Ok(self.services.list())),
            Call::MigrationStart(request) => answer(self.migration_start(request)),
            Call::MigrationStatus(None) => answer(Ok(self.reports())),
            Call::MigrationStatus(Some(id)) => answer(self.report(id)),
            Call::MigrationAbort(id) => answer(self.migration_abort(id)),
            Call::MigrationWatch => answer(Ok(Watching { watching: true })),
            Call::ReplicaStart(request) => answer(self.replica_start(request)),
            Call::ReplicaStop(name) => answer(self.replica_stop(name)),
            Call::PeerPing(address) => answer(self.peer_ping(address).await),
        }
    }

    fn events(&self) -> broadcast::Receiver<Report> {
        self.events.subscribe()
    }
}

/// How long a started service has to bind its flows' addresses.
const BIND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits until each process in `pids` has every service address of
/// `flows` bound in its network namespace: an input that came before
/// would be lost to it (and a standby that missed one never converges).
async fn ready(pids: &[u32], flows: &[FlowSpec]) -> Result<(), RpcError> {
    let deadline = tokio::time::Instant::now() + BIND_TIMEOUT;
    for &pid in pids {
        for flow in flows {
            while !tasks::udp_bound_for(pid, flow.service) {
                let why = if !tasks::running(pid) {
                    "exited"
                } else if tokio::time::Instant::now() > deadline {
                    "did not bind it within 5 s"
                } else {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                };
                return Err(RpcError::new(
                    code::INTERNAL_ERROR,
                    format!("process {pid}, started to serve {}, {why}", flow.service),
                ));
            }
        }
    }
    Ok(())
}

/// A method's typed answer as it goes on the wire.
fn answer<A: Serialize>(outcome: Result<A, RpcError>) -> Result<Value, RpcError> {
    serde_json::to_value(outcome?).map_err(|e| {
        RpcError::new(
            code::INTERNAL_ERROR,
            format!("the answer does not serialize: {e}"),
        )
    })
}

impl Daemon {
    fn status(&self) -> Result<Status, RpcError> {
        let dataplane = self.dataplane.lock().unwrap();
        let counters = dataplane.counters().map_err(dataplane_error)?;
        Ok(Status {
            version: env!("CARGO_PKG_VERSION").into(),
            pin_root: dataplane.pin_root().to_owned(),
            adopted: self.adopted,
            uptime_s: self.started.elapsed().as_secs(),
            interfaces: Interfaces {
                service: self.config.interface.clone(),
                peer: self.config.peer_interface.clone(),
                mirror_from: self.config.mirror_interface(),
            },
            programs: dataplane.attached_programs().map_err(dataplane_error)?,
            flows: flow_rows(&dataplane)?,
            counters: counter::NAMES
                .iter()
                .zip(0..)
                .map(|(name, i)| (name.to_string(), counters.get(i)))
                .collect(),
            services: self.services.list(),
            migrations: self.reports(),
            peer_listen: self.config.peer_listen,
            peer_key: self.trust.identity().map(|i| i.public().to_string()),
            peers: self.config.peers.iter().map(|p| p.name.clone()).collect(),
            takeovers: self.takeovers.lock().unwrap().clone(),
        })
    }

    fn metrics(&self) -> Result<String, RpcError> {
        let dataplane = self.dataplane.lock().unwrap();
        let counters = dataplane.counters().map_err(dataplane_error)?;
        let flows = dataplane.flows().map_err(dataplane_error)?.len();
        Ok(metrics::render(&counters, flows, self.services.len()))
    }

    fn flow_add(&self, FlowSpec { cps, service }: FlowSpec) -> Result<FlowAdded, RpcError> {
        let key = flow::udp(cps, service);
        let id = self
            .dataplane
            .lock()
            .unwrap()
            .add_flow(key, 0)
            .map_err(dataplane_error)?;
        Ok(FlowAdded {
            id,
            flow: flow::display(&key),
        })
    }

    fn flow_remove(&self, FlowSpec { cps, service }: FlowSpec) -> Result<FlowRemoved, RpcError> {
        let key = flow::udp(cps, service);
        if let Some(user) = self
            .services
            .list()
            .into_iter()
            .find(|s| s.flows.iter().any(|f| flow::udp(f.cps, f.service) == key))
        {
            return Err(RpcError::new(
                code::CONFLICT,
                format!(
                    "service {} uses this flow: service.unregister it first",
                    user.name
                ),
            ));
        }
        self.dataplane
            .lock()
            .unwrap()
            .remove_flow(&key)
            .map_err(dataplane_error)?;
        Ok(FlowRemoved {
            removed: flow::display(&key),
        })
    }

    fn service_register(&self, mut service: Service) -> Result<ServiceRegistered, RpcError> {
        // The name becomes part of migration ids, and so of paths.
        crate::service::service_name(&service.name)
            .map_err(|e| RpcError::new(code::INVALID_PARAMS, e.to_string()))?;
        self.container_instances(&mut service)?;
        service.registered = std::iter::once(service.pid)
            .chain(service.standby_pid)
            .map(|pid| {
                Identity::of(pid)
                    .ok_or_else(|| RpcError::new(code::NOT_FOUND, format!("no process {pid}")))
            })
            .collect::<Result<_, _>>()?;
        if let Some(netns) = &service.netns
            && !Path::new(netns).exists()
        {
            return Err(RpcError::new(
                code::NOT_FOUND,
                format!("no network namespace {netns}"),
            ));
        }
        let known = self
            .dataplane
            .lock()
            .unwrap()
            .flows()
            .map_err(dataplane_error)?;
        let keys: Vec<FlowKey> = service
            .flows
            .iter()
            .map(|f| flow::udp(f.cps, f.service))
            .collect();
        for key in &keys {
            if !known.iter().any(|(k, _)| k == key) {
                return Err(RpcError::new(
                    code::NOT_FOUND,
                    format!(
                        "{} is not a known flow: flow.add it first",
                        flow::display(key)
                    ),
                ));
            }
        }
        if self.services.contains(&service.name) {
            return Err(registry_error(RegistryError::Exists(service.name)));
        }
        // A flow feeds one service: a migration moves it with the service.
        if let Some((other, spec)) = self.services.list().into_iter().find_map(|other| {
            let taken = other
                .flows
                .iter()
                .copied()
                .find(|f| service.flows.contains(f));
            taken.map(|f| (other.name, f))
        }) {
            return Err(RpcError::new(
                code::CONFLICT,
                format!(
                    "{} feeds service {other} already",
                    flow::display(&flow::udp(spec.cps, spec.service))
                ),
            ));
        }
        if !keys.is_empty() {
            self.dataplane
                .lock()
                .unwrap()
                .join_flows(&keys)
                .map_err(dataplane_error)?;
        }
        if service.standby_pid.is_some() {
            self.feed_standby(&service)?;
        }
        let name = service.name.clone();
        self.services.insert(service).map_err(registry_error)?;
        Ok(ServiceRegistered { registered: name })
    }

    /// Starts a service as CRIU needs it (own PID namespace and session,
    /// no inherited descriptors, in services_dir/NAME, on `service_cpus` at
    /// `service_priority`), adds its flows, and with `standby` starts a
    /// standby from the same command in the standbys' namespace (on the
    /// other CPUs); answers once each has bound its flows' service
    /// addresses, registered. Anything it started or added is undone if a
    /// later step fails.
    async fn service_start(&self, start: ServiceStart) -> Result<ServiceStarted, RpcError> {
        let ServiceStart {
            name,
            flows,
            standby,
            command,
            image,
        } = start;
        crate::service::service_name(&name)
            .map_err(|e| RpcError::new(code::INVALID_PARAMS, e.to_string()))?;
        let invalid = |what: &str| Err(RpcError::new(code::INVALID_PARAMS, what.to_string()));
        if command.is_empty() {
            return invalid("command: the program to start, and its arguments");
        }
        if flows.is_empty() {
            return invalid("flows: at least one flow feeds a service");
        }
        if self.services.contains(&name) {
            return Err(registry_error(RegistryError::Exists(name)));
        }
        let standby_host = match (standby, self.config.standby_host()) {
            (false, _) => None,
            (true, Some(host)) => Some(host),
            (true, None) => {
                return invalid("standby: this host runs no standbys (standby_interface)");
            }
        };
        let added = self.add_missing_flows(&flows)?;
        let mut started = Vec::new();
        // With an image: the service's container and its standby's.
        let container = image.as_ref().map(|_| name.clone());
        let standby_container = container
            .as_ref()
            .and(standby_host.as_ref())
            .map(|_| format!("{name}-standby"));
        let mut outcome = match &image {
            Some(image) => {
                let standby = standby_host.as_ref().zip(standby_container.as_deref());
                self.launch_containers(&name, (image, &command), standby, &flows, &mut started)
            }
            None => self.launch(&name, &flows, standby_host.as_ref(), &command, &mut started),
        };
        if outcome.is_ok() {
            outcome = ready(&started, &flows).await.and(outcome);
        }
        let outcome = outcome.and_then(|(pid, standby_pid)| {
            self.service_register(Service {
                name: name.clone(),
                pid,
                netns: None,
                flows: flows.clone(),
                standby_pid,
                command: Some(command.clone()),
                container: container.clone(),
                standby_container: standby_container.clone(),
                runtime: crate::service::Runtime::Runc,
                registered: Vec::new(),
            })?;
            Ok(ServiceStarted {
                started: name.clone(),
                pid,
                standby_pid,
            })
        });
        match outcome {
            Ok(started) => {
                tracing::info!(service = %started.started, pid = started.pid,
                    standby_pid = ?started.standby_pid, "started the service");
                Ok(started)
            }
            Err(e) => {
                for pid in started {
                    tasks::kill_pid_namespace(pid);
                }
                let containers = self.config.containers();
                for id in container.iter().chain(&standby_container) {
                    containers.discard(crate::service::Runtime::Runc, id);
                }
                let mut dataplane = self.dataplane.lock().unwrap();
                for key in added {
                    let _ = dataplane.remove_flow(&key);
                }
                Err(e)
            }
        }
    }

    /// Starts service `name`'s standby (if `standby_host`) and then the
    /// service from `command`, each pid into `started` as it starts: the
    /// service's pid and the standby's.
    fn launch(
        &self,
        name: &str,
        flows: &[FlowSpec],
        standby_host: Option<&StandbyHost>,
        command: &[String],
        started: &mut Vec<u32>,
    ) -> Result<(u32, Option<u32>), RpcError> {
        let cwd = self.config.services_dir.join(name);
        let standby_cwd = cwd.join("standby");
        std::fs::create_dir_all(&standby_cwd).map_err(|e| {
            RpcError::new(
                code::INTERNAL_ERROR,
                format!("{}: {e}", standby_cwd.display()),
            )
        })?;
        let failed =
            |e: launch::LaunchError| RpcError::new(code::INTERNAL_ERROR, format!("{name}: {e}"));
        let standby_pid = match standby_host {
            None => None,
            Some(host) => {
                host.make_room(flows).map_err(|e| {
                    RpcError::new(code::INTERNAL_ERROR, format!("the standby's place: {e}"))
                })?;
                let pid = launch::start(&Launch {
                    argv: command,
                    cwd: &standby_cwd,
                    netns: Some(&host.netns),
                    cpus: &tasks::other_cpus(&self.config.service_cpus),
                    priority: self.config.service_priority,
                })
                .map_err(failed)?;
                started.push(pid);
                Some(pid)
            }
        };
        let pid = launch::start(&Launch {
            argv: command,
            cwd: &cwd,
            netns: None,
            cpus: &self.config.service_cpus,
            priority: self.config.service_priority,
        })
        .map_err(failed)?;
        started.push(pid);
        Ok((pid, standby_pid))
    }

    /// As [`Self::launch`], each instance a runc container of `image`
    /// running `command`: the service as container `name`, its standby (if
    /// `standby` names the standbys' host and the standby's id) in the
    /// standbys' namespace, each pinned as a process would be. They run as
    /// ordinary tasks: a container's new cgroup may have no real-time
    /// budget (cgroup v1), and its priority is then not its to take.
    fn launch_containers(
        &self,
        name: &str,
        (image, command): (&str, &[String]),
        standby: Option<(&StandbyHost, &str)>,
        flows: &[FlowSpec],
        started: &mut Vec<u32>,
    ) -> Result<(u32, Option<u32>), RpcError> {
        let containers = self.config.containers();
        let failed =
            |e: runc::ContainerError| RpcError::new(code::INTERNAL_ERROR, format!("{name}: {e}"));
        let bundle = self.config.services_dir.join(name);
        let mut start = |id: &str, netns: &Path, bundle: PathBuf, cpus: &[usize]| {
            let pid = containers
                .start(id, (image, command), netns, &bundle)
                .map_err(failed)?;
            started.push(pid);
            if let Err(e) = tasks::pin(pid, cpus) {
                tracing::warn!(container = id, "left on any CPU: {e}");
            }
            Ok::<_, RpcError>(pid)
        };
        let standby_pid = match standby {
            None => None,
            Some((host, id)) => {
                host.make_room(flows).map_err(|e| {
                    RpcError::new(code::INTERNAL_ERROR, format!("the standby's place: {e}"))
                })?;
                let cpus = tasks::other_cpus(&self.config.service_cpus);
                Some(start(
                    id,
                    &host.netns,
                    bundle.join("standby/bundle"),
                    &cpus,
                )?)
            }
        };
        let netns = runc::own_netns().map_err(failed)?;
        let pid = start(
            name,
            &netns,
            bundle.join("bundle"),
            &self.config.service_cpus,
        )?;
        Ok((pid, standby_pid))
    }

    /// Takes the processes of `service` that are containers from their runtime:
    /// each its container's init (a pid given too must be that one), each
    /// container one a migration can move.
    fn container_instances(&self, service: &mut Service) -> Result<(), RpcError> {
        let invalid = |message: String| RpcError::new(code::INVALID_PARAMS, message);
        if service.container.is_none() && service.standby_container.is_some() {
            return Err(invalid("a standby_container needs a container".into()));
        }
        if service.container.is_none() && service.pid == 0 {
            return Err(invalid("a service needs a pid or a container".into()));
        }
        let containers = self.config.containers();
        let init = |id: &str, given: Option<u32>| -> Result<u32, RpcError> {
            let (pid, _) = containers
                .image(service.runtime, id)
                .map_err(|e| RpcError::new(code::NOT_FOUND, format!("container {id}: {e}")))?;
            match given {
                Some(given) if given != pid && given != 0 => Err(invalid(format!(
                    "container {id} runs as process {pid}, not {given}"
                ))),
                _ => Ok(pid),
            }
        };
        if let Some(id) = &service.container {
            service.pid = init(id, Some(service.pid))?;
        }
        if let Some(id) = &service.standby_container {
            service.standby_pid = Some(init(id, service.standby_pid)?);
        }
        Ok(())
    }

    /// Seeds a standby of a running service from a checkpoint of it (see
    /// [`crate::migration::seed`]); answers once the standby has caught up.
    async fn service_standby(
        &self,
        ServiceName { name }: ServiceName,
    ) -> Result<StandbySeeded, RpcError> {
        let Some(service) = self.services.get(&name) else {
            return Err(RpcError::new(code::NOT_FOUND, format!("no service {name}")));
        };
        if self.config.standby_host().is_none() {
            return Err(RpcError::new(
                code::INVALID_PARAMS,
                "this host runs no standbys (standby_interface)",
            ));
        }
        if service.container.is_some() {
            return Err(RpcError::new(
                code::INVALID_PARAMS,
                format!(
                    "service {name} runs as a container: start its standby container in the \
                     standbys' namespace and register it (service add --standby-container)"
                ),
            ));
        }
        if let Some(pid) = service.standby_pid.filter(|&pid| service.still_runs(pid)) {
            return Err(RpcError::new(
                code::CONFLICT,
                format!("service {name} has a standby already, process {pid}"),
            ));
        }
        let internal = |e: String| RpcError::new(code::INTERNAL_ERROR, e);
        let requests = self
            .standby_requests
            .get()
            .ok_or_else(|| internal("standby requests are not served yet".into()))?;
        let (answer, seeded) = tokio::sync::oneshot::channel();
        let request = StandbyRequest {
            service: name.clone(),
            after_migration: false,
            answer: Some(answer),
        };
        requests
            .send(request)
            .map_err(|_| internal("the daemon stops".into()))?;
        let standby_pid = seeded
            .await
            .map_err(|_| internal("the daemon stops".into()))?
            .map_err(internal)?;
        Ok(StandbySeeded {
            service: name,
            standby_pid,
        })
    }

    /// Adds those of `flows` the dataplane does not know: the ones added.
    fn add_missing_flows(&self, flows: &[FlowSpec]) -> Result<Vec<FlowKey>, RpcError> {
        let mut dataplane = self.dataplane.lock().unwrap();
        let known = dataplane.flows().map_err(dataplane_error)?;
        let mut added = Vec::new();
        for spec in flows {
            let key = flow::udp(spec.cps, spec.service);
            if known.iter().any(|(k, _)| *k == key) || added.contains(&key) {
                continue;
            }
            if let Err(e) = dataplane.add_flow(key, 0) {
                for key in &added {
                    let _ = dataplane.remove_flow(key);
                }
                return Err(dataplane_error(e));
            }
            added.push(key);
        }
        Ok(added)
    }

    /// Mirrors the service's flows to the standby's namespace, whose
    /// dataplane delivers them to the standby instance and keeps its
    /// outputs in (muted). The standby must get every input from its
    /// first: register the service before the CPS starts.
    fn feed_standby(&self, service: &Service) -> Result<(), RpcError> {
        let Some(host) = self.config.standby_host() else {
            return Err(RpcError::new(
                code::INVALID_PARAMS,
                "a standby_pid needs a host that runs standbys (standby_interface)",
            ));
        };
        let mut standby = Dataplane::open(&host.pin_root).map_err(dataplane_error)?;
        let mut dataplane = self.dataplane.lock().unwrap();
        let flows = dataplane.flows().map_err(dataplane_error)?;
        let members: Vec<(FlowKey, FlowConfig)> = flows
            .into_iter()
            .filter(|(k, _)| {
                service
                    .flows
                    .iter()
                    .any(|f| flow::udp(f.cps, f.service) == *k)
            })
            .collect();
        // Registration joined them: one id.
        let Some(&(_, FlowConfig { flow_id, .. })) = members.first() else {
            return Ok(());
        };
        let keys: Vec<FlowKey> = members.iter().map(|(k, _)| *k).collect();
        standby
            .adopt_flows(&keys, flow_id)
            .map_err(dataplane_error)?;
        let gate = dataplane_common::Gate {
            output: dataplane_common::OUTPUT_MUTE,
            // A replica fed in order from its first input: its outputs
            // are counted (a burst at the cutover must not tag the answer
            // to K as K+1's).
            tagging: dataplane_common::TAG_COUNTED,
            ..Default::default()
        };
        standby.set_gate(flow_id, gate).map_err(dataplane_error)?;
        for (key, config) in &members {
            dataplane
                .set_flow_flags(key, config.flags | dataplane_common::FLOW_STANDBY)
                .map_err(dataplane_error)?;
        }
        Ok(())
    }

    fn service_unregister(
        &self,
        ServiceName { name }: ServiceName,
    ) -> Result<ServiceUnregistered, RpcError> {
        match self.services.remove(&name).map_err(registry_error)? {
            Some(_) => Ok(ServiceUnregistered { unregistered: name }),
            None => Err(RpcError::new(code::NOT_FOUND, format!("no service {name}"))),
        }
    }

    fn migration_start(&self, request: migration::Request) -> Result<MigrationId, RpcError> {
        request
            .check()
            .map_err(|e| RpcError::new(code::INVALID_PARAMS, e.to_string()))?;
        let replica = self.replicas.lock().unwrap().get(&request.service).cloned();
        if let Some(replica) = replica {
            return self.hand_over(request, replica);
        }
        if request.keep_replica {
            return Err(RpcError::new(
                code::INVALID_PARAMS,
                format!(
                    "keep_replica: service {} has no hot replica to hand over to",
                    request.service
                ),
            ));
        }
        let (service, taps) = self.admit(&request)?;
        let mut migrations = self.migrations.lock().unwrap();
        if let Some(running) = running_migration(&migrations, &service.name, None) {
            return Err(running);
        }
        let (id, abort) = new_entry(&mut migrations, None, &service, &request, None);
        let context = self.context(taps, abort);
        let (progress, services) = (self.progress(), self.services.clone());
        tracing::info!(%id, service = %service.name, to = %request.to, "migration started");
        let task_id = id.clone();
        let task = tokio::spawn(async move {
            let report = migration::run(task_id, service, request, context, progress).await;
            handed_over(&services, &report);
        });
        // A stopping daemon waits for it (the lock is still held: the
        // task cannot have ended unseen).
        if let Some(entry) = migrations.get_mut(&id) {
            entry.task = Some(task);
        }
        Ok(MigrationId { id })
    }

    /// Starts a hot replica of a registered service on another host (see
    /// [`migration::replica`]): its id, a migration's.
    fn replica_start(&self, asked: ReplicaRequest) -> Result<MigrationId, RpcError> {
        let service = self.services.get(&asked.service);
        // The serving instance never pauses when a standby is there.
        let mode = match service.and_then(|s| s.standby_pid) {
            Some(_) if self.config.standby_host().is_some() => Mode::Standby,
            _ => Mode::LeaveRunning,
        };
        let request = asked.migration(mode);
        request
            .check()
            .map_err(|e| RpcError::new(code::INVALID_PARAMS, e.to_string()))?;
        self.start_replica(request, None)
    }

    /// Takes up again the hot replica `id` that this daemon's previous run
    /// left in sync (its journal: `outgoing`): attaches to it, or restores
    /// one afresh if that fails. One that cannot be taken up is undone.
    pub(super) fn resume_replica(&self, id: String, outgoing: Outgoing) {
        let Some(request) = outgoing.replica.clone() else {
            return;
        };
        let attach = replica::Attach {
            before: outgoing.flows.clone(),
            fed: None,
        };
        match self.start_replica(request, Some((id.clone(), attach))) {
            Ok(_) => tracing::info!(%id, "attaching to the hot replica this daemon kept"),
            Err(e) => {
                let outcome =
                    migration::recovery::undo_source(&self.recovery_host(), &id, &outgoing);
                tracing::warn!(%id,
                    "the hot replica this daemon kept cannot go on ({}): {outcome}", e.message);
            }
        }
    }

    /// Makes the instance a handover's source kept (see
    /// `destination::Adoption`) this host's hot replica of the service
    /// it now serves: attaches to it and feeds it from K+1.
    pub(super) fn adopt_replica(&self, adoption: destination::Adoption) {
        let destination::Adoption {
            service,
            to,
            migration,
            after,
            inputs,
        } = adoption;
        let request = ReplicaRequest {
            service: service.clone(),
            to,
            converge: migration::default_converge(),
            deadline_ms: migration::DEFAULT_DEADLINE_MS,
            compare: Default::default(),
            hold: Default::default(),
        }
        .migration(Mode::LeaveRunning);
        let attach = replica::Attach {
            // The flows as they are here (no journal names them before).
            before: Vec::new(),
            fed: Some((after, inputs)),
        };
        match self.start_replica(request, Some((migration.clone(), attach))) {
            Ok(_) => tracing::info!(id = %migration, %service, %to,
                "adopting the instance the handover's source kept as this host's hot replica"),
            Err(e) => tracing::warn!(id = %migration, %service,
                "the instance the handover's source kept is not adopted: {}", e.message),
        }
    }

    /// Starts the hot replica task for `request`; `attach`: the id of a
    /// replica kept on its host and how to attach to it.
    fn start_replica(
        &self,
        request: migration::Request,
        attach: Option<(String, replica::Attach)>,
    ) -> Result<MigrationId, RpcError> {
        let mut replicas = self.replicas.lock().unwrap();
        if let Some(replica) = replicas.get(&request.service) {
            return Err(RpcError::new(
                code::CONFLICT,
                format!(
                    "service {} has a hot replica already ({}, at {})",
                    request.service, replica.id, replica.to
                ),
            ));
        }
        let (service, taps) = self.admit(&request)?;
        let mut migrations = self.migrations.lock().unwrap();
        if let Some(running) = running_migration(&migrations, &service.name, None) {
            return Err(running);
        }
        let (attach_id, attach) = attach.unzip();
        let (id, abort) = new_entry(
            &mut migrations,
            attach_id,
            &service,
            &request,
            Some(Default::default()),
        );
        let context = self.context(taps, abort);
        let (commands, received) = tokio::sync::mpsc::unbounded_channel();
        replicas.insert(
            service.name.clone(),
            Replica {
                id: id.clone(),
                to: request.to,
                commands,
            },
        );
        let (progress, services, table) = (
            self.progress(),
            self.services.clone(),
            self.replicas.clone(),
        );
        tracing::info!(%id, service = %service.name, to = %request.to, mode = ?request.mode,
            "hot replica started");
        let task_id = id.clone();
        let task = tokio::spawn(async move {
            let name = service.name.clone();
            let ended = replica::run(
                task_id.clone(),
                service,
                request,
                context,
                progress,
                received,
                attach,
            )
            .await;
            table.lock().unwrap().remove(&name);
            let replica = &ended.replica;
            match &replica.error {
                None => tracing::info!(id = %task_id, state = replica.state.name(),
                    "hot replica ended"),
                Some(e) => tracing::warn!(id = %task_id, "hot replica ended: {e}"),
            }
            if let Some(report) = &ended.handover {
                handed_over(&services, report);
            }
            if ended.taken_over
                && let Err(e) = services.remove(&name)
            {
                tracing::warn!(id = %task_id, "{e}");
            }
        });
        if let Some(entry) = migrations.get_mut(&id) {
            entry.task = Some(task);
        }
        Ok(MigrationId { id })
    }

    /// Tells every hot replica that this daemon stops (see
    /// [`replica::Command::Leave`]): the ids of those told.
    pub(super) fn leave_replicas(&self) -> Vec<String> {
        let replicas = self.replicas.lock().unwrap();
        replicas
            .values()
            .filter(|r| r.commands.send(replica::Command::Leave).is_ok())
            .map(|r| r.id.clone())
            .collect()
    }

    fn replica_stop(&self, ServiceName { name }: ServiceName) -> Result<ReplicaStopping, RpcError> {
        let replicas = self.replicas.lock().unwrap();
        let Some(replica) = replicas.get(&name) else {
            return Err(RpcError::new(
                code::NOT_FOUND,
                format!("service {name} has no hot replica"),
            ));
        };
        // A replica whose task has ended is gone from the table already.
        let _ = replica.commands.send(replica::Command::Stop);
        // One still syncing stops at its next phase or round, too.
        if let Some(entry) = self.migrations.lock().unwrap().get(&replica.id)
            && entry.report.replica.as_ref().map(|r| r.state) != Some(ReplicaState::InSync)
        {
            entry.abort.store(true, Ordering::Relaxed);
        }
        Ok(ReplicaStopping {
            stopping: replica.id.clone(),
        })
    }

    /// A migration of a service with a hot replica: to the replica's host
    /// and in sync, a handover to it (no checkpoint); anything else is
    /// refused.
    fn hand_over(
        &self,
        request: migration::Request,
        replica: Replica,
    ) -> Result<MigrationId, RpcError> {
        if request.keep_replica && self.replica_host.get().is_none() {
            return Err(RpcError::new(
                code::INVALID_PARAMS,
                "keep_replica: this daemon serves no peer link (peer_listen), so this host \
                 cannot hold a replica",
            ));
        }
        let container = self
            .services
            .get(&request.service)
            .and_then(|s| s.container);
        if request.keep_replica && container.is_some() {
            return Err(RpcError::new(
                code::INVALID_PARAMS,
                format!(
                    "keep_replica: service {} runs as a container, which a handover \
                     does not keep (it leaves this host's runtime)",
                    request.service
                ),
            ));
        }
        if request.to != replica.to {
            return Err(RpcError::new(
                code::CONFLICT,
                format!(
                    "service {} has a hot replica at {}: migrate it there, or end the \
                     replica first (replica.stop)",
                    request.service, replica.to
                ),
            ));
        }
        let mut migrations = self.migrations.lock().unwrap();
        let state = migrations
            .get(&replica.id)
            .and_then(|e| e.report.replica.as_ref())
            .map(|r| r.state);
        if state != Some(ReplicaState::InSync) {
            let state = state.map_or("ended", ReplicaState::name);
            return Err(RpcError::new(
                code::CONFLICT,
                format!(
                    "the hot replica {} is {state}: it is handed over to only in sync",
                    replica.id
                ),
            ));
        }
        if let Some(running) = running_migration(&migrations, &request.service, Some(&replica.id)) {
            return Err(running);
        }
        let Some(service) = self.services.get(&request.service) else {
            return Err(RpcError::new(
                code::NOT_FOUND,
                format!("no service {}", request.service),
            ));
        };
        let (id, abort) = new_entry(&mut migrations, None, &service, &request, None);
        if let Some(entry) = migrations.get_mut(&id) {
            entry.report.from_replica = Some(replica.id.clone());
        }
        let command = replica::Command::Handover {
            id: id.clone(),
            request,
            asked: std::time::Instant::now(),
            abort,
        };
        if replica.commands.send(command).is_err() {
            migrations.remove(&id);
            return Err(RpcError::new(
                code::CONFLICT,
                format!("the hot replica {} has just ended", replica.id),
            ));
        }
        tracing::info!(%id, replica = %replica.id, to = %replica.to,
            "handover to the hot replica started");
        Ok(MigrationId { id })
    }

    /// The service a migration (or a replica) of `request` moves, and the
    /// log readers it needs, if the destination is a listed peer and the
    /// service is registered.
    fn admit(&self, request: &migration::Request) -> Result<(Service, LogTaps), RpcError> {
        self.trust
            .peer(request.to)
            .map_err(|e| RpcError::new(code::INVALID_PARAMS, format!("to: {e}")))?;
        let Some(service) = self.services.get(&request.service) else {
            return Err(RpcError::new(
                code::NOT_FOUND,
                format!("no service {}", request.service),
            ));
        };
        let Some(taps) = self.taps.get().cloned() else {
            return Err(RpcError::new(
                code::INTERNAL_ERROR,
                "the log readers are not running",
            ));
        };
        Ok((service, taps))
    }

    /// What a migration from this host works with; `abort` stops it.
    fn context(&self, (inputs, outputs): LogTaps, abort: Arc<AtomicBool>) -> migration::Context {
        migration::Context {
            pin_root: self.config.pin_root.clone(),
            interface: self.config.interface.clone(),
            peer_interface: self.config.peer_interface.clone(),
            files: Files::new(&self.config.images_dir),
            criu: self.config.criu(),
            containers: self.config.containers(),
            inputs,
            outputs,
            standby: self.config.standby_host().map(|s| (s.netns, s.pin_root)),
            abort,
            trust: self.trust.clone(),
            replicas: self.replica_host.get().cloned(),
        }
    }

    /// What a migration shows its reports to: the table, and the watchers.
    fn progress(&self) -> impl Fn(&Report) + Send + Sync + 'static {
        let (table, events) = (self.migrations.clone(), self.events.clone());
        move |report: &Report| {
            if let Some(entry) = table.lock().unwrap().get_mut(&report.id) {
                entry.report = report.clone();
            }
            let _ = events.send(report.clone());
        }
    }

    /// Every migration's latest report.
    fn reports(&self) -> Vec<Report> {
        let migrations = self.migrations.lock().unwrap();
        migrations.values().map(|e| e.report.clone()).collect()
    }

    fn report(&self, MigrationId { id }: MigrationId) -> Result<Report, RpcError> {
        self.migrations
            .lock()
            .unwrap()
            .get(&id)
            .map(|e| e.report.clone())
            .ok_or_else(|| RpcError::new(code::NOT_FOUND, format!("no migration {id}")))
    }

    fn migration_abort(
        &self,
        MigrationId { id }: MigrationId,
    ) -> Result<MigrationAborting, RpcError> {
        match self.migrations.lock().unwrap().get(&id) {
            Some(entry) if entry.report.state == State::Running => {
                entry.abort.store(true, Ordering::Relaxed);
                Ok(MigrationAborting { aborting: id })
            }
            Some(entry) => Err(RpcError::new(
                code::CONFLICT,
                format!("migration {id} is {} already", entry.report.state.name()),
            )),
            None => Err(RpcError::new(code::NOT_FOUND, format!("no migration {id}"))),
        }
    }

    async fn peer_ping(&self, PeerAddress { address }: PeerAddress) -> Result<PeerPong, RpcError> {
        let peer_error =
            |e: peer::PeerError| RpcError::new(code::PEER, format!("peer {address}: {e}"));
        let (mut link, theirs) = peer::connect(&self.trust, address)
            .await
            .map_err(peer_error)?;
        let rtt = peer::ping(&mut link).await.map_err(peer_error)?;
        Ok(PeerPong {
            host: theirs.host,
            version: theirs.version,
            rtt_us: rtt.as_micros() as u64,
        })
    }
}
/// The input and output log readers.
type LogTaps = (Arc<Tap>, Arc<Tap>);

/// A hot replica this daemon keeps, by service: where it is, and how to
/// tell it to hand over or stop.
#[derive(Clone)]
pub(super) struct Replica {
    id: String,
    to: std::net::SocketAddr,
    commands: tokio::sync::mpsc::UnboundedSender<replica::Command>,
}

/// The refusal of a migration of `service` while another (or a hot
/// replica's life) runs, but for `except` (the replica a handover goes to).
fn running_migration(
    migrations: &BTreeMap<String, MigrationEntry>,
    service: &str,
    except: Option<&str>,
) -> Option<RpcError> {
    migrations
        .iter()
        .any(|(id, e)| {
            e.report.state == State::Running
                && e.report.service == service
                && Some(id.as_str()) != except
        })
        .then(|| {
            RpcError::new(
                code::CONFLICT,
                format!("service {service} is migrating already"),
            )
        })
}

/// Adds a running migration of `service` as `request` asks to the table
/// (a hot replica's with `replica`): its id and abort switch.
fn new_entry(
    migrations: &mut BTreeMap<String, MigrationEntry>,
    id: Option<String>,
    service: &Service,
    request: &migration::Request,
    replica: Option<ReplicaStatus>,
) -> (String, Arc<AtomicBool>) {
    // Unique among this run's (a replica attached to again keeps the id
    // the previous run gave it).
    let id = id.unwrap_or_else(|| {
        (migrations.len() + 1..)
            .map(|n| format!("{}-{n}", service.name))
            .find(|id| !migrations.contains_key(id))
            .expect("a free id")
    });
    let abort = Arc::new(AtomicBool::new(false));
    let report = Report {
        id: id.clone(),
        service: service.name.clone(),
        to: request.to.to_string(),
        mode: request.mode,
        state: State::Running,
        replica,
        ..Default::default()
    };
    migrations.insert(
        id.clone(),
        MigrationEntry {
            report,
            abort: abort.clone(),
            task: None,
        },
    );
    (id, abort)
}

/// After a migration (or a handover to a hot replica) that picked K: the
/// service runs on the destination now, whatever failed after.
fn handed_over(services: &crate::registry::Registry, report: &Report) {
    let (id, k) = (&report.id, report.handover_seq);
    match &report.error {
        None => tracing::info!(%id, total_us = report.total_us, "migration done"),
        Some(e) if k > 0 => tracing::warn!(%id,
            "migration failed after the handover at K = {k}; the destination serves: {e}"),
        Some(e) => tracing::warn!(%id, "migration failed, rolled back: {e}"),
    }
    if k > 0
        && let Err(e) = services.remove(&report.service)
    {
        tracing::warn!(%id, "{e}");
    }
}

fn registry_error(e: RegistryError) -> RpcError {
    match e {
        RegistryError::Exists(_) => RpcError::new(code::CONFLICT, e.to_string()),
        e => RpcError::new(code::INTERNAL_ERROR, e.to_string()),
    }
}

fn dataplane_error(e: LoadError) -> RpcError {
    match e {
        LoadError::UnknownFlow(_) => RpcError::new(code::NOT_FOUND, e.to_string()),
        LoadError::DuplicateFlow(_) => RpcError::new(code::CONFLICT, e.to_string()),
        e => RpcError::new(code::DATAPLANE, e.to_string()),
    }
}

/// The flows' rows, by id.
fn flow_rows(dataplane: &Dataplane) -> Result<Vec<FlowInfo>, RpcError> {
    let mut flows = Vec::new();
    for (key, config) in dataplane.flows().map_err(dataplane_error)? {
        let sequence = dataplane
            .sequence(config.flow_id)
            .map_err(dataplane_error)?;
        flows.push(FlowInfo {
            id: config.flow_id,
            cps: flow::source(&key),
            service: flow::destination(&key),
            mirror: config.flags & FLOW_MIRROR != 0,
            last_seq: sequence.last_seq,
            last_delivered: sequence.last_delivered,
        });
    }
    flows.sort_by_key(|f| f.id);
    Ok(flows)
}
